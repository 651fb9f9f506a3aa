//! Build script: puts the git commit the binary is built from into
//! `--version` (`BLOBMGR_VERSION`, e.g. "0.1.0 (commit 1a2b3c4)") and into
//! `BLOBMGR_GIT_COMMIT` (the metrics' `blobmgr_info{commit}`; unset outside
//! a git checkout or without git).

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    // Rebuild when HEAD moves: HEAD itself, the branch it names, packed refs.
    for rel in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", rel]) {
            watch(p);
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &branch]) {
            watch(p);
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    let commit = commit.unwrap_or_default();
    let long = if commit.is_empty() {
        version.to_string()
    } else {
        format!("{version} (commit {commit})")
    };
    println!("cargo:rustc-env=BLOBMGR_VERSION={long}");
    // Unset when unknown: the metrics' `option_env!` then says "unknown".
    if !commit.is_empty() {
        println!("cargo:rustc-env=BLOBMGR_GIT_COMMIT={commit}");
    }
}

/// Watches a path git names (relative to the package root), if it exists:
/// cargo would rerun the script on every build for a missing one.
fn watch(p: String) {
    let p = std::env::current_dir()
        .map(|d| d.join(&p))
        .unwrap_or_else(|_| PathBuf::from(&p));
    if p.exists() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
