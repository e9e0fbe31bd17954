//! StreamingLLM (Xiao et al., 2024): keep the first `sink` tokens (attention sinks, default 4)
//! and the most recent `budget - sink` tokens; no scoring.
//!
//! Follows the paper, applied per (layer, kv-head) on the paged cache, after prefill and after
//! every decode step (a sliding window). Keys stay at their original positions (no re-rotation:
//! the paper's position shift inside the cache is not applied, as for every method here).
use candle_core::{Result, Tensor};

use super::policy::{evict_lowest, per_head_plan, Phase, Policy, SeqView};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// The policy (see the module docs).
#[derive(Debug, Clone)]
pub struct StreamingLlm {
    /// Attention-sink tokens kept at the start.
    pub sink: usize,
}

impl Policy for StreamingLlm {
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    fn decode_probe(&self) -> Probe {
        Probe::None
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(positions.iter().map(|p| vec![0.0; p.len()]).collect())
    }
    fn plan(&self, view: &SeqView, budget: usize, _: Phase) -> EvictionPlan {
        per_head_plan(view, |_, _, h| {
            // Older = cheaper; sinks protected.
            let age: Vec<f32> = h.position.iter().map(|&p| p as f32).collect();
            let sinks: Vec<bool> = h
                .position
                .iter()
                .map(|&p| (p as usize) < self.sink)
                .collect();
            evict_lowest(&age, &sinks, budget)
        })
    }
    fn continual(&self) -> bool {
        true
    }
    fn min_budget(&self) -> usize {
        self.sink + 1
    }
}
