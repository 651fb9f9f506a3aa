//! The free-space watermark: the cache never fills its file system. Before
//! fills start, the free space of the work dir's file system (`statvfs`, at
//! most every 100 ms; the figure is kept in between and what was planned
//! since is subtracted) must stay above `--min-free` after them; if it
//! would not, the index evicts least recently used blobs first, and a fill
//! that still does not fit fails at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How much of the file system to keep free.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    /// A percentage (0–100) of the file system's size.
    Percent(f64),
}

/// Default for `--min-free`.
pub const DEFAULT_MIN_FREE: MinFree = MinFree::Percent(10.0);

/// Room kept besides the blob data a fill writes: its map file, directory
/// entries, the file system's own bookkeeping.
const SLACK: u64 = 1 << 20;

/// How long a `statvfs` figure is used before asking again.
const REFRESH: Duration = Duration::from_millis(100);

/// The watermark of one work dir.
#[derive(Debug)]
pub struct DiskWatch {
    dir: PathBuf,
    min_free: MinFree,
    checked: Option<Instant>,
    /// Free bytes and the file system's size at the last check.
    free: u64,
    total: u64,
    /// Bytes evicted since then (their deletion may not show yet).
    released: u64,
    /// Bytes of fills finished since then (the figure may predate them).
    written: u64,
    /// Bytes of fills planned and not finished (a sparse file's blocks are
    /// allocated only as they are written, so no figure shows them yet).
    inflight: u64,
}

impl DiskWatch {
    pub fn new(dir: PathBuf, min_free: MinFree) -> DiskWatch {
        DiskWatch {
            dir,
            min_free,
            checked: None,
            free: 0,
            total: 0,
            released: 0,
            written: 0,
            inflight: 0,
        }
    }

    fn refresh(&mut self, now: Instant) {
        if self
            .checked
            .is_some_and(|t| now.duration_since(t) < REFRESH)
        {
            return;
        }
        match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(st) => {
                let frag = st.fragment_size();
                self.free = st.blocks_available() * frag;
                self.total = st.blocks() * frag;
                self.released = 0;
                self.written = 0;
                self.checked = Some(now);
            }
            Err(e) => {
                // Without a figure the watermark cannot be kept; say so
                // and let fills go (ENOSPC is still handled).
                log::warn!("statvfs {}: {e}; free space unknown", self.dir.display());
                self.free = u64::MAX / 2;
                self.total = u64::MAX / 2;
                self.checked = Some(now);
            }
        }
    }

    /// The bytes to keep free.
    pub fn min_free(&self) -> u64 {
        match self.min_free {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (self.total as f64 * p.clamp(0.0, 100.0) / 100.0) as u64,
        }
    }

    /// How many bytes must be released before `need` more may be written
    /// (0: it fits now).
    pub fn shortfall(&mut self, need: u64, now: Instant) -> u64 {
        self.refresh(now);
        let after = self.free as i128 + self.released as i128
            - self.inflight as i128
            - self.written as i128
            - need as i128
            - SLACK as i128;
        let min = self.min_free() as i128;
        (min - after).max(0) as u64
    }

    /// `need` bytes are about to be written.
    pub fn plan(&mut self, need: u64) {
        self.inflight += need;
    }

    /// A planned fill of `bytes` finished (written, or failed): counted
    /// until the next figure, which shows what it wrote.
    pub fn fill_done(&mut self, bytes: u64) {
        let bytes = bytes.min(self.inflight);
        self.inflight -= bytes;
        self.written += bytes;
    }

    /// `bytes` are being released (an eviction).
    pub fn release(&mut self, bytes: u64) {
        self.released += bytes;
    }

    /// Forgets the last figure (after ENOSPC: the file system is fuller
    /// than we thought).
    pub fn invalidate(&mut self) {
        self.checked = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortfall_counts_what_was_planned_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DiskWatch::new(dir.path().to_owned(), MinFree::Bytes(0));
        let now = Instant::now();
        assert_eq!(w.shortfall(0, now), 0);
        let free = w.free - SLACK;
        assert_eq!(w.shortfall(free, now), 0);
        assert_eq!(w.shortfall(free + 10, now), 10);
        w.plan(free);
        assert_eq!(w.shortfall(1, now), 1);
        w.release(5);
        assert_eq!(w.shortfall(5, now), 0);
        // A finished fill leaves the in-flight count; a later figure keeps
        // counting fills still in flight.
        w.fill_done(free - 100);
        w.invalidate();
        assert!(w.shortfall(0, now) == 0);
        assert_eq!(w.inflight, 100);
        let mut pct = DiskWatch::new(dir.path().to_owned(), MinFree::Percent(100.0));
        assert!(
            pct.shortfall(0, now) > 0,
            "nothing fits under a 100% watermark"
        );
    }
}
