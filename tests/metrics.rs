//! The metrics endpoint over real sockets: scraped over TCP and a Unix
//! socket, parsed by a Prometheus text-format parser, with counters checked
//! against known traffic, and kept answering (as is the protocol) while idle
//! and garbage-sending metrics clients hold connections.
mod common;
use blobmgr::backend::LocalFs;
use blobmgr::metrics::http::MetricsAddr;
use blobmgr::protocol::{Reply, Request};
use common::*;
use prometheus_parse::{Scrape, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `n` connections to the TCP endpoint on `port`.
fn tcp_conns(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect()
}

/// `n` connections to the Unix endpoint at `path`.
fn unix_conns(path: &std::path::Path, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|_| UnixStream::connect(path).expect("connect"))
        .collect()
}

/// One `GET /metrics` with `Connection: close`, the body parsed.
fn scrape_stream(mut s: impl Read + Write) -> Scrape {
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("exposition parses")
}

fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hit = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)));
    match hit.map(|x| &x.value) {
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        Some(Value::Histogram(h)) => h.last().map_or(0.0, |b| b.count),
        other => panic!("{name}{labels:?}: {other:?}"),
    }
}

struct Setup {
    server: InProc,
    tcp: u16,
    unix: PathBuf,
    backend: PathBuf,
    _dir: tempfile::TempDir,
}

/// A server with both endpoints, a 1 MiB cache limit and a local backend.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let backend = dir.path().join("be");
    std::fs::create_dir(&backend).unwrap();
    let tcp = free_port();
    let unix = dir.path().join("metrics.sock");
    let addrs = vec![
        MetricsAddr::Tcp(format!("127.0.0.1:{tcp}").parse().unwrap()),
        MetricsAddr::Unix(unix.clone()),
    ];
    let server = InProc::start(Arc::new(LocalFs::new(&backend)), move |cfg| {
        cfg.metrics = addrs;
        cfg.cache.granule = 64 << 10;
        cfg.cache.limit = Some(1 << 20);
    });
    Setup {
        server,
        tcp,
        unix,
        backend,
        _dir: dir,
    }
}

#[test]
fn families_are_present_and_counters_follow_traffic() {
    let s = setup();
    let size = 700_000usize;
    std::fs::write(s.backend.join("a"), pattern(size, 1)).unwrap();
    std::fs::write(s.backend.join("b"), pattern(size, 2)).unwrap();
    let before = scrape_stream(TcpStream::connect(("127.0.0.1", s.tcp)).unwrap());
    for family in [
        "blobmgr_connections",
        "blobmgr_requests_total",
        "blobmgr_fetch_seconds",
        "blobmgr_backend_requests_total",
        "blobmgr_backend_bytes_total",
        "blobmgr_cache_bytes",
        "blobmgr_cache_blobs",
        "blobmgr_evictions_total",
    ] {
        assert!(before.docs.contains_key(family), "family {family} missing");
    }
    let noop = [("op", "noop"), ("result", "ok")];
    let n0 = value(&before, "blobmgr_requests_total", &noop);
    let mut raw = s.server.raw();
    for _ in 0..17 {
        assert_eq!(raw.call(&Request::Noop), Reply::Noop);
    }
    // A cold fetch of the whole of "a", then a hit.
    let a = raw.open(1, "a").expect("GetBlob a");
    assert_eq!(raw.fetch(a.token, 0, size as u64), (size as u64, 0));
    assert_eq!(raw.fetch(a.token, 10, 10), (10, 0));
    let after = scrape_stream(UnixStream::connect(&s.unix).unwrap());
    assert_eq!(value(&after, "blobmgr_requests_total", &noop) - n0, 17.0);
    let hit = [("op", "fetch_range"), ("result", "hit")];
    let miss = [("op", "fetch_range"), ("result", "miss")];
    assert_eq!(value(&after, "blobmgr_requests_total", &hit), 1.0);
    assert_eq!(value(&after, "blobmgr_requests_total", &miss), 1.0);
    assert_eq!(value(&after, "blobmgr_cache_bytes", &[]), size as f64);
    assert_eq!(value(&after, "blobmgr_cache_blobs", &[]), 1.0);
    assert_eq!(value(&after, "blobmgr_connections", &[]), 1.0);
    let endpoint = format!("localfs:{}", s.backend.display());
    let ep = [("endpoint", endpoint.as_str())];
    assert_eq!(
        value(&after, "blobmgr_backend_bytes_total", &ep),
        size as f64
    );
    assert_eq!(
        value(&after, "blobmgr_fetch_seconds", &[("cached", "false")]),
        1.0
    );
    assert_eq!(
        value(&after, "blobmgr_fetch_seconds", &[("cached", "true")]),
        1.0
    );
    // Generation 2 drops the token on "a"; filling "b" then passes the
    // 1 MiB limit and evicts "a".
    let b = raw.open(2, "b").expect("GetBlob b");
    assert_eq!(raw.fetch(b.token, 0, size as u64), (size as u64, 0));
    let evicted = wait_until(Duration::from_secs(10), || {
        let m = scrape_stream(UnixStream::connect(&s.unix).unwrap());
        value(&m, "blobmgr_evictions_total", &[("cause", "size")]) == 1.0
            && value(&m, "blobmgr_cache_bytes", &[]) == size as f64
    });
    assert!(evicted, "one eviction by size, the cache back to one blob");
}

#[test]
fn idle_and_garbage_metrics_clients_delay_nothing() {
    let s = setup();
    let idle = tcp_conns(s.tcp, 50);
    let mut garbage = unix_conns(&s.unix, 10);
    let mut raw = s.server.raw();
    let mut rng = Rng::new(7);
    for round in 0..200 {
        let g = &mut garbage[round % 10];
        let _ = g.write_all(&rng.bytes(64));
        assert_eq!(raw.call(&Request::Noop), Reply::Noop, "Noop {round}");
    }
    // Half-sent request on the idle ones, then a real scrape still answers.
    for mut c in idle.iter().take(10) {
        let _ = c.write_all(b"GET /metr");
    }
    let m = scrape_stream(UnixStream::connect(&s.unix).unwrap());
    let noop = [("op", "noop"), ("result", "ok")];
    assert_eq!(value(&m, "blobmgr_requests_total", &noop), 200.0);
    drop(idle);
}

#[test]
fn a_full_listener_makes_room_and_never_shuts_out_another() {
    let s = setup();
    // More idle TCP connections than a listener has slots (64).
    let tcp = tcp_conns(s.tcp, 80);
    // The Unix socket has slots of its own (scrape_stream checks the 200).
    scrape_stream(UnixStream::connect(&s.unix).unwrap());
    // Its own idle connections make room for a scrape instead of refusing it.
    let unix = unix_conns(&s.unix, 70);
    scrape_stream(UnixStream::connect(&s.unix).unwrap());
    scrape_stream(TcpStream::connect(("127.0.0.1", s.tcp)).unwrap());
    drop((tcp, unix));
}
