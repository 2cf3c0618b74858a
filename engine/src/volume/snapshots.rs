//! Snapshots: the volume manager's side of the cut (issue 12, second step).
//!
//! A snapshot is taken on the node where the volume is attached, in three committed steps:
//! 1. `CreateSnapshot` (pending) names it and assigns its id;
//! 2. the cut: the attachment's gate is taken for writing (in-flight I/O drains, new I/O
//!    waits: the pause), and every in-sync replica seals its head as the snapshot's layer
//!    ([`crate::replication::Coordinator::cut_snapshot`], or the local store for RF 1);
//! 3. `SnapshotReady` records the nodes that hold it.
//!
//! A failure in step 2 leaves no layer (the coordinator drops the ones made) and the
//! record is deleted; a failure after it deletes the record, and every node's reconciler
//! drops layers the metadata no longer names. A coordinator that dies between the steps
//! leaves a pending record, which the next attach deletes. Deleting a snapshot is one
//! committed `DeleteSnapshot`; the reconcilers do the rest, attached or not.

use std::collections::BTreeMap;
use std::time::Instant;

use super::attached::{Backend, Open};
use super::*;
use crate::cluster::{SnapshotRecord, SnapshotState};

/// A snapshot as a node reports it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub volume: String,
    pub record: SnapshotRecord,
    /// Bytes its own layer holds on this node's replica (what it changed since the
    /// snapshot before), when this node holds it.
    pub local_bytes: Option<u64>,
    /// How long the cut held the volume's I/O (only for the call that took it).
    pub pause: Option<Duration>,
}

impl AttachedVolume {
    /// The cut (module docs, step 2). Returns the nodes that sealed, and the pause.
    pub(super) async fn cut_snapshot(&self, id: &str) -> Result<(Vec<u64>, Duration)> {
        // Flush first, outside the pause: the seal's checkpoint then syncs only what was
        // written since, not every dirty page of the volume.
        self.flush().await?;
        let started = Instant::now();
        let g = self.gate.write().await;
        let Some(Open { backend, .. }) = g.as_ref() else {
            return Err(self.detached());
        };
        let nodes = match backend {
            Backend::Local(r, _) => {
                r.seal(id).await?;
                vec![self.node]
            }
            Backend::Replicated(c) => c.cut_snapshot(id.to_string()).await?,
            Backend::Snapshot(..) => return Err(self.read_only()),
        };
        Ok((nodes, started.elapsed()))
    }
}

impl VolumeManager {
    /// What an NBD client asked for by name: an attached volume, or `volume@snapshot` (name
    /// or id), a read-only export of a ready snapshot from this node's replica.
    pub async fn export(&self, name: &str) -> Result<Arc<AttachedVolume>> {
        let Some((volume, snapshot)) = name.split_once('@') else {
            return self.attached(name);
        };
        let rec = self.record(volume)?;
        let s = rec
            .snapshot(snapshot)
            .filter(|s| s.state == SnapshotState::Ready)
            .cloned()
            .ok_or_else(|| VolumeError::SnapshotNotFound {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            })?;
        let replica = self.replicas.lock().await.get(&rec.id).cloned();
        let held = match &replica {
            Some(r) => r.snapshots().await.iter().any(|l| l.snapshot == s.id),
            None => false,
        };
        let (Some(replica), true) = (replica, held) else {
            let state = self.cluster.state();
            let nodes: Vec<String> = s.nodes.iter().map(|n| self.node_name(&state, *n)).collect();
            return Err(VolumeError::FailedPrecondition(format!(
                "this node holds no copy of snapshot '{}' of '{volume}'; it is on {}",
                s.name,
                nodes.join(", ")
            )));
        };
        Ok(Arc::new(AttachedVolume {
            node: self.node_id,
            name: name.to_string(),
            id: rec.id.clone(),
            lease: None,
            generation: std::sync::atomic::AtomicU64::new(rec.generation),
            class: std::sync::atomic::AtomicU8::new(
                crate::sched::class_index(rec.io_priority) as u8
            ),
            sched: self.sched.clone(),
            gate: tokio::sync::RwLock::new(Some(Open {
                record: rec,
                backend: Backend::Snapshot(replica, s.id.clone(), s.size_bytes),
            })),
        }))
    }

    fn snapshot_info(
        &self,
        volume: &str,
        record: SnapshotRecord,
        layers: &[crate::store::SnapshotLayer],
    ) -> SnapshotInfo {
        let local_bytes = layers
            .iter()
            .find(|l| l.snapshot == record.id)
            .map(|l| l.allocated_bytes);
        SnapshotInfo {
            volume: volume.to_string(),
            record,
            local_bytes,
            pause: None,
        }
    }

    async fn local_layers(&self, v: &VolumeRecord) -> Vec<crate::store::SnapshotLayer> {
        let replica = self.replicas.lock().await.get(&v.id).cloned();
        match replica {
            Some(r) => r.snapshots().await,
            None => Vec::new(),
        }
    }

    /// Takes snapshot `name` of `volume`, which must be attached on this node. Taking one
    /// that exists and is ready returns it (idempotent by name).
    pub async fn create_snapshot(
        &self,
        volume: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotInfo> {
        validate_name(name).map_err(|_| {
            VolumeError::InvalidArgument(format!(
                "invalid snapshot name '{name}': use 1 to {MAX_NAME_LEN} characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
            ))
        })?;
        let rec = self.record(volume)?;
        if let Some(s) = rec.snapshots.iter().find(|s| s.name == name) {
            return match s.state {
                SnapshotState::Ready => {
                    let layers = self.local_layers(&rec).await;
                    Ok(self.snapshot_info(volume, s.clone(), &layers))
                }
                SnapshotState::Pending => Err(VolumeError::Unavailable(format!(
                    "snapshot '{name}' of '{volume}' is being taken; retry in a moment"
                ))),
            };
        }
        let vol = match self.attached(volume) {
            Ok(v) => v,
            Err(_) => {
                if let Some(n) = rec.attached_node {
                    return Err(VolumeError::FailedPrecondition(format!(
                        "volume '{volume}' is attached on node {}; take the snapshot there",
                        self.node_name(&self.cluster.state(), n)
                    )));
                }
                // Detached: attach it here for the cut and detach it again, under `ops`,
                // so no attach or detach on this node runs in between.
                let _op = self.ops.lock().await;
                let vol = self.attach_locked(volume, false).await?;
                let taken = self.take_snapshot(&vol, &rec, name, labels).await;
                if let Err(e) = self.detach_locked(volume).await {
                    tracing::warn!(volume, error = %e, "detaching after a snapshot of a detached volume failed; detach it by hand");
                }
                return taken;
            }
        };
        self.take_snapshot(&vol, &rec, name, labels).await
    }

    /// The three steps (module docs) on an attachment of this node.
    async fn take_snapshot(
        &self,
        vol: &AttachedVolume,
        rec: &VolumeRecord,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotInfo> {
        let volume = rec.name.as_str();
        vol.check_lease().await?;
        let generation = vol.generation();
        let snapshot = SnapshotRecord {
            id: String::new(),
            name: name.to_string(),
            created_unix_seconds: now_unix(),
            size_bytes: rec.size_bytes,
            labels,
            state: SnapshotState::Pending,
            generation,
            nodes: Vec::new(),
        };
        let id = match self
            .cluster
            .propose(Command::CreateSnapshot {
                name: volume.to_string(),
                generation,
                snapshot,
            })
            .await
        {
            Ok(ApplyOutput::Id(id)) => id,
            Ok(other) => {
                return Err(VolumeError::Unavailable(format!(
                    "unexpected answer to a snapshot proposal: {other:?}"
                )))
            }
            Err(ClusterError::Apply(ApplyError::SnapshotExists { volume, name })) => {
                return Err(VolumeError::SnapshotExists { volume, name })
            }
            Err(e) => return Err(e.into()),
        };
        let cut = vol.cut_snapshot(&id).await;
        let (nodes, pause) = match cut {
            Ok(c) => c,
            Err(e) => {
                self.drop_snapshot_record(volume, &id).await;
                return Err(e);
            }
        };
        if let Err(e) = self
            .cluster
            .propose(Command::SnapshotReady {
                name: volume.to_string(),
                generation,
                id: id.clone(),
                nodes: nodes.clone(),
            })
            .await
        {
            self.drop_snapshot_record(volume, &id).await;
            return Err(e.into());
        }
        tracing::info!(volume, snapshot = name, %id, ?nodes, pause_us = pause.as_micros() as u64, "snapshot taken");
        let rec = self.record(volume)?;
        let s = rec
            .snapshots
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| VolumeError::SnapshotNotFound {
                volume: volume.to_string(),
                snapshot: name.to_string(),
            })?;
        let layers = self.local_layers(&rec).await;
        let mut info = self.snapshot_info(volume, s, &layers);
        info.pause = Some(pause);
        Ok(info)
    }

    /// Best effort: a record left behind is pending, and the next attach deletes it.
    async fn drop_snapshot_record(&self, volume: &str, id: &str) {
        if let Err(e) = self
            .cluster
            .propose(Command::DeleteSnapshot {
                name: volume.to_string(),
                id: id.to_string(),
            })
            .await
        {
            tracing::warn!(volume, snapshot = id, error = %e, "could not delete a failed snapshot's record; the next attach does");
        }
    }

    /// The snapshots of `volume`, oldest first.
    pub async fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        let rec = self.record(volume)?;
        let layers = self.local_layers(&rec).await;
        Ok(rec
            .snapshots
            .iter()
            .map(|s| self.snapshot_info(volume, s.clone(), &layers))
            .collect())
    }

    /// One snapshot of `volume`, by name or id.
    pub async fn inspect_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        let rec = self.record(volume)?;
        let s = find_snapshot(&rec, snapshot)?;
        let layers = self.local_layers(&rec).await;
        Ok(self.snapshot_info(volume, s, &layers))
    }

    /// Deletes snapshot `snapshot` (name or id) of `volume`: its record goes now, every
    /// replica's layer when that node's reconciler sees it gone (a merge, in the background).
    pub async fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotRecord> {
        let rec = self.record(volume)?;
        let s = find_snapshot(&rec, snapshot)?;
        self.cluster
            .propose(Command::DeleteSnapshot {
                name: volume.to_string(),
                id: s.id.clone(),
            })
            .await?;
        self.reconcile_snapshots().await;
        Ok(s)
    }

    /// Pending snapshots of `volume` taken at an older generation: their coordinator is gone
    /// and their cut may be half made. Called after an attach.
    pub(super) async fn drop_stale_pending(&self, volume: &str, generation: u64) {
        let Ok(rec) = self.record(volume) else { return };
        for s in rec
            .snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Pending && s.generation < generation)
        {
            tracing::warn!(volume, snapshot = %s.name, id = %s.id, "a snapshot was left half taken by an earlier coordinator; deleting it");
            self.drop_snapshot_record(volume, &s.id).await;
        }
    }

    /// Drops the local layers of snapshots the metadata no longer names (deleted, or cut
    /// and then abandoned). A layer is only ever sealed once its pending record has been
    /// applied here (the replica server waits for it), so a layer the applied metadata
    /// does not name is one whose record was removed.
    pub async fn reconcile_snapshots(&self) {
        let state = self.cluster.state();
        let replicas: Vec<(String, Arc<Replica>)> = self
            .replicas
            .lock()
            .await
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        for (id, r) in replicas {
            let Some(v) = state.volumes.values().find(|v| v.id == id) else {
                continue;
            };
            for layer in r.snapshots().await {
                if v.snapshots.iter().any(|s| s.id == layer.snapshot) {
                    continue;
                }
                match r.delete_snapshot(&layer.snapshot).await {
                    Ok(_) => {
                        tracing::info!(volume = %v.name, snapshot = %layer.snapshot, "snapshot layer dropped")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.name, snapshot = %layer.snapshot, error = %e, "dropping a snapshot layer failed; retried at the next reconcile")
                    }
                }
            }
            if let Err(e) = r.compact().await {
                tracing::warn!(volume = %v.name, error = %e, "merging deleted snapshot layers failed; retried at the next reconcile");
            }
        }
    }
}

/// Snapshot `snapshot` (name or id) of the volume `rec`.
fn find_snapshot(rec: &VolumeRecord, snapshot: &str) -> Result<SnapshotRecord> {
    rec.snapshot(snapshot)
        .cloned()
        .ok_or_else(|| VolumeError::SnapshotNotFound {
            volume: rec.name.clone(),
            snapshot: snapshot.to_string(),
        })
}
