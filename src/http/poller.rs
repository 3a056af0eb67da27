//! The few threads that run every WebSocket session of the process. Each sleeps in
//! `epoll_wait` on its sessions' sockets, on an eventfd that producers signal through a
//! [`Waker`], and until the next timer of its sessions; it wakes a session only when its
//! socket is ready, its feed has frames or its timer is due. An idle session costs its socket
//! and a few KiB, never a thread.
//!
//! Pollers start with the first session (one per core, at most [`MAX_POLLERS`]) and stay
//! for the life of the process.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Pollers at most, whatever the core count.
const MAX_POLLERS: usize = 4;

/// What happened to a task's socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    /// Data, an end or an error to read.
    pub readable: bool,
    /// Room to write again.
    pub writable: bool,
}

/// What a task waits for after a step.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// More of the same: room to write (when `writable`), its socket, its waker, and `until`
    /// (its next timer); `again` steps it once more soon without waiting (it stopped at a
    /// batch, not because it ran out of work).
    Wait {
        /// Wait for room to write.
        writable: bool,
        /// Step at this time even if nothing happened.
        until: Option<Instant>,
        /// Step again in the next round.
        again: bool,
    },
    /// The task is over: it is dropped (its socket closes).
    Done,
}

/// A session run by a poller: non-blocking steps over one socket.
pub trait Task: Send {
    /// The socket to watch; it stays open as long as the task lives.
    fn fd(&self) -> RawFd;
    /// Does what can be done now without blocking.
    fn step(&mut self, ready: Ready, now: Instant) -> Step;
}

/// Wakes a task from another thread (new frames for it).
pub struct Waker {
    id: u64,
    /// A wake is queued and not yet seen by the poller.
    pending: AtomicBool,
    home: Arc<Home>,
}

impl Waker {
    /// Has the task stepped soon. Wakes queued before its last step began are merged.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            self.home.post(Post::Wake(self.id));
        }
    }
}

/// One poller: its epoll set, its eventfd and what other threads posted to it.
struct Home {
    epoll: OwnedFd,
    event: OwnedFd,
    inbox: Mutex<Vec<Post>>,
}

enum Post {
    Add(Arc<Waker>, Box<dyn Task>),
    Wake(u64),
}

/// The eventfd's epoll key (task ids count up from 0 and never reach it).
const EVENT_KEY: u64 = u64::MAX;

impl Home {
    fn new() -> io::Result<Home> {
        // SAFETY: plain syscalls creating new descriptors, each checked before it is owned.
        let (epoll, event) = unsafe {
            let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if epoll < 0 {
                return Err(io::Error::last_os_error());
            }
            let epoll = OwnedFd::from_raw_fd(epoll);
            let event = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            if event < 0 {
                return Err(io::Error::last_os_error());
            }
            (epoll, OwnedFd::from_raw_fd(event))
        };
        let home = Home { epoll, event, inbox: Mutex::default() };
        home.control(libc::EPOLL_CTL_ADD, home.event.as_raw_fd(), libc::EPOLLIN as u32, EVENT_KEY)?;
        Ok(home)
    }

    fn inbox(&self) -> MutexGuard<'_, Vec<Post>> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `post`; signals the eventfd when the inbox was empty (the poller empties it
    /// after reading the eventfd, so a post is never left unseen).
    fn post(&self, post: Post) {
        let mut inbox = self.inbox();
        let signal = inbox.is_empty();
        inbox.push(post);
        drop(inbox);
        if signal {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a live local to an eventfd we own.
            unsafe { libc::write(self.event.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }

    fn control(&self, op: libc::c_int, fd: RawFd, events: u32, key: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: key };
        // SAFETY: epoll_ctl reads an event struct we own; both descriptors are valid.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The pollers of the process, started with the first session.
static POLLERS: Mutex<Vec<Arc<Home>>> = Mutex::new(Vec::new());

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A waker for a new task, on one of the pollers (started if none runs yet).
pub fn waker() -> io::Result<Arc<Waker>> {
    let mut pollers = POLLERS.lock().unwrap_or_else(|p| p.into_inner());
    if pollers.is_empty() {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_POLLERS);
        let mut started = Vec::with_capacity(count);
        for index in 0..count {
            let home = Arc::new(Home::new()?);
            let run = home.clone();
            std::thread::Builder::new().name(format!("ws-poller-{index}")).spawn(move || Poller::new(run).run())?;
            started.push(home);
        }
        *pollers = started;
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let home = pollers[id as usize % pollers.len()].clone();
    Ok(Arc::new(Waker { id, pending: AtomicBool::new(false), home }))
}

/// Hands `task` to the poller of `waker`; its first step comes at once.
pub fn run(waker: &Arc<Waker>, task: Box<dyn Task>) {
    waker.home.post(Post::Add(waker.clone(), task));
}

/// What a poller holds of one task.
struct Entry {
    task: Box<dyn Task>,
    waker: Arc<Waker>,
    /// The events it is registered for.
    events: u32,
    /// Its timer in the heap (earlier entries of it there are stale).
    timer: Option<Instant>,
}

struct Poller {
    home: Arc<Home>,
    tasks: HashMap<u64, Entry>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Tasks to step in the next round without waiting.
    again: Vec<u64>,
}

const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

impl Poller {
    fn new(home: Arc<Home>) -> Poller {
        Poller { home, tasks: HashMap::new(), timers: BinaryHeap::new(), again: Vec::new() }
    }

    fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let timeout = if !self.again.is_empty() {
                0
            } else {
                self.timers.peek().map_or(-1, |Reverse((at, _))| {
                    let wait = at.saturating_duration_since(Instant::now());
                    // Rounded up: a timer is never stepped before it is due.
                    wait.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
                })
            };
            // SAFETY: the buffer holds `events.len()` structs for the kernel to fill.
            let n = unsafe {
                libc::epoll_wait(self.home.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, timeout)
            };
            let now = Instant::now();
            for event in events.iter().take(n.max(0) as usize) {
                let (key, bits) = (event.u64, event.events);
                if key == EVENT_KEY {
                    self.take_posts(now);
                    continue;
                }
                let ready = Ready {
                    readable: bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0,
                    writable: bits & libc::EPOLLOUT as u32 != 0,
                };
                self.step(key, ready, now);
            }
            for id in std::mem::take(&mut self.again) {
                self.step(id, Ready::default(), now);
            }
            while let Some(&Reverse((at, id))) = self.timers.peek() {
                if at > now {
                    break;
                }
                self.timers.pop();
                if let Some(entry) = self.tasks.get_mut(&id).filter(|e| e.timer == Some(at)) {
                    entry.timer = None;
                    self.step(id, Ready::default(), now);
                }
            }
        }
    }

    /// Reads the eventfd, then takes everything posted.
    fn take_posts(&mut self, now: Instant) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd we own.
        unsafe { libc::read(self.home.event.as_raw_fd(), (&raw mut count).cast(), 8) };
        let posts = std::mem::take(&mut *self.home.inbox());
        for post in posts {
            match post {
                Post::Add(waker, task) => {
                    let id = waker.id;
                    if let Err(e) = self.home.control(libc::EPOLL_CTL_ADD, task.fd(), READ_EVENTS, id) {
                        log::error!("cannot watch a WebSocket session: {e}");
                        continue; // dropped: its connection closes
                    }
                    self.tasks.insert(id, Entry { task, waker, events: READ_EVENTS, timer: None });
                    // Bytes may have arrived (and been buffered) before it was watched.
                    self.step(id, Ready { readable: true, writable: false }, now);
                }
                Post::Wake(id) => self.step(id, Ready::default(), now),
            }
        }
    }

    fn step(&mut self, id: u64, ready: Ready, now: Instant) {
        let Some(entry) = self.tasks.get_mut(&id) else { return };
        // Cleared before the step looks at its feed: a wake from now on is seen again.
        entry.waker.pending.store(false, Ordering::SeqCst);
        match entry.task.step(ready, now) {
            Step::Done => {
                let _ = self.home.control(libc::EPOLL_CTL_DEL, entry.task.fd(), 0, id);
                self.tasks.remove(&id);
            }
            Step::Wait { writable, until, again } => {
                let events = if writable { READ_EVENTS | libc::EPOLLOUT as u32 } else { READ_EVENTS };
                if events != entry.events {
                    if let Err(e) = self.home.control(libc::EPOLL_CTL_MOD, entry.task.fd(), events, id) {
                        log::error!("cannot watch a WebSocket session: {e}");
                    }
                    entry.events = events;
                }
                if let Some(at) = until.filter(|at| entry.timer.is_none_or(|t| *at < t)) {
                    entry.timer = Some(at);
                    self.timers.push(Reverse((at, id)));
                }
                if again {
                    self.again.push(id);
                }
            }
        }
    }
}
