//! The results directory: `results.json`, `report.md` (tables, ratios, the targets of the
//! issue and whether they are met) and the plots. Everything here is computed from the
//! records of the run; `tandem-bench report --from DIR` regenerates it from `results.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::plot;
use crate::priority;
use crate::record::{Record, Results, LOCAL, QEMU_NBD, TANDEM};
use crate::stats::median;
use crate::workload::{Workload, RESYNC, SCALE_WORKLOAD};

/// Writes results.json, report.md and the plots into `dir`.
pub fn write_all(results: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(results)?;
    std::fs::write(dir.join("results.json"), json).context("write results.json")?;
    plot::draw_all(&results.records, dir)?;
    std::fs::write(dir.join("report.md"), markdown(results)).context("write report.md")?;
    Ok(())
}

/// Regenerates report.md and the plots from `dir/results.json`.
pub fn regenerate(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("results.json"))
        .with_context(|| format!("read {}", dir.join("results.json").display()))?;
    let results: Results = serde_json::from_str(&text).context("parse results.json")?;
    plot::draw_all(&results.records, dir)?;
    std::fs::write(dir.join("report.md"), markdown(&results)).context("write report.md")?;
    Ok(())
}

fn f(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "–".into(),
    }
}

/// Reads one figure of a record.
type Figure = fn(&Record) -> Option<f64>;

/// Selects one point among records.
#[derive(Clone, Copy)]
struct Sel<'a> {
    workload: &'a str,
    target: &'a str,
    rf: u32,
    rtt_ms: f64,
    volumes: u32,
}

impl Sel<'_> {
    fn matches(&self, r: &Record) -> bool {
        r.workload == self.workload
            && r.target == self.target
            && r.rf == self.rf
            && (r.rtt_ms - self.rtt_ms).abs() < 1e-9
            && r.volumes == self.volumes
    }
}

fn sel<'a>(workload: &'a str, target: &'a str, rf: u32) -> Sel<'a> {
    Sel {
        workload,
        target,
        rf,
        rtt_ms: 0.0,
        volumes: 1,
    }
}

fn find<'a>(records: &'a [Record], s: Sel<'_>) -> Option<&'a Record> {
    records.iter().find(|r| s.matches(r))
}

/// Ratio a/b of one figure, computed per round and then the median; with the per-round
/// values.
fn ratio(per_round: &[Record], a: Sel<'_>, b: Sel<'_>, fig: Figure) -> Option<(f64, Vec<f64>)> {
    let by_round = |s: Sel<'_>| -> BTreeMap<u32, f64> {
        per_round
            .iter()
            .filter(|r| s.matches(r))
            .filter_map(|r| Some((r.round?, fig(r)?)))
            .collect()
    };
    let (ra, rb) = (by_round(a), by_round(b));
    let v: Vec<f64> = ra
        .iter()
        .filter_map(|(round, x)| Some(x / rb.get(round)?))
        .collect();
    Some((median(v.clone())?, v))
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One row of the targets table.
struct Verdict {
    what: String,
    needs: String,
    value: Option<(f64, Vec<f64>)>,
    met: Option<bool>,
}

fn verdicts(res: &Results) -> Vec<Verdict> {
    let pr = &res.per_round;
    let (qd1, qd32, seq) = (
        Workload::RandWriteQd1.name(),
        Workload::RandWriteQd32.name(),
        Workload::SeqWrite1m.name(),
    );
    let p50 = |r: &Record| r.p50_us;
    let iops = |r: &Record| r.iops;
    let mbs = |r: &Record| r.mb_s;
    let mut v = Vec::new();
    let mut push = |what: &str, needs: &str, value: Option<(f64, Vec<f64>)>, le: bool, lim: f64| {
        let met = value
            .as_ref()
            .map(|(m, _)| if le { *m <= lim } else { *m >= lim });
        v.push(Verdict {
            what: what.into(),
            needs: needs.into(),
            value,
            met,
        });
    };
    push(
        "tandem RF 1 / qemu-nbd, QD1 write p50 latency",
        "≤ 1.00",
        ratio(pr, sel(qd1, TANDEM, 1), sel(qd1, QEMU_NBD, 1), p50),
        true,
        1.0,
    );
    push(
        "tandem RF 1 / qemu-nbd, QD32 write IOPS",
        "≥ 1.00",
        ratio(pr, sel(qd32, TANDEM, 1), sel(qd32, QEMU_NBD, 1), iops),
        false,
        1.0,
    );
    push(
        "RF 3 / RF 1, QD1 write p50 latency",
        "≤ 1.50",
        ratio(pr, sel(qd1, TANDEM, 3), sel(qd1, TANDEM, 1), p50),
        true,
        1.5,
    );
    push(
        "RF 3 / RF 1, QD32 write IOPS",
        "≥ 0.60",
        ratio(pr, sel(qd32, TANDEM, 3), sel(qd32, TANDEM, 1), iops),
        false,
        0.6,
    );
    push(
        "RF 3 / RF 1, 1 MiB sequential write MB/s",
        "≥ 0.70",
        ratio(pr, sel(seq, TANDEM, 3), sel(seq, TANDEM, 1), mbs),
        false,
        0.7,
    );
    // Metro RF 2: p50 within 10% of the model at every RTT.
    let mut rtts: Vec<f64> = res
        .records
        .iter()
        .filter(|r| r.target == TANDEM && r.workload == qd1 && r.rf == 2 && r.volumes == 1)
        .map(|r| r.rtt_ms)
        .collect();
    rtts.sort_by(|a, b| a.total_cmp(b));
    rtts.dedup();
    for rtt in rtts {
        let s = Sel {
            rtt_ms: rtt,
            ..sel(qd1, TANDEM, 2)
        };
        let per: Vec<f64> = pr
            .iter()
            .filter(|r| s.matches(r))
            .filter_map(|r| r.model_ratio)
            .collect();
        let value = median(per.clone()).map(|m| (m, per));
        let met = value.as_ref().map(|(m, _)| (*m - 1.0).abs() <= 0.10);
        v.push(Verdict {
            what: format!("RF 2 at injected RTT {rtt} ms, p50 / model"),
            needs: "0.90–1.10".into(),
            value,
            met,
        });
    }
    let max_vols = res
        .records
        .iter()
        .filter(|r| r.workload == SCALE_WORKLOAD)
        .map(|r| r.volumes)
        .max();
    if let Some(n) = max_vols.filter(|n| *n > 1) {
        let rf = res.meta.scale_rf;
        let base = Sel {
            volumes: 1,
            ..sel(SCALE_WORKLOAD, TANDEM, rf)
        };
        let many = Sel { volumes: n, ..base };
        v.push(Verdict {
            what: format!("{n} volumes / 1 volume, aggregate IOPS (RF {rf})"),
            needs: "≥ 1.00".into(),
            value: ratio(pr, many, base, iops),
            met: None,
        });
        if let Some(last) = v.last_mut() {
            last.met = last.value.as_ref().map(|(m, _)| *m >= 1.0);
        }
    }
    // I/O priority classes: the high volume's tail next to a saturated low one.
    let p99 = |r: &Record| r.p99_us;
    let alone = sel(priority::HIGH_ALONE, TANDEM, 1);
    if let Some(value) = ratio(pr, sel(priority::HIGH_WITH_LOW, TANDEM, 1), alone, p99) {
        let met = Some(value.0 <= 1.5);
        v.push(Verdict {
            what: "high QD1 next to low QD32 / high alone, write p99".into(),
            needs: "≤ 1.50".into(),
            value: Some(value),
            met,
        });
        let info = [
            (
                "the same with the low volume switched to high (no class difference), p99",
                priority::HIGH_WITH_SAME,
                priority::HIGH_ALONE,
                p99 as Figure,
            ),
            (
                "high next to low / high alone, IOPS",
                priority::HIGH_WITH_LOW,
                priority::HIGH_ALONE,
                iops as Figure,
            ),
            (
                "low next to high / low alone, IOPS",
                priority::LOW_WITH_HIGH,
                priority::LOW_ALONE,
                iops as Figure,
            ),
        ];
        for (what, a, b, fig) in info {
            v.push(Verdict {
                what: what.into(),
                needs: "(reported)".into(),
                value: ratio(pr, sel(a, TANDEM, 1), sel(b, TANDEM, 1), fig),
                met: None,
            });
        }
    }
    v
}

fn markdown(res: &Results) -> String {
    let m = &res.meta;
    let recs = &res.records;
    let mut o = String::new();
    let _ = writeln!(o, "# tandem-bench report\n");
    let _ = writeln!(
        o,
        "Measured by `tandem-bench` ({} mode) on {}, in {:.0} s. Every figure below comes \
         from this run; nothing is quoted.\n",
        m.mode, m.started_utc, m.duration_s
    );
    let _ = writeln!(o, "Command:\n\n```\n{}\n```\n", m.command);
    let _ = writeln!(o, "| machine | |\n|---|---|");
    for (k, v) in &m.machine {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    for n in &m.notes {
        let _ = writeln!(o, "| note | {n} |");
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Method: {} round(s); every job runs {} s after a {} s ramp. Volumes of {} MiB \
         (scaling volumes {} MiB, RF {}), each filled once with a sequential 1 MiB write \
         before measuring, so writes are overwrites and reads hit data. tandemd and the local \
         store use the `{}` I/O engine. Targets are interleaved (per round and workload, each \
         target once, in an order that rotates by round); the data directory's filesystem is \
         synced before every job. Latency is fio's total latency (`lat`) per request. The \
         fsync workload is fio `--fsync=1`: an NBD flush (`fdatasync` on every replica) after \
         every write; its latency columns are the writes', its flush p50 is separate. CPU is \
         summed over every tandemd process (qemu-nbd's own for qemu-nbd, the harness's for \
         the local store), per thread from /proc schedstat, scaled to the measured part of \
         the job, divided by the operations completed. Injected RTT: the harness's delay \
         proxy in front of every node's data-path listener adds RTT/2 each way; the measured \
         RTT is a 4 KiB ping-pong through an identical proxy.\n",
        m.rounds, m.runtime_s, m.ramp_s, m.volume_mib, m.scale_volume_mib, m.scale_rf, m.io_engine
    );
    let _ = writeln!(o, "fio job: `{}`\n", m.fio_command);

    // Targets.
    let _ = writeln!(o, "## Targets (from the issue) and what this run reached\n");
    let _ = writeln!(
        o,
        "Ratios are computed per round (the two jobs of a ratio ran minutes apart), then the \
         median over rounds.\n"
    );
    let _ = writeln!(o, "| target | needs | measured | per round | met |");
    let _ = writeln!(o, "|---|---:|---:|---|---|");
    for v in verdicts(res) {
        let (val, per) = match &v.value {
            Some((m, per)) => (format!("{m:.2}"), list(per)),
            None => ("not measured".into(), String::new()),
        };
        let met = match v.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(o, "| {} | {} | {val} | {per} | {met} |", v.what, v.needs);
    }
    let _ = writeln!(o);

    // Baselines.
    let _ = writeln!(
        o,
        "## Tandem against the baselines (no injected RTT, one volume)\n\nMedian over rounds. \
         `local`: the replica store in-process, no network, no NBD. `qemu-nbd`: a raw file on \
         the same filesystem, through the same fio nbd engine.\n"
    );
    let _ = writeln!(
        o,
        "| workload | target | RF | p50 µs | p99 µs | p99.9 µs | IOPS | MB/s | CPU µs/op | flush p50 µs |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for w in Workload::ALL {
        let mut rows: Vec<&Record> = recs
            .iter()
            .filter(|r| r.workload == w.name() && r.rtt_ms == 0.0 && r.volumes == 1)
            .collect();
        rows.sort_by_key(|r| (target_order(&r.target), r.rf));
        for r in rows {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.target,
                r.rf,
                f(r.p50_us, 1),
                f(r.p99_us, 1),
                f(r.p999_us, 1),
                f(r.iops, 0),
                f(r.mb_s, 1),
                f(r.cpu_us_per_op, 1),
                f(r.flush_p50_us, 1)
            );
        }
    }
    let _ = writeln!(o);

    // Ratios against qemu-nbd and RF 1.
    let _ = writeln!(
        o,
        "### Ratios\n\nLatency: lower is better; IOPS and MB/s: higher is better. Per round, \
         then the median.\n"
    );
    let _ = writeln!(o, "| workload | figure | ratio | median | per round |");
    let _ = writeln!(o, "|---|---|---|---:|---|");
    for w in Workload::ALL {
        let figs: Vec<(&str, Figure)> = match w {
            Workload::SeqWrite1m => vec![("MB/s", |r| r.mb_s)],
            Workload::RandWriteQd32 | Workload::RandReadQd32 => vec![("IOPS", |r| r.iops)],
            _ => vec![("p50", |r| r.p50_us), ("IOPS", |r| r.iops)],
        };
        for (name, fig) in figs {
            let mut pairs = vec![(
                "tandem RF 1 / qemu-nbd".to_string(),
                sel(w.name(), TANDEM, 1),
                sel(w.name(), QEMU_NBD, 1),
            )];
            for rf in [2, 3] {
                pairs.push((
                    format!("RF {rf} / RF 1"),
                    sel(w.name(), TANDEM, rf),
                    sel(w.name(), TANDEM, 1),
                ));
            }
            pairs.push((
                "tandem RF 1 / local store".to_string(),
                sel(w.name(), TANDEM, 1),
                sel(w.name(), LOCAL, 1),
            ));
            for (label, a, b) in pairs {
                if let Some((med, per)) = ratio(&res.per_round, a, b, fig) {
                    let _ = writeln!(o, "| {w} | {name} | {label} | {med:.2} | {} |", list(&per));
                }
            }
        }
    }
    let _ = writeln!(o);

    // CPU per replicated write.
    let _ = writeln!(
        o,
        "### CPU per 4 KiB write, summed over every tandemd process\n\n| RF | QD1 µs/write | \
         QD32 µs/write | QD32 / RF 1 |\n|---:|---:|---:|---:|"
    );
    let cpu = |w: Workload, rf| find(recs, sel(w.name(), TANDEM, rf)).and_then(|r| r.cpu_us_per_op);
    for rf in 1..=3 {
        let (a, b) = (
            cpu(Workload::RandWriteQd1, rf),
            cpu(Workload::RandWriteQd32, rf),
        );
        if a.is_none() && b.is_none() {
            continue;
        }
        let rel = b
            .zip(cpu(Workload::RandWriteQd32, 1))
            .map(|(b, one)| b / one);
        let _ = writeln!(o, "| {rf} | {} | {} | {} |", f(a, 1), f(b, 1), f(rel, 2));
    }
    let _ = writeln!(o);

    // I/O priority classes.
    let prio: Vec<&Record> = [
        priority::HIGH_ALONE,
        priority::HIGH_WITH_LOW,
        priority::HIGH_WITH_SAME,
        priority::LOW_ALONE,
        priority::LOW_WITH_HIGH,
        priority::LOW_AS_HIGH,
    ]
    .iter()
    .filter_map(|w| find(recs, sel(w, TANDEM, 1)))
    .collect();
    if !prio.is_empty() {
        let _ = writeln!(
            o,
            "## I/O priority classes (one node, RF 1, 4 KiB random write)\n\nA `high` volume \
             at QD1 and a `low` volume at QD32, alone and together; `as-high`: the `low` \
             volume switched to `high` for the job (the same load without a class \
             difference). Median over rounds.\n\n| workload | QD | p50 µs | p99 µs | p99.9 µs | IOPS |\n|---|---:|---:|---:|---:|---:|"
        );
        for r in prio {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.qd,
                f(r.p50_us, 1),
                f(r.p99_us, 1),
                f(r.p999_us, 1),
                f(r.iops, 0)
            );
        }
        let _ = writeln!(o);
    }

    // RTT sweep.
    let _ = writeln!(
        o,
        "## Injected RTT (metro replication) and the physical-limit model\n\nModel = the \
         same round's RF 1 QD1 write p50 (NBD, daemon and store) + round trip measured through \
         the delay proxy at that RTT (RF 1: the local store write alone). Ratio = measured p50 / model, per round then median.\n\n\
         ![latency against RTT]({})\n",
        plot::LATENCY_VS_RTT
    );
    let _ = writeln!(
        o,
        "| RF | workload | injected RTT ms | measured RTT p50 µs | p50 µs | p99 µs | p99.9 µs | model µs | p50 / model | IOPS | CPU µs/op |"
    );
    let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut sweep: Vec<&Record> = recs
        .iter()
        .filter(|r| {
            r.target == TANDEM
                && r.volumes == 1
                && (r.workload == Workload::RandWriteQd1.name()
                    || (r.workload == Workload::RandWriteQd32.name() && r.rf >= 2))
                && (r.rf >= 2 || r.rtt_ms == 0.0)
        })
        .collect();
    sweep.sort_by(|a, b| {
        (a.workload.as_str(), a.rf)
            .cmp(&(b.workload.as_str(), b.rf))
            .then(a.rtt_ms.total_cmp(&b.rtt_ms))
    });
    for r in sweep {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.rf,
            r.workload,
            r.rtt_ms,
            f(r.measured_rtt_us, 1),
            f(r.p50_us, 1),
            f(r.p99_us, 1),
            f(r.p999_us, 1),
            f(r.model_us, 1),
            f(r.model_ratio, 2),
            f(r.iops, 0),
            f(r.cpu_us_per_op, 1)
        );
    }
    let _ = writeln!(o, "\n![latency against RF]({})\n", plot::LATENCY_VS_RF);

    // Scaling.
    let _ = writeln!(
        o,
        "## Volumes written at once\n\n4 KiB random write, QD32 on each volume (one fio job \
         and NBD connection per volume), RF {}, volumes of {} MiB; IOPS are the aggregate.\n\n\
         ![IOPS against volumes]({})\n",
        m.scale_rf,
        m.scale_volume_mib,
        plot::IOPS_VS_VOLUMES
    );
    let _ = writeln!(
        o,
        "| volumes | aggregate IOPS | IOPS per volume | p50 µs | p99 µs | CPU µs/op | IOPS / 1 volume |"
    );
    let _ = writeln!(o, "|---:|---:|---:|---:|---:|---:|---:|");
    let mut scale: Vec<&Record> = recs
        .iter()
        .filter(|r| r.workload == SCALE_WORKLOAD)
        .collect();
    scale.sort_by_key(|r| r.volumes);
    let one = scale.iter().find(|r| r.volumes == 1).and_then(|r| r.iops);
    for r in &scale {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.volumes,
            f(r.iops, 0),
            f(r.iops.map(|i| i / r.volumes as f64), 0),
            f(r.p50_us, 1),
            f(r.p99_us, 1),
            f(r.cpu_us_per_op, 1),
            f(r.iops.zip(one).map(|(a, b)| a / b), 2)
        );
    }
    let _ = writeln!(o);

    // Resync.
    if let Some(r) = recs.iter().find(|r| r.workload == RESYNC) {
        let _ = writeln!(
            o,
            "## Resync\n\nAn RF 2 volume; node 2's data link is cut (the proxy drops its \
             connections and refuses new ones) while the whole volume is written, so the \
             replica is ejected and every region is dirty; then the link is healed. Time is \
             wall time from the heal until `volume inspect` shows every replica in sync \
             (polled every 100 ms), so it includes the coordinator's reconnect.\n"
        );
        let _ = writeln!(
            o,
            "| bytes resynced | time from heal s | GiB/s | copy phase s | CPU µs per 4 KiB |\n\
             |---:|---:|---:|---:|---:|\n| {} MiB | {} | {} | {} | {} |\n",
            f(r.resync_bytes.map(|b| b / (1u64 << 20) as f64), 0),
            f(r.resync_s, 2),
            f(r.resync_gib_s, 3),
            f(r.copy_s, 2),
            f(r.cpu_us_per_op, 1)
        );
    }
    o
}

fn target_order(t: &str) -> u8 {
    match t {
        LOCAL => 0,
        QEMU_NBD => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(workload: &str, target: &str, rf: u32, round: u32, p50: f64, iops: f64) -> Record {
        Record {
            workload: workload.into(),
            target: target.into(),
            rf,
            volumes: 1,
            qd: 1,
            p50_us: Some(p50),
            iops: Some(iops),
            round: Some(round),
            ..Default::default()
        }
    }

    #[test]
    fn ratios_pair_jobs_of_the_same_round() {
        // Round 2's tandem job has no qemu-nbd partner, so only round 1 forms a ratio.
        let w = Workload::RandWriteQd1.name();
        let pr = vec![
            rec(w, TANDEM, 1, 1, 50.0, 1.0),
            rec(w, QEMU_NBD, 1, 1, 100.0, 1.0),
            rec(w, TANDEM, 1, 2, 10.0, 1.0),
        ];
        let (m, per) = ratio(&pr, sel(w, TANDEM, 1), sel(w, QEMU_NBD, 1), |r| r.p50_us)
            .expect("one paired round");
        assert_eq!((m, per), (0.5, vec![0.5]));
    }

    #[test]
    fn a_target_is_judged_on_the_median_of_its_rounds() {
        let w = Workload::RandWriteQd32.name();
        let mut pr = Vec::new();
        for (round, tandem_iops) in [(1, 90.0), (2, 120.0), (3, 110.0)] {
            pr.push(rec(w, TANDEM, 1, round, 1.0, tandem_iops));
            pr.push(rec(w, QEMU_NBD, 1, round, 1.0, 100.0));
        }
        let res = Results {
            records: crate::run::medians(&pr),
            per_round: pr,
            ..Default::default()
        };
        let v = verdicts(&res);
        let iops = v
            .iter()
            .find(|v| v.what.contains("QD32 write IOPS") && v.what.contains("qemu-nbd"))
            .expect("the QD32 verdict");
        assert_eq!(iops.value.as_ref().map(|(m, _)| *m), Some(1.1));
        assert_eq!(iops.met, Some(true));
        assert!(
            markdown(&res).contains("| tandem RF 1 / qemu-nbd, QD32 write IOPS | ≥ 1.00 | 1.10 |")
        );
    }
}
