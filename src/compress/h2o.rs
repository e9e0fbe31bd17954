//! H2O (Zhang et al., 2023): heavy hitters (largest accumulated attention) plus recent tokens.
//!
//! Follows the paper: a token's score is the sum of the attention probabilities every query gave
//! it (all prompt queries at prefill, then each decode query, accumulated); the cache keeps the
//! `recent_ratio * budget` most recent tokens (default half) and the highest-scoring of the rest,
//! and is held at the budget after every decode step (one eviction per step). Per (layer,
//! kv-head), scores summed over the query group.
//!
//! Departure: `--h2o-queries n` limits the prefill scoring to the last n prompt queries (the
//! default 0 scores all, which prefills the prompt as one chunk to observe every query).
use candle_core::{Result, Tensor};

use super::policy::{evict_lowest, per_head_plan, Phase, Policy, SeqView};
use super::ranks::RankSplit;
use super::scorer::{window_scores, Agg, ScoreSpec};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// The policy (see the module docs).
#[derive(Debug, Clone)]
pub struct H2o {
    /// Share of the budget for recent tokens.
    pub recent_ratio: f64,
    /// Prompt queries that score (0 = all).
    pub queries: usize,
}

impl H2o {
    fn recent(&self, budget: usize) -> usize {
        ((budget as f64 * self.recent_ratio.clamp(0.0, 1.0)).round() as usize).min(budget)
    }
}

impl Policy for H2o {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        match self.queries {
            0 => Probe::LastQueries(usize::MAX),
            n => Probe::LastQueries(n),
        }
    }
    fn decode_probe(&self) -> Probe {
        Probe::All
    }
    fn score(&self, _: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let spec = ScoreSpec {
            agg: Agg::L1Sum,
            pool: None,
            buffer: 0,
            pool_skip_last: 0,
        };
        window_scores(probs, positions, &spec)
    }
    fn plan(&self, view: &SeqView, budget: usize, _: Phase) -> EvictionPlan {
        let recent = self.recent(budget);
        per_head_plan(view, |_, _, h| {
            evict_lowest(&h.metric, &h.recent(view.seq_len, recent), budget)
        })
    }
    fn continual(&self) -> bool {
        true
    }
    fn min_budget(&self) -> usize {
        1
    }
}
