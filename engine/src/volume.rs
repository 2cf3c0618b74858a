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

/// Where an attached volume's I/O goes.
enum Backend {
    /// RF 1 with the replica on this node: straight to the store (no replication, so no
    /// coordinator activity log and no fan-out cost), within a fenced session of the
    /// node's replica server, so a takeover elsewhere (`attach --force`) stops it at once.
    Local(Arc<Replica>, LocalSession),
    /// Replicas on other nodes: the replication coordinator.
    Replicated(Arc<Coordinator>),
}

/// A volume attached on this node: the coordinator that frontends send I/O to.
pub struct AttachedVolume {
    name: String,
    id: String,
    /// The raft node whose majority contact is this coordinator's lease (replicated
    /// volumes only; an RF 1 volume has no other copy to go stale against).
    lease: Option<Arc<crate::cluster::RaftNode>>,
    generation: std::sync::atomic::AtomicU64,
    /// `Some` while open. I/O holds a read guard; detach and backend changes (an RF change
    /// re-opens the coordinator) take the write guard, which waits for in-flight requests.
    gate: tokio::sync::RwLock<Option<Open>>,
}

struct Open {
    record: VolumeRecord,
    backend: Backend,
}

impl Backend {
    async fn close(&self) -> Result<()> {
        match self {
            Backend::Local(r, _) => r.close().await?,
            Backend::Replicated(c) => c.close().await?,
        }
        Ok(())
    }
}

impl AttachedVolume {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub async fn size_bytes(&self) -> u64 {
        match self.gate.read().await.as_ref() {
            Some(Open {
                backend: Backend::Local(r, _),
                ..
            }) => r.size_bytes().await,
            Some(Open {
                backend: Backend::Replicated(c),
                ..
            }) => c.size_bytes(),
            None => 0,
        }
    }

    pub async fn checksum_errors(&self) -> u64 {
        match self.gate.read().await.as_ref() {
            Some(Open {
                backend: Backend::Local(r, _),
                ..
            }) => r.checksum_errors(),
            Some(Open {
                backend: Backend::Replicated(c),
                ..
            }) => c.stats().checksum_errors,
            None => 0,
        }
    }

    /// The local session's refusal: a coordinator elsewhere took the volume over.
    fn fenced<T>(&self, r: std::result::Result<T, i32>) -> Result<T> {
        r.map_err(|errno| {
            VolumeError::Replication(ReplicationError::Fenced {
                volume: self.name.clone(),
                generation: self.generation(),
                reason: format!(
                    "another coordinator opened the replica (errno {errno}); this attachment is stale"
                ),
            })
        })
    }

    fn detached(&self) -> VolumeError {
        VolumeError::NotAttached(self.name.clone())
    }

    /// Waits (bounded) until this node is in contact with a raft majority.
    async fn check_lease(&self) -> Result<()> {
        let Some(raft) = &self.lease else {
            return Ok(());
        };
        if raft.majority_contact_age() <= COORDINATOR_LEASE {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if raft.majority_contact_age() <= COORDINATOR_LEASE {
                return Ok(());
            }
        }
        Err(VolumeError::Unavailable(format!(
            "volume '{}': this coordinator has lost contact with the raft majority; I/O is refused so no stale data is served",
            self.name
        )))
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check_lease().await?;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => Ok(self.fenced(s.run(r.read(offset, len)).await)??),
            Some(Backend::Replicated(c)) => Ok(c.read(offset, len).await?),
        }
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        self.check_lease().await?;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => {
                Ok(self.fenced(s.run(r.write(offset, data, fua)).await)??)
            }
            Some(Backend::Replicated(c)) => Ok(c.write(offset, data, fua).await?),
        }
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_lease().await?;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => {
                Ok(self.fenced(s.run(r.write_zeroes(offset, len, fua)).await)??)
            }
            Some(Backend::Replicated(c)) => Ok(c.write_zeroes(offset, len, fua).await?),
        }
    }

    pub async fn flush(&self) -> Result<()> {
        self.check_lease().await?;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => Ok(self.fenced(s.run(r.flush()).await)??),
            Some(Backend::Replicated(c)) => Ok(c.flush().await?),
        }
    }

    /// Closes the gate, waits for in-flight I/O and makes everything durable.
    async fn close(&self) -> Result<()> {
        let mut g = self.gate.write().await;
        match g.take() {
            Some(open) => open.backend.close().await,
            None => Ok(()),
        }
    }

    /// Compares the replicas block by block (by checksum).
    /// Compares the replicas block by block; with `repair`, rewrites blocks that fail
    /// their checksum on some replicas from a good copy ([`Coordinator::verify_with`]).
    pub async fn verify(&self, repair: bool) -> Result<VerifyReport> {
        let g = self.gate.read().await;
        match g.as_ref() {
            None => Err(self.detached()),
            Some(Open {
                record,
                backend: Backend::Local(..),
            }) => Ok(VerifyReport {
                in_sync_nodes: record.replicas.iter().map(|r| r.node).collect(),
                ..Default::default()
            }),
            Some(Open {
                backend: Backend::Replicated(c),
                ..
            }) => Ok(c.verify_with(repair).await?),
        }
    }

    /// The coordinator's counters (None for a local RF 1 volume or a closed one).
    pub fn stats(&self) -> Option<CoordinatorStats> {
        let g = self.gate.try_read().ok()?;
        match g.as_ref().map(|o| &o.backend) {
            Some(Backend::Replicated(c)) => Some(c.stats()),
            _ => None,
        }
    }

    /// Makes the coordinator adopt committed replica-state changes (async on/off) now.
    pub async fn adopt_replica_states(&self) -> bool {
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            Some(Backend::Replicated(c)) => c.adopt_replica_states().await,
            _ => false,
        }
    }

    pub async fn is_open(&self) -> bool {
        self.gate.read().await.is_some()
    }
}

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
        let attached_ids: Vec<String> = self
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|a| a.id.clone())
            .collect();
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

    pub async fn create(&self, spec: CreateSpec) -> Result<VolumeInfo> {
        validate_name(&spec.name)?;
        validate_size(spec.size_bytes)?;
        let repl = if spec.repl == 0 { 1 } else { spec.repl };
        if repl > MAX_REPL {
            return Err(VolumeError::InvalidArgument(format!(
                "invalid replication factor {repl}: it must be between 1 and {MAX_REPL}"
            )));
        }
        for (k, v) in &spec.labels {
            if k.is_empty() || k.len() > 253 || v.len() > 253 || k.contains('=') {
                return Err(VolumeError::InvalidArgument(format!(
                    "invalid label '{k}={v}': keys are 1 to 253 characters without '=', values at most 253"
                )));
            }
        }
        let _op = self.ops.lock().await;
        let state = self.cluster.state();
        if state.volumes.contains_key(&spec.name) {
            return Err(VolumeError::AlreadyExists(spec.name));
        }
        let req = PlacementRequest {
            repl,
            size_bytes: spec.size_bytes,
            nodes: spec.nodes.clone(),
            zones: spec.zones.clone(),
            domains: spec.domains.clone(),
            existing: Vec::new(),
            unreachable: self.cluster.status().inactive,
        };
        // A preferred node holds the first replica when it passes the request's own
        // restrictions (checked by placing one replica on it alone) and the rest fit.
        let preferred = spec.preferred_nodes.iter().find_map(|p| {
            let id = state
                .nodes
                .values()
                .find(|n| n.name == *p || p.parse::<u64>().ok() == Some(n.id))?
                .id;
            let alone = PlacementRequest {
                repl: 1,
                nodes: vec![id.to_string()],
                ..req.clone()
            };
            if place(&state, &alone).ok()? != [id] {
                return None;
            }
            let with = PlacementRequest {
                existing: vec![id],
                ..req.clone()
            };
            place(&state, &with).ok()
        });
        let nodes = match preferred {
            Some(nodes) => nodes,
            None if spec.require_preferred => {
                return Err(VolumeError::NoPlacement(format!(
                    "no replica of '{}' can be placed on any of the requested nodes ({}) within its restrictions",
                    spec.name,
                    spec.preferred_nodes.join(", ")
                )))
            }
            None => place(&state, &req).map_err(|e| VolumeError::NoPlacement(e.0))?,
        };
        let async_domains: std::collections::BTreeSet<String> = spec
            .async_domains
            .iter()
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty())
            .collect();
        if !async_domains.is_empty() {
            for d in &async_domains {
                if !state.nodes.values().any(|n| n.domain == *d) {
                    return Err(VolumeError::InvalidArgument(format!(
                        "async domain '{d}' has no nodes"
                    )));
                }
            }
            let in_async = |n: &u64| {
                state
                    .nodes
                    .get(n)
                    .is_some_and(|r| async_domains.contains(&r.domain))
            };
            if nodes.iter().all(in_async) {
                return Err(VolumeError::InvalidArgument(format!(
                    "every replica of '{}' would be async: at least one must be synchronous (outside {})",
                    spec.name,
                    async_domains.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            if !nodes.iter().any(in_async) {
                return Err(VolumeError::NoPlacement(format!(
                    "no replica of '{}' landed in the async domain(s) {}: raise --repl or allow those domains",
                    spec.name,
                    async_domains.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        self.check_gate(&state, &nodes, &async_domains)?;
        let rec = VolumeRecord {
            id: String::new(),
            name: spec.name.clone(),
            size_bytes: spec.size_bytes,
            repl,
            io_priority: spec.io_priority,
            labels: spec.labels,
            created_unix_seconds: now_unix(),
            generation: 0,
            attached_node: None,
            replicas: nodes
                .iter()
                .map(|&node| ReplicaRecord {
                    node,
                    state: ReplicaState::InSync,
                    generation: 0,
                    resync_done_bytes: 0,
                    resync_total_bytes: 0,
                })
                .collect(),
            hot_regions: Default::default(),
            parked: Vec::new(),
            lease_wait: false,
            async_domains,
        };
        self.cluster
            .propose(Command::CreateVolume {
                volume: Box::new(rec),
            })
            .await?;
        let rec = self.record(&spec.name)?;
        let local = self.local_replica(&rec).await;
        tracing::info!(volume = %rec.name, id = %rec.id, size_bytes = rec.size_bytes, ?nodes, "volume created");
        Ok(VolumeInfo {
            allocated_bytes: local.map_or(0, |r| r.allocated_bytes()),
            checksum_errors: 0,
            record: rec,
        })
    }

    async fn info(&self, record: VolumeRecord) -> VolumeInfo {
        let replica = self.replicas.lock().await.get(&record.id).cloned();
        VolumeInfo {
            allocated_bytes: replica.as_ref().map_or(0, |r| r.allocated_bytes()),
            checksum_errors: replica.as_ref().map_or(0, |r| r.checksum_errors()),
            record,
        }
    }

    pub async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for rec in self.cluster.state().volumes.values() {
            out.push(self.info(rec.clone()).await);
        }
        Ok(out)
    }

    pub async fn inspect(&self, name: &str) -> Result<VolumeInfo> {
        let rec = self.record(name)?;
        Ok(self.info(rec).await)
    }

    pub async fn update(&self, name: &str, spec: UpdateSpec) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let rec = self.record(name)?;
        if let Some(size) = spec.size_bytes {
            validate_size(size)?;
            if size < rec.size_bytes {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is {} bytes; cannot shrink it to {size} bytes (volumes only grow)",
                    rec.size_bytes
                )));
            }
        }
        if let Some(repl) = spec.repl {
            if repl == 0 || repl > MAX_REPL {
                return Err(VolumeError::InvalidArgument(format!(
                    "invalid replication factor {repl}: it must be between 1 and {MAX_REPL}"
                )));
            }
            if repl != rec.repl {
                match rec.attached_node {
                    Some(n) if n != self.node_id => {
                        return Err(VolumeError::FailedPrecondition(format!(
                            "volume '{name}' is attached on node {}; change its replication factor there (its coordinator resyncs the new replicas)",
                            self.node_name(&self.cluster.state(), n)
                        )))
                    }
                    _ => {}
                }
                match self.attached_get(name) {
                    Some(vol) => self.reopen(&vol, Some((&rec, repl))).await?,
                    None => self.change_repl(&rec, repl).await?,
                }
            }
        }
        if spec.size_bytes.is_some_and(|s| s > rec.size_bytes) || spec.io_priority.is_some() {
            self.cluster
                .propose(Command::UpdateVolume {
                    name: name.to_string(),
                    size_bytes: spec.size_bytes.filter(|s| *s > rec.size_bytes),
                    repl: None,
                    io_priority: spec.io_priority,
                })
                .await?;
        }
        self.reconcile().await;
        // A replicated volume's coordinator has its size fixed at open: re-open it to grow.
        if spec.size_bytes.is_some_and(|s| s > rec.size_bytes) {
            if let Some(vol) = self.attached_get(name) {
                let replicated = matches!(
                    vol.gate.read().await.as_ref().map(|o| &o.backend),
                    Some(Backend::Replicated(_))
                );
                if replicated {
                    self.reopen(&vol, None).await?;
                }
            }
        }
        self.inspect(name).await
    }

    /// Raises or lowers the replication factor: new replicas join out-of-sync (the
    /// coordinator resyncs them); removed replicas are the least useful ones (out-of-sync
    /// first, never the last in-sync one).
    async fn change_repl(&self, rec: &VolumeRecord, repl: u32) -> Result<()> {
        let state = self.cluster.state();
        let mut replicas = rec.replicas.clone();
        if repl as usize > replicas.len() {
            let existing: Vec<u64> = replicas.iter().map(|r| r.node).collect();
            let nodes = place(
                &state,
                &PlacementRequest {
                    repl,
                    size_bytes: rec.size_bytes,
                    existing: existing.clone(),
                    unreachable: self.cluster.status().inactive,
                    ..Default::default()
                },
            )
            .map_err(|e| VolumeError::NoPlacement(e.0))?;
            self.check_gate(&state, &nodes, &rec.async_domains)?;
            for node in nodes.into_iter().filter(|n| !existing.contains(n)) {
                replicas.push(ReplicaRecord {
                    node,
                    state: ReplicaState::OutOfSync,
                    generation: rec.generation,
                    resync_done_bytes: 0,
                    resync_total_bytes: 0,
                });
            }
        } else {
            // Drop out-of-sync replicas first, then ones not on the attach node.
            replicas.sort_by_key(|r| {
                (
                    r.state == ReplicaState::InSync,
                    Some(r.node) == rec.attached_node,
                )
            });
            while replicas.len() > repl as usize {
                replicas.remove(0);
            }
        }
        self.cluster
            .propose(Command::SetReplicas {
                name: rec.name.clone(),
                replicas,
                repl,
                generation: rec.generation,
            })
            .await?;
        Ok(())
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        let _op = self.ops.lock().await;
        let rec = self.record(name)?;
        if let Some(node) = rec.attached_node {
            if !force {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is attached on node {}; detach it first, or delete with --force",
                    self.node_name(&self.cluster.state(), node)
                )));
            }
            if node == self.node_id {
                self.detach_locked(name).await?;
            } else {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is attached on node {}; detach it there first",
                    self.node_name(&self.cluster.state(), node)
                )));
            }
        }
        self.cluster
            .propose(Command::DeleteVolume {
                name: name.to_string(),
            })
            .await?;
        self.reconcile().await;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    pub fn node_name(&self, state: &ClusterState, id: u64) -> String {
        state
            .nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// Attaches a volume here. Attaching a volume already attached here is a no-op.
    /// `takeover` moves an attachment from another node (failover after that node is lost).
    pub async fn attach(&self, name: &str, takeover: bool) -> Result<Arc<AttachedVolume>> {
        let _op = self.ops.lock().await;
        self.attach_locked(name, takeover).await
    }

    async fn attach_locked(&self, name: &str, takeover: bool) -> Result<Arc<AttachedVolume>> {
        self.drop_stale_attachments().await;
        if let Some(v) = self.attached_get(name) {
            return Ok(v);
        }
        // Taking over from a coordinator that did not detach cleanly (a forced takeover,
        // or one fenced by deactivating its domain): let its lease run out first.
        let before = self.record(name)?;
        let takeover_wait =
            before.attached_node.is_some_and(|n| n != self.node_id) || before.lease_wait;
        let out = self
            .cluster
            .propose(Command::Attach {
                name: name.to_string(),
                node: self.node_id,
                takeover,
            })
            .await?;
        let rec = self.record(name)?;
        if let ApplyOutput::Generation(g) = out {
            debug_assert_eq!(g, rec.generation);
        }
        if takeover_wait {
            tracing::info!(volume = %name, wait = ?TAKEOVER_WAIT, "takeover: waiting out the previous coordinator's lease");
            tokio::time::sleep(TAKEOVER_WAIT).await;
        }
        let open = self.open_backend(rec).await?;
        let lease =
            matches!(open.backend, Backend::Replicated(_)).then(|| self.cluster.raft().clone());
        let vol = Arc::new(AttachedVolume {
            lease,
            name: name.to_string(),
            id: open.record.id.clone(),
            generation: std::sync::atomic::AtomicU64::new(open.record.generation),
            gate: tokio::sync::RwLock::new(Some(open)),
        });
        self.attached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), vol.clone());
        tracing::info!(volume = %name, generation = vol.generation(), "volume attached");
        Ok(vol)
    }

    /// Drops local attachments the cluster has moved on from: the volume was attached
    /// elsewhere, detached, deleted, or attached again at a newer generation (its domain was
    /// deactivated while this node was cut off, say). Such a coordinator is fenced anyway;
    /// dropping it stops serving a dead export and lets a later attach here commit a new
    /// generation instead of returning the stale one. Callers hold `ops`.
    async fn drop_stale_attachments(&self) {
        let state = self.cluster.state();
        // Scanned under the read lock (this runs on every reconcile); the write lock only
        // when something is stale.
        let names: Vec<String> = self
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(name, v)| {
                state.volumes.get(*name).is_none_or(|r| {
                    r.attached_node != Some(self.node_id) || r.generation != v.generation()
                })
            })
            .map(|(name, _)| name.clone())
            .collect();
        if names.is_empty() {
            return;
        }
        let stale: Vec<Arc<AttachedVolume>> = {
            let mut map = self.attached.write().unwrap_or_else(|e| e.into_inner());
            names.iter().filter_map(|n| map.remove(n)).collect()
        };
        for v in stale {
            tracing::warn!(volume = %v.name(), generation = v.generation(), "dropping a local attachment the cluster has moved on from (fenced coordinator)");
            if let Err(e) = v.close().await {
                tracing::info!(volume = %v.name(), error = %e, "closing the fenced coordinator");
            }
        }
    }

    /// Builds the I/O backend for a volume just attached here at `rec.generation`.
    async fn open_backend(&self, rec: VolumeRecord) -> Result<Open> {
        let name = rec.name.clone();
        let local = self.local_replica(&rec).await;
        // The local fast path only for a true RF 1 volume: a replicated volume that is down
        // to one replica (ejections, a deactivated domain) still needs its coordinator to
        // bring the others back.
        let backend = if rec.repl == 1
            && rec.replicas.len() == 1
            && rec.parked.is_empty()
            && rec.replica(self.node_id).is_some()
        {
            let replica = local.ok_or_else(|| {
                VolumeError::Unavailable(format!("the local replica of '{name}' cannot be opened"))
            })?;
            let session = self
                .replica_server()
                .open_local_session(rec.wire_id(), rec.generation)
                .await
                .map_err(|errno| {
                    VolumeError::Unavailable(format!(
                        "the local replica of '{name}' cannot be opened at generation {} (errno {errno})",
                        rec.generation
                    ))
                })?;
            Backend::Local(replica, session)
        } else {
            let mut cfg = CoordinatorConfig::new(self.node_id, self.token.clone());
            cfg.local_server = Some(self.replica_server());
            let meta: Arc<dyn crate::replication::MetaProposer> = self.cluster.clone();
            Backend::Replicated(Coordinator::open(cfg, rec, local, meta).await?)
        };
        // The coordinator may have ejected replicas while opening: keep the current record.
        let record = self.record(&name)?;
        Ok(Open { record, backend })
    }

    /// Changes the replica set of a volume attached here: drains in-flight I/O, closes the
    /// old backend (so it never talks to a removed replica), commits the new replica set
    /// and a new attach, and opens the new backend, which resyncs new replicas. Clients
    /// stay connected; their I/O waits meanwhile.
    async fn reopen(&self, vol: &AttachedVolume, repl: Option<(&VolumeRecord, u32)>) -> Result<()> {
        let mut g = vol.gate.write().await;
        if let Some(old) = g.take() {
            // A failed close (a flush that failed, say) is a crash as far as the replicas
            // are concerned: the hot regions stay, and the open below reconciles them.
            // Returning here would leave the volume attached with no backend.
            if let Err(e) = old.backend.close().await {
                // Unless the volume was attached elsewhere meanwhile: then this node
                // must not change it.
                if self.record(&vol.name)?.attached_node != Some(self.node_id) {
                    return Err(e);
                }
                tracing::warn!(volume = %vol.name, error = %e, "close before re-opening failed; re-opening as after a crash");
            }
        }
        let changed = match repl {
            Some((rec, repl)) => self.change_repl(&self.record(&rec.name)?, repl).await,
            None => Ok(()),
        };
        self.cluster
            .propose(Command::Attach {
                name: vol.name.clone(),
                node: self.node_id,
                takeover: false,
            })
            .await?;
        let rec = self.record(&vol.name)?;
        let open = self.open_backend(rec).await?;
        vol.generation
            .store(open.record.generation, std::sync::atomic::Ordering::Release);
        *g = Some(open);
        tracing::info!(volume = %vol.name, generation = vol.generation(), "volume re-opened after a replica-set change");
        changed
    }

    /// Detaches a volume: drains its I/O, flushes it and records it detached. Detaching a
    /// detached volume is a no-op.
    pub async fn detach(&self, name: &str) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        self.detach_locked(name).await?;
        self.inspect(name).await
    }

    async fn detach_locked(&self, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        let vol = self
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(v) = &vol {
            v.close().await?;
        }
        if rec.attached_node == Some(self.node_id) {
            self.cluster
                .propose(Command::Detach {
                    name: name.to_string(),
                    node: self.node_id,
                    generation: rec.generation,
                })
                .await?;
            tracing::info!(volume = %name, "volume detached");
        } else if let Some(node) = rec.attached_node {
            if vol.is_none() {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is attached on node {}; detach it there",
                    self.node_name(&self.cluster.state(), node)
                )));
            }
        }
        Ok(())
    }

    fn attached_get(&self, name: &str) -> Option<Arc<AttachedVolume>> {
        self.attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The attached volume a frontend asks for by name.
    pub fn attached(&self, name: &str) -> Result<Arc<AttachedVolume>> {
        match self.attached_get(name) {
            Some(v) => Ok(v),
            None => {
                self.record(name)?;
                Err(VolumeError::NotAttached(name.to_string()))
            }
        }
    }

    /// Compares a volume's replicas block by block. The volume must be attached here (the
    /// coordinator holds the range lock that makes the comparison consistent).
    pub async fn verify(&self, name: &str, repair: bool) -> Result<VerifyReport> {
        let rec = self.record(name)?;
        match self.attached_get(name) {
            Some(v) => v.verify(repair).await,
            None => Err(VolumeError::FailedPrecondition(match rec.attached_node {
                Some(n) => format!(
                    "volume '{name}' is attached on node {}; run verify against that node",
                    self.node_name(&self.cluster.state(), n)
                ),
                None => format!("volume '{name}' is not attached; attach it first to verify"),
            })),
        }
    }

    /// Names of the volumes attached here.
    pub fn attached_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Clean shutdown: drains and flushes every attached volume and checkpoints every
    /// replica. Attachments stay recorded, so a restart serves the same volumes.
    pub async fn shutdown(&self) {
        let _op = self.ops.lock().await;
        let attached: Vec<_> = self
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (name, v) in attached {
            if let Err(e) = v.close().await {
                tracing::error!(volume = %name, error = %e, "closing volume at shutdown failed");
            }
        }
        for r in self.replicas.lock().await.values() {
            if let Err(e) = r.close().await {
                tracing::error!(volume = %r.name(), error = %e, "checkpointing replica at shutdown failed");
            }
        }
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
