//! What this machine itself costs, the floor under every stage of a replicated write
//! (issue 11): the figures a cost breakdown of one write is measured against.
//!
//! * `machine/loopback_rtt/16B`: a 16-byte request and a 16-byte reply over loopback TCP
//!   between two processes (this one and a forked echo child), `TCP_NODELAY`: the round
//!   trip every replica frame pays at least.
//! * `machine/loopback_rtt/4KiB`: a 4 KiB request (a replica write's payload) and a
//!   16-byte reply.
//! * `machine/thread_wakeup_rtt`: one thread wakes another through a channel and waits to
//!   be woken back: two futex wake-ups and two context switches, what a cross-thread
//!   hand-off costs each way.
//! * `machine/thread_spin_rtt`: the same round trip between two threads that spin on an
//!   atomic instead of sleeping: what the hand-off costs without a wake-up (the cache
//!   line moving between cores), next to which the difference is the cost of waking a
//!   sleeping vCPU.
//! * `machine/tokio_spawn_join`: spawning a task on a 2-worker tokio runtime and awaiting
//!   it from another task: what a task per I/O costs.
//! * `machine/pwrite_4k`: one 4 KiB `pwrite` into the page cache at a random aligned
//!   offset of a 64 MiB file (written once before).
//!
//! Run: `cargo bench -p tandem-bench --bench machine` (under a minute).

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};

const FILE_BYTES: u64 = 64 << 20;

/// Forks an echo process on a loopback listener: for each request of `req` bytes it
/// answers 16 bytes, until the connection closes. Returns the connected client. Called
/// before any thread exists, so the fork is safe.
fn echo_child(req: usize) -> (TcpStream, libc::pid_t) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    // SAFETY: single-threaded here (criterion has not started); the child only uses the
    // listener and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).ok();
        let mut buf = vec![0u8; req];
        loop {
            if s.read_exact(&mut buf).is_err() || s.write_all(&[0u8; 16]).is_err() {
                // SAFETY: leave the child without running the parent's destructors.
                unsafe { libc::_exit(0) };
            }
        }
    }
    drop(listener);
    let s = TcpStream::connect(addr).expect("connect to the echo child");
    s.set_nodelay(true).expect("nodelay");
    (s, pid)
}

fn main() {
    let mut echo_small = echo_child(16);
    let mut echo_4k = echo_child(4096);
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let mut g = c.benchmark_group("machine/loopback_rtt");
    for (name, stream, req) in [
        ("16B", &mut echo_small.0, 16usize),
        ("4KiB", &mut echo_4k.0, 4096),
    ] {
        let payload = vec![7u8; req];
        let mut reply = [0u8; 16];
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                stream.write_all(&payload).expect("send");
                stream.read_exact(&mut reply).expect("reply");
            })
        });
    }
    g.finish();

    // Two threads wake each other through channels (futex wake-ups both ways).
    let (to_peer, peer_rx) = std::sync::mpsc::channel::<u64>();
    let (to_me, my_rx) = std::sync::mpsc::channel::<u64>();
    let peer = std::thread::spawn(move || {
        while let Ok(v) = peer_rx.recv() {
            if to_me.send(v).is_err() {
                break;
            }
        }
    });
    c.bench_function("machine/thread_wakeup_rtt", |b| {
        b.iter(|| {
            to_peer.send(1).expect("send");
            black_box(my_rx.recv().expect("recv"));
        })
    });
    drop(to_peer);
    peer.join().expect("peer thread");

    // The same round trip with both threads spinning (no sleep, no futex).
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let peer_flag = flag.clone();
    let spinner = std::thread::spawn(move || loop {
        use std::sync::atomic::Ordering::{Acquire, Release};
        match peer_flag.load(Acquire) {
            1 => peer_flag.store(2, Release),
            3 => return,
            _ => std::hint::spin_loop(),
        }
    });
    c.bench_function("machine/thread_spin_rtt", |b| {
        use std::sync::atomic::Ordering::{Acquire, Release};
        b.iter(|| {
            flag.store(1, Release);
            while flag.load(Acquire) != 2 {
                std::hint::spin_loop();
            }
        })
    });
    flag.store(3, std::sync::atomic::Ordering::Release);
    spinner.join().expect("spinner thread");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    c.bench_function("machine/tokio_spawn_join", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async move {
                // Timed from inside a task, as the coordinator spawns its per-I/O tasks.
                tokio::spawn(async move {
                    let start = std::time::Instant::now();
                    for _ in 0..iters {
                        black_box(tokio::spawn(async { 1u64 }).await.expect("task"));
                    }
                    start.elapsed()
                })
                .await
                .expect("timing task")
            })
        })
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("f"))
        .expect("create file");
    let block = vec![5u8; 4096];
    for off in (0..FILE_BYTES).step_by(1 << 20) {
        file.write_all_at(&vec![1u8; 1 << 20], off).expect("fill");
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    c.bench_function("machine/pwrite_4k", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (FILE_BYTES / 4096)) * 4096;
            file.write_all_at(&block, off).expect("pwrite");
        })
    });

    c.final_summary();
    for (s, pid) in [echo_small, echo_4k] {
        drop(s);
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
}
