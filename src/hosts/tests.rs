//! Tests of hosts directories and hosts.toml files.

use super::*;
use crate::reference::Reference;
use std::fs;

fn host(s: &str) -> Host {
    Host::parse(s).unwrap()
}

/// A hosts dir with `files` (relative path, contents).
fn hosts_dir(files: &[(&str, &str)]) -> (tempfile::TempDir, HostsDir) {
    let tmp = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = tmp.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    let dir = HostsDir::new(tmp.path());
    (tmp, dir)
}

fn urls(config: &HostConfig) -> Vec<String> {
    config.endpoints.iter().map(|e| e.url.to_string()).collect()
}

#[test]
fn without_configuration_the_origin_alone_is_used() {
    let (_tmp, dir) = hosts_dir(&[]);
    for (h, url) in [
        ("registry.example.com", "https://registry.example.com/v2"),
        ("example.com:5000", "https://example.com:5000/v2"),
        ("localhost:5000", "http://localhost:5000/v2"),
        ("127.0.0.1:5000", "http://127.0.0.1:5000/v2"),
        ("[::1]:5000", "http://[::1]:5000/v2"),
        ("docker.io", "https://registry-1.docker.io/v2"),
    ] {
        let config = dir.resolve(&host(h)).unwrap();
        assert_eq!(config, default_config(&host(h)));
        assert_eq!(urls(&config), [url], "{h}");
        let origin = &config.endpoints[0];
        assert!(origin.is_origin && !origin.skip_verify);
        assert!(origin.ca.is_empty() && origin.headers.is_empty());
        assert_eq!(config.source, None);
    }
    // A root that does not exist is no configuration either.
    let missing = HostsDir::new("/nonexistent/blobmgr-hosts");
    assert_eq!(missing.resolve(&host("a.io")).unwrap().endpoints.len(), 1);
}

#[test]
fn default_dir_is_the_fallback() {
    let (tmp, dir) = hosts_dir(&[
        ("_default/hosts.toml", "[host.\"https://cache.local\"]\n"),
        (
            "ghcr.io/hosts.toml",
            "[host.\"https://ghcr-mirror.local\"]\n",
        ),
    ]);
    let config = dir.resolve(&host("quay.io")).unwrap();
    assert_eq!(
        urls(&config),
        ["https://cache.local/v2", "https://quay.io/v2"]
    );
    assert_eq!(
        config.source.as_deref(),
        Some(tmp.path().join("_default/hosts.toml").as_path())
    );
    let config = dir.resolve(&host("ghcr.io")).unwrap();
    assert_eq!(
        urls(&config),
        ["https://ghcr-mirror.local/v2", "https://ghcr.io/v2"]
    );
}

#[test]
fn a_host_with_a_port_uses_its_host_port_directory() {
    let (tmp, dir) = hosts_dir(&[
        (
            "127.0.0.1:5000/hosts.toml",
            "server = \"http://127.0.0.1:5001\"\n",
        ),
        ("[::1]:5000/hosts.toml", "server = \"http://[::1]:5002\"\n"),
        (
            "other_6000_/hosts.toml",
            "server = \"https://other.local:6001\"\n",
        ),
        ("_default/hosts.toml", "server = \"https://wrong.local\"\n"),
    ]);
    let config = dir.resolve(&host("127.0.0.1:5000")).unwrap();
    assert_eq!(urls(&config), ["http://127.0.0.1:5001/v2"]);
    assert!(config.endpoints[0].is_origin);
    let config = dir.resolve(&host("[::1]:5000")).unwrap();
    assert_eq!(urls(&config), ["http://[::1]:5002/v2"]);
    // containerd's older host_port_ spelling.
    let config = dir.resolve(&host("other:6000")).unwrap();
    assert_eq!(urls(&config), ["https://other.local:6001/v2"]);
    // Another port of the same host falls back to _default.
    let config = dir.resolve(&host("127.0.0.1:5001")).unwrap();
    assert_eq!(urls(&config), ["https://wrong.local/v2"]);
    assert_eq!(
        dir.host_dir(&host("127.0.0.1:5000")).unwrap(),
        Some(tmp.path().join("127.0.0.1:5000"))
    );
}

#[test]
fn mirrors_are_tried_in_file_order_then_the_origin() {
    // Names chosen so that sorted order differs from file order.
    let text = r#"
server = "https://registry.example.com"

[host."https://zeta.mirror"]
  capabilities = ["pull", "resolve"]

[host."http://alpha.mirror:8080"]

[host."https://mu.mirror/cache"]
  capabilities = ["pull"]

[host."beta.mirror"]
"#;
    let (_tmp, dir) = hosts_dir(&[("registry.example.com/hosts.toml", text)]);
    let config = dir.resolve(&host("registry.example.com")).unwrap();
    assert_eq!(
        urls(&config),
        [
            "https://zeta.mirror/v2",
            "http://alpha.mirror:8080/v2",
            "https://mu.mirror/cache/v2",
            "https://beta.mirror/v2",
            "https://registry.example.com/v2",
        ]
    );
    let origins: Vec<bool> = config.endpoints.iter().map(|e| e.is_origin).collect();
    assert_eq!(origins, [false, false, false, false, true]);
    assert!(config.ignored_keys.is_empty());
}

#[test]
fn endpoints_without_pull_are_skipped() {
    let text = r#"
server = "https://origin.local"
capabilities = ["resolve"]
[host."https://a.local"]
  capabilities = ["resolve"]
[host."https://b.local"]
  capabilities = ["PULL"]
[host."https://c.local"]
  capabilities = []
[host."https://d.local"]
  capabilities = ["push"]
"#;
    let config = parse_hosts_toml(text, &host("x.io"), Path::new("/h/x.io/hosts.toml")).unwrap();
    assert_eq!(urls(&config), ["https://b.local/v2", "https://c.local/v2"]);
    // No endpoint can pull: an empty list, not the default origin.
    let text = "capabilities = [\"resolve\"]\n";
    let config = parse_hosts_toml(text, &host("x.io"), Path::new("/h/hosts.toml")).unwrap();
    assert!(config.endpoints.is_empty());
}

#[test]
fn override_path_makes_the_url_path_the_api_root() {
    let text = r#"
server = "https://origin.local/v2"
[host."https://plain.local/api/registry"]
  override_path = true
[host."https://appended.local/api/registry"]
[host."https://bare.local"]
  override_path = true
"#;
    let config = parse_hosts_toml(text, &host("x.io"), Path::new("/h/hosts.toml")).unwrap();
    assert_eq!(
        urls(&config),
        [
            "https://plain.local/api/registry",
            "https://appended.local/api/registry/v2",
            "https://bare.local/",
            "https://origin.local/v2",
        ]
    );
    let hex = "ab".repeat(32);
    let r = Reference::parse(&format!("x.io/team/app@sha256:{hex}")).unwrap();
    let blob = |i: usize| {
        config.endpoints[i]
            .blob_url(r.repository(), r.digest())
            .to_string()
    };
    assert_eq!(
        blob(0),
        format!("https://plain.local/api/registry/team/app/blobs/sha256:{hex}")
    );
    assert_eq!(
        blob(1),
        format!("https://appended.local/api/registry/v2/team/app/blobs/sha256:{hex}")
    );
    assert_eq!(
        blob(2),
        format!("https://bare.local/team/app/blobs/sha256:{hex}")
    );
    assert_eq!(
        blob(3),
        format!("https://origin.local/v2/team/app/blobs/sha256:{hex}")
    );
}

#[test]
fn headers_are_kept_in_order_and_redacted_in_debug() {
    let text = r#"
[host."https://m.local"]
[host."https://m.local".header]
  x-first = "1"
  Authorization = "Bearer s3cr3t-token"
  x-multi = ["a", "b"]
[header]
  x-origin = "o"
"#;
    let config = parse_hosts_toml(text, &host("x.io"), Path::new("/h/hosts.toml")).unwrap();
    let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
    assert_eq!(
        config.endpoints[0].headers,
        [
            pair("x-first", "1"),
            pair("Authorization", "Bearer s3cr3t-token"),
            pair("x-multi", "a"),
            pair("x-multi", "b"),
        ]
    );
    assert_eq!(config.endpoints[1].headers, [pair("x-origin", "o")]);
    let debug = format!("{config:?}");
    assert!(debug.contains("Authorization"), "{debug}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
}

#[test]
fn ca_paths_and_skip_verify() {
    let text = r#"
server = "https://origin.local"
ca = "origin.pem"
skip_verify = false
[host."https://a.local"]
  ca = ["/etc/certs/a.pem", "rel/b.pem"]
  skip_verify = true
[host."https://b.local"]
"#;
    let file = Path::new("/etc/containerd/certs.d/x.io/hosts.toml");
    let config = parse_hosts_toml(text, &host("x.io"), file).unwrap();
    let [a, b, origin] = &config.endpoints[..] else {
        panic!("{config:?}");
    };
    assert_eq!(
        a.ca,
        [
            PathBuf::from("/etc/certs/a.pem"),
            PathBuf::from("/etc/containerd/certs.d/x.io/rel/b.pem")
        ]
    );
    assert!(a.skip_verify);
    assert!(b.ca.is_empty() && !b.skip_verify);
    assert_eq!(
        origin.ca,
        [PathBuf::from("/etc/containerd/certs.d/x.io/origin.pem")]
    );
    assert!(!origin.skip_verify && origin.is_origin);
}

#[test]
fn top_level_keys_configure_the_default_origin() {
    let text = "skip_verify = true\nca = \"c.pem\"\n[header]\nx = \"y\"\n";
    let config = parse_hosts_toml(text, &host("docker.io"), Path::new("/d/hosts.toml")).unwrap();
    let origin = &config.endpoints[0];
    assert_eq!(origin.url.as_str(), "https://registry-1.docker.io/v2");
    assert!(origin.skip_verify);
    assert_eq!(origin.ca, [PathBuf::from("/d/c.pem")]);
    assert_eq!(origin.headers, [("x".to_string(), "y".to_string())]);
}

#[test]
fn unknown_keys_are_ignored_and_reported() {
    let text = r#"
server = "https://origin.local"
flavour = "vanilla"
[host."https://m.local"]
  dial_timeout = "1s"
  client = "c.pem"
[host."https://m.local".extra]
  nested = 1
"#;
    let config = parse_hosts_toml(text, &host("x.io"), Path::new("/h/hosts.toml")).unwrap();
    assert_eq!(config.endpoints.len(), 2);
    assert_eq!(
        config.ignored_keys,
        [
            "host.\"https://m.local\".dial_timeout",
            "host.\"https://m.local\".client",
            "host.\"https://m.local\".extra",
            "flavour",
        ]
    );
    assert!(HONOURED_KEYS.contains(&"override_path"));
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let text = "[host.\"https://m.local\".header]\nauthorization = \"Bearer s3cr3t\nserver = 1\n";
    let (tmp, dir) = hosts_dir(&[("x.io/hosts.toml", text)]);
    let e = dir.resolve(&host("x.io")).unwrap_err();
    let HostsError::Syntax { path, line, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(path, &tmp.path().join("x.io/hosts.toml"));
    assert_eq!(*line, 2);
    let message = e.to_string();
    assert!(
        message.contains("x.io/hosts.toml") && message.contains("line 2"),
        "{message}"
    );
    assert!(!message.contains("s3cr3t"), "{message}");
    // Duplicate tables are malformed too.
    let text = "[host.\"a\"]\n[host.\"a\"]\n";
    assert!(matches!(
        parse_hosts_toml(text, &host("x.io"), Path::new("/h")),
        Err(HostsError::Syntax { line: 2, .. })
    ));
}

#[test]
fn honoured_keys_with_wrong_values_are_errors() {
    for (text, key) in [
        ("server = 5", "server"),
        ("server = \"ftp://x\"", "server"),
        ("skip_verify = \"yes\"", "skip_verify"),
        ("override_path = 1", "override_path"),
        ("capabilities = \"pull\"", "capabilities"),
        ("capabilities = [\"fly\"]", "capabilities"),
        ("ca = 3", "ca"),
        ("ca = [\"a\", 1]", "ca"),
        ("host = 1", "host"),
        ("[host]\n\"https://m\" = 1", "host.\"https://m\""),
        ("[header]\nx = 1", "header.x"),
        ("[header]\n\"a b\" = \"v\"", "header.a b"),
        ("[header]\nx = \"a\\nb\"", "header.x"),
        ("[host.\"https://u:pw@m\"]", "host.\"https://u:pw@m\""),
    ] {
        let e = parse_hosts_toml(text, &host("x.io"), Path::new("/h/hosts.toml")).unwrap_err();
        match &e {
            HostsError::Invalid { key: k, path, .. } => {
                assert_eq!(k, key, "{text}");
                assert_eq!(path, Path::new("/h/hosts.toml"));
            }
            other => panic!("{text}: {other:?}"),
        }
        assert!(e.to_string().starts_with("/h/hosts.toml: "), "{e}");
    }
}

#[test]
fn a_directory_without_hosts_toml_uses_docker_cert_files() {
    let (tmp, dir) = hosts_dir(&[
        ("x.io/b.crt", "b"),
        ("x.io/a.crt", "a"),
        ("x.io/client.cert", "c"),
        ("x.io/client.key", "k"),
        ("_default/hosts.toml", "server = \"https://wrong.local\""),
        ("y.io/hosts.toml", "\n  \n"),
    ]);
    let config = dir.resolve(&host("x.io")).unwrap();
    assert_eq!(urls(&config), ["https://x.io/v2"]);
    assert_eq!(
        config.endpoints[0].ca,
        [tmp.path().join("x.io/a.crt"), tmp.path().join("x.io/b.crt")]
    );
    // An empty hosts.toml counts as none (containerd's rule).
    let config = dir.resolve(&host("y.io")).unwrap();
    assert_eq!(urls(&config), ["https://y.io/v2"]);
}

#[test]
fn io_errors_carry_their_source() {
    let (tmp, dir) = hosts_dir(&[]);
    fs::create_dir_all(tmp.path().join("x.io/hosts.toml")).unwrap();
    let e = dir.resolve(&host("x.io")).unwrap_err();
    assert!(matches!(e, HostsError::Io { .. }), "{e:?}");
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.to_string().contains("hosts.toml"));
}

#[test]
fn all_configs_reads_every_host_directory() {
    let (tmp, dir) = hosts_dir(&[
        (
            "127.0.0.1:5000/hosts.toml",
            "server = \"https://127.0.0.1:5000\"\nca = \"ca.pem\"\n",
        ),
        ("[::1]:5000/hosts.toml", "server = \"http://[::1]:5002\"\n"),
        ("other_6000_/hosts.toml", "skip_verify = true\n"),
        ("_default/hosts.toml", "[host.\"https://cache.local\"]\n"),
        ("x.io/a.crt", "a"),
        ("bad.io/hosts.toml", "server = 1\n"),
        ("Not A Host/hosts.toml", "server = \"https://n.local\"\n"),
        ("a-file", ""),
    ]);
    let all = dir.all_configs().unwrap();
    let (ok, bad): (Vec<_>, Vec<_>) = all.into_iter().partition(Result::is_ok);
    let bad: Vec<String> = bad
        .into_iter()
        .map(|e| e.unwrap_err().to_string())
        .collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("bad.io"), "{bad:?}");
    let mut found: Vec<(String, Vec<PathBuf>, bool)> = ok
        .into_iter()
        .flat_map(|c| c.unwrap().endpoints)
        .map(|e| (e.url.to_string(), e.ca, e.skip_verify))
        .collect();
    found.sort();
    let p = |rel: &str| tmp.path().join(rel);
    assert_eq!(
        found,
        [
            ("http://[::1]:5002/v2".into(), vec![], false),
            (
                "https://127.0.0.1:5000/v2".into(),
                vec![p("127.0.0.1:5000/ca.pem")],
                false
            ),
            ("https://cache.local/v2".into(), vec![], false),
            ("https://default.invalid/v2".into(), vec![], false),
            // `other_6000_` is other:6000's directory.
            ("https://other:6000/v2".into(), vec![], true),
            ("https://x.io/v2".into(), vec![p("x.io/a.crt")], false),
        ]
    );
    // A root that is not there is an error naming it.
    let e = HostsDir::new("/nonexistent/blobmgr-hosts")
        .all_configs()
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/blobmgr-hosts"), "{e}");
}
