//! tandemctl: the Tandem admin CLI, a thin client of tandemd's admin gRPC API.
//!
//! Every command takes `-j/--json`. Human output is aligned tables; errors are one line on
//! stderr with a non-zero exit code (1 for a refused request, 2 for bad usage, 3 when the
//! daemon cannot be reached).
//!
//! This file holds the command line (clap), the connection and the dispatch; `volume`,
//! `cluster` (with `alerts`) and `output` (tables, JSON) hold the commands.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use comfy_table::{presets::NOTHING, Table};
use serde::Serialize;
use tonic::transport::Channel;

use tandem_engine::meta::IoPriority;
use tandem_engine::units::{format_size, parse_size};
use tandem_proto::admin as pb;
use tandem_proto::admin::cluster_service_client::ClusterServiceClient;
use tandem_proto::admin::node_service_client::NodeServiceClient;
use tandem_proto::admin::volume_service_client::VolumeServiceClient;

#[derive(Parser)]
#[command(name = "tandemctl", version, about = "Operate Tandem storage")]
struct Cli {
    /// Admin API endpoint of tandemd
    #[arg(
        long,
        global = true,
        env = "TANDEM_ENDPOINT",
        default_value = "http://127.0.0.1:9010"
    )]
    endpoint: String,
    /// Print JSON instead of tables
    #[arg(short = 'j', long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Node and pool status
    Status,
    /// Manage volumes
    #[command(subcommand, alias = "v")]
    Volume(VolumeCmd),
    /// Inspect the cluster
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Show alerts
    #[command(subcommand)]
    Alerts(AlertsCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Nodes with role, addresses, topology, capacity and health
    List,
    /// Raft status and nodes
    Inspect,
    /// Measured data-path RTT: node pairs, domain pairs, and the metro-sync gate
    Latency,
    /// Cluster domains (sites): show, activate, deactivate
    #[command(subcommand)]
    Domains(DomainsCmd),
    /// The join token
    #[command(subcommand)]
    Token(TokenCmd),
    /// Remove a node that is gone for good or lost its state (refused while it is online,
    /// is the raft leader, or holds replicas); it may then join again, under a new id
    Remove {
        /// The node's name or id
        node: String,
    },
}

#[derive(Subcommand)]
enum DomainsCmd {
    /// Each domain's nodes, active state and the sync status of its volumes
    Show,
    /// Bring a domain's replicas back (they resync); passes the latency gate
    Activate { name: String },
    /// Take a domain's replicas out of every replica set; volumes attached in it are
    /// detached (their coordinators fenced). For failover away from a lost site.
    Deactivate {
        name: String,
        /// For volumes whose only copies outside the domain are async: promote those to
        /// in sync, losing the writes they lag behind (RPO > 0). The lost domain returns
        /// as the volume's async domain.
        #[arg(long)]
        promote_async: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print the cluster id and join token
    Show,
}

#[derive(Subcommand)]
enum AlertsCmd {
    /// List alerts, oldest first
    Show,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume
    Create(CreateArgs),
    /// List volumes
    #[command(alias = "ls")]
    List,
    /// Show one volume in detail
    Inspect { name: String },
    /// Change a volume's size (grow only), replication factor or I/O priority
    Update(UpdateArgs),
    /// Delete a volume and its data
    #[command(alias = "rm")]
    Delete {
        name: String,
        /// Detach the volume first if it is attached
        #[arg(long)]
        force: bool,
    },
    /// Attach a volume on this node and print its NBD URI
    Attach {
        name: String,
        /// Take the attachment over from another node (failover after losing that node)
        #[arg(long)]
        force: bool,
    },
    /// Detach a volume (drains and flushes its I/O)
    Detach { name: String },
    /// Snapshots: crash-consistent cuts of a volume, sealed on every in-sync replica
    #[command(subcommand, alias = "snap")]
    Snapshot(SnapshotCmd),
    /// Compare the replicas block by block (run against the attach node)
    Verify {
        name: String,
        /// Also rewrite blocks that fail their checksum on some replicas from a good copy
        /// (a scrub); copies that pass their checksums but differ are only reported
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Take a snapshot (run on the node where the volume is attached); taking one that
    /// exists returns it
    Create {
        volume: String,
        name: String,
        /// Label as key=value; repeatable
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
    },
    /// List the snapshots of a volume, or of every volume
    #[command(alias = "ls")]
    List { volume: Option<String> },
    /// Show one snapshot
    Inspect { volume: String, name: String },
    /// Delete a snapshot (its replicas' layers are merged away in the background)
    #[command(alias = "rm")]
    Delete { volume: String, name: String },
}

#[derive(Args)]
struct CreateArgs {
    name: String,
    /// Size, e.g. 10GiB (units are powers of 1024)
    #[arg(long, short = 's')]
    size: String,
    /// Replication factor (1 to 3)
    #[arg(long, default_value_t = 1)]
    repl: u32,
    /// I/O priority: high, medium or low
    #[arg(long, default_value = "medium")]
    io_priority: String,
    /// Label as key=value; repeatable
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Place replicas only on these nodes (names or ids, comma separated)
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Place replicas only in these zones (comma separated)
    #[arg(long, value_delimiter = ',')]
    zones: Vec<String>,
    /// Keep the volume inside these cluster domains (comma separated)
    #[arg(long, value_delimiter = ',')]
    domains: Vec<String>,
    /// Replicas in these domains are async by choice (comma separated): acked without
    /// waiting for them and never latency-gated, for sites beyond the sync RTT limit
    #[arg(long = "async-domains", value_delimiter = ',')]
    async_domains: Vec<String>,
}

#[derive(Args)]
struct UpdateArgs {
    name: String,
    /// New size (must not be smaller than the current size)
    #[arg(long, short = 's')]
    size: Option<String>,
    /// New replication factor
    #[arg(long)]
    repl: Option<u32>,
    /// New I/O priority: high, medium or low
    #[arg(long)]
    io_priority: Option<String>,
    /// Wait until every replica is in sync, with a progress bar
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds
    #[arg(long, default_value_t = 3600)]
    wait_timeout: u64,
}

/// An error to print: a message and an exit code.
struct Failure {
    msg: String,
    code: u8,
}

impl Failure {
    fn usage(msg: impl Into<String>) -> Failure {
        Failure {
            msg: msg.into(),
            code: 2,
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        let code = if s.code() == tonic::Code::Unavailable {
            3
        } else {
            1
        };
        let msg = if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            s.message().to_string()
        };
        Failure { msg, code }
    }
}

mod cluster;
mod output;
mod snapshot;
mod volume;

use cluster::{run_alerts, run_cluster};
use output::{print_json, table};

async fn connect(endpoint: &str) -> Result<Channel, Failure> {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let ep = Channel::from_shared(url.clone())
        .map_err(|e| Failure::usage(format!("invalid endpoint '{endpoint}': {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(120));
    ep.connect().await.map_err(|e| {
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        Failure {
            msg: format!(
                "cannot reach tandemd at {url}: {cause} (is tandemd running? set --endpoint or TANDEM_ENDPOINT)"
            ),
            code: 3,
        }
    })
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let ch = connect(&cli.endpoint).await?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Status => {
            let s = NodeServiceClient::new(ch)
                .status(pb::StatusRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "node_id": s.node_id,
                    "cluster_id": s.cluster_id,
                    "version": s.version,
                    "status": s.status,
                    "io_engine": s.io_engine,
                    "data_dir": s.data_dir,
                    "pool_size_bytes": s.pool_size_bytes,
                    "pool_allocated_bytes": s.pool_allocated_bytes,
                    "pool_provisioned_bytes": s.pool_provisioned_bytes,
                    "volume_count": s.volume_count,
                    "attached_count": s.attached_count,
                    "admin_addr": s.admin_addr,
                    "nbd_addr": s.nbd_addr,
                    "metrics_addr": s.metrics_addr,
                    "uptime_seconds": s.uptime_seconds,
                }));
                return Ok(());
            }
            let mut t = table();
            for (k, v) in [
                ("Status", s.status),
                ("Node ID", s.node_id),
                ("Cluster ID", s.cluster_id),
                ("Version", s.version),
                ("I/O engine", s.io_engine),
                ("Data dir", s.data_dir),
                ("Pool size", format_size(s.pool_size_bytes)),
                ("Pool allocated", format_size(s.pool_allocated_bytes)),
                ("Provisioned", format_size(s.pool_provisioned_bytes)),
                (
                    "Volumes",
                    format!("{} ({} attached)", s.volume_count, s.attached_count),
                ),
                ("Admin API", s.admin_addr),
                ("NBD", s.nbd_addr),
                ("Metrics", format!("http://{}/metrics", s.metrics_addr)),
                ("Uptime", format!("{}s", s.uptime_seconds)),
            ] {
                t.add_row(vec![format!("{k}:"), v]);
            }
            println!("{t}");
        }
        Cmd::Cluster(cc) => run_cluster(ch, json, cc).await?,
        Cmd::Alerts(AlertsCmd::Show) => run_alerts(ch, json).await?,
        Cmd::Volume(vc) => volume::run_volume(ch, json, vc).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`| head`) ends the process quietly, as
    // for other Unix tools, instead of a panic on the broken pipe.
    // SAFETY: called first thing, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandemctl: error: start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("tandemctl: error: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}
