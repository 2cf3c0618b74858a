//! The simulation's network: an in-process [`Network`] that the deterministic simulation
//! passes to its coordinators in place of TCP.
//!
//! Every frame goes through the real codec (encoded and decoded again) and then to the
//! node's real handler. A node is up or down; each restart is a new incarnation, and a
//! link made to an older incarnation is closed, like a TCP connection reset by a reboot.
//! A directed pair can be *cut* silently: a frame sent across it is neither delivered nor
//! refused; it waits, like a segment in a socket queue, and is delivered when the cut
//! heals (its caller may have timed out and gone: a late frame, which the session fence
//! must stop), or dropped if the peer restarted meanwhile. Connecting across a cut times
//! out after [`CONNECT_TIMEOUT`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::sync::{oneshot, Notify};

use crate::replication::link::{Link, Network};
use crate::wire::client::CONNECT_TIMEOUT;
use crate::wire::{frame, Frame, FrameHandler};

struct SimNode {
    handler: Arc<dyn FrameHandler>,
    up: bool,
    incarnation: u64,
}

struct Shared {
    nodes: Mutex<BTreeMap<u64, SimNode>>,
    /// Directed pairs (from, to) whose frames are held.
    cut: Mutex<BTreeSet<(u64, u64)>>,
    /// Wakes held frames when cuts heal. A `Notify` wakes its waiters in a fixed order; a
    /// `watch` would not (it spreads waiters over shards picked at random), and the order
    /// held frames go on in must be the same in every replay.
    healed: Notify,
}

impl Shared {
    fn is_cut(&self, a: u64, b: u64) -> bool {
        self.cut.lock().unwrap().contains(&(a, b))
    }

    /// The handler of `node` if it is up in incarnation `incarnation`.
    fn live(&self, node: u64, incarnation: u64) -> Option<Arc<dyn FrameHandler>> {
        let nodes = self.nodes.lock().unwrap();
        nodes
            .get(&node)
            .filter(|n| n.up && n.incarnation == incarnation)
            .map(|n| n.handler.clone())
    }
}

#[derive(Clone)]
pub(super) struct SimNet {
    shared: Arc<Shared>,
}

impl SimNet {
    pub(super) fn new() -> SimNet {
        SimNet {
            shared: Arc::new(Shared {
                nodes: Mutex::new(BTreeMap::new()),
                cut: Mutex::new(BTreeSet::new()),
                healed: Notify::new(),
            }),
        }
    }

    /// Registers `node`'s handler (down until [`SimNet::up`]).
    pub(super) fn register(&self, node: u64, handler: Arc<dyn FrameHandler>) {
        self.shared.nodes.lock().unwrap().insert(
            node,
            SimNode {
                handler,
                up: false,
                incarnation: 0,
            },
        );
    }

    fn set_up(&self, node: u64, up: bool) {
        let mut nodes = self.shared.nodes.lock().unwrap();
        let n = nodes.get_mut(&node).expect("registered node");
        n.up = up;
        n.incarnation += 1;
    }

    /// `node` (re)starts: a new incarnation; older links stay closed.
    pub(super) fn up(&self, node: u64) {
        self.set_up(node, true);
    }

    /// `node` dies: its links close, frames on their way to it are lost.
    pub(super) fn down(&self, node: u64) {
        self.set_up(node, false);
    }

    /// Cuts both directions between `a` and `b`, silently.
    pub(super) fn cut(&self, a: u64, b: u64) {
        let mut c = self.shared.cut.lock().unwrap();
        c.insert((a, b));
        c.insert((b, a));
    }

    /// Heals every cut: held frames go on.
    pub(super) fn heal(&self) {
        self.shared.cut.lock().unwrap().clear();
        self.shared.healed.notify_waiters();
    }

    pub(super) fn is_cut(&self, a: u64, b: u64) -> bool {
        self.shared.is_cut(a, b)
    }
}

/// Through the real codec: encoded, then decoded again.
fn roundtrip(f: &Frame) -> Result<Frame, String> {
    let mut buf = BytesMut::new();
    frame::encode(f, &mut buf);
    match frame::decode(&mut buf) {
        Ok(Some(f)) if buf.is_empty() => Ok(f),
        Ok(_) => Err("frame did not decode whole".into()),
        Err(e) => Err(format!("malformed frame: {e}")),
    }
}

/// Waits until `(from, to)` is not cut.
async fn across(shared: &Shared, from: u64, to: u64) {
    loop {
        let healed = shared.healed.notified();
        if !shared.is_cut(from, to) {
            return;
        }
        healed.await;
    }
}

struct SimLink {
    shared: Arc<Shared>,
    from: u64,
    to: u64,
    incarnation: u64,
}

#[async_trait::async_trait]
impl Link for SimLink {
    async fn call(&self, frame: Frame) -> Result<Frame, String> {
        if self.is_closed() {
            return Err("connection reset by peer".into());
        }
        let frame = roundtrip(&frame)?;
        let (tx, rx) = oneshot::channel();
        let (shared, from, to, inc) = (self.shared.clone(), self.from, self.to, self.incarnation);
        // The frame travels on its own: a caller that gives up does not take it back.
        tokio::spawn(async move {
            across(&shared, from, to).await;
            let Some(handler) = shared.live(to, inc) else {
                return; // the peer restarted: the connection and its frames are gone
            };
            let reply = handler.handle(from, frame).await;
            across(&shared, to, from).await;
            if shared.live(to, inc).is_some() {
                let _ = tx.send(roundtrip(&reply));
            }
        });
        match rx.await {
            Ok(reply) => reply,
            Err(_) => Err("connection reset by peer".into()),
        }
    }

    fn is_closed(&self) -> bool {
        self.shared.live(self.to, self.incarnation).is_none()
    }
}

#[async_trait::async_trait]
impl Network for SimNet {
    async fn connect(&self, from: u64, node: u64, _addr: &str) -> Result<Arc<dyn Link>, String> {
        if self.is_cut(from, node) || self.is_cut(node, from) {
            tokio::time::sleep(CONNECT_TIMEOUT).await;
            return Err(format!("connect to node {node} timed out (cut)"));
        }
        let incarnation = {
            let nodes = self.shared.nodes.lock().unwrap();
            match nodes.get(&node) {
                Some(n) if n.up => n.incarnation,
                Some(_) => return Err(format!("connect to node {node}: connection refused")),
                None => return Err(format!("node {node} is not in the simulated network")),
            }
        };
        Ok(Arc::new(SimLink {
            shared: self.shared.clone(),
            from,
            to: node,
            incarnation,
        }))
    }
}
