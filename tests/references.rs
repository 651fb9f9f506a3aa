//! Blob references end to end (CONTRACT.md, "Contract additions": any image
//! from any registry; reaching registries): the real daemon binary, GetBlob
//! ids `HOST:PORT/REPO@sha256:HEX`, against real registries
//! (`docker-registry`, see `tests/common/registry.rs`) in every mode: two
//! origins at once, one digest in several places, a pull-through mirror
//! from `--hosts-dir` that is then killed, credentials from
//! `--docker-config` (auths, credHelpers, credsStore), `--allow-registry`,
//! malformed ids, and an HTTP proxy from `HTTP_PROXY`.
//!
//! Every daemon here runs with a clean environment for these concerns: no
//! proxy variables unless a test sets them, and `DOCKER_CONFIG` pointing at
//! an empty directory, so the machine's own Docker login is never read.
//!
//! Everything listens on loopback only.

mod common;

use common::{
    basic_header, digest_hex, malformed_references, pattern, sha256, Blob, CredHelper, Daemon,
    DockerConfig, HostsToml, HttpProxy, Raw, Registry, Rng,
};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const ENOENT: u32 = 2;
const EACCES: u32 = 13;
const EINVAL: u32 = 22;
/// What a `cat` of a blob asks for at a time.
const CAT_CHUNK: u64 = 4 * MIB;

/// How to start a daemon for references.
#[derive(Default)]
struct Opts {
    /// Pass `--backend DIR` (plain ids next to references).
    backend: bool,
    hosts_dir: Option<PathBuf>,
    docker_config: Option<PathBuf>,
    allow: Vec<String>,
    env: Vec<(String, String)>,
}

impl Opts {
    fn env(mut self, k: &str, v: &str) -> Opts {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// A daemon with `RUST_LOG=debug` (the secret checks read its log).
fn start(o: Opts) -> Daemon {
    let mut args: Vec<String> = Vec::new();
    if let Some(h) = &o.hosts_dir {
        args.extend(["--hosts-dir".into(), h.display().to_string()]);
    }
    if let Some(c) = &o.docker_config {
        args.extend(["--docker-config".into(), c.display().to_string()]);
    }
    for p in &o.allow {
        args.extend(["--allow-registry".into(), p.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::prepare(&args);
    d.backend_arg = o.backend;
    d.isolate_registry_env();
    d.env.push(("RUST_LOG".into(), "debug".into()));
    d.env.extend(o.env);
    d.spawn();
    d
}

/// One FetchRange of the whole blob, then its sha256 checked.
/// A daemon reading Docker's config `cfg`, with `helper` first on `PATH`.
fn start_with_config(cfg: PathBuf, helper: &CredHelper) -> Daemon {
    start(
        Opts {
            docker_config: Some(cfg),
            ..Opts::default()
        }
        .env("PATH", &helper.path_env()),
    )
}

fn pull_whole(raw: &mut Raw, b: &Blob, expect: &[u8]) {
    assert_eq!(b.size(), expect.len() as u64);
    raw.fetch_check(b, expect, 0, expect.len() as u64);
    assert_eq!(sha256(&b.read(0, b.size())), sha256(expect));
}

/// What `cat` does: the whole blob in order, [`CAT_CHUNK`] at a time.
fn cat(raw: &mut Raw, b: &Blob, expect: &[u8]) {
    assert_eq!(b.size(), expect.len() as u64);
    let mut off = 0;
    while off < b.size() {
        raw.fetch_check(b, expect, off, CAT_CHUNK);
        off += CAT_CHUNK;
    }
    assert_eq!(sha256(&b.read(0, b.size())), sha256(expect));
}

fn random_ranges(raw: &mut Raw, b: &Blob, expect: &[u8], rng: &mut Rng, n: usize) {
    for _ in 0..n {
        let start = rng.below(expect.len() as u64);
        let len = 1 + rng.below(3 * MIB);
        raw.fetch_check(b, expect, start, len);
    }
}

/// Regular files under `WORKDIR/data/` (one per cached blob).
fn data_files(workdir: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path()),
                        Ok(t) if t.is_file() => 1,
                        _ => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&workdir.join("data"))
}

/// At most 10% more than `size`.
fn within_10_percent(bytes: u64, size: u64) -> bool {
    bytes * 10 <= size * 11
}

/// GETs of `hex` at `reg` made by someone other than a registry mirror (a
/// proxy-mode registry fetches with Go's default client).
fn direct_gets(reg: &Registry, hex: &str) -> usize {
    reg.blob_accesses(hex)
        .iter()
        .filter(|a| a.method == "GET" && !a.user_agent.starts_with("Go-http-client"))
        .count()
}

#[test]
fn references_to_two_origins_and_two_repositories() {
    let a = Registry::start();
    let b = Registry::start();
    let blobs: Vec<(&Registry, &str, Vec<u8>)> = vec![
        (&a, "lib/one", pattern((9 * MIB) as usize + 123, 31)),
        (&a, "team/two/app", pattern((5 * MIB) as usize + 7, 32)),
        (&b, "x/y", pattern((7 * MIB) as usize + 1, 33)),
    ];
    let ids: Vec<String> = blobs
        .iter()
        .map(|(r, repo, data)| r.reference(repo, &r.push(repo, data)))
        .collect();
    let plain = pattern((3 * MIB) as usize + 5, 34);
    for with_backend in [false, true] {
        let d = start(Opts {
            backend: with_backend,
            ..Opts::default()
        });
        let mut raw = d.raw();
        let opened: Vec<Blob> = ids.iter().map(|id| raw.open_ok(id)).collect();
        let mut rng = Rng::new(0x7265_6673 + with_backend as u64);
        // Interleaved: a few ranges of each, three rounds.
        for _ in 0..3 {
            for (b, (_, _, data)) in opened.iter().zip(&blobs) {
                assert_eq!(b.size(), data.len() as u64);
                random_ranges(&mut raw, b, data, &mut rng, 3);
            }
        }
        for (b, (_, _, data)) in opened.iter().zip(&blobs) {
            pull_whole(&mut raw, b, data);
        }
        if with_backend {
            d.add_blob("plain-blob", &plain);
            let p = raw.open_ok("plain-blob");
            random_ranges(&mut raw, &p, &plain, &mut rng, 3);
            pull_whole(&mut raw, &p, &plain);
        }
    }
}

#[test]
fn one_digest_through_three_references_is_fetched_once_and_stored_once() {
    let a = Registry::start();
    let b = Registry::start();
    let data = pattern((12 * MIB) as usize + 11, 41);
    let size = data.len() as u64;
    let hex = a.push("one/app", &data);
    a.push("two/app", &data);
    b.push("three/app", &data);
    let ids = [
        a.reference("one/app", &hex),
        a.reference("two/app", &hex),
        b.reference("three/app", &hex),
    ];
    let d = start(Opts::default());
    let mut raw = d.raw();
    let blobs: Vec<Blob> = ids.iter().map(|id| raw.open_ok(id)).collect();
    let ino = |b: &Blob| b.file.metadata().expect("fstat").ino();
    for (b, id) in blobs.iter().zip(&ids) {
        assert_eq!(b.size(), size, "{id}");
        assert_eq!(ino(b), ino(&blobs[0]), "{id}: one cache file per digest");
    }
    // Overlapping parts through different references, then all of it
    // through each.
    raw.fetch_check(&blobs[0], &data, 0, 4 * MIB);
    raw.fetch_check(&blobs[1], &data, 2 * MIB, 6 * MIB);
    raw.fetch_check(&blobs[2], &data, 6 * MIB + 3, size);
    for b in &blobs {
        pull_whole(&mut raw, b, &data);
    }
    // A second connection and the same three ids: nothing more is fetched.
    let mut raw2 = d.raw();
    for id in &ids {
        let b = raw2.open_ok(id);
        pull_whole(&mut raw2, &b, &data);
    }
    let bytes = a.blob_get_bytes(&hex) + b.blob_get_bytes(&hex);
    let gets = a.blob_gets_any(&hex) + b.blob_gets_any(&hex);
    assert!(
        within_10_percent(bytes, size),
        "{bytes} bytes in {gets} GETs from the registries for a {size}-byte blob: fetched more \
         than once"
    );
    assert_eq!(data_files(&d.workdir), 1, "stored once");
}

#[test]
fn a_pull_through_mirror_first_then_the_origin_when_it_dies() {
    let origin = Registry::start();
    let mut mirror = Registry::start_mirror(&origin);
    let hosts = tempfile::tempdir().unwrap();
    HostsToml::new()
        .server(&origin.base())
        .mirror(&mirror.base(), &["pull", "resolve"])
        .write(hosts.path(), &origin.host());
    let repo = "mirrored/app";
    let one = pattern((20 * MIB) as usize + 3, 51);
    let two = pattern((12 * MIB) as usize + 5, 52);
    let (hex1, hex2) = (origin.push(repo, &one), origin.push(repo, &two));
    let d = start(Opts {
        hosts_dir: Some(hosts.path().to_path_buf()),
        ..Opts::default()
    });
    let mut raw = d.raw();

    // `cat` through the cold mirror: it answers each Range GET with the
    // whole blob until it has stored it, and what arrives is kept.
    let b1 = raw.open_ok(&origin.reference(repo, &hex1));
    cat(&mut raw, &b1, &one);
    assert!(mirror.blob_gets(repo, &hex1) >= 1, "not through the mirror");
    let through = mirror.blob_get_bytes(&hex1);
    assert!(
        within_10_percent(through, one.len() as u64),
        "{through} bytes through the mirror for a {}-byte blob read in {} MiB steps",
        one.len(),
        CAT_CHUNK / MIB
    );
    assert_eq!(
        direct_gets(&origin, &hex1),
        0,
        "the origin was asked directly"
    );

    // One FetchRange of a whole cold blob.
    let b2 = raw.open_ok(&origin.reference(repo, &hex2));
    pull_whole(&mut raw, &b2, &two);
    let through = mirror.blob_get_bytes(&hex2);
    assert!(mirror.blob_gets(repo, &hex2) >= 1, "not through the mirror");
    assert!(
        within_10_percent(through, two.len() as u64),
        "{through} bytes through the mirror for one whole-blob FetchRange of {}",
        two.len()
    );
    assert_eq!(
        direct_gets(&origin, &hex2),
        0,
        "the origin was asked directly"
    );

    // The mirror dies: new blobs come from the origin, no call fails, and
    // what is cached is still served.
    mirror.stop();
    let three = pattern((6 * MIB) as usize + 9, 53);
    let hex3 = origin.push(repo, &three);
    let b3 = raw.open_ok(&origin.reference(repo, &hex3));
    cat(&mut raw, &b3, &three);
    let four = pattern((2 * MIB) as usize + 1, 54);
    let hex4 = origin.push(repo, &four);
    let b4 = raw.open_ok(&origin.reference(repo, &hex4));
    pull_whole(&mut raw, &b4, &four);
    assert!(direct_gets(&origin, &hex3) >= 1 && direct_gets(&origin, &hex4) >= 1);
    pull_whole(&mut raw, &b1, &one);
    let mut raw2 = d.raw();
    let b1 = raw2.open_ok(&origin.reference(repo, &hex1));
    pull_whole(&mut raw2, &b1, &one);
}

#[test]
fn credentials_from_auths_helpers_and_store_and_secrets_stay_out_of_the_log() {
    const PW_ALICE: &str = "pw-auths-7f3a9c21e5";
    const PW_BOB: &str = "sec-helper-5b8e0d44aa";
    const PW_WRONG: &str = "pw-wrong-0c1d2e3f4a";
    let r1 = Registry::start_basic("alice", PW_ALICE);
    let r2 = Registry::start_basic("bob", PW_BOB);
    let one = pattern((5 * MIB) as usize + 1, 61);
    let two = pattern((3 * MIB) as usize + 2, 62);
    let id1 = r1.reference("private/one", &r1.push("private/one", &one));
    let id2 = r2.reference("private/two", &r2.push("private/two", &two));
    let cfgs = tempfile::tempdir().unwrap();

    // auths for r1, a credHelper for r2.
    let helper = CredHelper::write("blobtest", &[(&r2.host(), "bob", PW_BOB)]);
    let cfg = DockerConfig::new()
        .auth(&r1.host(), "alice", PW_ALICE)
        .cred_helper(&r2.host(), "blobtest")
        .write(&cfgs.path().join("helpers"));
    let d1 = start_with_config(cfg, &helper);
    let mut raw = d1.raw();
    let b = raw.open_ok(&id1);
    pull_whole(&mut raw, &b, &one);
    let b = raw.open_ok(&id2);
    pull_whole(&mut raw, &b, &two);
    let calls = helper.calls();
    assert!(!calls.is_empty(), "the credential helper never ran");
    for (args, server) in &calls {
        assert_eq!(args, "get", "helper arguments");
        assert!(server.contains(&r2.host()), "helper asked for {server:?}");
    }

    // credsStore for everything; a wrong password in auths for r1.
    let store = CredHelper::write("blobstore", &[(&r2.host(), "bob", PW_BOB)]);
    let cfg = DockerConfig::new()
        .auth(&r1.host(), "alice", PW_WRONG)
        .creds_store("blobstore")
        .write(&cfgs.path().join("store"));
    let d2 = start_with_config(cfg, &store);
    let mut raw = d2.raw();
    assert_eq!(raw.open(1, &id1).err(), Some(EACCES), "refused credentials");
    let b = raw.open_ok(&id2);
    pull_whole(&mut raw, &b, &two);
    assert!(!store.calls().is_empty(), "credsStore never ran");

    // The helper's password is rotated while the daemon runs: the refused
    // answer is not kept, the next GetBlob asks the helper again.
    let rot = CredHelper::write("blobrot", &[(&r1.host(), "alice", PW_WRONG)]);
    let cfg = DockerConfig::new()
        .cred_helper(&r1.host(), "blobrot")
        .write(&cfgs.path().join("rotating"));
    let d4 = start_with_config(cfg, &rot);
    let mut raw = d4.raw();
    assert_eq!(raw.open(1, &id1).err(), Some(EACCES), "the old password");
    let rotated = CredHelper::write("blobrot", &[(&r1.host(), "alice", PW_ALICE)]);
    std::fs::rename(rotated.path(), rot.path()).unwrap();
    // Asked again once the refused answer is 5 s old (not on every refusal).
    assert!(
        common::wait_until(Duration::from_secs(20), || raw.open(1, &id1).is_ok()),
        "the rotated password never taken"
    );
    let b = raw.open_ok(&id1);
    pull_whole(&mut raw, &b, &one);
    // (The new script logs its calls next to where it was written.)
    assert_eq!(rot.calls().len(), 1, "the old password asked once");
    assert_eq!(rotated.calls().len(), 1, "the new one asked once");

    // No credentials at all.
    let d3 = start(Opts::default());
    let mut raw = d3.raw();
    assert_eq!(raw.open(1, &id1).err(), Some(EACCES));
    assert_eq!(raw.open(1, &id2).err(), Some(EACCES));

    let b64 = |u: &str, p: &str| basic_header(u, p)["Basic ".len()..].to_string();
    let secrets = [
        PW_ALICE.to_string(),
        PW_BOB.to_string(),
        PW_WRONG.to_string(),
        b64("alice", PW_ALICE),
        b64("bob", PW_BOB),
        b64("alice", PW_WRONG),
    ];
    for (name, d) in [
        ("auths+helper", &d1),
        ("store", &d2),
        ("rotating", &d4),
        ("none", &d3),
    ] {
        let log = d.log_text();
        assert!(log.contains("DEBUG"), "{name}: not a debug log: {log}");
        for s in &secrets {
            assert!(
                !log.contains(s.as_str()),
                "{name}: a secret is in the daemon's log"
            );
        }
    }
}

#[test]
fn allow_registry_malformed_ids_and_unknown_blobs() {
    let a = Registry::start();
    let b = Registry::start();
    let data = pattern((2 * MIB) as usize + 1, 71);
    let hex = a.push("lib/app", &data);
    b.push("lib/app", &data);
    let unopened = pattern(MIB as usize, 72);
    let hex_unopened = a.push("lib/app", &unopened);
    let d = start(Opts {
        allow: vec![a.host(), "127.0.0.2:1".into()],
        ..Opts::default()
    });
    let mut raw = d.raw();

    let ok = raw.open_ok(&a.reference("lib/app", &hex));
    pull_whole(&mut raw, &ok, &data);
    assert_eq!(
        raw.open(1, &b.reference("lib/app", &hex)).err(),
        Some(EACCES),
        "a registry not allowed"
    );
    assert!(
        b.blob_accesses(&hex).is_empty(),
        "a registry not allowed was contacted"
    );

    let before = a.api_requests().len();
    let table = malformed_references(&a.host(), &hex);
    assert!(table.len() >= 15);
    for (id, why) in &table {
        assert_eq!(raw.open(1, id).err(), Some(EINVAL), "{why}: {id}");
    }
    assert_eq!(
        a.api_requests().len(),
        before,
        "a malformed id made the daemon contact the registry"
    );

    let absent = digest_hex(b"never pushed anywhere");
    assert_eq!(
        raw.open(1, &a.reference("lib/app", &absent)).err(),
        Some(ENOENT),
        "unknown digest"
    );
    assert_eq!(
        raw.open(1, &a.reference("no/such/repo", &hex_unopened))
            .err(),
        Some(ENOENT),
        "unknown repository"
    );
    // The daemon still serves everything else.
    let b2 = raw.open_ok(&a.reference("lib/app", &hex_unopened));
    pull_whole(&mut raw, &b2, &unopened);
}

#[test]
fn an_http_proxy_from_the_environment_carries_the_registry_traffic() {
    let reg = Registry::start();
    let data = pattern((10 * MIB) as usize + 77, 81);
    let hex = reg.push("proxied/app", &data);
    let proxy = HttpProxy::start();
    let d = start(
        Opts::default()
            .env("HTTP_PROXY", &proxy.url())
            .env("NO_PROXY", ""),
    );
    let mut raw = d.raw();
    let b = raw.open_ok(&reg.reference("proxied/app", &hex));
    random_ranges(&mut raw, &b, &data, &mut Rng::new(0x70_726f_7879), 5);
    pull_whole(&mut raw, &b, &data);

    assert!(proxy.wait_idle(Duration::from_secs(10)));
    let via_proxy = proxy.count(&reg.host());
    assert!(via_proxy >= 1, "the proxy saw no registry traffic");
    let proxied_gets = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains(&hex))
        .count();
    assert_eq!(
        proxied_gets,
        reg.blob_gets_any(&hex),
        "every blob GET the registry answered came through the proxy"
    );
    assert!(proxy.bytes(&reg.host()) >= data.len() as u64);
}
