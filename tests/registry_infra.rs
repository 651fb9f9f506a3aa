//! The registry test infrastructure itself (`tests/common/registry.rs`,
//! `proxy.rs`, `regfiles.rs`), checked without the daemon: pushing and
//! counting on a real registry in each mode, what a proxy-mode mirror
//! answers, the forwarding proxy, the credential helper script, and that
//! the config.json and hosts.toml writers produce what the project's own
//! parsers read. `tests/references.rs` builds on all of it.
//!
//! Everything listens on loopback only.

mod common;

use blobmgr::credentials::{Credential, Credentials};
use blobmgr::hosts::HostsDir;
use blobmgr::reference::{looks_like_reference, Host, Reference};
use common::{
    basic_header, digest_hex, malformed_references, pattern, wait_until, Access, CredHelper,
    DockerConfig, HostsToml, HttpProxy, Registry,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: usize = 1 << 20;

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn access_log_lines_parse() {
    let a = Access::parse(
        "127.0.0.1 - - [28/Nov/2026:19:27:06 +0000] \"GET /v2/test/repo/blobs/sha256:83ab?x=1 \
         HTTP/1.1\" 206 100 \"\" \"curl/7.88.1\"",
    )
    .expect("a Combined Log Format line");
    assert_eq!(
        (a.method.as_str(), a.path.as_str(), a.query.as_str()),
        ("GET", "/v2/test/repo/blobs/sha256:83ab", "x=1")
    );
    assert_eq!(
        (a.status, a.bytes, a.user_agent.as_str()),
        (206, 100, "curl/7.88.1")
    );
    assert_eq!(a.blob(), Some(("test/repo", "83ab")));
    let h = Access::parse(
        "::1 - alice [1/Jan/2026:0:0:0 +0000] \"HEAD /v2/ HTTP/1.1\" 401 - \"\" \"\"",
    )
    .expect("user, no bytes");
    assert_eq!((h.status, h.bytes, h.blob()), (401, 0, None));
    for junk in [
        "time=\"2026-11-28T19:26:55Z\" level=info msg=\"response completed\" \
         http.request.uri=\"/v2/\" http.response.written=2",
        "panic: Get \"http://127.0.0.1:1/v2/\": dial tcp",
        "",
    ] {
        assert_eq!(Access::parse(junk), None, "{junk}");
    }
}

#[test]
fn anonymous_registry_push_ranges_and_counts() {
    let reg = Registry::start();
    let data = pattern(5 * MIB + 17, 1);
    let hex = reg.push("infra/one", &data);
    assert_eq!(hex, digest_hex(&data));
    assert_eq!(
        reg.push("infra/two", &data),
        hex,
        "same digest, second repository"
    );

    let (st, h, body) = reg.get_blob("GET", "infra/one", &hex, Some((100, 199)));
    assert_eq!(st, 206);
    assert_eq!(
        header(&h, "content-range"),
        Some(&*format!("bytes 100-199/{}", data.len()))
    );
    assert!(body == data[100..200]);
    let (st, _, body) = reg.get_blob("GET", "infra/one", &hex, None);
    assert_eq!(st, 200);
    assert!(body == data);
    let (st, _, _) = reg.get_blob("HEAD", "infra/two", &hex, None);
    assert_eq!(st, 200);
    let (st, _, body) = reg.get_blob("GET", "infra/two", &hex, Some((0, 999)));
    assert_eq!((st, body.len()), (206, 1000));
    let absent = digest_hex(b"never pushed");
    assert_eq!(reg.get_blob("GET", "infra/one", &absent, None).0, 404);

    assert_eq!(reg.blob_gets("infra/one", &hex), 2);
    assert_eq!(reg.blob_gets("infra/two", &hex), 1);
    assert_eq!(reg.blob_gets_any(&hex), 3);
    assert_eq!(reg.blob_get_bytes(&hex), 100 + data.len() as u64 + 1000);
    let heads: Vec<_> = reg
        .blob_accesses(&hex)
        .into_iter()
        .filter(|a| a.method == "HEAD")
        .collect();
    assert_eq!(heads.len(), 1);
    let miss = reg.blob_accesses(&absent);
    assert_eq!((miss.len(), miss[0].status), (1, 404));
    // The sync marks and readiness probes are not API requests; the two
    // uploads (POST + PUT each), 5 blob requests are.
    assert_eq!(reg.api_requests().len(), 4 + 5);
}

#[test]
fn a_client_that_goes_away_mid_body_is_counted_once_its_handler_ends() {
    let reg = Registry::start();
    let data = pattern(24 * MIB, 6);
    let hex = reg.push("early/exit", &data);
    for round in 1..=3 {
        let mut conn = TcpStream::connect(("127.0.0.1", reg.port)).unwrap();
        write!(
            conn,
            "GET /v2/early/exit/blobs/sha256:{hex} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        let mut first = [0u8; 4096];
        conn.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
        drop(conn);
        // No waiting here: the count itself waits for the handler.
        assert_eq!(reg.blob_gets_any(&hex), round);
    }
    let bytes = reg.blob_get_bytes(&hex);
    assert!(bytes < 3 * data.len() as u64, "{bytes} bytes written");
}

#[test]
fn basic_auth_registry_wants_its_credentials() {
    let reg = Registry::start_basic("alice", "pw-alice-1");
    let data = pattern(MIB + 3, 2);
    let hex = reg.push("private/app", &data);
    let (st, _, body) = reg.get_blob("GET", "private/app", &hex, Some((5, 9)));
    assert_eq!((st, body.as_slice()), (206, &data[5..10]));

    let url = format!("{}/v2/private/app/blobs/sha256:{hex}", reg.base());
    let status = |auth: Option<String>| {
        let mut r = common::agent().get(&url);
        if let Some(a) = auth {
            r = r.header("Authorization", &a);
        }
        let r = r.call().unwrap_or_else(|e| panic!("{e}"));
        let challenge = common::response_header(&r, "WWW-Authenticate").map(String::from);
        (r.status().as_u16(), challenge)
    };
    let (st, challenge) = status(None);
    assert_eq!(st, 401);
    assert_eq!(challenge.as_deref(), Some("Basic realm=\"blobmgr-test\""));
    assert_eq!(status(Some(basic_header("alice", "wrong"))).0, 401);
    assert_eq!(status(Some(basic_header("alice", "pw-alice-1"))).0, 200);
    let statuses: Vec<u16> = reg.blob_accesses(&hex).iter().map(|a| a.status).collect();
    assert_eq!(statuses, [206, 401, 401, 200]);
}

#[test]
fn proxy_mode_mirror_answers_a_cold_range_get_with_the_whole_blob() {
    let mut origin = Registry::start();
    let mut mirror = Registry::start_mirror(&origin);
    assert!(mirror.is_mirror());
    let data = pattern(6 * MIB + 5, 3);
    let hex = origin.push("lib/app", &data);

    // Cold: a Range GET comes back 200 with the whole blob.
    let (st, h, body) = mirror.get_blob("GET", "lib/app", &hex, Some((100, 199)));
    assert_eq!(st, 200, "cold mirror");
    assert_eq!(header(&h, "content-length"), Some(&*data.len().to_string()));
    assert_eq!(header(&h, "content-range"), None);
    assert!(body == data);
    assert_eq!(mirror.blob_get_bytes(&hex), data.len() as u64);
    assert!(
        origin.blob_gets("lib/app", &hex) >= 1,
        "pulled from the origin"
    );

    // Once stored, ranges are served as asked.
    assert!(
        wait_until(Duration::from_secs(20), || mirror
            .has_stored("lib/app", &hex)),
        "the mirror never stored the blob: {}",
        mirror.log()
    );
    let (st, _, body) = mirror.get_blob("GET", "lib/app", &hex, Some((100, 199)));
    assert_eq!(
        (st, body.as_slice()),
        (206, &data[100..200]),
        "{}",
        mirror.log()
    );
    assert_eq!(mirror.blob_get_bytes(&hex), data.len() as u64 + 100);
    let origin_gets = origin.blob_gets_any(&hex);

    // What the origin lacks, the mirror lacks.
    assert_eq!(
        mirror.get_blob("GET", "lib/app", &digest_hex(b"x"), None).0,
        404
    );
    assert_eq!(
        mirror.get_blob("GET", "other/app", &hex, Some((0, 9))).0,
        404
    );

    // The origin killed: the mirror serves what it stored; a mirror cannot
    // start while its origin is down.
    origin.stop();
    assert!(!origin.is_running());
    let (st, _, body) = mirror.get_blob("GET", "lib/app", &hex, Some((7, 8)));
    assert_eq!((st, body.as_slice()), (206, &data[7..9]));
    mirror.stop();
    let start = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mirror.spawn()));
    assert!(start.is_err(), "a mirror started without its origin");
    // Both back, on the same ports and storage.
    origin.spawn();
    mirror.spawn();
    let (st, _, body) = origin.get_blob("GET", "lib/app", &hex, Some((0, 3)));
    assert_eq!((st, body.as_slice()), (206, &data[..4]));
    let (st, _, body) = mirror.get_blob("GET", "lib/app", &hex, Some((1, 2)));
    assert_eq!((st, body.as_slice()), (206, &data[1..3]));
    assert_eq!(
        origin.blob_gets_any(&hex),
        origin_gets + 1,
        "served from storage"
    );
}

/// A request through the proxy on a raw connection, with `extra` header
/// lines (each ending in CRLF): the status and body (none for HEAD;
/// Content-Length framing, else all until the proxy closes, framing and
/// all).
fn raw_request(conn: &mut BufReader<TcpStream>, line: &str, extra: &str) -> (u16, Vec<u8>) {
    conn.get_mut()
        .write_all(format!("{line}\r\nHost: x\r\n{extra}\r\n").as_bytes())
        .unwrap();
    let mut status = String::new();
    conn.read_line(&mut status).unwrap();
    let mut len = None;
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = Some(v.trim().parse().unwrap());
        }
    }
    let mut body = Vec::new();
    match len {
        _ if line.starts_with("HEAD ") => {}
        Some(n) => {
            body.resize(n, 0);
            conn.read_exact(&mut body).unwrap();
        }
        None => {
            conn.read_to_end(&mut body).unwrap();
        }
    }
    (status.split(' ').nth(1).unwrap().parse().unwrap(), body)
}

#[test]
fn forwarding_proxy_streams_and_counts_per_target() {
    let reg = Registry::start();
    let data = pattern(3 * MIB + 1, 5);
    let hex = reg.push("via/proxy", &data);
    let proxy = HttpProxy::start();
    let url = format!("{}/v2/via/proxy/blobs/sha256:{hex}", reg.base());
    // Absolute-form requests, each on a connection of its own.
    let through = |line: &str, extra: &str| {
        let mut conn = BufReader::new(TcpStream::connect(proxy.addr).unwrap());
        raw_request(&mut conn, line, extra)
    };
    let (st, body) = through(&format!("GET {url} HTTP/1.1"), "Range: bytes=10-19\r\n");
    assert_eq!(st, 206);
    assert!(body == data[10..20]);
    let (st, body) = through(&format!("GET {url} HTTP/1.1"), "");
    assert_eq!(st, 200);
    assert!(body == data);
    assert_eq!(through(&format!("HEAD {url} HTTP/1.1"), "").0, 200);
    assert!(proxy.wait_idle(Duration::from_secs(10)));
    assert_eq!(proxy.count(&reg.host()), 3);
    assert_eq!(proxy.bytes(&reg.host()), 10 + data.len() as u64);
    assert_eq!(reg.blob_gets("via/proxy", &hex), 2, "the registry saw them");

    // Two requests on one client connection; then what it refuses.
    let mut conn = BufReader::new(TcpStream::connect(proxy.addr).unwrap());
    let (st, body) = raw_request(&mut conn, &format!("GET {}/v2/ HTTP/1.1", reg.base()), "");
    assert_eq!((st, body.as_slice()), (200, &b"{}"[..]));
    let (st, body) = raw_request(&mut conn, &format!("GET {url} HTTP/1.1"), "");
    assert_eq!((st, body.len()), (200, data.len()));
    for (line, status) in [
        ("GET /v2/ HTTP/1.1".to_string(), 400),
        ("GET http://example.invalid/v2/ HTTP/1.1".into(), 403),
        (format!("CONNECT {} HTTP/1.1", reg.host()), 501),
    ] {
        let mut conn = BufReader::new(TcpStream::connect(proxy.addr).unwrap());
        assert_eq!(raw_request(&mut conn, &line, "").0, status, "{line}");
    }

    // A chunked response, from a target that then closes.
    let up = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = up.accept().unwrap();
        let mut rd = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        while rd.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .unwrap();
    });
    // The proxy passes the chunks on as they are.
    let line = format!("GET http://{up_addr}/c HTTP/1.1");
    let (st, body) = through(&line, "Connection: close\r\n");
    assert_eq!(st, 200);
    assert_eq!(body, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    server.join().unwrap();
    assert!(proxy.wait_idle(Duration::from_secs(10)));
    assert_eq!(proxy.bytes(&up_addr.to_string()), 11);
}

#[test]
fn credential_helper_script_answers_get_like_docker_helpers() {
    let helper = CredHelper::write("blobtest", &[("127.0.0.1:5999", "carol", "sec-carol-1")]);
    let run = |args: &[&str], stdin: &str| {
        let mut c = Command::new(helper.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    for server in [
        "127.0.0.1:5999",
        "127.0.0.1:5999\n",
        "http://127.0.0.1:5999/",
        "https://127.0.0.1:5999/v1/",
    ] {
        let (code, out) = run(&["get"], server);
        assert_eq!(code, Some(0), "{server}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Username"], "carol");
        assert_eq!(v["Secret"], "sec-carol-1");
        assert_eq!(v["ServerURL"], "127.0.0.1:5999");
    }
    let (code, out) = run(&["get"], "127.0.0.1:6000");
    assert_eq!(code, Some(1));
    assert!(
        out.contains("credentials not found in native keychain"),
        "{out}"
    );
    assert_eq!(run(&["list"], "").0, Some(1));
    let calls = helper.calls();
    assert_eq!(calls.len(), 6);
    assert_eq!(
        calls[2],
        ("get".to_string(), "http://127.0.0.1:5999/".to_string())
    );
    assert!(helper
        .path_env()
        .starts_with(&format!("{}:", helper.dir().display())));

    // The project's credential lookup runs it and reads its answer, through
    // credHelpers and through credsStore; auths entries as written.
    let dir = tempfile::tempdir().unwrap();
    let cfg = DockerConfig::new()
        .cred_helper("127.0.0.1:5999", "blobtest")
        .auth("127.0.0.1:6001", "dave", "pw-dave-1");
    let path = cfg.write(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    let creds = Credentials::parse(&text, &path)
        .unwrap()
        .with_helper_dirs(vec![helper.dir().to_path_buf()]);
    let basic = |u: &str, p: &str| {
        Some(Credential::Basic {
            user: u.into(),
            password: p.into(),
        })
    };
    assert_eq!(
        creds.lookup("127.0.0.1:5999").unwrap(),
        basic("carol", "sec-carol-1")
    );
    assert_eq!(
        creds.lookup("127.0.0.1:6001").unwrap(),
        basic("dave", "pw-dave-1")
    );
    assert_eq!(creds.lookup("127.0.0.1:6002").unwrap(), None);
    let store = DockerConfig::new().creds_store("blobtest").to_json();
    let creds = Credentials::parse(&store, &path)
        .unwrap()
        .with_helper_dirs(vec![helper.dir().to_path_buf()]);
    assert_eq!(
        creds.lookup("127.0.0.1:5999").unwrap(),
        basic("carol", "sec-carol-1")
    );
    assert_eq!(creds.lookup("127.0.0.1:7000").unwrap(), None);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["auths"]["127.0.0.1:6001"]["auth"], "ZGF2ZTpwdy1kYXZlLTE=");
}

#[test]
fn hosts_toml_writer_is_read_by_the_hosts_module() {
    let dir = tempfile::tempdir().unwrap();
    let path = HostsToml::new()
        .server("http://127.0.0.1:5000")
        .mirror("http://127.0.0.1:5001", &["pull", "resolve"])
        .header("X-Test", "one")
        .mirror("http://127.0.0.1:5002", &["resolve"])
        .mirror("http://127.0.0.1:5003/base", &["pull"])
        .override_path()
        .write(dir.path(), "127.0.0.1:5000");
    assert_eq!(path, dir.path().join("127.0.0.1:5000/hosts.toml"));
    let cfg = HostsDir::new(dir.path())
        .resolve(&Host::parse("127.0.0.1:5000").unwrap())
        .unwrap();
    assert_eq!(
        cfg.ignored_keys,
        Vec::<String>::new(),
        "{}",
        std::fs::read_to_string(&path).unwrap()
    );
    let urls: Vec<(&str, bool)> = cfg
        .endpoints
        .iter()
        .map(|e| (e.url.as_str(), e.is_origin))
        .collect();
    assert_eq!(
        urls,
        [
            ("http://127.0.0.1:5001/v2", false),
            ("http://127.0.0.1:5003/base", false),
            ("http://127.0.0.1:5000/v2", true),
        ],
        "mirrors in file order (one without pull skipped), then the server"
    );
    assert_eq!(
        cfg.endpoints[0].headers,
        [("X-Test".to_string(), "one".to_string())]
    );
}

#[test]
fn malformed_reference_table_is_refused_by_the_parser() {
    let hex = digest_hex(b"table");
    let good = format!("127.0.0.1:5000/lib/app@sha256:{hex}");
    assert!(Reference::parse(&good).is_ok());
    let table = malformed_references("127.0.0.1:5000", &hex);
    assert!(table.len() >= 15);
    for (id, why) in &table {
        assert!(
            looks_like_reference(id),
            "{why}: {id} is not even meant as a reference"
        );
        assert!(Reference::parse(id).is_err(), "{why}: {id} parsed");
        assert!(
            blobmgr::protocol::Request::get_blob(1, id).is_some(),
            "{why}: {id} does not fit"
        );
    }
}
