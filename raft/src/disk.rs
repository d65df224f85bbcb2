//! Storage seam under the node-wide write-ahead log: a directory of append-only segment files.
//!
//! [`Disk`] is the only way the WAL touches storage, so the same WAL code runs on a real
//! filesystem ([`FileDisk`]) and on an in-memory twin ([`MemDisk`]) that models power loss:
//! bytes that were written but not synced are dropped by [`MemDisk::crash`].
//!
//! This module knows nothing about records, checksums or Raft. It must not buffer writes in a
//! way that makes `sync` lie: after `sync` (or `truncate`) returns, the covered bytes survive a
//! crash, and after `sync_dir` returns, segment creations and removals survive a crash.

use std::collections::{hash_map, BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Identifier of a segment; segments are replayed in ascending id order.
pub type SegmentId = u64;

/// File name prefix of a segment file.
const SEGMENT_PREFIX: &str = "wal-";
/// File name suffix of a segment file.
const SEGMENT_SUFFIX: &str = ".log";
/// Decimal digits in a segment file name, enough for any `u64` so names sort like ids.
const SEGMENT_ID_DIGITS: usize = 20;

/// A directory of append-only segments.
///
/// Implementations must make durability explicit: `append` alone promises nothing, `sync`
/// makes one segment's bytes durable, `sync_dir` makes creations and removals durable.
pub trait Disk: Send + 'static {
    /// Ids of every segment present, ascending.
    fn list(&mut self) -> io::Result<Vec<SegmentId>>;

    /// Creates a new, empty segment. Fails if it already exists.
    fn create(&mut self, segment: SegmentId) -> io::Result<()>;

    /// Appends `bytes` at the end of `segment`. Not durable until [`Disk::sync`].
    fn append(&mut self, segment: SegmentId, bytes: &[u8]) -> io::Result<()>;

    /// Makes every byte appended to `segment` so far durable (`fdatasync` on a real disk).
    fn sync(&mut self, segment: SegmentId) -> io::Result<()>;

    /// Reads the whole current content of `segment`, synced or not.
    fn read(&mut self, segment: SegmentId) -> io::Result<Vec<u8>>;

    /// Cuts `segment` down to `len` bytes and makes the result durable before returning.
    fn truncate(&mut self, segment: SegmentId, len: u64) -> io::Result<()>;

    /// Removes `segment`. Not durable until [`Disk::sync_dir`].
    fn remove(&mut self, segment: SegmentId) -> io::Result<()>;

    /// Makes segment creations and removals durable.
    fn sync_dir(&mut self) -> io::Result<()>;

    /// Number of successful durability barriers issued so far (`sync`, `truncate`, `sync_dir`).
    fn syncs(&self) -> u64;
}

/// Formats the file name of a segment, e.g. `wal-00000000000000000001.log`.
fn segment_file_name(segment: SegmentId) -> String {
    format!("{SEGMENT_PREFIX}{segment:0width$}{SEGMENT_SUFFIX}", width = SEGMENT_ID_DIGITS)
}

/// Parses a segment file name; `None` for any other file, which is then left alone.
fn parse_segment_file_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_ID_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segments stored as files in one directory of a real filesystem.
#[derive(Debug)]
pub struct FileDisk {
    dir: PathBuf,
    /// Append handles, opened lazily and kept so a sync hits the same open file.
    files: HashMap<SegmentId, File>,
    syncs: u64,
}

impl FileDisk {
    /// Opens (creating it if needed) the directory that holds the segments.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<FileDisk> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir)?;
            // Make the new directory itself durable, or a crash could lose every segment in it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(FileDisk { dir, files: HashMap::new(), syncs: 0 })
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the file backing `segment`.
    pub fn segment_path(&self, segment: SegmentId) -> PathBuf {
        self.dir.join(segment_file_name(segment))
    }

    fn handle(&mut self, segment: SegmentId) -> io::Result<&mut File> {
        match self.files.entry(segment) {
            hash_map::Entry::Occupied(open) => Ok(open.into_mut()),
            hash_map::Entry::Vacant(slot) => {
                let path = self.dir.join(segment_file_name(segment));
                Ok(slot.insert(OpenOptions::new().append(true).open(path)?))
            }
        }
    }
}

impl Disk for FileDisk {
    fn list(&mut self) -> io::Result<Vec<SegmentId>> {
        let mut segments = Vec::new();
        for dirent in fs::read_dir(&self.dir)? {
            let dirent = dirent?;
            if let Some(segment) = dirent.file_name().to_str().and_then(parse_segment_file_name) {
                segments.push(segment);
            }
        }
        segments.sort_unstable();
        Ok(segments)
    }

    fn create(&mut self, segment: SegmentId) -> io::Result<()> {
        let file = OpenOptions::new().append(true).create_new(true).open(self.segment_path(segment))?;
        self.files.insert(segment, file);
        Ok(())
    }

    fn append(&mut self, segment: SegmentId, bytes: &[u8]) -> io::Result<()> {
        self.handle(segment)?.write_all(bytes)
    }

    fn sync(&mut self, segment: SegmentId) -> io::Result<()> {
        // sync_data is fdatasync: it also flushes the file size, which is all the metadata an
        // append needs to be readable after a crash.
        self.handle(segment)?.sync_data()?;
        self.syncs += 1;
        Ok(())
    }

    fn read(&mut self, segment: SegmentId) -> io::Result<Vec<u8>> {
        fs::read(self.segment_path(segment))
    }

    fn truncate(&mut self, segment: SegmentId, len: u64) -> io::Result<()> {
        // Drop the cached append handle first; a fresh one is opened on the next append.
        self.files.remove(&segment);
        let file = OpenOptions::new().write(true).open(self.segment_path(segment))?;
        file.set_len(len)?;
        file.sync_all()?;
        self.syncs += 1;
        Ok(())
    }

    fn remove(&mut self, segment: SegmentId) -> io::Result<()> {
        self.files.remove(&segment);
        fs::remove_file(self.segment_path(segment))
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()?;
        self.syncs += 1;
        Ok(())
    }

    fn syncs(&self) -> u64 {
        self.syncs
    }
}

/// One in-memory segment: everything written, and how much of it a crash would keep.
#[derive(Debug, Default, Clone)]
struct MemSegment {
    data: Vec<u8>,
    synced_len: usize,
}

#[derive(Debug, Default)]
struct MemState {
    /// Contents of every segment that is listed now or would reappear after a crash.
    segments: BTreeMap<SegmentId, MemSegment>,
    /// Segments visible now.
    listed: BTreeSet<SegmentId>,
    /// Segments visible after a crash: the listing as of the last `sync_dir`.
    durable_listing: BTreeSet<SegmentId>,
    syncs: u64,
    /// While set, `sync` and `truncate` block: lets a test hold a write between append and sync.
    syncs_paused: bool,
    /// While set, `sync` and `truncate` fail: an injected disk fault.
    syncs_fail: bool,
    /// Crashes so far.
    crashes: u64,
}

#[derive(Debug, Default)]
struct MemShared {
    state: Mutex<MemState>,
    /// Signalled when `syncs_paused` is cleared.
    resumed: Condvar,
}

/// In-memory twin of [`FileDisk`] that models power loss.
///
/// Cloning yields another handle to the same disk, so a test (or a simulator) can keep one
/// handle, give a clone to a WAL, [`crash`](MemDisk::crash) the disk and open a new WAL on the
/// surviving bytes with a fresh clone.
///
/// A handle is bound to the power cycle in which it first performs a [`Disk`] operation, and a
/// crash kills every bound handle: their `Disk` operations fail from then on, so the writer
/// thread of a "powered off" WAL cannot touch the surviving disk. Clones start unbound, and
/// inspection methods (`segments`, `synced_image`, ...) never bind.
#[derive(Debug, Default)]
pub struct MemDisk {
    shared: Arc<MemShared>,
    /// `UNBOUND`, or one more than the crash count of the power cycle this handle is bound to.
    bound_to: AtomicU64,
}

/// `MemDisk::bound_to` of a handle that has not performed a `Disk` operation yet.
const UNBOUND: u64 = 0;

impl Clone for MemDisk {
    fn clone(&self) -> Self {
        MemDisk { shared: Arc::clone(&self.shared), bound_to: AtomicU64::new(UNBOUND) }
    }
}

impl MemDisk {
    /// An empty disk.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    fn state(&self) -> MutexGuard<'_, MemState> {
        // A panic while holding the lock cannot leave MemState half-updated in a way that
        // matters to a test, so keep going rather than cascade the panic.
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Like `state`, for a [`Disk`] operation: binds the handle to the current power cycle, or
    /// fails if a crash killed it.
    fn live_state(&self) -> io::Result<MutexGuard<'_, MemState>> {
        let state = self.state();
        check_power(&state, &self.bound_to)?;
        Ok(state)
    }

    /// Simulates power loss: unsynced bytes vanish, and the directory listing reverts to what
    /// the last `sync_dir` made durable (unsynced creations vanish, unsynced removals undo).
    /// Every handle that performed a `Disk` operation dies; the returned one is a fresh clone.
    pub fn crash(&self) -> MemDisk {
        let mut state = self.state();
        state.crashes += 1;
        let durable = state.durable_listing.clone();
        state.segments.retain(|segment, _| durable.contains(segment));
        for segment in state.segments.values_mut() {
            segment.data.truncate(segment.synced_len);
        }
        state.listed = durable;
        drop(state);
        self.clone()
    }

    /// While `paused`, every `sync`/`truncate` blocks until resumed. A crash while a sync is
    /// blocked loses whatever that sync would have made durable.
    pub fn pause_syncs(&self, paused: bool) {
        self.state().syncs_paused = paused;
        if !paused {
            self.shared.resumed.notify_all();
        }
    }

    /// While `fail` is set, every `sync`/`truncate` returns an error and makes nothing durable.
    pub fn fail_syncs(&self, fail: bool) {
        self.state().syncs_fail = fail;
    }

    /// Ids of the segments listed now, ascending.
    pub fn segments(&self) -> Vec<SegmentId> {
        self.state().listed.iter().copied().collect()
    }

    /// Current length of `segment` (synced or not), `None` if it is not listed.
    pub fn segment_len(&self, segment: SegmentId) -> Option<usize> {
        let state = self.state();
        if !state.listed.contains(&segment) {
            return None;
        }
        state.segments.get(&segment).map(|s| s.data.len())
    }

    /// Number of bytes of `segment` that would survive a crash right now.
    pub fn synced_len(&self, segment: SegmentId) -> Option<usize> {
        let state = self.state();
        if !state.durable_listing.contains(&segment) {
            return None;
        }
        state.segments.get(&segment).map(|s| s.synced_len)
    }

    /// What a crash right now would leave: every durably listed segment with its synced bytes.
    pub fn synced_image(&self) -> BTreeMap<SegmentId, Vec<u8>> {
        let state = self.state();
        state
            .durable_listing
            .iter()
            .filter_map(|id| {
                state.segments.get(id).map(|s| (*id, s.data[..s.synced_len.min(s.data.len())].to_vec()))
            })
            .collect()
    }

    /// Blocks while syncs are paused, then fails if syncs are set to fail or the disk crashed
    /// meanwhile.
    fn barrier(&self) -> io::Result<MutexGuard<'_, MemState>> {
        let mut state = self.live_state()?;
        while state.syncs_paused {
            state = self.shared.resumed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        check_power(&state, &self.bound_to)?;
        if state.syncs_fail {
            return Err(io::Error::other("injected sync failure"));
        }
        Ok(state)
    }
}

/// Binds an unbound handle to the current power cycle; fails if the handle belongs to an
/// earlier one. Called with the state locked, so it cannot race with a crash.
fn check_power(state: &MemState, bound_to: &AtomicU64) -> io::Result<()> {
    let current = state.crashes + 1;
    let bound = bound_to.load(Ordering::SeqCst);
    if bound == UNBOUND {
        bound_to.store(current, Ordering::SeqCst);
        Ok(())
    } else if bound == current {
        Ok(())
    } else {
        Err(io::Error::other("disk lost power since this handle was made"))
    }
}

fn not_found(segment: SegmentId) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("segment {segment} does not exist"))
}

/// Looks up a segment that is listed now.
fn listed_segment(state: &mut MemState, segment: SegmentId) -> io::Result<&mut MemSegment> {
    if !state.listed.contains(&segment) {
        return Err(not_found(segment));
    }
    state.segments.get_mut(&segment).ok_or_else(|| not_found(segment))
}

impl Disk for MemDisk {
    fn list(&mut self) -> io::Result<Vec<SegmentId>> {
        Ok(self.live_state()?.listed.iter().copied().collect())
    }

    fn create(&mut self, segment: SegmentId) -> io::Result<()> {
        let mut state = self.live_state()?;
        if state.listed.contains(&segment) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("segment {segment} already exists"),
            ));
        }
        state.listed.insert(segment);
        // A removed-but-not-yet-durably-removed segment of the same id is replaced for good.
        state.durable_listing.remove(&segment);
        state.segments.insert(segment, MemSegment::default());
        Ok(())
    }

    fn append(&mut self, segment: SegmentId, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.live_state()?;
        listed_segment(&mut state, segment)?.data.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self, segment: SegmentId) -> io::Result<()> {
        let mut state = self.barrier()?;
        let seg = listed_segment(&mut state, segment)?;
        seg.synced_len = seg.data.len();
        state.syncs += 1;
        Ok(())
    }

    fn read(&mut self, segment: SegmentId) -> io::Result<Vec<u8>> {
        let mut state = self.live_state()?;
        Ok(listed_segment(&mut state, segment)?.data.clone())
    }

    fn truncate(&mut self, segment: SegmentId, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        let mut state = self.barrier()?;
        let seg = listed_segment(&mut state, segment)?;
        seg.data.truncate(len);
        // Like set_len + sync_all: everything that remains is durable.
        seg.synced_len = seg.data.len();
        state.syncs += 1;
        Ok(())
    }

    fn remove(&mut self, segment: SegmentId) -> io::Result<()> {
        let mut state = self.live_state()?;
        if !state.listed.remove(&segment) {
            return Err(not_found(segment));
        }
        // Keep the content until the removal is durable: a crash brings the segment back.
        if !state.durable_listing.contains(&segment) {
            state.segments.remove(&segment);
        }
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        let mut state = self.barrier()?;
        let listed = state.listed.clone();
        state.segments.retain(|segment, _| listed.contains(segment));
        state.durable_listing = listed;
        state.syncs += 1;
        Ok(())
    }

    fn syncs(&self) -> u64 {
        self.state().syncs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_sort() {
        let name = segment_file_name(1);
        assert_eq!(name, "wal-00000000000000000001.log");
        assert_eq!(parse_segment_file_name(&name), Some(1));
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("wal-1.log"), None);
        assert_eq!(parse_segment_file_name("db"), None);
        assert!(segment_file_name(9) < segment_file_name(10));
    }

    /// Runs the same sequence on any disk and checks what a reader sees.
    fn exercise(disk: &mut dyn Disk) -> io::Result<()> {
        assert!(disk.list()?.is_empty());
        disk.create(2)?;
        disk.create(1)?;
        assert!(disk.create(1).is_err(), "create must not clobber a segment");
        disk.append(1, b"hello ")?;
        disk.append(1, b"world")?;
        let before = disk.syncs();
        disk.sync(1)?;
        disk.sync_dir()?;
        assert_eq!(disk.syncs(), before + 2);
        assert_eq!(disk.list()?, vec![1, 2]);
        assert_eq!(disk.read(1)?, b"hello world");
        disk.truncate(1, 5)?;
        assert_eq!(disk.read(1)?, b"hello");
        disk.append(1, b"!")?;
        assert_eq!(disk.read(1)?, b"hello!");
        disk.remove(2)?;
        disk.sync_dir()?;
        assert_eq!(disk.list()?, vec![1]);
        assert!(disk.read(2).is_err());
        Ok(())
    }

    #[test]
    fn file_disk_basics() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut disk = FileDisk::open(dir.path())?;
        fs::write(dir.path().join("unrelated.txt"), b"x")?;
        exercise(&mut disk)?;
        assert_eq!(fs::read(disk.segment_path(1))?, b"hello!");
        Ok(())
    }

    #[test]
    fn mem_disk_basics() -> io::Result<()> {
        exercise(&mut MemDisk::new())
    }

    #[test]
    fn mem_disk_crash_drops_unsynced_bytes_and_listing_changes() -> io::Result<()> {
        let handle = MemDisk::new();
        let mut disk = handle.clone();
        disk.create(1)?;
        disk.append(1, b"durable")?;
        disk.sync(1)?;
        disk.sync_dir()?;
        disk.append(1, b" lost")?;
        disk.create(2)?;
        disk.append(2, b"never listed durably")?;
        disk.sync(2)?;
        assert_eq!(handle.segment_len(1), Some(12));
        assert_eq!(handle.synced_len(1), Some(7));

        let mut after = handle.crash();
        assert_eq!(after.list()?, vec![1]);
        assert_eq!(after.read(1)?, b"durable");
        // The process that lost power cannot write any more; unused handles live on.
        assert!(disk.append(1, b" zombie").is_err());
        assert!(disk.sync(1).is_err());
        assert!(disk.list().is_err());
        assert_eq!(handle.clone().read(1)?, b"durable");
        assert_eq!(handle.segments(), vec![1]);

        // An unsynced removal is undone by a crash.
        after.remove(1)?;
        assert!(after.list()?.is_empty());
        let mut after = after.crash();
        assert_eq!(after.list()?, vec![1]);
        assert_eq!(after.read(1)?, b"durable");

        // A synced removal sticks.
        after.remove(1)?;
        after.sync_dir()?;
        let mut after = after.crash();
        assert!(after.list()?.is_empty());
        Ok(())
    }

    #[test]
    fn mem_disk_injected_sync_failure_makes_nothing_durable() -> io::Result<()> {
        let handle = MemDisk::new();
        let mut disk = handle.clone();
        disk.create(1)?;
        disk.sync_dir()?;
        disk.append(1, b"abc")?;
        handle.fail_syncs(true);
        assert!(disk.sync(1).is_err());
        handle.fail_syncs(false);
        assert_eq!(handle.crash().read(1)?, b"");
        Ok(())
    }

    #[test]
    fn mem_disk_paused_sync_waits_for_resume() -> io::Result<()> {
        let handle = MemDisk::new();
        let mut disk = handle.clone();
        disk.create(1)?;
        disk.append(1, b"abc")?;
        disk.sync_dir()?;
        handle.pause_syncs(true);
        let syncer = std::thread::spawn(move || disk.sync(1));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!syncer.is_finished(), "sync must block while paused");
        assert_eq!(handle.synced_len(1), Some(0));
        handle.pause_syncs(false);
        syncer.join().map_err(|_| io::Error::other("syncer panicked"))??;
        assert_eq!(handle.syncs(), 2);

        // A crash while a sync is blocked: that sync must not succeed afterwards.
        let mut disk = handle.clone();
        disk.append(1, b"def")?;
        handle.pause_syncs(true);
        let syncer = std::thread::spawn(move || disk.sync(1));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut after = handle.crash();
        handle.pause_syncs(false);
        let result = syncer.join().map_err(|_| io::Error::other("syncer panicked"))?;
        assert!(result.is_err());
        assert_eq!(after.read(1)?, b"abc");
        Ok(())
    }
}
