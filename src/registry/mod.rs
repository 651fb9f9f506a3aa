//! A [`Backend`] that pulls blobs by range from one repository of an OCI
//! distribution registry (`/v2/<repo>/blobs/<digest>`), and checks every
//! completed blob against its digest.
//!
//! Everything here runs on worker threads and blocks; the reactor never
//! calls into this module. The parts, one concept per file:
//!
//! - this file: [`Registry`] itself (URL checks, the [`Backend`] methods)
//!   and its [`RegistryOptions`];
//! - `transport`: HTTP with per-request deadlines, retries with exponential
//!   backoff (connection errors, timeouts, 429, 5xx), redirects followed by
//!   hand so that credentials only ever go to the registry's own origin,
//!   and the copy of a range's body into the cache file;
//! - `auth`: anonymous, basic, or the registry token flow (a 401 carrying a
//!   `Bearer` challenge sends us to the token realm; the token is cached
//!   until it expires);
//! - `digest`: the canonical form of a blob id and the sha256 check;
//! - `tls`: an endpoint's extra CA certificates and `skip_verify`, as the
//!   rustls config of its agent;
//! - `proxy`: the proxy variables, and `http://` URLs sent through an HTTP
//!   proxy in absolute form;
//! - `resolver`: host names looked up on the worker's own thread.
//!
//! See docs/BACKENDS.md.

mod auth;
mod clients;
mod digest;
pub mod proxy;
mod ranges;
pub mod registries;
mod resolver;
pub mod tls;
mod transport;

pub use digest::canonical_digest;
pub use registries::{Registries, RegistriesConfig};
pub use tls::Tls;

use crate::backend::{Backend, BackendError, EndpointStats};
use auth::Auth;
use ranges::{RangeModes, Turn};
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transport::{Answer as _, Failure, Http, Reply};
use url::Url;

/// Default per-request deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of retries after the first attempt.
pub const DEFAULT_RETRIES: u32 = 3;

/// Settings of a registry backend besides its URL.
#[derive(Clone)]
pub struct RegistryOptions {
    /// Deadline of one HTTP request: connecting, headers and body.
    pub timeout: Duration,
    /// Time allowed for one backend call (a size or a fill) with all its
    /// retries; `None` bounds it only by the retry count.
    pub call_budget: Option<Duration>,
    /// Retries after a failed first attempt (connection errors, timeouts,
    /// 429, 5xx); 0 disables retrying.
    pub retries: u32,
    /// First backoff delay; doubles on each retry (with jitter).
    pub backoff: Duration,
    /// Basic credentials: user name and password.
    pub credentials: Option<(String, String)>,
    /// An OAuth2 refresh token (Docker config's `identitytoken`): traded at
    /// the token realm for an access token (see `auth`). Takes the place of
    /// `credentials` there.
    pub identity_token: Option<String>,
    /// The proxy settings: each request (the registry, a redirect target,
    /// a token realm) goes through the proxy they give its own URL.
    pub proxy: proxy::ProxyEnv,
    /// Extra headers sent to the registry (hosts.toml `header`).
    pub headers: Vec<(String, String)>,
    /// The TLS config of the endpoint's agent (see [`Tls`]); `None`: ureq's
    /// default (the built-in roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            timeout: DEFAULT_TIMEOUT,
            call_budget: None,
            retries: DEFAULT_RETRIES,
            backoff: Duration::from_millis(100),
            credentials: None,
            identity_token: None,
            proxy: proxy::ProxyEnv::default(),
            headers: Vec::new(),
            tls: None,
        }
    }
}

impl fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("RegistryOptions")
            .field("timeout", &self.timeout)
            .field("call_budget", &self.call_budget)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("identity_token", &self.identity_token.is_some())
            .field("proxy", &self.proxy.is_set())
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The blobs of one repository of an OCI registry.
pub struct Registry {
    /// `scheme://host[:port]/`
    base: Url,
    /// The API root blob paths are relative to (`base` + `v2/`, or a
    /// mirror's override path).
    root: Url,
    repo: String,
    http: Http,
    auth: Auth,
    warned_no_range: AtomicBool,
    counters: crate::backend::EndpointCounters,
    modes: RangeModes,
}

fn invalid_input(ctx: impl Into<String>, msg: &str) -> BackendError {
    BackendError::Io(ctx.into(), io::Error::new(io::ErrorKind::InvalidInput, msg))
}

impl Registry {
    /// Parses `http(s)://HOST[:PORT]/REPOSITORY`. Nothing is sent until a
    /// blob is asked for, so the daemon starts (and serves its cache) while
    /// the registry is down.
    pub fn new(spec: &str, opts: RegistryOptions) -> Result<Registry, String> {
        let url = Url::parse(spec).map_err(|e| format!("{spec}: {e}"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!("{spec}: only http:// and https:// are supported"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{spec}: no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{spec}: credentials do not belong in the URL; use --registry-user and \
                 --registry-password-file"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{spec}: a query or fragment is not allowed"));
        }
        let repo = url.path().trim_matches('/').to_string();
        if !valid_repository(&repo) {
            return Err(format!(
                "{spec}: {repo:?} is not a repository name (lowercase [a-z0-9._-] components \
                 separated by /)"
            ));
        }
        let mut base = url.clone();
        base.set_path("/v2/");
        Registry::endpoint(base, &repo, &opts)
    }

    /// The repository `repo` behind the API root `root` (`…/v2/`, or the
    /// path a mirror's `override_path` gives).
    pub fn endpoint(root: Url, repo: &str, opts: &RegistryOptions) -> Result<Registry, String> {
        if opts.timeout.is_zero() {
            return Err("the backend timeout must be positive".into());
        }
        let mut root = root;
        if !root.path().ends_with('/') {
            let path = format!("{}/", root.path());
            root.set_path(&path);
        }
        let mut base = root.clone();
        base.set_path("/");
        Ok(Registry {
            base,
            root,
            auth: Auth::new(
                opts.credentials.as_ref(),
                opts.identity_token.as_deref(),
                repo,
            ),
            repo: repo.to_owned(),
            http: Http::new(opts),
            warned_no_range: AtomicBool::new(false),
            counters: Default::default(),
            modes: RangeModes::default(),
        })
    }

    /// The endpoint's name in metrics and logs: scheme and authority.
    pub fn origin(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    /// Forgets that `digest` was received whole (its bytes did not verify
    /// and were thrown away): the next request fetches again.
    pub fn forget_whole(&self, digest: &str) {
        self.modes.failed(digest);
    }

    /// Calls made and bytes received so far.
    pub fn stats(&self) -> EndpointStats {
        self.counters.snapshot(self.origin())
    }

    /// HTTP requests sent so far (every attempt, redirect hop and token
    /// request counts).
    pub fn requests(&self) -> u64 {
        self.http.requests()
    }

    /// The repository served.
    pub fn repository(&self) -> &str {
        &self.repo
    }

    fn blob_url(&self, digest: &str) -> Result<Url, BackendError> {
        self.root
            .join(&format!("{}/blobs/{digest}", self.repo))
            .map_err(|e| invalid_input("blob URL", &e.to_string()))
    }

    fn digest_of(id: &str) -> Result<String, BackendError> {
        canonical_digest(id)
            .ok_or_else(|| invalid_input(format!("blob id {id:?}"), "not a sha256 digest"))
    }

    /// Sends one request to the registry: follows redirects (credentials
    /// only to the registry's origin), answers one 401 by authenticating,
    /// and classifies failures. Returns a 2xx answer.
    fn send(
        &self,
        method: &str,
        url: &Url,
        range: Option<(u64, u64)>,
        deadline: Instant,
    ) -> Result<Reply, Failure> {
        let mut answered = false;
        loop {
            let sent = self.auth.current();
            let auth = sent.header.as_deref();
            let reply = self
                .http
                .follow(method, url, range, auth, &self.base, deadline)?;
            match reply.resp.code() {
                200..=299 => return Ok(reply),
                401 if reply.on_origin && !answered => {
                    answered = true;
                    self.auth.answer(&self.http, reply, &sent, deadline)?;
                }
                _ => return Err(transport::status_failure(reply, range)),
            }
        }
    }

    /// One attempt at [`Backend::blob_size`]: HEAD the blob, check any
    /// Docker-Content-Digest against `digest`, take the Content-Length.
    fn head_size(
        &self,
        url: &Url,
        digest: &str,
        ctx: &str,
        deadline: Instant,
    ) -> Result<u64, Failure> {
        let reply = self.send("HEAD", url, None, deadline)?;
        if let Some(d) = reply.resp.header("Docker-Content-Digest") {
            if d.trim() != digest {
                return Err(Failure::fatal(BackendError::Integrity(format!(
                    "{ctx}: registry says the blob is {d}"
                ))));
            }
        }
        let size = reply
            .resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        size.ok_or_else(|| bad_response(reply, "no valid Content-Length".into()))
    }

    /// Writes at least bytes `[offset, offset + len)` of `digest` into
    /// `dst`; returns what was written (the whole blob when the endpoint
    /// ignores ranges). See `ranges` for how requests share that knowledge.
    fn read_extent(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
        dst: &File,
    ) -> Result<(u64, u64), BackendError> {
        let url = self.blob_url(digest)?;
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| invalid_input("range", "overflow"))?;
        let ctx = format!("GET {url} bytes={offset}-{last}");
        let file = ranges::file_id(dst);
        let probe = match self.modes.enter(digest, file, self.http.timeout()) {
            Turn::Whole(size) => return Ok((0, size)),
            Turn::Probe => true,
            Turn::Ranged => false,
        };
        let r = self.http.with_retries(&ctx, |deadline| {
            self.get_range(&url, digest, (offset, last), dst, &ctx, deadline)
        });
        match (&r, probe) {
            (Ok(Got::Whole(size)), true) => self.modes.whole_done(digest, file, *size),
            (Ok(Got::Range), true) => self.modes.ranged(digest),
            (Err(_), true) => self.modes.failed(digest),
            _ => {}
        }
        r.map(|got| match got {
            Got::Range => (offset, offset + len),
            Got::Whole(size) => (0, size),
        })
    }

    /// One attempt at a ranged GET of bytes `offset..=last` into `dst` at
    /// the same offsets. A 200 (the endpoint ignores Range) with a length is
    /// written whole, so none of it is fetched again.
    fn get_range(
        &self,
        url: &Url,
        digest: &str,
        (offset, last): (u64, u64),
        dst: &File,
        ctx: &str,
        deadline: Instant,
    ) -> Result<Got, Failure> {
        let reply = self.send("GET", url, Some((offset, last)), deadline)?;
        let len = last - offset + 1;
        match reply.resp.code() {
            206 => {
                let Some(skip) = bytes_before(&reply.resp, offset) else {
                    let cr = reply.resp.header("Content-Range").unwrap_or("").to_owned();
                    return Err(bad_response(
                        reply,
                        format!("206 with Content-Range {cr:?}"),
                    ));
                };
                transport::copy_body(reply.resp, skip, dst, offset, len, ctx)?;
                Ok(Got::Range)
            }
            200 => self.whole_body(reply, digest, (offset, len), dst, ctx),
            s => Err(bad_response(reply, format!("HTTP {s} to a Range request"))),
        }
    }

    /// A 200 to a Range request: the whole blob. With a Content-Length it is
    /// written whole; without one, skipped to the range (slow, but right).
    fn whole_body(
        &self,
        reply: Reply,
        digest: &str,
        (offset, len): (u64, u64),
        dst: &File,
        ctx: &str,
    ) -> Result<Got, Failure> {
        let total = reply
            .resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        let file_len = dst.metadata().map_or(0, |m| m.len());
        match total {
            Some(size) if size >= offset + len && size == file_len => {
                self.modes.whole_started(digest);
                log::info!(
                    "{ctx}: the endpoint sent the whole blob ({size} bytes); keeping all of it"
                );
                transport::copy_body(reply.resp, 0, dst, 0, size, ctx)?;
                Ok(Got::Whole(size))
            }
            _ => {
                if !self.warned_no_range.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "{ctx}: the server ignored Range and sent the whole blob without a \
                         usable length; skipping to the offset (slow)"
                    );
                }
                transport::copy_body(reply.resp, offset, dst, offset, len, ctx)?;
                Ok(Got::Range)
            }
        }
    }
}

/// What a ranged GET wrote.
enum Got {
    /// The range asked for.
    Range,
    /// The whole blob, of this size.
    Whole(u64),
}

/// A fatal failure for a 2xx answer the backend cannot use.
fn bad_response(reply: Reply, problem: String) -> Failure {
    let url = transport::redact(&reply.url);
    transport::drain(reply.resp);
    Failure::fatal(BackendError::BadResponse { url, problem })
}

impl Backend for Registry {
    fn canonical_id(&self, id: &str) -> Option<String> {
        canonical_digest(id)
    }

    fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
        let digest = Self::digest_of(id)?;
        let url = self.blob_url(&digest)?;
        let ctx = format!("HEAD {url}");
        let r = self.http.with_retries(&ctx, |deadline| {
            self.head_size(&url, &digest, &ctx, deadline)
        });
        self.counters.record(&r, 0);
        r
    }

    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        self.read_into_extent(id, offset, len, dst).map(|_| ())
    }

    fn read_into_extent(
        &self,
        id: &str,
        offset: u64,
        len: u64,
        dst: &File,
    ) -> Result<(u64, u64), BackendError> {
        if len == 0 {
            return Ok((offset, offset));
        }
        let digest = Self::digest_of(id)?;
        let r = self.read_extent(&digest, offset, len, dst);
        let got = r.as_ref().map_or(0, |(a, b)| b - a);
        self.counters.record(&r, got);
        r
    }

    fn expected_sha256(&self, id: &str) -> Option<[u8; 32]> {
        digest::sha256_bytes(&Self::digest_of(id).ok()?)
    }

    fn integrity_failed(&self, id: &str) {
        if let Ok(digest) = Self::digest_of(id) {
            self.forget_whole(&digest);
        }
    }

    fn describe(&self) -> String {
        format!("registry:{}{}", self.base, self.repo)
    }

    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        vec![self.stats()]
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        log::info!("{}: {} HTTP requests", self.describe(), self.requests());
    }
}

/// How many body bytes of a ranged GET's answer precede `offset`: for a
/// 206, from its Content-Range (`None` if that is missing, malformed or
/// starts after `offset`).
fn bytes_before(resp: &transport::Response, offset: u64) -> Option<u64> {
    let (first, _) = parse_content_range(resp.header("Content-Range")?)?;
    (first <= offset).then(|| offset - first)
}

/// `bytes FIRST-LAST/TOTAL` → (FIRST, LAST).
///
/// Hand-written for a one-line grammar: `headers` has a typed
/// Content-Range but brings the `http`, `bytes`, `mime` and `sha1` crates
/// with it, and `http-range-header` parses only the request's `Range`.
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, _total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// Repository names of the distribution spec: lowercase alphanumeric
/// components joined by `.`, `_`, `__` or `-` runs, separated by `/`.
fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|&x| matches!(x, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn backend_urls_are_checked() {
        let o = RegistryOptions::default;
        let r = Registry::new("http://127.0.0.1:5000/library/busybox", o()).unwrap();
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(
            r.blob_url(&format!("sha256:{HEX}")).unwrap().as_str(),
            format!("http://127.0.0.1:5000/v2/library/busybox/blobs/sha256:{HEX}")
        );
        assert_eq!(
            r.describe(),
            "registry:http://127.0.0.1:5000/library/busybox"
        );
        assert!(Registry::new("https://reg.example/a/", o()).is_ok());
        for bad in [
            "ftp://h/r",
            "http://h/",
            "http://h",
            "http://u:p@h/r",
            "http://h/r?x=1",
            "http://h/Upper",
            "http://h/a//b",
            "http://h/-a",
            "not a url",
        ] {
            assert!(Registry::new(bad, o()).is_err(), "{bad} accepted");
        }
        let opts = RegistryOptions {
            credentials: Some(("u".into(), "secret".into())),
            ..o()
        };
        assert!(!format!("{opts:?}").contains("secret"));
        let opts = RegistryOptions {
            identity_token: Some("refresh-secret".into()),
            ..o()
        };
        assert!(!format!("{opts:?}").contains("refresh-secret"));
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("bytes 10-19/100"), Some((10, 19)));
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19)));
        assert_eq!(parse_content_range("bytes 19-10/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn the_expected_sha256_is_the_digest() {
        let r = Registry::new("http://127.0.0.1:1/r", RegistryOptions::default()).unwrap();
        // The empty blob's digest is HEX.
        let want: [u8; 32] = sha2::Sha256::digest(b"").into();
        assert_eq!(r.expected_sha256(HEX), Some(want));
        assert_eq!(r.expected_sha256("not-a-digest"), None);
    }
}
