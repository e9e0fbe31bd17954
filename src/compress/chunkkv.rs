//! ChunkKV (Liu et al., 2025), kvpress's `ChunkKVPress`: a modifier of a method that scores
//! every prompt token once (`snapkv`, `tova`, `knorm`, `keydiff`, `random`,
//! `expected-attention`): the prompt is cut
//! into chunks of 20 positions, a chunk's score is the mean over its tokens of the token's
//! scores summed over the layer's kv-heads, and every kv-head of the layer keeps the same
//! highest-scoring chunks, so kept text stays contiguous.
//!
//! Departures from kvpress: kvpress keeps `int(chunks * (1 - ratio))` chunks, which can exceed
//! the memory the rate allows when the last chunk is short; here chunks are taken best first
//! while they fit the per-head budget (a chunk that does not fit is skipped for a smaller one),
//! so a head never holds more than its budget. The base's protected positions (its last
//! `min_budget` tokens: SnapKV's window, TOVA's last token) count as the best chunk members,
//! as kvpress's SnapKV gives its window the highest score.
use candle_core::{Result, Tensor};
use std::collections::{BTreeMap, BTreeSet};

use super::policy::{per_head_plan, LayerKeys, Phase, Policy, SeqView};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// Positions per chunk (kvpress's default `chunk_length`).
pub const CHUNK: u32 = 20;

/// Bases ChunkKV modifies: the methods that score every prompt token once after prefill.
pub const CHUNKKV_BASES: &[&str] = &[
    "snapkv",
    "tova",
    "knorm",
    "keydiff",
    "random",
    "expected-attention",
];

/// The modifier (see the module docs).
pub struct ChunkKv {
    pub base: Box<dyn Policy>,
    pub chunk: u32,
}

/// The chunks (`position / chunk`) to keep in one layer: chunk scores are means over their
/// tokens of the per-position scores summed over kv-heads (`scores`: position -> summed
/// score; positions at or after `first_protected` rank first), chunks taken best first while
/// their token count fits `budget`; ties keep the earlier chunk.
pub fn kept_chunks(
    scores: &BTreeMap<u32, f32>,
    chunk: u32,
    first_protected: u32,
    budget: usize,
) -> BTreeSet<u32> {
    let mut chunks: BTreeMap<u32, (f32, usize, bool)> = BTreeMap::new();
    for (&p, &s) in scores {
        let e = chunks.entry(p / chunk.max(1)).or_insert((0.0, 0, false));
        e.0 += s;
        e.1 += 1;
        e.2 |= p >= first_protected;
    }
    let mut order: Vec<(u32, f32, usize, bool)> = chunks
        .into_iter()
        .map(|(c, (s, n, prot))| (c, s / n as f32, n, prot))
        .collect();
    order.sort_by(|a, b| b.3.cmp(&a.3).then(b.1.total_cmp(&a.1)).then(a.0.cmp(&b.0)));
    let (mut kept, mut used) = (BTreeSet::new(), 0);
    for (c, _, n, _) in order {
        if used + n <= budget {
            kept.insert(c);
            used += n;
        }
    }
    kept
}

impl Policy for ChunkKv {
    fn prefill_probe(&self) -> Probe {
        self.base.prefill_probe()
    }
    fn score(&self, phase: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.base.score(phase, probs, positions)
    }
    fn scores_keys(&self) -> bool {
        self.base.scores_keys()
    }
    fn key_scores(&self, layer: &LayerKeys) -> Result<Vec<Vec<f32>>> {
        self.base.key_scores(layer)
    }
    fn queries_skipped(&self) -> usize {
        self.base.queries_skipped()
    }
    fn score_splits(&self) -> bool {
        self.base.score_splits()
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode {
            return EvictionPlan::default();
        }
        let first_protected = view.seq_len.saturating_sub(self.base.min_budget()) as u32;
        let kept: Vec<BTreeSet<u32>> = view
            .heads
            .iter()
            .map(|layer| {
                let mut sum: BTreeMap<u32, f32> = BTreeMap::new();
                for h in layer {
                    for (&p, &m) in h.position.iter().zip(&h.metric) {
                        *sum.entry(p).or_default() += m;
                    }
                }
                kept_chunks(&sum, self.chunk, first_protected, budget)
            })
            .collect();
        per_head_plan(view, |l, _, h| {
            let mut evict: Vec<usize> = (0..h.position.len())
                .filter(|&i| !kept[l].contains(&(h.position[i] / self.chunk.max(1))))
                .collect();
            // A head holding positions other heads lack may still be over budget: drop its
            // lowest-scored kept slots.
            let keep = h.position.len() - evict.len();
            if keep > budget {
                let mut rest: Vec<usize> = (0..h.position.len())
                    .filter(|i| !evict.contains(i))
                    .collect();
                rest.sort_by(|&a, &b| h.metric[a].total_cmp(&h.metric[b]).then(a.cmp(&b)));
                evict.extend(rest.into_iter().take(keep - budget));
            }
            evict
        })
    }
    /// At least one chunk, so the chunk of the protected positions always fits.
    fn min_budget(&self) -> usize {
        self.base.min_budget().max(self.chunk as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::policy::HeadView;

    /// Positions 0..50 in chunks of 20 (two full, one of 10) with mean scores 1, 3, 2: a
    /// budget of 30 keeps chunks 1 and 2 (20 + 10 tokens), 25 only chunk 1 (neither other fits
    /// beside it), 60 all; protecting position 49 ranks chunk 2 first, and then chunk 1 no
    /// longer fits 25; a budget below every chunk keeps none.
    #[test]
    fn chunks_by_mean_score_within_the_budget() {
        let mut s = BTreeMap::new();
        for p in 0..50u32 {
            s.insert(p, [1.0, 3.0, 2.0][(p / 20) as usize]);
        }
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(kept_chunks(&s, 20, 50, 30), set(&[1, 2]));
        assert_eq!(kept_chunks(&s, 20, 50, 25), set(&[1]));
        assert_eq!(kept_chunks(&s, 20, 50, 60), set(&[0, 1, 2]));
        assert_eq!(kept_chunks(&s, 20, 49, 25), set(&[2]));
        assert_eq!(kept_chunks(&s, 20, 49, 9), set(&[]));
    }

    struct Flat;
    impl Policy for Flat {
        fn prefill_probe(&self) -> Probe {
            Probe::None
        }
        fn score(&self, _: Phase, _: &Tensor, p: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
            Ok(super::super::policy::zero_scores(p))
        }
        fn plan(&self, _: &SeqView, _: usize, _: Phase) -> EvictionPlan {
            EvictionPlan::default()
        }
        fn min_budget(&self) -> usize {
            1
        }
    }

    /// Two heads whose scores disagree token by token agree on chunks: every head keeps the
    /// chunks ranked by the head-summed scores, the chunk of the protected last token first.
    #[test]
    fn every_head_of_a_layer_keeps_the_same_chunks() {
        let pos: Vec<u32> = (0..8).collect();
        let h0 = vec![5.0, 5.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let h1 = vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 9.0, 0.0];
        let view = SeqView {
            seq_len: 8,
            block_size: 16,
            heads: vec![vec![
                HeadView {
                    metric: h0,
                    position: pos.clone(),
                },
                HeadView {
                    metric: h1,
                    position: pos,
                },
            ]],
        };
        let ck = ChunkKv {
            base: Box::new(Flat),
            chunk: 2,
        };
        // Chunk means (summed over heads): [5, 0, 2, 4.5]; chunk 3 holds the protected
        // position 7. Budget 4: chunks 3 and 0.
        let plan = ck.plan(&view, 4, Phase::Prefill);
        assert_eq!(
            plan,
            EvictionPlan::from_heads(vec![vec![2, 3, 4, 5], vec![2, 3, 4, 5]], 2)
        );
    }
}
