//! Budget arithmetic of KV-Compress: compression rate -> cache tokens per head -> blocks a
//! sequence may hold.
//!
//! Follows the paper's implementation exactly:
//! `M = max(min_cache_tokens, ((floor(L / r) - 1) // block_size) * block_size)` (Python floor
//! division, so tiny `L / r` gives the floor), rounded up to a multiple of the block size, and
//! `allowed blocks = ceil(M * layers * kv_heads / block_size)` for the whole sequence.
//!
//! Departure: a rate `r <= 1` means "no eviction" (the paper's 1x baseline); the formula alone
//! would evict one block per head at rate 1 (`(L - 1) // 16 * 16 < L`).

/// The paper's floor on cache tokens per head for rate budgets.
pub const MIN_CACHE_TOKENS: usize = 128;

/// Cache tokens per (layer, kv-head) for prompt length `prompt_len` at compression rate `rate`;
/// `None` when nothing is evicted (`rate <= 1`).
pub fn tokens_for_rate(
    prompt_len: usize,
    rate: f64,
    block_size: usize,
    min_cache_tokens: usize,
) -> Option<usize> {
    if rate.is_nan() || rate <= 1.0 {
        return None;
    }
    let bs = block_size.max(1) as i64;
    let target = (prompt_len as f64 / rate).floor() as i64;
    let m = ((target - 1).div_euclid(bs) * bs).max(min_cache_tokens as i64);
    Some(round_up(m as usize, block_size))
}

/// `n` rounded up to a multiple of `block_size`.
pub fn round_up(n: usize, block_size: usize) -> usize {
    n.div_ceil(block_size.max(1)) * block_size.max(1)
}

/// Blocks a whole sequence may hold with `tokens` per head.
pub fn allowed_blocks(tokens: usize, layers: usize, kv_heads: usize, block_size: usize) -> usize {
    (round_up(tokens, block_size) * layers * kv_heads).div_ceil(block_size.max(1))
}

/// How a run limited its cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Compression rate (`rate<r>`): prompt KV / kept KV.
    Rate(f64),
    /// Fixed cache budget in tokens (`tokens<n>`).
    Tokens(usize),
}

impl Budget {
    /// Parse a budget directory name: `rate8`, `rate1.5`, `tokens512`.
    pub fn parse_dir(name: &str) -> Option<Budget> {
        if let Some(r) = name.strip_prefix("rate") {
            r.parse::<f64>()
                .ok()
                .filter(|r| *r >= 1.0 && r.is_finite())
                .map(Budget::Rate)
        } else if let Some(t) = name.strip_prefix("tokens") {
            t.parse::<usize>()
                .ok()
                .filter(|t| *t > 0)
                .map(Budget::Tokens)
        } else {
            None
        }
    }

    /// The directory / CSV label: `rate8`, `tokens512`.
    pub fn label(&self) -> String {
        match self {
            Budget::Rate(r) => format!("rate{r}"),
            Budget::Tokens(t) => format!("tokens{t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_formula_matches_the_paper() {
        // L = 4000, r = 8: floor(500) - 1 = 499 -> 31 * 16 = 496
        assert_eq!(tokens_for_rate(4000, 8.0, 16, 128), Some(496));
        // short prompts hit the 128 floor: achieved rate is below nominal
        assert_eq!(tokens_for_rate(1000, 64.0, 16, 128), Some(128));
        assert_eq!(tokens_for_rate(10, 64.0, 16, 128), Some(128));
        // floor(L / r) = 0 -> (-1) // 16 = -1 -> -16 -> floor
        assert_eq!(tokens_for_rate(3, 8.0, 16, 0), Some(0));
        assert_eq!(tokens_for_rate(4000, 1.0, 16, 128), None);
        assert_eq!(tokens_for_rate(4000, 0.5, 16, 128), None);
        assert_eq!(allowed_blocks(496, 30, 3, 16), 31 * 90);
        assert_eq!(allowed_blocks(100, 2, 2, 16), 7 * 4);
    }
}
