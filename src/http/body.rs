//! `Incoming`: one request as handlers see it — headers, bounded body reading, JSON in.

use std::io::Read;

use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A request handed to a [`super::Service`], with its request id and body limit.
pub struct Incoming {
    request: Option<tiny_http::Request>,
    /// This request's id (`X-Request-Id`).
    pub request_id: String,
    max_body_bytes: u64,
    body_read: bool,
    local_port: u16,
    remote_addr: Option<std::net::SocketAddr>,
}

impl Incoming {
    /// Wraps a tiny_http request.
    pub fn new(request: tiny_http::Request, request_id: String, max_body_bytes: u64, local_port: u16) -> Self {
        let remote_addr = request.remote_addr().copied();
        Incoming { request: Some(request), request_id, max_body_bytes, body_read: false, local_port, remote_addr }
    }

    /// The port this server listens on.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// The client's address.
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.remote_addr
    }

    /// The request method, upper-case (`GET`); empty once the request was taken.
    pub fn method(&self) -> &str {
        self.request.as_ref().map_or("", |r| r.method().as_str())
    }

    /// The raw request target (path and query); empty once the request was taken.
    pub fn url(&self) -> &str {
        self.request.as_ref().map_or("", |r| r.url())
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let request = self.request.as_ref()?;
        request
            .headers()
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// True when the client declared a body (non-zero length, or chunked).
    pub fn has_body(&self) -> bool {
        match self.request.as_ref().and_then(|r| r.body_length()) {
            Some(n) => n > 0,
            None => self.header("transfer-encoding").is_some(),
        }
    }

    /// True when the declared body was not fully read (false once the request was taken
    /// for an upgrade).
    pub fn body_unread(&self) -> bool {
        self.has_body() && !self.body_read
    }

    /// Takes the tiny_http request out (for a WebSocket upgrade); the server then sends nothing.
    pub fn take(&mut self) -> Option<tiny_http::Request> {
        self.request.take()
    }

    /// Gives the request back to the server to answer (for `HttpServer`).
    pub(crate) fn into_request(self) -> Option<tiny_http::Request> {
        self.request
    }

    /// Reads the whole body, at most the configured limit: 413 `payload_too_large` when the
    /// declared length is larger (checked before reading) or the body grows past it.
    pub fn read_body(&mut self) -> Result<Vec<u8>, ApiError> {
        let limit = self.max_body_bytes;
        let too_large =
            || ApiError::new(413, "payload_too_large", format!("request body is larger than {limit} bytes"));
        let request = self.request.as_mut().ok_or_else(|| ApiError::internal("the request was already taken"))?;
        if request.body_length().is_some_and(|declared| declared as u64 > limit) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        request
            .as_reader()
            .take(limit + 1)
            .read_to_end(&mut body)
            .map_err(|e| ApiError::bad_request("invalid_request", format!("could not read the request body: {e}")))?;
        if body.len() as u64 > limit {
            return Err(too_large());
        }
        self.body_read = true;
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
        if !self.has_body() {
            return Ok(T::default());
        }
        self.require_json_type()?;
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

/// Parses JSON with a message that names the field and the reason.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("request body is not valid: {e}")))
}
