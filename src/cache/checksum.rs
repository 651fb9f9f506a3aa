//! The sha256 of a blob, computed while the blob is filled.
//!
//! After each fill, once the fill's waiters are answered, the worker that
//! ran it hashes on through the prefix of ready granules, reading them back
//! from the page cache where they were just written. A blob filled front
//! to back (a sequential reader with readahead, a whole-blob fetch) is
//! therefore hashed as it arrives, and completing it costs only its last
//! granules; a blob filled out of order is hashed at completion for
//! whatever the prefix did not reach (at worst a whole pass, as before).
//!
//! Workers never wait for one another here except at completion: a worker
//! that finds another one hashing leaves it a note to go on for its
//! granules too.

use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// Read size when hashing back from the cache file.
const HASH_BUF: usize = 1 << 20;
/// Most bytes one [`Checksum::advance`] hashes (about 40 ms here): a
/// fill's worker goes back to the queue after this much, so one fill that
/// lands after many others does not hold a thread for the whole blob;
/// what is left is hashed after later fills, or at completion. As large as
/// the largest fill job, so each fill can hash as much as it brought.
const MAX_ADVANCE: u64 = 64 << 20;

thread_local! {
    /// One read buffer per worker thread, kept between calls (a fresh
    /// 1 MiB allocation would be a fresh mapping, faulted in each time).
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A sha256 in progress over a blob's leading bytes.
struct Progress {
    /// `None` once finished (until [`Checksum::reset`]).
    state: Option<Sha256>,
    /// Bytes hashed so far.
    at: u64,
}

impl Progress {
    /// A hash of nothing yet, from the first byte.
    fn new() -> Progress {
        Progress {
            state: Some(Sha256::new()),
            at: 0,
        }
    }
}

/// The running sha256 of one blob. See the module docs.
pub struct Checksum {
    progress: Mutex<Progress>,
    /// Set by a worker that found the hash busy: the holder goes on.
    pending: AtomicBool,
    /// Set once a fill learns the blob has a digest to be checked against;
    /// until then hashing as it fills would be work for nothing.
    wanted: AtomicBool,
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum {
            progress: Mutex::new(Progress::new()),
            pending: AtomicBool::new(false),
            wanted: AtomicBool::new(false),
        }
    }
}

fn lock(m: &Mutex<Progress>) -> MutexGuard<'_, Progress> {
    // Hashing does not panic with the lock held short of a bug; the state
    // is then only behind, never wrong, since `at` moves after `update`.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Checksum {
    /// Notes that the blob has a digest to be checked against.
    pub fn want(&self) {
        self.wanted.store(true, Ordering::Relaxed);
    }

    /// Whether [`Checksum::want`] was called.
    pub fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }

    /// Hashes on through the leading granules `ready` says are written, in
    /// `data` of a `size`-byte blob of `granule`-byte granules, at most
    /// `MAX_ADVANCE` bytes. Never waits: if another thread is hashing, it
    /// goes on for these granules (within its own bound).
    pub fn advance(
        &self,
        data: &File,
        size: u64,
        granule: u64,
        ready: impl Fn(u64) -> bool,
    ) -> io::Result<()> {
        let mut budget = MAX_ADVANCE;
        loop {
            self.pending.store(true, Ordering::SeqCst);
            let mut p = match self.progress.try_lock() {
                Ok(p) => p,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                // The holder sees `pending` when it is done, and goes on.
                Err(TryLockError::WouldBlock) => return Ok(()),
            };
            self.pending.store(false, Ordering::SeqCst);
            let from = p.at;
            let mut to = from;
            while to < size && to - from < budget && to % granule == 0 && ready(to / granule) {
                to = (to + granule).min(size);
            }
            hash_to(&mut p, data, to)?;
            drop(p);
            budget = budget.saturating_sub(to - from);
            if budget == 0 || !self.pending.load(Ordering::SeqCst) {
                return Ok(());
            }
        }
    }

    /// Hashes the rest of the first `size` bytes of `data` (all written by
    /// now) and returns the digest; waits for a thread that is hashing. If
    /// it was finished already, it hashes the whole file again: a digest is
    /// never assumed.
    pub fn finish(&self, data: &File, size: u64) -> io::Result<[u8; 32]> {
        let mut p = lock(&self.progress);
        if p.state.is_none() {
            *p = Progress::new();
        }
        hash_to(&mut p, data, size)?;
        let state = p.state.take().unwrap_or_default();
        Ok(state.finalize().into())
    }

    /// Starts over if anything below `offset` was hashed: bytes there are
    /// being written again (a server that sent the whole blob, a late
    /// fill), so what was hashed may not be what the file holds.
    pub fn rewritten_from(&self, offset: u64) {
        let mut p = lock(&self.progress);
        if offset < p.at {
            *p = Progress::new();
        }
    }

    /// Starts over from the first byte (the blob's bytes were discarded).
    pub fn reset(&self) {
        *lock(&self.progress) = Progress::new();
    }

    /// Bytes hashed so far.
    pub fn hashed(&self) -> u64 {
        lock(&self.progress).at
    }
}

/// Hashes `data` from `p.at` up to `to`.
fn hash_to(p: &mut Progress, data: &File, to: u64) -> io::Result<()> {
    let Some(state) = p.state.as_mut() else {
        return Ok(());
    };
    BUF.with_borrow_mut(|buf| {
        buf.resize(HASH_BUF, 0);
        while p.at < to {
            let want = ((to - p.at) as usize).min(buf.len());
            match data.read_at(&mut buf[..want], p.at) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the cache file ends at {} of {to} bytes", p.at),
                    ))
                }
                Ok(n) => {
                    state.update(&buf[..n]);
                    p.at += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    fn file_of(data: &[u8]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(data, 0).unwrap();
        f
    }

    #[test]
    fn in_order_granules_are_hashed_as_they_become_ready() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
        let f = file_of(&data);
        let c = Checksum::default();
        let size = data.len() as u64;
        // Granules 0 and 1 of 4096 ready, 2 not: 8192 bytes hashed.
        c.advance(&f, size, 4096, |g| g < 2).unwrap();
        assert_eq!(c.hashed(), 8192);
        // A gap stops it: granule 2 is not ready, 3 would be.
        c.advance(&f, size, 4096, |g| g != 2).unwrap();
        assert_eq!(c.hashed(), 8192);
        c.advance(&f, size, 4096, |_| true).unwrap();
        assert_eq!(c.hashed(), size, "the short last granule ends the blob");
        assert_eq!(c.finish(&f, size).unwrap(), sha(&data));
        c.advance(&f, size, 4096, |_| true).unwrap();
        assert_eq!(c.hashed(), size, "nothing to advance once finished");
        assert_eq!(
            c.finish(&f, size).unwrap(),
            sha(&data),
            "again: a full pass"
        );
        c.reset();
        assert_eq!(c.finish(&f, size).unwrap(), sha(&data), "a full pass");
    }

    #[test]
    fn out_of_order_fills_are_hashed_at_the_end_and_a_short_file_fails() {
        let data = vec![7u8; 3 * 4096];
        let f = file_of(&data);
        let c = Checksum::default();
        c.advance(&f, 3 * 4096, 4096, |g| g == 2).unwrap();
        assert_eq!(c.hashed(), 0);
        assert_eq!(c.finish(&f, 3 * 4096).unwrap(), sha(&data));
        let c = Checksum::default();
        let e = c.finish(&f, 4 * 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn bytes_written_again_below_the_hashed_front_start_the_hash_over() {
        let mut data = vec![1u8; 4 * 4096];
        let f = file_of(&data);
        let c = Checksum::default();
        c.advance(&f, 4 * 4096, 4096, |g| g < 2).unwrap();
        assert_eq!(c.hashed(), 8192);
        c.rewritten_from(8192);
        assert_eq!(c.hashed(), 8192, "at the front: nothing hashed is touched");
        // Granule 0 is written again with other bytes: the hash starts over
        // and the digest is of what the file holds now.
        data[10] = 9;
        f.write_all_at(&data[..4096], 0).unwrap();
        c.rewritten_from(0);
        assert_eq!(c.hashed(), 0);
        assert_eq!(c.finish(&f, 4 * 4096).unwrap(), sha(&data));
    }

    #[test]
    fn one_advance_hashes_a_bounded_amount() {
        let size = MAX_ADVANCE + 3 * 4096;
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        let c = Checksum::default();
        c.advance(&f, size, 4096, |_| true).unwrap();
        assert_eq!(c.hashed(), MAX_ADVANCE);
        c.advance(&f, size, 4096, |_| true).unwrap();
        assert_eq!(c.hashed(), size);
    }

    #[test]
    fn threads_advancing_at_once_hash_every_byte_once() {
        let data: Vec<u8> = (0..64 * 4096u32).map(|i| (i % 251) as u8).collect();
        let f = Arc::new(file_of(&data));
        let c = Arc::new(Checksum::default());
        let ready: Arc<Vec<AtomicBool>> =
            Arc::new((0..64).map(|_| AtomicBool::new(false)).collect());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (f, c, ready) = (f.clone(), c.clone(), ready.clone());
                std::thread::spawn(move || {
                    for g in (t..64).step_by(4) {
                        ready[g].store(true, Ordering::SeqCst);
                        c.advance(&f, 64 * 4096, 4096, |g| {
                            ready[g as usize].load(Ordering::SeqCst)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Whoever marked the last granule either hashed it or left a note
        // the holder acted on: nothing is left behind.
        assert_eq!(c.hashed(), 64 * 4096);
        assert_eq!(c.finish(&f, 64 * 4096).unwrap(), sha(&data));
    }
}
