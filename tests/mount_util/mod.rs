//! Harness of tests/mount.rs: `blobmgr mount` as a guarded child process,
//! prerequisites that fail loudly, EROFS images and trees to compare, the
//! cache as `blobmgr cache ls` sees it. Registries and daemons come from
//! the shared harness in tests/common.
#![allow(dead_code)]

pub mod tree;

use crate::common::{bin, wait_exit, wait_until, DAEMON_WAIT};
use blobmgr::mount::mountpoint::{mount_at, FSTYPE};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Fails the test (never skips it) unless FUSE can be mounted here.
pub fn require_fuse() {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("these tests mount FUSE file systems and must run as root".to_string())
    } else if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse does not exist (modprobe fuse)".to_string())
    } else if !filesystems()
        .lines()
        .any(|l| l.trim_end().ends_with("\tfuse"))
    {
        Some("the kernel lists no fuse file system in /proc/filesystems".to_string())
    } else {
        None
    };
    if let Some(why) = why {
        panic!("FUSE IS MISSING — this test FAILS rather than skip: {why}");
    }
}

/// Fails the test (never skips it) unless EROFS images can be built and
/// mounted here.
pub fn require_erofs() {
    require_fuse();
    let mkfs = Command::new("mkfs.erofs")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        mkfs,
        "EROFS IS MISSING — this test FAILS rather than skip: no mkfs.erofs \
         (run scripts/setup-test-deps.sh, package erofs-utils)"
    );
    assert!(
        filesystems()
            .lines()
            .any(|l| l.trim_end().ends_with("erofs")),
        "EROFS IS MISSING — this test FAILS rather than skip: the kernel has no erofs"
    );
}

fn filesystems() -> String {
    std::fs::read_to_string("/proc/filesystems").unwrap_or_default()
}

/// Whether a live blobmgr mount is at `dir`.
pub fn is_mounted(dir: &Path) -> bool {
    mount_at(dir).is_some_and(|m| m.fstype == FSTYPE)
}

/// `blobmgr mount` as a child process on a mount point of its own (a temp
/// dir unless given), its stderr in `log`. Dropping it SIGKILLs the process
/// and detaches whatever is still mounted there.
pub struct Mounted {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Mounted {
    /// Mounts the daemon at `sock` on a new temp dir, with `extra` options.
    pub fn start(sock: &Path, extra: &[&str]) -> Mounted {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).expect("mkdir mnt");
        let mut m = Mounted::spawn(sock, &dir, extra);
        m._tmp = Some(tmp);
        m
    }

    /// Starts `blobmgr mount` on `dir` and waits until it is mounted.
    pub fn spawn(sock: &Path, dir: &Path, extra: &[&str]) -> Mounted {
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let log = dir.with_extension("log");
        // The log may hold an earlier mount's lines: wait for this one's.
        let from = std::fs::metadata(&log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let mut m = Mounted {
            child: Some(spawn_mount(sock, &dir, extra, &log)),
            dir,
            log,
            _tmp: None,
        };
        let child = m.child.as_mut().expect("spawned");
        let mut exited = None;
        let up = wait_until(DAEMON_WAIT, || {
            exited = child.try_wait().ok().flatten();
            let text = std::fs::read(&m.log).unwrap_or_default();
            let ours = text.get(from..).unwrap_or_default();
            exited.is_some() || (is_mounted(&m.dir) && contains(ours, b"mounted at"))
        });
        if let Some(st) = exited {
            m.child = None;
            panic!("blobmgr mount exited ({st}): {}", m.log_text());
        }
        assert!(up, "not mounted after {DAEMON_WAIT:?}: {}", m.log_text());
        m
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop_with(&mut self, sig: nix::sys::signal::Signal) -> ExitStatus {
        let c = self.child.take().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).expect("kill");
        wait_exit(c, DAEMON_WAIT).unwrap_or_else(|| panic!("no exit: {}", self.log_text()))
    }

    /// Sends `sig` without waiting.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGKILL and reap, leaving the mount behind as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // A stopped process would not die of SIGKILL before SIGCONT.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        self.kill9();
        if mount_at(&self.dir).is_some() {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `blobmgr mount --sock SOCK EXTRA... DIR`, stderr appended to `log`.
pub fn spawn_mount(sock: &Path, dir: &Path, extra: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("mount log");
    Command::new(bin())
        .arg("mount")
        .arg("--sock")
        .arg(sock)
        .args(extra)
        .arg(dir)
        // "mounted at" (info) is how the harness knows the mount is up.
        .env(
            "RUST_LOG",
            format!(
                "{},blobmgr::mount=info",
                std::env::var("RUST_LOG").unwrap_or("info".into())
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn blobmgr mount")
}

/// Bytes of blob `id` the cache holds, as `blobmgr cache ls --json` says.
pub fn cached_bytes(workdir: &Path, id: &str) -> u64 {
    let out = Command::new(bin())
        .args(["cache", "ls", "--json", "--workdir"])
        .arg(workdir)
        .output()
        .expect("cache ls");
    assert!(out.status.success(), "cache ls: {out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    rows.iter()
        .filter(|r| r["id"].as_str() == Some(id))
        .map(|r| r["cached"].as_u64().unwrap_or(0))
        .sum()
}

/// A mount of an EROFS image, unmounted (lazily) on drop.
pub struct ErofsMount {
    pub dir: PathBuf,
}

impl ErofsMount {
    /// `mount -t erofs -o ro IMAGE DIR`: util-linux sets up a loop device
    /// over the image file.
    pub fn with_mount_command(image: &Path, dir: &Path) -> ErofsMount {
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro"])
            .arg(image)
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount -t erofs: {out:?}");
        ErofsMount {
            dir: dir.to_path_buf(),
        }
    }

    /// mount(2) with type erofs straight from the image file (the kernel
    /// reads the file itself; no loop device).
    pub fn from_file(image: &Path, dir: &Path) -> ErofsMount {
        nix::mount::mount(
            Some(image),
            dir,
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount -t erofs {}: {e}", image.display()));
        ErofsMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for ErofsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Waits (bounded) until `dir` is no longer a blobmgr mount.
pub fn wait_unmounted(dir: &Path) -> bool {
    wait_until(Duration::from_secs(20), || !is_mounted(dir))
}
