//! The wire: Tandem's node-to-node data-path protocol (DESIGN.md, "The wire").
//!
//! Binary frames over TCP, many requests in flight per connection, after a handshake in
//! which both nodes prove the cluster token without sending it.
//!
//! * [`frame`]: the frame layout and its incremental codec. Keeps: only valid,
//!   checksum-verified frames come out of the decoder.
//! * [`auth`]: the HMAC-SHA256 challenge-response handshake, and the [`auth::mac`] /
//!   [`auth::verify`] helpers other transports reuse. Keeps: no frame before both sides
//!   have proved the token.
//! * [`client`]: [`WireClient`], one pipelined connection. Keeps: every call ends (reply
//!   or [`WireError::ConnectionLost`]), and a dropped call frees its slot.
//! * [`outbox`]: the sending side of a connection, shared by its senders. Keeps: frames
//!   go out whole and in order, and a send never awaits (so it cannot be torn).
//! * [`server`]: [`serve`] and the [`FrameHandler`] trait the node implements. Keeps: a
//!   broken peer breaks only its own connection, and handlers are not cancelled
//!   mid-request.
//!
//! What this layer does not decide: what a generation or a status means for a volume,
//! retries, reconnection, and timeouts of individual calls. Those belong to the
//! replication code that uses it.

pub mod auth;
pub mod client;
pub mod frame;
pub mod outbox;
pub mod server;

pub use auth::AuthError;
pub use client::{WireClient, WireError};
pub use frame::{Frame, FrameError, Kind};
pub use server::{serve, FrameHandler};

#[cfg(test)]
mod tests;
