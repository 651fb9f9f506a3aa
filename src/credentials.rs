//! Registry credentials from Docker's `config.json` (`--docker-config`).
//!
//! # Where the file is
//!
//! [`Env::config_path`]: the path given explicitly, else
//! `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`. The
//! environment is passed in as an [`Env`] (tests build their own; the
//! daemon uses [`Env::from_process`]). A missing file at a default path
//! means no credentials; a missing explicit file is an error.
//!
//! # What is read
//!
//! - `auths.<host>.auth`: base64 of `user:password` (padding optional);
//!   `auths.<host>.username` / `password` when there is no `auth`;
//!   `auths.<host>.identitytoken`, which wins over both (Docker sends it as
//!   an OAuth2 refresh token). An entry with none of them (what
//!   `docker login` leaves when a helper stores the secret) names no
//!   credential.
//! - `credHelpers.<host>`, else `credsStore`: the helper
//!   `docker-credential-<name>` is run as `docker-credential-<name> get`
//!   with the server URL on standard input; it answers
//!   `{"ServerURL","Username","Secret"}` (Username `<token>` means the
//!   Secret is an identity token) or fails saying "credentials not found".
//!   When a helper has nothing for a host, the `auths` entry (if it has a
//!   credential) is used.
//! - every other key is ignored.
//!
//! # Host keys
//!
//! Keys are matched after normalisation: a scheme (`https://`) and any path
//! are dropped and the rest lowercased, so `https://host:5000/v1/`,
//! `http://host:5000` and `host:5000` are one key. Docker Hub's names
//! (`https://index.docker.io/v1/`, `index.docker.io`, `docker.io`,
//! `registry-1.docker.io`) are one key too, and a helper is asked for Docker
//! Hub as `https://index.docker.io/v1/`, as Docker does. An exact key wins
//! over a normalised match.
//!
//! # Helpers
//!
//! Helpers are searched for in the directories of the [`Env`]'s `PATH`
//! (relative entries are skipped) and run with a timeout
//! ([`DEFAULT_HELPER_TIMEOUT`]); on timeout the helper's whole process group
//! is killed and reaped, so nothing is left running and no thread waits on
//! it. The secret never appears on a command line, in a log line, in an
//! error, or in `Debug`/`Display` output. Helper answers (credentials and
//! "not found" alike) are cached per host for [`DEFAULT_CACHE_TTL`];
//! failures are not cached.

mod helper;

use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use base64::Engine;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The youngest helper answer [`Credentials::forget`] drops.
pub const MIN_REASK: Duration = Duration::from_secs(5);

/// How long a credential helper may run.
pub const DEFAULT_HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a helper's answer for a host is reused.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
/// Docker Hub's key in config.json, and the server URL its helpers know.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// The normalised key of Docker Hub.
const DOCKER_HUB_KEY: &str = "docker.io";
/// Names of Docker Hub that normalise to [`DOCKER_HUB_KEY`].
const DOCKER_HUB_NAMES: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// A credential for one registry host. `Debug` and `Display` never show the
/// password or token.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (Basic, or the token flow's basic step).
    Basic {
        /// The user name.
        user: String,
        /// The password (secret).
        password: String,
    },
    /// An identity token: an OAuth2 refresh token for the registry's token
    /// endpoint (secret).
    IdentityToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", user)
                .field("password", &format_args!("<redacted>"))
                .finish(),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

impl fmt::Display for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { user, .. } => write!(f, "password of user {user:?}"),
            Credential::IdentityToken(_) => write!(f, "identity token"),
        }
    }
}

/// The environment the credential lookup depends on, injectable for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    /// `$DOCKER_CONFIG` (a directory); empty counts as unset.
    pub docker_config: Option<PathBuf>,
    /// `$HOME`; empty counts as unset.
    pub home: Option<PathBuf>,
    /// `$PATH`, searched for `docker-credential-<name>`.
    pub path: Option<OsString>,
}

impl Env {
    /// The daemon's own environment.
    pub fn from_process() -> Env {
        Env {
            docker_config: std::env::var_os("DOCKER_CONFIG").map(PathBuf::from),
            home: std::env::var_os("HOME").map(PathBuf::from),
            path: std::env::var_os("PATH"),
        }
    }

    /// The config.json to read: `explicit`, else
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub fn config_path(&self, explicit: Option<&Path>) -> Option<PathBuf> {
        let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        if let Some(p) = explicit {
            return Some(p.to_path_buf());
        }
        if let Some(dir) = set(&self.docker_config) {
            return Some(dir.join("config.json"));
        }
        set(&self.home).map(|home| home.join(".docker").join("config.json"))
    }

    /// The absolute directories of `PATH`, in order.
    pub fn helper_dirs(&self) -> Vec<PathBuf> {
        self.path
            .as_deref()
            .map(|p| {
                std::env::split_paths(p)
                    .filter(|d| d.is_absolute())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Why credentials could not be read or looked up. Messages never contain
/// a secret (nor the parts of config.json or of a helper's answer that
/// could hold one).
#[derive(Debug)]
pub enum CredentialError {
    /// The config file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The config file is not Docker's format.
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (a position or a key, never a value).
        reason: String,
    },
    /// `docker-credential-<helper>` is not in any PATH directory.
    HelperNotFound {
        /// The helper's name.
        helper: String,
    },
    /// The helper could not be started or talked to.
    HelperIo {
        /// The helper's name.
        helper: String,
        /// Why.
        source: io::Error,
    },
    /// The helper did not finish in time; it was killed.
    HelperTimeout {
        /// The helper's name.
        helper: String,
        /// The time it had.
        timeout: Duration,
    },
    /// The helper failed (other than "credentials not found").
    HelperFailed {
        /// The helper's name.
        helper: String,
        /// Its exit status.
        status: String,
        /// The first line of its output, shortened.
        message: String,
    },
    /// The helper's answer is not the expected JSON, or too large.
    HelperOutput {
        /// The helper's name.
        helper: String,
        /// What is wrong (never the answer itself).
        reason: String,
    },
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use CredentialError::*;
        let h = |name: &str| format!("credential helper docker-credential-{name}");
        match self {
            Io { path, source } => write!(f, "{}: {source}", path.display()),
            Malformed { path, reason } => write!(f, "{}: {reason}", path.display()),
            HelperNotFound { helper } => write!(f, "{} not found in PATH", h(helper)),
            HelperIo { helper, source } => write!(f, "{}: {source}", h(helper)),
            HelperTimeout { helper, timeout } => {
                write!(f, "{} did not answer within {timeout:?}; killed", h(helper))
            }
            HelperFailed {
                helper,
                status,
                message,
            } => write!(f, "{} failed ({status}): {message}", h(helper)),
            HelperOutput { helper, reason } => write!(f, "{}: {reason}", h(helper)),
        }
    }
}

impl std::error::Error for CredentialError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CredentialError::Io { source, .. } | CredentialError::HelperIo { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// config.json as far as it is read.
#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// One `auths` entry: its key as written, normalised, and its credential.
struct Auth {
    raw: String,
    key: String,
    credential: Option<Credential>,
}

/// The credentials of one config.json, and the means to run its helpers.
/// `Sync`: one instance serves every worker thread.
pub struct Credentials {
    source: Option<PathBuf>,
    auths: Vec<Auth>,
    /// Normalised host key → helper name.
    helpers: BTreeMap<String, String>,
    store: Option<String>,
    helper_dirs: Vec<PathBuf>,
    helper_timeout: Duration,
    cache_ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Option<Credential>)>>,
}

impl Credentials {
    /// No credentials at all: every lookup answers `None`.
    pub fn none() -> Credentials {
        Credentials::build(None, Vec::new(), BTreeMap::new(), None)
    }

    /// Reads the config.json that `env` and `explicit` designate (see the
    /// [module docs](self)); helpers are searched in `env`'s PATH.
    pub fn load(explicit: Option<&Path>, env: &Env) -> Result<Credentials, CredentialError> {
        let Some(path) = env.config_path(explicit) else {
            return Ok(Credentials::none().with_helper_dirs(env.helper_dirs()));
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound && explicit.is_none() => {
                return Ok(Credentials::none().with_helper_dirs(env.helper_dirs()));
            }
            Err(source) => return Err(CredentialError::Io { path, source }),
        };
        Ok(Credentials::parse(&text, &path)?.with_helper_dirs(env.helper_dirs()))
    }

    /// Parses the text of a config.json; `path` names it in errors. Helpers
    /// are searched nowhere until [`with_helper_dirs`](Self::with_helper_dirs).
    pub fn parse(json: &str, path: &Path) -> Result<Credentials, CredentialError> {
        let malformed = |reason: String| CredentialError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let config: ConfigFile = serde_json::from_str(json).map_err(|e| {
            // serde_json's message may quote a value: give the position only.
            let what = match e.classify() {
                serde_json::error::Category::Data => "a value of the wrong type",
                _ => "invalid JSON",
            };
            malformed(format!(
                "{what} at line {}, column {}",
                e.line(),
                e.column()
            ))
        })?;
        for (key, name) in &config.cred_helpers {
            if !helper::valid_name(name) {
                return Err(malformed(format!("credHelpers.{key:?}: not a helper name")));
            }
        }
        let store = config.creds_store.filter(|s| !s.is_empty());
        if store.as_deref().is_some_and(|s| !helper::valid_name(s)) {
            return Err(malformed("credsStore: not a helper name".to_string()));
        }
        let mut auths = Vec::with_capacity(config.auths.len());
        for (raw, entry) in config.auths {
            let key = normalise_key(&raw);
            if key.is_empty() {
                return Err(malformed(format!("auths.{raw:?}: not a host")));
            }
            let credential =
                entry_credential(&entry).map_err(|r| malformed(format!("auths.{raw:?}: {r}")))?;
            auths.push(Auth {
                raw,
                key,
                credential,
            });
        }
        let helpers = config
            .cred_helpers
            .into_iter()
            .map(|(k, v)| (normalise_key(&k), v))
            .collect();
        Ok(Credentials::build(
            Some(path.to_path_buf()),
            auths,
            helpers,
            store,
        ))
    }

    /// Searches helpers in `dirs` (in order) instead of the PATH.
    pub fn with_helper_dirs(mut self, dirs: Vec<PathBuf>) -> Credentials {
        self.helper_dirs = dirs;
        self
    }

    /// How long a helper may run (default [`DEFAULT_HELPER_TIMEOUT`]).
    pub fn with_helper_timeout(mut self, timeout: Duration) -> Credentials {
        self.helper_timeout = timeout;
        self
    }

    /// How long helper answers are reused (default [`DEFAULT_CACHE_TTL`];
    /// zero disables the cache).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Credentials {
        self.cache_ttl = ttl;
        self
    }

    /// The config.json read, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The credential for a registry host, given as its authority
    /// (`host[:port]`, e.g. [`Host::authority`](crate::reference::Host::authority);
    /// Docker Hub as `docker.io`). `Ok(None)`: no credential, go anonymous.
    /// May run a helper (and so block up to the helper timeout).
    pub fn lookup(&self, authority: &str) -> Result<Option<Credential>, CredentialError> {
        let key = normalise_key(authority);
        let helper = self.helpers.get(&key).or(self.store.as_ref());
        if let Some(helper) = helper {
            if let Some(found) = self.helper_answer(helper, &key, authority)? {
                return Ok(Some(found));
            }
        }
        Ok(self
            .find_auth(&key, authority)
            .and_then(|a| a.credential.clone()))
    }

    /// Forgets the helper answer kept for `authority`, whose credentials a
    /// registry just refused, so that the next lookup asks the helper
    /// again (a rotated password, a renewed short-lived token); but not
    /// one younger than [`MIN_REASK`], so a client asking again and again
    /// for what it may not pull does not run the helper each time.
    pub fn forget(&self, authority: &str) {
        let key = normalise_key(authority);
        let mut cache = self.cache();
        if cache
            .get(&key)
            .is_some_and(|(at, _)| at.elapsed() >= MIN_REASK)
        {
            cache.remove(&key);
        }
    }

    /// The helper's answer for `key`, from the cache or by running it.
    fn helper_answer(
        &self,
        helper: &str,
        key: &str,
        authority: &str,
    ) -> Result<Option<Credential>, CredentialError> {
        if let Some((at, answer)) = self.cache().get(key) {
            if at.elapsed() < self.cache_ttl {
                return Ok(answer.clone());
            }
        }
        let server_url = self.server_url(key, authority);
        let program = helper::find(helper, &self.helper_dirs)?;
        let answer = helper::get(helper, &program, &server_url, self.helper_timeout)?;
        if !self.cache_ttl.is_zero() {
            let mut cache = self.cache();
            cache.retain(|_, (at, _)| at.elapsed() < self.cache_ttl);
            cache.insert(key.to_string(), (Instant::now(), answer.clone()));
        }
        Ok(answer)
    }

    /// What to ask a helper for: the host's `auths` key as written (what
    /// `docker login` stored the secret under), else Docker Hub's URL or
    /// the normalised key.
    fn server_url(&self, key: &str, authority: &str) -> String {
        let entry = self.auths.iter().find(|a| a.raw == authority);
        match entry.or_else(|| self.auths.iter().find(|a| a.key == key)) {
            Some(a) => a.raw.clone(),
            None if key == DOCKER_HUB_KEY => DOCKER_HUB_SERVER.to_string(),
            None => key.to_string(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<Credential>)>> {
        // A panic elsewhere cannot leave the map inconsistent: use it anyway.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `auths` entry for a host: the key written exactly as asked (or
    /// as Docker Hub's), else the first normalised match with a credential.
    fn find_auth(&self, key: &str, authority: &str) -> Option<&Auth> {
        let exact =
            |a: &&Auth| a.raw == authority || (key == DOCKER_HUB_KEY && a.raw == DOCKER_HUB_SERVER);
        self.auths.iter().find(exact).or_else(|| {
            self.auths
                .iter()
                .find(|a| a.key == key && a.credential.is_some())
        })
    }

    fn build(
        source: Option<PathBuf>,
        auths: Vec<Auth>,
        helpers: BTreeMap<String, String>,
        store: Option<String>,
    ) -> Credentials {
        Credentials {
            source,
            auths,
            helpers,
            store,
            helper_dirs: Vec::new(),
            helper_timeout: DEFAULT_HELPER_TIMEOUT,
            cache_ttl: DEFAULT_CACHE_TTL,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl fmt::Debug for Credentials {
    /// Hosts and helper names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auths: Vec<(&str, Option<&Credential>)> = self
            .auths
            .iter()
            .map(|a| (a.raw.as_str(), a.credential.as_ref()))
            .collect();
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .field("auths", &auths)
            .field("helpers", &self.helpers)
            .field("store", &self.store)
            .field("helper_dirs", &self.helper_dirs)
            .finish_non_exhaustive()
    }
}

/// The lookup key of a config.json key or an authority: scheme and path
/// dropped, lowercased, Docker Hub's names as `docker.io`.
pub fn normalise_key(key: &str) -> String {
    let key = key.trim();
    let lower = key.to_ascii_lowercase();
    let rest = ["https://", "http://"]
        .iter()
        .find_map(|s| lower.strip_prefix(s))
        .unwrap_or(&lower);
    let host = rest.split('/').next().unwrap_or("");
    if DOCKER_HUB_NAMES.contains(&host) {
        DOCKER_HUB_KEY.to_string()
    } else {
        host.to_string()
    }
}

/// The credential of one `auths` entry.
fn entry_credential(entry: &AuthEntry) -> Result<Option<Credential>, &'static str> {
    if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::IdentityToken(token.clone())));
    }
    if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let bad = "auth is not base64 of user:password";
        let decoded = STANDARD_PAD_INDIFFERENT
            .decode(auth.trim())
            .map_err(|_| bad)?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad)?;
        let (user, password) = decoded.split_once(':').ok_or(bad)?;
        return Ok(Some(Credential::Basic {
            user: user.to_string(),
            password: password.to_string(),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(user), Some(password)) if !user.is_empty() || !password.is_empty() => {
            Ok(Some(Credential::Basic {
                user: user.clone(),
                password: password.clone(),
            }))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests;
