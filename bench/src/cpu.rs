//! CPU time of processes, from /proc.
//!
//! Per thread, `/proc/PID/task/TID/schedstat` gives the time on CPU in nanoseconds; a delta
//! is taken per thread, so a thread that starts during a job counts from zero and one that
//! exits during a job loses its share (tokio's idle blocking threads exit after 10 s, so
//! that share is small). When schedstat is not readable (kernels without schedstats), the
//! process's `utime + stime` (fields 14 and 15 of `/proc/PID/stat`, clock ticks) is used;
//! it counts exited threads but has a resolution of one tick (10 ms at 100 Hz).

use std::collections::HashMap;

/// CPU counters of a set of processes at one moment.
#[derive(Clone, Debug, Default)]
pub struct CpuSnapshot {
    /// Per (pid, tid): nanoseconds on CPU.
    threads_ns: HashMap<(u32, u32), u64>,
    /// Whether schedstat could be read for every process.
    schedstat: bool,
    /// Sum of utime + stime over the processes, in clock ticks.
    ticks: u64,
}

/// Clock ticks per second.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

fn stat_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3, so field N is f[N - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn thread_ns(pid: u32, out: &mut HashMap<(u32, u32), u64>) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            out.insert((pid, tid), ns);
            any = true;
        }
    }
    any
}

/// Counters of `pids` now.
pub fn snapshot(pids: &[u32]) -> CpuSnapshot {
    let mut s = CpuSnapshot {
        schedstat: true,
        ..Default::default()
    };
    for &pid in pids {
        s.ticks += stat_ticks(pid).unwrap_or(0);
        if !thread_ns(pid, &mut s.threads_ns) {
            s.schedstat = false;
        }
    }
    s
}

/// CPU time between two snapshots of the same processes, in microseconds.
pub fn delta_us(before: &CpuSnapshot, after: &CpuSnapshot) -> f64 {
    if before.schedstat && after.schedstat {
        let ns: u64 = after
            .threads_ns
            .iter()
            .map(|(k, v)| v.saturating_sub(before.threads_ns.get(k).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1000.0
    } else {
        after.ticks.saturating_sub(before.ticks) as f64 / clk_tck() * 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_while_spinning() {
        let me = std::process::id();
        let a = snapshot(&[me]);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let b = snapshot(&[me]);
        let d = delta_us(&a, &b);
        assert!(d > 10_000.0, "spinning 50 ms showed {d} µs of CPU");
    }
}
