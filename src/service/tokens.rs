//! The tokens of one connection's current generation and the blobs they
//! hold. Every change of the index's reference counts goes through here, and
//! so does the choice of the token to retire when a connection holds too
//! many.

use crate::cache::readahead::Readahead;
use crate::cache::{BlobKey, Index};
use crate::metrics::Counter;
use crate::source::Source;
use std::collections::HashMap;

/// A token's blob and when it was last used (a per-connection clock).
struct Held {
    key: BlobKey,
    used: u64,
    /// Where fills started through this token come from.
    source: Source,
    /// How the blob is read through this token (each reader its own
    /// stream, the way the kernel keeps readahead per open file).
    readahead: Readahead,
}

/// See the module docs.
#[derive(Default)]
pub(super) struct Tokens {
    held: HashMap<u32, Held>,
    clock: u64,
}

impl Tokens {
    /// The blob and source of token `n`, noting the use.
    pub fn touch(&mut self, n: u32) -> Option<(BlobKey, Source)> {
        self.clock += 1;
        let h = self.held.get_mut(&n)?;
        h.used = self.clock;
        Some((h.key, h.source.clone()))
    }

    /// The readahead state of token `n`.
    pub fn readahead(&mut self, n: u32) -> Option<&mut Readahead> {
        self.held.get_mut(&n).map(|h| &mut h.readahead)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Records token `n` for `key`, holding the blob.
    pub fn add(&mut self, n: u32, key: BlobKey, source: Source, index: &mut Index, open: &Counter) {
        index.acquire(key);
        self.clock += 1;
        let used = self.clock;
        let readahead = Readahead::default();
        let held = Held {
            key,
            used,
            source,
            readahead,
        };
        match self.held.insert(n, held) {
            Some(old) => index.release(old.key),
            None => open.add(1),
        }
    }

    /// Drops the least recently used token (one scan; this happens only
    /// past the per-connection limit).
    pub fn retire_lru(&mut self, index: &mut Index, open: &Counter) {
        let Some(n) = self
            .held
            .iter()
            .min_by_key(|(_, h)| h.used)
            .map(|(n, _)| *n)
        else {
            return;
        };
        if let Some(h) = self.held.remove(&n) {
            index.release(h.key);
            open.set(open.get().saturating_sub(1));
        }
    }

    /// Drops every token.
    pub fn clear(&mut self, index: &mut Index, open: &Counter) {
        open.set(open.get().saturating_sub(self.held.len() as u64));
        for (_, h) in self.held.drain() {
            index.release(h.key);
        }
    }
}
