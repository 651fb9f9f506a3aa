//! The FUSE file system (fuser's [`Filesystem`]): names become blobs
//! through GetBlob, reads become FetchRange + `pread`, and everything that
//! would change the tree is refused with EROFS.
//!
//! Requests run on a few fuser threads, so one cold fetch never holds up
//! a lookup or a read of cached bytes. Every call into the daemon goes
//! through the shared [`Client`], whose timeout bounds how long any file
//! system call can wait; its errors become the errnos a kernel file system
//! returns (see [`errno_of`]).

use super::blob::{BlobFile, Opens};
use super::names::{self, Lookup};
use super::table::{Kind, Table, ROOT};
use crate::client::{Client, ClientError};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How long the kernel may keep names and attributes without asking
/// again. A blob's size never changes while the daemon caches it, and an
/// inode already looked up is answered from memory, so this only bounds
/// how long a name that has gone stays visible.
pub const TTL: Duration = Duration::from_secs(60);

/// Block size `statfs` reports.
const BLOCK: u32 = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The errno a kernel file system would return for a failed daemon call:
/// the daemon's own answer to GetBlob where it has one (ENOENT, EACCES; an
/// id the daemon finds malformed is a name that does not exist), and EIO
/// for everything else — a backend failure, a timeout, no daemon.
pub fn errno_of(e: &io::Error) -> Errno {
    match ClientError::refused_errno(e) {
        Some(nix::libc::ENOENT) | Some(nix::libc::EINVAL) => Errno::ENOENT,
        Some(nix::libc::EACCES) => Errno::EACCES,
        Some(nix::libc::ENAMETOOLONG) => Errno::ENAMETOOLONG,
        _ => Errno::EIO,
    }
}

/// Settings of the file system.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Unit of fetching: reads are rounded out to it. The daemon's granule.
    pub granule: u64,
    /// Offer passthrough opens of complete blobs to the kernel.
    pub passthrough: bool,
    /// Owner of every inode.
    pub uid: u32,
    pub gid: u32,
}

/// One open file.
struct Handle {
    blob: Arc<BlobFile>,
    passthrough: bool,
}

/// The file system a session serves.
pub struct BlobFs {
    client: Arc<Client>,
    cfg: FsConfig,
    table: Mutex<Table>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// The kernel agreed to passthrough opens (FUSE_PASSTHROUGH).
    passthrough: AtomicBool,
    /// When the file system started: every inode's times.
    born: SystemTime,
}

impl BlobFs {
    pub fn new(client: Arc<Client>, cfg: FsConfig) -> BlobFs {
        BlobFs {
            client,
            cfg,
            table: Mutex::new(Table::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            born: SystemTime::now(),
        }
    }

    fn attr(&self, ino: u64, blob: Option<&BlobFile>) -> FileAttr {
        let (kind, perm, size, nlink) = match blob {
            Some(b) => (FileType::RegularFile, 0o444, b.size(), 1),
            None => (FileType::Directory, 0o555, 0, 2),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind,
            perm,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            rdev: 0,
            blksize: self.cfg.granule.min(1 << 20) as u32,
            flags: 0,
        }
    }

    /// The blob `id`: the one the kernel's inode already holds, or a new
    /// GetBlob.
    fn blob(&self, id: &str) -> io::Result<Arc<BlobFile>> {
        if let Some(b) = lock(&self.table).open_blob(id) {
            return Ok(b);
        }
        let remote = self.client.get_blob(id)?;
        Ok(Arc::new(BlobFile::new(remote, self.cfg.granule)))
    }

    fn reply_dir(&self, path: String, reply: ReplyEntry) {
        let (ino, _) = lock(&self.table).add_lookup(Kind::Dir(path), None);
        reply.entry(&TTL, &self.attr(ino, None), Generation(0));
    }

    fn reply_file(&self, blob: Arc<BlobFile>, reply: ReplyEntry) {
        let kind = Kind::File(blob.id().to_string());
        let (ino, blob) = lock(&self.table).add_lookup(kind, Some(blob));
        reply.entry(&TTL, &self.attr(ino, blob.as_deref()), Generation(0));
    }

    /// Which directory `parent` is: `Ok(None)` for the root, its path for
    /// a virtual directory.
    fn dir_path(&self, parent: u64) -> Result<Option<String>, Errno> {
        match lock(&self.table).get(parent) {
            Some((Kind::Root, _)) => Ok(None),
            Some((Kind::Dir(path), _)) => Ok(Some(path)),
            Some((Kind::File(_), _)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Decides how an open of `blob` is served: passed through to the cache
    /// file when the blob is complete and the inode has no cached open
    /// (the kernel refuses to mix the two), through this process otherwise.
    /// Counts the open in `blob.opens` either way; returns the backing file
    /// of a passthrough open.
    fn open_mode(&self, blob: &BlobFile, reply: &ReplyOpen) -> Option<Arc<fuser::BackingId>> {
        let mut opens = lock(&blob.opens);
        let backing = self.backing(blob, &mut opens, reply);
        match &backing {
            Some(_) => opens.passthrough += 1,
            None => opens.cached += 1,
        }
        backing
    }

    fn backing(
        &self,
        blob: &BlobFile,
        opens: &mut Opens,
        reply: &ReplyOpen,
    ) -> Option<Arc<fuser::BackingId>> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(b) = &opens.backing {
            return Some(b.clone());
        }
        if opens.cached > 0 {
            return None;
        }
        let file = blob.complete_file(&self.client)?;
        match reply.open_backing(&*file) {
            Ok(id) => {
                log::debug!("mount: backing {id:?} for {:?}", blob.id());
                let id = Arc::new(id);
                opens.backing = Some(id.clone());
                Some(id)
            }
            Err(e) => {
                log::warn!("mount: passthrough of {:?} refused: {e}", blob.id());
                None
            }
        }
    }
}

impl Filesystem for BlobFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        if self.cfg.passthrough {
            // Depth 1: the cache file must not itself be on a stacked file
            // system, and this one may carry one more (EROFS on a file).
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                log::info!(
                    "mount: the kernel offers no FUSE passthrough; every read goes through blobmgr"
                );
            }
            self.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = match self.dir_path(parent.0) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match names::lookup(parent.as_deref(), name) {
            Lookup::Plain { id, host_dir } => match self.blob(&id) {
                Ok(b) => self.reply_file(b, reply),
                Err(e) if host_dir && errno_of(&e) == Errno::ENOENT => self.reply_dir(id, reply),
                Err(e) => {
                    log::debug!("mount: lookup {id:?}: {e}");
                    reply.error(errno_of(&e))
                }
            },
            Lookup::Dir(path) => self.reply_dir(path, reply),
            Lookup::Reference(id) => match self.blob(&id) {
                Ok(b) => self.reply_file(b, reply),
                Err(e) => {
                    log::debug!("mount: lookup {id:?}: {e}");
                    reply.error(errno_of(&e))
                }
            },
            Lookup::Missing { too_long: true } => reply.error(Errno::ENAMETOOLONG),
            Lookup::Missing { too_long: false } => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.table).forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match lock(&self.table).get(ino.0) {
            Some((Kind::File(_), None)) | None => reply.error(Errno::ENOENT),
            Some((_, blob)) => reply.attr(&TTL, &self.attr(ino.0, blob.as_deref())),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let blob = match lock(&self.table).get(ino.0) {
            Some((Kind::File(_), Some(b))) => b,
            Some((Kind::File(_), None)) | None => return reply.error(Errno::ENOENT),
            Some(_) => return reply.error(Errno::EISDIR),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let backing = self.open_mode(&blob, &reply);
        let passthrough = backing.is_some();
        log::debug!(
            "mount: open {:?} (fh {fh}, {})",
            blob.id(),
            if passthrough { "passthrough" } else { "cached" }
        );
        lock(&self.handles).insert(
            fh,
            Handle {
                blob: blob.clone(),
                passthrough,
            },
        );
        match backing {
            // The kernel takes no other flag with passthrough (the page
            // cache is then the cache file's).
            Some(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
            // The bytes of a blob never change: keep its pages across opens.
            None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(blob) = lock(&self.handles).get(&fh.0).map(|h| h.blob.clone()) else {
            return reply.error(Errno::EBADF);
        };
        // The reply goes to the closure on success and stays here otherwise.
        let mut reply = Some(reply);
        let sent = blob.read_with(&self.client, offset, size, |data| {
            if let Some(r) = reply.take() {
                r.data(data)
            }
        });
        if let (Err(e), Some(r)) = (sent, reply) {
            log::warn!("mount: read of {:?} at {offset}+{size}: {e}", blob.id());
            r.error(errno_of(&e))
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(h) = lock(&self.handles).remove(&fh.0) {
            let mut opens = lock(&h.blob.opens);
            if h.passthrough {
                opens.passthrough -= 1;
                if opens.passthrough == 0 {
                    opens.backing = None;
                }
            } else {
                opens.cached -= 1;
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.dir_path(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    /// Directories list only `.` and `..`: names are found by looking them
    /// up, never by listing (the daemon has no listing).
    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if offset == 0 {
            let _ = reply.add(ino, 1, FileType::Directory, ".");
            let _ = reply.add(INodeNo(ROOT), 2, FileType::Directory, "..");
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = lock(&self.table).len();
        reply.statfs(0, 0, 0, files, 0, BLOCK, 255, BLOCK);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _n: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    // -- everything that would write: EROFS (the mount is read-only, so the
    // kernel refuses most of these before asking) ---------------------------

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _p: INodeNo, _n: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_answers_become_kernel_errnos() {
        let refused = |errno| -> io::Error {
            ClientError::Refused {
                id: "x".into(),
                errno,
            }
            .into()
        };
        assert_eq!(errno_of(&refused(nix::libc::ENOENT)), Errno::ENOENT);
        assert_eq!(errno_of(&refused(nix::libc::EINVAL)), Errno::ENOENT);
        assert_eq!(errno_of(&refused(nix::libc::EACCES)), Errno::EACCES);
        assert_eq!(errno_of(&refused(nix::libc::EIO)), Errno::EIO);
        let failed: io::Error = ClientError::FetchFailed { start: 0, len: 1 }.into();
        assert_eq!(errno_of(&failed), Errno::EIO);
        assert_eq!(errno_of(&io::Error::other("x")), Errno::EIO);
    }
}
