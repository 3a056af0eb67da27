//! The event hub: one relay per `(runtime, worker)` that has subscribers.
//!
//! A relay owns one upstream (the remote's WebSocket, or the engine's subscription) on a
//! thread of its own, keeps a bounded replay ring and fans frames out through bounded
//! channels — each frame serialized once and shared. A subscriber whose queue overflows
//! falls behind and catches up from the ring, told with a `gap` of what the ring no longer
//! holds; past a hard limit it is closed with 1008 `slow_consumer`. Nobody slows the
//! upstream or the others.
//!
//! A relay is a cache of the runtime's stream, never its only memory: cursors (see
//! [`super::cursor`]) carry the runtime's own event id, so a cursor older than the ring is
//! served by reading the runtime's replay, and a relay that lingered out, a restarted
//! gateway or a replica resumes it exactly. What the runtime no longer holds is reported
//! (`gap`, `reset`), never skipped in silence.
//!
//! Here: the hub, each relay's state and ring, and how a subscriber joins (snapshot, ring,
//! replay from the runtime). [`subscriber`]: each subscriber's queue and what it is handed;
//! [`upstream`]: the loop that reads the runtime and reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;
use serde_json::json;
use tungstenite::Utf8Bytes;

use super::cursor::{self, Lineage, Presented};
use crate::http::websocket::Waker;
use crate::runtime::frames::{EventFramer, diagnostic_frame, event_frame};
use crate::runtime::handle::{EventSource, Payload, RuntimeError, RuntimeHandle, SourceItem};
use crate::turns::Turns;

mod subscriber;
mod upstream;

pub use subscriber::{RelayFeed, Subscription};
use subscriber::{Slot, deliver, disconnect, tell};
use upstream::run_upstream;

/// Limits of relays and their subscribers.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Events kept for replay per stream.
    pub ring_events: usize,
    /// Bytes of frames kept for replay per stream.
    pub ring_bytes: usize,
    /// Frames a subscriber may have queued before it falls behind (and catches up from the
    /// ring once it has read them).
    pub queue: usize,
    /// Events a subscriber may fall behind before it is closed with 1008 `slow_consumer`.
    pub lag_limit: u64,
    /// How long a relay outlives its last subscriber.
    pub linger: Duration,
    /// Cap of the upstream reconnect backoff.
    pub backoff_cap: Duration,
    /// How long opening an upstream (or reading a replay) may take before a subscriber is
    /// told the stream is unavailable.
    pub open_timeout: Duration,
    /// Relays at once at most (each holds a thread, and an upstream connection to a remote):
    /// a cap on watched workers, not on browsers.
    pub max_streams: usize,
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
            max_streams: 1024,
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
    replays: Turns,
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
    /// When an unreadable frame was last logged as a warning (see [`Relay::stuck`]), and
    /// whether the one the stream stands before now was.
    unreadable_warned: Option<Instant>,
    stuck_warned: bool,
}

struct Entry {
    seq: u64,
    frame: Utf8Bytes,
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

    /// Whether worker `key`'s events can be relayed now: its relay runs, or there is room
    /// for one more ([`RelayOptions::max_streams`]).
    pub fn has_room_for(&self, key: (&str, &str)) -> bool {
        let relays = self.relays();
        relays.len() < self.options.max_streams || relays.contains_key(&(key.0.to_owned(), key.1.to_owned()))
    }

    /// Why a stream cannot be opened while every relay is taken.
    pub fn full(&self) -> String {
        format!(
            "all {} event streams are in use (one per worker watched): retry once a browser has left one",
            self.options.max_streams
        )
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
            notices: VecDeque::new(),
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
                None if relays.len() >= self.options.max_streams => return Err(RuntimeError::Overloaded),
                None => {
                    let relay = Arc::new(Relay {
                        runtime_id: map_key.0.clone(),
                        worker_id: map_key.1.clone(),
                        framer: EventFramer::new(Some(&map_key.0), &map_key.1),
                        counters: self.counters.clone(),
                        handle,
                        state: Mutex::new(RelayState { joining: 1, ..RelayState::default() }),
                        opened: Condvar::new(),
                        replays: Turns::new(1),
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
                        let detail = "this cursor is not one of this stream (another worker, an earlier \
                                      runtime boot without durable storage, or a store restored from a \
                                      copy: this id may no longer name that worker); starting from a \
                                      snapshot";
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
                Some(Ok(Replayed { frames: older, skipped, .. })) => {
                    // The oldest events of a replay longer than it may hold: a gap says how many.
                    let kept_after = match skipped {
                        Some(Skipped { through, count }) => {
                            self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                            frames.push(gap_frame(&cursor::encode(tag, from), &cursor::encode(tag, through), count));
                            through
                        }
                        None => from,
                    };
                    // What the ring holds (above its floor) is sent from the ring, once.
                    last_seq = st.floor;
                    let older: Vec<_> = older.into_iter().filter(|(seq, _)| *seq <= last_seq).collect();
                    keep_replayed(&mut st, options, kept_after, &older);
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
        const GONE: &str = "the runtime no longer holds those events";
        let opened = self.open_within(after, options.open_timeout).map_err(Unreplayable::Failed)?;
        // A cursor older than what the runtime retains: one that tells its restarts (so this
        // is the same worker) replays from its oldest retained event, after a gap.
        let mut expired = !opened.honoured;
        if opened.tag != tag || (expired && opened.cannot_tell_restarts) {
            return Err(Unreplayable::Gone(GONE));
        }
        // A replay slower than this is cut short with a gap: asking again would be as slow.
        let deadline = Instant::now() + options.open_timeout;
        let mut source = opened.source;
        let mut frames = VecDeque::new();
        let mut bytes = 0;
        let mut skipped: Option<Skipped> = None;
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
                    if expired && last == after && seq - 1 > after {
                        let lost = (seq - 1).min(through);
                        skipped = Some(Skipped { through: lost, count: None });
                    }
                    if seq > through {
                        through = self.lock().floor;
                        if seq > through {
                            break; // the ring holds this one and all after it
                        }
                    }
                    let frame = self.framer.frame(cursor::Cursor::new(tag, seq).as_str(), &payload);
                    bytes += frame.len();
                    frames.push_back((seq, frame));
                    last = seq;
                    // A replay is held per subscriber until it is written: bounded like the
                    // ring, in events and in bytes (but one event of any size can be read
                    // back). Past that, its oldest events go, and the subscriber gets a `gap`
                    // for them, then the newest.
                    while frames.len() > options.ring_events.max(1) * 16
                        || (bytes > options.ring_bytes && frames.len() > 1)
                    {
                        let Some((seq, frame)) = frames.pop_front() else { break };
                        bytes -= frame.len();
                        let count = skipped.map_or(Some(0), |s| s.count).map(|n| n + 1);
                        skipped = Some(Skipped { through: seq, count });
                    }
                }
                Some(SourceItem::Diagnostic { code, .. }) if code == "runtime.cursor_unknown_or_expired" => {
                    if opened.cannot_tell_restarts {
                        return Err(Unreplayable::Gone(GONE));
                    }
                    expired = true;
                }
                // The runtime replays nothing it retains (or not at once): lost through the ring.
                None if expired && last == after => return Err(Unreplayable::Gone(GONE)),
                _ if Instant::now() > deadline => return Err(Unreplayable::Gone("the replay took too long")),
                _ => {}
            }
        }
        Ok(Replayed { frames: frames.into(), through, skipped })
    }

    /// Keeps, and fans out, one upstream event; false (and nothing done) when its id is not
    /// above the last one's.
    fn publish(&self, options: &RelayOptions, seq: u64, payload: &Payload) -> bool {
        let mut st = self.lock();
        let Some(tag) = st.tag.filter(|_| seq > st.last_seq) else { return false };
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        st.last_seq = seq;
        if st.stuck.take().is_some() {
            let level = if std::mem::take(&mut st.stuck_warned) { log::Level::Warn } else { log::Level::Debug };
            log::log!(
                level,
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
        st.subscribers.retain_mut(|slot| deliver(slot, seq, &frame, options, &self.counters));
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
        tell(&mut st.subscribers, &frame, position, &self.counters);
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
        // A runtime that sends such frames among readable ones warns once a minute at most.
        let level = match st.unreadable_warned {
            Some(at) if at.elapsed() < UNREADABLE_WARNINGS => log::Level::Debug,
            _ => {
                st.unreadable_warned = Some(Instant::now());
                log::Level::Warn
            }
        };
        st.stuck_warned = level == log::Level::Warn;
        log::log!(
            level,
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
        tell(&mut st.subscribers, &frame, at, &self.counters);
        st.stuck = Some((at, frame));
    }

    /// Sends a frame that is not an event (stream state, diagnostics) to every subscriber.
    fn broadcast(&self, frame: &Utf8Bytes) {
        let mut st = self.lock();
        let at = st.last_seq;
        tell(&mut st.subscribers, frame, at, &self.counters);
    }

    /// The worker is gone: tell everyone and end.
    fn finish(&self, hub: &Hub, frame: Utf8Bytes) {
        self.broadcast(&frame);
        let mut relays = hub.relays();
        let mut st = self.lock();
        st.ended = true;
        let st = &mut *st;
        if let Some(tag) = st.tag {
            for slot in st.subscribers.iter_mut().filter(|slot| slot.is_behind()) {
                slot.settle_at_end(&st.ring, st.floor, tag);
            }
        }
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

    /// Hands subscriber `id`, behind and with an empty queue, what it missed (see
    /// [`Slot::catch_up`]).
    fn hand_missed(&self, id: u64, out: &mut Vec<Utf8Bytes>) {
        let mut st = self.lock();
        let Some(tag) = st.tag else { return };
        let st = &mut *st;
        let Some(slot) = st.subscribers.iter_mut().find(|s| s.id == id) else { return };
        if slot.catch_up(&st.ring, st.floor, tag, out) {
            self.counters.gaps.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Events read back from the runtime: every one above a cursor through `through`, but for
/// the oldest ones when there were more than a replay may hold (`skipped`).
struct Replayed {
    frames: Vec<(u64, Utf8Bytes)>,
    through: u64,
    skipped: Option<Skipped>,
}

/// The oldest events of a replay, left out: through which runtime event id, and how many
/// (unknown when the runtime no longer held them).
#[derive(Clone, Copy)]
struct Skipped {
    through: u64,
    count: Option<u64>,
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

/// Why events could not be read back for a subscriber.
enum Unreplayable {
    /// The runtime no longer holds them, or the replay took too long: a `gap`.
    Gone(&'static str),
    /// The runtime cannot be read now: the subscriber is told, and may come back with its
    /// cursor (a `gap` would lose events the runtime still has).
    Failed(RuntimeError),
}

/// How often at most a relay warns of a frame it cannot read (more go to the debug log).
const UNREADABLE_WARNINGS: Duration = Duration::from_secs(60);

/// A subscriber's queue holds at most this many times `event_ring_bytes` (64 MiB by
/// default), besides its initial replay: a browser that does not read keeps that much of
/// its stream alive at most, however large the events.
const QUEUE_BYTES_PER_RING_BYTE: usize = 16;

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

    #[test]
    fn a_replay_fills_the_ring_from_the_front_as_far_as_it_holds() {
        assert_eq!(ring_after(8, &[11, 12], &[5, 7, 10]), (3, vec![5, 7, 10, 11, 12]), "all of it: above 3");
        assert_eq!(ring_after(4, &[11, 12], &[5, 7, 10]), (5, vec![7, 10, 11, 12]), "the newest: above 5");
        assert_eq!(ring_after(2, &[11, 12], &[5, 7, 10]), (10, vec![11, 12]), "a full ring is left as it was");
        assert_eq!(ring_after(8, &[11, 12], &[]), (3, vec![11, 12]), "nothing in between: above 3");
    }
}
