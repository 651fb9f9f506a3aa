//! A fake service manager's notification socket (`NOTIFY_SOCKET`) that
//! records who sent each message: `SO_PASSCRED` makes the kernel attach the
//! sender's pid (`SCM_CREDENTIALS`), as systemd reads it to decide whose
//! message it is (`NotifyAccess=`) and which process a `MAINPID=` came from.

use super::daemon::DAEMON_WAIT;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// One notification: the sender's pid and the datagram's text.
#[derive(Debug, Clone)]
pub struct Note {
    pub pid: i32,
    pub text: String,
}

impl Note {
    /// Whether the message has the line `line` (e.g. `READY=1`).
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }
}

/// The bound socket; each [`NotifySink::recv`] waits at most
/// [`DAEMON_WAIT`].
pub struct NotifySink {
    sock: UnixDatagram,
    pub path: PathBuf,
}

impl NotifySink {
    /// Binds `path` with `SO_PASSCRED`.
    pub fn bind(path: &Path) -> NotifySink {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        setsockopt(&sock, sockopt::PassCred, &true).expect("SO_PASSCRED");
        sock.set_read_timeout(Some(DAEMON_WAIT))
            .expect("read timeout");
        NotifySink {
            sock,
            path: path.to_path_buf(),
        }
    }

    /// The next notification, or `None` when none came within
    /// [`DAEMON_WAIT`].
    pub fn recv(&self) -> Option<Note> {
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let (n, pid) = {
            let msg = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .ok()?;
            let pid = msg.cmsgs().ok()?.find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(u) => Some(u.pid()),
                _ => None,
            });
            (msg.bytes, pid.expect("SCM_CREDENTIALS with SO_PASSCRED"))
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        Some(Note { pid, text })
    }

    /// Receives until a notification satisfies `until`; returns every one
    /// received, that one last. Panics (with what came and `log`) when
    /// [`DAEMON_WAIT`] passes without one.
    pub fn until(
        &self,
        what: &str,
        log: impl Fn() -> String,
        until: impl Fn(&Note) -> bool,
    ) -> Vec<Note> {
        let mut seen = Vec::new();
        loop {
            let Some(note) = self.recv() else {
                panic!(
                    "no {what} within {DAEMON_WAIT:?}; received {seen:?}\nlog:\n{}",
                    log()
                );
            };
            let done = until(&note);
            seen.push(note);
            if done {
                return seen;
            }
        }
    }
}
