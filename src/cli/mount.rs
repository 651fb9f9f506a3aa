//! `blobmgr mount`: mounts the daemon's blobs (src/mount/) and serves them
//! in the foreground until SIGTERM or SIGINT, or until someone else
//! unmounts the file system.
//!
//! The first signal unmounts. If the file system is busy (an open file, or
//! a file system mounted from one of its files) it is detached instead —
//! it leaves the tree at once and is served until its last user is gone —
//! and a second signal stops serving at once.

use crate::cli::args::MountArgs;
use crate::cli::{cli_client, serve::raise_fd_limit, Fail};
use blobmgr::client::Client;
use blobmgr::mount::{Mount, MountConfig, Unmounted};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

/// Reconnection attempts of the mount's client; the call's deadline
/// (--timeout) is what bounds them.
const RECONNECTS: u32 = 1000;

/// What woke the foreground thread.
enum Event {
    Signal(u32),
    Ended,
}

pub fn run(a: MountArgs) -> Result<(), Fail> {
    raise_fd_limit();
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and they are only seen through the signalfd.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block()?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let sock = &a.sock.sock;
    // Fail at once when no daemon answers; the mount's own client then
    // keeps reconnecting for as long as each call's deadline allows.
    let no_daemon = |e: String| Fail(format!("no daemon answers on {}: {e}", sock.display()));
    cli_client(sock)
        .map_err(|Fail(e)| no_daemon(e))?
        .ping()
        .map_err(|e| no_daemon(e.to_string()))?;
    let client = Client::builder()
        .timeout(Duration::from_secs_f64(a.timeout.0))
        .connect_retries(RECONNECTS)
        .backoff(Duration::from_millis(20), Duration::from_millis(500))
        .connect(sock)
        .map_err(|e| Fail(format!("connect to {}: {e}", sock.display())))?;
    let mut cfg = MountConfig::new(&a.mountpoint);
    cfg.allow_other = a.allow_other;
    cfg.granule = a.granule.0;
    cfg.passthrough = a.passthrough;
    cfg.threads = a.threads as usize;
    let (ended_tx, ended_rx) = UnixStream::pair()?;
    let mut mount = Mount::start(Arc::new(client), &cfg, move || drop(ended_tx))?;
    serve(&mut mount, &sfd, &ended_rx)?;
    mount.join()?;
    log::info!("stopped");
    Ok(())
}

/// Waits for signals and for the session's end, and unmounts on the first
/// signal.
fn serve(mount: &mut Mount, sfd: &SignalFd, ended: &UnixStream) -> Result<(), Fail> {
    let shown = mount.mountpoint().display().to_string();
    let mut stopping = false;
    loop {
        match wait(sfd, ended)? {
            Event::Ended => {
                if !stopping {
                    log::info!("{shown} was unmounted");
                }
                return Ok(());
            }
            Event::Signal(n) if !stopping => {
                stopping = true;
                log::info!("signal {n} received; unmounting {shown}");
                match mount.unmount() {
                    Ok(Unmounted::Clean) => {}
                    Ok(Unmounted::Detached) => log::warn!(
                        "{shown} is busy: detached from the tree, and served until its last \
                         open file is closed; signal again to stop now"
                    ),
                    Err(e) => return Err(Fail(format!("unmount {shown}: {e}"))),
                }
            }
            Event::Signal(n) => {
                log::warn!("signal {n} received again: stopping with files still open");
                std::process::exit(0);
            }
        }
    }
}

/// Blocks until a stop signal arrives or the session ends.
fn wait(sfd: &SignalFd, ended: &UnixStream) -> Result<Event, Fail> {
    loop {
        if let Ok(Some(sig)) = sfd.read_signal() {
            return Ok(Event::Signal(sig.ssi_signo));
        }
        let mut fds = [
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(ended.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Fail(format!("poll: {e}"))),
        }
        if fds[1].any().unwrap_or(false) {
            return Ok(Event::Ended);
        }
    }
}
