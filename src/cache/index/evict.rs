//! Eviction, for the index: which blob goes when the cache is over
//! `--cache-size`, when a fill would take the file system below
//! `--min-free`, or after a write ran out of space. Only blobs no token
//! holds and no fill is filling are candidates, least recently used first.

use super::{BlobKey, Index};
use std::time::Instant;

/// Why a blob was evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Over `--cache-size`.
    Size,
    /// To keep `--min-free` free before a fill.
    MinFree,
    /// A fill hit ENOSPC.
    NoSpace,
}

/// Evictions since start, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evictions {
    pub size: u64,
    pub min_free: u64,
    pub no_space: u64,
}

impl Index {
    /// Evicts least recently used blobs until `need` more bytes keep the
    /// file system above `--min-free`, and counts them as planned. False if
    /// they cannot fit even then.
    pub(super) fn make_room(&mut self, need: u64, cause: Cause) -> bool {
        let now = Instant::now();
        let Some(disk) = self.disk.as_mut() else {
            return true;
        };
        let mut short = disk.shortfall(need, now);
        if short > 0 {
            // Before evicting or refusing, a fresh figure: space may have
            // been freed (or the file system grown) since the last one.
            disk.invalidate();
            short = disk.shortfall(need, now);
        }
        if short > self.evictable_bytes() {
            // Evicting everything would not be enough: evict nothing.
            return false;
        }
        while short > 0 {
            if self.evict_one(cause).is_none() {
                return false;
            }
            match self.disk.as_mut() {
                Some(disk) => short = disk.shortfall(need, now),
                None => return true,
            }
        }
        if let Some(disk) = self.disk.as_mut() {
            disk.plan(need);
        }
        true
    }

    /// Bytes of the blobs no one holds (what eviction could free).
    fn evictable_bytes(&self) -> u64 {
        let open: u64 = self
            .blobs
            .iter()
            .filter(|(_, b)| b.refs == 0 && b.inflight.is_empty())
            .map(|(_, b)| b.bytes)
            .sum();
        let cold: u64 = self
            .cold
            .values()
            .filter(|c| !c.opening)
            .map(|c| c.bytes)
            .sum();
        open + cold
    }

    /// A fill hit ENOSPC: the file system is fuller than the last figure
    /// said. Evicts for `need` bytes; true if anything was evicted (so a
    /// retry may succeed).
    pub fn no_space(&mut self, need: u64) -> bool {
        if let Some(disk) = self.disk.as_mut() {
            disk.invalidate();
        }
        let before = self.evictions.no_space;
        if self.disk.is_some() {
            self.make_room(need, Cause::NoSpace);
        } else if self.evict_one(Cause::NoSpace).is_some() {
            return true;
        }
        self.evictions.no_space > before
    }

    /// While over the limit, evicts the least recently used blobs nobody
    /// holds (no token on a live connection, no fill in flight), down to 90%
    /// of the limit. Clients that still hold an evicted blob's fd keep
    /// reading its bytes: the files are unlinked, not overwritten.
    pub(super) fn enforce_limit(&mut self) {
        let Some(limit) = self.cfg.limit else {
            return;
        };
        if self.used <= limit {
            return;
        }
        let target = limit - limit / 10;
        while self.used > target {
            if self.evict_one(Cause::Size).is_none() {
                log::warn!(
                    "cache holds {} bytes, over its limit of {limit}, but every blob is in use",
                    self.used
                );
                return;
            }
        }
    }

    /// Evicts the least recently used blob no one holds; returns its bytes,
    /// or `None` if every blob is in use.
    fn evict_one(&mut self, cause: Cause) -> Option<u64> {
        let (key, id) = self.lru_victim()?;
        let bytes = match key {
            Some(k) => {
                self.by_id.remove(&id);
                self.blobs.remove(k).bytes
            }
            None => self.cold.remove(&id).map_or(0, |c| c.bytes),
        };
        self.used -= bytes.min(self.used);
        if let Some(disk) = self.disk.as_mut() {
            disk.release(bytes);
        }
        let why = match cause {
            Cause::Size => "to stay under the cache limit",
            Cause::MinFree => "to keep --min-free free",
            Cause::NoSpace => "after a write ran out of space",
        };
        log::info!("evicting blob {id} ({bytes} bytes) {why}");
        self.evicted.push((id, bytes));
        let e = &mut self.evictions;
        match cause {
            Cause::Size => e.size += 1,
            Cause::MinFree => e.min_free += 1,
            Cause::NoSpace => e.no_space += 1,
        }
        Some(bytes)
    }

    /// The least recently used blob no one holds: its key if open, and id.
    fn lru_victim(&self) -> Option<(Option<BlobKey>, String)> {
        let open = self
            .blobs
            .iter()
            .filter(|(_, b)| b.refs == 0 && b.inflight.is_empty())
            .min_by_key(|(_, b)| b.last_used)
            .map(|(k, b)| (b.last_used, Some(k), b.blob.id()));
        let cold = self
            .cold
            .iter()
            .filter(|(_, c)| !c.opening)
            .min_by_key(|(_, c)| c.last_used)
            .map(|(id, c)| (c.last_used, None, id.as_str()));
        let victim = match (open, cold) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        victim.map(|(_, key, id)| (key, id.to_owned()))
    }
}
