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
use rand::{Rng, SeedableRng};
use std::collections::HashSet;

use super::policy::{DeviceStepSpec, Phase, Policy, SeqView};
use super::MethodOptions;
use crate::kvcache::blocks::{EvictionPlan, HeadEviction};
use crate::kvcache::Probe;

/// Anchor signature the Hamming distances are measured to.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Anchor {
    /// Random bits from `--kvcrush-seed`.
    Random,
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Per-bit majority over the candidates.
    Mean,
    /// 0101...
    Alternate,
}

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

/// The anchor of `bits` bits for `mode` (`cands`: the candidates' signatures, for `Mean`).
pub fn anchor(mode: Anchor, bits: usize, cands: &[Vec<bool>], seed: u64) -> Vec<bool> {
    match mode {
        Anchor::Zeros => vec![false; bits],
        Anchor::Ones => vec![true; bits],
        Anchor::Alternate => (0..bits).map(|i| i % 2 == 1).collect(),
        Anchor::Random => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (0..bits).map(|_| rng.random::<bool>()).collect()
        }
        Anchor::Mean => (0..bits)
            .map(|b| 2 * cands.iter().filter(|c| c[b]).count() > cands.len())
            .collect(),
    }
}

/// Hamming distance.
pub fn hamming(a: &[bool], b: &[bool]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// Indices (into `sigs`) of `k` representatives: ordered by distance to the anchor (stable),
/// taken at indices `floor(i * n / k)` of that order. All when `k >= n`.
pub fn pick(sigs: &[Vec<bool>], k: usize, mode: Anchor, seed: u64) -> Vec<usize> {
    let n = sigs.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return vec![];
    }
    let bits = sigs[0].len();
    let a = anchor(mode, bits, sigs, seed);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| hamming(&sigs[i], &a));
    (0..k).map(|i| order[i * n / k]).collect()
}

fn evicted_of(plan: &EvictionPlan, layer: usize, head: usize) -> Vec<usize> {
    plan.heads
        .iter()
        .find(|e| e.layer == layer && e.kv_head == head)
        .map(|e| e.evict.clone())
        .unwrap_or_default()
}

fn to_plan(evicted: Vec<Vec<Vec<usize>>>) -> EvictionPlan {
    let mut plan = EvictionPlan::default();
    for (l, layer) in evicted.into_iter().enumerate() {
        for (h, evict) in layer.into_iter().enumerate() {
            if !evict.is_empty() {
                plan.heads.push(HeadEviction {
                    layer: l,
                    kv_head: h,
                    evict,
                });
            }
        }
    }
    plan
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
            let mut layer_out = Vec::new();
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
                layer_out.push(ev.into_iter().filter(|i| !back.contains(i)).collect());
            }
            out.push(layer_out);
        }
        to_plan(out)
    }

    /// Block form: un-evict `k * kv_heads` groups of `block_size` evicted slots per layer.
    fn block_form(&self, view: &SeqView, base: &EvictionPlan, k: usize) -> EvictionPlan {
        let bs = view.block_size;
        let prot_window = self.base.min_budget();
        let mut out = Vec::new();
        for (l, layer) in view.heads.iter().enumerate() {
            // Top half of the layer's evictable scores -> 1.
            let mut ev_scores: Vec<f32> = layer
                .iter()
                .flat_map(|h| {
                    let prot = h.recent(view.seq_len, prot_window);
                    h.metric
                        .iter()
                        .zip(prot)
                        .filter(|(_, p)| !p)
                        .map(|(m, _)| *m)
                        .collect::<Vec<_>>()
                })
                .collect();
            ev_scores.sort_by(|a, b| a.total_cmp(b));
            let median = ev_scores.get(ev_scores.len() / 2).copied().unwrap_or(0.0);
            let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
            let mut evicted: Vec<Vec<usize>> = Vec::new();
            for (h, head) in layer.iter().enumerate() {
                let mut ev = evicted_of(base, l, h);
                ev.sort_by(|&a, &b| head.metric[a].total_cmp(&head.metric[b]).then(a.cmp(&b)));
                let mut end = ev.len();
                while end >= bs {
                    groups.push((h, ev[end - bs..end].to_vec()));
                    end -= bs;
                }
                evicted.push(ev);
            }
            let sigs: Vec<Vec<bool>> = groups
                .iter()
                .map(|(h, g)| {
                    let mut g = g.clone();
                    g.sort_by_key(|&i| layer[*h].position[i]);
                    g.iter().map(|&i| layer[*h].metric[i] >= median).collect()
                })
                .collect();
            let mut back: Vec<HashSet<usize>> = vec![HashSet::new(); layer.len()];
            for j in pick(&sigs, k * layer.len(), self.anchor, self.seed) {
                back[groups[j].0].extend(groups[j].1.iter().copied());
            }
            out.push(
                evicted
                    .into_iter()
                    .zip(&back)
                    .map(|(ev, b)| ev.into_iter().filter(|i| !b.contains(i)).collect())
                    .collect(),
            );
        }
        to_plan(out)
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
                let k = ((self.ratio * budget as f64 / bs as f64).round() as usize).min(room / bs);
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
    /// The prefill compression's picks are host code.
    fn device_prefill(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn block_form_on_kvcompress_keeps_the_memory_of_the_base() {
        use crate::compress::kvcompress::{KvCompress, KvCompressConfig};
        use crate::compress::policy::HeadView;
        use crate::compress::score::Agg;
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
