//! Node-local metadata: who this node is in its cluster, and the small enums shared by the
//! replicated state and the APIs.
//!
//! Everything else (volumes, replica sets, generations) is replicated cluster metadata; see
//! [`crate::cluster`]. The local identity lives in the sled tree `local` of the node's
//! metadata database and is flushed before it is used.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Sled(#[from] sled::Error),
    #[error("metadata record '{key}' is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
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

/// Who this node is: its raft id and name, its cluster and the cluster's join token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalIdentity {
    pub node_id: u64,
    pub name: String,
    pub cluster_id: String,
    pub token: String,
}

const IDENTITY_KEY: &str = "identity";

/// Reads the identity, if this node has one.
pub fn load_identity(db: &sled::Db) -> Result<Option<LocalIdentity>> {
    let tree = db.open_tree("local")?;
    match tree.get(IDENTITY_KEY)? {
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| MetaError::Corrupt {
                key: IDENTITY_KEY.into(),
                reason: e.to_string(),
            }),
        None => Ok(None),
    }
}

/// Stores the identity durably.
pub fn save_identity(db: &sled::Db, id: &LocalIdentity) -> Result<()> {
    let tree = db.open_tree("local")?;
    tree.insert(
        IDENTITY_KEY,
        serde_json::to_vec(id).expect("identity serializes"),
    )?;
    db.flush()?;
    Ok(())
}

/// A random hex string of `bytes` bytes from the OS generator.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        // No OS randomness: fall back to the clock and pid, still unique per node.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((nanos >> (8 * (i % 16))) as u8)
                ^ (std::process::id() as u8).wrapping_mul(i as u8);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = LocalIdentity {
            node_id: 3,
            name: "node-x".into(),
            cluster_id: "c".into(),
            token: random_hex(16),
        };
        {
            let db = sled::open(dir.path()).unwrap();
            assert_eq!(load_identity(&db).unwrap(), None);
            save_identity(&db, &id).unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(load_identity(&db).unwrap(), Some(id));
        assert_eq!(random_hex(16).len(), 32);
    }
}
