//! Criterion micro-benchmarks of the wire codec (`tandem_engine::wire::frame`): what every
//! replicated write costs in framing before it reaches a socket, and after it leaves one.
//!
//! * `wire_frame/encode/<size>`: `frame::encode` of a `Write` request with a 4 KiB or 1 MiB
//!   payload into a reused buffer (header, crc32 over header and payload, payload copy).
//! * `wire_frame/encode_header/<size>`: `frame::encode_header` alone, as the wire client
//!   does it (the payload is written from its own buffer, not copied).
//! * `wire_frame/decode/<size>`: `frame::decode` of one encoded frame (header checks, crc32
//!   verification, payload split without copying).
//!
//! Run: `cargo bench -p tandem-bench --bench wire` (about 30 s).

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tandem_engine::wire::frame::{self, Frame, Kind};

/// Payload sizes: one 4 KiB block, and the 1 MiB of a sequential write.
const SIZES: [usize; 2] = [4096, 1 << 20];

fn write_frame(len: usize) -> Frame {
    let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let mut f = Frame::request(
        Kind::Write,
        0x1234_5678,
        7,
        1 << 30,
        len as u32,
        Bytes::from(payload),
    );
    f.request_id = 42;
    f
}

fn wire_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire_frame");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for len in SIZES {
        let f = write_frame(len);
        group.throughput(Throughput::Bytes(f.encoded_len() as u64));
        let mut buf = BytesMut::with_capacity(f.encoded_len());
        group.bench_function(BenchmarkId::new("encode", len), |b| {
            b.iter(|| {
                buf.clear();
                frame::encode(black_box(&f), &mut buf);
                black_box(buf.len());
            })
        });
        group.bench_function(BenchmarkId::new("encode_header", len), |b| {
            b.iter(|| black_box(frame::encode_header(black_box(&f))))
        });
        let mut encoded = BytesMut::new();
        frame::encode(&f, &mut encoded);
        let encoded = encoded.freeze();
        group.bench_function(BenchmarkId::new("decode", len), |b| {
            b.iter(|| {
                let mut src = BytesMut::from(&encoded[..]);
                let got = frame::decode(&mut src)
                    .expect("a valid frame")
                    .expect("a whole frame");
                black_box(got);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, wire_frame);
criterion_main!(benches);
