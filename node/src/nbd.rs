//! NBD frontend: the newstyle fixed handshake and the transmission phase.
//!
//! Export name = volume name; only volumes attached on this node are exported. Requests on
//! one connection run concurrently (up to [`MAX_INFLIGHT_PER_CONN`]) and replies go out in
//! completion order, as the protocol allows. Every flush is an `fdatasync` of the volume, so
//! a flush on any connection covers writes completed on every connection, and we advertise
//! `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! Hostile input: anything that makes the byte stream ambiguous (bad magic, a write payload
//! larger than the maximum, an over-long option) closes that connection. Anything else (an
//! out-of-range offset, an unknown command, bad flags) gets an error reply and the
//! connection continues. No request touches stored data until its whole payload is in.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;

use tandem_engine::store::MAX_IO_BYTES;
use tandem_engine::volume::{AttachedVolume, VolumeError, VolumeManager};

// The errno mapping FUSE uses too. NBD calls the volume directly, not through the
// `BlockTarget` trait object, so that a request costs no boxed future.
use crate::block::{volume_error, TargetError};

use crate::metrics::Metrics;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What we advertise, and all of it is implemented.
pub const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

const EIO: u32 = 5;
const ENOMEM: u32 = 12;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const ESHUTDOWN: u32 = 108;

/// Largest option payload accepted during the handshake; real options are a few hundred
/// bytes (a name of at most 4 KiB plus info requests).
pub const MAX_OPTION_BYTES: u32 = 16 << 10;
/// Options one client may send before it must pick an export.
pub const MAX_OPTIONS: usize = 128;
/// A client that has not finished the handshake in this time is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent requests per connection; bounds memory at 128 x 32 MiB worst case per
/// connection, and is deeper than any client's queue (qemu uses 16, fio's iodepth tops out
/// well below).
pub const MAX_INFLIGHT_PER_CONN: usize = 128;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Payload bytes (read replies and write payloads) in flight per connection. Two
/// maximum-size requests fit; a client that pipelines more waits (TCP backpressure) instead
/// of making the daemon buffer 128 x 32 MiB.
pub const MAX_INFLIGHT_BYTES_PER_CONN: usize = 64 << 20;
/// Payload bytes in flight across all connections: bounds the daemon's buffer memory.
pub const MAX_INFLIGHT_BYTES: usize = 1 << 30;
/// Budget unit for the byte semaphores.
const BUDGET_UNIT: usize = 4096;
/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Preferred block size advertised to clients (the store's checksum block).
const PREFERRED_BLOCK: u32 = 4096;

pub struct NbdServer {
    listener: TcpListener,
    volumes: Arc<VolumeManager>,
    metrics: Arc<Metrics>,
}

impl NbdServer {
    pub fn new(listener: TcpListener, volumes: Arc<VolumeManager>, metrics: Arc<Metrics>) -> Self {
        NbdServer {
            listener,
            volumes,
            metrics,
        }
    }

    /// Serves until `shutdown` turns true, then stops accepting, lets connections finish
    /// their in-flight requests (bounded by [`DRAIN_TIMEOUT`]) and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let global_bytes = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES / BUDGET_UNIT));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "NBD accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "NBD connection limit reached; refusing");
                        continue;
                    };
                    let conn = Connection {
                        volumes: self.volumes.clone(),
                        metrics: self.metrics.clone(),
                        shutdown: shutdown.clone(),
                        global_bytes: global_bytes.clone(),
                    };
                    conns.spawn(async move {
                        let _permit = permit;
                        conn.metrics.nbd_connections.inc();
                        match conn.serve(stream).await {
                            Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                            Err(e) => {
                                conn.metrics.nbd_protocol_errors.inc();
                                tracing::info!(%peer, error = %e, "NBD connection closed");
                            }
                        }
                        conn.metrics.nbd_connections.dec();
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("NBD connections did not drain in time; closing them");
            conns.abort_all();
        }
    }
}

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake timed out")]
    HandshakeTimeout,
}

struct Connection {
    volumes: Arc<VolumeManager>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    global_bytes: Arc<Semaphore>,
}

type Reader = BufReader<tokio::net::tcp::OwnedReadHalf>;

async fn write_opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    reply: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&reply.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await
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

impl Connection {
    async fn serve(&self, stream: TcpStream) -> Result<(), ConnError> {
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let chosen =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut rd, &mut wr)).await {
                Err(_) => return Err(ConnError::HandshakeTimeout),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(v))) => v,
            };
        self.transmission(chosen, rd, wr).await
    }

    async fn export_size(&self, vol: &AttachedVolume) -> u64 {
        vol.size_bytes().await
    }

    /// Runs option haggling. Returns the volume to serve, or `None` if the client left
    /// cleanly (NBD_OPT_ABORT).
    async fn handshake(
        &self,
        rd: &mut Reader,
        wr: &mut OwnedWriteHalf,
    ) -> Result<Option<Arc<AttachedVolume>>, ConnError> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&hello).await?;
        let client_flags = rd.read_u32().await?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ConnError::Protocol(format!(
                "unknown client flags {client_flags:#x}"
            )));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        for _ in 0..MAX_OPTIONS {
            let magic = rd.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(ConnError::Protocol(format!("bad option magic {magic:#x}")));
            }
            let opt = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > MAX_OPTION_BYTES {
                // The stream cannot be trusted past an absurd length: say why, then close.
                let _ = write_opt_reply(wr, opt, REP_ERR_TOO_BIG, b"option too long").await;
                return Err(ConnError::Protocol(format!(
                    "option length {len} too large"
                )));
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let vol = match self.volumes.attached(&name) {
                        Ok(v) => v,
                        // EXPORT_NAME has no error reply: the spec says close.
                        Err(e) => {
                            return Err(ConnError::Protocol(format!(
                                "export '{name}' refused: {e}"
                            )))
                        }
                    };
                    let mut reply = Vec::with_capacity(134);
                    reply.extend_from_slice(&self.export_size(&vol).await.to_be_bytes());
                    reply.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    wr.write_all(&reply).await?;
                    return Ok(Some(vol));
                }
                OPT_ABORT => {
                    let _ = write_opt_reply(wr, opt, REP_ACK, &[]).await;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        write_opt_reply(wr, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                        continue;
                    }
                    for name in self.volumes.attached_names() {
                        let mut d = Vec::new();
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        write_opt_reply(wr, opt, REP_SERVER, &d).await?;
                    }
                    write_opt_reply(wr, opt, REP_ACK, &[]).await?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, _requests)) = parse_info_request(&data) else {
                        write_opt_reply(wr, opt, REP_ERR_INVALID, b"malformed INFO/GO request")
                            .await?;
                        continue;
                    };
                    let vol = match self.volumes.attached(&name) {
                        Ok(v) => v,
                        Err(e) => {
                            let msg = match &e {
                                VolumeError::NotAttached(_) => format!(
                                    "volume '{name}' is not attached on this node; run: tandemctl volume attach {name}"
                                ),
                                other => other.to_string(),
                            };
                            write_opt_reply(wr, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                            continue;
                        }
                    };
                    let size = self.export_size(&vol).await;
                    let mut export = Vec::with_capacity(12);
                    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    export.extend_from_slice(&size.to_be_bytes());
                    export.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    write_opt_reply(wr, opt, REP_INFO, &export).await?;
                    let mut bs = Vec::with_capacity(14);
                    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    bs.extend_from_slice(&1u32.to_be_bytes());
                    bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                    bs.extend_from_slice(&(MAX_IO_BYTES as u32).to_be_bytes());
                    write_opt_reply(wr, opt, REP_INFO, &bs).await?;
                    let mut nm = Vec::new();
                    nm.extend_from_slice(&INFO_NAME.to_be_bytes());
                    nm.extend_from_slice(name.as_bytes());
                    write_opt_reply(wr, opt, REP_INFO, &nm).await?;
                    let mut desc = Vec::new();
                    desc.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                    desc.extend_from_slice(
                        format!("tandem volume {name} generation {}", vol.generation()).as_bytes(),
                    );
                    write_opt_reply(wr, opt, REP_INFO, &desc).await?;
                    write_opt_reply(wr, opt, REP_ACK, &[]).await?;
                    if opt == OPT_GO {
                        return Ok(Some(vol));
                    }
                }
                other => {
                    write_opt_reply(
                        wr,
                        other,
                        REP_ERR_UNSUP,
                        format!("option {other} is not supported").as_bytes(),
                    )
                    .await?;
                }
            }
        }
        Err(ConnError::Protocol(format!(
            "more than {MAX_OPTIONS} options without choosing an export"
        )))
    }

    async fn transmission(
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
                payload = vec![0u8; len as usize];
                // An abrupt close mid-payload ends here, before anything is stored.
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break Err(e.into());
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

fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + name_len)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * n {
        return None;
    }
    let reqs = rest[2..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((String::from_utf8(name.to_vec()).ok()?, reqs))
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
                vm.read_latency.observe(start.elapsed().as_secs_f64());
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
                vm.write_latency.observe(start.elapsed().as_secs_f64());
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
                vm.flush_latency.observe(start.elapsed().as_secs_f64());
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
        Ok(data) => (0, data),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_rejects_truncated_and_padded_input() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&3u32.to_be_bytes());
        ok.extend_from_slice(b"vol");
        ok.extend_from_slice(&1u16.to_be_bytes());
        ok.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&ok),
            Some(("vol".to_string(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&ok[..ok.len() - 1]), None);
        let mut padded = ok.clone();
        padded.push(0);
        assert_eq!(parse_info_request(&padded), None);
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&huge), None);
        assert_eq!(parse_info_request(&[]), None);
    }
}
