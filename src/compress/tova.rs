//! TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"), in kvpress's form
//! (`TOVAPress`): the last prompt query's attention, averaged over every query head of the
//! layer, scores each prompt token; every kv-head keeps the same top tokens (its budget's
//! worth), the last token always kept. Compresses once, after prefill.
//!
//! Departure from the paper: TOVA evicts one token at every decode step by the current query's
//! attention (a fixed-size cache); kvpress and this type compress the prompt once, which is
//! the setting the kvpress leaderboard compares.
use candle_core::{Result, Tensor};
use std::collections::HashMap;

use super::policy::{evict_lowest, per_head_plan, Phase, Policy, SeqView};
use super::ranks::RankSplit;
use super::scorer::{window_scores, Agg, ScoreSpec};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// The policy (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tova;

/// The mean over kv-heads of `per_head[g]` (each already summed over its query group), matched
/// by token position, given back to every kv-head in its own slot order: `positions[g]` are
/// kv-head `g`'s slot positions. Divided by the number of query heads `n_heads`, this is the
/// mean over every query head of the layer.
pub fn mean_over_heads(
    per_head: &[Vec<f32>],
    positions: &[Vec<u32>],
    n_heads: usize,
) -> Vec<Vec<f32>> {
    let mut sum: HashMap<u32, f32> = HashMap::new();
    for (scores, pos) in per_head.iter().zip(positions) {
        for (s, p) in scores.iter().zip(pos) {
            *sum.entry(*p).or_default() += s;
        }
    }
    let n = n_heads.max(1) as f32;
    positions
        .iter()
        .map(|pos| {
            pos.iter()
                .map(|p| sum.get(p).copied().unwrap_or(0.0) / n)
                .collect()
        })
        .collect()
}

impl Policy for Tova {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        Probe::LastQueries(1)
    }
    fn score(&self, _: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let per_head = window_scores(
            probs,
            positions,
            &ScoreSpec {
                agg: Agg::L1Sum,
                pool: None,
                buffer: 0,
                pool_skip_last: 0,
            },
        )?;
        Ok(mean_over_heads(&per_head, positions, probs.dim(1)?))
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode {
            return EvictionPlan::default();
        }
        per_head_plan(view, |_, _, h| {
            evict_lowest(&h.metric, &h.recent(view.seq_len, 1), budget)
        })
    }
    fn score_splits(&self) -> bool {
        true
    }
    fn min_budget(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two kv-heads of two query heads each, one probed query over four keys: the score of a
    /// key is its attention averaged over the four query heads, the same for both kv-heads
    /// (kv-head 1 lists its slots in another order).
    #[test]
    fn scores_are_the_last_querys_attention_averaged_over_all_heads() {
        let p: Vec<f32> = vec![
            0.1, 0.2, 0.3, 0.4, // head 0
            0.4, 0.3, 0.2, 0.1, // head 1
            0.0, 0.0, 0.5, 0.5, // head 2
            1.0, 0.0, 0.0, 0.0, // head 3
        ];
        let probs = Tensor::from_vec(p, (1, 4, 1, 4), &Device::Cpu).unwrap();
        let positions = vec![vec![0u32, 1, 2, 3], vec![0, 1, 2, 3]];
        let s = Tova.score(Phase::Prefill, &probs, &positions).unwrap();
        let want = [0.375f32, 0.125, 0.25, 0.25];
        for g in 0..2 {
            for (a, b) in s[g].iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "{:?}", s);
            }
        }
        // Matched by position, not by slot index.
        let per_head = vec![vec![1.0, 2.0, 3.0], vec![30.0, 10.0, 20.0]];
        let pos = vec![vec![5u32, 6, 7], vec![7, 5, 6]];
        let m = mean_over_heads(&per_head, &pos, 2);
        assert_eq!(m, vec![vec![5.5, 11.0, 16.5], vec![16.5, 5.5, 11.0]]);
    }

    #[test]
    fn plan_keeps_the_budget_and_the_last_token() {
        use super::super::policy::HeadView;
        let head = HeadView {
            metric: vec![0.9, 0.1, 0.5, 0.0, 0.01],
            position: vec![0, 1, 2, 3, 4],
        };
        let view = SeqView {
            seq_len: 5,
            block_size: 16,
            heads: vec![vec![head]],
        };
        let plan = Tova.plan(&view, 3, Phase::Prefill);
        // The last token (score 0.01) is kept; the two lowest others go.
        assert_eq!(plan, EvictionPlan::from_heads(vec![vec![3, 1]], 1));
        assert_eq!(Tova.plan(&view, 3, Phase::Decode), EvictionPlan::default());
    }
}
