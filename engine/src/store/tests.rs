//! Store tests. Every test runs on both I/O engines.

use super::*;
use crate::io::{IoEngine, IoEngineChoice};
use std::os::unix::fs::FileExt;

fn engines() -> Vec<IoEngine> {
    vec![
        IoEngine::Std,
        IoEngine::new(IoEngineChoice::Uring).expect("io_uring must work on the test machines"),
    ]
}

async fn open(dir: &Path, engine: &IoEngine, pool_bytes: u64, size: u64) -> Arc<Replica> {
    let pool = Pool::open(dir, pool_bytes, engine.clone()).unwrap();
    pool.open_replica("r1", "vol1", size).await.unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn round_trips_aligned_and_unaligned_io_and_reads_zeros_where_unwritten() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        assert_eq!(r.read(8192, 4096).await.unwrap(), vec![0; 4096]);
        r.write(4096, pattern(1, 8192), false).await.unwrap();
        // Unaligned write across a block boundary: read-modify-write keeps the neighbours.
        r.write(4096 + 4000, pattern(2, 300), false).await.unwrap();
        let mut expect = pattern(1, 8192);
        expect[4000..4300].copy_from_slice(&pattern(2, 300));
        assert_eq!(r.read(4096, 8192).await.unwrap(), expect, "{engine:?}");
        assert_eq!(r.read(4096 + 3999, 302).await.unwrap(), expect[3999..4301]);
        assert_eq!(r.allocated_bytes(), 8192);
        // Out of range is refused.
        assert!(matches!(
            r.read((16 << 20) - 10, 20).await,
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            r.write(16 << 20, vec![1], false).await,
            Err(StoreError::OutOfRange { .. })
        ));
    }
}

#[tokio::test]
async fn corrupted_block_is_an_error_naming_volume_and_block_never_data() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        r.write(0, pattern(3, 16384), true).await.unwrap();
        // Flip one byte of block 2 behind the store's back.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("r1.data"))
            .unwrap();
        f.write_all_at(&[0xFF ^ pattern(3, 16384)[8192 + 17]], 8192 + 17)
            .unwrap();
        let err = r.read(0, 16384).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, StoreError::ChecksumMismatch { block: 2, .. }),
            "{msg}"
        );
        assert!(msg.contains("vol1") && msg.contains("block 2"), "{msg}");
        assert_eq!(r.checksum_errors(), 1);
        // Other blocks still read.
        assert_eq!(r.read(0, 8192).await.unwrap(), pattern(3, 16384)[..8192]);
        // The corruption is still detected after a clean reopen.
        r.close().await.unwrap();
        drop(r);
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        assert!(matches!(
            r.read(8192, 4096).await,
            Err(StoreError::ChecksumMismatch { block: 2, .. })
        ));
    }
}

#[tokio::test]
async fn unclean_stop_recovers_hot_regions_without_false_checksum_errors() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = open(dir.path(), &engine, 1 << 30, 64 << 20).await;
            r.write(0, pattern(4, 65536), false).await.unwrap();
            r.flush().await.unwrap();
            r.write(REGION_SIZE * 3, pattern(5, 4096), false)
                .await
                .unwrap();
            // No close: the checksums in memory are lost, as at kill -9.
        }
        // A write that reached the data file but not the checksums (a crash between the
        // two): bytes land in a hot region.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("r1.data"))
            .unwrap();
        f.write_all_at(&pattern(6, 4096), REGION_SIZE * 3).unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 64 << 20).await;
        assert_eq!(r.recovered_regions(), 2, "{engine:?}");
        assert_eq!(r.read(0, 65536).await.unwrap(), pattern(4, 65536));
        assert_eq!(
            r.read(REGION_SIZE * 3, 4096).await.unwrap(),
            pattern(6, 4096),
            "in-flight bytes may be new or old, never an error"
        );
        // Recovery checkpointed: a second unclean reopen has nothing to recompute.
        drop(r);
        let r = open(dir.path(), &engine, 1 << 30, 64 << 20).await;
        assert_eq!(r.recovered_regions(), 0);
        assert_eq!(r.read(0, 65536).await.unwrap(), pattern(4, 65536));
    }
}

#[tokio::test]
async fn activity_log_overflow_checkpoints_and_recovery_stays_correct() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let regions = AL_MAX_HOT_REGIONS as u64 + 40;
        let size = regions * REGION_SIZE;
        {
            let r = open(dir.path(), &engine, 1 << 30, size).await;
            for region in 0..regions {
                r.write(region * REGION_SIZE, pattern(region as u8, 4096), false)
                    .await
                    .unwrap();
            }
            assert!(r.al.hot_count() <= AL_MAX_HOT_REGIONS);
        }
        let r = open(dir.path(), &engine, 1 << 30, size).await;
        assert!(r.recovered_regions() <= AL_MAX_HOT_REGIONS as u64);
        for region in 0..regions {
            assert_eq!(
                r.read(region * REGION_SIZE, 4096).await.unwrap(),
                pattern(region as u8, 4096)
            );
        }
    }
}

#[tokio::test]
async fn full_pool_refuses_new_blocks_and_keeps_stored_data() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path(), &engine, 64 << 10, 16 << 20).await;
        r.write(0, pattern(7, 64 << 10), false).await.unwrap();
        let err = r.write(1 << 20, pattern(8, 8192), false).await.unwrap_err();
        assert!(matches!(err, StoreError::PoolFull { .. }), "{err}");
        assert_eq!(err.errno(), libc::ENOSPC);
        assert!(err.to_string().contains("ENOSPC"), "{err}");
        // Overwriting allocated blocks needs no space.
        r.write(4096, pattern(9, 4096), false).await.unwrap();
        let mut expect = pattern(7, 64 << 10);
        expect[4096..8192].copy_from_slice(&pattern(9, 4096));
        assert_eq!(r.read(0, 64 << 10).await.unwrap(), expect);
        assert_eq!(r.read(1 << 20, 8192).await.unwrap(), vec![0; 8192]);
        // Zeroing returns space, after which the write fits.
        r.write_zeroes(32 << 10, 32 << 10, false).await.unwrap();
        assert_eq!(r.allocated_bytes(), 32 << 10);
        r.write(1 << 20, pattern(8, 8192), false).await.unwrap();
        assert_eq!(r.read(32 << 10, 32 << 10).await.unwrap(), vec![0; 32 << 10]);
    }
}

#[tokio::test]
async fn write_zeroes_handles_partial_blocks() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        r.write(0, pattern(10, 20480), false).await.unwrap();
        r.write_zeroes(100, 12000, true).await.unwrap();
        let mut expect = pattern(10, 20480);
        expect[100..12100].fill(0);
        assert_eq!(r.read(0, 20480).await.unwrap(), expect);
        // Only block 1 (4096..8192) is covered whole and deallocated; blocks 0 and 2 are
        // partial and rewritten, blocks 3 and 4 untouched.
        assert_eq!(r.allocated_bytes(), 4 * 4096);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_writes_and_reads_never_see_false_checksum_errors() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 1 << 20).await;
        let mut tasks = Vec::new();
        for t in 0..8u8 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u32 {
                    let off = ((i * 7 + t as u32 * 13) % 64) as u64 * 1000;
                    if (i + t as u32).is_multiple_of(3) {
                        r.read(off, 6000).await.expect("no false checksum error");
                    } else {
                        r.write(off, vec![t; 6000], i.is_multiple_of(50))
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(r.checksum_errors(), 0);
        // Every block is whole: each 4 KiB block was last written by some writer, so its
        // checksum verifies.
        r.read(0, 1 << 20).await.unwrap();
    }
}

#[tokio::test]
async fn grows_and_refuses_to_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path(), &IoEngine::Std, 1 << 30, 4 << 20).await;
    r.resize(12 << 20).await.unwrap();
    r.write(10 << 20, pattern(11, 4096), false).await.unwrap();
    assert_eq!(r.read(10 << 20, 4096).await.unwrap(), pattern(11, 4096));
    assert!(matches!(
        r.resize(1 << 20).await,
        Err(StoreError::Shrink { .. })
    ));
}
