//! Key-based scorers of kvpress: Knorm (`KnormPress`, Devoto et al., 2024: keys with a small
//! L2 norm draw attention, so the largest norms go) and KeyDiff (`KeyDiffPress`, Park et al.,
//! 2025: keys least similar to the head's mean direction are kept); their policy also runs
//! LagKV's scores of keys and values ([`super::lagkv`]). They read the prompt's keys,
//! not attention, so they need no probed queries and never see the question's attention.
//! Compress once, after prefill; nothing is protected, as in kvpress. The scores are candle ops
//! on the cache's device (the same ops on the CPU are their twin).
//!
//! Departure from KeyDiff's paper: it evicts block by block while prefilling (kvpress's
//! `BlockPress` wrapper); here, as kvpress's plain `KeyDiffPress`, once over the whole prompt.
use candle_core::{DType, Result, Tensor, D};

use super::policy::{lowest_after_prefill, zero_scores, LayerKeys, Phase, Policy, SeqView};
use super::ranks::RankSplit;
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// Which key score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyScore {
    /// `-||k||`.
    Knorm,
    /// `-cos(k, mean of the head's unit keys)`.
    KeyDiff,
    /// LagKV's partition ranks from keys and values ([`super::lagkv`]).
    LagKv(super::lagkv::LagKv),
}

/// The policy (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct KeyScored {
    pub score: KeyScore,
}

impl KeyScored {
    /// Scores of `keys` (and, for LagKV, `values`) `[len, d]`, in f32.
    pub fn scores(&self, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let norm = |k: &Tensor| k.sqr()?.sum_keepdim(D::Minus1)?.sqrt(); // [len, 1]
        match self.score {
            KeyScore::LagKv(lag) => lag.scores(keys, values),
            KeyScore::Knorm => norm(&keys.to_dtype(DType::F32)?)?.squeeze(D::Minus1)?.neg(),
            KeyScore::KeyDiff => {
                let k = keys.to_dtype(DType::F32)?;
                let norm = norm(&k)?;
                // F.normalize clamps the norm at 1e-12; cosine_similarity at 1e-8 per side.
                let unit = k.broadcast_div(&norm.clamp(1e-12f32, f32::MAX)?)?;
                let anchor = unit.mean_keepdim(0)?; // [1, d]
                let a_norm = anchor.sqr()?.sum_all()?.sqrt()?.clamp(1e-8f32, f32::MAX)?;
                let dot = k.broadcast_mul(&anchor)?.sum(D::Minus1)?; // [len]
                let den = norm.squeeze(D::Minus1)?.clamp(1e-8f32, f32::MAX)?;
                dot.div(&den)?.broadcast_div(&a_norm)?.neg()
            }
        }
    }
}

impl Policy for KeyScored {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(zero_scores(positions))
    }
    fn scores_keys(&self) -> bool {
        true
    }
    fn key_scores(&self, layer: &LayerKeys) -> Result<Vec<Vec<f32>>> {
        layer
            .heads
            .iter()
            .map(|(k, v)| self.scores(k, v)?.to_vec1())
            .collect()
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        lowest_after_prefill(view, budget, phase)
    }
    fn min_budget(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn keys() -> Tensor {
        let k: Vec<f32> = vec![3.0, 4.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0];
        Tensor::from_vec(k, (4, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn knorm_is_minus_the_key_norm() {
        let s = KeyScored {
            score: KeyScore::Knorm,
        };
        let v: Vec<f32> = s.scores(&keys(), &keys()).unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![-5.0, -1.0, -1.0, 0.0]);
        let bf = keys().to_dtype(DType::BF16).unwrap();
        let layer = LayerKeys {
            heads: &[(bf.clone(), bf)],
            positions: &[vec![0, 1, 2, 3]],
            seq_len: 4,
            queries: None,
            layer: 0,
            budget: None,
            metric: &[],
            out_proj: None,
        };
        assert_eq!(
            s.key_scores(&layer).unwrap(),
            vec![vec![-5.0, -1.0, -1.0, 0.0]]
        );
    }

    /// Unit keys (0.6, 0.8), (0, 1), (1, 0), and a zero key (0, 0): anchor = their mean
    /// (0.4, 0.45); the score is minus the cosine with it (the zero key's cosine is 0).
    #[test]
    fn keydiff_is_minus_the_cosine_with_the_mean_unit_key() {
        let s = KeyScored {
            score: KeyScore::KeyDiff,
        };
        let v: Vec<f32> = s.scores(&keys(), &keys()).unwrap().to_vec1().unwrap();
        let a = (0.4f32, 0.45f32);
        let an = (a.0 * a.0 + a.1 * a.1).sqrt();
        let want = [
            -(3.0 * a.0 + 4.0 * a.1) / (5.0 * an),
            -a.1 / an,
            -a.0 / an,
            0.0,
        ];
        for (x, w) in v.iter().zip(want) {
            assert!((x - w).abs() < 1e-6, "{v:?} vs {want:?}");
        }
    }

    #[test]
    fn plan_keeps_the_highest_scores_without_protection() {
        use crate::compress::policy::HeadView;
        let view = SeqView {
            seq_len: 4,
            block_size: 16,
            heads: vec![vec![HeadView {
                metric: vec![-5.0, -1.0, -2.0, 0.0],
                position: vec![0, 1, 2, 3],
            }]],
        };
        let p = KeyScored {
            score: KeyScore::Knorm,
        }
        .plan(&view, 2, Phase::Prefill);
        assert_eq!(p, EvictionPlan::from_heads(vec![vec![0, 2]], 1));
    }
}
