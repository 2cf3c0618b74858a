//! The data-path listener: node-to-node replication traffic (`engine::wire`), answered by
//! this node's replicas.

use std::sync::Arc;

use tandem_engine::volume::VolumeManager;
use tandem_engine::wire::{self, Frame, FrameHandler};

/// Answers data-path requests for this node's replicas.
struct Handler {
    _volumes: Arc<VolumeManager>,
}

#[async_trait::async_trait]
impl FrameHandler for Handler {
    async fn handle(&self, _peer_node_id: u64, req: Frame) -> Frame {
        // ENOSYS until the replication coordinator serves remote replicas.
        Frame::reply_to(&req, libc::ENOSYS as u32, bytes::Bytes::new())
    }
}

/// Serves the data path until shutdown.
pub async fn serve_data_path(
    listener: tokio::net::TcpListener,
    token: Arc<Vec<u8>>,
    volumes: Arc<VolumeManager>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let me = volumes.node_id();
    wire::serve(
        listener,
        token,
        me,
        Arc::new(Handler { _volumes: volumes }),
        shutdown,
    )
    .await;
}
