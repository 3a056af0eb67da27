//! The event hub: one relay per `(runtime, worker)` that has subscribers.
//!
//! A relay owns one upstream (the remote's WebSocket, or the engine's subscription) on a
//! thread of its own, keeps a bounded replay ring and fans frames out through bounded
//! channels — each frame serialized once and shared. A subscriber that falls behind skips
//! events and is told with a `gap`; past a hard limit it is closed with 1008
//! `slow_consumer`. Nobody slows the upstream or the others.
//!
//! A relay is a cache of the runtime's stream, never its only memory: cursors (see
//! [`super::cursor`]) carry the runtime's own event id, so a cursor older than the ring is
//! served by reading the runtime's replay, and a relay that lingered out, a restarted
//! gateway or a replica resumes it exactly. What the runtime no longer holds is reported
//! (`gap`, `reset`), never skipped in silence.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, unbounded};
use serde_json::json;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::cursor::{self, Lineage, Presented};
use crate::http::websocket::{DRAIN_BATCH, Feed, Waker, close_frame};
use crate::runtime::frames::{EventFramer, diagnostic_frame, event_frame};
use crate::runtime::handle::{EventSource, Payload, RuntimeError, RuntimeHandle, SourceItem, StreamEnded};

/// Limits of relays and their subscribers.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Events kept for replay per stream.
    pub ring_events: usize,
    /// Bytes of frames kept for replay per stream.
    pub ring_bytes: usize,
    /// Frames a subscriber may have queued before it starts skipping (and gets a `gap`).
    pub queue: usize,
    /// Events a subscriber may skip before it is closed with 1008 `slow_consumer`.
    pub lag_limit: u64,
    /// How long a relay outlives its last subscriber.
    pub linger: Duration,
    /// Cap of the upstream reconnect backoff.
    pub backoff_cap: Duration,
    /// How long opening an upstream (or reading a replay) may take before a subscriber is
    /// told the stream is unavailable.
    pub open_timeout: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            ring_events: 4096,
            ring_bytes: 4 << 20,
            queue: 1024,
            lag_limit: 8192,
            linger: Duration::from_secs(5),
            backoff_cap: Duration::from_secs(5),
            open_timeout: Duration::from_secs(10),
        }
    }
}

type Key = (String, String);

/// Counters of everything relayed, for `/metrics`.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Events received from upstreams and numbered.
    pub events: AtomicU64,
    /// Upstream connections re-established (after a drop, or to let a large read buffer go).
    pub reconnects: AtomicU64,
    /// `gap` frames sent.
    pub gaps: AtomicU64,
    /// Subscribers closed with 1008 `slow_consumer`.
    pub slow_consumers: AtomicU64,
}

/// All relays of a gateway.
pub struct Hub {
    relays: Mutex<HashMap<Key, Arc<Relay>>>,
    upstreams: AtomicUsize,
    options: RelayOptions,
    counters: Arc<RelayCounters>,
}

struct Relay {
    runtime_id: String,
    worker_id: String,
    /// Frames this stream's events.
    framer: EventFramer,
    counters: Arc<RelayCounters>,
    handle: Arc<dyn RuntimeHandle>,
    state: Mutex<RelayState>,
    /// Signalled when the first upstream connection succeeded or failed.
    opened: Condvar,
    /// One replay from the runtime at a time per stream, so browsers that come back together
    /// (a gateway restart) cost the runtime one replay, whose events the next ones then find
    /// in the ring.
    replays: ReplayGate,
}

#[derive(Default)]
struct RelayState {
    /// The stream tag of the runtime's current lineage; `None` until the upstream opened.
    tag: Option<u64>,
    /// See [`Opened::cannot_tell_restarts`].
    cannot_tell_restarts: bool,
    /// The runtime resumed the current connection from the relay's cursor.
    honours_cursors: bool,
    /// The first upstream connection failed: the relay is not usable.
    failed: Option<RuntimeError>,
    /// The ring holds every event of the worker above this runtime event id.
    floor: u64,
    /// The newest runtime event id published (or the floor).
    last_seq: u64,
    ring: VecDeque<Entry>,
    ring_bytes: usize,
    subscribers: Vec<Slot>,
    /// Subscribers that found this relay and are still reading their replay: it must not
    /// linger out under them.
    joining: usize,
    next_slot: u64,
    idle_since: Option<Instant>,
    ended: bool,
    /// The stream stands before a frame it cannot read: where (`last_seq`), and what its
    /// subscribers were told (subscribers joining meanwhile are told too).
    stuck: Option<(u64, Utf8Bytes)>,
}

struct Entry {
    seq: u64,
    frame: Utf8Bytes,
}

struct Slot {
    id: u64,
    /// Unbounded (it allocates as it grows, not up front); `cap` and `max_bytes` bound it.
    tx: Sender<Utf8Bytes>,
    cap: usize,
    /// Bytes of the frames waiting in `tx` (the session takes off what it drains), and how
    /// many may wait: a few large events fill a queue as surely as many small ones.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    waker: Arc<Waker>,
    killed: Arc<AtomicBool>,
    lagging: Arc<AtomicBool>,
    /// The runtime event id this subscriber has seen (or been told it skipped) up to.
    last_seq: u64,
    /// Events skipped since, and the id of the last of them.
    skipped: u64,
    last_skipped: u64,
    /// Frames were queued since this subscriber was last woken.
    unwoken: bool,
}

/// A fresh snapshot of a worker for a new subscriber. Its position is read before the
/// upgrade (so its failures are HTTP errors). Its payload is read then too for a browser
/// without a cursor; for one with a cursor it is read only if the cursor turns out not to be
/// of this stream: browsers coming back together (a gateway restart) do not each have the
/// runtime read them a transcript they never see.
pub struct Snapshot {
    /// The runtime cursor it stands at (the worker's `last_event_id`).
    pub position: u64,
    payload: Mutex<Option<serde_json::Value>>,
    read: Box<dyn Fn() -> Result<serde_json::Value, RuntimeError> + Send + Sync>,
}

impl Snapshot {
    /// A snapshot whose payload is `read` when first needed.
    pub fn new(
        position: u64,
        read: impl Fn() -> Result<serde_json::Value, RuntimeError> + Send + Sync + 'static,
    ) -> Snapshot {
        Snapshot { position, payload: Mutex::new(None), read: Box::new(read) }
    }

    /// Reads the payload now, so that its failure is the caller's.
    pub fn read_now(self) -> Result<Snapshot, RuntimeError> {
        self.with_payload(|_| ())?;
        Ok(self)
    }

    /// `make` of the `snapshot` event payload, as browsers see it (read once).
    fn with_payload<T>(&self, make: impl FnOnce(&serde_json::Value) -> T) -> Result<T, RuntimeError> {
        let mut payload = self.payload.lock().unwrap_or_else(|p| p.into_inner());
        let payload = match payload.take() {
            Some(read) => payload.insert(read),
            None => payload.insert((self.read)()?),
        };
        Ok(make(payload))
    }
}

/// A subscriber's end: frames to send, and the kill flag of a too-slow subscriber.
pub struct Subscription {
    frames: Receiver<Utf8Bytes>,
    /// See [`Slot::queued`].
    queued: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
    lagging: Arc<AtomicBool>,
    relay: Arc<Relay>,
    id: u64,
}

/// What the first item of an upstream connection said.
struct Opened {
    source: Box<dyn EventSource>,
    tag: u64,
    /// The runtime event id the connection resumes after.
    position: u64,
    /// The runtime could replay from the requested cursor.
    honoured: bool,
    /// The runtime keeps no events across restarts and does not tell its boot id (which
    /// would change the tag): a cursor it cannot honour may mean it restarted. One that
    /// tells its boot id and has not restarted has only outlived its retention.
    cannot_tell_restarts: bool,
}

impl Hub {
    /// An empty hub.
    pub fn new(options: RelayOptions) -> Arc<Hub> {
        Arc::new(Hub { relays: Mutex::default(), upstreams: AtomicUsize::new(0), options, counters: Arc::default() })
    }

    /// Ends every stream (gateway shutdown): each session closes with 1001.
    pub fn close_all(&self) {
        let relays: Vec<Arc<Relay>> = self.relays().drain().map(|(_, r)| r).collect();
        for relay in relays {
            let mut st = relay.lock();
            st.ended = true;
            disconnect(st.subscribers.drain(..));
        }
    }

    /// What was relayed so far.
    pub fn counters(&self) -> &RelayCounters {
        &self.counters
    }

    /// Upstream connections (relays) running now.
    pub fn upstreams(&self) -> usize {
        self.upstreams.load(Ordering::SeqCst)
    }

    fn relays(&self) -> MutexGuard<'_, HashMap<Key, Arc<Relay>>> {
        self.relays.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to `(runtime_id, worker_id)`: with a cursor of this stream, every event
    /// after it, exactly once, in order (read back from the runtime when the ring no longer
    /// has it); with a foreign one, `reset` and the snapshot; without one, the snapshot.
    /// Then live. Starts the relay if there is none. Blocks while an upstream opens or a
    /// replay is read, so it runs on the session's joining thread.
    pub fn subscribe(
        self: &Arc<Self>,
        key: (&str, &str),
        handle: Arc<dyn RuntimeHandle>,
        after: Option<Presented>,
        snapshot: &Snapshot,
        waker: Arc<Waker>,
    ) -> Result<Subscription, RuntimeError> {
        // A new relay starts at the worker's present; what a cursor missed before it comes
        // in the subscriber's initial frames (read back from the runtime), which its queue
        // holds whole, rather than as a live burst that would overflow the queue.
        let relay = self.relay(key, handle, snapshot.position)?;
        let initial = relay.initial_frames(&self.options, after, snapshot);
        let mut st = relay.lock();
        st.joining -= 1;
        if st.subscribers.is_empty() {
            st.idle_since = Some(Instant::now());
        }
        let mut initial = initial?;
        relay.catch_up(&st, &mut initial);
        initial.frames.extend(st.stuck.as_ref().map(|(_, told)| told.clone()));
        let (tx, frames) = unbounded();
        let cap = self.options.queue + initial.frames.len();
        let initial_bytes: usize = initial.frames.iter().map(|f| f.len()).sum();
        let queued = Arc::new(AtomicUsize::new(initial_bytes));
        for frame in initial.frames {
            let _ = tx.send(frame);
        }
        let killed = Arc::new(AtomicBool::new(false));
        let lagging = Arc::new(AtomicBool::new(false));
        st.next_slot += 1;
        let id = st.next_slot;
        st.subscribers.push(Slot {
            id,
            tx,
            cap,
            queued: queued.clone(),
            max_bytes: self.options.ring_bytes.saturating_mul(QUEUE_BYTES_PER_RING_BYTE) + initial_bytes,
            waker: waker.clone(),
            killed: killed.clone(),
            lagging: lagging.clone(),
            last_seq: initial.last_seq,
            skipped: 0,
            last_skipped: 0,
            unwoken: false,
        });
        st.idle_since = None;
        log::debug!("relay {}/{}: subscriber {id} joined ({} now)", key.0, key.1, st.subscribers.len());
        if st.ended {
            st.subscribers.clear(); // the worker is gone: the session ends at once
        }
        drop(st);
        waker.wake();
        Ok(Subscription { frames, queued, killed, lagging, relay, id })
    }

    /// The relay of `key`, opening its upstream after runtime event id `position` when there
    /// is none (other subscribers wait for that, within the open timeout). The caller counts
    /// as joining it until it registers (see [`RelayState::joining`]).
    fn relay(
        self: &Arc<Self>,
        key: (&str, &str),
        handle: Arc<dyn RuntimeHandle>,
        position: u64,
    ) -> Result<Arc<Relay>, RuntimeError> {
        let (relay, created) = {
            let mut relays = self.relays();
            let map_key = (key.0.to_owned(), key.1.to_owned());
            // Counted under the map's lock: `should_end` checks under it too, so a relay that
            // is found here cannot linger out before its new subscriber registers.
            match relays.get(&map_key) {
                Some(relay) => {
                    relay.lock().joining += 1;
                    (relay.clone(), false)
                }
                None => {
                    let relay = Arc::new(Relay {
                        runtime_id: map_key.0.clone(),
                        worker_id: map_key.1.clone(),
                        framer: EventFramer::new(Some(&map_key.0), &map_key.1),
                        counters: self.counters.clone(),
                        handle,
                        state: Mutex::new(RelayState { joining: 1, ..RelayState::default() }),
                        opened: Condvar::new(),
                        replays: ReplayGate::default(),
                    });
                    relays.insert(map_key, relay.clone());
                    (relay, true)
                }
            }
        };
        if !created {
            if let Err(e) = relay.wait_opened(self.options.open_timeout) {
                relay.lock().joining -= 1;
                return Err(e);
            }
            return Ok(relay);
        }
        // One budget for both opens (the second when the runtime cannot resume): browsers that
        // join meanwhile wait that long, and no longer.
        let deadline = Instant::now() + self.options.open_timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let opened = relay
            .open_within(position, left())
            .and_then(|opened| if opened.honoured { Ok(opened) } else { relay.open_within(opened.position, left()) });
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                relay.unregister(&mut self.relays());
                let mut st = relay.lock();
                st.failed = Some(e.clone());
                st.joining -= 1;
                relay.opened.notify_all();
                return Err(e);
            }
        };
        {
            let mut st = relay.lock();
            st.tag = Some(opened.tag);
            st.cannot_tell_restarts = opened.cannot_tell_restarts;
            st.honours_cursors = opened.honoured;
            st.floor = opened.position;
            st.last_seq = opened.position;
            relay.opened.notify_all();
        }
        let (hub, upstream) = (self.clone(), relay.clone());
        self.upstreams.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name(format!("relay-{}", key.0)).spawn(move || {
            run_upstream(&hub, &upstream, opened.source);
            hub.upstreams.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            self.upstreams.fetch_sub(1, Ordering::SeqCst);
            relay.unregister(&mut self.relays());
            relay.lock().joining -= 1;
            return Err(RuntimeError::Unreachable(format!("cannot start a relay thread: {e}")));
        }
        Ok(relay)
    }
}

/// What a new subscriber is sent first.
struct Initial {
    frames: Vec<Utf8Bytes>,
    last_seq: u64,
    /// The stream tag the frames were made under.
    tag: u64,
}

/// How a new subscriber joins the stream.
enum Join {
    /// Every event after this runtime event id.
    After(u64),
    /// A snapshot at the given position, then what follows (after a `reset` when the
    /// presented cursor was not one of this stream).
    Snapshot { reset: bool },
}

impl Relay {
    fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens an upstream after runtime event id `after` and reads its first item.
    fn open(&self, after: u64, timeout: Duration) -> Result<Opened, RuntimeError> {
        let mut source = self.handle.open_events(&self.worker_id, Some(after))?;
        let deadline = Instant::now() + timeout;
        loop {
            match source.next(Duration::from_millis(100)) {
                Ok(Some(SourceItem::Snapshot { position, boot_id, durable, cursor_honoured, store_id })) => {
                    let lineage = Lineage::of(durable, store_id.as_deref(), boot_id.as_deref());
                    let tag = cursor::stream_tag(&self.runtime_id, &self.worker_id, &lineage);
                    let honoured = cursor_honoured != Some(false);
                    let position = if honoured { after } else { position };
                    let cannot_tell_restarts = !durable && boot_id.is_none();
                    return Ok(Opened { source, tag, position, honoured, cannot_tell_restarts });
                }
                Ok(Some(SourceItem::Diagnostic { code, .. })) if code == "runtime.worker_not_found" => {
                    return Err(RuntimeError::WorkerNotFound);
                }
                Ok(_) if Instant::now() < deadline => {}
                Ok(_) => return Err(RuntimeError::Timeout(timeout.as_millis() as u64)),
                Err(end) => return Err(RuntimeError::Unreachable(end.to_string())),
            }
        }
    }

    /// Opens an upstream like [`Relay::open`], trying again within `budget` while the
    /// runtime is only slow: one connect budget running out while the runtime works through
    /// a burst of connections does not yet make the stream unavailable to everyone waiting.
    fn open_within(&self, after: u64, budget: Duration) -> Result<Opened, RuntimeError> {
        let deadline = Instant::now() + budget;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.open(after, deadline.saturating_duration_since(Instant::now())) {
                Err(RuntimeError::Timeout(_)) if Instant::now() + pause < deadline => {
                    log::debug!(
                        "relay {}/{}: the runtime is slow to open; trying again",
                        self.runtime_id,
                        self.worker_id
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(RuntimeError::Timeout(_)) => return Err(RuntimeError::Timeout(budget.as_millis() as u64)),
                other => return other,
            }
        }
    }

    fn wait_opened(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.tag.is_some() {
                return Ok(());
            }
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RuntimeError::Timeout(timeout.as_millis() as u64));
            }
            st = self.opened.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The frames a new subscriber starts with: replay after its cursor (from the ring, or
    /// read back from the runtime for what the ring no longer has), or `reset` and a
    /// snapshot, or the snapshot alone.
    fn initial_frames(
        &self,
        options: &RelayOptions,
        after: Option<Presented>,
        snapshot: &Snapshot,
    ) -> Result<Initial, RuntimeError> {
        let deadline = Instant::now() + options.open_timeout;
        for _ in 0..3 {
            let (tag, mut floor, seen) = {
                let st = self.lock();
                (st.tag.unwrap_or_default(), st.floor, st.last_seq)
            };
            let join = match after {
                // A cursor ahead of the worker (and of every event this relay saw: a runtime
                // may report its worker's last event late) is forged or from another stream.
                Some(Presented::Position { tag: t, seq }) if t == tag && seq <= snapshot.position.max(seen) => {
                    Join::After(seq)
                }
                Some(_) => Join::Snapshot { reset: true },
                None => Join::Snapshot { reset: false },
            };
            let (mut frames, from) = match join {
                Join::After(seq) => (Vec::new(), seq),
                Join::Snapshot { reset } => {
                    let mut frames = Vec::new();
                    if reset {
                        let detail = "this cursor is not one of this stream (another worker, or an earlier \
                                      runtime boot without durable storage, whose worker this id may no \
                                      longer name); starting from a snapshot";
                        frames.push(stream_frame("reset", detail));
                    }
                    let c = cursor::encode(tag, snapshot.position);
                    let id = format!("snapshot:{c}");
                    let frame =
                        snapshot.with_payload(|p| event_frame(&c, &id, Some(&self.runtime_id), &self.worker_id, p))?;
                    frames.push(frame);
                    (frames, snapshot.position)
                }
            };
            let mut turn = None;
            if from < floor {
                let waited = RuntimeError::Timeout(options.open_timeout.as_millis() as u64);
                turn = Some(self.replays.turn(deadline).ok_or(waited)?);
                floor = self.lock().floor; // the replay before this one may have filled the ring
            }
            let backfill = (from < floor).then(|| self.backfill(options, from, floor, tag));
            let mut st = self.lock();
            if st.tag != Some(tag) {
                continue; // the upstream reset while we read: again
            }
            let mut last_seq = from;
            match backfill {
                Some(Err(Unreplayable::Failed(e))) => return Err(e),
                // Lost either way: the gap reaches as far as the ring does now.
                Some(Err(Unreplayable::Gone(reason))) => {
                    log::debug!("relay {}/{}: cannot replay: {reason}", self.runtime_id, self.worker_id);
                    self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                    frames.push(gap_frame(&cursor::encode(tag, from), &cursor::encode(tag, st.floor), None));
                    last_seq = st.floor;
                }
                // The ring moved on past what was read (or past the cursor) just now: again.
                Some(Ok(Replayed { through, .. })) if st.floor > through => continue,
                None if st.floor > from => continue,
                Some(Ok(Replayed { frames: older, .. })) => {
                    // What the ring holds (above its floor) is sent from the ring, once.
                    last_seq = st.floor;
                    let older: Vec<_> = older.into_iter().filter(|(seq, _)| *seq <= last_seq).collect();
                    keep_replayed(&mut st, options, from, &older);
                    frames.extend(older.into_iter().map(|(_, frame)| frame));
                }
                None => {}
            }
            drop(turn);
            for entry in st.ring.iter().filter(|e| e.seq > last_seq) {
                frames.push(entry.frame.clone());
            }
            let last_seq = st.ring.back().map_or(last_seq, |e| e.seq.max(last_seq));
            return Ok(Initial { frames, last_seq, tag });
        }
        Err(RuntimeError::Unreachable("the event stream kept changing while a replay was read".into()))
    }

    /// Adds to `initial` what was published between its making and the subscriber's
    /// registration (the relay's lock was released in between): from the ring, or — when the
    /// ring moved past it or the stream was reset meanwhile — a `gap` or `reset` that says so.
    fn catch_up(&self, st: &RelayState, initial: &mut Initial) {
        if st.tag != Some(initial.tag) {
            let detail = "the runtime could not resume from our cursor; events in between are lost";
            initial.frames.push(stream_frame("reset", detail));
            initial.last_seq = st.last_seq;
            return;
        }
        if st.floor > initial.last_seq {
            self.counters.gaps.fetch_add(1, Ordering::Relaxed);
            let (after, through) =
                (cursor::encode(initial.tag, initial.last_seq), cursor::encode(initial.tag, st.floor));
            initial.frames.push(gap_frame(&after, &through, None));
        }
        for entry in st.ring.iter().filter(|e| e.seq > initial.last_seq) {
            initial.frames.push(entry.frame.clone());
        }
        initial.last_seq = initial.last_seq.max(st.last_seq);
    }

    /// Reads the worker's events after `after` back from the runtime, through `through` or
    /// as far as the ring's floor has moved on meanwhile: frames in order.
    /// A runtime slow to open is asked again within the open budget.
    fn backfill(&self, options: &RelayOptions, after: u64, through: u64, tag: u64) -> Result<Replayed, Unreplayable> {
        let opened = self.open_within(after, options.open_timeout).map_err(Unreplayable::Failed)?;
        if opened.tag != tag || !opened.honoured {
            return Err(Unreplayable::Gone("the runtime no longer holds those events"));
        }
        // A replay slower than this is cut short with a gap: asking again would be as slow.
        let deadline = Instant::now() + options.open_timeout;
        let mut source = opened.source;
        let mut frames = Vec::new();
        let mut bytes = 0;
        let (mut last, mut through) = (after, through);
        loop {
            // The ring moves on while a busy stream is read back: read on to where it starts now.
            if last >= through {
                through = self.lock().floor;
                if last >= through {
                    break;
                }
            }
            let item = source.next(Duration::from_millis(100));
            match item.map_err(|end| Unreplayable::Failed(RuntimeError::Unreachable(end.to_string())))? {
                Some(SourceItem::Event { seq, payload }) if seq > last => {
                    if seq > through {
                        through = self.lock().floor;
                        if seq > through {
                            break; // the ring holds this one and all after it
                        }
                    }
                    let frame = self.framer.frame(cursor::Cursor::new(tag, seq).as_str(), &payload);
                    bytes += frame.len();
                    frames.push((seq, frame));
                    last = seq;
                    // A replay is held per subscriber until it is written: bounded like the
                    // ring, in events and in bytes (but one event of any size can be read
                    // back); past that, the subscriber gets a `gap`.
                    if frames.len() > options.ring_events.max(1) * 16
                        || (bytes > options.ring_bytes && frames.len() > 1)
                    {
                        return Err(Unreplayable::Gone("too much to replay"));
                    }
                }
                Some(SourceItem::Diagnostic { code, .. }) if code == "runtime.cursor_unknown_or_expired" => {
                    return Err(Unreplayable::Gone("the runtime no longer holds those events"));
                }
                _ if Instant::now() > deadline => return Err(Unreplayable::Gone("the replay took too long")),
                _ => {}
            }
        }
        Ok(Replayed { frames, through })
    }

    /// Keeps, and fans out, one upstream event; false (and nothing done) when its id is not
    /// above the last one's.
    fn publish(&self, options: &RelayOptions, seq: u64, payload: &Payload) -> bool {
        let mut st = self.lock();
        let Some(tag) = st.tag.filter(|_| seq > st.last_seq) else { return false };
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        st.last_seq = seq;
        if st.stuck.take().is_some() {
            log::warn!(
                "runtime `{}`: the event stream of worker `{}` is readable again",
                self.runtime_id,
                self.worker_id
            );
        }
        let frame = self.framer.frame(cursor::Cursor::new(tag, seq).as_str(), payload);
        st.ring_bytes += frame.len();
        st.ring.push_back(Entry { seq, frame: frame.clone() });
        // An event larger than the whole budget goes too, once handed to the subscribers: a
        // browser that comes for it later has it read back from the runtime.
        while st.ring.len() > options.ring_events || st.ring_bytes > options.ring_bytes {
            if let Some(old) = st.ring.pop_front() {
                st.ring_bytes -= old.frame.len();
                st.floor = old.seq;
            }
        }
        st.subscribers.retain_mut(|slot| deliver(slot, seq, tag, &frame, options, &self.counters));
        true
    }

    /// The runtime lost what came after the relay's position (a memory runtime's ring, a
    /// cursor it no longer honours): everyone is told, and the stream goes on from `position`.
    fn reset(&self, position: u64, detail: &str) {
        let frame = stream_frame("reset", detail);
        let mut st = self.lock();
        st.ring.clear();
        st.ring_bytes = 0;
        st.floor = position;
        st.last_seq = position;
        for slot in &mut st.subscribers {
            slot.last_seq = position;
            slot.skipped = 0;
        }
        tell(&st.subscribers, &frame);
    }

    /// Tells subscribers, and those joining until an event gets past it, that the stream
    /// stands before a frame it cannot read (`why`): once, though every reconnection meets
    /// the same frame again.
    fn stuck(&self, why: &str) {
        let mut st = self.lock();
        let at = st.last_seq;
        if st.stuck.as_ref().is_some_and(|(told_at, _)| *told_at == at) {
            return;
        }
        log::warn!(
            "runtime `{}`: the event stream of worker `{}` holds a frame the gateway cannot read ({why}); \
             nothing after it is relayed until it can be",
            self.runtime_id,
            self.worker_id
        );
        let message = format!(
            "the runtime sent a frame the gateway cannot read ({why}); the gateway asks it again, with a \
             growing pause, for what follows the last event relayed"
        );
        let frame = diagnostic_frame("backend.event_unreadable", &message);
        tell(&st.subscribers, &frame);
        st.stuck = Some((at, frame));
    }

    /// Sends a frame that is not an event (stream state, diagnostics) to every subscriber.
    fn broadcast(&self, frame: &Utf8Bytes) {
        tell(&self.lock().subscribers, frame);
    }

    /// The worker is gone: tell everyone and end.
    fn finish(&self, hub: &Hub, frame: Utf8Bytes) {
        self.broadcast(&frame);
        let mut relays = hub.relays();
        let mut st = self.lock();
        st.ended = true;
        disconnect(st.subscribers.drain(..));
        self.unregister(&mut relays);
    }

    /// Removes this relay from the hub's map (if a newer relay for the key has not replaced it).
    fn unregister(&self, relays: &mut HashMap<Key, Arc<Relay>>) {
        let key = (self.runtime_id.clone(), self.worker_id.clone());
        if relays.get(&key).is_some_and(|r| std::ptr::eq(&**r, self)) {
            relays.remove(&key);
        }
    }

    /// Wakes every subscriber with newly queued frames. The relay publishes what the upstream
    /// has ready and wakes once per batch: with many subscribers, one wake per event each
    /// would cost more than the events themselves.
    fn wake_queued(&self) {
        let mut st = self.lock();
        for slot in st.subscribers.iter_mut().filter(|slot| slot.unwoken) {
            slot.unwoken = false;
            slot.waker.wake();
        }
    }

    /// True (and unregistered) when the last subscriber left more than `linger` ago.
    fn should_end(&self, hub: &Hub) -> bool {
        let mut relays = hub.relays();
        let st = self.lock();
        let idle = st.subscribers.is_empty()
            && st.joining == 0
            && st.idle_since.is_some_and(|t| t.elapsed() >= hub.options.linger);
        if idle {
            log::debug!("relay {}/{}: no subscribers; closing its upstream", self.runtime_id, self.worker_id);
            self.unregister(&mut relays);
        }
        idle
    }

    /// The `gap` notice for a subscriber that skipped events and has caught up with its
    /// queue: everything after its last delivered event through the last one skipped.
    fn gap_notice(&self, id: u64) -> Option<Utf8Bytes> {
        let mut st = self.lock();
        let tag = st.tag?;
        let frame = st.subscribers.iter_mut().find(|s| s.id == id)?.gap_when_caught_up(tag)?;
        self.counters.gaps.fetch_add(1, Ordering::Relaxed);
        Some(frame)
    }
}

/// Ends the subscriptions of `slots`: each channel disconnects (its sender drops) before its
/// session is woken, so the session sees the end and does not go back to sleep.
fn disconnect(slots: impl Iterator<Item = Slot>) {
    for slot in slots {
        let waker = slot.waker.clone();
        drop(slot);
        waker.wake();
    }
}

impl Slot {
    /// Queues a frame unless the subscriber already has `cap` frames or `max_bytes` waiting
    /// (a frame larger than that alone is taken into an empty queue). Only the relay sends,
    /// under its lock, so the checks cannot race another sender.
    fn offer(&self, frame: Utf8Bytes) -> Result<(), TrySendError<Utf8Bytes>> {
        let waiting = self.queued.load(Ordering::SeqCst);
        if self.tx.len() >= self.cap || (waiting > 0 && waiting + frame.len() > self.max_bytes) {
            return Err(TrySendError::Full(frame));
        }
        self.queued.fetch_add(frame.len(), Ordering::SeqCst);
        self.tx.send(frame).map_err(|e| TrySendError::Disconnected(e.into_inner()))
    }

    /// The `gap` for what this subscriber skipped: the events after the last one it was
    /// given (or told of) through the last one skipped.
    fn gap(&self, tag: u64) -> Utf8Bytes {
        gap_frame(&cursor::encode(tag, self.last_seq), &cursor::encode(tag, self.last_skipped), Some(self.skipped))
    }

    /// The gap is on its way: the subscriber stands at the last event it skipped.
    fn gap_told(&mut self) {
        self.skipped = 0;
        self.last_seq = self.last_skipped;
        self.lagging.store(false, Ordering::SeqCst);
    }

    /// The gap for a session that found its queue empty, handed to it directly; none while
    /// frames are queued (the relay may have queued more since the session looked, and a
    /// gap must not pass them). Only the relay sends, under its lock, so this cannot race.
    fn gap_when_caught_up(&mut self, tag: u64) -> Option<Utf8Bytes> {
        if self.skipped == 0 || !self.tx.is_empty() {
            return None;
        }
        let gap = self.gap(tag);
        self.gap_told();
        Some(gap)
    }
}

/// Hands `frame` (runtime event `seq`) to one subscriber; false drops the subscriber.
fn deliver(
    slot: &mut Slot,
    seq: u64,
    tag: u64,
    frame: &Utf8Bytes,
    options: &RelayOptions,
    counters: &RelayCounters,
) -> bool {
    if seq <= slot.last_seq {
        return true; // already in its snapshot or replay
    }
    if slot.skipped > 0 {
        if slot.offer(slot.gap(tag)).is_err() {
            slot.skipped += 1;
            slot.last_skipped = seq;
            if slot.skipped > options.lag_limit {
                counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
                slot.killed.store(true, Ordering::SeqCst);
                slot.waker.wake();
                return false;
            }
            return true;
        }
        slot.gap_told();
        counters.gaps.fetch_add(1, Ordering::Relaxed);
    }
    match slot.offer(frame.clone()) {
        Ok(()) => {
            slot.last_seq = seq;
            slot.unwoken = true; // woken once per batch: Relay::wake_queued
            true
        }
        Err(TrySendError::Full(_)) => {
            slot.skipped = 1;
            slot.last_skipped = seq;
            slot.lagging.store(true, Ordering::SeqCst);
            slot.waker.wake();
            true
        }
        Err(TrySendError::Disconnected(_)) => false,
    }
}

/// Events read back from the runtime: every one above a cursor through `through`.
struct Replayed {
    frames: Vec<(u64, Utf8Bytes)>,
    through: u64,
}

/// Lets one subscriber at a time read a replay (see [`Relay::replays`]).
#[derive(Default)]
struct ReplayGate {
    /// True while a turn is taken.
    taken: Mutex<bool>,
    /// Signalled when a turn ends.
    ended: Condvar,
}

impl ReplayGate {
    /// Waits (until `deadline`, else `None`) for the turn; the turn ends when dropped.
    fn turn(&self, deadline: Instant) -> Option<ReplayTurn<'_>> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        while *taken {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            taken = self.ended.wait_timeout(taken, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        *taken = true;
        Some(ReplayTurn { gate: self })
    }
}

/// A subscriber's turn to read a replay.
struct ReplayTurn<'a> {
    gate: &'a ReplayGate,
}

impl Drop for ReplayTurn<'_> {
    fn drop(&mut self) {
        *self.gate.taken.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.gate.ended.notify_one();
    }
}

/// Puts the newest of `replayed` — every event after `after` up to the ring's floor, read
/// back from the runtime — in front of the ring, as far as the ring's bounds allow, so the
/// next subscriber with a cursor as old does not ask the runtime again.
fn keep_replayed(st: &mut RelayState, options: &RelayOptions, after: u64, replayed: &[(u64, Utf8Bytes)]) {
    for (n, (_, frame)) in replayed.iter().enumerate().rev() {
        if st.ring.len() >= options.ring_events || st.ring_bytes + frame.len() > options.ring_bytes {
            return;
        }
        st.ring_bytes += frame.len();
        st.ring.push_front(Entry { seq: replayed[n].0, frame: frame.clone() });
        // The ring now holds every event above the one before this (or above `after`).
        st.floor = n.checked_sub(1).map_or(after, |before| replayed[before].0);
    }
    if replayed.is_empty() {
        st.floor = st.floor.min(after); // nothing in between: the ring holds all above `after`
    }
}

/// `{"kind":"gap"}`: events after `after` through `resumed_at` were not delivered
/// (`dropped`: how many, when known).
fn gap_frame(after: &str, resumed_at: &str, dropped: Option<u64>) -> Utf8Bytes {
    json!({"kind": "gap", "after": after, "resumed_at": resumed_at, "dropped": dropped}).to_string().into()
}

fn stream_frame(state: &str, detail: &str) -> Utf8Bytes {
    json!({"kind": "stream", "state": state, "detail": detail}).to_string().into()
}

/// Queues `frame` for each of `subscribers` that has room, and wakes it.
fn tell(subscribers: &[Slot], frame: &Utf8Bytes) {
    for slot in subscribers {
        if slot.offer(frame.clone()).is_ok() {
            slot.waker.wake();
        }
    }
}

/// Why events could not be read back for a subscriber.
enum Unreplayable {
    /// The runtime no longer holds them, or they are more than a replay may hold: a `gap`.
    Gone(&'static str),
    /// The runtime cannot be read now: the subscriber is told, and may come back with its
    /// cursor (a `gap` would lose events the runtime still has).
    Failed(RuntimeError),
}

/// How one upstream connection ended.
enum Ended {
    /// No subscribers left.
    Idle,
    /// The worker no longer exists (or its id now names another worker).
    WorkerGone(&'static str),
    /// The connection broke: reconnect.
    Broken,
    /// The runtime sent a frame the relay cannot read (why): reconnect, and say so once.
    Unreadable(String),
    /// An event larger than [`OUTGROWN_AFTER`] went through at least [`OUTGROWN_QUIET`] ago
    /// and the stream is quiet: the connection's read buffer stays as large as that event for
    /// as long as it lives, so it is replaced, resuming after the last event (a runtime that
    /// honours cursors only).
    Outgrown,
}

/// An event larger than this makes the relay replace its upstream connection once the
/// stream is quiet (see [`Ended::Outgrown`]).
const OUTGROWN_AFTER: usize = 1 << 20;

/// How long after its last large event a connection is replaced: a runtime that sends large
/// events often keeps its buffer in use, and is not reconnected for each.
const OUTGROWN_QUIET: Duration = Duration::from_secs(2);

fn run_upstream(hub: &Hub, relay: &Relay, first: Box<dyn EventSource>) {
    let mut source = Some(first);
    let mut attempt = 0u32;
    let mut outage_told = false;
    loop {
        let position = relay.lock().last_seq;
        let ended = match source.take() {
            Some(mut open) => pump(hub, relay, open.as_mut(), false, false),
            None => {
                let resume = relay.lock().last_seq;
                match relay.open(resume, hub.options.open_timeout) {
                    Ok(opened) => {
                        let was_told = std::mem::take(&mut outage_told);
                        if was_told {
                            log::warn!(
                                "runtime `{}`: the event stream of worker `{}` is connected again",
                                relay.runtime_id,
                                relay.worker_id
                            );
                        }
                        relay.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        relay.lock().honours_cursors = opened.honoured;
                        match resumed(relay, &opened, was_told) {
                            Some(gone) => Ended::WorkerGone(gone),
                            None => {
                                let reset_told = !opened.honoured;
                                let mut open = opened.source;
                                pump(hub, relay, open.as_mut(), true, reset_told)
                            }
                        }
                    }
                    Err(RuntimeError::WorkerNotFound) => {
                        Ended::WorkerGone("the worker no longer exists on its runtime")
                    }
                    Err(e) => {
                        log::debug!("relay {}/{}: upstream unavailable: {e}", relay.runtime_id, relay.worker_id);
                        Ended::Broken
                    }
                }
            }
        };
        // However the pump ended, what it published reaches its subscribers now.
        relay.wake_queued();
        // Only a connection that carried events resets the backoff: one that breaks at the
        // same point every time (an event the relay cannot read) is not retried in a tight loop.
        if relay.lock().last_seq > position {
            attempt = 0;
        }
        let unreadable = match ended {
            Ended::Idle => return,
            Ended::Outgrown => {
                log::debug!("relay {}/{}: replacing a connection grown large", relay.runtime_id, relay.worker_id);
                continue;
            }
            Ended::WorkerGone(why) => return relay.finish(hub, diagnostic_frame("backend.worker_not_found", why)),
            Ended::Broken => None,
            Ended::Unreadable(why) => Some(why),
        };
        if relay.lock().ended {
            return; // the gateway is shutting down: nothing to reconnect, nothing to warn of
        }
        if let Some(why) = unreadable {
            relay.stuck(&why);
        } else if !outage_told {
            // Once per outage; the attempts in between log at debug.
            log::warn!(
                "runtime `{}`: lost the event stream of worker `{}`; reconnecting",
                relay.runtime_id,
                relay.worker_id
            );
            relay.broadcast(&stream_frame("reconnecting", "lost the runtime's event stream; reconnecting"));
            outage_told = true;
        }
        let wait = backoff(attempt, hub.options.backoff_cap);
        attempt = attempt.saturating_add(1);
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if relay.should_end(hub) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
        }
    }
}

/// Tells subscribers how a reconnection went: `resumed` (nothing lost; only after they were
/// told `reconnecting`), `reset` (the runtime no longer holds what came in between), or —
/// when the runtime's lineage changed (a memory runtime restarted, a store was replaced) —
/// that this id no longer names the worker they watched.
fn resumed(relay: &Relay, opened: &Opened, reconnecting_told: bool) -> Option<&'static str> {
    let tag = relay.lock().tag;
    if tag != Some(opened.tag) || (!opened.honoured && opened.cannot_tell_restarts) {
        return Some(replaced(relay));
    }
    if !opened.honoured {
        relay.reset(opened.position, "the runtime could not resume from our cursor; events in between are lost");
    } else if reconnecting_told {
        // A frame still unreadable after this is told again, not left behind a "resumed".
        relay.lock().stuck = None;
        let detail = if opened.cannot_tell_restarts {
            "the runtime's event stream is back, resumed after the last event seen (this runtime does not \
             say whether it restarted meanwhile)"
        } else {
            "the runtime's event stream is back; nothing was lost"
        };
        relay.broadcast(&stream_frame("resumed", detail));
    }
    None
}

/// A runtime without durable events came back unable to resume: it restarted (a base
/// runtime's memory store even hands the same id to a new worker), so the stream says the
/// worker was replaced or is gone, and ends rather than show another worker's events.
fn replaced(relay: &Relay) -> &'static str {
    relay.broadcast(&stream_frame(
        "reset",
        "the runtime restarted without keeping its events: the worker was replaced or is gone",
    ));
    "the runtime restarted; the worker this stream showed no longer exists"
}

/// Capped exponential backoff with full jitter: uniform in `[0, min(cap, 100 ms × 2^attempt)]`.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let ceiling = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(cap);
    let fraction = (crate::clock::random_u64() % 10_000) as f64 / 10_000.0;
    ceiling.mul_f64(fraction)
}

/// A subscriber's queue holds at most this many times `event_ring_bytes` (64 MiB by
/// default), besides its initial replay: a browser that does not read keeps that much of
/// its stream alive at most, however large the events.
const QUEUE_BYTES_PER_RING_BYTE: usize = 16;

/// Events published before subscribers are woken even if the upstream has more ready.
const MAX_BATCH: usize = 64;

/// Relays `source` until it ends; `reconnected` when it is not the relay's first connection,
/// `reset_told` when its subscribers were told of a reset as it opened (the runtime could not
/// resume from the relay's cursor, which it may say again in a diagnostic: not a second gap).
fn pump(hub: &Hub, relay: &Relay, source: &mut dyn EventSource, reconnected: bool, mut reset_told: bool) -> Ended {
    // Events published since subscribers were last woken (see [`Relay::wake_queued`]).
    let mut unwoken = 0;
    // When the last event over `OUTGROWN_AFTER` came.
    let mut outgrown: Option<Instant> = None;
    loop {
        // Take what is ready without waiting while a batch is open; wake before any wait.
        let batching = unwoken > 0 && unwoken < MAX_BATCH;
        if unwoken > 0 && !batching {
            relay.wake_queued();
            unwoken = 0;
        }
        let item = source.next(if batching { Duration::ZERO } else { Duration::from_millis(250) });
        if batching && !matches!(item, Ok(Some(_))) {
            relay.wake_queued();
            unwoken = 0;
            if matches!(item, Ok(None)) {
                continue;
            }
        }
        match item {
            Ok(Some(SourceItem::Snapshot { .. })) => {} // only the first item of a connection
            Ok(Some(SourceItem::Event { seq, payload })) => {
                if !relay.publish(&hub.options, seq, &payload) {
                    // Replayed or live, a runtime's events come in rising order.
                    return Ended::Unreadable("an event whose id is not above the last one relayed".into());
                }
                unwoken += 1;
                reset_told = false;
                if payload.get().len() > OUTGROWN_AFTER {
                    outgrown = Some(Instant::now());
                }
            }
            Ok(Some(SourceItem::Diagnostic { code, message })) => match code.as_str() {
                "runtime.worker_not_found" => return Ended::WorkerGone("the worker no longer exists on its runtime"),
                "runtime.cursor_unknown_or_expired" => {
                    let (position, cannot_tell_restarts) = {
                        let st = relay.lock();
                        (st.last_seq, st.cannot_tell_restarts)
                    };
                    if reconnected && cannot_tell_restarts {
                        return Ended::WorkerGone(replaced(relay));
                    }
                    if !std::mem::take(&mut reset_told) {
                        relay.reset(
                            position,
                            "the runtime could not resume from our cursor; events in between are lost",
                        );
                    }
                }
                _ => {
                    let code = format!("backend.{}", code.strip_prefix("runtime.").unwrap_or(&code));
                    relay.broadcast(&diagnostic_frame(&code, &message));
                }
            },
            Ok(None) => {
                if relay.should_end(hub) {
                    return Ended::Idle;
                }
                let quiet = outgrown.is_some_and(|at| at.elapsed() > OUTGROWN_QUIET);
                if quiet && relay.lock().honours_cursors {
                    return Ended::Outgrown;
                }
            }
            Err(end) => {
                log::debug!("relay {}/{}: upstream ended: {end}", relay.runtime_id, relay.worker_id);
                return match end {
                    StreamEnded::Broken(_) => Ended::Broken,
                    StreamEnded::Unreadable(why) => Ended::Unreadable(why),
                };
            }
        }
    }
}

impl Subscription {
    /// The session feed of this subscription.
    pub fn feed(self) -> RelayFeed {
        RelayFeed { subscription: self }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.relay.lock();
        st.subscribers.retain(|s| s.id != self.id);
        if st.subscribers.is_empty() {
            st.idle_since = Some(Instant::now());
        }
    }
}

/// Frames of one subscription for a WebSocket session.
pub struct RelayFeed {
    subscription: Subscription,
}

impl Feed for RelayFeed {
    fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseFrame> {
        if self.subscription.killed.load(Ordering::SeqCst) {
            return Some(close_frame(CloseCode::Policy, "slow_consumer"));
        }
        loop {
            match self.subscription.frames.try_recv() {
                Ok(frame) => {
                    self.subscription.queued.fetch_sub(frame.len(), Ordering::SeqCst);
                    out.push(frame);
                }
                Err(TryRecvError::Empty) => {
                    let sub = &self.subscription;
                    if sub.lagging.load(Ordering::SeqCst) {
                        out.extend(sub.relay.gap_notice(sub.id));
                    }
                    return None;
                }
                Err(TryRecvError::Disconnected) => return Some(close_frame(CloseCode::Away, "stream ended")),
                // 1001 "going away": the worker is gone, or the gateway is shutting down.
            }
            if out.len() >= DRAIN_BATCH {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(seqs: &[u64]) -> Vec<(u64, Utf8Bytes)> {
        seqs.iter().map(|&seq| (seq, Utf8Bytes::from(format!("event {seq:04}")))).collect()
    }

    fn ring_after(ring_events: usize, ring: &[u64], replay: &[u64]) -> (u64, Vec<u64>) {
        let options = RelayOptions { ring_events, ..RelayOptions::default() };
        let mut st = RelayState { floor: 10, last_seq: 12, ..RelayState::default() };
        for (seq, frame) in replayed(ring) {
            st.ring_bytes += frame.len();
            st.ring.push_back(Entry { seq, frame });
        }
        keep_replayed(&mut st, &options, 3, &replayed(replay));
        assert_eq!(st.ring_bytes, st.ring.iter().map(|e| e.frame.len()).sum::<usize>());
        (st.floor, st.ring.iter().map(|e| e.seq).collect())
    }

    /// A subscriber that can queue `cap` frames, and the end its session reads.
    fn slot(cap: usize) -> (Slot, Receiver<Utf8Bytes>) {
        let (tx, rx) = unbounded();
        let waker = crate::http::poller::waker().expect("a waker");
        let flag = || Arc::new(AtomicBool::new(false));
        let slot = Slot {
            id: 1,
            tx,
            cap,
            queued: Arc::new(AtomicUsize::new(0)),
            max_bytes: usize::MAX,
            waker,
            killed: flag(),
            lagging: flag(),
            last_seq: 0,
            skipped: 0,
            last_skipped: 0,
            unwoken: false,
        };
        (slot, rx)
    }

    /// What a session reads, as (kind, first, last) runtime event ids: an event is (e, id, id),
    /// a gap (g, after, resumed_at).
    fn read(rx: &Receiver<Utf8Bytes>, slot: &Slot, n: usize) -> Vec<(char, u64, u64)> {
        let seq = |v: &serde_json::Value| u64::from_str_radix(&v.as_str().unwrap()[19..], 16).unwrap();
        (0..n)
            .map(|_| {
                let frame = rx.try_recv().expect("a frame");
                slot.queued.fetch_sub(frame.len(), Ordering::SeqCst);
                let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
                match v["kind"].as_str() {
                    Some("gap") => ('g', seq(&v["after"]), seq(&v["resumed_at"])),
                    _ => ('e', v["seq"].as_u64().unwrap(), v["seq"].as_u64().unwrap()),
                }
            })
            .collect()
    }

    fn offer(slot: &mut Slot, seq: u64) {
        let frame = Utf8Bytes::from(format!("{{\"kind\":\"event\",\"seq\":{seq}}}"));
        assert!(deliver(slot, seq, 7, &frame, &RelayOptions::default(), &RelayCounters::default()));
    }

    /// Gaps follow one another: a gap queued for a subscriber moves it to the last event it
    /// skipped, so the next gap starts there (it used to start again from the last event
    /// delivered, overlapping the first).
    #[test]
    fn gaps_of_a_slow_subscriber_follow_one_another() {
        let (mut slot, rx) = slot(2);
        (1..=4).for_each(|seq| offer(&mut slot, seq)); // 1 and 2 queued, 3 and 4 skipped
        assert_eq!(read(&rx, &slot, 1), [('e', 1, 1)]);
        offer(&mut slot, 5); // the gap is queued, 5 does not fit
        assert_eq!(read(&rx, &slot, 2), [('e', 2, 2), ('g', 2, 4)]);
        offer(&mut slot, 6);
        assert_eq!(read(&rx, &slot, 2), [('g', 4, 5), ('e', 6, 6)]);
    }

    /// A session that found its queue empty gets the gap only if nothing was queued since:
    /// the relay may have queued a gap and events meanwhile, which the new gap must not pass.
    #[test]
    fn a_gap_handed_to_a_session_never_passes_queued_frames() {
        let (mut slot, rx) = slot(1);
        (1..=3).for_each(|seq| offer(&mut slot, seq));
        assert_eq!(slot.gap_when_caught_up(7), None, "event 1 is still queued");
        assert_eq!(read(&rx, &slot, 1), [('e', 1, 1)]);
        let gap = slot.gap_when_caught_up(7).expect("the gap");
        assert!(gap.as_str().contains("\"dropped\":2"), "{gap}");
        offer(&mut slot, 4);
        assert_eq!(read(&rx, &slot, 1), [('e', 4, 4)], "after the gap, the stream goes on from 3");
    }

    /// A snapshot's payload is read when first needed, once; a failed read is the caller's
    /// and is tried again by the next.
    #[test]
    fn a_snapshot_is_read_when_needed_and_once() {
        let reads = Arc::new(AtomicUsize::new(0));
        let counted = reads.clone();
        let snapshot = Snapshot::new(7, move || match counted.fetch_add(1, Ordering::SeqCst) {
            0 => Err(RuntimeError::Timeout(5)),
            _ => Ok(serde_json::json!({"event": "snapshot"})),
        });
        assert_eq!(reads.load(Ordering::SeqCst), 0, "not read before it is needed");
        assert_eq!(snapshot.with_payload(|_| ()), Err(RuntimeError::Timeout(5)));
        let snapshot = snapshot.read_now().expect("read");
        assert_eq!(snapshot.with_payload(|p| p["event"].clone()), Ok(serde_json::json!("snapshot")));
        assert_eq!(reads.load(Ordering::SeqCst), 2, "read again after a failure, then kept");
    }

    /// One replay at a time: a second subscriber waits for the turn, and gives up (to be told
    /// the stream is unavailable) when its deadline passes first.
    #[test]
    fn replays_take_turns_and_a_waiter_gives_up_at_its_deadline() {
        let gate = ReplayGate::default();
        let soon = || Instant::now() + Duration::from_millis(50);
        let first = gate.turn(soon()).expect("a free turn");
        let waited = Instant::now();
        assert!(gate.turn(soon()).is_none(), "taken");
        assert!(waited.elapsed() >= Duration::from_millis(50), "it waited until its deadline");
        std::thread::scope(|scope| {
            let next = scope.spawn(|| gate.turn(Instant::now() + Duration::from_secs(10)).is_some());
            drop(first);
            assert!(next.join().expect("waiter"), "the turn passes on when the first one ends");
        });
    }

    #[test]
    fn a_replay_fills_the_ring_from_the_front_as_far_as_it_holds() {
        assert_eq!(ring_after(8, &[11, 12], &[5, 7, 10]), (3, vec![5, 7, 10, 11, 12]), "all of it: above 3");
        assert_eq!(ring_after(4, &[11, 12], &[5, 7, 10]), (5, vec![7, 10, 11, 12]), "the newest: above 5");
        assert_eq!(ring_after(2, &[11, 12], &[5, 7, 10]), (10, vec![11, 12]), "a full ring is left as it was");
        assert_eq!(ring_after(8, &[11, 12], &[]), (3, vec![11, 12]), "nothing in between: above 3");
    }
}
