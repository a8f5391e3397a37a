//! Small self-contained PRNG and samplers for the simulator and the tests
//! (no `rand` dependency). Not cryptographic.
//!
//! * [`SplitMix64`] (Steele, Lea, Flood 2014) seeds [`Rng`], which is
//!   xoshiro256** (Blackman & Vigna 2018).
//! * Normals by the Marsaglia polar method; binomials exact by Bernoulli
//!   sums (n ≤ 32) or inversion (mean < 30, Kachitvichyanukul–Schmeiser
//!   BINV), else a rounded normal approximation (documented approximation:
//!   skewness error O(1/√(np)) at np ≥ 30).
//! * [`AliasTable`]: Walker/Vose alias method for O(1) categorical draws.

/// SplitMix64 generator, used to expand a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// From a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// xoshiro256** generator.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
    spare_normal: Option<f64>,
}

impl Rng {
    /// Seeded via SplitMix64.
    pub fn new(seed: u64) -> Self {
        let mut sm = SplitMix64::new(seed);
        Rng {
            s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()],
            spare_normal: None,
        }
    }

    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = self.s;
        let result = s1.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s1 << 17;
        let s2 = s2 ^ s0;
        let s3 = s3 ^ s1;
        let s1 = s1 ^ s2;
        let s0 = s0 ^ s3;
        let s2 = s2 ^ t;
        let s3 = s3.rotate_left(45);
        self.s = [s0, s1, s2, s3];
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in (0, 1).
    pub fn uniform_open(&mut self) -> f64 {
        loop {
            let u = self.uniform();
            if u > 0.0 {
                return u;
            }
        }
    }

    /// Standard normal (Marsaglia polar method).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let m = (-2.0 * s.ln() / s).sqrt();
                self.spare_normal = Some(v * m);
                return u * m;
            }
        }
    }

    /// Lognormal exp(mu + sigma Z).
    pub fn lognormal(&mut self, mu: f64, sigma: f64) -> f64 {
        (mu + sigma * self.normal()).exp()
    }

    /// Bernoulli(p).
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Binomial(n, p) (see module docs for the method).
    pub fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if n == 0 || p.is_nan() || p <= 0.0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        if p > 0.5 {
            return n - self.binomial(n, 1.0 - p);
        }
        if n <= 32 {
            return (0..n).filter(|_| self.uniform() < p).count() as u64;
        }
        let mean = n as f64 * p;
        let q = 1.0 - p;
        if mean < 30.0 {
            let s = p / q;
            let a = (n as f64 + 1.0) * s;
            let mut r = (n as f64 * q.ln()).exp();
            let mut u = self.uniform();
            let mut x = 0u64;
            while u > r {
                u -= r;
                x += 1;
                if x >= n {
                    return n;
                }
                r *= a / x as f64 - s;
                if r <= 0.0 {
                    break;
                }
            }
            return x;
        }
        let x = (mean + (mean * q).sqrt() * self.normal()).round();
        x.clamp(0.0, n as f64) as u64
    }
}

/// Walker/Vose alias table over indices 0..k.
#[derive(Debug, Clone)]
pub struct AliasTable {
    prob: Vec<f64>,
    alias: Vec<usize>,
}

impl AliasTable {
    /// From non-negative weights (at least one positive); `None` otherwise.
    pub fn new(weights: &[f64]) -> Option<Self> {
        let k = weights.len();
        let total: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
        if k == 0 || total <= 0.0 {
            return None;
        }
        let mut prob: Vec<f64> = weights
            .iter()
            .map(|w| {
                if w.is_finite() && *w > 0.0 {
                    w * k as f64 / total
                } else {
                    0.0
                }
            })
            .collect();
        let mut alias = vec![0usize; k];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..k).partition(|&i| prob[i] < 1.0);
        while let (Some(s), Some(l)) = (small.pop(), large.pop()) {
            alias[s] = l;
            prob[l] -= 1.0 - prob[s];
            if prob[l] < 1.0 {
                small.push(l);
            } else {
                large.push(l);
            }
        }
        for i in small.into_iter().chain(large) {
            prob[i] = 1.0;
        }
        Some(AliasTable { prob, alias })
    }

    /// Draw an index.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let k = self.prob.len();
        let x = rng.uniform() * k as f64;
        let i = (x as usize).min(k - 1);
        let frac = x - i as f64;
        if frac < self.prob[i] {
            i
        } else {
            self.alias[i]
        }
    }
}
