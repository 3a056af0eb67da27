//! `Incoming`: one request as handlers see it — headers, bounded body reading, JSON in.

use std::io::{ErrorKind, Read};

use serde::de::DeserializeOwned;

use super::error::{ApiError, visible};

/// How long a request body may take to arrive, in all.
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// A request handed to a [`super::Service`], with its request id and body limit.
pub struct Incoming {
    request: Option<tiny_http::Request>,
    /// The request as the connection guard knows it (see [`super::guard`]).
    taken: super::guard::Taken,
    /// This request's id (`X-Request-Id`).
    pub request_id: String,
    max_body_bytes: u64,
    body_read: bool,
    /// The connection must end after the answer (see [`Incoming::ends_connection`]).
    ends_connection: bool,
    local_port: u16,
    remote_addr: Option<std::net::SocketAddr>,
    /// The server's load: whether other requests wait for a handler.
    load: std::sync::Arc<super::server::HttpMetrics>,
}

impl Incoming {
    /// Wraps a tiny_http request.
    pub fn new(
        request: tiny_http::Request,
        taken: super::guard::Taken,
        request_id: String,
        max_body_bytes: u64,
        local_port: u16,
        load: std::sync::Arc<super::server::HttpMetrics>,
    ) -> Self {
        let remote_addr = request.remote_addr().copied();
        Incoming {
            request: Some(request),
            taken,
            request_id,
            max_body_bytes,
            body_read: false,
            ends_connection: false,
            local_port,
            remote_addr,
            load,
        }
    }

    /// The port this server listens on.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// The client's address.
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.remote_addr
    }

    /// The request method, upper-case (`GET`); empty once the request was taken. `HEAD`
    /// reads as `GET`: a handler answers it as one, and the HTTP layer sends the head of
    /// that answer without its body (monitors probe with HEAD).
    pub fn method(&self) -> &str {
        match self.request.as_ref().map(|r| r.method()) {
            Some(tiny_http::Method::Head) => "GET",
            method => method.map_or("", |m| m.as_str()),
        }
    }

    /// Whether the request is a HEAD (which [`Incoming::method`] reads as GET).
    pub fn is_head(&self) -> bool {
        self.request.as_ref().is_some_and(|r| *r.method() == tiny_http::Method::Head)
    }

    /// The raw request target (path and query); empty once the request was taken.
    pub fn url(&self) -> &str {
        self.request.as_ref().map_or("", |r| r.url())
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        Some(self.request.as_ref()?.headers().get(name)?.as_str())
    }

    /// Whether header `name` occurs more than once: where a check reads one value, another
    /// would pass unread.
    pub fn header_repeated(&self, name: &str) -> bool {
        self.request.as_ref().is_some_and(|r| header_count(r.headers(), name) > 1)
    }

    /// The `Idempotency-Key` header of a create or input: a retry with the same key is
    /// answered with the first one's result instead of being applied again. 400 when it is
    /// not `[A-Za-z0-9_:.-]{1,120}`.
    pub fn idempotency_key(&self) -> Result<Option<String>, ApiError> {
        match self.header("idempotency-key") {
            None => Ok(None),
            Some(key) if super::router::valid_id(key) => Ok(Some(key.to_owned())),
            Some(_) => {
                Err(ApiError::bad_request("invalid_request", "Idempotency-Key must be 1 to 120 of A-Z a-z 0-9 _ : . -"))
            }
        }
    }

    /// True when the client declared a body (non-zero length, or chunked).
    pub fn has_body(&self) -> bool {
        match self.body_length() {
            Some(n) => n > 0,
            None => self.header("transfer-encoding").is_some(),
        }
    }

    /// The declared `Content-Length` (`None` for chunked or none).
    pub fn body_length(&self) -> Option<usize> {
        self.request.as_ref()?.body_length()
    }

    /// True when the declared body was not fully read (false once the request was taken
    /// for an upgrade).
    pub fn body_unread(&self) -> bool {
        self.has_body() && !self.body_read
    }

    /// Whether the connection must end after the answer: a body that tiny_http did not read
    /// eagerly was left unread, or a chunked body was read with shortened timeouts (its end is
    /// known only once read, and tiny_http may then already wait for the next request head
    /// under them).
    pub fn ends_connection(&self) -> bool {
        self.ends_connection || (self.body_unread() && self.body_length().is_none_or(|n| n > super::server::EAGER_BODY))
    }

    /// Takes the tiny_http request out (for a WebSocket upgrade); the server then sends nothing.
    pub fn take(&mut self) -> Option<tiny_http::Request> {
        self.request.take()
    }

    /// Gives the request back to the server to answer (for `HttpServer`), with its guard
    /// note, which goes once it is answered.
    pub(crate) fn into_parts(self) -> (Option<tiny_http::Request>, super::guard::Taken) {
        (self.request, self.taken)
    }

    /// Reads the whole body, at most the configured limit, within [`BODY_DEADLINE`] (else 408
    /// `request_timeout`): 413 `payload_too_large` when the
    /// declared length is larger (checked before reading) or the body grows past it.
    pub fn read_body(&mut self) -> Result<Vec<u8>, ApiError> {
        let limit = self.max_body_bytes;
        let too_large =
            || ApiError::new(413, "payload_too_large", format!("request body is larger than {limit} bytes"));
        let request = self.request.as_mut().ok_or_else(|| ApiError::internal("the request was already taken"))?;
        if request.body_length().is_some_and(|declared| declared as u64 > limit) {
            return Err(too_large());
        }
        // A body tiny_http did not read eagerly is read from the socket: each read is bounded
        // here, and the guard learns where the body ends.
        let socket = match self.taken.body_unread() {
            true => self.remote_addr.and_then(|peer| super::sockets::find_socket(peer, self.local_port)),
            false => None,
        };
        self.ends_connection = socket.is_some() && request.body_length().is_none();
        let read = read_by_deadline(request, limit, socket.as_ref(), &self.load);
        if let Some(socket) = &socket {
            // Back to the connection's own timeout, for its next request head.
            let _ = socket.set_read_timeout(Some(super::sockets::CONNECTION_TIMEOUT));
        }
        let body = read?;
        if body.len() as u64 > limit {
            return Err(too_large());
        }
        self.body_read = true;
        if self.taken.body_unread() {
            self.taken.body_read(socket.as_ref());
        }
        Ok(body)
    }

    /// Requires `Content-Type: application/json` (415) and parses the body as `T` (400
    /// `invalid_json`, naming the field and the reason).
    pub fn read_json<T: DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        self.require_json_type()?;
        let body = self.read_body()?;
        parse_json(&body)
    }

    /// Like [`Incoming::read_json`], but an absent/empty body gives `T::default()`.
    pub fn read_optional_json<T: DeserializeOwned + Default>(&mut self) -> Result<T, ApiError> {
        if self.has_body() {
            self.require_json_type()?;
        }
        self.read_optional_json_of_any_type()
    }

    /// Like [`Incoming::read_optional_json`], whatever the `Content-Type` says: the Runtime
    /// API asks for the type on create and input only.
    pub fn read_optional_json_of_any_type<T: DeserializeOwned + Default>(&mut self) -> Result<T, ApiError> {
        if !self.has_body() {
            return Ok(T::default());
        }
        let body = self.read_body()?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        parse_json(&body)
    }

    fn require_json_type(&self) -> Result<(), ApiError> {
        let is_json = self
            .header("content-type")
            .is_some_and(|ct| ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
        if is_json {
            Ok(())
        } else {
            Err(ApiError::new(
                415,
                "unsupported_media_type",
                "the request body must be JSON (Content-Type: application/json)",
            ))
        }
    }
}

/// Why `request`'s body framing is refused, if it is: `Transfer-Encoding` other than exactly
/// `chunked`, together with `Content-Length`, or repeated; `Content-Length` that is not a
/// plain number, or repeated. A request smuggled behind such framing must never run, so the
/// server answers 400 and closes the connection unread.
pub fn framing_problem(request: &tiny_http::Request) -> Option<&'static str> {
    let headers = request.headers();
    let value = |name: &str| headers.get(name).map(|v| v.as_str());
    let (te, cl) = (value("transfer-encoding"), value("content-length"));
    if te.is_some() && cl.is_some() {
        return Some("Content-Length and Transfer-Encoding together are refused");
    }
    // Repeats are counted only when the header is there at all: most requests have neither.
    if let Some(te) = te {
        if !te.trim().eq_ignore_ascii_case("chunked") || header_count(headers, "transfer-encoding") > 1 {
            return Some("the only Transfer-Encoding accepted is `chunked`, once");
        }
    }
    let plain_number = |v: &str| !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit());
    if let Some(cl) = cl {
        if !plain_number(cl) || header_count(headers, "content-length") > 1 {
            return Some("Content-Length must be one plain number, once");
        }
    }
    None
}

/// How often header `name` occurs. tiny_http_fork's `Headers` offers lookups of the first
/// occurrence only, but its `Debug` lists every header as `field: HeaderField(Ascii("Name"))`
/// (checked by a test, with the crate's version pinned): values are printed with their quotes
/// escaped, so they cannot fake a field.
fn header_count(headers: &tiny_http::Headers, name: &str) -> usize {
    let listing = format!("{headers:?}").to_ascii_lowercase();
    let needle = format!("field: headerfield(ascii({:?}))", name.to_ascii_lowercase());
    listing.matches(&needle).count()
}

/// Reads `request`'s body (at most `limit + 1` bytes) by [`BODY_DEADLINE`], not only between
/// reads: a body that stops coming would otherwise hold its handler until the connection's
/// 30 s read timeout, and then get tiny_http's bare 400. With `socket` (the connection, for a
/// body of known length read from it) each read waits at most until the deadline, and a body
/// still coming after [`SLOW_BODY`] is not waited for while the server is short of handlers
/// (other requests wait for one: a few clients holding bodies back, or trickling them, would
/// otherwise hold every handler for the whole deadline, again and again) or of descriptors
/// (held open, such bodies would leave none for anyone else).
///
/// A body of known length is read to its last byte and no further: once a body reader returns
/// its end, tiny_http reads the next request head on its own thread, which must find the
/// connection's own timeout restored (by the caller) first. A chunked body's end is known
/// only when its reader returns it, so its connection ends after the answer
/// ([`Incoming::ends_connection`]). Its decoder takes up a read that timed out between
/// chunks or within one, which is where senders pause; one that timed out within a chunk's
/// size line fails the body (400).
fn read_by_deadline(
    request: &mut tiny_http::Request,
    limit: u64,
    socket: Option<&std::net::TcpStream>,
    load: &super::server::HttpMetrics,
) -> Result<Vec<u8>, ApiError> {
    let started = std::time::Instant::now();
    let deadline = started + BODY_DEADLINE;
    let late = |why: String| ApiError::new(408, "request_timeout", why);
    let past_deadline = || late(format!("the request body did not arrive within {} s", BODY_DEADLINE.as_secs()));
    let declared = request.body_length();
    let mut body = Vec::new();
    let mut reader = request.as_reader().take(limit + 1);
    let mut chunk = [0u8; 16 * 1024];
    while declared != Some(body.len()) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(past_deadline());
        }
        if let Some(socket) = socket {
            if started.elapsed() >= SLOW_BODY {
                if let Some(what) = short_of(load) {
                    log::warn!("answered 408 to a request body still coming after 1 s while {what} are short");
                    return Err(late(format!("the request body came too slowly while this server is short of {what}")));
                }
            }
            // Woken at least each second, to look again.
            let _ = socket.set_read_timeout(Some(left.min(SLOW_BODY)));
        }
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) if std::time::Instant::now() >= deadline => return Err(past_deadline()),
            Err(e) => {
                return Err(ApiError::bad_request("invalid_request", format!("could not read the request body: {e}")));
            }
        }
    }
    Ok(body)
}

/// What the server is short of, if anything: handlers (requests wait for one) or descriptors.
fn short_of(load: &super::server::HttpMetrics) -> Option<&'static str> {
    if load.requests_waiting() {
        Some("handlers")
    } else if super::sockets::descriptors_short() {
        Some("open files")
    } else {
        None
    }
}

/// A body read for longer than this is not waited for while the server is short of handlers
/// or descriptors (nor is a request head that stopped coming while it is short of
/// descriptors, see [`super::guard::STALLED_HEAD`]).
const SLOW_BODY: std::time::Duration = std::time::Duration::from_secs(1);

/// Parses JSON with a message that names the field (its path, as `profile` or `intent.kind`)
/// and the reason, in words a client can act on.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut parser = serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut parser);
    let parsed = parsed.map_err(|e| (e.path().to_string(), e.into_inner()));
    match parsed.and_then(|value| parser.end().map(|()| value).map_err(|e| (".".to_owned(), e))) {
        Ok(value) => Ok(value),
        Err((field, e)) => Err(ApiError::bad_request("invalid_json", body_problem(body, &field, &e))),
    }
}

/// Why `body` did not parse: not JSON at all (where), not an object, or which field is wrong.
fn body_problem(body: &[u8], field: &str, e: &serde_json::Error) -> String {
    // Asked only once the body failed: whether it is JSON at all, as serde_json's own
    // category cannot tell (a number where a name is expected reads as a syntax error).
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        return match body.iter().all(u8::is_ascii_whitespace) {
            true => "request body is empty: a JSON object is expected".to_owned(),
            false => format!("request body is not JSON (line {}, column {})", e.line(), e.column()),
        };
    }
    if body.trim_ascii_start().first() != Some(&b'{') {
        return "request body must be a JSON object".to_owned();
    }
    // serde's wording, without its position (the field says where) and its jargon.
    let said = e.to_string();
    let said = said.rsplit_once(" at line ").map_or(said.as_str(), |(reason, _)| reason);
    let said = match said {
        "expected value" => "a value of the wrong type".to_owned(),
        // serde_json's words for `\ud800` alone: "unexpected end of hex escape" and the like.
        said if said.contains("escape") || said.contains("surrogate") => {
            "a string holds an escape that is no character (a `\\u` escape of half a surrogate pair)".to_owned()
        }
        said => said.replace("expected variant identifier", "expected one of the names it takes"),
    };
    // Keys and names come from the client: shown without hidden characters, and short.
    let (field, said) = (visible(field, 120), visible(&said, 240));
    match field.as_str() {
        "." => format!("request body is not valid: {said}"),
        field => format!("request body is not valid: `{field}`: {said}"),
    }
}

#[cfg(test)]
mod tests {
    use super::header_count;

    #[test]
    fn every_occurrence_of_a_header_is_counted_and_values_cannot_fake_one() {
        let headers = tiny_http::Headers::try_from(vec![
            ("Content-Length", "1"),
            ("X-Trick", "field: HeaderField(Ascii(\"Content-Length\"))"),
            ("content-length", "2"),
            ("Transfer-Encoding", "chunked"),
        ])
        .expect("valid headers");
        assert_eq!(header_count(&headers, "Content-Length"), 2);
        assert_eq!(header_count(&headers, "transfer-encoding"), 1);
        assert_eq!(header_count(&headers, "X-Missing"), 0);
    }
}
