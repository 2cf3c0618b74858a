//! The fault-injection proxy in front of a node's data-path listener: the one relay of
//! `tandem-relay` (shared with tandem-bench), addressed by string as the harness does. It
//! can cut every connection (and refuse new ones) and heal, hold every byte silently (a
//! blackhole: a partition that drops packets) and release them, and delay every chunk.

use std::net::SocketAddr;
use std::time::Duration;

use tandem_relay::Relay;

/// A running proxy; dropping it stops it.
pub struct Proxy {
    pub addr: String,
    relay: Relay,
}

impl Proxy {
    /// Listens on a fresh loopback port and forwards to `target`.
    pub fn start(target: &str) -> Proxy {
        let target: SocketAddr = target
            .parse()
            .unwrap_or_else(|e| panic!("proxy target '{target}': {e}"));
        let relay = Relay::start(target).expect("start the proxy");
        Proxy {
            addr: relay.addr.to_string(),
            relay,
        }
    }

    /// Drops every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.relay.cut();
    }

    /// Heals a cut and a blackhole.
    pub fn heal(&self) {
        self.relay.heal();
    }

    /// A silent partition: connections stay open and accept bytes, but nothing is
    /// forwarded until [`Proxy::heal`] (then what was held goes through, as TCP would
    /// retransmit it).
    pub fn blackhole(&self) {
        self.relay.blackhole();
    }

    pub fn is_blackholed(&self) -> bool {
        self.relay.is_blackholed()
    }

    pub fn is_cut(&self) -> bool {
        self.relay.is_cut()
    }

    /// One-way delay added to every forwarded chunk.
    pub fn set_delay(&self, d: Duration) {
        self.relay.set_one_way(d);
    }
}
