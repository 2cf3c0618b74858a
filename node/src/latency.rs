//! The RTT prober: pings every peer over the data path once a second, keeps a sliding
//! window per peer, exports it as metrics and publishes a summary to the cluster metadata
//! (where the latency gate and `tandemctl cluster latency` read it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_engine::cluster::{
    ClusterHandle, ClusterState, Command, LatencyReport, NodeRole, ReplicaState, VolumeRecord,
};
use tandem_engine::latency::{DegradeChange, PeerWindow, PING_INTERVAL, REPORT_INTERVAL};
use tandem_engine::wire::WireClient;
use tokio::sync::watch;

use crate::config::RttPolicy;
use crate::metrics::Metrics;

/// A ping slower than this counts as lost (and the connection is re-made).
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Watches the domain pairs that volumes attached on this node replicate across, and
/// raises an alert when a pair's measured RTT (p50) goes above `--sync-max-rtt` and again
/// when it is back under.
///
/// Policy `alert`: replication stays synchronous, and the latency cost is visible.
///
/// Policy `degrade`: while the pair between this (the coordinator's) domain and another
/// domain is above the limit, every in-sync replica in that other domain is committed
/// `Async` (the coordinator stops waiting for it; its lag is in `volume inspect` and the
/// metrics). When the pair is back under 90% of the limit (hysteresis), each async replica is committed
/// `Resyncing`: the coordinator resyncs its dirty regions and commits it `InSync`. Each
/// of these mode changes is a committed metadata entry with an alert.
pub async fn run_rtt_watch(
    volumes: Arc<tandem_engine::volume::VolumeManager>,
    policy: RttPolicy,
    mut shutdown: watch::Receiver<bool>,
) {
    use std::collections::HashSet;
    let mut above: HashSet<(String, String, String)> = HashSet::new();
    // Replicas this watcher sent back to resync, until they are in sync again.
    let mut returning: HashSet<(String, u64)> = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(REPORT_INTERVAL) => {}
        }
        let cluster = volumes.cluster();
        let state = cluster.state();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let limit_us = volumes.sync_max_rtt().as_micros() as u64;
        let attached = volumes.attached_names();
        returning.retain(|(name, _)| attached.contains(name));
        for name in attached {
            let Some(v) = state.volumes.get(&name) else {
                continue;
            };
            for (a, b) in tandem_engine::latency::gated_pairs(&state, v) {
                let key = (name.clone(), a.clone(), b.clone());
                let Some(r) = tandem_engine::latency::domain_pair_rtt(&state, &a, &b, now) else {
                    continue;
                };
                let over = r.p50_us > limit_us;
                let consequence = match policy {
                    RttPolicy::Alert => {
                        "replication stays synchronous (policy alert) and writes pay the round trip"
                    }
                    RttPolicy::Degrade => {
                        "the coordinator's far replicas turn async (policy degrade)"
                    }
                };
                let change = if over && above.insert(key.clone()) {
                    Some(("warning", "rtt-exceeded", format!(
                            "volume {name}: RTT between domains {a} and {b} is p50 {:.1} ms p99 {:.1} ms, above the {:.1} ms sync limit; {consequence}",
                            r.p50_us as f64 / 1e3, r.p99_us as f64 / 1e3, limit_us as f64 / 1e3
                        )))
                } else if !over && above.remove(&key) {
                    Some(("info", "rtt-recovered", format!(
                            "volume {name}: RTT between domains {a} and {b} is back under the limit (p50 {:.1} ms)",
                            r.p50_us as f64 / 1e3
                        )))
                } else {
                    None
                };
                if let Some((severity, kind, message)) = change {
                    tracing::warn!(volume = %name, %message, "latency gate");
                    alert(cluster, now, severity, kind, &name, message).await;
                }
            }
            if policy == RttPolicy::Degrade {
                degrade_volume(&volumes, &state, v, limit_us, now, &mut returning).await;
            }
        }
    }
}

async fn alert(
    cluster: &ClusterHandle,
    now: u64,
    severity: &str,
    kind: &str,
    volume: &str,
    message: String,
) {
    let _ = cluster
        .propose(Command::RaiseAlert {
            unix_seconds: now,
            severity: severity.into(),
            kind: kind.into(),
            resource: format!("volume/{volume}"),
            message,
        })
        .await;
}

/// Policy `degrade` for one volume attached here (see [`run_rtt_watch`]): commits the
/// mode changes [`tandem_engine::latency::degrade_changes`] decides, with their alerts.
async fn degrade_volume(
    volumes: &tandem_engine::volume::VolumeManager,
    state: &ClusterState,
    v: &VolumeRecord,
    limit_us: u64,
    now: u64,
    returning: &mut std::collections::HashSet<(String, u64)>,
) {
    let cluster = volumes.cluster();
    let me = volumes.node_id();
    if v.attached_node != Some(me) {
        return;
    }
    let Ok(attached) = volumes.attached(&v.name) else {
        return;
    };
    let name = &v.name;
    for rep in &v.replicas {
        if rep.state == ReplicaState::InSync && returning.remove(&(name.clone(), rep.node)) {
            alert(
                cluster,
                now,
                "info",
                "replica-in-sync",
                name,
                format!(
                    "volume {name}: replica on node {} is synchronous again (resync finished)",
                    volumes.node_name(state, rep.node)
                ),
            )
            .await;
        }
    }
    for change in tandem_engine::latency::degrade_changes(state, v, me, limit_us, now) {
        let DegradeChange {
            node,
            domain,
            to: target,
            p50_us,
        } = change;
        let node_name = volumes.node_name(state, node);
        // The lag it leaves async with (before the coordinator stops its queue).
        let lag = attached.stats().and_then(|s| {
            s.replicas
                .iter()
                .find(|x| x.node == node)
                .map(|x| (x.async_lag_bytes, x.async_lag_seconds))
        });
        let res = cluster
            .propose(Command::SetReplicaState {
                name: name.clone(),
                node,
                state: target,
                generation: v.generation,
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(volume = %name, node, error = %e, "latency gate: cannot change the replica's mode");
            continue;
        }
        attached.adopt_replica_states().await;
        let (kind, severity, message) = if target == ReplicaState::Async {
            (
                "replica-async",
                "warning",
                format!(
                    "volume {name}: replica on node {node_name} (domain {domain}) is now async: RTT p50 {:.1} ms is above the {:.1} ms sync limit (policy degrade); writes are acked without waiting for it, its lag (RPO) is in `tandemctl volume inspect` and tandem_replica_async_lag_seconds (now 0 bytes, 0.0 s)",
                    p50_us as f64 / 1e3,
                    limit_us as f64 / 1e3
                ),
            )
        } else {
            returning.insert((name.clone(), node));
            let (bytes, secs) = lag.unwrap_or((0, 0.0));
            (
                "replica-resync",
                "info",
                format!(
                    "volume {name}: replica on node {node_name} (domain {domain}) leaves async: RTT p50 {:.1} ms is back under 90% of the {:.1} ms limit; its lag was {bytes} bytes, {secs:.1} s; it resyncs its dirty regions and then is in sync",
                    p50_us as f64 / 1e3,
                    limit_us as f64 / 1e3
                ),
            )
        };
        tracing::warn!(volume = %name, node, %message, "latency gate");
        alert(cluster, now, severity, kind, name, message).await;
    }
}

pub async fn run_prober(
    cluster: Arc<ClusterHandle>,
    token: Arc<Vec<u8>>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = cluster.node_id();
    let mut clients: HashMap<u64, (String, Arc<WireClient>)> = HashMap::new();
    let mut windows: HashMap<u64, PeerWindow> = HashMap::new();
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
        let state = cluster.state();
        let peers: Vec<(u64, String)> = state
            .nodes
            .values()
            .filter(|n| n.id != me && n.role != NodeRole::Witness && !n.data_addr.is_empty())
            .map(|n| (n.id, n.data_addr.clone()))
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (id, addr) in peers {
            let existing = clients
                .get(&id)
                .filter(|(a, c)| *a == addr && !c.is_closed())
                .map(|(_, c)| c.clone());
            let token = token.clone();
            tasks.spawn(async move {
                let client = match existing {
                    Some(c) => c,
                    None => {
                        match tokio::time::timeout(
                            PING_TIMEOUT,
                            WireClient::connect(&addr, token, me),
                        )
                        .await
                        {
                            Ok(Ok(c)) => c,
                            _ => return (id, addr, None, None),
                        }
                    }
                };
                let rtt = match tokio::time::timeout(PING_TIMEOUT, client.ping()).await {
                    Ok(Ok(d)) => Some(d),
                    _ => None,
                };
                (id, addr, Some(client), rtt)
            });
        }
        while let Some(Ok((id, addr, client, rtt))) = tasks.join_next().await {
            match (client, rtt) {
                (Some(c), Some(d)) => {
                    clients.insert(id, (addr, c));
                    windows.entry(id).or_default().record(d);
                }
                _ => {
                    clients.remove(&id);
                }
            }
        }
        windows.retain(|id, _| state.nodes.contains_key(id));
        for (id, w) in &windows {
            if let Some(st) = w.stats() {
                let name = state
                    .nodes
                    .get(id)
                    .map(|n| n.name.clone())
                    .unwrap_or_else(|| id.to_string());
                metrics.set_peer_rtt(&name, st.p50_us, st.p99_us, st.samples);
            }
        }
        if last_report.elapsed() >= REPORT_INTERVAL {
            last_report = Instant::now();
            let report = LatencyReport {
                unix_seconds: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or_default(),
                peers: windows
                    .iter()
                    .filter_map(|(id, w)| Some((*id, w.stats()?)))
                    .collect(),
            };
            let cluster = cluster.clone();
            // Best effort: a lost report only ages the published numbers.
            tokio::spawn(async move {
                let _ = cluster
                    .propose(Command::ReportLatency { node: me, report })
                    .await;
            });
        }
    }
}
