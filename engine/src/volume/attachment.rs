//! Attachments: attach (with takeover), detach, re-open after a replica-set change, and
//! the I/O entry points (`attached`, `verify`).

use super::*;

impl VolumeManager {
    /// Attaches a volume here. Attaching a volume already attached here is a no-op.
    /// `takeover` moves an attachment from another node (failover after that node is lost).
    pub async fn attach(&self, name: &str, takeover: bool) -> Result<Arc<AttachedVolume>> {
        let _op = self.ops.lock().await;
        self.attach_locked(name, takeover).await
    }

    pub(super) async fn attach_locked(
        &self,
        name: &str,
        takeover: bool,
    ) -> Result<Arc<AttachedVolume>> {
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
        let generation = open.record.generation;
        let vol = Arc::new(AttachedVolume {
            node: self.node_id,
            lease,
            name: name.to_string(),
            id: open.record.id.clone(),
            generation: std::sync::atomic::AtomicU64::new(open.record.generation),
            class: std::sync::atomic::AtomicU8::new(crate::sched::class_index(
                open.record.io_priority,
            ) as u8),
            sched: self.sched.clone(),
            gate: tokio::sync::RwLock::new(Some(open)),
        });
        self.attached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), vol.clone());
        tracing::info!(volume = %name, generation = vol.generation(), "volume attached");
        self.drop_stale_pending(name, generation).await;
        Ok(vol)
    }

    /// Drops local attachments the cluster has moved on from: the volume was attached
    /// elsewhere, detached, deleted, or attached again at a newer generation (its domain was
    /// deactivated while this node was cut off, say). Such a coordinator is fenced anyway;
    /// dropping it stops serving a dead export and lets a later attach here commit a new
    /// generation instead of returning the stale one. Callers hold `ops`.
    pub(super) async fn drop_stale_attachments(&self) {
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
    pub(super) async fn open_backend(&self, rec: VolumeRecord) -> Result<Open> {
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
    pub(super) async fn reopen(
        &self,
        vol: &AttachedVolume,
        repl: Option<(&VolumeRecord, u32)>,
    ) -> Result<()> {
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

    pub(super) async fn detach_locked(&self, name: &str) -> Result<()> {
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

    pub(super) fn attached_get(&self, name: &str) -> Option<Arc<AttachedVolume>> {
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
