//! `--allow-registry PATTERN`: which registry hosts references may reach.
//! The pattern rules are on [`HostPattern`]; an empty [`AllowList`] allows
//! every host.

use super::host::{is_numeric_label, parse_port, DOCKER_HUB, DOCKER_HUB_REGISTRY, MAX_LABEL_LEN};
use super::{Host, HostName};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A pattern that is not `NAME[:PORT]` as [`HostPattern`] describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad registry pattern {:?}: {}",
            self.pattern, self.reason
        )
    }
}

impl std::error::Error for PatternError {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NamePattern {
    /// Lowercase labels, each possibly with `*`.
    Labels(Vec<String>),
    Ipv6(Ipv6Addr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortPattern {
    /// No port written: matches hosts without a port.
    Default,
    Exact(u16),
    Any,
}

/// One `--allow-registry` pattern, `NAME[:PORT]`:
///
/// - NAME is a DNS name or IPv4 dotted quad matched label by label
///   (case-insensitively), where `*` matches any run of characters within
///   one label: `*.example.com` matches `a.example.com`, not
///   `a.b.example.com` nor `example.com`; `reg-*.example.com` matches
///   `reg-eu.example.com`; `10.0.0.*` matches `10.0.0.7`. Or NAME is a
///   bracketed IPv6 address, compared as an address (`[0::1]` is `[::1]`),
///   without wildcards.
/// - PORT: **a pattern without a port matches only hosts written without a
///   port** (the scheme's default port); `:5000` matches exactly port 5000,
///   and `:*` any port or none. So `localhost` does not open every local
///   service to clients, and `127.0.0.1:5000` allows that one registry. A
///   host written with its default port (`example.com:443`) is another
///   authority and needs its own pattern.
/// - Docker Hub (`docker.io`) is allowed by a pattern matching `docker.io`
///   or `registry-1.docker.io`, its API server; `index.docker.io` in a
///   pattern means `docker.io`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    name: NamePattern,
    port: PortPattern,
    text: String,
}

impl HostPattern {
    /// Parses `NAME[:PORT]` (see [`HostPattern`]).
    pub fn parse(pattern: &str) -> Result<HostPattern, PatternError> {
        let err = |reason: &str| PatternError {
            pattern: pattern.to_string(),
            reason: reason.to_string(),
        };
        let (name, port) = split_port(pattern).map_err(err)?;
        let port = match port {
            None => PortPattern::Default,
            Some("*") => PortPattern::Any,
            Some(p) => PortPattern::Exact(
                parse_port(p).map_err(|_| err("the port must be 1..=65535 or *"))?,
            ),
        };
        let name = match name.strip_prefix('[') {
            Some(rest) => NamePattern::Ipv6(parse_ipv6(rest).map_err(err)?),
            None => NamePattern::Labels(parse_labels(name).map_err(err)?),
        };
        Ok(HostPattern {
            name,
            port,
            text: pattern.to_string(),
        })
    }

    /// Whether `host` matches this pattern.
    pub fn matches(&self, host: &Host) -> bool {
        let port_ok = match self.port {
            PortPattern::Default => host.port().is_none(),
            PortPattern::Exact(p) => host.port() == Some(p),
            PortPattern::Any => true,
        };
        port_ok && self.name_matches(host)
    }

    fn name_matches(&self, host: &Host) -> bool {
        match (&self.name, host.name()) {
            (NamePattern::Ipv6(p), HostName::Ipv6(a)) => p == a,
            (NamePattern::Labels(labels), _) => {
                let Some(name) = host.dotted_name() else {
                    return false;
                };
                if labels_match(labels, &name) {
                    return true;
                }
                host.is_docker_hub() && labels_match(labels, DOCKER_HUB_REGISTRY)
            }
            _ => false,
        }
    }
}

impl fmt::Display for HostPattern {
    /// The pattern as given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The `--allow-registry` patterns. Empty allows every host; otherwise a
/// host is allowed when any pattern [matches](HostPattern::matches) it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    patterns: Vec<HostPattern>,
}

impl AllowList {
    /// An empty list: every host is allowed.
    pub fn new() -> AllowList {
        AllowList::default()
    }

    /// Parses every pattern; the first bad one is the error.
    pub fn parse<I, S>(patterns: I) -> Result<AllowList, PatternError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| HostPattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { patterns })
    }

    /// Adds a pattern.
    pub fn push(&mut self, pattern: HostPattern) {
        self.patterns.push(pattern);
    }

    /// Whether the list is empty (and so allows everything).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns, in the order given.
    pub fn patterns(&self) -> &[HostPattern] {
        &self.patterns
    }

    /// Whether references may reach `host`.
    pub fn allows(&self, host: &Host) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(host))
    }
}

/// Splits `NAME[:PORT]`, where NAME may be a bracketed IPv6 address.
fn split_port(pattern: &str) -> Result<(&str, Option<&str>), &'static str> {
    if pattern.is_empty() {
        return Err("empty pattern");
    }
    if pattern.starts_with('[') {
        let end = pattern
            .find(']')
            .ok_or("an IPv6 address needs a closing ]")?;
        return match &pattern[end + 1..] {
            "" => Ok((pattern, None)),
            rest => match rest.strip_prefix(':') {
                Some(port) => Ok((&pattern[..=end], Some(port))),
                None => Err("only :PORT may follow an IPv6 address"),
            },
        };
    }
    match pattern.split_once(':') {
        _ if pattern.matches(':').count() > 1 => Err("an IPv6 address must be in brackets"),
        Some((name, port)) => Ok((name, Some(port))),
        None => Ok((pattern, None)),
    }
}

/// `rest` is what follows `[` in `[v6]`.
fn parse_ipv6(rest: &str) -> Result<Ipv6Addr, &'static str> {
    rest.strip_suffix(']')
        .and_then(|a| a.parse().ok())
        .ok_or("not an IPv6 address (wildcards are not allowed in one)")
}

/// Lowercase labels of `[a-z0-9-*]`; a name without `*` whose last label is
/// numeric must be a dotted quad (as for hosts).
fn parse_labels(name: &str) -> Result<Vec<String>, &'static str> {
    let name = name.to_ascii_lowercase();
    let labels: Vec<String> = name.split('.').map(str::to_string).collect();
    for label in &labels {
        if label.is_empty() || label.len() > MAX_LABEL_LEN {
            return Err("a label is empty or longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*')
        {
            return Err("a label has a character outside [A-Za-z0-9-*]");
        }
    }
    let last = labels.last().map(String::as_str).unwrap_or("");
    if is_numeric_label(last) && !name.contains('*') && name.parse::<Ipv4Addr>().is_err() {
        return Err("a numeric name must be an IPv4 dotted quad");
    }
    if name == "index.docker.io" {
        return Ok(DOCKER_HUB.split('.').map(str::to_string).collect());
    }
    Ok(labels)
}

/// Whether `name` has as many labels as `patterns` and each matches.
fn labels_match(patterns: &[String], name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() == patterns.len()
        && patterns
            .iter()
            .zip(labels)
            .all(|(p, l)| glob_match(p.as_bytes(), l.as_bytes()))
}

/// `*` matches any run of bytes (labels never contain `.`); everything else
/// matches itself.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was and the text position it now covers up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            // Let the `*` take one more byte and retry.
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    fn allows(patterns: &[&str], h: &str) -> bool {
        AllowList::parse(patterns).unwrap().allows(&host(h))
    }

    #[test]
    fn empty_list_allows_everything() {
        let list = AllowList::new();
        assert!(list.is_empty());
        for h in ["example.com", "10.0.0.1:5000", "[::1]", "docker.io"] {
            assert!(list.allows(&host(h)));
        }
    }

    #[test]
    fn star_matches_within_one_label() {
        let p = ["*.example.com"];
        assert!(allows(&p, "a.example.com"));
        assert!(allows(&p, "A.Example.COM"));
        assert!(!allows(&p, "a.b.example.com"));
        assert!(!allows(&p, "example.com"));
        assert!(!allows(&p, "a.example.org"));
        assert!(!allows(&p, "aexample.com"));
        let p = ["reg-*.example.com"];
        assert!(allows(&p, "reg-eu.example.com"));
        assert!(!allows(&p, "registry.example.com"));
        assert!(allows(&["*reg*.x.io"], "myregistry.x.io"));
        assert!(allows(&["a*b*c.io"], "abc.io"));
        assert!(allows(&["a*b*c.io"], "axxbyybc.io"));
        assert!(!allows(&["a*b*c.io"], "axxbyyb.io"));
        assert!(allows(&["10.0.0.*"], "10.0.0.7"));
        assert!(!allows(&["10.0.0.*"], "10.0.1.7"));
        assert!(allows(&["*"], "localhost"));
        assert!(!allows(&["*"], "example.com"));
    }

    #[test]
    fn ports_match_as_documented() {
        // No port in the pattern: only hosts without a port.
        assert!(allows(&["localhost"], "localhost"));
        assert!(!allows(&["localhost"], "localhost:6379"));
        assert!(!allows(&["example.com"], "example.com:443"));
        // An exact port.
        assert!(allows(&["127.0.0.1:5000"], "127.0.0.1:5000"));
        assert!(!allows(&["127.0.0.1:5000"], "127.0.0.1:5001"));
        assert!(!allows(&["127.0.0.1:5000"], "127.0.0.1"));
        // Any port.
        assert!(allows(&["localhost:*"], "localhost:6379"));
        assert!(allows(&["localhost:*"], "localhost"));
        assert!(allows(&["*.example.com:*"], "a.example.com:8443"));
    }

    #[test]
    fn ipv6_patterns_compare_addresses() {
        assert!(allows(&["[::1]"], "[0:0::1]"));
        assert!(!allows(&["[::1]"], "[::1]:5000"));
        assert!(allows(&["[::1]:5000"], "[::1]:5000"));
        assert!(allows(&["[2001:db8::1]:*"], "[2001:DB8:0::1]:443"));
        assert!(!allows(&["[::1]"], "[::2]"));
        assert!(!allows(&["[::1]"], "127.0.0.1"));
        assert!(!allows(&["*"], "[::1]"));
        assert!(!allows(&["*.*.*.*"], "[::ffff:1.2.3.4]"));
    }

    #[test]
    fn docker_hub_is_allowed_by_either_name() {
        for p in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "*.docker.io",
        ] {
            assert!(allows(&[p], "docker.io"), "{p}");
            assert!(allows(&[p], "index.docker.io"), "{p}");
        }
        assert!(!allows(&["registry-1.docker.io"], "docker.io:443"));
        assert!(!allows(&["docker.io"], "ghcr.io"));
    }

    #[test]
    fn any_pattern_of_several_allows() {
        let list = AllowList::parse(["ghcr.io", "127.0.0.1:5000"]).unwrap();
        assert_eq!(list.patterns().len(), 2);
        assert_eq!(list.patterns()[1].to_string(), "127.0.0.1:5000");
        assert!(list.allows(&host("ghcr.io")));
        assert!(list.allows(&host("127.0.0.1:5000")));
        assert!(!list.allows(&host("quay.io")));
        let mut list = AllowList::new();
        list.push(HostPattern::parse("quay.io").unwrap());
        assert!(list.allows(&host("quay.io")));
        assert!(!list.allows(&host("ghcr.io")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in [
            "",
            ":5000",
            "a..b",
            "a.b.",
            "exa_mple.com",
            "example.com:0",
            "example.com:+1",
            "example.com:65536",
            "example.com:",
            "example.com:**",
            "::1",
            "[::1",
            "[::1]x",
            "[::*]",
            "[1.2.3.4]",
            "1.2.3",
            "256.0.0.1",
            "a/b",
            "a b",
        ] {
            let e = HostPattern::parse(p).unwrap_err();
            assert_eq!(e.pattern, p);
            assert!(e.to_string().contains("bad registry pattern"), "{e}");
        }
        assert!(AllowList::parse(["ok.io", "a..b"]).is_err());
    }

    #[test]
    fn glob() {
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"**", b"abc"));
        assert!(glob_match(b"a*", b"a"));
        assert!(!glob_match(b"a*", b"ba"));
        assert!(glob_match(b"*a", b"bba"));
        assert!(!glob_match(b"*a", b"bab"));
        assert!(!glob_match(b"abc", b"abcd"));
    }
}
