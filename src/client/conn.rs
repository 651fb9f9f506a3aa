//! One multiplexed connection to the daemon ([`Conn`]) and its reader thread.
//!
//! Callers register a one-shot slot under a fresh tag, write their whole
//! request under a short write lock and wait on their slot; the reader thread
//! decodes replies, pairs each successful GetBlob reply with the fd that
//! arrived with its first byte, and hands every reply to the slot of its tag.
//! When the connection ends, every call still waiting gets the reason.

use super::error::{ClientError, ConnFailure};
use super::fds::{control_buffer, recv_with_fds, MAX_FDS_PER_RECV};
use super::{lock, remaining};
use crate::protocol::{self, Code, Reply};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes asked of each `recvmsg`.
const READ_CHUNK: usize = 16 * 1024;

/// Unique id of every connection made by any client of this process: a
/// [`RemoteBlob`](super::RemoteBlob)'s token is only used on the connection
/// that issued it.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// What a waiting call receives: its reply (and fd), or why it never came.
pub(super) type Outcome = Result<(Reply, Option<OwnedFd>), ConnFailure>;

/// A call waiting for its reply: the request's code, which the reply must
/// match, and where to send the outcome.
struct Slot {
    code: Code,
    tx: SyncSender<Outcome>,
}

/// The calls waiting on a connection, by tag, and why it died (once it has).
#[derive(Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    dead: Option<ConnFailure>,
}

/// One connection to the daemon, shared by the callers and its reader thread.
pub(super) struct Conn {
    /// Unique in this process (see `NEXT_CONN_ID`).
    pub(super) id: u64,
    /// The generation GetBlob requests carry on this connection.
    pub(super) generation: u32,
    /// The client's per-call timeout, for error messages.
    timeout: Duration,
    sock: UnixStream,
    write_lock: Mutex<()>,
    pending: Mutex<Pending>,
}

impl Conn {
    /// Wraps a connected socket and starts its reader thread (named
    /// `blobmgr-client`).
    pub(super) fn start(
        sock: UnixStream,
        generation: u32,
        timeout: Duration,
    ) -> io::Result<(Arc<Conn>, JoinHandle<()>)> {
        let conn = Arc::new(Conn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            generation,
            timeout,
            sock,
            write_lock: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
        });
        let for_reader = conn.clone();
        let reader = std::thread::Builder::new()
            .name("blobmgr-client".into())
            .spawn(move || reader_main(for_reader))
            .map_err(|e| io::Error::new(e.kind(), format!("spawn client reader thread: {e}")))?;
        Ok((conn, reader))
    }

    /// Whether the connection was killed (the next call makes a new one).
    pub(super) fn is_dead(&self) -> bool {
        lock(&self.pending).dead.is_some()
    }

    /// Marks the connection dead (first reason wins), fails every waiting
    /// call and shuts the socket down so that the reader thread wakes up and
    /// exits.
    pub(super) fn kill(&self, why: ConnFailure) {
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

    /// Makes `tx` receive the outcome of the request `tag` (of kind `code`);
    /// fails if the connection is already dead.
    pub(super) fn register(&self, tag: u64, code: Code, tx: SyncSender<Outcome>) -> io::Result<()> {
        let mut p = lock(&self.pending);
        if let Some(f) = &p.dead {
            return Err(f.to_io());
        }
        p.slots.insert(tag, Slot { code, tx });
        Ok(())
    }

    /// Forgets the slot of `tag` (its caller stopped waiting).
    pub(super) fn unregister(&self, tag: u64) {
        lock(&self.pending).slots.remove(&tag);
    }

    /// Hands a reply to the call waiting for `tag`. A reply nobody waits for
    /// (its caller timed out) is dropped, closing its fd.
    fn deliver(&self, tag: u64, reply: Reply, fd: Option<OwnedFd>) -> Result<(), ConnFailure> {
        let slot = lock(&self.pending).slots.remove(&tag);
        let Some(slot) = slot else {
            log::debug!("client: dropping reply to tag {tag} nobody waits for: {reply:?}");
            return Ok(());
        };
        if slot.code != reply.code() {
            let f = ConnFailure::protocol(format!(
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
    pub(super) fn send_message(
        &self,
        msg: &[u8],
        op: &'static str,
        deadline: Instant,
    ) -> io::Result<()> {
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
                            self.kill(ConnFailure::disconnected(
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
                            let f = ConnFailure::disconnected(format!("poll: {e}"));
                            self.kill(f.clone());
                            return Err(f.to_io());
                        }
                    }
                }
                Err(e) => {
                    let f = ConnFailure::disconnected(format!("send: {}", io::Error::from(e)));
                    self.kill(f.clone());
                    return Err(f.to_io());
                }
            }
        }
        Ok(())
    }
}

/// A reply that breaks the protocol: the connection is dropped (the next
/// call makes a new one) and the caller gets an `InvalidData` error.
pub(super) fn violation(conn: &Conn, why: String) -> io::Error {
    let f = ConnFailure::protocol(why);
    conn.kill(f.clone());
    f.to_io()
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

/// Reads and delivers replies until the connection ends; returns why.
fn read_loop(conn: &Conn) -> ConnFailure {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // Stream offset of buf[0].
    let mut base: u64 = 0;
    let mut fds: VecDeque<ArrivedFd> = VecDeque::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut cbuf = control_buffer(MAX_FDS_PER_RECV);
    loop {
        let got = match recv_with_fds(&conn.sock, &mut chunk, &mut cbuf) {
            Ok(got) => got,
            Err(e) => return ConnFailure::disconnected(format!("recvmsg: {e}")),
        };
        let start = base + buf.len() as u64;
        let end = start + got.bytes as u64;
        for fd in got.fds {
            fds.push_back(ArrivedFd { start, end, fd });
        }
        if got.truncated {
            return ConnFailure::protocol("control message truncated (fds lost)");
        }
        if got.bytes == 0 {
            return ConnFailure::disconnected("the daemon closed the connection");
        }
        buf.extend_from_slice(&chunk[..got.bytes]);
        let mut off = 0usize;
        loop {
            let (tag, reply, used) = match protocol::decode_reply(&buf[off..]) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => return ConnFailure::protocol(format!("malformed reply: {e}")),
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
                        return ConnFailure::protocol(format!(
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

/// Connects without ever blocking: a daemon whose listen backlog is full (it
/// is stuck, or swamped) makes a blocking `connect` wait with no deadline;
/// here that is one failed attempt (`WouldBlock`), retried after a backoff.
/// The socket is close-on-exec and left in blocking mode for the reader;
/// writes use MSG_DONTWAIT.
pub(super) fn connect_socket(path: &Path) -> io::Result<UnixStream> {
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
