//! One cached blob: a sparse data file of the blob's size and its readiness
//! bits, one per granule, mirrored in a map file. Shared by the reactor side
//! (which only reads the bits) and the workers (which fill and persist).
//!
//! A granule's bit is set only after its bytes were written to the data
//! file; see docs/CACHE.md for the crash reasoning.

use super::checksum::Checksum;
use super::map::{self, MapHeader, StoredMap};
use super::{CacheConfig, OpenError};
use crate::backend::{Backend, BackendError};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Instant;

/// One cached blob: its files and readiness bits.
pub struct Blob {
    id: String,
    size: u64,
    granule: u64,
    data: File,
    ro: Arc<OwnedFd>,
    ready: Box<[AtomicU64]>,
    map: Mutex<File>,
    boot_id: [u8; 16],
    /// Whether the complete blob passed its backend's check.
    verified: AtomicBool,
    /// Held while the complete blob is checked: one check at a time.
    checking: Mutex<()>,
    /// Bytes per second of the last fill that succeeded (1 after one that
    /// timed out; 0 before any): long ranges get larger jobs only when the
    /// backend is known to deliver them well within its timeout.
    fill_rate: AtomicU64,
    /// The sha256 so far, for backends that know the digest.
    checksum: Checksum,
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({}, {} bytes)", self.id, self.size)
    }
}

/// Opens `path` with CLOEXEC; `write` also creates it (mode 0600).
fn open_file(path: &Path, write: bool, truncate: bool) -> Result<File, OpenError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create(write)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| OpenError::file("open", path, e))
}

impl Blob {
    /// Opens (or creates) the cache files of `id`, learning its size from the
    /// backend, or from a valid map when the backend no longer has it.
    /// Runs on a worker.
    pub fn open(cfg: &CacheConfig, backend: &dyn Backend, id: &str) -> Result<Blob, OpenError> {
        Blob::open_as(cfg, backend, id, id)
    }

    /// Opens the cache files named `key` of the blob the backend calls
    /// `backend_id` (a reference's key is its digest, so every reference to
    /// one digest shares the files).
    pub fn open_as(
        cfg: &CacheConfig,
        backend: &dyn Backend,
        backend_id: &str,
        key: &str,
    ) -> Result<Blob, OpenError> {
        let id = key;
        let map_path = cfg.map_dir().join(key);
        let data_path = cfg.data_dir().join(key);
        let boot_id = map::current_boot_id();
        let stored = match map::load(&map_path, cfg.granule, &boot_id) {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "readiness map {}: {e}; treating as empty",
                    map_path.display()
                );
                None
            }
        };
        let size = match (backend.blob_size(backend_id), &stored) {
            (Ok(s), _) => s,
            (Err(e), Some(m)) => {
                log::info!("blob {id}: backend unavailable ({e}); serving from the cache");
                m.size
            }
            (Err(BackendError::NotFound), None) => return Err(OpenError::NotFound),
            (Err(e), None) => return Err(OpenError::Backend(e)),
        };
        let data = open_file(&data_path, true, false)?;
        let len = data
            .metadata()
            .map_err(|e| OpenError::file("stat", &data_path, e))?
            .len();
        let words = map::words_for(size, cfg.granule);
        let ready: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let trusted = match stored {
            Some(StoredMap {
                size: s,
                bits,
                verified,
            }) if s == size && len == size => {
                for (w, v) in ready.iter().zip(bits) {
                    w.store(v, Ordering::Relaxed);
                }
                Some(verified)
            }
            other => {
                if let Some(m) = other {
                    log::warn!(
                        "blob {id}: cached map for {} bytes but blob has {size} (file {len}); discarding",
                        m.size
                    );
                }
                // Nothing is ready: drop whatever bytes a previous run left.
                data.set_len(0)
                    .and_then(|_| data.set_len(size))
                    .map_err(|e| OpenError::file("size", &data_path, e))?;
                None
            }
        };
        let ro = open_file(&data_path, false, false)?;
        let map = open_file(&map_path, true, trusted.is_none())?;
        let verified = trusted.unwrap_or(false);
        let blob = Blob {
            id: id.to_owned(),
            size,
            granule: cfg.granule,
            data,
            ro: Arc::new(OwnedFd::from(ro)),
            ready,
            map: Mutex::new(map),
            boot_id,
            verified: AtomicBool::new(verified),
            checking: Mutex::new(()),
            fill_rate: AtomicU64::new(0),
            checksum: Checksum::default(),
        };
        blob.check_if_complete(backend, backend_id);
        Ok(blob)
    }

    /// A previous run left the blob complete but not checked (it stopped
    /// between the last fill and the check's record): checks it now, on the
    /// opening worker. A mismatch discards it, so it is fetched again.
    fn check_if_complete(&self, backend: &dyn Backend, backend_id: &str) {
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

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The read-only descriptor handed to clients.
    pub fn client_fd(&self) -> &Arc<OwnedFd> {
        &self.ro
    }

    /// Number of granules.
    pub fn granules(&self) -> u64 {
        self.size.div_ceil(self.granule)
    }

    pub fn granule_size(&self) -> u64 {
        self.granule
    }

    pub fn is_ready(&self, g: u64) -> bool {
        let w = self.ready[(g / 64) as usize].load(Ordering::Acquire);
        w & (1 << (g % 64)) != 0
    }

    /// Whether granules `[g0, g1]` are all ready, a word at a time.
    pub fn all_ready(&self, g0: u64, g1: u64) -> bool {
        let (w0, w1) = ((g0 / 64) as usize, (g1 / 64) as usize);
        for w in w0..=w1 {
            let lo = if w == w0 { g0 % 64 } else { 0 };
            let hi = if w == w1 { g1 % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if self.ready[w].load(Ordering::Acquire) & mask != mask {
                return false;
            }
        }
        true
    }

    /// Number of ready granules.
    pub fn ready_count(&self) -> u64 {
        self.ready
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Bytes per second of the last fill that succeeded; 1 after a fill
    /// that timed out, 0 before any fill.
    pub fn fill_rate(&self) -> u64 {
        self.fill_rate.load(Ordering::Relaxed)
    }

    /// Bytes of blob data that are ready (the last granule may be short).
    pub fn ready_bytes(&self) -> u64 {
        let n = self.ready_count();
        if n == 0 {
            return 0;
        }
        let last = self.granules() - 1;
        let short = if self.is_ready(last) {
            self.granules() * self.granule - self.size
        } else {
            0
        };
        n * self.granule - short
    }

    fn mark_ready(&self, g0: u64, n: u64) {
        for g in g0..g0 + n {
            self.ready[(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::Release);
        }
    }

    /// Fills granules `[g0, g0 + n)` from the backend, then marks them ready
    /// and records that in the map file. Runs on a worker. Returns true when
    /// the blob is now complete (and checked): it is then due a
    /// [`Blob::checkpoint`], which the caller runs after answering.
    pub fn fill(&self, backend: &dyn Backend, g0: u64, n: u64) -> Result<bool, BackendError> {
        self.fill_from(backend, &self.id, g0, n)
    }

    /// [`Blob::fill`] from the blob the backend calls `backend_id`. When the
    /// backend wrote more than asked (a server that ignores ranges), every
    /// whole granule it wrote is marked ready too, so no byte is fetched
    /// twice.
    pub fn fill_from(
        &self,
        backend: &dyn Backend,
        backend_id: &str,
        g0: u64,
        n: u64,
    ) -> Result<bool, BackendError> {
        let start = g0 * self.granule;
        let end = ((g0 + n) * self.granule).min(self.size);
        let expected = backend.expected_sha256(backend_id);
        let t = Instant::now();
        let (w0, w1) = match backend.read_into_extent(backend_id, start, end - start, &self.data) {
            Ok(extent) => {
                let secs = t.elapsed().as_secs_f64().max(1e-6);
                let rate = ((end - start) as f64 / secs) as u64;
                self.fill_rate.store(rate.max(1), Ordering::Relaxed);
                extent
            }
            Err(e) => {
                if matches!(e, BackendError::Timeout(_)) {
                    self.fill_rate.store(1, Ordering::Relaxed);
                }
                // A failed fill may have written part of what it got, and
                // anywhere (a whole body starts at byte 0): the hash may
                // no longer be of what the file holds.
                if expected.is_some() {
                    self.checksum.rewritten_from(0);
                }
                return Err(e);
            }
        };
        // Whole granules inside what was written (the last one may end at
        // the blob's end); never less than the granules asked for.
        let first = w0.min(start).div_ceil(self.granule).min(g0);
        let last = if w1.max(end) >= self.size {
            self.granules()
        } else {
            w1.max(end) / self.granule
        };
        let newly = (first..last).filter(|&g| !self.is_ready(g)).count() as u64;
        if expected.is_some() {
            // Bytes the hash may already cover were written again.
            self.checksum.rewritten_from(w0.min(start));
        }
        // The fill that completes the blob checks it before its own granules
        // are reported ready, so a blob never shows complete and unchecked.
        if self.ready_count() + newly == self.granules() {
            self.verify(backend, backend_id, expected)?;
        }
        self.mark_ready(first, last - first);
        if let Err(e) = self.persist(false) {
            // The bytes are valid in memory; only their persistence failed.
            log::warn!("blob {}: writing readiness map: {e}", self.id);
        }
        if self.ready_count() < self.granules() {
            if expected.is_some() && !self.is_verified() {
                self.hash_ready_prefix();
            }
            return Ok(false);
        }
        // Two last fills that ran at once each saw the other missing: the
        // check runs here instead (a no-op if it already passed).
        self.verify(backend, backend_id, expected)?;
        Ok(true)
    }

    /// Hashes on through the granules ready from the front (a failure is
    /// only logged: the check at completion hashes what is left, and fails
    /// there if the file cannot be read).
    fn hash_ready_prefix(&self) {
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
    fn verify(
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

    /// Forgets every ready granule and the bytes behind them.
    fn discard(&self) {
        for w in self.ready.iter() {
            w.store(0, Ordering::Release);
        }
        // Punch the bad bytes out before the hash starts over, so it never
        // covers them; a failure here is harmless since nothing is marked
        // ready any more.
        let _ = self
            .data
            .set_len(0)
            .and_then(|_| self.data.set_len(self.size));
        self.checksum.reset();
        self.verified.store(false, Ordering::Release);
        if let Err(e) = self.persist(false) {
            log::warn!("blob {}: writing readiness map: {e}", self.id);
        }
    }

    /// Whether the complete blob passed the backend's integrity check.
    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    /// Makes everything marked ready durable: data first, then the map,
    /// flagged as synced so it is trusted after a reboot too.
    pub fn checkpoint(&self) -> io::Result<()> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = self.encode_map(true);
        self.data.sync_data()?;
        map.write_all_at(&snapshot, 0)?;
        map.sync_data()
    }

    fn persist(&self, synced: bool) -> io::Result<()> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // The snapshot is taken under the lock: a later writer's snapshot
        // includes every bit an earlier one saw.
        map.write_all_at(&self.encode_map(synced), 0)
    }

    fn encode_map(&self, synced: bool) -> Vec<u8> {
        let h = MapHeader {
            size: self.size,
            granule: self.granule,
            boot_id: self.boot_id,
            synced,
            verified: self.is_verified(),
        };
        map::encode(&h, self.ready.iter().map(|w| w.load(Ordering::Acquire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::setup;

    #[test]
    fn map_survives_reopen_and_rejects_damage() {
        let (_d, cfg, be, data) = setup(5 * 4096, 4096);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        b.fill(&be, 1, 2).unwrap();
        drop(b);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert!(!b.is_ready(0) && b.is_ready(1) && b.is_ready(2) && !b.is_ready(3));
        let mut got = vec![0u8; 8192];
        b.data.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(got, data[4096..3 * 4096]);
        drop(b);
        // Flip one byte of the map: the whole map is discarded.
        let mp = cfg.map_dir().join("b");
        let mut m = std::fs::read(&mp).unwrap();
        m[map::HEADER] ^= 0x40;
        std::fs::write(&mp, &m).unwrap();
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert_eq!(b.ready_count(), 0);
        // A torn (truncated) map is discarded too.
        b.fill(&be, 0, 1).unwrap();
        drop(b);
        let m = std::fs::read(&mp).unwrap();
        std::fs::write(&mp, &m[..m.len() - 3]).unwrap();
        assert_eq!(Blob::open(&cfg, &be, "b").unwrap().ready_count(), 0);
    }

    #[test]
    fn offline_open_uses_the_map() {
        let (d, cfg, be, _) = setup(3 * 4096, 4096);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        b.fill(&be, 0, 1).unwrap();
        drop(b);
        std::fs::remove_file(d.path().join("be/b")).unwrap();
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert_eq!(b.size(), 3 * 4096);
        assert!(b.is_ready(0));
        assert!(matches!(
            Blob::open(&cfg, &be, "other"),
            Err(OpenError::NotFound)
        ));
    }

    #[test]
    fn ready_bytes_counts_a_short_last_granule() {
        let (_d, cfg, be, _) = setup(2 * 4096 + 100, 4096);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert_eq!(b.ready_bytes(), 0);
        b.fill(&be, 2, 1).unwrap();
        assert_eq!(b.ready_bytes(), 100);
        b.fill(&be, 0, 1).unwrap();
        assert_eq!(b.ready_bytes(), 4196);
    }

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

    #[test]
    fn hashed_bytes_written_again_are_hashed_again() {
        // Granules 0 and 1 arrive honestly and are hashed; then a whole
        // body rewrites granule 0 with other bytes: the check must see it.
        let (_d, cfg, be, data) = setup(4 * 4096, 4096);
        let honest = digested(be, &data);
        let b = Blob::open(&cfg, &honest, "b").unwrap();
        assert!(!b.fill(&honest, 0, 2).unwrap());
        assert_eq!(b.checksum.hashed(), 8192);
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
        let (_d, cfg, be, data) = setup(4 * 4096, 4096);
        let honest = digested(be, &data);
        let b = Blob::open(&cfg, &honest, "b").unwrap();
        assert!(!b.fill(&honest, 0, 2).unwrap());
        assert_eq!(b.checksum.hashed(), 8192);
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

    /// Never delivers: every fill times out.
    struct TimesOut;

    impl Backend for TimesOut {
        fn blob_size(&self, _id: &str) -> Result<u64, BackendError> {
            Ok(4 * 4096)
        }
        fn read_into(&self, _: &str, _: u64, _: u64, _: &File) -> Result<(), BackendError> {
            Err(BackendError::Timeout("GET".into()))
        }
        fn describe(&self) -> String {
            "times-out".into()
        }
    }

    #[test]
    fn the_fill_rate_is_measured_and_a_timeout_makes_it_slow() {
        let (_d, cfg, be, _) = setup(4 * 4096, 4096);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        assert_eq!(b.fill_rate(), 0, "unknown before any fill");
        b.fill(&be, 0, 2).unwrap();
        assert!(
            b.fill_rate() > 8192,
            "a local file is fast: {}",
            b.fill_rate()
        );
        assert!(b.fill(&TimesOut, 2, 1).is_err());
        assert_eq!(b.fill_rate(), 1);
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
