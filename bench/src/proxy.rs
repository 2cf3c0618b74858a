//! The delay proxy: a TCP proxy on loopback that sits in front of a node's data-path
//! listener (the node advertises the proxy's address, so peers' replication traffic to it
//! goes through here) and adds a one-way delay of RTT/2 in each direction.
//!
//! Invariants: bytes leave in the order they arrived, each chunk no earlier than its arrival
//! time plus the delay that was set when it arrived, and chunks are pipelined (a delay does
//! not cap throughput at one chunk per delay). Threads, not tokio tasks: tokio's timer has a
//! 1 ms granularity, too coarse for a 0.5 ms one-way delay; the writer threads set a 1 ns
//! timer slack so that a sleep ends close to its deadline.
//!
//! [`measure_rtt`] measures what a replicated 4 KiB write sees through such a proxy: a
//! ping-pong of a write-sized request and a header-sized reply through a proxy with the same
//! delay, to an echo server.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stats::Percentiles;

/// Chunks queued per direction (back-pressure beyond that).
const CHUNKS_IN_FLIGHT: usize = 1024;
/// Read size per chunk.
const CHUNK_BYTES: usize = 256 << 10;
/// Size of the ping in [`measure_rtt`]: a wire frame header (56 bytes) plus a 4 KiB block.
const PING_REQUEST_BYTES: usize = 56 + 4096;
/// Size of the pong: a reply frame header.
const PING_REPLY_BYTES: usize = 56;

struct Shared {
    target: SocketAddr,
    one_way_ns: AtomicU64,
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both sockets of every open connection (to shut them down on cut).
    conns: Mutex<Vec<TcpStream>>,
}

/// A running proxy; dropping it stops it and closes its connections.
pub struct DelayProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl DelayProxy {
    /// Listens on a fresh loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            one_way_ns: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(DelayProxy { addr, shared })
    }

    /// Sets the injected round-trip time: RTT/2 each way.
    pub fn set_rtt(&self, rtt: Duration) {
        self.shared
            .one_way_ns
            .store(rtt.as_nanos() as u64 / 2, Ordering::SeqCst);
    }

    /// Drops every connection and refuses new ones until [`DelayProxy::heal`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for c in lock(&self.shared.conns).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the blocking accept so that its thread sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: TcpListener, s: Arc<Shared>) {
    for conn in listener.incoming() {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if s.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&s.target, Duration::from_secs(5)) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
            let mut conns = lock(&s.conns);
            // Forget connections that are already closed in both directions.
            conns.retain(|c| c.peer_addr().is_ok());
            conns.push(a);
            conns.push(b);
        }
        for (from, to) in [
            (client.try_clone(), server.try_clone()),
            (server.try_clone(), client.try_clone()),
        ] {
            if let (Ok(from), Ok(to)) = (from, to) {
                let (tx, rx) = sync_channel(CHUNKS_IN_FLIGHT);
                let s1 = s.clone();
                let _ = std::thread::Builder::new()
                    .name("proxy-read".into())
                    .spawn(move || read_side(from, tx, s1));
                let _ = std::thread::Builder::new()
                    .name("proxy-write".into())
                    .spawn(move || write_side(to, rx));
            }
        }
    }
}

/// Reads chunks and stamps each with the time it may leave.
fn read_side(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, s: Arc<Shared>) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if s.cut.load(Ordering::SeqCst) {
            break;
        }
        let due = Instant::now() + Duration::from_nanos(s.one_way_ns.load(Ordering::SeqCst));
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
}

/// Writes chunks in order, each no earlier than its stamp.
fn write_side(mut to: TcpStream, rx: Receiver<(Instant, Vec<u8>)>) {
    // SAFETY: prctl on the calling thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    for (due, chunk) in rx {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// Round-trip time through a proxy set to `rtt`: `samples` ping-pongs of a write-sized
/// request and a reply-header-sized answer, after a few unmeasured ones.
pub fn measure_rtt(rtt: Duration, samples: usize) -> io::Result<Percentiles> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    let server = std::thread::spawn(move || -> io::Result<()> {
        let (mut c, _) = echo.accept()?;
        c.set_nodelay(true)?;
        let mut req = vec![0u8; PING_REQUEST_BYTES];
        let reply = vec![0u8; PING_REPLY_BYTES];
        while c.read_exact(&mut req).is_ok() {
            c.write_all(&reply)?;
        }
        Ok(())
    });
    let proxy = DelayProxy::start(echo_addr)?;
    proxy.set_rtt(rtt);
    let mut c = TcpStream::connect(proxy.addr)?;
    c.set_nodelay(true)?;
    let req = vec![0x5au8; PING_REQUEST_BYTES];
    let mut reply = vec![0u8; PING_REPLY_BYTES];
    let warmup = 5;
    let mut lat_ns = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let t = Instant::now();
        c.write_all(&req)?;
        c.read_exact(&mut reply)?;
        if i >= warmup {
            lat_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(c);
    drop(proxy);
    let _ = server.join();
    Ok(Percentiles::from_ns(lat_ns))
}
