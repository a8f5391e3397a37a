//! DDSketch-style relative-accuracy quantile sketch.
//!
//! Masson, Rim, Lee, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch
//! with Relative-Error Guarantees", VLDB 2019. Bucket `k` holds values in
//! (γ^(k−1), γ^k] with γ = (1+a)/(1−a); reporting 2γ^k/(γ+1) is within
//! relative error `a` of every value in the bucket (their Prop. 1/Thm 2).
//! With `a` = 0.005 the buckets are ~1% wide and any reported value is
//! within 0.5% of a true sample value, i.e. inside the required ≤ 1%.
//!
//! Values ≤ `min_value` (default 1e-9; latencies are in seconds) and
//! negative values go to a zero bucket covering [0, min_value]. NaN and
//! ±∞ are dropped and counted in [`Sketch::dropped`].
//!
//! Bucket count is bounded by `max_buckets` (default 2048). When the key
//! span would exceed it the *lowest* buckets are collapsed into one (the
//! DDSketch "collapsing lowest buckets" variant, §2.2), so high quantiles,
//! which the guard uses, keep their guarantee; a collapsed bucket reports
//! lower bound `min_value` (see [`Sketch::bucket_bounds`]).
//!
//! Memory: the counts are one contiguous `Vec<u64>` over the key span, so
//! a sketch uses ~96 bytes of fields plus 8 bytes per bucket of span, at
//! most 8 × 2048 = 16 KiB. With a = 0.005 a span of 2048 buckets covers a
//! dynamic range of γ^2048 ≈ 8 × 10^8 (e.g. 1 µs … 800 s), so collapsing
//! is rare for latencies.

use serde::Serialize;

/// Default relative accuracy (0.5%; buckets about 1% wide).
pub const DEFAULT_RELATIVE_ACCURACY: f64 = 0.005;
/// Default maximum number of buckets (16 KiB of counts).
pub const DEFAULT_MAX_BUCKETS: usize = 2048;
/// Default zero-bucket threshold in value units (seconds for latencies).
pub const DEFAULT_MIN_VALUE: f64 = 1e-9;

/// Errors from [`Sketch::with_params`] and [`Sketch::merge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SketchError {
    /// Relative accuracy must be in (0, 1), min value > 0, max buckets ≥ 2.
    InvalidParameters,
    /// Merging sketches with different accuracy or min value.
    IncompatibleSketches,
}

/// Where a rank falls: the zero bucket or a keyed bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketRef {
    /// The zero bucket, [0, min_value].
    Zero,
    /// Bucket with this key.
    Key(i32),
}

/// A mergeable log-bucket quantile sketch for non-negative values.
#[derive(Debug, Clone)]
pub struct Sketch {
    relative_accuracy: f64,
    gamma: f64,
    ln_gamma: f64,
    min_value: f64,
    max_buckets: usize,
    /// Key of `counts[0]`.
    offset: i32,
    counts: Vec<u64>,
    zero_count: u64,
    total: u64,
    dropped: u64,
    /// If set, the lowest stored bucket also holds every value that was
    /// below it (collapsed).
    collapsed: bool,
}

impl Default for Sketch {
    fn default() -> Self {
        Self::new()
    }
}

impl Sketch {
    /// Sketch with the default parameters (a = 0.005, 2048 buckets, 1e-9).
    pub fn new() -> Self {
        let a = DEFAULT_RELATIVE_ACCURACY;
        let gamma = (1.0 + a) / (1.0 - a);
        Sketch {
            relative_accuracy: a,
            gamma,
            ln_gamma: gamma.ln(),
            min_value: DEFAULT_MIN_VALUE,
            max_buckets: DEFAULT_MAX_BUCKETS,
            offset: 0,
            counts: Vec::new(),
            zero_count: 0,
            total: 0,
            dropped: 0,
            collapsed: false,
        }
    }

    /// Sketch with explicit parameters.
    pub fn with_params(
        relative_accuracy: f64,
        max_buckets: usize,
        min_value: f64,
    ) -> Result<Self, SketchError> {
        let accuracy_ok = relative_accuracy > 0.0 && relative_accuracy < 1.0;
        let min_ok = min_value > 0.0 && min_value.is_finite();
        if !accuracy_ok || !min_ok || max_buckets < 2 {
            return Err(SketchError::InvalidParameters);
        }
        let gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy);
        Ok(Sketch {
            relative_accuracy,
            gamma,
            ln_gamma: gamma.ln(),
            min_value,
            max_buckets,
            ..Sketch::new()
        })
    }

    /// Relative accuracy `a`.
    pub fn relative_accuracy(&self) -> f64 {
        self.relative_accuracy
    }

    /// γ = (1+a)/(1−a).
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// Number of values held (zero bucket included, dropped excluded).
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Number of NaN/infinite inputs that were ignored.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Count in the zero bucket.
    pub fn zero_count(&self) -> u64 {
        self.zero_count
    }

    /// Whether the lowest buckets have been collapsed.
    pub fn is_collapsed(&self) -> bool {
        self.collapsed
    }

    /// Approximate heap + inline size in bytes.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.counts.capacity() * std::mem::size_of::<u64>()
    }

    /// Key of the bucket that holds `x`, or `None` for the zero bucket /
    /// non-finite input.
    pub fn key_for(&self, x: f64) -> Option<i32> {
        if !x.is_finite() || x <= self.min_value {
            return None;
        }
        let k = (x.ln() / self.ln_gamma).ceil();
        // x is finite and > min_value > 0, so |k| is far below i32::MAX for
        // any sane gamma; the cast saturates otherwise.
        Some(k as i32)
    }

    /// Value bounds of bucket `key`: (γ^(key−1), γ^key], except that the
    /// lowest bucket of a collapsed sketch reports `min_value` as its
    /// lower bound because it also holds the collapsed smaller values.
    pub fn bucket_bounds(&self, key: i32) -> (f64, f64) {
        let hi = (key as f64 * self.ln_gamma).exp();
        let lo = ((key as f64 - 1.0) * self.ln_gamma).exp();
        if self.collapsed && key <= self.offset {
            (self.min_value, hi)
        } else {
            (lo.max(self.min_value), hi)
        }
    }

    /// Bounds of a [`BucketRef`]; the zero bucket is [0, min_value].
    pub fn ref_bounds(&self, b: BucketRef) -> (f64, f64) {
        match b {
            BucketRef::Zero => (0.0, self.min_value),
            BucketRef::Key(k) => self.bucket_bounds(k),
        }
    }

    /// Representative value of bucket `key`: 2γ^key/(γ+1), within relative
    /// accuracy of every value in it.
    pub fn bucket_value(&self, key: i32) -> f64 {
        2.0 * (key as f64 * self.ln_gamma).exp() / (self.gamma + 1.0)
    }

    /// Iterate non-empty keyed buckets as (key, count), ascending. The zero
    /// bucket is reported by [`Sketch::zero_count`].
    pub fn buckets(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(move |(i, &c)| (self.offset.saturating_add(i as i32), c))
    }

    /// Insert one value.
    pub fn insert(&mut self, x: f64) {
        self.insert_n(x, 1);
    }

    /// Insert `n` copies of `x`.
    pub fn insert_n(&mut self, x: f64, n: u64) {
        if n == 0 {
            return;
        }
        if x.is_nan() || x.is_infinite() {
            self.dropped = self.dropped.saturating_add(n);
            return;
        }
        match self.key_for(x) {
            None => {
                self.zero_count = self.zero_count.saturating_add(n);
                self.total = self.total.saturating_add(n);
            }
            Some(k) => self.insert_bucket(k, n),
        }
    }

    /// Add `n` to bucket `key` directly (for simulators that sample bucket
    /// counts from a distribution's bucket probabilities).
    pub fn insert_bucket(&mut self, key: i32, n: u64) {
        if n == 0 {
            return;
        }
        self.total = self.total.saturating_add(n);
        if self.counts.is_empty() {
            self.offset = key;
            self.counts.push(n);
            return;
        }
        let hi_key = self.offset.saturating_add(self.counts.len() as i32 - 1);
        if key < self.offset {
            if self.collapsed {
                if let Some(c) = self.counts.first_mut() {
                    *c = c.saturating_add(n);
                }
                return;
            }
            let grow = (self.offset as i64 - key as i64) as usize;
            let span = self.counts.len() + grow;
            if span > self.max_buckets {
                // The new value is below everything we can keep: it joins
                // the collapsed lowest bucket.
                let new_lowest = hi_key.saturating_sub(self.max_buckets as i32 - 1);
                self.collapse_below(new_lowest);
                if let Some(c) = self.counts.first_mut() {
                    *c = c.saturating_add(n);
                }
                return;
            }
            let mut v = vec![0u64; grow];
            v.append(&mut self.counts);
            self.counts = v;
            self.offset = key;
            if let Some(c) = self.counts.first_mut() {
                *c = c.saturating_add(n);
            }
            return;
        }
        if key > hi_key {
            let span = (key as i64 - self.offset as i64 + 1) as usize;
            if span > self.max_buckets {
                let new_lowest = key.saturating_sub(self.max_buckets as i32 - 1);
                self.collapse_below(new_lowest);
            }
            let need = (key as i64 - self.offset as i64 + 1) as usize;
            if need > self.counts.len() {
                // Grow geometrically but never beyond max_buckets, so the
                // documented memory bound holds for the allocation too.
                let want = need
                    .max(2 * self.counts.len())
                    .min(self.max_buckets.max(need));
                if want > self.counts.capacity() {
                    self.counts.reserve_exact(want - self.counts.len());
                }
                self.counts.resize(need, 0);
            }
        }
        let idx = (key as i64 - self.offset as i64) as usize;
        if let Some(c) = self.counts.get_mut(idx) {
            *c = c.saturating_add(n);
        }
    }

    /// Merge every bucket with key < `key` into bucket `key`, which becomes
    /// the lowest (collapsed) bucket.
    fn collapse_below(&mut self, key: i32) {
        if self.counts.is_empty() {
            self.offset = key;
            self.counts.push(0);
            self.collapsed = true;
            return;
        }
        if key <= self.offset {
            if key < self.offset {
                let grow = (self.offset as i64 - key as i64) as usize;
                let mut v = vec![0u64; grow];
                v.append(&mut self.counts);
                self.counts = v;
                self.offset = key;
            }
            self.collapsed = true;
            return;
        }
        let cut = ((key as i64 - self.offset as i64) as usize).min(self.counts.len());
        let moved: u64 = self
            .counts
            .iter()
            .take(cut)
            .fold(0u64, |a, &c| a.saturating_add(c));
        self.counts.drain(..cut);
        if self.counts.is_empty() {
            self.counts.push(0);
        }
        self.offset = key;
        if let Some(c) = self.counts.first_mut() {
            *c = c.saturating_add(moved);
        }
        self.collapsed = true;
    }

    /// Merge another sketch with the same accuracy and min value (DDSketch
    /// is fully mergeable: bucket counts add). If `other` was collapsed,
    /// the result is collapsed at least up to `other`'s lowest key, so the
    /// bucket bounds stay valid.
    pub fn merge(&mut self, other: &Sketch) -> Result<(), SketchError> {
        if (self.relative_accuracy - other.relative_accuracy).abs() > 1e-15
            || self.min_value != other.min_value
        {
            return Err(SketchError::IncompatibleSketches);
        }
        for (k, c) in other.buckets() {
            self.insert_bucket(k, c);
        }
        if other.collapsed {
            let k = self.offset.max(other.offset);
            self.collapse_below(k);
        }
        self.zero_count = self.zero_count.saturating_add(other.zero_count);
        self.total = self.total.saturating_add(other.zero_count);
        self.dropped = self.dropped.saturating_add(other.dropped);
        Ok(())
    }

    /// The bucket that holds the `rank`-th smallest value (1-based);
    /// `None` if `rank` is 0 or greater than `count()`.
    pub fn bucket_at_rank(&self, rank: u64) -> Option<BucketRef> {
        if rank == 0 || rank > self.total {
            return None;
        }
        if rank <= self.zero_count {
            return Some(BucketRef::Zero);
        }
        let above = self.total - rank; // values strictly after this rank
                                       // Walk from whichever end is closer: high quantiles are near the top.
        if above < rank {
            let mut seen = 0u64;
            for (i, &c) in self.counts.iter().enumerate().rev() {
                seen = seen.saturating_add(c);
                if seen > above {
                    return Some(BucketRef::Key(self.offset.saturating_add(i as i32)));
                }
            }
        } else {
            let mut seen = self.zero_count;
            for (i, &c) in self.counts.iter().enumerate() {
                seen = seen.saturating_add(c);
                if seen >= rank {
                    return Some(BucketRef::Key(self.offset.saturating_add(i as i32)));
                }
            }
        }
        None
    }

    /// The `rank`-th smallest value (1-based) within relative accuracy
    /// (bucket representative; 0 for the zero bucket).
    pub fn value_at_rank(&self, rank: u64) -> Option<f64> {
        match self.bucket_at_rank(rank)? {
            BucketRef::Zero => Some(0.0),
            BucketRef::Key(k) => Some(self.bucket_value(k)),
        }
    }

    /// Lower and upper value bounds of the `rank`-th smallest value: the
    /// true sample value lies in this closed interval (bucket edges).
    pub fn rank_bounds(&self, rank: u64) -> Option<(f64, f64)> {
        Some(self.ref_bounds(self.bucket_at_rank(rank)?))
    }

    /// The q-quantile (q in [0, 1]) as in DDSketch: the value at 0-based
    /// rank ⌊q (n−1)⌋. `None` for an empty sketch or q outside [0, 1]/NaN.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) || self.total == 0 {
            return None;
        }
        let rank0 = (q * (self.total - 1) as f64).floor() as u64;
        self.value_at_rank(rank0.saturating_add(1))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_bad_input() {
        let mut s = Sketch::new();
        assert_eq!(s.quantile(0.5), None);
        assert_eq!(s.value_at_rank(1), None);
        assert_eq!(s.value_at_rank(0), None);
        s.insert(f64::NAN);
        s.insert(f64::INFINITY);
        assert_eq!(s.count(), 0);
        assert_eq!(s.dropped(), 2);
        s.insert(-3.0);
        s.insert(0.0);
        assert_eq!(s.count(), 2);
        assert_eq!(s.quantile(0.5), Some(0.0));
        assert_eq!(s.quantile(f64::NAN), None);
        assert_eq!(s.quantile(1.5), None);
        assert!(Sketch::with_params(0.0, 10, 1e-9).is_err());
        assert!(Sketch::with_params(0.01, 1, 1e-9).is_err());
    }

    #[test]
    fn collapses_lowest_and_bounds_stay_valid() {
        let mut s = Sketch::with_params(0.01, 64, 1e-9).unwrap();
        let mut vals = Vec::new();
        let mut x = 1e-6;
        while x < 1e3 {
            s.insert(x);
            vals.push(x);
            x *= 1.07;
        }
        assert!(s.is_collapsed());
        assert!(s.buckets().count() <= 64);
        vals.sort_by(|a, b| a.partial_cmp(b).unwrap());
        for (i, v) in vals.iter().enumerate() {
            let (lo, hi) = s.rank_bounds(i as u64 + 1).unwrap();
            assert!(lo <= *v && *v <= hi, "rank {i}: {lo} {v} {hi}");
        }
        // Top values keep relative accuracy.
        let top = s.value_at_rank(vals.len() as u64).unwrap();
        let truth = *vals.last().unwrap();
        assert!((top - truth).abs() <= 0.01 * truth);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Sketch::new();
        let mut b = Sketch::new();
        for i in 1..=100 {
            a.insert(i as f64);
            b.insert(1000.0 + i as f64);
        }
        b.insert(0.0);
        a.merge(&b).unwrap();
        assert_eq!(a.count(), 201);
        let med = a.value_at_rank(101).unwrap();
        assert!((med - 100.0).abs() <= 0.005 * 100.0 + 1e-9, "{med}");
        let other = Sketch::with_params(0.01, 2048, 1e-9).unwrap();
        assert_eq!(a.merge(&other), Err(SketchError::IncompatibleSketches));
    }

    #[test]
    fn insert_below_offset_grows_front() {
        let mut s = Sketch::new();
        s.insert(10.0);
        s.insert(1.0);
        s.insert_n(0.1, 3);
        assert_eq!(s.count(), 5);
        let v = s.value_at_rank(1).unwrap();
        assert!((v - 0.1).abs() <= 0.0005 + 1e-12);
        let v = s.value_at_rank(5).unwrap();
        assert!((v - 10.0).abs() <= 0.05 + 1e-9);
    }
}
