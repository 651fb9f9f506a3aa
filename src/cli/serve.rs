//! `blobmgr serve`: turns the options (flags over the config file) into a
//! `ServerConfig` and a backend, then runs the daemon until SIGTERM/SIGINT.
//! The metrics endpoint is always served on `<sock>.metrics`, and also on
//! every `--metrics` address. Under systemd (`cli::lifecycle`) it may serve a
//! passed socket, and tells the manager when it is ready and stopping; the
//! work dir is locked for the daemon's life either way.

use crate::cli::args::{ServeOptions, DEFAULT_BACKEND, DEFAULT_SOCK, DEFAULT_WORKDIR};
use crate::cli::lifecycle::Manager;
use crate::cli::upgrade::{self, Successor};
use crate::cli::{config, Fail};
use blobmgr::backend::{Backend, LocalFs};
use blobmgr::cache::DEFAULT_MIN_FREE;
use blobmgr::credentials::{Credentials, Env as CredentialEnv};
use blobmgr::hosts::HostsDir;
use blobmgr::listener::Listener;
use blobmgr::metrics::http::MetricsAddr;
use blobmgr::reference::AllowList;
use blobmgr::registry::proxy::ProxyEnv;
use blobmgr::registry::registries::check_hosts_dir;
use blobmgr::registry::registries::DEFAULT_COOL_DOWN;
use blobmgr::registry::{Registries, RegistriesConfig, Registry, RegistryOptions};
use blobmgr::source::SharedBackend;
use blobmgr::workdir::WorkdirLock;
use blobmgr::{Server, ServerConfig};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a stop (SIGTERM, SIGINT) waits for the requests it already read;
/// fills still running then are abandoned (nothing unwritten is ever marked
/// valid) and their requests go unanswered.
const STOP_DRAIN: Duration = Duration::from_secs(10);

/// Environment variable that may hold the registry password.
const PASSWORD_ENV: &str = "BLOBMGR_REGISTRY_PASSWORD";

/// Runs `serve` with `flags` (the command line) over `--config`'s file.
pub fn run(flags: ServeOptions) -> Result<(), Fail> {
    // An upgrade asked for while the daemon starts (`systemctl reload` just
    // after activation) waits for it to serve instead of killing it:
    // SIGUSR2's default action ends the process. SIGTERM and SIGINT keep
    // theirs until the server is up, so a start that hangs can be stopped.
    let mut usr2 = SigSet::empty();
    usr2.add(Signal::SIGUSR2);
    usr2.thread_block()?;
    // First, while this is the only thread: systemd's variables leave the
    // environment, so the processes the daemon starts do not see them.
    let mut manager = Manager::from_env()?;
    let handed_sock = upgrade::handed_sock();
    let successor = Successor::record();
    let mut opts = match &flags.config {
        Some(path) => {
            let file = config::load(path)?;
            log::info!("settings from {}", path.display());
            flags.over(file)
        }
        None => flags,
    };
    let mut listener = manager.listener()?;
    let owned = handed_sock.as_ref().is_some_and(|h| h.owned);
    let handed_path = handed_sock.map(|h| h.path);
    opts.sock = passed_sock_path(listener.as_ref(), opts.sock.take(), handed_path);
    let mut cfg = server_config(&opts)?;
    // Everything that may fail without touching the work dir comes first: a
    // successor says READY only after it, so a bad setting stops the upgrade
    // while the old daemon still serves.
    let backend = backend(&opts, cfg.backend_timeout)?;
    cfg.references = Some(references(&opts, cfg.backend_timeout)?);
    // Started by an upgrade: wait until the old daemon let go of the work
    // dir; the socket file is then ours to remove at a stop if it was its
    // (not if systemd passed the socket: the socket unit owns the file).
    if upgrade::take_over()? && owned {
        if let Some(l) = listener.as_mut() {
            l.own_file(&cfg.sock);
        }
    }
    // Held until the process exits, taken before the work dir is used.
    let lock = manager.lock_workdir(&cfg.cache.workdir)?;
    let daemon = Daemon { lock, successor };
    run_server(cfg, backend, listener, &mut manager, daemon)
}

/// The daemon's socket path (`<sock>.metrics` sits beside it) when a socket
/// was passed: the path an upgrade's old daemon handed over (the socket's
/// own name may be the temporary one it was bound under before it was
/// linked into place), else `--sock` if given, else the passed socket's
/// name (systemd binds it where it lives). Without a passed socket,
/// `--sock` as given.
fn passed_sock_path(
    listener: Option<&Listener>,
    given: Option<PathBuf>,
    handed: Option<PathBuf>,
) -> Option<PathBuf> {
    let Some(l) = listener else {
        return given;
    };
    match (handed, given) {
        (Some(h), Some(g)) if h != g => {
            log::warn!(
                "upgrade: the socket handed over lives at {}, not at --sock {}; serving it there",
                h.display(),
                g.display()
            );
            Some(h)
        }
        (Some(h), _) => Some(h),
        (None, Some(g)) => Some(g),
        (None, None) => Some(l.path().to_path_buf()),
    }
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
    if let Some(r) = o.readahead {
        cfg.cache.readahead = r.0;
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
    cfg.cache.min_free = Some(o.min_free.map_or(DEFAULT_MIN_FREE, |m| m.min_free()));
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

/// Timeouts and retries of registry requests: a backend call and its
/// retries end before the server gives up on it, so the requests waiting on
/// it get the backend's own error.
fn registry_options(o: &ServeOptions, call_timeout: Duration) -> RegistryOptions {
    let mut opts = RegistryOptions::default();
    let margin = (call_timeout / 10).min(Duration::from_secs(1));
    opts.call_budget = Some(call_timeout - margin);
    opts.timeout = opts.timeout.min(call_timeout);
    if let Some(n) = o.backend_retries {
        opts.retries = n;
    }
    opts
}

/// The backend of references: `--hosts-dir`, Docker's credentials, the
/// proxy variables, and `--allow-registry`.
fn references(
    o: &ServeOptions,
    call_timeout: Duration,
) -> Result<(SharedBackend, AllowList), Fail> {
    let allow =
        AllowList::parse(&o.allow_registry).map_err(|e| Fail(format!("--allow-registry {e}")))?;
    let env = CredentialEnv::from_process();
    let credentials = Credentials::load(o.docker_config.as_deref(), &env)
        .map_err(|e| Fail(format!("--docker-config: {e}")))?;
    if let Some(p) = credentials.source() {
        log::info!("registry credentials from {}", p.display());
    }
    let hosts = o.hosts_dir.as_ref().map(HostsDir::new);
    if let Some(d) = &hosts {
        if !d.root().is_dir() {
            return Err(Fail(format!(
                "--hosts-dir {}: not a directory",
                d.root().display()
            )));
        }
        for problem in check_hosts_dir(d) {
            log::warn!("--hosts-dir: {problem}; what needs it fails until it is fixed");
        }
    }
    let options = registry_options(o, call_timeout);
    let registries = Registries::new(RegistriesConfig {
        hosts,
        credentials,
        options,
        proxy: ProxyEnv::from_process(),
        cool_down: DEFAULT_COOL_DOWN,
    });
    Ok((SharedBackend(Arc::new(registries)), allow))
}

/// `--backend http(s)://HOST[:PORT]/REPOSITORY` and its options.
fn registry_backend(url: &str, o: &ServeOptions, call_timeout: Duration) -> Result<Registry, Fail> {
    let mut opts = registry_options(o, call_timeout);
    opts.proxy = ProxyEnv::from_process();
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

/// Runs the server in this thread until SIGTERM or SIGINT, on `listener`
/// if one was passed (else it binds `cfg.sock`).
/// What the daemon keeps for its whole life besides the server.
struct Daemon {
    /// Held until the process exits (or handed to a successor).
    lock: WorkdirLock,
    successor: Successor,
}

fn run_server(
    cfg: ServerConfig,
    backend: Arc<dyn Backend>,
    listener: Option<Listener>,
    manager: &mut Manager,
    daemon: Daemon,
) -> Result<(), Fail> {
    raise_fd_limit();
    // Block the signals before any thread starts, so every thread inherits
    // the mask and the signals are only seen through the signalfd.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGUSR2);
    mask.thread_block()?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let sock = cfg.sock.clone();
    let status = format!("serving {} on {}", backend.describe(), sock.display());
    let mut server = Server::with_listener(cfg, backend, listener)?;
    // An adopted socket names whoever last called listen(): now this process.
    upgrade::relisten(server.listener_fd());
    // The socket listens: a client connecting from now on is served.
    manager.ready(&status, &sock);
    let mut handover = None;
    // The reactor's stop fd: an epoll set of the signalfd and, while an
    // upgrade is pending, the successor's ready pipe and its deadline, so
    // the daemon serves while the new binary starts.
    let wake = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    wake.add(&sfd, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
    let mut pending: Option<upgrade::Pending> = None;
    let result = loop {
        if let Err(e) = server.run(Some(wake.0.as_fd())) {
            manager.stopping();
            break Err(e);
        }
        let (stop, upgrade_asked) = read_signals(&sfd);
        if let Some(signo) = stop {
            log::info!("signal {signo} received; answering what was read, then stopping");
            if let Some(p) = pending.take() {
                p.abort();
            }
            manager.stopping();
            break server.drain(STOP_DRAIN, false);
        }
        if upgrade_asked && pending.is_none() {
            pending = begin_upgrade(&server, manager, &daemon, &sock, &wake);
        }
        let Some(p) = pending.take() else {
            continue;
        };
        // The pipe and the timer leave the epoll set as they close.
        match p.check() {
            upgrade::Check::Waiting(p) => pending = Some(p),
            upgrade::Check::Ready(h) => {
                // The manager learns the new main pid while this one lives.
                manager.handing_over(h.pid(), upgrade::WATCHDOG_GRACE);
                handover = Some(h);
                break server.drain(upgrade::DRAIN_WAIT, true);
            }
            upgrade::Check::Failed(why) => {
                log::error!("{why}");
                server.metrics().work.upgrades_failed.bump();
                manager.reload_failed(&status);
            }
        }
    };
    drop(server);
    let stop_too = handover.is_some() && stop_requested(&sfd);
    match handover {
        Some(h) => {
            // Closed, not unlocked: the lock belongs to the open file the
            // successor shares, and stays its.
            drop(daemon.lock.into_fd());
            log::info!("upgrade: handed over; exiting");
            h.release(stop_too);
        }
        None => drop(daemon),
    }
    log::info!("stopped");
    Ok(result?)
}

/// SIGUSR2: starts the successor (`wake` then watches its ready pipe and
/// deadline) and tells the manager a reload began. `None` when it could not
/// be started: logged and counted, the daemon goes on serving.
fn begin_upgrade(
    server: &Server,
    manager: &mut Manager,
    daemon: &Daemon,
    sock: &Path,
    wake: &Epoll,
) -> Option<upgrade::Pending> {
    log::info!("SIGUSR2: upgrading to {}", daemon.successor.exe().display());
    let inherit = upgrade::Inherit {
        sock: sock.to_path_buf(),
        owned: server.owns_socket_file(),
        notify_socket: manager.notify_socket(),
        watchdog: manager.watchdog_timeout(),
    };
    let (socket, lock) = (server.listener_fd(), daemon.lock.as_fd());
    let started = upgrade::start(&daemon.successor, socket, lock, inherit).and_then(|p| {
        let watched = wake
            .add(p.ready_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 1))
            .and_then(|()| wake.add(p.timer_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 2)));
        match watched {
            Ok(()) => Ok(p),
            Err(e) => {
                // Unwatched, it would never be released or reaped.
                p.abort();
                Err(Fail(format!("upgrade: watch the new binary: {e}")))
            }
        }
    });
    match started {
        Ok(p) => {
            manager.reloading();
            Some(p)
        }
        Err(Fail(why)) => {
            log::error!("{why}");
            server.metrics().work.upgrades_failed.bump();
            None
        }
    }
}

/// Takes every pending signal: the stop signal if one came, and whether an
/// upgrade was asked for.
fn read_signals(sfd: &SignalFd) -> (Option<i32>, bool) {
    let (mut stop, mut upgrade) = (None, false);
    while let Ok(Some(sig)) = sfd.read_signal() {
        let signo = sig.ssi_signo as i32;
        if signo == Signal::SIGUSR2 as i32 {
            upgrade = true;
        } else {
            stop = Some(signo);
        }
    }
    (stop, upgrade)
}

/// Whether SIGTERM or SIGINT arrived (during an upgrade's drain): the
/// operator asked for a stop, which then goes to the successor.
fn stop_requested(sfd: &SignalFd) -> bool {
    let mut stop = false;
    while let Ok(Some(sig)) = sfd.read_signal() {
        let signo = sig.ssi_signo as i32;
        stop |= signo == Signal::SIGTERM as i32 || signo == Signal::SIGINT as i32;
    }
    stop
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
