//! The requests of one connection while the acceptor has them: held back while the
//! connection already has its share of handler threads ([`Held`]), or refused, and then
//! answered in order by one thread per connection ([`Refusals`]).
//!
//! A connection's answers go out in the order of its requests, so a client that pipelines
//! request after request without reading the answers gets each one written in turn behind
//! one it does not read. Handed to the pool as they came, they took a handler thread each:
//! one connection pipelining 5 000 requests for 60 KB pages held every thread and the queue,
//! and every other client was answered 503 for as long as it stayed. Refused, they took a
//! thread each too (thousands, until the process could start no more).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, unbounded};

use super::guard::Unanswered;
use super::server::{Job, Reply, respond};

/// Requests of one connection handed to the pool at once, at most: more would only wait
/// behind one another for their turn to answer. The next ones wait in the acceptor. (While
/// other requests wait for a handler, the guard cuts a connection holding this many whose
/// client reads none of its answers.)
pub const PIPELINE_DEPTH: usize = 8;

/// Requests one connection may have held back: past it, the connection is cut (it sends
/// far faster than its answers are written: it does not read them).
pub const MAX_HELD: usize = 256;

/// Requests held back, by connection, in their order.
#[derive(Default)]
pub struct Held(HashMap<SocketAddr, VecDeque<tiny_http::Request>>);

/// What became of a request offered to [`Held::hold`].
pub enum Holding {
    /// Free to go to the pool now.
    Free(tiny_http::Request),
    /// Held back until earlier requests of its connection are answered.
    Held,
    /// Its connection passed [`MAX_HELD`]: these, all it had held, are to be refused, and
    /// the connection cut.
    Overflow(VecDeque<tiny_http::Request>),
}

/// Whether `request`'s method may change something: such a request runs alone, after the
/// ones before it on its connection are answered, and before any after it starts (HTTP lets
/// a server run pipelined requests at once only when none of them does; two inputs
/// pipelined on one connection were recorded in either order).
pub fn changes_something(request: &tiny_http::Request) -> bool {
    !matches!(request.method(), tiny_http::Method::Get | tiny_http::Method::Head | tiny_http::Method::Options)
}

/// Whether `request` of `peer` must wait for the requests of its connection in flight.
fn must_wait(request: &tiny_http::Request, peer: &SocketAddr, unanswered: &Unanswered) -> bool {
    let (taken, changing) = unanswered.in_flight(peer);
    taken >= PIPELINE_DEPTH || (taken > 0 && (changing || changes_something(request)))
}

impl Held {
    /// Holds `request` back when its connection has [`PIPELINE_DEPTH`] requests taken, or
    /// requests in flight it must wait for (see [`changes_something`]), or earlier ones held
    /// (the order stays).
    pub fn hold(&mut self, request: tiny_http::Request, unanswered: &Unanswered) -> Holding {
        let Some(peer) = request.remote_addr().copied() else { return Holding::Free(request) };
        match self.0.get_mut(&peer) {
            Some(queue) => queue.push_back(request),
            None if must_wait(&request, &peer, unanswered) => {
                self.0.insert(peer, VecDeque::from([request]));
            }
            None => return Holding::Free(request),
        }
        match self.0.get(&peer).is_some_and(|queue| queue.len() > MAX_HELD) {
            true => Holding::Overflow(self.0.remove(&peer).unwrap_or_default()),
            false => Holding::Held,
        }
    }

    /// The held requests free to go now, each connection's in order: `dispatch` takes
    /// each (and so counts it in flight) before the next is looked at.
    pub fn release(&mut self, unanswered: &Unanswered, mut dispatch: impl FnMut(tiny_http::Request)) {
        self.0.retain(|peer, queue| {
            while let Some(request) = queue.pop_front() {
                if must_wait(&request, peer, unanswered) {
                    queue.push_front(request);
                    break;
                }
                dispatch(request);
            }
            !queue.is_empty()
        });
    }

    /// Whether any request is held.
    pub fn any(&self) -> bool {
        !self.0.is_empty()
    }
}

/// A connection's refusal thread ends once nothing more came for it this long (what the
/// HTTP layer had read of it comes at once: it reads no more).
const REFUSAL_THREAD_IDLE: Duration = Duration::from_millis(500);

/// Refusals of one connection waiting for its thread, past which its connection is reset:
/// a client pipelining a flood behind a refused request.
const MAX_PENDING_REFUSALS: usize = 64;

/// A refused request and its answer.
struct Refusal {
    job: Job,
    reply: Reply,
    id: String,
}

/// A refused connection: its refusal thread's queue, and when that thread ended.
struct Refused {
    peer: SocketAddr,
    queue: Sender<Refusal>,
    ended: Arc<OnceLock<Instant>>,
}

/// Connections one of whose requests was refused, each with the thread that answers the
/// first refusal in its turn and closes the connection: requests read behind a refused one
/// are refused too (nothing smuggled behind refused framing runs, however long the answers
/// before it take), on that thread, which lets them go unanswered (the connection is
/// closed). An entry lives until a second after its thread ended: by then the HTTP layer has
/// read what the connection held (the thread lets each request go at once, and what a
/// request's body held back is read as it goes); a later connection may reuse the address.
#[derive(Default)]
pub struct Refusals(VecDeque<Refused>);

impl Refusals {
    const KEPT: Duration = Duration::from_secs(1);
    const MAX: usize = 4096;

    /// Whether `peer`'s connection had a request refused.
    pub fn holds(&mut self, peer: Option<&SocketAddr>) -> bool {
        self.0.retain(|refused| refused.ended.get().is_none_or(|ended| ended.elapsed() < Self::KEPT));
        while self.0.len() > Self::MAX {
            self.0.pop_front();
        }
        peer.is_some_and(|peer| self.0.iter().any(|refused| refused.peer == *peer))
    }

    /// Refuses `job` with `reply` on its connection's refusal thread (started by its first
    /// refusal, which stops the connection's reading at once, or with `cut` resets it).
    pub fn refuse(&mut self, job: Job, reply: Reply, id: String, port: u16, cut: bool) {
        let peer = job.request.remote_addr().copied();
        let mut refusal = Refusal { job, reply, id };
        let live = self.0.iter().find(|refused| Some(refused.peer) == peer && refused.ended.get().is_none());
        if let Some(refused) = live {
            match refused.queue.send(refusal) {
                Ok(()) => return,
                Err(unsent) => refusal = unsent.0, // its thread is ending: a new one takes over
            }
        }
        let (queue, refusals) = unbounded();
        let _ = queue.send(refusal);
        let ended = Arc::new(OnceLock::new());
        if let Some(peer) = peer {
            self.0.push_back(Refused { peer, queue, ended: ended.clone() });
        }
        let spawned = std::thread::Builder::new().name("http-refusal".into()).spawn(move || {
            let socket = peer.and_then(|peer| super::sockets::find_socket(peer, port));
            // tiny_http reads no more of it (every earlier request's body has been read).
            if let Some(socket) = &socket {
                match cut {
                    true => super::sockets::abort(socket),
                    false => super::sockets::stop_reading(socket),
                }
            }
            let (mut answered, mut let_go) = (false, 0usize);
            while let Ok(Refusal { job, reply, id }) = refusals.recv_timeout(REFUSAL_THREAD_IDLE) {
                let Job { request, taken } = job;
                if !answered {
                    // The first is answered in its turn; then the connection is closed, and
                    // the rest go unanswered.
                    respond(request, reply, &id, port, true, None);
                    answered = true;
                } else {
                    drop(request);
                    let_go += 1;
                }
                drop(taken);
                if refusals.len() > MAX_PENDING_REFUSALS
                    && let Some(socket) = &socket
                {
                    super::sockets::abort(socket);
                }
            }
            let _ = ended.set(Instant::now());
            // A flood pipelined behind a refusal was read, and let go, request by request.
            if let_go > MAX_PENDING_REFUSALS {
                crate::memory::return_freed_memory();
            }
        });
        if let Err(e) = spawned {
            log::error!("cannot start a thread to answer a refused request: {e}");
        }
    }
}

/// The requests an overflowing connection had held, refused on its refusal thread.
pub fn refuse_overflow(
    refusals: &mut Refusals,
    held: VecDeque<tiny_http::Request>,
    unanswered: &Arc<Unanswered>,
    port: u16,
) {
    for request in held {
        let id = super::server::next_request_id();
        let problem = "too many requests sent without reading their answers";
        let reply = Reply::error(&super::ApiError::bad_request("invalid_request", problem), &id);
        refusals.refuse(Job::new(request, unanswered), reply, id, port, true);
    }
}
