//! A thread pool whose threads follow its load: a thread starts when work is queued and no
//! thread is free (up to a cap), and a thread that found no work for a while ends (down to a
//! few kept ones). Idle capacity costs no threads, a burst of blocking work (requests stuck
//! on a hung runtime) gets threads up to the cap, and the bounded queue answers "full" at once.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The bounds of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Threads at most.
    pub max_threads: usize,
    /// Threads that stay when idle.
    pub keep: usize,
    /// Jobs that may wait for a thread; past it, [`Pool::submit`] refuses.
    pub queue: usize,
    /// How long a thread beyond `keep` waits for work before it ends.
    pub idle: Duration,
}

/// A pool running `run` on each submitted job. Clones share the pool.
pub struct Pool<T: Send + 'static> {
    shared: Arc<Shared<T>>,
}

impl<T: Send + 'static> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool { shared: self.shared.clone() }
    }
}

struct Shared<T> {
    name: String,
    limits: Limits,
    run: Box<dyn Fn(T) + Send + Sync>,
    state: Mutex<State<T>>,
    /// Signalled when the last thread of a closed pool ends.
    ended: Condvar,
}

struct State<T> {
    queue: VecDeque<T>,
    threads: usize,
    /// Threads running a job now.
    running: usize,
    /// Threads waiting for work, the most recently idle last. Work goes to the last one, so
    /// under a light load the same few threads serve it and the others time out and end.
    idle: Vec<Arc<Idle>>,
    closed: bool,
}

/// A thread waiting for work.
struct Idle {
    thread: Thread,
    /// Taken off the idle list (under the pool's lock) to run a job, or for the pool's close.
    called: AtomicBool,
}

static NEXT_THREAD: AtomicU64 = AtomicU64::new(0);

impl<T: Send + 'static> Pool<T> {
    /// A pool named `name` (its threads are `name-N`); no thread starts before the first job.
    pub fn new(name: &str, limits: Limits, run: impl Fn(T) + Send + Sync + 'static) -> Pool<T> {
        let limits = Limits { max_threads: limits.max_threads.max(1), ..limits };
        let state = State { queue: VecDeque::new(), threads: 0, running: 0, idle: Vec::new(), closed: false };
        let shared = Shared {
            name: name.to_owned(),
            limits,
            run: Box::new(run),
            state: Mutex::new(state),
            ended: Condvar::new(),
        };
        Pool { shared: Arc::new(shared) }
    }

    /// Queues `job` and calls an idle thread for it, or starts one when none is idle; gives
    /// the job back when the queue is full or the pool closed.
    pub fn submit(&self, job: T) -> Result<(), T> {
        let mut st = self.shared.lock();
        if st.closed || st.queue.len() >= self.shared.limits.queue {
            return Err(job);
        }
        st.queue.push_back(job);
        let called = st.idle.pop().inspect(|idle| idle.called.store(true, Ordering::SeqCst));
        let start = called.is_none() && st.threads < self.shared.limits.max_threads;
        if start {
            st.threads += 1;
        }
        drop(st);
        if let Some(idle) = called {
            idle.thread.unpark();
        }
        if start {
            self.start_thread();
        }
        Ok(())
    }

    fn start_thread(&self) {
        let shared = self.shared.clone();
        let name = format!("{}-{}", shared.name, NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
        if let Err(e) = std::thread::Builder::new().name(name).spawn(move || shared.work_loop()) {
            log::error!("{}: cannot start a thread: {e}", self.shared.name);
            let mut st = self.shared.lock();
            st.threads -= 1;
            if st.threads == 0 {
                self.shared.ended.notify_all();
            }
        }
    }

    /// Jobs waiting for a thread.
    pub fn queued(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Threads running now.
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Threads running a job now.
    pub fn busy(&self) -> usize {
        self.shared.lock().running
    }

    /// Takes no new jobs; the threads finish the queued ones, then end.
    pub fn close(&self) {
        let mut st = self.shared.lock();
        st.closed = true;
        let idle = std::mem::take(&mut st.idle);
        drop(st);
        for idle in idle {
            idle.called.store(true, Ordering::SeqCst);
            idle.thread.unpark();
        }
    }

    /// After [`Pool::close`]: waits until every thread has ended; false when `grace` ran out first.
    pub fn wait_ended(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut st = self.shared.lock();
        while st.threads > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.shared.ended.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

impl<T: Send + 'static> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work_loop(&self) {
        let me = Arc::new(Idle { thread: std::thread::current(), called: AtomicBool::new(false) });
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                st.running += 1;
                drop(st);
                // A thread must outlive any bug in a job.
                if catch_unwind(AssertUnwindSafe(|| (self.run)(job))).is_err() {
                    log::error!("{}: a job panicked", self.name);
                }
                st = self.lock();
                st.running -= 1;
                continue;
            }
            if st.closed {
                break;
            }
            me.called.store(false, Ordering::SeqCst);
            st.idle.push(me.clone());
            drop(st);
            let deadline = Instant::now() + self.limits.idle;
            while !me.called.load(Ordering::SeqCst) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
            st = self.lock();
            if !me.called.load(Ordering::SeqCst) {
                // Nobody called it in time (calls happen under the lock): it leaves the list,
                // and the pool, unless it is one of the kept threads.
                st.idle.retain(|idle| !Arc::ptr_eq(idle, &me));
                if st.queue.is_empty() && st.threads > self.limits.keep {
                    break;
                }
            }
        }
        st.threads -= 1;
        if st.threads == 0 {
            self.ended.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

    fn limits(max_threads: usize, queue: usize) -> Limits {
        Limits { max_threads, keep: 0, queue, idle: Duration::from_millis(50) }
    }

    #[test]
    fn threads_start_for_blocked_work_up_to_the_cap_and_end_when_idle() {
        let (entered, started) = bounded(16);
        let (open, gate) = bounded::<()>(16);
        let pool = Pool::new("test-grow", limits(3, 2), move |(): ()| {
            entered.send(()).unwrap();
            let _ = gate.recv_timeout(Duration::from_secs(10));
        });
        for _ in 0..3 {
            pool.submit(()).unwrap();
            started.recv_timeout(Duration::from_secs(10)).expect("each blocked job got its own thread");
        }
        assert_eq!(pool.threads(), 3);
        pool.submit(()).unwrap();
        pool.submit(()).unwrap();
        assert_eq!(pool.submit(()), Err(()), "capped: two queued, the third refused");
        assert_eq!((pool.threads(), pool.queued()), (3, 2));
        for _ in 0..5 {
            open.send(()).unwrap();
        }
        for _ in 0..2 {
            started.recv_timeout(Duration::from_secs(10)).expect("queued jobs run");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.threads() > 0 {
            assert!(Instant::now() < deadline, "idle threads end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_trickle_of_work_keeps_one_thread_not_all_that_a_burst_started() {
        let (open, gate) = bounded::<()>(16);
        let (entered, started) = bounded(16);
        let pool = Pool::new("test-trickle", limits(4, 16), move |block: bool| {
            entered.send(()).unwrap();
            if block {
                let _ = gate.recv_timeout(Duration::from_secs(10));
            }
        });
        for _ in 0..4 {
            pool.submit(true).unwrap();
            started.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        for _ in 0..4 {
            open.send(()).unwrap();
        }
        // Work arrives more often than the idle timeout, but one thread is enough for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.threads() > 1 {
            assert!(Instant::now() < deadline, "{} threads still run a trickle", pool.threads());
            pool.submit(false).unwrap();
            started.recv_timeout(Duration::from_secs(10)).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn close_finishes_the_queue_and_a_panic_costs_no_thread() {
        let (done, finished) = bounded(16);
        let pool = Pool::new("test-close", Limits { keep: 1, ..limits(1, 8) }, move |n: u32| {
            assert!(n != 0, "job 0 panics");
            done.send(n).unwrap();
        });
        for n in 0..4 {
            pool.submit(n).unwrap();
        }
        pool.close();
        assert!(pool.wait_ended(Duration::from_secs(10)));
        assert_eq!(finished.try_iter().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(pool.submit(9), Err(9), "closed");
    }

    /// Busy counts the jobs running, not threads: idle ones, and idle ones woken by a close
    /// to end, are not busy (a shutdown said it waited for requests that were not there).
    #[test]
    fn busy_counts_running_jobs_only() {
        let (open, gate) = bounded::<()>(4);
        let (entered, started) = bounded(4);
        let pool = Pool::new("test-busy", Limits { keep: 2, ..limits(2, 4) }, move |(): ()| {
            entered.send(()).unwrap();
            let _ = gate.recv_timeout(Duration::from_secs(10));
        });
        for _ in 0..2 {
            pool.submit(()).unwrap();
            started.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert_eq!(pool.busy(), 2);
        open.send(()).unwrap();
        open.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.busy() > 0 {
            assert!(Instant::now() < deadline, "the jobs end");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.threads(), 2, "kept, idle");
        pool.close();
        assert_eq!(pool.busy(), 0, "woken to end, not to work");
        assert!(pool.wait_ended(Duration::from_secs(10)));
    }
}
