//! tandemd configuration: flags, an optional TOML file, and defaults, in that order of
//! precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;
use tandem_engine::io::IoEngineChoice;
use tandem_engine::units::parse_size;

pub const DEFAULT_DATA_DIR: &str = "./tandem-data";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9010";
pub const DEFAULT_NBD_ADDR: &str = "127.0.0.1:10809";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9011";
pub const DEFAULT_DATA_ADDR: &str = "127.0.0.1:9020";
/// `std` by default: the store does buffered I/O, where an inline pread/pwrite beats a
/// hop to the io_uring thread (docs/BENCHMARKS.md has the side-by-side figures).
pub const DEFAULT_IO_ENGINE: &str = "std";
pub const DEFAULT_TOPOLOGY: &str = "default";

/// The Tandem storage daemon.
#[derive(Debug, Parser, Default)]
#[command(name = "tandemd", version, about)]
pub struct Args {
    /// TOML config file; flags override its values.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Data directory (metadata and the storage pool) [default: ./tandem-data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Pool capacity, e.g. 100GiB [default: free space of the data directory's filesystem
    /// at start-up plus what the pool already holds]
    #[arg(long)]
    pub pool_size: Option<String>,
    /// Admin gRPC listen address [default: 127.0.0.1:9010]
    #[arg(long)]
    pub admin_addr: Option<String>,
    /// NBD listen address [default: 127.0.0.1:10809]
    #[arg(long)]
    pub nbd_addr: Option<String>,
    /// Prometheus metrics listen address [default: 127.0.0.1:9011]
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// I/O engine: uring, std or auto (io_uring if the kernel allows it, else std) [default: std]
    #[arg(long)]
    pub io_engine: Option<String>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it [default: info]
    #[arg(long)]
    pub log: Option<String>,
    /// Async worker threads: 0 = one per core; 1 = a current-thread runtime (every task on
    /// one thread, no wake-ups between threads) [default: 0]
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// I/O priority classes: the I/Os in progress that are shared out by class weight
    /// (high 16, medium 4, low 1) while volumes of several classes are busy on this node
    /// (lower classes are also paced to their share of --io-capacity-iops); a class busy
    /// alone is never limited. 0 turns classes off [default: 32]
    #[arg(long)]
    pub io_slots: Option<usize>,
    /// I/O priority classes: the node's capacity in I/Os per second, of which a lower
    /// class gets its weighted share while a higher class is busy; 0 measures it (the
    /// most a 100 ms window completed while no class was held back) [default: 0]
    #[arg(long)]
    pub io_capacity_iops: Option<u64>,
    /// Data-path (node-to-node replication) listen address [default: 127.0.0.1:9020]
    #[arg(long)]
    pub data_addr: Option<String>,
    /// Admin address peers dial [default: the admin listen address]
    #[arg(long)]
    pub advertise_admin_addr: Option<String>,
    /// Data-path address peers dial [default: the data listen address]
    #[arg(long)]
    pub advertise_data_addr: Option<String>,
    /// Join the cluster of the member whose admin API is at this address
    #[arg(long)]
    pub join: Option<String>,
    /// Cluster join token (printed by the first node; `tandemctl cluster token show`)
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Cluster domain (site) of this node [default: default]
    #[arg(long)]
    pub domain: Option<String>,
    /// Zone of this node [default: default]
    #[arg(long)]
    pub zone: Option<String>,
    /// Rack of this node [default: default]
    #[arg(long)]
    pub rack: Option<String>,
    /// Make this node a raft voter (metadata replica) even beyond the first three
    #[arg(long)]
    pub kvdb: bool,
    /// Run as a witness: a raft voter that holds no volume data (a third-site tie-breaker)
    #[arg(long)]
    pub witness: bool,
    /// Node name [default: generated, e.g. node-3f2a...]
    #[arg(long)]
    pub name: Option<String>,
    /// Largest measured domain-pair RTT (p50) that synchronous replication across domains
    /// may enter, e.g. 10ms [default: 10ms]
    #[arg(long)]
    pub sync_max_rtt: Option<String>,
    /// What happens when a synchronous domain pair goes above --sync-max-rtt at run time:
    /// `alert` (raise an alert, stay synchronous) or `degrade` (the replicas in the other
    /// domain turn async, with an alert; they resync and return to in-sync when the RTT is
    /// back under the limit) [default: alert]
    #[arg(long)]
    pub on_rtt_exceeded: Option<String>,
    /// Serve the CSI Identity, Controller and Node services (driver csi.tandem.io) on this
    /// unix socket, e.g. unix:///var/lib/kubelet/plugins/csi.tandem.io/csi.sock
    /// [default: off]
    #[arg(long, env = "CSI_ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// The CSI node id this node reports in NodeGetInfo [default: the node name]
    #[arg(long)]
    pub csi_node_id: Option<String>,
}

/// The config file's keys: the same names as the flags, with underscores.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub pool_size: Option<String>,
    pub admin_addr: Option<String>,
    pub nbd_addr: Option<String>,
    pub metrics_addr: Option<String>,
    pub io_engine: Option<String>,
    pub log: Option<String>,
    pub worker_threads: Option<usize>,
    pub io_slots: Option<usize>,
    pub io_capacity_iops: Option<u64>,
    pub data_addr: Option<String>,
    pub advertise_admin_addr: Option<String>,
    pub advertise_data_addr: Option<String>,
    pub join: Option<String>,
    pub token: Option<String>,
    pub domain: Option<String>,
    pub zone: Option<String>,
    pub rack: Option<String>,
    pub kvdb: Option<bool>,
    pub witness: Option<bool>,
    pub name: Option<String>,
    pub sync_max_rtt: Option<String>,
    pub on_rtt_exceeded: Option<String>,
    pub csi_endpoint: Option<String>,
    pub csi_node_id: Option<String>,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `None` = derive from free space.
    pub pool_size_bytes: Option<u64>,
    pub admin_addr: SocketAddr,
    pub nbd_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub io_engine: IoEngineChoice,
    pub log: String,
    /// `--worker-threads`: 0 = one per core, 1 = current-thread runtime.
    pub worker_threads: usize,
    /// `--io-slots`: concurrency shared out across I/O priority classes; 0 = classes off.
    pub io_slots: usize,
    /// `--io-capacity-iops`: 0 = measured.
    pub io_capacity_iops: u64,
    pub data_addr: SocketAddr,
    pub advertise_admin_addr: Option<String>,
    pub advertise_data_addr: Option<String>,
    pub join: Option<String>,
    pub token: Option<String>,
    pub domain: String,
    pub zone: String,
    pub rack: String,
    pub kvdb: bool,
    pub witness: bool,
    pub name: Option<String>,
    pub sync_max_rtt: std::time::Duration,
    pub on_rtt_exceeded: RttPolicy,
    /// Path of the CSI unix socket (`unix://` stripped).
    pub csi_endpoint: Option<PathBuf>,
    pub csi_node_id: Option<String>,
}

/// `--on-rtt-exceeded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RttPolicy {
    /// Raise an alert; replication stays synchronous.
    #[default]
    Alert,
    /// Turn the far replicas async (committed, with an alert) until the RTT recovers.
    Degrade,
}

fn addr(what: &str, s: &str) -> anyhow::Result<SocketAddr> {
    s.parse()
        .with_context(|| format!("invalid {what} '{s}': expected IP:PORT, e.g. 127.0.0.1:9010"))
}

impl Config {
    pub fn resolve(args: Args) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let pool_size = args.pool_size.or(file.pool_size);
        let pool_size_bytes = match pool_size {
            Some(s) => {
                let n = parse_size(&s).map_err(anyhow::Error::msg)?;
                if n == 0 {
                    bail!("invalid pool size '{s}': it must be greater than 0");
                }
                Some(n)
            }
            None => None,
        };
        if (args.witness || file.witness.unwrap_or(false))
            && args.join.is_none()
            && file.join.is_none()
        {
            bail!("--witness joins an existing cluster: give --join and --token");
        }
        let on_rtt_exceeded = match args
            .on_rtt_exceeded
            .as_deref()
            .or(file.on_rtt_exceeded.as_deref())
        {
            None | Some("alert") => RttPolicy::Alert,
            Some("degrade") => RttPolicy::Degrade,
            Some(other) => {
                bail!("invalid --on-rtt-exceeded '{other}': expected alert or degrade")
            }
        };
        if args.join.is_some() && args.token.is_none() && file.token.is_none() {
            bail!("--join needs --token: the cluster's join token (`tandemctl cluster token show` on a member)");
        }
        let csi_endpoint = match args.csi_endpoint.or(file.csi_endpoint) {
            None => None,
            Some(e) if e.is_empty() => None,
            Some(e) => {
                let path = e.strip_prefix("unix://").unwrap_or(&e);
                if !path.starts_with('/') {
                    bail!("invalid --csi-endpoint '{e}': expected unix:///absolute/path/csi.sock");
                }
                Some(PathBuf::from(path))
            }
        };
        let engine = args
            .io_engine
            .or(file.io_engine)
            .unwrap_or_else(|| DEFAULT_IO_ENGINE.into());
        Ok(Config {
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            pool_size_bytes,
            admin_addr: addr(
                "admin address",
                &args
                    .admin_addr
                    .or(file.admin_addr)
                    .unwrap_or_else(|| DEFAULT_ADMIN_ADDR.into()),
            )?,
            nbd_addr: addr(
                "NBD address",
                &args
                    .nbd_addr
                    .or(file.nbd_addr)
                    .unwrap_or_else(|| DEFAULT_NBD_ADDR.into()),
            )?,
            metrics_addr: addr(
                "metrics address",
                &args
                    .metrics_addr
                    .or(file.metrics_addr)
                    .unwrap_or_else(|| DEFAULT_METRICS_ADDR.into()),
            )?,
            io_engine: engine.parse().map_err(anyhow::Error::msg)?,
            log: args.log.or(file.log).unwrap_or_else(|| "info".into()),
            worker_threads: args.worker_threads.or(file.worker_threads).unwrap_or(0),
            io_slots: args
                .io_slots
                .or(file.io_slots)
                .unwrap_or(tandem_engine::sched::DEFAULT_SLOTS),
            io_capacity_iops: args.io_capacity_iops.or(file.io_capacity_iops).unwrap_or(0),
            data_addr: addr(
                "data-path address",
                &args
                    .data_addr
                    .or(file.data_addr)
                    .unwrap_or_else(|| DEFAULT_DATA_ADDR.into()),
            )?,
            advertise_admin_addr: args.advertise_admin_addr.or(file.advertise_admin_addr),
            advertise_data_addr: args.advertise_data_addr.or(file.advertise_data_addr),
            join: args.join.or(file.join),
            token: args.token.or(file.token),
            domain: args
                .domain
                .or(file.domain)
                .unwrap_or_else(|| DEFAULT_TOPOLOGY.into()),
            zone: args
                .zone
                .or(file.zone)
                .unwrap_or_else(|| DEFAULT_TOPOLOGY.into()),
            rack: args
                .rack
                .or(file.rack)
                .unwrap_or_else(|| DEFAULT_TOPOLOGY.into()),
            kvdb: args.kvdb || file.kvdb.unwrap_or(false),
            witness: args.witness || file.witness.unwrap_or(false),
            name: args.name.or(file.name),
            sync_max_rtt: match args.sync_max_rtt.or(file.sync_max_rtt) {
                Some(s) => parse_duration(&s)?,
                None => tandem_engine::latency::DEFAULT_SYNC_MAX_RTT,
            },
            on_rtt_exceeded,
            csi_endpoint,
            csi_node_id: args.csi_node_id.or(file.csi_node_id),
        })
    }
}

/// Parses `10ms`, `1.5ms`, `500us`, `2s`.
fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid duration '{s}': expected e.g. 10ms, 500us, 1s"))?;
    let us = match unit {
        "us" | "µs" => n,
        "ms" | "" => n * 1e3,
        "s" => n * 1e6,
        _ => bail!("invalid duration '{s}': units are us, ms, s"),
    };
    if us.is_nan() || us <= 0.0 {
        bail!("invalid duration '{s}': it must be positive");
    }
    Ok(std::time::Duration::from_micros(us as u64))
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(
            &p,
            "data_dir = \"/srv/t\"\npool_size = \"2GiB\"\nnbd_addr = \"127.0.0.1:1\"\nio_engine = \"std\"\nworker_threads = 1\nio_slots = 8\n",
        )
        .unwrap();
        let c = Config::resolve(Args {
            config: Some(p.clone()),
            nbd_addr: Some("127.0.0.1:2".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/t"));
        assert_eq!(c.pool_size_bytes, Some(2 << 30));
        assert_eq!(c.nbd_addr.port(), 2);
        assert_eq!(c.admin_addr.port(), 9010);
        assert_eq!(c.io_engine, IoEngineChoice::Std);
        assert_eq!(c.worker_threads, 1);
        assert_eq!(c.io_slots, 8);

        std::fs::write(&p, "bogus_key = 1\n").unwrap();
        let err = Config::resolve(Args {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("bogus_key"), "{err:#}");
        let err = Config::resolve(Args {
            io_engine: Some("fast".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("unknown I/O engine"));
    }

    #[test]
    fn on_rtt_exceeded_defaults_to_alert_and_accepts_degrade() {
        let c = Config::resolve(Args::default()).unwrap();
        assert_eq!(c.on_rtt_exceeded, RttPolicy::Alert);
        let c = Config::resolve(Args {
            on_rtt_exceeded: Some("degrade".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.on_rtt_exceeded, RttPolicy::Degrade);
        let err = Config::resolve(Args {
            on_rtt_exceeded: Some("panic".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("expected alert or degrade"),
            "{err}"
        );
    }
}
