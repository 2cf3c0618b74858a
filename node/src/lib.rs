//! tandem-node: the `tandemd` daemon and the `tandemctl` CLI.
//!
//! * [`daemon`]: start-up, listeners, signal handling and clean shutdown.
//! * [`config`]: flags, TOML file and defaults.
//! * [`admin`]: the admin gRPC API.
//! * [`nbd`]: the NBD frontend.
//! * [`metrics`]: Prometheus metrics.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod nbd;
