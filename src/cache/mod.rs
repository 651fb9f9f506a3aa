//! The blob cache: per blob a sparse data file and a persisted readiness map
//! (one bit per granule), and the index that decides which granules to fill
//! and which blobs to evict.
//!
//! - [`blob`]: one blob's files and bits; filled and persisted by workers.
//! - [`checksum`]: a blob's sha256, computed as it is filled.
//! - [`map`]: the readiness map's on-disk format.
//! - [`index`]: the reactor-side table of blobs, LRU and limit, fill planning
//!   and the hung-backend breaker.
//! - [`readahead`]: sequential-read detection, per blob.
//!
//! On-disk layout and crash reasoning: docs/CACHE.md.

pub mod blob;
pub mod checksum;
pub mod disk;
pub mod files;
pub mod index;
pub mod map;
pub mod readahead;

pub use blob::Blob;
pub use disk::{MinFree, DEFAULT_MIN_FREE};
pub use index::{BlobKey, Cause, Evictions, Index, Plan};

use crate::backend::BackendError;
use crate::protocol::Errno;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Default granule: see docs/PERFORMANCE.md for the measurement behind it.
pub const DEFAULT_GRANULE: u64 = 1 << 20;

/// Most blobs kept open. An open blob holds three fds (its data file, the
/// read-only fd handed to clients, its map); past this, opening another
/// closes the least recently used one that no token holds and no job uses,
/// which stays in the cache as a blob on disk. 1024 blobs are 3072 fds:
/// beside the default `--max-conns` (16384) that stays under the shipped
/// unit's `LimitNOFILE=20000` however many blobs a daemon opens over weeks.
pub const MAX_OPEN_BLOBS: usize = 1024;

/// The largest blob the cache takes: 1 TiB, more than any image layer, and
/// a bound on what a backend's size can make it allocate (the readiness
/// bits: 128 KiB at the default granule, 32 MiB at the smallest).
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Largest fill job of a short range; longer runs of missing granules are
/// split so several workers fill one cold range in parallel.
pub const DEFAULT_MAX_JOB: u64 = 4 << 20;
/// Largest fill job of a long range (a readahead window, a whole-blob
/// fetch): one ranged GET per 64 MiB instead of per 4 MiB, which cuts a
/// registry's CPU for a sequential pull by more than half
/// (docs/PERFORMANCE.md).
pub const LARGE_JOB: u64 = 64 << 20;
/// A long range is split into at least this many fill jobs, so that the
/// default four workers fill it in parallel.
pub const JOBS_PER_RANGE: u64 = 4;
/// A job larger than `max_job` is at most this many seconds of transfer at
/// the blob's last fill rate: on a slow link jobs stay small, well inside
/// the backend's per-request timeout (30 s for a registry).
pub const LARGE_JOB_SECS: u64 = 4;
/// Default largest readahead window: four [`LARGE_JOB`]s in flight
/// (docs/CACHE.md, docs/PERFORMANCE.md).
pub const DEFAULT_READAHEAD: u64 = 256 << 20;

/// Where and how the cache keeps its files.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub workdir: PathBuf,
    /// Readiness granule in bytes (a power of two, at least 4 KiB).
    pub granule: u64,
    /// Largest fill job of a short range in bytes (a multiple of the
    /// granule); long ranges get jobs of up to [`LARGE_JOB`].
    pub max_job: u64,
    /// Most bytes of blob data to keep; past it, the least recently used
    /// blobs that no connection holds a token for are deleted. `None`: no
    /// limit.
    pub limit: Option<u64>,
    /// Free space to keep on the work dir's file system (`--min-free`);
    /// `None`: no watermark (ENOSPC is still handled).
    pub min_free: Option<MinFree>,
    /// Largest readahead window in bytes for a sequential reader; 0 turns
    /// readahead off.
    pub readahead: u64,
    /// Most blobs kept open ([`MAX_OPEN_BLOBS`]); see `index/cold.rs`.
    pub max_open_blobs: usize,
}

impl CacheConfig {
    pub fn new(workdir: impl Into<PathBuf>) -> CacheConfig {
        CacheConfig {
            workdir: workdir.into(),
            granule: DEFAULT_GRANULE,
            max_job: DEFAULT_MAX_JOB,
            limit: None,
            min_free: None,
            readahead: DEFAULT_READAHEAD,
            max_open_blobs: MAX_OPEN_BLOBS,
        }
    }

    /// Granules of `granule` bytes per fill job for a range of `len`
    /// bytes of a blob whose last fill ran at `rate` bytes per second (0:
    /// none yet): a quarter of the range ([`JOBS_PER_RANGE`]), at least
    /// `max_job`, and beyond that at most [`LARGE_JOB`] and
    /// [`LARGE_JOB_SECS`] of transfer at `rate` (`u64::MAX`: no limit from
    /// the rate).
    pub fn job_granules(&self, len: u64, granule: u64, rate: u64) -> u64 {
        let large = LARGE_JOB.min(rate.saturating_mul(LARGE_JOB_SECS));
        let job = (len / JOBS_PER_RANGE).clamp(self.max_job, large.max(self.max_job));
        (job / granule.max(1)).max(1)
    }

    /// Granules of a short range's job (`max_job`, at least one granule):
    /// the smallest job a long range's runs shrink to near the blob's end.
    pub fn small_job(&self, granule: u64) -> u64 {
        (self.max_job / granule).max(1)
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.workdir.join("data")
    }

    pub(crate) fn map_dir(&self) -> PathBuf {
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
    /// The backend failed and the cache has no valid copy.
    Backend(BackendError),
    /// The backend gives a size above [`MAX_BLOB_SIZE`] (that size).
    TooLarge(u64),
    /// A cache file could not be opened, sized or examined.
    File {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl OpenError {
    fn file(what: &'static str, path: &Path, source: io::Error) -> OpenError {
        OpenError::File {
            what,
            path: path.to_owned(),
            source,
        }
    }

    /// The errno GetBlob answers with.
    pub fn errno(&self) -> Errno {
        match self {
            OpenError::NotFound => Errno::NoEnt,
            OpenError::Backend(BackendError::NotFound) => Errno::NoEnt,
            OpenError::Backend(BackendError::AccessDenied { .. }) => Errno::Access,
            OpenError::Backend(_) | OpenError::TooLarge(_) | OpenError::File { .. } => Errno::Io,
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::NotFound => write!(f, "no such blob"),
            OpenError::Backend(e) => write!(f, "backend: {e}"),
            OpenError::TooLarge(size) => write!(
                f,
                "the backend gives a size of {size} bytes, above the {MAX_BLOB_SIZE} a blob may have"
            ),
            OpenError::File { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::NotFound | OpenError::TooLarge(_) => None,
            OpenError::Backend(e) => Some(e),
            OpenError::File { source, .. } => Some(source),
        }
    }
}

/// Every regular file of the data dir: (id, allocated bytes, mtime).
pub(crate) fn scan_data_dir(dir: &Path) -> Vec<(String, u64, i64)> {
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
        // Whatever is there (an empty directory an earlier run or a user
        // left included): an eviction must be able to clear the name.
        let t = match std::fs::symlink_metadata(&path) {
            Ok(m) => m.file_type(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("stat {}: {e}", path.display()),
                ))
            }
        };
        match files::remove_entry(&path, &t) {
            Ok(()) => {}
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::LocalFs;
    use std::sync::Arc;

    /// A work dir and a local backend holding blob "b" of `size` patterned
    /// bytes.
    pub fn setup(
        size: usize,
        granule: u64,
    ) -> (tempfile::TempDir, Arc<CacheConfig>, LocalFs, Vec<u8>) {
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
    fn fill_jobs_grow_with_the_range_up_to_large_job() {
        const MIB: u64 = 1 << 20;
        let cfg = CacheConfig::new("/nonexistent");
        let fast = 1 << 30;
        // Short ranges: one 4 MiB job per 4 MiB; long ones: a quarter of
        // the range, up to 64 MiB; a granule larger than that: one granule.
        for (len, granules) in [
            (MIB, 4),
            (4 * MIB, 4),
            (32 * MIB, 8),
            (64 * MIB, 16),
            (256 * MIB, 64),
            (1 << 30, 64),
            (u64::MAX, 64),
        ] {
            assert_eq!(cfg.job_granules(len, MIB, fast), granules, "{len}");
        }
        assert_eq!(cfg.job_granules(1 << 30, 128 * MIB, fast), 1);
        // A blob not filled yet, or after a timeout: 4 MiB jobs. At 2 MiB/s,
        // 8 MiB (four seconds' worth).
        assert_eq!(cfg.job_granules(1 << 30, MIB, 0), 4);
        assert_eq!(cfg.job_granules(1 << 30, MIB, 1), 4);
        assert_eq!(cfg.job_granules(1 << 30, MIB, 2 * MIB), 8);
        let big = CacheConfig {
            max_job: 32 * MIB,
            ..cfg
        };
        assert_eq!(big.job_granules(MIB, MIB, 0), 32);
    }
}
