//! The standard proxy variables: `HTTP_PROXY` for `http://` URLs,
//! `HTTPS_PROXY` for `https://` ones (upper or lower case, the lower case
//! winning as curl does), and `NO_PROXY`: a comma-separated list of host
//! names (matching the host and its subdomains, with or without a leading
//! dot), `host:port` entries, IP addresses (exact) and `*` (everything).
//! CIDR ranges are not understood.
//!
//! Through an HTTP proxy, `https://` URLs go through a CONNECT tunnel and
//! `http://` ones are sent to the proxy as they are, in absolute form
//! (`GET http://host:port/path?query HTTP/1.1`), so that the proxy sees and
//! may cache or redistribute each request. ureq 3 itself tunnels both;
//! `connector` puts `ForwardConnector` in front of its connectors for
//! the `http://` case.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::fmt;
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, NextTimeout,
    TcpConnector, Transport,
};
use ureq::ProxyProtocol;
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

    /// Whether any proxy is set.
    pub fn is_set(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }

    /// The proxies of `http://` and `https://` URLs (before `NO_PROXY`).
    pub fn by_scheme(&self) -> (Option<&str>, Option<&str>) {
        (self.http.as_deref(), self.https.as_deref())
    }

    /// The proxy to reach `url` through, if any.
    pub fn for_url(&self, url: &Url) -> Option<String> {
        let proxy = match url.scheme() {
            "http" => self.http.clone(),
            "https" => self.https.clone(),
            _ => None,
        }?;
        (!self.excludes(url)).then_some(proxy)
    }

    /// Whether `NO_PROXY` names `url`'s host (and port).
    pub fn excludes(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        let port = url.port_or_known_default();
        self.no_proxy.iter().any(|e| {
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
        })
    }
}

/// The connectors of an agent up to TLS: `http://` URLs through an HTTP
/// proxy in absolute form, others through the proxy's CONNECT tunnel (if
/// the agent has a proxy), else straight over TCP. TLS goes after it.
pub(super) fn connector() -> impl Connector {
    ().chain(ForwardConnector)
        .chain(ConnectProxyConnector::default())
        .chain(TcpConnector::default())
}

/// Connects an `http://` request of an agent with an HTTP proxy to the
/// proxy itself; [`Forward`] puts the request line in absolute form.
#[derive(Debug)]
struct ForwardConnector;

impl<In: Transport> Connector<In> for ForwardConnector {
    type Out = Either<In, Forward>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if let Some(t) = chained {
            return Ok(Some(Either::A(t)));
        }
        // The connection to a proxy itself is made with a config without
        // one, so this passes it on to TCP.
        let Some(proxy) = details.config.proxy() else {
            return Ok(None);
        };
        if proxy.protocol() != ProxyProtocol::Http
            || details.needs_tls()
            || proxy.is_no_proxy(details.uri)
        {
            return Ok(None);
        }
        let Some(authority) = details.uri.authority() else {
            return Err(ureq::Error::BadUri("no host".into()));
        };
        let addrs = details
            .resolver
            .resolve(proxy.uri(), details.config, details.timeout)?;
        let to_proxy = ConnectionDetails {
            uri: proxy.uri(),
            addrs,
            config: details.config,
            request_level: details.request_level,
            resolver: details.resolver,
            now: details.now,
            timeout: details.timeout,
            current_time: details.current_time.clone(),
            run_connector: details.run_connector.clone(),
            register_shutdown: details.register_shutdown.clone(),
        };
        let tcp = TcpConnector::default()
            .connect(&to_proxy, None::<()>)?
            .ok_or(ureq::Error::ConnectionFailed)?;
        // Without user info, as the request's Host header has it.
        let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
        // The proxy's own login, as ureq sends it on a CONNECT.
        let login = match (proxy.username(), proxy.password()) {
            (None, None) => Vec::new(),
            (user, pass) => {
                let pair = format!("{}:{}", user.unwrap_or(""), pass.unwrap_or(""));
                format!("Proxy-Authorization: Basic {}\r\n", STANDARD.encode(pair)).into_bytes()
            }
        };
        Ok(Some(Either::B(Forward {
            inner: tcp.boxed(),
            origin: format!("http://{host_port}").into_bytes(),
            login,
        })))
    }
}

/// A connection to an HTTP proxy for one origin's `http://` requests: each
/// request line goes out as `METHOD http://host:port/path?query HTTP/1.1`,
/// followed by the proxy's login if it has one.
struct Forward {
    inner: Box<dyn Transport>,
    /// `http://host[:port]`, put before the origin-form target.
    origin: Vec<u8>,
    /// A `Proxy-Authorization` header line, or nothing. Never logged.
    login: Vec<u8>,
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("origin", &String::from_utf8_lossy(&self.origin))
            .finish_non_exhaustive()
    }
}

/// Where the origin-form target starts in `out` if it begins with a request
/// line (`METHOD /…`): the index of the `/`.
fn origin_form_target(out: &[u8]) -> Option<usize> {
    let method = out.iter().take(17).position(|&b| b == b' ')?;
    let is_method = method > 0 && out[..method].iter().all(u8::is_ascii_uppercase);
    (is_method && out.get(method + 1) == Some(&b'/')).then_some(method + 1)
}

impl Transport for Forward {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let out = &self.inner.buffers().output()[..amount];
        let Some(at) = origin_form_target(out) else {
            // Headers that did not fit with the line, or a request body.
            return self.inner.transmit_output(amount, timeout);
        };
        let mut data = Vec::with_capacity(amount + self.origin.len() + self.login.len());
        data.extend_from_slice(&out[..at]);
        data.extend_from_slice(&self.origin);
        // The login goes right after the request line (ureq writes the
        // line and its headers into one buffer).
        match out[at..].windows(2).position(|w| w == b"\r\n") {
            Some(eol) => {
                let eol = at + eol + 2;
                data.extend_from_slice(&out[at..eol]);
                data.extend_from_slice(&self.login);
                data.extend_from_slice(&out[eol..]);
            }
            None => data.extend_from_slice(&out[at..]),
        }
        let mut sent = 0;
        while sent < data.len() {
            let out = self.inner.buffers().output();
            let n = out.len().min(data.len() - sent);
            out[..n].copy_from_slice(&data[sent..sent + n]);
            self.inner.transmit_output(n, timeout)?;
            sent += n;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.inner.await_input(timeout)
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_found_and_nothing_else() {
        assert_eq!(origin_form_target(b"GET /v2/ HTTP/1.1\r\n"), Some(4));
        assert_eq!(origin_form_target(b"HEAD /x?a=b HTTP/1.1\r\n"), Some(5));
        assert_eq!(origin_form_target(b"POST /token HTTP/1.1\r\n"), Some(5));
        for not in [
            &b"grant_type=refresh_token&scope=x"[..],
            b"Host: reg:5000\r\n",
            b"GET http://h/ HTTP/1.1\r\n",
            b"CONNECT h:443 HTTP/1.1\r\n",
            b" /x",
            b"get /x",
            b"",
        ] {
            assert_eq!(
                origin_form_target(not),
                None,
                "{}",
                String::from_utf8_lossy(not)
            );
        }
    }

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
