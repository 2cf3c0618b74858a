//! The admin gRPC API (`tandem.v1`): what `tandemctl` talks to.
//!
//! Engine errors map to gRPC statuses in one place, [`status`]. The server starts before
//! the node has joined its cluster (peers must reach it); until the volumes are open, every
//! admin call answers UNAVAILABLE.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tonic::{Request, Response, Status};

use tandem_engine::cluster::{ClusterState, NodeRole, ReplicaState, VolumeRecord};
use tandem_engine::meta::IoPriority;
use tandem_engine::placement::provisioned_by_node;
use tandem_engine::volume::{CreateSpec, UpdateSpec, VolumeError, VolumeInfo, VolumeManager};
use tandem_proto::admin as pb;
use tandem_proto::admin::cluster_service_server::ClusterService;
use tandem_proto::admin::node_service_server::NodeService;
use tandem_proto::admin::volume_service_server::VolumeService;

/// Addresses and settings the API reports.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub data_dir: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub metrics_addr: String,
    pub data_addr: String,
    pub started: Instant,
    pub token: String,
}

pub struct AdminApi {
    volumes: OnceLock<Arc<VolumeManager>>,
    info: NodeInfo,
}

impl AdminApi {
    pub fn new(info: NodeInfo) -> AdminApi {
        AdminApi {
            volumes: OnceLock::new(),
            info,
        }
    }

    pub fn bind(&self, volumes: Arc<VolumeManager>) {
        let _ = self.volumes.set(volumes);
    }

    fn vm(&self) -> Result<&Arc<VolumeManager>, Status> {
        self.volumes
            .get()
            .ok_or_else(|| Status::unavailable("tandemd is starting; retry in a moment"))
    }

    fn nbd_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.info.nbd_addr)
    }

    /// What every other replica node of `v` reports its replica holds, asked in parallel,
    /// each within `peer::USAGE_TIMEOUT`. A node that does not answer is left out (its
    /// replica's allocation shows as unknown) and logged.
    async fn remote_usage(
        &self,
        vm: &VolumeManager,
        state: &ClusterState,
        v: &VolumeRecord,
    ) -> RemoteUsage {
        let token = self.info.token.as_bytes();
        let asks = v
            .replicas
            .iter()
            .filter(|rep| rep.node != vm.node_id())
            .filter_map(|rep| Some((rep.node, state.nodes.get(&rep.node)?.admin_addr.clone())))
            .map(|(node, addr)| async move {
                let got =
                    crate::peer::replica_usage(&addr, token, vm.node_id(), vec![v.id.clone()])
                        .await;
                (node, got)
            });
        let mut out = RemoteUsage::new();
        for (node, got) in futures_util::future::join_all(asks).await {
            match got {
                Ok(m) => {
                    out.insert(node, m);
                }
                Err(e) => {
                    tracing::info!(volume = %v.name, node, error = %e, "replica node did not report its allocation")
                }
            }
        }
        out
    }

    fn to_pb(&self, vm: &VolumeManager, state: &ClusterState, v: &VolumeInfo) -> pb::Volume {
        self.to_pb_with(vm, state, v, &RemoteUsage::new())
    }

    fn to_pb_with(
        &self,
        vm: &VolumeManager,
        state: &ClusterState,
        v: &VolumeInfo,
        remote: &RemoteUsage,
    ) -> pb::Volume {
        let r = &v.record;
        let attached_here = r.attached_node == Some(vm.node_id());
        pb::Volume {
            id: r.id.clone(),
            name: r.name.clone(),
            size_bytes: r.size_bytes,
            repl: r.repl,
            io_priority: prio_to_pb(r.io_priority) as i32,
            labels: r.labels.clone().into_iter().collect(),
            generation: r.generation,
            nbd_uri: if attached_here {
                self.nbd_uri(&r.name)
            } else {
                String::new()
            },
            attached_node: r
                .attached_node
                .map(|n| vm.node_name(state, n))
                .unwrap_or_default(),
            // This node's replica; on a node without one, the largest any replica reported.
            allocated_bytes: if r.replica(vm.node_id()).is_some() {
                v.allocated_bytes
            } else {
                remote
                    .values()
                    .filter_map(|m| m.get(&r.id).copied())
                    .max()
                    .unwrap_or(0)
            },
            created_unix_seconds: r.created_unix_seconds,
            replicas: replicas_pb(vm, state, r, v, remote),
            async_domains: r.async_domains.iter().cloned().collect(),
            state: if r.attached_node.is_some() {
                "attached".into()
            } else {
                "detached".into()
            },
        }
    }
}

/// Node id -> (volume id -> allocated bytes), as other nodes reported them.
type RemoteUsage = std::collections::HashMap<u64, std::collections::HashMap<String, u64>>;

fn replicas_pb(
    vm: &VolumeManager,
    state: &ClusterState,
    r: &VolumeRecord,
    v: &VolumeInfo,
    remote: &RemoteUsage,
) -> Vec<pb::Replica> {
    let stats = if r.attached_node == Some(vm.node_id()) {
        vm.attached(&r.name).ok().and_then(|a| a.stats())
    } else {
        None
    };
    r.replicas
        .iter()
        .map(|rep| {
            let lag = stats
                .as_ref()
                .and_then(|s| s.replicas.iter().find(|x| x.node == rep.node))
                .filter(|x| x.state == ReplicaState::Async)
                .map(|x| (x.async_lag_bytes, x.async_lag_seconds))
                .unwrap_or((0, 0.0));
            let mut s = rep.state.to_string();
            if rep.resync_total_bytes > 0 {
                s = format!(
                    "{s} ({}%)",
                    rep.resync_done_bytes * 100 / rep.resync_total_bytes.max(1)
                );
            }
            let node = state.nodes.get(&rep.node);
            let field = |f: fn(&tandem_engine::cluster::NodeRecord) -> &String| {
                node.map(|n| f(n).clone()).unwrap_or_default()
            };
            pb::Replica {
                node_id: vm.node_name(state, rep.node),
                state: s,
                allocated_bytes: if rep.node == vm.node_id() {
                    Some(v.allocated_bytes)
                } else {
                    remote.get(&rep.node).and_then(|m| m.get(&r.id)).copied()
                },
                domain: field(|n| &n.domain),
                zone: field(|n| &n.zone),
                rack: field(|n| &n.rack),
                resync_done_bytes: rep.resync_done_bytes,
                resync_total_bytes: rep.resync_total_bytes,
                generation: rep.generation,
                async_lag_bytes: lag.0,
                async_lag_seconds: lag.1,
            }
        })
        .collect()
}

/// Takes a snapshot where the cut is made: on this node when the volume is attached here
/// (or detached), else through the attach node's admin API. For `CreateSnapshot` of the
/// admin API and of CSI alike.
pub async fn create_snapshot_anywhere(
    vm: &VolumeManager,
    r: pb::CreateSnapshotRequest,
) -> Result<pb::Snapshot, Status> {
    let state = vm.cluster().state();
    let elsewhere = state
        .volumes
        .get(&r.volume)
        .and_then(|v| v.attached_node)
        .filter(|&n| n != vm.node_id())
        .and_then(|n| Some((n, state.nodes.get(&n)?.admin_addr.clone())));
    if let Some((node, addr)) = elsewhere {
        let name = vm.node_name(&state, node);
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(format!("bad admin address of node {name}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "volume '{}' is attached on node {name}, which cannot be reached to take the snapshot: {e}",
                    r.volume
                ))
            })?;
        return tandem_proto::admin::volume_service_client::VolumeServiceClient::new(ch)
            .create_snapshot(r)
            .await?
            .into_inner()
            .snapshot
            .ok_or_else(|| Status::internal(format!("node {name} returned no snapshot")));
    }
    let s = vm
        .create_snapshot(&r.volume, &r.name, r.labels.into_iter().collect())
        .await
        .map_err(status)?;
    Ok(snapshot_pb(vm, &vm.cluster().state(), &s))
}

fn snapshot_pb(
    vm: &VolumeManager,
    state: &ClusterState,
    s: &tandem_engine::volume::SnapshotInfo,
) -> pb::Snapshot {
    let r = &s.record;
    pb::Snapshot {
        id: r.id.clone(),
        name: r.name.clone(),
        volume: s.volume.clone(),
        size_bytes: r.size_bytes,
        created_unix_seconds: r.created_unix_seconds,
        labels: r.labels.clone().into_iter().collect(),
        state: r.state.to_string(),
        nodes: r.nodes.iter().map(|n| vm.node_name(state, *n)).collect(),
        local_bytes: s.local_bytes,
        pause_seconds: s.pause.map(|p| p.as_secs_f64()),
    }
}

fn prio_to_pb(p: IoPriority) -> pb::IoPriority {
    match p {
        IoPriority::Low => pb::IoPriority::Low,
        IoPriority::Medium => pb::IoPriority::Medium,
        IoPriority::High => pb::IoPriority::High,
    }
}

fn prio_from_pb(v: i32) -> Result<Option<IoPriority>, Status> {
    match pb::IoPriority::try_from(v) {
        Ok(pb::IoPriority::Unspecified) => Ok(None),
        Ok(pb::IoPriority::Low) => Ok(Some(IoPriority::Low)),
        Ok(pb::IoPriority::Medium) => Ok(Some(IoPriority::Medium)),
        Ok(pb::IoPriority::High) => Ok(Some(IoPriority::High)),
        Err(_) => Err(Status::invalid_argument(format!(
            "invalid I/O priority value {v}"
        ))),
    }
}

/// The single mapping from engine errors to gRPC statuses.
pub fn status(e: VolumeError) -> Status {
    use tandem_engine::store::StoreError;
    match &e {
        VolumeError::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
        VolumeError::NotFound(_) | VolumeError::SnapshotNotFound { .. } => {
            Status::not_found(e.to_string())
        }
        VolumeError::AlreadyExists(_) | VolumeError::SnapshotExists { .. } => {
            Status::already_exists(e.to_string())
        }
        VolumeError::FailedPrecondition(_)
        | VolumeError::ReadOnly(_)
        | VolumeError::NoPlacement(_)
        | VolumeError::NotAttached(_) => Status::failed_precondition(e.to_string()),
        VolumeError::Unavailable(_) => Status::unavailable(e.to_string()),
        VolumeError::Store(StoreError::PoolFull { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        VolumeError::Store(StoreError::Shrink { .. }) => Status::failed_precondition(e.to_string()),
        VolumeError::Replication(r) => match r {
            tandem_engine::replication::ReplicationError::Fenced { .. } => {
                Status::failed_precondition(e.to_string())
            }
            tandem_engine::replication::ReplicationError::NoSpace { .. } => {
                Status::resource_exhausted(e.to_string())
            }
            _ => Status::unavailable(e.to_string()),
        },
        VolumeError::Store(_) => {
            tracing::error!(error = %e, "admin request failed");
            Status::internal(e.to_string())
        }
    }
}

#[tonic::async_trait]
impl NodeService for AdminApi {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let vm = self.vm()?;
        let vols = vm.list().await.map_err(status)?;
        let state = vm.cluster().state();
        let pool = vm.pool();
        Ok(Response::new(pb::StatusResponse {
            node_id: vm.node_name(&state, vm.node_id()),
            cluster_id: state.cluster_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            status: "online".into(),
            io_engine: pool.engine().name().into(),
            data_dir: self.info.data_dir.clone(),
            pool_size_bytes: pool.size_bytes(),
            pool_allocated_bytes: pool.allocated_bytes(),
            pool_provisioned_bytes: provisioned_by_node(&state)
                .get(&vm.node_id())
                .copied()
                .unwrap_or(0),
            volume_count: vols.len() as u32,
            attached_count: vm.attached_names().len() as u32,
            admin_addr: self.info.admin_addr.clone(),
            nbd_addr: self.info.nbd_addr.clone(),
            metrics_addr: self.info.metrics_addr.clone(),
            uptime_seconds: self.info.started.elapsed().as_secs(),
        }))
    }
}

#[tonic::async_trait]
impl VolumeService for AdminApi {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::VolumeResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        let spec = CreateSpec {
            name: r.name,
            size_bytes: r.size_bytes,
            repl: r.repl,
            io_priority: prio_from_pb(r.io_priority)?.unwrap_or_default(),
            labels: r.labels.into_iter().collect(),
            nodes: r.nodes,
            zones: r.zones,
            domains: r.domains,
            preferred_nodes: Vec::new(),
            require_preferred: false,
            async_domains: r.async_domains,
        };
        let v = vm.create(spec).await.map_err(status)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb(vm, &vm.cluster().state(), &v)),
        }))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let vm = self.vm()?;
        let vols = vm.list().await.map_err(status)?;
        let state = vm.cluster().state();
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: vols.iter().map(|v| self.to_pb(vm, &state, v)).collect(),
        }))
    }

    async fn inspect_volume(
        &self,
        req: Request<pb::InspectVolumeRequest>,
    ) -> Result<Response<pb::VolumeResponse>, Status> {
        let vm = self.vm()?;
        let v = vm.inspect(&req.into_inner().name).await.map_err(status)?;
        let state = vm.cluster().state();
        let remote = self.remote_usage(vm, &state, &v.record).await;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb_with(vm, &state, &v, &remote)),
        }))
    }

    async fn update_volume(
        &self,
        req: Request<pb::UpdateVolumeRequest>,
    ) -> Result<Response<pb::VolumeResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        let spec = UpdateSpec {
            size_bytes: (r.size_bytes != 0).then_some(r.size_bytes),
            repl: (r.repl != 0).then_some(r.repl),
            io_priority: prio_from_pb(r.io_priority)?,
        };
        let v = vm.update(&r.name, spec).await.map_err(status)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb(vm, &vm.cluster().state(), &v)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        vm.delete(&r.name, r.force).await.map_err(status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::AttachVolumeResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        vm.attach(&r.name, r.force).await.map_err(status)?;
        let v = vm.inspect(&r.name).await.map_err(status)?;
        Ok(Response::new(pb::AttachVolumeResponse {
            volume: Some(self.to_pb(vm, &vm.cluster().state(), &v)),
            nbd_uri: self.nbd_uri(&r.name),
        }))
    }

    async fn verify_volume(
        &self,
        req: Request<pb::VerifyVolumeRequest>,
    ) -> Result<Response<pb::VerifyVolumeResponse>, Status> {
        let vm = self.vm()?;
        let req = req.into_inner();
        let r = vm.verify(&req.name, req.repair).await.map_err(status)?;
        let state = vm.cluster().state();
        let name = |n: &u64| vm.node_name(&state, *n);
        Ok(Response::new(pb::VerifyVolumeResponse {
            blocks_compared: r.blocks_compared,
            in_sync_nodes: r.in_sync_nodes.iter().map(name).collect(),
            resyncing_nodes: r.resyncing_nodes.iter().map(name).collect(),
            mismatched_blocks: r.mismatched_blocks,
            mismatches: r
                .mismatches
                .iter()
                .map(|m| {
                    let crcs: Vec<String> = m
                        .digests
                        .iter()
                        .map(|(n, c)| format!("{}={c:016x}", name(n)))
                        .collect();
                    format!(
                        "block {} (offset {}): {}",
                        m.block,
                        m.offset_bytes,
                        crcs.join(", ")
                    )
                })
                .collect(),
            resyncing_mismatched_blocks: r.resyncing_mismatched_blocks,
            errors: r
                .errors
                .iter()
                .map(|(n, e)| format!("{}: {e}", name(n)))
                .collect(),
            repaired_blocks: r.repaired_blocks,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let vm = self.vm()?;
        let snapshot = create_snapshot_anywhere(vm, req.into_inner()).await?;
        Ok(Response::new(pb::SnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        let state = vm.cluster().state();
        let volumes: Vec<String> = if r.volume.is_empty() {
            state.volumes.keys().cloned().collect()
        } else {
            vec![r.volume]
        };
        let mut snapshots = Vec::new();
        for v in volumes {
            for s in vm.list_snapshots(&v).await.map_err(status)? {
                snapshots.push(snapshot_pb(vm, &state, &s));
            }
        }
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn inspect_snapshot(
        &self,
        req: Request<pb::InspectSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        let s = vm
            .inspect_snapshot(&r.volume, &r.name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SnapshotResponse {
            snapshot: Some(snapshot_pb(vm, &vm.cluster().state(), &s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        let rec = vm
            .delete_snapshot(&r.volume, &r.name)
            .await
            .map_err(status)?;
        let s = tandem_engine::volume::SnapshotInfo {
            volume: r.volume,
            record: rec,
            local_bytes: None,
            pause: None,
        };
        Ok(Response::new(pb::SnapshotResponse {
            snapshot: Some(snapshot_pb(vm, &vm.cluster().state(), &s)),
        }))
    }

    async fn detach_volume(
        &self,
        req: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::VolumeResponse>, Status> {
        let vm = self.vm()?;
        let v = vm.detach(&req.into_inner().name).await.map_err(status)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb(vm, &vm.cluster().state(), &v)),
        }))
    }
}

fn domains_pb(vm: &VolumeManager) -> pb::ListDomainsResponse {
    let state = vm.cluster().state();
    let names: std::collections::BTreeSet<String> =
        state.nodes.values().map(|n| n.domain.clone()).collect();
    let domains = names
        .into_iter()
        .map(|d| {
            let in_d = |id: &u64| state.nodes.get(id).is_some_and(|n| n.domain == d);
            let volumes = state
                .volumes
                .values()
                .filter(|v| v.replicas.iter().any(|r| in_d(&r.node)) || v.parked.iter().any(in_d))
                .map(|v| {
                    let reps: Vec<ReplicaState> = v
                        .replicas
                        .iter()
                        .filter(|r| in_d(&r.node))
                        .map(|r| r.state)
                        .collect();
                    let parked = v.parked.iter().any(in_d);
                    let status = if !parked && reps.iter().all(|s| *s == ReplicaState::InSync) {
                        "InSync"
                    } else if reps.contains(&ReplicaState::Resyncing) {
                        "Resyncing"
                    } else if !parked && reps.iter().all(|s| *s == ReplicaState::Async) {
                        "Async"
                    } else {
                        "NotInSync"
                    };
                    pb::DomainVolume {
                        volume: v.name.clone(),
                        status: status.into(),
                    }
                })
                .collect();
            pb::DomainInfo {
                active: !state.inactive_domains.contains(&d),
                nodes: state
                    .nodes
                    .values()
                    .filter(|n| n.domain == d)
                    .map(|n| n.name.clone())
                    .collect(),
                volumes,
                name: d,
            }
        })
        .collect();
    pb::ListDomainsResponse {
        domains,
        unavailable_volumes: Vec::new(),
    }
}

/// The role a node plays now: a witness, or a storage node that raft has as a voter or a
/// learner (pinned by `--kvdb`, or placed by topology).
fn role_name(r: NodeRole, raft_voter: bool) -> &'static str {
    match r {
        NodeRole::Witness => "witness",
        _ if raft_voter => "voter",
        _ => "learner",
    }
}

impl AdminApi {
    fn nodes_pb(&self, vm: &VolumeManager) -> Vec<pb::NodeInfo> {
        let cluster = vm.cluster();
        let state = cluster.state();
        let status = cluster.status();
        let provisioned = provisioned_by_node(&state);
        state
            .nodes
            .values()
            .map(|n| {
                let health = if n.id == vm.node_id() {
                    "online".to_string()
                } else {
                    match cluster.raft().peer_activity(n.id) {
                        Some(true) => "online".into(),
                        Some(false) => "unreachable".into(),
                        None => "unknown".into(),
                    }
                };
                pb::NodeInfo {
                    id: n.id,
                    name: n.name.clone(),
                    role: role_name(n.role, status.voters.contains(&n.id)).into(),
                    admin_addr: n.admin_addr.clone(),
                    data_addr: n.data_addr.clone(),
                    domain: n.domain.clone(),
                    zone: n.zone.clone(),
                    rack: n.rack.clone(),
                    pool_size_bytes: n.pool_size_bytes,
                    provisioned_bytes: provisioned.get(&n.id).copied().unwrap_or(0),
                    health,
                    is_leader: status.leader_id == n.id,
                    raft_voter: status.voters.contains(&n.id),
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl ClusterService for AdminApi {
    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let vm = self.vm()?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: self.nodes_pb(vm),
        }))
    }

    async fn inspect_cluster(
        &self,
        _req: Request<pb::InspectClusterRequest>,
    ) -> Result<Response<pb::InspectClusterResponse>, Status> {
        let vm = self.vm()?;
        let cluster = vm.cluster();
        let st = cluster.status();
        let state = cluster.state();
        Ok(Response::new(pb::InspectClusterResponse {
            cluster_id: state.cluster_id.clone(),
            leader_id: st.leader_id,
            term: st.term,
            commit_index: st.commit,
            applied_index: st.applied,
            local_node_id: vm.node_id(),
            voters: st.voters.clone(),
            learners: st.learners.clone(),
            nodes: self.nodes_pb(vm),
            volume_count: state.volumes.len() as u32,
            warnings: tandem_engine::cluster::membership::majority_domain(&state.nodes, &st.voters)
                .map(|(d, here, total)| {
                    format!(
                        "domain '{d}' holds {here} of the {total} raft voters: losing it loses the raft majority (add voters elsewhere with --kvdb, or a --witness in a third domain)"
                    )
                })
                .into_iter()
                .collect(),
        }))
    }

    async fn show_token(
        &self,
        _req: Request<pb::ShowTokenRequest>,
    ) -> Result<Response<pb::ShowTokenResponse>, Status> {
        let vm = self.vm()?;
        Ok(Response::new(pb::ShowTokenResponse {
            cluster_id: vm.cluster().state().cluster_id.clone(),
            token: self.info.token.clone(),
        }))
    }

    async fn latency(
        &self,
        _req: Request<pb::LatencyRequest>,
    ) -> Result<Response<pb::LatencyResponse>, Status> {
        let vm = self.vm()?;
        let state = vm.cluster().state();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let name = |id: &u64| vm.node_name(&state, *id);
        let mut nodes = Vec::new();
        for ((from, to), st) in tandem_engine::latency::node_matrix(&state) {
            let age = state
                .latency
                .get(&from)
                .map(|r| now.saturating_sub(r.unix_seconds))
                .unwrap_or(0);
            nodes.push(pb::RttPair {
                from: name(&from),
                to: name(&to),
                p50_us: st.p50_us,
                p99_us: st.p99_us,
                samples: st.samples,
                age_seconds: age,
                pairs: 1,
                sync_allowed: false,
            });
        }
        let domains: Vec<String> = state
            .nodes
            .values()
            .filter(|n| n.role != tandem_engine::cluster::NodeRole::Witness)
            .map(|n| n.domain.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let limit = vm.sync_max_rtt();
        let mut dpairs = Vec::new();
        for i in 0..domains.len() {
            for j in i + 1..domains.len() {
                let (a, b) = (&domains[i], &domains[j]);
                let r = tandem_engine::latency::domain_pair_rtt(&state, a, b, now);
                let set: std::collections::BTreeSet<String> = [a.clone(), b.clone()].into();
                let allowed = tandem_engine::latency::check_sync(&state, &set, limit, now).is_ok();
                dpairs.push(pb::RttPair {
                    from: a.clone(),
                    to: b.clone(),
                    p50_us: r.as_ref().map_or(0, |r| r.p50_us),
                    p99_us: r.as_ref().map_or(0, |r| r.p99_us),
                    samples: r.as_ref().map_or(0, |r| r.samples),
                    age_seconds: 0,
                    pairs: r.as_ref().map_or(0, |r| r.pairs),
                    sync_allowed: allowed,
                });
            }
        }
        Ok(Response::new(pb::LatencyResponse {
            nodes,
            domains: dpairs,
            sync_max_rtt_us: limit.as_micros() as u64,
        }))
    }

    async fn list_domains(
        &self,
        _req: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        let vm = self.vm()?;
        Ok(Response::new(domains_pb(vm)))
    }

    async fn set_domain_active(
        &self,
        req: Request<pb::SetDomainActiveRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        let unavailable = vm
            .set_domain_active(&r.domain, r.active, r.promote_async)
            .await
            .map_err(status)?;
        let mut resp = domains_pb(vm);
        resp.unavailable_volumes = unavailable;
        Ok(Response::new(resp))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let vm = self.vm()?;
        let r = req.into_inner();
        if r.node.is_empty() {
            return Err(Status::invalid_argument("give the node's name or id"));
        }
        let (id, name) = vm.remove_node(&r.node).await.map_err(status)?;
        Ok(Response::new(pb::RemoveNodeResponse { id, name }))
    }

    async fn list_alerts(
        &self,
        _req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let vm = self.vm()?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: vm
                .cluster()
                .state()
                .alerts
                .iter()
                .map(|a| pb::AlertInfo {
                    id: a.id,
                    unix_seconds: a.unix_seconds,
                    severity: a.severity.clone(),
                    kind: a.kind.clone(),
                    resource: a.resource.clone(),
                    message: a.message.clone(),
                })
                .collect(),
        }))
    }
}
