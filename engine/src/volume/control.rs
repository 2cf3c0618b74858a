//! Control operations: create, list, inspect, update (size, priority, replication
//! factor) and delete.

use super::*;

impl VolumeManager {
    pub async fn create(&self, spec: CreateSpec) -> Result<VolumeInfo> {
        validate_name(&spec.name)?;
        validate_size(spec.size_bytes)?;
        let repl = if spec.repl == 0 { 1 } else { spec.repl };
        if repl > MAX_REPL {
            return Err(VolumeError::InvalidArgument(format!(
                "invalid replication factor {repl}: it must be between 1 and {MAX_REPL}"
            )));
        }
        for (k, v) in &spec.labels {
            if k.is_empty() || k.len() > 253 || v.len() > 253 || k.contains('=') {
                return Err(VolumeError::InvalidArgument(format!(
                    "invalid label '{k}={v}': keys are 1 to 253 characters without '=', values at most 253"
                )));
            }
        }
        let _op = self.ops.lock().await;
        let state = self.cluster.state();
        if state.volumes.contains_key(&spec.name) {
            return Err(VolumeError::AlreadyExists(spec.name));
        }
        let req = PlacementRequest {
            repl,
            size_bytes: spec.size_bytes,
            nodes: spec.nodes.clone(),
            zones: spec.zones.clone(),
            domains: spec.domains.clone(),
            existing: Vec::new(),
            unreachable: self.cluster.status().inactive,
        };
        // A preferred node holds the first replica when it passes the request's own
        // restrictions (checked by placing one replica on it alone) and the rest fit.
        let preferred = spec.preferred_nodes.iter().find_map(|p| {
            let id = state
                .nodes
                .values()
                .find(|n| n.name == *p || p.parse::<u64>().ok() == Some(n.id))?
                .id;
            let alone = PlacementRequest {
                repl: 1,
                nodes: vec![id.to_string()],
                ..req.clone()
            };
            if place(&state, &alone).ok()? != [id] {
                return None;
            }
            let with = PlacementRequest {
                existing: vec![id],
                ..req.clone()
            };
            place(&state, &with).ok()
        });
        let nodes = match preferred {
            Some(nodes) => nodes,
            None if spec.require_preferred => {
                return Err(VolumeError::NoPlacement(format!(
                    "no replica of '{}' can be placed on any of the requested nodes ({}) within its restrictions",
                    spec.name,
                    spec.preferred_nodes.join(", ")
                )))
            }
            None => place(&state, &req).map_err(|e| VolumeError::NoPlacement(e.0))?,
        };
        let async_domains: std::collections::BTreeSet<String> = spec
            .async_domains
            .iter()
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty())
            .collect();
        if !async_domains.is_empty() {
            for d in &async_domains {
                if !state.nodes.values().any(|n| n.domain == *d) {
                    return Err(VolumeError::InvalidArgument(format!(
                        "async domain '{d}' has no nodes"
                    )));
                }
            }
            let in_async = |n: &u64| {
                state
                    .nodes
                    .get(n)
                    .is_some_and(|r| async_domains.contains(&r.domain))
            };
            if nodes.iter().all(in_async) {
                return Err(VolumeError::InvalidArgument(format!(
                    "every replica of '{}' would be async: at least one must be synchronous (outside {})",
                    spec.name,
                    async_domains.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            if !nodes.iter().any(in_async) {
                return Err(VolumeError::NoPlacement(format!(
                    "no replica of '{}' landed in the async domain(s) {}: raise --repl or allow those domains",
                    spec.name,
                    async_domains.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        self.check_gate(&state, &nodes, &async_domains)?;
        let rec = VolumeRecord {
            id: String::new(),
            name: spec.name.clone(),
            size_bytes: spec.size_bytes,
            repl,
            io_priority: spec.io_priority,
            labels: spec.labels,
            created_unix_seconds: now_unix(),
            generation: 0,
            attached_node: None,
            replicas: nodes
                .iter()
                .map(|&node| ReplicaRecord {
                    node,
                    state: ReplicaState::InSync,
                    generation: 0,
                    resync_done_bytes: 0,
                    resync_total_bytes: 0,
                })
                .collect(),
            hot_regions: Default::default(),
            parked: Vec::new(),
            lease_wait: false,
            async_domains,
            snapshots: Vec::new(),
            next_snapshot_seq: 0,
        };
        self.cluster
            .propose(Command::CreateVolume {
                volume: Box::new(rec),
            })
            .await?;
        let rec = self.record(&spec.name)?;
        let local = self.local_replica(&rec).await;
        tracing::info!(volume = %rec.name, id = %rec.id, size_bytes = rec.size_bytes, ?nodes, "volume created");
        Ok(VolumeInfo {
            allocated_bytes: local.map_or(0, |r| r.allocated_bytes()),
            checksum_errors: 0,
            record: rec,
        })
    }

    pub(super) async fn info(&self, record: VolumeRecord) -> VolumeInfo {
        let replica = self.replicas.lock().await.get(&record.id).cloned();
        VolumeInfo {
            allocated_bytes: replica.as_ref().map_or(0, |r| r.allocated_bytes()),
            checksum_errors: replica.as_ref().map_or(0, |r| r.checksum_errors()),
            record,
        }
    }

    pub async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for rec in self.cluster.state().volumes.values() {
            out.push(self.info(rec.clone()).await);
        }
        Ok(out)
    }

    pub async fn inspect(&self, name: &str) -> Result<VolumeInfo> {
        let rec = self.record(name)?;
        Ok(self.info(rec).await)
    }

    pub async fn update(&self, name: &str, spec: UpdateSpec) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let rec = self.record(name)?;
        if let Some(size) = spec.size_bytes {
            validate_size(size)?;
            if size < rec.size_bytes {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is {} bytes; cannot shrink it to {size} bytes (volumes only grow)",
                    rec.size_bytes
                )));
            }
        }
        if let Some(repl) = spec.repl {
            if repl == 0 || repl > MAX_REPL {
                return Err(VolumeError::InvalidArgument(format!(
                    "invalid replication factor {repl}: it must be between 1 and {MAX_REPL}"
                )));
            }
            if repl != rec.repl {
                match rec.attached_node {
                    Some(n) if n != self.node_id => {
                        return Err(VolumeError::FailedPrecondition(format!(
                            "volume '{name}' is attached on node {}; change its replication factor there (its coordinator resyncs the new replicas)",
                            self.node_name(&self.cluster.state(), n)
                        )))
                    }
                    _ => {}
                }
                match self.attached_get(name) {
                    Some(vol) => self.reopen(&vol, Some((&rec, repl))).await?,
                    None => self.change_repl(&rec, repl).await?,
                }
            }
        }
        if spec.size_bytes.is_some_and(|s| s > rec.size_bytes) || spec.io_priority.is_some() {
            self.cluster
                .propose(Command::UpdateVolume {
                    name: name.to_string(),
                    size_bytes: spec.size_bytes.filter(|s| *s > rec.size_bytes),
                    repl: None,
                    io_priority: spec.io_priority,
                })
                .await?;
        }
        self.reconcile().await;
        // A replicated volume's coordinator has its size fixed at open: re-open it to grow.
        if spec.size_bytes.is_some_and(|s| s > rec.size_bytes) {
            if let Some(vol) = self.attached_get(name) {
                let replicated = matches!(
                    vol.gate.read().await.as_ref().map(|o| &o.backend),
                    Some(Backend::Replicated(_))
                );
                if replicated {
                    self.reopen(&vol, None).await?;
                }
            }
        }
        self.inspect(name).await
    }

    /// Raises or lowers the replication factor: new replicas join out-of-sync (the
    /// coordinator resyncs them); removed replicas are the least useful ones (out-of-sync
    /// first, never the last in-sync one).
    pub(super) async fn change_repl(&self, rec: &VolumeRecord, repl: u32) -> Result<()> {
        let state = self.cluster.state();
        let mut replicas = rec.replicas.clone();
        if repl as usize > replicas.len() {
            let existing: Vec<u64> = replicas.iter().map(|r| r.node).collect();
            let nodes = place(
                &state,
                &PlacementRequest {
                    repl,
                    size_bytes: rec.size_bytes,
                    existing: existing.clone(),
                    unreachable: self.cluster.status().inactive,
                    ..Default::default()
                },
            )
            .map_err(|e| VolumeError::NoPlacement(e.0))?;
            self.check_gate(&state, &nodes, &rec.async_domains)?;
            for node in nodes.into_iter().filter(|n| !existing.contains(n)) {
                replicas.push(ReplicaRecord {
                    node,
                    state: ReplicaState::OutOfSync,
                    generation: rec.generation,
                    resync_done_bytes: 0,
                    resync_total_bytes: 0,
                });
            }
        } else {
            // Drop out-of-sync replicas first, then ones not on the attach node.
            replicas.sort_by_key(|r| {
                (
                    r.state == ReplicaState::InSync,
                    Some(r.node) == rec.attached_node,
                )
            });
            while replicas.len() > repl as usize {
                replicas.remove(0);
            }
        }
        self.cluster
            .propose(Command::SetReplicas {
                name: rec.name.clone(),
                replicas,
                repl,
                generation: rec.generation,
            })
            .await?;
        Ok(())
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        let _op = self.ops.lock().await;
        let rec = self.record(name)?;
        if let Some(node) = rec.attached_node {
            if !force {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is attached on node {}; detach it first, or delete with --force",
                    self.node_name(&self.cluster.state(), node)
                )));
            }
            if node == self.node_id {
                self.detach_locked(name).await?;
            } else {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is attached on node {}; detach it there first",
                    self.node_name(&self.cluster.state(), node)
                )));
            }
        }
        self.cluster
            .propose(Command::DeleteVolume {
                name: name.to_string(),
            })
            .await?;
        self.reconcile().await;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }
}
