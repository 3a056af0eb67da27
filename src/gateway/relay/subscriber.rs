//! A relay's subscribers: each one's bounded queue ([`Slot`], on the relay's side), what it
//! is handed as events come (`deliver`: a `gap` for what it skipped, 1008 past the lag
//! limit), and its end of the queue as a WebSocket session's [`Feed`] ([`RelayFeed`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use tungstenite::Utf8Bytes;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::{Relay, RelayCounters, RelayOptions, cursor, gap_frame};
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
    /// The runtime event id this subscriber has seen (or been told it skipped) up to.
    pub(super) last_seq: u64,
    /// Events skipped since, and the id of the last of them.
    pub(super) skipped: u64,
    pub(super) last_skipped: u64,
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
    pub(super) fn gap_when_caught_up(&mut self, tag: u64) -> Option<Utf8Bytes> {
        if self.skipped == 0 || !self.tx.is_empty() {
            return None;
        }
        let gap = self.gap(tag);
        self.gap_told();
        Some(gap)
    }
}

/// Hands `frame` (runtime event `seq`) to one subscriber; false drops the subscriber.
pub(super) fn deliver(
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

/// Queues `frame` for each of `subscribers` that has room, and wakes it.
pub(super) fn tell(subscribers: &[Slot], frame: &Utf8Bytes) {
    for slot in subscribers {
        if slot.offer(frame.clone()).is_ok() {
            slot.waker.wake();
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

    pub(super) fn offer(slot: &mut Slot, seq: u64) {
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
}
