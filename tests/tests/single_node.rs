//! Single-node tandemd through its real interfaces: tandemctl, qemu-io, qemu-img, nbdinfo,
//! SIGKILL and SIGTERM.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use tandem_tests::{qemu_io, qemu_io_ok, require_tool, run_bounded, Daemon, DaemonOpts};

fn daemon_with_engine(engine: &str) -> Daemon {
    Daemon::start(DaemonOpts {
        io_engine: Some(engine.into()),
        ..Default::default()
    })
}

fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Acknowledged-and-flushed writes are the contract with databases: they must survive the
/// daemon dying at any moment, on both I/O engines.
#[test]
fn flushed_patterns_survive_kill_9_and_restart_on_both_engines() {
    for engine in ["uring", "std"] {
        let mut d = daemon_with_engine(engine);
        let uri = d.create_attached("db", "64MiB");
        qemu_io_ok(
            &uri,
            &[
                "write -P 0x5a 0 1M",
                "write -P 0xa5 4M 256k",
                "write -P 0x33 60M 4k",
                "flush",
                "read -P 0x5a 0 1M",
            ],
        );
        // Unflushed writes in flight at the kill: old or new bytes, never an error.
        qemu_io_ok(&uri, &["write -P 0x77 8M 512k"]);
        d.kill9();
        d.spawn();
        let uri = d.nbd_uri("db");
        qemu_io_ok(
            &uri,
            &[
                "read -P 0x5a 0 1M",
                "read -P 0xa5 4M 256k",
                "read -P 0x33 60M 4k",
                "read -P 0x0 1M 3M",
                "read 8M 512k",
            ],
        );
        let v = d.ctl_json(&["volume", "inspect", "db"]);
        assert_eq!(
            v["state"], "attached",
            "attachment survives kill -9 ({engine})"
        );
        assert_eq!(
            v["generation"], 2,
            "restart re-attaches at a new generation"
        );
        assert!(
            d.log().contains("recovered checksums of hot regions"),
            "an unclean stop must run activity-log recovery ({engine})"
        );
        assert_eq!(
            d.metric("tandem_volume_checksum_errors_total{volume=\"db\"}"),
            0.0,
            "no false checksum errors after kill -9 ({engine})"
        );
    }
}

#[test]
fn qemu_img_convert_round_trips_a_256mib_image() {
    require_tool("qemu-img");
    let d = Daemon::start(DaemonOpts::default());
    let uri = d.create_attached("img", "256MiB");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let out = tmp.path().join("out.img");
    // Mixed content: random data, a run of zeros (to exercise sparse handling) and more data.
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(256 << 20).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for mib in 0..256u64 {
        if (100..140).contains(&mib) {
            continue;
        }
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&chunk, mib << 20).unwrap();
    }
    drop(f);
    let convert_in = run_bounded(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        Duration::from_secs(300),
    );
    assert!(
        convert_in.status.success(),
        "convert in: {}",
        output_text(&convert_in)
    );
    let convert_out = run_bounded(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out),
        Duration::from_secs(300),
    );
    assert!(
        convert_out.status.success(),
        "convert out: {}",
        output_text(&convert_out)
    );
    let cmp = run_bounded(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&out),
        Duration::from_secs(300),
    );
    assert!(
        cmp.status.success(),
        "images must be identical: {}",
        output_text(&cmp)
    );
    let cmp_live = run_bounded(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        Duration::from_secs(300),
    );
    assert!(
        cmp_live.status.success(),
        "live volume must match: {}",
        output_text(&cmp_live)
    );
}

/// Silent corruption must surface as EIO, never as data.
#[test]
fn corrupted_block_is_an_io_error_to_the_nbd_client_and_is_counted() {
    for engine in ["uring", "std"] {
        let d = daemon_with_engine(engine);
        let uri = d.create_attached("c", "16MiB");
        qemu_io_ok(&uri, &["write -P 0x42 0 64k", "flush"]);
        let data = d.data_file("c");
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        // Flip bytes inside block 3 (12 KiB..16 KiB) behind the daemon's back.
        f.write_all_at(&[0xde, 0xad], 12 * 1024 + 100).unwrap();
        f.sync_all().unwrap();
        let out = qemu_io(&uri, &["read -P 0x42 12k 4k"]);
        let text = output_text(&out);
        assert!(
            text.contains("Input/output error"),
            "a corrupted block must read as EIO ({engine}): {text}"
        );
        assert!(
            !text.contains("Pattern verification failed"),
            "no wrong bytes: {text}"
        );
        // Neighbouring blocks are intact and still served.
        qemu_io_ok(&uri, &["read -P 0x42 0 12k", "read -P 0x42 16k 48k"]);
        assert!(
            d.metric("tandem_volume_checksum_errors_total{volume=\"c\"}") >= 1.0,
            "checksum errors are counted in metrics ({engine})"
        );
        assert!(
            d.log().contains("block 3"),
            "the daemon log names the bad block ({engine})"
        );
    }
}

#[test]
fn tandemctl_json_parses_and_errors_are_one_clear_line() {
    let d = Daemon::start(DaemonOpts::default());
    let s = d.ctl_json(&["status"]);
    assert_eq!(s["status"], "online");
    assert!(s["pool_size_bytes"].as_u64().unwrap() > 0);

    let v = d.ctl_json(&[
        "volume",
        "create",
        "pg",
        "--size",
        "1GiB",
        "--io-priority",
        "high",
        "--label",
        "app=postgres",
        "--label",
        "tier=gold",
    ]);
    assert_eq!(v["size_bytes"], 1u64 << 30);
    assert_eq!(v["io_priority"], "high");
    assert_eq!(v["labels"]["app"], "postgres");
    assert_eq!(v["repl"], 1);
    d.ctl_json(&["volume", "create", "logs", "--size", "512MiB"]);
    let list = d.ctl_json(&["volume", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logs", "pg"]);
    let human = d.ctl_ok(&["volume", "list"]);
    assert!(human.contains("NAME") && human.contains("pg"), "{human}");

    let a = d.ctl_json(&["volume", "attach", "pg"]);
    assert_eq!(a["state"], "attached");
    assert_eq!(a["nbd_uri"], d.nbd_uri("pg"));
    let plain = d.ctl_ok(&["volume", "attach", "pg"]);
    assert!(
        plain.contains(&format!("NBD URI: {}", d.nbd_uri("pg"))),
        "attach is idempotent and prints the URI: {plain}"
    );
    let grown = d.ctl_json(&["volume", "update", "pg", "--size", "2GiB"]);
    assert_eq!(grown["size_bytes"], 2u64 << 30);

    let check_err = |args: &[&str], code: i32, needle: &str| {
        let o = d.ctl(args);
        assert_eq!(o.code, code, "{args:?}: {}", o.stderr);
        let line = o.stderr.trim_end();
        assert!(
            !line.contains('\n'),
            "{args:?}: error must be one line: {line}"
        );
        assert!(line.starts_with("tandemctl: error: "), "{args:?}: {line}");
        assert!(
            line.contains(needle),
            "{args:?}: expected '{needle}' in: {line}"
        );
    };
    check_err(
        &["volume", "create", "pg", "--size", "1GiB"],
        1,
        "already exists",
    );
    check_err(
        &["volume", "create", "x", "--size", "10XB"],
        2,
        "invalid size '10XB'",
    );
    check_err(
        &["volume", "create", "bad/name", "--size", "1GiB"],
        1,
        "invalid volume name",
    );
    check_err(
        &["volume", "create", "r2", "--size", "1GiB", "--repl", "2"],
        1,
        "needs 2 storage nodes",
    );
    check_err(
        &["volume", "update", "pg", "--size", "1GiB"],
        1,
        "cannot shrink",
    );
    check_err(
        &["volume", "delete", "pg"],
        1,
        "detach it first, or delete with --force",
    );
    check_err(&["volume", "inspect", "nope"], 1, "volume 'nope' not found");
    check_err(
        &[
            "volume",
            "create",
            "y",
            "--size",
            "1GiB",
            "--io-priority",
            "urgent",
        ],
        2,
        "invalid I/O priority",
    );

    let det = d.ctl_json(&["volume", "detach", "pg"]);
    assert_eq!(det["state"], "detached");
    assert!(det["nbd_uri"].is_null());
    d.ctl_json(&["volume", "attach", "pg"]);
    let del = d.ctl_json(&["volume", "delete", "pg", "--force"]);
    assert_eq!(del["deleted"], "pg");
    d.ctl_ok(&["volume", "delete", "logs"]);
    assert_eq!(d.ctl_json(&["volume", "list"]), serde_json::json!([]));

    // An unreachable daemon is one line and exit code 3.
    let o = run_bounded(
        Command::new(tandem_tests::bin("tandemctl")).args(["--endpoint", "127.0.0.1:1", "status"]),
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach tandemd"));
}

#[test]
fn sigterm_drains_flushes_and_restart_serves_the_same_volumes() {
    let mut d = Daemon::start(DaemonOpts::default());
    let uri = d.create_attached("s", "32MiB");
    d.ctl_ok(&["volume", "create", "idle", "--size", "8MiB"]);
    qemu_io_ok(&uri, &["write -P 0x61 0 2M", "write -P 0x62 3M 100k"]);
    assert_eq!(d.terminate(), Some(0), "SIGTERM exits 0");
    assert!(d.log().contains("tandemd stopped cleanly"));
    d.spawn();
    assert!(
        !d.log().contains("recovered checksums"),
        "a clean stop leaves nothing to recover"
    );
    let uri = d.nbd_uri("s");
    qemu_io_ok(&uri, &["read -P 0x61 0 2M", "read -P 0x62 3M 100k"]);
    let list = d.ctl_json(&["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[test]
fn full_pool_is_enospc_to_the_client_and_stored_data_is_intact() {
    let d = Daemon::start(DaemonOpts {
        pool_size: Some("8MiB".into()),
        ..Default::default()
    });
    let uri = d.create_attached("small", "64MiB");
    qemu_io_ok(&uri, &["write -P 0x11 0 6M", "flush"]);
    let out = qemu_io(&uri, &["write -P 0x22 16M 4M"]);
    let text = output_text(&out);
    assert!(
        text.contains("No space left on device"),
        "a write beyond the pool must fail with ENOSPC: {text}"
    );
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x11 0 6M",
            "write -P 0x33 0 1M",
            "read -P 0x33 0 1M",
        ],
    );
    // Trim gives space back.
    qemu_io_ok(
        &uri,
        &[
            "discard 2M 4M",
            "write -P 0x44 16M 4M",
            "read -P 0x44 16M 4M",
        ],
    );
    let s = d.ctl_json(&["status"]);
    assert!(s["pool_allocated_bytes"].as_u64().unwrap() <= 8 << 20);
}

#[test]
fn nbdinfo_sees_honest_flags_and_detached_volumes_are_not_exported() {
    require_tool("nbdinfo");
    let d = Daemon::start(DaemonOpts::default());
    let uri = d.create_attached("n", "16MiB");
    let o = run_bounded(Command::new("nbdinfo").arg(&uri), Duration::from_secs(30));
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    for want in [
        "export-size: 16777216",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "is_read_only: false",
        "block_size_preferred: 4096",
    ] {
        assert!(text.contains(want), "nbdinfo must show '{want}': {text}");
    }
    let list = run_bounded(
        Command::new("nbdinfo").args(["--list", &format!("nbd://{}", d.nbd_addr)]),
        Duration::from_secs(30),
    );
    assert!(
        output_text(&list).contains("export=\"n\""),
        "{}",
        output_text(&list)
    );
    // Growing is seen by new connections.
    d.ctl_ok(&["volume", "update", "n", "--size", "32MiB"]);
    let o = run_bounded(
        Command::new("nbdinfo").args(["--size", &uri]),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "33554432");
    d.ctl_ok(&["volume", "detach", "n"]);
    let o = run_bounded(Command::new("nbdinfo").arg(&uri), Duration::from_secs(30));
    assert!(!o.status.success(), "a detached volume is not exported");
    // nbdinfo shows the errno only; the server's message ("not attached ... tandemctl volume
    // attach") is checked by the raw-protocol tests in nbd_hostile.rs.
    assert!(
        output_text(&o).contains("server replied with error"),
        "the export is refused: {}",
        output_text(&o)
    );
}

/// Runs fio 4 KiB random writes on two volumes at once: `hi` at QD1 and `lo` at QD32.
fn fio_high_next_to_low(d: &Daemon, hi: &str, lo: &str, secs: u64) {
    require_tool("fio");
    let mut cmd = Command::new("fio");
    cmd.args([
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4096",
        "--size=32M",
        "--time_based",
        &format!("--runtime={secs}"),
        "--output-format=terse",
    ]);
    for (name, qd) in [(hi, 1), (lo, 32)] {
        cmd.arg(format!("--name={name}"))
            .arg(format!("--uri={}", d.nbd_uri(name)))
            .arg(format!("--iodepth={qd}"));
    }
    let o = run_bounded(&mut cmd, Duration::from_secs(secs + 60));
    assert!(o.status.success(), "fio failed: {}", output_text(&o));
}

/// `--io-priority` schedules: while a high volume is busy, a saturated low volume is held to
/// its share of the node's I/O slots (its requests wait; the high ones never do). Switching
/// the low volume to high (`volume update`) applies to the attached volume at once: one
/// class alone is never limited.
#[test]
fn io_priority_classes_hold_a_low_volume_to_its_share_next_to_a_high_one() {
    let d = Daemon::start(DaemonOpts {
        extra_args: vec!["--io-slots".into(), "4".into()],
        ..Default::default()
    });
    for (name, class) in [("hi", "high"), ("lo", "low")] {
        d.ctl_ok(&[
            "volume",
            "create",
            name,
            "--size",
            "32MiB",
            "--io-priority",
            class,
        ]);
        d.ctl_ok(&["volume", "attach", name]);
    }
    let waited = |class: &str| {
        d.metric(&format!(
            "tandem_class_waited_total{{class=\"{class}\",gate=\"frontend\"}}"
        ))
    };
    let ops = |class: &str| d.metric(&format!("tandem_class_ops_total{{class=\"{class}\"}}"));

    fio_high_next_to_low(&d, "hi", "lo", 3);
    let (low_waited, high_waited) = (waited("low"), waited("high"));
    let (low_ops, high_ops) = (ops("low"), ops("high"));
    assert!(
        high_ops > 100.0 && low_ops > 100.0,
        "both volumes ran: {high_ops} high, {low_ops} low"
    );
    assert!(
        low_waited > 0.0,
        "the low volume at QD32 was held to its share next to the high one"
    );
    assert_eq!(high_waited, 0.0, "a high I/O never waited");
    assert!(
        d.metric("tandem_class_wait_seconds_total{class=\"low\",gate=\"frontend\"}") > 0.0,
        "the low class's waiting time is counted"
    );
    assert!(
        d.metrics()
            .contains("tandem_class_latency_seconds_count{class=\"high\"}"),
        "per-class latency histograms are exported"
    );
    let hi_writes = d.metric("tandem_volume_write_latency_seconds_count{volume=\"hi\"}");
    assert_eq!(
        hi_writes,
        d.metric("tandem_volume_write_ops_total{volume=\"hi\"}"),
        "every write of the volume is in its latency histogram"
    );
    assert!(hi_writes > 100.0);

    // Both high now: one class, nothing waits, and lo's I/O counts as high.
    d.ctl_ok(&["volume", "update", "lo", "--io-priority", "high"]);
    let insp = d.ctl_json(&["volume", "inspect", "lo"]);
    assert_eq!(insp["io_priority"], "high", "{insp}");
    fio_high_next_to_low(&d, "hi", "lo", 2);
    assert_eq!(waited("low"), low_waited, "no low I/O any more");
    assert_eq!(waited("high"), 0.0, "one class alone is never limited");
    assert_eq!(ops("low"), low_ops);
    assert!(ops("high") > high_ops + 100.0);
}
