//! Secrets (tokens) that must never reach a log, a response or `Debug` output.

use std::fmt;

/// A bearer token loaded from the environment or a file.
///
/// `Debug` and `Display` print `<redacted>`; the value is only reachable through
/// [`Secret::expose`] (to put it in an `Authorization` header) and [`Secret::matches`].
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token. Surrounding whitespace (a trailing newline in a token file) is trimmed.
    pub fn new(value: &str) -> Self {
        Secret(value.trim().to_owned())
    }

    /// Reads the token from environment variable `var`.
    pub fn from_env(var: &str) -> anyhow::Result<Self> {
        let value = std::env::var(var).map_err(|_| anyhow::anyhow!("environment variable `{var}` is not set"))?;
        Self::non_empty(value.as_str(), &format!("environment variable `{var}`"))
    }

    /// Reads the token from the file at `path`.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let value = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", path.display()))?;
        Self::non_empty(&value, &format!("token file {}", path.display()))
    }

    fn non_empty(value: &str, source: &str) -> anyhow::Result<Self> {
        let secret = Secret::new(value);
        anyhow::ensure!(!secret.0.is_empty(), "{source} holds an empty token");
        Ok(secret)
    }

    /// The raw value, for an outgoing `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares `candidate` with the secret in constant time (for equal lengths).
    pub fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }

    /// True when `authorization` is `Bearer <this secret>` (the scheme in any case, as
    /// RFC 9110 has it).
    pub fn matches_bearer(&self, authorization: Option<&str>) -> bool {
        let token = authorization.and_then(|value| {
            let (scheme, token) = value.trim_start().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        });
        token.is_some_and(|token| self.matches(token.trim()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
    }

    #[test]
    fn compares_whole_values_only() {
        let s = Secret::new("abc\n");
        assert!(s.matches("abc"));
        assert!(!s.matches("ab"));
        assert!(!s.matches("abd"));
        assert!(s.matches_bearer(Some("Bearer abc")));
        assert!(s.matches_bearer(Some("bearer abc")) && s.matches_bearer(Some("BEARER  abc")), "any case");
        assert!(!s.matches_bearer(Some("Basic abc")));
        assert!(!s.matches_bearer(None));
    }
}
