//! Exclusive locks on block ranges of a volume, used at two depths:
//!
//! * the replica store: a write holds its blocks while it updates data and checksums, so
//!   overlapping writes never interleave inside a block, and a read that sees a checksum
//!   mismatch re-checks the block under the lock before calling it corruption;
//! * the replication coordinator: a write holds the lock on its blocks across its whole
//!   fan-out (every replica answered or was ejected), so two overlapping writes are never
//!   in flight at the same time and every replica applies them in the same order. Read
//!   repair, resync copies, reconciliation and verify take the same lock, so a copy never
//!   races a write to the blocks it copies.
//!
//! In-flight I/O per volume is bounded by the frontends (and the wire's in-flight limit),
//! so a short list scanned linearly is enough. Not fair: a waiter that loses a race tries
//! again at the next release. [`RangeLock::lock_all`] is the exception: it holds new
//! lockers back while it waits, so a stream of small overlapping writes cannot starve it.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    released: Notify,
    /// `lock_all` calls waiting: new `lock` calls wait behind them.
    draining: std::sync::atomic::AtomicUsize,
}

pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Locks blocks `[start, end)`, waiting for overlapping holders to release.
    pub(crate) async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.lock_inner(start, end, false).await
    }

    /// Locks blocks `[0, end)`: waits for every holder to release while holding new lockers
    /// back, so it gets in even under a steady stream of writes (a moment with no write in
    /// flight, e.g. to change a replica's state).
    pub(crate) async fn lock_all(&self, end: u64) -> RangeGuard<'_> {
        use std::sync::atomic::Ordering::SeqCst;
        self.draining.fetch_add(1, SeqCst);
        let g = self.lock_inner(0, end, true).await;
        self.draining.fetch_sub(1, SeqCst);
        g
    }

    async fn lock_inner(&self, start: u64, end: u64, first: bool) -> RangeGuard<'_> {
        assert!(start < end, "empty range lock [{start}, {end})");
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Register for the wake-up before looking, so a release in between is not missed.
            released.as_mut().enable();
            let held_back = !first && self.draining.load(std::sync::atomic::Ordering::SeqCst) > 0;
            if !held_back {
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                if !held.iter().any(|&(s, e, _)| s < end && start < e) {
                    let id = self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    held.push((start, end, id));
                    return RangeGuard { lock: self, id };
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = held.iter().position(|&(_, _, id)| id == self.id) {
            held.swap_remove(pos);
        }
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ranges_do_not() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(0, 10).await;
        let _h = tokio::time::timeout(Duration::from_millis(100), lock.lock(10, 20))
            .await
            .expect("disjoint range must not wait");
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(5, 6).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "overlapping range must wait");
        drop(g);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter must run after release")
            .unwrap();
    }

    /// A steady stream of overlapping writes (never a moment with none in flight) does
    /// not starve `lock_all`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lock_all_gets_in_under_a_steady_stream_of_writes() {
        let lock = Arc::new(RangeLock::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        // Eight writers on their own blocks, each holding its lock most of the time: there
        // is hardly ever a moment with none of them in flight.
        for w in 0..8u64 {
            let (lock, stop) = (lock.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let _g = lock.lock(w * 8, w * 8 + 1).await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let all = tokio::time::timeout(Duration::from_secs(5), lock.lock_all(64)).await;
        assert!(all.is_ok(), "lock_all starved");
        drop(all);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
    }
}
