//! Receiving fds passed with SCM_RIGHTS: the one place the client calls
//! `recvmsg`. The control buffer is sized for the kernel's maximum, every fd
//! arrives close-on-exec (MSG_CMSG_CLOEXEC) and is wrapped in an `OwnedFd` at
//! once, and a truncated control message (MSG_CTRUNC) still has the fds that
//! fit found and owned, so none leaks.

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most fds one `recvmsg` can carry on Linux (SCM_MAX_FD): the control buffer
/// is sized for it, so a truncated control message cannot happen with a
/// well-behaved kernel; it is still handled (and its fds closed) if it does.
pub(super) const MAX_FDS_PER_RECV: usize = 253;

/// What one `recvmsg` brought.
pub(super) struct Received {
    /// Stream bytes read into the data buffer (0 at end of stream).
    pub(super) bytes: usize,
    /// Every fd that arrived with them, owned.
    pub(super) fds: Vec<OwnedFd>,
    /// The control message was truncated (MSG_CTRUNC): fds were lost.
    pub(super) truncated: bool,
}

/// A zeroed control buffer for `max_fds` fds whose length is its capacity
/// (the kernel may fill the whole capacity; the fallback parser reads the
/// length).
pub(super) fn control_buffer(max_fds: usize) -> Vec<u8> {
    let space = nix::cmsg_space!([RawFd; 1]).capacity()
        + max_fds.saturating_sub(1) * std::mem::size_of::<RawFd>();
    let mut v = vec![0u8; space];
    v.resize(v.capacity(), 0);
    v
}

/// One blocking `recvmsg` (retrying EINTR) with MSG_CMSG_CLOEXEC; every fd
/// received is wrapped in an `OwnedFd` before anything else can fail.
pub(super) fn recv_with_fds(
    sock: &UnixStream,
    data: &mut [u8],
    cbuf: &mut Vec<u8>,
) -> io::Result<Received> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::fs::File;
    use std::io::IoSlice;

    fn is_cloexec(fd: &OwnedFd) -> bool {
        let flags =
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD of a received fd");
        flags & nix::libc::FD_CLOEXEC != 0
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
        let flags = nix::fcntl::fcntl(&got.fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0);
    }
}
