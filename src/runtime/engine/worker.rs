//! One worker: its state, its journal, and the thread that runs its turns.
//!
//! Every change goes through [`Worker::record`]: it takes the next runtime-wide event id,
//! writes the journal (fsync'ed when the change is acknowledged to a client), and only
//! then updates memory, so a failed write changes nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use super::Core;
use super::profile::{Profile, TurnSignal, run_turn};
use super::store::{Journal, Record, StoredEntry};
use crate::runtime::handle::{MAX_TRANSCRIPT_LIMIT, RuntimeError, RuntimeResult};
use crate::runtime::types::{
    Activity, CreateExtras, Event, EventPayload, InputAck, InputKind, Intent, LifecycleAck, ProfileRef, Role, Segment,
    Transcript, TranscriptItem, TurnStatus, WorkerDetail, WorkerInput, WorkerRef, WorkerStatus,
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
}

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
}

/// A live observer of this worker's events.
struct Subscriber {
    events: Sender<Arc<Event>>,
    overflowed: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    notify: Arc<dyn Fn() + Send + Sync>,
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
    /// Set when the live channel overflowed (the subscriber was too slow) and was dropped.
    pub overflowed: Arc<AtomicBool>,
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
        };
        Worker { core, spec, state: Mutex::new(state) }
    }

    /// Rebuilds a worker from its journal records (after the `Created` one).
    pub fn restore(core: Arc<Core>, spec: WorkerSpec, journal: Journal, records: Vec<Record>) -> Worker {
        let worker = Worker::new(core, spec, journal);
        {
            let mut st = worker.lock();
            for record in records {
                match record {
                    Record::Created { .. } => {}
                    Record::Entry(entry) => st.transcript.push(entry),
                    Record::Event(event) => worker.apply(&mut st, event),
                }
            }
            st.transcript.sort_by_key(|e| e.sequence);
        }
        worker
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
        }
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
        let overflowed = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        st.subscribers.push(Subscriber { events: tx, overflowed: overflowed.clone(), closed: closed.clone(), notify });
        let page = st.transcript.len().saturating_sub(MAX_TRANSCRIPT_LIMIT as usize);
        let entries = st.transcript[page..].iter().map(|e| self.item(e)).collect();
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
            overflowed,
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
                s.overflowed.store(true, Ordering::SeqCst);
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

    /// Drops every live subscriber (runtime shutdown): their channels disconnect.
    pub fn drop_subscribers(&self) {
        let subscribers = std::mem::take(&mut self.lock().subscribers);
        for s in subscribers {
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
        let seq = self.core.next_event.fetch_add(1, Ordering::SeqCst);
        let first_sequence = st.transcript.len() as u64 + 1;
        let new_entries: Vec<StoredEntry> = entries
            .iter()
            .zip(first_sequence..)
            .map(|((role, content), sequence)| StoredEntry {
                sequence,
                role: *role,
                content: (*content).to_owned(),
                event_id: seq,
            })
            .collect();
        let event = Event { seq, worker_id: Some(self.spec.id.clone()), payload };
        let mut records: Vec<Record> = new_entries.iter().cloned().map(Record::Entry).collect();
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
        };
        st.journal.append(&[created], false).map_err(store_error)?;
        let payload = EventPayload::Lifecycle { status: WorkerStatus::Running, reason: None };
        self.record(&mut st, payload, &[], true).map_err(store_error)?;
        Ok(())
    }

    /// After a restart: a worker that was running is stopped, with a system note saying why.
    pub fn stop_after_restart(&self) {
        let mut st = self.lock();
        if st.status != WorkerStatus::Running {
            return;
        }
        let note = "The runtime restarted while this worker was running; it is now stopped.";
        let payload =
            EventPayload::Lifecycle { status: WorkerStatus::Stopped, reason: Some("runtime restarted".into()) };
        if let Err(e) = self.record(&mut st, payload.clone(), &[(Role::System, note)], true) {
            log::error!("worker {}: could not record the restart ({e}); stopping it in memory only", self.spec.id);
            st.status = WorkerStatus::Stopped;
        }
    }

    /// Accepts an input: durably in the transcript before the ack; a user input queues a turn.
    pub fn input(self: &Arc<Self>, input: WorkerInput) -> RuntimeResult<InputAck> {
        if input.content.trim().is_empty() {
            return Err(RuntimeError::InvalidRequest("input content is blank".into()));
        }
        let mut st = self.lock();
        if st.status != WorkerStatus::Running {
            return Err(RuntimeError::WorkerNotRunning(st.status));
        }
        if !self.core.accepting.load(Ordering::SeqCst) {
            return Err(RuntimeError::RuntimeStopped);
        }
        let segments = vec![Segment::text(&input.content)];
        let (role, payload) = match input.kind {
            InputKind::User => {
                if st.queue.len() >= self.core.options.input_queue {
                    return Err(RuntimeError::WorkerBusy);
                }
                (Role::User, EventPayload::UserMessage { segments })
            }
            InputKind::System => (Role::System, EventPayload::SystemMessage { segments }),
        };
        let (event_id, sequence) =
            self.record(&mut st, payload, &[(role, &input.content)], true).map_err(store_error)?;
        if input.kind == InputKind::User {
            st.queue.push_back(input.content);
            if !st.busy {
                self.start_turns(&mut st);
            }
        }
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

    /// Ends the worker: `Stopped` (graceful) or `Cancelled` (now). Idempotent.
    pub fn end(&self, status: WorkerStatus, reason: Option<String>) -> RuntimeResult<LifecycleAck> {
        let mut st = self.lock();
        if st.status != WorkerStatus::Running {
            return Ok(LifecycleAck { worker_ref: self.worker_ref(), status: st.status, event_id: st.last_event_id });
        }
        let payload = EventPayload::Lifecycle { status, reason };
        let (event_id, _) = self.record(&mut st, payload, &[], true).map_err(store_error)?;
        st.queue.clear();
        if let Some(control) = &st.control {
            let signal = if status == WorkerStatus::Cancelled { TurnSignal::Cancel } else { TurnSignal::Stop };
            let _ = control.try_send(signal);
        }
        Ok(LifecycleAck { worker_ref: self.worker_ref(), status: st.status, event_id })
    }

    /// Asks a running turn to end (runtime shutdown); the worker's status is unchanged.
    pub fn signal_turn(&self, signal: TurnSignal) {
        let mut st = self.lock();
        if signal == TurnSignal::Cancel {
            st.queue.clear();
        }
        if let Some(control) = &st.control {
            let _ = control.try_send(signal);
        }
    }

    /// Publishes `shutdown` to a running worker's observers (not fsync'ed).
    pub fn announce_shutdown(&self) {
        let mut st = self.lock();
        if st.status == WorkerStatus::Running {
            if let Err(e) = self.record(&mut st, EventPayload::Shutdown, &[], false) {
                log::warn!("worker {}: could not record shutdown: {e}", self.spec.id);
            }
        }
    }

    /// Fsyncs the journal.
    pub fn sync(&self) -> std::io::Result<()> {
        self.lock().journal.sync()
    }

    /// A page of the transcript.
    pub fn transcript(&self, start: u64, limit: u64) -> RuntimeResult<Transcript> {
        if limit > MAX_TRANSCRIPT_LIMIT {
            return Err(RuntimeError::LimitTooLarge(limit));
        }
        if limit == 0 {
            return Err(RuntimeError::InvalidRequest("limit must be at least 1".into()));
        }
        let st = self.lock();
        let total = st.transcript.len() as u64;
        let from = start.min(total) as usize;
        let to = start.saturating_add(limit).min(total) as usize;
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
    fn run_turns(&self, signals: &crossbeam_channel::Receiver<TurnSignal>) {
        loop {
            let (turn, input) = {
                let mut st = self.lock();
                let next = if self.core.accepting.load(Ordering::SeqCst) { st.queue.pop_front() } else { None };
                let Some(input) = next else {
                    self.publish(&mut st, EventPayload::Status { status: TurnStatus::Idle }, &[]);
                    st.busy = false;
                    st.control = None;
                    return;
                };
                let turn = st.turns + 1;
                self.publish(&mut st, EventPayload::Status { status: TurnStatus::Running }, &[]);
                self.publish(&mut st, EventPayload::TurnStart { turn }, &[]);
                (turn, input)
            };
            let Some(profile) = &self.spec.profile else {
                continue;
            };
            let grace = self.core.options.stop_grace;
            let output = run_turn(profile, &input, signals, grace, &mut |text| {
                let mut st = self.lock();
                self.publish(&mut st, EventPayload::TextDelta { text: text.to_owned() }, &[]);
            });
            let mut st = self.lock();
            let done = EventPayload::TextDone { text: output.text.clone() };
            let reply: &[(Role, &str)] = if output.text.is_empty() { &[] } else { &[(Role::Assistant, &output.text)] };
            self.publish(&mut st, done, reply);
            if let Some((code, message)) = output.error {
                self.publish(&mut st, EventPayload::Error { code, message }, &[]);
            }
            let stderr: &[(Role, &str)] =
                if output.stderr.is_empty() { &[] } else { &[(Role::System, &output.stderr)] };
            self.publish(&mut st, EventPayload::TurnEnd { turn, result: output.result }, stderr);
        }
    }

    /// Records a turn event; a journal failure is logged (the turn's input is already durable).
    fn publish(&self, st: &mut WorkerState, payload: EventPayload, entries: &[(Role, &str)]) {
        if let Err(e) = self.record(st, payload, entries, false) {
            log::error!("worker {}: could not write to the journal: {e}", self.spec.id);
        }
    }
}

fn store_error(e: std::io::Error) -> RuntimeError {
    log::error!("store write failed: {e}");
    RuntimeError::Store(e.kind().to_string())
}
