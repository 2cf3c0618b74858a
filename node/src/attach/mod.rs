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

pub mod blockdev;
pub mod fuse;
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
    // NodeStageVolume
    // -----------------------------------------------------------------------------------

    /// Stages `target` (an attached volume): FUSE file, loop device, and for
    /// [`StageMode::Filesystem`] mkfs-if-blank and a mount at the staging path. Repairs a
    /// stack left dead by an earlier process, and re-binds its recorded publish targets.
    pub fn stage(&self, target: Arc<dyn BlockTarget>, req: &StageRequest) -> Result<StageOutcome> {
        Self::validate(&req.volume)?;
        if let StageMode::Filesystem { fs_type, .. } = &req.mode {
            blockdev::check_fs_type(fs_type)?;
        }
        let volume = req.volume.as_str();
        let vl = self.volume_lock(volume);
        let _g = lock(&vl);
        let staging = blockdev::normalize(&req.staging_path);
        let sd = &self.inner.state_dir;

        let mut existing = state::read(sd, volume)?;
        let live = self.has_live_export(volume);
        if let Some(st) = existing.as_mut() {
            let differs = st.staging_path != staging || st.mode != req.mode;
            if differs && !live {
                // The recorded stack is dead anyway: replace it. Its publishes can follow
                // only if the mode is the same.
                tracing::warn!(
                    volume,
                    "stage: replacing a dead stack staged with other parameters"
                );
                let keep = st.mode == req.mode;
                self.teardown(volume, Some(st), true, keep)?;
                if !keep {
                    for p in &st.publishes {
                        for _ in 0..16 {
                            if blockdev::mount_at(&p.target_path)?.is_none() {
                                break;
                            }
                            blockdev::umount(&p.target_path, true)?;
                        }
                    }
                    st.publishes.clear();
                }
                st.staging_path = staging.clone();
                st.mode = req.mode.clone();
            } else if differs {
                return Err(AttachError::StagedDifferently {
                    volume: volume.into(),
                    staged_at: st.staging_path.display().to_string(),
                    staged_mode: st.mode.to_string(),
                    requested_at: staging.display().to_string(),
                    requested_mode: req.mode.to_string(),
                });
            }
        }
        let publishes = existing
            .as_ref()
            .map(|s| s.publishes.clone())
            .unwrap_or_default();

        // 1. The FUSE export: reuse ours if it is alive, otherwise everything for this
        //    volume is dead (or half-built) and is torn down first.
        let mut rebuilt_stale = false;
        let mut already = live;
        if already {
            let exports = lock(&self.inner.exports);
            if let Some(e) = exports.get(volume) {
                if !e.serves(&target) {
                    tracing::info!(volume, "stage: serving a newly attached volume object");
                    e.set_target(target.clone());
                }
            }
        } else {
            let found = self.teardown(volume, existing.as_ref(), true, true)?;
            rebuilt_stale = found;
            if found {
                tracing::warn!(
                    volume,
                    "stage: tore down a dead stack left by an earlier process or failed attempt"
                );
            }
        }
        let mut st = VolumeState {
            version: state::STATE_VERSION,
            volume: volume.into(),
            staging_path: staging.clone(),
            mode: req.mode.clone(),
            phase: Phase::Staging,
            pid: std::process::id(),
            fuse_mountpoint: self.fuse_mountpoint(volume),
            fuse_dev: existing.as_ref().and_then(|s| s.fuse_dev),
            loop_device: existing.as_ref().and_then(|s| s.loop_device.clone()),
            publishes: publishes.clone(),
        };
        if !already {
            st.fuse_dev = None;
            st.loop_device = None;
            state::write(sd, &st)?;
            let mp = self.fuse_mountpoint(volume);
            std::fs::create_dir_all(&mp).map_err(io(format!("create {}", mp.display())))?;
            let export = FuseExport::mount(target.clone(), &mp, self.inner.rt.clone()).map_err(
                |source| AttachError::Fuse {
                    volume: volume.into(),
                    source,
                },
            )?;
            st.fuse_dev = Some(export.dev());
            lock(&self.inner.exports).insert(volume.to_string(), export);
            state::write(sd, &st)?;
        }

        // 2. The loop device.
        let loops = self.volume_loops(volume, Some(&st))?;
        // Read-only loops belong to read-only raw block publishes.
        let rw_loops: Vec<&LoopDevice> = loops.iter().filter(|l| !l.readonly).collect();
        let device = match rw_loops.as_slice() {
            [] => {
                already = false;
                blockdev::loop_attach(&self.fuse_file(volume), self.inner.options.loop_direct_io)?
            }
            [one] => one.device.clone(),
            many => {
                // More than one (should not happen): keep the recorded one, or the first.
                let keep = many
                    .iter()
                    .find(|l| Some(&l.device) == st.loop_device.as_ref())
                    .unwrap_or(&many[0]);
                keep.device.clone()
            }
        };
        if st.loop_device.as_ref() != Some(&device) {
            st.loop_device = Some(device.clone());
            state::write(sd, &st)?;
        }
        let devno = blockdev::block_devno(&device)?;

        // 3. Filesystem: format if blank, mount at the staging path.
        let mut formatted = false;
        if let StageMode::Filesystem {
            fs_type,
            mount_flags,
        } = &req.mode
        {
            match blockdev::mount_at(&staging)? {
                Some(m) if m.devno == devno => {}
                Some(m) => {
                    return Err(AttachError::PathBusy {
                        volume: volume.into(),
                        path: staging.display().to_string(),
                        source_name: m.source,
                        fs_type: m.fs_type,
                    })
                }
                None => {
                    already = false;
                    match blockdev::device_contents(&device)? {
                        DeviceContents::Blank => {
                            tracing::info!(volume, fs_type, device = %device.display(), "stage: formatting blank volume");
                            blockdev::mkfs(&device, fs_type)?;
                            formatted = true;
                        }
                        DeviceContents::Filesystem(found) if &found == fs_type => {}
                        DeviceContents::Filesystem(found) => {
                            return Err(BlockdevError::FilesystemMismatch {
                                device: format!("volume '{volume}' ({})", device.display()),
                                found,
                                wanted: fs_type.clone(),
                            }
                            .into())
                        }
                        DeviceContents::Unknown => {
                            return Err(BlockdevError::NotBlank {
                                device: format!("volume '{volume}' ({})", device.display()),
                                found: "unrecognized non-zero data".into(),
                            }
                            .into())
                        }
                    }
                    std::fs::create_dir_all(&staging)
                        .map_err(io(format!("create {}", staging.display())))?;
                    blockdev::mount(&device, &staging, fs_type, mount_flags)?;
                }
            }
        }

        // 4. Publish targets recorded by an earlier stack: bind the new one over them.
        for p in &publishes {
            self.republish(&mut st, p, devno, &device)?;
        }

        if st.phase != Phase::Staged || st.publishes != publishes {
            st.phase = Phase::Staged;
            state::write(sd, &st)?;
        }
        Ok(StageOutcome {
            device,
            formatted,
            rebuilt_stale,
            already_staged: already,
        })
    }

    /// Makes the recorded publish `p` a bind of the current stack, replacing a dead mount.
    /// A target whose path is gone (the pod's directory was cleaned up) is forgotten.
    fn republish(
        &self,
        st: &mut VolumeState,
        p: &PublishRecord,
        devno: (u32, u32),
        device: &Path,
    ) -> Result<()> {
        let loops = self.volume_loops(&st.volume, Some(st))?;
        if let Some(m) = blockdev::mount_at(&p.target_path)? {
            let live = if p.block {
                m.fs_type == "devtmpfs"
                    && loops
                        .iter()
                        .any(|l| m.root == Path::new("/").join(dev_name(&l.device)))
            } else {
                m.devno == devno
            };
            if live {
                return Ok(());
            }
            // Dead (the old stack): detach every layer at the target, then bind the new one.
            for _ in 0..16 {
                if blockdev::mount_at(&p.target_path)?.is_none() {
                    break;
                }
                blockdev::umount(&p.target_path, true)?;
            }
        } else if std::fs::symlink_metadata(&p.target_path).is_err() {
            tracing::info!(volume = %st.volume, target = %p.target_path.display(), "stage: publish target is gone; forgetting it");
            st.publishes.retain(|q| q.target_path != p.target_path);
            return Ok(());
        }
        tracing::info!(volume = %st.volume, target = %p.target_path.display(), "stage: re-binding publish target to the rebuilt stack");
        self.bind(st, p, device)
    }

    fn bind(&self, st: &VolumeState, p: &PublishRecord, device: &Path) -> Result<()> {
        let source = if p.block {
            if let Some(parent) = p.target_path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("create {}", parent.display())))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p.target_path)
                .map_err(io(format!("create {}", p.target_path.display())))?;
            if p.readonly {
                blockdev::loop_attach_readonly(
                    &self.fuse_file(&st.volume),
                    self.inner.options.loop_direct_io,
                )?
            } else {
                device.to_path_buf()
            }
        } else {
            std::fs::create_dir_all(&p.target_path)
                .map_err(io(format!("create {}", p.target_path.display())))?;
            st.staging_path.clone()
        };
        match blockdev::bind_mount(&source, &p.target_path, p.readonly, &p.mount_flags) {
            Ok(()) => Ok(()),
            Err(e) => {
                if p.block && p.readonly {
                    let _ = blockdev::loop_detach(&source);
                }
                Err(e.into())
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Teardown
    // -----------------------------------------------------------------------------------

    /// Removes every piece of `volume`'s stack: mounts on its loop devices (deepest first),
    /// the loop devices, the FUSE mount. `lazy` detaches busy mounts (for dead stacks); if
    /// not lazy, a busy mount is an error. With `keep_publishes`, recorded publish targets
    /// stay mounted (see the module doc). Returns whether anything was found.
    fn teardown(
        &self,
        volume: &str,
        st: Option<&VolumeState>,
        lazy: bool,
        keep_publishes: bool,
    ) -> Result<bool> {
        let mut found = false;
        let keep: Vec<PathBuf> = if keep_publishes {
            st.map(|s| s.publishes.iter().map(|p| p.target_path.clone()).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let loops = self.volume_loops(volume, st)?;
        for l in &loops {
            found = true;
            let mut mounts = blockdev::mounts_of_device(l.devno, &dev_name(&l.device))?;
            mounts.reverse();
            for m in mounts {
                if keep.contains(&m.mount_point) {
                    continue;
                }
                tracing::info!(volume, mount = %m.mount_point.display(), device = %l.device.display(), lazy, "unmounting");
                blockdev::umount(&m.mount_point, lazy)?;
            }
        }
        // The staging mount may sit on a loop device we can no longer identify (its FUSE
        // mount detached earlier); the state file names it.
        if let Some(s) = st {
            if let Some(m) = blockdev::mount_at(&s.staging_path)? {
                let on_recorded = s
                    .loop_device
                    .as_ref()
                    .is_some_and(|d| m.source == d.display().to_string());
                if on_recorded && !self.has_live_export(volume) {
                    found = true;
                    blockdev::umount(&s.staging_path, true)?;
                }
            }
        }
        for l in &loops {
            blockdev::loop_detach(&l.device)?;
        }
        // The FUSE mount: ours (unmount, retrying while the loop driver lets go), or one
        // left by an earlier process (dead: detach lazily; there may be several stacked).
        let export = lock(&self.inner.exports).remove(volume);
        if let Some(export) = export {
            found = true;
            export.unmount().map_err(|source| AttachError::Fuse {
                volume: volume.into(),
                source,
            })?;
        }
        let mp = self.fuse_mountpoint(volume);
        for m in blockdev::mountinfo()?.iter().rev() {
            if m.mount_point == mp {
                found = true;
                tracing::info!(volume, mountpoint = %mp.display(), "detaching dead FUSE mount");
                blockdev::umount(&mp, true)?;
            }
        }
        Ok(found)
    }

    // -----------------------------------------------------------------------------------
    // NodeUnstageVolume
    // -----------------------------------------------------------------------------------

    /// Unmounts the staging path, detaches the loop device, unmounts FUSE and forgets the
    /// volume. Succeeds when nothing is there. A live staging mount that is busy, or a
    /// volume still published, is an error (the caller retries); a dead stack is torn down
    /// lazily, publish targets included.
    pub fn unstage(&self, volume: &str, staging_path: &Path) -> Result<()> {
        Self::validate(volume)?;
        let vl = self.volume_lock(volume);
        let _g = lock(&vl);
        let sd = &self.inner.state_dir;
        let staging = blockdev::normalize(staging_path);
        let st = state::read(sd, volume)?;
        if self.has_live_export(volume) {
            let loops = self.volume_loops(volume, st.as_ref())?;
            let mut others = Vec::new();
            for l in &loops {
                for m in blockdev::mounts_of_device(l.devno, &dev_name(&l.device))? {
                    if m.mount_point != staging {
                        others.push(m.mount_point.display().to_string());
                    }
                }
            }
            if !others.is_empty() {
                return Err(AttachError::StillPublished {
                    volume: volume.into(),
                    targets: others.join(", "),
                });
            }
            if let Some(m) = blockdev::mount_at(&staging)? {
                if loops.iter().any(|l| l.devno == m.devno) {
                    blockdev::umount(&staging, false)?;
                }
            }
            self.teardown(volume, st.as_ref(), false, false)?;
        } else {
            self.teardown(volume, st.as_ref(), true, false)?;
            // Dead publish targets kubelet forgot to unpublish.
            if let Some(s) = &st {
                for p in &s.publishes {
                    while blockdev::mount_at(&p.target_path)?.is_some() {
                        blockdev::umount(&p.target_path, true)?;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(self.fuse_mountpoint(volume));
        state::remove(sd, volume)?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // NodePublishVolume / NodeUnpublishVolume
    // -----------------------------------------------------------------------------------

    /// Bind-mounts the staged volume at `target_path` (a directory for a filesystem, a file
    /// for raw block). Already published the same way: OK. Differently: an error that
    /// maps to ALREADY_EXISTS.
    pub fn publish(&self, req: &PublishRequest) -> Result<()> {
        Self::validate(&req.volume)?;
        let volume = req.volume.as_str();
        let vl = self.volume_lock(volume);
        let _g = lock(&vl);
        let sd = &self.inner.state_dir;
        let target = blockdev::normalize(&req.target_path);
        let Some(mut st) = state::read(sd, volume)? else {
            return Err(AttachError::NotStaged(volume.into()));
        };
        if st.phase != Phase::Staged || !self.has_live_export(volume) {
            return Err(AttachError::NotStaged(volume.into()));
        }
        let want_block = st.mode == StageMode::Block;
        if req.block != want_block {
            return Err(AttachError::InvalidArgument(format!(
                "volume '{volume}' is staged as a {}; cannot publish it as a {}",
                st.mode,
                if req.block {
                    "raw block device"
                } else {
                    "filesystem"
                }
            )));
        }
        let Some(device) = st.loop_device.clone() else {
            return Err(AttachError::NotStaged(volume.into()));
        };
        let devno = blockdev::block_devno(&device)?;
        if !want_block {
            let staged_ok = blockdev::mount_at(&st.staging_path)?.is_some_and(|m| m.devno == devno);
            if !staged_ok {
                return Err(AttachError::NotStaged(volume.into()));
            }
        }
        let record = PublishRecord {
            target_path: target.clone(),
            readonly: req.readonly,
            mount_flags: req.mount_flags.clone(),
            block: req.block,
        };
        if let Some(m) = blockdev::mount_at(&target)? {
            let loops = self.volume_loops(volume, Some(&st))?;
            let ours = loops.iter().any(|l| {
                m.devno == l.devno
                    || (m.fs_type == "devtmpfs"
                        && m.root == Path::new(&format!("/{}", dev_name(&l.device))))
            });
            if !ours {
                return Err(AttachError::PathBusy {
                    volume: volume.into(),
                    path: target.display().to_string(),
                    source_name: m.source,
                    fs_type: m.fs_type,
                });
            }
            if m.is_readonly() != req.readonly {
                return Err(AttachError::PublishedDifferently {
                    volume: volume.into(),
                    target: target.display().to_string(),
                    existing_readonly: m.is_readonly(),
                });
            }
            if !st.publishes.iter().any(|p| p.target_path == target) {
                st.publishes.push(record);
                state::write(sd, &st)?;
            }
            return Ok(());
        }
        // Record first: a crash after the bind must not leave a bind nobody knows about.
        st.publishes.retain(|p| p.target_path != target);
        st.publishes.push(record.clone());
        state::write(sd, &st)?;
        if let Err(e) = self.bind(&st, &record, &device) {
            st.publishes.retain(|p| p.target_path != target);
            let _ = state::write(sd, &st);
            return Err(e);
        }
        Ok(())
    }

    /// Unmounts `target_path` and removes it. Succeeds when nothing is there. A busy live
    /// mount is an error; a mount on a dead stack is detached lazily.
    pub fn unpublish(&self, volume: &str, target_path: &Path) -> Result<()> {
        Self::validate(volume)?;
        let vl = self.volume_lock(volume);
        let _g = lock(&vl);
        let sd = &self.inner.state_dir;
        let target = blockdev::normalize(target_path);
        let lazy = !self.has_live_export(volume);
        let mut ro_loops = Vec::new();
        // A target can hold several stacked mounts (e.g. a re-bind over a dead one).
        for _ in 0..16 {
            let Some(m) = blockdev::mount_at(&target)? else {
                break;
            };
            if m.fs_type == "devtmpfs" {
                let dev = PathBuf::from(format!("/dev{}", m.root.display()));
                if std::fs::read_to_string(format!("/sys/block/{}/ro", dev_name(&dev)))
                    .is_ok_and(|s| s.trim() == "1")
                {
                    ro_loops.push(dev);
                }
            }
            blockdev::umount(&target, lazy)?;
        }
        let st = state::read(sd, volume)?;
        // Only a read-only loop device of this volume is ours to detach.
        if !ro_loops.is_empty() {
            let mine = self.volume_loops(volume, st.as_ref())?;
            for d in ro_loops {
                if mine.iter().any(|l| l.device == d) {
                    blockdev::loop_detach(&d)?;
                }
            }
        }
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target).map_err(io(format!(
                "remove {} (it must be empty)",
                target.display()
            )))?,
            Ok(_) => {
                std::fs::remove_file(&target).map_err(io(format!("remove {}", target.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("stat {}", target.display()))(e)),
        }
        if let Some(mut st) = st {
            let before = st.publishes.len();
            st.publishes.retain(|p| p.target_path != target);
            if st.publishes.len() != before {
                state::write(sd, &st)?;
            }
        }
        Ok(())
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
