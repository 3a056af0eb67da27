//! Request-target parsing shared by both servers: path segments, ids and query strings.

use std::collections::HashMap;

use percent_encoding::percent_decode_str;

use super::error::ApiError;

/// Longest accepted id.
pub const MAX_ID_LEN: usize = 120;

/// True when `id` matches `[A-Za-z0-9_:.-]{1,120}` and is not `.` or `..`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
        && id != "."
        && id != ".."
}

/// Checks an id taken from a path segment: 400 `invalid_id` (or `code`) when malformed.
pub fn check_id(what: &str, id: &str, code: &'static str) -> Result<(), ApiError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            code,
            format!(
                "{what} `{}` is not a valid id ([A-Za-z0-9_:.-], 1 to {MAX_ID_LEN} characters)",
                super::error::printable(id)
            ),
        ))
    }
}

/// A request target split into percent-decoded path segments and a query string.
#[derive(Debug)]
pub struct Target {
    /// Path segments, percent-decoded after splitting on `/` (so `%2F` stays inside one).
    /// Segments that are not UTF-8 after decoding are kept lossily (they fail id checks).
    pub segments: Vec<String>,
    /// The raw query string (without `?`), empty when absent.
    pub query: String,
}

impl Target {
    /// Parses a raw request target (`/a/b?x=1`); a trailing `/` is ignored.
    pub fn parse(raw: &str) -> Target {
        let (path, query) = raw.split_once('?').unwrap_or((raw, ""));
        let path = path.strip_suffix('/').unwrap_or(path);
        let segments =
            path.split('/').skip(1).map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned()).collect();
        Target { segments, query: query.to_owned() }
    }

    /// The segments as `&str`s, for slice-pattern matching.
    pub fn parts(&self) -> Vec<&str> {
        self.segments.iter().map(String::as_str).collect()
    }
}

/// Parsed query parameters. A parameter given twice is refused when it is read (which of
/// the two was meant cannot be told).
#[derive(Debug, Default)]
pub struct Query {
    values: HashMap<String, String>,
    repeated: Vec<String>,
}

impl Query {
    /// Parses `a=1&b=2` (form-urlencoded).
    pub fn parse(query: &str) -> Query {
        let mut parsed = Query::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()).into_owned() {
            match parsed.values.entry(name) {
                std::collections::hash_map::Entry::Occupied(seen) => parsed.repeated.push(seen.key().clone()),
                std::collections::hash_map::Entry::Vacant(new) => {
                    new.insert(value);
                }
            }
        }
        parsed
    }

    /// The raw value of `name`; 400 `invalid_query` when it is given more than once.
    pub fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        if self.repeated.iter().any(|r| r == name) {
            let message = format!("query parameter `{}` is given more than once", super::error::printable(name));
            return Err(ApiError::bad_request("invalid_query", message));
        }
        Ok(self.values.get(name).map(String::as_str))
    }

    /// `name` as an unsigned integer; 400 `invalid_query` when present but not a number.
    pub fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name)? {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(
                    "invalid_query",
                    format!(
                        "query parameter `{name}` must be a non-negative integer, got `{}`",
                        super::error::printable(v)
                    ),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("worker-00000001"));
        assert!(valid_id("a:b.c_d-e"));
        for bad in ["", ".", "..", "a/b", "a b", "é", "a\0b", &"x".repeat(121)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn segments_decode_after_split() {
        let t = Target::parse("/api/runtimes/my%20rt%2Fx/workers/?limit=3");
        assert_eq!(t.segments, ["api", "runtimes", "my rt/x", "workers"]);
        assert_eq!(t.query, "limit=3");
        assert_eq!(Target::parse("/").segments, Vec::<String>::new());
    }

    #[test]
    fn query_numbers() {
        let q = Query::parse("start=2&limit=abc&x=%20");
        assert_eq!(q.number("start").unwrap(), Some(2));
        assert_eq!(q.number("missing").unwrap(), None);
        assert_eq!(q.number("limit").unwrap_err().code, "invalid_query");
        assert_eq!(q.get("x").unwrap(), Some(" "));
        let twice = Query::parse("limit=10&limit=20&start=1");
        assert_eq!(twice.number("limit").unwrap_err().code, "invalid_query");
        assert_eq!(twice.number("start").unwrap(), Some(1));
    }
}
