//! The sending side of one wire connection, shared by every task that sends on it.
//!
//! [`Outbox::send`] is synchronous: it queues the frame and, when no other sender is
//! writing, writes everything queued with one `writev` (header and payload as separate
//! iovecs, the payload straight from the caller's `Bytes`) on the caller's own thread.
//! There is no writer task to wake on the normal path. When the socket cannot take it all
//! (its send buffer is full), the rest waits in the queue and the connection's [`Outbox::run`]
//! task finishes it once the socket is writable again; senders that arrive meanwhile only
//! queue, and their frames go out in the same batches.
//!
//! Invariants:
//! * **Frames go out whole and in queue order.** One sender at a time writes (the `busy`
//!   flag, taken and released under the queue lock), and a frame written in part stays at
//!   the head of the queue with its progress until the rest is written.
//! * **A send cannot be cancelled half-way**: it never awaits, so dropping the caller's
//!   future after `send` returned leaves the frame queued or written, never torn.
//! * **A failed socket fails the outbox for good**: every later `send` returns
//!   [`Closed`], and the owner learns of it through [`Outbox::closed`].

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{watch, Notify};

use super::frame::{self, Frame, HEADER_LEN};

/// Frames per `writev`: two iovecs each, well under `IOV_MAX` (1024).
pub const MAX_BATCH_FRAMES: usize = 64;

/// The outbox's socket failed or was closed; nothing more is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// One queued frame: its encoded header, its payload, and how much of both is written.
struct Queued {
    header: [u8; HEADER_LEN],
    payload: Bytes,
    written: usize,
}

impl Queued {
    fn len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// The unwritten parts, as at most two iovecs.
    fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        if self.written < HEADER_LEN {
            out.push(IoSlice::new(&self.header[self.written..]));
            if !self.payload.is_empty() {
                out.push(IoSlice::new(&self.payload));
            }
        } else if self.written < self.len() {
            out.push(IoSlice::new(&self.payload[self.written - HEADER_LEN..]));
        }
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// A sender (or the run task) is writing; others only queue.
    busy: bool,
    /// The socket would block: the run task owns the writing until the queue is empty.
    parked: bool,
    closed: bool,
}

/// The write half of one connection, with its queue. See the module doc.
pub struct Outbox<W = OwnedWriteHalf> {
    sock: W,
    state: Mutex<State>,
    /// Wakes the run task when a write would block.
    wake: Notify,
    /// Wakes [`Outbox::flushed`] when the queue runs empty.
    idle: Notify,
    closed: watch::Sender<bool>,
}

/// What an outbox needs from its socket: non-blocking vectored writes and readiness.
pub trait WriteSocket: Send + Sync + 'static {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
    fn writable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    /// Shuts the socket's write side (and tells the peer), so a reader on the other end
    /// sees the end of the stream.
    fn shutdown(&self);
}

impl WriteSocket for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        OwnedWriteHalf::try_write_vectored(self, bufs)
    }

    async fn writable(&self) -> std::io::Result<()> {
        OwnedWriteHalf::writable(self).await
    }

    fn shutdown(&self) {
        let stream: &tokio::net::TcpStream = self.as_ref();
        // SAFETY: shutdown(2) on a socket this half keeps open; the fd stays valid.
        unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// What one attempt to write the queue ended in.
enum Drained {
    /// Everything queued is written; `busy` is released.
    Empty,
    /// The socket's buffer is full; `busy` is kept, `parked` set.
    WouldBlock,
    /// The socket failed; the outbox is closed.
    Failed,
}

impl<W: WriteSocket> Outbox<W> {
    pub fn new(sock: W) -> Outbox<W> {
        Outbox {
            sock,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            idle: Notify::new(),
            closed: watch::Sender::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the queue and flags consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `f` and writes what the socket takes now (see the module doc). `Err` only
    /// if the outbox is closed; then `f` is not sent.
    pub fn send(&self, f: &Frame) -> Result<(), Closed> {
        self.push(f)?;
        self.flush()
    }

    /// Queues `f` without writing it (corking): a later [`Outbox::flush`] or
    /// [`Outbox::send`], by anyone, writes it with whatever else is queued.
    pub fn push(&self, f: &Frame) -> Result<(), Closed> {
        let q = Queued {
            header: frame::encode_header(f),
            payload: f.payload.clone(),
            written: 0,
        };
        let mut st = self.state();
        if st.closed {
            return Err(Closed);
        }
        st.queue.push_back(q);
        Ok(())
    }

    /// Writes what is queued, unless another sender (or the run task) is writing already,
    /// which then writes it.
    pub fn flush(&self) -> Result<(), Closed> {
        {
            let mut st = self.state();
            if st.closed {
                return Err(Closed);
            }
            if st.busy || st.queue.is_empty() {
                return Ok(());
            }
            st.busy = true;
        }
        match self.drain() {
            Drained::Failed => Err(Closed),
            Drained::Empty | Drained::WouldBlock => Ok(()),
        }
    }

    /// Queues `f`, lets the other tasks that are ready to run queue theirs (one yield),
    /// then writes them all in one batch. For a connection with other calls in flight,
    /// where a frame is rarely alone. Dropping this future after the yield began still
    /// writes what is queued.
    pub async fn send_corked(&self, f: &Frame) -> Result<(), Closed> {
        self.push(f)?;
        struct FlushOnDrop<'a, W: WriteSocket>(&'a Outbox<W>);
        impl<W: WriteSocket> Drop for FlushOnDrop<'_, W> {
            fn drop(&mut self) {
                let _ = self.0.flush();
            }
        }
        let guard = FlushOnDrop(self);
        tokio::task::yield_now().await;
        drop(guard);
        if self.is_closed() {
            return Err(Closed);
        }
        Ok(())
    }

    /// Writes the queue until it is empty or the socket would block. The caller holds
    /// `busy`.
    fn drain(&self) -> Drained {
        loop {
            // Take a batch out so senders can queue while it is written.
            let mut batch: Vec<Queued> = {
                let mut st = self.state();
                if st.closed {
                    return Drained::Failed;
                }
                if st.queue.is_empty() {
                    st.busy = false;
                    st.parked = false;
                    drop(st);
                    self.idle.notify_waiters();
                    return Drained::Empty;
                }
                let n = st.queue.len().min(MAX_BATCH_FRAMES);
                st.queue.drain(..n).collect()
            };
            let outcome = self.write_batch(&mut batch);
            let mut st = self.state();
            // What is left of the batch goes back to the head, in order.
            for q in batch.into_iter().rev() {
                st.queue.push_front(q);
            }
            match outcome {
                Ok(true) => continue,
                Ok(false) => {
                    st.parked = true;
                    drop(st);
                    self.wake.notify_one();
                    return Drained::WouldBlock;
                }
                Err(e) => {
                    drop(st);
                    tracing::debug!(error = %e, "wire outbox: write failed");
                    self.close();
                    return Drained::Failed;
                }
            }
        }
    }

    /// Writes `batch` with as few `writev`s as the socket allows, removing what is written
    /// from its front. `Ok(true)`: all written; `Ok(false)`: the socket would block.
    fn write_batch(&self, batch: &mut Vec<Queued>) -> std::io::Result<bool> {
        let mut done = 0; // whole frames written, from the front
        let result = loop {
            if done == batch.len() {
                break Ok(true);
            }
            let mut slices = Vec::with_capacity(2 * (batch.len() - done));
            for q in &batch[done..] {
                q.slices(&mut slices);
            }
            match self.sock.try_write_vectored(&slices) {
                Ok(0) => break Err(ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    while n > 0 {
                        let q = &mut batch[done];
                        let take = (q.len() - q.written).min(n);
                        q.written += take;
                        n -= take;
                        if q.written == q.len() {
                            done += 1;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        batch.drain(..done);
        result
    }

    /// The connection's writer of last resort: finishes what a sender could not write at
    /// once, whenever the socket is writable again. Returns when the outbox closes.
    pub async fn run(&self) {
        let mut closed = self.closed.subscribe();
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            loop {
                if !self.state().parked {
                    break;
                }
                let ready = tokio::select! {
                    r = self.sock.writable() => r,
                    _ = closed.wait_for(|c| *c) => return,
                };
                if let Err(e) = ready {
                    tracing::debug!(error = %e, "wire outbox: socket failed");
                    self.close();
                    return;
                }
                match self.drain() {
                    Drained::Empty => break,
                    // `drain` notified us again; a spurious wake-up at worst.
                    Drained::WouldBlock => continue,
                    Drained::Failed => return,
                }
            }
        }
    }

    /// Closes the outbox: queued frames are dropped, later sends fail, and the socket is
    /// shut down so the peer sees the connection end.
    pub fn close(&self) {
        {
            let mut st = self.state();
            if st.closed {
                return;
            }
            st.closed = true;
            st.queue.clear();
        }
        self.sock.shutdown();
        self.closed.send_replace(true);
    }

    /// Whether the outbox is closed (the socket failed or [`Outbox::close`] was called).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once the outbox is closed.
    pub async fn closed(&self) {
        let _ = self.closed.subscribe().wait_for(|c| *c).await;
    }

    /// Waits until everything queued is written (or the outbox closed); for an orderly
    /// end of a connection.
    pub async fn flushed(&self) {
        let mut closed = self.closed.subscribe();
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            // Corked frames nobody else will write.
            let _ = self.flush();
            {
                let st = self.state();
                if st.closed || (!st.busy && st.queue.is_empty()) {
                    return;
                }
            }
            tokio::select! {
                _ = idle => {}
                _ = closed.wait_for(|c| *c) => return,
            }
        }
    }

    /// Frames queued and not fully written.
    pub fn queued(&self) -> usize {
        self.state().queue.len()
    }
}

#[cfg(test)]
mod tests {
    //! The batching edge cases, on a socket that takes a few bytes at a time, blocks, or
    //! fails when told to.
    use super::*;
    use crate::wire::frame::{decode, Kind};
    use bytes::BytesMut;
    use std::sync::Arc;
    use std::time::Duration;

    #[derive(Default)]
    struct FakeState {
        out: Vec<u8>,
        /// Bytes one `writev` takes at most.
        per_call: usize,
        /// Bytes taken before every later call would block (`None`: never blocks).
        room: Option<usize>,
        /// Fail every call once this many bytes are taken.
        fail_after: Option<usize>,
        calls: usize,
        shut: bool,
    }

    #[derive(Default, Clone)]
    struct FakeSocket {
        st: Arc<Mutex<FakeState>>,
        writable: Arc<Notify>,
    }

    impl FakeSocket {
        fn new(per_call: usize) -> FakeSocket {
            let s = FakeSocket::default();
            s.st.lock().unwrap().per_call = per_call;
            s
        }
        fn set_room(&self, room: Option<usize>) {
            self.st.lock().unwrap().room = room;
            self.writable.notify_one();
        }
        fn frames(&self) -> Vec<Frame> {
            let mut buf = BytesMut::from(&self.st.lock().unwrap().out[..]);
            let mut out = Vec::new();
            while let Some(f) = decode(&mut buf).expect("the stream holds only whole frames") {
                out.push(f);
            }
            assert!(buf.is_empty(), "a torn frame at the end of the stream");
            out
        }
    }

    impl WriteSocket for FakeSocket {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            let mut st = self.st.lock().unwrap();
            st.calls += 1;
            if st.fail_after.is_some_and(|n| st.out.len() >= n) {
                return Err(ErrorKind::ConnectionReset.into());
            }
            let mut limit = st.per_call;
            if let Some(room) = st.room {
                if room == 0 {
                    return Err(ErrorKind::WouldBlock.into());
                }
                limit = limit.min(room);
            }
            if let Some(n) = st.fail_after {
                limit = limit.min(n - st.out.len());
            }
            let mut taken = 0;
            for b in bufs {
                let take = b.len().min(limit - taken);
                st.out.extend_from_slice(&b[..take]);
                taken += take;
                if taken == limit {
                    break;
                }
            }
            if let Some(room) = st.room.as_mut() {
                *room -= taken;
            }
            Ok(taken)
        }

        async fn writable(&self) -> std::io::Result<()> {
            loop {
                if self.st.lock().unwrap().room != Some(0) {
                    return Ok(());
                }
                self.writable.notified().await;
            }
        }

        fn shutdown(&self) {
            self.st.lock().unwrap().shut = true;
        }
    }

    /// An outbox on `sock` and its run task, as a connection has them.
    fn with_run_task(sock: &FakeSocket) -> (Arc<Outbox<FakeSocket>>, tokio::task::JoinHandle<()>) {
        let outbox = Arc::new(Outbox::new(sock.clone()));
        let o = outbox.clone();
        (outbox, tokio::spawn(async move { o.run().await }))
    }

    fn req(i: u64, len: usize) -> Frame {
        Frame::request(Kind::Write, 1, 1, i, len as u32, vec![i as u8; len].into())
    }

    fn check(frames: &[Frame], n: u64, len: usize) {
        assert_eq!(frames.len() as u64, n);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.offset, i as u64, "frames out of order");
            assert_eq!(&f.payload[..], &vec![i as u8; len][..], "frame {i} payload");
        }
    }

    #[tokio::test]
    async fn partial_writes_still_send_whole_frames_in_order() {
        // 7 bytes per writev: every header and payload is split, many times.
        let sock = FakeSocket::new(7);
        let outbox = Outbox::new(sock.clone());
        for i in 0..20 {
            outbox.send(&req(i, 100)).unwrap();
        }
        assert_eq!(outbox.queued(), 0);
        check(&sock.frames(), 20, 100);
    }

    #[tokio::test]
    async fn a_full_socket_parks_the_batch_and_the_run_task_finishes_it() {
        let sock = FakeSocket::new(1 << 20);
        let (outbox, run) = with_run_task(&sock);
        // Room for one frame and a half: the second is torn at the socket, the rest queue.
        sock.set_room(Some(HEADER_LEN + 4096 + HEADER_LEN + 100));
        for i in 0..10 {
            outbox.send(&req(i, 4096)).unwrap();
        }
        assert_eq!(outbox.queued(), 9, "the torn frame and 8 more wait");
        let calls = sock.st.lock().unwrap().calls;
        // More senders only queue while the run task owns the socket.
        outbox.send(&req(10, 4096)).unwrap();
        assert_eq!(
            sock.st.lock().unwrap().calls,
            calls,
            "a sender wrote past a parked batch"
        );
        sock.set_room(None);
        tokio::time::timeout(Duration::from_secs(5), outbox.flushed())
            .await
            .expect("the run task never finished the batch");
        check(&sock.frames(), 11, 4096);
        // Back to the fast path: a send writes at once again.
        outbox.send(&req(11, 4096)).unwrap();
        assert_eq!(outbox.queued(), 0);
        check(&sock.frames(), 12, 4096);
        outbox.close();
        run.await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_that_dies_mid_batch_fails_every_later_send() {
        let sock = FakeSocket::new(1000);
        sock.st.lock().unwrap().fail_after = Some(2 * (HEADER_LEN + 500) + 10);
        let outbox = Outbox::new(sock.clone());
        outbox.send(&req(0, 500)).unwrap();
        outbox.send(&req(1, 500)).unwrap();
        // The third frame is torn by the failure: the outbox closes and says so.
        assert_eq!(outbox.send(&req(2, 500)), Err(Closed));
        assert!(outbox.is_closed());
        assert!(sock.st.lock().unwrap().shut, "the socket was not shut down");
        assert_eq!(outbox.send(&req(3, 500)), Err(Closed));
        assert_eq!(outbox.queued(), 0);
        // What did go out is whole; the torn tail is what the peer sees as a lost
        // connection.
        let out = sock.st.lock().unwrap().out.clone();
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(decode(&mut buf).unwrap().unwrap().offset, 0);
        assert_eq!(decode(&mut buf).unwrap().unwrap().offset, 1);
        assert!(decode(&mut buf).unwrap().is_none());
        tokio::time::timeout(Duration::from_secs(1), outbox.closed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_socket_that_fails_while_parked_closes_the_outbox() {
        let sock = FakeSocket::new(1 << 20);
        let (outbox, run) = with_run_task(&sock);
        sock.set_room(Some(10));
        outbox.send(&req(0, 4096)).unwrap();
        outbox.send(&req(1, 4096)).unwrap();
        sock.st.lock().unwrap().fail_after = Some(10);
        sock.set_room(None);
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("the run task did not end on a failed socket")
            .unwrap();
        assert!(outbox.is_closed());
        assert_eq!(outbox.send(&req(2, 1)), Err(Closed));
    }
}
