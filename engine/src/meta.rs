//! Node metadata: the records the rest of the engine reads and writes through
//! [`MetaStore`], and their sled implementation.
//!
//! Every mutation is flushed (fsync) before it returns, so an acknowledged control-plane
//! change survives `kill -9`. The cluster issue replaces the single-node store with a raft
//! state machine behind the same trait.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Sled(#[from] sled::Error),
    #[error("metadata record '{key}' is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("volume '{0}' already exists")]
    VolumeExists(String),
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoPriority {
    Low,
    #[default]
    Medium,
    High,
}

impl std::str::FromStr for IoPriority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(IoPriority::Low),
            "medium" => Ok(IoPriority::Medium),
            "high" => Ok(IoPriority::High),
            other => Err(format!(
                "invalid I/O priority '{other}': expected high, medium or low"
            )),
        }
    }
}

impl std::fmt::Display for IoPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoPriority::Low => "low",
            IoPriority::Medium => "medium",
            IoPriority::High => "high",
        })
    }
}

/// A volume as the metadata knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub repl: u32,
    pub io_priority: IoPriority,
    pub labels: BTreeMap<String, String>,
    pub created_unix_seconds: u64,
    /// Bumped by every attach; replicas fence I/O by it.
    pub generation: u64,
    /// The node the volume is attached on (its coordinator).
    pub attached_node: Option<String>,
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_id: String,
    pub cluster_id: String,
}

/// The metadata the engine needs. Implementations make each mutation durable before
/// returning.
pub trait MetaStore: Send + Sync {
    /// This node's identity, created on first use.
    fn identity(&self) -> Result<NodeIdentity>;
    fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>>;
    fn list_volumes(&self) -> Result<Vec<VolumeRecord>>;
    /// Inserts a new volume; fails with [`MetaError::VolumeExists`] if the name is taken.
    fn create_volume(&self, rec: &VolumeRecord) -> Result<()>;
    /// Replaces an existing volume record.
    fn put_volume(&self, rec: &VolumeRecord) -> Result<()>;
    fn delete_volume(&self, name: &str) -> Result<()>;
    /// A new unique id (monotonic, never reused).
    fn next_id(&self) -> Result<u64>;
}

/// [`MetaStore`] on a sled database.
pub struct SledMeta {
    db: sled::Db,
    volumes: sled::Tree,
}

impl SledMeta {
    pub fn open(path: &Path) -> Result<SledMeta> {
        let db = sled::open(path)?;
        let volumes = db.open_tree("volumes")?;
        Ok(SledMeta { db, volumes })
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| MetaError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_vec(v).expect("metadata records serialize")
}

/// A random-enough id from the clock and the process, for node and cluster ids.
fn fresh_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mix = crc32fast::hash(&(nanos ^ std::process::id() as u128).to_le_bytes());
    format!("{:08x}{:08x}", (nanos as u64) as u32, mix)
}

impl MetaStore for SledMeta {
    fn identity(&self) -> Result<NodeIdentity> {
        if let Some(v) = self.db.get("identity")? {
            return decode("identity", &v);
        }
        let id = NodeIdentity {
            node_id: format!("node-{}", fresh_id()),
            cluster_id: fresh_id(),
        };
        self.db.insert("identity", encode(&id))?;
        self.db.flush()?;
        Ok(id)
    }

    fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>> {
        self.volumes
            .get(name)?
            .map(|v| decode(name, &v))
            .transpose()
    }

    fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.volumes
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    fn create_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let res =
            self.volumes
                .compare_and_swap(&rec.name, None as Option<&[u8]>, Some(encode(rec)))?;
        if res.is_err() {
            return Err(MetaError::VolumeExists(rec.name.clone()));
        }
        self.db.flush()?;
        Ok(())
    }

    fn put_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.volumes.insert(&rec.name, encode(rec))?;
        self.db.flush()?;
        Ok(())
    }

    fn delete_volume(&self, name: &str) -> Result<()> {
        self.volumes.remove(name)?;
        self.db.flush()?;
        Ok(())
    }

    fn next_id(&self) -> Result<u64> {
        let id = self.db.generate_id()?;
        self.db.flush()?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let rec = VolumeRecord {
            id: "1".into(),
            name: "db".into(),
            size_bytes: 1 << 30,
            repl: 1,
            io_priority: IoPriority::High,
            labels: [("app".to_string(), "pg".to_string())].into(),
            created_unix_seconds: 1,
            generation: 3,
            attached_node: Some("n1".into()),
        };
        let ident = {
            let m = SledMeta::open(dir.path()).unwrap();
            m.create_volume(&rec).unwrap();
            assert!(matches!(
                m.create_volume(&rec),
                Err(MetaError::VolumeExists(_))
            ));
            m.identity().unwrap()
        };
        let m = SledMeta::open(dir.path()).unwrap();
        assert_eq!(m.identity().unwrap(), ident);
        assert_eq!(m.get_volume("db").unwrap(), Some(rec));
        m.delete_volume("db").unwrap();
        assert!(m.list_volumes().unwrap().is_empty());
    }
}
