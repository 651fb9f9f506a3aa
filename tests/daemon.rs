//! Issue 2: the daemon as a process — the reactor's liveness under slow,
//! stalled, malformed and numerous clients, signals, the socket path, and
//! `blobmgr ping`.
mod common;
use blobmgr::protocol::{self, Reply, Request, HEADER_SIZE};
use common::*;
use nix::sys::signal::Signal;
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

const NEED: u32 = protocol::VERSION | protocol::FLAG_NEED_REPLY;

/// Lines of the daemon log that report a malformed message from this
/// process (the daemon names the peer by pid).
fn malformed_lines(d: &Daemon) -> usize {
    let needle = format!("closing connection from pid {} ", std::process::id());
    d.log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&needle) && l.contains("malformed message"))
        .count()
}

#[test]
fn noop_round_trip() {
    let d = Daemon::start(&[]);
    let mut c = d.raw();
    for _ in 0..3 {
        let tag = c.send(&Request::Noop, true);
        let (t, r) = c.recv().expect("reply");
        assert_eq!(t, tag);
        assert_eq!(r, Reply::Noop);
    }
    // The reply's exact bytes: request tag, code 0, flags = 1 | REPLY, size 0.
    let mut out = Vec::new();
    protocol::encode_request(&mut out, 0xdead_beef_0000_0001, true, &Request::Noop);
    c.send_bytes(&out).unwrap();
    let mut raw = [0u8; HEADER_SIZE];
    std::io::Read::read_exact(&mut c.sock, &mut raw).unwrap();
    assert_eq!(
        raw.to_vec(),
        header(
            0xdead_beef_0000_0001,
            0,
            protocol::VERSION | protocol::FLAG_REPLY,
            0
        )
    );
}

#[test]
fn pipelined_noops_in_one_write_all_answered_once() {
    let d = Daemon::start(&[]);
    let mut c = d.raw();
    let mut out = Vec::new();
    for tag in 1..=200u64 {
        protocol::encode_request(&mut out, tag * 3 + 1, true, &Request::Noop);
    }
    c.send_bytes(&out).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let (t, r) = c.recv().expect("reply");
        assert_eq!(r, Reply::Noop);
        assert!(
            t % 3 == 1 && (1..=200).contains(&(t / 3)),
            "unknown tag {t}"
        );
        assert!(seen.insert(t), "tag {t} answered twice");
    }
    assert_eq!(seen.len(), 200);
    // Nothing more is coming, and the connection is still usable.
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
}

#[test]
fn header_sent_one_byte_at_a_time_is_answered() {
    let d = Daemon::start(&[]);
    let data = pattern(10_000, 3);
    d.add_blob("slow", &data);
    let mut c = d.raw();
    // Each byte is sent once the daemon has read the one before, so every
    // byte arrives in a read of its own.
    let mut out = Vec::new();
    protocol::encode_request(&mut out, 77, true, &Request::Noop);
    c.send_trickled(&out);
    let (t, r) = c.recv().expect("reply");
    assert_eq!((t, r), (77, Reply::Noop));

    // A GetBlob trickled byte by byte still gets its reply and its fd.
    let mut out = Vec::new();
    protocol::encode_request(&mut out, 78, true, &Request::get_blob(1, "slow").unwrap());
    c.send_trickled(&out);
    let (t, r) = c.recv().expect("reply");
    assert_eq!(t, 78);
    let Reply::GetBlob { token, result, .. } = r else {
        panic!("unexpected reply {r:?}");
    };
    assert_eq!(result, 0);
    assert_eq!(c.fds.len(), 1, "GetBlob reply carries one fd");
    assert_eq!(c.fetch(token, 0, 10_000), (10_000, 0));
    let f = std::fs::File::from(c.fds.pop().unwrap());
    let mut got = vec![0u8; 10_000];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data);
}

#[test]
fn invalid_headers_close_only_their_connection() {
    let d = Daemon::start(&[]);
    let mut good = d.raw();
    assert_eq!(good.call(&Request::Noop), Reply::Noop);
    let get = protocol::GET_BLOB_REQUEST_SIZE;
    let fetch = protocol::FETCH_RANGE_REQUEST_SIZE;
    // (what, header, body bytes that follow it)
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("request 3", header(1, 3, NEED, 0), 0),
        ("request 4", header(1, 4, NEED, 0), 0),
        ("request u32::MAX", header(1, u32::MAX, NEED, 0), 0),
        ("tag 0", header(0, 0, NEED, 0), 0),
        ("size 4097", header(1, 0, NEED, 4097), 0),
        ("size u32::MAX", header(1, 1, NEED, u32::MAX), 0),
        ("version 0", header(1, 0, protocol::FLAG_NEED_REPLY, 0), 0),
        (
            "version 2",
            header(1, 0, 2 | protocol::FLAG_NEED_REPLY, 0),
            0,
        ),
        (
            "version 3",
            header(1, 0, 3 | protocol::FLAG_NEED_REPLY, 0),
            0,
        ),
        ("reserved bit 0x10", header(1, 0, NEED | 0x10, 0), 0),
        ("reserved bit 1<<31", header(1, 0, NEED | 1 << 31, 0), 0),
        ("noop body 1", header(1, 0, NEED, 1), 1),
        ("noop body 20", header(1, 0, NEED, 20), 20),
        ("getblob body 0", header(1, 1, NEED, 0), 0),
        (
            "getblob body 259",
            header(1, 1, NEED, get - 1),
            (get - 1) as usize,
        ),
        (
            "getblob body 261",
            header(1, 1, NEED, get + 1),
            (get + 1) as usize,
        ),
        ("getblob body 24", header(1, 1, NEED, fetch), fetch as usize),
        ("fetch body 0", header(1, 2, NEED, 0), 0),
        (
            "fetch body 23",
            header(1, 2, NEED, fetch - 1),
            (fetch - 1) as usize,
        ),
        (
            "fetch body 25",
            header(1, 2, NEED, fetch + 1),
            (fetch + 1) as usize,
        ),
        (
            "fetch announced as 260",
            header(1, 2, NEED, get),
            get as usize,
        ),
    ];
    let n = cases.len();
    for (what, hdr, body) in cases {
        let mut bad = d.raw();
        // A valid request first: the connection works until the bad header.
        assert_eq!(bad.call(&Request::Noop), Reply::Noop, "{what}");
        let mut bytes = hdr;
        bytes.extend_from_slice(&vec![0x5a; body]);
        // The daemon may close before reading the body: a write error is fine.
        let _ = bad.send_bytes(&bytes);
        assert!(
            bad.is_closed(Duration::from_secs(10)),
            "{what}: connection not closed"
        );
        assert_eq!(good.call(&Request::Noop), Reply::Noop, "after {what}");
    }
    // A fresh client is served too.
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);
    assert!(
        wait_until(Duration::from_secs(10), || malformed_lines(&d) >= n),
        "expected {n} warn lines naming pid {}, got {}:\n{}",
        std::process::id(),
        malformed_lines(&d),
        d.log_text()
    );
}

#[test]
fn a_flood_of_malformed_connections_is_not_a_flood_of_log_lines() {
    let d = Daemon::start(&[]);
    let t0 = std::time::Instant::now();
    let n = 1000;
    for _ in 0..n {
        let mut bad = d.raw();
        let _ = bad.send_bytes(&header(1, 3, NEED, 0));
        assert!(bad.is_closed(Duration::from_secs(10)), "not closed");
    }
    let secs = t0.elapsed().as_secs() as usize;
    // The daemon is still served, and what it logged is the budget: at
    // most 100 lines a second (plus one "left out" line a second).
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);
    let lines = malformed_lines(&d);
    assert!(lines >= 100.min(n), "{lines} lines");
    assert!(
        lines <= 100 * (secs + 1),
        "{lines} warn lines for {n} malformed connections in {secs} s"
    );
}

#[test]
fn stalled_half_headers_do_not_delay_others() {
    let d = Daemon::start(&[]);
    let mut stalled = Vec::new();
    for i in 0..50u64 {
        let mut s = d.raw();
        let mut out = Vec::new();
        protocol::encode_request(&mut out, i + 1, true, &Request::Noop);
        s.send_bytes(&out[..HEADER_SIZE / 2]).unwrap();
        stalled.push(s);
    }
    let mut c = d.raw();
    c.sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for _ in 0..100 {
        let tag = c.send(&Request::Noop, true);
        let (t, r) = c.recv().expect("Noop answered while others stall");
        assert_eq!((t, r), (tag, Reply::Noop));
    }
    // The stalled ones complete their headers and are answered as well.
    for (i, s) in stalled.iter_mut().enumerate() {
        let mut out = Vec::new();
        protocol::encode_request(&mut out, i as u64 + 1, true, &Request::Noop);
        s.send_bytes(&out[HEADER_SIZE / 2..]).unwrap();
    }
    for (i, s) in stalled.iter_mut().enumerate() {
        let (t, r) = s.recv().expect("reply after the stall");
        assert_eq!((t, r), (i as u64 + 1, Reply::Noop));
    }
}

fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    hard
}

#[test]
fn thousand_concurrent_connections_each_answered() {
    let hard = raise_nofile();
    assert!(hard >= 2200, "fd hard limit {hard} too low for this test");
    let d = Daemon::start(&[]);
    let mut probe = d.raw();
    assert_eq!(probe.call(&Request::Noop), Reply::Noop);
    let baseline = d.fd_count();
    let mut conns: Vec<Raw> = (0..1000).map(|_| d.raw()).collect();
    let mut tags = Vec::new();
    for c in conns.iter_mut() {
        tags.push(c.send(&Request::Noop, true));
    }
    for (c, tag) in conns.iter_mut().zip(tags) {
        let (t, r) = c.recv().expect("reply");
        assert_eq!((t, r), (tag, Reply::Noop));
    }
    assert!(
        d.fd_count() >= baseline + 1000,
        "daemon holds one fd per connection"
    );
    drop(conns);
    assert!(
        wait_until(Duration::from_secs(20), || d.fd_count() <= baseline),
        "daemon fds did not return to {baseline}: {}",
        d.fd_count()
    );
    assert_eq!(probe.call(&Request::Noop), Reply::Noop);
}

fn stops_cleanly_on(sig: Signal) {
    let mut d = Daemon::start(&[]);
    let data = pattern(100_000, 11);
    d.add_blob("b", &data);
    let mut c = d.raw();
    let (token, result, _fd) = c.get_blob(1, "b");
    assert_eq!(result, 0);
    assert_eq!(c.fetch(token, 0, 100_000), (100_000, 0));
    assert!(d.sock.exists());
    let st = d.stop_with(sig);
    assert!(st.success(), "exit status after {sig}: {st}");
    assert!(!d.sock.exists(), "socket file left after {sig}");
    assert!(c.is_closed(Duration::from_secs(5)));
}

#[test]
fn sigterm_exits_zero_and_removes_socket() {
    stops_cleanly_on(Signal::SIGTERM);
}

#[test]
fn sigint_exits_zero_and_removes_socket() {
    stops_cleanly_on(Signal::SIGINT);
}

#[test]
fn second_daemon_on_same_socket_refuses_to_start() {
    let d = Daemon::start(&[]);
    let dir = d.dir.as_ref().unwrap().path();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--sock")
        .arg(&d.sock)
        .arg("--workdir")
        .arg(dir.join("work2"))
        .arg("--backend")
        .arg(&d.backend)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run second daemon");
    assert!(!out.status.success(), "second daemon started");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {err:?}");
    assert!(
        lines[0].contains(&*d.sock.to_string_lossy()),
        "error does not name the path: {err:?}"
    );
    // The first one still owns the path and answers.
    assert!(d.sock.exists());
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);
}

#[test]
fn stale_socket_file_is_replaced() {
    let mut d = Daemon::start(&[]);
    assert!(d.stop_with(Signal::SIGTERM).success());
    assert!(!d.sock.exists());
    {
        let l = std::os::unix::net::UnixListener::bind(&d.sock).unwrap();
        drop(l);
    }
    assert!(d.sock.exists(), "a dropped std listener leaves its file");
    assert!(std::os::unix::net::UnixStream::connect(&d.sock).is_err());
    d.spawn();
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);
}

#[test]
fn ping_succeeds_against_a_daemon() {
    let d = Daemon::start(&[]);
    let out = Command::new(bin())
        .arg("ping")
        .arg("--sock")
        .arg(&d.sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ping_without_daemon_fails_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let out = Command::new(bin())
        .arg("ping")
        .arg("--sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "stderr: {err:?}");
    assert!(!err.trim().is_empty());
}
