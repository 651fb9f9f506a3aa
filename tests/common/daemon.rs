//! The real binary as a guarded child process.

use super::raw::Raw;
use super::wait::{wait_exit, wait_until};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// How long a daemon may take to start answering, or to exit on a signal.
pub const DAEMON_WAIT: Duration = Duration::from_secs(20);

/// The daemon binary cargo built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blobmgr")
}

/// A `blobmgr serve` on a temp dir holding `be/` (the backend directory),
/// `work/`, the socket and `daemon.log` (its stderr, `RUST_LOG=info` unless
/// the test's environment sets `RUST_LOG`). Killed (SIGKILL) and reaped on
/// drop, even when the test panics.
pub struct Daemon {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub workdir: PathBuf,
    pub backend: PathBuf,
    /// Arguments after `serve --sock … --workdir … --backend …` (a later
    /// `--backend` replaces the directory, e.g. with a registry URL).
    pub extra: Vec<String>,
    /// Environment variables set for the process.
    pub env: Vec<(String, String)>,
    /// Environment variables removed from the process's environment
    /// (before `env` is applied).
    pub env_remove: Vec<String>,
    /// Whether `--backend <backend>` is passed (default). Without it the
    /// daemon runs in the temp dir, so its default backend directory
    /// (relative) lands there.
    pub backend_arg: bool,
    /// Whether `--sock <sock>` is passed (default). Without it the daemon
    /// runs in the temp dir without `BLOBMGR_SOCK`, on its default socket
    /// (relative): the test points `sock` at it.
    pub sock_arg: bool,
    /// A command that runs the daemon: `blobmgr serve …` becomes its last
    /// arguments (e.g. `systemd-socket-activate -l SOCK`). Empty: none.
    pub launcher: Vec<String>,
    /// The binary to run instead of the one cargo built (an upgrade test
    /// runs a copy it can replace).
    pub exe: Option<PathBuf>,
    /// Keeps the temp dir alive for the daemon's whole life (and restarts).
    pub dir: Option<tempfile::TempDir>,
    pub log: PathBuf,
}

/// Environment variables that change how registries are reached (proxies,
/// Docker's config); registry tests remove them so the machine's own never
/// leak in.
pub const REACH_VARS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "DOCKER_CONFIG",
];

impl Daemon {
    /// Runs the daemon without the machine's proxies and Docker login:
    /// [`REACH_VARS`] removed, `DOCKER_CONFIG` and `HOME` in its temp dir.
    pub fn isolate_registry_env(&mut self) {
        self.env_remove = REACH_VARS.iter().map(|s| s.to_string()).collect();
        let dir = self.dir.as_ref().expect("temp dir").path().to_path_buf();
        let docker = dir.join("no-docker").display().to_string();
        self.env.push(("DOCKER_CONFIG".into(), docker));
        self.env.push(("HOME".into(), dir.display().to_string()));
    }

    /// Starts a daemon on a new temp dir and waits until it answers.
    pub fn start(extra: &[&str]) -> Daemon {
        let mut d = Daemon::prepare(extra);
        d.spawn();
        d
    }

    /// Like [`Daemon::start`] but without starting the process: the caller
    /// may change the paths (e.g. put `workdir` on a mount) or `env`, and
    /// then call [`Daemon::spawn`] or [`Daemon::spawn_with_umask`].
    pub fn prepare(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = dir.path().join("be");
        std::fs::create_dir(&backend).expect("mkdir be");
        Daemon {
            child: None,
            sock: dir.path().join("blobmgr.sock"),
            workdir: dir.path().join("work"),
            backend,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            env_remove: Vec::new(),
            backend_arg: true,
            sock_arg: true,
            launcher: Vec::new(),
            exe: None,
            log: dir.path().join("daemon.log"),
            dir: Some(dir),
        }
    }

    /// Writes a blob into the backend directory.
    pub fn add_blob(&self, id: &str, data: &[u8]) -> PathBuf {
        let p = self.backend.join(id);
        std::fs::write(&p, data).expect("write blob");
        p
    }

    /// Starts the process (again) on the same dirs and waits until it answers.
    pub fn spawn(&mut self) {
        self.spawn_inner(None);
        self.wait_ready();
    }

    /// Starts the process and returns at once, for tests that wait for
    /// something else (a readiness notification, a refusal and exit).
    pub fn spawn_unready(&mut self) {
        self.spawn_inner(None);
    }

    /// Starts the process through `sh -c 'umask UMASK; exec blobmgr serve …'`
    /// (the umask is process-wide, so it is not set in the test process), and
    /// waits until it answers.
    pub fn spawn_with_umask(&mut self, umask: u32) {
        self.spawn_inner(Some(umask));
        self.wait_ready();
    }

    fn spawn_inner(&mut self, umask: Option<u32>) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match (umask, self.launcher.split_first()) {
            (Some(umask), _) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {umask:03o}; exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
            (None, Some((launcher, args))) => {
                let mut c = Command::new(launcher);
                c.args(args).arg(bin());
                c
            }
            (None, None) => Command::new(self.exe.as_deref().unwrap_or(Path::new(bin()))),
        };
        cmd.arg("serve");
        if self.sock_arg {
            cmd.arg("--sock").arg(&self.sock);
        } else {
            cmd.env_remove("BLOBMGR_SOCK");
        }
        cmd.arg("--workdir").arg(&self.workdir);
        if self.backend_arg {
            cmd.arg("--backend").arg(&self.backend);
        }
        if !self.backend_arg || !self.sock_arg {
            if let Some(dir) = &self.dir {
                cmd.current_dir(dir.path());
            }
        }
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        if !self.extra.iter().any(|a| a.starts_with("--min-free")) {
            // The default watermark (10 % of the file system) depends on
            // how full the machine's disk is; tests that are not about it
            // keep none. tests/disk.rs tests the watermark on a tmpfs.
            cmd.arg("--min-free").arg("0");
        }
        let child = cmd
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn blobmgr");
        self.child = Some(child);
    }

    /// Waits until the socket accepts a connection (the probe connection is
    /// closed at once), or fails if the process exits first.
    fn wait_ready(&mut self) {
        let sock = self.sock.clone();
        let child = self.child.as_mut().expect("daemon spawned");
        let mut exited = None;
        let done = wait_until(DAEMON_WAIT, || {
            if UnixStream::connect(&sock).is_ok() {
                return true;
            }
            exited = child.try_wait().ok().flatten();
            exited.is_some()
        });
        if let Some(st) = exited {
            self.child = None;
            panic!("daemon exited early ({st}): {}", self.log_text());
        }
        assert!(
            done,
            "daemon not ready after {DAEMON_WAIT:?}: {}",
            self.log_text()
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig`, then waits (blocked in `wait(2)`, at most
    /// [`DAEMON_WAIT`]) for the exit status.
    pub fn stop_with(&mut self, sig: nix::sys::signal::Signal) -> ExitStatus {
        let c = self.child.take().expect("daemon running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).expect("kill");
        match wait_exit(c, DAEMON_WAIT) {
            Some(st) => st,
            None => panic!(
                "daemon did not exit within {DAEMON_WAIT:?} after {sig} (killed): {}",
                self.log_text()
            ),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `wait` for the daemon's log to contain `needle`.
    pub fn wait_log(&self, needle: &str, wait: Duration) -> bool {
        wait_until(wait, || self.log_text().contains(needle))
    }

    /// A raw protocol connection to this daemon.
    pub fn raw(&self) -> Raw {
        Raw::connect(&self.sock)
    }

    /// The value of one sample of the daemon's metrics (`<sock>.metrics`),
    /// named with its labels as exposed, e.g.
    /// `blobmgr_requests_total{op="noop",result="ok"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        use std::io::{Read, Write};
        let path = format!("{}.metrics", self.sock.display());
        let mut s = std::os::unix::net::UnixStream::connect(&path).expect("metrics socket");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read metrics");
        let line = text
            .lines()
            .find(|l| l.strip_prefix(sample).is_some_and(|r| r.starts_with(' ')))
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"));
        line[sample.len()..].trim().parse().expect("a number")
    }

    /// Number of fds the daemon process has open.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size of the daemon in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
