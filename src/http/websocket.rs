//! WebSocket sessions over tiny_http, shared by the gateway and the runtime.
//!
//! The pool thread validates and performs the upgrade, then the session runs on a thread of
//! its own. tiny_http hands over the upgraded stream without its socket, so the socket is
//! found by peer address (`/proc/self/fd`) to `poll()` it; a session sleeps in `poll()` on
//! that socket and a wake pipe, so both directions are immediate without busy reads.
//! Producers wake a session only when it sleeps.

use std::io::{self, ErrorKind};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes, WebSocket};

use super::body::Incoming;
use super::error::ApiError;

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

/// Wakes a sleeping session from another thread.
pub struct Waker {
    sleeping: AtomicBool,
    pipe: OwnedFd,
}

impl Waker {
    /// Makes the session's `poll()` return, if it is sleeping in it.
    pub fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            // SAFETY: writes one byte from a live buffer to a pipe we own (non-blocking).
            unsafe { libc::write(self.pipe.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }
}

/// An upgraded connection, ready for [`run`].
pub struct Upgraded {
    ws: WebSocket<Box<dyn tiny_http::ReadWrite + Send>>,
    socket: TcpStream,
    waker: Arc<Waker>,
    wake_rx: OwnedFd,
    _permit: Permit,
}

impl Upgraded {
    /// The waker producers call after queueing frames for this session.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }
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
    let socket = super::sockets::find_socket(peer, request.local_port())
        .ok_or_else(|| ApiError::internal("cannot find the connection's socket"))?;
    let (waker, wake_rx) = wake_pipe().map_err(|e| ApiError::internal(format!("cannot create a wake pipe: {e}")))?;
    socket.set_read_timeout(Some(Duration::from_millis(2))).map_err(|e| ApiError::internal(e.to_string()))?;
    socket.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| ApiError::internal(e.to_string()))?;
    let _ = socket.set_nodelay(true);
    let request = request.take().ok_or_else(|| ApiError::internal("request already taken"))?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let header = tiny_http::Header::from_bytes("Sec-WebSocket-Accept", accept.as_bytes())
        .map_err(|_| ApiError::internal("cannot build the accept header"))?;
    let stream = request
        .upgrade("websocket", tiny_http::Response::empty(101).with_header(header))
        .map_err(|e| ApiError::internal(format!("the upgrade failed: {e}")))?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(16 << 10)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10));
    let ws = WebSocket::from_raw_socket(stream, Role::Server, Some(config));
    Ok(Upgraded { ws, socket, waker, wake_rx, _permit: permit })
}

fn wake_pipe() -> io::Result<(Arc<Waker>, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((Arc::new(Waker { sleeping: AtomicBool::new(false), pipe: tx }), rx))
}

/// Where a session's outgoing frames come from.
pub trait Feed {
    /// Moves the frames ready now into `out`; `Some(close)` ends the session after them.
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

/// Runs the session until either side ends it.
pub fn run(mut session: Upgraded, feed: &mut dyn Feed, options: &SessionOptions) {
    let mut out = Vec::new();
    let mut last_heard = Instant::now();
    let mut next_ping = last_heard + options.ping_every;
    loop {
        session.waker.sleeping.store(false, Ordering::SeqCst);
        let end = feed.drain(&mut out);
        if write_all(&mut session.ws, &mut out).is_err() {
            return;
        }
        if let Some(close) = end {
            return finish(&mut session.ws, close);
        }
        session.waker.sleeping.store(true, Ordering::SeqCst);
        if let Some(close) = feed.drain(&mut out) {
            let _ = write_all(&mut session.ws, &mut out);
            return finish(&mut session.ws, close);
        }
        if !out.is_empty() {
            continue;
        }
        let now = Instant::now();
        let idle_at = last_heard + options.idle_limit;
        let wait = next_ping.min(idle_at).saturating_duration_since(now);
        let (readable, woken) = wait_for(&session.socket, &session.wake_rx, wait);
        if woken {
            drain_pipe(&session.wake_rx);
        }
        if readable {
            match read_client(&mut session.ws, options) {
                Ok(true) => last_heard = Instant::now(),
                Ok(false) => {}
                Err(()) => return,
            }
        }
        let now = Instant::now();
        if now >= last_heard + options.idle_limit {
            return finish(&mut session.ws, close_frame(CloseCode::Away, "idle"));
        }
        if now >= next_ping {
            next_ping = now + options.ping_every;
            if session.ws.send(Message::Ping(Default::default())).is_err() {
                return;
            }
        }
    }
}

/// Writes every frame, then flushes once.
fn write_all(ws: &mut WebSocket<Box<dyn tiny_http::ReadWrite + Send>>, out: &mut Vec<Utf8Bytes>) -> Result<(), ()> {
    if out.is_empty() {
        return Ok(());
    }
    for frame in out.drain(..) {
        ws.write(Message::Text(frame)).map_err(|_| ())?;
    }
    ws.flush().map_err(|_| ())
}

/// Reads what the client sent; `Ok(true)` when anything arrived, `Err` when the session ends.
fn read_client(ws: &mut WebSocket<Box<dyn tiny_http::ReadWrite + Send>>, options: &SessionOptions) -> Result<bool, ()> {
    let mut heard = false;
    loop {
        match ws.read() {
            Ok(Message::Text(_) | Message::Binary(_)) => {
                let _ = ws.write(Message::Text(options.observation_only.clone()));
                finish(ws, close_frame(CloseCode::Policy, "observation_only"));
                return Err(());
            }
            Ok(_) => heard = true, // ping (pong queued), pong, close (reply queued)
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let _ = ws.flush(); // sends a queued pong or close reply
                return Ok(heard);
            }
            Err(_) => return Err(()),
        }
    }
}

/// Sends `close` and waits briefly for the peer's reply.
fn finish(ws: &mut WebSocket<Box<dyn tiny_http::ReadWrite + Send>>, close: CloseFrame) {
    let _ = ws.close(Some(close));
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match ws.read() {
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let _ = ws.flush();
            }
            Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Sleeps in `poll()` until the socket is readable, the waker fires, or `wait` passes.
fn wait_for(socket: &TcpStream, wake_rx: &OwnedFd, wait: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: wake_rx.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let timeout = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
    if n <= 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

fn drain_pipe(wake_rx: &OwnedFd) {
    let mut buf = [0u8; 64];
    // A short read emptied the pipe; a wake written after it only makes poll() return again.
    // SAFETY: reads into a live local buffer from a non-blocking pipe we own.
    while unsafe { libc::read(wake_rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } == buf.len() as isize {}
}
