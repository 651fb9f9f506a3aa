//! Zero-downtime upgrade under load: client-library threads read and check
//! bytes and a loop keeps connecting while the daemon is upgraded twice with
//! `blobmgr upgrade` and once with SIGUSR2; a broken new binary leaves the
//! old daemon serving.
mod common;
use blobmgr::client::Client;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Pid;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// The pid that last called listen() on the daemon's socket.
fn daemon_pid(sock: &Path) -> i32 {
    let s = UnixStream::connect(sock).expect("connect");
    getsockopt(&s, PeerCredentials).expect("SO_PEERCRED").pid()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

/// The tests here copy the binary and then run the copy: another test's
/// fork in between could hold the copy open for writing (ETXTBSY), so they
/// run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Installs `src` at `dst` by rename, as a package manager does.
fn install(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).expect("copy binary");
    std::fs::rename(&tmp, dst).expect("rename into place");
}

fn upgrade_cmd(exe: &Path, sock: &Path) -> std::process::Output {
    Command::new(exe)
        .args(["upgrade", "--sock"])
        .arg(sock)
        .output()
        .expect("run blobmgr upgrade")
}

/// Waits until a process other than `old` listens on `sock` and `old` is gone.
fn handed_over(sock: &Path, old: i32) -> i32 {
    let mut new = old;
    let ok = wait_until(Duration::from_secs(60), || {
        new = daemon_pid(sock);
        new != old && !alive(old)
    });
    assert!(ok, "pid {old} did not hand over (still {new})");
    new
}

/// A daemon (not yet spawned) that runs a copy of the binary installed in
/// its temp dir, which an upgrade test can replace: (daemon, dir, copy).
fn daemon_from_copy() -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let mut d = Daemon::prepare(&[]);
    let dir = d.dir.as_ref().unwrap().path().to_path_buf();
    let exe = dir.join("blobmgr");
    install(Path::new(bin()), &exe);
    d.exe = Some(exe.clone());
    (d, dir, exe)
}

#[test]
fn upgrades_under_load_fail_nothing_and_keep_the_cache_warm() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (mut d, dir, exe) = daemon_from_copy();
    d.spawn();
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| pattern(6 * MIB, 40 + i)).collect();
    for (i, b) in blobs.iter().enumerate() {
        d.add_blob(&format!("b{i}"), b);
    }
    // Warm the cache, then change every backend file: a range fetched again
    // from the backend would now read wrong bytes.
    let warm = Client::connect(&d.sock).expect("client");
    for (i, b) in blobs.iter().enumerate() {
        let rb = warm.get_blob(&format!("b{i}")).expect("GetBlob");
        assert_eq!(
            warm.fetch_range(&rb, 0, b.len() as u64).expect("warm"),
            b.len() as u64
        );
    }
    for i in 0..blobs.len() {
        d.add_blob(&format!("b{i}"), &pattern(6 * MIB, 90 + i as u64));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures, refused) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut threads = Vec::new();
    for t in 0..8u64 {
        let (sock, blobs, stop) = (d.sock.clone(), blobs.clone(), stop.clone());
        let (reads, failures) = (reads.clone(), failures.clone());
        threads.push(std::thread::spawn(move || {
            let c = Client::connect(&sock).expect("client");
            let mut rng = Rng::new(300 + t);
            let opened: Vec<_> = (0..blobs.len())
                .map(|i| c.get_blob(&format!("b{i}")).expect("GetBlob"))
                .collect();
            while !stop.load(Ordering::Relaxed) {
                let i = rng.below(blobs.len() as u64) as usize;
                let off = rng.below((6 * MIB - 4096) as u64);
                let mut buf = vec![0u8; 4096];
                match c.read_at(&opened[i], &mut buf, off) {
                    Ok(4096) if buf[..] == blobs[i][off as usize..off as usize + 4096] => {
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!(
                            "thread {t}: read b{i} at {off}: {:?}",
                            other.map(|_| "wrong bytes")
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    {
        let (sock, stop, refused) = (d.sock.clone(), stop.clone(), refused.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Connect, then a Noop (paced by the daemon, not a flood);
                // only the connect counts: a Noop sent to a daemon that is
                // handing over may go unanswered by design.
                match Raw::try_connect(&sock) {
                    Ok(mut raw) => {
                        let _ = raw.try_call(&blobmgr::protocol::Request::Noop);
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let reads_now = |n: u64| {
        wait_until(Duration::from_secs(30), || {
            reads.load(Ordering::Relaxed) >= n
        })
    };
    assert!(reads_now(200), "the readers got going");
    let mut pid = daemon_pid(&d.sock);
    let last = Successor(Arc::new(AtomicU64::new(0)));
    for round in 0..3 {
        // A new build installed by rename each time.
        install(Path::new(bin()), &exe);
        if round == 1 {
            kill(Pid::from_raw(pid), Signal::SIGUSR2).expect("SIGUSR2");
        } else {
            upgrade_ok(&exe, &d);
        }
        let new = handed_over(&d.sock, pid);
        let before = reads.load(Ordering::Relaxed);
        assert!(
            reads_now(before + 200),
            "reads go on after upgrade {round}\nlog:\n{}",
            d.log_text()
        );
        pid = new;
        last.0.store(new as u64, Ordering::Relaxed);
    }
    // A broken binary: the daemon keeps serving.
    let out = upgrade_to_broken(&dir, &exe, &d);
    assert!(
        !out.status.success(),
        "an upgrade to a broken binary must fail"
    );
    assert!(
        alive(pid) && daemon_pid(&d.sock) == pid,
        "the old daemon keeps serving"
    );
    let before = reads.load(Ordering::Relaxed);
    assert!(
        reads_now(before + 100),
        "reads go on after the failed upgrade"
    );

    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed or wrong reads");
    assert_eq!(refused.load(Ordering::Relaxed), 0, "refused connects");
    let log = d.log_text();
    assert_eq!(
        log.matches("upgrade: handed over").count(),
        3,
        "three handovers:\n{log}"
    );
    // Nothing was fetched from the (changed) backend after the warm-up.
    let fetched_after: Vec<&str> = log.lines().filter(|l| l.contains("fill job")).collect();
    assert!(
        fetched_after.is_empty(),
        "fills after warm-up: {fetched_after:?}"
    );
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(30), || !alive(pid)),
        "last daemon stops"
    );
    drop(last);
}

/// Fails the test loudly unless systemd's activation tool is installed.
fn require_socket_activate() {
    let activate = Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        activate,
        "systemd-socket-activate is not installed (Debian package systemd): run scripts/setup-test-deps.sh"
    );
}

/// Installs a binary that exits 1 at the daemon's path `exe` (in `dir`),
/// then runs `blobmgr upgrade` (a good copy) on `d`'s socket: its output.
fn upgrade_to_broken(dir: &Path, exe: &Path, d: &Daemon) -> std::process::Output {
    let broken = dir.join("broken");
    std::fs::write(&broken, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let good = dir.join("good");
    install(Path::new(bin()), &good);
    install(&broken, exe);
    upgrade_cmd(&good, &d.sock)
}

/// `blobmgr upgrade` by `exe` on `d`'s socket, which must succeed.
fn upgrade_ok(exe: &Path, d: &Daemon) {
    let out = upgrade_cmd(exe, &d.sock);
    assert!(
        out.status.success(),
        "upgrade: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
}

/// [`upgrade_ok`], then the new daemon's pid (the old one was `old`) and a
/// guard that kills it when the test ends.
fn upgrade_to_new(exe: &Path, d: &Daemon, old: i32) -> (i32, Successor) {
    let last = Successor(Arc::new(AtomicU64::new(0)));
    upgrade_ok(exe, d);
    let new = handed_over(&d.sock, old);
    last.0.store(new as u64, Ordering::Relaxed);
    (new, last)
}

/// A daemon from a copy of the binary, its manager notifications sent to
/// a [`NotifySink`], with `env` added; spawned.
fn notified_daemon(
    env: &[(&str, &str)],
) -> (Daemon, std::path::PathBuf, std::path::PathBuf, NotifySink) {
    let (mut d, dir, exe) = daemon_from_copy();
    let notes = NotifySink::bind(&dir.join("notify.sock"));
    d.env
        .push(("NOTIFY_SOCKET".into(), notes.path.display().to_string()));
    for (k, v) in env {
        d.env.push((k.to_string(), v.to_string()));
    }
    d.spawn();
    (d, dir, exe, notes)
}

/// Kills the daemon that took over (not a child of the test: the harness's
/// guard only knows the first one) when the test ends, even by a panic.
struct Successor(Arc<AtomicU64>);

impl Drop for Successor {
    fn drop(&mut self) {
        let pid = self.0.load(Ordering::Relaxed) as i32;
        if pid > 0 && alive(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A daemon on its default socket (no --sock, no BLOBMGR_SOCK, no config
/// file), whose socket was bound under a temporary name and linked into
/// place: after an upgrade the new daemon knows the real path, so
/// `blobmgr status` finds `<sock>.metrics`, no bind dir is left behind,
/// a second upgrade works, and a stop removes the socket file.
#[test]
fn an_upgrade_keeps_the_default_socket_path() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (mut d, dir, exe) = daemon_from_copy();
    d.sock_arg = false;
    d.sock = dir.join(".blobmgr/blobmgr.sock");
    d.spawn();
    let last = Successor(Arc::new(AtomicU64::new(0)));
    let mut pid = daemon_pid(&d.sock);
    for round in 0..2 {
        let out = upgrade_cmd(&exe, &d.sock);
        assert!(
            out.status.success(),
            "upgrade {round}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log_text()
        );
        pid = handed_over(&d.sock, pid);
        last.0.store(pid as u64, Ordering::Relaxed);
        let status = Command::new(&exe)
            .arg("status")
            .current_dir(&dir)
            .env_remove("BLOBMGR_SOCK")
            .output()
            .expect("run blobmgr status");
        assert!(
            status.status.success(),
            "status after upgrade {round}: {}\nlog:\n{}",
            String::from_utf8_lossy(&status.stderr),
            d.log_text()
        );
        let left: Vec<String> = std::fs::read_dir(dir.join(".blobmgr"))
            .expect("the socket's dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".blobmgr-bind-"))
            .collect();
        assert!(left.is_empty(), "bind dirs left: {left:?}");
    }
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
    assert!(wait_until(Duration::from_secs(30), || !alive(pid)));
    assert!(
        !d.sock.exists(),
        "the socket file goes with the daemon that owns it\nlog:\n{}",
        d.log_text()
    );
    drop(last);
}

/// A socket-activated daemon upgraded: the socket's file is the socket
/// unit's (here `systemd-socket-activate`'s), so the new daemon leaves it
/// in place at a stop, as the old one would have.
#[test]
fn an_upgraded_socket_activated_daemon_leaves_the_socket_file() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    require_socket_activate();
    let mut d = Daemon::prepare(&[]);
    let sock = d.sock.display().to_string();
    d.launcher = vec!["systemd-socket-activate".into(), "-l".into(), sock];
    d.spawn();
    let made = std::fs::symlink_metadata(&d.sock)
        .expect("socket file")
        .ino();
    // spawn() returns once a connect succeeds, which the activator's
    // backlog allows before the daemon runs: a Noop answered means it
    // serves (and SIGUSR2 no longer has its default action).
    let noop = blobmgr::protocol::Request::Noop;
    assert_eq!(d.raw().call(&noop), blobmgr::protocol::Reply::Noop);
    // The activator execs the daemon in place: same pid.
    let old = d.pid();
    let (new, last) = upgrade_to_new(Path::new(bin()), &d, old);
    kill(Pid::from_raw(new), Signal::SIGTERM).expect("SIGTERM");
    assert!(wait_until(Duration::from_secs(30), || !alive(new)));
    let left = std::fs::symlink_metadata(&d.sock).map(|m| m.ino());
    assert_eq!(
        left.ok(),
        Some(made),
        "the passed socket's file is left in place\nlog:\n{}",
        d.log_text()
    );
    drop(last);
}

/// Under a manager's watchdog (`WATCHDOG_USEC`): the upgraded daemon goes on
/// pinging it, with its own pid, or the manager would kill it once
/// `WatchdogSec=` passed.
#[test]
fn an_upgraded_daemon_keeps_pinging_the_watchdog() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (d, _, exe, notes) = notified_daemon(&[("WATCHDOG_USEC", "200000")]);
    let old = d.pid();
    let log = || d.log_text();
    notes.until("WATCHDOG=1 from the first daemon", log, |n| {
        n.pid == old && n.has("WATCHDOG=1")
    });
    let (new, last) = upgrade_to_new(&exe, &d, old);
    // Nobody pings from the old daemon's drain until the new one is ready:
    // the old one's MAINPID= pings and lengthens the timeout by the drain's
    // limit and the new binary's start (30 s + 20 s); the new one's READY=1
    // pings and restores it.
    let said = notes.until("READY=1 from the new daemon", log, |n| {
        n.pid == new && n.has("READY=1")
    });
    let handing = said
        .iter()
        .find(|n| n.pid == old && n.has(&format!("MAINPID={new}")))
        .unwrap_or_else(|| panic!("no MAINPID={new} from the old daemon: {said:?}"));
    assert!(
        handing.has("WATCHDOG=1") && handing.has("WATCHDOG_USEC=50200000"),
        "{handing:?}"
    );
    let ready = &said[said.len() - 1];
    assert!(
        ready.has("WATCHDOG=1") && ready.has("WATCHDOG_USEC=200000"),
        "{ready:?}"
    );
    for _ in 0..3 {
        notes.until("WATCHDOG=1 from the new daemon", log, |n| {
            n.pid == new && n.has("WATCHDOG=1")
        });
    }
    let _ = kill(Pid::from_raw(new), Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(30), || !alive(new)));
    drop(last);
}

/// `blobmgr upgrade` on a socket whose listener is not a blobmgr daemon
/// (here `systemd-socket-activate` holding it with no daemon yet, as
/// systemd does; SO_PEERCRED names it) refuses with a clear error and
/// signals nothing: SIGUSR2 would kill that process (or, for PID 1, mean
/// something else).
#[test]
fn upgrade_signals_only_a_blobmgr_daemon() {
    require_socket_activate();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("held.sock");
    let mut holder = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .args(["sleep", "600"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn systemd-socket-activate");
    assert!(
        wait_until(DAEMON_WAIT, || UnixStream::connect(&sock).is_ok()),
        "the socket listens"
    );
    let out = upgrade_cmd(Path::new(bin()), &sock);
    let err = String::from_utf8_lossy(&out.stderr);
    let alive_after = holder.try_wait().expect("try_wait").is_none();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(!out.status.success(), "refused: {err}");
    assert!(
        err.contains(&format!("pid {} behind", holder.id()))
            && err.contains("is not a blobmgr daemon"),
        "{err}"
    );
    assert!(alive_after, "the socket's holder was not signalled");
}

/// Under a service manager (`Type=notify`, `ExecReload=kill -USR2
/// $MAINPID`): the old daemon says RELOADING=1 (with MONOTONIC_USEC), then,
/// itself and so before it exits, MAINPID=<new pid>: a main process that
/// exits before the manager knows its successor is the service stopping,
/// and systemd would kill the new one with the cgroup. The new daemon then
/// says READY=1, which ends the reload. Each sender is checked with
/// SCM_CREDENTIALS, as systemd does.
#[test]
fn an_upgrade_hands_the_main_pid_over_before_the_old_daemon_exits() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (d, _, exe, notes) = notified_daemon(&[]);
    let old = d.pid();
    let log = || d.log_text();
    let first = notes.until("READY=1", log, |n| n.has("READY=1"));
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].pid, old);
    assert!(first[0].has(&format!("MAINPID={old}")), "{first:?}");
    let (new, last) = upgrade_to_new(&exe, &d, old);
    // The work dir lock went with the socket: a second daemon is refused,
    // naming the new pid.
    let mut other = Daemon::prepare(&[]);
    other.workdir = d.workdir.clone();
    let out = Command::new(bin())
        .args(["serve", "--min-free", "0", "--sock"])
        .arg(&other.sock)
        .arg("--workdir")
        .arg(&other.workdir)
        .arg("--backend")
        .arg(&other.backend)
        .output()
        .expect("run a second serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second daemon on the work dir must be refused"
    );
    assert!(err.contains(&format!("in use by pid {new}")), "{err}");
    let said = notes.until("READY=1 from the new daemon", log, |n| {
        n.pid == new && n.has("READY=1")
    });
    let at = |what: &str, f: &dyn Fn(&Note) -> bool| {
        said.iter()
            .position(f)
            .unwrap_or_else(|| panic!("no {what} in {said:?}"))
    };
    let reloading = at("RELOADING=1 from the old daemon", &|n| {
        n.pid == old
            && n.has("RELOADING=1")
            && n.text.lines().any(|l| l.starts_with("MONOTONIC_USEC="))
    });
    // Sent by the old process, hence while it was alive.
    let main_pid = at("MAINPID=<new> from the old daemon", &|n| {
        n.pid == old && n.has(&format!("MAINPID={new}"))
    });
    let ready = said.len() - 1;
    assert!(reloading < main_pid && main_pid < ready, "{said:?}");
    assert!(said[ready].has(&format!("MAINPID={new}")), "{said:?}");
    assert!(
        !said.iter().any(|n| n.has("READY=1") && n.pid == old),
        "the old daemon ends no reload: {said:?}"
    );
    let _ = kill(Pid::from_raw(new), Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(30), || !alive(new)));
    drop(last);
}

/// An upgrade whose new binary fails: the reload the old daemon announced
/// ends with its own READY=1, and it stays the main pid.
#[test]
fn a_failed_upgrade_ends_the_reload_with_the_old_daemon_ready() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (d, dir, exe, notes) = notified_daemon(&[]);
    let old = d.pid();
    let log = || d.log_text();
    notes.until("READY=1", log, |n| n.has("READY=1"));
    let out = upgrade_to_broken(&dir, &exe, &d);
    assert!(!out.status.success(), "the upgrade fails");
    let said = notes.until("READY=1 again", log, |n| n.has("READY=1"));
    assert!(
        said.iter()
            .all(|n| n.pid == old && !n.text.contains("MAINPID=")),
        "{said:?}"
    );
    assert!(said[0].has("RELOADING=1"), "{said:?}");
    assert_eq!(daemon_pid(&d.sock), old, "the old daemon serves on");
}
