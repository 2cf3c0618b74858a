//! The cluster as the rest of the node sees it: propose a command from any node and get
//! its outcome once it is applied locally.
//!
//! A proposal made on a follower is forwarded to the leader (through a [`Forwarder`], the
//! node's authenticated gRPC), and the caller then waits until its own node has applied
//! the same index, so it reads its own writes. Proposals are retried only when they were
//! certainly not delivered (no leader, connection refused), or when applying them twice
//! is harmless ([`Proposal::is_idempotent`]: a domain deactivation right after the
//! leader's site died); any other outcome that is unknown (a timeout after sending) is
//! reported as such, never retried blindly.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::raft_node::{RaftError, RaftNode, RaftStatus};
use super::state::{ApplyError, ApplyOutput, ClusterState, Command};

/// How long a proposal may search for a leader before giving up: longer than an election
/// (3 to 6 s, see `raft_node`), so a leader change is ridden out.
pub const PROPOSE_DEADLINE: Duration = Duration::from_secs(20);
/// How long to wait for the local node to apply a forwarded proposal's index.
pub const APPLY_WAIT: Duration = Duration::from_secs(10);

/// What travels to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Proposal {
    Command(Command),
    AddMember { id: u64, voter: bool },
    RemoveMember { id: u64 },
}

impl Proposal {
    /// Applying it twice is the same as once, so a proposal whose outcome is unknown
    /// (the leader died with it in flight) may be sent again to the next leader.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Proposal::Command(
                Command::SetDomainActive { .. }
                    | Command::UpdateNodeAddrs { .. }
                    | Command::AddNode { .. }
            )
        )
    }
}

/// A forwarding failure.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The proposal certainly did not reach a leader (refused connection, not the leader).
    #[error("not delivered: {0}")]
    NotDelivered(String),
    /// It may or may not have been committed.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// Sends a proposal to another node's admin endpoint.
#[async_trait::async_trait]
pub trait Forwarder: Send + Sync + 'static {
    async fn forward(
        &self,
        admin_addr: &str,
        proposal: &Proposal,
    ) -> Result<(Result<ApplyOutput, ApplyError>, u64), ForwardError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("cluster metadata unavailable: {0}")]
    Unavailable(String),
}

pub struct ClusterHandle {
    raft: Arc<RaftNode>,
    forwarder: Arc<dyn Forwarder>,
    node_id: u64,
    /// Admin addresses learned at join time, used until the state machine has them.
    seed_peers: RwLock<HashMap<u64, String>>,
}

impl ClusterHandle {
    pub fn new(raft: Arc<RaftNode>, forwarder: Arc<dyn Forwarder>) -> Arc<ClusterHandle> {
        Arc::new(ClusterHandle {
            node_id: raft.id(),
            raft,
            forwarder,
            seed_peers: RwLock::new(HashMap::new()),
        })
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn raft(&self) -> &Arc<RaftNode> {
        &self.raft
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.raft.state()
    }

    pub fn status(&self) -> RaftStatus {
        self.raft.status()
    }

    pub fn set_seed_peers(&self, peers: HashMap<u64, String>) {
        *self.seed_peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// Admin address of a member, from the state machine or the join-time seeds.
    pub fn admin_addr(&self, id: u64) -> Option<String> {
        if let Some(n) = self.state().nodes.get(&id) {
            if !n.admin_addr.is_empty() {
                return Some(n.admin_addr.clone());
            }
        }
        self.seed_peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Proposes a command and returns its outcome once applied on this node.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyOutput, ClusterError> {
        self.submit(Proposal::Command(cmd)).await
    }

    /// Adds a raft member (voter or learner).
    pub async fn add_member(&self, id: u64, voter: bool) -> Result<(), ClusterError> {
        self.submit(Proposal::AddMember { id, voter })
            .await
            .map(|_| ())
    }

    /// On the leader: proposes the next raft configuration change that the node table and
    /// the voter placement call for ([`super::membership::next_conf_change`]). Returns the
    /// change made, if any. A follower does nothing (its leader converges).
    pub async fn converge_membership(
        &self,
    ) -> Result<Option<super::membership::ConfChangeDue>, ClusterError> {
        let status = self.status();
        if status.role != "leader" {
            return Ok(None);
        }
        let state = self.state();
        if let Some(id) = super::membership::next_removal(
            &state.removed_nodes,
            &status.voters,
            &status.learners,
            status.id,
        ) {
            tracing::info!(
                node = id,
                "raft membership behind the node table: removing a removed node"
            );
            self.submit(Proposal::RemoveMember { id }).await?;
            return Ok(None);
        }
        let Some(due) = super::membership::next_conf_change(
            &state.nodes,
            &status.voters,
            &status.learners,
            &status.active,
            status.id,
        ) else {
            return Ok(None);
        };
        let what = if due.voter {
            "promoting to voter"
        } else if status.voters.contains(&due.node) {
            "demoting to learner (voters placed by topology)"
        } else {
            "adding as learner"
        };
        tracing::info!(
            node = due.node,
            "raft membership behind the node table: {what}"
        );
        self.add_member(due.node, due.voter).await?;
        Ok(Some(due))
    }

    /// Runs a proposal on this node, which must be the leader (the forwarding target).
    pub async fn propose_local(
        &self,
        p: &Proposal,
    ) -> Result<(Result<ApplyOutput, ApplyError>, u64), RaftError> {
        let res = match p {
            Proposal::Command(cmd) => self.raft.propose(cmd.clone()).await,
            Proposal::AddMember { id, voter } => self
                .raft
                .add_member(*id, *voter)
                .await
                .map(|idx| (ApplyOutput::None, idx)),
            Proposal::RemoveMember { id } => self
                .raft
                .remove_member(*id)
                .await
                .map(|idx| (ApplyOutput::None, idx)),
        };
        match res {
            Ok((out, idx)) => Ok((Ok(out), idx)),
            Err(RaftError::Apply(e)) => Ok((Err(e), self.raft.applied())),
            Err(e) => Err(e),
        }
    }

    async fn submit(&self, p: Proposal) -> Result<ApplyOutput, ClusterError> {
        let deadline = Instant::now() + PROPOSE_DEADLINE;
        let mut last = String::from("no raft leader known");
        loop {
            let leader = self.raft.status().leader_id;
            if leader == self.node_id {
                match self.propose_local(&p).await {
                    Ok((res, _)) => return res.map_err(ClusterError::Apply),
                    Err(RaftError::NotLeader { .. }) => last = "leadership changed".into(),
                    Err(e) => return Err(ClusterError::Unavailable(e.to_string())),
                }
            } else if leader != 0 {
                match self.admin_addr(leader) {
                    None => last = format!("address of leader {leader} unknown"),
                    Some(addr) => match self.forwarder.forward(&addr, &p).await {
                        Ok((res, idx)) => {
                            self.raft
                                .wait_applied(idx, APPLY_WAIT)
                                .await
                                .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
                            return res.map_err(ClusterError::Apply);
                        }
                        Err(ForwardError::NotDelivered(e)) => last = e,
                        // The leader may have died with it (a site loss): an idempotent
                        // change waits for the next leader instead of failing at once.
                        Err(ForwardError::Unknown(e)) if p.is_idempotent() => {
                            last = format!("leader {leader} at {addr}: {e}");
                        }
                        Err(ForwardError::Unknown(e)) => {
                            return Err(ClusterError::Unavailable(format!(
                                "leader {leader} at {addr}: {e}"
                            )))
                        }
                    },
                }
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Unavailable(format!(
                    "no raft leader accepted the change within {PROPOSE_DEADLINE:?} ({last}); the cluster may have lost its majority"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[async_trait::async_trait]
impl crate::replication::MetaProposer for ClusterHandle {
    async fn propose(&self, cmd: Command) -> Result<ApplyOutput, crate::replication::ProposeError> {
        ClusterHandle::propose(self, cmd)
            .await
            .map_err(|e| match e {
                ClusterError::Apply(a) => crate::replication::ProposeError::Apply(a),
                ClusterError::Unavailable(m) => crate::replication::ProposeError::Unavailable(m),
            })
    }

    fn state(&self) -> Arc<ClusterState> {
        ClusterHandle::state(self)
    }
}
