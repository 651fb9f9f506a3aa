//! The mount point before and after: a directory, not already a live
//! blobmgr mount, and a FUSE mount left behind by a process that died
//! (every access fails with ENOTCONN) detached so a new one can take its
//! place.

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use std::io;
use std::path::{Path, PathBuf};

/// The file system type our mounts show in /proc/self/mountinfo.
pub const FSTYPE: &str = "fuse.blobmgr";

/// One line of /proc/self/mountinfo: where, what type, from what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The file system's device, `MAJOR:MINOR`.
    pub dev: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount and per-superblock options, comma-separated.
    pub options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8) + (c - b'0')),
                );
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses one mountinfo line (`ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS
/// [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`).
pub fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let (fstype, source, superopts) = (right.next()?, right.next()?, right.next().unwrap_or(""));
    Some(MountEntry {
        dev: left.get(2)?.to_string(),
        mountpoint: PathBuf::from(unescape(left.get(4)?)),
        fstype: fstype.to_string(),
        source: unescape(source),
        options: format!("{},{superopts}", left.get(5)?),
    })
}

/// The topmost mount at `path` (an absolute, canonical path), if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines()
        .rev()
        .filter_map(parse_mountinfo_line)
        .find(|m| m.mountpoint == path)
}

/// `path` made absolute and canonical, without touching `path` itself (a
/// dead FUSE mount cannot be stat'ed): its parent is canonicalised.
fn absolute(path: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => Ok(abs),
    }
}

/// How a FUSE mount answered a `statfs` (which always reaches its server:
/// the kernel caches no answer to it).
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Alive,
    /// Its server is gone (ENOTCONN): a mount left by a crash.
    Dead,
    /// No answer within the wait: a server that is stopped or stuck.
    Silent,
}

/// How long a mount's server gets to answer [`probe`].
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn probe(path: &Path) -> Probe {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    // On a stuck server the thread stays blocked; it is left behind.
    let _ = std::thread::Builder::new()
        .name("blobmgr-probe".into())
        .spawn(move || {
            let _ = tx.send(nix::sys::statfs::statfs(&p));
        });
    match rx.recv_timeout(PROBE_WAIT) {
        Ok(Err(Errno::ENOTCONN)) => Probe::Dead,
        Ok(_) => Probe::Alive,
        Err(_) => Probe::Silent,
    }
}

/// Checks that `path` can be mounted on, detaching a dead FUSE mount left
/// there by a process that died. Returns the canonical mount point.
pub fn prepare(path: &Path) -> io::Result<PathBuf> {
    let shown = path.display();
    let abs = absolute(path)
        .map_err(|e| io::Error::new(e.kind(), format!("mount point {shown}: {e}")))?;
    let existing = mount_at(&abs).filter(|m| m.fstype == "fuse" || m.fstype.starts_with("fuse."));
    let dead = match existing.as_ref().map(|m| (m, probe(&abs))) {
        Some((m, Probe::Alive)) if m.fstype == FSTYPE => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "mount point {shown} is already a live blobmgr mount ({}); unmount it first",
                    m.source
                ),
            ))
        }
        Some((m, Probe::Silent)) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "mount point {shown} is a {} mount whose server does not answer; \
                     unmount it first (umount -l {shown})",
                    m.fstype
                ),
            ))
        }
        Some((m, Probe::Dead)) => Some(format!("{} mount of {}", m.fstype, m.source)),
        _ => match std::fs::metadata(&abs) {
            Err(e) if e.raw_os_error() == Some(Errno::ENOTCONN as i32) => Some("FUSE mount".into()),
            _ => None,
        },
    };
    if let Some(what) = dead {
        log::warn!(
            "mount point {shown}: a {what} left by a process that died \
             (transport endpoint is not connected); detaching it and mounting anew"
        );
        umount2(&abs, MntFlags::MNT_DETACH).map_err(|e| {
            io::Error::other(format!(
                "mount point {shown}: cannot detach the dead mount: {e}"
            ))
        })?;
    }
    check_dir(&abs, path)
}

fn check_dir(abs: &Path, path: &Path) -> io::Result<PathBuf> {
    let meta = std::fs::metadata(abs)
        .map_err(|e| io::Error::new(e.kind(), format!("mount point {}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("mount point {} is not a directory", path.display()),
        ));
    }
    Ok(abs.to_path_buf())
}

/// Sets the kernel's read-ahead of the file system mounted at `path` (its
/// backing device info, `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`).
pub fn set_read_ahead(path: &Path, bytes: u64) -> io::Result<()> {
    let m = mount_at(path).ok_or_else(|| io::Error::other("not in mountinfo"))?;
    let knob = format!("/sys/class/bdi/{}/read_ahead_kb", m.dev);
    std::fs::write(&knob, format!("{}\n", bytes / 1024))
        .map_err(|e| io::Error::new(e.kind(), format!("{knob}: {e}")))
}

/// Detaches the mount at `path` lazily (MNT_DETACH): it leaves the tree at
/// once and goes away when its last user does.
pub fn detach(path: &Path) -> io::Result<()> {
    umount2(path, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let line = "812 29 0:93 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:1 - \
                    fuse.blobmgr blobmgr ro,user_id=0,group_id=0";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.mountpoint, PathBuf::from("/tmp/a b"));
        assert_eq!(m.dev, "0:93");
        assert_eq!(m.fstype, "fuse.blobmgr");
        assert_eq!(m.source, "blobmgr");
        assert!(m.options.contains("nosuid") && m.options.contains("user_id=0"));
        assert_eq!(parse_mountinfo_line("garbage"), None);
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }

    #[test]
    fn a_plain_directory_is_prepared_and_a_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(prepare(d.path()).unwrap(), d.path().canonicalize().unwrap());
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let e = prepare(&f).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = prepare(&d.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
