//! Tests of `auth`.

use super::*;
use crate::backend::Backend;
use crate::registry::{Registry, RegistryOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::thread::JoinHandle;

#[test]
fn challenges_parse() {
    let c = parse_challenges(
        r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
    );
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].scheme, "Bearer");
    assert_eq!(c[0].param("realm"), Some("https://auth.example/token"));
    assert_eq!(c[0].param("SERVICE"), Some("reg"));
    assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
    let c = parse_challenges(r#"Basic realm="x \"y\"", Bearer realm=http://t/ , Negotiate"#);
    let schemes: Vec<&str> = c.iter().map(|c| c.scheme.as_str()).collect();
    assert_eq!(schemes, ["Basic", "Bearer", "Negotiate"]);
    assert_eq!(c[0].param("realm"), Some("x \"y\""));
    assert_eq!(c[1].param("realm"), Some("http://t/"));
    // Garbage never panics or loops.
    for g in [
        "",
        "=",
        "\"",
        "Bearer realm=\"unterminated",
        ",,,",
        "a=b=c",
        "B x=\\",
    ] {
        let _ = parse_challenges(g);
    }
}

#[test]
fn garbage_parses_as_before() {
    let show = |h: &str| -> Vec<(String, Vec<(String, String)>)> {
        parse_challenges(h)
            .into_iter()
            .map(|c| (c.scheme, c.params))
            .collect()
    };
    let s = |v: &str| v.to_string();
    assert_eq!(show(""), []);
    assert_eq!(show(",,,"), []);
    assert_eq!(show("="), []);
    assert_eq!(
        show("Bearer realm=\"unterminated"),
        [(s("Bearer"), vec![(s("realm"), s("unterminated"))])]
    );
    assert_eq!(
        show("a=b=c"),
        [(s("a"), vec![]), (s("b"), vec![]), (s("c"), vec![])]
    );
    assert_eq!(show("B x=\\"), [(s("B"), vec![(s("x"), s("\\"))])]);
    assert_eq!(show("B x=\"a\\\""), [(s("B"), vec![(s("x"), s("a\""))])]);
}

#[test]
fn token_responses_parse() {
    let keys = &["token", "access_token"];
    let (t, l) = parse_token(br#"{"token":"abc","expires_in":300}"#, keys).unwrap();
    assert_eq!((t.as_str(), l), ("abc", Duration::from_secs(300)));
    let (t, l) = parse_token(br#"{"access_token":"xyz"}"#, keys).unwrap();
    assert_eq!((t.as_str(), l), ("xyz", DEFAULT_TOKEN_LIFETIME));
    let (t, _) = parse_token(br#"{"token":"","access_token":"z"}"#, keys).unwrap();
    assert_eq!(t, "z");
    assert!(parse_token(br#"{"token":"a\nb"}"#, keys).is_err());
    assert!(parse_token(br#"{"nothing":1}"#, keys).is_err());
    assert!(parse_token(b"<html>", keys).is_err());
    // The OAuth2 answer: `access_token` only.
    let e = parse_token(br#"{"token":"t"}"#, &["access_token"]).unwrap_err();
    assert!(e.contains("access_token"), "{e}");
}

#[test]
fn base64_matches_rfc4648() {
    for (i, o) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(i.as_bytes()), o);
    }
}

#[test]
fn basic_credentials_are_encoded_and_sent_until_a_token_arrives() {
    let creds = ("admin".to_string(), "hunter2".to_string());
    let a = Auth::new(Some(&creds), None, "r");
    let sent = a.current();
    assert_eq!(sent.header.as_deref(), Some("Basic YWRtaW46aHVudGVyMg=="));
    assert_eq!(sent.generation, 0);
    assert_eq!(Auth::new(None, None, "r").current().header, None);
    // An identity token is for the token realm only.
    assert_eq!(Auth::new(None, Some("idt"), "r").current().header, None);
    *a.token() = Some(Token {
        value: "tok".into(),
        expires: Instant::now() + Duration::from_secs(60),
        generation: 1,
    });
    let sent = a.current();
    assert_eq!(sent.header.as_deref(), Some("Bearer tok"));
    assert_eq!(sent.generation, 1);
    // An expired token is no longer sent.
    a.token().as_mut().unwrap().expires = Instant::now();
    assert_eq!(
        a.current().header.as_deref(),
        Some("Basic YWRtaW46aHVudGVyMg==")
    );
}

#[test]
fn token_urls_carry_service_and_scope() {
    let from = Url::parse("https://reg.example/v2/r/blobs/x").unwrap();
    let c = parse_challenges(r#"Bearer realm="https://auth.example/token",service="reg""#);
    let u = token_url(&c[0], "repository:r:pull", &from).unwrap();
    assert_eq!(
        u.as_str(),
        "https://auth.example/token?service=reg&scope=repository%3Ar%3Apull"
    );
    for bad in [
        r#"Bearer service="reg""#,
        r#"Bearer realm="ftp://x/?sig=s""#,
    ] {
        let c = parse_challenges(bad);
        let e = token_url(&c[0], "s", &from).err().unwrap().err;
        assert!(matches!(e, BackendError::BadResponse { .. }), "{e}");
        assert!(!e.to_string().contains("sig="), "{e}");
    }
}

#[test]
fn refusals_name_the_scheme_never_the_secret() {
    let url = Url::parse("https://reg.example/v2/r/blobs/x?sig=abc").unwrap();
    let offered = parse_challenges("Basic realm=r");
    let e = unauthorized(&url, Some("Bearer s3cr3t"), &offered);
    let msg = e.to_string();
    assert!(msg.contains("bearer token was refused"), "{msg}");
    assert!(msg.contains("Basic"), "{msg}");
    assert!(!msg.contains("s3cr3t") && !msg.contains("sig="), "{msg}");
    let e = unauthorized(&url, Some("Basic YWRtaW46aHVudGVyMg=="), &offered);
    assert!(!e.to_string().contains("YWRt"), "{e}");
    assert!(matches!(e, BackendError::AccessDenied { status: 401, .. }));
}

/// One request a fake server saw: its head (request line and headers)
/// and its body.
struct Seen {
    head: String,
    body: String,
}

impl Seen {
    fn has_header(&self, line: &str) -> bool {
        let line = line.to_ascii_lowercase();
        self.head
            .lines()
            .any(|l| l.trim_end().to_ascii_lowercase() == line)
    }

    fn has_header_named(&self, name: &str) -> bool {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with(&prefix))
    }
}

/// A loopback server that takes exactly `answers.len()` connections,
/// reads one request from each (head and `Content-Length` body) and
/// writes the next answer; `answers` gets the server's base URL.
fn serve(answers: impl FnOnce(&Url) -> Vec<String>) -> (Url, JoinHandle<Vec<Seen>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = Url::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
    let answers = answers(&base);
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for a in answers {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            while r.read_line(&mut head).unwrap() > 2 {}
            let len = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            s.write_all(a.as_bytes()).unwrap();
            seen.push(Seen {
                head,
                body: String::from_utf8(body).unwrap(),
            });
        }
        seen
    });
    (base, h)
}

fn answer(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A 401 with a Bearer challenge whose realm is `base`'s `/token`.
fn challenge(base: &Url, params: &str) -> String {
    let h = format!("WWW-Authenticate: Bearer realm=\"{base}token\"{params}\r\n");
    answer("401 Unauthorized", &h, "")
}

/// The client of repository `app/one` at `base` with identity token
/// `token`.
fn client(base: &Url, token: &str) -> Registry {
    let opts = RegistryOptions {
        timeout: Duration::from_secs(10),
        backoff: Duration::from_millis(1),
        identity_token: Some(token.into()),
        ..RegistryOptions::default()
    };
    Registry::endpoint(base.join("v2/").unwrap(), "app/one", &opts).unwrap()
}

fn form(body: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A logger that records, at every level, what the threads inside
/// [`capture_logs`] log (this crate's and ureq's lines alike); other
/// threads' records are dropped.
struct Capture;

thread_local! {
    static CAPTURED: std::cell::RefCell<Option<Vec<String>>> =
        const { std::cell::RefCell::new(None) };
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        CAPTURED.with(|c| c.borrow().is_some())
    }

    fn log(&self, record: &log::Record<'_>) {
        CAPTURED.with(|c| {
            if let Some(lines) = c.borrow_mut().as_mut() {
                lines.push(format!("{} {}", record.target(), record.args()));
            }
        });
    }

    fn flush(&self) {}
}

/// Runs `f` with everything this thread logs captured → (its result,
/// the log lines).
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in unit tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let r = f();
    let lines = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (r, lines.join("\n"))
}

#[test]
fn an_identity_token_is_traded_for_an_access_token_by_oauth2() {
    // Characters that need form encoding.
    let token = "idt/refresh+token=1&x";
    let (base, server) = serve(|base| {
        vec![
            challenge(
                base,
                ",service=\"reg.test\",scope=\"repository:app/one:pull\"",
            ),
            answer(
                "200 OK",
                "Content-Type: application/json\r\n",
                r#"{"access_token":"acc-789","expires_in":300,"refresh_token":"rt2"}"#,
            ),
            answer("200 OK", "", ""),
        ]
    });
    let reg = client(&base, token);
    // The HEAD's answer says Content-Length: 0.
    let (size, log) = capture_logs(|| reg.blob_size(HEX));
    assert_eq!(size.unwrap(), 0);
    assert_eq!(reg.requests(), 3);
    // Debug lines of ours and ureq's were written, none with a token.
    assert!(log.contains("token request"), "{log}");
    assert!(log.contains("ureq"), "{log}");
    for secret in [token, "refresh%2Btoken", "acc-789"] {
        assert!(!log.contains(secret), "{secret} logged: {log}");
    }
    let seen = server.join().unwrap();
    assert!(seen[0].head.starts_with("HEAD /v2/app/one/blobs/sha256:"));
    assert!(
        !seen[0].has_header_named("authorization"),
        "{}",
        seen[0].head
    );

    let post = &seen[1];
    assert!(
        post.head.starts_with("POST /token HTTP/1.1\r\n"),
        "{}",
        post.head
    );
    assert!(post.has_header("content-type: application/x-www-form-urlencoded"));
    assert!(!post.has_header_named("authorization"), "{}", post.head);
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        form(&post.body),
        pairs(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
            ("service", "reg.test"),
            ("scope", "repository:app/one:pull"),
            ("client_id", "blobmgr"),
        ])
    );
    assert!(!post.body.contains(token), "the token went unencoded");

    assert!(seen[2].head.starts_with("HEAD /v2/app/one/blobs/sha256:"));
    assert!(
        seen[2].has_header("authorization: Bearer acc-789"),
        "{}",
        seen[2].head
    );
}

#[test]
fn a_refused_identity_token_is_access_denied_and_nothing_else_is_tried() {
    let token = "idt-revoked-4d2c";
    let (base, server) = serve(|base| {
        vec![
            // No scope: the repository's pull scope is asked for.
            challenge(base, ""),
            answer(
                "400 Bad Request",
                "Content-Type: application/json\r\n",
                r#"{"error":"invalid_grant"}"#,
            ),
        ]
    });
    let reg = client(&base, token);
    let e = reg.blob_size(HEX).unwrap_err();
    assert!(
        matches!(e, BackendError::AccessDenied { status: 400, .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("identity token"), "{msg}");
    assert!(!msg.contains(token), "{msg}");
    assert_eq!(reg.requests(), 2, "another flow was tried");
    let seen = server.join().unwrap();
    let pairs = form(&seen[1].body);
    assert!(pairs.contains(&("scope".into(), "repository:app/one:pull".into())));
    assert!(!pairs.iter().any(|(k, _)| k == "service"));
}

#[test]
fn an_oauth2_answer_without_access_token_is_a_bad_response() {
    let (base, server) = serve(|base| {
        vec![
            challenge(base, ",service=\"reg.test\""),
            answer("200 OK", "", r#"{"token":"not-oauth"}"#),
        ]
    });
    let e = client(&base, "idt").blob_size(HEX).unwrap_err();
    assert!(matches!(e, BackendError::BadResponse { .. }), "{e}");
    server.join().unwrap();
}

#[test]
fn an_https_registry_may_not_name_a_plain_http_token_realm() {
    let challenge = |realm: &str| parse_challenges(&format!(r#"Bearer realm="{realm}""#)).remove(0);
    let https = Url::parse("https://reg.example/v2/").unwrap();
    let http = Url::parse("http://127.0.0.1:5000/v2/").unwrap();
    let e = realm_url(&challenge("http://auth.example/token?x=secret"), &https).unwrap_err();
    let shown = e.err.to_string();
    assert!(shown.contains("plain http"), "{shown}");
    assert!(!shown.contains("secret"), "no query in the error: {shown}");
    assert!(realm_url(&challenge("https://auth.example/token"), &https).is_ok());
    // A plain-http registry may name either.
    assert!(realm_url(&challenge("http://127.0.0.1:5001/token"), &http).is_ok());
    assert!(realm_url(&challenge("https://auth.example/token"), &http).is_ok());
}
