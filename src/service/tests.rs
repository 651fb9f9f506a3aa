//! The service driven directly, without sockets or threads: jobs are run
//! inline (or held, to play a stuck worker) and outputs read back.

use super::*;
use crate::backend::LocalFs;
use crate::cache::CacheConfig;
use crate::jobs::Runner;
use crate::protocol::FetchResult;
use crate::protocol::{encode_request, Header};

struct Harness {
    svc: Service,
    runner: Runner,
    _dir: tempfile::TempDir,
    next_tag: u64,
}

const CONN: fn() -> ConnId = || ConnId::new(1, 0);

impl Harness {
    /// A service over blobs `(name, size)` in a local backend, granule 4 KiB.
    fn new(blobs: &[(&str, usize)], limit: Option<u64>) -> Harness {
        Harness::with_leftovers(blobs, limit, &[])
    }

    /// [`Harness::new`] over a work dir where a previous run left the data
    /// files `(name, size)` (and no maps).
    fn with_leftovers(
        blobs: &[(&str, usize)],
        limit: Option<u64>,
        leftovers: &[(&str, usize)],
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let be_dir = dir.path().join("be");
        std::fs::create_dir(&be_dir).unwrap();
        for (name, size) in blobs {
            let data: Vec<u8> = (0..*size).map(|i| (i * 7 + 1) as u8).collect();
            std::fs::write(be_dir.join(name), data).unwrap();
        }
        let mut cfg = CacheConfig::new(dir.path().join("work"));
        cfg.granule = 4096;
        cfg.max_job = 8192;
        cfg.limit = limit;
        cfg.prepare().unwrap();
        for (name, size) in leftovers {
            std::fs::write(cfg.data_dir().join(name), vec![1u8; *size]).unwrap();
        }
        let cfg = Arc::new(cfg);
        let backend: Arc<dyn crate::backend::Backend> = Arc::new(LocalFs::new(be_dir));
        let sources = Arc::new(Sources::new(backend, None, Default::default()));
        let index = Index::new(cfg.clone());
        let mut svc = Service::new(sources.clone(), index, 16, Default::default());
        svc.open_session(CONN());
        Harness {
            svc,
            runner: Runner::new(sources, cfg),
            _dir: dir,
            next_tag: 0,
        }
    }

    fn send(&mut self, req: Request, need_reply: bool) -> u64 {
        self.next_tag += 1;
        let mut wire = Vec::new();
        encode_request(&mut wire, self.next_tag, need_reply, &req);
        let h = Header::decode(wire[..20].try_into().unwrap()).unwrap();
        self.svc.request(
            CONN(),
            Message {
                header: h,
                request: req,
            },
        );
        self.next_tag
    }

    fn replies(&mut self) -> Vec<(u64, Reply)> {
        self.svc
            .take_output()
            .filter_map(|o| match o {
                Output::Reply { tag, reply, fd, .. } => {
                    assert_eq!(reply.carries_fd(), fd.is_some());
                    Some((tag, reply))
                }
                Output::Progress(_) => None,
            })
            .collect()
    }

    /// Runs every started job to completion, inline, until none is left.
    fn run_jobs(&mut self) {
        loop {
            let jobs: Vec<_> = self.svc.take_jobs().collect();
            if jobs.is_empty() {
                return;
            }
            for (id, kind) in jobs {
                let out = self.runner.run(kind);
                self.svc.job_done(id, Some(out));
            }
        }
    }

    fn get_blob(&mut self, id: &str) -> Reply {
        let tag = self.send(Request::get_blob(1, id).unwrap(), true);
        self.run_jobs();
        let r = self.replies();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, tag);
        r[0].1
    }

    fn token(&mut self, id: &str) -> u64 {
        match self.get_blob(id) {
            Reply::GetBlob {
                token, result: 0, ..
            } => token,
            other => panic!("GetBlob {id}: {other:?}"),
        }
    }

    fn fetch(&mut self, token: u64, start: u64, count: u64) -> u64 {
        self.send(
            Request::FetchRange {
                token,
                start,
                count,
            },
            true,
        )
    }
}

#[test]
fn noop_and_bad_ids_are_answered_at_once() {
    let mut h = Harness::new(&[], None);
    let tag = h.send(Request::Noop, true);
    assert_eq!(h.replies(), vec![(tag, Reply::Noop)]);
    assert_eq!(h.get_blob(".hidden"), Reply::blob_error(Errno::Inval));
    assert_eq!(h.get_blob("missing"), Reply::blob_error(Errno::NoEnt));
}

#[test]
fn tokens_hold_blobs_and_a_new_generation_releases_them() {
    let mut h = Harness::new(&[("a", 10_000)], None);
    let t = h.token("a");
    assert_eq!(t >> 32, 1);
    let tag = h.fetch(t, 0, 5000);
    h.run_jobs();
    assert_eq!(
        h.replies(),
        vec![(tag, Reply::fetch(t, 5000, FetchResult::Ok))]
    );
    // A hit is answered without a job.
    let tag = h.fetch(t, 10, 10);
    assert_eq!(h.svc.take_jobs().count(), 0);
    assert_eq!(
        h.replies(),
        vec![(tag, Reply::fetch(t, 10, FetchResult::Ok))]
    );
    // Generation 2 retires generation 1's tokens.
    h.send(Request::get_blob(2, "a").unwrap(), true);
    h.replies();
    let tag = h.fetch(t, 0, 1);
    let mismatch = Reply::fetch(t, 0, FetchResult::GenerationMismatch);
    assert_eq!(h.replies(), vec![(tag, mismatch)]);
}

#[test]
fn a_prefetch_is_not_answered_but_reports_progress() {
    let mut h = Harness::new(&[("a", 10_000)], None);
    let t = h.token("a");
    h.send(
        Request::FetchRange {
            token: t,
            start: 0,
            count: 10_000,
        },
        false,
    );
    assert_eq!(h.svc.waiting(CONN()), 1);
    h.run_jobs();
    assert_eq!(h.svc.waiting(CONN()), 0);
    let outs: Vec<Output> = h.svc.take_output().collect();
    assert!(matches!(outs.as_slice(), [Output::Progress(c)] if *c == CONN()));
}

/// Bug fixed in the redesign: a fill abandoned at the backend timeout that
/// later succeeded set its ready bits but was never credited to the cache's
/// byte count, and a late failure counted `fills_failed` twice.
#[test]
fn a_late_fill_is_credited_and_counted_once() {
    let mut h = Harness::new(&[("a", 8192), ("b", 4096)], Some(1 << 20));
    let t = h.token("a");
    let tag = h.fetch(t, 0, 8192);
    let jobs: Vec<_> = h.svc.take_jobs().collect();
    assert_eq!(jobs.len(), 1);
    let (id, kind) = jobs.into_iter().next().unwrap();
    // The worker is stuck: the job is abandoned and the fetch fails now.
    assert!(h.svc.job_expired(id, Duration::from_secs(1)).is_empty());
    assert_eq!(
        h.replies(),
        vec![(tag, Reply::fetch(t, 0, FetchResult::Failed))]
    );
    assert_eq!(h.svc.metrics().work.fills_failed.get(), 1);
    assert_eq!(h.svc.index().used_bytes(), 0);
    // It returns after all, with the bytes written.
    let out = h.runner.run(kind);
    h.svc.job_done(id, Some(out));
    assert_eq!(h.svc.index().used_bytes(), 8192, "late bytes are credited");
    assert_eq!(h.svc.metrics().work.fills_failed.get(), 1);
    // A late failure is not counted a second time.
    let tb = h.token("b");
    h.fetch(tb, 0, 1);
    let (id, _) = h.svc.take_jobs().next().unwrap();
    h.svc.job_expired(id, Duration::from_secs(1));
    assert_eq!(h.svc.metrics().work.fills_failed.get(), 2);
    h.svc.job_done(id, None);
    assert_eq!(h.svc.metrics().work.fills_failed.get(), 2);
}

/// Bug fixed in the redesign: an abandoned delete job cleared `deleting`, so
/// a GetBlob could open a blob while the stuck worker was still removing its
/// files.
/// Fills "a" (8 KiB, limit 10,000 bytes), drops its token (generation 2),
/// then fills "b", which evicts "a": returns the delete job of "a", not yet
/// run, and the harness.
fn evict_a_by_filling_b() -> (Harness, JobId, JobKind) {
    let mut h = Harness::new(&[("a", 8192), ("b", 8192)], Some(10_000));
    let ta = h.token("a");
    h.fetch(ta, 0, 8192);
    h.run_jobs();
    h.replies();
    h.send(Request::get_blob(2, "b").unwrap(), true);
    h.run_jobs();
    let tb = match h.replies()[0].1 {
        Reply::GetBlob { token, .. } => token,
        r => panic!("{r:?}"),
    };
    h.fetch(tb, 0, 8192);
    let (fill, kind) = h.svc.take_jobs().next().unwrap();
    h.svc.job_done(fill, Some(h.runner.run(kind)));
    h.replies();
    let (delete, kind) = h
        .svc
        .take_jobs()
        .find(|(_, k)| matches!(k, JobKind::Delete { id } if id == "a"))
        .expect("a delete job for the evicted blob");
    (h, delete, kind)
}

#[test]
fn an_abandoned_delete_keeps_its_blob_exclusive_until_it_returns() {
    let (mut h, delete, kind) = evict_a_by_filling_b();
    // The delete hangs past the timeout.
    h.svc.job_expired(delete, Duration::from_secs(1));
    // A GetBlob of "a" fails at once and starts no open.
    let tag = h.send(Request::get_blob(2, "a").unwrap(), true);
    assert!(h.svc.take_jobs().next().is_none(), "no open while deleting");
    assert_eq!(h.replies(), vec![(tag, Reply::blob_error(Errno::Io))]);
    // The worker returns: "a" can be opened again.
    let out = h.runner.run(kind);
    h.svc.job_done(delete, Some(out));
    assert!(matches!(h.get_blob("a"), Reply::GetBlob { result: 0, .. }));
}

#[test]
fn a_getblob_during_a_running_delete_waits_for_it() {
    let (mut h, delete, kind) = evict_a_by_filling_b();
    let tag = h.send(Request::get_blob(2, "a").unwrap(), true);
    assert!(h.replies().is_empty(), "waits for the delete");
    assert!(h.svc.take_jobs().next().is_none());
    h.svc.job_done(delete, Some(h.runner.run(kind)));
    h.run_jobs();
    let r = h.replies();
    assert!(matches!(r.as_slice(), [(t, Reply::GetBlob { result: 0, .. })] if *t == tag));
}

#[test]
fn a_closed_connection_drops_its_replies_and_releases_its_tokens() {
    let mut h = Harness::new(&[("a", 8192)], None);
    let t = h.token("a");
    h.fetch(t, 0, 8192);
    h.svc.close_session(CONN());
    h.run_jobs();
    assert!(h.replies().is_empty());
    assert_eq!(h.svc.waiting(CONN()), 0);
}

#[test]
fn past_the_token_limit_the_least_recently_used_token_is_retired() {
    let mut h = Harness::new(&[("a", 4096), ("b", 4096)], None);
    let first = h.token("a");
    let kept = h.token("b");
    for i in 0..40 {
        // Keep "kept" in use; every other token ages.
        let tag = h.fetch(kept, 0, 1);
        h.run_jobs();
        assert_eq!(h.replies()[0].0, tag);
        let id = if i % 2 == 0 { "a" } else { "b" };
        assert!(
            matches!(h.get_blob(id), Reply::GetBlob { result: 0, .. }),
            "GetBlob {i} past the limit of 16 must not fail"
        );
    }
    let tag = h.fetch(first, 0, 1);
    let mismatch = Reply::fetch(first, 0, FetchResult::GenerationMismatch);
    assert_eq!(
        h.replies(),
        vec![(tag, mismatch)],
        "the oldest token is retired"
    );
    let tag = h.fetch(kept, 0, 1);
    assert_eq!(
        h.replies(),
        vec![(tag, Reply::fetch(kept, 1, FetchResult::Ok))]
    );
    assert_eq!(h.svc.metrics().cache.tokens_open.get(), 16);
}

/// A sequential reader gets readahead fills nobody waits on; one that fails
/// marks nothing ready, and a later read of its granules fills them again;
/// a read that needs a readahead fill in flight waits on it and promotes it.
#[test]
fn readahead_runs_in_the_background_and_never_marks_unwritten_granules() {
    let mut h = Harness::new(&[("b", 64 * 4096)], None);
    let token = h.token("b");
    let key = h.svc.index().lookup("b").unwrap();
    // Three sequential reads: the third starts readahead behind it.
    let mut ahead = Vec::new();
    for i in 0..3u64 {
        h.fetch(token, i * 4096, 4096);
        let jobs: Vec<_> = h.svc.take_jobs().collect();
        for (id, kind) in jobs {
            if kind.priority() == crate::worker::Priority::Background {
                ahead.push((id, kind));
            } else {
                let out = h.runner.run(kind);
                h.svc.job_done(id, Some(out));
            }
        }
        assert_eq!(h.replies().len(), 1, "read {i} answered");
    }
    assert!(ahead.len() >= 2, "readahead started: {}", ahead.len());
    assert_eq!(
        h.svc.metrics().work.readahead_fills.get(),
        ahead.len() as u64
    );
    let blob = h.svc.index().blob(key).unwrap().clone();
    // The first readahead fill fails: its granules stay not ready.
    let (failed_id, failed) = ahead.remove(0);
    let JobKind::Fill { g0, n, .. } = failed.clone() else {
        panic!("{failed:?}")
    };
    h.svc.job_done(failed_id, None);
    assert!((g0..g0 + n).all(|g| !blob.is_ready(g)));
    // A read of the second one's granules waits on it and promotes it.
    let (second_id, second) = ahead.remove(0);
    let JobKind::Fill { g0: s0, .. } = second.clone() else {
        panic!("{second:?}")
    };
    let tag = h.fetch(token, s0 * 4096, 100);
    assert!(h.replies().is_empty(), "waits for the fill in flight");
    assert_eq!(h.svc.take_promoted().collect::<Vec<_>>(), vec![second_id]);
    // What a drain would cancel: readahead nobody waits for, not this one.
    let unwaited = h.svc.readahead_jobs();
    assert!(!unwaited.contains(&second_id));
    assert!(ahead.iter().all(|(id, _)| unwaited.contains(id)));
    let out = h.runner.run(second);
    h.svc.job_done(second_id, Some(out));
    assert!(matches!(
        h.replies()[..],
        [(t, Reply::FetchRange { result: 0, count: 100, .. })] if t == tag
    ));
    // The failed granules are filled again when asked for.
    h.fetch(token, g0 * 4096, 4096);
    h.run_jobs();
    assert!(blob.is_ready(g0));
    for (id, kind) in ahead {
        h.svc.job_done(id, Some(h.runner.run(kind)));
    }
}

/// Review finding: an Open job abandoned at the backend timeout dropped its
/// id from `opening`, so the next GetBlob started a second Open while the
/// first was still running; the late one could then size the data file to
/// zero under granules the second had filled. The id now stays exclusive
/// (GetBlob answers EIO, no Open starts) until the late Open returns.
#[test]
fn an_abandoned_open_keeps_its_blob_exclusive_until_it_returns() {
    let mut h = Harness::new(&[("a", 8192)], None);
    let tag = h.send(Request::get_blob(1, "a").unwrap(), true);
    let (open, kind) = h.svc.take_jobs().next().expect("an open job");
    assert!(matches!(kind, JobKind::Open { .. }));
    // The open hangs past the timeout: its GetBlob fails now.
    h.svc.job_expired(open, Duration::from_secs(1));
    assert_eq!(h.replies(), vec![(tag, Reply::blob_error(Errno::Io))]);
    // A GetBlob meanwhile fails at once and starts no second open.
    let tag = h.send(Request::get_blob(1, "a").unwrap(), true);
    assert!(
        h.svc.take_jobs().next().is_none(),
        "no second open while the first is stuck"
    );
    assert_eq!(h.replies(), vec![(tag, Reply::blob_error(Errno::Io))]);
    // The stuck open returns: its blob is kept and served without another.
    let out = h.runner.run(kind);
    h.svc.job_done(open, Some(out));
    let tag = h.send(Request::get_blob(1, "a").unwrap(), true);
    assert!(h.svc.take_jobs().next().is_none(), "a hit");
    let r = h.replies();
    assert!(matches!(r.as_slice(), [(t, Reply::GetBlob { result: 0, .. })] if *t == tag));
}

/// A late open that failed leaves the id free for a new one.
#[test]
fn a_failed_late_open_lets_the_next_getblob_open_again() {
    let mut h = Harness::new(&[("a", 8192)], None);
    h.send(Request::get_blob(1, "a").unwrap(), true);
    let (open, _) = h.svc.take_jobs().next().expect("an open job");
    h.svc.job_expired(open, Duration::from_secs(1));
    h.replies();
    h.svc.job_done(open, None);
    assert!(matches!(h.get_blob("a"), Reply::GetBlob { result: 0, .. }));
}

/// Review finding: opening a cold blob (files left by an earlier run) took
/// its bytes out of the accounting before the open ran, and a failed open
/// never put them back: its files stayed on disk, uncounted by
/// --cache-size and never evicted. Now they stay counted and evictable.
#[test]
fn a_cold_blob_whose_open_fails_stays_counted_and_evictable() {
    // "gone" is on disk but no longer in the backend, and has no map.
    let mut h = Harness::with_leftovers(&[("a", 8192)], Some(10_000), &[("gone", 8192)]);
    assert_eq!(h.svc.index().used_bytes(), 8192);
    assert_eq!(h.get_blob("gone"), Reply::blob_error(Errno::NoEnt));
    assert_eq!(h.svc.index().used_bytes(), 8192, "still counted");
    // Filling "a" goes over the limit: the cold blob is the one evicted.
    let t = h.token("a");
    h.fetch(t, 0, 8192);
    let (fill, kind) = h.svc.take_jobs().next().unwrap();
    h.svc.job_done(fill, Some(h.runner.run(kind)));
    let deletes: Vec<_> = h
        .svc
        .take_jobs()
        .filter(|(_, k)| matches!(k, JobKind::Delete { id } if id == "gone"))
        .collect();
    assert_eq!(deletes.len(), 1, "the cold blob is evicted");
    assert_eq!(h.svc.index().used_bytes(), 8192);
}

/// A cold blob whose open was abandoned is not evicted under the stuck
/// worker, and is counted (and evictable) again once it returns failed.
#[test]
fn a_cold_blob_is_not_evicted_while_its_open_is_stuck() {
    let mut h = Harness::with_leftovers(&[], Some(1 << 20), &[("gone", 8192)]);
    h.send(Request::get_blob(1, "gone").unwrap(), true);
    let (open, _) = h.svc.take_jobs().next().unwrap();
    h.svc.job_expired(open, Duration::from_secs(1));
    h.replies();
    assert_eq!(h.svc.index().used_bytes(), 8192);
    h.svc.job_done(open, None);
    assert_eq!(h.svc.index().used_bytes(), 8192);
}

/// Review finding: a Delete job dropped from the queue (it never ran) only
/// logged and cleared the deleting mark: the evicted blob's files stayed on
/// disk, counted nowhere, and the cache stayed over --cache-size until a
/// restart. Now the blob is counted again and evicted again later.
#[test]
fn a_delete_that_never_ran_counts_its_blob_again() {
    let (mut h, delete, _kind) = evict_a_by_filling_b();
    assert_eq!(h.svc.index().used_bytes(), 8192, "b only");
    h.svc.job_done(delete, None);
    assert_eq!(
        h.svc.index().used_bytes(),
        2 * 8192,
        "a's files are counted"
    );
    // The next fill over the limit evicts "a" again.
    let tb = h.token("b");
    h.send(Request::get_blob(3, "b").unwrap(), true);
    h.replies();
    let _ = tb;
    h.svc.job_done(delete, None); // a stale completion changes nothing
    assert_eq!(h.svc.index().used_bytes(), 2 * 8192);
}

/// Review finding: the cache gauges read 0 after a start or an upgrade
/// until something changed. They show what the work dir holds at once.
#[test]
fn the_cache_gauges_show_the_work_dir_from_the_start() {
    let h = Harness::with_leftovers(&[], None, &[("x", 8192), ("y", 4096)]);
    let c = &h.svc.metrics().cache;
    assert_eq!((c.bytes.get(), c.blobs.get()), (12288, 2));
}

impl Harness {
    /// Sends `req` (with NEED_REPLY) as connection `conn`; returns its tag.
    fn send_as(&mut self, conn: ConnId, req: Request) -> u64 {
        self.next_tag += 1;
        let mut wire = Vec::new();
        encode_request(&mut wire, self.next_tag, true, &req);
        let h = Header::decode(wire[..20].try_into().unwrap()).unwrap();
        let m = Message {
            header: h,
            request: req,
        };
        self.svc.request(conn, m);
        self.next_tag
    }

    /// The one job started since the last call.
    fn one_job(&mut self) -> (JobId, JobKind) {
        let jobs: Vec<_> = self.svc.take_jobs().collect();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        jobs.into_iter().next().unwrap()
    }
}

/// Review finding: a closed connection's queued opens and fills stayed in
/// the pool's queue, so a client that queued a thousand cold requests,
/// closed and did it again grew the queue without bound. The jobs only
/// its requests waited for are now reported for cancelling; those another
/// connection waits on (or joins before the server takes the list) are not.
#[test]
fn a_closed_connections_own_queued_jobs_are_reported_for_cancelling() {
    let blobs = [("a", 16 * 4096), ("b", 4096), ("c", 4096), ("d", 4096)];
    let mut h = Harness::new(&blobs, None);
    let other = ConnId::new(2, 1);
    h.svc.open_session(other);
    let t1 = h.token("a");
    h.send_as(other, Request::get_blob(1, "a").unwrap());
    h.run_jobs();
    let t2 = match h.replies()[..] {
        [(
            _,
            Reply::GetBlob {
                token, result: 0, ..
            },
        )] => token,
        ref r => panic!("{r:?}"),
    };
    let fetch = |token, start| Request::FetchRange {
        token,
        start,
        count: 4096,
    };
    // Opens: "b" only for CONN, "c" shared; fills: granule 0 shared,
    // granule 8 only for CONN. None of them has run yet.
    h.send(Request::get_blob(1, "b").unwrap(), true);
    let (open_b, _) = h.one_job();
    h.send(Request::get_blob(1, "c").unwrap(), true);
    let (open_c, open_c_kind) = h.one_job();
    let tag_c = h.send_as(other, Request::get_blob(1, "c").unwrap());
    h.fetch(t1, 0, 4096);
    let (shared_fill, shared_kind) = h.one_job();
    let tag_fill = h.send_as(other, fetch(t2, 0));
    h.fetch(t1, 8 * 4096, 4096);
    let (own_fill, _) = h.one_job();
    // "d": CONN's alone at close, but the other joins before the take.
    h.send(Request::get_blob(1, "d").unwrap(), true);
    let (open_d, open_d_kind) = h.one_job();
    assert_eq!(h.svc.waiting(CONN()), 5);
    assert!(h.svc.take_orphans().is_empty(), "nobody closed yet");

    h.svc.close_session(CONN());
    let tag_d = h.send_as(other, Request::get_blob(1, "d").unwrap());
    let mut orphans = h.svc.take_orphans();
    orphans.sort_unstable();
    assert_eq!(orphans, vec![open_b, own_fill]);
    assert!(h.svc.take_orphans().is_empty(), "reported once");
    for id in [open_c, shared_fill, open_d] {
        assert!(!orphans.contains(&id));
    }

    // The pool removed them: forgotten cleanly, counted as no failure.
    for id in orphans {
        h.svc.job_cancelled(id);
    }
    assert!(h.replies().is_empty(), "nothing for the closed connection");
    assert_eq!(h.svc.metrics().work.fills_failed.get(), 0);
    assert_eq!(h.svc.waiting(other), 3);
    // The shared jobs still answer the other connection.
    for (id, kind) in [
        (open_c, open_c_kind),
        (shared_fill, shared_kind),
        (open_d, open_d_kind),
    ] {
        let out = h.runner.run(kind);
        h.svc.job_done(id, Some(out));
    }
    let mut tags: Vec<u64> = h.replies().iter().map(|(t, _)| *t).collect();
    tags.sort_unstable();
    assert_eq!(tags, vec![tag_c, tag_fill, tag_d]);
    assert_eq!(h.svc.waiting(other), 0);
    // The cancelled open and fill left nothing in flight: asked again,
    // they start anew and succeed.
    h.send_as(other, Request::get_blob(1, "b").unwrap());
    h.run_jobs();
    assert!(matches!(
        h.replies()[..],
        [(_, Reply::GetBlob { result: 0, .. })]
    ));
    h.send_as(other, fetch(t2, 8 * 4096));
    h.run_jobs();
    assert!(matches!(
        h.replies()[..],
        [(
            _,
            Reply::FetchRange {
                result: 0,
                count: 4096,
                ..
            }
        )]
    ));
    assert!(h.svc.idle());
}

/// Readahead is a reader's stream's work, not a request's: a closed
/// connection's fetch that joined a queued readahead fill leaves it queued.
#[test]
fn readahead_a_closed_connection_waited_on_is_not_orphaned() {
    let mut h = Harness::new(&[("b", 64 * 4096)], None);
    let token = h.token("b");
    // Three sequential reads start readahead behind the third.
    let mut ahead = Vec::new();
    for i in 0..3u64 {
        h.fetch(token, i * 4096, 4096);
        for (id, kind) in h.svc.take_jobs().collect::<Vec<_>>() {
            if kind.priority() == crate::worker::Priority::Background {
                ahead.push((id, kind));
            } else {
                let out = h.runner.run(kind);
                h.svc.job_done(id, Some(out));
            }
        }
    }
    let (id, kind) = ahead.remove(0);
    let JobKind::Fill { g0, .. } = kind else {
        panic!("{kind:?}")
    };
    h.fetch(token, g0 * 4096, 100);
    assert_eq!(h.svc.take_promoted().collect::<Vec<_>>(), vec![id]);
    h.svc.close_session(CONN());
    assert!(h.svc.take_orphans().is_empty());
}
