//! Round-trip measurement and the metro-sync latency gate.
//!
//! Every node pings every peer over the data path (wire Ping/Pong) and keeps a sliding
//! window of samples per peer ([`PeerWindow`]). Nodes publish a summary (p50, p99, sample
//! count) to the cluster metadata every few seconds, so any node can evaluate the gate with
//! the whole cluster's view: a domain pair's RTT is the median over its node pairs of the
//! per-pair p50 (and p99), taking each direction a node measured as one sample
//! ([`domain_pair_rtt`]).
//!
//! The gate ([`check_sync`]) refuses to enter synchronous replication across two domains
//! whose measured RTT is above the limit, or that have no fresh samples at all.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::cluster::{ClusterState, ReplicaState, VolumeRecord};

/// Samples kept per peer: one per second for half a minute, so a lasting change of RTT
/// shows in the p50 within about 15 s while one slow ping does not.
pub const WINDOW_SAMPLES: usize = 30;
/// How often a node pings each peer.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// How often a node publishes its summary to the metadata.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(3);
/// Published summaries older than this count as "no samples" (a node that stopped
/// reporting must not keep a pair open on old numbers).
pub const REPORT_MAX_AGE_SECONDS: u64 = 30;
/// The default sync limit (`--sync-max-rtt`): Portworx's documented metro requirement.
pub const DEFAULT_SYNC_MAX_RTT: Duration = Duration::from_millis(10);

/// A sliding window of RTT samples for one peer.
#[derive(Debug, Default, Clone)]
pub struct PeerWindow {
    samples_us: VecDeque<u64>,
}

/// Summary statistics of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RttStats {
    pub p50_us: u64,
    pub p99_us: u64,
    pub samples: u32,
}

impl PeerWindow {
    pub fn record(&mut self, rtt: Duration) {
        if self.samples_us.len() == WINDOW_SAMPLES {
            self.samples_us.pop_front();
        }
        self.samples_us.push_back(rtt.as_micros() as u64);
    }

    pub fn stats(&self) -> Option<RttStats> {
        if self.samples_us.is_empty() {
            return None;
        }
        let mut v: Vec<u64> = self.samples_us.iter().copied().collect();
        v.sort_unstable();
        Some(RttStats {
            p50_us: percentile(&v, 50.0),
            p99_us: percentile(&v, 99.0),
            samples: v.len() as u32,
        })
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

/// RTT between two domains, from the published node-pair measurements.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PairRtt {
    pub p50_us: u64,
    pub p99_us: u64,
    /// Node-pair measurements that went into the median.
    pub pairs: u32,
    pub samples: u32,
}

/// Median over the node pairs of two domains (each direction a node measured counts once),
/// using only reports fresher than [`REPORT_MAX_AGE_SECONDS`] at `now_unix`.
pub fn domain_pair_rtt(state: &ClusterState, a: &str, b: &str, now_unix: u64) -> Option<PairRtt> {
    let domain = |id: &u64| state.nodes.get(id).map(|n| n.domain.as_str());
    let (mut p50s, mut p99s, mut samples) = (Vec::new(), Vec::new(), 0u32);
    for (from, report) in &state.latency {
        if now_unix.saturating_sub(report.unix_seconds) > REPORT_MAX_AGE_SECONDS {
            continue;
        }
        let Some(df) = domain(from) else { continue };
        for (to, st) in &report.peers {
            let Some(dt) = domain(to) else { continue };
            if st.samples == 0 {
                continue;
            }
            if (df == a && dt == b) || (df == b && dt == a) {
                p50s.push(st.p50_us);
                p99s.push(st.p99_us);
                samples += st.samples;
            }
        }
    }
    if p50s.is_empty() {
        return None;
    }
    Some(PairRtt {
        pairs: p50s.len() as u32,
        p50_us: median(p50s),
        p99_us: median(p99s),
        samples,
    })
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// The gate: may a replica set spanning `domains` replicate synchronously? Every pair of
/// distinct domains must have fresh samples with a p50 at most `limit`. The error names the
/// pair, the measured p50 and p99 and the limit.
pub fn check_sync(
    state: &ClusterState,
    domains: &BTreeSet<String>,
    limit: Duration,
    now_unix: u64,
) -> Result<(), String> {
    let ds: Vec<&String> = domains.iter().collect();
    for i in 0..ds.len() {
        for j in i + 1..ds.len() {
            let (a, b) = (ds[i], ds[j]);
            match domain_pair_rtt(state, a, b, now_unix) {
                None => {
                    return Err(format!(
                        "metro sync between domains {a} and {b} refused: no RTT samples between them yet (limit {}, --sync-max-rtt); retry once the nodes have measured each other, or keep the volume in one domain with --domains",
                        ms(limit.as_micros() as u64)
                    ))
                }
                Some(r) if r.p50_us > limit.as_micros() as u64 => {
                    return Err(format!(
                        "metro sync between domains {a} and {b} refused: measured RTT p50 {} p99 {} ({} samples) is above the {} limit (--sync-max-rtt)",
                        ms(r.p50_us),
                        ms(r.p99_us),
                        r.samples,
                        ms(limit.as_micros() as u64)
                    ))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Policy `degrade`, for one replica: the mode a replica in a far domain should be
/// committed to, given its domain pair's RTT. Async above the limit; back to `Resyncing`
/// (the coordinator resyncs its dirty regions, then commits it in sync) only below 90% of
/// it, so a pair that hovers at the limit does not flap between resyncs. `None`: stay.
pub fn degrade_target(state: ReplicaState, p50_us: u64, limit_us: u64) -> Option<ReplicaState> {
    match state {
        ReplicaState::InSync if p50_us > limit_us => Some(ReplicaState::Async),
        ReplicaState::Async if p50_us < limit_us / 10 * 9 => Some(ReplicaState::Resyncing),
        _ => None,
    }
}

/// A mode change that policy `degrade` calls for (see [`degrade_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DegradeChange {
    pub node: u64,
    pub domain: String,
    pub to: ReplicaState,
    pub p50_us: u64,
}

/// Policy `degrade` for one volume whose coordinator runs on `me`: every replica outside
/// `me`'s domain whose pair RTT calls for a mode change ([`degrade_target`]). Replicas in
/// the volume's async domains stay async whatever the RTT; a pair with no fresh samples
/// gets no decision either way. Empty when the volume is not attached on `me`.
pub fn degrade_changes(
    state: &ClusterState,
    v: &VolumeRecord,
    me: u64,
    limit_us: u64,
    now_unix: u64,
) -> Vec<DegradeChange> {
    if v.attached_node != Some(me) {
        return Vec::new();
    }
    let Some(mine) = state.nodes.get(&me).map(|n| n.domain.as_str()) else {
        return Vec::new();
    };
    v.replicas
        .iter()
        .filter(|r| !state.async_pinned(v, r.node))
        .filter_map(|r| {
            let domain = state.nodes.get(&r.node)?.domain.as_str();
            if domain == mine {
                return None;
            }
            let rtt = domain_pair_rtt(state, mine, domain, now_unix)?;
            let to = degrade_target(r.state, rtt.p50_us, limit_us)?;
            Some(DegradeChange {
                node: r.node,
                domain: domain.to_string(),
                to,
                p50_us: rtt.p50_us,
            })
        })
        .collect()
}

/// The domain pairs the latency gate watches for a volume: those of its synchronous
/// replicas (replicas in its async domains are never gated), each pair once, in order.
pub fn gated_pairs(state: &ClusterState, v: &VolumeRecord) -> Vec<(String, String)> {
    let domains: BTreeSet<&str> = v
        .replicas
        .iter()
        .filter(|r| !state.async_pinned(v, r.node))
        .filter_map(|r| state.nodes.get(&r.node).map(|n| n.domain.as_str()))
        .collect();
    let ds: Vec<&str> = domains.into_iter().collect();
    let mut pairs = Vec::new();
    for i in 0..ds.len() {
        for j in i + 1..ds.len() {
            pairs.push((ds[i].to_string(), ds[j].to_string()));
        }
    }
    pairs
}

/// Node-pair matrix from the published reports: (from, to) -> stats.
pub fn node_matrix(state: &ClusterState) -> BTreeMap<(u64, u64), RttStats> {
    let mut m = BTreeMap::new();
    for (from, r) in &state.latency {
        for (to, st) in &r.peers {
            m.insert((*from, *to), *st);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{LatencyReport, NodeRecord, NodeRole};

    fn node(id: u64, domain: &str) -> NodeRecord {
        NodeRecord {
            id,
            name: format!("n{id}"),
            admin_addr: String::new(),
            data_addr: String::new(),
            domain: domain.into(),
            zone: "z".into(),
            rack: "r".into(),
            role: NodeRole::Voter,
            pool_size_bytes: 0,
            joined_unix_seconds: 0,
            instance: String::new(),
        }
    }

    fn report(at: u64, peers: &[(u64, u64)]) -> LatencyReport {
        LatencyReport {
            unix_seconds: at,
            peers: peers
                .iter()
                .map(|&(p, us)| {
                    (
                        p,
                        RttStats {
                            p50_us: us,
                            p99_us: us + 500,
                            samples: 10,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn degrade_has_hysteresis() {
        let (lim, ins, asy) = (10_000, ReplicaState::InSync, ReplicaState::Async);
        assert_eq!(degrade_target(ins, 10_001, lim), Some(asy));
        assert_eq!(
            degrade_target(ins, 10_000, lim),
            None,
            "at the limit: stays"
        );
        // Between 90% and the limit an async replica stays async: no flapping.
        assert_eq!(degrade_target(asy, 9_500, lim), None);
        assert_eq!(degrade_target(asy, 9_000, lim), None);
        assert_eq!(
            degrade_target(asy, 8_999, lim),
            Some(ReplicaState::Resyncing)
        );
        // Other states are the coordinator's business.
        assert_eq!(degrade_target(ReplicaState::OutOfSync, 50_000, lim), None);
        assert_eq!(degrade_target(ReplicaState::Resyncing, 50_000, lim), None);
    }

    #[test]
    fn degrade_changes_only_far_unpinned_replicas_of_a_volume_attached_here() {
        use crate::cluster::ReplicaRecord;
        let mut s = ClusterState::new("c");
        for (id, d) in [(1, "east"), (2, "east"), (3, "west"), (4, "dr")] {
            s.nodes.insert(id, node(id, d));
        }
        s.latency
            .insert(1, report(100, &[(2, 100), (3, 20_000), (4, 50_000)]));
        let rep = |node, state| ReplicaRecord {
            node,
            state,
            generation: 0,
            resync_done_bytes: 0,
            resync_total_bytes: 0,
        };
        let v = VolumeRecord {
            id: String::new(),
            name: "v".into(),
            size_bytes: 1 << 20,
            repl: 4,
            io_priority: crate::meta::IoPriority::Medium,
            labels: BTreeMap::new(),
            created_unix_seconds: 0,
            generation: 1,
            attached_node: Some(1),
            replicas: vec![
                rep(1, ReplicaState::InSync),
                rep(2, ReplicaState::InSync),
                rep(3, ReplicaState::InSync),
                rep(4, ReplicaState::Async),
            ],
            hot_regions: BTreeSet::new(),
            parked: Vec::new(),
            lease_wait: false,
            async_domains: ["dr".to_string()].into(),
            snapshots: Vec::new(),
            next_snapshot_seq: 0,
        };
        let changes = degrade_changes(&s, &v, 1, 10_000, 100);
        assert_eq!(
            changes,
            vec![DegradeChange {
                node: 3,
                domain: "west".into(),
                to: ReplicaState::Async,
                p50_us: 20_000
            }],
            "the same-domain replica and the pinned async one are left alone"
        );
        assert!(
            degrade_changes(&s, &v, 2, 10_000, 100).is_empty(),
            "not attached on 2"
        );
        // Stale samples: no decision.
        assert!(degrade_changes(&s, &v, 1, 10_000, 100 + REPORT_MAX_AGE_SECONDS + 1).is_empty());
        assert_eq!(
            gated_pairs(&s, &v),
            vec![("east".to_string(), "west".to_string())]
        );
    }

    #[test]
    fn window_percentiles() {
        let mut w = PeerWindow::default();
        assert_eq!(w.stats(), None);
        for i in 1..=100u64 {
            w.record(Duration::from_micros(i * 10));
        }
        let s = w.stats().unwrap();
        assert_eq!(s.samples, WINDOW_SAMPLES as u32);
        // The window holds samples 71..=100.
        assert_eq!(s.p50_us, 850);
        assert_eq!(s.p99_us, 1000);
    }

    #[test]
    fn gate_uses_the_median_of_fresh_node_pairs_and_names_the_pair() {
        let mut s = ClusterState::new("c");
        for (id, d) in [(1, "east"), (2, "east"), (3, "west")] {
            s.nodes.insert(id, node(id, d));
        }
        let domains: BTreeSet<String> = ["east".to_string(), "west".to_string()].into();
        let limit = Duration::from_millis(10);
        let err = check_sync(&s, &domains, limit, 100).unwrap_err();
        assert!(err.contains("no RTT samples"), "{err}");
        s.latency.insert(1, report(100, &[(2, 100), (3, 2_000)]));
        s.latency.insert(2, report(100, &[(1, 100), (3, 2_200)]));
        s.latency.insert(3, report(100, &[(1, 1_900), (2, 40_000)]));
        // Median of 2000, 2200, 1900, 40000 = 2100 us.
        let r = domain_pair_rtt(&s, "east", "west", 100).unwrap();
        assert_eq!((r.p50_us, r.pairs), (2_100, 4));
        check_sync(&s, &domains, limit, 100).unwrap();
        let err = check_sync(&s, &domains, Duration::from_millis(2), 100).unwrap_err();
        assert!(
            err.contains("east and west")
                && err.contains("p50 2.1 ms")
                && err.contains("2.0 ms limit"),
            "{err}"
        );
        // Stale reports count as no samples.
        assert!(check_sync(&s, &domains, limit, 100 + REPORT_MAX_AGE_SECONDS + 1).is_err());
        // One domain is never gated.
        let one: BTreeSet<String> = ["east".to_string()].into();
        check_sync(&s, &one, Duration::from_micros(1), 100_000).unwrap();
    }
}
