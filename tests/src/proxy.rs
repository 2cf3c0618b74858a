//! A userspace TCP proxy for fault injection: sits in front of a listener, can cut every
//! connection through it (and refuse new ones) and heal again, can hold every byte
//! silently (a blackhole: connections stay open, nothing arrives, as in a partition that
//! drops packets) and release them again, and can add a fixed delay to every chunk it
//! forwards. Threads only, loopback only, bounded by its owner's life.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Shared {
    target: String,
    cut: AtomicBool,
    blackhole: AtomicBool,
    stop: AtomicBool,
    delay_us: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
}

/// A running proxy; dropping it stops it.
pub struct Proxy {
    pub addr: String,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a fresh loopback port and forwards to `target`.
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let shared = Arc::new(Shared {
            target: target.to_string(),
            cut: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || accept_loop(listener, s));
        Proxy { addr, shared }
    }

    /// Drops every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Heals a cut and a blackhole.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
        self.shared.blackhole.store(false, Ordering::SeqCst);
    }

    /// A silent partition: connections stay open and accept bytes, but nothing is
    /// forwarded until [`Proxy::heal`] (then what was held goes through, as TCP would
    /// retransmit it).
    pub fn blackhole(&self) {
        self.shared.blackhole.store(true, Ordering::SeqCst);
    }

    pub fn is_blackholed(&self) -> bool {
        self.shared.blackhole.load(Ordering::SeqCst)
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// One-way delay added to every forwarded chunk.
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn accept_loop(listener: TcpListener, s: Arc<Shared>) {
    while !s.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if s.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&s.target) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut conns = s.conns.lock().unwrap();
                    if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                        conns.push(a);
                        conns.push(b);
                    }
                }
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let s = s.clone();
                        std::thread::spawn(move || pump(from, to, s));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, s: Arc<Shared>) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if s.cut.load(Ordering::SeqCst) {
            break;
        }
        while s.blackhole.load(Ordering::SeqCst)
            && !s.cut.load(Ordering::SeqCst)
            && !s.stop.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if s.cut.load(Ordering::SeqCst) {
            break;
        }
        let d = s.delay_us.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
