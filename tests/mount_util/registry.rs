//! COPIED, TEMPORARILY: the minimum of tests/registry.rs's real
//! docker-registry harness that the mount test needs (start, push a blob,
//! read the access log), plus a daemon started without `--backend`. The
//! registry harness is moving to tests/common/registry.rs; once it lands,
//! this file goes and the mount tests use that one.

use crate::common::{bin, sha256, wait_until, DAEMON_WAIT};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .redirects(0)
        .build()
}

/// A docker-registry on 127.0.0.1 with its storage and log in a temp dir.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Registry {
    pub fn start() -> Registry {
        let ok = Command::new("docker-registry")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "docker-registry is not installed: run scripts/setup-test-deps.sh"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let r = Registry {
            child: Some(child),
            dir,
            port,
        };
        let (a, base) = (agent(), r.base());
        let up = wait_until(Duration::from_secs(20), || {
            a.get(&format!("{base}/v2/")).call().is_ok()
        });
        assert!(up, "docker-registry not ready: {}", r.log());
        r
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes `data` as a blob of `repo`; returns its digest's hex.
    pub fn push(&self, repo: &str, data: &[u8]) -> String {
        let hex: String = sha256(data).iter().map(|b| format!("{b:02x}")).collect();
        let a = agent();
        let resp = a
            .post(&format!("{}/v2/{repo}/blobs/uploads/", self.base()))
            .send_bytes(&[])
            .expect("start upload");
        let loc = resp
            .header("Location")
            .expect("upload Location")
            .to_string();
        let loc = url::Url::parse(&self.base())
            .and_then(|b| b.join(&loc))
            .expect("upload URL");
        let sep = if loc.query().is_some() { '&' } else { '?' };
        let resp = a
            .put(&format!("{loc}{sep}digest=sha256:{hex}"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .expect("finish upload");
        assert_eq!(resp.status(), 201);
        hex
    }

    /// Body bytes the registry sent for GETs of blob `hex` of `repo`, from
    /// its access log (`"GET /v2/REPO/blobs/sha256:HEX HTTP/1.1" STATUS
    /// BYTES`), once the log has caught up with the requests answered so far.
    pub fn blob_bytes_sent(&self, repo: &str, hex: &str) -> u64 {
        self.sync_log();
        let needle = format!("\"GET /v2/{repo}/blobs/sha256:{hex} ");
        self.log()
            .lines()
            .filter_map(|l| l.split_once(&needle).map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_once("\" ").map(|(_, after)| after))
            .filter_map(|after| after.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    }

    /// A request of our own, logged after every earlier response was
    /// complete (see tests/registry.rs for why this orders the log).
    fn sync_log(&self) {
        static MARK: AtomicU64 = AtomicU64::new(0);
        let mark = format!("log-mark={}", MARK.fetch_add(1, Ordering::Relaxed));
        agent()
            .get(&format!("{}/v2/?{mark}", self.base()))
            .call()
            .expect("registry answers /v2/");
        assert!(
            wait_until(Duration::from_secs(10), || self.log().contains(&mark)),
            "the registry never logged {mark}"
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `blobmgr serve` with no `--backend` (references only; its default
/// backend directory is created in its own temp dir, its working
/// directory), restartable on the same work dir.
pub struct RefDaemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub workdir: PathBuf,
}

impl RefDaemon {
    pub fn start() -> RefDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = RefDaemon {
            child: None,
            sock: dir.path().join("blobmgr.sock"),
            workdir: dir.path().join("work"),
            dir,
        };
        d.spawn();
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(bin())
            .arg("serve")
            .arg("--sock")
            .arg(&self.sock)
            .arg("--workdir")
            .arg(&self.workdir)
            .current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn blobmgr serve");
        self.child = Some(child);
        let sock = self.sock.clone();
        let up = wait_until(DAEMON_WAIT, || UnixStream::connect(&sock).is_ok());
        assert!(up, "daemon not ready: {}", self.log());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RefDaemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
