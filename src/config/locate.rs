//! Where in a config file a problem is: `file:line`, and the table it is in (`server`,
//! `runtimes[1] (id "lab")`, `profiles.upper`), so a message can be acted on without a search.
//!
//! Parse errors carry a byte span; validation errors name the table they come from and,
//! in their text, the key (`runtimes.base_url …`), which is looked up in that table.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A config file's name (`None` when there is no file: flags only) and text.
pub(super) struct Source {
    name: Option<String>,
    text: String,
}

/// Where a problem is: the table's label, its line, and the key it is about, when known.
#[derive(Default)]
struct Place {
    label: String,
    line: Option<usize>,
    key: Option<String>,
    /// Only blanks come before it on its line (in a document that does not parse).
    at_line_start: bool,
}

impl Source {
    /// A source named `name` (a path as the user wrote it, or what stands for it).
    pub(super) fn new(name: Option<String>, text: String) -> Source {
        Source { name, text }
    }

    /// The file's text.
    pub(super) fn text(&self) -> &str {
        &self.text
    }

    /// A TOML syntax or schema error (unknown key, wrong type, missing key), located by its
    /// span, with serde's wording made plain (`unknown key "x"; valid keys: …`). `other` is
    /// the top-level table only the other command's config has, and that command: a file
    /// given to the wrong command says so.
    pub(super) fn parse_error(&self, error: &toml::de::Error, other: (&str, &str)) -> anyhow::Error {
        let mut place = match error.span() {
            Some(span) => self.place_of(span.start),
            None => Place::default(),
        };
        let raw = error.message();
        let message = if place.key.is_none() && raw.starts_with("duplicate key") {
            // At a table's header: the table itself is given twice.
            "this table is given twice; put its keys under one header".to_owned()
        } else if raw.starts_with("missing comma between array elements") && place.at_line_start {
            // A line that starts with a key, read as an element: the array above is open.
            place.key = None;
            "an array above is not closed: `]` is missing before this line".to_owned()
        } else if place.label.is_empty() && place.key.as_deref() == Some(other.0) {
            let said = plain_message(raw, place.key.as_deref());
            format!("{said} (this looks like the config of `worker-gateway {}`)", other.1)
        } else {
            plain_message(raw, place.key.as_deref())
        };
        self.located(&place, &message)
    }

    /// `error`, found while validating table `path` (its element `index` for an array of
    /// tables), located at the key its message names, else at the table's header.
    pub(super) fn table_error(&self, path: &[&str], index: Option<usize>, error: &anyhow::Error) -> anyhow::Error {
        let mut label = path.join(".");
        if let Some(i) = index {
            label.push_str(&format!("[{i}]"));
        }
        let mut place = Place { label, ..Place::default() };
        let message = format!("{error:#}");
        let message = message.strip_prefix("config: ").unwrap_or(&message);
        // "runtimes.base_url must …" reads "base_url must …" after the label.
        let message = message.strip_prefix(&format!("{}.", path.join("."))).unwrap_or(message);
        if let Ok(doc) = DeTable::parse(&self.text) {
            if let Some((value, table)) = find_table(doc.get_ref(), path, index) {
                place.label = with_id(place.label, table);
                let named =
                    table.iter().filter_map(|(k, _)| Some((word_at(message, k.get_ref())?, k.span().start))).min();
                let offset = named.map_or(value.span().start, |(_, start)| start);
                place.line = Some(self.line_of(offset));
            }
        }
        self.located(&place, message)
    }

    /// `error` about the file as a whole.
    pub(super) fn file_error(&self, error: &anyhow::Error) -> anyhow::Error {
        let message = format!("{error:#}");
        self.located(&Place::default(), message.strip_prefix("config: ").unwrap_or(&message))
    }

    fn located(&self, place: &Place, message: &str) -> anyhow::Error {
        let mut text = String::new();
        if let Some(name) = &self.name {
            text.push_str(name);
            if let Some(line) = place.line {
                text.push_str(&format!(":{line}"));
            }
            text.push_str(": ");
        }
        if !place.label.is_empty() {
            text.push_str(&place.label);
            text.push_str(": ");
        }
        text.push_str(message);
        anyhow::anyhow!(text)
    }

    /// The 1-based line of byte `offset`.
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
    }

    /// The innermost table holding byte `offset`, and the key there. In a document that does
    /// not parse at all (a key given twice), the table is the last header above `offset` and
    /// the key the bare key starting there.
    fn place_of(&self, offset: usize) -> Place {
        let mut place = Place { line: Some(self.line_of(offset)), ..Place::default() };
        match DeTable::parse(&self.text) {
            Ok(doc) => descend(doc.get_ref(), String::new(), offset, &mut place),
            Err(_) => {
                let (before, after) = self.text.split_at(offset.min(self.text.len()));
                let line_start = before.rfind('\n').map_or(0, |at| at + 1);
                let line = self.text[line_start..].lines().next().unwrap_or_default();
                if let Some(header) = table_header(line) {
                    // At a header: the place is that table, not the one above.
                    place.label = header;
                    place.at_line_start = true;
                    return place;
                }
                place.label = before.lines().rev().find_map(table_header).unwrap_or_default();
                place.at_line_start = before[line_start..].trim().is_empty();
                let bare = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
                let key: String = after.chars().take_while(|c| bare(*c)).collect();
                place.key = (!key.is_empty()).then_some(key);
            }
        }
        place
    }
}

/// Walks down to the table holding `offset`, filling in its label and the key there.
fn descend(table: &DeTable<'_>, label: String, offset: usize, place: &mut Place) {
    for (key, value) in table.iter() {
        let name = key.get_ref().as_ref();
        if key.span().contains(&offset) {
            *place = Place { label, key: Some(name.to_owned()), ..*place };
            return;
        }
        let child = |suffix: String| if label.is_empty() { suffix } else { format!("{label}.{suffix}") };
        match value.get_ref() {
            DeValue::Table(inner) if extent(value, inner).contains(&offset) => {
                return descend(inner, child(name.to_owned()), offset, place);
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(inner) = item.get_ref() {
                        if extent(item, inner).contains(&offset) {
                            return descend(inner, with_id(child(format!("{name}[{i}]")), inner), offset, place);
                        }
                    }
                }
                if value.span().contains(&offset) {
                    *place = Place { label, key: Some(name.to_owned()), ..*place };
                    return;
                }
            }
            _ if value.span().contains(&offset) => {
                *place = Place { label, key: Some(name.to_owned()), ..*place };
                return;
            }
            _ => {}
        }
    }
    place.label = label;
}

/// The name in a `[table]` or `[[array]]` header line.
fn table_header(line: &str) -> Option<String> {
    let line = line.trim();
    let inner = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]"));
    let inner = inner.or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')))?;
    Some(inner.trim().to_owned())
}

/// From a table's header (or first key) to the end of its last value.
fn extent(value: &Spanned<DeValue<'_>>, table: &DeTable<'_>) -> Range<usize> {
    let own = value.span();
    let (start, end) = table
        .iter()
        .fold((own.start, own.end), |(s, e), (k, v)| (s.min(k.span().start).min(v.span().start), e.max(v.span().end)));
    start..end
}

/// Table `path` (element `index` of it when it is an array of tables): its value and table.
fn find_table<'t, 'i>(
    root: &'t DeTable<'i>,
    path: &[&str],
    index: Option<usize>,
) -> Option<(&'t Spanned<DeValue<'i>>, &'t DeTable<'i>)> {
    let (last, parents) = path.split_last()?;
    let mut table = root;
    for name in parents {
        table = entry(table, name)?.get_ref().as_table()?;
    }
    let value = entry(table, last)?;
    let value = match (value.get_ref(), index) {
        (DeValue::Table(_), None) => value,
        (DeValue::Array(items), Some(i)) => items.get(i)?,
        _ => return None,
    };
    Some((value, value.get_ref().as_table()?))
}

fn entry<'t, 'i>(table: &'t DeTable<'i>, name: &str) -> Option<&'t Spanned<DeValue<'i>>> {
    table.iter().find(|(k, _)| k.get_ref().as_ref() == name).map(|(_, v)| v)
}

/// `label (id "lab")` when the table has a string `id`: which of the `[[runtimes]]` it is.
fn with_id(label: String, table: &DeTable<'_>) -> String {
    match entry(table, "id").and_then(|id| id.get_ref().as_str()) {
        Some(id) => format!("{label} (id {id:?})"),
        None => label,
    }
}

/// Where `word` first occurs in `text` as a whole word (not inside a longer key name).
fn word_at(text: &str, word: &str) -> Option<usize> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

/// serde's wording, made plain: "unknown field `x`, expected one of `a`, `b`" becomes
/// `unknown key "x"; valid keys: a, b`; a message about a value starts with its key.
fn plain_message(message: &str, key: Option<&str>) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = expected.trim_start_matches(", ");
        let valid = expected
            .strip_prefix("expected one of ")
            .or_else(|| expected.strip_prefix("expected "))
            .map(|list| list.replace('`', ""));
        return match valid {
            Some(list) => format!("unknown key \"{name}\"; valid keys: {list}"),
            None => format!("unknown key \"{name}\"; no keys are valid here"),
        };
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        return format!("missing key \"{}\"", rest.trim_end_matches('`'));
    }
    match key {
        Some(key) if !message.contains(key) => format!("{key}: {message}"),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[server]\nbind = \"x\"\nthreads = 8\n\n[[runtimes]]\nid = \"local\"\nkind = \"embedded\"\n\n\
                        [[runtimes]]\nid = \"lab\"\nkind = \"remote\"\n# a comment\nbase_url = \"ftp://x\"\n\n\
                        [profiles.upper]\nkind = \"command\"\n";

    fn source() -> Source {
        Source::new(Some("config/x.toml".into()), TEXT.into())
    }

    #[test]
    fn a_span_is_placed_in_its_table_with_its_key() {
        let s = source();
        let at = |needle: &str| s.place_of(TEXT.find(needle).unwrap());
        let place = at("base_url");
        assert_eq!(
            (place.label.as_str(), place.line, place.key.as_deref()),
            ("runtimes[1] (id \"lab\")", Some(13), Some("base_url"))
        );
        let place = at("threads");
        assert_eq!((place.label.as_str(), place.line, place.key.as_deref()), ("server", Some(3), Some("threads")));
        let place = at("[profiles.upper]");
        assert_eq!((place.label.as_str(), place.line), ("profiles.upper", Some(15)));
        let place = at("\"embedded\"");
        assert_eq!((place.label.as_str(), place.key.as_deref()), ("runtimes[0] (id \"local\")", Some("kind")));
    }

    /// A key given twice leaves no document to walk: the error still names its table and key.
    #[test]
    fn a_key_given_twice_is_named_with_its_table() {
        let text = "[server]\nbind = \"x\"\n\n[[runtimes]]\nid = \"a\"\nstore = \"fs\"\nstore = \"memory\"\n";
        let s = Source::new(Some("g.toml".into()), text.into());
        let error = toml::from_str::<toml::Table>(text).expect_err("a duplicate key");
        let message = s.parse_error(&error, ("runtime", "runtime")).to_string();
        assert!(message.starts_with("g.toml:7: runtimes: store: "), "{message}");
    }

    /// A table given twice, an array left open and the other command's config each get a
    /// message that names the real mistake, not the key where the parser noticed it.
    #[test]
    fn common_mistakes_are_named_as_such() {
        let error = |text: &str, other: (&str, &str)| {
            let s = Source::new(Some("g.toml".into()), text.into());
            let parsed = toml::from_str::<RuntimeLike>(text).expect_err("an error");
            s.parse_error(&parsed, other).to_string()
        };
        let twice = error("[server]\nbind = \"x\"\n\n[server]\nthreads = 4\n", ("runtime", "runtime"));
        assert_eq!(twice, "g.toml:4: server: this table is given twice; put its keys under one header");
        let open = error("[profiles.x]\nargv = [\"a\", \"b\"\nturn_timeout_ms = 5\n", ("runtime", "runtime"));
        assert_eq!(open, "g.toml:3: profiles.x: an array above is not closed: `]` is missing before this line");
        let open = error("[server]\nallowed_hosts = [\"a\", \"b\"\n\n[profiles]\n", ("runtime", "runtime"));
        assert!(open.ends_with("an array above is not closed: `]` is missing before this line"), "{open}");
        let other = error("[[runtime]]\nid = \"a\"\n", ("runtime", "runtime"));
        assert!(other.ends_with("(this looks like the config of `worker-gateway runtime`)"), "{other}");
    }

    /// Stands for a config with its tables, to get serde's unknown-key error.
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct RuntimeLike {
        server: Option<toml::Table>,
        profiles: Option<toml::Table>,
    }

    #[test]
    fn validation_errors_point_at_the_key_they_name() {
        let s = source();
        let error = anyhow::anyhow!("runtimes.base_url must start with http:// or https://");
        assert_eq!(
            s.table_error(&["runtimes"], Some(1), &error).to_string(),
            "config/x.toml:13: runtimes[1] (id \"lab\"): base_url must start with http:// or https://"
        );
        let error = anyhow::anyhow!("config: server.threads (8) must be larger than every max_in_flight");
        assert!(
            s.table_error(&["server"], None, &error).to_string().starts_with("config/x.toml:3: server: threads (8)")
        );
        let error = anyhow::anyhow!("argv is required");
        assert_eq!(
            s.table_error(&["profiles", "upper"], None, &error).to_string(),
            "config/x.toml:15: profiles.upper: argv is required"
        );
        let flags = Source::new(None, String::new());
        assert_eq!(flags.table_error(&["runtime"], None, &error).to_string(), "runtime: argv is required");
    }

    #[test]
    fn serde_wording_is_made_plain() {
        assert_eq!(
            plain_message("unknown field `bse_url`, expected one of `id`, `kind`", Some("bse_url")),
            "unknown key \"bse_url\"; valid keys: id, kind"
        );
        assert_eq!(plain_message("unknown field `x`, expected `id`", None), "unknown key \"x\"; valid keys: id");
        assert_eq!(
            plain_message("unknown field `x`, there are no fields", None),
            "unknown key \"x\"; no keys are valid here"
        );
        assert_eq!(plain_message("missing field `kind`", None), "missing key \"kind\"");
        assert_eq!(
            plain_message("invalid type: string \"8\", expected usize", Some("threads")),
            "threads: invalid type: string \"8\", expected usize"
        );
        assert_eq!(word_at("runtimes.id `a` is used", "id"), Some(9));
        assert_eq!(word_at("the idle id", "id"), Some(9));
        assert_eq!(word_at("max_in_flight", "in"), None);
    }
}
