//! The server side: accepts peers, authenticates them, and runs their requests through a
//! [`FrameHandler`].
//!
//! [`serve`] owns the listener and one task per connection. A connection task runs the
//! handshake, then reads frames and decodes every frame one read returns. It answers pings
//! itself and runs the handler of every other request inline: a handler that finishes
//! without waiting (a page-cache write) is answered at once, from the same task, through
//! the connection's [`Outbox`]; one that has to wait (an `fdatasync`, a range lock) moves
//! to a task of its own and answers when it is done (at most [`MAX_CONCURRENT_REQUESTS`]
//! at once per connection; reading stops while they are all busy, which pushes back on the
//! peer through TCP). Replies go out in completion order, batched into one `writev` when
//! several are ready.
//!
//! Invariants:
//! * **An unauthenticated peer never gets a frame decoded**: the frame reader starts only
//!   after [`auth::server_handshake`] succeeds.
//! * **A broken peer breaks only its own connection**: a malformed frame, a reply kind
//!   sent as a request, or an I/O error closes that connection (logged with the peer) and
//!   nothing else.
//! * **Handlers are never cancelled mid-request**, except after [`SHUTDOWN_GRACE`] at
//!   shutdown: a connection that closes (even for a malformed frame) still waits for its
//!   running handlers, so a store write is never abandoned half-way by the wire layer.
//! * **Every request that reaches a handler gets exactly one reply** while the connection
//!   lives: a handler that panics or returns a reply that does not fit its request is
//!   answered with `EIO` instead.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::auth::{self, AuthError};
use super::client::READ_BUF_BYTES;
use super::frame::{self, Frame, FrameError, Kind, MAX_PAYLOAD};
use super::outbox::Outbox;

/// Requests a connection runs at once. Same bound as the NBD frontend's per-connection
/// limit: worst case 128 x 32 MiB of decoded payloads per connection.
pub const MAX_CONCURRENT_REQUESTS: usize = 128;

/// Connections served at once, authenticated or not. A cluster has tens of nodes with a
/// few connections each; 1024 leaves plenty of room while keeping a flood of
/// unauthenticated connections (each held at most [`auth::HANDSHAKE_TIMEOUT`]) from
/// exhausting file descriptors.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long shutdown waits for running handlers before cancelling them. A 32 MiB write
/// plus `fdatasync` takes well under a second on a healthy disk; 10 s covers a stalled
/// device without hanging the daemon's exit indefinitely.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. EMFILE) so the loop does not spin while the
/// condition lasts; short enough that a transient failure costs little.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the node does with a request. `handle` receives every request but pings, and
/// returns its reply, normally built with [`Frame::reply_to`] (errors as an errno in
/// `status`).
#[async_trait::async_trait]
pub trait FrameHandler: Send + Sync + 'static {
    async fn handle(&self, peer_node_id: u64, req: Frame) -> Frame;
}

/// Why a connection ended abnormally (logged by its task, never returned further).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Handshake(#[from] AuthError),
    #[error("malformed frame: {0}")]
    FrameMalformed(#[from] FrameError),
    #[error("peer sent a {0:?} frame, which is not a request")]
    KindNotARequest(Kind),
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error("setup: {0}")]
    Setup(std::io::Error),
}

/// Serves wire connections on `listener` until `shutdown` turns true (or its sender is
/// dropped). Then it stops accepting, lets every connection finish the handlers it is
/// running and send their replies (at most [`SHUTDOWN_GRACE`], then they are cancelled),
/// and returns.
pub async fn serve(
    listener: TcpListener,
    token: Arc<Vec<u8>>,
    my_node_id: u64,
    handler: Arc<dyn FrameHandler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while let Some(done) = connections.try_join_next() {
            log_join_error(done, "wire connection task");
        }
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
            _ = signalled(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "wire server: accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        _ = signalled(&mut shutdown) => break,
                    }
                }
            },
            _ = signalled(&mut shutdown) => break,
        };
        let conn = Connection {
            peer,
            token: token.clone(),
            my_node_id,
            handler: handler.clone(),
            shutdown: shutdown.clone(),
        };
        connections.spawn(async move {
            let _permit = permit;
            conn.run(stream).await;
        });
    }
    drop(listener);

    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(done) = connections.join_next().await {
            log_join_error(done, "wire connection task");
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "wire server: handlers still running after {SHUTDOWN_GRACE:?}; cancelling them"
        );
        connections.shutdown().await;
    }
}

/// Resolves once shutdown is asked for. A dropped sender counts: nobody is left to run
/// the server for.
async fn signalled(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn log_join_error(done: Result<(), tokio::task::JoinError>, what: &str) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "{what} panicked");
        }
    }
}

struct Connection {
    peer: SocketAddr,
    token: Arc<Vec<u8>>,
    my_node_id: u64,
    handler: Arc<dyn FrameHandler>,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let peer = self.peer;
        match self.serve_frames(stream).await {
            Ok(()) => tracing::debug!(%peer, "wire connection closed"),
            Err(e @ ConnectionError::Handshake(AuthError::TokenMismatch { .. })) => {
                tracing::warn!(%peer, error = %e, "wire handshake refused")
            }
            Err(e @ ConnectionError::Handshake(_)) => {
                tracing::info!(%peer, error = %e, "wire handshake failed")
            }
            Err(e) => tracing::info!(%peer, error = %e, "wire connection closed"),
        }
    }

    async fn serve_frames(&mut self, mut stream: TcpStream) -> Result<(), ConnectionError> {
        stream.set_nodelay(true).map_err(ConnectionError::Setup)?;
        let peer = self.peer.to_string();
        let peer_node_id = tokio::select! {
            r = auth::server_handshake(&mut stream, &peer, &self.token, self.my_node_id) => r?,
            _ = signalled(&mut self.shutdown) => return Ok(()),
        };
        tracing::debug!(%peer, peer_node_id, "wire peer authenticated");

        let (mut rd, wr) = stream.into_split();
        let outbox = Arc::new(Outbox::new(wr));
        // However this ends (even dropped, when the server is shut down hard), the socket
        // closes and the writer task ends with it.
        let _close = CloseOnDrop(outbox.clone());
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.run().await })
        };
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
        let mut handlers = JoinSet::new();
        let mut buf = BytesMut::with_capacity(READ_BUF_BYTES);

        let outcome: Result<(), ConnectionError> = loop {
            let req = match frame::decode(&mut buf) {
                Ok(Some(req)) => req,
                Ok(None) => {
                    // Every frame of this read is handled: uncork the replies it made.
                    if outbox.flush().is_err() {
                        break Ok(());
                    }
                    if buf.capacity() - buf.len() < frame::HEADER_LEN {
                        buf.reserve(READ_BUF_BYTES);
                    }
                    tokio::select! {
                        r = rd.read_buf(&mut buf) => match r {
                            Ok(0) => break Ok(()),
                            Ok(_) => continue,
                            Err(e) => break Err(ConnectionError::Read(e)),
                        },
                        Some(done) = handlers.join_next() => {
                            log_join_error(done, "wire handler task");
                            continue;
                        }
                        // The socket failed under a reply: nobody hears us any more.
                        _ = outbox.closed() => break Ok(()),
                        _ = signalled(&mut self.shutdown) => break Ok(()),
                    }
                }
                Err(e) => break Err(e.into()),
            };
            match req.kind {
                Kind::Ping => {
                    let pong = Frame::reply_to(&req, frame::STATUS_OK, Bytes::new());
                    if outbox.push(&pong).is_err() {
                        break Ok(());
                    }
                }
                kind if !kind.is_request() => break Err(ConnectionError::KindNotARequest(kind)),
                _ => {
                    if permits.available_permits() == 0 && outbox.flush().is_err() {
                        // About to wait: nothing corked may wait with us.
                        break Ok(());
                    }
                    let permit = tokio::select! {
                        p = permits.clone().acquire_owned() => p.expect("the handler semaphore is never closed"),
                        _ = signalled(&mut self.shutdown) => break Ok(()),
                    };
                    let handler = self.handler.clone();
                    let mut run =
                        Box::pin(async move { run_handler(&*handler, peer_node_id, req).await });
                    // One poll inline: most requests finish here, with no task to wake.
                    match std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await {
                        Poll::Ready(reply) => {
                            drop(permit);
                            // Corked until this read's frames are all handled. Fails only
                            // if the connection is already closing.
                            let _ = outbox.push(&reply);
                        }
                        Poll::Pending => {
                            let outbox = outbox.clone();
                            handlers.spawn(async move {
                                let reply = run.await;
                                let _ = outbox.send(&reply);
                                drop(permit);
                            });
                        }
                    }
                }
            }
        };
        drop(rd);

        if outcome.is_err() {
            // Corrupt or hostile stream: close the socket now (the peer's pending calls
            // fail at once and it reconnects), but let running handlers finish.
            outbox.close();
        }
        while let Some(done) = handlers.join_next().await {
            log_join_error(done, "wire handler task");
        }
        // Every reply is queued: let them out, then close the connection.
        outbox.flushed().await;
        outbox.close();
        if let Err(e) = writer.await {
            if e.is_panic() {
                tracing::error!(%peer, error = %e, "wire reply writer panicked");
            }
        }
        outcome
    }
}

/// Closes an outbox when dropped.
struct CloseOnDrop(Arc<Outbox>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Runs the handler on one request and vets its reply; a panic or a reply that does not
/// answer this request becomes an `EIO` reply, so the peer's call still ends.
async fn run_handler(handler: &dyn FrameHandler, peer_node_id: u64, req: Frame) -> Frame {
    let header = Frame {
        payload: Bytes::new(),
        ..req.clone()
    };
    let mut fut = handler.handle(peer_node_id, req);
    let outcome = std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(reply)) => Poll::Ready(Ok(reply)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await;
    let eio = libc::EIO as u32;
    match outcome {
        Err(_) => {
            tracing::error!(
                peer_node_id,
                kind = ?header.kind,
                volume_id = header.volume_id,
                "wire handler panicked; answering EIO"
            );
            Frame::reply_to(&header, eio, Bytes::new())
        }
        Ok(reply) => {
            let fits = reply.kind == Kind::Reply
                && reply.request_id == header.request_id
                && reply.payload.len() <= MAX_PAYLOAD
                && reply.flags & !frame::KNOWN_FLAGS == 0;
            if fits {
                reply
            } else {
                tracing::error!(
                    peer_node_id,
                    kind = ?header.kind,
                    reply_kind = ?reply.kind,
                    reply_request_id = reply.request_id,
                    payload_len = reply.payload.len(),
                    "wire handler returned a reply that does not answer its request; answering EIO"
                );
                Frame::reply_to(&header, eio, Bytes::new())
            }
        }
    }
}
