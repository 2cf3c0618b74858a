//! The pipelined client side of one authenticated wire connection.
//!
//! [`WireClient`] owns one TCP connection. A call writes its request itself, on its own
//! thread, through the connection's [`Outbox`] (which batches whatever other calls queued
//! meanwhile into the same `writev`); a reader task decodes every reply one read returns
//! and hands each to the call waiting for its request id. A second task only finishes
//! writes the socket could not take at once. Many calls are in flight at once, bounded by
//! [`MAX_IN_FLIGHT`].
//!
//! Invariants:
//! * **Every call ends.** A reply completes it; a broken connection, a malformed frame or a
//!   dropped client fails it with [`WireError::ConnectionLost`]. Once lost, the client is
//!   dead for good ([`WireClient::is_closed`]); every later call fails at once and callers
//!   reconnect.
//! * **A dropped call frees its slot.** Calls are cancel-safe in the sense that dropping
//!   the future (e.g. a caller's `tokio::time::timeout`) releases its in-flight permit and
//!   its pending entry, and a late reply is discarded. The request may still have been sent
//!   and executed by the server: for writes, a timed-out call has an unknown outcome.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use super::auth::{self, AuthError};
use super::frame::{self, Frame, Kind, MAX_PAYLOAD};
use super::outbox::Outbox;

/// Requests in flight per connection. A 10 GbE link at 100 us RTT needs about 32 4-KiB
/// requests in flight to stay busy; 256 leaves room for several volumes sharing one
/// connection and matches the io_uring queue depth ([`crate::io::URING_ENTRIES`]). The
/// payloads are the callers' own buffers, so this bounds the server's work, not our memory.
pub const MAX_IN_FLIGHT: usize = 256;

/// TCP connect bound. Linux retransmits a lost SYN after 1 s, then 2 s more; 3 s allows
/// one retransmission, after which the peer is treated as down and the caller retries.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Read buffer size: big enough to take many small replies per read syscall. Frames
/// larger than this make the decoder reserve their exact size.
pub const READ_BUF_BYTES: usize = 256 * 1024;

/// Errors of the wire client.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connect to {addr} did not finish within {CONNECT_TIMEOUT:?}")]
    ConnectTimedOut { addr: String },
    #[error("connect to {addr}: {source}")]
    ConnectFailed {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Handshake(#[from] AuthError),
    /// The connection broke or the peer sent something malformed; the client is dead.
    #[error("wire connection to {peer} lost")]
    ConnectionLost { peer: String },
    #[error("request payload of {len} bytes exceeds the {max}-byte maximum")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("{kind:?} is not a request kind")]
    KindNotARequest { kind: Kind },
    #[error("peer {peer} answered a {sent:?} with a {got:?}")]
    ReplyUnexpected { peer: String, sent: Kind, got: Kind },
}

/// Replies awaited, by request id. `closed` is set once, under the same lock, so a call
/// either registers before the connection dies (and is failed by it) or sees it dead.
#[derive(Default)]
struct Pending {
    closed: bool,
    waiters: HashMap<u64, oneshot::Sender<Frame>>,
}

struct Shared {
    peer: String,
    pending: Mutex<Pending>,
    in_flight: Semaphore,
    closed: watch::Sender<bool>,
    outbox: Outbox,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // The lock guards a map and a flag, each left consistent by every critical section.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills the connection: every pending call fails, every later call fails at once.
    fn fail(&self) {
        let waiters = {
            let mut p = self.pending();
            p.closed = true;
            std::mem::take(&mut p.waiters)
        };
        // Dropping the senders fails the waiting calls.
        drop(waiters);
        self.in_flight.close();
        // Closed first, so the writer task, which ends when the outbox closes, can tell an
        // orderly end from a failed write.
        self.closed.send_replace(true);
        self.outbox.close();
    }

    fn lost(&self) -> WireError {
        WireError::ConnectionLost {
            peer: self.peer.clone(),
        }
    }
}

/// Removes a call's pending entry when the call ends, however it ends.
struct PendingSlot<'a> {
    shared: &'a Shared,
    request_id: u64,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.shared.pending().waiters.remove(&self.request_id);
    }
}

/// One authenticated, pipelined connection to a peer's wire server.
pub struct WireClient {
    shared: Arc<Shared>,
    peer_node_id: u64,
    next_request_id: AtomicU64,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl std::fmt::Debug for WireClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireClient")
            .field("peer", &self.shared.peer)
            .field("peer_node_id", &self.peer_node_id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl WireClient {
    /// Connects to `addr` (within [`CONNECT_TIMEOUT`]), sets TCP_NODELAY, and runs the
    /// client side of the handshake (within [`auth::HANDSHAKE_TIMEOUT`]).
    pub async fn connect(
        addr: &str,
        token: Arc<Vec<u8>>,
        my_node_id: u64,
    ) -> Result<Arc<WireClient>, WireError> {
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| WireError::ConnectTimedOut {
                addr: addr.to_owned(),
            })?
            .map_err(|source| WireError::ConnectFailed {
                addr: addr.to_owned(),
                source,
            })?;
        stream
            .set_nodelay(true)
            .map_err(|source| WireError::ConnectFailed {
                addr: addr.to_owned(),
                source,
            })?;
        let peer_node_id = auth::client_handshake(&mut stream, addr, &token, my_node_id).await?;
        Ok(Arc::new(WireClient::start(stream, addr, peer_node_id)))
    }

    fn start(stream: TcpStream, peer: &str, peer_node_id: u64) -> WireClient {
        let (rd, wr) = stream.into_split();
        let shared = Arc::new(Shared {
            peer: peer.to_owned(),
            pending: Mutex::new(Pending::default()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            closed: watch::Sender::new(false),
            outbox: Outbox::new(wr),
        });
        let reader = tokio::spawn(read_replies(rd, shared.clone()));
        let writer = tokio::spawn(finish_writes(shared.clone()));
        WireClient {
            shared,
            peer_node_id,
            next_request_id: AtomicU64::new(1),
            reader,
            writer,
        }
    }

    /// Sends `frame` (a request; its `request_id` is assigned here) and waits for the
    /// reply. Waits for an in-flight slot first if [`MAX_IN_FLIGHT`] calls are pending.
    ///
    /// No timeout of its own: wrap it in `tokio::time::timeout`. Dropping the future frees
    /// the slot; see the module doc for what that means for the request.
    pub async fn call(&self, mut frame: Frame) -> Result<Frame, WireError> {
        if !frame.kind.is_request() {
            return Err(WireError::KindNotARequest { kind: frame.kind });
        }
        if frame.payload.len() > MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge {
                len: frame.payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        // Closed when the connection dies, so waiters wake up with an error.
        let _permit = self
            .shared
            .in_flight
            .acquire()
            .await
            .map_err(|_| self.shared.lost())?;

        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        frame.request_id = request_id;
        let (tx, rx) = oneshot::channel();
        let others = {
            let mut p = self.shared.pending();
            if p.closed {
                return Err(self.shared.lost());
            }
            p.waiters.insert(request_id, tx);
            p.waiters.len() - 1
        };
        let _slot = PendingSlot {
            shared: &self.shared,
            request_id,
        };
        // Alone on the connection, the request goes out at once. With others in flight it
        // is corked for one yield, so the calls that are ready to run share one `writev`.
        // Either way it is queued whole before anything awaits, so dropping the call never
        // tears a frame.
        let sent = if others == 0 {
            self.shared.outbox.send(&frame)
        } else {
            self.shared.outbox.send_corked(&frame).await
        };
        if sent.is_err() {
            self.shared.fail();
            return Err(self.shared.lost());
        }
        rx.await.map_err(|_| self.shared.lost())
    }

    /// Round trip of one ping on this connection (queueing behind other traffic included,
    /// which is what the latency tracker wants to see).
    pub async fn ping(&self) -> Result<Duration, WireError> {
        let start = Instant::now();
        let reply = self.call(Frame::ping()).await?;
        let rtt = start.elapsed();
        if reply.kind != Kind::Pong {
            return Err(WireError::ReplyUnexpected {
                peer: self.shared.peer.clone(),
                sent: Kind::Ping,
                got: reply.kind,
            });
        }
        Ok(rtt)
    }

    /// Whether the connection is dead (every call fails; reconnect).
    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Calls waiting for their reply right now.
    pub fn in_flight(&self) -> usize {
        self.shared.pending().waiters.len()
    }

    /// The address this client connected to.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The server's node id, as proved in the handshake.
    pub fn peer_node_id(&self) -> u64 {
        self.peer_node_id
    }
}

impl Drop for WireClient {
    fn drop(&mut self) {
        // No call can be running (they borrow the client); stop the tasks and close the
        // socket rather than wait for the peer to notice.
        self.shared.fail();
        self.reader.abort();
        self.writer.abort();
    }
}

/// Matches replies to waiting calls until the connection ends; then fails the client.
async fn read_replies(mut rd: OwnedReadHalf, shared: Arc<Shared>) {
    let mut closed = shared.closed.subscribe();
    let mut buf = BytesMut::with_capacity(READ_BUF_BYTES);
    let reason: String = loop {
        match frame::decode(&mut buf) {
            Ok(Some(reply)) => {
                if reply.kind.is_request() {
                    break format!(
                        "peer sent a {:?} request on a client connection",
                        reply.kind
                    );
                }
                let waiter = shared.pending().waiters.remove(&reply.request_id);
                // No waiter: the call was dropped (timed out); its reply is discarded.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break format!("malformed frame: {e}"),
        }
        if buf.capacity() - buf.len() < frame::HEADER_LEN {
            buf.reserve(READ_BUF_BYTES);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break "peer closed the connection".to_owned(),
                Ok(_) => {}
                Err(e) => break format!("read: {e}"),
            },
            _ = closed.wait_for(|c| *c) => return,
        }
    };
    if !*shared.closed.borrow() {
        tracing::info!(peer = %shared.peer, %reason, "wire connection lost");
    }
    shared.fail();
}

/// Finishes the writes the socket could not take at once; fails the client when the
/// socket fails.
async fn finish_writes(shared: Arc<Shared>) {
    shared.outbox.run().await;
    if !*shared.closed.borrow() {
        tracing::info!(peer = %shared.peer, "wire connection lost: write failed");
    }
    shared.fail();
}
