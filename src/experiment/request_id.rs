//! Request ids that carry their own attribution.
//!
//! `abg2_<v>_<issued>_<random>_<mac>_<experiment>`: `v` is the variant
//! (`c`, `t`, `u`), `issued` the Unix time in seconds it was issued as 8
//! hex digits, `random` 64 bits in hex, `mac` the first 64 bits of
//! HMAC-SHA256(key, "abg2|v|issued|random|experiment") in hex, and the
//! experiment name last (it may contain `_`). Feedback quoting an id is
//! attributed to that arm, and its age known, by any replica holding the
//! same key, with no shared state; a client cannot move its feedback to the
//! other arm, or make it younger, without the key.
//!
//! Ids of the earlier format, `abg1_<v>_<random>_<mac>_<experiment>`
//! (HMAC over "abg1|v|random|experiment"), still verify, with no issue
//! time, so that feedback on answers served before an upgrade counts.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::experiment::assign::Variant;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "abg2";
const PREFIX_V1: &str = "abg1";

/// Signs and verifies request ids.
#[derive(Clone)]
pub struct RequestIds {
    /// HMAC already keyed, with `abg2|<v>|` already fed, for control,
    /// treatment and unassigned in that order: signing an id clones one and
    /// feeds only what varies (the key's two SHA-256 blocks are not hashed
    /// again per id).
    prefixed: [HmacSha256; 3],
    /// The same with `abg1|<v>|`, to verify ids of the earlier format.
    prefixed_v1: [HmacSha256; 3],
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
    /// When it was issued (Unix seconds); none for an id of the earlier
    /// format.
    pub(crate) issued_at: Option<u64>,
}

/// `abg2_<v>_` + 8, 16 and 16 hex digits each followed by `_`: the part of
/// an id before its experiment, always this long.
const HEAD_LEN: usize = PREFIX.len() + 3 + 8 + 1 + 16 + 1 + 16 + 1;

impl RequestIds {
    /// Ids signed with `key` (shared by every replica of a fleet).
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        let key: Vec<u8> = key.into();
        // HMAC takes keys of any length: this cannot fail.
        let keyed = HmacSha256::new_from_slice(&key)
            .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()));
        let prefixed_with = |prefix: &str| {
            [Variant::Control, Variant::Treatment, Variant::Unassigned].map(|variant| {
                let mut hmac = keyed.clone();
                for part in [prefix, "|", variant_code(variant), "|"] {
                    hmac.update(part.as_bytes());
                }
                hmac
            })
        };
        Self {
            prefixed: prefixed_with(PREFIX),
            prefixed_v1: prefixed_with(PREFIX_V1),
        }
    }

    /// Ids signed with a random key: only this process can verify them.
    pub(crate) fn with_random_key() -> Self {
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        Self::new(key)
    }

    /// A fresh id for a request served by `variant` in `experiment`, built
    /// in one allocation.
    pub fn issue(&self, variant: Variant, experiment: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.issue_at(variant, experiment, now)
    }

    /// An id issued at `unix_seconds` (kept to 32 bits: until 2106).
    pub(crate) fn issue_at(&self, variant: Variant, experiment: &str, unix_seconds: u64) -> String {
        let mut issued = [0u8; 8];
        hex_into(&(unix_seconds as u32).to_be_bytes(), &mut issued);
        let mut random = [0u8; 16];
        hex_into(&fastrand::u64(..).to_be_bytes(), &mut random);
        let mut hmac = self.signing(&self.prefixed, variant, &issued);
        hmac.update(b"|");
        hmac.update(&random);
        let digest = finish(hmac, experiment).finalize().into_bytes();
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
            &issued,
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

    /// An HMAC from `prefixed` (one per arm) fed `first`: the first field
    /// after the prefix and arm.
    fn signing(&self, prefixed: &[HmacSha256; 3], variant: Variant, first: &[u8]) -> HmacSha256 {
        let [control, treatment, unassigned] = prefixed;
        let mut hmac = match variant {
            Variant::Control => control,
            Variant::Treatment => treatment,
            Variant::Unassigned => unassigned,
        }
        .clone();
        hmac.update(first);
        hmac
    }

    /// The arm, experiment and issue time of an id this key signed; `None`
    /// for anything else (malformed, forged, or signed with another key).
    pub(crate) fn verify(&self, id: &str) -> Option<Attribution> {
        let (prefix, rest) = id.split_once('_')?;
        let (code, rest) = rest.split_once('_')?;
        let variant = match code {
            "c" => Variant::Control,
            "t" => Variant::Treatment,
            "u" => Variant::Unassigned,
            _ => return None,
        };
        let (hmac, issued_at, mac, experiment) = match prefix {
            PREFIX => {
                let mut parts = rest.splitn(4, '_');
                let (issued, random, mac, experiment) =
                    (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
                if issued.len() != 8 || random.len() != 16 || !is_hex(issued) || !is_hex(random) {
                    return None;
                }
                let mut hmac = self.signing(&self.prefixed, variant, issued.as_bytes());
                hmac.update(b"|");
                hmac.update(random.as_bytes());
                let issued_at = u64::from_str_radix(issued, 16).ok()?;
                (hmac, Some(issued_at), mac, experiment)
            }
            PREFIX_V1 => {
                let mut parts = rest.splitn(3, '_');
                let (random, mac, experiment) = (parts.next()?, parts.next()?, parts.next()?);
                if random.len() != 16 {
                    return None;
                }
                let hmac = self.signing(&self.prefixed_v1, variant, random.as_bytes());
                (hmac, None, mac, experiment)
            }
            _ => return None,
        };
        if mac.len() != 16 || experiment.is_empty() {
            return None;
        }
        let expected = decode_hex(mac)?;
        let mac_bits = u64::from_str_radix(mac, 16).ok()?;
        // Constant time: a forger learns nothing from how fast a guess fails.
        finish(hmac, experiment)
            .verify_truncated_left(&expected)
            .ok()?;
        Some(Attribution {
            variant,
            experiment: experiment.to_owned(),
            mac: mac_bits,
            issued_at,
        })
    }
}

/// Feeds the experiment, the signed message's last field.
fn finish(mut hmac: HmacSha256, experiment: &str) -> HmacSha256 {
    hmac.update(b"|");
    hmac.update(experiment.as_bytes());
    hmac
}

fn is_hex(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_hexdigit())
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
            let id = ids.issue_at(variant, "exp_a.v1", 1_764_806_400);
            let parts: Vec<&str> = id.splitn(6, '_').collect();
            assert_eq!(
                (parts[0], parts[1], parts[2], parts[5]),
                ("abg2", code, "6930cf00", "exp_a.v1"),
                "{id}"
            );
            let mut hmac = HmacSha256::new_from_slice(key).unwrap();
            hmac.update(format!("abg2|{code}|6930cf00|{}|exp_a.v1", parts[3]).as_bytes());
            let digest = hmac.finalize().into_bytes();
            let expected: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(parts[4], expected, "{id}");
            assert_eq!(ids.verify(&id).unwrap().issued_at, Some(1_764_806_400));
        }
        // An id of the earlier format, signed as its doc says, still
        // verifies, with no issue time.
        let mut hmac = HmacSha256::new_from_slice(key).unwrap();
        hmac.update(b"abg1|t|0123456789abcdef|exp");
        let digest = hmac.finalize().into_bytes();
        let mac: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let old = ids
            .verify(&format!("abg1_t_0123456789abcdef_{mac}_exp"))
            .unwrap();
        assert_eq!((old.variant, old.issued_at), (Variant::Treatment, None));
    }

    #[test]
    fn issued_ids_verify_and_forgeries_do_not() {
        let ids = RequestIds::new(b"fleet-key".to_vec());
        let id = ids.issue(Variant::Treatment, "support_ft.v3");
        assert!(id.starts_with("abg2_t_"));
        let found = ids.verify(&id).unwrap();
        assert_eq!(
            (found.variant, found.experiment.as_str()),
            (Variant::Treatment, "support_ft.v3")
        );
        assert_eq!(
            found.mac,
            u64::from_str_radix(id.split('_').nth(4).unwrap_or(""), 16).unwrap_or(0)
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(found.issued_at.unwrap().abs_diff(now) <= 2);
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
        // Flipping the arm, or making the id younger, breaks the signature.
        assert!(ids.verify(&id.replacen("abg2_t_", "abg2_c_", 1)).is_none());
        let issued = id.split('_').nth(2).unwrap();
        let younger = format!("{:08x}", u64::from_str_radix(issued, 16).unwrap() + 86_400);
        assert!(ids.verify(&id.replacen(issued, &younger, 1)).is_none());
        assert!(ids.verify(&format!("{id}x")).is_none());
        for junk in [
            "",
            "abg2",
            "abg2_t_00_00_00_x",
            "abg2_x_00000000_0000000000000000_0000000000000000_e",
            "abg2_t_0000000g_0000000000000000_0000000000000000_e",
            "abg1_t_00_00_x",
            "é_t_1",
        ] {
            assert!(ids.verify(junk).is_none(), "{junk}");
        }
    }
}
