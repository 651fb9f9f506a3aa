//! One daemon per work dir: an exclusive `flock(2)` on `WORKDIR/lock`, taken
//! before anything else in the work dir is touched and held for the
//! process's life. The file holds the holder's pid, so a refused daemon can
//! name it: `work dir X is in use by pid N`.
//!
//! A `flock` belongs to the open file description, not to the process:
//!
//! - it goes away when the last fd of that description is closed, so a
//!   daemon that exits, crashes or is killed with SIGKILL releases it with
//!   nothing left to clean up (the file stays, the lock does not);
//! - the fd is close-on-exec, so a process the daemon starts (a credential
//!   helper) never holds it;
//! - it can be handed to another process: [`WorkdirLock::into_fd`] gives up
//!   the fd *without unlocking* (dropping a [`WorkdirLock`] unlocks), the fd
//!   travels (SCM_RIGHTS, or across `exec` with close-on-exec cleared, e.g.
//!   as a `LISTEN_FDS` fd named [`FD_NAME`]) and the receiver adopts it with
//!   [`WorkdirLock::from_fd`], which checks that it still holds the lock and
//!   writes its own pid. The work dir is never unlocked in between: this is
//!   what the zero-downtime upgrade needs.

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, Flock, FlockArg};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock file's name inside the work dir.
pub const LOCK_FILE: &str = "lock";

/// The name the lock's fd goes by when passed to a new process among
/// `LISTEN_FDS` (`LISTEN_FDNAMES`).
pub const FD_NAME: &str = "blobmgr-workdir-lock";

/// How long a refused daemon waits for the holder's pid to appear in a lock
/// file the holder has only just created (it writes it right after locking).
const PID_WAIT: Duration = Duration::from_millis(100);

/// The exclusive lock on a work dir. Dropping it unlocks.
#[derive(Debug)]
pub struct WorkdirLock {
    file: Flock<File>,
    path: PathBuf,
}

impl std::os::fd::AsFd for WorkdirLock {
    /// The lock's fd: a duplicate of it shares the lock (`flock` belongs to
    /// the open file description), which is how an upgrade hands it over.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.file)
    }
}

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// A live process holds it; its pid, if the lock file names one.
    InUse { workdir: PathBuf, pid: Option<u32> },
    /// The work dir or its lock file could not be created or locked.
    Io(io::Error),
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::InUse {
                workdir,
                pid: Some(pid),
            } => write!(f, "work dir {} is in use by pid {pid}", workdir.display()),
            LockError::InUse { workdir, pid: None } => write!(
                f,
                "work dir {} is in use by another process",
                workdir.display()
            ),
            LockError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LockError {}

fn ctx(what: &str, path: &Path, e: impl Into<io::Error>) -> LockError {
    let e = e.into();
    LockError::Io(io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    ))
}

impl WorkdirLock {
    /// Creates `workdir` if missing and locks it, without waiting: a work
    /// dir another process holds is [`LockError::InUse`].
    pub fn acquire(workdir: &Path) -> Result<WorkdirLock, LockError> {
        std::fs::create_dir_all(workdir).map_err(|e| ctx("create", workdir, e))?;
        let path = workdir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| ctx("open", &path, e))?;
        WorkdirLock::lock(file, workdir, path)
    }

    /// Adopts a lock fd another process passed ([`WorkdirLock::into_fd`]):
    /// it must be `workdir`'s lock file and its description must still hold
    /// the lock (else the work dir has changed hands: [`LockError::InUse`]).
    /// The fd is made close-on-exec and the file names this process.
    pub fn from_fd(fd: OwnedFd, workdir: &Path) -> Result<WorkdirLock, LockError> {
        let path = workdir.join(LOCK_FILE);
        let file = File::from(fd);
        let (ours, there) = (file.metadata(), std::fs::symlink_metadata(&path));
        let same = match (&ours, &there) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        };
        if !same {
            return Err(LockError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the passed lock fd is not {}", path.display()),
            )));
        }
        fcntl(&file, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| ctx("fcntl", &path, e))?;
        // On the description that holds it this succeeds at once.
        WorkdirLock::lock(file, workdir, path)
    }

    /// Locks `file` (`path`, `workdir`'s lock file) without waiting and
    /// writes this process's pid into it.
    fn lock(file: File, workdir: &Path, path: PathBuf) -> Result<WorkdirLock, LockError> {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => WorkdirLock { file, path }.stamped(),
            Err((file, Errno::EWOULDBLOCK)) => Err(LockError::InUse {
                workdir: workdir.to_path_buf(),
                pid: holder_pid(&file),
            }),
            Err((_, e)) => Err(ctx("lock", &path, e)),
        }
    }

    /// The lock's fd, still locked, for another process to adopt with
    /// [`WorkdirLock::from_fd`]. Whoever holds the fd holds the work dir.
    pub fn into_fd(self) -> OwnedFd {
        let locked = ManuallyDrop::new(self.file);
        // SAFETY: `Flock<File>` owns exactly one `File` and derefs to it;
        // reading it out of a `ManuallyDrop` that is never touched again
        // moves the `File` without running `Flock`'s Drop (the LOCK_UN this
        // must avoid) and without closing or duplicating the fd.
        let file: File = unsafe { std::ptr::read(&**locked) };
        OwnedFd::from(file)
    }

    /// `WORKDIR/lock`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes this process's pid into the lock file: over the old content
    /// first, then cut to length, so a reader never sees an empty file
    /// where a pid was.
    fn stamped(self) -> Result<WorkdirLock, LockError> {
        let line = format!("{}\n", std::process::id());
        self.file
            .write_all_at(line.as_bytes(), 0)
            .and_then(|()| self.file.set_len(line.len() as u64))
            .map_err(|e| ctx("write", &self.path, e))?;
        Ok(self)
    }
}

/// The pid the holder wrote into the lock file. A holder that has only just
/// created the file may not have written it yet: wait a moment for it.
fn holder_pid(file: &File) -> Option<u32> {
    let deadline = std::time::Instant::now() + PID_WAIT;
    loop {
        let mut buf = [0u8; 32];
        let n = file.read_at(&mut buf, 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
            return Some(pid);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid_in(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap()
    }

    #[test]
    fn one_holder_at_a_time_named_by_pid() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("work");
        let lock = WorkdirLock::acquire(&work).unwrap();
        assert_eq!(pid_in(&work), format!("{}\n", std::process::id()));
        // A second open file description is refused, even in this process.
        match WorkdirLock::acquire(&work) {
            Err(LockError::InUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("not refused: {other:?}"),
        }
        let msg = WorkdirLock::acquire(&work).unwrap_err().to_string();
        let want = format!(
            "work dir {} is in use by pid {}",
            work.display(),
            std::process::id()
        );
        assert_eq!(msg, want);
        drop(lock);
        let _again = WorkdirLock::acquire(&work).unwrap();
    }

    #[test]
    fn a_longer_old_pid_is_overwritten_whole() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(LOCK_FILE), "4194304999\nstale\n").unwrap();
        let _lock = WorkdirLock::acquire(d.path()).unwrap();
        assert_eq!(pid_in(d.path()), format!("{}\n", std::process::id()));
    }

    #[test]
    fn handed_over_fd_keeps_the_lock_without_a_gap() {
        let d = tempfile::tempdir().unwrap();
        let lock = WorkdirLock::acquire(d.path()).unwrap();
        let fd = lock.into_fd();
        // Still locked with no WorkdirLock alive: into_fd did not unlock.
        assert!(matches!(
            WorkdirLock::acquire(d.path()),
            Err(LockError::InUse { .. })
        ));
        let adopted = WorkdirLock::from_fd(fd, d.path()).unwrap();
        assert!(matches!(
            WorkdirLock::acquire(d.path()),
            Err(LockError::InUse { .. })
        ));
        drop(adopted);
        let _next = WorkdirLock::acquire(d.path()).unwrap();
    }

    #[test]
    fn adopting_a_fd_that_does_not_hold_the_lock_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _holder = WorkdirLock::acquire(d.path()).unwrap();
        let other = File::open(d.path().join(LOCK_FILE)).unwrap();
        assert!(matches!(
            WorkdirLock::from_fd(other.into(), d.path()),
            Err(LockError::InUse { .. })
        ));
        let elsewhere = File::open("/dev/null").unwrap();
        let e = WorkdirLock::from_fd(elsewhere.into(), d.path()).unwrap_err();
        assert!(e.to_string().contains("is not"), "{e}");
    }
}
