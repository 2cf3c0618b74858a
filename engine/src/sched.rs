//! I/O priority classes: weighted shares of a node's capacity and concurrency.
//!
//! Every volume has a class (`--io-priority`: high, medium or low). While volumes of
//! several classes are busy on a node, the lower classes get their weighted share, so a
//! `high` volume keeps its latency while a `low` one is saturated:
//!
//! * A class is **busy** while it has I/O in flight or waiting, and for
//!   [`ACTIVE_WINDOW`] after its last completion (a QD1 volume has gaps of a few
//!   microseconds between its requests; it is still busy).
//! * A class busy alone is never limited: one volume, or any number of volumes of one
//!   class, run exactly as without classes (no pacing, no queue, no hand-off).
//! * **Pace.** While a higher class is busy, class *c* is held to
//!   `capacity × weight(c) / Σ weight(busy)` I/Os per second ([`WEIGHTS`]: 16, 4, 1),
//!   by GCRA with a [`PACE_BURST`] tolerance. The highest busy class is never paced: what
//!   the others leave unused is the headroom that keeps its latency. `capacity` is the
//!   most I/Os a [`CAPACITY_WINDOW`] completed while no class was held back (never below
//!   [`DEFAULT_CAPACITY_IOPS`]), or `--io-capacity-iops`.
//! * **Concurrency.** Class *c* may also have at most
//!   `max(1, slots × weight(c) / Σ weight(busy))` I/Os in progress (`--io-slots`); the
//!   others wait, in arrival order within their class, and each completion hands its
//!   slot to that class's oldest waiter.
//!
//! Why a pace, and not a queue served in weighted fair order: on this data path the store
//! write runs inline in the request's task (the page cache, microseconds), so requests do
//! not queue in front of a device; a `high` request waits for the CPU, behind the other
//! volumes' requests and their clients. Work-conserving fairness never helps it: a QD1
//! volume is never backlogged. Concurrency shares alone did not help either (measured:
//! the `high` p99 stayed 5.8 times its p99 alone, because a low volume with 3 requests
//! in progress still ran 75 000 IOPS and filled both cores). Holding the lower classes
//! to a share of the capacity leaves idle CPU for the `high` requests (measured: 1.06
//! times, docs/BENCHMARKS.md). This is mClock's weight with a limit derived from it
//! (Ceph's OSD scheduler measures its capacity too), or the Linux blk-iolatency idea of
//! throttling peers to protect a latency-sensitive group.
//!
//! [`FairShare`] is the policy (pure: a test drives it with its own clock);
//! [`IoScheduler`] is the async gate around it. A node has two: one at the frontend
//! (a volume's I/O from the NBD request to its reply, replicated round trips included)
//! and one on the replica-server side (frames from other nodes' coordinators). They are
//! separate so that a frontend I/O holding a slot never waits for a slot of the same
//! gate (no cycle, whatever the fan-out).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::meta::IoPriority;

/// Number of classes.
pub const CLASSES: usize = 3;
/// Weight of each class, by [`class_index`]: low, medium, high.
pub const WEIGHTS: [u64; CLASSES] = [1, 4, 16];
/// Default `--io-slots`: the concurrency shared out when classes compete.
pub const DEFAULT_SLOTS: usize = 32;
/// Length of a window of the capacity measurement.
pub const CAPACITY_WINDOW: Duration = Duration::from_millis(100);
/// The node's capacity assumed until a window measures more (I/Os per second).
pub const DEFAULT_CAPACITY_IOPS: f64 = 20_000.0;
/// How far a paced class may run ahead of its rate.
pub const PACE_BURST: Duration = Duration::from_millis(2);
/// The longest a paced I/O waits. Beyond it, a backlog runs at the rate it drains rather
/// than at the class's share: a replica-side frame must never wait towards its
/// coordinator's replica timeout (an ejection), whatever the number of senders.
pub const MAX_PACE_DELAY: Duration = Duration::from_millis(100);
/// How long a class stays active after its last completion.
pub const ACTIVE_WINDOW: Duration = Duration::from_millis(20);
/// Class names, by [`class_index`] (metric labels).
pub const CLASS_NAMES: [&str; CLASSES] = ["low", "medium", "high"];

/// The index of a class in [`WEIGHTS`] and [`CLASS_NAMES`].
pub fn class_index(p: IoPriority) -> usize {
    match p {
        IoPriority::Low => 0,
        IoPriority::Medium => 1,
        IoPriority::High => 2,
    }
}

/// The class of an index (the inverse of [`class_index`]; out of range is medium).
pub fn class_of(i: usize) -> IoPriority {
    match i {
        0 => IoPriority::Low,
        2 => IoPriority::High,
        _ => IoPriority::Medium,
    }
}

/// What [`FairShare::arrive`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Run,
    Queued,
}

/// The policy: per-class in-flight counts, waiters and activity.
#[derive(Debug)]
pub struct FairShare<W> {
    /// 0: classes off (nothing is ever limited).
    slots: usize,
    in_flight: [usize; CLASSES],
    waiting: [VecDeque<W>; CLASSES],
    last_done: [Option<Instant>; CLASSES],
    /// The node's capacity, I/Os per second: the most a window measured while no class
    /// was held back (never below the start value), or the configured figure.
    capacity_iops: f64,
    /// `--io-capacity-iops` was given: no measurement.
    fixed_capacity: bool,
    window_start: Option<Instant>,
    window_ops: u64,
    /// A class was paced or queued in this window: it does not measure the capacity.
    window_held: bool,
    /// Per class, the theoretical arrival time of its next paced I/O (GCRA).
    tat: [Option<Instant>; CLASSES],
}

impl<W> FairShare<W> {
    pub fn new(slots: usize) -> FairShare<W> {
        FairShare {
            slots,
            in_flight: [0; CLASSES],
            waiting: Default::default(),
            last_done: [None; CLASSES],
            capacity_iops: DEFAULT_CAPACITY_IOPS,
            fixed_capacity: false,
            window_start: None,
            window_ops: 0,
            window_held: false,
            tat: [None; CLASSES],
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Changes the concurrency shared out; call [`FairShare::next_grant`] after it.
    pub fn set_slots(&mut self, slots: usize) {
        self.slots = slots;
    }

    /// Sets the capacity (I/Os per second); 0 goes back to measuring it.
    pub fn set_capacity(&mut self, iops: f64) {
        self.fixed_capacity = iops > 0.0;
        self.capacity_iops = if iops > 0.0 {
            iops
        } else {
            DEFAULT_CAPACITY_IOPS
        };
    }

    pub fn capacity_iops(&self) -> f64 {
        self.capacity_iops
    }

    /// The rate class `c` is held to now, I/Os per second: while a higher class is busy,
    /// its weighted share of the capacity, `capacity × weight(c) / Σ weight(busy)`. The
    /// highest busy class is never paced (`None`): what the others leave unused is
    /// headroom that keeps its latency.
    pub fn rate(&self, c: usize, now: Instant) -> Option<f64> {
        if self.slots == 0 || !(c + 1..CLASSES).any(|h| self.active(h, now)) {
            return None;
        }
        let busy: u64 = (0..CLASSES)
            .filter(|&o| o == c || self.active(o, now))
            .map(|o| WEIGHTS[o])
            .sum();
        Some(self.capacity_iops * WEIGHTS[c] as f64 / busy as f64)
    }

    /// When an I/O of class `c` arriving now may start: `None` for now, or the time it
    /// must wait until (its place in its class's pace is reserved).
    pub fn pace(&mut self, c: usize, now: Instant) -> Option<Instant> {
        let Some(rate) = self.rate(c, now) else {
            self.tat[c] = None;
            return None;
        };
        self.window_held = true;
        let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
        let tat = self.tat[c]
            .map_or(now, |t| t.max(now))
            .min(now + MAX_PACE_DELAY + PACE_BURST);
        self.tat[c] = Some(tat + interval);
        let start = tat.checked_sub(PACE_BURST).unwrap_or(tat).max(now);
        (start > now).then_some(start)
    }

    fn active(&self, c: usize, now: Instant) -> bool {
        self.in_flight[c] > 0
            || !self.waiting[c].is_empty()
            || self.last_done[c].is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW)
    }

    /// How many I/Os class `c` may have in flight now (`usize::MAX`: no limit).
    pub fn cap(&self, c: usize, now: Instant) -> usize {
        if self.slots == 0 {
            return usize::MAX;
        }
        let others: u64 = (0..CLASSES)
            .filter(|&o| o != c && self.active(o, now))
            .map(|o| WEIGHTS[o])
            .sum();
        if others == 0 {
            return usize::MAX;
        }
        let share = self.slots as u64 * WEIGHTS[c] / (WEIGHTS[c] + others);
        (share as usize).max(1)
    }

    /// An I/O of class `c` arrives: it runs now (and is counted in flight), or `w` waits
    /// until [`FairShare::next_grant`] hands it out.
    pub fn arrive(&mut self, c: usize, now: Instant, w: impl FnOnce() -> W) -> Arrival {
        if self.waiting[c].is_empty() && self.in_flight[c] < self.cap(c, now) {
            self.in_flight[c] += 1;
            Arrival::Run
        } else {
            self.window_held = true;
            self.waiting[c].push_back(w());
            Arrival::Queued
        }
    }

    /// An I/O of class `c` completed (or a granted waiter gave its slot back).
    pub fn complete(&mut self, c: usize, now: Instant) {
        debug_assert!(
            self.in_flight[c] > 0,
            "a completion without an I/O in flight"
        );
        self.in_flight[c] = self.in_flight[c].saturating_sub(1);
        self.last_done[c] = Some(now);
        let start = *self.window_start.get_or_insert(now);
        self.window_ops += 1;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= CAPACITY_WINDOW {
            if !self.fixed_capacity && !self.window_held {
                let rate = self.window_ops as f64 / elapsed.as_secs_f64();
                self.capacity_iops = self.capacity_iops.max(rate);
            }
            self.window_start = Some(now);
            self.window_ops = 0;
            self.window_held = false;
        }
    }

    /// The next waiter that may run now, counted in flight; the highest class first.
    /// Call until `None` after every [`FairShare::complete`].
    pub fn next_grant(&mut self, now: Instant) -> Option<(usize, W)> {
        for c in (0..CLASSES).rev() {
            if !self.waiting[c].is_empty() && self.in_flight[c] < self.cap(c, now) {
                let w = self.waiting[c].pop_front()?;
                self.in_flight[c] += 1;
                return Some((c, w));
            }
        }
        None
    }

    /// Removes the waiters of class `c` that `gone` says gave up.
    pub fn forget(&mut self, c: usize, gone: impl Fn(&W) -> bool) {
        self.waiting[c].retain(|w| !gone(w));
    }

    pub fn in_flight(&self, c: usize) -> usize {
        self.in_flight[c]
    }

    pub fn waiting(&self, c: usize) -> usize {
        self.waiting[c].len()
    }
}

/// Counters of one class at one gate.
#[derive(Debug, Default)]
pub struct ClassCounters {
    /// I/Os admitted (at once or after waiting).
    pub admitted: AtomicU64,
    /// Of those, I/Os that had to wait for a slot.
    pub waited: AtomicU64,
    /// Of those, I/Os that waited for their class's pace (a higher class was busy).
    pub paced: AtomicU64,
    /// Total time spent waiting (for a slot or the pace), nanoseconds.
    pub wait_ns: AtomicU64,
}

/// A snapshot of [`ClassCounters`] and the gate's state for one class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClassStats {
    pub admitted: u64,
    pub waited: u64,
    pub paced: u64,
    pub wait_ns: u64,
    pub in_flight: u64,
    pub waiting: u64,
}

/// The async gate: [`IoScheduler::admit`] returns a [`Slot`] once the I/O may run.
#[derive(Debug)]
pub struct IoScheduler {
    policy: Mutex<FairShare<oneshot::Sender<()>>>,
    counters: [ClassCounters; CLASSES],
}

impl IoScheduler {
    /// `slots` is shared out when classes compete; 0 turns classes off.
    pub fn new(slots: usize) -> IoScheduler {
        IoScheduler {
            policy: Mutex::new(FairShare::new(slots)),
            counters: Default::default(),
        }
    }

    /// Changes the concurrency shared out when classes compete (0: classes off).
    pub fn set_slots(&self, slots: usize) {
        let mut g = self.policy();
        g.set_slots(slots);
        Self::grant(&mut g, Instant::now());
    }

    pub fn slots(&self) -> usize {
        self.policy().slots()
    }

    /// Hands slots to every waiter that may run now.
    fn grant(g: &mut FairShare<oneshot::Sender<()>>, now: Instant) {
        while let Some((gc, tx)) = g.next_grant(now) {
            if tx.send(()).is_err() {
                // That waiter gave up: its slot goes to the next one.
                g.complete(gc, now);
            }
        }
    }

    /// Sets the node's capacity (`--io-capacity-iops`); 0 measures it.
    pub fn set_capacity(&self, iops: u64) {
        self.policy().set_capacity(iops as f64);
    }

    /// The capacity the pace of lower classes is computed from, I/Os per second.
    pub fn capacity_iops(&self) -> f64 {
        self.policy().capacity_iops()
    }

    fn policy(&self) -> std::sync::MutexGuard<'_, FairShare<oneshot::Sender<()>>> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until an I/O of class `p` may run. Cancel safe: dropped while waiting, it
    /// leaves the queue (or gives back a slot it was handed).
    pub async fn admit(&self, p: IoPriority) -> Slot<'_> {
        let c = class_index(p);
        let counters = &self.counters[c];
        let mut rx = None;
        let mut arrive = |g: &mut FairShare<oneshot::Sender<()>>, now| {
            g.arrive(c, now, || {
                let (tx, r) = oneshot::channel();
                rx = Some(r);
                tx
            })
        };
        // One lock on the normal path: not paced, and under the class's share.
        let first = {
            let mut g = self.policy();
            let now = Instant::now();
            match g.pace(c, now) {
                Some(until) => Err(until),
                None => Ok(arrive(&mut g, now)),
            }
        };
        let mut started = None;
        let arrival = match first {
            Ok(a) => a,
            Err(until) => {
                started = Some(Instant::now());
                counters.paced.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep_until(until).await;
                let mut g = self.policy();
                arrive(&mut g, Instant::now())
            }
        };
        if arrival == Arrival::Run {
            counters.admitted.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = started {
                counters.waited.fetch_add(1, Ordering::Relaxed);
                counters
                    .wait_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            return Slot { sched: self, c };
        }
        let started = started.unwrap_or_else(Instant::now);
        let rx = rx.expect("a queued arrival made its channel");
        let waiter = Waiter {
            sched: self,
            c,
            rx: Some(rx),
        };
        waiter.await;
        counters.admitted.fetch_add(1, Ordering::Relaxed);
        counters.waited.fetch_add(1, Ordering::Relaxed);
        counters
            .wait_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Slot { sched: self, c }
    }

    fn release(&self, c: usize) {
        let mut g = self.policy();
        let now = Instant::now();
        g.complete(c, now);
        Self::grant(&mut g, now);
    }

    /// Per-class counters and state, by [`class_index`].
    pub fn stats(&self) -> [ClassStats; CLASSES] {
        let g = self.policy();
        std::array::from_fn(|c| ClassStats {
            admitted: self.counters[c].admitted.load(Ordering::Relaxed),
            waited: self.counters[c].waited.load(Ordering::Relaxed),
            paced: self.counters[c].paced.load(Ordering::Relaxed),
            wait_ns: self.counters[c].wait_ns.load(Ordering::Relaxed),
            in_flight: g.in_flight(c) as u64,
            waiting: g.waiting(c) as u64,
        })
    }
}

/// A running I/O's place at the gate; dropping it hands the slot on.
#[must_use = "the slot is given back when dropped"]
#[derive(Debug)]
pub struct Slot<'a> {
    sched: &'a IoScheduler,
    c: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.sched.release(self.c);
    }
}

/// A queued I/O; resolves when it is handed a slot.
struct Waiter<'a> {
    sched: &'a IoScheduler,
    c: usize,
    rx: Option<oneshot::Receiver<()>>,
}

impl std::future::Future for Waiter<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let rx = self.rx.as_mut().expect("polled after completion");
        match std::pin::Pin::new(rx).poll(cx) {
            std::task::Poll::Ready(r) => {
                // The sender lives in the scheduler, which outlives every borrow of it.
                debug_assert!(r.is_ok(), "a waiter's sender dropped unsent");
                self.rx = None;
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            // Dropped while queued. If the slot was handed over meanwhile, give it back;
            // otherwise leave the queue.
            rx.close();
            if rx.try_recv().is_ok() {
                self.sched.release(self.c);
            } else {
                self.sched.policy().forget(self.c, |tx| tx.is_closed());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    const LOW: usize = 0;
    const MED: usize = 1;
    const HIGH: usize = 2;

    #[test]
    fn a_lone_class_is_never_limited() {
        let now = Instant::now();
        let mut f = FairShare::new(4);
        for i in 0..100 {
            assert_eq!(
                f.arrive(LOW, now, || i),
                Arrival::Run,
                "I/O {i} of the only class"
            );
        }
        assert_eq!(f.in_flight(LOW), 100);
        assert_eq!(f.cap(LOW, now), usize::MAX);
    }

    #[test]
    fn competing_classes_get_weighted_shares_and_high_is_never_queued_behind_low() {
        let now = Instant::now();
        let mut f = FairShare::new(32);
        // A saturated low volume alone: everything runs.
        for i in 0..32 {
            assert!(f.arrive(LOW, now, || i) == Arrival::Run);
        }
        // A high I/O arrives: it runs at once, although low has 32 in flight.
        assert!(f.arrive(HIGH, now, || 100) == Arrival::Run);
        assert_eq!(f.cap(HIGH, now), 32 * 16 / 17);
        let low_cap = f.cap(LOW, now);
        assert_eq!(low_cap, 1, "32 / 17, and never below 1");
        // New low I/O waits until low is under its share.
        assert!(f.arrive(LOW, now, || 32) == Arrival::Queued);
        for _ in 0..32 - low_cap {
            f.complete(LOW, now);
            assert_eq!(f.next_grant(now), None, "low is still over its share");
        }
        assert_eq!(f.in_flight(LOW), low_cap);
        f.complete(LOW, now);
        assert_eq!(f.next_grant(now), Some((LOW, 32)), "the oldest low waiter");
        assert_eq!(f.next_grant(now), None);
    }

    #[test]
    fn waiters_run_in_arrival_order_within_a_class() {
        let now = Instant::now();
        let mut f = FairShare::new(8);
        assert!(f.arrive(HIGH, now, || 0) == Arrival::Run);
        assert!(f.arrive(LOW, now, || 0) == Arrival::Run); // low's share of 8 with high active: 1
        for i in 1..=5 {
            assert!(f.arrive(LOW, now, || i) == Arrival::Queued);
        }
        for i in 1..=5 {
            f.complete(LOW, now);
            assert_eq!(f.next_grant(now), Some((LOW, i)));
        }
    }

    #[test]
    fn a_class_stays_active_for_the_window_after_its_last_io() {
        let t0 = Instant::now();
        let mut f = FairShare::new(32);
        assert!(f.arrive(HIGH, t0, || 0) == Arrival::Run);
        f.complete(HIGH, t0);
        // Between two QD1 requests the high volume still counts.
        let soon = t0 + ACTIVE_WINDOW / 2;
        assert_eq!(f.cap(LOW, soon), 1);
        assert!(f.arrive(LOW, soon, || 0) == Arrival::Run);
        assert!(f.arrive(LOW, soon, || 1) == Arrival::Queued);
        // Once the window has passed, low is alone again and its waiter runs at the next
        // completion.
        let later = t0 + ACTIVE_WINDOW * 2;
        assert_eq!(f.cap(LOW, later), usize::MAX);
        f.complete(LOW, later);
        assert_eq!(f.next_grant(later), Some((LOW, 1)));
    }

    #[test]
    fn medium_and_low_share_by_weight_and_zero_slots_turns_classes_off() {
        let now = Instant::now();
        let mut f: FairShare<u32> = FairShare::new(32);
        assert!(f.arrive(MED, now, || 0) == Arrival::Run);
        assert!(f.arrive(LOW, now, || 0) == Arrival::Run);
        assert_eq!(f.cap(MED, now), 32 * 4 / 5);
        assert_eq!(f.cap(LOW, now), 32 / 5);
        assert!(f.arrive(HIGH, now, || 0) == Arrival::Run);
        assert_eq!(f.cap(LOW, now), 1);
        assert_eq!(f.cap(MED, now), 32 * 4 / 21);
        assert_eq!(f.cap(HIGH, now), 32 * 16 / 21);

        let mut off: FairShare<u32> = FairShare::new(0);
        assert!(off.arrive(HIGH, now, || 0) == Arrival::Run);
        for i in 0..64 {
            assert!(off.arrive(LOW, now, || i) == Arrival::Run);
        }
    }

    #[test]
    fn every_waiter_is_eventually_granted_and_in_flight_never_exceeds_the_cap_at_admission() {
        // A seeded random schedule of arrivals and completions across classes and time.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut f = FairShare::new(16);
        let mut running: Vec<usize> = Vec::new();
        let mut queued = 0usize;
        let mut granted = 0usize;
        for _ in 0..20_000 {
            now += Duration::from_micros(next() % 3000);
            if next() % 2 == 0 || running.is_empty() {
                let c = (next() % 3) as usize;
                let cap = f.cap(c, now);
                match f.arrive(c, now, || ()) {
                    Arrival::Run => {
                        assert!(f.in_flight(c) <= cap, "admitted over the cap");
                        running.push(c);
                    }
                    Arrival::Queued => queued += 1,
                }
            } else {
                let i = (next() as usize) % running.len();
                let c = running.swap_remove(i);
                f.complete(c, now);
                while let Some((gc, ())) = f.next_grant(now) {
                    granted += 1;
                    running.push(gc);
                }
            }
            for c in 0..CLASSES {
                // A class with waiters always has an I/O in flight, whose completion
                // grants the next: nothing waits forever.
                assert!(f.waiting(c) == 0 || f.in_flight(c) > 0, "stranded waiters");
            }
        }
        // Drain.
        while let Some(c) = running.pop() {
            now += Duration::from_micros(10);
            f.complete(c, now);
            while let Some((gc, ())) = f.next_grant(now) {
                granted += 1;
                running.push(gc);
            }
        }
        assert!(queued > 100, "the schedule exercised waiting ({queued})");
        assert_eq!(granted, queued, "every waiter ran");
    }

    #[test]
    fn a_lower_class_is_paced_to_its_share_of_the_capacity_while_a_higher_one_is_busy() {
        let now = Instant::now();
        let mut f: FairShare<u32> = FairShare::new(32);
        f.set_capacity(17_000.0);
        // Alone, nobody is paced.
        assert_eq!(f.rate(LOW, now), None);
        assert_eq!(f.pace(LOW, now), None);
        assert!(f.arrive(HIGH, now, || 0) == Arrival::Run);
        // The highest busy class never is; low gets 1 / (1 + 16) of 17 000 per second.
        assert_eq!(f.rate(HIGH, now), None);
        assert_eq!(f.rate(LOW, now), Some(1_000.0));
        // A burst of PACE_BURST's worth runs at once, then one every millisecond.
        let burst = (PACE_BURST.as_micros() / 1000) as usize + 1;
        for i in 0..burst {
            assert_eq!(f.pace(LOW, now), None, "I/O {i} of the burst");
        }
        let mut last = now;
        for _ in 0..10 {
            let at = f.pace(LOW, now).expect("paced");
            assert!(at > last);
            last = at;
        }
        assert_eq!(
            last,
            now + Duration::from_millis(1) * (burst as u32 + 9) - PACE_BURST
        );
        // However many arrive at once, none waits longer than MAX_PACE_DELAY.
        for _ in 0..10_000 {
            if let Some(at) = f.pace(LOW, now) {
                assert!(at <= now + MAX_PACE_DELAY);
            }
        }
        // Medium next to high: 4 / 20 of the capacity.
        assert_eq!(f.rate(MED, now), Some(17_000.0 * 4.0 / 20.0));
    }

    #[test]
    fn the_capacity_is_what_a_window_without_pacing_measured() {
        let t0 = Instant::now();
        let mut f: FairShare<u32> = FairShare::new(32);
        assert_eq!(f.capacity_iops(), DEFAULT_CAPACITY_IOPS);
        // A lone class completes 5 000 I/Os in a 100 ms window: 50 000 per second.
        let mut now = t0;
        for _ in 0..=5_000 {
            assert!(f.arrive(LOW, now, || 0) == Arrival::Run);
            f.complete(LOW, now);
            now += Duration::from_micros(20);
        }
        let measured = f.capacity_iops();
        assert!((49_000.0..=51_000.0).contains(&measured), "{measured}");
        // A window in which low was paced measures nothing, even if it ran faster.
        assert!(f.arrive(HIGH, now, || 0) == Arrival::Run);
        for _ in 0..20_000 {
            let _ = f.pace(LOW, now);
            assert!(f.arrive(LOW, now, || 0) == Arrival::Run);
            f.complete(LOW, now);
            now += Duration::from_micros(5);
        }
        assert_eq!(f.capacity_iops(), measured);
        // A configured capacity is kept.
        f.set_capacity(1_000.0);
        assert_eq!(f.capacity_iops(), 1_000.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_paces_a_low_class_next_to_a_busy_high_one() {
        let s = IoScheduler::new(32);
        s.set_capacity(17_000);
        let high = s.admit(IoPriority::High).await;
        let t0 = Instant::now();
        // Low's share: 1 000 per second. 100 I/Os take about 0.1 s.
        for _ in 0..100 {
            drop(s.admit(IoPriority::Low).await);
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(90) && took <= Duration::from_millis(110),
            "{took:?}"
        );
        assert!(s.stats()[0].paced > 80);
        drop(high);
        // Once high has been idle for the window, low runs unpaced.
        tokio::time::sleep(ACTIVE_WINDOW * 2).await;
        let t1 = Instant::now();
        for _ in 0..100 {
            drop(s.admit(IoPriority::Low).await);
        }
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn the_gate_hands_slots_over_and_a_cancelled_waiter_gives_its_slot_back() {
        let s = std::sync::Arc::new(IoScheduler::new(2));
        let high = s.admit(IoPriority::High).await;
        let low = s.admit(IoPriority::Low).await; // low's share of 2 with high active: 1
                                                  // A second low I/O waits.
        let mut waiting = Box::pin(s.admit(IoPriority::Low));
        assert!((&mut waiting).now_or_never().is_none());
        // A third one waits behind it, then gives up.
        let mut cancelled = Box::pin(s.admit(IoPriority::Low));
        assert!((&mut cancelled).now_or_never().is_none());
        assert_eq!(s.stats()[0].waiting, 2);
        drop(low);
        let low2 = waiting.await;
        drop(cancelled);
        assert_eq!(s.stats()[0].waiting, 0);
        assert_eq!(s.stats()[0].in_flight, 1);
        // A waiter cancelled after it was handed a slot gives it back.
        let mut handed = Box::pin(s.admit(IoPriority::Low));
        assert!((&mut handed).now_or_never().is_none());
        drop(low2); // hands the slot to `handed`, which is never polled again
        drop(handed);
        assert_eq!(s.stats()[0].in_flight, 0, "the handed slot came back");
        drop(high);
        let st = s.stats();
        assert_eq!((st[0].admitted, st[0].waited), (2, 1));
        assert_eq!(st[2].admitted, 1);
    }
}
