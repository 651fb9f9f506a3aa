//! The files that tell the daemon how to reach registries, written by
//! tests: a Docker credential helper script ([`CredHelper`]), Docker's
//! `config.json` ([`DockerConfig`]) and containerd's `hosts.toml`
//! ([`HostsToml`], in the `certs.d` layout).
//!
//! Secrets and names in them are `[A-Za-z0-9._-]+` (checked), so nothing
//! needs quoting in shell, JSON or TOML beyond plain quotes.

use base64::Engine;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn check_plain(what: &str, s: &str) {
    assert!(
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b)),
        "{what} {s:?}: tests use [A-Za-z0-9._:-]+ here"
    );
}

/// A `docker-credential-<name>` shell script in a directory of its own (put
/// [`CredHelper::dir`] first on the daemon's `PATH`). It implements `get`:
/// reads the server URL on stdin, and for a known host (matched after
/// dropping `http://` / `https://` and any path, as Docker's keys are)
/// prints `{"ServerURL":…,"Username":…,"Secret":…}` and exits 0; otherwise
/// it prints "credentials not found in native keychain" and exits 1, as
/// Docker's helpers do. Every call is appended to [`CredHelper::calls`]
/// (the arguments and the server URL read, never a secret).
pub struct CredHelper {
    pub name: String,
    dir: tempfile::TempDir,
}

impl CredHelper {
    /// `entries`: (host key `HOST:PORT`, username, secret).
    pub fn write(name: &str, entries: &[(&str, &str, &str)]) -> CredHelper {
        check_plain("helper name", name);
        let dir = tempfile::tempdir().expect("tempdir");
        let calls = dir.path().join("calls.log");
        let mut cases = String::new();
        for (host, user, secret) in entries {
            check_plain("host", host);
            check_plain("user", user);
            check_plain("secret", secret);
            let json = serde_json::json!({
                "ServerURL": host, "Username": user, "Secret": secret,
            });
            cases.push_str(&format!("  '{host}') printf '%s\\n' '{json}'; exit 0 ;;\n"));
        }
        let script = format!(
            "#!/bin/sh\n\
             # docker-credential-{name}, written by the blobmgr tests.\n\
             server=$(cat)\n\
             printf '%s|%s\\n' \"$*\" \"$server\" >> '{calls}'\n\
             if [ \"$1\" != get ]; then echo \"unsupported: $1\"; exit 1; fi\n\
             key=${{server#http://}}\n\
             key=${{key#https://}}\n\
             key=${{key%%/*}}\n\
             case \"$key\" in\n\
             {cases}\
             esac\n\
             echo 'credentials not found in native keychain'\n\
             exit 1\n",
            calls = calls.display(),
        );
        let path = dir.path().join(format!("docker-credential-{name}"));
        std::fs::write(&path, script).expect("write helper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        CredHelper {
            name: name.to_string(),
            dir,
        }
    }

    /// The directory holding the script.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The script's path.
    pub fn path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("docker-credential-{}", self.name))
    }

    /// `PATH` with this helper's directory first.
    pub fn path_env(&self) -> String {
        let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        format!("{}:{rest}", self.dir.path().display())
    }

    /// Each call so far: `(arguments, server URL read on stdin)`.
    pub fn calls(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.dir.path().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (a, s) = l.split_once('|').unwrap_or((l, ""));
                (a.to_string(), s.to_string())
            })
            .collect()
    }
}

/// Docker's `config.json`: `auths` (base64 `user:password` in `auth`, or an
/// `identitytoken`), `credHelpers`, `credsStore`.
#[derive(Default)]
pub struct DockerConfig {
    auths: Vec<(String, serde_json::Value)>,
    helpers: Vec<(String, String)>,
    store: Option<String>,
}

impl DockerConfig {
    pub fn new() -> DockerConfig {
        DockerConfig::default()
    }

    /// `auths.<key>.auth = base64(user:password)`.
    pub fn auth(mut self, key: &str, user: &str, password: &str) -> DockerConfig {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.auths
            .push((key.to_string(), serde_json::json!({ "auth": b64 })));
        self
    }

    /// `auths.<key>.identitytoken = token`.
    pub fn identity_token(mut self, key: &str, token: &str) -> DockerConfig {
        self.auths.push((
            key.to_string(),
            serde_json::json!({ "identitytoken": token }),
        ));
        self
    }

    /// `auths.<key> = {}` (what `docker login` leaves when a helper stores
    /// the secret).
    pub fn empty_auth(mut self, key: &str) -> DockerConfig {
        self.auths.push((key.to_string(), serde_json::json!({})));
        self
    }

    /// `credHelpers.<host> = name`.
    pub fn cred_helper(mut self, host: &str, name: &str) -> DockerConfig {
        self.helpers.push((host.to_string(), name.to_string()));
        self
    }

    /// `credsStore = name`.
    pub fn creds_store(mut self, name: &str) -> DockerConfig {
        self.store = Some(name.to_string());
        self
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({});
        if !self.auths.is_empty() {
            let auths: serde_json::Map<_, _> = self.auths.iter().cloned().collect();
            v["auths"] = auths.into();
        }
        if !self.helpers.is_empty() {
            let helpers: serde_json::Map<_, _> = self
                .helpers
                .iter()
                .map(|(h, n)| (h.clone(), n.clone().into()))
                .collect();
            v["credHelpers"] = helpers.into();
        }
        if let Some(s) = &self.store {
            v["credsStore"] = s.clone().into();
        }
        serde_json::to_string_pretty(&v).expect("json")
    }

    /// Writes `dir/config.json` (mode 0600) and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("mkdir config dir");
        let path = dir.join("config.json");
        std::fs::write(&path, self.to_json()).expect("write config.json");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }
}

/// One `[host."<url>"]` table of a hosts.toml.
struct HostEntry {
    url: String,
    capabilities: Vec<String>,
    override_path: bool,
    headers: Vec<(String, String)>,
}

/// containerd's `hosts.toml`: `server = "…"` with the origin's top-level
/// `ca` and `skip_verify`, and `[host."<url>"]` tables (mirrors, tried in
/// file order before `server`).
#[derive(Default)]
pub struct HostsToml {
    server: Option<String>,
    ca: Vec<String>,
    skip_verify: Option<bool>,
    hosts: Vec<HostEntry>,
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl HostsToml {
    pub fn new() -> HostsToml {
        HostsToml::default()
    }

    /// `server = "<url>"` (the origin).
    pub fn server(mut self, url: &str) -> HostsToml {
        self.server = Some(url.to_string());
        self
    }

    /// Adds a file to the origin's `ca` (top level; a list when there are
    /// several).
    pub fn ca(mut self, path: &Path) -> HostsToml {
        self.ca.push(path.display().to_string());
        self
    }

    /// `skip_verify = <on>` for the origin (top level).
    pub fn skip_verify(mut self, on: bool) -> HostsToml {
        self.skip_verify = Some(on);
        self
    }

    /// A mirror table `[host."<url>"]` with `capabilities`.
    pub fn mirror(mut self, url: &str, capabilities: &[&str]) -> HostsToml {
        self.hosts.push(HostEntry {
            url: url.to_string(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            override_path: false,
            headers: Vec::new(),
        });
        self
    }

    /// Sets `override_path = true` on the last mirror.
    pub fn override_path(mut self) -> HostsToml {
        self.hosts.last_mut().expect("a mirror first").override_path = true;
        self
    }

    /// Adds a `[host."<url>".header]` entry to the last mirror.
    pub fn header(mut self, name: &str, value: &str) -> HostsToml {
        let h = self.hosts.last_mut().expect("a mirror first");
        h.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        if let Some(s) = &self.server {
            t.push_str(&format!("server = {}\n", toml_str(s)));
        }
        match self.ca.as_slice() {
            [] => {}
            [one] => t.push_str(&format!("ca = {}\n", toml_str(one))),
            all => {
                let all: Vec<String> = all.iter().map(|c| toml_str(c)).collect();
                t.push_str(&format!("ca = [{}]\n", all.join(", ")));
            }
        }
        if let Some(on) = self.skip_verify {
            t.push_str(&format!("skip_verify = {on}\n"));
        }
        for h in &self.hosts {
            let caps: Vec<String> = h.capabilities.iter().map(|c| toml_str(c)).collect();
            t.push_str(&format!(
                "\n[host.{}]\n  capabilities = [{}]\n",
                toml_str(&h.url),
                caps.join(", ")
            ));
            if h.override_path {
                t.push_str("  override_path = true\n");
            }
            if !h.headers.is_empty() {
                t.push_str(&format!("  [host.{}.header]\n", toml_str(&h.url)));
                for (n, v) in &h.headers {
                    t.push_str(&format!("    {} = {}\n", toml_str(n), toml_str(v)));
                }
            }
        }
        t
    }

    /// Writes `hosts_dir/<host>/hosts.toml` (`host` as in a reference,
    /// `HOST[:PORT]`, or `_default`) and returns its path.
    pub fn write(&self, hosts_dir: &Path, host: &str) -> PathBuf {
        check_plain("host", host);
        let dir = hosts_dir.join(host);
        std::fs::create_dir_all(&dir).expect("mkdir hosts dir");
        let path = dir.join("hosts.toml");
        std::fs::write(&path, self.to_toml()).expect("write hosts.toml");
        path
    }
}
