//! The reference backend: blobs of any registry, named by references
//! (`HOST[:PORT]/REPO@sha256:HEX`). For each reference the endpoints come
//! from the host's `hosts.toml` (mirrors in file order, then the origin) or
//! the default (`https://HOST`, plain HTTP for loopback hosts); each is tried
//! in turn, and one that fails (cannot connect, times out, 5xx, does not have
//! the blob) is skipped for a cool-down. The origin is always tried last and
//! never skipped, so its answer is the one a client sees when all failed.
//!
//! An endpoint client is a [`Registry`] per endpoint and repository, made on
//! first use with the credentials Docker's config gives for the endpoint's
//! host (a credential helper runs here, on a worker thread) and the proxy
//! the environment names for its URL.

use super::proxy::ProxyEnv;
use super::{digest, Registry, RegistryOptions};
use crate::backend::{Backend, BackendError, EndpointStats};
use crate::credentials::{Credential, Credentials};
use crate::hosts::{default_config, Endpoint, HostsDir};
use crate::reference::Reference;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default time a failing endpoint is skipped.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(30);

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
    /// Endpoint clients by (API root, repository).
    clients: Mutex<HashMap<(String, String), Arc<Registry>>>,
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
            clients: Mutex::new(HashMap::new()),
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

    /// The client of endpoint `ep` for `r`'s repository, made on first use.
    fn client(&self, ep: &Endpoint, r: &Reference) -> Result<Arc<Registry>, BackendError> {
        let key = (ep.url.to_string(), r.repository().to_owned());
        if let Some(c) = lock(&self.clients).get(&key) {
            return Ok(c.clone());
        }
        if !ep.ca.is_empty() || ep.skip_verify {
            return Err(config_error(
                format!("endpoint {}", ep.url),
                "hosts.toml `ca` and `skip_verify` are not supported by this build",
            ));
        }
        let mut opts = self.cfg.options.clone();
        let authority = if ep.is_origin {
            r.host().authority()
        } else {
            crate::reference::Host::parse(&authority_of(&ep.url))
                .map(|h| h.authority())
                .unwrap_or_default()
        };
        opts.credentials = self.credential(&authority);
        opts.proxy = self.cfg.proxy.for_url(&ep.url);
        opts.headers = ep.headers.clone();
        let client = Registry::endpoint(ep.url.clone(), r.repository(), &opts)
            .map_err(|e| config_error(format!("endpoint {}", ep.url), e))?;
        let client = Arc::new(client);
        lock(&self.clients).insert(key, client.clone());
        Ok(client)
    }

    /// Basic credentials for `authority`, if Docker's config has any.
    fn credential(&self, authority: &str) -> Option<(String, String)> {
        match self.cfg.credentials.lookup(authority) {
            Ok(Some(Credential::Basic { user, password })) => Some((user, password)),
            Ok(Some(Credential::IdentityToken(_))) => {
                log::warn!(
                    "{authority}: identity tokens are not supported yet; pulling anonymously"
                );
                None
            }
            Ok(None) => None,
            Err(e) => {
                log::warn!("{authority}: credentials: {e}; pulling anonymously");
                None
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
        let until = Instant::now() + self.cfg.cool_down;
        lock(&self.cooling).insert(ep.url.to_string(), until);
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

    fn verify(&self, id: &str, data: &File, size: u64) -> Result<(), BackendError> {
        let r = Self::parse(id)?;
        digest::check_file(id, &format!("sha256:{}", r.digest().hex()), data, size)
    }

    fn verifies(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        match &self.cfg.hosts {
            Some(d) => format!("references (hosts dir {})", d.root().display()),
            None => "references".into(),
        }
    }

    fn endpoint_stats(&self) -> Vec<EndpointStats> {
        let mut by_origin: HashMap<String, EndpointStats> = HashMap::new();
        for c in lock(&self.clients).values() {
            let s = c.stats();
            let e = by_origin
                .entry(s.endpoint.clone())
                .or_insert_with(|| EndpointStats {
                    endpoint: s.endpoint.clone(),
                    ..Default::default()
                });
            e.ok += s.ok;
            e.errors += s.errors;
            e.bytes += s.bytes;
        }
        let mut all: Vec<EndpointStats> = by_origin.into_values().collect();
        all.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        all
    }
}
