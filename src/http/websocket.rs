//! WebSocket sessions over tiny_http, shared by the gateway and the runtime.
//!
//! The pool thread validates and performs the upgrade. The session then joins its stream on
//! a short-lived thread of its own (opening an upstream or reading a replay may block), and
//! from then on it is a non-blocking state machine run by the process's pollers
//! ([`super::poller`]): an idle session holds no thread. tiny_http would hold a thread for an
//! upgraded connection as long as it lives, so the session takes the socket over from it
//! ([`super::sockets::take_over`]) and tiny_http lets go; producers wake a session through
//! its [`Waker`].

use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

use super::body::Incoming;
use super::error::ApiError;
pub use super::poller::Waker;
use super::poller::{self, Ready, Step, Task};

/// A cap on concurrent sessions.
pub struct SessionLimit {
    active: AtomicUsize,
    max: usize,
}

/// One held session slot; released on drop.
pub struct Permit(Arc<SessionLimit>);

impl SessionLimit {
    /// A limit of `max` sessions.
    pub fn new(max: usize) -> Arc<SessionLimit> {
        Arc::new(SessionLimit { active: AtomicUsize::new(0), max })
    }

    /// A slot, or 503 `overloaded` when all are taken.
    pub fn acquire(self: &Arc<Self>) -> Result<Permit, ApiError> {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::overloaded(format!("all {} WebSocket sessions are in use", self.max)));
        }
        Ok(Permit(self.clone()))
    }

    /// Sessions running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Waits (up to `grace`) until every session has ended; false if some are still open.
    pub fn wait_idle(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        while self.active() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An upgraded connection, ready for [`start`].
pub struct Upgraded {
    ws: WebSocket<TcpStream>,
    waker: Arc<Waker>,
    _permit: Permit,
}

/// True when the request asks for a WebSocket upgrade.
pub fn is_upgrade(request: &Incoming) -> bool {
    request.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Validates the handshake and upgrades. Before the `101`, failures are plain HTTP errors.
pub fn upgrade(request: &mut Incoming, permit: Permit) -> Result<Upgraded, ApiError> {
    let bad = |what: &str| ApiError::bad_request("invalid_request", format!("not a valid WebSocket upgrade: {what}"));
    if !request.header("connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")) {
        return Err(bad("missing `Connection: upgrade`"));
    }
    if request.header("sec-websocket-version") != Some("13") {
        return Err(bad("only Sec-WebSocket-Version 13 is supported"));
    }
    let key = request.header("sec-websocket-key").ok_or_else(|| bad("missing Sec-WebSocket-Key"))?.to_owned();
    let peer = request.remote_addr().ok_or_else(|| ApiError::internal("the connection has no peer address"))?;
    let port = request.local_port();
    let waker = poller::waker().map_err(|e| ApiError::internal(format!("cannot start a session poller: {e}")))?;
    let request = request.take().ok_or_else(|| ApiError::internal("request already taken"))?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let header = tiny_http::Header::from_bytes("Sec-WebSocket-Accept", accept.as_bytes())
        .map_err(|_| ApiError::internal("cannot build the accept header"))?;
    let stream = request
        .upgrade("websocket", tiny_http::Response::empty(101).with_header(header))
        .map_err(|e| ApiError::internal(format!("the upgrade failed: {e}")))?;
    // The 101 is out (and a client sends nothing before it): the connection is ours now.
    let socket = super::sockets::take_over(peer, port)
        .map_err(|e| ApiError::internal(format!("cannot take the connection over: {e}")))?;
    drop(stream);
    // From here on every read and write of the session returns at once.
    socket.set_nonblocking(true).map_err(|e| ApiError::internal(e.to_string()))?;
    let _ = socket.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 << 10)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10));
    let ws = WebSocket::from_raw_socket(socket, Role::Server, Some(config));
    Ok(Upgraded { ws, waker, _permit: permit })
}

/// Frames a feed hands over per drain at most, so a busy stream leaves room for the others.
pub const DRAIN_BATCH: usize = 512;

/// Where a session's outgoing frames come from. Drains run on a poller: they never block.
pub trait Feed: Send {
    /// Moves the frames ready now (at most [`DRAIN_BATCH`]) into `out`; `Some(close)` ends
    /// the session after them.
    fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseFrame>;
}

/// A feed that sends one frame (a diagnostic saying why), then closes with 1008.
pub struct Closing(pub Option<Utf8Bytes>);

impl Feed for Closing {
    fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseFrame> {
        out.extend(self.0.take());
        Some(close_frame(CloseCode::Policy, "diagnostic"))
    }
}

/// Heartbeat and policy of a session.
#[derive(Clone)]
pub struct SessionOptions {
    /// Send a ping this often.
    pub ping_every: Duration,
    /// Close a peer silent for this long.
    pub idle_limit: Duration,
    /// The diagnostic frame sent before closing on a Text/Binary message from the client.
    pub observation_only: Utf8Bytes,
}

/// A close frame.
pub fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame { code, reason: Utf8Bytes::from_static(reason) }
}

/// Runs `session`: `join` opens its feed on a short-lived thread of its own (it may block:
/// opening an upstream, reading a replay), given the waker its producers call; the session
/// then lives on a poller until either side ends it.
pub fn start(
    session: Upgraded,
    options: SessionOptions,
    join: impl FnOnce(&Arc<Waker>) -> Box<dyn Feed> + Send + 'static,
) -> Result<(), ApiError> {
    std::thread::Builder::new()
        .name("ws-join".into())
        .spawn(move || {
            let feed = join(&session.waker);
            let waker = session.waker.clone();
            poller::run(&waker, Box::new(Session::new(session, feed, options)));
        })
        .map(drop)
        .map_err(|e| ApiError::internal(format!("cannot start a session thread: {e}")))
}

/// How long written frames may wait for a client that does not read before it is dropped.
const WRITE_STALL: Duration = Duration::from_secs(10);

/// How long the peer has to answer our close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A running session: its connection, its feed and its timers.
struct Session {
    ws: WebSocket<TcpStream>,
    feed: Box<dyn Feed>,
    options: SessionOptions,
    out: Vec<Utf8Bytes>,
    last_heard: Instant,
    next_ping: Instant,
    /// Since when written bytes wait for room in the socket (the client does not read).
    stalled_since: Option<Instant>,
    /// Our close frame is queued; the peer has until then to answer it.
    closing_until: Option<Instant>,
    _permit: Permit,
}

/// The session is over: the connection is dropped.
struct Ended;

impl Session {
    fn new(session: Upgraded, feed: Box<dyn Feed>, options: SessionOptions) -> Session {
        let now = Instant::now();
        Session {
            ws: session.ws,
            feed,
            next_ping: now + options.ping_every,
            options,
            out: Vec::new(),
            last_heard: now,
            stalled_since: None,
            closing_until: None,
            _permit: session._permit,
        }
    }

    fn advance(&mut self, ready: Ready, now: Instant) -> Result<Step, Ended> {
        if ready.readable {
            self.read_client(now)?;
        }
        if self.stalled_since.is_some() && ready.writable {
            self.flush(now)?;
        }
        let mut again = false;
        if self.stalled_since.is_none() && self.closing_until.is_none() {
            let end = self.feed.drain(&mut self.out);
            again = end.is_none() && self.out.len() >= DRAIN_BATCH;
            self.write_out(now)?;
            if let Some(close) = end {
                self.close(close, now)?;
            }
        }
        if self.closing_until.is_some_and(|until| now >= until)
            || self.stalled_since.is_some_and(|since| now >= since + WRITE_STALL)
        {
            return Err(Ended);
        }
        if self.closing_until.is_none() {
            if now >= self.last_heard + self.options.idle_limit {
                self.close(close_frame(CloseCode::Away, "idle"), now)?;
            } else if now >= self.next_ping && self.stalled_since.is_none() {
                self.next_ping = now + self.options.ping_every;
                self.ws.write(Message::Ping(Default::default())).or_else(blocked)?;
                self.flush(now)?;
            }
        }
        Ok(Step::Wait { writable: self.stalled_since.is_some(), until: Some(self.deadline()), again })
    }

    /// The next time a timer of this session is due. A stalled session sends no ping (it is
    /// sent once the socket takes data again), so only its stall and idle limits count.
    fn deadline(&self) -> Instant {
        let idle = self.last_heard + self.options.idle_limit;
        match (self.closing_until, self.stalled_since) {
            (Some(until), Some(since)) => until.min(since + WRITE_STALL),
            (Some(until), None) => until,
            (None, Some(since)) => idle.min(since + WRITE_STALL),
            (None, None) => idle.min(self.next_ping),
        }
    }

    /// Reads what the client sent: control frames count as signs of life; a Text or Binary
    /// message breaks the observation-only rule and closes the session.
    fn read_client(&mut self, now: Instant) -> Result<(), Ended> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(_) | Message::Binary(_)) if self.closing_until.is_none() => {
                    self.out.push(self.options.observation_only.clone());
                    self.write_out(now)?;
                    return self.close(close_frame(CloseCode::Policy, "observation_only"), now);
                }
                Ok(_) => self.last_heard = now, // ping (pong queued), pong, close (reply queued)
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    return self.flush(now); // sends a queued pong or close reply
                }
                Err(_) => return Err(Ended),
            }
        }
    }

    /// Writes every frame of `out`, then flushes once.
    fn write_out(&mut self, now: Instant) -> Result<(), Ended> {
        if self.out.is_empty() {
            return Ok(());
        }
        for frame in self.out.drain(..) {
            self.ws.write(Message::Text(frame)).or_else(blocked)?;
        }
        self.flush(now)
    }

    /// Sends what tungstenite holds; a full socket marks the session stalled (until then it
    /// drains nothing more, so its feed's own limits apply).
    fn flush(&mut self, now: Instant) -> Result<(), Ended> {
        match self.ws.flush() {
            Ok(()) => {
                self.stalled_since = None;
                Ok(())
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                self.stalled_since.get_or_insert(now);
                Ok(())
            }
            Err(_) => Err(Ended),
        }
    }

    /// Queues `close` and gives the peer [`CLOSE_WAIT`] to answer it.
    fn close(&mut self, close: CloseFrame, now: Instant) -> Result<(), Ended> {
        self.closing_until = Some(now + CLOSE_WAIT);
        match self.ws.close(Some(close)) {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                self.stalled_since.get_or_insert(now);
                Ok(())
            }
            Err(_) => Err(Ended),
        }
    }
}

/// A write that found the socket full: the frame is queued inside tungstenite.
fn blocked(error: tungstenite::Error) -> Result<(), Ended> {
    match error {
        tungstenite::Error::Io(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        _ => Err(Ended),
    }
}

impl Task for Session {
    fn fd(&self) -> RawFd {
        self.ws.get_ref().as_raw_fd()
    }

    fn step(&mut self, ready: Ready, now: Instant) -> Step {
        self.advance(ready, now).unwrap_or(Step::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Always has a full batch of frames.
    struct Flood;

    impl Feed for Flood {
        fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseFrame> {
            out.extend((0..DRAIN_BATCH).map(|_| Utf8Bytes::from("x".repeat(1000))));
            None
        }
    }

    #[test]
    fn a_stalled_session_waits_for_its_socket_not_for_the_ping_it_cannot_send() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _reads_nothing = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        socket.set_nonblocking(true).unwrap();
        let ws = WebSocket::from_raw_socket(socket, Role::Server, None);
        let upgraded =
            Upgraded { ws, waker: poller::waker().unwrap(), _permit: SessionLimit::new(1).acquire().unwrap() };
        let options = SessionOptions {
            ping_every: Duration::from_secs(1),
            idle_limit: Duration::from_secs(60),
            observation_only: Utf8Bytes::from_static("no"),
        };
        let mut session = Session::new(upgraded, Box::new(Flood), options);
        let start = Instant::now();
        for _ in 0..10_000 {
            if session.stalled_since.is_some() {
                break;
            }
            assert!(session.advance(Ready::default(), start).is_ok());
        }
        assert!(session.stalled_since.is_some(), "the client's buffers filled up");
        // The ping is due, but cannot be sent: the session waits for room, or its stall limit.
        let later = start + Duration::from_secs(2);
        match session.advance(Ready::default(), later) {
            Ok(Step::Wait { writable: true, until: Some(until), .. }) => {
                assert_eq!(until, start + WRITE_STALL, "not at once, again and again")
            }
            _ => panic!("a stalled session waits"),
        }
        assert!(session.advance(Ready::default(), start + WRITE_STALL).is_err(), "dropped after the stall limit");
    }
}
