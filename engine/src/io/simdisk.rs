//! The simulation's disk: what a node's files hold that is not durable yet.
//!
//! The files are real (a tmpfs), so the kernel keeps every write; a [`SimDisk`] keeps the
//! rest of the story. Before each write or punched hole it saves what the 4 KiB pages it
//! changes held (their *images*), and an `fdatasync` of a file forgets that file's images:
//! from then on its contents are durable. Two things can then happen to a node:
//!
//! * [`SimDisk::kill`] (`kill -9`): the process dies. Its page cache survives, so every
//!   completed write stays; every file it had open is dead, and an operation a task of
//!   the dead process still tries on one fails (the process is gone).
//! * [`SimDisk::power_loss`]: the files are dead too, and each page written since its
//!   file's last `fdatasync` goes back to what it held after some prefix of its writes (the
//!   page cache wrote it back at some moment, or never), and a page may be *torn*: its
//!   first sectors from one write, the rest from the one before, as when the device lost
//!   power in the middle of a page; except a write into a hole, which the filesystem
//!   records only once its data is written (ext4 ordered data, xfs), so such a page is
//!   either still a hole or the whole write. Which prefix, and where a tear falls, the caller's
//!   random source decides, so a seed replays exactly.
//!
//! File order is the order in which the engine first touched each file, never an inode
//! number or a hash, so the same seed draws the same numbers for the same pages. The disk
//! keeps every file it touched open, so a file descriptor it knows is never reused.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// The unit the page cache writes back.
pub const PAGE: u64 = 4096;
/// The unit a device writes atomically: a page can tear between two sectors.
pub const SECTOR: u64 = 512;

/// A page's contents at one moment.
#[derive(Clone, PartialEq, Eq)]
enum Image {
    /// A hole (or past the end of the file): reads as zeros, takes no space.
    Hole,
    Bytes(Vec<u8>),
}

/// One file (an inode: a file reopened after a crash is the same one).
struct Inode {
    /// A handle to write its old images back with.
    file: Arc<File>,
    /// Per page written since the file's last `fdatasync`: its images before each of
    /// those writes, oldest first.
    unsynced: BTreeMap<u64, Vec<Image>>,
}

#[derive(Default)]
struct State {
    /// In the order the engine first touched them.
    inodes: Vec<Inode>,
    by_inode: HashMap<(u64, u64), usize>,
    /// Every descriptor the engine saw, kept open so its number is never reused, and
    /// whether its process is dead.
    fds: HashMap<RawFd, (Arc<File>, bool)>,
}

/// What one [`SimDisk::power_loss`] did, for the simulation's trace.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PowerLoss {
    /// Pages that were not durable.
    pub unsynced_pages: u64,
    /// Of those, pages that went back to an older image.
    pub rolled_back: u64,
    /// Of those, pages torn between two images.
    pub torn: u64,
}

/// One node's disk in the simulation. See the module docs.
#[derive(Default)]
pub struct SimDisk {
    state: Mutex<State>,
}

impl SimDisk {
    pub fn new() -> Arc<SimDisk> {
        Arc::new(SimDisk::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The index of `file`'s inode, tracking both from now on; fails for a dead process's.
    fn track(state: &mut State, file: &Arc<File>) -> io::Result<usize> {
        use std::os::unix::fs::MetadataExt;
        let fd = file.as_raw_fd();
        match state.fds.get(&fd) {
            Some((_, true)) => return Err(Self::dead_error()),
            Some(_) => {}
            None => {
                state.fds.insert(fd, (file.clone(), false));
            }
        }
        let meta = file.metadata()?;
        let key = (meta.dev(), meta.ino());
        if let Some(&i) = state.by_inode.get(&key) {
            return Ok(i);
        }
        state.inodes.push(Inode {
            file: file.clone(),
            unsynced: BTreeMap::new(),
        });
        let i = state.inodes.len() - 1;
        state.by_inode.insert(key, i);
        Ok(i)
    }

    fn dead_error() -> io::Error {
        io::Error::other("the process that opened this file is dead (simulated kill)")
    }

    /// Fails when `file` belongs to a dead process.
    pub fn check(&self, file: &File) -> io::Result<()> {
        match self.lock().fds.get(&file.as_raw_fd()) {
            Some((_, true)) => Err(Self::dead_error()),
            _ => Ok(()),
        }
    }

    /// Saves the images of the pages `[offset, offset + len)` touches, before a write or a
    /// punched hole changes them.
    pub fn before_change(&self, file: &Arc<File>, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return self.check(file);
        }
        let mut state = self.lock();
        let i = Self::track(&mut state, file)?;
        let t = &mut state.inodes[i];
        let size = t.file.metadata()?.len();
        for page in offset / PAGE..(offset + len).div_ceil(PAGE) {
            let image = read_image(&t.file, page, size)?;
            t.unsynced.entry(page).or_default().push(image);
        }
        Ok(())
    }

    /// `fdatasync(2)` of `file`: its pages are durable from now on.
    pub fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        let mut state = self.lock();
        let i = Self::track(&mut state, file)?;
        file.sync_data()?;
        state.inodes[i].unsynced.clear();
        Ok(())
    }

    /// `kill -9` of the node's process: its files are dead; what it wrote stays.
    pub fn kill(&self) {
        let mut state = self.lock();
        for (_, dead) in state.fds.values_mut() {
            *dead = true;
        }
    }

    /// The node loses power: [`SimDisk::kill`], and every page that was not durable goes
    /// back to an image after some prefix of its writes, or is torn between two of them.
    /// `below(n)` draws a number in `0..n` from the caller's seeded source.
    pub fn power_loss(&self, below: &mut dyn FnMut(u64) -> u64) -> io::Result<PowerLoss> {
        self.kill();
        let mut state = self.lock();
        let mut out = PowerLoss::default();
        for t in &mut state.inodes {
            let unsynced = std::mem::take(&mut t.unsynced);
            let size = t.file.metadata()?.len();
            for (page, images) in unsynced {
                out.unsynced_pages += 1;
                let n = images.len() as u64;
                // How many of the page's writes reached the device, in order.
                let k = below(n + 1);
                if k == n {
                    continue;
                }
                out.rolled_back += 1;
                let older = images[k as usize].clone();
                // A tear: the page's first sectors from the write after, the rest older. Not
                // over a hole: a write into a hole allocates the block, and ext4 (ordered
                // data) and xfs record the allocation only once the block's data is on the
                // device, so after a power loss the block is either still a hole or holds
                // the whole write. (A snapshot layer below a head's hole relies on it: a
                // tear there would mix zeros into the old block it shadows.)
                let torn = below(4) == 1 && older != Image::Hole;
                if !torn {
                    write_image(&t.file, page, &older)?;
                    continue;
                }
                out.torn += 1;
                let newer = match images.get(k as usize + 1) {
                    Some(im) => im.clone(),
                    None => read_image(&t.file, page, size)?,
                };
                let cut = 1 + below(PAGE / SECTOR - 1);
                let mut bytes = bytes_of(&older);
                let newer = bytes_of(&newer);
                let at = (cut * SECTOR) as usize;
                bytes[..at].copy_from_slice(&newer[..at]);
                write_image(&t.file, page, &Image::Bytes(bytes))?;
            }
        }
        Ok(out)
    }
}

fn bytes_of(image: &Image) -> Vec<u8> {
    match image {
        Image::Hole => vec![0; PAGE as usize],
        Image::Bytes(b) => b.clone(),
    }
}

/// What page `page` of `file` (of `size` bytes) holds now.
fn read_image(file: &File, page: u64, size: u64) -> io::Result<Image> {
    let start = page * PAGE;
    if start >= size {
        return Ok(Image::Hole);
    }
    // SAFETY: lseek on a file we hold open.
    let data = unsafe { libc::lseek(file.as_raw_fd(), start as i64, libc::SEEK_DATA) };
    if data < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(Image::Hole);
        }
        return Err(err);
    }
    if data as u64 >= start + PAGE {
        return Ok(Image::Hole);
    }
    let mut buf = vec![0u8; PAGE as usize];
    let mut pos = 0usize;
    while pos < buf.len() {
        match file.read_at(&mut buf[pos..], start + pos as u64)? {
            0 => break, // past the end: zeros
            n => pos += n,
        }
    }
    Ok(Image::Bytes(buf))
}

fn write_image(file: &File, page: u64, image: &Image) -> io::Result<()> {
    match image {
        Image::Hole => super::punch_hole(file, page * PAGE, PAGE),
        Image::Bytes(b) => file.write_all_at(b, page * PAGE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoEngine;

    fn file(dir: &std::path::Path) -> Arc<File> {
        crate::io::tests::scratch_file(&dir.join("f"))
    }

    async fn read(engine: &IoEngine, f: &Arc<File>) -> Vec<u8> {
        let (res, buf) = engine.read_at(f, vec![0; 2 * PAGE as usize], 0).await;
        res.unwrap();
        buf
    }

    #[tokio::test]
    async fn synced_pages_survive_a_power_loss_and_unsynced_ones_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let disk = SimDisk::new();
        let engine = IoEngine::Simulated(disk.clone());
        let f = file(dir.path());
        let (res, _) = engine.write_at(&f, vec![1; PAGE as usize], 0).await;
        res.unwrap();
        engine.fdatasync(&f).await.unwrap();
        let (res, _) = engine.write_at(&f, vec![2; PAGE as usize], 0).await;
        res.unwrap();
        let (res, _) = engine.write_at(&f, vec![3; PAGE as usize], PAGE).await;
        res.unwrap();
        // "No write reached the device": every unsynced page goes back to before them.
        let loss = disk.power_loss(&mut |_| 0).unwrap();
        assert_eq!(loss.unsynced_pages, 2);
        assert_eq!(loss.rolled_back, 2);
        let again = Arc::new(File::open(dir.path().join("f")).unwrap());
        let back = read(&IoEngine::Std, &again).await;
        assert!(
            back[..PAGE as usize].iter().all(|b| *b == 1),
            "the synced page"
        );
        assert!(
            back[PAGE as usize..].iter().all(|b| *b == 0),
            "a hole again"
        );
        // The dead process's handle no longer works.
        let (res, _) = engine.read_at(&f, vec![0; 16], 0).await;
        assert!(res.is_err());
    }

    #[tokio::test]
    async fn a_page_goes_back_to_a_prefix_of_its_writes_or_tears_between_two() {
        let dir = tempfile::tempdir().unwrap();
        for (draws, expect_first, expect_rest) in [
            (vec![2u64, 0], 2u8, 2u8), // k = 2 of 3 writes: the second write's image
            (vec![1, 0], 1, 1),        // k = 1: the first write's
            (vec![3], 3, 3),           // k = 3: all of them reached the device
            (vec![1, 1, 2], 2, 1),     // k = 1, torn: 3 sectors of write 2, then write 1
        ] {
            let disk = SimDisk::new();
            let engine = IoEngine::Simulated(disk.clone());
            let f = file(dir.path());
            for v in 1..=3u8 {
                let (res, _) = engine.write_at(&f, vec![v; PAGE as usize], 0).await;
                res.unwrap();
            }
            let mut draws = draws.into_iter();
            disk.power_loss(&mut |n| {
                let d = draws.next().unwrap_or(0);
                assert!(d < n, "draw {d} out of 0..{n}");
                d
            })
            .unwrap();
            let again = Arc::new(File::open(dir.path().join("f")).unwrap());
            let back = read(&IoEngine::Std, &again).await;
            let at = if expect_first == expect_rest {
                0
            } else {
                3 * SECTOR as usize
            };
            assert!(back[..at].iter().all(|b| *b == expect_first));
            assert!(back[at..PAGE as usize].iter().all(|b| *b == expect_rest));
        }
    }

    #[tokio::test]
    async fn a_killed_process_keeps_its_writes_and_a_punched_hole_can_be_lost() {
        let dir = tempfile::tempdir().unwrap();
        let disk = SimDisk::new();
        let engine = IoEngine::Simulated(disk.clone());
        let f = file(dir.path());
        let (res, _) = engine.write_at(&f, vec![7; 2 * PAGE as usize], 0).await;
        res.unwrap();
        engine.fdatasync(&f).await.unwrap();
        engine.punch_hole(&f, 0, PAGE).unwrap();
        disk.kill();
        let again = Arc::new(File::open(dir.path().join("f")).unwrap());
        assert!(read(&IoEngine::Std, &again).await[..PAGE as usize]
            .iter()
            .all(|b| *b == 0));
        // The hole was never synced: a power loss may bring the old bytes back.
        disk.power_loss(&mut |_| 0).unwrap();
        assert!(read(&IoEngine::Std, &again).await.iter().all(|b| *b == 7));
    }
}
