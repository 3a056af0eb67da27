//! WebSocket frames of both event streams (Runtime API `wo_`, gateway `bo_`): runtime
//! cursors, event envelopes and diagnostics, serialized once into shareable text.

use serde::Serialize;
use tungstenite::Utf8Bytes;

use super::handle::Payload;

/// `wo_` + 16 hex digits: a runtime cursor.
pub const RUNTIME_CURSOR: &str = "wo_";

/// `prefix` + `seq` as 16 hex digits.
pub fn cursor(prefix: &str, seq: u64) -> String {
    let mut text = String::with_capacity(prefix.len() + 16);
    text.push_str(prefix);
    text.push_str(hex_digits(&mut [0; 16], seq));
    text
}

/// `seq` as 16 lower-case hex digits, written into `buf`. By hand: `format!` pads digit by
/// digit, and this runs for every event.
pub fn hex_digits(buf: &mut [u8; 16], seq: u64) -> &str {
    for (nibble, digit) in buf.iter_mut().rev().enumerate() {
        *digit = b"0123456789abcdef"[(seq >> (nibble * 4)) as usize & 0xf];
    }
    std::str::from_utf8(buf).unwrap_or_default()
}

/// Parses `prefix` + exactly 16 hex digits.
pub fn parse_cursor(prefix: &str, text: &str) -> Option<u64> {
    let hex = text.strip_prefix(prefix)?;
    if hex.len() != 16 {
        return None;
    }
    // By hand, one pass: the relay reads a cursor for every event.
    hex.bytes().try_fold(0u64, |seq, b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        Some(seq << 4 | u64::from(digit))
    })
}

#[derive(Serialize)]
struct EventFrame<'a, P: Serialize + ?Sized> {
    kind: &'static str,
    envelope: Envelope<'a, P>,
}

#[derive(Serialize)]
struct Envelope<'a, P: Serialize + ?Sized> {
    cursor: &'a str,
    event_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime_id: Option<&'a str>,
    worker_id: &'a str,
    payload: &'a P,
}

/// `{"kind":"event","envelope":{…}}`.
pub fn event_frame<P: Serialize + ?Sized>(
    cursor: &str,
    event_id: &str,
    runtime_id: Option<&str>,
    worker_id: &str,
    payload: &P,
) -> Utf8Bytes {
    let frame = EventFrame { kind: "event", envelope: Envelope { cursor, event_id, runtime_id, worker_id, payload } };
    // Serialized into a reused buffer, then copied once at its exact size: growing a fresh
    // string costs two or three reallocations per event on a hot path.
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        let text = match serde_json::to_writer(&mut *buf, &frame) {
            Ok(()) => std::str::from_utf8(buf).map(Utf8Bytes::from).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        buf.shrink_to(SCRATCH_KEPT);
        text.unwrap_or_else(|e| {
            diagnostic_frame("runtime.serialize_failed", &format!("cannot serialize an event: {e}"))
        })
    })
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What a thread's scratch buffer keeps after an unusually large event.
const SCRATCH_KEPT: usize = 16 << 10;

/// The event frames of one stream, the same text as [`event_frame`] with the cursor as event
/// id, built by concatenation: the ids, which every frame of the stream repeats, are escaped
/// once, so a relay's work per event is one allocation and a copy of the payload.
pub struct EventFramer {
    /// `,"runtime_id":…,"worker_id":…,"payload":`.
    ids: String,
}

impl EventFramer {
    /// Frames of the stream of `worker_id` (on `runtime_id`, when the frames name it).
    pub fn new(runtime_id: Option<&str>, worker_id: &str) -> EventFramer {
        let quoted = |id: &str| serde_json::Value::from(id).to_string();
        let mut ids = String::new();
        if let Some(runtime_id) = runtime_id {
            ids.push_str(",\"runtime_id\":");
            ids.push_str(&quoted(runtime_id));
        }
        ids.push_str(",\"worker_id\":");
        ids.push_str(&quoted(worker_id));
        ids.push_str(",\"payload\":");
        EventFramer { ids }
    }

    /// The frame of `payload` at `cursor`, a cursor this program made (a prefix and hex
    /// digits: nothing to escape).
    pub fn frame(&self, cursor: &str, payload: &Payload) -> Utf8Bytes {
        const HEAD: &str = r#"{"kind":"event","envelope":{"cursor":""#;
        const BETWEEN: &str = r#"","event_id":""#;
        let payload = payload.get();
        let mut text =
            String::with_capacity(HEAD.len() + BETWEEN.len() + 2 * cursor.len() + self.ids.len() + payload.len() + 3);
        text.push_str(HEAD);
        text.push_str(cursor);
        text.push_str(BETWEEN);
        text.push_str(cursor);
        text.push('"');
        text.push_str(&self.ids);
        text.push_str(payload);
        text.push_str("}}");
        Utf8Bytes::from(text)
    }
}

/// `{"kind":"diagnostic","diagnostic":{"code","message"}}`.
pub fn diagnostic_frame(code: &str, message: &str) -> Utf8Bytes {
    serde_json::json!({"kind": "diagnostic", "diagnostic": {"code": code, "message": message}}).to_string().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_near_misses() {
        assert_eq!(cursor(RUNTIME_CURSOR, 0x31), "wo_0000000000000031");
        assert_eq!(parse_cursor(RUNTIME_CURSOR, "wo_0000000000000031"), Some(0x31));
        for bad in ["wo_31", "bo_0000000000000031", "wo_000000000000003g", "wo_00000000000000031", ""] {
            assert_eq!(parse_cursor(RUNTIME_CURSOR, bad), None, "{bad}");
        }
        for seq in [0, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(cursor(RUNTIME_CURSOR, seq), format!("wo_{seq:016x}"));
            assert_eq!(parse_cursor(RUNTIME_CURSOR, &cursor(RUNTIME_CURSOR, seq)), Some(seq));
        }
    }

    #[test]
    fn the_framer_writes_what_event_frame_writes() {
        let payload: Box<serde_json::value::RawValue> =
            serde_json::from_str(r#"{"event":"text_delta","data":{"text":"a \"quoted\" \u00e9 line\n"}}"#).unwrap();
        let raw = Payload::serialize(&payload).unwrap();
        for (runtime_id, worker_id) in [(Some("lab"), "w-1"), (None, "w_0123"), (Some("odd\"id\\"), "w\u{7}x")] {
            let c = cursor("bo_", 0xabc);
            let framed = EventFramer::new(runtime_id, worker_id).frame(&c, &raw);
            assert_eq!(framed, event_frame(&c, &c, runtime_id, worker_id, &*payload), "{runtime_id:?} {worker_id}");
            serde_json::from_str::<serde_json::Value>(framed.as_str()).expect("valid JSON");
        }
    }

    #[test]
    fn a_frame_after_a_large_one_carries_nothing_of_it() {
        let big = serde_json::json!({"event": "text_delta", "data": {"text": "x".repeat(100_000)}});
        let small = serde_json::json!({"event": "text_delta", "data": {"text": "y"}});
        let first = event_frame("bo_1", "bo_1", Some("rt"), "w-1", &big);
        let second = event_frame("bo_2", "bo_2", None, "w-1", &small);
        let parse = |f: &Utf8Bytes| serde_json::from_str::<serde_json::Value>(f.as_str()).expect("valid JSON");
        assert_eq!(parse(&first)["envelope"]["payload"], big);
        let expected = serde_json::json!({"kind": "event", "envelope": {
            "cursor": "bo_2", "event_id": "bo_2", "worker_id": "w-1", "payload": small}});
        assert_eq!(parse(&second), expected);
        assert_eq!(second.len(), expected.to_string().len(), "no trailing bytes");
    }
}
