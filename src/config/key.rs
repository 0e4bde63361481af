//! How good the shared key is: not a published example, and long enough.
//!
//! Anyone who knows the key can sign events (pushed to every client of a library) and
//! client tokens (subscribing to any library), so a key copied from a manual or an
//! example file is as good as none. The server warns at start; `--self-test` fails.

/// Keys published in Seafile's manual and in this repository's examples and docs. The
/// manual's `[notification]` example (Seafile 10/11, and its cluster and proxy pages)
/// shows the first one; a key copied from there is known to every reader.
const PUBLISHED: &[&str] = &[
    "M@O8VWUb81YvmtWLHGB2I_V7di5-@0p(MF*GrE!sIws23F",
    "EXAMPLE-ONLY-not-a-secret-change-me",
    "EXAMPLE-ONLY-this-is-not-a-key-replace-me",
    "<a long random string, the same for every component>",
    "<the key seaf-server uses>",
    "the key seaf-server and seahub use",
    "...",
];

/// Shortest key that is not flagged: 32 bytes, what `openssl rand -base64 32` gives
/// (44 characters) comfortably exceeds, and HS256's own block of entropy.
pub const MIN_KEY_BYTES: usize = 32;

/// What is wrong with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWeakness {
    /// A key published in the manual or in this repository: anyone can forge tokens.
    Published,
    /// Shorter than [`MIN_KEY_BYTES`]: the number of bytes.
    Short(usize),
}

impl std::fmt::Display for KeyWeakness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyWeakness::Published => f.write_str(
                "jwt_private_key is an example key published in Seafile's manual or this project's examples: \
                 anyone who read it can forge events and subscribe to any library",
            ),
            KeyWeakness::Short(n) => write!(
                f,
                "jwt_private_key is only {n} bytes long (at least {MIN_KEY_BYTES} recommended): a short key can be guessed"
            ),
        }
    }
}

/// How to make a good key, for the warning and the self-test's fix line.
pub const GENERATE_HINT: &str = "generate one with `openssl rand -base64 32` and set it in every component \
     (seafile.conf [notification] jwt_private_key in Seafile 10/11, JWT_PRIVATE_KEY in 12/13)";

/// Checks the raw key bytes (surrounding whitespace ignored for the comparison, since a
/// pasted example often keeps a trailing space).
pub fn key_weakness(key: &[u8]) -> Option<KeyWeakness> {
    let trimmed = key.trim_ascii();
    if PUBLISHED.iter().any(|p| p.as_bytes() == trimmed) {
        return Some(KeyWeakness::Published);
    }
    (key.len() < MIN_KEY_BYTES).then_some(KeyWeakness::Short(key.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_short_and_good_keys() {
        assert_eq!(
            key_weakness(b"M@O8VWUb81YvmtWLHGB2I_V7di5-@0p(MF*GrE!sIws23F"),
            Some(KeyWeakness::Published)
        );
        assert_eq!(
            key_weakness(b"EXAMPLE-ONLY-not-a-secret-change-me "),
            Some(KeyWeakness::Published)
        );
        assert_eq!(key_weakness(b"secret"), Some(KeyWeakness::Short(6)));
        assert_eq!(key_weakness(b"Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE="), None);
    }
}
