//! The registry backend's HTTP layer: sending one request with its deadline,
//! retrying with backoff, following redirects by hand, classifying answers
//! into [`BackendError`]s, and copying a range's body into the cache file.
//!
//! One keep-alive [`ureq::Agent`] (ureq 2, blocking) is shared by all
//! workers. The agent follows no redirects itself: [`Http::follow`] does, so
//! that the Authorization header only ever goes to the registry's own origin
//! (scheme, host and port) and never to the object store or CDN a blob is
//! redirected to. Every URL put into an error or a log line has its query
//! string removed, since a redirect's query is usually a signature.

use super::RegistryOptions;
use crate::backend::{BackendError, RedirectProblem};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use url::Url;

/// Redirect hops followed per request.
const MAX_REDIRECTS: u32 = 5;
/// Largest token response or error body read.
pub(super) const MAX_SMALL_BODY: u64 = 1 << 20;
/// Longest wait a server's Retry-After can impose on a worker.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Buffer for copying response bodies into the cache file.
const COPY_BUF: usize = 256 << 10;
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

/// The answer at the end of a chain of redirects.
pub(super) struct Reply {
    /// The response, of any status but 3xx.
    pub resp: ureq::Response,
    /// The URL that gave it.
    pub url: Url,
    /// Whether that URL is on the registry's origin (and so was sent the
    /// Authorization header).
    pub on_origin: bool,
}

/// The shared HTTP client with the backend's timeout and retry settings.
pub(super) struct Http {
    agent: ureq::Agent,
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
        let mut builder = ureq::AgentBuilder::new();
        if let Some(p) = &opts.proxy {
            match ureq::Proxy::new(p) {
                Ok(proxy) => builder = builder.proxy(proxy),
                Err(e) => log::warn!("proxy {}: {e}; connecting directly", redact_str(p)),
            }
        }
        if let Some(tls) = &opts.tls {
            builder = builder.tls_config(tls.clone());
        }
        let agent = builder
            // Redirects are followed by hand: see `follow`.
            .redirects(0)
            .timeout_connect(opts.timeout)
            .timeout_read(opts.timeout)
            .timeout_write(opts.timeout)
            .max_idle_connections_per_host(64)
            .user_agent(concat!("blobmgr/", env!("CARGO_PKG_VERSION")))
            .build();
        Http {
            agent,
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
    ) -> Result<ureq::Response, Failure> {
        let mut req = self
            .agent
            .request_url(method, url)
            .timeout(time_left(deadline, url)?);
        for (name, value) in headers {
            req = req.set(name, value);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        answer(method, url, req.call())
    }

    /// POSTs `form` (`application/x-www-form-urlencoded`) to `url`, no
    /// redirects followed, within `deadline`; like [`Http::call`]. The form
    /// is never logged (it may hold a token).
    pub fn post_form(
        &self,
        url: &Url,
        form: &[(&str, &str)],
        deadline: Instant,
    ) -> Result<ureq::Response, Failure> {
        let req = self
            .agent
            .request_url("POST", url)
            .timeout(time_left(deadline, url)?);
        self.requests.fetch_add(1, Ordering::Relaxed);
        answer("POST", url, req.send_form(form))
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
            if !matches!(resp.status(), 301 | 302 | 303 | 307 | 308) {
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

/// A response of any status, or the classified transport failure.
fn answer(
    method: &str,
    url: &Url,
    sent: Result<ureq::Response, ureq::Error>,
) -> Result<ureq::Response, Failure> {
    let resp = match sent {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(transport_failure(url, t)),
    };
    log::debug!("{method} {}: {}", redact(url), resp.status());
    Ok(resp)
}

/// Where redirect `resp` (hop number `hops` from `from`) sends us.
fn next_hop(resp: ureq::Response, from: &Url, hops: u32) -> Result<Url, Failure> {
    let redirect = |problem| {
        Failure::fatal(BackendError::Redirect {
            url: redact(from),
            problem,
        })
    };
    let status = resp.status();
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

/// A proxy URL for logs: without user info.
fn redact_str(u: &str) -> String {
    Url::parse(u).map_or_else(|_| "(unparsable)".to_owned(), |u| redact(&u))
}

/// The failure for a final answer that is neither 2xx nor handled by the
/// caller; `range` is the one asked for, if any.
pub(super) fn status_failure(reply: Reply, range: Option<(u64, u64)>) -> Failure {
    let status = reply.resp.status();
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
    resp: ureq::Response,
    skip: u64,
    dst: &File,
    offset: u64,
    len: u64,
    ctx: &str,
) -> Result<(), Failure> {
    let mut body = resp.into_reader();
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
        // Whole buffers per write: the HTTP client hands out a few KiB per
        // read, and each write takes the cache file's inode lock.
        let want = ((len - done) as usize).min(buf.len());
        let mut got = 0;
        while got < want {
            match body.read(&mut buf[got..want]) {
                Ok(0) => return Err(short(done + got as u64)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(short(done + got as u64))
                }
                Err(e) => return Err(body_failure(ctx, e)),
            }
        }
        let at = offset + done;
        dst.write_all_at(&buf[..got], at)
            .map_err(|e| Failure::fatal(BackendError::Io(format!("write cache at {at}"), e)))?;
        done += got as u64;
    }
    Ok(())
}

/// Reads a small body (a token response) whole, up to [`MAX_SMALL_BODY`].
pub(super) fn read_small_body(resp: ureq::Response, ctx: &str) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    resp.into_reader()
        .take(MAX_SMALL_BODY)
        .read_to_end(&mut body)
        .map_err(|e| body_failure(ctx, e))?;
    Ok(body)
}

/// Reads (a bounded amount of) a response we do not need so the connection
/// can go back to the pool.
pub(super) fn drain(resp: ureq::Response) {
    let _ = io::copy(
        &mut resp.into_reader().take(MAX_SMALL_BODY),
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

/// Whether a TLS certificate was refused somewhere behind `e` (rustls'
/// error travels inside an io::Error, whose `source` skips it).
fn certificate_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err
            .downcast_ref::<io::Error>()
            .and_then(|e| e.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| err.downcast_ref::<rustls::Error>());
        if matches!(tls, Some(rustls::Error::InvalidCertificate(_))) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A ureq transport error as text without its URL (which may carry a
/// signed query): kind, message and cause.
fn transport_detail(t: &ureq::Transport) -> String {
    let mut s = t.kind().to_string();
    if let Some(m) = t.message() {
        s = format!("{s}: {m}");
    }
    if let Some(cause) = std::error::Error::source(t) {
        s = format!("{s}: {cause}");
    }
    s
}

/// Classifies a transport error of a request to `url`: timeouts and
/// connection-level failures are retried, the rest (bad URL, TLS
/// configuration, a server certificate we refuse, …) are not.
fn transport_failure(url: &Url, t: ureq::Transport) -> Failure {
    use ureq::ErrorKind as K;
    let detail = transport_detail(&t);
    if is_timeout(io_kind(&t).unwrap_or(io::ErrorKind::Other)) {
        return Failure::transient(BackendError::Timeout(format!("{}: {detail}", redact(url))));
    }
    let retry = matches!(
        t.kind(),
        K::Dns | K::ConnectionFailed | K::Io | K::BadStatus | K::BadHeader | K::ProxyConnect
    ) && !certificate_refused(&t);
    Failure {
        err: BackendError::Transport {
            url: redact(url),
            detail,
            source: Box::new(t),
        },
        retry,
        after: None,
    }
}

/// A failure while reading a body: a timeout, or a broken connection; both
/// are worth another attempt.
fn body_failure(ctx: &str, e: io::Error) -> Failure {
    if is_timeout(e.kind()) {
        Failure::transient(BackendError::Timeout(format!("{ctx}: reading body: {e}")))
    } else {
        Failure::transient(BackendError::Io(format!("{ctx}: reading body"), e))
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
