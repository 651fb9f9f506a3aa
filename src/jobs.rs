//! The job table: every piece of slow work the service hands to the worker
//! pool (open a blob, fill granules, delete an evicted blob's files,
//! checkpoint a completed blob) gets one id from one allocator, a typed
//! [`JobKind`], and the waiters to wake when it is done.
//!
//! A job that runs past the backend timeout is *abandoned*: its waiters are
//! failed at once, but its entry stays until the worker really returns, so
//! the late result is still seen (a late fill's bytes are credited; a late
//! delete keeps its blob exclusive until its files are really gone, and so
//! does a late open until it has finished sizing them).

use crate::backend::BackendError;
use crate::cache::{self, Blob, BlobKey, CacheConfig, OpenError};
use crate::source::{Source, Sources};
use crate::worker::{After, Priority};
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

/// Identifies a job, from submission to completion.
pub type JobId = u64;

/// What a job does.
#[derive(Clone, Debug)]
pub enum JobKind {
    /// Open (or create) the cache files named `id`, of a blob from
    /// `source`.
    Open { id: String, source: Source },
    /// Fill granules `[g0, g0 + n)` of the blob at `key` from `source`.
    Fill {
        key: BlobKey,
        blob: Arc<Blob>,
        g0: u64,
        n: u64,
        source: Source,
        /// A retry after ENOSPC and an eviction (there is one at most).
        retried: bool,
        /// Readahead: nobody waited for it when it started, so it runs
        /// behind demand work until someone does.
        ahead: bool,
    },
    /// Delete the files of evicted blob `id`.
    Delete { id: String },
    /// Make a completed blob durable; nobody waits on it.
    Checkpoint { blob: Arc<Blob> },
}

impl JobKind {
    /// The queue the job waits in for a worker.
    pub fn priority(&self) -> Priority {
        match self {
            JobKind::Fill { ahead: true, .. } => Priority::Background,
            _ => Priority::Demand,
        }
    }
}

/// What a job produced.
#[derive(Debug)]
pub enum JobOutput {
    Opened(Result<Blob, OpenError>),
    /// A fill; on success, whether it completed the blob.
    Filled(Result<bool, BackendError>),
    Deleted(io::Result<()>),
    Checkpointed(io::Result<()>),
}

/// Turns a [`JobKind`] into the closure a worker runs.
#[derive(Clone)]
pub struct Runner {
    sources: Arc<Sources>,
    cache: Arc<CacheConfig>,
}

impl Runner {
    pub fn new(sources: Arc<Sources>, cache: Arc<CacheConfig>) -> Runner {
        Runner { sources, cache }
    }

    /// The work of `kind`, to run on a worker thread: its output, and what
    /// the thread does after posting it (a fill's hashing).
    pub fn work(&self, kind: JobKind) -> impl FnOnce() -> (JobOutput, Option<After>) + Send {
        let this = self.clone();
        move || match kind {
            JobKind::Open { id, source } => {
                let (backend, backend_id) = this.sources.backend(&source, &id);
                let opened = Blob::open_as(&this.cache, backend, backend_id, &id);
                (JobOutput::Opened(opened), None)
            }
            JobKind::Fill {
                blob,
                g0,
                n,
                source,
                ..
            } => {
                let (backend, backend_id) = this.sources.backend(&source, blob.id());
                let filled = blob.fill_from(backend, backend_id, g0, n);
                // Its waiters need the bytes, not the digest: the hash goes
                // on through them once they are answered.
                let after = matches!(filled, Ok(false))
                    .then(|| Box::new(move || blob.hash_ready_prefix()) as After);
                (JobOutput::Filled(filled), after)
            }
            JobKind::Delete { id } => {
                let deleted = cache::remove_blob_files(&this.cache, &id);
                (JobOutput::Deleted(deleted), None)
            }
            JobKind::Checkpoint { blob } => (JobOutput::Checkpointed(blob.checkpoint()), None),
        }
    }

    /// [`Runner::work`] run here and now, after-step included: the job's
    /// output (for tests that play the worker).
    pub fn run(&self, kind: JobKind) -> JobOutput {
        let (output, after) = (self.work(kind))();
        if let Some(after) = after {
            after();
        }
        output
    }
}

struct Entry<W> {
    kind: JobKind,
    waiters: Vec<W>,
    /// Past the timeout: its waiters were failed; the entry waits for the
    /// worker to return.
    abandoned: bool,
    /// Started as readahead: even once a request waits on it, it is not
    /// that request's own work (a reader's stream asked for it).
    readahead: bool,
}

/// A job that left the table: what it was, who waited, and whether it had
/// been abandoned (its waiters then were already failed, and are empty).
pub struct Finished<W> {
    pub kind: JobKind,
    pub waiters: Vec<W>,
    pub late: bool,
}

/// Jobs in flight, each with its waiters `W`. See the module docs.
pub struct JobTable<W> {
    next: JobId,
    entries: HashMap<JobId, Entry<W>>,
    /// Started since the last [`JobTable::take_started`], for the pool.
    started: Vec<(JobId, JobKind)>,
    /// Background jobs someone now waits for, since the last
    /// [`JobTable::take_promoted`].
    promoted: Vec<JobId>,
}

impl<W> Default for JobTable<W> {
    fn default() -> Self {
        JobTable {
            next: 1,
            entries: HashMap::new(),
            started: Vec::new(),
            promoted: Vec::new(),
        }
    }
}

impl<W> JobTable<W> {
    /// Records a new job and queues it for the pool; returns its id.
    pub fn start(&mut self, kind: JobKind) -> JobId {
        let id = self.next;
        self.next += 1;
        self.started.push((id, kind.clone()));
        let readahead = matches!(kind, JobKind::Fill { ahead: true, .. });
        self.entries.insert(
            id,
            Entry {
                kind,
                waiters: Vec::new(),
                abandoned: false,
                readahead,
            },
        );
        id
    }

    /// Jobs started since the last call, to submit to the worker pool.
    pub fn take_started(&mut self) -> std::vec::Drain<'_, (JobId, JobKind)> {
        self.started.drain(..)
    }

    /// Adds `waiter` to job `id`; false if there is no such live job. A
    /// readahead fill someone waits for is promoted to demand work.
    pub fn wait(&mut self, id: JobId, waiter: W) -> bool {
        match self.entries.get_mut(&id) {
            Some(e) if !e.abandoned => {
                e.waiters.push(waiter);
                if let JobKind::Fill {
                    ahead: a @ true, ..
                } = &mut e.kind
                {
                    *a = false;
                    self.promoted.push(id);
                }
                true
            }
            _ => false,
        }
    }

    /// Readahead fills nobody waits for (to cancel when draining).
    pub fn readahead(&self) -> Vec<JobId> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.abandoned && matches!(e.kind, JobKind::Fill { ahead: true, .. }))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Background jobs promoted since the last call: the pool should move
    /// them to the demand queue if they have not started.
    pub fn take_promoted(&mut self) -> std::vec::Drain<'_, JobId> {
        self.promoted.drain(..)
    }

    /// Job `id` and its waiters if it is demand work that a closed
    /// connection's requests may have been the only reason for: a live
    /// (not abandoned) open or fill that was not started as readahead.
    /// Deletes and checkpoints are housekeeping and never qualify.
    pub fn cancellable(&self, id: JobId) -> Option<(&JobKind, &[W])> {
        let e = self
            .entries
            .get(&id)
            .filter(|e| !e.abandoned && !e.readahead)?;
        match e.kind {
            JobKind::Open { .. } | JobKind::Fill { .. } => Some((&e.kind, &e.waiters)),
            JobKind::Delete { .. } | JobKind::Checkpoint { .. } => None,
        }
    }

    /// What job `id` is, if it is in the table.
    pub fn kind(&self, id: JobId) -> Option<&JobKind> {
        self.entries.get(&id).map(|e| &e.kind)
    }

    /// Removes job `id` because its worker returned (or it was cancelled
    /// before starting).
    pub fn finish(&mut self, id: JobId) -> Option<Finished<W>> {
        self.entries.remove(&id).map(|e| Finished {
            kind: e.kind,
            waiters: e.waiters,
            late: e.abandoned,
        })
    }

    /// Marks job `id` abandoned (its worker is stuck past the timeout) and
    /// returns its waiters to fail now; `None` if it is unknown or was
    /// abandoned already.
    pub fn abandon(&mut self, id: JobId) -> Option<(JobKind, Vec<W>)> {
        let e = self.entries.get_mut(&id).filter(|e| !e.abandoned)?;
        e.abandoned = true;
        Some((e.kind.clone(), std::mem::take(&mut e.waiters)))
    }

    /// Live (not abandoned) fill jobs of the blob at `key`, except `but`.
    pub fn fills_of(&self, key: BlobKey, but: JobId) -> Vec<JobId> {
        self.entries
            .iter()
            .filter(|(&id, e)| {
                id != but
                    && !e.abandoned
                    && matches!(e.kind, JobKind::Fill { key: k, .. } if k == key)
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// Jobs in the table that are not abandoned.
    pub fn live(&self) -> usize {
        self.entries.values().filter(|e| !e.abandoned).count()
    }

    /// Fill jobs in the table that are not abandoned.
    pub fn live_fills(&self) -> usize {
        self.entries
            .values()
            .filter(|e| !e.abandoned && matches!(e.kind, JobKind::Fill { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_waiters_come_back() {
        let mut t: JobTable<u32> = JobTable::default();
        let a = t.start(JobKind::Delete { id: "a".into() });
        let b = t.start(JobKind::Open {
            id: "b".into(),
            source: Source::Backend,
        });
        assert_ne!(a, b);
        assert_eq!(t.take_started().count(), 2);
        assert!(t.wait(a, 7) && t.wait(a, 8));
        let f = t.finish(a).unwrap();
        assert_eq!((f.waiters, f.late), (vec![7, 8], false));
        assert!(t.finish(a).is_none(), "a job finishes once");
        assert!(!t.wait(a, 9));
    }

    #[test]
    fn an_abandoned_job_stays_until_its_worker_returns() {
        let mut t: JobTable<u32> = JobTable::default();
        let a = t.start(JobKind::Delete { id: "a".into() });
        t.wait(a, 1);
        let (kind, waiters) = t.abandon(a).unwrap();
        assert!(matches!(kind, JobKind::Delete { .. }));
        assert_eq!(waiters, vec![1]);
        assert!(t.abandon(a).is_none(), "abandoned once");
        assert!(!t.wait(a, 2), "nobody waits on an abandoned job");
        assert_eq!(t.live(), 0);
        assert!(t.kind(a).is_some());
        let f = t.finish(a).unwrap();
        assert!(f.late && f.waiters.is_empty());
    }
}
