//! One worker: its state, its journal, and the thread that runs its turns.
//!
//! Every change goes through [`Worker::record`]: it takes the next runtime-wide event id,
//! writes the journal (fsync'ed when the change is acknowledged to a client), and only
//! then updates memory, so a failed write changes nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use super::Core;
use super::profile::{Profile, TurnSignal, run_turn};
use super::store::{Journal, JournalReader, Record, StoredEntry};
use crate::runtime::handle::{
    MAX_TRANSCRIPT_LIMIT, MAX_TRANSCRIPT_PAGE_BYTES, RuntimeError, RuntimeResult, check_transcript_limit,
    entries_within_page_bytes,
};
use crate::runtime::types::{
    Activity, CreateExtras, Event, EventPayload, InputAck, InputKind, Intent, LifecycleAck, ProfileRef, Role, Segment,
    Transcript, TranscriptItem, TurnOutcome, TurnResult, TurnStatus, WorkerDetail, WorkerInput, WorkerRef,
    WorkerStatus,
};

/// What a worker was created as; never changes.
pub struct WorkerSpec {
    /// Worker id.
    pub id: String,
    /// Intent.
    pub intent: Intent,
    /// Resolved profile reference.
    pub profile_ref: ProfileRef,
    /// The profile to run (`None` for a recovered worker whose profile is gone; it is stopped).
    pub profile: Option<Profile>,
    /// Optional create fields.
    pub extras: CreateExtras,
    /// The create's idempotency key, if it had one.
    pub idempotency_key: Option<String>,
    /// When it was created (RFC 3339 UTC; `None` for journals older than the field).
    pub created_at: Option<String>,
}

/// Idempotency keys of inputs a worker remembers (the newest; a retry comes soon).
const REMEMBERED_KEYS: usize = 256;

/// A worker and its mutable state.
pub struct Worker {
    core: Arc<Core>,
    spec: WorkerSpec,
    state: Mutex<WorkerState>,
}

struct WorkerState {
    status: WorkerStatus,
    busy: bool,
    turns: u64,
    transcript: Vec<StoredEntry>,
    events: VecDeque<Arc<Event>>,
    /// Sequence of the newest event evicted from `events` (0: none).
    evicted_through: u64,
    last_event_id: u64,
    queue: VecDeque<String>,
    control: Option<Sender<TurnSignal>>,
    journal: Journal,
    subscribers: Vec<Subscriber>,
    /// Found on restore: a turn that started and never ended.
    interrupted: Option<OpenTurn>,
    /// The last journal write failed (said once in the log until one succeeds again).
    journal_failing: bool,
    /// Set when subscribers were dropped for good (deleted, shut down): a subscription that
    /// raced with that ends at once instead of waiting forever.
    closed_for: Option<StreamEnd>,
}

/// A live observer of this worker's events.
struct Subscriber {
    events: Sender<Arc<Event>>,
    end: Arc<EndCause>,
    closed: Arc<AtomicBool>,
    notify: Arc<dyn Fn() + Send + Sync>,
}

/// A turn a journal shows started and not ended.
struct OpenTurn {
    /// Its number.
    turn: u64,
    /// Its output so far.
    output: String,
    /// Its `text_done` (and any `error`) were recorded: only the `turn_end` is missing.
    output_done: bool,
    /// It recorded an `error`.
    failed: bool,
}

/// Why the worker closed a subscription's live channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The runtime is shutting down.
    Shutdown,
    /// The subscriber was too slow: its channel overflowed.
    Overflowed,
    /// The worker was deleted.
    Deleted,
}

/// Where the worker leaves its [`StreamEnd`] for the subscriber to read.
#[derive(Debug, Default)]
pub struct EndCause(AtomicU8);

impl EndCause {
    fn set(&self, end: StreamEnd) {
        self.0.store(end as u8, Ordering::SeqCst);
    }

    /// Why the channel closed (`Shutdown` unless something else was recorded).
    pub fn get(&self) -> StreamEnd {
        match self.0.load(Ordering::SeqCst) {
            1 => StreamEnd::Overflowed,
            2 => StreamEnd::Deleted,
            _ => StreamEnd::Shutdown,
        }
    }
}

/// Marks a subscription closed when its holder drops it.
pub struct ClosedOnDrop(Arc<AtomicBool>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What [`Worker::subscribe`] hands back, atomically with registering the live channel.
pub struct Registration {
    /// Entries, status and activity at registration.
    pub snapshot: (Vec<TranscriptItem>, WorkerStatus, TurnStatus),
    /// The newest event id at registration: live events are all above it.
    pub position: u64,
    /// Retained events after the cursor, from memory.
    pub replay: Vec<Arc<Event>>,
    /// Oldest sequence in memory; older events (above the cursor) are on disk, if anywhere.
    pub memory_from: u64,
    /// Whether events at or below the cursor's successor were evicted from memory.
    pub evicted_through: u64,
    /// The live channel.
    pub live: Receiver<Arc<Event>>,
    /// Why the live channel closed, once it has.
    pub end: Arc<EndCause>,
    /// Unregisters the subscription when dropped.
    pub guard: ClosedOnDrop,
}

impl Worker {
    /// A new worker; the caller records its creation with [`Worker::record_created`].
    pub fn new(core: Arc<Core>, spec: WorkerSpec, journal: Journal) -> Worker {
        let state = WorkerState {
            status: WorkerStatus::Running,
            busy: false,
            turns: 0,
            transcript: Vec::new(),
            events: VecDeque::new(),
            evicted_through: 0,
            last_event_id: 0,
            queue: VecDeque::new(),
            control: None,
            journal,
            subscribers: Vec::new(),
            interrupted: None,
            journal_failing: false,
            closed_for: None,
        };
        Worker { core, spec, state: Mutex::new(state) }
    }

    /// Rebuilds a worker from its journal records (after the `Created` one), including the
    /// inputs it acknowledged but never ran and a turn the restart cut short; see
    /// [`Worker::resume_after_restart`].
    pub fn restore(core: Arc<Core>, spec: WorkerSpec, mut records: JournalReader) -> std::io::Result<Worker> {
        let worker = Worker::new(core, spec, Journal::none());
        {
            let mut st = worker.lock();
            for record in records.by_ref() {
                match record {
                    Record::Entry(entry) => st.transcript.push(entry),
                    Record::Event(event) => {
                        replay_turns(&mut st, &event.payload);
                        worker.apply(&mut st, event);
                    }
                    Record::Created { .. } | Record::Deleted { .. } => {}
                }
            }
            st.transcript.sort_by_key(|e| e.sequence);
            st.journal = records.finish()?;
        }
        Ok(worker)
    }

    /// After a restart: a turn the restart cut short is closed as `interrupted` (its output
    /// so far kept, a `system` entry saying why), and a running worker runs the inputs it
    /// had acknowledged but not yet run. The worker stays running: only stop and cancel
    /// end a worker.
    pub fn resume_after_restart(self: &Arc<Self>) {
        let mut st = self.lock();
        let runs_queue = st.status == WorkerStatus::Running && !st.queue.is_empty();
        if let Some(open) = st.interrupted.take() {
            let closed = self.close_open_turn(&mut st, &open).and_then(|()| {
                let idle = EventPayload::Status { status: TurnStatus::Idle };
                if runs_queue { Ok(()) } else { self.record(&mut st, idle, &[], true).map(|_| ()) }
            });
            if let Err(e) = closed {
                log::error!("worker {}: could not record its interrupted turn: {e}", self.spec.id);
            }
        }
        if runs_queue {
            self.start_turns(&mut st);
        }
        self.settle(&mut st);
    }

    /// Closes a turn the restart found open: one whose output was all recorded ends as it
    /// ended (only its `turn_end` was missing); one cut short ends `interrupted`, its output
    /// so far kept, with a note.
    fn close_open_turn(&self, st: &mut WorkerState, open: &OpenTurn) -> std::io::Result<()> {
        if open.output_done {
            let outcome = if open.failed { TurnOutcome::Failed } else { TurnOutcome::Completed };
            let end = EventPayload::TurnEnd { turn: open.turn, result: TurnResult::Finished, outcome: Some(outcome) };
            return self.record(st, end, &[], true).map(|_| ());
        }
        let note = format!("Turn {} was interrupted by a restart of the runtime.", open.turn);
        close_turn(open.turn, &open.output, TurnOutcome::Interrupted, &note, |payload, entries, durable| {
            self.record(st, payload, entries, durable).map(|_| ())
        })
    }

    /// Closes the journal file unless a turn is running: idle and ended workers hold no
    /// descriptor.
    fn settle(&self, st: &mut WorkerState) {
        if !st.busy {
            if let Err(e) = st.journal.close() {
                log::error!("worker {}: could not flush its journal: {e}", self.spec.id);
            }
        }
    }

    /// True while a turn runs or is ending.
    pub fn is_busy(&self) -> bool {
        self.lock().busy
    }

    /// The worker id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The highest event id this worker holds.
    pub fn last_event_id(&self) -> u64 {
        let st = self.lock();
        st.last_event_id.max(st.transcript.iter().map(|e| e.event_id).max().unwrap_or(0))
    }

    fn lock(&self) -> MutexGuard<'_, WorkerState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn worker_ref(&self) -> WorkerRef {
        WorkerRef { runtime_id: self.core.runtime_id.clone(), worker_id: self.spec.id.clone() }
    }

    /// The wire detail of this worker.
    pub fn detail(&self) -> WorkerDetail {
        let st = self.lock();
        WorkerDetail {
            worker_ref: self.worker_ref(),
            runtime_id: self.core.runtime_id.clone(),
            worker_id: self.spec.id.clone(),
            status: st.status,
            intent: self.spec.intent.clone(),
            profile: self.spec.profile_ref.clone(),
            extras: self.spec.extras.clone(),
            transcript_len: st.transcript.len() as u64,
            last_event_id: st.last_event_id,
            activity: Some(if st.busy { Activity::Busy } else { Activity::Idle }),
            created_at: self.spec.created_at.clone(),
            last_activity_at: st.transcript.last().and_then(|e| e.at.clone()).or_else(|| self.spec.created_at.clone()),
        }
    }

    /// The profile's name and the intent's label, as a snapshot greeting names them.
    pub fn describe(&self) -> (String, String) {
        let profile = self.spec.profile_ref.name().unwrap_or("default").to_owned();
        (profile, self.spec.intent.label())
    }

    /// True when this worker was created by a request with idempotency key `key`.
    pub fn created_with(&self, key: &str) -> bool {
        self.spec.idempotency_key.as_deref() == Some(key)
    }

    /// True when this worker was created as `intent`, running profile `profile`, with `extras`:
    /// a create repeated with its key asks for that, or it is another request.
    pub fn created_as(&self, intent: &Intent, profile: &str, extras: &CreateExtras) -> bool {
        let profile_ref = matches!(&self.spec.profile_ref, ProfileRef::Named(name) if name == profile);
        self.spec.intent == *intent && profile_ref && self.spec.extras == *extras
    }

    /// The current status.
    pub fn status(&self) -> WorkerStatus {
        self.lock().status
    }

    /// Events of this worker with a sequence above `after`, from the in-memory ring.
    pub fn events_after(&self, after: u64) -> Vec<Event> {
        let st = self.lock();
        st.events.iter().filter(|e| e.seq > after).map(|e| Event::clone(e)).collect()
    }

    /// Registers a live channel of `capacity` events and returns, under the same lock, the
    /// snapshot and the retained events after `after`: nothing can fall in between.
    /// `notify` is called after each event is queued.
    pub fn subscribe(&self, after: Option<u64>, capacity: usize, notify: Arc<dyn Fn() + Send + Sync>) -> Registration {
        let mut st = self.lock();
        let (tx, live) = bounded(capacity);
        let end = Arc::new(EndCause::default());
        let closed = Arc::new(AtomicBool::new(false));
        match st.closed_for {
            Some(why) => end.set(why), // `tx` drops: the live channel is closed from the start
            None => st.subscribers.push(Subscriber { events: tx, end: end.clone(), closed: closed.clone(), notify }),
        }
        let entries = latest_entries(&st.transcript).iter().map(|e| self.item(e)).collect();
        let activity = if st.busy { TurnStatus::Running } else { TurnStatus::Idle };
        let replay = match after {
            Some(cursor) => st.events.iter().filter(|e| e.seq > cursor).cloned().collect(),
            None => Vec::new(),
        };
        Registration {
            snapshot: (entries, st.status, activity),
            position: st.last_event_id,
            replay,
            memory_from: st.events.front().map_or(st.last_event_id + 1, |e| e.seq),
            evicted_through: st.evicted_through,
            live,
            end,
            guard: ClosedOnDrop(closed),
        }
    }

    /// Applies an event to memory (no journal write) and hands it to live subscribers.
    fn apply(&self, st: &mut WorkerState, event: Event) {
        st.last_event_id = st.last_event_id.max(event.seq);
        match &event.payload {
            EventPayload::Lifecycle { status, .. } => st.status = *status,
            EventPayload::TurnStart { turn } => st.turns = st.turns.max(*turn),
            _ => {}
        }
        let event = Arc::new(event);
        st.subscribers.retain(|s| match s.events.try_send(event.clone()) {
            Ok(()) => {
                (s.notify)();
                true
            }
            Err(TrySendError::Full(_)) => {
                s.end.set(StreamEnd::Overflowed);
                (s.notify)();
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        st.events.push_back(event);
        while st.events.len() > self.core.options.event_ring {
            if let Some(old) = st.events.pop_front() {
                st.evicted_through = old.seq;
            }
        }
    }

    /// Live subscribers now (those whose session has ended are pruned at the next event).
    pub fn subscriber_count(&self) -> usize {
        let mut st = self.lock();
        st.subscribers.retain(|s| !s.closed.load(Ordering::SeqCst));
        st.subscribers.len()
    }

    /// Drops every live subscriber (runtime shutdown, or the worker deleted): their
    /// channels disconnect.
    pub fn drop_subscribers(&self, why: StreamEnd) {
        let subscribers = {
            let mut st = self.lock();
            st.closed_for = Some(why);
            std::mem::take(&mut st.subscribers)
        };
        for s in subscribers {
            s.end.set(why);
            drop(s.events);
            (s.notify)();
        }
    }

    fn item(&self, e: &StoredEntry) -> TranscriptItem {
        TranscriptItem {
            sequence: e.sequence,
            worker_ref: self.worker_ref(),
            role: e.role,
            content: e.content.clone(),
            event_id: e.event_id,
            at: e.at.clone(),
            origin: None,
        }
    }

    /// Publishes `payload` with the next event id, adding `entries` to the transcript under
    /// the same id. Journal first (fsync'ed when `durable`), memory second.
    fn record(
        &self,
        st: &mut WorkerState,
        payload: EventPayload,
        entries: &[(Role, &str)],
        durable: bool,
    ) -> std::io::Result<(u64, u64)> {
        self.record_keyed(st, payload, entries, None, durable)
    }

    /// [`Worker::record`], with the idempotency key of the input the entries are.
    fn record_keyed(
        &self,
        st: &mut WorkerState,
        payload: EventPayload,
        entries: &[(Role, &str)],
        key: Option<&str>,
        durable: bool,
    ) -> std::io::Result<(u64, u64)> {
        self.record_after(st, None, payload, entries, key, durable)
    }

    /// [`Worker::record_keyed`], with `first` written ahead of the rest in the same write.
    fn record_after(
        &self,
        st: &mut WorkerState,
        first: Option<Record>,
        payload: EventPayload,
        entries: &[(Role, &str)],
        key: Option<&str>,
        durable: bool,
    ) -> std::io::Result<(u64, u64)> {
        let seq = self.core.next_event.fetch_add(1, Ordering::SeqCst);
        let first_sequence = st.transcript.len() as u64 + 1;
        let at = (!entries.is_empty()).then(crate::clock::now_rfc3339);
        let mut payload = payload;
        payload.set_recorded_at(at.clone());
        let new_entries: Vec<StoredEntry> = entries
            .iter()
            .zip(first_sequence..)
            .map(|((role, content), sequence)| StoredEntry {
                sequence,
                role: *role,
                content: (*content).to_owned(),
                event_id: seq,
                at: at.clone(),
                idempotency_key: key.map(str::to_owned),
            })
            .collect();
        let event = Event { seq, worker_id: Some(self.spec.id.clone()), payload };
        let mut records: Vec<Record> =
            first.into_iter().chain(new_entries.iter().cloned().map(Record::Entry)).collect();
        records.push(Record::Event(event.clone()));
        st.journal.append(&records, durable)?;
        st.transcript.extend(new_entries);
        self.apply(st, event);
        Ok((seq, first_sequence))
    }

    /// Records the creation (first line of a new journal).
    pub fn record_created(&self) -> RuntimeResult<()> {
        let mut st = self.lock();
        let created = Record::Created {
            worker_id: self.spec.id.clone(),
            intent: self.spec.intent.clone(),
            profile: self.spec.profile_ref.clone(),
            extras: self.spec.extras.clone(),
            idempotency_key: self.spec.idempotency_key.clone(),
            at: self.spec.created_at.clone(),
        };
        // One write for both, so a create is on record whole or not at all.
        let running = EventPayload::Lifecycle { status: WorkerStatus::Running, reason: None };
        let written = self.record_after(&mut st, Some(created), running, &[], None, true);
        self.settle(&mut st);
        written.map(drop).map_err(store_error)
    }

    /// Accepts an input: durably in the transcript before the ack; a user input queues a turn.
    pub fn input(self: &Arc<Self>, input: WorkerInput) -> RuntimeResult<InputAck> {
        if input.content.trim().is_empty() {
            return Err(RuntimeError::InvalidRequest("input content is blank".into()));
        }
        let role = match input.kind {
            InputKind::User => Role::User,
            InputKind::System => Role::System,
        };
        let mut st = self.lock();
        if let Some(first) = input.idempotency_key.as_deref().and_then(|key| st.keyed_before(key)) {
            // A repeat gets the first ack; a key that named another input is not a repeat.
            if first.role != role || first.content != input.content {
                return Err(RuntimeError::KeyReused);
            }
            let (transcript_sequence, event_id) = (first.sequence, first.event_id);
            return Ok(InputAck { worker_ref: self.worker_ref(), status: st.status, transcript_sequence, event_id });
        }
        if st.status != WorkerStatus::Running {
            return Err(RuntimeError::WorkerNotRunning(st.status));
        }
        if !self.core.accepting.load(Ordering::SeqCst) {
            return Err(RuntimeError::RuntimeStopped);
        }
        let segments = vec![Segment::text(&input.content)];
        let payload = match input.kind {
            InputKind::User => {
                if st.queue.len() >= self.core.options.input_queue {
                    return Err(RuntimeError::WorkerBusy);
                }
                EventPayload::UserMessage { segments, at: None }
            }
            InputKind::System => {
                let item = serde_json::json!({"kind": "text", "content": input.content});
                EventPayload::SystemItem { item, at: None }
            }
        };
        let key = input.idempotency_key.as_deref();
        let recorded = self.record_keyed(&mut st, payload, &[(role, &input.content)], key, true).map_err(store_error);
        if recorded.is_ok() && input.kind == InputKind::User {
            st.queue.push_back(input.content);
            if !st.busy {
                self.start_turns(&mut st);
            }
        }
        self.settle(&mut st);
        let (event_id, sequence) = recorded?;
        Ok(InputAck { worker_ref: self.worker_ref(), status: st.status, transcript_sequence: sequence, event_id })
    }

    fn start_turns(self: &Arc<Self>, st: &mut WorkerState) {
        let (tx, rx) = bounded(8);
        st.busy = true;
        st.control = Some(tx);
        self.core.turn_started();
        let worker = self.clone();
        let spawned = std::thread::Builder::new().name(format!("turns-{}", self.spec.id)).spawn(move || {
            worker.run_turns(&rx);
            worker.core.turn_finished();
        });
        if let Err(e) = spawned {
            log::error!("worker {}: cannot start a turn thread: {e}", self.spec.id);
            st.busy = false;
            st.control = None;
            self.core.turn_finished();
        }
    }

    /// Ends the worker: `Stopped` (graceful) or `Cancelled` (now). Idempotent; a cancel of
    /// a stopped worker still finishing its turn ends that turn now (the stop's grace is
    /// cut short; the worker stays `stopped`).
    pub fn end(&self, status: WorkerStatus, reason: Option<String>) -> RuntimeResult<LifecycleAck> {
        let mut st = self.lock();
        if st.status != WorkerStatus::Running {
            if let (WorkerStatus::Cancelled, Some(control)) = (status, &st.control) {
                let _ = control.try_send(TurnSignal::Cancel);
            }
            return Ok(LifecycleAck { worker_ref: self.worker_ref(), status: st.status, event_id: st.last_event_id });
        }
        // Inputs acknowledged but not run yet are dropped: the transcript says so.
        let how = if status == WorkerStatus::Cancelled { "cancelled" } else { "stopped" };
        let dropped = match st.queue.len() {
            0 => String::new(),
            1 => format!("1 queued input was not run: the worker was {how}."),
            n => format!("{n} queued inputs were not run: the worker was {how}."),
        };
        let entries: &[(Role, &str)] = if dropped.is_empty() { &[] } else { &[(Role::System, &dropped)] };
        let payload = EventPayload::Lifecycle { status, reason };
        let recorded = self.record(&mut st, payload, entries, true).map_err(store_error);
        self.settle(&mut st);
        let (event_id, _) = recorded?;
        st.queue.clear();
        if let Some(control) = &st.control {
            let signal = if status == WorkerStatus::Cancelled { TurnSignal::Cancel } else { TurnSignal::Stop };
            let _ = control.try_send(signal);
        }
        Ok(LifecycleAck { worker_ref: self.worker_ref(), status: st.status, event_id })
    }

    /// Ends the running turn now (its output so far kept, closed as `cancelled`) and keeps the
    /// worker running: inputs it already acknowledged run next. Without a turn: nothing to do.
    pub fn interrupt(&self) -> RuntimeResult<LifecycleAck> {
        let st = self.lock();
        if st.status != WorkerStatus::Running {
            return Err(RuntimeError::WorkerNotRunning(st.status));
        }
        if let Some(control) = &st.control {
            let _ = control.try_send(TurnSignal::Cancel);
        }
        Ok(LifecycleAck { worker_ref: self.worker_ref(), status: st.status, event_id: st.last_event_id })
    }

    /// Asks a running turn to end (runtime shutdown); the worker's status and its queued
    /// inputs are kept: they run after the restart.
    pub fn signal_turn(&self, signal: TurnSignal) {
        let st = self.lock();
        if let Some(control) = &st.control {
            let _ = control.try_send(signal);
        }
    }

    /// Publishes `shutdown` to a running worker's observers, then closes its journal.
    pub fn announce_shutdown(&self) {
        let mut st = self.lock();
        if st.status == WorkerStatus::Running {
            if let Err(e) = self.record(&mut st, EventPayload::Shutdown, &[], false) {
                log::warn!("worker {}: could not record shutdown: {e}", self.spec.id);
            }
        }
        if let Err(e) = st.journal.close() {
            log::error!("worker {}: could not flush its journal: {e}", self.spec.id);
        }
    }

    /// A page of the transcript.
    pub fn transcript(&self, start: u64, limit: u64) -> RuntimeResult<Transcript> {
        check_transcript_limit(limit)?;
        let st = self.lock();
        let total = st.transcript.len() as u64;
        let from = start.min(total) as usize;
        let to = start.saturating_add(limit).min(total) as usize;
        let to = from + entries_within_page_bytes(st.transcript[from..to].iter().map(|e| e.content.len()));
        let items: Vec<TranscriptItem> = st.transcript[from..to].iter().map(|e| self.item(e)).collect();
        let next = start + items.len() as u64;
        Ok(Transcript {
            worker_ref: self.worker_ref(),
            start,
            limit,
            total_items: total,
            next_start: (next < total && !items.is_empty()).then_some(next),
            items,
        })
    }

    /// The turn thread: runs queued inputs in order until the queue is empty.
    fn run_turns(&self, signals: &Receiver<TurnSignal>) {
        loop {
            let mut st = self.lock();
            // Signals still waiting were for a turn that has ended (an interrupt while its end
            // waited for room): none may end the next one.
            for _ in signals.try_iter() {}
            let next = if self.core.accepting.load(Ordering::SeqCst) { st.queue.front().cloned() } else { None };
            let Some(input) = next else {
                self.publish(&mut st, EventPayload::Status { status: TurnStatus::Idle }, &[]);
                st.busy = false;
                st.control = None;
                self.settle(&mut st);
                return;
            };
            let turn = st.turns + 1;
            let announced = self.publish(&mut st, EventPayload::Status { status: TurnStatus::Running }, &[]);
            // An input runs only once its turn's start is on record: else a restart would
            // find it not run, and run it again.
            let start = EventPayload::TurnStart { turn };
            let Some((mut st, signal)) = self.record_turn_event(st, signals, start, &[], false, Retry::WhileRunning)
            else {
                continue; // stopped or cancelled (its input dropped), or the runtime is stopping (kept)
            };
            st.queue.pop_front();
            if !announced {
                self.publish(&mut st, EventPayload::Status { status: TurnStatus::Running }, &[]);
            }
            // Interrupts that came while the start waited end this turn as soon as it runs:
            // one, however many came (the others would end the next turn too).
            let interrupted = signal.is_some() | (signals.try_iter().count() > 0);
            if let (true, Some(control)) = (interrupted, &st.control) {
                let _ = control.try_send(TurnSignal::Cancel);
            }
            drop(st);
            let close = |output: &str, outcome, note: &str| {
                let written = close_turn(turn, output, outcome, note, |payload, entries, durable| {
                    let recorded =
                        self.record_turn_event(self.lock(), signals, payload, entries, durable, Retry::UntilCancelled);
                    recorded.map(drop).ok_or_else(|| {
                        std::io::Error::other("gave up: the worker was cancelled or the runtime stopped")
                    })
                });
                if let Err(e) = written {
                    log::error!("worker {}: turn {turn} could not be closed in its journal: {e}", self.spec.id);
                }
            };
            let Some(profile) = &self.spec.profile else {
                close(
                    "",
                    TurnOutcome::Failed,
                    "This worker's profile is no longer configured on this runtime; the input was not run.",
                );
                continue;
            };
            let grace = self.core.options.stop_grace;
            let output = run_turn(profile, &input, signals, grace, &mut |text| {
                let mut st = self.lock();
                self.publish(&mut st, EventPayload::TextDelta { text: text.to_owned() }, &[]);
            });
            if output.outcome != TurnOutcome::Completed && !self.core.accepting.load(Ordering::SeqCst) {
                // Ended by the runtime's shutdown, not by the user: closed as interrupted.
                let note = format!("Turn {turn} was interrupted because the runtime shut down.");
                close(&output.text, TurnOutcome::Interrupted, &note);
                continue;
            }
            if output.outcome == TurnOutcome::Cancelled {
                // Cut short by request: the transcript says why the reply is short, so a
                // reload shows what the live stream did.
                let note = match self.lock().status {
                    WorkerStatus::Running => format!("Turn {turn} was interrupted."),
                    WorkerStatus::Stopped => format!("Turn {turn} was cut short: the worker was stopped."),
                    WorkerStatus::Cancelled => format!("Turn {turn} was cut short: the worker was cancelled."),
                };
                close(&output.text, TurnOutcome::Cancelled, &note);
                continue;
            }
            let done = EventPayload::TextDone { text: output.text.clone(), at: None };
            let reply: &[(Role, &str)] = if output.text.is_empty() { &[] } else { &[(Role::Assistant, &output.text)] };
            let Some((mut st, _)) =
                self.record_turn_event(self.lock(), signals, done, reply, false, Retry::UntilCancelled)
            else {
                continue;
            };
            if let Some((code, message)) = output.error {
                let error = EventPayload::Error { code: "tool_error".to_owned(), message, detail: Some(code) };
                self.publish(&mut st, error, &[]);
            }
            drop(st);
            let stderr: &[(Role, &str)] =
                if output.stderr.is_empty() { &[] } else { &[(Role::System, &output.stderr)] };
            let end = EventPayload::TurnEnd { turn, result: TurnResult::Finished, outcome: Some(output.outcome) };
            self.record_turn_event(self.lock(), signals, end, stderr, false, Retry::UntilCancelled);
        }
    }

    /// Records an event a turn cannot do without (its start, its reply, its end), with the
    /// worker's lock `st` (fsync'ed when `durable`). A failed write (a full disk, no descriptors left) is retried, the
    /// text kept in memory, with a growing pause and the lock let go meanwhile, for as long
    /// as `retry` says; then it is given up and said in the log (`None`: a restart finds the
    /// turn open and closes it as interrupted, its input not run twice). Gives the lock back
    /// once the event is recorded, with the stop, cancel or interrupt that came meanwhile.
    fn record_turn_event<'a>(
        &'a self,
        mut st: MutexGuard<'a, WorkerState>,
        signals: &Receiver<TurnSignal>,
        payload: EventPayload,
        entries: &[(Role, &str)],
        durable: bool,
        retry: Retry,
    ) -> Option<(MutexGuard<'a, WorkerState>, Option<TurnSignal>)> {
        let mut pause = Duration::from_millis(50);
        let mut signal = None;
        loop {
            let written = self.record(&mut st, payload.clone(), entries, durable);
            if self.journal_written(&mut st, written.as_ref().err()) {
                return Some((st, signal));
            }
            drop(st);
            // A signal ends the pause; it is kept (the channel has no peek) for the caller.
            match signal {
                None => signal = signals.recv_timeout(pause).ok(),
                Some(_) => std::thread::sleep(pause),
            }
            pause = (pause * 2).min(Duration::from_secs(2));
            st = self.lock();
            if !retry.goes_on(&st, self.core.accepting.load(Ordering::SeqCst)) {
                let (what, then) = match payload {
                    EventPayload::TurnStart { .. } => {
                        ("start", "its input was dropped by the stop, or runs after the restart")
                    }
                    EventPayload::TextDone { .. } => ("reply", "a restart closes the turn as interrupted"),
                    _ => ("end", "a restart closes the turn as interrupted"),
                };
                log::error!(
                    "worker {}: gave up recording a turn's {what} (the worker is {}, or the runtime is stopping); {then}",
                    self.spec.id,
                    st.status.as_str()
                );
                return None;
            }
        }
    }

    /// Records an event a turn can do without (its status, a piece of its reply, a tool's
    /// error: the reply and the end say it all); a failed write is only logged. True when
    /// it was recorded.
    fn publish(&self, st: &mut WorkerState, payload: EventPayload, entries: &[(Role, &str)]) -> bool {
        let written = self.record(st, payload, entries, false);
        self.journal_written(st, written.as_ref().err())
    }

    /// Notes how a journal write went: the first failure, and the first success after
    /// failures, are logged (a full disk must not write a line per event). True when it went.
    fn journal_written(&self, st: &mut WorkerState, error: Option<&std::io::Error>) -> bool {
        match (error, st.journal_failing) {
            (Some(e), false) => {
                log::error!("worker {}: could not write to the journal: {e}; its turn waits until it can", self.spec.id)
            }
            (None, true) => log::warn!("worker {}: its journal can be written again", self.spec.id),
            _ => {}
        }
        st.journal_failing = error.is_some();
        error.is_none()
    }
}

/// How long a turn event whose write fails is tried again ([`Worker::record_turn_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// A turn's start: while the worker runs (a stop or cancel drops the input it would run).
    WhileRunning,
    /// What a turn produced, and its end: until the worker is cancelled (a stopped worker's
    /// turn may still finish).
    UntilCancelled,
}

impl Retry {
    /// Whether to try again, the worker being as `st` says; never once the runtime stops
    /// accepting work (`accepting`: its restart closes the turn).
    fn goes_on(self, st: &WorkerState, accepting: bool) -> bool {
        accepting
            && match self {
                Retry::WhileRunning => st.status == WorkerStatus::Running,
                Retry::UntilCancelled => st.status != WorkerStatus::Cancelled,
            }
    }
}

impl WorkerState {
    /// The transcript entry of the input first sent with `key`, if remembered.
    fn keyed_before(&self, key: &str) -> Option<&StoredEntry> {
        let entries = self.transcript.iter().rev().filter(|e| e.idempotency_key.is_some()).take(REMEMBERED_KEYS);
        entries.filter(|e| e.idempotency_key.as_deref() == Some(key)).last()
    }
}

/// Records, with `write`, the end of a turn that produced `output` so far: the output as an
/// assistant entry, then `turn_end` with `outcome` and a `system` note saying why; fsync'ed.
fn close_turn(
    turn: u64,
    output: &str,
    outcome: TurnOutcome,
    note: &str,
    mut write: impl FnMut(EventPayload, &[(Role, &str)], bool) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let reply: &[(Role, &str)] = if output.is_empty() { &[] } else { &[(Role::Assistant, output)] };
    write(EventPayload::TextDone { text: output.to_owned(), at: None }, reply, false)?;
    let end = EventPayload::TurnEnd { turn, result: TurnResult::Finished, outcome: Some(outcome) };
    write(end, &[(Role::System, note)], true)
}

/// The newest entries a snapshot shows: at most a page, and at most a page's bytes.
fn latest_entries(transcript: &[StoredEntry]) -> &[StoredEntry] {
    let mut from = transcript.len().saturating_sub(MAX_TRANSCRIPT_LIMIT as usize);
    let mut bytes: usize = transcript[from..].iter().map(|e| e.content.len()).sum();
    while bytes > MAX_TRANSCRIPT_PAGE_BYTES && from + 1 < transcript.len() {
        bytes -= transcript[from].content.len();
        from += 1;
    }
    &transcript[from..]
}

/// Follows the turn bookkeeping of a journal being replayed: acknowledged user inputs queue,
/// a turn start takes the oldest, a turn end closes it, and stop or cancel drop the queue.
fn replay_turns(st: &mut WorkerState, payload: &EventPayload) {
    match payload {
        EventPayload::UserMessage { segments, .. } => {
            st.queue.push_back(segments.iter().map(|s| s.content.as_str()).collect());
        }
        EventPayload::TurnStart { turn } => {
            st.queue.pop_front();
            st.interrupted = Some(OpenTurn { turn: *turn, output: String::new(), output_done: false, failed: false });
        }
        EventPayload::TextDelta { text } => {
            if let Some(open) = &mut st.interrupted {
                open.output.push_str(text);
            }
        }
        EventPayload::TextDone { .. } => {
            if let Some(open) = &mut st.interrupted {
                open.output_done = true;
            }
        }
        EventPayload::Error { .. } => {
            if let Some(open) = &mut st.interrupted {
                open.failed = true;
            }
        }
        EventPayload::TurnEnd { .. } => st.interrupted = None,
        EventPayload::Lifecycle { status, .. } if *status != WorkerStatus::Running => st.queue.clear(),
        _ => {}
    }
}

/// A failed journal write as the caller is told it: out of descriptors is a moment's
/// overload (503, retry); anything else a storage failure.
pub(super) fn store_error(e: std::io::Error) -> RuntimeError {
    log::error!("store write failed: {e}");
    // Out of descriptors: nothing was written, and a retry in a moment may pass.
    if crate::http::sockets::out_of_descriptors(&e) {
        return RuntimeError::Overloaded;
    }
    RuntimeError::Store(e.kind().to_string())
}
