//! Tests of the wire protocol.

use super::*;

/// A tiny deterministic generator so the property tests need no crate.
struct XorShift(pub u64);
impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn header_bytes(tag: u64, code: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(&code.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::Noop,
        Request::get_blob(7, "sha256:abc").unwrap(),
        Request::get_blob(0, &"x".repeat(255)).unwrap(),
        Request::FetchRange {
            token: (3 << 32) | 1,
            start: 4096,
            count: u64::MAX,
        },
    ]
}

#[test]
fn every_request_round_trips() {
    for (i, req) in all_requests().into_iter().enumerate() {
        let mut buf = Vec::new();
        encode_request(&mut buf, 100 + i as u64, true, &req);
        assert_eq!(buf.len(), HEADER_SIZE + req.code().request_size() as usize);
        let (msg, used) = decode_request(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(msg.request, req);
        assert_eq!(msg.header.tag, 100 + i as u64);
        assert!(msg.header.need_reply());
        assert_eq!(msg.header.size, req.code().request_size());
        // Every strict prefix is incomplete, never an error.
        for cut in 0..buf.len() {
            assert_eq!(decode_request(&buf[..cut]), Ok(None), "cut {cut}");
        }
    }
}

#[test]
fn every_reply_round_trips_with_its_own_size() {
    let replies = [
        Reply::Noop,
        Reply::GetBlob {
            token: 1 << 32 | 5,
            base: 0,
            result: 0,
        },
        Reply::GetBlob {
            token: 0,
            base: 0,
            result: 2,
        },
        Reply::FetchRange {
            token: 9,
            count: 12345,
            result: 1,
        },
    ];
    for r in replies {
        let mut buf = Vec::new();
        encode_reply(&mut buf, 42, &r);
        let hb: &[u8; HEADER_SIZE] = buf[..HEADER_SIZE].try_into().unwrap();
        let h = Header::decode(hb).unwrap();
        assert_eq!(h.flags, VERSION | FLAG_REPLY);
        assert_eq!(h.size as usize, buf.len() - HEADER_SIZE);
        assert_eq!(h.size, r.code().reply_size());
        let (tag, back, used) = decode_reply(&buf).unwrap().unwrap();
        assert_eq!((tag, back, used), (42, r, buf.len()));
        assert!(decode_request(&buf).is_err(), "a reply is not a request");
    }
}

#[test]
fn byte_level_layout_matches_the_contract() {
    let mut buf = Vec::new();
    encode_request(
        &mut buf,
        0x0102,
        true,
        &Request::FetchRange {
            token: 0x0000_0001_0000_0002,
            start: 3,
            count: 4,
        },
    );
    let expected: Vec<u8> = [
        &[0x02, 0x01, 0, 0, 0, 0, 0, 0][..],
        &[2, 0, 0, 0],
        &[0x09, 0, 0, 0],
        &[24, 0, 0, 0],
        &[2, 0, 0, 0, 1, 0, 0, 0],
        &[3, 0, 0, 0, 0, 0, 0, 0],
        &[4, 0, 0, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(buf, expected);
}

#[test]
fn each_invalid_header_has_its_own_error() {
    let cases = [
        (header_bytes(1, 3, 1, 0), ProtocolError::UnknownCode(3)),
        (
            header_bytes(1, u32::MAX, 1, 0),
            ProtocolError::UnknownCode(u32::MAX),
        ),
        (header_bytes(0, 0, 1, 0), ProtocolError::ZeroTag),
        (
            header_bytes(1, 0, 1, 4097),
            ProtocolError::BodyTooLarge(4097),
        ),
        (header_bytes(1, 0, 0, 0), ProtocolError::BadVersion(0)),
        (header_bytes(1, 0, 2, 0), ProtocolError::BadVersion(2)),
        (header_bytes(1, 0, 3, 0), ProtocolError::BadVersion(3)),
        (
            header_bytes(1, 0, 1 | 0x10, 0),
            ProtocolError::ReservedFlags(0x10),
        ),
        (
            header_bytes(1, 0, 1 | 0x8000_0000, 0),
            ProtocolError::ReservedFlags(0x8000_0000),
        ),
    ];
    for (bytes, err) in cases {
        assert_eq!(decode_request(&bytes), Err(err.clone()));
        assert_eq!(decode_reply(&bytes), Err(err));
    }
}

#[test]
fn wrong_body_sizes_are_rejected() {
    for (code, good) in [(0u32, 0u32), (1, 260), (2, 24)] {
        for bad in [0, 1, 20, 23, 24, 25, 259, 260, 261, 4096] {
            if bad == good {
                continue;
            }
            let h = header_bytes(5, code, 1 | FLAG_NEED_REPLY, bad);
            match decode_request(&h) {
                Err(ProtocolError::WrongBodySize { expected, got, .. }) => {
                    assert_eq!((expected, got), (good, bad))
                }
                other => panic!("code {code} size {bad}: {other:?}"),
            }
        }
    }
    // The bug of the design we replace: FetchRange announced with 260.
    let h = header_bytes(5, 2, 1, 260);
    assert!(matches!(
        decode_request(&h),
        Err(ProtocolError::WrongBodySize { .. })
    ));
    // A reply with the request's size.
    let h = header_bytes(5, 2, 1 | FLAG_REPLY, 24);
    assert!(matches!(
        decode_reply(&h),
        Err(ProtocolError::WrongBodySize { .. })
    ));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; 8192];
    for round in 0..20_000 {
        let len = (rng.next() % 600) as usize;
        for b in &mut buf[..len] {
            *b = rng.next() as u8;
        }
        // Make valid-looking headers common so bodies get parsed too.
        if round % 2 == 0 && len >= HEADER_SIZE {
            buf[0] |= 1;
            buf[8..12].copy_from_slice(&((rng.next() % 3) as u32).to_le_bytes());
            buf[12..16].copy_from_slice(&(1 | (rng.next() as u32 & 0xc)).to_le_bytes());
            let size = [0u32, 20, 24, 260][(rng.next() % 4) as usize];
            buf[16..20].copy_from_slice(&size.to_le_bytes());
        }
        let mut at = 0;
        while let Ok(Some((_, used))) = decode_request(&buf[at..len]) {
            at += used;
        }
        let _ = decode_reply(&buf[..len]);
    }
}

#[test]
fn any_split_of_a_pipelined_stream_yields_the_same_messages() {
    let mut rng = XorShift(12345);
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for i in 0..300u64 {
        let req = all_requests()[(rng.next() % 4) as usize].clone();
        encode_request(&mut stream, i + 1, i % 3 != 0, &req);
        expected.push((i + 1, req));
    }
    for _ in 0..50 {
        // Feed the stream in random chunks, keeping the unconsumed tail.
        let mut pending = Vec::new();
        let mut got = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            let n = 1 + (rng.next() % 64) as usize;
            let end = (at + n).min(stream.len());
            pending.extend_from_slice(&stream[at..end]);
            at = end;
            let mut used_total = 0;
            while let Some((m, used)) = decode_request(&pending[used_total..]).unwrap() {
                got.push((m.header.tag, m.request));
                used_total += used;
            }
            pending.drain(..used_total);
        }
        assert!(pending.is_empty());
        assert_eq!(got, expected);
    }
}
