//! Random eviction (kvpress's `RandomPress`): every prompt token of every (layer, kv-head) gets
//! a pseudo-random score and each head keeps its budget's worth of the highest. The floor every
//! method must beat. Compresses once, after prefill.
//!
//! The score is a fixed hash of (layer, kv-head, position), so a run is reproducible and does
//! not depend on the slot order, the batch or the device (kvpress draws `torch.rand` with an
//! optional seed). Nothing is protected, the last token included, as in kvpress.
use candle_core::{Result, Tensor};

use super::policy::{evict_lowest, per_head_plan, zero_scores, Phase, Policy, SeqView};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// The policy (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomEviction;

/// A uniform score in [0, 1) for `(layer, kv_head, position)` (SplitMix64's finaliser).
pub fn random_score(layer: usize, kv_head: usize, position: u32) -> f32 {
    let mut z = ((layer as u64) << 40 ^ (kv_head as u64) << 32 ^ position as u64)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

impl Policy for RandomEviction {
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(zero_scores(positions))
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode {
            return EvictionPlan::default();
        }
        per_head_plan(view, |l, g, h| {
            let scores: Vec<f32> = h.position.iter().map(|&p| random_score(l, g, p)).collect();
            evict_lowest(&scores, &vec![false; scores.len()], budget)
        })
    }
    fn min_budget(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::policy::HeadView;

    fn view(positions: Vec<Vec<Vec<u32>>>, seq_len: usize) -> SeqView {
        SeqView {
            seq_len,
            block_size: 16,
            heads: positions
                .into_iter()
                .map(|l| {
                    l.into_iter()
                        .map(|p| HeadView {
                            metric: vec![0.0; p.len()],
                            position: p,
                        })
                        .collect()
                })
                .collect(),
        }
    }

    #[test]
    fn scores_are_uniform_and_fixed() {
        let s: Vec<f32> = (0..20_000).map(|p| random_score(3, 1, p)).collect();
        assert!(s.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = s.iter().sum::<f32>() / s.len() as f32;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let below = s.iter().filter(|&&x| x < 0.25).count() as f32 / s.len() as f32;
        assert!((below - 0.25).abs() < 0.01, "{below}");
        assert_eq!(random_score(3, 1, 7), s[7]);
        assert_ne!(random_score(3, 1, 7), random_score(3, 2, 7));
        assert_ne!(random_score(3, 1, 7), random_score(4, 1, 7));
    }

    /// Each head keeps exactly its budget, the heads choose differently, and the choice follows
    /// the positions, not the slot order.
    #[test]
    fn plan_keeps_the_budget_per_head_whatever_the_slot_order() {
        let p: Vec<u32> = (0..64).collect();
        let mut rev = p.clone();
        rev.reverse();
        let v = view(vec![vec![p.clone(), p.clone(), rev]], 64);
        let plan = RandomEviction.plan(&v, 16, Phase::Prefill);
        let heads = &plan.heads;
        assert_eq!(heads.len(), 3);
        let evicted_pos = |v: &SeqView, h: usize, slots: &[usize]| -> Vec<u32> {
            let mut x: Vec<u32> = slots.iter().map(|&s| v.heads[0][h].position[s]).collect();
            x.sort();
            x
        };
        for h in heads {
            assert_eq!(h.evict.len(), 48);
        }
        let (a, b, c) = (
            evicted_pos(&v, 0, &heads[0].evict),
            evicted_pos(&v, 1, &heads[1].evict),
            evicted_pos(&v, 2, &heads[2].evict),
        );
        assert_ne!(a, b, "heads 0 and 1 draw different scores");
        let w = view(vec![vec![p.clone(), p.clone(), p.clone()]], 64);
        let again = RandomEviction.plan(&w, 16, Phase::Prefill);
        let c2 = evicted_pos(&w, 2, &again.heads[2].evict);
        assert_eq!(c, c2, "slot order does not matter");
    }
}
