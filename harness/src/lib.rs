//! How the multi-process tests (`tests/src/lib.rs`) and `tandem-bench` (`bench/src/cluster.rs`)
//! start a `tandemd`: the same listen flags on loopback ports, and the same start-up
//! handshake (the daemon prints its admin, NBD and metrics addresses on stdout once it
//! serves). The tests wrap it in their `Daemon` (restarts, kill -9, network namespaces),
//! the bench in its `Cluster` (delay proxies, guarded children); neither builds a command
//! line or reads the handshake on its own.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{ChildStdout, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Four free loopback ports: `[admin, nbd, metrics, data]`.
pub fn free_ports() -> std::io::Result<[u16; 4]> {
    let ls = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut p = [0u16; 4];
    for (slot, l) in p.iter_mut().zip(&ls) {
        *slot = l.local_addr()?.port();
    }
    Ok(p)
}

/// Adds the flags every harness starts a daemon with: its data directory, its four
/// listen addresses on loopback (`ports` = `[admin, nbd, metrics, data]`), and the I/O
/// engine. The caller adds the rest (`--join`, `--advertise-data-addr`, ...).
pub fn tandemd_args(cmd: &mut Command, data_dir: &Path, ports: [u16; 4], io_engine: &str) {
    let [admin, nbd, metrics, data] = ports;
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--nbd-addr", &format!("127.0.0.1:{nbd}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(["--data-addr", &format!("127.0.0.1:{data}")])
        .args(["--io-engine", io_engine]);
}

/// The addresses a daemon printed once it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addrs {
    /// `HOST:PORT` of the admin gRPC API.
    pub admin: String,
    /// `HOST:PORT` of the NBD server (`nbd://HOST:PORT/<volume>` printed).
    pub nbd: String,
    /// `HOST:PORT` of the metrics endpoint (`http://HOST:PORT/metrics` printed).
    pub metrics: String,
}

/// What the daemon printed when it was ready, from its stdout lines.
fn parse_ready_line(
    line: &str,
    admin: &mut Option<String>,
    nbd: &mut Option<String>,
    metrics: &mut Option<String>,
) {
    let t = line.trim_start();
    let last = t.split_whitespace().last().unwrap_or_default();
    if t.starts_with("admin API:") {
        *admin = Some(last.to_string());
    } else if t.starts_with("NBD:") {
        *nbd = Some(
            last.trim_start_matches("nbd://")
                .trim_end_matches("/<volume>")
                .to_string(),
        );
    } else if t.starts_with("metrics:") {
        *metrics = Some(
            last.trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_string(),
        );
    }
}

/// Waits (at most `timeout`) for the daemon on `stdout` to print its addresses. A thread
/// keeps draining stdout afterwards, so the pipe never fills. `Err` when the daemon
/// exited or stayed silent: the caller reports its log.
pub fn wait_ready(stdout: ChildStdout, timeout: Duration) -> Result<Addrs, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Once nobody listens, keep reading anyway, so the daemon never blocks.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let (mut admin, mut nbd, mut metrics) = (None, None, None);
    while metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                format!("tandemd did not print its addresses within {timeout:?}")
            }
            mpsc::RecvTimeoutError::Disconnected => {
                "tandemd exited before it printed its addresses".to_string()
            }
        })?;
        parse_ready_line(&line, &mut admin, &mut nbd, &mut metrics);
    }
    Ok(Addrs {
        admin: admin.ok_or("tandemd printed no admin address")?,
        nbd: nbd.ok_or("tandemd printed no NBD address")?,
        metrics: metrics.ok_or("tandemd printed no metrics address")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_up_lines_give_the_addresses() {
        let (mut a, mut n, mut m) = (None, None, None);
        for line in [
            "tandemd 0.1.0 serving",
            "  admin API: 127.0.0.1:7001",
            "  NBD:       nbd://127.0.0.1:10809/<volume>",
            "  metrics:   http://127.0.0.1:9100/metrics",
        ] {
            parse_ready_line(line, &mut a, &mut n, &mut m);
        }
        assert_eq!(a.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(n.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(m.as_deref(), Some("127.0.0.1:9100"));
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_reported() {
        let mut child = Command::new("true")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let err = wait_ready(child.stdout.take().unwrap(), Duration::from_secs(10)).unwrap_err();
        assert!(err.contains("exited"), "{err}");
        child.wait().unwrap();
    }
}
