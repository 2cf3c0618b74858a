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
}

impl VolumeRecord {
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

    fn in_domain(&self, node: u64, domain: &str) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.domain == domain)
    }

    /// Whether `node`'s replica of `v` is asynchronous by choice (its domain is one of the
    /// volume's async domains).
    pub fn async_pinned(&self, v: &VolumeRecord, node: u64) -> bool {
        !v.async_domains.is_empty()
            && self
                .nodes
                .get(&node)
                .is_some_and(|n| v.async_domains.contains(&n.domain))
    }

    fn set_domain_active(
        &mut self,
        domain: &str,
        active: bool,
        promote_async: bool,
        unix_seconds: u64,
    ) -> Result<ApplyOutput, ApplyError> {
        if !self.nodes.values().any(|n| n.domain == domain) {
            return Err(ApplyError::FailedPrecondition(format!(
                "no node is in domain '{domain}'"
            )));
        }
        if active {
            if !self.inactive_domains.remove(domain) {
                return Ok(ApplyOutput::None);
            }
            let nodes: Vec<u64> = self
                .nodes
                .values()
                .filter(|n| n.domain == domain)
                .map(|n| n.id)
                .collect();
            for v in self.volumes.values_mut() {
                let back: Vec<u64> = v
                    .parked
                    .iter()
                    .copied()
                    .filter(|n| nodes.contains(n))
                    .collect();
                v.parked.retain(|n| !back.contains(n));
                for node in back {
                    if v.replica(node).is_none() {
                        v.replicas.push(ReplicaRecord {
                            node,
                            state: ReplicaState::OutOfSync,
                            generation: v.generation,
                            resync_done_bytes: 0,
                            resync_total_bytes: 0,
                        });
                    }
                }
            }
            return Ok(ApplyOutput::None);
        }
        if self.inactive_domains.contains(domain) {
            return Ok(ApplyOutput::None);
        }
        // Refuse before changing anything if a volume would lose its last in-sync copy
        // while an async copy outside could be promoted (the operator decides to accept
        // its lag). A volume with no copy outside at all does not hold up the failover of
        // the others: it stays as it is (metadata, replicas, attachment), unavailable
        // until its domain returns, and an alert names it.
        let mut promote: Vec<(String, Vec<u64>)> = Vec::new();
        let mut stranded: Vec<String> = Vec::new();
        for v in self.volumes.values() {
            let inside = v.replicas.iter().any(|r| self.in_domain(r.node, domain));
            let outside = |st: ReplicaState| -> Vec<u64> {
                v.replicas
                    .iter()
                    .filter(|r| {
                        !self.in_domain(r.node, domain) && self.node_active(r.node) && r.state == st
                    })
                    .map(|r| r.node)
                    .collect()
            };
            if !inside || !outside(ReplicaState::InSync).is_empty() {
                continue;
            }
            let asyncs = outside(ReplicaState::Async);
            if promote_async && !asyncs.is_empty() {
                promote.push((v.name.clone(), asyncs));
            } else if !asyncs.is_empty() {
                return Err(ApplyError::FailedPrecondition(format!(
                    "deactivating domain '{domain}' would leave volume '{}' without an in-sync replica; its async replica on node(s) {asyncs:?} can be promoted, losing the writes it lags behind: add --promote-async",
                    v.name
                )));
            } else {
                stranded.push(v.name.clone());
            }
        }
        for name in &stranded {
            let id = self.next_alert_id;
            self.next_alert_id += 1;
            self.alerts.push(Alert {
                id,
                unix_seconds,
                severity: "critical".into(),
                kind: "volume-unavailable".into(),
                resource: format!("volume/{name}"),
                message: format!(
                    "volume {name} has no in-sync copy outside domain {domain}: it stays unavailable until {domain} is activated again (its metadata and replicas are kept)"
                ),
            });
        }
        // Promotion: each async replica holds a prefix of the acknowledged writes (a
        // replica that missed one was committed out of sync before that write's ack), so
        // the promoted copy is crash-consistent; the writes it lagged behind are lost.
        for (name, nodes) in promote {
            let promoted_domains: BTreeSet<String> = nodes
                .iter()
                .filter_map(|n| self.nodes.get(n).map(|r| r.domain.clone()))
                .collect();
            let Some(v) = self.volumes.get_mut(&name) else {
                continue;
            };
            for r in v.replicas.iter_mut().filter(|r| nodes.contains(&r.node)) {
                r.state = ReplicaState::InSync;
            }
            // Roles swap: the lost domain comes back as the async one.
            for d in &promoted_domains {
                v.async_domains.remove(d);
            }
            v.async_domains.insert(domain.to_string());
            let id = self.next_alert_id;
            self.next_alert_id += 1;
            self.alerts.push(Alert {
                id,
                unix_seconds,
                severity: "critical".into(),
                kind: "async-promoted".into(),
                resource: format!("volume/{name}"),
                message: format!(
                    "volume {name}: async replica(s) on node(s) {nodes:?} promoted to in sync because domain {domain} was deactivated; writes they had not received are lost (RPO > 0); domain {domain} returns as the volume's async domain"
                ),
            });
            if self.alerts.len() > MAX_ALERTS {
                let drop = self.alerts.len() - MAX_ALERTS;
                self.alerts.drain(..drop);
            }
        }
        let in_domain: BTreeSet<u64> = self
            .nodes
            .values()
            .filter(|n| n.domain == domain)
            .map(|n| n.id)
            .collect();
        for v in self.volumes.values_mut() {
            if stranded.contains(&v.name) {
                continue;
            }
            let parked: Vec<u64> = v
                .replicas
                .iter()
                .filter(|r| in_domain.contains(&r.node))
                .map(|r| r.node)
                .collect();
            if parked.is_empty() && !v.attached_node.is_some_and(|n| in_domain.contains(&n)) {
                continue;
            }
            v.replicas.retain(|r| !in_domain.contains(&r.node));
            v.parked.extend(parked);
            // A coordinator inside the domain is fenced: the volume is detached at a new
            // generation, which every replica outside the domain enforces.
            if v.attached_node.is_some_and(|n| in_domain.contains(&n)) {
                v.attached_node = None;
                v.generation += 1;
                v.lease_wait = true;
            }
        }
        if self.alerts.len() > MAX_ALERTS {
            let drop = self.alerts.len() - MAX_ALERTS;
            self.alerts.drain(..drop);
        }
        self.inactive_domains.insert(domain.to_string());
        Ok(ApplyOutput::None)
    }

    /// Volumes a deactivated `domain` left unavailable: replicas still in the domain that
    /// were not parked (they had no in-sync copy outside it when it was deactivated).
    pub fn unavailable_in(&self, domain: &str) -> Vec<String> {
        if !self.inactive_domains.contains(domain) {
            return Vec::new();
        }
        self.volumes
            .values()
            .filter(|v| v.replicas.iter().any(|r| self.in_domain(r.node, domain)))
            .map(|v| v.name.clone())
            .collect()
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
                if v.generation != *generation {
                    return Err(ApplyError::Fenced {
                        name: name.clone(),
                        current: v.generation,
                        stale: *generation,
                    });
                }
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
                if v.generation != *generation {
                    return Err(ApplyError::Fenced {
                        name: name.clone(),
                        current: v.generation,
                        stale: *generation,
                    });
                }
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
                if v.generation != *generation {
                    return Err(ApplyError::Fenced {
                        name: name.clone(),
                        current: v.generation,
                        stale: *generation,
                    });
                }
                if !replicas.iter().any(|r| r.state == ReplicaState::InSync) {
                    return Err(ApplyError::FailedPrecondition(format!(
                        "volume '{name}' must keep at least one in-sync replica"
                    )));
                }
                v.replicas = replicas.clone();
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
                if v.generation != *generation {
                    return Err(ApplyError::Fenced {
                        name: name.clone(),
                        current: v.generation,
                        stale: *generation,
                    });
                }
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
                if v.generation != *generation {
                    return Err(ApplyError::Fenced {
                        name: name.clone(),
                        current: v.generation,
                        stale: *generation,
                    });
                }
                for r in remove {
                    v.hot_regions.remove(r);
                }
                v.hot_regions.extend(add.iter().copied());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            id: 0,
            name: name.into(),
            admin_addr: "127.0.0.1:1".into(),
            data_addr: "127.0.0.1:2".into(),
            domain: "d".into(),
            zone: "z".into(),
            rack: "r".into(),
            role: NodeRole::Voter,
            pool_size_bytes: 1 << 30,
            joined_unix_seconds: 0,
            instance: String::new(),
        }
    }

    fn volume(name: &str, nodes: &[u64]) -> VolumeRecord {
        VolumeRecord {
            id: "0000000100000001".into(),
            name: name.into(),
            size_bytes: 1 << 20,
            repl: nodes.len() as u32,
            io_priority: IoPriority::Medium,
            labels: BTreeMap::new(),
            created_unix_seconds: 0,
            generation: 0,
            attached_node: None,
            replicas: nodes
                .iter()
                .map(|&n| ReplicaRecord {
                    node: n,
                    state: ReplicaState::InSync,
                    generation: 0,
                    resync_done_bytes: 0,
                    resync_total_bytes: 0,
                })
                .collect(),
            hot_regions: BTreeSet::new(),
            parked: Vec::new(),
            lease_wait: false,
            async_domains: Default::default(),
        }
    }

    #[test]
    fn join_is_idempotent_by_name_and_ids_are_never_reused() {
        let mut s = ClusterState::new("c");
        let a = s.apply(&Command::AddNode { node: node("a") }).unwrap();
        let b = s.apply(&Command::AddNode { node: node("b") }).unwrap();
        assert_eq!(a, ApplyOutput::NodeId(1));
        assert_eq!(b, ApplyOutput::NodeId(2));
        assert_eq!(s.apply(&Command::AddNode { node: node("a") }).unwrap(), a);
        s.apply(&Command::RemoveNode { id: 2 }).unwrap();
        assert!(s.removed_nodes.contains(&2), "raft drops it next");
        assert_eq!(
            s.apply(&Command::AddNode { node: node("c") }).unwrap(),
            ApplyOutput::NodeId(3)
        );
    }

    /// F5 (raft part): a node that lost its state joins again with another incarnation. It
    /// must not get the old raft id back (its log and its vote are gone) until the old
    /// member is removed; then it joins under a new id.
    #[test]
    fn a_wiped_node_cannot_take_back_its_old_id_until_removed() {
        let mut s = ClusterState::new("c");
        let mut first = node("a");
        first.instance = "i1".into();
        assert_eq!(
            s.apply(&Command::AddNode {
                node: first.clone()
            })
            .unwrap(),
            ApplyOutput::NodeId(1)
        );
        // The same join retried: the same id.
        assert_eq!(
            s.apply(&Command::AddNode { node: first }).unwrap(),
            ApplyOutput::NodeId(1)
        );
        let mut wiped = node("a");
        wiped.instance = "i2".into();
        let err = s
            .apply(&Command::AddNode {
                node: wiped.clone(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("cluster remove a"), "{err}");
        // A node holding a replica cannot be removed; the error names the volume.
        s.apply(&Command::CreateVolume {
            volume: Box::new(volume("v", &[1])),
        })
        .unwrap();
        let err = s.apply(&Command::RemoveNode { id: 1 }).unwrap_err();
        assert!(err.to_string().contains("volume(s) v"), "{err}");
        s.apply(&Command::DeleteVolume { name: "v".into() })
            .unwrap();
        s.apply(&Command::RemoveNode { id: 1 }).unwrap();
        assert_eq!(
            s.apply(&Command::AddNode { node: wiped }).unwrap(),
            ApplyOutput::NodeId(2),
            "a new id, never the old one"
        );
    }

    /// A zombie coordinator (old generation) must not be able to change replica states.
    #[test]
    fn stale_generation_is_fenced_and_attach_moves_only_with_takeover() {
        let mut s = ClusterState::new("c");
        for n in ["a", "b", "c"] {
            s.apply(&Command::AddNode { node: node(n) }).unwrap();
        }
        s.apply(&Command::CreateVolume {
            volume: Box::new(volume("v", &[1, 2, 3])),
        })
        .unwrap();
        let g1 = s
            .apply(&Command::Attach {
                name: "v".into(),
                node: 1,
                takeover: false,
            })
            .unwrap();
        assert_eq!(g1, ApplyOutput::Generation(1));
        assert!(matches!(
            s.apply(&Command::Attach {
                name: "v".into(),
                node: 2,
                takeover: false
            }),
            Err(ApplyError::FailedPrecondition(_))
        ));
        let g2 = s
            .apply(&Command::Attach {
                name: "v".into(),
                node: 2,
                takeover: true,
            })
            .unwrap();
        assert_eq!(g2, ApplyOutput::Generation(2));
        let stale = s.apply(&Command::SetReplicaState {
            name: "v".into(),
            node: 3,
            state: ReplicaState::OutOfSync,
            generation: 1,
        });
        assert!(matches!(
            stale,
            Err(ApplyError::Fenced {
                current: 2,
                stale: 1,
                ..
            })
        ));
        s.apply(&Command::SetReplicaState {
            name: "v".into(),
            node: 3,
            state: ReplicaState::OutOfSync,
            generation: 2,
        })
        .unwrap();
        s.apply(&Command::SetReplicaState {
            name: "v".into(),
            node: 2,
            state: ReplicaState::OutOfSync,
            generation: 2,
        })
        .unwrap();
        // The last in-sync replica cannot be ejected.
        assert!(matches!(
            s.apply(&Command::SetReplicaState {
                name: "v".into(),
                node: 1,
                state: ReplicaState::OutOfSync,
                generation: 2,
            }),
            Err(ApplyError::FailedPrecondition(_))
        ));
    }

    /// Async follows the generation fence, never counts as in sync, is entered only from
    /// in-sync, and the last in-sync replica cannot turn async.
    #[test]
    fn async_is_fenced_not_in_sync_and_only_from_in_sync() {
        let mut s = ClusterState::new("c");
        for n in ["a", "b", "c"] {
            s.apply(&Command::AddNode { node: node(n) }).unwrap();
        }
        s.apply(&Command::CreateVolume {
            volume: Box::new(volume("v", &[1, 2, 3])),
        })
        .unwrap();
        s.apply(&Command::Attach {
            name: "v".into(),
            node: 1,
            takeover: false,
        })
        .unwrap();
        let set = |s: &mut ClusterState, node, state, generation| {
            s.apply(&Command::SetReplicaState {
                name: "v".into(),
                node,
                state,
                generation,
            })
        };
        assert!(matches!(
            set(&mut s, 3, ReplicaState::Async, 0),
            Err(ApplyError::Fenced { .. })
        ));
        set(&mut s, 3, ReplicaState::Async, 1).unwrap();
        assert_eq!(ReplicaState::Async.to_string(), "async");
        assert_eq!(
            serde_json::to_string(&ReplicaState::Async).unwrap(),
            "\"async\""
        );
        assert_eq!(s.volumes["v"].in_sync_nodes(), vec![1, 2]);
        set(&mut s, 2, ReplicaState::OutOfSync, 1).unwrap();
        assert!(matches!(
            set(&mut s, 2, ReplicaState::Async, 1),
            Err(ApplyError::FailedPrecondition(_))
        ));
        assert!(matches!(
            set(&mut s, 1, ReplicaState::Async, 1),
            Err(ApplyError::FailedPrecondition(_))
        ));
        set(&mut s, 3, ReplicaState::Resyncing, 1).unwrap();
        set(&mut s, 3, ReplicaState::InSync, 1).unwrap();
        // The last in-sync replica cannot turn async.
        set(&mut s, 1, ReplicaState::Async, 1).unwrap();
        set(&mut s, 3, ReplicaState::Async, 1).unwrap_err();
    }

    /// Losing the domain of a volume's only in-sync replica: refused unless its async
    /// replica elsewhere is promoted (which swaps the async domain and raises an alert).
    #[test]
    fn deactivation_promotes_async_replicas_only_when_asked() {
        let mut s = ClusterState::new("c");
        for (n, d) in [("a", "east"), ("b", "west")] {
            let mut rec = node(n);
            rec.domain = d.into();
            s.apply(&Command::AddNode { node: rec }).unwrap();
        }
        let mut v = volume("v", &[1, 2]);
        v.async_domains.insert("west".into());
        s.apply(&Command::CreateVolume {
            volume: Box::new(v),
        })
        .unwrap();
        assert!(s.async_pinned(&s.volumes["v"], 2));
        assert!(!s.async_pinned(&s.volumes["v"], 1));
        s.apply(&Command::Attach {
            name: "v".into(),
            node: 1,
            takeover: false,
        })
        .unwrap();
        s.apply(&Command::SetReplicaState {
            name: "v".into(),
            node: 2,
            state: ReplicaState::Async,
            generation: 1,
        })
        .unwrap();
        let deactivate = |s: &mut ClusterState, promote_async| {
            s.apply(&Command::SetDomainActive {
                domain: "east".into(),
                active: false,
                promote_async,
                unix_seconds: 7,
            })
        };
        match deactivate(&mut s, false) {
            Err(ApplyError::FailedPrecondition(m)) => assert!(m.contains("--promote-async"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(s.inactive_domains.is_empty(), "nothing changed");
        deactivate(&mut s, true).unwrap();
        let v = &s.volumes["v"];
        assert_eq!(v.in_sync_nodes(), vec![2]);
        assert_eq!(v.parked, vec![1]);
        assert_eq!(v.attached_node, None, "the east coordinator is fenced");
        assert_eq!(v.generation, 2);
        assert_eq!(
            v.async_domains.iter().collect::<Vec<_>>(),
            vec!["east"],
            "roles swap"
        );
        let alert = s.alerts.last().unwrap();
        assert_eq!(alert.kind, "async-promoted");
        assert_eq!(alert.unix_seconds, 7);
    }

    /// A volume that lives only in the lost domain does not hold up the failover of the
    /// others: it stays as it is, unavailable, and is named by an alert.
    #[test]
    fn deactivation_fails_over_every_volume_with_a_copy_outside_and_keeps_the_others() {
        let mut s = ClusterState::new("c");
        for (name, domain) in [("a1", "east"), ("a2", "east"), ("b1", "west")] {
            let mut n = node(name);
            n.domain = domain.into();
            s.apply(&Command::AddNode { node: n }).unwrap();
        }
        let ids: BTreeMap<String, u64> = s.nodes.values().map(|n| (n.name.clone(), n.id)).collect();
        s.apply(&Command::CreateVolume {
            volume: Box::new(volume("metro", &[ids["a1"], ids["b1"]])),
        })
        .unwrap();
        s.apply(&Command::CreateVolume {
            volume: Box::new(volume("local", &[ids["a1"], ids["a2"]])),
        })
        .unwrap();
        s.apply(&Command::SetDomainActive {
            domain: "east".into(),
            active: false,
            promote_async: false,
            unix_seconds: 9,
        })
        .expect("the failover goes on");
        assert_eq!(s.volumes["metro"].in_sync_nodes(), vec![ids["b1"]]);
        assert_eq!(s.volumes["metro"].parked, vec![ids["a1"]]);
        let local = &s.volumes["local"];
        assert_eq!(local.replicas.len(), 2, "kept as it was");
        assert!(local.parked.is_empty());
        assert_eq!(s.unavailable_in("east"), vec!["local".to_string()]);
        let alert = s
            .alerts
            .iter()
            .find(|a| a.kind == "volume-unavailable")
            .unwrap();
        assert_eq!(alert.resource, "volume/local");
        assert_eq!(alert.severity, "critical");
        // It comes back with its domain.
        s.apply(&Command::SetDomainActive {
            domain: "east".into(),
            active: true,
            promote_async: false,
            unix_seconds: 10,
        })
        .unwrap();
        assert!(s.unavailable_in("east").is_empty());
        assert_eq!(s.volumes["local"].in_sync_nodes().len(), 2);
    }
}
