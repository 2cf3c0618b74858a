//! The local-store baseline: tandem-engine's replica store, driven in this process with no
//! network and no NBD. Same volume size, same precondition (a sequential fill) and the same
//! workloads as the NBD targets, on a tokio runtime with as many workers as tandemd has
//! (one per CPU). Its QD1 write p50 is the "local store write" term of the model.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_engine::io::{IoEngine, IoEngineChoice};
use tandem_engine::store::{Pool, Replica, BLOCK_SIZE};

use crate::stats::Percentiles;
use crate::workload::Workload;

/// Pool capacity over the volume size (the pool needs room for its metadata).
const POOL_HEADROOM_BYTES: u64 = 64 << 20;
/// Chunk size of the sequential fill.
const FILL_CHUNK: usize = 1 << 20;

/// What one local job measured.
#[derive(Clone, Debug)]
pub struct LocalResult {
    pub lat: Percentiles,
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub flush_p50_us: Option<f64>,
}

/// A filled replica on its own pool.
pub struct LocalStore {
    rt: tokio::runtime::Runtime,
    replica: Arc<Replica>,
    size_bytes: u64,
}

/// The engine named by `--io-engine`.
pub fn engine(name: &str) -> Result<IoEngine> {
    let choice = match name {
        "std" => IoEngineChoice::Std,
        "uring" => IoEngineChoice::Uring,
        _ => IoEngineChoice::Auto,
    };
    IoEngine::new(choice).with_context(|| format!("open the {name} I/O engine"))
}

impl LocalStore {
    /// Opens a pool in `dir` and a replica of `size_mib`, and fills it sequentially.
    pub fn open(dir: &Path, size_mib: u64, io_engine: &str) -> Result<LocalStore> {
        std::fs::create_dir_all(dir)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("build the tokio runtime")?;
        let size_bytes = size_mib << 20;
        let engine = engine(io_engine)?;
        let replica = rt.block_on(async {
            let pool = Pool::open(dir, size_bytes + POOL_HEADROOM_BYTES, engine)
                .context("open the local pool")?;
            let replica = pool
                .open_replica("local", "local", size_bytes)
                .await
                .context("open the local replica")?;
            let chunk: Vec<u8> = (0..FILL_CHUNK).map(|i| (i % 251) as u8).collect();
            let mut off = 0u64;
            while off < size_bytes {
                replica
                    .write(off, chunk.clone(), false)
                    .await
                    .context("fill the local replica")?;
                off += FILL_CHUNK as u64;
            }
            replica.flush().await.context("flush the local replica")?;
            anyhow::Ok(replica)
        })?;
        Ok(LocalStore {
            rt,
            replica,
            size_bytes,
        })
    }

    /// Runs `w` for `ramp + runtime`; only operations that start after the ramp count.
    pub fn run(&self, w: Workload, runtime: Duration, ramp: Duration) -> Result<LocalResult> {
        let replica = self.replica.clone();
        let size = self.size_bytes;
        self.rt.block_on(async move {
            let start = Instant::now();
            let measure_from = start + ramp;
            let end = measure_from + runtime;
            let next_seq = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for t in 0..w.qd() {
                let replica = replica.clone();
                let next_seq = next_seq.clone();
                tasks.push(tokio::spawn(async move {
                    worker(replica, w, size, t as u64, next_seq, measure_from, end).await
                }));
            }
            let (mut lat, mut flush) = (Vec::new(), Vec::new());
            for t in tasks {
                let (l, f) = t.await.context("local worker panicked")??;
                lat.extend(l);
                flush.extend(f);
            }
            let ops = lat.len() as u64;
            Ok(LocalResult {
                lat: Percentiles::from_ns(lat),
                ops,
                bytes: ops * w.block_bytes() as u64,
                elapsed: runtime,
                flush_p50_us: (!flush.is_empty()).then(|| Percentiles::from_ns(flush).p50_us),
            })
        })
    }

    pub fn close(self) -> Result<()> {
        self.rt
            .block_on(self.replica.close())
            .context("close the local replica")
    }
}

/// xorshift64*: a cheap per-worker offset sequence.
fn next_random(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// One queue slot: issues operations back to back until `end`; returns the latencies (ns)
/// of those that started after `measure_from`, and of their flushes.
async fn worker(
    replica: Arc<Replica>,
    w: Workload,
    size: u64,
    slot: u64,
    next_seq: Arc<AtomicU64>,
    measure_from: Instant,
    end: Instant,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let bs = w.block_bytes() as u64;
    let blocks = size / BLOCK_SIZE as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (slot + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
    let payload: Vec<u8> = (0..bs).map(|i| (i * 7 % 256) as u8).collect();
    let (mut lat, mut flush) = (Vec::new(), Vec::new());
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        let off = if w.is_random() {
            (next_random(&mut rng) % blocks) * BLOCK_SIZE as u64
        } else {
            (next_seq.fetch_add(1, Ordering::Relaxed) * bs) % size
        };
        if w.is_write() {
            replica
                .write(off, payload.clone(), false)
                .await
                .context("local write")?;
        } else {
            let data = replica.read(off, bs as usize).await.context("local read")?;
            std::hint::black_box(data);
        }
        let done = Instant::now();
        if w.fsync() {
            replica.flush().await.context("local flush")?;
            if t >= measure_from {
                flush.push(done.elapsed().as_nanos() as u64);
            }
        }
        if t >= measure_from {
            lat.push((done - t).as_nanos() as u64);
        }
    }
    Ok((lat, flush))
}
