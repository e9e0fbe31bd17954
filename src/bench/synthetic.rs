//! Synthetic prompts for the throughput benchmark: exactly `len` token ids drawn from a seeded
//! PRNG, skipping special and stop ids, like vLLM's `benchmark_throughput.py` random dataset
//! (which draws ids and feeds them as token ids, no text). Deterministic per (seed, index), so
//! every rate of a sweep decodes the same prompts.
use std::collections::BTreeSet;

/// SplitMix64: a tiny, well-mixed 64-bit generator (no `rand` dependency needed).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; modulo bias is below 2^-40 for vocabularies).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `n` prompts of exactly `len` ids in `0..vocab`, none in `exclude` (special tokens, stop
/// ids). Prompt `i` depends only on `(seed, i)`.
pub fn prompts(
    n: usize,
    len: usize,
    vocab: usize,
    exclude: &BTreeSet<u32>,
    seed: u64,
) -> Vec<Vec<u32>> {
    let allowed: Vec<u32> = (0..vocab as u32).filter(|i| !exclude.contains(i)).collect();
    assert!(
        !allowed.is_empty(),
        "every id of the vocabulary is excluded"
    );
    (0..n)
        .map(|i| {
            let mut rng = SplitMix64(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            (0..len)
                .map(|_| allowed[rng.below(allowed.len() as u64) as usize])
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_length_deterministic_and_no_excluded_ids() {
        let ex: BTreeSet<u32> = [0, 1, 2, 7].into_iter().collect();
        let a = prompts(5, 33, 50, &ex, 42);
        let b = prompts(5, 33, 50, &ex, 42);
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
        assert_ne!(a, prompts(5, 33, 50, &ex, 43));
        for p in &a {
            assert_eq!(p.len(), 33);
            assert!(p.iter().all(|t| *t < 50 && !ex.contains(t)));
        }
        // prompt i does not depend on how many prompts are drawn
        assert_eq!(prompts(2, 33, 50, &ex, 42)[1], a[1]);
    }
}
