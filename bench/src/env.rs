//! What the harness needs from its environment: the tandem binaries, fio (with its nbd
//! ioengine) and qemu-nbd, free loopback ports, and the facts about the machine that go into
//! the report.

use std::net::TcpListener;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::children::run_bounded;

/// Bound on the small commands run for facts and checks (`fio --version` and the like).
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Paths of the tandem binaries.
#[derive(Clone, Debug)]
pub struct Bins {
    pub tandemd: PathBuf,
    pub tandemctl: PathBuf,
}

/// Finds `tandemd` and `tandemctl`: in `--bin-dir` if given; else next to this executable
/// (cargo puts every workspace binary of a profile in the same `target/<profile>/`), then in
/// the workspace's `target/release`.
pub fn find_bins(bin_dir: Option<&Path>) -> Result<Bins> {
    let mut candidates = Vec::new();
    if let Some(d) = bin_dir {
        candidates.push(d.to_path_buf());
    } else {
        if let Some(d) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            candidates.push(d);
        }
        candidates.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("release"),
        );
    }
    for d in &candidates {
        let (tandemd, tandemctl) = (d.join("tandemd"), d.join("tandemctl"));
        if tandemd.is_file() && tandemctl.is_file() {
            return Ok(Bins {
                tandemd: tandemd.canonicalize().unwrap_or(tandemd),
                tandemctl: tandemctl.canonicalize().unwrap_or(tandemctl),
            });
        }
    }
    bail!(
        "tandemd and tandemctl not found in {}; build them first (`cargo build --release -p \
         tandem-node`) or point --bin-dir at the directory that holds them",
        candidates
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )
}

fn output_of(cmd: &mut Command, name: &str) -> Option<String> {
    let out = run_bounded(cmd, name, TOOL_TIMEOUT).ok()?;
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(s)
}

/// Fails with a clear message unless fio with the nbd ioengine and qemu-nbd are installed.
pub fn check_tools(need_qemu: bool) -> Result<()> {
    const HOW: &str = "scripts/test.sh installs them (apt-get install fio qemu-utils), or run \
                       `sudo apt-get install -y fio qemu-utils` yourself";
    let fio = output_of(Command::new("fio").arg("--enghelp"), "fio --enghelp");
    match fio {
        None => bail!("fio is not installed; tandem-bench drives every target with it. {HOW}"),
        Some(s) if !s.split_whitespace().any(|w| w == "nbd") => bail!(
            "this fio has no nbd ioengine (`fio --enghelp` does not list it); install a fio \
             built with libnbd. {HOW}"
        ),
        Some(_) => {}
    }
    if need_qemu && output_of(Command::new("qemu-nbd").arg("--version"), "qemu-nbd").is_none() {
        bail!("qemu-nbd is not installed; it is the baseline. {HOW}");
    }
    Ok(())
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let ls = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("bind an ephemeral port")?;
    ls.iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<Result<Vec<_>>>()
}

/// `syncfs` on the filesystem that holds `dir`, so that no job inherits dirty pages.
pub fn sync_fs(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).with_context(|| format!("open {}", dir.display()))?;
    // SAFETY: a valid open file descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("syncfs");
    }
    Ok(())
}

/// One-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Facts about the machine and the tools, for the report.
pub fn machine_facts(data_dir: &Path, bins: &Bins, need_qemu: bool) -> Vec<(String, String)> {
    let first_line = |s: Option<String>| {
        s.and_then(|s| s.lines().next().map(str::trim).map(String::from))
            .unwrap_or_else(|| "?".into())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let kb: f64 = s.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "?".into());
    let fs = first_line(output_of(
        Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T"])
            .arg(data_dir),
        "findmnt",
    ));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut git = first_line(output_of(
        Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["rev-parse", "--short", "HEAD"]),
        "git",
    ));
    let dirty = output_of(
        Command::new("git").arg("-C").arg(&repo).args([
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]),
        "git",
    )
    .is_some_and(|s| !s.trim().is_empty());
    if dirty {
        git.push_str(" (working tree modified)");
    }
    let mut v = vec![
        (
            "nproc".to_string(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into()),
        ),
        ("cpu".into(), cpu),
        (
            "kernel".into(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into()),
        ),
        ("memory".into(), mem),
        ("filesystem of the data directory".into(), fs),
        (
            "fio".into(),
            first_line(output_of(Command::new("fio").arg("--version"), "fio")),
        ),
    ];
    if need_qemu {
        v.push((
            "qemu-nbd".into(),
            first_line(output_of(
                Command::new("qemu-nbd").arg("--version"),
                "qemu-nbd",
            )),
        ));
    }
    let built = std::fs::metadata(&bins.tandemd)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| format!(" (built {})", crate::run::utc_at(d.as_secs())))
        .unwrap_or_default();
    v.push((
        "tandemd".into(),
        format!("{}{built}", bins.tandemd.display()),
    ));
    v.push(("tandem".into(), format!("git {git}")));
    v
}
