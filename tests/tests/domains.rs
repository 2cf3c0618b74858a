//! Cluster domains and the latency gate, with inter-node delay injected by userspace
//! proxies on every node's data path (the RTT probes and replication both cross them).
//! Every node's proxy adds the same one-way delay, so every node pair's RTT grows by twice
//! that delay.

use std::time::{Duration, Instant};

use tandem_tests::{eventually, Daemon, DaemonOpts};

/// Two domains (east: a, b; west: c) with every link delayed by `one_way`.
fn two_domains(one_way: Duration) -> Vec<Daemon> {
    let opts = DaemonOpts {
        data_proxy: true,
        ..Default::default()
    };
    let mut a_opts = opts.clone();
    a_opts.extra_args = vec!["--domain".into(), "east".into()];
    let a = Daemon::start(a_opts);
    a.proxy.as_ref().unwrap().set_delay(one_way);
    let b = Daemon::join_with(&a, &["--domain", "east"], opts.clone());
    b.proxy.as_ref().unwrap().set_delay(one_way);
    let c = Daemon::join_with(&a, &["--domain", "west"], opts);
    c.proxy.as_ref().unwrap().set_delay(one_way);
    vec![a, b, c]
}

/// The measured east-west pair once every direction has published enough samples.
fn measured_pair(d: &Daemon) -> serde_json::Value {
    eventually(Duration::from_secs(40), "east-west RTT samples", || {
        let l = d.ctl_json(&["cluster", "latency"]);
        let pair = l["domains"].as_array()?.first()?.clone();
        (pair["pairs"].as_u64()? >= 4 && pair["samples"].as_u64()? >= 12).then_some(pair)
    })
}

#[test]
fn metro_sync_is_allowed_at_2ms_and_refused_at_15ms_with_the_measured_figure() {
    let _serial = tandem_tests::serial();
    // About 2 ms RTT: a volume spanning both domains is created.
    let nodes = two_domains(Duration::from_millis(1));
    let a = &nodes[0];
    let pair = measured_pair(a);
    let p50 = pair["p50_us"].as_u64().unwrap();
    // The proxy adds 2 ms; loopback and the relay's threads add scheduling delay on a
    // busy 2-core machine (each chunk wakes a reader, a writer and the writer's timer), so
    // allow 1 ms below and 4 ms above: still far below the 10 ms gate. Unloaded runs land
    // within 0.5 ms; with the other tests of this file running beside it (before they were
    // serialized, `tandem_tests::serial`), up to 4.2 ms was seen.
    assert!(
        (1_000..=6_000).contains(&p50),
        "measured RTT must be close to the injected 2 ms: {pair}"
    );
    assert_eq!(pair["sync_allowed"], true, "{pair}");
    let human = a.ctl_ok(&["cluster", "latency"]);
    assert!(
        human.contains("METRO SYNC") && human.contains("allowed"),
        "{human}"
    );
    let v = a.ctl_json(&[
        "volume", "create", "metro", "--size", "64MiB", "--repl", "2",
    ]);
    let c_name = nodes[2].ctl_json(&["status"])["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node_id"] == c_name.as_str()),
        "placement spreads over both domains, so west holds a replica: {v}"
    );
    assert!(
        a.metrics().contains("tandem_peer_rtt_seconds"),
        "RTT is exported as metrics"
    );
    // The RTT rises above the limit at run time: policy `alert` raises an alert and keeps
    // replicating synchronously.
    a.ctl_ok(&["volume", "attach", "metro"]);
    for n in &nodes {
        n.proxy
            .as_ref()
            .unwrap()
            .set_delay(Duration::from_micros(7_500));
    }
    let alert = eventually(Duration::from_secs(60), "an rtt-exceeded alert", || {
        let alerts = a.ctl_json(&["alerts", "show"]);
        alerts
            .as_array()?
            .iter()
            .find(|al| al["kind"] == "rtt-exceeded")
            .cloned()
    });
    let msg = alert["message"].as_str().unwrap();
    assert!(
        msg.contains("east and west") && msg.contains("10.0 ms sync limit"),
        "{msg}"
    );
    tandem_tests::qemu_io_ok(
        &a.nbd_uri("metro"),
        &["write -P 0x5 0 64k", "read -P 0x5 0 64k"],
    );
    drop(nodes);

    // About 15 ms RTT: the same create is refused with the measured figure; a volume kept
    // inside one domain is created anyway.
    let nodes = two_domains(Duration::from_micros(7_500));
    let a = &nodes[0];
    let pair = measured_pair(a);
    let p50 = pair["p50_us"].as_u64().unwrap();
    assert!(
        (12_000..=18_000).contains(&p50),
        "measured RTT must be within 20% of the injected 15 ms: {pair}"
    );
    assert_eq!(pair["sync_allowed"], false, "{pair}");
    let o = a.ctl(&[
        "volume", "create", "metro", "--size", "64MiB", "--repl", "2",
    ]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    let line = o.stderr.trim_end();
    assert!(!line.contains('\n'), "one line: {line}");
    for want in ["east and west", "p50", "p99", "10.0 ms limit"] {
        assert!(
            line.contains(want),
            "the refusal must name '{want}': {line}"
        );
    }
    let local = a.ctl_json(&[
        "volume",
        "create",
        "local",
        "--size",
        "64MiB",
        "--repl",
        "2",
        "--domains",
        "east",
    ]);
    assert_eq!(local["replicas"].as_array().unwrap().len(), 2, "{local}");
}

fn chunk_acked(uri: &str, i: u64) -> bool {
    let o = tandem_tests::qemu_io(uri, &[&format!("write -P {} {}M 1M", i + 1, i), "flush"]);
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.status.success() && !t.contains("failed") && !t.contains("error")
}

fn volume_states(d: &Daemon, vol: &str) -> Vec<String> {
    d.ctl_json(&["volume", "inspect", vol])["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap().to_string())
        .collect()
}

/// The runbook of docs/operations.md, executed: site east is lost while a writer runs;
/// the operator deactivates it and attaches the volume in west with every acknowledged
/// write (RPO 0); east returns, is activated, resyncs, and the volume moves back.
#[test]
fn unplanned_site_loss_failover_and_failback_with_a_witness() {
    let _serial = tandem_tests::serial();
    let dom = |d: &str| vec!["--domain".to_string(), d.to_string()];
    let a = Daemon::start(DaemonOpts {
        extra_args: dom("east"),
        ..Default::default()
    });
    // No --kvdb anywhere: the leader places the voters by topology, one in east, one in
    // west and the witness, so that losing either site keeps the raft majority.
    let w = Daemon::join(&a, &["--witness", "--domain", "witness"]);
    let b = Daemon::join(&a, &["--domain", "east"]);
    let c = Daemon::join(&a, &["--domain", "west"]);
    let d = Daemon::join(&a, &["--domain", "west"]);
    let mut nodes = [a, b, c, d, w];
    let inspect = eventually(
        Duration::from_secs(30),
        "voters spread over east, west and the witness",
        || {
            let i = nodes[0].ctl_json(&["cluster", "inspect"]);
            let domain_of = |id: &serde_json::Value| {
                i["nodes"]
                    .as_array()?
                    .iter()
                    .find(|n| n["id"] == *id)
                    .and_then(|n| n["domain"].as_str().map(str::to_string))
            };
            let voters = i["voters"].as_array()?;
            let mut domains: Vec<String> = voters.iter().filter_map(domain_of).collect();
            domains.sort();
            (voters.len() == 3 && domains == ["east", "west", "witness"]).then_some(i)
        },
    );
    assert_eq!(
        inspect["learners"].as_array().unwrap().len(),
        2,
        "{inspect}"
    );
    assert!(
        inspect["warnings"].as_array().is_none_or(|w| w.is_empty()),
        "no single site holds the raft majority: {inspect}"
    );
    measured_pair(&nodes[0]);

    nodes[0].ctl_ok(&["volume", "create", "dr", "--size", "64MiB", "--repl", "2"]);
    let uri_a = nodes[0].ctl_json(&["volume", "attach", "dr"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let mut acked = Vec::new();
    for i in 0..8u64 {
        if chunk_acked(&uri_a, i) {
            acked.push(i);
        }
    }
    assert_eq!(acked.len(), 8);
    let shown = nodes[2].ctl_ok(&["cluster", "domains", "show"]);
    assert!(shown.contains("dr (InSync)"), "{shown}");

    // East is lost: both of its nodes die.
    nodes[0].kill9();
    nodes[1].kill9();
    let c = &nodes[2];
    eventually(Duration::from_secs(40), "deactivate east from west", || {
        (c.ctl(&["cluster", "domains", "deactivate", "east"]).code == 0).then_some(())
    });
    let doms = c.ctl_json(&["cluster", "domains", "show"]);
    let east = doms
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "east")
        .unwrap();
    assert_eq!(east["active"], false, "{doms}");
    let v = c.ctl_json(&["volume", "attach", "dr"]);
    assert_eq!(v["state"], "attached");
    let uri_c = c.nbd_uri("dr");
    for &i in &acked {
        tandem_tests::qemu_io_ok(&uri_c, &[&format!("read -P {} {}M 1M", i + 1, i)]);
    }
    assert!(
        chunk_acked(&uri_c, 20),
        "west serves writes alone (RPO 0 from here)"
    );
    let ver = c.ctl_json(&["volume", "verify", "dr"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
    // An inactive domain cannot take the volume.
    nodes[0].spawn();
    nodes[1].spawn();
    let o = nodes[0].ctl(&["volume", "attach", "dr", "--force"]);
    assert_ne!(
        o.code, 0,
        "a node of an inactive domain must not attach: {}",
        o.stdout
    );

    // Failback: activate east (after its RTT is measured again), let it resync, move back.
    let c = &nodes[2];
    eventually(Duration::from_secs(60), "activate east", || {
        (c.ctl(&["cluster", "domains", "activate", "east"]).code == 0).then_some(())
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = volume_states(c, "dr");
        if s.len() == 2 && s.iter().all(|s| s == "in-sync") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east replica not in sync: {s:?}\n{}\ncoordinator log tail:\n{}",
            c.ctl_ok(&["volume", "inspect", "dr"]),
            c.log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let ver = c.ctl_json(&["volume", "verify", "dr"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
    c.ctl_ok(&["volume", "detach", "dr"]);
    let a = &nodes[0];
    a.ctl_ok(&["volume", "attach", "dr"]);
    let uri_a = a.nbd_uri("dr");
    for &i in &acked {
        tandem_tests::qemu_io_ok(&uri_a, &[&format!("read -P {} {}M 1M", i + 1, i)]);
    }
    tandem_tests::qemu_io_ok(&uri_a, &["read -P 21 20M 1M"]);
    let ver = a.ctl_json(&["volume", "verify", "dr"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
}

/// Policy `degrade`: when the east-west RTT goes above the limit, the coordinator's far
/// (west) replica turns async with its lag in `volume inspect`; when the RTT recovers it
/// resyncs and is in sync again, and the replicas verify clean.
#[test]
fn degrade_turns_the_far_replica_async_and_back_in_sync() {
    let _serial = tandem_tests::serial();
    let opts = DaemonOpts {
        data_proxy: true,
        ..Default::default()
    };
    let policy = ["--on-rtt-exceeded", "degrade"];
    let mut a_opts = opts.clone();
    a_opts.extra_args = ["--domain", "east", "--on-rtt-exceeded", "degrade"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let a = Daemon::start(a_opts);
    let b = Daemon::join_with(
        &a,
        &["--domain", "east", policy[0], policy[1]],
        opts.clone(),
    );
    let c = Daemon::join_with(&a, &["--domain", "west", policy[0], policy[1]], opts);
    let nodes = [a, b, c];
    for n in &nodes {
        n.proxy
            .as_ref()
            .unwrap()
            .set_delay(Duration::from_millis(1));
    }
    let a = &nodes[0];
    measured_pair(a);
    a.ctl_ok(&[
        "volume", "create", "metro", "--size", "64MiB", "--repl", "2",
    ]);
    let uri = a.ctl_json(&["volume", "attach", "metro"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let west = nodes[2].ctl_json(&["status"])["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    let replica = |d: &Daemon| -> serde_json::Value {
        d.ctl_json(&["volume", "inspect", "metro"])["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node_id"] == west.as_str())
            .cloned()
            .expect("a west replica")
    };
    assert_eq!(replica(a)["state"], "in-sync");
    tandem_tests::qemu_io_ok(&uri, &["write -P 0x11 0 1M", "flush"]);

    for n in &nodes {
        n.proxy
            .as_ref()
            .unwrap()
            .set_delay(Duration::from_micros(7_500));
    }
    let r = eventually(Duration::from_secs(90), "west replica async", || {
        let r = replica(a);
        (r["state"] == "async").then_some(r)
    });
    assert!(r["async_lag_bytes"].is_u64(), "{r}");
    assert!(r["async_lag_seconds"].is_number(), "{r}");
    a.wait_alert(&["replica-async"]);
    tandem_tests::qemu_io_ok(&uri, &["write -P 0x22 1M 2M", "flush"]);
    assert!(
        a.metrics().contains("tandem_replica_async_lag_seconds"),
        "lag is exported as metrics"
    );

    for n in &nodes {
        n.proxy
            .as_ref()
            .unwrap()
            .set_delay(Duration::from_millis(1));
    }
    eventually(Duration::from_secs(90), "west replica in sync", || {
        (replica(a)["state"] == "in-sync").then_some(())
    });
    a.wait_alert(&["replica-resync"]);
    let ver = a.ctl_json(&["volume", "verify", "metro"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
    tandem_tests::qemu_io_ok(&uri, &["read -P 0x11 0 1M", "read -P 0x22 1M 2M"]);
}

/// An explicit async replica (`--async-domains`): a far site beyond the sync RTT limit
/// gets an async replica on purpose (never gated, acked without it). When the primary
/// site is lost, the operator promotes it (`domains deactivate --promote-async`): every
/// write it had received is there, and the lost site returns as the async one.
#[test]
fn explicit_async_replica_then_failover_by_promotion() {
    let _serial = tandem_tests::serial();
    let opts = DaemonOpts {
        data_proxy: true,
        ..Default::default()
    };
    let with = |d: &str, extra: &[&str]| {
        let mut o = opts.clone();
        o.extra_args = ["--domain", d]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        o
    };
    let one_way = Duration::from_millis(8);
    let a = Daemon::start(with("east", &[]));
    a.proxy.as_ref().unwrap().set_delay(one_way);
    // Voters: a (east), the witness, c (west).
    let w = Daemon::join_with(&a, &["--witness"], with("witness", &[]));
    w.proxy.as_ref().unwrap().set_delay(one_way);
    let c = Daemon::join_with(&a, &["--kvdb"], with("west", &[]));
    c.proxy.as_ref().unwrap().set_delay(one_way);
    let mut nodes = [a, c, w];
    let pair = eventually(Duration::from_secs(40), "east-west RTT samples", || {
        let l = nodes[0].ctl_json(&["cluster", "latency"]);
        l["domains"]
            .as_array()?
            .iter()
            .find(|p| {
                let names = [p["from"].as_str(), p["to"].as_str()];
                names.contains(&Some("east")) && names.contains(&Some("west"))
            })
            .filter(|p| p["samples"].as_u64().unwrap_or(0) >= 6)
            .cloned()
    });
    assert_eq!(pair["sync_allowed"], false, "16 ms is above 10 ms: {pair}");

    // Synchronous across the pair is refused; async by choice is not gated.
    let o = nodes[0].ctl(&[
        "volume",
        "create",
        "dr",
        "--size",
        "64MiB",
        "--repl",
        "2",
        "--domains",
        "east,west",
    ]);
    assert_ne!(o.code, 0, "{}", o.stdout);
    let v = nodes[0].ctl_json(&[
        "volume",
        "create",
        "dr",
        "--size",
        "64MiB",
        "--repl",
        "2",
        "--domains",
        "east,west",
        "--async-domains",
        "west",
    ]);
    assert_eq!(v["async_domains"], serde_json::json!(["west"]), "{v}");
    let uri_a = nodes[0].ctl_json(&["volume", "attach", "dr"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let west_name = nodes[1].ctl_json(&["status"])["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    let west_state = |d: &Daemon| -> (String, u64) {
        let v = d.ctl_json(&["volume", "inspect", "dr"]);
        let r = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node_id"] == west_name.as_str())
            .cloned()
            .unwrap();
        (
            r["state"].as_str().unwrap().to_string(),
            r["async_lag_bytes"].as_u64().unwrap_or(0),
        )
    };
    // Seen once in a CI run: still not async after 60 s. On a timeout, show why.
    let t0 = std::time::Instant::now();
    while west_state(&nodes[0]).0 != "async" {
        if t0.elapsed() > Duration::from_secs(60) {
            let log = nodes[0].log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            panic!(
                "timed out waiting for west replica async: {}\ncoordinator log (last 80 lines):\n{}",
                nodes[0].ctl_json(&["volume", "inspect", "dr"]),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for i in 0..8u64 {
        assert!(chunk_acked(&uri_a, i), "chunk {i}");
    }
    // Idle: the async replica catches up (lag 0).
    eventually(Duration::from_secs(30), "async lag drained", || {
        let (s, lag) = west_state(&nodes[0]);
        (s == "async" && lag == 0).then_some(())
    });

    // East is lost. Deactivating it needs the promotion, said in the error.
    nodes[0].kill9();
    let c = &nodes[1];
    let o = eventually(
        Duration::from_secs(40),
        "deactivate east is answered",
        || {
            let o = c.ctl(&["cluster", "domains", "deactivate", "east"]);
            (o.stderr.contains("promote-async")).then_some(o)
        },
    );
    assert_ne!(o.code, 0);
    c.ctl_ok(&[
        "cluster",
        "domains",
        "deactivate",
        "east",
        "--promote-async",
    ]);
    let alerts = c.ctl_ok(&["alerts", "show"]);
    assert!(alerts.contains("async-promoted"), "{alerts}");
    let v = c.ctl_json(&["volume", "attach", "dr"]);
    assert_eq!(v["state"], "attached");
    assert_eq!(v["async_domains"], serde_json::json!(["east"]), "{v}");
    let uri_c = c.nbd_uri("dr");
    for i in 0..8u64 {
        tandem_tests::qemu_io_ok(&uri_c, &[&format!("read -P {} {}M 1M", i + 1, i)]);
    }
    assert!(chunk_acked(&uri_c, 20));
    let ver = c.ctl_json(&["volume", "verify", "dr"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");

    // East comes back as the async site: activation is not gated, its replica resyncs
    // from west and turns async.
    nodes[0].spawn();
    let c = &nodes[1];
    eventually(Duration::from_secs(60), "activate east", || {
        (c.ctl(&["cluster", "domains", "activate", "east"]).code == 0).then_some(())
    });
    let east_name = nodes[0].ctl_json(&["status"])["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(
        Duration::from_secs(90),
        "east replica async after resync",
        || {
            let v = c.ctl_json(&["volume", "inspect", "dr"]);
            let r = v["replicas"]
                .as_array()?
                .iter()
                .find(|r| r["node_id"] == east_name.as_str())?
                .clone();
            (r["state"] == "async").then_some(())
        },
    );
    tandem_tests::qemu_io_ok(&uri_c, &["read -P 21 20M 1M"]);
}
