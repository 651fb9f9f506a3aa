//! One client connection: a nonblocking Unix stream, the tail of a message
//! that has not fully arrived, and the replies not yet written.
//!
//! Input is read into a buffer the reactor lends (so an idle connection owns
//! no buffer at all); only the bytes of an incomplete message are kept here,
//! and decoding resumes from them on the next read. Output is queued as bytes
//! plus, for each reply that carries a file descriptor, the offset of that
//! reply's first byte: the descriptor is sent with exactly that byte, once.

use crate::protocol::{self, Message, ProtocolError, Reply};
use mio::net::UnixStream;
use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, MsgFlags};
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Who is on the other end, from SO_PEERCRED at accept time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} uid {}", self.pid, self.uid)
    }
}

impl Peer {
    /// Reads the credentials of the process that connected `stream`.
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        let cred = socket::getsockopt(stream, socket::sockopt::PeerCredentials)?;
        Ok(Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        })
    }
}

/// Why a connection is being closed.
#[derive(Debug)]
pub enum ConnError {
    /// The peer sent bytes that are not a valid request.
    Protocol(ProtocolError),
    /// Reading or writing the socket failed.
    Io(io::Error),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Protocol(e) => write!(f, "malformed message: {e}"),
            ConnError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl std::error::Error for ConnError {}

/// A connection's id: its slot in the reactor's table and that slot's
/// generation, so the id of a closed connection never names the connection
/// that reused its slot. It is also the event id a host loop passes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId(usize);

impl ConnId {
    /// Bits of the id that hold the slot.
    pub const KEY_BITS: u32 = 24;
    /// Largest slot an id can hold.
    pub const MAX_KEY: usize = (1 << Self::KEY_BITS) - 1;
    /// Generations wrap below this, leaving the top ids free for the
    /// listener and other fixed event ids.
    pub const GENERATION_LIMIT: usize = usize::MAX >> (Self::KEY_BITS + 2);

    pub fn new(generation: usize, key: usize) -> ConnId {
        debug_assert!(key <= Self::MAX_KEY && generation < Self::GENERATION_LIMIT);
        ConnId(generation << Self::KEY_BITS | key)
    }

    /// The id a host passed back as an event id.
    pub fn from_event(id: usize) -> ConnId {
        ConnId(id)
    }

    /// The event id to register the connection's fd with.
    pub fn event(self) -> usize {
        self.0
    }

    /// The connection's slot.
    pub fn key(self) -> usize {
        self.0 & Self::MAX_KEY
    }

    pub fn generation(self) -> usize {
        self.0 >> Self::KEY_BITS
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// What one call to [`Connection::read_messages`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// Some bytes arrived (and any complete messages were decoded).
    Data,
    /// Nothing more to read for now.
    WouldBlock,
    /// The peer closed its end.
    Eof,
}

/// A connection's socket and buffers. The reactor owns one per client.
pub struct Connection {
    stream: UnixStream,
    peer: Peer,
    /// Bytes of a message whose end has not arrived yet.
    partial: Vec<u8>,
    /// Encoded replies; `out[out_pos..]` is still to be written.
    out: Vec<u8>,
    out_pos: usize,
    /// Fds to send, each with the offset in `out` of its reply's first byte.
    out_fds: VecDeque<(usize, Arc<OwnedFd>)>,
    /// Whether the socket is currently registered for WRITABLE.
    pub(crate) write_registered: bool,
    /// The last read emptied the receive queue: it returned less than the
    /// buffer and stopped at no fd-carrying message.
    drained: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, peer: Peer) -> Connection {
        Connection {
            stream,
            peer,
            partial: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            out_fds: VecDeque::new(),
            write_registered: false,
            drained: false,
        }
    }

    pub fn peer(&self) -> Peer {
        self.peer
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Performs one read into `scratch` and appends every complete message to
    /// `msgs`; the tail of an incomplete one is kept for the next call.
    pub fn read_messages(
        &mut self,
        scratch: &mut [u8],
        msgs: &mut Vec<Message>,
    ) -> Result<ReadStatus, ConnError> {
        // recvmsg without a control buffer: like read(2) (fds sent to us
        // are discarded by the kernel), but MSG_CTRUNC tells when the read
        // stopped at a message that carried fds, with more bytes behind it.
        self.drained = false;
        let (n, flags) = loop {
            let mut iov = [IoSliceMut::new(scratch)];
            match socket::recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, None, MsgFlags::empty())
            {
                Ok(m) if m.bytes == 0 => return Ok(ReadStatus::Eof),
                Ok(m) => break (m.bytes, m.flags),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(ReadStatus::WouldBlock),
                Err(e) => return Err(ConnError::Io(e.into())),
            }
        };
        // A stream read returns less than asked only once the queue is
        // empty (or at an fd-carrying message, or at an out-of-band mark).
        self.drained = n < scratch.len() && !flags.contains(MsgFlags::MSG_CTRUNC);
        if self.partial.is_empty() {
            let used = decode_all(&scratch[..n], msgs)?;
            if used < n {
                self.partial.extend_from_slice(&scratch[used..n]);
            }
        } else {
            self.partial.extend_from_slice(&scratch[..n]);
            let used = decode_all(&self.partial, msgs)?;
            self.partial.drain(..used);
            if self.partial.is_empty() {
                // An idle connection keeps no input buffer.
                self.partial = Vec::new();
            } else if self.partial.capacity() > 2 * protocol::MAX_MESSAGE_SIZE {
                // What is left is less than one message.
                self.partial.shrink_to(protocol::MAX_MESSAGE_SIZE);
            }
        }
        Ok(ReadStatus::Data)
    }

    /// Whether the last [`Connection::read_messages`] that returned
    /// [`ReadStatus::Data`] emptied the socket's receive queue. With
    /// edge-triggered readiness, bytes that arrive later bring a new edge,
    /// so the caller may skip the read that would only return WouldBlock.
    pub fn drained(&self) -> bool {
        self.drained
    }

    /// Queues `reply` to request `tag`; `fd` must be given exactly when the
    /// reply carries one.
    pub fn queue_reply(&mut self, tag: u64, reply: &Reply, fd: Option<Arc<OwnedFd>>) {
        debug_assert_eq!(reply.carries_fd(), fd.is_some());
        if let Some(fd) = fd {
            self.out_fds.push_back((self.out.len(), fd));
        }
        protocol::encode_reply(&mut self.out, tag, reply);
    }

    /// Bytes queued and not yet written.
    pub fn pending_output(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Writes queued output until it is all sent or the socket is full.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while self.out_pos < self.out.len() {
            // A write never crosses the start of a reply that carries an fd,
            // so each fd arrives with its own reply's first byte.
            let (fd, end) = match self.out_fds.front() {
                Some((at, fd)) if *at == self.out_pos => {
                    let end = self.out_fds.get(1).map_or(self.out.len(), |n| n.0);
                    (Some(fd.as_raw_fd()), end)
                }
                Some((at, _)) => (None, *at),
                None => (None, self.out.len()),
            };
            let bytes = &self.out[self.out_pos..end];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            let sock = self.stream.as_raw_fd();
            let res = match fd {
                Some(fd) => socket::sendmsg::<()>(
                    sock,
                    &[IoSlice::new(bytes)],
                    &[ControlMessage::ScmRights(&[fd])],
                    flags,
                    None,
                ),
                None => socket::send(sock, bytes, flags),
            };
            match res {
                Ok(n) => {
                    if fd.is_some() {
                        // Sent (n > 0 for a non-empty buffer): never again.
                        self.out_fds.pop_front();
                    }
                    self.out_pos += n;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(ConnError::Io(e.into())),
            }
        }
        if self.out_pos == self.out.len() {
            self.out_pos = 0;
            self.out.clear();
            if self.out.capacity() > 64 * 1024 {
                self.out = Vec::new();
            }
        } else if self.out_pos > 64 * 1024 {
            // Keep the unsent tail at the front so the buffer does not creep.
            self.out.drain(..self.out_pos);
            for (at, _) in self.out_fds.iter_mut() {
                *at -= self.out_pos;
            }
            self.out_pos = 0;
        }
        Ok(())
    }

    /// Approximate heap bytes held by this connection's buffers.
    pub fn buffered_bytes(&self) -> usize {
        self.partial.capacity() + self.out.capacity()
    }
}

/// Decodes every complete message at the front of `buf`, returning the bytes
/// used.
fn decode_all(buf: &[u8], msgs: &mut Vec<Message>) -> Result<usize, ConnError> {
    let mut used = 0;
    while let Some((m, n)) = protocol::decode_request(&buf[used..]).map_err(ConnError::Protocol)? {
        msgs.push(m);
        used += n;
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_request, Request};
    use std::io::Write;

    fn pair() -> (Connection, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(UnixStream::from_std(a), Peer::default()), b)
    }

    #[test]
    fn header_one_byte_per_read() {
        let (mut c, mut peer) = pair();
        let mut wire = Vec::new();
        encode_request(&mut wire, 9, true, &Request::get_blob(3, "abc").unwrap());
        let mut scratch = vec![0u8; 4096];
        let mut msgs = Vec::new();
        for b in &wire {
            peer.write_all(&[*b]).unwrap();
            assert_eq!(
                c.read_messages(&mut scratch, &mut msgs).unwrap(),
                ReadStatus::Data
            );
        }
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].request, Request::get_blob(3, "abc").unwrap());
        assert_eq!(c.buffered_bytes(), 0, "no input buffer kept once idle");
        assert_eq!(
            c.read_messages(&mut scratch, &mut msgs).unwrap(),
            ReadStatus::WouldBlock
        );
        drop(peer);
        // The hang-up is seen once every copy of the peer's fd is closed: a
        // process another test forks may hold one until it execs, so wait
        // for the socket to report it instead of reading at once.
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(c.stream()),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        assert_eq!(
            c.read_messages(&mut scratch, &mut msgs).unwrap(),
            ReadStatus::Eof
        );
    }

    #[test]
    fn invalid_header_is_an_error() {
        let (mut c, mut peer) = pair();
        peer.write_all(&[0u8; 20]).unwrap();
        let mut msgs = Vec::new();
        let err = c.read_messages(&mut [0u8; 64], &mut msgs).unwrap_err();
        assert!(matches!(
            err,
            ConnError::Protocol(ProtocolError::UnknownCode(_))
                | ConnError::Protocol(ProtocolError::ZeroTag)
        ));
    }

    #[test]
    fn fd_travels_with_its_reply_across_partial_writes() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned};
        use std::io::IoSliceMut;
        let (mut c, peer) = pair();
        // Shrink the send buffer so the queue needs many writes.
        socket::setsockopt(c.stream(), socket::sockopt::SndBuf, &4096).unwrap();
        let file = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let mut expected_fds = 0;
        for i in 0..2000u64 {
            if i % 7 == 0 {
                let r = Reply::GetBlob {
                    token: i,
                    base: 0,
                    result: 0,
                };
                c.queue_reply(i + 1, &r, Some(file.clone()));
                expected_fds += 1;
            } else {
                c.queue_reply(i + 1, &Reply::Noop, None);
            }
        }
        let total = c.pending_output();
        let mut got = Vec::new();
        let mut fds_with_first_byte = Vec::new();
        let mut buf = vec![0u8; 1000];
        while got.len() < total {
            c.flush().unwrap();
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                peer.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .unwrap();
            let n = msg.bytes;
            for cmsg in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    assert_eq!(fds.len(), 1, "one fd per sendmsg");
                    for fd in fds {
                        nix::unistd::close(fd).unwrap();
                        fds_with_first_byte.push(got.len());
                    }
                }
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(fds_with_first_byte.len(), expected_fds);
        // Every fd arrived in the read holding the start of a GetBlob reply.
        let mut at = 0;
        let mut starts = Vec::new();
        while let Some((_, r, n)) = protocol::decode_reply(&got[at..]).unwrap() {
            if r.carries_fd() {
                starts.push(at);
            }
            at += n;
        }
        assert_eq!(at, total);
        assert_eq!(starts.len(), expected_fds);
        for (start, arrived_at) in starts.iter().zip(&fds_with_first_byte) {
            assert!(*arrived_at <= *start, "fd came after its reply began");
        }
    }
}
