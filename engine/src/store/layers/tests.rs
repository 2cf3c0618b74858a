//! Snapshot layer tests: views, merges, accounting and every crash point of a seal and a
//! merge, on both I/O engines; and a model-based run of random operations.

use super::super::tests_support::*;
use super::*;
use std::os::unix::fs::FileExt;

const BS: usize = BLOCK_SIZE;

fn blocks(seed: u8, n: usize) -> Vec<u8> {
    pattern(seed, n * BS)
}

#[tokio::test]
async fn a_snapshot_keeps_its_view_while_the_head_changes() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        r.write(0, blocks(1, 8), false).await.unwrap();
        assert!(r.seal("s1").await.unwrap());
        assert!(!r.seal("s1").await.unwrap(), "sealing again is a no-op");
        // Overwrite half of it, one partial block included, and zero a block.
        r.write(4 * BS as u64, blocks(2, 8), false).await.unwrap();
        r.write(10, vec![0xAB; 100], false).await.unwrap();
        r.write_zeroes(BS as u64, BS as u64, false).await.unwrap();
        let mut head = blocks(1, 8);
        head.resize(12 * BS, 0);
        head[4 * BS..12 * BS].copy_from_slice(&blocks(2, 8));
        head[10..110].fill(0xAB);
        head[BS..2 * BS].fill(0);
        assert_eq!(r.read(0, 12 * BS).await.unwrap(), head, "{engine:?}");
        let mut snap = blocks(1, 8);
        snap.resize(12 * BS, 0);
        assert_eq!(r.read_snapshot("s1", 0, 12 * BS).await.unwrap(), snap);
        assert_eq!(
            r.read_snapshot("s1", 7, 5000).await.unwrap(),
            snap[7..5007].to_vec()
        );
        // Checksums (what replicas compare) are of the visible bytes.
        let sums = r.checksums(0, 12 * BS as u64).await.unwrap();
        let want: Vec<u64> = head
            .chunks(BS)
            .map(|b| {
                if b.iter().all(|x| *x == 0) {
                    zero_block_digest()
                } else {
                    block_digest(b)
                }
            })
            .collect();
        assert_eq!(sums, want);
        let snaps = r.snapshots().await;
        assert_eq!(snaps.len(), 1);
        assert_eq!(snaps[0].snapshot, "s1");
        assert_eq!(snaps[0].allocated_bytes, 8 * BS as u64);
        // Head: 8 blocks of the second write, block 0 (partial write) and block 1 (zeros
        // over a block the snapshot holds).
        assert_eq!(r.allocated_bytes(), (8 + 10) * BS as u64);
        assert!(matches!(
            r.read_snapshot("nope", 0, 10).await,
            Err(StoreError::NoSuchSnapshot { .. })
        ));
        assert!(matches!(
            r.read_snapshot("s1", 16 << 20, 1).await,
            Err(StoreError::OutOfRange { .. })
        ));
    }
}

#[tokio::test]
async fn snapshots_survive_a_clean_reopen_and_a_kill() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
            r.write(0, blocks(1, 4), false).await.unwrap();
            r.seal("s1").await.unwrap();
            r.write(0, blocks(2, 2), false).await.unwrap();
            r.close().await.unwrap();
        }
        {
            let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
            assert_eq!(
                r.read_snapshot("s1", 0, 4 * BS).await.unwrap(),
                blocks(1, 4)
            );
            let mut head = blocks(1, 4);
            head[..2 * BS].copy_from_slice(&blocks(2, 2));
            assert_eq!(r.read(0, 4 * BS).await.unwrap(), head);
            assert_eq!(r.allocated_bytes(), 6 * BS as u64);
            r.seal("s2").await.unwrap();
            r.write(3 * BS as u64, blocks(3, 1), false).await.unwrap();
            // No close: as at kill -9.
        }
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        assert_eq!(
            r.read_snapshot("s1", 0, 4 * BS).await.unwrap(),
            blocks(1, 4)
        );
        let mut s2 = blocks(1, 4);
        s2[..2 * BS].copy_from_slice(&blocks(2, 2));
        assert_eq!(r.read_snapshot("s2", 0, 4 * BS).await.unwrap(), s2);
        s2[3 * BS..].copy_from_slice(&blocks(3, 1));
        assert_eq!(r.read(0, 4 * BS).await.unwrap(), s2);
        assert_eq!(r.checksum_errors(), 0);
    }
}

#[tokio::test]
async fn deleting_a_snapshot_merges_it_and_every_view_stays_the_same() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path(), 1 << 30, engine.clone()).unwrap();
        let r = pool.open_replica("r1", "vol1", 16 << 20).await.unwrap();
        r.write(0, blocks(1, 8), false).await.unwrap();
        r.seal("s1").await.unwrap();
        r.write(2 * BS as u64, blocks(2, 4), false).await.unwrap();
        r.seal("s2").await.unwrap();
        r.write(4 * BS as u64, blocks(3, 4), false).await.unwrap();
        r.seal("s3").await.unwrap();
        r.write(0, blocks(4, 1), false).await.unwrap();
        let view = |name: &'static str| {
            let r = r.clone();
            async move {
                if name == "head" {
                    r.read(0, 8 * BS).await.unwrap()
                } else {
                    r.read_snapshot(name, 0, 8 * BS).await.unwrap()
                }
            }
        };
        let before = [
            view("s1").await,
            view("s2").await,
            view("s3").await,
            view("head").await,
        ];
        assert_eq!(
            r.changed_blocks(Some("s1"), "s3").await.unwrap(),
            vec![(2 * BS as u64, 6 * BS as u64)]
        );
        assert_eq!(
            r.changed_blocks(None, "s1").await.unwrap(),
            vec![(0, 8 * BS as u64)]
        );
        assert_eq!(pool.allocated_bytes(), r.allocated_bytes());
        let seq2 = r.manifest.lock().unwrap().layers[1].seq;

        assert!(r.delete_snapshot("s2").await.unwrap());
        assert!(
            !r.delete_snapshot("s2").await.unwrap(),
            "deleting again is a no-op"
        );
        assert!(matches!(
            r.read_snapshot("s2", 0, 10).await,
            Err(StoreError::NoSuchSnapshot { .. })
        ));
        assert_eq!(view("s1").await, before[0]);
        assert_eq!(view("s3").await, before[2]);
        assert_eq!(view("head").await, before[3]);
        assert!(!dir.path().join(format!("r1.s{seq2}.data")).exists());
        assert_eq!(
            r.changed_blocks(Some("s1"), "s3").await.unwrap(),
            vec![(2 * BS as u64, 6 * BS as u64)]
        );
        // s1 8 blocks, s3 now 6 (4 own + 2 merged up), head 1.
        assert_eq!(r.allocated_bytes(), 15 * BS as u64);
        assert_eq!(pool.allocated_bytes(), r.allocated_bytes());

        // The newest is hidden, not merged into the live head; the next seal lets it go.
        assert!(r.delete_snapshot("s3").await.unwrap());
        let names: Vec<String> = r
            .snapshots()
            .await
            .into_iter()
            .map(|s| s.snapshot)
            .collect();
        assert_eq!(names, ["s1"]);
        assert_eq!(view("head").await, before[3]);
        assert_eq!(view("s1").await, before[0]);
        r.seal("s4").await.unwrap();
        r.compact().await.unwrap();
        assert_eq!(r.manifest.lock().unwrap().layers.len(), 2);
        assert_eq!(r.read_snapshot("s4", 0, 8 * BS).await.unwrap(), before[3]);
        assert_eq!(pool.allocated_bytes(), r.allocated_bytes());

        // Deleting the replica takes its layers with it.
        r.close().await.unwrap();
        pool.delete_replica(&r).unwrap();
        assert_eq!(pool.allocated_bytes(), 0);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[tokio::test]
async fn a_seal_cut_before_its_commit_is_undone_and_one_cut_after_is_finished() {
    for engine in engines() {
        // Before the commit: links exist, the manifest does not name them.
        let dir = tempfile::tempdir().unwrap();
        {
            let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
            r.write(0, blocks(1, 4), false).await.unwrap();
            r.close().await.unwrap();
        }
        for what in ["data", "crc"] {
            std::fs::hard_link(
                dir.path().join(format!("r1.{what}")),
                dir.path().join(format!("r1.s1.{what}")),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("r1.data.new"), b"").unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        assert!(!dir.path().join("r1.s1.data").exists());
        assert!(!dir.path().join("r1.data.new").exists());
        assert!(r.snapshots().await.is_empty());
        assert_eq!(r.read(0, 4 * BS).await.unwrap(), blocks(1, 4));
        assert_eq!(r.allocated_bytes(), 4 * BS as u64);
        r.close().await.unwrap();
        drop(r);

        // After the commit, before the switch: the head still is the layer's inode.
        for what in ["data", "crc"] {
            std::fs::hard_link(
                dir.path().join(format!("r1.{what}")),
                dir.path().join(format!("r1.s1.{what}")),
            )
            .unwrap();
        }
        let m = Manifest {
            next_seq: 2,
            layers: vec![LayerEntry {
                seq: 1,
                snapshot: "s1".into(),
                size_bytes: 16 << 20,
                hidden: false,
            }],
            merging: None,
        };
        std::fs::write(
            dir.path().join("r1.layers"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        assert_eq!(
            r.read_snapshot("s1", 0, 4 * BS).await.unwrap(),
            blocks(1, 4)
        );
        assert_eq!(
            r.read(0, 4 * BS).await.unwrap(),
            blocks(1, 4),
            "the head reads through"
        );
        // The head is its own file now: a write to it leaves the snapshot alone.
        r.write(0, blocks(2, 1), false).await.unwrap();
        assert_eq!(
            r.read_snapshot("s1", 0, 4 * BS).await.unwrap(),
            blocks(1, 4)
        );
        assert_eq!(r.allocated_bytes(), 5 * BS as u64);
    }
}

#[tokio::test]
async fn a_merge_cut_by_a_crash_is_finished_at_open_without_false_checksum_errors() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2) = {
            let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
            r.write(0, blocks(1, 8), false).await.unwrap();
            r.seal("s1").await.unwrap();
            r.write(0, blocks(2, 2), false).await.unwrap();
            r.seal("s2").await.unwrap();
            let (a, b) = (
                r.read_snapshot("s1", 0, 8 * BS).await.unwrap(),
                r.read_snapshot("s2", 0, 8 * BS).await.unwrap(),
            );
            r.close().await.unwrap();
            (a, b)
        };
        // The merge of s1 into s2 was marked and had copied block 5's data, not its crc.
        let mut m: Manifest =
            serde_json::from_slice(&std::fs::read(dir.path().join("r1.layers")).unwrap()).unwrap();
        let (q1, q2) = (m.layers[0].seq, m.layers[1].seq);
        m.layers[0].hidden = true;
        m.merging = Some(Merging { from: q1, into: q2 });
        std::fs::write(
            dir.path().join("r1.layers"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(format!("r1.s{q2}.data")))
            .unwrap();
        f.write_all_at(&s1[5 * BS..6 * BS], 5 * BS as u64).unwrap();
        // And block 6's copy was torn (half of it).
        f.write_all_at(&s1[6 * BS..6 * BS + 2048], 6 * BS as u64)
            .unwrap();
        drop(f);
        let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
        assert!(!dir.path().join(format!("r1.s{q1}.data")).exists());
        assert_eq!(
            r.read_snapshot("s2", 0, 8 * BS).await.unwrap(),
            s2,
            "{engine:?}"
        );
        assert_eq!(r.read(0, 8 * BS).await.unwrap(), s2);
        assert_eq!(r.checksum_errors(), 0);
        let names: Vec<String> = r
            .snapshots()
            .await
            .into_iter()
            .map(|s| s.snapshot)
            .collect();
        assert_eq!(names, ["s2"]);
        assert_eq!(r.allocated_bytes(), 8 * BS as u64);
    }
}

#[tokio::test]
async fn a_corrupted_snapshot_block_is_an_error_never_data_and_a_bad_manifest_is_refused() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = open(dir.path(), &engine, 1 << 30, 16 << 20).await;
            r.write(0, blocks(1, 4), false).await.unwrap();
            r.seal("s1").await.unwrap();
            let f = OpenOptions::new()
                .write(true)
                .open(dir.path().join("r1.s1.data"))
                .unwrap();
            f.write_all_at(&[0xde, 0xad], 2 * BS as u64 + 7).unwrap();
            assert!(matches!(
                r.read(0, 4 * BS).await,
                Err(StoreError::ChecksumMismatch { block: 2, .. })
            ));
            assert!(matches!(
                r.read_snapshot("s1", 2 * BS as u64, BS).await,
                Err(StoreError::ChecksumMismatch { block: 2, .. })
            ));
            // A comparison sees a difference instead of an error, and can repair the head.
            let sums = r.checksums(0, 4 * BS as u64).await.unwrap();
            assert_ne!(sums[2], block_digest(&blocks(1, 4)[2 * BS..3 * BS]));
            r.write(2 * BS as u64, blocks(1, 4)[2 * BS..3 * BS].to_vec(), false)
                .await
                .unwrap();
            assert_eq!(r.read(0, 4 * BS).await.unwrap(), blocks(1, 4));
            r.close().await.unwrap();
        }
        std::fs::write(dir.path().join("r1.layers"), b"{ torn").unwrap();
        let pool = Pool::open(dir.path(), 1 << 30, engine.clone()).unwrap();
        let err = pool
            .open_replica("r1", "vol1", 16 << 20)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::ManifestCorrupt { .. }), "{err}");
        assert!(err.to_string().contains("vol1"), "{err}");
    }
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, count: u64, seed: u8 },
    Partial { offset: u64, len: usize, seed: u8 },
    Zero { block: u64, count: u64 },
    Seal,
    Delete(usize),
    Reopen { clean: bool },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    const BLOCKS: u64 = 40;
    prop_oneof![
        4 => (0..BLOCKS, 1..6u64, any::<u8>()).prop_map(|(block, count, seed)| Op::Write { block: block.min(BLOCKS - count), count, seed }),
        2 => (0..BLOCKS * BS as u64 - 5000, 1..5000usize, any::<u8>()).prop_map(|(offset, len, seed)| Op::Partial { offset, len, seed }),
        2 => (0..BLOCKS, 1..6u64).prop_map(|(block, count)| Op::Zero { block: block.min(BLOCKS - count), count }),
        2 => Just(Op::Seal),
        2 => (0..8usize).prop_map(Op::Delete),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// Random writes, partial writes, zeroing, seals, deletes and reopens (clean or as at
    /// kill -9) against a model: the head and every snapshot read what the model says.
    #[test]
    fn layers_match_a_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let size = 40 * BS as u64;
            let dir = tempfile::tempdir().unwrap();
            let engine = IoEngine::Std;
            let mut r = open(dir.path(), &engine, 1 << 30, size).await;
            let mut head = vec![0u8; size as usize];
            let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
            let mut next = 0;
            for op in ops {
                match op {
                    Op::Write { block, count, seed } => {
                        let d = pattern(seed, (count as usize) * BS);
                        r.write(block * BS as u64, d.clone(), false).await.unwrap();
                        head[(block as usize) * BS..(block + count) as usize * BS].copy_from_slice(&d);
                    }
                    Op::Partial { offset, len, seed } => {
                        let d = pattern(seed, len);
                        r.write(offset, d.clone(), false).await.unwrap();
                        head[offset as usize..offset as usize + len].copy_from_slice(&d);
                    }
                    Op::Zero { block, count } => {
                        r.write_zeroes(block * BS as u64, count * BS as u64, false).await.unwrap();
                        head[(block as usize) * BS..(block + count) as usize * BS].fill(0);
                    }
                    Op::Seal => {
                        let name = format!("s{next}");
                        next += 1;
                        assert!(r.seal(&name).await.unwrap());
                        snaps.push((name, head.clone()));
                    }
                    Op::Delete(i) => {
                        if !snaps.is_empty() {
                            let (name, _) = snaps.remove(i % snaps.len());
                            assert!(r.delete_snapshot(&name).await.unwrap());
                        }
                    }
                    Op::Reopen { clean } => {
                        if clean {
                            r.close().await.unwrap();
                        } else {
                            // As at kill -9: completed writes are in the page cache.
                            r.flush().await.unwrap();
                        }
                        drop(r);
                        r = open(dir.path(), &engine, 1 << 30, size).await;
                    }
                }
                assert_eq!(r.read(0, size as usize).await.unwrap(), head);
                for (name, view) in &snaps {
                    assert_eq!(&r.read_snapshot(name, 0, size as usize).await.unwrap(), view, "{name}");
                }
                let listed: Vec<String> = r.snapshots().await.into_iter().map(|s| s.snapshot).collect();
                let want: Vec<String> = snaps.iter().map(|s| s.0.clone()).collect();
                assert_eq!(listed, want);
            }
            assert_eq!(r.checksum_errors(), 0);
            assert_eq!(r.pool.allocated_bytes(), r.allocated_bytes());
        });
    }
}
