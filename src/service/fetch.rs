//! FetchRange for the service: answering from ready granules, parking a
//! fetch on the fills it needs, readahead for sequential readers, and what
//! a returning fill means for its waiters (credit, retry after ENOSPC,
//! checkpoint of a completed blob).

use super::{session, Output, Service};
use crate::cache::{BlobKey, Plan};
use crate::connection::ConnId;
use crate::jobs::{JobId, JobKind, JobOutput};
use crate::metrics::{Op, Outcome};
use crate::protocol::{FetchResult, Reply};
use crate::source::Source;
use std::time::Instant;

/// A FetchRange waiting on fill jobs.
pub(super) struct PendingFetch {
    pub(super) conn: ConnId,
    tag: u64,
    token: u64,
    count: u64,
    remaining: usize,
    failed: bool,
    reply: bool,
    /// When the request arrived, for `blobmgr_fetch_seconds`.
    started: Instant,
    /// The fill jobs it waits on (some may have ended): the jobs to check
    /// for orphans if its connection closes.
    pub(super) jobs: Vec<JobId>,
}

impl Service {
    pub(super) fn fetch_range(
        &mut self,
        conn: ConnId,
        tag: u64,
        need: bool,
        token: u64,
        start: u64,
        count: u64,
    ) {
        let Some(s) = session(&mut self.sessions, conn) else {
            return;
        };
        let op = if need { Op::FetchRange } else { Op::Prefetch };
        let (key, source) = match s.tokens.touch(token as u32) {
            Some(held) if (token >> 32) as u32 == s.generation => held,
            _ => {
                self.metrics.request(op, Outcome::Mismatch);
                if need {
                    let r = Reply::fetch(token, 0, FetchResult::GenerationMismatch);
                    self.reply(conn, tag, r, None);
                }
                return;
            }
        };
        let result = match self.index.plan(key, start, count, Instant::now) {
            Plan::Ready { count: n } => {
                self.metrics.request(op, Outcome::Hit);
                self.metrics.fetch_time(true).observe_instant();
                self.read_ahead(conn, token, key, source, start, count);
                Reply::fetch(token, n, FetchResult::Ok)
            }
            Plan::NoSpace => {
                // Blobs may have been evicted while trying: delete them now.
                self.start_evictions();
                self.metrics.request(op, Outcome::Failed);
                Reply::fetch(token, 0, FetchResult::Failed)
            }
            Plan::OutOfRange | Plan::Unavailable => {
                self.metrics.request(op, Outcome::Failed);
                Reply::fetch(token, 0, FetchResult::Failed)
            }
            Plan::Wait {
                count,
                waiting_on,
                runs,
            } => {
                let fetch = PendingFetch {
                    conn,
                    tag,
                    token,
                    count,
                    remaining: 0,
                    failed: false,
                    reply: need,
                    started: Instant::now(),
                    jobs: Vec::new(),
                };
                // Blobs evicted to make room go first, before the fills.
                self.start_evictions();
                self.wait_for_fills(key, source.clone(), fetch, waiting_on, runs);
                return self.read_ahead(conn, token, key, source, start, count);
            }
        };
        if need {
            self.reply(conn, tag, result, None);
        }
    }

    /// Parks `fetch` on the fills in flight it needs and on new fills of
    /// `runs`, started here.
    fn wait_for_fills(
        &mut self,
        key: BlobKey,
        source: Source,
        fetch: PendingFetch,
        waiting_on: Vec<JobId>,
        runs: Vec<(u64, u64)>,
    ) {
        let conn = fetch.conn;
        let fid = self.fetches.insert(fetch);
        let mut remaining = 0;
        let mut jobs = Vec::with_capacity(waiting_on.len() + runs.len());
        for job in waiting_on {
            if self.jobs.wait(job, fid) {
                jobs.push(job);
                remaining += 1;
            }
        }
        if let Some(blob) = self.index.blob(key).cloned() {
            for (g0, n) in runs {
                let blob = blob.clone();
                let source = source.clone();
                let job = self.jobs.start(JobKind::Fill {
                    key,
                    blob,
                    g0,
                    n,
                    source,
                    retried: false,
                    ahead: false,
                });
                self.index.fill_started(key, g0, n, job);
                self.jobs.wait(job, fid);
                self.metrics.work.fills_started.bump();
                jobs.push(job);
                remaining += 1;
            }
        }
        self.fetches[fid].remaining = remaining;
        self.fetches[fid].jobs = jobs;
        if let Some(s) = session(&mut self.sessions, conn) {
            s.waiting += 1;
            s.fetches.insert(fid);
        }
        if remaining == 0 {
            // Nothing to wait on after all (cannot happen: the plan names
            // live jobs); answer rather than leave the request hanging.
            self.fetches[fid].remaining = 1;
            self.fetch_progress(fid, false);
        }
        self.publish();
    }

    /// Shows the readahead of `token` (on `key`) a FetchRange of
    /// `[start, start + count)` and starts the background fills it asks for
    /// (nobody waits on them; a later FetchRange that needs one waits on it
    /// like on any fill).
    fn read_ahead(
        &mut self,
        conn: ConnId,
        token: u64,
        key: BlobKey,
        source: Source,
        start: u64,
        count: u64,
    ) {
        let Some(stream) =
            session(&mut self.sessions, conn).and_then(|s| s.tokens.readahead(token as u32))
        else {
            return;
        };
        let runs = self.index.read_ahead(key, stream, start, count);
        // Blobs evicted to make room (even when it then did not fit) are
        // deleted first.
        self.start_evictions();
        let Some(blob) = self.index.blob(key).cloned().filter(|_| !runs.is_empty()) else {
            return;
        };
        for (g0, n) in runs {
            let job = self.jobs.start(JobKind::Fill {
                key,
                blob: blob.clone(),
                g0,
                n,
                source: source.clone(),
                retried: false,
                ahead: true,
            });
            self.index.fill_started(key, g0, n, job);
            self.metrics.work.fills_started.bump();
            self.metrics.work.readahead_fills.bump();
        }
        self.publish();
    }

    /// One fill that fetch `fid` waited on ended.
    pub(super) fn fetch_progress(&mut self, fid: usize, ok: bool) {
        let Some(p) = self.fetches.get_mut(fid) else {
            return;
        };
        p.remaining -= 1;
        p.failed |= !ok;
        if p.remaining > 0 {
            return;
        }
        let p = self.fetches.remove(fid);
        let (op, outcome) = match (p.reply, p.failed) {
            (true, false) => (Op::FetchRange, Outcome::Miss),
            (true, true) => (Op::FetchRange, Outcome::Failed),
            (false, false) => (Op::Prefetch, Outcome::Miss),
            (false, true) => (Op::Prefetch, Outcome::Failed),
        };
        self.metrics.request(op, outcome);
        self.metrics.fetch_time(false).observe(p.started.elapsed());
        let Some(s) = session(&mut self.sessions, p.conn) else {
            return;
        };
        s.waiting -= 1;
        s.fetches.remove(&fid);
        if !p.reply {
            return self.outbox.push(Output::Progress(p.conn));
        }
        let result = if p.failed {
            FetchResult::Failed
        } else {
            FetchResult::Ok
        };
        self.reply(p.conn, p.tag, Reply::fetch(p.token, p.count, result), None);
    }

    /// Fill `id` (`kind`) returned: its granules are credited, its waiters
    /// answered, a completed blob checkpointed. A fill that ran out of space
    /// evicts and runs once more before it fails. A `cancelled` fill (taken
    /// off the pool's queue: nobody was left to wait for it) releases its
    /// granules and counts as no failure.
    pub(super) fn filled(
        &mut self,
        id: JobId,
        kind: JobKind,
        waiters: Vec<usize>,
        late: bool,
        outcome: Option<JobOutput>,
        cancelled: bool,
    ) {
        let JobKind::Fill {
            key,
            blob,
            g0,
            n,
            source,
            retried,
            ahead,
        } = kind
        else {
            return;
        };
        // A readahead fill cancelled at a drain is no failure of the backend.
        let cancelled = cancelled || (ahead && outcome.is_none() && waiters.is_empty());
        let complete = match outcome {
            Some(JobOutput::Filled(Ok(complete))) => Some(complete),
            Some(JobOutput::Filled(Err(e))) => {
                log::warn!("fill job {id} of blob {}: {e}", blob.id());
                if e.is_no_space() && !retried && !late {
                    // Evict while this fill still pins its blob, queue the
                    // deletes, then the retry behind them.
                    let need = n * blob.granule_size();
                    let room = self.index.no_space(need);
                    self.index.fill_finished(key, &blob, g0, id, false);
                    if room {
                        log::info!("blob {}: evicted to make room; filling again", blob.id());
                        self.start_evictions();
                        let retry = JobKind::Fill {
                            key,
                            blob,
                            g0,
                            n,
                            source,
                            retried: true,
                            ahead,
                        };
                        let job = self.jobs.start(retry);
                        self.index.fill_started(key, g0, n, job);
                        for fid in waiters {
                            self.jobs.wait(job, fid);
                            if let Some(p) = self.fetches.get_mut(fid) {
                                p.jobs.push(job);
                            }
                        }
                        return;
                    }
                    log::warn!("blob {}: out of space with nothing to evict", blob.id());
                }
                None
            }
            // Panicked, cancelled or dropped (already logged).
            _ => None,
        };
        if complete.is_none() && !late && !cancelled {
            self.metrics.work.fills_failed.bump();
        }
        self.index
            .fill_finished(key, &blob, g0, id, complete.is_some());
        if complete == Some(true) {
            // Made durable after the waiters are answered: the reply
            // needs the bytes in the page cache, not on the disk.
            self.jobs.start(JobKind::Checkpoint { blob });
        }
        for fid in waiters {
            self.fetch_progress(fid, complete.is_some());
        }
        self.start_evictions();
    }
}
