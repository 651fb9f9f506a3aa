//! The registry backend end to end: the real daemon binary pulling blobs by
//! range from a real OCI registry (Debian's `docker-registry`, the CNCF
//! distribution registry) and from small fake HTTP servers
//! (`common::FakeHttp`) for the cases a real registry will not produce
//! (wrong bytes, auth flows, redirects off the registry, servers that ignore
//! Range).
//!
//! Everything listens on loopback only.

mod common;

use common::{
    digest_hex, pattern, serve_data, sha256, Blob, Daemon, FakeHttp, Raw, Registry, Req, Resp, Rng,
};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The cache's default fill job (one HTTP request per job).
const JOB: u64 = 4 * MIB;
/// The cache's default granule.
const GRANULE: u64 = MIB;
const FETCH_OK: u32 = 0;
const FETCH_FAILED: u32 = 1;
const EINVAL: u32 = 22;
const ENOENT: u32 = 2;
const EIO: u32 = 5;
const EACCES: u32 = 13;

// ---------------------------------------------------------------------------
// Talking to the daemon

fn daemon_with(url: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--backend", url];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

/// Fetches and reads back all of a blob, checking its digest.
fn pull_all(raw: &mut Raw, b: &Blob, expect: &[u8]) {
    let size = b.size();
    assert_eq!(raw.fetch(b.token, 0, size), (size, FETCH_OK));
    let got = b.read(0, size);
    assert!(got == expect, "pulled bytes differ from the source");
    assert_eq!(sha256(&got), sha256(expect));
}

// ---------------------------------------------------------------------------
// Fake registries (common::FakeHttp)

/// Which blob a `/v2/<repo>/blobs/sha256:<hex>` path names.
fn blob_hex<'a>(req: &'a Req, repo: &str) -> Option<&'a str> {
    req.path_only()
        .strip_prefix(&format!("/v2/{repo}/blobs/sha256:"))
}

// ---------------------------------------------------------------------------
// Tests against the real registry

#[test]
fn real_registry_serves_ranges_by_digest_one_request_per_job() {
    let reg = Registry::start();
    let repo = "test/blobs";
    let big = pattern((64 * MIB) as usize - 12_345, 7);
    let big_hex = reg.push(repo, &big);
    let mid = pattern((32 * MIB) as usize, 8);
    let mid_hex = reg.push(repo, &mid);
    let d = daemon_with(&reg.url(repo), &["--workers", "4"]);
    let mut raw = d.raw();

    // Ids: a digest in either spelling; anything else is EINVAL; a digest
    // the registry lacks is ENOENT.
    let b = raw
        .open(1, &format!("sha256:{big_hex}"))
        .expect("GetBlob by digest");
    assert_eq!(b.size(), big.len() as u64);
    let bare = raw.open(1, &big_hex).expect("GetBlob by bare hex");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        bare.file.metadata().unwrap().ino(),
        b.file.metadata().unwrap().ino(),
        "both spellings must name one cache file"
    );
    for bad in [
        "sha256:abc".to_string(),
        format!("sha256:{}", big_hex.to_uppercase()),
        format!("sha512:{big_hex}"),
        "blob".to_string(),
    ] {
        assert_eq!(raw.open(1, &bad).err(), Some(EINVAL), "{bad}");
    }
    let absent = digest_hex(b"not pushed");
    assert_eq!(raw.open(1, &absent).err(), Some(ENOENT));

    // Random unaligned ranges of the cold 64 MiB blob, through the client
    // library (fetch + pread through the received fd).
    let client = blobmgr::client::Client::connect(&d.sock).expect("client");
    let cb = client
        .get_blob(&format!("sha256:{big_hex}"))
        .expect("client GetBlob");
    assert_eq!(cb.size(), big.len() as u64);
    let mut rng = Rng::new(0x5eed_1234_abcd);
    for _ in 0..40 {
        let start = rng.below(big.len() as u64);
        let len = 1 + rng.below(3 * MIB);
        let mut buf = vec![0u8; len as usize];
        let n = client.read_at(&cb, &mut buf, start).expect("read_at");
        let end = (start + len).min(big.len() as u64);
        assert_eq!(n as u64, end - start);
        assert!(
            buf[..n] == big[start as usize..end as usize],
            "bytes differ at [{start}, {end})"
        );
    }
    // Then all of it: equal to the source, and the daemon's digest check
    // passed (a mismatch would have failed the fetch).
    pull_all(&mut raw, &b, &big);

    // A cold whole-blob pull costs one GET per fill job, not one per 1 MiB
    // granule. Nothing of this blob was filled before, so the backend's
    // speed is unknown and the jobs are the short ones (4 MiB); larger
    // jobs follow a fill that showed a fast backend (unit tests in
    // cache::index).
    assert_eq!(reg.blob_gets(repo, &mid_hex), 0);
    let m = raw.open(1, &format!("sha256:{mid_hex}")).expect("GetBlob");
    pull_all(&mut raw, &m, &mid);
    let gets = reg.blob_gets(repo, &mid_hex) as u64;
    let jobs = mid.len() as u64 / JOB;
    assert!(
        (jobs..=jobs + 2).contains(&gets),
        "{gets} GETs for a {} MiB blob; expected about {jobs} (one per {} MiB job, not one per \
         {} MiB granule)",
        mid.len() as u64 / MIB,
        JOB / MIB,
        GRANULE / MIB
    );
    // Cached ranges cost no requests at all.
    assert_eq!(raw.fetch(m.token, 5, 20 * MIB), (20 * MIB, FETCH_OK));
    assert_eq!(reg.blob_gets(repo, &mid_hex) as u64, gets);
}

/// A client reading a cold blob front to back in 1 MiB reads is read ahead
/// of: the daemon fills ahead of it in the background, so most reads are
/// cache hits; no byte is fetched twice; the bytes are right; and the
/// digest, hashed while the blob filled, was checked (the map says so).
#[test]
fn a_sequential_reader_is_read_ahead_and_the_blob_verified() {
    let reg = Registry::start();
    let repo = "test/seq";
    let data = pattern((40 * MIB) as usize - 777, 11);
    let hex = reg.push(repo, &data);
    let d = daemon_with(&reg.url(repo), &["--workers", "4"]);
    let mut raw = d.raw();
    let b = raw.open(1, &format!("sha256:{hex}")).expect("GetBlob");
    let size = data.len() as u64;
    for i in 0..size.div_ceil(MIB) {
        let (start, len) = (i * MIB, MIB.min(size - i * MIB));
        assert_eq!(raw.fetch(b.token, start, len), (len, FETCH_OK), "read {i}");
        assert!(b.read(start, len) == data[start as usize..(start + len) as usize]);
    }
    let ahead = d.metric("blobmgr_readahead_fills_total");
    let hits = d.metric("blobmgr_requests_total{op=\"fetch_range\",result=\"hit\"}");
    assert!(ahead >= 4.0, "{ahead} readahead fills");
    assert!(hits >= 20.0, "only {hits} of 40 reads were hits");
    // Nothing was fetched twice, and past the first reads the GETs were
    // whole 4 MiB jobs (three 1 MiB reads before the stream is seen).
    assert_eq!(reg.blob_get_bytes(&hex), size);
    let gets = reg.blob_gets(repo, &hex) as u64;
    assert!(gets <= 3 + size.div_ceil(JOB), "{gets} GETs");
    let ls = Command::new(common::bin())
        .args(["cache", "ls", "--json", "--workdir"])
        .arg(&d.workdir)
        .output()
        .expect("cache ls");
    let rows: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("cache ls --json");
    let id = format!("sha256:{hex}");
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(
        (&row["verified"], &row["complete"]),
        (&true.into(), &true.into()),
        "{row}"
    );
}

#[test]
fn registry_outage_fails_fetches_keeps_the_cache_and_recovers() {
    let mut reg = Registry::start();
    let repo = "outage";
    let data = pattern((16 * MIB) as usize + 999, 21);
    let hex = reg.push(repo, &data);
    let id = format!("sha256:{hex}");
    let mut d = daemon_with(&reg.url(repo), &["--backend-retries", "2"]);
    let mut raw = d.raw();
    let b = raw.open(1, &id).expect("GetBlob");
    let half = 8 * MIB;
    assert_eq!(raw.fetch(b.token, 0, half), (half, FETCH_OK));

    reg.stop();
    // Missing ranges fail; cached ones are still served, to this connection
    // and to new ones.
    assert_eq!(raw.fetch(b.token, half, MIB).1, FETCH_FAILED);
    assert_eq!(raw.fetch(b.token, 3, half - 3), (half - 3, FETCH_OK));
    assert!(b.read(0, half) == data[..half as usize]);
    let mut raw2 = d.raw();
    let b2 = raw2
        .open(1, &id)
        .expect("GetBlob of an open blob while the registry is down");
    assert_eq!(raw2.fetch(b2.token, 100, MIB), (MIB, FETCH_OK));
    // A blob the cache does not know is a backend failure, not "no such blob".
    assert_eq!(raw2.open(1, &digest_hex(b"x")).err(), Some(EIO));

    // Even a restarted daemon serves what it cached while the registry is away.
    drop((raw, raw2));
    d.kill9();
    d.spawn();
    let mut raw = d.raw();
    let b = raw
        .open(1, &id)
        .expect("GetBlob from the cache after a daemon restart");
    assert_eq!(b.size(), data.len() as u64);
    assert_eq!(raw.fetch(b.token, MIB + 7, MIB), (MIB, FETCH_OK));
    assert!(b.read(MIB + 7, MIB) == data[(MIB + 7) as usize..(2 * MIB + 7) as usize]);
    assert_eq!(raw.fetch(b.token, half, 1).1, FETCH_FAILED);

    // The registry comes back (same port and storage): the rest arrives and
    // the whole blob checks out.
    reg.spawn();
    assert_eq!(raw.fetch(b.token, half, MIB), (MIB, FETCH_OK));
    pull_all(&mut raw, &b, &data);
}

// ---------------------------------------------------------------------------
// Tests against fake servers

#[test]
fn bytes_that_do_not_match_the_digest_are_rejected_and_not_kept() {
    let data = pattern((3 * MIB) as usize + 100, 3);
    let mut promised = data.clone();
    promised[12_345] ^= 1;
    let hex = digest_hex(&promised);
    let served = data.clone();
    let fake = FakeHttp::start("127.0.0.1", move |req| match blob_hex(req, "r") {
        Some(_) => serve_data(req, &served, true),
        None => Resp::new(404),
    });
    let mut d = daemon_with(&format!("{}/r", fake.base()), &[]);
    let mut raw = d.raw();
    let b = raw.open(1, &hex).expect("GetBlob");
    let gets = || fake.count("GET", "/v2/r/blobs/");
    // A partial blob cannot be checked yet.
    assert_eq!(raw.fetch(b.token, 0, 10), (10, FETCH_OK));
    assert_eq!(gets(), 1);
    // Completing it runs the check, which fails.
    assert_eq!(raw.fetch(b.token, 0, b.size()).1, FETCH_FAILED);
    assert_eq!(gets(), 2);
    // Nothing was kept: the first granule is downloaded again.
    assert_eq!(raw.fetch(b.token, 0, 10), (10, FETCH_OK));
    assert_eq!(gets(), 3);
    assert_eq!(raw.fetch(b.token, 0, b.size()).1, FETCH_FAILED);
    assert_eq!(gets(), 4);
    // Nor after a restart: the persisted map does not claim the bytes.
    drop(raw);
    d.kill9();
    d.spawn();
    let mut raw = d.raw();
    let b = raw.open(1, &hex).expect("GetBlob after restart");
    assert_eq!(raw.fetch(b.token, 5, 10), (10, FETCH_OK));
    assert_eq!(gets(), 5);
    assert!(
        d.wait_log("integrity", Duration::from_secs(10)),
        "the rejection is logged: {}",
        d.log_text()
    );
}

#[test]
fn bearer_token_flow_and_redirect_off_the_registry_without_credentials() {
    let data = pattern((9 * MIB) as usize + 4321, 11);
    let hex = digest_hex(&data);
    // Object storage on another loopback address: records what it gets.
    let stored = data.clone();
    let storage = FakeHttp::start("127.0.0.2", move |req| {
        if req.path_only() == "/bucket/blob" {
            serve_data(req, &stored, true)
        } else {
            Resp::new(404)
        }
    });
    let storage_url = format!("{}/bucket/blob?sig=abc", storage.base());
    let token = "tok-12345";
    let realm: Arc<Mutex<String>> = Arc::default();
    let realm2 = realm.clone();
    let size = data.len();
    let reg = FakeHttp::start("127.0.0.1", move |req| {
        if req.path_only() == "/token" {
            // The token endpoint wants the basic credentials.
            return if req.header("Authorization") == Some("Basic dXNlcjpzM2NyZXQ=") {
                Resp::new(200).body(
                    format!("{{\"access_token\":\"{token}\",\"expires_in\":300}}").into_bytes(),
                )
            } else {
                Resp::new(401)
            };
        }
        if req.header("Authorization") != Some(&format!("Bearer {token}")) {
            let challenge = format!(
                "Bearer realm=\"{}\",service=\"fake-registry\",scope=\"repository:lib/app:pull\"",
                realm2.lock().unwrap()
            );
            return Resp::new(401).header("WWW-Authenticate", &challenge);
        }
        match (req.method.as_str(), blob_hex(req, "lib/app")) {
            ("HEAD", Some(_)) => Resp::new(200).body(vec![0; size]),
            ("GET", Some(_)) => Resp::new(307).header("Location", &storage_url),
            _ => Resp::new(404),
        }
    });
    *realm.lock().unwrap() = format!("{}/token", reg.base());
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "s3cret\n").unwrap();
    let d = daemon_with(
        &format!("{}/lib/app", reg.base()),
        &[
            "--registry-user",
            "user",
            "--registry-password-file",
            pwfile.to_str().unwrap(),
        ],
    );
    let mut raw = d.raw();
    let b = raw.open(1, &format!("sha256:{hex}")).expect("GetBlob");
    assert_eq!(b.size(), data.len() as u64);
    assert_eq!(raw.fetch(b.token, 1_000_001, 77), (77, FETCH_OK));
    assert!(b.read(1_000_001, 77) == data[1_000_001..1_000_078]);
    pull_all(&mut raw, &b, &data);

    // One token for everything, asked for with the challenge's service and
    // scope.
    let token_reqs: Vec<Req> = reg
        .requests()
        .into_iter()
        .filter(|r| r.path_only() == "/token")
        .collect();
    assert_eq!(token_reqs.len(), 1, "the token is cached: {token_reqs:?}");
    let q = token_reqs[0].query();
    assert_eq!(q.get("service").map(String::as_str), Some("fake-registry"));
    assert_eq!(
        q.get("scope").map(String::as_str),
        Some("repository:lib/app:pull")
    );
    // Every blob GET went on to storage, which got the Range but never the
    // registry's credentials.
    let blob_gets = reg.count("GET", "/v2/lib/app/blobs/");
    let got = storage.requests();
    assert!(
        blob_gets >= 3 && got.len() >= 3,
        "{blob_gets} GETs, {} at storage",
        got.len()
    );
    for r in &got {
        assert_eq!(r.header("Authorization"), None, "credentials leaked: {r:?}");
        assert!(r.header("Range").is_some(), "Range lost on redirect: {r:?}");
    }
    // Only the very first registry request went without the token.
    let unauthorized = reg
        .requests()
        .iter()
        .filter(|r| r.path_only() != "/token")
        .filter(|r| r.header("Authorization") != Some(&format!("Bearer {token}")))
        .count();
    assert_eq!(unauthorized, 1);
}

#[test]
fn anonymous_tokens_are_cached_until_they_expire() {
    let data = pattern((3 * MIB) as usize, 17);
    let hex = digest_hex(&data);
    let served = data.clone();
    let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let issued2 = issued.clone();
    let realm: Arc<Mutex<String>> = Arc::default();
    let realm2 = realm.clone();
    let fake = FakeHttp::start("127.0.0.1", move |req| {
        if req.path_only() == "/token" {
            assert_eq!(
                req.header("Authorization"),
                None,
                "no credentials configured"
            );
            let n = issued2.fetch_add(1, Ordering::SeqCst) + 1;
            // Short-lived: the backend stops using it after about two seconds.
            return Resp::new(200)
                .body(format!("{{\"token\":\"t{n}\",\"expires_in\":4}}").into_bytes());
        }
        let n = issued2.load(Ordering::SeqCst);
        let valid = (1..=n).any(|i| req.header("Authorization") == Some(&format!("Bearer t{i}")));
        if !valid {
            let challenge = format!("Bearer realm=\"{}\"", realm2.lock().unwrap());
            return Resp::new(401).header("WWW-Authenticate", &challenge);
        }
        match blob_hex(req, "r") {
            Some(_) => serve_data(req, &served, true),
            None => Resp::new(404),
        }
    });
    *realm.lock().unwrap() = format!("{}/token", fake.base());
    let d = daemon_with(&format!("{}/r", fake.base()), &[]);
    let mut raw = d.raw();
    let b = raw.open(1, &hex).expect("GetBlob");
    assert_eq!(raw.fetch(b.token, 0, 10), (10, FETCH_OK));
    assert_eq!(
        issued.load(Ordering::SeqCst),
        1,
        "one token for HEAD and GET"
    );
    // Without a scope in the challenge, the backend asks for pull access to
    // its repository.
    let q = fake
        .requests()
        .into_iter()
        .find(|r| r.path_only() == "/token")
        .map(|r| r.query())
        .unwrap();
    assert_eq!(
        q.get("scope").map(String::as_str),
        Some("repository:r:pull")
    );
    // Not synchronisation: the passage of time is what is under test. The
    // backend stops using a token halfway through its lifetime (2 s of 4)
    // counted from when it got it, which was before the fetch above
    // returned; there is nothing to wait on but the clock.
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(raw.fetch(b.token, MIB, 10), (10, FETCH_OK));
    assert_eq!(
        issued.load(Ordering::SeqCst),
        2,
        "an expired token is replaced"
    );
    pull_all(&mut raw, &b, &data);
}

/// Starts the daemon with `env` set (the password variable).
fn daemon_with_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let mut args = vec!["--backend", url];
    args.extend_from_slice(extra);
    let mut d = Daemon::prepare(&args);
    d.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    d.spawn();
    d
}

#[test]
fn basic_auth_with_the_password_from_the_environment() {
    let data = pattern((2 * MIB) as usize + 3, 5);
    let hex = digest_hex(&data);
    let served = data.clone();
    // "admin:hunter2"
    let fake = FakeHttp::start("127.0.0.1", move |req| {
        if req.header("Authorization") != Some("Basic YWRtaW46aHVudGVyMg==") {
            return Resp::new(401).header("WWW-Authenticate", "Basic realm=\"fake\"");
        }
        match blob_hex(req, "r") {
            Some(_) => serve_data(req, &served, true),
            None => Resp::new(404),
        }
    });
    let url = format!("{}/r", fake.base());
    let id = format!("sha256:{hex}");
    {
        let d = daemon_with_env(
            &url,
            &["--registry-user", "admin"],
            &[("BLOBMGR_REGISTRY_PASSWORD", "hunter2")],
        );
        let mut raw = d.raw();
        let b = raw.open(1, &id).expect("GetBlob with basic auth");
        pull_all(&mut raw, &b, &data);
    }
    // Wrong or missing credentials: GetBlob fails with EACCES (neither
    // ENOENT nor a generic EIO), so a client can tell what to fix.
    {
        let d = daemon_with_env(
            &url,
            &["--registry-user", "admin"],
            &[("BLOBMGR_REGISTRY_PASSWORD", "wrong")],
        );
        assert_eq!(d.raw().open(1, &id).err(), Some(EACCES));
        let d = daemon_with(&url, &[]);
        assert_eq!(d.raw().open(1, &id).err(), Some(EACCES));
    }
    // The password never comes from the command line.
    let out = Command::new(common::bin())
        .args(["serve", "--backend", &url, "--registry-user", "admin"])
        .env_remove("BLOBMGR_REGISTRY_PASSWORD")
        .output()
        .expect("run blobmgr");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password"));
    let out = Command::new(common::bin())
        .args(["serve", "--backend", &url, "--registry-password", "x"])
        .output()
        .expect("run blobmgr");
    assert!(!out.status.success());
}

#[test]
fn a_server_that_ignores_range_still_yields_the_right_bytes() {
    let data = pattern((9 * MIB) as usize + 12_345, 9);
    let hex = digest_hex(&data);
    let served = data.clone();
    let fake = FakeHttp::start("127.0.0.1", move |req| match blob_hex(req, "r") {
        Some(_) => serve_data(req, &served, false),
        None => Resp::new(404),
    });
    let d = daemon_with(&format!("{}/r", fake.base()), &[]);
    let mut raw = d.raw();
    let b = raw.open(1, &hex).expect("GetBlob");
    let mut rng = Rng::new(77);
    for _ in 0..6 {
        let start = rng.below(data.len() as u64);
        let len = 1 + rng.below(2 * MIB);
        let end = (start + len).min(data.len() as u64);
        assert_eq!(raw.fetch(b.token, start, len), (end - start, FETCH_OK));
        assert!(b.read(start, end - start) == data[start as usize..end as usize]);
    }
    pull_all(&mut raw, &b, &data);
    // The first answer carried the whole blob and all of it was kept: no
    // range is fetched again (before references, each range re-downloaded
    // the whole blob).
    assert_eq!(fake.count("GET", "/v2/r/blobs/"), 1);
}

#[test]
fn a_short_body_or_server_errors_fail_the_fetch() {
    let data = pattern((2 * MIB) as usize, 13);
    let hex = digest_hex(&data);
    let served = data.clone();
    // Says the blob is 2 MiB but has only 1.5 MiB: the second granule's
    // range comes back short. A second repository always answers 503.
    let fake = FakeHttp::start("127.0.0.1", move |req| {
        if blob_hex(req, "short").is_some() {
            if req.method == "HEAD" {
                return Resp::new(200).body(vec![0; served.len()]);
            }
            let (a, b) = req
                .header("Range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
                .unwrap();
            let avail = (3 * MIB / 2) as usize;
            let b = b.min(avail - 1);
            let body = if a < avail {
                served[a..=b].to_vec()
            } else {
                Vec::new()
            };
            return Resp::new(206)
                .header("Content-Range", &format!("bytes {a}-{b}/{}", served.len()))
                .body(body);
        }
        if blob_hex(req, "down").is_some() {
            return if req.method == "HEAD" {
                Resp::new(200).body(vec![0; 100])
            } else {
                Resp::new(503).header("Retry-After", "0")
            };
        }
        Resp::new(404)
    });
    let d = daemon_with(
        &format!("{}/short", fake.base()),
        &["--backend-retries", "2"],
    );
    let mut raw = d.raw();
    let b = raw.open(1, &hex).expect("GetBlob");
    assert_eq!(raw.fetch(b.token, 0, MIB), (MIB, FETCH_OK));
    assert!(b.read(0, MIB) == data[..MIB as usize]);
    assert_eq!(raw.fetch(b.token, MIB, MIB).1, FETCH_FAILED);
    assert!(
        d.wait_log("short read", Duration::from_secs(10)),
        "{}",
        d.log_text()
    );
    drop(d);

    let d = daemon_with(
        &format!("{}/down", fake.base()),
        &["--backend-retries", "2"],
    );
    let mut raw = d.raw();
    let b = raw.open(1, &hex).expect("GetBlob");
    assert_eq!(raw.fetch(b.token, 0, 10).1, FETCH_FAILED);
    // The first attempt and two retries.
    assert_eq!(fake.count("GET", "/v2/down/blobs/"), 3);
}

#[test]
fn bad_registry_options_are_refused() {
    for args in [
        vec!["--backend", "http://127.0.0.1:1/Bad"],
        vec!["--backend", "http://user:pw@127.0.0.1:1/r"],
        vec!["--backend", "ftp://127.0.0.1:1/r"],
        vec!["--backend", "/tmp", "--registry-user", "u"],
        vec![
            "--backend",
            "http://127.0.0.1:1/r",
            "--registry-password-file",
            "/nonexistent",
        ],
    ] {
        let out = Command::new(common::bin())
            .arg("serve")
            .args(&args)
            .env_remove("BLOBMGR_REGISTRY_PASSWORD")
            .output()
            .expect("run blobmgr");
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line expected: {err}");
    }
}
