//! End-to-end check of `tandem-bench run`: a tiny matrix (RF 1 and 2, RTT 0 and 1 ms, 1 and
//! 2 volumes, 1 s jobs, small volumes) against a real local cluster, qemu-nbd and the local
//! store. The output must be complete and every measured figure positive and finite: a
//! zero or NaN in results.json means a measurement silently failed.
//!
//! Needs fio (with its nbd ioengine), qemu-nbd and the tandemd/tandemctl binaries next to
//! the tandem-bench binary (`cargo build --workspace --bins`; scripts/test.sh does both).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bound on the whole run (it takes about 45 s with release binaries on 2 cores).
const RUN_TIMEOUT: Duration = Duration::from_secs(110);

/// Fields that describe a point rather than measure it: they may be zero.
const CONFIG_FIELDS: [&str; 1] = ["rtt_ms"];

fn check_numbers(rec: &Value, what: &str) {
    let obj = rec
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object"));
    for field in [
        "workload",
        "target",
        "rf",
        "rtt_ms",
        "volumes",
        "qd",
        "p50_us",
        "p99_us",
        "p999_us",
        "iops",
        "mb_s",
        "cpu_us_per_op",
        "model_us",
    ] {
        assert!(obj.contains_key(field), "{what}: no field {field}: {rec}");
    }
    for (k, v) in obj {
        let Some(x) = v.as_f64() else { continue };
        assert!(x.is_finite(), "{what}: {k} = {x} is not finite: {rec}");
        if CONFIG_FIELDS.contains(&k.as_str()) {
            assert!(x >= 0.0, "{what}: {k} = {x} is negative: {rec}");
        } else {
            assert!(x > 0.0, "{what}: {k} = {x} is not positive: {rec}");
        }
    }
}

fn find<'a>(
    recs: &'a [Value],
    workload: &str,
    target: &str,
    rf: u64,
    rtt_ms: f64,
    volumes: u64,
) -> &'a Value {
    recs.iter()
        .find(|r| {
            r["workload"] == workload
                && r["target"] == target
                && r["rf"].as_u64() == Some(rf)
                && r["rtt_ms"].as_f64() == Some(rtt_ms)
                && r["volumes"].as_u64() == Some(volumes)
        })
        .unwrap_or_else(|| {
            panic!("no record {workload} {target} rf {rf} rtt {rtt_ms} volumes {volumes}")
        })
}

fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool '{name}' is not installed; scripts/test.sh installs it (fio, qemu-utils)"
    );
}

#[test]
fn quick_run_writes_complete_and_positive_results() {
    require_tool("fio");
    require_tool("qemu-nbd");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-bench"))
        .args([
            "run",
            "--quick",
            "--rf",
            "1,2",
            "--rtt",
            "0,1",
            "--volumes",
            "1,2",
        ])
        .args(["--runtime", "1", "--ramp", "0"])
        .args([
            "--size-mib",
            "32",
            "--scale-size-mib",
            "16",
            "--resync-mib",
            "32",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--dir")
        .arg(tmp.path())
        .stdin(Stdio::null())
        .spawn()
        .expect("start tandem-bench");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for tandem-bench") {
            break st;
        }
        if Instant::now() > deadline {
            // SIGTERM, so that tandem-bench stops the processes it started.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!("tandem-bench run did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "tandem-bench run failed: {status}");

    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let v: Value = serde_json::from_str(&text).expect("results.json is valid JSON");
    let recs = v["records"].as_array().expect("records").clone();
    let per_round = v["per_round"].as_array().expect("per_round");
    assert!(!recs.is_empty() && !per_round.is_empty());
    for (i, r) in recs.iter().chain(per_round.iter()).enumerate() {
        check_numbers(r, &format!("record {i}"));
    }

    // Every part of the matrix is there.
    for target in ["local", "qemu-nbd"] {
        find(&recs, "randwrite-4k-qd1", target, 1, 0.0, 1);
    }
    for w in [
        "randwrite-4k-qd1",
        "randwrite-4k-qd32",
        "randread-4k-qd1",
        "seqwrite-1m",
        "randwrite-4k-qd1-fsync",
    ] {
        for rf in [1, 2] {
            find(&recs, w, "tandem", rf, 0.0, 1);
        }
    }
    let metro = find(&recs, "randwrite-4k-qd1", "tandem", 2, 1.0, 1);
    assert!(metro["model_us"].as_f64().is_some(), "no model: {metro}");
    assert!(
        metro["measured_rtt_us"].as_f64().unwrap_or(0.0) >= 1000.0,
        "1 ms injected but less measured: {metro}"
    );
    for n in [1, 2] {
        find(&recs, "randwrite-4k-qd32-per-volume", "tandem", 2, 0.0, n);
    }
    for w in [
        "priority-high-qd1-alone",
        "priority-low-qd32-alone",
        "priority-high-qd1-with-low",
        "priority-low-qd32-with-high",
        "priority-high-qd1-with-low-as-high",
        "priority-low-qd32-as-high-with-high",
    ] {
        let r = find(&recs, w, "tandem", 1, 0.0, 1);
        assert!(
            r["p99_us"].as_f64().is_some() && r["iops"].as_f64().is_some(),
            "{r}"
        );
    }
    let resync = find(&recs, "resync", "tandem", 2, 0.0, 1);
    assert!(resync["resync_gib_s"].as_f64().is_some(), "{resync}");

    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(
        report.contains("## Targets"),
        "report.md has no targets table"
    );
    assert!(
        report.contains("## I/O priority classes")
            && report.contains("high QD1 next to low QD32 / high alone, write p99"),
        "report.md has no I/O priority section or target"
    );
    for svg in [
        "latency_vs_rtt.svg",
        "latency_vs_rf.svg",
        "iops_vs_volumes.svg",
    ] {
        let s = std::fs::read_to_string(out.join(svg)).unwrap_or_else(|e| panic!("{svg}: {e}"));
        assert!(
            s.starts_with("<svg") && s.contains("</svg>"),
            "{svg} is not an SVG"
        );
    }
    assert_no_leftovers(tmp.path());
}

/// The run removed its data directory (its temporary directory under --dir).
fn assert_no_leftovers(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("read the test directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tandem-bench."))
        .collect();
    assert!(left.is_empty(), "data directories left behind: {left:?}");
}
