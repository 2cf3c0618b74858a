//! Raft membership follows the node table: a pure decision, driven by the leader.
//!
//! A join commits the node's record (`AddNode`, with its role) and then a raft
//! configuration change. raft-rs takes one configuration change at a time and refuses
//! the others, so joins that arrive together, or a join whose change was lost with a
//! leader, used to leave nodes in the table that raft does not count. The leader now
//! compares the table with raft's configuration every [`CONVERGE_INTERVAL`] and proposes
//! the next missing change, one at a time, until they agree, whatever the join order.

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

/// The next change due, lowest node id first, or `None` when raft agrees with the table.
/// A voter in the table that raft has as a learner is promoted; nodes raft has that the
/// table lacks are left alone (removal is an operator's decision).
pub fn next_conf_change(
    nodes: &BTreeMap<u64, NodeRecord>,
    voters: &[u64],
    learners: &[u64],
) -> Option<ConfChangeDue> {
    nodes.values().find_map(|n| {
        let voter = n.role != NodeRole::Learner;
        let due = if voter {
            !voters.contains(&n.id)
        } else {
            !voters.contains(&n.id) && !learners.contains(&n.id)
        };
        due.then_some(ConfChangeDue { node: n.id, voter })
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
        let mut steps = 0;
        while let Some(c) = next_conf_change(&nodes, &voters, &learners) {
            steps += 1;
            assert!(steps <= 5, "does not converge");
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
        assert_eq!(next_conf_change(&nodes, &voters, &learners), None);
        // A node raft has but the table lacks is not touched.
        voters.push(9);
        assert_eq!(next_conf_change(&nodes, &voters, &learners), None);
    }
}
