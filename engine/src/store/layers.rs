//! Snapshot layers of a replica: redirect-on-write, as Longhorn's chain of differencing
//! files and Vitastor's `parent_id` layers.
//!
//! A replica is a chain: its sealed layers, oldest first, and the writable head (the files
//! of [`super`]). A layer holds the blocks written while it was the head, each with its
//! crc32, in its own pair of files:
//!
//! * `<id>.s<seq>.data`, `<id>.s<seq>.crc`: a sealed layer, read-only. `seq` grows by one
//!   per seal and is never reused.
//! * `<id>.layers`: the manifest (JSON), the list of sealed layers and the snapshot each
//!   one is, and a merge in progress. It is replaced whole (write a temporary, fsync,
//!   rename, fsync the directory): that rename is the commit point of every change to the
//!   chain.
//!
//! **Reads** of a block take it from the newest layer that holds it (the head first), or
//! zeros. A snapshot's view is the same walk starting at its layer. A layer's allocation
//! is its data file's extents, as for the head; its checksums live in memory as the head's
//! do (4 bytes per 4 KiB block held, plus 128 bytes per 4 MiB region a layer touches).
//!
//! **Writes** go to the head only. A partial block not in the head is read from the layers
//! below first; zeroing a block that a layer below holds writes zeros into the head
//! instead of punching a hole (a hole would show the old block again).
//!
//! **Seal** (taking a snapshot) is O(1) and copies no data. Under the tables' write lock
//! (no I/O in flight): checkpoint the head (data and checksums durable, activity log
//! retired), hard-link its files to the new layer's names, create empty files for the new
//! head, commit the manifest, rename the new files over the head's names. A crash before
//! the commit leaves stray links, which [`recover`] removes (the head still holds
//! everything); a crash after it leaves the head sharing an inode with the newest layer,
//! which [`recover`] replaces by an empty head.
//!
//! **Delete** merges the layer into the next newer one: its blocks that the newer layer
//! does not hold are copied up, so every view stays the same. The newest sealed layer
//! cannot merge into the live head without making a copy of a durable block that a crash
//! could tear, so it is only *hidden* (no longer listed) and merges when a newer seal
//! gives it a sealed successor (at the next delete or [`Replica::compact`]). A merge is
//! marked in the manifest before it copies; the copy is idempotent, and [`recover`]
//! finishes one that a crash interrupted.

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use super::*;

/// Most sealed layers (visible and hidden) a replica holds.
pub const MAX_LAYERS: usize = 128;

/// Largest copy of a merge, in blocks (1 MiB).
const MERGE_RUN: u64 = 256;

/// The chain as committed in `<id>.layers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Manifest {
    pub next_seq: u64,
    /// Oldest first.
    pub layers: Vec<LayerEntry>,
    /// A merge in progress: the layer `from` is being copied into the layer `into`.
    #[serde(default)]
    pub merging: Option<Merging>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct LayerEntry {
    pub seq: u64,
    pub snapshot: String,
    pub size_bytes: u64,
    /// Deleted, and waiting for a sealed successor to merge into.
    #[serde(default)]
    pub hidden: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Merging {
    pub from: u64,
    pub into: u64,
}

/// One sealed layer in memory.
pub(super) struct Layer {
    pub seq: u64,
    pub snapshot: String,
    pub size_bytes: u64,
    pub hidden: AtomicBool,
    pub data: Arc<File>,
    pub crc_file: Arc<File>,
    pub tables: Tables,
    pub allocated_blocks: AtomicU64,
}

/// What a replica holds of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLayer {
    pub snapshot: String,
    /// Seal order on this replica.
    pub seq: u64,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
    /// Bytes this snapshot's own layer holds (what it changed since the one before).
    pub allocated_bytes: u64,
}

/// Maps an I/O error of step `op` on volume `name` to the store's error.
fn io_err(name: &str, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let volume = name.to_string();
    move |source| StoreError::Io { volume, op, source }
}

fn ext(seq: u64, what: &str) -> String {
    format!("s{seq}.{what}")
}

fn sync_dir(pool: &Pool) -> io::Result<()> {
    File::open(&pool.dir)?.sync_all()
}

fn write_manifest(pool: &Pool, id: &str, m: &Manifest) -> io::Result<()> {
    let tmp = pool.path(id, "layers.tmp");
    {
        let f = File::create(&tmp)?;
        let body = serde_json::to_vec_pretty(m).expect("the manifest serializes");
        std::os::unix::fs::FileExt::write_all_at(&f, &body, 0)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, pool.path(id, "layers"))?;
    sync_dir(pool)
}

fn read_manifest(pool: &Pool, id: &str, name: &str) -> Result<Manifest> {
    match std::fs::read(pool.path(id, "layers")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::ManifestCorrupt {
            volume: name.to_string(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(e) => Err(StoreError::Io {
            volume: name.to_string(),
            op: "read layer manifest",
            source: e,
        }),
    }
}

fn same_inode(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    Ok(ma.ino() == mb.ino() && ma.dev() == mb.dev())
}

fn remove_if_present(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Brings a replica's chain to a committed state before it is opened, and opens its
/// sealed layers: removes the links of a seal that did not commit, replaces a head that
/// still shares its inode with the newest layer (a seal that committed and did not
/// switch), and finishes a merge that a crash interrupted.
pub(super) async fn recover(
    pool: &Arc<Pool>,
    id: &str,
    name: &str,
) -> Result<(Manifest, Vec<Arc<Layer>>)> {
    let mut m = read_manifest(pool, id, name)?;
    // Links of a seal that crashed before its commit.
    let prefix = format!("{id}.s");
    let dir = std::fs::read_dir(&pool.dir).map_err(io_err(name, "list pool directory"))?;
    for entry in dir {
        let entry = entry.map_err(io_err(name, "list pool directory"))?;
        let fname = entry.file_name();
        let Some(rest) = fname.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let Some((seq, what)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(seq), true) = (seq.parse::<u64>(), what == "data" || what == "crc") else {
            continue;
        };
        if !m.layers.iter().any(|l| l.seq == seq) {
            tracing::info!(
                volume = name,
                seq,
                "removing the files of a seal that did not commit"
            );
            remove_if_present(&entry.path()).map_err(io_err(name, "remove uncommitted layer"))?;
        }
    }
    // A seal that committed and crashed before its switch: the head is still the layer.
    if let Some(newest) = m.layers.last() {
        for what in ["data", "crc"] {
            let head = pool.path(id, what);
            let layer = pool.path(id, &ext(newest.seq, what));
            if head.exists() && same_inode(&head, &layer).map_err(io_err(name, "stat layer"))? {
                tracing::info!(
                    volume = name,
                    seq = newest.seq,
                    file = what,
                    "finishing a seal: the head gets its own empty file"
                );
                let fresh = pool.path(id, &format!("{what}.new"));
                File::create(&fresh)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(name, "create head file"))?;
                std::fs::rename(&fresh, &head).map_err(io_err(name, "switch head file"))?;
                sync_dir(pool).map_err(io_err(name, "sync pool directory"))?;
            }
        }
    }
    for what in ["data.new", "crc.new", "layers.tmp"] {
        remove_if_present(&pool.path(id, what)).map_err(io_err(name, "remove leftover file"))?;
    }
    let mut layers = Vec::with_capacity(m.layers.len());
    for e in &m.layers {
        layers.push(Arc::new(open_layer(pool, id, name, e).await?));
    }
    if let Some(mg) = m.merging {
        let from = layers.iter().find(|l| l.seq == mg.from).cloned();
        let into = layers.iter().find(|l| l.seq == mg.into).cloned();
        match (from, into) {
            (Some(from), Some(into)) => {
                tracing::info!(
                    volume = name,
                    from = mg.from,
                    into = mg.into,
                    "finishing a merge that a crash interrupted"
                );
                let added = merge_blocks(&pool.engine, name, &from, &into).await?;
                into.allocated_blocks.fetch_add(added, Ordering::AcqRel);
                m.layers.retain(|l| l.seq != mg.from);
                m.merging = None;
                write_manifest(pool, id, &m).map_err(io_err(name, "write layer manifest"))?;
                layers.retain(|l| l.seq != mg.from);
                for what in ["data", "crc"] {
                    remove_if_present(&pool.path(id, &ext(mg.from, what)))
                        .map_err(io_err(name, "remove merged layer"))?;
                }
            }
            _ => {
                return Err(StoreError::ManifestCorrupt {
                    volume: name.to_string(),
                    reason: format!(
                        "a merge of layer {} into {} names a missing layer",
                        mg.from, mg.into
                    ),
                })
            }
        }
    }
    Ok((m, layers))
}

async fn open_layer(pool: &Pool, id: &str, name: &str, e: &LayerEntry) -> Result<Layer> {
    let open = |what: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(pool.path(id, &ext(e.seq, what)))
    };
    let data = Arc::new(open("data").map_err(io_err(name, "open layer data file"))?);
    let crc_file = Arc::new(open("crc").map_err(io_err(name, "open layer crc file"))?);
    let (tables, allocated) = load_tables(&pool.engine, &data, &crc_file, e.size_bytes)
        .await
        .map_err(|(op, err)| io_err(name, op)(err))?;
    Ok(Layer {
        seq: e.seq,
        snapshot: e.snapshot.clone(),
        size_bytes: e.size_bytes,
        hidden: AtomicBool::new(e.hidden),
        data,
        crc_file,
        tables,
        allocated_blocks: AtomicU64::new(allocated),
    })
}

/// Copies every block of `from` that `into` does not hold into `into` (data, fdatasync,
/// then checksums, fdatasync), and returns how many blocks `into` gained. Idempotent: a
/// block `into` holds with a stored checksum of 0 and data that do not hash to 0 is one
/// whose copy a crash cut before its checksum, and is copied again. Touches no pool
/// accounting (the caller's business).
async fn merge_blocks(engine: &IoEngine, name: &str, from: &Layer, into: &Layer) -> Result<u64> {
    let bs = BLOCK_SIZE as u64;
    let mut copied: Vec<(u64, u32)> = Vec::new();
    for (r, slot) in from.tables.regions.iter().enumerate() {
        let Some(chunk) = slot.get() else { continue };
        let mut needed = Vec::new();
        for idx in 0..BLOCKS_PER_REGION as usize {
            if !chunk.is_allocated(idx) {
                continue;
            }
            let b = r as u64 * BLOCKS_PER_REGION + idx as u64;
            if !into.tables.is_allocated(b) {
                needed.push(b);
            } else if into.tables.stored_crc(b) == 0 {
                let (res, block) = engine
                    .read_at(&into.data, vec![0; BLOCK_SIZE], b * bs)
                    .await;
                res.map_err(io_err(name, "read layer data"))?;
                if crc32fast::hash(&block) != 0 && block.iter().any(|x| *x != 0) {
                    needed.push(b);
                }
            }
        }
        let mut i = 0;
        while i < needed.len() {
            let start = needed[i];
            let mut n = 1;
            while i + (n as usize) < needed.len()
                && needed[i + n as usize] == start + n
                && n < MERGE_RUN
            {
                n += 1;
            }
            let (res, buf) = engine
                .read_at(&from.data, vec![0; (n * bs) as usize], start * bs)
                .await;
            res.map_err(io_err(name, "read layer data"))?;
            for (j, block) in buf.chunks(BLOCK_SIZE).enumerate() {
                let b = start + j as u64;
                let stored = from.tables.stored_crc(b);
                if let Err(actual) = block_matches(block, stored) {
                    return Err(StoreError::ChecksumMismatch {
                        volume: name.to_string(),
                        block: b,
                        offset: b * bs,
                        expected: stored,
                        actual,
                    });
                }
                copied.push((b, stored));
            }
            let (res, _) = engine.write_at(&into.data, buf, start * bs).await;
            res.map_err(io_err(name, "write layer data"))?;
            i += n as usize;
        }
    }
    if copied.is_empty() {
        return Ok(0);
    }
    engine
        .fdatasync(&into.data)
        .await
        .map_err(io_err(name, "fdatasync layer data"))?;
    let mut added = 0;
    let mut regions = BTreeSet::new();
    for &(b, crc) in &copied {
        let chunk = into.tables.chunk_or_init(b);
        let idx = (b % BLOCKS_PER_REGION) as usize;
        chunk.crc[idx].store(crc, Ordering::Release);
        if !chunk.is_allocated(idx) {
            chunk.set_allocated(idx, true);
            added += 1;
        }
        regions.insert(b / BLOCKS_PER_REGION);
    }
    for r in regions {
        let page = into.tables.regions[r as usize]
            .get()
            .expect("initialised above")
            .crc_page();
        let (res, _) = engine
            .write_at(&into.crc_file, page, r * BLOCK_SIZE as u64)
            .await;
        res.map_err(io_err(name, "write layer crc file"))?;
    }
    engine
        .fdatasync(&into.crc_file)
        .await
        .map_err(io_err(name, "fdatasync layer crc file"))?;
    Ok(added)
}

impl Replica {
    /// Fills the blocks `blocks` of `buf` (which starts at block `first`) from the newest
    /// layer of `stack` that holds each one, or with zeros, checking each against its
    /// layer's checksum: a mismatch is an error when `strict`, and otherwise counted,
    /// logged and returned as it is (as [`Replica::checksums`] wants). `blocks` ascend.
    pub(super) async fn fill_from_layers(
        &self,
        stack: &[Arc<Layer>],
        first: u64,
        buf: &mut [u8],
        blocks: &[u64],
        strict: bool,
    ) -> Result<()> {
        let bs = BLOCK_SIZE as u64;
        // Runs of consecutive blocks from one layer: (layer index, first block, count).
        let mut runs: Vec<(usize, u64, u64)> = Vec::new();
        for &b in blocks {
            let at = ((b - first) * bs) as usize;
            let Some(src) = stack.iter().rposition(|l| l.tables.is_allocated(b)) else {
                buf[at..at + BLOCK_SIZE].fill(0);
                continue;
            };
            match runs.last_mut() {
                Some((l, start, n)) if *l == src && *start + *n == b && *n < MERGE_RUN => *n += 1,
                _ => runs.push((src, b, 1)),
            }
        }
        for (l, start, n) in runs {
            let layer = &stack[l];
            let (res, data) = self
                .engine
                .read_at(&layer.data, vec![0; (n * bs) as usize], start * bs)
                .await;
            res.map_err(|e| self.io_err("read layer data", e))?;
            for (j, block) in data.chunks(BLOCK_SIZE).enumerate() {
                let b = start + j as u64;
                let stored = layer.tables.stored_crc(b);
                if let Err(actual) = block_matches(block, stored) {
                    self.bad_block(b, stored, actual, Some(&layer.snapshot), strict)?;
                }
                let at = ((b - first) * bs) as usize;
                buf[at..at + BLOCK_SIZE].copy_from_slice(block);
            }
        }
        Ok(())
    }

    /// The file name suffixes of every sealed layer (for [`Pool::delete_replica`]).
    pub(super) fn layer_files(&self) -> Vec<String> {
        let m = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        m.layers
            .iter()
            .flat_map(|l| [ext(l.seq, "data"), ext(l.seq, "crc")])
            .collect()
    }

    fn commit_manifest(&self, m: Manifest) -> Result<()> {
        write_manifest(&self.pool, &self.id, &m)
            .map_err(|e| self.io_err("write layer manifest", e))?;
        *self.manifest.lock().unwrap_or_else(|e| e.into_inner()) = m;
        Ok(())
    }

    /// Seals the head as snapshot `snapshot` and starts an empty head: O(1), no data copied
    /// (module docs). Every write that completed before the call is in the snapshot, and
    /// none that starts after it. Returns false, and changes nothing, when this replica
    /// already holds the snapshot.
    pub async fn seal(&self, snapshot: &str) -> Result<bool> {
        self.check_usable()?;
        let _op = self.layer_op.lock().await;
        let mut tables = self.tables.write().await;
        let mut m = self
            .manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if m.layers.iter().any(|l| l.snapshot == snapshot && !l.hidden) {
            return Ok(false);
        }
        if m.layers.len() >= MAX_LAYERS {
            return Err(StoreError::TooManySnapshots {
                volume: self.name.clone(),
                max: MAX_LAYERS,
            });
        }
        // The head durable, its checksums on disk, its activity log retired.
        self.al.checkpoint(|| self.persist_crcs(&tables)).await?;
        let seq = m.next_seq.max(1);
        let (id, pool) = (&self.id, &self.pool);
        let new_files = || -> io::Result<()> {
            for what in ["data", "crc"] {
                let l = pool.path(id, &ext(seq, what));
                remove_if_present(&l)?;
                std::fs::hard_link(pool.path(id, what), &l)?;
            }
            let data = File::create(pool.path(id, "data.new"))?;
            data.set_len(tables.size_bytes)?;
            data.sync_all()?;
            File::create(pool.path(id, "crc.new"))?.sync_all()?;
            sync_dir(pool)
        };
        if let Err(e) = new_files() {
            for what in ["data", "crc"] {
                let _ = remove_if_present(&pool.path(id, &ext(seq, what)));
            }
            return Err(self.io_err("prepare layer files", e));
        }
        m.layers.push(LayerEntry {
            seq,
            snapshot: snapshot.to_string(),
            size_bytes: tables.size_bytes,
            hidden: false,
        });
        m.next_seq = seq + 1;
        // The commit point.
        if let Err(e) = self.commit_manifest(m) {
            for what in ["data", "crc", "data.new", "crc.new"] {
                let w = if what.ends_with(".new") {
                    what.to_string()
                } else {
                    ext(seq, what)
                };
                let _ = remove_if_present(&pool.path(id, &w));
            }
            return Err(e);
        }
        let switch = || -> io::Result<(File, File)> {
            for what in ["data", "crc"] {
                std::fs::rename(pool.path(id, &format!("{what}.new")), pool.path(id, what))?;
            }
            sync_dir(pool)?;
            Ok((
                open_rw(&pool.path(id, "data"))?,
                open_rw(&pool.path(id, "crc"))?,
            ))
        };
        let (data, crc) = match switch() {
            Ok(f) => f,
            Err(e) => {
                // The head's names may already point at new files while memory still
                // describes the old head: no I/O until a reopen finishes the switch.
                self.poisoned.store(true, Ordering::Release);
                tracing::error!(volume = %self.name, seq, error = %e, "a sealed snapshot could not switch to its new head");
                return Err(self.io_err("switch to the new head", e));
            }
        };
        let old = {
            let mut head = self.head.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(
                &mut *head,
                HeadFiles {
                    data: Arc::new(data),
                    crc: Arc::new(crc),
                },
            )
        };
        let fresh = Tables::new(tables.size_bytes);
        let regions = std::mem::replace(&mut tables.regions, fresh.regions);
        let blocks = self.allocated_blocks.swap(0, Ordering::AcqRel);
        self.layer_blocks.fetch_add(blocks, Ordering::AcqRel);
        let size_bytes = tables.size_bytes;
        tables.sealed.push(Arc::new(Layer {
            seq,
            snapshot: snapshot.to_string(),
            size_bytes,
            hidden: AtomicBool::new(false),
            data: old.data,
            crc_file: old.crc,
            tables: Tables {
                size_bytes,
                regions,
                sealed: Vec::new(),
            },
            allocated_blocks: AtomicU64::new(blocks),
        }));
        tracing::info!(volume = %self.name, snapshot, seq, blocks, "snapshot sealed");
        Ok(true)
    }

    /// The snapshots this replica holds, oldest first (hidden layers are not snapshots).
    pub async fn snapshots(&self) -> Vec<SnapshotLayer> {
        let tables = self.tables.read().await;
        tables
            .sealed
            .iter()
            .filter(|l| !l.hidden.load(Ordering::Acquire))
            .map(|l| SnapshotLayer {
                snapshot: l.snapshot.clone(),
                seq: l.seq,
                size_bytes: l.size_bytes,
                allocated_bytes: l.allocated_blocks.load(Ordering::Relaxed) * BLOCK_SIZE as u64,
            })
            .collect()
    }

    fn layer_index(&self, tables: &Tables, snapshot: &str) -> Result<usize> {
        tables
            .sealed
            .iter()
            .position(|l| l.snapshot == snapshot && !l.hidden.load(Ordering::Acquire))
            .ok_or_else(|| StoreError::NoSuchSnapshot {
                volume: self.name.clone(),
                snapshot: snapshot.to_string(),
            })
    }

    /// Reads `len` bytes at `offset` of the volume as it was when `snapshot` was sealed.
    pub async fn read_snapshot(&self, snapshot: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check_usable()?;
        let tables = self.tables.read().await;
        let i = self.layer_index(&tables, snapshot)?;
        let size = tables.sealed[i].size_bytes;
        if len > MAX_IO_BYTES || offset.checked_add(len as u64).is_none_or(|e| e > size) {
            return Err(StoreError::OutOfRange {
                volume: self.name.clone(),
                offset,
                len: len as u64,
                size,
            });
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = BLOCK_SIZE as u64;
        let (first, last) = (offset / bs, (offset + len as u64).div_ceil(bs));
        let mut buf = vec![0; ((last - first) * bs) as usize];
        let blocks: Vec<u64> = (first..last).collect();
        self.fill_from_layers(&tables.sealed[..=i], first, &mut buf, &blocks, true)
            .await?;
        let skip = (offset - first * bs) as usize;
        buf.drain(..skip);
        buf.truncate(len);
        Ok(buf)
    }

    /// The block ranges `(offset, len)` in bytes that were written after snapshot `from`
    /// (or since the volume was created, for `None`) up to and including snapshot `to`:
    /// the blocks held by the layers in between. Ascending, adjacent ranges merged. A
    /// block written and later zeroed is listed (it reads as zeros in `to`).
    pub async fn changed_blocks(&self, from: Option<&str>, to: &str) -> Result<Vec<(u64, u64)>> {
        let tables = self.tables.read().await;
        let hi = self.layer_index(&tables, to)?;
        let lo = match from {
            Some(f) => {
                let lo = self.layer_index(&tables, f)?;
                if lo >= hi {
                    return Err(StoreError::NoSuchSnapshot {
                        volume: self.name.clone(),
                        snapshot: format!("{f} (not older than {to})"),
                    });
                }
                lo + 1
            }
            None => 0,
        };
        let layers = &tables.sealed[lo..=hi];
        let blocks = tables.sealed[hi].size_bytes.div_ceil(BLOCK_SIZE as u64);
        let bs = BLOCK_SIZE as u64;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in 0..blocks.div_ceil(BLOCKS_PER_REGION) {
            if !layers.iter().any(|l| {
                l.tables
                    .regions
                    .get(r as usize)
                    .is_some_and(|s| s.get().is_some())
            }) {
                continue;
            }
            let end = ((r + 1) * BLOCKS_PER_REGION).min(blocks);
            for b in r * BLOCKS_PER_REGION..end {
                if !layers.iter().any(|l| l.tables.is_allocated(b)) {
                    continue;
                }
                match out.last_mut() {
                    Some((off, len)) if *off + *len == b * bs => *len += bs,
                    _ => out.push((b * bs, bs)),
                }
            }
        }
        Ok(out)
    }

    /// Deletes snapshot `snapshot` from this replica: merges its layer into the next newer
    /// one, or, for the newest, hides it until a newer seal lets it merge (module docs).
    /// Returns false when the replica does not hold it (already deleted).
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<bool> {
        self.check_usable()?;
        {
            let _op = self.layer_op.lock().await;
            let tables = self.tables.read().await;
            let Ok(i) = self.layer_index(&tables, snapshot) else {
                return Ok(false);
            };
            let seq = tables.sealed[i].seq;
            let mut m = self
                .manifest
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for l in m.layers.iter_mut().filter(|l| l.seq == seq) {
                l.hidden = true;
            }
            self.commit_manifest(m)?;
            tables.sealed[i].hidden.store(true, Ordering::Release);
        }
        self.compact().await?;
        Ok(true)
    }

    /// Merges every hidden layer that has a sealed successor into it, oldest first.
    pub async fn compact(&self) -> Result<()> {
        loop {
            let _op = self.layer_op.lock().await;
            let (from, into) = {
                let tables = self.tables.read().await;
                let n = tables.sealed.len();
                match (0..n.saturating_sub(1))
                    .find(|&i| tables.sealed[i].hidden.load(Ordering::Acquire))
                {
                    Some(i) => (tables.sealed[i].clone(), tables.sealed[i + 1].clone()),
                    None => return Ok(()),
                }
            };
            self.merge(&from, &into).await?;
        }
    }

    /// Merges sealed layer `from` into its successor `into`; the caller holds `layer_op`.
    async fn merge(&self, from: &Arc<Layer>, into: &Arc<Layer>) -> Result<()> {
        let bs = BLOCK_SIZE as u64;
        // Reserve what the copy may add before starting: a full pool fails here, cleanly.
        let upper: u64 = from.allocated_blocks.load(Ordering::Acquire);
        self.pool.reserve(&self.name, upper * bs)?;
        let mut m = self
            .manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        m.merging = Some(Merging {
            from: from.seq,
            into: into.seq,
        });
        if let Err(e) = self.commit_manifest(m.clone()) {
            self.pool.release(upper * bs);
            return Err(e);
        }
        let added = match merge_blocks(&self.engine, &self.name, from, into).await {
            Ok(a) => a,
            Err(e) => {
                self.pool.release(upper * bs);
                return Err(e);
            }
        };
        into.allocated_blocks.fetch_add(added, Ordering::AcqRel);
        self.pool.release((upper - added.min(upper)) * bs);
        m.layers.retain(|l| l.seq != from.seq);
        m.merging = None;
        let mut tables = self.tables.write().await;
        self.commit_manifest(m)?;
        tables.sealed.retain(|l| l.seq != from.seq);
        drop(tables);
        let freed = from.allocated_blocks.load(Ordering::Acquire);
        self.layer_blocks.fetch_add(added, Ordering::AcqRel);
        self.layer_blocks.fetch_sub(freed, Ordering::AcqRel);
        self.pool.release(freed * bs);
        for what in ["data", "crc"] {
            remove_if_present(&self.pool.path(&self.id, &ext(from.seq, what)))
                .map_err(|e| self.io_err("remove merged layer", e))?;
        }
        tracing::info!(volume = %self.name, snapshot = %from.snapshot, into = %into.snapshot, added, "snapshot layer merged");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
