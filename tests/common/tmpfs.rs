//! A tmpfs of a given size for tests about a full disk (the tests run as
//! root; mounting needs it).

use std::path::Path;
use std::process::Command;

/// Fails the test (never skips it) unless it runs as root: `what` says
/// what needs root.
pub fn require_root(what: &str) {
    if !nix::unistd::geteuid().is_root() {
        panic!("NOT ROOT — this test FAILS rather than skip: {what} needs root (CI runs as root)");
    }
}

/// A tmpfs mounted on a temp dir, lazily unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .status()
            .expect("mount -o remount");
        assert!(st.success(), "remount tmpfs to {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Free bytes of the file system holding `path` (what a non-root writer
/// may use).
pub fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks_available() * st.fragment_size()
}
