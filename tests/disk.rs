//! The disk never fills: a daemon whose work dir is a small tmpfs keeps
//! `--min-free` free by evicting, refuses what cannot fit, and keeps
//! serving everything else with the right bytes; a fill takes its space
//! before it fetches.
mod common;
use blobmgr::backend::{Backend, BackendError};
use blobmgr::cache::{Blob, CacheConfig};
use blobmgr::protocol::{Reply, Request};
use common::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const MIB: usize = 1 << 20;

#[test]
fn a_small_disk_keeps_its_watermark_and_serves_what_fits() {
    require_root("mounting a tmpfs");
    let fs = Tmpfs::mount("64m").expect("mount a 64 MiB tmpfs");
    let min_free = 16 * MIB as u64;
    let mut d = Daemon::prepare(&["--min-free", "16M"]);
    d.workdir = fs.path().join("work");
    d.spawn();
    let smalls: Vec<Vec<u8>> = (0..8).map(|i| pattern(8 * MIB, 100 + i)).collect();
    for (i, data) in smalls.iter().enumerate() {
        d.add_blob(&format!("small{i}"), data);
    }
    let big = pattern(100 * MIB, 7);
    d.add_blob("big", &big);
    let mut c = d.raw();
    for round in 0..2u32 {
        for (i, data) in smalls.iter().enumerate() {
            // A new generation per blob: the client holds one token at a
            // time, so every other blob may be evicted.
            let generation = round * 100 + i as u32 + 1;
            let b = c
                .open(generation, &format!("small{i}"))
                .expect("GetBlob small");
            let len = data.len() as u64;
            assert_eq!(c.fetch(b.token, 0, len), (len, 0), "small{i} round {round}");
            assert!(b.read(0, len) == *data, "small{i}: wrong bytes");
            let settled = wait_until(Duration::from_secs(10), || {
                free_bytes(fs.path()) >= min_free
            });
            assert!(
                settled,
                "free {} below the watermark {min_free} after small{i}\n{}",
                free_bytes(fs.path()),
                d.log_text()
            );
            if i % 3 == 2 {
                // Interleaved: a blob that can never fit fails, nothing else.
                let bb = c.open(generation + 50, "big").expect("GetBlob big");
                let (_, r) = c.fetch(bb.token, 0, big.len() as u64);
                assert_eq!(r, 1, "100 MiB cannot fit on a 64 MiB disk");
                assert_eq!(c.call(&Request::Noop), Reply::Noop);
            }
        }
    }
    assert!(
        d.log_text().contains("to keep --min-free free"),
        "evictions for the watermark are logged:\n{}",
        d.log_text()
    );
    // A second client is answered the whole time.
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);
}

/// A backend of one blob of patterned bytes that counts its reads.
struct Counting {
    data: Vec<u8>,
    reads: AtomicUsize,
}

impl Backend for Counting {
    fn blob_size(&self, _id: &str) -> Result<u64, BackendError> {
        Ok(self.data.len() as u64)
    }

    fn read_into(&self, _id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let range = offset as usize..(offset + len) as usize;
        dst.write_all_at(&self.data[range], offset)
            .map_err(|e| BackendError::Io(format!("write cache at {offset}"), e))
    }

    fn describe(&self) -> String {
        "counting (test)".into()
    }
}

/// A fill takes its disk space before it asks the backend for a byte: on
/// a file system too full for it, it fails as out of space (the cache then
/// evicts and retries) without having fetched anything.
#[test]
fn a_fill_that_cannot_fit_fails_before_fetching_anything() {
    require_root("mounting a tmpfs");
    let fs = Tmpfs::mount("4m").expect("mount a 4 MiB tmpfs");
    let cfg = CacheConfig {
        granule: MIB as u64,
        ..CacheConfig::new(fs.path().join("work"))
    };
    cfg.prepare().expect("cache dirs");
    let be = Counting {
        data: pattern(16 * MIB, 9),
        reads: AtomicUsize::new(0),
    };
    let blob = Blob::open(&cfg, &be, "b").expect("open");
    let err = blob.fill(&be, 0, 8).expect_err("8 MiB cannot fit in 4 MiB");
    assert!(err.is_no_space(), "not an out-of-space failure: {err}");
    assert_eq!(be.reads.load(Ordering::SeqCst), 0, "fetched before failing");
    assert_eq!(blob.ready_count(), 0);
    // What fits is filled, with its bytes, in the space the failed
    // reservation gave back.
    let complete = blob.fill(&be, 0, 2).expect("2 MiB fits");
    assert!(!complete, "2 of 16 granules make no complete blob");
    assert_eq!(be.reads.load(Ordering::SeqCst), 1);
    let fd = File::from(blob.client_fd().try_clone().expect("dup"));
    assert!(pread(&fd, 0, 2 * MIB as u64) == be.data[..2 * MIB]);
}
