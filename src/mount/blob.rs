//! One blob as the mount serves it: its [`RemoteBlob`], which granules are
//! known to be valid in which fd, and how its files are open.
//!
//! A read rounds its range out to whole granules, asks the daemon to make
//! them valid (FetchRange) unless this blob already knows they are, then
//! `pread`s the bytes from the cache file's fd. What is known valid is
//! tied to one fd: after the daemon restarts, the client re-opens the blob
//! and hands over a new fd, and what was learnt about the old one is not
//! carried over (the old fd stays good for the bytes it had, but the new
//! one is where new fills land). Once every granule is known valid the
//! blob is *complete*: reads need no daemon at all, and an open may be
//! passed through to the kernel (see `fs.rs`).

use crate::client::{Client, ClientError, RemoteBlob};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

thread_local! {
    /// The read buffer of each thread serving the mount.
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many times one read retries a fetch whose blob was re-opened (a new
/// fd) while it ran.
const MAX_SWAPS: u32 = 3;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The granules known valid in one fd of the blob.
struct Valid {
    file: Arc<File>,
    base: u64,
    bits: Vec<u64>,
    /// Number of bits set.
    ready: u64,
}

impl Valid {
    fn new(file: Arc<File>, base: u64, granules: u64) -> Valid {
        Valid {
            file,
            base,
            bits: vec![0; granules.div_ceil(64) as usize],
            ready: 0,
        }
    }

    fn has(&self, g: u64) -> bool {
        self.bits[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    fn set(&mut self, g: u64) {
        let word = &mut self.bits[(g / 64) as usize];
        if *word & (1 << (g % 64)) == 0 {
            *word |= 1 << (g % 64);
            self.ready += 1;
        }
    }
}

/// How the files of this blob are open through the mount. The kernel
/// refuses to mix cached and passthrough opens of one inode, and wants one
/// backing file for all passthrough opens of it.
#[derive(Default)]
pub struct Opens {
    /// Opens served by this process (through the page cache).
    pub cached: u32,
    /// Opens passed through to the cache file.
    pub passthrough: u32,
    /// The backing file registered for the passthrough opens.
    pub backing: Option<Arc<fuser::BackingId>>,
}

/// A blob opened through the mount (one per inode).
pub struct BlobFile {
    blob: RemoteBlob,
    size: u64,
    granule: u64,
    valid: Mutex<Valid>,
    /// Open files of this inode (see [`Opens`]).
    pub opens: Mutex<Opens>,
}

impl BlobFile {
    /// Wraps a freshly opened blob; `granule` is the unit of fetching.
    pub fn new(blob: RemoteBlob, granule: u64) -> BlobFile {
        let size = blob.size();
        let valid = Valid::new(blob.file(), blob.base(), size.div_ceil(granule));
        BlobFile {
            blob,
            size,
            granule,
            valid: Mutex::new(valid),
            opens: Mutex::new(Opens::default()),
        }
    }

    /// The blob id it was opened with.
    pub fn id(&self) -> &str {
        self.blob.id()
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn granules(&self) -> u64 {
        self.size.div_ceil(self.granule)
    }

    /// Reads up to `len` bytes at `offset` (fewer only at the blob's end)
    /// and hands them to `reply`. The bytes are read into a buffer kept per
    /// thread: a fresh 128 KiB allocation per read would be an mmap and
    /// munmap each time, which cost more than the read itself.
    pub fn read_with<R>(
        &self,
        client: &Client,
        offset: u64,
        len: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> io::Result<R> {
        if offset >= self.size || len == 0 {
            return Ok(reply(&[]));
        }
        let end = offset.saturating_add(len as u64).min(self.size);
        let (g0, g1) = (offset / self.granule, (end - 1) / self.granule);
        let (file, base) = match self.known(g0, g1) {
            Some(known) => known,
            None => self.fetch(client, g0, g1)?,
        };
        let n = (end - offset) as usize;
        BUF.with_borrow_mut(|buf| {
            if buf.len() < n {
                buf.resize(n, 0);
            }
            file.read_exact_at(&mut buf[..n], base + offset)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("pread of blob {:?} at {offset}: {e}", self.id()),
                    )
                })
                .map(|()| reply(&buf[..n]))
        })
    }

    /// The fd and base in which granules `g0..=g1` are all known valid.
    fn known(&self, g0: u64, g1: u64) -> Option<(Arc<File>, u64)> {
        let v = lock(&self.valid);
        (g0..=g1)
            .all(|g| v.has(g))
            .then(|| (v.file.clone(), v.base))
    }

    /// Forgets every granule known valid: after a failed FetchRange the
    /// daemon may have discarded the blob's bytes (a failed sha256 check).
    fn forget(&self) {
        let mut v = lock(&self.valid);
        *v = Valid::new(v.file.clone(), v.base, self.granules());
    }

    /// Makes granules `g0..=g1` valid (one FetchRange) and returns the fd
    /// and base they are valid in.
    fn fetch(&self, client: &Client, g0: u64, g1: u64) -> io::Result<(Arc<File>, u64)> {
        let start = g0 * self.granule;
        let stop = ((g1 + 1) * self.granule).min(self.size);
        for _ in 0..MAX_SWAPS {
            let before = (self.blob.file(), self.blob.base());
            let count = client
                .fetch_range(&self.blob, start, stop - start)
                .inspect_err(|_| self.forget())?;
            let after = (self.blob.file(), self.blob.base());
            // A re-open swaps the fd and never swaps it back: the same fd
            // before and after means the FetchRange was answered for it.
            if !Arc::ptr_eq(&before.0, &after.0) || before.1 != after.1 {
                continue;
            }
            if count < stop - start {
                self.forget();
                return Err(ClientError::Protocol(format!(
                    "FetchRange {start}+{} of blob {:?} made only {count} bytes valid",
                    stop - start,
                    self.id()
                ))
                .into());
            }
            self.mark(&after.0, after.1, g0, g1);
            return Ok(after);
        }
        Err(io::Error::other(format!(
            "blob {:?} was re-opened during each of {MAX_SWAPS} fetches",
            self.id()
        )))
    }

    /// Records granules `g0..=g1` as valid in `file` (at `base`), unless a
    /// newer fd has replaced it meanwhile.
    fn mark(&self, file: &Arc<File>, base: u64, g0: u64, g1: u64) {
        if !Arc::ptr_eq(file, &self.blob.file()) {
            return;
        }
        let mut v = lock(&self.valid);
        if !Arc::ptr_eq(file, &v.file) || v.base != base {
            *v = Valid::new(file.clone(), base, self.granules());
        }
        for g in g0..=g1 {
            v.set(g);
        }
    }

    /// Whether every granule is known valid in the current fd.
    pub fn is_complete(&self) -> bool {
        let v = lock(&self.valid);
        v.ready == self.granules() && Arc::ptr_eq(&v.file, &self.blob.file())
    }

    /// The fd of a complete blob whose bytes start at offset 0 of its file,
    /// so that the kernel may read it directly (passthrough). A blob not
    /// yet known complete is probed: if its cache file has no hole (someone
    /// fetched it all, e.g. `blobmgr fetch`), one FetchRange of the whole
    /// blob confirms it — answered at once from the daemon's readiness map
    /// when it is complete, and costing only the few missing granules
    /// otherwise. A file with holes is never probed: that would fetch it.
    pub fn complete_file(&self, client: &Client) -> Option<Arc<File>> {
        if !self.is_complete() {
            if self.size == 0 || !self.has_no_hole() {
                return None;
            }
            if let Err(e) = self.fetch(client, 0, self.granules() - 1) {
                log::debug!("mount: probing blob {:?} for passthrough: {e}", self.id());
                return None;
            }
        }
        let v = lock(&self.valid);
        (v.ready == self.granules() && v.base == 0).then(|| v.file.clone())
    }

    /// Whether the cache file holds data (no hole) over the whole blob.
    fn has_no_hole(&self) -> bool {
        use nix::unistd::{lseek, Whence};
        let file = self.blob.file();
        let base = self.blob.base();
        match lseek(&*file, base as i64, Whence::SeekHole) {
            Ok(hole) => hole as u64 >= base + self.size,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_bits_count_each_granule_once() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        let mut v = Valid::new(f, 0, 130);
        assert_eq!(v.bits.len(), 3);
        for g in [0, 63, 64, 129, 64] {
            v.set(g);
        }
        assert_eq!(v.ready, 4);
        assert!(v.has(129) && v.has(63) && !v.has(1));
    }
}
