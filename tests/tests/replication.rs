//! Synchronous replication through real processes: three tandemd nodes on loopback, NBD
//! clients (qemu-io), SIGKILL, SIGSTOP, and corruption behind a replica's back.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use tandem_tests::{eventually, qemu_io, qemu_io_ok, Daemon, DaemonOpts};

fn cluster3() -> Vec<Daemon> {
    let a = Daemon::start(DaemonOpts::default());
    let b = Daemon::join(&a, &[]);
    let c = Daemon::join(&a, &[]);
    eventually(Duration::from_secs(20), "three nodes", || {
        (c.ctl_json(&["cluster", "list"]).as_array()?.len() == 3).then_some(())
    });
    vec![a, b, c]
}

fn node_name(d: &Daemon) -> String {
    d.ctl_json(&["status"])["node_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn replica_states(d: &Daemon, vol: &str) -> Vec<(String, String)> {
    d.ctl_json(&["volume", "inspect", vol])["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `volume verify` reports identical in-sync replicas, at least `min_in_sync` of them.
fn verify_clean(d: &Daemon, vol: &str, min_in_sync: usize) {
    let v = d.ctl_json(&["volume", "verify", vol]);
    assert_eq!(v["mismatched_blocks"], 0, "replicas must be identical: {v}");
    assert!(
        v["in_sync_nodes"].as_array().unwrap().len() >= min_in_sync,
        "in-sync replicas compared: {v}"
    );
    assert!(v["blocks_compared"].as_u64().unwrap() > 0);
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes 1 MiB chunk `i` with pattern `i+1` as its own qemu-io run; true when acked.
fn write_chunk(uri: &str, i: u64) -> bool {
    let o = qemu_io(uri, &[&format!("write -P {} {}M 1M", i + 1, i), "flush"]);
    let t = text(&o);
    o.status.success() && !t.contains("failed") && !t.contains("error")
}

/// Invariant 1: every acknowledged write survives the loss of a replica mid-stream; the
/// replica is ejected, comes back by itself and is resynced to identical bytes.
#[test]
fn rf3_writes_survive_a_replica_kill_and_the_replica_resyncs_by_itself() {
    let mut nodes = cluster3();
    let a = &nodes[0];
    a.ctl_ok(&["volume", "create", "r3", "--size", "64MiB", "--repl", "3"]);
    let uri = a.ctl_json(&["volume", "attach", "r3"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(
        &uri,
        &["write -P 0xa1 40M 4M", "flush", "read -P 0xa1 40M 4M"],
    );
    verify_clean(a, "r3", 3);

    let victim_name = node_name(&nodes[2]);
    let mut acked = Vec::new();
    for i in 0..24u64 {
        if i == 8 {
            nodes[2].kill9();
        }
        if write_chunk(&uri, i) {
            acked.push(i);
        }
    }
    assert_eq!(
        acked.len(),
        24,
        "losing one of three replicas must not fail writes"
    );
    let a = &nodes[0];
    for &i in &acked {
        qemu_io_ok(&uri, &[&format!("read -P {} {}M 1M", i + 1, i)]);
    }
    let states = replica_states(a, "r3");
    let victim = states.iter().find(|(n, _)| *n == victim_name).unwrap();
    assert!(victim.1.starts_with("out-of-sync"), "ejected: {states:?}");
    a.wait_alert(&["replica-ejected"]);

    // The node returns; the coordinator resyncs it without any operator action.
    nodes[2].spawn();
    let a = &nodes[0];
    eventually(
        Duration::from_secs(60),
        "the replica to be in-sync again",
        || {
            replica_states(a, "r3")
                .iter()
                .all(|(_, s)| s == "in-sync")
                .then_some(())
        },
    );
    verify_clean(a, "r3", 3);
    for &i in &acked {
        qemu_io_ok(&uri, &[&format!("read -P {} {}M 1M", i + 1, i)]);
    }
}

/// Invariants 1, 3 and 5: after the coordinator dies, the volume moves to another node with
/// every acked write; a paused old coordinator that wakes up cannot get a write accepted.
#[test]
fn coordinator_failover_keeps_acked_data_and_a_zombie_coordinator_is_fenced() {
    let mut nodes = cluster3();
    nodes[0].ctl_ok(&["volume", "create", "db", "--size", "64MiB", "--repl", "3"]);
    nodes[0].ctl_ok(&["volume", "attach", "db"]);
    let uri_a = nodes[0].nbd_uri("db");
    for i in 0..6u64 {
        assert!(write_chunk(&uri_a, i), "write {i} before the crash");
    }
    nodes[0].kill9();

    // Failover: attach on b, taking over from the dead node.
    let b = &nodes[1];
    let out = eventually(Duration::from_secs(30), "attach on b", || {
        let o = b.ctl(&["-j", "volume", "attach", "db", "--force"]);
        (o.code == 0).then_some(o.stdout)
    });
    assert!(out.contains("\"attached\""), "{out}");
    let uri_b = b.nbd_uri("db");
    for i in 0..6u64 {
        qemu_io_ok(&uri_b, &[&format!("read -P {} {}M 1M", i + 1, i)]);
    }
    verify_clean(b, "db", 2);

    // The old coordinator returns; its replica resyncs.
    nodes[0].spawn();
    let b = &nodes[1];
    eventually(Duration::from_secs(60), "all replicas in-sync", || {
        replica_states(b, "db")
            .iter()
            .all(|(_, s)| s == "in-sync")
            .then_some(())
    });

    // Zombie: pause the coordinator (b), take the volume over on c, resume b and try to
    // write through b. Nothing may be acked, and c must not see the zombie's bytes.
    let c_uri = nodes[2].nbd_uri("db");
    let b_pid = nodes[1].pid();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(b_pid as i32, libc::SIGSTOP) };
    let c = &nodes[2];
    eventually(Duration::from_secs(40), "takeover on c", || {
        let o = c.ctl(&["-j", "volume", "attach", "db", "--force"]);
        (o.code == 0).then_some(())
    });
    // SAFETY: as above.
    unsafe { libc::kill(b_pid as i32, libc::SIGCONT) };
    let zombie = qemu_io(&uri_b, &["write -P 0xee 0 1M", "flush"]);
    let zt = text(&zombie);
    assert!(
        zt.contains("failed") || zt.contains("error") || !zombie.status.success(),
        "a fenced coordinator must not ack a write: {zt}"
    );
    qemu_io_ok(&c_uri, &["read -P 1 0 1M"]);
    verify_clean(&nodes[2], "db", 2);
}

/// Invariant 4: a corrupted block on one replica is never returned; it is read from a good
/// replica, returned, and rewritten.
#[test]
fn corrupted_block_on_one_replica_is_repaired_on_read() {
    let nodes = cluster3();
    let a = &nodes[0];
    // --nodes restricts placement to one node, which cannot hold two replicas: refused.
    let o = a.ctl(&[
        "volume",
        "create",
        "bad",
        "--size",
        "16MiB",
        "--repl",
        "2",
        "--nodes",
        &node_name(a),
    ]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("needs 2 storage nodes"), "{}", o.stderr);
    a.ctl_ok(&["volume", "create", "rep", "--size", "16MiB", "--repl", "2"]);
    let uri = a.ctl_json(&["volume", "attach", "rep"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(&uri, &["write -P 0x42 0 64k", "flush"]);
    // Corrupt block 2 of the local (coordinator) replica behind the daemon's back.
    let data = a.data_file("rep");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
        .unwrap();
    f.write_all_at(&[0xde, 0xad, 0xbe, 0xef], 8192 + 10)
        .unwrap();
    f.sync_all().unwrap();
    qemu_io_ok(&uri, &["read -P 0x42 0 64k"]);
    a.wait_alert(&["read-repair"]);
    // The bad block was rewritten: verify is clean and the on-disk bytes are good again.
    verify_clean(a, "rep", 2);
    let mut buf = [0u8; 4];
    f.read_exact_at(&mut buf, 8192 + 10).unwrap();
    assert_eq!(buf, [0x42; 4], "the bad block was rewritten in place");

    // A bad block on the other replica is never read (the local one serves reads): verify
    // finds it, and `--repair` (a scrub) rewrites it from the good copy.
    let other_name = replica_states(a, "rep")
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| *n != node_name(a))
        .expect("a second replica");
    let other = nodes
        .iter()
        .find(|d| node_name(d) == other_name)
        .expect("the second replica's daemon");
    let g = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(other.data_file("rep"))
        .unwrap();
    g.write_all_at(&[0x13], 4096 * 5 + 7).unwrap();
    g.sync_all().unwrap();
    let o = a.ctl(&["volume", "verify", "rep"]);
    assert_eq!(
        o.code, 1,
        "a corrupt block is a mismatch: {}{}",
        o.stdout, o.stderr
    );
    assert!(o.stdout.contains("Mismatched blocks: 1"), "{}", o.stdout);
    let v = a.ctl_json(&["volume", "verify", "rep", "--repair"]);
    assert_eq!(v["mismatched_blocks"], 1, "{v}");
    assert_eq!(v["repaired_blocks"], 1, "{v}");
    verify_clean(a, "rep", 2);
    g.read_exact_at(&mut buf[..1], 4096 * 5 + 7).unwrap();
    assert_eq!(buf[0], 0x42, "the scrub rewrote the bad block in place");
}

/// Raising the replication factor is a full copy to newly placed replicas, with progress,
/// while the volume stays attached and its clients keep their data.
#[test]
fn raising_the_replication_factor_resyncs_new_replicas_and_shows_progress() {
    let nodes = cluster3();
    let a = &nodes[0];
    a.ctl_ok(&["volume", "create", "grow", "--size", "64MiB"]);
    let uri = a.ctl_json(&["volume", "attach", "grow"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(
        &uri,
        &["write -P 0x61 0 16M", "write -P 0x62 50M 2M", "flush"],
    );
    let v = a.ctl_json(&["volume", "update", "grow", "--repl", "3", "--wait"]);
    assert_eq!(v["repl"], 3);
    let states = replica_states(a, "grow");
    assert_eq!(states.len(), 3);
    assert!(states.iter().all(|(_, s)| s == "in-sync"), "{states:?}");
    verify_clean(a, "grow", 3);
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x61 0 16M",
            "read -P 0x62 50M 2M",
            "write -P 0x63 20M 1M",
        ],
    );
    verify_clean(a, "grow", 3);
    let m = a.metrics();
    assert!(
        m.contains("tandem_volume_replicas{state=\"in-sync\",volume=\"grow\"} 3"),
        "replica states are exported: {}",
        m.lines()
            .filter(|l| l.contains("grow"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Lowering keeps the data and drops a replica.
    a.ctl_ok(&["volume", "update", "grow", "--repl", "2"]);
    assert_eq!(replica_states(a, "grow").len(), 2);
    qemu_io_ok(&uri, &["read -P 0x63 20M 1M"]);
    verify_clean(a, "grow", 2);
    // Growing a replicated, attached volume: new connections see the new size everywhere.
    a.ctl_ok(&["volume", "update", "grow", "--size", "96MiB"]);
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x64 90M 2M",
            "read -P 0x64 90M 2M",
            "read -P 0x63 20M 1M",
        ],
    );
    verify_clean(a, "grow", 2);
}

/// `--worker-threads 1` (a current-thread runtime on every node) serves replicated I/O with
/// the same guarantees: concurrent writes, FUA, flushes and a kill of a replica, then
/// identical replicas.
#[test]
fn rf3_on_current_thread_runtimes_writes_flushes_and_resyncs() {
    let one = DaemonOpts {
        extra_args: vec!["--worker-threads".into(), "1".into()],
        ..Default::default()
    };
    let a = Daemon::start(one);
    let b = Daemon::join(&a, &["--worker-threads", "1"]);
    let mut c = Daemon::join(&a, &["--worker-threads", "1"]);
    a.ctl_ok(&["volume", "create", "ct", "--size", "64MiB", "--repl", "3"]);
    a.ctl_ok(&["volume", "attach", "ct"]);
    let uri = a.nbd_uri("ct");
    // qemu-io's aio commands keep several writes in flight at once.
    qemu_io_ok(
        &uri,
        &[
            "aio_write -P 0x11 0 1M",
            "aio_write -P 0x22 1M 1M",
            "aio_write -P 0x33 2M 4k",
            "aio_flush",
            "write -f -P 0x44 3M 64k",
            "flush",
        ],
    );
    c.kill9();
    qemu_io_ok(&uri, &["write -P 0x55 4M 1M", "flush"]);
    c.spawn();
    eventually(
        Duration::from_secs(60),
        "the killed replica in-sync again",
        || {
            replica_states(&a, "ct")
                .iter()
                .all(|(_, s)| s == "in-sync")
                .then_some(())
        },
    );
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 1M",
            "read -P 0x33 2M 4k",
            "read -P 0x44 3M 64k",
            "read -P 0x55 4M 1M",
        ],
    );
    verify_clean(&a, "ct", 3);
    drop(b);
}

/// `volume inspect` shows where each replica lives (node, domain, zone, rack) and what it
/// holds as its own node reports it, asked from any node; a replica node that does not
/// answer shows as unknown, and inspect still answers.
#[test]
fn inspect_shows_where_each_replica_lives_and_what_it_holds() {
    let a = Daemon::start(DaemonOpts {
        extra_args: ["--zone", "z1", "--rack", "r1"].map(String::from).to_vec(),
        ..Default::default()
    });
    let b = Daemon::join(&a, &["--zone", "z2", "--rack", "r2"]);
    let mut c = Daemon::join(&a, &["--zone", "z3", "--rack", "r3"]);
    let nodes = eventually(Duration::from_secs(20), "three nodes", || {
        let l = c.ctl_json(&["cluster", "list"]);
        (l.as_array()?.len() == 3).then_some(l)
    });
    a.ctl_ok(&[
        "volume", "create", "where", "--size", "64MiB", "--repl", "3",
    ]);
    let uri = a.ctl_json(&["volume", "attach", "where"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_io_ok(&uri, &["write -P 0x11 0 8M", "flush"]);

    // From c, which holds a replica and does not coordinate: every replica reports 8 MiB.
    let reps = eventually(Duration::from_secs(20), "every replica reported", || {
        let v = c.ctl_json(&["volume", "inspect", "where"]);
        let reps = v["replicas"].as_array()?.clone();
        reps.iter()
            .all(|r| r["allocated_bytes"].as_u64() == Some(8 << 20))
            .then_some(reps)
    });
    assert_eq!(reps.len(), 3);
    for n in nodes.as_array().unwrap() {
        let r = reps
            .iter()
            .find(|r| r["node_id"] == n["name"])
            .unwrap_or_else(|| panic!("a replica on {n}: {reps:?}"));
        for k in ["domain", "zone", "rack"] {
            assert_eq!(r[k], n[k], "{k} of the replica on {}", n["name"]);
        }
    }
    let zones: Vec<&str> = reps.iter().map(|r| r["zone"].as_str().unwrap()).collect();
    assert!(zones.contains(&"z1") && zones.contains(&"z3"), "{zones:?}");
    let text = c.ctl_ok(&["volume", "inspect", "where"]);
    assert!(text.contains("ZONE") && text.contains("r2"), "{text}");
    assert!(!text.contains("unknown"), "{text}");
    // b holds a replica too; the volume's own Allocated is its replica's.
    assert_eq!(
        b.ctl_json(&["volume", "inspect", "where"])["allocated_bytes"],
        8 << 20
    );

    // c stops answering: its replica's allocation is unknown, the others' still show.
    let c_name = c.ctl_json(&["status"])["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    c.kill9();
    let started = std::time::Instant::now();
    let v = a.ctl_json(&["volume", "inspect", "where"]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "inspect waited {:?} for a dead node",
        started.elapsed()
    );
    for r in v["replicas"].as_array().unwrap() {
        if r["node_id"] == c_name.as_str() {
            assert!(r["allocated_bytes"].is_null(), "{r}");
        } else {
            assert_eq!(r["allocated_bytes"], 8 << 20, "{r}");
        }
    }
    assert!(a
        .ctl_ok(&["volume", "inspect", "where"])
        .contains("unknown (node did not answer)"));
}
