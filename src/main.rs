//! The `blobmgr` binary: argument parsing and wiring only.

use blobmgr::backend::{Backend, LocalFs};
use blobmgr::client::Client;
use blobmgr::registry::{Registry, RegistryOptions};
use blobmgr::{Server, ServerConfig};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

const DEFAULT_SOCK: &str = ".blobmgr/blobmgr.sock";
const DEFAULT_WORKDIR: &str = ".blobmgr/work";
const DEFAULT_BACKEND: &str = "blobs";

const USAGE: &str = "\
usage:
  blobmgr serve [--sock PATH] [--workdir DIR] [--backend DIR|URL] [--workers N]
                [--max-conns N] [--granule BYTES] [--sock-mode OCTAL] [--sock-group GROUP]
                [--allow-uid UID]... [--backend-timeout SECS] [--cache-size BYTES]
                [--registry-user NAME] [--registry-password-file PATH]
                [--backend-retries N]
  blobmgr ping [--sock PATH]
  blobmgr cat [--sock PATH] BLOB_ID [--offset N] [--length N]

defaults: --sock .blobmgr/blobmgr.sock, --workdir .blobmgr/work,
          --backend blobs (relative to the current directory)
registry: --backend http(s)://HOST[:PORT]/REPOSITORY serves that repository's
          blobs by digest (sha256:HEX or HEX); the password is read from
          --registry-password-file or $BLOBMGR_REGISTRY_PASSWORD, never from
          the command line; an HTTP request gets at most 30 s (less when
          --backend-timeout is shorter) and is retried --backend-retries
          times (default 3) while the call's --backend-timeout allows
logging:  RUST_LOG=info|debug|...";

/// A command-line error or a runtime failure, printed as one line.
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Fail {
        Fail(e.to_string())
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("ping") => ping(&args[1..]),
        Some("cat") => cat(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(Fail(format!("unknown command {other:?}; try --help"))),
        None => Err(Fail("no command given; try --help".into())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            eprintln!("blobmgr: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Splits `args` into `--flag value` options and positional arguments.
struct Args {
    opts: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(args: &[String], known: &[&str]) -> Result<Args, Fail> {
        let mut opts = Vec::new();
        let mut positional = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                let (name, value) = match name.split_once('=') {
                    Some((n, v)) => (n.to_string(), v.to_string()),
                    None => {
                        let v = it
                            .next()
                            .ok_or_else(|| Fail(format!("--{name} needs a value")))?;
                        (name.to_string(), v.clone())
                    }
                };
                if !known.contains(&name.as_str()) {
                    return Err(Fail(format!("unknown option --{name}; try --help")));
                }
                opts.push((name, value));
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Args { opts, positional })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.opts
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn num<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, Fail> {
        self.get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| Fail(format!("--{name}: {v:?} is not a valid number")))
            })
            .transpose()
    }

    fn sock(&self) -> PathBuf {
        PathBuf::from(self.get("sock").unwrap_or(DEFAULT_SOCK))
    }
}

fn serve(argv: &[String]) -> Result<(), Fail> {
    let a = Args::parse(
        argv,
        &[
            "sock",
            "workdir",
            "backend",
            "workers",
            "max-conns",
            "granule",
            "sock-mode",
            "allow-uid",
            "registry-user",
            "registry-password-file",
            "backend-timeout",
            "backend-retries",
            "cache-size",
            "sock-group",
        ],
    )?;
    if let Some(p) = a.positional.first() {
        return Err(Fail(format!("unexpected argument {p:?}")));
    }
    let mut cfg = ServerConfig::new(a.sock(), a.get("workdir").unwrap_or(DEFAULT_WORKDIR));
    if let Some(n) = a.num("workers")? {
        cfg.workers = n;
    }
    if let Some(n) = a.num("max-conns")? {
        cfg.max_conns = n;
    }
    if let Some(n) = a.num("granule")? {
        cfg.cache.granule = n;
        cfg.cache.max_job = cfg.cache.max_job.max(n);
    }
    if let Some(n) = a.num::<u64>("cache-size")? {
        if n < cfg.cache.granule {
            return Err(Fail(format!(
                "--cache-size {n} is smaller than one granule"
            )));
        }
        cfg.cache.limit = Some(n);
    }
    if let Some(g) = a.get("sock-group") {
        let gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => nix::unistd::Group::from_name(g)
                .map_err(|e| Fail(format!("--sock-group {g}: {e}")))?
                .ok_or_else(|| Fail(format!("--sock-group {g}: no such group")))?
                .gid
                .as_raw(),
        };
        cfg.sock_group = Some(gid);
    }
    if let Some(m) = a.get("sock-mode") {
        cfg.sock_mode = u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| Fail(format!("--sock-mode: {m:?} is not an octal mode")))?;
    }
    if let Some(secs) = a.num::<f64>("backend-timeout")? {
        if !(secs > 0.0 && secs < 1e9) {
            return Err(Fail(format!(
                "--backend-timeout: {secs} is not a positive number of seconds"
            )));
        }
        cfg.backend_timeout = std::time::Duration::from_secs_f64(secs);
    }
    for uid in a.all("allow-uid") {
        let uid = uid
            .parse()
            .map_err(|_| Fail(format!("--allow-uid: {uid:?} is not a uid")))?;
        cfg.allow_uids.push(uid);
    }
    let backend_arg = a.get("backend").unwrap_or(DEFAULT_BACKEND);
    let backend: Arc<dyn Backend> = if backend_arg.contains("://") {
        Arc::new(registry_backend(backend_arg, &a, cfg.backend_timeout)?)
    } else {
        for opt in ["registry-user", "registry-password-file", "backend-retries"] {
            if a.get(opt).is_some() {
                return Err(Fail(format!("--{opt} needs a registry URL as --backend")));
            }
        }
        let dir = PathBuf::from(backend_arg);
        if a.get("backend").is_none() && !dir.exists() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Fail(format!("create backend dir {}: {e}", dir.display())))?;
        }
        if !dir.is_dir() {
            return Err(Fail(format!(
                "--backend {}: not a directory",
                dir.display()
            )));
        }
        Arc::new(LocalFs::new(dir))
    };
    raise_fd_limit();
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and the signals are only seen through the signalfd.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block()?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let mut server = Server::new(cfg, backend)?;
    server.run(Some(sfd.as_fd()))?;
    if let Ok(Some(sig)) = sfd.read_signal() {
        log::info!("signal {} received; shutting down", sig.ssi_signo);
    }
    drop(server);
    log::info!("stopped");
    Ok(())
}

/// Environment variable that may hold the registry password.
const PASSWORD_ENV: &str = "BLOBMGR_REGISTRY_PASSWORD";

/// `--backend http(s)://HOST[:PORT]/REPOSITORY` and its options.
fn registry_backend(
    url: &str,
    a: &Args,
    call_timeout: std::time::Duration,
) -> Result<Registry, Fail> {
    let mut opts = RegistryOptions::default();
    // A backend call and its retries end before the server gives up on it,
    // so the requests waiting on it get the backend's own error.
    let margin = (call_timeout / 10).min(std::time::Duration::from_secs(1));
    opts.call_budget = Some(call_timeout - margin);
    opts.timeout = opts.timeout.min(call_timeout);
    if let Some(n) = a.num("backend-retries")? {
        opts.retries = n;
    }
    let password = match a.get("registry-password-file") {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Fail(format!("--registry-password-file {path}: {e}")))?;
            let pw = text.strip_suffix('\n').unwrap_or(&text);
            Some(pw.strip_suffix('\r').unwrap_or(pw).to_string())
        }
        None => std::env::var(PASSWORD_ENV).ok(),
    };
    opts.credentials = match (a.get("registry-user"), password) {
        (Some(user), Some(pw)) => Some((user.to_string(), pw)),
        (Some(_), None) => {
            return Err(Fail(format!(
                "--registry-user needs a password: --registry-password-file PATH or ${PASSWORD_ENV}"
            )))
        }
        (None, _) if a.get("registry-password-file").is_some() => {
            return Err(Fail(
                "--registry-password-file needs --registry-user".into(),
            ))
        }
        (None, _) => None,
    };
    let reg = Registry::new(url, opts).map_err(|e| Fail(format!("--backend {e}")))?;
    log::info!("backend {}", reg.describe());
    Ok(reg)
}

/// Lifts the soft fd limit to the hard one: each client costs an fd.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the fd limit from {soft} to {hard}: {e}");
            }
        }
    }
}

/// The CLI's client: one command, so no reconnect retries beyond one.
fn cli_client(sock: &std::path::Path) -> Result<Client, Fail> {
    Client::builder()
        .connect_retries(1)
        .connect(sock)
        .map_err(Fail::from)
}

fn ping(argv: &[String]) -> Result<(), Fail> {
    let a = Args::parse(argv, &["sock"])?;
    if let Some(p) = a.positional.first() {
        return Err(Fail(format!("unexpected argument {p:?}")));
    }
    let sock = a.sock();
    let client = cli_client(&sock)?;
    let rtt = client.ping().map_err(|e| Fail(format!("ping: {e}")))?;
    println!("ok {} us", rtt.as_micros());
    Ok(())
}

fn cat(argv: &[String]) -> Result<(), Fail> {
    let a = Args::parse(argv, &["sock", "offset", "length"])?;
    let [id] = a.positional.as_slice() else {
        return Err(Fail("cat needs exactly one BLOB_ID".into()));
    };
    let sock = a.sock();
    let client = cli_client(&sock)?;
    let blob = client
        .get_blob(id)
        .map_err(|e| Fail(format!("GetBlob {id}: {e}")))?;
    let offset: u64 = a.num("offset")?.unwrap_or(0);
    let end = match a.num::<u64>("length")? {
        Some(len) => offset.saturating_add(len).min(blob.size()),
        None => blob.size(),
    };
    if offset > blob.size() {
        return Err(Fail(format!(
            "--offset {offset} is past the end of {id} ({} bytes)",
            blob.size()
        )));
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = offset;
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let n = client
            .read_at(&blob, &mut buf[..want], at)
            .map_err(|e| Fail(format!("read {id} at {at}: {e}")))?;
        if n == 0 {
            return Err(Fail(format!("{id}: no bytes at offset {at}")));
        }
        out.write_all(&buf[..n])
            .map_err(|e| Fail(format!("write to stdout: {e}")))?;
        at += n as u64;
    }
    out.flush()
        .map_err(|e| Fail(format!("write to stdout: {e}")))?;
    Ok(())
}
