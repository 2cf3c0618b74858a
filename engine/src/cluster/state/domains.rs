//! Cluster domains: activation and deactivation (failover, with or without promoting
//! async replicas), and the questions the rest of the state asks about domains.

use super::*;

impl ClusterState {
    pub(super) fn in_domain(&self, node: u64, domain: &str) -> bool {
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

    pub(super) fn set_domain_active(
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
}
