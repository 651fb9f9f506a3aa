//! The cache size limit: least recently used blobs that no connection holds
//! are deleted, held ones never are, and readers of an evicted blob's fd keep
//! their bytes.
mod common;
use common::*;
use std::os::unix::fs::FileExt;

const MIB: usize = 1 << 20;

#[test]
fn lru_unheld_blobs_are_evicted_held_ones_kept() {
    // 10 MiB limit (evicts down to 9 MiB), 4 MiB blobs.
    let d = Daemon::start(&["--cache-size", &(10 * MIB).to_string()]);
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| pattern(4 * MIB, 100 + i)).collect();
    for (i, b) in blobs.iter().enumerate() {
        d.add_blob(&format!("b{i}"), b);
    }
    let data_file = |i: usize| d.workdir.join("data").join(format!("b{i}"));

    // b0: fetched whole, connection closed (no token held), fd kept.
    let mut c0 = d.raw();
    let (t0, r, fd0) = c0.get_blob(1, "b0");
    assert_eq!(r, 0);
    assert_eq!(c0.fetch(t0, 0, u64::MAX), (4 * MIB as u64, 0));
    let fd0 = std::fs::File::from(fd0.unwrap());
    drop(c0);

    // b1: fetched whole and held by a live connection.
    let mut c1 = d.raw();
    let (t1, r, _fd1) = c1.get_blob(1, "b1");
    assert_eq!(r, 0);
    assert_eq!(c1.fetch(t1, 0, u64::MAX), (4 * MIB as u64, 0));
    assert!(data_file(0).exists() && data_file(1).exists());

    // b2 pushes the total to 12 MiB: b0, the least recently used blob
    // nobody holds, goes.
    let mut c2 = d.raw();
    let (t2, r, _fd2) = c2.get_blob(1, "b2");
    assert_eq!(r, 0);
    assert_eq!(c2.fetch(t2, 0, u64::MAX), (4 * MIB as u64, 0));
    assert!(
        wait_until(std::time::Duration::from_secs(10), || !data_file(0)
            .exists()),
        "b0 evicted"
    );
    assert!(
        data_file(1).exists(),
        "a blob with a live token is never evicted"
    );
    assert!(data_file(2).exists());

    // The old fd of b0 still reads the right bytes.
    let mut got = vec![0u8; 4 * MIB];
    fd0.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == blobs[0],
        "evicted blob's bytes changed under a reader"
    );

    // b0 comes back on demand, correct.
    let mut c3 = d.raw();
    let (t3, r, fd3) = c3.get_blob(1, "b0");
    assert_eq!(r, 0);
    assert_eq!(c3.fetch(t3, 0, u64::MAX), (4 * MIB as u64, 0));
    let fd3 = std::fs::File::from(fd3.unwrap());
    fd3.read_exact_at(&mut got, 0).unwrap();
    assert!(got == blobs[0]);
    // b1 is still held by c1 and c2 holds b2, c3 holds b0: over the limit
    // with everything in use, nothing more can go, and b1 still serves.
    assert_eq!(c1.fetch(t1, 5, 10), (10, 0));
    assert!(data_file(1).exists());
}

#[test]
fn blobs_left_on_disk_by_a_previous_run_count_against_the_limit() {
    let mut d = Daemon::start(&[]);
    for i in 0..3 {
        d.add_blob(&format!("old{i}"), &pattern(4 * MIB, i));
        let mut c = d.raw();
        let (t, r, _) = c.get_blob(1, &format!("old{i}"));
        assert_eq!(r, 0);
        assert_eq!(c.fetch(t, 0, u64::MAX).1, 0);
    }
    d.stop_with(nix::sys::signal::Signal::SIGTERM);
    // Restart with a limit below what is on disk: the first fill evicts the
    // oldest leftovers until under the limit.
    d.extra = vec!["--cache-size".into(), (6 * MIB).to_string()];
    d.spawn();
    let data = pattern(MIB, 9);
    d.add_blob("new", &data);
    let mut c = d.raw();
    let (t, r, fd) = c.get_blob(1, "new");
    assert_eq!(r, 0);
    assert_eq!(c.fetch(t, 0, u64::MAX), (MIB as u64, 0));
    let dir = d.workdir.join("data");
    assert!(
        wait_until(std::time::Duration::from_secs(10), || (0..3)
            .filter(|i| dir.join(format!("old{i}")).exists())
            .count()
            == 1),
        "two old blobs evicted"
    );
    let mut got = vec![0u8; MIB];
    std::fs::File::from(fd.unwrap())
        .read_exact_at(&mut got, 0)
        .unwrap();
    assert!(got == data);
}
