//! Registry authentication: anonymous, basic, or the registry token flow.
//!
//! Requests go out with the current Authorization value (a cached bearer
//! token, else the basic credentials, else none). A 401 from the registry's
//! origin is answered once per request: a `Bearer` challenge sends us to the
//! token realm it names, and the token is cached until shortly before it
//! expires; concurrent workers that hit the same 401 fetch one token between
//! them. The realm is asked
//!
//! - with an identity token (Docker config's `identitytoken`, an OAuth2
//!   refresh token): by the distribution token spec's "OAuth2 token" flow, a
//!   `POST` of the form `grant_type=refresh_token`, `refresh_token`,
//!   `service`, `scope`, `client_id=blobmgr`, answered by JSON with
//!   `access_token`. Nothing else is tried when that fails;
//! - otherwise: a `GET` with `service` and `scope` as query parameters, with
//!   the basic credentials if any (as `docker login` does), answered by JSON
//!   with `token` or `access_token`.
//!
//! A `Basic` challenge after a stale token drops the token. Anything else is
//! [`BackendError::AccessDenied`]. Credentials and tokens never appear in an
//! error or a log line.

use super::transport::{self, redact, Failure, Http, Reply};
use crate::backend::BackendError;
use base64::Engine as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use url::Url;

/// Token lifetime when the token endpoint does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest token lifetime believed, in seconds (a year).
const MAX_TOKEN_LIFETIME: f64 = 86_400.0 * 365.0;
/// Stop using a token this long before the server does (at most half its
/// lifetime).
const TOKEN_MARGIN: Duration = Duration::from_secs(5);
/// The OAuth2 `client_id` sent with a refresh token.
const CLIENT_ID: &str = "blobmgr";

/// A bearer token and when to stop using it.
struct Token {
    value: String,
    expires: Instant,
    /// Bumped on every new token, so concurrent 401s fetch it only once.
    generation: u64,
}

/// The Authorization a request went out with.
pub(super) struct Sent {
    /// The header's value, if any.
    pub header: Option<String>,
    /// The token generation it came from (0 for none or basic).
    generation: u64,
}

/// The credentials of one registry backend and its cached token.
pub(super) struct Auth {
    /// `Basic <base64>` when credentials are configured.
    basic: Option<String>,
    /// An OAuth2 refresh token, traded at the token realm (see the module
    /// docs).
    identity_token: Option<String>,
    /// The token scope asked for when a challenge names none.
    default_scope: String,
    token: Mutex<Option<Token>>,
    /// Serialises token fetches.
    token_fetch: Mutex<()>,
}

impl Auth {
    /// Authentication for repository `repo` with optional basic
    /// `credentials` (user name, password) and an optional OAuth2 refresh
    /// token for the token realm.
    pub fn new(
        credentials: Option<&(String, String)>,
        identity_token: Option<&str>,
        repo: &str,
    ) -> Auth {
        Auth {
            basic: credentials
                .map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes()))),
            identity_token: identity_token.map(str::to_owned),
            default_scope: format!("repository:{repo}:pull"),
            token: Mutex::new(None),
            token_fetch: Mutex::new(()),
        }
    }

    fn token(&self) -> MutexGuard<'_, Option<Token>> {
        self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Authorization for the registry's origin right now.
    pub fn current(&self) -> Sent {
        if let Some(t) = self.token().as_ref() {
            if Instant::now() < t.expires {
                return Sent {
                    header: Some(format!("Bearer {}", t.value)),
                    generation: t.generation,
                };
            }
        }
        Sent {
            header: self.basic.clone(),
            generation: 0,
        }
    }

    /// Answers a 401 from the registry to a request sent with `sent`:
    /// `Ok` when the request should go again (with [`Auth::current`]),
    /// otherwise why not.
    pub fn answer(
        &self,
        http: &Http,
        reply: Reply,
        sent: &Sent,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let challenges: Vec<Challenge> = reply
            .resp
            .all("WWW-Authenticate")
            .into_iter()
            .flat_map(parse_challenges)
            .collect();
        transport::drain(reply.resp);
        let offers = |scheme: &str| {
            challenges
                .iter()
                .find(|c| c.scheme.eq_ignore_ascii_case(scheme))
        };
        if let Some(c) = offers("bearer") {
            return self.refresh_token(http, c, sent.generation, &reply.url, deadline);
        }
        if offers("basic").is_some() && self.basic.is_some() && sent.header != self.basic {
            // A stale bearer token was sent; basic is wanted.
            self.token().take();
            return Ok(());
        }
        Err(Failure::fatal(unauthorized(
            &reply.url,
            sent.header.as_deref(),
            &challenges,
        )))
    }

    /// Gets a token for challenge `c` (which `from` sent), unless another
    /// worker already replaced the token of generation `seen` while we
    /// waited.
    fn refresh_token(
        &self,
        http: &Http,
        c: &Challenge,
        seen: u64,
        from: &Url,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let _one_at_a_time = self.token_fetch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = self.token().as_ref() {
            if t.generation != seen && Instant::now() < t.expires {
                return Ok(());
            }
        }
        let (url, (value, lifetime)) = match &self.identity_token {
            Some(refresh) => {
                let url = realm_url(c, from)?;
                let got = self.oauth_token(http, c, &url, refresh, deadline)?;
                (url, got)
            }
            None => {
                let url = token_url(c, &self.default_scope, from)?;
                let got = self.fetch_token(http, &url, deadline)?;
                (url, got)
            }
        };
        let mut t = self.token();
        let generation = t.as_ref().map_or(0, |t| t.generation) + 1;
        let margin = (lifetime / 2).min(TOKEN_MARGIN);
        *t = Some(Token {
            value,
            expires: Instant::now() + lifetime - margin,
            generation,
        });
        log::debug!(
            "token request {}: token valid for {} s",
            redact(&url),
            lifetime.as_secs()
        );
        Ok(())
    }

    /// Asks the token endpoint `url` for a token → (token, lifetime).
    fn fetch_token(
        &self,
        http: &Http,
        url: &Url,
        deadline: Instant,
    ) -> Result<(String, Duration), Failure> {
        let mut headers = Vec::new();
        if let Some(b) = &self.basic {
            headers.push(("Authorization", b.as_str()));
        }
        let resp = http.call("GET", url, &headers, deadline)?;
        let status = resp.status();
        if status != 200 {
            transport::drain(resp);
            let url = redact(url);
            return Err(match status {
                401 | 403 => Failure::fatal(BackendError::AccessDenied {
                    status,
                    url,
                    reason: match self.basic {
                        Some(_) => "the token endpoint refused the credentials".into(),
                        None => "the token endpoint refused an anonymous request".into(),
                    },
                }),
                429 | 500..=599 => Failure::transient(BackendError::Status { status, url }),
                _ => Failure::fatal(BackendError::Status { status, url }),
            });
        }
        let body = transport::read_small_body(resp, &format!("token request {}", redact(url)))?;
        parse_token(&body, &["token", "access_token"]).map_err(|problem| {
            Failure::fatal(BackendError::BadResponse {
                url: redact(url),
                problem,
            })
        })
    }

    /// Trades `refresh` (an identity token) at the realm `url` for an
    /// access token for challenge `c` → (token, lifetime): the OAuth2 flow
    /// of the distribution token spec.
    fn oauth_token(
        &self,
        http: &Http,
        c: &Challenge,
        url: &Url,
        refresh: &str,
        deadline: Instant,
    ) -> Result<(String, Duration), Failure> {
        let scope = c.param("scope").unwrap_or(&self.default_scope);
        let mut form = vec![("grant_type", "refresh_token"), ("refresh_token", refresh)];
        if let Some(service) = c.param("service") {
            form.push(("service", service));
        }
        form.push(("scope", scope));
        form.push(("client_id", CLIENT_ID));
        let resp = http.post_form(url, &form, deadline)?;
        let status = resp.status();
        if status != 200 {
            transport::drain(resp);
            let url = redact(url);
            return Err(match status {
                // RFC 6749 5.2: invalid_grant (an expired or revoked token)
                // is a 400, invalid_client a 401.
                400 | 401 | 403 => Failure::fatal(BackendError::AccessDenied {
                    status,
                    url,
                    reason: "the token endpoint refused the identity token".into(),
                }),
                429 | 500..=599 => Failure::transient(BackendError::Status { status, url }),
                _ => Failure::fatal(BackendError::Status { status, url }),
            });
        }
        let body = transport::read_small_body(resp, &format!("token request {}", redact(url)))?;
        parse_token(&body, &["access_token"]).map_err(|problem| {
            Failure::fatal(BackendError::BadResponse {
                url: redact(url),
                problem,
            })
        })
    }
}

/// The realm of challenge `c` (sent by `from`): an http(s) URL.
fn realm_url(c: &Challenge, from: &Url) -> Result<Url, Failure> {
    let bad = |problem: String| {
        Failure::fatal(BackendError::BadResponse {
            url: redact(from),
            problem,
        })
    };
    let realm = c
        .param("realm")
        .ok_or_else(|| bad("Bearer challenge without a realm".into()))?;
    match Url::parse(realm) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(u),
        _ => {
            let shown = realm.split('?').next().unwrap_or_default();
            Err(bad(format!("bad token realm {shown:?}")))
        }
    }
}

/// The token endpoint's URL for challenge `c` (sent by `from`): its realm
/// with the `service` and `scope` as query parameters.
fn token_url(c: &Challenge, default_scope: &str, from: &Url) -> Result<Url, Failure> {
    let mut url = realm_url(c, from)?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = c.param("service") {
            q.append_pair("service", s);
        }
        q.append_pair("scope", c.param("scope").unwrap_or(default_scope));
    }
    Ok(url)
}

/// The error for a registry 401 we could not answer; `sent` is the
/// Authorization that was refused (only its scheme is told).
fn unauthorized(url: &Url, sent: Option<&str>, challenges: &[Challenge]) -> BackendError {
    let offered: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
    let what = match sent {
        Some(a) if a.starts_with("Bearer ") => "the bearer token was refused",
        Some(_) => "the credentials were refused",
        None => "authentication required and no credentials configured",
    };
    BackendError::AccessDenied {
        status: 401,
        url: redact(url),
        reason: format!("{what} (server offers {offered:?})"),
    }
}

/// A token endpoint's answer → (token, lifetime); the token is the first
/// non-empty string of the fields `keys`.
fn parse_token(body: &[u8], keys: &[&str]) -> Result<(String, Duration), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("token response is not JSON: {e}"))?;
    let token = keys
        .iter()
        .filter_map(|k| v.get(k).and_then(|t| t.as_str()))
        .find(|t| !t.is_empty())
        .ok_or_else(|| format!("token response has no {}", keys.join(" or ")))?;
    if token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("token has characters not allowed in a header".into());
    }
    let lifetime = match v.get("expires_in").and_then(|e| e.as_f64()) {
        Some(s) if s.is_finite() && s >= 1.0 => Duration::from_secs_f64(s.min(MAX_TOKEN_LIFETIME)),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    Ok((token.to_string(), lifetime))
}

/// Standard base64 with padding (RFC 4648 §4), as Basic credentials are
/// encoded.
fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `name` (case-insensitive).
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `Scheme a=b, c="d,e", Other x=y` into challenges, leniently:
/// garbage is skipped, never an error.
///
/// Hand-written on purpose. The small maintained crate for this,
/// `http-auth`, follows RFC 7235 strictly: it rejects the unquoted URL
/// values some registries send (`realm=http://t/`) and gives up on the rest
/// of the header at the first bad byte; `www-authenticate` is tied to
/// hyper 0.11 and url 1.
fn parse_challenges(h: &str) -> Vec<Challenge> {
    let mut c = Cursor {
        s: h.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        while c
            .peek()
            .is_some_and(|b| b.is_ascii_whitespace() || b == b',')
        {
            c.i += 1;
        }
        if c.peek().is_none() {
            break;
        }
        let scheme = c.token();
        if scheme.is_empty() {
            // Stray `=` or `"`: skip it rather than loop forever.
            c.i += 1;
            continue;
        }
        let mut ch = Challenge {
            scheme,
            params: Vec::new(),
        };
        while let Some(p) = c.param() {
            ch.params.push(p);
            c.skip_ws();
            if c.peek() != Some(b',') {
                break;
            }
            c.i += 1;
        }
        out.push(ch);
    }
    out
}

/// A position in a header being parsed.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    /// A run of characters that are not whitespace, `,`, `=` or `"`.
    fn token(&mut self) -> String {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|b| !(b.is_ascii_whitespace() || b == b',' || b == b'=' || b == b'"'))
        {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    /// A quoted string (at its opening quote), unescaped; an unterminated
    /// one runs to the end.
    fn quoted(&mut self) -> String {
        self.i += 1;
        let mut v = Vec::new();
        while let Some(b) = self.peek().filter(|&b| b != b'"') {
            let b = match (b, self.s.get(self.i + 1)) {
                (b'\\', Some(&next)) => {
                    self.i += 1;
                    next
                }
                _ => b,
            };
            v.push(b);
            self.i += 1;
        }
        self.i = (self.i + 1).min(self.s.len());
        String::from_utf8_lossy(&v).into_owned()
    }

    /// `name=value` or `name="value"`; `None` (and nothing consumed but
    /// whitespace) if what follows is not a parameter.
    fn param(&mut self) -> Option<(String, String)> {
        self.skip_ws();
        let save = self.i;
        let name = self.token();
        self.skip_ws();
        if name.is_empty() || self.peek() != Some(b'=') {
            self.i = save;
            return None;
        }
        self.i += 1;
        self.skip_ws();
        let value = if self.peek() == Some(b'"') {
            self.quoted()
        } else {
            self.token()
        };
        Some((name, value))
    }
}

#[cfg(test)]
mod tests {
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
}
