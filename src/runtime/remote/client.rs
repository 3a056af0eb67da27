//! The ureq side of a remote runtime: one shared `Agent`, per-call budgets, every body read
//! to the end, and every outcome classified into a [`RuntimeError`] that names no host,
//! port or token (the remote's own code and message are checked first: see [`super::text`]).

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::runtime::handle::RuntimeError;
use crate::runtime::types::WorkerStatus;
use crate::secret::Secret;
use crate::turns::Turns;

use super::text::PrivateText;

/// The most of a 2xx answer read, by what it holds (its key): a listing or a transcript page
/// may be large (150 000 workers: 61 MB); a runtime summary (what every probe reads), a
/// worker or an acknowledgement is small. An answer past it is not read on.
fn answer_limit(key: &str) -> u64 {
    match key {
        "workers" | "transcript" => 64 << 20,
        "runtime" => 256 << 10,
        _ => 1 << 20,
    }
}

/// Answers read past this size take turns ([`LARGE_READS`]): calls to many runtimes at once
/// (a listing asks 16) hold at most this much each, however large what they answer.
const LARGE_ANSWER: u64 = 1 << 20;

/// Answers larger than [`LARGE_ANSWER`] read on at the same time, at most.
const LARGE_READS_AT_ONCE: usize = 2;

/// The turns of large answers: with hostile or huge runtimes, a listing of 16 would
/// otherwise hold 16 × 64 MiB.
static LARGE_READS: Turns = Turns::new(LARGE_READS_AT_ONCE);

/// Most of an error answer's body read from a runtime: one past it is answered by its
/// status alone (`remote_runtime_http_error`).
const MAX_ERROR_BYTES: u64 = 1 << 20;

/// Input and output buffer of each connection to a runtime (bodies stream through them).
const CONNECTION_BUFFER: usize = 16 << 10;

/// A pooled connection idle longer than this is not reused: past the probes' interval (5 s
/// ± 10 %), below the 8 s after which our runtime closes it (see
/// [`crate::http::guard::IDLE_CLOSE`]).
const IDLE_REUSE: std::time::Duration = std::time::Duration::from_secs(7);

/// An HTTP client for one runtime's base URL.
pub struct Client {
    agent: ureq::Agent,
    base_url: String,
    token: Option<Secret>,
    private: Arc<PrivateText>,
}

/// Asks a runtime for every extension value (the gateway understands them all).
pub const EXTENSIONS_HEADER: &str = "X-Worker-Runtime-Extensions";

/// What the operation was: for classifying a rejection, and for telling whether a failure
/// after the request left may mean it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation<'a> {
    /// A read (`GET`): a 400 about what the client supplied (the worker id, the query) is
    /// the client's; any other (as our runtime's TLS port answers plain HTTP) is the
    /// runtime's problem, answered as one (502). The gateway checks a read's query first.
    Read,
    /// Lifecycle calls: idempotent, safe to retry.
    Lifecycle,
    /// `POST /v1/workers`, with its idempotency key.
    Create(Option<&'a str>),
    /// `POST …/input` (a 400 `invalid_request` may mean "not running"), with its key.
    Input(Option<&'a str>),
}

impl Client {
    /// A client with its own connection pool (`max_idle_connections`); `private` checks
    /// the codes and messages of the runtime's error answers.
    pub fn new(options: &super::RemoteOptions, private: Arc<PrivateText>) -> Client {
        let max_idle = options.max_idle_connections;
        let mut config = ureq::Agent::config_builder()
            .timeout_connect(Some(options.connect_timeout))
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .max_idle_connections(max_idle)
            .max_idle_connections_per_host(max_idle)
            // Below the 8 s after which our runtime's server closes an idle connection: a
            // request never goes out on a connection being closed under it.
            .max_idle_age(IDLE_REUSE)
            // Each pooled connection keeps both buffers (128 KiB each by default): with
            // hundreds of runtimes that is most of the gateway's memory.
            .input_buffer_size(CONNECTION_BUFFER)
            .output_buffer_size(CONNECTION_BUFFER)
            .user_agent("worker-gateway");
        if let Some(tls) = &options.tls {
            config = config.tls_config(tls.ureq());
        }
        let agent = super::resolver::agent(config.build());
        Client { agent, base_url: options.base_url.clone(), token: options.token.clone(), private }
    }

    /// Sends `method path` with an optional JSON body within `budget`; returns the decoded
    /// value under `key` of a 2xx body.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: &str,
        budget: Duration,
        operation: Operation<'_>,
    ) -> Result<T, RuntimeError> {
        let key_header = match operation {
            Operation::Create(key) | Operation::Input(key) => key,
            Operation::Read | Operation::Lifecycle => None,
        };
        // Past this point a create or input may have been applied, whatever went wrong.
        let maybe_applied = |error: RuntimeError| match operation {
            Operation::Read | Operation::Lifecycle => error,
            _ => RuntimeError::MaybeApplied(Box::new(error)),
        };
        let (status, bytes) = self
            .send(method, path, body, budget, key_header, answer_limit(key))
            .map_err(|(error, sent)| if sent { maybe_applied(error) } else { error })?;
        if (200..300).contains(&status) {
            return decode(&bytes, key).map_err(maybe_applied);
        }
        Err(classify_status(status, &bytes, operation, &self.private))
    }

    /// Sends a request (with `Idempotency-Key: idempotency_key` when given) and reads the whole
    /// response body (so the connection is reused), a 2xx one up to `limit`. A failure says
    /// whether the request may have reached the runtime.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        budget: Duration,
        idempotency_key: Option<&str>,
        limit: u64,
    ) -> Result<(u16, Vec<u8>), (RuntimeError, bool)> {
        let started = Instant::now();
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base_url))
            .header(EXTENSIONS_HEADER, "1");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {}", token.expose()));
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let payload = match body {
            Some(value) => {
                request = request.header("Content-Type", "application/json");
                serde_json::to_vec(value)
                    .map_err(|e| (RuntimeError::Malformed(format!("cannot encode the request: {e}")), false))?
            }
            None => Vec::new(),
        };
        let request =
            request.body(payload).map_err(|_| (RuntimeError::Unreachable("invalid request URL".into()), false))?;
        let request = self.agent.configure_request(request).timeout_global(Some(budget)).build();
        let mut response = self.agent.run(request).map_err(|e| classify_transport(e, budget))?;
        let status = response.status().as_u16();
        let bytes = if (200..300).contains(&status) {
            read_answer(response.body_mut(), limit, started + budget)
        } else {
            // An error's body is a code and a message: what is past the bound is left unread
            // (and the connection is not reused), not held in memory to be cut to 512
            // characters.
            let mut bytes = Vec::new();
            let read = response.body_mut().as_reader().take(MAX_ERROR_BYTES).read_to_end(&mut bytes);
            read.map(|_| bytes).map_err(ureq::Error::Io)
        }
        .map_err(|e| classify_transport(e, budget))?;
        log::debug!("remote {method} {path} → {status} in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
        Ok((status, bytes))
    }
}

/// Reads a 2xx answer up to `limit`: its first [`LARGE_ANSWER`] bytes at once, the rest in
/// a turn of [`LARGE_READS`] (waited for until `deadline`).
fn read_answer(body: &mut ureq::Body, limit: u64, deadline: Instant) -> Result<Vec<u8>, ureq::Error> {
    let mut reader = body.with_config().limit(limit).reader();
    let mut bytes = Vec::new();
    (&mut reader).take(LARGE_ANSWER).read_to_end(&mut bytes)?;
    if bytes.len() as u64 == LARGE_ANSWER {
        let _turn = LARGE_READS.turn(deadline).ok_or(ureq::Error::Timeout(ureq::Timeout::Global))?;
        reader.read_to_end(&mut bytes)?;
    }
    Ok(bytes)
}

/// Maps a transport failure, and says whether the request may have reached the runtime
/// (only a refused or failed connection, a failed name lookup or TLS handshake, or a connect
/// timeout prove it did not). Only error *kinds* are used: ureq's and rustls's texts may
/// carry the host.
fn classify_transport(error: ureq::Error, budget: Duration) -> (RuntimeError, bool) {
    use std::io::ErrorKind;
    // A refused certificate ends the handshake: nothing was sent. Other TLS failures may
    // come after the request left.
    let tls = match &error {
        ureq::Error::Rustls(e) => Some((crate::tls::client::reason(e), false)),
        ureq::Error::Io(e) => e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|tls| (crate::tls::client::reason(tls), !matches!(tls, rustls::Error::InvalidCertificate(_)))),
        _ => None,
    };
    if let Some((reason, sent)) = tls {
        return (RuntimeError::Unreachable(reason.into()), sent);
    }
    // The gateway out of descriptors for a new connection: its own overload, not the
    // runtime's failure (its health stays as it was), and nothing was sent.
    if let ureq::Error::Io(e) = &error
        && crate::http::sockets::out_of_descriptors(e)
    {
        return (RuntimeError::Overloaded, false);
    }
    let sent = match &error {
        ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect) => false,
        ureq::Error::Io(e) => e.kind() != ErrorKind::ConnectionRefused,
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed | ureq::Error::Tls(_) => false,
        _ => true,
    };
    let error = match error {
        ureq::Error::Timeout(_) => RuntimeError::Timeout(budget.as_millis() as u64),
        ureq::Error::Io(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            RuntimeError::Timeout(budget.as_millis() as u64)
        }
        ureq::Error::Io(e) => RuntimeError::Unreachable(match e.kind() {
            ErrorKind::ConnectionRefused => "connection refused".into(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                "connection reset".into()
            }
            ErrorKind::UnexpectedEof => "connection closed before an answer".into(),
            kind => format!("network error: {kind}"),
        }),
        ureq::Error::HostNotFound => RuntimeError::Unreachable("name resolution failed".into()),
        ureq::Error::ConnectionFailed => RuntimeError::Unreachable("connection failed".into()),
        ureq::Error::Protocol(_) | ureq::Error::LargeResponseHeader(..) => {
            RuntimeError::Malformed("the answer is not valid HTTP".into())
        }
        ureq::Error::BodyExceedsLimit(_) => RuntimeError::Malformed("the answer is too large".into()),
        ureq::Error::Tls(_) => RuntimeError::Unreachable("TLS: the handshake with the runtime failed".into()),
        _ => RuntimeError::Unreachable("request failed".into()),
    };
    (error, sent)
}

/// Decodes `{"<key>": T}`.
fn decode<T: DeserializeOwned>(bytes: &[u8], key: &str) -> Result<T, RuntimeError> {
    // Straight into `T`, not through a `Value` tree: a listing of 150 000 workers (61 MB)
    // took the gateway to 840 MB that way.
    let body: std::collections::HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_slice(bytes).map_err(|_| RuntimeError::Malformed("the body is not a JSON object".into()))?;
    let inner = body.get(key).ok_or_else(|| RuntimeError::Malformed(format!("no `{key}` in the body")))?;
    serde_json::from_str(inner.get())
        .map_err(|e| RuntimeError::Malformed(format!("`{key}` has the wrong shape: {}", shape_hint(&e))))
}

/// What was wrong with a body, without quoting it: serde's "invalid type/value" messages
/// repeat the remote's values (which may hold anything); "missing field" names our field.
fn shape_hint(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.strip_prefix("missing field ") {
        Some(rest) => format!("missing field {}", rest.split(' ').next().unwrap_or("")),
        None => format!("unexpected content at line {} column {}", error.line(), error.column()),
    }
}

/// The remote's `error.code` and `error.message`, checked, when the body is a Runtime API
/// error (a code that fails the check is replaced by a generic one, a message is scrubbed).
fn error_body(bytes: &[u8], private: &PrivateText) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
        return (None, None);
    };
    let error = value.get("error");
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_str).map(|c| private.code(c));
    let message = error.and_then(|e| e.get("message")).and_then(Value::as_str).and_then(|m| private.message(m));
    (code, message)
}

/// Maps a non-2xx answer onto the gateway's error table.
fn classify_status(status: u16, bytes: &[u8], operation: Operation, private: &PrivateText) -> RuntimeError {
    let (code, message) = error_body(bytes, private);
    let rejected = |error: RuntimeError, code: &str| RuntimeError::Rejected {
        error: Box::new(error),
        upstream_code: code.to_owned(),
        upstream_message: message.clone(),
    };
    match (status, code.as_deref()) {
        (401 | 403, _) => RuntimeError::AuthFailed,
        (404, Some("worker_not_found")) => RuntimeError::WorkerNotFound,
        (405 | 501, _) => RuntimeError::Unsupported,
        (400, Some("limit_too_large")) => rejected(RuntimeError::LimitTooLarge(None), "limit_too_large"),
        (400, Some("invalid_request")) if matches!(operation, Operation::Input(_)) => {
            rejected(RuntimeError::WorkerNotRunning(WorkerStatus::Stopped), "invalid_request")
        }
        (400, Some(c))
            if !matches!(operation, Operation::Read) || matches!(c, "invalid_worker_id" | "invalid_query") =>
        {
            rejected(RuntimeError::InvalidRequest(format!("the runtime rejected the request ({c})")), c)
        }
        (409, Some("worker_busy")) => rejected(RuntimeError::WorkerBusy, "worker_busy"),
        (409, Some("worker_running")) => rejected(RuntimeError::WorkerRunning, "worker_running"),
        (409, Some("runtime_stopped")) => rejected(RuntimeError::RuntimeStopped, "runtime_stopped"),
        (413, Some(c)) => rejected(RuntimeError::PayloadTooLarge, c),
        (422, Some("idempotency_key_reused")) => rejected(RuntimeError::KeyReused, "idempotency_key_reused"),
        (503, Some("overloaded")) => rejected(RuntimeError::Overloaded, "overloaded"),
        _ => RuntimeError::HttpStatus { status, code, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::remote::text::UNRECOGNISED_CODE;

    /// A gateway out of descriptors for a new connection is its own overload (503, retry,
    /// the runtime's health untouched), not the runtime unreachable; nothing was sent.
    #[test]
    fn a_gateway_out_of_descriptors_is_overloaded_not_the_runtime_unreachable() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            let error = ureq::Error::Io(std::io::Error::from_raw_os_error(errno));
            assert_eq!(classify_transport(error, Duration::from_secs(1)), (RuntimeError::Overloaded, false));
        }
    }

    fn private() -> PrivateText {
        PrivateText::new("http://rt-host.example:4711", Some(&Secret::new("tok-c1")))
    }

    fn classify(status: u16, bytes: &[u8], operation: Operation) -> RuntimeError {
        classify_status(status, bytes, operation, &private())
    }

    #[test]
    fn statuses_map_onto_the_table() {
        let body = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#).into_bytes();
        let http = |status, code: Option<&str>, message: Option<&str>| RuntimeError::HttpStatus {
            status,
            code: code.map(str::to_owned),
            message: message.map(str::to_owned),
        };
        assert_eq!(classify(401, b"", Operation::Lifecycle), RuntimeError::AuthFailed);
        assert_eq!(classify(403, b"<html>", Operation::Lifecycle), RuntimeError::AuthFailed);
        assert_eq!(classify(404, &body("worker_not_found"), Operation::Lifecycle), RuntimeError::WorkerNotFound);
        assert_eq!(classify(404, b"", Operation::Lifecycle), http(404, None, None));
        assert_eq!(classify(501, b"", Operation::Lifecycle), RuntimeError::Unsupported);
        assert!(matches!(classify(409, &body("worker_busy"), Operation::Lifecycle), RuntimeError::Rejected { .. }));
        match classify(400, &body("invalid_request"), Operation::Input(None)) {
            RuntimeError::Rejected { error, upstream_code, upstream_message } => {
                assert!(matches!(*error, RuntimeError::WorkerNotRunning(_)));
                assert_eq!((upstream_code.as_str(), upstream_message.as_deref()), ("invalid_request", Some("m")));
            }
            other => panic!("{other:?}"),
        }
        let weird = classify(418, &body("bad code with spaces"), Operation::Lifecycle);
        assert_eq!(weird, http(418, Some(UNRECOGNISED_CODE), Some("m")), "unsafe codes are not carried");
        assert_eq!(classify(500, b"{\"error\":{\"code\":7}}", Operation::Lifecycle), http(500, None, None));
        // A read the gateway checked first: a 400 is the runtime's problem.
        assert_eq!(
            classify(400, &body("invalid_request"), Operation::Read),
            http(400, Some("invalid_request"), Some("m"))
        );
        assert!(matches!(classify(400, &body("limit_too_large"), Operation::Read), RuntimeError::Rejected { .. }));
        // A runtime at its limit did nothing: the gateway's own 503, retryable, not a 502.
        let busy = classify(503, &body("overloaded"), Operation::Input(None));
        assert_eq!(busy.gateway_status(), (503, "overloaded"), "{busy:?}");
        let reused = classify(422, &body("idempotency_key_reused"), Operation::Create(Some("k")));
        assert_eq!(reused.gateway_status(), (422, "idempotency_key_reused"), "{reused:?}");
    }

    #[test]
    fn a_rejection_carries_the_remote_explanation_checked() {
        let said =
            br#"{"error":{"code":"invalid_request","message":"unknown profile `upper`; this runtime has: echo"}}"#;
        let e = classify(400, said, Operation::Lifecycle);
        let RuntimeError::Rejected { upstream_code, upstream_message, .. } = &e else { panic!("{e:?}") };
        assert_eq!(upstream_code, "invalid_request");
        assert_eq!(upstream_message.as_deref(), Some("unknown profile `upper`; this runtime has: echo"));
        assert!(e.to_string().ends_with("(the runtime said: unknown profile `upper`; this runtime has: echo)"), "{e}");

        let hostile =
            br#"{"error":{"code":"e4711","message":"at http://rt-host.example:4711 with tok-c1\r\nforged: line"}}"#;
        let e = classify(400, hostile, Operation::Lifecycle);
        let RuntimeError::Rejected { upstream_code, upstream_message, .. } = &e else { panic!("{e:?}") };
        assert_eq!(upstream_code, UNRECOGNISED_CODE);
        assert_eq!(upstream_message.as_deref(), Some("at <backend-private> with <backend-private>forged: line"));
        let e = classify(503, hostile, Operation::Lifecycle);
        let text = e.to_string();
        assert!(!text.contains("rt-host") && !text.contains("4711") && !text.contains("tok-c1"), "{text}");
    }

    #[test]
    fn bodies_must_be_the_runtime_api() {
        assert!(matches!(decode::<u32>(b"<html>", "x"), Err(RuntimeError::Malformed(_))));
        assert!(matches!(decode::<u32>(br#"{"y":1}"#, "x"), Err(RuntimeError::Malformed(_))));
        assert!(matches!(decode::<u32>(br#"{"x":"one"}"#, "x"), Err(RuntimeError::Malformed(_))));
        assert_eq!(decode::<u32>(br#"{"x":1}"#, "x"), Ok(1));
        let quoted = decode::<u32>(br#"{"x":"http://secret-host:1"}"#, "x").unwrap_err();
        assert!(!quoted.to_string().contains("secret-host"), "{quoted}");
    }
}
