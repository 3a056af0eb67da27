//! The runtime engine: workers, profiles, transcript, events, store. Independent of HTTP;
//! the gateway embeds it and `worker-gateway runtime` serves it over the Runtime API.

pub mod profile;
pub mod store;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;

pub use profile::{Profile, ProfileKind, TurnSignal};
use store::{Journal, Record, Store};
use worker::{Worker, WorkerSpec};

use super::handle::{
    EventSource, Health, HealthState, MAX_TRANSCRIPT_LIMIT, Payload, RuntimeError, RuntimeHandle, RuntimeKind,
    RuntimeResult, SourceItem, StreamEnded,
};
use super::types::{
    CreateWorker, Event, EventPayload, Greeting, InputAck, LifecycleAck, ProfileRef, RuntimeLimits, RuntimeSummary,
    SnapshotData, Transcript, WorkerDetail, WorkerInput, WorkerStatus, WorkerSummary,
};

/// The engines a starting process has opened, until the start succeeds ([`Opening::keep`]).
/// Dropped before that (the start failed: a bind, another runtime's store), it removes the
/// data dirs they created, while their locks are still held: a failed start leaves no
/// `data/…` behind. A data dir that existed is never removed.
#[derive(Default)]
pub struct Opening {
    engines: Vec<Arc<Engine>>,
}

impl Opening {
    /// Opens an engine ([`Engine::open`]) that is kept or discarded with the others.
    pub fn open(&mut self, options: EngineOptions) -> anyhow::Result<Arc<Engine>> {
        let engine = Arc::new(Engine::open(options)?);
        self.engines.push(engine.clone());
        Ok(engine)
    }

    /// The start succeeded: the engines stay as they are.
    pub fn keep(mut self) -> Vec<Arc<Engine>> {
        std::mem::take(&mut self.engines)
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        for engine in &self.engines {
            engine.discard_new_store();
        }
    }
}

/// Where an engine keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// Nothing survives the process.
    Memory,
    /// Journals in this directory.
    Fs(PathBuf),
}

/// Everything an engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The runtime's id (in wire shapes).
    pub runtime_id: String,
    /// Where state lives.
    pub store: StoreKind,
    /// Profiles by name; always contains `echo`.
    pub profiles: BTreeMap<String, Profile>,
    /// The profile `runtime_default` selects.
    pub default_profile: String,
    /// Grace a running turn gets on `stop`.
    pub stop_grace: Duration,
    /// Inputs a worker queues while a turn runs.
    pub input_queue: usize,
    /// Events per worker kept in memory.
    pub event_ring: usize,
}

impl EngineOptions {
    /// Options with the documented defaults; `echo` is added when missing.
    pub fn new(runtime_id: &str, store: StoreKind, mut profiles: BTreeMap<String, Profile>) -> EngineOptions {
        profiles.entry("echo".to_owned()).or_insert_with(|| Profile::echo("echo", Duration::ZERO));
        EngineOptions {
            runtime_id: runtime_id.to_owned(),
            store,
            profiles,
            default_profile: "echo".to_owned(),
            stop_grace: Duration::from_secs(5),
            input_queue: 32,
            event_ring: 4096,
        }
    }
}

/// A subscription to one worker's events (see [`Engine::subscribe`]).
pub struct EventStream {
    /// The worker's state at subscription.
    pub snapshot: SnapshotData,
    /// The newest event id at subscription (the snapshot's cursor).
    pub position: u64,
    /// Retained events after the requested cursor, in order.
    pub replay: Vec<Arc<Event>>,
    /// The cursor was unknown (future) or expired (older than what is retained).
    pub cursor_problem: bool,
    /// Live events, all above `position`.
    pub live: crossbeam_channel::Receiver<Arc<Event>>,
    /// Why `live` closed, once it has.
    pub end: Arc<worker::EndCause>,
    /// Unregisters the subscription when the stream is dropped.
    pub guard: worker::ClosedOnDrop,
}

/// State shared by the engine and its workers' turn threads.
pub struct Core {
    runtime_id: String,
    options: EngineOptions,
    next_event: AtomicU64,
    accepting: AtomicBool,
    turns_running: Mutex<usize>,
    turns_done: Condvar,
}

impl Core {
    fn turn_started(&self) {
        *self.turns_running.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn turn_finished(&self) {
        let mut running = self.turns_running.lock().unwrap_or_else(|p| p.into_inner());
        *running = running.saturating_sub(1);
        self.turns_done.notify_all();
    }

    /// Waits until no turn thread runs; false when `deadline` passed first.
    fn wait_turns(&self, deadline: Instant) -> bool {
        let mut running = self.turns_running.lock().unwrap_or_else(|p| p.into_inner());
        while *running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            running = self.turns_done.wait_timeout(running, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

/// An embedded runtime: the engine behind the `RuntimeHandle` trait.
pub struct Engine {
    core: Arc<Core>,
    store: Store,
    boot_id: String,
    workers: RwLock<BTreeMap<String, Arc<Worker>>>,
    next_worker: Mutex<u64>,
    /// `runtime.jsonl`: boots and deletions.
    runtime_journal: Mutex<Journal>,
}

impl Engine {
    /// Opens the store, recovers workers (running ones stay running: a turn the restart cut
    /// short is closed as interrupted, acknowledged inputs not yet run are run) and records
    /// a `runtime_started` event.
    pub fn open(options: EngineOptions) -> anyhow::Result<Engine> {
        let store = match &options.store {
            StoreKind::Memory => Store::Memory,
            StoreKind::Fs(dir) => {
                Store::open_fs(dir).with_context(|| format!("cannot open data dir {}", dir.display()))?
            }
        };
        let core = Arc::new(Core {
            runtime_id: options.runtime_id.clone(),
            options,
            next_event: AtomicU64::new(1),
            accepting: AtomicBool::new(true),
            turns_running: Mutex::new(0),
            turns_done: Condvar::new(),
        });
        let mut runtime_journal = store.open_runtime_journal().context("cannot read runtime.jsonl")?;
        let runtime_records: Vec<Record> = runtime_journal.by_ref().collect();
        let mut journal = runtime_journal.finish().context("cannot read runtime.jsonl")?;
        let mut max_event = runtime_records.iter().map(Record::event_id).max().unwrap_or(0);
        let deleted: BTreeSet<&str> = runtime_records
            .iter()
            .filter_map(|r| match r {
                Record::Deleted { worker_id, .. } => Some(worker_id.as_str()),
                _ => None,
            })
            .collect();
        let mut max_worker = deleted.iter().filter_map(|id| worker_number(id)).max().unwrap_or(0);
        let mut workers = BTreeMap::new();
        for reader in store.load_workers().context("cannot read worker journals")? {
            let mut reader = reader.context("cannot read a worker journal")?;
            let name = reader.name.clone();
            // Counted even when unusable: its id was handed out (or about to be).
            max_worker = max_worker.max(worker_number(&name).unwrap_or(0));
            let Some(first) = reader.next() else {
                reader.finish().context("cannot read a worker journal")?;
                // A create that died before its first record: never acknowledged, nothing to keep.
                log::warn!("removing the empty journal of {name}, a create cut short");
                store.remove_worker_journal(&name).context("cannot remove an empty journal")?;
                continue;
            };
            let Some(worker) = restore_worker(&core, first, reader).context("cannot read a worker journal")? else {
                continue;
            };
            if deleted.contains(worker.id()) {
                // Deleted, but the process died before the file went: finish the deletion.
                store.remove_worker_journal(worker.id()).context("cannot remove a deleted worker's journal")?;
                continue;
            }
            max_event = max_event.max(worker.last_event_id());
            workers.insert(worker.id().to_owned(), Arc::new(worker));
        }
        // The journals' records, read and let go: their memory back to the system.
        crate::memory::return_freed_memory();
        core.next_event.store(max_event + 1, Ordering::SeqCst);
        let boot_id = format!("b-{:016x}", crate::clock::random_u64());
        let started = Event {
            seq: core.next_event.fetch_add(1, Ordering::SeqCst),
            worker_id: None,
            payload: EventPayload::RuntimeStarted { boot_id: boot_id.clone() },
        };
        journal.append(&[Record::Event(started)], true).context("cannot write runtime.jsonl")?;
        journal.close().context("cannot write runtime.jsonl")?;
        for worker in workers.values() {
            worker.resume_after_restart();
        }
        // Where the workers live, so a start from another directory is not a mystery.
        match &core.options.store {
            StoreKind::Fs(dir) => log::info!(
                "runtime {}: fs store in {}, {} workers recovered",
                core.runtime_id,
                std::path::absolute(dir).unwrap_or_else(|_| dir.clone()).display(),
                workers.len()
            ),
            StoreKind::Memory => log::info!("runtime {}: memory store (nothing survives a restart)", core.runtime_id),
        }
        Ok(Engine {
            core,
            store,
            boot_id,
            workers: RwLock::new(workers),
            next_worker: Mutex::new(max_worker + 1),
            runtime_journal: Mutex::new(journal),
        })
    }

    /// Removes the data dir when opening this engine created it (see
    /// [`Store::remove_if_created`]); for [`Opening`].
    fn discard_new_store(&self) {
        if let Err(e) = self.store.remove_if_created() {
            log::warn!("runtime {}: cannot remove the data dir it created: {e}", self.core.runtime_id);
        }
    }

    /// The boot id of this process's engine.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    fn get(&self, worker_id: &str) -> RuntimeResult<Arc<Worker>> {
        let workers = self.workers.read().unwrap_or_else(|p| p.into_inner());
        workers.get(worker_id).cloned().ok_or(RuntimeError::WorkerNotFound)
    }

    fn all(&self) -> Vec<Arc<Worker>> {
        self.workers.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Events of `worker_id` after sequence `after`, from the in-memory log.
    pub fn events_after(&self, worker_id: &str, after: u64) -> RuntimeResult<Vec<Event>> {
        Ok(self.get(worker_id)?.events_after(after))
    }

    /// Subscribes to `worker_id`'s events after cursor `after` (or from now, with a snapshot
    /// either way). Replay comes from memory, or from the journal for older cursors (fs);
    /// live events follow with no gap and no duplicate. `notify` runs after each live event.
    pub fn subscribe(
        &self,
        worker_id: &str,
        after: Option<u64>,
        capacity: usize,
        notify: Arc<dyn Fn() + Send + Sync>,
    ) -> RuntimeResult<EventStream> {
        let worker = self.get(worker_id)?;
        let reg = worker.subscribe(after, capacity, notify);
        let mut replay = reg.replay;
        let mut cursor_problem = false;
        if let Some(cursor) = after {
            if cursor > reg.position {
                cursor_problem = true; // unknown: from the future, or another boot
                replay.clear();
            } else if reg.evicted_through > cursor {
                // The replay as a whole, these and the ones in memory, is bounded.
                let most = store::MAX_JOURNAL_REPLAY.saturating_sub(replay.len());
                match self.store.read_events(worker_id, cursor, reg.memory_from, most) {
                    Ok(Some(older)) if self.store.is_durable() => {
                        let mut all: Vec<Arc<Event>> = older.into_iter().map(Arc::new).collect();
                        all.append(&mut replay);
                        replay = all;
                    }
                    // Expired: memory only, or further back than a replay reads.
                    Ok(_) => cursor_problem = true,
                    Err(e) => {
                        log::warn!("worker {worker_id}: cannot read its journal for replay: {e}");
                        cursor_problem = true;
                    }
                }
            }
        }
        let (entries, worker_status, status) = reg.snapshot;
        let (model, scope_summary) = worker.describe();
        let greeting = Greeting {
            worker_name: worker_id.to_owned(),
            cwd: String::new(),
            provider: "worker-gateway".to_owned(),
            model,
            scope_summary,
            tools: Vec::new(),
            context_window: 0,
            context_tokens: 0,
            runtime_id: self.core.runtime_id.clone(),
            worker_id: worker_id.to_owned(),
            worker_status,
            boot_id: Some(self.boot_id.clone()),
            durable_cursors: self.store.is_durable(),
            cursor_honoured: after.map(|_| !cursor_problem),
            store_id: self.store.store_id().map(str::to_owned),
        };
        Ok(EventStream {
            snapshot: SnapshotData { entries, greeting, status },
            position: reg.position,
            replay,
            cursor_problem,
            live: reg.live,
            end: reg.end,
            guard: reg.guard,
        })
    }

    /// Stops accepting work, lets running turns end within `grace` (then cancels them),
    /// tells observers, and fsyncs every journal.
    pub fn shutdown(&self, grace: Duration) {
        self.core.accepting.store(false, Ordering::SeqCst);
        let workers = self.all();
        let running = workers.iter().filter(|w| w.is_busy()).count();
        if running > 0 {
            // Each stopped turn has its stop grace to finish, within the shutdown's.
            log::info!(
                "runtime {}: giving {running} running turn(s) up to {} ms to finish, then cancelling them",
                self.core.runtime_id,
                grace.min(self.core.options.stop_grace).as_millis()
            );
        }
        for worker in &workers {
            worker.signal_turn(TurnSignal::Stop);
        }
        if !self.core.wait_turns(Instant::now() + grace) {
            for worker in &workers {
                worker.signal_turn(TurnSignal::Cancel);
            }
            self.core.wait_turns(Instant::now() + Duration::from_secs(2));
        }
        for worker in &workers {
            worker.announce_shutdown();
            worker.drop_subscribers(worker::StreamEnd::Shutdown);
        }
    }

    /// The next worker id: `worker-%08x` from a counter that the fs store persists (deleted
    /// ids included); the memory store, which forgets it, adds this boot's id so that no id
    /// ever names two workers.
    fn worker_id(&self, number: u64) -> String {
        if self.store.is_durable() {
            format!("worker-{number:08x}")
        } else {
            format!("worker-{}-{number:08x}", &self.boot_id[2..10])
        }
    }

    fn resolve_profile(&self, profile: &ProfileRef) -> RuntimeResult<Profile> {
        let name = profile.name().unwrap_or(&self.core.options.default_profile);
        self.core.options.profiles.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.core.options.profiles.keys().map(String::as_str).collect();
            RuntimeError::InvalidRequest(format!(
                "unknown profile `{}`; this runtime has: {}",
                crate::http::error::visible(name, 120),
                known.join(", ")
            ))
        })
    }
}

/// The worker whose journal starts with `first` and goes on in `rest`; `None` (and the
/// journal let be) when it does not start with a creation record.
fn restore_worker(core: &Arc<Core>, first: Record, rest: store::JournalReader) -> std::io::Result<Option<Worker>> {
    let Record::Created { worker_id, intent, profile, extras, idempotency_key, at } = first else {
        log::warn!("skipping a worker journal that does not start with its creation record");
        return Ok(None);
    };
    let resolved = profile.name().and_then(|name| core.options.profiles.get(name)).cloned();
    let spec = WorkerSpec {
        id: worker_id,
        intent,
        profile_ref: profile,
        profile: resolved,
        extras,
        idempotency_key,
        created_at: at,
    };
    Worker::restore(core.clone(), spec, rest).map(Some)
}

/// The counter in `worker-%08x`, if the id has that form.
fn worker_number(id: &str) -> Option<u64> {
    id.strip_prefix("worker-").and_then(|hex| u64::from_str_radix(hex, 16).ok())
}

impl RuntimeHandle for Engine {
    fn summary(&self) -> RuntimeResult<RuntimeSummary> {
        let workers = self.all();
        let count = |status| workers.iter().filter(|w| w.status() == status).count() as u64;
        let running = self.core.accepting.load(Ordering::SeqCst);
        Ok(RuntimeSummary {
            runtime_id: self.core.runtime_id.clone(),
            display_name: None,
            backend: self.store.backend().to_owned(),
            status: if running { "running" } else { "stopped" }.to_owned(),
            worker_count: workers.len() as u64,
            active_worker_count: count(WorkerStatus::Running),
            stopped_worker_count: count(WorkerStatus::Stopped),
            cancelled_worker_count: count(WorkerStatus::Cancelled),
            diagnostic_count: 0,
            limits: RuntimeLimits {
                max_transcript_projection_items: MAX_TRANSCRIPT_LIMIT,
                max_event_batch_items: MAX_TRANSCRIPT_LIMIT,
            },
            boot_id: Some(self.boot_id.clone()),
            profiles: Some(self.core.options.profiles.keys().cloned().collect()),
            event_subscribers: Some(workers.iter().map(|w| w.subscriber_count() as u64).sum()),
        })
    }

    fn list_workers(&self) -> RuntimeResult<Vec<WorkerSummary>> {
        Ok(self.all().iter().map(|w| w.detail().summary()).collect())
    }

    fn create_worker(&self, request: CreateWorker) -> RuntimeResult<WorkerDetail> {
        if !self.core.accepting.load(Ordering::SeqCst) {
            return Err(RuntimeError::RuntimeStopped);
        }
        let profile = self.resolve_profile(&request.profile)?;
        let extras = request.extras.normalized();
        let mut next = self.next_worker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = &request.idempotency_key {
            // A repeated create (same key) answers with the worker the first one made; a key
            // that made a worker of another kind is not a repeat.
            if let Some(first) = self.all().into_iter().find(|w| w.created_with(key)) {
                return match first.created_as(&request.intent, &profile.name, &extras) {
                    true => Ok(first.detail()),
                    false => Err(RuntimeError::KeyReused),
                };
            }
        }
        let id = self.worker_id(*next);
        // The id is used up even when its journal cannot be made: a file half made (created,
        // its folder not synced) must not stand in the way of every create after it.
        *next += 1;
        let journal: Journal = self.store.create_worker_journal(&id).map_err(worker::store_error)?;
        let spec = WorkerSpec {
            id: id.clone(),
            intent: request.intent,
            profile_ref: ProfileRef::Named(profile.name.clone()),
            profile: Some(profile),
            extras,
            idempotency_key: request.idempotency_key,
            created_at: Some(crate::clock::now_rfc3339()),
        };
        let worker = Arc::new(Worker::new(self.core.clone(), spec, journal));
        if let Err(e) = worker.record_created() {
            // Nothing was acknowledged: no worker may appear from it at the next start.
            if let Err(removed) = self.store.remove_worker_journal(&id) {
                log::warn!("worker {id}: its create failed, and so did removing its journal ({removed})");
            }
            return Err(e);
        }
        self.workers.write().unwrap_or_else(|p| p.into_inner()).insert(id, worker.clone());
        Ok(worker.detail())
    }

    fn worker(&self, worker_id: &str) -> RuntimeResult<WorkerDetail> {
        Ok(self.get(worker_id)?.detail())
    }

    fn input(&self, worker_id: &str, input: WorkerInput) -> RuntimeResult<InputAck> {
        self.get(worker_id)?.input(input)
    }

    fn stop(&self, worker_id: &str, reason: Option<String>) -> RuntimeResult<LifecycleAck> {
        self.get(worker_id)?.end(WorkerStatus::Stopped, reason)
    }

    fn cancel(&self, worker_id: &str, reason: Option<String>) -> RuntimeResult<LifecycleAck> {
        self.get(worker_id)?.end(WorkerStatus::Cancelled, reason)
    }

    fn interrupt(&self, worker_id: &str) -> RuntimeResult<LifecycleAck> {
        self.get(worker_id)?.interrupt()
    }

    fn delete(&self, worker_id: &str) -> RuntimeResult<()> {
        // Deletions take turns on the runtime journal; the workers map is locked only to take
        // the worker out, so no read of another worker waits on the tombstone's fsync.
        let mut journal = self.runtime_journal.lock().unwrap_or_else(|p| p.into_inner());
        let worker = self.get(worker_id)?;
        if worker.status() == WorkerStatus::Running || worker.is_busy() {
            return Err(RuntimeError::WorkerRunning);
        }
        // The tombstone first: a crash before the file goes finishes the deletion at start.
        let event_id = self.core.next_event.fetch_add(1, Ordering::SeqCst);
        let tombstone = Record::Deleted { worker_id: worker_id.to_owned(), event_id };
        let written = journal.append(&[tombstone], true).and_then(|()| journal.close());
        written.map_err(worker::store_error)?;
        self.workers.write().unwrap_or_else(|p| p.into_inner()).remove(worker_id);
        drop(journal);
        worker.drop_subscribers(worker::StreamEnd::Deleted);
        if let Err(e) = self.store.remove_worker_journal(worker_id) {
            log::error!(
                "worker {worker_id}: deleted, but its journal could not be removed ({e}); it goes at the next start"
            );
        }
        Ok(())
    }

    fn transcript(&self, worker_id: &str, start: u64, limit: u64) -> RuntimeResult<Transcript> {
        self.get(worker_id)?.transcript(start, limit)
    }

    fn health(&self) -> Health {
        let now = crate::clock::now_rfc3339();
        let summary = self.summary().ok();
        let running = summary.as_ref().is_some_and(|s| s.status == "running");
        Health {
            state: if running { HealthState::Healthy } else { HealthState::Unreachable },
            checked_at: Some(now.clone()),
            last_ok_at: running.then_some(now),
            latency_ms: Some(0.0),
            last_error: None,
            summary,
        }
    }

    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Embedded
    }

    fn open_events(&self, worker_id: &str, after: Option<u64>) -> RuntimeResult<Box<dyn EventSource>> {
        let stream = self.subscribe(worker_id, after, 65_536, Arc::new(|| {}))?;
        Ok(Box::new(EngineSource::new(stream, after, &self.boot_id, self.store.is_durable())))
    }
}

/// The engine's own stream as an [`EventSource`] (what an embedded relay consumes).
struct EngineSource {
    first: std::collections::VecDeque<SourceItem>,
    live: crossbeam_channel::Receiver<Arc<Event>>,
    end: Arc<worker::EndCause>,
    last: u64,
    _guard: worker::ClosedOnDrop,
}

impl EngineSource {
    fn new(stream: EventStream, after: Option<u64>, boot_id: &str, durable: bool) -> EngineSource {
        let mut first = std::collections::VecDeque::new();
        first.push_back(SourceItem::Snapshot {
            position: stream.position,
            boot_id: Some(boot_id.to_owned()),
            durable,
            cursor_honoured: after.map(|_| !stream.cursor_problem),
            store_id: stream.snapshot.greeting.store_id.clone(),
        });
        let mut last = after.filter(|_| !stream.cursor_problem).unwrap_or(stream.position);
        for event in &stream.replay {
            first.extend(raw_event(event));
            last = last.max(event.seq);
        }
        EngineSource { first, live: stream.live, end: stream.end, last, _guard: stream.guard }
    }
}

fn raw_event(event: &Event) -> Option<SourceItem> {
    let payload = Payload::serialize(&event.payload).ok()?;
    Some(SourceItem::Event { seq: event.seq, payload })
}

impl EventSource for EngineSource {
    fn next(&mut self, wait: Duration) -> Result<Option<SourceItem>, StreamEnded> {
        if let Some(item) = self.first.pop_front() {
            return Ok(Some(item));
        }
        use crossbeam_channel::RecvTimeoutError;
        let received = if wait.is_zero() {
            // A zero-timeout receive would spin and yield before giving up.
            self.live.try_recv().map_err(|e| match e {
                crossbeam_channel::TryRecvError::Empty => RecvTimeoutError::Timeout,
                crossbeam_channel::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            self.live.recv_timeout(wait)
        };
        match received {
            Ok(event) if event.seq > self.last => {
                self.last = event.seq;
                Ok(raw_event(&event))
            }
            Ok(_) => Ok(None),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) if self.end.get() == worker::StreamEnd::Deleted => {
                let message = "the worker was deleted".to_owned();
                Ok(Some(SourceItem::Diagnostic { code: "runtime.worker_not_found".into(), message }))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(StreamEnded::Broken("the runtime stopped or the relay fell behind".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::types::{CreateExtras, Intent};

    fn create(engine: &Engine) -> String {
        let request = CreateWorker {
            intent: Intent::Task { objective: "test".into() },
            profile: ProfileRef::Named("echo".into()),
            extras: CreateExtras::default(),
            idempotency_key: None,
        };
        engine.create_worker(request).expect("create").worker_id
    }

    #[test]
    fn a_delete_waiting_on_the_runtime_journal_keeps_no_read_of_another_worker_waiting() {
        let profiles = BTreeMap::from([("echo".to_owned(), Profile::echo("echo", Duration::ZERO))]);
        let engine = Arc::new(Engine::open(EngineOptions::new("rt", StoreKind::Memory, profiles)).expect("opens"));
        let (ended, other) = (create(&engine), create(&engine));
        engine.stop(&ended, None).expect("stop");

        // As if another deletion's tombstone were being written (an fsync on a slow disk).
        let journal = engine.runtime_journal.lock().expect("journal");
        let deleting = {
            let (engine, ended) = (engine.clone(), ended.clone());
            std::thread::spawn(move || engine.delete(&ended))
        };
        let (done, reads) = crossbeam_channel::bounded(1);
        let reader = engine.clone();
        std::thread::spawn(move || {
            // Reads spread over a quarter second, while the delete waits for its turn.
            for _ in 0..50 {
                if reader.worker(&other).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = done.send(reader.worker(&other).is_ok());
        });
        let answered = reads.recv_timeout(Duration::from_secs(5));
        drop(journal);
        assert_eq!(answered, Ok(true), "reads of another worker waited on the deletion");
        assert!(deleting.join().expect("delete thread").is_ok());
        assert!(matches!(engine.worker(&ended), Err(RuntimeError::WorkerNotFound)));
    }
}
