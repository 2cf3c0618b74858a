//! Cluster domains and the latency gate, with inter-node delay injected by userspace
//! proxies on every node's data path (the RTT probes and replication both cross them).
//! Every node's proxy adds the same one-way delay, so every node pair's RTT grows by twice
//! that delay.

use std::time::{Duration, Instant};

use tandem_tests::{Daemon, DaemonOpts};

fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

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
    // About 2 ms RTT: a volume spanning both domains is created.
    let nodes = two_domains(Duration::from_millis(1));
    let a = &nodes[0];
    let pair = measured_pair(a);
    let p50 = pair["p50_us"].as_u64().unwrap();
    assert!(
        (1_000..=3_000).contains(&p50),
        "measured RTT must be within 1 ms of the injected 2 ms: {pair}"
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
