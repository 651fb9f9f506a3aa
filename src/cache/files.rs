//! Opening a blob's cache files, which an earlier run (or anyone with write
//! access to the work dir) may have left as something other than a regular
//! file. Every open is `O_NOFOLLOW` (a symlink's target is never opened,
//! let alone truncated), `O_NONBLOCK` (a FIFO never blocks a worker) and
//! `O_CLOEXEC`, and what was opened must be a regular file (`fstat`). Where
//! the daemon creates the file, a symlink, FIFO, socket, device or empty
//! directory in its place is removed and a regular file made instead;
//! anything else fails with an error naming the path.

use super::OpenError;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Flags of every cache file open.
const FLAGS: i32 = libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK;

/// Opens (creating it, mode 0600) the cache file at `path` read-write,
/// replacing whatever non-regular file is there.
pub(crate) fn open_rw(path: &Path) -> Result<File, OpenError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            log::warn!(
                "cache file {} is not a regular file ({}); replacing it",
                path.display(),
                kind(&meta.file_type())
            );
            remove_entry(path, &meta.file_type())
                .map_err(|e| OpenError::file("replace the non-regular file", path, e))?;
        }
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(FLAGS)
        .open(path)
        .map_err(|e| OpenError::file("open", path, e))?;
    regular(f, path).map_err(|e| OpenError::file("open", path, e))
}

/// Opens the cache file at `path` read-only; `Ok(None)` if there is none.
pub(crate) fn open_ro(path: &Path) -> io::Result<Option<File>> {
    open_ro_with(path, 0)
}

/// Opens the cache file at `path` read-only, as the daemon does, without
/// updating the file's access time where this user may (`O_NOATIME` needs
/// to own the file), for tools that only look at the work dir (`blobmgr
/// cache ls`).
pub fn open_ro_untouched(path: &Path) -> io::Result<Option<File>> {
    match open_ro_with(path, libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open_ro_with(path, 0),
        r => r,
    }
}

/// [`open_ro`] with `extra` open flags.
fn open_ro_with(path: &Path, extra: i32) -> io::Result<Option<File>> {
    let flags = FLAGS | extra;
    let f = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(not_regular(path, "a symbolic link"))
        }
        Err(e) => return Err(e),
    };
    regular(f, path).map(Some)
}

/// A read-only fd of the same file as `rw` (opened from `path`), for
/// clients: the path must still name that very file.
pub(crate) fn reopen_ro(rw: &File, path: &Path) -> Result<File, OpenError> {
    let bad = |e| OpenError::file("reopen read-only", path, e);
    let ro = match open_ro(path) {
        Ok(Some(f)) => f,
        Ok(None) => return Err(bad(io::ErrorKind::NotFound.into())),
        Err(e) => return Err(bad(e)),
    };
    let (a, b) = (rw.metadata(), ro.metadata());
    let (a, b) = (a.map_err(bad)?, b.map_err(bad)?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(bad(io::Error::other("replaced while being opened")));
    }
    Ok(ro)
}

/// `f` if it is a regular file, made blocking again (`O_NONBLOCK` was
/// only for the open, and some file systems honour it on regular files),
/// else an error naming `path`.
fn regular(f: File, path: &Path) -> io::Result<File> {
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_regular(path, kind(&meta.file_type())));
    }
    let flags = OFlag::from_bits_truncate(fcntl(&f, FcntlArg::F_GETFL)?);
    fcntl(&f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(f)
}

fn not_regular(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is {what}, not a regular file", path.display()),
    )
}

/// What a non-regular file is, for messages.
fn kind(t: &std::fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Removes the directory entry at `path`: unlinks it, or removes it if it
/// is an empty directory (a non-empty one is not the daemon's to delete).
pub(crate) fn remove_entry(path: &Path, t: &std::fs::FileType) -> io::Result<()> {
    let r = if t.is_dir() {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Runs `f` on a thread; panics if it does not return within 5 s (a
    /// FIFO open or read that blocks).
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("blocked")
    }

    #[test]
    fn a_symlink_is_replaced_and_its_target_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let p = d.path().join("b");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let f = open_rw(&p).unwrap();
        f.set_len(0).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert!(std::fs::symlink_metadata(&p).unwrap().is_file());
        std::os::unix::fs::symlink(&target, d.path().join("c")).unwrap();
        let e = open_ro(&d.path().join("c")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_fifo_or_an_empty_directory_is_replaced_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let p = fifo.clone();
        let e = within(move || open_ro(&p).map(|_| ()).unwrap_err());
        assert!(e.to_string().contains("FIFO"), "{e}");
        let p = fifo.clone();
        within(move || open_rw(&p).map(|_| ()).unwrap());
        assert!(std::fs::symlink_metadata(&fifo).unwrap().is_file());
        let dir = d.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        open_rw(&dir).unwrap();
        assert!(std::fs::symlink_metadata(&dir).unwrap().is_file());
        // A directory with something in it is not the daemon's to delete.
        let full = d.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("x"), b"x").unwrap();
        let e = open_rw(&full).unwrap_err();
        assert!(e.to_string().contains(&*full.to_string_lossy()), "{e}");
    }

    #[test]
    fn a_client_fd_is_the_same_file_and_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b");
        let rw = open_rw(&p).unwrap();
        let ro = reopen_ro(&rw, &p).unwrap();
        for f in [&rw, &ro] {
            let fl = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL).unwrap());
            assert!(!fl.contains(OFlag::O_NONBLOCK));
        }
        assert_eq!(rw.metadata().unwrap().ino(), ro.metadata().unwrap().ino());
    }
}
