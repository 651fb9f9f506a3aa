//! The request service: the protocol's rules with no I/O. It keeps each
//! connection's session (generation and tokens), turns requests into replies
//! and jobs, and job completions into the replies their waiters were owed.
//!
//! Input comes from the reactor (`request`, `open_session`, `close_session`)
//! and from the server's completion queue (`job_done`, `job_expired`);
//! output leaves through [`Service::take_output`] (replies, with their fds)
//! and [`Service::take_jobs`] (work for the pool). Nothing here calls back.
//! FetchRange, readahead and what a returning fill means are in
//! `service/fetch.rs`; a connection's tokens in `service/tokens.rs`; what
//! a closed connection leaves behind (jobs only it waited for, to cancel)
//! in `service/orphans.rs`.

use crate::cache::{BlobKey, Index};
use crate::connection::ConnId;
use crate::jobs::{JobId, JobKind, JobOutput, JobTable};
use crate::metrics::{Metrics, Op, Outcome};
use crate::protocol::{Errno, Message, Reply, Request};
use crate::source::{Source, Sources};
use fetch::PendingFetch;
use slab::Slab;
use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokens::Tokens;

/// Idle blobs checkpointed per open at the open-blob limit (see
/// `Index::to_checkpoint_for_closing`): enough to keep ahead of the opens.
const CLOSING_CHECKPOINTS: usize = 4;

/// What the service emits for the reactor.
#[derive(Debug)]
pub enum Output {
    /// Send `reply` to request `tag` of `conn`, with `fd` when it carries one.
    Reply {
        conn: ConnId,
        tag: u64,
        reply: Reply,
        fd: Option<Arc<OwnedFd>>,
    },
    /// A request of `conn` finished without a reply (a prefetch): its
    /// backpressure may have cleared.
    Progress(ConnId),
}

/// Per-connection protocol state.
struct Session {
    conn: ConnId,
    generation: u32,
    next_n: u32,
    tokens: Tokens,
    /// Requests waiting on jobs (for the reactor's backpressure).
    waiting: usize,
    /// Blob ids this connection has a GetBlob waiting to open (at most
    /// `waiting` of them): where to look for its jobs when it closes.
    opens: HashSet<String>,
    /// Its FetchRanges waiting on fills (keys of `Service::fetches`).
    fetches: HashSet<usize>,
}

/// The GetBlobs waiting for blob id to be opened, and the Open job they
/// wait on (`None` while the blob's evicted files are still being deleted).
struct Opening {
    job: Option<JobId>,
    waiters: Vec<PendingOpen>,
}

/// A GetBlob waiting for its blob to be opened.
struct PendingOpen {
    conn: ConnId,
    tag: u64,
    generation: u32,
    source: Source,
}

/// The files of an evicted blob are being deleted; a GetBlob of it waits,
/// or fails at once if the delete is stuck past the backend timeout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Deletion {
    Running,
    Stuck,
}

/// Why a GetBlob of an id that is not open fails at once instead of
/// waiting: a worker past the backend timeout still works on its files.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stuck {
    /// Its evicted files are being deleted.
    Delete,
    /// An abandoned open: it may still size or truncate the files.
    Open,
}

/// The request service. See the module docs.
pub struct Service {
    sources: Arc<Sources>,
    max_tokens: usize,
    index: Index,
    jobs: JobTable<usize>,
    /// Indexed by [`ConnId::key`]; the stored id checks the generation.
    sessions: Vec<Option<Session>>,
    fetches: Slab<PendingFetch>,
    opening: HashMap<String, Opening>,
    /// Evicted blobs whose files are being deleted, with the bytes they
    /// were counted for.
    deleting: HashMap<String, (Deletion, u64)>,
    /// Ids an abandoned Open job still works on: exclusive until it
    /// returns, so no second open can race its truncation of the files.
    stuck_opens: HashSet<String>,
    /// Jobs closed connections waited on, to check for orphans at the next
    /// [`Service::take_orphans`].
    orphan_candidates: Vec<JobId>,
    outbox: Vec<Output>,
    metrics: Arc<Metrics>,
}

/// The live session of `conn`, if any (a free function so the borrow stays
/// on the sessions alone).
fn session(sessions: &mut [Option<Session>], conn: ConnId) -> Option<&mut Session> {
    sessions
        .get_mut(conn.key())?
        .as_mut()
        .filter(|s| s.conn == conn)
}

/// Whether a stuck worker still holds blob `id`'s files (`deletion`: its
/// entry in `deleting`; `stuck_opens`: ids of abandoned opens).
fn stuck(stuck_opens: &HashSet<String>, id: &str, deletion: Option<Deletion>) -> Option<Stuck> {
    if deletion == Some(Deletion::Stuck) {
        Some(Stuck::Delete)
    } else if stuck_opens.contains(id) {
        Some(Stuck::Open)
    } else {
        None
    }
}

impl Service {
    /// A service over `index` for `backend`'s ids; a connection holds at
    /// most `max_tokens` tokens (past it, its least recently used one is
    /// retired).
    pub fn new(
        sources: Arc<Sources>,
        index: Index,
        max_tokens: usize,
        metrics: Arc<Metrics>,
    ) -> Service {
        let limit = index.config().limit.unwrap_or(0);
        metrics.cache.limit_bytes.set(limit);
        let service = Service {
            sources,
            max_tokens,
            index,
            jobs: JobTable::default(),
            sessions: Vec::new(),
            fetches: Slab::new(),
            opening: HashMap::new(),
            deleting: HashMap::new(),
            stuck_opens: HashSet::new(),
            orphan_candidates: Vec::new(),
            outbox: Vec::new(),
            metrics,
        };
        // What the work dir holds from the start (after a restart or an
        // upgrade), not 0 until the first open, fill or eviction.
        service.publish();
        service
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Copies the index's and the job table's sizes to the gauges; called
    /// where they change (never on a cache hit).
    fn publish(&self) {
        let c = &self.metrics.cache;
        c.bytes.set(self.index.used_bytes());
        c.blobs.set(self.index.blob_count() as u64);
        let e = self.index.evictions();
        c.evictions_size.set(e.size);
        c.evictions_min_free.set(e.min_free);
        c.evictions_no_space.set(e.no_space);
        c.fills_in_flight.set(self.jobs.live_fills() as u64);
        c.jobs_in_flight.set(self.jobs.live() as u64);
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Replies and progress notes for the reactor, in order.
    pub fn take_output(&mut self) -> std::vec::Drain<'_, Output> {
        self.outbox.drain(..)
    }

    /// Jobs to hand to the worker pool.
    pub fn take_jobs(&mut self) -> std::vec::Drain<'_, (JobId, JobKind)> {
        self.jobs.take_started()
    }

    /// Whether no request waits on a job (opens, fills, deletes included).
    pub fn idle(&self) -> bool {
        self.fetches.is_empty() && self.opening.is_empty() && self.jobs.live() == 0
    }

    /// Requests of `conn` waiting on jobs.
    pub fn waiting(&mut self, conn: ConnId) -> usize {
        session(&mut self.sessions, conn).map_or(0, |s| s.waiting)
    }

    /// A connection was accepted.
    pub fn open_session(&mut self, conn: ConnId) {
        let key = conn.key();
        if self.sessions.len() <= key {
            self.sessions.resize_with(key + 1, || None);
        }
        self.sessions[key] = Some(Session {
            conn,
            generation: 0,
            next_n: 0,
            tokens: Tokens::default(),
            waiting: 0,
            opens: HashSet::new(),
            fetches: HashSet::new(),
        });
    }

    fn reply(&mut self, conn: ConnId, tag: u64, reply: Reply, fd: Option<Arc<OwnedFd>>) {
        self.outbox.push(Output::Reply {
            conn,
            tag,
            reply,
            fd,
        });
    }

    /// Answers a GetBlob with `errno`.
    fn refuse_blob(&mut self, conn: ConnId, tag: u64, errno: Errno) {
        let outcome = match errno {
            Errno::NoEnt => Outcome::Enoent,
            Errno::Io => Outcome::Eio,
            Errno::Access => Outcome::Eacces,
            Errno::Inval => Outcome::Einval,
            Errno::MFile => Outcome::Emfile,
        };
        self.metrics.request(Op::GetBlob, outcome);
        self.reply(conn, tag, Reply::blob_error(errno), None);
    }

    /// Handles one decoded request of `conn`.
    pub fn request(&mut self, conn: ConnId, m: Message) {
        self.metrics.work.received.bump();
        let tag = m.header.tag;
        match m.request {
            Request::Noop => {
                self.metrics.request(Op::Noop, Outcome::Ok);
                self.reply(conn, tag, Reply::Noop, None)
            }
            Request::GetBlob { generation, id } => self.get_blob(conn, tag, generation, &id),
            Request::FetchRange {
                token,
                start,
                count,
            } => {
                let need = m.header.need_reply();
                self.fetch_range(conn, tag, need, token, start, count)
            }
        }
    }

    fn get_blob(&mut self, conn: ConnId, tag: u64, generation: u32, raw: &[u8; 256]) {
        let Some(s) = session(&mut self.sessions, conn) else {
            return;
        };
        if s.generation != generation {
            // Tokens of other generations can never be used again.
            s.generation = generation;
            s.tokens
                .clear(&mut self.index, &self.metrics.cache.tokens_open);
        }
        let (id, source) = match self.sources.resolve(raw) {
            Ok(resolved) => resolved,
            Err(e) => {
                log::debug!("GetBlob on connection {conn}: {e}");
                return self.refuse_blob(conn, tag, e.errno());
            }
        };
        if let Some(key) = self.index.lookup(&id) {
            return self.answer_get_blob(conn, tag, generation, key, source);
        }
        let deletion = self.deleting.get(&id).map(|&(d, _)| d);
        if let Some(stuck) = stuck(&self.stuck_opens, &id, deletion) {
            let why = match stuck {
                Stuck::Delete => "its evicted files are still being deleted",
                Stuck::Open => "an open of it is still stuck in the backend",
            };
            log::info!("GetBlob {id}: {why}");
            return self.refuse_blob(conn, tag, Errno::Io);
        }
        s.waiting += 1;
        s.opens.insert(id.clone());
        let waiter = PendingOpen {
            conn,
            tag,
            generation,
            source: source.clone(),
        };
        if let Some(o) = self.opening.get_mut(&id) {
            o.waiters.push(waiter);
            return;
        }
        let waiters = vec![waiter];
        self.opening
            .insert(id.clone(), Opening { job: None, waiters });
        if deletion.is_none() {
            self.start_open(id, source);
        }
    }

    /// Starts the Open job the GetBlobs in `opening[id]` wait on.
    fn start_open(&mut self, id: String, source: Source) {
        self.index.cold_opening(&id);
        let job = self.jobs.start(JobKind::Open {
            id: id.clone(),
            source,
        });
        if let Some(o) = self.opening.get_mut(&id) {
            o.job = Some(job);
        }
        self.publish();
    }

    /// Replies to a GetBlob whose blob is open: a new token and the fd.
    fn answer_get_blob(
        &mut self,
        conn: ConnId,
        tag: u64,
        generation: u32,
        key: BlobKey,
        source: Source,
    ) {
        let Some(s) = session(&mut self.sessions, conn) else {
            return;
        };
        let Some(fd) = self.index.blob(key).map(|b| b.client_fd().clone()) else {
            return self.refuse_blob(conn, tag, Errno::Io);
        };
        s.next_n = s.next_n.wrapping_add(1).max(1);
        let n = s.next_n;
        if generation == s.generation {
            let open = &self.metrics.cache.tokens_open;
            if s.tokens.len() >= self.max_tokens {
                // Past the limit the least recently used token is retired:
                // a FetchRange on it answers 2 and the client opens again.
                s.tokens.retire_lru(&mut self.index, open);
            }
            s.tokens.add(n, key, source, &mut self.index, open);
        }
        let token = (generation as u64) << 32 | n as u64;
        self.metrics.request(Op::GetBlob, Outcome::Ok);
        self.reply(conn, tag, Reply::blob(token), Some(fd));
    }

    /// Readahead fills nobody waits for: a drain cancels the queued ones
    /// (and reports them with [`Service::job_done`]) instead of waiting.
    pub fn readahead_jobs(&self) -> Vec<JobId> {
        self.jobs.readahead()
    }

    /// Background jobs someone now waits for, to move ahead in the pool.
    pub fn take_promoted(&mut self) -> std::vec::Drain<'_, JobId> {
        self.jobs.take_promoted()
    }

    /// Job `id` returned from its worker (`None`: it panicked, or was
    /// cancelled or dropped before it ran).
    pub fn job_done(&mut self, id: JobId, outcome: Option<JobOutput>) {
        self.finish_job(id, outcome, false);
        self.publish();
    }

    /// Job `id` (`cancelled`: removed from the pool's queue before it ran,
    /// which is no failure of the backend) ends with `outcome`.
    fn finish_job(&mut self, id: JobId, outcome: Option<JobOutput>, cancelled: bool) {
        let Some(f) = self.jobs.finish(id) else {
            return;
        };
        match f.kind {
            JobKind::Open { id: blob_id, .. } if !f.late => self.opened(blob_id, outcome),
            JobKind::Open { id: blob_id, .. } => self.opened_late(blob_id, outcome),
            kind @ JobKind::Fill { .. } => {
                let (waiters, late) = (f.waiters, f.late);
                self.filled(id, kind, waiters, late, outcome, cancelled)
            }
            JobKind::Delete { id: blob_id } => self.deleted(blob_id, outcome),
            JobKind::Checkpoint { blob } => {
                if let Some(JobOutput::Checkpointed(Err(e))) = outcome {
                    log::warn!("checkpoint of blob {}: {e}", blob.id());
                }
            }
        }
    }

    fn opened(&mut self, blob_id: String, outcome: Option<JobOutput>) {
        let waiters = self.opening.remove(&blob_id).map(|o| o.waiters);
        let waiters = waiters.unwrap_or_default();
        let result = match outcome {
            Some(JobOutput::Opened(Ok(blob))) => Ok(self.index.insert(blob)),
            Some(JobOutput::Opened(Err(e))) => {
                log::info!("GetBlob {blob_id}: {e}");
                Err(e.errno())
            }
            _ => Err(Errno::Io),
        };
        if result.is_err() {
            self.index.open_failed(&blob_id);
        }
        // At the open limit, idle blobs with unsynced marks are made
        // durable, so that a later open may close them.
        for blob in self.index.to_checkpoint_for_closing(CLOSING_CHECKPOINTS) {
            self.jobs.start(JobKind::Checkpoint { blob });
        }
        for w in waiters {
            let Some(s) = session(&mut self.sessions, w.conn) else {
                continue;
            };
            s.waiting -= 1;
            s.opens.remove(&blob_id);
            match result {
                Ok(key) => self.answer_get_blob(w.conn, w.tag, w.generation, key, w.source),
                Err(errno) => self.refuse_blob(w.conn, w.tag, errno),
            }
        }
    }

    /// An abandoned open returned: its id may be opened again. Its waiters
    /// were answered long ago; a blob it did open is kept (no other open of
    /// the id ran meanwhile), so the next GetBlob is a hit.
    fn opened_late(&mut self, blob_id: String, outcome: Option<JobOutput>) {
        self.stuck_opens.remove(&blob_id);
        match outcome {
            Some(JobOutput::Opened(Ok(blob))) => {
                self.index.insert(blob);
                log::info!("GetBlob {blob_id}: the late open returned; the blob is open");
            }
            Some(JobOutput::Opened(Err(e))) => {
                log::info!("GetBlob {blob_id} (late): {e}");
                self.index.open_failed(&blob_id);
            }
            _ => self.index.open_failed(&blob_id),
        }
    }

    /// The delete of an evicted blob returned (or never ran). Unless its
    /// files are known gone, the blob is counted again (and evicted again
    /// later): files left on disk are never forgotten by the accounting.
    fn deleted(&mut self, blob_id: String, outcome: Option<JobOutput>) {
        let gone = match outcome {
            Some(JobOutput::Deleted(Ok(()))) => true,
            Some(JobOutput::Deleted(Err(e))) => {
                log::warn!("evicting blob {blob_id}: {e}; counted again");
                false
            }
            _ => {
                log::warn!("evicting blob {blob_id}: the delete job never ran; counted again");
                false
            }
        };
        let bytes = self.deleting.remove(&blob_id).map_or(0, |(_, b)| b);
        if !gone {
            self.index.delete_failed(&blob_id, bytes);
        }
        // GetBlobs came while the files were going: open them anew, unless
        // every one of them was of a connection that closed meanwhile.
        let sessions = &self.sessions;
        if let Some(o) = self.opening.get_mut(&blob_id) {
            o.waiters.retain(|w| orphans::live(sessions, w.conn));
        }
        let waiting = self.opening.get(&blob_id).and_then(|o| o.waiters.first());
        if let Some(source) = waiting.map(|w| w.source.clone()) {
            self.start_open(blob_id, source);
        } else {
            self.opening.remove(&blob_id);
        }
    }

    fn start_evictions(&mut self) {
        for (id, bytes) in self.index.take_evictions() {
            self.deleting.insert(id.clone(), (Deletion::Running, bytes));
            self.jobs.start(JobKind::Delete { id });
        }
    }

    /// Job `id` ran past `timeout` and its worker was given up on: its
    /// waiters fail now. Returns the fill jobs of the same blob, which would
    /// hang the same way, for the caller to cancel those not yet started.
    pub fn job_expired(&mut self, id: JobId, timeout: Duration) -> Vec<JobId> {
        let others = self.abandon_job(id, timeout);
        self.publish();
        others
    }

    fn abandon_job(&mut self, id: JobId, timeout: Duration) -> Vec<JobId> {
        let Some((kind, waiters)) = self.jobs.abandon(id) else {
            return Vec::new();
        };
        self.metrics.work.jobs_timed_out.bump();
        log::warn!("backend job {id} still running after {timeout:?}; failing its requests");
        match kind {
            JobKind::Fill { key, blob, g0, .. } => {
                self.metrics.work.fills_failed.bump();
                self.index.fill_timed_out(key, Instant::now(), timeout);
                self.index.fill_finished(key, &blob, g0, id, false);
                for fid in waiters {
                    self.fetch_progress(fid, false);
                }
                self.start_evictions();
                return self.jobs.fills_of(key, id);
            }
            JobKind::Open { id: blob_id, .. } => {
                // Exclusive until the stuck worker really returns: a second
                // open would race its sizing (set_len) of the same files.
                self.stuck_opens.insert(blob_id.clone());
                self.fail_opens(&blob_id);
            }
            JobKind::Delete { id: blob_id } => {
                // Exclusive until the stuck worker really returns.
                if let Some((d, _)) = self.deleting.get_mut(&blob_id) {
                    *d = Deletion::Stuck;
                }
                self.fail_opens(&blob_id);
            }
            JobKind::Checkpoint { .. } => {}
        }
        Vec::new()
    }

    /// Answers every GetBlob waiting for blob `id` with EIO.
    fn fail_opens(&mut self, blob_id: &str) {
        let waiters = self.opening.remove(blob_id).map(|o| o.waiters);
        for w in waiters.unwrap_or_default() {
            if let Some(s) = session(&mut self.sessions, w.conn) {
                s.waiting -= 1;
                s.opens.remove(blob_id);
                self.refuse_blob(w.conn, w.tag, Errno::Io);
            }
        }
    }
}

mod fetch;
mod orphans;
#[cfg(test)]
mod tests;
mod tokens;
