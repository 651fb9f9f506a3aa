//! How an endpoint answers Range requests for a blob, learnt from the first
//! request and shared by the requests that follow. A registry answers with
//! 206 and the range; a cold pull-through mirror answers with 200 and the
//! whole blob. The first GET of a digest goes alone (the *probe*); the
//! others wait for its status line. On 206 they go ahead in parallel; on 200
//! they wait for the probe to write the whole blob into the same cache file
//! and report it written, so the blob crosses the wire once, not once per
//! range.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A cache file's identity (device, inode): a whole blob written into one
/// file says nothing about another.
pub(super) type FileId = (u64, u64);

pub(super) fn file_id(f: &File) -> FileId {
    f.metadata().map_or((0, 0), |m| (m.dev(), m.ino()))
}

enum Mode {
    Probing,
    Ranged,
    WholeRunning,
    /// The whole blob is in file `FileId` (`u64` bytes) since `Instant`.
    WholeDone(FileId, u64, Instant),
}

/// How long a whole download answers for its file: long enough for the
/// requests that waited on it, short enough that a file reusing the inode
/// (the blob evicted and opened again) probes anew.
const WHOLE_FRESH: Duration = Duration::from_secs(30);

/// What a request should do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Turn {
    /// Send the first GET of this digest; report with [`RangeModes::ranged`],
    /// [`RangeModes::whole_started`] and [`RangeModes::whole_done`], or
    /// [`RangeModes::failed`].
    Probe,
    /// Send a ranged GET.
    Ranged,
    /// The whole blob (this many bytes) is already in this file.
    Whole(u64),
}

/// Digests that have more entries than this are forgotten (the map only
/// saves a probe).
const MAX_ENTRIES: usize = 4096;

#[derive(Default)]
pub(super) struct RangeModes {
    map: Mutex<HashMap<String, Mode>>,
    changed: Condvar,
}

impl RangeModes {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Mode>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides the turn of a request for `digest` into `file`, waiting (at
    /// most `patience`) while a probe or a whole download is under way.
    pub fn enter(&self, digest: &str, file: FileId, patience: Duration) -> Turn {
        let until = Instant::now() + patience;
        let mut map = self.lock();
        loop {
            match map.get(digest) {
                Some(Mode::Ranged) => return Turn::Ranged,
                Some(Mode::WholeDone(f, size, at)) if *f == file && at.elapsed() < WHOLE_FRESH => {
                    return Turn::Whole(*size)
                }
                Some(Mode::Probing | Mode::WholeRunning) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Turn::Ranged;
                    }
                    map = self
                        .changed
                        .wait_timeout(map, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                // Unknown, or whole into another file (an evicted blob
                // opened again): probe.
                _ => {
                    if map.len() >= MAX_ENTRIES {
                        map.clear();
                    }
                    map.insert(digest.to_owned(), Mode::Probing);
                    return Turn::Probe;
                }
            }
        }
    }

    fn set(&self, digest: &str, mode: Option<Mode>) {
        let mut map = self.lock();
        match mode {
            Some(m) => map.insert(digest.to_owned(), m),
            None => map.remove(digest),
        };
        self.changed.notify_all();
    }

    /// The probe got 206: everyone may send ranged GETs.
    pub fn ranged(&self, digest: &str) {
        self.set(digest, Some(Mode::Ranged));
    }

    /// The probe got 200 and is writing the whole blob (a request that was
    /// not the probe changes nothing).
    pub fn whole_started(&self, digest: &str) {
        let mut map = self.lock();
        if let Some(m @ Mode::Probing) = map.get_mut(digest) {
            *m = Mode::WholeRunning;
            self.changed.notify_all();
        }
    }

    /// The probe wrote the whole blob (`size` bytes) into `file`.
    pub fn whole_done(&self, digest: &str, file: FileId, size: u64) {
        self.set(digest, Some(Mode::WholeDone(file, size, Instant::now())));
    }

    /// The probe failed, or what it wrote did not verify: the next request
    /// probes again.
    pub fn failed(&self, digest: &str) {
        self.set(digest, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn one_probe_then_everyone_follows_its_answer() {
        let m = Arc::new(RangeModes::default());
        let long = Duration::from_secs(10);
        assert_eq!(m.enter("d", (1, 1), long), Turn::Probe);
        let m2 = m.clone();
        let waiter = std::thread::spawn(move || m2.enter("d", (1, 1), Duration::from_secs(10)));
        m.whole_started("d");
        m.whole_done("d", (1, 1), 99);
        assert_eq!(waiter.join().unwrap(), Turn::Whole(99));
        // Another file (the blob reopened) probes again.
        assert_eq!(m.enter("d", (1, 2), long), Turn::Probe);
        m.ranged("d");
        assert_eq!(m.enter("d", (1, 2), long), Turn::Ranged);
        // A failed probe leaves nothing behind.
        assert_eq!(m.enter("e", (1, 1), long), Turn::Probe);
        m.failed("e");
        assert_eq!(m.enter("e", (1, 1), long), Turn::Probe);
        // Patience runs out: go ahead with a range.
        assert_eq!(m.enter("e", (1, 1), Duration::ZERO), Turn::Ranged);
    }
}
