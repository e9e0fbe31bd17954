//! Attention of one sequence through candle ops and the prefill kernels (prefill chunks, and
//! decode steps off the CUDA decode kernel): append, gather, masked softmax.
use candle_core::{DType, Device, Result, Tensor};

use super::{be, PagedCache};
use crate::cuda::prefill_softmax::SoftmaxShape;
use crate::cuda::{kv_cache, prefill_attention, prefill_softmax};
use crate::kvcache::blocks::BlockError;
use crate::kvcache::{causal_mask, probed_rows, Probe, SeqId};

impl PagedCache {
    /// Append `k`/`v` `[1, nkv, t, d]` of `seq` at its next positions in every kv-head of
    /// `layer`; returns the position of the first new token. Capacity is checked for all heads
    /// first, so a failed append leaves the cache unchanged.
    fn append_seq(&mut self, layer: usize, seq: SeqId, k: &Tensor, v: &Tensor) -> Result<usize> {
        let (_, nkv, t, d) = k.dims4()?;
        if nkv != self.spec.kv_heads || d != self.spec.head_dim || v.dims() != k.dims() {
            candle_core::bail!(
                "paged cache built for {} kv-heads of dim {}, got k {:?} / v {:?}",
                self.spec.kv_heads,
                self.spec.head_dim,
                k.dims(),
                v.dims()
            );
        }
        let start = *self
            .pos
            .get(&seq)
            .ok_or_else(|| be(BlockError::UnknownSeq(seq)))?;
        self.changed.insert(seq);
        let new_pos: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        let bs = self.spec.block_size;
        let need: usize = (0..nkv)
            .map(|h| {
                let len = self.pool.len(layer, seq, h).unwrap_or(0);
                (len + t).div_ceil(bs) - len.div_ceil(bs)
            })
            .sum();
        if need > self.pool.free_blocks() {
            return Err(be(BlockError::OutOfBlocks {
                needed: need,
                free: self.pool.free_blocks(),
                total: self.pool.num_blocks(),
            }));
        }
        if self.on_cuda() {
            // One launch for every head: rows in (head, token) order.
            let mut slots = Vec::with_capacity(nkv * t);
            for h in 0..nkv {
                let s = self.pool.append(layer, seq, h, &new_pos).map_err(be)?;
                slots.extend(s.into_iter().map(|x| x as u32));
            }
            let positions: Vec<u32> = (0..nkv).flat_map(|_| new_pos.iter().copied()).collect();
            let rows = |x: &Tensor| x.contiguous()?.reshape((nkv * t, d));
            let (m, p) = self.meta_tensors();
            kv_cache::write_kv(
                &self.k,
                &self.v,
                m,
                p,
                &rows(k)?,
                &rows(v)?,
                &slots,
                &positions,
            )?;
        } else {
            for h in 0..nkv {
                let slots = self.pool.append(layer, seq, h, &new_pos).map_err(be)?;
                let kh = k.narrow(1, h, 1)?.reshape((t, d))?;
                let vh = v.narrow(1, h, 1)?.reshape((t, d))?;
                self.scatter(&self.k, &slots, &kh)?;
                self.scatter(&self.v, &slots, &vh)?;
                self.init_meta(&slots, &new_pos)?;
            }
        }
        Ok(start)
    }

    /// Every kv-head of (layer, seq) gathered and padded to the longest head: K and V
    /// `[1, kv_heads, max, d]` (padding: block 0's rows) and `max`. Only the block tables go
    /// up; the slot ids are expanded on the device (no per-slot host work).
    fn gather_heads(&self, layer: usize, seq: SeqId) -> Result<(Tensor, Tensor, usize)> {
        let (nkv, d, bs) = (self.spec.kv_heads, self.spec.head_dim, self.spec.block_size);
        let dev = &self.spec.device;
        let t = self.pool.table(seq).map_err(be)?;
        let lens = &t.len[layer];
        let max = lens.iter().copied().max().unwrap_or(0);
        let nb = max.div_ceil(bs);
        let mut blocks = Vec::with_capacity(nkv * nb);
        // Each head's blocks in use, padded to nb (a table shorter than its length leaves
        // `blocks` short, and `Tensor::from_vec` below refuses it).
        for (h, &len) in lens.iter().enumerate() {
            let n = len.div_ceil(bs);
            blocks.extend(t.blocks[layer][h].iter().take(n));
            blocks.extend(std::iter::repeat_n(0u32, nb - n));
        }
        let top = blocks
            .iter()
            .max()
            .map(|&b| (b as usize * bs + bs - 1) as u32);
        // Slot ids [kv_heads * max]: block * bs + offset, each head's row cut at max.
        let idx = Tensor::from_vec(blocks, (nkv, nb, 1), dev)?
            .broadcast_mul(&Tensor::new(&[[[bs as u32]]], dev)?)?
            .broadcast_add(&Tensor::arange(0u32, bs as u32, dev)?.reshape((1, 1, bs))?)?
            .reshape((nkv, nb * bs))?
            .narrow(1, 0, max)?
            .contiguous()?
            .flatten_all()?;
        let (kk, vv) = kv_cache::gather_kv(&self.k, &self.v, &idx, top)?;
        Ok((
            kk.reshape((1, nkv, max, d))?,
            vv.reshape((1, nkv, max, d))?,
            max,
        ))
    }

    /// Key positions `[kv_heads, max]` u32 of (layer, seq) in logical order, padded with
    /// u32::MAX (which no query sees) to `max`: [`PagedCache::gather_heads`]'s rows. `held`
    /// is how many positions the sequence has been given (its next position). A head holding
    /// `held` slots has lost none, and appends run in position order, so its row is
    /// `0..held`: when every head does (no eviction yet), the rows are made on the device
    /// ([`PagedCache::chunk_positions`]) instead of listed per slot on the host.
    fn key_positions(
        &mut self,
        layer: usize,
        seq: SeqId,
        max: usize,
        held: usize,
    ) -> Result<Tensor> {
        let nkv = self.spec.kv_heads;
        let lens = &self.pool.table(seq).map_err(be)?.len[layer];
        let dense = max == held && lens.iter().all(|&l| l == held);
        if dense {
            return self.chunk_positions(nkv, held);
        }
        let mut key_pos = Vec::with_capacity(nkv * max);
        for h in 0..nkv {
            let p = self.positions(layer, seq, h)?;
            let pad = max - p.len();
            key_pos.extend(p);
            key_pos.extend(std::iter::repeat_n(u32::MAX, pad));
        }
        Tensor::from_vec(key_pos, (nkv, max), &self.spec.device)
    }

    /// The keys and values of every kv-head of (layer, seq) in logical slot order: one `[len,
    /// d]` pair per kv-head, on the cache's device (for methods that score keys and values,
    /// not attention).
    pub fn head_kv(&self, layer: usize, seq: SeqId) -> Result<Vec<(Tensor, Tensor)>> {
        let (kk, vv, _) = self.gather_heads(layer, seq)?;
        let (kk, vv) = (kk.squeeze(0)?, vv.squeeze(0)?);
        (0..self.spec.kv_heads)
            .map(|h| {
                let len = self.pool.len(layer, seq, h).map_err(be)?;
                Ok((kk.get(h)?.narrow(0, 0, len)?, vv.get(h)?.narrow(0, 0, len)?))
            })
            .collect()
    }

    /// Key positions `[kv_heads, t]` u32, `0..t` in every row (a fresh sequence's first
    /// chunk, or a sequence no head of which has lost a slot), made once per length and
    /// reused by every layer.
    fn chunk_positions(&mut self, kv_heads: usize, t: usize) -> Result<Tensor> {
        if let Some(p) = &self.chunk_positions {
            if p.dims() == [kv_heads, t] {
                return Ok(p.clone());
            }
        }
        let p = Tensor::arange(0u32, t as u32, &self.spec.device)?
            .reshape((1, t))?
            .broadcast_as((kv_heads, t))?
            .contiguous()?;
        self.chunk_positions = Some(p.clone());
        Ok(p)
    }

    /// Attention of one sequence: append, gather, masked softmax. Returns the output
    /// `[1, nh, t, d]` and the probed queries' probabilities `[1, nh, n_probed, max_kv_len]`.
    /// On CUDA the scale, mask and softmax are one kernel (`prefill_softmax::prefill_softmax`); elsewhere
    /// candle ops, the same as the contiguous oracle's.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_one(
        &mut self,
        layer: usize,
        seq: SeqId,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        probe: Probe,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (_, nh, t, d) = q.dims4()?;
        let nkv = self.spec.kv_heads;
        if k.dim(1)? != nkv || d != self.spec.head_dim {
            candle_core::bail!(
                "paged cache built for {nkv} kv-heads of dim {}, got k {:?} / q {:?}",
                self.spec.head_dim,
                k.dims(),
                q.dims()
            );
        }
        let dev = self.spec.device.clone();
        let mut clock = crate::profile::start(&dev);
        let start = self.append_seq(layer, seq, k, v)?;
        crate::profile::mark(&dev, &mut clock, "prefill.attend/append");
        let g = nh / nkv;
        let (kk, vv, key_pos, max) = if start == 0 {
            // A fresh sequence's keys are this chunk's own, in order, at positions 0..t: no
            // slot lists, no gather (most of a first chunk's host time per layer).
            let key_pos = self.chunk_positions(nkv, t)?;
            (k.contiguous()?, v.contiguous()?, key_pos, t)
        } else {
            let (kk, vv, max) = self.gather_heads(layer, seq)?;
            let key_pos = self.key_positions(layer, seq, max, start + t)?;
            (kk, vv, key_pos, max)
        };
        crate::profile::mark(&dev, &mut clock, "prefill.attend/gather");
        let q2 = q.reshape((1, nkv, g * t, d))?;
        let probed = match probe {
            Probe::None | Probe::Queries => 0,
            Probe::All => t,
            Probe::LastQueries(n) => n.min(t),
        };
        let c = Chunk {
            q,
            q2,
            kk,
            vv,
            key_pos,
            start,
            scale,
            shape: SoftmaxShape {
                kv_heads: nkv,
                group: g,
                t,
                n: max,
                probed,
            },
        };
        // Flash attention unless every query is probed (H2O's prefill scores: the scores are
        // the output then); the probed window is a few rows scored the unfused way.
        if self.flash_prefill
            && self.on_cuda()
            && prefill_attention::prefill_attention_supported(q.dtype(), d)
            && probed < t
        {
            return flash_attend(&c, &dev, &mut clock);
        }
        if self.on_cuda() && prefill_softmax::prefill_softmax_supported(q.dtype()) {
            return softmax_kernel_attend(&c);
        }
        candle_attend(&c, probe)
    }
}

/// One sequence's chunk after its append ([`PagedCache::attend_one`]): its queries, the keys
/// and values they attend over with the keys' positions, and the softmax shape
/// (`shape.n` keys per head, the last `shape.probed` queries probed).
struct Chunk<'a> {
    /// Queries `[1, nh, t, d]` as the call passed them.
    q: &'a Tensor,
    /// The same queries grouped by kv-head, `[1, kv_heads, group * t, d]`.
    q2: Tensor,
    /// K `[1, kv_heads, n, d]`.
    kk: Tensor,
    /// V `[1, kv_heads, n, d]`.
    vv: Tensor,
    /// Key positions `[kv_heads, n]` u32 (padding: u32::MAX).
    key_pos: Tensor,
    /// Position of the chunk's first query.
    start: usize,
    scale: f64,
    shape: SoftmaxShape,
}

impl Chunk<'_> {
    /// Query heads and head dim (`nh`, `d` of `q`).
    fn dims(&self) -> (usize, usize) {
        let q = self.q.dims();
        (q[1], q[3])
    }
}

/// Flash prefill attention of `c` (`prefill_attention::prefill_attention`; fewer than `t`
/// queries probed), and the probed window's probabilities scored the unfused way (matmul and
/// `prefill_softmax::prefill_softmax`). Returns the output `[1, nh, t, d]` and the window's
/// probabilities `[1, nh, probed, n]` (`None` when nothing is probed).
fn flash_attend(
    c: &Chunk,
    dev: &Device,
    clock: &mut crate::profile::Clock,
) -> Result<(Tensor, Option<Tensor>)> {
    let (nh, d) = c.dims();
    let SoftmaxShape {
        kv_heads: nkv,
        group: g,
        t,
        n: max,
        probed,
    } = c.shape;
    let flash = SoftmaxShape {
        probed: 0,
        ..c.shape
    };
    let out = prefill_attention::prefill_attention(
        &c.q2,
        &c.kk,
        &c.vv,
        &c.key_pos,
        &flash,
        c.start as u32,
        c.scale as f32,
    )?
    .reshape((1, nh, t, d))?;
    crate::profile::mark(dev, clock, "prefill.attend/flash");
    if probed == 0 {
        return Ok((out, None));
    }
    let qw =
        c.q.narrow(2, t - probed, probed)?
            .contiguous()?
            .reshape((1, nkv, g * probed, d))?;
    let window = SoftmaxShape {
        t: probed,
        ..c.shape
    };
    let att = qw.matmul(&c.kk.t()?)?;
    let first = (c.start + t - probed) as u32;
    let (_, probs) =
        prefill_softmax::prefill_softmax(&att, &c.key_pos, &window, first, c.scale as f32)?;
    let probs = probs.map(|p| p.reshape((1, nh, probed, max))).transpose()?;
    crate::profile::mark(dev, clock, "prefill.attend/window");
    Ok((out, probs))
}

/// Unfused prefill attention of `c` on CUDA: matmul, the scale + mask + softmax kernel
/// (`prefill_softmax::prefill_softmax`), matmul. Returns the output `[1, nh, t, d]` and the
/// probed queries' probabilities `[1, nh, probed, n]`.
fn softmax_kernel_attend(c: &Chunk) -> Result<(Tensor, Option<Tensor>)> {
    let (nh, d) = c.dims();
    let (t, max, probed) = (c.shape.t, c.shape.n, c.shape.probed);
    let att = c.q2.matmul(&c.kk.t()?)?;
    let (p, probs) = prefill_softmax::prefill_softmax(
        &att,
        &c.key_pos,
        &c.shape,
        c.start as u32,
        c.scale as f32,
    )?;
    let out = p.matmul(&c.vv)?.reshape((1, nh, t, d))?;
    let probs = probs.map(|p| p.reshape((1, nh, probed, max))).transpose()?;
    Ok((out, probs))
}

/// Prefill attention of `c` with candle ops, the same as the contiguous oracle's
/// `causal_attention` (mask from the key positions). Returns the output `[1, nh, t, d]` and
/// the `probe`d rows' probabilities `[1, nh, n_probed, n]`.
fn candle_attend(c: &Chunk, probe: Probe) -> Result<(Tensor, Option<Tensor>)> {
    let (nh, d) = c.dims();
    let SoftmaxShape {
        kv_heads: nkv,
        group: g,
        t,
        n: max,
        ..
    } = c.shape;
    let mask = causal_mask(&c.key_pos, c.start, t)?
        .reshape((nkv, 1, t, max))?
        .broadcast_as((nkv, g, t, max))?
        .reshape((1, nkv, g * t, max))?;
    // Same ops as the contiguous oracle's causal_attention.
    let att = (c.q2.matmul(&c.kk.t()?)? * c.scale)?.to_dtype(DType::F32)?;
    let att = att.broadcast_add(&mask)?;
    let p = candle_nn::ops::softmax_last_dim(&att)?;
    let out = p
        .to_dtype(c.vv.dtype())?
        .matmul(&c.vv)?
        .reshape((1, nh, t, d))?;
    Ok((out, probed_rows(p.reshape((1, nh, t, max))?, probe, t)?))
}
