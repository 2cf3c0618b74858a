//! The delay proxy: [`tandem_relay::Relay`] (the one relay the tests use too) on loopback
//! in front of a node's data-path listener. The node advertises the proxy's address, so
//! peers' replication traffic to it goes through here, delayed by RTT/2 in each direction.
//!
//! [`measure_rtt`] measures what a replicated 4 KiB write sees through such a proxy: a
//! ping-pong of a write-sized request and a header-sized reply through a proxy with the same
//! delay, to an echo server.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub use tandem_relay::Relay as DelayProxy;

use crate::stats::Percentiles;

/// Size of the ping in [`measure_rtt`]: a wire frame header (56 bytes) plus a 4 KiB block.
const PING_REQUEST_BYTES: usize = 56 + 4096;
/// Size of the pong: a reply frame header.
const PING_REPLY_BYTES: usize = 56;

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
