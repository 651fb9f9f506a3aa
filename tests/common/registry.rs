//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry, 2.8) on 127.0.0.1 with a generated config, in one
//! of four modes:
//!
//! - anonymous ([`Registry::start`]);
//! - anonymous over HTTPS ([`Registry::start_tls`]): `http.tls.certificate`
//!   and `key` from a [`TestCa`]; the harness's own requests trust that CA
//!   alone;
//! - htpasswd basic auth ([`Registry::start_basic`]): bcrypt entries made
//!   by `htpasswd -niB` (apache2-utils, installed by
//!   `scripts/setup-test-deps.sh`), the password given on its stdin;
//! - a pull-through mirror of another, anonymous, registry
//!   ([`Registry::start_mirror`]: `proxy: remoteurl: http://127.0.0.1:PORT`).
//!   Pushing to a mirror is unsupported (the registry refuses it), so tests
//!   push to the origin.
//!
//! What a proxy-mode registry 2.8 does, observed with curl against this
//! package (2.8.2+ds1) and checked by `tests/registry_infra.rs`:
//!
//! - At start it GETs the origin's `/v2/` to learn its auth challenge and
//!   *panics* (exits) when the origin cannot be reached: a mirror can only
//!   be (re)started while its origin is up.
//! - A GET of a blob it does not have yet, with `Range: bytes=100-199`,
//!   answers **200 with the whole blob** (`Content-Length` = blob size, no
//!   `Accept-Ranges`, no `Content-Range`) and logs the whole size as
//!   written. It reads the blob from the origin twice: once to stream it to
//!   the client and once, in the background, to store it. Until that store
//!   has finished, further GETs are cold too (each again 200 with the whole
//!   blob, streamed from the origin once more: one more origin GET each).
//! - Once stored (see [`Registry::has_stored`]) a Range GET answers 206
//!   with just the range. Storing ends with two steps: the data file is
//!   renamed into `blobs/sha256/<hh>/<hex>/data`, then the repository's
//!   `_layers/sha256/<hex>/link` is written in place (created empty, then
//!   filled). A GET that finds that link empty answers 500 ("unknown
//!   error": the digest in it does not parse), so a test waits for the
//!   link to hold the digest, not for the data file.
//! - A HEAD of a cold blob answers 200 with the size, but is served like a
//!   GET: the mirror pulls the blob from the origin (and starts storing it),
//!   and the access log counts the whole size as written although no body
//!   is sent. Hence [`Registry::blob_get_bytes`] counts GETs only.
//! - A blob the origin lacks (or a repository it lacks) answers 404
//!   `BLOB_UNKNOWN`, as the origin does.
//! - It cannot front a basic-auth origin (see [`Registry::start_mirror`]).
//!
//! Access log: with `log.accesslog.disabled: false` the registry writes one
//! Combined Log Format line per request on stdout,
//! `127.0.0.1 - - [28/Nov/2026:19:27:06 +0000] "GET /v2/r/blobs/sha256:… HTTP/1.1" 206 100 "" "curl/7.88.1"`,
//! where the number after the status is the bytes of body written to the
//! client (for a client that went away early, what was written before the
//! write failed). Its logrus lines on stderr carry the same figure as
//! `http.response.written=N` in a "response completed" line; we parse the
//! Combined line ([`Access::parse`]) and ignore everything else.
//!
//! A request's Combined line is written when its handler returns, which can
//! be after the client already has the body, or long after a client that
//! went away early stopped reading (the handler only notices at its next
//! write). So counts are read after [`Registry::sync_log`]: a marked request
//! of our own, waited for (with a deadline) until its line is in the log,
//! and until no request is still in the registry's hands. For the latter the
//! registry runs at `log.level: debug`, where every request that reaches the
//! API begins with a logrus line `msg="authorizing request"` (the completion
//! lines are not reliable: a 401 ends with a warning instead); a run of the
//! registry has no request in flight once it has written at least as many
//! Combined lines as "authorizing request" lines.

use super::access::Access;
use super::tls::{agent_trusting, TestCa};
use super::wait::wait_until;
use base64::Engine;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a registry may take to answer `/v2/` after it was started, or
/// to log a request.
pub const REGISTRY_WAIT: Duration = Duration::from_secs(20);

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The sha256 digest of `data`, as 64 lowercase hex digits.
pub fn digest_hex(data: &[u8]) -> String {
    hex(&super::sha256(data))
}

/// A port that was free on `ip` a moment ago.
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether `docker-registry` is installed.
pub fn registry_available() -> bool {
    Command::new("docker-registry")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A ureq agent for the harness's own requests, with `tls` if given: every
/// status comes back as a response, redirects are not followed, and no
/// proxy is taken from the environment.
pub fn agent_with(tls: Option<ureq::tls::TlsConfig>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .max_redirects(0)
        .http_status_as_error(false)
        .proxy(None);
    if let Some(tls) = tls {
        config = config.tls_config(tls);
    }
    config.build().new_agent()
}

/// A ureq agent that does not follow redirects.
pub fn agent() -> ureq::Agent {
    agent_with(None)
}

/// A response of a harness agent.
pub type Response = ureq::http::Response<ureq::Body>;

/// The first value of header `name` of `resp`, if it is text.
pub fn response_header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name)?.to_str().ok()
}

/// `Authorization: Basic …` for `user:password`.
pub fn basic_header(user: &str, password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b64}")
}

/// How a registry is set up.
#[derive(Clone, Debug, Default)]
struct Mode {
    /// htpasswd basic auth for this user and password.
    basic: Option<(String, String)>,
    /// Pull-through mirror of this origin base URL.
    upstream: Option<String>,
    /// HTTPS with this certificate and key; requests trust this CA file.
    tls: Option<TlsFiles>,
}

/// The PEM files of an HTTPS registry.
#[derive(Clone, Debug)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// A `docker-registry` child process on 127.0.0.1, its storage and log in a
/// temp dir. Killed (SIGKILL) and reaped on drop.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    mode: Mode,
    /// Where the current run's part of the log starts.
    run_start: usize,
}

impl Registry {
    /// An anonymous registry.
    pub fn start() -> Registry {
        Registry::start_mode(Mode::default())
    }

    /// A registry that wants basic auth as `user` / `password` for every
    /// request (htpasswd with a bcrypt entry).
    pub fn start_basic(user: &str, password: &str) -> Registry {
        for s in [user, password] {
            assert!(
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "test credentials are [A-Za-z0-9._-]+ (they go into YAML and shell scripts)"
            );
        }
        Registry::start_mode(Mode {
            basic: Some((user.into(), password.into())),
            ..Mode::default()
        })
    }

    /// An anonymous pull-through mirror of the anonymous `origin`, which
    /// must be running (the mirror exits at start when it cannot reach its
    /// origin). Registry 2.8 cannot mirror a basic-auth origin: its proxy
    /// looks the configured `username`/`password` up by the challenge's
    /// realm as a URL (made for token servers), so with htpasswd's
    /// `Basic realm="…"` it sends none and answers 500 "unauthorized".
    pub fn start_mirror(origin: &Registry) -> Registry {
        assert!(
            origin.mode.basic.is_none(),
            "registry 2.8 cannot mirror a basic-auth origin"
        );
        Registry::start_mode(Mode {
            upstream: Some(origin.base()),
            ..Mode::default()
        })
    }

    /// An anonymous registry serving HTTPS with `ca`'s server certificate
    /// for 127.0.0.1 ([`Registry::base`] is then `https://…`).
    pub fn start_tls(ca: &TestCa) -> Registry {
        Registry::start_mode(Mode {
            tls: Some(TlsFiles {
                cert: ca.server_cert(),
                key: ca.server_key(),
                ca: ca.ca(),
            }),
            ..Mode::default()
        })
    }

    fn start_mode(mode: Mode) -> Registry {
        assert!(
            registry_available(),
            "docker-registry is not installed: run scripts/setup-test-deps.sh"
        );
        let mut r = Registry {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port("127.0.0.1"),
            mode,
            run_start: 0,
        };
        r.write_config();
        r.spawn();
        r
    }

    pub fn is_mirror(&self) -> bool {
        self.mode.upstream.is_some()
    }

    /// The credentials this registry wants, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.mode
            .basic
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// `127.0.0.1:PORT`, the host part of a reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (`https://` for [`Registry::start_tls`]).
    pub fn base(&self) -> String {
        let scheme = if self.mode.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.host())
    }

    /// `http://127.0.0.1:PORT/REPO` (a `--backend` URL).
    pub fn url(&self, repo: &str) -> String {
        format!("{}/{repo}", self.base())
    }

    /// `127.0.0.1:PORT/REPO@sha256:HEX`, a blob reference.
    pub fn reference(&self, repo: &str, hex: &str) -> String {
        format!("{}/{repo}@sha256:{hex}", self.host())
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let mut cfg = format!(
            "version: 0.1\n\
             log:\n  level: debug\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{}\n",
            d.join("storage").display(),
            self.port
        );
        if let Some(t) = &self.mode.tls {
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.cert.display(),
                t.key.display()
            ));
        }
        if let Some((user, password)) = &self.mode.basic {
            let htpasswd = d.join("htpasswd");
            std::fs::write(&htpasswd, bcrypt_entry(user, password)).expect("write htpasswd");
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: blobmgr-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some(url) = &self.mode.upstream {
            cfg.push_str(&format!("proxy:\n  remoteurl: {url}\n"));
        }
        std::fs::write(d.join("config.yml"), cfg).expect("write config");
    }

    /// Sends a request to this registry with `headers` and `body` (none
    /// for GET and HEAD), with its credentials if it wants some (trusting
    /// its CA, over HTTPS). Any status is an answer.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, ureq::Error> {
        let agent = match &self.mode.tls {
            Some(t) => agent_trusting(&t.ca),
            None => agent(),
        };
        let mut r = ureq::http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        if let Some((u, p)) = &self.mode.basic {
            r = r.header("Authorization", basic_header(u, p));
        }
        match body {
            Some(b) => agent.run(r.body(b)?),
            None => agent.run(r.body(())?),
        }
    }

    /// Starts (or restarts) the registry on the same port, storage and
    /// config, and waits until `/v2/` answers 200. A mirror needs its
    /// origin running.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        self.run_start = self.log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        self.child = Some(child);
        let probe = format!("{}/v2/", self.base());
        let mut exited = None;
        let done = wait_until(REGISTRY_WAIT, || {
            if let Ok(r) = self.send("GET", &probe, &[], None) {
                if r.status() == 200 {
                    return true;
                }
            }
            let child = self.child.as_mut().expect("registry spawned");
            exited = child.try_wait().ok().flatten();
            exited.is_some()
        });
        if let Some(st) = exited {
            self.child = None;
            panic!("docker-registry exited ({st}): {}", self.log());
        }
        assert!(done, "docker-registry not ready: {}", self.log());
    }

    /// SIGKILL and reap; [`Registry::spawn`] starts it again.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything the registry logged (stdout and stderr), all runs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Pushes `data` as a blob of `repo` (monolithic upload: POST
    /// `/v2/<repo>/blobs/uploads/`, then PUT `?digest=`), with this
    /// registry's credentials; returns its digest's hex.
    pub fn push(&self, repo: &str, data: &[u8]) -> String {
        assert!(!self.is_mirror(), "push to the origin, not to a mirror");
        let hex = digest_hex(data);
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base());
        let resp = self
            .send("POST", &url, &[], Some(&[]))
            .expect("start upload");
        assert_eq!(resp.status(), 202);
        let loc = response_header(&resp, "Location").expect("upload Location");
        let loc = url::Url::parse(&self.base())
            .and_then(|b| b.join(loc))
            .expect("upload URL");
        let sep = if loc.query().is_some() { '&' } else { '?' };
        let resp = self
            .send(
                "PUT",
                &format!("{loc}{sep}digest=sha256:{hex}"),
                &[("Content-Type", "application/octet-stream")],
                Some(data),
            )
            .expect("finish upload");
        assert_eq!(resp.status(), 201);
        hex
    }

    /// GET (or HEAD) of a blob, with a Range header when `range` is given
    /// (`[start, end]`, inclusive): status, headers of interest and body.
    pub fn get_blob(
        &self,
        method: &str,
        repo: &str,
        hex: &str,
        range: Option<(u64, u64)>,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let url = format!("{}/v2/{repo}/blobs/sha256:{hex}", self.base());
        let range = range.map(|(a, b)| format!("bytes={a}-{b}"));
        let headers: Vec<(&str, &str)> = range.iter().map(|r| ("Range", r.as_str())).collect();
        let resp = match self.send(method, &url, &headers, None) {
            Ok(r) => r,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_body().into_reader(), &mut body)
            .expect("read body");
        (status, headers, body)
    }

    /// Whether the registry's storage holds the blob for `repo` (a mirror
    /// has finished storing what it pulled): its data file is in place and
    /// the repository's link to it holds the digest, written last.
    pub fn has_stored(&self, repo: &str, hex: &str) -> bool {
        let v2 = self.dir.path().join("storage/docker/registry/v2");
        let data = v2
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let link = v2
            .join("repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(hex)
            .join("link");
        data.is_file() && std::fs::read(link).is_ok_and(|l| l == format!("sha256:{hex}").as_bytes())
    }

    /// Every access-log line so far, once the log has caught up (see
    /// [`Registry::sync_log`]); all runs of this registry.
    pub fn accesses(&self) -> Vec<Access> {
        self.sync_log();
        self.log().lines().filter_map(Access::parse).collect()
    }

    /// Access-log entries for the blob `hex` (any repository, any method).
    pub fn blob_accesses(&self, hex: &str) -> Vec<Access> {
        self.accesses()
            .into_iter()
            .filter(|a| a.blob().is_some_and(|(_, h)| h == hex))
            .collect()
    }

    /// GETs of blob `hex` in `repo`.
    pub fn blob_gets(&self, repo: &str, hex: &str) -> usize {
        self.accesses()
            .iter()
            .filter(|a| a.method == "GET" && a.blob() == Some((repo, hex)))
            .count()
    }

    /// GETs of blob `hex`, any repository.
    pub fn blob_gets_any(&self, hex: &str) -> usize {
        self.blob_accesses(hex)
            .iter()
            .filter(|a| a.method == "GET")
            .count()
    }

    /// Body bytes written for GETs of blob `hex`, any repository (HEADs are
    /// left out: a mirror logs a cold HEAD as if it had sent the blob).
    pub fn blob_get_bytes(&self, hex: &str) -> u64 {
        self.blob_accesses(hex)
            .iter()
            .filter(|a| a.method == "GET")
            .map(|a| a.bytes)
            .sum()
    }

    /// Requests other than [`Registry::sync_log`]'s own and the readiness
    /// probes (`GET /v2/` without a query).
    pub fn api_requests(&self) -> Vec<Access> {
        self.accesses()
            .into_iter()
            .filter(|a| {
                !(a.path == "/v2/" && (a.query.is_empty() || a.query.starts_with("log-mark=")))
            })
            .collect()
    }

    /// Waits for the access log to catch up with the requests answered so
    /// far (see the module docs): a request of our own, on a connection of
    /// its own, made after those responses were complete, until its line is
    /// logged; and until the current run has no request in flight (at least
    /// as many Combined lines as `authorizing request` lines), so a handler
    /// still writing to a client that has gone is counted too.
    pub fn sync_log(&self) {
        static MARK: AtomicU64 = AtomicU64::new(0);
        let mark = format!(
            "log-mark={}-{}",
            self.port,
            MARK.fetch_add(1, Ordering::Relaxed)
        );
        self.send("GET", &format!("{}/v2/?{mark}", self.base()), &[], None)
            .expect("registry answers /v2/");
        let settled = || {
            let log = self.log();
            let run = log.get(self.run_start..).unwrap_or("");
            let (mut started, mut logged, mut marked) = (0, 0, false);
            for line in run.lines() {
                if line.starts_with("time=") {
                    started += line.contains("msg=\"authorizing request\"") as usize;
                } else if let Some(a) = Access::parse(line) {
                    logged += 1;
                    marked |= a.path == "/v2/" && a.query == mark;
                }
            }
            marked && logged >= started
        };
        assert!(
            wait_until(REGISTRY_WAIT, settled),
            "the registry never logged {mark}, or still has requests in flight: {}",
            self.log()
        );
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `user:<bcrypt hash>\n`, from `htpasswd -niB` (the password on stdin,
/// never on a command line).
pub fn bcrypt_entry(user: &str, password: &str) -> String {
    assert!(
        runs("htpasswd", "-h"),
        "htpasswd is not installed (apache2-utils): run scripts/setup-test-deps.sh"
    );
    let mut child = Command::new("htpasswd")
        .args(["-niB", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run htpasswd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("password to htpasswd");
    let out = child.wait_with_output().expect("htpasswd output");
    assert!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).expect("htpasswd output is text");
    let line = line.trim();
    assert!(
        line.starts_with(&format!("{user}:$2")),
        "not a bcrypt entry: {line}"
    );
    format!("{line}\n")
}

/// Ids that are meant as references (they contain `/` or `@`) but are not
/// valid ones, each with why; `host` is `HOST:PORT` of a live registry and
/// `hex` a digest it has, so only the malformation is wrong.
pub fn malformed_references(host: &str, hex: &str) -> Vec<(String, &'static str)> {
    let d = format!("sha256:{hex}");
    let v = |s: String, why: &'static str| (s, why);
    vec![
        v(format!("{host}/Lib/app@{d}"), "uppercase repository"),
        v(
            format!("{host}/lib/app@sha256:{}", &hex[..63]),
            "63 hex digits",
        ),
        v(format!("{host}/lib/app@sha256:{hex}0"), "65 hex digits"),
        v(
            format!("{host}/lib/app@sha256:{}", hex.to_uppercase()),
            "uppercase hex",
        ),
        v(format!("{host}/lib/app"), "missing digest"),
        v(format!("{host}/lib/app@"), "empty digest"),
        v(format!("{host}/lib/app@sha512:{hex}{hex}"), "sha512"),
        v(format!("{host}/lib/app@{hex}"), "digest without algorithm"),
        v(format!("/lib/app@{d}"), "empty host"),
        v(format!("127.0.0.1:0/lib/app@{d}"), "port 0"),
        v(format!("127.0.0.1:65536/lib/app@{d}"), "port 65536"),
        v(format!("127.0.0.1:/lib/app@{d}"), "empty port"),
        v(format!("127.0.0.1:50x0/lib/app@{d}"), "port not a number"),
        v(format!("{host}/a b@{d}"), "space in repository"),
        v(format!("{host}/lib/../app@{d}"), "`..` component"),
        v(format!("{host}/lib/app/@{d}"), "trailing /"),
        v(format!("{host}/lib//app@{d}"), "empty component"),
        v(format!("{host}/lib/app:latest"), "tag instead of digest"),
        v(format!("{host}/lib/app:latest@{d}"), "tag and digest"),
        v(format!("{host}@{d}"), "no repository"),
        v(
            format!("{host}/_lib/app@{d}"),
            "component starting with a separator",
        ),
        v(
            format!("{host}/lib/app-@{d}"),
            "component ending with a separator",
        ),
        v(
            format!("-bad.example.com/lib/app@{d}"),
            "host label starting with -",
        ),
        v(format!("[::1/lib/app@{d}"), "unclosed IPv6 bracket"),
        v(format!("registry/lib/app@{d}"), "dotless host without port"),
        v(format!("{host}/lib/app@{d}@{d}"), "two digests"),
    ]
}
