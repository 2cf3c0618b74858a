//! fio jobs through the nbd ioengine, and what the harness reads from fio's JSON.
//!
//! One fio process per measured point; one fio job (one NBD connection) per volume, with
//! `--group_reporting` so that several volumes give one aggregate. Latency is fio's total
//! latency (`lat` = `slat` + `clat`, `--lat_percentiles=1`): with the nbd ioengine, libnbd
//! may send a request and read its reply inside fio's submit call, so `clat` alone
//! under-reports (see docs/BENCHMARKS.md).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::children::run_bounded;
use crate::workload::Workload;

/// Slack on top of a job's runtime and ramp before it is killed.
const FIO_SLACK: Duration = Duration::from_secs(120);
/// Bound on a precondition fill.
const FILL_TIMEOUT: Duration = Duration::from_secs(1800);
/// Queue depth of the precondition fill.
const FILL_QD: u32 = 8;

/// What one fio run measured (aggregate over its jobs).
#[derive(Clone, Debug)]
pub struct FioResult {
    pub iops: f64,
    pub bw_bytes: f64,
    pub total_ios: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub flush_p50_us: Option<f64>,
}

/// The common flags of a measured job (without the per-volume `--name`/`--uri`).
pub fn job_args(w: Workload, size_mib: u64, runtime_s: u64, ramp_s: u64) -> Vec<String> {
    let mut a = vec![
        "--ioengine=nbd".to_string(),
        format!("--rw={}", w.fio_rw()),
        format!("--bs={}", w.block_bytes()),
        format!("--iodepth={}", w.qd()),
        format!("--size={size_mib}M"),
        "--time_based".into(),
        format!("--runtime={runtime_s}"),
        format!("--ramp_time={ramp_s}"),
        "--numjobs=1".into(),
        "--lat_percentiles=1".into(),
        "--percentile_list=50:99:99.9".into(),
        "--group_reporting".into(),
        "--output-format=json".into(),
    ];
    if w.fsync() {
        a.push("--fsync=1".into());
    }
    a
}

/// One fio job of [`run_jobs`]: a volume written at its own queue depth.
pub struct JobSpec<'a> {
    pub name: &'a str,
    pub uri: &'a str,
    pub qd: u32,
}

/// 4 KiB random writes on several volumes at once, each job at its own queue depth and
/// reported on its own (no `--group_reporting`), in the order of `jobs`.
pub fn run_jobs(
    jobs: &[JobSpec<'_>],
    size_mib: u64,
    runtime_s: u64,
    ramp_s: u64,
    out: &Path,
) -> Result<Vec<FioResult>> {
    let mut cmd = Command::new("fio");
    cmd.args(
        job_args(Workload::RandWriteQd1, size_mib, runtime_s, ramp_s)
            .into_iter()
            .filter(|a| !a.starts_with("--iodepth=") && a != "--group_reporting"),
    )
    .arg(format!("--output={}", out.display()));
    for j in jobs {
        cmd.arg(format!("--name={}", j.name))
            .arg(format!("--uri={}", j.uri))
            .arg(format!("--iodepth={}", j.qd));
    }
    let limit = Duration::from_secs(runtime_s + ramp_s) + FIO_SLACK;
    let o = run_bounded(&mut cmd, "fio", limit)?;
    if !o.status.success() {
        bail!(
            "fio on {} failed ({}): {}",
            jobs.iter().map(|j| j.uri).collect::<Vec<_>>().join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(out).with_context(|| format!("read {}", out.display()))?;
    let start = text.find('{').context("no JSON in fio output")?;
    let v: Value = serde_json::from_str(&text[start..])
        .with_context(|| format!("parse fio output {}", out.display()))?;
    jobs.iter()
        .map(|j| {
            let job = v["jobs"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["jobname"].as_str() == Some(j.name)))
                .with_context(|| format!("fio output {} has no job {}", out.display(), j.name))?;
            parse_job(job).with_context(|| format!("fio job {} in {}", j.name, out.display()))
        })
        .collect()
}

/// Runs workload `w` on every URI at once; fio's JSON goes to `out`.
pub fn run(
    w: Workload,
    uris: &[String],
    size_mib: u64,
    runtime_s: u64,
    ramp_s: u64,
    out: &Path,
) -> Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.args(job_args(w, size_mib, runtime_s, ramp_s))
        .arg(format!("--output={}", out.display()));
    for (i, uri) in uris.iter().enumerate() {
        cmd.arg(format!("--name={}-{i}", w.name()))
            .arg(format!("--uri={uri}"));
    }
    let limit = Duration::from_secs(runtime_s + ramp_s) + FIO_SLACK;
    let o = run_bounded(&mut cmd, "fio", limit)?;
    if !o.status.success() {
        bail!(
            "fio {w} on {} failed ({}): {}",
            uris.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(out).with_context(|| format!("read {}", out.display()))?;
    parse(&text).with_context(|| format!("parse fio output {}", out.display()))
}

/// Sequential 1 MiB write of the whole of every URI (in parallel): every measured write is
/// then an overwrite of allocated space and every read hits written data.
pub fn fill(uris: &[String], size_mib: u64, out: &Path) -> Result<()> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--ioengine=nbd",
        "--rw=write",
        "--bs=1M",
        &format!("--iodepth={FILL_QD}"),
        &format!("--size={size_mib}M"),
        "--output-format=json",
        &format!("--output={}", out.display()),
    ]);
    for (i, uri) in uris.iter().enumerate() {
        cmd.arg(format!("--name=fill-{i}"))
            .arg(format!("--uri={uri}"));
    }
    let o = run_bounded(&mut cmd, "fio fill", FILL_TIMEOUT)?;
    if !o.status.success() {
        bail!(
            "fio fill of {} failed: {}",
            uris.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn pct(d: &Value, key: &str, p: &str) -> Option<f64> {
    d[key]["percentile"][p].as_f64().map(|ns| ns / 1000.0)
}

/// Reads fio's JSON output (the first, group-reported, job).
pub fn parse(text: &str) -> Result<FioResult> {
    // fio may print notes before the JSON document.
    let start = text.find('{').context("no JSON in fio output")?;
    let v: Value = serde_json::from_str(&text[start..])?;
    parse_job(&v["jobs"][0])
}

/// Reads one job of fio's JSON output.
fn parse_job(job: &Value) -> Result<FioResult> {
    let write = &job["write"];
    let d = if write["total_ios"].as_u64().unwrap_or(0) > 0 {
        write
    } else {
        &job["read"]
    };
    let total_ios = d["total_ios"].as_u64().unwrap_or(0);
    if total_ios == 0 {
        bail!("fio completed no I/O");
    }
    let p = |q| pct(d, "lat_ns", q).with_context(|| format!("no lat_ns percentile {q}"));
    Ok(FioResult {
        iops: d["iops"].as_f64().unwrap_or(0.0),
        bw_bytes: d["bw_bytes"].as_f64().unwrap_or(0.0),
        total_ios,
        p50_us: p("50.000000")?,
        p99_us: p("99.000000")?,
        p999_us: p("99.900000")?,
        flush_p50_us: pct(&job["sync"], "lat_ns", "50.000000"),
    })
}
