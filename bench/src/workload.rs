//! The workloads every target runs, with their fio parameters.

use std::fmt;

/// One measured workload. The fio parameters are those of `scripts/bench-nbd.sh` and
/// the earlier `scripts/bench-rf.sh` (docs/BENCHMARKS.md), so their figures compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// 4 KiB random write, queue depth 1: latency.
    RandWriteQd1,
    /// 4 KiB random write, queue depth 32: IOPS.
    RandWriteQd32,
    /// 4 KiB random read, queue depth 1: latency.
    RandReadQd1,
    /// 4 KiB random read, queue depth 32: IOPS (full runs).
    RandReadQd32,
    /// 1 MiB sequential write, queue depth [`SEQ_QD`]: MB/s.
    SeqWrite1m,
    /// 4 KiB random write, queue depth 1, a flush after every write (fio `--fsync=1`; an NBD
    /// `NBD_CMD_FLUSH`, i.e. `fdatasync` on every replica).
    RandWriteQd1Fsync,
}

/// Queue depth of the 1 MiB sequential write (as in the earlier `scripts/bench-rf.sh`).
pub const SEQ_QD: u32 = 4;

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::RandWriteQd1,
        Workload::RandWriteQd32,
        Workload::RandReadQd1,
        Workload::RandReadQd32,
        Workload::SeqWrite1m,
        Workload::RandWriteQd1Fsync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::RandWriteQd1 => "randwrite-4k-qd1",
            Workload::RandWriteQd32 => "randwrite-4k-qd32",
            Workload::RandReadQd1 => "randread-4k-qd1",
            Workload::RandReadQd32 => "randread-4k-qd32",
            Workload::SeqWrite1m => "seqwrite-1m",
            Workload::RandWriteQd1Fsync => "randwrite-4k-qd1-fsync",
        }
    }

    pub fn from_name(s: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == s)
    }

    /// fio `--rw`.
    pub fn fio_rw(self) -> &'static str {
        match self {
            Workload::RandWriteQd1 | Workload::RandWriteQd32 | Workload::RandWriteQd1Fsync => {
                "randwrite"
            }
            Workload::RandReadQd1 | Workload::RandReadQd32 => "randread",
            Workload::SeqWrite1m => "write",
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Workload::SeqWrite1m => 1 << 20,
            _ => 4096,
        }
    }

    pub fn qd(self) -> u32 {
        match self {
            Workload::RandWriteQd32 | Workload::RandReadQd32 => 32,
            Workload::SeqWrite1m => SEQ_QD,
            _ => 1,
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, Workload::RandReadQd1 | Workload::RandReadQd32)
    }

    pub fn is_random(self) -> bool {
        !matches!(self, Workload::SeqWrite1m)
    }

    pub fn fsync(self) -> bool {
        matches!(self, Workload::RandWriteQd1Fsync)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Name of the resync measurement in the records.
pub const RESYNC: &str = "resync";

/// Name of the volume-scaling series: 4 KiB random write at QD32 on each of N volumes at
/// once (figures are aggregates over the volumes).
pub const SCALE_WORKLOAD: &str = "randwrite-4k-qd32-per-volume";
