//! The blob cache: per blob a sparse data file and a persisted readiness map
//! (one bit per granule), and the reactor-side bookkeeping that turns
//! FetchRange requests into fill jobs, at most one in flight per granule.
//!
//! On-disk layout and crash reasoning: docs/CACHE.md. In short, a granule's
//! bit is set (in memory, then in the map file) only after its bytes were
//! written to the data file; a map written since the last sync is trusted
//! only within the same boot, when the page cache that holds the data is the
//! one that was written.

use crate::backend::{Backend, BackendError};
use byteorder::{ByteOrder, LittleEndian as LE};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Default granule: see docs/PERFORMANCE.md for the measurement behind it.
pub const DEFAULT_GRANULE: u64 = 1 << 20;
/// Largest single fill job; longer runs of missing granules are split so
/// several workers fill one cold range in parallel.
pub const DEFAULT_MAX_JOB: u64 = 4 << 20;

const MAP_MAGIC: &[u8; 8] = b"BLOBMAP\0";
const MAP_VERSION: u32 = 1;
const MAP_FLAG_SYNCED: u32 = 1;
/// The complete blob passed the backend's integrity check.
const MAP_FLAG_VERIFIED: u32 = 2;
const MAP_HEADER: usize = 48;

const UNVERIFIED: u8 = 0;
const VERIFYING: u8 = 1;
const VERIFIED: u8 = 2;

/// Where and how the cache keeps its files.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub workdir: PathBuf,
    /// Readiness granule in bytes (a power of two, at least 4 KiB).
    pub granule: u64,
    /// Largest fill job in bytes (a multiple of the granule).
    pub max_job: u64,
    /// Most bytes of blob data to keep; past it, the least recently used
    /// blobs that no connection holds a token for are deleted. `None`: no
    /// limit.
    pub limit: Option<u64>,
}

impl CacheConfig {
    pub fn new(workdir: impl Into<PathBuf>) -> CacheConfig {
        CacheConfig {
            workdir: workdir.into(),
            granule: DEFAULT_GRANULE,
            max_job: DEFAULT_MAX_JOB,
            limit: None,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.workdir.join("data")
    }

    fn map_dir(&self) -> PathBuf {
        self.workdir.join("map")
    }

    /// Creates the work dir layout and checks the granule.
    pub fn prepare(&self) -> io::Result<()> {
        if !self.granule.is_power_of_two() || self.granule < 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("granule {} is not a power of two >= 4096", self.granule),
            ));
        }
        for d in [self.data_dir(), self.map_dir()] {
            std::fs::create_dir_all(&d)
                .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", d.display())))?;
        }
        Ok(())
    }
}

/// Why a blob could not be opened, as GetBlob answers it.
#[derive(Debug)]
pub enum OpenError {
    /// Neither the backend nor the cache knows the blob.
    NotFound,
    /// The backend failed and the cache has no valid copy; or a cache file
    /// could not be created.
    Io(String),
}

impl OpenError {
    pub fn errno(&self) -> u32 {
        match self {
            OpenError::NotFound => libc_errno::ENOENT,
            OpenError::Io(_) => libc_errno::EIO,
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::NotFound => write!(f, "no such blob"),
            OpenError::Io(s) => write!(f, "{s}"),
        }
    }
}

/// The errno values the protocol uses, spelled out so the wire values do not
/// depend on a platform crate.
pub mod libc_errno {
    pub const ENOENT: u32 = 2;
    pub const EIO: u32 = 5;
    pub const EMFILE: u32 = 24;
    pub const EINVAL: u32 = 22;
    pub const ENOSYS: u32 = 38;
}

/// One cached blob: its files and readiness bits. Shared by the reactor
/// (which only reads the bits) and the workers (which fill and persist).
pub struct Blob {
    id: String,
    size: u64,
    granule: u64,
    data: File,
    ro: Arc<OwnedFd>,
    ready: Box<[AtomicU64]>,
    map: Mutex<File>,
    boot_id: [u8; 16],
    verify_state: std::sync::atomic::AtomicU8,
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
        let map_path = cfg.map_dir().join(id);
        let data_path = cfg.data_dir().join(id);
        let boot_id = current_boot_id();
        let stored = load_map(&map_path, cfg.granule, &boot_id);
        let size = match (backend.blob_size(id), &stored) {
            (Ok(s), _) => s,
            (Err(e), Some(m)) => {
                log::info!("blob {id}: backend unavailable ({e}); serving from the cache");
                m.size
            }
            (Err(BackendError::NotFound), None) => return Err(OpenError::NotFound),
            (Err(e), None) => return Err(OpenError::Io(format!("backend: {e}"))),
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&data_path)
            .map_err(|e| OpenError::Io(format!("open {}: {e}", data_path.display())))?;
        let len = data
            .metadata()
            .map_err(|e| OpenError::Io(format!("stat {}: {e}", data_path.display())))?
            .len();
        let words = words_for(size, cfg.granule);
        let ready: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let mut verified = false;
        let mut trusted = false;
        match stored {
            Some(m) if m.size == size && len == size => {
                verified = m.verified;
                trusted = true;
                for (w, v) in ready.iter().zip(m.bits) {
                    w.store(v, Ordering::Relaxed);
                }
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
                    .map_err(|e| OpenError::Io(format!("size {}: {e}", data_path.display())))?;
            }
        }
        let ro = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&data_path)
            .map_err(|e| OpenError::Io(format!("open {}: {e}", data_path.display())))?;
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!trusted)
            .mode(0o600)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&map_path)
            .map_err(|e| OpenError::Io(format!("open {}: {e}", map_path.display())))?;
        Ok(Blob {
            id: id.to_owned(),
            size,
            granule: cfg.granule,
            data,
            ro: Arc::new(OwnedFd::from(ro)),
            ready,
            map: Mutex::new(map),
            boot_id,
            verify_state: std::sync::atomic::AtomicU8::new(if verified {
                VERIFIED
            } else {
                UNVERIFIED
            }),
        })
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
        let start = g0 * self.granule;
        let end = ((g0 + n) * self.granule).min(self.size);
        backend.read_into(&self.id, start, end - start, &self.data)?;
        // The fill that completes the blob checks it before its own granules
        // are reported ready, so a blob never shows complete and unchecked.
        if self.ready_count() + n == self.granules() {
            self.verify(backend)?;
        }
        self.mark_ready(g0, n);
        if let Err(e) = self.persist(false) {
            // The bytes are valid in memory; only their persistence failed.
            log::warn!("blob {}: writing readiness map: {e}", self.id);
        }
        if self.ready_count() < self.granules() {
            return Ok(false);
        }
        // Two last fills that ran at once each saw the other missing: the
        // check runs here instead (a no-op if it already passed).
        self.verify(backend)?;
        Ok(true)
    }

    /// Checks the complete blob with the backend, once; a mismatch throws
    /// the cache away.
    fn verify(&self, backend: &dyn Backend) -> Result<(), BackendError> {
        if !backend.verifies()
            || self
                .verify_state
                .compare_exchange(UNVERIFIED, VERIFYING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return Ok(());
        }
        if let Err(e) = backend.verify(&self.id, &self.data, self.size) {
            log::error!("blob {}: {e}; discarding its cache", self.id);
            self.discard();
            return Err(e);
        }
        self.verify_state.store(VERIFIED, Ordering::Release);
        Ok(())
    }

    /// Forgets every ready granule and the bytes behind them.
    fn discard(&self) {
        for w in self.ready.iter() {
            w.store(0, Ordering::Release);
        }
        self.verify_state.store(UNVERIFIED, Ordering::Release);
        if let Err(e) = self.persist(false) {
            log::warn!("blob {}: writing readiness map: {e}", self.id);
        }
        // Punch the bad bytes out; a failure here is harmless since nothing
        // is marked ready any more.
        let _ = self
            .data
            .set_len(0)
            .and_then(|_| self.data.set_len(self.size));
    }

    /// Whether the complete blob passed the backend's integrity check.
    pub fn is_verified(&self) -> bool {
        self.verify_state.load(Ordering::Acquire) == VERIFIED
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
        let mut b = vec![0u8; MAP_HEADER + self.ready.len() * 8 + 4];
        b[0..8].copy_from_slice(MAP_MAGIC);
        LE::write_u32(&mut b[8..12], MAP_VERSION);
        let mut flags = if synced { MAP_FLAG_SYNCED } else { 0 };
        if self.is_verified() {
            flags |= MAP_FLAG_VERIFIED;
        }
        LE::write_u32(&mut b[12..16], flags);
        LE::write_u64(&mut b[16..24], self.size);
        LE::write_u64(&mut b[24..32], self.granule);
        b[32..48].copy_from_slice(&self.boot_id);
        for (i, w) in self.ready.iter().enumerate() {
            let at = MAP_HEADER + i * 8;
            LE::write_u64(&mut b[at..at + 8], w.load(Ordering::Acquire));
        }
        let crc_at = b.len() - 4;
        let crc = crc32(&b[..crc_at]);
        LE::write_u32(&mut b[crc_at..], crc);
        b
    }
}

fn words_for(size: u64, granule: u64) -> usize {
    size.div_ceil(granule).div_ceil(64) as usize
}

/// A map read back from disk and found valid.
struct StoredMap {
    size: u64,
    bits: Vec<u64>,
    verified: bool,
}

/// Reads and checks a map file. Anything wrong with it means "nothing is
/// ready": a missing file silently, a damaged or untrusted one with a log line.
fn load_map(path: &Path, granule: u64, boot_id: &[u8; 16]) -> Option<StoredMap> {
    let b = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("readiness map {}: {e}; treating as empty", path.display());
            return None;
        }
    };
    match parse_map(&b, granule, boot_id) {
        Ok(m) => Some(m),
        Err(why) => {
            log::warn!("readiness map {}: {why}; treating as empty", path.display());
            None
        }
    }
}

fn parse_map(b: &[u8], granule: u64, boot_id: &[u8; 16]) -> Result<StoredMap, String> {
    if b.len() < MAP_HEADER + 4 {
        return Err(format!("{} bytes, too short", b.len()));
    }
    if &b[0..8] != MAP_MAGIC {
        return Err("bad magic".into());
    }
    let version = LE::read_u32(&b[8..12]);
    if version != MAP_VERSION {
        return Err(format!("version {version}"));
    }
    let crc_at = b.len() - 4;
    if crc32(&b[..crc_at]) != LE::read_u32(&b[crc_at..]) {
        return Err("checksum mismatch (torn or corrupt)".into());
    }
    let flags = LE::read_u32(&b[12..16]);
    let size = LE::read_u64(&b[16..24]);
    let g = LE::read_u64(&b[24..32]);
    if g != granule {
        return Err(format!("granule {g}, configured {granule}"));
    }
    let words = words_for(size, granule);
    if b.len() != MAP_HEADER + words * 8 + 4 {
        return Err(format!("{} bytes for a {size}-byte blob", b.len()));
    }
    let synced = flags & MAP_FLAG_SYNCED != 0;
    if !synced && (boot_id == &[0u8; 16] || &b[32..48] != boot_id) {
        return Err("written before a reboot and never synced".into());
    }
    let mut bits: Vec<u64> = (0..words)
        .map(|i| LE::read_u64(&b[MAP_HEADER + i * 8..MAP_HEADER + i * 8 + 8]))
        .collect();
    // Bits past the last granule are meaningless; never let them count.
    let granules = size.div_ceil(granule);
    if granules % 64 != 0 {
        if let Some(last) = bits.last_mut() {
            *last &= (1u64 << (granules % 64)) - 1;
        }
    }
    Ok(StoredMap {
        size,
        bits,
        verified: flags & MAP_FLAG_VERIFIED != 0,
    })
}

/// The kernel's id of this boot, so a map written without a sync is trusted
/// only while the page cache it relies on is still the one it was written to.
fn current_boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = s.bytes().filter(|c| c.is_ascii_hexdigit()).collect();
        if hex.len() == 32 {
            for (i, pair) in hex.chunks(2).enumerate() {
                let s = std::str::from_utf8(pair).unwrap_or("00");
                id[i] = u8::from_str_radix(s, 16).unwrap_or(0);
            }
        }
    }
    id
}

/// Every regular file of the data dir: (id, allocated bytes, mtime).
fn scan_data_dir(dir: &Path) -> Vec<(String, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = e.metadata().ok()?;
            let id = e.file_name().into_string().ok()?;
            meta.is_file()
                .then(|| (id, meta.blocks() * 512, meta.mtime()))
        })
        .collect()
}

/// Deletes the files of blob `id` (an eviction). Runs on a worker.
pub fn remove_blob_files(cfg: &CacheConfig, id: &str) -> io::Result<()> {
    for path in [cfg.map_dir().join(id), cfg.data_dir().join(id)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("remove {}: {e}", path.display()),
                ))
            }
        }
    }
    Ok(())
}

/// CRC-32 (IEEE), bytewise with a table built at compile time.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Index of a blob in the reactor's table. Blobs stay in the table for the
/// daemon's lifetime, so an index never changes meaning.
pub type BlobKey = usize;
/// Identifies a worker job.
pub type JobId = u64;

/// A fill the reactor decided on: granules `[g0, g0 + n)` of `blob`.
pub struct FillJob {
    pub id: JobId,
    pub blob: Arc<Blob>,
    pub g0: u64,
    pub n: u64,
}

/// What a FetchRange turned into.
#[derive(Debug, PartialEq, Eq)]
pub enum FetchStart {
    /// Every granule is ready: `count` bytes from start are valid now.
    Ready { count: u64 },
    /// start >= blob size.
    OutOfRange,
    /// Waiting on `jobs` fill jobs (new or already in flight).
    Waiting { jobs: usize, count: u64 },
    /// The backend hung on this blob recently: failed without waiting.
    Unavailable,
}

struct OpenBlob {
    blob: Arc<Blob>,
    /// In-flight fills by first granule: (granule count, job).
    inflight: BTreeMap<u64, (u64, JobId)>,
    /// Tokens on live connections that name this blob.
    refs: usize,
    /// Logical time of the last GetBlob or FetchRange.
    last_used: u64,
    /// Bytes of data counted against the limit.
    bytes: u64,
    /// Set when a fill of this blob timed out: until `until`, fetches that
    /// need the backend fail at once; after it, one probe fill at a time.
    hung: Option<Hung>,
}

#[derive(Clone, Copy)]
struct Hung {
    until: std::time::Instant,
    strikes: u32,
}

/// A blob whose files are in the work dir but that no client opened since
/// the daemon started.
struct ColdBlob {
    bytes: u64,
    last_used: u64,
}

struct Job<W> {
    blob: BlobKey,
    g0: u64,
    waiters: Vec<W>,
}

/// The reactor's view of the cache: which blobs are open, which are being
/// opened, which granules are being filled and who waits for them. `W` is
/// whatever the caller needs to find a waiting request again.
pub struct Cache<W> {
    cfg: Arc<CacheConfig>,
    by_id: HashMap<String, BlobKey>,
    blobs: slab::Slab<OpenBlob>,
    cold: HashMap<String, ColdBlob>,
    /// Data bytes of every blob, open or cold.
    used: u64,
    clock: u64,
    /// Ids whose files are to be deleted (see [`Cache::take_evictions`]).
    evicted: Vec<String>,
    next_job: JobId,
    jobs: HashMap<JobId, Job<W>>,
    /// Fill jobs decided but not yet handed to the pool.
    new_jobs: Vec<FillJob>,
    /// Backend reads started, for tests and counters.
    pub fills_started: u64,
}

impl<W> Cache<W> {
    /// The reactor's cache over `cfg.workdir`. With a limit, the blobs
    /// already on disk are counted (one directory scan, before serving).
    pub fn new(cfg: Arc<CacheConfig>) -> Cache<W> {
        let mut cold = HashMap::new();
        let mut used = 0;
        let mut clock = 0;
        if cfg.limit.is_some() {
            let mut found = scan_data_dir(&cfg.data_dir());
            // Oldest first: their logical time is their rank.
            found.sort_by_key(|(_, _, mtime)| *mtime);
            for (id, bytes, _) in found {
                used += bytes;
                clock += 1;
                cold.insert(
                    id,
                    ColdBlob {
                        bytes,
                        last_used: clock,
                    },
                );
            }
        }
        Cache {
            cfg,
            by_id: HashMap::new(),
            blobs: slab::Slab::new(),
            cold,
            used,
            clock,
            evicted: Vec::new(),
            next_job: 1,
            jobs: HashMap::new(),
            new_jobs: Vec::new(),
            fills_started: 0,
        }
    }

    pub fn config(&self) -> &Arc<CacheConfig> {
        &self.cfg
    }

    /// The open blob named `id`, if any.
    pub fn lookup(&self, id: &str) -> Option<BlobKey> {
        self.by_id.get(id).copied()
    }

    pub fn blob(&self, key: BlobKey) -> Option<&Arc<Blob>> {
        self.blobs.get(key).map(|b| &b.blob)
    }

    /// Adds a blob a worker opened; if another open of the same id won the
    /// race, that one is kept and returned.
    pub fn insert(&mut self, blob: Blob) -> BlobKey {
        if let Some(&k) = self.by_id.get(blob.id()) {
            return k;
        }
        if let Some(c) = self.cold.remove(blob.id()) {
            self.used -= c.bytes;
        }
        let bytes = (blob.ready_count() * blob.granule_size()).min(blob.size());
        self.used += bytes;
        self.clock += 1;
        let id = blob.id.clone();
        let key = self.blobs.insert(OpenBlob {
            blob: Arc::new(blob),
            inflight: BTreeMap::new(),
            refs: 0,
            last_used: self.clock,
            bytes,
            hung: None,
        });
        self.by_id.insert(id, key);
        key
    }

    /// A blob on disk is being opened: it stops being an eviction candidate
    /// (its bytes are counted again by [`Cache::insert`]).
    pub fn forget_cold(&mut self, id: &str) {
        if let Some(c) = self.cold.remove(id) {
            self.used -= c.bytes;
        }
    }

    /// A token naming `key` was handed out; the blob is not evicted while
    /// any is held.
    pub fn acquire(&mut self, key: BlobKey) {
        if let Some(ob) = self.blobs.get_mut(key) {
            ob.refs += 1;
        }
    }

    /// A token naming `key` was dropped.
    pub fn release(&mut self, key: BlobKey) {
        if let Some(ob) = self.blobs.get_mut(key) {
            ob.refs = ob.refs.saturating_sub(1);
        }
    }

    /// Data bytes counted against the limit.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Ids whose files must be deleted, chosen since the last call. Until
    /// the deletion is done, the caller must not open these ids again.
    pub fn take_evictions(&mut self) -> Vec<String> {
        std::mem::take(&mut self.evicted)
    }

    /// While over the limit, evicts the least recently used blobs nobody
    /// holds (no token on a live connection, no fill in flight), down to 90%
    /// of the limit. Clients that still hold an evicted blob's fd keep
    /// reading its bytes: the files are unlinked, not overwritten.
    fn enforce_limit(&mut self) {
        let Some(limit) = self.cfg.limit else {
            return;
        };
        if self.used <= limit {
            return;
        }
        let target = limit - limit / 10;
        while self.used > target {
            let open = self
                .blobs
                .iter()
                .filter(|(_, b)| b.refs == 0 && b.inflight.is_empty())
                .min_by_key(|(_, b)| b.last_used)
                .map(|(k, b)| (b.last_used, Some(k), b.blob.id().to_owned()));
            let cold = self
                .cold
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(id, c)| (c.last_used, None, id.clone()));
            let victim = match (open, cold) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            let Some((_, key, id)) = victim else {
                log::warn!(
                    "cache holds {} bytes, over its limit of {limit}, but every blob is in use",
                    self.used
                );
                return;
            };
            let bytes = match key {
                Some(k) => {
                    self.by_id.remove(&id);
                    self.blobs.remove(k).bytes
                }
                None => self.cold.remove(&id).map_or(0, |c| c.bytes),
            };
            self.used -= bytes;
            log::info!("evicting blob {id} ({bytes} bytes) to stay under the cache limit");
            self.evicted.push(id);
        }
    }

    /// Every open blob, for checkpoints at shutdown.
    pub fn all_blobs(&self) -> impl Iterator<Item = &Arc<Blob>> {
        self.blobs.iter().map(|(_, b)| &b.blob)
    }

    /// Starts a FetchRange of `[start, start + count)` on `key`. Missing
    /// granules not yet in flight become new jobs (see [`Cache::take_new_jobs`]);
    /// `waiter` is attached to every job the range waits on.
    pub fn fetch(&mut self, key: BlobKey, start: u64, count: u64, waiter: W) -> FetchStart
    where
        W: Clone,
    {
        let Some(ob) = self.blobs.get_mut(key) else {
            return FetchStart::OutOfRange;
        };
        self.clock += 1;
        ob.last_used = self.clock;
        let blob = &ob.blob;
        let size = blob.size();
        if start >= size {
            return FetchStart::OutOfRange;
        }
        let end = start.saturating_add(count).min(size);
        if end == start {
            return FetchStart::Ready { count: 0 };
        }
        let g = blob.granule_size();
        let (g0, g1) = (start / g, (end - 1) / g);
        if blob.all_ready(g0, g1) {
            return FetchStart::Ready { count: end - start };
        }
        // After a timeout, the backend is left alone for a while, then
        // probed with one fill at a time until one succeeds.
        let probing = match ob.hung {
            Some(h) if std::time::Instant::now() < h.until => return FetchStart::Unavailable,
            Some(_) => true,
            None => false,
        };
        let max_run = (self.cfg.max_job / g).max(1);
        let mut wait_on: Vec<JobId> = Vec::new();
        let mut gi = g0;
        while gi <= g1 {
            if blob.is_ready(gi) {
                gi += 1;
                continue;
            }
            // Already being filled by a job that covers gi?
            if let Some((&j0, &(n, job))) = ob.inflight.range(..=gi).next_back() {
                if gi < j0 + n {
                    if wait_on.last() != Some(&job) {
                        wait_on.push(job);
                    }
                    gi = j0 + n;
                    continue;
                }
            }
            // A run of granules that are neither ready nor in flight.
            if probing && !ob.inflight.is_empty() {
                // The probe is out; this request cannot be served now.
                return FetchStart::Unavailable;
            }
            let next_inflight = ob
                .inflight
                .range(gi..)
                .next()
                .map_or(u64::MAX, |(&j0, _)| j0);
            let mut n = 0;
            while gi + n <= g1 && n < max_run && gi + n < next_inflight && !blob.is_ready(gi + n) {
                n += 1;
            }
            let id = self.next_job;
            self.next_job += 1;
            ob.inflight.insert(gi, (n, id));
            self.new_jobs.push(FillJob {
                id,
                blob: blob.clone(),
                g0: gi,
                n,
            });
            self.fills_started += 1;
            self.jobs.insert(
                id,
                Job {
                    blob: key,
                    g0: gi,
                    waiters: Vec::new(),
                },
            );
            wait_on.push(id);
            gi += n;
        }
        for j in &wait_on {
            if let Some(job) = self.jobs.get_mut(j) {
                job.waiters.push(waiter.clone());
            }
        }
        FetchStart::Waiting {
            jobs: wait_on.len(),
            count: end - start,
        }
    }

    /// Fill jobs created since the last call, to hand to the workers.
    pub fn take_new_jobs(&mut self) -> std::vec::Drain<'_, FillJob> {
        self.new_jobs.drain(..)
    }

    /// Records that fill `job` finished; returns its waiters. On failure
    /// nothing was marked ready and the granules may be asked for again.
    pub fn finish_fill(&mut self, job: JobId, ok: bool) -> Vec<W> {
        let Some(j) = self.jobs.remove(&job) else {
            return Vec::new();
        };
        if let Some(ob) = self.blobs.get_mut(j.blob) {
            if let Some((n, _)) = ob.inflight.remove(&j.g0) {
                if ok {
                    ob.hung = None;
                    let g = ob.blob.granule_size();
                    let bytes = ((j.g0 + n) * g).min(ob.blob.size()) - j.g0 * g;
                    ob.bytes += bytes;
                    self.used += bytes;
                }
            }
        }
        self.enforce_limit();
        j.waiters
    }

    /// Records that fill `job` ran past the backend timeout: its blob is
    /// left alone for a cool-down that doubles with each strike (up to 16
    /// timeouts), then probed one fill at a time. Returns the blob's other
    /// fill jobs, so the caller can cancel those not yet started.
    pub fn fill_timed_out(&mut self, job: JobId, timeout: std::time::Duration) -> Vec<JobId> {
        let Some(key) = self.jobs.get(&job).map(|j| j.blob) else {
            return Vec::new();
        };
        if let Some(ob) = self.blobs.get_mut(key) {
            let strikes = ob.hung.map_or(0, |h| h.strikes + 1);
            ob.hung = Some(Hung {
                until: std::time::Instant::now() + timeout * (1 << strikes.min(4)),
                strikes,
            });
            log::warn!(
                "blob {}: backend timed out; failing its fetches for {:?}",
                ob.blob.id(),
                timeout * (1 << strikes.min(4))
            );
        }
        self.jobs
            .iter()
            .filter(|(&id, j)| j.blob == key && id != job)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Fill jobs in flight.
    pub fn fills_in_flight(&self) -> usize {
        self.jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalFs;

    fn setup(size: usize, granule: u64) -> (tempfile::TempDir, Arc<CacheConfig>, LocalFs, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let be_dir = dir.path().join("be");
        std::fs::create_dir(&be_dir).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        std::fs::write(be_dir.join("b"), &data).unwrap();
        let mut cfg = CacheConfig::new(dir.path().join("work"));
        cfg.granule = granule;
        cfg.max_job = granule * 2;
        cfg.prepare().unwrap();
        (dir, Arc::new(cfg), LocalFs::new(be_dir), data)
    }

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn fetch_plans_jobs_once_and_coalesces() {
        let (_d, cfg, be, _) = setup(10 * 4096 + 5, 4096);
        let mut cache: Cache<u32> = Cache::new(cfg.clone());
        let key = cache.insert(Blob::open(&cfg, &be, "b").unwrap());
        assert_eq!(
            cache.fetch(key, 10 * 4096 + 5, 1, 0),
            FetchStart::OutOfRange
        );
        // Granules 0..=10 (11 granules), max job 2 granules: 6 jobs.
        let st = cache.fetch(key, 0, u64::MAX, 1);
        assert_eq!(
            st,
            FetchStart::Waiting {
                jobs: 6,
                count: 10 * 4096 + 5
            }
        );
        let jobs: Vec<FillJob> = cache.take_new_jobs().collect();
        assert_eq!(jobs.len(), 6);
        // A second asker of an overlapping range waits on the same jobs.
        let st = cache.fetch(key, 4096 * 3 + 1, 4096 * 2, 2);
        assert_eq!(
            st,
            FetchStart::Waiting {
                jobs: 2,
                count: 8192
            }
        );
        assert_eq!(cache.take_new_jobs().count(), 0);
        for j in &jobs {
            j.blob.fill(&be, j.g0, j.n).unwrap();
            let w = cache.finish_fill(j.id, true);
            assert!(w.contains(&1));
        }
        assert_eq!(
            cache.fetch(key, 7, 40_000, 3),
            FetchStart::Ready { count: 40_000 }
        );
        assert_eq!(cache.fills_in_flight(), 0);
    }

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
        m[MAP_HEADER] ^= 0x40;
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
    fn unsynced_map_from_another_boot_is_not_trusted() {
        let (_d, cfg, be, _) = setup(3 * 4096, 4096);
        let b = Blob::open(&cfg, &be, "b").unwrap();
        b.fill(&be, 0, 1).unwrap();
        let mut m = b.encode_map(false);
        m[32] ^= 1; // another boot
        let crc_at = m.len() - 4;
        let crc = crc32(&m[..crc_at]);
        LE::write_u32(&mut m[crc_at..], crc);
        assert!(parse_map(&m, 4096, &b.boot_id).is_err());
        let mut m = b.encode_map(true);
        m[32] ^= 1;
        let crc = crc32(&m[..crc_at]);
        LE::write_u32(&mut m[crc_at..], crc);
        assert!(
            parse_map(&m, 4096, &b.boot_id).is_ok(),
            "synced maps survive reboots"
        );
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
    fn a_timed_out_blob_fails_fast_then_is_probed_one_fill_at_a_time() {
        let (_d, cfg, be, _) = setup(10 * 4096, 4096);
        let mut cache: Cache<u32> = Cache::new(cfg.clone());
        let key = cache.insert(Blob::open(&cfg, &be, "b").unwrap());
        assert!(matches!(
            cache.fetch(key, 0, 8192, 1),
            FetchStart::Waiting { jobs: 1, .. }
        ));
        assert!(matches!(
            cache.fetch(key, 3 * 4096, 8192, 2),
            FetchStart::Waiting { .. }
        ));
        let jobs: Vec<JobId> = cache.take_new_jobs().map(|j| j.id).collect();
        assert_eq!(jobs.len(), 2);
        // The first times out: the other job of the blob is returned for
        // cancelling, and fetches needing the backend fail at once.
        let others = cache.fill_timed_out(jobs[0], std::time::Duration::from_millis(30));
        assert_eq!(others, vec![jobs[1]]);
        for j in &jobs {
            cache.finish_fill(*j, false);
        }
        assert_eq!(cache.fetch(key, 0, 10, 3), FetchStart::Unavailable);
        std::thread::sleep(std::time::Duration::from_millis(40));
        // Cool-down over: one probe; a second range cannot start another.
        assert!(matches!(
            cache.fetch(key, 0, 10, 4),
            FetchStart::Waiting { jobs: 1, .. }
        ));
        assert_eq!(cache.fetch(key, 5 * 4096, 10, 5), FetchStart::Unavailable);
        let probe: Vec<FillJob> = cache.take_new_jobs().collect();
        assert_eq!(probe.len(), 1);
        probe[0].blob.fill(&be, probe[0].g0, probe[0].n).unwrap();
        assert_eq!(cache.finish_fill(probe[0].id, true), vec![4]);
        // A success clears the strike: fetches run normally again.
        assert!(matches!(
            cache.fetch(key, 5 * 4096, 10, 6),
            FetchStart::Waiting { jobs: 1, .. }
        ));
    }
}
