//! The FUSE frontend: an attached volume as one regular file, `<mountpoint>/disk`.
//!
//! The kernel loop driver turns that file into `/dev/loopN` (see `blockdev`). This module
//! owns the FUSE session and keeps one invariant: **the kernel never caches volume bytes**.
//! Every open gets `FOPEN_DIRECT_IO`, so each read and write reaches the [`BlockTarget`]
//! (the volume can be written by another node after a move, and a page cache under the loop
//! device would be a second, unflushed cache). `fsync` and `flush` (close) call
//! [`BlockTarget::flush`], which is durable on every in-sync replica.
//!
//! The mount is done here (`mount(2)` with an open `/dev/fuse` fd), not by fuser, so that
//! nothing unmounts behind our back: a lazily detached export can never take a later
//! export of the same volume down with it.
//!
//! FUSE callbacks are synchronous; each I/O request becomes a task on the tokio runtime
//! we were given, which replies when the volume answers. The kernel bounds the requests in
//! flight ([`MAX_BACKGROUND`] asynchronous ones plus one per blocked caller).

use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub use crate::block::{BlockTarget, TargetError};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    Session, SessionACL, TimeOrNow, WriteFlags,
};

/// Name of the single file in the export's root directory.
pub const DISK_FILE_NAME: &str = "disk";

/// Largest write the kernel sends in one request. 1 MiB: large enough that a loop device's
/// big sequential I/O is one round trip, small enough to stay far below the engine's
/// `MAX_IO_BYTES` (32 MiB).
pub const MAX_WRITE_BYTES: u32 = 1 << 20;

/// Asynchronous requests (loop direct I/O, readahead) the kernel keeps in flight before it
/// throttles. fuser's default is 16; a loop device in direct-I/O mode queues up to its
/// queue depth, so we allow more. Memory bound: MAX_BACKGROUND * MAX_WRITE_BYTES = 64 MiB.
pub const MAX_BACKGROUND: u16 = 64;

/// How long `unmount` keeps retrying a busy FUSE mount (the loop driver drops its file
/// reference asynchronously after `losetup -d`) before it detaches lazily.
const UNMOUNT_RETRY: Duration = Duration::from_secs(3);

/// How long `unmount` waits for the session thread after the mount is gone.
const SESSION_JOIN_WAIT: Duration = Duration::from_secs(5);

/// Attribute and entry cache time. Zero: every `stat` asks us, so a size change after
/// `refresh_size` is seen at once (the loop driver reads the kernel's cached size).
const ATTR_TTL: Duration = Duration::ZERO;

const ROOT_INO: INodeNo = INodeNo::ROOT;
const DISK_INO: INodeNo = INodeNo(2);

/// The filesystem served to the kernel: a root directory holding [`DISK_FILE_NAME`].
struct DiskFs {
    target: SharedTarget,
    rt: tokio::runtime::Handle,
    size_bytes: Arc<AtomicU64>,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

/// The target behind an export; swappable so that a volume re-attached in the engine (a new
/// `AttachedVolume`) keeps its mounted stack.
type SharedTarget = Arc<RwLock<Arc<dyn BlockTarget>>>;

fn current(t: &SharedTarget) -> Arc<dyn BlockTarget> {
    match t.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

impl DiskFs {
    fn target(&self) -> Arc<dyn BlockTarget> {
        current(&self.target)
    }

    fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            ROOT_INO => (FileType::Directory, 0o700, 2, 0),
            DISK_INO => (FileType::RegularFile, 0o600, 1, self.size()),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn errno(e: &TargetError) -> Errno {
    Errno::from_i32(e.errno)
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each setter returns the nearest allowed value on error; take it.
        if let Err(nearest) = config.set_max_write(MAX_WRITE_BYTES) {
            let _ = config.set_max_write(nearest);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        // Asynchronous direct I/O lets a loop device in direct-I/O mode keep many requests
        // in flight. Optional: older kernels just serialize.
        if config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO) {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT_INO && name.as_bytes() == DISK_FILE_NAME.as_bytes() {
            if let Some(attr) = self.attr(DISK_INO) {
                return reply.entry(&ATTR_TTL, &attr, Generation(0));
            }
        }
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The size is the volume's: it changes by expanding the volume, never by truncate.
        // Truncate to the current size (O_TRUNC-free tools sometimes do it) is a no-op.
        if size.is_some_and(|s| s != attr.size) || mode.is_some() || uid.is_some() || gid.is_some()
        {
            return reply.error(Errno::EPERM);
        }
        // Time updates are accepted and forgotten.
        reply.attr(&ATTR_TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        // No page cache for volume bytes (see module doc); parallel direct writes so the
        // kernel does not serialize writers on the inode lock.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = self.size();
        if offset >= end || size == 0 {
            return reply.data(&[]);
        }
        let len = (size as u64).min(end - offset) as usize;
        let target = self.target();
        self.rt.spawn(async move {
            match target.read(offset, len).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::warn!(volume = target.name(), offset, len, error = %e, "FUSE read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            // A block device reports writes past its end as ENOSPC.
            return reply.error(Errno::ENOSPC);
        }
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let target = self.target();
        let data = data.to_vec();
        self.rt.spawn(async move {
            let n = data.len() as u32;
            match target.write(offset, data, fua).await {
                Ok(()) => reply.written(n),
                Err(e) => {
                    tracing::warn!(volume = target.name(), offset, len, error = %e, "FUSE write failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): cheap insurance, since writes were already handed to the volume.
        self.spawn_flush(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn_flush(reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        if end > self.size() {
            return reply.error(Errno::ENOSPC);
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        let zero_keep = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
            // Preallocation inside the file: the volume is thin-provisioned; nothing to do.
            return reply.ok();
        }
        if mode != punch && mode != zero && mode != zero_keep {
            return reply.error(Errno::EOPNOTSUPP);
        }
        // Discard and write-zeroes from the loop device both land here.
        let target = self.target();
        self.rt.spawn(async move {
            match target.write_zeroes(offset, length, false).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size() / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }
}

impl DiskFs {
    fn spawn_flush(&self, reply: ReplyEmpty) {
        let target = self.target();
        self.rt.spawn(async move {
            match target.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::warn!(volume = target.name(), error = %e, "FUSE flush failed");
                    reply.error(errno(&e))
                }
            }
        });
    }
}

/// A FUSE mount exposing one volume as `<mountpoint>/disk`. Dropping it unmounts (lazily
/// if the loop driver still holds the file).
pub struct FuseExport {
    name: String,
    mountpoint: PathBuf,
    /// `st_dev` of the mount's root: identifies this mount (and loop devices backed by it)
    /// even after the path stops resolving.
    dev: u64,
    size_bytes: Arc<AtomicU64>,
    target: SharedTarget,
    rt: tokio::runtime::Handle,
    notifier: Notifier,
    session: Option<BackgroundSession>,
}

impl std::fmt::Debug for FuseExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseExport")
            .field("name", &self.name)
            .field("mountpoint", &self.mountpoint)
            .field("dev", &self.dev)
            .finish()
    }
}

fn last_os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `umount2(path, flags)`.
pub(crate) fn umount2(path: &Path, flags: i32) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl FuseExport {
    /// Mounts a FUSE filesystem at `mountpoint` (an existing, empty directory) serving
    /// `target`. Blocking: call it from a plain thread or `spawn_blocking`, never from an
    /// async task (it waits on `rt` for the volume size).
    pub fn mount(
        target: Arc<dyn BlockTarget>,
        mountpoint: &Path,
        rt: tokio::runtime::Handle,
    ) -> io::Result<FuseExport> {
        let name = target.name().to_string();
        let size = rt.block_on(target.size_bytes());
        let size_bytes = Arc::new(AtomicU64::new(size));
        let target: SharedTarget = Arc::new(RwLock::new(target));
        let fs = DiskFs {
            target: target.clone(),
            rt: rt.clone(),
            size_bytes: size_bytes.clone(),
            // SAFETY: geteuid/getegid cannot fail.
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            mounted_at: SystemTime::now(),
        };

        let dev_fuse: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| io::Error::new(e.kind(), format!("open /dev/fuse: {e}")))?
            .into();
        let opts = format!(
            "fd={},rootmode=40000,user_id={},group_id={}",
            std::os::fd::AsRawFd::as_raw_fd(&dev_fuse),
            fs.uid,
            fs.gid
        );
        let source = CString::new(format!("tandem:{name}")).map_err(io::Error::other)?;
        let fstype = CString::new("fuse.tandem").map_err(io::Error::other)?;
        let target_c = cpath(mountpoint)?;
        let data = CString::new(opts).map_err(io::Error::other)?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
        // SAFETY: all pointers are valid NUL-terminated strings for the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                fstype.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(last_os_error(&format!(
                "mount FUSE at {}",
                mountpoint.display()
            )));
        }
        // From here on the mount exists: undo it on every error path.
        let undo = |e: io::Error| {
            let _ = umount2(mountpoint, libc::MNT_DETACH);
            e
        };
        let mut config = Config::default();
        config.n_threads = Some(1);
        let session = Session::from_fd(fs, dev_fuse, SessionACL::Owner, config).map_err(undo)?;
        let notifier = session.notifier();
        let session = session.spawn().map_err(undo)?;
        let dev = std::fs::metadata(mountpoint).map_err(undo)?.dev();
        Ok(FuseExport {
            name,
            mountpoint: mountpoint.to_path_buf(),
            dev,
            size_bytes,
            target,
            rt,
            notifier,
            session: Some(session),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The file to give to `losetup`.
    pub fn file_path(&self) -> PathBuf {
        self.mountpoint.join(DISK_FILE_NAME)
    }

    /// `st_dev` of the FUSE mount (what the loop driver reports as the backing device).
    pub fn dev(&self) -> u64 {
        self.dev
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// True if this export serves exactly `target` (the same object).
    pub fn serves(&self, target: &Arc<dyn BlockTarget>) -> bool {
        Arc::ptr_eq(&current(&self.target), target)
    }

    /// Serves `target` from now on (requests already running finish on the old one). For
    /// a volume that was detached and re-attached in the engine while staged.
    pub fn set_target(&self, target: Arc<dyn BlockTarget>) {
        match self.target.write() {
            Ok(mut g) => *g = target,
            Err(poisoned) => *poisoned.into_inner() = target,
        }
    }

    /// The session thread still serves and the mount answers `stat`.
    pub fn is_healthy(&self) -> bool {
        let serving = self
            .session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished());
        serving
            && std::fs::metadata(&self.mountpoint).is_ok_and(|m| m.dev() == self.dev)
            && std::fs::metadata(self.file_path()).is_ok()
    }

    /// Re-reads the volume size (after an expand) and makes the kernel see it, so that
    /// `losetup -c` picks it up. Blocking, like [`FuseExport::mount`]. Returns the size.
    pub fn refresh_size(&self) -> io::Result<u64> {
        let size = self.rt.block_on(current(&self.target).size_bytes());
        let old = self.size_bytes.swap(size, Ordering::AcqRel);
        if size != old {
            // Attributes are not cached (ATTR_TTL is zero), but the kernel's inode keeps
            // the size until the next GETATTR: drop it and force one.
            let _ = self.notifier.inval_inode(DISK_INO, -1, 0);
            let seen = std::fs::metadata(self.file_path())?.len();
            if seen != size {
                return Err(io::Error::other(format!(
                    "FUSE file {} still shows {seen} bytes after resize to {size}",
                    self.file_path().display()
                )));
            }
        }
        Ok(size)
    }

    /// Unmounts. A mount still held (the loop driver releases its file asynchronously after
    /// `losetup -d`) is retried for a few seconds, then detached lazily: the kernel keeps
    /// serving the remaining users until they let go.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + UNMOUNT_RETRY;
        let result = loop {
            match umount2(&self.mountpoint, 0) {
                Ok(()) => break Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), "FUSE mount still busy; detaching lazily");
                    break umount2(&self.mountpoint, libc::MNT_DETACH);
                }
                // Already gone (someone unmounted it, or the mountpoint vanished).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {
                    break Ok(())
                }
                Err(e) => break Err(e),
            }
        };
        if result.is_err() {
            // Keep the session so Drop can try again.
            self.session = Some(session);
            return result;
        }
        // The session thread ends when the kernel closes the connection; after a lazy
        // detach that waits for the last user, so do not block on it forever.
        let deadline = Instant::now() + SESSION_JOIN_WAIT;
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if session.guard.is_finished() {
            if let Err(e) = session.join() {
                tracing::warn!(volume = %self.name, error = %e, "FUSE session ended with an error");
            }
        }
        Ok(())
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if self.session.is_some() {
            if let Err(e) = self.unmount_inner() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "FUSE unmount failed; detaching lazily");
                let _ = umount2(&self.mountpoint, libc::MNT_DETACH);
            }
        }
    }
}
