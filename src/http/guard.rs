//! Cuts connections that send a request head without end, or too slowly to ever end.
//!
//! tiny_http reads a request head with no limit on a line or on the number of lines, and
//! keeps each header line as a record of its own (about 20 times the bytes of a short
//! line). One client sending an endless header line took the process from 10 MB to 1 GB in
//! 3 s on loopback, until the allocator aborted it; 60 clients sending 2 MB of tiny lines
//! each took it to 2.5 GB. The head is read on tiny_http's own connection threads, out of
//! this program's reach, so the guard watches from outside:
//! - every [`TICK`] it reads the process's resident size (a few microseconds);
//! - after it grew by [`GROWTH`], and every [`SWEEP`] anyway, it asks the kernel how many
//!   bytes the server read from each connection and wrote to it ([`Traffic`]);
//! - a connection with no request taken by the server ([`Unanswered`]) that sent more than
//!   [`HEAD_ALLOWANCE`] since the server last sent it anything, or has been sending such a
//!   head for [`HEAD_DEADLINE`], is reset. tiny_http's reader sees the end and drops what it
//!   read. One with requests taken may send a head for each and the next, and, while a
//!   handler has yet to read its body, that body: up to [`BODY_FRAMING`] times
//!   `max_body_bytes` (a chunked body's framing can be that much), which the handler reads
//!   under its own limit and deadline. Once it has, the bytes up to there are its request's:
//!   a head pipelined behind it has a head's allowance, however long the answer takes;
//! - an idle keep-alive connection is closed after [`IDLE_CLOSE`] (see there), and at once
//!   while the process is short of descriptors ([`super::sockets::descriptors_short`]): idle
//!   connections held open by one client would otherwise leave none for anyone else's. A
//!   head that stopped coming for [`STALLED_HEAD`] is cut then too.
//!
//! Memory can grow only as fast as tiny_http's threads read (a few hundred MB/s on two
//! cores), so an endless head is cut after a few MiB, and a head kept under the allowance
//! costs at most about 20 × 32 KiB per connection until its deadline.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::server::HttpMetrics;
use super::sockets::{TCP_CLOSE_WAIT, tcp_info};

/// How often the resident size is read (a few microseconds each time).
pub const TICK: Duration = Duration::from_millis(50);

/// Growth of the resident size, since the last look, that makes the guard look again.
pub const GROWTH: u64 = 16 << 20;

/// The guard looks at least this often (for heads trickled in slowly).
pub const SWEEP: Duration = Duration::from_secs(10);

/// The most a request head may take (nginx's default limit is 4 × 8 KiB).
pub const HEAD_ALLOWANCE: u64 = 32 << 10;

/// The longest a request head may take to arrive; longer than a WebSocket session's ping
/// interval plus a sweep, since a browser's pong is bytes the server has not answered.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(60);

/// An idle keep-alive connection is closed once a look finds it idle this long: after 8 to
/// 20 s of silence (looks are up to [`SWEEP`] apart), before the HTTP layer's 30 s read
/// timeout, which writes a 400 that the client reads as the answer to its next request.
pub const IDLE_CLOSE: Duration = Duration::from_secs(8);

/// Short of descriptors, a request head that has not grown for this long is cut.
pub const STALLED_HEAD: Duration = Duration::from_secs(1);

/// A connection with no request taken and more than a head's allowance received, some of it
/// waiting unread, this long, is cut: a body behind a head waits so only until the acceptor
/// takes its request (milliseconds); longer, nobody is reading it (tiny_http's thread is
/// stuck, see [`STUCK_AFTER`]), and what waits holds the kernel's memory on both sides.
pub const STUFFED_AFTER: Duration = Duration::from_secs(1);

/// A connection cut for its head (or whose client left while its head was unanswered) that
/// still holds its descriptors this long after is not being served by anyone: tiny_http's
/// thread for it is stuck for good. A request line naming `HTTP/2.0` or `HTTP/3.0` does that
/// (tiny_http's thread waits on itself to write its 505), so that clients sending such lines
/// would otherwise take two descriptors each for the life of the process. Its descriptors
/// are closed then; the stuck thread stays, parked.
pub const STUCK_AFTER: Duration = Duration::from_secs(5);

/// How much larger than `max_body_bytes` a body may be on the wire: chunked framing of
/// one-byte chunks is six bytes per byte.
pub const BODY_FRAMING: u64 = 6;

/// The connections (by peer) with requests the server has taken (queued or being handled)
/// and not yet answered: what they send may be a body the handler has yet to read.
#[derive(Default)]
pub struct Unanswered(Mutex<HashMap<SocketAddr, Requests>>);

/// A connection's requests taken and not answered yet.
#[derive(Clone, Copy, Default)]
struct Requests {
    taken: usize,
    /// Those whose method may change something (not `GET`, `HEAD` or `OPTIONS`).
    changing: usize,
    /// Those whose body is still to be read (by their handler).
    bodies_unread: usize,
    /// Bytes read from the connection when a handler last finished reading a body: all
    /// of it belongs to requests taken.
    read_after_bodies: u64,
}

impl Unanswered {
    /// Notes a request from `peer` taken, its body still to be read or not, its method
    /// `changing` something or not; dropping what it returns notes it answered.
    pub fn taken(self: &Arc<Self>, peer: Option<SocketAddr>, body_unread: bool, changing: bool) -> Taken {
        if let Some(peer) = peer {
            let mut all = self.lock();
            let requests = all.entry(peer).or_default();
            requests.taken += 1;
            requests.changing += usize::from(changing);
            requests.bodies_unread += usize::from(body_unread);
        }
        Taken { set: self.clone(), peer, body_unread, changing }
    }

    /// How many of `peer`'s requests are taken and not answered, and whether one of them
    /// may change something.
    pub fn in_flight(&self, peer: &SocketAddr) -> (usize, bool) {
        self.of(peer).map_or((0, false), |requests| (requests.taken, requests.changing > 0))
    }

    fn of(&self, peer: &SocketAddr) -> Option<Requests> {
        self.lock().get(peer).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Requests>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request taken from a connection, until it is answered (dropped).
pub struct Taken {
    set: Arc<Unanswered>,
    peer: Option<SocketAddr>,
    body_unread: bool,
    changing: bool,
}

impl Taken {
    /// Its handler read its body: what the connection sends from now on is a next request,
    /// held to a head's allowance. `socket` is the connection's, to note what was read of it.
    pub fn body_read(&mut self, socket: Option<&TcpStream>) {
        let Some(peer) = self.peer.filter(|_| self.body_unread) else { return };
        self.body_unread = false;
        let read = socket.and_then(Traffic::now).map_or(0, |t| t.read);
        if let Some(requests) = self.set.lock().get_mut(&peer) {
            requests.bodies_unread -= 1;
            requests.read_after_bodies = requests.read_after_bodies.max(read);
        }
    }

    /// Whether its body is still to be read.
    pub fn body_unread(&self) -> bool {
        self.body_unread
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let Some(peer) = self.peer else { return };
        let mut all = self.set.lock();
        if let Some(requests) = all.get_mut(&peer) {
            requests.taken -= 1;
            requests.changing -= usize::from(self.changing);
            requests.bodies_unread -= usize::from(self.body_unread);
            if requests.taken == 0 {
                all.remove(&peer);
            }
        }
    }
}

/// What the guard needs of the server it watches.
pub struct Watched {
    /// The server's port.
    pub port: u16,
    /// The server's `max_body_bytes`.
    pub max_body: u64,
    /// Its requests taken and not yet answered.
    pub unanswered: Arc<Unanswered>,
    /// Where cuts are counted.
    pub metrics: Arc<HttpMetrics>,
}

/// Starts the guard of `server`; it ends when `stop` is signalled or dropped.
pub fn start(server: Watched, stop: Receiver<()>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("http-guard".into()).spawn(move || {
        run_first();
        let (mut looked_at, mut last_look) = (resident_bytes(), Instant::now());
        let mut seen: HashMap<SocketAddr, Seen> = HashMap::new();
        let mut suspects = Suspects::default();
        let mut cutting = false;
        let mut pressing = false;
        loop {
            match stop.recv_timeout(TICK) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = resident_bytes();
            looked_at = looked_at.min(now); // memory came back: growth counts from here
            let pressed = super::sockets::descriptors_short();
            if pressed && !pressing {
                log::warn!("open files near the limit: closing idle keep-alive connections now");
            }
            pressing = pressed;
            // Under attack (the last look cut something, or may soon), or while requests wait
            // for a handler thread, it looks at every tick.
            let busy = server.metrics.requests_waiting();
            if cutting || pressed || busy || now - looked_at >= GROWTH || last_look.elapsed() >= SWEEP {
                (looked_at, last_look) = (now, Instant::now());
                let cut_more;
                (seen, cut_more) =
                    look(&server, &seen, Pressure { descriptors: pressed, handlers: busy }, &mut suspects);
                suspects.release_stuck(&server);
                if cutting && !cut_more {
                    // tiny_http kept a small record per header line of the cut heads.
                    crate::memory::return_freed_memory();
                }
                cutting = cut_more;
            }
        }
    })
}

/// Asks for this thread to run before the others when it wakes (a real-time priority, where
/// the process may have one: root, `CAP_SYS_NICE` or `RLIMIT_RTPRIO`). Among hundreds of
/// threads reading attackers' heads, a look at the connections otherwise waits seconds for
/// its turns on the CPU while memory grows. It sleeps between ticks and a look is bounded by
/// the connections, so it never holds a CPU.
fn run_first() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: changes the calling thread's scheduling policy; `param` is a live value.
    let refused = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_RR, &param) };
    if refused != 0 {
        log::debug!("the HTTP guard runs at normal priority (no real-time priority allowed)");
    }
}

/// What the guard knew of a connection at its last look.
#[derive(Clone, Copy)]
struct Seen {
    /// Bytes read.
    read: u64,
    /// Bytes the server wrote.
    written: u64,
    /// Bytes read up to the last time the server was seen writing it something.
    read_when_answered: u64,
    /// Since when it has been sending a head (bytes the server has not answered, without a
    /// request taken).
    head_since: Option<Instant>,
    /// Since when it has had more than a head's allowance received, some of it unread,
    /// without a request taken (see [`STUFFED_AFTER`]).
    stuffed_since: Option<Instant>,
    /// When a look last found its counts changed (or first saw it): it has been idle at
    /// least since then.
    settled_at: Instant,
    /// Its descriptors: tiny_http holds two of each connection, a WebSocket session one.
    fds: u8,
    /// Shut down by the guard (its descriptors not closed yet).
    cut: bool,
    /// Cut, or its client gone with its head unanswered: anyone serving it closes it soon.
    abandoned: bool,
}

/// The descriptors of abandoned connections of tiny_http's (see [`STUCK_AFTER`]), with when
/// they were abandoned and by whom: by number, since a connection cut with a reset has no
/// peer any more.
#[derive(Default)]
struct Suspects(HashMap<RawFd, (Instant, SocketAddr)>);

impl Suspects {
    /// Closes each descriptor that still names an abandoned connection of ours
    /// [`STUCK_AFTER`] after it was abandoned, with no request of its client's taken; lets go
    /// of the others (closed meanwhile, or served).
    fn release_stuck(&mut self, server: &Watched) {
        let at = Instant::now();
        let mut released: Vec<SocketAddr> = Vec::new();
        self.0.retain(|fd, (since, peer)| {
            if at - *since < STUCK_AFTER {
                return true;
            }
            if server.unanswered.of(peer).is_none() && super::sockets::release_if_abandoned(*fd, server.port, *peer) {
                released.push(*peer);
            }
            false
        });
        released.sort_unstable();
        released.dedup();
        for peer in released {
            server.metrics.connection_stuck();
            log::warn!("closed a connection from {peer} the HTTP layer stopped serving (its thread is stuck)");
        }
    }
}

/// What the process is short of at a look.
#[derive(Clone, Copy, Default)]
struct Pressure {
    /// Open files near the limit ([`super::sockets::descriptors_short`]).
    descriptors: bool,
    /// Requests wait for a handler thread.
    handlers: bool,
}

/// Looks at every connection of the server (by peer: tiny_http holds two descriptors of
/// each), resets those over their allowance or deadline, closes idle keep-alive ones (short
/// of descriptors, every one idle since the last look), and returns what it saw for the
/// next look, and whether to look again at the next tick: it cut one, or may cut one soon.
fn look(
    server: &Watched,
    before: &HashMap<SocketAddr, Seen>,
    pressure: Pressure,
    suspects: &mut Suspects,
) -> (HashMap<SocketAddr, Seen>, bool) {
    let pressed = pressure.descriptors;
    let mut now: HashMap<SocketAddr, Seen> = HashMap::new();
    let mut fds_of: HashMap<SocketAddr, Vec<RawFd>> = HashMap::new();
    let mut watch_closely = false;
    let at = Instant::now();
    super::sockets::each_connection(server.port, |fd, socket| {
        let (Some(info), Ok(peer)) = (tcp_info(socket), socket.peer_addr()) else {
            return;
        };
        let Traffic { read, written, unread } = Traffic::of(socket, &info);
        fds_of.entry(peer).or_default().push(fd);
        if let Some(seen) = now.get_mut(&peer) {
            seen.fds = seen.fds.saturating_add(1);
            return;
        }
        let last = before.get(&peer);
        if let Some(cut @ Seen { cut: true, .. }) = last {
            now.insert(peer, Seen { fds: 1, ..*cut });
            return;
        }
        // Seen before and sent nothing since: the unanswered bytes count from back then.
        // Never answered: from its first byte.
        let read_when_answered = match last {
            Some(s) if s.written == written => s.read_when_answered,
            Some(_) => read,
            None if written == 0 => 0,
            None => read,
        };
        let requests = server.unanswered.of(&peer);
        // Bytes up to the end of a body its handler read belong to requests taken.
        let counted_from = read_when_answered.max(requests.map_or(0, |r| r.read_after_bodies));
        let unanswered = read.saturating_sub(counted_from);
        let head_since = (unanswered > 0 && requests.is_none()).then(|| last.and_then(|s| s.head_since).unwrap_or(at));
        // Each request taken, and the next one, may have sent its head; one whose handler has
        // yet to read its body, the body too.
        let heads = HEAD_ALLOWANCE.saturating_mul(requests.map_or(1, |r| r.taken as u64 + 1));
        let allowance = match requests {
            Some(r) if r.bodies_unread > 0 => heads.saturating_add(server.max_body.saturating_mul(BODY_FRAMING)),
            _ => heads,
        };
        let too_long = head_since.is_some_and(|since| at - since >= HEAD_DEADLINE);
        let settled_at = last.filter(|s| (s.read, s.written) == (read, written)).map_or(at, |s| s.settled_at);
        // Short of descriptors, a head that stopped coming (one of tiny_http's connections,
        // not a session's pong) is not waited for: held open, such heads leave no
        // descriptor for anyone else.
        let stalled =
            pressed && head_since.is_some() && last.is_some_and(|s| s.fds == 2) && at - settled_at >= STALLED_HEAD;
        // More than a head waiting unread, and no request taken for it (tiny_http's
        // connections only: a session reads its own).
        let waiting =
            unread > 0 && requests.is_none() && unanswered + unread > allowance && last.is_some_and(|s| s.fds == 2);
        let stuffed_since = waiting.then(|| last.and_then(|s| s.stuffed_since).unwrap_or(at));
        let stuffed = stuffed_since.is_some_and(|since| at - since >= STUFFED_AFTER);
        // While requests wait for a handler thread: a client holding its share of them with
        // answers it does not read (its receive window is closed), which wait to be written.
        let not_reading = pressure.handlers
            && requests.is_some_and(|r| r.taken >= super::pipelining::PIPELINE_DEPTH)
            && info.tcpi_snd_wnd == 0;
        let cut = unanswered > allowance || too_long || stalled || stuffed || not_reading;
        watch_closely |= stuffed_since.is_some();
        // Its client left, its head unanswered: a thread reading it would have seen the end.
        let abandoned = cut || (head_since.is_some() && info.tcpi_state == TCP_CLOSE_WAIT);
        if cut {
            watch_closely = true;
            super::sockets::abort(socket);
            server.metrics.connection_cut();
            let why = match (too_long, stalled, stuffed, not_reading) {
                (true, ..) => "a request head for too long",
                (_, true, ..) => "a request head that stopped coming while open files are short",
                (_, _, true, _) => "a request head with more behind it that nobody reads",
                (.., true) => "requests whose answers it does not read, while others wait for a handler",
                _ => "more than a request",
            };
            log::warn!("cut a connection from {peer}: it sent {unanswered} bytes, {why}");
        } else if requests.is_none()
            && unanswered == 0
            && unread == 0
            && last.is_some_and(|s| s.fds == 2)
            && (at - settled_at >= IDLE_CLOSE || (pressed && settled_at < at))
        {
            // An idle keep-alive connection of tiny_http's (not a WebSocket session, which
            // has one descriptor; nor one with bytes waiting, a request not read yet), closed
            // before its read timeout would answer it a stale 400.
            super::sockets::shut(socket);
            log::debug!("closed an idle keep-alive connection from {peer}");
        }
        let seen =
            Seen { read, written, read_when_answered, head_since, stuffed_since, settled_at, fds: 1, cut, abandoned };
        now.insert(peer, seen);
    });
    // Only tiny_http's connections (two descriptors; a WebSocket session, ours, has one).
    for (peer, seen) in &now {
        if seen.abandoned && seen.fds == 2 {
            for fd in fds_of.get(peer).into_iter().flatten() {
                suspects.0.entry(*fd).or_insert((at, *peer));
            }
        }
    }
    (now, watch_closely)
}

/// What the server did with a connection, not what the network did: a body sent right
/// behind its head waits in the kernel, unread, until its handler reads it (and may arrive
/// before the server has taken its request), and an answer written counts at once, not when
/// the client's acknowledgement comes back (a look in between took the body of a request
/// just answered for a head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Traffic {
    /// Bytes the server read: received, less what waits unread.
    read: u64,
    /// Bytes the server wrote: acknowledged, plus what waits to be sent or acknowledged.
    written: u64,
    /// Bytes received that wait unread in the kernel.
    unread: u64,
}

impl Traffic {
    /// The connection's counts now.
    fn now(socket: &TcpStream) -> Option<Traffic> {
        tcp_info(socket).map(|info| Traffic::of(socket, &info))
    }

    /// The counts of `socket`, whose `TCP_INFO` is `info`.
    fn of(socket: &TcpStream, info: &libc::tcp_info) -> Traffic {
        let unread = super::sockets::unread_bytes(socket);
        let read = info.tcpi_bytes_received.saturating_sub(unread);
        Traffic { read, written: info.tcpi_bytes_acked + super::sockets::unacknowledged_bytes(socket), unread }
    }
}

/// This process's resident size in bytes (0 when it cannot be read: then the guard never
/// looks, as before it existed).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    pages * page
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use crate::http::sockets::unread_bytes;

    #[test]
    fn the_kernel_counts_what_the_server_read_of_a_connection_and_what_it_wrote() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        let traffic = |socket: &TcpStream| Traffic::now(socket).expect("tcp_info");
        client.write_all(&[b'a'; 5000]).expect("send");
        let mut buf = vec![0; 5000];
        server.read_exact(&mut buf[..3000]).expect("read");
        assert_eq!(traffic(&server), Traffic { read: 3000, written: 0, unread: 2000 }, "what waits unread");
        server.read_exact(&mut buf[3000..]).expect("read");
        assert_eq!(traffic(&server), Traffic { read: 5000, written: 0, unread: 0 }, "read all, never answered");
        server.write_all(b"ok").expect("answer");
        assert_eq!(traffic(&server).written, 2, "an answer counts once written, acknowledged or not");
        client.read_exact(&mut [0; 2]).expect("read the answer");
        assert_eq!(traffic(&server).written, 2, "and once acknowledged");
        assert!(resident_bytes() > 0);
    }

    /// A body sent right behind its head waits in the kernel until a handler reads it, and
    /// may well arrive before the server has taken its request (a busy acceptor): it is not
    /// part of a head, however large. CI once saw a 1 MiB body cut that way. What the server
    /// read past a head's allowance is.
    #[test]
    fn a_body_waiting_behind_a_head_not_taken_yet_is_not_cut_but_an_endless_head_is() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(HttpMetrics::default());
        let watched = Watched { port: addr.port(), max_body: 1 << 20, unanswered: Arc::default(), metrics };
        let head = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1 << 20);
        let sent = 3 * HEAD_ALLOWANCE as usize;
        let mut client = TcpStream::connect(addr).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        let sender = std::thread::spawn(move || {
            let _ = client.write_all(head.as_bytes()).and_then(|()| client.write_all(&vec![b'x'; sent]));
        });
        let waited = Instant::now();
        while unread_bytes(&server) < 2 * HEAD_ALLOWANCE && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5)); // the bytes are on their way
        }
        server.read_exact(&mut [0; 64]).expect("read the head");
        let (seen, cut) = look(&watched, &HashMap::new(), Pressure::default(), &mut Suspects::default());
        assert!(!cut, "{} bytes wait unread behind the head", unread_bytes(&server));
        server.read_exact(&mut vec![0; 2 * HEAD_ALLOWANCE as usize]).expect("read on as if it were a head");
        let (_, cut) = look(&watched, &seen, Pressure::default(), &mut Suspects::default());
        assert!(cut, "what the server read past a head's allowance is cut");
        sender.join().expect("sender");
    }
}
