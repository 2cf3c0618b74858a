//! Group commit for `fdatasync`: concurrent flushes of one file share one sync.
//!
//! A flush needs a sync that *starts* after it was asked for (then every write that
//! completed before the flush is covered). [`SyncGroup::sync`] numbers each request; one
//! caller at a time runs a sync round, which covers every request numbered up to the
//! count when the round started. A caller that arrives while a round runs waits for it to
//! end, and the next round (run by one of the waiters) covers all of them at once: under
//! N concurrent flushes the file sees about two `fdatasync`s, not N.
//!
//! A failed round fails every request it covers, and only those. A round whose runner is
//! dropped half-way counts as not run: a waiter starts the next one.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// Failed rounds remembered for waiters that wake late. A waiter whose round is older
/// than all of them gets an error: wrongly failing a flush is safe, wrongly passing is not.
const FAILURES_KEPT: usize = 64;

#[derive(Default)]
struct State {
    /// Requests numbered so far.
    requested: u64,
    /// Every request up to this is covered by a finished round.
    completed: u64,
    running: bool,
    /// Failed rounds: requests in `(lo, hi]`, and the error.
    failures: VecDeque<(u64, u64, io::ErrorKind, String)>,
}

/// See the module doc.
#[derive(Default)]
pub struct SyncGroup {
    state: Mutex<State>,
    done: Notify,
}

/// Ends a round however its runner ends: a dropped runner leaves the round unrun.
struct Round<'a> {
    group: &'a SyncGroup,
    finished: bool,
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.group.state().running = false;
            self.group.done.notify_waiters();
        }
    }
}

impl SyncGroup {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once a `run` that started after this call has finished: its result, or
    /// the error of the round that covered this request.
    pub async fn sync<F, Fut>(&self, run: F) -> io::Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        let my = {
            let mut st = self.state();
            st.requested += 1;
            st.requested
        };
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let upto = {
                let mut st = self.state();
                if st.completed >= my {
                    return Self::outcome(&st, my);
                }
                if st.running {
                    None
                } else {
                    st.running = true;
                    Some(st.requested)
                }
            };
            let Some(upto) = upto else {
                notified.await;
                continue;
            };
            let mut round = Round {
                group: self,
                finished: false,
            };
            let res = run().await;
            round.finished = true;
            {
                let mut st = self.state();
                let lo = st.completed;
                if let Err(e) = &res {
                    if st.failures.len() == FAILURES_KEPT {
                        st.failures.pop_front();
                    }
                    st.failures.push_back((lo, upto, e.kind(), e.to_string()));
                }
                st.completed = upto;
                st.running = false;
            }
            self.done.notify_waiters();
            return res;
        }
    }

    fn outcome(st: &State, my: u64) -> io::Result<()> {
        if let Some((_, _, kind, msg)) = st.failures.iter().find(|f| f.0 < my && my <= f.1) {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        match st.failures.front() {
            Some(&(lo, ..)) if st.failures.len() == FAILURES_KEPT && my <= lo => Err(
                io::Error::other("fdatasync failed in a round no longer remembered"),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_flushes_share_rounds() {
        let g = Arc::new(SyncGroup::default());
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (g, calls) = (g.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                g.sync(|| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(())
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let n = calls.load(Ordering::SeqCst);
        assert!(n <= 3, "32 concurrent flushes ran {n} syncs");
    }

    #[tokio::test]
    async fn a_flush_waits_for_a_round_that_started_after_it() {
        let g = Arc::new(SyncGroup::default());
        let started = Arc::new(AtomicU64::new(0));
        let (g1, s1) = (g.clone(), started.clone());
        let first = tokio::spawn(async move {
            g1.sync(|| async {
                s1.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Asked while round 1 runs: round 1 does not cover it, a second round must run.
        let s2 = started.clone();
        g.sync(|| async {
            s2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .await
        .unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_round_fails_exactly_the_flushes_it_covered() {
        let g = Arc::new(SyncGroup::default());
        let fail = Arc::new(AtomicU64::new(1));
        let run = |fail: Arc<AtomicU64>| {
            move || {
                let fail = fail.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if fail.swap(0, Ordering::SeqCst) == 1 {
                        Err(io::Error::other("EIO from the disk"))
                    } else {
                        Ok(())
                    }
                }
            }
        };
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (g, f) = (g.clone(), fail.clone());
            tasks.push(tokio::spawn(async move { g.sync(run(f)).await }));
        }
        let results: Vec<_> = futures_util::future::join_all(tasks).await;
        let failed = results
            .iter()
            .filter(|r| r.as_ref().unwrap().is_err())
            .count();
        // The first flush ran round 1 alone; the three that asked during it share round 2.
        assert_eq!(
            failed, 1,
            "the failed round must fail exactly the flush it covered"
        );
        // Later flushes run a new, good round.
        g.sync(run(fail.clone())).await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_runner_leaves_the_round_to_a_waiter() {
        let g = Arc::new(SyncGroup::default());
        let g1 = g.clone();
        let stuck =
            tokio::spawn(async move { g1.sync(std::future::pending::<io::Result<()>>).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.sync(|| async { Ok(()) }).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        stuck.abort();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter never ran its own round")
            .unwrap()
            .unwrap();
    }
}
