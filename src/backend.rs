//! Where blobs come from. The cache asks a [`Backend`] for a blob's size and
//! to copy a byte range into the cache file; everything here runs on worker
//! threads and may block.

use std::error::Error;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A backend failure, split the way GetBlob answers it: [`NotFound`] is
/// ENOENT, everything else EIO.
///
/// Display messages name what failed (with URLs stripped of their query
/// strings, which may carry signatures) and never contain passwords, tokens
/// or Authorization headers.
///
/// [`NotFound`]: BackendError::NotFound
#[derive(Debug)]
pub enum BackendError {
    /// The backend does not have this blob (ENOENT).
    NotFound,
    /// The backend's data ended before the requested range did.
    ShortRead { expected: u64, got: u64 },
    /// Any other failure, with context (EIO).
    Io(String, io::Error),
    /// The assembled blob does not match what the backend promised (its
    /// digest); the cache discards it.
    Integrity(String),
    /// The backend did not answer in time.
    Timeout(String),
    /// An HTTP server answered with a status the backend cannot use (5xx,
    /// 429, or anything unexpected).
    Status {
        /// The HTTP status code.
        status: u16,
        /// The URL asked, without its query string.
        url: String,
    },
    /// An HTTP server refused access (401 or 403), also after any
    /// authentication the backend could do.
    AccessDenied {
        /// 401 or 403.
        status: u16,
        /// The URL asked, without its query string.
        url: String,
        /// Why, e.g. which credentials were refused; never the credentials.
        reason: String,
    },
    /// A redirect could not be followed.
    Redirect {
        /// The URL that answered with the redirect, without its query string.
        url: String,
        /// What was wrong with it.
        problem: RedirectProblem,
    },
    /// A server's answer broke the protocol: a missing or malformed header
    /// or body (e.g. no Content-Length, a token response without a token).
    BadResponse {
        /// The URL asked, without its query string.
        url: String,
        /// What was wrong.
        problem: String,
    },
    /// The request could not be sent or its answer not received (DNS,
    /// connection refused, TLS, a broken connection).
    Transport {
        /// The URL asked, without its query string.
        url: String,
        /// The failure as the daemon logs it: kind, message and cause,
        /// without the URL.
        detail: String,
        /// The HTTP client's error (for the registry, a `ureq::Error`;
        /// its `Debug` form may show the full URL).
        source: Box<dyn Error + Send + Sync>,
    },
}

/// Why a redirect could not be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedirectProblem {
    /// A 3xx answer without a Location header.
    NoLocation {
        /// The redirect's status code.
        status: u16,
    },
    /// More hops than the backend follows.
    TooMany {
        /// Hops followed before giving up.
        limit: u32,
    },
    /// A Location that is not an http(s) URL (given without its query
    /// string).
    BadLocation(String),
}

impl fmt::Display for RedirectProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedirectProblem::NoLocation { status } => write!(f, "{status} without a Location"),
            RedirectProblem::TooMany { limit } => write!(f, "more than {limit} redirects"),
            RedirectProblem::BadLocation(loc) => write!(f, "bad Location {loc:?}"),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::NotFound => write!(f, "blob not found in the backend"),
            BackendError::ShortRead { expected, got } => {
                write!(f, "short read from the backend: {got} of {expected} bytes")
            }
            BackendError::Io(ctx, e) => write!(f, "{ctx}: {e}"),
            BackendError::Integrity(s) => write!(f, "integrity check failed: {s}"),
            BackendError::Timeout(s) => write!(f, "backend timed out: {s}"),
            BackendError::Status { status, url } => write!(f, "HTTP {status} from {url}"),
            BackendError::AccessDenied {
                status,
                url,
                reason,
            } => write!(f, "access denied by {url} (HTTP {status}): {reason}"),
            BackendError::Redirect { url, problem } => write!(f, "redirect from {url}: {problem}"),
            BackendError::BadResponse { url, problem } => {
                write!(f, "bad response from {url}: {problem}")
            }
            // The detail repeats the source's text: the daemon logs Display
            // alone, and a log line that only said "transport error" would
            // not help anyone.
            BackendError::Transport { url, detail, .. } => write!(f, "{url}: {detail}"),
        }
    }
}

impl BackendError {
    /// Whether writing the cache file ran out of space (ENOSPC).
    pub fn is_no_space(&self) -> bool {
        match self {
            BackendError::Io(_, e) => {
                e.kind() == io::ErrorKind::StorageFull
                    || e.raw_os_error() == Some(nix::libc::ENOSPC)
            }
            _ => false,
        }
    }
}

impl Error for BackendError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            BackendError::Io(_, e) => Some(e),
            BackendError::Transport { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// A blob store the cache fills from. Implementations must be safe to call
/// from several worker threads at once.
pub trait Backend: Send + Sync + 'static {
    /// Maps a client's blob id (already checked against the protocol's
    /// alphabet) to this backend's canonical name for it, or `None` if the id
    /// cannot name a blob here (answered with EINVAL).
    fn canonical_id(&self, id: &str) -> Option<String> {
        Some(id.to_owned())
    }

    /// The blob's size in bytes.
    fn blob_size(&self, id: &str) -> Result<u64, BackendError>;

    /// Copies blob bytes `[offset, offset + len)` into `dst` at the same
    /// offset. Fails (and the caller marks nothing ready) unless every byte
    /// was written.
    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError>;

    /// Like [`Backend::read_into`], but the backend may write more than it
    /// was asked for (a server that answers a range with the whole blob):
    /// returns the byte range `[start, end)` of `dst` it wrote in full,
    /// which covers the one asked for. The caller may mark all of it valid.
    fn read_into_extent(
        &self,
        id: &str,
        offset: u64,
        len: u64,
        dst: &File,
    ) -> Result<(u64, u64), BackendError> {
        self.read_into(id, offset, len, dst)?;
        Ok((offset, offset + len))
    }

    /// The sha256 a blob's bytes must hash to, when the backend knows it
    /// (a registry digest). The cache then hashes the bytes as they are
    /// filled and checks the completed blob against it; on a mismatch it
    /// discards every granule and calls [`Backend::integrity_failed`].
    /// `None` (the default): the bytes are trusted.
    fn expected_sha256(&self, _id: &str) -> Option<[u8; 32]> {
        None
    }

    /// A completed blob failed its check: forget anything remembered about
    /// serving it (such as an endpoint that sent it whole).
    fn integrity_failed(&self, _id: &str) {}

    /// A short description for logs.
    fn describe(&self) -> String;

    /// What each endpoint this backend talks to has served so far, for the
    /// metrics endpoint (read on its thread, at scrape time).
    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        Vec::new()
    }
}

/// Calls and bytes of one backend endpoint, for `blobmgr_backend_*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// The endpoint's name in the metrics (`localfs:DIR`, a registry's
    /// scheme and authority).
    pub endpoint: String,
    pub ok: u64,
    pub errors: u64,
    /// Blob bytes received.
    pub bytes: u64,
}

/// Counters a backend keeps for one endpoint; written by workers.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    ok: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl EndpointCounters {
    /// Counts one call that ended with `r`, and `bytes` on success.
    pub fn record<T>(&self, r: &Result<T, BackendError>, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        match r {
            Ok(_) => {
                self.ok.fetch_add(1, Relaxed);
                self.bytes.fetch_add(bytes, Relaxed);
            }
            Err(_) => {
                self.errors.fetch_add(1, Relaxed);
            }
        }
    }

    /// A snapshot named `endpoint`.
    pub fn snapshot(&self, endpoint: String) -> EndpointStats {
        use std::sync::atomic::Ordering::Relaxed;
        EndpointStats {
            endpoint,
            ok: self.ok.load(Relaxed),
            errors: self.errors.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

/// A directory whose regular files are the blobs; the file name is the id.
pub struct LocalFs {
    root: PathBuf,
    counters: EndpointCounters,
}

impl LocalFs {
    pub fn new(root: impl Into<PathBuf>) -> LocalFs {
        LocalFs {
            root: root.into(),
            counters: EndpointCounters::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn open(&self, id: &str) -> Result<File, BackendError> {
        // `id` passed protocol validation: one path component, not `.`/`..`.
        let path = self.root.join(id);
        match File::open(&path) {
            Ok(f) => {
                let meta = f
                    .metadata()
                    .map_err(|e| BackendError::Io(format!("stat {}", path.display()), e))?;
                if !meta.is_file() {
                    return Err(BackendError::NotFound);
                }
                Ok(f)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BackendError::NotFound),
            Err(e) => Err(BackendError::Io(format!("open {}", path.display()), e)),
        }
    }
}

impl Backend for LocalFs {
    fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
        let r = self.open(id).and_then(|f| {
            f.metadata()
                .map(|m| m.len())
                .map_err(|e| BackendError::Io(format!("stat {id}"), e))
        });
        self.counters.record(&r, 0);
        r
    }

    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        let r = self
            .open(id)
            .and_then(|src| copy_range(&src, dst, offset, len));
        self.counters.record(&r, len);
        r
    }

    fn describe(&self) -> String {
        format!("localfs:{}", self.root.display())
    }

    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        vec![self.counters.snapshot(self.describe())]
    }
}

/// Copies `[offset, offset + len)` of `src` to the same range of `dst`, in the
/// kernel where the file systems allow it (copy_file_range), through a buffer
/// otherwise.
pub fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> Result<(), BackendError> {
    let mut done = 0u64;
    let mut use_kernel = true;
    let mut buf = Vec::new();
    while done < len {
        let at = offset + done;
        let want = (len - done).min(8 << 20) as usize;
        if use_kernel {
            let mut off_in = at as i64;
            let mut off_out = at as i64;
            match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)
            {
                Ok(0) => {
                    return Err(BackendError::ShortRead {
                        expected: len,
                        got: done,
                    })
                }
                Ok(n) => {
                    done += n as u64;
                    continue;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(
                    nix::errno::Errno::EXDEV
                    | nix::errno::Errno::EINVAL
                    | nix::errno::Errno::ENOSYS
                    | nix::errno::Errno::EOPNOTSUPP,
                ) => {
                    use_kernel = false;
                    continue;
                }
                Err(e) => {
                    return Err(BackendError::Io(
                        format!("copy_file_range at {at}"),
                        io::Error::from(e),
                    ))
                }
            }
        }
        if buf.is_empty() {
            buf = vec![0u8; 1 << 20];
        }
        let chunk = want.min(buf.len());
        let n = match src.read_at(&mut buf[..chunk], at) {
            Ok(0) => {
                return Err(BackendError::ShortRead {
                    expected: len,
                    got: done,
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BackendError::Io(format!("read at {at}"), e)),
        };
        dst.write_all_at(&buf[..n], at)
            .map_err(|e| BackendError::Io(format!("write cache at {at}"), e))?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_what_failed_and_keep_their_cause() {
        let e = BackendError::Io("open /b".into(), io::Error::from(io::ErrorKind::NotFound));
        assert!(e.to_string().starts_with("open /b: "), "{e}");
        let cause = e.source().expect("an io::Error");
        assert_eq!(
            cause.downcast_ref::<io::Error>().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );
        let e = BackendError::Transport {
            url: "http://h/v2/".into(),
            detail: "Connection Failed: refused".into(),
            source: Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)),
        };
        assert_eq!(e.to_string(), "http://h/v2/: Connection Failed: refused");
        assert!(e.source().unwrap().downcast_ref::<io::Error>().is_some());
        let e = BackendError::Redirect {
            url: "http://h/a".into(),
            problem: RedirectProblem::TooMany { limit: 5 },
        };
        assert_eq!(
            e.to_string(),
            "redirect from http://h/a: more than 5 redirects"
        );
        assert!(e.source().is_none());
        let e = BackendError::Status {
            status: 503,
            url: "http://h/a".into(),
        };
        assert_eq!(e.to_string(), "HTTP 503 from http://h/a");
    }

    #[test]
    fn localfs_sizes_reads_and_short_reads() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(dir.path().join("b1"), &data).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let be = LocalFs::new(dir.path());
        assert_eq!(be.blob_size("b1").unwrap(), 100_000);
        assert!(matches!(be.blob_size("nope"), Err(BackendError::NotFound)));
        assert!(matches!(be.blob_size("sub"), Err(BackendError::NotFound)));
        let out = tempfile::tempfile().unwrap();
        out.set_len(100_000).unwrap();
        be.read_into("b1", 4093, 50_000, &out).unwrap();
        let mut back = vec![0u8; 50_000];
        out.read_exact_at(&mut back, 4093).unwrap();
        assert_eq!(back, data[4093..54_093]);
        assert!(matches!(
            be.read_into("b1", 90_000, 20_000, &out),
            Err(BackendError::ShortRead { .. })
        ));
    }
}
