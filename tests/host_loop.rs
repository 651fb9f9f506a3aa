//! Issue 2 item 4: a host event loop (plain edge-triggered epoll, the same
//! code as examples/host_loop.rs) drives the server in-process, with no
//! thread of the server's own, over real sockets.
mod common;
use blobmgr::backend::LocalFs;
use blobmgr::protocol::{self, Reply, Request};
use blobmgr::server::{Registrar, Server, Stats, COMPLETIONS_ID, LISTENER_ID};
use common::*;
use mio::Interest;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
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

/// Shared with the test thread, which may wait on a count while the host
/// runs.
type Counts = Arc<Mutex<HostCounts>>;

fn count(counts: &Counts, f: impl FnOnce(&mut HostCounts)) {
    f(&mut counts.lock().unwrap_or_else(|p| p.into_inner()));
}

struct EpollRegistrar {
    epoll: Rc<Epoll>,
    counts: Counts,
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
        count(&self.counts, f);
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

/// A host loop thread driving a server built with `with_registrar`, on the
/// shared in-process harness (temp dir, startup report, stop eventfd, join).
struct Host {
    server: InProc<(Stats, HostCounts)>,
    sock: PathBuf,
    backend: PathBuf,
    counts: Counts,
}

impl Host {
    fn start() -> Host {
        let counts = Counts::default();
        let host_counts = counts.clone();
        let server = InProc::spawn(
            |cfg, _| cfg.workers = 2,
            move |cfg, dir| {
                let be = dir.join("be");
                std::fs::create_dir(&be)?;
                let epoll = Rc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
                let registrar = EpollRegistrar {
                    epoll: epoll.clone(),
                    counts: host_counts.clone(),
                };
                let server =
                    Server::with_registrar(cfg, Arc::new(LocalFs::new(be)), Box::new(registrar))?;
                Ok((server, epoll, host_counts))
            },
            |(server, epoll, counts), stop| host_loop(server, &epoll, &counts, stop),
        );
        Host {
            sock: server.sock.clone(),
            backend: server.dir().join("be"),
            server,
            counts,
        }
    }

    fn counts(&self) -> HostCounts {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(self) -> (Stats, HostCounts) {
        self.server.stop()
    }
}

/// The host's event loop: one epoll for its own fd (the stop eventfd) and
/// every fd the server registered through the registrar.
fn host_loop(
    mut server: Server,
    epoll: &Epoll,
    counts: &Counts,
    stop: BorrowedFd<'_>,
) -> (Stats, HostCounts) {
    epoll
        .add(stop, EpollEvent::new(EpollFlags::EPOLLIN, HOST_STOP))
        .unwrap();
    let mut events = vec![EpollEvent::empty(); 64];
    'host: loop {
        let n = match epoll.wait(&mut events, epoll_timeout(server.next_timeout())) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => panic!("epoll_wait: {e}"),
        };
        for ev in &events[..n] {
            match ev.data() {
                HOST_STOP => break 'host,
                id if id == LISTENER_ID as u64 => count(counts, |c| c.listener_events += 1),
                id if id == COMPLETIONS_ID as u64 => count(counts, |c| c.completion_events += 1),
                _ => count(counts, |c| c.connection_events += 1),
            }
            server.dispatch(ev.data() as usize);
        }
        server.handle_timeout();
    }
    let stats = server.stats();
    drop(server);
    let counts = *counts.lock().unwrap_or_else(|p| p.into_inner());
    (stats, counts)
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
                let mut rng = Rng::new(i + 17);
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
    // the host for WRITABLE and be woken by EPOLLOUT to finish. Read only
    // once it has asked.
    assert!(
        wait_until(Duration::from_secs(20), || host
            .counts()
            .writable_registrations
            > 0),
        "the server never asked the host for WRITABLE: {:?}",
        host.counts()
    );
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
