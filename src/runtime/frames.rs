//! WebSocket frames of both event streams (Runtime API `wo_`, gateway `bo_`): cursors,
//! event envelopes and diagnostics, serialized once into shareable text.

use serde::Serialize;
use tungstenite::Utf8Bytes;

/// `wo_` + 16 hex digits: a runtime cursor.
pub const RUNTIME_CURSOR: &str = "wo_";
/// `bo_` + 16 hex digits: a gateway cursor.
pub const GATEWAY_CURSOR: &str = "bo_";

/// `prefix` + `seq` as 16 hex digits.
pub fn cursor(prefix: &str, seq: u64) -> String {
    format!("{prefix}{seq:016x}")
}

/// Parses `prefix` + exactly 16 hex digits.
pub fn parse_cursor(prefix: &str, text: &str) -> Option<u64> {
    let hex = text.strip_prefix(prefix)?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
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
    match serde_json::to_string(&frame) {
        Ok(text) => text.into(),
        Err(e) => diagnostic_frame("runtime.serialize_failed", &format!("cannot serialize an event: {e}")),
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
    }
}
