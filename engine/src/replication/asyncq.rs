//! Async replicas (policy `degrade` of the latency gate, DESIGN.md "Topology, domains and
//! the latency gate").
//!
//! A replica in [`ReplicaState::Async`] gets every write and write-zeroes through a queue
//! of its own, drained by one worker task that sends them in submission order, one at a
//! time. The coordinator does not wait for it: the ack rule counts only in-sync replicas.
//! Submission order is the coordinator's order: jobs are queued while the write holds its
//! range lock (under the members lock, in `snapshot_targets`), so overlapping writes are
//! queued in the order every in-sync replica applies them.
//!
//! **Flushes.** A client flush is queued too (not waited for), so each async replica's
//! disk holds every write before the last flush it has processed: after a crash of its
//! node it is what a local disk would be after a power loss, a crash-consistent image.
//!
//! **Bounded lag.** At most [`super::ASYNC_MAX_LAG_BYTES`] bytes and
//! [`super::ASYNC_MAX_LAG_OPS`] operations wait per async replica (a single larger
//! operation is accepted into an empty queue). When the bound is hit, or a send fails,
//! the queue stops taking data for good: the region of every write it does not carry (and
//! of every write that was queued but not acked, on a failure) is set in the replica's
//! dirty bitmap, which was empty when the replica turned async. The replica catches up
//! through resync when it leaves the async state (`Resyncing` committed).
//!
//! **Leaving async.** Before the replica is treated as out of sync and resynced, the
//! worker is stopped and awaited (so no queued write can land after resync copied its
//! region), every write still queued is set dirty, and the connection is replaced (a
//! frame still queued in the old socket belongs to an older session and is refused).
//!
//! Lock order: `members` → the queue's mutex.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::time::Instant;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::coordinator::Inner;
use super::target::{Ctx, Target, TargetError};
use crate::cluster::ReplicaState;

/// One operation an async replica has not acked yet.
#[derive(Clone)]
pub(super) enum AsyncOp {
    Write {
        offset: u64,
        data: Bytes,
    },
    Zeroes {
        offset: u64,
        len: u32,
    },
    /// A client flush: every write queued before it is made durable before any after it
    /// is sent, so the replica's disk is always a state a local disk could be in after a
    /// power loss (every write before the last flush it did, and some of the later ones).
    Flush,
}

impl AsyncOp {
    /// The bytes of the volume it changes: (offset, len).
    pub(super) fn range(&self) -> (u64, u64) {
        match self {
            AsyncOp::Write { offset, data } => (*offset, data.len() as u64),
            AsyncOp::Zeroes { offset, len } => (*offset, *len as u64),
            AsyncOp::Flush => (0, 0),
        }
    }

    fn len(&self) -> u64 {
        self.range().1
    }
}

struct Pending {
    at: Instant,
    op: AsyncOp,
}

#[derive(Default)]
struct QueueState {
    pending: VecDeque<Pending>,
    bytes: u64,
    /// No more data is taken (bound hit, send failed, or the replica leaves async).
    stopped: bool,
}

struct Shared {
    q: Mutex<QueueState>,
    wake: Notify,
    /// Set when the replica leaves async: the worker sends nothing more.
    cancel: AtomicBool,
}

/// The queue and worker of one async replica (kept in its `Member`).
pub(super) struct AsyncQueue {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl AsyncQueue {
    /// Starts the worker that sends to `target`.
    pub(super) fn start(
        inner: Weak<Inner>,
        node: u64,
        target: Target,
        ctx: Ctx,
        shutdown: watch::Receiver<bool>,
    ) -> AsyncQueue {
        let shared = Arc::new(Shared {
            q: Mutex::new(QueueState::default()),
            wake: Notify::new(),
            cancel: AtomicBool::new(false),
        });
        let worker = tokio::spawn(worker(inner, node, target, ctx, shared.clone(), shutdown));
        AsyncQueue {
            shared,
            worker: Some(worker),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.shared.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `op` unless the queue is stopped or `op` would exceed the bound (which
    /// stops it). Returns whether it was queued; if not, the caller marks it dirty.
    pub(super) fn push(&self, op: AsyncOp, max_bytes: u64, max_ops: usize) -> bool {
        let mut q = self.lock();
        if q.stopped {
            return false;
        }
        if !q.pending.is_empty() && (q.bytes + op.len() > max_bytes || q.pending.len() >= max_ops) {
            q.stopped = true;
            return false;
        }
        q.bytes += op.len();
        q.pending.push_back(Pending {
            at: Instant::now(),
            op,
        });
        drop(q);
        self.shared.wake.notify_one();
        true
    }

    /// (bytes queued and not acked, when the oldest of them was queued, stopped).
    pub(super) fn lag(&self) -> (u64, Option<Instant>, bool) {
        let q = self.lock();
        // A queued flush carries no data: the lag is the oldest write not acked.
        let oldest = q
            .pending
            .iter()
            .find(|p| !matches!(p.op, AsyncOp::Flush))
            .map(|p| p.at);
        (q.bytes, oldest, q.stopped)
    }

    /// Stops taking data and tells the worker to send nothing more. Returns the worker
    /// (to await) and every range still queued (to mark dirty once it ended).
    pub(super) fn cancel(mut self) -> (Option<JoinHandle<()>>, AsyncDrain) {
        self.shared.cancel.store(true, Ordering::SeqCst);
        self.lock().stopped = true;
        self.shared.wake.notify_one();
        (
            self.worker.take(),
            AsyncDrain {
                shared: self.shared.clone(),
            },
        )
    }

    /// Stops taking data and takes every queued range (a failed send).
    fn fail(&self) -> (Vec<(u64, u64)>, Option<Instant>) {
        let mut q = self.lock();
        q.stopped = true;
        let oldest = q.pending.front().map(|p| p.at);
        let ranges = q.pending.drain(..).map(|p| p.op.range()).collect();
        q.bytes = 0;
        (ranges, oldest)
    }
}

/// What is left of a cancelled queue: the ranges its replica may still miss.
pub(super) struct AsyncDrain {
    shared: Arc<Shared>,
}

impl AsyncDrain {
    /// Every range still queued (call after the worker ended). Also the oldest's time.
    pub(super) fn take(self) -> (Vec<(u64, u64)>, Option<Instant>) {
        let mut q = self.shared.q.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = q.pending.front().map(|p| p.at);
        let ranges = q.pending.drain(..).map(|p| p.op.range()).collect();
        q.bytes = 0;
        (ranges, oldest)
    }
}

impl Drop for AsyncQueue {
    fn drop(&mut self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

async fn worker(
    inner: Weak<Inner>,
    node: u64,
    target: Target,
    ctx: Ctx,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if shared.cancel.load(Ordering::SeqCst) || *shutdown.borrow() {
            return;
        }
        let next = {
            let q = shared.q.lock().unwrap_or_else(|e| e.into_inner());
            match q.pending.front() {
                Some(p) => Some(p.op.clone()),
                None if q.stopped => return,
                None => None,
            }
        };
        let Some(op) = next else {
            tokio::select! {
                // Fixed polling order (shutdown first): the simulation replays exactly.
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                _ = shared.wake.notified() => continue,
            }
        };
        let res: Result<(), TargetError> = match op {
            AsyncOp::Write { offset, data } => target.write(ctx, offset, data, false).await,
            AsyncOp::Zeroes { offset, len } => target.write_zeroes(ctx, offset, len, false).await,
            AsyncOp::Flush => target.flush(ctx).await,
        };
        match res {
            Ok(()) => {
                let mut q = shared.q.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(p) = q.pending.pop_front() {
                    q.bytes -= p.op.len();
                }
            }
            Err(e) => {
                if let Some(inner) = inner.upgrade() {
                    inner.async_failed(node, &e);
                }
                return;
            }
        }
    }
}

impl Inner {
    /// An async replica failed a send: its queue stops taking data, and everything it
    /// has not acked is set dirty. It stays async (not counted for acks either way) and
    /// catches up through resync when it leaves async.
    pub(super) fn async_failed(&self, node: u64, error: &TargetError) {
        let size = self.size_bytes;
        let mut members = self.lock_members();
        let Some(m) = members.iter_mut().find(|m| m.node == node) else {
            return;
        };
        if m.state != ReplicaState::Async {
            return;
        }
        let Some(q) = m.async_q.as_ref() else { return };
        let (ranges, oldest) = q.fail();
        tracing::warn!(volume = %self.name, node, %error, "async replica failed a write; it is tracked by dirty regions until it is resynced");
        m.mark_behind(size, &ranges, oldest.unwrap_or_else(Instant::now));
        m.last_error = Some(format!("async write failed: {error}"));
    }
}
