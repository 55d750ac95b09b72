//! The Admin layer on disk: the state file, a whole snapshot of the layer, and
//! beside it `<state file>.journal`, one JSON line per write made since.
//!
//! A journal because rewriting the whole state file on every write made a write's
//! cost grow with the store: 0.13–0.2 s at 210k resources, under the store's lock,
//! so creating 100k consumers one Admin call at a time took hours. A write now
//! appends what it changed and syncs it; the write that would grow the journal past
//! half the snapshot's size (and past [`JOURNAL_FLOOR`]) rewrites the snapshot
//! instead and empties the journal. Each snapshot is paid for by the writes since
//! the last one, so a write costs about the same at any store size, and a restart
//! never replays more than half a snapshot.
//!
//! A crash loses nothing acknowledged: a write is answered only once its line (or
//! its snapshot) is synced. One cut short while being appended leaves a last line
//! without its newline, never acknowledged, and dropped when read. One between a
//! new snapshot's rename and the journal's truncation leaves lines the snapshot
//! already holds, skipped by their index. Opening folds a non-empty journal into a
//! new snapshot, so after a start the state file alone holds everything; a journal
//! without its state file (removed to start over) is ignored.
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::WriteError;
use super::layers::{
    StateFile, Stored, Undo, credential_text, set, shared_name, split_credential_text,
};
use crate::resources::{ConsumerSpec, CredentialSpec, RouteSpec};

/// Below this size the journal is never folded: a small store would otherwise
/// rewrite its snapshot every few writes.
pub const JOURNAL_FLOOR: u64 = 1 << 20;

pub struct Disk {
    path: PathBuf,
    journal_path: PathBuf,
    /// Opened at the first append.
    journal: Option<File>,
    /// The bytes of whole, synced lines: where the next line goes.
    journal_len: u64,
    /// A failed append may have left part of a line past `journal_len`.
    tainted: bool,
    /// The last snapshot's size; `None` until there is one, so the first write makes it
    /// and the state file exists from then on.
    snapshot_len: Option<u64>,
    floor: u64,
}

/// One write: the state after it of every key it touched.
#[derive(Serialize, Deserialize)]
struct Entry {
    index: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Change<RouteSpec>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    consumers: Vec<Change<ConsumerSpec>>,
    /// Keyed `"user/id"`, as the state file and its tombstones key credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    credentials: Vec<Change<CredentialSpec>>,
}

#[derive(Serialize, Deserialize)]
#[serde(bound(
    serialize = "T: Serialize + DeserializeOwned",
    deserialize = "T: Serialize + DeserializeOwned"
))]
struct Change<T> {
    id: String,
    /// The Admin layer's own resource at this key; none once removed.
    written: Option<Stored<T>>,
    /// Whether the key is a tombstone over the config file's resource.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
}

impl Entry {
    /// Every key `undo` recorded, as `admin` now has it.
    fn after(undo: &Undo, admin: &StateFile) -> Self {
        let w = &admin.written;
        let d = &admin.deleted;
        Entry {
            index: admin.index,
            routes: (undo.routes.iter())
                .map(|(id, _)| Change {
                    id: id.clone(),
                    written: w.routes.get(id).cloned(),
                    deleted: d.routes.contains(id),
                })
                .collect(),
            consumers: (undo.consumers.iter())
                .map(|(name, _)| Change {
                    id: name.to_string(),
                    written: w.consumers.get(name).cloned(),
                    deleted: d.consumers.contains(&**name),
                })
                .collect(),
            credentials: (undo.credentials.iter())
                .map(|(key, _)| {
                    let id = credential_text(&key.0, &key.1);
                    Change {
                        written: w.credentials.get(key).cloned(),
                        deleted: d.credentials.contains(&id),
                        id,
                    }
                })
                .collect(),
        }
    }

    fn apply(self, admin: &mut StateFile) -> Result<(), String> {
        fn tombstone(set: &mut std::collections::BTreeSet<String>, id: String, deleted: bool) {
            if deleted {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
        let (w, d) = (&mut admin.written, &mut admin.deleted);
        for c in self.routes {
            set(&mut w.routes, c.id.clone(), c.written);
            tombstone(&mut d.routes, c.id, c.deleted);
        }
        for c in self.consumers {
            set(&mut w.consumers, c.id.as_str().into(), c.written);
            tombstone(&mut d.consumers, c.id, c.deleted);
        }
        for c in self.credentials {
            let (user, id) = split_credential_text(&c.id)?;
            let key = (shared_name(&w.consumers, user), Arc::<str>::from(id));
            set(&mut w.credentials, key, c.written);
            tombstone(&mut d.credentials, c.id, c.deleted);
        }
        admin.index = self.index;
        Ok(())
    }
}

impl Disk {
    /// Reads the state file and replays its journal; `read` parses the state file's
    /// text. A journal with anything in it is then folded into a new snapshot; if that
    /// fails (a read-only volume), portcullis still starts, and the journal stays.
    pub fn open(
        path: PathBuf,
        read: impl FnOnce(&str) -> Result<StateFile, String>,
    ) -> Result<(Disk, StateFile), String> {
        let mut journal_path = path.clone().into_os_string();
        journal_path.push(".journal");
        let mut disk = Disk {
            journal_path: journal_path.into(),
            journal: None,
            journal_len: 0,
            tainted: false,
            snapshot_len: None,
            floor: JOURNAL_FLOOR,
            path,
        };
        let mut admin = match std::fs::read_to_string(&disk.path) {
            Ok(text) => {
                disk.snapshot_len = Some(text.len() as u64);
                read(&text)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::empty(),
            Err(e) => return Err(e.to_string()),
        };
        if disk.snapshot_len.is_none() {
            // Every journal line extends a state file (the first write makes one):
            // without it, a journal is what is left after someone removed the state
            // file to start over. Cut off at the first write.
            if let Ok(m) = std::fs::metadata(&disk.journal_path)
                && m.len() > 0
            {
                tracing::warn!(
                    journal = %disk.journal_path.display(),
                    bytes = m.len(),
                    "no state file: ignoring the journal beside it"
                );
                disk.tainted = true;
            }
            return Ok((disk, admin));
        }
        let replayed = disk.replay(&mut admin)?;
        if (replayed > 0 || disk.tainted)
            && let Err(e) = disk.compact(&admin)
        {
            tracing::warn!(
                journal = %disk.journal_path.display(),
                error = %e,
                "could not fold the journal into the state file; it stays and is read again at the next start"
            );
        }
        Ok((disk, admin))
    }

    /// Applies the journal's lines newer than the snapshot; returns how many lines it
    /// held. Reads line by line: the journal can be half a snapshot long.
    fn replay(&mut self, admin: &mut StateFile) -> Result<usize, String> {
        let file = match File::open(&self.journal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("{}: {e}", self.journal_path.display())),
        };
        let at = |n: usize| format!("{} line {n}", self.journal_path.display());
        let mut reader = std::io::BufReader::new(file);
        let mut line = Vec::new();
        let mut lines = 0;
        loop {
            line.clear();
            let read = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("{}: {e}", at(lines + 1)))?;
            if read == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                // Cut short by a crash while being appended: never acknowledged.
                tracing::warn!(
                    at = %at(lines + 1),
                    bytes = line.len(),
                    "dropping the journal's last line, cut short (its write was never acknowledged)"
                );
                self.tainted = true;
                break;
            }
            lines += 1;
            let entry: Entry =
                serde_json::from_slice(&line).map_err(|e| format!("{}: {e}", at(lines)))?;
            self.journal_len += line.len() as u64;
            if entry.index > admin.index {
                entry
                    .apply(admin)
                    .map_err(|e| format!("{}: {e}", at(lines)))?;
            }
        }
        Ok(lines)
    }

    /// Persists the write `undo` recorded, whose changes `admin` now holds.
    pub fn record(&mut self, admin: &StateFile, undo: &Undo) -> Result<(), WriteError> {
        let mut line = serde_json::to_vec(&Entry::after(undo, admin))
            .map_err(|e| self.error(&self.journal_path, e.into()))?;
        line.push(b'\n');
        let started = std::time::Instant::now();
        let (how, done) = match self.snapshot_len {
            Some(snapshot)
                if self.journal_len + line.len() as u64 <= (snapshot / 2).max(self.floor) =>
            {
                let done = self.append(&line);
                (
                    "append",
                    done.map_err(|e| self.error(&self.journal_path, e)),
                )
            }
            _ => {
                let done = self.compact(admin);
                ("rewrite", done.map_err(|e| self.error(&self.path, e)))
            }
        };
        // What a write waits for on disk: the sync of one line, or now and then the
        // whole state file.
        metrics::histogram!("portcullis_state_file_write_seconds", "how" => how)
            .record(started.elapsed().as_secs_f64());
        done
    }

    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.journal.is_none() {
            // Secrets may be in it, as in the state file (which tempfile makes 0600).
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&self.journal_path)?;
            sync_dir(&self.journal_path);
            self.journal = Some(file);
        }
        let file = self.journal.as_ref().expect("opened above");
        let done = (|| {
            if self.tainted {
                file.set_len(self.journal_len)?;
            }
            file.write_all_at(line, self.journal_len)?;
            file.sync_data()
        })();
        match done {
            Ok(()) => {
                self.journal_len += line.len() as u64;
                self.tainted = false;
            }
            // Part of the line may be there; the next append cuts it off first.
            Err(_) => self.tainted = true,
        }
        done
    }

    /// Writes the whole layer as a new state file (temp file, fsync, rename) and
    /// empties the journal.
    fn compact(&mut self, admin: &StateFile) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        let dir = parent(&self.path);
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        // Buffered: serde_json writes token by token, which unbuffered was one write(2)
        // per token — 48 s for a state file of 100k consumers.
        let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp);
        serde_json::to_writer_pretty(&mut out, admin)?;
        out.write_all(b"\n")?;
        let tmp = out.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        let len = tmp.as_file().metadata()?.len();
        tmp.persist(&self.path).map_err(|e| e.error)?;
        sync_dir(&self.path);
        self.snapshot_len = Some(len);
        if self.journal_len > 0 || self.tainted {
            // The snapshot holds every line; if emptying fails they are skipped when read.
            if let Err(e) = self.truncate_journal() {
                tracing::warn!(journal = %self.journal_path.display(), error = %e, "could not empty the journal");
            }
        }
        tracing::debug!(
            state_file = %self.path.display(),
            bytes = len,
            ms = started.elapsed().as_millis() as u64,
            "state file rewritten, journal emptied"
        );
        Ok(())
    }

    fn truncate_journal(&mut self) -> std::io::Result<()> {
        let file = match self.journal.take() {
            Some(f) => f,
            None => std::fs::OpenOptions::new()
                .write(true)
                .open(&self.journal_path)?,
        };
        file.set_len(0)?;
        file.sync_data()?;
        self.journal = Some(file);
        self.journal_len = 0;
        self.tainted = false;
        Ok(())
    }

    fn error(&self, file: &Path, source: std::io::Error) -> WriteError {
        WriteError::Persist {
            file: file.display().to_string(),
            source,
        }
    }

    /// Tests fold sooner to exercise folding with a few writes.
    #[cfg(test)]
    pub fn fold_above(&mut self, bytes: u64) {
        self.floor = bytes;
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Makes a created or renamed file's directory entry durable; best effort, as some
/// filesystems refuse to sync a directory.
fn sync_dir(path: &Path) {
    if let Ok(d) = File::open(parent(path)) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::json;

    use crate::config::FileConfig;
    use crate::runtime::Runtime;
    use crate::store::{ResourceId, Store, WriteError};

    const FILE: &str = "routes:\n  - { id: f1, uri: /f1 }\n  - { id: f2, uri: /f2 }\nconsumers:\n  - username: alice\n  - username: carol\n    credentials: [ { id: c1, plugins: { jwt-auth: { key: carol-1, secret: s } } } ]\n";

    fn open(state: &Path) -> Result<Store, String> {
        let config = FileConfig::parse(FILE, "test.yaml").unwrap();
        Store::open(
            Arc::new(Runtime::default()),
            &config,
            "test.yaml",
            Some(state.to_owned()),
        )
        .map_err(|e| e.to_string())
    }

    /// The Admin layer exactly as the state file would hold it.
    async fn layer(s: &Store) -> String {
        serde_json::to_string(&s.inner.lock().await.admin).unwrap()
    }

    /// A store on an empty directory: the directory (removed when dropped), the state
    /// file's path, the store.
    fn fresh() -> (tempfile::TempDir, std::path::PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let s = open(&state).unwrap();
        (dir, state, s)
    }

    fn journal(state: &Path) -> std::path::PathBuf {
        state.with_file_name("state.json.journal")
    }

    /// Every kind of write, including tombstones over the config file's resources
    /// and a consumer deleted with its credentials.
    async fn writes(s: &Store) {
        let route = |id: &str| ResourceId::Route(id.into());
        let consumer = |u: &str| ResourceId::Consumer(u.into());
        let cred = |u: &str, id: &str| ResourceId::Credential(u.into(), id.into());
        let jwt = |key: &str| json!({"plugins": {"jwt-auth": {"key": key, "secret": "s"}}});
        s.put(route("a1"), json!({"uri": "/a1"})).await.unwrap();
        s.put(route("f1"), json!({"uri": "/changed"}))
            .await
            .unwrap();
        s.delete(&route("f2")).await.unwrap();
        s.put(route("f2"), json!({"uri": "/back"})).await.unwrap();
        s.delete(&route("a1")).await.unwrap();
        s.put(consumer("bob"), json!({"username": "bob"}))
            .await
            .unwrap();
        s.put(cred("bob", "b1"), jwt("bob-1")).await.unwrap();
        s.put(cred("bob", "b2"), jwt("bob-2")).await.unwrap();
        s.put(cred("bob", "b1"), jwt("bob-1b")).await.unwrap();
        s.delete(&cred("bob", "b2")).await.unwrap();
        s.put(cred("carol", "c2"), jwt("carol-2")).await.unwrap();
        s.delete(&consumer("carol")).await.unwrap();
        s.put(consumer("alice"), json!({"username": "alice", "desc": "d"}))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_restart_sees_exactly_what_the_writes_left() {
        for fold_above in [super::JOURNAL_FLOOR, 0] {
            let (_dir, state, s) = fresh();
            s.inner
                .lock()
                .await
                .disk
                .as_mut()
                .unwrap()
                .fold_above(fold_above);
            writes(&s).await;
            let before = layer(&s).await;
            let lines = std::fs::read_to_string(journal(&state)).unwrap_or_default();
            let snapshot = std::fs::metadata(&state).unwrap().len();
            if fold_above == 0 {
                // Folded whenever the journal would outgrow half the snapshot.
                assert!(lines.len() as u64 <= snapshot / 2, "{lines}");
            } else {
                // All but the first write (which made the state file) appended.
                assert_eq!(lines.lines().count(), 12, "{lines}");
            }
            let again = open(&state).unwrap();
            assert_eq!(layer(&again).await, before, "fold above {fold_above}");
            assert_eq!(std::fs::metadata(journal(&state)).unwrap().len(), 0);
            // And once more from the folded state file alone.
            drop(again);
            assert_eq!(layer(&open(&state).unwrap()).await, before);
        }
    }

    #[tokio::test]
    async fn a_line_cut_short_by_a_crash_is_dropped_and_a_bad_whole_line_is_refused() {
        let (_dir, state, s) = fresh();
        writes(&s).await;
        let before = layer(&s).await;
        drop(s);
        let whole = std::fs::read_to_string(journal(&state)).unwrap();
        let mut cut = whole.clone();
        cut.push_str(r#"{"index":99,"routes":[{"id":"x","writ"#);
        std::fs::write(journal(&state), &cut).unwrap();
        let again = open(&state).unwrap();
        assert_eq!(layer(&again).await, before);
        assert!(again.get(&ResourceId::Route("x".into())).await.is_none());
        drop(again);

        let mut lines: Vec<&str> = whole.lines().collect();
        lines.insert(2, r#"{"index":"two"}"#);
        std::fs::write(journal(&state), lines.join("\n") + "\n").unwrap();
        let err = open(&state).err().expect("a bad line is refused");
        assert!(err.contains("state.json.journal line 3"), "{err}");
        assert!(err.contains("invalid type: string \"two\""), "{err}");
    }

    #[tokio::test]
    async fn lines_the_state_file_already_holds_are_skipped() {
        let (_dir, state, s) = fresh();
        let a1 = ResourceId::Route("a1".into());
        s.put(ResourceId::Route("first".into()), json!({"uri": "/"}))
            .await
            .unwrap();
        s.put(a1.clone(), json!({"uri": "/a1"})).await.unwrap();
        let put_a1 = std::fs::read_to_string(journal(&state)).unwrap();
        s.delete(&a1).await.unwrap();
        drop(s);
        // Folded, then the journal as a crash before its truncation would leave it.
        drop(open(&state).unwrap());
        std::fs::write(journal(&state), put_a1).unwrap();
        let again = open(&state).unwrap();
        assert!(
            again.get(&a1).await.is_none(),
            "an old line brought a1 back"
        );
    }

    #[tokio::test]
    async fn a_failed_append_changes_nothing_and_the_next_cuts_off_its_remains() {
        let (_dir, state, s) = fresh();
        s.put(ResourceId::Route("first".into()), json!({"uri": "/"}))
            .await
            .unwrap();
        s.put(ResourceId::Route("second".into()), json!({"uri": "/2"}))
            .await
            .unwrap();
        let path = journal(&state);
        // A handle that cannot write, as a full disk would refuse the append.
        let writable = {
            let mut inner = s.inner.lock().await;
            let disk = inner.disk.as_mut().unwrap();
            disk.journal.replace(std::fs::File::open(&path).unwrap())
        };
        let err = s
            .put(ResourceId::Route("lost".into()), json!({"uri": "/lost"}))
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::Persist { .. }), "{err}");
        assert!(err.to_string().contains("state.json.journal"), "{err}");
        assert!(s.get(&ResourceId::Route("lost".into())).await.is_none());
        // What such an append may leave behind, longer than the next line.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(r#"{"index":3,"routes":[{"id":"lost","written":{"spec":{"uri":"/"#);
        text.push_str(&"lost/".repeat(100));
        std::fs::write(&path, text).unwrap();
        s.inner.lock().await.disk.as_mut().unwrap().journal = writable;
        s.put(ResourceId::Route("third".into()), json!({"uri": "/3"}))
            .await
            .unwrap();
        let before = layer(&s).await;
        let lines = std::fs::read_to_string(&path).unwrap();
        assert_eq!(lines.lines().count(), 2, "{lines}");
        assert!(lines.ends_with('\n') && !lines.contains("lost"), "{lines}");
        drop(s);
        assert_eq!(layer(&open(&state).unwrap()).await, before);
    }

    #[tokio::test]
    async fn a_journal_without_its_state_file_is_ignored() {
        let (_dir, state, s) = fresh();
        writes(&s).await;
        drop(s);
        // Removed to start the Admin layer over.
        std::fs::remove_file(&state).unwrap();
        let s = open(&state).unwrap();
        assert!(s.get(&ResourceId::Consumer("bob".into())).await.is_none());
        s.put(ResourceId::Route("new".into()), json!({"uri": "/new"}))
            .await
            .unwrap();
        assert_eq!(std::fs::metadata(journal(&state)).unwrap().len(), 0);
        drop(s);
        let s = open(&state).unwrap();
        assert!(s.get(&ResourceId::Consumer("bob".into())).await.is_none());
        assert!(s.get(&ResourceId::Route("new".into())).await.is_some());
    }

    #[tokio::test]
    async fn the_journal_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, state, s) = fresh();
        for id in ["a", "b"] {
            s.put(ResourceId::Route(id.into()), json!({"uri": "/"}))
                .await
                .unwrap();
        }
        for file in [state.clone(), journal(&state)] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
    }
}
