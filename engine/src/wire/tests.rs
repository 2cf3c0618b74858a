//! End-to-end tests of the wire over loopback TCP: a real [`serve`] loop, real
//! [`WireClient`]s and raw sockets playing broken or hostile peers. Every await is bounded
//! by [`STEP_TIMEOUT`], so a regression fails instead of hanging CI.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::auth::{self, AuthError};
use super::client::MAX_IN_FLIGHT;
use super::frame::{self, Frame, Kind, MAX_PAYLOAD};
use super::{serve, FrameHandler, WireClient, WireError};

/// Bound on any single step of a test. Loopback steps take microseconds; this only has to
/// be short enough that a hang is reported quickly.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

const TOKEN: &[u8] = b"cluster-token-for-tests";
const SERVER_NODE: u64 = 1;
const CLIENT_NODE: u64 = 2;

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP_TIMEOUT:?}"))
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

fn token() -> Arc<Vec<u8>> {
    Arc::new(TOKEN.to_vec())
}

/// A handler whose behaviour depends on the request kind:
/// * `Write`: answers with the payload, every byte plus one, after a few yields that vary
///   per request (so replies come back out of order);
/// * `Read`: answers `length` bytes, each the low byte of `offset`;
/// * `Flush`: waits until `gate` opens, then answers ok;
/// * `HotRegions`: panics;
/// * anything else: `EINVAL`.
struct TestHandler {
    calls: AtomicUsize,
    gate: watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl FrameHandler for TestHandler {
    async fn handle(&self, peer_node_id: u64, req: Frame) -> Frame {
        assert_eq!(peer_node_id, CLIENT_NODE);
        self.calls.fetch_add(1, Ordering::SeqCst);
        match req.kind {
            Kind::Write => {
                for _ in 0..(req.offset % 7) {
                    tokio::task::yield_now().await;
                }
                let out: Vec<u8> = req.payload.iter().map(|b| b.wrapping_add(1)).collect();
                Frame::reply_to(&req, frame::STATUS_OK, out.into())
            }
            Kind::Read => {
                let out = vec![req.offset as u8; req.length as usize];
                Frame::reply_to(&req, frame::STATUS_OK, out.into())
            }
            Kind::Flush => {
                let mut gate = self.gate.clone();
                let _ = gate.wait_for(|open| *open).await;
                Frame::reply_to(&req, frame::STATUS_OK, Bytes::new())
            }
            Kind::HotRegions => panic!("test handler panics on purpose"),
            _ => Frame::reply_to(&req, libc::EINVAL as u32, Bytes::new()),
        }
    }
}

struct TestServer {
    addr: String,
    handler: Arc<TestHandler>,
    shutdown: watch::Sender<bool>,
    gate: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (gate, gate_rx) = watch::channel(false);
        let handler = Arc::new(TestHandler {
            calls: AtomicUsize::new(0),
            gate: gate_rx,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            token(),
            SERVER_NODE,
            handler.clone(),
            shutdown_rx,
        ));
        TestServer {
            addr,
            handler,
            shutdown,
            gate,
            task,
        }
    }

    async fn client(&self) -> Arc<WireClient> {
        bounded(
            "connect",
            WireClient::connect(&self.addr, token(), CLIENT_NODE),
        )
        .await
        .expect("connect and handshake")
    }

    fn calls(&self) -> usize {
        self.handler.calls.load(Ordering::SeqCst)
    }

    /// A raw socket that has passed the handshake, free to misbehave afterwards.
    async fn raw_authenticated(&self) -> TcpStream {
        let mut s = bounded("raw connect", TcpStream::connect(&self.addr))
            .await
            .unwrap();
        let server_node = bounded(
            "raw handshake",
            auth::client_handshake(&mut s, &self.addr, TOKEN, CLIENT_NODE),
        )
        .await
        .unwrap();
        assert_eq!(server_node, SERVER_NODE);
        s
    }
}

fn write_req(i: u64, payload: Vec<u8>) -> Frame {
    Frame::request(
        Kind::Write,
        9,
        4,
        i,
        payload.len() as u32,
        Bytes::from(payload),
    )
}

fn flush_req() -> Frame {
    Frame::request(Kind::Flush, 9, 4, 0, 0, Bytes::new())
}

/// Reads until the server closes the socket; a reset counts as closed too.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = bounded("server closing the connection", s.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_get_their_own_replies() {
    // 500 calls on one connection, more than MAX_IN_FLIGHT, with distinct payloads and
    // replies completing out of order: a mix-up of request ids would show as a wrong
    // payload or offset.
    let server = TestServer::start().await;
    let client = server.client().await;
    assert_eq!(client.peer_node_id(), SERVER_NODE);
    let mut calls = JoinSet::new();
    for i in 0..500u64 {
        let client = client.clone();
        calls.spawn(async move {
            let len = 1 + (i as usize * 37) % 3000;
            let payload: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            let reply = client.call(write_req(i, payload.clone())).await.unwrap();
            assert_eq!(reply.kind, Kind::Reply);
            assert_eq!(reply.status, frame::STATUS_OK);
            assert_eq!(reply.offset, i, "reply matched to the wrong request");
            assert_eq!((reply.volume_id, reply.generation), (9, 4));
            let expected: Vec<u8> = payload.iter().map(|b| b.wrapping_add(1)).collect();
            assert_eq!(&reply.payload[..], &expected[..], "payload of request {i}");
        });
    }
    bounded("500 pipelined calls", async {
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert_eq!(server.calls(), 500);
    assert_eq!(client.in_flight(), 0);

    // Large payloads take the bypass path of the write buffers; check one both ways.
    let big = Frame::request(Kind::Read, 9, 4, 3, 8 << 20, Bytes::new());
    let reply = bounded("8 MiB read", client.call(big)).await.unwrap();
    assert_eq!(reply.payload.len(), 8 << 20);
    assert!(reply.payload.iter().all(|b| *b == 3));
    let big_write = write_req(5, vec![7u8; 8 << 20]);
    let reply = bounded("8 MiB write", client.call(big_write))
        .await
        .unwrap();
    assert!(reply.payload.iter().all(|b| *b == 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_larger_than_the_socket_buffers_arrive_whole_both_ways() {
    // 48 concurrent 1 MiB writes, echoed back at the same size: far more than loopback's
    // socket buffers hold, so both outboxes fill, park, and finish from their run tasks
    // while more frames queue behind. A torn or reordered frame fails its checksum (the
    // connection dies) or shows as a wrong payload.
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut calls = JoinSet::new();
    for i in 0..48u64 {
        let client = client.clone();
        calls.spawn(async move {
            let payload = vec![i as u8; 1 << 20];
            let reply = client.call(write_req(i, payload)).await.unwrap();
            assert_eq!(reply.offset, i);
            assert!(reply
                .payload
                .iter()
                .all(|b| *b == (i as u8).wrapping_add(1)));
        });
    }
    bounded("48 MiB each way", async {
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert!(!client.is_closed());
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn ping_returns_a_small_positive_rtt() {
    let server = TestServer::start().await;
    let client = server.client().await;
    for _ in 0..3 {
        let rtt = bounded("ping", client.ping()).await.unwrap();
        assert!(rtt > Duration::ZERO, "{rtt:?}");
        assert!(rtt < Duration::from_secs(1), "loopback ping took {rtt:?}");
    }
    assert_eq!(server.calls(), 0, "pings are answered without the handler");
}

#[tokio::test]
async fn wrong_token_is_refused_by_the_server_and_reported_by_the_client() {
    let server = TestServer::start().await;
    let err = bounded(
        "connect with a wrong token",
        WireClient::connect(
            &server.addr,
            Arc::new(b"not-the-token".to_vec()),
            CLIENT_NODE,
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, WireError::Handshake(AuthError::TokenRejected { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("peer refused our cluster token"),
        "{err}"
    );
    // The server keeps serving peers that hold the token.
    let client = server.client().await;
    bounded("ping after a refused peer", client.ping())
        .await
        .unwrap();
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn malformed_frames_close_only_the_offending_connection() {
    let server = TestServer::start().await;
    let good = server.client().await;

    let mut bad_crc = BytesMut::new();
    frame::encode(&write_req(1, b"some data".to_vec()), &mut bad_crc);
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x40;

    // Only the header is sent: the server must refuse it without waiting for 32 MiB.
    let mut oversized = BytesMut::new();
    frame::encode(&write_req(2, Vec::new()), &mut oversized);
    oversized[48..52].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());

    let mut bad_magic = BytesMut::from(&b"GARBAGE!"[..]);
    bad_magic.resize(frame::HEADER_LEN, 0);

    let mut reply_as_request = BytesMut::new();
    let mut fake = write_req(3, Vec::new());
    fake.request_id = 1;
    frame::encode(
        &Frame::reply_to(&fake, 0, Bytes::new()),
        &mut reply_as_request,
    );

    for (name, garbage) in [
        ("bad crc", bad_crc),
        ("oversized payload_len", oversized),
        ("bad magic", bad_magic),
        ("reply sent as a request", reply_as_request),
    ] {
        let mut raw = server.raw_authenticated().await;
        bounded("send garbage", raw.write_all(&garbage))
            .await
            .unwrap();
        let answer = read_until_closed(&mut raw).await;
        assert!(answer.is_empty(), "{name}: got {} bytes back", answer.len());

        let reply = bounded(
            "call on the good connection",
            good.call(write_req(7, vec![1])),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: good client broken: {e}"));
        assert_eq!(&reply.payload[..], &[2]);
        assert!(!good.is_closed());
    }
    assert_eq!(
        server.calls(),
        4,
        "only the good client's calls reached the handler"
    );
}

#[tokio::test]
async fn unauthenticated_frames_are_never_decoded() {
    let server = TestServer::start().await;
    let mut raw = bounded("raw connect", TcpStream::connect(&server.addr))
        .await
        .unwrap();
    // A well-formed request, but no handshake: the server reads it as a client hello.
    let mut req = BytesMut::new();
    frame::encode(&write_req(1, vec![0u8; 100]), &mut req);
    bounded("send", raw.write_all(&req)).await.unwrap();
    let got = read_until_closed(&mut raw).await;
    assert!(
        got.starts_with(&auth::HANDSHAKE_MAGIC),
        "only the server hello comes back"
    );
    assert_eq!(
        got.len(),
        4 + 2 + auth::NONCE_LEN + 8,
        "nothing after the hello"
    );
    assert_eq!(server.calls(), 0, "no frame reached the handler");
}

#[tokio::test]
async fn pending_calls_fail_with_connection_lost_when_the_server_dies() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut calls = JoinSet::new();
    for _ in 0..5 {
        let client = client.clone();
        calls.spawn(async move { client.call(flush_req()).await });
    }
    eventually("5 flushes reach the handler", || server.calls() == 5).await;

    // Dropping the serve task drops every connection with it: the server is gone.
    server.task.abort();

    bounded("pending calls fail", async {
        while let Some(done) = calls.join_next().await {
            let err = done.unwrap().unwrap_err();
            assert!(matches!(err, WireError::ConnectionLost { .. }), "{err}");
        }
    })
    .await;
    assert!(client.is_closed());
    let err = bounded("call on a dead client", client.ping())
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::ConnectionLost { .. }), "{err}");
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn malformed_reply_kills_the_client() {
    // A server that authenticates properly, then answers with a corrupt frame.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        auth::server_handshake(&mut s, &peer.to_string(), TOKEN, SERVER_NODE)
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let req = loop {
            if let Some(req) = frame::decode(&mut buf).unwrap() {
                break req;
            }
            assert_ne!(s.read_buf(&mut buf).await.unwrap(), 0);
        };
        let mut reply = BytesMut::new();
        frame::encode(
            &Frame::reply_to(&req, 0, Bytes::from_static(b"x")),
            &mut reply,
        );
        reply[frame::HEADER_LEN] ^= 1;
        s.write_all(&reply).await.unwrap();
        // Keep the socket open: the client must act on the bad frame, not on EOF.
        let _ = s.read_to_end(&mut Vec::new()).await;
    });
    let client = bounded("connect", WireClient::connect(&addr, token(), CLIENT_NODE))
        .await
        .unwrap();
    let err = bounded("call answered with garbage", client.call(flush_req()))
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::ConnectionLost { .. }), "{err}");
    assert!(client.is_closed());
    drop(client);
    bounded("fake server ends", server).await.unwrap();
}

#[tokio::test]
async fn dropped_calls_free_their_slots() {
    // Callers bound calls with their own timeouts; if an abandoned call kept its slot, a
    // few hundred timeouts would wedge the connection for good.
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut calls = JoinSet::new();
    for _ in 0..MAX_IN_FLIGHT + 44 {
        let client = client.clone();
        calls.spawn(async move {
            tokio::time::timeout(Duration::from_millis(200), client.call(flush_req())).await
        });
    }
    bounded("timed-out calls", async {
        while let Some(done) = calls.join_next().await {
            assert!(done.unwrap().is_err(), "a gated flush cannot complete");
        }
    })
    .await;
    assert_eq!(client.in_flight(), 0, "dropped calls left pending entries");

    server.gate.send_replace(true);
    let reply = bounded(
        "call after the timeouts",
        client.call(write_req(1, vec![9])),
    )
    .await
    .unwrap();
    assert_eq!(&reply.payload[..], &[10]);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn shutdown_lets_running_handlers_reply_then_closes() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.call(flush_req()).await })
    };
    eventually("flush reaches the handler", || server.calls() == 1).await;

    server.shutdown.send_replace(true);
    // Shutdown is waiting for the handler; the handler is waiting for the gate.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!call.is_finished());
    server.gate.send_replace(true);

    let reply = bounded("in-flight call", call).await.unwrap().unwrap();
    assert_eq!(reply.status, frame::STATUS_OK);
    bounded("serve returns", server.task).await.unwrap();
    eventually("client sees the close", || client.is_closed()).await;
    let refused = bounded(
        "connect after shutdown",
        WireClient::connect(&server.addr, token(), CLIENT_NODE),
    )
    .await;
    assert!(
        matches!(refused, Err(WireError::ConnectFailed { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn handler_panic_is_answered_with_eio_and_the_connection_lives() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let req = Frame::request(Kind::HotRegions, 9, 4, 0, 0, Bytes::new());
    let reply = bounded("call into a panicking handler", client.call(req))
        .await
        .unwrap();
    assert_eq!(reply.status, libc::EIO as u32);
    let reply = bounded("next call", client.call(write_req(1, vec![1])))
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], &[2]);
}

#[tokio::test]
async fn client_refuses_what_it_cannot_send() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let not_request = Frame::reply_to(&flush_req(), 0, Bytes::new());
    let err = bounded("reply as a call", client.call(not_request))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WireError::KindNotARequest { kind: Kind::Reply }),
        "{err}"
    );
    let huge = write_req(0, vec![0u8; MAX_PAYLOAD + 1]);
    let err = bounded("oversized call", client.call(huge))
        .await
        .unwrap_err();
    assert!(matches!(err, WireError::PayloadTooLarge { .. }), "{err}");
    assert!(!client.is_closed(), "refused locally, connection intact");
    bounded("ping", client.ping()).await.unwrap();
}
