//! A [`Backend`] that pulls blobs by range from one repository of an OCI
//! distribution registry (`/v2/<repo>/blobs/<digest>`), and checks every
//! completed blob against its digest.
//!
//! Everything here runs on worker threads and blocks; the reactor never
//! calls into this module. One keep-alive [`ureq::Agent`] is shared by all
//! workers. Each request is retried a bounded number of times with
//! exponential backoff on connection errors, timeouts, 429 and 5xx.
//! Redirects are followed by hand so that credentials only ever go to the
//! registry's own origin (scheme, host and port). Authentication is
//! anonymous, basic, or the registry token flow (a 401 carrying a `Bearer`
//! challenge sends us to the token realm, the token is cached until it
//! expires). See docs/BACKENDS.md.

use crate::backend::{Backend, BackendError};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use url::Url;

/// Default per-request deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of retries after the first attempt.
pub const DEFAULT_RETRIES: u32 = 3;
/// Redirect hops followed per request.
const MAX_REDIRECTS: u32 = 5;
/// Token lifetime when the token endpoint does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Largest token response or error body read.
const MAX_SMALL_BODY: u64 = 1 << 20;
/// Longest wait a server's Retry-After can impose on a worker.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Buffer for copying response bodies into the cache file.
const COPY_BUF: usize = 256 << 10;

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
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            timeout: DEFAULT_TIMEOUT,
            call_budget: None,
            retries: DEFAULT_RETRIES,
            backoff: Duration::from_millis(100),
            credentials: None,
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
            .finish()
    }
}

/// A bearer token and when to stop using it.
struct Token {
    value: String,
    expires: Instant,
    /// Bumped on every new token, so concurrent 401s fetch it only once.
    generation: u64,
}

/// The blobs of one repository of an OCI registry.
pub struct Registry {
    /// `scheme://host[:port]/`
    base: Url,
    repo: String,
    agent: ureq::Agent,
    opts: RegistryOptions,
    /// `Basic <base64>` when credentials are configured.
    basic: Option<String>,
    token: Mutex<Option<Token>>,
    /// Serialises token fetches.
    token_fetch: Mutex<()>,
    requests: AtomicU64,
    warned_no_range: AtomicBool,
}

/// A failed attempt: the error, and whether (and how soon) to try again.
struct Failure {
    err: BackendError,
    retry: bool,
    after: Option<Duration>,
}

impl Failure {
    fn fatal(err: BackendError) -> Failure {
        Failure {
            err,
            retry: false,
            after: None,
        }
    }

    fn transient(err: BackendError) -> Failure {
        Failure {
            err,
            retry: true,
            after: None,
        }
    }
}

impl From<BackendError> for Failure {
    fn from(err: BackendError) -> Failure {
        Failure::fatal(err)
    }
}

fn io_err(ctx: impl Into<String>, kind: io::ErrorKind, msg: impl Into<String>) -> BackendError {
    BackendError::Io(ctx.into(), io::Error::new(kind, msg.into()))
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
        if url.host_str().map_or(true, str::is_empty) {
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
        base.set_path("/");
        if opts.timeout.is_zero() {
            return Err("the backend timeout must be positive".into());
        }
        let agent = ureq::AgentBuilder::new()
            // Redirects are followed by hand: see `send`.
            .redirects(0)
            .timeout_connect(opts.timeout)
            .timeout_read(opts.timeout)
            .timeout_write(opts.timeout)
            .max_idle_connections_per_host(64)
            .user_agent(concat!("blobmgr/", env!("CARGO_PKG_VERSION")))
            .build();
        let basic = opts
            .credentials
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes())));
        Ok(Registry {
            base,
            repo,
            agent,
            opts,
            basic,
            token: Mutex::new(None),
            token_fetch: Mutex::new(()),
            requests: AtomicU64::new(0),
            warned_no_range: AtomicBool::new(false),
        })
    }

    /// HTTP requests sent so far (every attempt, redirect hop and token
    /// request counts).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The repository served.
    pub fn repository(&self) -> &str {
        &self.repo
    }

    fn blob_url(&self, digest: &str) -> Result<Url, BackendError> {
        self.base
            .join(&format!("v2/{}/blobs/{digest}", self.repo))
            .map_err(|e| io_err("blob URL", io::ErrorKind::InvalidInput, e.to_string()))
    }

    fn digest_of(id: &str) -> Result<String, BackendError> {
        canonical_digest(id).ok_or_else(|| {
            io_err(
                format!("blob id {id:?}"),
                io::ErrorKind::InvalidInput,
                "not a sha256 digest",
            )
        })
    }

    /// Runs `attempt` (given the deadline of its request) until it
    /// succeeds, fails for good, or the retries or the call's time budget
    /// are used up.
    fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut(Instant) -> Result<T, Failure>,
    ) -> Result<T, BackendError> {
        let start = Instant::now();
        let call_end = self.opts.call_budget.map(|b| start + b);
        let mut n = 0u32;
        loop {
            let now = Instant::now();
            let mut deadline = now + self.opts.timeout;
            if let Some(end) = call_end {
                deadline = deadline.min(end);
            }
            match attempt(deadline) {
                Ok(v) => return Ok(v),
                Err(f) if f.retry && n < self.opts.retries => {
                    let delay = backoff(self.opts.backoff, n).max(f.after.unwrap_or_default());
                    // A retry needs time to do something useful.
                    let min_try = Duration::from_millis(200);
                    if call_end.is_some_and(|end| Instant::now() + delay + min_try > end) {
                        log::info!("{what}: {}; no time left to retry", f.err);
                        return Err(f.err);
                    }
                    log::info!(
                        "{what}: {}; retry {} of {} in {} ms",
                        f.err,
                        n + 1,
                        self.opts.retries,
                        delay.as_millis()
                    );
                    std::thread::sleep(delay);
                    n += 1;
                }
                Err(f) => return Err(f.err),
            }
        }
    }

    /// The Authorization header for the registry's origin, and the token
    /// generation it came from (0 for none or basic).
    fn current_auth(&self) -> (Option<String>, u64) {
        let guard = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = guard.as_ref() {
            if Instant::now() < t.expires {
                return (Some(format!("Bearer {}", t.value)), t.generation);
            }
        }
        (self.basic.clone(), 0)
    }

    /// Sends one request to the registry: follows redirects (credentials
    /// only to the registry's origin), answers one 401 by authenticating,
    /// and classifies failures. Returns a 2xx response.
    fn send(
        &self,
        method: &str,
        url: &Url,
        range: Option<(u64, u64)>,
        deadline: Instant,
    ) -> Result<ureq::Response, Failure> {
        let mut authenticated = false;
        'auth: loop {
            let (auth, generation) = self.current_auth();
            let mut target = url.clone();
            let mut hops = 0;
            loop {
                let on_registry = same_origin(&target, &self.base);
                let mut req = self
                    .agent
                    .request_url(method, &target)
                    .timeout(time_left(deadline, &target)?);
                if let Some((first, last)) = range {
                    req = req.set("Range", &format!("bytes={first}-{last}"));
                }
                if on_registry {
                    if let Some(a) = &auth {
                        req = req.set("Authorization", a);
                    }
                }
                let ctx = format!("{method} {target}");
                let resp = self.call(req, &ctx)?;
                let status = resp.status();
                log::debug!("{ctx}: {status}");
                match status {
                    200..=299 => return Ok(resp),
                    301 | 302 | 303 | 307 | 308 => {
                        let Some(loc) = resp.header("Location").map(str::to_owned) else {
                            return Err(Failure::fatal(io_err(
                                ctx,
                                io::ErrorKind::InvalidData,
                                format!("{status} without a Location"),
                            )));
                        };
                        drain(resp);
                        hops += 1;
                        if hops > MAX_REDIRECTS {
                            return Err(Failure::fatal(io_err(
                                ctx,
                                io::ErrorKind::InvalidData,
                                format!("more than {MAX_REDIRECTS} redirects"),
                            )));
                        }
                        target = match target.join(&loc) {
                            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => u,
                            _ => {
                                return Err(Failure::fatal(io_err(
                                    ctx,
                                    io::ErrorKind::InvalidData,
                                    format!("bad redirect to {loc:?}"),
                                )))
                            }
                        };
                        if !same_origin(&target, &self.base) {
                            log::debug!("{ctx}: redirected off the registry to {target}");
                        }
                    }
                    401 if on_registry && !authenticated => {
                        let challenges: Vec<Challenge> = resp
                            .all("WWW-Authenticate")
                            .into_iter()
                            .flat_map(parse_challenges)
                            .collect();
                        drain(resp);
                        authenticated = true;
                        if let Some(c) = challenges
                            .iter()
                            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
                        {
                            self.refresh_token(c, generation, deadline)?;
                            continue 'auth;
                        }
                        let basic_offered = challenges
                            .iter()
                            .any(|c| c.scheme.eq_ignore_ascii_case("basic"));
                        if basic_offered && self.basic.is_some() && auth != self.basic {
                            // A stale bearer token was sent; basic is wanted.
                            self.token.lock().unwrap_or_else(|p| p.into_inner()).take();
                            continue 'auth;
                        }
                        return Err(Failure::fatal(unauthorized(&ctx, &auth, &challenges)));
                    }
                    401 | 403 => {
                        drain(resp);
                        return Err(Failure::fatal(io_err(
                            ctx,
                            io::ErrorKind::PermissionDenied,
                            format!("{status}: access denied"),
                        )));
                    }
                    404 => {
                        drain(resp);
                        return Err(Failure::fatal(BackendError::NotFound));
                    }
                    416 => {
                        drain(resp);
                        return Err(Failure::fatal(BackendError::ShortRead {
                            expected: range.map_or(0, |(a, b)| b - a + 1),
                            got: 0,
                        }));
                    }
                    429 | 500..=599 => {
                        let after = resp
                            .header("Retry-After")
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
                        drain(resp);
                        return Err(Failure {
                            err: io_err(ctx, io::ErrorKind::Other, format!("HTTP {status}")),
                            retry: true,
                            after,
                        });
                    }
                    _ => {
                        drain(resp);
                        return Err(Failure::fatal(io_err(
                            ctx,
                            io::ErrorKind::Other,
                            format!("unexpected HTTP {status}"),
                        )));
                    }
                }
            }
        }
    }

    /// Sends a prepared request; any status comes back as a response,
    /// transport failures as a classified [`Failure`].
    fn call(&self, req: ureq::Request, ctx: &str) -> Result<ureq::Response, Failure> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(_, r)) => Ok(r),
            Err(ureq::Error::Transport(t)) => Err(transport_failure(ctx, &t)),
        }
    }

    /// Gets a token for challenge `c`, unless another worker already
    /// replaced the token of generation `seen` while we waited.
    fn refresh_token(&self, c: &Challenge, seen: u64, deadline: Instant) -> Result<(), Failure> {
        let _one_at_a_time = self.token_fetch.lock().unwrap_or_else(|p| p.into_inner());
        {
            let t = self.token.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = t.as_ref() {
                if t.generation != seen && Instant::now() < t.expires {
                    return Ok(());
                }
            }
        }
        let realm = c.param("realm").ok_or_else(|| {
            Failure::fatal(io_err(
                "registry auth",
                io::ErrorKind::InvalidData,
                "Bearer challenge without a realm",
            ))
        })?;
        let mut url = match Url::parse(realm) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => u,
            _ => {
                return Err(Failure::fatal(io_err(
                    "registry auth",
                    io::ErrorKind::InvalidData,
                    format!("bad token realm {realm:?}"),
                )))
            }
        };
        let default_scope = format!("repository:{}:pull", self.repo);
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = c.param("service") {
                q.append_pair("service", s);
            }
            q.append_pair("scope", c.param("scope").unwrap_or(&default_scope));
        }
        let ctx = format!("token request {}", strip_query(&url));
        let mut req = self
            .agent
            .request_url("GET", &url)
            .timeout(time_left(deadline, &url)?);
        if let Some(b) = &self.basic {
            req = req.set("Authorization", b);
        }
        let resp = self.call(req, &ctx)?;
        let status = resp.status();
        log::debug!("{ctx}: {status}");
        match status {
            200 => {}
            401 | 403 => {
                drain(resp);
                return Err(Failure::fatal(io_err(
                    ctx,
                    io::ErrorKind::PermissionDenied,
                    format!("{status}: credentials refused"),
                )));
            }
            429 | 500..=599 => {
                drain(resp);
                return Err(Failure::transient(io_err(
                    ctx,
                    io::ErrorKind::Other,
                    format!("HTTP {status}"),
                )));
            }
            _ => {
                drain(resp);
                return Err(Failure::fatal(io_err(
                    ctx,
                    io::ErrorKind::Other,
                    format!("unexpected HTTP {status}"),
                )));
            }
        }
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_SMALL_BODY)
            .read_to_end(&mut body)
            .map_err(|e| body_failure(&ctx, e))?;
        let (value, lifetime) = parse_token(&body)
            .map_err(|why| Failure::fatal(io_err(ctx.clone(), io::ErrorKind::InvalidData, why)))?;
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        let generation = t.as_ref().map_or(0, |t| t.generation) + 1;
        // Stop using a token a little before the server does.
        let margin = (lifetime / 2).min(Duration::from_secs(5));
        *t = Some(Token {
            value,
            expires: Instant::now() + lifetime - margin,
            generation,
        });
        log::debug!("{ctx}: token valid for {} s", lifetime.as_secs());
        Ok(())
    }
}

impl Backend for Registry {
    fn canonical_id(&self, id: &str) -> Option<String> {
        canonical_digest(id)
    }

    fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
        let digest = Self::digest_of(id)?;
        let url = self.blob_url(&digest)?;
        let ctx = format!("HEAD {url}");
        self.with_retries(&ctx, |deadline| {
            let resp = self.send("HEAD", &url, None, deadline)?;
            if let Some(d) = resp.header("Docker-Content-Digest") {
                if d.trim() != digest {
                    return Err(Failure::fatal(BackendError::Integrity(format!(
                        "{ctx}: registry says the blob is {d}"
                    ))));
                }
            }
            resp.header("Content-Length")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Failure::fatal(io_err(
                        ctx.clone(),
                        io::ErrorKind::InvalidData,
                        "no valid Content-Length",
                    ))
                })
        })
    }

    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        let digest = Self::digest_of(id)?;
        let url = self.blob_url(&digest)?;
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| io_err("range", io::ErrorKind::InvalidInput, "overflow"))?;
        let ctx = format!("GET {url} bytes={offset}-{last}");
        self.with_retries(&ctx, |deadline| {
            let resp = self.send("GET", &url, Some((offset, last)), deadline)?;
            // How many body bytes precede `offset`.
            let skip = match resp.status() {
                206 => {
                    let cr = resp.header("Content-Range").unwrap_or("").to_owned();
                    match parse_content_range(&cr) {
                        Some((first, _)) if first <= offset => offset - first,
                        _ => {
                            drain(resp);
                            return Err(Failure::fatal(io_err(
                                ctx.clone(),
                                io::ErrorKind::InvalidData,
                                format!("206 with Content-Range {cr:?}"),
                            )));
                        }
                    }
                }
                200 => {
                    if !self.warned_no_range.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "{ctx}: the server ignored Range and sent the whole blob; \
                             skipping to the offset (slow)"
                        );
                    }
                    offset
                }
                s => {
                    drain(resp);
                    return Err(Failure::fatal(io_err(
                        ctx.clone(),
                        io::ErrorKind::InvalidData,
                        format!("unexpected HTTP {s}"),
                    )));
                }
            };
            let mut body = resp.into_reader();
            let skipped = io::copy(&mut (&mut body).take(skip), &mut io::sink())
                .map_err(|e| body_failure(&ctx, e))?;
            if skipped < skip {
                return Err(Failure::fatal(BackendError::ShortRead {
                    expected: len,
                    got: 0,
                }));
            }
            copy_body(&mut body, dst, offset, len, &ctx)
        })
    }

    fn verify(&self, id: &str, data: &File, size: u64) -> Result<(), BackendError> {
        let digest = Self::digest_of(id)?;
        let got = sha256_file(data, size)?;
        if digest.strip_prefix("sha256:") == Some(got.as_str()) {
            Ok(())
        } else {
            Err(BackendError::Integrity(format!(
                "{id}: the {size} bytes received hash to sha256:{got}"
            )))
        }
    }

    fn verifies(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("registry:{}{}", self.base, self.repo)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        log::info!("{}: {} HTTP requests", self.describe(), self.requests());
    }
}

/// Copies `len` body bytes to `dst` at `offset`.
fn copy_body(
    body: &mut impl Read,
    dst: &File,
    offset: u64,
    len: u64,
    ctx: &str,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; (len.min(COPY_BUF as u64)) as usize];
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(buf.len());
        let n = match body.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Failure::fatal(BackendError::ShortRead {
                    expected: len,
                    got: done,
                }))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Failure::fatal(BackendError::ShortRead {
                    expected: len,
                    got: done,
                }))
            }
            Err(e) => return Err(body_failure(ctx, e)),
        };
        let at = offset + done;
        dst.write_all_at(&buf[..n], at)
            .map_err(|e| Failure::fatal(BackendError::Io(format!("write cache at {at}"), e)))?;
        done += n as u64;
    }
    Ok(())
}

/// sha256 of the first `size` bytes of `data`, in lowercase hex.
fn sha256_file(data: &File, size: u64) -> Result<String, BackendError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        let want = ((size - at) as usize).min(buf.len());
        match data.read_at(&mut buf[..want], at) {
            Ok(0) => {
                return Err(BackendError::ShortRead {
                    expected: size,
                    got: at,
                })
            }
            Ok(n) => {
                h.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BackendError::Io(format!("read cache at {at}"), e)),
        }
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

/// `sha256:<64 lowercase hex>` or the bare hex → `sha256:<hex>`.
pub fn canonical_digest(id: &str) -> Option<String> {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| format!("sha256:{hex}"))
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

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

fn strip_query(u: &Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.to_string()
}

/// Reads (a bounded amount of) a response we do not need so the connection
/// can go back to the pool.
fn drain(resp: ureq::Response) {
    let _ = io::copy(
        &mut resp.into_reader().take(MAX_SMALL_BODY),
        &mut io::sink(),
    );
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(Duration::from_secs(5));
    // ±25% jitter so workers that failed together do not retry together.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let frac = 0.75 + (nanos % 1000) as f64 / 2000.0;
    capped.mul_f64(frac)
}

/// What is left until `deadline`, or a timeout failure.
fn time_left(deadline: Instant, url: &Url) -> Result<Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        return Err(Failure::fatal(BackendError::Timeout(format!(
            "{}: no time left for the request",
            strip_query(url)
        ))));
    }
    Ok(left)
}

fn is_timeout(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// The innermost io::Error kind behind an error, if any.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut found = None;
    while let Some(err) = cur {
        if let Some(ioe) = err.downcast_ref::<io::Error>() {
            found = Some(ioe.kind());
        }
        cur = err.source();
    }
    found
}

fn transport_failure(ctx: &str, t: &ureq::Transport) -> Failure {
    use ureq::ErrorKind as K;
    let kind = io_kind(t).unwrap_or(io::ErrorKind::Other);
    let msg = t.to_string();
    if is_timeout(kind) {
        return Failure::transient(BackendError::Timeout(format!("{ctx}: {msg}")));
    }
    let retry = matches!(
        t.kind(),
        K::Dns | K::ConnectionFailed | K::Io | K::BadStatus | K::BadHeader | K::ProxyConnect
    );
    let err = BackendError::Io(ctx.to_string(), io::Error::new(kind, msg));
    Failure {
        err,
        retry,
        after: None,
    }
}

fn body_failure(ctx: &str, e: io::Error) -> Failure {
    if is_timeout(e.kind()) {
        Failure::transient(BackendError::Timeout(format!("{ctx}: reading body: {e}")))
    } else {
        Failure::transient(BackendError::Io(format!("{ctx}: reading body"), e))
    }
}

fn unauthorized(ctx: &str, sent: &Option<String>, challenges: &[Challenge]) -> BackendError {
    let offered: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
    let what = match sent {
        Some(a) if a.starts_with("Bearer ") => "the bearer token was refused",
        Some(_) => "the credentials were refused",
        None => "authentication required and no credentials configured",
    };
    io_err(
        ctx,
        io::ErrorKind::PermissionDenied,
        format!("401: {what} (server offers {offered:?})"),
    )
}

/// `bytes FIRST-LAST/TOTAL` → (FIRST, LAST).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, _total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// A token endpoint's answer → (token, lifetime).
fn parse_token(body: &[u8]) -> Result<(String, Duration), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("token response is not JSON: {e}"))?;
    let token = ["token", "access_token"]
        .iter()
        .filter_map(|k| v.get(k).and_then(|t| t.as_str()))
        .find(|t| !t.is_empty())
        .ok_or("token response has no \"token\" or \"access_token\"")?;
    if token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("token has characters not allowed in a header".into());
    }
    let lifetime = match v.get("expires_in").and_then(|e| e.as_f64()) {
        Some(s) if s.is_finite() && s >= 1.0 => Duration::from_secs_f64(s.min(86_400.0 * 365.0)),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    Ok((token.to_string(), lifetime))
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `Scheme a=b, c="d,e", Other x=y` into challenges.
fn parse_challenges(h: &str) -> Vec<Challenge> {
    let s = h.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_tchar = |b: u8| !(b.is_ascii_whitespace() || b == b',' || b == b'=' || b == b'"');
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && is_tchar(s[*i]) {
            *i += 1;
        }
        String::from_utf8_lossy(&s[start..*i]).into_owned()
    };
    while i < s.len() {
        while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == b',') {
            i += 1;
        }
        if i >= s.len() {
            break;
        }
        let scheme = token(&mut i);
        if scheme.is_empty() {
            // Stray `=` or `"`: skip it rather than loop forever.
            i += 1;
            continue;
        }
        let mut ch = Challenge {
            scheme,
            params: Vec::new(),
        };
        loop {
            skip_ws(&mut i);
            let save = i;
            let name = token(&mut i);
            skip_ws(&mut i);
            if name.is_empty() || i >= s.len() || s[i] != b'=' {
                i = save;
                break;
            }
            i += 1;
            skip_ws(&mut i);
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    v.push(s[i]);
                    i += 1;
                }
                i = (i + 1).min(s.len());
                String::from_utf8_lossy(&v).into_owned()
            } else {
                token(&mut i)
            };
            ch.params.push((name, value));
            skip_ws(&mut i);
            if i < s.len() && s[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
        out.push(ch);
    }
    out
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (c.get(1).copied().unwrap_or(0) as u32) << 8
            | c.get(2).copied().unwrap_or(0) as u32;
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests_have_one_canonical_form() {
        let c = format!("sha256:{HEX}");
        assert_eq!(canonical_digest(HEX).as_deref(), Some(c.as_str()));
        assert_eq!(canonical_digest(&c).as_deref(), Some(c.as_str()));
        assert_eq!(canonical_digest(&HEX.to_uppercase()), None);
        assert_eq!(canonical_digest(&HEX[1..]), None);
        assert_eq!(canonical_digest(&format!("sha512:{HEX}")), None);
        assert_eq!(canonical_digest(&format!("sha256:{HEX}0")), None);
        assert_eq!(canonical_digest("sha256:"), None);
        assert_eq!(canonical_digest("blob"), None);
    }

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
    }

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
    fn token_responses_parse() {
        let (t, l) = parse_token(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((t.as_str(), l), ("abc", Duration::from_secs(300)));
        let (t, l) = parse_token(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((t.as_str(), l), ("xyz", DEFAULT_TOKEN_LIFETIME));
        let (t, _) = parse_token(br#"{"token":"","access_token":"z"}"#).unwrap();
        assert_eq!(t, "z");
        assert!(parse_token(br#"{"token":"a\nb"}"#).is_err());
        assert!(parse_token(br#"{"nothing":1}"#).is_err());
        assert!(parse_token(b"<html>").is_err());
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
    fn verify_hashes_the_file() {
        let r = Registry::new("http://127.0.0.1:1/r", RegistryOptions::default()).unwrap();
        let f = tempfile::tempfile().unwrap();
        // The empty blob's digest is HEX.
        r.verify(HEX, &f, 0).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        assert!(matches!(
            r.verify(HEX, &f, 1),
            Err(BackendError::Integrity(_))
        ));
        assert!(matches!(
            r.verify(HEX, &f, 2),
            Err(BackendError::ShortRead { .. })
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Duration::from_millis(100);
        assert!(backoff(b, 0) <= Duration::from_millis(125));
        assert!(backoff(b, 3) >= Duration::from_millis(600));
        assert!(backoff(b, 30) <= Duration::from_millis(6250));
    }
}
