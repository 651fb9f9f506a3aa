//! What `serve` owes its service manager (docs/OPERATIONS.md, "Running
//! under systemd"): the listening socket it may pass (socket activation),
//! the work dir lock, and the notifications: `READY=1` once the socket
//! accepts, `WATCHDOG=1` while the reactor answers, `STOPPING=1` when a
//! stop begins, and for an upgrade `RELOADING=1`, then `MAINPID=` of the
//! new process before this one exits (or `READY=1` again if it failed).
//! Without a manager every step is a no-op except the lock.

use crate::cli::Fail;
use blobmgr::client::Client;
use blobmgr::listener::Listener;
use blobmgr::systemd::{watchdog_interval, ListenFds, Notifier, Watchdog};
use blobmgr::workdir::{self, WorkdirLock};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name (`FileDescriptorName=`) of the listening socket among several
/// passed fds; a single passed fd is the listener whatever its name.
pub const LISTENER_FD_NAME: &str = "blobmgr";

/// What the service manager handed this process, taken out of the
/// environment (see [`blobmgr::systemd`]).
pub struct Manager {
    fds: Option<ListenFds>,
    /// The work dir lock's fd, when a previous daemon handed it over.
    lock_fd: Option<OwnedFd>,
    notifier: Option<Notifier>,
    watchdog_timeout: Option<Duration>,
    watchdog: Option<Watchdog>,
}

impl Manager {
    /// Takes systemd's variables and fds. Call it first, before any thread
    /// starts: the variables are removed from the environment.
    pub fn from_env() -> Result<Manager, Fail> {
        let mut fds = ListenFds::take_from_env()?;
        let lock_fd = fds.as_mut().and_then(|f| f.take(workdir::FD_NAME));
        let notifier = Notifier::take_from_env()?;
        Ok(Manager {
            fds,
            lock_fd,
            notifier,
            watchdog_timeout: watchdog_interval(),
            watchdog: None,
        })
    }

    /// The listening socket the manager passed, checked and adopted (its
    /// file is never removed by this process); `None` when none was passed.
    /// Closes the other passed fds but the work dir lock's.
    pub fn listener(&mut self) -> Result<Option<Listener>, Fail> {
        let Some(mut fds) = self.fds.take() else {
            return Ok(None);
        };
        let taken = fds.take_listener(LISTENER_FD_NAME)?;
        let left = fds.names();
        if !left.is_empty() {
            log::warn!("closing passed fds nobody uses: {}", left.join(":"));
        }
        let Some(fd) = taken else {
            return Ok(None);
        };
        let l = Listener::from_fd(fd).map_err(|e| Fail(format!("LISTEN_FDS: {e}")))?;
        log::info!(
            "socket activation: serving the passed socket {}",
            l.path().display()
        );
        Ok(Some(l))
    }

    /// Locks `workdir` for this process's life, adopting the lock a previous
    /// daemon passed if it did.
    pub fn lock_workdir(&mut self, workdir: &Path) -> Result<WorkdirLock, Fail> {
        let lock = match self.lock_fd.take() {
            Some(fd) => WorkdirLock::from_fd(fd, workdir)?,
            None => WorkdirLock::acquire(workdir)?,
        };
        Ok(lock)
    }

    /// The server is built and its socket accepts: tells the manager
    /// (`READY=1`, `STATUS=`, `MAINPID=`) and starts the watchdog, which
    /// pings only while a Noop on `sock` is answered. With a watchdog the
    /// message pings it too and restores its timeout (`WATCHDOG_USEC=`): an
    /// upgrade's old daemon lengthened it for the handover.
    pub fn ready(&mut self, status: &str, sock: &Path) {
        let Some(n) = &self.notifier else {
            return;
        };
        let pid = std::process::id();
        let mut msg = format!("READY=1\nSTATUS={status}\nMAINPID={pid}");
        if let Some(t) = self.watchdog_timeout {
            msg.push_str(&format!("\nWATCHDOG=1\nWATCHDOG_USEC={}", t.as_micros()));
        }
        send(n, &msg);
        let Some(timeout) = self.watchdog_timeout else {
            return;
        };
        let every = timeout / 2;
        let started = n
            .try_clone()
            .and_then(|n| Watchdog::start(n, every, answers(sock.to_path_buf(), every / 2)));
        match started {
            Ok(w) => self.watchdog = Some(w),
            Err(e) => log::warn!("watchdog: cannot start: {e}"),
        }
    }

    /// `NOTIFY_SOCKET` for a successor (an upgrade), which says `READY=1`
    /// once it serves; by then this process made it the main one
    /// ([`Manager::handing_over`]), so `NotifyAccess=main` suffices.
    pub fn notify_socket(&self) -> Option<std::ffi::OsString> {
        self.notifier.as_ref()?.env_value().map(|v| v.to_owned())
    }

    /// The manager's watchdog timeout, for a successor (an upgrade) to
    /// keep the pings going: `None` without a watchdog.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog_timeout
    }

    /// An upgrade began (the new binary is starting; this daemon still
    /// serves and pings the watchdog): tells the manager `RELOADING=1`
    /// with `MONOTONIC_USEC=` (`sd_notify(3)`; `Type=notify-reload` needs
    /// it). The reload lasts until a `READY=1`: the successor's, or this
    /// daemon's if the upgrade fails ([`Manager::reload_failed`]).
    pub fn reloading(&mut self) {
        if let Some(n) = &self.notifier {
            let now = monotonic_usec();
            send(
                n,
                &format!("RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=starting a new binary"),
            );
        }
    }

    /// The successor is ready to take over: tells the manager it is the
    /// main process now (`MAINPID=`), and ends this daemon's watchdog. Sent
    /// before this process drains and exits, by the main process, which the
    /// manager listens to under any `NotifyAccess=` but `none`: a main
    /// process that exits before the manager knows of the new one is the
    /// service stopping, and the manager would kill the successor with
    /// the rest of the cgroup. With a watchdog, nobody pings it until the
    /// successor is ready, after this daemon's drain: the message pings it
    /// and lengthens its timeout by `handover` (the most the drain and the
    /// successor's start may take); the successor's `READY=1` restores it.
    pub fn handing_over(&mut self, successor: u32, handover: Duration) {
        if let Some(n) = &self.notifier {
            let mut msg = format!("MAINPID={successor}\nSTATUS=handing over to pid {successor}");
            if let Some(t) = self.watchdog_timeout {
                let longer = (t + handover).as_micros();
                msg.push_str(&format!("\nWATCHDOG=1\nWATCHDOG_USEC={longer}"));
            }
            send(n, &msg);
        }
        drop(self.watchdog.take());
    }

    /// The upgrade failed and this daemon goes on serving: `READY=1` ends
    /// the reload, with `status` as before.
    pub fn reload_failed(&mut self, status: &str) {
        if let Some(n) = &self.notifier {
            send(n, &format!("READY=1\nSTATUS={status}"));
        }
    }

    /// A stop began: tells the manager `STOPPING=1` and ends the watchdog.
    pub fn stopping(&mut self) {
        if let Some(n) = &self.notifier {
            send(n, "STOPPING=1\nSTATUS=stopping");
        }
        drop(self.watchdog.take());
    }
}

/// `CLOCK_MONOTONIC` in microseconds, for `MONOTONIC_USEC=`.
fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64) * 1_000_000 + (t.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

fn send(n: &Notifier, msg: &str) {
    if let Err(e) = n.notify(msg) {
        log::warn!("notify the service manager: {e}");
    }
}

/// A liveness check: one Noop round trip on the daemon's own socket, over a
/// connection kept between checks, within `timeout`.
fn answers(sock: PathBuf, timeout: Duration) -> impl FnMut() -> bool + Send + 'static {
    let mut client: Option<Client> = None;
    move || {
        if client.is_none() {
            client = Client::builder()
                .timeout(timeout)
                .connect_retries(0)
                .connect(&sock)
                .map_err(|e| log::warn!("watchdog: connect {}: {e}", sock.display()))
                .ok();
        }
        client.as_ref().is_some_and(|c| c.ping().is_ok())
    }
}
