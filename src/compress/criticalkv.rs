//! CriticalKV (Feng et al., 2025), kvpress's `CriticalKVPress`: a modifier of a method that
//! scores every prompt token once after prefill (`snapkv`, `tova`, `knorm`, `keydiff`,
//! `expected-attention`). A token's contribution to the attention output is its attention
//! times its value as the output projection sees it, so per kv-head:
//! 1. the base's best `first_stage x budget` tokens are kept outright (stage 1);
//! 2. every other token is ranked by `(score + epsilon) x n`, where `n` is the L1 norm of the
//!    token's value through the output projection, `||v W_o[h]||_1`, averaged over the query
//!    heads `h` of the kv-head's group (stage 2);
//!
//! and the base's own plan keeps the highest of the resulting metric (kvpress: stage 1 scores
//! the dtype's maximum). Defaults are kvpress's: `epsilon` 1e-4, `first_stage` 0.5.
//!
//! The rescaling happens in [`Policy::key_scores`] after the base's scores are in the metric
//! (the hooks hand it the metric and `W_o`, [`Policy::reweights`]); it returns the increments
//! that make the metric the stage-1 / stage-2 ranking (stage 1 above every stage-2 value).
//! As ChunkKV does, the base's protected positions (its last `min_budget` tokens: SnapKV's
//! window, TOVA's last token) count as stage-1 members (kvpress's SnapKV gives its window the
//! highest score, so they lead its stage 1 too). The norms are candle ops on the cache's
//! device (the same ops on the CPU are their twin).
use candle_core::{DType, Result, Tensor, D};

use super::policy::{LayerKeys, Phase, Policy, SeqView};
use super::ranks::{RankExchange, RankSplit};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// Bases CriticalKV modifies: the methods whose whole score is in the metric once after
/// prefill (kvc's `random` draws its scores inside its plan, so there is nothing to rescale).
pub const CRITICALKV_BASES: &[&str] = &["snapkv", "tova", "knorm", "keydiff", "expected-attention"];

/// The modifier (see the module docs).
pub struct CriticalKv {
    pub base: Box<dyn Policy>,
    /// Added to a score before it is multiplied by the projected value norm.
    pub epsilon: f32,
    /// Fraction of the per-head budget kept by the base's score alone.
    pub first_stage: f32,
}

impl CriticalKv {
    /// `base` with kvpress's defaults.
    pub fn new(base: Box<dyn Policy>) -> Self {
        CriticalKv {
            base,
            epsilon: 1e-4,
            first_stage: 0.5,
        }
    }

    /// The stage-1 / stage-2 metric of one kv-head (see the module docs): `score` the base's
    /// score of each slot, `norm` its projected value norm, `protected` whether the base
    /// protects it, `budget` the head's cache tokens.
    pub fn reweighted(
        &self,
        score: &[f32],
        norm: &[f32],
        protected: &[bool],
        budget: usize,
    ) -> Vec<f32> {
        let mut out: Vec<f32> = score
            .iter()
            .zip(norm)
            .map(|(s, n)| (s + self.epsilon) * n)
            .collect();
        let first = (budget as f32 * self.first_stage) as usize;
        let mut stage1: Vec<usize> = (0..score.len()).filter(|&i| protected[i]).collect();
        let mut rest: Vec<usize> = (0..score.len()).filter(|&i| !protected[i]).collect();
        // Highest score first; ties keep the earlier slot (a stable order).
        rest.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        stage1.extend(rest.into_iter().take(first.saturating_sub(stage1.len())));
        let top = out.iter().copied().fold(f32::MIN, f32::max);
        let above = top + top.abs().max(1.0);
        for i in stage1 {
            out[i] = above;
        }
        out
    }
}

/// `||v W_o[h]||_1` per slot of one kv-head's values `[len, d]`, averaged over the query heads
/// `h` of its group (`out_proj`: `[hidden, heads * d]`, `group`: query heads per kv-head), in
/// f32 `[len]`.
pub fn projected_value_norms(
    values: &Tensor,
    out_proj: &Tensor,
    kv_head: usize,
    group: usize,
) -> Result<Tensor> {
    let d = values.dim(D::Minus1)?;
    let v = values.to_dtype(DType::F32)?;
    let mut sum: Option<Tensor> = None;
    for q in kv_head * group..(kv_head + 1) * group {
        // Contiguous before the matmul: a column slice of W_o transposed is a layout candle's
        // CUDA matmul refuses (in bf16 the dtype cast happens to copy; in f32 it does not).
        let w = out_proj
            .narrow(1, q * d, d)?
            .to_dtype(DType::F32)?
            .contiguous()?; // [hidden, d]
        let n = v.matmul(&w.t()?)?.abs()?.sum(D::Minus1)?; // [len]
        sum = Some(match sum {
            Some(s) => (s + n)?,
            None => n,
        });
    }
    let sum = sum.ok_or_else(|| candle_core::Error::Msg("a kv-head with no query heads".into()))?;
    sum / group as f64
}

impl Policy for CriticalKv {
    fn prefill_probe(&self) -> Probe {
        self.base.prefill_probe()
    }
    fn score(&self, phase: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.base.score(phase, probs, positions)
    }
    fn scores_keys(&self) -> bool {
        true
    }
    fn reweights(&self) -> bool {
        true
    }
    fn key_scores(&self, layer: &LayerKeys) -> Result<Vec<Vec<f32>>> {
        let Some(budget) = layer.budget else {
            // No eviction: nothing to rank, the metric stays the base's.
            return Ok(layer.positions.iter().map(|p| vec![0.0; p.len()]).collect());
        };
        let w = layer.out_proj.ok_or_else(|| {
            candle_core::Error::Msg("CriticalKV needs the layer's output projection".into())
        })?;
        let kv_heads = layer.heads.len();
        let d = layer
            .heads
            .first()
            .map_or(1, |(_, v)| v.dim(D::Minus1).unwrap_or(1));
        let group = (w.dim(1)? / d.max(1)) / kv_heads.max(1);
        let base = if self.base.scores_keys() {
            Some(self.base.key_scores(layer)?)
        } else {
            None
        };
        let first_protected = layer.seq_len.saturating_sub(self.base.min_budget()) as u32;
        (0..kv_heads)
            .map(|h| {
                let current = layer.metric.get(h).map_or(&[][..], Vec::as_slice);
                let n = layer.positions[h].len();
                let score: Vec<f32> = (0..n)
                    .map(|i| {
                        current.get(i).copied().unwrap_or(0.0)
                            + base.as_ref().map_or(0.0, |b| b[h][i])
                    })
                    .collect();
                let norm: Vec<f32> =
                    projected_value_norms(&layer.heads[h].1, w, h, group)?.to_vec1()?;
                let protected: Vec<bool> = layer.positions[h]
                    .iter()
                    .map(|&p| p >= first_protected)
                    .collect();
                let target = self.reweighted(&score, &norm, &protected, budget);
                Ok((0..n)
                    .map(|i| target[i] - current.get(i).copied().unwrap_or(0.0))
                    .collect())
            })
            .collect()
    }
    fn queries_skipped(&self) -> usize {
        self.base.queries_skipped()
    }
    fn score_splits(&self) -> bool {
        self.base.score_splits()
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        self.base.plan(view, budget, phase)
    }
    fn rank_split(&self) -> RankSplit {
        self.base.rank_split()
    }
    fn plan_exchanged(
        &self,
        view: &SeqView,
        budget: usize,
        phase: Phase,
        x: &RankExchange,
    ) -> Result<EvictionPlan> {
        self.base.plan_exchanged(view, budget, phase, x)
    }
    fn min_budget(&self) -> usize {
        self.base.min_budget()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Scores 4, 3, 2, 1, 0.5 with projected norms 1, 1, 5, 1, 10 and a budget of 4: stage 1
    /// keeps the best two by score (slots 0, 1) above everything; the rest rank by
    /// (s + eps) n: slot 2 (10.0005), slot 4 (5.001), slot 3 (1.0001). A protected last slot
    /// takes one of stage 1's two places from slot 1.
    #[test]
    fn two_stages_by_hand() {
        let ck = CriticalKv::new(Box::new(super::super::tova::Tova));
        let s = [4.0, 3.0, 2.0, 1.0, 0.5];
        let n = [1.0, 1.0, 5.0, 1.0, 10.0];
        let m = ck.reweighted(&s, &n, &[false; 5], 4);
        let e = 1e-4f32;
        let stage2 = [(2.0 + e) * 5.0, (1.0 + e) * 1.0, (0.5 + e) * 10.0];
        assert_eq!(&m[2..], &stage2);
        assert!(m[0] == m[1] && m[0] > stage2[0], "{m:?}");
        let m = ck.reweighted(&s, &n, &[false, false, false, false, true], 4);
        assert!(m[4] == m[0] && m[0] > m[1], "{m:?}");
        assert_eq!(m[1], (3.0 + e) * 1.0);
    }

    /// W_o `[hidden 3, 2 heads x d 2]` of the hand cases.
    fn w_o() -> Tensor {
        let rows = [
            [1f32, 0.0, 2.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 3.0],
        ];
        Tensor::new(&rows, &Device::Cpu).unwrap()
    }

    /// Knorm under CriticalKV through `key_scores` and the base's plan, by hand. One kv-head
    /// of two query heads (W_o as in `projected_norm_by_hand`); keys (3, 4), (1, 0), (0, 1),
    /// (0, 0) score -5, -1, -1, 0, plus the 0.5 already in the metric; values (1, -2), (0, 0),
    /// (1, 0), (0, 1) project to norms 6, 0, 2, 2.5. Budget 2: stage 1 holds one token, the
    /// protected last one (Knorm's `min_budget` 1); stage 2 ranks (0.5 + eps) 0 above
    /// (-0.5 + eps) 2 above (-4.5 + eps) 6, so slots 3 and 1 stay (Knorm alone ties slots 1
    /// and 2 and keeps 2). The increments bring the metric to those values.
    #[test]
    fn knorm_key_scores_and_plan_by_hand() {
        use super::super::knorm::{KeyScore, KeyScored};
        use super::super::policy::HeadView;
        let dev = Device::Cpu;
        let k = Tensor::new(&[[3f32, 4.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], &dev).unwrap();
        let v = Tensor::new(&[[1f32, -2.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], &dev).unwrap();
        let w = w_o();
        let ck = CriticalKv::new(Box::new(KeyScored {
            score: KeyScore::Knorm,
        }));
        let current = vec![vec![0.5f32; 4]];
        let inc = ck
            .key_scores(&LayerKeys {
                heads: &[(k, v)],
                positions: &[vec![0, 1, 2, 3]],
                seq_len: 4,
                queries: None,
                layer: 0,
                budget: Some(2),
                metric: &current,
                out_proj: Some(&w),
            })
            .unwrap();
        let metric: Vec<f32> = inc[0].iter().map(|d| 0.5 + d).collect();
        let e = 1e-4f32;
        let want = [(-4.5 + e) * 6.0, (-0.5 + e) * 0.0, (-0.5 + e) * 2.0];
        for i in 0..3 {
            assert!((metric[i] - want[i]).abs() < 1e-5, "{metric:?} vs {want:?}");
        }
        assert!(metric[3] > metric[1], "{metric:?}");
        let view = SeqView {
            seq_len: 4,
            block_size: 16,
            heads: vec![vec![HeadView {
                metric,
                position: vec![0, 1, 2, 3],
            }]],
        };
        assert_eq!(
            ck.plan(&view, 2, Phase::Prefill),
            EvictionPlan::from_heads(vec![vec![0, 2]], 1)
        );
    }

    /// One kv-head of two query heads (d = 2, hidden = 3): v = (1, -2) through
    /// W_o[:, 0..2] = [[1, 0], [0, 1], [1, 1]] gives (1, -2, -1), L1 4; through
    /// W_o[:, 2..4] = [[2, 0], [0, 0], [0, 3]] gives (2, 0, -6), L1 8; the mean is 6.
    #[test]
    fn projected_norm_by_hand() {
        let dev = Device::Cpu;
        let v = Tensor::new(&[[1f32, -2.0], [0.0, 0.0]], &dev).unwrap();
        let w = w_o();
        let n: Vec<f32> = projected_value_norms(&v, &w, 0, 2)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(n, vec![6.0, 0.0]);
    }
}
