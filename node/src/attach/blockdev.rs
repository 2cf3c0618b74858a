//! OS plumbing under CSI NodeStage/NodePublish: loop devices, blank detection, mkfs, mount,
//! bind mount, filesystem growth, statfs, and reading `/proc/self/mountinfo`.
//!
//! Every external command runs with a time bound and its stderr in the error, which names
//! the command. Nothing here decides *whether* to act; `attach` owns that. The one safety
//! rule kept here is that [`mkfs`] refuses a device that is not blank.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound for quick commands (losetup, blkid, mount, umount).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound for mkfs and filesystem growth: they write metadata proportional to the size
/// (xfs zeroes its log, ext4 its journal), through FUSE and the volume's replication.
pub const MKFS_TIMEOUT: Duration = Duration::from_secs(600);

/// Bytes read from the start of a device to decide "blank" when blkid finds nothing.
/// 1 MiB covers every common signature location at the start of a device (partition
/// tables, ext*, xfs, btrfs's first superblock at 64 KiB, LVM, LUKS).
pub const BLANK_PROBE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockdevError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    CommandFailed {
        cmd: String,
        status: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {timeout_s} s and was killed")]
    CommandTimeout { cmd: String, timeout_s: u64 },
    #[error("cannot run `{cmd}`: {source} (is the program installed?)")]
    CommandSpawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{device} holds {found}, not the requested {wanted}; refusing to format it")]
    FilesystemMismatch {
        device: String,
        found: String,
        wanted: String,
    },
    #[error("{device} is not blank (it holds {found}); refusing to format it")]
    NotBlank { device: String, found: String },
    #[error("unsupported filesystem type '{0}' (use ext4 or xfs)")]
    UnsupportedFilesystem(String),
    #[error("`{cmd}` needs the {capability} capability, which this process lacks; run tandemd's CSI node plugin privileged")]
    MissingCapability { cmd: String, capability: String },
    #[error("cannot parse {what}: {detail}")]
    Parse { what: String, detail: String },
}

pub type Result<T, E = BlockdevError> = std::result::Result<T, E>;

pub(crate) fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> BlockdevError {
    let op = op.into();
    move |source| BlockdevError::Io { op, source }
}

/// The output of a finished command.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

fn render(program: &str, args: &[&OsStr]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `program args...` with stdin closed, killing it after `timeout`. Returns the output
/// whatever the exit status; [`run`] turns a failure into an error.
pub fn run_status(program: &str, args: &[&OsStr], timeout: Duration) -> Result<Output> {
    let cmd = render(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Stable, parseable messages.
        .env("LC_ALL", "C")
        .spawn()
        .map_err(|source| BlockdevError::CommandSpawn {
            cmd: cmd.clone(),
            source,
        })?;
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child
            .try_wait()
            .map_err(io_err(format!("wait for `{cmd}`")))?
        {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BlockdevError::CommandTimeout {
                    cmd,
                    timeout_s: timeout.as_secs(),
                });
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    tracing::debug!(cmd, code = ?status.code(), "ran command");
    Ok(Output {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Runs a command and fails unless it exits 0.
pub fn run(program: &str, args: &[&OsStr], timeout: Duration) -> Result<Output> {
    let out = run_status(program, args, timeout)?;
    if out.code != Some(0) {
        return Err(BlockdevError::CommandFailed {
            cmd: render(program, args),
            status: match out.code {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".into(),
            },
            code: out.code,
            stderr: out.stderr.trim().to_string(),
        });
    }
    Ok(out)
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

// ---------------------------------------------------------------------------------------
// Loop devices
// ---------------------------------------------------------------------------------------

/// A loop device as the kernel reports it in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// `(major, minor)` of the loop device itself.
    pub devno: (u32, u32),
    /// The backing file path as the kernel prints it (`d_path`).
    pub backing_file: PathBuf,
    /// `st_dev` and `st_ino` of the backing file (LOOP_GET_STATUS64), when readable.
    pub backing_dev_ino: Option<(u64, u64)>,
    pub direct_io: bool,
    pub readonly: bool,
}

/// Attaches a loop device to `file` and returns it (`/dev/loopN`).
pub fn loop_attach(file: &Path, direct_io: bool) -> Result<PathBuf> {
    let dio = if direct_io {
        "--direct-io=on"
    } else {
        "--direct-io=off"
    };
    let out = run(
        "losetup",
        &[os("--find"), os("--show"), os(dio), file.as_os_str()],
        COMMAND_TIMEOUT,
    )?;
    let dev = out.stdout.trim();
    if !dev.starts_with("/dev/loop") {
        return Err(BlockdevError::Parse {
            what: "losetup --show output".into(),
            detail: format!("expected /dev/loopN, got '{dev}'"),
        });
    }
    Ok(PathBuf::from(dev))
}

/// Attaches a read-only loop device to `file` (for read-only raw block publishes: a
/// read-only bind of a device node does not stop writes through it; a read-only loop
/// device does).
pub fn loop_attach_readonly(file: &Path, direct_io: bool) -> Result<PathBuf> {
    let dio = if direct_io {
        "--direct-io=on"
    } else {
        "--direct-io=off"
    };
    let out = run(
        "losetup",
        &[
            os("--find"),
            os("--show"),
            os("--read-only"),
            os(dio),
            file.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    )?;
    let dev = out.stdout.trim();
    if !dev.starts_with("/dev/loop") {
        return Err(BlockdevError::Parse {
            what: "losetup --show output".into(),
            detail: format!("expected /dev/loopN, got '{dev}'"),
        });
    }
    Ok(PathBuf::from(dev))
}

/// Detaches a loop device. A device still open (a mount on it) is cleared by the kernel
/// when its last user closes it (autoclear), so this succeeds then too. A device that is
/// already free is fine.
pub fn loop_detach(device: &Path) -> Result<()> {
    match run(
        "losetup",
        &[os("--detach"), device.as_os_str()],
        COMMAND_TIMEOUT,
    ) {
        Ok(_) => Ok(()),
        Err(BlockdevError::CommandFailed { stderr, .. })
            if stderr.contains("No such device or address")
                || stderr.contains("No such device") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// `losetup -c`: re-reads the backing file's size after it grew.
pub fn loop_refresh_capacity(device: &Path) -> Result<()> {
    run(
        "losetup",
        &[os("--set-capacity"), device.as_os_str()],
        COMMAND_TIMEOUT,
    )
    .map(|_| ())
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn parse_devno(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// Backing `(st_dev, st_ino)` of a bound loop device. Opens the device with O_PATH-free
/// read-only access; cheap, and does not count as a writer.
fn loop_backing_dev_ino(device: &Path) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(device).ok()?;
    // SAFETY: LoopInfo64 is plain old data; an all-zero value is valid.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 into `info`, which lives for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) };
    (rc == 0).then_some((info.lo_device, info.lo_inode))
}

/// Every bound loop device (one with a backing file).
pub fn loop_list() -> Result<Vec<LoopDevice>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir("/sys/block").map_err(io_err("list /sys/block"))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("loop") {
            continue;
        }
        let sys = e.path();
        let Some(backing) = read_trim(&sys.join("loop/backing_file")) else {
            continue; // Not bound.
        };
        let Some(devno) = read_trim(&sys.join("dev")).as_deref().and_then(parse_devno) else {
            continue;
        };
        let device = PathBuf::from(format!("/dev/{name}"));
        let direct_io = read_trim(&sys.join("loop/dio")).as_deref() == Some("1");
        let readonly = read_trim(&sys.join("ro")).as_deref() == Some("1");
        let backing_dev_ino = loop_backing_dev_ino(&device);
        out.push(LoopDevice {
            device,
            devno,
            backing_file: PathBuf::from(backing),
            backing_dev_ino,
            direct_io,
            readonly,
        });
    }
    out.sort_by_key(|l| l.devno);
    Ok(out)
}

/// Loop devices whose backing file is `file` (by path), or lives on the filesystem with
/// `st_dev == dev` (by device: works after the path has stopped resolving, e.g. a FUSE
/// mount that was detached lazily).
pub fn loops_backed_by(file: &Path, dev: Option<u64>) -> Result<Vec<LoopDevice>> {
    Ok(loop_list()?
        .into_iter()
        .filter(|l| {
            l.backing_file == file
                || dev.is_some_and(|d| l.backing_dev_ino.is_some_and(|(bd, _)| bd == d))
        })
        .collect())
}

/// The device number of a block device node.
pub fn block_devno(device: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(device).map_err(io_err(format!("stat {}", device.display())))?;
    if !m.file_type().is_block_device() {
        return Err(BlockdevError::Parse {
            what: device.display().to_string(),
            detail: "not a block device".into(),
        });
    }
    let rdev = m.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

/// Size of a block device in bytes (BLKGETSIZE64).
pub fn block_size_bytes(device: &Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(device).map_err(io_err(format!("open {}", device.display())))?;
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x80081272;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which lives for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size) };
    if rc != 0 {
        return Err(io_err(format!("BLKGETSIZE64 {}", device.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(size)
}

// ---------------------------------------------------------------------------------------
// Filesystems
// ---------------------------------------------------------------------------------------

/// The filesystems NodeStage can make and grow.
pub const SUPPORTED_FILESYSTEMS: &[&str] = &["ext4", "xfs"];

/// What a device holds: a signature blkid knows (`Some("ext4")`), or nothing.
pub fn probe_fs_type(device: &Path) -> Result<Option<String>> {
    // -p: low-level probe, bypassing the blkid cache (which may describe the previous
    // contents of a reused loop device).
    let out = run_status(
        "blkid",
        &[
            os("-p"),
            os("-o"),
            os("value"),
            os("-s"),
            os("TYPE"),
            device.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    )?;
    match out.code {
        Some(0) => {
            let t = out.stdout.trim();
            if t.is_empty() {
                // A signature without a TYPE (e.g. a partition table: PTTYPE). Not blank.
                Ok(Some("unknown (partition table or other signature)".into()))
            } else {
                Ok(Some(t.to_string()))
            }
        }
        // 2: nothing found.
        Some(2) => Ok(None),
        _ => Err(BlockdevError::CommandFailed {
            cmd: format!("blkid -p -o value -s TYPE {}", device.display()),
            status: format!("{:?}", out.code),
            code: out.code,
            stderr: out.stderr.trim().to_string(),
        }),
    }
}

/// True if the first [`BLANK_PROBE_BYTES`] of the device are all zero.
pub fn first_bytes_zero(device: &Path) -> Result<bool> {
    let mut f =
        std::fs::File::open(device).map_err(io_err(format!("open {}", device.display())))?;
    let mut buf = vec![0u8; BLANK_PROBE_BYTES];
    let mut got = 0;
    while got < buf.len() {
        let n = f
            .read(&mut buf[got..])
            .map_err(io_err(format!("read {}", device.display())))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(buf[..got].iter().all(|&b| b == 0))
}

/// What is on a device, for the "format only when blank" rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceContents {
    Blank,
    Filesystem(String),
    /// Non-zero bytes blkid does not recognize: maybe data; never formatted automatically.
    Unknown,
}

pub fn device_contents(device: &Path) -> Result<DeviceContents> {
    if let Some(t) = probe_fs_type(device)? {
        return Ok(DeviceContents::Filesystem(t));
    }
    if first_bytes_zero(device)? {
        Ok(DeviceContents::Blank)
    } else {
        Ok(DeviceContents::Unknown)
    }
}

pub fn check_fs_type(fs_type: &str) -> Result<()> {
    if SUPPORTED_FILESYSTEMS.contains(&fs_type) {
        Ok(())
    } else {
        Err(BlockdevError::UnsupportedFilesystem(fs_type.to_string()))
    }
}

/// Makes `fs_type` on `device`, which must be blank (checked again here: formatting is the
/// one irreversible step in this module).
pub fn mkfs(device: &Path, fs_type: &str) -> Result<()> {
    check_fs_type(fs_type)?;
    match device_contents(device)? {
        DeviceContents::Blank => {}
        DeviceContents::Filesystem(found) => {
            return Err(BlockdevError::NotBlank {
                device: device.display().to_string(),
                found,
            })
        }
        DeviceContents::Unknown => {
            return Err(BlockdevError::NotBlank {
                device: device.display().to_string(),
                found: "unrecognized non-zero data".into(),
            })
        }
    }
    let d = device.as_os_str();
    match fs_type {
        // nodiscard / -K: the volume is blank already and a whole-device discard is a
        // full-size write_zeroes through FUSE. Inode tables are initialized lazily by the
        // kernel after mount (the ext4 default), which keeps mkfs time independent of size.
        "ext4" => run(
            "mkfs.ext4",
            &[
                os("-F"),
                os("-q"),
                os("-m"),
                os("0"),
                os("-E"),
                os("nodiscard"),
                d,
            ],
            MKFS_TIMEOUT,
        )?,
        "xfs" => run("mkfs.xfs", &[os("-f"), os("-q"), os("-K"), d], MKFS_TIMEOUT)?,
        other => return Err(BlockdevError::UnsupportedFilesystem(other.to_string())),
    };
    Ok(())
}

/// Grows the filesystem on `device` (mounted at `mountpoint`) to fill the device.
pub fn grow_fs(device: &Path, mountpoint: &Path, fs_type: &str) -> Result<()> {
    match fs_type {
        // Online ext4 resize needs CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS); name it rather
        // than pass on resize2fs's bare "Permission denied".
        "ext4" => run("resize2fs", &[device.as_os_str()], MKFS_TIMEOUT).map_err(|e| {
            if has_capability(CAP_SYS_RESOURCE) {
                e
            } else {
                BlockdevError::MissingCapability {
                    cmd: format!("resize2fs {}", device.display()),
                    capability: "CAP_SYS_RESOURCE".into(),
                }
            }
        })?,
        "xfs" => run("xfs_growfs", &[mountpoint.as_os_str()], MKFS_TIMEOUT)?,
        other => return Err(BlockdevError::UnsupportedFilesystem(other.to_string())),
    };
    Ok(())
}

/// `CAP_SYS_RESOURCE` from `<linux/capability.h>`.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// True if `cap` is in this process's effective capability set.
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1u64 << cap) != 0)
}

// ---------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------

/// Mounts `device` at `target` with filesystem `fs_type` and `options` (`-o`, joined).
pub fn mount(device: &Path, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
    let mut args: Vec<OsString> = vec!["-t".into(), fs_type.into()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(",").into());
    }
    args.push(device.into());
    args.push(target.into());
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run("mount", &refs, COMMAND_TIMEOUT).map(|_| ())
}

/// Bind-mounts `source` on `target`; read-only needs a second remount step (a plain
/// `mount --bind -o ro` ignores `ro` on older util-linux).
pub fn bind_mount(source: &Path, target: &Path, readonly: bool, options: &[String]) -> Result<()> {
    run(
        "mount",
        &[os("--bind"), source.as_os_str(), target.as_os_str()],
        COMMAND_TIMEOUT,
    )?;
    let mut opts: Vec<String> = vec!["remount".into(), "bind".into()];
    if readonly {
        opts.push("ro".into());
    }
    // Per-mount flags only (nosuid, nodev, noexec, noatime...) apply to a bind remount.
    opts.extend(
        options
            .iter()
            .filter(|o| *o != "bind" && *o != "rw" && *o != "ro")
            .cloned(),
    );
    if opts.len() > 2 {
        let o = opts.join(",");
        if let Err(e) = run(
            "mount",
            &[os("-o"), os(&o), target.as_os_str()],
            COMMAND_TIMEOUT,
        ) {
            let _ = umount(target, false);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target`. `lazy` detaches it even when busy (for mounts on a dead device).
/// "Not mounted" counts as success.
pub fn umount(target: &Path, lazy: bool) -> Result<()> {
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    match super::fuse::umount2(target, flags) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(()),
        Err(e) => Err(BlockdevError::Io {
            op: format!(
                "umount{} {}",
                if lazy { " -l" } else { "" },
                target.display()
            ),
            source: e,
        }),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent_id: u32,
    pub devno: (u32, u32),
    /// The mounted subtree's root within its filesystem (`/loop3` for a bind of a device
    /// node from devtmpfs).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub mount_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountInfo {
    pub fn is_readonly(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, etc.).
fn unescape(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            let v = oct.iter().try_fold(0u32, |acc, c| {
                (b'0'..=b'7')
                    .contains(c)
                    .then(|| acc * 8 + u32::from(c - b'0'))
            });
            if let Some(v) = v.and_then(|v| u8::try_from(v).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// Parses mountinfo text (see proc(5)).
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>> {
    let bad = |line: &str, why: &str| BlockdevError::Parse {
        what: "/proc/self/mountinfo".into(),
        detail: format!("{why}: '{line}'"),
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f
            .iter()
            .position(|x| *x == "-")
            .ok_or_else(|| bad(line, "no '-' separator"))?;
        if sep < 6 || f.len() < sep + 4 {
            return Err(bad(line, "too few fields"));
        }
        out.push(MountInfo {
            id: f[0].parse().map_err(|_| bad(line, "mount id"))?,
            parent_id: f[1].parse().map_err(|_| bad(line, "parent id"))?,
            devno: parse_devno(f[2]).ok_or_else(|| bad(line, "major:minor"))?,
            root: PathBuf::from(unescape(f[3])),
            mount_point: PathBuf::from(unescape(f[4])),
            mount_options: f[5].split(',').map(String::from).collect(),
            fs_type: f[sep + 1].to_string(),
            source: unescape(f[sep + 2]).to_string_lossy().into_owned(),
            super_options: f[sep + 3].split(',').map(String::from).collect(),
        });
    }
    Ok(out)
}

/// The mount table of this process's mount namespace, in mount order (later entries are
/// stacked on earlier ones).
pub fn mountinfo() -> Result<Vec<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read /proc/self/mountinfo"))?;
    parse_mountinfo(&text)
}

/// Normalizes a path for comparison with mountinfo without touching the path itself (which
/// may sit on a dead FUSE mount and fail to `stat`): the parent is canonicalized when it
/// exists, the last component is kept.
pub fn normalize(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(p) => p.join(name),
            Err(_) => path.to_path_buf(),
        },
        _ => path.to_path_buf(),
    }
}

/// The top-most mount at `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountInfo>> {
    let path = normalize(path);
    Ok(mountinfo()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

/// Every mount whose filesystem is on block device `devno` (the device itself and bind
/// mounts of it), plus bind mounts of the device *node* `/dev/<name>` (raw block publish).
pub fn mounts_of_device(devno: (u32, u32), dev_name: &str) -> Result<Vec<MountInfo>> {
    let node_root = PathBuf::from(format!("/{dev_name}"));
    Ok(mountinfo()?
        .into_iter()
        .filter(|m| m.devno == devno || (m.fs_type == "devtmpfs" && m.root == node_root))
        .collect())
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub used_inodes: u64,
    pub free_inodes: u64,
}

/// statvfs(2) of a mounted filesystem.
pub fn statfs(path: &Path) -> Result<FsStats> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| BlockdevError::Parse {
            what: path.display().to_string(),
            detail: "path contains a NUL byte".into(),
        })?;
    // SAFETY: statvfs is plain old data; statvfs(2) fills it for the valid C string `c`.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io_err(format!("statvfs {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    let frsize = s.f_frsize as u64;
    Ok(FsStats {
        total_bytes: s.f_blocks as u64 * frsize,
        used_bytes: (s.f_blocks as u64).saturating_sub(s.f_bfree as u64) * frsize,
        available_bytes: s.f_bavail as u64 * frsize,
        total_inodes: s.f_files as u64,
        used_inodes: (s.f_files as u64).saturating_sub(s.f_ffree as u64),
        free_inodes: s.f_ffree as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let text = "\
36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue
100 25 7:3 / /var/lib/k/staging rw,relatime shared:5 foo:2 - ext4 /dev/loop3 rw
101 25 0:5 /loop3 /var/lib/k/pods/x/dev ro,nosuid - devtmpfs udev rw,size=1k
";
        let m = parse_mountinfo(text).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!(m[1].devno, (7, 3));
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[1].source, "/dev/loop3");
        assert!(m[2].is_readonly());
        assert_eq!(m[2].root, PathBuf::from("/loop3"));
        assert!(parse_mountinfo("1 2 3:4 / /x rw\n").is_err());
    }
}
