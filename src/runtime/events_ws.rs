//! The Runtime API's event stream, `GET /v1/workers/{id}/events/ws[?cursor=wo_…]`:
//! snapshot, then retained events after the cursor, then live — no gap, no duplicate.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, TryRecvError};
use tungstenite::Utf8Bytes;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use super::engine::worker::{EndCause, StreamEnd};
use super::engine::{Engine, EventStream};
use super::frames::{RUNTIME_CURSOR, cursor, diagnostic_frame, event_frame, parse_cursor};
use super::server::Vocabulary;
use super::types::{Event, EventPayload};
use crate::http::websocket::{Closing, DRAIN_BATCH, Feed, SessionOptions, Waker, close_frame};

/// Live events a session may have queued before it counts as too slow.
const LIVE_CAPACITY: usize = 4096;

/// Session policy of the Runtime API.
pub fn session_options() -> SessionOptions {
    SessionOptions {
        ping_every: Duration::from_secs(20),
        idle_limit: Duration::from_secs(60),
        observation_only: diagnostic_frame(
            "runtime.observation_only",
            "this stream is observation-only; send nothing but control frames",
        ),
    }
}

/// The feed of one session for `worker_id`, from raw query value `cursor_param`; `waker` is
/// woken when the worker publishes.
pub fn feed(
    engine: &Engine,
    worker_id: &str,
    cursor_param: Option<&str>,
    vocabulary: Vocabulary,
    waker: &Arc<Waker>,
) -> Box<dyn Feed> {
    let after = match cursor_param.map(|c| parse_cursor(RUNTIME_CURSOR, c)) {
        Some(None) => {
            let diag = diagnostic_frame("runtime.cursor_malformed", "cursor must be wo_ followed by 16 hex digits");
            return Box::new(Closing(Some(diag)));
        }
        Some(Some(seq)) => Some(seq),
        None => None,
    };
    let waker = waker.clone();
    match engine.subscribe(worker_id, after, LIVE_CAPACITY, Arc::new(move || waker.wake())) {
        Ok(stream) => Box::new(RuntimeFeed::new(worker_id, after, stream, vocabulary)),
        Err(_) => Box::new(Closing(Some(diagnostic_frame("runtime.worker_not_found", "no such worker")))),
    }
}

/// Snapshot, diagnostics and replay first, then live events above the last one sent.
struct RuntimeFeed {
    worker_id: String,
    vocabulary: Vocabulary,
    pending: VecDeque<Utf8Bytes>,
    live: Receiver<Arc<Event>>,
    end: Arc<EndCause>,
    last_sent: u64,
    _guard: crate::runtime::engine::worker::ClosedOnDrop,
}

impl RuntimeFeed {
    fn new(worker_id: &str, after: Option<u64>, stream: EventStream, vocabulary: Vocabulary) -> RuntimeFeed {
        let mut pending = VecDeque::new();
        let position = cursor(RUNTIME_CURSOR, after.unwrap_or(stream.position).min(stream.position));
        let snapshot = EventPayload::Snapshot(Box::new(stream.snapshot));
        if let Some(snapshot) = payload_for(&snapshot, vocabulary) {
            pending.push_back(event_frame(&position, &format!("snapshot:{position}"), None, worker_id, &*snapshot));
        }
        if stream.cursor_problem {
            pending.push_back(diagnostic_frame(
                "runtime.cursor_unknown_or_expired",
                "the cursor is not one this runtime can resume from; replay starts at the oldest retained event",
            ));
        }
        let mut last_sent = after.unwrap_or(stream.position);
        if stream.cursor_problem && after.is_some_and(|c| c > stream.position) {
            last_sent = stream.position;
        }
        for event in &stream.replay {
            pending.extend(render(worker_id, event, vocabulary));
            last_sent = last_sent.max(event.seq);
        }
        RuntimeFeed {
            worker_id: worker_id.to_owned(),
            vocabulary,
            pending,
            live: stream.live,
            end: stream.end,
            last_sent,
            _guard: stream.guard,
        }
    }
}

/// The payload as `vocabulary` has it (`None`: not sent to such a client).
fn payload_for(payload: &EventPayload, vocabulary: Vocabulary) -> Option<Cow<'_, EventPayload>> {
    match vocabulary {
        Vocabulary::Extended => Some(Cow::Borrowed(payload)),
        Vocabulary::Base => payload.for_base(),
    }
}

fn render(worker_id: &str, event: &Event, vocabulary: Vocabulary) -> Option<Utf8Bytes> {
    let payload = payload_for(&event.payload, vocabulary)?;
    let c = cursor(RUNTIME_CURSOR, event.seq);
    Some(event_frame(&c, &c, None, worker_id, &*payload))
}

impl Feed for RuntimeFeed {
    fn drain(&mut self, out: &mut Vec<Utf8Bytes>) -> Option<CloseFrame> {
        while out.len() < DRAIN_BATCH {
            if let Some(frame) = self.pending.pop_front() {
                out.push(frame);
                continue;
            }
            match self.live.try_recv() {
                Ok(event) if event.seq > self.last_sent => {
                    self.last_sent = event.seq;
                    out.extend(render(&self.worker_id, &event, self.vocabulary));
                }
                Ok(_) => {}
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    let (code, message, close) = match self.end.get() {
                        StreamEnd::Overflowed => (
                            "runtime.cursor_expired",
                            "too slow to keep up; reconnect with your last cursor",
                            close_frame(CloseCode::Policy, "cursor_expired"),
                        ),
                        StreamEnd::Deleted => (
                            "runtime.worker_not_found",
                            "the worker was deleted",
                            close_frame(CloseCode::Away, "worker deleted"),
                        ),
                        StreamEnd::Shutdown => (
                            "runtime.unavailable",
                            "the runtime is shutting down",
                            close_frame(CloseCode::Away, "shutdown"),
                        ),
                    };
                    out.push(diagnostic_frame(code, message));
                    return Some(close);
                }
            }
        }
        None
    }
}
