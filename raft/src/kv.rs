//! Storage seam of the state machine: an ordered key-value tree with batches that are atomic
//! across a crash, an explicit durability point, and the shard's stored snapshot. [`SledTree`] is the production backend;
//! [`MemTree`] the in-memory twin for tests and the simulator.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One write of a batch: `None` deletes the key.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// An ordered key-value tree, one per shard.
pub trait KvTree: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>>;
    /// Apply every write, or after a crash none (for [`SledTree`]: after a process crash; after
    /// a power loss, as far as sled's log survived in order, which sled 0.34 promises only up to
    /// a sync, see [`KvTree::sync`]). Readers running meanwhile may see some of the writes before
    /// the others (each key changes atomically): the state machine publishes its applied index
    /// only after the batch, and raises the index below which events are pruned before it.
    fn apply_batch(&self, writes: Vec<Write>) -> io::Result<()>;
    /// Up to `limit` entries with `prefix`, strictly after `after` (a full key) if given.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Make everything written so far survive a power loss.
    fn sync(&self) -> io::Result<()>;
    /// Replace the shard's stored snapshot (`meta` and `body`, as the state machine encodes
    /// them), durably and whole: [`KvTree::load_snapshot`] returns the old one or the new one,
    /// after a crash too. Kept apart from the tree's keys: stored in sled, a snapshot (the
    /// whole shard) stayed in sled's cache and its log (measured at 400,000 sessions, no
    /// peers, RSS and disk per session and replica: 594 B and 1,211 B in sled, 508 B and 888 B
    /// in a file).
    fn store_snapshot(&self, meta: &[u8], body: &[u8]) -> io::Result<()>;
    /// The stored snapshot's `(meta, body)`, if one was stored.
    fn load_snapshot(&self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// The stored snapshot's meta alone (cheap: the body is not read, nor checked).
    fn load_snapshot_meta(&self) -> io::Result<Option<Vec<u8>>>;
}

/// A shard's tree inside the node's sled database.
///
/// Batches are not sled batches: `sled::Tree::apply_batch` (and sled's transactions) take a
/// process-wide write lock, and once one has run, every read and write in the process takes the
/// read side of it, so the applies of every shard ran one at a time and checks waited behind
/// them (measured; BENCHMARKS.md). Instead a batch is first written whole, as one value, under
/// [`REDO_KEY`] in the shard's redo tree, then key by key. After a process crash sled recovers
/// its log in order up to the first message it cannot read, so the redo record on disk is the
/// last batch any of whose writes survived; [`SledTree::open`] writes it again, key by key
/// (absolute values: doing it twice is harmless), which completes a batch a crash cut short.
/// A record of [`REDO_LARGE_MIN`] bytes or more may go to a sled blob file, which sled does not
/// sync and skips when missing: those files are synced before the keys are written, and the
/// record is removed after them (so it is not kept in sled's cache, nor written again at every
/// open). No sled batch or transaction may run anywhere in the process, or the lock comes back
/// for every read.
pub struct SledTree {
    db: sled::Db,
    tree: sled::Tree,
    redo: sled::Tree,
    /// One batch at a time per shard: the redo record must be the last batch's.
    writing: Mutex<()>,
    dir: PathBuf,
    /// The shard's snapshot file (see [`encode_snapshot_header`]).
    snapshot: PathBuf,
    /// One snapshot stored at a time per shard (they share the temporary file).
    storing: Mutex<()>,
}

/// The one key of a shard's redo tree: its last batch, encoded by [`encode_redo`].
const REDO_KEY: &[u8] = b"batch";
/// First byte of an encoded redo record.
const REDO_FORMAT: u8 = 1;
/// Redo records this large may be written to a blob file (sled 0.34 does so above about
/// 128 KiB: a quarter of its 512 KiB segments, less headers).
const REDO_LARGE_MIN: usize = 64 << 10;

impl SledTree {
    /// Open the shard tree `name` (and its redo tree), completing a batch a crash cut short.
    /// `dir` is the database's directory; the shard's snapshot is the file `<name>.snap` in
    /// `snapshots`.
    pub fn open(db: &sled::Db, dir: &Path, snapshots: &Path, name: &str) -> io::Result<Self> {
        let tree = db.open_tree(name).map_err(sled_io)?;
        let redo = db.open_tree(format!("{name}.redo")).map_err(sled_io)?;
        if let Some(record) = redo.get(REDO_KEY).map_err(sled_io)? {
            let writes = decode_redo(&record).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("redo record of {name}: {e}"))
            })?;
            write_each(&tree, writes)?;
        }
        Ok(SledTree {
            db: db.clone(),
            tree,
            redo,
            writing: Mutex::new(()),
            dir: dir.to_owned(),
            snapshot: snapshots.join(format!("{name}.snap")),
            storing: Mutex::new(()),
        })
    }

    /// What a crash after `survived` of the batch's writes leaves: the redo record and the first
    /// writes (in the order [`KvTree::apply_batch`] makes them).
    #[cfg(test)]
    fn apply_cut_short(&self, writes: Vec<Write>, survived: usize) -> io::Result<()> {
        let writes = last_write_per_key(writes);
        self.redo.insert(REDO_KEY, encode_redo(&writes)?).map_err(sled_io)?;
        write_each(&self.tree, writes.into_iter().take(survived))
    }
}

/// The batch's writes with only the last one per key, puts before deletes: a reader meanwhile
/// sees a key replaced, never missing in between (a snapshot install deletes every key and
/// writes most of them again).
fn last_write_per_key(writes: Vec<Write>) -> Vec<Write> {
    let last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = writes.into_iter().collect();
    let (puts, deletes): (Vec<Write>, Vec<Write>) = last.into_iter().partition(|(_, v)| v.is_some());
    puts.into_iter().chain(deletes).collect()
}

fn write_each(tree: &sled::Tree, writes: impl IntoIterator<Item = Write>) -> io::Result<()> {
    for (k, v) in writes {
        match v {
            Some(v) => tree.insert(k, v).map(drop),
            None => tree.remove(k).map(drop),
        }
        .map_err(sled_io)?;
    }
    Ok(())
}

/// First byte of a snapshot file.
const SNAPSHOT_FORMAT: u8 = 1;
/// Bytes before a snapshot file's meta: the format, the crc32 of everything after the crc, and
/// the meta's length (u32, big-endian).
const SNAPSHOT_HEADER_LEN: usize = 9;

fn encode_snapshot_header(meta: &[u8], body: &[u8]) -> io::Result<[u8; SNAPSHOT_HEADER_LEN]> {
    let meta_len = u32::try_from(meta.len()).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("snapshot meta of {} bytes", meta.len()))
    })?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&meta_len.to_be_bytes());
    crc.update(meta);
    crc.update(body);
    let mut header = [0; SNAPSHOT_HEADER_LEN];
    header[0] = SNAPSHOT_FORMAT;
    header[1..5].copy_from_slice(&crc.finalize().to_be_bytes());
    header[5..].copy_from_slice(&meta_len.to_be_bytes());
    Ok(header)
}

/// A snapshot file's `(meta, body)`, checked against its crc.
/// The checksum and the meta's length from a snapshot file's header, if its format is known.
fn parse_snapshot_header(header: &[u8; SNAPSHOT_HEADER_LEN]) -> Result<(u32, usize), String> {
    if header[0] != SNAPSHOT_FORMAT {
        return Err(format!(
            "format {} is not supported by this build (supports {SNAPSHOT_FORMAT})",
            header[0]
        ));
    }
    let crc = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
    let meta_len = u32::from_be_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
    Ok((crc, meta_len))
}

fn decode_snapshot_file(mut file: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>), String> {
    let Some(header) = file.first_chunk::<SNAPSHOT_HEADER_LEN>() else {
        return Err(format!("{} bytes, shorter than its header", file.len()));
    };
    let (crc, meta_len) = parse_snapshot_header(header)?;
    if crc32fast::hash(&file[5..]) != crc {
        return Err("checksum mismatch".to_owned());
    }
    if file.len() - SNAPSHOT_HEADER_LEN < meta_len {
        return Err(format!("meta of {meta_len} bytes, {} left", file.len() - SNAPSHOT_HEADER_LEN));
    }
    let meta = file[SNAPSHOT_HEADER_LEN..SNAPSHOT_HEADER_LEN + meta_len].to_vec();
    file.drain(..SNAPSHOT_HEADER_LEN + meta_len);
    Ok((meta, file))
}

/// [`REDO_FORMAT`], then per write: the key's length (u32, big-endian), the key, then 0 for a
/// delete or 1, the value's length (u32) and the value.
fn encode_redo(writes: &[Write]) -> io::Result<Vec<u8>> {
    let size: usize = writes.iter().map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len)).sum();
    let mut out = Vec::with_capacity(1 + size);
    out.push(REDO_FORMAT);
    fn field(out: &mut Vec<u8>, bytes: &[u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("a write of {} bytes", bytes.len()))
        })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(bytes);
        Ok(())
    }
    for (k, v) in writes {
        field(&mut out, k)?;
        match v {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                field(&mut out, v)?;
            }
        }
    }
    Ok(out)
}

fn decode_redo(mut bytes: &[u8]) -> Result<Vec<Write>, String> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if bytes.len() < n {
            return Err(format!("cut short: {n} bytes needed, {} left", bytes.len()));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    fn field(bytes: &mut &[u8]) -> Result<Vec<u8>, String> {
        let len = u32::from_be_bytes(take(bytes, 4)?.try_into().map_err(|_| "length")?);
        Ok(take(bytes, len as usize)?.to_vec())
    }
    match take(&mut bytes, 1)? {
        [REDO_FORMAT] => {}
        [other] => {
            return Err(format!("format {other} is not supported by this build (supports {REDO_FORMAT})"))
        }
        _ => unreachable!("take returns the length asked for"),
    }
    let mut writes = Vec::new();
    while !bytes.is_empty() {
        let key = field(&mut bytes)?;
        let value = match take(&mut bytes, 1)? {
            [0] => None,
            [1] => Some(field(&mut bytes)?),
            [tag] => return Err(format!("write tag {tag} is neither 0 (delete) nor 1 (put)")),
            _ => unreachable!("take returns the length asked for"),
        };
        writes.push((key, value));
    }
    Ok(writes)
}

fn sled_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// fdatasync every regular file under `dir`. sled 0.34's `flush()` only issues
/// `sync_file_range`, which is not durable against power loss (spacejam/sled#1452); syncing the
/// files ourselves afterwards is.
///
/// sled creates and deletes files (its snapshots `snap.*`, blobs) in the background, so a file
/// listed here may be gone when it is opened: that one needs no sync (sled writes the file that
/// replaces it with its own sync). Failing the sync on it failed the state machine's write (seen
/// at ~245,000 sessions under load: "Write StateMachine: No such file or directory").
pub fn sync_dir_files(dir: &Path) -> io::Result<()> {
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = match entry.file_type() {
            Ok(ty) => ty,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let synced = if ty.is_dir() {
            sync_dir_files(&entry.path())
        } else if ty.is_file() {
            std::fs::File::open(entry.path()).and_then(|f| f.sync_data())
        } else {
            Ok(())
        };
        match synced {
            Err(e) if !gone(&e) => return Err(e),
            _ => {}
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

impl KvTree for SledTree {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key).map_err(sled_io)?.map(|v| v.to_vec()))
    }

    fn apply_batch(&self, writes: Vec<Write>) -> io::Result<()> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let writes = last_write_per_key(writes);
        let record = encode_redo(&writes)?;
        let large = record.len() >= REDO_LARGE_MIN;
        self.redo.insert(REDO_KEY, record).map_err(sled_io)?;
        let blobs = self.dir.join("blobs");
        if large && blobs.exists() {
            sync_dir_files(&blobs)?;
        }
        write_each(&self.tree, writes)?;
        if large {
            self.redo.remove(REDO_KEY).map_err(sled_io)?;
        }
        Ok(())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let iter = match after {
            Some(a) => self.tree.range::<&[u8], _>((Bound::Excluded(a), Bound::Unbounded)),
            None => self.tree.range::<&[u8], _>(prefix..),
        };
        for item in iter {
            let (k, v) = item.map_err(sled_io)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn sync(&self) -> io::Result<()> {
        self.db.flush().map_err(sled_io)?;
        sync_dir_files(&self.dir)
    }

    fn store_snapshot(&self, meta: &[u8], body: &[u8]) -> io::Result<()> {
        let _one = self.storing.lock().unwrap_or_else(|p| p.into_inner());
        let header = encode_snapshot_header(meta, body)?;
        let temporary = self.snapshot.with_extension("snap.tmp");
        let mut file = std::fs::File::create(&temporary)?;
        for part in [&header[..], meta, body] {
            file.write_all(part)?;
        }
        file.sync_data()?;
        drop(file);
        std::fs::rename(&temporary, &self.snapshot)?;
        let dir = self.snapshot.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }

    fn load_snapshot(&self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let file = match std::fs::read(&self.snapshot) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        decode_snapshot_file(file).map(Some).map_err(|e| self.damaged(e))
    }

    fn load_snapshot_meta(&self) -> io::Result<Option<Vec<u8>>> {
        let mut file = match std::fs::File::open(&self.snapshot) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut header = [0; SNAPSHOT_HEADER_LEN];
        file.read_exact(&mut header).map_err(|e| self.damaged(format!("header: {e}")))?;
        let (_, meta_len) = parse_snapshot_header(&header).map_err(|e| self.damaged(e))?;
        let mut meta = Vec::new();
        file.take(meta_len as u64).read_to_end(&mut meta)?;
        if meta.len() != meta_len {
            return Err(self.damaged(format!("meta of {meta_len} bytes, {} left", meta.len())));
        }
        Ok(Some(meta))
    }
}

impl SledTree {
    fn damaged(&self, e: impl std::fmt::Display) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file {}: {e}", self.snapshot.display()))
    }
}

/// The in-memory twin. Keeps what was written apart from what was synced, so a simulated crash
/// ([`MemTree::crash`]) loses exactly the unsynced writes.
#[derive(Clone, Default)]
pub struct MemTree {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Default)]
struct MemInner {
    written: BTreeMap<Vec<u8>, Vec<u8>>,
    synced: BTreeMap<Vec<u8>, Vec<u8>>,
    syncs: u64,
    /// Stored durably: a crash keeps it.
    snapshot: Option<(Vec<u8>, Vec<u8>)>,
}

impl MemTree {
    /// Forget everything not synced, as a power loss would.
    pub fn crash(&self) {
        let mut g = self.lock();
        g.written = g.synced.clone();
    }

    /// How many times `sync` ran.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KvTree for MemTree {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.lock().written.get(key).cloned())
    }

    fn apply_batch(&self, writes: Vec<Write>) -> io::Result<()> {
        let mut g = self.lock();
        for (k, v) in writes {
            match v {
                Some(v) => g.written.insert(k, v),
                None => g.written.remove(&k),
            };
        }
        Ok(())
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let g = self.lock();
        let lower = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(g.written
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn sync(&self) -> io::Result<()> {
        let mut g = self.lock();
        g.synced = g.written.clone();
        g.syncs += 1;
        Ok(())
    }

    fn store_snapshot(&self, meta: &[u8], body: &[u8]) -> io::Result<()> {
        self.lock().snapshot = Some((meta.to_vec(), body.to_vec()));
        Ok(())
    }

    fn load_snapshot(&self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self.lock().snapshot.clone())
    }

    fn load_snapshot_meta(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.lock().snapshot.as_ref().map(|(meta, _)| meta.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Write {
        (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
    }

    fn delete(k: &str) -> Write {
        (k.as_bytes().to_vec(), None)
    }

    fn contents(tree: &SledTree) -> Vec<(String, String)> {
        let all = tree.scan(b"", None, usize::MAX).expect("scan");
        all.into_iter().map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap())).collect()
    }

    fn pairs(of: &[(&str, &str)]) -> Vec<(String, String)> {
        of.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A batch a crash cut short is completed when the tree is opened again, and only the last
    /// write of a key counts (a put after a delete of the same key keeps the key).
    #[test]
    fn a_batch_cut_short_is_completed_when_reopened() {
        let dir = tempfile::tempdir().expect("temp dir");
        let open = || {
            let db = sled::Config::new().path(dir.path()).open().expect("open sled");
            let tree = SledTree::open(&db, dir.path(), dir.path(), "shard-0").expect("open tree");
            (db, tree)
        };
        {
            let (db, tree) = open();
            tree.apply_batch(vec![put("a", "1"), put("gone", "x"), put("kept", "k")]).expect("batch");
            let cut = vec![delete("gone"), delete("a"), put("a", "2"), put("b", "3"), put("c", "4")];
            tree.apply_cut_short(cut, 1).expect("cut short");
            assert_eq!(
                contents(&tree),
                pairs(&[("a", "2"), ("gone", "x"), ("kept", "k")]),
                "only the first write"
            );
            db.flush().expect("flush");
        }
        {
            let (db, tree) = open();
            let completed = pairs(&[("a", "2"), ("b", "3"), ("c", "4"), ("kept", "k")]);
            assert_eq!(contents(&tree), completed, "the batch completed, nothing else changed");
            tree.apply_batch(vec![delete("c")]).expect("batch");
            db.flush().expect("flush");
        }
        let (db, tree) = open();
        assert_eq!(
            contents(&tree),
            pairs(&[("a", "2"), ("b", "3"), ("kept", "k")]),
            "a later batch is not undone"
        );
        // A large batch's record is removed once its keys are written.
        let big = "x".repeat(REDO_LARGE_MIN);
        tree.apply_batch(vec![put("big", &big), delete("b")]).expect("batch");
        assert_eq!(tree.redo.get(REDO_KEY).expect("read"), None);
        db.flush().expect("flush");
        drop((db, tree));
        let (_db, tree) = open();
        assert_eq!(contents(&tree), pairs(&[("a", "2"), ("big", &big), ("kept", "k")]));
    }

    /// A redo record round-trips, and bytes that are not one give an error, never a panic.
    #[test]
    fn redo_records_round_trip_and_bad_ones_are_refused() {
        let writes = vec![put("k", "v"), delete("gone"), (vec![0; 300], Some(vec![7; 70_000])), put("", "")];
        let encoded = encode_redo(&writes).expect("encode");
        assert_eq!(decode_redo(&encoded).expect("decode"), writes);
        for cut in 0..encoded.len() {
            // Every prefix decodes to fewer writes or is refused.
            if let Ok(decoded) = decode_redo(&encoded[..cut]) {
                assert!(decoded.len() < writes.len(), "a prefix of {cut} bytes decoded whole");
            }
        }
        let mut other_format = encoded.clone();
        other_format[0] = 9;
        assert!(decode_redo(&other_format).unwrap_err().contains("format 9"));
        let mut bad_tag = encode_redo(&[put("k", "v")]).expect("encode");
        bad_tag[1 + 4 + 1] = 5;
        assert!(decode_redo(&bad_tag).unwrap_err().contains("tag 5"));
    }

    /// A stored snapshot is read back as stored, replaced whole, and a damaged file is refused
    /// with its path and reason, not returned.
    #[test]
    fn snapshot_files_round_trip_and_damage_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new().path(dir.path().join("sm")).open().expect("open sled");
        let tree = SledTree::open(&db, &dir.path().join("sm"), dir.path(), "shard-7").expect("open tree");
        assert_eq!(tree.load_snapshot().expect("load"), None);
        tree.store_snapshot(b"meta-1", &[1; 5000]).expect("store");
        tree.store_snapshot(b"meta-2", b"body-2").expect("store");
        assert_eq!(tree.load_snapshot().expect("load"), Some((b"meta-2".to_vec(), b"body-2".to_vec())));
        assert_eq!(tree.load_snapshot_meta().expect("load"), Some(b"meta-2".to_vec()));
        tree.store_snapshot(b"", b"").expect("store");
        assert_eq!(tree.load_snapshot().expect("load"), Some((Vec::new(), Vec::new())));
        tree.store_snapshot(b"meta-3", b"body-3").expect("store");
        let path = dir.path().join("shard-7.snap");
        let good = std::fs::read(&path).expect("read");
        for (at, what) in [(0, "format"), (3, "checksum"), (good.len() - 1, "checksum")] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).expect("write");
            let err = tree.load_snapshot().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("shard-7.snap") && err.to_string().contains(what), "{err}");
            if what == "format" {
                let err = tree.load_snapshot_meta().unwrap_err();
                assert!(err.to_string().contains("shard-7.snap") && err.to_string().contains(what), "{err}");
            }
        }
        std::fs::write(&path, &good[..4]).expect("write");
        assert!(tree.load_snapshot().unwrap_err().to_string().contains("shorter than its header"));
        assert!(tree.load_snapshot_meta().unwrap_err().to_string().contains("shard-7.snap: header"));
        std::fs::write(&path, &good[..12]).expect("write");
        assert!(tree.load_snapshot_meta().unwrap_err().to_string().contains("meta of 6 bytes, 3 left"));
    }

    /// Files that come and go while a directory is synced (as sled's snapshots do) do not fail
    /// the sync.
    #[test]
    fn syncing_a_directory_tolerates_files_deleted_meanwhile() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 200_000 {
                    let f = path.join(format!("snap.{}", i % 8));
                    let _ = std::fs::write(&f, b"x");
                    let _ = std::fs::remove_file(&f);
                    i += 1;
                }
            })
        };
        for _ in 0..2_000 {
            sync_dir_files(&path).expect("a vanished file is not an error");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().expect("churn thread");
    }
}
