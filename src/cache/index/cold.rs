//! Blobs an earlier run left in the work dir that no client has opened
//! since the daemon started: counted against the limit from the start
//! (one directory scan), evictable, and kept counted while an open of one
//! runs, fails, or while the delete of an evicted blob did not happen.

use super::Index;
use crate::cache::{scan_data_dir, CacheConfig};
use std::collections::HashMap;

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
