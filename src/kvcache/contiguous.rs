//! The contiguous reference cache: per sequence and layer, one K and one V tensor
//! `[1, n_kv_heads, capacity, head_dim]` grown by doubling, every kv-head holding every token.
//!
//! This is the oracle: plain matmul + softmax attention (softmax in f32, as transformers' eager
//! attention), no eviction. Compressed backends must reproduce its outputs when nothing is
//! evicted.
use candle_core::{DType, Result, Tensor};
use std::collections::HashMap;

use super::{AttnCall, AttnOut, CacheBackend, SeqId};

struct LayerKv {
    k: Tensor,
    v: Tensor,
    /// Tokens stored (the rest of `capacity` is unused).
    len: usize,
}

struct Seq {
    layers: Vec<Option<LayerKv>>,
    /// Tokens seen (advanced after the last layer's call).
    pos: usize,
}

/// See the module docs.
pub struct ContiguousCache {
    n_layers: usize,
    seqs: HashMap<SeqId, Seq>,
    next_id: SeqId,
}

impl ContiguousCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            n_layers,
            seqs: HashMap::new(),
            next_id: 0,
        }
    }

    fn seq(&self, seq: SeqId) -> Result<&Seq> {
        self.seqs
            .get(&seq)
            .ok_or_else(|| candle_core::Error::Msg(format!("unknown sequence {seq}")))
    }
}

/// Append `new` `[1, h, t, d]` to `kv` along dim 2, growing capacity by doubling.
fn append(slot: &mut Option<LayerKv>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = k.dim(2)?;
    let need = slot.as_ref().map_or(0, |s| s.len) + t;
    let grow = |old: Option<&LayerKv>, x: &Tensor, cap: usize, which: usize| -> Result<Tensor> {
        let (b, h, _, d) = x.dims4()?;
        let fresh = Tensor::zeros((b, h, cap, d), x.dtype(), x.device())?;
        if let Some(o) = old {
            let src = if which == 0 { &o.k } else { &o.v };
            fresh.slice_set(&src.narrow(2, 0, o.len)?.contiguous()?, 2, 0)?;
        }
        Ok(fresh)
    };
    let cap = slot.as_ref().map_or(0, |s| s.k.dim(2).unwrap_or(0));
    if need > cap {
        let new_cap = need.max(cap * 2).max(256);
        let nk = grow(slot.as_ref(), k, new_cap, 0)?;
        let nv = grow(slot.as_ref(), v, new_cap, 1)?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        *slot = Some(LayerKv { k: nk, v: nv, len });
    }
    let s = slot.as_mut().expect("allocated above");
    s.k.slice_set(&k.contiguous()?, 2, s.len)?;
    s.v.slice_set(&v.contiguous()?, 2, s.len)?;
    s.len += t;
    Ok((s.k.narrow(2, 0, s.len)?, s.v.narrow(2, 0, s.len)?))
}

/// Causal attention of `q` `[1, nh, t, d]` over `k`,`v` `[1, nkv, total, d]` where the queries
/// sit at the last `t` positions. Returns the output and the f32 probabilities
/// `[1, nh, t, total]`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, nh, t, d) = q.dims4()?;
    let (_, nkv, total, _) = k.dims4()?;
    let g = nh / nkv;
    let q2 = q.reshape((b, nkv, g * t, d))?;
    let att = (q2.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let att = if t > 1 {
        let key_pos = Tensor::arange(0u32, total as u32, q.device())?.reshape((1, total))?;
        let mask = super::causal_mask(&key_pos, total - t, t)? // [1, t, total]
            .broadcast_as((g, t, total))?
            .reshape((g * t, total))?;
        att.broadcast_add(&mask)?
    } else {
        att
    };
    let p = candle_nn::ops::softmax_last_dim(&att)?;
    let out = p.to_dtype(v.dtype())?.matmul(v)?.reshape((b, nh, t, d))?;
    Ok((out, p.reshape((b, nh, t, total))?))
}

/// Most f32 scores one [`causal_attention`] call materialises (`heads x queries x keys`): a
/// prefill chunk beyond it runs in query blocks ([`blocked_causal_attention`]). 2^28 scores
/// are 1 GiB; candle's element-wise kernels also address at most 2^32 elements per launch.
pub const ATTENTION_BLOCK_SCORES: usize = 1 << 28;

/// [`causal_attention`] over query blocks of at most [`ATTENTION_BLOCK_SCORES`] scores, keeping
/// only the probabilities `probe` asks for. Rows of a softmax are independent, so a split call
/// computes the same values; a call that fits one block is exactly [`causal_attention`].
pub fn blocked_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    probe: super::Probe,
) -> Result<(Tensor, Option<Tensor>)> {
    attention_in_blocks(q, k, v, scale, probe, ATTENTION_BLOCK_SCORES)
}

/// [`blocked_causal_attention`] with blocks of at most `max_scores` scores.
fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    probe: super::Probe,
    max_scores: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let (_, nh, t, _) = q.dims4()?;
    let total = k.dim(2)?;
    let rows = (max_scores / (nh * total).max(1)).max(1);
    if rows >= t {
        let (out, p) = causal_attention(q, k, v, scale)?;
        return Ok((out, super::probed_rows(p, probe, t)?));
    }
    let first_probed = match probe {
        super::Probe::None | super::Probe::Queries => t,
        super::Probe::All => 0,
        super::Probe::LastQueries(n) => t - n.min(t),
    };
    let (mut outs, mut probs) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < t {
        let n = rows.min(t - start);
        // The block's queries see the keys up to their own positions: `total - (t - start - n)`.
        let visible = total - (t - start - n);
        let (out, p) = causal_attention(
            &q.narrow(2, start, n)?,
            &k.narrow(2, 0, visible)?,
            &v.narrow(2, 0, visible)?,
            scale,
        )?;
        outs.push(out);
        if start + n > first_probed {
            let from = first_probed.saturating_sub(start);
            let p = p
                .narrow(2, from, n - from)?
                .pad_with_zeros(3, 0, total - visible)?;
            probs.push(p);
        }
        start += n;
    }
    let probs = (!probs.is_empty())
        .then(|| Tensor::cat(&probs, 2))
        .transpose()?;
    Ok((Tensor::cat(&outs, 2)?, probs))
}

/// Whether [`flash_causal_attention`] serves queries like `q` (CUDA, bf16/f16, head dim 64/128).
fn flash_fits(q: &Tensor) -> bool {
    q.device().is_cuda()
        && crate::cuda::prefill_attention::prefill_attention_supported(
            q.dtype(),
            *q.dims().last().unwrap_or(&0),
        )
}

/// [`causal_attention`]'s output (no probabilities) with the flash prefill kernel: `k`, `v`
/// `[1, nkv, total, d]` are read in place from the cache (each head's first `total` rows of its
/// capacity), the queries sit at the last `t` positions. Same values up to the kernel's
/// rounding of the probabilities to the K/V dtype (tests/cuda_kernels.rs).
fn flash_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    use crate::cuda::{prefill_attention, prefill_softmax::SoftmaxShape};
    let (b, nh, t, d) = q.dims4()?;
    let (_, nkv, total, _) = k.dims4()?;
    let shape = SoftmaxShape {
        kv_heads: nkv,
        group: nh / nkv,
        t,
        n: total,
        probed: 0,
    };
    let key_pos = Tensor::arange(0u32, total as u32, q.device())?
        .reshape((1, total))?
        .broadcast_as((nkv, total))?
        .contiguous()?;
    let q2 = q.contiguous()?.reshape((b, nkv, shape.group * t, d))?;
    let first = (total - t) as u32;
    prefill_attention::prefill_attention(&q2, k, v, &key_pos, &shape, first, scale as f32)?
        .reshape((b, nh, t, d))
}

impl CacheBackend for ContiguousCache {
    fn add_sequence(&mut self) -> Result<SeqId> {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Seq {
                layers: (0..self.n_layers).map(|_| None).collect(),
                pos: 0,
            },
        );
        Ok(id)
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.seqs
            .remove(&seq)
            .map(|_| ())
            .ok_or_else(|| candle_core::Error::Msg(format!("unknown sequence {seq}")))
    }

    fn attend(&mut self, call: AttnCall<'_>) -> Result<AttnOut> {
        let mut outs = Vec::with_capacity(call.seqs.len());
        let mut probs = Vec::new();
        let t = call.q.dim(2)?;
        for (b, &sid) in call.seqs.iter().enumerate() {
            let seq = self
                .seqs
                .get_mut(&sid)
                .ok_or_else(|| candle_core::Error::Msg(format!("unknown sequence {sid}")))?;
            let q = call.q.narrow(0, b, 1)?;
            let (k, v) = append(
                &mut seq.layers[call.layer],
                &call.k.narrow(0, b, 1)?,
                &call.v.narrow(0, b, 1)?,
            )?;
            let (out, p) = if t > 1 && call.probe == super::Probe::None && flash_fits(&q) {
                (flash_causal_attention(&q, &k, &v, call.scale)?, None)
            } else {
                blocked_causal_attention(&q, &k, &v, call.scale, call.probe)?
            };
            if call.layer + 1 == self.n_layers {
                seq.pos += t;
            }
            outs.push(out);
            probs.extend(p);
        }
        let out = Tensor::cat(&outs, 0)?;
        let probs = super::stack_probs(probs)?;
        Ok(AttnOut { out, probs })
    }

    fn seq_len(&self, seq: SeqId) -> usize {
        self.seq(seq).map(|s| s.pos).unwrap_or(0)
    }

    fn kv_len(&self, layer: usize, seq: SeqId, _kv_head: usize) -> usize {
        self.seq(seq)
            .ok()
            .and_then(|s| s.layers.get(layer)?.as_ref().map(|l| l.len))
            .unwrap_or(0)
    }

    fn slot_positions(&self, layer: usize, seq: SeqId, kv_head: usize) -> Vec<u32> {
        (0..self.kv_len(layer, seq, kv_head) as u32).collect()
    }

    fn name(&self) -> &'static str {
        "contiguous"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::needless_range_loop)]
    use super::*;
    use crate::kvcache::Probe;
    use candle_core::{Device, D};

    #[test]
    fn query_blocks_equal_one_call() {
        let dev = Device::Cpu;
        let (nh, nkv, t, total, d) = (4, 2, 37, 50, 8);
        let q = Tensor::randn(0f32, 1.0, (1, nh, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
        let (want, p) = causal_attention(&q, &k, &v, 0.3).unwrap();
        for probe in [
            Probe::None,
            Probe::All,
            Probe::LastQueries(5),
            Probe::LastQueries(30),
        ] {
            let want_p = crate::kvcache::probed_rows(p.clone(), probe, t).unwrap();
            // Blocks of 3 query rows (4 heads x 3 x 50 scores), and one call.
            for cap in [nh * total * 3, usize::MAX] {
                let (got, got_p) = attention_in_blocks(&q, &k, &v, 0.3, probe, cap).unwrap();
                let diff = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{probe:?} {cap}");
                match (&got_p, &want_p) {
                    (None, None) => {}
                    (Some(a), Some(b)) => {
                        assert_eq!(a.dims(), b.dims(), "{probe:?}");
                        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                        assert!(d.to_scalar::<f32>().unwrap() < 1e-6, "{probe:?} {cap}");
                    }
                    _ => panic!("{probe:?}: probs present in one and not the other"),
                }
            }
        }
    }

    /// Attention computed one query at a time with explicit loops: the judge for the batched,
    /// masked, grouped version.
    fn naive(
        q: &[Vec<Vec<f32>>],
        k: &[Vec<Vec<f32>>],
        v: &[Vec<Vec<f32>>],
        scale: f32,
    ) -> Vec<Vec<Vec<f32>>> {
        let nh = q.len();
        let g = nh / k.len();
        let total = k[0].len();
        let t = q[0].len();
        (0..nh)
            .map(|h| {
                (0..t)
                    .map(|i| {
                        let kv = h / g;
                        let visible = total - t + i + 1;
                        let s: Vec<f32> = (0..visible)
                            .map(|j| {
                                q[h][i]
                                    .iter()
                                    .zip(&k[kv][j])
                                    .map(|(a, b)| a * b)
                                    .sum::<f32>()
                                    * scale
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f32 = e.iter().sum();
                        let d = v[0][0].len();
                        (0..d)
                            .map(|c| (0..visible).map(|j| e[j] / z * v[kv][j][c]).sum())
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn chunked_appends_equal_naive_gqa_attention() {
        let dev = Device::Cpu;
        let (nh, nkv, d, total) = (6, 2, 4, 9);
        let q = Tensor::randn(0f32, 1.0, (1, nh, total, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
        let mut cache = ContiguousCache::new(1);
        let s = cache.add_sequence().unwrap();
        // Feed in chunks 4, 1, 4 (prefill chunks then a decode step).
        let mut outs = vec![];
        for (start, len) in [(0, 4), (4, 1), (5, 4)] {
            let o = cache
                .attend(AttnCall {
                    layer: 0,
                    seqs: &[s],
                    q: &q.narrow(2, start, len).unwrap(),
                    k: &k.narrow(2, start, len).unwrap(),
                    v: &v.narrow(2, start, len).unwrap(),
                    scale: 0.5,
                    probe: Probe::LastQueries(2),
                })
                .unwrap();
            let p = o.probs.unwrap();
            assert_eq!(p.dims(), &[1, nh, len.min(2), start + len]);
            // each probed row sums to one
            let sums = p
                .sum(D::Minus1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
            outs.push(o.out);
        }
        assert_eq!(cache.seq_len(s), total);
        let got = Tensor::cat(&outs, 2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let want = naive(
            &q.squeeze(0).unwrap().to_vec3().unwrap(),
            &k.squeeze(0).unwrap().to_vec3().unwrap(),
            &v.squeeze(0).unwrap().to_vec3().unwrap(),
            0.5,
        );
        // Every query of the full sequence sees its causal prefix, whatever the chunking.
        for h in 0..nh {
            for i in 0..total {
                for c in 0..d {
                    assert!((got[h][i][c] - want_at(&want, &q, h, i, c)).abs() < 1e-5);
                }
            }
        }
        fn want_at(w: &[Vec<Vec<f32>>], _q: &Tensor, h: usize, i: usize, c: usize) -> f32 {
            w[h][i][c]
        }
    }
}
