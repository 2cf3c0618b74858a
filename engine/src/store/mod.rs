//! The local replica store: one replica of one volume on this node's pool.
//!
//! A replica is three files in the pool directory:
//!
//! * `<id>.data`: the volume's bytes, a sparse file of the volume's size.
//! * `<id>.crc`: a crc32 (crc32fast) for every 4 KiB block, little endian, sparse. One 4 KiB
//!   page of this file covers one 4 MiB *region* of data.
//! * `<id>.al`: the activity log, the set of *hot* regions whose checksums on disk may be
//!   stale (see [`activity_log`]).
//! * `<id>.suspect`, present only while the replica may not hold what a coordinator
//!   believes it holds ([`SUSPECT_UNCLEAN`], [`SUSPECT_CREATED`]): after an unclean stop, a
//!   failed fdatasync, or when its files were created empty. It survives restarts, and
//!   only a coordinator's full comparison clears it ([`Replica::clear_suspect`]).
//!
//! Invariants this module keeps:
//! * A read never returns bytes that fail their checksum; it returns
//!   [`StoreError::ChecksumMismatch`] naming the volume and the block.
//! * A write is applied to data and checksum under an exclusive lock on its block range, so
//!   concurrent overlapping writes cannot interleave inside a block.
//! * After `kill -9` (or power loss) every flushed write reads back, and no block reports a
//!   false checksum error: checksums of every region that could have been written since the
//!   last checkpoint are recomputed from the data at open.
//! * Allocation is thin: a block takes pool space when it is first written, and a write that
//!   would need more space than the pool has fails before it touches anything.
//!
//! A block whose stored checksum is 0 and whose data is all zeros is a block that was never
//! written (or was trimmed): the crc file is sparse, so unwritten entries read as 0.

mod activity_log;
pub mod group_sync;
mod layers;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::io::IoEngine;
use crate::range_lock::RangeLock;
use activity_log::ActivityLog;
pub use layers::SnapshotLayer;

/// Checksum granularity. 4 KiB matches the page size and the block size that databases and
/// filesystems write in, so a normal write needs no read-modify-write.
pub const BLOCK_SIZE: usize = 4096;
/// Blocks per region: one 4 KiB page of crc32s.
pub const BLOCKS_PER_REGION: u64 = (BLOCK_SIZE / 4) as u64;
/// Activity-log granularity: 4 MiB, the same extent size as DRBD's activity log.
pub const REGION_SIZE: u64 = BLOCKS_PER_REGION * BLOCK_SIZE as u64;
/// Most regions that may be hot at once: 1024 x 4 MiB = 4 GiB, close to DRBD's default
/// activity log (1237 extents). It bounds the re-read at recovery after a crash, and it is
/// the working set that random writes can touch without activity-log fsyncs (a smaller log
/// measurably thrashed under random writes over 2 GiB, docs/BENCHMARKS.md).
pub const AL_MAX_HOT_REGIONS: usize = 1024;

/// Most regions one write or zeroing enters the activity log with at once; the store
/// splits a wider zeroing (a whole-device discard) into pieces of this many regions.
pub const AL_MAX_REGIONS_PER_BEGIN: usize = 64;
/// [`Replica::suspect`] flag: the replica was recovered after an unclean stop, or an
/// fdatasync failed: writes it acknowledged and did not make durable may be gone.
pub const SUSPECT_UNCLEAN: u64 = 1;
/// [`Replica::suspect`] flag: its files did not exist when it was opened (a new replica, or
/// a missing pool mount, a replaced disk, deleted files): it holds nothing.
pub const SUSPECT_CREATED: u64 = 2;

/// Largest single I/O the store accepts (the NBD maximum payload we advertise).
pub const MAX_IO_BYTES: usize = 32 << 20;

/// Errors of the replica store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("volume {volume}: block {block} (byte offset {offset}) failed its checksum (stored crc32 {expected:#010x}, data has {actual:#010x})")]
    ChecksumMismatch {
        volume: String,
        block: u64,
        offset: u64,
        expected: u32,
        actual: u32,
    },
    #[error("volume {volume}: {len} bytes at offset {offset} reach past the end of the volume ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("volume {volume}: I/O of {len} bytes is larger than the maximum of {max} bytes")]
    TooLarge {
        volume: String,
        len: u64,
        max: usize,
    },
    #[error("pool is full (ENOSPC): volume {volume} needs {needed_bytes} more bytes, the pool has {free_bytes} of {size_bytes} bytes free")]
    PoolFull {
        volume: String,
        needed_bytes: u64,
        free_bytes: u64,
        size_bytes: u64,
    },
    #[error(
        "volume {volume}: cannot shrink from {from_bytes} to {to_bytes} bytes; volumes only grow"
    )]
    Shrink {
        volume: String,
        from_bytes: u64,
        to_bytes: u64,
    },
    #[error("volume {volume}: {op}: {source}")]
    Io {
        volume: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("volume {volume}: activity log is corrupt: {reason}")]
    ActivityLogCorrupt { volume: String, reason: String },
    #[error("volume {volume}: the layer manifest is corrupt: {reason}")]
    ManifestCorrupt { volume: String, reason: String },
    #[error("volume {volume}: no snapshot '{snapshot}' on this replica")]
    NoSuchSnapshot { volume: String, snapshot: String },
    #[error("volume {volume}: {max} snapshots is the most a replica holds")]
    TooManySnapshots { volume: String, max: usize },
    #[error("volume {volume}: a snapshot was sealed but the replica could not switch to its new head; it serves no I/O until it is reopened, which finishes the switch")]
    Poisoned { volume: String },
}

impl StoreError {
    /// The errno an I/O frontend reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::ChecksumMismatch { .. } => libc::EIO,
            StoreError::OutOfRange { .. } | StoreError::TooLarge { .. } => libc::EINVAL,
            StoreError::PoolFull { .. } => libc::ENOSPC,
            StoreError::Shrink { .. } => libc::EINVAL,
            StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            StoreError::ActivityLogCorrupt { .. }
            | StoreError::ManifestCorrupt { .. }
            | StoreError::Poisoned { .. } => libc::EIO,
            StoreError::NoSuchSnapshot { .. } => libc::ENOENT,
            StoreError::TooManySnapshots { .. } => libc::ENOSPC,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A node's storage pool: a directory and a capacity that replicas allocate from.
pub struct Pool {
    dir: PathBuf,
    size_bytes: u64,
    allocated_bytes: AtomicU64,
    engine: IoEngine,
}

impl Pool {
    /// Opens (creating if needed) the pool directory.
    pub fn open(dir: &Path, size_bytes: u64, engine: IoEngine) -> io::Result<Arc<Pool>> {
        std::fs::create_dir_all(dir)?;
        Ok(Arc::new(Pool {
            dir: dir.to_path_buf(),
            size_bytes,
            allocated_bytes: AtomicU64::new(0),
            engine,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn engine(&self) -> &IoEngine {
        &self.engine
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes.load(Ordering::Relaxed)
    }

    fn reserve(&self, volume: &str, bytes: u64) -> Result<()> {
        let mut cur = self.allocated_bytes.load(Ordering::Relaxed);
        loop {
            let free = self.size_bytes.saturating_sub(cur);
            if bytes > free {
                return Err(StoreError::PoolFull {
                    volume: volume.to_string(),
                    needed_bytes: bytes,
                    free_bytes: free,
                    size_bytes: self.size_bytes,
                });
            }
            match self.allocated_bytes.compare_exchange_weak(
                cur,
                cur + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    fn release(&self, bytes: u64) {
        self.allocated_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    /// Opens the replica `id` (creating its files when they do not exist), recovering hot
    /// regions left by a crash. `name` is the volume name used in error messages.
    pub async fn open_replica(
        self: &Arc<Self>,
        id: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<Arc<Replica>> {
        Replica::open(self.clone(), id, name, size_bytes).await
    }

    /// Removes a replica's files, its snapshots' included. The replica must be closed; its
    /// space returns to the pool.
    pub fn delete_replica(&self, replica: &Replica) -> io::Result<()> {
        let layers = replica.layer_files();
        for ext in layers
            .iter()
            .map(String::as_str)
            .chain(["layers", "data", "crc", "al", "suspect"])
        {
            match std::fs::remove_file(self.path(&replica.id, ext)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.release(replica.allocated_bytes());
        replica.allocated_blocks.store(0, Ordering::Relaxed);
        replica.layer_blocks.store(0, Ordering::Relaxed);
        Ok(())
    }
}

/// Checksums and allocation bits of one 4 MiB region, created on first use so that a thin
/// volume costs memory in proportion to what was written.
struct RegionChunk {
    crc: Box<[AtomicU32]>,
    alloc: [AtomicU64; (BLOCKS_PER_REGION / 64) as usize],
    /// Checksums changed since they were last written to the crc file.
    dirty: AtomicBool,
}

impl RegionChunk {
    fn new() -> Box<RegionChunk> {
        Box::new(RegionChunk {
            crc: (0..BLOCKS_PER_REGION).map(|_| AtomicU32::new(0)).collect(),
            alloc: std::array::from_fn(|_| AtomicU64::new(0)),
            dirty: AtomicBool::new(false),
        })
    }

    fn is_allocated(&self, idx: usize) -> bool {
        self.alloc[idx / 64].load(Ordering::Acquire) & (1 << (idx % 64)) != 0
    }

    fn set_allocated(&self, idx: usize, on: bool) {
        if on {
            self.alloc[idx / 64].fetch_or(1 << (idx % 64), Ordering::AcqRel);
        } else {
            self.alloc[idx / 64].fetch_and(!(1 << (idx % 64)), Ordering::AcqRel);
        }
    }

    fn crc_page(&self) -> Vec<u8> {
        let mut page = Vec::with_capacity(BLOCK_SIZE);
        for c in self.crc.iter() {
            page.extend_from_slice(&c.load(Ordering::Acquire).to_le_bytes());
        }
        page
    }
}

/// Block-address translation and per-block metadata. This is the one place that maps a
/// volume block to where its bytes and checksum live; snapshot layers will slot in here.
struct Tables {
    size_bytes: u64,
    regions: Vec<OnceLock<Box<RegionChunk>>>,
    /// The replica's sealed layers (snapshots), oldest first; empty for a layer's own
    /// tables. Reads of a block the head does not hold fall through them, newest first.
    sealed: Vec<Arc<layers::Layer>>,
}

impl Tables {
    fn new(size_bytes: u64) -> Tables {
        let n = size_bytes.div_ceil(REGION_SIZE) as usize;
        Tables {
            size_bytes,
            regions: (0..n).map(|_| OnceLock::new()).collect(),
            sealed: Vec::new(),
        }
    }

    fn chunk(&self, block: u64) -> Option<&RegionChunk> {
        // Checked: a sealed layer is as large as the volume was when it was sealed.
        self.regions
            .get((block / BLOCKS_PER_REGION) as usize)?
            .get()
            .map(|b| &**b)
    }

    fn chunk_or_init(&self, block: u64) -> &RegionChunk {
        self.regions[(block / BLOCKS_PER_REGION) as usize].get_or_init(RegionChunk::new)
    }

    fn stored_crc(&self, block: u64) -> u32 {
        self.chunk(block)
            .map(|c| c.crc[(block % BLOCKS_PER_REGION) as usize].load(Ordering::Acquire))
            .unwrap_or(0)
    }

    fn is_allocated(&self, block: u64) -> bool {
        self.chunk(block)
            .map(|c| c.is_allocated((block % BLOCKS_PER_REGION) as usize))
            .unwrap_or(false)
    }
}

/// One replica of one volume in the local pool.
pub struct Replica {
    id: String,
    name: String,
    pool: Arc<Pool>,
    engine: IoEngine,
    /// The head layer's data and crc files. A seal swaps them (under the tables' write
    /// lock, so no I/O is in flight); everything else clones the handle it needs.
    head: std::sync::RwLock<HeadFiles>,
    tables: tokio::sync::RwLock<Tables>,
    range_lock: RangeLock,
    al: ActivityLog,
    allocated_blocks: AtomicU64,
    checksum_errors: AtomicU64,
    recovered_regions: AtomicU64,
    /// [`SUSPECT_UNCLEAN`] | [`SUSPECT_CREATED`], as persisted in `<id>.suspect`.
    suspect_flags: AtomicU64,
    /// Bumped whenever a flag is set, so a clear only removes what its comparison saw.
    suspect_epoch: AtomicU64,
    suspect_lock: std::sync::Mutex<()>,
    /// Concurrent flushes share one `fdatasync` of the data file.
    flushes: group_sync::SyncGroup,
    /// Seals and merges, one at a time.
    layer_op: tokio::sync::Mutex<()>,
    /// The layer manifest as last committed (`<id>.layers`).
    manifest: std::sync::Mutex<layers::Manifest>,
    /// Blocks held by sealed layers (the head's are `allocated_blocks`).
    layer_blocks: AtomicU64,
    /// A seal committed its layer and could not switch to the new head: every I/O fails
    /// until the replica is reopened (which finishes the switch), so nothing writes into
    /// the sealed layer.
    poisoned: AtomicBool,
}

struct HeadFiles {
    data: Arc<File>,
    crc: Arc<File>,
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Checks a block against its stored checksum. A stored 0 with all-zero data is a block
/// that was never written.
fn block_matches(data: &[u8], stored: u32) -> Result<(), u32> {
    let actual = crc32fast::hash(data);
    if actual == stored || (stored == 0 && data.iter().all(|b| *b == 0)) {
        Ok(())
    } else {
        Err(actual)
    }
}

/// The digest replicas are compared by (resync, verify, reconciliation): the first 8
/// bytes of the block's SHA-256. Not the crc32 the store keeps per block: one random block
/// in 2^32 shares its crc32 with a zero block (about one per 16 TiB written), and a
/// comparison that trusts such a match leaves the block uncopied.
pub fn block_digest(block: &[u8]) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(block);
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// [`block_digest`] of a 4 KiB block of zeros: what [`Replica::checksums`] reports for a
/// block that was never written, so it compares equal to a written block of zeros.
pub fn zero_block_digest() -> u64 {
    static D: OnceLock<u64> = OnceLock::new();
    *D.get_or_init(|| block_digest(&[0u8; BLOCK_SIZE]))
}

/// Loads a layer's checksums (one crc page per region that has any) and its allocation
/// (the data file's extents). Returns the tables and the number of allocated blocks, or
/// the failed step and its error.
async fn load_tables(
    engine: &IoEngine,
    data: &Arc<File>,
    crc_file: &Arc<File>,
    size_bytes: u64,
) -> std::result::Result<(Tables, u64), (&'static str, io::Error)> {
    let tables = Tables::new(size_bytes);
    let crc_len = crc_file.metadata().map_err(|e| ("stat crc file", e))?.len();
    let crc_extents = engine
        .data_extents(crc_file, crc_len)
        .map_err(|e| ("scan crc file", e))?;
    for (start, end) in crc_extents {
        let first = start / BLOCK_SIZE as u64;
        let last = end.div_ceil(BLOCK_SIZE as u64);
        for region in first..last {
            if region as usize >= tables.regions.len() {
                break;
            }
            let (res, page) = engine
                .read_at(crc_file, vec![0; BLOCK_SIZE], region * BLOCK_SIZE as u64)
                .await;
            res.map_err(|e| ("read crc file", e))?;
            let chunk = tables.regions[region as usize].get_or_init(RegionChunk::new);
            for (i, c) in page.chunks_exact(4).enumerate() {
                chunk.crc[i].store(
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    Ordering::Relaxed,
                );
            }
        }
    }
    let mut allocated = 0u64;
    let data_extents = engine
        .data_extents(data, size_bytes)
        .map_err(|e| ("scan data file", e))?;
    for (start, end) in data_extents {
        let first = start / BLOCK_SIZE as u64;
        let last = end
            .div_ceil(BLOCK_SIZE as u64)
            .min(size_bytes.div_ceil(BLOCK_SIZE as u64));
        for block in first..last {
            let chunk = tables.chunk_or_init(block);
            let idx = (block % BLOCKS_PER_REGION) as usize;
            if !chunk.is_allocated(idx) {
                chunk.set_allocated(idx, true);
                allocated += 1;
            }
        }
    }
    Ok((tables, allocated))
}

impl Replica {
    async fn open(pool: Arc<Pool>, id: &str, name: &str, size_bytes: u64) -> Result<Arc<Replica>> {
        let io_err = |op: &'static str| {
            let name = name.to_string();
            move |source: io::Error| StoreError::Io {
                volume: name.clone(),
                op,
                source,
            }
        };
        // Layers first: a seal that crashed half-way is finished or undone before the head
        // files are opened (`layers::recover`).
        let (manifest, sealed) = layers::recover(&pool, id, name).await?;
        let created = !pool.path(id, "data").exists();
        let data = open_rw(&pool.path(id, "data")).map_err(io_err("open data file"))?;
        let crc_file = open_rw(&pool.path(id, "crc")).map_err(io_err("open crc file"))?;
        let al_file = open_rw(&pool.path(id, "al")).map_err(io_err("open activity log"))?;
        let engine = pool.engine.clone();
        let cur_len = data.metadata().map_err(io_err("stat data file"))?.len();
        if cur_len < size_bytes {
            engine
                .set_len(&data, size_bytes)
                .map_err(io_err("size data file"))?;
        }
        let data = Arc::new(data);
        let crc_file = Arc::new(crc_file);
        let (mut tables, allocated) = load_tables(&engine, &data, &crc_file, size_bytes)
            .await
            .map_err(|(op, e)| io_err(op)(e))?;
        let layer_blocks: u64 = sealed
            .iter()
            .map(|l| l.allocated_blocks.load(Ordering::Relaxed))
            .sum();
        tables.sealed = sealed;
        pool.allocated_bytes.fetch_add(
            (allocated + layer_blocks) * BLOCK_SIZE as u64,
            Ordering::AcqRel,
        );

        let region_count = tables.regions.len() as u64;
        let (al, recovery) = ActivityLog::open(al_file, name, engine.clone())?;
        let hot: BTreeSet<u64> = match recovery {
            activity_log::Recovery::Regions(set) => set,
            activity_log::Recovery::All => (0..region_count).collect(),
        };
        let replica = Arc::new(Replica {
            id: id.to_string(),
            name: name.to_string(),
            pool,
            engine,
            head: std::sync::RwLock::new(HeadFiles {
                data,
                crc: crc_file,
            }),
            tables: tokio::sync::RwLock::new(tables),
            range_lock: RangeLock::default(),
            al,
            allocated_blocks: AtomicU64::new(allocated),
            checksum_errors: AtomicU64::new(0),
            recovered_regions: AtomicU64::new(0),
            suspect_flags: AtomicU64::new(0),
            suspect_epoch: AtomicU64::new(0),
            suspect_lock: std::sync::Mutex::new(()),
            flushes: group_sync::SyncGroup::default(),
            layer_op: tokio::sync::Mutex::new(()),
            manifest: std::sync::Mutex::new(manifest),
            layer_blocks: AtomicU64::new(layer_blocks),
            poisoned: AtomicBool::new(false),
        });
        let persisted = match std::fs::read(replica.pool.path(id, "suspect")) {
            Ok(b) if b.len() >= 8 => u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
            Ok(_) => SUSPECT_UNCLEAN, // torn: the safe side
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(replica.io_err("read suspect marker", e)),
        };
        if persisted != 0 {
            replica.suspect_flags.store(persisted, Ordering::Release);
            replica.suspect_epoch.store(1, Ordering::Release);
        }
        if created {
            replica
                .mark_suspect(SUSPECT_CREATED)
                .map_err(|e| replica.io_err("write suspect marker", e))?;
        }
        if !hot.is_empty() {
            replica
                .mark_suspect(SUSPECT_UNCLEAN)
                .map_err(|e| replica.io_err("write suspect marker", e))?;
            replica.recover(hot).await?;
        }
        Ok(replica)
    }

    /// Recomputes the checksums of regions that were hot when the store last stopped. Their
    /// data may be newer than their checksums on disk (or, for a write in flight at the crash,
    /// partly old and partly new); the data is what the volume holds, so it wins.
    async fn recover(&self, hot: BTreeSet<u64>) -> Result<()> {
        let tables = self.tables.read().await;
        let mut n = 0u64;
        for &region in &hot {
            if region as usize >= tables.regions.len() {
                continue;
            }
            let start = region * REGION_SIZE;
            let len = REGION_SIZE.min(tables.size_bytes - start) as usize;
            let (res, buf) = self.engine.read_at(&self.data(), vec![0; len], start).await;
            res.map_err(|source| self.io_err("read data for recovery", source))?;
            let chunk = tables.regions[region as usize].get_or_init(RegionChunk::new);
            for (i, block) in buf.chunks(BLOCK_SIZE).enumerate() {
                let crc = if chunk.is_allocated(i) {
                    crc32fast::hash(block)
                } else {
                    0
                };
                chunk.crc[i].store(crc, Ordering::Release);
            }
            chunk.dirty.store(true, Ordering::Release);
            n += 1;
        }
        drop(tables);
        self.recovered_regions.store(n, Ordering::Relaxed);
        tracing::info!(volume = %self.name, regions = n, "recovered checksums of hot regions after an unclean stop");
        self.checkpoint().await
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> StoreError {
        StoreError::Io {
            volume: self.name.clone(),
            op,
            source,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn size_bytes(&self) -> u64 {
        self.tables.read().await.size_bytes
    }

    /// Bytes this replica takes from the pool: the head's blocks and every sealed layer's.
    pub fn allocated_bytes(&self) -> u64 {
        (self.allocated_blocks.load(Ordering::Relaxed) + self.layer_blocks.load(Ordering::Relaxed))
            * BLOCK_SIZE as u64
    }

    /// Blocks that failed their checksum on read since open.
    pub fn checksum_errors(&self) -> u64 {
        self.checksum_errors.load(Ordering::Relaxed)
    }

    /// Regions whose checksums were recomputed at open after an unclean stop.
    pub fn recovered_regions(&self) -> u64 {
        self.recovered_regions.load(Ordering::Relaxed)
    }

    /// (flags, epoch): why the replica may not hold what its coordinator believes
    /// ([`SUSPECT_UNCLEAN`], [`SUSPECT_CREATED`]; 0 when it is trusted), and the epoch a
    /// [`Replica::clear_suspect`] must name.
    pub fn suspect(&self) -> (u64, u64) {
        let _l = self.suspect_lock.lock().unwrap_or_else(|e| e.into_inner());
        (
            self.suspect_flags.load(Ordering::Acquire),
            self.suspect_epoch.load(Ordering::Acquire),
        )
    }

    /// Sets `flag` durably (the marker file and its directory entry are synced).
    fn mark_suspect(&self, flag: u64) -> io::Result<()> {
        let _l = self.suspect_lock.lock().unwrap_or_else(|e| e.into_inner());
        let flags = self.suspect_flags.load(Ordering::Acquire) | flag;
        let path = self.pool.path(&self.id, "suspect");
        {
            let f = File::create(&path)?;
            std::os::unix::fs::FileExt::write_all_at(&f, &flags.to_le_bytes(), 0)?;
            f.sync_all()?;
        }
        File::open(&self.pool.dir)?.sync_all()?;
        self.suspect_flags.store(flags, Ordering::Release);
        self.suspect_epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// An fdatasync failed: remember it across restarts (best effort: the failure itself
    /// is reported to the caller either way, and the coordinator ejects the replica).
    fn sync_failed(&self, e: io::Error, op: &'static str) -> StoreError {
        if let Err(me) = self.mark_suspect(SUSPECT_UNCLEAN) {
            tracing::error!(volume = %self.name, error = %me, "cannot persist the suspect marker after a failed fdatasync");
        }
        self.io_err(op, e)
    }

    /// A coordinator compared every block of this replica with an in-sync copy, under the
    /// suspect `epoch` it read at `Open`: the flags are cleared, unless something set a
    /// flag since (then this returns false and they stay).
    pub fn clear_suspect(&self, epoch: u64) -> Result<bool> {
        let _l = self.suspect_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.suspect_epoch.load(Ordering::Acquire) != epoch {
            return Ok(false);
        }
        if self.suspect_flags.load(Ordering::Acquire) == 0 {
            return Ok(true);
        }
        let path = self.pool.path(&self.id, "suspect");
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io_err("remove suspect marker", e)),
        }
        File::open(&self.pool.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io_err("sync pool directory", e))?;
        self.suspect_flags.store(0, Ordering::Release);
        Ok(true)
    }

    pub fn engine(&self) -> &IoEngine {
        &self.engine
    }

    /// The head's data file.
    fn data(&self) -> Arc<File> {
        self.head
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .data
            .clone()
    }

    /// The head's crc file.
    fn crc_file(&self) -> Arc<File> {
        self.head
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .crc
            .clone()
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned {
                volume: self.name.clone(),
            });
        }
        Ok(())
    }

    fn check_range(&self, tables: &Tables, offset: u64, len: u64) -> Result<()> {
        self.check_usable()?;
        if len > MAX_IO_BYTES as u64 {
            return Err(StoreError::TooLarge {
                volume: self.name.clone(),
                len,
                max: MAX_IO_BYTES,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > tables.size_bytes)
        {
            return Err(StoreError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                size: tables.size_bytes,
            });
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`, verifying every block's checksum.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let tables = self.tables.read().await;
        self.check_range(&tables, offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs;
        let last = (offset + len as u64).div_ceil(bs);
        let aligned_off = first * bs;
        let aligned_len = ((last - first) * bs) as usize;
        let mut buf = self.read_visible(&tables, first, last, true).await?;
        let skip = (offset - aligned_off) as usize;
        if skip == 0 && aligned_len == len {
            return Ok(buf);
        }
        buf.drain(..skip);
        buf.truncate(len);
        Ok(buf)
    }

    /// A block that failed its checksum (in the head, or in `layer`): counted and logged;
    /// with `strict`, the read's error.
    fn bad_block(
        &self,
        b: u64,
        expected: u32,
        actual: u32,
        layer: Option<&str>,
        strict: bool,
    ) -> Result<()> {
        self.checksum_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(volume = %self.name, block = b, expected, actual, snapshot = layer.unwrap_or("-"), "checksum mismatch on read");
        if !strict {
            return Ok(());
        }
        Err(StoreError::ChecksumMismatch {
            volume: self.name.clone(),
            block: b,
            offset: b * BLOCK_SIZE as u64,
            expected,
            actual,
        })
    }

    /// The volume's bytes of blocks `[first, last)` as the head sees them: the head's own
    /// blocks, then for every block the head does not hold, the newest sealed layer that
    /// does, else zeros. Every block is checked against its layer's stored checksum. A head
    /// block that fails is read again under its lock (a write may sit between its data and
    /// its checksum); if it still fails, `strict` makes it an error, otherwise it is
    /// counted, logged and returned as it is (for comparisons, which then find it).
    async fn read_visible(
        &self,
        tables: &Tables,
        first: u64,
        last: u64,
        strict: bool,
    ) -> Result<Vec<u8>> {
        let bs = BLOCK_SIZE as u64;
        let aligned_off = first * bs;
        let aligned_len = ((last - first) * bs) as usize;
        let any_allocated = (first..last).any(|b| tables.is_allocated(b));
        let mut buf = if any_allocated {
            let (res, buf) = self
                .engine
                .read_at(&self.data(), vec![0; aligned_len], aligned_off)
                .await;
            res.map_err(|e| self.io_err("read data", e))?;
            buf
        } else {
            vec![0; aligned_len]
        };
        // Blocks the head does not hold, to look up in the sealed layers.
        let mut below = Vec::new();
        for (i, block) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
            let b = first + i as u64;
            if !tables.is_allocated(b) {
                // Never written, or trimmed: zeros, whatever the filesystem holds.
                block.fill(0);
                below.push(b);
                continue;
            }
            if block_matches(block, tables.stored_crc(b)).is_ok() {
                continue;
            }
            // A write to this block may have been between its data and its checksum update.
            // Re-read under the block's lock before calling it corruption.
            let _guard = self.range_lock.lock(b, b + 1).await;
            let (res, fresh) = self
                .engine
                .read_at(&self.data(), vec![0; BLOCK_SIZE], b * bs)
                .await;
            res.map_err(|e| self.io_err("read data", e))?;
            if !tables.is_allocated(b) {
                block.fill(0);
                below.push(b);
                continue;
            }
            let stored = tables.stored_crc(b);
            if let Err(actual) = block_matches(&fresh, stored) {
                self.bad_block(b, stored, actual, None, strict)?;
            }
            block.copy_from_slice(&fresh);
        }
        if !tables.sealed.is_empty() && !below.is_empty() {
            self.fill_from_layers(&tables.sealed, first, &mut buf, &below, strict)
                .await?;
        }
        Ok(buf)
    }

    /// The [`block_digest`] of every 4 KiB block covering `[offset, offset + len)`, one per
    /// block in order, computed from the bytes the store holds: what replication compares
    /// to decide whether two replicas hold the same data (resync, verify, reconciliation).
    ///
    /// * A never-written (or trimmed) block reports [`zero_block_digest`], so it compares
    ///   equal to a block that was written with zeros elsewhere.
    /// * A block whose bytes fail their stored checksum (after a re-check under the block's
    ///   lock, as in [`Replica::read`]) is counted in [`Replica::checksum_errors`] and logged,
    ///   and reports the digest of its bytes as they are. Those differ from a good replica's,
    ///   so a comparison finds the block and copies a good version over it; the corrupt
    ///   bytes themselves are never returned.
    ///
    /// At most [`MAX_IO_BYTES`] per call. Reads data only where blocks are allocated.
    pub async fn checksums(&self, offset: u64, len: u64) -> Result<Vec<u64>> {
        let tables = self.tables.read().await;
        self.check_range(&tables, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs;
        let last = (offset + len).div_ceil(bs);
        let zero = zero_block_digest();
        if tables.sealed.is_empty() && !(first..last).any(|b| tables.is_allocated(b)) {
            return Ok(vec![zero; (last - first) as usize]);
        }
        let buf = self.read_visible(&tables, first, last, false).await?;
        Ok(buf
            .chunks(BLOCK_SIZE)
            .map(|block| {
                if block.iter().all(|x| *x == 0) {
                    zero
                } else {
                    block_digest(block)
                }
            })
            .collect())
    }

    /// Writes `data` at `offset`. With `fua` the write is durable when this returns.
    /// `data` may be shared (the coordinator hands one buffer to every replica): the std
    /// engine writes it as it is, without a copy.
    pub async fn write(&self, offset: u64, data: impl Into<bytes::Bytes>, fua: bool) -> Result<()> {
        let data: bytes::Bytes = data.into();
        let tables = self.tables.read().await;
        self.check_range(&tables, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs;
        let last = (offset + data.len() as u64).div_ceil(bs);
        let _guard = self.range_lock.lock(first, last).await;
        let _al = self.al_begin(&tables, first, last).await?;

        let aligned_off = first * bs;
        let aligned_len = ((last - first) * bs) as usize;
        let buf = if aligned_off == offset && aligned_len == data.len() {
            self.reserve_blocks(&tables, first, last)?;
            data
        } else {
            // Read-modify-write of the partial head and tail blocks, read before the
            // blocks are reserved: a block the head does not hold yet is read from the
            // sealed layers.
            let mut buf = vec![0u8; aligned_len];
            let head = (offset - aligned_off) as usize;
            for b in [first, last - 1] {
                let i = ((b - first) * bs) as usize;
                let old = self.read_block_locked(&tables, b).await?;
                buf[i..i + BLOCK_SIZE].copy_from_slice(&old);
            }
            self.reserve_blocks(&tables, first, last)?;
            buf[head..head + data.len()].copy_from_slice(&data);
            bytes::Bytes::from(buf)
        };
        self.write_blocks_locked(&tables, first, buf).await?;
        if fua {
            // Concurrent FUA writes and flushes share one fdatasync.
            self.flush().await?;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`. Whole blocks are deallocated (a hole is punched and
    /// their space returns to the pool); partial blocks at the edges are written with zeros.
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_usable()?;
        let tables = self.tables.read().await;
        // Zeroing sends no payload, so it may cover more than one I/O's worth.
        if offset
            .checked_add(len)
            .is_none_or(|end| end > tables.size_bytes)
        {
            return Err(StoreError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len,
                size: tables.size_bytes,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let bs = BLOCK_SIZE as u64;
        let end = offset + len;
        let full_first = offset.div_ceil(bs);
        let full_last = end / bs;
        // Edges that are not whole blocks.
        let mut edges = Vec::new();
        if full_first > full_last {
            edges.push((offset, len));
        } else {
            if offset < full_first * bs {
                edges.push((offset, full_first * bs - offset));
            }
            if end > full_last * bs {
                edges.push((full_last * bs, end - full_last * bs));
            }
        }
        drop(tables);
        for (off, l) in edges {
            self.write(off, vec![0; l as usize], false).await?;
        }
        // Whole blocks, a piece of at most AL_MAX_REGIONS_PER_BEGIN regions at a time.
        let piece_blocks = AL_MAX_REGIONS_PER_BEGIN as u64 * BLOCKS_PER_REGION;
        let mut b0 = full_first;
        while b0 < full_last {
            let b1 = ((b0 / piece_blocks + 1) * piece_blocks).min(full_last);
            self.punch_blocks(b0, b1).await?;
            b0 = b1;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Deallocates whole blocks `[first, last)`, within AL_MAX_REGIONS_PER_BEGIN regions.
    async fn punch_blocks(&self, first: u64, last: u64) -> Result<()> {
        let bs = BLOCK_SIZE as u64;
        let tables = self.tables.read().await;
        let _guard = self.range_lock.lock(first, last).await;
        let _al = self.al_begin(&tables, first, last).await?;
        // Runs of blocks a sealed layer holds, and runs no layer does. A hole in the head
        // would show the layer's block: those get zeros written in place, never a hole
        // first (a power loss between the two would bring the old block back).
        let shadowed = |b: u64| tables.sealed.iter().any(|l| l.tables.is_allocated(b));
        let mut b = first;
        while b < last {
            let kind = shadowed(b);
            let mut end = b + 1;
            // At most 1 MiB of zeros per write.
            while end < last && shadowed(end) == kind && (!kind || end - b < 256) {
                end += 1;
            }
            if kind {
                self.reserve_blocks(&tables, b, end)?;
                let zeros = bytes::Bytes::from(vec![0u8; ((end - b) * bs) as usize]);
                self.write_blocks_locked(&tables, b, zeros).await?;
            } else {
                self.punch_run(&tables, b, end)?;
            }
            b = end;
        }
        Ok(())
    }

    /// Punches a hole over blocks `[first, last)` of the head and frees them; the caller
    /// holds their range lock and activity-log entry.
    fn punch_run(&self, tables: &Tables, first: u64, last: u64) -> Result<()> {
        let bs = BLOCK_SIZE as u64;
        self.engine
            .punch_hole(&self.data(), first * bs, (last - first) * bs)
            .map_err(|e| self.io_err("punch hole", e))?;
        let mut freed = 0u64;
        for b in first..last {
            if let Some(chunk) = tables.chunk(b) {
                let idx = (b % BLOCKS_PER_REGION) as usize;
                if chunk.is_allocated(idx) {
                    chunk.set_allocated(idx, false);
                    freed += 1;
                }
                chunk.crc[idx].store(0, Ordering::Release);
                chunk.dirty.store(true, Ordering::Release);
            }
        }
        self.allocated_blocks.fetch_sub(freed, Ordering::AcqRel);
        self.pool.release(freed * bs);
        Ok(())
    }

    /// Makes every completed write durable (fdatasync of the data file). Checksums need no
    /// sync here: every region written since the last checkpoint is hot in the activity log
    /// and is recomputed from the (durable) data after a crash. Concurrent flushes share
    /// one `fdatasync` ([`group_sync`]).
    pub async fn flush(&self) -> Result<()> {
        self.flushes
            .sync(|| async {
                // The head as it is when this sync starts: a seal syncs the old head before
                // it switches, so a flush that arrives after the switch needs only the new.
                let data = self.data();
                self.engine.fdatasync(&data).await
            })
            .await
            .map_err(|e| self.sync_failed(e, "fdatasync data"))
    }

    /// Grows the volume. Waits for in-flight I/O to drain.
    pub async fn resize(&self, new_size_bytes: u64) -> Result<()> {
        let mut tables = self.tables.write().await;
        if new_size_bytes < tables.size_bytes {
            return Err(StoreError::Shrink {
                volume: self.name.clone(),
                from_bytes: tables.size_bytes,
                to_bytes: new_size_bytes,
            });
        }
        if new_size_bytes == tables.size_bytes {
            return Ok(());
        }
        self.engine
            .set_len(&self.data(), new_size_bytes)
            .map_err(|e| self.io_err("grow data file", e))?;
        let n = new_size_bytes.div_ceil(REGION_SIZE) as usize;
        tables.regions.resize_with(n, OnceLock::new);
        tables.size_bytes = new_size_bytes;
        Ok(())
    }

    /// Writes checksums to disk and retires hot regions with no write in flight. After a
    /// checkpoint, recovery has nothing to recompute for the retired regions.
    pub async fn checkpoint(&self) -> Result<()> {
        let tables = self.tables.read().await;
        self.al.checkpoint(|| self.persist_crcs(&tables)).await
    }

    /// Clean shutdown: data and checksums durable, activity log empty.
    pub async fn close(&self) -> Result<()> {
        self.flush().await?;
        self.checkpoint().await
    }

    async fn persist_crcs(&self, tables: &Tables) -> Result<()> {
        self.engine
            .fdatasync(&self.data())
            .await
            .map_err(|e| self.sync_failed(e, "fdatasync data"))?;
        let mut wrote = false;
        for (region, slot) in tables.regions.iter().enumerate() {
            let Some(chunk) = slot.get() else { continue };
            if !chunk.dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let page = chunk.crc_page();
            let (res, _) = self
                .engine
                .write_at(&self.crc_file(), page, region as u64 * BLOCK_SIZE as u64)
                .await;
            if let Err(e) = res {
                chunk.dirty.store(true, Ordering::Release);
                return Err(self.io_err("write crc file", e));
            }
            wrote = true;
        }
        if wrote {
            self.engine
                .fdatasync(&self.crc_file())
                .await
                .map_err(|e| self.sync_failed(e, "fdatasync crc file"))?;
        }
        Ok(())
    }

    async fn al_begin(
        &self,
        tables: &Tables,
        first: u64,
        last: u64,
    ) -> Result<activity_log::AlGuard<'_>> {
        let r0 = first / BLOCKS_PER_REGION;
        let r1 = (last - 1) / BLOCKS_PER_REGION;
        self.al.begin(r0..=r1, || self.persist_crcs(tables)).await
    }

    fn reserve_blocks(&self, tables: &Tables, first: u64, last: u64) -> Result<()> {
        let new = (first..last).filter(|&b| !tables.is_allocated(b)).count() as u64;
        if new == 0 {
            return Ok(());
        }
        self.pool.reserve(&self.name, new * BLOCK_SIZE as u64)?;
        for b in first..last {
            tables
                .chunk_or_init(b)
                .set_allocated((b % BLOCKS_PER_REGION) as usize, true);
        }
        self.allocated_blocks.fetch_add(new, Ordering::AcqRel);
        Ok(())
    }

    /// Reads and verifies one block; the caller holds the block's range lock.
    async fn read_block_locked(&self, tables: &Tables, b: u64) -> Result<Vec<u8>> {
        if !tables.sealed.is_empty() && !tables.is_allocated(b) {
            let mut buf = vec![0; BLOCK_SIZE];
            self.fill_from_layers(&tables.sealed, b, &mut buf, &[b], true)
                .await?;
            return Ok(buf);
        }
        let (res, buf) = self
            .engine
            .read_at(&self.data(), vec![0; BLOCK_SIZE], b * BLOCK_SIZE as u64)
            .await;
        res.map_err(|e| self.io_err("read data", e))?;
        let stored = tables.stored_crc(b);
        if let Err(actual) = block_matches(&buf, stored) {
            self.checksum_errors.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::ChecksumMismatch {
                volume: self.name.clone(),
                block: b,
                offset: b * BLOCK_SIZE as u64,
                expected: stored,
                actual,
            });
        }
        Ok(buf)
    }

    async fn write_blocks_locked(
        &self,
        tables: &Tables,
        first: u64,
        buf: bytes::Bytes,
    ) -> Result<()> {
        let crcs: Vec<u32> = buf.chunks(BLOCK_SIZE).map(crc32fast::hash).collect();
        let res = self
            .engine
            .write_bytes_at(&self.data(), buf, first * BLOCK_SIZE as u64)
            .await;
        res.map_err(|e| self.io_err("write data", e))?;
        for (i, crc) in crcs.into_iter().enumerate() {
            let b = first + i as u64;
            let chunk = tables.chunk_or_init(b);
            chunk.crc[(b % BLOCKS_PER_REGION) as usize].store(crc, Ordering::Release);
            chunk.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_support;
