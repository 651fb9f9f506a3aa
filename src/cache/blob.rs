//! One cached blob: a sparse data file of the blob's size and its readiness
//! bits, one per granule, mirrored in a map file. Shared by the reactor side
//! (which only reads the bits) and the workers (which fill and persist).
//!
//! A granule's bit is set only after its bytes were written to the data
//! file; see docs/CACHE.md for the crash reasoning. The check of a complete
//! blob against its digest is in `blob/integrity.rs`.

mod integrity;

use super::checksum::Checksum;
use super::map::{self, MapHeader, StoredMap};
use super::{files, CacheConfig, OpenError, MAX_BLOB_SIZE};
use crate::backend::{Backend, BackendError};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One cached blob: its files and readiness bits.
// Fourteen fields: the files, the readiness bits and what guards their
// order of writes are one blob's state, shared by the reactor and workers.
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
    /// Times the blob was discarded (a failed check): a fill that began
    /// before a discard may have had its bytes punched out, so it marks
    /// nothing (see [`Blob::mark_unless_discarded`]).
    discards: AtomicU64,
    /// Granules were marked since the last checkpoint: the map on disk
    /// holds them but is not synced (not trusted after a reboot).
    unsynced: AtomicBool,
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({}, {} bytes)", self.id, self.size)
    }
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
        if size > MAX_BLOB_SIZE {
            return Err(OpenError::TooLarge(size));
        }
        let data = files::open_rw(&data_path)?;
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
        let ro = files::reopen_ro(&data, &data_path)?;
        let map = files::open_rw(&map_path)?;
        if trusted.is_none() {
            map.set_len(0)
                .map_err(|e| OpenError::file("truncate", &map_path, e))?;
        }
        let verified = trusted.unwrap_or(false);
        // A map taken from disk may be one of this boot's, not synced: a
        // checkpoint makes sure before the blob may be closed.
        let unsynced = trusted.is_some();
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
            discards: AtomicU64::new(0),
            unsynced: AtomicBool::new(unsynced),
        };
        blob.check_if_complete(backend, backend_id);
        Ok(blob)
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
    /// and records that in the map file, then hashes on through them: a
    /// fill job's whole work, on one thread. Returns true when the blob is
    /// now complete (and checked): it is then due a [`Blob::checkpoint`],
    /// which the caller runs after answering.
    pub fn fill(&self, backend: &dyn Backend, g0: u64, n: u64) -> Result<bool, BackendError> {
        let complete = self.fill_from(backend, &self.id, g0, n)?;
        if !complete {
            self.hash_ready_prefix();
        }
        Ok(complete)
    }

    /// [`Blob::fill`] from the blob the backend calls `backend_id`, without
    /// its last step: the worker runs [`Blob::hash_ready_prefix`] once the
    /// fill's waiters are answered (the last fill of a blob still checks it
    /// before its granules show ready). When the backend wrote more than
    /// asked (a server that ignores ranges), every whole granule it wrote is
    /// marked ready too, so no byte is fetched twice.
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
        if expected.is_some() {
            self.checksum.want();
        }
        let epoch = self.discards.load(Ordering::Acquire);
        self.reserve(start, end)?;
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
                    // Its result is logged; this fill fails either way.
                    let _ = self.recheck_after_late_write(backend, backend_id, expected);
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
            self.recheck_after_late_write(backend, backend_id, expected)?;
        }
        // The fill that completes the blob checks it before its own granules
        // are reported ready, so a blob never shows complete and unchecked.
        if self.ready_count() + newly == self.granules() {
            self.verify(backend, backend_id, expected)?;
        }
        if !self.mark_unless_discarded(first, last - first, epoch) {
            return Err(BackendError::Integrity(format!(
                "{}: the blob was discarded while this fill ran; nothing marked",
                self.id
            )));
        }
        if self.ready_count() < self.granules() {
            return Ok(false);
        }
        // Two last fills that ran at once each saw the other missing: the
        // check runs here instead (a no-op if it already passed).
        self.verify(backend, backend_id, expected)?;
        Ok(true)
    }

    /// Allocates the data file's blocks for `[start, end)` before a fill
    /// writes them: a full file system says so before any byte is fetched
    /// (and the fill is retried after an eviction like any ENOSPC), and the
    /// writes then land in allocated blocks, which costs the file system
    /// less than allocating as they come (docs/PERFORMANCE.md). A file
    /// system without `fallocate` fills as before.
    fn reserve(&self, start: u64, end: u64) -> Result<(), BackendError> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let (Ok(at), Ok(len)) = (i64::try_from(start), i64::try_from(end - start)) else {
            return Ok(());
        };
        match fallocate(&self.data, FallocateFlags::FALLOC_FL_KEEP_SIZE, at, len) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => Ok(()),
            Err(e) => Err(BackendError::Io(
                format!("reserving bytes {start}..{end} of the cache file"),
                e.into(),
            )),
        }
    }

    /// Makes everything marked ready durable: data first, then the map,
    /// flagged as synced so it is trusted after a reboot too.
    pub fn checkpoint(&self) -> io::Result<()> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Marks take the map lock: none lands between this and the snapshot.
        self.unsynced.store(false, Ordering::Release);
        let snapshot = self.encode_map(true);
        let synced = self
            .data
            .sync_data()
            .and_then(|_| map.write_all_at(&snapshot, 0))
            .and_then(|_| map.sync_data());
        if synced.is_err() {
            self.unsynced.store(true, Ordering::Release);
        }
        synced
    }

    /// Whether granules were marked since the last checkpoint.
    pub fn is_unsynced(&self) -> bool {
        self.unsynced.load(Ordering::Acquire)
    }

    /// Marks granules `[g0, g0 + n)` ready and writes the map, unless the
    /// blob was discarded since `epoch` (when the fill began): its bytes
    /// may then have been punched out after it wrote them, and false is
    /// returned with nothing marked. Discards hold the map lock throughout,
    /// so a fill marks either before one (and is cleared by it) or after
    /// it (and sees it).
    fn mark_unless_discarded(&self, g0: u64, n: u64, epoch: u64) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if self.discards.load(Ordering::Acquire) != epoch {
            return false;
        }
        self.mark_ready(g0, n);
        self.unsynced.store(true, Ordering::Release);
        // The snapshot is taken under the lock: a later writer's snapshot
        // includes every bit an earlier one saw.
        if let Err(e) = map.write_all_at(&self.encode_map(false), 0) {
            // The bytes are valid in memory; only their persistence failed.
            log::warn!("blob {}: writing readiness map: {e}", self.id);
        }
        true
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

    /// Review finding: cache files were opened following symlinks (an
    /// outside file was truncated), and a FIFO at map/<id> blocked the
    /// opening worker. Now neither is followed or waited on: both are
    /// replaced by regular files.
    #[test]
    fn untrusted_cache_files_are_replaced_not_followed_or_waited_on() {
        let (d, cfg, be, data) = setup(3 * 4096, 4096);
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"not the cache's").unwrap();
        std::os::unix::fs::symlink(&outside, cfg.data_dir().join("b")).unwrap();
        let fifo = cfg.map_dir().join("b");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let cfg2 = cfg.clone();
        std::thread::spawn(move || {
            let be = be;
            let r = Blob::open(&cfg2, &be, "b").map(|b| {
                b.fill(&be, 0, 3).unwrap();
            });
            let _ = tx.send(r.is_ok());
        });
        let opened = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(opened, Ok(true), "the open blocked or failed");
        assert_eq!(std::fs::read(&outside).unwrap(), b"not the cache's");
        for p in [cfg.data_dir().join("b"), fifo] {
            assert!(std::fs::symlink_metadata(&p).unwrap().is_file(), "{p:?}");
        }
        assert_eq!(std::fs::read(cfg.data_dir().join("b")).unwrap(), data);
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

    /// Claims a blob of `0.0` bytes and has none.
    struct Sized(u64);

    impl Backend for Sized {
        fn blob_size(&self, _id: &str) -> Result<u64, BackendError> {
            Ok(self.0)
        }
        fn read_into(&self, _: &str, _: u64, _: u64, _: &File) -> Result<(), BackendError> {
            Err(BackendError::NotFound)
        }
        fn describe(&self) -> String {
            "sized".into()
        }
    }

    #[test]
    fn a_size_above_the_limit_is_refused_before_anything_is_allocated() {
        let (_d, cfg, _, _) = setup(4096, 4096);
        // u64::MAX would ask for 2^49 bytes of readiness bits at this granule.
        for size in [MAX_BLOB_SIZE + 1, i64::MAX as u64, u64::MAX] {
            let Err(e) = Blob::open(&cfg, &Sized(size), "huge") else {
                panic!("{size} bytes accepted");
            };
            assert!(matches!(e, OpenError::TooLarge(s) if s == size), "{e}");
            assert_eq!(e.errno(), crate::protocol::Errno::Io);
            assert!(!cfg.data_dir().join("huge").exists(), "no file made");
        }
        assert!(Blob::open(&cfg, &Sized(MAX_BLOB_SIZE), "max").is_ok());
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
}
