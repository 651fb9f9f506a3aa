//! The reference backend: blobs of any registry, named by references
//! (`HOST[:PORT]/REPO@sha256:HEX`). For each reference the endpoints come
//! from the host's `hosts.toml` (mirrors in file order, then the origin) or
//! the default (`https://HOST`, plain HTTP for loopback hosts); each is tried
//! in turn, and one that fails (cannot connect, times out, 5xx, does not have
//! the blob) is skipped for a cool-down. The origin is always tried last and
//! never skipped, so its answer is the one a client sees when all failed.
//!
//! An endpoint client is a [`Registry`] per endpoint, repository and TLS
//! settings, kept a while (see `registry/clients.rs`), made with the
//! credentials Docker's config gives for the endpoint's host (a credential
//! helper runs here, on a worker thread), the environment's proxies (each
//! request takes the one its own URL calls for), and, for an `https://`
//! endpoint, a TLS config with the hosts.toml `ca` files and
//! `skip_verify` (made once per endpoint and settings; a CA file that does
//! not load fails the endpoint, and is read again on its next use).

use super::clients::{ClientKey, Clients, CLIENT_TTL};
use super::proxy::ProxyEnv;
use super::{digest, Registry, RegistryOptions, Tls};
use crate::backend::{Backend, BackendError, EndpointStats};
use crate::credentials::{Credential, Credentials};
use crate::hosts::{default_config, Endpoint, HostsDir};
use crate::reference::Reference;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default time a failing endpoint is skipped.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(30);

/// Cool-downs kept before ended ones are swept out.
const MAX_COOLING: usize = 256;

/// How the reference backend reaches registries.
pub struct RegistriesConfig {
    /// `--hosts-dir`: containerd's certs.d layout; `None`: defaults only.
    pub hosts: Option<HostsDir>,
    pub credentials: Credentials,
    /// Timeouts and retries of every endpoint (its credentials, proxy and
    /// headers are set per endpoint).
    pub options: RegistryOptions,
    pub proxy: ProxyEnv,
    pub cool_down: Duration,
}

/// See the module docs.
pub struct Registries {
    cfg: RegistriesConfig,
    /// Endpoint clients by (API root, repository, TLS settings).
    clients: Mutex<Clients>,
    /// TLS configs by (API root, settings).
    tls: Mutex<HashMap<(String, Tls), Arc<rustls::ClientConfig>>>,
    /// Endpoints being skipped, until when.
    cooling: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn config_error(what: String, e: impl std::fmt::Display) -> BackendError {
    BackendError::Io(
        what,
        io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    )
}

impl Registries {
    pub fn new(cfg: RegistriesConfig) -> Registries {
        Registries {
            cfg,
            clients: Mutex::new(Clients::default()),
            tls: Mutex::new(HashMap::new()),
            cooling: Mutex::new(HashMap::new()),
        }
    }

    fn parse(id: &str) -> Result<Reference, BackendError> {
        Reference::parse(id).map_err(|e| config_error(format!("reference {id:?}"), e))
    }

    /// The endpoints to try for `r`, in order.
    fn endpoints(&self, r: &Reference) -> Result<Vec<Endpoint>, BackendError> {
        let cfg = match &self.cfg.hosts {
            Some(dir) => dir
                .resolve(r.host())
                .map_err(|e| config_error("hosts.toml".into(), e))?,
            None => default_config(r.host()),
        };
        if cfg.endpoints.is_empty() {
            return Err(config_error(
                format!("registry {}", r.host().authority()),
                "no endpoint with the pull capability",
            ));
        }
        Ok(cfg.endpoints)
    }

    /// The client of endpoint `ep` for `r`'s repository: a kept one, or
    /// one made now with the credentials Docker's config has now.
    fn client(&self, ep: &Endpoint, r: &Reference) -> Result<Arc<Registry>, BackendError> {
        let key = client_key(ep, r);
        if let Some(c) = lock(&self.clients).get(&key, Instant::now()) {
            return Ok(c);
        }
        let mut opts = self.cfg.options.clone();
        opts.tls = self.tls_config(ep, &key.2)?;
        let authority = credential_authority(ep, r);
        // A client pulling anonymously because the lookup failed (a helper
        // that timed out) is kept only as long as a failing endpoint is
        // skipped, so the next lookup comes soon.
        let mut ttl = CLIENT_TTL;
        match self.cfg.credentials.lookup(&authority) {
            Ok(Some(Credential::Basic { user, password })) => {
                opts.credentials = Some((user, password));
            }
            Ok(Some(Credential::IdentityToken(token))) => {
                log::debug!("{authority}: using the identity token of Docker's config");
                opts.identity_token = Some(token);
            }
            Ok(None) => {}
            Err(e) => {
                log::warn!("{authority}: credentials: {e}; pulling anonymously");
                ttl = ttl.min(self.cfg.cool_down);
            }
        }
        opts.proxy = self.cfg.proxy.clone();
        opts.headers = ep.headers.clone();
        let client = Registry::endpoint(ep.url.clone(), r.repository(), &opts)
            .map_err(|e| config_error(format!("endpoint {}", ep.url), e))?;
        let client = Arc::new(client);
        lock(&self.clients).insert(key, client.clone(), ttl, Instant::now());
        Ok(client)
    }

    /// The TLS config of endpoint `ep` with settings `tls`: `None` for
    /// ureq's default, else made on first use (which, with `skip_verify`,
    /// logs a warning, once).
    fn tls_config(
        &self,
        ep: &Endpoint,
        tls: &Tls,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, BackendError> {
        if tls.is_default() {
            return Ok(None);
        }
        let key = (ep.url.to_string(), tls.clone());
        if let Some(c) = lock(&self.tls).get(&key) {
            return Ok(Some(c.clone()));
        }
        let config = tls
            .client_config(&ep.url)
            .map_err(|e| config_error(format!("endpoint {}", ep.url), e))?;
        match lock(&self.tls).entry(key) {
            // Another worker made it meanwhile (and warned).
            Entry::Occupied(e) => Ok(Some(e.get().clone())),
            Entry::Vacant(e) => {
                if tls.skip_verify {
                    log::warn!(
                        "endpoint {}: skip_verify is set: its TLS certificate is NOT verified \
                         (anyone on the network path can impersonate it)",
                        ep.url
                    );
                }
                for ca in &tls.extra_ca {
                    log::info!("endpoint {}: trusting the CA file {}", ep.url, ca.display());
                }
                Ok(Some(e.insert(config).clone()))
            }
        }
    }

    fn cooling(&self, ep: &Endpoint) -> bool {
        let mut map = lock(&self.cooling);
        let key = ep.url.as_str();
        match map.get(key) {
            Some(&until) if Instant::now() < until => true,
            Some(_) => {
                map.remove(key);
                false
            }
            None => false,
        }
    }

    fn cool(&self, ep: &Endpoint) {
        let now = Instant::now();
        let mut map = lock(&self.cooling);
        // Clients name the hosts: past ended cool-downs are dropped so
        // the map holds only the endpoints skipped now.
        if map.len() >= MAX_COOLING {
            map.retain(|_, until| *until > now);
        }
        map.insert(ep.url.to_string(), now + self.cfg.cool_down);
    }

    /// Runs `op` on each endpoint of `id` until one succeeds; see the
    /// module docs for the order and what a failure costs an endpoint.
    fn each_endpoint<T>(
        &self,
        id: &str,
        what: &str,
        op: impl Fn(&Registry, &str) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let r = Self::parse(id)?;
        let digest = format!("sha256:{}", r.digest().hex());
        let endpoints = self.endpoints(&r)?;
        let mut all_missing = true;
        let mut last = None;
        for (i, ep) in endpoints.iter().enumerate() {
            let final_try = i + 1 == endpoints.len();
            if !final_try && self.cooling(ep) {
                log::debug!("{what} {r}: skipping {} (cooling down)", ep.url);
                continue;
            }
            let result = self.client(ep, &r).and_then(|c| op(&c, &digest));
            let e = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let missing = matches!(e, BackendError::NotFound);
            all_missing &= missing;
            if matches!(e, BackendError::AccessDenied { .. }) {
                // Its credentials were refused: the next call reads them
                // again (a rotated password, a helper's new token).
                lock(&self.clients).remove(&client_key(ep, &r));
                self.cfg.credentials.forget(&credential_authority(ep, &r));
            }
            if !missing && !matches!(e, BackendError::AccessDenied { .. }) && !final_try {
                self.cool(ep);
            }
            let next = if final_try {
                ""
            } else {
                "; trying the next endpoint"
            };
            log::warn!("{what} {r}: endpoint {} failed: {e}{next}", ep.url);
            last = Some(e);
        }
        match last {
            Some(_) if all_missing => Err(BackendError::NotFound),
            Some(e) => Err(e),
            None => Err(BackendError::NotFound),
        }
    }
}

/// Whose credentials `ep` gets: the reference's host for its default
/// origin (so Docker Hub's keys work for `registry-1.docker.io`), else the
/// endpoint's own host (a mirror, or a hosts.toml `server` elsewhere), as
/// containerd does, so a host's credentials never go to another host.
fn credential_authority(ep: &Endpoint, r: &Reference) -> String {
    let own = authority_of(&ep.url);
    let default = default_config(r.host())
        .endpoints
        .first()
        .map(|d| authority_of(&d.url));
    if ep.is_origin && default.as_deref() == Some(own.as_str()) {
        return r.host().authority();
    }
    crate::reference::Host::parse(&own)
        .map(|h| h.authority())
        .unwrap_or_default()
}

/// The key of `ep`'s client for `r`'s repository.
fn client_key(ep: &Endpoint, r: &Reference) -> ClientKey {
    (
        ep.url.to_string(),
        r.repository().to_owned(),
        endpoint_tls(ep),
    )
}

/// The TLS settings hosts.toml gives endpoint `ep`: its `ca` and
/// `skip_verify` for an `https://` endpoint, none for plain HTTP.
fn endpoint_tls(ep: &Endpoint) -> Tls {
    if ep.url.scheme() != "https" {
        if !ep.ca.is_empty() || ep.skip_verify {
            log::debug!(
                "endpoint {}: `ca` and `skip_verify` do not apply to plain HTTP",
                ep.url
            );
        }
        return Tls::default();
    }
    Tls {
        extra_ca: ep.ca.clone(),
        skip_verify: ep.skip_verify,
    }
}

/// Checks at start what can be checked of a hosts directory without
/// contacting anyone: that each host directory's configuration reads, and
/// that the CA files of its `https://` endpoints load. Returns the problems,
/// each naming its file. They are not fatal: the files are read again when a
/// reference needs them, so a fix applies without a restart.
pub fn check_hosts_dir(dir: &HostsDir) -> Vec<String> {
    let mut problems = Vec::new();
    let configs = match dir.all_configs() {
        Ok(c) => c,
        Err(e) => return vec![e.to_string()],
    };
    for config in configs {
        let endpoints = match config {
            Ok(c) => c.endpoints,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        for ep in endpoints {
            let tls = endpoint_tls(&ep);
            if tls.extra_ca.is_empty() {
                continue;
            }
            if let Err(e) = tls.client_config(&ep.url) {
                problems.push(format!("endpoint {}: {e}", ep.url));
            }
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

/// `host[:port]` of a URL.
fn authority_of(url: &url::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

impl Backend for Registries {
    fn canonical_id(&self, _id: &str) -> Option<String> {
        // Plain ids never reach this backend: only references do.
        None
    }

    fn blob_size(&self, id: &str) -> Result<u64, BackendError> {
        self.each_endpoint(id, "HEAD", |c, digest| c.blob_size(digest))
    }

    fn read_into(&self, id: &str, offset: u64, len: u64, dst: &File) -> Result<(), BackendError> {
        self.read_into_extent(id, offset, len, dst).map(|_| ())
    }

    fn read_into_extent(
        &self,
        id: &str,
        offset: u64,
        len: u64,
        dst: &File,
    ) -> Result<(u64, u64), BackendError> {
        self.each_endpoint(id, "GET", |c, digest| {
            c.read_into_extent(digest, offset, len, dst)
        })
    }

    fn expected_sha256(&self, id: &str) -> Option<[u8; 32]> {
        let r = Self::parse(id).ok()?;
        digest::sha256_bytes(&format!("sha256:{}", r.digest().hex()))
    }

    fn integrity_failed(&self, id: &str) {
        let Ok(r) = Self::parse(id) else {
            return;
        };
        let digest = format!("sha256:{}", r.digest().hex());
        for c in lock(&self.clients).live() {
            c.forget_whole(&digest);
        }
    }

    fn describe(&self) -> String {
        match &self.cfg.hosts {
            Some(d) => format!("references (hosts dir {})", d.root().display()),
            None => "references".into(),
        }
    }

    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        lock(&self.clients).stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str, is_origin: bool) -> Endpoint {
        let mut ep = default_config(&crate::reference::Host::parse("x.example").unwrap())
            .endpoints
            .remove(0);
        ep.url = url::Url::parse(url).unwrap();
        ep.is_origin = is_origin;
        ep
    }

    #[test]
    fn ended_cool_downs_are_swept_out() {
        let regs = Registries::new(RegistriesConfig {
            hosts: None,
            credentials: Credentials::none(),
            options: RegistryOptions::default(),
            proxy: ProxyEnv::default(),
            cool_down: Duration::ZERO,
        });
        for i in 0..3 * MAX_COOLING {
            regs.cool(&endpoint(&format!("https://h{i}.example/v2"), false));
        }
        assert!(lock(&regs.cooling).len() <= MAX_COOLING, "bounded");
    }

    #[test]
    fn credentials_are_those_of_the_host_an_endpoint_is_on() {
        let hex = "a".repeat(64);
        let r = |s: &str| Reference::parse(&format!("{s}@sha256:{hex}")).unwrap();
        let hub = r("docker.io/library/alpine");
        let own = r("reg.example:5000/app");
        for (ep, reference, want) in [
            // Default origins: the reference's host (Docker Hub's key).
            (
                endpoint("https://registry-1.docker.io/v2", true),
                &hub,
                "docker.io",
            ),
            (
                endpoint("https://reg.example:5000/v2", true),
                &own,
                "reg.example:5000",
            ),
            // A `server` on another host: that host's, never the reference's.
            (
                endpoint("https://other.example/v2", true),
                &own,
                "other.example",
            ),
            (
                endpoint("https://proxy.example:8443/v2", true),
                &hub,
                "proxy.example:8443",
            ),
            // A mirror: its own.
            (
                endpoint("http://127.0.0.1:5001/v2", false),
                &own,
                "127.0.0.1:5001",
            ),
        ] {
            assert_eq!(credential_authority(&ep, reference), want, "{}", ep.url);
        }
    }
}
