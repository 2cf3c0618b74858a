//! Child processes of the harness. Every process it starts (tandemd, qemu-nbd, fio,
//! tandemctl) is spawned through [`Guarded::spawn`], which registers its pid; the guard kills
//! it on drop (normal exit and panics unwind through it), the SIGINT/SIGTERM handler kills
//! every registered pid, and each child gets `PR_SET_PDEATHSIG` so that even a SIGKILL of the
//! harness takes its children down. Invariant: no process started here outlives the harness.
//!
//! Children must be spawned from the main thread: the death signal fires when the thread
//! that forked the child exits, so a child spawned from a short-lived thread would die early.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Pids of the running children.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Directories the signal handler removes (the temporary data directory).
static CLEANUP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Poll interval while waiting for a child with a bound.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// A running child process, killed (SIGKILL) and reaped when dropped.
pub struct Guarded {
    child: Child,
    name: String,
}

impl Guarded {
    /// Spawns `cmd` and registers it.
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<Guarded> {
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {name} ({:?})", cmd.get_program()))?;
        lock(&CHILDREN).push(child.id());
        Ok(Guarded {
            child,
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the process has exited (and its status).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit, at most `limit`; kills it and fails after that.
    pub fn wait_bounded(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().context("wait for a child")? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not finish within {limit:?}; killed", self.name);
            }
            std::thread::sleep(WAIT_POLL);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        lock(&CHILDREN).retain(|p| *p != pid);
    }
}

/// Runs `cmd` to completion with captured output, killing it after `limit`.
pub fn run_bounded(cmd: &mut Command, name: &str, limit: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut g = Guarded::spawn(cmd, name)?;
    // Drain both pipes on threads so that a chatty child cannot block on a full pipe.
    let mut out = g.child.stdout.take().context("child stdout")?;
    let mut err = g.child.stderr.take().context("child stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let status = g.wait_bounded(limit)?;
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Registers a directory for removal if the harness is stopped by a signal.
pub fn remove_on_signal(dir: PathBuf) {
    lock(&CLEANUP_DIRS).push(dir);
}

/// SIGKILLs every registered child.
pub fn kill_all() {
    for pid in lock(&CHILDREN).iter() {
        // SAFETY: sending a signal to a child we spawned and have not reaped.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
}

/// Installs the SIGINT/SIGTERM handler: kill every child, remove the temporary data, exit
/// with 130 (SIGINT) or 143 (SIGTERM).
pub fn install_signal_handler() -> Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let code = rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (mut int, mut term) = match (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) {
                    (Ok(i), Ok(t)) => (i, t),
                    _ => {
                        let _ = ready_tx.send(Err("install signal handlers".into()));
                        return None;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    _ = int.recv() => Some(130),
                    _ = term.recv() => Some(143),
                }
            });
            if let Some(code) = code {
                eprintln!("tandem-bench: interrupted; stopping every process it started");
                kill_all();
                for d in lock(&CLEANUP_DIRS).iter() {
                    let _ = std::fs::remove_dir_all(d);
                }
                std::process::exit(code);
            }
        })
        .context("start the signal thread")?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("{e}"),
        Err(_) => bail!("the signal thread exited"),
    }
}

/// Locks a registry even if a panicking thread poisoned it (the data is a plain list).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
