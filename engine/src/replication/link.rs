//! How a coordinator reaches replicas: a [`Network`] makes [`Link`]s.
//!
//! The coordinator never names a transport. The daemon passes a [`TcpNetwork`] (the
//! authenticated wire protocol, [`WireClient`]); the deterministic simulation passes an
//! in-process network that can cut, hold and reset links (see `tests/sim.rs`). The local
//! replica is a [`LocalLink`] through the node's own [`ReplicaServer`], so it passes the
//! same generation fence as a remote coordinator's frames.

use std::sync::Arc;

use super::server::ReplicaServer;
use crate::wire::{Frame, FrameHandler, WireClient};

/// One connection to one replica server.
#[async_trait::async_trait]
pub trait Link: Send + Sync {
    /// Sends one request and returns its reply; a transport failure as text. No timeout
    /// of its own: the caller bounds every call ([`super::target`]).
    async fn call(&self, frame: Frame) -> Result<Frame, String>;
    /// Known dead: every later call fails, and the coordinator reconnects.
    fn is_closed(&self) -> bool;
}

/// Makes links to other nodes' replica servers.
#[async_trait::async_trait]
pub trait Network: Send + Sync {
    /// Connects, as node `from`, to node `node`'s replica server at `addr`, and checks
    /// that the peer is that node.
    async fn connect(&self, from: u64, node: u64, addr: &str) -> Result<Arc<dyn Link>, String>;
}

/// The production network: TCP with the cluster token's handshake.
pub struct TcpNetwork {
    token: Arc<Vec<u8>>,
}

impl TcpNetwork {
    pub fn new(token: Arc<Vec<u8>>) -> Arc<TcpNetwork> {
        Arc::new(TcpNetwork { token })
    }
}

#[async_trait::async_trait]
impl Network for TcpNetwork {
    async fn connect(&self, from: u64, node: u64, addr: &str) -> Result<Arc<dyn Link>, String> {
        let client = WireClient::connect(addr, self.token.clone(), from)
            .await
            .map_err(|e| e.to_string())?;
        if client.peer_node_id() != node {
            return Err(format!(
                "{addr} is node {}, not node {node}",
                client.peer_node_id()
            ));
        }
        Ok(client)
    }
}

#[async_trait::async_trait]
impl Link for WireClient {
    async fn call(&self, frame: Frame) -> Result<Frame, String> {
        WireClient::call(self, frame)
            .await
            .map_err(|e| e.to_string())
    }

    fn is_closed(&self) -> bool {
        WireClient::is_closed(self)
    }
}

/// The replica on the coordinator's own node: `server.handle(coordinator_node, frame)`,
/// inline in the caller's task. A caller's timeout (or a dropped caller) never cancels a
/// store write half-way: the rest then runs on a task of its own
/// ([`crate::completion`]), and its outcome is unknown, as for a remote call whose reply
/// never came.
pub struct LocalLink {
    pub server: Arc<ReplicaServer>,
    pub coordinator_node: u64,
}

#[async_trait::async_trait]
impl Link for LocalLink {
    async fn call(&self, frame: Frame) -> Result<Frame, String> {
        let (server, node) = (self.server.clone(), self.coordinator_node);
        crate::completion::to_completion(async move { server.handle(node, frame).await })
            .await
            .map_err(|e| format!("local replica: {e}"))
    }

    fn is_closed(&self) -> bool {
        false
    }
}
