//! Ada-SnapKV (AdaKV, Feng et al., 2024): SnapKV's scorer with the layer's budget shared
//! adaptively among its heads.
//!
//! Follows the AdaKV reference: per layer, `cap = budget - window` tokens per head; every head
//! first keeps its top `floor(cap * alpha)` prefix tokens (alpha 0.2, the safeguard), then the
//! remaining `heads * cap - heads * floor` are the top scores of the whole layer (all heads'
//! remaining prefix tokens together); the window is always kept. Compresses once.
//!
//! Departure: GQA heads are scored by the sum over the query group (AdaKV's GQA support uses the
//! mean, which ranks the same across heads of equal group size).
use candle_core::{Result, Tensor};

use super::policy::{Phase, Policy, SeqView};
use super::snapkv::SnapConfig;
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// The policy (see the module docs).
#[derive(Debug, Clone)]
pub struct AdaSnapKv {
    /// Scorer settings.
    pub snap: SnapConfig,
    /// Share of each head's budget guaranteed to it.
    pub floor: f64,
}

/// Kept flags of each head's slots for one layer: `prot[h]` always kept, `cap` extra tokens per
/// head on average, `floor` of them guaranteed per head.
pub fn ada_keep(
    metric: &[Vec<f32>],
    prot: &[Vec<bool>],
    cap: usize,
    floor: usize,
) -> Vec<Vec<bool>> {
    let mut keep: Vec<Vec<bool>> = prot.to_vec();
    let mut rest: Vec<(f32, usize, usize)> = Vec::new();
    for (h, m) in metric.iter().enumerate() {
        let mut cand: Vec<usize> = (0..m.len()).filter(|&i| !prot[h][i]).collect();
        cand.sort_by(|&a, &b| m[b].total_cmp(&m[a]).then(a.cmp(&b)));
        for (r, &i) in cand.iter().enumerate() {
            if r < floor {
                keep[h][i] = true;
            } else {
                rest.push((m[i], h, i));
            }
        }
    }
    let guaranteed: usize = keep
        .iter()
        .zip(prot)
        .map(|(k, p)| k.iter().zip(p).filter(|(k, p)| **k && !**p).count())
        .sum();
    let left = (cap * metric.len()).saturating_sub(guaranteed);
    rest.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for &(_, h, i) in rest.iter().take(left) {
        keep[h][i] = true;
    }
    keep
}

impl Policy for AdaSnapKv {
    fn prefill_probe(&self) -> Probe {
        Probe::LastQueries(self.snap.window)
    }
    fn score(&self, _: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.snap.score(probs, positions)
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode {
            return EvictionPlan::default();
        }
        let cap = budget.saturating_sub(self.snap.window);
        let floor = (cap as f64 * self.floor.clamp(0.0, 1.0)) as usize;
        let mut evicted = Vec::new();
        for layer in &view.heads {
            let metric: Vec<Vec<f32>> = layer.iter().map(|h| h.metric.clone()).collect();
            let prot: Vec<Vec<bool>> = layer
                .iter()
                .map(|h| h.recent(view.seq_len, self.snap.window))
                .collect();
            for k in ada_keep(&metric, &prot, cap, floor) {
                evicted.push((0..k.len()).filter(|&i| !k[i]).collect());
            }
        }
        EvictionPlan::from_heads(evicted, view.heads.first().map_or(0, Vec::len))
    }
    fn min_budget(&self) -> usize {
        self.snap.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_share_the_layer_budget_above_their_floor() {
        let m = vec![vec![9.0, 8.0, 7.0, 6.0, 0.0], vec![0.1, 0.2, 0.3, 0.4, 0.0]];
        let prot = vec![vec![false, false, false, false, true]; 2];
        // cap 2 per head (4 in the layer), floor 1: head 1 keeps only its best (0.4)
        let k = ada_keep(&m, &prot, 2, 1);
        assert_eq!(k[0], vec![true, true, true, false, true]);
        assert_eq!(k[1], vec![false, false, false, true, true]);
        let kept: usize = k.iter().flatten().filter(|x| **x).count();
        assert_eq!(kept, 4 + 2);
    }
}
