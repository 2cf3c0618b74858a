//! CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use tandem_proto::csi::v1 as csi;

use super::{CsiContext, DRIVER_NAME};

pub struct Identity {
    ctx: Arc<CsiContext>,
}

impl Identity {
    pub fn new(ctx: Arc<CsiContext>) -> Identity {
        Identity { ctx }
    }
}

/// Host tools the Node service runs; Probe fails (FAILED_PRECONDITION) without them.
pub const NODE_TOOLS: &[&str] = &["losetup", "mount", "umount", "blkid", "mkfs.ext4"];

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        || ["/sbin", "/usr/sbin", "/bin", "/usr/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(tool).is_file())
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let state = self.ctx.volumes.cluster().state();
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: [("cluster_id".to_string(), state.cluster_id.clone())]
                .into_iter()
                .collect(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        let svc = |t: service::Type| csi::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                svc(service::Type::ControllerService),
                svc(service::Type::VolumeAccessibilityConstraints),
                csi::PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    /// Ready when this node is in contact with a raft majority that has a leader: only
    /// then can volumes be created, attached or detached. Missing host tools or /dev/fuse
    /// make the node unhealthy (FAILED_PRECONDITION), not merely not ready.
    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let missing: Vec<&str> = NODE_TOOLS.iter().copied().filter(|t| !on_path(t)).collect();
        if !missing.is_empty() {
            return Err(Status::failed_precondition(format!(
                "missing host tools: {}",
                missing.join(", ")
            )));
        }
        if !std::path::Path::new("/dev/fuse").exists() {
            return Err(Status::failed_precondition(
                "/dev/fuse is missing: the node service needs FUSE",
            ));
        }
        let cluster = self.ctx.volumes.cluster();
        let ready = cluster.status().leader_id != 0
            && cluster.raft().majority_contact_age() <= tandem_engine::volume::COORDINATOR_LEASE;
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
