//! CSI Controller service: volumes are Tandem volumes.
//!
//! * The volume id is the Tandem volume name: the CSI name when it is a valid Tandem name
//!   (Kubernetes' `pvc-<uuid>` always is), else a stable hash of it ([`volume_name_for`]).
//! * CreateVolume is idempotent by name: the same name with compatible size and
//!   parameters returns the existing volume; an incompatible one is ALREADY_EXISTS.
//! * Topology: preferred (then requisite) topologies name the nodes that should hold the
//!   first replica, so the workload's node reads locally; with requisite topologies, a
//!   volume that cannot have a replica there is refused (RESOURCE_EXHAUSTED). The volume
//!   is accessible from every domain holding a replica.
//! * No ControllerPublish (NodeStage attaches), no snapshots and no clones: those RPCs
//!   answer UNIMPLEMENTED and are not advertised.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use tandem_engine::cluster::{ClusterState, NodeRole, VolumeRecord};
use tandem_engine::placement::provisioned_by_node;
use tandem_engine::volume::{CreateSpec, UpdateSpec, VolumeError, MAX_VOLUME_BYTES};
use tandem_proto::csi::v1 as csi;

use super::{
    check_capability, creation_labels, parse_params, required, status, to_csi_volume,
    volume_name_for, Access, CsiContext, Params, DEFAULT_FS, DEFAULT_VOLUME_BYTES,
    LABEL_ASYNC_DOMAINS, LABEL_DOMAINS, LABEL_FS, LABEL_ZONES, TOPOLOGY_DOMAIN, TOPOLOGY_NODE,
    TOPOLOGY_ZONE,
};

/// One page of `all`: the token is the index of the next entry; a token that is not one
/// a call could have returned is ABORTED, as the spec asks. Returns the page and the next
/// token (empty after the last page).
fn page<T>(all: Vec<T>, token: &str, max_entries: i32) -> Result<(Vec<T>, String), Status> {
    let start = if token.is_empty() {
        0
    } else {
        token
            .parse::<usize>()
            .ok()
            .filter(|&i| i <= all.len())
            .ok_or_else(|| {
                Status::aborted(format!(
                    "invalid starting_token '{token}': start again without one"
                ))
            })?
    };
    let take = if max_entries <= 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let end = start.saturating_add(take).min(all.len());
    let next = if end < all.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((
        all.into_iter().skip(start).take(end - start).collect(),
        next,
    ))
}

/// The volume and snapshot record with snapshot name `name`, in any volume.
fn find_snapshot_by_name<'a>(
    state: &'a ClusterState,
    name: &str,
) -> Option<(&'a str, &'a tandem_engine::cluster::SnapshotRecord)> {
    state.volumes.values().find_map(|v| {
        v.snapshots
            .iter()
            .find(|s| s.name == name)
            .map(|s| (v.name.as_str(), s))
    })
}

const BLOCK: u64 = tandem_engine::store::BLOCK_SIZE as u64;
/// mkfs.xfs refuses smaller devices.
const XFS_MIN_BYTES: u64 = 300 << 20;

pub struct Controller {
    ctx: Arc<CsiContext>,
}

impl Controller {
    pub fn new(ctx: Arc<CsiContext>) -> Controller {
        Controller { ctx }
    }
}

/// `(required, limit)` in bytes, 0 meaning unset.
fn capacity(r: Option<&csi::CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = r else { return Ok((0, 0)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: required_bytes and limit_bytes must not be negative",
        ));
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    if lim > 0 && req > lim {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {req} is larger than limit_bytes {lim}"
        )));
    }
    Ok((req, lim))
}

/// The size to create for a capacity range: the required size rounded up to 4 KiB, or
/// the default (capped by the limit).
fn size_for(req: u64, lim: u64) -> Result<u64, Status> {
    let size = if req > 0 {
        req.div_ceil(BLOCK) * BLOCK
    } else if lim > 0 {
        DEFAULT_VOLUME_BYTES.min(lim / BLOCK * BLOCK)
    } else {
        DEFAULT_VOLUME_BYTES
    };
    if size == 0 || (lim > 0 && size > lim) {
        return Err(Status::out_of_range(format!(
            "capacity_range [{req}, {lim}] holds no multiple of 4 KiB: Tandem volumes are sized in 4 KiB blocks"
        )));
    }
    if size > MAX_VOLUME_BYTES {
        return Err(Status::out_of_range(format!(
            "capacity {size} bytes is above the largest Tandem volume, 64 TiB"
        )));
    }
    Ok(size)
}

/// Storage nodes (not witnesses, not in an inactive domain) matching a topology.
fn nodes_in(state: &ClusterState, t: &csi::Topology) -> Vec<String> {
    let seg = |k: &str| t.segments.get(k).map(String::as_str);
    state
        .nodes
        .values()
        .filter(|n| n.role != NodeRole::Witness && !state.inactive_domains.contains(&n.domain))
        .filter(|n| seg(TOPOLOGY_DOMAIN).is_none_or(|d| d == n.domain))
        .filter(|n| seg(TOPOLOGY_ZONE).is_none_or(|z| z == n.zone))
        .filter(|n| seg(TOPOLOGY_NODE).is_none_or(|x| x == n.name))
        .map(|n| n.name.clone())
        .collect()
}

/// Nodes that should hold the first replica, best first, and whether one of them must.
fn topology_nodes(
    state: &ClusterState,
    req: Option<&csi::TopologyRequirement>,
) -> Result<(Vec<String>, bool), Status> {
    let Some(req) = req else {
        return Ok((Vec::new(), false));
    };
    for t in req.requisite.iter().chain(&req.preferred) {
        for k in t.segments.keys() {
            if ![TOPOLOGY_DOMAIN, TOPOLOGY_ZONE, TOPOLOGY_NODE].contains(&k.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "unknown topology key '{k}': Tandem's keys are {TOPOLOGY_DOMAIN}, {TOPOLOGY_ZONE} and {TOPOLOGY_NODE}"
                )));
            }
        }
    }
    let mut out: Vec<String> = Vec::new();
    for t in req.preferred.iter().chain(&req.requisite) {
        for n in nodes_in(state, t) {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    let require = !req.requisite.is_empty();
    if require && out.is_empty() {
        return Err(Status::resource_exhausted(
            "no active storage node matches the requisite topology",
        ));
    }
    Ok((out, require))
}

/// Why an existing volume does not match a create request, if it does not.
fn incompatible(rec: &VolumeRecord, req: u64, lim: u64, p: &Params, fs: &str) -> Option<String> {
    let label = |k: &str| rec.labels.get(k).cloned().unwrap_or_default();
    if rec.size_bytes < req || (lim > 0 && rec.size_bytes > lim) {
        return Some(format!(
            "it is {} bytes, outside the requested range [{req}, {lim}]",
            rec.size_bytes
        ));
    }
    if rec.repl != p.repl {
        return Some(format!("it has repl {}, not {}", rec.repl, p.repl));
    }
    if rec.io_priority != p.priority {
        return Some(format!(
            "it has priority_io {}, not {}",
            rec.io_priority, p.priority
        ));
    }
    if label(LABEL_FS) != fs {
        return Some(format!(
            "it was created for fs '{}', not '{fs}'",
            label(LABEL_FS)
        ));
    }
    if label(LABEL_ZONES) != p.zones.join(",")
        || label(LABEL_DOMAINS) != p.domains.join(",")
        || label(LABEL_ASYNC_DOMAINS) != p.async_domains.join(",")
    {
        return Some("it was created with other zones, domains or async_domains".into());
    }
    None
}

/// Checks a capability list (required, each supported) and returns the filesystem one of
/// them names, if any.
fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<Option<String>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    let mut fs = None;
    for c in caps {
        match check_capability(c).map_err(Status::invalid_argument)? {
            Access::Mount { fs: Some(f), .. } => {
                if fs.as_ref().is_some_and(|x| *x != f) {
                    return Err(Status::invalid_argument(
                        "volume_capabilities name two different filesystems",
                    ));
                }
                fs = Some(f)
            }
            Access::Mount { fs: None, .. } | Access::Block => {}
        }
    }
    Ok(fs)
}

fn rpc_cap(t: csi::controller_service_capability::rpc::Type) -> csi::ControllerServiceCapability {
    use csi::controller_service_capability::{Rpc, Type};
    csi::ControllerServiceCapability {
        r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let csi_name = required(&r.name, "name")?;
        let cap_fs = check_capabilities(&r.volume_capabilities)?;
        if r.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source is not supported yet: Tandem cannot create a volume from a snapshot or a clone of a volume (CLONE_VOLUME is not advertised)",
            ));
        }
        let p = parse_params(&r.parameters)?;
        let fs = cap_fs
            .or_else(|| p.fs.clone())
            .unwrap_or_else(|| DEFAULT_FS.to_string());
        let (req_b, lim_b) = capacity(r.capacity_range.as_ref())?;
        let size = size_for(req_b, lim_b)?;
        let vm = &self.ctx.volumes;
        let name = volume_name_for(csi_name);
        let state = vm.cluster().state();
        let (preferred, require) = topology_nodes(&state, r.accessibility_requirements.as_ref())?;

        let existing = |state: &ClusterState| -> Result<Option<csi::Volume>, Status> {
            let Some(rec) = state.volumes.get(&name) else {
                return Ok(None);
            };
            if let Some(why) = incompatible(rec, req_b, lim_b, &p, &fs) {
                return Err(Status::already_exists(format!(
                    "volume '{csi_name}' already exists and is incompatible: {why}"
                )));
            }
            Ok(Some(to_csi_volume(state, rec)))
        };
        if let Some(v) = existing(&state)? {
            return Ok(Response::new(csi::CreateVolumeResponse { volume: Some(v) }));
        }
        if fs == "xfs" && size < XFS_MIN_BYTES {
            return Err(Status::out_of_range(format!(
                "an xfs volume needs at least 300 MiB ({XFS_MIN_BYTES} bytes), not {size} bytes"
            )));
        }
        let spec = CreateSpec {
            name: name.clone(),
            size_bytes: size,
            repl: p.repl,
            io_priority: p.priority,
            labels: creation_labels(csi_name, &p, &fs),
            nodes: Vec::new(),
            zones: p.zones.clone(),
            domains: p.domains.clone(),
            preferred_nodes: preferred,
            require_preferred: require,
            async_domains: p.async_domains.clone(),
        };
        match vm.create(spec).await {
            Ok(_) => {}
            // A concurrent create of the same name won the race: answer as a retry would.
            Err(VolumeError::AlreadyExists(_)) => {}
            Err(e) => return Err(status(e)),
        }
        let state = vm.cluster().state();
        match existing(&state)? {
            Some(v) => Ok(Response::new(csi::CreateVolumeResponse { volume: Some(v) })),
            None => Err(Status::aborted(format!(
                "volume '{csi_name}' was deleted while it was being created; retry"
            ))),
        }
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        match self.ctx.volumes.delete(id, false).await {
            Ok(()) | Err(VolumeError::NotFound(_)) => {
                Ok(Response::new(csi::DeleteVolumeResponse {}))
            }
            Err(e) => Err(status(e)),
        }
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerPublishVolume is not supported: NodeStageVolume attaches the volume on its node",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerUnpublishVolume is not supported: NodeUnstageVolume detaches the volume",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let state = self.ctx.volumes.cluster().state();
        let rec = state
            .volumes
            .get(id)
            .ok_or_else(|| Status::not_found(format!("volume '{id}' not found")))?;
        let unconfirmed = |message: String| {
            Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            }))
        };
        let vol_fs = rec.labels.get(LABEL_FS).cloned();
        for c in &r.volume_capabilities {
            match check_capability(c) {
                Err(m) => return unconfirmed(m),
                Ok(Access::Mount { fs: Some(f), .. }) => {
                    if vol_fs.as_ref().is_some_and(|v| *v != f) {
                        return unconfirmed(format!(
                            "volume '{id}' was created for {}, not {f}",
                            vol_fs.unwrap_or_default()
                        ));
                    }
                }
                Ok(_) => {}
            }
        }
        if !r.parameters.is_empty() {
            if let Err(e) = parse_params(&r.parameters) {
                return unconfirmed(e.message().to_string());
            }
        }
        let ctx = super::volume_context(rec);
        if !r.volume_context.is_empty() && r.volume_context != ctx {
            return unconfirmed(format!(
                "volume_context does not match volume '{id}' (it is {ctx:?})"
            ));
        }
        Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
            }),
            message: String::new(),
        }))
    }

    /// Pages through volumes in name order. The token is the index of the next entry; a
    /// token that is not one this call could have returned is ABORTED, as the spec asks.
    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let state = self.ctx.volumes.cluster().state();
        let all: Vec<&VolumeRecord> = state.volumes.values().collect();
        let (page, next_token) = page(all, &r.starting_token, r.max_entries)?;
        let entries = page
            .into_iter()
            .map(|rec| csi::list_volumes_response::Entry {
                volume: Some(to_csi_volume(&state, rec)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(super::condition(rec)),
                }),
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    /// Capacity for new volumes in a topology segment: the unprovisioned pool space of its
    /// storage nodes, divided by the replication factor the parameters ask for.
    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        for c in &r.volume_capabilities {
            check_capability(c).map_err(Status::invalid_argument)?;
        }
        let p = parse_params(&r.parameters)?;
        let state = self.ctx.volumes.cluster().state();
        let names = match &r.accessible_topology {
            Some(t) => nodes_in(&state, t),
            None => nodes_in(&state, &csi::Topology::default()),
        };
        let provisioned = provisioned_by_node(&state);
        let mut free: Vec<u64> = state
            .nodes
            .values()
            .filter(|n| names.contains(&n.name))
            .filter(|n| p.domains.is_empty() || p.domains.contains(&n.domain))
            .filter(|n| p.zones.is_empty() || p.zones.contains(&n.zone))
            .map(|n| {
                n.pool_size_bytes
                    .saturating_sub(provisioned.get(&n.id).copied().unwrap_or(0))
            })
            .collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        let repl = p.repl as usize;
        let (available, largest) = if free.len() < repl {
            (0, 0)
        } else {
            (
                free.iter().sum::<u64>() / repl as u64,
                free[repl - 1].min(MAX_VOLUME_BYTES),
            )
        };
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: Some(largest as i64),
            minimum_volume_size: Some(BLOCK as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::rpc::Type;
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: [
                Type::CreateDeleteVolume,
                Type::ListVolumes,
                Type::GetCapacity,
                Type::ExpandVolume,
                Type::VolumeCondition,
                Type::GetVolume,
                Type::SingleNodeMultiWriter,
                Type::CreateDeleteSnapshot,
                Type::ListSnapshots,
            ]
            .into_iter()
            .map(rpc_cap)
            .collect(),
        }))
    }

    /// Blocks until the cut is made (on the volume's attach node; a detached volume is
    /// attached for it), so the snapshot is ready to use when this returns. The name is the
    /// idempotency key across every volume: the same name with another source is
    /// ALREADY_EXISTS.
    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let csi_name = required(&r.name, "name")?.to_string();
        let source = required(&r.source_volume_id, "source_volume_id")?.to_string();
        if let Some(k) = r.parameters.keys().next() {
            return Err(Status::invalid_argument(format!(
                "unknown snapshot parameter '{k}' (VolumeSnapshotClass parameters: none are supported)"
            )));
        }
        let name = volume_name_for(&csi_name);
        let vm = &self.ctx.volumes;
        let state = vm.cluster().state();
        if !state.volumes.contains_key(&source) {
            return Err(Status::not_found(format!("volume '{source}' not found")));
        }
        if let Some((other, _)) = find_snapshot_by_name(&state, &name).filter(|(v, _)| *v != source)
        {
            return Err(Status::already_exists(format!(
                "snapshot '{csi_name}' exists for volume '{other}', not '{source}'"
            )));
        }
        let _g = self.ctx.lock(&source).await;
        let s = crate::admin::create_snapshot_anywhere(
            vm,
            tandem_proto::admin::CreateSnapshotRequest {
                volume: source.clone(),
                name,
                labels: [("csi.storage.k8s.io/snapshot-name".to_string(), csi_name)].into(),
            },
        )
        .await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(csi::Snapshot {
                size_bytes: s.size_bytes as i64,
                snapshot_id: s.id,
                source_volume_id: source,
                creation_time: Some(prost_types::Timestamp {
                    seconds: s.created_unix_seconds as i64,
                    nanos: 0,
                }),
                ready_to_use: s.state == "ready",
            }),
        }))
    }

    /// Idempotent: an unknown id succeeds. The replicas drop the snapshot's layers in the
    /// background.
    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.snapshot_id, "snapshot_id")?.to_string();
        let vm = &self.ctx.volumes;
        let state = vm.cluster().state();
        let Some(volume) = state
            .volumes
            .values()
            .find(|v| v.snapshots.iter().any(|s| s.id == id))
            .map(|v| v.name.clone())
        else {
            return Ok(Response::new(csi::DeleteSnapshotResponse {}));
        };
        match vm.delete_snapshot(&volume, &id).await {
            Ok(_) | Err(VolumeError::SnapshotNotFound { .. } | VolumeError::NotFound(_)) => {
                Ok(Response::new(csi::DeleteSnapshotResponse {}))
            }
            Err(e) => Err(status(e)),
        }
    }

    /// Ready snapshots only (the spec: never one whose cut is not made), in id order,
    /// paged like ListVolumes. An unknown `snapshot_id` or `source_volume_id` gives an empty
    /// list, not an error.
    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let state = self.ctx.volumes.cluster().state();
        let mut all: Vec<csi::Snapshot> = state
            .volumes
            .values()
            .filter(|v| r.source_volume_id.is_empty() || v.name == r.source_volume_id)
            .flat_map(|v| {
                v.snapshots
                    .iter()
                    .filter(|s| s.state == tandem_engine::cluster::SnapshotState::Ready)
                    .filter(|s| r.snapshot_id.is_empty() || s.id == r.snapshot_id)
                    .map(|s| csi::Snapshot {
                        size_bytes: s.size_bytes as i64,
                        snapshot_id: s.id.clone(),
                        source_volume_id: v.name.clone(),
                        creation_time: Some(prost_types::Timestamp {
                            seconds: s.created_unix_seconds as i64,
                            nanos: 0,
                        }),
                        ready_to_use: true,
                    })
            })
            .collect();
        all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        let (page, next_token) = page(all, &r.starting_token, r.max_entries)?;
        let entries = page
            .into_iter()
            .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) })
            .collect();
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    /// Grows the Tandem volume (online: an attached volume grows in place). Node expansion
    /// is always required: the loop device must see the new size, and a filesystem grows.
    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let Some(range) = r.capacity_range.as_ref() else {
            return Err(Status::invalid_argument("capacity_range is required"));
        };
        if let Some(c) = &r.volume_capability {
            check_capability(c).map_err(Status::invalid_argument)?;
        }
        let (req_b, lim_b) = capacity(Some(range))?;
        let vm = &self.ctx.volumes;
        let rec = vm.inspect(id).await.map_err(status)?.record;
        if lim_b > 0 && rec.size_bytes > lim_b {
            return Err(Status::out_of_range(format!(
                "volume '{id}' is already {} bytes, above limit_bytes {lim_b}; volumes do not shrink",
                rec.size_bytes
            )));
        }
        let size = if rec.size_bytes >= req_b {
            rec.size_bytes
        } else {
            let want = size_for(req_b, lim_b)?;
            vm.update(
                id,
                UpdateSpec {
                    size_bytes: Some(want),
                    ..Default::default()
                },
            )
            .await
            .map_err(status)?
            .record
            .size_bytes
        };
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let state = self.ctx.volumes.cluster().state();
        let rec = state
            .volumes
            .get(id)
            .ok_or_else(|| Status::not_found(format!("volume '{id}' not found")))?;
        let published: Vec<String> = rec
            .attached_node
            .and_then(|n| state.nodes.get(&n))
            .map(|n| vec![n.name.clone()])
            .unwrap_or_default();
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(to_csi_volume(&state, rec)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: published,
                volume_condition: Some(super::condition(rec)),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_blocks_and_respect_limits() {
        assert_eq!(size_for(0, 0).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(size_for(1, 0).unwrap(), 4096);
        assert_eq!(size_for(4097, 0).unwrap(), 8192);
        assert_eq!(size_for(0, 10_000).unwrap(), 8192);
        assert_eq!(
            size_for(4097, 5000).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_for(0, 100).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        let bad = csi::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        };
        assert_eq!(
            capacity(Some(&bad)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
