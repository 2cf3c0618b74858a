//! Test harness: spawns real `tandemd` processes and drives them with real clients
//! (`tandemctl`, qemu-io, qemu-img, nbdinfo).
//!
//! Binaries come from the cargo target directory next to the test executable; the test
//! command (`scripts/test.sh`) builds them first. Every wait here is bounded.

pub mod csi;
pub mod netns;
pub mod proxy;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to print its addresses.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of a workspace binary (`tandemd`, `tandemctl`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins), or run scripts/test.sh",
        p.display()
    );
    p
}

/// Fails the test with a clear message when a required client is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool '{name}' is not installed; scripts/test.sh installs it (qemu-utils, libnbd-bin, fio)"
    );
}

/// The I/O engine tests run with: `TANDEM_TEST_IO_ENGINE` (uring or std), default uring.
pub fn io_engine() -> String {
    std::env::var("TANDEM_TEST_IO_ENGINE").unwrap_or_else(|_| "uring".into())
}

/// Options for a daemon.
#[derive(Clone, Debug, Default)]
pub struct DaemonOpts {
    pub pool_size: Option<String>,
    pub io_engine: Option<String>,
    pub extra_args: Vec<String>,
    /// Put a [`proxy::Proxy`] in front of the data-path listener and advertise it, so
    /// peers' replication traffic to this node can be cut or delayed.
    pub data_proxy: bool,
    /// Run the daemon (and `ctl`, `metrics`) inside this network namespace
    /// ([`netns::Sites`]); `None` runs in the test's own namespace.
    pub netns: Option<String>,
    /// Listen ports `[admin, nbd, metrics, data]` to use instead of fresh ones, for relays
    /// that must exist before the daemon starts ([`netns::Sites`]).
    pub ports: Option<[u16; 4]>,
}

/// A running tandemd with its own data directory.
pub struct Daemon {
    child: Option<Child>,
    /// Listen ports, chosen once so that restarts keep their addresses (peers dial them).
    ports: [u16; 4],
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub opts: DaemonOpts,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub metrics_addr: String,
    pub log_path: PathBuf,
    /// The data-path proxy, when `DaemonOpts::data_proxy` is set.
    pub proxy: Option<proxy::Proxy>,
}

/// What a CLI call printed.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Daemon {
    /// Starts a daemon on a fresh temporary data directory, on ephemeral loopback ports.
    pub fn start(opts: DaemonOpts) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let mut d = Daemon {
            child: None,
            ports: opts.ports.unwrap_or_else(free_ports),
            log_path: tmp.path().join("tandemd.log"),
            data_dir,
            _tmp: Some(tmp),
            opts,
            admin_addr: String::new(),
            nbd_addr: String::new(),
            metrics_addr: String::new(),
            proxy: None,
        };
        d.spawn();
        d
    }

    /// Starts a daemon that is expected to fail start-up; returns its log once it exited.
    pub fn start_expect_failure(opts: DaemonOpts) -> String {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(bin("tandemd"));
        let engine = opts.io_engine.clone().unwrap_or_else(io_engine);
        tandem_harness::tandemd_args(&mut cmd, &tmp.path().join("data"), free_ports(), &engine);
        let out = run_bounded(cmd.args(&opts.extra_args), START_TIMEOUT);
        assert!(!out.status.success(), "tandemd was expected to fail");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The cluster join token this daemon printed (its `tandemctl cluster token show`).
    pub fn token(&self) -> String {
        self.ctl_json(&["cluster", "token", "show"])["token"]
            .as_str()
            .expect("token")
            .to_string()
    }

    /// Starts a daemon that joins `seed`'s cluster, with extra flags.
    pub fn join(seed: &Daemon, extra: &[&str]) -> Daemon {
        Daemon::join_with(seed, extra, DaemonOpts::default())
    }

    /// Starts a daemon that joins `seed`'s cluster, with extra flags and options.
    pub fn join_with(seed: &Daemon, extra: &[&str], mut opts: DaemonOpts) -> Daemon {
        let mut args = vec![
            "--join".to_string(),
            seed.admin_addr.clone(),
            "--token".to_string(),
            seed.token(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        opts.extra_args.extend(args);
        Daemon::start(opts)
    }

    /// (Re)starts the process on the same data directory. A first start whose port was
    /// taken between choosing it and binding it retries on fresh ports.
    pub fn spawn(&mut self) {
        let first_start = !self.data_dir.exists();
        for attempt in 0..3 {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log)
                    if first_start
                        && attempt < 2
                        && self.opts.ports.is_none()
                        && log.contains("Address already in use") =>
                {
                    self.ports = free_ports();
                }
                Err(log) => panic!("tandemd did not become ready; log:\n{log}"),
            }
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log");
        let mut cmd = self.command(bin("tandemd"));
        let data = self.ports[3];
        let engine = self.opts.io_engine.clone().unwrap_or_else(io_engine);
        tandem_harness::tandemd_args(&mut cmd, &self.data_dir, self.ports, &engine);
        if let Some(p) = &self.opts.pool_size {
            cmd.args(["--pool-size", p]);
        }
        if self.opts.data_proxy {
            let target = format!("127.0.0.1:{data}");
            if self.proxy.is_none() {
                self.proxy = Some(proxy::Proxy::start(&target));
            }
            if let Some(p) = &self.proxy {
                cmd.args(["--advertise-data-addr", &p.addr]);
            }
        }
        cmd.args(&self.opts.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn tandemd");
        let stdout = child.stdout.take().expect("stdout");
        let addrs = match tandem_harness::wait_ready(stdout, START_TIMEOUT) {
            Ok(a) => a,
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                return Err(format!("{why}\n{log}"));
            }
        };
        self.admin_addr = addrs.admin;
        self.nbd_addr = addrs.nbd;
        self.metrics_addr = addrs.metrics;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded). Returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("tandemd did not stop within {STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd_addr)
    }

    /// A command that runs `program` where this daemon runs (inside its network
    /// namespace, if it has one).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns::command(self.opts.netns.as_deref(), program)
    }

    /// Runs tandemctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        let out = run_bounded(
            self.command(bin("tandemctl"))
                .arg("--endpoint")
                .arg(format!("http://{}", self.admin_addr))
                .args(args),
            Duration::from_secs(120),
        );
        CtlOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs tandemctl, expects success, returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert_eq!(o.code, 0, "tandemctl {args:?} failed: {}", o.stderr);
        o.stdout
    }

    /// Runs `tandemctl -j ...`, expects success, parses JSON.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        let out = self.ctl_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("tandemctl {args:?} printed invalid JSON ({e}): {out}"))
    }

    /// Waits (up to 30 s) for an alert whose kind is one of `kinds`, and returns it. Alerts
    /// are raised by a raft proposal in the background, so they can trail the event (and the
    /// state change that is already visible) by a few milliseconds.
    pub fn wait_alert(&self, kinds: &[&str]) -> serde_json::Value {
        eventually(
            Duration::from_secs(30),
            &format!("an alert of kind {kinds:?}"),
            || {
                let alerts = self.ctl_json(&["alerts", "show"]);
                alerts
                    .as_array()?
                    .iter()
                    .find(|al| kinds.iter().any(|k| al["kind"] == *k))
                    .cloned()
            },
        )
    }

    /// Creates and attaches a volume, returning its NBD URI.
    pub fn create_attached(&self, name: &str, size: &str) -> String {
        self.ctl_ok(&["volume", "create", name, "--size", size]);
        self.ctl_ok(&["volume", "attach", name]);
        self.nbd_uri(name)
    }

    /// The Prometheus text from /metrics.
    pub fn metrics(&self) -> String {
        match &self.opts.netns {
            None => http_get(&self.metrics_addr, "/metrics"),
            Some(ns) => netns::in_ns(ns, || http_get(&self.metrics_addr, "/metrics")),
        }
    }

    /// Value of one metric series (the first line that starts with `series`), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Path of a volume's data file in the pool (to corrupt it behind the daemon's back).
    pub fn data_file(&self, volume: &str) -> PathBuf {
        let v = self.ctl_json(&["volume", "inspect", volume]);
        let id = v["id"].as_str().expect("volume id");
        self.data_dir.join("pool").join(format!("{id}.data"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Held by tests that measure latency through the relays (the domain and site tests): they
/// run one at a time within their test binary, so that another multi-process test's load
/// on this 2-core machine does not show up as injected round-trip time. Seen without it:
/// 3.9 ms measured for 2 ms injected, with the other site tests running beside it.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Retries `f` until it returns `Some`, for at most `limit`; panics naming `what` after.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Four distinct free loopback ports. The listeners are held until all four are chosen, so
/// they differ; another process could still take one before tandemd binds it, which the
/// start-up error would show.
pub fn free_ports() -> [u16; 4] {
    tandem_harness::free_ports().expect("bind ephemeral ports")
}

/// A plain HTTP/1.0 GET on loopback.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read response");
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(body)
}

/// Runs a command with a time limit. `None` when the limit passed (the command was
/// killed), so a blocked client can be told from one that failed.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs a command with a time limit; fails the test when the limit passes.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    run_limited(cmd, limit).unwrap_or_else(|| panic!("{cmd:?} ran past {limit:?}"))
}

/// Runs qemu-io on an NBD URI with the given `-c` commands.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    require_tool("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    run_bounded(&mut c, Duration::from_secs(300))
}

/// Runs qemu-io and asserts it succeeded without reporting a failed request or a pattern
/// mismatch (qemu-io exits 0 even when a request fails, so its output is checked too).
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io(uri, cmds);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("failed")
            && !text.contains("Pattern verification")
            && !text.contains("error"),
        "qemu-io {cmds:?} on {uri} failed:\n{text}"
    );
    text
}
