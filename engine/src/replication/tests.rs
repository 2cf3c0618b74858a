//! Replication tests: a three-node cluster in one process. Every node has a pool and a
//! replica in a tempdir and a real wire server (loopback TCP) with a [`ReplicaServer`]; the
//! metadata is one shared [`InMemoryMeta`]; the coordinator runs on node 1 and reaches its
//! local replica through node 1's server, as the daemon does. Every test is bounded by
//! [`TEST_TIMEOUT`] and every wait by [`WAIT`], so a regression fails instead of hanging.
//!
//! Replicas are compared block by block twice: through the coordinator's `verify` and
//! directly, by reading every replica's store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::cluster::{NodeRecord, NodeRole, ReplicaRecord, ReplicaState, VolumeRecord};
use crate::io::IoEngine;
use crate::meta::IoPriority;
use crate::store::{Pool, Replica, BLOCK_SIZE};
use crate::wire::{self, Frame, FrameHandler, Kind};

mod sim;
mod simnet;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(15);
const TOKEN: &[u8] = b"replication-test-token";
const VOLUME: &str = "vol";
const SIZE: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

/// Logs go to the test output when RUST_LOG is set (e.g. `RUST_LOG=tandem_engine=debug`).
fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

async fn bounded<F: Future>(f: F) -> F::Output {
    init_tracing();
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test did not finish within TEST_TIMEOUT")
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not true within {WAIT:?}"))
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Default)]
struct Replicas(Mutex<HashMap<u64, Arc<Replica>>>);

impl LocalReplicas for Replicas {
    fn get(&self, volume_wire_id: u64) -> Option<Arc<Replica>> {
        self.0.lock().unwrap().get(&volume_wire_id).cloned()
    }
}

/// The handler a test node serves: its [`ReplicaServer`], except that one armed `Write`
/// (matched by offset) is held before it reaches the server until released, like a frame
/// stuck in a socket queue of a slow replica. Records the status the held frame got.
struct Faulty {
    server: Arc<ReplicaServer>,
    hold: Mutex<Option<(u64, watch::Receiver<bool>)>>,
    held_status: Mutex<Option<u32>>,
    /// Every `Write` waits this long before it reaches the server (a slow replica).
    write_delay: Mutex<Duration>,
    /// While set (and not released), every `Write` and `WriteZeroes` waits (a stall).
    stall: Mutex<Option<watch::Receiver<bool>>>,
    /// Offsets of the `Write` frames that reached the server, in order.
    seen_writes: Mutex<Vec<u64>>,
    /// For each `Flush` that reached the server: how many `Write`s had reached it before.
    seen_flushes: Mutex<Vec<usize>>,
    /// This many `Flush` frames are answered EIO without reaching the server (a failed
    /// writeback: fsyncgate).
    fail_flushes: std::sync::atomic::AtomicU32,
    /// This many `Write` frames are answered EIO without reaching the server.
    fail_writes: std::sync::atomic::AtomicU32,
    /// This many `Write` frames reach the server, but their answers are lost.
    drop_replies: std::sync::atomic::AtomicU32,
    /// This many `Write` frames reach the server and are then answered EIO (a write that
    /// landed, reported as failed).
    land_then_fail: std::sync::atomic::AtomicU32,
    /// While set, every `Write` and `WriteZeroes` is answered ENOSPC (a full pool).
    no_space: std::sync::atomic::AtomicBool,
}

/// Takes one from `n` if it is not zero.
fn take_one(n: &std::sync::atomic::AtomicU32) -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    n.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok()
}

#[async_trait::async_trait]
impl FrameHandler for Faulty {
    async fn handle(&self, peer_node_id: u64, req: Frame) -> Frame {
        if req.kind == Kind::Flush
            && self
                .fail_flushes
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok()
        {
            return Frame::reply_to(&req, libc::EIO as u32, Bytes::new());
        }
        if matches!(req.kind, Kind::Write | Kind::WriteZeroes)
            && self.no_space.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Frame::reply_to(&req, libc::ENOSPC as u32, Bytes::new());
        }
        if req.kind == Kind::Write && take_one(&self.fail_writes) {
            return Frame::reply_to(&req, libc::EIO as u32, Bytes::new());
        }
        if req.kind == Kind::Write && take_one(&self.drop_replies) {
            let _ = self.server.handle(peer_node_id, req).await;
            return std::future::pending().await;
        }
        if req.kind == Kind::Write && take_one(&self.land_then_fail) {
            let reply = self.server.handle(peer_node_id, req.clone()).await;
            assert_eq!(reply.status, 0, "the write did not land");
            return Frame::reply_to(&req, libc::EIO as u32, Bytes::new());
        }
        if req.kind == Kind::Flush {
            let n = self.seen_writes.lock().unwrap().len();
            self.seen_flushes.lock().unwrap().push(n);
        }
        if matches!(req.kind, Kind::Write | Kind::WriteZeroes) {
            let stall = self.stall.lock().unwrap().clone();
            if let Some(mut release) = stall {
                let _ = release.wait_for(|r| *r).await;
            }
            let delay = *self.write_delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if req.kind == Kind::Write {
                self.seen_writes.lock().unwrap().push(req.offset);
            }
        }
        let held = {
            let mut hold = self.hold.lock().unwrap();
            match &*hold {
                Some((off, _)) if req.kind == Kind::Write && req.offset == *off => hold.take(),
                _ => None,
            }
        };
        let Some((_, mut release)) = held else {
            return self.server.handle(peer_node_id, req).await;
        };
        let _ = release.wait_for(|r| *r).await;
        let reply = self.server.handle(peer_node_id, req).await;
        *self.held_status.lock().unwrap() = Some(reply.status);
        reply
    }
}

struct Node {
    pool: Arc<Pool>,
    replicas: Arc<Replicas>,
    server: Arc<ReplicaServer>,
    faulty: Arc<Faulty>,
    stop: Option<watch::Sender<bool>>,
    serving: Option<JoinHandle<()>>,
}

impl Node {
    fn replica(&self) -> Arc<Replica> {
        self.replicas
            .0
            .lock()
            .unwrap()
            .values()
            .next()
            .cloned()
            .expect("node has a replica")
    }
}

struct TestCluster {
    meta: Arc<InMemoryMeta>,
    /// The volume's size ([`SIZE`] unless built with [`TestCluster::sized`]).
    size: u64,
    /// The volume's id, assigned by the state machine at create.
    vol_id: String,
    nodes: Vec<Node>,
    /// The simulation's in-process network, in place of TCP ([`TestCluster::simulated`]).
    net: Option<simnet::SimNet>,
    _dir: tempfile::TempDir,
}

fn node_record(id: u64, addr: &str, domain: &str) -> NodeRecord {
    NodeRecord {
        id,
        name: format!("node{id}"),
        admin_addr: "127.0.0.1:1".into(),
        data_addr: addr.into(),
        domain: domain.into(),
        zone: "z".into(),
        rack: "r".into(),
        role: NodeRole::Voter,
        pool_size_bytes: 1 << 30,
        joined_unix_seconds: 0,
        instance: String::new(),
    }
}

impl TestCluster {
    /// Three nodes; the volume has a replica (in sync) on each of `replica_nodes`.
    async fn new(replica_nodes: &[u64]) -> TestCluster {
        TestCluster::with_pools(replica_nodes, [1 << 30; 3]).await
    }

    async fn with_pools(replica_nodes: &[u64], pool_bytes: [u64; 3]) -> TestCluster {
        TestCluster::build(replica_nodes, pool_bytes, ["d"; 3]).await
    }

    /// Three nodes in the given domains.
    async fn in_domains(replica_nodes: &[u64], domains: [&str; 3]) -> TestCluster {
        TestCluster::build(replica_nodes, [1 << 30; 3], domains).await
    }

    async fn build(replica_nodes: &[u64], pool_bytes: [u64; 3], domains: [&str; 3]) -> TestCluster {
        TestCluster::sized(replica_nodes, pool_bytes, domains, SIZE).await
    }

    async fn sized(
        replica_nodes: &[u64],
        pool_bytes: [u64; 3],
        domains: [&str; 3],
        size: u64,
    ) -> TestCluster {
        TestCluster::make(replica_nodes, pool_bytes, domains, size, None, &[]).await
    }

    /// Three nodes in `domains`; the volume's replicas in `async_domains` are async by
    /// choice (`volume create --async-domains`).
    async fn with_async_domains(
        replica_nodes: &[u64],
        domains: [&str; 3],
        async_domains: &[&str],
    ) -> TestCluster {
        TestCluster::make(
            replica_nodes,
            [1 << 30; 3],
            domains,
            SIZE,
            None,
            async_domains,
        )
        .await
    }

    /// For the deterministic simulation: the in-process network instead of TCP, and the
    /// simulated I/O engine (every store call completes on the one runtime thread, and a
    /// node's power can be cut).
    async fn simulated(replica_nodes: &[u64], size: u64, domains: [&str; 3]) -> TestCluster {
        let net = simnet::SimNet::new();
        TestCluster::make(replica_nodes, [1 << 30; 3], domains, size, Some(net), &[]).await
    }

    async fn make(
        replica_nodes: &[u64],
        pool_bytes: [u64; 3],
        domains: [&str; 3],
        size: u64,
        net: Option<simnet::SimNet>,
        async_domains: &[&str],
    ) -> TestCluster {
        // Small clusters (the simulation builds hundreds) live in memory where possible.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if size < SIZE && shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let meta = InMemoryMeta::new(crate::cluster::ClusterState::new("test"));
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            meta.apply(&Command::AddNode {
                node: node_record(id, "127.0.0.1:1", domains[id as usize - 1]),
            })
            .unwrap();
            let pool = Pool::open(
                &dir.path().join(format!("node{id}")),
                pool_bytes[id as usize - 1],
                if net.is_some() {
                    IoEngine::Simulated(crate::io::SimDisk::new())
                } else {
                    IoEngine::Std
                },
            )
            .unwrap();
            let replicas = Arc::new(Replicas::default());
            let server = ReplicaServer::new(id, meta.clone(), replicas.clone());
            let faulty = Arc::new(Faulty {
                server: server.clone(),
                hold: Mutex::new(None),
                held_status: Mutex::new(None),
                write_delay: Mutex::new(Duration::ZERO),
                stall: Mutex::new(None),
                seen_writes: Mutex::new(Vec::new()),
                fail_flushes: Default::default(),
                fail_writes: Default::default(),
                drop_replies: Default::default(),
                land_then_fail: Default::default(),
                no_space: Default::default(),
                seen_flushes: Mutex::new(Vec::new()),
            });
            if let Some(net) = &net {
                net.register(id, faulty.clone());
            }
            nodes.push(Node {
                pool,
                replicas,
                server,
                faulty,
                stop: None,
                serving: None,
            });
        }
        let volume = VolumeRecord {
            id: String::new(),
            name: VOLUME.into(),
            size_bytes: size,
            repl: replica_nodes.len() as u32,
            io_priority: IoPriority::Medium,
            labels: BTreeMap::new(),
            created_unix_seconds: 0,
            generation: 0,
            attached_node: None,
            replicas: replica_nodes
                .iter()
                .map(|&node| ReplicaRecord {
                    node,
                    state: ReplicaState::InSync,
                    generation: 0,
                    resync_done_bytes: 0,
                    resync_total_bytes: 0,
                })
                .collect(),
            hot_regions: BTreeSet::new(),
            parked: Vec::new(),
            lease_wait: false,
            async_domains: async_domains.iter().map(|d| d.to_string()).collect(),
            snapshots: Vec::new(),
            next_snapshot_seq: 0,
        };
        meta.apply(&Command::CreateVolume {
            volume: Box::new(volume),
        })
        .unwrap();
        let vol_id = meta.state().volumes[VOLUME].id.clone();
        let mut c = TestCluster {
            meta,
            size,
            vol_id,
            nodes,
            net,
            _dir: dir,
        };
        for id in 1..=3 {
            c.open_replica(id).await;
            c.start(id).await;
        }
        c
    }

    fn wire_id(&self) -> u64 {
        u64::from_str_radix(&self.vol_id, 16).unwrap()
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    /// (Re)opens node `id`'s replica of the volume from its pool.
    async fn open_replica(&self, id: u64) {
        let n = self.node(id);
        let r = n
            .pool
            .open_replica(&self.vol_id, VOLUME, self.size)
            .await
            .unwrap();
        n.replicas.0.lock().unwrap().insert(self.wire_id(), r);
    }

    /// Starts node `id`'s wire server on a fresh port and records the address.
    async fn start(&mut self, id: u64) {
        if let Some(net) = &self.net {
            net.up(id);
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        self.meta
            .apply(&Command::UpdateNodeAddrs {
                id,
                admin_addr: "127.0.0.1:1".into(),
                data_addr: addr,
            })
            .unwrap();
        let (tx, rx) = watch::channel(false);
        let n = &mut self.nodes[id as usize - 1];
        let handler: Arc<dyn FrameHandler> = n.faulty.clone();
        n.serving = Some(tokio::spawn(wire::serve(
            listener,
            Arc::new(TOKEN.to_vec()),
            id,
            handler,
            rx,
        )));
        n.stop = Some(tx);
    }

    /// Stops node `id`'s wire server: its connections close, as if the node died.
    async fn stop(&mut self, id: u64) {
        if let Some(net) = &self.net {
            net.down(id);
            return;
        }
        let n = &mut self.nodes[id as usize - 1];
        if let Some(tx) = n.stop.take() {
            tx.send_replace(true);
        }
        if let Some(t) = n.serving.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("wire server stops")
                .unwrap();
        }
    }

    fn volume(&self) -> VolumeRecord {
        self.meta.state().volumes[VOLUME].clone()
    }

    fn replica_state(&self, node: u64) -> ReplicaState {
        self.volume().replica(node).unwrap().state
    }

    /// Commits an attach of the volume on `node` (a takeover) and returns the record.
    fn attach(&self, node: u64) -> VolumeRecord {
        self.meta
            .apply(&Command::Attach {
                name: VOLUME.into(),
                node,
                takeover: true,
            })
            .unwrap();
        self.volume()
    }

    fn config(&self, node: u64) -> CoordinatorConfig {
        let mut cfg = CoordinatorConfig::new(node, Arc::new(TOKEN.to_vec()));
        cfg.replica_timeout = Duration::from_secs(2);
        cfg.resync_retry = Duration::from_millis(50);
        cfg.resync_progress_interval = Duration::from_millis(50);
        // Long enough that no test sees a background retirement it did not ask for.
        cfg.hot_idle_retire = Duration::from_secs(600);
        cfg.local_server = Some(self.node(node).server.clone());
        if let Some(net) = &self.net {
            cfg.network = Arc::new(net.clone());
        }
        cfg
    }

    /// Attaches on `node` and opens a coordinator there.
    async fn coordinator(&self, node: u64) -> Arc<Coordinator> {
        self.coordinator_with(self.config(node)).await
    }

    async fn coordinator_with(&self, cfg: CoordinatorConfig) -> Arc<Coordinator> {
        let node = cfg.node_id;
        let vol = self.attach(node);
        let local = self.node(node).replicas.get(self.wire_id());
        Coordinator::open(cfg, vol, local, self.meta.clone())
            .await
            .expect("coordinator opens")
    }

    /// Every replica's full contents, by node, read straight from the stores.
    async fn contents(&self, nodes: &[u64]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for &id in nodes {
            let r = self.node(id).replica();
            let mut all = Vec::with_capacity(self.size as usize);
            let mut off = 0;
            while off < self.size {
                let n = (16 * MIB).min(self.size - off);
                all.extend(r.read(off, n as usize).await.unwrap());
                off += n;
            }
            out.push((id, all));
        }
        out
    }

    /// Asserts the replicas on `nodes` are byte-identical, straight from their stores.
    async fn assert_identical(&self, nodes: &[u64]) {
        let contents = self.contents(nodes).await;
        let (first, reference) = &contents[0];
        for (id, c) in &contents[1..] {
            if c != reference {
                let block = c
                    .chunks(BLOCK_SIZE)
                    .zip(reference.chunks(BLOCK_SIZE))
                    .position(|(a, b)| a != b)
                    .unwrap();
                panic!("replica on node {id} differs from node {first} first at block {block}");
            }
        }
    }

    /// Holds the next `Write` at `at` in node `id`'s replica server, before the fence
    /// admits it (a frame stalled in a queue), until the returned sender releases it.
    fn hold_write(&self, id: u64, at: u64) -> watch::Sender<bool> {
        let (release, rx) = watch::channel(false);
        *self.node(id).server.hold.lock().unwrap() = Some((at, rx));
        release
    }

    /// Releases the frame held by [`TestCluster::hold_write`] and returns the status its
    /// reply had.
    async fn release_held(&self, id: u64, release: watch::Sender<bool>) -> Option<u32> {
        release.send_replace(true);
        let server = &self.node(id).server;
        eventually("held frame answered", || {
            server.held_status.lock().unwrap().is_some()
        })
        .await;
        *server.held_status.lock().unwrap()
    }

    /// Corrupts one byte of node `id`'s data file behind the store's back.
    fn corrupt(&self, id: u64, offset: u64) {
        let path = self
            .node(id)
            .pool
            .dir()
            .join(format!("{}.data", self.vol_id));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset).unwrap();
        f.write_all_at(&[b[0] ^ 0x5A], offset).unwrap();
    }
}

async fn assert_verify_clean(c: &Coordinator, in_sync: usize) {
    let report = c.verify().await.unwrap();
    assert_eq!(
        report.mismatched_blocks, 0,
        "in-sync replicas differ: {:?}",
        report.mismatches
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.in_sync_nodes.len(), in_sync, "{report:?}");
    assert_eq!(report.blocks_compared, SIZE / BLOCK_SIZE as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_writes_land_byte_identically_on_every_replica() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        let mut expect = vec![0u8; SIZE as usize];
        let writes: [(u64, usize, bool); 5] = [
            (0, 4096, false),
            (8 * MIB + 100, 70_000, true), // unaligned, FUA, crosses hot-region boundary? no
            (4 * MIB - 3000, 9000, false), // crosses a 4 MiB hot-region boundary
            (SIZE - 4096, 4096, false),    // last block
            (20 * MIB, 2 * MIB as usize, false),
        ];
        for (i, (off, len, fua)) in writes.into_iter().enumerate() {
            let data = pattern(i as u64 + 1, len);
            expect[off as usize..off as usize + len].copy_from_slice(&data);
            coord.write(off, data, fua).await.unwrap();
        }
        coord
            .write_zeroes(20 * MIB + 4096, 8192 + 17, false)
            .await
            .unwrap();
        expect[(20 * MIB + 4096) as usize..(20 * MIB + 4096 + 8192 + 17) as usize].fill(0);
        coord.flush().await.unwrap();

        assert_eq!(
            coord.read(4 * MIB - 3000, 9000).await.unwrap(),
            expect[(4 * MIB - 3000) as usize..(4 * MIB + 6000) as usize]
        );
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        assert_eq!(c.contents(&[2]).await[0].1, expect);
        // Hot regions were committed for every region written.
        let hot = c.volume().hot_regions;
        for r in [0u64, 1, 2, 5, 15] {
            assert!(hot.contains(&r), "region {r} not hot: {hot:?}");
        }
        // Bad arguments are refused before anything is sent.
        let e = coord
            .write(SIZE - 10, vec![1; 20], false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let s = coord.stats();
        assert_eq!((s.ejections, s.read_repairs, s.fenced), (0, 0, false));
        coord.close().await.unwrap();
        assert!(
            c.volume().hot_regions.is_empty(),
            "close empties the hot set"
        );
        let e = coord.write(0, vec![1; 10], false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ESHUTDOWN);
    })
    .await
}

/// The heart of protocol C: a write is never acked while a replica that missed it still
/// counts as in-sync, and what it missed is what it gets back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_replica_is_ejected_before_the_ack_and_resynced_from_its_dirty_regions() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord
            .write(0, pattern(1, 8 * MIB as usize), false)
            .await
            .unwrap();

        c.stop(3).await;
        coord.write(MIB, pattern(2, 4096), false).await.unwrap();
        // Committed before the ack, not eventually.
        assert_eq!(c.replica_state(3), ReplicaState::OutOfSync);
        assert_eq!(coord.stats().ejections, 1);
        // Writes go on without it; they land in two more 1 MiB regions.
        coord.write(10 * MIB, pattern(3, 4096), true).await.unwrap();
        coord
            .write(30 * MIB + 5, pattern(4, 100), false)
            .await
            .unwrap();
        coord.flush().await.unwrap();
        let r3 = coord
            .stats()
            .replicas
            .into_iter()
            .find(|r| r.node == 3)
            .unwrap();
        assert_eq!(r3.state, ReplicaState::OutOfSync);
        assert_eq!(r3.dirty_bytes, Some(3 * MIB), "three dirty regions: {r3:?}");
        assert_verify_clean(&coord, 2).await;

        c.start(3).await;
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        let r3 = coord
            .stats()
            .replicas
            .into_iter()
            .find(|r| r.node == 3)
            .unwrap();
        assert_eq!(r3.state, ReplicaState::InSync);
        // Only the dirty regions were copied, not the volume.
        assert_eq!(r3.resync_done_bytes, 3 * MIB, "{r3:?}");
        assert!(r3.resync_copied_bytes <= 3 * MIB && r3.resync_copied_bytes > 0);
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        // And it takes writes again.
        coord
            .write(40 * MIB, pattern(5, 4096), false)
            .await
            .unwrap();
        c.assert_identical(&[1, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_restarted_after_an_unclean_stop_gets_a_full_comparison() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord
            .write(0, pattern(1, MIB as usize), false)
            .await
            .unwrap();
        c.stop(3).await;
        // kill -9: the store is dropped without close, so its activity log has hot regions.
        c.node(3).replicas.0.lock().unwrap().clear();
        coord.write(5 * MIB, pattern(2, 4096), false).await.unwrap();
        assert_eq!(c.replica_state(3), ReplicaState::OutOfSync);
        c.open_replica(3).await;
        assert!(c.node(3).replica().recovered_regions() > 0);
        c.start(3).await;
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        let r3 = coord
            .stats()
            .replicas
            .into_iter()
            .find(|r| r.node == 3)
            .unwrap();
        assert_eq!(r3.resync_done_bytes, SIZE, "a full comparison: {r3:?}");
        assert_eq!(
            r3.resync_copied_bytes, 4096,
            "only the missed block differs"
        );
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brand_new_replica_gets_a_full_copy() {
    bounded(async {
        let c = TestCluster::new(&[1, 2]).await;
        let coord = c.coordinator(1).await;
        coord
            .write(0, pattern(1, 3 * MIB as usize), false)
            .await
            .unwrap();
        coord
            .write(50 * MIB, pattern(2, 8192), false)
            .await
            .unwrap();
        // Raise the RF: node 3 joins the replica set, out of sync.
        let mut replicas = c.volume().replicas;
        replicas.push(ReplicaRecord {
            node: 3,
            state: ReplicaState::OutOfSync,
            generation: coord.generation(),
            resync_done_bytes: 0,
            resync_total_bytes: 0,
        });
        c.meta
            .apply(&Command::SetReplicas {
                name: VOLUME.into(),
                replicas,
                repl: 3,
                generation: coord.generation(),
            })
            .unwrap();
        // Writes keep coming while it resyncs.
        for i in 0..20u64 {
            coord
                .write(i * 3 * MIB + 512, pattern(10 + i, 4096), false)
                .await
                .unwrap();
        }
        eventually("node 3 in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        let r3 = coord
            .stats()
            .replicas
            .into_iter()
            .find(|r| r.node == 3)
            .unwrap();
        assert_eq!(r3.resync_done_bytes, SIZE, "every region: {r3:?}");
        assert!(r3.resync_copied_bytes >= 3 * MIB + 8192, "{r3:?}");
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_repair_serves_good_data_and_rewrites_the_corrupt_block() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        let data = pattern(7, 64 * 1024);
        coord.write(MIB, data.clone(), true).await.unwrap();
        // Node 1's copy (the local one, which reads prefer) goes bad.
        c.corrupt(1, MIB + 3 * 4096 + 100);
        assert!(c.node(1).replica().read(MIB, 64 * 1024).await.is_err());

        let got = coord.read(MIB + 1000, 20_000).await.unwrap();
        assert_eq!(got, data[1000..21_000], "the client gets the good bytes");
        let s = coord.stats();
        assert_eq!((s.read_repairs, s.checksum_errors), (1, 1));
        // The bad copy was rewritten.
        assert_eq!(
            c.node(1).replica().read(MIB, 64 * 1024).await.unwrap(),
            data
        );
        assert_eq!(coord.read(MIB, 64 * 1024).await.unwrap(), data);
        assert_eq!(coord.stats().read_repairs, 1);
        eventually("read-repair alert raised", || {
            c.meta
                .state()
                .alerts
                .iter()
                .any(|a| a.kind == "read-repair")
        })
        .await;
        assert_eq!(c.replica_state(1), ReplicaState::InSync);
        assert_verify_clean(&coord, 3).await;
        coord.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_with_no_good_copy_is_an_io_error_never_data() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord.write(0, pattern(3, 16384), true).await.unwrap();
        for n in 1..=3 {
            c.corrupt(n, 8192 + n);
        }
        let e = coord.read(0, 16384).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(matches!(e, ReplicationError::NoGoodCopy { .. }), "{e}");
        // Blocks that are fine still read.
        assert_eq!(
            coord.read(0, 8192).await.unwrap(),
            pattern(3, 16384)[..8192]
        );
        // Verify sees the disagreement.
        let report = coord.verify().await.unwrap();
        assert_eq!(report.mismatched_blocks, 1, "{report:?}");
        assert_eq!(report.mismatches[0].block, 2);
    })
    .await
}

/// Safety invariant 5: once another node attached, the old coordinator can never get a
/// write acked, whether or not the new one has opened the replicas yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_coordinator_cannot_get_a_write_acked() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let old = c.coordinator(1).await;
        old.write(0, pattern(1, 8192), false).await.unwrap();

        // Node 2 takes over: the generation is bumped in the metadata.
        let vol = c.attach(2);
        let e = old.write(0, pattern(2, 8192), false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ESHUTDOWN, "{e}");
        assert!(old.stats().fenced);
        // Nothing of the refused write landed anywhere, the local replica included.
        for (id, content) in c.contents(&[1, 2, 3]).await {
            assert_eq!(content[..8192], pattern(1, 8192), "node {id}");
        }
        assert!((1..=3).all(|n| c.replica_state(n) == ReplicaState::InSync));

        let new = Coordinator::open(
            c.config(2),
            vol,
            c.node(2).replicas.get(c.wire_id()),
            c.meta.clone(),
        )
        .await
        .unwrap();
        new.write(4096, pattern(3, 4096), false).await.unwrap();
        let e = old.write(4096, pattern(4, 4096), false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ESHUTDOWN);
        assert!(old.read(0, 10).await.is_err());
        assert_verify_clean(&new, 3).await;
        assert_eq!(new.read(4096, 4096).await.unwrap(), pattern(3, 4096));
        new.close().await.unwrap();
    })
    .await
}

/// A zombie in a minority partition: its metadata (and its own node's) is stale and
/// cannot commit. The majority side attached elsewhere; the zombie's local write succeeds
/// but the write is never acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_in_a_minority_partition_cannot_get_a_write_acked() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let vol = c.attach(1);
        // The partition's view: a frozen copy of the metadata that cannot commit.
        let island = InMemoryMeta::new((*c.meta.state()).clone());
        let island_server = ReplicaServer::new(1, island.clone(), c.node(1).replicas.clone());
        let mut cfg = c.config(1);
        cfg.local_server = Some(island_server);
        let zombie = Coordinator::open(
            cfg,
            vol,
            c.node(1).replicas.get(c.wire_id()),
            island.clone(),
        )
        .await
        .unwrap();
        zombie.write(0, pattern(1, 4096), false).await.unwrap();
        island.set_available(false);
        // The majority moves on.
        c.attach(2);
        let e = zombie
            .write(8192, pattern(2, 4096), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ESHUTDOWN, "{e}");
        assert!(zombie.write(0, vec![0; 10], false).await.is_err());
        // The majority's replicas never saw it.
        for (id, content) in c.contents(&[2, 3]).await {
            assert_eq!(content[8192..12288], [0u8; 4096], "node {id}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_that_cannot_commit_fails_the_write_and_fences_the_coordinator() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord.write(0, pattern(1, 4096), false).await.unwrap();
        c.meta.set_available(false); // lost raft majority
        c.stop(3).await;
        let e = coord.write(0, pattern(2, 4096), false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ESHUTDOWN, "{e}");
        c.meta.set_available(true);
        let e = coord.write(0, pattern(3, 4096), false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ESHUTDOWN, "fenced for good: {e}");
        assert_eq!(
            c.replica_state(3),
            ReplicaState::InSync,
            "nothing committed"
        );
        // The unacked write left region 0 hot, so the next coordinator reconciles it.
        assert!(c.volume().hot_regions.contains(&0));
    })
    .await
}

/// A replica that does not answer within the timeout is ejected, and the write it never
/// answered can never land later: after the resync reopened it (a new session), the
/// held frame is refused. Without that, the stale bytes would overwrite the resynced
/// region and the in-sync replicas would differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_that_times_out_is_ejected_and_can_never_land_after_the_resync() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let mut cfg = c.config(1);
        cfg.replica_timeout = Duration::from_millis(300);
        let coord = c.coordinator_with(cfg).await;
        let at = 3 * MIB + 512;
        coord.write(0, pattern(1, 4096), false).await.unwrap();
        let (release, rx) = watch::channel(false);
        *c.node(3).faulty.hold.lock().unwrap() = Some((at, rx));

        coord.write(at, pattern(2, 4096), false).await.unwrap();
        // Ejected before the ack (resync may already be bringing it back).
        assert_ne!(c.replica_state(3), ReplicaState::InSync);
        assert_eq!(coord.stats().ejections, 1);
        coord.write(at, pattern(3, 4096), false).await.unwrap();
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        // Now the old frame arrives at the replica.
        release.send_replace(true);
        eventually("held frame answered", || {
            c.node(3).faulty.held_status.lock().unwrap().is_some()
        })
        .await;
        assert_eq!(
            *c.node(3).faulty.held_status.lock().unwrap(),
            Some(libc::ESTALE as u32),
            "a frame of an older session must be refused"
        );
        assert!(!coord.stats().fenced);
        c.assert_identical(&[1, 2, 3]).await;
        assert_eq!(coord.read(at, 4096).await.unwrap(), pattern(3, 4096));
        assert_verify_clean(&coord, 3).await;
        coord.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_concurrent_writes_leave_replicas_identical() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        let mut tasks = Vec::new();
        for i in 0..96u64 {
            let coord = coord.clone();
            tasks.push(tokio::spawn(async move {
                // Overlapping, unaligned writes within 256 KiB, plus some zeroing.
                let off = (i * 7919) % (192 * 1024);
                let len = 1000 + ((i * 104_729) % (64 * 1024)) as usize;
                if i % 9 == 0 {
                    coord.write_zeroes(off, len as u64, false).await
                } else {
                    coord.write(off, pattern(i, len), i % 5 == 0).await
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// A coordinator dies with a write on some replicas only. The next attach makes the
/// in-sync replicas identical before serving I/O (local copy wins), and clears the hot set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_with_writes_on_only_some_replicas_is_reconciled_by_the_next_open() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let first = c.coordinator(1).await;
        first.write(0, pattern(1, 8192), false).await.unwrap();
        first
            .write(21 * MIB, pattern(2, 8192), false)
            .await
            .unwrap();
        // Crash: no close. The hot regions stay committed.
        drop(first);
        let hot = c.volume().hot_regions;
        assert_eq!(hot, BTreeSet::from([0, 5]));
        // Writes that were in flight reached only some replicas.
        c.node(2)
            .replica()
            .write(4096, pattern(3, 4096), false)
            .await
            .unwrap();
        c.node(3)
            .replica()
            .write(21 * MIB + 100, pattern(4, 50), false)
            .await
            .unwrap();
        c.node(1)
            .replica()
            .write(20 * MIB, pattern(5, 4096), false)
            .await
            .unwrap();

        let second = c.coordinator(1).await;
        assert!(
            c.volume().hot_regions.is_empty(),
            "reconciled regions are cleared"
        );
        assert_eq!(second.stats().reconciled_blocks, 1 + 1 + 2);
        assert_verify_clean(&second, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        // The chosen source was the local replica.
        assert_eq!(
            second.read(4096, 4096).await.unwrap(),
            pattern(1, 8192)[4096..]
        );
        assert_eq!(second.read(20 * MIB, 4096).await.unwrap(), pattern(5, 4096));
        second.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_one_replica_ejects_it_and_on_every_replica_is_enospc() {
    bounded(async {
        let c = TestCluster::with_pools(&[1, 2, 3], [1 << 30, 1 << 30, 64 * 1024]).await;
        let coord = c.coordinator(1).await;
        coord.write(0, pattern(1, 32 * 1024), false).await.unwrap();
        // Node 3's pool cannot take this one.
        coord
            .write(MIB, pattern(2, 128 * 1024), false)
            .await
            .unwrap();
        // Ejected before the ack; resync keeps retrying it (and failing: its pool is full).
        assert_ne!(c.replica_state(3), ReplicaState::InSync);
        assert_eq!(coord.stats().ejections, 1);
        coord.close().await.unwrap();

        let c = TestCluster::with_pools(&[1, 2], [64 * 1024, 64 * 1024, 1 << 30]).await;
        let coord = c.coordinator(1).await;
        let e = coord
            .write(0, pattern(3, 128 * 1024), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        assert!((1..=2).all(|n| c.replica_state(n) == ReplicaState::InSync));
        // Writes that fit still work.
        coord.write(0, pattern(4, 4096), false).await.unwrap();
        coord.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_set_is_bounded_and_idle_regions_retire_in_the_background() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let mut cfg = c.config(1);
        cfg.max_hot_regions = 4;
        let coord = c.coordinator_with(cfg).await;
        for r in 0..12u64 {
            coord
                .write(r * HOT_REGION_BYTES, pattern(r, 4096), false)
                .await
                .unwrap();
            let hot = c.volume().hot_regions;
            assert!(hot.len() <= 4, "hot set over its bound: {hot:?}");
            assert!(hot.contains(&r));
        }
        coord.close().await.unwrap();

        let mut cfg = c.config(1);
        cfg.hot_idle_retire = Duration::from_millis(100);
        let coord = c.coordinator_with(cfg).await;
        coord.write(0, pattern(1, 4096), false).await.unwrap();
        assert!(!c.volume().hot_regions.is_empty());
        eventually("idle region retired", || c.volume().hot_regions.is_empty()).await;
        coord.close().await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_ejects_unreachable_in_sync_replicas_and_refuses_without_any() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        c.stop(2).await;
        let coord = c.coordinator(1).await;
        assert_eq!(c.replica_state(2), ReplicaState::OutOfSync);
        coord.write(0, pattern(1, 4096), false).await.unwrap();
        drop(coord);

        // A coordinator on node 3, whose only in-sync peers are down, refuses to serve.
        c.stop(1).await;
        c.meta
            .apply(&Command::SetReplicaState {
                name: VOLUME.into(),
                node: 3,
                state: ReplicaState::OutOfSync,
                generation: c.volume().generation,
            })
            .unwrap();
        let vol = c.attach(3);
        let mut cfg = c.config(3);
        cfg.replica_timeout = Duration::from_millis(500);
        let e = Coordinator::open(
            cfg,
            vol,
            c.node(3).replicas.get(c.wire_id()),
            c.meta.clone(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ReplicationError::OpenFailed { .. }), "{e}");
        assert_eq!(
            c.replica_state(1),
            ReplicaState::InSync,
            "the last copy is kept"
        );
    })
    .await
}

fn request(kind: Kind, wire_gen: u64, offset: u64, length: u32, payload: Vec<u8>) -> Frame {
    // The first volume of cluster "test".
    let wire_id = (u64::from(crc32fast::hash(b"test")) << 32) | 1;
    Frame::request(
        kind,
        wire_id,
        wire_gen,
        offset,
        length,
        Bytes::from(payload),
    )
}

fn session_of(reply: &Frame) -> u64 {
    assert_eq!(reply.status, 0, "{reply:?}");
    server::OpenInfo::decode(&reply.payload).unwrap().session
}

// Current-thread runtime: the test pauses the clock.
#[tokio::test]
async fn replica_server_fences_by_generation_and_session() {
    use server::wire_generation as g;
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        c.attach(1); // generation 1
        let s = c.node(2).server.clone();
        let ok = |f: &Frame| assert_eq!(f.status, 0, "{f:?}");
        let status = |f: Frame| f.status as i32;
        let s1 = session_of(
            &s.handle(1, request(Kind::Open, g(1, 0), 0, 0, vec![]))
                .await,
        );
        assert_eq!(s1, 1);
        ok(&s
            .handle(1, request(Kind::Write, g(1, s1), 0, 4096, pattern(1, 4096)))
            .await);
        // Lower generation: refused, nothing written.
        let r = s
            .handle(1, request(Kind::Write, g(0, 9), 0, 4096, vec![9; 4096]))
            .await;
        assert_eq!(status(r), libc::ESTALE);
        // I/O without an Open (session 0): refused.
        let r = s
            .handle(1, request(Kind::Flush, g(1, 0), 0, 0, vec![]))
            .await;
        assert_eq!(status(r), libc::ESTALE);
        // Another node at the current generation: refused.
        let r = s
            .handle(3, request(Kind::Read, g(1, s1), 0, 4096, vec![]))
            .await;
        assert_eq!(status(r), libc::EPERM);
        // Unknown volume.
        let mut f = request(Kind::Read, g(1, s1), 0, 4096, vec![]);
        f.volume_id = 42;
        assert_eq!(status(s.handle(1, f).await), libc::ENOENT);
        // Write payload must match its length.
        let r = s
            .handle(1, request(Kind::Write, g(1, s1), 0, 4096, vec![1; 10]))
            .await;
        assert_eq!(status(r), libc::EINVAL);
        // Store errors keep their errno.
        let r = s
            .handle(1, request(Kind::Read, g(1, s1), SIZE, 4096, vec![]))
            .await;
        assert_eq!(status(r), libc::EINVAL);
        assert_eq!(
            s.handle(1, request(Kind::HotRegions, g(1, s1), 0, 0, vec![]))
                .await
                .status as i32,
            libc::EOPNOTSUPP
        );

        // Checksums: a never-written block and a written zero block compare equal.
        ok(&s
            .handle(1, request(Kind::Write, g(1, s1), 8192, 4096, vec![0; 4096]))
            .await);
        let r = s
            .handle(1, request(Kind::Checksums, g(1, s1), 0, 16384, vec![]))
            .await;
        ok(&r);
        let crcs = server::decode_checksums(0, 16384, &r.payload).unwrap();
        let zero = crate::store::zero_block_digest();
        assert_eq!(
            crcs,
            vec![
                crate::store::block_digest(&pattern(1, 4096)),
                zero,
                zero,
                zero
            ]
        );

        // A newer generation than the metadata has: held, then refused (paused clock).
        tokio::time::pause();
        let r = s
            .handle(1, request(Kind::Read, g(2, 1), 0, 4096, vec![]))
            .await;
        assert_eq!(status(r), libc::EAGAIN);
        tokio::time::resume();

        // A second Open starts a new session; the old one is refused from then on.
        let s2 = session_of(
            &s.handle(1, request(Kind::Open, g(1, 0), 0, 0, vec![]))
                .await,
        );
        assert_eq!(s2, 2);
        let r = s
            .handle(1, request(Kind::Flush, g(1, s1), 0, 0, vec![]))
            .await;
        assert_eq!(status(r), libc::ESTALE);
        ok(&s
            .handle(1, request(Kind::Flush, g(1, s2), 0, 0, vec![]))
            .await);

        // A new generation: sessions start again, and the old generation is refused.
        c.attach(1); // generation 2
        let t1 = session_of(
            &s.handle(1, request(Kind::Open, g(2, 0), 0, 0, vec![]))
                .await,
        );
        assert_eq!(t1, 1);
        assert_eq!(s.opened_generation(c.wire_id()), 2);
        let r = s
            .handle(1, request(Kind::Flush, g(1, s2), 0, 0, vec![]))
            .await;
        assert_eq!(status(r), libc::ESTALE);
        ok(&s
            .handle(1, request(Kind::Flush, g(2, t1), 0, 0, vec![]))
            .await);
        let r = s
            .handle(1, request(Kind::Open, g(1, 0), 0, 0, vec![]))
            .await;
        assert_eq!(status(r), libc::ESTALE);
    })
    .await
}

#[tokio::test]
async fn errno_mapping_matches_the_nbd_contract() {
    let v = || "v".to_string();
    assert_eq!(
        ReplicationError::Fenced {
            volume: v(),
            generation: 1,
            reason: String::new()
        }
        .errno(),
        libc::ESHUTDOWN
    );
    assert_eq!(
        ReplicationError::Closed { volume: v() }.errno(),
        libc::ESHUTDOWN
    );
    assert_eq!(
        ReplicationError::NoSpace { volume: v() }.errno(),
        libc::ENOSPC
    );
    assert_eq!(
        ReplicationError::TooLarge {
            volume: v(),
            len: 1,
            max: 0
        }
        .errno(),
        libc::EINVAL
    );
    assert_eq!(
        ReplicationError::NoGoodCopy {
            volume: v(),
            offset: 0,
            len: 1,
            detail: String::new()
        }
        .errno(),
        libc::EIO
    );
}

/// Commits `state` for the replica on `node` at the current generation (what the
/// latency watcher does under policy `degrade`) and has the coordinator adopt it.
async fn set_mode(c: &TestCluster, coord: &Coordinator, node: u64, state: ReplicaState) {
    c.meta
        .apply(&Command::SetReplicaState {
            name: VOLUME.into(),
            node,
            state,
            generation: c.volume().generation,
        })
        .unwrap();
    coord.adopt_replica_states().await;
}

fn replica_stats(coord: &Coordinator, node: u64) -> ReplicaStats {
    coord
        .stats()
        .replicas
        .into_iter()
        .find(|r| r.node == node)
        .unwrap()
}

/// Node 3's replica (domain B, the volume's async domain) turns async under a coordinator
/// on `on`, and takes a first write.
async fn async_domain_replica_up(c: &TestCluster, on: u64) -> Arc<Coordinator> {
    let coord = c.coordinator(on).await;
    eventually("node 3 async (its domain is the async one)", || {
        replica_stats(&coord, 3).state == ReplicaState::Async
    })
    .await;
    coord.write(0, pattern(1, 64 << 10), false).await.unwrap();
    coord
}

/// Waits until node 3 is async again and caught up, then checks the copies are identical.
async fn async_domain_replica_caught_up(c: &TestCluster, coord: Arc<Coordinator>) {
    eventually("node 3 caught up again, async", || {
        let r = replica_stats(&coord, 3);
        r.state == ReplicaState::Async && r.async_lag_bytes == 0 && r.connected
    })
    .await;
    c.assert_identical(&[1, 3]).await;
    coord.close().await.unwrap();
}

/// A replica async by choice (in the volume's async domain) whose write failed is behind
/// by that write: it is committed out of sync, resynced, and turns async again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_domain_replica_whose_write_failed_is_resynced_and_turns_async_again() {
    bounded(async {
        let c = TestCluster::with_async_domains(&[1, 3], ["A", "A", "B"], &["B"]).await;
        let coord = async_domain_replica_up(&c, 1).await;
        c.node(3).faulty.fail_writes.store(1, Ordering::SeqCst);
        coord.write(MIB, pattern(2, 64 << 10), false).await.unwrap();
        coord
            .write(2 * MIB, pattern(3, 64 << 10), false)
            .await
            .unwrap();
        coord.flush().await.unwrap();
        async_domain_replica_caught_up(&c, coord).await;
    })
    .await
}

/// Seed 1600 (profile 7): a write failed on every in-sync replica but was queued to the
/// volume's async-domain replica, which took it. Such a range is compared when an async
/// replica leaves async, but one async by choice never leaves it: it held a write no
/// other copy has, for good. It must be compared (resynced) and turn async again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_domain_replica_holding_a_write_that_failed_everywhere_is_compared() {
    bounded(async {
        let c = TestCluster::with_async_domains(&[1, 3], ["A", "A", "B"], &["B"]).await;
        // On node 2, so that node 1, the only in-sync copy, is reached over the wire.
        let coord = async_domain_replica_up(&c, 2).await;
        c.node(1).faulty.fail_writes.store(1, Ordering::SeqCst);
        let failed = coord.write(MIB, pattern(2, 64 << 10), false).await;
        assert!(failed.is_err(), "the write failed on every in-sync replica");
        async_domain_replica_caught_up(&c, coord).await;
    })
    .await
}

/// Seed 68 (profile 7): the last in-sync replica restarted uncleanly while the volume's
/// async-domain replica kept up. The async one may hold acked writes the restarted copy
/// lost, so it was given a full comparison (`dirty` = everything), but its queue ran on
/// and its record stayed `async`: nothing ever compared it, and its lag (the DR copy's
/// RPO) stayed at the whole volume for good. It must be committed out of sync, resynced,
/// and turn async again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_domain_replica_due_a_full_comparison_is_resynced_and_turns_async_again() {
    bounded(async {
        let mut c = TestCluster::with_async_domains(&[1, 3], ["A", "A", "B"], &["B"]).await;
        // The coordinator runs on node 2, which holds no replica: node 1 is its only
        // in-sync copy, reached over the wire.
        let coord = async_domain_replica_up(&c, 2).await;
        eventually("caught up", || {
            replica_stats(&coord, 3).async_lag_bytes == 0
        })
        .await;
        // kill -9 of node 1 (its activity log stays hot), and a restart.
        c.stop(1).await;
        c.node(1).replicas.0.lock().unwrap().clear();
        c.open_replica(1).await;
        c.start(1).await;
        eventually("node 1 reconnected", || replica_stats(&coord, 1).connected).await;
        coord.write(MIB, pattern(2, 64 << 10), false).await.unwrap();
        async_domain_replica_caught_up(&c, coord).await;
    })
    .await
}

/// An async replica is sent every write in order in the background: a slow one holds up
/// no ack (nor a flush), its lag is reported while it is behind, and after it goes back
/// through resync it is byte-identical and in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_replica_does_not_hold_up_acks_and_receives_writes_in_order() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord
            .write(0, pattern(100, 4 * MIB as usize), false)
            .await
            .unwrap();
        set_mode(&c, &coord, 3, ReplicaState::Async).await;
        assert_eq!(c.replica_state(3), ReplicaState::Async);
        assert_eq!(replica_stats(&coord, 3).state, ReplicaState::Async);
        // An async replica does not count as in sync.
        assert_eq!(c.volume().in_sync_nodes(), vec![1, 2]);

        *c.node(3).faulty.write_delay.lock().unwrap() = Duration::from_millis(300);
        c.node(3).faulty.seen_writes.lock().unwrap().clear();
        let mut order = Vec::new();
        let started = std::time::Instant::now();
        for i in 0..12u64 {
            // Overlapping writes: the last one to each offset must win on every replica.
            let off = (i % 3) * MIB + 4096 * (i % 2);
            coord
                .write(off, pattern(i + 1, 64 << 10), i == 5)
                .await
                .unwrap();
            order.push(off);
        }
        coord.flush().await.unwrap();
        let elapsed = started.elapsed();
        // Synchronously, 12 writes to a replica that takes 300 ms each need 3.6 s.
        assert!(
            elapsed < Duration::from_millis(1800),
            "writes waited for the async replica: {elapsed:?}"
        );
        let s = replica_stats(&coord, 3);
        assert!(s.async_lag_bytes > 0, "{s:?}");
        assert!(s.async_lag_seconds > 0.0, "{s:?}");
        // The other replicas carry no lag.
        assert_eq!(replica_stats(&coord, 2).async_lag_bytes, 0);

        eventually("async replica caught up", || {
            replica_stats(&coord, 3).async_lag_bytes == 0
        })
        .await;
        assert_eq!(replica_stats(&coord, 3).async_lag_seconds, 0.0);
        assert_eq!(*c.node(3).faulty.seen_writes.lock().unwrap(), order);
        // Caught up in order: identical even before it is resynced.
        c.assert_identical(&[1, 2, 3]).await;

        *c.node(3).faulty.write_delay.lock().unwrap() = Duration::ZERO;
        set_mode(&c, &coord, 3, ReplicaState::Resyncing).await;
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        assert_eq!(replica_stats(&coord, 3).async_lag_bytes, 0);
        coord.write(5 * MIB, pattern(77, 8192), true).await.unwrap();
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// An async replica that stalls: writes within the lag bound do not wait for it; the
/// write that would exceed the bound commits it out of sync before it is acked (so an
/// `Async` record never hides a missing acked write, which promotion relies on), and the
/// coordinator resyncs it from its dirty regions once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_async_replica_beyond_the_bound_leaves_async_and_is_resynced() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let mut cfg = c.config(1);
        cfg.async_max_lag_bytes = MIB;
        cfg.replica_timeout = Duration::from_secs(5);
        let coord = c.coordinator_with(cfg).await;
        coord
            .write(0, pattern(1, 8 * MIB as usize), false)
            .await
            .unwrap();
        set_mode(&c, &coord, 2, ReplicaState::Async).await;
        let (release, rx) = watch::channel(false);
        *c.node(2).faulty.stall.lock().unwrap() = Some(rx);

        // Within the bound: acked without waiting for the stalled replica.
        let started = std::time::Instant::now();
        for i in 0..3u64 {
            coord
                .write(10 * MIB + i * 3 * MIB, pattern(i + 10, 256 << 10), false)
                .await
                .unwrap();
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(1500),
            "writes waited for the stalled async replica: {elapsed:?}"
        );
        let s = replica_stats(&coord, 2);
        assert_eq!(s.state, ReplicaState::Async);
        assert!(s.async_lag_bytes >= 512 << 10, "{s:?}");
        assert_eq!(c.replica_state(2), ReplicaState::Async);

        // Beyond the bound: committed out of sync before the ack.
        for i in 3..8u64 {
            coord
                .write(10 * MIB + i * 3 * MIB, pattern(i + 10, 256 << 10), false)
                .await
                .unwrap();
            if c.replica_state(2) != ReplicaState::Async {
                break;
            }
        }
        assert_ne!(c.replica_state(2), ReplicaState::Async);
        assert_ne!(c.replica_state(2), ReplicaState::InSync);
        assert_eq!(
            coord.stats().ejections,
            0,
            "an async replica was never counted in sync"
        );

        // The link recovers: the coordinator resyncs it.
        release.send_replace(true);
        coord.write_zeroes(MIB, 2 * MIB, false).await.unwrap();
        eventually("node 2 back in sync", || {
            c.replica_state(2) == ReplicaState::InSync
        })
        .await;
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        assert_eq!(coord.read(MIB, 4096).await.unwrap(), vec![0u8; 4096]);
        coord.close().await.unwrap();
    })
    .await
}

/// A replica that fails while async (its node dies) is committed out of sync by the
/// next write (before its ack) and resynced from its dirty regions when it is back; it
/// never counted for acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_replica_that_dies_is_resynced_from_dirty_regions() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        set_mode(&c, &coord, 3, ReplicaState::Async).await;
        c.stop(3).await;
        for i in 0..4u64 {
            coord
                .write(i * 7 * MIB, pattern(i + 40, 100_000), false)
                .await
                .unwrap();
        }
        // Its queue fails; the next write commits it out of sync before being acked.
        let mut i = 4u64;
        while c.replica_state(3) == ReplicaState::Async && i < 40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            coord
                .write(i * MIB, pattern(i + 40, 4096), false)
                .await
                .unwrap();
            i += 1;
        }
        assert_eq!(c.replica_state(3), ReplicaState::OutOfSync);
        assert_eq!(coord.stats().ejections, 0);
        c.start(3).await;
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// F1: after `domains deactivate A --promote-async`, a coordinator outside A (on the
/// promoted async replica's node) must never ack a write that reached no replica. The
/// promoted replica takes the writes (it is in sync now), and what was acked reads back
/// from it after the coordinator is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_async_replica_takes_every_later_write_and_nothing_is_acked_without_a_copy() {
    bounded(async {
        let mut c = TestCluster::in_domains(&[1, 3], ["A", "A", "B"]).await;
        let coord = c.coordinator(3).await;
        coord.write(0, pattern(1, 64 << 10), false).await.unwrap();
        set_mode(&c, &coord, 3, ReplicaState::Async).await;
        assert_eq!(replica_stats(&coord, 3).state, ReplicaState::Async);
        coord.write(MIB, pattern(2, 64 << 10), false).await.unwrap();
        eventually("async replica caught up", || {
            replica_stats(&coord, 3).async_lag_bytes == 0
        })
        .await;
        // Site A is lost, and the operator promotes the async copy.
        c.stop(1).await;
        c.meta
            .apply(&Command::SetDomainActive {
                domain: "A".into(),
                active: false,
                promote_async: true,
                unix_seconds: 1,
            })
            .unwrap();
        assert_eq!(c.replica_state(3), ReplicaState::InSync);
        coord.adopt_replica_states().await;
        // Membership refreshes run in the background too; let them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let acked = coord.write(2 * MIB, pattern(3, 64 << 10), false).await;
        let flushed = coord.flush().await;
        // The running coordinator adopts the promoted copy as its in-sync replica.
        assert!(acked.is_ok(), "{acked:?}");
        if acked.is_ok() {
            assert!(flushed.is_ok(), "{flushed:?}");
            let local = c.node(3).replica();
            assert!(
                local.read(2 * MIB, 64 << 10).await.unwrap() == pattern(3, 64 << 10),
                "a write was acked that no replica holds"
            );
        }
        coord.close().await.ok();
        drop(coord);
        let coord = c.coordinator(3).await;
        assert!(coord.read(0, 64 << 10).await.unwrap() == pattern(1, 64 << 10));
        assert!(coord.read(MIB, 64 << 10).await.unwrap() == pattern(2, 64 << 10));
        if acked.is_ok() {
            assert!(
                coord.read(2 * MIB, 64 << 10).await.unwrap() == pattern(3, 64 << 10),
                "an acked and flushed write is lost"
            );
        }
        // The promoted copy serves writes as the in-sync replica.
        coord.write(3 * MIB, pattern(4, 4096), true).await.unwrap();
        coord.close().await.unwrap();
    })
    .await
}

/// F4 (fsyncgate): node 3's writeback of an unflushed write fails (the page is dropped,
/// its disk holds the old bytes), then `fail` makes it report an error, and node 3 must
/// get every region since its last good flush compared (here: a full comparison) before it
/// is in sync again, never only the failed I/O's range or an empty bitmap.
async fn lost_writeback_gets_a_full_comparison<F, Fut>(fail: F)
where
    F: FnOnce(TestCluster, Arc<Coordinator>) -> Fut,
    Fut: Future<Output = (TestCluster, Arc<Coordinator>)>,
{
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord.write(0, pattern(1, 64 << 10), true).await.unwrap();
        coord.write(0, pattern(2, 64 << 10), false).await.unwrap();
        lose_unflushed(&c, 3, 0, &pattern(1, 64 << 10));
        let (c, coord) = fail(c, coord).await;
        assert_ne!(
            c.replica_state(3),
            ReplicaState::InSync,
            "node 3 was not ejected"
        );
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        assert_eq!(
            replica_stats(&coord, 3).resync_done_bytes,
            SIZE,
            "a full comparison"
        );
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// F4: the next fsync reports EIO, once (a retried one would succeed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_flush_ejects_with_everything_since_the_last_good_flush_to_compare() {
    lost_writeback_gets_a_full_comparison(|c, coord| async move {
        c.node(3).faulty.fail_flushes.store(1, Ordering::SeqCst);
        coord.flush().await.unwrap();
        (c, coord)
    })
    .await
}

/// F4, the FUA variant: a FUA write the replica itself failed (a status, such as EIO from
/// its fdatasync), far from the lost write, calls for the same full comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fua_write_ejects_with_everything_since_the_last_good_flush_to_compare() {
    lost_writeback_gets_a_full_comparison(|c, coord| async move {
        c.node(3).faulty.fail_writes.store(1, Ordering::SeqCst);
        coord.write(40 * MIB, pattern(3, 4096), true).await.unwrap();
        (c, coord)
    })
    .await
}

/// A 4 KiB block of pseudo-random bytes whose crc32 is `target`: crc32 is affine over
/// GF(2), so the last 4 bytes are solved for (Gaussian elimination on their 32 bits).
fn block_with_crc32(target: u32, seed: u64) -> Vec<u8> {
    let mut block = pattern(seed, BLOCK_SIZE);
    let tail = BLOCK_SIZE - 4;
    block[tail..].fill(0);
    let base = crc32fast::hash(&block);
    // Column i: how flipping bit i of the tail changes the crc.
    let cols: Vec<u32> = (0..32)
        .map(|i| {
            let mut b = block.clone();
            b[tail + i / 8] ^= 1 << (i % 8);
            crc32fast::hash(&b) ^ base
        })
        .collect();
    // Solve sum(x_i * cols[i]) = base ^ target: rows are crc bits, augmented with the
    // combination of tail bits that produced them.
    let mut rows: Vec<(u32, u32)> = cols
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, 1u32 << i))
        .collect();
    let mut basis: Vec<(u32, u32)> = Vec::new();
    for (mut v, mut combo) in rows.drain(..) {
        for &(bv, bc) in &basis {
            if v ^ bv < v {
                v ^= bv;
                combo ^= bc;
            }
        }
        if v != 0 {
            basis.push((v, combo));
            basis.sort_by_key(|b| std::cmp::Reverse(b.0));
        }
    }
    let mut want = base ^ target;
    let mut bits = 0u32;
    for &(bv, bc) in &basis {
        if want ^ bv < want {
            want ^= bv;
            bits ^= bc;
        }
    }
    assert_eq!(want, 0, "the tail spans every crc");
    for i in 0..32 {
        if bits & (1 << i) != 0 {
            block[tail + i / 8] ^= 1 << (i % 8);
        }
    }
    assert_eq!(crc32fast::hash(&block), target);
    block
}

/// F7: comparisons must not trust a 32-bit crc match. A written block whose crc32 equals
/// that of a zero block (one in 2^32 random blocks) must still reach a brand-new replica,
/// and `verify` must see a difference that crc32 cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_whose_crc32_equals_the_zero_blocks_reaches_a_new_replica() {
    bounded(async {
        let c = TestCluster::new(&[1, 2]).await;
        let coord = c.coordinator(1).await;
        let zero_crc = crc32fast::hash(&[0u8; BLOCK_SIZE]);
        let tricky = block_with_crc32(zero_crc, 7);
        coord.write(8 * MIB, tricky.clone(), true).await.unwrap();
        let mut replicas = c.volume().replicas;
        replicas.push(ReplicaRecord {
            node: 3,
            state: ReplicaState::OutOfSync,
            generation: coord.generation(),
            resync_done_bytes: 0,
            resync_total_bytes: 0,
        });
        c.meta
            .apply(&Command::SetReplicas {
                name: VOLUME.into(),
                replicas,
                repl: 3,
                generation: coord.generation(),
            })
            .unwrap();
        eventually("node 3 in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        let on3 = c.node(3).replica().read(8 * MIB, BLOCK_SIZE).await.unwrap();
        assert!(on3 == tricky, "the new replica did not get the block");
        // Same crc32, other bytes: verify must report it.
        let other = block_with_crc32(crc32fast::hash(&tricky), 8);
        c.node(2)
            .replica()
            .write(8 * MIB, other, true)
            .await
            .unwrap();
        let report = coord.verify().await.unwrap();
        assert_eq!(report.mismatched_blocks, 1, "{report:?}");
        coord.close().await.unwrap();
    })
    .await
}

/// Reverts `len` bytes at `offset` of node `id`'s data file to `old` behind the store's
/// back: a write it acked and never flushed, lost with its page cache.
fn lose_unflushed(c: &TestCluster, id: u64, offset: u64, old: &[u8]) {
    let path = c.node(id).pool.dir().join(format!("{}.data", c.vol_id));
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(old, offset).unwrap();
}

/// F6: an unclean stop followed by a clean restart (the coordinator could not reach the
/// first incarnation) must still give a full comparison: the store keeps "needs a full
/// comparison" until a coordinator's full comparison clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_then_clean_restart_still_gets_a_full_comparison() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord.write(0, pattern(1, 64 << 10), true).await.unwrap();
        // Acked by all, flushed by none.
        coord.write(0, pattern(2, 64 << 10), false).await.unwrap();
        c.stop(3).await;
        c.node(3).replicas.0.lock().unwrap().clear(); // kill -9
        coord
            .write(10 * MIB, pattern(3, 4096), false)
            .await
            .unwrap();
        assert_eq!(c.replica_state(3), ReplicaState::OutOfSync);
        // Power loss on node 3: the unflushed write is gone from its disk.
        lose_unflushed(&c, 3, 0, &pattern(1, 64 << 10));
        // First incarnation recovers, then stops cleanly before the coordinator saw it.
        c.open_replica(3).await;
        assert!(c.node(3).replica().recovered_regions() > 0);
        c.node(3).replica().close().await.unwrap();
        c.node(3).replicas.0.lock().unwrap().clear();
        c.open_replica(3).await;
        assert_eq!(c.node(3).replica().recovered_regions(), 0);
        c.start(3).await;
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        assert_eq!(replica_stats(&coord, 3).resync_done_bytes, SIZE);
        assert_verify_clean(&coord, 3).await;
        c.assert_identical(&[1, 2, 3]).await;
        // The full comparison cleared the flag: the next restart is an ordinary one.
        assert_eq!(c.node(3).replica().suspect().0, 0);
        coord.close().await.unwrap();
    })
    .await
}

/// Removes node `id`'s replica files (a missing pool mount, a replaced disk) and opens
/// the replica again: its files are created empty.
async fn wipe_replica(c: &TestCluster, id: u64) {
    c.node(id).replicas.0.lock().unwrap().clear();
    for ext in ["data", "crc", "al", "suspect"] {
        let _ = std::fs::remove_file(c.node(id).pool.dir().join(format!("{}.{ext}", c.vol_id)));
    }
    c.open_replica(id).await;
}

/// F5: a replica whose files are missing is opened empty; it must never be trusted as
/// in sync. A running coordinator gives it a full copy; a new coordinator on its node does
/// not serve its zeros (nor spread them) but ejects it and copies the data back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_recreated_empty_is_never_trusted() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        coord
            .write(0, pattern(1, MIB as usize), true)
            .await
            .unwrap();
        coord
            .write(20 * MIB, pattern(2, MIB as usize), true)
            .await
            .unwrap();
        // Node 3 restarts with an empty pool.
        c.stop(3).await;
        wipe_replica(&c, 3).await;
        coord
            .write(40 * MIB, pattern(3, 4096), false)
            .await
            .unwrap();
        c.start(3).await;
        eventually("node 3 back in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
        drop(coord);
        // Node 2's pool goes missing while detached; then the volume attaches there.
        c.stop(2).await;
        wipe_replica(&c, 2).await;
        c.start(2).await;
        let coord = c.coordinator(2).await;
        assert!(coord.read(0, MIB as usize).await.unwrap() == pattern(1, MIB as usize));
        assert!(coord.read(20 * MIB, MIB as usize).await.unwrap() == pattern(2, MIB as usize));
        eventually("node 2 back in sync", || {
            c.replica_state(2) == ReplicaState::InSync
        })
        .await;
        c.assert_identical(&[1, 2, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// F11: the last in-sync replica's connection is lost (its node restarted while the volume
/// was idle). It cannot be ejected, so the coordinator reconnects to it (a new session at
/// the same generation) instead of failing every read and flush on the dead connection,
/// and the resync of the other replica then goes on from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_in_sync_replica_that_restarts_is_reconnected() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 3]).await;
        // The coordinator runs on node 2, which holds no replica (an `attach --force`).
        let coord = c.coordinator(2).await;
        coord
            .write(0, pattern(1, MIB as usize), true)
            .await
            .unwrap();
        c.stop(1).await;
        coord.write(4 * MIB, pattern(2, 4096), true).await.unwrap();
        assert_eq!(c.replica_state(1), ReplicaState::OutOfSync);
        // Node 3, now the only in-sync copy, restarts while nothing is written.
        c.stop(3).await;
        c.start(3).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let deadline = std::time::Instant::now() + WAIT;
        while let Err(e) = coord.read(0, 4096).await {
            assert!(
                std::time::Instant::now() < deadline,
                "reads still fail: {e}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(coord.read(0, MIB as usize).await.unwrap() == pattern(1, MIB as usize));
        coord.flush().await.unwrap();
        coord.write(8 * MIB, pattern(3, 4096), false).await.unwrap();
        // Node 1 comes back and is resynced from node 3.
        c.start(1).await;
        eventually("node 1 back in sync", || {
            c.replica_state(1) == ReplicaState::InSync
        })
        .await;
        assert_verify_clean(&coord, 2).await;
        c.assert_identical(&[1, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// F8: an async replica is a copy a local disk could be after a power loss: every write
/// before a client flush is made durable on it, in order (the flush travels through its
/// queue), so a promotion after a far-node crash gets a crash-consistent image. And when
/// its node goes away while the volume is idle, its record leaves `async` at once instead
/// of at the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_replica_is_flushed_in_order_and_a_lost_one_leaves_async_at_once() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        set_mode(&c, &coord, 3, ReplicaState::Async).await;
        c.node(3).faulty.seen_writes.lock().unwrap().clear();
        for i in 0..5u64 {
            coord.write(i * MIB, pattern(i, 4096), false).await.unwrap();
        }
        coord.flush().await.unwrap();
        eventually(
            "the flush reached the async replica after its five writes",
            || {
                c.node(3)
                    .faulty
                    .seen_flushes
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|&n| n >= 5)
            },
        )
        .await;
        // Its node dies while nothing is written.
        c.stop(3).await;
        eventually("the lost async replica left async", || {
            c.replica_state(3) != ReplicaState::Async
        })
        .await;
        coord.close().await.unwrap();
    })
    .await
}

/// S1: a local write that stalls before it reaches the replica's fence and times out
/// ejects the local replica; the resync must start a new session on it (an `Open`
/// barrier), so the stalled write is refused when it finally arrives instead of landing
/// after the resync copied its region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_local_write_can_never_land_after_the_local_resync() {
    bounded(async {
        let c = TestCluster::new(&[1, 2, 3]).await;
        let mut cfg = c.config(1);
        cfg.replica_timeout = Duration::from_millis(300);
        let coord = c.coordinator_with(cfg).await;
        let at = 3 * MIB + 512;
        coord.write(0, pattern(1, 4096), false).await.unwrap();
        let release = c.hold_write(1, at);
        coord.write(at, pattern(2, 4096), false).await.unwrap();
        assert_ne!(
            c.replica_state(1),
            ReplicaState::InSync,
            "local replica not ejected"
        );
        coord.write(at, pattern(3, 4096), false).await.unwrap();
        eventually("node 1 back in sync", || {
            c.replica_state(1) == ReplicaState::InSync
        })
        .await;
        assert_eq!(
            c.release_held(1, release).await,
            Some(libc::ESTALE as u32),
            "a local frame of an older session must be refused"
        );
        c.assert_identical(&[1, 2, 3]).await;
        assert!(coord.read(at, 4096).await.unwrap() == pattern(3, 4096));
        coord.close().await.unwrap();
    })
    .await
}

/// S2: the RF 1 fast path writes to the store directly, but through a fenced local session:
/// once a coordinator elsewhere opened the replica at a newer generation (`attach --force`),
/// every later local I/O is refused, and that coordinator's `Open` waits for the local I/O
/// already running, so two writers never both get acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fast_path_is_fenced_by_a_takeover_elsewhere() {
    bounded(async {
        let c = TestCluster::new(&[1]).await;
        let vol = c.attach(1);
        let server = c.node(1).server.clone();
        let session = server
            .open_local_session(c.wire_id(), vol.generation)
            .await
            .unwrap();
        let r = c.node(1).replica();
        session
            .run(r.write(0, pattern(1, 4096), false))
            .await
            .unwrap()
            .unwrap();
        // Node 2 takes over and opens the replica through node 1's server.
        let coord = c.coordinator(2).await;
        let refused = session.run(r.write(0, pattern(2, 4096), false)).await;
        assert_eq!(
            refused.err(),
            Some(libc::ESTALE),
            "the old local session still writes"
        );
        assert!(coord.read(0, 4096).await.unwrap() == pattern(1, 4096));
        coord.close().await.unwrap();
    })
    .await
}

/// Found by the simulation (seed 9823, profile 7): a write taken by one in-sync replica
/// and failed by the other, whose ejection the metadata then refused (the first had
/// turned async meanwhile, so the second was the last in-sync copy). The write failed,
/// but nothing recorded that it had landed on one copy and not the other: the copy that
/// took it turned async without comparing that range, and the two differed for good. A
/// write that fails because an ejection was refused is now an unknown outcome, like one
/// that failed on every in-sync replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_whose_ejection_is_refused_leaves_no_divergence() {
    bounded(async {
        let c = TestCluster::new(&[1, 2]).await;
        let mut cfg = c.config(1);
        cfg.replica_timeout = Duration::from_millis(300);
        let coord = c.coordinator_with(cfg).await;
        let at = 3 * MIB;
        coord.write(at, pattern(1, 4096), true).await.unwrap();
        // The write lands on node 1 and stalls on node 2...
        let release = c.hold_write(2, at);
        let write = {
            let coord = coord.clone();
            tokio::spawn(async move { coord.write(at, pattern(2, 4096), false).await })
        };
        eventually("the write held on node 2", || {
            c.node(2).server.hold.lock().unwrap().is_none()
        })
        .await;
        // ...and node 1 turns async while it is in flight: node 2, which times out, is the
        // last in-sync copy and cannot be ejected.
        set_mode(&c, &coord, 1, ReplicaState::Async).await;
        assert_eq!(replica_stats(&coord, 1).state, ReplicaState::Async);
        let res = write.await.unwrap();
        assert!(
            matches!(res, Err(ReplicationError::EjectRefused { node: 2, .. })),
            "{res:?}"
        );
        // Node 1 took the write and node 2 did not: node 1 must compare that range before
        // it counts as caught up (or resync and be in sync again).
        eventually("node 1 settled", || {
            let r = replica_stats(&coord, 1);
            r.connected
                && (r.state == ReplicaState::InSync
                    || (r.state == ReplicaState::Async && r.async_lag_bytes == 0))
        })
        .await;
        c.assert_identical(&[1, 2]).await;
        assert_eq!(
            c.release_held(2, release).await,
            Some(libc::ESTALE as u32),
            "the timed-out frame landed"
        );
        c.assert_identical(&[1, 2]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// The volume holds a first write at `at`; node 3 was stopped while `regions` other
/// regions were written, and comes back with every write to it taking `delay`: its resync
/// is slow.
async fn restart_node3_resyncing_slowly(
    c: &mut TestCluster,
    coord: &Coordinator,
    at: u64,
    regions: u64,
    delay: Duration,
) {
    coord.write(at, pattern(1, 4096), true).await.unwrap();
    c.stop(3).await;
    for i in 0..regions {
        coord
            .write(i * 2 * MIB + 8192, pattern(50 + i, 4096), false)
            .await
            .unwrap();
    }
    assert_eq!(c.replica_state(3), ReplicaState::OutOfSync);
    *c.node(3).faulty.write_delay.lock().unwrap() = delay;
    c.start(3).await;
}

/// After a write failed on node 1 (held there by `release`): node 3 resyncs at full speed
/// and is in sync, the held frame is refused when it reaches node 1 at last, and the two
/// copies are byte-identical.
async fn assert_node3_heals_identical(
    c: &TestCluster,
    coord: &Coordinator,
    release: watch::Sender<bool>,
) {
    *c.node(3).faulty.write_delay.lock().unwrap() = Duration::ZERO;
    eventually("node 3 in sync", || {
        c.replica_state(3) == ReplicaState::InSync
    })
    .await;
    assert_eq!(
        c.release_held(1, release).await,
        Some(libc::ESTALE as u32),
        "the timed-out frame landed after the resync"
    );
    assert_verify_clean(coord, 2).await;
    c.assert_identical(&[1, 3]).await;
}

/// Found in CI (the test above, under load): the write that fails on the last in-sync
/// replica landed on a resyncing replica, which a failed resync copy had sent back to out
/// of sync while the write was in flight. The unknown-outcome rule marked the range only
/// on replicas still resyncing, so this one never compared it again and was promoted
/// holding a write the in-sync copy lacked. Every replica that is neither in sync nor
/// async now compares the range again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_failing_everywhere_while_its_resyncing_replica_is_ejected_leaves_no_divergence() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 3]).await;
        let mut cfg = c.config(1);
        cfg.replica_timeout = Duration::from_millis(1500);
        // A failed resync is retried only after this: node 3 stays out of sync until the
        // write has failed.
        cfg.resync_retry = Duration::from_secs(3);
        let coord = c.coordinator_with(cfg).await;
        let at = 5 * MIB;
        restart_node3_resyncing_slowly(&mut c, &coord, at, 16, Duration::from_millis(300)).await;
        eventually("node 3 resyncing", || {
            c.replica_state(3) == ReplicaState::Resyncing
        })
        .await;
        // The write stalls on node 1 (the only in-sync replica) and reaches node 3...
        let seen_before = c.node(3).faulty.seen_writes.lock().unwrap().len();
        let release = c.hold_write(1, at);
        let write = {
            let coord = coord.clone();
            tokio::spawn(async move { coord.write(at, pattern(2, 4096), false).await })
        };
        // ...and lands there; then the next resync copy fails: node 3 goes back to out of
        // sync while the write is still in flight on node 1.
        eventually("the write reached node 3", || {
            c.node(3).faulty.seen_writes.lock().unwrap()[seen_before..].contains(&at)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.node(3)
            .faulty
            .fail_writes
            .store(1, std::sync::atomic::Ordering::SeqCst);
        eventually("node 3 ejected by the failed copy", || {
            c.replica_state(3) == ReplicaState::OutOfSync
        })
        .await;
        let res = write.await.unwrap();
        assert!(res.is_err(), "acked without the in-sync replica: {res:?}");
        assert_node3_heals_identical(&c, &coord, release).await;
        coord.close().await.unwrap();
    })
    .await
}

/// Node 3 resyncs slowly (`regions` regions, each write to it taking `delay`); once `ready`,
/// a write stalls on node 1, the only in-sync replica, until it times out (nothing can be
/// ejected, so it fails), while it reaches node 3. Node 3 must compare its range again,
/// and the stalled frame must never land on node 1 later: the two end byte-identical.
async fn write_failing_on_node1_while_node3_resyncs(
    regions: u64,
    delay: Duration,
    timeout: Duration,
    ready: impl Fn(&TestCluster, &Coordinator) -> bool,
) {
    let mut c = TestCluster::new(&[1, 3]).await;
    let mut cfg = c.config(1);
    cfg.replica_timeout = timeout;
    let coord = c.coordinator_with(cfg).await;
    let at = 5 * MIB;
    restart_node3_resyncing_slowly(&mut c, &coord, at, regions, delay).await;
    eventually("node 3 resyncing", || ready(&c, &coord)).await;
    let release = c.hold_write(1, at);
    let res = coord.write(at, pattern(2, 4096), false).await;
    assert!(res.is_err(), "acked without the in-sync replica: {res:?}");
    assert_node3_heals_identical(&c, &coord, release).await;
    coord.close().await.unwrap();
}

/// The write that fails on the last in-sync replica reaches a resyncing replica while that
/// replica copies its last dirty region: its promotion waits for the write (it quiesces
/// every range), sees the region marked to compare again, and compares it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_failing_while_its_resyncing_replica_is_promoted_leaves_no_divergence() {
    bounded(write_failing_on_node1_while_node3_resyncs(
        2,
        Duration::from_millis(800),
        Duration::from_millis(1200),
        // The last dirty region is being copied (for 800 ms): nothing is left in the bitmap.
        |c, coord| {
            c.replica_state(3) == ReplicaState::Resyncing
                && coord
                    .stats()
                    .replicas
                    .iter()
                    .any(|r| r.node == 3 && r.dirty_bytes == Some(0))
        },
    ))
    .await
}

/// Found by the simulation (seed 108, timing-dependent): the write fails on the last
/// in-sync replica while a resyncing replica took it (see
/// `write_failing_on_node1_while_node3_resyncs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_that_times_out_on_the_last_in_sync_replica_leaves_no_divergence() {
    bounded(write_failing_on_node1_while_node3_resyncs(
        16,
        Duration::from_millis(100),
        Duration::from_millis(300),
        |c, _| c.replica_state(3) == ReplicaState::Resyncing,
    ))
    .await
}

/// Found by the simulation (seed 524, timing-dependent): a resyncing replica turned in sync
/// while a write that it took, and that timed out on the only other in-sync replica, was
/// still in flight. Turning in sync now waits for in-flight writes, so the failed write
/// marks it dirty again first and the two end byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_does_not_turn_in_sync_under_a_write_with_an_unknown_outcome() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 3]).await;
        let mut cfg = c.config(2);
        cfg.replica_timeout = Duration::from_millis(400);
        let coord = c.coordinator_with(cfg).await;
        let at = 5 * MIB;
        coord.write(at, pattern(1, 4096), true).await.unwrap();
        c.stop(3).await;
        coord.write(0, pattern(2, 4096), true).await.unwrap();
        // Node 3's resync is held at its one copy (block 0).
        let (release3, rx3) = watch::channel(false);
        *c.node(3).faulty.hold.lock().unwrap() = Some((0, rx3));
        c.start(3).await;
        eventually("node 3 resyncing", || {
            c.replica_state(3) == ReplicaState::Resyncing
        })
        .await;
        // A write that node 3 takes and node 1 (the only in-sync replica) never answers.
        let release1 = c.hold_write(1, at);
        let coord2 = coord.clone();
        let w = tokio::spawn(async move { coord2.write(at, pattern(3, 4096), false).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The resync finishes while that write is in flight.
        release3.send_replace(true);
        assert!(w.await.unwrap().is_err());

        eventually("node 3 in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        // Several membership checks: node 1 gets its new session before the frame arrives.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            c.release_held(1, release1).await,
            Some(libc::ESTALE as u32),
            "the timed-out frame landed late"
        );
        eventually("both in sync", || {
            c.replica_state(1) == ReplicaState::InSync && c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        assert_verify_clean(&coord, 2).await;
        c.assert_identical(&[1, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// M2: a bad block on the first in-sync source must not stall a resync forever; it copies
/// from another in-sync replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_copies_from_another_source_when_the_first_has_a_bad_block() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 2, 3]).await;
        let coord = c.coordinator(1).await;
        let at = 6 * MIB;
        c.stop(3).await;
        coord.write(at, pattern(1, 64 << 10), true).await.unwrap();
        assert_eq!(c.replica_state(3), ReplicaState::OutOfSync);
        // The local replica (the first source) rots a block of that region.
        c.corrupt(1, at + 100);
        c.start(3).await;
        eventually("node 3 in sync", || {
            c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        c.assert_identical(&[2, 3]).await;
        assert!(coord.read(at, 64 << 10).await.unwrap() == pattern(1, 64 << 10));
        assert_verify_clean(&coord, 3).await;
        coord.close().await.unwrap();
    })
    .await
}

/// M3: two copies with different bad blocks still give the data: read repair assembles
/// the range block by block and rewrites each bad block from the copy that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_repair_merges_copies_block_by_block() {
    bounded(async {
        let c = TestCluster::new(&[1, 2]).await;
        let coord = c.coordinator(1).await;
        let at = 2 * MIB;
        coord.write(at, pattern(9, 8192), true).await.unwrap();
        c.corrupt(1, at + 10);
        c.corrupt(2, at + 4096 + 10);
        let got = coord.read(at, 8192).await;
        assert!(
            got.as_ref().is_ok_and(|d| *d == pattern(9, 8192)),
            "{:?}",
            got.err()
        );
        assert_verify_clean(&coord, 2).await;
        c.assert_identical(&[1, 2]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// Found by the simulation (seed 1007): a write that fails on every in-sync replica still
/// reaches an async replica through its queue. When that replica leaves async, the range
/// is compared again, so it cannot come back in sync holding a write the others lack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_an_async_replica_took_is_compared_when_it_leaves_async() {
    bounded(async {
        let c = TestCluster::new(&[1, 3]).await;
        let mut cfg = c.config(2);
        cfg.replica_timeout = Duration::from_millis(300);
        let coord = c.coordinator_with(cfg).await;
        let at = 5 * MIB;
        coord.write(at, pattern(1, 4096), true).await.unwrap();
        set_mode(&c, &coord, 3, ReplicaState::Async).await;
        // Node 1, the only in-sync replica, never answers this write; node 3's queue
        // delivers it.
        let release = c.hold_write(1, at);
        assert!(coord.write(at, pattern(2, 4096), false).await.is_err());
        eventually("async replica caught up", || {
            replica_stats(&coord, 3).async_lag_bytes == 0
                || replica_stats(&coord, 3).state != ReplicaState::Async
        })
        .await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        c.release_held(1, release).await;
        if c.replica_state(3) == ReplicaState::Async {
            set_mode(&c, &coord, 3, ReplicaState::Resyncing).await;
        }
        eventually("both in sync", || {
            c.replica_state(1) == ReplicaState::InSync && c.replica_state(3) == ReplicaState::InSync
        })
        .await;
        assert_verify_clean(&coord, 2).await;
        c.assert_identical(&[1, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// Found by the simulation (seed 1155): a replica ejected by a failed flush is due a full
/// comparison (`dirty` = `None`). A later failure of a write it was sent before the
/// ejection marks that write's range, and used to replace "everything" with "that range
/// only": the replica turned in sync without the acked writes it missed elsewhere.
#[test]
fn a_due_full_comparison_is_never_narrowed_by_a_later_mark() {
    use super::coordinator::Member;
    let now = tokio::time::Instant::now();
    let mut m = Member::new(2, ReplicaState::OutOfSync);
    assert!(m.dirty.is_none(), "a full comparison is due");
    m.mark_behind(SIZE, &[], now);
    assert!(m.dirty.is_none(), "nothing marked: still a full comparison");
    m.mark_behind(SIZE, &[(3 * MIB, 4096)], now);
    assert!(m.dirty.is_none(), "a full comparison covers any range");
    // An async replica tracks what it misses from the moment it turned async (an empty
    // bitmap then)...
    let mut a = Member::new(3, ReplicaState::Async);
    a.dirty = Some(super::bitmap::RegionBitmap::empty(
        SIZE.div_ceil(DIRTY_REGION_BYTES),
    ));
    a.mark_behind(SIZE, &[(3 * MIB, 4096)], now);
    let d = a.dirty.as_ref().expect("tracked");
    assert_eq!(d.first_set(), Some(3));
    // ...and one with no bitmap is due a full comparison, which stays one (seed 68).
    let mut a = Member::new(3, ReplicaState::Async);
    a.mark_behind(SIZE, &[(3 * MIB, 4096)], now);
    assert!(a.dirty.is_none(), "a full comparison covers any range");
}

/// Writes pattern 1 at 5 MiB from a coordinator on node 2, then pattern 2, which fails
/// on both in-sync replicas: node 1 refuses it (nothing lands), node 3 takes it and its
/// answer is lost. Nobody is ejected for that write; node 3 gets a new session. Returns
/// once both are in sync and connected again.
async fn fail_a_write_everywhere_with_a_lost_answer(c: &TestCluster) -> Arc<Coordinator> {
    let mut cfg = c.config(2);
    cfg.replica_timeout = Duration::from_millis(300);
    let coord = c.coordinator_with(cfg).await;
    let at = 5 * MIB;
    coord.write(at, pattern(1, 4096), true).await.unwrap();
    c.node(1).faulty.fail_writes.store(1, Ordering::SeqCst);
    c.node(3).faulty.drop_replies.store(1, Ordering::SeqCst);
    let res = coord.write(at, pattern(2, 4096), false).await;
    assert!(res.is_err(), "acked without an in-sync copy: {res:?}");
    eventually("both in sync and connected", || {
        coord
            .stats()
            .replicas
            .iter()
            .all(|r| r.state == ReplicaState::InSync && r.connected)
    })
    .await;
    coord
}

/// M1: a write that failed on every in-sync replica may have landed on one of them, so
/// its region may differ between them (it stays unclean for the coordinator's life). A
/// clean close used to clear it from the hot set without comparing it: both replicas
/// stayed in sync with different bytes, and which one a read returned depended on where
/// the volume was attached. Close now reconciles unclean regions first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reconciles_a_region_whose_write_failed_on_every_replica() {
    bounded(async {
        let c = TestCluster::new(&[1, 3]).await;
        let coord = fail_a_write_everywhere_with_a_lost_answer(&c).await;
        coord.close().await.unwrap();
        assert_eq!(c.replica_state(1), ReplicaState::InSync);
        assert_eq!(c.replica_state(3), ReplicaState::InSync);
        c.assert_identical(&[1, 3]).await;
    })
    .await
}

/// Found by the simulation (seed 615, with lost metadata replies): a replica-state change
/// that committed but whose reply was lost was treated as failed, so the coordinator's
/// memory stayed behind the record: a promotion to in sync never took effect in memory,
/// and its only in-sync copy stayed "resyncing" for good. The applied metadata tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_change_whose_reply_was_lost_is_taken_from_the_metadata() {
    bounded(async {
        let mut c = TestCluster::new(&[1, 3]).await;
        let coord = c.coordinator(1).await;
        c.stop(3).await;
        coord.write(0, pattern(1, 4096), true).await.unwrap();
        assert_eq!(c.replica_state(3), ReplicaState::OutOfSync);
        // From now on every proposal commits, and reports failure.
        c.meta.lose_next_replies(u32::MAX);
        c.start(3).await;
        eventually("node 3 in sync in the coordinator's memory", || {
            replica_stats(&coord, 3).state == ReplicaState::InSync
        })
        .await;
        assert_eq!(c.replica_state(3), ReplicaState::InSync);
        c.meta.lose_next_replies(0);
        c.assert_identical(&[1, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// Found by the simulation (seed 11536, profile 4): a write failed on every in-sync
/// replica and landed on one of them, whose answer was lost. That replica was then
/// ejected (its connection was lost while idle) with nothing dirty: everything before
/// had been acked by it. Its resync copied nothing, it was promoted, and `verify` found
/// the two in-sync replicas different over the failed write. An in-sync replica that
/// leaves now gets every unclean region dirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_sync_replica_ejected_after_a_write_failed_everywhere_compares_its_region() {
    bounded(async {
        let c = TestCluster::new(&[1, 3]).await;
        let coord = fail_a_write_everywhere_with_a_lost_answer(&c).await;
        let r = coord.verify().await.unwrap();
        assert_eq!(r.in_sync_nodes.len(), 2, "{r:?}");
        assert_eq!(r.mismatched_blocks, 0, "{r:?}");
        c.assert_identical(&[1, 3]).await;
        coord.close().await.unwrap();
    })
    .await
}

/// The other half of seed 11536: a write that failed on every in-sync replica, landing
/// on one of them, with both still in sync and connected. Only close and open
/// reconciled unclean regions, so for as long as the coordinator lived the replicas
/// differed and two reads of the block could return different bytes. The resync loop
/// now reconciles unclean regions; the region then retires as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_whose_write_failed_everywhere_is_reconciled_while_the_coordinator_lives() {
    bounded(async {
        let c = TestCluster::new(&[1, 3]).await;
        let mut cfg = c.config(2);
        cfg.hot_idle_retire = Duration::from_millis(100);
        let coord = c.coordinator_with(cfg).await;
        let at = 5 * MIB;
        coord.write(at, pattern(1, 4096), true).await.unwrap();
        c.node(1).faulty.fail_writes.store(1, Ordering::SeqCst);
        c.node(3).faulty.land_then_fail.store(1, Ordering::SeqCst);
        let res = coord.write(at, pattern(2, 4096), false).await;
        assert!(res.is_err(), "acked without an in-sync copy: {res:?}");
        let mut clean = None;
        for _ in 0..200 {
            let r = coord.verify().await.unwrap();
            assert_eq!(r.in_sync_nodes, vec![1, 3], "{r:?}");
            if r.mismatched_blocks == 0 && r.errors.is_empty() {
                clean = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            clean.is_some(),
            "the in-sync replicas still differ 5 s after the failed write"
        );
        assert_eq!(coord.stats().reconciled_blocks, 1);
        assert_eq!(coord.stats().ejections, 0);
        c.assert_identical(&[1, 3]).await;
        // Reconciled, flushed and idle: it retires while the coordinator lives.
        eventually("the hot set empties", || coord.stats().hot_regions == 0).await;
        coord.close().await.unwrap();
    })
    .await
}
