//! The disk never fills: a daemon whose work dir is a small tmpfs keeps
//! `--min-free` free by evicting, refuses what cannot fit, and keeps
//! serving everything else with the right bytes.
mod common;
use blobmgr::protocol::{Reply, Request};
use common::*;
use std::time::Duration;

const MIB: usize = 1 << 20;

#[test]
fn a_small_disk_keeps_its_watermark_and_serves_what_fits() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test mounts a tmpfs and must run as root (CI does)");
    }
    let fs = Tmpfs::mount("64m").expect("mount a 64 MiB tmpfs");
    let min_free = 16 * MIB as u64;
    let mut d = Daemon::prepare(&["--min-free", "16M"]);
    d.workdir = fs.path().join("work");
    d.spawn();
    let smalls: Vec<Vec<u8>> = (0..8).map(|i| pattern(8 * MIB, 100 + i)).collect();
    for (i, data) in smalls.iter().enumerate() {
        d.add_blob(&format!("small{i}"), data);
    }
    let big = pattern(100 * MIB, 7);
    d.add_blob("big", &big);
    let mut c = d.raw();
    for round in 0..2u32 {
        for (i, data) in smalls.iter().enumerate() {
            // A new generation per blob: the client holds one token at a
            // time, so every other blob may be evicted.
            let generation = round * 100 + i as u32 + 1;
            let b = c
                .open(generation, &format!("small{i}"))
                .expect("GetBlob small");
            let len = data.len() as u64;
            assert_eq!(c.fetch(b.token, 0, len), (len, 0), "small{i} round {round}");
            assert!(b.read(0, len) == *data, "small{i}: wrong bytes");
            let settled = wait_until(Duration::from_secs(10), || {
                free_bytes(fs.path()) >= min_free
            });
            assert!(
                settled,
                "free {} below the watermark {min_free} after small{i}\n{}",
                free_bytes(fs.path()),
                d.log_text()
            );
            if i % 3 == 2 {
                // Interleaved: a blob that can never fit fails, nothing else.
                let bb = c.open(generation + 50, "big").expect("GetBlob big");
                let (_, r) = c.fetch(bb.token, 0, big.len() as u64);
                assert_eq!(r, 1, "100 MiB cannot fit on a 64 MiB disk");
                assert_eq!(c.call(&Request::Noop), Reply::Noop);
            }
        }
    }
    assert!(
        d.log_text().contains("to keep --min-free free"),
        "evictions for the watermark are logged:\n{}",
        d.log_text()
    );
    // A second client is answered the whole time.
    assert_eq!(d.raw().call(&Request::Noop), Reply::Noop);
}
