//! Issue 2 item 4: a host event loop (plain edge-triggered epoll, the same
//! code as examples/host_loop.rs) drives the server in-process, with no
//! thread of the server's own, over real sockets.
mod common;
use blobmgr::backend::LocalFs;
use blobmgr::protocol::{self, Reply, Request};
use blobmgr::server::{Registrar, Server, ServerConfig, Stats, COMPLETIONS_ID, LISTENER_ID};
use common::*;
use mio::Interest;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::cell::Cell;
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const HOST_STOP: u64 = (usize::MAX - 1000) as u64;

/// What the host saw, to check that the server really went through it.
#[derive(Default, Debug, Clone, Copy)]
struct HostCounts {
    registered: u64,
    writable_registrations: u64,
    deregistered: u64,
    listener_events: u64,
    completion_events: u64,
    connection_events: u64,
}

struct EpollRegistrar {
    epoll: Rc<Epoll>,
    counts: Rc<Cell<HostCounts>>,
}

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

impl EpollRegistrar {
    fn count(&self, f: impl FnOnce(&mut HostCounts)) {
        let mut c = self.counts.get();
        f(&mut c);
        self.counts.set(c);
    }
}

impl Registrar for EpollRegistrar {
    fn register(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> std::io::Result<()> {
        self.count(|c| c.registered += 1);
        if interest.is_writable() {
            self.count(|c| c.writable_registrations += 1);
        }
        let ev = EpollEvent::new(epoll_flags(interest), id as u64);
        Ok(self.epoll.add(fd, ev)?)
    }

    fn reregister(&self, fd: BorrowedFd<'_>, id: usize, interest: Interest) -> std::io::Result<()> {
        if interest.is_writable() {
            self.count(|c| c.writable_registrations += 1);
        }
        let mut ev = EpollEvent::new(epoll_flags(interest), id as u64);
        Ok(self.epoll.modify(fd, &mut ev)?)
    }

    fn deregister(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.count(|c| c.deregistered += 1);
        Ok(self.epoll.delete(fd)?)
    }
}

fn epoll_timeout(d: Option<Duration>) -> EpollTimeout {
    match d {
        None => EpollTimeout::NONE,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as u32;
            EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX)
        }
    }
}

/// A host loop thread driving a server built with `with_registrar`.
struct Host {
    sock: PathBuf,
    backend: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<(Stats, HostCounts)>>,
    _dir: tempfile::TempDir,
}

impl Host {
    fn start() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("host.sock");
        let backend = dir.path().join("be");
        std::fs::create_dir(&backend).unwrap();
        let mut cfg = ServerConfig::new(&sock, dir.path().join("work"));
        cfg.workers = 2;
        let stop =
            Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop2, be) = (stop.clone(), backend.clone());
        let thread = std::thread::spawn(move || {
            let epoll = Rc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap());
            // The host's own fd, in the same epoll.
            epoll
                .add(
                    stop2.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, HOST_STOP),
                )
                .unwrap();
            let counts = Rc::new(Cell::new(HostCounts::default()));
            let registrar = EpollRegistrar {
                epoll: epoll.clone(),
                counts: counts.clone(),
            };
            let mut server = match Server::with_registrar(
                cfg,
                Arc::new(LocalFs::new(be)),
                Box::new(registrar),
            ) {
                Ok(s) => s,
                Err(e) => {
                    tx.send(Err(e.to_string())).unwrap();
                    return (Stats::default(), HostCounts::default());
                }
            };
            tx.send(Ok(())).unwrap();
            let mut events = vec![EpollEvent::empty(); 64];
            'host: loop {
                let n = match epoll.wait(&mut events, epoll_timeout(server.next_timeout())) {
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    Err(e) => panic!("epoll_wait: {e}"),
                };
                for ev in &events[..n] {
                    let mut c = counts.get();
                    match ev.data() {
                        HOST_STOP => break 'host,
                        id if id == LISTENER_ID as u64 => c.listener_events += 1,
                        id if id == COMPLETIONS_ID as u64 => c.completion_events += 1,
                        _ => c.connection_events += 1,
                    }
                    counts.set(c);
                    server.dispatch(ev.data() as usize);
                }
                server.handle_timeout();
            }
            let stats = server.stats();
            drop(server);
            (stats, counts.get())
        });
        rx.recv().unwrap().expect("server start");
        Host {
            sock,
            backend,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn stop(mut self) -> (Stats, HostCounts) {
        self.stop.write(1).unwrap();
        self.thread.take().unwrap().join().expect("host thread")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

#[test]
fn host_epoll_loop_serves_noop_getblob_fetchrange() {
    let host = Host::start();
    let data = pattern(6 * 1024 * 1024 + 123, 99);
    std::fs::write(host.backend.join("blob"), &data).unwrap();
    // Several clients at once, each checking bytes through its fd.
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let (sock, data) = (host.sock.clone(), data.clone());
            std::thread::spawn(move || {
                let mut c = Raw::connect(&sock);
                assert_eq!(c.call(&Request::Noop), Reply::Noop);
                let (token, result, fd) = c.get_blob(i as u32 + 1, "blob");
                assert_eq!(result, 0);
                let fd = File::from(fd.expect("fd"));
                let mut rng = Rng(i + 17);
                for _ in 0..20 {
                    let start = rng.below(data.len() as u64);
                    let count = rng.below(2 << 20) + 1;
                    let want = count.min(data.len() as u64 - start);
                    assert_eq!(c.fetch(token, start, count), (want, 0));
                    let mut got = vec![0u8; want as usize];
                    fd.read_exact_at(&mut got, start).unwrap();
                    assert!(got[..] == data[start as usize..(start + want) as usize]);
                }
                assert_eq!(c.get_blob(1, "missing").1, 2);
                assert_eq!(c.get_blob(1, "../x").1, 22);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    // A malformed client is closed; another one keeps working.
    let mut good = Raw::connect(&host.sock);
    let mut bad = Raw::connect(&host.sock);
    bad.send_bytes(&[0u8; 20]).unwrap();
    assert!(bad.is_closed(Duration::from_secs(10)));
    assert_eq!(good.call(&Request::Noop), Reply::Noop);
    drop((good, bad));
    let sock = host.sock.clone();
    let (stats, counts) = host.stop();
    assert!(!sock.exists(), "socket file left after the server dropped");
    assert_eq!(stats.accepted, 6, "{stats:?}");
    assert_eq!(stats.closed_malformed, 1);
    assert!(stats.fills_started > 0);
    assert!(counts.listener_events > 0, "{counts:?}");
    assert!(
        counts.completion_events > 0,
        "worker completions via the host"
    );
    assert!(counts.connection_events > 0);
    // Listener, completion fd and six clients; all deregistered by now.
    assert_eq!(counts.registered, 8, "{counts:?}");
    assert_eq!(counts.deregistered, counts.registered, "{counts:?}");
}

#[test]
fn host_loop_delivers_writable_for_backlogged_output() {
    let host = Host::start();
    let mut c = Raw::connect(&host.sock);
    let n = 60_000u64;
    let mut writer = c.sock.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let mut out = Vec::new();
        for tag in 1..=n {
            protocol::encode_request(&mut out, tag, true, &Request::Noop);
        }
        writer.write_all(&out).unwrap();
    });
    // Not reading yet: the daemon's replies fill the socket, so it must ask
    // the host for WRITABLE and be woken by EPOLLOUT to finish.
    std::thread::sleep(Duration::from_millis(300));
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (t, r) = c.recv().expect("reply");
        assert_eq!(r, Reply::Noop);
        assert!(t >= 1 && t <= n && seen.insert(t), "tag {t}");
    }
    w.join().unwrap();
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    drop(c);
    let (stats, counts) = host.stop();
    assert_eq!(stats.requests, n + 1);
    assert!(counts.writable_registrations > 0, "{counts:?}");
}
