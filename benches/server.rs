//! End to end through a real Unix socket against an in-process `Server`
//! (its reactor on a thread, stopped through an eventfd): a Noop round trip,
//! 16 pipelined Noops, a FetchRange cache hit; and a cold fill per MiB from
//! the localfs backend at the cache layer.

use blobmgr::backend::LocalFs;
use blobmgr::cache::{Blob, CacheConfig};
use blobmgr::protocol::{self, Reply, Request, HEADER_SIZE};
use blobmgr::{Server, ServerConfig};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct InProcess {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    sock: std::path::PathBuf,
}

impl InProcess {
    fn start(dir: &Path) -> InProcess {
        let sock = dir.join("s.sock");
        let backend = dir.join("be");
        std::fs::create_dir_all(&backend).unwrap();
        let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap());
        let cfg = ServerConfig::new(&sock, dir.join("work"));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut server = Server::new(cfg, Arc::new(LocalFs::new(backend))).unwrap();
            server.run(Some(s2.as_fd())).unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        InProcess {
            stop,
            thread: Some(thread),
            sock,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.write(1).unwrap();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Sends `wire` and reads `n` replies of `reply_len` bytes each.
fn round_trip(s: &mut UnixStream, wire: &[u8], buf: &mut [u8]) {
    s.write_all(wire).unwrap();
    s.read_exact(buf).unwrap();
}

fn get_blob(s: &mut UnixStream, id: &str) -> (u64, OwnedFd) {
    let mut wire = Vec::new();
    protocol::encode_request(&mut wire, 1, true, &Request::get_blob(1, id).unwrap());
    s.write_all(&wire).unwrap();
    let mut buf = [0u8; 40];
    let mut have = 0;
    let mut fd = None;
    while have < buf.len() {
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf[have..])];
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        assert!(msg.bytes > 0);
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: just received, owned by nobody else.
                fd = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
        have += msg.bytes;
    }
    match protocol::decode_reply(&buf).unwrap() {
        Some((
            1,
            Reply::GetBlob {
                token, result: 0, ..
            },
            _,
        )) => (token, fd.unwrap()),
        other => panic!("GetBlob: {other:?}"),
    }
}

fn socket(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(dir.path());
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i * 7) as u8).collect();
    std::fs::write(dir.path().join("be").join("hot"), &data).unwrap();
    let mut s = UnixStream::connect(&server.sock).unwrap();

    let mut g = c.benchmark_group("socket");
    g.throughput(Throughput::Elements(1));
    let mut noop = Vec::new();
    protocol::encode_request(&mut noop, 1, true, &Request::Noop);
    let mut reply = [0u8; HEADER_SIZE];
    g.bench_function("noop_round_trip", |b| {
        b.iter(|| round_trip(&mut s, &noop, &mut reply))
    });

    g.throughput(Throughput::Elements(16));
    let mut noops = Vec::new();
    for t in 1..=16 {
        protocol::encode_request(&mut noops, t, true, &Request::Noop);
    }
    let mut replies = [0u8; 16 * HEADER_SIZE];
    g.bench_function("noop_pipelined_16", |b| {
        b.iter(|| round_trip(&mut s, &noops, &mut replies))
    });

    let (token, _fd) = get_blob(&mut s, "hot");
    let mut warm = Vec::new();
    let whole = Request::FetchRange {
        token,
        start: 0,
        count: u64::MAX,
    };
    protocol::encode_request(&mut warm, 2, true, &whole);
    let mut r = [0u8; 40];
    round_trip(&mut s, &warm, &mut r);
    assert!(matches!(
        protocol::decode_reply(&r).unwrap(),
        Some((2, Reply::FetchRange { result: 0, .. }, _))
    ));
    g.throughput(Throughput::Elements(1));
    let mut hit = Vec::new();
    let range = Request::FetchRange {
        token,
        start: 5 << 20,
        count: 4096,
    };
    protocol::encode_request(&mut hit, 3, true, &range);
    g.bench_function("fetch_range_hit_round_trip", |b| {
        b.iter(|| round_trip(&mut s, &hit, &mut r))
    });
    g.finish();
    drop(s);
    drop(server);
}

/// Filling one 1 MiB granule of a cold blob from the localfs backend
/// (copy_file_range into the cache file, readiness map update; the last
/// granule of each 64 MiB blob also pays the completion checkpoint, fsync
/// included). Blobs are recreated between batches, outside the timing.
fn cold_fill(c: &mut Criterion) {
    const GRANULE: u64 = 1 << 20;
    const GRANULES: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let be_dir = dir.path().join("be");
    std::fs::create_dir_all(&be_dir).unwrap();
    let data: Vec<u8> = (0..(GRANULE * GRANULES) as u32)
        .map(|i| (i * 13) as u8)
        .collect();
    std::fs::write(be_dir.join("cold"), &data).unwrap();
    let backend = LocalFs::new(&be_dir);
    let mut cfg = CacheConfig::new(dir.path().join("work"));
    cfg.granule = GRANULE;
    cfg.prepare().unwrap();
    let fresh = |cfg: &CacheConfig| {
        for sub in ["data", "map"] {
            let _ = std::fs::remove_file(cfg.workdir.join(sub).join("cold"));
        }
        Blob::open(cfg, &backend, "cold").unwrap()
    };
    let mut blob = fresh(&cfg);
    let mut next = 0u64;
    let mut g = c.benchmark_group("cold_fill");
    g.throughput(Throughput::Bytes(GRANULE));
    g.sample_size(20);
    g.bench_function("localfs_per_MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == GRANULES {
                    blob = fresh(&cfg);
                    next = 0;
                }
                let t = Instant::now();
                blob.fill(&backend, next, 1).unwrap();
                total += t.elapsed();
                next += 1;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, socket, cold_fill);
criterion_main!(benches);
