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
    Some(max_cache_tokens(
        prompt_len,
        rate,
        block_size,
        min_cache_tokens,
    ))
}

/// The KV-Compress reference's per-head budget at any `rate >= 1` (its throughput benchmark's
/// `max_cache_tokens = max(128, (int(L / rate) - 1) // 16 * 16)`, rounded up to a block): at
/// rate 1 it is `L - 16` for a 16-token block, so the reference compresses even at 1x.
pub fn max_cache_tokens(
    prompt_len: usize,
    rate: f64,
    block_size: usize,
    min_cache_tokens: usize,
) -> usize {
    let bs = block_size.max(1) as i64;
    let target = (prompt_len as f64 / rate.max(1.0)).floor() as i64;
    let m = ((target - 1).div_euclid(bs) * bs).max(min_cache_tokens as i64);
    round_up(m as usize, block_size)
}

/// `n` rounded up to a multiple of `block_size`.
pub fn round_up(n: usize, block_size: usize) -> usize {
    n.div_ceil(block_size.max(1)) * block_size.max(1)
}

/// Blocks a whole sequence may hold with `tokens` per head.
pub fn allowed_blocks(tokens: usize, layers: usize, kv_heads: usize, block_size: usize) -> usize {
    (round_up(tokens, block_size) * layers * kv_heads).div_ceil(block_size.max(1))
}

/// The shape of a pool in which prompts are prefilled once and forked per budget (see
/// [`shared_pool_blocks`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolShape {
    pub block_size: usize,
    /// Heads of a sequence: layers x kv-heads.
    pub heads: usize,
    pub max_new_tokens: usize,
    /// The model's context: a whole fork holds at most this many tokens (or its prompt).
    pub max_context: usize,
    /// Cache tokens per head a compressed fork keeps at least (the policy's protected window).
    pub min_budget: usize,
}

impl PoolShape {
    fn blocks(&self, tokens: usize) -> usize {
        self.heads * tokens.div_ceil(self.block_size.max(1))
    }

    /// A fork that keeps everything: the prompt and its new tokens, one partly filled block
    /// per head.
    fn whole(&self, prompt: usize) -> usize {
        let tokens = (prompt + self.max_new_tokens).min(self.max_context.max(prompt));
        self.blocks(tokens) + self.heads
    }

    /// A fork at its final size: whole (`None`), or `m` prompt tokens per head (at least
    /// `min_budget`, at most the prompt) and its new tokens, with two partly filled blocks per
    /// head (KV-Compress moves budget across heads, but a sequence's total stays within
    /// budget x heads), never more than whole.
    fn fork(&self, prompt: usize, raw: Option<usize>) -> usize {
        match raw {
            None => self.whole(prompt),
            Some(m) => (self.blocks(m.max(self.min_budget).min(prompt))
                + self.blocks(self.max_new_tokens)
                + 2 * self.heads)
                .min(self.whole(prompt)),
        }
    }
}

/// Blocks of a shared-prefill pool (`compress`'s batched runner): every fork of every prompt
/// at its final size, where each prompt's last fork continues in the prompt's own cache, which
/// holds the whole prompt until it is compressed (the larger of the two is counted), and one
/// transient copy of the longest prompt (a fork between its copy and its compression; forks
/// are made one at a time). `prompts`: (prompt tokens, the raw budgets of its forks in order).
pub fn shared_pool_blocks(s: &PoolShape, prompts: &[(usize, &[Option<usize>])]) -> usize {
    let prompt_blocks = |len: usize| s.blocks(len) + s.heads;
    let forks: usize = prompts
        .iter()
        .map(|&(len, raws)| match raws.split_last() {
            None => 0,
            Some((&last, rest)) => {
                rest.iter().map(|&r| s.fork(len, r)).sum::<usize>()
                    + s.fork(len, last).max(prompt_blocks(len))
            }
        })
        .sum();
    let longest = prompts.iter().map(|p| p.0).max().unwrap_or(0);
    forks + prompt_blocks(longest)
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
    fn reference_budget_is_l_minus_a_block_at_1x() {
        // benchmark_throughput.py: max(128, (int(L / r) - 1) // 16 * 16).
        assert_eq!(max_cache_tokens(6000, 1.0, 16, 128), 5984);
        assert_eq!(max_cache_tokens(6000, 8.0, 16, 128), 736);
        assert_eq!(max_cache_tokens(6000, 64.0, 16, 128), 128);
        assert_eq!(max_cache_tokens(100, 1.0, 16, 128), 128);
        assert_eq!(tokens_for_rate(6000, 1.0, 16, 128), None);
        assert_eq!(tokens_for_rate(6000, 8.0, 16, 128), Some(736));
    }

    #[test]
    fn a_keep_all_last_fork_costs_no_copy() {
        // Llama-3.1-8B (32 x 8 heads), 128,000 prompt tokens + 128 new: rates 2..64 then the
        // full cache, which continues in the prompt's own cache.
        let s = PoolShape {
            block_size: 16,
            heads: 256,
            max_new_tokens: 128,
            max_context: 131_072,
            min_budget: 32,
        };
        let len = 128_000;
        let whole = s.whole(len);
        assert_eq!(whole, 256 * 8008 + 256);
        let rates: Vec<Option<usize>> = [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
            .iter()
            .map(|&r| tokens_for_rate(len, r, 16, MIN_CACHE_TOKENS))
            .chain([None])
            .collect();
        let pool = shared_pool_blocks(&s, &[(len, &rates)]);
        // The halves sum to just under one whole; the whole fork; one transient copy.
        let rates_part: usize = rates[..6].iter().map(|&r| s.fork(len, r)).sum();
        assert!(rates_part < whole + 6 * (8 + 2) * 256, "{rates_part}");
        assert_eq!(pool, rates_part + whole + s.blocks(len) + 256);
        assert!(pool < 3 * whole, "{pool} vs {}", 3 * whole);
        // A compressed last fork still holds the whole prompt until it is compressed.
        let one = [tokens_for_rate(len, 8.0, 16, MIN_CACHE_TOKENS)];
        assert_eq!(
            shared_pool_blocks(&s, &[(len, &one)]),
            2 * (s.blocks(len) + 256)
        );
        // Two prompts: each one's forks, one transient copy of the longer.
        let two = shared_pool_blocks(&s, &[(len, &one), (1000, &one)]);
        assert_eq!(two, 2 * (s.blocks(len) + 256) + s.whole(1000));
    }

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
