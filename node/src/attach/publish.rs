//! NodePublishVolume and NodeUnpublishVolume: bind mounts of a staged volume (or of its
//! loop device, for raw block) at the pods' target paths.

use super::*;

impl Attacher {
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
}
