//! The CSI attach stack against the real kernel: FUSE file, loop device, mkfs, mounts,
//! bind mounts, growth, and repair after the FUSE server process is SIGKILLed.
//!
//! Needs root, /dev/fuse, loop devices, losetup, blkid, mkfs.ext4, mkfs.xfs. A missing
//! prerequisite fails the test with a message; nothing is skipped. Run single-threaded:
//! `cargo test -p tandem-node --test fuse_loop -- --test-threads=1`.
//!
//! Every test works under its own temporary directory, and its guard removes every mount
//! and loop device whose path lies under it, even when the test fails.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tandem_node::attach::blockdev;
use tandem_node::attach::{
    AttachError, Attacher, AttacherOptions, BlockTarget, FuseExport, PublishRequest, StageMode,
    StageRequest, TargetError, VolumeUsage,
};

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------

/// A sparse in-memory disk of 4 KiB blocks.
struct MemTarget {
    name: String,
    size: AtomicU64,
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
}

impl MemTarget {
    fn new(name: &str, size: u64) -> Arc<MemTarget> {
        Arc::new(MemTarget {
            name: name.into(),
            size: AtomicU64::new(size),
            blocks: Mutex::new(HashMap::new()),
            flushes: AtomicU64::new(0),
        })
    }

    fn grow(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
    }

    fn read_sync(&self, offset: u64, len: usize) -> Vec<u8> {
        let blocks = self.blocks.lock().unwrap();
        let mut out = vec![0u8; len];
        let mut pos = 0usize;
        while pos < len {
            let at = offset + pos as u64;
            let (b, within) = (at / BLOCK, (at % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(len - pos);
            if let Some(data) = blocks.get(&b) {
                out[pos..pos + n].copy_from_slice(&data[within..within + n]);
            }
            pos += n;
        }
        out
    }

    fn write_sync(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.blocks.lock().unwrap();
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let (b, within) = (at / BLOCK, (at % BLOCK) as usize);
            let n = (BLOCK as usize - within).min(data.len() - pos);
            let blk = blocks
                .entry(b)
                .or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            blk[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        if offset + len > self.size.load(Ordering::SeqCst) {
            return Err(TargetError::new(libc::ENOSPC, "past the end"));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockTarget for MemTarget {
    fn name(&self) -> &str {
        &self.name
    }
    async fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, TargetError> {
        Ok(self.read_sync(offset, len))
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), TargetError> {
        self.check_range(offset, data.len() as u64)?;
        self.write_sync(offset, &data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), TargetError> {
        self.check_range(offset, len)?;
        let mut pos = 0;
        while pos < len {
            let at = offset + pos;
            let n = (BLOCK - at % BLOCK).min(len - pos);
            if n == BLOCK {
                self.blocks.lock().unwrap().remove(&(at / BLOCK));
            } else {
                self.write_sync(at, &vec![0u8; n as usize]);
            }
            pos += n;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), TargetError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A disk in a sparse file: survives the process serving it (for the crash test).
struct FileTarget {
    name: String,
    file: std::fs::File,
}

impl FileTarget {
    fn open(name: &str, path: &Path, size: u64) -> Arc<FileTarget> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        if file.metadata().unwrap().len() < size {
            file.set_len(size).unwrap();
        }
        Arc::new(FileTarget {
            name: name.into(),
            file,
        })
    }
}

fn io_target_err(e: std::io::Error) -> TargetError {
    TargetError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
}

#[async_trait]
impl BlockTarget for FileTarget {
    fn name(&self) -> &str {
        &self.name
    }
    async fn size_bytes(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, TargetError> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(io_target_err)?;
        Ok(buf)
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), TargetError> {
        self.file.write_all_at(&data, offset).map_err(io_target_err)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), TargetError> {
        self.file
            .write_all_at(&vec![0u8; len as usize], offset)
            .map_err(io_target_err)
    }
    async fn flush(&self) -> Result<(), TargetError> {
        self.file.sync_data().map_err(io_target_err)
    }
}

// ---------------------------------------------------------------------------------------
// Environment and cleanup guard
// ---------------------------------------------------------------------------------------

fn require_prerequisites() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "fuse_loop tests need root (mount, losetup)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "fuse_loop tests need /dev/fuse (modprobe fuse)"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "fuse_loop tests need loop devices (/dev/loop-control; modprobe loop)"
    );
    for tool in [
        "losetup",
        "blkid",
        "mkfs.ext4",
        "mkfs.xfs",
        "resize2fs",
        "xfs_growfs",
    ] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "fuse_loop tests need `{tool}` (apt-get install -y util-linux e2fsprogs xfsprogs)"
        );
    }
}

/// Mounts and loop devices under `root`, for assertions and cleanup.
fn mounts_under(root: &Path) -> Vec<blockdev::MountInfo> {
    blockdev::mountinfo()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .collect()
}

fn loops_under(root: &Path) -> Vec<blockdev::LoopDevice> {
    blockdev::loop_list()
        .unwrap()
        .into_iter()
        .filter(|l| l.backing_file.starts_with(root))
        .collect()
}

/// Removes every mount and loop device under its directory when dropped.
struct Env {
    dir: tempfile::TempDir,
    root: PathBuf,
    rt: tokio::runtime::Runtime,
    attacher: Option<Attacher>,
}

impl Env {
    fn new() -> Env {
        require_prerequisites();
        let dir = tempfile::Builder::new()
            .prefix("tandem-fuse-loop-")
            .tempdir()
            .unwrap();
        let root = dir.path().canonicalize().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let attacher = Attacher::new(
            &root.join("csi"),
            rt.handle().clone(),
            AttacherOptions::default(),
        )
        .unwrap();
        Env {
            dir,
            root,
            rt,
            attacher: Some(attacher),
        }
    }

    fn a(&self) -> &Attacher {
        self.attacher.as_ref().unwrap()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = mounts_under(&self.root);
            let l = loops_under(&self.root);
            if m.is_empty() && l.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: mounts {:?}, loop devices {:?}",
                m.iter().map(|m| &m.mount_point).collect::<Vec<_>>(),
                l.iter()
                    .map(|l| (&l.device, &l.backing_file))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(a) = self.attacher.take() {
            // Unmount staging mounts first so the exports can go.
            for m in mounts_under(&self.root).iter().rev() {
                if !m.fs_type.starts_with("fuse") {
                    let _ = blockdev::umount(&m.mount_point, true);
                }
            }
            for l in loops_under(&self.root) {
                let _ = blockdev::loop_detach(&l.device);
            }
            a.shutdown();
        }
        for _ in 0..3 {
            for m in mounts_under(&self.root).iter().rev() {
                let _ = blockdev::umount(&m.mount_point, true);
            }
            for l in loops_under(&self.root) {
                let _ = blockdev::loop_detach(&l.device);
            }
        }
        let _ = &self.dir;
        let _ = &self.rt;
    }
}

fn fs_mode(fs: &str) -> StageMode {
    StageMode::Filesystem {
        fs_type: fs.into(),
        mount_flags: vec![],
    }
}

fn stage_req(volume: &str, staging: &Path, mode: StageMode) -> StageRequest {
    StageRequest {
        volume: volume.into(),
        staging_path: staging.to_path_buf(),
        mode,
    }
}

fn write_file_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Compares big buffers without printing them.
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

fn fs_total_bytes(path: &Path) -> u64 {
    match Attacher::stats(path).unwrap() {
        VolumeUsage::Filesystem(s) => s.total_bytes,
        other => panic!("expected filesystem stats, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// FUSE file
// ---------------------------------------------------------------------------------------

/// The file is the volume byte for byte: odd offsets, the end, holes, fsync, growth.
#[test]
fn fuse_file_is_the_volume_byte_for_byte() {
    let env = Env::new();
    let target = MemTarget::new("v1", 64 * MIB);
    let mp = env.path("mnt");
    std::fs::create_dir(&mp).unwrap();
    let export = FuseExport::mount(target.clone(), &mp, env.rt.handle().clone()).unwrap();
    let file = export.file_path();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 * MIB);
    let names: Vec<String> = std::fs::read_dir(&mp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["disk".to_string()]);

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let data = pattern(3 * 4096 + 77, 5);
    f.write_all_at(&data, 12_345).unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 12_345).unwrap();
    assert_same(&back, &data, "read back");
    assert_same(
        &target.read_sync(12_345, data.len()),
        &data,
        "bytes reach the target",
    );
    // A large write (more than one FUSE request) at an odd offset.
    let big = pattern(3 * MIB as usize + 1, 9);
    f.write_all_at(&big, 7 * MIB + 1).unwrap();
    assert_same(
        &target.read_sync(7 * MIB + 1, big.len()),
        &big,
        "large write",
    );

    // Bytes written behind FUSE's back are seen at once: no page cache.
    target.write_sync(40 * MIB, b"written elsewhere");
    let mut b = vec![0u8; 17];
    f.read_exact_at(&mut b, 40 * MIB).unwrap();
    assert_eq!(&b, b"written elsewhere");

    // The end: a short read, and writes past it fail.
    let mut tail = vec![0u8; 8192];
    assert_eq!(f.read_at(&mut tail, 64 * MIB - 100).unwrap(), 100);
    assert_eq!(f.read_at(&mut tail, 64 * MIB).unwrap(), 0);
    let err = f.write_at(b"x", 64 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));

    // The size is the volume's: truncate refuses, except to the same size.
    assert_eq!(
        f.set_len(MIB).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    f.set_len(64 * MIB).unwrap();

    // fsync reaches the target's flush.
    let before = target.flushes.load(Ordering::SeqCst);
    f.sync_all().unwrap();
    assert!(target.flushes.load(Ordering::SeqCst) > before);

    // Punching a hole zeroes the range.
    use std::os::fd::AsRawFd;
    // SAFETY: plain fallocate on an open fd.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            12_345,
            4096,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    assert!(target.read_sync(12_345, 4096).iter().all(|&b| b == 0));
    assert_eq!(target.read_sync(12_345 + 4096, 10), data[4096..4106]);

    // statfs answers.
    let c = std::ffi::CString::new(mp.to_str().unwrap()).unwrap();
    // SAFETY: statvfs fills the zeroed struct for a valid path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    assert_eq!(s.f_blocks as u64 * s.f_frsize as u64, 64 * MIB);

    // Growth: the file follows after refresh_size.
    target.grow(80 * MIB);
    assert_eq!(export.refresh_size().unwrap(), 80 * MIB);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 80 * MIB);
    f.write_all_at(b"new space", 79 * MIB).unwrap();
    assert_eq!(target.read_sync(79 * MIB, 9), b"new space");

    drop(f);
    export.unmount().unwrap();
    env.assert_nothing_left();
}

// ---------------------------------------------------------------------------------------
// Stage / unstage
// ---------------------------------------------------------------------------------------

fn stage_write_unstage_restage(fs: &str, size: u64) {
    let env = Env::new();
    let target = MemTarget::new("data", size);
    let staging = env.path("staging");
    let req = stage_req("data", &staging, fs_mode(fs));

    let out = env.a().stage(target.clone(), &req).unwrap();
    assert!(out.formatted, "a blank volume is formatted");
    assert!(!out.already_staged);
    let m = blockdev::mount_at(&staging)
        .unwrap()
        .expect("staging mounted");
    assert_eq!(m.fs_type, fs);

    // Staging twice is a no-op.
    let again = env.a().stage(target.clone(), &req).unwrap();
    assert!(again.already_staged && !again.formatted);
    assert_eq!(again.device, out.device);

    let payload = pattern(5 * MIB as usize + 3, 1);
    write_file_synced(&staging.join("a.bin"), &payload);
    std::fs::create_dir(staging.join("dir")).unwrap();
    write_file_synced(&staging.join("dir/b.txt"), b"hello tandem");

    // Staged differently: refused (ALREADY_EXISTS), state untouched.
    let err = env
        .a()
        .stage(
            target.clone(),
            &stage_req("data", &env.path("other"), fs_mode(fs)),
        )
        .unwrap_err();
    assert!(
        matches!(err, AttachError::StagedDifferently { .. }),
        "{err}"
    );
    assert_eq!(err.grpc_code(), tonic::Code::AlreadyExists);

    env.a().unstage("data", &staging).unwrap();
    env.a().unstage("data", &staging).unwrap();
    assert!(blockdev::mount_at(&staging).unwrap().is_none());
    env.assert_nothing_left();

    // Stage again: same filesystem, not reformatted, files intact.
    let out = env.a().stage(target.clone(), &req).unwrap();
    assert!(
        !out.formatted,
        "a volume with a filesystem is never reformatted"
    );
    assert_same(
        &std::fs::read(staging.join("a.bin")).unwrap(),
        &payload,
        "a.bin",
    );
    assert_eq!(
        std::fs::read(staging.join("dir/b.txt")).unwrap(),
        b"hello tandem"
    );

    // Asking for another filesystem type is refused, never reformatted.
    env.a().unstage("data", &staging).unwrap();
    let other = if fs == "ext4" { "xfs" } else { "ext4" };
    let err = env
        .a()
        .stage(target.clone(), &stage_req("data", &staging, fs_mode(other)))
        .unwrap_err();
    assert!(
        matches!(
            err,
            AttachError::Blockdev(blockdev::BlockdevError::FilesystemMismatch { .. })
        ),
        "{err}"
    );
    assert_eq!(err.grpc_code(), tonic::Code::FailedPrecondition);
    env.a().unstage("data", &staging).unwrap();
    env.assert_nothing_left();
    // The data survived the refused stage.
    env.a().stage(target.clone(), &req).unwrap();
    assert_same(
        &std::fs::read(staging.join("a.bin")).unwrap(),
        &payload,
        "a.bin",
    );
    env.a().unstage("data", &staging).unwrap();
    env.assert_nothing_left();
}

#[test]
fn ext4_files_survive_unstage_and_restage() {
    stage_write_unstage_restage("ext4", 256 * MIB);
}

#[test]
fn xfs_files_survive_unstage_and_restage() {
    // mkfs.xfs refuses filesystems under 300 MiB.
    stage_write_unstage_restage("xfs", 512 * MIB);
}

/// Raw block mode: bytes written to the device are the volume's bytes, at the same offsets.
#[test]
fn block_stage_and_publish_pass_bytes_through() {
    let env = Env::new();
    let target = MemTarget::new("raw", 64 * MIB);
    let staging = env.path("staging");
    let req = stage_req("raw", &staging, StageMode::Block);
    let out = env.a().stage(target.clone(), &req).unwrap();
    assert!(!out.formatted);
    assert!(env.a().stage(target.clone(), &req).unwrap().already_staged);
    assert_eq!(blockdev::block_size_bytes(&out.device).unwrap(), 64 * MIB);

    let data = pattern(MIB as usize, 3);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&out.device)
            .unwrap();
        // O_DIRECT needs an aligned buffer.
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut().copy_from_slice(&data);
        f.write_all_at(buf.as_ref(), 8 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    assert_same(
        &target.read_sync(8 * MIB, data.len()),
        &data,
        "device write",
    );

    // Publish as a device file; twice is fine.
    let pub_rw = env.path("pods/p1/dev/raw");
    let preq = PublishRequest {
        volume: "raw".into(),
        staging_path: staging.clone(),
        target_path: pub_rw.clone(),
        readonly: false,
        mount_flags: vec![],
        block: true,
    };
    env.a().publish(&preq).unwrap();
    env.a().publish(&preq).unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pub_rw)
            .unwrap();
        f.write_all_at(b"through the published node", 3 * MIB)
            .unwrap();
        f.sync_all().unwrap();
        let mut b = vec![0u8; data.len()];
        f.read_exact_at(&mut b, 8 * MIB).unwrap();
        assert_same(&b, &data, "read through the published node");
    }
    assert_eq!(target.read_sync(3 * MIB, 26), b"through the published node");

    // Read-only publish: reads work, opening for write is refused.
    let pub_ro = env.path("pods/p2/dev/raw");
    let ro = PublishRequest {
        target_path: pub_ro.clone(),
        readonly: true,
        ..preq.clone()
    };
    env.a().publish(&ro).unwrap();
    env.a().publish(&ro).unwrap();
    let mut b = vec![0u8; 26];
    std::fs::File::open(&pub_ro)
        .unwrap()
        .read_exact_at(&mut b, 3 * MIB)
        .unwrap();
    assert_eq!(b, b"through the published node");
    // A read-only block device opens for writing, but every write fails.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&pub_ro)
        .and_then(|f| f.write_all_at(b"must not land", 3 * MIB))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(target.read_sync(3 * MIB, 26), b"through the published node");

    // Unstage while published: refused.
    let err = env.a().unstage("raw", &staging).unwrap_err();
    assert!(matches!(err, AttachError::StillPublished { .. }), "{err}");

    for t in [&pub_rw, &pub_ro] {
        env.a().unpublish("raw", t).unwrap();
        env.a().unpublish("raw", t).unwrap();
        assert!(!t.exists());
    }
    env.a().unstage("raw", &staging).unwrap();
    env.a().unstage("raw", &staging).unwrap();
    env.assert_nothing_left();
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of len bytes, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

// ---------------------------------------------------------------------------------------
// Publish / unpublish
// ---------------------------------------------------------------------------------------

/// Bind mounts show the staged filesystem; a read-only one refuses writes with EROFS.
#[test]
fn publish_binds_staging_and_readonly_refuses_writes() {
    let env = Env::new();
    let target = MemTarget::new("web", 128 * MIB);
    let staging = env.path("staging");
    env.a()
        .stage(target.clone(), &stage_req("web", &staging, fs_mode("ext4")))
        .unwrap();
    write_file_synced(&staging.join("index.html"), b"<h1>hi</h1>");

    let rw = env.path("pods/a/volumes/web");
    let preq = PublishRequest {
        volume: "web".into(),
        staging_path: staging.clone(),
        target_path: rw.clone(),
        readonly: false,
        mount_flags: vec!["noatime".into()],
        block: false,
    };
    // Publishing before staging another volume: NotStaged (FAILED_PRECONDITION).
    let err = env
        .a()
        .publish(&PublishRequest {
            volume: "nope".into(),
            ..preq.clone()
        })
        .unwrap_err();
    assert_eq!(err.grpc_code(), tonic::Code::FailedPrecondition);

    env.a().publish(&preq).unwrap();
    env.a().publish(&preq).unwrap();
    assert_eq!(
        std::fs::read(rw.join("index.html")).unwrap(),
        b"<h1>hi</h1>"
    );
    write_file_synced(&rw.join("from-pod"), b"pod wrote this");
    assert_eq!(
        std::fs::read(staging.join("from-pod")).unwrap(),
        b"pod wrote this"
    );

    let ro = env.path("pods/b/volumes/web");
    let ro_req = PublishRequest {
        target_path: ro.clone(),
        readonly: true,
        ..preq.clone()
    };
    env.a().publish(&ro_req).unwrap();
    env.a().publish(&ro_req).unwrap();
    assert_eq!(
        std::fs::read(ro.join("from-pod")).unwrap(),
        b"pod wrote this"
    );
    let err = std::fs::File::create(ro.join("nope")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // Same target, other options: ALREADY_EXISTS.
    let err = env
        .a()
        .publish(&PublishRequest {
            readonly: false,
            ..ro_req.clone()
        })
        .unwrap_err();
    assert!(
        matches!(err, AttachError::PublishedDifferently { .. }),
        "{err}"
    );
    assert_eq!(err.grpc_code(), tonic::Code::AlreadyExists);

    for t in [&rw, &ro] {
        env.a().unpublish("web", t).unwrap();
        env.a().unpublish("web", t).unwrap();
        assert!(!t.exists(), "{} removed", t.display());
    }
    // Unpublishing something never published is fine too.
    env.a()
        .unpublish("web", &env.path("pods/c/volumes/web"))
        .unwrap();
    env.a().unstage("web", &staging).unwrap();
    env.assert_nothing_left();
}

// ---------------------------------------------------------------------------------------
// Expand
// ---------------------------------------------------------------------------------------

fn expand_grows(fs: &str, size: u64, grown: u64) {
    let env = Env::new();
    let target = MemTarget::new("grow", size);
    let staging = env.path("staging");
    env.a()
        .stage(target.clone(), &stage_req("grow", &staging, fs_mode(fs)))
        .unwrap();
    let pubd = env.path("pods/a/vol");
    env.a()
        .publish(&PublishRequest {
            volume: "grow".into(),
            staging_path: staging.clone(),
            target_path: pubd.clone(),
            readonly: false,
            mount_flags: vec![],
            block: false,
        })
        .unwrap();
    write_file_synced(&staging.join("keep"), b"kept across growth");
    let before = fs_total_bytes(&staging);

    target.grow(grown);
    if fs == "ext4" && !blockdev::has_capability(blockdev::CAP_SYS_RESOURCE) {
        // Online ext4 resize needs CAP_SYS_RESOURCE. Without it, check that the device
        // grew and that the error says what is missing; say loudly what went unverified.
        let err = env.a().expand("grow").unwrap_err();
        assert!(
            matches!(
                err,
                AttachError::Blockdev(blockdev::BlockdevError::MissingCapability { .. })
            ),
            "{err}"
        );
        let dev = blockdev::mount_at(&staging).unwrap().unwrap().source;
        assert_eq!(blockdev::block_size_bytes(Path::new(&dev)).unwrap(), grown);
        eprintln!(
            "WARNING: ext4 online growth NOT verified: this process lacks CAP_SYS_RESOURCE \
             (loop device growth and the error message were checked)"
        );
        env.a().unpublish("grow", &pubd).unwrap();
        env.a().unstage("grow", &staging).unwrap();
        env.assert_nothing_left();
        return;
    }
    assert_eq!(env.a().expand("grow").unwrap(), grown);
    assert_eq!(env.a().expand("grow").unwrap(), grown, "expand twice");
    let after = fs_total_bytes(&staging);
    assert!(
        after > before + (grown - size) / 2,
        "{fs} grew from {before} to only {after} bytes"
    );
    assert_eq!(fs_total_bytes(&pubd), after, "the publish sees the growth");
    assert_eq!(
        std::fs::read(staging.join("keep")).unwrap(),
        b"kept across growth"
    );
    env.a().unpublish("grow", &pubd).unwrap();
    env.a().unstage("grow", &staging).unwrap();
    env.assert_nothing_left();
}

#[test]
fn expand_grows_ext4() {
    expand_grows("ext4", 128 * MIB, 384 * MIB);
}

#[test]
fn expand_grows_xfs() {
    expand_grows("xfs", 320 * MIB, 640 * MIB);
}

// ---------------------------------------------------------------------------------------
// Crash: the FUSE server process is SIGKILLed
// ---------------------------------------------------------------------------------------

const CHILD_ENV: &str = "TANDEM_FUSE_LOOP_CHILD_DIR";
const CRASH_VOLUME: &str = "crashy";
const CRASH_SIZE: u64 = 128 * MIB;

fn crash_paths(root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        root.join("csi"),
        root.join("backing.img"),
        root.join("staging"),
        root.join("pods/a/vol"),
    )
}

/// Not a test of its own: the body of the child process ("tandemd") in
/// `restage_after_fuse_server_sigkill_rebuilds_the_stack`. Does nothing unless that test
/// runs it with `TANDEM_FUSE_LOOP_CHILD_DIR` set.
#[test]
fn crash_helper_child_process() {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    let (state_dir, backing, staging, target_path) = crash_paths(&root);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // For manual measurements: TANDEM_FUSE_LOOP_CHILD_DIO=1 uses loop direct I/O.
    let options = AttacherOptions {
        loop_direct_io: std::env::var_os("TANDEM_FUSE_LOOP_CHILD_DIO").is_some(),
    };
    let a = Attacher::new(&state_dir, rt.handle().clone(), options).unwrap();
    let target = FileTarget::open(CRASH_VOLUME, &backing, CRASH_SIZE);
    a.stage(target, &stage_req(CRASH_VOLUME, &staging, fs_mode("ext4")))
        .unwrap();
    a.publish(&PublishRequest {
        volume: CRASH_VOLUME.into(),
        staging_path: staging,
        target_path,
        readonly: false,
        mount_flags: vec![],
        block: false,
    })
    .unwrap();
    std::fs::write(root.join("ready"), b"ok").unwrap();
    // Serve until SIGKILLed.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tandemd restart kills the FUSE server under a staged, published volume. The next
/// stage must tear the dead stack down, rebuild it from the same bytes, and re-bind the
/// pod's target; afterwards nothing may reference the dead FUSE mount.
#[test]
fn restage_after_fuse_server_sigkill_rebuilds_the_stack() {
    let env = Env::new();
    let (state_dir, backing, staging, target_path) = crash_paths(&env.root);
    let fuse_dir = state_dir.join("fuse");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_helper_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &env.root)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !env.root.join("ready").exists() {
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!("child FUSE server exited early: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "child FUSE server never got ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pod writes through its publish target and syncs.
    let payload = pattern(3 * MIB as usize, 7);
    write_file_synced(&target_path.join("before-crash.bin"), &payload);
    let old_loops = loops_under(&fuse_dir);
    assert_eq!(old_loops.len(), 1, "{old_loops:?}");

    // SIGKILL: the FUSE connection dies with the process.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // The page cache still holds the file; an O_DIRECT read must go to the dead device.
    let mut buf = AlignedBuf::new(4096);
    let err = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(target_path.join("before-crash.bin"))
        .and_then(|f| f.read_exact_at(buf.as_mut(), 0))
        .unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::ENOTCONN)),
        "dead stack fails loudly, got {err}"
    );

    // "Daemon start": our attacher never served this volume, so the stack is stale.
    let stale = env.a().cleanup_stale().unwrap();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].volume, CRASH_VOLUME);
    assert_eq!(stale[0].publishes.len(), 1);
    assert!(
        blockdev::mount_at(&staging).unwrap().is_none(),
        "dead staging mount detached"
    );
    assert!(
        blockdev::mount_at(&target_path).unwrap().is_some(),
        "the publish target stays (dead) so no pod writes into an empty directory"
    );
    assert!(
        mounts_under(&fuse_dir).is_empty(),
        "dead FUSE mount detached"
    );
    // Twice is harmless.
    assert_eq!(env.a().cleanup_stale().unwrap().len(), 1);

    // Restage in "the new daemon" from the same bytes.
    let target = FileTarget::open(CRASH_VOLUME, &backing, CRASH_SIZE);
    let out = env
        .a()
        .stage(
            target.clone(),
            &stage_req(CRASH_VOLUME, &staging, fs_mode("ext4")),
        )
        .unwrap();
    assert!(!out.formatted, "restaging must never reformat");
    assert_same(
        &std::fs::read(staging.join("before-crash.bin")).unwrap(),
        &payload,
        "staging after restage",
    );
    assert_same(
        &std::fs::read(target_path.join("before-crash.bin")).unwrap(),
        &payload,
        "the publish target is re-bound to the new stack",
    );
    let new_dev = blockdev::block_devno(&out.device).unwrap();
    assert_eq!(
        blockdev::mount_at(&target_path).unwrap().unwrap().devno,
        new_dev
    );
    // Nothing references the dead stack any more.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loops = loops_under(&fuse_dir);
        let fuse_mounts: Vec<_> = mounts_under(&fuse_dir);
        let stacked_at_target = blockdev::mountinfo()
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point == target_path)
            .count();
        if loops.len() == 1 && fuse_mounts.len() == 1 && stacked_at_target == 1 {
            assert_eq!(loops[0].device, out.device);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale pieces remain: loops {loops:?}, FUSE mounts {:?}, {stacked_at_target} mounts at target",
            fuse_mounts
                .iter()
                .map(|m| &m.mount_point)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Restaging the healthy stack is a no-op.
    assert!(
        env.a()
            .stage(target, &stage_req(CRASH_VOLUME, &staging, fs_mode("ext4")))
            .unwrap()
            .already_staged
    );
    write_file_synced(&target_path.join("after.txt"), b"after the crash");

    env.a().unpublish(CRASH_VOLUME, &target_path).unwrap();
    env.a().unstage(CRASH_VOLUME, &staging).unwrap();
    env.assert_nothing_left();
    assert!(env.a().recorded(CRASH_VOLUME).unwrap().is_none());
}

/// Unstage and unpublish of a dead stack (kubelet cleaning up after the pod went away,
/// with no restage in between) succeed and leave nothing.
#[test]
fn unpublish_and_unstage_clean_up_a_dead_stack() {
    let env = Env::new();
    let (state_dir, _backing, staging, target_path) = crash_paths(&env.root);
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_helper_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &env.root)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !env.root.join("ready").exists() {
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!("child FUSE server exited early: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "child FUSE server never got ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let old_loops = loops_under(&env.root);
    assert_eq!(old_loops.len(), 1);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // Someone (an admin, a node agent) lazily unmounts the dead FUSE mount before we get
    // to it: the kernel now names the loop device's backing file just "/disk".
    blockdev::umount(&state_dir.join("fuse").join(CRASH_VOLUME), true).unwrap();
    assert_eq!(
        blockdev::loop_list()
            .unwrap()
            .into_iter()
            .find(|l| l.device == old_loops[0].device)
            .map(|l| l.backing_file),
        Some(PathBuf::from("/disk"))
    );
    assert!(env.a().condition(CRASH_VOLUME).is_some());
    env.a().unpublish(CRASH_VOLUME, &target_path).unwrap();
    env.a().unpublish(CRASH_VOLUME, &target_path).unwrap();
    env.a().unstage(CRASH_VOLUME, &staging).unwrap();
    env.a().unstage(CRASH_VOLUME, &staging).unwrap();
    env.assert_nothing_left();
    // The old loop device is free again (found through the state file, not its path).
    let deadline = Instant::now() + Duration::from_secs(10);
    while blockdev::loop_list()
        .unwrap()
        .iter()
        .any(|l| l.device == old_loops[0].device && l.backing_file == Path::new("/disk"))
    {
        assert!(
            Instant::now() < deadline,
            "{} still bound to the dead FUSE file",
            old_loops[0].device.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
