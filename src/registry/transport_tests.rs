//! Tests of `transport`.

use super::*;
use crate::registry::proxy::ProxyEnv;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;

/// A loopback server on `ip` that takes exactly `answers.len()`
/// connections, reads one request head from each and writes the next
/// canned answer. Joining it gives the request heads.
fn serve(ip: &str, answers: Vec<String>) -> (Url, JoinHandle<Vec<String>>) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let base = Url::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
    let h = std::thread::spawn(move || {
        let mut heads = Vec::new();
        for a in answers {
            let (mut s, _, head) = accept_request(&l);
            s.write_all(a.as_bytes()).unwrap();
            heads.push(head);
        }
        heads
    });
    (base, h)
}

/// Accepts one connection on `l` and reads its request head: the stream
/// to answer on, a reader of what the client sends next, and the head.
fn accept_request(l: &TcpListener) -> (TcpStream, BufReader<TcpStream>, String) {
    let (s, _) = l.accept().unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    while r.read_line(&mut head).unwrap() > 2 {}
    (s, r, head)
}

fn answer(status: &str, headers: &str) -> String {
    format!("HTTP/1.1 {status}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

fn http(timeout_ms: u64) -> Http {
    Http::new(&RegistryOptions {
        timeout: Duration::from_millis(timeout_ms),
        retries: 2,
        backoff: Duration::from_millis(1),
        ..RegistryOptions::default()
    })
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// `follow` against `answers`, expecting a failure.
fn follow_fails(answers: Vec<String>) -> Failure {
    let (base, server) = serve("127.0.0.1", answers);
    let url = base.join("v2/r/blobs/x").unwrap();
    let err = http(5000)
        .follow("GET", &url, None, None, &base, soon())
        .err()
        .expect("a failure");
    server.join().unwrap();
    err
}

#[test]
fn redirect_problems_are_typed() {
    let f = follow_fails(vec![answer("302 Found", "")]);
    assert!(!f.retry);
    assert!(matches!(
        f.err,
        BackendError::Redirect {
            problem: RedirectProblem::NoLocation { status: 302 },
            ..
        }
    ));
    let f = follow_fails(vec![
        answer(
            "307 Temporary Redirect",
            "Location: /loop?sig=s\r\n"
        );
        6
    ]);
    let msg = f.err.to_string();
    assert!(matches!(
        f.err,
        BackendError::Redirect {
            problem: RedirectProblem::TooMany {
                limit: MAX_REDIRECTS
            },
            ..
        }
    ));
    assert!(msg.contains("/loop") && !msg.contains("sig"), "{msg}");
    let f = follow_fails(vec![answer("302 Found", "Location: ftp://h/b?sig=s\r\n")]);
    match f.err {
        BackendError::Redirect {
            problem: RedirectProblem::BadLocation(loc),
            ..
        } => assert_eq!(loc, "ftp://h/b"),
        e => panic!("{e}"),
    }
}

#[test]
fn credentials_stay_on_the_origin_and_the_range_follows() {
    let (storage, s) = serve("127.0.0.2", vec![answer("206 Partial Content", "")]);
    let loc = format!("Location: {}blob?sig=s\r\n", storage);
    let (base, r) = serve("127.0.0.1", vec![answer("302 Found", &loc)]);
    let url = base.join("v2/r/blobs/x").unwrap();
    let reply = http(5000)
        .follow("GET", &url, Some((5, 9)), Some("Bearer t"), &base, soon())
        .expect("followed");
    assert_eq!(reply.resp.code(), 206);
    assert!(!reply.on_origin);
    let (at_registry, at_storage) = (r.join().unwrap(), s.join().unwrap());
    let has = |h: &str, what: &str| h.to_ascii_lowercase().contains(what);
    assert!(has(&at_registry[0], "authorization: bearer t"));
    assert!(has(&at_registry[0], "range: bytes=5-9"));
    assert!(!has(&at_storage[0], "authorization"), "{}", at_storage[0]);
    assert!(has(&at_storage[0], "range: bytes=5-9"));
}

#[test]
fn statuses_become_typed_errors() {
    let reply_for = |status: &str, headers: &str| {
        let (base, server) = serve("127.0.0.1", vec![answer(status, headers)]);
        let url = base.join("v2/r/blobs/x?sig=s").unwrap();
        let reply = http(5000)
            .follow("GET", &url, None, None, &base, soon())
            .unwrap();
        server.join().unwrap();
        reply
    };
    let f = status_failure(reply_for("503 Busy", "Retry-After: 2\r\n"), None);
    assert!(f.retry);
    assert_eq!(f.after, Some(Duration::from_secs(2)));
    match &f.err {
        BackendError::Status { status: 503, url } => assert!(!url.contains("sig"), "{url}"),
        e => panic!("{e}"),
    }
    let f = status_failure(reply_for("403 Forbidden", ""), None);
    assert!(!f.retry);
    assert!(matches!(
        f.err,
        BackendError::AccessDenied { status: 403, .. }
    ));
    let f = status_failure(reply_for("404 Not Found", ""), None);
    assert!(matches!(f.err, BackendError::NotFound));
    let f = status_failure(reply_for("416 Range Not Satisfiable", ""), Some((10, 19)));
    assert!(matches!(
        f.err,
        BackendError::ShortRead {
            expected: 10,
            got: 0
        }
    ));
    let f = status_failure(reply_for("418 Teapot", ""), None);
    assert!(!f.retry);
    assert!(matches!(f.err, BackendError::Status { status: 418, .. }));
}

#[test]
fn transport_errors_keep_their_source_and_are_retried() {
    // A port nothing listens on any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = Url::parse(&format!("http://127.0.0.1:{port}/v2/r?sig=s")).unwrap();
    let f = http(5000).call("GET", &url, &[], soon()).err().unwrap();
    assert!(f.retry);
    let msg = f.err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}/v2/r")), "{msg}");
    assert!(!msg.contains("sig"), "{msg}");
    let source = std::error::Error::source(&f.err).expect("a source");
    assert!(source.downcast_ref::<ureq::Error>().is_some());
    assert!(matches!(f.err, BackendError::Transport { .. }));
}

#[test]
fn a_refused_server_certificate_is_not_retried() {
    let url = Url::parse("https://127.0.0.1:1/v2/").unwrap();
    let transport = |inner: io::Error| ureq::Error::from(inner);
    let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
    let f = transport_failure(
        &url,
        transport(io::Error::new(io::ErrorKind::InvalidData, refused)),
    );
    assert!(!f.retry);
    let msg = f.err.to_string();
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    // Other I/O failures are retried.
    let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
    assert!(transport_failure(&url, transport(reset)).retry);
}

#[test]
fn a_server_that_never_answers_is_a_timeout() {
    // Connections complete in the kernel's backlog; nothing answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = Url::parse(&format!("http://{}/v2/", l.local_addr().unwrap())).unwrap();
    // The request's deadline (as `with_retries` sets it) bounds the wait.
    let deadline = Instant::now() + Duration::from_millis(300);
    let f = http(300).call("GET", &url, &[], deadline).err().unwrap();
    assert!(f.retry);
    assert!(matches!(f.err, BackendError::Timeout(_)), "{}", f.err);
    // No time left: not even sent.
    let f = http(300)
        .call("GET", &url, &[], Instant::now())
        .err()
        .unwrap();
    assert!(!f.retry);
    assert!(matches!(f.err, BackendError::Timeout(_)), "{}", f.err);
}

#[test]
fn through_a_proxy_http_goes_in_absolute_form_with_its_query_and_https_by_connect() {
    let (proxy, heads) = serve(
        "127.0.0.1",
        vec![answer("200 OK", ""), answer("502 Bad Gateway", "")],
    );
    // A proxy with a login: it goes with both kinds of request.
    let with_login = proxy.as_str().replacen("http://", "http://user:pass@", 1);
    let with_login = with_login.trim_end_matches('/').to_owned();
    let h = Http::new(&RegistryOptions {
        proxy: ProxyEnv::new(Some(with_login.clone()), Some(with_login), ""),
        ..RegistryOptions::default()
    });
    // Hosts that do not resolve: only the proxy is asked.
    let realm = "http://realm.invalid:5001/token?service=reg&scope=repository%3Aa%3Apull";
    let resp = h
        .call("GET", &Url::parse(realm).unwrap(), &[], soon())
        .expect("an answer from the proxy");
    assert_eq!(resp.code(), 200);
    let https = Url::parse("https://reg.invalid/v2/").unwrap();
    let f = h.call("GET", &https, &[], soon()).err().unwrap();
    assert!(matches!(f.err, BackendError::Transport { .. }), "{}", f.err);
    let heads = heads.join().unwrap();
    assert!(
        heads[0].starts_with(&format!("GET {realm} HTTP/1.1\r\n")),
        "{}",
        heads[0]
    );
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("\r\nhost: realm.invalid:5001\r\n"),
        "{}",
        heads[0]
    );
    assert!(
        heads[1].starts_with("CONNECT reg.invalid:443 HTTP/1.1\r\n"),
        "{}",
        heads[1]
    );
    // base64("user:pass")
    for head in &heads {
        assert!(
            head.contains("\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n"),
            "{head}"
        );
    }
}

#[test]
fn a_short_body_is_not_retried_and_a_cut_or_stalled_one_is() {
    let copy = |answer: &'static [u8], hold: bool, timeout_ms: u64| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/b", l.local_addr().unwrap())).unwrap();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _, _) = accept_request(&l);
            s.write_all(answer).unwrap();
            if hold {
                // Open until the client gave up.
                let _ = wait.recv();
            }
        });
        let h = http(timeout_ms);
        let resp = h
            .call(
                "GET",
                &url,
                &[],
                Instant::now() + Duration::from_millis(timeout_ms),
            )
            .unwrap();
        let dst = tempfile::tempfile().unwrap();
        let r = copy_body(resp, 0, &dst, 0, 100, "GET b");
        drop(done);
        server.join().unwrap();
        r.expect_err("a failure")
    };
    let short = |f: &Failure| {
        !f.retry
            && matches!(
                f.err,
                BackendError::ShortRead {
                    expected: 100,
                    got: 10
                }
            )
    };
    // A whole body of 10 bytes where 100 were asked for.
    let f = copy(
        b"HTTP/1.1 206 OK\r\nContent-Length: 10\r\n\r\n0123456789",
        false,
        5000,
    );
    assert!(short(&f), "{f:?}");
    // Content-Length 100, 10 bytes, then the server closes: the connection
    // broke, not the body (ureq 3 reports a reset the same way).
    let f = copy(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        false,
        5000,
    );
    assert!(f.retry, "{f:?}");
    assert!(matches!(f.err, BackendError::Io(..)), "{}", f.err);
    // The same, but the connection stays open: the request's deadline.
    let f = copy(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        true,
        300,
    );
    assert!(f.retry);
    assert!(matches!(f.err, BackendError::Timeout(_)), "{}", f.err);
}

#[test]
fn a_connection_reset_or_closed_mid_body_is_retried_and_the_fill_completes() {
    let body: Vec<u8> = (0..100u8).collect();
    for reset in [true, false] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}/b", l.local_addr().unwrap())).unwrap();
        let sent = body.clone();
        let (headed, head_read) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            for attempt in 0..2 {
                let (mut s, mut r, mut line) = accept_request(&l);
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                    .unwrap();
                if attempt == 1 {
                    s.write_all(&sent).unwrap();
                    // Until the client is done with the connection.
                    let _ = r.read_line(&mut line);
                    continue;
                }
                s.write_all(&sent[..40]).unwrap();
                // Broken once the client has the head: in the body.
                head_read.recv().unwrap();
                if reset {
                    // SO_LINGER 0: the close sends a RST.
                    let linger = nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
                        .unwrap();
                }
            }
        });
        let h = http(5000);
        let dst = tempfile::tempfile().unwrap();
        let mut attempts = 0;
        h.with_retries("GET b", |deadline| {
            attempts += 1;
            let resp = h.call("GET", &url, &[], deadline)?;
            if attempts == 1 {
                headed.send(()).unwrap();
            }
            copy_body(resp, 0, &dst, 0, 100, "GET b")
        })
        .unwrap_or_else(|e| panic!("reset {reset}: {e}"));
        drop(h);
        server.join().unwrap();
        assert_eq!(attempts, 2, "reset {reset}");
        let mut got = vec![0u8; 100];
        dst.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, body, "reset {reset}");
    }
}

#[test]
fn only_transient_failures_are_retried() {
    let h = http(1000);
    let mut n = 0;
    let r: Result<(), _> = h.with_retries("t", |_| {
        n += 1;
        Err(Failure::transient(BackendError::Timeout("t".into())))
    });
    assert!(matches!(r, Err(BackendError::Timeout(_))));
    assert_eq!(n, 3, "the first attempt and two retries");
    let mut n = 0;
    let r: Result<(), _> = h.with_retries("t", |_| {
        n += 1;
        Err(Failure::fatal(BackendError::NotFound))
    });
    assert!(matches!(r, Err(BackendError::NotFound)));
    assert_eq!(n, 1);
    let mut n = 0;
    let r = h.with_retries("t", |_| {
        n += 1;
        if n < 3 {
            Err(Failure::transient(BackendError::Timeout("t".into())))
        } else {
            Ok(n)
        }
    });
    assert_eq!(r.unwrap(), 3);
}

#[test]
fn backoff_grows_and_is_capped() {
    let b = Duration::from_millis(100);
    assert!(backoff(b, 0) <= Duration::from_millis(125));
    assert!(backoff(b, 3) >= Duration::from_millis(600));
    assert!(backoff(b, 30) <= Duration::from_millis(6250));
}

#[test]
fn urls_in_errors_lose_query_and_user_info() {
    let u = Url::parse("https://u:p@cdn.example:8443/b/blob?sig=SECRET#f").unwrap();
    assert_eq!(redact(&u), "https://cdn.example:8443/b/blob");
    let a = Url::parse("http://reg:80/v2/").unwrap();
    assert!(same_origin(&a, &Url::parse("http://reg/x").unwrap()));
    assert!(!same_origin(&a, &Url::parse("https://reg/x").unwrap()));
    assert!(!same_origin(&a, &Url::parse("http://reg:81/x").unwrap()));
    assert!(!same_origin(&a, &Url::parse("http://other/x").unwrap()));
}

#[test]
fn proxy_urls_in_logs_never_show_a_password() {
    for (given, shown) in [
        ("http://alice:s3cret@proxy:3128", "http://proxy:3128"),
        ("alice:pa/s3cret@proxy:3128", "proxy:3128"),
        (
            "socks5://alice:a@b@proxy:1080/x?token=s3cret",
            "socks5://proxy:1080/x",
        ),
        ("proxy:3128", "proxy:3128"),
        ("https://proxy.example/#s3cret", "https://proxy.example/"),
    ] {
        let r = redact_str(given);
        assert_eq!(r, shown, "{given}");
        assert!(!r.contains("s3cret") && !r.contains("alice"), "{r}");
    }
}

/// Review finding: the proxy was chosen once, for the endpoint's URL, and
/// used for every host the agent reached, so `NO_PROXY` did not apply to a
/// redirect target (an object store, a CDN). Now each request gets the
/// proxy of its own URL.
#[test]
fn a_redirect_to_a_host_no_proxy_names_goes_direct() {
    let (cdn, cdn_heads) = serve("127.0.0.1", vec![answer("200 OK", "")]);
    let blob = cdn.join("blob").unwrap();
    let (proxy, proxy_heads) = serve(
        "127.0.0.1",
        vec![answer(
            "307 Temporary Redirect",
            &format!("Location: {blob}\r\n"),
        )],
    );
    let proxy = proxy.as_str().trim_end_matches('/').to_owned();
    let h = Http::new(&RegistryOptions {
        timeout: Duration::from_millis(3000),
        proxy: ProxyEnv::new(Some(proxy), None, "127.0.0.1"),
        ..RegistryOptions::default()
    });
    // The registry's name does not resolve: only the proxy can reach it.
    let origin = Url::parse("http://reg.invalid/").unwrap();
    let url = origin.join("v2/r/blobs/x").unwrap();
    let reply = h
        .follow("GET", &url, None, None, &origin, soon())
        .expect("the CDN's answer");
    assert_eq!(reply.resp.code(), 200);
    let via_proxy = proxy_heads.join().unwrap();
    assert!(
        via_proxy[0].starts_with(&format!("GET {url} HTTP/1.1\r\n")),
        "{}",
        via_proxy[0]
    );
    let direct = cdn_heads.join().unwrap();
    assert!(
        direct[0].starts_with("GET /blob HTTP/1.1\r\n"),
        "{}",
        direct[0]
    );
}
