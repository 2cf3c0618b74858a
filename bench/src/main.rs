//! `tandem-bench`: the replication-latency benchmark harness (see the crate docs in lib.rs).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use tandem_bench::run::Config;
use tandem_bench::workload::Workload;

#[derive(Parser)]
#[command(
    name = "tandem-bench",
    version,
    about = "Tandem replication-latency benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster, run the matrix against it and the baselines, write the results
    Run(Box<RunArgs>),
    /// Regenerate report.md and the plots from a results directory's results.json
    Report {
        /// Results directory of an earlier run
        #[arg(long)]
        from: PathBuf,
    },
}

/// Flags left unset take the quick or full default (shown as "quick / full").
#[derive(Args)]
struct RunArgs {
    /// Reduced matrix that finishes in under 3 minutes on 2 cores
    #[arg(long)]
    quick: bool,
    /// Results directory [default: ./tandem-bench-results]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the temporary data directory is created [default: $TMPDIR or /tmp]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Directory holding tandemd and tandemctl [default: this executable's directory, then
    /// the workspace's target/release]
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Replication factors [1,2,3]
    #[arg(long, value_delimiter = ',')]
    rf: Option<Vec<u32>>,
    /// Injected inter-node RTTs in ms [quick: 0,1,5 / full: 0,1,2,5,10]
    #[arg(long, value_delimiter = ',')]
    rtt: Option<Vec<f64>>,
    /// Volumes written at once [quick: 1,4 / full: 1,4,16]
    #[arg(long, value_delimiter = ',')]
    volumes: Option<Vec<u32>>,
    /// Workloads [quick: all but randread-4k-qd32 / full: all]
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// Seconds per measured job [quick: 2 / full: 15]
    #[arg(long)]
    runtime: Option<u64>,
    /// fio ramp seconds before each job [quick: 1 / full: 2]
    #[arg(long)]
    ramp: Option<u64>,
    /// Interleaved rounds [quick: 1 / full: 3]
    #[arg(long)]
    rounds: Option<u32>,
    /// Size of each benchmarked volume, MiB [quick: 128 / full: 1024]
    #[arg(long)]
    size_mib: Option<u64>,
    /// Size of each volume of the scaling series, MiB [quick: 32 / full: 128]
    #[arg(long)]
    scale_size_mib: Option<u64>,
    /// Replication factor of the scaling series [2]
    #[arg(long, default_value_t = 2)]
    scale_rf: u32,
    /// Dirty data to resync, MiB [quick: 128 / full: 1024]
    #[arg(long)]
    resync_mib: Option<u64>,
    /// I/O engine of tandemd and of the local store (std, uring, auto)
    #[arg(long, default_value = "std")]
    io_engine: String,
    /// Also sweep QD32 writes over the injected RTTs [quick: no / full: yes]
    #[arg(long)]
    sweep_qd32: Option<bool>,
    /// Run the I/O priority workload (a high QD1 volume next to a low QD32 one) [true]
    #[arg(long)]
    priority: Option<bool>,
    /// Leave qemu-nbd out (the tandem-vs-qemu-nbd targets are then not measured)
    #[arg(long)]
    no_qemu: bool,
    /// Keep the data directory after the run
    #[arg(long)]
    keep: bool,
}

/// The quick or the full default.
fn pick<T>(quick_mode: bool, quick: T, full: T) -> T {
    if quick_mode {
        quick
    } else {
        full
    }
}

fn config(a: RunArgs) -> Result<Config> {
    let q = a.quick;
    let workloads = match a.workloads {
        Some(names) => names
            .iter()
            .map(|n| {
                Workload::from_name(n).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown workload {n}; known: {}",
                        Workload::ALL.map(|w| w.name()).join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
        None if q => Workload::ALL
            .into_iter()
            .filter(|w| *w != Workload::RandReadQd32)
            .collect(),
        None => Workload::ALL.to_vec(),
    };
    if workloads.is_empty() {
        bail!("--workloads is empty");
    }
    let command = std::iter::once("tandem-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(Config {
        mode: pick(q, "quick", "full").into(),
        command,
        out: a
            .out
            .unwrap_or_else(|| PathBuf::from("tandem-bench-results")),
        dir: a.dir,
        bin_dir: a.bin_dir,
        rfs: a.rf.unwrap_or_else(|| vec![1, 2, 3]),
        rtts_ms: a
            .rtt
            .unwrap_or_else(|| pick(q, vec![0.0, 1.0, 5.0], vec![0.0, 1.0, 2.0, 5.0, 10.0])),
        volumes: a
            .volumes
            .unwrap_or_else(|| pick(q, vec![1, 4], vec![1, 4, 16])),
        workloads,
        sweep_qd32: a.sweep_qd32.unwrap_or(!q),
        runtime_s: a.runtime.unwrap_or(pick(q, 2, 15)),
        ramp_s: a.ramp.unwrap_or(pick(q, 1, 2)),
        rounds: a.rounds.unwrap_or(pick(q, 1, 3)),
        size_mib: a.size_mib.unwrap_or(pick(q, 128, 1024)),
        scale_size_mib: a.scale_size_mib.unwrap_or(pick(q, 32, 128)),
        scale_rf: a.scale_rf,
        resync_mib: a.resync_mib.unwrap_or(pick(q, 128, 1024)),
        io_engine: a.io_engine,
        qemu: !a.no_qemu,
        priority: a.priority.unwrap_or(true),
        keep: a.keep,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => tandem_bench::children::install_signal_handler()
            .and_then(|()| config(*a))
            .and_then(|cfg| tandem_bench::run::run(&cfg)),
        Cmd::Report { from } => tandem_bench::report::regenerate(&from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
