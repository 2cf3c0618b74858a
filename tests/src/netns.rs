//! Sites in network namespaces, bridged by delaying relays.
//!
//! Every site is its own network namespace (`ip netns`) holding only a loopback
//! interface, so nothing in one site can reach another site except through a relay of this
//! module. Nodes listen on, and advertise, `127.0.0.1:PORT` with ports unique across the
//! whole test; in every *other* site a relay listens on the same `127.0.0.1:PORT` and
//! forwards to the node's listener in its own site. So intra-site traffic is direct and
//! every inter-site byte crosses exactly one relay, which delays it by half the pair's RTT
//! in each direction (preserving byte order), and can cut the pair (existing connections
//! closed, new ones refused) and heal it.
//!
//! How a relay crosses namespaces: a socket belongs to the namespace of the thread that
//! created it, and a thread can switch its own namespace with `setns(2)`. A relay thread
//! enters the listening site and binds, then enters the node's site, where it dials once
//! per accepted connection; reading and writing an existing socket does not depend on the
//! thread's namespace. This is the in-process form of the issue's "a unix socket crosses
//! namespaces" (a listening half in one namespace handing bytes over a socket path in the
//! shared filesystem to a connecting half in the other): both are a userspace program with
//! one socket in each namespace copying bytes between them, and the kernel gives neither
//! any other path between the namespaces. This form needs no helper processes and no
//! socket files, and the delay and the cut act in one place.
//!
//! Relays and namespaces are torn down on drop: the relays stop, every process still
//! inside a namespace is killed (SIGKILL, by pid), and the namespace is deleted.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_relay::{Link, WhileCut};

use crate::{free_ports, run_limited, Daemon, DaemonOpts};

/// Where `ip netns add` puts a namespace's handle.
const NETNS_DIR: &str = "/run/netns";
/// How long a relay waits for the node it forwards to to accept (a local dial).
const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `ip` commands may take.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails the test with a clear message unless namespaces can be made here.
pub fn require_netns() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "network-namespace tests need root (ip netns add, setns)"
    );
    crate::require_tool("ip");
}

/// A command that runs `program` inside network namespace `ns` (through `ip netns exec`,
/// which execs the program in place, so the child's pid is the program's), or in the
/// test's own namespace when `ns` is `None`.
pub fn command(ns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match ns {
        None => Command::new(program),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
    }
}

/// Runs `f` on a thread that has entered namespace `ns`: sockets it creates live there.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let handle = open_ns(ns).unwrap_or_else(|e| panic!("open namespace {ns}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&handle).unwrap_or_else(|e| panic!("enter namespace {ns}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn open_ns(ns: &str) -> std::io::Result<File> {
    File::open(format!("{NETNS_DIR}/{ns}"))
}

/// Moves the calling thread (only) into the namespace `handle` refers to.
fn enter(handle: &File) -> std::io::Result<()> {
    // SAFETY: setns on a valid namespace fd; CLONE_NEWNET affects only this thread.
    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// qemu-io on an NBD URI, run inside namespace `ns`; `None` if it ran past `limit`.
pub fn qemu_io_in(ns: &str, uri: &str, cmds: &[&str], limit: Duration) -> Option<Output> {
    crate::require_tool("qemu-io");
    let mut c = command(Some(ns), "qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    run_limited(&mut c, limit)
}

/// What a qemu-io run came to. qemu-io exits 0 even when a request failed, so its output
/// decides too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuIo {
    /// Every request succeeded (and every `read -P` matched).
    Ok,
    /// A `read -P` returned other bytes.
    PatternMismatch(String),
    /// A request or the connection failed.
    Failed(String),
    /// It ran past its limit (killed).
    Blocked,
}

/// [`qemu_io_in`], classified.
pub fn qemu_io_outcome(ns: &str, uri: &str, cmds: &[&str], limit: Duration) -> QemuIo {
    let Some(o) = qemu_io_in(ns, uri, cmds, limit) else {
        return QemuIo::Blocked;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if text.contains("Pattern verification failed") {
        QemuIo::PatternMismatch(text)
    } else if !o.status.success() || text.contains("failed") || text.contains("error") {
        QemuIo::Failed(text)
    } else {
        QemuIo::Ok
    }
}

/// A network namespace with its loopback up; deleted (after killing what runs in it) on
/// drop.
struct Namespace {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = run_limited(Command::new("ip").args(args), IP_TIMEOUT)
        .ok_or_else(|| format!("ip {args:?} ran past {IP_TIMEOUT:?}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Namespace {
    fn create(name: &str) -> Result<Namespace, String> {
        ip(&["netns", "add", name])?;
        // From here on, drop deletes it.
        let ns = Namespace {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn pids(&self) -> Vec<i32> {
        run_limited(
            Command::new("ip").args(["netns", "pids", &self.name]),
            IP_TIMEOUT,
        )
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Only our own processes run in a namespace this test created.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                // SAFETY: sending a signal; the pid is inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns: {e}");
        }
    }
}

/// Sites (one namespace each) and the relays between them. Dropping it stops the relays,
/// kills what runs inside the namespaces and deletes them.
pub struct Sites {
    names: Vec<String>,
    // Declared before `namespaces`, so relays stop before the namespaces go.
    links: BTreeMap<(usize, usize), Arc<Link>>,
    relays: Mutex<Vec<std::thread::JoinHandle<()>>>,
    used_ports: Mutex<HashSet<u16>>,
    namespaces: Vec<Namespace>,
}

/// Short random tag so namespace names are unique across concurrently running tests.
fn tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u32(SEQ.fetch_add(1, Ordering::SeqCst));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:05x}", h.finish() & 0xf_ffff)
}

impl Sites {
    /// One namespace per site name (names of at most 6 characters: namespace names stay
    /// under 16), every pair linked with no delay.
    pub fn new(names: &[&str]) -> Sites {
        require_netns();
        let mut last_err = String::new();
        for _ in 0..5 {
            let t = tag();
            let mut namespaces = Vec::new();
            let mut failed = false;
            for n in names {
                assert!(
                    n.len() <= 6 && !n.is_empty(),
                    "site name '{n}' must be 1 to 6 characters"
                );
                match Namespace::create(&format!("tdm{t}-{n}")) {
                    Ok(ns) => namespaces.push(ns),
                    Err(e) => {
                        last_err = e;
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                continue; // dropping `namespaces` deletes the ones made
            }
            let mut links = BTreeMap::new();
            for i in 0..names.len() {
                for j in i + 1..names.len() {
                    links.insert((i, j), Link::new());
                }
            }
            return Sites {
                names: names.iter().map(|s| s.to_string()).collect(),
                links,
                relays: Mutex::new(Vec::new()),
                used_ports: Mutex::new(HashSet::new()),
                namespaces,
            };
        }
        panic!("could not create network namespaces: {last_err}");
    }

    fn index(&self, site: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == site)
            .unwrap_or_else(|| panic!("no site '{site}'"))
    }

    fn link(&self, a: &str, b: &str) -> &Arc<Link> {
        let (i, j) = (self.index(a), self.index(b));
        assert_ne!(i, j, "a site has no link to itself");
        &self.links[&(i.min(j), i.max(j))]
    }

    /// The namespace name of a site (for `ip netns exec`, [`in_ns`]).
    pub fn ns(&self, site: &str) -> &str {
        &self.namespaces[self.index(site)].name
    }

    /// Round-trip time added between two sites: half of it each way.
    pub fn set_rtt(&self, a: &str, b: &str, rtt: Duration) {
        self.link(a, b).set_rtt(rtt);
    }

    /// [`Sites::set_rtt`] for every pair of sites.
    pub fn set_rtt_everywhere(&self, rtt: Duration) {
        for l in self.links.values() {
            l.set_rtt(rtt);
        }
    }

    /// Cuts `site` off from every other site: every link is marked cut before any
    /// connection is closed, so nothing gets through one link after another was cut.
    /// Existing connections are closed and new ones refused, in both directions.
    pub fn isolate(&self, site: &str) {
        let links: Vec<&Arc<Link>> = self
            .names
            .iter()
            .filter(|n| n.as_str() != site)
            .map(|n| self.link(site, n))
            .collect();
        for l in &links {
            l.mark_cut();
        }
        for l in &links {
            l.close_all();
        }
    }

    /// Cuts the link between two sites (both directions).
    pub fn cut(&self, a: &str, b: &str) {
        self.link(a, b).cut();
    }

    /// Heals the link between two sites.
    pub fn heal(&self, a: &str, b: &str) {
        self.link(a, b).heal();
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        for l in self.links.values() {
            l.heal();
        }
    }

    /// Four listen ports no other node or relay of this test uses.
    pub fn fresh_ports(&self) -> [u16; 4] {
        let mut used = self.used_ports.lock().unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            for p in free_ports() {
                if got.len() < 4 && used.insert(p) {
                    got.push(p);
                }
            }
        }
        [got[0], got[1], got[2], got[3]]
    }

    /// Makes `127.0.0.1:port` of `site` reachable from every other site, through a relay
    /// listening on the same address in each of them.
    pub fn bridge(&self, site: &str, port: u16) {
        let target = self.index(site);
        for (from, name) in self.names.iter().enumerate() {
            if from == target {
                continue;
            }
            let link = self.link(site, name).clone();
            let listen_ns = open_ns(&self.namespaces[from].name).expect("open namespace");
            let target_ns = open_ns(&self.namespaces[target].name).expect("open namespace");
            let (tx, rx) = mpsc::channel();
            let h = std::thread::Builder::new()
                .name(format!("relay-{name}-{port}"))
                .spawn(move || relay(listen_ns, target_ns, port, link, tx))
                .expect("spawn relay");
            match rx.recv() {
                Ok(Ok(())) => self.relays.lock().unwrap().push(h),
                Ok(Err(e)) => panic!("relay for {site} port {port} in {name}: {e}"),
                Err(_) => panic!("relay for {site} port {port} in {name} died"),
            }
        }
    }

    /// Starts a node in `site` (its domain is the site's name), bridged to every other
    /// site on its admin and data-path ports; NBD and metrics stay site-local. With a
    /// `seed`, it joins the seed's cluster.
    pub fn node(&self, site: &str, name: &str, seed: Option<&Daemon>, extra: &[&str]) -> Daemon {
        let ports = self.fresh_ports();
        let [admin, _nbd, _metrics, data] = ports;
        self.bridge(site, admin);
        self.bridge(site, data);
        let mut args: Vec<String> = ["--domain", site, "--name", name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(seed) = seed {
            args.extend([
                "--join".to_string(),
                seed.admin_addr.clone(),
                "--token".to_string(),
                seed.token(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Daemon::start(DaemonOpts {
            netns: Some(self.ns(site).to_string()),
            ports: Some(ports),
            extra_args: args,
            ..Default::default()
        })
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for l in self.links.values() {
            l.stop();
        }
        for h in self.relays.lock().unwrap().drain(..) {
            let _ = h.join();
        }
        // `namespaces` drop next: kill what runs inside, delete.
    }
}

fn bind_in(ns: &File, port: u16) -> std::io::Result<TcpListener> {
    enter(ns)?;
    TcpListener::bind(("127.0.0.1", port))
}

/// One relay ([`tandem_relay::serve`]): listens on `127.0.0.1:port` in `listen_ns`, dials
/// the same address in `target_ns`. While the link is cut it holds no listener, so
/// connecting is refused.
fn relay(
    listen_ns: File,
    target_ns: File,
    port: u16,
    link: Arc<Link>,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    tandem_relay::serve(
        link,
        WhileCut::Refuse,
        || bind_in(&listen_ns, port),
        || {
            // Dialled from the target namespace: it lands on the node's listener.
            enter(&target_ns)?;
            TcpStream::connect_timeout(&target, RELAY_CONNECT_TIMEOUT)
        },
        |r| {
            let _ = ready.send(r.map(|_| ()).map_err(|e| e.to_string()));
        },
    );
}
