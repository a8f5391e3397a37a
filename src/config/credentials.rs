//! Comparing what a client presents with the secrets the config loaded:
//! the admin token and the gateway's client keys.
//!
//! Both sides are hashed with SHA-256 first and the digests compared with
//! `subtle`, so how long a wrong guess takes depends on neither the content
//! nor the length of the secret. A key set is checked against every key,
//! without stopping at a match, so the time does not tell which key (or
//! whether any) matched either.

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// SHA-256 of a secret: what is kept and compared in place of the secret.
#[derive(Clone)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    /// The digest of `secret`.
    pub(crate) fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    /// Whether `offered` is the secret, in constant time.
    pub(crate) fn matches(&self, offered: &[u8]) -> bool {
        bool::from(self.0.ct_eq(&Self::of(offered).0))
    }
}

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Whether `offered` equals `expected`, in time independent of both.
#[cfg(test)]
fn secrets_match(offered: &[u8], expected: &[u8]) -> bool {
    SecretDigest::of(expected).matches(offered)
}

/// The gateway keys clients may present on the proxy port.
#[derive(Clone)]
pub struct KeySet {
    digests: Vec<SecretDigest>,
}

/// Shortest gateway key accepted: shorter ones are guessable.
pub(crate) const MIN_KEY_CHARS: usize = 16;

impl KeySet {
    /// Parses the keys an env var holds: separated by commas or newlines,
    /// surrounding whitespace ignored, empty entries skipped. Every key must
    /// be at least [`MIN_KEY_CHARS`] visible ASCII characters (it travels in
    /// a header); at least one key is needed. Errors never quote a key.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut digests = Vec::new();
        for (position, key) in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .enumerate()
        {
            let number = position + 1;
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "key {number} holds characters other than visible ASCII (it is sent in a header)"
                ));
            }
            if key.len() < MIN_KEY_CHARS {
                return Err(format!(
                    "key {number} is shorter than {MIN_KEY_CHARS} characters"
                ));
            }
            digests.push(SecretDigest::of(key.as_bytes()));
        }
        if digests.is_empty() {
            return Err("holds no key".to_owned());
        }
        Ok(Self { digests })
    }

    /// Whether `offered` is one of the keys. Every key is compared, match
    /// or not, so the time taken says nothing about which one matched.
    pub(crate) fn contains(&self, offered: &[u8]) -> bool {
        let offered = SecretDigest::of(offered);
        let found = self.digests.iter().fold(Choice::from(0), |found, key| {
            found | key.0.ct_eq(&offered.0)
        });
        bool::from(found)
    }

    /// How many keys there are.
    pub(crate) fn len(&self) -> usize {
        self.digests.len()
    }
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySet({} keys, <redacted>)", self.digests.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_on_commas_and_newlines() {
        let keys =
            KeySet::parse(" gw-key-aaaaaaaaaaaa ,gw-key-bbbbbbbbbbbb\r\n\ngw-key-cccccccccccc,")
                .unwrap();
        assert_eq!(keys.len(), 3);
        for key in [
            "gw-key-aaaaaaaaaaaa",
            "gw-key-bbbbbbbbbbbb",
            "gw-key-cccccccccccc",
        ] {
            assert!(keys.contains(key.as_bytes()), "{key}");
        }
        assert!(!keys.contains(b"gw-key-dddddddddddd"));
        assert!(!keys.contains(b""));
        assert!(!keys.contains(b"gw-key-aaaaaaaaaaa"));
    }

    #[test]
    fn bad_key_lists_are_refused_without_quoting_them() {
        for (text, says) in [
            ("", "no key"),
            (" , \n", "no key"),
            ("short", "shorter"),
            ("gw-key-aaaaaaaaaaaa,gw key with spaces", "key 2"),
        ] {
            let err = KeySet::parse(text).unwrap_err();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("aaaa") && !err.contains("spaces"), "{err}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(secrets_match(
            b"admin-token-0123456789",
            b"admin-token-0123456789"
        ));
        assert!(!secrets_match(
            b"admin-token-012345678",
            b"admin-token-0123456789"
        ));
        assert!(!secrets_match(b"", b"admin-token-0123456789"));
    }
}
