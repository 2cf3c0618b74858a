//! The data-path listener: node-to-node replication traffic (`engine::wire`), answered by
//! this node's replicas through the engine's `ReplicaServer` (generation fencing included).

use std::sync::Arc;

use tandem_engine::volume::VolumeManager;
use tandem_engine::wire;

/// Serves the data path until shutdown.
pub async fn serve_data_path(
    listener: tokio::net::TcpListener,
    token: Arc<Vec<u8>>,
    volumes: Arc<VolumeManager>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let me = volumes.node_id();
    let server = volumes.replica_server();
    wire::serve(listener, token, me, server, shutdown).await;
}
