#![no_main]
//! libFuzzer target: the request decoder, then a Connection over a
//! socketpair fed the same bytes in chunks whose sizes come from the input.
use blobmgr::connection::{ConnError, Connection, Peer, ReadStatus};
use blobmgr::protocol;
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let (chunk, scratch_len) = (1 + data[0] as usize % 64, 1 + data[0] as usize * 37 % 5000);
    let buf = &data[1..];
    // One-shot reference.
    let mut want = Vec::new();
    let mut at = 0;
    let end = loop {
        match protocol::decode_request(&buf[at..]) {
            Ok(Some((m, n))) => {
                let mut again = Vec::new();
                protocol::encode_request(
                    &mut again,
                    m.header.tag,
                    m.header.need_reply(),
                    &m.request,
                );
                assert_eq!(again, &buf[at..at + n]);
                want.push(m);
                at += n;
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mut conn = Connection::new(mio::net::UnixStream::from_std(a), Peer::default());
    let mut scratch = vec![0u8; scratch_len];
    let mut got = Vec::new();
    let mut err = None;
    'outer: for c in buf.chunks(chunk) {
        peer.write_all(c).unwrap();
        loop {
            match conn.read_messages(&mut scratch, &mut got) {
                Ok(ReadStatus::Data) => {}
                Ok(ReadStatus::WouldBlock) => break,
                Ok(ReadStatus::Eof) => unreachable!(),
                Err(ConnError::Protocol(e)) => {
                    err = Some(e);
                    break 'outer;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(got, want);
    assert_eq!(err, end);
});
