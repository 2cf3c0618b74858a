//! NodeStageVolume and NodeUnstageVolume: building, repairing and tearing down a volume's
//! stack (FUSE file, loop device, filesystem, staging mount).

use super::*;

impl Attacher {
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
    pub(super) fn republish(
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

    pub(super) fn bind(&self, st: &VolumeState, p: &PublishRecord, device: &Path) -> Result<()> {
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
    pub(super) fn teardown(
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
}
