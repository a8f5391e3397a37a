//! Deterministic user bucketing: the reference algorithm, bit for bit.
//!
//! ```text
//! bucket    = int(hashlib.md5(user_id.encode("utf-8")).hexdigest(), 16) % 1000
//! treatment = bucket / 1000.0 < treatment_fraction
//! ```
//!
//! Offline analyses recompute this in Python, so nothing here may differ from
//! it for any input. The hex digest read as a base-16 integer is the 128-bit
//! big-endian value of the raw digest, so `u128::from_be_bytes(digest) % 1000`
//! is the same number without formatting hex. `bucket / 1000.0` is an exact
//! integer converted to an IEEE double and divided, in Rust as in Python.
//!
//! With a salt the hashed bytes are `salt + ":" + user_id`, which gives an
//! experiment a split independent of other experiments; without one the
//! reference is exact.
//!
//! This module is pure: no I/O, no clock, no allocation.

use md5::{Digest, Md5};

/// Number of buckets users are hashed into.
pub(crate) const BUCKETS: u32 = 1000;

/// A treatment fraction: a finite number from 0.0 to 1.0. Every place a
/// fraction enters the gateway (the config file, a scheduled change, the
/// admin API, the CLI, a guardrail or promotion) checks it here, so the
/// rule and its message are written once.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Fraction(f64);

impl Fraction {
    /// `value`, if it is a fraction; otherwise why not, naming it.
    pub fn new(value: f64) -> Result<Self, String> {
        if value.is_finite() && (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(format!("{value} must be a number from 0.0 to 1.0"))
        }
    }

    #[cfg(test)]
    fn get(self) -> f64 {
        self.0
    }
}

/// The arm a request is served and counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The base model.
    Control,
    /// The fine-tuned model.
    Treatment,
    /// No user ID: served by control, but counted apart so it never enters
    /// either arm's statistics.
    Unassigned,
}

impl Variant {
    /// The label used in headers, metrics and events.
    pub const fn as_str(self) -> &'static str {
        match self {
            Variant::Control => "control",
            Variant::Treatment => "treatment",
            Variant::Unassigned => "unassigned",
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The bucket in `0..1000` for a user ID given as raw bytes (UTF-8 for any
/// ID that came from a header or JSON; the `assign` CLI hashes stdin lines
/// exactly as read).
pub fn bucket(user_id: &[u8], salt: Option<&str>) -> u32 {
    user_hash(user_id, salt).bucket
}

/// A user ID's digest read two ways: its bucket, and a key naming the
/// user within a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserHash {
    /// The bucket in `0..1000`, as [`bucket`] gives it.
    pub(crate) bucket: u32,
    /// The digest's first 8 bytes, big-endian: what the sample ratio test
    /// counts distinct users by, without hashing the ID again.
    pub(crate) key: u64,
}

/// The bucket and the user key of a user ID, from one md5 (see [`bucket`]).
pub(crate) fn user_hash(user_id: &[u8], salt: Option<&str>) -> UserHash {
    let mut hasher = Md5::new();
    if let Some(salt) = salt {
        hasher.update(salt.as_bytes());
        hasher.update(b":");
    }
    hasher.update(user_id);
    let digest: [u8; 16] = hasher.finalize().into();
    let value = u128::from_be_bytes(digest);
    UserHash {
        // The remainder is < 1000, so the narrowing cannot lose anything.
        bucket: (value % u128::from(BUCKETS)) as u32,
        // The high 64 bits of 128: exactly the first 8 bytes.
        key: (value >> 64) as u64,
    }
}

/// Whether a bucket falls in the treatment arm at `treatment_fraction`.
///
/// The comparison is Python's `bucket / 1000.0 < fraction` on doubles.
/// Because the left side only depends on the bucket, a larger fraction can
/// only move buckets from control to treatment, never back.
pub fn is_treatment(bucket: u32, treatment_fraction: f64) -> bool {
    f64::from(bucket) / 1000.0 < treatment_fraction
}

/// The arm for an assigned user: control or treatment, never unassigned.
pub fn assign(user_id: &[u8], salt: Option<&str>, treatment_fraction: f64) -> Variant {
    variant_of(bucket(user_id, salt), treatment_fraction)
}

/// The arm of a bucket at `treatment_fraction`.
pub(crate) fn variant_of(bucket: u32, treatment_fraction: f64) -> Variant {
    if is_treatment(bucket, treatment_fraction) {
        Variant::Treatment
    } else {
        Variant::Control
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_finite_numbers_from_zero_to_one() {
        for ok in [0.0, 0.05, 0.5, 1.0] {
            assert_eq!(Fraction::new(ok).map(Fraction::get), Ok(ok));
        }
        for bad in [-0.01, 1.000_001, f64::NAN, f64::INFINITY, -f64::INFINITY] {
            let why = Fraction::new(bad).err().unwrap_or_default();
            assert!(
                why.ends_with("must be a number from 0.0 to 1.0"),
                "{bad}: {why}"
            );
        }
    }

    #[test]
    fn known_vectors_match_python() {
        // int(hashlib.md5(b"").hexdigest(), 16) % 1000 and friends, computed
        // once with CPython and frozen here; the integration test recomputes
        // them live for many more IDs.
        assert_eq!(bucket(b"", None), 366);
        assert_eq!(bucket(b"user-1", None), 820);
        assert_eq!(bucket("ユーザー".as_bytes(), None), 906);
    }

    #[test]
    fn the_user_key_is_the_digests_first_eight_bytes() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e.
        assert_eq!(
            user_hash(b"", None),
            UserHash {
                bucket: 366,
                key: 0xd41d_8cd9_8f00_b204
            }
        );
        assert_eq!(
            user_hash(b"user-1", Some("exp-42")),
            user_hash(b"exp-42:user-1", None)
        );
    }

    #[test]
    fn salt_hashes_salt_colon_id() {
        assert_eq!(
            bucket(b"user-1", Some("exp-42")),
            bucket(b"exp-42:user-1", None)
        );
        assert_ne!(bucket(b"user-1", Some("exp-42")), bucket(b"user-1", None));
    }

    #[test]
    fn boundaries() {
        assert!(!is_treatment(0, 0.0));
        assert!(is_treatment(0, 0.001));
        assert!(is_treatment(999, 1.0));
        assert!(!is_treatment(100, 0.1));
        assert!(is_treatment(99, 0.1));
    }
}
