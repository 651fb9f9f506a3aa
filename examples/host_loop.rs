//! Driving the blob manager from a host's own event loop.
//!
//! ```text
//! cargo run --example host_loop -- --sock /tmp/b.sock --workdir /tmp/bw --backend ./blobs
//! ```
//!
//! The host here is a plain edge-triggered epoll loop (nix::sys::epoll): the
//! server gets no thread of its own. The host:
//!
//! 1. implements [`Registrar`] over its epoll instance, so every fd the server
//!    owns (listener, worker completion eventfd, client sockets) lands in the
//!    host's interest list with the server's id as the event data;
//! 2. builds the server with [`Server::with_registrar`];
//! 3. waits with the timeout [`Server::next_timeout`] asks for, hands each
//!    ready id to [`Server::dispatch`], then calls [`Server::handle_timeout`];
//! 4. watches its own fds in the same epoll (here a signalfd for SIGINT and
//!    SIGTERM, which end the loop), using ids the server never hands out.
//!
//! Dropping the server deregisters its fds, checkpoints the cache and removes
//! the socket file.

use blobmgr::backend::LocalFs;
use blobmgr::server::{Registrar, Server, ServerConfig};
use mio::Interest;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// The host's own event ids. Server ids are connection ids (far below these),
/// `LISTENER_ID` (usize::MAX) and `COMPLETIONS_ID` (usize::MAX - 1).
const HOST_SIGNAL: u64 = (usize::MAX - 1000) as u64;

/// The host's epoll instance, shared with the server through [`Registrar`].
struct EpollRegistrar(Rc<Epoll>);

/// Edge-triggered: the server reads, writes and accepts until WouldBlock.
fn epoll_flags(interest: Interest) -> EpollFlags {
    let mut f = EpollFlags::EPOLLET;
    if interest.is_readable() {
        f |= EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
    }
    if interest.is_writable() {
        f |= EpollFlags::EPOLLOUT;
    }
    f
}

impl Registrar for EpollRegistrar {
    fn register(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> io::Result<()> {
        let ev = EpollEvent::new(epoll_flags(interest), id as u64);
        Ok(self.0.add(fd, ev)?)
    }

    fn reregister(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> io::Result<()> {
        let mut ev = EpollEvent::new(epoll_flags(interest), id as u64);
        Ok(self.0.modify(fd, &mut ev)?)
    }

    fn deregister(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        Ok(self.0.delete(fd)?)
    }
}

/// `next_timeout` in epoll's milliseconds, rounded up so the loop never
/// spins on a sub-millisecond remainder.
fn epoll_timeout(d: Option<Duration>) -> EpollTimeout {
    match d {
        None => EpollTimeout::NONE,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as u32;
            EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX)
        }
    }
}

struct Opts {
    sock: PathBuf,
    workdir: PathBuf,
    backend: PathBuf,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        sock: "host_loop.sock".into(),
        workdir: "host_loop.work".into(),
        backend: "blobs".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--sock" => &mut o.sock,
            "--workdir" => &mut o.workdir,
            "--backend" => &mut o.backend,
            "-h" | "--help" => {
                return Err("usage: host_loop [--sock PATH] [--workdir DIR] [--backend DIR]".into())
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        };
        *slot = args
            .next()
            .ok_or_else(|| format!("{a} needs a value"))?
            .into();
    }
    if !o.backend.is_dir() {
        return Err(format!(
            "--backend {}: not a directory",
            o.backend.display()
        ));
    }
    Ok(o)
}

fn run(o: Opts) -> io::Result<()> {
    // The host's own fd: SIGINT/SIGTERM through a signalfd.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;

    let epoll = Rc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
    epoll.add(
        signals.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, HOST_SIGNAL),
    )?;

    let cfg = ServerConfig::new(&o.sock, &o.workdir);
    let backend = Arc::new(LocalFs::new(&o.backend));
    let mut server = Server::with_registrar(cfg, backend, Box::new(EpollRegistrar(epoll.clone())))?;
    eprintln!(
        "host_loop: serving {} on {}",
        o.backend.display(),
        o.sock.display()
    );

    let mut events = vec![EpollEvent::empty(); 256];
    'host: loop {
        let n = match epoll.wait(&mut events, epoll_timeout(server.next_timeout())) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            match ev.data() {
                HOST_SIGNAL => {
                    if let Ok(Some(sig)) = signals.read_signal() {
                        eprintln!("host_loop: signal {}; stopping", sig.ssi_signo);
                    }
                    break 'host;
                }
                id => server.dispatch(id as usize),
            }
        }
        server.handle_timeout();
    }
    // Deregisters the server's fds from the host epoll, checkpoints the
    // cache and removes the socket file.
    drop(server);
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("host_loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host_loop: {e}");
            ExitCode::FAILURE
        }
    }
}
