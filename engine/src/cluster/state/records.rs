//! The records and commands of the cluster state: nodes, volumes, replicas, alerts, and
//! the [`Command`]s that change them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::meta::IoPriority;

/// Alerts kept in the state; older ones are dropped first.
pub const MAX_ALERTS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// Raft voter with storage.
    Voter,
    /// Raft learner with storage: follows the log, does not vote.
    Learner,
    /// Raft voter without storage (a tie-breaker for a third site).
    Witness,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub name: String,
    pub admin_addr: String,
    pub data_addr: String,
    pub domain: String,
    pub zone: String,
    pub rack: String,
    pub role: NodeRole,
    pub pool_size_bytes: u64,
    pub joined_unix_seconds: u64,
    /// Random per node incarnation: drawn when the node joins, with no state of its own.
    /// A join under a taken name is the same join retried only if this matches; a node
    /// that lost its state (a wiped disk) comes back with another and is refused until
    /// the old member is removed (`cluster remove`), so it never reuses the raft id of a
    /// voter whose log and vote it has lost.
    #[serde(default)]
    pub instance: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    InSync,
    Resyncing,
    OutOfSync,
    /// Receives every write in the background: acks do not wait for it, so it may lag
    /// (the RPO). Never counts as in sync. Entered only from in-sync (policy `degrade`
    /// of the latency gate); it leaves through resyncing (or out-of-sync on a failure).
    Async,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::InSync => "in-sync",
            ReplicaState::Resyncing => "resyncing",
            ReplicaState::OutOfSync => "out-of-sync",
            ReplicaState::Async => "async",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub node: u64,
    pub state: ReplicaState,
    /// Generation at which the state was last set.
    pub generation: u64,
    /// Resync progress (bytes done, bytes total) while resyncing.
    #[serde(default)]
    pub resync_done_bytes: u64,
    #[serde(default)]
    pub resync_total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub repl: u32,
    pub io_priority: IoPriority,
    pub labels: BTreeMap<String, String>,
    pub created_unix_seconds: u64,
    pub generation: u64,
    pub attached_node: Option<u64>,
    pub replicas: Vec<ReplicaRecord>,
    /// The coordinator's activity log: regions that may differ between replicas if the
    /// coordinator dies. Reconciled by the next attach.
    #[serde(default)]
    pub hot_regions: BTreeSet<u64>,
    /// Replicas taken out of the replica set because their domain was deactivated; they
    /// come back (out of sync, to be resynced) when it is activated.
    #[serde(default)]
    pub parked: Vec<u64>,
    /// Set when the coordinator was removed without a clean detach (its domain was
    /// deactivated): the next attach waits out its lease before serving.
    #[serde(default)]
    pub lease_wait: bool,
    /// Domains whose replicas are asynchronous by choice (`volume create --async-domains`,
    /// the PX-DR async pattern for sites beyond the sync RTT limit): they receive every
    /// write without holding up the ack, are never latency-gated, and return to async
    /// after any resync. A failover that promotes them (`domains deactivate
    /// --promote-async`) swaps the roles: the lost domain becomes the async one.
    #[serde(default)]
    pub async_domains: BTreeSet<String>,
    /// The volume's snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    /// The sequence number of the next snapshot id (never reused).
    #[serde(default)]
    pub next_snapshot_seq: u64,
}

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    /// Its cut is being made: replicas may or may not hold it yet. A coordinator that dies
    /// here leaves it pending; the next attach deletes it.
    Pending,
    /// Every node in `nodes` sealed its replica at the cut.
    Ready,
}

impl std::fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotState::Pending => "pending",
            SnapshotState::Ready => "ready",
        })
    }
}

/// One snapshot of a volume: a crash-consistent cut, sealed as a layer on the replicas of
/// `nodes` (`store::layers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Assigned by the state machine: the volume id, `-`, a sequence number. What the
    /// replicas' layers are named by.
    pub id: String,
    /// The user's name, unique within the volume.
    pub name: String,
    pub created_unix_seconds: u64,
    /// The volume's size at the cut.
    pub size_bytes: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub state: SnapshotState,
    /// The coordinator generation that took it.
    pub generation: u64,
    /// Nodes whose replica holds it.
    #[serde(default)]
    pub nodes: Vec<u64>,
}

impl VolumeRecord {
    pub fn snapshot(&self, name_or_id: &str) -> Option<&SnapshotRecord> {
        self.snapshots
            .iter()
            .find(|s| s.name == name_or_id || s.id == name_or_id)
    }

    /// The volume id as the data path carries it.
    pub fn wire_id(&self) -> u64 {
        u64::from_str_radix(&self.id, 16).unwrap_or(0)
    }

    pub fn replica(&self, node: u64) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| r.node == node)
    }

    pub fn in_sync_nodes(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .map(|r| r.node)
            .collect()
    }
}

/// A node's published RTT measurements to its peers (see `crate::latency`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// When the reporting node took it (the proposer's clock).
    pub unix_seconds: u64,
    pub peers: BTreeMap<u64, crate::latency::RttStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: u64,
    pub unix_seconds: u64,
    pub severity: String,
    pub kind: String,
    pub resource: String,
    pub message: String,
}

/// A state-machine command. Proposers fill in every value (ids come from the state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Names the cluster; the first command of a new cluster. Later ones are ignored.
    Init {
        cluster_id: String,
    },
    /// Registers a node; its id is allocated at apply time and returned.
    AddNode {
        node: NodeRecord,
    },
    /// Updates a node's addresses (after a restart with new ports).
    UpdateNodeAddrs {
        id: u64,
        admin_addr: String,
        data_addr: String,
    },
    RemoveNode {
        id: u64,
    },
    CreateVolume {
        /// Boxed: it is by far the largest command.
        volume: Box<VolumeRecord>,
    },
    UpdateVolume {
        name: String,
        size_bytes: Option<u64>,
        repl: Option<u32>,
        io_priority: Option<IoPriority>,
    },
    DeleteVolume {
        name: String,
    },
    /// Attaches `name` on `node`, bumping the generation. `takeover` allows moving an
    /// attachment from another node (failover, when that node is gone).
    Attach {
        name: String,
        node: u64,
        takeover: bool,
    },
    Detach {
        name: String,
        node: u64,
        generation: u64,
    },
    /// Sets one replica's state, decided by the coordinator at `generation`.
    SetReplicaState {
        name: String,
        node: u64,
        state: ReplicaState,
        generation: u64,
    },
    /// Adds or removes replicas (RF change), decided at `generation` (0 when detached).
    /// Membership only: a replica that stays keeps its current record, and a new one joins
    /// out of sync, whatever states `replicas` carries.
    SetReplicas {
        name: String,
        replicas: Vec<ReplicaRecord>,
        repl: u32,
        generation: u64,
    },
    SetResyncProgress {
        name: String,
        node: u64,
        generation: u64,
        done_bytes: u64,
        total_bytes: u64,
    },
    /// Coordinator activity-log transaction.
    HotRegions {
        name: String,
        generation: u64,
        add: Vec<u64>,
        remove: Vec<u64>,
    },
    RaiseAlert {
        unix_seconds: u64,
        severity: String,
        kind: String,
        resource: String,
        message: String,
    },
    /// A node's latest RTT summary; replaces its previous one.
    ReportLatency {
        node: u64,
        report: LatencyReport,
    },
    /// Starts a snapshot of volume `name` (state pending) at the coordinator's
    /// `generation`; returns its id. The cut follows, then [`Command::SnapshotReady`].
    CreateSnapshot {
        name: String,
        generation: u64,
        snapshot: SnapshotRecord,
    },
    /// The cut of snapshot `id` is sealed on every node of `nodes`.
    SnapshotReady {
        name: String,
        generation: u64,
        id: String,
        nodes: Vec<u64>,
    },
    /// Removes snapshot `id` (pending or ready) from volume `name`; every node drops its
    /// layer when it sees the record gone. Removing one that is gone is a no-op.
    DeleteSnapshot {
        name: String,
        id: String,
    },
    /// Deactivates (takes every replica in it out of every replica set, fences
    /// coordinators running in it) or activates (returns the replicas, out of sync) a
    /// cluster domain.
    SetDomainActive {
        domain: String,
        active: bool,
        /// Deactivation only: a volume left without an in-sync replica outside the domain
        /// but with async ones there gets those promoted to in sync (accepting their lag:
        /// RPO > 0) instead of refusing the deactivation.
        #[serde(default)]
        promote_async: bool,
        /// When it was proposed (for the alert a promotion raises).
        #[serde(default)]
        unix_seconds: u64,
    },
}

/// Why a command was refused. The variants map onto gRPC codes in one place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("volume '{0}' already exists")]
    VolumeExists(String),
    #[error("volume '{0}' not found")]
    VolumeNotFound(String),
    #[error("node {0} not found")]
    NodeNotFound(u64),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("node name '{name}' is taken by cluster member {id}. A node that restarts keeps its state and needs no --join; if this node lost its state (a wiped or replaced disk), remove the old member first (`tandemctl cluster remove {name}`), then join again")]
    NodeNameTaken { name: String, id: u64 },
    #[error("volume '{volume}' already has a snapshot named '{name}'")]
    SnapshotExists { volume: String, name: String },
    #[error("volume '{name}' is at generation {current}; a decision made at generation {stale} is refused (fenced)")]
    Fenced {
        name: String,
        current: u64,
        stale: u64,
    },
}

/// What a successful command returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApplyOutput {
    None,
    NodeId(u64),
    Generation(u64),
    /// The id the state machine assigned (a snapshot's).
    Id(String),
}
