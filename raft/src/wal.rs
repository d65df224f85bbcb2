//! The node-wide Raft write-ahead log, shared by every shard (Raft group) hosted on the node.
//!
//! Each shard's log entries, vote, committed log id and purge point are appended as records to
//! one sequence of segment files, so a single `fdatasync` can make the writes of many shards
//! durable at once (group commit). sled is not used here because its `flush` is not durable.
//!
//! # Layout
//!
//! A segment is a sequence of frames `[len: u32 LE][crc32(payload): u32 LE][payload]`, where the
//! payload is the bincode (standard config) encoding of the format version followed by a
//! `Record`. Every segment starts with a checkpoint (`CheckpointBegin`, per shard a
//! `ShardState` and `Append`s of its live entries, `CheckpointEnd`) holding the complete live state
//! of every shard, followed by ordinary records. Replay therefore only needs the newest segment;
//! older ones exist only if a crash interrupted their removal after a roll.
//!
//! # Writing
//!
//! Callers update the in-memory state of their shard (so reads see appended entries at once, as
//! openraft requires) and hand an encoded frame to a single writer thread through a bounded
//! queue. The writer takes everything queued (up to a bounded batch), writes it with one append,
//! issues one sync and only then completes the waiters of the batch. When the records written
//! into the current segment after its checkpoint pass a size limit, the writer rolls: it
//! checkpoints the in-memory state into a new segment, syncs it and removes the older segments,
//! so the log never grows without bound.
//!
//! In memory, a shard's live entries are kept encoded, as the bytes their `Append` record holds
//! for them ([`StoredEntry`]), and decoded on read: a decoded entry took 2-3 times the memory
//! (its own allocations and the map's slot), and the live entries of 48 shard replicas since
//! their last snapshots were the largest consumer of a node's heap. The same bytes make the
//! records, so an entry is encoded once.
//!
//! This module must never complete a waiter before the sync covering its record, and must not
//! block callers on disk I/O other than through the queue's back-pressure.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use openraft::{Entry, LogId, LogState, RaftTypeConfig, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::disk::{Disk, SegmentId};
use crate::log_store::LogStore;

/// Requests that may wait in the writer's queue; callers beyond it wait for room (back-pressure).
pub const WAL_QUEUE_LEN_MAX: usize = 1024;
/// Requests written and synced together by one group commit, at most.
pub const WAL_BATCH_LEN_MAX: usize = 512;
/// Frame bytes after which a group commit stops taking more requests.
pub const WAL_BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Default for [`WalConfig::segment_bytes_max`].
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// Largest record payload accepted; a larger length field on replay means corruption.
pub const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Entries per `Append` record in a checkpoint, at most (fewer if the record would be too big);
/// keeps checkpoint records far below [`RECORD_BYTES_MAX`] in the common case.
const CHECKPOINT_ENTRIES_PER_RECORD: usize = 1024;
/// Checkpoint bytes buffered before they are handed to the disk.
const CHECKPOINT_WRITE_BYTES: usize = 4 * 1024 * 1024;
/// Size of the frame header: payload length and payload checksum.
const FRAME_HEADER_LEN: usize = 8;
/// Version of the record encoding; written in front of every record.
const FORMAT_VERSION: u16 = 1;
/// Name of the writer thread, as seen in debuggers and `top -H`.
const WRITER_THREAD_NAME: &str = "cascade-wal";
/// With the planted bug `ack-before-flush` (simulator only), how often the writer syncs.
const PLANTED_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Identifier of a shard (one Raft group) within the node.
pub type ShardId = u32;

/// Raft type configurations whose logs the WAL can store: numeric node ids, openraft's own
/// entry type and cloneable application data (kept encoded in memory, decoded on reads).
pub trait WalTypes: RaftTypeConfig<NodeId = u64, Entry = Entry<Self>, D: Clone> {}

impl<C> WalTypes for C where C: RaftTypeConfig<NodeId = u64, Entry = Entry<C>, D: Clone> {}

/// Completion callback of a write, called by the writer thread once the write is durable (or
/// has failed). It must not block.
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send + 'static>;

/// Tunables of a [`Wal`].
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Bytes of records written into a segment after its leading checkpoint, beyond which the
    /// writer checkpoints into a new segment and removes the old ones.
    pub segment_bytes_max: u64,
    pub writer: WriterMode,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig { segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT, writer: WriterMode::Thread }
    }
}

/// Where the writer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterMode {
    /// Its own thread, blocking on the disk (production).
    Thread,
    /// A task on the current tokio runtime, for in-memory disks under a simulated clock: a
    /// real thread would race the simulation. Each sync takes `sync_delay` of (simulated) time,
    /// during which the batch is written but not durable.
    Task { sync_delay: std::time::Duration },
}

/// Failures of the WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The disk failed.
    #[error("wal i/o failed while {context}: {source}")]
    Io {
        /// What the WAL was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A segment holds bytes that are not a valid log, somewhere a crash cannot explain.
    #[error("wal segment {segment} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// Segment holding the bad bytes.
        segment: SegmentId,
        /// Byte offset of the bad record within the segment.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// A record was written by an incompatible version of this code.
    #[error(
        "wal segment {segment} has format version {found} at offset {offset}, \
         expected {FORMAT_VERSION}"
    )]
    UnsupportedVersion {
        /// Segment holding the record.
        segment: SegmentId,
        /// Byte offset of the record.
        offset: usize,
        /// Version found.
        found: u16,
    },
    /// A record could not be encoded.
    #[error("failed to encode wal record: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// An entry kept in memory could not be decoded (its bytes were encoded by this process:
    /// a bug, never a disk fault).
    #[error("failed to decode a log entry kept in memory: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// A record is larger than [`RECORD_BYTES_MAX`].
    #[error("wal record of {len} bytes exceeds the limit of {RECORD_BYTES_MAX} bytes")]
    RecordTooLarge {
        /// Encoded size of the record.
        len: usize,
    },
    /// The writer has stopped, after [`Wal::shutdown`] or a panic.
    #[error("wal is shut down")]
    Closed,
}

/// Wraps an I/O error with what the WAL was doing.
fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> WalError {
    move |source| WalError::Io { context, source }
}

/// One record of the log. Entries are borrowed when encoding and owned after decoding.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
enum Record<'a, C: WalTypes> {
    /// First record of every segment; `segment` guards against misnamed files.
    CheckpointBegin { segment: SegmentId },
    /// Checkpointed scalar state of one shard; its live entries follow as `Append`s.
    ShardState {
        shard: ShardId,
        vote: Option<Vote<u64>>,
        committed: Option<LogId<u64>>,
        last_purged: Option<LogId<u64>>,
    },
    /// Last record of a checkpoint; `shards` counts the `ShardState` records before it.
    CheckpointEnd { segment: SegmentId, shards: u32 },
    /// Entries appended to a shard's log (inserted by index).
    Append { shard: ShardId, entries: Cow<'a, [Entry<C>]> },
    /// Entries with index `>= since` removed.
    Truncate { shard: ShardId, since: u64 },
    /// Entries up to and including `upto` removed.
    Purge { shard: ShardId, upto: LogId<u64> },
    /// Vote saved.
    Vote { shard: ShardId, vote: Vote<u64> },
    /// Committed log id saved.
    Committed { shard: ShardId, committed: Option<LogId<u64>> },
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `record` as one complete frame, header included.
fn encode_frame<C: WalTypes>(record: &Record<'_, C>) -> Result<Vec<u8>, WalError> {
    encode_frame_limited(record, RECORD_BYTES_MAX)
}

/// Encodes `record` as one frame whose payload may not exceed `max` bytes.
fn encode_frame_limited<C: WalTypes>(record: &Record<'_, C>, max: usize) -> Result<Vec<u8>, WalError> {
    let mut frame = open_frame(record)?;
    let len = frame.len() - FRAME_HEADER_LEN;
    if len > max {
        return Err(WalError::RecordTooLarge { len });
    }
    seal_frame(&mut frame)?;
    Ok(frame)
}

/// A frame's room for its header, then the format version and `record`.
fn open_frame<C: WalTypes>(record: &Record<'_, C>) -> Result<Vec<u8>, WalError> {
    let mut frame = vec![0u8; FRAME_HEADER_LEN];
    bincode::serde::encode_into_std_write(FORMAT_VERSION, &mut frame, bincode_config())?;
    bincode::serde::encode_into_std_write(record, &mut frame, bincode_config())?;
    Ok(frame)
}

/// Fills in a frame's header: the length and the crc32 of what follows it.
fn seal_frame(frame: &mut [u8]) -> Result<(), WalError> {
    let len = frame.len() - FRAME_HEADER_LEN;
    let len32 = u32::try_from(len).map_err(|_| WalError::RecordTooLarge { len })?;
    let crc = crc32fast::hash(&frame[FRAME_HEADER_LEN..]);
    frame[0..4].copy_from_slice(&len32.to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A log entry as a shard's log keeps it in memory: its bincode encoding, exactly as an
/// `Append` record's list of entries holds it.
#[derive(Clone)]
struct StoredEntry {
    log_id: LogId<u64>,
    bytes: Box<[u8]>,
}

impl StoredEntry {
    fn encode<C: WalTypes>(entry: &Entry<C>) -> Result<StoredEntry, WalError> {
        let bytes = bincode::serde::encode_to_vec(entry, bincode_config())?;
        Ok(StoredEntry { log_id: entry.log_id, bytes: bytes.into_boxed_slice() })
    }

    fn encode_all<C: WalTypes>(entries: &[Entry<C>]) -> Result<Vec<StoredEntry>, WalError> {
        entries.iter().map(StoredEntry::encode).collect()
    }

    fn decode<C: WalTypes>(&self) -> Result<Entry<C>, WalError> {
        let (entry, used): (Entry<C>, usize) =
            bincode::serde::decode_from_slice(&self.bytes, bincode_config())?;
        if used != self.bytes.len() {
            return Err(WalError::Decode(bincode::error::DecodeError::OtherString(format!(
                "{} trailing bytes after entry {}",
                self.bytes.len() - used,
                self.log_id
            ))));
        }
        Ok(entry)
    }
}

/// Appends to `buf` the entries as `Append` frames: one if it fits in `max` payload bytes,
/// otherwise halves until each does. Only a single entry larger than `max` is an error.
///
/// The payload is what encoding `Record::Append { shard, entries }` would give: the encoding of
/// that record with no entries, whose last byte is the list's length 0, with that length
/// replaced by the real one and the entries' bytes after it (a list is encoded as its length,
/// then its elements; the test `stored_append_frames_equal_encoded_records` holds it to that).
fn encode_append<C: WalTypes>(
    buf: &mut Vec<u8>,
    shard: ShardId,
    entries: &[StoredEntry],
    max: usize,
) -> Result<(), WalError> {
    let empty: Record<'_, C> = Record::Append { shard, entries: Cow::Borrowed(&[]) };
    let mut frame = open_frame(&empty)?;
    if frame.pop() != Some(0) {
        return Err(WalError::Encode(bincode::error::EncodeError::Other(
            "an empty entry list is not encoded as 0",
        )));
    }
    bincode::serde::encode_into_std_write(entries.len() as u64, &mut frame, bincode_config())?;
    let len = frame.len() - FRAME_HEADER_LEN + entries.iter().map(|e| e.bytes.len()).sum::<usize>();
    if len > max {
        if entries.len() > 1 {
            let (left, right) = entries.split_at(entries.len() / 2);
            encode_append::<C>(buf, shard, left, max)?;
            return encode_append::<C>(buf, shard, right, max);
        }
        return Err(WalError::RecordTooLarge { len });
    }
    frame.reserve(len + FRAME_HEADER_LEN - frame.len());
    for e in entries {
        frame.extend_from_slice(&e.bytes);
    }
    seal_frame(&mut frame)?;
    if buf.is_empty() {
        *buf = frame;
    } else {
        buf.extend_from_slice(&frame);
    }
    Ok(())
}

/// A frame that passed its length and checksum checks.
struct Frame<'a> {
    offset: usize,
    payload: &'a [u8],
}

/// Where and why the intact prefix of a segment ends.
#[derive(Debug, Clone, Copy)]
struct Tear {
    offset: usize,
    reason: &'static str,
}

/// Splits a segment into frames, stopping at the first frame that is not intact.
fn scan_frames(bytes: &[u8]) -> (Vec<Frame<'_>>, Option<Tear>) {
    let mut frames = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let tear = |reason| Some(Tear { offset, reason });
        if rest.len() < FRAME_HEADER_LEN {
            return (frames, tear("truncated record header"));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 {
            // Zeroes are what a filesystem shows for blocks allocated but never written.
            return (frames, tear("empty record"));
        }
        if len > RECORD_BYTES_MAX {
            return (frames, tear("record length out of range"));
        }
        let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
            return (frames, tear("truncated record payload"));
        };
        if crc32fast::hash(payload) != crc {
            return (frames, tear("record checksum mismatch"));
        }
        frames.push(Frame { offset, payload });
        offset += FRAME_HEADER_LEN + len;
    }
    (frames, None)
}

/// Decodes a frame payload whose checksum matched.
fn decode_record<C: WalTypes>(segment: SegmentId, frame: &Frame<'_>) -> Result<Record<'static, C>, WalError> {
    let corrupt = |reason: String| WalError::Corrupt { segment, offset: frame.offset, reason };
    let (version, used): (u16, usize) = bincode::serde::decode_from_slice(frame.payload, bincode_config())
        .map_err(|e| corrupt(format!("undecodable format version: {e}")))?;
    if version != FORMAT_VERSION {
        return Err(WalError::UnsupportedVersion { segment, offset: frame.offset, found: version });
    }
    let body = frame.payload.get(used..).unwrap_or_default();
    let (record, body_used): (Record<'static, C>, usize) =
        bincode::serde::decode_from_slice(body, bincode_config())
            .map_err(|e| corrupt(format!("undecodable record: {e}")))?;
    if body_used != body.len() {
        return Err(corrupt(format!("{} trailing bytes after record", body.len() - body_used)));
    }
    Ok(record)
}

/// The log of one shard as far as this node knows it.
struct ShardLog<C: WalTypes> {
    /// Live (not purged) entries by index.
    entries: BTreeMap<u64, StoredEntry>,
    last_purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    /// Number of writes submitted for this shard since open; lets a checkpoint tell which
    /// queued writes it already covers. Not persisted.
    seq: u64,
    /// Entries are decoded as `Entry<C>`.
    types: std::marker::PhantomData<fn() -> C>,
}

impl<C: WalTypes> Default for ShardLog<C> {
    fn default() -> Self {
        ShardLog {
            entries: BTreeMap::new(),
            last_purged: None,
            vote: None,
            committed: None,
            seq: 0,
            types: std::marker::PhantomData,
        }
    }
}

impl<C: WalTypes> ShardLog<C> {
    // Replay and live writes share these mutations so memory and disk cannot disagree.

    fn append(&mut self, entries: Vec<StoredEntry>) {
        for entry in entries {
            self.entries.insert(entry.log_id.index, entry);
        }
    }

    fn truncate(&mut self, since: u64) {
        drop(self.entries.split_off(&since));
    }

    fn purge(&mut self, upto: LogId<u64>) {
        if self.last_purged.is_some_and(|purged| purged.index >= upto.index) {
            return;
        }
        self.entries = match upto.index.checked_add(1) {
            Some(first_kept) => self.entries.split_off(&first_kept),
            None => BTreeMap::new(),
        };
        self.last_purged = Some(upto);
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.last_purged.is_none()
            && self.vote.is_none()
            && self.committed.is_none()
    }

    fn log_state(&self) -> LogState<C> {
        let last_log_id = self.entries.values().next_back().map(|e| e.log_id).or(self.last_purged);
        LogState { last_purged_log_id: self.last_purged, last_log_id }
    }
}

/// What replaying one segment found.
struct SegmentReplay {
    /// Length of the intact prefix.
    valid_len: usize,
    tear: Option<Tear>,
    /// Whether the leading checkpoint was read to its end (and so replaced the state).
    checkpoint_complete: bool,
    /// Bytes taken by the leading checkpoint, if complete.
    checkpoint_len: usize,
    /// Intact frames read.
    frames: usize,
}

/// Replays one segment into `shards`. The leading checkpoint replaces `shards` only once it is
/// complete; records after it are applied in order. A tear ends the replay without error: the
/// caller decides whether a tear is acceptable where it happened.
fn replay_segment<C: WalTypes>(
    segment: SegmentId,
    bytes: &[u8],
    shards: &mut BTreeMap<ShardId, ShardLog<C>>,
) -> Result<SegmentReplay, WalError> {
    let (frames, tear) = scan_frames(bytes);
    let mut checkpoint: Option<BTreeMap<ShardId, ShardLog<C>>> = None;
    let mut complete = false;
    let mut checkpoint_len = 0;
    for (i, frame) in frames.iter().enumerate() {
        let corrupt =
            |reason: &str| WalError::Corrupt { segment, offset: frame.offset, reason: reason.to_owned() };
        let record = decode_record::<C>(segment, frame)?;
        if complete {
            match record {
                Record::Append { shard, entries } => {
                    shards.entry(shard).or_default().append(StoredEntry::encode_all(&entries)?)
                }
                Record::Truncate { shard, since } => shards.entry(shard).or_default().truncate(since),
                Record::Purge { shard, upto } => shards.entry(shard).or_default().purge(upto),
                Record::Vote { shard, vote } => shards.entry(shard).or_default().vote = Some(vote),
                Record::Committed { shard, committed } => {
                    shards.entry(shard).or_default().committed = committed
                }
                Record::CheckpointBegin { .. } | Record::ShardState { .. } | Record::CheckpointEnd { .. } => {
                    return Err(corrupt("checkpoint record after the checkpoint ended"));
                }
            }
            continue;
        }
        match (record, checkpoint.as_mut()) {
            (Record::CheckpointBegin { segment: named }, None) if i == 0 => {
                if named != segment {
                    return Err(corrupt(&format!("checkpoint names segment {named}")));
                }
                checkpoint = Some(BTreeMap::new());
            }
            (Record::ShardState { shard, vote, committed, last_purged }, Some(cp)) => {
                let log = ShardLog { vote, committed, last_purged, ..ShardLog::default() };
                if cp.insert(shard, log).is_some() {
                    return Err(corrupt(&format!("shard {shard} appears twice in the checkpoint")));
                }
            }
            (Record::Append { shard, entries }, Some(cp)) => match cp.get_mut(&shard) {
                Some(log) => log.append(StoredEntry::encode_all(&entries)?),
                None => {
                    return Err(corrupt(&format!("checkpoint entries of shard {shard} before its state")))
                }
            },
            (Record::CheckpointEnd { segment: named, shards: count }, Some(cp)) => {
                if named != segment || usize::try_from(count).ok() != Some(cp.len()) {
                    return Err(corrupt("checkpoint end does not match its checkpoint"));
                }
                *shards = std::mem::take(cp);
                complete = true;
                checkpoint_len = frame.offset + FRAME_HEADER_LEN + frame.payload.len();
            }
            _ => return Err(corrupt("segment does not start with a checkpoint")),
        }
    }
    Ok(SegmentReplay {
        valid_len: tear.map_or(bytes.len(), |t| t.offset),
        tear,
        checkpoint_complete: complete,
        checkpoint_len,
        frames: frames.len(),
    })
}

/// A write on its way to the writer thread.
struct Write {
    shard: ShardId,
    /// The shard's `seq` after this write was applied in memory.
    seq: u64,
    /// Complete frame; empty for a write that only waits for earlier ones to be durable.
    frame: Vec<u8>,
    done: Option<Done>,
}

enum Request {
    Write(Write),
    /// Finish everything queued before, then stop; acknowledged once the disk is released.
    Shutdown(oneshot::Sender<()>),
}

/// State shared by the handles and the writer thread.
struct Shared<C: WalTypes> {
    shards: RwLock<HashMap<ShardId, Arc<Mutex<ShardLog<C>>>>>,
    /// Disk syncs as of the writer's latest one.
    syncs: AtomicU64,
}

impl<C: WalTypes> Shared<C> {
    fn shard(&self, shard: ShardId) -> Option<Arc<Mutex<ShardLog<C>>>> {
        self.shards.read().unwrap_or_else(PoisonError::into_inner).get(&shard).cloned()
    }

    fn shard_or_create(&self, shard: ShardId) -> Arc<Mutex<ShardLog<C>>> {
        if let Some(log) = self.shard(shard) {
            return log;
        }
        let mut shards = self.shards.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(shards.entry(shard).or_default())
    }

    /// Runs `f` on the shard's log, or on an empty one if the shard never wrote anything.
    fn with_shard<T>(&self, shard: ShardId, f: impl FnOnce(&ShardLog<C>) -> T) -> T {
        match self.shard(shard) {
            Some(log) => f(&lock(&log)),
            None => f(&ShardLog::default()),
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the state consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct WalInner<C: WalTypes> {
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared<C>>,
}

/// Handle to the node-wide log. Cheap to clone; the writer stops when [`Wal::shutdown`] is
/// called or every handle (including every [`LogStore`]) is dropped.
pub struct Wal<C: WalTypes> {
    inner: Arc<WalInner<C>>,
}

impl<C: WalTypes> Clone for Wal<C> {
    fn clone(&self) -> Self {
        Wal { inner: Arc::clone(&self.inner) }
    }
}

impl<C: WalTypes> std::fmt::Debug for Wal<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("syncs", &self.syncs()).finish_non_exhaustive()
    }
}

impl<C: WalTypes> Wal<C> {
    /// Replays the log on `disk` and starts the writer thread.
    ///
    /// A torn record at the tail of the newest segment (a crash mid-write) is cut away; any other
    /// damage is an error. Blocks on disk I/O: call it before serving, or from a blocking task.
    pub fn open(disk: impl Disk, config: WalConfig) -> Result<Wal<C>, WalError> {
        let mut disk: Box<dyn Disk> = Box::new(disk);
        let ids = disk.list().map_err(io_err("listing segments"))?;
        let mut shards = BTreeMap::new();
        // Segments that stay, with the length of the newest one.
        let mut kept: Vec<SegmentId> = Vec::new();
        // The newest segment: id, length, length of its checkpoint.
        let mut current: Option<(SegmentId, usize, usize)> = None;
        for (i, &segment) in ids.iter().enumerate() {
            let is_last = i + 1 == ids.len();
            let bytes = disk.read(segment).map_err(io_err("reading a segment"))?;
            let replay = replay_segment(segment, &bytes, &mut shards)?;
            if !is_last {
                // Older segments were synced completely before the next one was created.
                if let Some(tear) = replay.tear {
                    return Err(WalError::Corrupt {
                        segment,
                        offset: tear.offset,
                        reason: tear.reason.to_owned(),
                    });
                }
                if !replay.checkpoint_complete {
                    return Err(WalError::Corrupt {
                        segment,
                        offset: replay.valid_len,
                        reason: "segment ends inside its checkpoint".to_owned(),
                    });
                }
                kept.push(segment);
                current = Some((segment, bytes.len(), replay.checkpoint_len));
                continue;
            }
            if !replay.checkpoint_complete {
                // A crash while rolling: older segments still hold everything acknowledged, and
                // nothing in this one was acknowledged. Without an older segment that excuse only
                // holds for a segment the very first open could not finish writing.
                if kept.is_empty() && replay.frames > 0 {
                    return Err(WalError::Corrupt {
                        segment,
                        offset: replay.valid_len,
                        reason: "the only segment ends inside its checkpoint".to_owned(),
                    });
                }
                tracing::warn!(segment, "removing wal segment with an unfinished checkpoint");
                disk.remove(segment).map_err(io_err("removing an unfinished segment"))?;
                disk.sync_dir().map_err(io_err("syncing the wal directory"))?;
            } else {
                if let Some(tear) = replay.tear {
                    tracing::warn!(
                        segment,
                        offset = tear.offset,
                        dropped_bytes = bytes.len() - tear.offset,
                        reason = tear.reason,
                        "cutting torn tail off the wal"
                    );
                    disk.truncate(segment, tear.offset as u64).map_err(io_err("cutting a torn tail"))?;
                }
                kept.push(segment);
                current = Some((segment, replay.valid_len, replay.checkpoint_len));
            }
        }
        let next_segment = match ids.last() {
            Some(last) => last.checked_add(1).ok_or(WalError::Corrupt {
                segment: *last,
                offset: 0,
                reason: "segment id space exhausted".to_owned(),
            })?,
            None => 1,
        };

        let shared = Arc::new(Shared {
            shards: RwLock::new(
                shards.into_iter().map(|(id, log)| (id, Arc::new(Mutex::new(log)))).collect(),
            ),
            syncs: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(WAL_QUEUE_LEN_MAX);
        let mut writer = Writer {
            disk,
            shared: Arc::clone(&shared),
            rx,
            segment: 0,
            segment_len: 0,
            checkpoint_len: 0,
            segments: kept,
            next_segment,
            segment_bytes_max: config.segment_bytes_max,
            covered: HashMap::new(),
            failure: None,
        };
        match current {
            Some((segment, len, checkpoint_len)) => {
                writer.segment = segment;
                writer.segment_len = len as u64;
                writer.checkpoint_len = checkpoint_len as u64;
                writer.retire_old_segments().map_err(io_err("removing superseded segments"))?;
            }
            None => writer.roll().map_err(io_err("creating the first segment"))?,
        }
        writer.publish_syncs();
        match config.writer {
            WriterMode::Thread => {
                std::thread::Builder::new()
                    .name(WRITER_THREAD_NAME.to_owned())
                    .spawn(move || writer.run())
                    .map_err(io_err("starting the writer thread"))?;
            }
            WriterMode::Task { sync_delay } => {
                tokio::spawn(writer.run_task(sync_delay));
            }
        }
        Ok(Wal { inner: Arc::new(WalInner { tx, shared }) })
    }

    /// The openraft log storage of `shard`.
    pub fn log_store(&self, shard: ShardId) -> LogStore<C> {
        LogStore::new(self.clone(), shard)
    }

    /// Shards that have any state in the log, ascending.
    pub fn shards(&self) -> Vec<ShardId> {
        let shards = self.inner.shared.shards.read().unwrap_or_else(PoisonError::into_inner);
        let mut ids: Vec<ShardId> =
            shards.iter().filter(|(_, log)| !lock(log).is_empty()).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids
    }

    /// Disk syncs issued so far (as counted by the [`Disk`]).
    pub fn syncs(&self) -> u64 {
        self.inner.shared.syncs.load(Ordering::Relaxed)
    }

    /// Applies `mutate` to the shard's memory and queues `frame`, atomically with respect to
    /// checkpoints: a write is either reflected in a checkpoint or written after it.
    async fn submit(
        &self,
        shard: ShardId,
        frame: Vec<u8>,
        done: Option<Done>,
        mutate: impl FnOnce(&mut ShardLog<C>),
    ) -> Result<(), WalError> {
        // Reserve room first so the shard lock is never held across an await.
        let permit = self.inner.tx.reserve().await.map_err(|_| WalError::Closed)?;
        let log = self.inner.shared.shard_or_create(shard);
        let mut log = lock(&log);
        mutate(&mut log);
        log.seq += 1;
        permit.send(Request::Write(Write { shard, seq: log.seq, frame, done }));
        Ok(())
    }

    /// Like [`Wal::submit`], then waits until the write is durable.
    async fn submit_durable(
        &self,
        shard: ShardId,
        frame: Vec<u8>,
        mutate: impl FnOnce(&mut ShardLog<C>),
    ) -> Result<(), WalError> {
        let (tx, rx) = oneshot::channel();
        let done: Done = Box::new(move |result| {
            // The waiter may have given up; nothing to do then.
            let _ = tx.send(result);
        });
        self.submit(shard, frame, Some(done), mutate).await?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(WalError::Io { context: "making a write durable", source }),
            Err(_) => Err(WalError::Closed),
        }
    }

    /// Appends entries to the shard's log. They are readable when this returns; `done` is called
    /// once they are durable. An empty `entries` still waits for every earlier write of the node.
    pub async fn append(
        &self,
        shard: ShardId,
        entries: Vec<Entry<C>>,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> Result<(), WalError> {
        // Empty when there are no entries: the write then only waits for the earlier ones.
        let stored = StoredEntry::encode_all(&entries)?;
        drop(entries);
        let mut frame = Vec::new();
        if !stored.is_empty() {
            encode_append::<C>(&mut frame, shard, &stored, RECORD_BYTES_MAX)?;
        }
        self.submit(shard, frame, Some(Box::new(done)), move |log| log.append(stored)).await
    }

    /// Saves the shard's vote; returns once it is durable.
    pub async fn save_vote(&self, shard: ShardId, vote: &Vote<u64>) -> Result<(), WalError> {
        let vote = *vote;
        let frame = encode_frame::<C>(&Record::Vote { shard, vote })?;
        self.submit_durable(shard, frame, move |log| log.vote = Some(vote)).await
    }

    /// Saves the shard's committed log id. Returns once queued, without waiting for durability:
    /// a crash may forget it, which only makes openraft re-apply fewer entries at startup, and
    /// the log order still guarantees it never becomes durable before the entries it covers.
    pub async fn save_committed(
        &self,
        shard: ShardId,
        committed: Option<LogId<u64>>,
    ) -> Result<(), WalError> {
        let frame = encode_frame::<C>(&Record::Committed { shard, committed })?;
        self.submit(shard, frame, None, move |log| log.committed = committed).await
    }

    /// Removes the shard's entries with index `>= since`; returns once durable.
    pub async fn truncate(&self, shard: ShardId, since: u64) -> Result<(), WalError> {
        let frame = encode_frame::<C>(&Record::Truncate { shard, since })?;
        self.submit_durable(shard, frame, move |log| log.truncate(since)).await
    }

    /// Removes the shard's entries up to and including `upto`; returns once durable.
    pub async fn purge(&self, shard: ShardId, upto: LogId<u64>) -> Result<(), WalError> {
        let frame = encode_frame::<C>(&Record::Purge { shard, upto })?;
        self.submit_durable(shard, frame, move |log| log.purge(upto)).await
    }

    /// The shard's last saved vote.
    pub fn read_vote(&self, shard: ShardId) -> Option<Vote<u64>> {
        self.inner.shared.with_shard(shard, |log| log.vote)
    }

    /// The shard's last saved committed log id.
    pub fn read_committed(&self, shard: ShardId) -> Option<LogId<u64>> {
        self.inner.shared.with_shard(shard, |log| log.committed)
    }

    /// The shard's last purged and last log ids.
    pub fn log_state(&self, shard: ShardId) -> LogState<C> {
        self.inner.shared.with_shard(shard, ShardLog::log_state)
    }

    /// The shard's live entries with an index in `range`, ascending.
    pub fn entries(&self, shard: ShardId, range: impl RangeBounds<u64>) -> Result<Vec<Entry<C>>, WalError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        // Exclusive end; `None` means no upper bound.
        let end = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        // BTreeMap::range panics on inverted ranges, which a caller may well pass.
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        self.inner.shared.with_shard(shard, |log| match end {
            Some(end) => log.entries.range(start..end).map(|(_, e)| e.decode()).collect(),
            None => log.entries.range(start..).map(|(_, e)| e.decode()).collect(),
        })
    }

    /// The shard's entries from `start` on, one index after another, up to `end` (exclusive):
    /// empty when `start` is purged or missing, never the entries after it. What a replication
    /// stream reads: openraft sends it as following the entry before `start`, so entries from
    /// further on would reach a follower as if they came next (a gap in its log). A stream
    /// reading a range purged under it gets nothing, sends a heartbeat, and a snapshot next.
    pub fn consecutive_entries(
        &self,
        shard: ShardId,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<C>>, WalError> {
        if end <= start {
            return Ok(Vec::new());
        }
        self.inner.shared.with_shard(shard, |log| {
            (start..)
                .zip(log.entries.range(start..end))
                .take_while(|(expected, (index, _))| *expected == **index)
                .map(|(_, (_, e))| e.decode())
                .collect()
        })
    }

    /// Completes every write queued before, then stops the writer and releases the disk.
    /// Later writes through any handle fail with [`WalError::Closed`].
    pub async fn shutdown(&self) -> Result<(), WalError> {
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Request::Shutdown(tx)).await.is_err() {
            return Ok(()); // already stopped
        }
        // An error means the writer dropped the sender while exiting: it has stopped too.
        let _ = rx.await;
        Ok(())
    }
}

/// The writer thread: sole owner of the disk.
struct Writer<C: WalTypes> {
    disk: Box<dyn Disk>,
    shared: Arc<Shared<C>>,
    rx: mpsc::Receiver<Request>,
    /// Segment receiving appends.
    segment: SegmentId,
    segment_len: u64,
    /// Bytes of `segment` taken by its leading checkpoint.
    checkpoint_len: u64,
    /// Every segment present, ascending; the last one is `segment`.
    segments: Vec<SegmentId>,
    next_segment: SegmentId,
    segment_bytes_max: u64,
    /// Per shard, the highest `seq` already contained in the current segment's checkpoint:
    /// queued writes up to it must not be written again.
    covered: HashMap<ShardId, u64>,
    /// Set after a failed write or sync; every later write fails, since what reached the disk
    /// is unknown (a failed fsync may have dropped dirty pages).
    failure: Option<String>,
}

impl<C: WalTypes> Writer<C> {
    fn run(mut self) {
        let mut shutdown = None;
        while shutdown.is_none() {
            let Some(first) = self.rx.blocking_recv() else {
                break; // every handle dropped
            };
            let batch = self.gather(first, &mut shutdown);
            self.commit(batch);
        }
        self.stop(shutdown);
    }

    /// [`Writer::run`] as a task: the same batches, each sync taking `sync_delay`.
    async fn run_task(mut self, sync_delay: std::time::Duration) {
        let mut shutdown = None;
        let mut synced_at = tokio::time::Instant::now();
        while shutdown.is_none() {
            let Some(first) = self.rx.recv().await else {
                break; // every handle dropped
            };
            let mut batch = self.gather(first, &mut shutdown);
            let appended = self.append_batch(&batch);
            let lazy = cascade_core::planted::planted(cascade_core::planted::Bug::AckBeforeFlush);
            if lazy {
                // Planted bug: tell Raft the entries are durable while they are only written,
                // and sync at most every PLANTED_FLUSH_EVERY, as a flush timer would.
                for write in &mut batch {
                    if let Some(done) = write.done.take() {
                        done(Ok(()));
                    }
                }
            }
            let result = match appended {
                Ok(true) if lazy && synced_at.elapsed() < PLANTED_FLUSH_EVERY => Ok(()),
                Ok(true) => {
                    tokio::time::sleep(sync_delay).await;
                    synced_at = tokio::time::Instant::now();
                    self.sync_batch()
                }
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
            self.finish(batch, result);
        }
        self.stop(shutdown);
    }

    /// The batch that starts with `first`: every request already queued behind it, up to the
    /// batch bounds or a shutdown request (stored in `shutdown`).
    fn gather(&mut self, first: Request, shutdown: &mut Option<oneshot::Sender<()>>) -> Vec<Write> {
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Write(write) => {
                    batch_bytes += write.frame.len();
                    batch.push(write);
                }
                Request::Shutdown(ack) => {
                    *shutdown = Some(ack);
                    break;
                }
            }
            if batch.len() < WAL_BATCH_LEN_MAX && batch_bytes < WAL_BATCH_BYTES_MAX {
                next = self.rx.try_recv().ok();
            }
        }
        batch
    }

    /// Fails whatever raced in behind the shutdown, releases the disk, acknowledges the shutdown.
    fn stop(mut self, shutdown: Option<oneshot::Sender<()>>) {
        self.rx.close();
        while let Ok(request) = self.rx.try_recv() {
            if let Request::Write(Write { done: Some(done), .. }) = request {
                done(Err(io::Error::other("wal is shut down")));
            }
        }
        drop(self.disk);
        if let Some(ack) = shutdown {
            let _ = ack.send(());
        }
    }

    /// Writes and syncs a batch, then completes its waiters; rolls if the segment is full.
    fn commit(&mut self, batch: Vec<Write>) {
        let result = match self.append_batch(&batch) {
            Ok(true) => self.sync_batch(),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        self.finish(batch, result);
    }

    /// Completes the waiters of a batch with `result` (the outcome of writing and syncing it);
    /// rolls if the segment is full.
    fn finish(&mut self, batch: Vec<Write>, result: io::Result<()>) {
        if batch.is_empty() {
            return;
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "wal write failed; failing all further writes");
            self.failure.get_or_insert_with(|| e.to_string());
        }
        for write in batch {
            if let Some(done) = write.done {
                done(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
        // Count only what was written after the checkpoint: when the live state alone is bigger
        // than the limit, rolling on size alone would checkpoint after every batch.
        if self.failure.is_none() && self.segment_len - self.checkpoint_len >= self.segment_bytes_max {
            if let Err(e) = self.roll() {
                tracing::error!(error = %e, "wal segment roll failed; failing all further writes");
                self.failure = Some(e.to_string());
            }
        }
    }

    /// Appends the batch's new frames to the segment, not yet durable. `Ok(false)`: nothing to
    /// write (only waits, or writes a checkpoint already made durable): every earlier write was
    /// synced by an earlier batch or roll.
    fn append_batch(&mut self, batch: &[Write]) -> io::Result<bool> {
        if let Some(failure) = &self.failure {
            return Err(io::Error::other(format!("wal failed earlier: {failure}")));
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|w| w.frame.len()).sum());
        for write in batch {
            let covered = self.covered.get(&write.shard).copied().unwrap_or(0);
            if write.seq > covered {
                buf.extend_from_slice(&write.frame);
            }
        }
        if buf.is_empty() {
            return Ok(false);
        }
        self.disk.append(self.segment, &buf)?;
        self.segment_len += buf.len() as u64;
        Ok(true)
    }

    /// Makes everything appended so far durable.
    fn sync_batch(&mut self) -> io::Result<()> {
        self.disk.sync(self.segment)?;
        self.publish_syncs();
        Ok(())
    }

    fn publish_syncs(&self) {
        self.shared.syncs.store(self.disk.syncs(), Ordering::Relaxed);
    }

    /// Starts a new segment with a checkpoint of every shard, makes it durable, then removes the
    /// older segments, which it supersedes.
    fn roll(&mut self) -> io::Result<()> {
        let segment = self.next_segment;
        self.next_segment =
            segment.checked_add(1).ok_or_else(|| io::Error::other("segment id space exhausted"))?;
        self.disk.create(segment)?;
        self.segments.push(segment);
        let mut written = 0u64;
        let mut buf = encode_frame::<C>(&Record::CheckpointBegin { segment }).map_err(io::Error::other)?;
        let mut shards: Vec<(ShardId, Arc<Mutex<ShardLog<C>>>)> = self
            .shared
            .shards
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, log)| (*id, Arc::clone(log)))
            .collect();
        shards.sort_unstable_by_key(|(id, _)| *id);
        let mut count = 0u32;
        for (shard, log) in shards {
            // Copy under the lock, encode outside it: callers of this shard wait only for a copy.
            let (state, entries, seq) = {
                let log = lock(&log);
                let state: Record<'_, C> = Record::ShardState {
                    shard,
                    vote: log.vote,
                    committed: log.committed,
                    last_purged: log.last_purged,
                };
                (state, log.entries.values().cloned().collect::<Vec<_>>(), log.seq)
            };
            self.covered.insert(shard, seq);
            if matches!(state, Record::ShardState { vote: None, committed: None, last_purged: None, .. })
                && entries.is_empty()
            {
                continue;
            }
            buf.extend_from_slice(&encode_frame(&state).map_err(io::Error::other)?);
            for chunk in entries.chunks(CHECKPOINT_ENTRIES_PER_RECORD) {
                encode_append::<C>(&mut buf, shard, chunk, RECORD_BYTES_MAX).map_err(io::Error::other)?;
            }
            count = count.checked_add(1).ok_or_else(|| io::Error::other("too many shards"))?;
            if buf.len() >= CHECKPOINT_WRITE_BYTES {
                self.disk.append(segment, &buf)?;
                written += buf.len() as u64;
                buf.clear();
            }
        }
        buf.extend_from_slice(
            &encode_frame::<C>(&Record::CheckpointEnd { segment, shards: count })
                .map_err(io::Error::other)?,
        );
        self.disk.append(segment, &buf)?;
        written += buf.len() as u64;
        self.disk.sync(segment)?;
        self.disk.sync_dir()?;
        self.segment = segment;
        self.segment_len = written;
        self.checkpoint_len = written;
        tracing::debug!(segment, bytes = written, shards = count, "wal rolled to a new segment");
        self.retire_old_segments()?;
        self.publish_syncs();
        Ok(())
    }

    /// Removes every segment older than the current one (its checkpoint supersedes them).
    fn retire_old_segments(&mut self) -> io::Result<()> {
        let current = self.segment;
        let old: Vec<SegmentId> = self.segments.iter().copied().filter(|s| *s < current).collect();
        if old.is_empty() {
            return Ok(());
        }
        for segment in &old {
            self.disk.remove(*segment)?;
        }
        self.segments.retain(|s| *s >= current);
        self.disk.sync_dir()
    }
}

/// Type config and helpers shared by the tests of this crate's storage modules.
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::BTreeMap;
    use std::io::{self, Cursor};

    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, LogState, Vote};
    use tokio::sync::oneshot;

    use super::{ShardId, Wal};

    openraft::declare_raft_types!(
        /// Raft types of the storage tests: string commands and responses.
        pub TestConfig: D = String, R = String
    );

    /// Log id of term `term` (leader 0) at `index`.
    pub(crate) fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 0), index)
    }

    /// A normal entry carrying `payload`.
    pub(crate) fn entry(term: u64, index: u64, payload: &str) -> Entry<TestConfig> {
        Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(payload.to_owned()) }
    }

    /// The payload of a test entry as text (openraft's Debug hides normal payloads).
    pub(crate) fn payload_text(entry: &Entry<TestConfig>) -> String {
        match &entry.payload {
            EntryPayload::Normal(text) => text.clone(),
            other => format!("{other:?}"),
        }
    }

    /// Appends and waits until durable.
    pub(crate) async fn append_durable(
        wal: &Wal<TestConfig>,
        shard: ShardId,
        entries: Vec<Entry<TestConfig>>,
    ) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel::<io::Result<()>>();
        wal.append(shard, entries, move |r| {
            let _ = tx.send(r);
        })
        .await?;
        rx.await??;
        Ok(())
    }

    /// Everything the WAL knows about one shard, in comparable form.
    #[derive(Debug, PartialEq)]
    pub(crate) struct ShardDump {
        pub state: LogState<TestConfig>,
        pub vote: Option<Vote<u64>>,
        pub committed: Option<LogId<u64>>,
        pub entries: Vec<(LogId<u64>, String)>,
    }

    pub(crate) fn dump_shard(wal: &Wal<TestConfig>, shard: ShardId) -> ShardDump {
        ShardDump {
            state: wal.log_state(shard),
            vote: wal.read_vote(shard),
            committed: wal.read_committed(shard),
            entries: wal
                .entries(shard, ..)
                .expect("entries decode")
                .iter()
                .map(|e| (e.log_id, payload_text(e)))
                .collect(),
        }
    }

    pub(crate) fn dump(wal: &Wal<TestConfig>) -> BTreeMap<ShardId, ShardDump> {
        wal.shards().into_iter().map(|shard| (shard, dump_shard(wal, shard))).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::atomic::AtomicU8;
    use std::time::{Duration, Instant};

    use super::test_support::{append_durable, dump, dump_shard, entry, log_id, payload_text, TestConfig};
    use super::*;
    use crate::disk::{FileDisk, MemDisk};

    type TestWal = Wal<TestConfig>;

    fn segment_files(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(dir)?
            .map(|d| d.map(|d| d.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.sort();
        Ok(names)
    }

    #[test]
    fn frames_round_trip_and_damage_is_detected() -> anyhow::Result<()> {
        let record: Record<'_, TestConfig> =
            Record::Append { shard: 3, entries: Cow::Owned(vec![entry(1, 1, "a"), entry(1, 2, "b")]) };
        let mut bytes = encode_frame::<TestConfig>(&record)?;
        bytes.extend(encode_frame::<TestConfig>(&Record::Truncate { shard: 3, since: 2 })?);
        let (frames, tear) = scan_frames(&bytes);
        assert_eq!(frames.len(), 2);
        assert!(tear.is_none());
        match decode_record::<TestConfig>(1, &frames[0])? {
            Record::Append { shard: 3, entries } => assert_eq!(entries.len(), 2),
            _ => anyhow::bail!("wrong record decoded"),
        }

        // Every strict prefix that cuts the second frame leaves exactly the first one.
        let first_len = frames[1].offset;
        for cut in first_len + 1..bytes.len() {
            let (frames, tear) = scan_frames(&bytes[..cut]);
            assert_eq!(frames.len(), 1, "cut at {cut}");
            assert_eq!(tear.map(|t| t.offset), Some(first_len));
        }
        // A flipped payload bit fails the checksum.
        let mut flipped = bytes.clone();
        flipped[first_len + FRAME_HEADER_LEN + 1] ^= 0x40;
        let (frames, tear) = scan_frames(&flipped);
        assert_eq!(frames.len(), 1);
        assert_eq!(tear.map(|t| t.reason), Some("record checksum mismatch"));
        Ok(())
    }

    #[test]
    fn oversized_appends_are_split_into_several_records() -> anyhow::Result<()> {
        let entries: Vec<_> =
            (1..=10).map(|i| entry(1, i, &format!("entry-{i:02}-{}", "x".repeat(20)))).collect();
        let stored = StoredEntry::encode_all(&entries)?;
        let mut bytes = Vec::new();
        encode_append::<TestConfig>(&mut bytes, 4, &stored, 100)?;
        let (frames, tear) = scan_frames(&bytes);
        assert!(tear.is_none());
        assert!(frames.len() > 2, "expected a split, got {} frames", frames.len());
        let mut indexes = Vec::new();
        for frame in &frames {
            assert!(frame.payload.len() <= 100);
            match decode_record::<TestConfig>(1, frame)? {
                Record::Append { shard: 4, entries } => {
                    indexes.extend(entries.iter().map(|e| e.log_id.index))
                }
                _ => anyhow::bail!("wrong record decoded"),
            }
        }
        assert_eq!(indexes, (1..=10).collect::<Vec<_>>());
        // A single entry that cannot fit is refused rather than split.
        assert!(matches!(
            encode_append::<TestConfig>(&mut Vec::new(), 4, &stored[..1], 10),
            Err(WalError::RecordTooLarge { .. })
        ));
        Ok(())
    }

    #[test]
    fn stored_append_frames_equal_encoded_records() -> anyhow::Result<()> {
        // 300 entries: the list's length takes more than one byte past 250.
        for (shard, n) in [(0u32, 1u64), (7, 3), (70_000, 300)] {
            let entries: Vec<_> = (1..=n).map(|i| entry(2, i, &format!("payload {i}"))).collect();
            let stored = StoredEntry::encode_all(&entries)?;
            let mut from_stored = Vec::new();
            encode_append::<TestConfig>(&mut from_stored, shard, &stored, RECORD_BYTES_MAX)?;
            let record: Record<'_, TestConfig> = Record::Append { shard, entries: Cow::Borrowed(&entries) };
            assert_eq!(from_stored, encode_frame(&record)?, "{n} entries of shard {shard}");
            for (e, s) in entries.iter().zip(&stored) {
                let back: Entry<TestConfig> = s.decode()?;
                assert_eq!((back.log_id, payload_text(&back)), (e.log_id, payload_text(e)));
            }
        }
        Ok(())
    }

    #[test]
    fn unknown_format_version_is_an_error() -> anyhow::Result<()> {
        let mut payload = bincode::serde::encode_to_vec(FORMAT_VERSION + 1, bincode_config())?;
        let record: Record<'_, TestConfig> = Record::Truncate { shard: 0, since: 1 };
        payload.extend(bincode::serde::encode_to_vec(record, bincode_config())?);
        let frame = Frame { offset: 0, payload: &payload };
        assert!(matches!(
            decode_record::<TestConfig>(1, &frame),
            Err(WalError::UnsupportedVersion { found, .. }) if found == FORMAT_VERSION + 1
        ));
        Ok(())
    }

    #[tokio::test]
    async fn entries_accepts_any_range() -> anyhow::Result<()> {
        let wal = TestWal::open(MemDisk::new(), WalConfig::default())?;
        append_durable(&wal, 0, (1..=5).map(|i| entry(1, i, "x")).collect()).await?;
        assert_eq!(wal.entries(0, 2..4)?.len(), 2);
        assert_eq!(wal.entries(0, 2..=4)?.len(), 3);
        assert_eq!(wal.entries(0, (Bound::Included(4), Bound::Excluded(2)))?.len(), 0);
        assert_eq!(wal.entries(0, 3..3)?.len(), 0);
        assert_eq!(wal.entries(0, ..=u64::MAX)?.len(), 5);
        assert_eq!(wal.entries(0, (Bound::Excluded(u64::MAX), Bound::Unbounded))?.len(), 0);
        assert_eq!(wal.entries(0, (Bound::Excluded(1), Bound::Excluded(2)))?.len(), 0);
        assert_eq!(wal.entries(1, ..)?.len(), 0, "unknown shard is empty");
        wal.shutdown().await?;
        Ok(())
    }

    /// Writes a recognizable history to shards 0..5.
    async fn write_history(wal: &TestWal) -> anyhow::Result<()> {
        for shard in 0..5u32 {
            for first in (1..=20u64).step_by(4) {
                let entries = (first..first + 4).map(|i| entry(1, i, &format!("s{shard}-e{i}"))).collect();
                append_durable(wal, shard, entries).await?;
            }
            wal.save_vote(shard, &Vote::new_committed(2, u64::from(shard) + 1)).await?;
            wal.save_committed(shard, Some(log_id(1, 10))).await?;
            if shard % 2 == 0 {
                wal.purge(shard, log_id(1, 5)).await?;
            }
            if shard % 3 == 0 {
                wal.truncate(shard, 15).await?;
                append_durable(wal, shard, vec![entry(2, 15, &format!("s{shard}-new15"))]).await?;
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn replay_restores_every_shard_after_reopen() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        write_history(&wal).await?;
        let before = dump(&wal);
        assert_eq!(before.len(), 5);
        let s0 = &before[&0];
        assert_eq!(s0.state.last_purged_log_id, Some(log_id(1, 5)));
        assert_eq!(s0.state.last_log_id, Some(log_id(2, 15)));
        assert_eq!(s0.entries.first().map(|e| e.0), Some(log_id(1, 6)));
        assert_eq!(before[&1].entries.len(), 20);
        // What replication reads: a range reaching into the purged prefix yields nothing, not
        // the entries after it.
        assert_eq!(wal.entries(0, 3..10)?.first().map(|e| e.log_id.index), Some(6));
        assert!(wal.consecutive_entries(0, 3, 10)?.is_empty());
        let from_6 = wal.consecutive_entries(0, 6, 10)?;
        assert_eq!(from_6.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
        assert!(wal.consecutive_entries(0, 9, 9)?.is_empty());
        wal.shutdown().await?;
        drop(wal);

        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        assert_eq!(dump(&wal), before);

        // The reopened log keeps accepting writes, and they survive another reopen.
        append_durable(&wal, 1, vec![entry(3, 21, "after-reopen")]).await?;
        wal.save_vote(1, &Vote::new(3, 9)).await?;
        let again = dump(&wal);
        wal.shutdown().await?;
        drop(wal);
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        assert_eq!(dump(&wal), again);
        assert_eq!(wal.read_vote(1), Some(Vote::new(3, 9)));
        assert_eq!(wal.log_state(1).last_log_id, Some(log_id(3, 21)));
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn torn_tail_is_cut_and_earlier_records_survive() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = FileDisk::open(dir.path())?.segment_path(1);
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        for i in 1..=3 {
            append_durable(&wal, 0, vec![entry(1, i, &format!("e{i}"))]).await?;
        }
        wal.shutdown().await?;
        drop(wal);

        // A crash in the middle of writing the last record.
        let full_len = fs::metadata(&path)?.len();
        fs::OpenOptions::new().write(true).open(&path)?.set_len(full_len - 3)?;
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        let ids: Vec<u64> = wal.entries(0, ..)?.iter().map(|e| e.log_id.index).collect();
        assert_eq!(ids, vec![1, 2]);
        let cut_len = fs::metadata(&path)?.len();
        assert!(cut_len < full_len - 3, "the partial record must be cut off the file");

        // Appending after the cut lands right behind the last intact record.
        append_durable(&wal, 0, vec![entry(2, 3, "rewritten")]).await?;
        wal.shutdown().await?;
        drop(wal);

        // Zeroed blocks and garbage behind the tail are torn writes too.
        let mut bytes = fs::read(&path)?;
        let intact = bytes.clone();
        bytes.extend_from_slice(&[0u8; 4096]);
        fs::write(&path, &bytes)?;
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        let got: Vec<(u64, String)> =
            wal.entries(0, ..)?.iter().map(|e| (e.log_id.index, payload_text(e))).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].1, "rewritten");
        wal.shutdown().await?;
        drop(wal);
        assert_eq!(fs::read(&path)?, intact);

        let mut bytes = intact.clone();
        bytes.extend_from_slice(&[0x13, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
        fs::write(&path, &bytes)?;
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        assert_eq!(wal.entries(0, ..)?.len(), 3);
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn older_segments_are_checked_strictly() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let first_path = FileDisk::open(dir.path())?.segment_path(1);
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        write_history(&wal).await?;
        wal.shutdown().await?;
        drop(wal);
        let first_segment = fs::read(&first_path)?;

        // Any write now rolls to segment 2, which supersedes and removes segment 1.
        let tiny = WalConfig { segment_bytes_max: 1, ..WalConfig::default() };
        let wal = TestWal::open(FileDisk::open(dir.path())?, tiny)?;
        append_durable(&wal, 7, vec![entry(1, 1, "rolled")]).await?;
        let rolled = dump(&wal);
        wal.shutdown().await?;
        drop(wal);
        assert_eq!(segment_files(dir.path())?, vec!["wal-00000000000000000002.log"]);

        // A crash between the roll and the removal leaves segment 1 behind: harmless, and removed.
        fs::write(&first_path, &first_segment)?;
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        assert_eq!(dump(&wal), rolled);
        wal.shutdown().await?;
        drop(wal);
        assert_eq!(segment_files(dir.path())?, vec!["wal-00000000000000000002.log"]);

        // But damage inside an older segment cannot be a torn write: refuse to start.
        let mut damaged = first_segment.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0xff;
        fs::write(&first_path, &damaged)?;
        match TestWal::open(FileDisk::open(dir.path())?, WalConfig::default()) {
            Err(WalError::Corrupt { segment: 1, reason, .. }) => {
                assert!(!reason.is_empty());
            }
            other => anyhow::bail!("expected corruption of segment 1, got {other:?}"),
        }

        // A cut-short older segment is just as bad.
        fs::write(&first_path, &first_segment[..first_segment.len() - 1])?;
        assert!(matches!(
            TestWal::open(FileDisk::open(dir.path())?, WalConfig::default()),
            Err(WalError::Corrupt { segment: 1, .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn unfinished_checkpoint_in_the_last_segment_is_discarded() -> anyhow::Result<()> {
        let disk = MemDisk::new();
        let wal = TestWal::open(disk.clone(), WalConfig::default())?;
        write_history(&wal).await?;
        let before = dump(&wal);
        wal.shutdown().await?;
        drop(wal);

        // A crash while rolling: segment 2 got only the start of its checkpoint.
        let mut raw = disk.clone();
        raw.create(2)?;
        raw.append(2, &encode_frame::<TestConfig>(&Record::CheckpointBegin { segment: 2 })?)?;
        raw.append(
            2,
            &encode_frame::<TestConfig>(&Record::ShardState {
                shard: 0,
                vote: None,
                committed: None,
                last_purged: None,
            })?,
        )?;
        raw.sync(2)?;
        raw.sync_dir()?;
        let wal = TestWal::open(disk.clone(), WalConfig::default())?;
        assert_eq!(dump(&wal), before);
        assert_eq!(disk.segments(), vec![1]);
        wal.shutdown().await?;
        drop(wal);

        // The same in the only segment means the checkpoint itself is damaged: refuse.
        let lone = MemDisk::new();
        let mut raw = lone.clone();
        raw.create(5)?;
        raw.append(5, &encode_frame::<TestConfig>(&Record::CheckpointBegin { segment: 5 })?)?;
        assert!(matches!(
            TestWal::open(lone.clone(), WalConfig::default()),
            Err(WalError::Corrupt { segment: 5, .. })
        ));

        // An empty lone segment is a first open that crashed before writing anything.
        let empty = MemDisk::new();
        empty.clone().create(1)?;
        let wal = TestWal::open(empty.clone(), WalConfig::default())?;
        assert!(dump(&wal).is_empty());
        assert_eq!(empty.segments(), vec![2]);
        wal.shutdown().await?;
        Ok(())
    }

    /// Polls `cond` for up to two seconds.
    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cond()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_acknowledged_before_its_sync() -> anyhow::Result<()> {
        let disk = MemDisk::new();
        let wal = TestWal::open(disk.clone(), WalConfig::default())?;
        append_durable(&wal, 0, vec![entry(1, 1, "acked-entry")]).await?;
        wal.save_vote(0, &Vote::new(1, 1)).await?;

        disk.pause_syncs(true);
        // Outcome of the unsynced append: 0 pending, 1 acknowledged, 2 failed.
        let outcome = Arc::new(AtomicU8::new(0));
        let flag = Arc::clone(&outcome);
        wal.append(0, vec![entry(1, 2, "unsynced-entry")], move |r| {
            flag.store(if r.is_ok() { 1 } else { 2 }, Ordering::SeqCst);
        })
        .await?;
        // Readable at once, as openraft requires, though not durable.
        assert_eq!(wal.entries(0, 2..3)?.len(), 1);
        let vote_wal = wal.clone();
        let vote = tokio::spawn(async move { vote_wal.save_vote(0, &Vote::new(2, 1)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(outcome.load(Ordering::SeqCst), 0, "append completed before its sync");
        assert!(!vote.is_finished(), "save_vote returned before its sync");

        // Power loss now: only what was acknowledged may, and must, survive.
        let survivor = disk.crash();
        let reopened = TestWal::open(survivor, WalConfig::default())?;
        let got: Vec<u64> = reopened.entries(0, ..)?.iter().map(|e| e.log_id.index).collect();
        assert_eq!(got, vec![1]);
        assert_eq!(reopened.read_vote(0), Some(Vote::new(1, 1)));
        reopened.shutdown().await?;

        // The pre-crash writer wakes up on a dead disk: its waiters fail, none is acknowledged.
        disk.pause_syncs(false);
        assert!(eventually(|| outcome.load(Ordering::SeqCst) != 0).await);
        assert_eq!(outcome.load(Ordering::SeqCst), 2);
        assert!(vote.await?.is_err());
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_writes_are_already_in_synced_bytes() -> anyhow::Result<()> {
        const SHARDS: u32 = 8;
        const APPENDS: u64 = 25;
        let disk = MemDisk::new();
        // Small segments so some acknowledgements are covered by a checkpoint instead.
        let wal = TestWal::open(disk.clone(), WalConfig { segment_bytes_max: 4096, ..WalConfig::default() })?;
        let violations = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for shard in 0..SHARDS {
            let (wal, disk, violations) = (wal.clone(), disk.clone(), Arc::clone(&violations));
            tasks.push(tokio::spawn(async move {
                for i in 1..=APPENDS {
                    let marker = format!("marker-{shard:03}-{i:05}");
                    let (tx, rx) = oneshot::channel::<io::Result<()>>();
                    let (check_disk, check_violations, needle) =
                        (disk.clone(), Arc::clone(&violations), marker.clone());
                    wal.append(shard, vec![entry(1, i, &marker)], move |r| {
                        // Runs on the writer thread at acknowledgement time.
                        let durable = check_disk
                            .synced_image()
                            .values()
                            .any(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()));
                        if !durable {
                            check_violations.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = tx.send(r);
                    })
                    .await?;
                    rx.await??;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        assert_eq!(violations.load(Ordering::SeqCst), 0, "acknowledged before durable");
        assert!(disk.segments().last().copied().unwrap_or(0) > 1, "expected at least one roll");
        wal.shutdown().await?;
        Ok(())
    }

    /// Runs `shards` concurrent appenders of `appends` entries each, returns the syncs used.
    async fn concurrent_appends(wal: &TestWal, shards: u32, appends: u64) -> anyhow::Result<u64> {
        let syncs_before = wal.syncs();
        let mut tasks = Vec::new();
        for shard in 0..shards {
            let wal = wal.clone();
            tasks.push(tokio::spawn(async move {
                for i in 1..=appends {
                    append_durable(&wal, shard, vec![entry(1, i, "group-commit")]).await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(wal.syncs() - syncs_before)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_shares_syncs_between_shards() -> anyhow::Result<()> {
        const SHARDS: u32 = 64;
        const APPENDS: u64 = 20;
        let total = u64::from(SHARDS) * APPENDS;

        let dir = tempfile::tempdir()?;
        let wal = TestWal::open(FileDisk::open(dir.path())?, WalConfig::default())?;
        let syncs = concurrent_appends(&wal, SHARDS, APPENDS).await?;
        println!("group commit on FileDisk: {total} appends from {SHARDS} shards used {syncs} syncs");
        assert!(syncs * 4 < total, "{syncs} syncs for {total} appends");
        for shard in 0..SHARDS {
            assert_eq!(wal.entries(shard, ..)?.len() as u64, APPENDS);
        }
        wal.shutdown().await?;
        Ok(())
    }

    /// Deterministic twin of the test above: while the writer is stuck in a sync, appends of
    /// every shard pile up, and the next group commit takes them all with one sync.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_appends_of_all_shards_share_one_sync() -> anyhow::Result<()> {
        const SHARDS: u32 = 64;
        const ROUNDS: u64 = 5;
        let disk = MemDisk::new();
        let wal = TestWal::open(disk.clone(), WalConfig::default())?;
        let start = disk.syncs();
        for round in 1..=ROUNDS {
            disk.pause_syncs(true);
            let before = disk.syncs();
            let mut acks = Vec::new();
            for shard in 0..SHARDS {
                let (tx, rx) = oneshot::channel::<io::Result<()>>();
                wal.append(shard, vec![entry(1, round, "batched")], move |r| {
                    let _ = tx.send(r);
                })
                .await?;
                acks.push(rx);
            }
            disk.pause_syncs(false);
            for ack in acks {
                ack.await??;
            }
            // The first append may have been alone in the sync that got paused; the rest share one.
            let used = disk.syncs() - before;
            assert!(used <= 2, "round {round}: {used} syncs for {SHARDS} appends");
        }
        let total = u64::from(SHARDS) * ROUNDS;
        let syncs = disk.syncs() - start;
        println!(
            "group commit on MemDisk: {total} queued appends from {SHARDS} shards \
             used {syncs} syncs"
        );
        assert!(syncs * 4 < total);
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_bounds_segments_and_keeps_live_state() -> anyhow::Result<()> {
        const SHARDS: u32 = 8;
        const APPENDS: u64 = 300;
        const KEEP: u64 = 10;
        let disk = MemDisk::new();
        let config = WalConfig { segment_bytes_max: 8 * 1024, ..WalConfig::default() };
        let wal = TestWal::open(disk.clone(), config.clone())?;
        let max_segments = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for shard in 0..SHARDS {
            let (wal, disk, max_segments) = (wal.clone(), disk.clone(), Arc::clone(&max_segments));
            tasks.push(tokio::spawn(async move {
                for i in 1..=APPENDS {
                    append_durable(&wal, shard, vec![entry(1, i, &format!("payload-{shard}-{i}"))]).await?;
                    if i % 20 == 0 {
                        wal.purge(shard, log_id(1, i - KEEP)).await?;
                        wal.save_committed(shard, Some(log_id(1, i))).await?;
                    }
                    max_segments.fetch_max(disk.segments().len() as u64, Ordering::SeqCst);
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        wal.save_vote(3, &Vote::new_committed(4, 2)).await?;
        let before = dump(&wal);
        let last_segment = disk.segments().last().copied().unwrap_or(0);
        let bytes: usize = disk.segments().iter().filter_map(|s| disk.segment_len(*s)).sum();
        println!(
            "compaction: rolled to segment {last_segment}, at most {} segments, {bytes} bytes now",
            max_segments.load(Ordering::SeqCst)
        );
        assert!(last_segment > 5, "expected many rolls, got {last_segment}");
        assert!(max_segments.load(Ordering::SeqCst) <= 2);
        // One segment's worth plus a checkpoint of the live entries, not the whole history.
        assert!(bytes < 4 * 8 * 1024, "{bytes} bytes kept");
        for shard in 0..SHARDS {
            let s = dump_shard(&wal, shard);
            assert_eq!(s.state.last_purged_log_id, Some(log_id(1, APPENDS - KEEP)));
            assert_eq!(s.entries.len() as u64, KEEP);
        }
        wal.shutdown().await?;
        drop(wal);

        let wal = TestWal::open(disk.clone(), config)?;
        assert_eq!(dump(&wal), before);
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn live_state_bigger_than_a_segment_does_not_roll_every_batch() -> anyhow::Result<()> {
        const APPENDS: u64 = 400;
        let disk = MemDisk::new();
        let config = WalConfig { segment_bytes_max: 2048, ..WalConfig::default() };
        let wal = TestWal::open(disk.clone(), config.clone())?;
        let record_bytes = encode_frame::<TestConfig>(&Record::Append {
            shard: 0,
            entries: Cow::Owned(vec![entry(1, 1, "never-purged-entry-000")]),
        })?
        .len() as u64;
        for i in 1..=APPENDS {
            append_durable(&wal, 0, vec![entry(1, i, &format!("never-purged-entry-{i:03}"))]).await?;
        }
        let rolls = disk.segments().last().copied().unwrap_or(0) - 1;
        let expected = APPENDS * record_bytes / config.segment_bytes_max;
        println!("{APPENDS} appends of {record_bytes} bytes, nothing purged: {rolls} rolls");
        assert!(rolls <= expected + 1, "{rolls} rolls, expected about {expected}");
        assert!(rolls >= expected.saturating_sub(1), "{rolls} rolls, expected about {expected}");
        let before = dump(&wal);
        wal.shutdown().await?;
        drop(wal);
        let wal = TestWal::open(disk, config)?;
        assert_eq!(dump(&wal), before);
        assert_eq!(wal.entries(0, ..)?.len() as u64, APPENDS);
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn failed_sync_fails_waiters_and_every_later_write() -> anyhow::Result<()> {
        let disk = MemDisk::new();
        let wal = TestWal::open(disk.clone(), WalConfig::default())?;
        append_durable(&wal, 0, vec![entry(1, 1, "ok")]).await?;
        disk.fail_syncs(true);
        assert!(append_durable(&wal, 0, vec![entry(1, 2, "lost")]).await.is_err());
        assert!(matches!(wal.save_vote(0, &Vote::new(1, 1)).await, Err(WalError::Io { .. })));
        // The disk recovers, but what the failed sync left behind is unknown: stay failed.
        disk.fail_syncs(false);
        assert!(append_durable(&wal, 0, vec![entry(1, 3, "still-failing")]).await.is_err());
        wal.shutdown().await?;
        let wal = TestWal::open(disk.crash(), WalConfig::default())?;
        assert_eq!(wal.entries(0, ..)?.len(), 1);
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn shutdown_completes_queued_writes_and_refuses_new_ones() -> anyhow::Result<()> {
        let disk = MemDisk::new();
        let wal = TestWal::open(disk.clone(), WalConfig::default())?;
        let (tx, rx) = oneshot::channel();
        wal.append(0, vec![entry(1, 1, "queued")], move |r| {
            let _ = tx.send(r);
        })
        .await?;
        wal.shutdown().await?;
        rx.await??;
        assert!(matches!(wal.save_vote(0, &Vote::new(1, 1)).await, Err(WalError::Closed)));
        assert!(matches!(wal.append(0, vec![], |_| ()).await, Err(WalError::Closed)));
        wal.shutdown().await?; // idempotent
        let wal = TestWal::open(disk.crash(), WalConfig::default())?;
        assert_eq!(wal.entries(0, ..)?.len(), 1);
        wal.shutdown().await?;
        Ok(())
    }

    /// The task writer (simulator) keeps a batch written but not durable for `sync_delay` of
    /// tokio time: a crash inside that window loses it, and nobody was told it was durable.
    #[tokio::test(start_paused = true)]
    async fn task_writer_acknowledges_only_after_its_simulated_sync() -> anyhow::Result<()> {
        let disk = MemDisk::new();
        let sync_delay = Duration::from_millis(50);
        let config = WalConfig { writer: WriterMode::Task { sync_delay }, ..WalConfig::default() };
        let wal = TestWal::open(disk.clone(), config)?;
        append_durable(&wal, 0, vec![entry(1, 1, "synced")]).await?;

        let outcome = Arc::new(AtomicU8::new(0));
        let flag = Arc::clone(&outcome);
        wal.append(0, vec![entry(1, 2, "in-flight")], move |r| {
            flag.store(if r.is_ok() { 1 } else { 2 }, Ordering::SeqCst);
        })
        .await?;
        tokio::time::sleep(sync_delay / 2).await;
        assert_eq!(outcome.load(Ordering::SeqCst), 0, "acknowledged inside the sync window");
        let crashed = TestWal::open(disk.crash(), WalConfig::default())?;
        assert_eq!(crashed.entries(0, ..)?.len(), 1, "the unsynced entry must not survive");
        crashed.shutdown().await?;

        // The pre-crash writer syncs on a dead disk: its waiter fails, never acknowledged.
        tokio::time::sleep(sync_delay).await;
        assert_eq!(outcome.load(Ordering::SeqCst), 2);
        wal.shutdown().await?;
        Ok(())
    }
}
