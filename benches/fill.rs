//! The fill path's per-request and per-byte work changed for the registry
//! pull (docs/PERFORMANCE.md): the readahead decision the reactor makes on
//! every FetchRange, and the blob's sha256 computed granule by granule as
//! fills land instead of in one pass at the end (the same bytes hashed once
//! either way; the point is that the work moves, not that it grows).

use blobmgr::cache::checksum::Checksum;
use blobmgr::cache::readahead::Readahead;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 1 << 30;

fn readahead(c: &mut Criterion) {
    let mut g = c.benchmark_group("readahead");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sequential_1MiB_reads", |b| {
        let mut ra = Readahead::default();
        let mut at = 0;
        b.iter(|| {
            let r = ra.on_request(at, at + MIB, SIZE, 4 * MIB, 64 * MIB);
            at = (at + MIB) % SIZE;
            black_box(r)
        });
    });
    g.bench_function("random_4KiB_reads", |b| {
        let mut ra = Readahead::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = x % (SIZE - 4096);
            black_box(ra.on_request(at, at + 4096, SIZE, 4 * MIB, 64 * MIB))
        });
    });
    g.finish();
}

fn checksum(c: &mut Criterion) {
    let size = 64 * MIB;
    let granule = MIB;
    let f = tempfile::tempfile().expect("temp file");
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    f.write_all_at(&data, 0).expect("write");
    let mut g = c.benchmark_group("checksum_64MiB");
    g.throughput(Throughput::Bytes(size));
    g.sample_size(10);
    g.bench_function("one_pass_at_completion", |b| {
        b.iter(|| {
            let c = Checksum::default();
            black_box(c.finish(&f, size).expect("hash"))
        });
    });
    g.bench_function("granule_by_granule_as_filled", |b| {
        b.iter(|| {
            let c = Checksum::default();
            for ready in 1..=size / granule {
                c.advance(&f, size, granule, |g| g < ready).expect("hash");
            }
            black_box(c.finish(&f, size).expect("hash"))
        });
    });
    g.finish();
}

criterion_group!(benches, readahead, checksum);
criterion_main!(benches);
