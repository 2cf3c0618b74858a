//! Prometheus metrics, served as text on `--metrics-addr` at `/metrics`.
//!
//! Per-volume series carry a `volume` label. Latency histograms are in seconds with
//! exponential buckets from 10 us to about 10 s, which covers a page-cache hit on loopback
//! up to a stalled disk.

use std::sync::Arc;

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};
use tandem_engine::sched::{CLASSES, CLASS_NAMES};
use tandem_engine::volume::VolumeManager;

pub struct Metrics {
    registry: Registry,
    read_ops: IntCounterVec,
    write_ops: IntCounterVec,
    flush_ops: IntCounterVec,
    zero_ops: IntCounterVec,
    read_bytes: IntCounterVec,
    write_bytes: IntCounterVec,
    read_latency: HistogramVec,
    write_latency: HistogramVec,
    flush_latency: HistogramVec,
    checksum_errors: IntCounterVec,
    io_errors: IntCounterVec,
    pool_size: IntGauge,
    pool_allocated: IntGauge,
    volumes: IntGauge,
    pub nbd_connections: IntGauge,
    pub nbd_protocol_errors: IntCounter,
    ejections: IntCounterVec,
    read_repairs: IntCounterVec,
    replicas: prometheus::IntGaugeVec,
    snapshots: prometheus::IntGaugeVec,
    snapshot_bytes: prometheus::IntGaugeVec,
    resync_done: prometheus::IntGaugeVec,
    resync_total: prometheus::IntGaugeVec,
    hot_regions: prometheus::IntGaugeVec,
    async_lag_bytes: prometheus::IntGaugeVec,
    async_lag_seconds: prometheus::GaugeVec,
    peer_rtt: prometheus::GaugeVec,
    peer_rtt_samples: prometheus::IntGaugeVec,
    raft_term: IntGauge,
    raft_applied: IntGauge,
    raft_leader: IntGauge,
    class_ops: IntCounterVec,
    class_latency: HistogramVec,
    class_admitted: IntCounterVec,
    class_waited: IntCounterVec,
    class_paced: IntCounterVec,
    class_capacity: prometheus::GaugeVec,
    class_wait_seconds: prometheus::CounterVec,
    class_in_flight: prometheus::IntGaugeVec,
}

fn float_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
    let g = prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::IntGaugeVec {
    let g = prometheus::IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// Raises a counter to `value` (coordinator counters are cumulative; a restarted
/// coordinator starts again from zero, which is then skipped).
fn raise(c: &IntCounter, value: u64) {
    let cur = c.get();
    if value > cur {
        c.inc_by(value - cur);
    }
}

/// Label handles of one volume, resolved once per connection.
#[derive(Clone)]
pub struct VolumeMetrics {
    pub read_ops: IntCounter,
    pub write_ops: IntCounter,
    pub flush_ops: IntCounter,
    pub zero_ops: IntCounter,
    pub read_bytes: IntCounter,
    pub write_bytes: IntCounter,
    pub read_latency: prometheus::Histogram,
    pub write_latency: prometheus::Histogram,
    pub flush_latency: prometheus::Histogram,
    pub checksum_errors: IntCounter,
    pub io_errors: IntCounter,
    /// By I/O priority class ([`tandem_engine::sched::class_index`]): requests completed
    /// and their latency, gate wait included.
    pub class_ops: [IntCounter; CLASSES],
    pub class_latency: [prometheus::Histogram; CLASSES],
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounterVec {
    counter_by(r, name, help, &["volume"])
}

fn counter_by(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str) -> HistogramVec {
    histogram_by(r, name, help, &["volume"])
}

fn histogram_by(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = exponential_buckets(10e-6, 2.0, 20).expect("valid buckets");
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let nbd_protocol_errors = IntCounter::new(
            "tandem_nbd_connection_errors_total",
            "NBD connections closed because of a protocol violation or I/O error",
        )
        .expect("valid metric");
        r.register(Box::new(nbd_protocol_errors.clone()))
            .expect("unique metric");
        Arc::new(Metrics {
            read_ops: counter(
                &r,
                "tandem_volume_read_ops_total",
                "Read requests completed",
            ),
            write_ops: counter(
                &r,
                "tandem_volume_write_ops_total",
                "Write requests completed",
            ),
            flush_ops: counter(
                &r,
                "tandem_volume_flush_ops_total",
                "Flush requests completed",
            ),
            zero_ops: counter(
                &r,
                "tandem_volume_zero_ops_total",
                "Trim and write-zeroes requests completed",
            ),
            read_bytes: counter(&r, "tandem_volume_read_bytes_total", "Bytes read"),
            write_bytes: counter(&r, "tandem_volume_write_bytes_total", "Bytes written"),
            read_latency: histogram(&r, "tandem_volume_read_latency_seconds", "Read latency"),
            write_latency: histogram(&r, "tandem_volume_write_latency_seconds", "Write latency"),
            flush_latency: histogram(&r, "tandem_volume_flush_latency_seconds", "Flush latency"),
            checksum_errors: counter(
                &r,
                "tandem_volume_checksum_errors_total",
                "Reads refused because a block failed its crc32",
            ),
            io_errors: counter(
                &r,
                "tandem_volume_io_errors_total",
                "Requests that failed with EIO or ENOSPC",
            ),
            pool_size: gauge(&r, "tandem_pool_size_bytes", "Configured pool capacity"),
            pool_allocated: gauge(
                &r,
                "tandem_pool_allocated_bytes",
                "Bytes allocated by replicas in the pool",
            ),
            volumes: gauge(&r, "tandem_volumes", "Volumes on this node"),
            nbd_connections: gauge(&r, "tandem_nbd_connections", "Open NBD connections"),
            nbd_protocol_errors,
            ejections: counter(
                &r,
                "tandem_volume_ejections_total",
                "In-sync replicas ejected by this node's coordinator (committed out-of-sync)",
            ),
            read_repairs: counter(
                &r,
                "tandem_volume_read_repairs_total",
                "Blocks read from another replica after a checksum failure and rewritten",
            ),
            replicas: gauge_vec(
                &r,
                "tandem_volume_replicas",
                "Replicas of each volume by state",
                &["volume", "state"],
            ),
            snapshots: gauge_vec(
                &r,
                "tandem_volume_snapshots",
                "Snapshots of each volume (pending and ready)",
                &["volume"],
            ),
            snapshot_bytes: gauge_vec(
                &r,
                "tandem_volume_snapshot_bytes",
                "Bytes the snapshot layers of each volume hold in this node's replica",
                &["volume"],
            ),
            resync_done: gauge_vec(
                &r,
                "tandem_replica_resync_done_bytes",
                "Resync progress of a replica",
                &["volume", "node"],
            ),
            resync_total: gauge_vec(
                &r,
                "tandem_replica_resync_total_bytes",
                "Bytes a resyncing replica must receive",
                &["volume", "node"],
            ),
            hot_regions: gauge_vec(
                &r,
                "tandem_volume_hot_regions",
                "Regions in the coordinator activity log",
                &["volume"],
            ),
            async_lag_bytes: gauge_vec(
                &r,
                "tandem_replica_async_lag_bytes",
                "Bytes of writes an async replica has not acked (queued, plus dirty regions once its queue stopped)",
                &["volume", "node"],
            ),
            async_lag_seconds: float_gauge_vec(&r, "tandem_replica_async_lag_seconds", "Age of the oldest write an async replica has not acked (its RPO)", &["volume", "node"]),
            peer_rtt: float_gauge_vec(&r, "tandem_peer_rtt_seconds", "Data-path round trip to a peer over the last minute", &["peer", "quantile"]),
            peer_rtt_samples: gauge_vec(
                &r,
                "tandem_peer_rtt_samples",
                "RTT samples in the window",
                &["peer"],
            ),
            raft_term: gauge(&r, "tandem_raft_term", "Raft term seen by this node"),
            raft_applied: gauge(
                &r,
                "tandem_raft_applied_index",
                "Raft index applied by this node",
            ),
            raft_leader: gauge(
                &r,
                "tandem_raft_is_leader",
                "1 when this node is the raft leader",
            ),
            class_ops: counter_by(&r, "tandem_class_ops_total", "Requests completed on this node's attached volumes, by I/O priority class", &["class"]),
            class_latency: histogram_by(
                &r,
                "tandem_class_latency_seconds",
                "Request latency by I/O priority class (waiting for a class slot included)",
                &["class"],
            ),
            class_admitted: counter_by(&r, "tandem_class_admitted_total", "I/Os admitted by a class gate (frontend: this node's attached volumes; replica: frames from other nodes)", &["class", "gate"]),
            class_waited: counter_by(&r, "tandem_class_waited_total", "I/Os that waited for a slot or for their class's pace", &["class", "gate"]),
            class_paced: counter_by(
                &r,
                "tandem_class_paced_total",
                "I/Os held to their class's share of the capacity while a higher class was busy",
                &["class", "gate"],
            ),
            class_capacity: float_gauge_vec(&r, "tandem_class_capacity_iops", "The capacity a class gate shares out by weight (measured, or --io-capacity-iops)", &["gate"]),
            class_wait_seconds: {
                let c = prometheus::CounterVec::new(
                    Opts::new(
                        "tandem_class_wait_seconds_total",
                        "Time I/Os spent waiting for a class slot",
                    ),
                    &["class", "gate"],
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            class_in_flight: gauge_vec(
                &r,
                "tandem_class_in_flight",
                "I/Os holding a class slot now",
                &["class", "gate"],
            ),
            registry: r,
        })
    }

    /// Records a peer's RTT window summary.
    pub fn set_peer_rtt(&self, peer: &str, p50_us: u64, p99_us: u64, samples: u32) {
        self.peer_rtt
            .with_label_values(&[peer, "0.5"])
            .set(p50_us as f64 / 1e6);
        self.peer_rtt
            .with_label_values(&[peer, "0.99"])
            .set(p99_us as f64 / 1e6);
        self.peer_rtt_samples
            .with_label_values(&[peer])
            .set(samples as i64);
    }

    pub fn volume(&self, name: &str) -> VolumeMetrics {
        let l = &[name];
        VolumeMetrics {
            read_ops: self.read_ops.with_label_values(l),
            write_ops: self.write_ops.with_label_values(l),
            flush_ops: self.flush_ops.with_label_values(l),
            zero_ops: self.zero_ops.with_label_values(l),
            read_bytes: self.read_bytes.with_label_values(l),
            write_bytes: self.write_bytes.with_label_values(l),
            read_latency: self.read_latency.with_label_values(l),
            write_latency: self.write_latency.with_label_values(l),
            flush_latency: self.flush_latency.with_label_values(l),
            checksum_errors: self.checksum_errors.with_label_values(l),
            io_errors: self.io_errors.with_label_values(l),
            class_ops: std::array::from_fn(|c| self.class_ops.with_label_values(&[CLASS_NAMES[c]])),
            class_latency: std::array::from_fn(|c| {
                self.class_latency.with_label_values(&[CLASS_NAMES[c]])
            }),
        }
    }

    /// Refreshes gauges from the engine and renders the text exposition format.
    pub async fn render(&self, volumes: &VolumeManager) -> String {
        self.pool_size.set(volumes.pool().size_bytes() as i64);
        self.pool_allocated
            .set(volumes.pool().allocated_bytes() as i64);
        if let Ok(list) = volumes.list().await {
            self.volumes.set(list.len() as i64);
        }
        let cluster = volumes.cluster();
        let st = cluster.status();
        self.raft_term.set(st.term as i64);
        self.raft_applied.set(st.applied as i64);
        self.raft_leader
            .set(i64::from(st.leader_id == volumes.node_id()));
        for (gate, sched) in [
            ("frontend", &**volumes.scheduler()),
            ("replica", volumes.replica_server().scheduler()),
        ] {
            self.class_capacity
                .with_label_values(&[gate])
                .set(sched.capacity_iops());
            for (c, s) in sched.stats().iter().enumerate() {
                let l = &[CLASS_NAMES[c], gate];
                raise(&self.class_paced.with_label_values(l), s.paced);
                raise(&self.class_admitted.with_label_values(l), s.admitted);
                raise(&self.class_waited.with_label_values(l), s.waited);
                let w = self.class_wait_seconds.with_label_values(l);
                let secs = s.wait_ns as f64 / 1e9;
                if secs > w.get() {
                    w.inc_by(secs - w.get());
                }
                self.class_in_flight
                    .with_label_values(l)
                    .set(s.in_flight as i64);
            }
        }
        let state = cluster.state();
        self.replicas.reset();
        for v in state.volumes.values() {
            for st in ["in-sync", "resyncing", "out-of-sync", "async"] {
                let n = v
                    .replicas
                    .iter()
                    .filter(|r| r.state.to_string() == st)
                    .count();
                self.replicas
                    .with_label_values(&[&v.name, st])
                    .set(n as i64);
            }
        }
        self.snapshots.reset();
        self.snapshot_bytes.reset();
        for v in state.volumes.values() {
            self.snapshots
                .with_label_values(&[&v.name])
                .set(v.snapshots.len() as i64);
            if let Ok(list) = volumes.list_snapshots(&v.name).await {
                let bytes: u64 = list.iter().filter_map(|s| s.local_bytes).sum();
                self.snapshot_bytes
                    .with_label_values(&[&v.name])
                    .set(bytes as i64);
            }
        }
        self.resync_done.reset();
        self.resync_total.reset();
        self.async_lag_bytes.reset();
        self.async_lag_seconds.reset();
        for name in volumes.attached_names() {
            let Ok(vol) = volumes.attached(&name) else {
                continue;
            };
            let Some(stats) = vol.stats() else { continue };
            raise(&self.ejections.with_label_values(&[&name]), stats.ejections);
            raise(
                &self.read_repairs.with_label_values(&[&name]),
                stats.read_repairs,
            );
            self.hot_regions
                .with_label_values(&[&name])
                .set(stats.hot_regions as i64);
            for r in &stats.replicas {
                let node = volumes.node_name(&state, r.node);
                self.resync_done
                    .with_label_values(&[&name, &node])
                    .set(r.resync_done_bytes as i64);
                self.resync_total
                    .with_label_values(&[&name, &node])
                    .set(r.resync_total_bytes as i64);
                if r.state == tandem_engine::cluster::ReplicaState::Async {
                    self.async_lag_bytes
                        .with_label_values(&[&name, &node])
                        .set(r.async_lag_bytes as i64);
                    self.async_lag_seconds
                        .with_label_values(&[&name, &node])
                        .set(r.async_lag_seconds);
                }
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `/metrics` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    volumes: Arc<VolumeManager>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            let volumes = volumes.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    metrics.render(&volumes).await,
                )
            }
        }),
    );
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "metrics server failed");
    }
}
