//! Raft membership follows the node table: a pure decision, driven by the leader.
//!
//! A join commits the node's record (`AddNode`, with its role) and adds the node to raft
//! as a learner. raft-rs takes one configuration change at a time and refuses the others,
//! so joins that arrive together, or a join whose change was lost with a leader, used to
//! leave nodes in the table that raft does not count. The leader now compares the table
//! with raft's configuration every [`CONVERGE_INTERVAL`] and proposes the next missing
//! change, one at a time, until they agree, whatever the join order.
//!
//! A node that should vote is first a learner and is promoted only once the leader hears
//! from it: adding a voter that is not running yet (its join is still in flight) would
//! shrink the live majority and could stall every proposal, the joins included.
//!
//! Which nodes vote is placed by topology ([`desired_voters`]): witnesses and `--kvdb`
//! nodes always, then storage nodes spread across domains, so that no single domain holds
//! the majority when another domain or a witness exists. As nodes join, the leader
//! rebalances: it promotes the better-placed node first and demotes the one it replaces
//! only afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{NodeRecord, NodeRole};

/// How often the leader compares the node table with raft's configuration.
pub const CONVERGE_INTERVAL: Duration = Duration::from_secs(1);

/// Raft voters a cluster aims for: a majority survives the loss of any one. More when
/// the operator pins more (`--kvdb`, witnesses), rounded up to an odd number.
pub const DEFAULT_VOTERS: usize = 3;

/// A raft configuration change that brings raft closer to the node table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfChangeDue {
    pub node: u64,
    /// Make it a voter; `false`: a learner (added as one, or a voter demoted).
    pub voter: bool,
}

/// Whether the node table pins this node as a voter: a witness, or a node started with
/// `--kvdb` (`NodeRole::Voter`). Any other storage node (`NodeRole::Learner` in the table)
/// votes when [`desired_voters`] places it.
pub fn pinned_voter(n: &NodeRecord) -> bool {
    matches!(n.role, NodeRole::Voter | NodeRole::Witness)
}

/// The voters the cluster should have: every pinned voter, then storage nodes placed
/// across domains until there are [`DEFAULT_VOTERS`] (or the smallest odd number at least
/// the pinned count), one pick at a time from the domain with the fewest voters so far.
/// Ties keep what raft already has: a current voter first, then a node the leader hears
/// from, then the leader itself, then the lowest id. A storage node counts only if raft
/// has it as a voter or the leader hears from it (a silent node is never picked to
/// replace a live one).
///
/// In the layout of two sites and a witness, this gives one voter per site plus the
/// witness: no single site holds a majority, so losing either keeps the metadata
/// writable. With only two domains and no witness, one of them always holds a majority;
/// `cluster inspect` warns ([`majority_domain`]).
pub fn desired_voters(
    nodes: &BTreeMap<u64, NodeRecord>,
    voters: &[u64],
    active: &[u64],
    leader: u64,
) -> BTreeSet<u64> {
    let is_active = |id: u64| id == leader || active.contains(&id);
    let mut chosen: BTreeSet<u64> = nodes
        .values()
        .filter(|n| pinned_voter(n))
        .map(|n| n.id)
        .collect();
    let candidates: Vec<&NodeRecord> = nodes
        .values()
        .filter(|n| !pinned_voter(n) && (voters.contains(&n.id) || is_active(n.id)))
        .collect();
    let mut target = DEFAULT_VOTERS.max(chosen.len());
    if target.is_multiple_of(2) {
        target += 1;
    }
    let target = target.min(chosen.len() + candidates.len());
    let mut per_domain: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &chosen {
        *per_domain.entry(nodes[id].domain.as_str()).or_default() += 1;
    }
    while chosen.len() < target {
        let Some(pick) = candidates
            .iter()
            .filter(|n| !chosen.contains(&n.id))
            .min_by_key(|n| {
                (
                    per_domain.get(n.domain.as_str()).copied().unwrap_or(0),
                    !voters.contains(&n.id),
                    !is_active(n.id),
                    n.id != leader,
                    n.id,
                )
            })
        else {
            break;
        };
        chosen.insert(pick.id);
        *per_domain.entry(pick.domain.as_str()).or_default() += 1;
    }
    chosen
}

/// The next change due, or `None` when raft agrees with the node table and the placement
/// (as far as it can now), lowest node id first within each step:
/// 1. a node of the table missing from raft is added as a learner;
/// 2. a node [`desired_voters`] places is promoted once the leader hears from it;
/// 3. only when every placed node votes, a voter the placement no longer wants is demoted
///    to learner (never a pinned one, and never the leader), so the voter count never
///    drops below the placement's while it changes.
///
/// Nodes raft has that the table lacks are left alone (removal is an operator's
/// decision).
pub fn next_conf_change(
    nodes: &BTreeMap<u64, NodeRecord>,
    voters: &[u64],
    learners: &[u64],
    active: &[u64],
    leader: u64,
) -> Option<ConfChangeDue> {
    if let Some(n) = nodes
        .values()
        .find(|n| !voters.contains(&n.id) && !learners.contains(&n.id))
    {
        return Some(ConfChangeDue {
            node: n.id,
            voter: false,
        });
    }
    let desired = desired_voters(nodes, voters, active, leader);
    if let Some(&id) = desired
        .iter()
        .find(|id| learners.contains(id) && (**id == leader || active.contains(id)))
    {
        return Some(ConfChangeDue {
            node: id,
            voter: true,
        });
    }
    if !desired.iter().all(|id| voters.contains(id)) {
        return None; // a placed node is still silent: keep every voter until it answers
    }
    voters
        .iter()
        .find(|id| {
            **id != leader
                && !desired.contains(id)
                && nodes.get(id).is_some_and(|n| !pinned_voter(n))
        })
        .map(|&id| ConfChangeDue {
            node: id,
            voter: false,
        })
}

/// A raft member to remove: one the node table removed (`cluster remove`), lowest id
/// first, never the leader itself. The leader makes this change before any other.
pub fn next_removal(
    removed: &BTreeSet<u64>,
    voters: &[u64],
    learners: &[u64],
    leader: u64,
) -> Option<u64> {
    removed
        .iter()
        .copied()
        .find(|id| *id != leader && (voters.contains(id) || learners.contains(id)))
}

/// The domain whose loss alone would lose the raft majority, if there is one and the
/// cluster has another domain: (domain, its voters, all voters). `cluster inspect` warns.
pub fn majority_domain(
    nodes: &BTreeMap<u64, NodeRecord>,
    voters: &[u64],
) -> Option<(String, usize, usize)> {
    let domains: std::collections::BTreeSet<&str> =
        nodes.values().map(|n| n.domain.as_str()).collect();
    if domains.len() < 2 {
        return None;
    }
    let total = voters.len();
    domains.into_iter().find_map(|d| {
        let here = voters
            .iter()
            .filter(|v| nodes.get(v).is_some_and(|n| n.domain == d))
            .count();
        // Losing `here` voters leaves `total - here`, which must be a majority of `total`.
        (here > 0 && 2 * (total - here) <= total).then(|| (d.to_string(), here, total))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, role: NodeRole) -> NodeRecord {
        NodeRecord {
            id,
            name: format!("n{id}"),
            admin_addr: String::new(),
            data_addr: String::new(),
            domain: "d".into(),
            zone: "z".into(),
            rack: "r".into(),
            role,
            pool_size_bytes: 0,
            joined_unix_seconds: 0,
            instance: String::new(),
        }
    }

    fn node(id: u64, domain: &str, role: NodeRole) -> NodeRecord {
        let mut n = rec(id, role);
        n.domain = domain.into();
        n
    }

    fn table(nodes: impl IntoIterator<Item = NodeRecord>) -> BTreeMap<u64, NodeRecord> {
        nodes.into_iter().map(|n| (n.id, n)).collect()
    }

    /// Raft as the leader drives it: applies changes until none is due, checking on the
    /// way that a silent node is never promoted, the leader never demoted, and a voter
    /// demoted only while the placement already has all its voters.
    fn converge(
        nodes: &BTreeMap<u64, NodeRecord>,
        voters: &mut Vec<u64>,
        learners: &mut Vec<u64>,
        active: &[u64],
        leader: u64,
    ) -> usize {
        let mut steps = 0;
        while let Some(c) = next_conf_change(nodes, voters, learners, active, leader) {
            steps += 1;
            assert!(steps <= 4 * nodes.len() + 4, "does not converge");
            if c.voter {
                assert!(
                    c.node == leader || active.contains(&c.node),
                    "{c:?}: silent"
                );
                learners.retain(|&n| n != c.node);
                voters.push(c.node);
            } else if voters.contains(&c.node) {
                assert_ne!(c.node, leader, "the leader is never demoted");
                let desired = desired_voters(nodes, voters, active, leader);
                assert!(
                    desired.iter().all(|d| voters.contains(d)),
                    "{c:?} too early"
                );
                voters.retain(|&n| n != c.node);
                learners.push(c.node);
            } else {
                learners.push(c.node);
            }
            voters.sort();
            learners.sort();
        }
        steps
    }

    #[test]
    fn converges_one_change_at_a_time_whatever_the_order() {
        let nodes = table([
            rec(1, NodeRole::Voter),
            rec(2, NodeRole::Voter),
            rec(3, NodeRole::Witness),
            rec(4, NodeRole::Learner),
            rec(5, NodeRole::Voter),
        ]);
        let (mut voters, mut learners) = (vec![1u64], vec![5u64]);
        // Nobody answers yet: nodes join as learners, nobody is promoted.
        converge(&nodes, &mut voters, &mut learners, &[], 1);
        assert_eq!(learners, vec![2, 3, 4, 5]);
        assert_eq!(voters, vec![1]);
        // They answer: the pinned voters are promoted, one at a time, and the storage node
        // too (four pinned voters round up to five).
        let active = [2, 3, 4, 5];
        converge(&nodes, &mut voters, &mut learners, &active, 1);
        assert_eq!(voters, vec![1, 2, 3, 4, 5]);
        // Agreement: nothing due.
        assert_eq!(
            next_conf_change(&nodes, &voters, &learners, &active, 1),
            None
        );
        // A node raft has but the table lacks is not touched.
        voters.push(9);
        assert_eq!(
            next_conf_change(&nodes, &voters, &learners, &active, 1),
            None
        );
    }

    /// The seeds' layout: two sites of two storage nodes and a witness, no `--kvdb`, joining
    /// one by one. The first three to join used to be the voters (two in east); now each
    /// site has one and the witness the third, whatever the join order.
    #[test]
    fn two_sites_and_a_witness_get_one_voter_each() {
        let all = [
            node(1, "east", NodeRole::Learner),
            node(2, "east", NodeRole::Learner),
            node(3, "west", NodeRole::Learner),
            node(4, "west", NodeRole::Learner),
            node(5, "witness", NodeRole::Witness),
        ];
        for order in [
            [1, 2, 3, 4, 5],
            [1, 5, 2, 4, 3],
            [3, 4, 5, 1, 2],
            [1, 2, 5, 3, 4],
        ] {
            let first = order[0];
            let (mut voters, mut learners) = (vec![first], vec![]);
            let mut nodes = BTreeMap::new();
            for id in order {
                nodes.insert(id, all[id as usize - 1].clone());
                let active: Vec<u64> = nodes.keys().copied().filter(|&n| n != first).collect();
                converge(&nodes, &mut voters, &mut learners, &active, first);
            }
            let domains: BTreeSet<&str> = voters.iter().map(|v| nodes[v].domain.as_str()).collect();
            assert_eq!(voters.len(), 3, "order {order:?}: {voters:?}");
            assert_eq!(domains.len(), 3, "order {order:?}: {voters:?}");
            assert!(voters.contains(&first), "the leader keeps its vote");
            assert_eq!(majority_domain(&nodes, &voters), None, "order {order:?}");
        }
    }

    #[test]
    fn a_silent_placed_node_blocks_the_demotion_it_would_justify() {
        let nodes = table([
            node(1, "east", NodeRole::Learner),
            node(2, "east", NodeRole::Learner),
            node(3, "west", NodeRole::Learner),
            node(5, "witness", NodeRole::Witness),
        ]);
        let (voters, learners) = (vec![1, 2, 3], vec![5]);
        // The witness joined but the leader does not hear from it: keep all three voters.
        assert_eq!(
            next_conf_change(&nodes, &voters, &learners, &[2, 3], 1),
            None
        );
        // It answers: promoted first, then the extra east voter is demoted.
        assert_eq!(
            next_conf_change(&nodes, &voters, &learners, &[2, 3, 5], 1),
            Some(ConfChangeDue {
                node: 5,
                voter: true
            })
        );
        assert_eq!(
            next_conf_change(&nodes, &[1, 2, 3, 5], &[], &[2, 3, 5], 1),
            Some(ConfChangeDue {
                node: 2,
                voter: false
            })
        );
        // With node 1 silent (down), east keeps the live voter and the dead one goes.
        assert_eq!(
            next_conf_change(&nodes, &[1, 2, 3, 5], &[], &[2, 5], 3),
            Some(ConfChangeDue {
                node: 1,
                voter: false
            })
        );
        // Pinned voters stay, even beyond the placement.
        let pinned = table([
            node(1, "east", NodeRole::Voter),
            node(2, "east", NodeRole::Voter),
            node(3, "west", NodeRole::Learner),
        ]);
        assert_eq!(desired_voters(&pinned, &[1, 2], &[3], 1).len(), 3);
        assert_eq!(next_conf_change(&pinned, &[1, 2, 3], &[], &[2, 3], 1), None);
    }

    /// Random topologies and join orders converge, within a bound, to the placement; with
    /// three domains or more and at most one pinned voter, no domain holds the majority.
    #[test]
    fn random_topologies_converge_to_a_spread_placement() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..500 {
            let domains = 1 + rnd(4);
            let count = 1 + rnd(7);
            let mut nodes = BTreeMap::new();
            let mut pinned = 0;
            for id in 1..=count {
                let role = match rnd(6) {
                    0 => NodeRole::Voter,
                    1 if id > 1 => NodeRole::Witness,
                    _ => NodeRole::Learner,
                };
                pinned += usize::from(role != NodeRole::Learner);
                let domain = if role == NodeRole::Witness {
                    "witness".to_string()
                } else {
                    format!("d{}", rnd(domains))
                };
                nodes.insert(id, node(id, &domain, role));
            }
            let active: Vec<u64> = (2..=count).collect();
            let (mut voters, mut learners) = (vec![1], vec![]);
            converge(&nodes, &mut voters, &mut learners, &active, 1);
            let desired: Vec<u64> = desired_voters(&nodes, &voters, &active, 1)
                .into_iter()
                .collect();
            let in_raft: BTreeSet<u64> = voters.iter().chain(&learners).copied().collect();
            assert_eq!(in_raft.len(), nodes.len(), "every node is in raft");
            // The leader is never demoted, so it may stay beyond the placement.
            let mut want = desired.clone();
            if !want.contains(&1) {
                want.push(1);
                want.sort();
            }
            assert_eq!(voters, want, "{nodes:?}");
            let spread: BTreeSet<&str> = nodes.values().map(|n| n.domain.as_str()).collect();
            if spread.len() >= 3 && pinned <= 1 && desired.contains(&1) {
                assert_eq!(
                    majority_domain(&nodes, &voters),
                    None,
                    "{nodes:?} {voters:?}"
                );
            }
        }
    }

    #[test]
    fn removed_members_leave_raft_but_never_the_leader() {
        let removed: BTreeSet<u64> = [2, 4, 7].into();
        assert_eq!(next_removal(&removed, &[1, 2, 3], &[4], 1), Some(2));
        assert_eq!(next_removal(&removed, &[1, 3], &[4], 1), Some(4));
        assert_eq!(
            next_removal(&removed, &[1, 3], &[], 1),
            None,
            "7 is not in raft"
        );
        assert_eq!(
            next_removal(&[1].into(), &[1, 3], &[], 1),
            None,
            "the leader"
        );
    }

    #[test]
    fn a_domain_holding_a_voter_majority_is_named() {
        let mut nodes = BTreeMap::new();
        for (id, d) in [(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "w")] {
            let mut n = rec(id, NodeRole::Voter);
            n.domain = d.into();
            nodes.insert(id, n);
        }
        // The first three to join: two in a, one in b. Losing a loses the majority.
        assert_eq!(
            majority_domain(&nodes, &[1, 2, 3]),
            Some(("a".into(), 2, 3))
        );
        // Two sites of two voters and a witness: no single site holds a majority.
        assert_eq!(majority_domain(&nodes, &[1, 2, 3, 4, 5]), None);
        // Four voters split two and two: losing either leaves two of four, no majority.
        assert_eq!(
            majority_domain(&nodes, &[1, 2, 3, 4]),
            Some(("a".into(), 2, 4))
        );
        // One domain only: nothing to warn about.
        let one: BTreeMap<u64, NodeRecord> = [(1, rec(1, NodeRole::Voter))].into_iter().collect();
        assert_eq!(majority_domain(&one, &[1]), None);
    }
}
