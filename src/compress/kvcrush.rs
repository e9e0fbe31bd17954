//! KVCrush (Jha et al., 2025): a modifier that spends part of an importance method's budget on
//! representatives of the tokens it would evict, so evicted "kinds" of tokens keep a proxy.
//! Total memory is unchanged: `budget = base budget + crush budget`.
//!
//! Both forms of the paper run on the per-(layer, kv-head) paged cache, at the prefill
//! compression (decode-time compression of continual bases is the base alone):
//! - token form (default for token-level bases): the base plans with `budget - B` tokens per head
//!   (`B = round(ratio * budget)`); a token's signature has one bit per kv-head of the layer
//!   (1 = that head keeps the token's position); for each head, the tokens it evicts are ordered
//!   by Hamming distance to the anchor and `B` of them are taken at an even stride
//!   (indices `floor(i * n / B)`) and kept;
//! - block form (the shipped implementation; default for kvcompress): the base plans with
//!   `budget - k * block_size` tokens per head (`k = round(ratio * budget / block_size)`); per
//!   layer, tokens in the top half of the scores of the evictable (unprotected) slots are marked
//!   1; each head's evicted slots, sorted by metric, are cut from the top into groups of
//!   `block_size` (the eligible "blocks": one group costs exactly one block); a group's
//!   signature is its tokens' bits in position order; per layer, `k * kv_heads` groups are taken
//!   at an even stride through the order of Hamming distance to a `block_size`-bit anchor.
//!   When fewer groups are eligible, all are kept.
//!
//! Anchors: random (seeded), zeros, ones, mean (per-bit majority of the candidates),
//! alternate (0101...). Ties in distance keep (layer, head, slot) order.
//!
//! Departures: in the shipped implementation a block is 16 consecutive positions shared by all
//! heads of a layer; on this per-head cache the eligible groups are a head's evicted slots in
//! metric order, which is what a kvcompress block eviction removes.
use candle_core::{Result, Tensor};

use std::collections::HashSet;

use super::policy::{DeviceStepSpec, Phase, Policy, SeqView};
use super::MethodOptions;
use crate::cuda::select::{block_picks, pick, DEVICE_MAX_BLOCK};
pub use crate::cuda::select::{Anchor, BlockPicks};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;

/// Which form of KVCrush runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Block for kvcompress, token otherwise.
    Auto,
    /// Token signatures over the layer's kv-heads.
    Token,
    /// Block signatures (the shipped implementation).
    Block,
}

/// KVCrush errors.
#[derive(Debug, thiserror::Error)]
pub enum CrushError {
    #[error("--kvcrush-ratio must be in [0, 1), got {0}")]
    BadRatio(f64),
}

/// The modifier around a base policy (see the module docs).
pub struct KvCrush {
    /// The importance method.
    pub base: Box<dyn Policy>,
    /// Token or block form (resolved, never `Auto`).
    pub level: Level,
    /// Share of the budget for representatives.
    pub ratio: f64,
    /// Anchor mode.
    pub anchor: Anchor,
    /// Seed of the random anchor.
    pub seed: u64,
}

/// Wrap `base` (named `base_name`) in KVCrush with `opts`.
pub fn wrap(
    base: Box<dyn Policy>,
    base_name: &str,
    opts: &MethodOptions,
) -> std::result::Result<Box<dyn Policy>, CrushError> {
    if !(0.0..1.0).contains(&opts.kvcrush_ratio) {
        return Err(CrushError::BadRatio(opts.kvcrush_ratio));
    }
    let level = match opts.kvcrush_level {
        Level::Auto if base_name == "kvcompress" => Level::Block,
        Level::Auto => Level::Token,
        l => l,
    };
    Ok(Box::new(KvCrush {
        base,
        level,
        ratio: opts.kvcrush_ratio,
        anchor: opts.kvcrush_anchor,
        seed: opts.kvcrush_seed,
    }))
}

fn evicted_of(plan: &EvictionPlan, layer: usize, head: usize) -> Vec<usize> {
    plan.heads
        .iter()
        .find(|e| e.layer == layer && e.kv_head == head)
        .map(|e| e.evict.clone())
        .unwrap_or_default()
}

impl KvCrush {
    /// Token form: un-evict `b` tokens per head chosen by kv-head signatures.
    fn token_form(&self, view: &SeqView, base: &EvictionPlan, b: usize) -> EvictionPlan {
        let mut out = Vec::new();
        for (l, layer) in view.heads.iter().enumerate() {
            let evicted: Vec<Vec<usize>> =
                (0..layer.len()).map(|h| evicted_of(base, l, h)).collect();
            // Kept positions per head.
            let kept: Vec<HashSet<u32>> = layer
                .iter()
                .zip(&evicted)
                .map(|(head, ev)| {
                    let gone: HashSet<usize> = ev.iter().copied().collect();
                    (0..head.len())
                        .filter(|i| !gone.contains(i))
                        .map(|i| head.position[i])
                        .collect()
                })
                .collect();
            for (h, ev) in evicted.into_iter().enumerate() {
                let sigs: Vec<Vec<bool>> = ev
                    .iter()
                    .map(|&i| {
                        let p = layer[h].position[i];
                        kept.iter().map(|k| k.contains(&p)).collect()
                    })
                    .collect();
                let back: HashSet<usize> = pick(&sigs, b, self.anchor, self.seed)
                    .into_iter()
                    .map(|j| ev[j])
                    .collect();
                out.push(ev.into_iter().filter(|i| !back.contains(i)).collect());
            }
        }
        EvictionPlan::from_heads(out, view.heads.first().map_or(0, Vec::len))
    }

    /// Block form: un-evict `k * kv_heads` groups of `block_size` evicted slots per layer.
    fn block_form(&self, view: &SeqView, base: &EvictionPlan, k: usize) -> EvictionPlan {
        let kv_heads = view.heads.first().map_or(0, Vec::len);
        let heads: Vec<(&[f32], &[u32])> = view
            .heads
            .iter()
            .flatten()
            .map(|h| (&h.metric[..], &h.position[..]))
            .collect();
        let mut evicted: Vec<Vec<usize>> = (0..heads.len())
            .map(|i| evicted_of(base, i / kv_heads.max(1), i % kv_heads.max(1)))
            .collect();
        let first_protected = view.seq_len.saturating_sub(self.base.min_budget()) as u32;
        let picks = BlockPicks {
            groups_per_head: k,
            anchor: self.anchor,
            seed: self.seed,
        };
        let bs = view.block_size;
        block_picks(&heads, &mut evicted, kv_heads, first_protected, bs, &picks);
        EvictionPlan::from_heads(evicted, kv_heads)
    }

    /// Groups of `block_size` slots kept per head by the block form at `budget` tokens per
    /// head (`k`; the base then plans with `budget - k * block_size`).
    fn block_groups(&self, budget: usize, block_size: usize) -> usize {
        let bs = block_size.max(1);
        let room = budget.saturating_sub(self.base.min_budget());
        ((self.ratio * budget as f64 / bs as f64).round() as usize).min(room / bs)
    }
}

impl Policy for KvCrush {
    fn prefill_probe(&self) -> Probe {
        self.base.prefill_probe()
    }
    fn decode_probe(&self) -> Probe {
        self.base.decode_probe()
    }
    fn score(&self, phase: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.base.score(phase, probs, positions)
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode {
            return self.base.plan(view, budget, phase);
        }
        let room = budget.saturating_sub(self.base.min_budget());
        match self.level {
            Level::Block => {
                let bs = view.block_size.max(1);
                let k = self.block_groups(budget, bs);
                let base = self.base.plan(view, budget - k * bs, phase);
                if k == 0 {
                    return base;
                }
                self.block_form(view, &base, k)
            }
            _ => {
                let b = ((self.ratio * budget as f64).round() as usize).min(room);
                let base = self.base.plan(view, budget - b, phase);
                if b == 0 {
                    return base;
                }
                self.token_form(view, &base, b)
            }
        }
    }
    fn continual(&self) -> bool {
        self.base.continual()
    }
    fn min_budget(&self) -> usize {
        self.base.min_budget()
    }
    /// Decode steps are the base's alone ([`Policy::plan`] above), so they run where the
    /// base's run (KV-Compress: on the device).
    fn device_step(&self, budget: usize, block_size: usize) -> Option<DeviceStepSpec> {
        self.base.device_step(budget, block_size)
    }
    /// The block form's prefill compression runs on the device when the base's steps do: the
    /// base's selection at `budget - k * block_size`, then [`BlockPicks`] (`kvc_crush_pick`).
    /// The token form plans on the host (`None`).
    fn device_prefill(&self, budget: usize, block_size: usize) -> Option<DeviceStepSpec> {
        if self.level != Level::Block || block_size > DEVICE_MAX_BLOCK {
            return None;
        }
        let k = self.block_groups(budget, block_size);
        let mut spec = self.base.device_step(budget - k * block_size, block_size)?;
        if k > 0 {
            spec.crush = Some(BlockPicks {
                groups_per_head: k,
                anchor: self.anchor,
                seed: self.seed,
            });
        }
        Some(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::select::{anchor, anchor_mask};

    #[test]
    fn pick_takes_an_even_stride_through_distance_order() {
        let s = |b: &[u8]| b.iter().map(|&x| x == 1).collect::<Vec<bool>>();
        let sigs = vec![
            s(&[1, 1]),
            s(&[0, 0]),
            s(&[1, 0]),
            s(&[1, 1]),
            s(&[0, 0]),
            s(&[0, 1]),
        ];
        // zeros anchor: distances 2,0,1,2,0,1 -> order 1,4,2,5,0,3; k=3 -> indices 0,2,4
        assert_eq!(pick(&sigs, 3, Anchor::Zeros, 0), vec![1, 2, 0]);
        assert_eq!(pick(&sigs, 10, Anchor::Zeros, 0).len(), 6);
        assert!(pick(&sigs, 0, Anchor::Ones, 0).is_empty());
        assert_eq!(
            anchor(Anchor::Alternate, 4, &[], 0),
            vec![false, true, false, true]
        );
        // majority: bit 0 set in 3 of 6 (not more than half) -> 0; bit 1 in 3 -> 0
        assert_eq!(anchor(Anchor::Mean, 2, &sigs, 0), vec![false, false]);
        assert_eq!(
            anchor(Anchor::Random, 8, &[], 3),
            anchor(Anchor::Random, 8, &[], 3)
        );
    }

    /// The block form worked by hand on one layer of two heads (block size 2): the median of
    /// the unprotected metrics is 0.35; head 0's evictions [1, 3, 4, 2] (metric order) make
    /// groups [4, 2] (signature in position order: 0.4 -> 1, 0.3 -> 0) and [1, 3] (0, 0); head
    /// 1's [0, 3, 4] make one group [3, 4] (0, 1) and leave slot 0 ungrouped.
    #[test]
    fn block_picks_follow_signatures_distances_and_stride() {
        let m0 = [0.5, 0.1, 0.4, 0.2, 0.3, 9.0];
        let m1 = [0.05, 0.6, 0.7, 0.15, 0.35, 8.0];
        let pos: Vec<u32> = (0..6).collect();
        let heads: Vec<(&[f32], &[u32])> = vec![(&m0, &pos), (&m1, &pos)];
        let run = |groups_per_head, anchor| {
            let mut ev = vec![vec![1, 3, 4, 2], vec![0, 3, 4]];
            let p = BlockPicks {
                groups_per_head,
                anchor,
                seed: 0,
            };
            block_picks(&heads, &mut ev, 2, 5, 2, &p);
            ev
        };
        // Mean anchor: bits set in 1 of 3 groups -> [0, 0]; distances 1, 0, 1; order
        // [1, 3], [4, 2], [3, 4]; K = 2 of n = 3 takes ranks 0 and 1: head 0's groups.
        assert_eq!(run(1, Anchor::Mean), vec![vec![], vec![0, 3, 4]]);
        // Ones: distances 1, 2, 1; order [4, 2], [3, 4], [1, 3]; ranks 0 and 1 kept.
        assert_eq!(run(1, Anchor::Ones), vec![vec![1, 3], vec![0]]);
        // K = 4 >= 3 groups: all kept, only the ungrouped slot is evicted.
        assert_eq!(run(2, Anchor::Zeros), vec![vec![], vec![0]]);
        // A protected slot's metric does not count toward the median: protecting nothing
        // adds 9.0 and 8.0 (median 0.4), so [3, 4] becomes (0, 0) and ties with [1, 3].
        let mut ev = vec![vec![1, 3, 4, 2], vec![0, 3, 4]];
        let p = BlockPicks {
            groups_per_head: 1,
            anchor: Anchor::Ones,
            seed: 0,
        };
        block_picks(&heads, &mut ev, 2, 6, 2, &p);
        // Ones: distances [4, 2] (1, 0) -> 1, [1, 3] -> 2, [3, 4] -> 2; order [4, 2], [1, 3],
        // [3, 4]; ranks 0 and 1: head 0's groups.
        assert_eq!(ev, vec![vec![], vec![0, 3, 4]]);
        assert_eq!(anchor_mask(Anchor::Alternate, 4, 0), Some(0b1010));
        assert_eq!(anchor_mask(Anchor::Mean, 4, 0), None);
    }

    #[test]
    fn block_form_on_kvcompress_keeps_the_memory_of_the_base() {
        use crate::compress::kvcompress::{KvCompress, KvCompressConfig};
        use crate::compress::policy::HeadView;
        use crate::compress::scorer::Agg;
        let bs = 2;
        let head = |seed: u32| HeadView {
            metric: (0..20u32)
                .map(|i| ((i * 7 + seed * 13) % 11) as f32)
                .collect(),
            position: (0..20).collect(),
        };
        let view = SeqView {
            seq_len: 20,
            block_size: bs,
            heads: vec![vec![head(0), head(1)], vec![head(2), head(3)]],
        };
        let kc = || KvCompress {
            cfg: KvCompressConfig {
                window: 4,
                agg: Agg::L2Sum,
                max_pool: 0,
                buffer: 0,
                protected: 2,
                continual: true,
            },
            layers: 2,
            kv_heads: 2,
        };
        let crush = KvCrush {
            base: Box::new(kc()),
            level: Level::Block,
            ratio: 0.25,
            anchor: Anchor::Mean,
            seed: 0,
        };
        let blocks_after = |p: &EvictionPlan| -> usize {
            view.heads
                .iter()
                .enumerate()
                .flat_map(|(l, layer)| {
                    layer
                        .iter()
                        .enumerate()
                        .map(move |(h, hv)| (hv.len() - evicted_of(p, l, h).len()).div_ceil(bs))
                })
                .sum()
        };
        let base = kc().plan(&view, 8, Phase::Prefill);
        let with = crush.plan(&view, 8, Phase::Prefill);
        // budget 8 tokens = 4 blocks per head, 16 in all; kvcrush: base at 6 tokens + 1 group
        // of 2 per head
        assert_eq!(blocks_after(&base), 16);
        assert_eq!(blocks_after(&with), 16);
        assert_ne!(base, with);
    }
}
