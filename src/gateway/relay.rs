//! The event hub: one relay per `(runtime, worker)` that has subscribers.
//!
//! A relay owns one upstream (the remote's WebSocket, or the engine's subscription) on a
//! thread of its own, numbers events with gateway cursors, keeps a bounded replay ring and
//! fans frames out through bounded channels — each frame serialized once and shared. A
//! subscriber that falls behind skips events and is told with a `gap`; past a hard limit it
//! is closed with 1008 `slow_consumer`. Nobody slows the upstream or the others.
//!
//! Gateway cursors (`bo_`) are `block << 32 | index`: every relay takes a fresh block from a
//! process-wide counter and numbers its events 1, 2, 3… So cursors never repeat in a process,
//! grow within a stream, and the events lost between two cursors of a stream are counted
//! exactly.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, unbounded};
use serde_json::json;
use serde_json::value::RawValue;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::http::websocket::{Feed, Waker, close_frame};
use crate::runtime::frames::{GATEWAY_CURSOR, cursor, diagnostic_frame, event_frame};
use crate::runtime::handle::{EventSource, RuntimeError, RuntimeHandle, SourceItem};

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
        }
    }
}

type Key = (String, String);

/// Counters of everything relayed, for `/metrics`.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Events received from upstreams and numbered.
    pub events: AtomicU64,
    /// Upstream connections re-established after a drop.
    pub reconnects: AtomicU64,
    /// `gap` frames sent.
    pub gaps: AtomicU64,
    /// Subscribers closed with 1008 `slow_consumer`.
    pub slow_consumers: AtomicU64,
}

/// All relays of a gateway.
pub struct Hub {
    relays: Mutex<HashMap<Key, Arc<Relay>>>,
    next_block: AtomicU64,
    upstreams: AtomicUsize,
    options: RelayOptions,
    counters: Arc<RelayCounters>,
}

struct Relay {
    runtime_id: String,
    worker_id: String,
    base: u64,
    counters: Arc<RelayCounters>,
    /// The runtime cursor of the first subscriber's snapshot: the upstream starts there, so
    /// nothing between that snapshot and the upstream connection is missed.
    start_from: u64,
    handle: Arc<dyn RuntimeHandle>,
    state: Mutex<RelayState>,
}

#[derive(Default)]
struct RelayState {
    index: u64,
    epoch: u64,
    ring: VecDeque<Entry>,
    ring_bytes: usize,
    evicted_through: u64,
    subscribers: Vec<Slot>,
    next_slot: u64,
    idle_since: Option<Instant>,
    ended: bool,
    /// Events published since subscribers were last woken (see [`Relay::wake_queued`]).
    unwoken: usize,
}

struct Entry {
    index: u64,
    epoch: u64,
    seq: u64,
    frame: Utf8Bytes,
}

struct Slot {
    id: u64,
    /// Unbounded (it allocates as it grows, not up front); `cap` bounds it.
    tx: Sender<Utf8Bytes>,
    cap: usize,
    waker: Arc<Waker>,
    killed: Arc<AtomicBool>,
    lagging: Arc<AtomicBool>,
    last_index: u64,
    skipped: u64,
    skip_through: Option<(u64, u64)>,
    /// Frames were queued since this subscriber was last woken.
    unwoken: bool,
}

/// A fresh snapshot of a worker, built before the upgrade (so its failures are HTTP errors).
pub struct Snapshot {
    /// The runtime cursor it stands at (the worker's `last_event_id`).
    pub position: u64,
    /// The `snapshot` event payload, as browsers see it.
    pub payload: serde_json::Value,
}

/// A subscriber's end: frames to send, and the kill flag of a too-slow subscriber.
pub struct Subscription {
    frames: Receiver<Utf8Bytes>,
    killed: Arc<AtomicBool>,
    lagging: Arc<AtomicBool>,
    relay: Arc<Relay>,
    id: u64,
}

impl Hub {
    /// An empty hub.
    pub fn new(options: RelayOptions) -> Arc<Hub> {
        Arc::new(Hub {
            relays: Mutex::default(),
            next_block: AtomicU64::new(1),
            upstreams: AtomicUsize::new(0),
            options,
            counters: Arc::default(),
        })
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

    /// Subscribes to `(runtime_id, worker_id)`: with a gateway cursor, every retained event
    /// after it (a `gap` first if some were evicted); without one, `snapshot` and what
    /// follows it. Then live. Starts the relay if there is none.
    pub fn subscribe(
        self: &Arc<Self>,
        runtime_id: &str,
        worker_id: &str,
        handle: Arc<dyn RuntimeHandle>,
        after: Option<u64>,
        snapshot: Snapshot,
        waker: Arc<Waker>,
    ) -> Subscription {
        let relay = {
            let mut relays = self.relays();
            let key = (runtime_id.to_owned(), worker_id.to_owned());
            match relays.get(&key) {
                Some(relay) => relay.clone(),
                None => {
                    let block = self.next_block.fetch_add(1, Ordering::SeqCst);
                    let relay = Arc::new(Relay {
                        runtime_id: key.0.clone(),
                        worker_id: key.1.clone(),
                        base: block << 32,
                        start_from: snapshot.position,
                        counters: self.counters.clone(),
                        handle,
                        state: Mutex::default(),
                    });
                    relays.insert(key, relay.clone());
                    let (hub, upstream) = (self.clone(), relay.clone());
                    self.upstreams.fetch_add(1, Ordering::SeqCst);
                    let spawned = std::thread::Builder::new().name(format!("relay-{runtime_id}")).spawn(move || {
                        run_upstream(&hub, &upstream);
                        hub.upstreams.fetch_sub(1, Ordering::SeqCst);
                    });
                    if let Err(e) = spawned {
                        self.upstreams.fetch_sub(1, Ordering::SeqCst);
                        log::error!("cannot start a relay thread: {e}");
                    }
                    relay
                }
            }
        };
        let mut st = relay.lock();
        let initial = relay.initial_frames(&mut st, after, &snapshot);
        let (tx, frames) = unbounded();
        let cap = self.options.queue + initial.frames.len();
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
            waker: waker.clone(),
            killed: killed.clone(),
            last_index: initial.last_index,
            lagging: lagging.clone(),
            skipped: 0,
            skip_through: initial.skip_through,
            unwoken: false,
        });
        st.idle_since = None;
        if st.ended {
            st.subscribers.clear(); // the worker is gone: the session ends at once
        }
        drop(st);
        waker.wake();
        Subscription { frames, killed, lagging, relay, id }
    }
}

/// What a new subscriber is sent first.
struct Initial {
    frames: Vec<Utf8Bytes>,
    last_index: u64,
    skip_through: Option<(u64, u64)>,
}

impl Relay {
    fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gateway_cursor(&self, index: u64) -> String {
        cursor(GATEWAY_CURSOR, self.base + index)
    }

    fn initial_frames(&self, st: &mut RelayState, after: Option<u64>, snapshot: &Snapshot) -> Initial {
        let mut frames = Vec::new();
        if let Some(c) = after {
            let in_block = c >= self.base && c - self.base <= st.index;
            if in_block {
                let n = c - self.base;
                let oldest = st.ring.front().map_or(st.index + 1, |e| e.index);
                if n + 1 < oldest && st.evicted_through > n {
                    self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                    frames.push(gap_frame(&self.gateway_cursor(n), &self.gateway_cursor(oldest), oldest - n - 1));
                }
                frames.extend(st.ring.iter().filter(|e| e.index > n).map(|e| e.frame.clone()));
                return Initial { frames, last_index: st.index.max(n), skip_through: None };
            }
            let detail = "the cursor is not from this stream (the gateway restarted or the stream was idle); starting from a snapshot";
            frames.push(stream_frame("reset", detail));
        }
        // A snapshot at runtime cursor `position`, then whatever the ring has after it.
        let current: Vec<&Entry> = st.ring.iter().filter(|e| e.epoch == st.epoch).collect();
        let position = match current.iter().position(|e| e.seq > snapshot.position) {
            Some(0) => current[0].index - 1,
            Some(i) => current[i - 1].index,
            None => st.index,
        };
        let c = self.gateway_cursor(position);
        frames.push(event_frame(
            &c,
            &format!("snapshot:{c}"),
            Some(&self.runtime_id),
            &self.worker_id,
            &snapshot.payload,
        ));
        frames.extend(st.ring.iter().filter(|e| e.index > position).map(|e| e.frame.clone()));
        Initial { frames, last_index: st.index.max(position), skip_through: Some((st.epoch, snapshot.position)) }
    }

    /// Numbers, keeps and fans out one upstream event.
    fn publish(&self, options: &RelayOptions, seq: u64, payload: &RawValue) {
        let mut st = self.lock();
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        st.index += 1;
        let index = st.index;
        let c = self.gateway_cursor(index);
        let frame = event_frame(&c, &c, Some(&self.runtime_id), &self.worker_id, payload);
        st.ring_bytes += frame.len();
        let epoch = st.epoch;
        st.ring.push_back(Entry { index, epoch, seq, frame: frame.clone() });
        while st.ring.len() > options.ring_events || (st.ring_bytes > options.ring_bytes && st.ring.len() > 1) {
            if let Some(old) = st.ring.pop_front() {
                st.ring_bytes -= old.frame.len();
                st.evicted_through = old.index;
            }
        }
        st.unwoken += 1;
        let gateway_cursor = |i| self.gateway_cursor(i);
        st.subscribers.retain_mut(|slot| {
            if slot.skip_through.is_some_and(|(e, s)| e == epoch && seq <= s) {
                return true;
            }
            deliver(slot, index, &frame, options, &gateway_cursor, &self.counters)
        });
    }

    /// Sends a frame that is not an event (stream state, diagnostics) to every subscriber.
    fn broadcast(&self, frame: &Utf8Bytes) {
        let st = self.lock();
        for slot in &st.subscribers {
            if slot.offer(frame.clone()).is_ok() {
                slot.waker.wake();
            }
        }
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

    /// True (and unregistered) when the last subscriber left more than `linger` ago.
    /// Events published but not yet announced to their subscribers.
    fn unwoken(&self) -> usize {
        self.lock().unwoken
    }

    /// Wakes every subscriber with newly queued frames. The relay publishes what the upstream
    /// has ready and wakes once per batch: with many subscribers, one wake per event each
    /// would cost more than the events themselves.
    fn wake_queued(&self) {
        let mut st = self.lock();
        st.unwoken = 0;
        for slot in st.subscribers.iter_mut().filter(|slot| slot.unwoken) {
            slot.unwoken = false;
            slot.waker.wake();
        }
    }

    fn should_end(&self, hub: &Hub) -> bool {
        let mut relays = hub.relays();
        let st = self.lock();
        let idle = st.subscribers.is_empty() && st.idle_since.is_some_and(|t| t.elapsed() >= hub.options.linger);
        if idle {
            self.unregister(&mut relays);
        }
        idle
    }

    /// The `gap` notice for a subscriber that skipped events and has caught up with its
    /// queue: everything after its last delivered event up to now was skipped, and the next
    /// event will follow the notice.
    fn gap_notice(&self, id: u64) -> Option<Utf8Bytes> {
        let mut st = self.lock();
        let next = st.index + 1;
        let slot = st.subscribers.iter_mut().find(|s| s.id == id && s.skipped > 0)?;
        let (after, skipped) = (slot.last_index, slot.skipped);
        slot.skipped = 0;
        slot.last_index = next - 1;
        slot.lagging.store(false, Ordering::SeqCst);
        self.counters.gaps.fetch_add(1, Ordering::Relaxed);
        Some(gap_frame(&self.gateway_cursor(after), &self.gateway_cursor(next), skipped))
    }

    fn new_epoch(&self) {
        self.lock().epoch += 1;
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
    /// Queues a frame unless the subscriber already has `cap` waiting. Only the relay sends,
    /// under its lock, so the length check cannot race another sender.
    fn offer(&self, frame: Utf8Bytes) -> Result<(), TrySendError<Utf8Bytes>> {
        if self.tx.len() >= self.cap {
            return Err(TrySendError::Full(frame));
        }
        self.tx.send(frame).map_err(|e| TrySendError::Disconnected(e.into_inner()))
    }
}

/// Hands `frame` (event `index`) to one subscriber; false drops the subscriber.
fn deliver(
    slot: &mut Slot,
    index: u64,
    frame: &Utf8Bytes,
    options: &RelayOptions,
    cursor_of: &dyn Fn(u64) -> String,
    counters: &RelayCounters,
) -> bool {
    if slot.skipped > 0 {
        let gap = gap_frame(&cursor_of(slot.last_index), &cursor_of(index), slot.skipped);
        if slot.offer(gap).is_err() {
            slot.skipped += 1;
            if slot.skipped > options.lag_limit {
                counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
                slot.killed.store(true, Ordering::SeqCst);
                slot.waker.wake();
                return false;
            }
            return true;
        }
        slot.skipped = 0;
        slot.lagging.store(false, Ordering::SeqCst);
        counters.gaps.fetch_add(1, Ordering::Relaxed);
    }
    match slot.offer(frame.clone()) {
        Ok(()) => {
            slot.last_index = index;
            slot.unwoken = true; // woken once per batch: Relay::wake_queued
            true
        }
        Err(TrySendError::Full(_)) => {
            slot.skipped = 1;
            slot.lagging.store(true, Ordering::SeqCst);
            slot.waker.wake();
            true
        }
        Err(TrySendError::Disconnected(_)) => false,
    }
}

fn gap_frame(after: &str, resumed_at: &str, dropped: u64) -> Utf8Bytes {
    json!({"kind": "gap", "after": after, "resumed_at": resumed_at, "dropped": dropped}).to_string().into()
}

fn stream_frame(state: &str, detail: &str) -> Utf8Bytes {
    json!({"kind": "stream", "state": state, "detail": detail}).to_string().into()
}

/// How one upstream connection ended.
enum Ended {
    /// No subscribers left.
    Idle,
    /// The worker no longer exists.
    WorkerGone,
    /// The connection broke: reconnect.
    Broken,
}

/// Where the upstream stands, across reconnections.
#[derive(Default)]
struct Position {
    resume: Option<u64>,
    boot_id: Option<String>,
    connected_before: bool,
}

fn run_upstream(hub: &Hub, relay: &Relay) {
    let mut position = Position { resume: Some(relay.start_from), ..Position::default() };
    let mut attempt = 0u32;
    let mut outage_told = false;
    loop {
        let ended = match relay.handle.open_events(&relay.worker_id, position.resume) {
            Ok(mut source) => pump(hub, relay, source.as_mut(), &mut position, &mut attempt, &mut outage_told),
            Err(RuntimeError::WorkerNotFound) => Ended::WorkerGone,
            Err(e) => {
                log::debug!("relay {}/{}: upstream unavailable: {e}", relay.runtime_id, relay.worker_id);
                Ended::Broken
            }
        };
        match ended {
            Ended::Idle => return,
            Ended::WorkerGone => {
                let frame = diagnostic_frame("backend.worker_not_found", "the worker no longer exists on its runtime");
                return relay.finish(hub, frame);
            }
            Ended::Broken => {}
        }
        if position.connected_before && !outage_told {
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

/// Capped exponential backoff with full jitter: uniform in `[0, min(cap, 100 ms × 2^attempt)]`.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let ceiling = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(16)).min(cap);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    let fraction = (hasher.finish() % 10_000) as f64 / 10_000.0;
    ceiling.mul_f64(fraction)
}

/// Events published before subscribers are woken even if the upstream has more ready.
const MAX_BATCH: usize = 64;

fn pump(
    hub: &Hub,
    relay: &Relay,
    source: &mut dyn EventSource,
    position: &mut Position,
    attempt: &mut u32,
    outage_told: &mut bool,
) -> Ended {
    let mut got_snapshot = false;
    loop {
        // Take what is ready without waiting while a batch is open; wake before any wait.
        let unwoken = relay.unwoken();
        let batching = unwoken > 0 && unwoken < MAX_BATCH;
        if unwoken > 0 && !batching {
            relay.wake_queued();
        }
        let item = source.next(if batching { Duration::ZERO } else { Duration::from_millis(250) });
        if batching && !matches!(item, Ok(Some(_))) {
            relay.wake_queued();
            if matches!(item, Ok(None)) {
                continue;
            }
        }
        match item {
            Ok(Some(SourceItem::Snapshot { position: at, boot_id, durable, cursor_honoured, .. })) => {
                if got_snapshot {
                    continue;
                }
                got_snapshot = true;
                *attempt = 0;
                *outage_told = false;
                let restarted = matches!((&position.boot_id, &boot_id), (Some(a), Some(b)) if a != b);
                let reset = position.connected_before && (cursor_honoured == Some(false) || (restarted && !durable));
                if position.connected_before {
                    relay.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    if reset {
                        relay.new_epoch();
                        let detail = "the runtime restarted and could not resume; events in between are lost";
                        relay.broadcast(&stream_frame("reset", detail));
                    } else {
                        relay.broadcast(&stream_frame(
                            "resumed",
                            "the runtime's event stream is back; nothing was lost",
                        ));
                    }
                }
                if position.resume.is_none() || reset {
                    position.resume = Some(at);
                }
                position.boot_id = boot_id;
                position.connected_before = true;
            }
            Ok(Some(SourceItem::Event { seq, payload })) => {
                if position.resume.is_none_or(|r| seq > r) {
                    relay.publish(&hub.options, seq, &payload);
                    position.resume = Some(seq);
                }
            }
            Ok(Some(SourceItem::Diagnostic { code, message })) => match code.as_str() {
                "runtime.worker_not_found" => return Ended::WorkerGone,
                "runtime.cursor_unknown_or_expired" => {
                    relay.new_epoch();
                    relay.broadcast(&stream_frame(
                        "reset",
                        "the runtime could not resume from our cursor; events in between are lost",
                    ));
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
            }
            Err(reason) => {
                log::debug!("relay {}/{}: upstream ended: {reason}", relay.runtime_id, relay.worker_id);
                return Ended::Broken;
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
                Ok(frame) => out.push(frame),
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
            if out.len() >= 512 {
                return None;
            }
        }
    }
}
