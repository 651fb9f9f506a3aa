//! The `blobmgr` binary: argument parsing and wiring only.

use blobmgr::backend::{Backend, LocalFs};
use blobmgr::client::Client;
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
  blobmgr serve [--sock PATH] [--workdir DIR] [--backend DIR] [--workers N]
                [--max-conns N] [--granule BYTES] [--sock-mode OCTAL]
                [--allow-uid UID]...
  blobmgr ping [--sock PATH]
  blobmgr cat [--sock PATH] BLOB_ID [--offset N] [--length N]

defaults: --sock .blobmgr/blobmgr.sock, --workdir .blobmgr/work,
          --backend blobs (relative to the current directory)
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
    if let Some(m) = a.get("sock-mode") {
        cfg.sock_mode = u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| Fail(format!("--sock-mode: {m:?} is not an octal mode")))?;
    }
    for uid in a.all("allow-uid") {
        let uid = uid
            .parse()
            .map_err(|_| Fail(format!("--allow-uid: {uid:?} is not a uid")))?;
        cfg.allow_uids.push(uid);
    }
    let backend_arg = a.get("backend").unwrap_or(DEFAULT_BACKEND);
    let backend: Arc<dyn Backend> = if backend_arg.contains("://") {
        return Err(Fail(format!(
            "--backend {backend_arg}: registry backends are not supported by this build"
        )));
    } else {
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

fn ping(argv: &[String]) -> Result<(), Fail> {
    let a = Args::parse(argv, &["sock"])?;
    if let Some(p) = a.positional.first() {
        return Err(Fail(format!("unexpected argument {p:?}")));
    }
    let sock = a.sock();
    let client = Client::connect(&sock).map_err(|e| Fail(format!("{}: {e}", sock.display())))?;
    let rtt = client
        .ping()
        .map_err(|e| Fail(format!("ping {}: {e}", sock.display())))?;
    println!("ok {} us", rtt.as_micros());
    Ok(())
}

fn cat(argv: &[String]) -> Result<(), Fail> {
    let a = Args::parse(argv, &["sock", "offset", "length"])?;
    let [id] = a.positional.as_slice() else {
        return Err(Fail("cat needs exactly one BLOB_ID".into()));
    };
    let sock = a.sock();
    let client = Client::connect(&sock).map_err(|e| Fail(format!("{}: {e}", sock.display())))?;
    let blob = client
        .get_blob(id)
        .map_err(|e| Fail(format!("GetBlob {id}: {e}")))?;
    let offset: u64 = a.num("offset")?.unwrap_or(0);
    let end = match a.num::<u64>("length")? {
        Some(len) => offset.saturating_add(len).min(blob.size),
        None => blob.size,
    };
    if offset > blob.size {
        return Err(Fail(format!(
            "--offset {offset} is past the end of {id} ({} bytes)",
            blob.size
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
