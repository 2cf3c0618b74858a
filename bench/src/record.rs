//! The records of `results.json`: one per measured point.
//!
//! `records` holds the median over rounds of every point; `per_round` holds every single
//! measurement. Measured figures that do not apply to a point are `null` (for example
//! `model_us` except for QD1 writes of tandem volumes); every figure present is positive and
//! finite (checked by [`Record::check`] before anything is written).

use serde::{Deserialize, Serialize};

/// Target names.
pub const TANDEM: &str = "tandem";
pub const QEMU_NBD: &str = "qemu-nbd";
pub const LOCAL: &str = "local";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub workload: String,
    /// `tandem`, `qemu-nbd` or `local`.
    pub target: String,
    /// Replication factor (1 for the baselines, which keep one copy).
    pub rf: u32,
    /// Injected round-trip time between nodes, in milliseconds (0: plain loopback).
    pub rtt_ms: f64,
    /// Volumes written at once (one fio job per volume; figures are aggregates).
    pub volumes: u32,
    /// Queue depth per volume.
    pub qd: u32,
    /// Total latency per request (fio `lat`: submission + completion), percentiles in µs.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub iops: Option<f64>,
    /// 10^6 bytes per second.
    pub mb_s: Option<f64>,
    /// CPU time per operation summed over the server processes (every tandemd, or
    /// qemu-nbd, or the harness itself for `local`), in µs.
    pub cpu_us_per_op: Option<f64>,
    /// The physical-limit model for a QD1 write: the RF 1 write p50 of the same round plus
    /// the measured round trip to a replica (RF 1: the local store write alone), in µs.
    pub model_us: Option<f64>,
    /// `p50_us / model_us`.
    pub model_ratio: Option<f64>,
    /// Measured round trip through the delay proxy at this `rtt_ms` (p50, µs).
    pub measured_rtt_us: Option<f64>,
    /// Flush latency p50 (fsync workload), µs.
    pub flush_p50_us: Option<f64>,
    /// Resync: bytes resynced, wall time from the heal to every replica in sync, and the
    /// rate over that time; `copy_s` is the part after the resync was first seen running.
    pub resync_bytes: Option<f64>,
    pub resync_s: Option<f64>,
    pub resync_gib_s: Option<f64>,
    pub copy_s: Option<f64>,
    /// Round of a per-round record; number of rounds of a median record.
    pub round: Option<u32>,
    pub rounds: Option<u32>,
}

impl Record {
    /// Key of a measured point (everything but the figures).
    pub fn key(&self) -> (String, String, u32, u64, u32, u32) {
        (
            self.workload.clone(),
            self.target.clone(),
            self.rf,
            (self.rtt_ms * 1000.0).round() as u64,
            self.volumes,
            self.qd,
        )
    }

    /// The measured figures, by name.
    pub fn figures(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![
            ("p50_us", self.p50_us),
            ("p99_us", self.p99_us),
            ("p999_us", self.p999_us),
            ("iops", self.iops),
            ("mb_s", self.mb_s),
            ("cpu_us_per_op", self.cpu_us_per_op),
            ("model_us", self.model_us),
            ("model_ratio", self.model_ratio),
            ("measured_rtt_us", self.measured_rtt_us),
            ("flush_p50_us", self.flush_p50_us),
            ("resync_bytes", self.resync_bytes),
            ("resync_s", self.resync_s),
            ("resync_gib_s", self.resync_gib_s),
            ("copy_s", self.copy_s),
        ]
    }

    /// Every figure present is positive and finite, and the configuration is sane.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in self.figures() {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(format!(
                        "{} {} rf {} rtt {} ms volumes {}: {name} = {v}",
                        self.workload, self.target, self.rf, self.rtt_ms, self.volumes
                    ));
                }
            }
        }
        if !(self.rtt_ms.is_finite() && self.rtt_ms >= 0.0) || self.volumes == 0 || self.qd == 0 {
            return Err(format!("bad configuration in {self:?}"));
        }
        Ok(())
    }
}

/// The whole `results.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub records: Vec<Record>,
    pub per_round: Vec<Record>,
}

/// How and where the run was made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub command: String,
    pub mode: String,
    pub started_utc: String,
    pub duration_s: f64,
    pub machine: Vec<(String, String)>,
    pub rounds: u32,
    pub runtime_s: u64,
    pub ramp_s: u64,
    pub volume_mib: u64,
    pub scale_volume_mib: u64,
    pub scale_rf: u32,
    pub io_engine: String,
    pub fio_command: String,
    pub notes: Vec<String>,
}
