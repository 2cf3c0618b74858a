//! The replica side of the data path: [`ReplicaServer`] answers the frames a coordinator
//! sends for this node's replicas.
//!
//! Invariants:
//! * **Generation fencing.** A frame whose generation is lower than the volume's current
//!   one (the generation in this node's metadata, or a higher one a coordinator has already
//!   opened this replica at) is refused with `ESTALE` and never touches the replica. A
//!   frame from the future (this node's metadata lags the attach) is held for at most
//!   [`GENERATION_WAIT`] and then refused with `EAGAIN`. A frame at the current generation
//!   from a node other than the attached one is refused with `EPERM`.
//! * **An `Open` is a barrier and starts a session.** It waits (at most
//!   [`OPEN_DRAIN_TIMEOUT`], else `EBUSY`) for every I/O frame admitted before it to
//!   finish, then raises the replica's fence to (its generation, a new session number),
//!   which it returns. I/O frames carry [`wire_generation`]`(generation, session)` in the
//!   frame's generation field, and one from an older session is refused (`ESTALE`). So
//!   after an `Open`, nothing sent before it (by an older coordinator, or by this one on a
//!   connection it gave up on, even a frame still queued in a socket) can land.
//! * The coordinator on this node reaches its local replica through the same server
//!   ([`ReplicaServer::handle`] called in-process), so a zombie coordinator's local writes
//!   are fenced exactly like its remote ones.
//!
//! Frames (requests on the wire, errno in the reply status):
//!
//! | kind          | request                         | reply payload                         |
//! |---------------|---------------------------------|---------------------------------------|
//! | `Open`        | volume, generation (session 0)  | [`OpenInfo`] (48 bytes)               |
//! | `Read`        | offset, length                  | `length` bytes, verified by the store |
//! | `Write`       | offset, length, payload, FUA    | empty                                 |
//! | `WriteZeroes` | offset, length, FUA             | empty                                 |
//! | `Flush`       |                                 | empty                                 |
//! | `ClearSuspect`| offset = suspect epoch          | empty (`EAGAIN`: flagged again since) |
//! | `Checksums`   | offset, length (<= 32 MiB)      | 8-byte digest (BE) per 4 KiB block    |
//!
//! Other kinds are answered `EOPNOTSUPP`; an unknown volume, or a volume with no replica on
//! this node, `ENOENT`; store errors map through [`crate::store::StoreError::errno`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

use super::{MetaProposer, GENERATION_POLL, GENERATION_WAIT, OPEN_DRAIN_TIMEOUT};
use crate::store::{Replica, BLOCK_SIZE, MAX_IO_BYTES};
use crate::wire::frame::{FLAG_FUA, STATUS_OK};
use crate::wire::{Frame, FrameHandler, Kind};

/// Low bits of a frame's generation field that carry the session (see the module doc);
/// the volume generation takes the high 40 bits (10^12 attaches), the session the low 24
/// (16 million opens of one replica within one generation).
pub const SESSION_BITS: u32 = 24;

/// Largest session number; an `Open` beyond it is refused with `EOVERFLOW`.
pub const MAX_SESSION: u64 = (1 << SESSION_BITS) - 1;

/// The value of a frame's generation field: the volume generation and the session the
/// replica assigned at `Open` (0 in the `Open` itself).
pub fn wire_generation(generation: u64, session: u64) -> u64 {
    (generation << SESSION_BITS) | (session & MAX_SESSION)
}

/// (generation, session) of a frame's generation field.
pub fn split_wire_generation(v: u64) -> (u64, u64) {
    (v >> SESSION_BITS, v & MAX_SESSION)
}

/// The node's local replicas, by the volume's wire id (`VolumeRecord::wire_id`).
pub trait LocalReplicas: Send + Sync + 'static {
    fn get(&self, volume_wire_id: u64) -> Option<Arc<Replica>>;
}

/// What an `Open` reply says about the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenInfo {
    /// The replica's size; the coordinator refuses a replica smaller than the volume.
    pub size_bytes: u64,
    /// Changes whenever the replica was (re)opened on its node. A coordinator that sees a
    /// new instance cannot trust the writes it believes the replica already had.
    pub instance: u64,
    /// Regions the store recomputed at its last open (non-zero after an unclean stop:
    /// writes it acked but had not flushed may be gone).
    pub recovered_regions: u64,
    /// The session this `Open` started; later I/O frames carry it.
    pub session: u64,
    /// The store's suspect flags (`store::SUSPECT_*`; 0 = trusted): a replica that may not
    /// hold what a coordinator believes gets a full comparison, whatever its record says.
    pub suspect: u64,
    /// The suspect epoch a `ClearSuspect` after that comparison names.
    pub suspect_epoch: u64,
}

impl OpenInfo {
    pub const ENCODED_LEN: usize = 48;

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(Self::ENCODED_LEN);
        b.put_u64(self.size_bytes);
        b.put_u64(self.instance);
        b.put_u64(self.recovered_regions);
        b.put_u64(self.session);
        b.put_u64(self.suspect);
        b.put_u64(self.suspect_epoch);
        b.freeze()
    }

    pub fn decode(p: &[u8]) -> Option<OpenInfo> {
        if p.len() != Self::ENCODED_LEN {
            return None;
        }
        let u = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Some(OpenInfo {
            size_bytes: u(0),
            instance: u(8),
            recovered_regions: u(16),
            session: u(24),
            suspect: u(32),
            suspect_epoch: u(40),
        })
    }
}

/// Per-volume fence state on this node.
struct VolumeFence {
    /// I/O frames hold it shared while they run; `Open` takes it exclusively.
    io: tokio::sync::RwLock<()>,
    /// [`wire_generation`] of the latest `Open`: I/O frames below it are refused.
    opened: AtomicU64,
    /// Identity of the replica object behind the current instance number.
    instance: Mutex<(Weak<Replica>, u64)>,
}

/// Serves the wire frames of this node's replicas. See the module doc.
pub struct ReplicaServer {
    node_id: u64,
    meta: Arc<dyn MetaProposer>,
    replicas: Arc<dyn LocalReplicas>,
    fences: Mutex<HashMap<u64, Arc<VolumeFence>>>,
    /// I/O priority classes on the replica side: data frames from other nodes hold a slot
    /// while they run (the coordinator's own local frames are under its frontend slot).
    sched: crate::sched::IoScheduler,
    /// Tests: one `Write` at this offset waits here, before admission, until released (a
    /// local write stalled before it reaches the fence); its reply status is recorded.
    #[cfg(test)]
    pub(super) hold: Mutex<Option<(u64, tokio::sync::watch::Receiver<bool>)>>,
    #[cfg(test)]
    pub(super) held_status: Mutex<Option<u32>>,
}

impl std::fmt::Debug for ReplicaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaServer")
            .field("node_id", &self.node_id)
            .finish()
    }
}

type Refusal = i32;

impl ReplicaServer {
    pub fn new(
        node_id: u64,
        meta: Arc<dyn MetaProposer>,
        replicas: Arc<dyn LocalReplicas>,
    ) -> Arc<ReplicaServer> {
        Arc::new(ReplicaServer {
            node_id,
            meta,
            replicas,
            fences: Mutex::new(HashMap::new()),
            sched: crate::sched::IoScheduler::new(crate::sched::DEFAULT_SLOTS),
            #[cfg(test)]
            hold: Mutex::new(None),
            #[cfg(test)]
            held_status: Mutex::new(None),
        })
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The replica side's class gate.
    pub fn scheduler(&self) -> &crate::sched::IoScheduler {
        &self.sched
    }

    /// The local replica of `volume_wire_id`, if this node has one.
    pub fn replica(&self, volume_wire_id: u64) -> Option<Arc<Replica>> {
        self.replicas.get(volume_wire_id)
    }

    /// Highest generation a coordinator opened the local replica of `volume_wire_id` at.
    pub fn opened_generation(&self, volume_wire_id: u64) -> u64 {
        split_wire_generation(self.fence(volume_wire_id).opened.load(Ordering::Acquire)).0
    }

    fn fence(&self, wire_id: u64) -> Arc<VolumeFence> {
        let mut fences = self.fences.lock().unwrap_or_else(|e| e.into_inner());
        fences
            .entry(wire_id)
            .or_insert_with(|| {
                Arc::new(VolumeFence {
                    io: tokio::sync::RwLock::new(()),
                    opened: AtomicU64::new(0),
                    instance: Mutex::new((Weak::new(), 0)),
                })
            })
            .clone()
    }

    /// Finds the volume and checks the frame's generation (see the module doc), waiting up
    /// to [`GENERATION_WAIT`] for the local metadata to catch up (a newer generation, or a
    /// volume or replica this node has not applied yet).
    /// Returns the volume's I/O priority class.
    async fn admit(
        &self,
        peer: u64,
        req: &Frame,
        fence: &VolumeFence,
    ) -> Result<crate::meta::IoPriority, Refusal> {
        let (generation, _) = split_wire_generation(req.generation);
        let deadline = tokio::time::Instant::now() + GENERATION_WAIT;
        loop {
            let state = self.meta.state();
            let Some(vol) = state
                .volumes
                .values()
                .find(|v| v.wire_id() == req.volume_id)
            else {
                // This node may not have applied the volume's creation yet.
                if tokio::time::Instant::now() >= deadline {
                    return Err(libc::ENOENT);
                }
                tokio::time::sleep(GENERATION_POLL).await;
                continue;
            };
            if vol.replica(self.node_id).is_none() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(libc::ENOENT);
                }
                tokio::time::sleep(GENERATION_POLL).await;
                continue;
            }
            let opened = split_wire_generation(fence.opened.load(Ordering::Acquire)).0;
            if generation < vol.generation.max(opened) {
                return Err(libc::ESTALE);
            }
            if generation > vol.generation {
                if tokio::time::Instant::now() >= deadline {
                    return Err(libc::EAGAIN);
                }
                tokio::time::sleep(GENERATION_POLL).await;
                continue;
            }
            if vol.attached_node.is_some_and(|n| n != peer) {
                return Err(libc::EPERM);
            }
            return Ok(vol.io_priority);
        }
    }

    async fn serve(&self, peer: u64, req: &mut Frame) -> Result<Bytes, Refusal> {
        if !matches!(
            req.kind,
            Kind::Open
                | Kind::Read
                | Kind::Write
                | Kind::WriteZeroes
                | Kind::Flush
                | Kind::Checksums
                | Kind::ClearSuspect
                | Kind::Seal
                | Kind::DeleteSnapshot
        ) {
            return Err(libc::EOPNOTSUPP);
        }
        // A replica just placed here is opened by the node's reconciler once it has applied
        // the change: wait for it as for a newer generation, rather than refuse (which would
        // get a brand-new replica ejected by the coordinator that opens it first).
        let deadline = tokio::time::Instant::now() + GENERATION_WAIT;
        let replica = loop {
            if let Some(r) = self.replicas.get(req.volume_id) {
                break r;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(libc::ENOENT);
            }
            tokio::time::sleep(GENERATION_POLL).await;
        };
        let fence = self.fence(req.volume_id);
        let class = self.admit(peer, req, &fence).await?;
        let _slot = match req.kind {
            Kind::Read | Kind::Write | Kind::WriteZeroes | Kind::Flush if peer != self.node_id => {
                Some(self.sched.admit(class).await)
            }
            _ => None,
        };

        if req.kind == Kind::Open {
            let _drained = tokio::time::timeout(OPEN_DRAIN_TIMEOUT, fence.io.write())
                .await
                .map_err(|_| libc::EBUSY)?;
            // Under the exclusive lock: no other Open or I/O runs.
            let (generation, _) = split_wire_generation(req.generation);
            let (opened_gen, opened_session) =
                split_wire_generation(fence.opened.load(Ordering::Acquire));
            let session = match generation.cmp(&opened_gen) {
                std::cmp::Ordering::Less => return Err(libc::ESTALE),
                std::cmp::Ordering::Equal if opened_session >= MAX_SESSION => {
                    return Err(libc::EOVERFLOW)
                }
                std::cmp::Ordering::Equal => opened_session + 1,
                std::cmp::Ordering::Greater => 1,
            };
            fence
                .opened
                .store(wire_generation(generation, session), Ordering::Release);
            let instance = {
                let mut inst = fence.instance.lock().unwrap_or_else(|e| e.into_inner());
                let same = inst.0.upgrade().is_some_and(|r| Arc::ptr_eq(&r, &replica));
                if !same {
                    let mut n = [0u8; 8];
                    // A clock-derived fallback is still different from the last one.
                    let fresh = match getrandom::fill(&mut n) {
                        Ok(()) => u64::from_ne_bytes(n),
                        Err(_) => super::unix_seconds() ^ inst.1.wrapping_add(1),
                    };
                    *inst = (Arc::downgrade(&replica), fresh);
                }
                inst.1
            };
            // A volume grown in the metadata may not have reached this node's reconciler
            // yet: grow the replica now, so the new coordinator does not eject it as short.
            let wanted = self
                .meta
                .state()
                .volumes
                .values()
                .find(|v| v.wire_id() == req.volume_id)
                .map(|v| v.size_bytes);
            if let Some(size) = wanted {
                if replica.size_bytes().await < size {
                    replica.resize(size).await.map_err(|e| e.errno())?;
                }
            }
            let (suspect, suspect_epoch) = replica.suspect();
            return Ok(OpenInfo {
                size_bytes: replica.size_bytes().await,
                instance,
                recovered_regions: replica.recovered_regions(),
                session,
                suspect,
                suspect_epoch,
            }
            .encode());
        }

        let _admitted = fence.io.read().await;
        // Only the latest session (an Open may have started one while this frame waited
        // for the lock). A frame that was never opened carries session 0: refused too.
        if req.generation < fence.opened.load(Ordering::Acquire) {
            return Err(libc::ESTALE);
        }
        let fua = req.flags & FLAG_FUA != 0;
        let errno = |e: crate::store::StoreError| e.errno();
        match req.kind {
            Kind::Read => {
                let data = replica
                    .read(req.offset, req.length as usize)
                    .await
                    .map_err(errno)?;
                Ok(Bytes::from(data))
            }
            Kind::Write => {
                if req.payload.len() != req.length as usize {
                    return Err(libc::EINVAL);
                }
                // The payload as it came (it may share the read buffer, or, for the local
                // replica, the other replicas' frames): the store writes it without a copy.
                let data = std::mem::take(&mut req.payload);
                replica.write(req.offset, data, fua).await.map_err(errno)?;
                Ok(Bytes::new())
            }
            Kind::WriteZeroes => {
                if !req.payload.is_empty() {
                    return Err(libc::EINVAL);
                }
                replica
                    .write_zeroes(req.offset, req.length as u64, fua)
                    .await
                    .map_err(errno)?;
                Ok(Bytes::new())
            }
            Kind::Flush => {
                replica.flush().await.map_err(errno)?;
                Ok(Bytes::new())
            }
            Kind::Seal | Kind::DeleteSnapshot => {
                let id = std::str::from_utf8(&req.payload)
                    .ok()
                    .filter(|id| crate::volume::validate_name(id).is_ok())
                    .ok_or(libc::EINVAL)?;
                if req.kind == Kind::Seal {
                    // This node's reconciler drops layers the metadata does not name: the
                    // pending record must have reached it before the layer exists.
                    let deadline = tokio::time::Instant::now() + GENERATION_WAIT;
                    while !self.meta.state().volumes.values().any(|v| {
                        v.wire_id() == req.volume_id && v.snapshots.iter().any(|s| s.id == id)
                    }) {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(libc::ENOENT);
                        }
                        tokio::time::sleep(GENERATION_POLL).await;
                    }
                    replica.seal(id).await.map_err(errno)?;
                } else {
                    replica.delete_snapshot(id).await.map_err(errno)?;
                }
                Ok(Bytes::new())
            }
            Kind::ClearSuspect => {
                // EAGAIN: a flag was set since that Open; the next comparison clears it.
                match replica.clear_suspect(req.offset).map_err(errno)? {
                    true => Ok(Bytes::new()),
                    false => Err(libc::EAGAIN),
                }
            }
            Kind::Checksums => {
                if req.length as usize > MAX_IO_BYTES {
                    return Err(libc::EINVAL);
                }
                let crcs = replica
                    .checksums(req.offset, req.length as u64)
                    .await
                    .map_err(errno)?;
                let mut b = BytesMut::with_capacity(crcs.len() * 8);
                for c in crcs {
                    b.put_u64(c);
                }
                Ok(b.freeze())
            }
            _ => Err(libc::EOPNOTSUPP),
        }
    }
}

/// A fenced session on a local replica, for a frontend that calls the store directly (the
/// RF 1 fast path). It is opened like any coordinator's session, so the same fence covers
/// it: once a newer `Open` (an `attach --force` elsewhere) started another session, its
/// I/O is refused with `ESTALE`, and that `Open` waits for the I/O already running.
pub struct LocalSession {
    fence: Arc<VolumeFence>,
    wire_generation: u64,
}

impl ReplicaServer {
    /// Opens this node's replica of `wire_id` at `generation` for direct local I/O (the
    /// volume must be attached here at that generation).
    pub async fn open_local_session(
        &self,
        wire_id: u64,
        generation: u64,
    ) -> Result<LocalSession, i32> {
        let mut req = Frame::request(
            Kind::Open,
            wire_id,
            wire_generation(generation, 0),
            0,
            0,
            Bytes::new(),
        );
        let payload = self.serve(self.node_id, &mut req).await?;
        let info = OpenInfo::decode(&payload).ok_or(libc::EPROTO)?;
        Ok(LocalSession {
            fence: self.fence(wire_id),
            wire_generation: wire_generation(generation, info.session),
        })
    }
}

impl LocalSession {
    /// Runs `io` as an I/O of this session, or refuses it with `ESTALE` (see the type doc).
    pub async fn run<T>(&self, io: impl std::future::Future<Output = T>) -> Result<T, i32> {
        let _admitted = self.fence.io.read().await;
        if self.wire_generation < self.fence.opened.load(Ordering::Acquire) {
            return Err(libc::ESTALE);
        }
        Ok(io.await)
    }
}

/// Decodes a `Checksums` reply for `[offset, offset + len)`: one block digest per block
/// covered ([`crate::store::block_digest`]).
pub(crate) fn decode_checksums(offset: u64, len: u64, payload: &[u8]) -> Option<Vec<u64>> {
    let bs = BLOCK_SIZE as u64;
    let blocks = if len == 0 {
        0
    } else {
        (offset + len).div_ceil(bs) - offset / bs
    };
    if payload.len() as u64 != blocks * 8 {
        return None;
    }
    Some(
        payload
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
    )
}

#[async_trait::async_trait]
impl FrameHandler for ReplicaServer {
    async fn handle(&self, peer_node_id: u64, mut req: Frame) -> Frame {
        #[cfg(test)]
        let held = {
            let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
            match &*hold {
                Some((off, _)) if req.kind == Kind::Write && req.offset == *off => hold.take(),
                _ => None,
            }
        };
        #[cfg(test)]
        if let Some((_, mut release)) = held {
            let _ = release.wait_for(|r| *r).await;
            let status = match self.serve(peer_node_id, &mut req).await {
                Ok(_) => STATUS_OK,
                Err(e) => e as u32,
            };
            *self.held_status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
            return Frame::reply_to(&req, status, Bytes::new());
        }
        match self.serve(peer_node_id, &mut req).await {
            Ok(payload) => Frame::reply_to(&req, STATUS_OK, payload),
            Err(errno) => {
                if errno != libc::ESTALE {
                    tracing::debug!(
                        peer_node_id,
                        kind = ?req.kind,
                        volume_id = req.volume_id,
                        generation = req.generation,
                        errno,
                        "replica request refused or failed"
                    );
                }
                Frame::reply_to(&req, errno as u32, Bytes::new())
            }
        }
    }
}
