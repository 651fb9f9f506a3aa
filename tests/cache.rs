//! Issue 3: the cache seen through the protocol — bytes read through the
//! passed fd, id validation, tokens and generations, coalescing, backend
//! failures, crashes, offline service, persistence, damaged maps, `cat`,
//! and clients that vanish with fetches in flight.
mod common;
use blobmgr::backend::{Backend, BackendError};
use blobmgr::cache::CacheConfig;
use blobmgr::protocol::{Reply, Request, BLOB_ID_FIELD};
use common::*;
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

const EINVAL: u32 = 22;
const ENOENT: u32 = 2;
const MIB: u64 = 1 << 20;

/// GetBlob that must succeed: (token, fd).
fn open(c: &mut Raw, generation: u32, id: &str) -> (u64, File) {
    match c.open(generation, id) {
        Ok(b) => (b.token, b.file),
        Err(result) => panic!("GetBlob {id}: result {result}"),
    }
}

/// Fetches `[start, start + count)` and checks the reply and the bytes.
fn fetch_and_check(c: &mut Raw, token: u64, fd: &File, data: &[u8], start: u64, count: u64) {
    let size = data.len() as u64;
    let want = count.min(size - start);
    assert_eq!(
        c.fetch(token, start, count),
        (want, 0),
        "FetchRange {start}+{count} of {size}"
    );
    let got = pread(fd, start, want);
    assert!(
        got[..] == data[start as usize..(start + want) as usize],
        "bytes {start}+{want} differ from the source"
    );
}

// ---------------------------------------------------------------------------
// Blob sizes, random ranges, whole-blob digests.

#[test]
fn blobs_of_many_sizes_read_back_exactly() {
    let d = Daemon::start(&[]);
    let sizes: [(&str, usize); 5] = [
        ("empty", 0),
        ("one", 1),
        ("page-plus-3", 4096 + 3),
        ("five-mib-plus-17", 5 * MIB as usize + 17),
        ("sixty-four-mib", 64 * MIB as usize),
    ];
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut c = d.raw();
    for (i, (id, size)) in sizes.iter().enumerate() {
        let data = pattern(*size, 100 + i as u64);
        d.add_blob(id, &data);
        let (token, fd) = open(&mut c, 1, id);
        let size = *size as u64;
        if size == 0 {
            assert_eq!(c.fetch(token, 0, 10), (0, 1), "start >= size on empty");
            assert_eq!(c.fetch(token, 0, 0).1, 1);
            continue;
        }
        for _ in 0..40 {
            let start = rng.below(size);
            let count = match rng.below(4) {
                0 => rng.below(4096) + 1,
                1 => rng.below(3 * MIB) + 1,
                2 => u64::MAX - rng.below(1000),
                _ => rng.below(size - start) + 1,
            };
            fetch_and_check(&mut c, token, &fd, &data, start, count);
        }
        assert_eq!(c.fetch(token, 0, size), (size, 0));
        let all = pread(&fd, 0, size);
        assert_eq!(sha256(&all), sha256(&data), "whole-blob digest of {id}");
    }
}

// ---------------------------------------------------------------------------
// Ids and fds.

#[test]
fn bad_ids_are_einval_without_fd_and_unknown_is_enoent() {
    let d = Daemon::start(&[]);
    d.add_blob("good", b"hello");
    let mut c = d.raw();
    for id in [
        "../x",
        "a/b",
        ".x",
        ".",
        "..",
        "",
        "a b",
        "x\ny",
        "/etc/passwd",
    ] {
        let (_, result, fd) = c.get_blob(1, id);
        assert_eq!(result, EINVAL, "id {id:?}");
        assert!(fd.is_none(), "id {id:?} got an fd");
    }
    // Fields built by hand: 256 non-NUL bytes, and bytes that are not UTF-8.
    let mut non_utf8 = [0u8; BLOB_ID_FIELD];
    non_utf8[..4].copy_from_slice(&[b'a', 0xff, 0xfe, b'b']);
    let mut all_255 = [0u8; BLOB_ID_FIELD];
    all_255[..255].fill(b'g');
    for (what, field) in [
        ("256 bytes without NUL", [b'a'; BLOB_ID_FIELD]),
        ("non-UTF-8", non_utf8),
    ] {
        let before = c.fds.len();
        match c.call(&Request::GetBlob {
            generation: 1,
            id: field,
        }) {
            Reply::GetBlob { result, token, .. } => {
                assert_eq!(result, EINVAL, "{what}");
                assert_eq!(token, 0, "{what}");
            }
            other => panic!("{what}: unexpected reply {other:?}"),
        }
        assert_eq!(c.fds.len(), before, "{what}: an fd came with the error");
    }
    // 255 valid bytes is a well-formed id: unknown, not invalid.
    match c.call(&Request::GetBlob {
        generation: 1,
        id: all_255,
    }) {
        Reply::GetBlob { result, .. } => assert_eq!(result, ENOENT),
        other => panic!("unexpected reply {other:?}"),
    }
    let (_, result, fd) = c.get_blob(1, "no-such-blob");
    assert_eq!(result, ENOENT);
    assert!(fd.is_none());
    assert!(c.fds.is_empty(), "stray fds received");
    // The connection survived all of it, and the good id works.
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    let (token, fd) = open(&mut c, 1, "good");
    fetch_and_check(&mut c, token, &fd, b"hello", 0, 5);
    // The fd is read-only.
    let err = fd
        .write_at(b"x", 0)
        .expect_err("write through the passed fd");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EBADF));
    assert_eq!(pread(&fd, 0, 5), b"hello");
}

// ---------------------------------------------------------------------------
// Tokens, generations, range edges.

#[test]
fn tokens_generations_and_range_edges() {
    let d = Daemon::start(&[]);
    let data = pattern(3 * MIB as usize + 5, 21);
    let size = data.len() as u64;
    d.add_blob("b", &data);
    let mut a = d.raw();
    let mut b = d.raw();
    let (ta1, fda) = open(&mut a, 7, "b");
    let (ta2, _) = open(&mut a, 7, "b");
    assert_eq!(ta1 >> 32, 7);
    assert_eq!(ta2 >> 32, 7);
    assert_ne!(ta1, ta2);
    let (tb1, _) = open(&mut b, 7, "b");
    assert_ne!(tb1, ta2);
    // A token this connection never got.
    assert_eq!(b.fetch(ta2, 0, 10), (0, 2), "token from another connection");
    // The same counter with another generation.
    let other_gen = (8u64 << 32) | (ta1 & 0xffff_ffff);
    assert_eq!(
        a.fetch(other_gen, 0, 10).1,
        2,
        "token of another generation"
    );
    assert_eq!(a.fetch(0, 0, 10).1, 2, "token 0");
    // Valid tokens work.
    fetch_and_check(&mut a, ta1, &fda, &data, 10, 100);
    fetch_and_check(&mut a, ta2, &fda, &data, 1000, 10);
    // Range edges.
    assert_eq!(a.fetch(ta1, size, 1), (0, 1), "start == size");
    assert_eq!(a.fetch(ta1, size + 4096, 1).1, 1, "start > size");
    assert_eq!(a.fetch(ta1, u64::MAX, u64::MAX).1, 1);
    assert_eq!(a.fetch(ta1, size - 10, u64::MAX), (10, 0), "clipped");
    assert_eq!(pread(&fda, size - 10, 10), data[data.len() - 10..]);
    assert_eq!(a.fetch(ta1, size - 1, 2), (1, 0));
    assert_eq!(a.fetch(ta1, 5, 0), (0, 0), "count 0");
    assert_eq!(
        a.fetch(ta1, 2 * MIB + 3, 0),
        (0, 0),
        "count 0, cold granule"
    );
    // A GetBlob with a new generation retires every older token.
    let (ta3, _) = open(&mut a, 9, "b");
    assert_eq!(ta3 >> 32, 9);
    assert_eq!(a.fetch(ta1, 0, 10).1, 2, "old generation after GetBlob");
    assert_eq!(a.fetch(ta2, 0, 10).1, 2, "old generation after GetBlob");
    fetch_and_check(&mut a, ta3, &fda, &data, 2 * MIB - 7, MIB);
    // Going back to generation 7 does not revive its tokens.
    let (ta4, _) = open(&mut a, 7, "b");
    assert_eq!(a.fetch(ta1, 0, 10).1, 2);
    assert_eq!(a.fetch(ta3, 0, 10).1, 2);
    fetch_and_check(&mut a, ta4, &fda, &data, 0, size);
    // b's token was untouched by a's generations.
    assert_eq!(b.fetch(tb1, 0, 10), (10, 0));
}

// ---------------------------------------------------------------------------
// An in-process server over an instrumented backend.

/// Blobs held in memory; counts and can fail reads, and can hold them.
struct MemBackend {
    blobs: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    /// Every read_into call: (id, offset, len).
    reads: Mutex<Vec<(String, u64, u64)>>,
    failing: AtomicBool,
    /// `read_into` waits while this is closed: fills stay in flight until
    /// the test has set up what it wants them to be in flight for.
    fills: Gate,
}

impl MemBackend {
    fn new() -> Arc<MemBackend> {
        Arc::new(MemBackend {
            blobs: Mutex::new(HashMap::new()),
            reads: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
            fills: Gate::new(true),
        })
    }

    fn add(&self, id: &str, data: Vec<u8>) {
        self.blobs
            .lock()
            .unwrap()
            .insert(id.to_string(), Arc::new(data));
    }

    /// Backend reads per granule of `id`.
    fn reads_per_granule(&self, id: &str, granule: u64, granules: u64) -> Vec<u32> {
        let mut n = vec![0u32; granules as usize];
        for (rid, off, len) in self.reads.lock().unwrap().iter() {
            if rid == id && *len > 0 {
                for g in off / granule..=(off + len - 1) / granule {
                    n[g as usize] += 1;
                }
            }
        }
        n
    }
}

impl Backend for MemBackend {
    fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
        match self.blobs.lock().unwrap().get(id) {
            Some(b) => Ok(b.len() as u64),
            None => Err(BackendError::NotFound),
        }
    }

    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        assert!(
            self.fills.wait_open(Duration::from_secs(60)),
            "fills held for 60 s"
        );
        self.reads
            .lock()
            .unwrap()
            .push((id.to_string(), offset, len));
        if self.failing.load(Ordering::SeqCst) {
            return Err(BackendError::Io(
                "injected".into(),
                io::Error::other("backend down"),
            ));
        }
        let data = self
            .blobs
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or(BackendError::NotFound)?;
        let (s, e) = (offset as usize, (offset + len) as usize);
        if e > data.len() {
            return Err(BackendError::ShortRead {
                expected: len,
                got: 0,
            });
        }
        dst.write_all_at(&data[s..e], offset)
            .map_err(|e| BackendError::Io("write cache".into(), e))
    }

    fn describe(&self) -> String {
        "memory (test)".into()
    }
}

/// The server in process over `be`, with 4 workers and the given granule
/// and fill job size. Held fills are let go before it stops.
fn in_process(be: &Arc<MemBackend>, granule: u64, max_job: u64) -> InProc {
    let release = be.clone();
    InProc::start(be.clone(), |cfg| {
        cfg.cache.granule = granule;
        cfg.cache.max_job = max_job;
        cfg.workers = 4;
    })
    .on_stop(move || release.fills.set(true))
}

#[test]
fn concurrent_cold_fetches_read_each_granule_once() {
    // (granule, max job, blob size): one granule per job, then jobs of
    // several granules.
    for (granule, max_job, size) in [
        (64 * 1024, 64 * 1024, 4 * MIB + 1234),
        (MIB, 4 * MIB, 16 * MIB - 3),
    ] {
        let be = MemBackend::new();
        let data = Arc::new(pattern(size as usize, granule ^ size));
        be.add("cold", data.to_vec());
        let server = in_process(&be, granule, max_job);
        // Fills are held until all 16 clients' fetches have been read, so
        // every one of them finds the granules it wants cold or in flight.
        be.fills.set(false);
        let barrier = Arc::new(Barrier::new(16));
        let all_read = Arc::new(Barrier::new(17));
        let threads: Vec<_> = (0..16u64)
            .map(|i| {
                let (sock, barrier, all_read, data) = (
                    server.sock.clone(),
                    barrier.clone(),
                    all_read.clone(),
                    data.clone(),
                );
                std::thread::spawn(move || {
                    let mut c = Raw::connect(&sock);
                    let (token, fd) = open(&mut c, 3, "cold");
                    // Overlapping, unaligned ranges; half of them the whole blob.
                    let (start, count) = if i % 2 == 0 {
                        (0, size)
                    } else {
                        (i * 4099, size - 2 * i * 4099)
                    };
                    barrier.wait();
                    let fetch = c.send(
                        &Request::FetchRange {
                            token,
                            start,
                            count,
                        },
                        true,
                    );
                    // The Noop's reply means the fetch before it was read.
                    let noop = c.send(&Request::Noop, true);
                    assert_eq!(c.recv().expect("Noop reply"), (noop, Reply::Noop));
                    all_read.wait();
                    let (t, r) = c.recv().expect("FetchRange reply");
                    assert_eq!(t, fetch);
                    let want = count.min(size - start);
                    assert_eq!(
                        r,
                        Reply::FetchRange {
                            token,
                            count: want,
                            result: 0
                        },
                        "FetchRange {start}+{count} of {size}"
                    );
                    assert!(
                        pread(&fd, start, want)[..]
                            == data[start as usize..(start + want) as usize],
                        "bytes {start}+{want} differ from the source"
                    );
                })
            })
            .collect();
        all_read.wait();
        be.fills.set(true);
        for t in threads {
            t.join().expect("client thread");
        }
        let granules = size.div_ceil(granule);
        let per = be.reads_per_granule("cold", granule, granules);
        for (g, n) in per.iter().enumerate() {
            assert_eq!(*n, 1, "granule {g} read {n} times (granule {granule})");
        }
        // A second round is served from the cache.
        let mut c = server.raw();
        let (token, fd) = open(&mut c, 1, "cold");
        fetch_and_check(&mut c, token, &fd, &data, 0, size);
        let calls = be.reads.lock().unwrap().len() as u64;
        let stats = server.stop();
        assert_eq!(stats.fills_started, calls, "one fill job per backend read");
        // No job is larger than the largest the planner makes for the
        // whole blob, however fast the backend.
        let cfg = CacheConfig {
            granule,
            max_job,
            ..CacheConfig::new("unused")
        };
        let job = cfg.job_granules(size, granule, u64::MAX);
        assert!(calls >= granules.div_ceil(job), "{calls} fills");
        assert!(stats.fetch_hits >= 1, "warm fetch was a hit: {stats:?}");
    }
}

#[test]
fn failing_backend_gives_result_1_then_retry_succeeds() {
    let be = MemBackend::new();
    let data = pattern(2 * MIB as usize + 100, 5);
    be.add("flaky", data.clone());
    let server = in_process(&be, 64 * 1024, 256 * 1024);
    let mut c = server.raw();
    let (token, fd) = open(&mut c, 1, "flaky");
    be.failing.store(true, Ordering::SeqCst);
    assert_eq!(c.fetch(token, 1000, 300_000).1, 1, "backend failure");
    assert_eq!(c.fetch(token, 0, 10).1, 1, "still failing");
    let failed_reads = be.reads.lock().unwrap().len();
    assert!(failed_reads >= 2);
    // Nothing was marked valid: healthy again, the same ranges are re-read.
    be.failing.store(false, Ordering::SeqCst);
    fetch_and_check(&mut c, token, &fd, &data, 1000, 300_000);
    fetch_and_check(&mut c, token, &fd, &data, 0, data.len() as u64);
    assert!(be.reads.lock().unwrap().len() > failed_reads);
    let stats = server.stop();
    assert!(stats.fills_failed >= 2, "{stats:?}");
}

#[test]
fn truncated_backend_file_fails_then_recovers() {
    let d = Daemon::start(&[]);
    let data = pattern(3 * MIB as usize + 77, 8);
    let path = d.add_blob("trunc", &data);
    let mut c = d.raw();
    let (token, fd) = open(&mut c, 1, "trunc");
    // Truncated behind the daemon's back: a short read.
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    assert_eq!(c.fetch(token, 2 * MIB + 5, 1000).1, 1, "short read");
    assert!(
        wait_until(Duration::from_secs(5), || d
            .log_text()
            .contains("short read")),
        "log: {}",
        d.log_text()
    );
    // Restored: the same range is fetched again, correctly.
    std::fs::write(&path, &data).unwrap();
    fetch_and_check(&mut c, token, &fd, &data, 2 * MIB + 5, 1000);
    fetch_and_check(&mut c, token, &fd, &data, 0, data.len() as u64);
}

// ---------------------------------------------------------------------------
// Crashes, restarts, offline service, persistence, damaged maps.

#[test]
fn kill9_during_fetches_then_restart_serves_whole_blob() {
    let mut d = Daemon::start(&["--granule", "262144"]);
    let size = 64 * MIB;
    let data = Arc::new(pattern(size as usize, 64));
    d.add_blob("big", &data);
    let progress = Arc::new(AtomicUsize::new(0));
    let chunk = 256 * 1024u64;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (sock, data, progress) = (d.sock.clone(), data.clone(), progress.clone());
            std::thread::spawn(move || {
                let mut c = Raw::connect(&sock);
                let Ok((token, 0, Some(fd))) = c.try_get_blob(1, "big") else {
                    return;
                };
                let fd = File::from(fd);
                let mut rng = Rng::new(0x1234_5678 + t);
                let chunks = size / chunk;
                for _ in 0..chunks {
                    let start = rng.below(chunks) * chunk + rng.below(1000);
                    let Ok((n, 0)) = c.try_fetch(token, start, chunk) else {
                        return;
                    };
                    // Whatever was reported valid before the crash is right.
                    let got = pread(&fd, start, n);
                    assert!(got[..] == data[start as usize..(start + n) as usize]);
                    progress.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(60), || progress
        .load(Ordering::SeqCst)
        >= 12));
    d.kill9();
    for t in threads {
        t.join().expect("client thread");
    }
    assert!(
        (progress.load(Ordering::SeqCst) as u64) < 4 * (size / chunk),
        "every fetch finished before the kill"
    );
    d.spawn();
    let mut c = d.raw();
    let (token, fd) = open(&mut c, 1, "big");
    assert_eq!(c.fetch(token, 0, size), (size, 0));
    assert_eq!(sha256(&pread(&fd, 0, size)), sha256(&data));
}

#[test]
fn cached_ranges_are_served_offline() {
    let mut d = Daemon::start(&[]);
    let data = pattern(4 * MIB as usize + 9, 31);
    let path = d.add_blob("gone", &data);
    {
        let mut c = d.raw();
        let (token, fd) = open(&mut c, 1, "gone");
        fetch_and_check(&mut c, token, &fd, &data, 100, MIB + 50);
    }
    assert!(d.stop_with(Signal::SIGTERM).success());
    std::fs::remove_file(&path).unwrap();
    d.spawn();
    let mut c = d.raw();
    let (token, fd) = open(&mut c, 1, "gone");
    fetch_and_check(&mut c, token, &fd, &data, 100, MIB + 50);
    fetch_and_check(&mut c, token, &fd, &data, 2000, 4000);
    assert_eq!(c.fetch(token, 3 * MIB, 100).1, 1, "uncached range offline");
    // A blob never cached is still unknown.
    assert_eq!(c.get_blob(1, "never").1, ENOENT);
}

/// Same-size different bytes, so a read tells which copy it came from.
fn other_bytes(data: &[u8]) -> Vec<u8> {
    data.iter().map(|b| !b).collect()
}

#[test]
fn cached_range_survives_restart_without_backend_reads() {
    let mut d = Daemon::start(&[]);
    let data = pattern(4 * MIB as usize + 1, 41);
    let path = d.add_blob("keep", &data);
    {
        let mut c = d.raw();
        let (token, fd) = open(&mut c, 1, "keep");
        fetch_and_check(&mut c, token, &fd, &data, 10, MIB);
    }
    assert!(d.stop_with(Signal::SIGTERM).success());
    let newer = other_bytes(&data);
    std::fs::write(&path, &newer).unwrap();
    d.spawn();
    let mut c = d.raw();
    let (token, fd) = open(&mut c, 1, "keep");
    // Granules 0 and 1 were cached: still the original bytes.
    assert_eq!(c.fetch(token, 10, MIB), (MIB, 0));
    assert!(pread(&fd, 10, MIB)[..] == data[10..10 + MIB as usize]);
    assert!(pread(&fd, 0, 2 * MIB)[..] == data[..2 * MIB as usize]);
    // An uncached granule comes from the backend as it is now.
    assert_eq!(c.fetch(token, 3 * MIB, 100), (100, 0));
    assert!(pread(&fd, 3 * MIB, 100)[..] == newer[3 * MIB as usize..3 * MIB as usize + 100]);
}

fn damaged_map_is_never_trusted(damage: impl Fn(&Path)) {
    let mut d = Daemon::start(&[]);
    let data = pattern(3 * MIB as usize + 333, 51);
    let path = d.add_blob("m", &data);
    {
        let mut c = d.raw();
        let (token, fd) = open(&mut c, 1, "m");
        fetch_and_check(&mut c, token, &fd, &data, 0, 2 * MIB);
    }
    assert!(d.stop_with(Signal::SIGTERM).success());
    let map = d.workdir.join("map").join("m");
    assert!(map.exists(), "no map at {}", map.display());
    damage(&map);
    // New backend bytes: whatever is served must be re-fetched.
    let newer = other_bytes(&data);
    std::fs::write(&path, &newer).unwrap();
    let log_before = d.log_text().len();
    d.spawn();
    let mut c = d.raw();
    let (token, fd) = open(&mut c, 1, "m");
    fetch_and_check(&mut c, token, &fd, &newer, 0, newer.len() as u64);
    // The warning may be written after the reply (by a worker): wait for it.
    let since_restart = || d.log_text()[log_before..].to_string();
    assert!(
        wait_until(Duration::from_secs(10), || since_restart().lines().any(
            |l| l.contains("WARN") && l.contains("map") && l.contains("/m")
        )),
        "no warn line about the map:\n{}",
        since_restart()
    );
}

#[test]
fn corrupt_map_bytes_are_detected_and_refetched() {
    damaged_map_is_never_trusted(|map| {
        let mut b = std::fs::read(map).unwrap();
        assert!(b.len() >= 60, "map of {} bytes", b.len());
        // Claim every granule ready, and flip a header byte too.
        let n = b.len();
        b[48..n - 4].fill(0xff);
        b[20] ^= 0x40;
        std::fs::write(map, &b).unwrap();
    });
}

#[test]
fn flipped_map_bit_is_detected_and_refetched() {
    damaged_map_is_never_trusted(|map| {
        let mut b = std::fs::read(map).unwrap();
        // One more granule "ready" than was fetched.
        b[48] ^= 0x04;
        std::fs::write(map, &b).unwrap();
    });
}

#[test]
fn truncated_map_is_detected_and_refetched() {
    damaged_map_is_never_trusted(|map| {
        let len = std::fs::metadata(map).unwrap().len();
        File::options()
            .write(true)
            .open(map)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
    });
}

// ---------------------------------------------------------------------------
// `blobmgr cat`.

fn cat(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("cat")
        .arg("--sock")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run blobmgr cat")
}

#[test]
fn cat_writes_the_blob_to_stdout() {
    let d = Daemon::start(&[]);
    let data = pattern(5 * MIB as usize + 17, 61);
    d.add_blob("catme", &data);
    let out = cat(&d.sock, &["catme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data);
    let out = cat(
        &d.sock,
        &["catme", "--offset", "12345", "--length", "3000000"],
    );
    assert!(out.status.success());
    assert!(out.stdout[..] == data[12345..12345 + 3_000_000]);
    // --length past the end stops at the end; --offset alone reads to it.
    let tail = data.len() - 100;
    let off = tail.to_string();
    let out = cat(&d.sock, &["catme", "--offset", &off, "--length", "1000"]);
    assert!(out.status.success());
    assert!(out.stdout[..] == data[tail..]);
    let out = cat(&d.sock, &["catme", "--offset", &off]);
    assert!(out.status.success());
    assert!(out.stdout[..] == data[tail..]);
}

#[test]
fn cat_of_unknown_blob_fails_with_one_line() {
    let d = Daemon::start(&[]);
    let out = cat(&d.sock, &["no-such-blob"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "stderr: {err:?}");
}

// ---------------------------------------------------------------------------
// Clients that disconnect with fetches in flight.

#[test]
fn disconnect_with_fetches_in_flight_leaves_others_served() {
    let d = Daemon::start(&["--granule", "262144"]);
    let size = 24 * MIB;
    let blobs: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("dc{i}"), pattern(size as usize, 70 + i)))
        .collect();
    let mut keeper = d.raw();
    for (id, data) in &blobs {
        d.add_blob(id, data);
        open(&mut keeper, 1, id);
    }
    let baseline = d.fd_count();
    for (id, data) in &blobs {
        let mut a = d.raw();
        let (ta, _fda) = open(&mut a, 1, id);
        a.send(
            &Request::FetchRange {
                token: ta,
                start: 0,
                count: size,
            },
            true,
        );
        // A prefetch hint and more cold ranges, then a Noop: its reply means
        // every request before it was read.
        a.send(
            &Request::FetchRange {
                token: ta,
                start: MIB,
                count: 5 * MIB,
            },
            false,
        );
        a.send(
            &Request::FetchRange {
                token: ta,
                start: 7 * MIB + 3,
                count: MIB,
            },
            true,
        );
        let noop = a.send(&Request::Noop, true);
        loop {
            let (t, _) = a.recv().expect("reply to a");
            if t == noop {
                break;
            }
        }
        let mut waiters: Vec<(Raw, u64, File)> = (0..2)
            .map(|_| {
                let mut c = d.raw();
                let (t, fd) = open(&mut c, 1, id);
                c.send(
                    &Request::FetchRange {
                        token: t,
                        start: 0,
                        count: size,
                    },
                    true,
                );
                (c, t, fd)
            })
            .collect();
        drop(a);
        for (c, t, fd) in waiters.iter_mut() {
            let (_, r) = c.recv().expect("reply after the other client left");
            assert_eq!(
                r,
                Reply::FetchRange {
                    token: *t,
                    count: size,
                    result: 0
                }
            );
            assert_eq!(sha256(&pread(fd, 0, size)), sha256(data));
        }
        assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);
    }
    assert_eq!(keeper.call(&Request::Noop), Reply::Noop);
    assert!(
        wait_until(Duration::from_secs(10), || d.fd_count() == baseline),
        "daemon fds {} != baseline {baseline}",
        d.fd_count()
    );
}

#[test]
fn disconnect_while_its_fill_is_slow_in_process() {
    // The backend holds the fills until the owner has left: they are in
    // flight when it goes, with another client waiting on them.
    let be = MemBackend::new();
    let data = pattern(2 * MIB as usize, 81);
    be.add("slow", data.clone());
    let server = in_process(&be, 64 * 1024, 64 * 1024);
    let size = data.len() as u64;
    let mut a = server.raw();
    let (ta, _) = open(&mut a, 1, "slow");
    let mut b = server.raw();
    let (tb, fdb) = open(&mut b, 1, "slow");
    be.fills.set(false);
    a.send(
        &Request::FetchRange {
            token: ta,
            start: 0,
            count: size,
        },
        true,
    );
    let noop = a.send(&Request::Noop, true);
    let (t, r) = a.recv().unwrap();
    assert_eq!((t, r), (noop, Reply::Noop), "Noop overtakes the cold fetch");
    let btag = b.send(
        &Request::FetchRange {
            token: tb,
            start: 100,
            count: size - 200,
        },
        true,
    );
    // b's fetch has been read (it waits on a's fills) once its Noop is back.
    let bnoop = b.send(&Request::Noop, true);
    assert_eq!(b.recv().unwrap(), (bnoop, Reply::Noop));
    drop(a);
    be.fills.set(true);
    let (t, r) = b.recv().unwrap();
    assert_eq!(t, btag);
    assert_eq!(
        r,
        Reply::FetchRange {
            token: tb,
            count: size - 200,
            result: 0
        }
    );
    assert!(pread(&fdb, 100, size - 200)[..] == data[100..data.len() - 100]);
    assert_eq!(b.call(&Request::Noop), Reply::Noop);
    let per = be.reads_per_granule("slow", 64 * 1024, size / (64 * 1024));
    assert!(per.iter().all(|&n| n == 1), "{per:?}");
    drop(b);
    let stats = server.stop();
    assert_eq!(stats.accepted, 2);
}

/// Holds the first `blob_size` call until its gate opens (an open stalled
/// in the backend after it found no map); counts the calls.
struct StallFirstSize {
    data: Vec<u8>,
    sizes: AtomicUsize,
    first: Gate,
}

impl Backend for StallFirstSize {
    fn blob_size(&self, _id: &str) -> Result<u64, BackendError> {
        if self.sizes.fetch_add(1, Ordering::SeqCst) == 0 {
            assert!(self.first.wait_open(Duration::from_secs(60)), "held 60 s");
        }
        Ok(self.data.len() as u64)
    }

    fn read_into(&self, _id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        let (s, e) = (offset as usize, (offset + len) as usize);
        dst.write_all_at(&self.data[s..e], offset)
            .map_err(|e| BackendError::Io("write cache".into(), e))
    }

    fn describe(&self) -> String {
        "stall-first-size (test)".into()
    }
}

/// Review finding: an open abandoned at --backend-timeout let the next
/// GetBlob start a second open; when the first resumed after the second
/// had been served and filled, it sized the data file to 0 and back, and
/// granules reported valid read as zeros. Now the id stays exclusive until
/// the stuck open returns: GetBlob answers EIO meanwhile, never a second
/// open, and afterwards every byte served is the blob's.
#[test]
fn a_late_open_never_wipes_a_blob_served_meanwhile() {
    let data = pattern(4 * MIB as usize, 91);
    let be = Arc::new(StallFirstSize {
        data: data.clone(),
        sizes: AtomicUsize::new(0),
        first: Gate::new(false),
    });
    let release = be.clone();
    let server = InProc::start(be.clone(), |cfg| {
        cfg.cache.granule = 64 * 1024;
        cfg.backend_timeout = Duration::from_millis(300);
    })
    .on_stop(move || release.first.set(true));
    let mut c = server.raw();
    // The first open hangs in blob_size past the timeout: EIO.
    assert_eq!(c.open(1, "b").err(), Some(5));
    // Meanwhile: EIO at once, and no second open asks the backend.
    assert_eq!(c.open(1, "b").err(), Some(5));
    assert_eq!(be.sizes.load(Ordering::SeqCst), 1, "a second open ran");
    // The stuck open returns; the blob is then served, every byte right.
    be.first.set(true);
    let mut opened = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            opened = c.open(1, "b").ok();
            opened.is_some()
        }),
        "the blob is served once the late open returned"
    );
    let b = opened.unwrap();
    c.fetch_check(&b, &data, 0, data.len() as u64);
    assert_eq!(be.sizes.load(Ordering::SeqCst), 1);
}
