//! Tandem engine: everything that decides and stores, and no servers.
//!
//! * [`cluster`]: cluster metadata on raft-rs + sled (state machine, raft ready loop).
//! * [`latency`]: RTT windows, domain-pair RTT and the metro-sync gate.
//! * [`io`]: the I/O engines (io_uring and std positional I/O) behind one owned-buffer API.
//! * [`placement`]: topology-aware replica placement.
//! * [`sched`]: I/O priority classes (weighted shares of a node's I/O concurrency).
//! * [`store`]: a replica's local store: sparse data, per-block crc32, activity log, pool
//!   accounting.
//! * [`replication`]: the volume coordinator (write fan-out, ack rule, ejection, resync,
//!   read repair, crash reconciliation) and the replica-side frame handler.
//! * [`meta`]: the metadata trait the rest of the engine uses, and its sled implementation.
//! * [`volume`]: the volume manager: validation, lifecycle (create, grow, attach, detach,
//!   delete) and the attached volume that frontends hand I/O to.
//! * [`units`]: size parsing and formatting shared by the daemon and the CLI.
//! * [`wire`]: the node-to-node data-path protocol: frames, the token handshake, a
//!   pipelined client and the server loop.

pub mod cluster;
pub mod completion;
pub mod io;
pub mod latency;
pub mod meta;
pub mod placement;
mod range_lock;
pub mod replication;
pub mod sched;
pub mod store;
pub mod units;
pub mod volume;
pub mod wire;
