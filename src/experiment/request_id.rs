//! Request ids that carry their own attribution.
//!
//! `abg1_<v>_<random>_<mac>_<experiment>`: `v` is the variant (`c`, `t`,
//! `u`), `random` 64 bits in hex, `mac` the first 64 bits of
//! HMAC-SHA256(key, "abg1|v|random|experiment") in hex, and the experiment
//! name last (it may contain `_`). Feedback quoting an id is attributed to
//! that arm by any replica holding the same key, with no shared state, and a
//! client cannot move its feedback to the other arm without the key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::experiment::assign::Variant;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "abg1";

/// Signs and verifies request ids.
#[derive(Clone)]
pub struct RequestIds {
    /// HMAC already keyed, with `abg1|<v>|` already fed, for control,
    /// treatment and unassigned in that order: signing an id clones one and
    /// feeds only what varies (the key's two SHA-256 blocks are not hashed
    /// again per id).
    prefixed: [HmacSha256; 3],
}

impl std::fmt::Debug for RequestIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestIds { key: <redacted> }")
    }
}

/// What a valid request id says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attribution {
    pub(crate) variant: Variant,
    pub(crate) experiment: String,
    /// The id's MAC: unforgeable and unique per id, the key a report is
    /// remembered by.
    pub(crate) mac: u64,
}

/// `abg1_<v>_` + 16 hex digits + `_` + 16 hex digits + `_`: the part of an
/// id before its experiment, always this long.
const HEAD_LEN: usize = PREFIX.len() + 3 + 16 + 1 + 16 + 1;

impl RequestIds {
    /// Ids signed with `key` (shared by every replica of a fleet).
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        let key: Vec<u8> = key.into();
        // HMAC takes keys of any length: this cannot fail.
        let keyed = HmacSha256::new_from_slice(&key)
            .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()));
        let prefixed = [Variant::Control, Variant::Treatment, Variant::Unassigned].map(|variant| {
            let mut hmac = keyed.clone();
            for part in [PREFIX, "|", variant_code(variant), "|"] {
                hmac.update(part.as_bytes());
            }
            hmac
        });
        Self { prefixed }
    }

    /// Ids signed with a random key: only this process can verify them.
    pub(crate) fn with_random_key() -> Self {
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        Self::new(key)
    }

    /// A fresh id for a request served by `variant` in `experiment`, built
    /// in one allocation.
    pub fn issue(&self, variant: Variant, experiment: &str) -> String {
        let mut random = [0u8; 16];
        hex_into(&fastrand::u64(..).to_be_bytes(), &mut random);
        let digest = self
            .signing(variant, &random, experiment)
            .finalize()
            .into_bytes();
        let mut mac = [0u8; 16];
        hex_into(&digest[..8], &mut mac);
        // The fixed-length head assembled on the stack, then one copy.
        let mut head = [0u8; HEAD_LEN];
        let code = variant_code(variant).as_bytes();
        let mut at = 0;
        for part in [
            PREFIX.as_bytes(),
            b"_",
            code,
            b"_",
            &random,
            b"_",
            &mac,
            b"_",
        ] {
            if let Some(slot) = head.get_mut(at..at + part.len()) {
                slot.copy_from_slice(part);
            }
            at += part.len();
        }
        let mut id = String::with_capacity(HEAD_LEN + experiment.len());
        // Only ASCII letters, digits and `_`: always UTF-8.
        id.push_str(std::str::from_utf8(&head).unwrap_or_default());
        id.push_str(experiment);
        id
    }

    /// The HMAC of `abg1|<v>|<random>|<experiment>`, all fed but the end:
    /// what an id's mac is the first 64 bits of.
    fn signing(&self, variant: Variant, random: &[u8], experiment: &str) -> HmacSha256 {
        let [control, treatment, unassigned] = &self.prefixed;
        let mut hmac = match variant {
            Variant::Control => control,
            Variant::Treatment => treatment,
            Variant::Unassigned => unassigned,
        }
        .clone();
        hmac.update(random);
        hmac.update(b"|");
        hmac.update(experiment.as_bytes());
        hmac
    }

    /// The arm and experiment of an id this key signed; `None` for anything
    /// else (malformed, forged, or signed with another key).
    pub(crate) fn verify(&self, id: &str) -> Option<Attribution> {
        let mut parts = id.splitn(5, '_');
        let (prefix, code, random, mac, experiment) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if prefix != PREFIX || random.len() != 16 || mac.len() != 16 || experiment.is_empty() {
            return None;
        }
        let variant = match code {
            "c" => Variant::Control,
            "t" => Variant::Treatment,
            "u" => Variant::Unassigned,
            _ => return None,
        };
        let expected = decode_hex(mac)?;
        let mac_bits = u64::from_str_radix(mac, 16).ok()?;
        // Constant time: a forger learns nothing from how fast a guess fails.
        self.signing(variant, random.as_bytes(), experiment)
            .verify_truncated_left(&expected)
            .ok()?;
        Some(Attribution {
            variant,
            experiment: experiment.to_owned(),
            mac: mac_bits,
        })
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

fn variant_code(variant: Variant) -> &'static str {
    match variant {
        Variant::Control => "c",
        Variant::Treatment => "t",
        Variant::Unassigned => "u",
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_is_hmac_sha256_of_the_documented_message() {
        // Computed here from the format in the module's doc, independently
        // of how ids are signed: a replica (or an offline check) that
        // follows the doc agrees with every id issued.
        let key = b"fleet-key";
        let ids = RequestIds::new(key.to_vec());
        for (variant, code) in [
            (Variant::Control, "c"),
            (Variant::Treatment, "t"),
            (Variant::Unassigned, "u"),
        ] {
            let id = ids.issue(variant, "exp_a.v1");
            let parts: Vec<&str> = id.splitn(5, '_').collect();
            assert_eq!(
                (parts[0], parts[1], parts[4]),
                ("abg1", code, "exp_a.v1"),
                "{id}"
            );
            let mut hmac = HmacSha256::new_from_slice(key).unwrap();
            hmac.update(format!("abg1|{code}|{}|exp_a.v1", parts[2]).as_bytes());
            let digest = hmac.finalize().into_bytes();
            let expected: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(parts[3], expected, "{id}");
        }
    }

    #[test]
    fn issued_ids_verify_and_forgeries_do_not() {
        let ids = RequestIds::new(b"fleet-key".to_vec());
        let id = ids.issue(Variant::Treatment, "support_ft.v3");
        assert!(id.starts_with("abg1_t_"));
        assert_eq!(
            ids.verify(&id),
            Some(Attribution {
                variant: Variant::Treatment,
                experiment: "support_ft.v3".into(),
                mac: u64::from_str_radix(id.split('_').nth(3).unwrap_or(""), 16).unwrap_or(0),
            })
        );
        // Each arm's id is signed with its own prefix.
        for variant in [Variant::Control, Variant::Treatment, Variant::Unassigned] {
            let id = ids.issue(variant, "exp_a");
            assert_eq!(
                ids.verify(&id).map(|found| found.variant),
                Some(variant),
                "{id}"
            );
            assert_eq!(id.len(), HEAD_LEN + "exp_a".len(), "{id}");
        }
        // Another replica with the same key agrees; one with another key does not.
        assert!(RequestIds::new(b"fleet-key".to_vec()).verify(&id).is_some());
        assert!(RequestIds::new(b"other".to_vec()).verify(&id).is_none());
        // Flipping the arm breaks the signature.
        assert!(ids.verify(&id.replacen("abg1_t_", "abg1_c_", 1)).is_none());
        assert!(ids.verify(&format!("{id}x")).is_none());
        for junk in [
            "",
            "abg1",
            "abg1_t_00_00_x",
            "abg1_x_0000000000000000_0000000000000000_e",
            "é_t_1",
        ] {
            assert!(ids.verify(junk).is_none(), "{junk}");
        }
    }
}
