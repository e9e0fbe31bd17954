//! Paired bootstrap intervals of percent of full cache (summary.csv's and scores.csv's
//! `percent_of_full_ci_low` / `percent_of_full_ci_high`).
//!
//! Data: per subset (a stratum), the per-sample scores of a run and of the model's full-cache run
//! on the same samples, paired by `_id` ([`pair_samples`]; by file position when a file has no
//! ids). The statistic is the one summary.csv reports: `100 × Σ_s mean(method_s) / Σ_s
//! mean(full_s)` (for one subset, `100 × mean(method) / mean(full)`). One resample draws, in
//! every stratum independently, as many pairs as it holds, with replacement, and takes method
//! and full from the same draws (paired); both means are recomputed, so the interval carries the
//! noise of the full cache's score as well as the method's.
//!
//! Departure from `scripts/analysis/multinews_paired_bootstrap.py`, which this replaces: the
//! script divided resampled differences by the fixed full-cache mean, which gives a method that
//! scores 0 on every sample a spurious interval around 0 %; the ratio of resampled means gives
//! it [0, 0]. Kept from the script: the percentile rule (`sorted[⌊0.025 B⌋]`,
//! `sorted[⌊0.975 B⌋]`, B the resamples that have a ratio).
//!
//! Determinism: the generator is SplitMix64 (Steele et al., 2014) seeded with [`SEED`] for every
//! interval, and an index is `⌊u64 × n / 2^64⌋`, so the same pairs give the same interval on any
//! machine and in any order of computation (`kvc merge` equals the unsharded sweep).

/// Resamples per interval.
pub const RESAMPLES: usize = 10_000;
/// The generator's seed for every interval.
pub const SEED: u64 = 0;

/// SplitMix64: a tiny generator with a fixed, documented output sequence.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform index below `n` (multiply-shift; the bias is below n / 2^64).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// One stratum: (method score, full-cache score) of the same samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pairs {
    pub method: Vec<f64>,
    pub full: Vec<f64>,
}

impl Pairs {
    pub fn len(&self) -> usize {
        self.method.len()
    }

    pub fn is_empty(&self) -> bool {
        self.method.is_empty()
    }
}

/// Pair a run's samples with the full cache's: by id (sorted, ids on one side only are left
/// out) when every sample of both has one, else by position when both have as many samples;
/// otherwise no pairs.
pub fn pair_samples(method: &[(Option<&str>, f64)], full: &[(Option<&str>, f64)]) -> Pairs {
    let all_ids = |v: &[(Option<&str>, f64)]| v.iter().all(|(id, _)| id.is_some());
    let mut out = Pairs::default();
    if all_ids(method) && all_ids(full) {
        let f: std::collections::BTreeMap<&str, f64> = full
            .iter()
            .filter_map(|(id, s)| Some(((*id)?, *s)))
            .collect();
        let m: std::collections::BTreeMap<&str, f64> = method
            .iter()
            .filter_map(|(id, s)| Some(((*id)?, *s)))
            .collect();
        for (id, s) in m {
            if let Some(fs) = f.get(id) {
                out.method.push(s);
                out.full.push(*fs);
            }
        }
    } else if method.len() == full.len() {
        out.method = method.iter().map(|p| p.1).collect();
        out.full = full.iter().map(|p| p.1).collect();
    }
    out
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// `100 × Σ_s mean(method_s) / Σ_s mean(full_s)`; `None` when the full-cache sum is 0 or a
/// stratum is empty.
pub fn percent_of_full(strata: &[Pairs]) -> Option<f64> {
    if strata.is_empty() || strata.iter().any(Pairs::is_empty) {
        return None;
    }
    let m: f64 = strata.iter().map(|p| mean(&p.method)).sum();
    let f: f64 = strata.iter().map(|p| mean(&p.full)).sum();
    (f != 0.0 && f.is_finite() && m.is_finite()).then(|| 100.0 * (m / f))
}

/// The 95 % paired-bootstrap interval (low, high) of [`percent_of_full`] over `resamples`
/// stratified resamples drawn with `seed`. Resamples whose full-cache sum is 0 (no ratio) are
/// left out of the percentiles. `None` when a stratum is empty, a score is not finite, or more
/// than 2.5 % of the resamples have no ratio (too few non-zero full-cache samples for an
/// interval).
pub fn percent_of_full_interval(
    strata: &[Pairs],
    resamples: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    if resamples == 0
        || strata.is_empty()
        || strata
            .iter()
            .any(|p| p.is_empty() || p.method.len() != p.full.len())
        || strata
            .iter()
            .any(|p| p.method.iter().chain(&p.full).any(|x| !x.is_finite()))
    {
        return None;
    }
    let mut rng = SplitMix64(seed);
    let mut stats = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let (mut m, mut f) = (0.0f64, 0.0f64);
        for p in strata {
            let n = p.len();
            let (mut ms, mut fs) = (0.0f64, 0.0f64);
            for _ in 0..n {
                let i = rng.below(n);
                ms += p.method[i];
                fs += p.full[i];
            }
            m += ms / n as f64;
            f += fs / n as f64;
        }
        if f != 0.0 {
            stats.push(100.0 * (m / f));
        }
    }
    // Resamples whose full-cache sum is 0 have no ratio: left out, unless they are so many
    // (over 2.5 %) that they could hold a tail of the interval.
    if (resamples - stats.len()) as f64 > 0.025 * resamples as f64 {
        return None;
    }
    stats.sort_by(f64::total_cmp);
    let k = stats.len();
    let at = |q: f64| stats[((q * k as f64) as usize).min(k - 1)];
    Some((at(0.025), at(0.975)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(method: &[f64], full: &[f64]) -> Pairs {
        Pairs {
            method: method.to_vec(),
            full: full.to_vec(),
        }
    }

    /// The exact bootstrap distribution of one stratum: every one of the n^n index tuples,
    /// equally likely, as sorted statistics.
    fn exact_distribution(p: &Pairs) -> Vec<f64> {
        let n = p.len();
        let total = n.pow(n as u32);
        let mut out = Vec::with_capacity(total);
        for mut code in 0..total {
            let (mut m, mut f) = (0.0, 0.0);
            for _ in 0..n {
                let i = code % n;
                code /= n;
                m += p.method[i];
                f += p.full[i];
            }
            out.push(100.0 * (m / f));
        }
        out.sort_by(f64::total_cmp);
        out
    }

    #[test]
    fn hand_computed_discrete_case() {
        // Full cache right on all 4 samples, the method on 3: a resample's statistic is
        // 100 × (4 - k) / 4 with k ~ Binomial(4, 1/4) draws of the missed sample.
        // P(k >= 3) = 0.0508 > 0.025 > P(k = 4) = 0.0039, so the 2.5th percentile is 25 %;
        // P(k = 0) = 0.316 > 0.025, so the 97.5th is 100 %.
        let p = pairs(&[1.0, 1.0, 1.0, 0.0], &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(percent_of_full(std::slice::from_ref(&p)), Some(75.0));
        assert_eq!(
            percent_of_full_interval(&[p], RESAMPLES, SEED),
            Some((25.0, 100.0))
        );
    }

    #[test]
    fn continuous_case_matches_brute_force_quantiles() {
        // 5 samples: all 3125 resamples enumerated give the exact quantiles; 10,000 random
        // resamples land within a few exact order statistics of them.
        let p = pairs(&[0.9, 0.2, 0.55, 0.0, 0.7], &[1.0, 0.4, 0.5, 0.3, 0.8]);
        let exact = exact_distribution(&p);
        let (lo, hi) = percent_of_full_interval(std::slice::from_ref(&p), RESAMPLES, SEED).unwrap();
        let q = |x: f64| exact.partition_point(|v| *v < x) as f64 / exact.len() as f64;
        assert!(
            (q(lo) - 0.025).abs() < 0.01,
            "lo {lo} at quantile {}",
            q(lo)
        );
        assert!(
            (q(hi) - 0.975).abs() < 0.01,
            "hi {hi} at quantile {}",
            q(hi)
        );
        assert!(lo < 100.0 * 2.35 / 3.0 && 100.0 * 2.35 / 3.0 < hi);
    }

    #[test]
    fn strata_resample_separately_and_pool_by_sum_of_means() {
        // Stratum a: method = full everywhere; stratum b: the method scores 0. Pooled:
        // Σ mean(method) / Σ mean(full) = 0.5 / (0.5 + 1.0).
        let a = pairs(&[0.0, 1.0], &[0.0, 1.0]);
        let b = pairs(&[0.0, 0.0], &[1.0, 1.0]);
        assert_eq!(
            percent_of_full(&[a.clone(), b.clone()]),
            Some(100.0 * (0.5 / 1.5))
        );
        // Stratum a's mean is 0, 0.5 or 1 (p = 1/4, 1/2, 1/4): 0 %, 33.3 %, 50 %.
        let (lo, hi) = percent_of_full_interval(&[a, b], RESAMPLES, SEED).unwrap();
        assert_eq!((lo, hi), (0.0, 50.0));
    }

    #[test]
    fn degenerate_cases() {
        let same = pairs(&[0.3, 0.2, 1.0], &[0.3, 0.2, 1.0]);
        assert_eq!(
            percent_of_full_interval(&[same], RESAMPLES, SEED),
            Some((100.0, 100.0))
        );
        let zero = pairs(&[0.0, 0.0, 0.0], &[0.3, 0.5, 1.0]);
        assert_eq!(
            percent_of_full_interval(&[zero], RESAMPLES, SEED),
            Some((0.0, 0.0))
        );
        // Full cache right once in 3: (2/3)^3 = 30 % of the resamples have a full-cache mean
        // of 0; once in 8 among 8 samples: (7/8)^8 = 34 %; 5 in 8: (3/8)^8 = 0.04 %, kept.
        let five = pairs(&[1.0; 8], &[1., 1., 1., 1., 1., 0., 0., 0.]);
        assert!(percent_of_full_interval(&[five], RESAMPLES, SEED).is_some());
        let rare = pairs(&[1.0, 0.0, 0.0], &[1.0, 0.0, 0.0]);
        assert_eq!(percent_of_full_interval(&[rare], RESAMPLES, SEED), None);
        assert_eq!(
            percent_of_full_interval(&[Pairs::default()], 10, SEED),
            None
        );
        assert_eq!(percent_of_full(&[pairs(&[1.0], &[0.0])]), None);
    }

    #[test]
    fn deterministic_for_the_seed() {
        let p = pairs(
            &[0.91, 0.2, 0.55, 0.0, 0.7, 0.33, 0.1],
            &[1.0, 0.4, 0.5, 0.3, 0.8, 0.35, 0.2],
        );
        let s = std::slice::from_ref(&p);
        let a = percent_of_full_interval(s, RESAMPLES, SEED);
        assert_eq!(a, percent_of_full_interval(s, RESAMPLES, SEED));
        assert_ne!(a, percent_of_full_interval(s, RESAMPLES, SEED + 1));
        // The generator's first outputs (SplitMix64 from 0), pinned so a change is seen.
        let mut g = SplitMix64(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn pairs_by_id_then_by_position() {
        let m = [(Some("b"), 0.5), (Some("a"), 1.0), (Some("c"), 0.0)];
        let f = [(Some("a"), 0.8), (Some("b"), 0.6), (Some("d"), 0.1)];
        // Sorted by id, c and d (one side only) left out.
        assert_eq!(pair_samples(&m, &f), pairs(&[1.0, 0.5], &[0.8, 0.6]));
        let m = [(None, 0.5), (Some("a"), 1.0)];
        let f = [(Some("a"), 0.8), (Some("b"), 0.6)];
        assert_eq!(pair_samples(&m, &f), pairs(&[0.5, 1.0], &[0.8, 0.6]));
        assert!(pair_samples(&m, &f[..1]).is_empty());
    }
}
