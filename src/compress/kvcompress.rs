//! KV-Compress (Rehg, 2024): variable-rate, per-head, block-granular eviction on the paged cache.
//!
//! Follows the paper's implementation:
//! - scorer: squared attention (L2-sum by default; L1/L2 x sum/avg selectable) of the last `w`
//!   prompt queries (default 32; the paper's rate runs use 8) over all prompt keys, optional
//!   buffer, max-pool 7 per query head (on by default), summed over the query group; decode steps
//!   add `sum over the group of p^2` (`p` for L1 metrics) to every cached slot, new KVs start at 0;
//! - budget: `M` tokens per head from the rate formula with the 128-token floor, or a fixed token
//!   budget, rounded up to the block size; the whole sequence may hold
//!   `ceil(M * layers * kv_heads / block_size)` blocks;
//! - evictor ([`select_blocks`]): protected window (last `p` positions) masked to +inf, each
//!   head's slots sorted ascending, the j-th candidate of a head scored by its sorted slot
//!   `j * bs + h - 1` (`h` = tokens in the head's last block), the lowest candidates over all
//!   layers and heads of the sequence taken; a head giving k candidates evicts its
//!   `(k - 1) * bs + h` lowest slots (a prefix of its sorted list), then compaction;
//! - when: after prefill, and with continual compression (default on) after every decode step
//!   that leaves the sequence over its blocks; `--compress-once` turns that off.
//!
//! Departures: ties between equal candidates are broken by (layer, head, candidate index), and
//! equal slot metrics by slot order (the paper's GPU sort leaves them unspecified). Rate <= 1
//! evicts nothing (see [`crate::kvcache::budget`]).
use candle_core::{Result, Tensor};

use super::policy::{DeviceStepSpec, Phase, Policy, SeqView};
use super::ranks::{global_head, RankExchange, RankSplit};
use super::scorer::{window_scores, Agg, PoolKind, ScoreSpec};
use crate::cuda::select::{
    head_evictions_of, lowest_candidates, mask_protected, select_blocks, select_from_shards,
};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::budget::allowed_blocks;
use crate::kvcache::Probe;

/// KV-Compress settings (flags in [`super::MethodOptions`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KvCompressConfig {
    /// Observation window: last prompt queries scored.
    pub window: usize,
    /// Aggregation of the window's probabilities.
    pub agg: Agg,
    /// Max-pool kernel along keys (0 or 1 = off).
    pub max_pool: usize,
    /// Pairs count only when `key_pos + buffer <= query_pos`.
    pub buffer: usize,
    /// Last positions never evicted.
    pub protected: usize,
    /// Compress after decode steps too.
    pub continual: bool,
}

/// The policy (see the module docs).
#[derive(Debug, Clone)]
pub struct KvCompress {
    /// Settings.
    pub cfg: KvCompressConfig,
    /// Model layers.
    pub layers: usize,
    /// Kv-heads per layer.
    pub kv_heads: usize,
}

impl KvCompress {
    /// Metrics of every head with the protected window (and nothing else) masked to +inf,
    /// in `(layer, head)` order.
    pub fn masked_metrics(&self, view: &SeqView) -> Vec<Vec<f32>> {
        let first = view.seq_len.saturating_sub(self.cfg.protected) as u32;
        view.heads
            .iter()
            .flatten()
            .map(|h| mask_protected(&h.metric, &h.position, first))
            .collect()
    }

    /// Blocks to evict so the sequence fits `budget` tokens per head.
    pub fn blocks_to_evict(&self, view: &SeqView, budget: usize) -> usize {
        let allowed = allowed_blocks(budget, self.layers, self.kv_heads, view.block_size);
        view.blocks().saturating_sub(allowed)
    }

    /// Per-head candidate counts for `n_evict` blocks (see [`select_blocks`]).
    pub fn counts(&self, view: &SeqView, n_evict: usize) -> Vec<usize> {
        select_blocks(&self.masked_metrics(view), view.block_size, n_evict)
    }

    /// The plan evicting `counts[i]` candidates from head `i` (`(layer, head)` order).
    pub fn plan_counts(&self, view: &SeqView, counts: &[usize]) -> EvictionPlan {
        plan_from_masked(
            &self.masked_metrics(view),
            self.kv_heads,
            view.block_size,
            counts,
        )
    }
}

/// The plan evicting `counts[i]` candidates from head `i` of metrics already masked
/// (`(layer, kv-head)` order).
fn plan_from_masked(
    masked: &[Vec<f32>],
    kv_heads: usize,
    block_size: usize,
    counts: &[usize],
) -> EvictionPlan {
    EvictionPlan::from_heads(head_evictions_of(masked, block_size, counts), kv_heads)
}

impl Policy for KvCompress {
    fn prefill_probe(&self) -> Probe {
        Probe::LastQueries(self.cfg.window.max(1))
    }

    fn decode_probe(&self) -> Probe {
        Probe::All
    }

    fn score(&self, phase: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let spec = match phase {
            Phase::Prefill => ScoreSpec {
                agg: self.cfg.agg,
                pool: (self.cfg.max_pool > 1).then_some((self.cfg.max_pool, PoolKind::Max)),
                buffer: self.cfg.buffer,
                pool_skip_last: 0,
            },
            Phase::Decode => ScoreSpec {
                agg: self.cfg.agg.decode_form(),
                pool: None,
                buffer: 0,
                pool_skip_last: 0,
            },
        };
        window_scores(probs, positions, &spec)
    }

    fn plan(&self, view: &SeqView, budget: usize, _phase: Phase) -> EvictionPlan {
        let n = self.blocks_to_evict(view, budget);
        if n == 0 {
            return EvictionPlan::default();
        }
        let masked = self.masked_metrics(view);
        let counts = select_blocks(&masked, view.block_size, n);
        plan_from_masked(&masked, self.kv_heads, view.block_size, &counts)
    }

    fn rank_split(&self) -> RankSplit {
        RankSplit::Exchange
    }

    /// The one-GPU selection over every rank's heads (docs/design.md, "Tensor parallel"):
    /// the blocks to evict from the blocks all ranks hold (`self.kv_heads`: the whole
    /// model's), each rank's `n` cheapest candidates numbered by global head, gathered, the
    /// `n` cheapest of all taken; this rank evicts those of its heads.
    fn plan_exchanged(
        &self,
        view: &SeqView,
        budget: usize,
        _phase: Phase,
        x: &RankExchange,
    ) -> Result<EvictionPlan> {
        let bs = view.block_size;
        let allowed = allowed_blocks(budget, self.layers, self.kv_heads, bs);
        let n = x.sum(view.blocks())?.saturating_sub(allowed);
        if n == 0 {
            return Ok(EvictionPlan::default());
        }
        let masked = self.masked_metrics(view);
        let (local, shard) = (view.heads.first().map_or(0, Vec::len), x.shard());
        let mine: Vec<_> = lowest_candidates(&masked, 0, bs, n)
            .into_iter()
            .map(|(s, i, j)| (s, global_head(i, local, shard), j))
            .collect();
        let counts = select_from_shards(&x.gather(&mine, n)?, self.layers * self.kv_heads, n);
        let mine: Vec<usize> = (0..masked.len())
            .map(|i| counts[global_head(i, local, shard)])
            .collect();
        Ok(plan_from_masked(&masked, local, bs, &mine))
    }

    fn score_splits(&self) -> bool {
        matches!(self.cfg.agg, Agg::L1Sum | Agg::L2Sum) && self.cfg.max_pool <= 1
    }

    fn continual(&self) -> bool {
        self.cfg.continual
    }

    fn min_budget(&self) -> usize {
        self.cfg.protected
    }

    fn device_step(&self, budget: usize, block_size: usize) -> Option<DeviceStepSpec> {
        // The decode kernel adds p^2 (the decode form of the squared metrics) only.
        (self.cfg.agg.decode_form() == Agg::L2Sum).then(|| DeviceStepSpec {
            protected: self.cfg.protected,
            allowed_blocks: allowed_blocks(budget, self.layers, self.kv_heads, block_size),
            crush: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::policy::HeadView;
    use crate::cuda::select::*;
    use proptest::prelude::*;

    /// A head's metrics in ascending order.
    fn sorted_metric(m: &[f32]) -> Vec<f32> {
        let mut v = m.to_vec();
        v.sort_by(f32::total_cmp);
        v
    }

    #[test]
    fn candidates_follow_the_last_block_rule() {
        // 5 tokens, bs 2: h = 1; candidates at sorted 0, 2, 4
        let sorted = [0.1, 0.2, 0.3, 0.4, 0.5];
        assert_eq!(candidate_scores(&sorted, 2), vec![0.1, 0.3, 0.5]);
        assert_eq!(candidate_scores(&sorted[..4], 2), vec![0.2, 0.4]);
        assert_eq!(
            head_evictions(&[0.5, 0.1, 0.4, 0.2, 0.3], 2, 2),
            vec![1, 3, 4]
        );
    }

    #[test]
    fn global_selection_takes_cheapest_blocks_across_heads() {
        // bs 2; head 0 cheap, head 1 expensive except one slot, head 2 protected.
        let inf = f32::INFINITY;
        let m = vec![
            vec![0.1, 0.2, 0.3, 0.4],
            vec![0.05, 9.0, 9.0, 9.0],
            vec![inf, inf],
        ];
        // candidates: h0: 0.2, 0.4; h1: 9.0 (sorted 0.05, 9, 9, 9 -> index 1), 9.0; h2: none
        assert_eq!(select_blocks(&m, 2, 1), vec![1, 0, 0]);
        assert_eq!(select_blocks(&m, 2, 2), vec![2, 0, 0]);
        assert_eq!(select_blocks(&m, 2, 3), vec![2, 1, 0]);
        assert_eq!(select_blocks(&m, 2, 10), vec![2, 2, 0]);
    }

    /// Brute force: every per-head count vector with the given total whose candidates are all
    /// finite; the best minimises the sum of the chosen candidates' scores (each head gives a
    /// prefix of its sorted candidates). The greedy choice must reach that minimum.
    fn brute_force_min(metrics: &[Vec<f32>], bs: usize, n_evict: usize) -> (usize, f64) {
        let cands: Vec<Vec<f32>> = metrics
            .iter()
            .map(|m| {
                candidate_scores(&sorted_metric(m), bs)
                    .into_iter()
                    .filter(|s| s.is_finite())
                    .collect()
            })
            .collect();
        let total: usize = cands.iter().map(|c| c.len()).sum();
        let target = n_evict.min(total);
        let mut best = f64::INFINITY;
        let mut counts = vec![0usize; cands.len()];
        fn rec(i: usize, left: usize, cands: &[Vec<f32>], counts: &mut Vec<usize>, best: &mut f64) {
            if i == cands.len() {
                if left == 0 {
                    let s: f64 = counts
                        .iter()
                        .zip(cands)
                        .map(|(&k, c)| c[..k].iter().map(|&x| x as f64).sum::<f64>())
                        .sum();
                    *best = best.min(s);
                }
                return;
            }
            for k in 0..=cands[i].len().min(left) {
                counts[i] = k;
                rec(i + 1, left - k, cands, counts, best);
            }
            counts[i] = 0;
        }
        rec(0, target, &cands, &mut counts, &mut best);
        (target, best)
    }

    fn view_of(heads: Vec<Vec<f32>>, nkv: usize, bs: usize, seq_len: usize) -> SeqView {
        let mut layers = vec![];
        for chunk in heads.chunks(nkv) {
            layers.push(
                chunk
                    .iter()
                    .map(|m| HeadView {
                        // positions: a permutation-free layout, newest last
                        position: (seq_len - m.len()..seq_len).map(|p| p as u32).collect(),
                        metric: m.clone(),
                    })
                    .collect(),
            );
        }
        SeqView {
            seq_len,
            block_size: bs,
            heads: layers,
        }
    }

    #[test]
    fn total_order_key_orders_like_total_cmp() {
        let xs = [
            f32::NEG_INFINITY,
            -1e30,
            -1.0,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            0.5,
            1.0,
            3e38,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        for a in xs {
            for b in xs {
                assert_eq!(
                    total_order_key(a).cmp(&total_order_key(b)),
                    a.total_cmp(&b),
                    "{a} vs {b}"
                );
            }
        }
    }

    /// Metrics `x / 2` (small integers: ties frequent) with a protected (+inf) tail of
    /// `inf_tail` slots on every head, as the window mask makes.
    fn tailed_metrics(heads: &[Vec<u8>], inf_tail: usize) -> Vec<Vec<f32>> {
        heads
            .iter()
            .map(|h| {
                let mut v: Vec<f32> = h.iter().map(|&x| x as f32 * 0.5).collect();
                let n = v.len();
                for x in v.iter_mut().skip(n.saturating_sub(inf_tail)) {
                    *x = f32::INFINITY;
                }
                v
            })
            .collect()
    }

    proptest! {
        #[test]
        fn partial_selection_equals_full_sort(
            heads in prop::collection::vec(prop::collection::vec(0u8..12, 0..80), 1..8),
            inf_tail in 0usize..20,
            bs in 1usize..17,
            n_evict in 0usize..12,
        ) {
            let metrics = tailed_metrics(&heads, inf_tail);
            let counts = select_blocks(&metrics, bs, n_evict);
            prop_assert_eq!(&counts, &select_blocks_by_full_sort(&metrics, bs, n_evict));
            for (m, &k) in metrics.iter().zip(&counts) {
                let mut full: Vec<usize> = (0..m.len()).collect();
                full.sort_by(|&a, &b| m[a].total_cmp(&m[b]).then(a.cmp(&b)));
                let n = if k == 0 { 0 } else { (k - 1) * bs + last_block_tokens(m.len(), bs) };
                prop_assert_eq!(head_evictions(m, bs, k), full[..n].to_vec());
            }
        }

        /// Tensor parallel's selection (docs/design.md): heads split among 1-4 ranks in
        /// contiguous shards, each rank's `n_evict` lowest candidates gathered, the lowest of
        /// those taken: the one-GPU selection, head by head.
        #[test]
        fn selection_over_rank_shards_equals_one_gpu(
            heads in prop::collection::vec(prop::collection::vec(0u8..12, 0..60), 1..9),
            inf_tail in 0usize..20,
            ranks in 1usize..5,
            bs in 1usize..17,
            n_evict in 0usize..40,
        ) {
            let metrics = tailed_metrics(&heads, inf_tail);
            let per = metrics.len().div_ceil(ranks);
            let shards: Vec<_> = metrics
                .chunks(per)
                .enumerate()
                .map(|(r, m)| lowest_candidates(m, r * per, bs, n_evict))
                .collect();
            prop_assert_eq!(
                select_from_shards(&shards, metrics.len(), n_evict),
                select_blocks(&metrics, bs, n_evict)
            );
        }

        #[test]
        fn selection_equals_brute_force(
            heads in prop::collection::vec(prop::collection::vec(0u8..20, 0..9), 1..5),
            bs in 1usize..4,
            n_evict in 0usize..12,
        ) {
            // small integer metrics make ties frequent
            let metrics: Vec<Vec<f32>> = heads
                .iter()
                .map(|h| h.iter().map(|&x| x as f32).collect())
                .collect();
            let counts = select_blocks(&metrics, bs, n_evict);
            let (target, best) = brute_force_min(&metrics, bs, n_evict);
            prop_assert_eq!(counts.iter().sum::<usize>(), target);
            let got: f64 = counts
                .iter()
                .zip(&metrics)
                .map(|(&k, m)| {
                    candidate_scores(&sorted_metric(m), bs)[..k]
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>()
                })
                .sum();
            prop_assert!((got - best).abs() < 1e-9, "greedy {got} vs brute force {best}");
            // each head frees exactly k blocks
            for (k, m) in counts.iter().zip(&metrics) {
                let e = head_evictions(m, bs, *k).len();
                let blocks_after = (m.len() - e).div_ceil(bs);
                prop_assert_eq!(m.len().div_ceil(bs) - blocks_after, *k);
            }
        }

        #[test]
        fn protected_window_is_never_evicted_and_budget_is_met(
            lens in prop::collection::vec(1usize..40, 4),
            seed in 0u64..1000,
            budget in 1usize..40,
            protected in 0usize..10,
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let seq_len = *lens.iter().max().unwrap();
            let heads: Vec<Vec<f32>> = lens
                .iter()
                .map(|&n| (0..n).map(|_| rng.random::<f32>()).collect())
                .collect();
            let view = view_of(heads, 2, 4, seq_len);
            let kc = KvCompress {
                cfg: KvCompressConfig {
                    window: 8, agg: Agg::L2Sum, max_pool: 7, buffer: 0,
                    protected, continual: true,
                },
                layers: 2,
                kv_heads: 2,
            };
            let plan = kc.plan(&view, budget.max(protected), Phase::Prefill);
            let first = (seq_len - protected.min(seq_len)) as u32;
            let mut blocks_after = 0;
            let mut used = 0;
            // Fewest blocks reachable: only protected slots left in every head.
            let mut floor_blocks = 0;
            for (l, layer) in view.heads.iter().enumerate() {
                for (h, head) in layer.iter().enumerate() {
                    let ev = plan
                        .heads
                        .iter()
                        .find(|e| e.layer == l && e.kv_head == h)
                        .map(|e| e.evict.clone())
                        .unwrap_or_default();
                    for &s in &ev {
                        prop_assert!(head.position[s] < first, "protected slot evicted");
                    }
                    blocks_after += (head.len() - ev.len()).div_ceil(4);
                    used += head.len().div_ceil(4);
                    let n_prot = head.position.iter().filter(|&&p| p >= first).count();
                    floor_blocks += n_prot.div_ceil(4);
                }
            }
            // The sequence ends at its allowed blocks exactly, unless it already fit or the
            // protected slots alone need more.
            let allowed = allowed_blocks(budget.max(protected), 2, 2, 4);
            prop_assert_eq!(blocks_after, used.min(allowed.max(floor_blocks)));
        }
    }
}
