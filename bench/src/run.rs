//! `tandem-bench run`: the matrix, its interleaving, and the measurements.
//!
//! The plan is built up front (so the run can say how long it expects to take and draw a
//! progress bar), then executed job by job on the main thread. Per round:
//! 1. Baselines block, no injected RTT, one volume: for every workload, every target (the
//!    local store, qemu-nbd, and the tandem volumes of each RF) runs once, in an order that
//!    rotates from round to round, so machine drift hits every target alike.
//! 2. RTT sweep: for every injected RTT (order rotating), the replicated volumes (RF >= 2)
//!    run 4 KiB random writes at QD1 (and QD32 in full runs). The RTT-0 point is the one of
//!    the baselines block.
//! 3. Volume scaling: 1, 4, 16 volumes (of RF `scale_rf`) written at once, QD32 each.
//! 4. I/O priority classes (`--priority`): a `high` volume at QD1 and a `low` one at QD32,
//!    alone and together ([`crate::priority`]).
//!
//! Then, once, the resync measurement. Every job is preceded by a `syncfs` of the data
//! directory. Ratios and the model are computed per round; `records` are medians over
//! rounds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cluster::{Cluster, QemuNbd, IN_SYNC_TIMEOUT};
use crate::cpu;
use crate::env::{self, Bins};
use crate::fio;
use crate::local::LocalStore;
use crate::priority;
use crate::proxy;
use crate::record::{Meta, Record, Results, LOCAL, QEMU_NBD, TANDEM};
use crate::stats::median;
use crate::workload::{Workload, RESYNC, SCALE_WORKLOAD};

/// Round trips per RTT measurement through the delay proxy.
const RTT_SAMPLES: usize = 200;
/// Fewer round trips at large RTTs, so that one measurement stays under a second.
const RTT_SAMPLE_BUDGET: Duration = Duration::from_secs(1);
/// Per-job overhead in the duration estimate (fio start, syncfs, CPU snapshots), seconds.
const EST_JOB_OVERHEAD_S: f64 = 1.5;
/// Fill rate assumed by the duration estimate, bytes per second (measured fills on a
/// 2-vCPU VM ran at 150-400 MB/s).
const EST_FILL_BYTES_S: f64 = 150e6;
/// Cluster start-up and volume set-up in the duration estimate, seconds.
const EST_SETUP_S: f64 = 15.0;
/// How often the resync measurement polls the volume.
const RESYNC_POLL: Duration = Duration::from_millis(100);
/// Bound on the resync measurement.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the ejection of the cut replica may take (the replica I/O timeout is 5 s).
const EJECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Name of the resync volume, and of the qemu-nbd export.
const RESYNC_VOLUME: &str = "resync";
const QEMU_EXPORT: &str = "bench";

/// Everything `run` needs (the CLI fills in the quick or full defaults).
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: String,
    pub command: String,
    pub out: PathBuf,
    pub dir: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub rfs: Vec<u32>,
    pub rtts_ms: Vec<f64>,
    pub volumes: Vec<u32>,
    pub workloads: Vec<Workload>,
    pub sweep_qd32: bool,
    pub runtime_s: u64,
    pub ramp_s: u64,
    pub rounds: u32,
    pub size_mib: u64,
    pub scale_size_mib: u64,
    pub scale_rf: u32,
    pub resync_mib: u64,
    pub io_engine: String,
    pub qemu: bool,
    /// Run the I/O priority workload.
    pub priority: bool,
    pub keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Local,
    Qemu,
    Tandem(u32),
}

#[derive(Clone, Debug)]
struct Job {
    round: u32,
    workload: Workload,
    target: Target,
    rtt_ms: f64,
    volumes: u32,
    /// A point of the volume-scaling series (runs on the scaling volumes).
    scale: bool,
    /// A point of the I/O priority workload.
    priority: Option<priority::Point>,
}

fn rotate<T: Clone>(v: &[T], by: usize) -> Vec<T> {
    if v.is_empty() {
        return Vec::new();
    }
    let k = by % v.len();
    v[k..].iter().chain(v[..k].iter()).cloned().collect()
}

fn plan(cfg: &Config) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut targets = vec![Target::Local];
    if cfg.qemu {
        targets.push(Target::Qemu);
    }
    targets.extend(cfg.rfs.iter().map(|&rf| Target::Tandem(rf)));
    let sweep_rtts: Vec<f64> = cfg.rtts_ms.iter().copied().filter(|&r| r > 0.0).collect();
    let replicated: Vec<u32> = cfg.rfs.iter().copied().filter(|&rf| rf >= 2).collect();
    for round in 1..=cfg.rounds {
        let r = (round - 1) as usize;
        for &w in &cfg.workloads {
            for t in rotate(&targets, r) {
                jobs.push(Job {
                    round,
                    workload: w,
                    target: t,
                    rtt_ms: 0.0,
                    volumes: 1,
                    scale: false,
                    priority: None,
                });
            }
        }
        let mut sweep_w = vec![Workload::RandWriteQd1];
        if cfg.sweep_qd32 {
            sweep_w.push(Workload::RandWriteQd32);
        }
        for rtt in rotate(&sweep_rtts, r) {
            for &w in &sweep_w {
                for &rf in &replicated {
                    jobs.push(Job {
                        round,
                        workload: w,
                        target: Target::Tandem(rf),
                        rtt_ms: rtt,
                        volumes: 1,
                        scale: false,
                        priority: None,
                    });
                }
            }
        }
        for n in rotate(&cfg.volumes, r) {
            jobs.push(Job {
                round,
                workload: Workload::RandWriteQd32,
                target: Target::Tandem(cfg.scale_rf),
                rtt_ms: 0.0,
                volumes: n,
                scale: true,
                priority: None,
            });
        }
        if cfg.priority {
            for p in rotate(&priority::POINTS, r) {
                jobs.push(Job {
                    round,
                    workload: Workload::RandWriteQd1,
                    target: Target::Tandem(1),
                    rtt_ms: 0.0,
                    volumes: 1,
                    scale: false,
                    priority: Some(p),
                });
            }
        }
    }
    jobs
}

/// Duration estimate of a plan, seconds.
fn estimate_s(cfg: &Config, jobs: &[Job]) -> f64 {
    let per_job = (cfg.runtime_s + cfg.ramp_s) as f64 + EST_JOB_OVERHEAD_S;
    let rf_sum: u64 = cfg.rfs.iter().map(|&r| r as u64).sum();
    let max_vols = cfg.volumes.iter().copied().max().unwrap_or(0) as u64;
    let prio = if cfg.priority { 2 } else { 0 };
    let fill_bytes = ((cfg.size_mib * (rf_sum + 2 + prio))
        + cfg.scale_size_mib * max_vols * cfg.scale_rf as u64
        + cfg.resync_mib * 4)
        << 20;
    EST_SETUP_S + fill_bytes as f64 / EST_FILL_BYTES_S + jobs.len() as f64 * per_job
}

/// Progress output: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(len: u64) -> Progress {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} jobs, about {eta} left  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Progress { bar }
    }

    fn log(&self, msg: impl AsRef<str>) {
        let line = format!("[tandem-bench] {}", msg.as_ref());
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

/// The running targets.
struct Targets {
    work: PathBuf,
    cluster: Cluster,
    qemu: Option<QemuNbd>,
    local: Option<LocalStore>,
    /// NBD URI of the volume of each RF.
    rf_uris: BTreeMap<u32, String>,
    /// NBD URIs of the scaling volumes.
    scale_uris: Vec<String>,
    /// The I/O priority workload's volumes.
    prio: Option<priority::Volumes>,
}

/// `tandem-bench run`.
pub fn run(cfg: &Config) -> Result<()> {
    validate(cfg)?;
    let started = Instant::now();
    let started_utc = utc_now();
    env::check_tools(cfg.qemu)?;
    let bins = env::find_bins(cfg.bin_dir.as_deref())?;
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("create the results directory {}", cfg.out.display()))?;
    let raw = cfg.out.join("raw");
    std::fs::create_dir_all(&raw)?;
    let parent = match &cfg.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&parent)?;
    let tmp = tempfile::Builder::new()
        .prefix("tandem-bench.")
        .tempdir_in(&parent)
        .with_context(|| format!("create a data directory in {}", parent.display()))?;
    crate::children::remove_on_signal(tmp.path().to_path_buf());
    let work = tmp.path().to_path_buf();

    let jobs = plan(cfg);
    let est = estimate_s(cfg, &jobs);
    eprintln!(
        "[tandem-bench] {} run: {} jobs of {} s (+{} s ramp) in {} round(s), plus fills and the \
         resync; expected to take about {:.0} min ({:.0} s). Data in {}, results in {}.",
        cfg.mode,
        jobs.len(),
        cfg.runtime_s,
        cfg.ramp_s,
        cfg.rounds,
        est / 60.0,
        est,
        work.display(),
        cfg.out.display()
    );
    let machine = env::machine_facts(&work, &bins, cfg.qemu);
    let load_start = env::loadavg();
    let progress = Progress::new(jobs.len() as u64 + 1);

    let t = setup(cfg, &bins, &work, &raw, &progress)?;
    let mut per_round = Vec::new();
    let mut rtt_cache: BTreeMap<(u32, u64), f64> = BTreeMap::new();
    let mut current_rtt = None;
    for (i, job) in jobs.iter().enumerate() {
        let rtt_key = (job.rtt_ms * 1000.0).round() as u64;
        if current_rtt != Some(rtt_key) {
            t.cluster
                .set_rtt(Duration::from_micros((job.rtt_ms * 1000.0) as u64));
            current_rtt = Some(rtt_key);
        }
        let measured_rtt_us = match rtt_cache.get(&(job.round, rtt_key)) {
            Some(v) => *v,
            None => {
                let rtt = Duration::from_micros((job.rtt_ms * 1000.0) as u64);
                let samples = if rtt.is_zero() {
                    RTT_SAMPLES
                } else {
                    (RTT_SAMPLE_BUDGET.as_nanos() / rtt.as_nanos()).clamp(20, RTT_SAMPLES as u128)
                        as usize
                };
                let p = proxy::measure_rtt(rtt, samples).context("measure the proxy RTT")?;
                progress.log(format!(
                    "round {}: injected RTT {} ms, measured through the proxy p50 {:.1} µs \
                     ({} samples)",
                    job.round, job.rtt_ms, p.p50_us, p.samples
                ));
                rtt_cache.insert((job.round, rtt_key), p.p50_us);
                p.p50_us
            }
        };
        let label = format!(
            "round {} {} {} rtt {} ms volumes {}",
            job.round,
            job.workload,
            target_label(job.target),
            job.rtt_ms,
            job.volumes
        );
        progress.bar.set_message(label.clone());
        if let Some(point) = job.priority {
            let prio = t.prio.as_ref().context("no priority volumes")?;
            let out = raw.join(format!("{i:04}-r{}-priority-{point:?}.json", job.round));
            let recs = priority::run(
                point,
                &t.cluster,
                prio,
                cfg.size_mib,
                cfg.runtime_s,
                cfg.ramp_s,
                job.round,
                &out,
            )
            .with_context(|| format!("job {}/{}: {}", i + 1, jobs.len(), point.label()))?;
            for rec in recs {
                if let Err(e) = rec.check() {
                    bail!("job {} measured an impossible figure: {e}", point.label());
                }
                progress.log(format!(
                    "[{}/{}] round {} {}: p50 {:.1} µs, p99 {:.1} µs, {:.0} IOPS",
                    i + 1,
                    jobs.len(),
                    job.round,
                    rec.workload,
                    rec.p50_us.unwrap_or(0.0),
                    rec.p99_us.unwrap_or(0.0),
                    rec.iops.unwrap_or(0.0)
                ));
                per_round.push(rec);
            }
            progress.bar.inc(1);
            continue;
        }
        let mut rec = run_job(cfg, &t, job, &raw, i)
            .with_context(|| format!("job {}/{}: {label}", i + 1, jobs.len()))?;
        if matches!(job.target, Target::Tandem(rf) if rf >= 2) {
            rec.measured_rtt_us = Some(measured_rtt_us);
        }
        if let Err(e) = rec.check() {
            bail!("job {label} measured an impossible figure: {e}");
        }
        progress.log(format!(
            "[{}/{}] {label}: p50 {:.1} µs, {:.0} IOPS, {:.1} MB/s, CPU {:.1} µs/op",
            i + 1,
            jobs.len(),
            rec.p50_us.unwrap_or(0.0),
            rec.iops.unwrap_or(0.0),
            rec.mb_s.unwrap_or(0.0),
            rec.cpu_us_per_op.unwrap_or(0.0)
        ));
        per_round.push(rec);
        progress.bar.inc(1);
    }
    t.cluster.set_rtt(Duration::ZERO);
    if cfg.rfs.iter().any(|&r| r >= 2) || cfg.scale_rf >= 2 {
        progress.bar.set_message("resync");
        let rec = resync(cfg, &t, &raw, &progress)?;
        rec.check().map_err(anyhow::Error::msg)?;
        per_round.push(rec);
    }
    progress.bar.inc(1);
    progress.bar.finish_and_clear();

    apply_model(&mut per_round);
    let records = medians(&per_round);
    for r in &records {
        r.check().map_err(anyhow::Error::msg)?;
    }
    let mut notes = vec![
        format!(
            "load average at start: {load_start}; at end: {}",
            env::loadavg()
        ),
        format!("data directory: {}", work.display()),
    ];
    if cfg.keep {
        notes.push("data directory kept (--keep)".into());
    }
    let results =
        Results {
            meta: Meta {
                command: cfg.command.clone(),
                mode: cfg.mode.clone(),
                started_utc,
                duration_s: started.elapsed().as_secs_f64(),
                machine,
                rounds: cfg.rounds,
                runtime_s: cfg.runtime_s,
                ramp_s: cfg.ramp_s,
                volume_mib: cfg.size_mib,
                scale_volume_mib: cfg.scale_size_mib,
                scale_rf: cfg.scale_rf,
                io_engine: cfg.io_engine.clone(),
                fio_command: format!(
                "fio {} --name=... --uri=nbd://127.0.0.1:PORT/VOLUME (one --name/--uri per volume)",
                fio::job_args(Workload::RandWriteQd1, cfg.size_mib, cfg.runtime_s, cfg.ramp_s)
                    .join(" ")
                    .replace("--rw=randwrite --bs=4096 --iodepth=1", "--rw=RW --bs=BS --iodepth=QD")
            ),
                notes,
            },
            records,
            per_round,
        };
    // Stop every process before writing the report, so nothing outlives a failure there.
    drop(t);
    crate::report::write_all(&results, &cfg.out)?;
    if cfg.keep {
        let kept = tmp.keep();
        eprintln!("[tandem-bench] data kept in {}", kept.display());
    }
    eprintln!(
        "[tandem-bench] done in {:.0} s: {}, {}",
        started.elapsed().as_secs_f64(),
        cfg.out.join("results.json").display(),
        cfg.out.join("report.md").display()
    );
    Ok(())
}

fn validate(cfg: &Config) -> Result<()> {
    if cfg.rfs.is_empty() || cfg.rfs.iter().any(|&r| !(1..=3).contains(&r)) {
        bail!("--rf takes replication factors from 1 to 3");
    }
    if !(1..=3).contains(&cfg.scale_rf) {
        bail!("--scale-rf takes a replication factor from 1 to 3");
    }
    if cfg.rtts_ms.iter().any(|r| !r.is_finite() || *r < 0.0) {
        bail!("--rtt takes non-negative milliseconds");
    }
    if cfg.volumes.contains(&0) {
        bail!("--volumes takes positive counts");
    }
    if cfg.runtime_s == 0 || cfg.rounds == 0 {
        bail!("--runtime and --rounds must be positive");
    }
    if cfg.size_mib < 16 || cfg.scale_size_mib < 16 || cfg.resync_mib < 16 {
        bail!("volume sizes must be at least 16 MiB");
    }
    Ok(())
}

fn target_label(t: Target) -> String {
    match t {
        Target::Local => LOCAL.into(),
        Target::Qemu => QEMU_NBD.into(),
        Target::Tandem(rf) => format!("tandem RF {rf}"),
    }
}

/// Starts the cluster, qemu-nbd and the local store; creates and fills the volumes.
fn setup(
    cfg: &Config,
    bins: &Bins,
    work: &Path,
    raw: &Path,
    progress: &Progress,
) -> Result<Targets> {
    let mut n_nodes = cfg.rfs.iter().copied().max().unwrap_or(1).max(cfg.scale_rf);
    if cfg.rfs.iter().any(|&r| r >= 2) {
        n_nodes = n_nodes.max(2);
    }
    progress.log(format!(
        "starting {n_nodes} tandemd nodes ({})",
        bins.tandemd.display()
    ));
    let cluster = Cluster::start(
        bins,
        &work.join("cluster"),
        n_nodes as usize,
        &cfg.io_engine,
    )?;
    for n in &cluster.nodes {
        progress.log(format!(
            "node {} {}: admin {}, NBD {}, data {} behind proxy {}",
            n.index, n.name, n.admin_addr, n.nbd_addr, n.data_addr, n.proxy.addr
        ));
    }
    let mut rf_uris = BTreeMap::new();
    for &rf in &cfg.rfs {
        let uri = cluster.create_volume(&format!("rf{rf}"), cfg.size_mib, rf as usize)?;
        rf_uris.insert(rf, uri);
    }
    let max_vols = cfg.volumes.iter().copied().max().unwrap_or(0);
    let mut scale_uris = Vec::new();
    for i in 0..max_vols {
        scale_uris.push(cluster.create_volume(
            &format!("s{i}"),
            cfg.scale_size_mib,
            cfg.scale_rf as usize,
        )?);
    }
    let qemu = if cfg.qemu {
        let q = QemuNbd::start(&work.join("qemu-nbd"), cfg.size_mib, QEMU_EXPORT)?;
        progress.log(format!("qemu-nbd serving {}", q.uri));
        Some(q)
    } else {
        None
    };

    progress.log(format!(
        "precondition: sequential 1 MiB fill of every volume ({} MiB each; scaling volumes \
         {} MiB)",
        cfg.size_mib, cfg.scale_size_mib
    ));
    for (rf, uri) in &rf_uris {
        fio::fill(
            std::slice::from_ref(uri),
            cfg.size_mib,
            &raw.join(format!("fill-rf{rf}.json")),
        )?;
    }
    if let Some(q) = &qemu {
        fio::fill(
            std::slice::from_ref(&q.uri),
            cfg.size_mib,
            &raw.join("fill-qemu.json"),
        )?;
    }
    if !scale_uris.is_empty() {
        fio::fill(
            &scale_uris,
            cfg.scale_size_mib,
            &raw.join("fill-scale.json"),
        )?;
    }
    let prio = if cfg.priority {
        progress.log(format!(
            "priority workload: a high and a low RF 1 volume of {} MiB on node 1",
            cfg.size_mib
        ));
        Some(priority::setup(&cluster, cfg.size_mib, raw)?)
    } else {
        None
    };
    let local = LocalStore::open(&work.join("local"), cfg.size_mib, &cfg.io_engine)?;
    for &rf in &cfg.rfs {
        cluster.wait_in_sync(&format!("rf{rf}"), rf as usize, IN_SYNC_TIMEOUT)?;
    }
    for i in 0..max_vols {
        cluster.wait_in_sync(&format!("s{i}"), cfg.scale_rf as usize, IN_SYNC_TIMEOUT)?;
    }
    env::sync_fs(work)?;
    progress.log("every replica in sync; measuring");
    Ok(Targets {
        work: work.to_path_buf(),
        cluster,
        qemu,
        local: Some(local),
        rf_uris,
        scale_uris,
        prio,
    })
}

impl Drop for Targets {
    fn drop(&mut self) {
        if let Some(l) = self.local.take() {
            let _ = l.close();
        }
    }
}

fn run_job(cfg: &Config, t: &Targets, job: &Job, raw: &Path, index: usize) -> Result<Record> {
    env::sync_fs(&t.work)?;
    let w = job.workload;
    let mut rec = Record {
        workload: if job.scale {
            SCALE_WORKLOAD.into()
        } else {
            w.name().into()
        },
        rf: match job.target {
            Target::Tandem(rf) => rf,
            _ => 1,
        },
        rtt_ms: job.rtt_ms,
        volumes: job.volumes,
        qd: w.qd(),
        round: Some(job.round),
        ..Default::default()
    };
    // fio counts only I/O after the ramp; the CPU counters include the ramp.
    let measured_share = cfg.runtime_s as f64 / (cfg.runtime_s + cfg.ramp_s) as f64;
    match job.target {
        Target::Local => {
            rec.target = LOCAL.into();
            let local = t.local.as_ref().context("no local store")?;
            let me = [std::process::id()];
            let c0 = cpu::snapshot(&me);
            let r = local.run(
                w,
                Duration::from_secs(cfg.runtime_s),
                Duration::from_secs(cfg.ramp_s),
            )?;
            let cpu_us = cpu::delta_us(&c0, &cpu::snapshot(&me));
            let secs = r.elapsed.as_secs_f64();
            rec.p50_us = Some(r.lat.p50_us);
            rec.p99_us = Some(r.lat.p99_us);
            rec.p999_us = Some(r.lat.p999_us);
            rec.iops = Some(r.ops as f64 / secs);
            rec.mb_s = Some(r.bytes as f64 / secs / 1e6);
            rec.cpu_us_per_op = Some(cpu_us * measured_share / r.ops.max(1) as f64);
            rec.flush_p50_us = r.flush_p50_us;
        }
        Target::Qemu | Target::Tandem(_) => {
            let (uris, pids, size_mib) = match job.target {
                Target::Qemu => {
                    rec.target = QEMU_NBD.into();
                    let q = t.qemu.as_ref().context("no qemu-nbd")?;
                    (vec![q.uri.clone()], vec![q.pid()], cfg.size_mib)
                }
                Target::Tandem(rf) => {
                    rec.target = TANDEM.into();
                    if job.scale {
                        (
                            t.scale_uris[..job.volumes as usize].to_vec(),
                            t.cluster.pids(),
                            cfg.scale_size_mib,
                        )
                    } else {
                        let uri = t.rf_uris.get(&rf).context("no volume of that RF")?;
                        (vec![uri.clone()], t.cluster.pids(), cfg.size_mib)
                    }
                }
                Target::Local => unreachable!("handled above"),
            };
            let out = raw.join(format!(
                "{index:04}-r{}-{}-{}-rf{}-rtt{}-v{}.json",
                job.round,
                w.name(),
                rec.target,
                rec.rf,
                job.rtt_ms,
                job.volumes
            ));
            let c0 = cpu::snapshot(&pids);
            let r = fio::run(w, &uris, size_mib, cfg.runtime_s, cfg.ramp_s, &out)?;
            let cpu_us = cpu::delta_us(&c0, &cpu::snapshot(&pids));
            rec.p50_us = Some(r.p50_us);
            rec.p99_us = Some(r.p99_us);
            rec.p999_us = Some(r.p999_us);
            rec.iops = Some(r.iops);
            rec.mb_s = Some(r.bw_bytes / 1e6);
            rec.cpu_us_per_op = Some(cpu_us * measured_share / r.total_ios as f64);
            rec.flush_p50_us = r.flush_p50_us;
        }
    }
    Ok(rec)
}

/// Resync of `resync_mib` of dirty regions: an RF 2 volume whose second replica's data link
/// is cut while the whole volume is written, then healed. Measures the wall time from the
/// heal until every replica is in sync again.
fn resync(cfg: &Config, t: &Targets, raw: &Path, progress: &Progress) -> Result<Record> {
    let c = &t.cluster;
    if c.nodes.len() < 2 {
        bail!("the resync measurement needs two nodes");
    }
    progress.log(format!(
        "resync: RF 2 volume of {} MiB; cutting node 2's data link and writing all of it",
        cfg.resync_mib
    ));
    let uri = c.create_volume(RESYNC_VOLUME, cfg.resync_mib, 2)?;
    c.wait_in_sync(RESYNC_VOLUME, 2, IN_SYNC_TIMEOUT)?;
    let cut = &c.nodes[1].proxy;
    cut.cut();
    let written = fio::fill(
        std::slice::from_ref(&uri),
        cfg.resync_mib,
        &raw.join("resync-write.json"),
    );
    if let Err(e) = written {
        cut.heal();
        return Err(e.context("write the resync volume while its replica is cut off"));
    }
    let deadline = Instant::now() + EJECT_TIMEOUT;
    loop {
        let v = c.inspect(RESYNC_VOLUME)?;
        if !Cluster::all_in_sync(&v, 2) {
            break;
        }
        if Instant::now() > deadline {
            cut.heal();
            bail!("the cut replica of {RESYNC_VOLUME} was not ejected within {EJECT_TIMEOUT:?}");
        }
        std::thread::sleep(RESYNC_POLL);
    }
    env::sync_fs(&t.work)?;
    let pids = c.pids();
    let c0 = cpu::snapshot(&pids);
    let t0 = Instant::now();
    cut.heal();
    let (mut t1, mut total_bytes) = (None, 0u64);
    let deadline = t0 + RESYNC_TIMEOUT;
    let done = loop {
        let v = c.inspect(RESYNC_VOLUME)?;
        let now = Instant::now();
        if let Some(reps) = v["replicas"].as_array() {
            for r in reps {
                let total = r["resync_total_bytes"].as_u64().unwrap_or(0);
                total_bytes = total_bytes.max(total);
                let state = r["state"].as_str().unwrap_or("");
                if t1.is_none() && (total > 0 || state.contains("resync")) {
                    t1 = Some(now);
                }
            }
        }
        if Cluster::all_in_sync(&v, 2) {
            break now;
        }
        if now > deadline {
            bail!("{RESYNC_VOLUME} not in sync {RESYNC_TIMEOUT:?} after the heal: {v}");
        }
        std::thread::sleep(RESYNC_POLL);
    };
    let cpu_us = cpu::delta_us(&c0, &cpu::snapshot(&pids));
    let secs = (done - t0).as_secs_f64();
    let note_bytes = if total_bytes == 0 {
        // The resync finished between two polls: count the dirty data written.
        cfg.resync_mib << 20
    } else {
        total_bytes
    };
    let gib = note_bytes as f64 / (1u64 << 30) as f64;
    progress.log(format!(
        "resync: {:.0} MiB in {:.2} s from the heal ({:.2} GiB/s){}",
        note_bytes as f64 / (1 << 20) as f64,
        secs,
        gib / secs,
        t1.map(|t1| format!(
            "; {:.2} s after it was first seen running",
            (done - t1).as_secs_f64()
        ))
        .unwrap_or_default()
    ));
    Ok(Record {
        workload: RESYNC.into(),
        target: TANDEM.into(),
        rf: 2,
        rtt_ms: 0.0,
        volumes: 1,
        qd: 1,
        mb_s: Some(note_bytes as f64 / secs / 1e6),
        cpu_us_per_op: Some(cpu_us / (note_bytes as f64 / 4096.0)),
        resync_bytes: Some(note_bytes as f64),
        resync_s: Some(secs),
        resync_gib_s: Some(gib / secs),
        copy_s: t1.map(|t1| (done - t1).as_secs_f64()).filter(|s| *s > 0.0),
        round: Some(1),
        ..Default::default()
    })
}

/// The physical-limit model for tandem QD1 writes. RF 1: the same round's local-store QD1
/// write p50 (the store alone, without NBD). RF >= 2: the same round's RF 1 QD1 write p50
/// (NBD round trip, daemon and store) plus the round trip measured through the proxy at
/// that RTT: what one more replica, reached in parallel, must cost at least. Without an
/// RF 1 record in the round, the local store's p50 stands in for it.
fn apply_model(per_round: &mut [Record]) {
    let p50_by_round = |target: &str, rf: Option<u32>| -> BTreeMap<u32, f64> {
        per_round
            .iter()
            .filter(|r| r.target == target && r.workload == Workload::RandWriteQd1.name())
            .filter(|r| rf.is_none_or(|rf| r.rf == rf && r.volumes == 1))
            .filter_map(|r| Some((r.round?, r.p50_us?)))
            .collect()
    };
    let local_p50 = p50_by_round(LOCAL, None);
    let rf1_p50 = p50_by_round(TANDEM, Some(1));
    for r in per_round.iter_mut() {
        if r.target != TANDEM || r.workload != Workload::RandWriteQd1.name() {
            continue;
        }
        let Some(round) = r.round else { continue };
        let model = if r.rf >= 2 {
            let Some(base) = rf1_p50.get(&round).or(local_p50.get(&round)) else {
                continue;
            };
            base + r.measured_rtt_us.unwrap_or(0.0)
        } else {
            let Some(local) = local_p50.get(&round) else {
                continue;
            };
            *local
        };
        r.model_us = Some(model);
        r.model_ratio = r.p50_us.map(|p| p / model);
    }
}

/// One record per measured point: the median over rounds of every figure.
pub fn medians(per_round: &[Record]) -> Vec<Record> {
    let mut groups: BTreeMap<_, Vec<&Record>> = BTreeMap::new();
    for r in per_round {
        groups.entry(r.key()).or_default().push(r);
    }
    let mut out: Vec<Record> = groups
        .into_values()
        .map(|rs| {
            let m =
                |f: fn(&Record) -> Option<f64>| median(rs.iter().filter_map(|r| f(r)).collect());
            Record {
                workload: rs[0].workload.clone(),
                target: rs[0].target.clone(),
                rf: rs[0].rf,
                rtt_ms: rs[0].rtt_ms,
                volumes: rs[0].volumes,
                qd: rs[0].qd,
                p50_us: m(|r| r.p50_us),
                p99_us: m(|r| r.p99_us),
                p999_us: m(|r| r.p999_us),
                iops: m(|r| r.iops),
                mb_s: m(|r| r.mb_s),
                cpu_us_per_op: m(|r| r.cpu_us_per_op),
                model_us: m(|r| r.model_us),
                model_ratio: m(|r| r.model_ratio),
                measured_rtt_us: m(|r| r.measured_rtt_us),
                flush_p50_us: m(|r| r.flush_p50_us),
                resync_bytes: m(|r| r.resync_bytes),
                resync_s: m(|r| r.resync_s),
                resync_gib_s: m(|r| r.resync_gib_s),
                copy_s: m(|r| r.copy_s),
                round: None,
                rounds: Some(rs.len() as u32),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.workload.as_str(), a.target.as_str(), a.rf, a.volumes)
            .cmp(&(b.workload.as_str(), b.target.as_str(), b.rf, b.volumes))
            .then(a.rtt_ms.total_cmp(&b.rtt_ms))
    });
    out
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn utc_now() -> String {
    utc_at(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// A Unix time as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
pub fn utc_at(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(target: &str, rf: u32, p50: f64, rtt: Option<f64>) -> Record {
        Record {
            workload: Workload::RandWriteQd1.name().into(),
            target: target.into(),
            rf,
            volumes: 1,
            qd: 1,
            p50_us: Some(p50),
            measured_rtt_us: rtt,
            round: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn the_model_of_a_replicated_write_is_rf1_plus_one_round_trip() {
        let mut rs = vec![
            rec(LOCAL, 1, 10.0, None),
            rec(TANDEM, 1, 60.0, None),
            rec(TANDEM, 2, 150.0, Some(40.0)),
        ];
        apply_model(&mut rs);
        assert_eq!(rs[1].model_us, Some(10.0));
        assert_eq!(rs[2].model_us, Some(100.0));
        assert_eq!(rs[2].model_ratio, Some(1.5));
        // Without RF 1 in the round, the local store stands in for it.
        let mut rs = vec![rec(LOCAL, 1, 10.0, None), rec(TANDEM, 2, 150.0, Some(40.0))];
        apply_model(&mut rs);
        assert_eq!(rs[1].model_us, Some(50.0));
    }
}
