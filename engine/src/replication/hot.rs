//! The coordinator's activity log, in memory: which [`super::HOT_REGION_BYTES`] regions are
//! hot (committed to `VolumeRecord::hot_regions`), their writes in flight, and whether
//! their completed writes are known durable on every in-sync replica.
//!
//! Invariant (with the coordinator, which does the proposals): **no write reaches any
//! replica unless its regions are committed hot**, and a region leaves the hot set only
//! when it has no write in flight, every write to it completed (acked) and a flush of every
//! in-sync replica finished after that. So after a coordinator crash, every block that can
//! differ between in-sync replicas lies in a committed hot region, which the next
//! coordinator reconciles. A region whose write failed without an ack is *unclean*: it may
//! differ between replicas, so it is not retired until the resync loop has compared it
//! ([`HotSet::reconciled`]) and a flush has covered the copies that made.
//!
//! Proposals are batched: writers that miss regions record them as wanted and one of them,
//! holding [`HotSet::commit`], proposes every wanted region at once (group commit).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

struct RegionUse {
    in_flight: u32,
    last_write_seq: u64,
    last_used: Instant,
    unclean: bool,
    /// Picked for removal; the removal is being committed. Writers wait for it.
    retiring: bool,
}

#[derive(Default)]
struct Inner {
    regions: BTreeMap<u64, RegionUse>,
    wanted: BTreeSet<u64>,
    /// Completed writes, counted.
    write_seq: u64,
    /// Every write with a sequence number up to this one is durable on every in-sync
    /// replica (a flush that started after it completed succeeded).
    flushed_seq: u64,
}

pub(super) struct HotSet {
    inner: Mutex<Inner>,
    /// Held while a `HotRegions` proposal is made; serialises additions and removals.
    pub(super) commit: tokio::sync::Mutex<()>,
}

/// Regions picked for removal.
pub(super) struct Retire {
    pub(super) regions: Vec<u64>,
    /// Some picked region has a completed write no flush has covered yet.
    pub(super) needs_flush: bool,
}

impl HotSet {
    pub(super) fn new() -> HotSet {
        HotSet {
            inner: Mutex::new(Inner::default()),
            commit: tokio::sync::Mutex::new(()),
        }
    }

    /// Adds committed hot regions that may differ between replicas (a reconciliation could
    /// not clear them); they are never retired by this coordinator.
    pub(super) fn add_unclean(&self, regions: &[u64]) {
        let mut g = self.lock();
        for &r in regions {
            g.regions.insert(
                r,
                RegionUse {
                    in_flight: 0,
                    last_write_seq: 0,
                    last_used: Instant::now(),
                    unclean: true,
                    retiring: false,
                },
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.lock().regions.len()
    }

    /// Enters regions `r0..=r1` for a write if all are hot (and none is retiring). If not,
    /// records the missing ones as wanted and returns `false`: commit them, then retry.
    pub(super) fn try_enter(&self, r0: u64, r1: u64) -> bool {
        let mut g = self.lock();
        let ready = (r0..=r1).all(|r| g.regions.get(&r).is_some_and(|u| !u.retiring));
        if ready {
            for r in r0..=r1 {
                if let Some(u) = g.regions.get_mut(&r) {
                    u.in_flight += 1;
                }
            }
            return true;
        }
        for r in r0..=r1 {
            if !g.regions.contains_key(&r) {
                g.wanted.insert(r);
            }
        }
        false
    }

    /// The wanted regions not hot yet (the batch to propose). Call with `commit` held.
    pub(super) fn take_wanted(&self) -> Vec<u64> {
        let mut g = self.lock();
        let wanted = std::mem::take(&mut g.wanted);
        wanted
            .into_iter()
            .filter(|r| !g.regions.contains_key(r))
            .collect()
    }

    /// Records a committed addition.
    pub(super) fn added(&self, add: &[u64]) {
        let mut g = self.lock();
        let now = Instant::now();
        for &r in add {
            g.regions.entry(r).or_insert(RegionUse {
                in_flight: 0,
                last_write_seq: 0,
                last_used: now,
                unclean: false,
                retiring: false,
            });
        }
    }

    /// Ends a write's use of `r0..=r1`. `acked`: the write completed on every in-sync
    /// replica; otherwise the regions are unclean from now on.
    pub(super) fn finish(&self, r0: u64, r1: u64, acked: bool) {
        let mut g = self.lock();
        g.write_seq += 1;
        let seq = g.write_seq;
        let now = Instant::now();
        for r in r0..=r1 {
            if let Some(u) = g.regions.get_mut(&r) {
                u.in_flight = u.in_flight.saturating_sub(1);
                u.last_write_seq = seq;
                u.last_used = now;
                u.unclean |= !acked;
            }
        }
    }

    /// The sequence number of the last completed write. A flush that starts after reading
    /// it covers every write up to it.
    pub(super) fn write_seq(&self) -> u64 {
        self.lock().write_seq
    }

    /// A flush of every in-sync replica that started after `seq` was read succeeded.
    pub(super) fn flushed(&self, seq: u64) {
        let mut g = self.lock();
        g.flushed_seq = g.flushed_seq.max(seq);
    }

    /// Picks regions to retire: no write in flight, not unclean, unused for `idle_for`,
    /// and not in `keep`. Marks them retiring. Call with `commit` held.
    pub(super) fn pick_retire(&self, idle_for: Duration, keep: Option<(u64, u64)>) -> Retire {
        let mut g = self.lock();
        let now = Instant::now();
        let flushed = g.flushed_seq;
        let mut out = Retire {
            regions: Vec::new(),
            needs_flush: false,
        };
        for (&r, u) in g.regions.iter_mut() {
            let kept = keep.is_some_and(|(a, b)| (a..=b).contains(&r));
            if kept || u.in_flight > 0 || u.unclean || u.retiring {
                continue;
            }
            if now.duration_since(u.last_used) < idle_for {
                continue;
            }
            u.retiring = true;
            out.needs_flush |= u.last_write_seq > flushed;
            out.regions.push(r);
        }
        out
    }

    /// The removal of `regions` committed.
    pub(super) fn retired(&self, regions: &[u64]) {
        let mut g = self.lock();
        for r in regions {
            g.regions.remove(r);
        }
    }

    /// The removal of `regions` did not happen; they stay hot.
    pub(super) fn cancel_retire(&self, regions: &[u64]) {
        let mut g = self.lock();
        for r in regions {
            if let Some(u) = g.regions.get_mut(r) {
                u.retiring = false;
            }
        }
    }

    /// Every region, for a clean close.
    pub(super) fn all(&self) -> Vec<u64> {
        self.lock().regions.keys().copied().collect()
    }

    /// A write in `r0..=r1` failed on every in-sync replica (it is still in flight; its
    /// `finish` follows).
    pub(super) fn mark_unclean(&self, r0: u64, r1: u64) {
        let mut g = self.lock();
        for r in r0..=r1 {
            if let Some(u) = g.regions.get_mut(&r) {
                u.unclean = true;
            }
        }
    }

    /// An unclean region was compared and made equal on every in-sync replica (call with
    /// its blocks locked). It counts as holding a completed write no flush has covered:
    /// the copies the comparison made must be flushed before it retires.
    pub(super) fn reconciled(&self, region: u64) {
        let mut g = self.lock();
        g.write_seq += 1;
        let seq = g.write_seq;
        if let Some(u) = g.regions.get_mut(&region) {
            u.unclean = false;
            u.last_write_seq = seq;
            u.last_used = Instant::now();
        }
    }

    /// Hot regions a write failed in without an ack (they may differ between replicas).
    pub(super) fn unclean(&self) -> BTreeSet<u64> {
        self.lock()
            .regions
            .iter()
            .filter(|(_, u)| u.unclean)
            .map(|(r, _)| *r)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_retire_only_when_idle_clean_and_flushed() {
        let h = HotSet::new();
        assert!(!h.try_enter(1, 2));
        assert_eq!(h.take_wanted(), vec![1, 2]);
        h.added(&[1, 2]);
        assert!(h.try_enter(1, 2));
        // In flight: not retirable.
        assert!(h.pick_retire(Duration::ZERO, None).regions.is_empty());
        h.finish(1, 2, true);
        let r = h.pick_retire(Duration::ZERO, Some((2, 2)));
        assert_eq!(r.regions, vec![1]);
        assert!(r.needs_flush, "the completed write was never flushed");
        // Retiring: a writer must not enter it.
        assert!(!h.try_enter(1, 1));
        h.cancel_retire(&r.regions);
        let seq = h.write_seq();
        h.flushed(seq);
        let r = h.pick_retire(Duration::ZERO, None);
        assert_eq!(r.regions, vec![1, 2]);
        assert!(!r.needs_flush);
        h.retired(&r.regions);
        assert_eq!(h.len(), 0);
        // A failed write leaves its region unclean until it is reconciled.
        h.added(&[5]);
        assert!(h.try_enter(5, 5));
        h.finish(5, 5, false);
        h.flushed(h.write_seq());
        assert!(h.pick_retire(Duration::ZERO, None).regions.is_empty());
        assert_eq!(h.unclean(), BTreeSet::from([5]));
        // Reconciled: it still needs a flush (of the copies) before it retires.
        h.reconciled(5);
        assert!(h.unclean().is_empty());
        let r = h.pick_retire(Duration::ZERO, None);
        assert_eq!(r.regions, vec![5]);
        assert!(r.needs_flush);
    }
}
