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

use crate::protocol::{self, Code, Reply, Request};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, send, ControlMessageOwned, MsgFlags};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
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
/// Most fds one `recvmsg` can carry on Linux (SCM_MAX_FD): the control buffer
/// is sized for it, so a truncated control message cannot happen with a
/// well-behaved kernel; it is still handled (and its fds closed) if it does.
const MAX_FDS_PER_RECV: usize = 253;
/// Bytes asked of each `recvmsg`.
const READ_CHUNK: usize = 16 * 1024;

/// Unique id of every connection made by any client of this process: a
/// [`RemoteBlob`]'s token is only used on the connection that issued it.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// The typed error carried inside the `io::Error`s this module returns; get
/// it with `err.get_ref().and_then(|e| e.downcast_ref::<ClientError>())`.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon could not be reached.
    Connect {
        path: PathBuf,
        attempts: u32,
        source: io::Error,
    },
    /// The call's deadline passed.
    TimedOut { op: &'static str, after: Duration },
    /// The connection broke (daemon gone or restarted) before the reply.
    Disconnected(String),
    /// The daemon sent something that is not a valid reply; the connection
    /// was dropped and is re-established by the next call.
    Protocol(String),
    /// GetBlob was refused with this errno (ENOENT, EINVAL, EIO, EMFILE...).
    Refused { id: String, errno: i32 },
    /// FetchRange answered failure (start past the end, or backend error).
    FetchFailed { start: u64, len: u64 },
    /// The blob id cannot be sent (longer than 255 bytes).
    InvalidId(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect {
                path,
                attempts,
                source,
            } => write!(
                f,
                "cannot connect to {} ({attempts} attempt{}): {source}",
                path.display(),
                if *attempts == 1 { "" } else { "s" }
            ),
            ClientError::TimedOut { op, after } => {
                write!(f, "{op} timed out after {after:?}")
            }
            ClientError::Disconnected(why) => write!(f, "connection to the daemon lost: {why}"),
            ClientError::Protocol(why) => write!(f, "protocol error from the daemon: {why}"),
            ClientError::Refused { id, errno } => write!(
                f,
                "blob {id:?} refused by the daemon: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            ClientError::FetchFailed { start, len } => write!(
                f,
                "daemon failed to fetch {len} bytes at {start} (past the end, or backend error)"
            ),
            ClientError::InvalidId(id) => write!(
                f,
                "blob id of {} bytes is longer than {} bytes",
                id.len(),
                protocol::MAX_BLOB_ID_LEN
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl ClientError {
    fn kind(&self) -> io::ErrorKind {
        match self {
            ClientError::Connect { source, .. } => source.kind(),
            ClientError::TimedOut { .. } => io::ErrorKind::TimedOut,
            ClientError::Disconnected(_) => io::ErrorKind::ConnectionAborted,
            ClientError::Protocol(_) => io::ErrorKind::InvalidData,
            ClientError::Refused { errno, .. } => io::Error::from_raw_os_error(*errno).kind(),
            ClientError::FetchFailed { .. } => io::ErrorKind::Other,
            ClientError::InvalidId(_) => io::ErrorKind::InvalidInput,
        }
    }

    /// The errno of a GetBlob refusal, if `err` is one.
    pub fn refused_errno(err: &io::Error) -> Option<i32> {
        match err.get_ref()?.downcast_ref::<ClientError>()? {
            ClientError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// A reply that breaks the protocol: the connection is dropped (the next
/// call makes a new one) and the caller gets an `InvalidData` error.
fn violation(conn: &Conn, why: String) -> io::Error {
    let f = Failure::protocol(why);
    conn.kill(f.clone());
    f.to_io()
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<ClientError>()),
        Some(ClientError::Disconnected(_))
    )
}

/// Why a connection is dead, copied to every call that was waiting on it.
#[derive(Clone, Debug)]
enum Failure {
    Disconnected(Arc<str>),
    Protocol(Arc<str>),
}

impl Failure {
    fn disconnected(why: impl fmt::Display) -> Failure {
        Failure::Disconnected(why.to_string().into())
    }

    fn protocol(why: impl fmt::Display) -> Failure {
        Failure::Protocol(why.to_string().into())
    }

    fn to_io(&self) -> io::Error {
        match self {
            Failure::Disconnected(s) => ClientError::Disconnected(s.to_string()).into(),
            Failure::Protocol(s) => ClientError::Protocol(s.to_string()).into(),
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its
/// data consistent, and a panicking caller must not wedge the others.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

// ---------------------------------------------------------------------------
// Builder

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
            state: Mutex::new(State {
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

// ---------------------------------------------------------------------------
// Connection

/// What a waiting call receives: its reply (and fd), or why it never came.
type Outcome = Result<(Reply, Option<OwnedFd>), Failure>;

struct Slot {
    code: Code,
    tx: SyncSender<Outcome>,
}

#[derive(Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    dead: Option<Failure>,
}

/// One connection to the daemon, shared by the callers and its reader thread.
struct Conn {
    id: u64,
    generation: u32,
    /// The client's per-call timeout, for error messages.
    timeout: Duration,
    sock: UnixStream,
    write_lock: Mutex<()>,
    pending: Mutex<Pending>,
}

impl Conn {
    fn is_dead(&self) -> bool {
        lock(&self.pending).dead.is_some()
    }

    /// Marks the connection dead (first reason wins), fails every waiting
    /// call and shuts the socket down so that the reader thread wakes up and
    /// exits.
    fn kill(&self, why: Failure) {
        let slots = {
            let mut p = lock(&self.pending);
            if p.dead.is_none() {
                log::debug!("client connection {} dropped: {why:?}", self.id);
                p.dead = Some(why.clone());
            }
            std::mem::take(&mut p.slots)
        };
        for (_, slot) in slots {
            // Capacity 1 and one message per slot: never blocks. A caller
            // that already gave up has dropped its receiver; that's fine.
            let _ = slot.tx.try_send(Err(why.clone()));
        }
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    fn register(&self, tag: u64, code: Code, tx: SyncSender<Outcome>) -> io::Result<()> {
        let mut p = lock(&self.pending);
        if let Some(f) = &p.dead {
            return Err(f.to_io());
        }
        p.slots.insert(tag, Slot { code, tx });
        Ok(())
    }

    fn unregister(&self, tag: u64) {
        lock(&self.pending).slots.remove(&tag);
    }

    /// Hands a reply to the call waiting for `tag`. A reply nobody waits for
    /// (its caller timed out) is dropped, closing its fd.
    fn deliver(&self, tag: u64, reply: Reply, fd: Option<OwnedFd>) -> Result<(), Failure> {
        let slot = lock(&self.pending).slots.remove(&tag);
        let Some(slot) = slot else {
            log::debug!("client: dropping reply to tag {tag} nobody waits for: {reply:?}");
            return Ok(());
        };
        if slot.code != reply.code() {
            let f = Failure::protocol(format!(
                "{:?} reply to a {:?} request (tag {tag})",
                reply.code(),
                slot.code
            ));
            let _ = slot.tx.try_send(Err(f.clone()));
            return Err(f);
        }
        let _ = slot.tx.try_send(Ok((reply, fd)));
        Ok(())
    }

    /// Writes one whole message before `deadline`. A message cut short
    /// leaves the stream unusable, so the connection is killed then.
    fn send_message(&self, msg: &[u8], op: &'static str, deadline: Instant) -> io::Result<()> {
        let _w = lock(&self.write_lock);
        let mut done = 0;
        while done < msg.len() {
            match send(
                self.sock.as_raw_fd(),
                &msg[done..],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    let left = remaining(deadline);
                    if left.is_zero() {
                        if done > 0 {
                            self.kill(Failure::disconnected(
                                "a request was cut short by its timeout",
                            ));
                        }
                        return Err(ClientError::TimedOut {
                            op,
                            after: self.timeout,
                        }
                        .into());
                    }
                    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
                    let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLOUT)];
                    match poll(&mut fds, timeout) {
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(e) => {
                            let f = Failure::disconnected(format!("poll: {e}"));
                            self.kill(f.clone());
                            return Err(f.to_io());
                        }
                    }
                }
                Err(e) => {
                    let f = Failure::disconnected(format!("send: {}", io::Error::from(e)));
                    self.kill(f.clone());
                    return Err(f.to_io());
                }
            }
        }
        Ok(())
    }
}

/// The reader thread: decodes replies and hands each to its caller until the
/// connection ends, then fails whatever is still waiting.
fn reader_main(conn: Arc<Conn>) {
    let why = read_loop(&conn);
    conn.kill(why);
}

/// A received fd and the stream bytes `[start, end)` that arrived with it.
struct ArrivedFd {
    start: u64,
    end: u64,
    fd: OwnedFd,
}

fn read_loop(conn: &Conn) -> Failure {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // Stream offset of buf[0].
    let mut base: u64 = 0;
    let mut fds: VecDeque<ArrivedFd> = VecDeque::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut cbuf = control_buffer(MAX_FDS_PER_RECV);
    loop {
        let got = match recv_with_fds(&conn.sock, &mut chunk, &mut cbuf) {
            Ok(got) => got,
            Err(e) => return Failure::disconnected(format!("recvmsg: {e}")),
        };
        let start = base + buf.len() as u64;
        let end = start + got.bytes as u64;
        for fd in got.fds {
            fds.push_back(ArrivedFd { start, end, fd });
        }
        if got.truncated {
            return Failure::protocol("control message truncated (fds lost)");
        }
        if got.bytes == 0 {
            return Failure::disconnected("the daemon closed the connection");
        }
        buf.extend_from_slice(&chunk[..got.bytes]);
        let mut off = 0usize;
        loop {
            let (tag, reply, used) = match protocol::decode_reply(&buf[off..]) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => return Failure::protocol(format!("malformed reply: {e}")),
            };
            let at = base + off as u64;
            let fd = if reply.carries_fd() {
                // Fds that came with bytes before this reply's first byte
                // belong to no reply: close them.
                while fds.front().is_some_and(|f| f.end <= at) {
                    fds.pop_front();
                }
                match fds.front() {
                    Some(f) if f.start <= at => fds.pop_front().map(|f| f.fd),
                    _ => {
                        return Failure::protocol(format!(
                            "successful GetBlob reply (tag {tag}) without an fd"
                        ))
                    }
                }
            } else {
                None
            };
            off += used;
            if let Err(f) = conn.deliver(tag, reply, fd) {
                return f;
            }
        }
        buf.drain(..off);
        base += off as u64;
        // No reply can start before `base` any more: fds that arrived only
        // with consumed bytes were unexpected. Dropping closes them.
        while fds.front().is_some_and(|f| f.end <= base) {
            fds.pop_front();
        }
    }
}

/// What one `recvmsg` brought.
struct Received {
    bytes: usize,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// A zeroed control buffer for `max_fds` fds whose length is its capacity
/// (the kernel may fill the whole capacity; the fallback parser reads the
/// length).
fn control_buffer(max_fds: usize) -> Vec<u8> {
    let space = nix::cmsg_space!([RawFd; 1]).capacity()
        + max_fds.saturating_sub(1) * std::mem::size_of::<RawFd>();
    let mut v = vec![0u8; space];
    v.resize(v.capacity(), 0);
    v
}

/// One blocking `recvmsg` (retrying EINTR) with MSG_CMSG_CLOEXEC; every fd
/// received is wrapped in an `OwnedFd` before anything else can fail.
fn recv_with_fds(sock: &UnixStream, data: &mut [u8], cbuf: &mut Vec<u8>) -> io::Result<Received> {
    loop {
        cbuf.fill(0);
        let mut iov = [IoSliceMut::new(data)];
        let (bytes, truncated, fds) = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut *cbuf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for fd in raw {
                                // SAFETY: the kernel just installed this fd
                                // in our table for us; nothing else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                (msg.bytes, truncated, fds)
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let fds = if truncated {
            // nix refuses to iterate a truncated control message, but the
            // fds that fit were installed all the same: find and close them.
            scan_rights(cbuf)
        } else {
            fds
        };
        return Ok(Received {
            bytes,
            fds,
            truncated,
        });
    }
}

/// Walks a (zero-initialised, then kernel-filled) control buffer and takes
/// ownership of every fd of its SCM_RIGHTS messages.
fn scan_rights(cbuf: &[u8]) -> Vec<OwnedFd> {
    use nix::libc;
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    // SAFETY: CMSG_LEN / CMSG_SPACE are pure arithmetic.
    let data_off = unsafe { libc::CMSG_LEN(0) } as usize;
    let mut fds = Vec::new();
    let mut at = 0usize;
    while at + hdr <= cbuf.len() {
        // SAFETY: `at + hdr <= cbuf.len()`, and read_unaligned has no
        // alignment requirement; cmsghdr is plain old data.
        let h: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(cbuf.as_ptr().add(at).cast::<libc::cmsghdr>()) };
        let len = h.cmsg_len as usize;
        if len < data_off || at + len > cbuf.len() {
            break;
        }
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            let data = &cbuf[at + data_off..at + len];
            for raw in data.chunks_exact(std::mem::size_of::<RawFd>()) {
                let mut b = [0u8; std::mem::size_of::<RawFd>()];
                b.copy_from_slice(raw);
                let fd = RawFd::from_ne_bytes(b);
                if fd >= 0 {
                    // SAFETY: the kernel installed this fd for us.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: pure arithmetic.
        let step = unsafe { libc::CMSG_SPACE((len - data_off) as libc::c_uint) } as usize;
        at += step.max(1);
    }
    fds
}

/// Connects without ever blocking: a daemon whose listen backlog is full (it
/// is stuck, or swamped) makes a blocking `connect` wait with no deadline;
/// here that is one failed attempt (`WouldBlock`), retried after a backoff.
/// The socket is close-on-exec and left in blocking mode for the reader;
/// writes use MSG_DONTWAIT.
fn connect_socket(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the daemon's listen backlog is full",
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let sock = UnixStream::from(fd);
    sock.set_nonblocking(false)?;
    Ok(sock)
}

// ---------------------------------------------------------------------------
// Blobs

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

// ---------------------------------------------------------------------------
// Client

struct State {
    conn: Option<Arc<Conn>>,
    reader: Option<JoinHandle<()>>,
    /// Reader threads of replaced connections, joined once they exit.
    retired: Vec<JoinHandle<()>>,
    generation: u32,
}

/// A thread-safe, multiplexed client; share it with `Arc<Client>`.
pub struct Client {
    path: PathBuf,
    cfg: ClientBuilder,
    next_tag: AtomicU64,
    state: Mutex<State>,
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
        let (valid, snap) = self.fetch(blob, offset, want)?;
        let n = valid.min(want) as usize;
        if n == 0 {
            return Err(ClientError::Protocol(format!(
                "FetchRange at {offset} of a {size}-byte blob reported no valid bytes"
            ))
            .into());
        }
        let pos = snap.base.checked_add(offset).ok_or_else(|| {
            ClientError::Protocol(format!("base {} + offset {offset} overflows", snap.base))
        })?;
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
        let mut st = lock(&self.state);
        if let Some(c) = &st.conn {
            if !c.is_dead() {
                return Ok(c.clone());
            }
        }
        Self::retire(&mut st);
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
                    st.generation = st.generation.wrapping_add(1).max(1);
                    let conn = Arc::new(Conn {
                        id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                        generation: st.generation,
                        timeout: self.cfg.timeout,
                        sock,
                        write_lock: Mutex::new(()),
                        pending: Mutex::new(Pending::default()),
                    });
                    let for_reader = conn.clone();
                    let reader = std::thread::Builder::new()
                        .name("blobmgr-client".into())
                        .spawn(move || reader_main(for_reader))
                        .map_err(|e| {
                            io::Error::new(e.kind(), format!("spawn client reader thread: {e}"))
                        })?;
                    log::debug!(
                        "client: connected to {} (connection {}, generation {})",
                        self.path.display(),
                        conn.id,
                        conn.generation
                    );
                    st.conn = Some(conn.clone());
                    st.reader = Some(reader);
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
    fn retire(st: &mut State) {
        if let Some(c) = st.conn.take() {
            c.kill(Failure::disconnected("connection replaced"));
        }
        if let Some(h) = st.reader.take() {
            st.retired.push(h);
        }
        let (done, running): (Vec<_>, Vec<_>) = st.retired.drain(..).partition(|h| h.is_finished());
        st.retired = running;
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
            Err(RecvTimeoutError::Disconnected) => Err(Failure::disconnected(
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
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = st.conn.take() {
            c.kill(Failure::disconnected("client dropped"));
        }
        let handles = st.reader.take().into_iter().chain(st.retired.drain(..));
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
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;

    fn is_cloexec(fd: &OwnedFd) -> bool {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD)
            .expect("F_GETFD of a received fd");
        flags & nix::libc::FD_CLOEXEC != 0
    }

    #[test]
    fn client_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Client>();
        check::<RemoteBlob>();
    }

    #[test]
    fn truncated_control_message_closes_the_fds_that_fit() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<File> = (0..3).map(|_| File::open("/dev/null").unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut data = [0u8; 16];
        let mut cbuf = control_buffer(1);
        let got = recv_with_fds(&b, &mut data, &mut cbuf).unwrap();
        assert_eq!(got.bytes, 1);
        assert!(got.truncated, "a 1-fd buffer must truncate 3 fds");
        // Linux installs as many fds as fit in the buffer: all of them must
        // be owned (hence closed on drop), and close-on-exec.
        // SAFETY: pure arithmetic.
        let hdr = unsafe { nix::libc::CMSG_LEN(0) } as usize;
        let fit = ((cbuf.len() - hdr) / std::mem::size_of::<RawFd>()).min(3);
        assert!(fit >= 1);
        assert_eq!(got.fds.len(), fit, "fds that fit were not all taken");
        assert!(got.fds.iter().all(is_cloexec));
    }

    #[test]
    fn fds_arrive_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = File::open("/dev/null").unwrap();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"y")],
            &[ControlMessage::ScmRights(&[f.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut data = [0u8; 16];
        let mut cbuf = control_buffer(MAX_FDS_PER_RECV);
        let got = recv_with_fds(&b, &mut data, &mut cbuf).unwrap();
        assert!(!got.truncated);
        assert_eq!(got.fds.len(), 1);
        let flags =
            nix::fcntl::fcntl(got.fds[0].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn errors_are_typed() {
        let e: io::Error = ClientError::Refused {
            id: "x".into(),
            errno: 2,
        }
        .into();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(ClientError::refused_errno(&e), Some(2));
        let t: io::Error = ClientError::TimedOut {
            op: "Noop",
            after: Duration::from_secs(1),
        }
        .into();
        assert_eq!(t.kind(), io::ErrorKind::TimedOut);
        assert!(!is_disconnect(&t));
        assert!(is_disconnect(&Failure::disconnected("x").to_io()));
    }
}
