//! Persistence: one append-only JSON-lines journal per worker (`workers/<id>.jsonl`) and one
//! for runtime-level records (`runtime.jsonl`: boots and deletions). The memory store keeps
//! nothing.
//!
//! Durable records (creates, inputs, lifecycle changes) are fsync'ed before they are
//! acknowledged; the rest is written straight to the file (no user-space buffer), so a
//! SIGKILL loses nothing that was written. A corrupt or truncated line is reported and
//! skipped on load; the lines around it are kept.
//!
//! A journal holds its file open only between [`Journal::append`] and [`Journal::close`]
//! (the engine closes it whenever its worker goes idle), so a runtime's descriptors follow
//! its busy workers, not every worker it ever had.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::types::{CreateExtras, Event, Intent, ProfileRef, Role};

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// The worker was created (always the first line of its journal).
    Created {
        /// Worker id.
        worker_id: String,
        /// Intent.
        intent: Intent,
        /// Resolved profile.
        profile: ProfileRef,
        /// Optional create fields.
        extras: CreateExtras,
        /// The create's idempotency key, if it had one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// When it was created (RFC 3339 UTC); absent in journals written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
    },
    /// A published event.
    Event(Event),
    /// A transcript entry.
    Entry(StoredEntry),
    /// A worker was deleted (in `runtime.jsonl`): its id and event ids are never reused.
    Deleted {
        /// The deleted worker's id.
        worker_id: String,
        /// The event id the deletion took.
        event_id: u64,
    },
}

/// The highest event id a journal may hold: above it a line is corrupt (ids go to browsers
/// as JSON numbers, exact only up to 2^53), and the next id must not wrap to one in use.
pub const MAX_EVENT_ID: u64 = (1 << 53) - 1;

impl Record {
    /// The event id this record was written under (0 for a creation record).
    pub fn event_id(&self) -> u64 {
        match self {
            Record::Event(e) => e.seq,
            Record::Entry(e) => e.event_id,
            Record::Deleted { event_id, .. } => *event_id,
            Record::Created { .. } => 0,
        }
    }
}

/// A transcript entry as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredEntry {
    /// Per-worker sequence, from 1.
    pub sequence: u64,
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The event that recorded it.
    pub event_id: u64,
    /// When it was recorded (RFC 3339 UTC); absent in journals written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The input's idempotency key, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Most events a replay reads back from a journal. A cursor further back is answered as
/// expired (the client gets a snapshot, and is told): one old cursor cannot make the runtime
/// hold a journal's worth of events. As many as a gateway's replay holds by default
/// (16 × its `event_ring` of 4096).
pub const MAX_JOURNAL_REPLAY: usize = 65_536;

/// Where a runtime keeps its state.
#[derive(Debug)]
pub enum Store {
    /// Nothing persisted.
    Memory,
    /// Journals under `dir`, which this process holds locked.
    Fs {
        /// The data directory.
        dir: PathBuf,
        /// A random id made when the directory was first used: event ids count within it.
        store_id: String,
        _lock: File,
        /// The folders opening it created (the data dir first, then its new parents).
        created: Vec<PathBuf>,
    },
}

/// A journal file, opened on demand; the memory store's journal discards everything.
#[derive(Debug)]
pub struct Journal {
    path: Option<PathBuf>,
    file: Option<File>,
    /// The file ends in part of a record (a write failed part way, and cutting it off failed
    /// too): the next append starts a line of its own first.
    torn: bool,
}

/// A journal read back at start, a record at a time: a journal can be far larger than what
/// its worker keeps in memory (every delta of every turn), so its records are applied as
/// they are read, never held all at once. Lines that do not parse are skipped (logged);
/// [`JournalReader::finish`] then hands over the journal for appending.
pub struct JournalReader {
    /// Its file name without `.jsonl`: the worker id it was made for.
    pub name: String,
    path: Option<PathBuf>,
    lines: Option<io::BufReader<File>>,
    line: Vec<u8>,
    number: usize,
    /// The last line read ended with a newline.
    ended: bool,
    /// Reading failed: the records stop there, and `finish` says why.
    failed: Option<io::Error>,
}

impl JournalReader {
    /// The memory store's journal: no records, appends discarded.
    fn empty() -> JournalReader {
        JournalReader {
            name: String::new(),
            path: None,
            lines: None,
            line: Vec::new(),
            number: 0,
            ended: true,
            failed: None,
        }
    }

    /// The journal, closed, for appending (after the records were read, or a read failed).
    /// A torn last line is ended now so the next record starts a line of its own; on a full
    /// disk the next append does it (the start must not fail for want of one byte).
    pub fn finish(self) -> io::Result<Journal> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let torn = match self.lines {
            Some(lines) if !self.ended => {
                let mut file = lines.into_inner();
                file.seek(SeekFrom::End(0)).and_then(|_| file.write_all(b"\n")).is_err()
            }
            _ => false,
        };
        Ok(Journal { path: self.path, file: None, torn })
    }
}

impl Iterator for JournalReader {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        let lines = self.lines.as_mut()?;
        loop {
            self.line.clear();
            match lines.read_until(b'\n', &mut self.line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    self.failed = Some(e);
                    self.lines = None;
                    return None;
                }
            }
            self.number += 1;
            self.ended = self.line.last() == Some(&b'\n');
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let path = self.path.as_deref().unwrap_or(Path::new("")).display();
            match serde_json::from_slice::<Record>(&self.line) {
                Ok(record) if record.event_id() > MAX_EVENT_ID => {
                    log::warn!("{path}: skipping corrupt line {} (event id out of range)", self.number);
                }
                Ok(record) => return Some(record),
                Err(e) if !self.ended => log::warn!("{path}: skipping truncated last line {} ({e})", self.number),
                Err(e) => log::warn!("{path}: skipping corrupt line {} ({e})", self.number),
            }
        }
    }
}

impl Store {
    /// Opens the fs store in `dir` (creating it) and locks it against a second process.
    pub fn open_fs(dir: &Path) -> io::Result<Store> {
        let created: Vec<PathBuf> =
            dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).map(Path::to_path_buf).collect();
        std::fs::create_dir_all(dir.join("workers"))?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))?;
        lock_exclusive(&lock).map_err(|e| {
            io::Error::new(e.kind(), format!("data dir {} is in use by another process ({e})", dir.display()))
        })?;
        let store_id = read_or_create_store_id(&dir.join("store_id"))?;
        Ok(Store::Fs { dir: dir.to_path_buf(), store_id, _lock: lock, created })
    }

    /// Removes the data dir, and the parents made for it, when opening created it: for a
    /// start that failed after opening its store. Called while the lock is held, so nothing
    /// else uses the dir; a parent is removed only while empty. An existing dir stays.
    pub fn remove_if_created(&self) -> io::Result<()> {
        let Store::Fs { created, .. } = self else {
            return Ok(());
        };
        let Some((dir, parents)) = created.split_first() else {
            return Ok(());
        };
        std::fs::remove_dir_all(dir)?;
        for parent in parents {
            if std::fs::remove_dir(parent).is_err() {
                break; // something else lives there now
            }
        }
        Ok(())
    }

    /// `memory` or `fs_store`, as the Runtime API names backends.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Fs { .. } => "fs_store",
        }
    }

    /// The fs store's id (`None` for memory): event ids of one store id never repeat.
    pub fn store_id(&self) -> Option<&str> {
        match self {
            Store::Memory => None,
            Store::Fs { store_id, .. } => Some(store_id),
        }
    }

    /// A new, empty journal for worker `id` (an existing file is an error: ids are never reused).
    pub fn create_worker_journal(&self, id: &str) -> io::Result<Journal> {
        match self {
            Store::Memory => Ok(Journal::none()),
            Store::Fs { dir, .. } => {
                let path = worker_path(dir, id);
                OpenOptions::new().create_new(true).append(true).open(&path)?;
                sync_parent(&path)?;
                Ok(Journal { path: Some(path), file: None, torn: false })
            }
        }
    }

    /// Removes worker `id`'s journal (a missing one is fine: the deletion is recorded first).
    pub fn remove_worker_journal(&self, id: &str) -> io::Result<()> {
        match self {
            Store::Memory => Ok(()),
            Store::Fs { dir, .. } => match std::fs::remove_file(worker_path(dir, id)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// The runtime-level journal, to read its records.
    pub fn open_runtime_journal(&self) -> io::Result<JournalReader> {
        match self {
            Store::Memory => Ok(JournalReader::empty()),
            Store::Fs { dir, .. } => load(&dir.join("runtime.jsonl")),
        }
    }

    /// Every worker journal, ordered by file name (= worker id).
    pub fn load_workers(&self) -> io::Result<impl Iterator<Item = io::Result<JournalReader>>> {
        let mut paths: Vec<PathBuf> = match self {
            Store::Memory => Vec::new(),
            Store::Fs { dir, .. } => std::fs::read_dir(dir.join("workers"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect(),
        };
        paths.sort();
        // One at a time: each is restored and let go before the next is read.
        Ok(paths.into_iter().map(|p| load(&p)))
    }

    /// Events of worker `id` with `after < seq < before`, in order (none for the memory
    /// store); `None` when there are more than `most`. Read from the journal's end back to
    /// `after` (a journal holds its events in order): a replay costs what it returns,
    /// however long the journal. Lines that do not parse are skipped.
    pub fn read_events(&self, id: &str, after: u64, before: u64, most: usize) -> io::Result<Option<Vec<Event>>> {
        let Store::Fs { dir, .. } = self else {
            return Ok(Some(Vec::new()));
        };
        let mut events = Vec::new();
        for line in LinesBackwards::new(File::open(worker_path(dir, id))?)? {
            let Ok(Record::Event(e)) = serde_json::from_slice::<Record>(&line?) else { continue };
            if e.seq <= after {
                break;
            }
            if e.seq < before {
                if events.len() == most {
                    return Ok(None);
                }
                events.push(e);
            }
        }
        events.reverse();
        Ok(Some(events))
    }

    /// True when events survive a restart (cursors stay valid).
    pub fn is_durable(&self) -> bool {
        matches!(self, Store::Fs { .. })
    }
}

/// The lines of a file, last first, without their newlines (empty ones left out). Each byte
/// is searched once, and a long line is read in chunks that double, so it costs about what
/// reading it forwards does.
struct LinesBackwards {
    file: File,
    /// Where the part of the file not read yet ends.
    pos: u64,
    /// Read, and not yet handed out: the file from `pos` up to the last line handed out.
    buf: Vec<u8>,
    /// How much of the start of `buf` has not been searched for a newline yet (the rest has
    /// none).
    unsearched: usize,
}

impl LinesBackwards {
    fn new(file: File) -> io::Result<LinesBackwards> {
        let pos = file.metadata()?.len();
        Ok(LinesBackwards { file, pos, buf: Vec::new(), unsearched: 0 })
    }
}

impl Iterator for LinesBackwards {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<io::Result<Vec<u8>>> {
        use std::io::Read;
        const CHUNK: u64 = 64 << 10;
        loop {
            // The last line is whole once a newline (or the file's start) comes before it.
            if let Some(at) = self.buf[..self.unsearched].iter().rposition(|b| *b == b'\n') {
                let line = self.buf.split_off(at + 1);
                self.buf.truncate(at);
                self.unsearched = at;
                if !line.is_empty() {
                    return Some(Ok(line));
                }
                continue;
            }
            if self.pos == 0 {
                self.unsearched = 0;
                return (!self.buf.is_empty()).then(|| Ok(std::mem::take(&mut self.buf)));
            }
            let chunk = self.pos.min(CHUNK.max(self.buf.len() as u64));
            self.pos -= chunk;
            let mut read = vec![0; chunk as usize];
            let result = self.file.seek(SeekFrom::Start(self.pos)).and_then(|_| self.file.read_exact(&mut read));
            if let Err(e) = result {
                self.pos = 0;
                self.buf.clear();
                return Some(Err(e));
            }
            read.extend_from_slice(&self.buf);
            self.buf = read;
            self.unsearched = chunk as usize;
        }
    }
}

fn worker_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("workers").join(format!("{id}.jsonl"))
}

/// The store id in `path`, made (and fsync'ed) on first use.
fn read_or_create_store_id(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if crate::http::router::valid_id(text.trim()) => return Ok(text.trim().to_owned()),
        Ok(_) => log::warn!("{}: unreadable store id; making a new one", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = format!("s-{:016x}", crate::clock::random_u64());
    let mut file = File::create(path)?;
    file.write_all(id.as_bytes())?;
    file.sync_all()?;
    sync_parent(path)?;
    Ok(id)
}

/// Makes a new file's name durable: fsync on the file covers its contents, not the directory
/// entry, so a crash right after an acknowledged create could otherwise lose the file.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(unix)]
fn lock_exclusive(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn lock_exclusive(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Opens a journal (creating it when missing) to read its records back. The file is closed
/// once read: appending reopens it.
fn load(path: &Path) -> io::Result<JournalReader> {
    let file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
    Ok(JournalReader {
        name: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        path: Some(path.to_path_buf()),
        lines: Some(io::BufReader::new(file)),
        ..JournalReader::empty()
    })
}

impl Journal {
    /// A journal that keeps nothing (the memory store's).
    pub fn none() -> Journal {
        Journal { path: None, file: None, torn: false }
    }

    /// Appends `records` in one write (opening the file if it is closed); with `durable`,
    /// also fsyncs before returning. A journal whose file was removed (its worker deleted)
    /// is not created again.
    pub fn append(&mut self, records: &[Record], durable: bool) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(OpenOptions::new().append(true).open(path)?),
        };
        let mut buf = Vec::with_capacity(256);
        if self.torn {
            buf.push(b'\n');
        }
        for record in records {
            serde_json::to_writer(&mut buf, record).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        let mut written = 0;
        while written < buf.len() {
            match file.write(&buf[written..]) {
                Ok(0) => return Err(Self::cut_back(file, written, &mut self.torn, io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::cut_back(file, written, &mut self.torn, e)),
            }
        }
        self.torn = false;
        if durable {
            file.sync_data()?;
        }
        if crate::http::sockets::descriptors_were_short() {
            // A journal open for a whole turn, for each worker running one, would leave the
            // process's connections no descriptors: closed after each append then (what
            // must be durable was synced above; the rest is as safe as in an open file).
            self.file = None;
        }
        Ok(())
    }

    /// After a write failed part way (a full disk), removes the `written` bytes of it from the
    /// file's end, so the records of the next append, acknowledged, are not glued to the
    /// fragment and skipped with it at the next start. Where that fails too, `torn` makes
    /// the next append end the fragment's line first. Gives back `error`.
    fn cut_back(file: &mut File, written: usize, torn: &mut bool, error: io::Error) -> io::Error {
        if written > 0 {
            let cut = file.metadata().and_then(|m| file.set_len(m.len().saturating_sub(written as u64)));
            *torn = *torn || cut.is_err();
        }
        error
    }

    /// Fsyncs what was written (nothing to do when the file is closed: closing synced it).
    pub fn sync(&self) -> io::Result<()> {
        self.file.as_ref().map_or(Ok(()), File::sync_data)
    }

    /// Syncs and closes the file; the next append reopens it.
    pub fn close(&mut self) -> io::Result<()> {
        let synced = self.sync();
        self.file = None;
        synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::types::EventPayload;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wg-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn corrupt_and_torn_lines_are_skipped_not_fatal() {
        let dir = temp_dir("corrupt");
        let store = Store::open_fs(&dir).unwrap();
        let mut j = store.create_worker_journal("w1").unwrap();
        let ev = |seq| Record::Event(Event { seq, worker_id: Some("w1".into()), payload: EventPayload::Shutdown });
        j.append(&[ev(1)], true).unwrap();
        let path = worker_path(&dir, "w1");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{not json}\n").unwrap();
        j.append(&[ev(2)], true).unwrap();
        f.write_all(b"{\"record\":\"ev").unwrap(); // torn tail
        drop((f, j, store));

        let store = Store::open_fs(&dir).unwrap();
        let load_all = |store: &Store| -> Vec<(Vec<Record>, Journal)> {
            let mut readers = store.load_workers().unwrap().map(Result::unwrap);
            let all: Vec<_> =
                readers.by_ref().map(|mut reader| (reader.by_ref().collect(), reader.finish().unwrap())).collect();
            all
        };
        let mut loaded = load_all(&store);
        assert_eq!(loaded.len(), 1);
        let seqs: Vec<u64> = loaded[0]
            .0
            .iter()
            .filter_map(|r| match r {
                Record::Event(e) => Some(e.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [1, 2]);
        loaded[0].1.append(&[ev(3)], true).unwrap();
        drop((loaded, store));
        let store = Store::open_fs(&dir).unwrap();
        assert_eq!(load_all(&store)[0].0.len(), 3, "appending after a torn line keeps the new record");
    }

    /// A line whose event id is out of range (up to u64::MAX: the next id would wrap to
    /// one in use) is corrupt: skipped like one that does not parse.
    #[test]
    fn an_event_id_out_of_range_is_a_corrupt_line() {
        let dir = temp_dir("id-range");
        let store = Store::open_fs(&dir).unwrap();
        let mut j = store.create_worker_journal("w1").unwrap();
        let ev = |seq| Record::Event(Event { seq, worker_id: Some("w1".into()), payload: EventPayload::Shutdown });
        j.append(&[ev(1), ev(u64::MAX), ev(MAX_EVENT_ID + 1), ev(MAX_EVENT_ID)], true).unwrap();
        drop((j, store));
        let store = Store::open_fs(&dir).unwrap();
        let mut reader = store.load_workers().unwrap().next().unwrap().unwrap();
        let ids: Vec<u64> = reader.by_ref().map(|r| r.event_id()).collect();
        assert_eq!(ids, [1, MAX_EVENT_ID]);
    }

    /// Lines read backwards are the file's lines, last first: across chunk boundaries, longer
    /// than a chunk, with empty lines and without a last newline.
    #[test]
    fn lines_read_backwards_are_the_files_lines() {
        let dir = temp_dir("backwards");
        std::fs::create_dir_all(&dir).unwrap();
        let long = "y".repeat(200 << 10);
        let lines: Vec<String> = (0..5000).map(|n| format!("line {n}")).chain([long, "last".into()]).collect();
        let path = dir.join("lines");
        std::fs::write(&path, format!("\n{}\n\nno newline", lines.join("\n"))).unwrap();
        let back: Vec<String> = LinesBackwards::new(File::open(&path).unwrap())
            .unwrap()
            .map(|line| String::from_utf8(line.unwrap()).unwrap())
            .collect();
        let want: Vec<String> = std::iter::once("no newline".to_owned()).chain(lines.into_iter().rev()).collect();
        assert_eq!(back, want);
    }

    /// A replay from the journal reads what it returns and no more: past its bound, the
    /// cursor is answered as expired instead of the runtime holding the events.
    #[test]
    fn a_replay_from_the_journal_is_bounded() {
        let dir = temp_dir("replay-bound");
        let store = Store::open_fs(&dir).unwrap();
        let mut j = store.create_worker_journal("w1").unwrap();
        let events: Vec<Record> = (1..=MAX_JOURNAL_REPLAY as u64 + 1)
            .map(|seq| Record::Event(Event { seq, worker_id: Some("w1".into()), payload: EventPayload::Shutdown }))
            .collect();
        j.append(&events, true).unwrap();
        let read = |after, before| store.read_events("w1", after, before, MAX_JOURNAL_REPLAY).unwrap();
        let count = |after, before| read(after, before).map(|events| events.len());
        assert_eq!(count(0, u64::MAX), None, "one more than a replay reads");
        assert_eq!(count(1, u64::MAX), Some(MAX_JOURNAL_REPLAY));
        let seqs: Vec<u64> = read(10, 20).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (11..20).collect::<Vec<_>>(), "in order");
    }

    #[test]
    fn a_second_process_cannot_open_the_same_dir() {
        let dir = temp_dir("lock");
        let _first = Store::open_fs(&dir).unwrap();
        let err = Store::open_fs(&dir).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
