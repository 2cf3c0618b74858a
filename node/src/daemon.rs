//! tandemd: start-up, the listeners, and clean shutdown.
//!
//! Start-up: listeners first (a port conflict fails fast and changes nothing), then the
//! admin gRPC server (peers must reach it while we join), then the node identity: restart
//! from sled, bootstrap a new cluster, or join one with `--join ADDR --token T`. Then the
//! volumes, the NBD server and metrics.
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting, let NBD connections finish their in-flight
//! requests, flush and checkpoint every volume, stop raft, exit 0.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use tandem_engine::cluster::{Bootstrap, ClusterHandle, Command, NodeRecord, NodeRole, RaftNode};
use tandem_engine::io::IoEngine;
use tandem_engine::meta::{load_identity, random_hex, save_identity, LocalIdentity};
use tandem_engine::store::Pool;
use tandem_engine::units::format_size;
use tandem_engine::volume::VolumeManager;
use tandem_proto::admin as pb;
use tandem_proto::admin::cluster_service_server::ClusterServiceServer;
use tandem_proto::admin::node_service_server::NodeServiceServer;
use tandem_proto::admin::peer_service_server::PeerServiceServer;
use tandem_proto::admin::volume_service_server::VolumeServiceServer;

use crate::admin::{AdminApi, NodeInfo};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::nbd::NbdServer;
use crate::peer::{join_cluster, GrpcForwarder, GrpcTransport, PeerApi};

/// How long a new cluster's first node waits to elect itself.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(15);

/// Bytes already allocated by files in `dir` (their blocks on disk).
fn bytes_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Free bytes for unprivileged use on the filesystem holding `dir`.
fn fs_available(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context("statvfs on the data directory");
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let data_dir = config
        .data_dir
        .canonicalize()
        .context("resolve the data directory")?;
    let pool_dir = data_dir.join("pool");
    std::fs::create_dir_all(&pool_dir).context("create the pool directory")?;
    let pool_size = match config.pool_size_bytes {
        Some(n) => n,
        None => fs_available(&data_dir)? + bytes_on_disk(&pool_dir),
    };
    let engine = IoEngine::new(config.io_engine).context("start the I/O engine")?;
    let db = sled::open(data_dir.join("meta")).context("open the metadata store (sled)")?;
    let pool = Pool::open(&pool_dir, pool_size, engine.clone()).context("open the pool")?;

    let admin_l = bind(config.admin_addr, "admin API").await?;
    let nbd_l = bind(config.nbd_addr, "NBD server").await?;
    let metrics_l = bind(config.metrics_addr, "metrics endpoint").await?;
    let data_l = bind(config.data_addr, "data path").await?;
    let admin_addr = admin_l.local_addr()?;
    let nbd_addr = nbd_l.local_addr()?;
    let metrics_addr = metrics_l.local_addr()?;
    let data_addr = data_l.local_addr()?;
    let adv_admin = config
        .advertise_admin_addr
        .clone()
        .unwrap_or_else(|| admin_addr.to_string());
    let adv_data = config
        .advertise_data_addr
        .clone()
        .unwrap_or_else(|| data_addr.to_string());

    // Identity: who we are, in which cluster, with which token.
    let existing = load_identity(&db).context("read the node identity")?;
    let (identity, bootstrap, seed_peers) = match existing {
        Some(id) => {
            if config.join.is_some() {
                tracing::info!(cluster = %id.cluster_id, "already a member; --join ignored");
            }
            (id, Bootstrap::Restart, None)
        }
        None => match &config.join {
            None => {
                let id = LocalIdentity {
                    node_id: 1,
                    name: config
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("node-{}", random_hex(4))),
                    cluster_id: random_hex(8),
                    token: config
                        .token
                        .clone()
                        .unwrap_or_else(|| format!("tdm-{}", random_hex(24))),
                };
                save_identity(&db, &id).context("store the node identity")?;
                (id, Bootstrap::NewCluster, None)
            }
            Some(seed) => (
                LocalIdentity {
                    node_id: 0,
                    name: config
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("node-{}", random_hex(4))),
                    cluster_id: String::new(),
                    token: config.token.clone().unwrap_or_default(),
                },
                Bootstrap::Join,
                Some(seed.clone()),
            ),
        },
    };
    let token = Arc::new(identity.token.as_bytes().to_vec());

    // The admin server starts before we join: the leader must reach our PeerService.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let peer_api = PeerApi::new(token.clone());
    let metrics = Metrics::new();
    let info = NodeInfo {
        data_dir: data_dir.display().to_string(),
        admin_addr: admin_addr.to_string(),
        nbd_addr: nbd_addr.to_string(),
        metrics_addr: metrics_addr.to_string(),
        data_addr: adv_data.clone(),
        started,
        token: identity.token.clone(),
    };
    let api = Arc::new(AdminApi::new(info));
    let admin_task = {
        let mut rx = shutdown_rx.clone();
        let api = api.clone();
        let peer_api = peer_api.clone();
        tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .add_service(NodeServiceServer::from_arc(api.clone()))
                .add_service(VolumeServiceServer::from_arc(api.clone()))
                .add_service(ClusterServiceServer::from_arc(api))
                .add_service(PeerServiceServer::from_arc(peer_api))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(admin_l),
                    async move {
                        let _ = rx.changed().await;
                    },
                )
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "admin API server failed");
            }
        })
    };

    let mut identity = identity;
    let mut seeds = std::collections::HashMap::new();
    if let Some(seed) = seed_peers {
        let resp = join_cluster(
            &seed,
            &token,
            pb::JoinRequest {
                nonce: Vec::new(),
                name: identity.name.clone(),
                admin_addr: adv_admin.clone(),
                data_addr: adv_data.clone(),
                domain: config.domain.clone(),
                zone: config.zone.clone(),
                rack: config.rack.clone(),
                role: if config.witness {
                    "witness"
                } else if config.kvdb {
                    "voter"
                } else {
                    "auto"
                }
                .into(),
                pool_size_bytes: if config.witness { 0 } else { pool_size },
                mac: Vec::new(),
                instance: new_instance()?,
            },
        )
        .await?;
        identity.node_id = resp.node_id;
        identity.cluster_id = resp.cluster_id.clone();
        save_identity(&db, &identity).context("store the node identity")?;
        seeds = resp.peers;
        tracing::info!(node_id = identity.node_id, cluster = %identity.cluster_id, "joined the cluster");
    }

    let transport = GrpcTransport::new(identity.node_id, token.clone());
    let raft = RaftNode::start(identity.node_id, &db, bootstrap, transport.clone())
        .map_err(|e| anyhow::anyhow!("start raft: {e}"))?;
    let forwarder = Arc::new(GrpcForwarder {
        me: identity.node_id,
        token: token.clone(),
    });
    let cluster = ClusterHandle::new(raft.clone(), forwarder);
    cluster.set_seed_peers(seeds);
    transport.bind(&cluster);
    peer_api.bind(cluster.clone());
    if matches!(bootstrap, Bootstrap::Join) {
        wait_for_voter(&cluster, identity.node_id).await;
    }

    let me = NodeRecord {
        id: identity.node_id,
        name: identity.name.clone(),
        admin_addr: adv_admin.clone(),
        data_addr: adv_data.clone(),
        domain: config.domain.clone(),
        zone: config.zone.clone(),
        rack: config.rack.clone(),
        // The first node is raft's only voter; as a record it is pinned only with `--kvdb`
        // (the placement by topology may later hand its vote to a better-placed node).
        role: if config.kvdb {
            NodeRole::Voter
        } else {
            NodeRole::Learner
        },
        pool_size_bytes: pool_size,
        joined_unix_seconds: now_unix(),
        instance: new_instance()?,
    };
    if matches!(bootstrap, Bootstrap::NewCluster) {
        let deadline = Instant::now() + BOOTSTRAP_TIMEOUT;
        while raft.status().leader_id != identity.node_id {
            if Instant::now() > deadline {
                anyhow::bail!("the new cluster's first node could not elect itself within {BOOTSTRAP_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster
            .propose(Command::Init {
                cluster_id: identity.cluster_id.clone(),
            })
            .await
            .context("initialise the cluster")?;
        cluster
            .propose(Command::AddNode { node: me.clone() })
            .await
            .context("register the first node")?;
    } else {
        // Keep our advertised addresses current (ports may change across restarts).
        let cluster = cluster.clone();
        let me = me.clone();
        tokio::spawn(async move {
            for _ in 0..120 {
                let st = cluster.state();
                match st.nodes.get(&me.id) {
                    Some(n) if n.admin_addr == me.admin_addr && n.data_addr == me.data_addr => {
                        return
                    }
                    Some(_) => {
                        let r = cluster
                            .propose(Command::UpdateNodeAddrs {
                                id: me.id,
                                admin_addr: me.admin_addr.clone(),
                                data_addr: me.data_addr.clone(),
                            })
                            .await;
                        if r.is_ok() {
                            return;
                        }
                    }
                    None => {}
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    let volumes = VolumeManager::open(cluster.clone(), pool, token.clone())
        .await
        .context("open volumes")?;
    volumes.set_sync_max_rtt(config.sync_max_rtt);
    volumes.set_io_slots(config.io_slots);
    volumes.set_io_capacity(config.io_capacity_iops);
    api.bind(volumes.clone());
    peer_api.bind_volumes(volumes.clone());
    let rtt_watch_task = tokio::spawn(crate::latency::run_rtt_watch(
        volumes.clone(),
        config.on_rtt_exceeded,
        shutdown_rx.clone(),
    ));
    let prober_task = tokio::spawn(crate::latency::run_prober(
        cluster.clone(),
        token.clone(),
        metrics.clone(),
        shutdown_rx.clone(),
    ));

    // The leader converges raft's configuration to the node table (concurrent joins).
    let membership_task = {
        let cluster = cluster.clone();
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(tandem_engine::cluster::membership::CONVERGE_INTERVAL) => {}
                }
                if let Err(e) = cluster.converge_membership().await {
                    tracing::debug!(error = %e, "raft membership change not made yet; retrying");
                }
            }
        })
    };
    let data_task = tokio::spawn(crate::replica::serve_data_path(
        data_l,
        token.clone(),
        volumes.clone(),
        shutdown_rx.clone(),
    ));
    let nbd_task = tokio::spawn(
        NbdServer::new(nbd_l, volumes.clone(), metrics.clone()).run(shutdown_rx.clone()),
    );
    let csi_task = match &config.csi_endpoint {
        Some(path) => {
            let ctx = crate::csi::CsiContext::new(
                volumes.clone(),
                config
                    .csi_node_id
                    .clone()
                    .unwrap_or_else(|| identity.name.clone()),
                identity.name.clone(),
                config.domain.clone(),
                config.zone.clone(),
                data_dir.join("csi"),
            )
            .context("set up the CSI node state directory")?;
            crate::csi::node::recover(&ctx).await;
            let path = path.clone();
            let rx = shutdown_rx.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = crate::csi::serve(ctx, path, rx).await {
                    tracing::error!(error = format!("{e:#}"), "CSI server failed");
                }
            }))
        }
        None => None,
    };
    let metrics_task = tokio::spawn(crate::metrics::serve(
        metrics_l,
        metrics.clone(),
        volumes.clone(),
        shutdown_rx.clone(),
    ));

    println!("tandemd {} ready", env!("CARGO_PKG_VERSION"));
    println!("  node:        {} (id {})", identity.name, identity.node_id);
    println!("  cluster id:  {}", identity.cluster_id);
    println!("  join token:  {}", identity.token);
    println!("  data dir:    {}", data_dir.display());
    println!("  io engine:   {}", engine.name());
    println!("  pool size:   {}", format_size(pool_size));
    println!(
        "  topology:    domain {} zone {} rack {}",
        config.domain, config.zone, config.rack
    );
    println!("  data path:   {data_addr}");
    println!("  admin API:   {admin_addr}");
    println!("  NBD:         nbd://{nbd_addr}/<volume>");
    println!("  metrics:     http://{metrics_addr}/metrics");
    if let Some(p) = &config.csi_endpoint {
        println!(
            "  CSI:         unix://{} ({})",
            p.display(),
            crate::csi::DRIVER_NAME
        );
    }
    tracing::info!(%admin_addr, %nbd_addr, %metrics_addr, %data_addr, engine = engine.name(), "tandemd ready");

    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = shutdown_tx.send(true);
    // NBD first: it drains in-flight I/O. Then flush and checkpoint every volume.
    let _ = nbd_task.await;
    volumes.shutdown().await;
    let _ = data_task.await;
    let _ = admin_task.await;
    let _ = metrics_task.await;
    if let Some(t) = csi_task {
        let _ = t.await;
    }
    let _ = prober_task.await;
    let _ = rtt_watch_task.await;
    let _ = membership_task.await;
    raft.stop();
    tracing::info!("tandemd stopped cleanly");
    Ok(())
}

/// A random id for this incarnation of the node (`NodeRecord::instance`).
fn new_instance() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// How long a joining node waits to become a raft voter before it serves anyway.
const VOTER_WAIT: Duration = Duration::from_secs(30);

/// A node that joined as a future voter starts as a raft learner; the leader promotes it
/// once it answers (`cluster::membership`). Serve only after that (bounded), so a cluster
/// that reports this node as started counts its vote. A future voter is a pinned one
/// (`--kvdb`, `--witness`), or a storage node the placement by topology picks (as seen
/// from here: every node of the table counted as reachable).
async fn wait_for_voter(cluster: &ClusterHandle, id: u64) {
    let deadline = Instant::now() + VOTER_WAIT;
    loop {
        let st = cluster.status();
        if st.voters.contains(&id) {
            return;
        }
        let state = cluster.state();
        let everyone: Vec<u64> = state.nodes.keys().copied().collect();
        let placed = tandem_engine::cluster::membership::desired_voters(
            &state.nodes,
            &st.voters,
            &everyone,
            st.leader_id,
        );
        // Until this node has caught up to its own join, it cannot tell.
        let caught_up = state.nodes.contains_key(&id) && !st.voters.is_empty();
        if caught_up && !placed.contains(&id) {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!(
                id,
                "not a raft voter yet after {VOTER_WAIT:?}; the leader keeps trying"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
