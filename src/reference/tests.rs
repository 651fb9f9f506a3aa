//! Tests of [`Reference::parse`] and [`Digest`].

use super::*;
use ReferenceError::*;

const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn id(name: &str) -> String {
    format!("{name}@sha256:{HEX}")
}

#[test]
// A table of cases: long, but one line each.
fn malformed_references_fail_with_the_right_error() {
    let long_repo = format!("example.com/{}", "a".repeat(MAX_REFERENCE_LEN));
    let cases: Vec<(String, ReferenceError)> = vec![
        (String::new(), Empty),
        (id(&long_repo), TooLong(long_repo.len() + 72)),
        (id("example.com/a\0b"), Nul),
        (id("example.com/a b"), Whitespace),
        (id("example.com/a\tb"), Whitespace),
        (format!("{}\n", id("example.com/r")), Whitespace),
        (id("example.com/caf\u{e9}"), BadChar('\u{e9}')),
        (id("example.com/a\u{7f}"), BadChar('\u{7f}')),
        ("example.com/repo".into(), MissingDigest),
        (format!("example.com/repo:sha256:{HEX}"), MissingDigest),
        (id("example.com"), MissingRepository),
        (id("/repo"), EmptyHost),
        (id(":5000/repo"), EmptyHost),
        (id("-bad.example.com/r"), BadHostLabel("-bad".into())),
        (id("bad-.example.com/r"), BadHostLabel("bad-".into())),
        (id("ex_ample.com/r"), BadHostLabel("ex_ample".into())),
        (id("example..com/r"), BadHostLabel(String::new())),
        (id("example.com./r"), BadHostLabel(String::new())),
        // Not valid punycode: `url` would refuse to build a URL of it.
        (id("xn--a.com/r"), BadHostLabel("xn--a".into())),
        (id("a.xn--/r"), BadHostLabel("xn--".into())),
        (id("xn--zz.example.com/r"), BadHostLabel("xn--zz".into())),
        (
            id(&format!("{}.com/r", "a".repeat(64))),
            BadHostLabel("a".repeat(64)),
        ),
        (id("256.1.1.1/r"), BadIpv4("256.1.1.1".into())),
        (id("127.1/r"), BadIpv4("127.1".into())),
        (id("0x7f.0.0.1/r"), BadIpv4("0x7f.0.0.1".into())),
        (
            id("::1/r"),
            BadIpv6("\"::1\": an IPv6 address must be in brackets".into()),
        ),
        (id("[::1/r"), BadIpv6("\"[::1\"".into())),
        (id("[fe80::1%eth0]/r"), BadIpv6("\"[fe80::1%eth0]\"".into())),
        (id("[::1]5000/r"), BadIpv6("\"[::1]5000\"".into())),
        (id("[1.2.3.4]/r"), BadIpv6("\"[1.2.3.4]\"".into())),
        (id("registry/team/app"), UnqualifiedHost("registry".into())),
        (id("example.com:0/r"), BadPort("0".into())),
        (id("example.com:65536/r"), BadPort("65536".into())),
        (id("example.com:+80/r"), BadPort("+80".into())),
        (id("example.com:0080/r"), BadPort("0080".into())),
        (id("example.com:/r"), BadPort(String::new())),
        (id("example.com:http/r"), BadPort("http".into())),
        (id("[::1]:99999/r"), BadPort("99999".into())),
        (id("example.com/"), BadRepository(String::new())),
        (id("example.com/a//b"), BadRepository(String::new())),
        (id("example.com/a/"), BadRepository(String::new())),
        (id("example.com/Team/app"), BadRepository("Team".into())),
        (id("example.com/a/.."), BadRepository("..".into())),
        (id("example.com/a/-b"), BadRepository("-b".into())),
        (id("example.com/a_"), BadRepository("a_".into())),
        (id("example.com/a___b"), BadRepository("a___b".into())),
        (id("example.com/a..b"), BadRepository("a..b".into())),
        (id("example.com/a%2fb"), BadRepository("a%2fb".into())),
        (id("example.com/app:latest"), Tag("latest".into())),
        (
            format!("example.com/r@sha512:{HEX}"),
            UnsupportedAlgorithm("sha512".into()),
        ),
        (
            format!("example.com/r@SHA256:{HEX}"),
            UnsupportedAlgorithm("SHA256".into()),
        ),
        (format!("example.com/r@{HEX}"), BadDigest),
        (
            format!("example.com/r@sha256:{}", HEX.to_uppercase()),
            BadDigest,
        ),
        (format!("example.com/r@sha256:{}", &HEX[1..]), BadDigest),
        (format!("example.com/r@sha256:{HEX}0"), BadDigest),
        (format!("example.com/r@sha256:{}g", &HEX[1..]), BadDigest),
        (format!("example.com/r@sha256:{HEX}@x"), BadDigest),
        ("example.com/r@sha256:".into(), BadDigest),
    ];
    assert!(cases.len() >= 25);
    for (input, expected) in &cases {
        assert_eq!(
            Reference::parse(input).as_ref(),
            Err(expected),
            "input {input:?}"
        );
        // Every message is one line that says something.
        let message = expected.to_string();
        assert!(!message.is_empty() && !message.contains('\n'));
    }
}

#[test]
fn a_repository_longer_than_255_bytes_is_refused() {
    // The 255-byte id limit makes this unreachable through Reference::parse;
    // the repository rule holds on its own all the same.
    let hub = Host::parse("docker.io").unwrap();
    let other = Host::parse("example.com").unwrap();
    let repo = "a".repeat(250);
    assert_eq!(parse_repository(&other, &repo), Ok(repo.clone()));
    assert_eq!(parse_repository(&hub, &repo), Err(RepositoryTooLong(258)));
    assert_eq!(
        parse_repository(&other, &"a".repeat(256)),
        Err(RepositoryTooLong(256))
    );
}

#[test]
// A table of cases: long, but one line each.
fn valid_references_parse_and_normalise() {
    // (input, host authority, registry authority, port, repository)
    let cases: &[(&str, &str, &str, Option<u16>, &str)] = &[
        (
            "docker.io/alpine",
            "docker.io",
            "registry-1.docker.io",
            None,
            "library/alpine",
        ),
        (
            "index.docker.io/alpine",
            "docker.io",
            "registry-1.docker.io",
            None,
            "library/alpine",
        ),
        (
            "docker.io/team/app",
            "docker.io",
            "registry-1.docker.io",
            None,
            "team/app",
        ),
        (
            "docker.io:443/alpine",
            "docker.io:443",
            "docker.io:443",
            Some(443),
            "alpine",
        ),
        (
            "Registry.Example.com/a/b/c",
            "registry.example.com",
            "registry.example.com",
            None,
            "a/b/c",
        ),
        (
            "127.0.0.1:5000/app",
            "127.0.0.1:5000",
            "127.0.0.1:5000",
            Some(5000),
            "app",
        ),
        ("10.1.2.3/app", "10.1.2.3", "10.1.2.3", None, "app"),
        (
            "[::1]:5000/app",
            "[::1]:5000",
            "[::1]:5000",
            Some(5000),
            "app",
        ),
        (
            "[2001:DB8::0:1]/app",
            "[2001:db8::1]",
            "[2001:db8::1]",
            None,
            "app",
        ),
        ("localhost/app", "localhost", "localhost", None, "app"),
        ("registry:1/app", "registry:1", "registry:1", Some(1), "app"),
        (
            "registry:65535/app",
            "registry:65535",
            "registry:65535",
            Some(65535),
            "app",
        ),
        (
            "ghcr.io/a.b/c_d/e__f/g-h/i---j/0",
            "ghcr.io",
            "ghcr.io",
            None,
            "a.b/c_d/e__f/g-h/i---j/0",
        ),
        (
            "xn--bcher-kva.example/r",
            "xn--bcher-kva.example",
            "xn--bcher-kva.example",
            None,
            "r",
        ),
    ];
    for &(name, authority, registry, port, repository) in cases {
        let input = id(name);
        let r = Reference::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(r.host().authority(), authority, "{input}");
        assert_eq!(r.host().registry_authority(), registry, "{input}");
        assert_eq!(r.host().port(), port, "{input}");
        assert_eq!(r.repository(), repository, "{input}");
        assert_eq!(r.digest().hex(), HEX);
        // The canonical form parses to the same reference.
        assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
        assert!(looks_like_reference(&input));
    }
}

#[test]
fn a_reference_of_exactly_255_bytes_is_accepted() {
    let repo = "r".repeat(MAX_REFERENCE_LEN - "example.com/@sha256:".len() - 64);
    let input = id(&format!("example.com/{repo}"));
    assert_eq!(input.len(), MAX_REFERENCE_LEN);
    assert!(Reference::parse(&input).is_ok());
    assert_eq!(
        Reference::parse(&format!("{input}r")),
        Err(TooLong(MAX_REFERENCE_LEN + 1))
    );
}

#[test]
fn host_kinds_are_reported() {
    let host = |s: &str| Reference::parse(&id(s)).unwrap().host().clone();
    assert_eq!(
        host("[::1]:5000/a").name(),
        &HostName::Ipv6(std::net::Ipv6Addr::LOCALHOST)
    );
    assert_eq!(
        host("127.0.0.1/a").name(),
        &HostName::Ipv4(std::net::Ipv4Addr::LOCALHOST)
    );
    assert_eq!(
        host("a.example/a").name(),
        &HostName::Domain("a.example".into())
    );
    assert!(host("[::1]:5000/a").is_loopback());
    assert!(host("127.0.0.1:5000/a").is_loopback());
    assert!(host("localhost:5000/a").is_loopback());
    assert!(!host("example.com/a").is_loopback());
}

#[test]
fn digests() {
    let d = Digest::parse(&format!("sha256:{HEX}")).unwrap();
    assert_eq!(d.hex(), HEX);
    assert_eq!(d.to_string(), format!("sha256:{HEX}"));
    assert_eq!(format!("{d:?}"), format!("Digest(sha256:{HEX})"));
    assert_eq!(Digest::from_hex(HEX), Ok(d));
    assert_eq!(Digest::from_hex("ab"), Err(BadDigest));
    assert_eq!(Digest::parse(HEX), Err(BadDigest));
    // The hex is a safe single path component.
    assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn plain_ids_do_not_look_like_references() {
    for plain in ["blob-1", "sha256:abc", "a..b", "x:y_z.tar"] {
        assert!(!looks_like_reference(plain));
    }
    for r in ["a/b", "a@b", "/", "@"] {
        assert!(looks_like_reference(r));
    }
}

#[test]
fn errors_display_what_is_wrong() {
    let e = Reference::parse(&id("registry/app")).unwrap_err();
    assert!(e.to_string().contains("docker.io/registry/"), "{e}");
    let e = Reference::parse(&id("example.com:0080/r")).unwrap_err();
    assert!(e.to_string().contains("\"0080\""), "{e}");
    let e: Box<dyn std::error::Error> = Box::new(BadDigest);
    assert!(e.source().is_none());
}
