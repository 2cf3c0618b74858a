//! The volume manager: validates requests, keeps metadata and replicas in step, and hands
//! frontends an [`AttachedVolume`] to send I/O to.
//!
//! Invariants:
//! * A volume's metadata record exists before its replica files, and is removed after them,
//!   so a crash between the two leaves at worst orphaned files, never a record without data.
//! * I/O reaches a replica only through an [`AttachedVolume`]. Detach closes its gate and
//!   waits for in-flight I/O, then flushes, so nothing is in flight once detach returns.
//! * Every attach bumps the generation in the metadata before I/O is served.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::meta::{IoPriority, MetaError, MetaStore, NodeIdentity, VolumeRecord};
use crate::store::{Pool, Replica, StoreError, BLOCK_SIZE};

/// Largest volume: 64 TiB. Checksum tables for a fully written volume of this size take
/// 64 MiB of memory; larger volumes need the layered store.
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Longest volume name. CSI volume names from Kubernetes (`pvc-<uuid>`) are 40 characters.
pub const MAX_NAME_LEN: usize = 128;
/// Highest replication factor accepted (as in Portworx).
pub const MAX_REPL: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("volume '{0}' not found")]
    NotFound(String),
    #[error("volume '{0}' already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("volume '{0}' is not attached on this node")]
    NotAttached(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Meta(MetaError),
}

impl From<MetaError> for VolumeError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::VolumeExists(name) => VolumeError::AlreadyExists(name),
            other => VolumeError::Meta(other),
        }
    }
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Checks a volume name: 1 to 128 characters of `[A-Za-z0-9._-]`, starting with a letter
/// or digit (so it is safe as a file name, an NBD export name and a Kubernetes label).
pub fn validate_name(name: &str) -> Result<()> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_start || !ok_chars {
        return Err(VolumeError::InvalidArgument(format!(
            "invalid volume name '{name}': use 1 to {MAX_NAME_LEN} characters of letters, digits, '.', '_' and '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks a volume size: positive, a multiple of 4 KiB, at most [`MAX_VOLUME_BYTES`].
pub fn validate_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 {
        return Err(VolumeError::InvalidArgument(
            "invalid size: a volume needs a size greater than 0".into(),
        ));
    }
    if !size_bytes.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(VolumeError::InvalidArgument(format!(
            "invalid size {size_bytes} bytes: sizes must be a multiple of 4 KiB (4096 bytes)"
        )));
    }
    if size_bytes > MAX_VOLUME_BYTES {
        return Err(VolumeError::InvalidArgument(format!(
            "invalid size {size_bytes} bytes: the largest volume is 64 TiB"
        )));
    }
    Ok(())
}

/// What a caller asks for when creating a volume.
#[derive(Debug, Clone, Default)]
pub struct CreateSpec {
    pub name: String,
    pub size_bytes: u64,
    /// 0 means the default, 1.
    pub repl: u32,
    pub io_priority: IoPriority,
    pub labels: BTreeMap<String, String>,
}

/// What a caller asks to change; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct UpdateSpec {
    pub size_bytes: Option<u64>,
    pub repl: Option<u32>,
    pub io_priority: Option<IoPriority>,
}

/// A volume with its live numbers, for listing and inspection.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub allocated_bytes: u64,
    pub checksum_errors: u64,
}

/// A volume attached on this node: the coordinator that frontends send I/O to.
pub struct AttachedVolume {
    record: VolumeRecord,
    replica: Arc<Replica>,
    /// `true` while open. I/O holds a read guard; detach takes the write guard, which waits
    /// for every in-flight request.
    gate: tokio::sync::RwLock<bool>,
}

impl AttachedVolume {
    pub fn name(&self) -> &str {
        &self.record.name
    }

    pub fn generation(&self) -> u64 {
        self.record.generation
    }

    pub async fn size_bytes(&self) -> u64 {
        self.replica.size_bytes().await
    }

    pub fn checksum_errors(&self) -> u64 {
        self.replica.checksum_errors()
    }

    fn detached(&self) -> VolumeError {
        VolumeError::NotAttached(self.record.name.clone())
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let open = self.gate.read().await;
        if !*open {
            return Err(self.detached());
        }
        Ok(self.replica.read(offset, len).await?)
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        let open = self.gate.read().await;
        if !*open {
            return Err(self.detached());
        }
        Ok(self.replica.write(offset, data, fua).await?)
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let open = self.gate.read().await;
        if !*open {
            return Err(self.detached());
        }
        Ok(self.replica.write_zeroes(offset, len, fua).await?)
    }

    pub async fn flush(&self) -> Result<()> {
        let open = self.gate.read().await;
        if !*open {
            return Err(self.detached());
        }
        Ok(self.replica.flush().await?)
    }

    /// Closes the gate, waits for in-flight I/O and makes everything durable.
    async fn close(&self) -> Result<()> {
        let mut open = self.gate.write().await;
        if !*open {
            return Ok(());
        }
        *open = false;
        self.replica.close().await?;
        Ok(())
    }

    pub async fn is_open(&self) -> bool {
        *self.gate.read().await
    }
}

/// Owns every volume of this node.
pub struct VolumeManager {
    meta: Arc<dyn MetaStore>,
    pool: Arc<Pool>,
    identity: NodeIdentity,
    /// Storage nodes in the cluster. One until the cluster layer exists.
    storage_nodes: u32,
    replicas: tokio::sync::Mutex<HashMap<String, Arc<Replica>>>,
    attached: std::sync::RwLock<HashMap<String, Arc<AttachedVolume>>>,
    /// Serializes control operations so validation and effect cannot race.
    ops: tokio::sync::Mutex<()>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl VolumeManager {
    /// Opens every volume's replica (recovering after a crash) and re-attaches the volumes
    /// that were attached on this node, each at a new generation.
    pub async fn open(meta: Arc<dyn MetaStore>, pool: Arc<Pool>) -> Result<Arc<VolumeManager>> {
        let identity = meta.identity()?;
        let mgr = Arc::new(VolumeManager {
            meta,
            pool,
            identity,
            storage_nodes: 1,
            replicas: tokio::sync::Mutex::new(HashMap::new()),
            attached: std::sync::RwLock::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
        });
        for rec in mgr.meta.list_volumes()? {
            let replica = mgr
                .pool
                .open_replica(&rec.id, &rec.name, rec.size_bytes)
                .await?;
            mgr.replicas.lock().await.insert(rec.name.clone(), replica);
            if rec.attached_node.as_deref() == Some(mgr.identity.node_id.as_str()) {
                mgr.attach_locked(&rec.name).await?;
            }
        }
        Ok(mgr)
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn record(&self, name: &str) -> Result<VolumeRecord> {
        self.meta
            .get_volume(name)?
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))
    }

    fn check_repl(&self, repl: u32) -> Result<()> {
        if repl == 0 || repl > MAX_REPL {
            return Err(VolumeError::InvalidArgument(format!(
                "invalid replication factor {repl}: it must be between 1 and {MAX_REPL}"
            )));
        }
        if repl > self.storage_nodes {
            return Err(VolumeError::FailedPrecondition(format!(
                "replication factor {repl} needs {repl} storage nodes, but this cluster has {} (node {}); every replica must be on a different node",
                self.storage_nodes, self.identity.node_id
            )));
        }
        Ok(())
    }

    pub async fn create(&self, spec: CreateSpec) -> Result<VolumeInfo> {
        validate_name(&spec.name)?;
        validate_size(spec.size_bytes)?;
        let repl = if spec.repl == 0 { 1 } else { spec.repl };
        self.check_repl(repl)?;
        for (k, v) in &spec.labels {
            if k.is_empty() || k.len() > 253 || v.len() > 253 || k.contains('=') {
                return Err(VolumeError::InvalidArgument(format!(
                    "invalid label '{k}={v}': keys are 1 to 253 characters without '=', values at most 253"
                )));
            }
        }
        let _op = self.ops.lock().await;
        if self.meta.get_volume(&spec.name)?.is_some() {
            return Err(VolumeError::AlreadyExists(spec.name));
        }
        let rec = VolumeRecord {
            // Unique within the cluster and across clusters in practice: the cluster id's
            // hash, then a counter that is never reused.
            id: format!(
                "{:08x}{:08x}",
                crc32fast::hash(self.identity.cluster_id.as_bytes()),
                self.meta.next_id()?
            ),
            name: spec.name.clone(),
            size_bytes: spec.size_bytes,
            repl,
            io_priority: spec.io_priority,
            labels: spec.labels,
            created_unix_seconds: now_unix(),
            generation: 0,
            attached_node: None,
        };
        self.meta.create_volume(&rec)?;
        let replica = match self
            .pool
            .open_replica(&rec.id, &rec.name, rec.size_bytes)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // Roll back the record so the name is free again.
                let _ = self.meta.delete_volume(&rec.name);
                return Err(e.into());
            }
        };
        self.replicas
            .lock()
            .await
            .insert(rec.name.clone(), replica.clone());
        tracing::info!(volume = %rec.name, id = %rec.id, size_bytes = rec.size_bytes, "volume created");
        Ok(VolumeInfo {
            allocated_bytes: replica.allocated_bytes(),
            checksum_errors: 0,
            record: rec,
        })
    }

    async fn info(&self, record: VolumeRecord) -> VolumeInfo {
        let replica = self.replicas.lock().await.get(&record.name).cloned();
        VolumeInfo {
            allocated_bytes: replica.as_ref().map_or(0, |r| r.allocated_bytes()),
            checksum_errors: replica.as_ref().map_or(0, |r| r.checksum_errors()),
            record,
        }
    }

    pub async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for rec in self.meta.list_volumes()? {
            out.push(self.info(rec).await);
        }
        Ok(out)
    }

    pub async fn inspect(&self, name: &str) -> Result<VolumeInfo> {
        let rec = self.record(name)?;
        Ok(self.info(rec).await)
    }

    pub async fn update(&self, name: &str, spec: UpdateSpec) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let mut rec = self.record(name)?;
        if let Some(size) = spec.size_bytes {
            validate_size(size)?;
            if size < rec.size_bytes {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is {} bytes; cannot shrink it to {size} bytes (volumes only grow)",
                    rec.size_bytes
                )));
            }
        }
        if let Some(repl) = spec.repl {
            self.check_repl(repl)?;
        }
        if let Some(size) = spec.size_bytes {
            if size > rec.size_bytes {
                let replica = self.replicas.lock().await.get(name).cloned();
                if let Some(r) = replica {
                    r.resize(size).await?;
                }
                rec.size_bytes = size;
            }
        }
        if let Some(repl) = spec.repl {
            rec.repl = repl;
        }
        if let Some(p) = spec.io_priority {
            rec.io_priority = p;
        }
        self.meta.put_volume(&rec)?;
        Ok(self.info(rec).await)
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        let _op = self.ops.lock().await;
        let rec = self.record(name)?;
        if let Some(node) = &rec.attached_node {
            if !force {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is attached on node {node}; detach it first, or delete with --force"
                )));
            }
            self.detach_locked(name).await?;
        }
        let replica = self.replicas.lock().await.remove(name);
        if let Some(r) = replica {
            self.pool
                .delete_replica(&r)
                .map_err(|source| StoreError::Io {
                    volume: name.to_string(),
                    op: "delete replica files",
                    source,
                })?;
        }
        self.meta.delete_volume(name)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Attaches a volume here. Attaching an already attached volume is a no-op.
    pub async fn attach(&self, name: &str) -> Result<Arc<AttachedVolume>> {
        let _op = self.ops.lock().await;
        self.attach_locked(name).await
    }

    async fn attach_locked(&self, name: &str) -> Result<Arc<AttachedVolume>> {
        if let Some(v) = self.attached_get(name) {
            return Ok(v);
        }
        let mut rec = self.record(name)?;
        if let Some(node) = &rec.attached_node {
            if node != &self.identity.node_id {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume '{name}' is attached on node {node}; detach it there first"
                )));
            }
        }
        let replica = self
            .replicas
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        rec.generation += 1;
        rec.attached_node = Some(self.identity.node_id.clone());
        self.meta.put_volume(&rec)?;
        let vol = Arc::new(AttachedVolume {
            record: rec,
            replica,
            gate: tokio::sync::RwLock::new(true),
        });
        self.attached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), vol.clone());
        tracing::info!(volume = %name, generation = vol.generation(), "volume attached");
        Ok(vol)
    }

    /// Detaches a volume: drains its I/O, flushes it and records it detached. Detaching a
    /// detached volume is a no-op.
    pub async fn detach(&self, name: &str) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        self.detach_locked(name).await?;
        self.inspect(name).await
    }

    async fn detach_locked(&self, name: &str) -> Result<()> {
        let mut rec = self.record(name)?;
        let vol = self
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(v) = vol {
            v.close().await?;
        }
        if rec.attached_node.is_some() {
            rec.attached_node = None;
            self.meta.put_volume(&rec)?;
            tracing::info!(volume = %name, "volume detached");
        }
        Ok(())
    }

    fn attached_get(&self, name: &str) -> Option<Arc<AttachedVolume>> {
        self.attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The attached volume a frontend asks for by name.
    pub fn attached(&self, name: &str) -> Result<Arc<AttachedVolume>> {
        match self.attached_get(name) {
            Some(v) => Ok(v),
            None => {
                self.record(name)?;
                Err(VolumeError::NotAttached(name.to_string()))
            }
        }
    }

    /// Names of the volumes attached here.
    pub fn attached_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Sum of the sizes of all volumes (thin provisioning lets this exceed the pool).
    pub fn provisioned_bytes(&self) -> Result<u64> {
        Ok(self.meta.list_volumes()?.iter().map(|r| r.size_bytes).sum())
    }

    /// Clean shutdown: drains and flushes every attached volume and checkpoints every
    /// replica. Attachments stay recorded, so a restart serves the same volumes.
    pub async fn shutdown(&self) {
        let _op = self.ops.lock().await;
        let attached: Vec<_> = self
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (name, v) in attached {
            if let Err(e) = v.close().await {
                tracing::error!(volume = %name, error = %e, "closing volume at shutdown failed");
            }
        }
        for (name, r) in self.replicas.lock().await.iter() {
            if let Err(e) = r.close().await {
                tracing::error!(volume = %name, error = %e, "checkpointing replica at shutdown failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoEngine;
    use crate::meta::SledMeta;

    async fn manager(dir: &std::path::Path, pool_bytes: u64) -> Arc<VolumeManager> {
        let meta = Arc::new(SledMeta::open(&dir.join("meta")).unwrap());
        let pool = Pool::open(&dir.join("pool"), pool_bytes, IoEngine::Std).unwrap();
        VolumeManager::open(meta, pool).await.unwrap()
    }

    fn spec(name: &str, size: u64) -> CreateSpec {
        CreateSpec {
            name: name.into(),
            size_bytes: size,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn lifecycle_validates_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = manager(dir.path(), 1 << 30).await;
        mgr.create(spec("v1", 1 << 20)).await.unwrap();
        assert!(matches!(
            mgr.create(spec("v1", 1 << 20)).await,
            Err(VolumeError::AlreadyExists(_))
        ));
        assert!(matches!(
            mgr.create(spec("bad name", 1 << 20)).await,
            Err(VolumeError::InvalidArgument(_))
        ));
        assert!(matches!(
            mgr.create(spec("odd", 1000)).await,
            Err(VolumeError::InvalidArgument(_))
        ));
        let mut rf2 = spec("rf2", 1 << 20);
        rf2.repl = 2;
        let err = mgr.create(rf2).await.unwrap_err();
        assert!(
            matches!(&err, VolumeError::FailedPrecondition(m) if m.contains("needs 2 storage nodes")),
            "{err}"
        );
        let v = mgr.attach("v1").await.unwrap();
        assert_eq!(v.generation(), 1);
        v.write(0, vec![7; 4096], true).await.unwrap();
        assert!(matches!(
            mgr.delete("v1", false).await,
            Err(VolumeError::FailedPrecondition(_))
        ));
        assert!(matches!(
            mgr.update(
                "v1",
                UpdateSpec {
                    size_bytes: Some(4096),
                    ..Default::default()
                }
            )
            .await,
            Err(VolumeError::FailedPrecondition(_))
        ));
        mgr.update(
            "v1",
            UpdateSpec {
                size_bytes: Some(2 << 20),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        mgr.shutdown().await;
        drop(v);
        drop(mgr);

        let mgr = manager(dir.path(), 1 << 30).await;
        let v = mgr.attached("v1").expect("attachment survives restart");
        assert_eq!(v.generation(), 2, "re-attach bumps the generation");
        assert_eq!(v.size_bytes().await, 2 << 20);
        assert_eq!(v.read(0, 4096).await.unwrap(), vec![7; 4096]);
        mgr.detach("v1").await.unwrap();
        assert!(matches!(
            v.read(0, 4096).await,
            Err(VolumeError::NotAttached(_))
        ));
        mgr.detach("v1").await.expect("detach is idempotent");
        mgr.delete("v1", false).await.unwrap();
        assert!(matches!(
            mgr.inspect("v1").await,
            Err(VolumeError::NotFound(_))
        ));
        assert_eq!(
            mgr.pool().allocated_bytes(),
            0,
            "delete returns space to the pool"
        );
    }
}
