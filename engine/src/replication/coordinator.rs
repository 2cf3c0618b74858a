//! The volume coordinator: the one place a volume's I/O is replicated.
//!
//! It owns the volume's view of its replica set at one generation (which replica is
//! in-sync, resyncing or out-of-sync, how to reach it, what an out-of-sync one missed) and
//! keeps these invariants (DESIGN.md, "The data path", and safety invariants 1, 2, 3, 5):
//!
//! * **Ordering.** A write (or zeroing) holds the range lock on its blocks across its
//!   whole fan-out, so overlapping writes are never in flight together and every replica
//!   applies them in the same order.
//! * **Ack rule (protocol C).** A write, zeroing or flush is acked only when at least one
//!   in-sync replica took it and every replica the metadata counts as in-sync has done it
//!   (the decision is the pure `replica_set::settle`; this module carries it out). A replica that failed or timed out
//!   is ejected first: `SetReplicaState{OutOfSync}` at this generation is committed before
//!   the ack, and from then on a dirty-region bitmap records what it misses. If the
//!   ejection cannot be committed (fenced, no quorum), the coordinator is fenced: the I/O
//!   fails and every later one fails with `ESHUTDOWN`.
//! * **Crash consistency.** Before the first write to a region, the region is committed
//!   hot (see `hot`); `open` reconciles the previous coordinator's hot regions, so in-sync
//!   replicas are byte-identical before the first I/O is served.
//! * **Reads** come from an in-sync replica (the local one first) and are verified by the
//!   replica's store; a checksum failure is served from another in-sync replica and the
//!   good bytes are written back to the bad one (read repair).
//! * **No cancelled fan-out.** Every public I/O method runs in its own task, so a caller
//!   that gives up (a closed NBD connection) never leaves a write half fanned out with
//!   its range lock released.
//!
//! Locks, always taken in this order: range lock → `hot.commit` → `state_lock` →
//! `members` (a std mutex, never held across an await). Nothing waits for a range lock
//! while holding `state_lock` or `hot.commit`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::asyncq::{AsyncOp, AsyncQueue};
use super::bitmap::RegionBitmap;
use super::hot::HotSet;
use super::link::{LocalLink, Network, TcpNetwork};
use super::replica_set::{self, AfterUnknown, BlockRead, BlockRepair, Ejection, Failure, Verdict};
use super::server::{LocalReplicas, ReplicaServer};
use super::target::{Ctx, Target, TargetError};
use super::{
    MetaProposer, ProposeError, ReplicationError, ASYNC_MAX_LAG_BYTES, ASYNC_MAX_LAG_OPS,
    DIRTY_REGION_BYTES, HOT_REGION_BYTES, HOT_REGION_IDLE_RETIRE, MAX_HOT_REGIONS,
    REPLICA_IO_TIMEOUT, RESYNC_PROGRESS_INTERVAL, RESYNC_RETRY_INTERVAL, VERIFY_CHUNK_BYTES,
    VERIFY_MAX_REPORTED_BLOCKS, ZEROES_CHUNK_BYTES,
};
use crate::cluster::{ApplyError, Command, ReplicaState, VolumeRecord};
use crate::range_lock::RangeLock;
use crate::store::{Replica, BLOCK_SIZE, MAX_IO_BYTES};

type Result<T, E = ReplicationError> = std::result::Result<T, E>;

/// How a coordinator runs. [`CoordinatorConfig::new`] fills in the documented defaults.
#[derive(Clone)]
pub struct CoordinatorConfig {
    /// This node's id: the volume must be attached here.
    pub node_id: u64,
    /// How replicas on other nodes are reached ([`TcpNetwork`] with the cluster token,
    /// unless the environment passes another, as the simulation does).
    pub network: Arc<dyn Network>,
    /// Per-request bound for one replica ([`REPLICA_IO_TIMEOUT`]).
    pub replica_timeout: Duration,
    /// The node's [`ReplicaServer`]. The local replica is reached through it so that its
    /// generation fence covers this coordinator's local I/O too; the daemon must set it.
    /// When `None`, a private server wraps the `local` replica given to `open` (fine for
    /// tests and tools, but then a new coordinator elsewhere cannot fence this one's
    /// local writes through an `Open`).
    pub local_server: Option<Arc<ReplicaServer>>,
    /// [`RESYNC_RETRY_INTERVAL`].
    pub resync_retry: Duration,
    /// [`RESYNC_PROGRESS_INTERVAL`].
    pub resync_progress_interval: Duration,
    /// [`HOT_REGION_IDLE_RETIRE`].
    pub hot_idle_retire: Duration,
    /// [`MAX_HOT_REGIONS`].
    pub max_hot_regions: usize,
    /// [`ASYNC_MAX_LAG_BYTES`].
    pub async_max_lag_bytes: u64,
    /// [`ASYNC_MAX_LAG_OPS`].
    pub async_max_lag_ops: usize,
}

impl CoordinatorConfig {
    pub fn new(node_id: u64, token: Arc<Vec<u8>>) -> CoordinatorConfig {
        CoordinatorConfig {
            node_id,
            network: TcpNetwork::new(token),
            replica_timeout: REPLICA_IO_TIMEOUT,
            local_server: None,
            resync_retry: RESYNC_RETRY_INTERVAL,
            resync_progress_interval: RESYNC_PROGRESS_INTERVAL,
            hot_idle_retire: HOT_REGION_IDLE_RETIRE,
            max_hot_regions: MAX_HOT_REGIONS,
            async_max_lag_bytes: ASYNC_MAX_LAG_BYTES,
            async_max_lag_ops: ASYNC_MAX_LAG_OPS,
        }
    }
}

impl std::fmt::Debug for CoordinatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorConfig")
            .field("node_id", &self.node_id)
            .field("replica_timeout", &self.replica_timeout)
            .field("local_server", &self.local_server.is_some())
            .field("resync_retry", &self.resync_retry)
            .field("hot_idle_retire", &self.hot_idle_retire)
            .field("max_hot_regions", &self.max_hot_regions)
            .finish_non_exhaustive()
    }
}

/// One replica's numbers, as this coordinator sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStats {
    pub node: u64,
    pub state: ReplicaState,
    pub local: bool,
    pub connected: bool,
    /// Bytes known to differ (dirty regions x region size); `None` while unknown (a full
    /// comparison is due).
    pub dirty_bytes: Option<u64>,
    pub resync_done_bytes: u64,
    pub resync_total_bytes: u64,
    /// Bytes actually copied by resync (regions whose checksums matched are skipped).
    pub resync_copied_bytes: u64,
    pub last_error: Option<String>,
    /// Async replicas only (0 otherwise): bytes of writes it has not acked, i.e. queued
    /// and not acked, plus its dirty regions (x region size) once its queue stopped.
    pub async_lag_bytes: u64,
    /// Async replicas only (0 otherwise): age in seconds of the oldest write it has not
    /// acked (the RPO).
    pub async_lag_seconds: f64,
}

/// Counters and per-replica state, for metrics and `volume inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorStats {
    pub volume: String,
    pub generation: u64,
    pub fenced: bool,
    pub closed: bool,
    /// Reads served from another replica after a checksum failure, and written back.
    pub read_repairs: u64,
    /// Checksum failures reported by replicas on reads (repaired or not).
    pub checksum_errors: u64,
    /// In-sync replicas ejected (committed out-of-sync).
    pub ejections: u64,
    /// Blocks copied when `open` reconciled the previous coordinator's hot regions.
    pub reconciled_blocks: u64,
    pub hot_regions: usize,
    pub replicas: Vec<ReplicaStats>,
}

/// A block where in-sync replicas disagree.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMismatch {
    pub block: u64,
    pub offset_bytes: u64,
    /// (node, digest of its block: [`crate::store::block_digest`]).
    pub digests: Vec<(u64, u64)>,
}

/// What [`Coordinator::verify`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    pub blocks_compared: u64,
    pub in_sync_nodes: Vec<u64>,
    pub resyncing_nodes: Vec<u64>,
    /// Blocks where in-sync replicas disagree (a broken invariant).
    pub mismatched_blocks: u64,
    /// The first [`VERIFY_MAX_REPORTED_BLOCKS`] of them.
    pub mismatches: Vec<BlockMismatch>,
    /// Blocks where a resyncing replica differs from the in-sync copy (expected until its
    /// resync finishes).
    pub resyncing_mismatched_blocks: u64,
    /// Replicas that could not be compared: (node, first error).
    pub errors: Vec<(u64, String)>,
    /// Of the mismatched blocks, those a repair rewrote (they failed their checksum on
    /// some replicas and the good copies agreed).
    pub repaired_blocks: u64,
}

/// One replica of the volume, in the coordinator's memory.
pub(super) struct Member {
    pub(super) node: u64,
    /// The state the coordinator acts on. It changes only after the metadata committed
    /// the change (except towards out-of-sync, which is always the safe side).
    pub(super) state: ReplicaState,
    pub(super) target: Option<Target>,
    /// The connection used before an ejection: resync waits until it is gone (every call
    /// on it ended) before reconnecting.
    pub(super) old_client: Option<Weak<dyn super::link::Link>>,
    /// Regions the replica may be missing; `None` = unknown (a full comparison is due).
    pub(super) dirty: Option<RegionBitmap>,
    /// The replica instance the dirty tracking refers to (see `OpenInfo::instance`).
    pub(super) instance: Option<u64>,
    pub(super) resync_done_bytes: u64,
    pub(super) resync_copied_bytes: u64,
    pub(super) last_error: Option<String>,
    /// While async: its queue and worker (`None` once cancelled).
    pub(super) async_q: Option<AsyncQueue>,
    /// While async: since when it misses a write that is only in its dirty bitmap.
    pub(super) async_behind_since: Option<tokio::time::Instant>,
    /// Its store's suspect flags and epoch at its last `Open` (`OpenInfo::suspect`): a
    /// suspect replica gets a full comparison, which then clears the flags.
    pub(super) suspect: (u64, u64),
    /// The running resync compares every block (it started without a dirty bitmap).
    pub(super) full_compare: bool,
    /// While async: ranges of writes that failed on every in-sync replica but were queued
    /// to it, so it may hold them while the in-sync copies do not. Not missing acked
    /// writes (a promotion ignores them); compared again when it leaves async.
    pub(super) diverged: Vec<(u64, u64)>,
}

impl Member {
    pub(super) fn new(node: u64, state: ReplicaState) -> Member {
        Member {
            node,
            state,
            target: None,
            old_client: None,
            dirty: None,
            instance: None,
            resync_done_bytes: 0,
            resync_copied_bytes: 0,
            last_error: None,
            async_q: None,
            async_behind_since: None,
            suspect: (0, 0),
            full_compare: false,
            diverged: Vec::new(),
        }
    }

    /// `ranges` are missing on the replica since `since` at the latest (async lag). A due
    /// full comparison (`dirty` = `None` while out of sync) stays one.
    pub(super) fn mark_behind(
        &mut self,
        size_bytes: u64,
        ranges: &[(u64, u64)],
        since: tokio::time::Instant,
    ) {
        if !ranges.iter().any(|&(_, len)| len > 0) {
            return;
        }
        replica_set::mark_missing(&mut self.dirty, self.state, ranges, size_bytes);
        self.async_behind_since = Some(match self.async_behind_since {
            Some(t) => t.min(since),
            None => since,
        });
    }

    /// (lag bytes, lag seconds) of an async replica: what its queue holds, what its bitmap
    /// records, and what it took that failed everywhere; zero for any other.
    pub(super) fn async_lag(&self, size_bytes: u64) -> (u64, f64) {
        if self.state != ReplicaState::Async {
            return (0, 0.0);
        }
        let (queued, oldest) = match &self.async_q {
            Some(q) => {
                let (b, at, _) = q.lag();
                (b, at)
            }
            None => (0, None),
        };
        // Ranges it took that failed on every in-sync copy differ until compared.
        let diverged: u64 = self.diverged.iter().map(|&(_, len)| len).sum();
        let dirty = self.dirty_bytes(size_bytes).unwrap_or(size_bytes) + diverged;
        let since = match (oldest, self.async_behind_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (
            queued + dirty,
            since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0),
        )
    }

    /// Drops its connection so the next use opens a new session (an `Open` barrier: no
    /// frame sent before can land after it); a remote one's old connection is remembered
    /// until every call on it ended.
    pub(super) fn end_session(&mut self) {
        if let Some(t) = self.target.take() {
            if !t.is_local() {
                self.old_client = Some(Arc::downgrade(&t.link));
            }
        }
    }

    pub(super) fn dirty_bytes(&self, size_bytes: u64) -> Option<u64> {
        self.dirty
            .as_ref()
            .map(|d| (d.count() * DIRTY_REGION_BYTES).min(size_bytes))
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) read_repairs: AtomicU64,
    pub(super) checksum_errors: AtomicU64,
    pub(super) ejections: AtomicU64,
    pub(super) reconciled_blocks: AtomicU64,
}

/// Everything the coordinator's tasks share.
pub(super) struct Inner {
    pub(super) cfg: CoordinatorConfig,
    pub(super) name: String,
    pub(super) ctx: Ctx,
    pub(super) size_bytes: u64,
    pub(super) meta: Arc<dyn MetaProposer>,
    pub(super) local_server: Arc<ReplicaServer>,
    pub(super) members: Mutex<Vec<Member>>,
    pub(super) locks: RangeLock,
    pub(super) hot: HotSet,
    /// Serialises replica-state proposals and the in-memory changes that follow them.
    pub(super) state_lock: tokio::sync::Mutex<()>,
    /// I/O holds it shared; `close` takes it exclusively to wait for in-flight I/O.
    gate: tokio::sync::RwLock<()>,
    fenced: Mutex<Option<String>>,
    closed: AtomicBool,
    pub(super) shutdown: watch::Sender<bool>,
    pub(super) resync_wake: Notify,
    pub(super) counters: Counters,
}

/// The coordinator of one attached volume. See the module doc.
pub struct Coordinator {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("volume", &self.inner.name)
            .field("generation", &self.inner.ctx.generation)
            .finish_non_exhaustive()
    }
}

struct OneReplica {
    wire_id: u64,
    replica: Arc<Replica>,
}

impl LocalReplicas for OneReplica {
    fn get(&self, volume_wire_id: u64) -> Option<Arc<Replica>> {
        (volume_wire_id == self.wire_id).then(|| self.replica.clone())
    }
}

struct NoReplicas;

impl LocalReplicas for NoReplicas {
    fn get(&self, _: u64) -> Option<Arc<Replica>> {
        None
    }
}

pub(super) fn block_range(offset: u64, len: u64) -> (u64, u64) {
    let bs = BLOCK_SIZE as u64;
    (offset / bs, (offset + len).div_ceil(bs))
}

/// The bytes of hot region `region` within a volume of `size_bytes` (`None` past its end).
pub(super) fn hot_region_bytes(region: u64, size_bytes: u64) -> Option<(u64, u64)> {
    let off = region * HOT_REGION_BYTES;
    (off < size_bytes).then(|| (off, HOT_REGION_BYTES.min(size_bytes - off)))
}

fn hot_range(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / HOT_REGION_BYTES,
        (offset + len - 1) / HOT_REGION_BYTES,
    )
}

impl Coordinator {
    /// Opens the coordinator of `vol`, whose `Attach` to this node has committed (so `vol`
    /// carries the new generation). Connects to every replica and opens it at the
    /// generation, ejects every in-sync replica it cannot reach (committed), reconciles the
    /// previous coordinator's hot regions so the in-sync replicas are identical, and starts
    /// the background resync; then it is ready for I/O.
    ///
    /// `local` is this node's replica of the volume, if it has one (see
    /// [`CoordinatorConfig::local_server`]).
    pub async fn open(
        cfg: CoordinatorConfig,
        vol: VolumeRecord,
        local: Option<Arc<Replica>>,
        meta: Arc<dyn MetaProposer>,
    ) -> Result<Arc<Coordinator>> {
        let name = vol.name.clone();
        let invalid = |reason: String| ReplicationError::InvalidSetup {
            volume: name.clone(),
            reason,
        };
        if vol.attached_node != Some(cfg.node_id) {
            return Err(invalid(format!(
                "the volume is attached on {:?}, not on this node ({})",
                vol.attached_node, cfg.node_id
            )));
        }
        match meta.state().volumes.get(&name) {
            None => {
                return Err(ReplicationError::OpenFailed {
                    volume: name,
                    reason: "the volume is not in the cluster metadata".into(),
                })
            }
            Some(cur) if cur.generation != vol.generation => {
                return Err(ReplicationError::Fenced {
                    volume: name,
                    generation: vol.generation,
                    reason: format!("the volume is at generation {} now", cur.generation),
                })
            }
            Some(_) => {}
        }
        let wire_id = vol.wire_id();
        let local_server = match (&cfg.local_server, local) {
            (Some(server), Some(replica)) => {
                if !server
                    .replica(wire_id)
                    .is_some_and(|r| Arc::ptr_eq(&r, &replica))
                {
                    return Err(invalid(
                        "local_server does not serve the local replica passed to open".into(),
                    ));
                }
                if server.node_id() != cfg.node_id {
                    return Err(invalid("local_server belongs to another node".into()));
                }
                server.clone()
            }
            (Some(server), None) => server.clone(),
            (None, Some(replica)) => ReplicaServer::new(
                cfg.node_id,
                meta.clone(),
                Arc::new(OneReplica { wire_id, replica }),
            ),
            (None, None) => ReplicaServer::new(cfg.node_id, meta.clone(), Arc::new(NoReplicas)),
        };
        let ctx = Ctx {
            wire_id,
            generation: vol.generation,
            timeout: cfg.replica_timeout,
        };
        let inner = Arc::new(Inner {
            name: name.clone(),
            ctx,
            size_bytes: vol.size_bytes,
            meta,
            local_server,
            members: Mutex::new(
                vol.replicas
                    .iter()
                    .map(|r| Member::new(r.node, ReplicaState::OutOfSync))
                    .collect(),
            ),
            locks: RangeLock::default(),
            hot: HotSet::new(),
            state_lock: tokio::sync::Mutex::new(()),
            gate: tokio::sync::RwLock::new(()),
            fenced: Mutex::new(None),
            closed: AtomicBool::new(false),
            shutdown: watch::Sender::new(false),
            resync_wake: Notify::new(),
            counters: Counters::default(),
            cfg,
        });

        // Connect to and open every replica at the new generation, in parallel.
        let mut conns = Vec::new();
        for r in &vol.replicas {
            let inner2 = inner.clone();
            let node = r.node;
            conns.push((
                r.clone(),
                tokio::spawn(async move { inner2.connect(node).await }),
            ));
        }
        let mut unreachable_in_sync = Vec::new();
        let mut errors = Vec::new();
        for (rec, task) in conns {
            let res = task
                .await
                .unwrap_or_else(|e| Err(format!("connect task: {e}")));
            let mut members = inner.lock_members();
            let Some(m) = members.iter_mut().find(|m| m.node == rec.node) else {
                continue;
            };
            match res {
                Ok((target, info)) => {
                    m.target = Some(target);
                    m.instance = Some(info.instance);
                    m.suspect = (info.suspect, info.suspect_epoch);
                    // An out-of-sync or resyncing replica from an earlier generation is
                    // unknown to this coordinator: it gets a full comparison.
                    if rec.state == ReplicaState::InSync {
                        m.state = ReplicaState::InSync;
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %inner.name, node = rec.node, error = %e, "replica unreachable at open");
                    errors.push(format!("node {}: {e}", rec.node));
                    m.last_error = Some(e);
                    if rec.state == ReplicaState::InSync {
                        unreachable_in_sync.push(rec.node);
                    }
                }
            }
        }
        if !inner
            .lock_members()
            .iter()
            .any(|m| m.state == ReplicaState::InSync)
        {
            return Err(ReplicationError::OpenFailed {
                volume: name,
                reason: format!(
                    "no in-sync replica is reachable ({}); refusing to serve",
                    errors.join("; ")
                ),
            });
        }
        for node in unreachable_in_sync {
            inner.eject_at_open(node).await?;
        }
        // A replica whose files were created empty (a missing pool mount, a replaced disk)
        // holds nothing, whatever its record says: while another in-sync copy holds data,
        // it is ejected and gets a full copy. When every in-sync copy was created empty
        // (a new volume), they are all identical and trusted; their flag is cleared.
        let created = |m: &Member| m.suspect.0 & crate::store::SUSPECT_CREATED != 0;
        let (empty, trusted): (Vec<u64>, usize) = {
            let members = inner.lock_members();
            let in_sync: Vec<&Member> = members
                .iter()
                .filter(|m| m.state == ReplicaState::InSync)
                .collect();
            (
                in_sync
                    .iter()
                    .filter(|m| created(m))
                    .map(|m| m.node)
                    .collect(),
                in_sync.iter().filter(|m| !created(m)).count(),
            )
        };
        if trusted > 0 {
            for node in empty {
                tracing::warn!(volume = %inner.name, node, "in-sync replica was created empty (missing files); it gets a full copy");
                if let Some(m) = inner.lock_members().iter_mut().find(|m| m.node == node) {
                    m.state = ReplicaState::OutOfSync;
                    m.dirty = None;
                }
                inner.eject_at_open(node).await?;
            }
        } else {
            let new: Vec<(u64, Target, u64)> = inner
                .lock_members()
                .iter()
                .filter(|m| {
                    m.state == ReplicaState::InSync && m.suspect.0 == crate::store::SUSPECT_CREATED
                })
                .filter_map(|m| m.target.clone().map(|t| (m.node, t, m.suspect.1)))
                .collect();
            for (node, t, epoch) in new {
                if t.clear_suspect(inner.ctx, epoch).await.is_ok() {
                    if let Some(m) = inner.lock_members().iter_mut().find(|m| m.node == node) {
                        m.suspect = (0, 0);
                    }
                }
            }
        }
        // An async replica's lag is unknown to a new coordinator (the previous one may
        // have acked writes it never received): it is committed out of sync before any
        // I/O, so an `Async` record always means "holds a prefix of the acknowledged
        // writes", which a promotion relies on. Replicas async by choice turn async again
        // after their resync.
        for rec in vol
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Async)
        {
            let _s = inner.state_lock.lock().await;
            if let Err(e) = inner.propose_state(rec.node, ReplicaState::OutOfSync).await {
                return Err(inner.fence(format!(
                    "cannot mark async replica {} out of sync at open: {e}",
                    rec.node
                )));
            }
        }

        // The previous coordinator's in-flight writes: make the in-sync replicas agree.
        let left = inner.reconcile(&vol.hot_regions).await?;
        if !left.is_empty() {
            tracing::error!(volume = %inner.name, regions = ?left, "hot regions could not be reconciled; they stay hot");
            inner.hot.add_unclean(&left);
        }

        let coord = Arc::new(Coordinator {
            inner: inner.clone(),
            tasks: Mutex::new(Vec::new()),
        });
        let resync = tokio::spawn(inner.clone().resync_loop());
        let retire = tokio::spawn(inner.clone().retire_loop());
        coord
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([resync, retire]);
        tracing::info!(volume = %inner.name, generation = inner.ctx.generation, "coordinator open");
        Ok(coord)
    }

    pub fn volume(&self) -> &str {
        &self.inner.name
    }

    pub fn generation(&self) -> u64 {
        self.inner.ctx.generation
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    /// Runs `f` while holding the I/O gate, inline in the caller's task; a caller that
    /// drops it cannot stop it half-way, as the rest then runs on a task of its own
    /// ([`crate::completion`]).
    async fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        self.inner.check_usable()?;
        let inner = self.inner.clone();
        crate::completion::to_completion(async move {
            let _io = inner.gate.read().await;
            inner.check_usable()?;
            f(inner.clone()).await
        })
        .await
        .map_err(|e| ReplicationError::ReplicasFailed {
            volume: self.inner.name.clone(),
            op: "internal operation",
            detail: e.to_string(),
        })?
    }

    /// Reads `len` bytes at `offset` from an in-sync replica, repairing a bad copy.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.check_range(offset, len as u64, true)?;
        self.run(move |inner| async move { inner.read(offset, len).await })
            .await
    }

    /// Writes `data` at `offset` on every replica; acked per the module doc. With `fua` it
    /// is durable on every in-sync replica when this returns.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        self.inner.check_range(offset, data.len() as u64, true)?;
        if data.is_empty() {
            return Ok(());
        }
        self.run(move |inner| async move { inner.write(offset, Bytes::from(data), fua).await })
            .await
    }

    /// Zeroes `len` bytes at `offset` (holes where whole blocks are covered).
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.inner.check_range(offset, len, false)?;
        if len == 0 {
            return Ok(());
        }
        self.run(move |inner| async move { inner.write_zeroes(offset, len, fua).await })
            .await
    }

    /// Cuts snapshot `id` (its record must be committed pending): every in-sync replica
    /// seals its head, under the whole-volume range lock, so each holds every write
    /// acknowledged before the call and none that starts after it, and their copies are
    /// byte-identical. A copy whose seal fails is ejected, as for a failed write; if that
    /// cannot be committed (or every seal failed), the copies that sealed drop it again.
    /// Returns the nodes that hold it: every copy in sync once it returns.
    pub async fn cut_snapshot(&self, id: String) -> Result<Vec<u64>> {
        self.run(move |inner| async move { inner.cut_snapshot(&id).await })
            .await
    }

    /// Makes every acked write durable on every in-sync replica.
    pub async fn flush(&self) -> Result<()> {
        self.run(|inner| async move { inner.flush_all().await })
            .await
    }

    /// Compares every in-sync replica (and, separately, every resyncing one) block by
    /// block through their checksums, one chunk at a time under the range lock.
    pub async fn verify(&self) -> Result<VerifyReport> {
        self.verify_with(false).await
    }

    /// [`Coordinator::verify`], and with `repair` a scrub: a block that fails its checksum
    /// on some in-sync replicas is rewritten there from a good copy, when the good copies
    /// agree ([`replica_set::block_repair`]). Copies that pass their checksums but differ
    /// are only reported.
    pub async fn verify_with(&self, repair: bool) -> Result<VerifyReport> {
        self.run(move |inner| async move { inner.verify(repair).await })
            .await
    }

    /// Adopts committed replica-state changes made outside this coordinator (an in-sync
    /// replica committed `Async`, an async one committed `Resyncing`) now, rather than at
    /// the next membership refresh (every `resync_retry`). Returns whether one changed.
    pub async fn adopt_replica_states(&self) -> bool {
        self.inner.adopt_async_changes().await
    }

    pub fn stats(&self) -> CoordinatorStats {
        let inner = &self.inner;
        let replicas = inner
            .lock_members()
            .iter()
            .map(|m| ReplicaStats {
                node: m.node,
                state: m.state,
                local: m.node == inner.cfg.node_id,
                connected: m.target.as_ref().is_some_and(|t| !t.is_closed()),
                dirty_bytes: m.dirty_bytes(inner.size_bytes),
                resync_done_bytes: m.resync_done_bytes,
                resync_total_bytes: m.resync_done_bytes
                    + m.dirty_bytes(inner.size_bytes).unwrap_or(0),
                resync_copied_bytes: m.resync_copied_bytes,
                last_error: m.last_error.clone(),
                async_lag_bytes: m.async_lag(inner.size_bytes).0,
                async_lag_seconds: m.async_lag(inner.size_bytes).1,
            })
            .collect();
        CoordinatorStats {
            volume: inner.name.clone(),
            generation: inner.ctx.generation,
            fenced: inner.fenced_reason().is_some(),
            closed: inner.closed.load(Ordering::Acquire),
            read_repairs: inner.counters.read_repairs.load(Ordering::Relaxed),
            checksum_errors: inner.counters.checksum_errors.load(Ordering::Relaxed),
            ejections: inner.counters.ejections.load(Ordering::Relaxed),
            reconciled_blocks: inner.counters.reconciled_blocks.load(Ordering::Relaxed),
            hot_regions: inner.hot.len(),
            replicas,
        }
    }

    /// Stops the background tasks, waits for in-flight I/O, flushes every in-sync replica
    /// and empties the hot set (so the next attach has nothing to reconcile). Later I/O
    /// fails with `ESHUTDOWN`. A fenced coordinator reports the fencing.
    pub async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        inner.shutdown.send_replace(true);
        inner.resync_wake.notify_waiters();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            if let Err(e) = t.await {
                if e.is_panic() {
                    tracing::error!(volume = %inner.name, error = %e, "coordinator task panicked");
                }
            }
        }
        let _drained = inner.gate.write().await;
        // M1: a region whose write failed on every in-sync replica may differ between
        // them. Compare it now; what cannot be compared stays hot for the next open.
        let unclean = inner.hot.unclean();
        let left = inner.reconcile(&unclean).await?;
        inner.flush_all().await?;
        let _commit = inner.hot.commit.lock().await;
        let all: Vec<u64> = inner
            .hot
            .all()
            .into_iter()
            .filter(|r| !left.contains(r))
            .collect();
        if !all.is_empty() {
            inner
                .propose_hot(Vec::new(), all.clone())
                .await
                .map_err(|e| inner.fence(format!("cannot clear the hot regions at close: {e}")))?;
            inner.hot.retired(&all);
        }
        tracing::info!(volume = %inner.name, generation = inner.ctx.generation, "coordinator closed");
        Ok(())
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // Without `close` this is a crash as far as the replicas are concerned: the hot
        // regions stay in the metadata for the next coordinator to reconcile.
        self.inner.shutdown.send_replace(true);
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Inner {
    pub(super) fn lock_members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn fenced_reason(&self) -> Option<String> {
        self.fenced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fences this coordinator for good and returns the error to report.
    pub(super) fn fence(&self, reason: String) -> ReplicationError {
        let reason = {
            let mut f = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                tracing::error!(volume = %self.name, generation = self.ctx.generation, %reason, "coordinator fenced: no further I/O will be acknowledged");
                *f = Some(reason);
            }
            f.clone().unwrap_or_default()
        };
        self.shutdown.send_replace(true);
        self.fenced_error(reason)
    }

    fn fenced_error(&self, reason: String) -> ReplicationError {
        ReplicationError::Fenced {
            volume: self.name.clone(),
            generation: self.ctx.generation,
            reason,
        }
    }

    pub(super) fn check_fenced(&self) -> Result<()> {
        match self.fenced_reason() {
            Some(reason) => Err(self.fenced_error(reason)),
            None => Ok(()),
        }
    }

    fn check_usable(&self) -> Result<()> {
        self.check_fenced()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(ReplicationError::Closed {
                volume: self.name.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn check_range(&self, offset: u64, len: u64, limit: bool) -> Result<()> {
        if limit && len > MAX_IO_BYTES as u64 {
            return Err(ReplicationError::TooLarge {
                volume: self.name.clone(),
                len,
                max: MAX_IO_BYTES,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(ReplicationError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                size: self.size_bytes,
            });
        }
        Ok(())
    }

    /// Connects to the replica on `node` and opens it at this generation.
    pub(super) async fn connect(
        &self,
        node: u64,
    ) -> Result<(Target, super::server::OpenInfo), String> {
        let target = if node == self.cfg.node_id {
            if self.local_server.replica(self.ctx.wire_id).is_none() {
                return Err("this node has no local replica of the volume".into());
            }
            Target::new(
                Arc::new(LocalLink {
                    server: self.local_server.clone(),
                    coordinator_node: self.cfg.node_id,
                }),
                true,
            )
        } else {
            let addr = self
                .meta
                .state()
                .nodes
                .get(&node)
                .map(|n| n.data_addr.clone())
                .ok_or_else(|| format!("node {node} is not in the cluster metadata"))?;
            let link = self
                .cfg
                .network
                .connect(self.cfg.node_id, node, &addr)
                .await?;
            Target::new(link, false)
        };
        let (target, info) = target
            .open(self.ctx)
            .await
            .map_err(|e| format!("open at generation {}: {e}", self.ctx.generation))?;
        if info.size_bytes < self.size_bytes {
            return Err(format!(
                "the replica is {} bytes, smaller than the volume ({} bytes)",
                info.size_bytes, self.size_bytes
            ));
        }
        Ok((target, info))
    }

    pub(super) async fn propose_state(
        &self,
        node: u64,
        state: ReplicaState,
    ) -> Result<(), ProposeError> {
        let res = self
            .meta
            .propose(Command::SetReplicaState {
                name: self.name.clone(),
                node,
                state,
                generation: self.ctx.generation,
            })
            .await
            .map(|_| ());
        match res {
            // The outcome is unknown (a leader may have died between commit and reply). If
            // the applied metadata already says what was asked, at this generation, it
            // committed: treating it as failed would leave this coordinator's memory
            // behind the record for good (found by the simulation, seed 615: a promotion
            // whose reply was lost left its only in-sync copy resyncing forever).
            Err(ProposeError::Unavailable(_))
                if self.meta.state().volumes.get(&self.name).is_some_and(|v| {
                    v.generation == self.ctx.generation
                        && v.replica(node).is_some_and(|r| {
                            r.state == state && r.generation == self.ctx.generation
                        })
                }) =>
            {
                tracing::info!(volume = %self.name, node, %state, "the reply was lost, but the metadata shows the change committed");
                Ok(())
            }
            other => other,
        }
    }

    pub(super) async fn propose_hot(
        &self,
        add: Vec<u64>,
        remove: Vec<u64>,
    ) -> Result<(), ProposeError> {
        self.meta
            .propose(Command::HotRegions {
                name: self.name.clone(),
                generation: self.ctx.generation,
                add,
                remove,
            })
            .await
            .map(|_| ())
    }

    /// Raises an alert in the background (best effort: an alert must never hold up I/O).
    pub(super) fn alert(&self, kind: &str, message: String) {
        let meta = self.meta.clone();
        let cmd = Command::RaiseAlert {
            unix_seconds: super::unix_seconds(),
            severity: "warning".into(),
            kind: kind.into(),
            resource: format!("volume/{}", self.name),
            message,
        };
        let volume = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = meta.propose(cmd).await {
                tracing::warn!(%volume, error = %e, "could not raise an alert");
            }
        });
    }

    async fn eject_at_open(&self, node: u64) -> Result<()> {
        let _s = self.state_lock.lock().await;
        match self.propose_state(node, ReplicaState::OutOfSync).await {
            Ok(()) => {
                self.counters.ejections.fetch_add(1, Ordering::Relaxed);
                self.alert(
                    "replica-ejected",
                    format!(
                        "replica on node {node} was unreachable at attach (generation {}) and is out of sync",
                        self.ctx.generation
                    ),
                );
                Ok(())
            }
            Err(ProposeError::Apply(ApplyError::Fenced { current, .. })) => {
                Err(self.fence(format!("generation {current} is current")))
            }
            Err(e) => Err(self.fence(format!(
                "cannot eject the unreachable replica on node {node}: {e}"
            ))),
        }
    }

    /// A replica failed `op` on bytes `range`, or, with `None`, a flush or a FUA write (any
    /// write since its last good flush may be lost). Ejects it if it is in sync (committed
    /// before this returns Ok), sends a resyncing one back to out-of-sync, and records the
    /// range in its dirty bitmap (`None`: a full comparison).
    pub(super) async fn replica_failed(
        &self,
        node: u64,
        range: Option<(u64, u64)>,
        error: &TargetError,
        op: &str,
    ) -> Result<()> {
        let _s = self.state_lock.lock().await;
        self.check_fenced()?;
        let state = self
            .lock_members()
            .iter()
            .find(|m| m.node == node)
            .map(|m| m.state);
        let Some(state) = state else {
            return Ok(()); // no longer a member
        };
        if state == ReplicaState::OutOfSync {
            self.mark_out_of_sync(node, range, error);
            return Ok(());
        }
        let result = self.propose_state(node, ReplicaState::OutOfSync).await;
        match result {
            Ok(()) => {
                self.mark_out_of_sync(node, range, error);
                if state == ReplicaState::InSync {
                    self.counters.ejections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, node, %op, %error, "replica ejected (out of sync)");
                    self.alert(
                        "replica-ejected",
                        format!("replica on node {node} failed a {op} ({error}) and was ejected"),
                    );
                } else {
                    tracing::warn!(volume = %self.name, node, %op, %error, "resyncing replica failed; back to out of sync");
                }
                self.resync_wake.notify_one();
                Ok(())
            }
            Err(ProposeError::Apply(ApplyError::Fenced { current, .. })) => Err(self.fence(
                format!("generation {current} is current; ejecting node {node} was refused"),
            )),
            Err(ProposeError::Unavailable(reason)) => Err(self.fence(format!(
                "ejecting node {node} could not be committed ({reason})"
            ))),
            Err(ProposeError::Apply(e)) => {
                // An async replica's record must not say `Async` once it misses an acked
                // write (promotion relies on it): the write fails instead.
                if matches!(state, ReplicaState::InSync | ReplicaState::Async) {
                    Err(ReplicationError::EjectRefused {
                        volume: self.name.clone(),
                        node,
                        reason: e.to_string(),
                    })
                } else {
                    // Not counted for acks either way; stop writing to it.
                    self.mark_out_of_sync(node, range, error);
                    Ok(())
                }
            }
        }
    }

    /// Byte ranges of the unclean hot regions (a write failed there on every in-sync
    /// replica, so the in-sync copies may differ there until reconciled).
    pub(super) fn unclean_ranges(&self) -> Vec<(u64, u64)> {
        self.hot
            .unclean()
            .into_iter()
            .filter_map(|r| hot_region_bytes(r, self.size_bytes))
            .collect()
    }

    /// In memory: `node` is out of sync, disconnected, and misses `range`.
    fn mark_out_of_sync(&self, node: u64, range: Option<(u64, u64)>, error: &TargetError) {
        let size = self.size_bytes;
        // Regions a write failed in on every in-sync replica may differ between them: an
        // in-sync replica leaving now may hold such a write the others lack (or lack one
        // they hold), so its resync compares them too (seed 11536).
        let unclean = self.unclean_ranges();
        let mut members = self.lock_members();
        let Some(m) = members.iter_mut().find(|m| m.node == node) else {
            return;
        };
        let mut behind = std::mem::take(&mut m.diverged);
        if let Some(q) = m.async_q.take() {
            // Its worker ends after its current send; the connection is replaced below,
            // so nothing it still has queued can land after a resync.
            let (_, drain) = q.cancel();
            behind.extend(drain.take().0);
        }
        m.dirty = replica_set::ejected_dirty(Ejection {
            state: m.state,
            dirty: m.dirty.take(),
            known_instance: m.instance.is_some(),
            missed: range,
            behind: &behind,
            unclean: &unclean,
            size_bytes: size,
        });
        m.state = ReplicaState::OutOfSync;
        m.async_behind_since = None;
        // Reopened (a new session) before its resync, the local replica too: an `Open`
        // waits for every frame already admitted and refuses every later one of the old
        // session, so nothing sent before the ejection can land after the resync copied.
        m.end_session();
        m.last_error = Some(error.to_string());
    }

    /// Who gets a write or flush now: every in-sync replica and every connected resyncing
    /// one. Out-of-sync replicas get `range` marked dirty instead, under the same lock,
    /// so a replica is always either sent a write or marked as missing it. Async replicas
    /// get `op` queued (not waited for), or `range` marked dirty when their queue is
    /// stopped or full; a flush (`range` = `None`) is queued for them, never waited for.
    pub(super) fn snapshot_targets(
        &self,
        range: Option<(u64, u64)>,
        op: Option<AsyncOp>,
    ) -> Vec<(u64, ReplicaState, Option<Target>)> {
        let mut out = Vec::new();
        let (max_bytes, max_ops) = (self.cfg.async_max_lag_bytes, self.cfg.async_max_lag_ops);
        for m in self.lock_members().iter_mut() {
            match m.state {
                ReplicaState::InSync => out.push((m.node, m.state, m.target.clone())),
                ReplicaState::Resyncing if m.target.is_some() => {
                    out.push((m.node, m.state, m.target.clone()))
                }
                ReplicaState::Async => {
                    if range.is_none() {
                        // A flush: queued in order, not waited for. A stopped queue is
                        // behind already; it leaves async (see `check_in_sync_connections`).
                        if let (Some(q), Some(op)) = (&m.async_q, &op) {
                            q.push(op.clone(), max_bytes, max_ops);
                        }
                        continue;
                    }
                    let queued = match (&m.async_q, &op) {
                        (Some(q), Some(op)) => q.push(op.clone(), max_bytes, max_ops),
                        _ => false,
                    };
                    if !queued {
                        // Too far behind, or its queue failed: it misses this write, so it
                        // is committed out of sync before the write is acked (`settle`
                        // treats the missing target as a failure), like an ejection. An
                        // `Async` record thus never hides a hole in the acked writes.
                        if m.async_behind_since.is_none() {
                            tracing::warn!(volume = %self.name, node = m.node, "async replica is too far behind (or failed); it leaves async for a resync");
                        }
                        out.push((m.node, m.state, None));
                    }
                }
                _ => {
                    if let (Some((off, len)), Some(d)) = (range, m.dirty.as_mut()) {
                        d.set_bytes(off, len, DIRTY_REGION_BYTES);
                    }
                }
            }
        }
        out
    }

    /// In-sync replicas to read from, the local one first. A suspect copy (recovered after
    /// a crash, a failed fdatasync) comes after the trusted ones, and one created empty
    /// last of all; the same order picks the source when reconciling.
    pub(super) fn read_sources(&self, except: Option<u64>) -> Vec<(u64, Target)> {
        let mut out: Vec<(u64, u64, Target)> = self
            .lock_members()
            .iter()
            .filter(|m| m.state == ReplicaState::InSync && Some(m.node) != except)
            .filter_map(|m| m.target.clone().map(|t| (m.suspect.0, m.node, t)))
            .collect();
        // Trusted copies first, then those that may have lost unflushed writes, and last
        // those created empty (which hold nothing); the local one first among equals.
        out.sort_by_key(|(suspect, _, t)| {
            (
                *suspect & crate::store::SUSPECT_CREATED != 0,
                *suspect != 0,
                !t.is_local(),
            )
        });
        out.into_iter().map(|(_, n, t)| (n, t)).collect()
    }

    /// Runs `op` on every target at once, from the calling task, and collects the results
    /// in `targets` order. The remote targets are started first, so their round trips
    /// overlap the local replica's store write. Callers run inside
    /// [`Coordinator::run`], so the fan-out is never dropped half-way.
    async fn fan_out<F, Fut>(
        &self,
        targets: Vec<(u64, ReplicaState, Option<Target>)>,
        op: F,
    ) -> Vec<(u64, ReplicaState, Result<(), TargetError>)>
    where
        F: Fn(Target) -> Fut,
        Fut: Future<Output = Result<(), TargetError>> + Send + 'static,
    {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_by_key(|&i| targets[i].2.as_ref().is_some_and(|t| t.is_local()));
        let futs = order.iter().map(|&i| {
            let fut = targets[i].2.clone().map(&op);
            async move {
                match fut {
                    Some(f) => f.await,
                    None => Err(TargetError::NotConnected),
                }
            }
        });
        let done = futures_util::future::join_all(futs).await;
        // Back to `targets` order.
        let mut results: Vec<(usize, Result<(), TargetError>)> =
            order.into_iter().zip(done).collect();
        results.sort_by_key(|(i, _)| *i);
        targets
            .into_iter()
            .zip(results)
            .map(|((node, state, _), (_, res))| (node, state, res))
            .collect()
    }

    /// Carries out the ack rule's verdict on one fan-out's results
    /// ([`replica_set::settle`]): ejections before the ack, or the error.
    async fn settle(
        &self,
        op: &'static str,
        range: Option<(u64, u64)>,
        synced: bool,
        results: Vec<(u64, ReplicaState, Result<(), TargetError>)>,
    ) -> Result<()> {
        match replica_set::settle(results, synced) {
            Verdict::Ack { eject } => {
                for f in &eject {
                    let res = self
                        .replica_failed(f.node, f.range(range), &f.error, op)
                        .await;
                    if let Err(e @ ReplicationError::EjectRefused { .. }) = res {
                        // Not acked after all, and it may have landed anywhere: on the
                        // in-sync copies that took it (one may have turned async since),
                        // not on the one that cannot be ejected. The unknown-outcome rule
                        // applies as if it had failed everywhere (seed 9823); the caller's
                        // `hot.finish` leaves its regions unclean.
                        self.unknown_outcome(range, &eject);
                        return Err(e);
                    }
                    res?;
                }
                Ok(())
            }
            Verdict::NoCopy => Err(ReplicationError::ReplicasFailed {
                volume: self.name.clone(),
                op,
                detail: "no in-sync replica took it".into(),
            }),
            // Generations only grow through an attach elsewhere: this coordinator is stale.
            Verdict::Stale { node } => Err(self.fence(format!(
                "the replica on node {node} refused generation {} as stale",
                self.ctx.generation
            ))),
            Verdict::Fail { failures, no_space } => {
                // The write may have landed on some in-sync replicas: its regions are
                // unclean before anything below can eject one (which then compares them).
                if let Some((off, len)) = range {
                    let (r0, r1) = hot_range(off, len);
                    self.hot.mark_unclean(r0, r1);
                }
                // A resyncing replica that failed goes back; in-sync ones stay.
                let resyncing: Vec<u64> = self
                    .lock_members()
                    .iter()
                    .filter(|m| m.state == ReplicaState::Resyncing)
                    .map(|m| m.node)
                    .collect();
                for f in failures.iter().filter(|f| resyncing.contains(&f.node)) {
                    self.replica_failed(f.node, f.range(range), &f.error, op)
                        .await?;
                }
                self.unknown_outcome(range, &failures);
                if no_space {
                    return Err(ReplicationError::NoSpace {
                        volume: self.name.clone(),
                    });
                }
                let detail = failures
                    .iter()
                    .map(|f| format!("node {}: {}", f.node, f.error))
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(ReplicationError::ReplicasFailed {
                    volume: self.name.clone(),
                    op,
                    detail,
                })
            }
        }
    }

    /// Carries out the unknown-outcome rule ([`replica_set::unknown_outcome`]) for a write
    /// that failed on every in-sync replica, or whose failed in-sync replica could not be
    /// ejected. A replica that gets a new session is reconnected by
    /// `check_in_sync_connections`; until then its I/O fails.
    fn unknown_outcome(&self, range: Option<(u64, u64)>, failures: &[Failure]) {
        let mut members = self.lock_members();
        let states: Vec<(u64, ReplicaState)> = members.iter().map(|m| (m.node, m.state)).collect();
        for (node, action) in replica_set::unknown_outcome(&states, failures) {
            let Some(m) = members.iter_mut().find(|m| m.node == node) else {
                continue;
            };
            match action {
                AfterUnknown::CompareAgain => {
                    if let (Some((off, len)), Some(d)) = (range, m.dirty.as_mut()) {
                        d.set_bytes(off, len, DIRTY_REGION_BYTES);
                    }
                }
                AfterUnknown::Diverged => {
                    if let Some(r) = range {
                        m.diverged.push(r);
                    }
                }
                AfterUnknown::NewSession => {
                    m.end_session();
                    tracing::warn!(volume = %self.name, node, "in-sync replica did not answer a failed write; it gets a new session before further I/O");
                }
            }
        }
        drop(members);
        self.resync_wake.notify_one();
    }

    /// Makes sure regions `r0..=r1` are committed hot and enters them.
    async fn hot_enter(&self, r0: u64, r1: u64) -> Result<()> {
        loop {
            if self.hot.try_enter(r0, r1) {
                return Ok(());
            }
            let _commit = self.hot.commit.lock().await;
            self.check_fenced()?;
            if self.hot.try_enter(r0, r1) {
                return Ok(());
            }
            let add = self.hot.take_wanted();
            let mut remove = Vec::new();
            if self.hot.len() + add.len() > self.cfg.max_hot_regions {
                let retire = self.hot.pick_retire(Duration::ZERO, Some((r0, r1)));
                if retire.needs_flush {
                    if let Err(e) = self.flush_all().await {
                        self.hot.cancel_retire(&retire.regions);
                        return Err(e);
                    }
                }
                remove = retire.regions;
            }
            if add.is_empty() && remove.is_empty() {
                continue;
            }
            match self.propose_hot(add.clone(), remove.clone()).await {
                Ok(()) => {
                    self.hot.retired(&remove);
                    self.hot.added(&add);
                }
                Err(e) => {
                    self.hot.cancel_retire(&remove);
                    return Err(self.fence(format!("cannot commit hot regions: {e}")));
                }
            }
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        let (b0, b1) = block_range(offset, len);
        let _lock = self.locks.lock(b0, b1).await;
        self.check_fenced()?;
        let (r0, r1) = hot_range(offset, len);
        self.hot_enter(r0, r1).await?;
        let targets = self.snapshot_targets(
            Some((offset, len)),
            Some(AsyncOp::Write {
                offset,
                data: data.clone(),
            }),
        );
        let ctx = self.ctx;
        let results = self
            .fan_out(targets, |t| {
                let data = data.clone();
                async move { t.write(ctx, offset, data, fua).await }
            })
            .await;
        let res = self
            .settle("write", Some((offset, len)), fua, results)
            .await;
        self.hot.finish(r0, r1, res.is_ok());
        res
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            // Pieces end on ZEROES_CHUNK_BYTES boundaries (which are block aligned).
            let piece_end = ((pos / ZEROES_CHUNK_BYTES + 1) * ZEROES_CHUNK_BYTES).min(end);
            let piece = piece_end - pos;
            let (b0, b1) = block_range(pos, piece);
            let _lock = self.locks.lock(b0, b1).await;
            self.check_fenced()?;
            let (r0, r1) = hot_range(pos, piece);
            self.hot_enter(r0, r1).await?;
            let targets = self.snapshot_targets(
                Some((pos, piece)),
                Some(AsyncOp::Zeroes {
                    offset: pos,
                    len: piece as u32,
                }),
            );
            let ctx = self.ctx;
            let at = pos;
            let results = self
                .fan_out(targets, |t| async move {
                    t.write_zeroes(ctx, at, piece as u32, fua).await
                })
                .await;
            let res = self
                .settle("write-zeroes", Some((pos, piece)), false, results)
                .await;
            self.hot.finish(r0, r1, res.is_ok());
            res?;
            pos = piece_end;
        }
        Ok(())
    }

    /// Flushes every in-sync (and resyncing) replica; the ack rule applies.
    async fn cut_snapshot(&self, id: &str) -> Result<Vec<u64>> {
        self.check_fenced()?;
        let blocks = self.size_bytes.div_ceil(BLOCK_SIZE as u64);
        // A region where a write failed on every in-sync copy may differ between them
        // until it is reconciled: the copies of a cut must be identical, so it is
        // reconciled first (its own region locks), then checked under the pause.
        let mut tries = 0;
        let _lock = loop {
            self.reconcile_unclean().await;
            // The pause: writes in flight finish, new ones wait until every copy is sealed.
            let lock = self.locks.lock(0, blocks).await;
            if self.hot.unclean().is_empty() {
                break lock;
            }
            drop(lock);
            tries += 1;
            if tries >= 3 {
                return Err(ReplicationError::SnapshotFailed {
                    volume: self.name.clone(),
                    detail: "regions where a write failed on every in-sync replica are not reconciled yet; retry".into(),
                });
            }
        };
        let in_sync: Vec<(u64, Option<Target>)> = self
            .lock_members()
            .iter()
            .filter(|m| m.state == ReplicaState::InSync)
            .map(|m| (m.node, m.target.clone()))
            .collect();
        let ctx = self.ctx;
        let seals = in_sync.iter().map(|(node, t)| {
            let (node, t, id) = (*node, t.clone(), id.to_string());
            async move {
                let r = match &t {
                    Some(t) => t.seal(ctx, &id).await,
                    None => Err(TargetError::NotConnected),
                };
                (node, t, r)
            }
        });
        let results = futures_util::future::join_all(seals).await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|(n, _, r)| r.as_ref().err().map(|e| format!("node {n}: {e}")))
            .collect();
        let sealed: Vec<u64> = results
            .iter()
            .filter(|(_, _, r)| r.is_ok())
            .map(|(n, _, _)| *n)
            .collect();
        let stale = results
            .iter()
            .any(|(_, _, r)| r.as_ref().is_err_and(|e| e.is_stale()));
        // A copy that failed its seal is treated as one that failed a write: it is ejected
        // (committed), and the snapshot holds on the copies still in sync, which are all of
        // them. If it cannot be ejected, the whole snapshot is undone.
        let mut undo = stale || sealed.is_empty();
        if !undo {
            for (node, _, r) in &results {
                if let Err(e) = r {
                    if let Err(err) = self.replica_failed(*node, Some((0, 0)), e, "seal").await {
                        tracing::warn!(volume = %self.name, snapshot = id, node, error = %err, "a replica that failed its seal cannot be ejected; the snapshot is undone");
                        undo = true;
                        break;
                    }
                }
            }
        }
        if !undo {
            tracing::info!(volume = %self.name, snapshot = id, nodes = ?sealed, failed = ?failed, "snapshot cut");
            return Ok(sealed);
        }
        // No half snapshot: the copies that sealed drop it again (what stays behind, the
        // node's reconciler removes once the record is gone).
        for (node, t, r) in &results {
            if let (Ok(()), Some(t)) = (r, t) {
                if let Err(e) = t.delete_snapshot(ctx, id).await {
                    tracing::warn!(volume = %self.name, snapshot = id, node, error = %e, "dropping a half-made snapshot failed; the node's reconciler removes it");
                }
            }
        }
        if stale {
            return Err(self.fence("a replica refused the snapshot's generation as stale".into()));
        }
        Err(ReplicationError::SnapshotFailed {
            volume: self.name.clone(),
            detail: failed.join("; "),
        })
    }

    pub(super) async fn flush_all(&self) -> Result<()> {
        self.check_fenced()?;
        let seq = self.hot.write_seq();
        let targets = self.snapshot_targets(None, Some(AsyncOp::Flush));
        let ctx = self.ctx;
        let results = self
            .fan_out(targets, |t| async move { t.flush(ctx).await })
            .await;
        self.settle("flush", None, false, results).await?;
        self.hot.flushed(seq);
        Ok(())
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let sources = self.read_sources(None);
        let mut errors = Vec::new();
        for (node, source) in &sources {
            match source.read(self.ctx, offset, len).await {
                Ok(data) => return Ok(data),
                Err(e) if e.is_bad_data() => {
                    self.counters
                        .checksum_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, node, offset, len, "read failed its checksum on a replica; repairing from another");
                    return self.repair_read(offset, len, *node, source.clone()).await;
                }
                Err(e) if e.is_stale() => {
                    return Err(self.fence(format!(
                        "the replica on node {node} refused generation {} as stale",
                        self.ctx.generation
                    )));
                }
                Err(e) => errors.push(format!("node {node}: {e}")),
            }
        }
        Err(ReplicationError::ReplicasFailed {
            volume: self.name.clone(),
            op: "read",
            detail: if errors.is_empty() {
                "no in-sync replica is connected".into()
            } else {
                errors.join("; ")
            },
        })
    }

    /// Serves a read whose copy on `bad_node` failed its checksum from another in-sync
    /// replica, and writes the good blocks back to `bad_node`. Under the range lock, so no
    /// write can land between the good read and the write-back.
    async fn repair_read(
        &self,
        offset: u64,
        len: usize,
        bad_node: u64,
        bad: Target,
    ) -> Result<Vec<u8>> {
        let bs = BLOCK_SIZE as u64;
        let (b0, b1) = block_range(offset, len as u64);
        let (aoff, alen) = (b0 * bs, (b1 - b0) * bs);
        let _lock = self.locks.lock(b0, b1).await;
        let mut errors = Vec::new();
        for (node, source) in self.read_sources(Some(bad_node)) {
            let good = match read_range(&source, self.ctx, aoff, alen).await {
                Ok(d) => d,
                Err(e) => {
                    if e.is_bad_data() {
                        self.counters
                            .checksum_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    errors.push(format!("node {node}: {e}"));
                    continue;
                }
            };
            match repair_write(&bad, self.ctx, aoff, &good).await {
                Ok(()) => {
                    self.counters.read_repairs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.name, bad_node, from = node, offset = aoff, len = alen, "read repaired");
                    self.alert(
                        "read-repair",
                        format!(
                            "{alen} bytes at offset {aoff} failed their checksum on node {bad_node}; served from node {node} and rewritten"
                        ),
                    );
                }
                Err(e) => {
                    self.replica_failed(bad_node, Some((aoff, alen)), &e, "read repair")
                        .await?;
                }
            }
            let skip = (offset - aoff) as usize;
            return Ok(good[skip..skip + len].to_vec());
        }
        // No copy holds the whole range intact: assemble it block by block from whichever
        // in-sync copy holds each block (the first bad node included), and rewrite only the
        // blocks a copy failed.
        let mut sources = vec![(bad_node, bad.clone())];
        sources.extend(self.read_sources(Some(bad_node)));
        let mut out = Vec::with_capacity(alen as usize);
        let mut complete = true;
        for b in b0..b1 {
            // Every copy is read (this path is rare): each bad block found is rewritten.
            let mut good = None;
            let mut failed = Vec::new();
            for (node, source) in &sources {
                match read_range(source, self.ctx, b * bs, bs).await {
                    Ok(d) => {
                        if good.is_none() {
                            good = Some((*node, d));
                        }
                    }
                    Err(e) if e.is_bad_data() => failed.push((*node, source.clone())),
                    Err(_) => {}
                }
            }
            let Some((from, data)) = good else {
                complete = false;
                break;
            };
            for (node, target) in failed {
                match repair_write(&target, self.ctx, b * bs, &data).await {
                    Ok(()) => {
                        self.counters.read_repairs.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(volume = %self.name, bad_node = node, from, block = b, "block repaired");
                    }
                    Err(e) => {
                        self.replica_failed(node, Some((b * bs, bs)), &e, "read repair")
                            .await?;
                    }
                }
            }
            out.extend_from_slice(&data);
        }
        if complete {
            self.alert(
                "read-repair",
                format!("{alen} bytes at offset {aoff} had bad blocks on several copies; each was served and rewritten from a good one"),
            );
            let skip = (offset - aoff) as usize;
            return Ok(out[skip..skip + len].to_vec());
        }
        self.alert(
            "read-failed",
            format!(
                "{len} bytes at offset {offset} have no good copy: node {bad_node} failed its checksum; {}",
                errors.join("; ")
            ),
        );
        Err(ReplicationError::NoGoodCopy {
            volume: self.name.clone(),
            offset,
            len: len as u64,
            detail: format!("node {bad_node}: checksum mismatch; {}", errors.join("; ")),
        })
    }

    /// Scrubs one block the in-sync replicas disagree on ([`replica_set::block_repair`]):
    /// reads it from each (a read verifies its checksum) and rewrites the corrupt copies
    /// from a good one. Call with the block locked. Returns whether it was rewritten.
    async fn repair_block(&self, block: u64, in_sync: &[(u64, Target)]) -> Result<bool> {
        let bs = BLOCK_SIZE as u64;
        let mut reads = Vec::new();
        let mut data = BTreeMap::new();
        for (node, t) in in_sync {
            let read = match read_range(t, self.ctx, block * bs, bs).await {
                Ok(d) => {
                    let digest = crate::store::block_digest(&d);
                    data.insert(*node, d);
                    BlockRead::Good(digest)
                }
                Err(e) if e.is_bad_data() => BlockRead::Bad,
                Err(_) => BlockRead::Unreadable,
            };
            reads.push((*node, read));
        }
        match replica_set::block_repair(&reads) {
            BlockRepair::Rewrite { from, to } => {
                let good = &data[&from];
                let mut all = true;
                for node in to {
                    let Some((_, t)) = in_sync.iter().find(|(n, _)| *n == node) else {
                        continue;
                    };
                    match repair_write(t, self.ctx, block * bs, good).await {
                        Ok(()) => {
                            self.counters.read_repairs.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(volume = %self.name, bad_node = node, from, block, "scrub rewrote a block that failed its checksum");
                            self.alert(
                                "read-repair",
                                format!("block {block} failed its checksum on node {node}; the scrub rewrote it from node {from}"),
                            );
                        }
                        Err(e) => {
                            all = false;
                            self.replica_failed(node, Some((block * bs, bs)), &e, "scrub")
                                .await?;
                        }
                    }
                }
                Ok(all)
            }
            BlockRepair::Diverged => {
                tracing::error!(volume = %self.name, block, reads = ?reads, "in-sync replicas hold different good copies of a block; not repaired");
                Ok(false)
            }
            BlockRepair::NoGoodCopy => {
                tracing::error!(volume = %self.name, block, reads = ?reads, "no in-sync copy of the block passes its checksum");
                Ok(false)
            }
            BlockRepair::Nothing => Ok(false),
        }
    }

    async fn verify(&self, repair: bool) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let members: Vec<(u64, ReplicaState, Target)> = {
            let mut v: Vec<_> = self
                .lock_members()
                .iter()
                .filter(|m| matches!(m.state, ReplicaState::InSync | ReplicaState::Resyncing))
                .filter_map(|m| m.target.clone().map(|t| (m.node, m.state, t)))
                .collect();
            v.sort_by_key(|(_, s, t)| (*s != ReplicaState::InSync, !t.is_local()));
            v
        };
        for (node, state, _) in &members {
            match state {
                ReplicaState::InSync => report.in_sync_nodes.push(*node),
                _ => report.resyncing_nodes.push(*node),
            }
        }
        let mut failed: BTreeSet<u64> = BTreeSet::new();
        let mut off = 0;
        while off < self.size_bytes {
            self.check_usable()?;
            let len = VERIFY_CHUNK_BYTES.min(self.size_bytes - off);
            let (b0, b1) = block_range(off, len);
            // Held through the comparison and any repair of this chunk.
            let _lock = self.locks.lock(b0, b1).await;
            let sums = {
                let tasks: Vec<_> = members
                    .iter()
                    .filter(|(n, _, _)| !failed.contains(n))
                    .map(|(n, s, t)| {
                        let (t, ctx) = (t.clone(), self.ctx);
                        (
                            *n,
                            *s,
                            tokio::spawn(async move { t.checksums(ctx, off, len).await }),
                        )
                    })
                    .collect();
                let mut sums = Vec::new();
                for (n, s, task) in tasks {
                    match task.await {
                        Ok(Ok(c)) => sums.push((n, s, c)),
                        Ok(Err(e)) => {
                            failed.insert(n);
                            report.errors.push((n, e.to_string()));
                        }
                        Err(e) => {
                            failed.insert(n);
                            report.errors.push((n, format!("task: {e}")));
                        }
                    }
                }
                sums
            };
            let Some(reference) = sums
                .iter()
                .find(|(_, s, _)| *s == ReplicaState::InSync)
                .map(|(_, _, c)| c.clone())
            else {
                break; // no in-sync replica answered; reported in errors
            };
            for i in 0..(b1 - b0) as usize {
                let block = b0 + i as u64;
                let in_sync_differ = sums
                    .iter()
                    .any(|(_, s, c)| *s == ReplicaState::InSync && c[i] != reference[i]);
                if in_sync_differ {
                    report.mismatched_blocks += 1;
                    if repair {
                        let in_sync: Vec<(u64, Target)> = sums
                            .iter()
                            .filter(|(_, s, _)| *s == ReplicaState::InSync)
                            .filter_map(|(n, _, _)| {
                                members
                                    .iter()
                                    .find(|(m, _, _)| m == n)
                                    .map(|(_, _, t)| (*n, t.clone()))
                            })
                            .collect();
                        if self.repair_block(block, &in_sync).await? {
                            report.repaired_blocks += 1;
                        }
                    }
                    if report.mismatches.len() < VERIFY_MAX_REPORTED_BLOCKS {
                        report.mismatches.push(BlockMismatch {
                            block,
                            offset_bytes: block * BLOCK_SIZE as u64,
                            digests: sums
                                .iter()
                                .filter(|(_, s, _)| *s == ReplicaState::InSync)
                                .map(|(n, _, c)| (*n, c[i]))
                                .collect(),
                        });
                    }
                }
                if sums
                    .iter()
                    .any(|(_, s, c)| *s != ReplicaState::InSync && c[i] != reference[i])
                {
                    report.resyncing_mismatched_blocks += 1;
                }
            }
            report.blocks_compared += b1 - b0;
            off += len;
        }
        Ok(report)
    }
}

/// Reads `[offset, offset + len)` in pieces of at most [`MAX_IO_BYTES`].
pub(super) async fn read_range(
    t: &Target,
    ctx: Ctx,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, TargetError> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(MAX_IO_BYTES as u64);
        out.extend(t.read(ctx, offset + pos, n as usize).await?);
        pos += n;
    }
    Ok(out)
}

/// Writes a repair (good bytes over a copy that failed its checksum) at `offset`, in
/// pieces of at most [`MAX_IO_BYTES`], each durably (FUA): the bad
/// bytes are the ones on disk, so an unsynced repair that a power loss rolls back would
/// bring them back, and crash recovery recomputes a hot region's checksums from its data,
/// which would make them look good (seed 21230). Repairs are rare; each costs a sync.
pub(super) async fn repair_write(
    t: &Target,
    ctx: Ctx,
    offset: u64,
    data: &[u8],
) -> Result<(), TargetError> {
    for (i, piece) in data.chunks(MAX_IO_BYTES).enumerate() {
        let at = offset + (i * MAX_IO_BYTES) as u64;
        t.write(ctx, at, Bytes::copy_from_slice(piece), true)
            .await?;
    }
    Ok(())
}
