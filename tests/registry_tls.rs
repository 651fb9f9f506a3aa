//! Blob references over HTTPS (docs/BACKENDS.md, hosts.toml `ca` and
//! `skip_verify`): the real daemon binary with `--hosts-dir`, against a real
//! `docker-registry` serving TLS with a certificate for 127.0.0.1 signed by
//! a CA made for the test (`openssl`, see `tests/common/tls.rs`), which no
//! built-in root trusts.
//!
//! - Without `ca` the certificate is refused (EIO) before any HTTP request
//!   reaches the registry; with a `ca` file that is not a certificate the
//!   endpoint fails naming the file; with the test's CA the reference is
//!   served with the right bytes. hosts.toml is read on every call, so one
//!   daemon sees all three in turn.
//! - A mirror whose certificate is refused is skipped for the origin.
//! - A bad CA file anywhere in the hosts directory is reported at start.
//! - `skip_verify = true` reaches the registry with no CA at all, and says
//!   once per endpoint that verification is off.
//!
//! Everything listens on loopback only.

mod common;

use common::{pattern, sha256, Blob, Daemon, HostsToml, Raw, Registry, Rng, TestCa};
use std::path::Path;

const MIB: u64 = 1 << 20;
const EIO: u32 = 5;

/// A daemon serving references only, with `--hosts-dir hosts` and no
/// Docker login of the machine's.
fn start(hosts: &Path) -> Daemon {
    let hosts = hosts.display().to_string();
    let mut d = Daemon::prepare(&["--hosts-dir", &hosts]);
    d.backend_arg = false;
    d.isolate_registry_env();
    d.spawn();
    d
}

/// A few random ranges, then the whole blob, then its sha256.
fn pull_checked(raw: &mut Raw, b: &Blob, expect: &[u8], rng: &mut Rng) {
    assert_eq!(b.size(), expect.len() as u64);
    for _ in 0..4 {
        let start = rng.below(expect.len() as u64);
        raw.fetch_check(b, expect, start, 1 + rng.below(MIB));
    }
    raw.fetch_check(b, expect, 0, expect.len() as u64);
    assert_eq!(sha256(&b.read(0, b.size())), sha256(expect));
}

/// How many times `needle` is in the daemon's log.
fn log_count(d: &Daemon, needle: &str) -> usize {
    d.log_text().matches(needle).count()
}

#[test]
fn an_https_registry_is_reached_with_its_ca_from_hosts_toml_and_refused_without() {
    let ca = TestCa::new();
    let reg = Registry::start_tls(&ca);
    let mirror = Registry::start_tls(&ca);
    let repo = "secure/app";
    let one = pattern((3 * MIB) as usize + 5, 91);
    let two = pattern((2 * MIB) as usize + 7, 92);
    let (hex1, hex2) = (reg.push(repo, &one), reg.push(repo, &two));
    let hosts = tempfile::tempdir().unwrap();
    let not_a_ca = hosts.path().join("not-a-ca.pem");
    std::fs::write(&not_a_ca, "this is not a certificate\n").unwrap();
    let broken_ca = hosts.path().join("broken-elsewhere.pem");
    std::fs::write(&broken_ca, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    // Another host's directory with a bad CA file: reported at start.
    HostsToml::new()
        .server("https://broken.example")
        .ca(&broken_ca)
        .write(hosts.path(), "broken.example");
    let configure = |t: HostsToml| t.write(hosts.path(), &reg.host());
    configure(HostsToml::new().server(&reg.base()));
    let d = start(hosts.path());
    let log = d.log_text();
    assert!(
        log.contains("--hosts-dir") && log.contains(&broken_ca.display().to_string()),
        "the bad CA file was not reported at start: {log}"
    );
    let mut raw = d.raw();
    let id1 = reg.reference(repo, &hex1);

    // No `ca`: the test CA is not a built-in root.
    assert_eq!(raw.open(1, &id1).err(), Some(EIO), "no ca");
    assert!(
        log_count(&d, "invalid peer certificate") >= 1,
        "{}",
        d.log_text()
    );
    assert!(
        reg.blob_accesses(&hex1).is_empty(),
        "an HTTP request got through a refused certificate"
    );

    // A `ca` that is not a certificate: the endpoint fails naming the file.
    configure(HostsToml::new().server(&reg.base()).ca(&not_a_ca));
    assert_eq!(raw.open(1, &id1).err(), Some(EIO), "bad ca file");
    assert!(
        log_count(&d, &not_a_ca.display().to_string()) >= 1,
        "the bad CA file is not named: {}",
        d.log_text()
    );

    // The test's CA: served, right bytes.
    configure(HostsToml::new().server(&reg.base()).ca(&ca.ca()));
    let mut rng = Rng::new(9101);
    let b1 = raw.open_ok(&id1);
    pull_checked(&mut raw, &b1, &one, &mut rng);
    assert!(
        !reg.blob_accesses(&hex1).is_empty(),
        "not from the registry"
    );

    // A mirror whose certificate is refused (no `ca` for it) is skipped
    // for the origin, which has it.
    configure(
        HostsToml::new()
            .server(&reg.base())
            .ca(&ca.ca())
            .mirror(&mirror.base(), &["pull", "resolve"]),
    );
    let failed_before = log_count(&d, "trying the next endpoint");
    let b2 = raw.open_ok(&reg.reference(repo, &hex2));
    pull_checked(&mut raw, &b2, &two, &mut rng);
    assert!(
        log_count(&d, "trying the next endpoint") > failed_before,
        "{}",
        d.log_text()
    );
    assert!(
        mirror.api_requests().is_empty(),
        "an HTTP request got through the mirror's refused certificate"
    );
}

#[test]
fn skip_verify_reaches_an_https_registry_and_warns_once() {
    let ca = TestCa::new();
    let reg = Registry::start_tls(&ca);
    let repo = "insecure/app";
    let one = pattern((2 * MIB) as usize + 3, 93);
    let two = pattern(MIB as usize + 11, 94);
    let (hex1, hex2) = (reg.push(repo, &one), reg.push(repo, &two));
    let hosts = tempfile::tempdir().unwrap();
    HostsToml::new()
        .server(&reg.base())
        .skip_verify(true)
        .write(hosts.path(), &reg.host());
    let d = start(hosts.path());
    let mut raw = d.raw();
    let mut rng = Rng::new(9102);
    let b1 = raw.open_ok(&reg.reference(repo, &hex1));
    pull_checked(&mut raw, &b1, &one, &mut rng);
    let b2 = raw.open_ok(&reg.reference(repo, &hex2));
    pull_checked(&mut raw, &b2, &two, &mut rng);
    assert!(reg.blob_gets(repo, &hex1) >= 1 && reg.blob_gets(repo, &hex2) >= 1);
    assert_eq!(
        log_count(&d, "is NOT verified"),
        1,
        "one warning per endpoint: {}",
        d.log_text()
    );
}
