//! The I/O priority workload: a `high` volume at QD1 next to a saturated `low` volume at
//! QD32, both RF 1 on node 1 (one node's class gate decides; docs/ARCHITECTURE.md, "I/O
//! priority classes").
//!
//! Four points per round, in a rotating order:
//! * the `high` volume alone (4 KiB random write, QD1);
//! * the `low` volume alone (4 KiB random write, QD32);
//! * both at once (one fio process, one job per volume);
//! * both at once with the `low` volume switched to `high` for the job: the same load
//!   with no class difference, i.e. what the `high` volume gets without classes.
//!
//! The records' workloads are [`HIGH_ALONE`] and so on; their ratios are in the report.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cluster::Cluster;
use crate::fio::{self, FioResult, JobSpec};
use crate::record::{Record, TANDEM};

pub const HIGH_ALONE: &str = "priority-high-qd1-alone";
pub const LOW_ALONE: &str = "priority-low-qd32-alone";
pub const HIGH_WITH_LOW: &str = "priority-high-qd1-with-low";
pub const LOW_WITH_HIGH: &str = "priority-low-qd32-with-high";
pub const HIGH_WITH_SAME: &str = "priority-high-qd1-with-low-as-high";
pub const LOW_AS_HIGH: &str = "priority-low-qd32-as-high-with-high";

const HIGH_VOLUME: &str = "prio-high";
const LOW_VOLUME: &str = "prio-low";
const HIGH_QD: u32 = 1;
const LOW_QD: u32 = 32;
/// How long a class change takes to reach the attached volume (the attach node applies
/// it in the update itself; this is slack for the reconciler).
const CLASS_SETTLE: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Point {
    HighAlone,
    LowAlone,
    Both,
    BothSameClass,
}

pub const POINTS: [Point; 4] = [
    Point::HighAlone,
    Point::LowAlone,
    Point::Both,
    Point::BothSameClass,
];

impl Point {
    pub fn label(self) -> &'static str {
        match self {
            Point::HighAlone => "priority: high alone",
            Point::LowAlone => "priority: low alone",
            Point::Both => "priority: high next to low",
            Point::BothSameClass => "priority: high next to low switched to high",
        }
    }
}

/// The two volumes' NBD URIs.
pub struct Volumes {
    high: String,
    low: String,
}

/// Creates, attaches and fills the two volumes.
pub fn setup(cluster: &Cluster, size_mib: u64, raw: &Path) -> Result<Volumes> {
    let high = cluster.create_volume_with(HIGH_VOLUME, size_mib, 1, &["--io-priority", "high"])?;
    let low = cluster.create_volume_with(LOW_VOLUME, size_mib, 1, &["--io-priority", "low"])?;
    fio::fill(
        &[high.clone(), low.clone()],
        size_mib,
        &raw.join("fill-priority.json"),
    )?;
    Ok(Volumes { high, low })
}

fn set_class(cluster: &Cluster, volume: &str, class: &str) -> Result<()> {
    cluster
        .ctl(1, &["volume", "update", volume, "--io-priority", class])
        .with_context(|| format!("set the class of {volume} to {class}"))?;
    std::thread::sleep(CLASS_SETTLE);
    Ok(())
}

fn record(workload: &str, qd: u32, round: u32, r: &FioResult) -> Record {
    Record {
        workload: workload.into(),
        target: TANDEM.into(),
        rf: 1,
        rtt_ms: 0.0,
        volumes: 1,
        qd,
        p50_us: Some(r.p50_us),
        p99_us: Some(r.p99_us),
        p999_us: Some(r.p999_us),
        iops: Some(r.iops),
        mb_s: Some(r.bw_bytes / 1e6),
        round: Some(round),
        ..Default::default()
    }
}

/// Runs one point; returns one record per volume that ran.
#[allow(clippy::too_many_arguments)]
pub fn run(
    point: Point,
    cluster: &Cluster,
    v: &Volumes,
    size_mib: u64,
    runtime_s: u64,
    ramp_s: u64,
    round: u32,
    out: &Path,
) -> Result<Vec<Record>> {
    let high = JobSpec {
        name: "high",
        uri: &v.high,
        qd: HIGH_QD,
    };
    let low = JobSpec {
        name: "low",
        uri: &v.low,
        qd: LOW_QD,
    };
    let go = |jobs: &[JobSpec<'_>]| fio::run_jobs(jobs, size_mib, runtime_s, ramp_s, out);
    Ok(match point {
        Point::HighAlone => {
            let r = go(&[high])?;
            vec![record(HIGH_ALONE, HIGH_QD, round, &r[0])]
        }
        Point::LowAlone => {
            let r = go(&[low])?;
            vec![record(LOW_ALONE, LOW_QD, round, &r[0])]
        }
        Point::Both => {
            let r = go(&[high, low])?;
            vec![
                record(HIGH_WITH_LOW, HIGH_QD, round, &r[0]),
                record(LOW_WITH_HIGH, LOW_QD, round, &r[1]),
            ]
        }
        Point::BothSameClass => {
            set_class(cluster, LOW_VOLUME, "high")?;
            let r = go(&[high, low]);
            // Back to low whatever happened, so the next point measures classes again.
            set_class(cluster, LOW_VOLUME, "low")?;
            let r = r?;
            vec![
                record(HIGH_WITH_SAME, HIGH_QD, round, &r[0]),
                record(LOW_AS_HIGH, LOW_QD, round, &r[1]),
            ]
        }
    })
}
