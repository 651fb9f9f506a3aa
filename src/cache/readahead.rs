//! Sequential-read detection for one blob: decides, from the FetchRanges it
//! sees, how far ahead of a reader the cache should fill. No I/O.
//!
//! The policy follows the kernel's page-cache readahead: a reader is
//! *sequential* once it has moved forward twice in a row (each request
//! starting inside or right at the end of the one before). Then a window
//! of four times its request (at least one fill job) is filled ahead of
//! it, and each time the reader has used up half of what was read ahead,
//! the window doubles, up to the maximum. A request that lands outside the
//! stream (behind it, or past what was read ahead) is random: the state
//! resets and nothing is read ahead, so a random reader pays only for what
//! it asks. See docs/CACHE.md.

/// Forward steps in a row before the first readahead: the third request
/// of a stream triggers it (a file system's superblock read followed by
/// one more block does not).
const TRIGGER_STEPS: u32 = 2;

/// How a blob is being read, as far as readahead cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readahead {
    /// The stream's last request, `[start, end)` (its end is the furthest
    /// any request of the stream reached).
    last: (u64, u64),
    /// Forward steps in a row.
    steps: u32,
    /// Current window in bytes; 0 while no stream is detected.
    window: u64,
    /// Readahead has been asked up to this offset.
    ahead: u64,
}

impl Readahead {
    /// Sees a request for `[start, end)` of a blob of `size` bytes; returns
    /// the byte range to fill ahead of the reader now, if any. `max` is the
    /// largest window (0 turns readahead off) and `min` the smallest first
    /// window (one fill job).
    pub fn on_request(
        &mut self,
        start: u64,
        end: u64,
        size: u64,
        min: u64,
        max: u64,
    ) -> Option<(u64, u64)> {
        let (last_start, last_end) = self.last;
        if self.steps > 0 && start >= last_start && end <= last_end {
            // A re-read inside the last request: neither forward nor random.
            return None;
        }
        let forward = if self.window > 0 {
            // Streaming: anything between the stream's last request and
            // what was read ahead keeps it (several readers of one stream,
            // or requests in flight that arrive out of order).
            start >= last_start.saturating_sub(self.window) && start <= last_end.max(self.ahead)
        } else {
            self.steps > 0 && start >= last_start && start <= last_end && end > last_end
        };
        if !forward {
            *self = Readahead {
                last: (start, end),
                steps: 1,
                ..Readahead::default()
            };
            return None;
        }
        self.steps = self.steps.saturating_add(1);
        self.last = (start, last_end.max(end));
        if max == 0 || self.steps <= TRIGGER_STEPS {
            return None;
        }
        let reader = self.last.1;
        if self.window == 0 {
            self.window = (end - start).saturating_mul(4).clamp(min.min(max), max);
        } else if self.ahead.saturating_sub(reader) > self.window / 2 {
            // More than half the window is still ahead: nothing to do yet.
            return None;
        } else {
            self.window = self.window.saturating_mul(2).min(max);
        }
        let from = self.ahead.max(reader);
        let to = reader.saturating_add(self.window).min(size);
        if from >= to {
            return None;
        }
        self.ahead = to;
        Some((from, to))
    }

    /// The current window in bytes (0: no stream detected).
    pub fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 1 << 30;

    /// Feeds consecutive `len`-byte requests from 0; returns what each
    /// asked to read ahead.
    fn sequential(ra: &mut Readahead, len: u64, n: u64, max: u64) -> Vec<Option<(u64, u64)>> {
        (0..n)
            .map(|i| ra.on_request(i * len, (i + 1) * len, SIZE, 4 * MIB, max))
            .collect()
    }

    #[test]
    fn a_sequential_reader_gets_a_window_that_grows_to_the_maximum() {
        let mut ra = Readahead::default();
        let got = sequential(&mut ra, 4 * MIB, 40, 64 * MIB);
        // Nothing for the first two requests; the third starts a window of
        // four requests ahead of its end.
        assert_eq!(&got[..3], &[None, None, Some((12 * MIB, 28 * MIB))]);
        // Every byte up to the furthest request is asked once, in order,
        // and the reader never catches up with what was asked.
        let mut at = 12 * MIB;
        for (i, r) in got.iter().enumerate().skip(2) {
            if let Some((from, to)) = *r {
                assert_eq!(from, at, "request {i}");
                assert!(to > from);
                at = to;
            }
            assert!(
                at > (i as u64 + 1) * 4 * MIB,
                "request {i} reached the window's end"
            );
        }
        assert_eq!(ra.window(), 64 * MIB);
        // Windows are asked in batches, not a granule per request.
        let asks = got.iter().filter(|r| r.is_some()).count();
        assert!(asks < 20, "{asks} asks for 40 requests");
    }

    #[test]
    fn random_reads_never_read_ahead() {
        let mut ra = Readahead::default();
        let mut x = 12345u64;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (x >> 20) % SIZE;
            let end = (start + 4096).min(SIZE);
            assert_eq!(ra.on_request(start, end, SIZE, 4 * MIB, 64 * MIB), None);
        }
        assert_eq!(ra.window(), 0);
    }

    #[test]
    fn two_reads_at_the_front_do_not_start_a_stream() {
        // A superblock read, then the next block: still no readahead.
        let mut ra = Readahead::default();
        assert_eq!(ra.on_request(1024, 2048, SIZE, 4 * MIB, 64 * MIB), None);
        assert_eq!(ra.on_request(0, MIB, SIZE, 4 * MIB, 64 * MIB), None);
        assert_eq!(ra.on_request(MIB, 2 * MIB, SIZE, 4 * MIB, 64 * MIB), None);
        // A jump elsewhere resets the count.
        assert_eq!(
            ra.on_request(9 * MIB, 10 * MIB, SIZE, 4 * MIB, 64 * MIB),
            None
        );
        assert_eq!(
            ra.on_request(10 * MIB, 11 * MIB, SIZE, 4 * MIB, 64 * MIB),
            None
        );
        assert!(ra
            .on_request(11 * MIB, 12 * MIB, SIZE, 4 * MIB, 64 * MIB)
            .is_some());
    }

    #[test]
    fn a_jump_out_of_the_stream_resets_it_and_off_means_off() {
        let mut ra = Readahead::default();
        sequential(&mut ra, MIB, 10, 64 * MIB);
        assert!(ra.window() > 0);
        // Past what was read ahead: random.
        assert_eq!(
            ra.on_request(500 * MIB, 500 * MIB + 4096, SIZE, 4 * MIB, 64 * MIB),
            None
        );
        assert_eq!(ra.window(), 0);
        // Behind the stream by more than a window: random too.
        sequential(&mut ra, MIB, 100, 64 * MIB);
        assert!(ra.window() > 0);
        assert_eq!(ra.on_request(0, 4096, SIZE, 4 * MIB, 64 * MIB), None);
        assert_eq!(ra.window(), 0);
        let mut off = Readahead::default();
        assert!(sequential(&mut off, MIB, 50, 0).iter().all(Option::is_none));
    }

    #[test]
    fn readahead_stops_at_the_end_of_the_blob() {
        let mut ra = Readahead::default();
        let size = 10 * MIB;
        let mut asked = Vec::new();
        for i in 0..10 {
            if let Some(r) = ra.on_request(i * MIB, (i + 1) * MIB, size, 4 * MIB, 64 * MIB) {
                asked.push(r);
            }
        }
        assert!(asked.iter().all(|&(a, b)| a < b && b <= size), "{asked:?}");
        assert_eq!(asked.last().map(|r| r.1), Some(size));
    }

    #[test]
    fn out_of_order_requests_of_one_stream_keep_it() {
        // Two requests in flight at a time arrive swapped now and then.
        let mut ra = Readahead::default();
        let mut asked = 0;
        for pair in 0..20u64 {
            let (a, b) = (2 * pair * MIB, (2 * pair + 1) * MIB);
            let order = if pair % 3 == 1 { [b, a] } else { [a, b] };
            for s in order {
                asked += u64::from(ra.on_request(s, s + MIB, SIZE, 4 * MIB, 64 * MIB).is_some());
            }
        }
        assert!(ra.window() > 0 && asked > 0);
    }
}
