//! tandem-bench: the replication-latency benchmark harness.
//!
//! `tandem-bench run` starts its own local cluster of `tandemd` processes on loopback, puts a
//! delay proxy in front of every node's data-path listener, and drives the cluster with fio's
//! nbd ioengine. In the same run, interleaved so that machine drift hits every target alike,
//! it measures two baselines: the replica store alone (in this process, no network) and
//! `qemu-nbd` serving a raw file on the same filesystem. It writes `results.json`,
//! `report.md` and SVG plots to a results directory.
//!
//! Modules:
//! * [`children`]: every process the harness starts, killed on drop, panic or signal.
//! * [`proxy`]: the delay/cut proxy for replication traffic (injected RTT).
//! * [`cluster`]: tandemd processes, tandemctl calls, volumes.
//! * [`fio`]: fio jobs and their JSON.
//! * [`local`]: the local-store baseline (tandem-engine's store, in-process).
//! * [`cpu`]: CPU time of processes from /proc.
//! * [`workload`], [`record`], [`stats`]: what is measured and how it is recorded.
//! * [`priority`]: the I/O priority workload (a `high` QD1 volume next to a `low` QD32 one).
//! * [`run`]: the matrix and its interleaving; [`report`] and [`plot`]: the output.
//! * [`env`]: binaries, tools and machine facts.

pub mod children;
pub mod cluster;
pub mod cpu;
pub mod env;
pub mod fio;
pub mod local;
pub mod plot;
pub mod priority;
pub mod proxy;
pub mod record;
pub mod report;
pub mod run;
pub mod stats;
pub mod workload;
