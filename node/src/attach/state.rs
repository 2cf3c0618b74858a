//! The per-volume state file, `<state_dir>/staged/<volume>.json`.
//!
//! It records what NodeStage/NodePublish asked for, so that a retry after a crash, or a
//! restarted daemon, knows what to rebuild. Every write is atomic and durable (temporary
//! file, fsync, rename, fsync of the directory): a reader sees the old or the new state,
//! never a torn one. The state is a record of *intent*; the kernel (mountinfo, sysfs) is
//! the truth about what exists, and every step re-checks it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::blockdev::{io_err, BlockdevError};

/// Format version of the state file.
pub const STATE_VERSION: u32 = 1;

/// How a volume is staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StageMode {
    /// Formatted (if blank) and mounted at the staging path.
    Filesystem {
        fs_type: String,
        mount_flags: Vec<String>,
    },
    /// A raw block device; the staging path is not used.
    Block,
}

impl std::fmt::Display for StageMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageMode::Filesystem {
                fs_type,
                mount_flags,
            } if mount_flags.is_empty() => write!(f, "{fs_type} filesystem"),
            StageMode::Filesystem {
                fs_type,
                mount_flags,
            } => write!(f, "{fs_type} filesystem ({})", mount_flags.join(",")),
            StageMode::Block => write!(f, "raw block device"),
        }
    }
}

/// One NodePublish of the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRecord {
    pub target_path: PathBuf,
    pub readonly: bool,
    pub mount_flags: Vec<String>,
    pub block: bool,
}

/// How far staging got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Steps are being done (or a crash interrupted them).
    Staging,
    /// Every step is done.
    Staged,
    /// Built by an earlier daemon process whose FUSE server is gone: must be restaged.
    Stale,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    pub version: u32,
    pub volume: String,
    pub staging_path: PathBuf,
    pub mode: StageMode,
    pub phase: Phase,
    /// The daemon process that built the current stack.
    pub pid: u32,
    pub fuse_mountpoint: PathBuf,
    /// `st_dev` of the FUSE mount, to find loop devices backed by it after its path stops
    /// resolving.
    pub fuse_dev: Option<u64>,
    pub loop_device: Option<PathBuf>,
    /// Recorded *before* the bind mount is made, so a crash cannot leave an unknown bind.
    pub publishes: Vec<PublishRecord>,
}

pub fn staged_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("staged")
}

pub fn state_path(state_dir: &Path, volume: &str) -> PathBuf {
    staged_dir(state_dir).join(format!("{volume}.json"))
}

pub fn read(state_dir: &Path, volume: &str) -> Result<Option<VolumeState>, BlockdevError> {
    let p = state_path(state_dir, volume);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("read {}", p.display()))(e)),
    };
    let st: VolumeState = serde_json::from_str(&text).map_err(|e| BlockdevError::Parse {
        what: p.display().to_string(),
        detail: e.to_string(),
    })?;
    if st.version != STATE_VERSION || st.volume != volume {
        return Err(BlockdevError::Parse {
            what: p.display().to_string(),
            detail: format!(
                "expected version {STATE_VERSION} for volume '{volume}', found version {} for '{}'",
                st.version, st.volume
            ),
        });
    }
    Ok(Some(st))
}

fn fsync_dir(dir: &Path) -> Result<(), BlockdevError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync {}", dir.display())))
}

pub fn write(state_dir: &Path, st: &VolumeState) -> Result<(), BlockdevError> {
    let dir = staged_dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let p = state_path(state_dir, &st.volume);
    let tmp = dir.join(format!(".{}.json.tmp", st.volume));
    let body = serde_json::to_vec_pretty(st).map_err(|e| BlockdevError::Parse {
        what: "volume state".into(),
        detail: e.to_string(),
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    f.write_all(&body)
        .and_then(|_| f.sync_all())
        .map_err(io_err(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &p).map_err(io_err(format!("rename to {}", p.display())))?;
    fsync_dir(&dir)
}

pub fn remove(state_dir: &Path, volume: &str) -> Result<(), BlockdevError> {
    let p = state_path(state_dir, volume);
    match std::fs::remove_file(&p) {
        Ok(()) => fsync_dir(&staged_dir(state_dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", p.display()))(e)),
    }
}

/// Volumes with a state file.
pub fn list(state_dir: &Path) -> Result<Vec<String>, BlockdevError> {
    let dir = staged_dir(state_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("list {}", dir.display()))(e)),
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".json")
                .filter(|v| !v.starts_with('.'))
                .map(String::from)
        })
        .collect();
    out.sort();
    Ok(out)
}
