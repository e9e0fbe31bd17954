//! PyramidKV (Cai et al., 2024): SnapKV's scorer with a per-layer budget that shrinks
//! linearly from the first layer to the last ("pyramidal information funnelling").
//!
//! Follows the PyramidKV reference allocation, with `cap = budget - window`:
//! `min = cap / beta` (beta 20), `max = 2 * cap - min`; if `max >= L - window` then
//! `max = L - window`, `min = 2 * cap - max`; `step = (max - min) / (layers - 1)`; layer `l`
//! keeps the window plus `max - l * step` tokens. The mean over layers stays about `budget`.
//! Compresses once, after prefill.
use candle_core::{Result, Tensor};

use super::policy::{evict_lowest, per_head_plan, Phase, Policy, SeqView};
use super::ranks::RankSplit;
use super::snapkv::SnapConfig;
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// The policy (see the module docs).
#[derive(Debug, Clone)]
pub struct PyramidKv {
    /// Scorer settings.
    pub snap: SnapConfig,
    /// Ratio of the first layer's to the last layer's extra tokens (about).
    pub beta: usize,
    /// Model layers.
    pub layers: usize,
}

/// Tokens kept per layer (window included) for a per-head `budget`, prompt `prompt_len`.
pub fn pyramid_budgets(
    budget: usize,
    window: usize,
    layers: usize,
    prompt_len: usize,
    beta: usize,
) -> Vec<usize> {
    if layers <= 1 {
        return vec![budget; layers];
    }
    let cap = budget.saturating_sub(window) as i64;
    let avail = prompt_len.saturating_sub(window) as i64;
    let mut min = cap / beta.max(1) as i64;
    let mut max = cap * 2 - min;
    if max >= avail {
        max = avail;
        min = cap * 2 - max;
    }
    let step = (max - min) / (layers as i64 - 1);
    (0..layers as i64)
        .map(|l| ((max - l * step).max(0)) as usize + window)
        .collect()
}

impl Policy for PyramidKv {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        Probe::LastQueries(self.snap.window)
    }
    fn score(&self, _: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.snap.score(probs, positions)
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode || view.seq_len <= budget {
            return EvictionPlan::default();
        }
        let per_layer = pyramid_budgets(
            budget,
            self.snap.window,
            self.layers,
            view.seq_len,
            self.beta,
        );
        per_head_plan(view, |l, _, h| {
            evict_lowest(
                &h.metric,
                &h.recent(view.seq_len, self.snap.window),
                per_layer[l],
            )
        })
    }
    fn min_budget(&self) -> usize {
        self.snap.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_shrink_linearly_and_average_to_the_budget() {
        let b = pyramid_budgets(128 + 32, 32, 5, 4000, 20);
        // cap 128: min 6, max 250, step 61
        assert_eq!(b, vec![282, 221, 160, 99, 38]);
        let mean = b.iter().sum::<usize>() as f64 / 5.0;
        assert!((mean - 160.0).abs() < 1.0);
        // short prompt: the first layer is capped at the prompt
        let b = pyramid_budgets(96, 32, 3, 132, 20);
        assert_eq!(b[0], 132);
    }
}
