//! Client library (minimal synchronous version; to be replaced by the
//! multiplexed client of the client-library issue).

use crate::protocol::{self, Reply, Request};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A blob opened with GetBlob: its read-only fd and token.
pub struct RemoteBlob {
    pub fd: std::fs::File,
    pub token: u64,
    pub base: u64,
    pub size: u64,
}

struct Inner {
    sock: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    next_tag: u64,
}

pub struct Client {
    inner: Mutex<Inner>,
}

fn proto_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Client {
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        let sock = UnixStream::connect(path.as_ref())?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            inner: Mutex::new(Inner {
                sock,
                buf: Vec::new(),
                fds: Vec::new(),
                next_tag: 1,
            }),
        })
    }

    fn call(&self, req: &Request) -> io::Result<(Reply, Option<OwnedFd>)> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        let tag = inner.next_tag;
        inner.next_tag += 1;
        let mut out = Vec::new();
        protocol::encode_request(&mut out, tag, true, req);
        inner.sock.write_all(&out)?;
        loop {
            if let Some((t, r, n)) = protocol::decode_reply(&inner.buf).map_err(proto_err)? {
                inner.buf.drain(..n);
                let fd = if r.carries_fd() {
                    if inner.fds.is_empty() {
                        return Err(proto_err("GetBlob reply without an fd"));
                    }
                    Some(inner.fds.remove(0))
                } else {
                    None
                };
                if t == tag {
                    return Ok((r, fd));
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let msg = recvmsg::<()>(
                inner.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            let n = msg.bytes;
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel just gave us this fd; nobody else owns it.
                        inner.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "daemon closed the connection",
                ));
            }
            inner.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn ping(&self) -> io::Result<Duration> {
        let t = Instant::now();
        self.call(&Request::Noop)?;
        Ok(t.elapsed())
    }

    pub fn get_blob(&self, id: &str) -> io::Result<RemoteBlob> {
        let req = Request::get_blob(1, id).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "blob id longer than 255 bytes")
        })?;
        match self.call(&req)? {
            (
                Reply::GetBlob {
                    token,
                    base,
                    result: 0,
                },
                Some(fd),
            ) => {
                let fd = std::fs::File::from(fd);
                let size = fd.metadata()?.len().saturating_sub(base);
                Ok(RemoteBlob {
                    fd,
                    token,
                    base,
                    size,
                })
            }
            (Reply::GetBlob { result, .. }, _) => Err(io::Error::from_raw_os_error(result as i32)),
            _ => Err(proto_err("unexpected reply to GetBlob")),
        }
    }

    pub fn fetch_range(&self, blob: &RemoteBlob, start: u64, len: u64) -> io::Result<u64> {
        let req = Request::FetchRange {
            token: blob.token,
            start,
            count: len,
        };
        match self.call(&req)? {
            (
                Reply::FetchRange {
                    count, result: 0, ..
                },
                _,
            ) => Ok(count),
            (Reply::FetchRange { result, .. }, _) => Err(io::Error::other(format!(
                "FetchRange failed with result {result}"
            ))),
            _ => Err(proto_err("unexpected reply to FetchRange")),
        }
    }

    pub fn read_at(&self, blob: &RemoteBlob, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= blob.size || buf.is_empty() {
            return Ok(0);
        }
        let valid = self.fetch_range(blob, offset, buf.len() as u64)?;
        let n = (valid as usize).min(buf.len());
        blob.fd.read_exact_at(&mut buf[..n], blob.base + offset)?;
        Ok(n)
    }
}
