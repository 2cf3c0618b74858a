//! The replicated cluster state machine: nodes, volumes, replica sets, generations, alerts.
//!
//! Every node applies the same committed [`Command`]s in the same order to a
//! [`ClusterState`], so `apply` must be deterministic: no clocks, no randomness, no I/O.
//! Commands carry what they need (timestamps are chosen by the proposer).
//!
//! Safety rules enforced here, at apply time, so no race between proposers can break them:
//! * Volume names are unique.
//! * A volume is attached on at most one node; attaching bumps the generation.
//! * Replica-state changes carry the generation they were decided at; a change from a
//!   coordinator whose generation is no longer current is refused (`Fenced`). This is what
//!   stops a zombie coordinator from ejecting replicas and acking writes.
//!
//! Layout: this file holds [`ClusterState`] and `apply`; `records` the records and
//! commands; `domains` domain activation and failover; `tests` the state machine's tests.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

mod domains;
mod records;
#[cfg(test)]
mod tests;

pub use records::*;

/// Most snapshots a volume keeps (pending ones included). The store allows more layers
/// (`store::layers::MAX_LAYERS`): deleted snapshots may wait as hidden layers.
pub const MAX_SNAPSHOTS_PER_VOLUME: usize = 64;

/// Refuses a decision made at a generation the volume has moved on from.
fn check_generation(v: &VolumeRecord, generation: u64) -> Result<(), ApplyError> {
    if v.generation != generation {
        return Err(ApplyError::Fenced {
            name: v.name.clone(),
            current: v.generation,
            stale: generation,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_id: String,
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub alerts: Vec<Alert>,
    /// Latest RTT report of each node.
    #[serde(default)]
    pub latency: BTreeMap<u64, LatencyReport>,
    /// Deactivated cluster domains (every other domain is active).
    #[serde(default)]
    pub inactive_domains: BTreeSet<String>,
    /// Nodes removed from the table (`cluster remove`). Ids are never reused; the leader
    /// takes these out of raft's configuration (`membership::next_removal`).
    #[serde(default)]
    pub removed_nodes: BTreeSet<u64>,
    pub next_node_id: u64,
    pub next_volume_seq: u64,
    pub next_alert_id: u64,
}

impl ClusterState {
    pub fn new(cluster_id: &str) -> ClusterState {
        ClusterState {
            cluster_id: cluster_id.to_string(),
            next_node_id: 1,
            next_volume_seq: 1,
            next_alert_id: 1,
            ..Default::default()
        }
    }

    /// Whether a node's domain is active.
    pub fn node_active(&self, id: u64) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| !self.inactive_domains.contains(&n.domain))
    }

    fn volume_mut(&mut self, name: &str) -> Result<&mut VolumeRecord, ApplyError> {
        self.volumes
            .get_mut(name)
            .ok_or_else(|| ApplyError::VolumeNotFound(name.to_string()))
    }

    /// Applies one committed command.
    pub fn apply(&mut self, cmd: &Command) -> Result<ApplyOutput, ApplyError> {
        match cmd {
            Command::Init { cluster_id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id.clone();
                }
                if self.next_node_id == 0 {
                    self.next_node_id = 1;
                }
                Ok(ApplyOutput::None)
            }
            Command::AddNode { node } => {
                // The same join retried keeps its id (idempotent); another incarnation
                // under a taken name is refused (see `NodeRecord::instance`).
                if let Some(existing) = self.nodes.values().find(|n| n.name == node.name) {
                    if existing.instance == node.instance {
                        return Ok(ApplyOutput::NodeId(existing.id));
                    }
                    return Err(ApplyError::NodeNameTaken {
                        name: node.name.clone(),
                        id: existing.id,
                    });
                }
                let id = if node.id != 0 && !self.nodes.contains_key(&node.id) {
                    node.id
                } else {
                    self.next_node_id
                };
                self.next_node_id = self.next_node_id.max(id + 1);
                let mut rec = node.clone();
                rec.id = id;
                self.nodes.insert(id, rec);
                Ok(ApplyOutput::NodeId(id))
            }
            Command::UpdateNodeAddrs {
                id,
                admin_addr,
                data_addr,
            } => {
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or(ApplyError::NodeNotFound(*id))?;
                n.admin_addr = admin_addr.clone();
                n.data_addr = data_addr.clone();
                Ok(ApplyOutput::None)
            }
            Command::RemoveNode { id } => {
                let name = &self
                    .nodes
                    .get(id)
                    .ok_or(ApplyError::NodeNotFound(*id))?
                    .name;
                let used: Vec<&str> = self
                    .volumes
                    .values()
                    .filter(|v| {
                        v.attached_node == Some(*id)
                            || v.parked.contains(id)
                            || v.replicas.iter().any(|r| r.node == *id)
                    })
                    .map(|v| v.name.as_str())
                    .collect();
                if !used.is_empty() {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "node {name} ({id}) still holds replicas or attachments of volume(s) {}; move them off it first (detach what is attached there; lowering `tandemctl volume update NAME --repl` drops an out-of-sync replica first, and raising it again places a new one elsewhere), then remove the node",
                        used.join(", ")
                    )));
                }
                self.nodes.remove(id);
                self.latency.remove(id);
                self.removed_nodes.insert(*id);
                Ok(ApplyOutput::None)
            }
            Command::CreateVolume { volume } => {
                if self.volumes.contains_key(&volume.name) {
                    return Err(ApplyError::VolumeExists(volume.name.clone()));
                }
                for r in &volume.replicas {
                    if !self.nodes.contains_key(&r.node) {
                        return Err(ApplyError::NodeNotFound(r.node));
                    }
                }
                // The id is assigned here, so concurrent creators can never collide: the
                // cluster id's hash, then a sequence number that is never reused.
                let mut v = (**volume).clone();
                v.id = format!(
                    "{:08x}{:08x}",
                    crc32fast::hash(self.cluster_id.as_bytes()),
                    self.next_volume_seq
                );
                self.next_volume_seq += 1;
                self.volumes.insert(v.name.clone(), v);
                Ok(ApplyOutput::None)
            }
            Command::UpdateVolume {
                name,
                size_bytes,
                repl,
                io_priority,
            } => {
                let v = self.volume_mut(name)?;
                if let Some(s) = size_bytes {
                    if *s < v.size_bytes {
                        return Err(ApplyError::FailedPrecondition(format!(
                            "volume '{name}' is {} bytes; cannot shrink it to {s} bytes (volumes only grow)",
                            v.size_bytes
                        )));
                    }
                    v.size_bytes = *s;
                }
                if let Some(r) = repl {
                    v.repl = *r;
                }
                if let Some(p) = io_priority {
                    v.io_priority = *p;
                }
                Ok(ApplyOutput::None)
            }
            Command::DeleteVolume { name } => {
                let v = self
                    .volumes
                    .get(name)
                    .ok_or_else(|| ApplyError::VolumeNotFound(name.clone()))?;
                if let Some(node) = v.attached_node {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "volume '{name}' is attached on node {node}; detach it first"
                    )));
                }
                self.volumes.remove(name);
                Ok(ApplyOutput::None)
            }
            Command::Attach {
                name,
                node,
                takeover,
            } => {
                if !self.nodes.contains_key(node) {
                    return Err(ApplyError::NodeNotFound(*node));
                }
                if !self.node_active(*node) {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "node {node} is in an inactive domain; activate the domain first"
                    )));
                }
                let v = self.volume_mut(name)?;
                match v.attached_node {
                    Some(other) if other != *node && !takeover => {
                        return Err(ApplyError::FailedPrecondition(format!(
                            "volume '{name}' is attached on node {other}; detach it there first"
                        )));
                    }
                    _ => {}
                }
                if v.in_sync_nodes().is_empty() {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "volume '{name}' has no in-sync replica; it cannot be attached without losing data"
                    )));
                }
                v.generation += 1;
                v.attached_node = Some(*node);
                v.lease_wait = false;
                Ok(ApplyOutput::Generation(v.generation))
            }
            Command::Detach {
                name,
                node,
                generation,
            } => {
                let v = self.volume_mut(name)?;
                if v.attached_node != Some(*node) {
                    return Ok(ApplyOutput::None);
                }
                check_generation(v, *generation)?;
                v.attached_node = None;
                Ok(ApplyOutput::None)
            }
            Command::SetReplicaState {
                name,
                node,
                state,
                generation,
            } => {
                let v = self.volume_mut(name)?;
                check_generation(v, *generation)?;
                let in_sync_left = v
                    .replicas
                    .iter()
                    .filter(|r| r.node != *node && r.state == ReplicaState::InSync)
                    .count();
                let r = v
                    .replicas
                    .iter_mut()
                    .find(|r| r.node == *node)
                    .ok_or(ApplyError::NodeNotFound(*node))?;
                if *state != ReplicaState::InSync
                    && r.state == ReplicaState::InSync
                    && in_sync_left == 0
                {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "replica on node {node} is the last in-sync replica of '{name}'"
                    )));
                }
                if *state == ReplicaState::Async
                    && !matches!(r.state, ReplicaState::InSync | ReplicaState::Async)
                {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "replica on node {node} of '{name}' is {}; only an in-sync replica can turn async",
                        r.state
                    )));
                }
                r.state = *state;
                r.generation = *generation;
                if *state != ReplicaState::Resyncing {
                    r.resync_done_bytes = 0;
                    r.resync_total_bytes = 0;
                }
                Ok(ApplyOutput::None)
            }
            Command::SetReplicas {
                name,
                replicas,
                repl,
                generation,
            } => {
                for r in replicas {
                    if !self.nodes.contains_key(&r.node) {
                        return Err(ApplyError::NodeNotFound(r.node));
                    }
                }
                let v = self.volume_mut(name)?;
                check_generation(v, *generation)?;
                // Membership only: a replica that stays keeps its record as the metadata
                // has it (the list may have been read before an ejection), and a new one
                // joins out of sync. Only a resync or a promotion makes a replica in sync.
                let next: Vec<ReplicaRecord> = replicas
                    .iter()
                    .map(|r| match v.replica(r.node) {
                        Some(current) => current.clone(),
                        None => ReplicaRecord {
                            node: r.node,
                            state: ReplicaState::OutOfSync,
                            generation: v.generation,
                            resync_done_bytes: 0,
                            resync_total_bytes: 0,
                        },
                    })
                    .collect();
                if !next.iter().any(|r| r.state == ReplicaState::InSync) {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "volume '{name}' must keep at least one in-sync replica"
                    )));
                }
                v.replicas = next;
                v.repl = *repl;
                Ok(ApplyOutput::None)
            }
            Command::SetResyncProgress {
                name,
                node,
                generation,
                done_bytes,
                total_bytes,
            } => {
                let v = self.volume_mut(name)?;
                check_generation(v, *generation)?;
                if let Some(r) = v.replicas.iter_mut().find(|r| r.node == *node) {
                    r.resync_done_bytes = *done_bytes;
                    r.resync_total_bytes = *total_bytes;
                }
                Ok(ApplyOutput::None)
            }
            Command::HotRegions {
                name,
                generation,
                add,
                remove,
            } => {
                let v = self.volume_mut(name)?;
                check_generation(v, *generation)?;
                for r in remove {
                    v.hot_regions.remove(r);
                }
                v.hot_regions.extend(add.iter().copied());
                Ok(ApplyOutput::None)
            }
            Command::CreateSnapshot {
                name,
                generation,
                snapshot,
            } => {
                let v = self.volume_mut(name)?;
                check_generation(v, *generation)?;
                if v.snapshots.iter().any(|s| s.name == snapshot.name) {
                    return Err(ApplyError::SnapshotExists {
                        volume: name.clone(),
                        name: snapshot.name.clone(),
                    });
                }
                if v.snapshots.len() >= MAX_SNAPSHOTS_PER_VOLUME {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "volume '{name}' has {MAX_SNAPSHOTS_PER_VOLUME} snapshots, the most a volume keeps; delete one first"
                    )));
                }
                let mut s = snapshot.clone();
                v.next_snapshot_seq = v.next_snapshot_seq.max(1);
                s.id = format!("{}-{}", v.id, v.next_snapshot_seq);
                v.next_snapshot_seq += 1;
                s.state = SnapshotState::Pending;
                s.generation = *generation;
                s.nodes.clear();
                let id = s.id.clone();
                v.snapshots.push(s);
                Ok(ApplyOutput::Id(id))
            }
            Command::SnapshotReady {
                name,
                generation,
                id,
                nodes,
            } => {
                let v = self.volume_mut(name)?;
                check_generation(v, *generation)?;
                let s = v
                    .snapshots
                    .iter_mut()
                    .find(|s| s.id == *id)
                    .ok_or_else(|| {
                        ApplyError::FailedPrecondition(format!(
                            "snapshot {id} of '{name}' is gone (deleted while it was cut)"
                        ))
                    })?;
                s.state = SnapshotState::Ready;
                s.nodes = nodes.clone();
                Ok(ApplyOutput::None)
            }
            Command::DeleteSnapshot { name, id } => {
                let v = self.volume_mut(name)?;
                v.snapshots.retain(|s| s.id != *id);
                Ok(ApplyOutput::None)
            }
            Command::SetDomainActive {
                domain,
                active,
                promote_async,
                unix_seconds,
            } => self.set_domain_active(domain, *active, *promote_async, *unix_seconds),
            Command::ReportLatency { node, report } => {
                if !self.nodes.contains_key(node) {
                    return Err(ApplyError::NodeNotFound(*node));
                }
                self.latency.insert(*node, report.clone());
                Ok(ApplyOutput::None)
            }
            Command::RaiseAlert {
                unix_seconds,
                severity,
                kind,
                resource,
                message,
            } => {
                let id = self.next_alert_id;
                self.next_alert_id += 1;
                self.alerts.push(Alert {
                    id,
                    unix_seconds: *unix_seconds,
                    severity: severity.clone(),
                    kind: kind.clone(),
                    resource: resource.clone(),
                    message: message.clone(),
                });
                if self.alerts.len() > MAX_ALERTS {
                    let drop = self.alerts.len() - MAX_ALERTS;
                    self.alerts.drain(..drop);
                }
                Ok(ApplyOutput::None)
            }
        }
    }
}
