//! The command line, driven through the real binary: help and version of
//! every command, one-line errors naming the culprit, human sizes, the
//! config file and its precedence, `cache ls` on a real work dir, `fetch`
//! with and without a terminal, `status` against a canned metrics endpoint,
//! and shell completions.
//!
//! Its helpers are its own (not tests/common), so that this file stands alone.

mod common;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blobmgr")
}

/// Runs the binary with `args` (no stdin, no inherited $BLOBMGR_SOCK).
fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("BLOBMGR_SOCK")
        .stdin(Stdio::null())
        .output()
        .expect("run blobmgr")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero status, exactly one line on stderr, returned.
fn one_line_failure(o: &Output) -> String {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected a failure; stdout {:?}",
        stdout(o)
    );
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("blobmgr"), "{err:?}");
    err
}

/// Waits for `cond` until `what`'s deadline (the shared harness's wait).
fn wait_for(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        common::wait_until(timeout, cond),
        "timed out waiting for {what}"
    );
}

/// A `blobmgr serve` run in a directory (the usual one: `be/` backend,
/// `work/`, `s.sock`), killed on drop unless stopped.
struct Serve {
    child: Option<Child>,
    dir: PathBuf,
    /// The temp dir of [`Serve::standard`]; a caller's own otherwise.
    _tmp: Option<tempfile::TempDir>,
}

impl Serve {
    /// A temp dir with an empty backend directory `be/`.
    fn dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("be")).unwrap();
        dir
    }

    /// Starts `serve ARGS` in `dir` and waits until `ready_sock` accepts.
    fn start(dir: &Path, args: &[&str], ready_sock: &Path) -> Serve {
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let child = Command::new(bin())
            .arg("serve")
            .args(args)
            // Independent of how full this machine's disk is (the default
            // watermark is 10 % of it).
            .args(["--min-free", "0"])
            .current_dir(dir)
            .env_remove("BLOBMGR_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        let mut s = Serve {
            child: Some(child),
            dir: dir.to_path_buf(),
            _tmp: None,
        };
        let child = s.child.as_mut().unwrap();
        wait_for("the daemon's socket", Duration::from_secs(20), || {
            if let Ok(Some(st)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
                panic!("serve exited early ({st}): {log}");
            }
            UnixStream::connect(ready_sock).is_ok()
        });
        s
    }

    /// The usual daemon: backend `be/`, work dir `work/`, socket `s.sock`.
    fn standard(extra: &[&str]) -> Serve {
        let tmp = Serve::dir();
        let p = tmp.path().to_path_buf();
        let sock = p.join("s.sock");
        let mut args = vec![
            "--sock".to_string(),
            sock.display().to_string(),
            "--workdir".into(),
            p.join("work").display().to_string(),
            "--backend".into(),
            p.join("be").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut s = Serve::start(&p, &args, &sock);
        s._tmp = Some(tmp);
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn sock(&self) -> String {
        self.path("s.sock").display().to_string()
    }

    fn add_blob(&self, id: &str, data: &[u8]) {
        std::fs::write(self.path("be").join(id), data).unwrap();
    }

    /// SIGTERM (a clean stop checkpoints every blob), then the exit status.
    fn stop(&mut self) {
        let mut c = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut status = None;
        wait_for("the daemon to stop", Duration::from_secs(20), || {
            status = c.try_wait().unwrap();
            status.is_some()
        });
        assert!(status.unwrap().success(), "serve did not stop cleanly");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

// ---------------------------------------------------------------------------
// Help, version, errors.

const COMMANDS: &[&[&str]] = &[
    &[],
    &["serve"],
    &["ping"],
    &["cat"],
    &["fetch"],
    &["status"],
    &["cache"],
    &["cache", "ls"],
    &["upgrade"],
    &["mount"],
    &["completions"],
];

#[test]
fn every_command_answers_help_and_version() {
    for cmd in COMMANDS {
        for flag in ["--help", "-h", "--version"] {
            let mut args = cmd.to_vec();
            args.push(flag);
            let o = run(&args);
            assert!(o.status.success(), "{args:?}: {}", stderr(&o));
            let out = stdout(&o);
            if flag == "--version" {
                assert!(out.contains(env!("CARGO_PKG_VERSION")), "{args:?}: {out}");
            } else {
                assert!(out.contains("Usage: blobmgr"), "{args:?}: {out}");
            }
        }
    }
    let o = run(&["help", "cache", "ls"]);
    assert!(o.status.success() && stdout(&o).contains("--workdir"));
}

#[test]
fn version_names_the_commit_when_built_from_git() {
    let out = stdout(&run(&["--version"]));
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match commit {
        // The binary may have been built one commit earlier than HEAD only
        // if cargo did not rerun build.rs, which watches HEAD: so it is HEAD.
        Some(c) => assert!(out.contains(&format!("(commit {c})")), "{out}"),
        None => assert_eq!(out.trim(), format!("blobmgr {}", env!("CARGO_PKG_VERSION"))),
    }
}

#[test]
fn upgrade_without_a_daemon_names_the_socket() {
    let o = run(&["upgrade", "--sock", "/nonexistent/blobmgr.sock"]);
    let line = one_line_failure(&o);
    assert!(
        line.contains("/nonexistent/blobmgr.sock"),
        "the error names the socket: {line}"
    );
}

#[test]
fn mount_without_a_daemon_fails_in_one_line() {
    // (tests/mount.rs mounts for real; this only checks the front end.)
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let o = run(&["mount", "--sock", sock.to_str().unwrap(), "/mnt"]);
    let line = one_line_failure(&o);
    assert!(line.contains("no daemon answers on"), "{line}");
    let help = stdout(&run(&["mount", "--help"]));
    assert!(
        help.contains("--allow-other") && help.contains("MOUNTPOINT"),
        "{help}"
    );
}

#[test]
fn unknown_options_and_missing_arguments_are_named() {
    for (args, needle) in [
        (&["serve", "--frobnicate", "1"][..], "'--frobnicate'"),
        (&["cat", "some-id", "--bogus"][..], "'--bogus'"),
        (&["ping", "--sokc", "x"][..], "--sock"),
        (&["cache", "ls", "--jsn"][..], "'--jsn'"),
        (&["cat"][..], "BLOB_ID"),
        (&["fetch"][..], "ID"),
        (&["frob"][..], "'frob'"),
        (&[][..], "no command given"),
        (&["cache"][..], "blobmgr cache: no command given"),
        (
            &["status", "--sock", "a", "--metrics", "b:1"][..],
            "--metrics",
        ),
        (&["completions", "tcsh"][..], "tcsh"),
    ] {
        let err = one_line_failure(&run(args));
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn bad_sizes_are_named() {
    let err = one_line_failure(&run(&["serve", "--cache-size", "12Q"]));
    assert!(err.contains("--cache-size: \"12Q\" is not a size"), "{err}");
    let err = one_line_failure(&run(&["serve", "--granule=1.5"]));
    assert!(err.contains("--granule: \"1.5\" is not a size"), "{err}");
    let err = one_line_failure(&run(&["cat", "x", "--length", "-1"]));
    assert!(err.contains("--length"), "{err}");
}

#[test]
fn completions_are_printed() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let script = stdout(&o);
        assert!(
            script.contains("blobmgr") && script.contains("cache-size"),
            "{shell}"
        );
    }
}

// ---------------------------------------------------------------------------
// The config file.

#[test]
fn config_file_is_read_and_flags_override_it() {
    let dir = Serve::dir();
    let p = dir.path().to_path_buf();
    let config = p.join("blobmgr.toml");
    std::fs::write(
        &config,
        format!(
            "# sizes and lists as in examples/blobmgr.toml\n\
             sock = \"{}\"\nworkdir = \"{}\"\nbackend = \"{}\"\n\
             cache-size = \"512M\"\ngranule = \"64K\"\nallow-uid = [1000, 1001]\n",
            p.join("file.sock").display(),
            p.join("work").display(),
            p.join("be").display()
        ),
    )
    .unwrap();
    std::fs::write(p.join("be/hello"), b"hello, config\n").unwrap();
    let cfg = config.display().to_string();

    // The file alone: the daemon answers on the file's socket.
    let mut d = Serve::start(&p, &["--config", &cfg], &p.join("file.sock"));
    let o = run(&[
        "cat",
        "--sock",
        &p.join("file.sock").display().to_string(),
        "hello",
    ]);
    assert_eq!(stdout(&o), "hello, config\n", "{}", stderr(&o));
    d.stop();
    assert!(
        !p.join("file.sock").exists(),
        "a clean stop removes the socket"
    );

    // A flag overrides the file: the daemon answers on the flag's socket,
    // and never bound the file's.
    let flag_sock = p.join("flag.sock");
    let flag = flag_sock.display().to_string();
    let _d = Serve::start(&p, &["--config", &cfg, "--sock", &flag], &flag_sock);
    let o = run(&["ping", "--sock", &flag]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!p.join("file.sock").exists(), "the file's socket was bound");
    // And $BLOBMGR_SOCK stands for --sock on the client side.
    let o = Command::new(bin())
        .arg("ping")
        .env("BLOBMGR_SOCK", &flag_sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_example_config_starts_a_daemon() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/blobmgr.toml");
    let dir = Serve::dir();
    let p = dir.path().to_path_buf();
    let sock = p.join("s.sock");
    let (s, w, b) = (
        sock.display().to_string(),
        p.join("work").display().to_string(),
        p.join("be").display().to_string(),
    );
    let _d = Serve::start(
        &p,
        &[
            "--config",
            example,
            "--sock",
            &s,
            "--workdir",
            &w,
            "--backend",
            &b,
        ],
        &sock,
    );
    assert!(run(&["ping", "--sock", &s]).status.success());
}

#[test]
fn malformed_configs_are_refused_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "sock = \"a\"\n\nsokc = \"b\"\n",
            ":3: sokc: unknown key",
        ),
        (
            "size.toml",
            "workers = 2\ncache-size = \"12Q\"\n",
            ":2: cache-size: \"12Q\" is not a size",
        ),
        (
            "type.toml",
            "workers = \"many\"\n",
            ":1: workers: invalid type",
        ),
        ("syntax.toml", "sock = \"a\"\nworkdir = \n", ":2:"),
        (
            "list.toml",
            "allow-uid = [\n  1000,\n  \"me\",\n]\n",
            ":3: allow-uid:",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let err = one_line_failure(&run(&["serve", "--config", &path.display().to_string()]));
        assert!(
            err.contains(&format!("{}{want}", path.display())),
            "{name}: {err:?} should contain {want:?}"
        );
    }
    let missing = dir.path().join("missing.toml").display().to_string();
    let err = one_line_failure(&run(&["serve", "--config", &missing]));
    assert!(err.contains(&missing), "{err}");
}

// ---------------------------------------------------------------------------
// cache ls and fetch.

/// Names, lengths, mtimes and contents of every file under `dir`.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["data", "map"] {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::metadata(&p).unwrap();
            out.push((
                p.clone(),
                m.len(),
                m.modified().unwrap(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    out
}

/// A stopped daemon's work dir holding three blobs, made through the real
/// daemon: `whole` (fetched whole with `fetch`), `part` (one 64 KiB granule
/// of 1 MiB, through `cat`) and `broken` (fetched whole, then its map's
/// bitmap damaged so its checksum fails).
fn work_dir_with_three_blobs() -> Serve {
    const K: usize = 1024;
    let mut d = Serve::standard(&["--granule", "64K"]);
    d.add_blob("whole", &pattern(300 * K, 1));
    d.add_blob("part", &pattern(1024 * K, 2));
    d.add_blob("broken", &pattern(200 * K, 3));
    let sock = d.sock();
    // Whole blobs through fetch (without a terminal: plain lines, no \r).
    let o = run(&["fetch", "--sock", &sock, "whole", "broken"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains('\r') && !stderr(&o).contains('\r'), "{out:?}");
    for line in ["whole 307200 bytes in ", "broken 204800 bytes in "] {
        assert!(out.lines().any(|l| l.starts_with(line)), "{out}");
    }
    let o = run(&["cat", "--sock", &sock, "part", "--length", "1000"]);
    assert_eq!(o.stdout.len(), 1000);
    // A clean stop checkpoints every blob: the maps are final.
    d.stop();
    let map = d.path("work/map/broken");
    let mut bytes = std::fs::read(&map).unwrap();
    bytes[50] ^= 0xff;
    std::fs::write(&map, bytes).unwrap();
    d
}

#[test]
fn cache_ls_shows_complete_partial_and_corrupt_blobs() {
    let d = work_dir_with_three_blobs();
    let work = d.path("work");
    let before = snapshot(&work);
    let w = work.display().to_string();
    let o = run(&["cache", "ls", "--workdir", &w, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let rows = rows.as_array().expect("an array");
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id}"))
    };
    assert_eq!(rows.len(), 3, "{rows:?}");
    let whole = row("whole");
    assert_eq!(
        (whole["size"].as_u64(), whole["cached"].as_u64()),
        (Some(300 * 1024), Some(300 * 1024))
    );
    assert_eq!(whole["complete"], true);
    // A directory backend has no digest to check against.
    assert_eq!(whole["verified"], false);
    assert!(whole["problem"].is_null() && whole["last_use"].as_i64().unwrap() > 0);
    let part = row("part");
    assert_eq!(
        (part["size"].as_u64(), part["cached"].as_u64()),
        (Some(1024 * 1024), Some(64 * 1024))
    );
    assert_eq!(part["complete"], false);
    let broken = row("broken");
    assert_eq!(broken["cached"].as_u64(), Some(0));
    let problem = broken["problem"].as_str().unwrap();
    assert!(problem.starts_with("map: checksum mismatch"), "{problem}");

    let o = run(&["cache", "ls", "--workdir", &w]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    let line = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .to_string()
    };
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        line("whole").contains("300.0 KiB  300.0 KiB 100%"),
        "{table}"
    );
    assert!(line("part").contains("64.0 KiB 6%"), "{table}");
    assert!(line("broken").contains("map: checksum mismatch"), "{table}");
    assert!(table.ends_with("3 blobs, 364.0 KiB cached\n"), "{table}");
    assert_eq!(snapshot(&work), before, "cache ls changed the work dir");

    let err = one_line_failure(&run(&[
        "cache",
        "ls",
        "--workdir",
        &d.path("nowhere").display().to_string(),
    ]));
    assert!(err.contains("not a blobmgr work dir"), "{err}");
}

#[test]
fn fetch_fails_naming_each_missing_blob() {
    let d = Serve::standard(&[]);
    d.add_blob("here", &pattern(10_000, 4));
    let sock = d.sock();
    let o = run(&["fetch", "--sock", &sock, "no-such-blob"]);
    let err = one_line_failure(&o);
    assert!(err.contains("no-such-blob"), "{err}");

    let o = run(&[
        "fetch",
        "--sock",
        &sock,
        "--parallel",
        "2",
        "gone-1",
        "here",
        "gone-2",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.lines().any(|l| l.contains("fetch gone-1:")), "{err}");
    assert!(err.lines().any(|l| l.contains("fetch gone-2:")), "{err}");
    assert!(
        err.lines().last().unwrap().contains("2 of 3 blobs failed"),
        "{err}"
    );
    assert!(
        stdout(&o).starts_with("here 10000 bytes in "),
        "{}",
        stdout(&o)
    );

    let err = one_line_failure(&run(&["fetch", "--sock", &sock, "--parallel", "0", "here"]));
    assert!(err.contains("--parallel"), "{err}");
}

#[test]
fn fetch_on_a_terminal_shows_progress_bars() {
    // Fails rather than skips without it (scripts/setup-test-deps.sh
    // installs it).
    if let Err(e) = Command::new("script").arg("--version").output() {
        panic!("no `script` (bsdutils) to give fetch a terminal: {e}");
    }
    let d = Serve::standard(&[]);
    d.add_blob("big", &pattern(20 << 20, 5));
    let cmd = format!("'{}' fetch --sock '{}' big", bin(), d.sock());
    // script runs the command on a new pseudo-terminal and copies what it
    // draws to our stdout; -e passes the command's exit status on.
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("BLOBMGR_SOCK")
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let screen = stdout(&o);
    assert!(o.status.success(), "{screen}\n{}", stderr(&o));
    assert!(
        screen.contains("big [") && screen.contains("done in"),
        "{screen:?}"
    );
    assert!(screen.contains("20.00 MiB/20.00 MiB"), "{screen:?}");
    assert!(
        screen.contains('\r') || screen.contains('\x1b'),
        "no redraws: {screen:?}"
    );
    assert!(
        !screen.contains("big 20971520 bytes in"),
        "plain lines on a terminal: {screen:?}"
    );
}

// ---------------------------------------------------------------------------
// status, against a canned endpoint (the daemon's own comes separately).

const EXPOSITION: &str = "\
# TYPE blobmgr_info gauge
blobmgr_info{version=\"0.1.0\",commit=\"abc1234\",pid=\"77\"} 1
blobmgr_connections 2
blobmgr_requests_total{op=\"fetch_range\",result=\"hit\"} 3
blobmgr_requests_total{op=\"fetch_range\",result=\"miss\"} 1
blobmgr_cache_bytes 2048
blobmgr_cache_limit_bytes 0
blobmgr_cache_blobs 1
";

/// Answers one `GET /metrics` on `path` with `body`; returns the request.
fn canned_endpoint(path: &Path, body: &'static str) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "request cut short");
            req.extend_from_slice(&buf[..n]);
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(answer.as_bytes()).unwrap();
        String::from_utf8_lossy(&req).into_owned()
    })
}

#[test]
fn status_reads_sock_dot_metrics_or_the_endpoint_given() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    let server = canned_endpoint(&dir.path().join("d.sock.metrics"), EXPOSITION);
    let o = run(&["status", "--sock", &sock.display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("blobmgr 0.1.0 (commit abc1234), pid 77"),
        "{out}"
    );
    assert!(
        out.contains("hit ratio        75.0% (3 hits, 1 misses)"),
        "{out}"
    );
    assert!(out.contains("2.0 KiB (no limit), 1 blobs"), "{out}");
    assert!(server
        .join()
        .unwrap()
        .starts_with("GET /metrics HTTP/1.1\r\n"));

    let other = dir.path().join("m.sock");
    let server = canned_endpoint(&other, EXPOSITION);
    let o = run(&["status", "--metrics", &format!("unix:{}", other.display())]);
    assert!(o.status.success(), "{}", stderr(&o));
    server.join().unwrap();

    let err = one_line_failure(&run(&[
        "status",
        "--sock",
        &dir.path().join("none").display().to_string(),
    ]));
    assert!(err.contains("none.metrics"), "{err}");
    let err = one_line_failure(&run(&["status", "--metrics", "nonsense"]));
    assert!(err.contains("--metrics"), "{err}");
}

#[test]
fn status_summarises_a_real_daemon_on_sock_dot_metrics_and_on_metrics() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let tcp = format!("127.0.0.1:{port}");
    let mut d = Serve::standard(&["--metrics", &tcp]);
    d.add_blob("counted", &pattern(5000, 6));
    let sock = d.sock();
    for _ in 0..2 {
        let o = run(&["cat", "--sock", &sock, "counted"]);
        assert_eq!(o.stdout.len(), 5000, "{}", stderr(&o));
    }
    let pid = d.child.as_ref().unwrap().id();
    for args in [["--sock", sock.as_str()], ["--metrics", tcp.as_str()]] {
        let o = run(&["status", args[0], args[1]]);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let out = stdout(&o);
        let first = out.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("blobmgr {}", env!("CARGO_PKG_VERSION"))),
            "{out}"
        );
        assert!(first.contains(&format!(", pid {pid}, up ")), "{out}");
        assert!(out.contains("(no limit), 1 blobs"), "{out}");
        assert!(!out.contains("hit ratio        n/a"), "{out}");
    }
    d.stop();
    assert!(
        !Path::new(&format!("{sock}.metrics")).exists(),
        "metrics socket left behind"
    );
}
