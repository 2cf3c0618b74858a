//! The admin gRPC API (`tandem.v1`): what `tandemctl` talks to.
//!
//! Engine errors map to gRPC statuses in one place, [`status`].

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use tandem_engine::meta::IoPriority;
use tandem_engine::volume::{CreateSpec, UpdateSpec, VolumeError, VolumeInfo, VolumeManager};
use tandem_proto::admin as pb;
use tandem_proto::admin::node_service_server::NodeService;
use tandem_proto::admin::volume_service_server::VolumeService;

/// Addresses and settings the API reports.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub data_dir: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub metrics_addr: String,
    pub started: Instant,
}

pub struct AdminApi {
    volumes: Arc<VolumeManager>,
    info: NodeInfo,
}

impl AdminApi {
    pub fn new(volumes: Arc<VolumeManager>, info: NodeInfo) -> AdminApi {
        AdminApi { volumes, info }
    }

    fn nbd_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.info.nbd_addr)
    }

    fn to_pb(&self, v: &VolumeInfo) -> pb::Volume {
        let r = &v.record;
        let attached = r.attached_node.clone().unwrap_or_default();
        pb::Volume {
            id: r.id.clone(),
            name: r.name.clone(),
            size_bytes: r.size_bytes,
            repl: r.repl,
            io_priority: prio_to_pb(r.io_priority) as i32,
            labels: r.labels.clone().into_iter().collect(),
            generation: r.generation,
            nbd_uri: if attached.is_empty() {
                String::new()
            } else {
                self.nbd_uri(&r.name)
            },
            attached_node: attached.clone(),
            allocated_bytes: v.allocated_bytes,
            created_unix_seconds: r.created_unix_seconds,
            replicas: vec![pb::Replica {
                node_id: self.volumes.identity().node_id.clone(),
                state: if v.checksum_errors > 0 {
                    "in-sync (checksum errors)".into()
                } else {
                    "in-sync".into()
                },
                allocated_bytes: v.allocated_bytes,
            }],
            state: if attached.is_empty() {
                "detached".into()
            } else {
                "attached".into()
            },
        }
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
        VolumeError::NotFound(_) => Status::not_found(e.to_string()),
        VolumeError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        VolumeError::FailedPrecondition(_) | VolumeError::NotAttached(_) => {
            Status::failed_precondition(e.to_string())
        }
        VolumeError::Store(StoreError::PoolFull { .. }) => {
            Status::resource_exhausted(e.to_string())
        }
        VolumeError::Store(StoreError::Shrink { .. }) => Status::failed_precondition(e.to_string()),
        VolumeError::Store(_) | VolumeError::Meta(_) => {
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
        let vols = self.volumes.list().await.map_err(status)?;
        let id = self.volumes.identity();
        let pool = self.volumes.pool();
        Ok(Response::new(pb::StatusResponse {
            node_id: id.node_id.clone(),
            cluster_id: id.cluster_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            status: "online".into(),
            io_engine: pool.engine().name().into(),
            data_dir: self.info.data_dir.clone(),
            pool_size_bytes: pool.size_bytes(),
            pool_allocated_bytes: pool.allocated_bytes(),
            pool_provisioned_bytes: vols.iter().map(|v| v.record.size_bytes).sum(),
            volume_count: vols.len() as u32,
            attached_count: self.volumes.attached_names().len() as u32,
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
        let r = req.into_inner();
        let spec = CreateSpec {
            name: r.name,
            size_bytes: r.size_bytes,
            repl: r.repl,
            io_priority: prio_from_pb(r.io_priority)?.unwrap_or_default(),
            labels: r.labels.into_iter().collect(),
        };
        let v = self.volumes.create(spec).await.map_err(status)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb(&v)),
        }))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let vols = self.volumes.list().await.map_err(status)?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: vols.iter().map(|v| self.to_pb(v)).collect(),
        }))
    }

    async fn inspect_volume(
        &self,
        req: Request<pb::InspectVolumeRequest>,
    ) -> Result<Response<pb::VolumeResponse>, Status> {
        let v = self
            .volumes
            .inspect(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb(&v)),
        }))
    }

    async fn update_volume(
        &self,
        req: Request<pb::UpdateVolumeRequest>,
    ) -> Result<Response<pb::VolumeResponse>, Status> {
        let r = req.into_inner();
        let spec = UpdateSpec {
            size_bytes: (r.size_bytes != 0).then_some(r.size_bytes),
            repl: (r.repl != 0).then_some(r.repl),
            io_priority: prio_from_pb(r.io_priority)?,
        };
        let v = self.volumes.update(&r.name, spec).await.map_err(status)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb(&v)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        self.volumes
            .delete(&r.name, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::AttachVolumeResponse>, Status> {
        let name = req.into_inner().name;
        self.volumes.attach(&name).await.map_err(status)?;
        let v = self.volumes.inspect(&name).await.map_err(status)?;
        Ok(Response::new(pb::AttachVolumeResponse {
            volume: Some(self.to_pb(&v)),
            nbd_uri: self.nbd_uri(&name),
        }))
    }

    async fn detach_volume(
        &self,
        req: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::VolumeResponse>, Status> {
        let v = self
            .volumes
            .detach(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VolumeResponse {
            volume: Some(self.to_pb(&v)),
        }))
    }
}
