//! Storage seam of the state machine: an ordered key-value tree with atomic batches and an
//! explicit durability point. [`SledTree`] is the production backend; [`MemTree`] the in-memory
//! twin for tests and the simulator.

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One write of a batch: `None` deletes the key.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// An ordered key-value tree, one per shard.
pub trait KvTree: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>>;
    /// Apply every write or none.
    fn apply_batch(&self, writes: Vec<Write>) -> io::Result<()>;
    /// Up to `limit` entries with `prefix`, strictly after `after` (a full key) if given.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Make everything written so far survive a power loss.
    fn sync(&self) -> io::Result<()>;
}

/// A shard's tree inside the node's sled database.
pub struct SledTree {
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
}

impl SledTree {
    pub fn open(db: &sled::Db, dir: &Path, name: &str) -> io::Result<Self> {
        let tree = db.open_tree(name).map_err(sled_io)?;
        Ok(SledTree { db: db.clone(), tree, dir: dir.to_owned() })
    }
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
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch).map_err(sled_io)
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
