//! A relay's subscribers: each one's bounded queue ([`Slot`], on the relay's side), what it
//! is handed as events come (`deliver`), how one that fell behind catches up (from the ring,
//! with a `gap` only for what the ring no longer holds; 1008 past the lag limit), and its end
//! of the queue as a WebSocket session's [`Feed`] ([`RelayFeed`]).

use std::collections::VecDeque;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use tungstenite::Utf8Bytes;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::{Entry, Relay, RelayCounters, RelayOptions, cursor, gap_frame};
use crate::http::websocket::{DRAIN_BATCH, Feed, Waker, close_frame};

/// One subscriber, as its relay sees it.
pub(super) struct Slot {
    pub(super) id: u64,
    /// Unbounded (it allocates as it grows, not up front); `cap` and `max_bytes` bound it.
    pub(super) tx: Sender<Utf8Bytes>,
    pub(super) cap: usize,
    /// Bytes of the frames waiting in `tx` (the session takes off what it drains), and how
    /// many may wait: a few large events fill a queue as surely as many small ones.
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) max_bytes: usize,
    pub(super) waker: Arc<Waker>,
    pub(super) killed: Arc<AtomicBool>,
    pub(super) lagging: Arc<AtomicBool>,
    /// The runtime event id this subscriber has been handed (or told it lost) up to.
    pub(super) last_seq: u64,
    /// Events published after `last_seq` that its full queue could not take: it is behind,
    /// and catches up from the ring once its queue is empty.
    pub(super) skipped: u64,
    /// Frames that are not events (`stream`, diagnostics) told while it was behind or its
    /// queue full, each after the event id it followed: handed in that place as it catches
    /// up, never ahead of the events before them nor dropped.
    pub(super) notices: VecDeque<(u64, Utf8Bytes)>,
    /// Frames were queued since this subscriber was last woken.
    pub(super) unwoken: bool,
}

/// A subscriber's end: frames to send, and the kill flag of a too-slow subscriber.
pub struct Subscription {
    pub(super) frames: Receiver<Utf8Bytes>,
    /// See [`Slot::queued`].
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) killed: Arc<AtomicBool>,
    pub(super) lagging: Arc<AtomicBool>,
    pub(super) relay: Arc<Relay>,
    pub(super) id: u64,
}

/// Ends the subscriptions of `slots`: each channel disconnects (its sender drops) before its
/// session is woken, so the session sees the end and does not go back to sleep.
pub(super) fn disconnect(slots: impl Iterator<Item = Slot>) {
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
    pub(super) fn offer(&self, frame: Utf8Bytes) -> Result<(), TrySendError<Utf8Bytes>> {
        let waiting = self.queued.load(Ordering::SeqCst);
        if self.tx.len() >= self.cap || (waiting > 0 && waiting + frame.len() > self.max_bytes) {
            return Err(TrySendError::Full(frame));
        }
        self.queued.fetch_add(frame.len(), Ordering::SeqCst);
        self.tx.send(frame).map_err(|e| TrySendError::Disconnected(e.into_inner()))
    }

    /// Hands a subscriber that fell behind, once its queue is empty, what it missed: the
    /// events the ring (every event above `floor`) still holds after its last one, up to a
    /// drain batch in `out`, after a `gap` for those the ring no longer holds. Nothing while
    /// frames are queued: the relay may have queued a notice since the session looked, and
    /// the events must not pass it. Only the relay's lock holder calls this, so new events
    /// cannot slip in between. True when a `gap` was handed.
    pub(super) fn catch_up(&mut self, ring: &VecDeque<Entry>, floor: u64, tag: u64, out: &mut Vec<Utf8Bytes>) -> bool {
        if !self.tx.is_empty() || !self.is_behind() {
            self.lagging.store(self.is_behind(), Ordering::SeqCst);
            return false;
        }
        self.owed(ring, floor, tag, out, DRAIN_BATCH)
    }

    /// The stream ends (its worker is gone): what this subscriber is owed — the rest of its
    /// catch-up and the notices it holds, the last of them saying why — goes into its queue
    /// behind what is there, before the queue closes. Nothing is dropped at the end.
    pub(super) fn settle_at_end(&mut self, ring: &VecDeque<Entry>, floor: u64, tag: u64) {
        let mut owed = Vec::new();
        self.owed(ring, floor, tag, &mut owed, usize::MAX);
        for frame in owed {
            self.queued.fetch_add(frame.len(), Ordering::SeqCst); // the session takes it off
            let _ = self.tx.send(frame);
        }
    }

    /// Moves into `out` (up to `most` frames in all) what this subscriber behind is owed, in
    /// order: a `gap` for what the ring lost, then the ring's events with the notices held
    /// in their places. True when a `gap` was handed.
    fn owed(&mut self, ring: &VecDeque<Entry>, floor: u64, tag: u64, out: &mut Vec<Utf8Bytes>, most: usize) -> bool {
        // The ring is in event order: where the events after an id start, found by halving
        // (a thousand subscribers catching up must not each scan it under the relay's lock).
        let after = |seq: u64| ring.partition_point(|e| e.seq <= seq);
        let mut gap = false;
        if self.skipped > 0 && floor > self.last_seq {
            let lost = self.skipped.saturating_sub((ring.len() - after(self.last_seq)) as u64);
            out.push(gap_frame(&cursor::encode(tag, self.last_seq), &cursor::encode(tag, floor), Some(lost)));
            self.last_seq = floor;
            gap = true;
        }
        self.hand_notices(out);
        for entry in ring.range(after(self.last_seq)..) {
            if out.len() >= most {
                break;
            }
            out.push(entry.frame.clone());
            self.last_seq = entry.seq;
            self.hand_notices(out);
        }
        self.skipped = (ring.len() - after(self.last_seq)) as u64;
        if self.skipped == 0 {
            out.extend(self.notices.drain(..).map(|(_, frame)| frame)); // told after the last event
        }
        self.lagging.store(self.is_behind(), Ordering::SeqCst);
        gap
    }

    /// Behind on events, or holding notices: what it is handed next comes from
    /// [`Slot::catch_up`], not its queue.
    pub(super) fn is_behind(&self) -> bool {
        self.skipped > 0 || !self.notices.is_empty()
    }

    /// Moves the notices told at or before its last event to `out`.
    fn hand_notices(&mut self, out: &mut Vec<Utf8Bytes>) {
        while self.notices.front().is_some_and(|(at, _)| *at <= self.last_seq) {
            out.extend(self.notices.pop_front().map(|(_, frame)| frame));
        }
    }

    /// Tells this subscriber `frame` (not an event), told after event `at`: queued, or held
    /// for its place when it is behind or its queue is full. One holding more notices than
    /// that is as good as gone: closed with 1008 `slow_consumer`, and counted as one.
    fn tell(&mut self, frame: &Utf8Bytes, at: u64, counters: &RelayCounters) {
        if self.killed.load(Ordering::SeqCst) {
            return; // its session is closing it
        }
        if !self.is_behind() && self.offer(frame.clone()).is_ok() {
            return self.waker.wake();
        }
        if self.notices.len() >= MAX_HELD_NOTICES {
            counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
            self.killed.store(true, Ordering::SeqCst);
            return self.waker.wake();
        }
        self.notices.push_back((at, frame.clone()));
        self.lagging.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// Notices a subscriber behind may hold (see [`Slot::notices`]).
const MAX_HELD_NOTICES: usize = 64;

/// Hands `frame` (runtime event `seq`) to one subscriber; false drops the subscriber.
pub(super) fn deliver(
    slot: &mut Slot,
    seq: u64,
    frame: &Utf8Bytes,
    options: &RelayOptions,
    counters: &RelayCounters,
) -> bool {
    if seq <= slot.last_seq {
        return true; // already in its snapshot or replay
    }
    if slot.is_behind() {
        // Behind: it catches up from the ring, in order, before anything new is queued.
        slot.skipped += 1;
        if slot.skipped > options.lag_limit {
            counters.slow_consumers.fetch_add(1, Ordering::Relaxed);
            slot.killed.store(true, Ordering::SeqCst);
            slot.waker.wake();
            return false;
        }
        return true;
    }
    match slot.offer(frame.clone()) {
        Ok(()) => {
            slot.last_seq = seq;
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

/// Tells each of `subscribers` `frame` (not an event), in its place after event `at`.
pub(super) fn tell(subscribers: &mut [Slot], frame: &Utf8Bytes, at: u64, counters: &RelayCounters) {
    for slot in subscribers {
        slot.tell(frame, at, counters);
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
                        sub.relay.hand_missed(sub.id, out);
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
    use crossbeam_channel::unbounded;

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
            notices: VecDeque::new(),
            unwoken: false,
        };
        (slot, rx)
    }

    /// A stream of one subscriber: a ring of `ring` events (every one above `floor`), fed as
    /// the relay's publish does.
    struct Stream {
        slot: Slot,
        rx: Receiver<Utf8Bytes>,
        ring: VecDeque<Entry>,
        ring_events: usize,
        floor: u64,
        options: RelayOptions,
        counters: RelayCounters,
    }

    impl Stream {
        fn new(cap: usize, ring_events: usize) -> Stream {
            let (slot, rx) = slot(cap);
            Stream {
                slot,
                rx,
                ring: VecDeque::new(),
                ring_events,
                floor: 0,
                options: RelayOptions::default(),
                counters: RelayCounters::default(),
            }
        }

        /// Tells a notice (a `stream` frame) after the last event published.
        fn tell(&mut self) {
            let at = self.ring.back().map_or(0, |e| e.seq);
            let frame = Utf8Bytes::from(r#"{"kind":"stream"}"#);
            tell(std::slice::from_mut(&mut self.slot), &frame, at, &self.counters);
        }

        fn publish(&mut self, seqs: std::ops::RangeInclusive<u64>) -> bool {
            seqs.into_iter().all(|seq| {
                let frame = Utf8Bytes::from(format!("{{\"kind\":\"event\",\"seq\":{seq}}}"));
                self.ring.push_back(Entry { seq, frame: frame.clone() });
                while self.ring.len() > self.ring_events {
                    self.floor = self.ring.pop_front().map_or(self.floor, |e| e.seq);
                }
                deliver(&mut self.slot, seq, &frame, &self.options, &self.counters)
            })
        }

        /// What a session reads in one drain: its queue, then (when behind) what it missed,
        /// as (kind, first, last) runtime event ids: an event is (e, id, id), a gap
        /// (g, after, resumed_at, dropped).
        fn drain(&mut self) -> Vec<(char, u64, u64)> {
            let mut out = Vec::new();
            while let Ok(frame) = self.rx.try_recv() {
                self.slot.queued.fetch_sub(frame.len(), Ordering::SeqCst);
                out.push(frame);
            }
            if self.slot.lagging.load(Ordering::SeqCst) {
                self.slot.catch_up(&self.ring, self.floor, 7, &mut out);
            }
            out.iter().map(read).collect()
        }
    }

    fn read(frame: &Utf8Bytes) -> (char, u64, u64) {
        let seq = |v: &serde_json::Value| u64::from_str_radix(&v.as_str().unwrap()[19..], 16).unwrap();
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        match v["kind"].as_str() {
            Some("stream") => ('n', 0, 0),
            Some("gap") => {
                assert_eq!(v["dropped"].as_u64(), Some(seq(&v["resumed_at"]) - seq(&v["after"])), "{v}");
                ('g', seq(&v["after"]), seq(&v["resumed_at"]))
            }
            _ => ('e', v["seq"].as_u64().unwrap(), v["seq"].as_u64().unwrap()),
        }
    }

    fn events(seqs: std::ops::RangeInclusive<u64>) -> Vec<(char, u64, u64)> {
        seqs.map(|seq| ('e', seq, seq)).collect()
    }

    /// A burst larger than the queue (a runtime's catch-up after a restart) reaches a reader
    /// whole: what did not fit comes from the ring once the queue is read, in order, and
    /// events published meanwhile wait behind it (it used to be a `gap`).
    #[test]
    fn a_subscriber_behind_catches_up_from_the_ring_without_a_gap() {
        let mut stream = Stream::new(4, 100);
        assert!(stream.publish(1..=10));
        assert_eq!(stream.drain(), events(1..=10), "4 queued, then 6 from the ring");
        assert!(stream.publish(11..=20));
        assert_eq!(stream.drain(), events(11..=20));
        assert!(!stream.slot.lagging.load(Ordering::SeqCst), "caught up");
        assert!(stream.publish(21..=22));
        assert_eq!(stream.drain(), events(21..=22), "then live again, through its queue");
    }

    /// Only what the ring no longer holds is lost, and told: a `gap` through the ring's
    /// floor with its count, then the rest; the next gap starts where the last one ended.
    #[test]
    fn a_subscriber_behind_the_ring_is_told_only_what_it_lost() {
        let mut stream = Stream::new(2, 5);
        assert!(stream.publish(1..=12)); // 1, 2 queued; the ring holds 8..=12
        let mut want = events(1..=2);
        want.push(('g', 2, 7));
        want.extend(events(8..=12));
        assert_eq!(stream.drain(), want);
        assert!(stream.publish(13..=30)); // 13, 14 queued; the ring holds 26..=30
        let mut want = events(13..=14);
        want.push(('g', 14, 25));
        want.extend(events(26..=30));
        assert_eq!(stream.drain(), want);
    }

    /// A catch-up never passes a frame queued since the session looked (a notice the relay
    /// told everyone): the session drains again and gets the events after it.
    #[test]
    fn a_catch_up_waits_for_the_queue() {
        let mut stream = Stream::new(1, 100);
        assert!(stream.publish(1..=3));
        let mut out = Vec::new();
        assert!(!stream.slot.catch_up(&stream.ring, stream.floor, 7, &mut out));
        assert!(out.is_empty(), "event 1 is still queued");
        assert_eq!(stream.drain(), events(1..=3));
    }

    /// A drain hands at most a batch; a subscriber still behind stays so until it has it all.
    #[test]
    fn a_catch_up_comes_a_batch_at_a_time() {
        let mut stream = Stream::new(1, 4 * DRAIN_BATCH);
        let last = 2 * DRAIN_BATCH as u64;
        assert!(stream.publish(1..=last));
        assert_eq!(stream.drain(), events(1..=DRAIN_BATCH as u64));
        assert!(stream.slot.lagging.load(Ordering::SeqCst));
        assert_eq!(stream.drain(), events(DRAIN_BATCH as u64 + 1..=last));
        assert!(!stream.slot.lagging.load(Ordering::SeqCst));
    }

    /// A notice told while a subscriber is behind, or while its queue is full, comes in its
    /// place among the events: after those before it, before those after it (it used to be
    /// queued ahead of the catch-up, or dropped with a full queue).
    #[test]
    fn a_notice_to_a_subscriber_behind_keeps_its_place() {
        let mut stream = Stream::new(4, 100);
        assert!(stream.publish(1..=10)); // 1..=4 queued, 5..=10 behind
        stream.tell();
        assert!(stream.publish(11..=12));
        let mut want = events(1..=10);
        want.push(('n', 0, 0));
        want.extend(events(11..=12));
        assert_eq!(stream.drain(), want);
        // A full queue, not behind: the notice waits for its place, and so do the events after it.
        assert!(stream.publish(13..=16));
        stream.tell();
        assert!(stream.publish(17..=17));
        let mut want = events(13..=16);
        want.push(('n', 0, 0));
        want.extend(events(17..=17));
        assert_eq!(stream.drain(), want);
        assert!(!stream.slot.lagging.load(Ordering::SeqCst));
        stream.tell();
        assert_eq!(stream.drain(), [('n', 0, 0)], "caught up: straight to its queue");
    }

    /// A subscriber that holds more notices than [`MAX_HELD_NOTICES`] is closed, and counted
    /// once as a slow consumer however many notices come after.
    #[test]
    fn a_subscriber_holding_too_many_notices_is_closed_and_counted_once() {
        let mut stream = Stream::new(1, 100);
        assert!(stream.publish(1..=3)); // behind: every notice is held
        for _ in 0..MAX_HELD_NOTICES {
            stream.tell();
        }
        assert!(!stream.slot.killed.load(Ordering::SeqCst));
        for _ in 0..3 {
            stream.tell();
        }
        assert!(stream.slot.killed.load(Ordering::SeqCst));
        assert_eq!(stream.counters.slow_consumers.load(Ordering::Relaxed), 1);
        assert_eq!(stream.slot.notices.len(), MAX_HELD_NOTICES, "nothing held once closed");
    }

    /// A stream that ends while a subscriber is behind (its worker gone) leaves it everything
    /// it is owed, then the notice saying why, in its queue before it closes (the slot was
    /// dropped with them).
    #[test]
    fn a_stream_ending_leaves_a_subscriber_behind_what_it_is_owed() {
        let mut stream = Stream::new(4, 100);
        assert!(stream.publish(1..=10));
        stream.tell();
        stream.slot.settle_at_end(&stream.ring, stream.floor, 7);
        let mut want = events(1..=10);
        want.push(('n', 0, 0));
        let queued: Vec<_> = stream.rx.try_iter().collect();
        assert_eq!(queued.iter().map(read).collect::<Vec<_>>(), want);
    }

    /// One that reads nothing while more than the lag limit passes is dropped.
    #[test]
    fn a_subscriber_past_the_lag_limit_is_dropped() {
        let mut stream = Stream::new(2, 100);
        stream.options.lag_limit = 10;
        assert!(stream.publish(1..=12), "2 queued, 10 behind");
        assert!(!stream.publish(13..=13), "11 behind");
        assert!(stream.slot.killed.load(Ordering::SeqCst));
    }
}
