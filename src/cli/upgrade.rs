//! Zero-downtime upgrade. On SIGUSR2 (sent by `blobmgr upgrade`, or by hand)
//! the daemon starts the binary installed at the path it was started from,
//! with the same arguments, and hands it the listening socket and the work
//! dir lock the way socket activation passes fds (`LISTEN_FDS`, names
//! `blobmgr` and `blobmgr-workdir-lock`), the socket's configured path
//! (`BLOBMGR_HANDOVER_SOCK`) and whether its file is the daemon's to remove
//! (`BLOBMGR_HANDOVER_SOCK_OWNED`: not when systemd passed the socket),
//! the service manager's `NOTIFY_SOCKET` and `WATCHDOG_USEC` (with
//! `WATCHDOG_PID` naming the new process), plus two pipes:
//!
//! 1. the new process adopts the socket and the lock, says `READY` on the
//!    first pipe, and waits for the second to close;
//! 2. the old one (which kept serving until then, and told the manager
//!    `RELOADING=1`) tells the manager `MAINPID=` of the new process while
//!    it is still the main one, then stops accepting and reading, answers
//!    what it has read, closes its connections, makes the cache durable,
//!    stops its workers and exits, closing the second pipe;
//! 3. the new one opens the work dir, calls `listen()` again (so
//!    `SO_PEERCRED` on the socket names it), tells the manager `READY=1`
//!    and serves what waited in the socket's backlog. No connection attempt
//!    is refused.
//!
//! If the new binary fails before `READY`, the old one logs why, tells the
//! manager `READY=1` (the reload is over) and goes on serving. A client of
//! the client library sees no failed call: it retries on a new connection a
//! request whose connection closed unanswered (every request kind is
//! idempotent).

use crate::cli::Fail;
use blobmgr::client::Client;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Names the pipes of a handover: `READY_FD,RELEASE_FD` in the new process.
const PIPES_ENV: &str = "BLOBMGR_HANDOVER_PIPES";
/// The daemon's socket path, as the old daemon was configured with it (or
/// as systemd passed it). The new process cannot read it off the socket: a
/// socket [`blobmgr::listener::Listener::bind`] made was bound under a
/// temporary name and hard-linked into place, and `getsockname` still
/// answers the temporary name, long gone.
const SOCK_ENV: &str = "BLOBMGR_HANDOVER_SOCK";
/// `1` when the socket's file is the daemon's to remove at exit (a daemon
/// bound it), `0` when it is not (systemd passed the socket: its socket
/// unit owns the file). The new process cannot tell the two apart.
const OWNED_ENV: &str = "BLOBMGR_HANDOVER_SOCK_OWNED";
/// How long the new binary may take to say it is ready.
const READY_WAIT: Duration = Duration::from_secs(20);
/// How long the old daemon waits for the requests it read.
pub const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// How much longer the manager's watchdog waits during a handover: nobody
/// pings it from the start of the old daemon's drain until the new one is
/// ready, at most the drain's limit plus the time a new binary is given to
/// start.
pub const WATCHDOG_GRACE: Duration = DRAIN_WAIT.saturating_add(READY_WAIT);

/// What the daemon needs to start its successor, recorded at start: after
/// an install by rename, `/proc/self/exe` names the deleted old file.
pub struct Successor {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Successor {
    /// The binary to start.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    pub fn record() -> Successor {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("blobmgr"));
        Successor {
            exe,
            args: std::env::args_os().skip(1).collect(),
        }
    }
}

/// A started successor that said `READY`: the old daemon drains, exits, and
/// the release pipe closes with it.
pub struct Handover {
    child: Child,
    release: OwnedFd,
}

impl Handover {
    /// The successor's pid, the service's main pid once it takes over.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The old daemon is done with the work dir: the successor may go on.
    /// With `stop`, a stop was asked for meanwhile: it is passed on.
    pub fn release(self, stop: bool) {
        drop(self.release);
        if stop {
            log::info!("upgrade: a stop was asked for during the handover; passing it on");
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        }
        // Not waited for: it is the new daemon and outlives this process.
        drop(self.child);
    }
}

fn high_dup(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// What the old daemon hands its successor besides the fds.
pub struct Inherit {
    /// The daemon's socket path (see [`SOCK_ENV`]).
    pub sock: PathBuf,
    /// Whether the socket's file is the daemon's to remove (see
    /// [`OWNED_ENV`]).
    pub owned: bool,
    /// `NOTIFY_SOCKET`, when a service manager listens.
    pub notify_socket: Option<OsString>,
    /// The manager's watchdog timeout (`WATCHDOG_USEC`), which goes on to
    /// the successor with `WATCHDOG_PID` naming it: it is the process the
    /// manager watches once it took over (`sd_watchdog_enabled(3)` ignores
    /// a `WATCHDOG_PID` that is not the caller's).
    pub watchdog: Option<Duration>,
}

/// What an old daemon said about the socket it handed over.
pub struct HandedSock {
    /// The daemon's socket path.
    pub path: PathBuf,
    /// Whether its file is the daemon's to remove at exit.
    pub owned: bool,
}

/// The socket an old daemon handed over, taken out of the environment
/// (call it first, before any thread starts); `None` in a daemon not
/// started by an upgrade. Without the ownership variable the file is not
/// owned: leaving a file behind is the safe mistake.
pub fn handed_sock() -> Option<HandedSock> {
    let path = std::env::var_os(SOCK_ENV);
    let owned = std::env::var_os(OWNED_ENV);
    std::env::remove_var(SOCK_ENV);
    std::env::remove_var(OWNED_ENV);
    let path = PathBuf::from(path?);
    if path.as_os_str().is_empty() {
        return None;
    }
    let owned = owned.is_some_and(|v| v == "1");
    Some(HandedSock { path, owned })
}

/// Starts the successor with the socket and the lock; its `READY` comes
/// later (see [`Pending`]). `Err`: it could not be started.
pub fn start(
    s: &Successor,
    socket: BorrowedFd<'_>,
    lock: BorrowedFd<'_>,
    inherit: Inherit,
) -> Result<Pending, Fail> {
    let fds = [high_dup(socket)?, high_dup(lock)?];
    let (ready_r, ready_w_low) = pipe()?;
    let (release_r_low, release_w) = pipe()?;
    let ready_w = high_dup(ready_w_low.as_fd())?;
    let release_r = high_dup(release_r_low.as_fd())?;
    // Only the child may hold the write end of `ready`: its exit must read
    // as end of file here.
    drop((ready_w_low, release_r_low));
    let sources: [RawFd; 4] = [
        fds[0].as_raw_fd(),
        fds[1].as_raw_fd(),
        ready_w.as_raw_fd(),
        release_r.as_raw_fd(),
    ];
    let mut cmd = Command::new("/bin/sh");
    // `exec` keeps the shell's pid, so $$ is the daemon's LISTEN_PID (and
    // WATCHDOG_PID, which is ignored without WATCHDOG_USEC).
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ WATCHDOG_PID=$$; export LISTEN_PID WATCHDOG_PID; exec \"$0\" \"$@\"")
        .arg(&s.exe)
        .args(&s.args)
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "blobmgr:blobmgr-workdir-lock")
        .env(PIPES_ENV, "5,6")
        .env(SOCK_ENV, &inherit.sock)
        .env(OWNED_ENV, if inherit.owned { "1" } else { "0" })
        .stdin(Stdio::null());
    if let Some(v) = inherit.notify_socket {
        cmd.env("NOTIFY_SOCKET", v);
    }
    if let Some(t) = inherit.watchdog {
        cmd.env("WATCHDOG_USEC", t.as_micros().to_string());
    }
    // SAFETY: only dup2, which is async-signal-safe, runs between fork and
    // exec; every source fd is >= 10, so no target (3-6) overwrites one.
    unsafe {
        cmd.pre_exec(move || {
            for (i, src) in sources.iter().enumerate() {
                if nix::libc::dup2(*src, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    log::info!("upgrade: starting {}", s.exe.display());
    let child = cmd
        .spawn()
        .map_err(|e| Fail(format!("upgrade: start {}: {e}", s.exe.display())))?;
    drop((fds, ready_w, release_r));
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
    )?;
    let expiry = Expiration::OneShot(TimeSpec::from_duration(READY_WAIT));
    timer.set(expiry, TimerSetTimeFlags::empty())?;
    Ok(Pending {
        child,
        ready: ready_r,
        release: release_w,
        timer,
        exe: s.exe.clone(),
    })
}

/// A successor started and not yet ready. The daemon keeps serving; it
/// watches [`Pending::ready_fd`] and [`Pending::timer_fd`] and asks
/// [`Pending::check`] when either is readable.
pub struct Pending {
    child: Child,
    ready: OwnedFd,
    release: OwnedFd,
    /// Fires [`READY_WAIT`] after the start.
    timer: TimerFd,
    exe: PathBuf,
}

/// Where a pending successor stands.
pub enum Check {
    Ready(Handover),
    Failed(String),
    Waiting(Pending),
}

impl Pending {
    /// Readable when the successor said READY, or exited.
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    /// Readable when the successor has had [`READY_WAIT`].
    pub fn timer_fd(&self) -> BorrowedFd<'_> {
        self.timer.as_fd()
    }

    /// A stop came first: the successor is killed (it has not touched the
    /// work dir: it waits for the release).
    pub fn abort(mut self) {
        log::info!("upgrade: stopping instead; the new binary is not started");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Reads what the successor said, without blocking.
    pub fn check(mut self) -> Check {
        let mut fds = [nix::poll::PollFd::new(
            self.ready.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let readable = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0;
        let why = if readable {
            let mut buf = [0u8; 16];
            match nix::unistd::read(&self.ready, &mut buf) {
                Ok(n) if buf[..n].starts_with(b"READY") => {
                    return Check::Ready(Handover {
                        child: self.child,
                        release: self.release,
                    })
                }
                Ok(_) => "it exited before saying READY".to_owned(),
                Err(e) => format!("reading its answer: {e}"),
            }
        } else if self.timer.get().ok().flatten().is_none() {
            format!("no READY within {READY_WAIT:?}")
        } else {
            return Check::Waiting(self);
        };
        let _ = self.child.kill();
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
        Check::Failed(format!(
            "upgrade: the new binary {} did not take over ({why}; {status}); still serving",
            self.exe.display()
        ))
    }
}

/// In a successor: says `READY` and waits until the old daemon released the
/// work dir; true then. Does nothing (false) in a daemon not started by an
/// upgrade.
pub fn take_over() -> Result<bool, Fail> {
    let Some(v) = std::env::var_os(PIPES_ENV) else {
        return Ok(false);
    };
    std::env::remove_var(PIPES_ENV);
    let v = v.to_string_lossy().into_owned();
    let fds: Vec<RawFd> = v.split(',').filter_map(|f| f.parse().ok()).collect();
    let [ready, release] = fds[..] else {
        return Err(Fail(format!("{PIPES_ENV}={v}: not two fds")));
    };
    // SAFETY: the old daemon passed exactly these two pipe ends; nothing
    // else in this process knows of them.
    let (ready, release) = unsafe { (OwnedFd::from_raw_fd(ready), OwnedFd::from_raw_fd(release)) };
    for fd in [&ready, &release] {
        fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    std::fs::File::from(ready)
        .write_all(b"READY\n")
        .map_err(|e| Fail(format!("upgrade: tell the old daemon: {e}")))?;
    log::info!("upgrade: waiting for the old daemon to release the work dir");
    let mut rest = Vec::new();
    let _ = std::fs::File::from(release).read_to_end(&mut rest);
    log::info!("upgrade: the old daemon is gone; taking over");
    Ok(true)
}

/// `listen()` again on an adopted socket, so `SO_PEERCRED` names this
/// process (it names the last process that called it).
pub fn relisten(fd: BorrowedFd<'_>) {
    let backlog =
        nix::sys::socket::Backlog::new(4096).unwrap_or(nix::sys::socket::Backlog::MAXCONN);
    if let Err(e) = nix::sys::socket::listen(&fd, backlog) {
        log::warn!("listen() on the adopted socket: {e}");
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The pid behind the daemon's socket.
fn daemon_pid(sock: &Path) -> Result<i32, Fail> {
    let s =
        UnixStream::connect(sock).map_err(|e| Fail(format!("connect {}: {e}", sock.display())))?;
    let cred = getsockopt(&s, PeerCredentials)?;
    Ok(cred.pid())
}

/// Refuses to signal `pid` unless it is a blobmgr daemon (its command name
/// starts with `blobmgr` and it runs `serve`). `SO_PEERCRED` names whoever
/// last called `listen()` on the socket: for a socket systemd holds with no
/// daemon running that is PID 1 (or `systemd-socket-activate`), for which
/// SIGUSR2 means something else or death, and a pid may have been reused.
fn check_daemon(pid: i32, sock: &Path) -> Result<(), Fail> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim_end();
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let serves = args.split(|&b| b == 0).skip(1).any(|a| a == b"serve");
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    if pid > 1 && pid != me && comm.starts_with("blobmgr") && serves {
        return Ok(());
    }
    Err(Fail(format!(
        "pid {pid} behind {} is not a blobmgr daemon (command {comm:?}); not signalling it \
         (a socket-activated socket with no daemon running? it starts on a connection: try again)",
        sock.display()
    )))
}

/// `blobmgr_upgrades_failed_total` of the daemon behind `sock`, if its
/// metrics answer.
fn failed_upgrades(sock: &Path) -> Option<f64> {
    let mut path = sock.as_os_str().to_owned();
    path.push(".metrics");
    let ep = crate::cli::http::Endpoint::Unix(path.into());
    let body = crate::cli::http::get(&ep, "/metrics").ok()?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("blobmgr_upgrades_failed_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// `blobmgr upgrade`: SIGUSR2 to the daemon behind `sock` (if it is one:
/// [`check_daemon`]), then waits until
/// a new process answers on it, or the daemon reports the upgrade failed.
pub fn run(sock: &Path) -> Result<(), Fail> {
    let old = daemon_pid(sock)?;
    check_daemon(old, sock)?;
    let failed_before = failed_upgrades(sock);
    kill(Pid::from_raw(old), Signal::SIGUSR2)
        .map_err(|e| Fail(format!("signal pid {old}: {e}")))?;
    let end = Instant::now() + READY_WAIT + DRAIN_WAIT + Duration::from_secs(10);
    let mut pause = Duration::from_millis(5);
    while Instant::now() < end {
        if failed_before.is_some() && failed_upgrades(sock) > failed_before {
            return Err(Fail(format!(
                "the new binary did not take over; the daemon (pid {old}) keeps serving (see its log)"
            )));
        }
        let gone = !alive(old);
        if let Ok(new) = daemon_pid(sock) {
            if new != old && gone {
                let c = Client::builder().connect_retries(1).connect(sock)?;
                c.ping()
                    .map_err(|e| Fail(format!("ping the new daemon: {e}")))?;
                println!("upgraded: pid {old} -> {new}");
                return Ok(());
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    Err(Fail(format!(
        "the daemon (pid {old}) did not hand over; it keeps serving if the new binary failed (see its log)"
    )))
}
