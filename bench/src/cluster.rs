//! The local cluster: `tandemd` processes on loopback, each with its own data directory and
//! free ports, and a [`DelayProxy`] in front of its data-path listener that it advertises to
//! its peers (so the harness can delay or cut replication traffic into any node). Node 1
//! bootstraps the cluster; the others join it with its token. Plus the `qemu-nbd` baseline.
//!
//! Every process lives in a [`Guarded`], so it dies with the harness.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::children::{run_bounded, Guarded};
use crate::env::{free_ports, Bins};
use crate::proxy::DelayProxy;

/// How long a daemon may take to print its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one tandemctl call.
const CTL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the cluster may take to show every node online.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a volume's replicas may take to be in sync after create/attach.
pub const IN_SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest measured RTT synchronous replication may enter (`--sync-max-rtt`): far above any
/// injected RTT, so that the latency gate stays out of the measurement.
const SYNC_MAX_RTT: &str = "1000ms";

/// One running tandemd.
pub struct Node {
    /// 1-based, as in the report.
    pub index: usize,
    pub name: String,
    pub admin_addr: String,
    pub nbd_addr: String,
    pub data_addr: SocketAddr,
    pub proxy: DelayProxy,
    pub log_path: PathBuf,
    process: Guarded,
}

impl Node {
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// The cluster.
pub struct Cluster {
    pub nodes: Vec<Node>,
    bins: Bins,
}

impl Cluster {
    /// Starts `n` nodes under `dir` and waits until all are online.
    pub fn start(bins: &Bins, dir: &Path, n: usize, io_engine: &str) -> Result<Cluster> {
        let mut c = Cluster {
            nodes: Vec::new(),
            bins: bins.clone(),
        };
        for index in 1..=n {
            let join = if index == 1 {
                None
            } else {
                let token = c.ctl_json(1, &["cluster", "token", "show"])?["token"]
                    .as_str()
                    .context("cluster token show printed no token")?
                    .to_string();
                Some((c.nodes[0].admin_addr.clone(), token))
            };
            let node = start_node(bins, dir, index, io_engine, join)?;
            c.nodes.push(node);
            c.wait_online(index)?;
        }
        let list = c.ctl_json(1, &["cluster", "list"])?;
        for node in &mut c.nodes {
            node.name = list
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|x| x["admin_addr"].as_str() == Some(node.admin_addr.as_str()))
                })
                .and_then(|x| x["name"].as_str())
                .map(String::from)
                .with_context(|| format!("node {} is not in `cluster list`", node.index))?;
        }
        Ok(c)
    }

    fn wait_online(&self, want: usize) -> Result<()> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        loop {
            let online = self
                .ctl_json(1, &["cluster", "list"])
                .ok()
                .and_then(|v| {
                    v.as_array().map(|a| {
                        a.iter()
                            .filter(|x| x["health"].as_str().unwrap_or("online") == "online")
                            .count()
                    })
                })
                .unwrap_or(0);
            if online >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster does not show {want} online nodes after {JOIN_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Node::pid).collect()
    }

    /// Sets the injected RTT on every node's data-path proxy.
    pub fn set_rtt(&self, rtt: Duration) {
        for n in &self.nodes {
            n.proxy.set_rtt(rtt);
        }
    }

    /// Runs tandemctl against node `index` (1-based); returns stdout.
    pub fn ctl(&self, index: usize, args: &[&str]) -> Result<String> {
        let node = &self.nodes[index - 1];
        let out = run_bounded(
            Command::new(&self.bins.tandemctl)
                .arg("--endpoint")
                .arg(format!("http://{}", node.admin_addr))
                .args(args),
            "tandemctl",
            CTL_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "tandemctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `tandemctl -j ...`, parsed.
    pub fn ctl_json(&self, index: usize, args: &[&str]) -> Result<Value> {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        let out = self.ctl(index, &a)?;
        serde_json::from_str(&out)
            .with_context(|| format!("tandemctl {} printed invalid JSON: {out}", args.join(" ")))
    }

    /// Creates a volume with its replicas on the first `rf` nodes, attaches it on node 1 and
    /// returns its NBD URI.
    pub fn create_volume(&self, name: &str, size_mib: u64, rf: usize) -> Result<String> {
        self.create_volume_with(name, size_mib, rf, &[])
    }

    /// [`Cluster::create_volume`] with more `volume create` flags.
    pub fn create_volume_with(
        &self,
        name: &str,
        size_mib: u64,
        rf: usize,
        extra: &[&str],
    ) -> Result<String> {
        let nodes: Vec<&str> = self.nodes[..rf].iter().map(|n| n.name.as_str()).collect();
        let size = format!("{size_mib}MiB");
        let repl = rf.to_string();
        let placement = nodes.join(",");
        let mut args = vec![
            "volume", "create", name, "--size", &size, "--repl", &repl, "--nodes", &placement,
        ];
        args.extend_from_slice(extra);
        self.ctl(1, &args)?;
        self.ctl(1, &["volume", "attach", name])?;
        Ok(format!("nbd://{}/{name}", self.nodes[0].nbd_addr))
    }

    /// The volume as `volume inspect -j` shows it.
    pub fn inspect(&self, name: &str) -> Result<Value> {
        self.ctl_json(1, &["volume", "inspect", name])
    }

    /// Whether every replica of `v` (an inspect result) is in sync.
    pub fn all_in_sync(v: &Value, rf: usize) -> bool {
        v["replicas"].as_array().is_some_and(|r| {
            r.len() == rf && r.iter().all(|x| x["state"].as_str() == Some("in-sync"))
        })
    }

    /// Waits until every replica of the volume is in sync.
    pub fn wait_in_sync(&self, name: &str, rf: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.inspect(name)?;
            if Cluster::all_in_sync(&v, rf) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("volume {name}: replicas not in sync after {limit:?}: {v}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn start_node(
    bins: &Bins,
    dir: &Path,
    index: usize,
    io_engine: &str,
    join: Option<(String, String)>,
) -> Result<Node> {
    let node_dir = dir.join(format!("node{index}"));
    std::fs::create_dir_all(&node_dir).with_context(|| format!("create {}", node_dir.display()))?;
    let log_path = node_dir.join("tandemd.log");
    let ports = tandem_harness::free_ports().context("bind ephemeral ports")?;
    let data_addr: SocketAddr = format!("127.0.0.1:{}", ports[3]).parse()?;
    let proxy = DelayProxy::start(data_addr).context("start the data-path proxy")?;
    let log = std::fs::File::create(&log_path).context("create the daemon log")?;
    let mut cmd = Command::new(&bins.tandemd);
    tandem_harness::tandemd_args(&mut cmd, &node_dir.join("data"), ports, io_engine);
    cmd.args(["--advertise-data-addr", &proxy.addr.to_string()])
        .args(["--sync-max-rtt", SYNC_MAX_RTT])
        .args(["--log", "warn"]);
    if let Some((seed, token)) = &join {
        cmd.args(["--join", seed, "--token", token]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    let mut process = Guarded::spawn(&mut cmd, &format!("tandemd node {index}"))?;
    let stdout = process
        .child_mut()
        .stdout
        .take()
        .context("tandemd stdout")?;
    let addrs = tandem_harness::wait_ready(stdout, START_TIMEOUT).map_err(|why| {
        anyhow!(
            "tandemd node {index}: {why}; log ({}):\n{}",
            log_path.display(),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    })?;
    Ok(Node {
        index,
        name: String::new(),
        admin_addr: addrs.admin,
        nbd_addr: addrs.nbd,
        data_addr,
        proxy,
        log_path,
        process,
    })
}

/// `qemu-nbd` serving a raw file: the baseline NBD server.
pub struct QemuNbd {
    pub uri: String,
    process: Guarded,
}

/// How long qemu-nbd may take to listen.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(20);

impl QemuNbd {
    /// The flags of `scripts/bench-nbd.sh`: raw format, writeback cache, thread-pool AIO.
    pub fn start(dir: &Path, size_mib: u64, export: &str) -> Result<QemuNbd> {
        std::fs::create_dir_all(dir)?;
        let img = dir.join(format!("{export}.raw"));
        let f = std::fs::File::create(&img).context("create the qemu-nbd image")?;
        f.set_len(size_mib << 20)
            .context("size the qemu-nbd image")?;
        drop(f);
        let port = free_ports(1)?[0];
        let log = std::fs::File::create(dir.join("qemu-nbd.log"))?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-x", export, "--bind", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--persistent", "--cache=writeback", "--aio=threads"])
            .arg(&img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let mut process = Guarded::spawn(&mut cmd, "qemu-nbd")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + QEMU_START_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(st) = process.try_wait() {
                bail!(
                    "qemu-nbd exited ({st}); see {}",
                    dir.join("qemu-nbd.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("qemu-nbd did not listen within {QEMU_START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(QemuNbd {
            uri: format!("nbd://127.0.0.1:{port}/{export}"),
            process,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}
