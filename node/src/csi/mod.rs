//! The CSI frontend: the Identity, Controller and Node services of `csi.v1` on a unix
//! socket, for Kubernetes and OpenShift (driver name [`DRIVER_NAME`]).
//!
//! * [`identity`]: plugin info, capabilities, and a Probe that reports readiness from the
//!   cluster's state (a raft leader and majority contact).
//! * [`controller`]: volumes are Tandem volumes; StorageClass parameters and topology
//!   requirements become the create request; the volume id is the Tandem volume name.
//! * [`node`]: NodeStage attaches the volume here (this node becomes its coordinator) and
//!   builds the FUSE file → loop device → filesystem stack; NodePublish bind-mounts.
//!
//! Every RPC validates its required fields first (INVALID_ARGUMENT) and looks volumes up
//! second (NOT_FOUND), as the specification's error tables ask. docs/csi.md is the user
//! guide.

pub mod controller;
pub mod identity;
pub mod node;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tonic::Status;

use tandem_engine::meta::IoPriority;
use tandem_engine::volume::{VolumeError, VolumeManager};
use tandem_proto::csi::v1 as csi;

/// The driver name Kubernetes objects refer to (CSIDriver, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.tandem.io";
/// Topology keys reported by NodeGetInfo and used in accessibility requirements.
pub const TOPOLOGY_DOMAIN: &str = "topology.tandem.io/domain";
pub const TOPOLOGY_ZONE: &str = "topology.tandem.io/zone";
pub const TOPOLOGY_NODE: &str = "topology.tandem.io/node";
/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Labels that record a CSI volume's creation parameters (for idempotent CreateVolume and
/// a stable volume_context).
pub const LABEL_CSI_NAME: &str = "csi.tandem.io/name";
pub const LABEL_FS: &str = "csi.tandem.io/fs";
pub const LABEL_ZONES: &str = "csi.tandem.io/zones";
pub const LABEL_DOMAINS: &str = "csi.tandem.io/domains";
pub const LABEL_ASYNC_DOMAINS: &str = "csi.tandem.io/async-domains";
/// Filesystems NodeStage can make and mount.
pub const FILESYSTEMS: &[&str] = &["ext4", "xfs"];
/// The default filesystem when neither the capability nor the `fs` parameter names one.
pub const DEFAULT_FS: &str = "ext4";

/// What the three services share.
pub struct CsiContext {
    pub volumes: Arc<VolumeManager>,
    /// The node id reported by NodeGetInfo.
    pub node_id: String,
    /// This node's topology (NodeGetInfo).
    pub domain: String,
    pub zone: String,
    pub node_name: String,
    /// FUSE exports, loop devices and mounts, with their records under `<data-dir>/csi`.
    pub attacher: crate::attach::Attacher,
    /// Node operations on one volume run one at a time.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl CsiContext {
    pub fn new(
        volumes: Arc<VolumeManager>,
        node_id: String,
        node_name: String,
        domain: String,
        zone: String,
        state_dir: PathBuf,
    ) -> anyhow::Result<Arc<CsiContext>> {
        let attacher = crate::attach::Attacher::new(
            &state_dir,
            tokio::runtime::Handle::current(),
            Default::default(),
        )?;
        Ok(Arc::new(CsiContext {
            volumes,
            node_id,
            domain,
            zone,
            node_name,
            attacher,
            locks: Default::default(),
        }))
    }

    /// Serialises node operations on one volume (kubelet may retry while a call runs).
    pub async fn lock(&self, volume_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(volume_id.to_string())
            .or_default()
            .clone();
        m.lock_owned().await
    }
}

/// Serves CSI on the unix socket at `path` until `shutdown` flips.
pub async fn serve(
    ctx: Arc<CsiContext>,
    path: PathBuf,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the CSI socket directory {}", dir.display()))?;
    }
    // A socket left by an earlier run (kill -9) would make bind fail.
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("remove stale CSI socket {}", path.display()))
        }
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on the CSI socket {}", path.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    use csi::controller_server::ControllerServer;
    use csi::identity_server::IdentityServer;
    use csi::node_server::NodeServer;
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::Identity::new(ctx.clone())))
        .add_service(ControllerServer::new(controller::Controller::new(
            ctx.clone(),
        )))
        .add_service(NodeServer::new(node::Node::new(ctx)))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
        })
        .await
        .context("CSI server")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Maps an engine error to the status the CSI error tables ask for.
pub fn status(e: VolumeError) -> Status {
    match &e {
        VolumeError::NoPlacement(_) => Status::resource_exhausted(e.to_string()),
        _ => crate::admin::status(e),
    }
}

/// StorageClass parameters, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub repl: u32,
    pub priority: IoPriority,
    pub zones: Vec<String>,
    pub domains: Vec<String>,
    /// `async_domains`: replicas there are async by choice (never latency-gated).
    pub async_domains: Vec<String>,
    /// `fs`; the capability's fs_type wins over it.
    pub fs: Option<String>,
}

fn list(v: &str) -> Vec<String> {
    let mut out: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Parses StorageClass parameters. Keys under `csi.storage.k8s.io/` belong to the
/// sidecars and are ignored; any other unknown key is an error (a typo must not silently
/// give a volume fewer replicas than asked for).
pub fn parse_params(map: &HashMap<String, String>) -> Result<Params, Status> {
    let mut p = Params {
        repl: 1,
        priority: IoPriority::default(),
        zones: Vec::new(),
        domains: Vec::new(),
        async_domains: Vec::new(),
        fs: None,
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for k in keys {
        let v = map[k].trim();
        match k.as_str() {
            "repl" => {
                p.repl = v
                    .parse()
                    .ok()
                    .filter(|r| (1..=tandem_engine::volume::MAX_REPL).contains(r))
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "invalid parameter repl={v}: expected 1, 2 or 3"
                        ))
                    })?
            }
            "priority_io" => {
                p.priority = v.parse().map_err(|e: String| {
                    Status::invalid_argument(format!("invalid parameter priority_io: {e}"))
                })?
            }
            "zones" => p.zones = list(v),
            "domains" => p.domains = list(v),
            "async_domains" => p.async_domains = list(v),
            "fs" => p.fs = Some(check_fs(v)?),
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown parameter '{other}': Tandem accepts repl, priority_io, zones, domains, async_domains and fs"
                )))
            }
        }
    }
    Ok(p)
}

/// Checks a filesystem name.
pub fn check_fs(fs: &str) -> Result<String, Status> {
    let fs = fs.trim().to_ascii_lowercase();
    if FILESYSTEMS.contains(&fs.as_str()) {
        Ok(fs)
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported filesystem '{fs}': Tandem makes ext4 or xfs"
        )))
    }
}

/// How a capability wants the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount {
        fs: Option<String>,
        flags: Vec<String>,
    },
}

/// Access modes Tandem supports: one node at a time (a volume has one coordinator).
pub fn mode_supported(mode: i32) -> bool {
    use csi::volume_capability::access_mode::Mode;
    matches!(
        Mode::try_from(mode),
        Ok(Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter)
    )
}

/// Checks one capability: access type set, access mode set and supported, fs known.
/// Returns why not, as a message (CreateVolume turns it into INVALID_ARGUMENT,
/// ValidateVolumeCapabilities into an unconfirmed answer).
pub fn check_capability(c: &csi::VolumeCapability) -> Result<Access, String> {
    use csi::volume_capability::AccessType;
    let mode = c
        .access_mode
        .as_ref()
        .ok_or("volume capability has no access_mode")?
        .mode;
    if mode == 0 {
        return Err("volume capability has access mode UNKNOWN".into());
    }
    if !mode_supported(mode) {
        let name = csi::volume_capability::access_mode::Mode::try_from(mode)
            .map(|m| m.as_str_name().to_string())
            .unwrap_or_else(|_| mode.to_string());
        return Err(format!(
            "access mode {name} is not supported: a Tandem volume is used on one node at a time"
        ));
    }
    match &c.access_type {
        None => Err("volume capability has neither block nor mount access type".into()),
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs = if m.fs_type.is_empty() {
                None
            } else {
                Some(check_fs(&m.fs_type).map_err(|s| s.message().to_string())?)
            };
            if !m.volume_mount_group.is_empty() {
                return Err("volume_mount_group is not supported".into());
            }
            Ok(Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            })
        }
    }
}

/// Tandem volume names are `[A-Za-z0-9._-]{1,128}`; a CSI name that does not fit (any
/// Unicode string is allowed) maps to a stable hashed name. The original is kept in a
/// label.
pub fn volume_name_for(csi_name: &str) -> String {
    if tandem_engine::volume::validate_name(csi_name).is_ok() {
        return csi_name.to_string();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(csi_name.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("csi-{hex}")
}

/// The volume_context CreateVolume returns: stable for the life of the volume.
pub fn volume_context(rec: &tandem_engine::cluster::VolumeRecord) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert("repl".to_string(), rec.repl.to_string());
    m.insert("priority_io".to_string(), rec.io_priority.to_string());
    for (label, key) in [
        (LABEL_FS, "fs"),
        (LABEL_DOMAINS, "domains"),
        (LABEL_ZONES, "zones"),
    ] {
        if let Some(v) = rec.labels.get(label).filter(|v| !v.is_empty()) {
            m.insert(key.to_string(), v.clone());
        }
    }
    m
}

/// Where a volume is accessible from: every domain that holds one of its replicas (a
/// node elsewhere could attach it too, over the network, but a workload should run where
/// a replica is).
pub fn accessible_topology(
    state: &tandem_engine::cluster::ClusterState,
    rec: &tandem_engine::cluster::VolumeRecord,
) -> Vec<csi::Topology> {
    let domains: std::collections::BTreeSet<&str> = rec
        .replicas
        .iter()
        .map(|r| r.node)
        .chain(rec.parked.iter().copied())
        .filter_map(|n| state.nodes.get(&n).map(|n| n.domain.as_str()))
        .collect();
    domains
        .into_iter()
        .map(|d| csi::Topology {
            segments: HashMap::from([(TOPOLOGY_DOMAIN.to_string(), d.to_string())]),
        })
        .collect()
}

/// The volume as CSI describes it.
pub fn to_csi_volume(
    state: &tandem_engine::cluster::ClusterState,
    rec: &tandem_engine::cluster::VolumeRecord,
) -> csi::Volume {
    csi::Volume {
        capacity_bytes: rec.size_bytes as i64,
        volume_id: rec.name.clone(),
        volume_context: volume_context(rec),
        content_source: None,
        accessible_topology: accessible_topology(state, rec),
    }
}

/// A volume's condition: abnormal when a replica is not in sync.
pub fn condition(rec: &tandem_engine::cluster::VolumeRecord) -> csi::VolumeCondition {
    let bad: Vec<String> = rec
        .replicas
        .iter()
        .filter(|r| r.state != tandem_engine::cluster::ReplicaState::InSync)
        .map(|r| format!("replica on node {} is {}", r.node, r.state))
        .collect();
    let missing = (rec.repl as usize).saturating_sub(rec.replicas.len());
    if bad.is_empty() && missing == 0 {
        csi::VolumeCondition {
            abnormal: false,
            message: format!("all {} replicas in sync", rec.replicas.len()),
        }
    } else {
        let mut msg = bad;
        if missing > 0 {
            msg.push(format!("{missing} of {} replicas missing", rec.repl));
        }
        csi::VolumeCondition {
            abnormal: true,
            message: format!("degraded: {}", msg.join("; ")),
        }
    }
}

/// Labels recorded at creation, in a stable order.
pub fn creation_labels(csi_name: &str, p: &Params, fs: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    // Label values are at most 253 characters; a longer CSI name is only in the hash.
    if csi_name.len() <= 253 {
        labels.insert(LABEL_CSI_NAME.to_string(), csi_name.to_string());
    }
    labels.insert(LABEL_FS.to_string(), fs.to_string());
    labels.insert(LABEL_ZONES.to_string(), p.zones.join(","));
    labels.insert(LABEL_DOMAINS.to_string(), p.domains.join(","));
    labels.insert(LABEL_ASYNC_DOMAINS.to_string(), p.async_domains.join(","));
    labels
}

/// Requires a non-empty string field.
pub fn required<'a>(v: &'a str, what: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_and_reject_unknown_keys() {
        let m: HashMap<String, String> = [
            ("repl", "2"),
            ("priority_io", "high"),
            ("domains", "b, a"),
            ("fs", "XFS"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let p = parse_params(&m).unwrap();
        assert_eq!(p.repl, 2);
        assert_eq!(p.priority, IoPriority::High);
        assert_eq!(p.domains, vec!["a", "b"]);
        assert_eq!(p.fs.as_deref(), Some("xfs"));
        for (k, v) in [
            ("repl", "4"),
            ("repl", "x"),
            ("fs", "btrfs"),
            ("io_profile", "db"),
        ] {
            let m = HashMap::from([(k.to_string(), v.to_string())]);
            let e = parse_params(&m).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{k}={v}");
        }
    }

    #[test]
    fn odd_names_map_to_stable_valid_names() {
        assert_eq!(volume_name_for("pvc-1234"), "pvc-1234");
        let a = volume_name_for("name with spaces ✓");
        assert!(a.starts_with("csi-") && a.len() == 36, "{a}");
        assert_eq!(a, volume_name_for("name with spaces ✓"));
        assert!(tandem_engine::volume::validate_name(&a).is_ok());
        assert_ne!(a, volume_name_for("name with spaces"));
    }
}
