//! Criterion benchmark of one replicated write, in process, over loopback TCP.
//!
//! Two or three nodes in this process, each with its own pool and replica in a temporary
//! directory and a real wire server (`wire::serve` with a `ReplicaServer`) on 127.0.0.1; the
//! metadata is one `InMemoryMeta`; the coordinator runs on node 1 and reaches its local
//! replica through node 1's server and the others over the wire protocol, as tandemd does.
//! This isolates the replication path (coordinator fan-out, framing, TCP on loopback, the
//! replica servers and stores) from NBD and from separate processes.
//!
//! * `replicated_write_4k/rf/<n>`: one 4 KiB write at a random aligned offset, acked by all
//!   `n` replicas, at queue depth 1, on a two-worker tokio runtime (as on a 2-core machine).
//!
//! Run: `cargo bench -p tandem-bench --bench replication` (about 30 s).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tandem_engine::cluster::{ClusterState, Command, NodeRecord, VolumeRecord};
use tandem_engine::io::IoEngine;
use tandem_engine::replication::{
    Coordinator, CoordinatorConfig, InMemoryMeta, LocalReplicas, MetaProposer, ReplicaServer,
};
use tandem_engine::store::{Pool, Replica, BLOCK_SIZE};
use tandem_engine::wire::{self, FrameHandler};
use tokio::net::TcpListener;
use tokio::sync::watch;

const TOKEN: &[u8] = b"bench-replication-token";
const VOLUME: &str = "bench";
/// Volume size: 16 activity-log regions, all hot after the fill.
const VOLUME_BYTES: u64 = 64 << 20;
const POOL_BYTES: u64 = 256 << 20;
const FILL_CHUNK: usize = 1 << 20;

#[derive(Default)]
struct Replicas(Mutex<HashMap<u64, Arc<Replica>>>);

impl LocalReplicas for Replicas {
    fn get(&self, volume_wire_id: u64) -> Option<Arc<Replica>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&volume_wire_id)
            .cloned()
    }
}

/// A replicated volume with its coordinator on node 1; dropping it stops the servers.
struct Fixture {
    coordinator: Arc<Coordinator>,
    _stops: Vec<watch::Sender<bool>>,
    _dir: tempfile::TempDir,
}

/// The records are built from JSON so that fields the engine adds later with a
/// `#[serde(default)]` do not break this benchmark.
fn node_record(id: u64) -> NodeRecord {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "name": format!("node{id}"),
        "admin_addr": "127.0.0.1:1",
        "data_addr": "127.0.0.1:1",
        "domain": "d",
        "zone": "z",
        "rack": "r",
        "role": "voter",
        "pool_size_bytes": POOL_BYTES,
        "joined_unix_seconds": 0,
    }))
    .expect("a valid node record")
}

/// A volume of `rf` in-sync replicas on nodes 1..=rf, not attached.
fn volume_record(rf: u64) -> VolumeRecord {
    let replicas: Vec<_> = (1..=rf)
        .map(|node| serde_json::json!({ "node": node, "state": "in-sync", "generation": 0 }))
        .collect();
    serde_json::from_value(serde_json::json!({
        "id": "",
        "name": VOLUME,
        "size_bytes": VOLUME_BYTES,
        "repl": rf,
        "io_priority": "medium",
        "labels": {},
        "created_unix_seconds": 0,
        "generation": 0,
        "attached_node": null,
        "replicas": replicas,
    }))
    .expect("a valid volume record")
}

async fn fixture(rf: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let meta = InMemoryMeta::new(ClusterState::new("bench"));
    for id in 1..=rf {
        meta.apply(&Command::AddNode {
            node: node_record(id),
        })
        .expect("add a node");
    }
    let volume = volume_record(rf);
    meta.apply(&Command::CreateVolume {
        volume: volume.into(),
    })
    .expect("create the volume");
    let vol_id = meta.state().volumes[VOLUME].id.clone();
    let wire_id = u64::from_str_radix(&vol_id, 16).expect("hex volume id");
    let token = Arc::new(TOKEN.to_vec());
    let mut stops = Vec::new();
    let mut servers = Vec::new();
    for id in 1..=rf {
        let pool = Pool::open(
            &dir.path().join(format!("node{id}")),
            POOL_BYTES,
            IoEngine::Std,
        )
        .expect("open a pool");
        let replica = pool
            .open_replica(&vol_id, VOLUME, VOLUME_BYTES)
            .await
            .expect("open a replica");
        let replicas = Arc::new(Replicas::default());
        replicas
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(wire_id, replica);
        let server = ReplicaServer::new(id, meta.clone(), replicas);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a wire listener");
        let addr = listener.local_addr().expect("listener address").to_string();
        meta.apply(&Command::UpdateNodeAddrs {
            id,
            admin_addr: "127.0.0.1:1".into(),
            data_addr: addr,
        })
        .expect("record the data address");
        let (tx, rx) = watch::channel(false);
        let handler: Arc<dyn FrameHandler> = server.clone();
        tokio::spawn(wire::serve(listener, token.clone(), id, handler, rx));
        stops.push(tx);
        servers.push(server);
    }
    meta.apply(&Command::Attach {
        name: VOLUME.into(),
        node: 1,
        takeover: true,
    })
    .expect("attach on node 1");
    let vol = meta.state().volumes[VOLUME].clone();
    let mut cfg = CoordinatorConfig::new(1, token);
    cfg.local_server = Some(servers[0].clone());
    // No background retirement of hot regions inside a measurement.
    cfg.hot_idle_retire = Duration::from_secs(3600);
    let local = servers[0].replica(wire_id);
    let coordinator = Coordinator::open(cfg, vol, local, meta.clone())
        .await
        .expect("open the coordinator");
    let chunk: Vec<u8> = (0..FILL_CHUNK).map(|i| (i % 251) as u8).collect();
    let mut off = 0;
    while off < VOLUME_BYTES {
        coordinator
            .write(off, chunk.clone(), false)
            .await
            .expect("fill the volume");
        off += FILL_CHUNK as u64;
    }
    Fixture {
        coordinator,
        _stops: stops,
        _dir: dir,
    }
}

fn replicated_write_4k(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let payload: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 7 % 256) as u8).collect();
    let mut group = c.benchmark_group("replicated_write_4k");
    group
        .throughput(Throughput::Bytes(BLOCK_SIZE as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for rf in [2u64, 3] {
        let fx = rt.block_on(fixture(rf));
        let coordinator = fx.coordinator.clone();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let blocks = VOLUME_BYTES / BLOCK_SIZE as u64;
        group.bench_function(BenchmarkId::new("rf", rf), |b| {
            b.iter(|| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let off = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) * BLOCK_SIZE as u64;
                rt.block_on(coordinator.write(off, payload.clone(), false))
                    .expect("replicated write");
            })
        });
        rt.block_on(fx.coordinator.close())
            .expect("close the coordinator");
        drop(fx);
    }
    group.finish();
}

criterion_group!(benches, replicated_write_4k);
criterion_main!(benches);
