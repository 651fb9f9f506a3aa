//! Running a Docker credential helper: `docker-credential-<name> get` with
//! the server URL on standard input and a JSON answer on standard output.
//!
//! The helper runs in its own process group. Its output is read with
//! `poll` on this thread until a deadline; if the deadline passes, the
//! whole group is killed with SIGKILL and the helper reaped, so no process
//! and no thread outlives the call (a grandchild that still holds the
//! pipes cannot block us either: we stop reading at the deadline).

use super::{Credential, CredentialError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Most bytes of output a helper may write (its answer is a few hundred).
const MAX_OUTPUT: usize = 64 * 1024;
/// Longest part of a failing helper's message kept in the error.
const MAX_MESSAGE: usize = 200;
/// What helpers print when they have nothing for a server.
const NOT_FOUND: &str = "credentials not found";
/// The Username that marks the Secret as an identity token.
const TOKEN_USER: &str = "<token>";

/// Whether `name` can be a helper name: `[A-Za-z0-9._-]+`, not starting
/// with `.`, so `docker-credential-<name>` is one file name.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The first executable `docker-credential-<name>` in `dirs`.
pub(super) fn find(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, CredentialError> {
    let file = format!("docker-credential-{name}");
    dirs.iter()
        .map(|d| d.join(&file))
        .find(|p| is_executable(p))
        .ok_or_else(|| CredentialError::HelperNotFound {
            helper: name.to_string(),
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The helper's answer: `Username`, `Secret` (and `ServerURL`, unused).
#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Runs `program get` with `server_url` on stdin. `Ok(None)` when the
/// helper has no credentials for that server.
pub(super) fn get(
    name: &str,
    program: &Path,
    server_url: &str,
    timeout: Duration,
) -> Result<Option<Credential>, CredentialError> {
    let helper = || name.to_string();
    let mut child = spawn(program).map_err(|source| CredentialError::HelperIo {
        helper: helper(),
        source,
    })?;
    let output = match run(&mut child, server_url, Instant::now() + timeout) {
        Ok(output) => output,
        Err(stop) => {
            kill(&mut child);
            return Err(match stop {
                Stop::Timeout => CredentialError::HelperTimeout {
                    helper: helper(),
                    timeout,
                },
                Stop::TooLarge => CredentialError::HelperOutput {
                    helper: helper(),
                    reason: format!("more than {MAX_OUTPUT} bytes of output"),
                },
                Stop::Io(source) => CredentialError::HelperIo {
                    helper: helper(),
                    source,
                },
            });
        }
    };
    interpret(name, output)
}

/// Starts the helper in its own process group, every stdio piped.
fn spawn(program: &Path) -> io::Result<Child> {
    let mut attempts = 0;
    loop {
        let spawned = Command::new(program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn();
        match spawned {
            // ETXTBSY: the file was just written and another thread's fork
            // briefly holds it open for writing; try again shortly.
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && attempts < 5 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Kills the helper's process group, then reaps the helper.
fn kill(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

enum Stop {
    Timeout,
    TooLarge,
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Io(e)
    }
}

/// Feeds `input`, reads stdout and stderr to their end and waits for the
/// exit, all before `deadline`.
fn run(child: &mut Child, input: &str, deadline: Instant) -> Result<Output, Stop> {
    if let Some(mut stdin) = child.stdin.take() {
        // A few hundred bytes fit in the pipe: this does not block. A helper
        // that exits without reading makes it fail with EPIPE; its exit
        // status says the rest.
        match stdin.write_all(input.as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
    }
    let mut pipes: [Option<Box<dyn ReadFd>>; 2] = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn ReadFd>),
    ];
    let mut bufs = [Vec::new(), Vec::new()];
    while pipes.iter().any(Option::is_some) {
        let ready = wait_readable(&pipes, deadline)?;
        for (i, pipe) in pipes.iter_mut().enumerate() {
            if !ready[i] {
                continue;
            }
            let Some(p) = pipe else { continue };
            let mut chunk = [0u8; 4096];
            match p.read(&mut chunk) {
                Ok(0) => *pipe = None,
                Ok(n) => bufs[i].extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if bufs[0].len() + bufs[1].len() > MAX_OUTPUT {
            return Err(Stop::TooLarge);
        }
    }
    let status = wait_exit(child, deadline)?;
    let [stdout, stderr] = bufs;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A pipe end we can poll and read.
trait ReadFd: Read + AsFd {}
impl<T: Read + AsFd> ReadFd for T {}

/// Polls the open pipes until one is readable (or closed) or the deadline.
fn wait_readable(
    pipes: &[Option<Box<dyn ReadFd>>; 2],
    deadline: Instant,
) -> Result<[bool; 2], Stop> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Stop::Timeout);
        }
        let open: Vec<usize> = (0..2).filter(|&i| pipes[i].is_some()).collect();
        let mut fds: Vec<PollFd> = open
            .iter()
            .filter_map(|&i| pipes[i].as_ref())
            .map(|p| PollFd::new(p.as_fd(), PollFlags::POLLIN))
            .collect();
        let ms = u16::try_from(remaining.as_millis() + 1).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {
                let mut ready = [false; 2];
                for (fd, &i) in fds.iter().zip(&open) {
                    // POLLHUP and POLLERR count too: the read says which.
                    ready[i] = fd.revents().is_some_and(|r| !r.is_empty());
                }
                return Ok(ready);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Stop::Io(e.into())),
        }
    }
}

/// Waits for the helper to exit (its pipes are closed already).
fn wait_exit(child: &mut Child, deadline: Instant) -> Result<ExitStatus, Stop> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Stop::Timeout);
        }
        std::thread::sleep(remaining.min(Duration::from_millis(5)));
    }
}

/// Turns the helper's output into an answer.
fn interpret(name: &str, output: Output) -> Result<Option<Credential>, CredentialError> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if !output.status.success() {
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        let not_found = |s: &str| s.to_ascii_lowercase().contains(NOT_FOUND);
        if not_found(&stdout) || not_found(&stderr) {
            return Ok(None);
        }
        return Err(CredentialError::HelperFailed {
            helper: name.to_string(),
            status: output.status.to_string(),
            // A line that opens a JSON object may be an answer, secret
            // and all, from a helper that then failed: never shown.
            message: first_line(&stdout)
                .filter(|l| !l.starts_with('{'))
                .or_else(|| first_line(&stderr))
                .unwrap_or_default(),
        });
    }
    let answer: Answer =
        serde_json::from_slice(&output.stdout).map_err(|e| CredentialError::HelperOutput {
            helper: name.to_string(),
            // Position only: serde_json's message may quote the secret.
            reason: format!(
                "answer is not the expected JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        })?;
    Ok(match (answer.username.as_str(), answer.secret) {
        (_, secret) if secret.is_empty() => None,
        (TOKEN_USER, secret) => Some(Credential::IdentityToken(secret)),
        (user, secret) => Some(Credential::Basic {
            user: user.to_string(),
            password: secret,
        }),
    })
}

/// The first non-empty line of `s`, control characters replaced, at most
/// [`MAX_MESSAGE`] characters.
fn first_line(s: &str) -> Option<String> {
    let line = s.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(
        line.chars()
            .take(MAX_MESSAGE)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    )
}
