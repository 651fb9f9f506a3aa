//! The reactor's table of cached blobs: which are open, which granules are
//! being filled (so each is fetched once however many clients ask), the
//! least-recently-used order and the byte limit, and the breaker that stops
//! calling a backend that hung on a blob. No I/O happens here. Which blob
//! to evict, and when, is in `index/evict.rs`; the blobs an earlier run
//! left on disk in `index/cold.rs`.

use super::disk::DiskWatch;
use super::readahead::Readahead;
use super::{Blob, CacheConfig};
use crate::jobs::JobId;
use cold::ColdBlob;
pub use evict::{Cause, Evictions};
use runs::{run_bytes, spans, Span};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod cold;
mod evict;
mod runs;

/// A blob's slot in the index. A slot is reused once its blob is evicted,
/// which happens only to blobs no token holds and no fill is filling, so a
/// key is stable while a token or an in-flight fill refers to it; a late
/// completion checks that the slot still holds its blob.
pub type BlobKey = usize;

/// What a FetchRange needs, as the index sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Every granule is ready: `count` bytes from start are valid now.
    Ready { count: u64 },
    /// start >= blob size.
    OutOfRange,
    /// The backend hung on this blob recently: fail without waiting.
    Unavailable,
    /// The fills would take the file system below `--min-free`, even after
    /// evicting what may be evicted: fail without starting them.
    NoSpace,
    /// `count` bytes become valid once the fills in flight that the range
    /// needs (`waiting_on`) and the new runs of granules `(g0, n)` (`runs`,
    /// to be started and recorded with [`Index::fill_started`]) are done.
    Wait {
        count: u64,
        waiting_on: Vec<JobId>,
        runs: Vec<(u64, u64)>,
    },
}

struct OpenBlob {
    blob: Arc<Blob>,
    /// In-flight fills by first granule: (granule count, job).
    inflight: BTreeMap<u64, (u64, JobId)>,
    /// Tokens on live connections that name this blob.
    refs: usize,
    /// Logical time of the last GetBlob or FetchRange.
    last_used: u64,
    /// Bytes of data counted against the limit.
    bytes: u64,
    /// Set when a fill of this blob timed out: until `until`, fetches that
    /// need the backend fail at once; after it, one probe fill at a time.
    hung: Option<Hung>,
}

#[derive(Clone, Copy)]
struct Hung {
    until: Instant,
    strikes: u32,
}

/// The table of cached blobs. See the module docs.
pub struct Index {
    cfg: Arc<CacheConfig>,
    by_id: HashMap<String, BlobKey>,
    blobs: slab::Slab<OpenBlob>,
    cold: HashMap<String, ColdBlob>,
    /// Data bytes of every blob, open or cold.
    used: u64,
    clock: u64,
    /// Ids whose files are to be deleted (see [`Index::take_evictions`]).
    evicted: Vec<(String, u64)>,
    /// Blobs evicted since start, by cause.
    evictions: Evictions,
    /// The free-space watermark, if one is kept.
    disk: Option<DiskWatch>,
}

impl Index {
    /// The index over `cfg.workdir`. The blobs already on disk are counted
    /// (one directory scan, before serving): against the limit, and in the
    /// gauges from the start.
    pub fn new(cfg: Arc<CacheConfig>) -> Index {
        let (cold, used, clock) = cold::scan(&cfg);
        Index {
            cfg: cfg.clone(),
            by_id: HashMap::new(),
            blobs: slab::Slab::new(),
            cold,
            used,
            clock,
            evicted: Vec::new(),
            evictions: Evictions::default(),
            disk: cfg.min_free.map(|m| DiskWatch::new(cfg.workdir.clone(), m)),
        }
    }

    pub fn config(&self) -> &Arc<CacheConfig> {
        &self.cfg
    }

    /// The open blob named `id`, if any.
    pub fn lookup(&self, id: &str) -> Option<BlobKey> {
        self.by_id.get(id).copied()
    }

    pub fn blob(&self, key: BlobKey) -> Option<&Arc<Blob>> {
        self.blobs.get(key).map(|b| &b.blob)
    }

    /// Open blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    /// Blobs whose bytes are counted: open ones, and those an earlier run
    /// left on disk that no client has opened since.
    pub fn blob_count(&self) -> usize {
        self.blobs.len() + self.cold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Adds a blob a worker opened; if another open of the same id won the
    /// race, that one is kept and returned.
    pub fn insert(&mut self, blob: Blob) -> BlobKey {
        if let Some(&k) = self.by_id.get(blob.id()) {
            return k;
        }
        // Room for this one among the blobs kept open (fds are bounded).
        self.close_idle(self.cfg.max_open_blobs.saturating_sub(1));
        self.forget_cold(blob.id());
        let bytes = blob.ready_bytes();
        self.used += bytes;
        self.clock += 1;
        let id = blob.id().to_owned();
        let key = self.blobs.insert(OpenBlob {
            blob: Arc::new(blob),
            inflight: BTreeMap::new(),
            refs: 0,
            last_used: self.clock,
            bytes,
            hung: None,
        });
        self.by_id.insert(id, key);
        key
    }

    /// A token naming `key` was handed out; the blob is not evicted while
    /// any is held.
    pub fn acquire(&mut self, key: BlobKey) {
        if let Some(ob) = self.blobs.get_mut(key) {
            ob.refs += 1;
        }
    }

    /// A token naming `key` was dropped.
    pub fn release(&mut self, key: BlobKey) {
        if let Some(ob) = self.blobs.get_mut(key) {
            ob.refs = ob.refs.saturating_sub(1);
        }
    }

    /// Data bytes counted against the limit.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Ids whose files must be deleted, chosen since the last call. Until
    /// the deletion is done, the caller must not open these ids again.
    /// Each comes with the bytes it was counted for, to give back with
    /// [`Index::delete_failed`] if its files stay.
    pub fn take_evictions(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.evicted)
    }

    /// Blobs evicted since start, by cause.
    pub fn evictions(&self) -> Evictions {
        self.evictions
    }

    /// Every open blob, for checkpoints at shutdown.
    pub fn blobs(&self) -> impl Iterator<Item = &Arc<Blob>> {
        self.blobs.iter().map(|(_, b)| &b.blob)
    }

    /// Plans a FetchRange of `[start, start + count)` on `key`: ready,
    /// impossible, or the fills it must wait for. `now` is asked only when
    /// the blob is in a cool-down.
    pub fn plan(
        &mut self,
        key: BlobKey,
        start: u64,
        count: u64,
        now: impl FnOnce() -> Instant,
    ) -> Plan {
        let plan = self.plan_fills(key, start, count, now);
        let Plan::Wait { runs, .. } = &plan else {
            return plan;
        };
        if runs.is_empty() || self.disk.is_none() {
            return plan;
        }
        let g = self.cfg.granule;
        let size = self.blob(key).map_or(0, |b| b.size());
        let need = run_bytes(runs, g, size);
        if !self.make_room(need, Cause::MinFree) {
            let id = self.blob(key).map_or("?", |b| b.id());
            log::warn!("blob {id}: {need} bytes do not fit above --min-free; failing the fetch");
            return Plan::NoSpace;
        }
        plan
    }

    fn plan_fills(
        &mut self,
        key: BlobKey,
        start: u64,
        count: u64,
        now: impl FnOnce() -> Instant,
    ) -> Plan {
        let Some(ob) = self.blobs.get_mut(key) else {
            return Plan::OutOfRange;
        };
        self.clock += 1;
        ob.last_used = self.clock;
        let blob = &ob.blob;
        let size = blob.size();
        if start >= size {
            return Plan::OutOfRange;
        }
        let end = start.saturating_add(count).min(size);
        if end == start {
            return Plan::Ready { count: 0 };
        }
        let g = blob.granule_size();
        let (g0, g1) = (start / g, (end - 1) / g);
        if blob.all_ready(g0, g1) {
            return Plan::Ready { count: end - start };
        }
        // After a timeout, the backend is left alone for a while, then
        // probed with one fill at a time until one succeeds.
        let probing = match ob.hung {
            Some(h) if now() < h.until => return Plan::Unavailable,
            Some(_) => true,
            None => false,
        };
        let max_run = self.cfg.job_granules(end - start, g, blob.fill_rate());
        let mut waiting_on: Vec<JobId> = Vec::new();
        let mut runs = Vec::new();
        for span in spans(ob, g0, g1, max_run, self.cfg.small_job(g)) {
            match span {
                Span::Filling(job) => {
                    if waiting_on.last() != Some(&job) {
                        waiting_on.push(job);
                    }
                }
                Span::Missing(gi, n) => {
                    if probing && (!ob.inflight.is_empty() || !runs.is_empty()) {
                        // The probe is out; this request cannot be served now.
                        return Plan::Unavailable;
                    }
                    runs.push((gi, n));
                }
            }
        }
        Plan::Wait {
            count: end - start,
            waiting_on,
            runs,
        }
    }

    /// Shows `stream` (one reader's readahead state) a FetchRange of
    /// `[start, start + count)` on `key`, hit or miss; returns the runs of
    /// granules `(g0, n)` to fill ahead of a sequential reader, none of them
    /// ready or in flight, to be started in the background and recorded
    /// with [`Index::fill_started`]. Empty for a random reader, while the
    /// backend is in a cool-down, or when the disk has no room for them.
    pub fn read_ahead(
        &mut self,
        key: BlobKey,
        stream: &mut Readahead,
        start: u64,
        count: u64,
    ) -> Vec<(u64, u64)> {
        let (max, min) = (self.cfg.readahead, self.cfg.max_job);
        let Some(ob) = self.blobs.get_mut(key) else {
            return Vec::new();
        };
        let size = ob.blob.size();
        let end = start.saturating_add(count).min(size);
        if start >= end {
            return Vec::new();
        }
        if ob.hung.is_some() {
            // Nothing is asked of a backend in a cool-down, and the stream
            // does not move on as if it had been.
            return Vec::new();
        }
        let Some((from, to)) = stream.on_request(start, end, size, min, max) else {
            return Vec::new();
        };
        let g = ob.blob.granule_size();
        let max_run = self
            .cfg
            .job_granules(stream.window(), g, ob.blob.fill_rate());
        let runs: Vec<(u64, u64)> =
            spans(ob, from / g, (to - 1) / g, max_run, self.cfg.small_job(g))
                .filter_map(|s| match s {
                    Span::Missing(g0, n) => Some((g0, n)),
                    Span::Filling(_) => None,
                })
                .collect();
        let need = run_bytes(&runs, g, size);
        if need > 0 && self.disk.is_some() && !self.make_room(need, Cause::MinFree) {
            return Vec::new();
        }
        runs
    }

    /// Records that `job` fills granules `[g0, g0 + n)` of `key`.
    pub fn fill_started(&mut self, key: BlobKey, g0: u64, n: u64, job: JobId) {
        if let Some(ob) = self.blobs.get_mut(key) {
            ob.inflight.insert(g0, (n, job));
        }
    }

    /// The open blob at `key`, if that slot still holds `blob`.
    fn holding(&mut self, key: BlobKey, blob: &Arc<Blob>) -> Option<&mut OpenBlob> {
        self.blobs
            .get_mut(key)
            .filter(|ob| Arc::ptr_eq(&ob.blob, blob))
    }

    /// Records that fill `job` of `blob` (at granule `g0`) returned, in time
    /// or after it was abandoned. The blob's bytes are counted from its
    /// ready bits, so a late success is credited and nothing is counted
    /// twice; then the limit is enforced.
    pub fn fill_finished(&mut self, key: BlobKey, blob: &Arc<Blob>, g0: u64, job: JobId, ok: bool) {
        let granule = self.cfg.granule;
        let mut finished_bytes = 0;
        if let Some(ob) = self.holding(key, blob) {
            if ob.inflight.get(&g0).is_some_and(|&(_, j)| j == job) {
                if let Some((n, _)) = ob.inflight.remove(&g0) {
                    let end = ((g0 + n) * granule).min(ob.blob.size());
                    finished_bytes = end.saturating_sub(g0 * granule);
                }
            }
            if ok {
                ob.hung = None;
            }
            let bytes = ob.blob.ready_bytes();
            let before = std::mem::replace(&mut ob.bytes, bytes);
            self.used = (self.used + bytes).saturating_sub(before);
        }
        if let Some(disk) = self.disk.as_mut() {
            disk.fill_done(finished_bytes);
        }
        self.enforce_limit();
    }

    /// Records that a fill of `key` ran past the backend timeout: the blob
    /// is left alone for a cool-down that doubles with each strike (up to 16
    /// timeouts), then probed one fill at a time.
    pub fn fill_timed_out(&mut self, key: BlobKey, now: Instant, timeout: Duration) {
        if let Some(ob) = self.blobs.get_mut(key) {
            let strikes = ob.hung.map_or(0, |h| h.strikes + 1);
            let cool_down = timeout * (1 << strikes.min(4));
            ob.hung = Some(Hung {
                until: now + cool_down,
                strikes,
            });
            log::warn!(
                "blob {}: backend timed out; failing its fetches for {cool_down:?}",
                ob.blob.id()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::setup;

    /// Starts every run of a plan with consecutive job ids from `next`.
    fn start_runs(
        index: &mut Index,
        key: BlobKey,
        plan: &Plan,
        next: &mut JobId,
    ) -> Vec<(JobId, u64, u64)> {
        let Plan::Wait { runs, .. } = plan else {
            return Vec::new();
        };
        runs.iter()
            .map(|&(g0, n)| {
                *next += 1;
                index.fill_started(key, g0, n, *next);
                (*next, g0, n)
            })
            .collect()
    }

    #[test]
    fn plans_fills_once_and_coalesces() {
        let (_d, cfg, be, _) = setup(10 * 4096 + 5, 4096);
        let mut index = Index::new(cfg.clone());
        let key = index.insert(Blob::open(&cfg, &be, "b").unwrap());
        let now = Instant::now();
        assert_eq!(index.plan(key, 10 * 4096 + 5, 1, || now), Plan::OutOfRange);
        // Granules 0..=10 (11 granules), max job 2 granules: 6 runs.
        let plan = index.plan(key, 0, u64::MAX, || now);
        let mut next = 0;
        let jobs = start_runs(&mut index, key, &plan, &mut next);
        assert_eq!(jobs.len(), 6);
        assert!(matches!(plan, Plan::Wait { count, .. } if count == 10 * 4096 + 5));
        // A second asker of an overlapping range waits on the same jobs.
        match index.plan(key, 4096 * 3 + 1, 4096 * 2, || now) {
            Plan::Wait {
                count,
                waiting_on,
                runs,
            } => {
                assert_eq!((count, waiting_on, runs), (8192, vec![2, 3], vec![]));
            }
            other => panic!("{other:?}"),
        }
        let blob = index.blob(key).unwrap().clone();
        for &(job, g0, n) in &jobs {
            blob.fill(&be, g0, n).unwrap();
            index.fill_finished(key, &blob, g0, job, true);
        }
        assert_eq!(
            index.plan(key, 7, 40_000, || now),
            Plan::Ready { count: 40_000 }
        );
        assert_eq!(index.used_bytes(), 10 * 4096 + 5);
    }

    #[test]
    fn long_ranges_are_filled_in_larger_jobs_that_shrink_toward_the_end() {
        // Jobs of 2 granules for short ranges; a range of 64 granules far
        // from the blob's end is split in four jobs of 16, so a long pull
        // makes fewer requests; near the end they shrink to a quarter of
        // what is left.
        let (_d, cfg, be, _) = setup(256 * 4096, 4096);
        let mut index = Index::new(cfg.clone());
        let key = index.insert(Blob::open(&cfg, &be, "b").unwrap());
        let now = Instant::now();
        let runs = |p: Plan| match p {
            Plan::Wait { runs, .. } => runs,
            other => panic!("{other:?}"),
        };
        // Before any fill the backend's speed is unknown: short jobs only.
        let short = runs(index.plan(key, 0, 64 * 4096, || now));
        assert!(short.iter().all(|&(_, n)| n == 2), "{short:?}");
        // Once a fill has shown a fast backend, long ranges get long jobs.
        let blob = index.blob(key).unwrap().clone();
        let mut next = 0;
        let first = runs(index.plan(key, 0, 4 * 4096, || now));
        assert_eq!(first, [(0, 2), (2, 2)]);
        for (job, g0, n) in start_runs(
            &mut index,
            key,
            &Plan::Wait {
                count: 0,
                waiting_on: vec![],
                runs: first,
            },
            &mut next,
        ) {
            blob.fill(&be, g0, n).unwrap();
            index.fill_finished(key, &blob, g0, job, true);
        }
        assert!(blob.fill_rate() > 16 * 4096, "local files are fast");
        let long = runs(index.plan(key, 0, 64 * 4096, || now));
        assert_eq!(long, [(4, 16), (20, 16), (36, 16), (52, 12)]);
        // The last 192 granules, asked at once: every granule once, in
        // runs that never grow, none longer than a quarter of what is left
        // from its start (or the short job), the last ones short.
        let tail = runs(index.plan(key, 64 * 4096, 192 * 4096, || now));
        assert_eq!(tail.first().map(|r| r.0), Some(64));
        assert!(tail
            .windows(2)
            .all(|w| w[0].0 + w[0].1 == w[1].0 && w[1].1 <= w[0].1));
        assert_eq!(tail.iter().map(|r| r.1).sum::<u64>(), 192, "{tail:?}");
        assert!(
            tail.iter().all(|&(g0, n)| n <= ((256 - g0) / 4).max(2)),
            "{tail:?}"
        );
        assert_eq!(tail.first().map(|r| r.1), Some(48), "a quarter: {tail:?}");
        assert!(tail.iter().rev().take(3).all(|r| r.1 <= 2), "{tail:?}");
    }

    #[test]
    fn a_timed_out_blob_fails_fast_then_is_probed_one_fill_at_a_time() {
        let (_d, cfg, be, _) = setup(10 * 4096, 4096);
        let mut index = Index::new(cfg.clone());
        let key = index.insert(Blob::open(&cfg, &be, "b").unwrap());
        let blob = index.blob(key).unwrap().clone();
        let t0 = Instant::now();
        let mut next = 0;
        let p = index.plan(key, 0, 8192, || t0);
        let first = start_runs(&mut index, key, &p, &mut next);
        let p = index.plan(key, 3 * 4096, 8192, || t0);
        let second = start_runs(&mut index, key, &p, &mut next);
        assert_eq!((first.len(), second.len()), (1, 1));
        let timeout = Duration::from_millis(30);
        index.fill_timed_out(key, t0, timeout);
        for &(job, g0, _) in first.iter().chain(&second) {
            index.fill_finished(key, &blob, g0, job, false);
        }
        assert_eq!(index.plan(key, 0, 10, || t0), Plan::Unavailable);
        // Cool-down over: one probe; a second range cannot start another.
        let later = t0 + timeout + Duration::from_millis(1);
        let p = index.plan(key, 0, 10, || later);
        let probe = start_runs(&mut index, key, &p, &mut next);
        assert_eq!(probe.len(), 1);
        assert_eq!(index.plan(key, 5 * 4096, 10, || later), Plan::Unavailable);
        let (job, g0, n) = probe[0];
        blob.fill(&be, g0, n).unwrap();
        index.fill_finished(key, &blob, g0, job, true);
        // A success clears the strike: fetches plan fills normally again.
        assert!(matches!(
            index.plan(key, 5 * 4096, 10, || later),
            Plan::Wait { ref runs, .. } if runs.len() == 1
        ));
    }

    #[test]
    fn a_fill_that_cannot_fit_evicts_nothing() {
        let (_d, cfg, be, _) = setup(8 * 4096, 4096);
        let mut cfg = (*cfg).clone();
        // Nothing can fit under a 100 % watermark.
        cfg.min_free = Some(crate::cache::MinFree::Percent(100.0));
        let cfg = Arc::new(cfg);
        let mut index = Index::new(cfg.clone());
        let other = index.insert(Blob::open(&cfg, &be, "b").unwrap());
        let p = index.plan(other, 0, 4096, Instant::now);
        assert_eq!(p, Plan::NoSpace);
        assert!(
            index.take_evictions().is_empty(),
            "a hopeless fill evicts nothing"
        );
        assert_eq!(index.evictions().min_free, 0);
    }

    #[test]
    fn a_late_fill_is_credited_once() {
        let (_d, cfg, be, _) = setup(4 * 4096, 4096);
        let mut index = Index::new(cfg.clone());
        let key = index.insert(Blob::open(&cfg, &be, "b").unwrap());
        let blob = index.blob(key).unwrap().clone();
        let p = index.plan(key, 0, 4096, Instant::now);
        let mut next = 0;
        let (job, g0, n) = start_runs(&mut index, key, &p, &mut next)[0];
        // Abandoned: recorded as failed while the worker still runs.
        index.fill_finished(key, &blob, g0, job, false);
        assert_eq!(index.used_bytes(), 0);
        // The stuck worker returns with the bytes written.
        blob.fill(&be, g0, n).unwrap();
        index.fill_finished(key, &blob, g0, job, true);
        assert_eq!(index.used_bytes(), 4096);
        // The same completion seen twice is not counted twice.
        index.fill_finished(key, &blob, g0, job, true);
        assert_eq!(index.used_bytes(), 4096);
    }

    #[test]
    fn readahead_follows_a_sequential_reader_and_skips_what_is_filling() {
        // 64 granules of 4 KiB, jobs of 2 granules, window up to 16.
        let (_d, cfg, be, _) = setup(64 * 4096, 4096);
        let mut cfg = (*cfg).clone();
        cfg.readahead = 16 * 4096;
        let cfg = Arc::new(cfg);
        let mut index = Index::new(cfg.clone());
        let key = index.insert(Blob::open(&cfg, &be, "b").unwrap());
        let blob = index.blob(key).unwrap().clone();
        let now = Instant::now();
        let mut next = 0;
        let mut ahead = Vec::new();
        let mut stream = Readahead::default();
        for i in 0..8u64 {
            let plan = index.plan(key, i * 4096, 4096, || now);
            for (job, g0, n) in start_runs(&mut index, key, &plan, &mut next) {
                blob.fill(&be, g0, n).unwrap();
                index.fill_finished(key, &blob, g0, job, true);
            }
            for (g0, n) in index.read_ahead(key, &mut stream, i * 4096, 4096) {
                // No larger than the planner's job for the window, however
                // fast the backend.
                let job = cfg.job_granules(stream.window(), 4096, u64::MAX);
                assert!((1..=job).contains(&n), "runs are at most one job");
                for g in g0..g0 + n {
                    assert!(!blob.is_ready(g), "granule {g} is ready already");
                    assert!(!ahead.contains(&g), "granule {g} asked twice");
                    ahead.push(g);
                }
                next += 1;
                index.fill_started(key, g0, n, next);
            }
        }
        // The first two reads asked for nothing; then the reader always had
        // granules in flight ahead of it, none past the window.
        assert!(
            ahead.contains(&8) && ahead.iter().all(|&g| g < 8 + 16),
            "{ahead:?}"
        );
        // The granules are in flight, not ready: nothing was marked valid.
        assert!(ahead.iter().all(|&g| !blob.is_ready(g)));
        // A random reader elsewhere gets nothing ahead.
        let mut other = Readahead::default();
        for g in [50, 30, 40, 10] {
            assert!(index.read_ahead(key, &mut other, g * 4096, 100).is_empty());
        }
    }
}
