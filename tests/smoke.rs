//! A first end-to-end check that the shared helpers and the daemon agree.
mod common;
use common::*;

#[test]
fn noop_getblob_fetch_and_read_through_fd() {
    let d = Daemon::start(&[]);
    let data = pattern(3 << 20, 7);
    d.add_blob("b1", &data);
    let mut c = d.raw();
    assert_eq!(
        c.call(&blobmgr::protocol::Request::Noop),
        blobmgr::protocol::Reply::Noop
    );
    let (token, result, fd) = c.get_blob(5, "b1");
    assert_eq!(result, 0);
    assert_eq!(token >> 32, 5);
    let fd = std::fs::File::from(fd.expect("fd"));
    assert_eq!(c.fetch(token, 1000, 2 << 20), (2 << 20, 0));
    let mut got = vec![0u8; 2 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&fd, &mut got, 1000).unwrap();
    assert!(got == data[1000..1000 + (2 << 20)]);
}
