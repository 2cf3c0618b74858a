//! The volume manager: validates requests, turns them into committed cluster-metadata
//! changes, keeps this node's replicas in step with the metadata, and hands frontends an
//! [`AttachedVolume`] to send I/O to.
//!
//! Invariants:
//! * Every decision (create, placement, attach, detach, delete) is a committed raft entry
//!   before it takes effect; this node only acts on what it has applied.
//! * I/O reaches replicas only through an [`AttachedVolume`]. Detach closes its gate and
//!   waits for in-flight I/O, then flushes, so nothing is in flight once detach returns.
//! * Every attach bumps the generation before I/O is served.
//! * Local replica files exist for exactly the volumes whose replica set names this node;
//!   the reconciler creates, grows and removes them as the metadata changes.
//!
//! Layout: this file holds the types, the manager's start-up, domain and node operations
//! and the reconciler; `control` the volume requests (create, update, delete); `attachment`
//! attach, detach and re-open; `attached` the [`AttachedVolume`] I/O handle.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cluster::{
    ApplyError, ApplyOutput, ClusterError, ClusterHandle, ClusterState, Command, ReplicaRecord,
    ReplicaState, VolumeRecord,
};
use crate::meta::IoPriority;
use crate::placement::{place, PlacementRequest};
use crate::replication::{
    Coordinator, CoordinatorConfig, CoordinatorStats, LocalReplicas, LocalSession, ReplicaServer,
    ReplicationError, VerifyReport,
};
use crate::store::{Pool, Replica, StoreError, BLOCK_SIZE};

/// Largest volume: 64 TiB. Checksum tables for a fully written volume of this size take
/// 64 MiB of memory; larger volumes need the layered store.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Longest volume name. CSI volume names from Kubernetes (`pvc-<uuid>`) are 40 characters.
pub const MAX_NAME_LEN: usize = 128;
/// Highest replication factor accepted (as in Portworx).
pub const MAX_REPL: u32 = 3;
/// A replicated volume's coordinator serves I/O only while its node was in contact with
/// a raft majority this recently (its lease). Raft heartbeats run every 300 ms and
/// elections finish within about 6 s, so a healthy node renews it continuously.
pub const COORDINATOR_LEASE: Duration = Duration::from_secs(4);
/// How long I/O waits for the lease to come back (a leader election) before failing.
pub const LEASE_WAIT: Duration = Duration::from_secs(10);
/// A takeover (attach --force, or after the old coordinator's domain was deactivated)
/// waits this long before serving, so the old coordinator's lease has surely run out: a
/// coordinator cut off in a minority can then no longer serve stale reads.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(6);
/// How often the reconciler re-checks local replicas even without metadata changes.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("volume '{0}' not found")]
    NotFound(String),
    #[error("volume '{0}' already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Placement found no set of nodes for the request (too few nodes, or none left in
    /// the requested domains, zones or nodes). CSI answers RESOURCE_EXHAUSTED.
    #[error("{0}")]
    NoPlacement(String),
    #[error("volume '{0}' is not attached on this node")]
    NotAttached(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("volume '{volume}' already has a snapshot named '{name}'")]
    SnapshotExists { volume: String, name: String },
    #[error("'{0}' is a snapshot export: read-only")]
    ReadOnly(String),
    #[error("volume '{volume}' has no snapshot '{snapshot}'")]
    SnapshotNotFound { volume: String, snapshot: String },
}

impl From<ClusterError> for VolumeError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Apply(ApplyError::VolumeExists(n)) => VolumeError::AlreadyExists(n),
            ClusterError::Apply(ApplyError::VolumeNotFound(n)) => VolumeError::NotFound(n),
            ClusterError::Apply(other) => VolumeError::FailedPrecondition(other.to_string()),
            ClusterError::Unavailable(m) => VolumeError::Unavailable(m),
        }
    }
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Checks a volume name: 1 to 128 characters of `[A-Za-z0-9._-]`, starting with a letter
/// or digit (so it is safe as a file name, an NBD export name and a Kubernetes label).
pub fn validate_name(name: &str) -> Result<()> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_start || !ok_chars {
        return Err(VolumeError::InvalidArgument(format!(
            "invalid volume name '{name}': use 1 to {MAX_NAME_LEN} characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a volume size: positive, a multiple of 4 KiB, at most [`MAX_VOLUME_BYTES`].
pub fn validate_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 {
        return Err(VolumeError::InvalidArgument(
            "invalid size: a volume needs a size greater than 0".into(),
        ));
    }
    if !size_bytes.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(VolumeError::InvalidArgument(format!(
            "invalid size {size_bytes} bytes: sizes must be a multiple of 4 KiB (4096 bytes)"
        )));
    }
    if size_bytes > MAX_VOLUME_BYTES {
        return Err(VolumeError::InvalidArgument(format!(
            "invalid size {size_bytes} bytes: the largest volume is 64 TiB"
        )));
    }
    Ok(())
}

/// What a caller asks for when creating a volume.
#[derive(Debug, Clone, Default)]
pub struct CreateSpec {
    pub name: String,
    pub size_bytes: u64,
    /// 0 means the default, 1.
    pub repl: u32,
    pub io_priority: IoPriority,
    pub labels: BTreeMap<String, String>,
    /// Placement restrictions (node names or ids, zones, domains).
    pub nodes: Vec<String>,
    pub zones: Vec<String>,
    pub domains: Vec<String>,
    /// Nodes (ids or names), best first, that should hold a replica when placement
    /// allows (CSI preferred topology: the node that will run the workload).
    pub preferred_nodes: Vec<String>,
    /// Refuse (NoPlacement) instead of placing elsewhere when no preferred node can hold a
    /// replica (CSI requisite topology).
    pub require_preferred: bool,
    /// Domains whose replicas are asynchronous by choice (never latency-gated; see
    /// `VolumeRecord::async_domains`). At least one replica must be outside them.
    pub async_domains: Vec<String>,
}

/// What a caller asks to change; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct UpdateSpec {
    pub size_bytes: Option<u64>,
    pub repl: Option<u32>,
    pub io_priority: Option<IoPriority>,
}

/// A volume with its live numbers, for listing and inspection.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    /// Allocated bytes of this node's replica (0 when it holds none).
    pub allocated_bytes: u64,
    pub checksum_errors: u64,
}

mod attached;
mod attachment;
mod control;
mod snapshots;

pub use attached::AttachedVolume;
use attached::{Backend, Open};
pub use snapshots::SnapshotInfo;

/// Owns this node's volumes: its replicas and its attachments.
pub struct VolumeManager {
    cluster: Arc<ClusterHandle>,
    pool: Arc<Pool>,
    node_id: u64,
    /// Local replicas by volume id (names may be reused after a delete; ids never are).
    replicas: tokio::sync::Mutex<HashMap<String, Arc<Replica>>>,
    /// The same replicas by wire id, for the data-path server (a synchronous lookup).
    by_wire_id: std::sync::RwLock<HashMap<u64, Arc<Replica>>>,
    /// Cluster token, for the coordinator's data-path connections.
    token: Arc<Vec<u8>>,
    /// This node's data-path server; coordinators reach the local replica through it so
    /// its generation fence covers local I/O too.
    replica_server: std::sync::OnceLock<Arc<ReplicaServer>>,
    attached: std::sync::RwLock<HashMap<String, Arc<AttachedVolume>>>,
    /// Serializes control operations on this node so validation and effect cannot race.
    ops: tokio::sync::Mutex<()>,
    /// The metro-sync latency gate's limit (`--sync-max-rtt`), in microseconds.
    sync_max_rtt_us: std::sync::atomic::AtomicU64,
    /// I/O priority classes at the frontend: every attached volume's I/O passes it.
    sched: Arc<crate::sched::IoScheduler>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
impl VolumeManager {
    /// Opens this node's replicas (recovering after a crash), re-attaches the volumes that
    /// were attached here (each at a new generation) and starts the reconciler.
    pub async fn open(
        cluster: Arc<ClusterHandle>,
        pool: Arc<Pool>,
        token: Arc<Vec<u8>>,
    ) -> Result<Arc<VolumeManager>> {
        let mgr = Arc::new(VolumeManager {
            node_id: cluster.node_id(),
            cluster,
            pool,
            token,
            by_wire_id: std::sync::RwLock::new(HashMap::new()),
            replica_server: std::sync::OnceLock::new(),
            replicas: tokio::sync::Mutex::new(HashMap::new()),
            attached: std::sync::RwLock::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
            sync_max_rtt_us: std::sync::atomic::AtomicU64::new(
                crate::latency::DEFAULT_SYNC_MAX_RTT.as_micros() as u64,
            ),
            sched: Arc::new(crate::sched::IoScheduler::new(crate::sched::DEFAULT_SLOTS)),
        });
        let server = ReplicaServer::new(
            mgr.node_id,
            mgr.cluster.clone(),
            Arc::new(WeakReplicas(Arc::downgrade(&mgr))),
        );
        let _ = mgr.replica_server.set(server);
        mgr.reconcile().await;
        let state = mgr.cluster.state();
        for v in state.volumes.values() {
            if v.attached_node == Some(mgr.node_id) {
                let _op = mgr.ops.lock().await;
                if let Err(e) = mgr.attach_locked(&v.name, false).await {
                    tracing::error!(volume = %v.name, error = %e, "re-attach at start-up failed");
                }
            }
        }
        let weak = Arc::downgrade(&mgr);
        let mut applied = mgr.cluster.raft().applied_watch();
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(RECONCILE_INTERVAL, applied.changed()).await;
                let Some(mgr) = weak.upgrade() else { return };
                mgr.reconcile().await;
                mgr.reconcile_snapshots().await;
                // Not while an attach, detach or re-open is in progress (they change the
                // generation and the local attachment together, under `ops`).
                let op = mgr.ops.try_lock();
                if op.is_ok() {
                    mgr.drop_stale_attachments().await;
                }
                drop(op);
            }
        });
        Ok(mgr)
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Sets the metro-sync limit (`--sync-max-rtt`).
    pub fn set_sync_max_rtt(&self, limit: Duration) {
        self.sync_max_rtt_us.store(
            limit.as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Sets `--io-slots` on both of this node's class gates (the frontend's and the
    /// replica server's); 0 turns classes off.
    pub fn set_io_slots(&self, slots: usize) {
        self.sched.set_slots(slots);
        self.replica_server().scheduler().set_slots(slots);
    }

    /// Sets `--io-capacity-iops` on both class gates; 0 measures it.
    pub fn set_io_capacity(&self, iops: u64) {
        self.sched.set_capacity(iops);
        self.replica_server().scheduler().set_capacity(iops);
    }

    /// The frontend's class gate (its counters are the per-class metrics).
    pub fn scheduler(&self) -> &Arc<crate::sched::IoScheduler> {
        &self.sched
    }

    pub fn sync_max_rtt(&self) -> Duration {
        Duration::from_micros(
            self.sync_max_rtt_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The latency gate for a replica set on `nodes`: refused (with the measured figures)
    /// when it spans domains whose RTT is above the limit or not measured.
    /// Replicas in `async_domains` are asynchronous by choice and never gated.
    fn check_gate(
        &self,
        state: &ClusterState,
        nodes: &[u64],
        async_domains: &std::collections::BTreeSet<String>,
    ) -> Result<()> {
        let domains: std::collections::BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| state.nodes.get(n).map(|r| r.domain.clone()))
            .filter(|d| !async_domains.contains(d))
            .collect();
        if domains.len() < 2 {
            return Ok(());
        }
        crate::latency::check_sync(state, &domains, self.sync_max_rtt(), now_unix())
            .map_err(VolumeError::FailedPrecondition)
    }

    /// `cluster remove`: takes a node that is gone for good, or that lost its state, out of
    /// the node table and (through the leader's membership loop) out of raft. `node` is a
    /// name or an id. Refused for this node, the raft leader, a node the answering node
    /// hears from, and a node that still holds replicas or attachments (the state machine
    /// checks that last part, so it cannot race a placement). Waits (bounded) until raft
    /// has dropped it. Removing a removed node again is refused as not found.
    pub async fn remove_node(&self, node: &str) -> Result<(u64, String)> {
        let _op = self.ops.lock().await;
        let state = self.cluster.state();
        let rec = state
            .nodes
            .values()
            .find(|n| n.name == node || n.id.to_string() == node)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound(format!("node '{node}'")))?;
        let status = self.cluster.status();
        if rec.id == self.node_id {
            return Err(VolumeError::FailedPrecondition(format!(
                "node {} is the node answering this request; run `cluster remove` on another member",
                rec.name
            )));
        }
        if rec.id == status.leader_id {
            return Err(VolumeError::FailedPrecondition(format!(
                "node {} is the raft leader; a live node is never removed",
                rec.name
            )));
        }
        if self.cluster.raft().peer_activity(rec.id) == Some(true) {
            return Err(VolumeError::FailedPrecondition(format!(
                "node {} is online; stop it first (`cluster remove` is for a node that is gone or lost its state)",
                rec.name
            )));
        }
        self.cluster
            .propose(Command::RemoveNode { id: rec.id })
            .await?;
        drop(_op); // other control operations need not wait for raft to drop it
        tracing::warn!(node = rec.id, name = %rec.name, "node removed from the cluster");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.cluster.status();
            if !st.voters.contains(&rec.id) && !st.learners.contains(&rec.id) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(
                    node = rec.id,
                    "still a raft member after 10 s; the leader keeps removing it"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((rec.id, rec.name))
    }

    /// Activates or deactivates a cluster domain. Activation brings the domain's replicas
    /// back (out of sync; their coordinators resync them) and passes the latency gate for
    /// every volume that would replicate across domains again.
    /// `promote_async` (deactivation only): volumes left without an in-sync replica get
    /// their async replicas outside the domain promoted, losing the writes those lag.
    /// Returns the volumes a deactivation leaves unavailable (no copy outside the domain:
    /// kept as they are until it returns).
    pub async fn set_domain_active(
        &self,
        domain: &str,
        active: bool,
        promote_async: bool,
    ) -> Result<Vec<String>> {
        let _op = self.ops.lock().await;
        let state = self.cluster.state();
        if !state.nodes.values().any(|n| n.domain == domain) {
            return Err(VolumeError::NotFound(format!("domain {domain}")));
        }
        if active && state.inactive_domains.contains(domain) {
            for v in state.volumes.values() {
                let returning: Vec<u64> = v
                    .parked
                    .iter()
                    .copied()
                    .filter(|n| state.nodes.get(n).is_some_and(|r| r.domain == domain))
                    .collect();
                if returning.is_empty() {
                    continue;
                }
                let mut nodes: Vec<u64> = v.replicas.iter().map(|r| r.node).collect();
                nodes.extend(returning);
                self.check_gate(&state, &nodes, &v.async_domains)?;
            }
        }
        self.cluster
            .propose(Command::SetDomainActive {
                domain: domain.to_string(),
                active,
                promote_async,
                unix_seconds: now_unix(),
            })
            .await?;
        let verb = if active { "activated" } else { "deactivated" };
        let _ = self
            .cluster
            .propose(Command::RaiseAlert {
                unix_seconds: now_unix(),
                severity: "warning".into(),
                kind: format!("domain-{verb}"),
                resource: format!("domain/{domain}"),
                message: format!("cluster domain {domain} {verb}"),
            })
            .await;
        // Volumes attached here whose replica set changed: their coordinator adopts the new
        // set by itself (it refreshes membership from the metadata).
        self.reconcile().await;
        let unavailable = self.cluster.state().unavailable_in(domain);
        if !unavailable.is_empty() {
            tracing::error!(%domain, volumes = ?unavailable, "volumes with no copy outside the deactivated domain stay unavailable until it returns");
        }
        tracing::info!(%domain, active, "cluster domain {verb}");
        Ok(unavailable)
    }

    /// The data-path server answering for this node's replicas.
    pub fn replica_server(&self) -> Arc<ReplicaServer> {
        self.replica_server
            .get()
            .expect("set in VolumeManager::open")
            .clone()
    }

    pub fn cluster(&self) -> &Arc<ClusterHandle> {
        &self.cluster
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn record(&self, name: &str) -> Result<VolumeRecord> {
        self.cluster
            .state()
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))
    }

    /// Brings local replica files in line with the metadata: opens (creating if needed)
    /// the replicas this node holds, grows them, and removes those it no longer holds.
    pub async fn reconcile(&self) {
        let state = self.cluster.state();
        let mut mine: HashMap<String, &VolumeRecord> = HashMap::new();
        for v in state.volumes.values() {
            if v.replica(self.node_id).is_some() {
                mine.insert(v.id.clone(), v);
            }
        }
        let mut replicas = self.replicas.lock().await;
        for (id, v) in &mine {
            match replicas.get(id) {
                Some(r) => {
                    if r.size_bytes().await < v.size_bytes {
                        if let Err(e) = r.resize(v.size_bytes).await {
                            tracing::error!(volume = %v.name, error = %e, "growing the local replica failed");
                        }
                    }
                }
                None => match self.pool.open_replica(id, &v.name, v.size_bytes).await {
                    Ok(r) => {
                        replicas.insert(id.clone(), r);
                    }
                    Err(e) => {
                        tracing::error!(volume = %v.name, error = %e, "opening the local replica failed")
                    }
                },
            }
        }
        let attached_ids: Vec<String> = {
            let attached = self.attached.read().unwrap_or_else(|e| e.into_inner());
            // A class changed by `volume update --io-priority` applies from here on.
            for (name, a) in attached.iter() {
                if let Some(v) = state.volumes.get(name) {
                    a.set_io_priority(v.io_priority);
                }
            }
            attached.values().map(|a| a.id.clone()).collect()
        };
        let stale: Vec<String> = replicas
            .keys()
            .filter(|id| !mine.contains_key(*id) && !attached_ids.contains(id))
            .cloned()
            .collect();
        self.index_replicas(&replicas);
        for id in stale {
            if let Some(r) = replicas.remove(&id) {
                let _ = r.close().await;
                match self.pool.delete_replica(&r) {
                    Ok(()) => tracing::info!(volume = %r.name(), "local replica removed"),
                    Err(e) => {
                        tracing::error!(volume = %r.name(), error = %e, "removing replica files failed")
                    }
                }
            }
        }
    }

    fn index_replicas(&self, replicas: &HashMap<String, Arc<Replica>>) {
        let idx = replicas
            .iter()
            .filter_map(|(id, r)| Some((u64::from_str_radix(id, 16).ok()?, r.clone())))
            .collect();
        *self.by_wire_id.write().unwrap_or_else(|e| e.into_inner()) = idx;
    }

    /// The local replica of a volume, opening it when the metadata says this node holds one.
    pub async fn local_replica(&self, v: &VolumeRecord) -> Option<Arc<Replica>> {
        v.replica(self.node_id)?;
        let mut replicas = self.replicas.lock().await;
        if let Some(r) = replicas.get(&v.id) {
            return Some(r.clone());
        }
        match self.pool.open_replica(&v.id, &v.name, v.size_bytes).await {
            Ok(r) => {
                replicas.insert(v.id.clone(), r.clone());
                self.index_replicas(&replicas);
                Some(r)
            }
            Err(e) => {
                tracing::error!(volume = %v.name, error = %e, "opening the local replica failed");
                None
            }
        }
    }

    /// Bytes allocated by this node's replicas of the volumes `ids`, for the ids whose
    /// replica is open here (reconcile opens every replica the node holds).
    pub async fn local_allocation(&self, ids: &[String]) -> HashMap<String, u64> {
        let replicas = self.replicas.lock().await;
        ids.iter()
            .filter_map(|id| Some((id.clone(), replicas.get(id)?.allocated_bytes())))
            .collect()
    }

    pub fn node_name(&self, state: &ClusterState, id: u64) -> String {
        state
            .nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("#{id}"))
    }
}

/// The manager's replicas as the data-path server sees them (weak: the server must not
/// keep the manager alive).
struct WeakReplicas(std::sync::Weak<VolumeManager>);

impl LocalReplicas for WeakReplicas {
    fn get(&self, volume_wire_id: u64) -> Option<Arc<Replica>> {
        self.0
            .upgrade()?
            .by_wire_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&volume_wire_id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{
        ApplyError, Bootstrap, ForwardError, Forwarder, NodeRecord, NodeRole, Proposal, RaftNode,
        RaftTransport,
    };
    use crate::io::IoEngine;

    struct NoPeers;
    impl RaftTransport for NoPeers {
        fn send(&self, _: Vec<raft::eraftpb::Message>) {}
    }
    #[async_trait::async_trait]
    impl Forwarder for NoPeers {
        async fn forward(
            &self,
            _: &str,
            _: &Proposal,
        ) -> Result<(Result<ApplyOutput, ApplyError>, u64), ForwardError> {
            Err(ForwardError::NotDelivered("single node".into()))
        }
    }

    async fn manager(dir: &std::path::Path, new: bool) -> Arc<VolumeManager> {
        let db = sled::open(dir.join("meta")).unwrap();
        let b = if new {
            Bootstrap::NewCluster
        } else {
            Bootstrap::Restart
        };
        let raft = RaftNode::start(1, &db, b, Arc::new(NoPeers)).unwrap();
        let cluster = ClusterHandle::new(raft, Arc::new(NoPeers));
        if new {
            cluster
                .propose(Command::Init {
                    cluster_id: "c1".into(),
                })
                .await
                .unwrap();
            cluster
                .propose(Command::AddNode {
                    node: NodeRecord {
                        id: 1,
                        name: "node-1".into(),
                        admin_addr: String::new(),
                        data_addr: String::new(),
                        domain: "default".into(),
                        zone: "default".into(),
                        rack: "default".into(),
                        role: NodeRole::Voter,
                        pool_size_bytes: 1 << 30,
                        joined_unix_seconds: 0,
                        instance: String::new(),
                    },
                })
                .await
                .unwrap();
        }
        let pool = Pool::open(&dir.join("pool"), 1 << 30, IoEngine::Std).unwrap();
        VolumeManager::open(cluster, pool, Arc::new(b"t".to_vec()))
            .await
            .unwrap()
    }

    fn spec(name: &str, size: u64) -> CreateSpec {
        CreateSpec {
            name: name.into(),
            size_bytes: size,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lifecycle_validates_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = manager(dir.path(), true).await;
        mgr.create(spec("v1", 1 << 20)).await.unwrap();
        assert!(matches!(
            mgr.create(spec("v1", 1 << 20)).await,
            Err(VolumeError::AlreadyExists(_))
        ));
        assert!(matches!(
            mgr.create(spec("bad name", 1 << 20)).await,
            Err(VolumeError::InvalidArgument(_))
        ));
        assert!(matches!(
            mgr.create(spec("odd", 1000)).await,
            Err(VolumeError::InvalidArgument(_))
        ));
        let mut rf2 = spec("rf2", 1 << 20);
        rf2.repl = 2;
        let err = mgr.create(rf2).await.unwrap_err();
        assert!(
            matches!(&err, VolumeError::NoPlacement(m) if m.contains("needs 2 storage nodes")),
            "{err}"
        );
        let v = mgr.attach("v1", false).await.unwrap();
        assert_eq!(v.generation(), 1);
        v.write(0, vec![7; 4096], true).await.unwrap();
        assert!(matches!(
            mgr.delete("v1", false).await,
            Err(VolumeError::FailedPrecondition(_))
        ));
        assert!(matches!(
            mgr.update(
                "v1",
                UpdateSpec {
                    size_bytes: Some(4096),
                    ..Default::default()
                }
            )
            .await,
            Err(VolumeError::FailedPrecondition(_))
        ));
        mgr.update(
            "v1",
            UpdateSpec {
                size_bytes: Some(2 << 20),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        mgr.shutdown().await;
        mgr.cluster().raft().stop();
        drop(v);
        drop(mgr);

        let mgr = manager(dir.path(), false).await;
        let v = mgr.attached("v1").expect("attachment survives restart");
        assert_eq!(v.generation(), 2, "re-attach bumps the generation");
        assert_eq!(v.size_bytes().await, 2 << 20);
        assert_eq!(v.read(0, 4096).await.unwrap(), vec![7; 4096]);
        mgr.detach("v1").await.unwrap();
        assert!(matches!(
            v.read(0, 4096).await,
            Err(VolumeError::NotAttached(_))
        ));
        mgr.detach("v1").await.expect("detach is idempotent");
        mgr.delete("v1", false).await.unwrap();
        assert!(matches!(
            mgr.inspect("v1").await,
            Err(VolumeError::NotFound(_))
        ));
        assert_eq!(
            mgr.pool().allocated_bytes(),
            0,
            "delete returns space to the pool"
        );
    }
}
