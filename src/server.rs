//! The reactor: one thread owns the listener, a slab of connections and the
//! cache's bookkeeping; everything slow goes to the worker pool, whose
//! completions come back through an eventfd.
//!
//! Two ways to drive it. [`Server::run`] owns a mio `Poll` and loops until a
//! stop fd becomes readable. A host event loop instead builds the server with
//! [`Server::with_registrar`], receives every registration through the
//! [`Registrar`] it passed, and calls [`Server::dispatch`] (or
//! [`Server::handle_incoming_connection`], [`Server::handle_event`] and
//! [`Server::handle_completions`]) with the id of each ready fd.

use crate::backend::Backend;
use crate::cache::{libc_errno, Blob, BlobKey, Cache, CacheConfig, FetchStart, JobId, OpenError};
use crate::connection::{ConnError, Connection, Peer, ReadStatus};
use crate::listener::Listener;
use crate::protocol::{self, Message, Reply, Request};
use crate::worker::{Completion, WorkerPool};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Event id of the listening socket.
pub const LISTENER_ID: usize = usize::MAX;
/// Event id of the worker completion fd.
pub const COMPLETIONS_ID: usize = usize::MAX - 1;
const STOP_ID: usize = usize::MAX - 2;

/// Connection ids are `generation << KEY_BITS | slab key`, so an event for a
/// closed connection can never reach the one that reused its slot.
const KEY_BITS: u32 = 24;
const KEY_MASK: usize = (1 << KEY_BITS) - 1;

/// The event id of the connection in slab slot `key` with `generation`.
fn conn_id(generation: usize, key: usize) -> usize {
    generation << KEY_BITS | key
}

/// How long accepting pauses after running out of fds.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Read buffer lent to every connection in turn.
const SCRATCH_SIZE: usize = 64 * 1024;
/// Reads one readiness event may do before the connection goes to the back
/// of the line, so one busy client cannot starve the others.
const READ_BUDGET: usize = 16;

/// Where a host registers the server's fds. Ids are opaque to the host: it
/// passes them back to [`Server::dispatch`] when the fd is ready. The server
/// drains every fd until it would block, so edge-triggered registration is
/// right; WRITABLE is asked for only while output is pending.
pub trait Registrar {
    fn register(&self, fd: RawFd, id: usize, interest: Interest) -> io::Result<()>;
    fn reregister(&self, fd: RawFd, id: usize, interest: Interest) -> io::Result<()>;
    fn deregister(&self, fd: RawFd) -> io::Result<()>;
}

impl Registrar for mio::Registry {
    fn register(&self, fd: RawFd, id: usize, interest: Interest) -> io::Result<()> {
        mio::Registry::register(self, &mut SourceFd(&fd), Token(id), interest)
    }
    fn reregister(&self, fd: RawFd, id: usize, interest: Interest) -> io::Result<()> {
        mio::Registry::reregister(self, &mut SourceFd(&fd), Token(id), interest)
    }
    fn deregister(&self, fd: RawFd) -> io::Result<()> {
        mio::Registry::deregister(self, &mut SourceFd(&fd))
    }
}

/// Everything the daemon is configured with.
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
    /// Open tokens per connection; GetBlob beyond it answers EMFILE.
    pub max_tokens: usize,
    /// A backend call (open or fill job) running longer than this is
    /// abandoned: its requests fail and a replacement worker is started.
    pub backend_timeout: Duration,
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
}

/// Per-connection protocol state: the current generation and its tokens.
#[derive(Default)]
struct Session {
    generation: u32,
    next_n: u32,
    tokens: HashMap<u32, BlobKey>,
}

struct Client {
    generation: usize,
    conn: Connection,
    session: Session,
    /// Requests of this connection waiting on workers.
    inflight: usize,
    /// Reading stopped because of backpressure; resumed when it clears.
    read_paused: bool,
    /// In the list of connections to flush at the end of this turn.
    dirty: bool,
}

impl Client {
    fn over_limit(&self, cfg: &ServerConfig) -> bool {
        self.inflight >= cfg.max_inflight || self.conn.pending_output() >= cfg.max_output
    }
}

/// A FetchRange waiting on fill jobs.
struct PendingFetch {
    conn: usize,
    tag: u64,
    token: u64,
    count: u64,
    remaining: usize,
    failed: bool,
    reply: bool,
}

/// A GetBlob waiting for its blob to be opened.
struct PendingOpen {
    conn: usize,
    tag: u64,
    generation: u32,
}

/// What a worker job produced.
pub enum JobOutcome {
    Opened(Result<Blob, OpenError>),
    /// A fill; on success, the blob if the fill completed it.
    Filled(Result<Option<Arc<Blob>>, crate::backend::BackendError>),
    Deleted(io::Result<()>),
    Checkpointed(io::Result<()>),
}

/// Open jobs use ids with this bit set; fill job ids come from the cache.
const OPEN_JOB: u64 = 1 << 63;
/// Eviction (file deletion) jobs use ids with this bit set.
const DELETE_JOB: u64 = 1 << 62;
/// Checkpoint jobs (nobody waits on them) use ids with this bit set.
const CHECKPOINT_JOB: u64 = 1 << 61;

/// The blob manager server. See the module docs for the two ways to run it.
pub struct Server {
    cfg: ServerConfig,
    poll: Option<Poll>,
    registrar: Box<dyn Registrar>,
    // Field order is drop order: workers stop before the cache is
    // checkpointed and the socket file removed (see `Drop`).
    pool: WorkerPool<JobOutcome>,
    listener: Listener,
    backend: Arc<dyn Backend>,
    cache: Cache<usize>,
    conns: Slab<Client>,
    next_generation: usize,
    pending: Slab<PendingFetch>,
    opening: HashMap<String, Vec<PendingOpen>>,
    open_jobs: HashMap<JobId, String>,
    /// Counter behind open, delete and checkpoint job ids (see `new_job_id`).
    next_job: u64,
    /// Evicted blobs whose files are being deleted; GetBlob of one waits.
    delete_jobs: HashMap<JobId, String>,
    deleting: std::collections::HashSet<String>,
    dirty: Vec<usize>,
    scratch: Vec<u8>,
    msgs: Vec<Message>,
    completions: Vec<Completion<JobOutcome>>,
    accept_paused_until: Option<Instant>,
    /// When to look for jobs past the backend timeout next.
    next_expiry: Option<Instant>,
    /// Connections that used up their read budget with input maybe left;
    /// served again before the next wait (no new edge would report them).
    backlog: Vec<usize>,
    /// Set while [`Server::run`] handles a readiness edge that did not
    /// report the peer's hang-up: a short read then means the socket is
    /// empty and later bytes bring a new edge, so reading stops there
    /// instead of spending a read on WouldBlock.
    trust_short_reads: bool,
    stats: Stats,
}

impl Server {
    /// A server with its own mio `Poll`, to be driven by [`Server::run`].
    pub fn new(cfg: ServerConfig, backend: Arc<dyn Backend>) -> io::Result<Server> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let mut s = Server::with_registrar(cfg, backend, Box::new(registry))?;
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
        cfg.cache.prepare()?;
        let listener = Listener::bind(&cfg.sock, cfg.sock_mode, cfg.sock_group, 4096)?;
        let pool = WorkerPool::new(cfg.workers)?;
        registrar.register(
            listener.inner().as_raw_fd(),
            LISTENER_ID,
            Interest::READABLE,
        )?;
        registrar.register(pool.completion_raw_fd(), COMPLETIONS_ID, Interest::READABLE)?;
        log::info!(
            "serving {} on {} (workers {}, granule {} KiB, max {} connections)",
            backend.describe(),
            cfg.sock.display(),
            cfg.workers,
            cfg.cache.granule / 1024,
            cfg.max_conns
        );
        let cache = Cache::new(Arc::new(cfg.cache.clone()));
        Ok(Server {
            cfg,
            poll: None,
            registrar,
            pool,
            listener,
            backend,
            cache,
            conns: Slab::new(),
            next_generation: 1,
            pending: Slab::new(),
            opening: HashMap::new(),
            open_jobs: HashMap::new(),
            next_job: 1,
            delete_jobs: HashMap::new(),
            deleting: std::collections::HashSet::new(),
            dirty: Vec::new(),
            scratch: vec![0u8; SCRATCH_SIZE],
            msgs: Vec::new(),
            completions: Vec::new(),
            accept_paused_until: None,
            next_expiry: None,
            backlog: Vec::new(),
            trust_short_reads: false,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.fills_started = self.cache.fills_started;
        s
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The listening socket's fd (registered as [`LISTENER_ID`]).
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.inner().as_fd()
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
                        self.trust_short_reads = !(ev.is_read_closed() || ev.is_error());
                        self.handle_event(id);
                        self.trust_short_reads = false;
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
        if !self.backlog.is_empty() {
            return Some(Duration::ZERO);
        }
        let at = match (self.accept_paused_until, self.next_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        at.map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// Resumes accepting once an fd-exhaustion backoff has passed, and fails
    /// the requests of backend jobs that ran past the backend timeout.
    pub fn handle_timeout(&mut self) {
        for id in std::mem::take(&mut self.backlog) {
            self.handle_event(id);
        }
        let now = Instant::now();
        if matches!(self.accept_paused_until, Some(t) if now >= t) {
            self.accept_paused_until = None;
            self.handle_incoming_connection();
        }
        if matches!(self.next_expiry, Some(t) if now >= t) {
            self.expire_jobs();
        }
    }

    fn expire_jobs(&mut self) {
        let limit = self.cfg.backend_timeout;
        let expired = self.pool.expire(limit);
        let next = expired.next;
        for id in expired.stuck {
            self.stats.jobs_timed_out += 1;
            log::warn!("backend job {id} still running after {limit:?}; failing its requests");
            if id & (OPEN_JOB | DELETE_JOB | CHECKPOINT_JOB) == 0 {
                // The blob's queued fills would hang the same way.
                let others = self.cache.fill_timed_out(id, limit);
                for other in self.pool.cancel(&others) {
                    self.finish_job(Completion {
                        id: other,
                        result: None,
                    });
                }
            }
            self.finish_job(Completion { id, result: None });
        }
        for id in expired.dropped {
            self.stats.jobs_timed_out += 1;
            log::warn!("backend job {id} waited {limit:?} for a worker; failing its requests");
            self.finish_job(Completion { id, result: None });
        }
        // Jobs that start later are checked one timeout from now at the latest.
        let horizon = Instant::now() + limit;
        self.next_expiry = if self.pool.busy() {
            Some(next.map_or(horizon, |n| n.min(horizon)))
        } else {
            None
        };
        self.flush_dirty();
    }

    /// Arms the expiry check when the first job of a busy period starts.
    fn arm_expiry(&mut self) {
        if self.next_expiry.is_none() {
            self.next_expiry = Some(Instant::now() + self.cfg.backend_timeout);
        }
    }

    /// Accepts every pending connection.
    pub fn handle_incoming_connection(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            match self.listener.inner().accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: temporary. Keep serving
                    // the connections we have and retry after a pause.
                    self.stats.accept_backoffs += 1;
                    if self.stats.accept_backoffs.is_power_of_two() {
                        log::warn!(
                            "accept failed ({e}); pausing accepts for {ACCEPT_BACKOFF:?} ({} times so far)",
                            self.stats.accept_backoffs
                        );
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
    }

    fn admit(&mut self, stream: mio::net::UnixStream) {
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("closing a new connection: cannot read peer credentials: {e}");
                return;
            }
        };
        if !self.cfg.allow_uids.contains(&peer.uid) {
            self.stats.refused += 1;
            log::warn!("refused connection from {peer}: uid not allowed");
            return;
        }
        if self.conns.len() >= self.cfg.max_conns {
            self.stats.refused += 1;
            log::warn!(
                "refused connection from {peer}: {} connections open (--max-conns)",
                self.conns.len()
            );
            return;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if key > KEY_MASK {
            log::warn!("refused connection from {peer}: connection table full");
            return;
        }
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & (usize::MAX >> (KEY_BITS + 2));
        let id = conn_id(generation, key);
        if let Err(e) = self
            .registrar
            .register(stream.as_raw_fd(), id, Interest::READABLE)
        {
            log::warn!("closing connection from {peer}: register: {e}");
            return;
        }
        log::debug!("connection {id:#x} from {peer}");
        entry.insert(Client {
            generation,
            conn: Connection::new(stream, peer),
            session: Session::default(),
            inflight: 0,
            read_paused: false,
            dirty: false,
        });
        self.stats.accepted += 1;
        // Bytes that arrived before registration are reported by the first
        // poll after it: epoll checks readiness when an fd is added.
    }

    fn live_key(&self, id: usize) -> Option<usize> {
        let key = id & KEY_MASK;
        match self.conns.get(key) {
            Some(c) if c.generation == id >> KEY_BITS => Some(key),
            _ => None,
        }
    }

    /// Handles readiness of connection `id`: reads and answers everything
    /// available, then writes what it can. Stale ids are ignored.
    pub fn handle_event(&mut self, id: usize) {
        if let Some(key) = self.live_key(id) {
            self.serve(key);
        }
    }

    /// Reads, answers and writes until the connection would block, resuming
    /// reads whenever writing clears backpressure.
    fn serve(&mut self, key: usize) {
        let mut budget = READ_BUDGET;
        loop {
            if !self.read_requests(key, &mut budget) {
                return;
            }
            self.submit_jobs();
            if !self.flush(key) || !self.resume_reading(key) {
                return;
            }
        }
    }

    /// Clears a backpressure pause once the connection is under its limits;
    /// returns whether reading should go on.
    fn resume_reading(&mut self, key: usize) -> bool {
        let c = &mut self.conns[key];
        if c.read_paused && !c.over_limit(&self.cfg) {
            c.read_paused = false;
            return true;
        }
        false
    }

    /// Reads until the socket would block, backpressure stops it or the
    /// budget is spent. Returns false if the connection was closed.
    fn read_requests(&mut self, key: usize, budget: &mut usize) -> bool {
        loop {
            let client = &mut self.conns[key];
            if client.read_paused {
                return true;
            }
            if *budget == 0 {
                // A duplicate entry costs one EAGAIN read at most.
                self.backlog.push(conn_id(client.generation, key));
                return true;
            }
            *budget -= 1;
            self.msgs.clear();
            match client.conn.read_messages(&mut self.scratch, &mut self.msgs) {
                Ok(ReadStatus::Data) => {}
                Ok(ReadStatus::WouldBlock) => return true,
                Ok(ReadStatus::Eof) => {
                    self.close(key, None);
                    return false;
                }
                Err(e) => {
                    self.close(key, Some(e));
                    return false;
                }
            }
            let mut msgs = std::mem::take(&mut self.msgs);
            for m in msgs.drain(..) {
                self.handle_request(key, m);
            }
            self.msgs = msgs;
            let client = &mut self.conns[key];
            if client.over_limit(&self.cfg) {
                client.read_paused = true;
                log::debug!(
                    "connection from {}: backpressure, reading paused",
                    client.conn.peer()
                );
                return true;
            }
            if self.trust_short_reads && client.conn.drained() {
                return true;
            }
        }
    }

    fn handle_request(&mut self, key: usize, m: Message) {
        self.stats.requests += 1;
        let tag = m.header.tag;
        let need_reply = m.header.need_reply();
        match m.request {
            Request::Noop => self.reply(key, tag, Reply::Noop, None),
            Request::GetBlob { generation, id } => self.get_blob(key, tag, generation, &id),
            Request::FetchRange {
                token,
                start,
                count,
            } => self.fetch_range(key, tag, need_reply, token, start, count),
        }
    }

    fn get_blob(&mut self, key: usize, tag: u64, generation: u32, raw: &[u8; 256]) {
        let session = &mut self.conns[key].session;
        if session.generation != generation {
            // Tokens of other generations can never be used again.
            session.generation = generation;
            for (_, blob) in session.tokens.drain() {
                self.cache.release(blob);
            }
        }
        let fail = |errno| Reply::GetBlob {
            token: 0,
            base: 0,
            result: errno,
        };
        let id = match protocol::parse_blob_id(raw) {
            Ok(id) => id,
            Err(e) => {
                log::debug!("GetBlob from {}: {e}", self.conns[key].conn.peer());
                return self.reply(key, tag, fail(libc_errno::EINVAL), None);
            }
        };
        let Some(id) = self.backend.canonical_id(id) else {
            return self.reply(key, tag, fail(libc_errno::EINVAL), None);
        };
        if let Some(blob) = self.cache.lookup(&id) {
            return self.answer_get_blob(key, tag, generation, blob);
        }
        let conn = self.id_of(key);
        let waiter = PendingOpen {
            conn,
            tag,
            generation,
        };
        self.conns[key].inflight += 1;
        if let Some(waiters) = self.opening.get_mut(&id) {
            waiters.push(waiter);
            return;
        }
        self.opening.insert(id.clone(), vec![waiter]);
        if !self.deleting.contains(&id) {
            self.start_open(id);
        }
    }

    /// Hands the opening of blob `id` to a worker; `opening[id]` waits on it.
    fn start_open(&mut self, id: String) {
        self.cache.forget_cold(&id);
        let job = self.new_job_id(OPEN_JOB);
        self.open_jobs.insert(job, id.clone());
        let cfg = self.cache.config().clone();
        let backend = self.backend.clone();
        self.pool.submit(job, move || {
            JobOutcome::Opened(Blob::open(&cfg, backend.as_ref(), &id))
        });
        self.arm_expiry();
    }

    /// Replies to a GetBlob whose blob is open: a new token and the fd.
    fn answer_get_blob(&mut self, key: usize, tag: u64, generation: u32, blob: BlobKey) {
        let s = &mut self.conns[key].session;
        if s.tokens.len() >= self.cfg.max_tokens {
            let r = Reply::GetBlob {
                token: 0,
                base: 0,
                result: libc_errno::EMFILE,
            };
            return self.reply(key, tag, r, None);
        }
        s.next_n = s.next_n.wrapping_add(1).max(1);
        let n = s.next_n;
        if generation == s.generation {
            s.tokens.insert(n, blob);
            self.cache.acquire(blob);
        }
        let fd = self.cache.blob(blob).map(|b| b.client_fd().clone());
        let r = Reply::GetBlob {
            token: (generation as u64) << 32 | n as u64,
            base: 0,
            result: 0,
        };
        self.reply(key, tag, r, fd);
    }

    fn fetch_range(
        &mut self,
        key: usize,
        tag: u64,
        need: bool,
        token: u64,
        start: u64,
        count: u64,
    ) {
        let s = &self.conns[key].session;
        let blob = match s.tokens.get(&(token as u32)) {
            Some(&b) if (token >> 32) as u32 == s.generation => b,
            _ => {
                let r = fetch_reply(token, 0, protocol::FETCH_GENERATION_MISMATCH);
                if need {
                    self.reply(key, tag, r, None);
                }
                return;
            }
        };
        let pid = self.pending.vacant_key();
        match self.cache.fetch(blob, start, count, pid) {
            FetchStart::Ready { count } => {
                self.stats.fetch_hits += 1;
                if need {
                    self.reply(
                        key,
                        tag,
                        fetch_reply(token, count, protocol::FETCH_OK),
                        None,
                    );
                }
            }
            FetchStart::OutOfRange | FetchStart::Unavailable => {
                if need {
                    self.reply(
                        key,
                        tag,
                        fetch_reply(token, 0, protocol::FETCH_FAILED),
                        None,
                    );
                }
            }
            FetchStart::Waiting { jobs, count } => {
                let conn = self.id_of(key);
                let got = self.pending.insert(PendingFetch {
                    conn,
                    tag,
                    token,
                    count,
                    remaining: jobs,
                    failed: false,
                    reply: need,
                });
                debug_assert_eq!(got, pid);
                self.conns[key].inflight += 1;
            }
        }
    }

    fn new_job_id(&mut self, kind: u64) -> JobId {
        let id = kind | self.next_job;
        self.next_job += 1;
        id
    }

    fn id_of(&self, key: usize) -> usize {
        conn_id(self.conns[key].generation, key)
    }

    fn reply(&mut self, key: usize, tag: u64, r: Reply, fd: Option<Arc<std::os::fd::OwnedFd>>) {
        let c = &mut self.conns[key];
        c.conn.queue_reply(tag, &r, fd);
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(key);
        }
    }

    fn submit_jobs(&mut self) {
        let backend = &self.backend;
        let mut any = false;
        for job in self.cache.take_new_jobs() {
            let backend = backend.clone();
            self.pool.submit(job.id, move || {
                let r = job.blob.fill(backend.as_ref(), job.g0, job.n);
                JobOutcome::Filled(r.map(|complete| complete.then(|| job.blob.clone())))
            });
            any = true;
        }
        for id in self.cache.take_evictions() {
            let job = self.new_job_id(DELETE_JOB);
            self.deleting.insert(id.clone());
            self.delete_jobs.insert(job, id.clone());
            let cfg = self.cache.config().clone();
            self.pool.submit(job, move || {
                JobOutcome::Deleted(crate::cache::remove_blob_files(&cfg, &id))
            });
            any = true;
        }
        if any {
            self.arm_expiry();
        }
    }

    fn finish_delete(&mut self, c: Completion<JobOutcome>) {
        let Some(id) = self.delete_jobs.remove(&c.id) else {
            return;
        };
        if let Some(JobOutcome::Deleted(Err(e))) = c.result {
            log::warn!("evicting blob {id}: {e}");
        }
        self.deleting.remove(&id);
        if self.opening.contains_key(&id) {
            // A GetBlob came while the files were going: open them anew.
            self.start_open(id);
        }
    }

    /// Takes finished worker jobs and answers whoever waited on them.
    pub fn handle_completions(&mut self) {
        let mut done = std::mem::take(&mut self.completions);
        self.pool.take_completions(&mut done);
        for c in done.drain(..) {
            self.finish_job(c);
        }
        self.completions = done;
        self.submit_jobs();
        self.flush_dirty();
    }

    fn finish_job(&mut self, c: Completion<JobOutcome>) {
        if c.id & OPEN_JOB != 0 {
            self.finish_open(c);
        } else if c.id & DELETE_JOB != 0 {
            self.finish_delete(c);
        } else if c.id & CHECKPOINT_JOB != 0 {
            if let Some(JobOutcome::Checkpointed(Err(e))) = c.result {
                log::warn!("checkpoint job {}: {e}", c.id);
            }
        } else {
            self.finish_fill(c);
        }
    }

    fn finish_open(&mut self, c: Completion<JobOutcome>) {
        let Some(id) = self.open_jobs.remove(&c.id) else {
            return;
        };
        let waiters = self.opening.remove(&id).unwrap_or_default();
        let result = match c.result {
            Some(JobOutcome::Opened(Ok(blob))) => Ok(self.cache.insert(blob)),
            Some(JobOutcome::Opened(Err(e))) => {
                log::info!("GetBlob {id}: {e}");
                Err(e.errno())
            }
            _ => Err(libc_errno::EIO),
        };
        for w in waiters {
            let Some(key) = self.live_key(w.conn) else {
                continue;
            };
            self.conns[key].inflight -= 1;
            match result {
                Ok(blob) => self.answer_get_blob(key, w.tag, w.generation, blob),
                Err(errno) => {
                    let r = Reply::GetBlob {
                        token: 0,
                        base: 0,
                        result: errno,
                    };
                    self.reply(key, w.tag, r, None);
                }
            }
        }
    }

    fn finish_fill(&mut self, c: Completion<JobOutcome>) {
        let ok = match c.result {
            Some(JobOutcome::Filled(Ok(complete))) => {
                if let Some(blob) = complete {
                    // Made durable after the waiters are answered: the reply
                    // needs the bytes in the page cache, not on the disk.
                    let id = self.new_job_id(CHECKPOINT_JOB);
                    self.pool
                        .submit(id, move || JobOutcome::Checkpointed(blob.checkpoint()));
                }
                true
            }
            Some(JobOutcome::Filled(Err(e))) => {
                log::warn!("fill job {}: {e}", c.id);
                false
            }
            // Panicked or timed out (already logged).
            _ => false,
        };
        if !ok {
            self.stats.fills_failed += 1;
        }
        for pid in self.cache.finish_fill(c.id, ok) {
            let Some(p) = self.pending.get_mut(pid) else {
                continue;
            };
            p.remaining -= 1;
            p.failed |= !ok;
            if p.remaining > 0 {
                continue;
            }
            let p = self.pending.remove(pid);
            let Some(key) = self.live_key(p.conn) else {
                continue;
            };
            self.conns[key].inflight -= 1;
            if p.reply {
                let r = if p.failed {
                    fetch_reply(p.token, 0, protocol::FETCH_FAILED)
                } else {
                    fetch_reply(p.token, p.count, protocol::FETCH_OK)
                };
                self.reply(key, p.tag, r, None);
            } else if !self.conns[key].dirty {
                // Its in-flight count changed: backpressure may clear.
                self.conns[key].dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            // `dirty` means "on the list", so the list holds each connection
            // at most once, however many replies it queued.
            let Some(c) = self.conns.get_mut(key) else {
                continue;
            };
            c.dirty = false;
            if self.flush(key) && self.resume_reading(key) {
                // No new edge will come for bytes that are already waiting.
                self.serve(key);
            }
        }
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    /// Writes what a connection has queued and adjusts its WRITABLE
    /// interest. Returns false if the connection was closed.
    fn flush(&mut self, key: usize) -> bool {
        let c = &mut self.conns[key];
        if let Err(e) = c.conn.flush() {
            self.close(key, Some(e));
            return false;
        }
        let want_write = c.conn.pending_output() > 0;
        if want_write != c.conn.write_registered {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let id = conn_id(c.generation, key);
            if let Err(e) = self
                .registrar
                .reregister(c.conn.stream().as_raw_fd(), id, interest)
            {
                self.close(key, Some(ConnError::Io(e)));
                return false;
            }
            c.conn.write_registered = want_write;
        }
        true
    }

    fn close(&mut self, key: usize, why: Option<ConnError>) {
        let c = self.conns.remove(key);
        for (_, blob) in c.session.tokens.iter() {
            self.cache.release(*blob);
        }
        let _ = self.registrar.deregister(c.conn.stream().as_raw_fd());
        match why {
            Some(e @ ConnError::Protocol(_)) => {
                self.stats.closed_malformed += 1;
                log::warn!("closing connection from {}: {e}", c.conn.peer());
            }
            Some(e) => log::info!("closing connection from {}: {e}", c.conn.peer()),
            None => log::debug!("connection from {} closed by peer", c.conn.peer()),
        }
        // Waiting requests stay in the pending tables; their replies are
        // dropped when their jobs finish, since this id no longer resolves.
    }

    /// Makes every ready range durable (used at shutdown).
    pub fn checkpoint(&self) {
        for b in self.cache.all_blobs() {
            if let Err(e) = b.checkpoint() {
                log::warn!("checkpoint of blob {}: {e}", b.id());
            }
        }
    }
}

fn fetch_reply(token: u64, count: u64, result: u32) -> Reply {
    Reply::FetchRange {
        token,
        count,
        result,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for (_, c) in self.conns.iter() {
            let _ = self.registrar.deregister(c.conn.stream().as_raw_fd());
        }
        let _ = self.registrar.deregister(self.listener.inner().as_raw_fd());
        let _ = self.registrar.deregister(self.pool.completion_raw_fd());
        self.pool.cancel_queued();
        self.pool.join();
        self.checkpoint();
        // The listener's own Drop removes the socket file after this.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalFs;
    use crate::protocol::{decode_reply, encode_request};
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
        let id = 1 << KEY_BITS;
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
            server.dirty.len() <= 1,
            "flush list holds {}",
            server.dirty.len()
        );
    }
}
