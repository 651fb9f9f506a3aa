//! `blobmgr mount` end to end, as root: the real daemon, the real mount
//! binary, the kernel's FUSE and EROFS. Where FUSE or EROFS is missing the
//! tests fail loudly (`require_fuse`, `require_erofs`); none is skipped.
//!
//! - a blob from a local backend read through the mount: size, ranges,
//!   laziness, errnos (ENOENT, EROFS, EIO), no hang past the timeout, a
//!   daemon restart under an open file, passthrough;
//! - lifecycle: SIGTERM, a busy mount, a mount left by a crash, a live one;
//! - an EROFS image of a directory tree mounted lazily from the mount, from
//!   a local backend and (the headline) from a docker-registry by reference.

mod common;
mod mount_util;

use common::{pattern, wait_exit, wait_until, Daemon, Registry, Rng};
use mount_util::{cached_bytes, is_mounted, require_erofs, require_fuse, tree};
use mount_util::{spawn_mount, wait_unmounted, ErofsMount, Mounted};
use nix::sys::signal::Signal;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    r.expect_err("expected a failure")
        .raw_os_error()
        .expect("an errno")
}

fn read_at(f: &File, off: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off as u64)
        .expect("read through the mount");
    buf
}

#[test]
fn a_blob_reads_through_the_mount_lazily_and_exactly() {
    require_fuse();
    let d = Daemon::start(&[]);
    let data = pattern(24 * MIB + 777, 11);
    d.add_blob("layer.bin", &data);
    let m = Mounted::start(&d.sock, &[]);
    let p = m.path("layer.bin");
    let meta = fs::metadata(&p).expect("lookup of a plain id");
    assert!(meta.is_file());
    assert_eq!(meta.len(), data.len() as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(
        meta.ino(),
        fs::metadata(&p).unwrap().ino(),
        "one inode per id"
    );

    // One small read fetches only the granules around it.
    let f = File::open(&p).unwrap();
    let off = 10 * MIB + 123;
    assert!(read_at(&f, off, 4096) == data[off..off + 4096]);
    let cached = cached_bytes(&d.workdir, "layer.bin");
    assert!(
        cached > 0 && cached as usize <= data.len() / 4,
        "a 4 KiB read cached {cached} bytes"
    );

    let mut rng = Rng::new(1);
    for _ in 0..40 {
        let off = rng.below(data.len() as u64) as usize;
        let len = (1 + rng.below(300_000) as usize).min(data.len() - off);
        assert!(read_at(&f, off, len) == data[off..off + len], "{off}+{len}");
    }
    assert!(fs::read(&p).unwrap() == data, "the whole file");

    assert_eq!(
        errno(fs::metadata(m.path("no-such-blob"))),
        nix::libc::ENOENT
    );
    assert_eq!(errno(fs::metadata(m.path(".hidden"))), nix::libc::ENOENT);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(&p)),
        nix::libc::EROFS
    );
    assert_eq!(errno(File::create(m.path("new"))), nix::libc::EROFS);
    assert_eq!(errno(fs::create_dir(m.path("dir"))), nix::libc::EROFS);
    assert_eq!(errno(fs::remove_file(&p)), nix::libc::EROFS);
    assert_eq!(errno(setxattr(&p)), nix::libc::EROFS);

    let st = nix::sys::statvfs::statvfs(&m.dir).expect("statfs");
    assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    assert_eq!((st.block_size(), st.name_max()), (4096, 255));
    assert_eq!(
        fs::read_dir(&m.dir).unwrap().count(),
        0,
        "listings are empty"
    );
}

/// setxattr(2) of `user.test` on `path`.
fn setxattr(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: both strings are NUL-terminated and the value is 1 byte long.
    let r = unsafe {
        nix::libc::setxattr(
            p.as_ptr(),
            c"user.test".as_ptr(),
            b"x".as_ptr().cast(),
            1,
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn errors_become_errnos_and_nothing_hangs_past_the_timeout() {
    require_fuse();
    let d = Daemon::start(&[]);
    let slow = pattern(8 * MIB, 3);
    d.add_blob("slow", &slow);
    d.add_blob("short", &pattern(8 * MIB, 4));
    let m = Mounted::start(&d.sock, &["--timeout", "2"]);
    let fslow = File::open(m.path("slow")).unwrap();
    let fshort = File::open(m.path("short")).unwrap();

    // A backend failure: the backend's file shrinks under the daemon.
    let be = OpenOptions::new()
        .write(true)
        .open(d.backend.join("short"))
        .unwrap();
    be.set_len(MIB as u64).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        errno(fshort.read_exact_at(&mut buf, 6 * MIB as u64)),
        nix::libc::EIO
    );

    // A daemon that does not answer: the read fails at the client's timeout.
    let pid = nix::unistd::Pid::from_raw(d.pid());
    nix::sys::signal::kill(pid, Signal::SIGSTOP).unwrap();
    let t = Instant::now();
    let r = fslow.read_exact_at(&mut buf, 5 * MIB as u64);
    let took = t.elapsed();
    nix::sys::signal::kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(errno(r), nix::libc::EIO);
    assert!(took < Duration::from_secs(20), "the read took {took:?}");
    // Once the daemon answers again, so does the file.
    assert!(read_at(&fslow, 5 * MIB, 4096) == slow[5 * MIB..5 * MIB + 4096]);
}

#[test]
fn reads_resume_across_a_daemon_restart() {
    require_fuse();
    let mut d = Daemon::start(&[]);
    let data = pattern(16 * MIB + 5, 5);
    d.add_blob("img", &data);
    let m = Mounted::start(&d.sock, &[]);
    let f = File::open(m.path("img")).unwrap();
    assert!(read_at(&f, 0, MIB) == data[..MIB]);
    d.kill9();
    d.spawn();
    for off in [3 * MIB, 9 * MIB + 17, 16 * MIB - 4096] {
        assert!(read_at(&f, off, 4096) == data[off..off + 4096], "at {off}");
    }
    let mut all = Vec::new();
    (&f).read_to_end(&mut all).unwrap();
    assert!(all == data);
}

#[test]
fn passthrough_serves_a_complete_blob_without_the_mount_process() {
    require_fuse();
    let d = Daemon::start(&[]);
    let whole = pattern(6 * MIB + 1, 6);
    let part = pattern(6 * MIB + 2, 7);
    d.add_blob("whole", &whole);
    d.add_blob("part", &part);
    let fetch = Command::new(common::bin())
        .args(["fetch", "--sock"])
        .arg(&d.sock)
        .arg("whole")
        .output()
        .unwrap();
    assert!(fetch.status.success(), "{fetch:?}");
    let m = Mounted::start(&d.sock, &["--passthrough"]);
    let fw = File::open(m.path("whole")).unwrap();
    let fp = File::open(m.path("part")).unwrap();

    // Stopped, the mount process answers nothing; a passed-through file
    // is read by the kernel from the cache file all the same.
    m.signal(Signal::SIGSTOP);
    let (tx, rx) = std::sync::mpsc::channel();
    let len = whole.len();
    let reader = std::thread::spawn(move || {
        // Reads only: a statx (as read_to_end does for its size hint) would
        // ask the file system.
        let mut all = vec![0u8; len];
        let r = fw.read_exact_at(&mut all, 0).map(|_| all);
        let _ = tx.send(r);
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    m.signal(Signal::SIGCONT);
    reader.join().unwrap();
    let got = got.expect("a read of a complete blob waited on the stopped mount process");
    assert!(got.unwrap() == whole);
    // A blob not complete is read through the process.
    let mut all = Vec::new();
    (&fp).read_to_end(&mut all).unwrap();
    assert!(all == part);
}

#[test]
fn sigterm_unmounts_and_a_busy_mount_is_served_until_closed() {
    require_fuse();
    let d = Daemon::start(&[]);
    let data = pattern(MIB, 8);
    d.add_blob("b", &data);
    let mut m = Mounted::start(&d.sock, &[]);
    let opts = blobmgr::mount::mountpoint::mount_at(&m.dir)
        .unwrap()
        .options;
    assert!(!opts.contains("allow_other"), "{opts}");
    assert!(m.stop_with(Signal::SIGTERM).success(), "{}", m.log_text());
    assert!(!is_mounted(&m.dir));

    let mut m = Mounted::start(&d.sock, &["--allow-other"]);
    let opts = blobmgr::mount::mountpoint::mount_at(&m.dir)
        .unwrap()
        .options;
    assert!(opts.contains("allow_other"), "{opts}");
    let f = File::open(m.path("b")).unwrap();
    m.signal(Signal::SIGTERM);
    assert!(wait_unmounted(&m.dir), "a busy mount is detached at once");
    assert!(
        wait_until(Duration::from_secs(10), || m.log_text().contains("busy")),
        "{}",
        m.log_text()
    );
    assert!(read_at(&f, 1000, 5000) == data[1000..6000], "still served");
    let mut child = m.child.take().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "still running");
    drop(f);
    let st = wait_exit(child, Duration::from_secs(20)).expect("exits once closed");
    assert!(st.success(), "{st}: {}", m.log_text());
}

#[test]
fn a_mount_left_by_a_crash_is_replaced_and_a_live_one_refused() {
    require_fuse();
    let d = Daemon::start(&[]);
    let data = pattern(MIB + 3, 9);
    d.add_blob("b", &data);
    let mut m = Mounted::start(&d.sock, &[]);

    let log = m.dir.with_extension("second.log");
    let second = spawn_mount(&d.sock, &m.dir, &[], &log);
    let st = wait_exit(second, Duration::from_secs(20)).expect("refused at once");
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        !st.success() && text.contains("already a live blobmgr mount"),
        "{text}"
    );

    m.kill9();
    assert_eq!(errno(fs::read_dir(&m.dir)), nix::libc::ENOTCONN);
    let m2 = Mounted::spawn(&d.sock, &m.dir, &[]);
    assert!(
        m2.log_text().contains("left by a process that died"),
        "{}",
        m2.log_text()
    );
    assert!(fs::read(m2.path("b")).unwrap() == data);
}

/// The EROFS part shared by the local and the registry tests: the image
/// mounted at `root` from the file the daemon serves as `blob`. Reading
/// one small file must pull at most a quarter of the image (`pulled` says
/// how much was pulled); a big file open across a daemon restart (`restart`)
/// reads on; then every file compares equal and the script runs.
fn check_erofs_tree(
    tree: &tree::Tree,
    root: &Path,
    image_len: usize,
    pulled: &dyn Fn() -> u64,
    restart: &mut dyn FnMut(),
) {
    assert_eq!(
        fs::read(root.join(tree.small)).unwrap(),
        fs::read(tree.root.join(tree.small)).unwrap()
    );
    let n = pulled();
    eprintln!("one small file of a {image_len}-byte image pulled {n} bytes");
    assert!(
        n > 0 && n as usize <= image_len / 4,
        "one small file pulled {n} of {image_len} bytes"
    );

    let src = fs::read(tree.root.join(tree.big)).unwrap();
    let big = File::open(root.join(tree.big)).unwrap();
    assert!(read_at(&big, 0, 64 << 10) == src[..64 << 10]);
    restart();
    let mut rest = vec![0u8; src.len() - (64 << 10)];
    big.read_exact_at(&mut rest, 64 << 10)
        .expect("reads resume after the restart");
    assert!(rest == src[64 << 10..]);

    let files = tree::assert_same(&tree.root, root);
    assert!(files > 400, "{files} files compared");
    let out = Command::new(root.join(tree.script))
        .output()
        .expect("run the script");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), tree.script_says);
}

#[test]
fn erofs_image_from_a_local_backend_mounts_lazily() {
    require_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let tree = tree::build(&tmp.path().join("src"), &mut Rng::new(7));
    let image_path = tmp.path().join("rootfs.erofs");
    tree::mkfs(&image_path, &tree.root);
    let image = fs::read(&image_path).unwrap();
    let mut d = Daemon::start(&[]);
    d.add_blob("rootfs.erofs", &image);
    let mut m = Mounted::start(&d.sock, &[]);
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    // `mount -t erofs` of the file: util-linux puts a loop device over it.
    let e = ErofsMount::with_mount_command(&m.path("rootfs.erofs"), &root);
    let workdir = d.workdir.clone();
    let pulled = || cached_bytes(&workdir, "rootfs.erofs");
    check_erofs_tree(&tree, &root, image.len(), &pulled, &mut || {
        d.kill9();
        d.spawn();
    });
    drop(e);
    assert!(m.stop_with(Signal::SIGTERM).success(), "{}", m.log_text());
    assert!(!is_mounted(&m.dir));
}

/// Builds the tree and its EROFS image and pushes the image to a new
/// registry as a blob of `test/rootfs`: (tree, image bytes, registry, hex).
fn pushed_image(tmp: &Path, seed: u64) -> (tree::Tree, Vec<u8>, Registry, String) {
    let tree = tree::build(&tmp.join("src"), &mut Rng::new(seed));
    let image_path = tmp.join("rootfs.erofs");
    tree::mkfs(&image_path, &tree.root);
    let image = fs::read(&image_path).unwrap();
    let reg = Registry::start();
    let hex = reg.push("test/rootfs", &image);
    (tree, image, reg, hex)
}

/// The image at `file` (a blob pulled from `reg` through the mount `m`)
/// mounted straight from the file (no loop device) and checked; `restart`
/// restarts the daemon; then SIGTERM unmounts.
fn check_registry_image(
    tmp: &Path,
    (tree, image, reg, hex): (&tree::Tree, &[u8], &Registry, &str),
    m: &mut Mounted,
    file: &Path,
    restart: &mut dyn FnMut(),
) {
    let root = tmp.join("root");
    fs::create_dir(&root).unwrap();
    let e = ErofsMount::from_file(file, &root);
    let pulled = || {
        reg.sync_log();
        reg.blob_get_bytes(hex)
    };
    check_erofs_tree(tree, &root, image.len(), &pulled, restart);
    drop(e);
    assert!(m.stop_with(Signal::SIGTERM).success(), "{}", m.log_text());
    assert!(wait_until(Duration::from_secs(5), || !is_mounted(&m.dir)));
}

/// The headline: an EROFS image pushed to a real registry, mounted by
/// reference (`MOUNTPOINT/127.0.0.1:PORT/test/rootfs@sha256:HEX`) through
/// a daemon that has no `--backend` at all.
#[test]
fn erofs_image_from_a_registry_by_reference() {
    require_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let (tree, image, reg, hex) = pushed_image(tmp.path(), 8);
    // No --backend: references only.
    let mut d = Daemon::prepare(&[]);
    d.backend_arg = false;
    d.isolate_registry_env();
    d.spawn();
    let mut m = Mounted::start(&d.sock, &[]);
    let file = m
        .dir
        .join(format!("127.0.0.1:{}", reg.port))
        .join("test")
        .join(format!("rootfs@sha256:{hex}"));
    let meta = fs::metadata(&file).unwrap_or_else(|e| {
        panic!(
            "lookup of the reference failed ({e}); daemon log:\n{}",
            d.log_text()
        )
    });
    assert_eq!(meta.len(), image.len() as u64);
    let parts = (&tree, &image[..], &reg, &hex[..]);
    check_registry_image(tmp.path(), parts, &mut m, &file, &mut || {
        d.kill9();
        d.spawn();
    });
}

/// The same image from the same registry through a daemon whose
/// `--backend` is the repository, by plain id (`MOUNTPOINT/sha256:HEX`).
#[test]
fn erofs_image_from_a_registry_backend() {
    require_erofs();
    let tmp = tempfile::tempdir().unwrap();
    let (tree, image, reg, hex) = pushed_image(tmp.path(), 9);
    let url = format!("{}/test/rootfs", reg.base());
    let mut d = Daemon::start(&["--backend", &url]);
    let mut m = Mounted::start(&d.sock, &[]);
    let file = m.path(&format!("sha256:{hex}"));
    assert_eq!(fs::metadata(&file).unwrap().len(), image.len() as u64);
    let parts = (&tree, &image[..], &reg, &hex[..]);
    check_registry_image(tmp.path(), parts, &mut m, &file, &mut || {
        d.kill9();
        d.spawn();
    });
}
