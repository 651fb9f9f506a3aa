//! The public face of the daemon: a [`Server`] wires the [`Reactor`]
//! (sockets), the [`Service`] (the protocol's rules) and the worker pool
//! (slow work), and exposes the calls a host event loop drives it with.
//!
//! Two ways to drive it. [`Server::run`] owns a mio `Poll` and loops until a
//! stop fd becomes readable. A host event loop instead builds the server with
//! [`Server::with_registrar`], receives every registration through the
//! [`Registrar`] it passed, and calls [`Server::dispatch`] (or
//! [`Server::handle_incoming_connection`], [`Server::handle_event`] and
//! [`Server::handle_completions`]) with the id of each ready fd, and
//! [`Server::handle_timeout`] once [`Server::next_timeout`] has passed.

use crate::backend::Backend;
use crate::cache::{CacheConfig, Index};
use crate::jobs::{JobOutput, Runner};
use crate::listener::Listener;
use crate::metrics::http::{MetricsAddr, MetricsServer};
use crate::metrics::{Metrics, Op, Outcome};
use crate::reactor::{Limits, Reactor, ReadHint};
use crate::reference::AllowList;
use crate::service::Service;
use crate::source::{SharedBackend, Sources};
use crate::worker::{Completion, WorkerPool};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::reactor::{Registrar, LISTENER_ID};

/// Event id of the worker completion fd.
pub const COMPLETIONS_ID: usize = usize::MAX - 1;
const STOP_ID: usize = usize::MAX - 2;

/// Everything the daemon is configured with. A flat list, one field per
/// setting of `serve` (grouping them would only split that list).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub sock: PathBuf,
    /// Permission bits of the socket file.
    pub sock_mode: u32,
    /// Group of the socket file (with a mode such as 0660, the members of
    /// this group may connect; the uid allow list still applies).
    pub sock_group: Option<u32>,
    pub cache: CacheConfig,
    pub workers: usize,
    pub max_conns: usize,
    /// Peers whose uid is not listed are closed before any request is read.
    pub allow_uids: Vec<u32>,
    /// Requests per connection waiting on workers before reading pauses.
    pub max_inflight: usize,
    /// Queued reply bytes per connection before reading pauses.
    pub max_output: usize,
    /// Open tokens per connection; a GetBlob beyond it retires the
    /// connection's least recently used token (never EMFILE: CONTRACT.md).
    pub max_tokens: usize,
    /// A backend call (open or fill job) running longer than this is
    /// abandoned: its requests fail and a replacement worker is started.
    pub backend_timeout: Duration,
    /// Where `GET /metrics` is served (on a thread of its own); empty: not.
    pub metrics: Vec<MetricsAddr>,
    /// The backend of blob references (`HOST/REPO@sha256:HEX`), with the
    /// hosts references may name; `None`: references answer EIO.
    pub references: Option<(SharedBackend, AllowList)>,
}

/// Default for `--backend-timeout`.
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Default for `--max-conns`.
pub const DEFAULT_MAX_CONNS: usize = 16384;

impl ServerConfig {
    pub fn new(sock: impl Into<PathBuf>, workdir: impl Into<PathBuf>) -> ServerConfig {
        let me = nix::unistd::geteuid().as_raw();
        let mut allow_uids = vec![me];
        if me != 0 {
            allow_uids.push(0);
        }
        ServerConfig {
            sock: sock.into(),
            sock_mode: 0o600,
            sock_group: None,
            cache: CacheConfig::new(workdir),
            workers: 4,
            max_conns: DEFAULT_MAX_CONNS,
            allow_uids,
            max_inflight: 1024,
            max_output: 1 << 20,
            max_tokens: 4096,
            backend_timeout: DEFAULT_BACKEND_TIMEOUT,
            metrics: Vec::new(),
            references: None,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_conns: self.max_conns,
            allow_uids: self.allow_uids.clone(),
            max_inflight: self.max_inflight,
            max_output: self.max_output,
        }
    }
}

/// Counters, readable at any time through [`Server::stats`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub accepted: u64,
    pub refused: u64,
    pub closed_malformed: u64,
    pub requests: u64,
    pub fetch_hits: u64,
    pub fills_started: u64,
    pub fills_failed: u64,
    pub accept_backoffs: u64,
    pub jobs_timed_out: u64,
    /// Bytes of blob data the cache counts against its limit.
    pub cache_bytes: u64,
}

impl Stats {
    fn from_metrics(m: &Metrics) -> Stats {
        let hits =
            m.requests(Op::FetchRange, Outcome::Hit) + m.requests(Op::Prefetch, Outcome::Hit);
        Stats {
            accepted: m.conns.accepted.get(),
            refused: m.conns.refused.get(),
            closed_malformed: m.conns.closed_malformed.get(),
            accept_backoffs: m.conns.accept_backoffs.get(),
            requests: m.work.received.get(),
            fetch_hits: hits,
            fills_started: m.work.fills_started.get(),
            fills_failed: m.work.fills_failed.get(),
            jobs_timed_out: m.work.jobs_timed_out.get(),
            cache_bytes: m.cache.bytes.get(),
        }
    }
}

/// The blob manager server. See the module docs for the two ways to run it.
pub struct Server {
    backend_timeout: Duration,
    poll: Option<Poll>,
    reactor: Reactor,
    service: Service,
    pool: WorkerPool<JobOutput>,
    runner: Runner,
    completions: Vec<Completion<JobOutput>>,
    /// When to look for jobs past the backend timeout next.
    next_expiry: Option<Instant>,
    metrics: Arc<Metrics>,
    /// The metrics thread, if `--metrics` asked for one; stops on drop.
    _endpoint: Option<MetricsServer>,
}

impl Server {
    /// A server with its own mio `Poll`, to be driven by [`Server::run`].
    pub fn new(cfg: ServerConfig, backend: Arc<dyn Backend>) -> io::Result<Server> {
        Server::with_listener(cfg, backend, None)
    }

    /// [`Server::new`] accepting on `listener`, a socket made elsewhere
    /// ([`Listener::from_fd`]: systemd's socket activation); `None` binds
    /// `cfg.sock` as [`Server::new`] does.
    pub fn with_listener(
        cfg: ServerConfig,
        backend: Arc<dyn Backend>,
        listener: Option<Listener>,
    ) -> io::Result<Server> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let mut s = Server::build(cfg, backend, Box::new(registry), listener)?;
        s.poll = Some(poll);
        Ok(s)
    }

    /// A server whose fds are registered with a host's event loop through
    /// `registrar`; the host calls [`Server::dispatch`] with ready ids and
    /// [`Server::handle_timeout`] after [`Server::next_timeout`] elapses.
    pub fn with_registrar(
        cfg: ServerConfig,
        backend: Arc<dyn Backend>,
        registrar: Box<dyn Registrar>,
    ) -> io::Result<Server> {
        Server::build(cfg, backend, registrar, None)
    }

    fn build(
        cfg: ServerConfig,
        backend: Arc<dyn Backend>,
        registrar: Box<dyn Registrar>,
        listener: Option<Listener>,
    ) -> io::Result<Server> {
        cfg.cache.prepare()?;
        let listener = match listener {
            Some(l) => l,
            None => Listener::bind(&cfg.sock, cfg.sock_mode, cfg.sock_group, 4096)?,
        };
        let pool = WorkerPool::new(cfg.workers)?;
        let (references, allow) = match cfg.references.clone() {
            Some((SharedBackend(b), allow)) => (Some(b), allow),
            None => (None, AllowList::default()),
        };
        let sources = Arc::new(Sources::new(backend.clone(), references, allow));
        let metrics = Arc::new(Metrics::default());
        let endpoint = start_endpoint(&cfg, &metrics, &sources)?;
        let reactor = Reactor::new(registrar, listener, cfg.limits(), metrics.clone())?;
        reactor
            .registrar()
            .register(pool.completion_fd(), COMPLETIONS_ID, Interest::READABLE)?;
        log::info!(
            "serving {} on {} (workers {}, granule {} KiB, max {} connections)",
            backend.describe(),
            cfg.sock.display(),
            cfg.workers,
            cfg.cache.granule / 1024,
            cfg.max_conns
        );
        let cache = Arc::new(cfg.cache.clone());
        let index = Index::new(cache.clone());
        let service = Service::new(sources.clone(), index, cfg.max_tokens, metrics.clone());
        Ok(Server {
            backend_timeout: cfg.backend_timeout,
            poll: None,
            reactor,
            service,
            pool,
            runner: Runner::new(sources, cache),
            completions: Vec::new(),
            next_expiry: None,
            metrics,
            _endpoint: endpoint,
        })
    }

    pub fn stats(&self) -> Stats {
        Stats::from_metrics(&self.metrics)
    }

    /// Every counter and gauge, as the metrics endpoint renders them.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Jobs waiting in the worker pool's queues for a thread (running ones
    /// not included): what other clients' new work would wait behind.
    pub fn queued_jobs(&self) -> usize {
        self.pool.queued()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.reactor.connections()
    }

    /// The listening socket's fd (registered as [`LISTENER_ID`]).
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.reactor.listener_fd()
    }

    /// Whether the socket file is this server's to remove at a stop (it
    /// bound the socket, or an upgrade handed it a socket its predecessor
    /// bound); false for a socket systemd passed. An upgrade hands this on.
    pub fn owns_socket_file(&self) -> bool {
        self.reactor.listener_owns_file()
    }

    /// The worker completion fd (registered as [`COMPLETIONS_ID`]).
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.pool.completion_fd()
    }

    /// Runs the reactor until `stop` (if given) becomes readable.
    pub fn run(&mut self, stop: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut poll = self.poll.take().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "server is driven by a host loop",
            )
        })?;
        let stop_fd = stop.map(|f| f.as_raw_fd());
        if let Some(fd) = stop_fd {
            poll.registry()
                .register(&mut SourceFd(&fd), Token(STOP_ID), Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(1024);
        let result = loop {
            if let Err(e) = poll.poll(&mut events, self.next_timeout()) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(e);
            }
            let mut stopping = false;
            for ev in events.iter() {
                match ev.token().0 {
                    STOP_ID => stopping = true,
                    id @ (LISTENER_ID | COMPLETIONS_ID) => self.dispatch(id),
                    id => {
                        // A hang-up already reported goes unseen by a
                        // short read: read on to EOF in that case.
                        let hint = if ev.is_read_closed() || ev.is_error() {
                            ReadHint::UntilWouldBlock
                        } else {
                            ReadHint::ShortReadDrains
                        };
                        self.reactor.handle_event(id, hint, &mut self.service);
                        self.submit_jobs();
                    }
                }
            }
            self.handle_timeout();
            if stopping {
                break Ok(());
            }
        };
        if let Some(fd) = stop_fd {
            let _ = poll.registry().deregister(&mut SourceFd(&fd));
        }
        self.poll = Some(poll);
        result
    }

    /// Handles readiness of the fd registered with `id`.
    pub fn dispatch(&mut self, id: usize) {
        match id {
            LISTENER_ID => self.handle_incoming_connection(),
            COMPLETIONS_ID => self.handle_completions(),
            id => self.handle_event(id),
        }
    }

    /// When the host should call [`Server::handle_timeout`] at the latest
    /// (zero: at once, before waiting for events).
    pub fn next_timeout(&self) -> Option<Duration> {
        let at = match (self.reactor.next_deadline(), self.next_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        at.map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// Serves connections left with input, resumes accepting once an
    /// fd-exhaustion backoff has passed, and fails the requests of backend
    /// jobs that ran past the backend timeout.
    pub fn handle_timeout(&mut self) {
        self.reactor.handle_timeout(&mut self.service);
        if matches!(self.next_expiry, Some(t) if Instant::now() >= t) {
            self.expire_jobs();
        }
        self.submit_jobs();
    }

    /// Accepts every pending connection.
    pub fn handle_incoming_connection(&mut self) {
        self.reactor.accept(&mut self.service);
    }

    /// Handles readiness of connection `id`: reads and answers everything
    /// available, then writes what it can. Stale ids are ignored.
    pub fn handle_event(&mut self, id: usize) {
        self.reactor
            .handle_event(id, ReadHint::UntilWouldBlock, &mut self.service);
        self.submit_jobs();
    }

    /// Takes finished worker jobs and answers whoever waited on them.
    pub fn handle_completions(&mut self) {
        let mut done = std::mem::take(&mut self.completions);
        self.pool.take_completions(&mut done);
        for c in done.drain(..) {
            self.service.job_done(c.id, c.result);
        }
        self.completions = done;
        self.deliver();
    }

    /// Hands the service's replies to the reactor and its jobs to the pool.
    fn deliver(&mut self) {
        self.reactor.deliver(&mut self.service);
        self.reactor.flush_listed(&mut self.service);
        self.submit_jobs();
    }

    /// Hands the service's new jobs to the pool, moves promoted ones ahead,
    /// and cancels the queued jobs that only closed connections waited for.
    fn submit_jobs(&mut self) {
        let mut any = self.submit_started();
        for id in self.service.take_promoted() {
            self.pool.promote(id);
        }
        // After the submissions: a job started and orphaned in the same
        // turn is in the queue by now. Running jobs are left to finish.
        let orphans = self.service.take_orphans();
        if !orphans.is_empty() {
            let cancelled = self.pool.cancel(&orphans);
            log::debug!(
                "{} queued jobs cancelled: only closed connections waited for them",
                cancelled.len()
            );
            for id in cancelled {
                self.service.job_cancelled(id);
            }
            // Their release may have evicted blobs: deletes to submit.
            any |= self.submit_started();
        }
        if any && self.next_expiry.is_none() {
            // The first job of a busy period arms the expiry check.
            self.next_expiry = Some(Instant::now() + self.backend_timeout);
        }
    }

    /// Submits the jobs the service started; returns whether there were any.
    fn submit_started(&mut self) -> bool {
        let mut any = false;
        for (id, kind) in self.service.take_jobs() {
            self.pool
                .submit_then(id, kind.priority(), self.runner.work(kind));
            any = true;
        }
        any
    }

    fn expire_jobs(&mut self) {
        let limit = self.backend_timeout;
        let expired = self.pool.expire(limit, Instant::now());
        for id in expired.stuck {
            let others = self.service.job_expired(id, limit);
            for other in self.pool.cancel(&others) {
                self.service.job_done(other, None);
            }
        }
        for id in expired.dropped {
            log::warn!("backend job {id} waited {limit:?} for a worker; failing its requests");
            self.service.job_done(id, None);
        }
        // Jobs that start later are checked one timeout from now at the latest.
        let horizon = Instant::now() + limit;
        self.next_expiry = if self.pool.busy() {
            Some(expired.next.map_or(horizon, |n| n.min(horizon)))
        } else {
            None
        };
        self.deliver();
    }

    /// Stops accepting and reading, answers every request already read
    /// (waiting up to `limit` for the jobs they need), then closes every
    /// connection: a graceful stop, or with `handover` the end of this
    /// process's part in an upgrade (the socket file then stays for the
    /// process that took a copy of the listening socket). Needs the
    /// server's own `Poll`.
    pub fn drain(&mut self, limit: Duration, handover: bool) -> io::Result<()> {
        let mut poll = self.poll.take().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "server is driven by a host loop",
            )
        })?;
        self.reactor.begin_drain(handover);
        // Readahead nobody waits for is not worth a slower stop.
        let ahead = self.service.readahead_jobs();
        for id in self.pool.cancel(&ahead) {
            self.service.job_done(id, None);
        }
        let end = Instant::now() + limit;
        let mut events = Events::with_capacity(256);
        let result = loop {
            if self.service.idle() && self.reactor.flushed() {
                break Ok(());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("handover: requests still waiting after {limit:?}; closing anyway");
                break Ok(());
            }
            let wait = self.next_timeout().map_or(left, |t| t.min(left));
            if let Err(e) = poll.poll(&mut events, Some(wait)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(e);
            }
            for ev in events.iter() {
                match ev.token().0 {
                    LISTENER_ID => {}
                    id => self.dispatch(id),
                }
            }
            self.handle_timeout();
        };
        self.reactor.close_all(&mut self.service);
        self.poll = Some(poll);
        result
    }

    /// Makes every ready range durable (used at shutdown).
    pub fn checkpoint(&self) {
        for b in self.service.index().blobs() {
            if let Err(e) = b.checkpoint() {
                log::warn!("checkpoint of blob {}: {e}", b.id());
            }
        }
    }
}

/// Starts the metrics thread if `cfg` names addresses for it.
fn start_endpoint(
    cfg: &ServerConfig,
    metrics: &Arc<Metrics>,
    sources: &Arc<Sources>,
) -> io::Result<Option<MetricsServer>> {
    if cfg.metrics.is_empty() {
        return Ok(None);
    }
    let (m, b) = (metrics.clone(), sources.clone());
    let render = Box::new(move || m.render(&b.endpoint_stats()));
    MetricsServer::start(&cfg.metrics, cfg.sock_mode, cfg.sock_group, render).map(Some)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self
            .reactor
            .registrar()
            .deregister(self.pool.completion_fd());
        self.pool.cancel_queued();
        self.pool.join();
        self.checkpoint();
        // The reactor drops after this: it deregisters its connections and
        // the listener, whose own Drop removes the socket file.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalFs;
    use crate::connection::ConnId;
    use crate::protocol::{decode_reply, encode_request, Reply, Request};
    use std::io::{Read, Write};

    /// Replies flushed by the event that produced them leave nothing on the
    /// flush list: it must not grow with the number of requests served.
    #[test]
    fn flush_list_stays_bounded_without_completions() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServerConfig::new(dir.path().join("s.sock"), dir.path().join("work"));
        let be = Arc::new(LocalFs::new(dir.path()));
        let mut server = Server::new(cfg, be).unwrap();
        let mut client =
            std::os::unix::net::UnixStream::connect(dir.path().join("s.sock")).unwrap();
        server.handle_incoming_connection();
        assert_eq!(server.connections(), 1);
        let id = ConnId::new(1, 0).event();
        let mut wire = Vec::new();
        encode_request(&mut wire, 7, true, &Request::Noop);
        let mut buf = [0u8; 64];
        for _ in 0..1000 {
            client.write_all(&wire).unwrap();
            server.handle_event(id);
            let n = client.read(&mut buf).unwrap();
            assert_eq!(decode_reply(&buf[..n]).unwrap().unwrap().1, Reply::Noop);
        }
        assert!(
            server.reactor.listed() <= 1,
            "flush list holds {}",
            server.reactor.listed()
        );
    }
}
