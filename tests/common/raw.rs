//! A raw protocol client that sees exactly what the daemon sends, and bytes
//! built by hand for what a well-behaved client would never send.

use super::wait::wait_until;
use blobmgr::protocol::{self, Reply, Request, HEADER_SIZE};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::fs::File;
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a [`Raw`] waits for a reply before `recv` fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A blocking raw-protocol connection that keeps every fd it receives in
/// arrival order (`fds`). The panicking calls (`call`, `get_blob`, `fetch`,
/// `open`) are for tests where the daemon must answer; the `try_*` ones
/// return errors, for tests where it may be gone.
pub struct Raw {
    pub sock: UnixStream,
    buf: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    next_tag: u64,
}

/// A blob opened with GetBlob: its token, the cache file it came with, and
/// where the blob's bytes start in that file.
pub struct Blob {
    pub token: u64,
    pub file: File,
    pub base: u64,
}

impl Blob {
    /// The blob's size, from the cache file's.
    pub fn size(&self) -> u64 {
        self.file.metadata().expect("fstat").len() - self.base
    }

    /// `len` bytes of the blob at `start`, read through the passed fd.
    pub fn read(&self, start: u64, len: u64) -> Vec<u8> {
        pread(&self.file, self.base + start, len)
    }
}

/// Reads `[start, start + len)` of a file (typically a passed cache fd).
pub fn pread(fd: &File, start: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    fd.read_exact_at(&mut v, start)
        .expect("pread through the passed fd");
    v
}

/// A 20-byte request header with arbitrary field values.
pub fn header(tag: u64, code: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_SIZE);
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&code.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v
}

/// Bytes written to `sock` that its peer has not read yet (`SIOCOUTQ`: for
/// a Unix stream socket the kernel counts sent data until the receiver
/// consumes it).
pub fn unread_by_peer(sock: &UnixStream) -> usize {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer.
    let r = unsafe { nix::libc::ioctl(sock.as_raw_fd(), nix::libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "ioctl SIOCOUTQ: {}", io::Error::last_os_error());
    n as usize
}

impl Raw {
    /// GetBlob (generation 1) that must succeed.
    pub fn open_ok(&mut self, id: &str) -> Blob {
        self.open(1, id)
            .unwrap_or_else(|e| panic!("GetBlob {id}: errno {e}"))
    }

    /// FetchRange of `[start, start + len)` through `b`, which must succeed,
    /// then the bytes read through its fd compared with `expect`.
    pub fn fetch_check(&mut self, b: &Blob, expect: &[u8], start: u64, len: u64) {
        let end = (start + len).min(expect.len() as u64);
        assert_eq!(
            self.fetch(b.token, start, len),
            (end - start, 0),
            "FetchRange [{start}, +{len})"
        );
        assert!(
            b.read(start, end - start) == expect[start as usize..end as usize],
            "bytes differ in [{start}, {end})"
        );
    }

    pub fn connect(path: &Path) -> Raw {
        Raw::try_connect(path).expect("connect")
    }

    /// Like [`Raw::connect`], but returns the error instead of panicking.
    pub fn try_connect(path: &Path) -> io::Result<Raw> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Raw {
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
            next_tag: 1,
        })
    }

    pub fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// Sends `req` with NEED_REPLY (or not); returns its tag.
    pub fn send(&mut self, req: &Request, need_reply: bool) -> u64 {
        self.try_send(req, need_reply).expect("send")
    }

    /// Like [`Raw::send`], but a failed write is an error.
    pub fn try_send(&mut self, req: &Request, need_reply: bool) -> io::Result<u64> {
        let tag = self.tag();
        let mut out = Vec::new();
        protocol::encode_request(&mut out, tag, need_reply, req);
        self.sock.write_all(&out)?;
        Ok(tag)
    }

    pub fn send_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.sock.write_all(b)
    }

    /// Writes `b` one byte at a time, each only once the daemon has read
    /// the one before (see [`unread_by_peer`]): the daemon sees every byte in
    /// a read of its own.
    pub fn send_trickled(&mut self, b: &[u8]) {
        for (i, byte) in b.iter().enumerate() {
            self.sock.write_all(&[*byte]).expect("send one byte");
            assert!(
                wait_until(Duration::from_secs(10), || unread_by_peer(&self.sock) == 0),
                "the daemon did not read byte {i} of {} within 10 s",
                b.len()
            );
        }
    }

    /// Receives the next reply, or an error on EOF/timeout/garbage.
    pub fn recv(&mut self) -> io::Result<(u64, Reply)> {
        loop {
            match protocol::decode_reply(&self.buf) {
                Ok(Some((tag, r, n))) => {
                    self.buf.drain(..n);
                    return Ok((tag, r));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let mut chunk = [0u8; 8192];
            let mut space = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                // With a receive timeout set, the kernel does not restart
                // recvmsg after a signal.
                Err(nix::errno::Errno::EINTR) => continue,
                r => r?,
            };
            let n = msg.bytes;
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: freshly received from the kernel, owned by nobody else.
                        self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One request, one reply (with its tag checked).
    pub fn call(&mut self, req: &Request) -> Reply {
        let tag = self.send(req, true);
        let (t, r) = self.recv().expect("reply");
        assert_eq!(t, tag, "reply to another request");
        r
    }

    /// Like [`Raw::call`], but every failure (send, EOF, timeout, garbage, a
    /// reply to another tag) is an error instead of a panic.
    pub fn try_call(&mut self, req: &Request) -> io::Result<Reply> {
        let tag = self.try_send(req, true)?;
        let (t, r) = self.recv()?;
        if t != tag {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply to tag {t}, expected {tag}"),
            ));
        }
        Ok(r)
    }

    /// GetBlob; returns (token, result) and the fd when one came.
    pub fn get_blob(&mut self, generation: u32, id: &str) -> (u64, u32, Option<OwnedFd>) {
        self.try_get_blob(generation, id).expect("GetBlob reply")
    }

    /// GetBlob without panics: (token, result, fd).
    pub fn try_get_blob(
        &mut self,
        generation: u32,
        id: &str,
    ) -> io::Result<(u64, u32, Option<OwnedFd>)> {
        let before = self.fds.len();
        let req = Request::get_blob(generation, id).expect("id fits");
        match self.try_call(&req)? {
            Reply::GetBlob { token, result, .. } => {
                let fd = if self.fds.len() > before {
                    Some(self.fds.remove(before))
                } else {
                    None
                };
                Ok((token, result, fd))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// GetBlob: the blob, or the result the daemon answered instead. Checks
    /// that exactly one fd comes with a success and none with an error.
    pub fn open(&mut self, generation: u32, id: &str) -> Result<Blob, u32> {
        let before = self.fds.len();
        match self.call(&Request::get_blob(generation, id).expect("id fits")) {
            Reply::GetBlob {
                token,
                base,
                result: 0,
            } => {
                assert_eq!(
                    self.fds.len(),
                    before + 1,
                    "GetBlob {id}: success without an fd"
                );
                Ok(Blob {
                    token,
                    file: File::from(self.fds.remove(before)),
                    base,
                })
            }
            Reply::GetBlob { result, .. } => {
                assert_eq!(
                    self.fds.len(),
                    before,
                    "GetBlob {id}: an fd came with error {result}"
                );
                Err(result)
            }
            other => panic!("GetBlob {id}: unexpected reply {other:?}"),
        }
    }

    /// FetchRange; returns (count, result).
    pub fn fetch(&mut self, token: u64, start: u64, count: u64) -> (u64, u32) {
        self.try_fetch(token, start, count)
            .expect("FetchRange reply")
    }

    /// FetchRange without panics: (count, result).
    pub fn try_fetch(&mut self, token: u64, start: u64, count: u64) -> io::Result<(u64, u32)> {
        match self.try_call(&Request::FetchRange {
            token,
            start,
            count,
        })? {
            Reply::FetchRange {
                count,
                result,
                token: t,
            } if t == token => Ok((count, result)),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// Whether the daemon has closed this connection (EOF within `wait`).
    pub fn is_closed(&mut self, wait: Duration) -> bool {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let r = matches!(self.recv(), Err(e) if e.kind() == io::ErrorKind::UnexpectedEof
            || e.kind() == io::ErrorKind::ConnectionReset);
        self.sock.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        r
    }
}
