//! The health probes of every remote runtime in the process, on one schedule. A scheduler
//! thread starts each probe when it is due, spread over its interval with jitter, on a small
//! pool whose threads follow the probes in flight: a runtime waiting for its next probe costs
//! no thread, and a hung one holds at most one for its probe's timeout.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::pool::{Limits, Pool};

/// Something probed on the schedule.
pub trait Probed: Send + Sync {
    /// Probes once (within its own timeout); returns the time until the next probe.
    fn probe(&self) -> Duration;
}

/// Probes running at once at most; more wait for a free thread.
const MAX_PROBING: usize = 32;

/// A runtime's first probe comes within this (or its interval, if shorter), so a gateway
/// that starts with hundreds of runtimes does not probe them all at the same instant.
const FIRST_PROBE_SPREAD: Duration = Duration::from_secs(1);

/// Probes `target` until it is dropped: first within [`FIRST_PROBE_SPREAD`] (or `interval`),
/// then each time the interval it returns has passed (±10 %).
pub fn schedule(target: Weak<dyn Probed>, interval: Duration) {
    let first = FIRST_PROBE_SPREAD.min(interval).mul_f64(fraction());
    scheduler().add(Due { at: Instant::now() + first, target });
}

/// A uniform random fraction in `[0, 1)`.
fn fraction() -> f64 {
    (crate::clock::random_u64() % 10_000) as f64 / 10_000.0
}

struct Due {
    at: Instant,
    target: Weak<dyn Probed>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

struct Scheduler {
    due: Mutex<BinaryHeap<Reverse<Due>>>,
    /// Signalled when a probe is added (it may be due before the one waited for).
    added: Condvar,
    probing: Pool<Weak<dyn Probed>>,
}

/// The process's scheduler, started with the first runtime.
fn scheduler() -> &'static Scheduler {
    static SCHEDULER: OnceLock<&'static Scheduler> = OnceLock::new();
    SCHEDULER.get_or_init(|| {
        let limits = Limits { max_threads: MAX_PROBING, keep: 0, queue: 65_536, idle: Duration::from_secs(5) };
        let probing = Pool::new("probe", limits, |target: Weak<dyn Probed>| {
            if let Some(alive) = target.upgrade() {
                let interval = alive.probe();
                drop(alive);
                let next = interval.mul_f64(0.9 + 0.2 * fraction());
                scheduler().add(Due { at: Instant::now() + next, target });
            }
        });
        let scheduler: &'static Scheduler =
            Box::leak(Box::new(Scheduler { due: Mutex::default(), added: Condvar::new(), probing }));
        if let Err(e) = std::thread::Builder::new().name("probe-schedule".into()).spawn(|| scheduler.run()) {
            log::error!("cannot start the health probe scheduler: {e}");
        }
        scheduler
    })
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, BinaryHeap<Reverse<Due>>> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, due: Due) {
        self.lock().push(Reverse(due));
        self.added.notify_one();
    }

    /// Starts every probe that is due, then sleeps until the next one is.
    fn run(&self) {
        let mut due = self.lock();
        loop {
            let now = Instant::now();
            while due.peek().is_some_and(|Reverse(next)| next.at <= now) {
                let Some(Reverse(next)) = due.pop() else { break };
                // A full queue (probes far behind): this one tries again a second later.
                if let Err(target) = self.probing.submit(next.target) {
                    due.push(Reverse(Due { at: now + Duration::from_secs(1), target }));
                }
            }
            due = match due.peek().map(|Reverse(next)| next.at.saturating_duration_since(now)) {
                Some(wait) => self.added.wait_timeout(due, wait).unwrap_or_else(|p| p.into_inner()).0,
                None => self.added.wait(due).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}
