//! The one block-device seam that the NBD and FUSE frontends share: [`BlockTarget`] (what
//! a frontend reads and writes), [`TargetError`] (an errno and its message), and
//! [`volume_error`], the single mapping from engine errors to the errno a block device
//! reports.

use async_trait::async_trait;

use tandem_engine::replication::ReplicationError;
use tandem_engine::store::StoreError;
use tandem_engine::volume::{AttachedVolume, VolumeError};

/// An I/O error from a [`BlockTarget`], carried to the client as an errno.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct TargetError {
    pub errno: i32,
    pub message: String,
    /// The data failed its checksum and no good copy was found (counted in metrics).
    pub bad_data: bool,
}

impl TargetError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        TargetError {
            errno,
            message: message.into(),
            bad_data: false,
        }
    }
}

/// What a frontend reads and writes: an attached volume, or an in-memory disk in tests.
#[async_trait]
pub trait BlockTarget: Send + Sync + 'static {
    fn name(&self) -> &str;
    async fn size_bytes(&self) -> u64;
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, TargetError>;
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), TargetError>;
    /// Zeroes a range (TRIM and WRITE_ZEROES both land here).
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), TargetError>;
    /// Makes every acknowledged write durable.
    async fn flush(&self) -> Result<(), TargetError>;
}

/// Maps a volume error to the errno a block device reports (the NBD spec's choices, which
/// the kernel's FUSE and loop paths understand too): ENOSPC for writes past the end or a
/// full pool, EINVAL for reads past the end, EOVERFLOW for a request that is too large, EIO
/// for checksum and replica failures, ESHUTDOWN for a detached or fenced volume.
pub fn volume_error(e: VolumeError, is_write: bool) -> TargetError {
    let errno = match &e {
        VolumeError::Store(StoreError::OutOfRange { .. })
        | VolumeError::Replication(ReplicationError::OutOfRange { .. }) => {
            if is_write {
                libc::ENOSPC
            } else {
                libc::EINVAL
            }
        }
        VolumeError::Store(StoreError::TooLarge { .. })
        | VolumeError::Replication(ReplicationError::TooLarge { .. }) => libc::EOVERFLOW,
        VolumeError::Store(s) => s.errno(),
        VolumeError::Replication(r) => r.errno(),
        VolumeError::NotAttached(_) => libc::ESHUTDOWN,
        VolumeError::ReadOnly(_) => libc::EPERM,
        _ => libc::EIO,
    };
    let bad_data = matches!(
        e,
        VolumeError::Store(StoreError::ChecksumMismatch { .. })
            | VolumeError::Replication(ReplicationError::NoGoodCopy { .. })
    );
    TargetError {
        errno,
        message: e.to_string(),
        bad_data,
    }
}

#[async_trait]
impl BlockTarget for AttachedVolume {
    fn name(&self) -> &str {
        AttachedVolume::name(self)
    }
    async fn size_bytes(&self) -> u64 {
        AttachedVolume::size_bytes(self).await
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, TargetError> {
        AttachedVolume::read(self, offset, len)
            .await
            .map_err(|e| volume_error(e, false))
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), TargetError> {
        AttachedVolume::write(self, offset, data, fua)
            .await
            .map_err(|e| volume_error(e, true))
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), TargetError> {
        AttachedVolume::write_zeroes(self, offset, len, fua)
            .await
            .map_err(|e| volume_error(e, true))
    }
    async fn flush(&self) -> Result<(), TargetError> {
        AttachedVolume::flush(self)
            .await
            .map_err(|e| volume_error(e, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_of_range() -> VolumeError {
        VolumeError::Store(StoreError::OutOfRange {
            volume: "v".into(),
            offset: 1 << 30,
            len: 4096,
            size: 1 << 20,
        })
    }

    /// NBD and FUSE report the same errno for the same failure (the NBD spec's choices).
    #[test]
    fn one_errno_mapping_for_every_frontend() {
        assert_eq!(volume_error(out_of_range(), true).errno, libc::ENOSPC);
        assert_eq!(volume_error(out_of_range(), false).errno, libc::EINVAL);
        let bad = volume_error(
            VolumeError::Store(StoreError::ChecksumMismatch {
                volume: "v".into(),
                block: 3,
                offset: 3 * 4096,
                expected: 1,
                actual: 2,
            }),
            false,
        );
        assert_eq!(bad.errno, libc::EIO);
        assert!(bad.bad_data);
        let detached = volume_error(VolumeError::NotAttached("v".into()), true);
        assert_eq!(detached.errno, libc::ESHUTDOWN);
        assert!(!detached.bad_data);
        assert!(detached.message.contains('v'), "{detached}");
    }
}
