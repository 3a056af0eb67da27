//! The upstream leg of a remote worker's event stream: a tungstenite client with the token
//! in the `Authorization` header, connect and read timeouts, and ping-based liveness.
//! Diagnostics are passed on with their code and message checked (see [`super::text`]), and
//! so are an event's name and an `error` event's code, message and detail: what the runtime
//! says in its own name. The rest of a payload, the workers' own data, passes as it is.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, Utf8Bytes, WebSocket};

use crate::runtime::frames::{RUNTIME_CURSOR, parse_cursor};
use crate::runtime::handle::{EventSource, Payload, RuntimeError, SourceItem, StreamEnded};
use crate::tls::client::{ClientStream, HandshakeError, TimedTcp, io_reason};
use crate::turns::{Turn, Turns};

use super::RemoteOptions;
use super::text::PrivateText;

/// Socket read timeout: the granularity of `next(wait)`.
const READ_SLICE: Duration = Duration::from_millis(100);

/// The largest frame (and message) read from a runtime. A runtime sends each event in one
/// frame, so tungstenite's default frame limit (16 MiB, below its 64 MiB message limit)
/// would make an event of a large input unreadable; a relay holds at most one such frame.
const MAX_FRAME: usize = 64 << 20;

/// Reading on past this much of one frame takes a turn of [`LARGE_FRAMES`].
const LARGE_FRAME: u64 = 1 << 20;

/// Connections reading or holding a frame larger than [`LARGE_FRAME`] at once, at most.
const LARGE_FRAMES_AT_ONCE: usize = 2;

/// The turns of large frames, across every relay: each may read frames of up to
/// [`MAX_FRAME`], and 16 runtimes sending such frames at once took the gateway past 1.7 GB.
/// A connection keeps its turn until it ends, since its read buffer stays as large as its
/// largest frame (the relay replaces it once quiet, at once when others wait).
static LARGE_FRAMES: Turns = Turns::new(LARGE_FRAMES_AT_ONCE);

/// A large frame still arriving after this long, while others wait for its turn, ends its
/// connection: a runtime trickling one would otherwise keep them waiting for good.
const LARGE_FRAME_TIME: Duration = Duration::from_secs(30);

/// The upstream connection, counting what was read of the message being read: past
/// [`LARGE_FRAME`], reading on waits for a turn of [`LARGE_FRAMES`] (as long as the read's
/// deadline allows; the bytes wait in the kernel meanwhile).
struct Metered {
    stream: ClientStream,
    /// Bytes read since the last whole message.
    read_since_message: u64,
    turn: Option<Turn<'static>>,
    /// Since when the message being read has been larger than [`LARGE_FRAME`].
    large_since: Option<Instant>,
    /// When the last message larger than [`LARGE_FRAME`] was whole.
    large_read_at: Option<Instant>,
    /// A read found every turn taken: the runtime is not silent, its bytes wait for us.
    waited: bool,
}

impl Metered {
    fn new(stream: ClientStream) -> Metered {
        Metered { stream, read_since_message: 0, turn: None, large_since: None, large_read_at: None, waited: false }
    }

    /// A whole message was read: what follows is counted anew.
    fn message_read(&mut self) {
        if self.large_since.take().is_some() {
            self.large_read_at = Some(Instant::now());
        }
        self.read_since_message = 0;
    }

    /// The connection keeps what it grew to for a large message, outside the turns: it will
    /// not be replaced (see [`EventSource::keep_outgrown`]).
    fn keep_large(&mut self) {
        (self.turn, self.large_read_at) = (None, None);
    }

    /// Whether bytes arrived, or were waiting for a turn, since the last call.
    fn take_heard(&mut self) -> bool {
        self.stream.take_received() | std::mem::take(&mut self.waited)
    }

    /// A large frame has held its turn for too long while others want one.
    fn hogs_its_turn(&self) -> bool {
        self.large_since.is_some_and(|since| since.elapsed() > LARGE_FRAME_TIME) && LARGE_FRAMES.wanted()
    }
}

impl Read for Metered {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read_since_message >= LARGE_FRAME {
            if self.turn.is_none() {
                let until = self.stream.deadline().unwrap_or_else(Instant::now);
                let Some(turn) = LARGE_FRAMES.turn(until) else {
                    self.waited = true;
                    return Err(std::io::ErrorKind::WouldBlock.into());
                };
                self.turn = Some(turn);
            }
            self.large_since.get_or_insert_with(Instant::now);
        }
        let n = self.stream.read(buf)?;
        self.read_since_message += n as u64;
        Ok(n)
    }
}

impl Write for Metered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// An open upstream event stream.
pub struct RemoteEvents {
    ws: WebSocket<Metered>,
    /// When the runtime was last heard from: updated lazily, when no item is ready, from
    /// whether any bytes arrived meanwhile ([`ClientStream::take_received`]).
    last_heard: Instant,
    next_ping: Instant,
    /// Silent this long (no data, no pong): dead. Pinged after a third of it.
    silence: Duration,
    /// The socket's mode: switched only when a read needs the other one (one syscall each).
    nonblocking: bool,
    /// Checks what the runtime says in diagnostics.
    private: Arc<PrivateText>,
    /// The worker whose stream this is: an event of another is refused.
    worker_id: String,
    /// The connection's snapshot (its first item) came: a later one is an event.
    opened: bool,
}

/// Connects to `{base_url}{path}`, `worker_id`'s `/v1/workers/{id}/events/ws[?cursor=wo_…]`
/// (`wss://` for an `https://` runtime, with its TLS settings); `private` checks the
/// diagnostics the runtime sends.
pub fn connect(
    options: &RemoteOptions,
    worker_id: &str,
    path: &str,
    private: Arc<PrivateText>,
) -> Result<RemoteEvents, RuntimeError> {
    let connect_timeout = options.connect_timeout;
    let (scheme, rest, default_port) = match options.base_url.split_once("://") {
        Some(("http", rest)) => ("ws", rest, 80),
        Some(("https", rest)) => ("wss", rest, 443),
        _ => return Err(RuntimeError::Unreachable("invalid events URL".into())),
    };
    let ws_url = format!("{scheme}://{rest}{path}");
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = split_authority(authority, default_port);
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| RuntimeError::Unreachable("name resolution failed".into()))?;
    // Connecting, the TLS handshake and the upgrade share the connect budget.
    let deadline = Instant::now() + connect_timeout;
    let tcp = TcpStream::connect_timeout(&addr, connect_timeout).map_err(|e| io_error(&e, connect_timeout))?;
    tcp.set_write_timeout(Some(connect_timeout)).map_err(|e| io_error(&e, connect_timeout))?;
    let _ = tcp.set_nodelay(true);
    // `RemoteRuntime::start` gives every https runtime TLS settings.
    let tcp = TimedTcp::new(tcp, Some(deadline));
    let stream = match (&options.tls, scheme) {
        (Some(tls), "wss") => tls.connect(host, tcp).map_err(|e| match e {
            HandshakeError::Tls(reason) => RuntimeError::Unreachable(reason.into()),
            HandshakeError::Io(e) => io_error(&e, connect_timeout),
        })?,
        _ => ClientStream::Plain(tcp),
    };
    let mut request =
        ws_url.into_client_request().map_err(|_| RuntimeError::Unreachable("invalid events URL".into()))?;
    request.headers_mut().insert(super::client::EXTENSIONS_HEADER, tungstenite::http::HeaderValue::from_static("1"));
    if let Some(token) = &options.token {
        let value = format!("Bearer {}", token.expose())
            .parse()
            .map_err(|_| RuntimeError::Unreachable("the token is not a valid header value".into()))?;
        request.headers_mut().insert("Authorization", value);
    }
    // tungstenite zeroes its whole read buffer before each read: 128 KiB by default.
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 << 10)
        .max_frame_size(Some(MAX_FRAME))
        .max_message_size(Some(MAX_FRAME));
    let handshake = tungstenite::client::client_with_config(request, Metered::new(stream), Some(config));
    let (mut ws, _) = handshake.map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => match resp.status().as_u16() {
            401 | 403 => RuntimeError::AuthFailed,
            404 => RuntimeError::WorkerNotFound,
            405 | 501 => RuntimeError::Unsupported,
            status => RuntimeError::HttpStatus { status, code: None, message: None },
        },
        tungstenite::HandshakeError::Failure(tungstenite::Error::Io(e)) => match io_reason(&e) {
            Some(reason) => RuntimeError::Unreachable(reason.into()),
            None => io_error(&e, connect_timeout),
        },
        // The connect budget (the upgrade is part of connecting) ran out in the middle of
        // the handshake: the runtime is slow, not wrong.
        tungstenite::HandshakeError::Interrupted(_) => RuntimeError::Timeout(connect_timeout.as_millis() as u64),
        tungstenite::HandshakeError::Failure(_) => RuntimeError::Malformed("the events upgrade failed".into()),
    })?;
    ws.get_mut().message_read();
    ws.get_mut().stream.set_deadline(None);
    ws.get_ref().stream.tcp().set_read_timeout(Some(READ_SLICE)).map_err(|e| io_error(&e, connect_timeout))?;
    let now = Instant::now();
    Ok(RemoteEvents {
        ws,
        last_heard: now,
        next_ping: now + options.event_silence / 3,
        silence: options.event_silence,
        nonblocking: false,
        private,
        worker_id: worker_id.to_owned(),
        opened: false,
    })
}

/// Host (an IPv6 literal without its brackets) and port of `host[:port]`.
fn split_authority(authority: &str, default_port: u16) -> (&str, u16) {
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or((bracketed, ""), |(h, rest)| (h, rest)),
        None => authority.split_once(':').map_or((authority, ""), |(h, p)| (h, p)),
    };
    (host, port.trim_start_matches(':').parse().unwrap_or(default_port))
}

fn io_error(e: &std::io::Error, budget: Duration) -> RuntimeError {
    use std::io::ErrorKind;
    // The gateway out of descriptors: its own overload, not the runtime's failure.
    if crate::http::sockets::out_of_descriptors(e) {
        return RuntimeError::Overloaded;
    }
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => RuntimeError::Timeout(budget.as_millis() as u64),
        ErrorKind::ConnectionRefused => RuntimeError::Unreachable("connection refused".into()),
        kind => RuntimeError::Unreachable(format!("network error: {kind}")),
    }
}

#[derive(Deserialize)]
struct Frame<'a> {
    kind: &'a str,
    #[serde(borrow)]
    envelope: Option<EnvelopeIn<'a>>,
    diagnostic: Option<DiagnosticIn>,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    cursor: &'a str,
    #[serde(default, borrow)]
    worker_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

#[derive(Deserialize)]
struct DiagnosticIn {
    code: String,
    #[serde(default)]
    message: Option<serde_json::Value>,
}

/// A payload's `event` name as a browser reads it: escapes decoded, the last of repeated
/// keys, and keys or names with lone surrogates (which `JSON.parse` accepts) read too;
/// `None` when the payload is not an object or its `event` is not a string.
struct EventName(Option<Vec<u8>>);

impl<'de> Deserialize<'de> for EventName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = EventName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event payload")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut name = None;
                while let Some(key) = map.next_key::<Wtf8>()? {
                    if key.0 == b"event" {
                        let value: &RawValue = map.next_value()?;
                        name = serde_json::from_str::<Wtf8>(value.get()).ok().map(|name| name.0);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(EventName(name))
            }
        }
        deserializer.deserialize_map(Names)
    }
}

/// A JSON string's text with its escapes decoded, as bytes: a lone surrogate is kept (as
/// WTF-8) where a Rust string would refuse it.
struct Wtf8(Vec<u8>);

impl<'de> Deserialize<'de> for Wtf8 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Wtf8;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Wtf8, E> {
                Ok(Wtf8(bytes.to_vec()))
            }
            fn visit_str<E>(self, text: &str) -> Result<Wtf8, E> {
                Ok(Wtf8(text.as_bytes().to_vec()))
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

/// Whether `payload` is a `snapshot` event as a browser would read it. Only a payload that
/// spells "snapshot" or holds a `\u` escape (which can spell it) can be one: others skip
/// the second parse.
fn is_snapshot(payload: &RawValue) -> bool {
    let text = payload.get();
    (text.contains("snapshot") || text.contains("\\u"))
        && serde_json::from_str::<EventName>(text).is_ok_and(|name| name.0.as_deref() == Some(b"snapshot"))
}

/// The greeting of a snapshot payload; `None` when it has none, or not in its documented
/// shape (it is then read as a base runtime's).
fn greeting(payload: &RawValue) -> Option<GreetingPeek> {
    #[derive(Deserialize)]
    struct Snapshot {
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    struct Data {
        greeting: Option<GreetingPeek>,
    }
    serde_json::from_str::<Snapshot>(payload.get()).ok()?.data?.greeting
}

/// The greeting's extension fields; a base greeting has none of them.
#[derive(Deserialize)]
struct GreetingPeek {
    #[serde(default)]
    boot_id: Option<String>,
    #[serde(default)]
    durable_cursors: bool,
    #[serde(default)]
    cursor_honoured: Option<bool>,
    #[serde(default)]
    store_id: Option<String>,
}

/// Parses one upstream text frame of `worker_id`'s stream; an event's payload stays in
/// `text` (unless its checks changed it).
fn parse(text: Utf8Bytes, worker_id: &str, private: &PrivateText) -> Result<Option<SourceItem>, &'static str> {
    match parse_text(&text, worker_id, private)? {
        Some(Parsed::Event { seq, payload }) => {
            if let Some(rewritten) = checked_payload(payload, private)? {
                let whole = 0..rewritten.len();
                let payload = Payload::new(rewritten.into(), whole).ok_or("an event payload out of place")?;
                return Ok(Some(SourceItem::Event { seq, payload }));
            }
            // The payload borrows from `text`: where it starts there is its offset.
            let start = (payload.get().as_ptr() as usize).checked_sub(text.as_str().as_ptr() as usize);
            let range = start.map(|start| start..start + payload.get().len());
            let payload = range.and_then(|range| Payload::new(text, range)).ok_or("an event payload out of place")?;
            Ok(Some(SourceItem::Event { seq, payload }))
        }
        Some(Parsed::Item(item)) => Ok(Some(item)),
        None => Ok(None),
    }
}

/// Stands in for an event name that is not a plain name (control characters, markup, a
/// private string): event names are the runtime's words, not its workers' data.
pub const UNRECOGNISED_EVENT: &str = "unrecognised_event";

/// `payload` with what the runtime says in its own name checked ([`super::text`]): a payload
/// whose `event` is not a plain name (or that has none) is passed on as
/// [`UNRECOGNISED_EVENT`] alone; an `error` event keeps only its `code` and `detail` (plain
/// codes), its `message` (cleaned like a diagnostic's) and its `turn`. `None` when nothing
/// needs a change: every event of this program's runtimes but their errors, found without
/// parsing the payload again.
fn checked_payload(payload: &RawValue, private: &PrivateText) -> Result<Option<String>, &'static str> {
    let text = payload.get();
    // This program's layout: the name first, no other `event` key (repeated keys: a browser
    // reads the last one), not even one spelt with `\u` escapes (the only escapes that can
    // spell a letter).
    let first = text.strip_prefix(r#"{"event":""#).and_then(|rest| rest.split_once('"'));
    if let Some((name, rest)) = first
        && name != "error"
        && private.is_plain_code(name)
        && !rest.contains(r#""event""#)
        && !rest.contains("\\u")
    {
        return Ok(None);
    }
    let name = serde_json::from_str::<EventName>(text).ok().and_then(|n| n.0);
    let name = name.as_deref().map(String::from_utf8_lossy);
    match name.as_deref() {
        Some("error") => {}
        Some(name) if private.is_plain_code(name) => return Ok(None),
        // Not a plain name, no name, or not an object at all: nothing of it is passed on but
        // that it came (as with a payload serde_json cannot hold: a lone surrogate).
        _ => return Ok(Some(format!(r#"{{"event":"{UNRECOGNISED_EVENT}"}}"#))),
    }
    // An error is the runtime's words throughout: its code, message and detail, checked,
    // and its turn.
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let data = value.get("data").and_then(serde_json::Value::as_object);
    let said = |key: &str| data.and_then(|d| d.get(key)).and_then(serde_json::Value::as_str);
    let mut checked = serde_json::Map::new();
    checked.insert("code".into(), private.code(said("code").unwrap_or_default()).into());
    checked.insert("message".into(), said("message").and_then(|m| private.message(m)).unwrap_or_default().into());
    if let Some(detail) = said("detail") {
        checked.insert("detail".into(), private.code(detail).into());
    }
    if let Some(turn) = data.and_then(|d| d.get("turn")).and_then(serde_json::Value::as_u64) {
        checked.insert("turn".into(), turn.into());
    }
    let error = serde_json::json!({"event": "error", "data": checked});
    serde_json::to_string(&error).map(Some).map_err(|_| "an event payload that cannot be written again")
}

/// A frame read: an event (its payload a part of the frame) or any other item.
enum Parsed<'a> {
    Event { seq: u64, payload: &'a RawValue },
    Item(SourceItem),
}

fn parse_text<'a>(text: &'a str, worker_id: &str, private: &PrivateText) -> Result<Option<Parsed<'a>>, &'static str> {
    if let Some((seq, payload)) = plain_event(text, worker_id) {
        return Ok(Some(Parsed::Event { seq, payload }));
    }
    let frame: Frame<'_> = serde_json::from_str(text).map_err(|_| "a frame is not a JSON event or diagnostic")?;
    match (frame.kind, frame.envelope, frame.diagnostic) {
        ("event", Some(envelope), _) => {
            // Never shown as this worker's: a runtime that mixes up its streams is wrong.
            if envelope.worker_id.is_some_and(|id| id != worker_id) {
                return Err("an event of another worker");
            }
            let seq = parse_cursor(RUNTIME_CURSOR, envelope.cursor).ok_or("an event has no valid cursor")?;
            if is_snapshot(envelope.payload) {
                let greeting = greeting(envelope.payload);
                return Ok(Some(Parsed::Item(SourceItem::Snapshot {
                    position: seq,
                    boot_id: greeting.as_ref().and_then(|g| g.boot_id.clone()),
                    durable: greeting.as_ref().is_some_and(|g| g.durable_cursors),
                    cursor_honoured: greeting.as_ref().and_then(|g| g.cursor_honoured),
                    store_id: greeting.and_then(|g| g.store_id),
                })));
            }
            Ok(Some(Parsed::Event { seq, payload: envelope.payload }))
        }
        ("diagnostic", _, Some(d)) => {
            // A code that fails the check is passed on as `runtime.unrecognised_code`.
            let code = match private.code(&d.code) {
                code if code == d.code => code,
                generic => format!("runtime.{generic}"),
            };
            let said = d.message.as_ref().and_then(|m| m.as_str()).and_then(|m| private.message(m));
            let message = match said {
                Some(said) => format!("the runtime reported {code}: {said}"),
                None => format!("the runtime reported {code}"),
            };
            Ok(Some(Parsed::Item(SourceItem::Diagnostic { code, message })))
        }
        ("event", None, _) => Err("an event frame has no envelope"),
        ("diagnostic", _, None) => Err("a diagnostic frame has no diagnostic"),
        _ => Ok(None), // unknown frame kinds are ignored
    }
}

/// An event frame in the layout this program's runtime writes, read without a general JSON
/// parse (it is most of a relay's work otherwise):
/// `{"kind":"event","envelope":{"cursor":C,"event_id":C,"worker_id":W,"payload":P}}`, C a
/// runtime cursor, W `worker_id` as it is, P one JSON value (checked: it is all that
/// is passed on) and no snapshot. Anything else, even equivalent JSON, is `None` and takes
/// [`parse`]'s general way.
fn plain_event<'a>(text: &'a str, worker_id: &str) -> Option<(u64, &'a RawValue)> {
    let rest = text.strip_prefix(r#"{"kind":"event","envelope":{"cursor":""#)?;
    let (cursor, rest) = rest.split_at_checked(RUNTIME_CURSOR.len() + 16)?;
    let seq = parse_cursor(RUNTIME_CURSOR, cursor)?;
    let rest = rest.strip_prefix(r#"","event_id":""#)?.strip_prefix(cursor)?.strip_prefix(r#"","worker_id":""#)?;
    let rest = rest.strip_prefix(worker_id)?.strip_prefix('"')?;
    let payload = rest.strip_prefix(r#","payload":"#)?.strip_suffix("}}")?;
    let payload: &RawValue = serde_json::from_str(payload).ok()?;
    (!is_snapshot(payload)).then_some((seq, payload))
}

impl RemoteEvents {
    fn set_nonblocking(&mut self, on: bool) -> Result<(), StreamEnded> {
        if self.nonblocking == on {
            return Ok(());
        }
        let tcp = self.ws.get_ref().stream.tcp();
        tcp.set_nonblocking(on).map_err(|_| StreamEnded::Broken("cannot configure the connection".into()))?;
        self.nonblocking = on;
        Ok(())
    }

    /// The next item within `wait` (the socket blocks up to [`READ_SLICE`] per read).
    fn read_item(&mut self, wait: Duration) -> Result<Option<SourceItem>, StreamEnded> {
        use StreamEnded::{Broken, Unreadable};
        // The clock is read only when no item is ready: twice per event showed in profiles.
        let deadline = (!wait.is_zero()).then(|| Instant::now() + wait);
        // A frame trickling in does not hold the read past the wait (the checks below run).
        self.ws.get_mut().stream.set_deadline(deadline);
        loop {
            let read = self.ws.read();
            if read.is_ok() {
                self.ws.get_mut().message_read();
            }
            match read {
                Ok(Message::Text(text)) => {
                    if let Some(item) = parse(text, &self.worker_id, &self.private).map_err(|e| Unreadable(e.into()))? {
                        return Ok(Some(self.in_place(item)));
                    }
                }
                // tungstenite reports a close with a code WebSocket does not allow as 1002.
                Ok(Message::Close(Some(close))) if close.code == CloseCode::Protocol => {
                    return Err(Unreadable(
                        "a close frame reporting a protocol violation (1002, or a code WebSocket does not allow)"
                            .into(),
                    ));
                }
                Ok(Message::Close(_)) => return Err(Broken("the runtime closed the stream".into())),
                Ok(Message::Binary(_)) => return Err(Unreadable("a binary frame (events are JSON text)".into())),
                Ok(_) => {} // ping (pong queued) or pong
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::Capacity(_)) => {
                    return Err(Unreadable(format!("a frame is larger than {} MiB", MAX_FRAME >> 20)));
                }
                Err(tungstenite::Error::Utf8(_)) => return Err(Unreadable("a text frame is not UTF-8".into())),
                // A reset is the connection's end; any other violation is in the frames.
                Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake)) => {
                    return Err(Broken("the connection to the runtime broke".into()));
                }
                Err(tungstenite::Error::Protocol(_)) => {
                    return Err(Unreadable("a frame breaks the WebSocket protocol".into()));
                }
                Err(_) => return Err(Broken("the connection to the runtime broke".into())),
            }
            let now = Instant::now();
            // Any bytes count, part of a frame too: a large event arriving slowly is not silence.
            if self.ws.get_mut().take_heard() {
                self.last_heard = now;
            } else if now.duration_since(self.last_heard) > self.silence {
                return Err(Broken("the runtime went silent".into()));
            }
            if self.ws.get_ref().hogs_its_turn() {
                let secs = LARGE_FRAME_TIME.as_secs();
                return Err(Unreadable(format!("a frame over 1 MiB took longer than {secs} s to arrive")));
            }
            if now >= self.next_ping {
                self.next_ping = now + self.silence / 3;
                let ping = self.ws.send(Message::Ping(Default::default()));
                ping.map_err(|_| Broken("cannot ping the runtime".into()))?;
            } else {
                let _ = self.ws.flush(); // queued pongs
            }
            if deadline.is_none_or(|d| now >= d) {
                return Ok(None);
            }
        }
    }
}

impl RemoteEvents {
    /// A snapshot after the connection's first is an event the gateway cannot show as one
    /// (browsers take a snapshot for the whole state): its place is kept, as an event only
    /// said to have come, never skipped in silence.
    fn in_place(&mut self, item: SourceItem) -> SourceItem {
        match item {
            SourceItem::Snapshot { position, .. } if self.opened => {
                let text = format!(r#"{{"event":"{UNRECOGNISED_EVENT}"}}"#);
                let payload = Payload::new(text.clone().into(), 0..text.len());
                payload.map_or(item, |payload| SourceItem::Event { seq: position, payload })
            }
            item => {
                if matches!(item, SourceItem::Snapshot { .. }) {
                    // A large snapshot (the worker's newest entry is large) comes again on any
                    // connection: replacing this one would only read it again, for as long as
                    // the worker is watched. Its memory stays with the connection, and its
                    // turn is given back.
                    self.ws.get_mut().keep_large();
                }
                self.opened |= matches!(item, SourceItem::Snapshot { .. } | SourceItem::Event { .. });
                item
            }
        }
    }
}

/// Whether a relay waits for a turn of [`LARGE_FRAMES`]: one whose connection holds a turn
/// replaces it as soon as its stream is quiet.
pub fn large_frames_wanted() -> bool {
    LARGE_FRAMES.wanted()
}

impl EventSource for RemoteEvents {
    fn outgrown_since(&self) -> Option<Instant> {
        self.ws.get_ref().large_read_at
    }

    fn keep_outgrown(&mut self) {
        self.ws.get_mut().keep_large();
    }

    fn next(&mut self, wait: Duration) -> Result<Option<SourceItem>, StreamEnded> {
        // A zero wait takes only what is ready (tungstenite keeps a partly read frame for the
        // next call). A burst is read with zero waits, so the mode rarely changes.
        self.set_nonblocking(wait.is_zero())?;
        self.read_item(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("rt.example:8443", 443), ("rt.example", 8443));
        assert_eq!(split_authority("rt.example", 443), ("rt.example", 443));
        assert_eq!(split_authority("[::1]:9", 80), ("::1", 9));
        assert_eq!(split_authority("[::1]", 80), ("::1", 80));
        assert_eq!(split_authority("127.0.0.1:38800", 80), ("127.0.0.1", 38800));
    }

    use crate::runtime::remote::text::UNRECOGNISED_CODE;

    fn private() -> PrivateText {
        PrivateText::new("http://ev-host.example:4711", Some(&Secret::new("tok-ev")))
    }

    fn diagnostic(frame: serde_json::Value) -> (String, String) {
        match parse(frame.to_string().into(), "w", &private()) {
            Ok(Some(SourceItem::Diagnostic { code, message })) => (code, message),
            other => panic!("{other:?}"),
        }
    }

    fn event(text: &str) -> Option<(u64, String)> {
        match parse(text.to_owned().into(), "w", &private()) {
            Ok(Some(SourceItem::Event { seq, payload })) => Some((seq, payload.get().to_owned())),
            _ => None,
        }
    }

    /// What the quick reading accepts, the general one reads the same; what it refuses
    /// still goes the general way.
    #[test]
    fn the_quick_reading_of_events_agrees_with_the_general_one() {
        let payload = r#"{"event":"text_delta","data":{"turn":3,"text":"w \"x\" }}"}}"#;
        let ours = crate::runtime::frames::event_frame(
            "wo_00000000000012ab",
            "wo_00000000000012ab",
            None,
            "w",
            &*RawValue::from_string(payload.to_owned()).unwrap(),
        );
        assert_eq!(
            plain_event(ours.as_str(), "w").map(|(seq, p)| (seq, p.get().to_owned())),
            Some((0x12ab, payload.into()))
        );
        assert_eq!(event(ours.as_str()), Some((0x12ab, payload.into())));
        let general = [
            // Another field order, spacing, an escaped id, no event id: valid, read generally.
            r#"{"envelope":{"payload":{"event":"x"},"cursor":"wo_0000000000000001"},"kind":"event"}"#,
            r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","event_id":"wo_0000000000000001","worker_id":"\u0077","payload":{"event":"x"}}}"#,
            r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","payload":{"event":"x"}}}"#,
            r#"{"kind":"event", "envelope":{"cursor":"wo_0000000000000001","payload":{"event":"x"}}}"#,
        ];
        for text in general {
            assert!(plain_event(text, "w").is_none(), "{text}");
            assert_eq!(event(text), Some((1, r#"{"event":"x"}"#.into())), "{text}");
        }
        let refused = [
            // A payload that is not one value, a cursor that differs from its id, a snapshot.
            r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","event_id":"wo_0000000000000001","worker_id":"w","payload":{"event":"x"},"kind":"y"}}"#,
            r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","event_id":"wo_0000000000000001","worker_id":"w","payload":{"event":"x"}}}}"#,
            r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","event_id":"wo_0000000000000001","worker_id":"w","payload":{"event":"x"}"#,
        ];
        for text in refused {
            assert!(plain_event(text, "w").is_none(), "{text}");
        }
        let other_id = r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","event_id":"wo_0000000000000002","worker_id":"w","payload":{"event":"x"}}}"#;
        assert!(plain_event(other_id, "w").is_none());
        let snapshot = r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","event_id":"wo_0000000000000001","worker_id":"w","payload":{"event":"snapshot","data":{}}}}"#;
        assert!(plain_event(snapshot, "w").is_none());
        assert!(matches!(parse(snapshot.into(), "w", &private()), Ok(Some(SourceItem::Snapshot { position: 1, .. }))));
    }

    /// An event of another worker is never read as this worker's, however it is written (a
    /// runtime that sent one had its events shown under the watched worker's id).
    #[test]
    fn an_event_of_another_worker_is_refused() {
        let plain = r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","event_id":"wo_0000000000000001","worker_id":"w-2","payload":{"event":"x"}}}"#;
        let general =
            r#"{"envelope":{"worker_id":"w-2","payload":{"event":"x"},"cursor":"wo_0000000000000001"},"kind":"event"}"#;
        let snapshot = r#"{"kind":"event","envelope":{"cursor":"wo_0000000000000001","worker_id":"w-2","payload":{"event":"snapshot"}}}"#;
        for text in [plain, general, snapshot] {
            assert!(matches!(parse(text.into(), "w", &private()), Err("an event of another worker")), "{text}");
        }
    }

    /// What a runtime says in its own name in an event is checked like its diagnostics; the
    /// rest of a payload passes as it is.
    #[test]
    fn event_names_and_error_events_are_checked() {
        let frame = |payload: &str| {
            format!(
                r#"{{"kind":"event","envelope":{{"cursor":"wo_0000000000000007","event_id":"wo_0000000000000007","worker_id":"w","payload":{payload}}}}}"#
            )
        };
        let read = |payload: &str| -> serde_json::Value {
            let (_, text) = event(&frame(payload)).expect("an event");
            serde_json::from_str(&text).expect("JSON")
        };
        // Plain events, the workers' data in them untouched, not even re-encoded.
        let plain = r#"{"event":"text_delta","data":{"text":"\u001b[31m http://ev-host.example:4711 tok-ev <b>"}}"#;
        assert_eq!(event(&frame(plain)).map(|(_, text)| text), Some(plain.to_owned()));
        // An error's code, detail and message are the runtime's words.
        let error = read(
            r#"{"event":"error","data":{"code":"tok-ev","detail":"Bad Detail","message":"failed at http://ev-host.example:4711/v1 with Bearer tok-ev\u202e\r\n","turn":2}}"#,
        );
        assert_eq!(error["event"], "error");
        assert_eq!(error["data"]["code"], UNRECOGNISED_CODE);
        assert_eq!(error["data"]["detail"], UNRECOGNISED_CODE);
        assert_eq!(error["data"]["message"], "failed at <backend-private>/v1 with Bearer <backend-private>");
        assert_eq!(error["data"]["turn"], 2);
        let fine = read(r#"{"event":"error","data":{"code":"tool_error","message":"exit status 2"}}"#);
        assert_eq!(fine["data"], serde_json::json!({"code":"tool_error","message":"exit status 2"}));
        // An error is the runtime's words throughout: what else it holds is not passed on.
        let extra = read(
            r#"{"event":"error","data":{"code":"x","message":"m","extra":"tok-ev","inner":{"message":"tok-ev"}},"more":"tok-ev"}"#,
        );
        assert_eq!(extra, serde_json::json!({"event":"error","data":{"code":"x","message":"m"}}));
        for data in [r#""http://ev-host.example:4711 tok-ev""#, r#"["tok-ev"]"#, "4711", "null"] {
            let odd = read(&format!(r#"{{"event":"error","data":{data}}}"#));
            assert_eq!(odd["data"], serde_json::json!({"code": UNRECOGNISED_CODE, "message": ""}), "{data}");
        }
        // Names that are not plain names, however they are spelled, and repeated.
        for odd in [
            r#"{"event":"\u202eevil\u001b[0m\r\n<script>","data":{}}"#,
            r#"{"event":"text_delta","event":"<b>x</b>","data":{}}"#,
            r#"{"data":{},"event":"tok-ev"}"#,
            r#"{"event":7,"data":{"message":"tok-ev"}}"#,
            r#"{"event":null}"#,
            r#"{"event":["error"],"data":{"message":"tok-ev"}}"#,
            r#"{"data":{"message":"tok-ev"}}"#,
            r#"{"event":"status","data":{},"ev\u0065nt":"xtok-ev"}"#,
        ] {
            assert_eq!(read(odd), serde_json::json!({"event": UNRECOGNISED_EVENT}), "{odd}");
        }
        let spelt = read(r#"{"event":"status","data":{"message":"tok-ev"},"\u0065vent":"error"}"#);
        assert_eq!(
            spelt,
            serde_json::json!({"event":"error","data":{"code":UNRECOGNISED_CODE,"message":"<backend-private>"}})
        );
        let repeated = read(r#"{"event":"text_delta","data":{},"event":"error"}"#);
        assert_eq!(repeated["event"], "error", "read as a browser reads it: the last");
    }

    /// A snapshot is known as a browser would read it (escapes, repeated keys); an odd
    /// payload that mentions "snapshot" is an event, and an odd greeting is no greeting:
    /// neither ends the stream.
    #[test]
    fn snapshots_are_known_however_they_are_spelled() {
        let frame = |payload: &str| {
            format!(
                r#"{{"kind":"event","envelope":{{"cursor":"wo_0000000000000007","event_id":"wo_0000000000000007","worker_id":"w","payload":{payload}}}}}"#
            )
        };
        let snapshots = [
            r#"{"event":"snaps\u0068ot","data":{"greeting":{"boot_id":"b-2"}}}"#,
            r#"{"event":"x","event":"snapshot","data":{"greeting":{"boot_id":"b-2"}}}"#,
            r#"{"data":{"greeting":{"boot_id":"b-2"}},"event":"\u0073napshot"}"#,
        ];
        for payload in snapshots {
            match parse(frame(payload).into(), "w", &private()) {
                Ok(Some(SourceItem::Snapshot { position: 7, boot_id, .. })) => {
                    assert_eq!(boot_id.as_deref(), Some("b-2"))
                }
                other => panic!("{payload}: {other:?}"),
            }
        }
        // Lone surrogates, which a browser reads and a Rust string does not; and a greeting
        // in another shape: a snapshot without greeting.
        let odd = [
            r#"{"event":"snapshot","\ud800":1,"data":{"greeting":{"boot_id":"b-2"}}}"#,
            r#"{"\udc00x":1,"event":"snaps\u0068ot"}"#,
            r#"{"event":"snapshot","data":{"greeting":1}}"#,
        ];
        for payload in odd {
            assert!(
                matches!(
                    parse(frame(payload).into(), "w", &private()),
                    Ok(Some(SourceItem::Snapshot { position: 7, boot_id: None, durable: false, .. }))
                ),
                "{payload}"
            );
        }
        let events = [r#"{"event":"x","data":{"greeting":1,"t":"snapshot"}}"#, r#"{"event":"snapshot","event":"x"}"#];
        for payload in events {
            assert_eq!(event(&frame(payload)), Some((7, payload.to_owned())), "{payload}");
        }
        for nameless in [r#"{"event":["snapshot"]}"#, r#""snapshot""#] {
            assert_eq!(event(&frame(nameless)), Some((7, format!(r#"{{"event":"{UNRECOGNISED_EVENT}"}}"#))));
        }
        let odd_name = event(&frame(r#"{"event":"snapshot\ud800","data":{"\udc00":1}}"#));
        assert_eq!(odd_name, Some((7, format!(r#"{{"event":"{UNRECOGNISED_EVENT}"}}"#))));
    }

    #[test]
    fn diagnostics_are_passed_on_checked() {
        let (code, message) = diagnostic(serde_json::json!({"kind": "diagnostic",
            "diagnostic": {"code": "runtime.cursor_malformed", "message": "cursor `x` is malformed"}}));
        assert_eq!(code, "runtime.cursor_malformed");
        assert_eq!(message, "the runtime reported runtime.cursor_malformed: cursor `x` is malformed");
        for hostile in ["runtime.p4711", "Runtime.X", "tok-ev", "runtime.ev-host.example", ""] {
            let (code, message) = diagnostic(serde_json::json!({"kind": "diagnostic",
                "diagnostic": {"code": hostile, "message": "via http://ev-host.example:4711 and tok-ev\nx"}}));
            assert_eq!(code, "runtime.unrecognised_code", "{hostile}");
            assert_eq!(
                message,
                "the runtime reported runtime.unrecognised_code: via <backend-private> and <backend-private>x"
            );
        }
        let (_, message) =
            diagnostic(serde_json::json!({"kind": "diagnostic", "diagnostic": {"code": "runtime.x", "message": 7}}));
        assert_eq!(message, "the runtime reported runtime.x");
    }

    /// Past a MiB of one message, reading on takes a turn of [`LARGE_FRAMES`]; with none
    /// free, the read waits until its deadline and does not happen (the bytes wait in the
    /// kernel: the runtime is heard, not silent). The turn stays with the connection after
    /// the message (its buffer is that large) until the relay lets it go.
    #[test]
    fn reading_past_a_mib_of_one_message_takes_a_turn_the_connection_keeps() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let tcp = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut runtime, _) = listener.accept().expect("accept");
        let mut metered = Metered::new(ClientStream::Plain(TimedTcp::new(tcp, None)));
        let sender = std::thread::spawn(move || runtime.write_all(&vec![b'x'; (1 << 20) + 10]).map(|()| runtime));
        let mut buf = vec![0; 64 << 10];
        while metered.read_since_message < LARGE_FRAME {
            let want = (LARGE_FRAME - metered.read_since_message).min(buf.len() as u64) as usize;
            let _ = metered.read(&mut buf[..want]).expect("the first MiB reads freely"); // counted
        }
        assert!(metered.turn.is_none());
        let soon = || Instant::now() + Duration::from_millis(50);
        let others = [LARGE_FRAMES.turn(soon()), LARGE_FRAMES.turn(soon())];
        assert!(others.iter().all(Option::is_some), "every turn taken elsewhere");
        metered.take_heard();
        metered.stream.set_deadline(Some(soon()));
        let refused = metered.read(&mut buf).expect_err("no turn, no read");
        assert_eq!(refused.kind(), std::io::ErrorKind::WouldBlock);
        assert!(metered.take_heard(), "waiting for a turn is not the runtime's silence");
        drop(others);
        metered.stream.set_deadline(Some(Instant::now() + Duration::from_secs(5)));
        assert!(metered.read(&mut buf).expect("a turn, then the rest") > 0);
        metered.message_read();
        assert!(metered.turn.is_some() && metered.large_read_at.is_some(), "kept after the message");
        drop(metered);
        let again = [LARGE_FRAMES.turn(soon()), LARGE_FRAMES.turn(soon())];
        assert!(again.iter().all(Option::is_some), "given back with the connection");
        drop(sender.join().expect("sender"));
    }
}
