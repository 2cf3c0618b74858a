//! Cluster metadata: one raft group (raft-rs) whose state machine holds nodes, volumes,
//! replica sets, generations and alerts.
//!
//! * [`state`]: the deterministic state machine and its commands; the safety rules that
//!   must hold whoever proposes (unique names, one attachment, generation fencing) are
//!   enforced at apply time there.
//! * [`membership`]: raft's configuration converges to the node table (the leader drives
//!   it, one change at a time).
//! * [`raft_node`]: the `RawNode` ready loop on its own thread, persistence in sled, log
//!   compaction and snapshots.
//!
//! Transport (raft messages inside gRPC, authenticated before decoding) lives in the node
//! crate behind [`raft_node::RaftTransport`].

pub mod handle;
pub mod membership;
pub mod raft_node;
pub mod state;

pub use handle::{ClusterError, ClusterHandle, ForwardError, Forwarder, Proposal};
pub use raft_node::{Bootstrap, RaftError, RaftNode, RaftStatus, RaftTransport};
pub use state::{
    Alert, ApplyError, ApplyOutput, ClusterState, Command, LatencyReport, NodeRecord, NodeRole,
    ReplicaRecord, ReplicaState, SnapshotRecord, SnapshotState, VolumeRecord,
    MAX_SNAPSHOTS_PER_VOLUME,
};

#[cfg(test)]
mod tests;
