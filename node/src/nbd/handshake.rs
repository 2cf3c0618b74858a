//! Option haggling (the fixed newstyle handshake).

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

use tandem_engine::store::MAX_IO_BYTES;
use tandem_engine::volume::{AttachedVolume, VolumeError};

use super::*;

impl Connection {
    /// Runs option haggling. Returns the volume to serve, or `None` if the client left
    /// cleanly (NBD_OPT_ABORT).
    pub(super) async fn handshake(
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
                    let vol = match self.volumes.export(&name).await {
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
                    reply.extend_from_slice(&export_flags(&vol).to_be_bytes());
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
                    let vol = match self.volumes.export(&name).await {
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
                    export.extend_from_slice(&export_flags(&vol).to_be_bytes());
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
}

/// The transmission flags of one export: a snapshot export is read-only.
fn export_flags(vol: &AttachedVolume) -> u16 {
    if vol.is_read_only() {
        TRANSMISSION_FLAGS | TFLAG_READ_ONLY
    } else {
        TRANSMISSION_FLAGS
    }
}
