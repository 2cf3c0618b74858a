//! tandemctl: the Tandem admin CLI, a thin client of tandemd's admin gRPC API.
//!
//! Every command takes `-j/--json`. Human output is aligned tables; errors are one line on
//! stderr with a non-zero exit code (1 for a refused request, 2 for bad usage, 3 when the
//! daemon cannot be reached).

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
    /// Compare the replicas block by block (run against the attach node)
    Verify {
        name: String,
        /// Also rewrite blocks that fail their checksum on some replicas from a good copy
        /// (a scrub); copies that pass their checksums but differ are only reported
        #[arg(long)]
        repair: bool,
    },
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

#[derive(Serialize)]
struct VolumeOut {
    id: String,
    name: String,
    size_bytes: u64,
    size: String,
    repl: u32,
    io_priority: String,
    labels: BTreeMap<String, String>,
    state: String,
    attached_node: Option<String>,
    nbd_uri: Option<String>,
    generation: u64,
    allocated_bytes: u64,
    created_unix_seconds: u64,
    replicas: Vec<ReplicaOut>,
    async_domains: Vec<String>,
}

#[derive(Serialize)]
struct ReplicaOut {
    node_id: String,
    state: String,
    allocated_bytes: u64,
    resync_done_bytes: u64,
    resync_total_bytes: u64,
    generation: u64,
    /// Async replicas (from the coordinator, when inspected on its node): bytes it has
    /// not acked and the age of the oldest such write (RPO).
    async_lag_bytes: u64,
    async_lag_seconds: f64,
}

fn prio_name(v: i32) -> String {
    match pb::IoPriority::try_from(v) {
        Ok(pb::IoPriority::Low) => "low",
        Ok(pb::IoPriority::Medium) => "medium",
        Ok(pb::IoPriority::High) => "high",
        _ => "unspecified",
    }
    .to_string()
}

fn prio_to_pb(s: &str) -> Result<pb::IoPriority, Failure> {
    Ok(match s.parse::<IoPriority>().map_err(Failure::usage)? {
        IoPriority::Low => pb::IoPriority::Low,
        IoPriority::Medium => pb::IoPriority::Medium,
        IoPriority::High => pb::IoPriority::High,
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn volume_out(v: pb::Volume) -> VolumeOut {
    VolumeOut {
        size: format_size(v.size_bytes),
        io_priority: prio_name(v.io_priority),
        labels: v.labels.into_iter().collect(),
        attached_node: non_empty(v.attached_node),
        nbd_uri: non_empty(v.nbd_uri),
        replicas: v
            .replicas
            .into_iter()
            .map(|r| ReplicaOut {
                node_id: r.node_id,
                state: r.state,
                allocated_bytes: r.allocated_bytes,
                resync_done_bytes: r.resync_done_bytes,
                resync_total_bytes: r.resync_total_bytes,
                generation: r.generation,
                async_lag_bytes: r.async_lag_bytes,
                async_lag_seconds: r.async_lag_seconds,
            })
            .collect(),
        id: v.id,
        name: v.name,
        size_bytes: v.size_bytes,
        repl: v.repl,
        state: v.state,
        generation: v.generation,
        allocated_bytes: v.allocated_bytes,
        created_unix_seconds: v.created_unix_seconds,
        async_domains: v.async_domains,
    }
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t
}

fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

fn print_volume(v: &VolumeOut) {
    let mut t = table();
    let labels = v
        .labels
        .iter()
        .map(|(k, val)| format!("{k}={val}"))
        .collect::<Vec<_>>()
        .join(",");
    for (k, val) in [
        ("Volume", v.name.clone()),
        ("ID", v.id.clone()),
        ("Size", v.size.clone()),
        ("Allocated", format_size(v.allocated_bytes)),
        ("Replication factor", v.repl.to_string()),
        ("I/O priority", v.io_priority.clone()),
        (
            "Labels",
            if labels.is_empty() {
                "-".into()
            } else {
                labels
            },
        ),
        ("State", v.state.clone()),
        (
            "Attached on",
            v.attached_node.clone().unwrap_or_else(|| "-".into()),
        ),
        ("NBD URI", v.nbd_uri.clone().unwrap_or_else(|| "-".into())),
        ("Generation", v.generation.to_string()),
        (
            "Async domains",
            if v.async_domains.is_empty() {
                "-".into()
            } else {
                v.async_domains.join(",")
            },
        ),
    ] {
        t.add_row(vec![format!("{k}:"), val]);
    }
    println!("{t}");
    let mut r = table();
    r.set_header(vec![
        "REPLICA NODE",
        "STATE",
        "GENERATION",
        "RESYNC",
        "ASYNC LAG",
        "ALLOCATED (local)",
    ]);
    for rep in &v.replicas {
        r.add_row(vec![
            rep.node_id.clone(),
            rep.state.clone(),
            rep.generation.to_string(),
            if rep.resync_total_bytes > 0 {
                format!(
                    "{} / {}",
                    format_size(rep.resync_done_bytes),
                    format_size(rep.resync_total_bytes)
                )
            } else {
                "-".into()
            },
            if rep.state.starts_with("async") {
                format!(
                    "{} / {:.1}s",
                    format_size(rep.async_lag_bytes),
                    rep.async_lag_seconds
                )
            } else {
                "-".into()
            },
            format_size(rep.allocated_bytes),
        ]);
    }
    println!("{r}");
}

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
        Cmd::Volume(vc) => {
            let mut c = VolumeServiceClient::new(ch);
            match vc {
                VolumeCmd::Create(a) => {
                    let size_bytes = parse_size(&a.size).map_err(Failure::usage)?;
                    let mut labels = std::collections::HashMap::new();
                    for l in &a.labels {
                        let Some((k, v)) = l.split_once('=') else {
                            return Err(Failure::usage(format!(
                                "invalid label '{l}': expected key=value"
                            )));
                        };
                        labels.insert(k.to_string(), v.to_string());
                    }
                    let v = c
                        .create_volume(pb::CreateVolumeRequest {
                            name: a.name,
                            size_bytes,
                            repl: a.repl,
                            io_priority: prio_to_pb(&a.io_priority)? as i32,
                            labels,
                            nodes: a.nodes,
                            zones: a.zones,
                            domains: a.domains,
                            async_domains: a.async_domains,
                        })
                        .await?
                        .into_inner()
                        .volume
                        .map(volume_out);
                    let Some(v) = v else {
                        return Err(Failure::usage("daemon returned no volume"));
                    };
                    if json {
                        print_json(&v);
                    } else {
                        println!("Volume created: {} ({}, id {})", v.name, v.size, v.id);
                    }
                }
                VolumeCmd::List => {
                    let vols: Vec<VolumeOut> = c
                        .list_volumes(pb::ListVolumesRequest {})
                        .await?
                        .into_inner()
                        .volumes
                        .into_iter()
                        .map(volume_out)
                        .collect();
                    if json {
                        print_json(&vols);
                        return Ok(());
                    }
                    let mut t = table();
                    t.set_header(vec![
                        "NAME",
                        "ID",
                        "SIZE",
                        "ALLOCATED",
                        "HA",
                        "PRIORITY",
                        "STATE",
                        "NODE",
                    ]);
                    for v in vols {
                        t.add_row(vec![
                            v.name,
                            v.id,
                            v.size,
                            format_size(v.allocated_bytes),
                            v.repl.to_string(),
                            v.io_priority,
                            v.state,
                            v.attached_node.unwrap_or_else(|| "-".into()),
                        ]);
                    }
                    println!("{t}");
                }
                VolumeCmd::Inspect { name } => {
                    let v = c
                        .inspect_volume(pb::InspectVolumeRequest { name })
                        .await?
                        .into_inner()
                        .volume
                        .map(volume_out);
                    let Some(v) = v else {
                        return Err(Failure::usage("daemon returned no volume"));
                    };
                    if json {
                        print_json(&v);
                    } else {
                        print_volume(&v);
                    }
                }
                VolumeCmd::Update(a) => {
                    if a.size.is_none() && a.repl.is_none() && a.io_priority.is_none() {
                        return Err(Failure::usage(
                            "nothing to update: give --size, --repl or --io-priority",
                        ));
                    }
                    let size_bytes = match &a.size {
                        Some(s) => parse_size(s).map_err(Failure::usage)?,
                        None => 0,
                    };
                    if a.repl == Some(0) {
                        return Err(Failure::usage("invalid replication factor 0"));
                    }
                    let io_priority = match &a.io_priority {
                        Some(p) => prio_to_pb(p)? as i32,
                        None => 0,
                    };
                    let name = a.name.clone();
                    let v = c
                        .update_volume(pb::UpdateVolumeRequest {
                            name: a.name,
                            size_bytes,
                            repl: a.repl.unwrap_or(0),
                            io_priority,
                        })
                        .await?
                        .into_inner()
                        .volume
                        .map(volume_out);
                    let Some(v) = v else {
                        return Err(Failure::usage("daemon returned no volume"));
                    };
                    let v = if a.wait {
                        wait_in_sync(&mut c, &name, json, a.wait_timeout).await?
                    } else {
                        v
                    };
                    if json {
                        print_json(&v);
                    } else {
                        println!(
                            "Volume updated: {} ({}, HA {}, priority {})",
                            v.name, v.size, v.repl, v.io_priority
                        );
                    }
                }
                VolumeCmd::Delete { name, force } => {
                    c.delete_volume(pb::DeleteVolumeRequest {
                        name: name.clone(),
                        force,
                    })
                    .await?;
                    if json {
                        print_json(&serde_json::json!({ "deleted": name }));
                    } else {
                        println!("Volume deleted: {name}");
                    }
                }
                VolumeCmd::Attach { name, force } => {
                    let r = c
                        .attach_volume(pb::AttachVolumeRequest { name, force })
                        .await?
                        .into_inner();
                    let Some(v) = r.volume.map(volume_out) else {
                        return Err(Failure::usage("daemon returned no volume"));
                    };
                    if json {
                        print_json(&v);
                    } else {
                        println!("Volume attached: {} (generation {})", v.name, v.generation);
                        println!("NBD URI: {}", r.nbd_uri);
                    }
                }
                VolumeCmd::Verify { name, repair } => {
                    let r = c
                        .verify_volume(pb::VerifyVolumeRequest {
                            name: name.clone(),
                            repair,
                        })
                        .await?
                        .into_inner();
                    if json {
                        print_json(&serde_json::json!({
                            "volume": name,
                            "blocks_compared": r.blocks_compared,
                            "in_sync_nodes": r.in_sync_nodes,
                            "resyncing_nodes": r.resyncing_nodes,
                            "mismatched_blocks": r.mismatched_blocks,
                            "repaired_blocks": r.repaired_blocks,
                            "mismatches": r.mismatches,
                            "resyncing_mismatched_blocks": r.resyncing_mismatched_blocks,
                            "errors": r.errors,
                        }));
                    } else {
                        println!(
                            "Volume {name}: {} blocks compared across in-sync replicas [{}]",
                            r.blocks_compared,
                            r.in_sync_nodes.join(", ")
                        );
                        if repair {
                            println!(
                                "Mismatched blocks: {} ({} repaired)",
                                r.mismatched_blocks, r.repaired_blocks
                            );
                        } else {
                            println!("Mismatched blocks: {}", r.mismatched_blocks);
                        }
                        for m in &r.mismatches {
                            println!("  {m}");
                        }
                        if !r.resyncing_nodes.is_empty() {
                            println!(
                                "Resyncing replicas [{}]: {} blocks still differ",
                                r.resyncing_nodes.join(", "),
                                r.resyncing_mismatched_blocks
                            );
                        }
                        for e in &r.errors {
                            println!("  not compared: {e}");
                        }
                    }
                    let left = r.mismatched_blocks - r.repaired_blocks.min(r.mismatched_blocks);
                    if left > 0 || !r.errors.is_empty() {
                        return Err(Failure {
                            msg: format!(
                                "volume '{name}': {left} mismatched blocks{}, {} replicas not compared",
                                if repair { " not repaired" } else { "" },
                                r.errors.len()
                            ),
                            code: 1,
                        });
                    }
                }
                VolumeCmd::Detach { name } => {
                    let v = c
                        .detach_volume(pb::DetachVolumeRequest { name })
                        .await?
                        .into_inner()
                        .volume
                        .map(volume_out);
                    let Some(v) = v else {
                        return Err(Failure::usage("daemon returned no volume"));
                    };
                    if json {
                        print_json(&v);
                    } else {
                        println!("Volume detached: {}", v.name);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Polls the volume until every replica is in sync, drawing resync progress.
async fn wait_in_sync(
    c: &mut VolumeServiceClient<Channel>,
    name: &str,
    quiet: bool,
    timeout_s: u64,
) -> Result<VolumeOut, Failure> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message(format!("resyncing {name}"));
        b
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    loop {
        let v = c
            .inspect_volume(pb::InspectVolumeRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner()
            .volume
            .map(volume_out)
            .ok_or_else(|| Failure::usage("daemon returned no volume"))?;
        if v.replicas.iter().all(|r| r.state == "in-sync") && v.replicas.len() == v.repl as usize {
            bar.finish_and_clear();
            return Ok(v);
        }
        if v.attached_node.is_none() {
            bar.abandon();
            return Err(Failure {
                msg: format!(
                    "volume '{name}' is detached: its new replicas resync once it is attached (the coordinator copies the data)"
                ),
                code: 1,
            });
        }
        let total: u64 = v.replicas.iter().map(|r| r.resync_total_bytes).sum();
        let done: u64 = v.replicas.iter().map(|r| r.resync_done_bytes).sum();
        bar.set_length(total.max(1));
        bar.set_position(done);
        if std::time::Instant::now() > deadline {
            bar.abandon();
            return Err(Failure {
                msg: format!("volume '{name}' not in sync after {timeout_s} s"),
                code: 1,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[derive(Serialize)]
struct NodeOut {
    id: u64,
    name: String,
    role: String,
    leader: bool,
    raft_voter: bool,
    health: String,
    domain: String,
    zone: String,
    rack: String,
    admin_addr: String,
    data_addr: String,
    pool_size_bytes: u64,
    provisioned_bytes: u64,
}

fn node_out(n: pb::NodeInfo) -> NodeOut {
    NodeOut {
        id: n.id,
        name: n.name,
        role: n.role,
        leader: n.is_leader,
        raft_voter: n.raft_voter,
        health: n.health,
        domain: n.domain,
        zone: n.zone,
        rack: n.rack,
        admin_addr: n.admin_addr,
        data_addr: n.data_addr,
        pool_size_bytes: n.pool_size_bytes,
        provisioned_bytes: n.provisioned_bytes,
    }
}

fn print_nodes(nodes: &[NodeOut]) {
    let mut t = table();
    t.set_header(vec![
        "ID",
        "NAME",
        "ROLE",
        "HEALTH",
        "DOMAIN",
        "ZONE",
        "RACK",
        "ADMIN",
        "DATA",
        "POOL",
        "PROVISIONED",
    ]);
    for n in nodes {
        t.add_row(vec![
            n.id.to_string(),
            n.name.clone(),
            if n.leader {
                format!("{} (leader)", n.role)
            } else {
                n.role.clone()
            },
            n.health.clone(),
            n.domain.clone(),
            n.zone.clone(),
            n.rack.clone(),
            n.admin_addr.clone(),
            n.data_addr.clone(),
            format_size(n.pool_size_bytes),
            format_size(n.provisioned_bytes),
        ]);
    }
    println!("{t}");
}

async fn run_cluster(ch: Channel, json: bool, cmd: ClusterCmd) -> Result<(), Failure> {
    let mut c = ClusterServiceClient::new(ch);
    match cmd {
        ClusterCmd::List => {
            let nodes: Vec<NodeOut> = c
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes
                .into_iter()
                .map(node_out)
                .collect();
            if json {
                print_json(&nodes);
            } else {
                print_nodes(&nodes);
            }
        }
        ClusterCmd::Inspect => {
            let r = c
                .inspect_cluster(pb::InspectClusterRequest {})
                .await?
                .into_inner();
            let nodes: Vec<NodeOut> = r.nodes.into_iter().map(node_out).collect();
            if json {
                print_json(&serde_json::json!({
                    "cluster_id": r.cluster_id,
                    "leader_id": r.leader_id,
                    "term": r.term,
                    "commit_index": r.commit_index,
                    "applied_index": r.applied_index,
                    "local_node_id": r.local_node_id,
                    "voters": r.voters,
                    "learners": r.learners,
                    "warnings": r.warnings,
                    "volume_count": r.volume_count,
                    "nodes": nodes,
                }));
                return Ok(());
            }
            let mut t = table();
            for (k, v) in [
                ("Cluster ID", r.cluster_id.clone()),
                ("Leader", r.leader_id.to_string()),
                ("Term", r.term.to_string()),
                ("Commit index", r.commit_index.to_string()),
                ("Applied index", r.applied_index.to_string()),
                ("This node", r.local_node_id.to_string()),
                ("Voters", format!("{:?}", r.voters)),
                ("Learners", format!("{:?}", r.learners)),
                ("Volumes", r.volume_count.to_string()),
            ] {
                t.add_row(vec![format!("{k}:"), v]);
            }
            println!("{t}");
            for w in &r.warnings {
                println!("Warning: {w}");
            }
            print_nodes(&nodes);
        }
        ClusterCmd::Latency => {
            let r = c.latency(pb::LatencyRequest {}).await?.into_inner();
            let pair = |p: &pb::RttPair| {
                serde_json::json!({
                    "from": p.from, "to": p.to, "p50_us": p.p50_us, "p99_us": p.p99_us,
                    "samples": p.samples, "age_seconds": p.age_seconds, "pairs": p.pairs,
                    "sync_allowed": p.sync_allowed,
                })
            };
            if json {
                print_json(&serde_json::json!({
                    "sync_max_rtt_us": r.sync_max_rtt_us,
                    "nodes": r.nodes.iter().map(pair).collect::<Vec<_>>(),
                    "domains": r.domains.iter().map(pair).collect::<Vec<_>>(),
                }));
                return Ok(());
            }
            let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
            let mut t = table();
            t.set_header(vec!["FROM", "TO", "P50", "P99", "SAMPLES", "AGE"]);
            for p in &r.nodes {
                t.add_row(vec![
                    p.from.clone(),
                    p.to.clone(),
                    ms(p.p50_us),
                    ms(p.p99_us),
                    p.samples.to_string(),
                    format!("{}s", p.age_seconds),
                ]);
            }
            println!("{t}");
            let mut d = table();
            d.set_header(vec![
                "DOMAIN",
                "DOMAIN",
                "P50",
                "P99",
                "NODE PAIRS",
                "METRO SYNC",
            ]);
            for p in &r.domains {
                d.add_row(vec![
                    p.from.clone(),
                    p.to.clone(),
                    if p.pairs == 0 {
                        "-".into()
                    } else {
                        ms(p.p50_us)
                    },
                    if p.pairs == 0 {
                        "-".into()
                    } else {
                        ms(p.p99_us)
                    },
                    p.pairs.to_string(),
                    if p.sync_allowed {
                        "allowed".into()
                    } else if p.pairs == 0 {
                        "refused (no samples)".into()
                    } else {
                        "refused (above limit)".into()
                    },
                ]);
            }
            println!("{d}");
            println!("Sync limit (--sync-max-rtt): {}", ms(r.sync_max_rtt_us));
        }
        ClusterCmd::Domains(cmd) => {
            let r = match cmd {
                DomainsCmd::Show => c.list_domains(pb::ListDomainsRequest {}).await?,
                DomainsCmd::Activate { name } => {
                    c.set_domain_active(pb::SetDomainActiveRequest {
                        domain: name,
                        active: true,
                        promote_async: false,
                    })
                    .await?
                }
                DomainsCmd::Deactivate {
                    name,
                    promote_async,
                } => {
                    c.set_domain_active(pb::SetDomainActiveRequest {
                        domain: name,
                        active: false,
                        promote_async,
                    })
                    .await?
                }
            }
            .into_inner();
            if json {
                let v: Vec<_> = r
                    .domains
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "name": d.name, "active": d.active, "nodes": d.nodes,
                            "volumes": d.volumes.iter().map(|v| serde_json::json!({"volume": v.volume, "status": v.status})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                if r.unavailable_volumes.is_empty() {
                    print_json(&v);
                } else {
                    print_json(&serde_json::json!({
                        "domains": v,
                        "unavailable_volumes": r.unavailable_volumes,
                    }));
                }
                return Ok(());
            }
            if !r.unavailable_volumes.is_empty() {
                eprintln!(
                    "warning: these volumes have no in-sync copy outside the domain and stay unavailable until it is activated again (nothing was deleted): {}",
                    r.unavailable_volumes.join(", ")
                );
            }
            let mut t = table();
            t.set_header(vec!["DOMAIN", "STATE", "NODES", "VOLUMES"]);
            for d in r.domains {
                t.add_row(vec![
                    d.name,
                    if d.active { "active" } else { "inactive" }.to_string(),
                    d.nodes.join(", "),
                    d.volumes
                        .iter()
                        .map(|v| format!("{} ({})", v.volume, v.status))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]);
            }
            println!("{t}");
        }
        ClusterCmd::Remove { node } => {
            let r = c
                .remove_node(pb::RemoveNodeRequest { node })
                .await?
                .into_inner();
            if json {
                print_json(&serde_json::json!({"id": r.id, "name": r.name, "removed": true}));
            } else {
                println!("Node {} ({}) removed from the cluster", r.name, r.id);
            }
        }
        ClusterCmd::Token(TokenCmd::Show) => {
            let r = c.show_token(pb::ShowTokenRequest {}).await?.into_inner();
            if json {
                print_json(&serde_json::json!({"cluster_id": r.cluster_id, "token": r.token}));
            } else {
                println!("Cluster ID: {}", r.cluster_id);
                println!("Join token: {}", r.token);
            }
        }
    }
    Ok(())
}

async fn run_alerts(ch: Channel, json: bool) -> Result<(), Failure> {
    let alerts = ClusterServiceClient::new(ch)
        .list_alerts(pb::ListAlertsRequest {})
        .await?
        .into_inner()
        .alerts;
    if json {
        let v: Vec<_> = alerts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id, "unix_seconds": a.unix_seconds, "severity": a.severity,
                    "kind": a.kind, "resource": a.resource, "message": a.message,
                })
            })
            .collect();
        print_json(&v);
        return Ok(());
    }
    let mut t = table();
    t.set_header(vec![
        "ID", "TIME", "SEVERITY", "KIND", "RESOURCE", "MESSAGE",
    ]);
    for a in alerts {
        t.add_row(vec![
            a.id.to_string(),
            a.unix_seconds.to_string(),
            a.severity,
            a.kind,
            a.resource,
            a.message,
        ]);
    }
    println!("{t}");
    Ok(())
}

fn main() -> ExitCode {
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
