//! The connection handshake: both ends prove they hold the cluster token, which never
//! crosses the wire.
//!
//! This module owns the handshake bytes and the MAC helpers ([`mac`], [`verify`]) that
//! other modules (the raft transport) reuse. Invariant: **no frame is read from or sent
//! to a peer before both sides have proved the token** with HMAC-SHA256 over fresh nonces
//! from both ends, and the whole exchange finishes within [`HANDSHAKE_TIMEOUT`].
//!
//! ```text
//! server -> client  hello:    "TDMH" | version u16 | server_nonce [32] | server_node_id u64
//! client -> server  hello:    "TDMH" | version u16 | client_node_id u64 | client_nonce [32]
//!                             | mac(token, ["tandem-wire-client", server_nonce,
//!                                           client_nonce, client_node_id]) [32]
//! server -> client  accept:   0xA1 | mac(token, ["tandem-wire-server", client_nonce,
//!                                               server_nonce, server_node_id]) [32]
//!               or  reject:   0xE1 (token) / 0xE2 (version) | reason_len u8 | reason
//! ```
//!
//! The two labels differ, so a MAC taken from one direction cannot be reflected into the
//! other; the peer's fresh nonce in each MAC defeats replay. Tokens are compared only
//! through `hmac`'s constant-time verification. What the handshake does not give: the
//! frames after it are protected by crc32 only, not by a MAC, so an active man in the
//! middle who can rewrite TCP segments could still tamper with a session (no TLS here).

use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Opens every hello, so a stray client (HTTP probe, old binary) fails at once.
pub const HANDSHAKE_MAGIC: [u8; 4] = *b"TDMH";

/// Version of the handshake and of the frame format after it. Bump on any change to
/// either; peers refuse a version they do not speak.
pub const PROTOCOL_VERSION: u16 = 1;

/// Bytes of each nonce: 256 bits, the HMAC-SHA256 output size, so a nonce never repeats in
/// practice.
pub const NONCE_LEN: usize = 32;

/// Bytes of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;

/// The whole handshake, either side. Three messages on a LAN take well under a
/// millisecond; 5 s tolerates a loaded node and a few TCP retransmissions (200 ms minimum
/// RTO on Linux) while keeping an idle or hostile unauthenticated connection from holding
/// a slot for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest reject reason a server sends (it travels after a one-byte length).
pub const MAX_REJECT_REASON_LEN: usize = u8::MAX as usize;

const CLIENT_LABEL: &[u8] = b"tandem-wire-client";
const SERVER_LABEL: &[u8] = b"tandem-wire-server";

const SERVER_HELLO_LEN: usize = 4 + 2 + NONCE_LEN + 8;
const CLIENT_HELLO_LEN: usize = 4 + 2 + 8 + NONCE_LEN + MAC_LEN;

const ACCEPT: u8 = 0xA1;
const REJECT_TOKEN: u8 = 0xE1;
const REJECT_VERSION: u8 = 0xE2;

/// Why a handshake failed. `peer` is the remote address as the caller named it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Client side: the server checked our MAC and refused it.
    #[error("peer refused our cluster token (handshake with {peer})")]
    TokenRejected { peer: String },
    /// Server side: the client's MAC does not match our token.
    #[error("handshake from {peer} (node {node_id}) failed: wrong cluster token")]
    TokenMismatch { peer: String, node_id: u64 },
    /// Client side: the server accepted us but its own MAC is wrong (an impostor that
    /// accepts anyone, or a corrupted handshake).
    #[error("peer {peer} accepted us but failed to prove the cluster token")]
    PeerProofInvalid { peer: String },
    #[error("handshake with {peer}: bad magic {found:02x?}, not a Tandem wire peer")]
    BadMagic { peer: String, found: [u8; 4] },
    /// We do not speak the peer's version.
    #[error(
        "handshake with {peer}: peer speaks protocol version {found}, we speak {PROTOCOL_VERSION}"
    )]
    VersionUnsupported { peer: String, found: u16 },
    /// The server does not speak our version.
    #[error("peer {peer} refused protocol version {PROTOCOL_VERSION}: {reason}")]
    VersionRejected { peer: String, reason: String },
    #[error("handshake with {peer}: unexpected answer byte {byte:#04x}")]
    AnswerInvalid { peer: String, byte: u8 },
    #[error("handshake with {peer} did not finish within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimedOut { peer: String },
    #[error("handshake with {peer}: {source}")]
    Io { peer: String, source: io::Error },
    #[error("the cluster token is empty")]
    TokenEmpty,
    #[error("no randomness for a handshake nonce: {reason}")]
    NonceUnavailable { reason: String },
}

/// HMAC-SHA256 of `parts` under `token`.
///
/// Each part is fed as its length (u64, big endian) and then its bytes, so two different
/// part lists never produce the same MAC input (`["ab", "c"]` vs `["a", "bc"]`), which
/// matters for callers whose parts have variable length.
pub fn mac(token: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    keyed(token, parts).finalize().into_bytes().into()
}

/// Whether `tag` is the MAC of `parts` under `token`, compared in constant time.
pub fn verify(token: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    keyed(token, parts).verify_slice(tag).is_ok()
}

fn keyed(token: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token)
        .expect("HMAC-SHA256 accepts keys of any length");
    for part in parts {
        m.update(&(part.len() as u64).to_be_bytes());
        m.update(part);
    }
    m
}

fn nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| AuthError::NonceUnavailable {
        reason: e.to_string(),
    })?;
    Ok(n)
}

/// Runs the client side on a freshly connected `stream` to `peer`. Returns the server's
/// node id once both sides have proved the token.
pub async fn client_handshake<S>(
    stream: &mut S,
    peer: &str,
    token: &[u8],
    my_node_id: u64,
) -> Result<u64, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if token.is_empty() {
        return Err(AuthError::TokenEmpty);
    }
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        client_steps(stream, peer, token, my_node_id),
    )
    .await
    .unwrap_or_else(|_| {
        Err(AuthError::HandshakeTimedOut {
            peer: peer.to_owned(),
        })
    })
}

async fn client_steps<S>(
    stream: &mut S,
    peer: &str,
    token: &[u8],
    my_node_id: u64,
) -> Result<u64, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io_err = |source| AuthError::Io {
        peer: peer.to_owned(),
        source,
    };

    let mut hello = [0u8; SERVER_HELLO_LEN];
    stream.read_exact(&mut hello).await.map_err(io_err)?;
    let mut h = &hello[..];
    let mut magic = [0u8; 4];
    h.copy_to_slice(&mut magic);
    if magic != HANDSHAKE_MAGIC {
        return Err(AuthError::BadMagic {
            peer: peer.to_owned(),
            found: magic,
        });
    }
    let version = h.get_u16();
    if version != PROTOCOL_VERSION {
        return Err(AuthError::VersionUnsupported {
            peer: peer.to_owned(),
            found: version,
        });
    }
    let mut server_nonce = [0u8; NONCE_LEN];
    h.copy_to_slice(&mut server_nonce);
    let server_node_id = h.get_u64();

    let client_nonce = nonce()?;
    let my_id = my_node_id.to_be_bytes();
    let proof = mac(token, &[CLIENT_LABEL, &server_nonce, &client_nonce, &my_id]);
    let mut reply = Vec::with_capacity(CLIENT_HELLO_LEN);
    reply.put_slice(&HANDSHAKE_MAGIC);
    reply.put_u16(PROTOCOL_VERSION);
    reply.put_u64(my_node_id);
    reply.put_slice(&client_nonce);
    reply.put_slice(&proof);
    stream.write_all(&reply).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;

    let answer = stream.read_u8().await.map_err(io_err)?;
    match answer {
        ACCEPT => {
            let mut server_proof = [0u8; MAC_LEN];
            stream.read_exact(&mut server_proof).await.map_err(io_err)?;
            let server_id = server_node_id.to_be_bytes();
            if verify(
                token,
                &[SERVER_LABEL, &client_nonce, &server_nonce, &server_id],
                &server_proof,
            ) {
                Ok(server_node_id)
            } else {
                Err(AuthError::PeerProofInvalid {
                    peer: peer.to_owned(),
                })
            }
        }
        REJECT_TOKEN => Err(AuthError::TokenRejected {
            peer: peer.to_owned(),
        }),
        REJECT_VERSION => {
            // The reason is for the operator; a peer that closes early just leaves it empty.
            let reason = read_reason(stream).await.unwrap_or_default();
            Err(AuthError::VersionRejected {
                peer: peer.to_owned(),
                reason,
            })
        }
        byte => Err(AuthError::AnswerInvalid {
            peer: peer.to_owned(),
            byte,
        }),
    }
}

async fn read_reason<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<String> {
    let len = stream.read_u8().await? as usize;
    let mut reason = vec![0u8; len];
    stream.read_exact(&mut reason).await?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}

/// Runs the server side on a freshly accepted `stream` from `peer`. Returns the client's
/// node id once both sides have proved the token. On a wrong token or version the client
/// is told why before the error is returned; the caller then drops the stream.
pub async fn server_handshake<S>(
    stream: &mut S,
    peer: &str,
    token: &[u8],
    my_node_id: u64,
) -> Result<u64, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if token.is_empty() {
        return Err(AuthError::TokenEmpty);
    }
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server_steps(stream, peer, token, my_node_id),
    )
    .await
    .unwrap_or_else(|_| {
        Err(AuthError::HandshakeTimedOut {
            peer: peer.to_owned(),
        })
    })
}

async fn server_steps<S>(
    stream: &mut S,
    peer: &str,
    token: &[u8],
    my_node_id: u64,
) -> Result<u64, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io_err = |source| AuthError::Io {
        peer: peer.to_owned(),
        source,
    };

    let server_nonce = nonce()?;
    let mut hello = Vec::with_capacity(SERVER_HELLO_LEN);
    hello.put_slice(&HANDSHAKE_MAGIC);
    hello.put_u16(PROTOCOL_VERSION);
    hello.put_slice(&server_nonce);
    hello.put_u64(my_node_id);
    stream.write_all(&hello).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;

    let mut client_hello = [0u8; CLIENT_HELLO_LEN];
    stream.read_exact(&mut client_hello).await.map_err(io_err)?;
    let mut h = &client_hello[..];
    let mut magic = [0u8; 4];
    h.copy_to_slice(&mut magic);
    if magic != HANDSHAKE_MAGIC {
        return Err(AuthError::BadMagic {
            peer: peer.to_owned(),
            found: magic,
        });
    }
    let version = h.get_u16();
    if version != PROTOCOL_VERSION {
        let reason = format!("this node speaks wire protocol version {PROTOCOL_VERSION} only");
        reject(stream, REJECT_VERSION, &reason).await;
        return Err(AuthError::VersionUnsupported {
            peer: peer.to_owned(),
            found: version,
        });
    }
    let client_node_id = h.get_u64();
    let mut client_nonce = [0u8; NONCE_LEN];
    h.copy_to_slice(&mut client_nonce);
    let client_proof = h; // the remaining MAC_LEN bytes

    let client_id = client_node_id.to_be_bytes();
    if !verify(
        token,
        &[CLIENT_LABEL, &server_nonce, &client_nonce, &client_id],
        client_proof,
    ) {
        reject(stream, REJECT_TOKEN, "wrong cluster token").await;
        return Err(AuthError::TokenMismatch {
            peer: peer.to_owned(),
            node_id: client_node_id,
        });
    }

    let my_id = my_node_id.to_be_bytes();
    let proof = mac(token, &[SERVER_LABEL, &client_nonce, &server_nonce, &my_id]);
    let mut accept = Vec::with_capacity(1 + MAC_LEN);
    accept.put_u8(ACCEPT);
    accept.put_slice(&proof);
    stream.write_all(&accept).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;
    Ok(client_node_id)
}

/// Tells the client why it is refused. Best effort: the connection is dropped right after
/// either way, so a write error changes nothing.
async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, code: u8, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(MAX_REJECT_REASON_LEN)];
    let mut msg = Vec::with_capacity(2 + reason.len());
    msg.put_u8(code);
    msg.put_u8(reason.len() as u8);
    msg.put_slice(reason);
    let _ = stream.write_all(&msg).await;
    let _ = stream.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn mac_parts_are_length_framed() {
        // Without length framing these two inputs would be the same byte string.
        assert_ne!(mac(b"k", &[b"ab", b"c"]), mac(b"k", &[b"a", b"bc"]));
        let tag = mac(b"k", &[b"a", b"bc"]);
        assert!(verify(b"k", &[b"a", b"bc"], &tag));
        assert!(!verify(b"other", &[b"a", b"bc"], &tag));
        assert!(!verify(b"k", &[b"a", b"bc"], &tag[..31]));
    }

    /// Runs both sides over real loopback TCP; returns (client result, server result,
    /// client address as the server saw it).
    async fn handshake_pair(
        client_token: &'static [u8],
        server_token: &'static [u8],
    ) -> (Result<u64, AuthError>, Result<u64, AuthError>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, peer) = listener.accept().await.unwrap();
            let peer = peer.to_string();
            (server_handshake(&mut s, &peer, server_token, 1).await, peer)
        });
        let mut c = TcpStream::connect(&addr).await.unwrap();
        let client = client_handshake(&mut c, &addr, client_token, 2).await;
        let (server, peer) = server.await.unwrap();
        (client, server, peer)
    }

    #[tokio::test]
    async fn same_token_authenticates_both_sides() {
        let (client, server, _) = tokio::time::timeout(TEST_TIMEOUT, handshake_pair(b"t", b"t"))
            .await
            .unwrap();
        assert_eq!(client.unwrap(), 1, "client learns the server's node id");
        assert_eq!(server.unwrap(), 2, "server learns the client's node id");
    }

    #[tokio::test]
    async fn wrong_token_is_refused_on_both_sides_with_clear_messages() {
        let (client, server, peer) =
            tokio::time::timeout(TEST_TIMEOUT, handshake_pair(b"good", b"bad"))
                .await
                .unwrap();
        let client = client.unwrap_err();
        assert!(
            matches!(client, AuthError::TokenRejected { .. }),
            "{client}"
        );
        assert!(client
            .to_string()
            .starts_with("peer refused our cluster token"));
        let server = server.unwrap_err();
        assert!(
            matches!(server, AuthError::TokenMismatch { node_id: 2, .. }),
            "{server}"
        );
        let msg = server.to_string();
        assert!(
            msg.contains(&peer) && msg.contains("wrong cluster token"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn impostor_server_that_accepts_anyone_is_caught_by_the_client() {
        // A server without the token can say "accept" but cannot produce the MAC.
        tokio::time::timeout(TEST_TIMEOUT, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut hello = Vec::new();
                hello.put_slice(&HANDSHAKE_MAGIC);
                hello.put_u16(PROTOCOL_VERSION);
                hello.put_slice(&[7u8; NONCE_LEN]);
                hello.put_u64(9);
                s.write_all(&hello).await.unwrap();
                let mut client_hello = [0u8; CLIENT_HELLO_LEN];
                s.read_exact(&mut client_hello).await.unwrap();
                s.write_all(&[ACCEPT]).await.unwrap();
                s.write_all(&[0u8; MAC_LEN]).await.unwrap();
                // Hold the socket open until the client has read everything.
                let _ = s.read_u8().await;
            });
            let mut c = TcpStream::connect(&addr).await.unwrap();
            let err = client_handshake(&mut c, &addr, b"t", 2).await.unwrap_err();
            assert!(matches!(err, AuthError::PeerProofInvalid { .. }), "{err}");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn other_version_is_refused_with_a_reason() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let (mut c, mut s) = tokio::io::duplex(1024);
            let server =
                tokio::spawn(async move { server_handshake(&mut s, "peer-c", b"t", 1).await });
            let mut hello = [0u8; SERVER_HELLO_LEN];
            c.read_exact(&mut hello).await.unwrap();
            let mut msg = Vec::new();
            msg.put_slice(&HANDSHAKE_MAGIC);
            msg.put_u16(PROTOCOL_VERSION + 1);
            msg.put_slice(&[0u8; 8 + NONCE_LEN + MAC_LEN]);
            c.write_all(&msg).await.unwrap();
            assert_eq!(c.read_u8().await.unwrap(), REJECT_VERSION);
            let reason = read_reason(&mut c).await.unwrap();
            assert!(reason.contains("version 1"), "{reason}");
            let err = server.await.unwrap().unwrap_err();
            assert!(
                matches!(err, AuthError::VersionUnsupported { found: 2, .. }),
                "{err}"
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_the_handshake() {
        // Paused time: the 5 s bound elapses instantly and deterministically.
        let (_c, mut s) = tokio::io::duplex(1024);
        let err = server_handshake(&mut s, "peer-x", b"t", 1)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthError::HandshakeTimedOut { .. }), "{err}");
    }

    #[tokio::test]
    async fn empty_token_is_refused_before_any_io() {
        let (mut c, _s) = tokio::io::duplex(64);
        let err = client_handshake(&mut c, "p", b"", 1).await.unwrap_err();
        assert!(matches!(err, AuthError::TokenEmpty));
    }
}
