//! StreamingLLM (Xiao et al., 2024): keep the first `sink` tokens (attention sinks, default 4)
//! and the most recent `budget - sink` tokens; no scoring.
//!
//! Follows the paper, applied per (layer, kv-head) on the paged cache, after prefill and after
//! every decode step (a sliding window). Keys stay at their original positions (no re-rotation:
//! the paper's position shift inside the cache is not applied, as for every method here).
use candle_core::{Result, Tensor};

use super::policy::{evict_lowest, per_head_plan, zero_scores, Phase, Policy, SeqView};
use super::ranks::RankSplit;

/// The slots StreamingLLM evicts from a head holding tokens at `position`: all but `keep`, oldest
/// first, never a sink (position < `sink`) — what [`evict_lowest`] gives with the age as the
/// metric (a head's positions are distinct, so there are no ties). After each decode step only
/// a slot or two go: those are found by repeated scans without building the age and sink
/// arrays, which made StreamingLLM's plan twice H2O's (`kvc-step-bench --breakdown`).
pub fn evict_oldest(position: &[u32], sink: usize, keep: usize) -> Vec<usize> {
    let n = position.len();
    if n <= keep {
        return vec![];
    }
    let n_evict = n - keep;
    if n_evict > 4 {
        let age: Vec<f32> = position.iter().map(|&p| p as f32).collect();
        let sinks: Vec<bool> = position.iter().map(|&p| (p as usize) < sink).collect();
        return evict_lowest(&age, &sinks, keep);
    }
    let mut out = Vec::with_capacity(n_evict);
    let mut taken: Option<u32> = None; // positions up to this one are already evicted
    for _ in 0..n_evict {
        let mut best: Option<(u32, usize)> = None;
        for (i, &p) in position.iter().enumerate() {
            let eligible = (p as usize) >= sink && taken.is_none_or(|t| p > t);
            if eligible && best.is_none_or(|(b, _)| p < b) {
                best = Some((p, i));
            }
        }
        match best {
            Some((p, i)) => {
                out.push(i);
                taken = Some(p);
            }
            None => break,
        }
    }
    out
}
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// The policy (see the module docs).
#[derive(Debug, Clone)]
pub struct StreamingLlm {
    /// Attention-sink tokens kept at the start.
    pub sink: usize,
}

impl Policy for StreamingLlm {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(zero_scores(positions))
    }
    fn plan(&self, view: &SeqView, budget: usize, _: Phase) -> EvictionPlan {
        per_head_plan(view, |_, _, h| evict_oldest(&h.position, self.sink, budget))
    }
    fn continual(&self) -> bool {
        true
    }
    fn min_budget(&self) -> usize {
        self.sink + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan path and the general path give exactly what `evict_lowest` gives on the ages:
    /// random distinct positions (as after compactions), random sinks and budgets, 1 to 12
    /// slots to evict (both paths).
    #[test]
    fn evict_oldest_equals_evict_lowest_on_ages() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..500 {
            let n = rng.random_range(1..60usize);
            let mut pos: Vec<u32> = (0..n as u32 * 2).step_by(2).collect();
            pos.shuffle(&mut rng);
            let sink = rng.random_range(0..8usize);
            let keep = n.saturating_sub(rng.random_range(0..13usize));
            let age: Vec<f32> = pos.iter().map(|&p| p as f32).collect();
            let sinks: Vec<bool> = pos.iter().map(|&p| (p as usize) < sink).collect();
            assert_eq!(
                evict_oldest(&pos, sink, keep),
                evict_lowest(&age, &sinks, keep),
                "n {n} sink {sink} keep {keep} pos {pos:?}"
            );
        }
    }
}
