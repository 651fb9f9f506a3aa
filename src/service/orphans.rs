//! What a closed connection leaves behind. Its tokens are released at
//! once; its requests still waiting on jobs stay where they are (their
//! replies are dropped when the jobs end). But a job that only its requests
//! waited for would still sit in the pool's queue, ahead of other clients'
//! work: a client that queues a thousand cold opens or fills, closes and
//! does it again would grow the queue without bound. So the jobs a closing
//! connection waited on are noted, and [`Service::take_orphans`] names
//! those that no live connection waits for, for the server to cancel in
//! the pool; those the pool removes come back through
//! [`Service::job_cancelled`]. The service never calls the pool itself.
//!
//! Never orphaned: a job another live connection waits on, readahead
//! (started for a reader's stream, even if a request joined it later),
//! deletes and checkpoints (housekeeping), and abandoned jobs. A job that
//! already runs is left to finish: its bytes still fill the cache.

use super::{Service, Session};
use crate::connection::ConnId;
use crate::jobs::{JobId, JobKind};

/// Whether `conn` still has its session.
pub(super) fn live(sessions: &[Option<Session>], conn: ConnId) -> bool {
    sessions
        .get(conn.key())
        .is_some_and(|s| s.as_ref().is_some_and(|s| s.conn == conn))
}

impl Service {
    /// A connection closed: its tokens are released, and the jobs its
    /// requests wait on are noted for [`Service::take_orphans`]. Its
    /// waiting requests stay where they are; their replies are dropped
    /// when their jobs end.
    pub fn close_session(&mut self, conn: ConnId) {
        let Some(slot) = self.sessions.get_mut(conn.key()) else {
            return;
        };
        let Some(mut s) = slot.take_if(|s| s.conn == conn) else {
            return;
        };
        s.tokens
            .clear(&mut self.index, &self.metrics.cache.tokens_open);
        for id in &s.opens {
            if let Some(job) = self.opening.get(id).and_then(|o| o.job) {
                self.orphan_candidates.push(job);
            }
        }
        for fid in &s.fetches {
            if let Some(p) = self.fetches.get(*fid) {
                self.orphan_candidates.extend_from_slice(&p.jobs);
            }
        }
    }

    /// Jobs that closed connections waited on and that no live connection
    /// waits for now, for the server to cancel in the pool (see the module
    /// docs). Checked when taken, not when the connection closed: a request
    /// that joined a job since keeps it.
    pub fn take_orphans(&mut self) -> Vec<JobId> {
        if self.orphan_candidates.is_empty() {
            return Vec::new();
        }
        let mut ids = std::mem::take(&mut self.orphan_candidates);
        ids.sort_unstable();
        ids.dedup();
        ids.retain(|&id| self.orphaned(id));
        ids
    }

    /// Whether job `id` is demand work only dead connections wait for.
    fn orphaned(&self, id: JobId) -> bool {
        let dead = |conn| !live(&self.sessions, conn);
        match self.jobs.cancellable(id) {
            Some((JobKind::Open { id: blob_id, .. }, _)) => self
                .opening
                .get(blob_id)
                .is_some_and(|o| o.job == Some(id) && o.waiters.iter().all(|w| dead(w.conn))),
            Some((JobKind::Fill { .. }, waiters)) => {
                // A fill nobody waits for at all is not a request's work.
                !waiters.is_empty()
                    && waiters
                        .iter()
                        .all(|&fid| self.fetches.get(fid).is_none_or(|p| dead(p.conn)))
            }
            _ => false,
        }
    }

    /// Job `id` was removed from the pool's queue before it ran (see
    /// [`Service::take_orphans`]): it is forgotten like a job that failed,
    /// but counts as no failure. An open's id is free to be opened again
    /// (a cold blob stays counted); a fill's granules are no longer in
    /// flight, so the next request for them starts a fill of its own.
    pub fn job_cancelled(&mut self, id: JobId) {
        self.finish_job(id, None, true);
        self.publish();
    }
}
