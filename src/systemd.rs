//! systemd's service protocols, in a few lines over std and nix:
//!
//! - socket activation (`sd_listen_fds(3)`): `LISTEN_PID` (must be our pid),
//!   `LISTEN_FDS` (how many fds, from fd 3 on), `LISTEN_FDNAMES` (their
//!   names, `:`-separated, optional): [`ListenFds`];
//! - notification (`sd_notify(3)`): `NOTIFY_SOCKET` (a datagram socket, a
//!   path or `@abstract`): [`Notifier`]; the watchdog's `WATCHDOG_USEC` and
//!   `WATCHDOG_PID`: [`watchdog_interval`] and [`Watchdog`].
//!
//! Each `take`/`from_env` call removes its variables from the environment, as
//! `sd_listen_fds(1)` and friends do, so the processes the daemon starts
//! (credential helpers) neither act on them nor inherit sockets by
//! accident. Call them before any other thread exists:
//! `std::env::remove_var` is not safe against concurrent readers.

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use std::env;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The first fd a service manager passes.
pub const LISTEN_FDS_START: RawFd = 3;

/// The most fds `LISTEN_FDS` may pass. blobmgr uses two (the socket and the
/// work dir lock); the bound only keeps a bogus count from sizing an
/// allocation (`usize::MAX` overflows a `Vec`'s capacity, a few billion
/// aborts on allocation) before a single fd was checked.
pub const MAX_LISTEN_FDS: usize = 4096;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Reads and removes environment variable `name`.
fn take_var(name: &str) -> Option<String> {
    let v = env::var(name).ok();
    env::remove_var(name);
    v
}

/// How many fds `LISTEN_PID`/`LISTEN_FDS` pass to process `me`: 0 when the
/// variables are missing or meant for another process. A count above
/// [`MAX_LISTEN_FDS`] is an error naming the variable, found before anything
/// is sized by it.
fn listen_count(pid: Option<&str>, count: Option<&str>, me: u32) -> io::Result<usize> {
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(0);
    };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(0);
    }
    let digits = count.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!("LISTEN_FDS={count:?} is not a number")));
    }
    match digits.parse::<usize>() {
        Ok(n) if n <= MAX_LISTEN_FDS => Ok(n),
        _ => Err(invalid(format!(
            "LISTEN_FDS={digits} passes more fds than the {MAX_LISTEN_FDS} blobmgr accepts"
        ))),
    }
}

/// The names of `n` passed fds: `LISTEN_FDNAMES` split on `:`, or
/// "unknown" for each when it is absent (as `sd_listen_fds_with_names`).
fn fd_names(names: Option<&str>, n: usize) -> io::Result<Vec<String>> {
    let Some(names) = names else {
        return Ok(vec!["unknown".to_string(); n]);
    };
    let v: Vec<String> = names.split(':').map(str::to_string).collect();
    if v.len() != n {
        return Err(invalid(format!(
            "LISTEN_FDNAMES names {} fds but LISTEN_FDS is {n}",
            v.len()
        )));
    }
    Ok(v)
}

/// The fds a service manager passed, each with its name.
#[derive(Debug)]
pub struct ListenFds {
    fds: Vec<(String, OwnedFd)>,
}

impl ListenFds {
    /// Takes the fds passed to this process (made close-on-exec) and removes
    /// the variables; `None` when nothing was passed to this process.
    pub fn take_from_env() -> io::Result<Option<ListenFds>> {
        let pid = take_var("LISTEN_PID");
        let count = take_var("LISTEN_FDS");
        let names = take_var("LISTEN_FDNAMES");
        let n = listen_count(pid.as_deref(), count.as_deref(), std::process::id())?;
        if n == 0 {
            return Ok(None);
        }
        let names = fd_names(names.as_deref(), n)?;
        let mut fds = Vec::with_capacity(n);
        for (i, name) in names.into_iter().enumerate() {
            let raw = LISTEN_FDS_START + i as RawFd;
            if std::fs::symlink_metadata(format!("/proc/self/fd/{raw}")).is_err() {
                return Err(invalid(format!("LISTEN_FDS={n} but fd {raw} is not open")));
            }
            // SAFETY: the protocol passes fds 3..3+n to this process to own,
            // nothing else in it claims them, and the variables are gone, so
            // they are taken once.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            fds.push((name, fd));
        }
        Ok(Some(ListenFds { fds }))
    }

    /// The names of the fds not taken yet.
    pub fn names(&self) -> Vec<&str> {
        self.fds.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Takes the first fd named `name`.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let at = self.fds.iter().position(|(n, _)| n == name)?;
        Some(self.fds.remove(at).1)
    }

    /// Takes the fd named `name` or, failing that, the only one left (a
    /// manager that names nothing, like `systemd-socket-activate -l`).
    /// Several left and none so named is an error; none left is `None`.
    pub fn take_listener(&mut self, name: &str) -> io::Result<Option<OwnedFd>> {
        if let Some(fd) = self.take(name) {
            return Ok(Some(fd));
        }
        match self.fds.len() {
            0 => Ok(None),
            1 => Ok(self.fds.pop().map(|(_, fd)| fd)),
            n => Err(invalid(format!(
                "{n} sockets passed (LISTEN_FDNAMES {}) and none is named {name:?}",
                self.names().join(":")
            ))),
        }
    }
}

/// Where `NOTIFY_SOCKET` points: a path, or an abstract name after `@`.
fn notify_addr(value: &OsStr) -> io::Result<SocketAddr> {
    match value.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(value),
    }
}

/// Sends state changes to the service manager (`READY=1`, `STOPPING=1`,
/// `WATCHDOG=1`, `STATUS=...`), one datagram each call.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as it was, to pass on to a successor (an upgrade).
    env: Option<std::ffi::OsString>,
}

impl Notifier {
    /// A notifier to `NOTIFY_SOCKET`, which is removed from the environment;
    /// `None` when it is unset or empty.
    pub fn take_from_env() -> io::Result<Option<Notifier>> {
        let value = env::var_os("NOTIFY_SOCKET");
        env::remove_var("NOTIFY_SOCKET");
        match value {
            Some(v) if !v.is_empty() => {
                let addr =
                    notify_addr(&v).map_err(|e| invalid(format!("NOTIFY_SOCKET={v:?}: {e}")))?;
                let mut n = Notifier::to(addr)?;
                n.env = Some(v);
                Ok(Some(n))
            }
            _ => Ok(None),
        }
    }

    /// A notifier to `addr`.
    pub fn to(addr: SocketAddr) -> io::Result<Notifier> {
        // std creates it close-on-exec.
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            sock,
            addr,
            env: None,
        })
    }

    /// The `NOTIFY_SOCKET` value this notifier came from, if it came from
    /// the environment.
    pub fn env_value(&self) -> Option<&std::ffi::OsStr> {
        self.env.as_deref()
    }

    /// Sends `lines` (`KEY=VALUE`, newline-separated) as one datagram.
    pub fn notify(&self, lines: &str) -> io::Result<()> {
        let n = self.sock.send_to_addr(lines.as_bytes(), &self.addr)?;
        if n != lines.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"));
        }
        Ok(())
    }

    /// Another notifier to the same address (its own socket).
    pub fn try_clone(&self) -> io::Result<Notifier> {
        Notifier::to(self.addr.clone())
    }
}

/// The watchdog interval of `WATCHDOG_USEC` when it applies to process
/// `me` (`WATCHDOG_PID` unset or equal to it).
fn watchdog_usec(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match pid.map(|p| p.trim().parse::<u32>()) {
        None => {}
        Some(Ok(p)) if p == me => {}
        Some(_) => return None,
    }
    Some(Duration::from_micros(usec))
}

/// The watchdog timeout the manager set for this process (`WATCHDOG_USEC`,
/// `WATCHDOG_PID`), removing both variables; `None` when there is none.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = take_var("WATCHDOG_USEC");
    let pid = take_var("WATCHDOG_PID");
    watchdog_usec(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// A thread that sends `WATCHDOG=1` every `every` (half the manager's
/// timeout) for as long as a liveness check passes; stopped and joined on
/// drop.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread. `alive` runs before each ping: when it returns
    /// false the ping is skipped, so a daemon that stopped answering is
    /// killed by the manager once its timeout passes.
    pub fn start(
        notifier: Notifier,
        every: Duration,
        mut alive: impl FnMut() -> bool + Send + 'static,
    ) -> io::Result<Watchdog> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut next = Instant::now() + every;
                while let Err(RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(next.saturating_duration_since(Instant::now()))
                {
                    next += every;
                    if !alive() {
                        log::warn!("watchdog: the daemon did not answer; no WATCHDOG=1 sent");
                    } else if let Err(e) = notifier.notify("WATCHDOG=1") {
                        log::warn!("watchdog: notify: {e}");
                    }
                }
            })?;
        Ok(Watchdog {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_are_only_ours_when_the_pid_matches() {
        assert_eq!(listen_count(None, Some("1"), 7).unwrap(), 0);
        assert_eq!(listen_count(Some("7"), None, 7).unwrap(), 0);
        assert_eq!(listen_count(Some("8"), Some("1"), 7).unwrap(), 0);
        assert_eq!(listen_count(Some("7"), Some("2"), 7).unwrap(), 2);
        assert!(listen_count(Some("7"), Some("x"), 7).is_err());
        assert!(listen_count(Some("7"), Some("-1"), 7).is_err());
    }

    #[test]
    fn a_huge_listen_fds_is_refused_before_anything_is_allocated() {
        let max = MAX_LISTEN_FDS.to_string();
        assert_eq!(
            listen_count(Some("7"), Some(&max), 7).unwrap(),
            MAX_LISTEN_FDS
        );
        for huge in [
            "4097",
            "4000000000",
            "18446744073709551615",
            "99999999999999999999999",
        ] {
            let e = listen_count(Some("7"), Some(huge), 7).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("LISTEN_FDS={huge} ")),
                "{e}"
            );
        }
    }

    #[test]
    fn fd_names_default_to_unknown_and_must_match_the_count() {
        assert_eq!(fd_names(None, 2).unwrap(), ["unknown", "unknown"]);
        assert_eq!(fd_names(Some("a:b"), 2).unwrap(), ["a", "b"]);
        assert!(fd_names(Some("a"), 2).is_err());
    }

    #[test]
    fn the_listener_is_the_named_fd_or_the_only_one() {
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let mut one = ListenFds {
            fds: vec![("unknown".into(), fd())],
        };
        assert!(one.take_listener("blobmgr").unwrap().is_some());
        assert!(one.take_listener("blobmgr").unwrap().is_none());
        let mut two = ListenFds {
            fds: vec![("lock".into(), fd()), ("blobmgr".into(), fd())],
        };
        assert!(two.take_listener("blobmgr").unwrap().is_some());
        assert_eq!(two.names(), ["lock"]);
        let mut ambiguous = ListenFds {
            fds: vec![("a".into(), fd()), ("b".into(), fd())],
        };
        let e = ambiguous.take_listener("blobmgr").unwrap_err();
        assert!(e.to_string().contains("a:b"), "{e}");
    }

    #[test]
    fn watchdog_applies_to_us_only() {
        let us = Some(Duration::from_millis(200));
        assert_eq!(watchdog_usec(Some("200000"), None, 7), us);
        assert_eq!(watchdog_usec(Some("200000"), Some("7"), 7), us);
        assert_eq!(watchdog_usec(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_usec(Some("0"), None, 7), None);
        assert_eq!(watchdog_usec(None, Some("7"), 7), None);
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(notify_addr(path.as_os_str()).unwrap()).unwrap();
        n.notify("READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=x");

        let name = format!("blobmgr-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let at = format!("@{name}");
        let n = Notifier::to(notify_addr(OsStr::new(&at)).unwrap()).unwrap();
        n.try_clone().unwrap().notify("WATCHDOG=1").unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
