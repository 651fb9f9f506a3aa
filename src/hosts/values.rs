//! The values of a hosts.toml: typed reads of each honoured key, endpoint
//! URLs and the API root (`override_path`).

use super::{Endpoint, HostsError, Parser, Section};
use std::path::PathBuf;
use toml::{Table, Value};
use url::Url;

impl Parser<'_> {
    pub(super) fn invalid(&self, key: &str, reason: impl Into<String>) -> HostsError {
        HostsError::Invalid {
            path: self.file.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    pub(super) fn table<'v>(&self, value: &'v Value, key: &str) -> Result<&'v Table, HostsError> {
        value
            .as_table()
            .ok_or_else(|| self.invalid(key, "must be a table"))
    }

    /// Reads the endpoint keys of `table`; `prefix` is its dotted path
    /// (empty for the top level, where `server` and `host` also belong).
    pub(super) fn section(
        &mut self,
        table: &Table,
        prefix: &str,
        top_level: bool,
    ) -> Result<Section, HostsError> {
        let path = |key: &str| match prefix {
            "" => key.to_string(),
            _ => format!("{prefix}.{key}"),
        };
        let mut s = Section::default();
        for (key, value) in table {
            let k = path(key);
            match key.as_str() {
                "capabilities" => s.pull = self.capabilities(value, &k)?,
                "ca" => s.ca = self.ca(value, &k)?,
                "skip_verify" => s.skip_verify = self.boolean(value, &k)?,
                "override_path" => s.override_path = self.boolean(value, &k)?,
                "header" => s.headers = self.headers(value, &k)?,
                "server" | "host" if top_level => {}
                _ => self.ignored.push(k),
            }
        }
        Ok(s)
    }

    /// The endpoint for `url` (a mirror's table name or `server`).
    pub(super) fn endpoint(
        &self,
        url: &str,
        key: &str,
        s: Section,
        is_origin: bool,
    ) -> Result<Endpoint, HostsError> {
        Ok(Endpoint {
            url: api_root(url, s.override_path).map_err(|r| self.invalid(key, r))?,
            ca: s.ca,
            skip_verify: s.skip_verify,
            headers: s.headers,
            is_origin,
        })
    }

    fn boolean(&self, value: &Value, key: &str) -> Result<bool, HostsError> {
        value
            .as_bool()
            .ok_or_else(|| self.invalid(key, "must be true or false"))
    }

    fn strings(&self, value: &Value, key: &str) -> Result<Vec<String>, HostsError> {
        let bad = || self.invalid(key, "must be a string or a list of strings");
        match value {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            _ => Err(bad()),
        }
    }

    /// Whether the capabilities include `pull` (an empty list means all).
    fn capabilities(&self, value: &Value, key: &str) -> Result<bool, HostsError> {
        let Value::Array(_) = value else {
            return Err(self.invalid(key, "must be a list of strings"));
        };
        let caps = self.strings(value, key)?;
        for c in &caps {
            if !matches!(c.to_ascii_lowercase().as_str(), "pull" | "resolve" | "push") {
                return Err(self.invalid(key, format!("unknown capability {c:?}")));
            }
        }
        Ok(caps.is_empty() || caps.iter().any(|c| c.eq_ignore_ascii_case("pull")))
    }

    /// CA files, relative to the host directory unless absolute.
    fn ca(&self, value: &Value, key: &str) -> Result<Vec<PathBuf>, HostsError> {
        let paths = self.strings(value, key)?;
        if paths.iter().any(String::is_empty) {
            return Err(self.invalid(key, "a path is empty"));
        }
        Ok(paths.iter().map(|p| self.base.join(p)).collect())
    }

    /// `[….header]`: name = value or name = [values], in file order.
    fn headers(&self, value: &Value, key: &str) -> Result<Vec<(String, String)>, HostsError> {
        let mut headers = Vec::new();
        for (name, values) in self.table(value, key)? {
            let k = format!("{key}.{name}");
            if !is_token(name) {
                return Err(self.invalid(&k, "not a valid header name"));
            }
            // Never quote the value in an error: it may be a credential.
            for v in self.strings(values, &k)? {
                if v.chars().any(|c| c.is_control() && c != '\t') {
                    return Err(self.invalid(&k, "the value has a control character"));
                }
                headers.push((name.clone(), v));
            }
        }
        Ok(headers)
    }
}

/// An HTTP token (RFC 9110): a header name.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The API root of an endpoint written as `url` (see the module docs of
/// `hosts` for `override_path`).
pub(super) fn api_root(url: &str, override_path: bool) -> Result<Url, String> {
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let mut u = Url::parse(&full).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", u.scheme()));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        // Not quoted: it holds a credential.
        return Err("credentials in the URL are not supported".into());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("the URL must not have a query or fragment".into());
    }
    let mut path = clean_path(u.path());
    if !override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    u.set_path(&path);
    Ok(u)
}

/// Collapses repeated slashes and drops trailing ones ("/" becomes "").
fn clean_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_roots() {
        let root = |u: &str, o: bool| api_root(u, o).map(|u| u.to_string());
        assert_eq!(
            root("mirror.example.com", false).unwrap(),
            "https://mirror.example.com/v2"
        );
        assert_eq!(root("http://m:5000", false).unwrap(), "http://m:5000/v2");
        assert_eq!(root("http://m:5000/", false).unwrap(), "http://m:5000/v2");
        assert_eq!(root("https://m/v2", false).unwrap(), "https://m/v2");
        assert_eq!(root("https://m/v2/", false).unwrap(), "https://m/v2");
        assert_eq!(
            root("https://m//cache/", false).unwrap(),
            "https://m/cache/v2"
        );
        assert_eq!(root("https://m/cache", true).unwrap(), "https://m/cache");
        assert_eq!(root("https://m", true).unwrap(), "https://m/");
        assert_eq!(
            root("http://[::1]:5000", false).unwrap(),
            "http://[::1]:5000/v2"
        );
        assert!(root("ftp://m", false).unwrap_err().contains("scheme"));
        assert!(root("https://", false).is_err());
        assert!(root("https://m/?x=1", false).unwrap_err().contains("query"));
        assert!(root("https://m/#f", false).unwrap_err().contains("query"));
        let e = root("https://user:hunter2@m", false).unwrap_err();
        assert!(!e.contains("hunter2"));
    }

    #[test]
    fn header_names() {
        assert!(is_token("X-Custom_1"));
        assert!(!is_token(""));
        assert!(!is_token("a b"));
        assert!(!is_token("a:b"));
        assert!(!is_token("a\r\nb"));
    }
}
