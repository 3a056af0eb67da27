//! Secrets (tokens) that must never reach a log, a response or `Debug` output.

use std::fmt;

/// Bytes a token may have: a token file larger than this is not a token file.
const MAX_TOKEN_BYTES: usize = 4096;

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
        Self::checked(value.as_str(), &format!("environment variable `{var}`"))
    }

    /// Reads the token from the file at `path` (a regular file, as long as a token at most).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let source = format!("token file {}", path.display());
        let bytes = crate::files::read_small_file(path, MAX_TOKEN_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::FileTooLarge => {
                anyhow::anyhow!("{source} is larger than a token ({MAX_TOKEN_BYTES} bytes at most)")
            }
            _ => anyhow::anyhow!("cannot read {source}: {e}"),
        })?;
        let value = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{source} is not UTF-8 text"))?;
        Self::checked(&value, &source)
    }

    /// A token as read from `source`: not empty, and only what an `Authorization` header can
    /// carry (visible ASCII; surrounding whitespace is trimmed first).
    fn checked(value: &str, source: &str) -> anyhow::Result<Self> {
        let secret = Secret::new(value);
        anyhow::ensure!(!secret.0.is_empty(), "{source} holds an empty token");
        anyhow::ensure!(
            secret.0.len() <= MAX_TOKEN_BYTES,
            "{source} is longer than a token ({MAX_TOKEN_BYTES} bytes at most)"
        );
        anyhow::ensure!(
            secret.0.bytes().all(|b| b.is_ascii_graphic()),
            "{source} holds a character a token cannot have (spaces, control characters and non-ASCII cannot go in an Authorization header)"
        );
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
    fn a_token_is_short_visible_ascii() {
        let dir = std::env::temp_dir().join(format!("wg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            Secret::from_file(&path).map(|s| s.expose().to_owned()).map_err(|e| e.to_string())
        };
        assert_eq!(file("ok", b"tok-123_abc.DEF~\n"), Ok("tok-123_abc.DEF~".to_owned()));
        assert!(file("ctl", b"tok\x01en").unwrap_err().contains("a character a token cannot have"));
        assert!(file("space", b"two words").unwrap_err().contains("a character a token cannot have"));
        assert!(file("big", &[b'a'; 5000]).unwrap_err().contains("larger than a token"));
        let endless = Secret::from_file(std::path::Path::new("/dev/zero")).map(drop).unwrap_err().to_string();
        assert!(endless.contains("not a regular file"), "{endless}");
        std::fs::remove_dir_all(&dir).unwrap();
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
