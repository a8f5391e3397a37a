//! Sample ratio mismatch: are the arms getting the share of users the
//! split says they should? A broken split (a client that retries only one
//! arm, a cache in front of one model, a bug in the hashing) invalidates
//! every other comparison, so this is checked before any of them.
//!
//! The unit the hash randomises is the user, so the unit counted is the
//! user: each stage remembers the distinct users it has seen in each arm
//! ([`DistinctUsers`]), and one user who sends a thousand requests counts
//! once. Request counts are kept beside them (the rollout's
//! `min_requests_per_arm` reads them) but are not tested: requests are
//! clustered by user, and one heavy user can fake or hide a mismatch.
//!
//! The test is the anytime-valid one of [`abgate_sequential::srm`]: a
//! beta-binomial mixture Bayes factor of the users per arm against the
//! exact expected share (the fraction of the 1000 buckets in treatment),
//! after Lindon & Malek (NeurIPS 2022). Its p-value, min(1, 1 / the largest
//! Bayes factor so far), holds however often it is looked at, so every
//! caller of [`ArmCounts::check`] (the admin API, the metrics, the
//! promotion gate) is one more look at the same test, kept for the stage.
//! Mismatch is flagged at p < 0.001, and once flagged stays flagged for the
//! stage: the p-value is a running minimum.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::experiment::assign::{is_treatment, Variant, BUCKETS};
use abgate_sequential::srm::SrmTest;

/// p-value below which the split is flagged.
pub(crate) const MISMATCH_P: f64 = 0.001;

/// Users at which the mixture's prior is tuned: where the test is most
/// sensitive to a small mismatch (it stays valid at any number).
const TARGET_USERS: f64 = 1e4;

/// What the result says it is.
const METHOD: &str = "anytime-valid beta-binomial mixture Bayes factor on distinct users per arm (Lindon & Malek 2022); p is valid under continuous monitoring";

/// Shards of the distinct-user set: a shard is picked by the key's top
/// bits, so concurrent requests seldom wait for the same lock.
const SHARDS: usize = 64;
/// Top bits of a key that pick its shard.
const SHARD_BITS: u32 = SHARDS.trailing_zeros();
/// Users one stage remembers at most, in at most 64 × (32,768 × 9 + 16)
/// bytes ≈ 18.9 MB: 10.3 bytes a user at the cap.
const MAX_USERS: usize = 1_835_008;
/// Users one shard remembers: 28,672, 7/8 of 32,768, the most a hash
/// table of 32,768 slots holds before it grows, so no shard's table ever
/// grows past 32,768 slots (9 bytes each: the key and a control byte).
const USERS_PER_SHARD: usize = MAX_USERS / SHARDS;

/// One shard of [`DistinctUsers`], on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    keys: Mutex<HashSet<u64>>,
    /// The shard holds its cap of users: nothing new will be added.
    full: AtomicBool,
}

/// The users a stage has seen, exactly, up to a bound: a set of 64-bit
/// user keys (the md5 of the user ID the split hashes anyway, see
/// [`crate::experiment::assign::user_hash`]) sharded over [`SHARDS`]
/// mutexes. A key is added once; past its shard's cap a new key is no
/// longer added, and the set says it is [`capped`](Self::capped).
///
/// Users arrive in an order that does not depend on their arm, so the users
/// remembered at the cap are a fair sample of both arms, and the test judged
/// on them stays valid. Two IDs whose keys collide count once: among the
/// 1.8 million users of a full stage that happens with probability
/// about 1e-7.
#[derive(Debug)]
pub(crate) struct DistinctUsers {
    shards: Box<[Shard]>,
    per_shard: usize,
    /// A new user was seen and not added.
    capped: AtomicBool,
}

impl Default for DistinctUsers {
    fn default() -> Self {
        Self::with_cap(USERS_PER_SHARD)
    }
}

impl DistinctUsers {
    /// A set remembering at most `per_shard` users in each shard.
    fn with_cap(per_shard: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            per_shard,
            capped: AtomicBool::new(false),
        }
    }

    /// Adds a user's key; true if it was not there before and now is.
    pub(crate) fn insert(&self, key: u64) -> bool {
        let index = (key >> (u64::BITS - SHARD_BITS)) as usize;
        let Some(shard) = self.shards.get(index) else {
            return false;
        };
        // A full shard of a stage that already knows it is capped has
        // nothing to learn from this key: no lock.
        if shard.full.load(Ordering::Relaxed) && self.capped.load(Ordering::Relaxed) {
            return false;
        }
        let mut keys = shard.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.len() < self.per_shard {
            let added = keys.insert(key);
            if keys.len() >= self.per_shard {
                shard.full.store(true, Ordering::Relaxed);
            }
            added
        } else {
            if !keys.contains(&key) {
                self.capped.store(true, Ordering::Relaxed);
            }
            false
        }
    }

    /// Whether some user was seen and not remembered: the counts are those
    /// of the users before the cap.
    pub(crate) fn capped(&self) -> bool {
        self.capped.load(Ordering::Relaxed)
    }

    /// Users remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.keys.lock().map_or(0, |keys| keys.len()))
            .sum()
    }

    /// The most users the largest shard's table could hold as allocated.
    #[cfg(test)]
    fn largest_capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.keys.lock().map_or(0, |keys| keys.capacity()))
            .max()
            .unwrap_or(0)
    }
}

/// The test kept for the stage, for the share it was made for.
#[derive(Debug)]
struct Sequential {
    share: f64,
    test: SrmTest,
}

/// One stage's counts for the sample ratio test: requests and distinct
/// users per arm, from assigned users whose arm was not forced, and the
/// test's running state.
#[derive(Debug, Default)]
pub(crate) struct ArmCounts {
    control: AtomicU64,
    treatment: AtomicU64,
    users: DistinctUsers,
    users_control: AtomicU64,
    users_treatment: AtomicU64,
    sequential: Mutex<Option<Sequential>>,
}

impl ArmCounts {
    /// Counts one request of an assigned user whose key is `user_key`.
    pub(crate) fn count(&self, variant: Variant, user_key: u64) {
        let (requests, users) = match variant {
            Variant::Control => (&self.control, &self.users_control),
            Variant::Treatment => (&self.treatment, &self.users_treatment),
            Variant::Unassigned => return,
        };
        requests.fetch_add(1, Ordering::Relaxed);
        // A user's arm is fixed for the stage (a new fraction or salt is a
        // new stage), so one set holds both arms' users.
        if self.users.insert(user_key) {
            users.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A look at the test for these counts at `treatment_fraction`.
    pub(crate) fn check(&self, treatment_fraction: f64) -> SampleRatio {
        let share = treated_share(treatment_fraction);
        let mut sequential = self
            .sequential
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Read under the lock, so that looks see counts in order.
        let control = self.control.load(Ordering::Relaxed);
        let treatment = self.treatment.load(Ordering::Relaxed);
        let users = ArmUsers {
            control: self.users_control.load(Ordering::Relaxed),
            treatment: self.users_treatment.load(Ordering::Relaxed),
        };
        let p_value = if share == 0.0 || share == 1.0 {
            // Every user must be in one arm: any other is a mismatch.
            let stray = if share == 0.0 {
                users.treatment
            } else {
                users.control
            };
            if stray == 0 {
                1.0
            } else {
                0.0
            }
        } else {
            // The stage's fraction is fixed, so the test is made once; a
            // different share would be a different test, begun afresh.
            let state = match sequential.take() {
                Some(state) if state.share == share => state,
                _ => Sequential {
                    share,
                    test: SrmTest::new(share, MISMATCH_P, TARGET_USERS),
                },
            };
            let state = sequential.insert(state);
            state.test.observe(users.treatment, users.control).p_value
        };
        SampleRatio {
            control,
            treatment,
            users,
            capped: self.users.capped(),
            expected_treatment_share: share,
            p_value,
            mismatch: p_value < MISMATCH_P,
            method: METHOD,
        }
    }

    /// Counts with a smaller cap of users, for the tests of the cap.
    #[cfg(test)]
    fn with_user_cap(per_shard: usize) -> Self {
        Self {
            users: DistinctUsers::with_cap(per_shard),
            ..Self::default()
        }
    }
}

/// The share of the 1000 buckets in treatment at `treatment_fraction`:
/// what the split promises.
fn treated_share(treatment_fraction: f64) -> f64 {
    let treated_buckets = (0..BUCKETS)
        .filter(|bucket| is_treatment(*bucket, treatment_fraction))
        .count();
    treated_buckets as f64 / f64::from(BUCKETS)
}

/// Distinct users per arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ArmUsers {
    pub(crate) control: u64,
    pub(crate) treatment: u64,
}

/// The outcome of one look at the test.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct SampleRatio {
    /// Requests per arm (not tested: clustered by user).
    pub(crate) control: u64,
    pub(crate) treatment: u64,
    /// Distinct users per arm: what is tested.
    pub(crate) users: ArmUsers,
    /// More users came than the stage remembers ([`MAX_USERS`]): `users`
    /// are those before the cap.
    pub(crate) capped: bool,
    /// Share of buckets in treatment: what the split promises.
    pub(crate) expected_treatment_share: f64,
    /// Always-valid p-value: the least over the stage's looks so far.
    pub(crate) p_value: f64,
    pub(crate) mismatch: bool,
    pub(crate) method: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::assign::{user_hash, variant_of};

    /// Counts `requests` requests of user `id` at `fraction`.
    fn send(counts: &ArmCounts, id: &str, fraction: f64, requests: usize) -> Variant {
        let hash = user_hash(id.as_bytes(), None);
        let variant = variant_of(hash.bucket, fraction);
        for _ in 0..requests {
            counts.count(variant, hash.key);
        }
        variant
    }

    #[test]
    fn users_count_once_and_fit_the_split() {
        // 600 users, five requests each, at 5%: the users fit the split,
        // whatever their requests add up to.
        let counts = ArmCounts::default();
        for user in 0..600 {
            send(&counts, &format!("user-{user}"), 0.05, 5);
        }
        let result = counts.check(0.05);
        assert_eq!(result.users.control + result.users.treatment, 600);
        assert_eq!(result.control + result.treatment, 3000);
        assert_eq!(result.control, 5 * result.users.control);
        assert!(!result.mismatch && !result.capped, "{result:?}");
        assert_eq!(result.expected_treatment_share, 0.05);
        assert!(result.method.contains("distinct users"));

        // The exact promise is the bucket share: 0.0995 means 100 buckets of 1000.
        assert_eq!(
            ArmCounts::default().check(0.0995).expected_treatment_share,
            0.1
        );
        // Nobody yet: nothing to flag.
        let empty = ArmCounts::default().check(0.3);
        assert_eq!((empty.p_value, empty.mismatch), (1.0, false));
        // Unassigned requests count in neither arm.
        let unassigned = ArmCounts::default();
        unassigned.count(Variant::Unassigned, 1);
        let result = unassigned.check(0.5);
        assert_eq!((result.control, result.users.control), (0, 0));
    }

    #[test]
    fn all_or_nothing_splits_flag_any_stray_user() {
        let counts = ArmCounts::default();
        counts.count(Variant::Control, 1);
        counts.count(Variant::Control, 2);
        assert!(!counts.check(0.0).mismatch);
        counts.count(Variant::Treatment, 3);
        assert!(counts.check(0.0).mismatch);
        let all = ArmCounts::default();
        all.count(Variant::Treatment, 1);
        assert!(!all.check(1.0).mismatch);
        all.count(Variant::Control, 2);
        assert_eq!(all.check(1.0).p_value, 0.0);
    }

    #[test]
    fn a_heavy_user_neither_hides_nor_fakes_a_mismatch() {
        // The audit's case: one user sends a tenth of the requests. At 50%,
        // 10,000 users send one request each, and the heavy user 1,111.
        let healthy = ArmCounts::default();
        for user in 0..10_000 {
            send(&healthy, &format!("u{user}"), 0.5, 1);
        }
        let heavy = send(&healthy, "heavy", 0.5, 1_111);
        let result = healthy.check(0.5);
        eprintln!("healthy, heavy user in {heavy}: {result:?}");
        assert!(!result.mismatch, "{result:?}");
        assert_eq!(result.users.control + result.users.treatment, 10_001);

        // The same traffic where treatment loses a fifth of its users (every
        // fifth treatment user's requests never arrive): flagged.
        let lossy = ArmCounts::default();
        let mut treated = 0;
        for user in 0..10_000 {
            let id = format!("u{user}");
            let variant = variant_of(user_hash(id.as_bytes(), None).bucket, 0.5);
            if variant == Variant::Treatment {
                treated += 1;
                if treated % 5 == 0 {
                    continue;
                }
            }
            send(&lossy, &id, 0.5, 1);
        }
        send(&lossy, "heavy", 0.5, 1_111);
        let result = lossy.check(0.5);
        eprintln!("treatment loses a fifth of its users: {result:?}");
        assert!(result.mismatch, "{result:?}");
        // The heavy user's requests make up treatment's loss: by requests
        // the arms look even.
        assert!(result.treatment > result.control, "{result:?}");
    }

    #[test]
    fn the_p_value_is_a_running_minimum_over_the_stage() {
        let counts = ArmCounts::default();
        let mut last = 1.0;
        // 200 control users and 20 treatment users at 50%: flagged...
        for user in 0..220u64 {
            let variant = if user < 200 {
                Variant::Control
            } else {
                Variant::Treatment
            };
            counts.count(variant, user << 20);
            let look = counts.check(0.5);
            assert!(look.p_value <= last, "{look:?} after {last}");
            last = look.p_value;
        }
        assert!(last < MISMATCH_P, "{last}");
        // ...and still flagged once 180 more treatment users have evened
        // the counts out: a mismatch seen in the stage stays seen.
        for user in 220..400u64 {
            counts.count(Variant::Treatment, user << 20);
        }
        let look = counts.check(0.5);
        assert_eq!(
            look.users,
            ArmUsers {
                control: 200,
                treatment: 200
            }
        );
        assert!(look.mismatch && look.p_value == last, "{look:?}");
    }

    /// Keys landing in shard `shard`, numbered by `i`.
    fn key_in(shard: u64, i: u64) -> u64 {
        (shard << (u64::BITS - SHARD_BITS)) | i
    }

    #[test]
    fn the_set_stops_at_its_cap_and_says_so() {
        let users = DistinctUsers::with_cap(3);
        for i in 0..3 {
            assert!(users.insert(key_in(5, i)));
        }
        // Known keys are still known, and are no news of a cap.
        assert!(!users.insert(key_in(5, 0)));
        assert!(!users.capped());
        // Other shards still take users.
        assert!(users.insert(key_in(6, 0)));
        // A new key in the full shard is refused, and the set is capped.
        assert!(!users.insert(key_in(5, 3)));
        assert!(users.capped());
        assert!(!users.insert(key_in(5, 4)));
        assert_eq!(users.len(), 4);
        assert!(users.insert(key_in(6, 1)));
        assert_eq!(users.len(), 5);

        // The real cap: a full shard's table never grows past 32,768 slots.
        let users = DistinctUsers::default();
        for i in 0..USERS_PER_SHARD as u64 + 1000 {
            users.insert(key_in(63, i));
        }
        assert_eq!(users.len(), USERS_PER_SHARD);
        assert!(users.capped());
        assert_eq!(users.largest_capacity(), USERS_PER_SHARD);
        assert_eq!(USERS_PER_SHARD, 28_672);
    }

    #[test]
    fn capped_counts_are_the_users_before_the_cap() {
        // Two users a shard: 128 users in all.
        let counts = ArmCounts::with_user_cap(2);
        let mut sent = 0;
        for user in 0..1000 {
            send(&counts, &format!("user-{user}"), 0.5, 2);
            sent += 2;
        }
        let result = counts.check(0.5);
        assert!(result.capped, "{result:?}");
        assert_eq!(result.users.control + result.users.treatment, 128);
        // Requests are still all counted.
        assert_eq!(result.control + result.treatment, sent);
        assert!(!result.mismatch, "{result:?}");
    }
}
