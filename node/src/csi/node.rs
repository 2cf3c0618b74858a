//! CSI Node service.
//!
//! NodeStageVolume attaches the volume on this node (it becomes the volume's coordinator),
//! exposes it as a file through FUSE, binds a loop device to that file, makes a
//! filesystem when the volume is blank, and mounts it at the staging path (block access:
//! the loop device is recorded, nothing is mounted). NodePublishVolume bind-mounts the
//! staging mount (or the loop device node, for block) at the target path. The reverse
//! calls undo this and NodeUnstageVolume detaches. Every call is idempotent; a call after
//! a tandemd crash tears down what the dead process left (a dead FUSE mount and what is
//! stacked on it) and rebuilds it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use tandem_proto::csi::v1 as csi;

use crate::attach::fuse::BlockTarget;
use crate::attach::state::StageMode;
use crate::attach::{Attacher, PublishRequest, StageRequest, VolumeUsage};

use super::{
    check_capability, required, status, Access, CsiContext, DEFAULT_FS, LABEL_FS, TOPOLOGY_DOMAIN,
    TOPOLOGY_NODE, TOPOLOGY_ZONE,
};

pub struct Node {
    ctx: Arc<CsiContext>,
}

impl Node {
    pub fn new(ctx: Arc<CsiContext>) -> Node {
        Node { ctx }
    }
}

/// Requires an absolute path.
fn abs_path(v: &str, what: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(required(v, what)?);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{what} must be an absolute path, not '{v}'"
        )));
    }
    Ok(p)
}

/// The capability of a node call: required and supported (FAILED_PRECONDITION when not:
/// "exceeds capabilities" in the spec's node error tables).
fn node_capability(c: Option<&csi::VolumeCapability>) -> Result<Access, Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    if c.access_mode.is_none() {
        return Err(Status::invalid_argument(
            "volume_capability.access_mode is required",
        ));
    }
    if c.access_type.is_none() {
        return Err(Status::invalid_argument(
            "volume_capability needs a block or mount access type",
        ));
    }
    check_capability(c).map_err(Status::failed_precondition)
}

fn is_readonly_mode(c: Option<&csi::VolumeCapability>) -> bool {
    use csi::volume_capability::access_mode::Mode;
    c.and_then(|c| c.access_mode.as_ref())
        .is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32)
}

fn rpc_cap(t: csi::node_service_capability::rpc::Type) -> csi::NodeServiceCapability {
    use csi::node_service_capability::{Rpc, Type};
    csi::NodeServiceCapability {
        r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
    }
}

impl Node {
    fn volume_exists(&self, id: &str) -> Result<tandem_engine::cluster::VolumeRecord, Status> {
        self.ctx
            .volumes
            .cluster()
            .state()
            .volumes
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("volume '{id}' not found")))
    }

    fn fs_for(&self, rec: &tandem_engine::cluster::VolumeRecord, access: &Access) -> String {
        match access {
            Access::Mount { fs: Some(f), .. } => f.clone(),
            _ => rec
                .labels
                .get(LABEL_FS)
                .filter(|f| !f.is_empty())
                .cloned()
                .unwrap_or_else(|| DEFAULT_FS.to_string()),
        }
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = abs_path(&r.staging_target_path, "staging_target_path")?;
        let access = node_capability(r.volume_capability.as_ref())?;
        let rec = self.volume_exists(&id)?;
        let fs = self.fs_for(&rec, &access);
        let _g = self.ctx.lock(&id).await;
        self.stage(&id, &staging, &access, &fs).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = abs_path(&r.staging_target_path, "staging_target_path")?;
        let _g = self.ctx.lock(&id).await;
        self.unstage(&id, &staging).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let target = abs_path(&r.target_path, "target_path")?;
        let access = node_capability(r.volume_capability.as_ref())?;
        if r.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required: this driver stages volumes (STAGE_UNSTAGE_VOLUME)",
            ));
        }
        let staging = abs_path(&r.staging_target_path, "staging_target_path")?;
        self.volume_exists(&id)?;
        let readonly = r.readonly || is_readonly_mode(r.volume_capability.as_ref());
        let single_writer = r
            .volume_capability
            .as_ref()
            .and_then(|c| c.access_mode.as_ref())
            .is_some_and(|m| {
                m.mode == csi::volume_capability::access_mode::Mode::SingleNodeSingleWriter as i32
            });
        let _g = self.ctx.lock(&id).await;
        self.publish(&id, &staging, &target, &access, readonly, single_writer)
            .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let target = abs_path(&r.target_path, "target_path")?;
        let _g = self.ctx.lock(&id).await;
        self.unpublish(&id, &target).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        required(&r.volume_path, "volume_path")?;
        // The volume first: an unknown volume is NOT_FOUND whatever the path says, and so
        // is a path it is not staged or published at (a relative one included).
        let rec = self.volume_exists(&id)?;
        let path = PathBuf::from(&r.volume_path);
        let (usage, local) = self.usage(&id, &path).await?;
        let mut condition = super::condition(&rec);
        if let Some(why) = local {
            condition = csi::VolumeCondition {
                abnormal: true,
                message: why,
            };
        }
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        required(&r.volume_path, "volume_path")?;
        if let Some(c) = &r.volume_capability {
            check_capability(c).map_err(Status::invalid_argument)?;
        }
        let rec = self.volume_exists(&id)?;
        let path = PathBuf::from(&r.volume_path);
        if !self.available_at(&id, &path).await? {
            return Err(not_available_at(&id, &path));
        }
        if let Some(range) = &r.capacity_range {
            if range.required_bytes < 0 || range.limit_bytes < 0 {
                return Err(Status::invalid_argument(
                    "capacity_range must not be negative",
                ));
            }
            if range.required_bytes as u64 > rec.size_bytes {
                return Err(Status::out_of_range(format!(
                    "volume '{id}' is {} bytes; expand it with ControllerExpandVolume first",
                    rec.size_bytes
                )));
            }
        }
        let _g = self.ctx.lock(&id).await;
        let size = self.expand(&id).await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::rpc::Type;
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: [
                Type::StageUnstageVolume,
                Type::GetVolumeStats,
                Type::ExpandVolume,
                Type::VolumeCondition,
                Type::SingleNodeMultiWriter,
            ]
            .into_iter()
            .map(rpc_cap)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let c = &self.ctx;
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: c.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: [
                    (TOPOLOGY_DOMAIN.to_string(), c.domain.clone()),
                    (TOPOLOGY_ZONE.to_string(), c.zone.clone()),
                    (TOPOLOGY_NODE.to_string(), c.node_name.clone()),
                ]
                .into_iter()
                .collect(),
            }),
        }))
    }
}

// The OS side: FUSE, loop, mkfs, mounts (crate::attach), on a blocking thread.
impl Node {
    /// Runs one attach-layer step on a blocking thread; its error becomes the CSI status.
    async fn os<T, F>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(&Attacher) -> crate::attach::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.ctx.attacher.run(f).await.map_err(attach_status)
    }

    async fn stage(
        &self,
        id: &str,
        staging: &Path,
        access: &Access,
        fs: &str,
    ) -> Result<(), Status> {
        let vol = self.ctx.volumes.attach(id, false).await.map_err(status)?;
        let mode = match access {
            Access::Block => StageMode::Block,
            Access::Mount { flags, .. } => StageMode::Filesystem {
                fs_type: fs.to_string(),
                mount_flags: flags.clone(),
            },
        };
        let req = StageRequest {
            volume: id.to_string(),
            staging_path: staging.to_path_buf(),
            mode,
        };
        let target: Arc<dyn BlockTarget> = vol;
        let out = self.os(move |a| a.stage(target, &req)).await?;
        tracing::info!(volume = %id, device = %out.device.display(), formatted = out.formatted, rebuilt = out.rebuilt_stale, "CSI: volume staged");
        Ok(())
    }

    async fn unstage(&self, id: &str, staging: &Path) -> Result<(), Status> {
        let (vid, path) = (id.to_string(), staging.to_path_buf());
        self.os(move |a| a.unstage(&vid, &path)).await?;
        let vm = &self.ctx.volumes;
        let attached_here = vm
            .cluster()
            .state()
            .volumes
            .get(id)
            .is_some_and(|v| v.attached_node == Some(vm.node_id()));
        if attached_here {
            vm.detach(id).await.map_err(status)?;
        }
        tracing::info!(volume = %id, "CSI: volume unstaged");
        Ok(())
    }

    async fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        access: &Access,
        readonly: bool,
        single_writer: bool,
    ) -> Result<(), Status> {
        if single_writer {
            let vid = id.to_string();
            let rec = self.os(move |a| a.recorded(&vid)).await?;
            if let Some(other) = rec
                .iter()
                .flat_map(|r| &r.publishes)
                .find(|p| p.target_path != target)
            {
                return Err(Status::failed_precondition(format!(
                    "volume '{id}' has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
                    other.target_path.display()
                )));
            }
        }
        let req = PublishRequest {
            volume: id.to_string(),
            staging_path: staging.to_path_buf(),
            target_path: target.to_path_buf(),
            readonly,
            mount_flags: match access {
                Access::Mount { flags, .. } => flags.clone(),
                Access::Block => Vec::new(),
            },
            block: matches!(access, Access::Block),
        };
        self.os(move |a| a.publish(&req)).await
    }

    async fn unpublish(&self, id: &str, target: &Path) -> Result<(), Status> {
        let (vid, path) = (id.to_string(), target.to_path_buf());
        self.os(move |a| a.unpublish(&vid, &path)).await
    }

    /// Usage of a path where this volume is staged or published here (NOT_FOUND for any
    /// other path, as the spec's table asks).
    /// Whether `path` is where this node staged or published the volume.
    async fn available_at(&self, id: &str, path: &Path) -> Result<bool, Status> {
        let (vid, p) = (id.to_string(), path.to_path_buf());
        self.os(move |a| Ok(staged_or_published_at(a, &vid, &p)?.is_some()))
            .await
    }

    async fn usage(
        &self,
        id: &str,
        path: &Path,
    ) -> Result<(Vec<csi::VolumeUsage>, Option<String>), Status> {
        // One blocking hop: the record, the statfs and the export's health.
        let (vid, p) = (id.to_string(), path.to_path_buf());
        let looked = self
            .os(move |a| {
                if staged_or_published_at(a, &vid, &p)?.is_none() {
                    return Ok(None);
                }
                Ok(Some((Attacher::stats(&p)?, a.condition(&vid))))
            })
            .await?;
        let Some((usage, local)) = looked else {
            return Err(not_available_at(id, path));
        };
        use csi::volume_usage::Unit;
        let out = match usage {
            VolumeUsage::Filesystem(f) => vec![
                csi::VolumeUsage {
                    available: f.available_bytes as i64,
                    total: f.total_bytes as i64,
                    used: f.used_bytes as i64,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: f.free_inodes as i64,
                    total: f.total_inodes as i64,
                    used: f.used_inodes as i64,
                    unit: Unit::Inodes as i32,
                },
            ],
            VolumeUsage::Block { size_bytes } => vec![csi::VolumeUsage {
                available: 0,
                total: size_bytes as i64,
                used: 0,
                unit: Unit::Bytes as i32,
            }],
        };
        Ok((out, local))
    }

    async fn expand(&self, id: &str) -> Result<u64, Status> {
        let vid = id.to_string();
        self.os(move |a| a.expand(&vid)).await
    }
}

/// The volume's attach record when `path` is its staging path or one of its publish targets
/// on this node. A relative path is never one (the attacher records absolute ones).
fn staged_or_published_at(
    a: &Attacher,
    id: &str,
    path: &Path,
) -> crate::attach::Result<Option<crate::attach::StaleVolume>> {
    if !path.is_absolute() {
        return Ok(None);
    }
    let Some(r) = a.recorded(id)? else {
        return Ok(None);
    };
    let n = crate::attach::blockdev::normalize;
    let want = n(path);
    let known = n(&r.staging_path) == want || r.publishes.iter().any(|x| n(&x.target_path) == want);
    Ok(known.then_some(r))
}

/// NOT_FOUND for a path the volume is not available at (CSI: "volume_path does not exist").
fn not_available_at(id: &str, path: &Path) -> Status {
    Status::not_found(format!(
        "volume '{id}' is not staged or published at {}",
        path.display()
    ))
}

fn attach_status(e: crate::attach::AttachError) -> Status {
    Status::new(e.grpc_code(), e.to_string())
}

/// At start-up: tears down what a previous tandemd process left behind (the FUSE mounts it
/// served died with it, and so did everything stacked on them), then stages again every
/// volume that was staged here and is still attached here, which re-binds its publish
/// targets. New opens in pods work again; files a pod held open on the old stack stay
/// broken until the pod restarts (docs/csi.md, "Restarts").
pub async fn recover(ctx: &CsiContext) {
    let stale = match ctx.attacher.run(|a| a.cleanup_stale()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "CSI: cleaning up stale mounts failed");
            return;
        }
    };
    let vm = &ctx.volumes;
    for s in stale {
        let attached_here = vm
            .cluster()
            .state()
            .volumes
            .get(&s.volume)
            .is_some_and(|v| v.attached_node == Some(vm.node_id()));
        if !attached_here {
            tracing::info!(volume = %s.volume, "CSI: stale staging record of a volume no longer attached here; left for NodeUnstageVolume");
            continue;
        }
        let vol = match vm.attach(&s.volume, false).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(volume = %s.volume, error = %e, "CSI: re-attach for restaging failed");
                continue;
            }
        };
        let req = StageRequest {
            volume: s.volume.clone(),
            staging_path: s.staging_path.clone(),
            mode: s.mode.clone(),
        };
        let target: Arc<dyn BlockTarget> = vol;
        match ctx.attacher.run(move |a| a.stage(target, &req)).await {
            Ok(_) => tracing::info!(volume = %s.volume, "CSI: restaged after restart"),
            Err(e) => {
                tracing::warn!(volume = %s.volume, error = %e, "CSI: restaging after restart failed; NodeStageVolume will retry")
            }
        }
    }
}
