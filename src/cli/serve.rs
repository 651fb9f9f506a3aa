//! `blobmgr serve`: turns the options (flags over the config file) into a
//! `ServerConfig` and a backend, then runs the daemon until SIGTERM/SIGINT.
//! The metrics endpoint is always served on `<sock>.metrics`, and also on
//! every `--metrics` address.

use crate::cli::args::{ServeOptions, DEFAULT_BACKEND, DEFAULT_SOCK, DEFAULT_WORKDIR};
use crate::cli::{config, Fail};
use blobmgr::backend::{Backend, LocalFs};
use blobmgr::metrics::http::MetricsAddr;
use blobmgr::registry::{Registry, RegistryOptions};
use blobmgr::{Server, ServerConfig};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Environment variable that may hold the registry password.
const PASSWORD_ENV: &str = "BLOBMGR_REGISTRY_PASSWORD";

/// Runs `serve` with `flags` (the command line) over `--config`'s file.
pub fn run(flags: ServeOptions) -> Result<(), Fail> {
    let opts = match &flags.config {
        Some(path) => {
            let file = config::load(path)?;
            log::info!("settings from {}", path.display());
            flags.over(file)
        }
        None => flags,
    };
    let cfg = server_config(&opts)?;
    let backend = backend(&opts, cfg.backend_timeout)?;
    run_server(cfg, backend)
}

/// The daemon's settings from the merged options.
fn server_config(o: &ServeOptions) -> Result<ServerConfig, Fail> {
    let sock = o.sock.clone().unwrap_or_else(|| DEFAULT_SOCK.into());
    let workdir = o.workdir.clone().unwrap_or_else(|| DEFAULT_WORKDIR.into());
    let mut cfg = ServerConfig::new(sock, workdir);
    if let Some(n) = o.workers {
        cfg.workers = n;
    }
    if let Some(n) = o.max_conns {
        cfg.max_conns = n;
    }
    if let Some(g) = o.granule {
        cfg.cache.granule = g.0;
        cfg.cache.max_job = cfg.cache.max_job.max(g.0);
    }
    if let Some(limit) = o.cache_size {
        if limit.0 < cfg.cache.granule {
            return Err(Fail(format!(
                "--cache-size {limit} is smaller than one granule ({})",
                cfg.cache.granule
            )));
        }
        cfg.cache.limit = Some(limit.0);
    }
    if let Some(g) = &o.sock_group {
        cfg.sock_group = Some(resolve_group(&g.0)?);
    }
    if let Some(m) = o.sock_mode {
        cfg.sock_mode = m.0;
    }
    if let Some(secs) = o.backend_timeout {
        cfg.backend_timeout = Duration::from_secs_f64(secs.0);
    }
    cfg.allow_uids.extend(&o.allow_uid);
    cfg.metrics = metrics_endpoints(&cfg.sock, o);
    Ok(cfg)
}

/// `<sock>.metrics`, which every daemon serves (so `blobmgr status --sock`
/// always finds it), then each `--metrics` address.
fn metrics_endpoints(sock: &Path, o: &ServeOptions) -> Vec<MetricsAddr> {
    let mut path = sock.as_os_str().to_owned();
    path.push(".metrics");
    let mut all = vec![MetricsAddr::Unix(path.into())];
    for m in &o.metrics {
        if !all.contains(&m.0) {
            all.push(m.0.clone());
        }
    }
    all
}

/// A gid, given as one or as a group name.
fn resolve_group(g: &str) -> Result<u32, Fail> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    Ok(nix::unistd::Group::from_name(g)
        .map_err(|e| Fail(format!("--sock-group {g}: {e}")))?
        .ok_or_else(|| Fail(format!("--sock-group {g}: no such group")))?
        .gid
        .as_raw())
}

/// The backend `--backend` names: a registry URL or a directory (the default
/// directory is created when missing).
fn backend(o: &ServeOptions, call_timeout: Duration) -> Result<Arc<dyn Backend>, Fail> {
    let arg = o.backend.as_deref().unwrap_or(DEFAULT_BACKEND);
    if arg.contains("://") {
        return Ok(Arc::new(registry_backend(arg, o, call_timeout)?));
    }
    let registry_only = [
        ("registry-user", o.registry_user.is_some()),
        ("registry-password-file", o.registry_password_file.is_some()),
        ("backend-retries", o.backend_retries.is_some()),
    ];
    if let Some((opt, _)) = registry_only.iter().find(|(_, given)| *given) {
        return Err(Fail(format!("--{opt} needs a registry URL as --backend")));
    }
    let dir = PathBuf::from(arg);
    if o.backend.is_none() && !dir.exists() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Fail(format!("create backend dir {}: {e}", dir.display())))?;
    }
    if !dir.is_dir() {
        return Err(Fail(format!(
            "--backend {}: not a directory",
            dir.display()
        )));
    }
    Ok(Arc::new(LocalFs::new(dir)))
}

/// `--backend http(s)://HOST[:PORT]/REPOSITORY` and its options.
fn registry_backend(url: &str, o: &ServeOptions, call_timeout: Duration) -> Result<Registry, Fail> {
    let mut opts = RegistryOptions::default();
    // A backend call and its retries end before the server gives up on it,
    // so the requests waiting on it get the backend's own error.
    let margin = (call_timeout / 10).min(Duration::from_secs(1));
    opts.call_budget = Some(call_timeout - margin);
    opts.timeout = opts.timeout.min(call_timeout);
    if let Some(n) = o.backend_retries {
        opts.retries = n;
    }
    let password = match &o.registry_password_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Fail(format!("--registry-password-file {}: {e}", path.display())))?;
            let pw = text.strip_suffix('\n').unwrap_or(&text);
            Some(pw.strip_suffix('\r').unwrap_or(pw).to_string())
        }
        None => std::env::var(PASSWORD_ENV).ok(),
    };
    opts.credentials = match (&o.registry_user, password) {
        (Some(user), Some(pw)) => Some((user.clone(), pw)),
        (Some(_), None) => {
            return Err(Fail(format!(
                "--registry-user needs a password: --registry-password-file PATH or ${PASSWORD_ENV}"
            )))
        }
        (None, _) if o.registry_password_file.is_some() => {
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

/// Runs the server in this thread until SIGTERM or SIGINT.
fn run_server(cfg: ServerConfig, backend: Arc<dyn Backend>) -> Result<(), Fail> {
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
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the fd limit from {soft} to {hard}: {e}");
            }
        }
    }
}
