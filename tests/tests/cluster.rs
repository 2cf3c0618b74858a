//! Multi-node cluster tests: real tandemd processes on loopback joining with the token,
//! losing their raft leader and restarting.

use std::time::Duration;

use tandem_tests::{eventually, Daemon, DaemonOpts};

fn node_count(d: &Daemon) -> usize {
    d.ctl_json(&["cluster", "list"])
        .as_array()
        .map_or(0, |a| a.len())
}

#[test]
fn three_nodes_join_with_the_token_and_a_wrong_token_is_refused_on_both_sides() {
    let a = Daemon::start(DaemonOpts {
        extra_args: vec![
            "--domain".into(),
            "east".into(),
            "--name".into(),
            "a".into(),
        ],
        ..Default::default()
    });
    let b = Daemon::join(&a, &["--name", "b", "--zone", "z2"]);
    // Joining through a follower works too (the join is forwarded to the leader).
    let c = Daemon::join(&b, &["--name", "c", "--rack", "r3"]);
    eventually(Duration::from_secs(20), "three nodes", || {
        (node_count(&c) == 3).then_some(())
    });
    let nodes = a.ctl_json(&["cluster", "list"]);
    let nodes = nodes.as_array().unwrap();
    assert!(
        nodes.iter().all(|n| n["role"] == "voter"),
        "first three are voters: {nodes:?}"
    );
    assert_eq!(nodes.iter().filter(|n| n["leader"] == true).count(), 1);
    let b_rec = nodes.iter().find(|n| n["name"] == "b").unwrap();
    assert_eq!(b_rec["zone"], "z2");
    let human = a.ctl_ok(&["cluster", "list"]);
    assert!(
        human.contains("HEALTH") && human.contains("(leader)"),
        "{human}"
    );
    let inspect = c.ctl_json(&["cluster", "inspect"]);
    assert_eq!(inspect["voters"].as_array().unwrap().len(), 3);
    assert_eq!(
        inspect["cluster_id"],
        a.ctl_json(&["cluster", "token", "show"])["cluster_id"]
    );

    // A fourth node with a wrong token is refused: it says so, and the member logs it.
    let log = Daemon::start_expect_failure(DaemonOpts {
        extra_args: vec![
            "--join".into(),
            a.admin_addr.clone(),
            "--token".into(),
            "tdm-not-the-token".into(),
        ],
        ..Default::default()
    });
    assert!(log.contains("wrong cluster token"), "joiner's error: {log}");
    assert!(a.log().contains("refused a join: wrong cluster token"));
    assert_eq!(node_count(&a), 3, "the refused node was not added");
    // A fourth good node becomes a learner (three voters by default).
    let d = Daemon::join(&a, &["--name", "d"]);
    eventually(Duration::from_secs(20), "learner d", || {
        let nodes = d.ctl_json(&["cluster", "list"]);
        nodes
            .as_array()?
            .iter()
            .find(|n| n["name"] == "d" && n["role"] == "learner")
            .map(|_| ())
    });
}

/// Metadata must stay available when the raft leader dies, and a restarted node must
/// rejoin from its own sled state without a token.
#[test]
fn leader_loss_keeps_metadata_available_and_a_restarted_node_rejoins_without_a_token() {
    let a = Daemon::start(DaemonOpts::default());
    let b = Daemon::join(&a, &[]);
    let c = Daemon::join(&a, &[]);
    eventually(Duration::from_secs(20), "three nodes", || {
        (node_count(&c) == 3).then_some(())
    });
    let mut nodes = vec![a, b, c];
    let leader = nodes
        .iter()
        .position(|d| {
            d.ctl_json(&["cluster", "inspect"])["leader_id"]
                == d.ctl_json(&["cluster", "inspect"])["local_node_id"]
        })
        .expect("one node leads");
    let mut dead = nodes.remove(leader);
    dead.kill9();
    // A survivor accepts a metadata change once a new leader is elected.
    let survivor = &nodes[0];
    let out = eventually(Duration::from_secs(30), "a new leader", || {
        let o = survivor.ctl(&[
            "-j",
            "volume",
            "create",
            "after-failover",
            "--size",
            "64MiB",
        ]);
        (o.code == 0).then_some(o.stdout)
    });
    assert!(out.contains("after-failover"));
    let other = &nodes[1];
    eventually(
        Duration::from_secs(10),
        "the volume on the other survivor",
        || {
            other
                .ctl_json(&["volume", "inspect", "after-failover"])
                .get("name")
                .map(|_| ())
        },
    );

    // Restart the dead node with no --join and no token: it rejoins from its sled state.
    dead.opts.extra_args.clear();
    dead.spawn();
    eventually(
        Duration::from_secs(30),
        "the restarted node to catch up",
        || {
            let o = dead.ctl(&["-j", "volume", "inspect", "after-failover"]);
            (o.code == 0).then_some(())
        },
    );
    assert_eq!(node_count(&dead), 3);
}

/// F10: nodes that join at once (a DaemonSet starting four pods) all end up raft members
/// in the role the node table gives them. raft takes one configuration change at a time,
/// so concurrent joins used to lose voters (`Voters: [1, 2, 3]` with five in the table);
/// the leader now converges raft's configuration to the node table.
#[test]
fn concurrent_joins_converge_raft_membership_to_the_node_table() {
    let a = Daemon::start(DaemonOpts::default());
    let joined: Vec<Daemon> = std::thread::scope(|s| {
        let handles: Vec<_> = [
            vec!["--kvdb"],
            vec!["--kvdb"],
            vec!["--kvdb"],
            vec!["--witness"],
        ]
        .into_iter()
        .map(|extra| {
            let a = &a;
            s.spawn(move || Daemon::join(a, &extra))
        })
        .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(joined.len(), 4);
    let voters = eventually(Duration::from_secs(40), "five raft voters", || {
        let i = a.ctl_json(&["cluster", "inspect"]);
        let voters: Vec<u64> = i["voters"]
            .as_array()?
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        (voters.len() == 5).then_some(voters)
    });
    let table: Vec<u64> = a.ctl_json(&["cluster", "inspect"])["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] != "learner")
        .filter_map(|n| n["id"].as_u64())
        .collect();
    let mut sorted = voters.clone();
    sorted.sort();
    let mut table_sorted = table.clone();
    table_sorted.sort();
    assert_eq!(sorted, table_sorted, "raft voters match the node table");
}
