//! Two sites and a witness, each in its own network namespace (`tandem_tests::netns`):
//! traffic inside a site is direct, and every byte between sites crosses a relay that adds
//! the injected delay in both directions, or is cut. Raft messages, forwarded proposals,
//! joins, replication and RTT pings all cross it; NBD and metrics stay inside a site.
//!
//! Needs root and iproute2 (`ip netns`), plus qemu-io.
//!
//! Topology: domain A (a1, a2), domain B (b1, b2), witness site W (w). All five are raft
//! voters (`--kvdb`, `--witness`), so A alone is a minority (2 of 5) and B with the witness
//! a majority (3 of 5).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tandem_tests::netns::{in_ns, qemu_io_outcome, QemuIo, Sites};
use tandem_tests::{eventually, Daemon};

/// Metro distance: inside the 10 ms sync limit.
const METRO_RTT: Duration = Duration::from_millis(2);
/// Too far for synchronous replication.
const FAR_RTT: Duration = Duration::from_millis(15);
/// The tolerance on the measured RTT: 20 %, or 1 ms if that is more.
fn rtt_tolerance_us(rtt: Duration) -> u64 {
    (rtt.as_micros() as u64 / 5).max(1_000)
}
/// One qemu-io call may take this long before it counts as blocked. Above the
/// coordinator's 10 s wait for a lost raft majority, so a request that fails is seen failing.
const CLIENT_LIMIT: Duration = Duration::from_secs(15);
/// The writer's limit per write (before the cut a write takes tens of milliseconds): short,
/// so it keeps issuing new writes on A all through B's takeover.
const WRITER_LIMIT: Duration = Duration::from_secs(4);
/// Chunk size of the writer.
const CHUNK_BYTES: u64 = 64 << 10;

/// The sites and the nodes, in the order a1, a2, b1, b2, w. Nodes are declared first so
/// they are killed before the namespaces are deleted.
struct Cluster {
    nodes: Vec<Daemon>,
    sites: Sites,
}

impl Cluster {
    fn start(rtt: Duration) -> Cluster {
        let sites = Sites::new(&["A", "B", "W"]);
        sites.set_rtt_everywhere(rtt);
        let a1 = sites.node("A", "a1", None, &[]);
        let mut nodes = vec![
            sites.node("A", "a2", Some(&a1), &["--kvdb"]),
            sites.node("B", "b1", Some(&a1), &["--kvdb"]),
            sites.node("B", "b2", Some(&a1), &["--kvdb"]),
            sites.node("W", "w", Some(&a1), &["--witness"]),
        ];
        nodes.insert(0, a1);
        let c = Cluster { nodes, sites };
        let inspect = c.a1().ctl_json(&["cluster", "inspect"]);
        assert_eq!(
            inspect["voters"].as_array().map(Vec::len),
            Some(5),
            "every node is a voter: {inspect}"
        );
        c
    }

    fn a1(&self) -> &Daemon {
        &self.nodes[0]
    }

    fn b1(&self) -> &Daemon {
        &self.nodes[2]
    }
}

/// `cluster latency -j` once every A-B node pair (both directions) has published at least
/// `min_samples` samples.
fn latency_when_measured(d: &Daemon, min_samples: u64) -> serde_json::Value {
    eventually(Duration::from_secs(60), "A-B RTT samples", || {
        let l = d.ctl_json(&["cluster", "latency"]);
        let pair = l["domains"].as_array()?.first()?.clone();
        let full = pair["pairs"].as_u64()? >= 8 && pair["samples"].as_u64()? >= 8 * min_samples;
        full.then_some(l)
    })
}

fn site_of(node: &str) -> char {
    node.chars().next().unwrap_or('?').to_ascii_uppercase()
}

/// Every node pair crossing sites measured at least the injected RTT (the relay sleeps at
/// least half of it each way), and every pair inside a site less than that (its traffic is
/// not relayed; a debug-build ping costs 0.2 to 0.7 ms on a busy 2-core machine).
fn assert_only_inter_site_traffic_is_delayed(latency: &serde_json::Value, rtt: Duration) {
    let rtt_us = rtt.as_micros() as u64;
    for p in latency["nodes"].as_array().expect("node pairs") {
        let (from, to) = (p["from"].as_str().unwrap(), p["to"].as_str().unwrap());
        let p50 = p["p50_us"].as_u64().unwrap();
        if site_of(from) == site_of(to) {
            assert!(
                p50 < rtt_us,
                "{from}->{to} is inside one site and must not be delayed: {p}"
            );
        } else {
            assert!(
                p50 >= rtt_us,
                "{from}->{to} crosses sites and must pay the injected {rtt:?}: {p}"
            );
        }
    }
}

fn create_refused_over_grpc(d: &Daemon, name: &str) -> tonic::Status {
    use tandem_proto::admin::volume_service_client::VolumeServiceClient;
    use tandem_proto::admin::CreateVolumeRequest;
    let ns = d.opts.netns.clone().expect("a node in a site");
    let endpoint = format!("http://{}", d.admin_addr);
    // The client's socket must be made inside the node's namespace.
    in_ns(&ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut c = VolumeServiceClient::connect(endpoint)
                .await
                .expect("connect admin API");
            let r = c
                .create_volume(CreateVolumeRequest {
                    name: name.to_string(),
                    size_bytes: 64 << 20,
                    repl: 2,
                    domains: vec!["A".into(), "B".into()],
                    ..Default::default()
                })
                .await;
            r.expect_err("a metro volume at 15 ms must be refused")
        })
    })
}

/// The first number followed by " ms" after `after` in `text`, in microseconds.
fn ms_after(text: &str, after: &str) -> Option<u64> {
    let rest = &text[text.find(after)? + after.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    Some((num.parse::<f64>().ok()? * 1000.0).round() as u64)
}

/// The latency gate with real inter-site delay: a volume spanning both sites is created at
/// about 2 ms RTT and refused at about 15 ms with the measured figure; volumes kept inside
/// one site are created either way.
#[test]
fn metro_gate_with_sites_in_network_namespaces() {
    let _serial = tandem_tests::serial();
    let t0 = Instant::now();
    let c = Cluster::start(METRO_RTT);
    let a1 = c.a1();

    // Samples taken while the cluster was still starting (five debug-build daemons
    // joining on two cores) are slower than the link: measure once it has settled (every
    // node a raft voter), over a window of mostly settled samples.
    eventually(Duration::from_secs(60), "five raft voters", || {
        let voters = a1.ctl_json(&["cluster", "inspect"])["voters"]
            .as_array()?
            .len();
        (voters == 5).then_some(())
    });
    let l = latency_when_measured(a1, 20);
    let pair = &l["domains"][0];
    eprintln!("at {METRO_RTT:?} after {:?}: {pair}", t0.elapsed());
    let p50 = pair["p50_us"].as_u64().unwrap();
    let want = METRO_RTT.as_micros() as u64;
    // The relay sleeps exactly the injected delay. What a ping costs besides (a debug
    // build, relay threads, five daemons on two cores: 0.3 to 2 ms measured) is also paid
    // inside a site, where nothing is injected: the median of the intra-site pairs is that
    // baseline, and the inter-site figure less it must be the injected RTT within the
    // issue's tolerance (20% or 1 ms).
    let mut intra: Vec<u64> = l["nodes"]
        .as_array()
        .expect("node pairs")
        .iter()
        .filter(|p| {
            site_of(p["from"].as_str().unwrap_or_default())
                == site_of(p["to"].as_str().unwrap_or_default())
        })
        .filter_map(|p| p["p50_us"].as_u64())
        .collect();
    intra.sort_unstable();
    let baseline = intra.get(intra.len() / 2).copied().unwrap_or(0);
    eprintln!("intra-site p50s {intra:?}: baseline {baseline} us");
    assert!(
        p50 >= want,
        "the inter-site RTT is below the injected one: {pair}"
    );
    assert!(
        p50.saturating_sub(baseline).abs_diff(want) <= rtt_tolerance_us(METRO_RTT),
        "measured A-B RTT less the intra-site baseline ({baseline} us) must be within 20% or 1 ms of the injected {METRO_RTT:?}: {pair}"
    );
    assert_eq!(pair["sync_allowed"], true, "{pair}");
    assert_only_inter_site_traffic_is_delayed(&l, METRO_RTT);
    assert!(
        a1.metrics().contains("tandem_peer_rtt_seconds"),
        "RTT is exported as metrics (read inside the site)"
    );

    let v = a1.ctl_json(&[
        "volume",
        "create",
        "metro1",
        "--size",
        "64MiB",
        "--repl",
        "2",
        "--domains",
        "A,B",
    ]);
    let sites: Vec<char> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| site_of(r["node_id"].as_str().unwrap_or_default()))
        .collect();
    assert!(
        sites.contains(&'A') && sites.contains(&'B'),
        "one replica in each site: {v}"
    );
    for (name, dom) in [("local-a1", "A"), ("local-b1", "B")] {
        let v = a1.ctl_json(&[
            "volume",
            "create",
            name,
            "--size",
            "64MiB",
            "--repl",
            "2",
            "--domains",
            dom,
        ]);
        assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v}");
    }

    // About 15 ms. Each node pair's window (30 samples, one ping a second) turns over;
    // measure once every A-B node pair's p50 is a sample taken after the change (above
    // the limit), not while the domain median still averages old and new pairs.
    c.sites.set_rtt_everywhere(FAR_RTT);
    let l = eventually(
        Duration::from_secs(60),
        "every A-B pair above the limit",
        || {
            let l = a1.ctl_json(&["cluster", "latency"]);
            let limit = l["sync_max_rtt_us"].as_u64()?;
            let ab: Vec<u64> = l["nodes"]
                .as_array()?
                .iter()
                .filter(|p| {
                    let (f, t) = (
                        p["from"].as_str().unwrap_or(""),
                        p["to"].as_str().unwrap_or(""),
                    );
                    matches!((site_of(f), site_of(t)), ('A', 'B') | ('B', 'A'))
                })
                .filter_map(|p| p["p50_us"].as_u64())
                .collect();
            (ab.len() == 8 && ab.iter().all(|&p| p > limit)).then_some(l)
        },
    );
    let pair = &l["domains"][0];
    eprintln!("at {FAR_RTT:?} after {:?}: {pair}", t0.elapsed());
    let p50 = pair["p50_us"].as_u64().unwrap();
    let want = FAR_RTT.as_micros() as u64;
    assert!(
        p50.abs_diff(want) <= rtt_tolerance_us(FAR_RTT),
        "measured A-B RTT must be within 20% of the injected {FAR_RTT:?}: {pair}"
    );

    let o = a1.ctl(&[
        "volume",
        "create",
        "metro2",
        "--size",
        "64MiB",
        "--repl",
        "2",
        "--domains",
        "A,B",
    ]);
    assert_eq!(o.code, 1, "refused: {} {}", o.stdout, o.stderr);
    let line = o.stderr.trim_end();
    assert!(!line.contains('\n'), "one line: {line}");
    for want in ["A and B", "p50", "p99", "10.0 ms limit"] {
        assert!(
            line.contains(want),
            "the refusal must name '{want}': {line}"
        );
    }
    let figure = ms_after(line, "p50").unwrap_or_else(|| panic!("a p50 figure in: {line}"));
    assert!(
        figure.abs_diff(want) <= rtt_tolerance_us(FAR_RTT),
        "the refusal names the measured RTT ({figure} us), near the injected {FAR_RTT:?}: {line}"
    );
    let st = create_refused_over_grpc(a1, "metro3");
    assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("A and B"), "{st:?}");

    for (name, dom) in [("local-a2", "A"), ("local-b2", "B")] {
        let v = a1.ctl_json(&[
            "volume",
            "create",
            name,
            "--size",
            "64MiB",
            "--repl",
            "2",
            "--domains",
            dom,
        ]);
        assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v}");
    }
    eprintln!("metro gate test took {:?}", t0.elapsed());
}

/// One write of the writer on A.
#[derive(Debug, Clone)]
struct Attempt {
    chunk: u64,
    started: Instant,
    outcome: QemuIo,
}

/// Chunk `i` of the writer: spread over sixteen 1 MiB regions (the coordinator's resync
/// granularity) inside the first 16 MiB, so writes after the cut land in regions that are
/// already hot (no metadata commit needed before the local replica is written), and in
/// regions that the other site may never touch.
fn chunk_offset(i: u64) -> u64 {
    (i % 16) * (1 << 20) + (i / 16) * CHUNK_BYTES
}

/// The writer's pattern byte for chunk `i` (distinct per chunk; B uses 0xC0 and up).
fn chunk_pattern(i: u64) -> u64 {
    i + 1
}
const WRITER_MAX_CHUNKS: u64 = 0xB0;

fn write_cmd(pattern: u64, offset: u64) -> [String; 2] {
    [
        format!("write -P {pattern} {offset} {CHUNK_BYTES}"),
        "flush".to_string(),
    ]
}

fn read_cmd(pattern: u64, offset: u64) -> String {
    format!("read -P {pattern} {offset} {CHUNK_BYTES}")
}

fn io(ns: &str, uri: &str, cmds: &[String]) -> QemuIo {
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_outcome(ns, uri, &c, CLIENT_LIMIT)
}

/// How many of these (unacknowledged) writes are in the volume's data file on `d`.
fn unacked_chunks_on_disk(d: &Daemon, attempts: &[&Attempt]) -> usize {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(d.data_file("pv")) else {
        return 0;
    };
    attempts
        .iter()
        .filter(|a| {
            let mut b = vec![0u8; CHUNK_BYTES as usize];
            f.read_exact_at(&mut b, chunk_offset(a.chunk)).is_ok()
                && b.iter().all(|&x| u64::from(x) == chunk_pattern(a.chunk))
        })
        .count()
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn replica_states(d: &Daemon, vol: &str) -> Vec<String> {
    d.ctl_json(&["volume", "inspect", vol])["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn log_tail(d: &Daemon, n: usize) -> String {
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Site A is cut from B and from the witness while a client writes on A: no write is
/// acknowledged after the cut (A is a raft minority, so its coordinator can neither eject
/// B's replica nor keep its lease). B with the witness deactivates A and takes the volume
/// over with every acknowledged write (the runbook of docs/operations.md); A's stale
/// coordinator serves nothing more; after healing, A is activated and resynced, the
/// replicas verify identical, B's writes win, and the volume fails back to A (no fork).
#[test]
fn partition_minority_site_cannot_ack_and_the_majority_takes_over_without_forking() {
    let _serial = tandem_tests::serial();
    let t0 = Instant::now();
    let c = Cluster::start(METRO_RTT);
    let (a1, b1) = (c.a1(), c.b1());
    let (ns_a, ns_b) = (c.sites.ns("A").to_string(), c.sites.ns("B").to_string());
    latency_when_measured(a1, 3);
    let v = a1.ctl_json(&[
        "volume",
        "create",
        "pv",
        "--size",
        "64MiB",
        "--repl",
        "2",
        "--domains",
        "A,B",
    ]);
    assert_eq!(v["replicas"].as_array().unwrap().len(), 2, "{v}");
    let uri_a = a1.ctl_json(&["volume", "attach", "pv"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    eprintln!("cluster up, volume attached on a1 after {:?}", t0.elapsed());

    // The writer: numbered chunks, one qemu-io (write + flush) each; exit 0 and no error
    // text is an acknowledgement.
    let attempts: Mutex<Vec<Attempt>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let (t_cut, acked_before_takeover, b_chunks) = std::thread::scope(|s| {
        // Stops the writer however this closure ends (the scope waits for it).
        let _stop_writer = StopOnDrop(&stop);
        s.spawn(|| {
            for i in 0..WRITER_MAX_CHUNKS {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let started = Instant::now();
                let cmds = write_cmd(chunk_pattern(i), chunk_offset(i));
                let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
                let outcome = qemu_io_outcome(&ns_a, &uri_a, &cmds, WRITER_LIMIT);
                attempts.lock().unwrap().push(Attempt {
                    chunk: i,
                    started,
                    outcome,
                });
            }
        });
        let acked = |a: &[Attempt]| a.iter().filter(|a| a.outcome == QemuIo::Ok).count();
        eventually(Duration::from_secs(60), "24 acked writes on A", || {
            let a = attempts.lock().unwrap();
            assert_eq!(acked(&a), a.len(), "writes before the cut succeed: {a:?}");
            (a.len() >= 24).then_some(())
        });

        // The partition: A loses B and the witness.
        c.sites.isolate("A");
        let t_cut = Instant::now();
        eprintln!("A isolated after {:?}", t0.elapsed());

        // B and the witness (a majority) deactivate A and take the volume over.
        eventually(Duration::from_secs(60), "deactivate A from B", || {
            (b1.ctl(&["cluster", "domains", "deactivate", "A"]).code == 0).then_some(())
        });
        let doms = b1.ctl_json(&["cluster", "domains", "show"]);
        let a_dom = doms
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "A")
            .cloned()
            .unwrap_or_default();
        assert_eq!(a_dom["active"], false, "{doms}");
        let att = b1.ctl_json(&["volume", "attach", "pv"]);
        assert_eq!(att["state"], "attached", "{att}");
        let uri_b = b1.nbd_uri("pv");
        eprintln!("B attached after {:?}", t0.elapsed());

        // Every write acknowledged so far reads back in B (RPO 0).
        let acked_now: Vec<u64> = attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.outcome == QemuIo::Ok)
            .map(|a| a.chunk)
            .collect();
        let reads: Vec<String> = acked_now
            .iter()
            .map(|&i| read_cmd(chunk_pattern(i), chunk_offset(i)))
            .collect();
        assert_eq!(
            io(&ns_b, &uri_b, &reads),
            QemuIo::Ok,
            "B must serve every acknowledged write: {acked_now:?}"
        );

        // New writes in B: over the first acknowledged chunk, and in fresh regions that
        // A never wrote.
        let mut b_chunks = BTreeMap::new();
        b_chunks.insert(chunk_offset(acked_now[0]), 0xC0u64);
        for j in 0..4u64 {
            b_chunks.insert((32 << 20) + j * (1 << 20), 0xC1 + j);
        }
        for (&off, &pat) in &b_chunks {
            assert_eq!(
                io(&ns_b, &uri_b, &write_cmd(pat, off)),
                QemuIo::Ok,
                "B serves writes alone"
            );
        }
        // A's old coordinator, still cut off, must not serve the data B just replaced.
        let stale = io(
            &ns_a,
            &uri_a,
            &[read_cmd(
                chunk_pattern(acked_now[0]),
                chunk_offset(acked_now[0]),
            )],
        );
        assert_ne!(
            stale,
            QemuIo::Ok,
            "a1 served a stale read after B took over"
        );

        stop.store(true, Ordering::SeqCst);
        (t_cut, acked_now, b_chunks)
    });
    let attempts = attempts.into_inner().unwrap();
    eprintln!(
        "writer stopped after {:?}: {} attempts",
        t0.elapsed(),
        attempts.len()
    );

    // After the cut, nothing was acknowledged: writes failed or blocked. A write already
    // in flight at the cut may have completed either way.
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started > t_cut).collect();
    eprintln!(
        "{} writes started after the cut: {:?}",
        after.len(),
        after
            .iter()
            .map(|a| match &a.outcome {
                QemuIo::Failed(_) => "failed",
                QemuIo::Blocked => "blocked",
                QemuIo::Ok => "ACKED",
                QemuIo::PatternMismatch(_) => "mismatch",
            })
            .collect::<Vec<_>>()
    );
    assert!(
        !after.is_empty(),
        "the writer kept writing after the cut: {attempts:?}"
    );
    for a in &after {
        assert_ne!(
            a.outcome,
            QemuIo::Ok,
            "a write was acked after the cut: {a:?}"
        );
    }
    let acked: Vec<u64> = attempts
        .iter()
        .filter(|a| a.outcome == QemuIo::Ok)
        .map(|a| a.chunk)
        .collect();
    assert_eq!(
        acked, acked_before_takeover,
        "no write was acked after B took over"
    );

    // Writes that were never acked may still have reached A's own replica (the
    // coordinator writes its replicas in parallel): a fork in the making, which the resync
    // after activation must undo.
    let a_replica = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["node_id"].as_str())
        .find(|n| site_of(n) == 'A')
        .expect("a replica in A")
        .to_string();
    let a_holder = &c.nodes[if a_replica == "a1" { 0 } else { 1 }];
    let diverged = unacked_chunks_on_disk(a_holder, &after);
    eprintln!("{a_replica}'s replica holds {diverged} chunks that were never acked");

    // Heal. A's old attachment is fenced: no write through a1 is accepted, no stale read.
    c.sites.heal_all();
    eprintln!("healed after {:?}", t0.elapsed());
    let w = io(&ns_a, &uri_a, &write_cmd(0xEE, 48 << 20));
    assert_ne!(w, QemuIo::Ok, "a1 accepted a write after B took over");
    let first = acked[0];
    let r = io(
        &ns_a,
        &uri_a,
        &[read_cmd(chunk_pattern(first), chunk_offset(first))],
    );
    assert_ne!(r, QemuIo::Ok, "a1 served a stale read after healing");
    let o = c.nodes[1].ctl(&["volume", "attach", "pv", "--force"]);
    assert_ne!(o.code, 0, "a node of an inactive domain must not attach");

    // Failback, as in the runbook: activate A, wait for its replica to resync, verify.
    eventually(Duration::from_secs(60), "activate A", || {
        (b1.ctl(&["cluster", "domains", "activate", "A"]).code == 0).then_some(())
    });
    wait_in_sync(b1, "pv");
    let ver = b1.ctl_json(&["volume", "verify", "pv"]);
    assert_eq!(
        ver["mismatched_blocks"], 0,
        "the replicas forked (A kept writes that were never acked): {ver}"
    );
    assert_eq!(
        unacked_chunks_on_disk(a_holder, &after),
        0,
        "{a_replica}'s replica still holds writes that were never acked"
    );

    // What every replica must hold: acknowledged chunks of A, unless B overwrote them,
    // and B's chunks.
    let mut expected: BTreeMap<u64, u64> = acked
        .iter()
        .map(|&i| (chunk_offset(i), chunk_pattern(i)))
        .collect();
    expected.extend(b_chunks.iter().map(|(&o, &p)| (o, p)));
    let reads: Vec<String> = expected.iter().map(|(&o, &p)| read_cmd(p, o)).collect();
    assert_eq!(io(&ns_b, &b1.nbd_uri("pv"), &reads), QemuIo::Ok, "B's view");

    b1.ctl_ok(&["volume", "detach", "pv"]);
    let generation = b1.ctl_json(&["volume", "inspect", "pv"])["generation"]
        .as_u64()
        .unwrap();
    // a1 still holds its fenced coordinator of generation 1 in this build: attach returns
    // that instead of committing a new attach (see the report of issue 4).
    let att = a1.ctl_json(&["volume", "attach", "pv"]);
    let rec = b1.ctl_json(&["volume", "inspect", "pv"]);
    assert!(
        rec["state"] == "attached"
            && rec["attached_node"] == "a1"
            && rec["generation"].as_u64().unwrap_or_default() > generation,
        "failback: `volume attach pv` on a1 must attach it there at a new generation; \
         attach printed {att}\nbut the cluster records {rec}\na1 log tail:\n{}",
        log_tail(a1, 20)
    );
    assert_eq!(
        io(&ns_a, &uri_a, &reads),
        QemuIo::Ok,
        "A serves B's writes and every acknowledged write after failback"
    );
    let ver = a1.ctl_json(&["volume", "verify", "pv"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
    eprintln!("partition test took {:?}", t0.elapsed());
}

fn wait_in_sync(d: &Daemon, vol: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = replica_states(d, vol);
        if s.len() == 2 && s.iter().all(|s| s == "in-sync") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas of {vol} not in sync: {s:?}\n{}\nlog tail:\n{}",
            d.ctl_ok(&["volume", "inspect", vol]),
            log_tail(d, 30)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The unplanned-site-loss runbook of docs/operations.md with every inter-site byte
/// (raft included) delayed: site A dies (both nodes SIGKILLed); B deactivates it and
/// serves every acknowledged write; A returns, is activated, resyncs, and takes the volume
/// back with B's writes.
#[test]
fn unplanned_site_loss_failover_and_failback_across_namespaces() {
    let _serial = tandem_tests::serial();
    let t0 = Instant::now();
    let mut c = Cluster::start(METRO_RTT);
    let ns_a = c.sites.ns("A").to_string();
    let ns_b = c.sites.ns("B").to_string();
    latency_when_measured(c.a1(), 3);
    c.a1().ctl_ok(&[
        "volume",
        "create",
        "dr",
        "--size",
        "64MiB",
        "--repl",
        "2",
        "--domains",
        "A,B",
    ]);
    let uri_a = c.a1().ctl_json(&["volume", "attach", "dr"])["nbd_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..16 {
        let (off, pat) = (chunk_offset(i), chunk_pattern(i));
        assert_eq!(
            io(&ns_a, &uri_a, &write_cmd(pat, off)),
            QemuIo::Ok,
            "A writes"
        );
        expected.insert(off, pat);
    }

    // Site A is lost.
    c.nodes[0].kill9();
    c.nodes[1].kill9();
    let b1 = c.b1();
    eventually(Duration::from_secs(60), "deactivate A from B", || {
        (b1.ctl(&["cluster", "domains", "deactivate", "A"]).code == 0).then_some(())
    });
    let att = b1.ctl_json(&["volume", "attach", "dr"]);
    assert_eq!(att["state"], "attached", "{att}");
    let uri_b = b1.nbd_uri("dr");
    let reads = |m: &BTreeMap<u64, u64>| -> Vec<String> {
        m.iter().map(|(&o, &p)| read_cmd(p, o)).collect()
    };
    assert_eq!(io(&ns_b, &uri_b, &reads(&expected)), QemuIo::Ok, "RPO 0");
    for j in 0..4u64 {
        let (off, pat) = (chunk_offset(j * 5), 0xC0 + j);
        assert_eq!(
            io(&ns_b, &uri_b, &write_cmd(pat, off)),
            QemuIo::Ok,
            "B writes"
        );
        expected.insert(off, pat);
    }
    let ver = b1.ctl_json(&["volume", "verify", "dr"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
    eprintln!("failed over to B after {:?}", t0.elapsed());

    // A returns; an inactive domain cannot take the volume.
    c.nodes[0].spawn();
    c.nodes[1].spawn();
    let o = c.nodes[1].ctl(&["volume", "attach", "dr", "--force"]);
    assert_ne!(o.code, 0, "a node of an inactive domain must not attach");

    // Failback.
    let b1 = c.b1();
    eventually(Duration::from_secs(60), "activate A", || {
        (b1.ctl(&["cluster", "domains", "activate", "A"]).code == 0).then_some(())
    });
    wait_in_sync(b1, "dr");
    let ver = b1.ctl_json(&["volume", "verify", "dr"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
    b1.ctl_ok(&["volume", "detach", "dr"]);
    let a1 = c.a1();
    a1.ctl_ok(&["volume", "attach", "dr"]);
    assert_eq!(
        io(&ns_a, &a1.nbd_uri("dr"), &reads(&expected)),
        QemuIo::Ok,
        "A serves every acknowledged write and B's writes after failback"
    );
    let ver = a1.ctl_json(&["volume", "verify", "dr"]);
    assert_eq!(ver["mismatched_blocks"], 0, "{ver}");
    eprintln!("site loss test took {:?}", t0.elapsed());
}
