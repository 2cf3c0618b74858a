//! Synchronous replication: the volume coordinator and the replica side of the data path
//! (DESIGN.md, "The data path").
//!
//! The coordinator runs on the node a volume is attached on. It fans every write out to
//! the volume's replicas, acks only when every in-sync replica has it, ejects (through the
//! cluster metadata, before the ack) any replica that fails, resyncs replicas that come
//! back, repairs reads from a good copy, and reconciles a crashed predecessor's in-flight
//! writes. The replica side serves the wire frames a coordinator sends, fenced by the
//! volume's generation.
//!
//! * [`coordinator`]: [`Coordinator`]. Keeps invariants 1, 2, 3 and 5 of DESIGN.md: no
//!   write is acked while a replica that missed it still counts as in-sync; overlapping
//!   writes reach every replica in one order; reads never return unverified bytes.
//! * [`server`]: [`ReplicaServer`], the [`crate::wire::FrameHandler`] for local replicas.
//!   Keeps: a frame from a coordinator whose generation is not current never touches a
//!   replica; an `Open` waits for the I/O admitted before it and starts a new session, and
//!   a frame of an older session (even one still queued in a socket) is refused.
//! * `resync` (inside the coordinator): background copy of dirty (or all) regions to
//!   returning replicas, and promotion to in-sync through the metadata.
//! * `hot`: the coordinator's activity log (hot regions committed to the metadata before
//!   the first write to them), which bounds what a new coordinator must reconcile.
//! * `target`, `bitmap`: how one replica is reached (locally or over the wire, always
//!   through a [`ReplicaServer`]) and the dirty-region bitmap; the coordinator's ordering
//!   lock is `crate::range_lock`.
//! * [`MetaProposer`]: how this code reaches the cluster metadata (raft in the daemon,
//!   [`InMemoryMeta`] in tests).
//!
//! Every number below is a default a deployment may tune through [`CoordinatorConfig`].

mod asyncq;
mod bitmap;
pub mod coordinator;
mod hot;
pub mod link;
mod replica_set;
mod resync;
pub mod server;
mod target;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::{ApplyError, ApplyOutput, ClusterState, Command};

pub use coordinator::{
    BlockMismatch, Coordinator, CoordinatorConfig, CoordinatorStats, ReplicaStats, VerifyReport,
};
pub use server::{LocalReplicas, LocalSession, ReplicaServer};

/// How long one replica may take to answer one request before it is treated as failed
/// (and, for a write or flush, ejected). A healthy replica answers a 32 MiB write plus
/// `fdatasync` well under a second; 5 s rides out a TCP retransmission (1 s) and a slow
/// `fdatasync` on a busy disk, and is the same order as DRBD's `timeout` x `ko-count`.
pub const REPLICA_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Granularity of the dirty-region bitmap kept for an ejected replica, and of resync
/// copies. 1 MiB: a 64 TiB volume needs an 8 MiB bitmap, and one region copy (done under
/// the coordinator's range lock) blocks writes to that MiB for one read plus one write.
pub const DIRTY_REGION_BYTES: u64 = 1 << 20;

/// Granularity of the coordinator's activity log (`VolumeRecord::hot_regions`): 4 MiB,
/// the same extent as the store's activity log and DRBD's.
pub const HOT_REGION_BYTES: u64 = crate::store::REGION_SIZE;

/// Most regions the coordinator keeps hot. It bounds the work of reconciliation after a
/// coordinator crash (256 x 4 MiB = 1 GiB compared per replica), like the store's own
/// activity log. Soft: when every hot region has a write in flight, a new region is added
/// anyway (so the set can exceed this by the regions of the writes in flight).
pub const MAX_HOT_REGIONS: usize = 256;

/// A hot region with no write for this long is retired in the background (after a flush
/// of every in-sync replica), so a crash leaves little to reconcile. 5 s is the kernel's
/// dirty-writeback and ext4's commit interval: most data is on disk by then anyway.
pub const HOT_REGION_IDLE_RETIRE: Duration = Duration::from_secs(5);

/// How often the resync task looks for replicas to bring back (and retries unreachable
/// nodes).
pub const RESYNC_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Resync progress is published to the metadata at most this often (one raft entry per
/// resyncing replica per second, enough for `tandemctl volume inspect --wait`).
pub const RESYNC_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How long the replica side waits for its metadata to catch up with a frame that
/// carries a newer generation than it has applied (a follower applies an attach a few ms
/// after the leader; 2 s covers a raft election timeout).
pub const GENERATION_WAIT: Duration = Duration::from_secs(2);

/// Poll interval while waiting for the metadata to catch up.
pub const GENERATION_POLL: Duration = Duration::from_millis(10);

/// How long an `Open` waits for the I/O admitted before it to finish. Below
/// [`REPLICA_IO_TIMEOUT`] so the opening coordinator gets an answer (EBUSY) rather than a
/// timeout.
pub const OPEN_DRAIN_TIMEOUT: Duration = Duration::from_secs(4);

/// Mismatching blocks [`Coordinator::verify`] lists individually; the counts are exact.
pub const VERIFY_MAX_REPORTED_BLOCKS: usize = 1024;

/// Unit of work for verify (one checksum request per replica, under the range lock).
pub const VERIFY_CHUNK_BYTES: u64 = 4 << 20;

/// A zeroing request larger than this is split: each piece takes its own range lock and
/// hot regions, so zeroing a whole volume neither blocks all I/O nor floods the hot set.
pub const ZEROES_CHUNK_BYTES: u64 = 64 << 20;

/// Most bytes of writes (and write-zeroes) queued for one async replica and not acked
/// by it yet. 64 MiB is a few seconds of a busy volume over a WAN link; beyond it the
/// replica is tracked by dirty regions instead (see `asyncq`), so the queue's memory is
/// bounded. A single larger operation is accepted into an empty queue.
pub const ASYNC_MAX_LAG_BYTES: u64 = 64 << 20;

/// Most operations queued for one async replica (bounds per-op overhead for small
/// writes the same way).
pub const ASYNC_MAX_LAG_OPS: usize = 16384;

/// Why a proposal did not take effect.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// Committed and refused by the state machine (e.g. `Fenced`).
    #[error("refused by the cluster metadata: {0}")]
    Apply(ApplyError),
    /// Not committed: no quorum, no leader, timeout. The outcome may be unknown.
    #[error("cluster metadata unavailable: {0}")]
    Unavailable(String),
}

/// How the coordinator and the replica server reach the cluster metadata. The node
/// implements it with raft (proposals forwarded to the leader; the call returns once the
/// entry is applied locally, so [`MetaProposer::state`] reflects it). Tests use
/// [`InMemoryMeta`].
#[async_trait::async_trait]
pub trait MetaProposer: Send + Sync + 'static {
    async fn propose(&self, cmd: Command) -> Result<ApplyOutput, ProposeError>;
    /// The state machine as last applied on this node.
    fn state(&self) -> Arc<ClusterState>;
}

/// A [`MetaProposer`] on an in-memory [`ClusterState`]: proposals apply at once. For tests
/// and single-process tools; `set_available(false)` simulates a lost raft majority.
pub struct InMemoryMeta {
    state: Mutex<Arc<ClusterState>>,
    available: AtomicBool,
    /// Each proposal waits this long before it commits (a raft round trip).
    commit_delay: Mutex<std::time::Duration>,
    /// This many proposals commit but report `Unavailable` (a leader that died after
    /// committing, before it answered: the proposer cannot tell).
    lose_replies: std::sync::atomic::AtomicU32,
}

impl InMemoryMeta {
    pub fn new(state: ClusterState) -> Arc<InMemoryMeta> {
        Arc::new(InMemoryMeta {
            state: Mutex::new(Arc::new(state)),
            available: AtomicBool::new(true),
            commit_delay: Mutex::new(std::time::Duration::ZERO),
            lose_replies: Default::default(),
        })
    }

    /// While `false`, every proposal fails with [`ProposeError::Unavailable`].
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::SeqCst);
    }

    /// Every later proposal waits `delay` before it commits.
    pub fn set_commit_delay(&self, delay: std::time::Duration) {
        *self.commit_delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// The next `n` proposals commit but report `Unavailable` (their outcome is unknown
    /// to the proposer, as when a raft leader dies between commit and reply).
    pub fn lose_next_replies(&self, n: u32) {
        self.lose_replies.store(n, Ordering::SeqCst);
    }

    /// Applies `cmd` directly (what a committed entry does), whatever `set_available` says.
    pub fn apply(&self, cmd: &Command) -> Result<ApplyOutput, ApplyError> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (**guard).clone();
        let out = next.apply(cmd)?;
        *guard = Arc::new(next);
        Ok(out)
    }
}

#[async_trait::async_trait]
impl MetaProposer for InMemoryMeta {
    async fn propose(&self, cmd: Command) -> Result<ApplyOutput, ProposeError> {
        let delay = *self.commit_delay.lock().unwrap_or_else(|e| e.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if !self.available.load(Ordering::SeqCst) {
            return Err(ProposeError::Unavailable(
                "in-memory metadata set unavailable".into(),
            ));
        }
        let out = self.apply(&cmd).map_err(ProposeError::Apply);
        let lost = self
            .lose_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost {
            return Err(ProposeError::Unavailable(
                "in-memory metadata lost the reply of a committed proposal".into(),
            ));
        }
        out
    }

    fn state(&self) -> Arc<ClusterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Errors of the replication coordinator. [`ReplicationError::errno`] is what an I/O
/// frontend (NBD) reports.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// A newer coordinator exists, or a safety decision could not be committed: this
    /// coordinator will never ack another write.
    #[error("volume '{volume}': coordinator at generation {generation} is fenced: {reason}")]
    Fenced {
        volume: String,
        generation: u64,
        reason: String,
    },
    #[error("volume '{volume}': the coordinator is closed")]
    Closed { volume: String },
    #[error("volume '{volume}': {len} bytes at offset {offset} reach past the end of the volume ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("volume '{volume}': I/O of {len} bytes is larger than the maximum of {max} bytes")]
    TooLarge {
        volume: String,
        len: u64,
        max: usize,
    },
    #[error("volume '{volume}': no space (ENOSPC) on every in-sync replica")]
    NoSpace { volume: String },
    #[error("volume '{volume}': snapshot not taken (a cut must be sealed on every in-sync replica; the copies that sealed dropped it): {detail}")]
    SnapshotFailed { volume: String, detail: String },
    #[error("volume '{volume}': {op} failed on every in-sync replica: {detail}")]
    ReplicasFailed {
        volume: String,
        op: &'static str,
        detail: String,
    },
    #[error("volume '{volume}': {len} bytes at offset {offset} have no good copy on any in-sync replica: {detail}")]
    NoGoodCopy {
        volume: String,
        offset: u64,
        len: u64,
        detail: String,
    },
    #[error("volume '{volume}': cannot eject the replica on node {node}: {reason}")]
    EjectRefused {
        volume: String,
        node: u64,
        reason: String,
    },
    #[error("volume '{volume}': {reason}")]
    OpenFailed { volume: String, reason: String },
    #[error("volume '{volume}': invalid coordinator setup: {reason}")]
    InvalidSetup { volume: String, reason: String },
}

impl ReplicationError {
    /// The errno an I/O frontend reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ReplicationError::Fenced { .. } | ReplicationError::Closed { .. } => libc::ESHUTDOWN,
            ReplicationError::OutOfRange { .. }
            | ReplicationError::TooLarge { .. }
            | ReplicationError::InvalidSetup { .. } => libc::EINVAL,
            ReplicationError::NoSpace { .. } => libc::ENOSPC,
            ReplicationError::ReplicasFailed { .. }
            | ReplicationError::SnapshotFailed { .. }
            | ReplicationError::NoGoodCopy { .. }
            | ReplicationError::EjectRefused { .. }
            | ReplicationError::OpenFailed { .. } => libc::EIO,
        }
    }
}

/// Seconds since the epoch, for alerts (the proposer picks timestamps; apply is pure).
pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
