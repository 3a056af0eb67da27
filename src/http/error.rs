//! `ApiError`: one typed error → one JSON envelope, for both servers.

use serde_json::{Map, Value, json};

/// An error answered to a client: status, stable `code`, and a message built by this program.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable snake_case code (the tables of gateway-api.md / runtime-api.md).
    pub code: &'static str,
    /// Human-readable message; never carries a remote URL, host or token.
    pub message: String,
    /// Optional context (boxed: errors travel in `Result`s on every path).
    pub extra: Box<ErrorExtra>,
}

/// The optional parts of an [`ApiError`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorExtra {
    /// The runtime the request addressed, when known.
    pub runtime_id: Option<String>,
    /// The worker the request addressed, when known.
    pub worker_id: Option<String>,
    /// The remote runtime's own error code, when it rejected the request.
    pub upstream_code: Option<String>,
    /// The remote runtime's own explanation, when it rejected the request (scrubbed of
    /// anything backend-private by the remote handle).
    pub upstream_message: Option<String>,
    /// The remote runtime's HTTP status, for `remote_runtime_http_error`.
    pub upstream_status: Option<u16>,
    /// Seconds for a `Retry-After` header (503).
    pub retry_after: Option<u32>,
    /// Methods for an `Allow` header (405).
    pub allow: Option<&'static str>,
    /// The request may have been applied: repeating it is not safe without its
    /// idempotency key, whatever the status says.
    pub maybe_applied: bool,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), extra: Box::default() }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    /// 404 `not_found` for an unknown route.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(404, "not_found", format!("no route for {}", printable(path)))
    }

    /// 405 `method_not_allowed`, with the methods the path accepts.
    pub fn method_not_allowed(method: &str, allow: &'static str) -> Self {
        let mut e = Self::new(
            405,
            "method_not_allowed",
            format!("method {} is not allowed here; use {allow}", printable(method)),
        );
        e.extra.allow = Some(allow);
        e
    }

    /// 503 `overloaded` with a `Retry-After`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(503, "overloaded", message);
        e.extra.retry_after = Some(1);
        e
    }

    /// 503 `shutting_down`: a request that arrived once shutdown began (on a connection
    /// opened before); in-flight ones still finish.
    pub fn shutting_down() -> Self {
        let message = "the server is shutting down and takes no new requests; retry once it is back";
        let mut e = Self::new(503, "shutting_down", message);
        e.extra.retry_after = Some(1);
        e
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// Attaches the runtime id (and worker id, when there is one).
    pub fn at(mut self, runtime_id: &str, worker_id: Option<&str>) -> Self {
        self.extra.runtime_id = Some(runtime_id.to_owned());
        self.extra.worker_id = worker_id.map(str::to_owned);
        self
    }

    /// Whether retrying the same request later may succeed: a server error, a full input
    /// queue, a worker still ending its turn; not when a remote runtime refused it with a
    /// client error (4xx other than 408 and 429), which a retry gets again.
    pub fn retryable(&self) -> bool {
        let refused_as_such =
            self.extra.upstream_status.is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429);
        !self.extra.maybe_applied
            && !refused_as_such
            && (matches!(self.status, 502..=504) || matches!(self.code, "worker_busy" | "worker_running"))
    }

    /// The JSON envelope: `{"error":{…},"request_id":…}`.
    pub fn to_json(&self, request_id: &str) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        if let Some(rid) = &self.extra.runtime_id {
            error.insert("runtime_id".into(), json!(rid));
        }
        if let Some(wid) = &self.extra.worker_id {
            error.insert("worker_id".into(), json!(wid));
        }
        if let Some(code) = &self.extra.upstream_code {
            error.insert("upstream_code".into(), json!(code));
        }
        if let Some(message) = &self.extra.upstream_message {
            error.insert("upstream_message".into(), json!(message));
        }
        if let Some(status) = self.extra.upstream_status {
            error.insert("upstream_status".into(), json!(status));
        }
        error.insert("retryable".into(), json!(self.retryable()));
        json!({"error": error, "request_id": request_id})
    }
}

/// Shortens and escapes client-supplied text before it goes into a message or a log line.
pub fn printable(text: &str) -> String {
    let mut out: String = text.chars().take(120).flat_map(char::escape_default).collect();
    if text.chars().count() > 120 {
        out.push('…');
    }
    out
}

/// Characters a message loses: controls (C0, DEL, C1), line and paragraph separators, and
/// characters that show nothing or could hide or reorder text: zero-width characters and
/// joiners, the soft hyphen, bidirectional marks, overrides and isolates, Hangul fillers,
/// Mongolian and Khmer vowel separators and inherents, combining grapheme joiner, variation
/// selectors and tag characters.
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{034f}'
                | '\u{061c}'
                | '\u{115f}'..='\u{1160}'
                | '\u{17b4}'..='\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

/// Client-supplied `text` as an error message may carry it: without the characters that
/// show nothing or could hide or reorder text ([`hidden`]), and at most `most` characters.
pub fn visible(text: &str, most: usize) -> String {
    let mut shown = text.chars().filter(|c| !hidden(*c));
    let mut out: String = shown.by_ref().take(most).collect();
    if shown.next().is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_carries_ids_and_retryable() {
        let e = ApiError::new(504, "remote_runtime_timeout", "slow").at("lab", Some("w1"));
        let v = e.to_json("r-1");
        assert_eq!(v["error"]["code"], "remote_runtime_timeout");
        assert_eq!(v["error"]["runtime_id"], "lab");
        assert_eq!(v["error"]["worker_id"], "w1");
        assert_eq!(v["error"]["retryable"], true);
        assert_eq!(v["request_id"], "r-1");
    }

    #[test]
    fn printable_escapes_and_truncates() {
        assert_eq!(printable("a\r\nb"), "a\\r\\nb");
        assert_eq!(printable(&"x".repeat(500)).chars().count(), 121);
    }
}
