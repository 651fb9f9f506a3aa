//! The registry backend's HTTP layer: sending one request with its deadline,
//! retrying with backoff, following redirects by hand, classifying answers
//! into [`BackendError`]s, and copying a range's body into the cache file.
//!
//! One keep-alive [`ureq::Agent`] (ureq 3, blocking) per endpoint client
//! is shared by all workers. The agent follows no redirects itself: [`Http::follow`] does, so
//! that the Authorization header only ever goes to the registry's own origin
//! (scheme, host and port) and never to the object store or CDN a blob is
//! redirected to. Every URL put into an error or a log line has its query
//! string removed, since a redirect's query is usually a signature. Any
//! status comes back as a response to look at (`http_status_as_error` is
//! off); only transport failures are errors.

use super::RegistryOptions;
use crate::backend::{BackendError, RedirectProblem};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use ureq::unversioned::transport::{Connector as _, RustlsConnector};
use ureq::Agent;
use url::Url;

/// Redirect hops followed per request.
const MAX_REDIRECTS: u32 = 5;
/// Largest token response or error body read.
pub(super) const MAX_SMALL_BODY: u64 = 1 << 20;
/// Longest wait a server's Retry-After can impose on a worker.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Buffer for copying response bodies into the cache file: whole 1 MiB
/// writes cost the file system less per byte than 256 KiB ones (daemon CPU
/// for a cold 1 GiB pull 1.11 → 1.03 s, docs/PERFORMANCE.md).
const COPY_BUF: usize = 1 << 20;
/// The agent's input buffer per connection: what one socket read may fill.
/// 1 MiB rather than ureq's 128 KiB: fewer reads, and fewer ACKs sent from
/// them, per byte (docs/PERFORMANCE.md).
const INPUT_BUF: usize = 1 << 20;
/// Idle connections kept for reuse, in all and per host. Each keeps its
/// [`INPUT_BUF`], so this bounds their memory (16 MiB); a busy host needs
/// one per worker, 4 by default.
const IDLE_CONNECTIONS: usize = 16;
/// Cap of the exponential backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time a retry needs to do something useful.
const MIN_TRY: Duration = Duration::from_millis(200);

/// A failed attempt: the error, and whether (and how soon) to try again.
#[derive(Debug)]
pub(super) struct Failure {
    pub err: BackendError,
    pub retry: bool,
    /// The server's Retry-After, if it gave one.
    pub after: Option<Duration>,
}

impl Failure {
    /// A failure that another attempt would not fix.
    pub fn fatal(err: BackendError) -> Failure {
        Failure {
            err,
            retry: false,
            after: None,
        }
    }

    /// A failure worth retrying (after the usual backoff).
    pub fn transient(err: BackendError) -> Failure {
        Failure {
            err,
            retry: true,
            after: None,
        }
    }
}

/// An HTTP answer: status, headers and a body still to be read.
pub(super) type Response = ureq::http::Response<ureq::Body>;

/// What the backend reads of a [`Response`]'s head.
pub(super) trait Answer {
    /// The status code.
    fn code(&self) -> u16;
    /// The first value of header `name`, if it is text.
    fn header(&self, name: &str) -> Option<&str>;
    /// Every value of header `name` that is text.
    fn all(&self, name: &str) -> Vec<&str>;
}

impl Answer for Response {
    fn code(&self) -> u16 {
        self.status().as_u16()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers().get(name)?.to_str().ok()
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }
}

/// The answer at the end of a chain of redirects.
pub(super) struct Reply {
    /// The response, of any status but 3xx.
    pub resp: Response,
    /// The URL that gave it.
    pub url: Url,
    /// Whether that URL is on the registry's origin (and so was sent the
    /// Authorization header).
    pub on_origin: bool,
}

/// The shared HTTP client with the backend's timeout and retry settings.
pub(super) struct Http {
    agent: ureq::Agent,
    /// The proxies, chosen per request URL: a redirect or a token realm on
    /// another host gets its own (`NO_PROXY` applies to it too).
    proxies: Proxies,
    timeout: Duration,
    call_budget: Option<Duration>,
    retries: u32,
    backoff: Duration,
    requests: AtomicU64,
    /// Extra headers for the endpoint (hosts.toml `header`), sent only to
    /// its own origin.
    headers: Vec<(String, String)>,
}

impl Http {
    /// A client for `opts` (whose timeout must be positive).
    pub fn new(opts: &RegistryOptions) -> Http {
        let config = Agent::config_builder()
            // Statuses are classified here, not turned into errors.
            .http_status_as_error(false)
            // Redirects are followed by hand: see `follow`.
            .max_redirects(0)
            // None for the agent (ureq's default would read the
            // environment): each request sets the one for its URL.
            .proxy(None)
            .timeout_connect(Some(opts.timeout))
            .max_idle_connections(IDLE_CONNECTIONS)
            .max_idle_connections_per_host(IDLE_CONNECTIONS)
            .input_buffer_size(INPUT_BUF)
            .user_agent(concat!("blobmgr/", env!("CARGO_PKG_VERSION")))
            .build();
        // The TLS of hosts.toml `ca` and `skip_verify` (see `tls`), else
        // ureq's own with the built-in roots.
        let connect = super::proxy::connector();
        // Names resolved on the worker, not in a thread per connection.
        let resolver = super::resolver::BlockingResolver;
        let agent = match &opts.tls {
            Some(tls) => Agent::with_parts(
                config,
                connect.chain(super::tls::TlsConnector::new(tls.clone())),
                resolver,
            ),
            None => Agent::with_parts(config, connect.chain(RustlsConnector::default()), resolver),
        };
        let (http, https) = opts.proxy.by_scheme();
        let proxies = Proxies {
            http: http.and_then(http_proxy),
            https: https.and_then(http_proxy),
            env: opts.proxy.clone(),
        };
        Http {
            agent,
            proxies,
            headers: opts.headers.clone(),
            timeout: opts.timeout,
            call_budget: opts.call_budget,
            retries: opts.retries,
            backoff: opts.backoff,
            requests: AtomicU64::new(0),
        }
    }

    /// The per-request deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// HTTP requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Runs `attempt` (given the deadline of its request) until it
    /// succeeds, fails for good, or the retries or the call's time budget
    /// are used up.
    pub fn with_retries<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut(Instant) -> Result<T, Failure>,
    ) -> Result<T, BackendError> {
        let call_end = self.call_budget.map(|b| Instant::now() + b);
        let mut n = 0u32;
        loop {
            let mut deadline = Instant::now() + self.timeout;
            if let Some(end) = call_end {
                deadline = deadline.min(end);
            }
            let f = match attempt(deadline) {
                Ok(v) => return Ok(v),
                Err(f) if f.retry && n < self.retries => f,
                Err(f) => return Err(f.err),
            };
            let delay = backoff(self.backoff, n).max(f.after.unwrap_or_default());
            if call_end.is_some_and(|end| Instant::now() + delay + MIN_TRY > end) {
                log::info!("{what}: {}; no time left to retry", f.err);
                return Err(f.err);
            }
            log::info!(
                "{what}: {}; retry {} of {} in {} ms",
                f.err,
                n + 1,
                self.retries,
                delay.as_millis()
            );
            std::thread::sleep(delay);
            n += 1;
        }
    }

    /// Sends one request (no redirects followed) with `headers`, within
    /// `deadline`. Any status comes back as a response; transport failures
    /// as a classified [`Failure`].
    pub fn call(
        &self,
        method: &str,
        url: &Url,
        headers: &[(&str, &str)],
        deadline: Instant,
    ) -> Result<Response, Failure> {
        let left = time_left(deadline, url)?;
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(url.as_str());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(())
            .map_err(|e| transport_failure(url, ureq::Error::Http(e)))?;
        let req = self
            .agent
            .configure_request(req)
            .proxy(self.proxies.for_url(url))
            .timeout_global(Some(left))
            .build();
        self.requests.fetch_add(1, Ordering::Relaxed);
        answer(method, url, self.agent.run(req))
    }

    /// POSTs `form` (`application/x-www-form-urlencoded`) to `url`, no
    /// redirects followed, within `deadline`; like [`Http::call`]. The form
    /// is never logged (it may hold a token).
    pub fn post_form(
        &self,
        url: &Url,
        form: &[(&str, &str)],
        deadline: Instant,
    ) -> Result<Response, Failure> {
        let req = self
            .agent
            .post(url.as_str())
            .config()
            .proxy(self.proxies.for_url(url))
            .timeout_global(Some(time_left(deadline, url)?))
            .build();
        self.requests.fetch_add(1, Ordering::Relaxed);
        answer("POST", url, req.send_form(form.iter().copied()))
    }

    /// Sends `method url` with `range`, following redirects; `auth` (an
    /// Authorization value) goes only to URLs on `origin`. Returns the first
    /// answer that is not a redirect.
    pub fn follow(
        &self,
        method: &str,
        url: &Url,
        range: Option<(u64, u64)>,
        auth: Option<&str>,
        origin: &Url,
        deadline: Instant,
    ) -> Result<Reply, Failure> {
        let range = range.map(|(first, last)| format!("bytes={first}-{last}"));
        let mut target = url.clone();
        let mut hops = 0;
        loop {
            let on_origin = same_origin(&target, origin);
            let mut headers = Vec::with_capacity(2 + self.headers.len());
            if let Some(r) = &range {
                headers.push(("Range", r.as_str()));
            }
            if let (true, Some(a)) = (on_origin, auth) {
                headers.push(("Authorization", a));
            }
            if on_origin {
                headers.extend(self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            }
            let resp = self.call(method, &target, &headers, deadline)?;
            if !matches!(resp.code(), 301 | 302 | 303 | 307 | 308) {
                return Ok(Reply {
                    resp,
                    url: target,
                    on_origin,
                });
            }
            hops += 1;
            target = next_hop(resp, &target, hops)?;
            if !same_origin(&target, origin) {
                log::debug!("{method} {}: redirected off the registry", redact(&target));
            }
        }
    }
}

/// The proxies of an [`Http`], parsed once.
struct Proxies {
    http: Option<ureq::Proxy>,
    https: Option<ureq::Proxy>,
    env: super::proxy::ProxyEnv,
}

impl Proxies {
    /// The proxy for a request to `url`: its scheme's, unless `NO_PROXY`
    /// names its host.
    fn for_url(&self, url: &Url) -> Option<ureq::Proxy> {
        let proxy = match url.scheme() {
            "http" => self.http.as_ref(),
            "https" => self.https.as_ref(),
            _ => None,
        }?;
        (!self.env.excludes(url)).then(|| proxy.clone())
    }
}

/// A response of any status, or the classified transport failure.
fn answer(
    method: &str,
    url: &Url,
    sent: Result<Response, ureq::Error>,
) -> Result<Response, Failure> {
    let resp = sent.map_err(|e| transport_failure(url, e))?;
    log::debug!("{method} {}: {}", redact(url), resp.code());
    Ok(resp)
}

/// The proxy for `url` (an HTTP or HTTPS proxy), or `None` with a warning.
fn http_proxy(url: &str) -> Option<ureq::Proxy> {
    use ureq::ProxyProtocol as P;
    match ureq::Proxy::new(url) {
        Ok(p) if matches!(p.protocol(), P::Http | P::Https) => Some(p),
        Ok(_) => {
            log::warn!(
                "proxy {}: not an HTTP proxy; connecting directly",
                redact_str(url)
            );
            None
        }
        Err(e) => {
            log::warn!("proxy {}: {e}; connecting directly", redact_str(url));
            None
        }
    }
}

/// Where redirect `resp` (hop number `hops` from `from`) sends us.
fn next_hop(resp: Response, from: &Url, hops: u32) -> Result<Url, Failure> {
    let redirect = |problem| {
        Failure::fatal(BackendError::Redirect {
            url: redact(from),
            problem,
        })
    };
    let status = resp.code();
    let Some(loc) = resp.header("Location").map(str::to_owned) else {
        drain(resp);
        return Err(redirect(RedirectProblem::NoLocation { status }));
    };
    drain(resp);
    if hops > MAX_REDIRECTS {
        return Err(redirect(RedirectProblem::TooMany {
            limit: MAX_REDIRECTS,
        }));
    }
    match from.join(&loc) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(u),
        Ok(u) => Err(redirect(RedirectProblem::BadLocation(redact(&u)))),
        Err(_) => {
            let shown = loc.split('?').next().unwrap_or_default().to_owned();
            Err(redirect(RedirectProblem::BadLocation(shown)))
        }
    }
}

/// A proxy URL for logs: without user info, query or fragment. Done on the
/// text, not through [`Url`]: a proxy given without a scheme
/// (`user:pa/ss@proxy:3128`) parses as scheme `user` with the password in
/// its path. Everything up to the last `@` goes, so a `@` later in the URL
/// hides more than needed, never less.
fn redact_str(u: &str) -> String {
    let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    match scheme {
        "" => rest.to_owned(),
        s => format!("{s}://{rest}"),
    }
}

/// The failure for a final answer that is neither 2xx nor handled by the
/// caller; `range` is the one asked for, if any.
pub(super) fn status_failure(reply: Reply, range: Option<(u64, u64)>) -> Failure {
    let status = reply.resp.code();
    let url = redact(&reply.url);
    let after = reply
        .resp
        .header("Retry-After")
        // Only the delay-seconds form; an HTTP date gets the usual backoff.
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    drain(reply.resp);
    match status {
        401 | 403 => Failure::fatal(BackendError::AccessDenied {
            status,
            url,
            reason: "access denied".into(),
        }),
        404 => Failure::fatal(BackendError::NotFound),
        416 => Failure::fatal(BackendError::ShortRead {
            expected: range.map_or(0, |(a, b)| b - a + 1),
            got: 0,
        }),
        429 | 500..=599 => Failure {
            err: BackendError::Status { status, url },
            retry: true,
            after,
        },
        _ => Failure::fatal(BackendError::Status { status, url }),
    }
}

/// Reads a range's body: discards the first `skip` bytes, then writes the
/// next `len` to `dst` at `offset`. `ctx` names the request in errors.
pub(super) fn copy_body(
    resp: Response,
    skip: u64,
    dst: &File,
    offset: u64,
    len: u64,
    ctx: &str,
) -> Result<(), Failure> {
    let mut body = resp.into_body().into_reader();
    let skipped =
        io::copy(&mut (&mut body).take(skip), &mut io::sink()).map_err(|e| body_failure(ctx, e))?;
    if skipped < skip {
        return Err(Failure::fatal(BackendError::ShortRead {
            expected: len,
            got: 0,
        }));
    }
    let short = |done| {
        Failure::fatal(BackendError::ShortRead {
            expected: len,
            got: done,
        })
    };
    let mut buf = vec![0u8; len.min(COPY_BUF as u64) as usize];
    let mut done = 0u64;
    while done < len {
        // Whole buffers per write: the HTTP client hands out at most its
        // input buffer per read, often less (what one socket read got), and
        // each write takes the cache file's inode lock.
        let want = ((len - done) as usize).min(buf.len());
        let mut got = 0;
        while got < want {
            match body.read(&mut buf[got..want]) {
                // The body ended where its framing says: short.
                Ok(0) => return Err(short(done + got as u64)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Anything else is the connection's, not the body's: a
                // timeout, or the connection ending before the framing
                // does (ureq 3 says UnexpectedEof for a reset there as
                // for a close), worth another attempt either way.
                Err(e) => {
                    let at = format!("{ctx}: at byte {} of {len}", done + got as u64);
                    return Err(body_failure(&at, e));
                }
            }
        }
        let at = offset + done;
        dst.write_all_at(&buf[..got], at)
            .map_err(|e| Failure::fatal(BackendError::Io(format!("write cache at {at}"), e)))?;
        done += got as u64;
    }
    // ureq gives the connection back to its pool only when a read finds
    // the body's end; at the end that is at once, without I/O. (When the
    // body goes on past what was needed, the connection is dropped.)
    let _ = body.read(&mut [0u8; 1]);
    Ok(())
}

/// Reads a small body (a token response) whole, up to [`MAX_SMALL_BODY`].
pub(super) fn read_small_body(resp: Response, ctx: &str) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    resp.into_body()
        .into_reader()
        .take(MAX_SMALL_BODY)
        .read_to_end(&mut body)
        .map_err(|e| body_failure(ctx, e))?;
    Ok(body)
}

/// Reads (a bounded amount of) a response we do not need so the connection
/// can go back to the pool.
pub(super) fn drain(resp: Response) {
    let _ = io::copy(
        &mut resp.into_body().into_reader().take(MAX_SMALL_BODY),
        &mut io::sink(),
    );
}

/// Whether `a` and `b` have the same scheme, host and port.
pub(super) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `u` as it may appear in logs and errors: without query, fragment or
/// user info.
pub(super) fn redact(u: &Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

/// The delay before retry number `attempt + 1`: `base` doubled per attempt,
/// capped, with ±25% jitter.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(MAX_BACKOFF);
    // Jitter so workers that failed together do not retry together.
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
            redact(url)
        ))));
    }
    Ok(left)
}

fn is_timeout(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// The I/O error behind a ureq error, if any (ureq's errors have no
/// `source`; an I/O error may carry a ureq error in turn).
fn io_error(e: &ureq::Error) -> Option<&io::Error> {
    match e {
        ureq::Error::Io(io) => Some(io),
        _ => None,
    }
}

/// The ureq error inside an I/O error a body reader returned, if any.
fn inner_ureq(e: &io::Error) -> Option<&ureq::Error> {
    e.get_ref()?.downcast_ref::<ureq::Error>()
}

/// Whether a ureq error is a timeout (its own deadline, or a socket's).
fn ureq_timeout(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) => true,
        e => io_error(e)
            .is_some_and(|io| is_timeout(io.kind()) || inner_ureq(io).is_some_and(ureq_timeout)),
    }
}

/// Whether a TLS certificate was refused: rustls' error, as ureq gives it
/// or inside the I/O error of a handshake.
fn certificate_refused(e: &ureq::Error) -> bool {
    let tls = match e {
        ureq::Error::Rustls(r) => Some(r),
        e => io_error(e)
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
    };
    matches!(tls, Some(rustls::Error::InvalidCertificate(_)))
        || io_error(e)
            .and_then(inner_ureq)
            .is_some_and(certificate_refused)
}

/// A ureq error as text without a URL (which may carry a signed query).
fn transport_detail(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        // Their texts may name the URL.
        ureq::Error::BadUri(_) => "bad URL".to_owned(),
        ureq::Error::RequireHttpsOnly(_) => "https only".to_owned(),
        e => e.to_string(),
    }
}

/// Classifies a transport error of a request to `url`: timeouts and
/// connection-level failures are retried, the rest (bad URL, TLS
/// configuration, a server certificate we refuse, …) are not.
fn transport_failure(url: &Url, e: ureq::Error) -> Failure {
    use ureq::Error as E;
    let detail = transport_detail(&e);
    if ureq_timeout(&e) {
        return Failure::transient(BackendError::Timeout(format!("{}: {detail}", redact(url))));
    }
    let retry = matches!(
        e,
        E::Io(_)
            | E::HostNotFound
            | E::ConnectionFailed
            | E::Protocol(_)
            | E::LargeResponseHeader(..)
            | E::ConnectProxyFailed(_)
            | E::Rustls(_)
            | E::BodyStalled
    ) && !certificate_refused(&e);
    Failure {
        err: BackendError::Transport {
            url: redact(url),
            detail,
            source: Box::new(e),
        },
        retry,
        after: None,
    }
}

/// A failure while reading a body: a timeout, or a broken connection (reset,
/// or closed before the body's framing ended: ureq 3 reports both as
/// `UnexpectedEof`); both are worth another attempt.
fn body_failure(ctx: &str, e: io::Error) -> Failure {
    if is_timeout(e.kind()) || inner_ureq(&e).is_some_and(ureq_timeout) {
        Failure::transient(BackendError::Timeout(format!("{ctx}: reading body: {e}")))
    } else {
        Failure::transient(BackendError::Io(format!("{ctx}: reading body"), e))
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
