//! Splitting a granule range of an open blob into runs to fill: what is
//! ready is skipped, what a job is filling is waited on, and what is
//! missing goes out in runs of at most one fill job, shrinking toward the
//! blob's end.

use super::OpenBlob;
use crate::cache::JOBS_PER_RANGE;
use crate::jobs::JobId;

/// Bytes of a `size`-byte blob that runs of `granule`-byte granules
/// `(g0, n)` cover (the last granule ends at the blob's end).
pub(super) fn run_bytes(runs: &[(u64, u64)], granule: u64, size: u64) -> u64 {
    runs.iter()
        .map(|&(g0, n)| ((g0 + n) * granule).min(size).saturating_sub(g0 * granule))
        .sum()
}

/// What a granule range of a blob needs: granules already being filled
/// (by that job), or a run `(g0, n)` of granules neither ready nor in
/// flight, at most the longest fill job.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Span {
    Filling(JobId),
    Missing(u64, u64),
}

/// The [`Span`]s of granules `[g0, g1]` of `ob`, in order; ready granules
/// are skipped. A missing run is at most `max_run` granules, and at most a
/// quarter of what is left of the blob from its start, though never cut
/// below `min_run`.
pub(super) fn spans(
    ob: &OpenBlob,
    g0: u64,
    g1: u64,
    max_run: u64,
    min_run: u64,
) -> impl Iterator<Item = Span> + '_ {
    let blob = &ob.blob;
    let mut gi = g0;
    std::iter::from_fn(move || {
        while gi <= g1 && blob.is_ready(gi) {
            gi += 1;
        }
        if gi > g1 {
            return None;
        }
        // Already being filled by a job that covers gi?
        if let Some((&j0, &(n, job))) = ob.inflight.range(..=gi).next_back() {
            if gi < j0 + n {
                gi = j0 + n;
                return Some(Span::Filling(job));
            }
        }
        let next_inflight = ob
            .inflight
            .range(gi..)
            .next()
            .map_or(u64::MAX, |(&j0, _)| j0);
        // Runs shrink toward the blob's end, to a quarter of what is left:
        // the last jobs then land one after another, so the hash (which
        // goes in order) is never left a whole window to do at the end.
        let left = blob.granules() - gi;
        let max_run = max_run.min((left / JOBS_PER_RANGE).max(min_run));
        let mut n = 0;
        while gi + n <= g1 && n < max_run && gi + n < next_inflight && !blob.is_ready(gi + n) {
            n += 1;
        }
        let run = Span::Missing(gi, n);
        gi += n;
        Some(run)
    })
}
