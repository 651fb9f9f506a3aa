//! Client library: a multiplexed, thread-safe connection to the daemon.
//!
//! One [`Client`] holds one Unix-socket connection to the daemon and is shared
//! by any number of threads (it is `Send + Sync`; wrap it in an `Arc`).
//! Requests are pipelined: each call writes its whole request under a short
//! write lock and then waits for its own reply, which a dedicated reader thread
//! matches by tag, so a slow request (a cold fetch) never holds up the others.
//!
//! Every call has a deadline ([`ClientBuilder::timeout`], 30 s by default) and
//! fails with [`io::ErrorKind::TimedOut`] when it passes. When the connection
//! breaks (the daemon was restarted or killed) the client reconnects with
//! bounded retries and backoff, and blobs opened before ([`RemoteBlob`]) are
//! re-opened transparently on the new connection, so callers keep their
//! handles. See docs/CLIENT.md for the full model.
//!
//! Here are the public calls and the reconnect and re-open logic; the
//! multiplexed connection and its reader thread are in `conn`, fd receipt
//! (`recvmsg` with SCM_RIGHTS) in `fds`, and the errors in `error`.
//!
//! ```no_run
//! use blobmgr::client::Client;
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! fn main() -> std::io::Result<()> {
//!     let client = Arc::new(
//!         Client::builder()
//!             .timeout(Duration::from_secs(10))
//!             .connect("/run/blobmgr/blobmgr.sock")?,
//!     );
//!     println!("daemon answered in {:?}", client.ping()?);
//!
//!     let blob = client.get_blob("sha256:0123abcd")?;
//!     let mut buf = vec![0u8; 4096.min(blob.size() as usize)];
//!     let n = client.read_at(&blob, &mut buf, 0)?;
//!     println!("first {n} bytes of a {}-byte blob", blob.size());
//!
//!     // Hint that a range will be needed soon; no reply is awaited.
//!     client.prefetch(&blob, 0, blob.size())?;
//!     Ok(())
//! }
//! ```

mod conn;
mod copy;
mod error;
mod fds;

pub use error::ClientError;

use crate::protocol::{self, Reply, Request};
use conn::{connect_socket, violation, Conn};
use error::{is_disconnect, ConnFailure};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default deadline of every call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of extra connection attempts after a failed connect.
pub const DEFAULT_CONNECT_RETRIES: u32 = 5;
/// Default first pause between connection attempts (doubled each time).
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(20);
/// Default longest pause between connection attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How many times one call re-opens a blob whose token the daemon refuses
/// (FetchRange result 2) before giving up.
const MAX_REOPENS: u32 = 3;

/// Locks a mutex, ignoring poisoning: every critical section here leaves its
/// data consistent, and a panicking caller must not wedge the others.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Time left until `deadline` (zero once it passed).
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Options of a [`Client`]; get one with [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    timeout: Duration,
    connect_retries: u32,
    backoff: Duration,
    max_backoff: Duration,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            timeout: DEFAULT_TIMEOUT,
            connect_retries: DEFAULT_CONNECT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl ClientBuilder {
    /// Deadline of every call, reconnection and re-opening included
    /// (default 30 s; at least 1 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Extra connection attempts after a failed one, and extra tries of a
    /// call whose connection broke under it (default 5).
    pub fn connect_retries(mut self, retries: u32) -> Self {
        self.connect_retries = retries;
        self
    }

    /// First pause between connection attempts and its cap; the pause doubles
    /// after each failed attempt (default 20 ms up to 1 s).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// Connects to the daemon listening on `path` (with the configured
    /// retries, within the timeout).
    pub fn connect(self, path: impl AsRef<Path>) -> io::Result<Client> {
        let client = Client {
            path: path.as_ref().to_path_buf(),
            cfg: self,
            next_tag: AtomicU64::new(1),
            link: Mutex::new(Link {
                conn: None,
                reader: None,
                retired: Vec::new(),
                generation: 0,
            }),
        };
        let deadline = Instant::now() + client.cfg.timeout;
        client.connection("connect", deadline)?;
        Ok(client)
    }
}

/// A blob opened with GetBlob: a read-only fd of its cache file, its token
/// and where the blob starts in the file.
///
/// The fd and token are replaced transparently when the client re-opens the
/// blob on a new connection; [`RemoteBlob::file`] returns the current fd.
pub struct RemoteBlob {
    id: String,
    state: Mutex<BlobState>,
    /// Serialises re-opening, so a restart costs one GetBlob per blob.
    reopen: Mutex<()>,
}

/// What a [`RemoteBlob`] holds now: its fd, its token, where it starts in
/// the fd, its size, and the connection the token is good on.
#[derive(Clone)]
struct BlobState {
    file: Arc<File>,
    token: u64,
    base: u64,
    size: u64,
    /// The connection that issued `token`.
    conn_id: u64,
    /// The daemon refused `token`: re-open before using it again.
    stale: bool,
}

impl fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("RemoteBlob")
            .field("id", &self.id)
            .field("size", &s.size)
            .field("base", &s.base)
            .field("token", &format_args!("{:#x}", s.token))
            .finish()
    }
}

impl RemoteBlob {
    /// The blob id it was opened with.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The blob's size in bytes (the cache file's size minus [`base`](Self::base)).
    pub fn size(&self) -> u64 {
        lock(&self.state).size
    }

    /// Offset of the blob's first byte in the fd.
    pub fn base(&self) -> u64 {
        lock(&self.state).base
    }

    /// The current token (valid only on the connection that issued it).
    pub fn token(&self) -> u64 {
        lock(&self.state).token
    }

    /// The current read-only fd of the cache file. Bytes
    /// `[base + x, base + x + n)` are blob bytes `[x, x + n)` once a
    /// [`Client::fetch_range`] covering them succeeded.
    pub fn file(&self) -> Arc<File> {
        lock(&self.state).file.clone()
    }

    fn snapshot(&self) -> BlobState {
        lock(&self.state).clone()
    }
}

/// The client's link to the daemon: the current connection and its reader
/// thread, the readers of replaced connections, and the generation of the
/// newest connection.
struct Link {
    /// The connection calls use; `None` once it was retired until a new one
    /// is made.
    conn: Option<Arc<Conn>>,
    /// The reader thread of `conn`.
    reader: Option<JoinHandle<()>>,
    /// Reader threads of replaced connections, joined once they exit.
    retired: Vec<JoinHandle<()>>,
    /// Generation of the newest connection (never 0 once one was made); its
    /// GetBlob requests carry it.
    generation: u32,
}

/// A thread-safe, multiplexed client; share it with `Arc<Client>`.
pub struct Client {
    path: PathBuf,
    cfg: ClientBuilder,
    next_tag: AtomicU64,
    link: Mutex<Link>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("path", &self.path)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Client {
    /// Connects with the default options.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        Client::builder().connect(path)
    }

    /// Options: timeout, connection retries and backoff.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The socket path this client connects to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configured per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    /// One Noop round trip; returns how long the call took.
    pub fn ping(&self) -> io::Result<Duration> {
        let t = Instant::now();
        self.run("Noop", |conn, deadline| {
            self.call(conn, &Request::Noop, "Noop", deadline)
                .map(|_| ())
        })?;
        Ok(t.elapsed())
    }

    /// Opens blob `id`: GetBlob, then fstat of the received fd.
    pub fn get_blob(&self, id: &str) -> io::Result<RemoteBlob> {
        if id.len() > protocol::MAX_BLOB_ID_LEN {
            return Err(ClientError::InvalidId(id.to_string()).into());
        }
        let state = self.run("GetBlob", |conn, deadline| self.open_on(conn, id, deadline))?;
        Ok(RemoteBlob {
            id: id.to_string(),
            state: Mutex::new(state),
            reopen: Mutex::new(()),
        })
    }

    /// Makes `[start, start + len)` of the blob valid; returns how many bytes
    /// from `start` are now valid (clipped at the blob's end).
    pub fn fetch_range(&self, blob: &RemoteBlob, start: u64, len: u64) -> io::Result<u64> {
        self.fetch(blob, start, len).map(|(count, _)| count)
    }

    /// Reads blob bytes at `offset` into `buf`: fetches what is missing, then
    /// `pread`s through the fd. Returns 0 at or past the blob's end; may
    /// return fewer bytes than asked only at the blob's end.
    pub fn read_at(&self, blob: &RemoteBlob, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = blob.size();
        if buf.is_empty() || offset >= size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - offset);
        let (n, snap, pos) = self.valid_at(blob, offset, want)?;
        let n = n as usize;
        let mut done = 0usize;
        while done < n {
            match snap.file.read_at(&mut buf[done..n], pos + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "cache file of blob {:?} ends at {} before the blob's end",
                            blob.id,
                            pos + done as u64
                        ),
                    ))
                }
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("pread of blob {:?} at {}: {e}", blob.id, pos + done as u64),
                    ))
                }
            }
        }
        Ok(n)
    }

    /// Makes `want` bytes (at least one) at `offset` valid; returns how many
    /// are (at most `want`), the fd state to read them through and their
    /// position in its file.
    fn valid_at(
        &self,
        blob: &RemoteBlob,
        offset: u64,
        want: u64,
    ) -> io::Result<(u64, BlobState, u64)> {
        let (valid, snap) = self.fetch(blob, offset, want)?;
        let n = valid.min(want);
        if n == 0 {
            return Err(ClientError::Protocol(format!(
                "FetchRange at {offset} of a {}-byte blob reported no valid bytes",
                blob.size()
            ))
            .into());
        }
        let pos = snap.base.checked_add(offset).ok_or_else(|| {
            ClientError::Protocol(format!("base {} + offset {offset} overflows", snap.base))
        })?;
        Ok((n, snap, pos))
    }

    /// Asks the daemon to fetch `[start, start + len)` in the background
    /// (FetchRange without NEED_REPLY): returns once the hint is sent.
    pub fn prefetch(&self, blob: &RemoteBlob, start: u64, len: u64) -> io::Result<()> {
        self.run("prefetch", |conn, deadline| {
            let snap = self.current(blob, conn, deadline)?;
            let mut msg = Vec::with_capacity(protocol::MAX_MESSAGE_SIZE);
            let req = Request::FetchRange {
                token: snap.token,
                start,
                count: len,
            };
            protocol::encode_request(&mut msg, self.tag(), false, &req);
            conn.send_message(&msg, "prefetch", deadline)
        })
    }

    // -- internals ---------------------------------------------------------

    fn tag(&self) -> u64 {
        loop {
            let t = self.next_tag.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Runs `f` on a live connection with one deadline; when the connection
    /// breaks under it, reconnects and tries again (bounded).
    fn run<T>(
        &self,
        op: &'static str,
        mut f: impl FnMut(&Arc<Conn>, Instant) -> io::Result<T>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + self.cfg.timeout;
        let mut tries = 0u32;
        loop {
            let conn = self.connection(op, deadline)?;
            match f(&conn, deadline) {
                Err(e)
                    if is_disconnect(&e)
                        && tries < self.cfg.connect_retries
                        && Instant::now() < deadline =>
                {
                    log::debug!("client: {op}: {e}; retrying on a new connection");
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    /// The live connection, or a new one (bounded retries with backoff).
    fn connection(&self, op: &'static str, deadline: Instant) -> io::Result<Arc<Conn>> {
        let mut link = lock(&self.link);
        if let Some(c) = &link.conn {
            if !c.is_dead() {
                return Ok(c.clone());
            }
        }
        Self::retire(&mut link);
        let mut backoff = self.cfg.backoff;
        let mut attempts = 0u32;
        let mut last: Option<io::Error> = None;
        while attempts <= self.cfg.connect_retries {
            if attempts > 0 {
                let left = remaining(deadline);
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(self.cfg.max_backoff);
            }
            attempts += 1;
            match connect_socket(&self.path) {
                Ok(sock) => {
                    link.generation = link.generation.wrapping_add(1).max(1);
                    let (conn, reader) = Conn::start(sock, link.generation, self.cfg.timeout)?;
                    log::debug!(
                        "client: connected to {} (connection {}, generation {})",
                        self.path.display(),
                        conn.id,
                        conn.generation
                    );
                    link.conn = Some(conn.clone());
                    link.reader = Some(reader);
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        match last {
            Some(source) if attempts > self.cfg.connect_retries => Err(ClientError::Connect {
                path: self.path.clone(),
                attempts,
                source,
            }
            .into()),
            _ => Err(ClientError::TimedOut {
                op,
                after: self.cfg.timeout,
            }
            .into()),
        }
    }

    /// Drops the current connection (if any) and reaps finished readers.
    fn retire(link: &mut Link) {
        if let Some(c) = link.conn.take() {
            c.kill(ConnFailure::disconnected("connection replaced"));
        }
        if let Some(h) = link.reader.take() {
            link.retired.push(h);
        }
        let (done, running): (Vec<_>, Vec<_>) =
            link.retired.drain(..).partition(|h| h.is_finished());
        link.retired = running;
        for h in done {
            let _ = h.join();
        }
    }

    /// One request/reply exchange on `conn`.
    fn call(
        &self,
        conn: &Conn,
        req: &Request,
        op: &'static str,
        deadline: Instant,
    ) -> io::Result<(Reply, Option<OwnedFd>)> {
        let tag = self.tag();
        let (tx, rx) = mpsc::sync_channel(1);
        conn.register(tag, req.code(), tx)?;
        let mut msg = Vec::with_capacity(protocol::MAX_MESSAGE_SIZE);
        protocol::encode_request(&mut msg, tag, true, req);
        if let Err(e) = conn.send_message(&msg, op, deadline) {
            conn.unregister(tag);
            return Err(e);
        }
        let outcome = match rx.recv_timeout(remaining(deadline)) {
            Ok(o) => o,
            Err(RecvTimeoutError::Timeout) => {
                conn.unregister(tag);
                // The reply may have raced in after the wait ended.
                match rx.try_recv() {
                    Ok(o) => o,
                    Err(_) => {
                        return Err(ClientError::TimedOut {
                            op,
                            after: self.cfg.timeout,
                        }
                        .into())
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => Err(ConnFailure::disconnected(
                "the reader thread ended without answering",
            )),
        };
        outcome.map_err(|f| f.to_io())
    }

    /// GetBlob on `conn`: the new state of a blob opened there.
    fn open_on(&self, conn: &Conn, id: &str, deadline: Instant) -> io::Result<BlobState> {
        let req = Request::get_blob(conn.generation, id)
            .ok_or_else(|| ClientError::InvalidId(id.to_string()))?;
        match self.call(conn, &req, "GetBlob", deadline)? {
            (
                Reply::GetBlob {
                    token,
                    base,
                    result: 0,
                },
                Some(fd),
            ) => {
                let file = File::from(fd);
                let meta = file.metadata().map_err(|e| {
                    io::Error::new(e.kind(), format!("fstat of the fd of blob {id:?}: {e}"))
                })?;
                if !meta.is_file() {
                    return Err(violation(
                        conn,
                        format!("the fd of blob {id:?} is not a regular file"),
                    ));
                }
                let size = meta.len().checked_sub(base).ok_or_else(|| {
                    violation(
                        conn,
                        format!(
                            "base {base} of blob {id:?} is past its file's end ({})",
                            meta.len()
                        ),
                    )
                })?;
                Ok(BlobState {
                    file: Arc::new(file),
                    token,
                    base,
                    size,
                    conn_id: conn.id,
                    stale: false,
                })
            }
            (Reply::GetBlob { result: 0, .. }, None) => Err(violation(
                conn,
                format!("GetBlob {id:?} succeeded without an fd"),
            )),
            (Reply::GetBlob { result, .. }, _) => Err(ClientError::Refused {
                id: id.to_string(),
                errno: result as i32,
            }
            .into()),
            (other, _) => Err(violation(
                conn,
                format!("{:?} reply to GetBlob", other.code()),
            )),
        }
    }

    /// The blob's state, valid on `conn`: re-opens the blob first if its
    /// token belongs to another connection or was refused.
    fn current(&self, blob: &RemoteBlob, conn: &Conn, deadline: Instant) -> io::Result<BlobState> {
        let s = blob.snapshot();
        if s.conn_id == conn.id && !s.stale {
            return Ok(s);
        }
        let _g = lock(&blob.reopen);
        let s = blob.snapshot();
        if s.conn_id == conn.id && !s.stale {
            return Ok(s);
        }
        let fresh = self.open_on(conn, &blob.id, deadline)?;
        log::debug!(
            "client: re-opened blob {:?} on connection {} (token {:#x})",
            blob.id,
            conn.id,
            fresh.token
        );
        *lock(&blob.state) = fresh.clone();
        Ok(fresh)
    }

    /// FetchRange with transparent re-opening; returns the valid count and
    /// the blob state (fd, base) the range was validated for.
    fn fetch(&self, blob: &RemoteBlob, start: u64, len: u64) -> io::Result<(u64, BlobState)> {
        self.run("FetchRange", |conn, deadline| {
            let mut refused = 0;
            loop {
                let snap = self.current(blob, conn, deadline)?;
                let req = Request::FetchRange {
                    token: snap.token,
                    start,
                    count: len,
                };
                match self.call(conn, &req, "FetchRange", deadline)?.0 {
                    Reply::FetchRange {
                        count,
                        result: protocol::FETCH_OK,
                        ..
                    } => return Ok((count, snap)),
                    Reply::FetchRange {
                        result: protocol::FETCH_FAILED,
                        ..
                    } => return Err(ClientError::FetchFailed { start, len }.into()),
                    Reply::FetchRange {
                        result: protocol::FETCH_GENERATION_MISMATCH,
                        ..
                    } => {
                        refused += 1;
                        if refused > MAX_REOPENS {
                            return Err(violation(
                                conn,
                                format!(
                                    "the daemon refused {refused} fresh tokens of blob {:?}",
                                    blob.id
                                ),
                            ));
                        }
                        let mut s = lock(&blob.state);
                        if s.token == snap.token && s.conn_id == snap.conn_id {
                            s.stale = true;
                        }
                    }
                    Reply::FetchRange { result, .. } => {
                        return Err(violation(
                            conn,
                            format!("FetchRange result {result} is not defined"),
                        ))
                    }
                    other => {
                        return Err(violation(
                            conn,
                            format!("{:?} reply to FetchRange", other.code()),
                        ))
                    }
                }
            }
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let link = self.link.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = link.conn.take() {
            c.kill(ConnFailure::disconnected("client dropped"));
        }
        let handles = link.reader.take().into_iter().chain(link.retired.drain(..));
        for h in handles {
            if h.join().is_err() {
                log::warn!("client reader thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Client>();
        check::<RemoteBlob>();
    }
}
