//! The daemon under a service manager: socket activation through systemd's
//! own `systemd-socket-activate`, readiness, watchdog and stopping
//! notifications on a datagram socket the test binds as `NOTIFY_SOCKET`,
//! one daemon per work dir, and the unit files in deploy/systemd.
//! systemd's tools come from Debian's `systemd` package
//! (scripts/setup-test-deps.sh).
mod common;
use blobmgr::protocol::{Reply, Request};
use common::*;
use nix::sys::signal::Signal;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SOCKET_ACTIVATE: &str = "systemd-socket-activate";

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn need(tool: &str) {
    assert!(
        have(tool),
        "{tool} is not installed (Debian package systemd): run scripts/setup-test-deps.sh"
    );
}

/// A launcher running the daemon through `sh`, which first runs `script`
/// (e.g. `export VAR=$$`: the shell's pid is the daemon's, as it execs).
fn sh_launcher(script: &str) -> Vec<String> {
    let script = format!("{script}; exec \"$@\"");
    ["sh", "-c", &script, "sh"].map(String::from).to_vec()
}

/// Binds the datagram socket a service manager would listen on and points
/// the daemon's `NOTIFY_SOCKET` at it.
fn notify_socket(d: &mut Daemon) -> UnixDatagram {
    let path = d.dir.as_ref().expect("temp dir").path().join("notify.sock");
    let rx = UnixDatagram::bind(&path).expect("bind notify socket");
    rx.set_read_timeout(Some(DAEMON_WAIT)).unwrap();
    d.env
        .push(("NOTIFY_SOCKET".into(), path.to_str().unwrap().into()));
    rx
}

/// Receives notifications until one has the line `line`; returns it.
/// Blocks in `recv`, at most [`DAEMON_WAIT`] for each datagram.
fn wait_note(rx: &UnixDatagram, line: &str, d: &Daemon) -> String {
    let mut buf = [0u8; 4096];
    loop {
        let n = match rx.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("no {line} notification ({e}): {}", d.log_text()),
        };
        let note = String::from_utf8_lossy(&buf[..n]).into_owned();
        if note.lines().any(|l| l == line) {
            return note;
        }
    }
}

/// Whether no notification is queued.
fn no_note(rx: &UnixDatagram) -> bool {
    rx.set_nonblocking(true).unwrap();
    let r = rx.recv(&mut [0u8; 64]);
    rx.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn inode(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).expect("stat").ino()
}

/// The fd of `pid` whose link is `target` (a path, or `socket:[INODE]`).
fn fd_of(pid: i32, target: &str) -> String {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let found = std::fs::read_dir(&dir)
        .expect("fd dir")
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some(target)));
    let fd = found.unwrap_or_else(|| panic!("pid {pid} has no fd on {target}"));
    fd.file_name().into_string().unwrap()
}

/// The open flags of `pid`'s `fd` (`flags:` of `/proc/PID/fdinfo/FD`).
fn fd_flags(pid: i32, fd: &str) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    u32::from_str_radix(flags.trim(), 8).unwrap()
}

/// Noop, then a GetBlob and a FetchRange whose bytes are checked.
fn serves(d: &Daemon, id: &str, data: &[u8]) {
    let mut c = d.raw();
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    let blob = c.open_ok(id);
    assert_eq!(blob.size(), data.len() as u64);
    c.fetch_check(&blob, data, data.len() as u64 / 3, 100_000);
}

#[test]
fn socket_activated_daemon_serves_the_passed_socket_and_leaves_it() {
    need(SOCKET_ACTIVATE);
    let mut d = Daemon::prepare(&[]);
    let sock = d.sock.to_str().unwrap().to_string();
    // systemd-socket-activate binds and listens, execs the daemon in place
    // on the first connection (spawn's readiness probe) with LISTEN_FDS=1.
    d.launcher = vec![SOCKET_ACTIVATE.into(), "-l".into(), sock.clone()];
    let data = pattern(3 << 20, 7);
    d.add_blob("layer", &data);
    d.spawn();
    let made_by_activator = inode(&d.sock);
    serves(&d, "layer", &data);
    assert!(
        d.wait_log(
            &format!("socket activation: serving the passed socket {sock}"),
            DAEMON_WAIT
        ),
        "{}",
        d.log_text()
    );
    // fd 3 is the passed socket, now nonblocking and close-on-exec.
    let link = std::fs::read_link(format!("/proc/{}/fd/3", d.pid())).unwrap();
    assert!(link.to_str().unwrap().starts_with("socket:"), "{link:?}");
    let flags = fd_flags(d.pid(), "3");
    let (nonblock, cloexec) = (nix::libc::O_NONBLOCK as u32, nix::libc::O_CLOEXEC as u32);
    assert_eq!(
        flags & (nonblock | cloexec),
        nonblock | cloexec,
        "{flags:o}"
    );
    assert!(Path::new(&format!("{sock}.metrics")).exists());
    let st = d.stop_with(Signal::SIGTERM);
    assert!(st.success(), "exit status {st}: {}", d.log_text());
    assert_eq!(
        inode(&d.sock),
        made_by_activator,
        "the passed socket's file is left in place"
    );
}

#[test]
fn a_passed_fd_that_is_not_a_listening_socket_is_refused() {
    let mut d = Daemon::prepare(&[]);
    d.launcher = sh_launcher("exec 3</dev/null; export LISTEN_PID=$$ LISTEN_FDS=1");
    d.spawn_unready();
    let st = wait_exit(d.child.take().unwrap(), DAEMON_WAIT).expect("exits");
    assert_eq!(st.code(), Some(1), "{}", d.log_text());
    let log = d.log_text();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("blobmgr: LISTEN_FDS: fd 3 is not a socket"),
        "{log}"
    );
    assert!(!d.sock.exists());
}

/// A LISTEN_FDS no manager would pass (one that overflows a Vec's capacity,
/// one whose allocation aborts) is a clear error, exit 1, not a panic or an
/// abort.
#[test]
fn a_huge_listen_fds_is_refused_with_a_clear_error() {
    for n in ["18446744073709551615", "4000000000"] {
        let mut d = Daemon::prepare(&[]);
        d.launcher = sh_launcher(&format!("export LISTEN_PID=$$ LISTEN_FDS={n}"));
        d.spawn_unready();
        let st = wait_exit(d.child.take().unwrap(), DAEMON_WAIT).expect("exits");
        let log = d.log_text();
        assert_eq!(st.code(), Some(1), "LISTEN_FDS={n}: {st}: {log}");
        let last = log.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("blobmgr: LISTEN_FDS={n} passes more fds than")),
            "{log}"
        );
        assert!(!d.sock.exists());
    }
}

#[test]
fn ready_only_once_accepting_and_stopping_on_sigterm() {
    let mut d = Daemon::prepare(&[]);
    let rx = notify_socket(&mut d);
    d.spawn_unready();
    let ready = wait_note(&rx, "READY=1", &d);
    // At the moment READY=1 arrives the socket accepts and is answered.
    let mut c = Raw::try_connect(&d.sock).expect("connect when READY=1 arrives");
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={}", d.pid())),
        "{ready}"
    );
    let status = format!(
        "STATUS=serving localfs:{} on {}",
        d.backend.display(),
        d.sock.display()
    );
    assert!(ready.lines().any(|l| l == status), "{ready}");
    assert!(no_note(&rx), "nothing but READY=1 while serving");
    let st = d.stop_with(Signal::SIGTERM);
    assert!(st.success(), "exit status {st}: {}", d.log_text());
    wait_note(&rx, "STOPPING=1", &d);
    assert!(no_note(&rx));
}

#[test]
fn watchdog_pings_repeat_while_the_daemon_answers() {
    let mut d = Daemon::prepare(&[]);
    let rx = notify_socket(&mut d);
    d.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    d.launcher = sh_launcher("export WATCHDOG_PID=$$");
    d.spawn_unready();
    wait_note(&rx, "READY=1", &d);
    for _ in 0..4 {
        wait_note(&rx, "WATCHDOG=1", &d);
    }
    assert_eq!(d.stop_with(Signal::SIGINT).code(), Some(0));
    wait_note(&rx, "STOPPING=1", &d);
}

#[test]
fn a_second_daemon_on_the_work_dir_is_refused_whatever_its_socket() {
    let mut first = Daemon::prepare(&[]);
    let data = pattern(2 << 20, 3);
    first.add_blob("b", &data);
    first.spawn();
    let want = format!(
        "blobmgr: work dir {} is in use by pid {}",
        first.workdir.display(),
        first.pid()
    );
    for same_socket in [false, true] {
        let mut second = Daemon::prepare(&[]);
        second.workdir = first.workdir.clone();
        if same_socket {
            second.sock = first.sock.clone();
        }
        let rx = notify_socket(&mut second);
        second.spawn_unready();
        let st = wait_exit(second.child.take().unwrap(), DAEMON_WAIT).expect("exits");
        let log = second.log_text();
        assert_eq!(st.code(), Some(1), "{log}");
        assert_eq!(log.lines().last(), Some(want.as_str()), "{log}");
        assert!(no_note(&rx), "a refused daemon is never READY");
        assert_eq!(second.sock.exists(), same_socket);
    }
    serves(&first, "b", &data);
}

#[test]
fn the_work_dir_lock_goes_with_the_process_on_stop_and_on_kill9() {
    let mut d = Daemon::prepare(&[]);
    let data = pattern(1 << 20, 9);
    d.add_blob("b", &data);
    d.spawn();
    let lock = d.workdir.join("lock");
    let holder = || std::fs::read_to_string(&lock).unwrap();
    assert_eq!(holder(), format!("{}\n", d.pid()));
    let flags = fd_flags(d.pid(), &fd_of(d.pid(), lock.to_str().unwrap()));
    assert_ne!(flags & nix::libc::O_CLOEXEC as u32, 0, "{flags:o}");
    assert!(d.stop_with(Signal::SIGTERM).success());
    d.spawn();
    assert_eq!(holder(), format!("{}\n", d.pid()));
    serves(&d, "b", &data);
    d.kill9();
    d.spawn();
    assert_eq!(holder(), format!("{}\n", d.pid()));
    serves(&d, "b", &data);
}

/// The hand-over an upgrade does: the lock's open file, already locked,
/// passed across exec as fd 3 named `blobmgr-workdir-lock`. The shell plays
/// the old daemon: it opens the file read-write as fd 3, locks it with
/// flock(1) (the lock is the open file's) and execs the new daemon.
#[test]
fn a_work_dir_lock_handed_over_as_a_listen_fd_is_adopted() {
    let mut d = Daemon::prepare(&[]);
    std::fs::create_dir(&d.workdir).unwrap();
    let lock = d.workdir.join("lock");
    d.launcher = sh_launcher(&format!(
        "exec 3<>'{}' && flock -n 3 && \
         export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=blobmgr-workdir-lock",
        lock.display()
    ));
    let data = pattern(1 << 20, 4);
    d.add_blob("b", &data);
    d.spawn();
    // No socket was passed: it bound --sock, on the lock it was handed,
    // which it holds as fd 3 (the only fd on the file), now close-on-exec.
    serves(&d, "b", &data);
    assert_eq!(fd_of(d.pid(), lock.to_str().unwrap()), "3");
    assert_ne!(fd_flags(d.pid(), "3") & nix::libc::O_CLOEXEC as u32, 0);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{}\n", d.pid())
    );
    let mut second = Daemon::prepare(&[]);
    second.workdir = d.workdir.clone();
    second.spawn_unready();
    let st = wait_exit(second.child.take().unwrap(), DAEMON_WAIT).expect("exits");
    assert_eq!(st.code(), Some(1));
    let want = format!(
        "blobmgr: work dir {} is in use by pid {}",
        d.workdir.display(),
        d.pid()
    );
    assert_eq!(second.log_text().lines().last(), Some(want.as_str()));
    assert!(d.stop_with(Signal::SIGTERM).success());
    assert!(!d.log_text().contains("WARN"), "{}", d.log_text());
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    need("systemd-analyze");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    for name in ["blobmgr.socket", "blobmgr.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        // verify checks that ExecStart's binary exists: point it at ours.
        let text = text.replace("/usr/local/bin/blobmgr", bin());
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(["./blobmgr.socket", "./blobmgr.service"])
        .current_dir(dir.path())
        .output()
        .expect("run systemd-analyze");
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert_eq!(said, "", "systemd-analyze verify warned");
}
