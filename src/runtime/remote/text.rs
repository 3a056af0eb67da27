//! Text a remote runtime supplies, checked before the gateway shows it to a browser, writes
//! it to a log or prints it in `worker-gateway check`.
//!
//! A remote is trusted with its workers' content, not with what the gateway says in its own
//! name. So identifiers (worker ids, profile names, the summary's fields) must be valid ids
//! holding none of the remote's backend-private strings (base URL, host, port, token), or
//! they are withheld; error and diagnostic codes must match `^[a-z][a-z0-9_.]{0,63}$` and
//! hold nothing private, or a generic code stands in; free text (error messages, the display
//! name) is passed on only with control characters stripped, every private string replaced
//! by `<backend-private>`, and at most [`MAX_MESSAGE_CHARS`] characters. Timestamps must be
//! RFC 3339 date-times and a transcript entry's `origin` the one value it has, or they are
//! dropped: neither is a place for text.
//!
//! Transcript content, intents and event payloads are the workers' own data and pass as
//! they are: rewriting them would corrupt what users wrote and read.

use crate::runtime::types::{ProfileRef, RuntimeSummary, TranscriptItem, WorkerRef, WorkerSummary};
use crate::secret::Secret;

/// Shown instead of an identifier the gateway will not show.
pub const WITHHELD: &str = "<withheld>";

/// Replaces a backend-private string inside a message.
pub const PRIVATE_MARK: &str = "<backend-private>";

/// Stands in for a remote's error or diagnostic code that fails the check.
pub const UNRECOGNISED_CODE: &str = "unrecognised_code";

/// The longest remote message passed on, in characters.
pub const MAX_MESSAGE_CHARS: usize = 512;

/// Bytes of a remote's message read at most: far more than is shown, and than any private
/// string, and far less than a remote may send (checking a 62 MB message whole took the
/// gateway to 1.4 GB).
const MAX_MESSAGE_READ: usize = 64 << 10;

/// Profile names of a remote shown at most: every listing of runtimes carries them, and a
/// remote listing half a million would make each one tens of megabytes.
pub const MAX_PROFILES: usize = 256;

/// The backend-private strings of one remote: its base URL, its authority, host, port and
/// path prefix, and its token. Matched without regard to ASCII case. The URL, authority and
/// token are found anywhere; the host only as a word of its own (not inside a longer run of
/// letters and digits), the path prefix wherever no letter or digit follows it (and, as
/// words, the path without its slash and its segments of four characters or more that are
/// not one plain word), the port only outside a longer number (port 4711 is no leak in
/// `worker-00004711`); and a host that is one plain word (`worker`, `runtime`, `localhost`)
/// names nothing: withholding every id or message holding it would break a remote reached
/// by such a name.
pub struct PrivateText(Vec<Private>);

/// One backend-private string.
struct Private {
    /// Lower case.
    text: String,
    /// What may not adjoin an occurrence for it to count.
    bound: Bound,
}

/// Where a private string counts (see [`PrivateText`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bound {
    /// Anywhere.
    Anywhere,
    /// Not next to an ASCII letter or digit.
    Word,
    /// Not next to a digit.
    Number,
    /// Not followed by an ASCII letter or digit (a path starts with its own `/`).
    Path,
}

impl Private {
    /// Where this string counts in `lower`, overlapping occurrences included.
    fn occurrences<'a>(&'a self, lower: &'a str) -> impl Iterator<Item = (usize, usize)> + 'a {
        let joined = move |at: Option<usize>, before| {
            at.and_then(|i| lower.as_bytes().get(i)).is_some_and(|&b| self.bound.joins(b, before))
        };
        let mut from = 0;
        std::iter::from_fn(move || {
            let start = from + lower.get(from..)?.find(self.text.as_str())?;
            // On, one character further: the next occurrence may overlap this one.
            from = start + lower[start..].chars().next().map_or(1, char::len_utf8);
            Some((start, start + self.text.len()))
        })
        .filter(move |&(start, end)| !joined(start.checked_sub(1), true) && !joined(Some(end), false))
    }
}

impl Bound {
    /// True when `byte`, just `before` an occurrence or just after it, keeps it from counting.
    fn joins(self, byte: u8, before: bool) -> bool {
        match self {
            Bound::Anywhere => false,
            Bound::Word => byte.is_ascii_alphanumeric(),
            Bound::Number => byte.is_ascii_digit(),
            Bound::Path => !before && byte.is_ascii_alphanumeric(),
        }
    }
}

impl PrivateText {
    /// The private strings of a remote reached at `base_url` with `token`.
    pub fn new(base_url: &str, token: Option<&Secret>) -> PrivateText {
        let after_scheme = base_url.split_once("://").map_or(base_url, |(_, rest)| rest);
        let (authority, path) = after_scheme.split_once('/').unwrap_or((after_scheme, ""));
        let (userinfo, host_port) = authority.rsplit_once('@').unwrap_or(("", authority));
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, port),
            _ => (host_port, ""),
        };
        let bare_host = host.trim_matches(['[', ']']);
        let private = |text: &str, bound| Private { text: text.to_ascii_lowercase(), bound };
        let anywhere = |text: &str| private(text, Bound::Anywhere);
        let word = |text: &str| private(text, Bound::Word);
        let mut parts = vec![anywhere(base_url), anywhere(userinfo)];
        if authority != host {
            parts.extend([anywhere(authority), anywhere(host_port)]);
        }
        if !bare_host.bytes().all(|b| b.is_ascii_alphabetic()) {
            parts.extend([word(host), word(bare_host)]);
        }
        parts.push(private(port, Bound::Number));
        let path = path.trim_end_matches('/');
        if !path.is_empty() {
            parts.push(private(&format!("/{path}"), Bound::Path));
            // Without its slash, and its segments, as words: those of at least four characters
            // that are not one plain word (`1` or `v2` would take ordinary text with them).
            if path.contains('/') {
                parts.push(word(path));
            }
            let distinctive = |segment: &&str| segment.len() >= 4 && !segment.bytes().all(|b| b.is_ascii_alphabetic());
            parts.extend(path.split('/').filter(distinctive).map(word));
        }
        parts.extend(token.map(|t| anywhere(t.expose())));
        parts.retain(|p| !p.text.is_empty());
        // Longest first, so a URL is replaced as a whole rather than piece by piece.
        parts.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.text.cmp(&b.text)).then(a.bound.cmp(&b.bound)));
        parts.dedup_by(|a, b| a.text == b.text);
        PrivateText(parts)
    }

    /// Where the private strings occur in `lower` (lower case), as byte ranges; overlapping
    /// occurrences too (`127.0.0.127.0.0.1` holds `127.0.0.1` at its end, not its start).
    /// Strings longer than `lower` are not looked for (an event name, checked with every
    /// event, is shorter than a URL or a token).
    fn occurrences<'a>(&'a self, lower: &'a str) -> impl Iterator<Item = (usize, usize)> + 'a {
        self.0.iter().filter(move |p| p.text.len() <= lower.len()).flat_map(move |p| p.occurrences(lower))
    }

    /// True when `text` holds one of the private strings, as it is or as a reader sees it
    /// ([`Skeleton`]).
    pub fn found_in(&self, text: &str) -> bool {
        // Most texts checked are already lower case (codes, event names: one per event).
        let lower = match text.bytes().any(|b| b.is_ascii_uppercase()) {
            true => std::borrow::Cow::Owned(text.to_ascii_lowercase()),
            false => std::borrow::Cow::Borrowed(text),
        };
        self.occurrences(&lower).next().is_some()
            || (!text.bytes().all(|b| b.is_ascii() && b != b'%') && !self.seen_in(text).is_empty())
    }

    /// Where the private strings occur in `text` as a reader sees it ([`Skeleton`]), as byte
    /// ranges of `text`: the distinctive ones (the URL, authority and token, found anywhere)
    /// with every character outside ASCII left out, whatever it is; the others (host, port,
    /// path: found as words or numbers) with a character that shows parting the text, else
    /// `2个7002` would be port 27002.
    fn seen_in(&self, text: &str) -> Vec<(usize, usize)> {
        let mut seen = Vec::new();
        for (others, anywhere) in [(Others::LeftOut, true), (Others::Parting, false)] {
            let skeleton = Skeleton::of(text, others);
            let lower = skeleton.lower.as_str();
            let privates =
                self.0.iter().filter(|p| (p.bound == Bound::Anywhere) == anywhere && p.text.len() <= lower.len());
            let found = privates.flat_map(|p| p.occurrences(lower));
            seen.extend(found.map(|(start, end)| (skeleton.from[start].0, skeleton.from[end - 1].1)));
        }
        seen
    }

    /// A remote-supplied identifier the gateway may show: a valid id holding nothing private.
    pub fn allows(&self, id: &str) -> bool {
        crate::http::router::valid_id(id) && !self.found_in(id)
    }

    /// `id` when the gateway may show it, else [`WITHHELD`].
    pub fn id_or_withheld(&self, id: &str) -> String {
        if self.allows(id) { id.to_owned() } else { WITHHELD.to_owned() }
    }

    /// A remote's error or diagnostic code as the gateway passes it on: the code itself when
    /// it matches `^[a-z][a-z0-9_.]{0,63}$` and holds nothing private, else
    /// [`UNRECOGNISED_CODE`].
    pub fn code(&self, code: &str) -> String {
        if self.is_plain_code(code) { code.to_owned() } else { UNRECOGNISED_CODE.to_owned() }
    }

    /// Whether [`PrivateText::code`] passes `code` on as it is (asked of every event's name).
    pub fn is_plain_code(&self, code: &str) -> bool {
        let mut bytes = code.bytes();
        code.len() <= 64
            && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
            && !self.found_in(code)
    }

    /// A remote's message as the gateway passes it on: control and invisible formatting
    /// characters stripped, each private string replaced by [`PRIVATE_MARK`], cut to
    /// [`MAX_MESSAGE_CHARS`]. `None` when nothing is left (or, should a private string
    /// survive the replacing, rather than pass it on).
    pub fn message(&self, text: &str) -> Option<String> {
        // Read up to a bound: a remote's answer may be megabytes, the message shown is 512
        // characters (what the cut splits is shown only after 64 KiB that came to less than
        // that: secrets of kilobytes each, replaced, as only a remote holding them could
        // send, and such a remote can spell them in any code anyway).
        let mut visible = String::new();
        let mut cut = false;
        for c in text.chars().filter(|c| !crate::http::error::hidden(*c)) {
            if visible.len() + c.len_utf8() > MAX_MESSAGE_READ {
                cut = true;
                break;
            }
            visible.push(c);
        }
        // A mark can make a word of what was glued to a private string: replaced again.
        let mut replaced = self.replace(&visible);
        for _ in 0..3 {
            if !self.found_in(&replaced) {
                break;
            }
            replaced = self.replace(&replaced);
        }
        let mut out: String = replaced.chars().take(MAX_MESSAGE_CHARS).collect();
        if cut || replaced.chars().nth(MAX_MESSAGE_CHARS).is_some() {
            out.push('…');
        }
        let out = out.trim();
        (!out.is_empty() && !self.found_in(out)).then(|| out.to_owned())
    }

    /// `text` with every occurrence of a private string replaced by [`PRIVATE_MARK`]: found
    /// in the text as it is and as a reader sees it ([`Skeleton`]; the characters put
    /// between its own are replaced with it). Overlapping occurrences are merged, so a mark
    /// is never matched again.
    fn replace(&self, text: &str) -> String {
        // ASCII lowercasing keeps every byte offset and char boundary.
        let lower = text.to_ascii_lowercase();
        let mut ranges: Vec<(usize, usize)> = self.occurrences(&lower).chain(self.seen_in(text)).collect();
        ranges.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut done = 0;
        for (start, end) in ranges {
            if end <= done {
                continue;
            }
            if start >= done {
                out.push_str(&text[done..start]);
                out.push_str(PRIVATE_MARK);
            }
            done = end;
        }
        out.push_str(&text[done..]);
        out
    }

    /// A worker reference with its ids checked (withheld when they fail).
    pub fn clean_ref(&self, worker_ref: &mut WorkerRef) {
        worker_ref.runtime_id = self.id_or_withheld(&worker_ref.runtime_id);
        worker_ref.worker_id = self.id_or_withheld(&worker_ref.worker_id);
    }

    /// A profile reference whose name the gateway may show (else named [`WITHHELD`]).
    pub fn clean_profile(&self, profile: &mut ProfileRef) {
        if profile.name().is_some_and(|name| !self.allows(name)) {
            *profile = ProfileRef::Named(WITHHELD.to_owned());
        }
    }

    /// The summary with every field the gateway may show or print checked.
    pub fn clean_summary(&self, mut summary: RuntimeSummary) -> RuntimeSummary {
        summary.runtime_id = self.id_or_withheld(&summary.runtime_id);
        summary.display_name = summary.display_name.and_then(|name| self.message(&name));
        summary.backend = self.id_or_withheld(&summary.backend);
        if summary.status != "running" && summary.status != "stopped" {
            summary.status = "unknown".to_owned();
        }
        summary.boot_id = summary.boot_id.filter(|id| self.allows(id));
        if let Some(profiles) = &mut summary.profiles {
            profiles.retain(|p| self.allows(p));
            if profiles.len() > MAX_PROFILES {
                log::debug!(
                    "runtime `{}` lists {} profiles; the first {MAX_PROFILES} are shown",
                    summary.runtime_id,
                    profiles.len()
                );
                profiles.truncate(MAX_PROFILES);
            }
        }
        summary
    }

    /// Worker rows whose id the gateway can address and show, with their other
    /// identifiers checked (the caller says how many were left out).
    pub fn clean_workers(&self, mut workers: Vec<WorkerSummary>) -> Vec<WorkerSummary> {
        workers.retain(|w| self.allows(&w.worker_id));
        for w in &mut workers {
            self.clean_ref(&mut w.worker_ref);
            w.runtime_id = self.id_or_withheld(&w.runtime_id);
            self.clean_profile(&mut w.profile);
            keep_timestamp(&mut w.created_at);
            keep_timestamp(&mut w.last_activity_at);
        }
        workers
    }
}

/// A text as a reader sees it, for finding private strings: its ASCII characters in lower
/// case, fullwidth forms (`ｔｏｋｅｎ`) as the ASCII they stand for, `%XX` escapes of
/// printable ones decoded, and the other characters as [`Others`] says. A token with
/// invisible or combining characters put between its own (`to\u{1d173}ken`), or a URL
/// percent-encoded (`http%3A%2F%2Fhost`), is found as well as one spelt plainly. Each byte
/// keeps the byte range of the text it came from.
struct Skeleton {
    lower: String,
    from: Vec<(usize, usize)>,
}

/// What a [`Skeleton`] makes of a character outside ASCII (but a fullwidth form).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Others {
    /// Left out, whatever it is.
    LeftOut,
    /// Left out when it shows nothing of its own, else a space.
    Parting,
}

impl Skeleton {
    fn of(text: &str, others: Others) -> Skeleton {
        let (mut lower, mut from) = (String::with_capacity(text.len()), Vec::with_capacity(text.len()));
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            let escaped = (c == '%')
                .then(|| text.get(at + 1..at + 3))
                .flatten()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok().filter(|b| b.is_ascii_graphic() || *b == b' '));
            let (seen, end) = match (escaped, c) {
                (Some(byte), _) => {
                    chars.next();
                    chars.next();
                    (Some(char::from(byte)), at + 3)
                }
                (None, c) if c.is_ascii() => (Some(c), at + 1),
                // Fullwidth forms of the printable ASCII characters.
                (None, '\u{ff01}'..='\u{ff5e}') => (char::from_u32(c as u32 - 0xfee0), at + c.len_utf8()),
                (None, c) if others == Others::LeftOut || shows_nothing_of_its_own(c) => (None, at + c.len_utf8()),
                // Any other character is one a reader sees: it parts what is on either side
                // (`2个7002` is no `27002`).
                (None, c) => (Some(' '), at + c.len_utf8()),
            };
            if let Some(seen) = seen {
                lower.push(seen.to_ascii_lowercase());
                from.push((at, end));
            }
        }
        Skeleton { lower, from }
    }
}

/// Characters that show nothing of their own between two others: combining marks (drawn on
/// the character before) and format characters (invisible), beyond those a message loses
/// ([`crate::http::error::hidden`]).
fn shows_nothing_of_its_own(c: char) -> bool {
    matches!(
        c,
        '\u{0300}'..='\u{036f}'
            | '\u{0483}'..='\u{0489}'
            | '\u{0600}'..='\u{0605}'
            | '\u{06dd}'
            | '\u{070f}'
            | '\u{1ab0}'..='\u{1aff}'
            | '\u{1dc0}'..='\u{1dff}'
            | '\u{20d0}'..='\u{20ff}'
            | '\u{fe20}'..='\u{fe2f}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0100}'..='\u{e01ef}'
    ) || crate::http::error::hidden(c)
}

/// Drops `stamp` unless it is an RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS`, a fraction of at
/// most 9 digits, then `Z` or `±HH:MM`. Its digits are not checked against the private
/// strings: a runtime on port 2026 would lose every timestamp of the year.
pub fn keep_timestamp(stamp: &mut Option<String>) {
    if stamp.as_deref().is_some_and(|s| !is_timestamp(s)) {
        *stamp = None;
    }
}

fn is_timestamp(stamp: &str) -> bool {
    let shape = |text: &str, pattern: &str| {
        text.len() == pattern.len()
            && text.bytes().zip(pattern.bytes()).all(|(b, p)| if p == b'9' { b.is_ascii_digit() } else { b == p })
    };
    let Some((date_time, rest)) = stamp.split_at_checked(19) else { return false };
    if !shape(date_time, "9999-99-99T99:99:99") {
        return false;
    }
    let (fraction, zone) = match rest.strip_prefix('.') {
        Some(rest) => rest.split_at(rest.bytes().take_while(u8::is_ascii_digit).count()),
        None => ("0", rest),
    };
    (1..=9).contains(&fraction.len())
        && (zone.eq_ignore_ascii_case("z") || shape(&zone.replacen('-', "+", 1), "+99:99"))
}

/// A transcript entry's own fields the gateway shows besides its content: its timestamp, and
/// its `origin` (only `assistant`, which a base runtime adds).
pub fn clean_entry(item: &mut TranscriptItem) {
    keep_timestamp(&mut item.at);
    if item.origin.as_deref().is_some_and(|o| o != "assistant") {
        item.origin = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private() -> PrivateText {
        PrivateText::new("http://Secret-Host.example:4711/rt", Some(&Secret::new("tok-X9")))
    }

    #[test]
    fn identifiers_holding_private_text_are_refused() {
        let p = private();
        assert!(p.allows("echo") && p.allows("worker-00000001"));
        for bad in ["secret-host.example", "SECRET-HOST.EXAMPLE", "p4711", "4711", "tok-x9", "has space", "", "a/b"] {
            assert!(!p.allows(bad), "{bad}");
        }
        assert_eq!(p.id_or_withheld("w:4711"), WITHHELD);
        // A port inside a longer number is no leak (an id's number); a host inside a word neither.
        assert!(p.allows("worker-00004711") && p.allows("worker-47110000") && p.allows("xsecret-host.examples"));
        let v6 = PrivateText::new("http://[fd00::7]:9000", None);
        assert!(!v6.allows("fd00::7") && !v6.allows("x9000"));
        let with_user = PrivateText::new("http://ops:pw-77@h.example/", None);
        assert!(!with_user.allows("ops:pw-77") && !with_user.allows("h.example"));
    }

    #[test]
    fn codes_follow_the_strict_pattern() {
        let p = private();
        for good in ["invalid_request", "store_io", "runtime.cursor_malformed", "a", &"a".repeat(64)] {
            assert_eq!(p.code(good), good);
        }
        for bad in ["", "Invalid", "1abc", "_x", "a-b", "a b", "ünï", &"a".repeat(65), "e.4711", "runtime.p4711"] {
            assert_eq!(p.code(bad), UNRECOGNISED_CODE, "{bad}");
        }
    }

    #[test]
    fn messages_are_scrubbed_stripped_and_capped() {
        let p = private();
        assert_eq!(
            p.message("unknown profile `upper`; this runtime has: echo").as_deref(),
            Some("unknown profile `upper`; this runtime has: echo")
        );
        let scrubbed = p.message("GET http://secret-host.example:4711/rt/v1 failed (TOK-X9) on port 4711").unwrap();
        assert_eq!(scrubbed, "GET <backend-private>/v1 failed (<backend-private>) on port <backend-private>");
        assert_eq!(p.message("a\r\nb\u{1b}[31m\u{202e}c\u{200b}").as_deref(), Some("ab[31mc"));
        assert_eq!(p.message("tok\n-X9").as_deref(), Some(PRIVATE_MARK), "a secret split by controls is found");
        for invisible in [
            "\u{ad}",
            "\u{61c}",
            "\u{180e}",
            "\u{34f}",
            "\u{115f}",
            "\u{3164}",
            "\u{fe0f}",
            "\u{e0061}",
            "\u{2028}",
            "\u{17b4}",
        ] {
            let split = format!("tok{invisible}-X9");
            assert_eq!(
                p.message(&split).as_deref(),
                Some(PRIVATE_MARK),
                "split by U+{:04X}",
                invisible.chars().next().unwrap() as u32
            );
        }
        let long = p.message(&"é".repeat(2000)).unwrap();
        assert_eq!(long.chars().count(), MAX_MESSAGE_CHARS + 1);
        // A huge message is read only as far as it can show (it was checked whole: 22 times
        // its size in memory).
        let huge = p.message(&"a".repeat(64 << 20)).unwrap();
        assert_eq!(huge.chars().count(), MAX_MESSAGE_CHARS + 1);
        let shown = p.message(&format!("{}TOK-X9", "a".repeat(100))).unwrap();
        assert!(shown.ends_with(PRIVATE_MARK), "{shown}");
        assert_eq!(p.message(" \u{7f}\t "), None);
        let dense = p.message("secret-host.example:4711secret-host.example").unwrap();
        assert!(!p.found_in(&dense), "{dense}");
        // Characters that show nothing, or sit on the one before, put inside a secret: what a
        // reader sees is found, and they go with it.
        for inside in
            ["\u{1d173}", "\u{fff9}", "\u{fffb}", "\u{300}", "\u{20dd}", "\u{64b}", "\u{5b0}", "\u{13430}", "é"]
        {
            let said = format!("bad tok=TOK{inside}-X9 url=http://secret-host{inside}.example:4711/rt end");
            assert_eq!(
                p.message(&said).as_deref(),
                Some("bad tok=<backend-private> url=<backend-private> end"),
                "U+{:04X}",
                inside.chars().next().unwrap() as u32
            );
        }
        let wide = p.message("token ｔｏｋ－Ｘ９ at ｓｅｃｒｅｔ－ｈｏｓｔ．ｅｘａｍｐｌｅ").unwrap();
        assert_eq!(wide, "token <backend-private> at <backend-private>");
        let encoded = p.message("see http%3A%2F%2Fsecret-host.example%3A4711%2Frt now").unwrap();
        assert_eq!(encoded, "see <backend-private> now");
        assert_eq!(p.message("100% sure, 50%2 done").as_deref(), Some("100% sure, 50%2 done"));
        assert_eq!(p.message("worker-0000é4711").as_deref(), Some("worker-0000é<backend-private>"));
        // A character a reader sees parts what is on either side: no port is spelt across it.
        for said in ["共4个任务711毫秒", "ファイル4件、処理時間711ミリ秒"] {
            assert_eq!(p.message(said).as_deref(), Some(said));
        }
    }

    /// A remote reached by a plain name (a container called `worker` or `runtime`) keeps
    /// its worker ids, codes and messages: the name alone is no secret (its URL, its
    /// authority and its token still are).
    #[test]
    fn a_host_that_is_a_plain_word_breaks_nothing() {
        for url in ["http://worker:42100", "http://runtime", "https://localhost:8443/"] {
            let p = PrivateText::new(url, Some(&Secret::new("tok-X9")));
            assert!(p.allows("worker-00000001") && p.allows("runtime") && p.allows("localhost"), "{url}");
            assert_eq!(p.code("runtime.cursor_unknown_or_expired"), "runtime.cursor_unknown_or_expired", "{url}");
            let said = "unknown profile `upper`; this runtime has: echo (worker-00000001)";
            assert_eq!(p.message(said).as_deref(), Some(said), "{url}");
            assert!(!p.allows("tok-x9"), "{url}");
        }
        // A path prefix counts right after the host it follows, whatever that host is.
        let tenant = PrivateText::new("http://localhost:43200/tenant-a7f3q", None);
        let said = tenant.message("GET https://localhost/tenant-a7f3q/v1/workers failed").unwrap();
        assert_eq!(said, "GET https://localhost<backend-private>/v1/workers failed");
        assert_eq!(tenant.message("tenant-a7f3q said no").as_deref(), Some("<backend-private> said no"));
        assert!(tenant.allows("tenant-a7f3qworker") && !tenant.allows("tenant-a7f3q"));
        let nested = PrivateText::new("http://10.0.0.7:9/acmecorp/prod", None);
        assert_eq!(nested.message("at acmecorp/prod").as_deref(), Some("at <backend-private>"));
        let short = PrivateText::new("http://10.0.0.7:9/api/v2", None);
        assert_eq!(short.message("turn 1 of v2").as_deref(), Some("turn 1 of v2"));
        let ip = PrivateText::new("http://127.0.0.1:9", None);
        assert!(ip.found_in("x127.0.0.127.0.0.1"), "an occurrence overlapping a near miss");
        let p = PrivateText::new("http://worker:42100", None);
        assert_eq!(
            p.message("at http://worker:42100/v1 and worker:42100, port 42100").as_deref(),
            Some("at <backend-private>/v1 and <backend-private>, port <backend-private>")
        );
    }

    #[test]
    fn only_rfc_3339_timestamps_pass() {
        let kept = |stamp: &str| {
            let mut stamp = Some(stamp.to_owned());
            keep_timestamp(&mut stamp);
            stamp.is_some()
        };
        for good in [
            "2026-11-27T06:51:11Z",
            "2026-11-27T06:51:11.334Z",
            "2026-11-27T06:51:11.123456789+01:00",
            "2026-01-01T00:00:00-08:00",
        ] {
            assert!(kept(good), "{good}");
        }
        for bad in [
            "",
            "2026-11-27",
            "2026-11-27T06:51:11Z tok-X9",
            "2026-11-27T06:51:11",
            "2026-11-27T06:51:11.Z",
            "2026-11-27T06:51:11.1234567890Z",
            "2026-11-27T06:51:11+0100",
            "http://secret-host.example:4711",
            "2026-11-27T06:51:1é",
        ] {
            assert!(!kept(bad), "{bad}");
        }
        let mut item: TranscriptItem = serde_json::from_value(serde_json::json!({"sequence": 1,
            "worker_ref": {"runtime_id": "r", "worker_id": "w"}, "role": "system", "content": "hi", "event_id": 1,
            "at": "tok-X9", "origin": "tok-X9"}))
        .unwrap();
        clean_entry(&mut item);
        assert_eq!((item.at, item.origin), (None, None));
    }
}
