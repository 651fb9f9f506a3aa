//! A fuzzer for the request decoder and the connection state machine that
//! runs on stable Rust, in CI, for a bounded number of cases.
//!
//! Inputs are valid request streams mutated the way coverage-guided fuzzers
//! do (bit flips, interesting values in header fields, truncations, inserts,
//! deletions, splices of another stream, duplicated ranges) plus pure random
//! bytes. Properties checked for each input:
//!
//! * `protocol::decode_request` never panics; every message it accepts
//!   re-encodes to exactly the bytes it consumed; any shorter prefix of a
//!   message decodes to "incomplete"; an error is decided by the 20 header
//!   bytes alone (the same error for every prefix that holds them).
//! * A `connection::Connection` over a real socketpair, fed the same bytes in
//!   random chunks and read with random scratch sizes, never panics and
//!   yields exactly the messages of a one-shot decode up to the first error,
//!   then reports that error; if the stream ends on a message boundary it
//!   keeps no input buffer.
//!
//! `cargo test --test fuzz_decoder` runs the bounded version (200,000
//! decoder cases, 20,000 connection cases). The long version is ignored:
//! `BLOBMGR_FUZZ_ITERS=20000000 BLOBMGR_FUZZ_SEED=1 cargo test --release
//! --test fuzz_decoder -- --ignored --nocapture`. A failure prints the case
//! seed; `BLOBMGR_FUZZ_CASE=<seed>` replays that one case.

mod common;

use blobmgr::connection::{ConnError, Connection, Peer, ReadStatus};
use blobmgr::protocol::{self, Message, ProtocolError, Request, HEADER_SIZE};
use common::{env_u64, header, mix, test_seed, Rng};
use std::io::Write;
use std::time::Instant;

/// A nonzero generator state from `x`.
fn splitmix(x: u64) -> u64 {
    mix(x) | 1
}

const ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-";

fn random_request(rng: &mut Rng) -> Request {
    match rng.below(3) {
        0 => Request::Noop,
        1 => {
            let mut id = [0u8; protocol::BLOB_ID_FIELD];
            match rng.below(4) {
                // A plausible id.
                0 | 1 => {
                    for b in id.iter_mut().take(1 + rng.below(80) as usize) {
                        *b = ID_CHARS[rng.below(ID_CHARS.len() as u64) as usize];
                    }
                }
                // Random bytes, maybe with a NUL somewhere.
                2 => {
                    for b in id.iter_mut() {
                        *b = rng.next() as u8;
                    }
                }
                // No NUL at all.
                _ => id.fill(b'a'),
            }
            Request::GetBlob {
                generation: rng.next() as u32,
                id,
            }
        }
        _ => Request::FetchRange {
            token: rng.next(),
            start: interesting_u64(rng),
            count: interesting_u64(rng),
        },
    }
}

fn interesting_u64(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => [0, 1, u64::MAX, u64::MAX - 1, 1 << 32, 1 << 63][rng.below(6) as usize],
        1 => rng.below(1 << 24),
        _ => rng.next(),
    }
}

fn valid_stream(rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..rng.below(12) {
        let tag = rng.next().max(1);
        protocol::encode_request(&mut v, tag, rng.below(4) != 0, &random_request(rng));
    }
    v
}

const INTERESTING_U32: [u32; 12] = [0, 1, 2, 3, 4, 5, 8, 9, 24, 260, 4096, 4097];

/// Applies 1 to 4 random mutations to `buf`.
fn mutate(rng: &mut Rng, buf: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(4) {
        let len = buf.len() as u64;
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len) as usize;
                buf[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len) as usize;
                buf[i] = rng.next() as u8;
            }
            // An interesting value over a header field of some message
            // (code at +8, flags at +12, size at +16 from a 20-byte boundary
            // or anywhere).
            2 if len >= 4 => {
                let field = [8u64, 12, 16][rng.below(3) as usize];
                let base = if rng.below(2) == 0 {
                    rng.below(len / 20 + 1) * 20 + field
                } else {
                    rng.below(len)
                };
                let v = if rng.below(4) == 0 {
                    u32::MAX - rng.below(3) as u32
                } else {
                    INTERESTING_U32[rng.below(INTERESTING_U32.len() as u64) as usize]
                        | if rng.below(3) == 0 { 0x8 } else { 0 }
                };
                for (k, b) in v.to_le_bytes().iter().enumerate() {
                    if let Some(x) = buf.get_mut(base as usize + k) {
                        *x = *b;
                    }
                }
            }
            3 => buf.truncate(rng.below(len + 1) as usize),
            4 => {
                let at = rng.below(len + 1) as usize;
                let n = rng.below(64) as usize;
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                buf.splice(at..at, ins);
            }
            5 if len > 0 => {
                let a = rng.below(len) as usize;
                let b = a + rng.below(len - a as u64 + 1) as usize;
                buf.drain(a..b);
            }
            6 if !other.is_empty() => {
                let a = rng.below(other.len() as u64) as usize;
                let b = a + rng.below((other.len() - a) as u64 + 1) as usize;
                let at = rng.below(len + 1) as usize;
                buf.splice(at..at, other[a..b].iter().copied());
            }
            7 if len > 0 => {
                let a = rng.below(len) as usize;
                let b = a + rng.below((len - a as u64).min(600) + 1) as usize;
                let dup = buf[a..b].to_vec();
                let at = rng.below(len + 1) as usize;
                buf.splice(at..at, dup);
            }
            // Zero the tag of some message.
            8 if len >= 8 => {
                let base = (rng.below(len / 20 + 1) * 20) as usize;
                for x in buf.iter_mut().skip(base).take(8) {
                    *x = 0;
                }
            }
            _ => {
                let n = rng.below(8) as usize;
                buf.extend((0..n).map(|_| rng.next() as u8));
            }
        }
    }
}

/// One fuzz input: usually a mutated valid stream, sometimes raw noise.
fn input(rng: &mut Rng) -> Vec<u8> {
    match rng.below(20) {
        0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        1 => valid_stream(rng),
        _ => {
            let mut v = valid_stream(rng);
            let other = valid_stream(rng);
            mutate(rng, &mut v, &other);
            v
        }
    }
}

/// How a one-shot decode of a whole buffer ended.
#[derive(Debug, PartialEq)]
enum End {
    /// The remaining bytes (maybe none) are an incomplete message.
    Incomplete {
        tail: usize,
    },
    Error(ProtocolError),
}

/// Decodes `buf` in one go, checking the decoder's per-message properties.
fn one_shot(buf: &[u8], rng: &mut Rng) -> (Vec<Message>, End) {
    let mut msgs = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        match protocol::decode_request(rest) {
            Ok(Some((m, n))) => {
                assert!(n >= HEADER_SIZE && n <= rest.len());
                assert_eq!(n, HEADER_SIZE + m.header.size as usize);
                assert_eq!(m.header.size, m.request.code().request_size());
                assert_eq!(m.header.code, m.request.code());
                assert!(m.header.tag != 0);
                // Re-encoding gives back exactly the consumed bytes.
                let mut again = Vec::new();
                protocol::encode_request(
                    &mut again,
                    m.header.tag,
                    m.header.need_reply(),
                    &m.request,
                );
                assert_eq!(again, &rest[..n], "re-encoding differs");
                // Any shorter prefix is incomplete.
                let k = rng.below(n as u64) as usize;
                assert_eq!(protocol::decode_request(&rest[..k]), Ok(None));
                assert_eq!(
                    protocol::decode_request(&rest[..n]),
                    Ok(Some((m.clone(), n)))
                );
                msgs.push(m);
                at += n;
            }
            Ok(None) => {
                // Incomplete: so is every prefix.
                let k = rng.below(rest.len() as u64 + 1) as usize;
                assert_eq!(protocol::decode_request(&rest[..k]), Ok(None));
                return (msgs, End::Incomplete { tail: rest.len() });
            }
            Err(e) => {
                // Decided by the header alone, as soon as it is complete.
                assert!(rest.len() >= HEADER_SIZE);
                let k = HEADER_SIZE + rng.below((rest.len() - HEADER_SIZE) as u64 + 1) as usize;
                assert_eq!(protocol::decode_request(&rest[..k]), Err(e.clone()));
                let k = rng.below(HEADER_SIZE as u64) as usize;
                assert_eq!(protocol::decode_request(&rest[..k]), Ok(None));
                return (msgs, End::Error(e));
            }
        }
    }
}

/// Feeds `buf` through a `Connection` over a socketpair in random chunks and
/// compares with the one-shot decode.
fn check_connection(buf: &[u8], rng: &mut Rng, expect: &(Vec<Message>, End)) {
    let (a, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mut conn = Connection::new(mio::net::UnixStream::from_std(a), Peer::default());
    let mut msgs = Vec::new();
    let mut scratch = vec![0u8; 9000];
    let mut at = 0;
    let mut error = None;
    'feed: loop {
        if at < buf.len() {
            let max = if rng.below(4) == 0 { 5000 } else { 64 };
            let k = (1 + rng.below(max) as usize).min(buf.len() - at);
            peer.write_all(&buf[at..at + k]).unwrap();
            at += k;
        } else {
            drop(peer);
            break;
        }
        loop {
            let max = if rng.below(3) == 0 { 9000 } else { 40 };
            let s = 1 + rng.below(max) as usize;
            match conn.read_messages(&mut scratch[..s], &mut msgs) {
                Ok(ReadStatus::Data) => {}
                Ok(ReadStatus::WouldBlock) => break,
                Ok(ReadStatus::Eof) => panic!("EOF while the writer is open"),
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
            assert!(
                conn.buffered_bytes() <= 2 * (protocol::MAX_MESSAGE_SIZE + s),
                "input buffer of {} bytes",
                conn.buffered_bytes()
            );
        }
    }
    if error.is_none() {
        // The writer is closed: read what is left, then EOF.
        loop {
            let s = 1 + rng.below(5000) as usize;
            match conn.read_messages(&mut scratch[..s], &mut msgs) {
                Ok(ReadStatus::Data) => {}
                Ok(ReadStatus::WouldBlock) => panic!("WouldBlock after the writer closed"),
                Ok(ReadStatus::Eof) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
    }
    let (want_msgs, end) = expect;
    assert_eq!(&msgs, want_msgs, "messages differ from a one-shot decode");
    match (end, error) {
        (End::Error(want), Some(ConnError::Protocol(got))) => assert_eq!(&got, want),
        (End::Error(want), other) => panic!("expected error {want:?}, connection said {other:?}"),
        (End::Incomplete { tail }, None) => {
            if *tail == 0 {
                assert_eq!(conn.buffered_bytes(), 0, "idle connection keeps a buffer");
            }
        }
        (End::Incomplete { .. }, Some(e)) => panic!("connection error {e} on a valid stream"),
    }
}

/// Prints the case seed if the case panics.
struct CaseGuard(u64);

impl Drop for CaseGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "fuzz case failed: replay with BLOBMGR_FUZZ_CASE={:#x} cargo test --test fuzz_decoder",
                self.0
            );
        }
    }
}

struct Totals {
    cases: u64,
    messages: u64,
    errors: u64,
    conn_cases: u64,
}

fn run_case(case: u64, with_connection: bool, t: &mut Totals) {
    let _g = CaseGuard(case);
    // Exactly the printed case, whatever BLOBMGR_TEST_SEED says.
    let mut rng = Rng::exact(case);
    let buf = input(&mut rng);
    let expect = one_shot(&buf, &mut rng);
    t.cases += 1;
    t.messages += expect.0.len() as u64;
    if matches!(expect.1, End::Error(_)) {
        t.errors += 1;
    }
    if with_connection {
        check_connection(&buf, &mut rng, &expect);
        t.conn_cases += 1;
    }
}

/// Runs `iters` cases from `seed`; every `conn_every`-th also goes through a
/// Connection.
fn fuzz(seed: u64, iters: u64, conn_every: u64) -> Totals {
    let mut t = Totals {
        cases: 0,
        messages: 0,
        errors: 0,
        conn_cases: 0,
    };
    if let Some(case) = env_u64("BLOBMGR_FUZZ_CASE") {
        run_case(case, true, &mut t);
        return t;
    }
    let start = Instant::now();
    for i in 0..iters {
        run_case(splitmix(seed ^ splitmix(i)), i % conn_every == 0, &mut t);
    }
    eprintln!(
        "fuzz_decoder: seed {seed}: {} cases ({} through a Connection), {} messages decoded, \
         {} inputs ended in a protocol error, {:.1} s",
        t.cases,
        t.conn_cases,
        t.messages,
        t.errors,
        start.elapsed().as_secs_f64()
    );
    t
}

#[test]
fn fuzz_decoder_and_connection_bounded() {
    // BLOBMGR_FUZZ_SEED, else the run's BLOBMGR_TEST_SEED (mixed), else 0x5eed.
    let seed = env_u64("BLOBMGR_FUZZ_SEED").unwrap_or(match test_seed() {
        0 => 0x5eed,
        s => mix(s),
    });
    let t = fuzz(seed, 200_000, 10);
    if env_u64("BLOBMGR_FUZZ_CASE").is_none() {
        // The generator reaches both outcomes in bulk.
        assert!(t.messages > 100_000, "only {} messages decoded", t.messages);
        assert!(t.errors > 50_000, "only {} protocol errors", t.errors);
    }
}

/// Every mutated header field value is classified the same by the decoder
/// and the connection for each single-message stream: an exhaustive pass over
/// the code, flags and size values the mutator favours.
#[test]
fn header_fields_exhaustive() {
    let mut rng = Rng::new(77);
    for code in [0u32, 1, 2, 3, 4, 0x8000_0000, u32::MAX] {
        for flags in [0u32, 1, 2, 3, 5, 9, 13, 0x10 | 9, 0x8000_0009, u32::MAX] {
            for size in [0u32, 1, 19, 20, 24, 259, 260, 261, 4096, 4097, u32::MAX] {
                for tag in [0u64, 1, u64::MAX] {
                    let mut v = header(tag, code, flags, size);
                    v.extend(std::iter::repeat_n(0u8, size.min(4200) as usize));
                    let expect = one_shot(&v, &mut rng);
                    let valid = code < 3
                        && tag != 0
                        && flags & 3 == 1
                        && flags & !0xf == 0
                        && flags & 4 == 0
                        && size == [0, 260, 24][code as usize];
                    assert_eq!(
                        expect.0.len() == 1,
                        valid,
                        "code {code} flags {flags:#x} size {size} tag {tag}: {:?}",
                        expect.1
                    );
                    check_connection(&v, &mut rng, &expect);
                }
            }
        }
    }
}

#[test]
#[ignore = "long-running fuzz: BLOBMGR_FUZZ_ITERS / BLOBMGR_FUZZ_SEED"]
fn fuzz_decoder_and_connection_long() {
    let seed = env_u64("BLOBMGR_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let iters = env_u64("BLOBMGR_FUZZ_ITERS").unwrap_or(10_000_000);
    fuzz(seed, iters, 10);
}
