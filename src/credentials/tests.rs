//! Tests of config.json reading and credential helpers. Helpers are shell
//! scripts in a per-test temp dir handed over through
//! `with_helper_dirs`/[`Env`]: the process environment is never changed.

use super::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

const CONFIG: &str = "/cfg/config.json";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn parse(json: &str) -> Credentials {
    Credentials::parse(json, Path::new(CONFIG)).unwrap()
}

fn basic(user: &str, password: &str) -> Option<Credential> {
    Some(Credential::Basic {
        user: user.into(),
        password: password.into(),
    })
}

/// A temp dir holding helper scripts `docker-credential-<name>`.
fn helpers(scripts: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in scripts {
        let path = dir.path().join(format!("docker-credential-{name}"));
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// A helper that logs its arguments and input, then answers per server.
const STORE: &str = r#"server=$(cat)
printf '%s|%s\n' "$*" "$server" >> "$(dirname "$0")/calls.log"
case "$server" in
  ghcr.io|https://ghcr.io) printf '{"ServerURL":"ghcr.io","Username":"alice","Secret":"helper-s3cret"}' ;;
  token.example) printf '{"ServerURL":"token.example","Username":"<token>","Secret":"tok-s3cret"}' ;;
  https://index.docker.io/v1/) printf '{"Username":"hubuser","Secret":"hub-s3cret"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac"#;

fn calls(dir: &tempfile::TempDir) -> Vec<String> {
    fs::read_to_string(dir.path().join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn config_path_follows_docker() {
    let env = Env {
        docker_config: Some("/dc".into()),
        home: Some("/home/u".into()),
        path: None,
    };
    let explicit = Path::new("/etc/blobmgr/auth.json");
    assert_eq!(
        env.config_path(Some(explicit)),
        Some(explicit.to_path_buf())
    );
    assert_eq!(env.config_path(None), Some("/dc/config.json".into()));
    let env = Env {
        docker_config: Some("".into()),
        ..env
    };
    assert_eq!(
        env.config_path(None),
        Some("/home/u/.docker/config.json".into())
    );
    assert_eq!(Env::default().config_path(None), None);
    let env = Env {
        path: Some("/usr/bin:relative/bin::/opt/bin".into()),
        ..Env::default()
    };
    assert_eq!(
        env.helper_dirs(),
        [PathBuf::from("/usr/bin"), "/opt/bin".into()]
    );
}

#[test]
fn load_reads_the_designated_file() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        docker_config: Some(dir.path().to_path_buf()),
        ..Env::default()
    };
    // A missing default file: no credentials.
    let none = Credentials::load(None, &env).unwrap();
    assert_eq!(none.source(), None);
    assert_eq!(none.lookup("ghcr.io").unwrap(), None);
    // A missing explicit file: an error with its cause.
    let missing = dir.path().join("nope.json");
    let e = Credentials::load(Some(&missing), &env).unwrap_err();
    assert!(matches!(e, CredentialError::Io { .. }) && std::error::Error::source(&e).is_some());
    let json = format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#, b64("u:p"));
    fs::write(dir.path().join("config.json"), json).unwrap();
    let c = Credentials::load(None, &env).unwrap();
    assert_eq!(c.source(), Some(dir.path().join("config.json").as_path()));
    assert_eq!(c.lookup("ghcr.io").unwrap(), basic("u", "p"));
}

#[test]
fn auth_is_base64_of_user_and_password() {
    let json = format!(
        r#"{{"auths": {{
            "https://registry.example.com:5000/v1/": {{"auth": "{}"}},
            "https://index.docker.io/v1/": {{"auth": "{}", "email": "x@y"}},
            "nopad.example": {{"auth": "{}"}},
            "fields.example": {{"username": "carol", "password": "pw3"}}
        }}}}"#,
        b64("alice:pa:ss"),
        b64("hub:hubpw"),
        b64("ab:c").trim_end_matches('='),
    );
    let c = parse(&json);
    assert_eq!(
        c.lookup("registry.example.com:5000").unwrap(),
        basic("alice", "pa:ss")
    );
    assert_eq!(
        c.lookup("Registry.Example.com:5000").unwrap(),
        basic("alice", "pa:ss")
    );
    assert_eq!(c.lookup("registry.example.com").unwrap(), None);
    for hub in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
        assert_eq!(c.lookup(hub).unwrap(), basic("hub", "hubpw"), "{hub}");
    }
    assert_eq!(c.lookup("nopad.example").unwrap(), basic("ab", "c"));
    assert_eq!(c.lookup("fields.example").unwrap(), basic("carol", "pw3"));
    assert_eq!(c.lookup("other.example").unwrap(), None);
}

#[test]
fn identity_tokens_win() {
    let json = format!(
        r#"{{"auths": {{"acr.example": {{"auth": "{}", "identitytoken": "refresh-s3cret"}},
                        "empty.example": {{}}}}}}"#,
        b64("00000000-0000-0000-0000-000000000000:")
    );
    let c = parse(&json);
    assert_eq!(
        c.lookup("acr.example").unwrap(),
        Some(Credential::IdentityToken("refresh-s3cret".into()))
    );
    assert_eq!(c.lookup("empty.example").unwrap(), None);
}

#[test]
fn an_exact_key_wins_over_a_normalised_one() {
    let json = format!(
        r#"{{"auths": {{"http://r.example": {{"auth": "{}"}}, "r.example": {{"auth": "{}"}}}}}}"#,
        b64("normalised:1"),
        b64("exact:2")
    );
    assert_eq!(
        parse(&json).lookup("r.example").unwrap(),
        basic("exact", "2")
    );
    assert_eq!(normalise_key("HTTPS://R.example:443/v2/x"), "r.example:443");
    assert_eq!(normalise_key("https://index.docker.io/v1/"), "docker.io");
}

#[test]
fn malformed_configs_are_errors_without_their_values() {
    for (json, expect) in [
        ("{\"auths\": ", "invalid JSON at line 1"),
        ("[1, 2]", "wrong type"),
        (r#"{"auths": {"h.example": "SECRETVALUE"}}"#, "wrong type"),
        (
            r#"{"auths": {"h.example": {"auth": "!!SECRETVALUE!!"}}}"#,
            "auths.\"h.example\": auth is not base64",
        ),
        (
            r#"{"auths": {"h.example": {"auth": "U0VDUkVUVkFMVUU="}}}"#,
            "not base64 of user:password",
        ),
        (
            r#"{"auths": {"https://": {"auth": "U0VDUkVUVkFMVUU="}}}"#,
            "not a host",
        ),
        (
            r#"{"credHelpers": {"h.example": "../../bin/sh"}}"#,
            "credHelpers.\"h.example\": not a helper name",
        ),
        (r#"{"credsStore": "a b"}"#, "credsStore: not a helper name"),
        (r#"{"credsStore": 5}"#, "wrong type"),
    ] {
        let e = Credentials::parse(json, Path::new(CONFIG)).unwrap_err();
        let message = e.to_string();
        assert!(
            matches!(e, CredentialError::Malformed { .. }),
            "{json}: {e:?}"
        );
        assert!(
            message.starts_with(CONFIG) && message.contains(expect),
            "{json}: {message}"
        );
        assert!(!message.contains("SECRETVALUE"), "{message}");
    }
    // Unknown keys and an empty credsStore are fine.
    let c = parse(r#"{"credsStore": "", "proxies": {}, "auths": {}}"#);
    assert_eq!(c.lookup("x.io").unwrap(), None);
}

#[test]
fn cred_helpers_are_run_with_the_host_on_stdin() {
    let dir = helpers(&[("test", STORE)]);
    let c = parse(
        r#"{"credHelpers": {"ghcr.io": "test", "token.example": "test", "docker.io": "test"}}"#,
    )
    .with_helper_dirs(vec![dir.path().to_path_buf()]);
    assert_eq!(
        c.lookup("ghcr.io").unwrap(),
        basic("alice", "helper-s3cret")
    );
    assert_eq!(
        c.lookup("token.example").unwrap(),
        Some(Credential::IdentityToken("tok-s3cret".into()))
    );
    assert_eq!(
        c.lookup("docker.io").unwrap(),
        basic("hubuser", "hub-s3cret")
    );
    // Only `get` on the command line; the server URL arrives on stdin.
    assert_eq!(
        calls(&dir),
        [
            "get|ghcr.io",
            "get|token.example",
            "get|https://index.docker.io/v1/"
        ]
    );
    // A host without a helper entry does not run one.
    assert_eq!(c.lookup("quay.io").unwrap(), None);
    assert_eq!(calls(&dir).len(), 3);
}

#[test]
fn creds_store_serves_every_host_and_auths_are_the_fallback() {
    let dir = helpers(&[("store", STORE), ("other", "echo other-called >&2; exit 1")]);
    let json = format!(
        r#"{{"credsStore": "store", "credHelpers": {{"quay.io": "other"}},
            "auths": {{"https://ghcr.io": {{}}, "inline.example": {{"auth": "{}"}}}}}}"#,
        b64("in:line")
    );
    let c = parse(&json).with_helper_dirs(vec![dir.path().to_path_buf()]);
    assert_eq!(
        c.lookup("ghcr.io").unwrap(),
        basic("alice", "helper-s3cret")
    );
    // The helper has nothing: the inline entry is used.
    assert_eq!(c.lookup("inline.example").unwrap(), basic("in", "line"));
    assert_eq!(c.lookup("nothing.example").unwrap(), None);
    // The ghcr.io entry's key is the server URL the helper is asked for.
    assert_eq!(
        calls(&dir),
        [
            "get|https://ghcr.io",
            "get|inline.example",
            "get|nothing.example"
        ]
    );
    // credHelpers wins over credsStore for its host.
    let e = c.lookup("quay.io").unwrap_err();
    assert!(matches!(e, CredentialError::HelperFailed { .. }), "{e:?}");
}

#[test]
fn helper_answers_are_cached() {
    let dir = helpers(&[("test", STORE)]);
    let config = r#"{"credsStore": "test"}"#;
    let c = parse(config).with_helper_dirs(vec![dir.path().to_path_buf()]);
    for _ in 0..3 {
        assert!(c.lookup("ghcr.io").unwrap().is_some());
        assert!(c.lookup("missing.example").unwrap().is_none());
    }
    assert_eq!(calls(&dir).len(), 2);
    let uncached = parse(config)
        .with_helper_dirs(vec![dir.path().to_path_buf()])
        .with_cache_ttl(Duration::ZERO);
    uncached.lookup("ghcr.io").unwrap();
    uncached.lookup("ghcr.io").unwrap();
    assert_eq!(calls(&dir).len(), 4);
}

#[test]
fn failing_helpers_are_errors() {
    let dir = helpers(&[
        (
            "fail",
            "cat >/dev/null; echo 'boom: keychain locked'; exit 3",
        ),
        (
            "garbage",
            "cat >/dev/null; printf '{\"Secret\": SECRETVALUE'",
        ),
        ("flood", "cat >/dev/null; yes SECRETVALUE | head -c 200000"),
        (
            "answerfails",
            "cat >/dev/null; echo '{\"Username\":\"u\",\"Secret\":\"SECRETVALUE\"}'; \
             echo 'store locked' >&2; exit 1",
        ),
    ]);
    let lookup = |helper: &str| {
        parse(&format!(r#"{{"credsStore": "{helper}"}}"#))
            .with_helper_dirs(vec![dir.path().to_path_buf()])
            .lookup("x.example")
            .unwrap_err()
    };
    let e = lookup("fail");
    let CredentialError::HelperFailed {
        helper,
        status,
        message,
    } = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!(
        (helper.as_str(), message.as_str()),
        ("fail", "boom: keychain locked")
    );
    assert!(status.contains('3'), "{status}");
    assert!(e.to_string().contains("docker-credential-fail"), "{e}");
    let e = lookup("answerfails").to_string();
    assert!(
        e.contains("store locked") && !e.contains("SECRETVALUE"),
        "{e}"
    );
    for (helper, what) in [
        ("garbage", "not the expected JSON"),
        ("flood", "bytes of output"),
    ] {
        let e = lookup(helper);
        assert!(matches!(e, CredentialError::HelperOutput { .. }), "{e:?}");
        let message = e.to_string();
        assert!(
            message.contains(what) && !message.contains("SECRETVALUE"),
            "{message}"
        );
    }
    let e = lookup("absent");
    assert!(matches!(e, CredentialError::HelperNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("docker-credential-absent not found"));
}

/// Whether process `pid` is gone (or a zombie waiting for init).
fn gone(pid: &str) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_hanging_helper_is_killed_with_its_children() {
    let dir = helpers(&[
        (
            "hang",
            "sleep 30 &\necho $! > \"$(dirname \"$0\")/grandchild.pid\"\nwait",
        ),
        ("mute", "exec >/dev/null 2>&1\nsleep 30"),
    ]);
    for helper in ["hang", "mute"] {
        let c = parse(&format!(r#"{{"credsStore": "{helper}"}}"#))
            .with_helper_dirs(vec![dir.path().to_path_buf()])
            .with_helper_timeout(Duration::from_millis(300));
        let start = Instant::now();
        let e = c.lookup("x.example").unwrap_err();
        assert!(
            matches!(e, CredentialError::HelperTimeout { .. }),
            "{helper}: {e:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(e.to_string().contains("killed"));
    }
    let pid = fs::read_to_string(dir.path().join("grandchild.pid")).unwrap();
    let pid = pid.trim();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone(pid) {
        assert!(Instant::now() < deadline, "grandchild {pid} still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn secrets_never_show_in_debug_or_display() {
    let dir = helpers(&[("test", STORE)]);
    let json = format!(
        r#"{{"credHelpers": {{"ghcr.io": "test"}},
            "auths": {{"a.example": {{"auth": "{}"}}, "t.example": {{"identitytoken": "tok-s3cret"}}}}}}"#,
        b64("bob:inline-s3cret")
    );
    let c = parse(&json).with_helper_dirs(vec![dir.path().to_path_buf()]);
    let found = [
        c.lookup("a.example").unwrap().unwrap(),
        c.lookup("t.example").unwrap().unwrap(),
        c.lookup("ghcr.io").unwrap().unwrap(),
    ];
    let text = format!(
        "{found:?} {:?} {:#?} {} {} {}",
        c, c, found[0], found[1], found[2]
    );
    for secret in ["inline-s3cret", "tok-s3cret", "helper-s3cret"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(
        text.contains("bob") && text.contains("<redacted>"),
        "{text}"
    );
}
