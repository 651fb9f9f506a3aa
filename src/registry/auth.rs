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

use super::transport::{self, redact, Answer as _, Failure, Http, Reply};
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
        let status = resp.code();
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
        let status = resp.code();
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

/// The realm of challenge `c` (sent by `from`): an http(s) URL, and not
/// plain `http://` when `from` is `https://`, since the realm gets the
/// registry's credentials (Basic, or an identity token) in the clear.
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
        Ok(u) if u.scheme() == "http" && from.scheme() == "https" => Err(bad(format!(
            "token realm {:?} is plain http for an https registry",
            u.origin().ascii_serialization()
        ))),
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
#[path = "auth_tests.rs"]
mod tests;
