//! The daemon's listening socket: created with a chosen mode whatever the
//! umask, never stolen from a daemon that still answers (daemons binding
//! one path take turns, see `bind_lock`), and removed on drop
//! only if the path still names the socket this process created. A socket
//! made by someone else (systemd's socket activation, or an older daemon
//! handing over) is adopted with [`Listener::from_fd`] and never removed.

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage,
    UnixAddr,
};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A bound, listening, nonblocking Unix socket and the path it lives at.
pub struct Listener {
    inner: mio::net::UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this process created, removed on
    /// drop if the path still names it; `None` for an adopted socket.
    ident: Option<(u64, u64)>,
}

/// Whether someone listens on the socket at `path`: `Ok` if so (a full
/// backlog counts: the connect would block, so it is made nonblocking and
/// a daemon too busy to accept never hangs this one's start),
/// `ConnectionRefused` if nobody does.
fn probe(path: &Path) -> io::Result<()> {
    let fd = unix_stream_socket()?;
    match socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINPROGRESS) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A new nonblocking, close-on-exec `AF_UNIX` stream socket.
fn unix_stream_socket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
}

/// An exclusive `flock` on `.NAME.lock` beside the socket `path` (in
/// `parent`), waited for: binders of one path take turns. The file is left
/// in place (removing it would let a third binder lock a new one). A lock
/// file this user may not open (another user's daemon made it) only costs
/// the turn-taking, with a warning.
fn bind_lock(path: &Path, parent: &Path) -> io::Result<Option<nix::fcntl::Flock<fs::File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let lock = parent.join(format!(".{name}.lock"));
    let opened = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&lock);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            log::warn!("{}: {e}; binding without taking turns", lock.display());
            return Ok(None);
        }
        Err(e) => return Err(ctx("open", &lock, e)),
    };
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(Some)
        .map_err(|(_, e)| ctx("lock", &lock, e.into()))
}

fn ctx(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl Listener {
    /// Binds `path` with permission bits `mode` (and group `group`, if
    /// given). A socket file nobody answers on is replaced; one a live daemon
    /// answers on, or any other kind of file, is an error.
    pub fn bind(path: &Path, mode: u32, group: Option<u32>, backlog: i32) -> io::Result<Listener> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| ctx("create", &parent, e))?;
        // Held from the probe to the link: two daemons starting at once on a
        // stale socket take turns, so the second probes the first's live
        // socket instead of removing it.
        let _turn = bind_lock(path, &parent)?;
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; refusing to replace it",
                        path.display()
                    ),
                ))
            }
            Ok(_) => match probe(path) {
                Ok(()) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("a daemon is already serving on {}", path.display()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("replacing stale socket {}", path.display());
                    fs::remove_file(path).map_err(|e| ctx("remove stale socket", path, e))?;
                }
                Err(e) => return Err(ctx("probe existing socket", path, e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ctx("stat", path, e)),
        }
        // Bind inside a private directory, fix the mode, then link the
        // socket into place: it is never reachable with the umask's mode,
        // and two daemons racing for one path cannot both win.
        let private = parent.join(format!(".blobmgr-bind-{}", std::process::id()));
        let _ = fs::remove_dir_all(&private);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|e| ctx("create", &private, e))?;
        let tmp = private.join("sock");
        #[cfg(test)]
        tests::while_binding();
        let result = (|| {
            let fd = unix_stream_socket()?;
            let addr = UnixAddr::new(&tmp)?;
            socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
                .map_err(|e| ctx("bind", path, e.into()))?;
            if let Some(gid) = group {
                nix::unistd::chown(&tmp, None, Some(nix::unistd::Gid::from_raw(gid)))
                    .map_err(|e| ctx("chgrp", path, e.into()))?;
            }
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
                .map_err(|e| ctx("chmod", path, e))?;
            socket::listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
            fs::hard_link(&tmp, path).map_err(|e| ctx("link socket to", path, e))?;
            Ok::<_, io::Error>(fd)
        })();
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_dir(&private);
        let fd = result?;
        let meta = fs::metadata(path).map_err(|e| ctx("stat", path, e))?;
        let std_listener = std::os::unix::net::UnixListener::from(fd);
        Ok(Listener {
            inner: mio::net::UnixListener::from_std(std_listener),
            path: path.to_path_buf(),
            ident: Some((meta.dev(), meta.ino())),
        })
    }

    /// Adopts a socket another process bound and listens on (systemd's
    /// socket activation, an upgrade's hand-over): it must be a listening
    /// `AF_UNIX` `SOCK_STREAM` socket bound to a path, which becomes
    /// [`Listener::path`]. It is made nonblocking and close-on-exec, and the
    /// file is left in place on drop: whoever made it owns it.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        let refuse = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {} {why}", fd.as_raw_fd()),
            )
        };
        let addr = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
            .map_err(|e| refuse(format!("is not a socket ({e})")))?;
        let unix = addr
            .as_unix_addr()
            .filter(|_| addr.family() == Some(AddressFamily::Unix));
        let path = match unix.map(|u| u.path()) {
            None => return Err(refuse("is not a Unix socket".into())),
            Some(None) => return Err(refuse("is not bound to a path".into())),
            Some(Some(p)) => p.to_path_buf(),
        };
        let what = format!("({})", path.display());
        if socket::getsockopt(&fd, sockopt::SockType)? != SockType::Stream {
            return Err(refuse(format!("{what} is not a stream socket")));
        }
        if !socket::getsockopt(&fd, sockopt::AcceptConn)? {
            return Err(refuse(format!("{what} is not listening")));
        }
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        let std_listener = std::os::unix::net::UnixListener::from(fd);
        Ok(Listener {
            inner: mio::net::UnixListener::from_std(std_listener),
            path,
            ident: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn inner(&self) -> &mio::net::UnixListener {
        &self.inner
    }

    /// The listening socket, to register with a `Poll`.
    pub fn inner_mut(&mut self) -> &mut mio::net::UnixListener {
        &mut self.inner
    }
}

impl Listener {
    /// Whether this process removes the socket's file when it drops the
    /// listener: it bound the socket itself, or took the file over from an
    /// upgrade's old daemon that did. False for a socket systemd passed.
    pub fn owns_file(&self) -> bool {
        self.ident.is_some()
    }

    /// The socket now belongs to another process too (an upgrade handed it
    /// over): its file is left in place when this process drops it.
    pub fn keep_file(&mut self) {
        self.ident = None;
    }

    /// An adopted socket that `path` names (an upgrade's successor takes the
    /// file over with the socket): removed on drop if `path` still names
    /// the same file. Nothing changes if `path` is not a socket file.
    pub fn own_file(&mut self, path: &Path) {
        if let Ok(meta) = fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                self.path = path.to_owned();
                self.ident = Some((meta.dev(), meta.ino()));
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let Some(ident) = self.ident else { return };
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == ident {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::FlockArg;

    #[test]
    fn live_socket_is_not_stolen_and_stale_one_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        let l = Listener::bind(&p, 0o600, None, 128).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let err = Listener::bind(&p, 0o600, None, 128).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Dropping the first removes the file; a leftover file from a dead
        // daemon (simulated by a bound but closed std listener) is replaced.
        drop(l);
        assert!(!p.exists());
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        let _l2 = Listener::bind(&p, 0o600, None, 128).unwrap();
        fs::write(d.path().join("plain"), b"x").unwrap();
        assert!(Listener::bind(&d.path().join("plain"), 0o600, None, 128).is_err());
    }

    thread_local! {
        /// Run by `bind` on this thread between its probe and its link.
        static WHILE_BINDING: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
            std::cell::RefCell::new(None);
    }

    /// The test hook of `bind`.
    pub(super) fn while_binding() {
        WHILE_BINDING.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f()
            }
        });
    }

    /// Review finding: two daemons starting at once on one stale socket
    /// could both probe it, and the second remove the first's live socket.
    /// Binders now take turns: from the probe to the link, `bind` holds the
    /// lock beside the socket, so another binder waits and then probes the
    /// live socket.
    #[test]
    fn a_binder_holds_the_lock_beside_the_socket_from_probe_to_link() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("turn.sock");
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap()); // stale
        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        let (seen2, dir) = (seen.clone(), d.path().to_path_buf());
        WHILE_BINDING.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                let file = fs::File::open(dir.join(".turn.sock.lock")).unwrap();
                let other = nix::fcntl::Flock::lock(file, FlockArg::LockExclusiveNonblock);
                seen2.set(Some(other.err().map(|(_, e)| e)));
            }))
        });
        let l = Listener::bind(&p, 0o600, None, 128).unwrap();
        WHILE_BINDING.with(|h| *h.borrow_mut() = None);
        assert_eq!(
            seen.get(),
            Some(Some(nix::errno::Errno::EWOULDBLOCK)),
            "another binder could take the lock while this one bound"
        );
        // Released once bound: the next binder gets its turn, and finds
        // this one live.
        let e = Listener::bind(&p, 0o600, None, 128).err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(l);
    }

    #[test]
    fn a_live_daemon_with_a_full_backlog_is_refused_not_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("busy.sock");
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(&p).unwrap()).unwrap();
        socket::listen(&fd, Backlog::new(0).unwrap()).unwrap();
        // Fill the backlog: nonblocking connects until one would block.
        let mut queued = Vec::new();
        loop {
            let c = unix_stream_socket().unwrap();
            match socket::connect(c.as_raw_fd(), &UnixAddr::new(&p).unwrap()) {
                Ok(()) => queued.push(c),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("connect: {e}"),
            }
            assert!(queued.len() < 1000, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        std::thread::spawn(move || {
            let _ = tx.send(
                Listener::bind(&p2, 0o600, None, 128)
                    .err()
                    .map(|e| e.kind()),
            );
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(got, Ok(Some(io::ErrorKind::AddrInUse)), "no hang, no theft");
        assert!(p.exists());
        drop((fd, queued));
    }

    #[test]
    fn adopted_socket_is_checked_made_nonblocking_and_never_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("passed.sock");
        let std_l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let l = Listener::from_fd(OwnedFd::from(std_l)).unwrap();
        assert_eq!(l.path(), p);
        let fl = OFlag::from_bits_retain(fcntl(l.inner(), FcntlArg::F_GETFL).unwrap());
        assert!(fl.contains(OFlag::O_NONBLOCK));
        let fd = FdFlag::from_bits_retain(fcntl(l.inner(), FcntlArg::F_GETFD).unwrap());
        assert!(fd.contains(FdFlag::FD_CLOEXEC));
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        assert!(l.inner().accept().is_ok());
        assert!(l.inner().accept().is_err(), "nonblocking: no second client");
        drop(l);
        assert!(p.exists(), "an adopted socket's file is its maker's");

        let refused = |fd: OwnedFd, why: &str| {
            let e = Listener::from_fd(fd).err().expect("refused");
            assert!(e.to_string().contains(why), "{e}");
        };
        let dgram = std::os::unix::net::UnixDatagram::bind(d.path().join("d.sock")).unwrap();
        refused(dgram.into(), "not a stream socket");
        let unbound = std::os::unix::net::UnixDatagram::unbound().unwrap();
        refused(unbound.into(), "not bound to a path");
        refused(fs::File::open("/dev/null").unwrap().into(), "not a socket");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        refused(tcp.into(), "not a Unix socket");
        let bound = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        socket::bind(
            bound.as_raw_fd(),
            &UnixAddr::new(&d.path().join("b.sock")).unwrap(),
        )
        .unwrap();
        refused(bound, "not listening");
    }
}
