//! WebSocket sessions over tiny_http, shared by the gateway and the runtime.
//!
//! The pool thread validates and performs the upgrade. The session then joins its stream on
//! a short-lived thread of its own (opening an upstream or reading a replay may block), and
//! from then on it is a non-blocking state machine run by the process's pollers
//! ([`super::poller`]): an idle session holds no thread. tiny_http would hold a thread for an
//! upgraded connection as long as it lives, so the session takes the socket over from it
//! ([`super::sockets::take_over`]) and tiny_http lets go; producers wake a session through
//! its [`Waker`].

use std::io::{ErrorKind, IoSlice, Read, Write};
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
            return Err(ApiError::overloaded(match self.max {
                0 => "WebSocket sessions are off: the gateway's open file limit is too low".to_owned(),
                max => format!("all {max} WebSocket sessions are in use"),
            }));
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
    ws: WebSocket<Gated>,
    waker: Arc<Waker>,
    _permit: Permit,
}

/// True when the request asks for a WebSocket upgrade.
pub fn is_upgrade(request: &Incoming) -> bool {
    // RFC 6455: the opening handshake is a GET (a HEAD, answered as one, has no upgrade).
    !request.is_head() && request.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
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
        .map_err(|e| upgrade_failed("the upgrade failed", e))?;
    // The 101 is out (and a client sends nothing before it): the connection is ours now.
    let socket =
        super::sockets::take_over(peer, port).map_err(|e| upgrade_failed("cannot take the connection over", e))?;
    drop(stream);
    // From here on every read and write of the session returns at once.
    socket.set_nonblocking(true).map_err(|e| ApiError::internal(e.to_string()))?;
    let _ = socket.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 << 10)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10));
    let ws = WebSocket::from_raw_socket(Gated { socket, held: false }, Role::Server, Some(config));
    Ok(Upgraded { ws, waker, _permit: permit })
}

/// An upgrade's own I/O failed. A client that left during it (its connection reset or gone)
/// is not a server error; anything else is.
fn upgrade_failed(what: &str, e: std::io::Error) -> ApiError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, NotFound};
    if matches!(e.kind(), BrokenPipe | ConnectionAborted | ConnectionReset | NotFound) {
        return ApiError::bad_request("invalid_request", "the client closed its connection during the upgrade");
    }
    ApiError::internal(format!("{what}: {e}"))
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

/// Frames longer than this are written from the bytes their stream shares rather than
/// copied into the session's buffer: one large event sent to many browsers is then held
/// once, not once per browser.
const LARGE_FRAME: usize = 64 << 10;

/// A session's socket as tungstenite sees it. While a large frame is written around
/// tungstenite ([`LargeFrame`]), tungstenite's own writes — the pongs it sends as it reads,
/// pings, the close frame — wait as if the socket were full, so none lands inside it.
struct Gated {
    socket: TcpStream,
    held: bool,
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.socket.read(buf)
    }
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.held {
            return Err(ErrorKind::WouldBlock.into());
        }
        self.socket.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A large text frame under way: its header, then its payload straight from shared bytes.
struct LargeFrame {
    header: [u8; 10],
    header_len: usize,
    payload: Utf8Bytes,
    /// Bytes of header and payload written so far.
    written: usize,
}

impl LargeFrame {
    /// An unmasked, final text frame (what a server sends) of `payload`.
    fn new(payload: Utf8Bytes) -> LargeFrame {
        let mut header = [0u8; 10];
        header[0] = 0x81; // FIN, text
        let len = payload.len();
        let header_len = match u16::try_from(len) {
            Ok(short) if short < 126 => {
                header[1] = short as u8;
                2
            }
            Ok(medium) => {
                header[1] = 126;
                header[2..4].copy_from_slice(&medium.to_be_bytes());
                4
            }
            Err(_) => {
                header[1] = 127;
                header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        LargeFrame { header, header_len, payload, written: 0 }
    }

    /// Writes the rest, as far as `socket` takes it (`WouldBlock` when it is full).
    fn write_to(&mut self, socket: &mut TcpStream) -> std::io::Result<()> {
        loop {
            let header = &self.header[self.written.min(self.header_len)..self.header_len];
            let payload = &self.payload.as_bytes()[self.written.saturating_sub(self.header_len)..];
            if header.is_empty() && payload.is_empty() {
                return Ok(());
            }
            match socket.write_vectored(&[IoSlice::new(header), IoSlice::new(payload)]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A running session: its connection, its feed and its timers.
struct Session {
    ws: WebSocket<Gated>,
    feed: Box<dyn Feed>,
    options: SessionOptions,
    /// Frames drained from the feed and not yet handed to the socket (or to tungstenite).
    out: Vec<Utf8Bytes>,
    /// A large frame being written ([`LARGE_FRAME`]).
    large: Option<LargeFrame>,
    /// A close frame that goes once everything before it is out.
    close_after: Option<CloseFrame>,
    last_heard: Instant,
    /// Bytes the peer had acknowledged when last looked at (only once it has been quiet for
    /// a while): a peer still taking data is alive though its pong waits behind that data.
    acked_seen: Option<u64>,
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
            large: None,
            close_after: None,
            last_heard: now,
            acked_seen: None,
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
            self.send(now)?;
        }
        let mut again = false;
        if self.stalled_since.is_none() && self.closing_until.is_none() {
            let end = self.feed.drain(&mut self.out);
            again = end.is_none() && self.out.len() >= DRAIN_BATCH;
            match end {
                Some(close) => self.close(close, now)?,
                None => self.send(now)?,
            }
        }
        if self.closing_until.is_some_and(|until| now >= until)
            || self.stalled_since.is_some_and(|since| now >= since + WRITE_STALL)
        {
            return Err(Ended);
        }
        if self.closing_until.is_none() {
            self.note_reading_peer(now);
            if now >= self.last_heard + self.options.idle_limit {
                self.close(close_frame(CloseCode::Away, "idle"), now)?;
            } else if now >= self.next_ping && self.stalled_since.is_none() {
                self.next_ping = now + self.options.ping_every;
                self.ws.write(Message::Ping(Default::default())).or_else(blocked)?;
                self.send(now)?;
            }
        }
        Ok(Step::Wait { writable: self.stalled_since.is_some(), until: Some(self.deadline()), again })
    }

    /// A peer quiet for half the idle limit that still takes data (it acknowledges more than
    /// [`TAKING_DATA`] bytes meanwhile) counts as heard: a browser reading a large burst
    /// slowly answers a ping only once it has read what was sent before it, which can take
    /// longer than the limit. Its kernel acknowledges the pings themselves without anyone
    /// reading them, so they do not count.
    fn note_reading_peer(&mut self, now: Instant) {
        if now < self.last_heard + self.options.idle_limit / 2 {
            self.acked_seen = None;
            return;
        }
        let acked = super::sockets::tcp_info(&self.ws.get_ref().socket).map_or(0, |info| info.tcpi_bytes_acked);
        match self.acked_seen {
            None => self.acked_seen = Some(acked), // quiet since half the limit: watched from here
            Some(seen) if acked >= seen + TAKING_DATA => {
                self.last_heard = now;
                self.acked_seen = None;
            }
            Some(_) => {}
        }
    }

    /// The next time a timer of this session is due. A stalled session sends no ping (it is
    /// sent once the socket takes data again), so only its stall and idle limits count.
    fn deadline(&self) -> Instant {
        let idle = self.last_heard + self.options.idle_limit;
        // Halfway to it, what the peer acknowledged starts being watched.
        let idle = match self.acked_seen {
            None if self.closing_until.is_none() => idle.min(self.last_heard + self.options.idle_limit / 2),
            _ => idle,
        };
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
                    return self.close(close_frame(CloseCode::Policy, "observation_only"), now);
                }
                Ok(_) => self.last_heard = now, // ping (pong queued), pong, close (reply queued)
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    return self.send(now); // sends a queued pong or close reply
                }
                Err(_) => return Err(Ended),
            }
        }
    }

    /// Writes what is pending, in order — a large frame under way, the frames of `out` (the
    /// small ones through tungstenite's buffer, flushed once), then a close waiting behind
    /// them — as far as the socket takes it. A full socket marks the session stalled (until
    /// then it drains nothing more, so its feed's own limits apply).
    fn send(&mut self, now: Instant) -> Result<(), Ended> {
        loop {
            if let Some(large) = &mut self.large {
                let before = large.written;
                match large.write_to(&mut self.ws.get_mut().socket) {
                    Ok(()) => {
                        self.large = None;
                        self.ws.get_mut().held = false;
                    }
                    // A client that takes the frame, however slowly, is not stalled.
                    Err(e) if e.kind() == ErrorKind::WouldBlock && large.written > before => {
                        self.stalled_since = Some(now);
                        return Ok(());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return self.stall(now),
                    Err(_) => return Err(Ended),
                }
            }
            let small = self.out.iter().position(|f| f.len() > LARGE_FRAME).unwrap_or(self.out.len());
            for frame in self.out.drain(..small) {
                self.ws.write(Message::Text(frame)).or_else(blocked)?;
            }
            match self.ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => return self.stall(now),
                Err(_) => return Err(Ended),
            }
            if self.out.is_empty() {
                break;
            }
            // What tungstenite held is out: the large frame goes next, around it.
            self.ws.get_mut().held = true;
            self.large = Some(LargeFrame::new(self.out.remove(0)));
        }
        self.stalled_since = None;
        if let Some(close) = self.close_after.take() {
            match self.ws.close(Some(close)) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => return self.stall(now),
                Err(_) => return Err(Ended),
            }
        }
        Ok(())
    }

    /// The socket is full: the session waits for room (or its stall limit).
    fn stall(&mut self, now: Instant) -> Result<(), Ended> {
        self.stalled_since.get_or_insert(now);
        Ok(())
    }

    /// Sends `close` after what is pending, and gives the peer [`CLOSE_WAIT`] to answer it.
    fn close(&mut self, close: CloseFrame, now: Instant) -> Result<(), Ended> {
        self.closing_until = Some(now + CLOSE_WAIT);
        self.close_after = Some(close);
        self.send(now)
    }
}

/// Bytes a quiet peer must acknowledge to count as still reading (see
/// [`Session::note_reading_peer`]): far more than the pings of an idle limit.
const TAKING_DATA: u64 = 4096;

/// A write that found the socket full: the frame is queued inside tungstenite.
fn blocked(error: tungstenite::Error) -> Result<(), Ended> {
    match error {
        tungstenite::Error::Io(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        _ => Err(Ended),
    }
}

impl Task for Session {
    fn fd(&self) -> RawFd {
        self.ws.get_ref().socket.as_raw_fd()
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

    /// Headers of every length class are what tungstenite writes for the same frame.
    #[test]
    fn large_frame_headers_match_tungstenites() {
        for len in [0, 125, 126, 65_535, 65_536, 1 << 20] {
            let payload = Utf8Bytes::from("x".repeat(len));
            let mut ours = Vec::new();
            let large = LargeFrame::new(payload.clone());
            ours.extend_from_slice(&large.header[..large.header_len]);
            ours.extend_from_slice(payload.as_bytes());
            let mut theirs = Vec::new();
            tungstenite::protocol::frame::Frame::message(
                payload,
                tungstenite::protocol::frame::coding::OpCode::Data(tungstenite::protocol::frame::coding::Data::Text),
                true,
            )
            .format(&mut theirs)
            .unwrap();
            assert!(ours == theirs, "length {len}");
        }
    }

    /// Frames of a feed, one at a time.
    struct Frames(Vec<Utf8Bytes>);

    impl Feed for Frames {
        fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseFrame> {
            if self.0.is_empty() {
                return Some(close_frame(CloseCode::Normal, "done"));
            }
            out.push(self.0.remove(0));
            None
        }
    }

    /// A session on a fresh loopback connection, feeding `feed`, pinging every `ping_every`;
    /// and the client's end of the connection.
    fn session(feed: Box<dyn Feed>, ping_every: Duration) -> (Session, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        socket.set_nonblocking(true).unwrap();
        let ws = WebSocket::from_raw_socket(Gated { socket, held: false }, Role::Server, None);
        let upgraded =
            Upgraded { ws, waker: poller::waker().unwrap(), _permit: SessionLimit::new(1).acquire().unwrap() };
        let options = SessionOptions {
            ping_every,
            idle_limit: Duration::from_secs(3600),
            observation_only: Utf8Bytes::from_static("no"),
        };
        (Session::new(upgraded, feed, options), client)
    }

    /// Large frames written around tungstenite arrive whole and in order among small ones,
    /// while the client pings and reads slowly (its pongs must never land inside a frame),
    /// and the close goes last.
    #[test]
    fn large_and_small_frames_arrive_in_order_among_pongs() {
        let texts: Vec<String> =
            ["a".into(), "b".repeat(300 << 10), "c".into(), "d".repeat(100 << 10), "e".into()].into_iter().collect();
        let frames = texts.iter().map(|t| Utf8Bytes::from(t.clone())).collect();
        let (mut session, client) = session(Box::new(Frames(frames)), Duration::from_secs(3600));
        let socket = &session.ws.get_ref().socket;
        // Small socket buffers: every large frame takes many writes, with pongs due between.
        for (fd, option) in [(socket.as_raw_fd(), libc::SO_SNDBUF), (client.as_raw_fd(), libc::SO_RCVBUF)] {
            let size: libc::c_int = 8 << 10;
            // SAFETY: a valid socket and an int option of the size given.
            let set = unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, option, (&raw const size).cast(), size_of::<libc::c_int>() as _)
            };
            assert_eq!(set, 0);
        }
        let reader = std::thread::spawn(move || {
            client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
            let mut ws = WebSocket::from_raw_socket(client, Role::Client, Some(config));
            let mut got = Vec::new();
            loop {
                // A ping before every read, and small reads: pongs are due all along.
                ws.send(Message::Ping(Default::default())).unwrap();
                match ws.read() {
                    Ok(Message::Text(text)) => got.push(text.to_string()),
                    Ok(Message::Close(_)) => return got,
                    Ok(_) => {}
                    Err(e) => panic!("after {} frames: {e}", got.len()),
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "the session did not finish");
            let ready = Ready { readable: true, writable: true };
            if session.advance(ready, Instant::now()).is_err() {
                break; // the client answered the close
            }
            std::thread::sleep(Duration::from_millis(1)); // the poller's turn would come later
        }
        assert!(reader.join().unwrap() == texts, "every frame, whole and in order");
    }

    /// A client on a slow link that keeps taking a large frame is not dropped as stalled,
    /// however long the whole frame takes.
    #[test]
    fn a_slow_client_taking_a_large_frame_is_not_stalled() {
        let frame = Utf8Bytes::from("x".repeat(64 << 20));
        let (mut session, mut client) = session(Box::new(Frames(vec![frame])), Duration::from_secs(3600));
        let ready = Ready { readable: false, writable: true };
        let start = Instant::now();
        assert!(session.advance(ready, start).is_ok());
        assert!(session.large.is_some(), "more than the socket takes at once");
        // A minute at a client's pace: a little read every (simulated) second.
        let mut buf = vec![0u8; 256 << 10];
        for second in 1..=60 {
            client.read_exact(&mut buf).unwrap();
            let now = start + Duration::from_secs(second);
            assert!(session.advance(ready, now).is_ok(), "dropped after {second} s while the client was reading");
        }
    }

    /// A client still taking data counts as heard, though its pong waits behind that data: a
    /// slow link reading a large burst is not dropped as idle (it was, after the idle limit).
    #[test]
    fn a_client_still_reading_is_not_idle_though_its_pongs_wait() {
        /// One frame, then nothing more for as long as the stream lasts.
        struct Once(Option<Utf8Bytes>);
        impl Feed for Once {
            fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseFrame> {
                out.extend(self.0.take());
                None
            }
        }
        let frame = Utf8Bytes::from("x".repeat(64 << 20));
        let (mut session, mut client) = session(Box::new(Once(Some(frame))), Duration::from_secs(20));
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        session.options.idle_limit = Duration::from_secs(60);
        let ready = Ready { readable: false, writable: true };
        let start = Instant::now();
        assert!(session.advance(ready, start).is_ok());
        // Two minutes at a client's pace: it reads a little every (simulated) second and
        // never gets to the pings queued behind the frame.
        let mut buf = vec![0u8; 128 << 10];
        for second in 1..=120 {
            client.read_exact(&mut buf).unwrap();
            let now = start + Duration::from_secs(second);
            assert!(session.advance(ready, now).is_ok());
            assert!(session.closing_until.is_none(), "closed as idle after {second} s while the client was reading");
        }
        // A client that stops reading is idle again at the limit (if not stalled before).
        let later = start + Duration::from_secs(240);
        let _ = session.advance(ready, later);
        assert!(session.closing_until.is_some() || session.advance(ready, later).is_err());
    }

    /// A client that reads nothing is dropped at the idle limit though its kernel acknowledges
    /// the pings (which counted as life for a while, keeping such sessions for ever).
    #[test]
    fn a_client_that_reads_nothing_is_idle_though_its_kernel_acknowledges_pings() {
        /// Nothing to send, for as long as the stream lasts.
        struct Quiet;
        impl Feed for Quiet {
            fn drain(&mut self, _: &mut Vec<Utf8Bytes>) -> Option<CloseFrame> {
                None
            }
        }
        let (mut session, _reads_nothing) = session(Box::new(Quiet), Duration::from_secs(20));
        session.options.idle_limit = Duration::from_secs(60);
        let ready = Ready { readable: false, writable: true };
        let start = Instant::now();
        for second in 1..=59 {
            assert!(session.advance(ready, start + Duration::from_secs(second)).is_ok());
            std::thread::sleep(Duration::from_millis(1)); // the pings reach the client's kernel
        }
        assert!(session.closing_until.is_none(), "not before the limit");
        let _ = session.advance(ready, start + Duration::from_secs(61));
        assert!(session.closing_until.is_some(), "closed as idle at the limit");
    }

    #[test]
    fn a_stalled_session_waits_for_its_socket_not_for_the_ping_it_cannot_send() {
        let (mut session, _reads_nothing) = session(Box::new(Flood), Duration::from_secs(1));
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
