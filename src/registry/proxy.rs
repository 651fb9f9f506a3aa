//! The standard proxy variables: `HTTP_PROXY` for `http://` URLs,
//! `HTTPS_PROXY` for `https://` ones (upper or lower case, the lower case
//! winning as curl does), and `NO_PROXY`: a comma-separated list of host
//! names (matching the host and its subdomains, with or without a leading
//! dot), `host:port` entries, IP addresses (exact) and `*` (everything).
//! CIDR ranges are not understood.

use url::Url;

/// The proxy settings of the daemon's environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    http: Option<String>,
    https: Option<String>,
    no_proxy: Vec<String>,
}

fn var(names: [&str; 2]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok())
        .filter(|v| !v.trim().is_empty())
}

impl ProxyEnv {
    /// Reads the process environment.
    pub fn from_process() -> ProxyEnv {
        ProxyEnv::new(
            var(["http_proxy", "HTTP_PROXY"]),
            var(["https_proxy", "HTTPS_PROXY"]),
            var(["no_proxy", "NO_PROXY"]).as_deref().unwrap_or(""),
        )
    }

    pub fn new(http: Option<String>, https: Option<String>, no_proxy: &str) -> ProxyEnv {
        let no_proxy = no_proxy
            .split(',')
            .map(|e| e.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|e| !e.is_empty())
            .collect();
        ProxyEnv {
            http,
            https,
            no_proxy,
        }
    }

    /// The proxy to reach `url` through, if any.
    pub fn for_url(&self, url: &Url) -> Option<String> {
        let proxy = match url.scheme() {
            "http" => self.http.clone(),
            "https" => self.https.clone(),
            _ => None,
        }?;
        let host = url
            .host_str()?
            .trim_matches(['[', ']'])
            .to_ascii_lowercase();
        let port = url.port_or_known_default();
        let excluded = self.no_proxy.iter().any(|e| {
            if e == "*" {
                return true;
            }
            let (name, want_port) = match e.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') => (n, p.parse::<u16>().ok()),
                _ => (e.as_str(), None),
            };
            let name = name.trim_matches(['[', ']']);
            let host_ok = host == name || host.ends_with(&format!(".{name}"));
            host_ok && want_port.is_none_or(|p| Some(p) == port)
        });
        (!excluded).then_some(proxy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn no_proxy_excludes_hosts_domains_ports_and_everything() {
        let p = ProxyEnv::new(
            Some("http://proxy:3128".into()),
            None,
            " .example.com, 10.1.2.3 ,registry:5000",
        );
        assert_eq!(
            p.for_url(&url("http://a.b/x")).as_deref(),
            Some("http://proxy:3128")
        );
        assert_eq!(p.for_url(&url("https://a.b/x")), None, "no HTTPS_PROXY");
        assert_eq!(p.for_url(&url("http://example.com/")), None);
        assert_eq!(p.for_url(&url("http://x.example.com/")), None);
        assert!(p.for_url(&url("http://badexample.com/")).is_some());
        assert_eq!(p.for_url(&url("http://10.1.2.3:80/")), None);
        assert_eq!(p.for_url(&url("http://registry:5000/")), None);
        assert!(p.for_url(&url("http://registry:5001/")).is_some());
        let all = ProxyEnv::new(Some("http://p:1".into()), None, "*");
        assert_eq!(all.for_url(&url("http://a/")), None);
        let none = ProxyEnv::new(Some("http://p:1".into()), None, "");
        assert!(none.for_url(&url("http://127.0.0.1:5000/")).is_some());
    }
}
