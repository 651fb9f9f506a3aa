//! Shared helpers for the integration tests: a daemon started from the real
//! binary in temp dirs, killed when the guard drops, and a raw protocol
//! client that sees exactly what the daemon sends.
#![allow(dead_code)]

use blobmgr::protocol::{self, Reply, Request};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `blobmgr serve`, killed (SIGKILL) and reaped on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub workdir: PathBuf,
    pub backend: PathBuf,
    pub extra: Vec<String>,
    /// Keeps the temp dir alive for the daemon's whole life (and restarts).
    pub dir: Option<tempfile::TempDir>,
    pub log: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blobmgr")
}

impl Daemon {
    /// Starts a daemon on a new temp dir holding `be/` (the backend
    /// directory), `work/` and the socket.
    pub fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = dir.path().join("be");
        std::fs::create_dir(&backend).expect("mkdir be");
        let mut d = Daemon {
            child: None,
            sock: dir.path().join("blobmgr.sock"),
            workdir: dir.path().join("work"),
            backend: backend.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: dir.path().join("daemon.log"),
            dir: Some(dir),
        };
        d.spawn();
        d
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
    }

    /// Starts the process through `sh -c 'umask UMASK; exec blobmgr serve …'`
    /// (the umask is process-wide, so it is not set in the test process), and
    /// waits until it answers.
    pub fn spawn_with_umask(&mut self, umask: u32) {
        self.spawn_inner(Some(umask));
    }

    fn spawn_inner(&mut self, umask: Option<u32>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match umask {
            None => Command::new(bin()),
            Some(umask) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {umask:03o}; exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
        };
        let child = cmd
            .arg("serve")
            .arg("--sock")
            .arg(&self.sock)
            .arg("--workdir")
            .arg(&self.workdir)
            .arg("--backend")
            .arg(&self.backend)
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn blobmgr");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("daemon exited early ({st}): {}", self.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("daemon not ready after 20 s: {}", self.log_text());
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

    /// Sends `sig`, then waits for the exit status.
    pub fn stop_with(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).expect("kill");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not exit after {sig}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A raw protocol connection to this daemon.
    pub fn raw(&self) -> Raw {
        Raw::connect(&self.sock)
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

/// A blocking raw-protocol connection that keeps every fd it receives in
/// arrival order.
pub struct Raw {
    pub sock: UnixStream,
    buf: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    next_tag: u64,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Raw {
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
            next_tag: 1,
        }
    }

    pub fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// Sends `req` with NEED_REPLY (or not); returns its tag.
    pub fn send(&mut self, req: &Request, need_reply: bool) -> u64 {
        let tag = self.tag();
        let mut out = Vec::new();
        protocol::encode_request(&mut out, tag, need_reply, req);
        self.sock.write_all(&out).expect("send");
        tag
    }

    pub fn send_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.sock.write_all(b)
    }

    /// Receives the next reply, or an error on EOF/timeout/garbage.
    pub fn recv(&mut self) -> io::Result<(u64, Reply)> {
        loop {
            match protocol::decode_reply(&self.buf) {
                Ok(Some((tag, r, n))) => {
                    self.buf.drain(..n);
                    return Ok((tag, r));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let mut chunk = [0u8; 8192];
            let mut space = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                // With a receive timeout set, the kernel does not restart
                // recvmsg after a signal.
                Err(nix::errno::Errno::EINTR) => continue,
                r => r?,
            };
            let n = msg.bytes;
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: freshly received from the kernel, owned by nobody else.
                        self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One request, one reply (with its tag checked).
    pub fn call(&mut self, req: &Request) -> Reply {
        let tag = self.send(req, true);
        let (t, r) = self.recv().expect("reply");
        assert_eq!(t, tag, "reply to another request");
        r
    }

    /// GetBlob; returns (token, result) and the fd when one came.
    pub fn get_blob(&mut self, generation: u32, id: &str) -> (u64, u32, Option<OwnedFd>) {
        let before = self.fds.len();
        match self.call(&Request::get_blob(generation, id).expect("id fits")) {
            Reply::GetBlob { token, result, .. } => {
                let fd = if self.fds.len() > before {
                    Some(self.fds.remove(before))
                } else {
                    None
                };
                (token, result, fd)
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// FetchRange; returns (count, result).
    pub fn fetch(&mut self, token: u64, start: u64, count: u64) -> (u64, u32) {
        match self.call(&Request::FetchRange {
            token,
            start,
            count,
        }) {
            Reply::FetchRange {
                count,
                result,
                token: t,
            } => {
                assert_eq!(t, token);
                (count, result)
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// Whether the daemon has closed this connection (EOF within `wait`).
    pub fn is_closed(&mut self, wait: Duration) -> bool {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let r = matches!(self.recv(), Err(e) if e.kind() == io::ErrorKind::UnexpectedEof
            || e.kind() == io::ErrorKind::ConnectionReset);
        self.sock
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        r
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(&s.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A small deterministic random generator for test choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

// ---- Added for tests/hardening.rs, tests/soak.rs and tests/fuzz_decoder.rs ----

impl Daemon {
    /// Like [`Daemon::start`] but without starting the process: the caller
    /// may change the paths (e.g. put `workdir` on a mount) and then call
    /// [`Daemon::spawn`] or [`Daemon::spawn_with_umask`].
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
            log: dir.path().join("daemon.log"),
            dir: Some(dir),
        }
    }

    /// Waits up to `wait` for the daemon's log to contain `needle`.
    pub fn wait_log(&self, needle: &str, wait: Duration) -> bool {
        wait_until(wait, || self.log_text().contains(needle))
    }
}

/// Polls `f` every 10 ms until it returns true or `wait` has passed.
pub fn wait_until(wait: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Raw {
    /// Like [`Raw::connect`], but returns the error instead of panicking.
    pub fn try_connect(path: &Path) -> io::Result<Raw> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Raw {
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
            next_tag: 1,
        })
    }

    /// Like [`Raw::call`], but every failure (send, EOF, timeout, garbage, a
    /// reply to another tag) is an error instead of a panic.
    pub fn try_call(&mut self, req: &Request) -> io::Result<Reply> {
        let tag = self.tag();
        let mut out = Vec::new();
        protocol::encode_request(&mut out, tag, true, req);
        self.sock.write_all(&out)?;
        let (t, r) = self.recv()?;
        if t != tag {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply to tag {t}, expected {tag}"),
            ));
        }
        Ok(r)
    }

    /// GetBlob without panics: (token, result, fd).
    pub fn try_get_blob(
        &mut self,
        generation: u32,
        id: &str,
    ) -> io::Result<(u64, u32, Option<OwnedFd>)> {
        let before = self.fds.len();
        let req = Request::get_blob(generation, id).expect("id fits");
        match self.try_call(&req)? {
            Reply::GetBlob { token, result, .. } => {
                let fd = if self.fds.len() > before {
                    Some(self.fds.remove(before))
                } else {
                    None
                };
                Ok((token, result, fd))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// FetchRange without panics: (count, result).
    pub fn try_fetch(&mut self, token: u64, start: u64, count: u64) -> io::Result<(u64, u32)> {
        match self.try_call(&Request::FetchRange {
            token,
            start,
            count,
        })? {
            Reply::FetchRange {
                count,
                result,
                token: t,
            } if t == token => Ok((count, result)),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected reply {other:?}"),
            )),
        }
    }
}
