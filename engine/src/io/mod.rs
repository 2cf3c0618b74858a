//! I/O engines: how the store reaches its files.
//!
//! [`IoEngine`] is an enum of two engines with one API of owned buffers (the buffer goes in
//! and comes back, because io_uring must own it while the kernel works on it):
//!
//! * [`IoEngine::Uring`]: one io_uring instance driven by a dedicated thread. Callers hand
//!   operations over a channel and wake the thread through an eventfd that the ring itself
//!   watches, so the thread only ever blocks inside `io_uring_enter`.
//! * [`IoEngine::Std`]: positional `pread`/`pwrite` on the calling thread. The store uses
//!   buffered I/O, so these are page-cache copies of a few microseconds; the only calls that
//!   wait for the device (`fdatasync`) run on tokio's blocking pool.
//!
//! * [`IoEngine::Simulated`]: the deterministic simulation's engine: every call completes
//!   on the calling thread, in program order, and a [`SimDisk`] remembers what is not
//!   durable yet, so the simulation can cut a node's power ([`simdisk`]).
//!
//! Every engine gives full-length semantics: `read_at` fills the whole buffer (zeros past
//! end of file) and `write_at` writes all of it, resubmitting short transfers.
//!
//! The store reaches its files' contents only through the engine: reads, writes,
//! `fdatasync`, punching holes, growing a file and finding its data extents. Opening,
//! creating and removing files, and the suspect marker (written and synced at once), are
//! the only direct calls.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::oneshot;

pub mod simdisk;
pub use simdisk::SimDisk;

/// Submission/completion queue depth of the ring. Deeper queues are pointless here: the
/// frontends bound in-flight requests per connection (see the NBD server).
pub const URING_ENTRIES: u32 = 256;

/// Which engine the operator asked for (`--io-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngineChoice {
    /// io_uring when the kernel allows it, else std.
    Auto,
    Uring,
    Std,
}

impl FromStr for IoEngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Self::Uring),
            "std" => Ok(Self::Std),
            other => Err(format!(
                "unknown I/O engine '{other}': expected uring, std or auto"
            )),
        }
    }
}

/// The I/O engine. Cheap to clone; clones share the ring.
#[derive(Clone)]
pub enum IoEngine {
    Std,
    Uring(Arc<UringEngine>),
    /// Like [`IoEngine::Std`], but `fdatasync` runs on the calling thread too: every call
    /// completes in program order, with no thread of its own, and the [`SimDisk`] keeps
    /// what each file held before every write that is not durable yet. The deterministic
    /// simulation runs on one thread with this engine (over a tmpfs, where `fdatasync` is
    /// cheap); it is not for a daemon, where a slow device would stall the runtime.
    Simulated(Arc<SimDisk>),
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of an owned-buffer operation: the outcome and the buffer back.
pub type BufResult = (io::Result<()>, Vec<u8>);

impl IoEngine {
    /// Builds the engine the operator chose. `Auto` probes io_uring and falls back to std.
    pub fn new(choice: IoEngineChoice) -> io::Result<IoEngine> {
        match choice {
            IoEngineChoice::Std => Ok(IoEngine::Std),
            IoEngineChoice::Uring => Ok(IoEngine::Uring(Arc::new(UringEngine::start()?))),
            IoEngineChoice::Auto => match UringEngine::start() {
                Ok(engine) => Ok(IoEngine::Uring(Arc::new(engine))),
                Err(err) => {
                    tracing::warn!(%err, "io_uring is not available; using the std engine");
                    Ok(IoEngine::Std)
                }
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            IoEngine::Std => "std",
            IoEngine::Uring(_) => "uring",
            IoEngine::Simulated(_) => "simulated",
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Bytes past end of file read as zeros.
    pub async fn read_at(&self, file: &Arc<File>, mut buf: Vec<u8>, offset: u64) -> BufResult {
        match self {
            IoEngine::Std => {
                let res = std_read_full(file, &mut buf, offset);
                (res, buf)
            }
            IoEngine::Simulated(disk) => {
                let res = disk
                    .check(file)
                    .and_then(|()| std_read_full(file, &mut buf, offset));
                (res, buf)
            }
            IoEngine::Uring(ring) => ring.transfer(OpKind::Read, file, buf, offset).await,
        }
    }

    /// Writes all of `buf` at `offset`.
    pub async fn write_at(&self, file: &Arc<File>, buf: Vec<u8>, offset: u64) -> BufResult {
        match self {
            IoEngine::Std => {
                let res = file.write_all_at(&buf, offset);
                (res, buf)
            }
            IoEngine::Simulated(disk) => {
                let res = disk
                    .before_change(file, offset, buf.len() as u64)
                    .and_then(|()| file.write_all_at(&buf, offset));
                (res, buf)
            }
            IoEngine::Uring(ring) => ring.transfer(OpKind::Write, file, buf, offset).await,
        }
    }

    /// Writes all of `data` at `offset`, from a possibly shared buffer: the std and the
    /// simulated engines write it in place; io_uring, which must own its buffer, takes it
    /// without a copy when nobody else holds it, and copies it otherwise.
    pub async fn write_bytes_at(
        &self,
        file: &Arc<File>,
        data: bytes::Bytes,
        offset: u64,
    ) -> io::Result<()> {
        match self {
            IoEngine::Std => file.write_all_at(&data, offset),
            IoEngine::Simulated(disk) => disk
                .before_change(file, offset, data.len() as u64)
                .and_then(|()| file.write_all_at(&data, offset)),
            IoEngine::Uring(_) => self.write_at(file, Vec::from(data), offset).await.0,
        }
    }

    /// `fdatasync(2)`: every completed write to `file` is durable when this returns.
    pub async fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        match self {
            IoEngine::Std => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || file.sync_data())
                    .await
                    .map_err(|e| io::Error::other(format!("fdatasync task failed: {e}")))?
            }
            IoEngine::Simulated(disk) => disk.fdatasync(file),
            IoEngine::Uring(ring) => ring
                .submit(OpKind::Fdatasync, file.clone(), Vec::new(), 0, 0)
                .await
                .0
                .map(|_| ()),
        }
    }
}

impl IoEngine {
    /// Deallocates `[offset, offset + len)` (`fallocate` with `PUNCH_HOLE | KEEP_SIZE`): it
    /// reads as zeros and takes no space. Not durable before the next `fdatasync`.
    pub fn punch_hole(&self, file: &Arc<File>, offset: u64, len: u64) -> io::Result<()> {
        if let IoEngine::Simulated(disk) = self {
            disk.before_change(file, offset, len)?;
        }
        punch_hole(file, offset, len)
    }

    /// Grows `file` to `len` bytes (the new bytes read as zeros).
    pub fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        if let IoEngine::Simulated(disk) = self {
            disk.check(file)?;
        }
        file.set_len(len)
    }

    /// The data extents of the sparse `file` below `len`, as (start, end) byte ranges
    /// (`SEEK_DATA`/`SEEK_HOLE`).
    pub fn data_extents(&self, file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
        if let IoEngine::Simulated(disk) = self {
            disk.check(file)?;
        }
        data_extents(file, len)
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a file we hold open, with in-range arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a file we hold open.
        let start = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if start < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        out.push((start as u64, (end as u64).min(len)));
        pos = end;
    }
    Ok(out)
}

fn std_read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut pos = 0;
    while pos < buf.len() {
        match file.read_at(&mut buf[pos..], offset + pos as u64) {
            Ok(0) => {
                buf[pos..].fill(0);
                return Ok(());
            }
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum OpKind {
    Read,
    Write,
    Fdatasync,
}

/// One operation owned by the ring thread until it completes.
struct UringOp {
    kind: OpKind,
    file: Arc<File>,
    buf: Vec<u8>,
    /// Start of the transfer inside `buf` (for resubmitted short transfers).
    pos: usize,
    offset: u64,
    done: oneshot::Sender<(io::Result<usize>, Vec<u8>)>,
}

/// The io_uring engine: a ring owned by one thread.
pub struct UringEngine {
    tx: std::sync::Mutex<Option<mpsc::Sender<UringOp>>>,
    /// Set while a wake-up is pending on the eventfd, so that a burst of submissions costs
    /// one eventfd write.
    notified: Arc<AtomicBool>,
    eventfd: Arc<EventFd>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct EventFd(libc::c_int);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the fd is owned by the returned value.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd.
        unsafe { libc::write(self.0, &one as *const u64 as *const libc::c_void, 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

const WAKE_TOKEN: u64 = u64::MAX;

impl UringEngine {
    /// Reads or writes all of `buf` at `offset`, resubmitting short transfers; a read past
    /// the end of the file fills the rest with zeros.
    async fn transfer(
        &self,
        kind: OpKind,
        file: &Arc<File>,
        mut buf: Vec<u8>,
        offset: u64,
    ) -> BufResult {
        let mut pos = 0usize;
        while pos < buf.len() {
            let (res, back) = self
                .submit(kind, file.clone(), buf, pos, offset + pos as u64)
                .await;
            buf = back;
            match res {
                Ok(0) if matches!(kind, OpKind::Read) => {
                    buf[pos..].fill(0);
                    break;
                }
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "write returned 0");
                    return (Err(e), buf);
                }
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Creates the ring, proves it works with a NOP, and starts its thread.
    pub fn start() -> io::Result<UringEngine> {
        let mut ring = io_uring::IoUring::new(URING_ENTRIES)?;
        // Probe: some sandboxes allow io_uring_setup but refuse to run operations.
        // SAFETY: a NOP references no memory.
        unsafe {
            ring.submission()
                .push(&io_uring::opcode::Nop::new().build().user_data(1))
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("io_uring probe returned no completion"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        let eventfd = Arc::new(EventFd::new()?);
        let notified = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<UringOp>();
        let thread = {
            let eventfd = eventfd.clone();
            let notified = notified.clone();
            std::thread::Builder::new()
                .name("tandem-uring".into())
                .spawn(move || ring_thread(ring, rx, eventfd, notified))?
        };
        Ok(UringEngine {
            tx: std::sync::Mutex::new(Some(tx)),
            notified,
            eventfd,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    async fn submit(
        &self,
        kind: OpKind,
        file: Arc<File>,
        buf: Vec<u8>,
        pos: usize,
        offset: u64,
    ) -> (io::Result<usize>, Vec<u8>) {
        let (done, rx) = oneshot::channel();
        let op = UringOp {
            kind,
            file,
            buf,
            pos,
            offset,
            done,
        };
        let sent = {
            let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(tx) => tx.send(op).map_err(|e| e.0),
                None => Err(op),
            }
        };
        if let Err(op) = sent {
            return (
                Err(io::Error::other("io_uring engine has shut down")),
                op.buf,
            );
        }
        if !self.notified.swap(true, Ordering::SeqCst) {
            self.eventfd.wake();
        }
        match rx.await {
            Ok(res) => res,
            Err(_) => (
                Err(io::Error::other("io_uring thread dropped an operation")),
                Vec::new(),
            ),
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Dropping the sender lets the thread finish its in-flight operations and exit.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.eventfd.wake();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn build_sqe(op: &mut UringOp, token: u64) -> io_uring::squeue::Entry {
    use io_uring::{opcode, types};
    let fd = types::Fd(op.file.as_raw_fd());
    let remaining = &mut op.buf[op.pos..];
    // Transfers above u32::MAX are split by the caller's resubmission loop.
    let len = remaining.len().min(1 << 30) as u32;
    match op.kind {
        OpKind::Read => opcode::Read::new(fd, remaining.as_mut_ptr(), len)
            .offset(op.offset)
            .build(),
        OpKind::Write => opcode::Write::new(fd, remaining.as_ptr(), len)
            .offset(op.offset)
            .build(),
        OpKind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
    .user_data(token)
}

fn ring_thread(
    mut ring: io_uring::IoUring,
    rx: mpsc::Receiver<UringOp>,
    eventfd: Arc<EventFd>,
    notified: Arc<AtomicBool>,
) {
    // Slot table of in-flight operations; the slot index is the SQE token. The ring thread
    // owns every buffer the kernel may be touching, so none can be freed early.
    let mut slots: Vec<Option<UringOp>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut inflight = 0usize;
    // Leaked on purpose: the armed eventfd read may outlive this function until the kernel
    // tears the ring down, so its 8-byte target must never be freed.
    let wake_ptr: *mut u8 = Box::into_raw(Box::new(0u64)).cast::<u8>();
    let mut disconnected = false;
    let mut wake_armed = false;

    loop {
        if !wake_armed && !disconnected {
            let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(eventfd.0), wake_ptr, 8)
                .build()
                .user_data(WAKE_TOKEN);
            push_sqe(&mut ring, &sqe);
            wake_armed = true;
        }
        if disconnected && inflight == 0 {
            // The eventfd read may still be armed; the ring is torn down with it.
            return;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring_enter failed; failing in-flight I/O");
                for op in slots.drain(..).flatten() {
                    let _ = op
                        .done
                        .send((Err(io::Error::other("io_uring failed")), op.buf));
                }
                return;
            }
        }
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, result) in completions {
            if token == WAKE_TOKEN {
                wake_armed = false;
                notified.store(false, Ordering::SeqCst);
                loop {
                    match rx.try_recv() {
                        Ok(mut op) => {
                            let slot = free.pop().unwrap_or_else(|| {
                                slots.push(None);
                                slots.len() - 1
                            });
                            let sqe = build_sqe(&mut op, slot as u64);
                            slots[slot] = Some(op);
                            inflight += 1;
                            push_sqe(&mut ring, &sqe);
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                }
                continue;
            }
            let slot = token as usize;
            let Some(op) = slots.get_mut(slot).and_then(Option::take) else {
                tracing::error!(token, "io_uring completion for an unknown slot");
                continue;
            };
            free.push(slot);
            inflight -= 1;
            let res = if result < 0 {
                Err(io::Error::from_raw_os_error(-result))
            } else {
                Ok(result as usize)
            };
            let _ = op.done.send((res, op.buf));
        }
    }
}

fn push_sqe(ring: &mut io_uring::IoUring, sqe: &io_uring::squeue::Entry) {
    loop {
        // SAFETY: every buffer an SQE points to is owned by an entry of the ring thread's
        // slot table (or its boxed wake buffer) until the matching completion is reaped.
        let pushed = unsafe { ring.submission().push(sqe).is_ok() };
        if pushed {
            return;
        }
        // Queue full: hand what we have to the kernel and retry.
        if let Err(e) = ring.submit() {
            if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!(error = %e, "io_uring submit failed while the queue was full");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn engines() -> Vec<IoEngine> {
        let mut v = vec![IoEngine::Std];
        match IoEngine::new(IoEngineChoice::Uring) {
            Ok(e) => v.push(e),
            Err(e) => panic!("io_uring must be available on the test machines: {e}"),
        }
        v
    }

    /// A new, empty file at `path`, open for reading and writing.
    pub(crate) fn scratch_file(path: &std::path::Path) -> Arc<File> {
        Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn engines_round_trip_and_read_zeros_past_eof() {
        for engine in engines() {
            let dir = tempfile::tempdir().unwrap();
            let file = scratch_file(&dir.path().join("f"));
            let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
            let (res, _) = engine.write_at(&file, data.clone(), 4096).await;
            res.unwrap();
            engine.fdatasync(&file).await.unwrap();
            let (res, back) = engine.read_at(&file, vec![0xAA; 10_000], 4096).await;
            res.unwrap();
            assert_eq!(back, data, "engine {}", engine.name());
            let (res, past) = engine.read_at(&file, vec![0xAA; 8192], 12_000).await;
            res.unwrap();
            assert_eq!(&past[..2096], &data[7904..], "engine {}", engine.name());
            assert!(
                past[2096..].iter().all(|b| *b == 0),
                "engine {}",
                engine.name()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_handles_many_concurrent_operations() {
        let engine = IoEngine::new(IoEngineChoice::Uring).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = scratch_file(&dir.path().join("f"));
        // More operations than ring entries, to exercise the full-queue path.
        let mut tasks = Vec::new();
        for i in 0..1000u64 {
            let engine = engine.clone();
            let file = file.clone();
            tasks.push(tokio::spawn(async move {
                let (res, _) = engine.write_at(&file, vec![i as u8; 512], i * 512).await;
                res.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for i in 0..1000u64 {
            let (res, buf) = engine.read_at(&file, vec![0; 512], i * 512).await;
            res.unwrap();
            assert!(buf.iter().all(|b| *b == i as u8));
        }
    }
}
