//! The `RuntimeHandle` trait: the one thing the gateway routes a `runtime_id` to.

use std::fmt;

use super::types::{
    CreateWorker, InputAck, LifecycleAck, RuntimeSummary, Transcript, WorkerDetail, WorkerInput, WorkerStatus,
    WorkerSummary,
};

/// Largest transcript page a runtime serves.
pub const MAX_TRANSCRIPT_LIMIT: u64 = 256;

/// Checks a transcript page's `limit` (1 to [`MAX_TRANSCRIPT_LIMIT`]) as every runtime kind
/// does, so a remote one answers a bad limit as the embedded one does, without asking.
pub fn check_transcript_limit(limit: u64) -> RuntimeResult<()> {
    match limit {
        0 => Err(RuntimeError::InvalidRequest("limit must be at least 1".into())),
        limit if limit > MAX_TRANSCRIPT_LIMIT => Err(RuntimeError::LimitTooLarge(Some(limit))),
        _ => Ok(()),
    }
}

/// Content bytes a transcript page stops at (it always holds at least one entry): a page
/// of 256 long entries would otherwise be hundreds of megabytes. `next_start` says where the
/// rest is.
pub const MAX_TRANSCRIPT_PAGE_BYTES: usize = 4 << 20;

/// How many of a page's entries, whose contents are `lengths` bytes long, fit in
/// [`MAX_TRANSCRIPT_PAGE_BYTES`]: at least one, when there is one.
pub fn entries_within_page_bytes(lengths: impl Iterator<Item = usize>) -> usize {
    let mut bytes = 0;
    let mut fit = 0;
    for length in lengths {
        bytes += length;
        if bytes > MAX_TRANSCRIPT_PAGE_BYTES && fit > 0 {
            break;
        }
        fit += 1;
    }
    fit
}

/// Why a runtime operation failed, independent of where the runtime lives.
#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeError {
    /// No such worker.
    WorkerNotFound,
    /// Input to a worker that is no longer running.
    WorkerNotRunning(WorkerStatus),
    /// Delete of a worker that is still running (or still ending its turn).
    WorkerRunning,
    /// The worker's input queue is full.
    WorkerBusy,
    /// The request itself is wrong (blank content, unknown profile…).
    InvalidRequest(String),
    /// A transcript `limit` above the maximum (the limit asked for, when known).
    LimitTooLarge(Option<u64>),
    /// The runtime is shutting down.
    RuntimeStopped,
    /// Storage failed; nothing was acknowledged.
    Store(String),
    /// A remote runtime could not be reached (refused, reset, DNS, TLS); the reason names
    /// no host or port.
    Unreachable(String),
    /// A remote runtime did not answer within this budget (milliseconds).
    Timeout(u64),
    /// A remote runtime refused the gateway (401/403): its token is missing or wrong.
    AuthFailed,
    /// A remote runtime does not support the operation (405/501).
    Unsupported,
    /// A remote runtime answered something that is not the Runtime API.
    Malformed(String),
    /// A remote runtime answered another 4xx/5xx.
    HttpStatus {
        /// Its status.
        status: u16,
        /// Its error code, when its body was a Runtime API error (checked: see
        /// `remote::text`).
        code: Option<String>,
        /// Its error message, when its body had one (scrubbed: see `remote::text`).
        message: Option<String>,
    },
    /// The runtime is at a limit for now (requests in flight, open files): retry shortly.
    Overloaded,
    /// A create or input reached a remote runtime, then `0` went wrong (no readable answer,
    /// a timeout or reset after the request was written): it may have been applied, so
    /// repeating it is safe only with the same idempotency key.
    MaybeApplied(Box<RuntimeError>),
    /// The request body is too large for the runtime.
    PayloadTooLarge,
    /// An `Idempotency-Key` that already named another request (different content, intent
    /// or profile): answering with the first request's result would drop this one in silence.
    KeyReused,
    /// A remote runtime rejected the request itself; `error` is the meaning, `upstream_code`
    /// the remote's own code and `upstream_message` its own explanation.
    Rejected {
        /// What the rejection means here.
        error: Box<RuntimeError>,
        /// The remote's code (checked: see `remote::text`).
        upstream_code: String,
        /// The remote's message, when it sent one (scrubbed: see `remote::text`).
        upstream_message: Option<String>,
    },
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::WorkerNotFound => f.write_str("no such worker"),
            RuntimeError::WorkerNotRunning(status) => {
                write!(f, "the worker is {}: only a running worker takes input or an interrupt", status.as_str())
            }
            RuntimeError::WorkerRunning => {
                f.write_str("the worker is running, or still ending its last turn: stop or cancel it, or retry once its turn has ended")
            }
            RuntimeError::WorkerBusy => f.write_str("the worker's input queue is full; retry when a turn has finished"),
            RuntimeError::InvalidRequest(message) => f.write_str(message),
            RuntimeError::LimitTooLarge(Some(limit)) => {
                write!(f, "limit {limit} is above the maximum of {MAX_TRANSCRIPT_LIMIT}")
            }
            RuntimeError::LimitTooLarge(None) => f.write_str("the limit is above the runtime's largest page"),
            RuntimeError::RuntimeStopped => f.write_str("the runtime is shutting down"),
            RuntimeError::Store(message) => write!(f, "storage failed: {message}"),
            RuntimeError::Unreachable(reason) => write!(f, "the runtime is unreachable ({reason})"),
            RuntimeError::Timeout(ms) => write!(f, "the runtime did not answer within {ms} ms"),
            RuntimeError::AuthFailed => f.write_str("the runtime refused the gateway: its token for it is missing or wrong"),
            RuntimeError::Unsupported => f.write_str("the runtime does not support this operation"),
            RuntimeError::Malformed(what) => {
                write!(f, "the runtime's answer is not the Runtime API ({what})")
            }
            RuntimeError::HttpStatus { status, message, .. } => {
                write!(f, "the runtime answered HTTP {status}")?;
                said(f, message.as_deref())
            }
            RuntimeError::Overloaded => {
                f.write_str("the runtime is at its limit (requests in flight, or open files); retry shortly")
            }
            RuntimeError::MaybeApplied(error) => write!(
                f,
                "{error}; the runtime may have applied the request: repeat it only with the same Idempotency-Key"
            ),
            RuntimeError::PayloadTooLarge => f.write_str("the request body is too large for the runtime"),
            RuntimeError::KeyReused => f.write_str(
                "this Idempotency-Key was already used for a different request: a key names one request \
                 (repeat that request unchanged with it, or send this one with a new key)",
            ),
            RuntimeError::Rejected { error, upstream_message, .. } => {
                error.fmt(f)?;
                said(f, upstream_message.as_deref())
            }
        }
    }
}

/// Appends a remote's own (already scrubbed) explanation.
fn said(f: &mut fmt::Formatter<'_>, message: Option<&str>) -> fmt::Result {
    match message {
        Some(message) => write!(f, " (the runtime said: {message})"),
        None => Ok(()),
    }
}

impl RuntimeError {
    /// The gateway API's HTTP status and error code for this error (for a rejection, those
    /// of what it means).
    pub fn gateway_status(&self) -> (u16, &'static str) {
        match self {
            RuntimeError::WorkerNotFound => (404, "worker_not_found"),
            RuntimeError::WorkerNotRunning(_) => (409, "worker_not_running"),
            RuntimeError::WorkerBusy => (409, "worker_busy"),
            RuntimeError::WorkerRunning => (409, "worker_running"),
            RuntimeError::InvalidRequest(_) => (400, "invalid_request"),
            RuntimeError::LimitTooLarge(_) => (400, "limit_too_large"),
            RuntimeError::RuntimeStopped => (409, "runtime_stopped"),
            RuntimeError::Store(_) => (500, "store_io"),
            RuntimeError::Unreachable(_) => (502, "remote_runtime_unreachable"),
            RuntimeError::Timeout(_) => (504, "remote_runtime_timeout"),
            RuntimeError::AuthFailed => (401, "remote_runtime_auth_failed"),
            RuntimeError::Unsupported => (501, "remote_runtime_unsupported"),
            RuntimeError::Malformed(_) => (502, "remote_runtime_malformed_response"),
            RuntimeError::HttpStatus { .. } => (502, "remote_runtime_http_error"),
            RuntimeError::Overloaded => (503, "overloaded"),
            RuntimeError::PayloadTooLarge => (413, "payload_too_large"),
            RuntimeError::KeyReused => (422, "idempotency_key_reused"),
            RuntimeError::Rejected { error, .. } | RuntimeError::MaybeApplied(error) => error.gateway_status(),
        }
    }
}

/// Result of a runtime operation.
pub type RuntimeResult<T> = Result<T, RuntimeError>;

/// One runtime, embedded or remote, as the gateway and the Runtime API server see it.
/// All calls block; ids are already validated by the caller.
pub trait RuntimeHandle: Send + Sync {
    /// The runtime's summary.
    fn summary(&self) -> RuntimeResult<RuntimeSummary>;
    /// All workers, ordered by id.
    fn list_workers(&self) -> RuntimeResult<Vec<WorkerSummary>>;
    /// Creates a worker.
    fn create_worker(&self, request: CreateWorker) -> RuntimeResult<WorkerDetail>;
    /// One worker.
    fn worker(&self, worker_id: &str) -> RuntimeResult<WorkerDetail>;
    /// Sends input; acknowledged once it is durably in the transcript.
    fn input(&self, worker_id: &str, input: WorkerInput) -> RuntimeResult<InputAck>;
    /// Stops a worker gracefully (idempotent).
    fn stop(&self, worker_id: &str, reason: Option<String>) -> RuntimeResult<LifecycleAck>;
    /// Cancels a worker now (idempotent).
    fn cancel(&self, worker_id: &str, reason: Option<String>) -> RuntimeResult<LifecycleAck>;
    /// Ends the running turn now and keeps the worker running (an extension route).
    fn interrupt(&self, worker_id: &str) -> RuntimeResult<LifecycleAck>;
    /// Deletes a stopped or cancelled worker: its journal goes, its id is never reused.
    fn delete(&self, worker_id: &str) -> RuntimeResult<()>;
    /// A page of the transcript.
    fn transcript(&self, worker_id: &str, start: u64, limit: u64) -> RuntimeResult<Transcript>;
    /// Current health, answered without waiting on anything remote.
    fn health(&self) -> Health;
    /// Embedded or remote.
    fn kind(&self) -> RuntimeKind;
    /// Requests in flight to this runtime now (0 for an embedded runtime).
    fn in_flight(&self) -> usize {
        0
    }
    /// Errors of calls to this runtime so far, by gateway error code (remote runtimes).
    fn error_counts(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Opens worker `worker_id`'s event stream after runtime cursor `after` (or from now).
    fn open_events(&self, worker_id: &str, after: Option<u64>) -> RuntimeResult<Box<dyn EventSource>>;
}

/// One item of a worker's event stream, as a relay consumes it.
#[derive(Debug)]
pub enum SourceItem {
    /// The first item of every (re)connection.
    Snapshot {
        /// The runtime cursor the snapshot stands at.
        position: u64,
        /// The runtime process's boot id, when it tells.
        boot_id: Option<String>,
        /// Whether the runtime's cursors survive its restart.
        durable: bool,
        /// For a stream opened with a cursor: whether it was honoured (when the runtime tells).
        cursor_honoured: Option<bool>,
        /// The fs store's id, when the runtime tells: its cursors count within it.
        store_id: Option<String>,
    },
    /// An event with its runtime cursor and raw JSON payload.
    Event {
        /// Runtime cursor.
        seq: u64,
        /// `{"event":…,"data":…}` as sent.
        payload: Payload,
    },
    /// A diagnostic from the runtime (`runtime.*` code).
    Diagnostic {
        /// Its code.
        code: String,
        /// Its message (already checked to hold nothing backend-private).
        message: String,
    },
}

/// An event's payload: one JSON value, checked, kept inside the text it arrived in (a
/// relay frames it for browsers straight from there, without a copy of its own).
#[derive(Debug)]
pub struct Payload {
    text: tungstenite::Utf8Bytes,
    range: std::ops::Range<usize>,
}

impl Payload {
    /// `value` serialized.
    pub fn serialize<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<Payload> {
        let text = serde_json::to_string(value)?;
        Ok(Payload { range: 0..text.len(), text: text.into() })
    }

    /// The payload at `range` of `text`, a frame that holds it (`None`: out of bounds).
    pub fn new(text: tungstenite::Utf8Bytes, range: std::ops::Range<usize>) -> Option<Payload> {
        text.as_str().get(range.clone())?;
        Some(Payload { text, range })
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        &self.text.as_str()[self.range.clone()]
    }
}

/// A live event stream from a runtime. Dropping it closes the connection.
pub trait EventSource: Send {
    /// The next item; `Ok(None)` when `wait` passed without one; `Err` when the stream ended.
    /// A zero `wait` never blocks: only an item that is ready now is returned.
    fn next(&mut self, wait: std::time::Duration) -> Result<Option<SourceItem>, StreamEnded>;

    /// When the connection last read a frame too large to keep its memory for (its read
    /// buffer has been that large since): the relay replaces it once the stream is quiet.
    fn outgrown_since(&self) -> Option<std::time::Instant> {
        None
    }

    /// The relay keeps this connection though it outgrew its memory (the runtime could not
    /// resume on another): it stops counting against what large frames may take together.
    fn keep_outgrown(&mut self) {}
}

/// Why an event stream ended: a relay reconnects either way, but only a broken connection
/// is an outage; an unreadable frame is met again at the same place on every reconnection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnded {
    /// The connection broke, went silent, or the runtime closed or stopped the stream.
    Broken(String),
    /// The runtime sent a frame that cannot be read (not an event frame, not UTF-8, too
    /// large): nothing after it can be relayed until the runtime sends something else.
    Unreadable(String),
}

impl std::fmt::Display for StreamEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamEnded::Broken(reason) | StreamEnded::Unreadable(reason) => f.write_str(reason),
        }
    }
}

/// A runtime's health state (gateway-api.md `health.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Answers promptly.
    Healthy,
    /// Slow or flapping.
    Degraded,
    /// Connection refused, reset or timed out, or the probe answered with a server error
    /// (5xx) or `runtime_stopped`: it cannot serve now.
    Unreachable,
    /// Rejected the gateway's token.
    AuthFailed,
    /// Answers, but not the Runtime API.
    Incompatible,
    /// Not probed yet.
    Unknown,
}

impl HealthState {
    /// The state as the gateway API names it (`auth_failed`…).
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Unreachable => "unreachable",
            HealthState::AuthFailed => "auth_failed",
            HealthState::Incompatible => "incompatible",
            HealthState::Unknown => "unknown",
        }
    }

    /// Unreachable, refusing us, or not a Runtime API (`unknown` is not down: it has not
    /// been asked yet).
    pub fn is_down(self) -> bool {
        matches!(self, HealthState::Unreachable | HealthState::AuthFailed | HealthState::Incompatible)
    }
}

/// The last error a probe saw.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HealthError {
    /// An error code of the gateway API.
    pub code: &'static str,
    /// What went wrong, in the gateway's words (with the runtime's own explanation, checked,
    /// when it gave one): never its address or token.
    pub message: String,
    /// When (RFC 3339).
    pub at: String,
}

/// What the gateway knows about a runtime's health, without asking it now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Health {
    /// State.
    pub state: HealthState,
    /// Last check (RFC 3339).
    pub checked_at: Option<String>,
    /// Last successful check.
    pub last_ok_at: Option<String>,
    /// Latency of the last check.
    pub latency_ms: Option<f64>,
    /// Last error, if the last check failed.
    pub last_error: Option<HealthError>,
    /// The runtime's summary from the last successful check.
    #[serde(skip)]
    pub summary: Option<RuntimeSummary>,
}

impl Health {
    /// True when the runtime can take requests (healthy or degraded).
    pub fn is_ready(&self) -> bool {
        matches!(self.state, HealthState::Healthy | HealthState::Degraded)
    }

    /// True when the last check found the runtime unreachable, refusing us, or not a
    /// Runtime API (`unknown` is not down: it has not been asked yet).
    pub fn is_down(&self) -> bool {
        self.state.is_down()
    }
}

/// Where a runtime lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// Inside the gateway process.
    Embedded,
    /// Another process, over the Runtime API.
    Remote,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_the_part_of_its_frame_it_names_and_nothing_outside_it() {
        let frame = tungstenite::Utf8Bytes::from(r#"{"payload":{"event":"é"}}"#);
        let payload = Payload::new(frame.clone(), 11..25).expect("in bounds");
        assert_eq!(payload.get(), r#"{"event":"é"}"#);
        assert!(Payload::new(frame.clone(), 11..40).is_none(), "past the end");
        assert!(Payload::new(frame, 11..22).is_none(), "inside a character");
        assert_eq!(Payload::serialize(&serde_json::json!({"event": "x"})).unwrap().get(), r#"{"event":"x"}"#);
    }
}
