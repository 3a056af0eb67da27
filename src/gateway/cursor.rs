//! Gateway cursors (`bo_`): portable positions in one worker's event stream.
//!
//! A cursor is `bo_` + 16 hex digits of a *stream tag* + 16 hex digits of the runtime's own
//! event id (its `wo_` cursor). The tag is a stable hash of the gateway's runtime id, the
//! worker id and the runtime's *lineage*: its fs store id when its cursors survive restarts,
//! else its boot id. So any gateway process with the same configuration — this one after a
//! restart, or a replica behind a load balancer — reads the same cursor the same way, and a
//! cursor from another worker, another boot of a memory runtime or a wiped store is
//! recognised as foreign instead of being matched by number.

use crate::runtime::frames::hex_digits;

/// The prefix of gateway cursors.
pub const PREFIX: &str = "bo_";

/// Whose numbering a runtime's event ids belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lineage {
    /// Durable cursors: ids count within this store (its id; empty when the runtime does
    /// not tell) across every restart.
    Store(String),
    /// Ids count within this boot (empty when the runtime does not tell).
    Boot(String),
}

impl Lineage {
    /// The lineage a runtime's stream greeting describes.
    pub fn of(durable: bool, store_id: Option<&str>, boot_id: Option<&str>) -> Lineage {
        if durable {
            Lineage::Store(store_id.unwrap_or_default().to_owned())
        } else {
            Lineage::Boot(boot_id.unwrap_or_default().to_owned())
        }
    }
}

/// The tag of `(runtime_id, worker_id, lineage)`: FNV-1a, so it is the same in every
/// process and build.
pub fn stream_tag(runtime_id: &str, worker_id: &str, lineage: &Lineage) -> u64 {
    let (kind, id) = match lineage {
        Lineage::Store(id) => ("store", id),
        Lineage::Boot(id) => ("boot", id),
    };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [runtime_id, worker_id, kind, id] {
        for byte in part.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// A cursor a browser sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// A cursor of the current form.
    Position {
        /// The stream tag it was issued under.
        tag: u64,
        /// The runtime event id it stands at.
        seq: u64,
    },
    /// A well-formed cursor of an older gateway (16 hex digits): never resumable.
    Legacy,
}

/// Writes the cursor for runtime event id `seq` in the stream tagged `tag`.
pub fn encode(tag: u64, seq: u64) -> String {
    Cursor::new(tag, seq).as_str().to_owned()
}

/// A cursor's text on the stack: a relay writes one for every event.
pub struct Cursor([u8; PREFIX.len() + 32]);

impl Cursor {
    /// The cursor for runtime event id `seq` in the stream tagged `tag`.
    pub fn new(tag: u64, seq: u64) -> Cursor {
        let mut text = [0; PREFIX.len() + 32];
        let (prefix, digits) = text.split_at_mut(PREFIX.len());
        prefix.copy_from_slice(PREFIX.as_bytes());
        let (tag_digits, seq_digits) = digits.split_at_mut(16);
        let mut buf = [0; 16];
        tag_digits.copy_from_slice(hex_digits(&mut buf, tag).as_bytes());
        seq_digits.copy_from_slice(hex_digits(&mut buf, seq).as_bytes());
        Cursor(text)
    }

    /// Its text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Reads a presented cursor; `None` when it is malformed.
pub fn parse(text: &str) -> Option<Presented> {
    let hex = text.strip_prefix(PREFIX)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        32 => Some(Presented::Position {
            tag: u64::from_str_radix(&hex[..16], 16).ok()?,
            seq: u64::from_str_radix(&hex[16..], 16).ok()?,
        }),
        16 => Some(Presented::Legacy),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_near_misses() {
        let tag = stream_tag("lab", "worker-00000001", &Lineage::Store("s-1".into()));
        for seq in [0, 1, 0x31, u64::MAX] {
            let text = encode(tag, seq);
            assert_eq!(text, format!("bo_{tag:016x}{seq:016x}"));
            assert_eq!(parse(&text), Some(Presented::Position { tag, seq }));
        }
        assert_eq!(parse("bo_0000000000000031"), Some(Presented::Legacy));
        for bad in ["", "bo_", "wo_0000000000000031", "bo_31", "bo_000000000000000g", &format!("{}0", encode(1, 2))] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn tags_separate_runtimes_workers_and_lineages_and_never_change() {
        let store = Lineage::of(true, Some("s-1"), Some("b-1"));
        assert_eq!(store, Lineage::of(true, Some("s-1"), Some("b-2")), "a durable store outlives boots");
        let tags = [
            stream_tag("lab", "w1", &store),
            stream_tag("lab", "w2", &store),
            stream_tag("lab2", "w1", &store),
            stream_tag("lab", "w1", &Lineage::of(true, Some("s-2"), None)),
            stream_tag("lab", "w1", &Lineage::of(false, None, Some("b-1"))),
            stream_tag("lab", "w1", &Lineage::of(false, None, Some("b-2"))),
            stream_tag("la", "bw1", &store),
        ];
        for (i, a) in tags.iter().enumerate() {
            for b in &tags[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Fixed forever: replicas and restarted gateways must compute the same tag.
        assert_eq!(stream_tag("", "", &Lineage::Boot(String::new())), 0x18f8_0ffe_67f1_645d);
    }

    #[test]
    fn fuzzed_cursors_never_panic_and_only_exact_forms_parse() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"bo_0123456789abcdefABCDEFxyz-%\x00\xff";
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
            let text = String::from_utf8_lossy(&bytes);
            if let Some(Presented::Position { tag, seq }) = parse(&text) {
                assert_eq!(encode(tag, seq), text.to_ascii_lowercase());
            }
        }
    }
}
