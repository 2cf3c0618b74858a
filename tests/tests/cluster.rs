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
    // Three pinned by --kvdb and the witness round up to five: every node votes.
    let table: Vec<u64> = a.ctl_json(&["cluster", "inspect"])["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_u64())
        .collect();
    let mut sorted = voters.clone();
    sorted.sort();
    let mut table_sorted = table.clone();
    table_sorted.sort();
    assert_eq!(sorted, table_sorted, "raft voters match the node table");
}

/// F5 (raft part): a node whose disk was wiped comes back with `--join` under its old
/// name. It must not get its old raft id back with an empty log (it would have forgotten
/// its vote and its log); it is refused, with the command that unblocks it. Once the old
/// member is removed, it joins under a new id. A live node is never removed.
#[test]
fn a_wiped_node_is_refused_until_removed_and_then_joins_under_a_new_id() {
    let voters = |d: &Daemon| -> Vec<u64> {
        d.ctl_json(&["cluster", "inspect"])["voters"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default()
    };
    let a = Daemon::start(DaemonOpts::default());
    let _b = Daemon::join(&a, &["--name", "b"]);
    let mut c = Daemon::join(&a, &["--name", "c"]);
    let id_of = |d: &Daemon, name: &str| {
        d.ctl_json(&["cluster", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["id"].as_u64())
            .unwrap()
    };
    let old_id = id_of(&a, "c");
    eventually(Duration::from_secs(20), "three voters", || {
        (voters(&a).len() == 3).then_some(())
    });

    // c's disk is wiped: it starts empty and joins again under its name.
    c.kill9();
    let log = Daemon::start_expect_failure(DaemonOpts {
        extra_args: vec![
            "--join".into(),
            a.admin_addr.clone(),
            "--token".into(),
            a.token(),
            "--name".into(),
            "c".into(),
        ],
        ..Default::default()
    });
    assert!(
        log.contains("is taken by cluster member") && log.contains("tandemctl cluster remove c"),
        "{log}"
    );
    assert!(voters(&a).contains(&old_id), "nothing changed");

    // A live node cannot be removed, nor the leader, nor an unknown one.
    let live = a.ctl(&["cluster", "remove", "b"]);
    assert!(
        live.code != 0 && live.stderr.contains("is online"),
        "{live:?}"
    );
    let unknown = a.ctl(&["cluster", "remove", "nobody"]);
    assert!(
        unknown.code != 0 && unknown.stderr.contains("not found"),
        "{unknown:?}"
    );

    // The dead one can, once the leader has noticed it is gone.
    eventually(Duration::from_secs(20), "c removed", || {
        let o = a.ctl(&["cluster", "remove", "c"]);
        (o.code == 0).then_some(())
    });
    eventually(Duration::from_secs(20), "c out of raft", || {
        (!voters(&a).contains(&old_id)).then_some(())
    });
    let listed = a.ctl_json(&["cluster", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");

    // Now it joins again, under a new id, and the leader makes it a voter.
    let c2 = Daemon::join(&a, &["--name", "c"]);
    let new_id = id_of(&a, "c");
    assert_ne!(new_id, old_id, "a removed id is never given again");
    eventually(Duration::from_secs(20), "the new c votes", || {
        let v = voters(&c2);
        (v.len() == 3 && v.contains(&new_id) && !v.contains(&old_id)).then_some(())
    });
}

/// Every node-to-node call is refused without the cluster token's MAC, before anything in
/// it is decoded (raft messages are garbage here: decoding them would fail differently),
/// and the node keeps running.
#[test]
fn peer_calls_without_the_token_are_refused_before_anything_is_decoded() {
    use tandem_proto::admin as pb;
    use tandem_proto::admin::peer_service_client::PeerServiceClient;
    let a = Daemon::start(DaemonOpts::default());
    a.ctl_ok(&["volume", "create", "v", "--size", "16MiB"]);
    let id = a.ctl_json(&["volume", "inspect", "v"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = PeerServiceClient::connect(format!("http://{}", a.admin_addr))
            .await
            .unwrap();
        let bad_mac = vec![0u8; 32];
        let e = c
            .raft(pb::RaftRequest {
                from: 1,
                messages: vec![0xff; 64],
                mac: bad_mac.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        let e = c
            .propose(pb::ProposeRequest {
                from: 1,
                proposal: b"{not json".to_vec(),
                mac: bad_mac.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        for mac in [bad_mac.clone(), Vec::new()] {
            let e = c
                .replica_usage(pb::ReplicaUsageRequest {
                    from: 1,
                    volume_ids: vec![id.clone()],
                    mac,
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        }
    });
    // Still serving.
    assert_eq!(
        a.ctl_json(&["volume", "inspect", "v"])["replicas"][0]["allocated_bytes"],
        0
    );
}
