//! The one TCP relay that the multi-process tests and `tandem-bench` put between nodes, to
//! inject what `tc netem` would on a real network (this machine has none): a one-way
//! delay, a cut (connections closed, new ones refused), and a silent partition (a
//! *blackhole*: connections stay open and take bytes, nothing is forwarded until it heals,
//! then what was held goes through, as TCP would retransmit it).
//!
//! * A [`Link`] is the state that relays share: the two directions between two nodes, or
//!   every port bridged between two sites (`tests/src/netns.rs`).
//! * [`serve`] runs one relay on a listener, with a dialer for the far side. Both are
//!   closures, so a caller can bind and dial from inside network namespaces.
//! * [`Relay`] is the common case: a fresh loopback port in front of one address.
//!
//! Invariants: bytes leave in the order they arrived, each chunk no earlier than its
//! arrival plus the delay set when it arrived, and chunks are pipelined (a delay adds
//! latency without capping throughput at one chunk per delay). Threads, not tokio tasks:
//! tokio's timer has 1 ms ticks, too coarse for a 0.5 ms one-way delay; the writer threads
//! set a 1 ns timer slack so that a sleep ends close to its deadline. With no delay set
//! the reader writes each chunk on at once itself, so a 0 ms relay adds one thread wake-up
//! per hop rather than two (a benchmark at 0 ms then measures the nodes, not the relay).
//! Everything stops when its owner drops it, and polls every [`POLL`] at most while idle.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes read at once.
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks queued per direction while they wait out the delay; the sender is
/// back-pressured beyond it.
const CHUNKS_IN_FLIGHT: usize = 1024;
/// How often an idle relay checks for a cut, a heal or a stop.
pub const POLL: Duration = Duration::from_millis(2);
/// How long a relay waits for the far side to accept.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// What relays share: the delay, whether the link is cut or blackholed, and the sockets
/// of every relayed connection (to close them on a cut).
#[derive(Default)]
pub struct Link {
    one_way_ns: AtomicU64,
    cut: AtomicBool,
    blackhole: AtomicBool,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl Link {
    pub fn new() -> Arc<Link> {
        Arc::new(Link::default())
    }

    /// The injected round-trip time: half of it each way.
    pub fn set_rtt(&self, rtt: Duration) {
        self.set_one_way(rtt / 2);
    }

    /// The delay added to every chunk, in each direction.
    pub fn set_one_way(&self, d: Duration) {
        self.one_way_ns.store(d.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Closes every connection and refuses new ones until [`Link::heal`].
    pub fn cut(&self) {
        self.mark_cut();
        self.close_all();
    }

    /// Marks the link cut without closing its connections yet (so that several links can
    /// be cut at one instant, then closed: nothing gets through one after another was cut).
    pub fn mark_cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Closes every relayed connection.
    pub fn close_all(&self) {
        for c in lock(&self.conns).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// A silent partition: see the module documentation.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Heals a cut and a blackhole.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.blackhole.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    pub fn is_blackholed(&self) -> bool {
        self.blackhole.load(Ordering::SeqCst)
    }

    /// Stops every relay on this link for good and closes its connections.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Registers a new relayed connection, unless the link was cut meanwhile. Checked under
    /// the lock that [`Link::close_all`] drains, so no connection outlives a cut.
    fn register(&self, a: &TcpStream, b: &TcpStream) -> bool {
        let mut conns = lock(&self.conns);
        if self.is_cut() {
            return false;
        }
        match (a.try_clone(), b.try_clone()) {
            (Ok(a), Ok(b)) => {
                // Forget connections that are closed already.
                conns.retain(|c| c.peer_addr().is_ok());
                conns.push(a);
                conns.push(b);
                true
            }
            _ => false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// While a link is cut, a relay either keeps its listener and closes what it accepts, or
/// holds no listener at all, so that connecting is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileCut {
    CloseAccepted,
    /// Drop the listener; `bind` makes a new one when the link heals (`SO_REUSEADDR`
    /// lets the port be bound again at once).
    Refuse,
}

/// Runs a relay on the calling thread until `link` stops: each connection accepted from
/// `bind()`'s listener is joined to a connection from `dial()`. Both run on this thread,
/// so each may first enter a network namespace. A failed dial closes the accepted
/// connection (the far node is down). Fails only when the first `bind()` fails.
pub fn serve(
    link: Arc<Link>,
    while_cut: WhileCut,
    mut bind: impl FnMut() -> io::Result<TcpListener>,
    mut dial: impl FnMut() -> io::Result<TcpStream>,
    ready: impl FnOnce(io::Result<SocketAddr>),
) {
    let first = bind().and_then(|l| {
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        Ok((l, addr))
    });
    let mut listener = match first {
        Ok((l, addr)) => {
            ready(Ok(addr));
            Some(l)
        }
        Err(e) => return ready(Err(e)),
    };
    while !link.stopped() {
        if link.is_cut() && while_cut == WhileCut::Refuse {
            listener = None;
            std::thread::sleep(POLL);
            continue;
        }
        let Some(l) = listener.as_ref() else {
            listener = bind()
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .ok();
            if listener.is_none() {
                std::thread::sleep(POLL);
            }
            continue;
        };
        let client = match l.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        if link.is_cut() {
            continue; // dropped: closed
        }
        let Ok(server) = dial() else {
            continue;
        };
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        if !link.register(&client, &server) {
            continue;
        }
        for (from, to) in [
            (client.try_clone(), server.try_clone()),
            (server.try_clone(), client.try_clone()),
        ] {
            if let (Ok(from), Ok(to)) = (from, to) {
                let Ok(direct) = to.try_clone() else { continue };
                let (tx, rx) = sync_channel(CHUNKS_IN_FLIGHT);
                let queued = Arc::new(AtomicU64::new(0));
                let (l1, l2, q2) = (link.clone(), link.clone(), queued.clone());
                let _ = std::thread::Builder::new()
                    .name("relay-read".into())
                    .spawn(move || read_side(from, direct, tx, queued, l1));
                let _ = std::thread::Builder::new()
                    .name("relay-write".into())
                    .spawn(move || write_side(to, rx, q2, l2));
            }
        }
    }
}

/// Reads chunks and stamps each with the time it may leave. With no delay, no blackhole
/// and nothing queued ahead of it, a chunk is written to `direct` (the far socket) from
/// this thread at once: a relay at 0 ms then costs one thread wake-up per hop, not two.
/// `queued` counts chunks handed to the writer and not yet written; only this thread
/// raises it, so when it reads 0 the writer is idle and the order holds.
fn read_side(
    mut from: TcpStream,
    mut direct: TcpStream,
    tx: SyncSender<(Instant, Vec<u8>)>,
    queued: Arc<AtomicU64>,
    link: Arc<Link>,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if link.is_cut() {
            break;
        }
        let delay = link.one_way_ns.load(Ordering::SeqCst);
        if delay == 0 && !link.is_blackholed() && queued.load(Ordering::SeqCst) == 0 {
            if direct.write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        }
        let due = Instant::now() + Duration::from_nanos(delay);
        queued.fetch_add(1, Ordering::SeqCst);
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
}

/// Writes chunks in order, each no earlier than its stamp, and none while blackholed.
fn write_side(
    mut to: TcpStream,
    rx: Receiver<(Instant, Vec<u8>)>,
    queued: Arc<AtomicU64>,
    link: Arc<Link>,
) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes the calling thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    for (due, chunk) in rx {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        while link.is_blackholed() && !link.is_cut() && !link.stopped() {
            std::thread::sleep(POLL);
        }
        if link.is_cut() || to.write_all(&chunk).is_err() {
            break;
        }
        queued.fetch_sub(1, Ordering::SeqCst);
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// A relay on a fresh loopback port in front of `target`, with its own [`Link`] (which it
/// derefs to: `relay.set_rtt(..)`, `relay.cut()`). Dropping it stops it.
pub struct Relay {
    pub addr: SocketAddr,
    link: Arc<Link>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> io::Result<Relay> {
        let link = Link::new();
        let l = link.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                let mut port = 0;
                serve(
                    l,
                    WhileCut::CloseAccepted,
                    || {
                        let l = TcpListener::bind(("127.0.0.1", port))?;
                        port = l.local_addr()?.port();
                        Ok(l)
                    },
                    || TcpStream::connect_timeout(&target, DIAL_TIMEOUT),
                    |addr| {
                        let _ = tx.send(addr);
                    },
                )
            })?;
        let addr = rx
            .recv()
            .map_err(|_| io::Error::other("the relay thread died"))??;
        Ok(Relay {
            addr,
            link,
            thread: Some(thread),
        })
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }
}

impl std::ops::Deref for Relay {
    type Target = Link;
    fn deref(&self) -> &Link {
        &self.link
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.link.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(c: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        c.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn relays_in_order_with_the_delay_and_cuts_and_heals() {
        let r = Relay::start(echo()).unwrap();
        let mut c = TcpStream::connect(r.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(round_trip(&mut c, b"one").unwrap(), b"one");
        r.set_rtt(Duration::from_millis(40));
        let t = Instant::now();
        assert_eq!(round_trip(&mut c, b"two").unwrap(), b"two");
        // Two relayed legs (to the echo server and back), each delayed both ways.
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        r.set_rtt(Duration::ZERO);
        r.cut();
        assert!(
            round_trip(&mut c, b"three").is_err(),
            "a cut closes connections"
        );
        let mut refused = TcpStream::connect(r.addr).unwrap();
        refused
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            round_trip(&mut refused, b"x").is_err(),
            "and refuses new ones"
        );
        r.heal();
        let mut c = TcpStream::connect(r.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(round_trip(&mut c, b"four").unwrap(), b"four");
    }

    #[test]
    fn a_blackhole_holds_bytes_until_it_heals() {
        let r = Relay::start(echo()).unwrap();
        let mut c = TcpStream::connect(r.addr).unwrap();
        assert_eq!(round_trip(&mut c, b"a").unwrap(), b"a");
        r.blackhole();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        c.write_all(b"held").unwrap();
        let mut buf = [0u8; 4];
        assert!(c.read_exact(&mut buf).is_err(), "nothing gets through");
        r.heal();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"held", "what was held goes through after the heal");
    }
}
