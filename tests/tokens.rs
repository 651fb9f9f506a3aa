//! Tokens never run out: one connection opening far more blobs than the
//! per-connection limit (4096) is never answered EMFILE, old tokens answer 0
//! or 2, and the daemon's fd count stays bounded.
mod common;
use blobmgr::protocol::{Reply, Request};
use common::*;

#[test]
fn six_thousand_getblobs_on_one_connection_never_run_out() {
    let d = Daemon::start(&[]);
    for i in 0..8 {
        d.add_blob(&format!("t{i}"), &pattern(4096, i));
    }
    let mut c = d.raw();
    let fds_before = d.fd_count();
    let mut tokens = Vec::new();
    for n in 0..6000u32 {
        let id = format!("t{}", n % 8);
        let (token, result, fd) = c.get_blob(1, &id);
        assert_eq!(result, 0, "GetBlob {n} answered {result} (EMFILE is 24)");
        drop(fd); // the test keeps no fd: the daemon's count is what matters
        tokens.push(token);
    }
    // The first tokens were retired: 2 (open again); the last ones work.
    let (count, r) = c.fetch(tokens[0], 0, 10);
    assert!(
        r == 2 || (r == 0 && count == 10),
        "oldest token answered {r}"
    );
    assert_eq!(c.fetch(tokens[5999], 0, 10), (10, 0));
    let retired = tokens[..1000]
        .iter()
        .filter(|&&t| c.fetch(t, 0, 1).1 == 2)
        .count();
    assert!(retired > 0, "past 4096 tokens, old ones are retired");
    assert_eq!(c.call(&Request::Noop), Reply::Noop);
    // Three fds per open blob (data, its read-only twin, map), none per
    // token: 6000 tokens cost what 8 blobs cost.
    let fds_after = d.fd_count();
    assert!(
        fds_after <= fds_before + 3 * 8 + 8,
        "daemon fds grew from {fds_before} to {fds_after}"
    );
}

#[test]
fn a_daemon_that_opened_more_blobs_than_it_keeps_open_stays_under_its_fd_bound() {
    // More distinct blobs than blobmgr::cache::MAX_OPEN_BLOBS (1024).
    let n = blobmgr::cache::MAX_OPEN_BLOBS + 176;
    // Two granules a blob, one of them fetched: partly filled blobs, whose
    // marks must be checkpointed before they may be closed.
    let d = Daemon::start(&["--granule", "4K"]);
    for i in 0..n {
        d.add_blob(&format!("m{i}"), &pattern(8192, i as u64));
    }
    let fds_before = d.fd_count();
    // In batches on connections that then close, so no token holds them.
    for batch in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut c = d.raw();
        for &i in batch {
            let (token, result, fd) = c.get_blob(1, &format!("m{i}"));
            assert_eq!(result, 0, "GetBlob m{i}");
            drop(fd);
            assert_eq!(c.fetch(token, 0, 4096), (4096, 0));
        }
    }
    // The first blob, closed long ago, opens again with its bytes.
    let mut c = d.raw();
    let (token, result, fd) = c.get_blob(1, "m0");
    assert_eq!(result, 0);
    assert_eq!(c.fetch(token, 0, 4096), (4096, 0));
    let mut got = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::from(fd.unwrap()), &mut got, 0)
        .unwrap();
    assert_eq!(got, pattern(8192, 0)[..4096]);
    let fds_after = d.fd_count();
    let bound = fds_before + 3 * blobmgr::cache::MAX_OPEN_BLOBS + 16;
    assert!(
        fds_after <= bound,
        "daemon fds grew from {fds_before} to {fds_after} for {n} blobs (bound {bound})"
    );
}
