//! Registry hosts: the `HOST[:PORT]` part of a blob reference.
//!
//! A host is a DNS name, an IPv4 dotted quad or a bracketed IPv6 address,
//! with an optional port. Parsing is strict and canonicalising, so that one
//! registry has one [`Host::authority`] string: DNS names are lowercased,
//! IPv6 addresses are written in their RFC 5952 form, ports have no leading
//! zeros, and `index.docker.io` is written `docker.io`.

use super::ReferenceError;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest DNS name (without a trailing dot), RFC 1035.
pub const MAX_HOST_LEN: usize = 253;
/// Longest DNS label, RFC 1035.
pub const MAX_LABEL_LEN: usize = 63;
/// Docker Hub's name in references (its namespace, as in containerd): the
/// key of its hosts.toml directory, credentials and allow-list entries.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
/// Another name of Docker Hub, normalised to [`DOCKER_HUB`].
const DOCKER_HUB_INDEX: &str = "index.docker.io";

/// The name part of a [`Host`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostName {
    /// A DNS name, lowercase, without a trailing dot.
    Domain(String),
    /// An IPv4 address, written as a dotted quad.
    Ipv4(Ipv4Addr),
    /// An IPv6 address, written in brackets.
    Ipv6(Ipv6Addr),
}

/// A registry host with an optional port, e.g. `registry.example.com`,
/// `127.0.0.1:5000` or `[::1]:5000`.
///
/// Its [`authority`](Host::authority) is the key under which the rest of the
/// daemon looks the host up: hosts.toml directories, credentials and
/// `--allow-registry` patterns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Host {
    name: HostName,
    port: Option<u16>,
}

impl Host {
    /// Parses `HOST[:PORT]` strictly (see the rules of
    /// [`reference`](crate::reference)), lowercasing DNS names and writing
    /// `index.docker.io` as `docker.io`.
    ///
    /// A host whose last label is numeric (`1.2.3`, `10.0.0.0x1`,
    /// `2130706433`) must be a valid dotted quad: resolvers read such names
    /// as IPv4 addresses in forms (`0x7f.1`) that would dodge
    /// [`is_loopback`](Host::is_loopback) and allow-list checks.
    pub fn parse(authority: &str) -> Result<Host, ReferenceError> {
        if authority.is_empty() {
            return Err(ReferenceError::EmptyHost);
        }
        if let Some(rest) = authority.strip_prefix('[') {
            return parse_bracketed(authority, rest);
        }
        if authority.matches(':').count() > 1 {
            return Err(ReferenceError::BadIpv6(format!(
                "{authority:?}: an IPv6 address must be in brackets"
            )));
        }
        let (name, port) = match authority.split_once(':') {
            Some((name, port)) => (name, Some(parse_port(port)?)),
            None => (authority, None),
        };
        let name = parse_name(name)?;
        Ok(Host { name, port })
    }

    /// The host's name.
    pub fn name(&self) -> &HostName {
        &self.name
    }

    /// The port, if the reference named one.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Whether the host is this machine: `localhost`, `127.0.0.0/8`, `::1`
    /// (also written as the IPv4-mapped `::ffff:127.x.y.z`). Loopback
    /// registries are reached over plain HTTP by default.
    pub fn is_loopback(&self) -> bool {
        match &self.name {
            HostName::Domain(d) => d == "localhost",
            HostName::Ipv4(a) => a.is_loopback(),
            HostName::Ipv6(a) => {
                a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        }
    }

    /// Whether this is Docker Hub (`docker.io` or `index.docker.io`,
    /// without a port).
    pub fn is_docker_hub(&self) -> bool {
        self.port.is_none() && matches!(&self.name, HostName::Domain(d) if d == DOCKER_HUB)
    }

    /// `host[:port]` in canonical form, IPv6 in brackets: the key for
    /// hosts.toml directories, credentials and allow-list matching. Docker
    /// Hub's is `docker.io`.
    pub fn authority(&self) -> String {
        self.to_string()
    }

    /// The authority of the registry API server to contact when no
    /// configuration says otherwise: `registry-1.docker.io` for Docker Hub
    /// (as containerd does), the [`authority`](Host::authority) otherwise.
    pub fn registry_authority(&self) -> String {
        if self.is_docker_hub() {
            DOCKER_HUB_REGISTRY.to_string()
        } else {
            self.authority()
        }
    }

    /// The name as it is matched label by label: a DNS name or a dotted
    /// quad; `None` for IPv6.
    pub(crate) fn dotted_name(&self) -> Option<String> {
        match &self.name {
            HostName::Domain(d) => Some(d.clone()),
            HostName::Ipv4(a) => Some(a.to_string()),
            HostName::Ipv6(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            HostName::Domain(d) => f.write_str(d)?,
            HostName::Ipv4(a) => write!(f, "{a}")?,
            HostName::Ipv6(a) => write!(f, "[{a}]")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

impl std::str::FromStr for Host {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Host, ReferenceError> {
        Host::parse(s)
    }
}

/// `[v6]` or `[v6]:port`; `rest` is what follows the `[`.
fn parse_bracketed(authority: &str, rest: &str) -> Result<Host, ReferenceError> {
    let bad = || ReferenceError::BadIpv6(format!("{authority:?}"));
    let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
    let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
    let port = match after {
        "" => None,
        _ => Some(parse_port(after.strip_prefix(':').ok_or_else(bad)?)?),
    };
    Ok(Host {
        name: HostName::Ipv6(addr),
        port,
    })
}

/// A port: 1 to 5 ASCII digits without a leading zero, 1..=65535. Leading
/// zeros and signs are refused so that one port has one spelling.
pub(crate) fn parse_port(port: &str) -> Result<u16, ReferenceError> {
    let bad = || ReferenceError::BadPort(port.to_string());
    if port.is_empty()
        || port.len() > 5
        || port.starts_with('0')
        || !port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    match port.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(bad()),
    }
}

/// A DNS name or a dotted quad (see [`Host::parse`]), lowercased.
fn parse_name(name: &str) -> Result<HostName, ReferenceError> {
    if name.is_empty() {
        return Err(ReferenceError::EmptyHost);
    }
    if name.len() > MAX_HOST_LEN {
        return Err(ReferenceError::HostTooLong(name.len()));
    }
    let name = name.to_ascii_lowercase();
    let last = name.rsplit('.').next().unwrap_or("");
    if is_numeric_label(last) {
        return name
            .parse::<Ipv4Addr>()
            .map(HostName::Ipv4)
            .map_err(|_| ReferenceError::BadIpv4(name.clone()));
    }
    if let Some(label) = name.split('.').find(|l| !is_dns_label(l)) {
        return Err(ReferenceError::BadHostLabel(label.to_string()));
    }
    // Every request URL goes through `url`, which decodes `xn--` labels
    // (IDNA) and refuses invalid punycode: such a name is a bad reference
    // here, not a URL that cannot be built later.
    if url::Host::parse(&name).is_err() {
        let label = name.split('.').find(|l| url::Host::parse(l).is_err());
        return Err(ReferenceError::BadHostLabel(
            label.unwrap_or(&name).to_string(),
        ));
    }
    if name == DOCKER_HUB_INDEX {
        return Ok(HostName::Domain(DOCKER_HUB.to_string()));
    }
    Ok(HostName::Domain(name))
}

/// A label that resolvers read as a number: decimal digits, or `0x`
/// followed by hex digits (possibly none).
pub(crate) fn is_numeric_label(label: &str) -> bool {
    if let Some(hex) = label.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

/// A lowercase DNS label: 1 to 63 of `[a-z0-9-]`, not starting or ending
/// with `-`.
fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_to_canonical_authorities() {
        for (input, authority) in [
            ("Registry.Example.COM", "registry.example.com"),
            ("localhost:5000", "localhost:5000"),
            ("127.0.0.1", "127.0.0.1"),
            ("[0:0::1]:443", "[::1]:443"),
            ("[::FFFF:127.0.0.1]", "[::ffff:127.0.0.1]"),
            ("index.docker.io", "docker.io"),
            ("1.2.3.example", "1.2.3.example"),
            ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ] {
            let host = Host::parse(input).unwrap();
            assert_eq!(host.authority(), authority, "{input}");
            // Every accepted host makes an origin URL (`url` is stricter
            // than the label grammar about `xn--` labels).
            assert!(!crate::hosts::default_config(&host).endpoints.is_empty());
        }
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.9.8.7:5000",
            "[::1]",
        ] {
            assert!(Host::parse(h).unwrap().is_loopback(), "{h}");
        }
        assert!(Host::parse("[::ffff:127.0.0.2]").unwrap().is_loopback());
        for h in [
            "localhost.example.com",
            "128.0.0.1",
            "[::2]",
            "10.0.0.1",
            "[::]",
        ] {
            assert!(!Host::parse(h).unwrap().is_loopback(), "{h}");
        }
    }

    #[test]
    fn docker_hub_is_recognised_without_a_port_only() {
        let hub = Host::parse("docker.io").unwrap();
        assert!(hub.is_docker_hub());
        assert_eq!(hub.registry_authority(), "registry-1.docker.io");
        assert!(Host::parse("index.docker.io").unwrap().is_docker_hub());
        let with_port = Host::parse("docker.io:443").unwrap();
        assert!(!with_port.is_docker_hub());
        assert_eq!(with_port.registry_authority(), "docker.io:443");
        let direct = Host::parse("registry-1.docker.io").unwrap();
        assert!(!direct.is_docker_hub());
    }

    #[test]
    fn ports_are_strict() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
        for p in [
            "", "0", "00", "080", "65536", "99999", "+80", "-1", "8O", "100000", " 80",
        ] {
            assert_eq!(
                parse_port(p),
                Err(ReferenceError::BadPort(p.into())),
                "{p:?}"
            );
        }
    }

    #[test]
    fn numeric_names_must_be_dotted_quads() {
        for h in [
            "1.2.3",
            "2130706433",
            "0x7f.1",
            "127.0.0.0x1",
            "017.0.0.1",
            "1.2.3.4.5",
        ] {
            assert!(
                matches!(Host::parse(h), Err(ReferenceError::BadIpv4(_))),
                "{h}"
            );
        }
        assert!(matches!(
            Host::parse("a.b.0x"),
            Err(ReferenceError::BadIpv4(_))
        ));
        // A hex-looking label that is not the last one is an ordinary label.
        assert!(Host::parse("0x7f.example.com").is_ok());
    }

    #[test]
    fn label_rules() {
        let max = "a".repeat(MAX_LABEL_LEN);
        assert!(Host::parse(&format!("{max}.com")).is_ok());
        assert!(Host::parse(&format!("{max}a.com")).is_err());
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long.len(), MAX_HOST_LEN);
        assert!(Host::parse(&long).is_ok());
        assert_eq!(
            Host::parse(&format!("{long}x")),
            Err(ReferenceError::HostTooLong(254))
        );
    }
}
