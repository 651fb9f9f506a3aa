//! Wire protocol: header and message encode/decode, and the decoder fed a
//! pipelined stream in small chunks the way a connection sees it.

use blobmgr::protocol::{self, Code, Header, Reply, Request, HEADER_SIZE};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn requests() -> Vec<(&'static str, Request)> {
    vec![
        ("noop", Request::Noop),
        (
            "get_blob",
            Request::get_blob(7, "sha256:0123456789abcdef").unwrap(),
        ),
        (
            "fetch_range",
            Request::FetchRange {
                token: 1 << 32 | 5,
                start: 1 << 20,
                count: 4096,
            },
        ),
    ]
}

fn header(c: &mut Criterion) {
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Elements(1));
    let h = Header {
        tag: 42,
        code: Code::FetchRange,
        flags: protocol::VERSION | protocol::FLAG_NEED_REPLY,
        size: protocol::FETCH_RANGE_REQUEST_SIZE,
    };
    let mut b = [0u8; HEADER_SIZE];
    h.encode(&mut b);
    g.bench_function("encode", |bn| {
        let mut out = [0u8; HEADER_SIZE];
        bn.iter(|| {
            black_box(&h).encode(&mut out);
            black_box(&out);
        })
    });
    g.bench_function("decode", |bn| {
        bn.iter(|| Header::decode(black_box(&b)).unwrap())
    });
    g.finish();
}

fn messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    for (name, req) in requests() {
        let mut wire = Vec::new();
        protocol::encode_request(&mut wire, 9, true, &req);
        g.bench_function(BenchmarkId::new("encode", name), |bn| {
            let mut out = Vec::with_capacity(512);
            bn.iter(|| {
                out.clear();
                protocol::encode_request(&mut out, 9, true, black_box(&req));
                black_box(&out);
            })
        });
        g.bench_function(BenchmarkId::new("decode", name), |bn| {
            bn.iter(|| protocol::decode_request(black_box(&wire)).unwrap().unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("reply");
    g.throughput(Throughput::Elements(1));
    let replies = [
        ("noop", Reply::Noop),
        (
            "get_blob",
            Reply::GetBlob {
                token: 1 << 32 | 1,
                base: 0,
                result: 0,
            },
        ),
        (
            "fetch_range",
            Reply::FetchRange {
                token: 1 << 32 | 1,
                count: 4096,
                result: 0,
            },
        ),
    ];
    for (name, r) in replies {
        let mut wire = Vec::new();
        protocol::encode_reply(&mut wire, 9, &r);
        g.bench_function(BenchmarkId::new("encode", name), |bn| {
            let mut out = Vec::with_capacity(64);
            bn.iter(|| {
                out.clear();
                protocol::encode_reply(&mut out, 9, black_box(&r));
                black_box(&out);
            })
        });
        g.bench_function(BenchmarkId::new("decode", name), |bn| {
            bn.iter(|| protocol::decode_reply(black_box(&wire)).unwrap().unwrap())
        });
    }
    g.finish();
}

/// 1000 pipelined requests (mostly FetchRange and Noop, some GetBlob) fed
/// to the decoder in chunks of a given size, keeping the unconsumed tail as
/// the connection does.
fn stream(c: &mut Criterion) {
    let reqs = requests();
    let mut wire = Vec::new();
    let n = 1000u64;
    for i in 0..n {
        let r = &reqs[[0, 2, 2, 0, 2, 1, 2, 0][(i % 8) as usize]].1;
        protocol::encode_request(&mut wire, i + 1, true, r);
    }
    let mut g = c.benchmark_group("decode_stream");
    g.throughput(Throughput::Elements(n));
    for chunk in [7usize, 64, 1500, 65536] {
        g.bench_with_input(BenchmarkId::from_parameter(chunk), &chunk, |bn, &chunk| {
            let mut partial: Vec<u8> = Vec::with_capacity(8192);
            bn.iter(|| {
                let mut got = 0u64;
                for piece in wire.chunks(chunk) {
                    let buf: &[u8] = if partial.is_empty() {
                        piece
                    } else {
                        partial.extend_from_slice(piece);
                        &partial
                    };
                    let mut used = 0;
                    while let Some((m, k)) = protocol::decode_request(&buf[used..]).unwrap() {
                        black_box(&m);
                        used += k;
                        got += 1;
                    }
                    if partial.is_empty() {
                        partial.extend_from_slice(&piece[used..]);
                    } else {
                        partial.drain(..used);
                    }
                }
                assert_eq!(got, n);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, header, messages, stream);
criterion_main!(benches);
