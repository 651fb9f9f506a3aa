//! Blobs in the work dir that are not open: those an earlier run left
//! there that no client has opened since the daemon started (counted
//! against the limit from the start, one directory scan), and those closed
//! because more than `max_open_blobs` were open. Evictable, and kept
//! counted while an open of one runs, fails, or while the delete of an
//! evicted blob did not happen.

use super::{Index, OpenBlob};
use crate::cache::Blob;
use crate::cache::{scan_data_dir, CacheConfig};
use std::collections::HashMap;
use std::sync::Arc;

/// A blob whose files are in the work dir but that no client opened since
/// the daemon started.
pub(super) struct ColdBlob {
    pub(super) bytes: u64,
    pub(super) last_used: u64,
    /// An open of it is in flight: its bytes stay counted (the files are on
    /// disk) but it is not evicted under the opening worker.
    pub(super) opening: bool,
}

/// The blobs in `cfg`'s data dir, oldest first by mtime (their logical
/// time is their rank): the cold table, its bytes, and the clock after it.
pub(super) fn scan(cfg: &CacheConfig) -> (HashMap<String, ColdBlob>, u64, u64) {
    let mut cold = HashMap::new();
    let mut used = 0;
    let mut clock = 0;
    let mut found = scan_data_dir(&cfg.data_dir());
    found.sort_by_key(|(_, _, mtime)| *mtime);
    for (id, bytes, _) in found {
        used += bytes;
        clock += 1;
        let last_used = clock;
        let blob = ColdBlob {
            bytes,
            last_used,
            opening: false,
        };
        cold.insert(id, blob);
    }
    (cold, used, clock)
}

impl Index {
    /// The blob's bytes stop counting as a cold blob's: it is open now
    /// ([`Index::insert`] counts its ready bytes instead).
    pub(super) fn forget_cold(&mut self, id: &str) {
        if let Some(c) = self.cold.remove(id) {
            self.used -= c.bytes.min(self.used);
        }
    }

    /// An open of blob `id` starts: if it is a cold blob, it stops being an
    /// eviction candidate while the open runs, but its bytes stay counted
    /// until [`Index::insert`] counts them as an open blob's.
    pub fn cold_opening(&mut self, id: &str) {
        if let Some(c) = self.cold.get_mut(id) {
            c.opening = true;
        }
    }

    /// The open of blob `id` failed (or was dropped, or returned after it
    /// was abandoned without a blob): a cold blob's files are still on
    /// disk, counted, and may be evicted again.
    pub fn open_failed(&mut self, id: &str) {
        if let Some(c) = self.cold.get_mut(id) {
            c.opening = false;
        }
    }

    /// Closes open blobs, least recently used first, until at most `keep`
    /// are open: only blobs no token holds, no fill fills, no job or
    /// request holds a reference to (so no I/O on their files is under way)
    /// and whose marks are checkpointed (their map on disk is synced and
    /// holds every bit they have), and not in a hung backend's cool-down
    /// (the breaker lives in the open blob). Each stays counted as a cold
    /// blob; a GetBlob opens it again from its files. Idle blobs that only
    /// lack a checkpoint are named by [`Index::to_checkpoint_for_closing`].
    pub(super) fn close_idle(&mut self, keep: usize) {
        while self.blobs.len() > keep {
            let idle = self
                .blobs
                .iter()
                .filter(|(_, b)| idle(b) && !b.blob.is_unsynced())
                .min_by_key(|(_, b)| b.last_used)
                .map(|(k, _)| k);
            let Some(key) = idle else {
                return;
            };
            let ob = self.blobs.remove(key);
            let id = ob.blob.id().to_owned();
            self.by_id.remove(&id);
            log::debug!("closing blob {id}: more than {keep} open; it stays cached");
            let cold = ColdBlob {
                bytes: ob.bytes,
                last_used: ob.last_used,
                opening: false,
            };
            self.cold.insert(id, cold);
        }
    }

    /// With the open blobs at their limit, up to `n` idle blobs that
    /// cannot be closed only for want of a checkpoint, least recently used
    /// first: the caller checkpoints them on a worker, and an open after
    /// that may close them.
    pub fn to_checkpoint_for_closing(&self, n: usize) -> Vec<Arc<Blob>> {
        if self.blobs.len() < self.cfg.max_open_blobs {
            return Vec::new();
        }
        let mut dirty: Vec<&OpenBlob> = self
            .blobs
            .iter()
            .map(|(_, b)| b)
            .filter(|b| idle(b) && b.blob.is_unsynced())
            .collect();
        dirty.sort_by_key(|b| b.last_used);
        dirty.iter().take(n).map(|b| b.blob.clone()).collect()
    }

    /// The delete of evicted blob `id` (counted for `bytes`) never ran or
    /// failed: its files may still be on disk, so it is counted again, as
    /// a cold blob first in line for the next eviction.
    pub fn delete_failed(&mut self, id: &str, bytes: u64) {
        if self.by_id.contains_key(id) || self.cold.contains_key(id) {
            return;
        }
        self.used += bytes;
        let cold = ColdBlob {
            bytes,
            last_used: 0,
            opening: false,
        };
        self.cold.insert(id.to_owned(), cold);
    }
}

/// No token holds `b`, no fill fills it, nothing else holds a reference
/// (no job, no request) and no cool-down is on.
fn idle(b: &OpenBlob) -> bool {
    b.refs == 0 && b.inflight.is_empty() && b.hung.is_none() && Arc::strong_count(&b.blob) == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::setup;
    use crate::cache::Blob;

    #[test]
    fn past_the_open_limit_idle_blobs_are_closed_and_stay_cached() {
        let (d, cfg, be, _) = setup(2 * 4096, 4096);
        for id in ["a", "c", "e"] {
            std::fs::write(d.path().join("be").join(id), [7u8; 4096]).unwrap();
        }
        let mut cfg = (*cfg).clone();
        cfg.max_open_blobs = 2;
        let cfg = Arc::new(cfg);
        let mut index = Index::new(cfg.clone());
        // Filled and checkpointed: closable once idle.
        let open = |index: &mut Index, id| {
            let b = Blob::open(&cfg, &be, id).unwrap();
            b.fill(&be, 0, 1).unwrap();
            b.checkpoint().unwrap();
            index.insert(b)
        };
        open(&mut index, "a");
        let b = open(&mut index, "b");
        index.acquire(b); // a token holds "b"
        let used = index.used_bytes();
        // A third blob: "a", idle, is closed; "b" is held.
        open(&mut index, "c");
        assert_eq!(index.len(), 2);
        assert!(index.lookup("a").is_none() && index.lookup("b").is_some());
        assert_eq!(index.blob_count(), 3, "still cached");
        assert_eq!(index.used_bytes(), used + 4096, "still counted");
        // A blob a job still holds is not closed either.
        let c = index.lookup("c").unwrap();
        let held = index.blob(c).unwrap().clone();
        open(&mut index, "e");
        assert_eq!(index.len(), 3, "nothing idle to close: over the limit");
        drop(held);
        // Opened again from its files, its granule is still ready; room is
        // made by closing both idle blobs.
        let again = Blob::open(&cfg, &be, "a").unwrap();
        assert!(again.is_ready(0), "the map kept what was filled");
        index.insert(again);
        assert_eq!(index.len(), 2);
        assert!(index.lookup("b").is_some() && index.lookup("a").is_some());
        assert_eq!(index.blob_count(), 4);

        // Marks not checkpointed keep an idle blob open until a checkpoint
        // (which the service runs on a worker) makes them durable.
        let a = index.lookup("a").unwrap();
        index.blob(a).unwrap().fill(&be, 0, 1).unwrap();
        index.insert(Blob::open(&cfg, &be, "e").unwrap());
        assert!(index.lookup("a").is_some(), "unsynced: not closed");
        // Named for a checkpoint: "a", and "e", whose map came from disk.
        let named = index.to_checkpoint_for_closing(4);
        let mut ids: Vec<&str> = named.iter().map(|b| b.id()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["a", "e"]);
        for b in &named {
            b.checkpoint().unwrap();
        }
        drop(named);
        assert!(index.to_checkpoint_for_closing(4).is_empty());
        index.insert(Blob::open(&cfg, &be, "c").unwrap());
        assert!(index.lookup("a").is_none(), "closed once checkpointed");
        assert_eq!(index.len(), 2);
    }
}
