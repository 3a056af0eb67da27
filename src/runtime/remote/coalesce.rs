//! Identical reads in flight at once share upstream requests.
//!
//! Twenty dashboards polling one worker, or a burst of scripts reading it, would otherwise
//! cost the runtime, and the gateway's connections to it, one request each. (A read waiting
//! for another's request still counts in the runtime's `max_in_flight`: it holds a gateway
//! thread, and that cap is what keeps one slow runtime from holding them all.) A read
//! never takes the answer of a request that was already on its way when the read arrived:
//! it waits for the next request, which starts after it arrived, so a client that reads
//! after its own write acknowledged still sees that write. At most two requests per key are
//! ever under way or waiting: the one on the wire and the next one, which every read that
//! arrives meanwhile joins.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Reads by key: the request on the wire and the one that goes next.
pub struct Coalescer<T> {
    keys: Mutex<HashMap<String, Pair<T>>>,
}

struct Pair<T> {
    /// Sent (or being sent) now.
    sending: Arc<Flight<T>>,
    /// Sent when `sending` is answered, for everyone who arrived since it was sent.
    next: Option<Arc<Flight<T>>>,
}

/// One upstream request and the answer its readers wait for.
struct Flight<T> {
    answer: Mutex<Option<T>>,
    answered: Condvar,
}

impl<T: Clone> Flight<T> {
    fn new() -> Arc<Flight<T>> {
        Arc::new(Flight { answer: Mutex::new(None), answered: Condvar::new() })
    }

    /// The answer, or `None` at `deadline`.
    fn wait(&self, deadline: Instant) -> Option<T> {
        let mut answer = self.answer.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(answer) = &*answer {
                return Some(answer.clone());
            }
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
            answer = self.answered.wait_timeout(answer, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn answer(&self, value: T) {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        self.answered.notify_all();
    }
}

impl<T: Clone> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer { keys: Mutex::new(HashMap::new()) }
    }
}

impl<T: Clone> Coalescer<T> {
    fn keys(&self) -> MutexGuard<'_, HashMap<String, Pair<T>>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer of a request for `key` sent after this call began, or `expired()` when
    /// none came by `deadline`: `send` is run here when no other read of `key` is under way,
    /// or when this read is the first to wait for the next request; otherwise another read's
    /// request answers this one too. Reads sharing a key must share a budget (make it part
    /// of the key), so the one sending has the earliest deadline; `send` must end by it. If
    /// `send` panics, `abandoned` answers whoever waited for it.
    pub fn read(
        &self,
        key: &str,
        deadline: Instant,
        send: impl FnOnce() -> T,
        expired: impl Fn() -> T,
        abandoned: impl Fn() -> T,
    ) -> T {
        let mut keys = self.keys();
        let flight = match keys.get_mut(key) {
            None => {
                let flight = Flight::new();
                keys.insert(key.to_owned(), Pair { sending: flight.clone(), next: None });
                drop(keys);
                flight
            }
            Some(pair) => match &pair.next {
                Some(next) => {
                    let next = next.clone();
                    drop(keys);
                    return next.wait(deadline).unwrap_or_else(expired);
                }
                None => {
                    let next = Flight::new();
                    pair.next = Some(next.clone());
                    let sending = pair.sending.clone();
                    drop(keys);
                    // Its answer may predate this read; its sender hands the key over to
                    // `next`, which this read sends.
                    if sending.wait(deadline).is_none() && self.give_up(key, &next) {
                        next.answer(expired());
                        return expired();
                    }
                    next
                }
            },
        };
        let mut guard = Sender { coalescer: self, key, flight: &flight, abandoned: &abandoned, done: false };
        let answer = send();
        guard.finish(answer.clone());
        answer
    }

    /// Withdraws `next`, whose sender's time ran out before the request ahead of it was
    /// answered; false when that request was answered meanwhile (`next` is to be sent).
    fn give_up(&self, key: &str, next: &Arc<Flight<T>>) -> bool {
        let mut keys = self.keys();
        let pair = keys.get_mut(key);
        match pair {
            Some(pair) if pair.next.as_ref().is_some_and(|n| Arc::ptr_eq(n, next)) => {
                pair.next = None;
                true
            }
            _ => false,
        }
    }
}

/// The read sending a flight: answers it and hands the key over to the next flight, also
/// when `send` panics.
struct Sender<'a, T: Clone, A: Fn() -> T> {
    coalescer: &'a Coalescer<T>,
    key: &'a str,
    flight: &'a Arc<Flight<T>>,
    abandoned: &'a A,
    done: bool,
}

impl<T: Clone, A: Fn() -> T> Sender<'_, T, A> {
    fn finish(&mut self, answer: T) {
        self.done = true;
        {
            let mut keys = self.coalescer.keys();
            let promoted = keys.get_mut(self.key).and_then(|pair| pair.next.take());
            match promoted {
                Some(next) => {
                    if let Some(pair) = keys.get_mut(self.key) {
                        pair.sending = next;
                    }
                }
                None => {
                    keys.remove(self.key);
                }
            }
        }
        // Answered after the hand-over: the next flight's sender, woken by this, finds
        // itself `sending` and later arrivals join a new `next`.
        self.flight.answer(answer);
    }
}

impl<T: Clone, A: Fn() -> T> Drop for Sender<'_, T, A> {
    fn drop(&mut self) {
        if !self.done {
            self.finish((self.abandoned)());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Coalescer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_lone_read_sends_its_own_request() {
        let c = Coalescer::<u32>::default();
        assert_eq!(c.read("k", far(), || 7, || 0, || 0), 7);
        assert_eq!(c.read("k", far(), || 8, || 0, || 0), 8);
        assert!(c.keys().is_empty());
    }

    /// Reads that arrive while a request is on the wire share one later request, whose
    /// answer is newer than their arrival.
    #[test]
    fn reads_during_a_request_share_the_next_one() {
        let c = Arc::new(Coalescer::<usize>::default());
        let sent = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(0);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let first = {
            let (c, sent) = (c.clone(), sent.clone());
            std::thread::spawn(move || {
                c.read(
                    "k",
                    far(),
                    || {
                        entered_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                        sent.fetch_add(1, Ordering::SeqCst)
                    },
                    || usize::MAX,
                    || usize::MAX,
                )
            })
        };
        entered_rx.recv().unwrap(); // the first request is on the wire
        let barrier = Arc::new(Barrier::new(9));
        let later: Vec<_> = (0..8)
            .map(|_| {
                let (c, sent, barrier) = (c.clone(), sent.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    c.read("k", far(), || sent.fetch_add(1, Ordering::SeqCst), || usize::MAX, || usize::MAX)
                })
            })
            .collect();
        barrier.wait();
        // Every later read has joined `next` before the first request is answered.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let waiting =
            || c.keys().get("k").and_then(|pair| pair.next.as_ref()).map_or(0, |next| Arc::strong_count(next) - 1);
        while waiting() < 8 {
            assert!(std::time::Instant::now() < deadline, "the later reads never joined");
            std::thread::yield_now();
        }
        release_tx.send(()).unwrap();
        assert_eq!(first.join().unwrap(), 0);
        for read in later {
            assert_eq!(read.join().unwrap(), 1, "answered by the one request sent after they arrived");
        }
        assert_eq!(sent.load(Ordering::SeqCst), 2);
        assert!(c.keys().is_empty());
    }

    #[test]
    fn a_panicking_request_answers_its_readers_and_frees_the_key() {
        let c = Arc::new(Coalescer::<u32>::default());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.read("k", far(), || panic!("boom"), || 1, || 0)
        }));
        assert!(panicked.is_err());
        assert!(c.keys().is_empty());
        assert_eq!(c.read("k", far(), || 5, || 0, || 0), 5);
    }

    /// Reads behind a request that does not end by their deadline give up then, and the key
    /// recovers: the next read sends its own request.
    #[test]
    fn reads_behind_a_hung_request_give_up_at_their_deadline() {
        let c = Arc::new(Coalescer::<u32>::default());
        let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(0);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let hung = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.read(
                    "k",
                    far(),
                    || {
                        entered_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                        1
                    },
                    || 0,
                    || 0,
                )
            })
        };
        entered_rx.recv().unwrap();
        let soon = || Instant::now() + Duration::from_millis(50);
        let behind: Vec<_> = (0..3)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || c.read("k", soon(), || 2, || 9, || 0))
            })
            .collect();
        for read in behind {
            assert_eq!(read.join().unwrap(), 9, "expired, nothing sent");
        }
        release_tx.send(()).unwrap();
        assert_eq!(hung.join().unwrap(), 1);
        assert!(c.keys().is_empty());
        assert_eq!(c.read("k", far(), || 3, || 9, || 0), 3);
    }
}
