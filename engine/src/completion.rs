//! Running an operation to its end without giving it a task of its own.
//!
//! A replicated write must not stop half-way: once some replicas have it, the coordinator
//! has to settle it (eject the ones that failed, mark its regions), whatever its caller
//! does. Spawning every operation guarantees that, at the price of a task and a cross-thread
//! wake-up per I/O. [`to_completion`] gives the same guarantee by structure: the operation
//! runs inline in the caller's task, and only if the caller drops it before it ends (a
//! timeout, a client that went away) is the rest handed to a task of its own, which runs
//! it to the end. A panic inside the operation is caught and returned as [`Panicked`],
//! as a task's `JoinError` was.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The operation panicked; the message, if it had one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("internal operation panicked: {0}")]
pub struct Panicked(pub String);

/// See [`to_completion`].
pub struct ToCompletion<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    fut: Option<Pin<Box<F>>>,
}

/// Runs `fut` inline; if the returned future is dropped before `fut` ends, the rest of
/// `fut` runs on a task of its own (when a runtime is still there to run it).
pub fn to_completion<F>(fut: F) -> ToCompletion<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    ToCompletion {
        fut: Some(Box::pin(fut)),
    }
}

impl<F> Future for ToCompletion<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let fut = this
            .fut
            .as_mut()
            .expect("ToCompletion polled after it finished");
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => {
                this.fut = None;
                Poll::Ready(Ok(out))
            }
            Err(panic) => {
                // A panicked future must not be polled again, nor run on elsewhere.
                this.fut = None;
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                Poll::Ready(Err(Panicked(msg)))
            }
        }
    }
}

impl<F> Drop for ToCompletion<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            // Without a runtime the process is going down, as a spawned task would.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = fut.await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn runs_inline_and_returns_the_output() {
        let out = to_completion(async { 7 }).await;
        assert_eq!(out.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_dropped_caller_does_not_stop_the_operation() {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let op = to_completion(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            d.store(true, Ordering::SeqCst);
        });
        // The caller gives up long before the operation ends.
        assert!(tokio::time::timeout(Duration::from_millis(5), op)
            .await
            .is_err());
        assert!(!done.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(done.load(Ordering::SeqCst), "the operation was abandoned");
    }

    #[tokio::test]
    async fn a_panic_is_an_error_not_a_crash() {
        let out = to_completion(async {
            if std::hint::black_box(true) {
                panic!("boom");
            }
            1
        })
        .await;
        assert_eq!(out.unwrap_err().0, "boom");
    }
}
