//! SnapKV (Li et al., 2024): keep the observation window plus, per kv-head, the prompt tokens
//! the window attends to most.
//!
//! Follows the SnapKV reference: the last `w` prompt queries (default 32) score every prefix
//! key by their summed softmax probability (L1-sum), the scores are average-pooled (kernel 5,
//! padding 2, over the prefix only), and each head keeps the window plus its top
//! `budget - w` prefix tokens. Compresses once, after prefill.
//!
//! Departures: the reference repeats KV heads for GQA; here one KV per (token, kv-head) is kept
//! and scored by the sum over the query group (the group mean ranks the same). The budget is
//! per (layer, kv-head) tokens including the window.
use candle_core::{Result, Tensor};

use super::policy::{evict_lowest, per_head_plan, Phase, Policy, SeqView};
use super::ranks::RankSplit;
use super::scorer::{window_scores, Agg, PoolKind, ScoreSpec};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// SnapKV-family settings (shared by PyramidKV and Ada-SnapKV).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapConfig {
    /// Observation window (always kept).
    pub window: usize,
    /// Pooling kernel (0 or 1 = off).
    pub kernel: usize,
    /// Pooling kind.
    pub pool: PoolKind,
}

impl SnapConfig {
    /// The window scorer of the SnapKV family.
    pub fn score(&self, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        window_scores(
            probs,
            positions,
            &ScoreSpec {
                agg: Agg::L1Sum,
                pool: (self.kernel > 1).then_some((self.kernel, self.pool)),
                buffer: 0,
                pool_skip_last: self.window,
            },
        )
    }
}

/// The policy (see the module docs).
#[derive(Debug, Clone)]
pub struct SnapKv {
    /// Settings.
    pub cfg: SnapConfig,
}

impl Policy for SnapKv {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        Probe::LastQueries(self.cfg.window)
    }
    fn score(&self, _: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.cfg.score(probs, positions)
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode {
            return EvictionPlan::default();
        }
        per_head_plan(view, |_, _, h| {
            evict_lowest(&h.metric, &h.recent(view.seq_len, self.cfg.window), budget)
        })
    }
    fn min_budget(&self) -> usize {
        self.cfg.window
    }
}
