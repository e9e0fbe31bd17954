//! The paged, per-(layer, kv-head) KV storage of KV-Compress on candle tensors (the CPU
//! reference; the CUDA kernels take this as their oracle).
//!
//! Storage: one K and one V tensor `[num_blocks * block_size, head_dim]` shared by every layer,
//! head and sequence; slot `s` is row `s`. All bookkeeping (block tables, free blocks, per-slot
//! metric and position) lives in [`BlockPool`]; this type only owns tensors and executes what the
//! bookkeeping plans:
//! - append: the pool hands out slots, K/V rows are scattered into them;
//! - attend: per (sequence, kv-head) the rows of its slots are gathered in logical order, padded
//!   to the longest head, and attended with a mask built from slot positions (key visible iff
//!   `position <= query position`; padding masked), with the same ops as
//!   [`super::contiguous::causal_attention`], so with no eviction the results are identical;
//! - evict: an [`EvictionPlan`] is turned into per-head [`crate::kvcache::blocks::Compaction`]s,
//!   K/V rows are copied along the moves, then the pool copies metric/position and frees the
//!   emptied blocks.
//!
//! On a CUDA device the same bookkeeping drives kvc's kernels ([`super::cuda`]): appends are
//! one `write_kv` launch per (layer, sequence), decode steps (one token per sequence, head dim
//! 64/128, f32/bf16/f16) are one paged-attention launch pair over every sequence of the call
//! with per-head block tables uploaded from the pool, and compactions one `move_slots` launch
//! per head. Prefill (and unsupported shapes) keep the candle-op path below on the device.
//!
//! Departure from the paper's vLLM implementation: on the CPU, attention gathers each head's
//! rows into a dense tensor (plain matmul) instead of a paged-attention kernel; on CUDA the
//! per-slot metric and position stay in the host-side pool (the decode kernel's probabilities
//! are returned to the hooks, which score them on the host as on the CPU).
use candle_core::{DType, Device, Result, Tensor};
use std::collections::BTreeMap;

use super::blocks::{BlockError, BlockPool, EvictionPlan, MemoryLayout, MemoryReport};
use super::cuda::{self, DeviceTables};
use super::ops::{DecodeShape, SoftmaxShape};
use super::{AttnCall, AttnOut, CacheBackend, Probe, SeqId};

/// Default tokens per block (the paper's).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Shape of a paged cache.
#[derive(Debug, Clone)]
pub struct PagedSpec {
    /// Model layers.
    pub layers: usize,
    /// Kv-heads per layer.
    pub kv_heads: usize,
    /// Elements per K/V row.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// K/V dtype (the model's).
    pub dtype: DType,
    /// Device of the K/V tensors.
    pub device: Device,
}

impl PagedSpec {
    /// Block cost layout of this spec.
    pub fn layout(&self) -> MemoryLayout {
        MemoryLayout {
            block_size: self.block_size,
            head_dim: self.head_dim,
            dtype_bytes: self.dtype.size_in_bytes(),
        }
    }

    /// Blocks needed to hold `tokens` tokens of one sequence in every head without eviction.
    pub fn blocks_for_tokens(&self, tokens: usize) -> usize {
        self.layers * self.kv_heads * tokens.div_ceil(self.block_size.max(1))
    }
}

/// What one eviction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictStats {
    /// Slots evicted.
    pub evicted: usize,
    /// Slot copies made by compaction.
    pub moved: usize,
    /// Blocks returned to the pool.
    pub freed_blocks: usize,
}

/// See the module docs.
pub struct PagedCache {
    spec: PagedSpec,
    pool: BlockPool,
    /// `[num_blocks * block_size, head_dim]`.
    k: Tensor,
    /// `[num_blocks * block_size, head_dim]`.
    v: Tensor,
    /// Tokens seen per sequence (advanced after the last layer's call).
    pos: BTreeMap<SeqId, usize>,
    next_id: SeqId,
    /// K/V row moves of evictions collected since [`PagedCache::defer_moves`], not executed
    /// yet (the bookkeeping already moved).
    deferred: Option<DeferredMoves>,
}

/// Compaction moves waiting for [`PagedCache::flush_moves`].
#[derive(Debug, Default)]
struct DeferredMoves {
    from: Vec<u32>,
    to: Vec<usize>,
    /// Sequences with moves in the lists: evicting one of them again runs the lists first.
    seqs: std::collections::BTreeSet<SeqId>,
}

fn be(e: BlockError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl PagedCache {
    /// A cache of `num_blocks` blocks.
    pub fn new(spec: PagedSpec, num_blocks: usize) -> Result<Self> {
        let pool =
            BlockPool::new(spec.layers, spec.kv_heads, spec.block_size, num_blocks).map_err(be)?;
        let rows = num_blocks * spec.block_size;
        let k = Tensor::zeros((rows, spec.head_dim), spec.dtype, &spec.device)?;
        let v = Tensor::zeros((rows, spec.head_dim), spec.dtype, &spec.device)?;
        Ok(PagedCache {
            spec,
            pool,
            k,
            v,
            pos: BTreeMap::new(),
            next_id: 0,
            deferred: None,
        })
    }

    /// A cache holding as many blocks as fit in `bytes` (K, V and metadata counted).
    pub fn with_memory(spec: PagedSpec, bytes: u64) -> Result<Self> {
        let n = spec.layout().blocks_for_bytes(bytes).map_err(be)?;
        Self::new(spec, n)
    }

    /// An independent copy: bookkeeping and K/V storage copied (on the cache's device), so
    /// writes and evictions in one never show in the other. Used to continue one prefill under
    /// several budgets.
    pub fn deep_copy(&self) -> Result<Self> {
        self.check_no_pending()?;
        Ok(PagedCache {
            spec: self.spec.clone(),
            pool: self.pool.clone(),
            k: self.k.copy()?,
            v: self.v.copy()?,
            pos: self.pos.clone(),
            next_id: self.next_id,
            deferred: None,
        })
    }

    /// A new sequence holding a copy of `src` (K/V, metrics, positions, length per head) in
    /// blocks of its own: one prefill continued under several budgets in one pool.
    pub fn fork_sequence(&mut self, src: SeqId) -> Result<SeqId> {
        self.run_pending()?;
        let pos = *self
            .pos
            .get(&src)
            .ok_or_else(|| be(BlockError::UnknownSeq(src)))?;
        let id = self.next_id;
        let copies = self.pool.fork_seq(src, id).map_err(be)?;
        self.next_id += 1;
        self.pos.insert(id, pos);
        let from: Vec<u32> = copies.iter().map(|m| m.from as u32).collect();
        let to: Vec<usize> = copies.iter().map(|m| m.to).collect();
        if let Err(e) = self.copy_rows(from, &to) {
            self.pos.remove(&id);
            let _ = self.pool.remove_seq(id);
            return Err(e);
        }
        Ok(id)
    }

    /// The shape this cache was built with.
    pub fn spec(&self) -> &PagedSpec {
        &self.spec
    }

    /// The bookkeeping (read only: every change goes through this type).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Used / free blocks and bytes.
    pub fn memory(&self) -> MemoryReport {
        self.pool.report(&self.spec.layout())
    }

    /// Add `delta[i]` to the metric of logical slot `i` of (layer, seq, kv_head).
    pub fn add_metric(
        &mut self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        delta: &[f32],
    ) -> Result<()> {
        self.pool.add_metric(layer, seq, kv_head, delta).map_err(be)
    }

    /// The K and V storage `[num_blocks * block_size, head_dim]` (slot `s` is row `s`).
    pub fn storage(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    /// K rows `[kv_len, head_dim]` of (layer, seq, kv_head) in logical order.
    pub fn head_k(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<Tensor> {
        self.gather(&self.k, layer, seq, kv_head)
    }

    /// V rows `[kv_len, head_dim]` of (layer, seq, kv_head) in logical order.
    pub fn head_v(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<Tensor> {
        self.gather(&self.v, layer, seq, kv_head)
    }

    fn gather(&self, src: &Tensor, layer: usize, seq: SeqId, kv_head: usize) -> Result<Tensor> {
        self.check_no_pending()?;
        let slots: Vec<u32> = self
            .pool
            .slots(layer, seq, kv_head)
            .map_err(be)?
            .into_iter()
            .map(|s| s as u32)
            .collect();
        let n = slots.len();
        src.index_select(&Tensor::from_vec(slots, n, &self.spec.device)?, 0)
    }

    /// Write `rows` `[n, head_dim]` into physical `slots` of `dst`.
    fn scatter(&self, dst: &Tensor, slots: &[usize], rows: &Tensor) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let d = self.spec.head_dim;
        let idx: Vec<u32> = slots
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s as u32, d))
            .collect();
        let idx = Tensor::from_vec(idx, (slots.len(), d), &self.spec.device)?;
        dst.scatter_set(&idx, &rows.contiguous()?, 0)
    }

    /// Execute an eviction plan for `seq`: compact every listed head (K, V, metric, position
    /// move together) and free the emptied blocks.
    pub fn evict(&mut self, seq: SeqId, plan: &EvictionPlan) -> Result<EvictStats> {
        if self
            .deferred
            .as_ref()
            .is_some_and(|d| d.seqs.contains(&seq))
        {
            // Its earlier moves must land before slots of it move again.
            self.run_pending()?;
        }
        let mut st = EvictStats::default();
        // Plan every head first, then one move launch for the whole plan: heads own disjoint
        // blocks, so their moves never alias (with continual compression this runs after
        // nearly every decode step; a launch and an upload per head was most of its cost).
        let mut compactions = Vec::with_capacity(plan.heads.len());
        let (mut from, mut to) = (Vec::new(), Vec::new());
        let mut seen = std::collections::BTreeSet::new();
        for h in &plan.heads {
            if h.evict.is_empty() {
                continue;
            }
            if !seen.insert((h.layer, h.kv_head)) {
                candle_core::bail!(
                    "eviction plan lists layer {} kv-head {} twice",
                    h.layer,
                    h.kv_head
                );
            }
            let c = self
                .pool
                .plan_compaction(h.layer, seq, h.kv_head, &h.evict)
                .map_err(be)?;
            from.extend(c.moves.iter().map(|m| m.from as u32));
            to.extend(c.moves.iter().map(|m| m.to));
            st.evicted += h.evict.len();
            st.moved += c.moves.len();
            st.freed_blocks += c.freed.len();
            compactions.push(c);
        }
        match &mut self.deferred {
            Some(d) if !from.is_empty() => {
                d.from.extend(from);
                d.to.extend(to);
                d.seqs.insert(seq);
            }
            _ => self.copy_rows(from, &to)?,
        }
        for c in &compactions {
            self.pool.apply(c).map_err(be)?;
        }
        Ok(st)
    }

    /// Collect the K/V moves of the following [`PagedCache::evict`] calls instead of running
    /// each at once; [`PagedCache::flush_moves`] runs them all in one copy. Continual
    /// compression of a decode batch evicts from every sequence after every step: on a GPU one
    /// launch and two synchronising uploads per sequence, where one of each does. Sequences
    /// own disjoint blocks, so the moves of different sequences never alias. The block
    /// bookkeeping moves at once; attention flushes first, so the cache never reads stale
    /// rows. If the deferred copy fails, the sequences with collected moves are unusable (the
    /// caller fails them all, as a failed decode step does).
    pub fn defer_moves(&mut self) {
        self.deferred.get_or_insert_with(DeferredMoves::default);
    }

    /// Run the moves collected since [`PagedCache::defer_moves`] and stop collecting.
    pub fn flush_moves(&mut self) -> Result<()> {
        self.run_pending()?;
        self.deferred = None;
        Ok(())
    }

    /// Run the collected moves, if any, and keep collecting.
    fn run_pending(&mut self) -> Result<()> {
        let Some(d) = &mut self.deferred else {
            return Ok(());
        };
        let from = std::mem::take(&mut d.from);
        let to = std::mem::take(&mut d.to);
        d.seqs.clear();
        self.copy_rows(from, &to)
    }

    /// Readers of K/V storage through `&self` cannot run collected moves: refuse instead.
    fn check_no_pending(&self) -> Result<()> {
        if self.deferred.as_ref().is_some_and(|d| !d.from.is_empty()) {
            candle_core::bail!("paged cache: evictions are pending; call flush_moves first");
        }
        Ok(())
    }

    /// Copy the K and V rows of slots `from[i]` to slots `to[i]` (the storage half of a
    /// compaction or a fork; destinations are distinct and never sources).
    fn copy_rows(&self, from: Vec<u32>, to: &[usize]) -> Result<()> {
        if from.is_empty() {
            return Ok(());
        }
        if self.on_cuda() {
            let to: Vec<u32> = to.iter().map(|&x| x as u32).collect();
            return cuda::move_slots(&self.k, &self.v, None, None, &from, &to);
        }
        let n = from.len();
        let from = Tensor::from_vec(from, n, &self.spec.device)?;
        // index_select copies, so sources never alias destinations.
        let k_rows = self.k.index_select(&from, 0)?;
        let v_rows = self.v.index_select(&from, 0)?;
        self.scatter(&self.k, to, &k_rows)?;
        self.scatter(&self.v, to, &v_rows)
    }

    /// Whether K/V live on a CUDA device (kvc's kernels run the storage ops).
    fn on_cuda(&self) -> bool {
        self.spec.device.is_cuda()
    }

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
            cuda::write_kv(
                &self.k,
                &self.v,
                None,
                None,
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
            }
        }
        Ok(start)
    }

    /// Decode step of every sequence of `call` (one token each) with the CUDA paged-attention
    /// kernels: append, upload the block tables of `call.layer`, one launch pair.
    fn attend_decode_cuda(&mut self, call: &AttnCall<'_>) -> Result<AttnOut> {
        let (b, nh, _, d) = call.q.dims4()?;
        let nkv = self.spec.kv_heads;
        self.append_decode_cuda(call)?;
        let bs = self.spec.block_size;
        let mut lens = Vec::with_capacity(b * nkv);
        for &sid in call.seqs {
            let t = self.pool.table(sid).map_err(be)?;
            lens.extend(t.len[call.layer].iter().map(|&l| l as u32));
        }
        let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
        let max_blocks = max_len.div_ceil(bs).max(1);
        let mut tables = vec![0u32; b * nkv * max_blocks];
        for (i, &sid) in call.seqs.iter().enumerate() {
            let t = self.pool.table(sid).map_err(be)?;
            for (h, blocks) in t.blocks[call.layer].iter().enumerate() {
                tables[(i * nkv + h) * max_blocks..][..blocks.len()].copy_from_slice(blocks);
            }
        }
        let stride = max_len.max(1);
        let shape = DecodeShape {
            batch: b,
            num_kv_heads: nkv,
            group: nh / nkv,
            head_dim: d,
            max_blocks,
            block_size: bs,
            probs_stride: stride,
            num_slots: self.pool.num_blocks() * bs,
        };
        let dev = &self.spec.device;
        let tables = DeviceTables::upload(shape, &tables, &lens, dev)?;
        let mut q = call.q.reshape((b, nh, d))?.contiguous()?;
        if q.layout().start_offset() != 0 {
            q = q.copy()?;
        }
        let want = call.probe != Probe::None;
        let (out, probs) = cuda::paged_decode(
            &q,
            &self.k,
            &self.v,
            &tables,
            call.scale as f32,
            None,
            want,
            None,
        )?;
        if call.layer + 1 == self.spec.layers {
            for &sid in call.seqs {
                *self.pos.get_mut(&sid).expect("appended above") += 1;
            }
        }
        Ok(AttnOut {
            out: out.reshape((b, nh, 1, d))?,
            probs: probs.map(|p| p.reshape((b, nh, 1, stride))).transpose()?,
        })
    }

    /// Appends the one new token of every sequence of a decode batch with ONE `write_kv`
    /// launch for the layer (rows in (sequence, kv-head) order, as `k` `[b, nkv, 1, d]` lies in
    /// memory). Appending sequence by sequence cost a copy, two uploads and a launch per
    /// sequence and layer: at batch 17 that was most of a 27 ms decode step on the H100.
    fn append_decode_cuda(&mut self, call: &AttnCall<'_>) -> Result<()> {
        let (b, nkv, t, d) = call.k.dims4()?;
        if t != 1 || nkv != self.spec.kv_heads || d != self.spec.head_dim {
            candle_core::bail!(
                "decode append expects k [b, {}, 1, {}], got {:?}",
                self.spec.kv_heads,
                self.spec.head_dim,
                call.k.dims()
            );
        }
        let bs = self.spec.block_size;
        let mut need = 0;
        for &sid in call.seqs {
            for h in 0..nkv {
                let len = self.pool.len(call.layer, sid, h).map_err(be)?;
                need += usize::from(len % bs == 0);
            }
        }
        if need > self.pool.free_blocks() {
            return Err(be(BlockError::OutOfBlocks {
                needed: need,
                free: self.pool.free_blocks(),
                total: self.pool.num_blocks(),
            }));
        }
        let mut slots = Vec::with_capacity(b * nkv);
        let mut positions = Vec::with_capacity(b * nkv);
        for &sid in call.seqs {
            let p = *self
                .pos
                .get(&sid)
                .ok_or_else(|| be(BlockError::UnknownSeq(sid)))? as u32;
            for h in 0..nkv {
                let s = self.pool.append(call.layer, sid, h, &[p]).map_err(be)?;
                slots.push(s[0] as u32);
                positions.push(p);
            }
        }
        let rows = |x: &Tensor| x.contiguous()?.reshape((b * nkv, d));
        cuda::write_kv(
            &self.k,
            &self.v,
            None,
            None,
            &rows(call.k)?,
            &rows(call.v)?,
            &slots,
            &positions,
        )
    }

    /// Attention of one sequence: append, gather, masked softmax. Returns the output
    /// `[1, nh, t, d]` and the probed queries' probabilities `[1, nh, n_probed, max_kv_len]`.
    /// On CUDA the scale, mask and softmax are one kernel (`cuda::prefill_softmax`); elsewhere
    /// candle ops, the same as the contiguous oracle's.
    #[allow(clippy::too_many_arguments)]
    fn attend_one(
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
        let start = self.append_seq(layer, seq, k, v)?;
        // Gather every head padded to the longest; padding points at slot 0 and is masked.
        let slots: Vec<Vec<usize>> = (0..nkv)
            .map(|h| self.pool.slots(layer, seq, h).map_err(be))
            .collect::<Result<_>>()?;
        let max = slots.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut idx = Vec::with_capacity(nkv * max);
        let mut key_pos = Vec::with_capacity(nkv * max);
        for (h, s) in slots.iter().enumerate() {
            idx.extend(s.iter().map(|&x| x as u32));
            idx.extend(std::iter::repeat_n(0u32, max - s.len()));
            key_pos.extend(self.pool.positions(layer, seq, h).map_err(be)?);
            key_pos.extend(std::iter::repeat_n(u32::MAX, max - s.len()));
        }
        let dev = &self.spec.device;
        let idx = Tensor::from_vec(idx, nkv * max, dev)?;
        let kk = self.k.index_select(&idx, 0)?.reshape((1, nkv, max, d))?;
        let vv = self.v.index_select(&idx, 0)?.reshape((1, nkv, max, d))?;
        let g = nh / nkv;
        let key_pos = Tensor::from_vec(key_pos, (nkv, max), dev)?;
        let q2 = q.reshape((1, nkv, g * t, d))?;
        if self.on_cuda() && cuda::prefill_softmax_supported(q.dtype()) {
            let probed = match probe {
                Probe::None => 0,
                Probe::All => t,
                Probe::LastQueries(n) => n.min(t),
            };
            let shape = SoftmaxShape {
                kv_heads: nkv,
                group: g,
                t,
                n: max,
                probed,
            };
            let att = q2.matmul(&kk.t()?)?;
            let (p, probs) =
                cuda::prefill_softmax(&att, &key_pos, &shape, start as u32, scale as f32)?;
            let out = p.matmul(&vv)?.reshape((1, nh, t, d))?;
            let probs = probs.map(|p| p.reshape((1, nh, probed, max))).transpose()?;
            return Ok((out, probs));
        }
        let mask = super::causal_mask(&key_pos, start, t)?
            .reshape((nkv, 1, t, max))?
            .broadcast_as((nkv, g, t, max))?
            .reshape((1, nkv, g * t, max))?;
        // Same ops as the contiguous oracle's causal_attention.
        let att = (q2.matmul(&kk.t()?)? * scale)?.to_dtype(DType::F32)?;
        let att = att.broadcast_add(&mask)?;
        let p = candle_nn::ops::softmax_last_dim(&att)?;
        let out = p
            .to_dtype(vv.dtype())?
            .matmul(&vv)?
            .reshape((1, nh, t, d))?;
        Ok((
            out,
            super::probed_rows(p.reshape((1, nh, t, max))?, probe, t)?,
        ))
    }
}

impl CacheBackend for PagedCache {
    fn add_sequence(&mut self) -> Result<SeqId> {
        let id = self.next_id;
        self.next_id += 1;
        self.pool.add_seq(id).map_err(be)?;
        self.pos.insert(id, 0);
        Ok(id)
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.pos.remove(&seq);
        self.pool.remove_seq(seq).map_err(be)
    }

    fn attend(&mut self, call: AttnCall<'_>) -> Result<AttnOut> {
        self.run_pending()?;
        let (_, nh, t, d) = call.q.dims4()?;
        let nkv = self.spec.kv_heads;
        if self.on_cuda()
            && t == 1
            && nh % nkv == 0
            && cuda::decode_supported(self.spec.dtype, d, nh / nkv)
            && call.q.dtype() == self.spec.dtype
        {
            return self.attend_decode_cuda(&call);
        }
        let mut outs = Vec::with_capacity(call.seqs.len());
        let mut probs = Vec::new();
        for (b, &sid) in call.seqs.iter().enumerate() {
            let (out, p) = self.attend_one(
                call.layer,
                sid,
                &call.q.narrow(0, b, 1)?,
                &call.k.narrow(0, b, 1)?,
                &call.v.narrow(0, b, 1)?,
                call.scale,
                call.probe,
            )?;
            if call.layer + 1 == self.spec.layers {
                *self.pos.get_mut(&sid).expect("checked in attend_one") += t;
            }
            outs.push(out);
            if let Some(p) = p {
                probs.push(p);
            }
        }
        let out = Tensor::cat(&outs, 0)?;
        let probs = super::stack_probs(probs)?;
        Ok(AttnOut { out, probs })
    }

    fn seq_len(&self, seq: SeqId) -> usize {
        self.pos.get(&seq).copied().unwrap_or(0)
    }

    fn kv_len(&self, layer: usize, seq: SeqId, kv_head: usize) -> usize {
        self.pool.len(layer, seq, kv_head).unwrap_or(0)
    }

    fn slot_positions(&self, layer: usize, seq: SeqId, kv_head: usize) -> Vec<u32> {
        self.pool.positions(layer, seq, kv_head).unwrap_or_default()
    }

    fn name(&self) -> &'static str {
        "paged"
    }

    fn as_paged(&self) -> Option<&PagedCache> {
        Some(self)
    }

    fn as_paged_mut(&mut self) -> Option<&mut PagedCache> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::blocks::HeadEviction;
    use crate::kvcache::contiguous::{causal_attention, ContiguousCache};
    use crate::kvcache::Probe;

    fn spec(layers: usize, nkv: usize, d: usize, bs: usize) -> PagedSpec {
        PagedSpec {
            layers,
            kv_heads: nkv,
            head_dim: d,
            block_size: bs,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    fn call<'a>(
        seqs: &'a [SeqId],
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        probe: Probe,
    ) -> AttnCall<'a> {
        AttnCall {
            layer: 0,
            seqs,
            q,
            k,
            v,
            scale: 0.5,
            probe,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn no_eviction_equals_contiguous_bitwise() {
        let dev = Device::Cpu;
        let (nh, nkv, d, total) = (6, 2, 8, 21);
        let q = Tensor::randn(0f32, 1.0, (1, nh, total, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, total, d), &dev).unwrap();
        let mut paged = PagedCache::new(spec(1, nkv, d, 4), 64).unwrap();
        let mut cont = ContiguousCache::new(1);
        let sp = paged.add_sequence().unwrap();
        let sc = cont.add_sequence().unwrap();
        for (start, len) in [(0, 7), (7, 1), (8, 9), (17, 1), (18, 3)] {
            let (qn, kn, vn) = (
                q.narrow(2, start, len).unwrap(),
                k.narrow(2, start, len).unwrap(),
                v.narrow(2, start, len).unwrap(),
            );
            let a = paged
                .attend(call(&[sp], &qn, &kn, &vn, Probe::LastQueries(3)))
                .unwrap();
            let b = cont
                .attend(call(&[sc], &qn, &kn, &vn, Probe::LastQueries(3)))
                .unwrap();
            assert_eq!(max_diff(&a.out, &b.out), 0.0);
            assert_eq!(max_diff(&a.probs.unwrap(), &b.probs.unwrap()), 0.0);
        }
        assert_eq!(paged.seq_len(sp), total);
        assert_eq!(paged.kv_len(0, sp, 1), total);
        assert_eq!(paged.memory().used_blocks, 2 * 6);
        paged.remove_sequence(sp).unwrap();
        assert_eq!(paged.memory().used_blocks, 0);
    }

    /// Deferred evictions of several sequences (and a second eviction of one of them before
    /// the flush) leave every head with the same K/V rows as evicting one plan at a time.
    #[test]
    fn deferred_moves_equal_immediate_evictions() {
        let dev = Device::Cpu;
        let (nkv, d, total, bs) = (2, 4, 23, 4);
        let fill = |c: &mut PagedCache| -> Vec<SeqId> {
            (0..3)
                .map(|i| {
                    let s = c.add_sequence().unwrap();
                    let k = Tensor::arange(0f32, (nkv * total * d) as f32, &dev)
                        .unwrap()
                        .affine(1.0, 1000.0 * i as f64)
                        .unwrap()
                        .reshape((1, nkv, total, d))
                        .unwrap();
                    let v = (&k * -1.0).unwrap();
                    let q = Tensor::ones((1, nkv, total, d), DType::F32, &dev).unwrap();
                    c.attend(call(&[s], &q, &k, &v, Probe::None)).unwrap();
                    s
                })
                .collect()
        };
        let plan = |evict: &[usize]| EvictionPlan {
            heads: (0..nkv)
                .map(|h| HeadEviction {
                    layer: 0,
                    kv_head: h,
                    evict: evict.iter().map(|&x| (x + 3 * h) % total).collect(),
                })
                .collect(),
        };
        // The first plan's holes are near the tail, so the second compaction's sources are
        // rows the first one moved there.
        let first = [15usize, 16];
        let second = [0usize, 1, 2, 3, 4, 5, 6];
        let mut now = PagedCache::new(spec(1, nkv, d, bs), 64).unwrap();
        let mut late = PagedCache::new(spec(1, nkv, d, bs), 64).unwrap();
        let (a, b) = (fill(&mut now), fill(&mut late));
        for &s in &a {
            now.evict(s, &plan(&first)).unwrap();
        }
        now.evict(a[1], &plan(&second)).unwrap();
        late.defer_moves();
        for &s in &b {
            late.evict(s, &plan(&first)).unwrap();
        }
        // The same sequence again: its first moves must land before these.
        late.evict(b[1], &plan(&second)).unwrap();
        assert!(
            late.head_k(0, b[0], 0).is_err(),
            "readers refuse pending moves"
        );
        late.flush_moves().unwrap();
        late.pool().check().unwrap();
        for (&sa, &sb) in a.iter().zip(&b) {
            for h in 0..nkv {
                assert_eq!(now.slot_positions(0, sa, h), late.slot_positions(0, sb, h));
                for (x, y) in [
                    (
                        now.head_k(0, sa, h).unwrap(),
                        late.head_k(0, sb, h).unwrap(),
                    ),
                    (
                        now.head_v(0, sa, h).unwrap(),
                        late.head_v(0, sb, h).unwrap(),
                    ),
                ] {
                    assert_eq!(max_diff(&x, &y), 0.0, "seq {sb} head {h}");
                }
            }
        }
        // Not collecting any more: evictions run at once again.
        late.evict(b[0], &plan(&second)).unwrap();
        late.head_k(0, b[0], 0).unwrap();
    }

    #[test]
    fn compacted_heads_attend_like_contiguous_over_survivors() {
        let dev = Device::Cpu;
        let (nh, nkv, d, total, bs) = (4, 2, 8, 19, 4);
        let q = Tensor::randn(0f32, 1.0, (1, nh, total + 1, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, total + 1, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, total + 1, d), &dev).unwrap();
        let mut paged = PagedCache::new(spec(1, nkv, d, bs), 32).unwrap();
        let s = paged.add_sequence().unwrap();
        let pre = |x: &Tensor| x.narrow(2, 0, total).unwrap();
        paged
            .attend(call(&[s], &pre(&q), &pre(&k), &pre(&v), Probe::None))
            .unwrap();
        // Metric = position, so we can check it moved with its slot.
        for h in 0..nkv {
            let m: Vec<f32> = (0..total).map(|p| p as f32).collect();
            paged.add_metric(0, s, h, &m).unwrap();
        }
        let evict0 = vec![0, 3, 4, 5, 9, 17];
        let evict1 = vec![1, 2, 6, 7, 8, 10, 11, 12, 13, 14];
        let plan = EvictionPlan {
            heads: vec![
                HeadEviction {
                    layer: 0,
                    kv_head: 0,
                    evict: evict0.clone(),
                },
                HeadEviction {
                    layer: 0,
                    kv_head: 1,
                    evict: evict1.clone(),
                },
            ],
        };
        let used = paged.memory().used_blocks;
        let st = paged.evict(s, &plan).unwrap();
        assert_eq!(st.evicted, 16);
        // head 0: 19 -> 13 tokens (5 -> 4 blocks); head 1: 19 -> 9 (5 -> 3)
        assert_eq!(st.freed_blocks, 3);
        assert_eq!(paged.memory().used_blocks, used - 3);
        paged.pool().check().unwrap();
        for (h, ev) in [(0, &evict0), (1, &evict1)] {
            let pos = paged.slot_positions(0, s, h);
            let mut sorted = pos.clone();
            sorted.sort();
            let want: Vec<u32> = (0..total as u32)
                .filter(|p| !ev.contains(&(*p as usize)))
                .collect();
            assert_eq!(sorted, want, "head {h}");
            let m = paged.pool().metrics(0, s, h).unwrap();
            assert_eq!(m, pos.iter().map(|&p| p as f32).collect::<Vec<_>>());
            // K rows moved with their positions
            let kh = paged.head_k(0, s, h).unwrap();
            let idx = Tensor::new(pos.as_slice(), &dev).unwrap();
            let want_k = k
                .squeeze(0)
                .unwrap()
                .get(h)
                .unwrap()
                .index_select(&idx, 0)
                .unwrap();
            assert_eq!(max_diff(&kh, &want_k), 0.0);
        }
        // Decode one token: equals attention over the survivors of each head.
        let last = |x: &Tensor| x.narrow(2, total, 1).unwrap();
        let out = paged
            .attend(call(&[s], &last(&q), &last(&k), &last(&v), Probe::All))
            .unwrap();
        let probs = out.probs.unwrap();
        assert_eq!(probs.dims(), &[1, nh, 1, 14]);
        for h in 0..nkv {
            let pos = paged.slot_positions(0, s, h);
            let idx = Tensor::new(pos.as_slice(), &dev).unwrap();
            let sel = |x: &Tensor| {
                x.narrow(1, h, 1)
                    .unwrap()
                    .index_select(&idx, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let qh = last(&q).narrow(1, h * 2, 2).unwrap();
            let (want, _) = causal_attention(&qh, &sel(&k), &sel(&v), 0.5).unwrap();
            let got = out.out.narrow(1, h * 2, 2).unwrap();
            assert!(max_diff(&got, &want) < 1e-6);
            // probabilities beyond the head's length are zero
            let n = pos.len();
            if n < 14 {
                let pad = probs
                    .narrow(1, h * 2, 2)
                    .unwrap()
                    .narrow(3, n, 14 - n)
                    .unwrap();
                assert_eq!(
                    pad.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0
                );
            }
        }
    }

    #[test]
    fn sequences_share_the_pool_and_running_out_is_an_error() {
        let dev = Device::Cpu;
        let (nh, nkv, d) = (2, 1, 4);
        let mut paged = PagedCache::new(spec(1, nkv, d, 4), 3).unwrap();
        let a = paged.add_sequence().unwrap();
        let b = paged.add_sequence().unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, nh, 6, d), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (1, nkv, 6, d), &dev).unwrap();
        paged.attend(call(&[a], &x, &kv, &kv, Probe::None)).unwrap();
        let e = paged
            .attend(call(&[b], &x, &kv, &kv, Probe::None))
            .err()
            .unwrap();
        assert!(e.to_string().contains("out of blocks"), "{e}");
        assert_eq!(paged.kv_len(0, b, 0), 0);
        paged.remove_sequence(a).unwrap();
        paged.attend(call(&[b], &x, &kv, &kv, Probe::None)).unwrap();
        assert_eq!(paged.memory().free_blocks, 1);
    }
}
