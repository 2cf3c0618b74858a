//! Store tests. Every test runs on both I/O engines.

use super::tests_support::*;
use super::*;
use crate::io::IoEngine;
use std::os::unix::fs::FileExt;
use std::time::Duration;

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

/// Copies a replica's three files, as the disk holds them at a power loss (the test never
/// relies on unsynced writes being lost, only on what is synced being there).
fn copy_replica_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for ext in ["data", "crc", "al"] {
        std::fs::copy(from.join(format!("r1.{ext}")), to.join(format!("r1.{ext}"))).unwrap();
    }
}

/// F2: a write that finds its region hot in memory while that region's record is not yet
/// durable must wait for the record. Otherwise it is acked (FUA) before any durable record
/// says its checksums may be stale, and after a power loss it reads as a checksum error.
#[tokio::test]
async fn write_to_a_region_whose_hot_record_is_not_durable_waits_for_it() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(&dir.path().join("pool"), &engine, 1 << 30, 64 << 20).await;
        let (release, hold) = tokio::sync::watch::channel(false);
        *r.al.hold_records.lock().unwrap() = Some(hold);
        // Write A makes region 2 hot; its record write is held.
        let ra = r.clone();
        let a =
            tokio::spawn(async move { ra.write(REGION_SIZE * 2, pattern(1, 4096), false).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Write B, to another block of the same region, with FUA.
        let rb = r.clone();
        let mut b = tokio::spawn(async move {
            rb.write(REGION_SIZE * 2 + 8 * 4096, pattern(2, 4096), true)
                .await
        });
        let early = tokio::time::timeout(Duration::from_millis(500), &mut b).await;
        let b_acked = early.is_ok();
        // The power is lost now: whatever B's ack promised must be on disk.
        copy_replica_files(&dir.path().join("pool"), &dir.path().join("after-loss"));
        release.send_replace(true);
        a.await.unwrap().unwrap();
        match early {
            Ok(res) => res.unwrap().unwrap(),
            Err(_) => b.await.unwrap().unwrap(),
        }
        let lost = open(&dir.path().join("after-loss"), &engine, 1 << 30, 64 << 20).await;
        let read = lost.read(REGION_SIZE * 2 + 8 * 4096, 4096).await;
        if b_acked {
            assert!(
                read.as_ref().is_ok_and(|d| *d == pattern(2, 4096)),
                "{engine:?}: a FUA write acked before its hot record was durable: {:?}",
                read.err()
            );
        } else {
            // Not acked at the loss: old or new bytes, never an error.
            let got = read.unwrap();
            assert!(
                got == pattern(2, 4096) || got == vec![0; 4096],
                "{engine:?}"
            );
        }
        // And after the record: both writes are durable and read back.
        r.flush().await.unwrap();
        copy_replica_files(&dir.path().join("pool"), &dir.path().join("after-flush"));
        let later = open(&dir.path().join("after-flush"), &engine, 1 << 30, 64 << 20).await;
        assert_eq!(
            later.read(REGION_SIZE * 2, 4096).await.unwrap(),
            pattern(1, 4096)
        );
        assert_eq!(
            later.read(REGION_SIZE * 2 + 8 * 4096, 4096).await.unwrap(),
            pattern(2, 4096)
        );
    }
}

/// F2, the error path: a record write that fails leaves its region not hot, so the next
/// write to it writes a record again instead of taking the fast path; and no region is hot
/// in memory before its record is durable.
#[tokio::test]
async fn failed_hot_record_leaves_the_region_cold() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path(), &IoEngine::Std, 1 << 30, 64 << 20).await;
    r.al.fail_records
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(r.write(REGION_SIZE, pattern(1, 4096), false).await.is_err());
    assert_eq!(r.al.hot_count(), 0, "a failed record left its region hot");
    r.al.fail_records
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let (release, hold) = tokio::sync::watch::channel(false);
    *r.al.hold_records.lock().unwrap() = Some(hold);
    let ra = r.clone();
    let a = tokio::spawn(async move { ra.write(REGION_SIZE, pattern(1, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        r.al.hot_count(),
        0,
        "a region is hot before its record is durable"
    );
    release.send_replace(true);
    a.await.unwrap().unwrap();
    assert_eq!(r.al.hot_count(), 1);
}

/// F3: a zeroing that spans more than the activity log's capacity (the second 4 GiB chunk
/// of a whole-device discard spans 1025 regions) must not produce a record that recovery
/// rejects; a later write in those regions must read back after kill -9.
#[tokio::test]
async fn zeroing_more_regions_than_the_activity_log_holds_survives_a_crash() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let size = 9u64 << 30;
        let chunk = (4u64 << 30) - 4096;
        {
            let r = open(dir.path(), &engine, 1 << 30, size).await;
            r.write_zeroes(chunk, chunk, false).await.unwrap();
            r.write(5 << 30, pattern(7, 4096), false).await.unwrap();
            r.flush().await.unwrap();
            assert!(r.al.hot_count() <= AL_MAX_HOT_REGIONS);
            // No close: kill -9.
        }
        let r = open(dir.path(), &engine, 1 << 30, size).await;
        assert_eq!(
            r.read(5 << 30, 4096).await.unwrap(),
            pattern(7, 4096),
            "{engine:?}"
        );
    }
}
