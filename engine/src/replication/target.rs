//! How the coordinator talks to one replica over its [`Link`] (the local one through the
//! node's `ReplicaServer` in-process, a remote one through the environment's network).
//! Both speak the same frames and pass the same generation fence, so the coordinator has
//! one code path and a zombie coordinator is fenced on its own node too.
//!
//! Invariant: every call ends within its timeout. A timeout (or a dropped caller) never
//! cancels a local store write half-way (the rest runs on a task of its own, see
//! [`crate::completion`]); its outcome is then unknown, as for a remote call whose reply
//! never came.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::link::Link;
use super::server::{decode_checksums, wire_generation, OpenInfo, MAX_SESSION};
use crate::wire::frame::FLAG_FUA;
use crate::wire::{Frame, Kind};

/// Why one replica did not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum TargetError {
    #[error("replica answered errno {0} ({msg})", msg = std::io::Error::from_raw_os_error(*.0))]
    Status(i32),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Transport(String),
    #[error("malformed reply: {0}")]
    BadReply(String),
    #[error("not connected")]
    NotConnected,
}

impl TargetError {
    /// EIO from the replica: its store found a block that fails its checksum (or its disk
    /// failed the read). Another copy may be good.
    pub(super) fn is_bad_data(&self) -> bool {
        matches!(self, TargetError::Status(e) if *e == libc::EIO)
    }

    /// The replica knows a newer generation: a newer coordinator exists.
    pub(super) fn is_stale(&self) -> bool {
        matches!(self, TargetError::Status(e) if *e == libc::ESTALE)
    }

    pub(super) fn is_no_space(&self) -> bool {
        matches!(self, TargetError::Status(e) if *e == libc::ENOSPC)
    }
}

/// One replica as the coordinator sees it: its link, whether it is the local replica, and
/// the session its `Open` got.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) link: Arc<dyn Link>,
    local: bool,
    session: u64,
}

/// Volume-wide values every request carries.
#[derive(Clone, Copy)]
pub(super) struct Ctx {
    pub(super) wire_id: u64,
    pub(super) generation: u64,
    pub(super) timeout: Duration,
}

impl Target {
    /// A target not opened yet: only [`Target::open`] may be called on it.
    pub(super) fn new(link: Arc<dyn Link>, local: bool) -> Target {
        Target {
            link,
            local,
            session: 0,
        }
    }

    pub(super) fn is_local(&self) -> bool {
        self.local
    }

    /// Whether the connection is known dead.
    pub(super) fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// The frame generation field for this target's requests.
    fn generation(&self, ctx: Ctx) -> u64 {
        wire_generation(ctx.generation, self.session)
    }

    async fn call(&self, frame: Frame, timeout: Duration) -> Result<Frame, TargetError> {
        let reply = match tokio::time::timeout(timeout, self.link.call(frame)).await {
            Err(_) => return Err(TargetError::Timeout(timeout)),
            Ok(Err(e)) => return Err(TargetError::Transport(e)),
            Ok(Ok(reply)) => reply,
        };
        if reply.kind != Kind::Reply {
            return Err(TargetError::BadReply(format!("{:?} frame", reply.kind)));
        }
        if reply.status != 0 {
            return Err(TargetError::Status(reply.status as i32));
        }
        Ok(reply)
    }

    /// Opens the replica at `ctx.generation`, starting a new session on it: the returned
    /// target carries the session, and frames of older sessions are refused from now on.
    /// The replica side may wait for its metadata and for older I/O to drain, so this
    /// allows more than one I/O timeout.
    pub(super) async fn open(self, ctx: Ctx) -> Result<(Target, OpenInfo), TargetError> {
        let f = Frame::request(
            Kind::Open,
            ctx.wire_id,
            wire_generation(ctx.generation, 0),
            0,
            0,
            Bytes::new(),
        );
        let reply = self
            .call(
                f,
                ctx.timeout + super::GENERATION_WAIT + super::OPEN_DRAIN_TIMEOUT,
            )
            .await?;
        let info = OpenInfo::decode(&reply.payload)
            .ok_or_else(|| TargetError::BadReply(format!("open: {} bytes", reply.payload.len())))?;
        if info.session == 0 || info.session > MAX_SESSION {
            return Err(TargetError::BadReply(format!(
                "open: session {}",
                info.session
            )));
        }
        Ok((
            Target {
                link: self.link,
                local: self.local,
                session: info.session,
            },
            info,
        ))
    }

    pub(super) async fn read(
        &self,
        ctx: Ctx,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, TargetError> {
        let f = Frame::request(
            Kind::Read,
            ctx.wire_id,
            self.generation(ctx),
            offset,
            len as u32,
            Bytes::new(),
        );
        let reply = self.call(f, ctx.timeout).await?;
        if reply.payload.len() != len {
            return Err(TargetError::BadReply(format!(
                "read of {len} bytes answered with {}",
                reply.payload.len()
            )));
        }
        Ok(Vec::from(reply.payload))
    }

    pub(super) async fn write(
        &self,
        ctx: Ctx,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), TargetError> {
        let len = data.len() as u32;
        let f = Frame::request(
            Kind::Write,
            ctx.wire_id,
            self.generation(ctx),
            offset,
            len,
            data,
        )
        .with_flags(if fua { FLAG_FUA } else { 0 });
        self.call(f, ctx.timeout).await.map(|_| ())
    }

    pub(super) async fn write_zeroes(
        &self,
        ctx: Ctx,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), TargetError> {
        let f = Frame::request(
            Kind::WriteZeroes,
            ctx.wire_id,
            self.generation(ctx),
            offset,
            len,
            Bytes::new(),
        )
        .with_flags(if fua { FLAG_FUA } else { 0 });
        self.call(f, ctx.timeout).await.map(|_| ())
    }

    pub(super) async fn flush(&self, ctx: Ctx) -> Result<(), TargetError> {
        let f = Frame::request(
            Kind::Flush,
            ctx.wire_id,
            self.generation(ctx),
            0,
            0,
            Bytes::new(),
        );
        self.call(f, ctx.timeout).await.map(|_| ())
    }

    /// Clears the replica's suspect flags after a full comparison (see `OpenInfo`).
    pub(super) async fn clear_suspect(&self, ctx: Ctx, epoch: u64) -> Result<(), TargetError> {
        let f = Frame::request(
            Kind::ClearSuspect,
            ctx.wire_id,
            self.generation(ctx),
            epoch,
            0,
            Bytes::new(),
        );
        self.call(f, ctx.timeout).await.map(|_| ())
    }

    /// Seals the replica's head as snapshot `id` (`Replica::seal`). A seal checkpoints the
    /// head (two fdatasyncs), so it gets four I/O timeouts.
    pub(super) async fn seal(&self, ctx: Ctx, id: &str) -> Result<(), TargetError> {
        self.snapshot_op(ctx, Kind::Seal, id, ctx.timeout * 4).await
    }

    /// Deletes snapshot `id` from the replica (`Replica::delete_snapshot`); a merge copies
    /// data, so it gets sixteen I/O timeouts.
    pub(super) async fn delete_snapshot(&self, ctx: Ctx, id: &str) -> Result<(), TargetError> {
        self.snapshot_op(ctx, Kind::DeleteSnapshot, id, ctx.timeout * 16)
            .await
    }

    async fn snapshot_op(
        &self,
        ctx: Ctx,
        kind: Kind,
        id: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        let payload = Bytes::copy_from_slice(id.as_bytes());
        let f = Frame::request(
            kind,
            ctx.wire_id,
            self.generation(ctx),
            0,
            payload.len() as u32,
            payload,
        );
        self.call(f, timeout).await.map(|_| ())
    }

    /// A digest per 4 KiB block of `[offset, offset + len)` (see `Replica::checksums`).
    pub(super) async fn checksums(
        &self,
        ctx: Ctx,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u64>, TargetError> {
        let f = Frame::request(
            Kind::Checksums,
            ctx.wire_id,
            self.generation(ctx),
            offset,
            len as u32,
            Bytes::new(),
        );
        let reply = self.call(f, ctx.timeout).await?;
        decode_checksums(offset, len, &reply.payload).ok_or_else(|| {
            TargetError::BadReply(format!("checksums: {} bytes", reply.payload.len()))
        })
    }
}
