//! The activity log: which 4 MiB regions may have checksums on disk that are older than
//! their data.
//!
//! Protocol (after DRBD's activity log, made coarser and simpler):
//! * Before the first write to a region that is not hot, the region is added to the hot set
//!   and the set is made durable (one 4 KiB record write + fdatasync). A region is hot in
//!   memory only once that record is durable, so a concurrent write to the same region
//!   waits for the record instead of racing it; a failed record write leaves it cold.
//!   Writes to regions that are already hot cost nothing extra.
//! * The set never holds more than [`AL_MAX_HOT_REGIONS`] regions (what a record holds): a
//!   write that would overflow it checkpoints, and waits for in-flight writes to end when
//!   that is not enough. Larger zeroings are split by the store.
//! * A checkpoint makes data and checksums durable, then retires every hot region with no
//!   write in flight and records the smaller set. While it runs, new writes wait, so a
//!   region cannot be written between "its checksums are persisted" and "it is retired".
//! * At open, every region in the recorded set gets its checksums recomputed from the data.
//!
//! The file holds two 16 KiB record slots written alternately, each with a sequence number
//! and a crc32, so a torn record write leaves the previous one readable. Recovery takes the
//! newest valid record; with no valid slot in a non-empty file, every region is recomputed.
//! Recomputing more than needed would be safe for consistency but would hide corruption in
//! the extra regions, so recovery takes exactly the recorded set.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::future::Future;
use std::ops::RangeInclusive;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::{Result, StoreError, AL_MAX_HOT_REGIONS, AL_MAX_REGIONS_PER_BEGIN};
use crate::io::IoEngine;

/// One record slot: room for the header, [`AL_MAX_HOT_REGIONS`] region numbers and the
/// crc32 (16 + 8 x 1024 + 4 bytes), rounded up to whole 4 KiB pages.
const SLOT_BYTES: usize = 16 << 10;
const _: () = assert!(HEADER_BYTES + 8 * AL_MAX_HOT_REGIONS + 4 <= SLOT_BYTES);

const MAGIC: u32 = 0x5441_4c31; // "TAL1"
const HEADER_BYTES: usize = 4 + 8 + 4;

/// What recovery must recompute.
pub(super) enum Recovery {
    Regions(BTreeSet<u64>),
    All,
}

#[derive(Default)]
struct AlState {
    hot: BTreeSet<u64>,
    inflight: HashMap<u64, u32>,
    checkpointing: bool,
}

pub(super) struct ActivityLog {
    file: Arc<File>,
    /// Record writes and their fdatasync go through the replica's engine.
    engine: IoEngine,
    volume: String,
    state: Mutex<AlState>,
    /// Serializes record writes and checkpoints; holds the next sequence number.
    io: tokio::sync::Mutex<u64>,
    /// Signalled whenever writes end (a full log waits for in-flight regions to retire).
    ended: tokio::sync::Notify,
    /// Tests: while set to a receiver that reads `false`, record writes wait (a slow
    /// record fsync, or the moment of a power loss).
    #[cfg(test)]
    pub(super) hold_records: Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
    /// Tests: record writes fail with EIO while set.
    #[cfg(test)]
    pub(super) fail_records: std::sync::atomic::AtomicBool,
}

/// Marks writes in flight on a set of regions; dropping it ends them.
pub(super) struct AlGuard<'a> {
    al: &'a ActivityLog,
    regions: RangeInclusive<u64>,
}

impl Drop for AlGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.al.lock_state();
        for r in self.regions.clone() {
            if let Some(n) = st.inflight.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    st.inflight.remove(&r);
                }
            }
        }
        drop(st);
        self.al.ended.notify_waiters();
    }
}

fn encode(seq: u64, hot: &BTreeSet<u64>) -> Vec<u8> {
    // `begin` never lets the set grow past what a record holds (and `decode` accepts).
    assert!(
        hot.len() <= AL_MAX_HOT_REGIONS,
        "activity log record over capacity"
    );
    let mut rec = Vec::with_capacity(SLOT_BYTES);
    rec.extend_from_slice(&MAGIC.to_le_bytes());
    rec.extend_from_slice(&seq.to_le_bytes());
    rec.extend_from_slice(&(hot.len() as u32).to_le_bytes());
    for r in hot {
        rec.extend_from_slice(&r.to_le_bytes());
    }
    let crc = crc32fast::hash(&rec);
    rec.extend_from_slice(&crc.to_le_bytes());
    rec.resize(SLOT_BYTES, 0);
    rec
}

fn decode(slot: &[u8]) -> Option<(u64, BTreeSet<u64>)> {
    let u32_at = |i: usize| u32::from_le_bytes(slot[i..i + 4].try_into().unwrap_or_default());
    let u64_at = |i: usize| u64::from_le_bytes(slot[i..i + 8].try_into().unwrap_or_default());
    if slot.len() < SLOT_BYTES || u32_at(0) != MAGIC {
        return None;
    }
    let seq = u64_at(4);
    let count = u32_at(12) as usize;
    if count > AL_MAX_HOT_REGIONS {
        return None;
    }
    let body = HEADER_BYTES + 8 * count;
    if crc32fast::hash(&slot[..body]) != u32_at(body) {
        return None;
    }
    let hot = (0..count).map(|i| u64_at(HEADER_BYTES + 8 * i)).collect();
    Some((seq, hot))
}

impl ActivityLog {
    pub(super) fn open(
        file: File,
        volume: &str,
        engine: IoEngine,
    ) -> Result<(ActivityLog, Recovery)> {
        let io_err = |op: &'static str| {
            let volume = volume.to_string();
            move |source| StoreError::Io { volume, op, source }
        };
        let len = file.metadata().map_err(io_err("stat activity log"))?.len();
        let mut buf = vec![0u8; 2 * SLOT_BYTES];
        let n = (len as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], 0)
            .map_err(io_err("read activity log"))?;
        let slots: Vec<_> = buf.chunks(SLOT_BYTES).filter_map(decode).collect();
        let recovery = if slots.is_empty() {
            if buf.iter().any(|b| *b != 0) {
                tracing::warn!(
                    volume,
                    "activity log unreadable; recomputing every checksum"
                );
                Recovery::All
            } else {
                Recovery::Regions(BTreeSet::new())
            }
        } else {
            // The newest valid record is the truth. If the newest write was torn, the older
            // record is still safe: a record that adds regions is durable before any write to
            // them starts, and a record that retires regions only shrinks the set.
            let newest = slots.iter().max_by_key(|(seq, _)| *seq);
            Recovery::Regions(newest.map(|(_, h)| h.clone()).unwrap_or_default())
        };
        let next_seq = slots.iter().map(|(s, _)| s + 1).max().unwrap_or(1);
        Ok((
            ActivityLog {
                file: Arc::new(file),
                engine,
                volume: volume.to_string(),
                state: Mutex::new(AlState::default()),
                io: tokio::sync::Mutex::new(next_seq),
                ended: tokio::sync::Notify::new(),
                #[cfg(test)]
                hold_records: Mutex::new(None),
                #[cfg(test)]
                fail_records: Default::default(),
            },
            recovery,
        ))
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, AlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of regions currently hot.
    pub(super) fn hot_count(&self) -> usize {
        self.lock_state().hot.len()
    }

    /// Starts writes on `regions`, making them hot first if needed. `persist` makes data and
    /// checksums durable; it runs when the hot set is full and a checkpoint must make room.
    ///
    /// A region counts as hot (and takes the fast path) only once a durable record holds
    /// it: a write that finds its region merely on its way into the set waits for the
    /// record. The hot set never exceeds [`AL_MAX_HOT_REGIONS`]: when a checkpoint cannot
    /// make room (the regions hold writes in flight) this waits for them to end. A request
    /// wider than the whole log is refused; callers split larger ranges
    /// ([`AL_MAX_REGIONS_PER_BEGIN`]).
    pub(super) async fn begin<F, Fut>(
        &self,
        regions: RangeInclusive<u64>,
        persist: F,
    ) -> Result<AlGuard<'_>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        {
            let mut st = self.lock_state();
            if !st.checkpointing && regions.clone().all(|r| st.hot.contains(&r)) {
                for r in regions.clone() {
                    *st.inflight.entry(r).or_default() += 1;
                }
                return Ok(AlGuard { al: self, regions });
            }
        }
        let width = (regions.end() - regions.start() + 1) as usize;
        if width > AL_MAX_REGIONS_PER_BEGIN {
            return Err(StoreError::Io {
                volume: self.volume.clone(),
                op: "activity log",
                source: std::io::Error::other(format!(
                    "{width} regions in one request (at most {AL_MAX_REGIONS_PER_BEGIN})"
                )),
            });
        }
        let mut seq = self.io.lock().await;
        loop {
            // Registered before the check, so an end between the check and the wait is seen.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let (needed, hot) = {
                let mut st = self.lock_state();
                let needed: Vec<u64> = regions.clone().filter(|r| !st.hot.contains(r)).collect();
                if needed.is_empty() {
                    for r in regions.clone() {
                        *st.inflight.entry(r).or_default() += 1;
                    }
                    return Ok(AlGuard { al: self, regions });
                }
                (needed, st.hot.len())
            };
            if hot + needed.len() <= AL_MAX_HOT_REGIONS {
                let record = {
                    let mut st = self.lock_state();
                    // In flight from now on (a checkpoint cannot retire them), but not hot
                    // until the record holding them is durable.
                    for r in regions.clone() {
                        *st.inflight.entry(r).or_default() += 1;
                    }
                    let mut record = st.hot.clone();
                    record.extend(needed.iter().copied());
                    record
                };
                let guard = AlGuard { al: self, regions };
                // On error the guard ends the writes and the regions stay cold.
                self.write_record(&mut seq, &record).await?;
                self.lock_state().hot.extend(needed);
                return Ok(guard);
            }
            self.checkpoint_locked(&mut seq, &persist).await?;
            if self.hot_count() + needed.len() > AL_MAX_HOT_REGIONS {
                // Every hot region left holds a write in flight: wait for one to end.
                ended.await;
            }
        }
    }

    /// Persists data and checksums and retires every idle hot region.
    pub(super) async fn checkpoint<F, Fut>(&self, persist: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut seq = self.io.lock().await;
        self.checkpoint_locked(&mut seq, &persist).await
    }

    async fn checkpoint_locked<F, Fut>(&self, seq: &mut u64, persist: &F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let retire: Vec<u64> = {
            let mut st = self.lock_state();
            st.checkpointing = true;
            st.hot
                .iter()
                .copied()
                .filter(|r| !st.inflight.contains_key(r))
                .collect()
        };
        let persisted = persist().await;
        let record = {
            let mut st = self.lock_state();
            st.checkpointing = false;
            if persisted.is_ok() {
                for r in &retire {
                    st.hot.remove(r);
                }
            }
            st.hot.clone()
        };
        persisted?;
        self.write_record(seq, &record).await
    }

    async fn write_record(&self, seq: &mut u64, hot: &BTreeSet<u64>) -> Result<()> {
        #[cfg(test)]
        {
            let hold = self
                .hold_records
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(mut release) = hold {
                let _ = release.wait_for(|r| *r).await;
            }
            if self.fail_records.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Io {
                    volume: self.volume.clone(),
                    op: "write activity log",
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
        }
        let rec = encode(*seq, hot);
        let offset = (*seq % 2) * SLOT_BYTES as u64;
        *seq += 1;
        let (res, _) = self.engine.write_at(&self.file, rec, offset).await;
        let res = match res {
            Ok(()) => self.engine.fdatasync(&self.file).await,
            Err(e) => Err(e),
        };
        res.map_err(|source| StoreError::Io {
            volume: self.volume.clone(),
            op: "write activity log",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_detects_torn_writes() {
        let hot: BTreeSet<u64> = [1, 5, 200].into_iter().collect();
        let rec = encode(7, &hot);
        assert_eq!(decode(&rec), Some((7, hot.clone())));
        let mut torn = rec.clone();
        torn[HEADER_BYTES] ^= 0xff;
        assert_eq!(decode(&torn), None);
        assert_eq!(decode(&vec![0u8; SLOT_BYTES]), None);
    }
}
