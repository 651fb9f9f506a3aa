//! `blobmgr mount`: the blobs of a daemon as a read-only FUSE file system,
//! a client of the daemon through [`crate::client`].
//!
//! A lookup of a plain id (`MOUNTPOINT/layer.tar`) or of a path whose
//! components spell a reference (`MOUNTPOINT/HOST:PORT/REPO/.../NAME@sha256:HEX`)
//! does a GetBlob and shows a read-only regular file of the blob's size. A
//! read asks the daemon for the granules it touches (FetchRange) and
//! `pread`s them from the cache file's fd; the kernel's page cache keeps
//! them. Once a blob is complete, new opens may be passed through to the
//! cache file, so reads no longer involve this process.
//!
//! - [`names`]: what a name means (plain id, virtual directory, reference);
//! - [`table`]: inode numbers, stable per name;
//! - [`blob`]: one blob's reads, what is known valid, completeness;
//! - [`fs`]: fuser's `Filesystem` over them, errnos, EROFS;
//! - [`mountpoint`]: the mount point, stale mounts, mountinfo.
//!
//! The front end is `blobmgr mount` (src/cli/mount.rs); see docs/MOUNT.md.

pub mod blob;
pub mod fs;
pub mod mountpoint;
pub mod names;
pub mod table;

use crate::client::Client;
use fs::{BlobFs, FsConfig};
use fuser::{MountOption, SessionACL, SessionUnmounter};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The default unit of fetching: the daemon's default granule.
pub const DEFAULT_GRANULE: u64 = 1 << 20;
/// Default number of threads serving FUSE requests.
pub const DEFAULT_THREADS: usize = 8;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    /// Let users other than the mounting one in (`allow_other`).
    pub allow_other: bool,
    /// Reads are rounded out to this (a power of two; the daemon's granule).
    pub granule: u64,
    /// Pass opens of complete blobs through to the cache file. Off by
    /// default: a FUSE file system that offers passthrough counts as a
    /// stacked one, and the kernel then refuses to mount EROFS straight
    /// from one of its files (docs/MOUNT.md).
    pub passthrough: bool,
    /// Threads serving FUSE requests (each may wait on one daemon call).
    pub threads: usize,
}

impl MountConfig {
    pub fn new(mountpoint: impl Into<PathBuf>) -> MountConfig {
        MountConfig {
            mountpoint: mountpoint.into(),
            allow_other: false,
            granule: DEFAULT_GRANULE,
            passthrough: false,
            threads: DEFAULT_THREADS,
        }
    }
}

/// How [`Mount::unmount`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// The file system is gone; the session is ending.
    Clean,
    /// It was busy (open files, a file system mounted from one of its
    /// files): it was detached from the tree and is served until its last
    /// user is gone.
    Detached,
}

/// A mounted file system, served by its own threads.
pub struct Mount {
    mountpoint: PathBuf,
    unmounter: SessionUnmounter,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Mount {
    /// Mounts at `cfg.mountpoint` (replacing a dead mount left there) and
    /// starts serving. `on_end` runs on the serving thread when the session
    /// ends, however it ends.
    pub fn start(
        client: Arc<Client>,
        cfg: &MountConfig,
        on_end: impl FnOnce() + Send + 'static,
    ) -> io::Result<Mount> {
        if !cfg.granule.is_power_of_two() || cfg.granule < 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "granule {} is not a power of two of at least 4K",
                    cfg.granule
                ),
            ));
        }
        let mountpoint = mountpoint::prepare(&cfg.mountpoint)?;
        let fs = BlobFs::new(
            client,
            FsConfig {
                granule: cfg.granule,
                passthrough: cfg.passthrough,
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            },
        );
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("blobmgr".into()),
            MountOption::CUSTOM("subtype=blobmgr".into()),
            MountOption::RO,
            MountOption::NoAtime,
            MountOption::DefaultPermissions,
        ];
        config.acl = if cfg.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(cfg.threads.max(1));
        config.clone_fd = true;
        let mut session = fuser::Session::new(fs, &mountpoint, &config).map_err(|e| {
            io::Error::new(e.kind(), format!("mount {}: {e}", mountpoint.display()))
        })?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("blobmgr-mount".into())
            .spawn(move || {
                let r = session.run();
                on_end();
                r
            })?;
        // The kernel reads ahead 128 KiB by default: one granule at a time
        // halves the FUSE requests of a sequential read (docs/MOUNT.md).
        let ra = cfg.granule.max(128 << 10);
        if let Err(e) = mountpoint::set_read_ahead(&mountpoint, ra) {
            log::debug!("mount: read-ahead left as it is: {e}");
        }
        log::info!("mounted at {}", mountpoint.display());
        Ok(Mount {
            mountpoint,
            unmounter,
            thread: Some(thread),
        })
    }

    /// The canonical mount point.
    pub fn mountpoint(&self) -> &std::path::Path {
        &self.mountpoint
    }

    /// Whether the session has ended (unmounted, or the kernel dropped it).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Unmounts; when the file system is busy, detaches it instead (see
    /// [`Unmounted::Detached`]).
    pub fn unmount(&mut self) -> io::Result<Unmounted> {
        match self.unmounter.unmount() {
            Ok(()) => Ok(Unmounted::Clean),
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                mountpoint::detach(&self.mountpoint)?;
                Ok(Unmounted::Detached)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits for the session to end. The kernel ending the connection
    /// (the last file of a detached mount closed, or an unmount raced with
    /// a reading thread) is a clean end: fuser reports it as ENODEV or, from
    /// some of its threads, ECONNABORTED.
    pub fn join(mut self) -> io::Result<()> {
        let r = match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("the FUSE session panicked"))?,
            None => Ok(()),
        };
        match r {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ECONNABORTED | nix::libc::ENODEV)
                ) =>
            {
                log::info!(
                    "{}: the kernel ended the session",
                    self.mountpoint.display()
                );
                Ok(())
            }
            r => r,
        }
    }
}
