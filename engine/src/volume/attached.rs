//! [`AttachedVolume`]: a volume attached on this node, the handle frontends send I/O to,
//! and its backend (the local store for RF 1, the replication coordinator otherwise).

use super::*;

/// Where an attached volume's I/O goes.
pub(super) enum Backend {
    /// RF 1 with the replica on this node: straight to the store (no replication, so no
    /// coordinator activity log and no fan-out cost), within a fenced session of the
    /// node's replica server, so a takeover elsewhere (`attach --force`) stops it at once.
    Local(Arc<Replica>, LocalSession),
    /// Replicas on other nodes: the replication coordinator.
    Replicated(Arc<Coordinator>),
    /// A read-only export of snapshot `.1` (its id) from this node's replica, `.2` bytes:
    /// a snapshot is immutable and byte-identical on every node that holds it.
    Snapshot(Arc<Replica>, String, u64),
}

/// A volume attached on this node: the coordinator that frontends send I/O to.
pub struct AttachedVolume {
    /// This node.
    pub(super) node: u64,
    pub(super) name: String,
    pub(super) id: String,
    /// The raft node whose majority contact is this coordinator's lease (replicated
    /// volumes only; an RF 1 volume has no other copy to go stale against).
    pub(super) lease: Option<Arc<crate::cluster::RaftNode>>,
    pub(super) generation: std::sync::atomic::AtomicU64,
    /// The volume's I/O priority class ([`crate::sched::class_index`]); the reconciler
    /// keeps it in line with the metadata.
    pub(super) class: std::sync::atomic::AtomicU8,
    /// The node's frontend class gate: each I/O holds a slot from admission to reply.
    pub(super) sched: Arc<crate::sched::IoScheduler>,
    /// `Some` while open. I/O holds a read guard; detach and backend changes (an RF change
    /// re-opens the coordinator) take the write guard, which waits for in-flight requests.
    pub(super) gate: tokio::sync::RwLock<Option<Open>>,
}

pub(super) struct Open {
    pub(super) record: VolumeRecord,
    pub(super) backend: Backend,
}

impl Backend {
    pub(super) async fn close(&self) -> Result<()> {
        match self {
            Backend::Local(r, _) => r.close().await?,
            Backend::Replicated(c) => c.close().await?,
            Backend::Snapshot(..) => {}
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

    /// The volume's I/O priority class.
    pub fn io_priority(&self) -> crate::meta::IoPriority {
        crate::sched::class_of(self.class.load(std::sync::atomic::Ordering::Relaxed) as usize)
    }

    pub(super) fn set_io_priority(&self, p: crate::meta::IoPriority) {
        self.class.store(
            crate::sched::class_index(p) as u8,
            std::sync::atomic::Ordering::Relaxed,
        );
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
            Some(Open {
                backend: Backend::Snapshot(_, _, size),
                ..
            }) => *size,
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
            Some(Open {
                backend: Backend::Snapshot(r, ..),
                ..
            }) => r.checksum_errors(),
            None => 0,
        }
    }

    /// The local session's refusal: a coordinator elsewhere took the volume over.
    pub(super) fn fenced<T>(&self, r: std::result::Result<T, i32>) -> Result<T> {
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

    /// A snapshot export (`volume@snapshot`): read-only.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self.gate.try_read().ok().as_deref(),
            Some(Some(Open {
                backend: Backend::Snapshot(..),
                ..
            }))
        )
    }

    pub(super) fn read_only(&self) -> VolumeError {
        VolumeError::ReadOnly(self.name.clone())
    }

    pub(super) fn detached(&self) -> VolumeError {
        VolumeError::NotAttached(self.name.clone())
    }

    /// Waits (bounded) until this node is in contact with a raft majority.
    pub(super) async fn check_lease(&self) -> Result<()> {
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
        let _slot = self.sched.admit(self.io_priority()).await;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => Ok(self.fenced(s.run(r.read(offset, len)).await)??),
            Some(Backend::Replicated(c)) => Ok(c.read(offset, len).await?),
            Some(Backend::Snapshot(r, id, _)) => Ok(r.read_snapshot(id, offset, len).await?),
        }
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        self.check_lease().await?;
        let _slot = self.sched.admit(self.io_priority()).await;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => {
                Ok(self.fenced(s.run(r.write(offset, data, fua)).await)??)
            }
            Some(Backend::Replicated(c)) => Ok(c.write(offset, data, fua).await?),
            Some(Backend::Snapshot(..)) => Err(self.read_only()),
        }
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_lease().await?;
        let _slot = self.sched.admit(self.io_priority()).await;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => {
                Ok(self.fenced(s.run(r.write_zeroes(offset, len, fua)).await)??)
            }
            Some(Backend::Replicated(c)) => Ok(c.write_zeroes(offset, len, fua).await?),
            Some(Backend::Snapshot(..)) => Err(self.read_only()),
        }
    }

    pub async fn flush(&self) -> Result<()> {
        self.check_lease().await?;
        let _slot = self.sched.admit(self.io_priority()).await;
        let g = self.gate.read().await;
        match g.as_ref().map(|o| &o.backend) {
            None => Err(self.detached()),
            Some(Backend::Local(r, s)) => Ok(self.fenced(s.run(r.flush()).await)??),
            Some(Backend::Replicated(c)) => Ok(c.flush().await?),
            // Nothing to make durable: a snapshot's layer was made durable when sealed.
            Some(Backend::Snapshot(..)) => Ok(()),
        }
    }

    /// Closes the gate, waits for in-flight I/O and makes everything durable.
    pub(super) async fn close(&self) -> Result<()> {
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
            Some(Open {
                backend: Backend::Snapshot(..),
                ..
            }) => Err(self.read_only()),
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
