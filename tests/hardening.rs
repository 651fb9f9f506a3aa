//! Hardening: hostile or broken peers, exhausted resources and failing
//! backends. Most tests run the real binary (common::Daemon); the backend
//! fault tests run the server in-process with a test `Backend`.
//!
//! Tests that need root (another uid, tmpfs mounts) print why they skip when
//! not run as root; CI runs as root.

mod common;

use blobmgr::backend::{Backend, BackendError};
use blobmgr::protocol::{self, Reply, Request};
use blobmgr::ServerConfig;
use common::*;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---------------------------------------------------------------------------
// Peer credentials and socket permissions
// ---------------------------------------------------------------------------

/// A copy of the binary that an unprivileged user may execute.
fn world_executable_bin() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o755);
    let p = dir.path().join("blobmgr");
    std::fs::copy(bin(), &p).expect("copy binary");
    chmod(&p, 0o755);
    (dir, p)
}

/// Runs `blobmgr ping --sock SOCK` as nobody:nogroup; returns (pid, success,
/// stdout, stderr).
fn ping_as_nobody(blobmgr: &Path, sock: &Path) -> (u32, bool, String, String) {
    let child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(blobmgr)
        .arg("ping")
        .arg("--sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn setpriv");
    // setpriv execs the client: this pid is the one the daemon sees.
    let pid = child.id();
    let out = child.wait_with_output().expect("wait setpriv");
    (
        pid,
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn connection_from_another_uid_is_refused() {
    require_root("running a client as nobody");
    let (_bindir, blobmgr) = world_executable_bin();

    // The kernel lets nobody connect (dir traversable, socket 0666): only the
    // daemon's peer-uid check stands in the way.
    let d = Daemon::start(&["--sock-mode", "0666"]);
    chmod(d.dir.as_ref().unwrap().path(), 0o711);
    assert_eq!(mode_of(&d.sock), 0o666);
    let (pid, ok, out, err) = ping_as_nobody(&blobmgr, &d.sock);
    assert!(
        !ok,
        "ping as nobody succeeded against a daemon that does not allow uid 65534: {out}"
    );
    assert!(!err.trim().is_empty(), "failure without a message");
    let needle = format!("refused connection from pid {pid} uid 65534");
    assert!(
        d.wait_log(&needle, Duration::from_secs(10)),
        "daemon log does not name the refused peer ({needle:?}):\n{}\nclient stderr: {err}",
        d.log_text()
    );
    // Root (the daemon's own uid) is still served.
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);

    // Allowed explicitly: the same client succeeds.
    let d2 = Daemon::start(&["--sock-mode", "0666", "--allow-uid", "65534"]);
    chmod(d2.dir.as_ref().unwrap().path(), 0o711);
    let (pid2, ok2, out2, err2) = ping_as_nobody(&blobmgr, &d2.sock);
    assert!(
        ok2,
        "ping as nobody failed with --allow-uid 65534: {err2}\n{}",
        d2.log_text()
    );
    assert!(out2.starts_with("ok"), "unexpected ping output {out2:?}");
    assert!(
        !d2.log_text()
            .contains(&format!("refused connection from pid {pid2}")),
        "allowed peer was refused"
    );
}

#[test]
fn socket_mode_is_0600_under_a_permissive_umask() {
    let mut d = Daemon::prepare(&[]);
    d.spawn_with_umask(0o000);
    // The umask did apply: directories the daemon created are 0777.
    assert_eq!(
        mode_of(&d.workdir),
        0o777,
        "test setup: the daemon did not run under umask 000"
    );
    assert_eq!(mode_of(&d.sock), 0o600, "default socket mode");
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);

    let mut d2 = Daemon::prepare(&["--sock-mode", "0660"]);
    d2.spawn_with_umask(0o000);
    assert_eq!(mode_of(&d2.sock), 0o660, "--sock-mode 0660");
    assert_eq!(d2.raw().call(&Request::Noop), Reply::Noop);

    // A restrictive umask does not take bits away from --sock-mode either.
    let mut d3 = Daemon::prepare(&["--sock-mode", "0666"]);
    d3.spawn_with_umask(0o077);
    assert_eq!(mode_of(&d3.sock), 0o666, "--sock-mode 0666 under umask 077");
}

// ---------------------------------------------------------------------------
// Connection limits and backpressure
// ---------------------------------------------------------------------------

#[test]
fn max_conns_refuses_the_extra_connection_and_admits_after_a_close() {
    const N: usize = 8;
    let d = Daemon::start(&["--max-conns", "8"]);
    // Open N connections; each answered Noop proves it was admitted. The
    // readiness probe of Daemon::start (connect and close) holds a slot
    // until the daemon has seen its EOF, so retry until all N fit: a slot
    // that is never given back makes this fail.
    let mut conns: Vec<Raw> = Vec::new();
    let all_in = wait_until(Duration::from_secs(10), || {
        conns.clear();
        for _ in 0..N {
            let Ok(mut c) = Raw::try_connect(&d.sock) else {
                return false;
            };
            if c.try_call(&Request::Noop).ok() != Some(Reply::Noop) {
                return false;
            }
            conns.push(c);
        }
        true
    });
    assert!(all_in, "{N} connections not admitted with --max-conns {N}");
    let refusals = || d.log_text().matches("(--max-conns)").count();
    let before = refusals();
    let mut extra = d.raw();
    assert!(
        extra.is_closed(Duration::from_secs(10)),
        "connection {} of --max-conns {N} was not closed",
        N + 1
    );
    assert!(
        wait_until(Duration::from_secs(5), || refusals() == before + 1),
        "no log line for the refusal:\n{}",
        d.log_text()
    );
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(
            c.call(&Request::Noop),
            Reply::Noop,
            "admitted connection {i}"
        );
    }
    // Close one: a new connection is admitted once the daemon saw the close.
    drop(conns.remove(0));
    let mut admitted = None;
    let ok = wait_until(Duration::from_secs(10), || {
        let Ok(mut c) = Raw::try_connect(&d.sock) else {
            return false;
        };
        c.sock
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        if c.try_call(&Request::Noop).ok() == Some(Reply::Noop) {
            admitted = Some(c);
            true
        } else {
            false
        }
    });
    assert!(ok, "no connection admitted after one of {N} was closed");
    let mut c = admitted.unwrap();
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    for c in conns.iter_mut() {
        assert_eq!(c.call(&Request::Noop), Reply::Noop);
    }
}

/// What one flooding connection did.
struct FloodResult {
    sent: u64,
    saw_would_block: bool,
    replies: u64,
}

/// Writes Noops as fast as the socket takes them for `dur` without reading,
/// counts `flooding` down, waits for `start_reading` to open, then reads
/// every reply and checks they are the Noops' tags in order.
fn flood(
    sock: &Path,
    dur: Duration,
    flooding: Arc<AtomicUsize>,
    start_reading: Arc<Gate>,
) -> FloodResult {
    const BATCH: u64 = 2048;
    let mut s = UnixStream::connect(sock).expect("connect flooder");
    s.set_nonblocking(true).unwrap();
    let mut next_tag = 1u64;
    let mut buf = Vec::new();
    let mut at = 0usize;
    let mut saw_would_block = false;
    let end = Instant::now() + dur;
    let mut written = 0u64;
    while Instant::now() < end {
        if at == buf.len() {
            buf.clear();
            at = 0;
            for _ in 0..BATCH {
                protocol::encode_request(&mut buf, next_tag, true, &Request::Noop);
                next_tag += 1;
            }
        }
        match s.write(&buf[at..]) {
            Ok(n) => {
                at += n;
                written += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                saw_would_block = true;
                // Until the daemon reads some more, or the flood is over.
                wait_writable(&s, end.saturating_duration_since(Instant::now()));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("flooder write: {e}"),
        }
    }
    flooding.fetch_sub(1, Ordering::AcqRel);
    assert!(
        start_reading.wait_open(Duration::from_secs(120)),
        "never told to read the replies"
    );
    // Everything up to the last whole message is a request; finish the
    // partial one (if any) while a reader drains the replies.
    let partial = (written % protocol::HEADER_SIZE as u64) as usize;
    let sent = written.div_ceil(protocol::HEADER_SIZE as u64);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut reader = s.try_clone().unwrap();
    let rd = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut pending = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while got < sent {
            let n = reader.read(&mut chunk).expect("flooder read replies");
            assert!(
                n > 0,
                "daemon closed a flooding connection after {got} of {sent} replies"
            );
            pending.extend_from_slice(&chunk[..n]);
            let mut used = 0;
            while let Some((tag, r, k)) = protocol::decode_reply(&pending[used..]).expect("reply") {
                assert_eq!(r, Reply::Noop);
                got += 1;
                assert_eq!(tag, got, "Noop replies out of order or lost");
                used += k;
            }
            pending.drain(..used);
        }
        got
    });
    if partial != 0 {
        s.write_all(&buf[at..at + protocol::HEADER_SIZE - partial])
            .expect("finish the last Noop");
    }
    let replies = rd.join().expect("reader");
    FloodResult {
        sent,
        saw_would_block,
        replies,
    }
}

#[test]
fn non_reading_flooders_keep_rss_bounded_and_others_served() {
    const FLOODERS: usize = 4;
    let d = Daemon::start(&[]);
    let data = pattern(4 << 20, 11);
    d.add_blob("b", &data);
    let mut good = d.raw();
    for _ in 0..100 {
        assert_eq!(good.call(&Request::Noop), Reply::Noop);
    }
    let (token, result, fd) = good.get_blob(1, "b");
    assert_eq!(result, 0);
    let fd = File::from(fd.unwrap());
    // The GetBlob reply means the daemon has done that work: the baseline.
    let baseline = d.rss_kib();
    assert!(baseline > 0);

    let flooding = Arc::new(AtomicUsize::new(FLOODERS));
    let start_reading = Arc::new(Gate::new(false));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let sock = d.sock.clone();
            let (flooding, start_reading) = (flooding.clone(), start_reading.clone());
            std::thread::spawn(move || {
                flood(&sock, Duration::from_secs(4), flooding, start_reading)
            })
        })
        .collect();
    let start = Instant::now();
    let mut max_rss = baseline;
    let mut answered = 0u64;
    let mut worst = Duration::ZERO;
    let mut rng = Rng::new(99);
    // At least 5 s, and until every flooder has stopped writing (a flooder
    // thread that started late still floods for its 4 s).
    while start.elapsed() < Duration::from_secs(5) || flooding.load(Ordering::Acquire) > 0 {
        let t = Instant::now();
        assert_eq!(good.call(&Request::Noop), Reply::Noop);
        let off = rng.below(data.len() as u64 - 4096);
        assert_eq!(good.fetch(token, off, 4096), (4096, 0));
        assert!(pread(&fd, off, 4096) == data[off as usize..off as usize + 4096]);
        worst = worst.max(t.elapsed());
        answered += 1;
        max_rss = max_rss.max(d.rss_kib());
        // Pacing, not synchronisation: the good client is an ordinary client
        // (a request every ~20 ms, sampling RSS as it goes), not a fifth
        // flooder competing with the others for the two CPUs.
        std::thread::sleep(Duration::from_millis(20));
    }
    start_reading.set(true);
    let results: Vec<FloodResult> = flooders
        .into_iter()
        .map(|h| h.join().expect("flooder"))
        .collect();
    max_rss = max_rss.max(d.rss_kib());
    let total: u64 = results.iter().map(|r| r.sent).sum();
    eprintln!(
        "flood: {FLOODERS} flooders sent {total} Noops; daemon RSS baseline {baseline} KiB, max {max_rss} KiB; \
         {answered} good round trips, worst {worst:?}"
    );
    for (i, r) in results.iter().enumerate() {
        assert!(
            r.saw_would_block,
            "flooder {i}: the daemon never stopped reading (no backpressure)"
        );
        assert_eq!(r.replies, r.sent, "flooder {i}: every Noop answered once");
    }
    assert!(answered > 10, "good client starved: {answered} round trips");
    assert!(
        max_rss < baseline + 16 * 1024,
        "daemon RSS grew from {baseline} KiB to {max_rss} KiB under a Noop flood"
    );
    assert_eq!(good.call(&Request::Noop), Reply::Noop);
}

// ---------------------------------------------------------------------------
// Garbage
// ---------------------------------------------------------------------------

/// Random bytes that a one-shot decode rejects (so the daemon must close the
/// connection), sometimes after a few valid requests.
fn garbage(rng: &mut Rng) -> Vec<u8> {
    loop {
        let mut v = Vec::new();
        if rng.below(2) == 0 {
            for i in 0..rng.below(4) {
                protocol::encode_request(&mut v, i + 1, true, &Request::Noop);
            }
        }
        let n = 20 + rng.below(3000) as usize;
        v.extend(pattern(n, rng.next()));
        let mut at = 0;
        loop {
            match protocol::decode_request(&v[at..]) {
                Ok(Some((_, k))) => at += k,
                Ok(None) => break,
                Err(_) => return v,
            }
        }
    }
}

/// Waits until the peer closes `s`, ignoring anything it sends first.
fn closed_by_peer(s: &mut UnixStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn garbage_clients_are_closed_and_the_good_client_is_unaffected() {
    const CLIENTS: usize = 64;
    let d = Daemon::start(&[]);
    let data = pattern(6 << 20, 5);
    d.add_blob("g", &data);
    let mut good = d.raw();
    let (token, result, fd) = good.get_blob(2, "g");
    assert_eq!(result, 0);
    let fd = File::from(fd.unwrap());
    assert_eq!(good.call(&Request::Noop), Reply::Noop);
    let baseline_fds = d.fd_count();
    assert!(baseline_fds > 0);

    let barrier = Arc::new(std::sync::Barrier::new(CLIENTS));
    let garbage_threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let sock = d.sock.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
                let bytes = garbage(&mut rng);
                let mut s = UnixStream::connect(&sock).expect("connect");
                barrier.wait();
                // Random chunking; the daemon may close before the end.
                let mut at = 0;
                while at < bytes.len() {
                    let k = (1 + rng.below(700) as usize).min(bytes.len() - at);
                    if s.write_all(&bytes[at..at + k]).is_err() {
                        break;
                    }
                    at += k;
                }
                closed_by_peer(&mut s, Duration::from_secs(20))
            })
        })
        .collect();
    // The good client works meanwhile.
    let mut rng = Rng::new(1234);
    let mut rounds = 0;
    while garbage_threads.iter().any(|h| !h.is_finished()) || rounds < 20 {
        assert_eq!(good.call(&Request::Noop), Reply::Noop);
        let off = rng.below(data.len() as u64);
        let len = 1 + rng.below(300_000);
        let (n, r) = good.fetch(token, off, len);
        assert_eq!(r, 0);
        assert_eq!(n, len.min(data.len() as u64 - off));
        assert!(pread(&fd, off, n) == data[off as usize..(off + n) as usize]);
        rounds += 1;
    }
    for (i, h) in garbage_threads.into_iter().enumerate() {
        assert!(h.join().unwrap(), "garbage client {i} was not closed");
    }
    assert_eq!(good.call(&Request::Noop), Reply::Noop);
    let mut last = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = d.fd_count();
            last == baseline_fds
        }),
        "daemon fds: {last} after the garbage clients, {baseline_fds} before"
    );
    let malformed = || d.log_text().matches("malformed message").count();
    assert!(
        wait_until(Duration::from_secs(10), || malformed() >= CLIENTS),
        "{} 'malformed message' log lines for {CLIENTS} garbage clients",
        malformed()
    );
}

// ---------------------------------------------------------------------------
// ENOSPC in the cache work dir
// ---------------------------------------------------------------------------

#[test]
fn enospc_fails_the_fetch_marks_nothing_and_recovers_when_space_returns() {
    require_root("mounting a tmpfs");
    let fs = Tmpfs::mount("8m").expect("mount an 8 MiB tmpfs");
    const MIB: u64 = 1 << 20;
    let mut d = Daemon::prepare(&[]);
    d.workdir = fs.path().join("work");
    d.spawn();
    let big = pattern(24 << 20, 21);
    let small = pattern(256 << 10, 22);
    d.add_blob("big", &big);
    d.add_blob("small", &small);

    let mut c = d.raw();
    let (st, r, sfd) = c.get_blob(1, "small");
    assert_eq!(r, 0);
    let sfd = File::from(sfd.unwrap());
    assert_eq!(c.fetch(st, 0, small.len() as u64), (small.len() as u64, 0));
    assert!(pread(&sfd, 0, small.len() as u64) == small);

    let (bt, r, bfd) = c.get_blob(1, "big");
    assert_eq!(r, 0);
    let bfd = File::from(bfd.unwrap());
    let (_, r) = c.fetch(bt, 0, big.len() as u64);
    assert_eq!(r, 1, "a fetch that cannot fit in the cache must fail");
    // Refused before writing (the free-space check at planning: the 24 MiB
    // cannot fit in 8 MiB whatever is evicted), or by ENOSPC while writing.
    let out_of_space = wait_until(Duration::from_secs(5), || {
        let log = d.log_text();
        log.contains("No space left on device") || log.contains("do not fit above --min-free")
    });
    assert!(
        out_of_space,
        "the failure was not for space:\n{}",
        d.log_text()
    );

    // Still serving: Noop, and a cached range of another blob on a new
    // connection.
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    let mut c2 = d.raw();
    assert_eq!(c2.call(&Request::Noop), Reply::Noop);
    let (st2, r, sfd2) = c2.get_blob(3, "small");
    assert_eq!(r, 0);
    assert_eq!(c2.fetch(st2, 1000, 5000), (5000, 0));
    assert!(pread(&File::from(sfd2.unwrap()), 1000, 5000) == small[1000..6000]);

    // Granule by granule, while the disk is still full: whatever is reported
    // valid has the right bytes, and some of the blob is not valid.
    let mut failed = 0;
    for g in 0..big.len() as u64 / MIB {
        let (n, r) = c.fetch(bt, g * MIB, MIB);
        if r == 0 {
            assert_eq!(n, MIB);
            assert!(
                pread(&bfd, g * MIB, MIB) == big[(g * MIB) as usize..((g + 1) * MIB) as usize],
                "granule {g} reported valid with wrong bytes after ENOSPC"
            );
        } else {
            assert_eq!(r, 1);
            failed += 1;
        }
    }
    assert!(failed > 0, "24 MiB reported valid on an 8 MiB tmpfs");

    // Space returns: the same request on the same connection succeeds.
    fs.resize("256m");
    assert_eq!(c.fetch(bt, 0, big.len() as u64), (big.len() as u64, 0));
    assert!(
        pread(&bfd, 0, big.len() as u64) == big,
        "bytes after recovery differ from the source"
    );
    // And on a fresh connection.
    let mut c3 = d.raw();
    let (bt3, r, bfd3) = c3.get_blob(7, "big");
    assert_eq!(r, 0);
    assert_eq!(c3.fetch(bt3, 0, big.len() as u64), (big.len() as u64, 0));
    assert!(pread(&File::from(bfd3.unwrap()), 0, big.len() as u64) == big);
    drop(d);
}

// ---------------------------------------------------------------------------
// Backend faults, in process
// ---------------------------------------------------------------------------

/// A backend of in-memory blobs. Ids starting with `hang` block in
/// `read_into` until released; ids starting with `boom` panic there.
struct TestBackend {
    blobs: HashMap<String, Vec<u8>>,
    released: Mutex<bool>,
    release: Condvar,
    hung: AtomicUsize,
}

impl TestBackend {
    fn new(blobs: &[(&str, Vec<u8>)]) -> Arc<TestBackend> {
        Arc::new(TestBackend {
            blobs: blobs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            released: Mutex::new(false),
            release: Condvar::new(),
            hung: AtomicUsize::new(0),
        })
    }

    fn release_all(&self) {
        *self.released.lock().unwrap() = true;
        self.release.notify_all();
    }
}

impl Backend for TestBackend {
    fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
        self.blobs
            .get(id)
            .map(|b| b.len() as u64)
            .ok_or(BackendError::NotFound)
    }

    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        if id.starts_with("boom") {
            panic!("test backend: read_into({id}) panics on purpose");
        }
        if id.starts_with("hang") {
            self.hung.fetch_add(1, Ordering::SeqCst);
            let guard = self.released.lock().unwrap();
            // Bounded, so a broken test cannot hang forever.
            let _ = self
                .release
                .wait_timeout_while(guard, Duration::from_secs(120), |r| !*r)
                .unwrap();
        }
        let data = self.blobs.get(id).ok_or(BackendError::NotFound)?;
        let (a, b) = (offset as usize, (offset + len) as usize);
        dst.write_all_at(&data[a..b], offset)
            .map_err(|e| BackendError::Io("write cache".into(), e))
    }

    fn describe(&self) -> String {
        "test backend".into()
    }
}

/// The server in process over `be`; a hung backend is released before the
/// server is stopped (it joins its workers).
fn in_process(be: &Arc<TestBackend>, tweak: impl FnOnce(&mut ServerConfig)) -> InProc {
    let release = be.clone();
    InProc::start(be.clone(), tweak).on_stop(move || release.release_all())
}

#[test]
fn a_panicking_fill_fails_that_fetch_and_the_worker_survives() {
    let ok = pattern(3 << 20, 31);
    let be = TestBackend::new(&[("boom", vec![7u8; 1 << 20]), ("ok", ok.clone())]);
    // One worker: if the panic killed it, no fill could ever finish again.
    let srv = in_process(&be, |cfg| cfg.workers = 1);
    let mut c = srv.raw();
    let (bt, r, _bfd) = c.get_blob(1, "boom");
    assert_eq!(r, 0);
    let (ot, r, ofd) = c.get_blob(1, "ok");
    assert_eq!(r, 0);
    let ofd = File::from(ofd.unwrap());
    for round in 0..3u64 {
        assert_eq!(
            c.fetch(bt, 0, 4096).1,
            1,
            "round {round}: a fill that panicked must fail its FetchRange"
        );
        let off = round * (1 << 20) + 17;
        assert_eq!(c.fetch(ot, off, 100_000), (100_000, 0), "round {round}");
        assert!(pread(&ofd, off, 100_000) == ok[off as usize..off as usize + 100_000]);
        assert_eq!(c.call(&Request::Noop), Reply::Noop);
    }
    // Pipelined: a panicking fill and a good one at once.
    let t1 = c.send(
        &Request::FetchRange {
            token: bt,
            start: 0,
            count: 10,
        },
        true,
    );
    let t2 = c.send(
        &Request::FetchRange {
            token: ot,
            start: 0,
            count: ok.len() as u64,
        },
        true,
    );
    let mut got = HashMap::new();
    for _ in 0..2 {
        let (tag, r) = c.recv().unwrap();
        got.insert(tag, r);
    }
    assert!(matches!(got[&t1], Reply::FetchRange { result: 1, .. }));
    assert!(matches!(got[&t2], Reply::FetchRange { result: 0, .. }));
    assert!(pread(&ofd, 0, ok.len() as u64) == ok);
}

#[test]
fn a_hanging_backend_times_out_and_other_fetches_proceed() {
    const MIB: u64 = 1 << 20;
    const HUNG: u64 = 6;
    let timeout = Duration::from_secs(1);
    let ok = pattern(6 << 20, 41);
    let ok2 = pattern(1 << 20, 42);
    let be = TestBackend::new(&[
        ("hang", vec![3u8; (HUNG * 2 * MIB) as usize]),
        ("ok", ok.clone()),
        ("ok2", ok2.clone()),
    ]);
    let srv = in_process(&be, |cfg| {
        cfg.workers = 2;
        cfg.backend_timeout = timeout;
    });
    let mut ch = srv.raw();
    let (ht, r, _hfd) = ch.get_blob(1, "hang");
    assert_eq!(r, 0);
    let mut co = srv.raw();
    let (ot, r, ofd) = co.get_blob(1, "ok");
    assert_eq!(r, 0);
    let ofd = File::from(ofd.unwrap());

    // HUNG fetches of distinct granules: more hung jobs than workers.
    let sent = Instant::now();
    let tags: Vec<u64> = (0..HUNG)
        .map(|i| {
            ch.send(
                &Request::FetchRange {
                    token: ht,
                    start: i * 2 * MIB,
                    count: 4096,
                },
                true,
            )
        })
        .collect();
    let (answered_tx, answered) = std::sync::mpsc::channel();
    let hung_client = std::thread::spawn(move || {
        let mut out = Vec::new();
        for _ in 0..tags.len() {
            let (tag, r) = ch.recv().expect("reply to a hung fetch");
            assert!(tags.contains(&tag));
            out.push((r, sent.elapsed()));
            let _ = answered_tx.send(());
        }
        out
    });
    assert!(
        wait_until(Duration::from_secs(10), || be.hung.load(Ordering::SeqCst)
            >= 2),
        "the hanging backend was never called"
    );
    // Every worker is stuck now. A job queued at this point is dropped if it
    // has waited a whole timeout when the server next checks, and whether it
    // has depends on how late that check runs, not on anything the test
    // controls. So the other client starts once the server has given up on
    // the hang (a hung fetch answered), while the backend still hangs.
    answered
        .recv_timeout(Duration::from_secs(30))
        .expect("no hung fetch answered within 30 s");

    // Another client's fetches, and a GetBlob, get through.
    for i in 0..6u64 {
        let off = i * MIB + 5;
        assert_eq!(co.fetch(ot, off, 200_000), (200_000, 0), "fetch {i} of ok");
        assert!(pread(&ofd, off, 200_000) == ok[off as usize..off as usize + 200_000]);
    }
    let (o2t, r, o2fd) = co.get_blob(1, "ok2");
    assert_eq!(r, 0, "GetBlob while the backend hangs");
    assert_eq!(co.fetch(o2t, 0, MIB), (MIB, 0));
    assert!(pread(&File::from(o2fd.unwrap()), 0, MIB) == ok2);
    let others = sent.elapsed();

    let hung = hung_client.join().expect("hung client");
    eprintln!(
        "backend timeout {timeout:?}, workers 2: {HUNG} hung fetches answered after {:?}; \
         other blobs' fetches done {others:?} after the hung ones were sent",
        hung.iter().map(|(_, d)| *d).collect::<Vec<_>>()
    );
    for (r, after) in &hung {
        assert!(
            matches!(r, Reply::FetchRange { result: 1, .. }),
            "a hung fetch must fail: {r:?}"
        );
        assert!(
            *after >= timeout.mul_f32(0.9),
            "a hung fetch failed after {after:?}, before the {timeout:?} timeout"
        );
    }
    // The hang is still going on (released only when the test ends): the
    // other fetches did not wait for it.
    assert!(!*be.released.lock().unwrap());
    let mut c = srv.raw();
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
}

#[test]
fn a_fifo_in_the_backend_dir_times_out_getblob_in_the_daemon() {
    // localfs opens the blob file on a worker; opening a FIFO for reading
    // blocks until a writer comes, i.e. forever here.
    let d = Daemon::start(&["--backend-timeout", "1", "--workers", "2"]);
    let data = pattern(2 << 20, 51);
    d.add_blob("fine", &data);
    nix::unistd::mkfifo(&d.backend.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let t = Instant::now();
    let mut hung = Vec::new();
    for i in 0..3 {
        let mut c = d.raw();
        // A different generation each: separate requests, one open job.
        c.send(&Request::get_blob(i, "fifo").unwrap(), true);
        hung.push(c);
    }
    let mut c = d.raw();
    let (tok, r, fd) = c.get_blob(1, "fine");
    assert_eq!(r, 0, "GetBlob of a normal blob while another one hangs");
    assert_eq!(c.fetch(tok, 0, data.len() as u64), (data.len() as u64, 0));
    assert!(pread(&File::from(fd.unwrap()), 0, data.len() as u64) == data);
    for h in hung.iter_mut() {
        match h.recv().expect("reply to the hung GetBlob") {
            (_, Reply::GetBlob { result, .. }) => assert_eq!(result, 5, "EIO"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(h.fds.is_empty());
    }
    let after = t.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "answered after {after:?}"
    );
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    eprintln!("fifo GetBlob failed with EIO after {after:?} (--backend-timeout 1)");
}

/// One FetchRange of a large range of a hung blob makes many fill jobs (one
/// per 4 MiB). Every one of them must not be allowed to take every worker
/// for good: other blobs' fetches still complete.
#[test]
fn many_hung_jobs_do_not_take_every_worker_for_good() {
    const MIB: u64 = 1 << 20;
    let ok = pattern(2 << 20, 43);
    let be = TestBackend::new(&[("hang", vec![3u8; (64 * MIB) as usize]), ("ok", ok.clone())]);
    let srv = in_process(&be, |cfg| {
        cfg.workers = 2;
        cfg.backend_timeout = Duration::from_secs(1);
    });
    let mut ch = srv.raw();
    let (ht, r, _hfd) = ch.get_blob(1, "hang");
    assert_eq!(r, 0);
    let mut co = srv.raw();
    let (ot, r, ofd) = co.get_blob(1, "ok");
    assert_eq!(r, 0);
    // 64 MiB: 16 fill jobs, all hanging.
    let t = Instant::now();
    let tag = ch.send(
        &Request::FetchRange {
            token: ht,
            start: 0,
            count: 64 * MIB,
        },
        true,
    );
    assert!(wait_until(Duration::from_secs(10), || be
        .hung
        .load(Ordering::SeqCst)
        >= 2));
    // Every worker is stuck now; as in a_hanging_backend_…, the other fetch
    // is sent once the server has given up on the hang, which answers the
    // 64 MiB request. (When hung jobs took every worker for good, that
    // answer never came.)
    let (t2, r) = ch
        .recv()
        .expect("the 64 MiB fetch of the hung blob was not answered");
    assert_eq!(t2, tag);
    assert!(matches!(r, Reply::FetchRange { result: 1, .. }));
    co.sock
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let got = co.try_fetch(ot, 0, ok.len() as u64);
    let hung_calls = be.hung.load(Ordering::SeqCst);
    eprintln!(
        "16 hung fill jobs, workers 2, timeout 1 s: other fetch -> {got:?} {:?} after the hung \
         one was sent; {hung_calls} backend calls hung",
        t.elapsed()
    );
    assert_eq!(
        got.ok(),
        Some((ok.len() as u64, 0)),
        "another blob's fetch did not complete within 15 s while 16 fill jobs hung \
         ({hung_calls} backend calls hung: every worker stuck)"
    );
    assert!(pread(&File::from(ofd.unwrap()), 0, ok.len() as u64) == ok);
}

/// `--sock-group` gives the socket file to a group, so a mode of 0660 lets
/// that group's members reach it (the uid allow list still applies).
#[test]
fn sock_group_sets_the_socket_files_group() {
    use std::os::unix::fs::MetadataExt;
    // Debian's base-passwd always has it; the test fails rather than skips.
    let group = nix::unistd::Group::from_name("nogroup")
        .expect("read the group database")
        .expect("a group named nogroup (Debian's base-passwd has one)");
    let d = Daemon::start(&["--sock-mode", "0660", "--sock-group", "nogroup"]);
    let meta = std::fs::metadata(&d.sock).unwrap();
    assert_eq!(meta.gid(), group.gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let out = std::process::Command::new(common::bin())
        .args([
            "serve",
            "--sock",
            "/nonexistent-dir-x/s",
            "--sock-group",
            "no-such-group-x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-group-x"), "{err}");
}
