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

use std::collections::BTreeMap;
use std::time::Duration;

use super::{NodeRecord, NodeRole};

/// How often the leader compares the node table with raft's configuration.
pub const CONVERGE_INTERVAL: Duration = Duration::from_secs(1);

/// A raft configuration change that brings raft closer to the node table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfChangeDue {
    pub node: u64,
    /// Add as a voter (voters and witnesses); `false`: as a learner.
    pub voter: bool,
}

/// The next change due, lowest node id first, or `None` when raft agrees with the table
/// (as far as it can now). A node missing from raft is added as a learner; a voter in the
/// table that raft has as a learner is promoted once it is `active` (the leader heard
/// from it recently). Nodes raft has that the table lacks are left alone (removal is an
/// operator's decision), and a voter is never demoted.
pub fn next_conf_change(
    nodes: &BTreeMap<u64, NodeRecord>,
    voters: &[u64],
    learners: &[u64],
    active: &[u64],
) -> Option<ConfChangeDue> {
    nodes.values().find_map(|n| {
        if voters.contains(&n.id) {
            return None;
        }
        if !learners.contains(&n.id) {
            return Some(ConfChangeDue {
                node: n.id,
                voter: false,
            });
        }
        (n.role != NodeRole::Learner && active.contains(&n.id)).then_some(ConfChangeDue {
            node: n.id,
            voter: true,
        })
    })
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
        }
    }

    #[test]
    fn converges_one_change_at_a_time_whatever_the_order() {
        let nodes: BTreeMap<u64, NodeRecord> = [
            rec(1, NodeRole::Voter),
            rec(2, NodeRole::Voter),
            rec(3, NodeRole::Witness),
            rec(4, NodeRole::Learner),
            rec(5, NodeRole::Voter),
        ]
        .into_iter()
        .map(|n| (n.id, n))
        .collect();
        let (mut voters, mut learners) = (vec![1u64], vec![5u64]);
        // Nobody answers yet: nodes join as learners, nobody is promoted.
        let mut steps = 0;
        while let Some(c) = next_conf_change(&nodes, &voters, &learners, &[]) {
            steps += 1;
            assert!(steps <= 5, "does not converge");
            assert!(!c.voter, "a silent node is never made a voter");
            learners.push(c.node);
        }
        learners.sort();
        assert_eq!(learners, vec![2, 3, 4, 5]);
        assert_eq!(voters, vec![1]);
        // They answer: the voters of the table are promoted, one at a time.
        let active = [2, 3, 4, 5];
        while let Some(c) = next_conf_change(&nodes, &voters, &learners, &active) {
            steps += 1;
            assert!(steps <= 10, "does not converge");
            learners.retain(|&n| n != c.node);
            if c.voter {
                voters.push(c.node);
            } else {
                learners.push(c.node);
            }
        }
        voters.sort();
        assert_eq!(
            voters,
            vec![1, 2, 3, 5],
            "a learner in raft but a voter in the table is promoted"
        );
        assert_eq!(learners, vec![4]);
        // Agreement: nothing due.
        assert_eq!(next_conf_change(&nodes, &voters, &learners, &active), None);
        // A node raft has but the table lacks is not touched.
        voters.push(9);
        assert_eq!(next_conf_change(&nodes, &voters, &learners, &active), None);
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
