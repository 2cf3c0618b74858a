//! Topology-aware replica placement.
//!
//! Replicas spread across failure domains in this order: cluster domain, then zone, then
//! rack, then node; ties go to the node with the smallest provisioned fraction of its pool
//! (volumes are thin, so a volume larger than a pool is allowed; writes that do not fit
//! fail with ENOSPC on that node). Explicit
//! requests (`nodes`, `zones`, `domains`) restrict the candidates first; nodes of an
//! inactive domain are never chosen. An impossible
//! request is refused with the reason; placement never silently places two replicas on one
//! node.

use std::collections::{BTreeSet, HashMap};

use crate::cluster::{ClusterState, NodeRecord, NodeRole};

/// What a volume asks of placement.
#[derive(Debug, Clone, Default)]
pub struct PlacementRequest {
    pub repl: u32,
    pub size_bytes: u64,
    /// Only these nodes (by id or name), when not empty.
    pub nodes: Vec<String>,
    /// Only these zones, when not empty.
    pub zones: Vec<String>,
    /// Only these cluster domains, when not empty.
    pub domains: Vec<String>,
    /// Nodes that already hold a replica (for an RF increase): kept, not re-chosen.
    pub existing: Vec<u64>,
    /// Nodes known to be unreachable: never chosen.
    pub unreachable: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PlacementError(pub String);

/// Bytes of volume size placed on each node.
pub fn provisioned_by_node(state: &ClusterState) -> HashMap<u64, u64> {
    let mut m = HashMap::new();
    for v in state.volumes.values() {
        for r in &v.replicas {
            *m.entry(r.node).or_default() += v.size_bytes;
        }
    }
    m
}

fn matches_node(n: &NodeRecord, wanted: &[String]) -> bool {
    wanted.is_empty()
        || wanted
            .iter()
            .any(|w| *w == n.name || w.parse::<u64>().ok() == Some(n.id))
}

/// Chooses `req.repl` nodes (including `req.existing`). Returns node ids, existing first.
pub fn place(state: &ClusterState, req: &PlacementRequest) -> Result<Vec<u64>, PlacementError> {
    let repl = req.repl as usize;
    let storage: Vec<&NodeRecord> = state
        .nodes
        .values()
        .filter(|n| n.role != NodeRole::Witness)
        .collect();
    let mut reasons = Vec::new();
    let mut candidates: Vec<&NodeRecord> = Vec::new();
    for n in storage.iter().copied() {
        if req.existing.contains(&n.id) {
            continue;
        }
        if req.unreachable.contains(&n.id) {
            reasons.push(format!("{} is unreachable", n.name));
        } else if state.inactive_domains.contains(&n.domain) {
            reasons.push(format!("{} is in inactive domain {}", n.name, n.domain));
        } else if !matches_node(n, &req.nodes) {
            reasons.push(format!("{} not in --nodes", n.name));
        } else if !req.zones.is_empty() && !req.zones.contains(&n.zone) {
            reasons.push(format!("{} is in zone {}", n.name, n.zone));
        } else if !req.domains.is_empty() && !req.domains.contains(&n.domain) {
            reasons.push(format!("{} is in domain {}", n.name, n.domain));
        } else {
            candidates.push(n);
        }
    }
    let needed = repl.saturating_sub(req.existing.len());
    if candidates.len() < needed {
        let mut msg = format!(
            "replication factor {repl} needs {repl} storage nodes, but only {} qualify",
            candidates.len() + req.existing.len()
        );
        if storage.len() < repl {
            msg = format!(
                "replication factor {repl} needs {repl} storage nodes, but the cluster has {} (every replica must be on a different node)",
                storage.len()
            );
        } else if !reasons.is_empty() {
            msg.push_str(&format!(" ({})", reasons.join("; ")));
        }
        return Err(PlacementError(msg));
    }
    let provisioned = provisioned_by_node(state);
    let mut chosen: Vec<u64> = req.existing.clone();
    let mut used_domains: BTreeSet<String> = BTreeSet::new();
    let mut used_zones: BTreeSet<(String, String)> = BTreeSet::new();
    let mut used_racks: BTreeSet<(String, String, String)> = BTreeSet::new();
    for id in &req.existing {
        if let Some(n) = state.nodes.get(id) {
            used_domains.insert(n.domain.clone());
            used_zones.insert((n.domain.clone(), n.zone.clone()));
            used_racks.insert((n.domain.clone(), n.zone.clone(), n.rack.clone()));
        }
    }
    let mut pool: Vec<&NodeRecord> = candidates;
    while chosen.len() < repl {
        // Best candidate: a new domain, then a new zone, then a new rack, then the least
        // provisioned fraction of its pool, then the lowest id (deterministic).
        let best = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, n)| {
                let fill = provisioned.get(&n.id).copied().unwrap_or(0) as u128 * 1_000_000
                    / (n.pool_size_bytes.max(1) as u128);
                (
                    used_domains.contains(&n.domain),
                    used_zones.contains(&(n.domain.clone(), n.zone.clone())),
                    used_racks.contains(&(n.domain.clone(), n.zone.clone(), n.rack.clone())),
                    fill,
                    n.id,
                )
            })
            .map(|(i, _)| i);
        let Some(i) = best else { break };
        let n = pool.remove(i);
        used_domains.insert(n.domain.clone());
        used_zones.insert((n.domain.clone(), n.zone.clone()));
        used_racks.insert((n.domain.clone(), n.zone.clone(), n.rack.clone()));
        chosen.push(n.id);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, domain: &str, zone: &str, rack: &str) -> NodeRecord {
        NodeRecord {
            id,
            name: format!("n{id}"),
            admin_addr: String::new(),
            data_addr: String::new(),
            domain: domain.into(),
            zone: zone.into(),
            rack: rack.into(),
            role: NodeRole::Voter,
            pool_size_bytes: 100 << 30,
            joined_unix_seconds: 0,
            instance: String::new(),
        }
    }

    fn state(nodes: Vec<NodeRecord>) -> ClusterState {
        let mut s = ClusterState::new("c");
        for n in nodes {
            s.nodes.insert(n.id, n);
        }
        s
    }

    #[test]
    fn spreads_across_domains_then_zones_then_racks() {
        let s = state(vec![
            node(1, "a", "z1", "r1"),
            node(2, "a", "z1", "r2"),
            node(3, "a", "z2", "r1"),
            node(4, "b", "z1", "r1"),
        ]);
        let req = PlacementRequest {
            repl: 3,
            size_bytes: 1 << 30,
            ..Default::default()
        };
        let p = place(&s, &req).unwrap();
        assert_eq!(p.len(), 3);
        assert!(p.contains(&4), "the second domain is used first: {p:?}");
        assert!(p.contains(&3), "then the second zone: {p:?}");
        let two = place(
            &s,
            &PlacementRequest {
                repl: 2,
                ..req.clone()
            },
        )
        .unwrap();
        assert_eq!(two, vec![1, 4]);
    }

    #[test]
    fn impossible_requests_say_why() {
        let s = state(vec![node(1, "a", "z1", "r1"), node(2, "a", "z1", "r2")]);
        let err = place(
            &s,
            &PlacementRequest {
                repl: 3,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.0.contains("the cluster has 2"), "{err}");
        let err = place(
            &s,
            &PlacementRequest {
                repl: 2,
                zones: vec!["z9".into()],
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.0.contains("zone z1"), "{err}");
        let only = place(
            &s,
            &PlacementRequest {
                repl: 1,
                nodes: vec!["n2".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(only, vec![2]);
    }

    #[test]
    fn existing_replicas_are_kept_and_witnesses_hold_no_data() {
        let mut w = node(3, "c", "z", "r");
        w.role = NodeRole::Witness;
        let s = state(vec![node(1, "a", "z1", "r1"), node(2, "b", "z1", "r1"), w]);
        let p = place(
            &s,
            &PlacementRequest {
                repl: 2,
                existing: vec![2],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p, vec![2, 1]);
        assert!(place(
            &s,
            &PlacementRequest {
                repl: 3,
                ..Default::default()
            }
        )
        .is_err());
    }
}
