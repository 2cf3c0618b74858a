//! Attaching volumes to this host for CSI NodeStage/NodePublish: the stack
//! volume → FUSE file → loop device → filesystem → staging mount → bind mounts.
//!
//! [`Attacher`] owns every FUSE export of this process and keeps these invariants:
//!
//! * **Idempotent.** Every operation checks the kernel's view (mountinfo, sysfs) first and
//!   does only the missing steps; repeating a call that succeeded is a no-op.
//! * **Only rebuild what is dead.** A FUSE mount is served by this process or by nobody:
//!   one left by an earlier `tandemd` can never be revived, and neither can the loop
//!   device, filesystem and staging mount stacked on it. [`Attacher::stage`] tears such a
//!   stack down (lazily, it may still be referenced) and builds a fresh one; pieces on a
//!   live export of this process are reused.
//! * **Never format data.** mkfs runs only on a device that blkid and a zero check call
//!   blank; a different filesystem than requested is an error.
//! * **Never leave an empty directory where a pod expects its volume.** A publish target
//!   on a dead stack stays mounted (I/O fails loudly) until [`Attacher::stage`] replaces it
//!   with a bind of the new stack, or [`Attacher::unpublish`] removes it.
//! * **Only our own mounts and loop devices.** Pieces are found from the volume's FUSE
//!   path `<state_dir>/fuse/<volume>/disk` (and its device number), and from the paths
//!   recorded in the state file ([`state`]).
//!
//! Every method blocks (it runs mount, losetup, mkfs...). From async code, call it through
//! [`Attacher::run`], which uses `spawn_blocking`. Calls for one volume are serialized.
//!
//! Layout: this file holds the types, the shared helpers, expand, stats and the start-up
//! cleanup; `stage` NodeStage and NodeUnstage; `publish` NodePublish and NodeUnpublish;
//! `blockdev` the OS plumbing; `fuse` the FUSE file; `state` the state file.

pub mod blockdev;
pub mod fuse;
mod publish;
mod stage;
pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use blockdev::{BlockdevError, FsStats};
pub use fuse::{BlockTarget, FuseExport, TargetError};
pub use state::{PublishRecord, StageMode, VolumeState};

use blockdev::{DeviceContents, LoopDevice};
use state::Phase;

/// Loop devices use direct I/O by default: measured 2.4x the IOPS of buffered loop at
/// queue depth 16 and equal or better at depth 1 (docs/csi-attach.md), because the loop
/// driver then issues asynchronous requests that FUSE keeps in flight in parallel. FUSE
/// opens are direct I/O either way, so no page cache ever holds volume bytes.
pub const DEFAULT_LOOP_DIRECT_IO: bool = true;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("volume '{volume}' is staged at {staged_at} as a {staged_mode}; cannot stage it at {requested_at} as a {requested_mode}")]
    StagedDifferently {
        volume: String,
        staged_at: String,
        staged_mode: String,
        requested_at: String,
        requested_mode: String,
    },
    #[error("volume '{0}' is not staged on this node, or its stack died with an earlier tandemd process; run NodeStageVolume again")]
    NotStaged(String),
    #[error("{target} is already published from volume '{volume}' with different options (read-only {existing_readonly})")]
    PublishedDifferently {
        volume: String,
        target: String,
        existing_readonly: bool,
    },
    #[error("{path} is already a mount of '{source_name}' ({fs_type}), not of volume '{volume}'")]
    PathBusy {
        volume: String,
        path: String,
        source_name: String,
        fs_type: String,
    },
    #[error("volume '{volume}' is still published at {targets}; unpublish it first")]
    StillPublished { volume: String, targets: String },
    #[error("{0}")]
    Busy(String),
    #[error("FUSE export of volume '{volume}': {source}")]
    Fuse {
        volume: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Blockdev(#[from] BlockdevError),
}

impl AttachError {
    /// The CSI status code for this error (CSI spec, NodeStage/NodePublish sections).
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            AttachError::InvalidArgument(_)
            | AttachError::Blockdev(BlockdevError::UnsupportedFilesystem(_)) => {
                Code::InvalidArgument
            }
            AttachError::StagedDifferently { .. } | AttachError::PublishedDifferently { .. } => {
                Code::AlreadyExists
            }
            AttachError::NotStaged(_)
            | AttachError::PathBusy { .. }
            | AttachError::StillPublished { .. }
            | AttachError::Blockdev(BlockdevError::FilesystemMismatch { .. })
            | AttachError::Blockdev(BlockdevError::NotBlank { .. }) => Code::FailedPrecondition,
            AttachError::Busy(_) => Code::Unavailable,
            AttachError::Fuse { .. } | AttachError::Blockdev(_) => Code::Internal,
        }
    }
}

pub type Result<T, E = AttachError> = std::result::Result<T, E>;

/// What NodeStageVolume asks for.
#[derive(Debug, Clone)]
pub struct StageRequest {
    pub volume: String,
    pub staging_path: PathBuf,
    pub mode: StageMode,
}

/// What NodePublishVolume asks for.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub volume: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub readonly: bool,
    /// Extra per-mount flags (`nosuid`, `noatime`...), for filesystem publishes.
    pub mount_flags: Vec<String>,
    /// Raw block: `target_path` becomes a file with the loop device bound on it.
    pub block: bool,
}

/// What [`Attacher::stage`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOutcome {
    /// `/dev/loopN` serving the volume.
    pub device: PathBuf,
    /// True if the device was formatted by this call.
    pub formatted: bool,
    /// True if a dead stack from an earlier process was torn down first.
    pub rebuilt_stale: bool,
    /// True if everything was already in place.
    pub already_staged: bool,
}

/// A volume found staged by an earlier process, by [`Attacher::cleanup_stale`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleVolume {
    pub volume: String,
    pub staging_path: PathBuf,
    pub mode: StageMode,
    pub publishes: Vec<PublishRecord>,
}

/// NodeGetVolumeStats for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeUsage {
    Filesystem(FsStats),
    Block { size_bytes: u64 },
}

/// Tunables, with defaults from the measurements in docs/csi-attach.md.
#[derive(Debug, Clone)]
pub struct AttacherOptions {
    pub loop_direct_io: bool,
}

impl Default for AttacherOptions {
    fn default() -> Self {
        AttacherOptions {
            loop_direct_io: DEFAULT_LOOP_DIRECT_IO,
        }
    }
}

/// Attaches volumes to this host. Cheap to clone.
#[derive(Clone)]
pub struct Attacher {
    inner: Arc<Inner>,
}

struct Inner {
    state_dir: PathBuf,
    rt: tokio::runtime::Handle,
    options: AttacherOptions,
    exports: Mutex<HashMap<String, FuseExport>>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(op: String) -> impl FnOnce(std::io::Error) -> AttachError {
    move |e| AttachError::Blockdev(blockdev::io_err(op)(e))
}

fn dev_name(device: &Path) -> String {
    device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `st_dev` for a `(major, minor)` from mountinfo.
fn makedev(devno: (u32, u32)) -> u64 {
    libc::makedev(devno.0, devno.1)
}

impl Attacher {
    /// `state_dir` holds the FUSE mountpoints and state files (e.g. `<data-dir>/csi`); `rt`
    /// serves FUSE requests. Does not touch existing mounts: call
    /// [`Attacher::cleanup_stale`] at daemon start.
    pub fn new(
        state_dir: &Path,
        rt: tokio::runtime::Handle,
        options: AttacherOptions,
    ) -> Result<Attacher> {
        for d in [state_dir.join("fuse"), state::staged_dir(state_dir)] {
            std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
        }
        let state_dir = state_dir
            .canonicalize()
            .map_err(io(format!("resolve {}", state_dir.display())))?;
        Ok(Attacher {
            inner: Arc::new(Inner {
                state_dir,
                rt,
                options,
                exports: Mutex::new(HashMap::new()),
                locks: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Runs a blocking method from async code: `attacher.run(move |a| a.stage(t, &req)).await`.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Attacher) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| AttachError::Busy(format!("attach task failed: {e}")))?
    }

    fn volume_lock(&self, volume: &str) -> Arc<Mutex<()>> {
        lock(&self.inner.locks)
            .entry(volume.to_string())
            .or_default()
            .clone()
    }

    fn fuse_mountpoint(&self, volume: &str) -> PathBuf {
        self.inner.state_dir.join("fuse").join(volume)
    }

    fn fuse_file(&self, volume: &str) -> PathBuf {
        self.fuse_mountpoint(volume).join(fuse::DISK_FILE_NAME)
    }

    /// True if this process serves the volume's FUSE export and it answers.
    fn has_live_export(&self, volume: &str) -> bool {
        lock(&self.inner.exports)
            .get(volume)
            .is_some_and(|e| e.is_healthy())
    }

    /// The loop devices backed by the volume's FUSE file: found by path, and by the FUSE
    /// mount's device number (recorded, or read from mountinfo). Last resort, for a FUSE
    /// mount someone detached lazily before its loop device (the kernel then prints the
    /// backing file as `/disk`): the loop device recorded in the state file.
    fn volume_loops(&self, volume: &str, st: Option<&VolumeState>) -> Result<Vec<LoopDevice>> {
        let mut devs: Vec<u64> = st.and_then(|s| s.fuse_dev).into_iter().collect();
        if let Some(e) = lock(&self.inner.exports).get(volume) {
            devs.push(e.dev());
        }
        let mp = self.fuse_mountpoint(volume);
        for m in blockdev::mountinfo()? {
            if m.mount_point == mp && m.fs_type.starts_with("fuse") {
                devs.push(makedev(m.devno));
            }
        }
        let file = self.fuse_file(volume);
        let detached_file = Path::new("/").join(fuse::DISK_FILE_NAME);
        let recorded = st.and_then(|s| s.loop_device.clone());
        Ok(blockdev::loop_list()?
            .into_iter()
            .filter(|l| {
                l.backing_file == file
                    || l.backing_dev_ino.is_some_and(|(d, _)| devs.contains(&d))
                    || (l.backing_file == detached_file && recorded.as_ref() == Some(&l.device))
            })
            .collect())
    }

    fn validate(volume: &str) -> Result<()> {
        tandem_engine::volume::validate_name(volume)
            .map_err(|e| AttachError::InvalidArgument(e.to_string()))
    }

    // -----------------------------------------------------------------------------------
    // NodeExpandVolume, NodeGetVolumeStats
    // -----------------------------------------------------------------------------------

    /// After the volume grew in the engine: the FUSE file, the loop device(s) and the
    /// filesystem follow. Returns the new device size in bytes. Repeating it is harmless.
    pub fn expand(&self, volume: &str) -> Result<u64> {
        Self::validate(volume)?;
        let vl = self.volume_lock(volume);
        let _g = lock(&vl);
        let st = state::read(&self.inner.state_dir, volume)?
            .ok_or_else(|| AttachError::NotStaged(volume.into()))?;
        {
            let exports = lock(&self.inner.exports);
            let export = exports
                .get(volume)
                .filter(|e| e.is_healthy())
                .ok_or_else(|| AttachError::NotStaged(volume.into()))?;
            export.refresh_size().map_err(|source| AttachError::Fuse {
                volume: volume.into(),
                source,
            })?;
        }
        let device = st
            .loop_device
            .clone()
            .ok_or_else(|| AttachError::NotStaged(volume.into()))?;
        for l in self.volume_loops(volume, Some(&st))? {
            blockdev::loop_refresh_capacity(&l.device)?;
        }
        if let StageMode::Filesystem { fs_type, .. } = &st.mode {
            blockdev::grow_fs(&device, &st.staging_path, fs_type)?;
        }
        Ok(blockdev::block_size_bytes(&device)?)
    }

    /// Usage of a published (or staged) path: filesystem counters, or the size of a raw
    /// block target.
    pub fn stats(path: &Path) -> Result<VolumeUsage> {
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::metadata(path).map_err(io(format!("stat {}", path.display())))?;
        if m.file_type().is_block_device() {
            return Ok(VolumeUsage::Block {
                size_bytes: blockdev::block_size_bytes(path)?,
            });
        }
        Ok(VolumeUsage::Filesystem(blockdev::statfs(path)?))
    }

    /// `None` if the volume's stack is healthy, else why not (for CSI VolumeCondition).
    pub fn condition(&self, volume: &str) -> Option<String> {
        if self.has_live_export(volume) {
            None
        } else {
            Some(format!(
                "volume '{volume}' has no live FUSE export on this node (tandemd restarted or the volume is unstaged); NodeStageVolume must run again and pods using it must be restarted"
            ))
        }
    }

    /// The staging request recorded for `volume`, so a caller can restage it.
    pub fn recorded(&self, volume: &str) -> Result<Option<StaleVolume>> {
        Ok(
            state::read(&self.inner.state_dir, volume)?.map(|s| StaleVolume {
                volume: s.volume,
                staging_path: s.staging_path,
                mode: s.mode,
                publishes: s.publishes,
            }),
        )
    }

    // -----------------------------------------------------------------------------------
    // Daemon start
    // -----------------------------------------------------------------------------------

    /// Tears down every stack this process does not serve: dead FUSE mounts under
    /// `<state_dir>/fuse`, the loop devices on them, staging mounts on those. Recorded
    /// publish targets are left mounted (dead: I/O fails) so that no pod writes into an
    /// empty directory; state files are kept, marked stale. Returns those volumes, so the
    /// daemon can attach and [`Attacher::stage`] them again (which re-binds the targets),
    /// or leave them for kubelet's NodeUnpublish/NodeUnstage.
    pub fn cleanup_stale(&self) -> Result<Vec<StaleVolume>> {
        let sd = self.inner.state_dir.clone();
        let mut volumes = state::list(&sd)?;
        if let Ok(entries) = std::fs::read_dir(sd.join("fuse")) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !volumes.contains(&n) {
                    volumes.push(n);
                }
            }
        }
        let mut stale = Vec::new();
        for volume in volumes {
            if Self::validate(&volume).is_err() {
                continue;
            }
            let vl = self.volume_lock(&volume);
            let _g = lock(&vl);
            if self.has_live_export(&volume) {
                continue;
            }
            let st = state::read(&sd, &volume)?;
            self.teardown(&volume, st.as_ref(), true, true)?;
            let _ = std::fs::remove_dir(self.fuse_mountpoint(&volume));
            if let Some(mut s) = st {
                if s.phase != Phase::Stale {
                    s.phase = Phase::Stale;
                    state::write(&sd, &s)?;
                }
                stale.push(StaleVolume {
                    volume: s.volume,
                    staging_path: s.staging_path,
                    mode: s.mode,
                    publishes: s.publishes,
                });
            }
        }
        Ok(stale)
    }

    /// Unmounts every export this process serves. Exports still held by a loop device
    /// are detached lazily after a few seconds each (see [`FuseExport::unmount`]); the
    /// stacks on them stay recorded and are dead until restaged, as after a crash. At
    /// daemon exit this is optional: the kernel aborts the connections anyway.
    pub fn shutdown(&self) {
        let exports: Vec<(String, FuseExport)> = lock(&self.inner.exports).drain().collect();
        for (volume, e) in exports {
            if let Err(err) = e.unmount() {
                tracing::warn!(volume, error = %err, "FUSE unmount at shutdown failed");
            }
        }
    }
}
