//! tandem-node: the `tandemd` daemon and the `tandemctl` CLI.
//!
//! * [`daemon`]: start-up, listeners, signal handling and clean shutdown.
//! * [`config`]: flags, TOML file and defaults.
//! * [`admin`]: the admin gRPC API.
//! * [`block`]: the block-device seam NBD and FUSE share, with the one errno mapping.
//! * [`nbd`]: the NBD frontend.
//! * [`csi`]: the CSI frontend (Identity, Controller, Node) on a unix socket.
//! * [`metrics`]: Prometheus metrics.
//! * [`peer`]: node-to-node gRPC: raft transport, join, forwarded proposals.

pub mod admin;
pub mod attach;
pub mod block;
pub mod config;
pub mod csi;
pub mod daemon;
pub mod latency;
pub mod metrics;
pub mod nbd;
pub mod peer;
pub mod replica;
