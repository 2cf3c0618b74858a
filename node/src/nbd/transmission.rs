//! The transmission phase: requests read whole, run concurrently, answered in
//! completion order.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Mutex, Semaphore};

use tandem_engine::store::MAX_IO_BYTES;
use tandem_engine::volume::AttachedVolume;

// The errno mapping FUSE uses too. NBD calls the volume directly, not through the
// `BlockTarget` trait object, so that a request costs no boxed future.
use crate::block::{volume_error, TargetError};

use super::*;

impl Connection {
    pub(super) async fn transmission(
        &self,
        vol: Arc<AttachedVolume>,
        mut rd: Reader,
        wr: OwnedWriteHalf,
    ) -> Result<(), ConnError> {
        let wr = Arc::new(Mutex::new(wr));
        let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_PER_CONN));
        let conn_bytes = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES_PER_CONN / BUDGET_UNIT));
        let broken = Arc::new(AtomicBool::new(false));
        let mut shutdown = self.shutdown.clone();
        let vm = self.metrics.volume(vol.name());
        let result = loop {
            if broken.load(Ordering::Acquire) {
                break Ok(());
            }
            let mut hdr = [0u8; 28];
            tokio::select! {
                biased;
                _ = shutdown.changed() => break Ok(()),
                r = rd.read_exact(&mut hdr) => {
                    if let Err(e) = r {
                        // A client that goes away between requests is not an error.
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            break Ok(());
                        }
                        break Err(e.into());
                    }
                }
            }
            let magic = u32::from_be_bytes(hdr[0..4].try_into().unwrap_or_default());
            let flags = u16::from_be_bytes([hdr[4], hdr[5]]);
            let cmd = u16::from_be_bytes([hdr[6], hdr[7]]);
            let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default());
            let offset = u64::from_be_bytes(hdr[16..24].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(hdr[24..28].try_into().unwrap_or_default());
            if magic != REQUEST_MAGIC {
                break Err(ConnError::Protocol(format!("bad request magic {magic:#x}")));
            }
            if cmd == CMD_DISC {
                break Ok(());
            }
            // Reserve buffer budget before allocating anything for this request.
            let units = if (cmd == CMD_READ || cmd == CMD_WRITE) && len as usize <= MAX_IO_BYTES {
                (len as usize).div_ceil(BUDGET_UNIT).max(1) as u32
            } else {
                1
            };
            let Ok(conn_budget) = conn_bytes.clone().acquire_many_owned(units).await else {
                break Ok(());
            };
            let Ok(global_budget) = self.global_bytes.clone().acquire_many_owned(units).await
            else {
                break Ok(());
            };
            let mut payload = Vec::new();
            if cmd == CMD_WRITE {
                if len as usize > MAX_IO_BYTES {
                    // We cannot skip a payload this large safely: refuse and close.
                    let _ = send_reply(&wr, handle, EOVERFLOW, None).await;
                    break Err(ConnError::Protocol(format!(
                        "write payload of {len} bytes exceeds the {MAX_IO_BYTES}-byte maximum"
                    )));
                }
                let read = read_payload(&mut rd, len as usize).await;
                // An abrupt close mid-payload ends here, before anything is stored.
                match read {
                    Ok(p) => payload = p,
                    Err(e) => break Err(e.into()),
                }
            }
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break Ok(());
            };
            let vol = vol.clone();
            let wr = wr.clone();
            let vm = vm.clone();
            let broken = broken.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _budget = (conn_budget, global_budget);
                let (err, data) = handle_request(&vol, &vm, flags, cmd, offset, len, payload).await;
                if err == ESHUTDOWN {
                    broken.store(true, Ordering::Release);
                }
                if send_reply(&wr, handle, err, data.as_deref()).await.is_err() {
                    broken.store(true, Ordering::Release);
                }
            });
        };
        // Wait for every in-flight request to reply before the connection goes away.
        let _ = tokio::time::timeout(
            DRAIN_TIMEOUT,
            inflight.acquire_many(MAX_INFLIGHT_PER_CONN as u32),
        )
        .await;
        let _ = wr.lock().await.shutdown().await;
        result
    }
}

/// Reads a write's `len`-byte payload into uninitialised capacity: no zero-fill of a
/// buffer the payload overwrites anyway (a 1 MiB memset per 1 MiB write otherwise).
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(len);
    let mut src = rd.take(len as u64);
    while payload.len() < len {
        if src.read_buf(&mut payload).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(payload)
}

/// Writes all of `parts` with vectored writes (one syscall for header and data).
async fn write_all_vectored(w: &mut OwnedWriteHalf, parts: &[&[u8]]) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        let mut slices = Vec::with_capacity(parts.len());
        let mut skip = done;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        let n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

async fn send_reply(
    wr: &Mutex<OwnedWriteHalf>,
    handle: u64,
    error: u32,
    data: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    hdr[4..8].copy_from_slice(&error.to_be_bytes());
    hdr[8..16].copy_from_slice(&handle.to_be_bytes());
    let mut w = wr.lock().await;
    match data {
        Some(d) if error == 0 => write_all_vectored(&mut w, &[&hdr, d]).await,
        _ => w.write_all(&hdr).await,
    }
}

/// Runs one request; returns the NBD error (0 for success) and the read data.
async fn handle_request(
    vol: &AttachedVolume,
    vm: &crate::metrics::VolumeMetrics,
    flags: u16,
    cmd: u16,
    offset: u64,
    len: u32,
    payload: Vec<u8>,
) -> (u32, Option<Vec<u8>>) {
    let fua = flags & CMD_FLAG_FUA != 0;
    // The spec: once FUA is advertised, the server MUST accept it on every command (even
    // by ignoring it); qemu sets it on FLUSH. Reads and flushes are already durable-enough.
    let known_flags = match cmd {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if flags & !known_flags != 0 {
        return (EINVAL, None);
    }
    let start = Instant::now();
    let res: Result<Option<Vec<u8>>, TargetError> = match cmd {
        CMD_READ => {
            if len as usize > MAX_IO_BYTES {
                return (EOVERFLOW, None);
            }
            let r = vol
                .read(offset, len as usize)
                .await
                .map(Some)
                .map_err(|e| volume_error(e, false));
            if r.is_ok() {
                vm.read_ops.inc();
                vm.read_bytes.inc_by(len as u64);
            }
            r
        }
        CMD_WRITE => {
            let r = vol
                .write(offset, payload, fua)
                .await
                .map(|_| None)
                .map_err(|e| volume_error(e, true));
            if r.is_ok() {
                vm.write_ops.inc();
                vm.write_bytes.inc_by(len as u64);
            }
            r
        }
        CMD_FLUSH => {
            let r = vol
                .flush()
                .await
                .map(|_| None)
                .map_err(|e| volume_error(e, true));
            if r.is_ok() {
                vm.flush_ops.inc();
            }
            r
        }
        // Both deallocate whole blocks and zero partial ones: after TRIM the store reads
        // zeros, which the protocol allows. NO_HOLE is honoured in effect: the result reads as
        // zeros either way, and holes are what thin provisioning wants.
        CMD_TRIM | CMD_WRITE_ZEROES => {
            let r = vol
                .write_zeroes(offset, len as u64, fua)
                .await
                .map(|_| None)
                .map_err(|e| volume_error(e, true));
            if r.is_ok() {
                vm.zero_ops.inc();
            }
            r
        }
        _ => return (EINVAL, None),
    };
    match res {
        Ok(data) => {
            let took = start.elapsed().as_secs_f64();
            match cmd {
                CMD_READ => vm.read_latency.observe(took),
                CMD_WRITE => vm.write_latency.observe(took),
                CMD_FLUSH => vm.flush_latency.observe(took),
                _ => {}
            }
            let c = tandem_engine::sched::class_index(vol.io_priority());
            vm.class_ops[c].inc();
            vm.class_latency[c].observe(took);
            (0, data)
        }
        Err(e) => {
            let errno = e.errno as u32;
            if e.bad_data {
                vm.checksum_errors.inc();
            }
            if errno == ESHUTDOWN {
                tracing::warn!(volume = vol.name(), error = %e, "I/O refused: volume detached or coordinator fenced");
            }
            if errno == EIO || errno == ENOSPC || errno == ENOMEM {
                vm.io_errors.inc();
                tracing::warn!(volume = vol.name(), cmd, offset, len, error = %e, "I/O request failed");
            }
            (errno, None)
        }
    }
}
