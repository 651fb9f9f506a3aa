//! Integration tests of the client library (`blobmgr::client`): against the
//! real daemon binary, and against fake servers in this process that never
//! answer or answer garbage.
//!
//! Every test holds `SERIAL` so that the fd listing of the garbage test is
//! not disturbed by other tests of this file running at the same time.

mod common;

use blobmgr::client::{Client, ClientError, RemoteBlob};
use blobmgr::protocol::{self, Reply};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{pattern, wait_until, Daemon, Rng};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Helpers

/// A daemon whose backend holds one blob per size: (id, bytes) each.
fn daemon_with_blobs(sizes: &[usize]) -> (Daemon, Vec<(String, Vec<u8>)>) {
    let d = Daemon::start(&[]);
    let blobs = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let id = format!("blob-{i}-{size}");
            let data = pattern(size, i as u64 + 1);
            d.add_blob(&id, &data);
            (id, data)
        })
        .collect();
    (d, blobs)
}

/// This process's open fds, each with what it refers to. Counting them is
/// not enough: an fd an earlier test left to another thread may close
/// while a test runs, which a count would take for a leak hidden or shown.
/// The listing's own directory fd is left out.
fn open_fds() -> BTreeSet<(String, String)> {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            let listing = target.starts_with("/proc/") && target.ends_with("/fd");
            (!listing).then(|| (e.file_name().to_string_lossy().into_owned(), target))
        })
        .collect()
}

fn check_read(client: &Client, blob: &RemoteBlob, data: &[u8], offset: u64, len: usize) {
    let mut buf = vec![0u8; len];
    let n = client
        .read_at(blob, &mut buf, offset)
        .unwrap_or_else(|e| panic!("read_at({}, {offset}, {len}): {e}", blob.id()));
    let expect = len.min(data.len().saturating_sub(offset as usize));
    assert_eq!(n, expect, "read_at({}, {offset}, {len}) length", blob.id());
    if n == 0 {
        return;
    }
    assert!(
        buf[..n] == data[offset as usize..offset as usize + n],
        "read_at({}, {offset}, {len}): wrong bytes",
        blob.id()
    );
}

// ---------------------------------------------------------------------------
// Against the real daemon

#[test]
fn concurrent_mixed_calls_over_one_client() {
    let _s = serial();
    let (d, blobs) = daemon_with_blobs(&[1, 4_000, 300_001, 2_600_000]);
    let client = Arc::new(
        Client::builder()
            .timeout(Duration::from_secs(60))
            .connect(&d.sock)
            .expect("connect"),
    );
    let shared: Arc<Vec<(RemoteBlob, Vec<u8>)>> = Arc::new(
        blobs
            .iter()
            .map(|(id, data)| {
                let b = client.get_blob(id).expect("get_blob");
                assert_eq!(b.size(), data.len() as u64, "size of {id}");
                assert_eq!(b.base(), 0);
                assert_ne!(b.token(), 0);
                (b, data.clone())
            })
            .collect(),
    );
    let ids: Arc<Vec<(String, Vec<u8>)>> = Arc::new(blobs.clone());
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let threads: Vec<JoinHandle<()>> = (0..8u64)
        .map(|t| {
            let client = client.clone();
            let shared = shared.clone();
            let ids = ids.clone();
            let counts = counts.clone();
            std::thread::spawn(move || {
                let mut r = Rng::new(1000 + t);
                for i in 0..1000 {
                    let op = r.below(4) as usize;
                    counts[op].fetch_add(1, Ordering::Relaxed);
                    match op {
                        0 => {
                            client.ping().expect("ping");
                        }
                        1 => {
                            if r.below(20) == 0 {
                                let e = client.get_blob("no-such-blob").expect_err("missing blob");
                                assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
                                assert_eq!(ClientError::refused_errno(&e), Some(2));
                                continue;
                            }
                            let (id, data) = &ids[r.below(ids.len() as u64) as usize];
                            let b = client.get_blob(id).expect("get_blob");
                            assert_eq!(b.size(), data.len() as u64);
                            let off = r.below(data.len() as u64);
                            let len = 1 + r.below(8192) as usize;
                            check_read(&client, &b, data, off, len);
                        }
                        2 => {
                            let (b, data) = &shared[r.below(shared.len() as u64) as usize];
                            let size = data.len() as u64;
                            if r.below(25) == 0 {
                                let e = client
                                    .fetch_range(b, size + r.below(10), 10)
                                    .expect_err("fetch past the end");
                                assert_eq!(e.kind(), io::ErrorKind::Other, "{e}");
                                continue;
                            }
                            let start = r.below(size);
                            let len = 1 + r.below(300_000);
                            let got = client.fetch_range(b, start, len).expect("fetch_range");
                            assert_eq!(got, len.min(size - start), "fetch_range count");
                            if i % 7 == 0 {
                                client.prefetch(b, r.below(size), 65536).expect("prefetch");
                            }
                        }
                        _ => {
                            let (b, data) = &shared[r.below(shared.len() as u64) as usize];
                            let size = data.len() as u64;
                            let off = r.below(size + 2);
                            let len = 1 + r.below(200_000) as usize;
                            check_read(&client, b, data, off, len);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread panicked");
    }
    for (i, c) in counts.iter().enumerate() {
        assert!(c.load(Ordering::Relaxed) > 1000, "op {i} barely exercised");
    }
    // Whole blobs still read back intact through the shared handles.
    for (b, data) in shared.iter() {
        check_read(&client, b, data, 0, data.len());
    }
}

#[test]
fn blob_handles_survive_daemon_kill_and_restart() {
    let _s = serial();
    let (mut daemon, blobs) = daemon_with_blobs(&[3_000_000]);
    let client = Arc::new(
        Client::builder()
            .timeout(Duration::from_secs(3))
            .connect_retries(3)
            .backoff(Duration::from_millis(10), Duration::from_millis(100))
            .connect(&daemon.sock)
            .expect("connect"),
    );
    let data = Arc::new(blobs[0].1.clone());
    let blob = Arc::new(client.get_blob(&blobs[0].0).expect("get_blob"));
    let token_before = blob.token();

    // A reader looping for the whole test: every Ok must carry the right bytes.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (client, blob, data) = (client.clone(), blob.clone(), data.clone());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut r = Rng::new(7);
            while !stop.load(Ordering::Relaxed) {
                let off = r.below(data.len() as u64);
                let mut buf = vec![0u8; 1 + r.below(100_000) as usize];
                match client.read_at(&blob, &mut buf, off) {
                    Ok(n) => {
                        let expect = buf.len().min(data.len() - off as usize);
                        assert_eq!(n, expect);
                        assert!(buf[..n] == data[off as usize..off as usize + n]);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    // While the daemon is down, each call spends the
                    // client's own connect retries and backoff first.
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let wait_for = |counter: &AtomicUsize, n: usize| {
        let base = counter.load(Ordering::Relaxed);
        let progressed = wait_until(Duration::from_secs(60), || {
            counter.load(Ordering::Relaxed) >= base + n || reader.is_finished()
        });
        assert!(!reader.is_finished(), "reader thread died");
        assert!(progressed, "no progress");
    };
    wait_for(&ok, 50);

    for round in 0..2 {
        daemon.kill9();
        // While the daemon is down, calls fail with an error (no hang, no panic).
        let t = Instant::now();
        let mut buf = vec![0u8; 4096];
        let e = client
            .read_at(&blob, &mut buf, 12345)
            .expect_err("read while the daemon is down");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "outage call took too long"
        );
        eprintln!("round {round}: during the outage: {e}");
        wait_for(&failed, 1);

        daemon.spawn();
        // Same Client, same RemoteBlob: works again right away.
        check_read(&client, &blob, &data, 2_000_000, 300_000);
        check_read(&client, &blob, &data, 0, data.len());
        wait_for(&ok, 50);
        assert_ne!(
            blob.token(),
            token_before,
            "token not renewed after restart"
        );
        assert_ne!(
            blob.token() >> 32,
            token_before >> 32,
            "generation not bumped after reconnect"
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader thread panicked");
    // A new blob can be opened on the re-established connection too.
    let again = client
        .get_blob(&blobs[0].0)
        .expect("get_blob after restart");
    check_read(&client, &again, &data, 1, 10);
    drop(daemon);
}

// ---------------------------------------------------------------------------
// Fake servers

/// How a fake server answers one request (tag, code, body) on its
/// `conn`-th connection: returns false to close the connection.
type Behaviour = dyn Fn(usize, &mut UnixStream, u64, u32, &[u8]) -> bool + Send + Sync;

/// A Unix listener served by a thread of this process, one connection at a
/// time; stopped and joined on drop. The thread blocks in `accept` and
/// `read`; drop wakes it by shutting the current connection down and
/// connecting once to the listener.
struct FakeServer {
    path: PathBuf,
    state: Arc<Mutex<FakeState>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
struct FakeState {
    stop: bool,
    /// A handle on the connection being served, to shut it down on drop.
    current: Option<UnixStream>,
}

impl FakeServer {
    fn start(behaviour: Arc<Behaviour>) -> FakeServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let state = Arc::new(Mutex::new(FakeState::default()));
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let accepted = listener.incoming().filter_map(Result::ok);
            for (conn, mut stream) in accepted.enumerate() {
                {
                    let mut st = st.lock().unwrap_or_else(|p| p.into_inner());
                    if st.stop {
                        return;
                    }
                    st.current = Some(stream.try_clone().expect("dup connection"));
                }
                serve_fake(conn, &mut stream, &*behaviour);
                st.lock().unwrap_or_else(|p| p.into_inner()).current = None;
            }
        });
        FakeServer {
            path,
            state,
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.stop = true;
            if let Some(c) = st.current.take() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        // Wakes an `accept`; the thread sees `stop` and returns.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads exactly `buf.len()` bytes; false at EOF (or when the connection
/// was shut down).
fn read_full(s: &mut UnixStream, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        match s.read(&mut buf[done..]) {
            Ok(0) => return false,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

fn serve_fake(conn: usize, s: &mut UnixStream, b: &Behaviour) {
    loop {
        let mut h = [0u8; protocol::HEADER_SIZE];
        if !read_full(s, &mut h) {
            return;
        }
        let tag = u64::from_le_bytes(h[0..8].try_into().expect("8 bytes"));
        let code = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0u8; size.min(4096)];
        if !read_full(s, &mut body) {
            return;
        }
        if !b(conn, s, tag, code, &body) {
            // Hold on until the client notices (EOF), then close.
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = io::copy(s, &mut io::sink());
            return;
        }
    }
}

fn reply_bytes(tag: u64, r: &Reply) -> Vec<u8> {
    let mut v = Vec::new();
    protocol::encode_reply(&mut v, tag, r);
    v
}

/// Sends `bytes`, the first byte carrying `fds` (if any).
fn send_with_fds(s: &mut UnixStream, bytes: &[u8], fds: &[RawFd]) {
    if fds.is_empty() || bytes.is_empty() {
        let _ = s.write_all(bytes);
        return;
    }
    let _ = sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(&bytes[..1])],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::empty(),
        None,
    );
    let _ = s.write_all(&bytes[1..]);
}

/// A regular file to pass as a blob's fd.
fn blob_file() -> File {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(&[7u8; 1000]).expect("write");
    f
}

fn get_blob_ok(tag: u64) -> Vec<u8> {
    reply_bytes(
        tag,
        &Reply::GetBlob {
            token: 1 << 32 | 1,
            base: 0,
            result: 0,
        },
    )
}

#[test]
fn call_times_out_against_a_silent_server() {
    let _s = serial();
    let server = FakeServer::start(Arc::new(|_, _: &mut UnixStream, _, _, _: &[u8]| true));
    let timeout = Duration::from_millis(400);
    let client = Client::builder()
        .timeout(timeout)
        .connect(&server.path)
        .expect("connect");
    for _ in 0..2 {
        let t = Instant::now();
        let e = client.ping().expect_err("ping of a silent server");
        let took = t.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(took >= timeout, "failed after {took:?}, before the timeout");
        assert!(took < Duration::from_secs(20), "took {took:?}");
    }
    let t = Instant::now();
    let e = client
        .get_blob("x")
        .expect_err("GetBlob of a silent server");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(t.elapsed() >= timeout);
}

#[test]
fn garbage_replies_give_errors_without_panics_or_fd_leaks() {
    let _s = serial();
    let before = open_fds();
    let timeout = Duration::from_millis(500);
    let new_client = |server: &FakeServer| {
        Client::builder()
            .timeout(timeout)
            .connect_retries(0)
            .connect(&server.path)
            .expect("connect")
    };
    let noop = |tag| reply_bytes(tag, &Reply::Noop);

    // 1. Random bytes then close; from the 30th connection on, a sane server:
    //    the client recovers on the next call after each failure.
    {
        let server = FakeServer::start(Arc::new(
            move |conn, s: &mut UnixStream, tag, _, _: &[u8]| {
                if conn >= 30 {
                    let _ = s.write_all(&reply_bytes(tag, &Reply::Noop));
                    return true;
                }
                let mut r = Rng::new(conn as u64 + 99);
                let junk = pattern(1 + r.below(120) as usize, conn as u64 + 7);
                let _ = s.write_all(&junk);
                false
            },
        ));
        let client = new_client(&server);
        let mut errors = 0;
        for _ in 0..30 {
            if client.ping().is_err() {
                errors += 1;
            }
        }
        assert_eq!(errors, 30, "garbage accepted as a reply");
        client.ping().expect("ping once the server is sane again");
    }

    // 2. Well-formed headers with wrong sizes, bad flags, unknown codes.
    let bads: [fn(u64) -> Vec<u8>; 5] = [
        |tag: u64| {
            let mut v = reply_bytes(tag, &Reply::Noop);
            v[16] = 20; // Noop reply announcing a 20-byte body
            v.extend_from_slice(&[0u8; 20]);
            v
        },
        |tag: u64| {
            let mut v = reply_bytes(tag, &Reply::Noop);
            v[16..20].copy_from_slice(&5000u32.to_le_bytes());
            v
        },
        |tag: u64| {
            let mut v = reply_bytes(tag, &Reply::Noop);
            v[8] = 7; // unknown code
            v
        },
        |tag: u64| {
            let mut v = reply_bytes(tag, &Reply::Noop);
            v[12] = 1; // not a reply
            v
        },
        |tag: u64| {
            // A FetchRange reply (right size) to a Noop request.
            reply_bytes(
                tag,
                &Reply::FetchRange {
                    token: 1,
                    count: 1,
                    result: 0,
                },
            )
        },
    ];
    for bad in bads {
        let server = FakeServer::start(Arc::new(move |_, s: &mut UnixStream, tag, _, _: &[u8]| {
            let _ = s.write_all(&bad(tag));
            true
        }));
        let client = new_client(&server);
        let e = client.ping().expect_err("malformed reply accepted");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    // 3. Truncated replies, then close.
    {
        let server = FakeServer::start(Arc::new(
            move |_, s: &mut UnixStream, tag, code, _: &[u8]| {
                let full = if code == 1 {
                    get_blob_ok(tag)
                } else {
                    noop(tag)
                };
                let cut = &full[..full.len().min(11)];
                let f = blob_file();
                send_with_fds(s, cut, &[f.as_raw_fd()]);
                false
            },
        ));
        let client = new_client(&server);
        assert!(client.ping().is_err());
        assert!(client.get_blob("a").is_err());
        assert!(client.get_blob("b").is_err());
    }

    // 4. Unexpected fds: on a Noop reply, on a failed GetBlob, three on a
    //    successful GetBlob, and on a lone garbage byte.
    {
        let server = FakeServer::start(Arc::new(
            move |_, s: &mut UnixStream, tag, code, _: &[u8]| {
                let (a, b, c) = (blob_file(), blob_file(), blob_file());
                let three = [a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd()];
                match code {
                    0 => send_with_fds(s, &noop(tag), &three[..2]),
                    1 if tag % 2 == 0 => send_with_fds(
                        s,
                        &reply_bytes(
                            tag,
                            &Reply::GetBlob {
                                token: 0,
                                base: 0,
                                result: 2,
                            },
                        ),
                        &three[..1],
                    ),
                    1 => send_with_fds(s, &get_blob_ok(tag), &three),
                    _ => {
                        send_with_fds(s, b"\xff", &three);
                        return false;
                    }
                }
                true
            },
        ));
        let client = new_client(&server);
        client.ping().expect("a valid Noop reply with stray fds");
        let mut opened = Vec::new();
        for _ in 0..6 {
            match client.get_blob("x") {
                Ok(b) => {
                    assert_eq!(b.size(), 1000);
                    opened.push(b);
                }
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}"),
            }
        }
        assert!(!opened.is_empty(), "no GetBlob succeeded");
        // FetchRange is answered by a lone byte with fds, then a close.
        client
            .fetch_range(&opened[0], 0, 10)
            .expect_err("garbage FetchRange reply");
    }

    // 5. A successful GetBlob reply without its fd; a FetchRange reply with an
    //    undefined result; one that always refuses the token.
    {
        let fetches = Arc::new(AtomicUsize::new(0));
        let server = FakeServer::start(Arc::new(
            move |conn, s: &mut UnixStream, tag, code, _: &[u8]| {
                match (conn, code) {
                    (0, _) => {
                        let _ = s.write_all(&get_blob_ok(tag));
                    }
                    (_, 1) => {
                        let f = blob_file();
                        send_with_fds(s, &get_blob_ok(tag), &[f.as_raw_fd()]);
                    }
                    _ => {
                        let first = fetches.fetch_add(1, Ordering::Relaxed) == 0;
                        let r = Reply::FetchRange {
                            token: 0,
                            count: 0,
                            result: if first { 9 } else { 2 },
                        };
                        let _ = s.write_all(&reply_bytes(tag, &r));
                    }
                }
                true
            },
        ));
        let client = new_client(&server);
        let e = client
            .get_blob("x")
            .expect_err("GetBlob success without fd");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let b = client.get_blob("x").expect("get_blob on connection 1");
        let e = client.fetch_range(&b, 0, 1).expect_err("result 9");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let mut buf = [0u8; 8];
        let e = client
            .read_at(&b, &mut buf, 0)
            .expect_err("token refused forever");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    // 6. A reply with a tag nobody waits for (carrying an fd), then silence:
    //    the call times out and the stray fd is closed.
    {
        let server = FakeServer::start(Arc::new(move |_, s: &mut UnixStream, tag, _, _: &[u8]| {
            let f = blob_file();
            send_with_fds(s, &get_blob_ok(tag ^ 0xdead_0000), &[f.as_raw_fd()]);
            true
        }));
        let client = new_client(&server);
        let e = client.get_blob("x").expect_err("reply to another tag");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }

    // Clients and fake servers are dropped (readers joined): nothing leaked.
    // A leak is an fd open now that was not before (an fd number reused
    // for something else counts as new: its target differs).
    let leaked: Vec<_> = open_fds().difference(&before).cloned().collect();
    assert!(leaked.is_empty(), "fds leaked: {leaked:?}");
}

#[test]
fn pipelined_replies_out_of_order_reach_their_callers() {
    let _s = serial();
    // The server holds the first request's reply until a second request has
    // arrived, then answers the second first: a client that serialised its
    // callers would never send the second request, and the first would time
    // out. The held reply is a GetBlob (with an fd); the other a Noop.
    let held: Arc<Mutex<Vec<(u64, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    // Told each time a request is held.
    let (held_tx, held_rx) = std::sync::mpsc::channel::<u32>();
    let server = FakeServer::start(Arc::new(
        move |_, s: &mut UnixStream, tag, code, _: &[u8]| {
            let mut held = h.lock().unwrap_or_else(|p| p.into_inner());
            held.push((tag, code));
            if held.len() < 2 {
                let _ = held_tx.send(code);
                return true;
            }
            for &(tag, code) in held.iter().rev() {
                if code == 1 {
                    let f = blob_file();
                    send_with_fds(s, &get_blob_ok(tag), &[f.as_raw_fd()]);
                } else {
                    let _ = s.write_all(&reply_bytes(tag, &Reply::Noop));
                }
            }
            held.clear();
            true
        },
    ));
    let client = Arc::new(
        Client::builder()
            .timeout(Duration::from_secs(20))
            .connect(&server.path)
            .expect("connect"),
    );
    for _ in 0..5 {
        let c = client.clone();
        let slow = std::thread::spawn(move || c.get_blob("held").map(|b| b.size()));
        // Make sure the GetBlob is the held one.
        let code = held_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("GetBlob never sent");
        assert_eq!(code, 1, "the held request is the GetBlob");
        client.ping().expect("ping overtaking a held GetBlob");
        let size = slow.join().expect("GetBlob thread panicked");
        assert_eq!(size.expect("held GetBlob"), 1000);
    }
}

#[test]
fn refused_token_is_renewed_transparently() {
    let _s = serial();
    // GetBlob hands out tokens 1, 2, 3...; FetchRange refuses (result 2,
    // generation mismatch) every token but the newest.
    let issued = Arc::new(AtomicUsize::new(0));
    let i = issued.clone();
    let server = FakeServer::start(Arc::new(
        move |_, s: &mut UnixStream, tag, code, body: &[u8]| {
            match code {
                1 => {
                    let generation = u32::from_le_bytes(body[0..4].try_into().expect("4 bytes"));
                    let n = i.fetch_add(1, Ordering::Relaxed) as u64 + 1;
                    let r = Reply::GetBlob {
                        token: (generation as u64) << 32 | n,
                        base: 0,
                        result: 0,
                    };
                    let f = blob_file();
                    send_with_fds(s, &reply_bytes(tag, &r), &[f.as_raw_fd()]);
                }
                2 => {
                    let token = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
                    let count = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
                    let newest = token as u32 as usize == i.load(Ordering::Relaxed);
                    let r = Reply::FetchRange {
                        token,
                        count: if newest { count.min(1000) } else { 0 },
                        result: if newest { 0 } else { 2 },
                    };
                    let _ = s.write_all(&reply_bytes(tag, &r));
                }
                _ => {
                    let _ = s.write_all(&reply_bytes(tag, &Reply::Noop));
                }
            }
            true
        },
    ));
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(&server.path)
        .expect("connect");
    let a = client.get_blob("a").expect("get_blob a");
    let b = client.get_blob("b").expect("get_blob b");
    // `a`'s token (1) is now refused: the read re-opens it and succeeds.
    let mut buf = [0u8; 100];
    assert_eq!(client.read_at(&a, &mut buf, 10).expect("read_at a"), 100);
    assert_eq!(buf, [7u8; 100]);
    assert_eq!(a.token() as u32, 3, "a re-opened once");
    assert_eq!(client.fetch_range(&b, 0, 5000).expect("fetch b"), 1000);
    assert_eq!(b.token() as u32, 4, "b re-opened once");
    assert_eq!(issued.load(Ordering::Relaxed), 4);
}
