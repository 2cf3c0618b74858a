//! Bringing replicas together: background resync of replicas that are not in sync,
//! reconciliation of a crashed coordinator's hot regions at open, and the background
//! retirement of idle hot regions.
//!
//! Resync of one replica (DESIGN.md, "Resync"):
//! 1. connect and `Open` it at this generation (after the connection used before its
//!    ejection is gone, so nothing sent on it can still be queued on our side);
//! 2. commit `Resyncing`; from the same moment (under the members lock) writes are sent to
//!    it, so every later write reaches it and every earlier one is in its dirty bitmap
//!    (or it gets a full comparison when nothing was tracked);
//! 3. for each dirty region, under the range lock so no write races the copy: compare
//!    checksums with an in-sync replica and copy the blocks that differ;
//! 4. flush it, then commit `InSync`.
//!
//! Invariant: a replica is promoted only when no region it may miss is left, and a
//! failure at any step sends it back to out-of-sync with its bitmap still a superset of
//! what it misses.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use super::bitmap::RegionBitmap;
use super::coordinator::{block_range, hot_region_bytes, read_range, Inner, Member};
use super::target::{Ctx, Target, TargetError};
use super::{ProposeError, ReplicationError, DIRTY_REGION_BYTES};
use crate::cluster::{ApplyError, Command, ReplicaState};
use crate::store::{BLOCK_SIZE, MAX_IO_BYTES};

/// Which side of a copy failed.
pub(super) enum CopyError {
    Source(TargetError),
    Target(TargetError),
}

/// Makes `dst` hold what `src` holds in `[offset, offset + len)` (block aligned, at most
/// [`MAX_IO_BYTES`]), copying only the blocks whose digests differ. Returns the number
/// of blocks copied. The caller holds the range lock.
pub(super) async fn sync_range(
    ctx: Ctx,
    src: &Target,
    dst: &Target,
    offset: u64,
    len: u64,
) -> Result<u64, CopyError> {
    debug_assert!(len as usize <= MAX_IO_BYTES);
    let (a, b) = tokio::join!(
        src.checksums(ctx, offset, len),
        dst.checksums(ctx, offset, len)
    );
    let a = a.map_err(CopyError::Source)?;
    let b = b.map_err(CopyError::Target)?;
    let bs = BLOCK_SIZE as u64;
    let first = offset / bs;
    let mut copied = 0;
    let mut i = 0;
    while i < a.len() {
        if a[i] == b[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < a.len() && a[i] != b[i] {
            i += 1;
        }
        let (off, n) = ((first + start as u64) * bs, (i - start) as u64 * bs);
        let data = read_range(src, ctx, off, n)
            .await
            .map_err(CopyError::Source)?;
        dst.write(ctx, off, bytes::Bytes::from(data), false)
            .await
            .map_err(CopyError::Target)?;
        copied += (i - start) as u64;
    }
    Ok(copied)
}

impl Inner {
    /// The background resync task: every `resync_retry` (or when woken), adopt replica-set
    /// changes from the metadata and bring every replica that is not in sync back.
    pub(super) async fn resync_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if self.stopping() {
                return;
            }
            self.refresh_membership().await;
            self.check_in_sync_connections().await;
            let mut all_done = self.reconcile_unclean().await;
            let nodes: Vec<u64> = self
                .lock_members()
                .iter()
                .filter(|m| matches!(m.state, ReplicaState::OutOfSync | ReplicaState::Resyncing))
                .map(|m| m.node)
                .collect();
            for node in nodes {
                if self.stopping() {
                    return;
                }
                all_done &= self.resync_one(node).await;
            }
            if all_done {
                tokio::select! {
                    // Fixed polling order (shutdown first): the simulation replays exactly.
                    biased;
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(self.cfg.resync_retry) => {}
                    _ = self.resync_wake.notified() => {}
                }
            } else {
                // Something failed: wait the full interval, so a replica that fails at
                // once (and wakes us through its ejection) is not retried in a hot loop.
                tokio::select! {
                    // Fixed polling order (shutdown first): the simulation replays exactly.
                    biased;
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(self.cfg.resync_retry) => {}
                }
            }
        }
    }

    /// Adopts the metadata's replica set: new replicas join as out-of-sync (a full
    /// comparison), removed ones leave the fan-out. Notices a newer generation. Adopts
    /// committed async changes: an in-sync replica committed `Async` gets a queue (see
    /// `asyncq`); an async replica committed `Resyncing` (or out-of-sync) is stopped and
    /// resynced from its dirty regions.
    pub(super) async fn refresh_membership(self: &Arc<Self>) {
        let state = self.meta.state();
        let Some(vol) = state.volumes.get(&self.name) else {
            let _ = self.fence("the volume is gone from the cluster metadata".into());
            return;
        };
        if vol.generation != self.ctx.generation {
            let _ = self.fence(format!(
                "the volume was attached again (generation {})",
                vol.generation
            ));
            return;
        }
        let mut claimed_in_sync = Vec::new();
        {
            let mut members = self.lock_members();
            members.retain(|m| {
                let keep = vol.replica(m.node).is_some();
                if !keep {
                    tracing::info!(volume = %self.name, node = m.node, "replica removed from the replica set");
                }
                keep
            });
            for r in &vol.replicas {
                if members.iter().any(|m| m.node == r.node) {
                    continue;
                }
                tracing::info!(volume = %self.name, node = r.node, state = %r.state, "replica added to the replica set; it gets a full resync");
                members.push(Member::new(r.node, ReplicaState::OutOfSync));
                if r.state == ReplicaState::InSync {
                    claimed_in_sync.push(r.node);
                }
            }
        }
        // A new replica cannot hold this coordinator's writes; the metadata must not count
        // it as in sync.
        for node in claimed_in_sync {
            let _s = self.state_lock.lock().await;
            if let Err(e) = self.propose_state(node, ReplicaState::OutOfSync).await {
                tracing::error!(volume = %self.name, node, error = %e, "a replica added as in-sync could not be marked out of sync");
                if matches!(e, ProposeError::Apply(ApplyError::Fenced { .. })) {
                    let _ = self.fence(format!("marking new replica {node} out of sync: {e}"));
                }
            }
        }
        // Replicas in the volume's async domains are async by choice: once in sync (a
        // fresh volume, or a finished resync) they turn async, committed first.
        let pinned: Vec<u64> = self
            .lock_members()
            .iter()
            .filter(|m| {
                m.state == ReplicaState::InSync
                    && vol
                        .replica(m.node)
                        .is_some_and(|r| r.state == ReplicaState::InSync)
                    && state.async_pinned(vol, m.node)
            })
            .map(|m| m.node)
            .collect();
        for node in pinned {
            let _s = self.state_lock.lock().await;
            let members: Vec<(u64, ReplicaState, bool)> = self
                .lock_members()
                .iter()
                .map(|m| {
                    let connected = m.target.as_ref().is_some_and(|t| !t.is_closed());
                    (m.node, m.state, connected)
                })
                .collect();
            if !super::replica_set::may_turn_async(node, &members) {
                continue; // no other copy known good now: stay in sync (seed 7177)
            }
            match self.propose_state(node, ReplicaState::Async).await {
                Ok(()) => {
                    tracing::info!(volume = %self.name, node, "replica in an async domain: async from now on")
                }
                Err(e @ ProposeError::Apply(ApplyError::Fenced { .. })) => {
                    let _ = self.fence(format!("turning node {node} async: {e}"));
                    return;
                }
                Err(e) => {
                    tracing::warn!(volume = %self.name, node, error = %e, "cannot turn the async-domain replica async yet")
                }
            }
        }
        self.adopt_async_changes().await;
        // No wake-up here: the caller resyncs the new members in this same round (a
        // wake-up stored now would make the loop spin without ever sleeping).
    }

    /// See [`Inner::refresh_membership`]. Returns whether anything changed.
    pub(super) async fn adopt_async_changes(self: &Arc<Self>) -> bool {
        let _s = self.state_lock.lock().await;
        if self.check_fenced().is_err() {
            return false;
        }
        let state = self.meta.state();
        let Some(vol) = state.volumes.get(&self.name) else {
            return false;
        };
        if vol.generation != self.ctx.generation {
            return false;
        }
        let mut enter = Vec::new();
        let mut leave = Vec::new();
        let mut promoted = Vec::new();
        for m in self.lock_members().iter() {
            let Some(rec) = vol.replica(m.node) else {
                continue;
            };
            match (m.state, rec.state) {
                (ReplicaState::InSync, ReplicaState::Async) => enter.push(m.node),
                (ReplicaState::Async, ReplicaState::InSync) => promoted.push(m.node),
                (ReplicaState::Async, s) if s != ReplicaState::Async => leave.push(m.node),
                _ => {}
            }
        }
        // Promoted (`domains deactivate --promote-async`): the record says it holds a
        // prefix of the acked writes, and this coordinator still has the rest queued. Once
        // its queue has delivered them it holds every acked write and serves as in sync.
        // If it cannot get them (its queue failed or is stuck), it is out of sync like any
        // replica leaving async; writes then fail rather than being acked by no replica.
        for node in promoted {
            if !self.promote_async(node).await {
                leave.push(node);
            }
        }
        let changed = !enter.is_empty() || !leave.is_empty();
        let unclean = self.unclean_ranges();
        for node in enter {
            let size = self.size_bytes;
            let mut members = self.lock_members();
            let Some(m) = members.iter_mut().find(|m| m.node == node) else {
                continue;
            };
            m.state = ReplicaState::Async;
            m.diverged.clear();
            m.async_behind_since = None;
            match m.target.clone() {
                Some(t) => {
                    // Everything before this moment was acked by it (it was in sync),
                    // except in unclean regions: a write failed there on every in-sync
                    // copy, so it may hold one the others lack, or lack one they hold.
                    // Reconciliation compares in-sync copies only; these regions are
                    // now its to compare (seed 8063).
                    let mut d = RegionBitmap::empty(size.div_ceil(DIRTY_REGION_BYTES));
                    for &(off, len) in &unclean {
                        d.set_bytes(off, len, DIRTY_REGION_BYTES);
                    }
                    m.dirty = Some(d);
                    m.async_q = Some(super::asyncq::AsyncQueue::start(
                        Arc::downgrade(self),
                        node,
                        t,
                        self.ctx,
                        self.shutdown.subscribe(),
                    ));
                }
                None => m.dirty = None,
            }
            tracing::warn!(volume = %self.name, node, "replica is async: writes are acked without waiting for it");
        }
        for node in leave {
            let cancelled = {
                let mut members = self.lock_members();
                members
                    .iter_mut()
                    .find(|m| m.node == node)
                    .and_then(|m| m.async_q.take())
                    .map(|q| q.cancel())
            };
            // At most one send is in flight (bounded by the replica timeout).
            let drain = match cancelled {
                Some((worker, drain)) => {
                    if let Some(w) = worker {
                        let _ = w.await;
                    }
                    Some(drain)
                }
                None => None,
            };
            let size = self.size_bytes;
            let mut members = self.lock_members();
            let Some(m) = members.iter_mut().find(|m| m.node == node) else {
                continue;
            };
            if let Some(d) = drain {
                let (ranges, since) = d.take();
                m.mark_behind(size, &ranges, since.unwrap_or_else(Instant::now));
            }
            let diverged = std::mem::take(&mut m.diverged);
            m.mark_behind(size, &diverged, Instant::now());
            m.async_behind_since = None;
            m.state = ReplicaState::OutOfSync;
            // A new connection (a new session) for the resync: a frame still queued in
            // the old one can never land after the copy.
            m.end_session();
            tracing::info!(volume = %self.name, node, dirty_bytes = ?m.dirty_bytes(size), "async replica leaves async; resyncing its dirty regions");
        }
        if changed {
            self.resync_wake.notify_one();
        }
        changed
    }

    /// In-sync replicas whose connection is gone (their node restarted, the link broke)
    /// while no I/O noticed: one with another connected in-sync copy beside it is ejected
    /// (it resyncs, with a full comparison if it lost writes); the last one cannot be, so
    /// it is reconnected, a new session at this generation, rather than failing every read
    /// and flush on a dead connection. If it comes back having lost acknowledged writes
    /// that were never flushed (an unclean restart), the replicas that are not in sync may
    /// hold some of them: they get a full comparison against it.
    pub(super) async fn check_in_sync_connections(&self) {
        // An async replica that lost its connection, or whose queue stopped, misses
        // writes or durability: its record leaves `async` now, not at the next write (a
        // promotion trusts an `async` record). So does one that is due a comparison its
        // queue cannot give (its bitmap is not empty: the last in-sync copy restarted
        // uncleanly, say), or that took a write that failed on every in-sync copy: only a
        // resync catches it up or compares it, and nothing else would start one for a
        // replica that is async by choice (seeds 68 and 1600).
        let lost_async: Vec<u64> = self
            .lock_members()
            .iter()
            .filter(|m| m.state == ReplicaState::Async)
            .filter(|m| {
                m.target.as_ref().is_none_or(|t| t.is_closed())
                    || m.async_q.as_ref().is_none_or(|q| q.lag().2)
                    || m.dirty.as_ref().is_none_or(|d| d.count() > 0)
                    || !m.diverged.is_empty()
            })
            .map(|m| m.node)
            .collect();
        for node in lost_async {
            let e = TargetError::Transport("async replica lost or behind".into());
            if let Err(err) = self
                .replica_failed(node, Some((0, 0)), &e, "connection check")
                .await
            {
                tracing::warn!(volume = %self.name, node, error = %err, "cannot commit a lost async replica out of sync");
            }
        }
        let (dead, alive): (Vec<u64>, usize) = {
            let members = self.lock_members();
            let in_sync: Vec<&Member> = members
                .iter()
                .filter(|m| m.state == ReplicaState::InSync)
                .collect();
            let dead = in_sync
                .iter()
                .filter(|m| m.target.as_ref().is_none_or(|t| t.is_closed()))
                .map(|m| m.node)
                .collect::<Vec<_>>();
            let alive = in_sync.len() - dead.len();
            (dead, alive)
        };
        if dead.is_empty() {
            return;
        }
        if alive > 0 {
            for node in dead {
                let e = TargetError::Transport("connection lost while idle".into());
                if let Err(err) = self
                    .replica_failed(node, Some((0, 0)), &e, "connection check")
                    .await
                {
                    tracing::warn!(volume = %self.name, node, error = %err, "cannot eject an in-sync replica whose connection is gone");
                }
            }
            return;
        }
        // Reconnected with its files created empty (a wiped or replaced pool) while another
        // in-sync copy may hold data: it holds nothing, and must neither serve nor be a
        // reconciliation source (seed 37337: its zeros overwrote the other copy's data).
        let mut empty = Vec::new();
        for node in dead {
            let (target, info) = match self.connect(node).await {
                Ok(v) => v,
                Err(e) => {
                    self.set_last_error(
                        node,
                        format!("reconnecting the last in-sync replica: {e}"),
                    );
                    continue;
                }
            };
            let _s = self.state_lock.lock().await;
            let mut members = self.lock_members();
            let Some(m) = members.iter_mut().find(|m| m.node == node) else {
                continue;
            };
            if m.state != ReplicaState::InSync {
                continue;
            }
            let restarted = m.instance.is_some_and(|i| i != info.instance);
            let lost = restarted && (info.suspect != 0 || info.recovered_regions > 0);
            m.target = Some(target);
            m.instance = Some(info.instance);
            m.suspect = (info.suspect, info.suspect_epoch);
            m.last_error = None;
            tracing::warn!(volume = %self.name, node, restarted, "reconnected the last in-sync replica");
            let created = |suspect: u64| suspect & crate::store::SUSPECT_CREATED != 0;
            if created(info.suspect)
                && members.iter().any(|o| {
                    // An in-sync copy not reconnected yet counts as holding data.
                    o.node != node && o.state == ReplicaState::InSync && !created(o.suspect.0)
                })
            {
                empty.push(node);
            }
            if lost {
                tracing::error!(volume = %self.name, node, "the last in-sync replica restarted uncleanly: acknowledged writes that were not flushed may be lost; the other replicas get a full comparison");
                for o in members
                    .iter_mut()
                    .filter(|o| o.node != node && o.state != ReplicaState::InSync)
                {
                    o.dirty = None;
                    if o.state == ReplicaState::Resyncing {
                        // Its running copy started from a bitmap; restart it from scratch.
                        o.state = ReplicaState::OutOfSync;
                        o.end_session();
                    }
                }
            }
        }
        for node in empty {
            tracing::warn!(volume = %self.name, node, "reconnected in-sync replica was created empty (missing files) while another in-sync copy holds data; it gets a full copy");
            let e = TargetError::Transport("its files were created empty".into());
            if let Err(err) = self.replica_failed(node, None, &e, "reconnect").await {
                tracing::warn!(volume = %self.name, node, error = %err, "cannot eject a replica created empty");
            }
        }
    }

    /// Waits (bounded) for `node`'s async queue to deliver everything queued, then makes it
    /// in sync in memory. Returns false, changing nothing, when it cannot.
    async fn promote_async(&self, node: u64) -> bool {
        let deadline = Instant::now() + 2 * self.cfg.replica_timeout;
        loop {
            let lag = {
                let members = self.lock_members();
                match members.iter().find(|m| m.node == node) {
                    Some(m) if m.state == ReplicaState::Async => {
                        let behind = m.dirty.as_ref().is_some_and(|d| d.count() > 0);
                        match (&m.async_q, &m.target) {
                            (Some(q), Some(_)) if !behind => {
                                let (bytes, _, stopped) = q.lag();
                                if stopped {
                                    None
                                } else {
                                    Some(bytes)
                                }
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                }
            };
            match lag {
                None => {
                    tracing::error!(volume = %self.name, node, "promoted async replica misses acknowledged writes; it is resynced instead");
                    return false;
                }
                Some(0) => break,
                Some(_) if Instant::now() >= deadline => {
                    tracing::error!(volume = %self.name, node, "promoted async replica did not catch up in time; it is resynced instead");
                    return false;
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        let cancelled = {
            let mut members = self.lock_members();
            members
                .iter_mut()
                .find(|m| m.node == node)
                .and_then(|m| m.async_q.take())
                .map(|q| q.cancel())
        };
        let mut missed = Vec::new();
        if let Some((worker, drain)) = cancelled {
            if let Some(w) = worker {
                let _ = w.await;
            }
            missed = drain.take().0;
            missed.retain(|&(_, len)| len > 0); // a queued flush carries no write
        }
        let mut members = self.lock_members();
        let Some(m) = members.iter_mut().find(|m| m.node == node) else {
            return false;
        };
        if !missed.is_empty() {
            // A write queued after the drain check that the worker never sent.
            m.mark_behind(self.size_bytes, &missed, Instant::now());
            return false;
        }
        m.state = ReplicaState::InSync;
        m.dirty = None;
        m.diverged.clear(); // unacked writes it holds beyond the lost copies: allowed
        m.async_behind_since = None;
        tracing::warn!(volume = %self.name, node, "promoted async replica is in sync");
        true
    }

    fn set_last_error(&self, node: u64, error: String) {
        if let Some(m) = self.lock_members().iter_mut().find(|m| m.node == node) {
            if m.last_error.as_deref() != Some(error.as_str()) {
                tracing::warn!(volume = %self.name, node, %error, "resync cannot proceed yet");
            }
            m.last_error = Some(error);
        }
    }

    /// One attempt at bringing `node` back in sync. Errors are recorded in its stats and
    /// retried by the next round. Returns whether the replica is in sync (or gone).
    async fn resync_one(&self, node: u64) -> bool {
        self.try_resync(node).await;
        !self
            .lock_members()
            .iter()
            .any(|m| m.node == node && m.state != ReplicaState::InSync)
    }

    async fn try_resync(&self, node: u64) {
        // 1. Connected and opened at this generation.
        let (has_target, old_alive) = {
            let members = self.lock_members();
            let Some(m) = members.iter().find(|m| m.node == node) else {
                return;
            };
            if m.state == ReplicaState::InSync {
                return;
            }
            (
                m.target.is_some(),
                m.old_client.as_ref().is_some_and(|w| w.strong_count() > 0),
            )
        };
        if !has_target {
            if old_alive {
                // A call on the old connection is still within its timeout.
                return;
            }
            match self.connect(node).await {
                Ok((target, info)) => {
                    let mut members = self.lock_members();
                    let Some(m) = members.iter_mut().find(|m| m.node == node) else {
                        return;
                    };
                    if info.suspect != 0
                        || (m.instance.is_some_and(|i| i != info.instance)
                            && info.recovered_regions > 0)
                    {
                        // Reopened after an unclean stop (or a failed fdatasync, or with
                        // its files created empty), now or at any earlier open its store
                        // remembers: writes it acked may be gone, wherever they were.
                        tracing::warn!(volume = %self.name, node, suspect = info.suspect, "replica may have lost acknowledged writes; it gets a full comparison");
                        m.dirty = None;
                    }
                    m.suspect = (info.suspect, info.suspect_epoch);
                    m.instance = Some(info.instance);
                    m.target = Some(target);
                    m.old_client = None;
                }
                Err(e) => {
                    self.set_last_error(node, e);
                    return;
                }
            }
        }

        // 2. Resyncing, committed; from now on writes reach it.
        {
            let _s = self.state_lock.lock().await;
            if self.check_fenced().is_err() {
                return;
            }
            let state = self
                .lock_members()
                .iter()
                .find(|m| m.node == node)
                .map(|m| m.state);
            match state {
                Some(ReplicaState::OutOfSync) => {}
                Some(ReplicaState::Resyncing) => {}
                _ => return,
            }
            if state == Some(ReplicaState::OutOfSync) {
                match self.propose_state(node, ReplicaState::Resyncing).await {
                    Ok(()) => {}
                    Err(e @ ProposeError::Apply(ApplyError::Fenced { .. })) => {
                        let _ = self.fence(format!("starting resync of node {node}: {e}"));
                        return;
                    }
                    Err(e) => {
                        self.set_last_error(node, format!("cannot commit resyncing: {e}"));
                        return;
                    }
                }
            }
            let regions = self.size_bytes.div_ceil(DIRTY_REGION_BYTES);
            let mut members = self.lock_members();
            let Some(m) = members.iter_mut().find(|m| m.node == node) else {
                return;
            };
            if m.target.is_none() {
                return; // failed in between; back to out-of-sync already
            }
            m.state = ReplicaState::Resyncing;
            m.full_compare = m.dirty.is_none();
            if m.dirty.is_none() {
                m.dirty = Some(RegionBitmap::full(regions));
            }
            m.resync_done_bytes = 0;
            m.resync_copied_bytes = 0;
            m.last_error = None;
            tracing::info!(volume = %self.name, node, dirty_bytes = ?m.dirty_bytes(self.size_bytes), "resync started");
        }

        // 3. Copy what it misses, one region at a time under the range lock.
        let mut last_publish = Instant::now() - self.cfg.resync_progress_interval;
        loop {
            if self.stopping() {
                return;
            }
            let (region, dst) = {
                let members = self.lock_members();
                let Some(m) = members.iter().find(|m| m.node == node) else {
                    return;
                };
                let (ReplicaState::Resyncing, Some(dst)) = (m.state, m.target.clone()) else {
                    return;
                };
                match m.dirty.as_ref().and_then(|d| d.first_set()) {
                    Some(r) => (r, dst),
                    None => break,
                }
            };
            let off = region * DIRTY_REGION_BYTES;
            let len = DIRTY_REGION_BYTES.min(self.size_bytes - off);
            let (b0, b1) = block_range(off, len);
            let lock = self.locks.lock(b0, b1).await;
            {
                let mut members = self.lock_members();
                let Some(m) = members.iter_mut().find(|m| m.node == node) else {
                    return;
                };
                if m.state != ReplicaState::Resyncing {
                    return;
                }
                if let Some(d) = m.dirty.as_mut() {
                    d.clear(region);
                }
            }
            let reset = |inner: &Inner| {
                if let Some(m) = inner.lock_members().iter_mut().find(|m| m.node == node) {
                    if let Some(d) = m.dirty.as_mut() {
                        d.set(region);
                    }
                }
            };
            let sources = self.read_sources(Some(node));
            if sources.is_empty() {
                reset(self);
                self.set_last_error(node, "no in-sync replica to copy from".into());
                return;
            }
            // Each in-sync copy in turn: a bad block on one (or one that stopped
            // answering) does not stall the resync while another holds the region.
            let mut source_errors = Vec::new();
            for (src_node, src) in &sources {
                match sync_range(self.ctx, src, &dst, off, len).await {
                    Ok(blocks) => {
                        if let Some(m) = self.lock_members().iter_mut().find(|m| m.node == node) {
                            m.resync_done_bytes += len;
                            m.resync_copied_bytes += blocks * BLOCK_SIZE as u64;
                        }
                        source_errors.clear();
                        break;
                    }
                    Err(CopyError::Target(e)) => {
                        reset(self);
                        let _ = self
                            .replica_failed(node, Some((off, len)), &e, "resync")
                            .await;
                        return;
                    }
                    Err(CopyError::Source(e)) => {
                        tracing::warn!(volume = %self.name, node, source = src_node, region, error = %e, "resync source failed; trying another in-sync copy");
                        source_errors.push(format!("node {src_node}: {e}"));
                    }
                }
            }
            if !source_errors.is_empty() {
                reset(self);
                self.set_last_error(
                    node,
                    format!("resync source failed: {}", source_errors.join("; ")),
                );
                return;
            }
            drop(lock);
            if last_publish.elapsed() >= self.cfg.resync_progress_interval {
                last_publish = Instant::now();
                self.publish_progress(node).await;
            }
        }

        // 4. Durable, then in sync.
        let dst = self
            .lock_members()
            .iter()
            .find(|m| m.node == node)
            .and_then(|m| m.target.clone());
        let Some(dst) = dst else { return };
        if let Err(e) = dst.flush(self.ctx).await {
            let _ = self.replica_failed(node, None, &e, "resync flush").await;
            return;
        }
        // Every block was compared since its Open: its store may forget why it was suspect.
        let clear = self
            .lock_members()
            .iter()
            .find(|m| m.node == node)
            .filter(|m| m.full_compare && m.suspect.0 != 0)
            .map(|m| m.suspect.1);
        if let Some(epoch) = clear {
            match dst.clear_suspect(self.ctx, epoch).await {
                Ok(()) => {
                    if let Some(m) = self.lock_members().iter_mut().find(|m| m.node == node) {
                        m.suspect = (0, 0);
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %self.name, node, error = %e, "suspect flags not cleared; its next resync compares everything again");
                }
            }
        }
        // No write is in flight while it turns in sync: each write saw it as resyncing
        // (and a write that failed on every in-sync replica marked it dirty again, see
        // `unknown_outcome`, which the check below then sees) or sees it in sync.
        let blocks = self.size_bytes.div_ceil(BLOCK_SIZE as u64);
        let _quiesced = self.locks.lock_all(blocks).await;
        let _s = self.state_lock.lock().await;
        if self.check_fenced().is_err() {
            return;
        }
        let ready = self.lock_members().iter().any(|m| {
            m.node == node
                && m.state == ReplicaState::Resyncing
                && m.target.is_some()
                && m.dirty.as_ref().is_some_and(|d| d.count() == 0)
        });
        if !ready {
            return;
        }
        self.publish_progress(node).await;
        match self.propose_state(node, ReplicaState::InSync).await {
            Ok(()) => {
                if let Some(m) = self.lock_members().iter_mut().find(|m| m.node == node) {
                    m.state = ReplicaState::InSync;
                    m.dirty = None;
                    m.full_compare = false;
                    tracing::info!(volume = %self.name, node, done_bytes = m.resync_done_bytes, copied_bytes = m.resync_copied_bytes, "resync finished; replica in sync");
                }
            }
            Err(e @ ProposeError::Apply(ApplyError::Fenced { .. })) => {
                let _ = self.fence(format!("promoting node {node}: {e}"));
            }
            Err(e) => self.set_last_error(node, format!("cannot commit in-sync: {e}")),
        }
    }

    async fn publish_progress(&self, node: u64) {
        let (done, total) = {
            let members = self.lock_members();
            let Some(m) = members.iter().find(|m| m.node == node) else {
                return;
            };
            (
                m.resync_done_bytes,
                m.resync_done_bytes + m.dirty_bytes(self.size_bytes).unwrap_or(0),
            )
        };
        let cmd = Command::SetResyncProgress {
            name: self.name.clone(),
            node,
            generation: self.ctx.generation,
            done_bytes: done,
            total_bytes: total,
        };
        match self.meta.propose(cmd).await {
            Ok(_) => {}
            Err(e @ ProposeError::Apply(ApplyError::Fenced { .. })) => {
                let _ = self.fence(format!("publishing resync progress: {e}"));
            }
            Err(e) => {
                tracing::debug!(volume = %self.name, node, error = %e, "resync progress not published")
            }
        }
    }

    /// Reconciles hot regions that may differ between in-sync replicas: those a previous
    /// coordinator left (at open), or this one's unclean regions (at close, M1). Each is
    /// compared with [`Inner::reconcile_region`]. Then every in-sync replica is flushed and
    /// the reconciled regions leave the hot set. Returns the regions that could not be
    /// reconciled.
    pub(super) async fn reconcile(
        &self,
        regions: &BTreeSet<u64>,
    ) -> Result<Vec<u64>, ReplicationError> {
        if regions.is_empty() {
            return Ok(Vec::new());
        }
        let mut cleared = Vec::new();
        let mut left = Vec::new();
        for &region in regions {
            if self.reconcile_region(region, false).await? {
                cleared.push(region);
            } else {
                left.push(region);
            }
        }
        self.flush_all().await?;
        if !cleared.is_empty() {
            self.propose_hot(Vec::new(), cleared.clone())
                .await
                .map_err(|e| self.fence(format!("cannot clear reconciled hot regions: {e}")))?;
        }
        tracing::info!(volume = %self.name, reconciled = cleared.len(), left = left.len(), blocks = self.counters.reconciled_blocks.load(Ordering::Relaxed), "hot regions reconciled");
        Ok(left)
    }

    /// Reconciles this coordinator's unclean regions while it runs (seed 11536): a write
    /// that failed on every in-sync replica may have landed on some of them, and until the
    /// region is compared, two reads of a block could return different bytes. Called by
    /// the resync loop; a region whose comparison fails stays unclean and is tried again.
    /// A reconciled region stays hot, with a completed write no flush has covered, so it
    /// retires only after a flush as usual. Returns whether none is left.
    pub(super) async fn reconcile_unclean(&self) -> bool {
        let unclean = self.hot.unclean();
        if !unclean.is_empty() {
            tracing::debug!(volume = %self.name, regions = ?unclean, "reconciling unclean regions");
        }
        let mut all = true;
        for region in unclean {
            if self.stopping() {
                return false;
            }
            match self.reconcile_region(region, true).await {
                Ok(true) => {}
                Ok(false) => all = false,
                Err(e) => {
                    tracing::warn!(volume = %self.name, region, error = %e, "unclean region not reconciled");
                    all = false;
                }
            }
        }
        all
    }

    /// Compares one hot region across the in-sync replicas and copies the differing blocks
    /// from one of them (the local one first) to the others. A target that fails is
    /// ejected with the region dirty. Returns whether the region was compared from a
    /// source that answered throughout, with every in-sync replica connected. With
    /// `live`, the region is marked clean in the hot set before its lock is released, so a
    /// write that fails after the comparison makes it unclean again.
    async fn reconcile_region(&self, region: u64, live: bool) -> Result<bool, ReplicationError> {
        let Some((off, len)) = hot_region_bytes(region, self.size_bytes) else {
            if live {
                self.hot.reconciled(region);
            }
            return Ok(true);
        };
        let (b0, b1) = block_range(off, len);
        let _lock = self.locks.lock(b0, b1).await;
        // Every in-sync replica must take part: one without a session (it gets a new one
        // first) would be left out of the comparison.
        if self
            .lock_members()
            .iter()
            .any(|m| m.state == ReplicaState::InSync && m.target.is_none())
        {
            return Ok(false);
        }
        for (src_node, src) in self.read_sources(None) {
            let mut source_ok = true;
            for (dst_node, dst) in self.read_sources(Some(src_node)) {
                match sync_range(self.ctx, &src, &dst, off, len).await {
                    Ok(blocks) => {
                        if blocks > 0 {
                            tracing::warn!(volume = %self.name, region, from = src_node, to = dst_node, blocks, "reconciled blocks that differed between in-sync replicas");
                        }
                        self.counters
                            .reconciled_blocks
                            .fetch_add(blocks, Ordering::Relaxed);
                    }
                    Err(CopyError::Target(e)) => {
                        self.replica_failed(dst_node, Some((off, len)), &e, "reconcile")
                            .await?;
                    }
                    Err(CopyError::Source(e)) => {
                        tracing::warn!(volume = %self.name, region, node = src_node, error = %e, "reconcile source failed; trying another");
                        source_ok = false;
                        break;
                    }
                }
            }
            if source_ok {
                if live {
                    self.hot.reconciled(region);
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The background task that retires hot regions idle for `hot_idle_retire` (after a
    /// flush, when their writes are not known durable yet).
    pub(super) async fn retire_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let tick =
            (self.cfg.hot_idle_retire / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::select! {
                // Fixed polling order (shutdown first): the simulation replays exactly.
                biased;
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let _commit = self.hot.commit.lock().await;
            if self.stopping() {
                return;
            }
            let retire = self.hot.pick_retire(self.cfg.hot_idle_retire, None);
            if retire.regions.is_empty() {
                continue;
            }
            if retire.needs_flush {
                if let Err(e) = self.flush_all().await {
                    tracing::warn!(volume = %self.name, error = %e, "flush before retiring hot regions failed");
                    self.hot.cancel_retire(&retire.regions);
                    continue;
                }
            }
            match self.propose_hot(Vec::new(), retire.regions.clone()).await {
                Ok(()) => self.hot.retired(&retire.regions),
                Err(e) => {
                    self.hot.cancel_retire(&retire.regions);
                    if matches!(e, ProposeError::Apply(ApplyError::Fenced { .. })) {
                        let _ = self.fence(format!("retiring hot regions: {e}"));
                    }
                }
            }
        }
    }
}
