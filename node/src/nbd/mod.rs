//! NBD frontend: the newstyle fixed handshake and the transmission phase.
//!
//! Export name = volume name; only volumes attached on this node are exported. Requests on
//! one connection run concurrently (up to [`MAX_INFLIGHT_PER_CONN`]) and replies go out in
//! completion order, as the protocol allows. Every flush is an `fdatasync` of the volume, so
//! a flush on any connection covers writes completed on every connection, and we advertise
//! `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! Hostile input: anything that makes the byte stream ambiguous (bad magic, a write payload
//! larger than the maximum, an over-long option) closes that connection. Anything else (an
//! out-of-range offset, an unknown command, bad flags) gets an error reply and the
//! connection continues. No request touches stored data until its whole payload is in.

//!
//! Modules: [`proto`] holds the wire constants and option-reply encoding, `handshake` the
//! option haggling, `transmission` the request loop and replies; this file the server,
//! its limits and the connection.

mod handshake;
pub mod proto;
mod transmission;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use tandem_engine::volume::{AttachedVolume, VolumeManager};

use crate::metrics::Metrics;

pub use proto::*;

/// Largest option payload accepted during the handshake; real options are a few hundred
/// bytes (a name of at most 4 KiB plus info requests).
pub const MAX_OPTION_BYTES: u32 = 16 << 10;
/// Options one client may send before it must pick an export.
pub const MAX_OPTIONS: usize = 128;
/// A client that has not finished the handshake in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent requests per connection; bounds memory at 128 x 32 MiB worst case per
/// connection, and is deeper than any client's queue (qemu uses 16, fio's iodepth tops out
/// well below).
pub const MAX_INFLIGHT_PER_CONN: usize = 128;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Payload bytes (read replies and write payloads) in flight per connection. Two
/// maximum-size requests fit; a client that pipelines more waits (TCP backpressure) instead
/// of making the daemon buffer 128 x 32 MiB.
pub const MAX_INFLIGHT_BYTES_PER_CONN: usize = 64 << 20;
/// Payload bytes in flight across all connections: bounds the daemon's buffer memory.
pub const MAX_INFLIGHT_BYTES: usize = 1 << 30;
/// Budget unit for the byte semaphores.
const BUDGET_UNIT: usize = 4096;
/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Preferred block size advertised to clients (the store's checksum block).
const PREFERRED_BLOCK: u32 = 4096;

pub struct NbdServer {
    listener: TcpListener,
    volumes: Arc<VolumeManager>,
    metrics: Arc<Metrics>,
}

impl NbdServer {
    pub fn new(listener: TcpListener, volumes: Arc<VolumeManager>, metrics: Arc<Metrics>) -> Self {
        NbdServer {
            listener,
            volumes,
            metrics,
        }
    }

    /// Serves until `shutdown` turns true, then stops accepting, lets connections finish
    /// their in-flight requests (bounded by [`DRAIN_TIMEOUT`]) and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let global_bytes = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES / BUDGET_UNIT));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "NBD connection limit reached; refusing");
                        continue;
                    };
                    let conn = Connection {
                        volumes: self.volumes.clone(),
                        metrics: self.metrics.clone(),
                        shutdown: shutdown.clone(),
                        global_bytes: global_bytes.clone(),
                    };
                    conns.spawn(async move {
                        let _permit = permit;
                        conn.metrics.nbd_connections.inc();
                        match conn.serve(stream).await {
                            Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                            Err(e) => {
                                conn.metrics.nbd_protocol_errors.inc();
                                tracing::info!(%peer, error = %e, "NBD connection closed");
                            }
                        }
                        conn.metrics.nbd_connections.dec();
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("NBD connections did not drain in time; closing them");
            conns.abort_all();
        }
    }
}

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake timed out")]
    HandshakeTimeout,
}

struct Connection {
    volumes: Arc<VolumeManager>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    global_bytes: Arc<Semaphore>,
}

type Reader = BufReader<tokio::net::tcp::OwnedReadHalf>;

impl Connection {
    async fn serve(&self, stream: TcpStream) -> Result<(), ConnError> {
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let chosen =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut rd, &mut wr)).await {
                Err(_) => return Err(ConnError::HandshakeTimeout),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(v))) => v,
            };
        self.transmission(chosen, rd, wr).await
    }

    async fn export_size(&self, vol: &AttachedVolume) -> u64 {
        vol.size_bytes().await
    }
}
