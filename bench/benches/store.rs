//! Criterion micro-benchmarks of the replica store's 4 KiB hot paths.
//!
//! For each I/O engine (std, and io_uring when the kernel allows it):
//! * `store_4k/write/<engine>`: one 4 KiB write at a random 4 KiB-aligned offset of a 256 MiB
//!   volume, without FUA (data to the page cache, checksum in memory), i.e. what an NBD
//!   `NBD_CMD_WRITE` costs the store once its payload has been received.
//! * `store_4k/read/<engine>`: one verified 4 KiB read at a random aligned offset.
//!
//! plus `crc32fast/4k`, the checksum every write computes and every read verifies.
//!
//! The volume is filled sequentially before measuring, so every write is an overwrite of an
//! allocated block in a hot activity-log region and every read goes to the engine (reads of
//! never-written blocks short-circuit to zeros and would measure nothing). The files live in
//! a temporary directory, and the working set (256 MiB) stays in the page cache, so these are
//! CPU-path costs, not device latencies.
//!
//! Run: `cargo bench -p tandem-bench --bench store` (about a minute).

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tandem_engine::io::{IoEngine, IoEngineChoice};
use tandem_engine::store::{Pool, Replica, BLOCK_SIZE};

/// Volume size: 64 activity-log regions, all hot after the fill.
const VOLUME_BYTES: u64 = 256 << 20;
/// Pool capacity: comfortably above the volume.
const POOL_BYTES: u64 = 1 << 30;
/// Chunk size of the sequential fill.
const FILL_CHUNK: usize = 1 << 20;

/// xorshift64*: deterministic, dependency-free offsets.
struct Offsets(Cell<u64>);

impl Offsets {
    fn new(seed: u64) -> Offsets {
        Offsets(Cell::new(seed | 1))
    }

    /// A random 4 KiB-aligned offset inside the volume.
    fn next(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0.set(x);
        let blocks = VOLUME_BYTES / BLOCK_SIZE as u64;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) * BLOCK_SIZE as u64
    }
}

/// A filled 256 MiB replica on a temporary pool, with the directory that holds it.
struct Fixture {
    _dir: tempfile::TempDir,
    replica: Arc<Replica>,
}

fn fixture(rt: &tokio::runtime::Runtime, engine: IoEngine) -> Fixture {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let replica = rt.block_on(async {
        let pool = Pool::open(dir.path(), POOL_BYTES, engine).expect("open the pool");
        let replica = pool
            .open_replica("bench", "bench", VOLUME_BYTES)
            .await
            .expect("open the replica");
        let chunk: Vec<u8> = (0..FILL_CHUNK).map(|i| (i % 251) as u8).collect();
        let mut off = 0u64;
        while off < VOLUME_BYTES {
            replica
                .write(off, chunk.clone(), false)
                .await
                .expect("fill the volume");
            off += FILL_CHUNK as u64;
        }
        replica
    });
    Fixture { _dir: dir, replica }
}

fn engines() -> Vec<IoEngine> {
    let mut v = vec![IoEngine::Std];
    match IoEngine::new(IoEngineChoice::Uring) {
        Ok(e) => v.push(e),
        Err(e) => eprintln!("io_uring is not available ({e}); benchmarking the std engine only"),
    }
    v
}

fn store_4k(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let payload: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 7 % 256) as u8).collect();

    let mut group = c.benchmark_group("store_4k");
    group
        .throughput(Throughput::Bytes(BLOCK_SIZE as u64))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    for engine in engines() {
        let name = engine.name();
        let fx = fixture(&rt, engine);
        let replica = &fx.replica;

        let offsets = Offsets::new(0x9e37_79b9_7f4a_7c15);
        group.bench_function(BenchmarkId::new("write", name), |b| {
            b.iter(|| {
                let off = offsets.next();
                rt.block_on(replica.write(off, payload.clone(), false))
                    .expect("write");
            })
        });

        let offsets = Offsets::new(0xd1b5_4a32_d192_ed03);
        group.bench_function(BenchmarkId::new("read", name), |b| {
            b.iter(|| {
                let off = offsets.next();
                let data = rt.block_on(replica.read(off, BLOCK_SIZE)).expect("read");
                black_box(data);
            })
        });

        rt.block_on(replica.close()).expect("close the replica");
    }
    group.finish();
}

fn crc32_4k(c: &mut Criterion) {
    let block: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 13 % 256) as u8).collect();
    let mut group = c.benchmark_group("crc32fast");
    group
        .throughput(Throughput::Bytes(BLOCK_SIZE as u64))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("4k", |b| b.iter(|| crc32fast::hash(black_box(&block))));
    group.finish();
}

criterion_group!(benches, store_4k, crc32_4k);
criterion_main!(benches);
