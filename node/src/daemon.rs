//! tandemd: start-up, the listeners, and clean shutdown.
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting, let NBD connections finish their in-flight
//! requests, then flush and checkpoint every volume, then exit 0.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use tandem_engine::io::IoEngine;
use tandem_engine::meta::SledMeta;
use tandem_engine::store::Pool;
use tandem_engine::units::format_size;
use tandem_engine::volume::VolumeManager;
use tandem_proto::admin::node_service_server::NodeServiceServer;
use tandem_proto::admin::volume_service_server::VolumeServiceServer;

use crate::admin::{AdminApi, NodeInfo};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::nbd::NbdServer;

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
    let meta =
        Arc::new(SledMeta::open(&data_dir.join("meta")).context("open the metadata store (sled)")?);
    let pool = Pool::open(&pool_dir, pool_size, engine.clone()).context("open the pool")?;

    // Listen before opening volumes, so a port conflict fails fast and changes nothing.
    let admin_l = bind(config.admin_addr, "admin API").await?;
    let nbd_l = bind(config.nbd_addr, "NBD server").await?;
    let metrics_l = bind(config.metrics_addr, "metrics endpoint").await?;
    let admin_addr = admin_l.local_addr()?;
    let nbd_addr = nbd_l.local_addr()?;
    let metrics_addr = metrics_l.local_addr()?;

    let volumes = VolumeManager::open(meta, pool)
        .await
        .context("open volumes")?;
    let metrics = Metrics::new();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let info = NodeInfo {
        data_dir: data_dir.display().to_string(),
        admin_addr: admin_addr.to_string(),
        nbd_addr: nbd_addr.to_string(),
        metrics_addr: metrics_addr.to_string(),
        started,
    };
    let api = Arc::new(AdminApi::new(volumes.clone(), info));
    let admin_task = {
        let mut rx = shutdown_rx.clone();
        tokio::spawn(async move {
            let res = tonic::transport::Server::builder()
                .add_service(NodeServiceServer::from_arc(api.clone()))
                .add_service(VolumeServiceServer::from_arc(api))
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
    let nbd_task = tokio::spawn(
        NbdServer::new(nbd_l, volumes.clone(), metrics.clone()).run(shutdown_rx.clone()),
    );
    let metrics_task = tokio::spawn(crate::metrics::serve(
        metrics_l,
        metrics.clone(),
        volumes.clone(),
        shutdown_rx.clone(),
    ));

    let id = volumes.identity();
    println!("tandemd {} ready", env!("CARGO_PKG_VERSION"));
    println!("  node id:     {}", id.node_id);
    println!("  cluster id:  {}", id.cluster_id);
    println!("  data dir:    {}", data_dir.display());
    println!("  io engine:   {}", engine.name());
    println!("  pool size:   {}", format_size(pool_size));
    println!("  admin API:   {admin_addr}");
    println!("  NBD:         nbd://{nbd_addr}/<volume>");
    println!("  metrics:     http://{metrics_addr}/metrics");
    tracing::info!(%admin_addr, %nbd_addr, %metrics_addr, engine = engine.name(), "tandemd ready");

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
    let _ = admin_task.await;
    let _ = metrics_task.await;
    tracing::info!("tandemd stopped cleanly");
    Ok(())
}
