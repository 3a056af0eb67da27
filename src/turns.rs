//! Turns: at most a few holders of something scarce at once (a runtime's replay, memory
//! for large answers); the others wait for a turn until their own deadline.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// At most `most` turns taken at once.
pub struct Turns {
    state: Mutex<State>,
    /// Signalled when a turn ends.
    ended: Condvar,
    most: usize,
}

#[derive(Default)]
struct State {
    /// Turns taken now.
    taken: usize,
    /// Callers waiting for one.
    waiting: usize,
}

impl Turns {
    /// At most `most` at once (usable in a `static`).
    pub const fn new(most: usize) -> Turns {
        Turns { state: Mutex::new(State { taken: 0, waiting: 0 }), ended: Condvar::new(), most }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (until `deadline`, else `None`) for a turn; the turn ends when dropped.
    pub fn turn(&self, deadline: Instant) -> Option<Turn<'_>> {
        let mut state = self.lock();
        while state.taken >= self.most {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state.waiting += 1;
            state = self.ended.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
            state.waiting -= 1;
        }
        state.taken += 1;
        Some(Turn { turns: self })
    }

    /// Whether every turn is taken and someone waits for one: a holder that can give its
    /// turn back early should.
    pub fn wanted(&self) -> bool {
        let state = self.lock();
        state.taken >= self.most && state.waiting > 0
    }
}

/// One turn of [`Turns`], given back when dropped.
pub struct Turn<'a> {
    turns: &'a Turns,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turns.lock().taken -= 1;
        self.turns.ended.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A waiter gets the turn when one ends, and gives up when its deadline passes first.
    #[test]
    fn turns_pass_on_and_a_waiter_gives_up_at_its_deadline() {
        let turns = Turns::new(2);
        let soon = || Instant::now() + Duration::from_millis(50);
        let first = turns.turn(soon()).expect("a free turn");
        let _second = turns.turn(soon()).expect("a second free turn");
        let waited = Instant::now();
        assert!(turns.turn(soon()).is_none(), "both taken");
        assert!(waited.elapsed() >= Duration::from_millis(50), "it waited until its deadline");
        assert!(!turns.wanted(), "nobody waits");
        std::thread::scope(|scope| {
            let next = scope.spawn(|| turns.turn(Instant::now() + Duration::from_secs(10)).is_some());
            while !turns.wanted() {
                std::thread::yield_now(); // the waiter is on its way
            }
            drop(first);
            assert!(next.join().expect("waiter"), "the turn passes on when one ends");
        });
        assert!(!turns.wanted(), "the waiter had its turn");
    }
}
