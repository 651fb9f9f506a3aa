//! The integrity check of a complete blob: its bytes against the sha256
//! its backend names (a registry digest), computed while it fills
//! (`cache/checksum.rs`) and finished when the last granule lands. A blob
//! that fails is discarded whole, so it is fetched again; see
//! docs/CACHE.md, "Order of writes".

use super::Blob;
use crate::backend::{Backend, BackendError};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::TryLockError;

impl Blob {
    /// A previous run left the blob complete but not checked (it stopped
    /// between the last fill and the check's record): checks it now, on the
    /// opening worker. A mismatch discards it, so it is fetched again.
    pub(super) fn check_if_complete(&self, backend: &dyn Backend, backend_id: &str) {
        if self.is_verified() || self.granules() == 0 || self.ready_count() < self.granules() {
            return;
        }
        let expected = backend.expected_sha256(backend_id);
        if expected.is_some() && self.verify(backend, backend_id, expected).is_ok() {
            log::info!(
                "blob {}: complete from a previous run; digest checked",
                self.id
            );
        }
    }

    /// Hashes on through the granules ready from the front, a bounded
    /// amount, if the blob has a digest to be checked against and is not
    /// checked yet (a failure is only logged: the check at completion hashes
    /// what is left, and fails there if the file cannot be read).
    pub fn hash_ready_prefix(&self) {
        if !self.checksum.wanted() || self.is_verified() {
            return;
        }
        let ready = |g| self.is_ready(g);
        if let Err(e) = self
            .checksum
            .advance(&self.data, self.size, self.granule, ready)
        {
            log::warn!("blob {}: hashing the cache file: {e}", self.id);
        }
    }

    /// Checks the complete blob against the sha256 its backend expects,
    /// once; a mismatch throws the cache away.
    pub(super) fn verify(
        &self,
        backend: &dyn Backend,
        backend_id: &str,
        expected: Option<[u8; 32]>,
    ) -> Result<(), BackendError> {
        let Some(expected) = expected else {
            return Ok(());
        };
        let _one = match self.checking.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Another fill is checking the blob this one completed:
                // its verdict is this fill's too, and the blob is not
                // reported complete before it is known.
                let _done = self.checking.lock().unwrap_or_else(|p| p.into_inner());
                if self.is_verified() {
                    return Ok(());
                }
                return Err(BackendError::Integrity(format!(
                    "{}: the blob failed its check in another fill",
                    self.id
                )));
            }
        };
        if self.is_verified() {
            return Ok(());
        }
        let got = match self.checksum.finish(&self.data, self.size) {
            Ok(got) => got,
            Err(e) => {
                log::error!(
                    "blob {}: hashing the cache file: {e}; discarding its cache",
                    self.id
                );
                self.discard();
                return Err(BackendError::Io(
                    format!("hash the cache file of {}", self.id),
                    e,
                ));
            }
        };
        if got != expected {
            let e = BackendError::Integrity(format!(
                "{}: the {} bytes received hash to sha256:{}",
                self.id,
                self.size,
                hex::encode(got)
            ));
            log::error!("blob {}: {e}; discarding its cache", self.id);
            self.discard();
            backend.integrity_failed(backend_id);
            return Err(e);
        }
        self.verified.store(true, Ordering::Release);
        Ok(())
    }

    /// A fill that returns to a blob already checked wrote over checked
    /// bytes: it ran past its timeout and its range was filled again
    /// meanwhile, or a whole body from another endpoint covered its range
    /// while it ran. The check is made again from the first byte, so a blob
    /// never stays VERIFIED over bytes written after its check (a mismatch
    /// discards it, and it is fetched again). Readers may have read those
    /// bytes in between: nothing can stop a write already under way.
    pub(super) fn recheck_after_late_write(
        &self,
        backend: &dyn Backend,
        backend_id: &str,
        expected: Option<[u8; 32]>,
    ) -> Result<(), BackendError> {
        if expected.is_none() || !self.is_verified() {
            return Ok(());
        }
        log::warn!(
            "blob {}: a late fill wrote into the checked blob; checking it again",
            self.id
        );
        self.verified.store(false, Ordering::Release);
        self.checksum.rewritten_from(0);
        self.verify(backend, backend_id, expected)
    }

    /// Forgets every ready granule and the bytes behind them, in the order
    /// a crash at any point cannot turn into a trusted map over dropped
    /// bytes: the bits are cleared in memory, the cleared map is written
    /// and synced, and only then are the bytes punched out. All under the
    /// map lock, with the discard counted, so no fill marks granules whose
    /// bytes it wrote before the punch.
    pub(super) fn discard(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.discards.fetch_add(1, Ordering::AcqRel);
        for w in self.ready.iter() {
            w.store(0, Ordering::Release);
        }
        self.verified.store(false, Ordering::Release);
        let cleared = map
            .write_all_at(&self.encode_map(false), 0)
            .and_then(|_| map.sync_data());
        if let Err(e) = cleared {
            log::warn!("blob {}: writing its cleared readiness map: {e}", self.id);
            // An empty map file means nothing is ready.
            if let Err(e) = map.set_len(0).and_then(|_| map.sync_data()) {
                // The map on disk may still vouch for these bytes: keep them
                // (a crash then leaves the blob as it was, not zeroed under a
                // trusted map); the refill writes over them.
                log::error!("blob {}: cannot clear its readiness map: {e}", self.id);
                self.checksum.reset();
                return;
            }
        }
        #[cfg(test)]
        tests::before_bytes_go(self);
        // Drop the bad bytes before the hash starts over, so it never covers
        // them; a failure here is harmless since nothing is marked ready.
        if let Err(e) = self.punch_out() {
            log::warn!("blob {}: dropping its bytes: {e}", self.id);
        }
        self.checksum.reset();
        drop(map);
    }

    /// Frees every byte of the data file while keeping its length, so a
    /// reader that mmaps it never sees it shrink (a punched range reads as
    /// zeros); where punching is unsupported, truncates to 0 and back.
    fn punch_out(&self) -> std::io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let len = i64::try_from(self.size).unwrap_or(i64::MAX);
        if len == 0 {
            return Ok(());
        }
        match fallocate(&self.data, flags, 0, len) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::ENOSYS) => self
                .data
                .set_len(0)
                .and_then(|_| self.data.set_len(self.size)),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the complete blob passed the backend's integrity check.
    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::setup;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    /// A local backend that also names the sha256 its blobs must hash to.
    struct Digested(crate::backend::LocalFs, [u8; 32]);

    impl Backend for Digested {
        fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
            self.0.blob_size(id)
        }
        fn read_into(&self, id: &str, off: u64, len: u64, dst: &File) -> Result<(), BackendError> {
            self.0.read_into(id, off, len, dst)
        }
        fn expected_sha256(&self, _id: &str) -> Option<[u8; 32]> {
            Some(self.1)
        }
        fn describe(&self) -> String {
            "digested".into()
        }
    }

    /// A hook on a blob, for tests.
    type Hook = Box<dyn FnMut(&Blob)>;

    thread_local! {
        /// Run by `discard` on this thread at the moment the bytes go.
        static BEFORE_BYTES_GO: std::cell::RefCell<Option<Hook>> =
            std::cell::RefCell::new(None);
    }

    /// The test hook of `discard`: calls the hook set on this thread.
    pub(super) fn before_bytes_go(b: &Blob) {
        BEFORE_BYTES_GO.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f(b)
            }
        });
    }

    /// Review finding: `discard` dropped the bytes first and persisted the
    /// cleared map after, so a kill -9 between the two left a map of this
    /// boot (trusted) vouching for zeroed bytes. Now, when the bytes go,
    /// the map on disk already shows nothing ready; and they go by punching
    /// holes, so the file's length never drops under a reader's mmap.
    #[test]
    fn a_discarded_blob_has_its_map_cleared_on_disk_before_its_bytes_go() {
        let (_d, cfg, be, data) = setup(4 * 4096, 4096);
        let wrong = digested(be, b"other");
        let b = Blob::open(&cfg, &wrong, "b").unwrap();
        assert!(!b.fill(&wrong, 0, 3).unwrap());
        let map_path = cfg.map_dir().join("b");
        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        let (seen2, path2) = (seen.clone(), map_path.clone());
        let boot = crate::cache::map::current_boot_id();
        BEFORE_BYTES_GO.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |b: &Blob| {
                let stored = crate::cache::map::load(&path2, 4096, &boot).unwrap();
                let on_disk: u32 =
                    stored.map_or(0, |m| m.bits.iter().map(|w| w.count_ones()).sum());
                let mut first = [0u8; 16];
                b.data.read_exact_at(&mut first, 0).unwrap();
                seen2.set(Some((on_disk, first)));
            }))
        });
        let e = b.fill(&wrong, 3, 1).unwrap_err();
        BEFORE_BYTES_GO.with(|h| *h.borrow_mut() = None);
        assert!(matches!(e, BackendError::Integrity(_)), "{e}");
        let (on_disk, first) = seen.get().expect("the bytes went");
        assert_eq!(on_disk, 0, "the map on disk still marked granules ready");
        assert_eq!(first[..], data[..16], "the bytes were still there");
        // Gone now, and the file kept its length.
        let mut now = [0u8; 16];
        b.data.read_exact_at(&mut now, 0).unwrap();
        assert_eq!(now, [0u8; 16]);
        assert_eq!(b.data.metadata().unwrap().len(), 4 * 4096);
        assert_eq!(b.ready_count(), 0);
    }

    /// Serves garbage for every range: what a fill abandoned at its timeout
    /// might write when it finally returns from a bad endpoint.
    struct Garbage([u8; 32]);

    impl Backend for Garbage {
        fn blob_size(&self, _id: &str) -> Result<u64, BackendError> {
            Ok(4 * 4096)
        }
        fn read_into(&self, _: &str, off: u64, len: u64, dst: &File) -> Result<(), BackendError> {
            dst.write_all_at(&vec![0xee; len as usize], off)
                .map_err(|e| BackendError::Io("write".into(), e))
        }
        fn expected_sha256(&self, _id: &str) -> Option<[u8; 32]> {
            Some(self.0)
        }
        fn describe(&self) -> String {
            "garbage".into()
        }
    }

    /// Review finding: a fill that returned after its blob was checked (a
    /// late, abandoned fill whose range was filled again) left the blob
    /// VERIFIED over the bytes it wrote, never hashed again. Now the check
    /// is made again and the blob discarded.
    #[test]
    fn a_fill_that_writes_into_a_checked_blob_has_it_checked_again() {
        let (_d, cfg, be, data) = setup(4 * 4096, 4096);
        let good = digested(be, &data);
        let sum = good.1;
        let b = Blob::open(&cfg, &good, "b").unwrap();
        assert!(b.fill(&good, 0, 4).unwrap());
        assert!(b.is_verified());
        let e = b.fill_from(&Garbage(sum), "b", 1, 1).unwrap_err();
        assert!(matches!(e, BackendError::Integrity(_)), "{e}");
        assert!(!b.is_verified());
        assert_eq!(b.ready_count(), 0, "discarded, to be fetched again");
        // A late write that rewrites the same bytes leaves it checked.
        assert!(b.fill(&good, 0, 4).unwrap());
        assert!(b.fill_from(&good, "b", 2, 1).unwrap());
        assert!(b.is_verified() && b.ready_count() == 4);
    }

    /// Writes like its inner backend, then holds the fill until told to go
    /// (after reporting that the bytes are written).
    struct Gated {
        inner: Digested,
        written: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
        go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Backend for Gated {
        fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
            self.inner.blob_size(id)
        }
        fn read_into(&self, id: &str, off: u64, len: u64, dst: &File) -> Result<(), BackendError> {
            self.inner.read_into(id, off, len, dst)?;
            let _ = self.written.lock().unwrap().send(());
            let _ = self.go.lock().unwrap().recv();
            Ok(())
        }
        fn expected_sha256(&self, id: &str) -> Option<[u8; 32]> {
            self.inner.expected_sha256(id)
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    /// Found while fixing `discard`: a fill that wrote its bytes before a
    /// discard punched them out, and marked its granules after, left them
    /// ready over zeros. Such a fill now marks nothing.
    #[test]
    fn a_fill_that_ran_across_a_discard_marks_nothing() {
        let (d, cfg, be, _) = setup(4 * 4096, 4096);
        let wrong = digested(be, b"other");
        let b = Arc::new(Blob::open(&cfg, &wrong, "b").unwrap());
        assert!(!b.fill(&wrong, 0, 3).unwrap());
        // A stale refill of granule 1 (abandoned, refilled, now returning)
        // writes its bytes and is held before it marks them.
        let (written_tx, written) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let gated = Gated {
            inner: digested(crate::backend::LocalFs::new(d.path().join("be")), b"other"),
            written: std::sync::Mutex::new(written_tx),
            go: std::sync::Mutex::new(go_rx),
        };
        let b2 = b.clone();
        let stale = std::thread::spawn(move || b2.fill_from(&gated, "b", 1, 1));
        written
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        // The last granule completes the blob, which fails its check.
        let e = b.fill(&wrong, 3, 1).unwrap_err();
        assert!(matches!(e, BackendError::Integrity(_)), "{e}");
        go.send(()).unwrap();
        let r = stale.join().unwrap();
        assert!(r.is_err(), "the stale fill reported {r:?}");
        assert!(!b.is_ready(1), "granule 1 marked ready over punched bytes");
        assert_eq!(b.ready_count(), 0);
    }

    fn digested(be: crate::backend::LocalFs, data: &[u8]) -> Digested {
        use sha2::Digest;
        Digested(be, sha2::Sha256::digest(data).into())
    }

    #[test]
    fn in_order_fills_are_hashed_as_they_land_and_checked_at_the_end() {
        let (_d, cfg, be, data) = setup(8 * 4096 + 10, 4096);
        let be = digested(be, &data);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        for g in 0..8 {
            assert!(!b.fill(&be, g, 1).unwrap());
            assert_eq!(b.checksum.hashed(), (g + 1) * 4096, "hashed as filled");
        }
        assert!(b.fill(&be, 8, 1).unwrap());
        assert!(b.is_verified());
    }

    #[test]
    fn a_fill_leaves_hashing_to_its_after_step_and_only_for_digested_blobs() {
        let (_d, cfg, be, data) = setup(4 * 4096, 4096);
        let digest = digested(be, &data);
        let b = Blob::open(&cfg, &digest, "b").unwrap();
        assert!(!b.fill_from(&digest, "b", 0, 1).unwrap());
        assert_eq!(b.checksum.hashed(), 0, "the fill itself hashes nothing");
        b.hash_ready_prefix();
        assert_eq!(b.checksum.hashed(), 4096, "its after-step does");
        // Without a digest to check against, nothing is hashed.
        let plain = &digest.0;
        crate::cache::remove_blob_files(&cfg, "b").unwrap();
        let b = Blob::open(&cfg, plain, "b").unwrap();
        assert!(!b.fill(plain, 0, 2).unwrap());
        assert_eq!(b.checksum.hashed(), 0);
    }

    #[test]
    fn out_of_order_fills_are_checked_and_a_bad_byte_discards_the_blob() {
        let (d, cfg, be, data) = setup(6 * 4096, 4096);
        let be = digested(be, &data);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        for g in [5, 3, 1, 4, 2] {
            assert!(!b.fill(&be, g, 1).unwrap());
        }
        assert_eq!(b.checksum.hashed(), 0, "nothing from the front yet");
        assert!(b.fill(&be, 0, 1).unwrap());
        assert!(b.is_verified());
        // The same blob with one byte changed at the backend.
        let mut bad = data.clone();
        bad[3 * 4096 + 7] ^= 1;
        std::fs::write(d.path().join("be/b"), &bad).unwrap();
        crate::cache::remove_blob_files(&cfg, "b").unwrap();
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert!(!b.fill(&be, 0, 4).unwrap());
        assert!(b.checksum.hashed() > 0);
        let e = b.fill(&be, 4, 2).unwrap_err();
        assert!(matches!(e, BackendError::Integrity(_)), "{e}");
        assert_eq!(b.ready_count(), 0, "every granule discarded");
        assert!(!b.is_verified());
        // Right bytes again: the refill passes, hashed from the start.
        std::fs::write(d.path().join("be/b"), &data).unwrap();
        assert!(b.fill(&be, 0, 6).unwrap());
        assert!(b.is_verified());
    }

    /// Sends the whole blob for any range (a server that ignores Range),
    /// with granule 0 tampered with; with `.2`, the connection then breaks
    /// before the end.
    struct WholeTampered(Vec<u8>, [u8; 32], bool);

    impl Backend for WholeTampered {
        fn blob_size(&self, _id: &str) -> Result<u64, BackendError> {
            Ok(self.0.len() as u64)
        }
        fn read_into(&self, _: &str, _: u64, _: u64, _: &File) -> Result<(), BackendError> {
            unreachable!("read_into_extent is used")
        }
        fn read_into_extent(
            &self,
            _id: &str,
            _offset: u64,
            _len: u64,
            dst: &File,
        ) -> Result<(u64, u64), BackendError> {
            let mut bad = self.0.clone();
            bad[100] ^= 0xff;
            if self.2 {
                dst.write_all_at(&bad[..4096], 0).unwrap();
                let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
                return Err(BackendError::Io("body".into(), reset));
            }
            dst.write_all_at(&bad, 0).unwrap();
            Ok((0, bad.len() as u64))
        }
        fn expected_sha256(&self, _id: &str) -> Option<[u8; 32]> {
            Some(self.1)
        }
        fn describe(&self) -> String {
            "whole-tampered".into()
        }
    }

    /// A blob of four 4 KiB granules under its right digest, the first two
    /// filled honestly and hashed.
    fn two_of_four_hashed() -> (tempfile::TempDir, Blob, Digested, Vec<u8>) {
        let (d, cfg, be, data) = setup(4 * 4096, 4096);
        let honest = digested(be, &data);
        let b = Blob::open(&cfg, &honest, "b").unwrap();
        assert!(!b.fill(&honest, 0, 2).unwrap());
        assert_eq!(b.checksum.hashed(), 8192);
        (d, b, honest, data)
    }

    #[test]
    fn hashed_bytes_written_again_are_hashed_again() {
        // Granules 0 and 1 arrive honestly and are hashed; then a whole
        // body rewrites granule 0 with other bytes: the check must see it.
        let (_d, b, honest, data) = two_of_four_hashed();
        let whole = WholeTampered(data.clone(), honest.1, false);
        let e = b.fill(&whole, 2, 1).unwrap_err();
        assert!(matches!(e, BackendError::Integrity(_)), "{e}");
        assert_eq!(b.ready_count(), 0);
    }

    #[test]
    fn hashed_bytes_written_again_by_a_failed_fill_are_hashed_again() {
        // As above, but the whole body breaks off after rewriting granule
        // 0: the fill fails, and the honest fills that complete the blob
        // must not pass the check on the hash of the old bytes.
        let (_d, b, honest, data) = two_of_four_hashed();
        let broken = WholeTampered(data.clone(), honest.1, true);
        assert!(matches!(b.fill(&broken, 2, 1), Err(BackendError::Io(..))));
        let e = b.fill(&honest, 2, 2).unwrap_err();
        assert!(matches!(e, BackendError::Integrity(_)), "{e}");
        assert!(!b.is_verified());
        assert_eq!(b.ready_count(), 0);
    }

    #[test]
    fn two_last_fills_at_once_never_report_a_blob_that_fails_its_check() {
        // The last two granules filled at once, the digest wrong: whichever
        // fill checks the blob, neither may report it complete.
        // Granule 0 comes last, so the check hashes all 8 MiB: a window
        // wide enough for the two fills to meet in it.
        for _ in 0..10 {
            let (_d, cfg, be, _) = setup(2048 * 4096, 4096);
            let wrong = Arc::new(digested(be, b"other"));
            let b = Arc::new(Blob::open(&cfg, &*wrong, "b").unwrap());
            assert!(!b.fill(&*wrong, 1, 2046).unwrap());
            let go = Arc::new(std::sync::Barrier::new(2));
            let fills: Vec<_> = [0, 2047]
                .into_iter()
                .map(|g| {
                    let (b, wrong, go) = (b.clone(), wrong.clone(), go.clone());
                    std::thread::spawn(move || {
                        go.wait();
                        b.fill(&*wrong, g, 1)
                    })
                })
                .collect();
            for f in fills {
                let r = f.join().unwrap();
                assert!(!matches!(r, Ok(true)), "reported complete: {r:?}");
            }
            // Discarded (a fill that lost the race may mark its granule
            // after that: then the blob is refilled, not complete).
            assert!(!b.is_verified());
            assert!(b.ready_count() < 2048);
        }
    }

    #[test]
    fn a_complete_blob_left_unchecked_is_checked_when_opened() {
        let (d, cfg, be, data) = setup(3 * 4096, 4096);
        // Filled by a backend that checks nothing: complete, not verified.
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert!(b.fill(&be, 0, 3).unwrap());
        assert!(!b.is_verified());
        drop(b);
        // Opened for a backend that names a digest the bytes match.
        let good = digested(crate::backend::LocalFs::new(d.path().join("be")), &data);
        let b = Blob::open(&cfg, &good, "b").unwrap();
        assert!(b.is_verified() && b.ready_count() == 3);
        drop(b);
        // A digest they do not match: discarded at open.
        std::fs::remove_file(cfg.map_dir().join("b")).unwrap();
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert!(b.fill(&be, 0, 3).unwrap());
        drop(b);
        let bad = digested(crate::backend::LocalFs::new(d.path().join("be")), b"other");
        let b = Blob::open(&cfg, &bad, "b").unwrap();
        assert_eq!(b.ready_count(), 0);
    }
}
