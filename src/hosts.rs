//! Registry host configuration in containerd's `certs.d` layout
//! (`--hosts-dir DIR`): which endpoints to try, in which order, with which
//! TLS settings and extra headers, to pull from a registry host.
//!
//! # Directory lookup
//!
//! For a [`Host`] whose [`authority`](Host::authority) is `A`, the first of
//! these that is a directory applies (containerd's order):
//!
//! 1. `DIR/<host>_<port>_` (only for a host with a port; containerd's
//!    older spelling),
//! 2. `DIR/A`, e.g. `DIR/docker.io`, `DIR/127.0.0.1:5000`, `DIR/[::1]:5000`,
//! 3. `DIR/_default`.
//!
//! If that directory has a non-empty `hosts.toml`, it is read. Otherwise it is
//! read as Docker's certificate directory: its `*.crt` files are CA
//! certificates of the origin (client certificates, `*.cert`/`*.key`, are not
//! supported and are ignored with a warning). Without any of these
//! directories (or without `--hosts-dir`, see [`default_config`]) the origin
//! alone is used.
//!
//! # hosts.toml
//!
//! The keys in [`HONOURED_KEYS`] are read; every other key is ignored with a
//! warning (as containerd ignores unknown keys) and listed in
//! [`HostConfig::ignored_keys`]. Malformed TOML, or a honoured key with a
//! value of the wrong type, is an error naming the file.
//!
//! - `[host."<url>"]` tables are mirrors, tried **in file order**, before
//!   the origin. A URL without a scheme gets `https://`.
//! - `server` is the origin's URL. Without it the origin is the default:
//!   `https://HOST`, or `http://HOST` for a loopback host
//!   ([`Host::is_loopback`]), and `https://registry-1.docker.io` for Docker
//!   Hub. The top-level `capabilities`, `ca`, `skip_verify`,
//!   `override_path` and `header` keys configure the origin, whether
//!   `server` is given or not.
//! - `capabilities` (default `["pull", "resolve"]`; `push` is also
//!   accepted): an endpoint without `pull` is left out.
//! - `ca`: a path or a list of paths of CA certificate files, relative to
//!   the host directory unless absolute.
//! - `skip_verify`: do not verify the server's certificate (default false).
//! - `override_path` and the API root: an endpoint's [`Endpoint::url`] is
//!   the root of the distribution API (what `/<repository>/blobs/<digest>`
//!   is appended to). Without `override_path` the URL's path gets `/v2`
//!   appended unless it already ends in `/v2` (`https://m.example.com` →
//!   `https://m.example.com/v2`, `https://m.example.com/cache` →
//!   `https://m.example.com/cache/v2`). With `override_path = true` the URL's
//!   path is the API root as written (`https://m.example.com/api/x` →
//!   `https://m.example.com/api/x/<repository>/blobs/<digest>`), for
//!   registries that do not serve under `/v2`.
//! - `[host."<url>".header]` (or a top-level `[header]`): extra request
//!   headers, each a string or a list of strings (one header line per
//!   value). Header values are never printed (`Debug` shows names only).
//!
//! Nothing here opens a connection: this module only reads files.

mod values;

use crate::reference::{Digest, Host, HostName};
use log::warn;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use toml::{Table, Value};
use url::Url;

/// The configuration file in a host directory.
pub const HOSTS_FILE: &str = "hosts.toml";
/// The host directory used when no other one matches.
pub const DEFAULT_DIR: &str = "_default";
/// The hosts.toml keys blobmgr reads (`host` is the table of mirrors, and
/// `capabilities`, `ca`, `skip_verify`, `override_path` and `header` are
/// read both at the top level and in each `[host."<url>"]` table).
pub const HONOURED_KEYS: &[&str] = &[
    "server",
    "host",
    "capabilities",
    "ca",
    "skip_verify",
    "override_path",
    "header",
];
/// One place to pull a registry's blobs from.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The root of the distribution API: scheme, authority and path, e.g.
    /// `https://mirror.example.com/v2` or `http://127.0.0.1:5000/v2`. No
    /// query, fragment or user info. See [`Endpoint::blob_url`].
    pub url: Url,
    /// CA certificate files to trust besides the built-in roots.
    pub ca: Vec<PathBuf>,
    /// Whether to skip verifying the server's certificate.
    pub skip_verify: bool,
    /// Extra request headers, in file order; a name may repeat.
    pub headers: Vec<(String, String)>,
    /// Whether this is the registry itself (`server`) rather than a mirror.
    pub is_origin: bool,
}

impl Endpoint {
    /// The URL of a blob at this endpoint:
    /// `<url>/<repository>/blobs/sha256:<hex>`.
    pub fn blob_url(&self, repository: &str, digest: &Digest) -> Url {
        let mut url = self.url.clone();
        let path = format!(
            "{}/{repository}/blobs/{digest}",
            self.url.path().trim_end_matches('/')
        );
        url.set_path(&path);
        url
    }
}

impl fmt::Debug for Endpoint {
    /// Shows header names only: values may be credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Endpoint")
            .field("url", &self.url.as_str())
            .field("ca", &self.ca)
            .field("skip_verify", &self.skip_verify)
            .field("header_names", &names)
            .field("is_origin", &self.is_origin)
            .finish()
    }
}

/// What applies to one registry host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Endpoints to try in order: mirrors in file order, then the origin.
    /// Empty when the configuration leaves no endpoint able to pull.
    pub endpoints: Vec<Endpoint>,
    /// The hosts.toml read, if any.
    pub source: Option<PathBuf>,
    /// Keys of that file that were ignored (dotted paths, e.g.
    /// `host."https://m.example.com".dial_timeout`).
    pub ignored_keys: Vec<String>,
}

/// Why a host's configuration cannot be read.
#[derive(Debug)]
pub enum HostsError {
    /// A file or directory could not be read.
    Io {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A hosts.toml is not valid TOML. (The TOML parser's own error is not
    /// kept: its text quotes the offending line, which may hold a header
    /// value such as a token.)
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error, 0 if unknown.
        line: usize,
        /// 1-based column of the error, 0 if unknown.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A honoured key has a value that cannot be used.
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, as a dotted path.
        key: String,
        /// What is wrong (never a header value).
        reason: String,
    },
}

impl fmt::Display for HostsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostsError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            HostsError::Syntax {
                path,
                line,
                column,
                message,
            } => write!(
                f,
                "{}: invalid TOML at line {line}, column {column}: {}",
                path.display(),
                message.trim_end()
            ),
            HostsError::Invalid { path, key, reason } => {
                write!(f, "{}: {key}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for HostsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HostsError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A `--hosts-dir` directory in containerd's `certs.d` layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostsDir {
    root: PathBuf,
}

impl HostsDir {
    /// A hosts directory at `root` (not read until [`HostsDir::resolve`]).
    pub fn new(root: impl Into<PathBuf>) -> HostsDir {
        HostsDir { root: root.into() }
    }

    /// The directory given.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host directory that applies to `host` (see the
    /// [module docs](self)), or `None`.
    pub fn host_dir(&self, host: &Host) -> Result<Option<PathBuf>, HostsError> {
        for dir in candidate_dirs(host) {
            let path = self.root.join(dir);
            match fs::metadata(&path) {
                Ok(m) if m.is_dir() => return Ok(Some(path)),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(HostsError::Io { path, source }),
            }
        }
        Ok(None)
    }

    /// Reads the configuration of `host`. The files are read on every
    /// call (as containerd does, edits apply without a restart); callers
    /// may cache the answer.
    pub fn resolve(&self, host: &Host) -> Result<HostConfig, HostsError> {
        match self.host_dir(host)? {
            Some(dir) => read_host_dir(&dir, host),
            None => Ok(default_config(host)),
        }
    }

    /// The configuration of every host directory under the root, in name
    /// order, as [`HostsDir::resolve`] reads it for a host it applies to
    /// (`_default` for a placeholder host, `default.invalid`). Directories
    /// whose names are not host directories are left out. For checks at
    /// start.
    pub fn all_configs(&self) -> Result<Vec<Result<HostConfig, HostsError>>, HostsError> {
        let io_err = |source| HostsError::Io {
            path: self.root.clone(),
            source,
        };
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
        dirs.sort();
        Ok(dirs
            .iter()
            .filter_map(|dir| {
                let name = dir.file_name()?.to_str()?;
                let host = host_of_dir(name)?;
                Some(read_host_dir(dir, &host))
            })
            .collect())
    }
}

/// The host a directory named `name` is for (see [`candidate_dirs`]); a
/// placeholder for `_default`.
fn host_of_dir(name: &str) -> Option<Host> {
    if name == DEFAULT_DIR {
        return Host::parse("default.invalid").ok();
    }
    if let Some((h, port)) = name
        .strip_suffix('_')
        .and_then(|n| n.rsplit_once('_'))
        .filter(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Host::parse(&format!("{h}:{port}")).ok();
    }
    Host::parse(name).ok()
}

/// Reads host directory `dir` for `host`: its hosts.toml, else its
/// certificate files.
fn read_host_dir(dir: &Path, host: &Host) -> Result<HostConfig, HostsError> {
    let file = dir.join(HOSTS_FILE);
    match fs::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => parse_hosts_toml(&text, host, &file),
        Ok(_) => cert_dir_config(host, dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => cert_dir_config(host, dir),
        Err(source) => Err(HostsError::Io { path: file, source }),
    }
}

/// The configuration without any hosts directory: the origin alone
/// (`https://HOST/v2`, `http://` for loopback hosts,
/// `https://registry-1.docker.io/v2` for Docker Hub).
pub fn default_config(host: &Host) -> HostConfig {
    default_config_with(host, Section::default())
}

/// Parses the text of a hosts.toml for `host`. `file` names the file in
/// errors and warnings, and its directory is the base of relative `ca`
/// paths.
pub fn parse_hosts_toml(text: &str, host: &Host, file: &Path) -> Result<HostConfig, HostsError> {
    let table: Table = toml::from_str(text).map_err(|e| syntax_error(file, text, &e))?;
    let mut p = Parser {
        file,
        base: file.parent().unwrap_or(Path::new("")),
        ignored: Vec::new(),
    };
    let mut endpoints = Vec::new();
    if let Some(mirrors) = table.get("host") {
        let mirrors = p.table(mirrors, "host")?;
        for (url, section) in mirrors {
            let key = format!("host.{url:?}");
            let section = p.section(p.table(section, &key)?, &key, false)?;
            if section.pull {
                endpoints.push(p.endpoint(url, &key, section, false)?);
            }
        }
    }
    let origin = p.section(&table, "", true)?;
    if origin.pull {
        endpoints.push(match table.get("server") {
            Some(Value::String(url)) => p.endpoint(url, "server", origin, true)?,
            Some(_) => return Err(p.invalid("server", "must be a string")),
            None => default_origin(host, origin),
        });
    }
    for key in &p.ignored {
        warn!("{}: ignoring {key} (not supported)", file.display());
    }
    Ok(HostConfig {
        endpoints,
        source: Some(file.to_path_buf()),
        ignored_keys: p.ignored,
    })
}

/// Directory names to try for `host`, in order.
fn candidate_dirs(host: &Host) -> Vec<String> {
    let mut dirs = Vec::with_capacity(3);
    if let Some(port) = host.port() {
        let name = match host.name() {
            HostName::Domain(d) => d.clone(),
            HostName::Ipv4(a) => a.to_string(),
            HostName::Ipv6(a) => format!("[{a}]"),
        };
        dirs.push(format!("{name}_{port}_"));
    }
    dirs.push(host.authority());
    dirs.push(DEFAULT_DIR.to_string());
    dirs
}

/// A host directory without hosts.toml: Docker's `certs.d` files.
fn cert_dir_config(host: &Host, dir: &Path) -> Result<HostConfig, HostsError> {
    let io_err = |source| HostsError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut section = Section::default();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let path = entry.map_err(io_err)?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("crt") if path.is_file() => section.ca.push(path),
            Some("cert") | Some("key") => warn!(
                "{}: client certificates are not supported; ignored",
                path.display()
            ),
            _ => {}
        }
    }
    section.ca.sort();
    Ok(default_config_with(host, section))
}

fn default_config_with(host: &Host, section: Section) -> HostConfig {
    HostConfig {
        endpoints: vec![default_origin(host, section)],
        source: None,
        ignored_keys: Vec::new(),
    }
}

/// The origin when no `server` is given.
fn default_origin(host: &Host, section: Section) -> Endpoint {
    let scheme = if host.is_loopback() { "http" } else { "https" };
    let url = format!("{scheme}://{}/v2", host.registry_authority());
    Endpoint {
        url: Url::parse(&url).expect("a parsed host makes a valid URL"),
        ca: section.ca,
        skip_verify: section.skip_verify,
        headers: section.headers,
        is_origin: true,
    }
}

/// Maps the TOML parser's error to one that does not quote the file.
fn syntax_error(file: &Path, text: &str, e: &toml::de::Error) -> HostsError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            (line, column)
        }
        None => (0, 0),
    };
    HostsError::Syntax {
        path: file.to_path_buf(),
        line,
        column,
        message: e.message().to_string(),
    }
}

/// The settings of one endpoint's table.
#[derive(Debug)]
struct Section {
    pull: bool,
    ca: Vec<PathBuf>,
    skip_verify: bool,
    override_path: bool,
    headers: Vec<(String, String)>,
}

impl Default for Section {
    fn default() -> Section {
        Section {
            pull: true,
            ca: Vec::new(),
            skip_verify: false,
            override_path: false,
            headers: Vec::new(),
        }
    }
}

/// Reads one hosts.toml's values (see `values`), collecting ignored keys.
struct Parser<'a> {
    file: &'a Path,
    base: &'a Path,
    ignored: Vec<String>,
}

#[cfg(test)]
mod tests;
