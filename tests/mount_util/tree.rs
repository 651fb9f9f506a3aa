//! A directory tree like an image's (hundreds of small files in nested
//! dirs, a symlink, an executable script, a few multi-MiB files), its EROFS
//! image, and a comparison of two trees.

use crate::common::Rng;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: usize = 1 << 20;

/// What [`build`] made, for the tests to pick from.
pub struct Tree {
    pub root: PathBuf,
    /// A small file (relative path).
    pub small: &'static str,
    /// A multi-MiB file (relative path).
    pub big: &'static str,
    /// The executable script and what it prints.
    pub script: &'static str,
    pub script_says: &'static str,
}

/// Builds the tree under `root` (created): 400 small files in 3 levels of
/// directories, 3 files of 4-8 MiB, a symlink and a shell script.
pub fn build(root: &Path, rng: &mut Rng) -> Tree {
    for a in 0..8 {
        for b in 0..5 {
            let dir = root.join(format!("usr{a}/lib{b}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            for f in 0..10 {
                let len = rng.below(6000) as usize;
                std::fs::write(dir.join(format!("f{f}.so")), rng.bytes(len)).expect("write");
            }
        }
    }
    std::fs::create_dir_all(root.join("etc")).expect("mkdir etc");
    std::fs::write(root.join("etc/hostname"), b"blobmgr-test\n").expect("write");
    std::fs::create_dir_all(root.join("data")).expect("mkdir data");
    for (i, mib) in [(0, 8), (1, 5), (2, 4)] {
        let len = mib * MIB + rng.below(4096) as usize;
        std::fs::write(root.join(format!("data/big{i}.bin")), rng.bytes(len)).expect("write");
    }
    symlink("../etc/hostname", root.join("data/hostname-link")).expect("symlink");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    let script = root.join("bin/hello.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"hello from $(cat \"$(dirname \"$0\")/../etc/hostname\")\"\n",
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Tree {
        root: root.to_path_buf(),
        small: "etc/hostname",
        big: "data/big0.bin",
        script: "bin/hello.sh",
        script_says: "hello from blobmgr-test\n",
    }
}

/// `mkfs.erofs IMAGE DIR` (uncompressed, fixed timestamps).
pub fn mkfs(image: &Path, dir: &Path) {
    let out = Command::new("mkfs.erofs")
        .args(["--quiet", "-T0", "--all-root"])
        .arg(image)
        .arg(dir)
        .output()
        .expect("run mkfs.erofs");
    assert!(out.status.success(), "mkfs.erofs: {out:?}");
}

/// Every path under `root`, relative, sorted.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).expect("read_dir") {
            let e = e.expect("dir entry");
            let r = rel.join(e.file_name());
            if e.file_type().expect("file type").is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

/// Asserts that `b` holds the same tree as `a`: the same paths, kinds,
/// symlink targets, executable bits and file bytes. Returns the number of
/// files compared.
pub fn assert_same(a: &Path, b: &Path) -> usize {
    let (pa, pb) = (walk(a), walk(b));
    assert_eq!(pa, pb, "the trees list different paths");
    let mut files = 0;
    for rel in &pa {
        let (x, y) = (a.join(rel), b.join(rel));
        let (mx, my) = (x.symlink_metadata().unwrap(), y.symlink_metadata().unwrap());
        assert_eq!(mx.file_type(), my.file_type(), "{}", rel.display());
        if mx.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&x).unwrap(),
                std::fs::read_link(&y).unwrap()
            );
        } else if mx.is_file() {
            assert_eq!(
                mx.permissions().mode() & 0o111,
                my.permissions().mode() & 0o111
            );
            let (dx, dy) = (std::fs::read(&x).unwrap(), std::fs::read(&y).unwrap());
            assert!(dx == dy, "{} differs", rel.display());
            files += 1;
        }
    }
    files
}
