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
//! Where the per-slot metric and position live: in the host pool, until a sequence moves them
//! to the device ([`PagedCache::keep_metric_on_device`], what KV-Compress does on a GPU after
//! prefill). From then on the decode kernel adds KV-Compress's decode metric as it attends,
//! and [`PagedCache::evict_on_device`] runs the eviction kernels (`kernels/evict.cu`) for a
//! batch of sequences: block tables go up, new head lengths come back, the pool shortens the
//! heads and frees their blocks. No per-slot data crosses PCIe. The other methods score and
//! plan on the host (probabilities copied back).
//!
//! Departure from the paper's vLLM implementation: on the CPU, attention gathers each head's
//! rows into a dense tensor (plain matmul) instead of a paged-attention kernel; block tables
//! stay on the host and are uploaded per layer and per eviction step.
//!
//! Files: this one holds the types, construction, storage reads and copies and the
//! [`CacheBackend`] entry points; `meta.rs` where the per-slot metric and position live,
//! `eviction.rs` executing host plans and the device eviction, `attend.rs` attention of one
//! sequence (prefill chunks, decode off the CUDA kernel), `decode.rs` the CUDA decode step,
//! `tests.rs` the CPU tests.
use candle_core::{DType, Device, Result, Tensor};
use std::collections::BTreeMap;

use super::blocks::{BlockCopy, BlockError, BlockPool, MemoryLayout, MemoryReport};
use super::step_tables::StepTables;
use super::{AttnCall, AttnOut, CacheBackend, Probe, SeqId};
use crate::cuda::{kv_cache, paged_attention};

mod attend;
mod decode;
mod eviction;
mod meta;

/// Default tokens per block (the paper's).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Granularity of the decode scratch's stride when no probabilities are asked for (tokens).
const SCRATCH_STRIDE_STEP: usize = 1024;

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
    /// Per-slot metric and position in tensors on the cache's device, from the first
    /// [`PagedCache::keep_metric_on_device`] on; every later write and move keeps them in step
    /// with K/V.
    meta: Option<DeviceMeta>,
    /// Whether sequences may keep their metric on the device (default: on a CUDA device).
    device_compression: bool,
    /// Prefill attention with `prefill_attention::prefill_attention` where supported.
    flash_prefill: bool,
    /// The CUDA decode batch's block tables, kept on the device between steps.
    step: Option<DecodeStep>,
    /// Sequences whose tables changed since the last decode step other than by its appends
    /// (evictions, prompt appends): the next step refreshes their rows.
    changed: std::collections::BTreeSet<SeqId>,
    /// Sequences whose tables only lost tail blocks since the last decode step (the device
    /// eviction compacts within a head and truncates it): the next step takes their rows'
    /// lengths from the pool without comparing their blocks (a diff of every block of ~200
    /// sequences was most of a SmolLM2 step's host time).
    shrunk: std::collections::BTreeSet<SeqId>,
    /// The last [`PagedCache::chunk_positions`] (every layer of a prompt chunk uses it).
    chunk_positions: Option<Tensor>,
}

/// The decode step in progress on CUDA (see [`StepTables`]).
struct DecodeStep {
    tables: StepTables,
    /// The layer the next decode call must be for.
    next_layer: usize,
    /// Scratch shared by the layers of a step that return no probabilities.
    ws: Option<paged_attention::DecodeWorkspace>,
}

/// See [`PagedCache::keep_metric_on_device`].
#[derive(Debug)]
struct DeviceMeta {
    /// `[num_slots]` f32.
    metric: Tensor,
    /// `[num_slots]` u32.
    position: Tensor,
    /// Sequences whose metric (and position) live here: the pool's copies of theirs are stale.
    seqs: std::collections::BTreeSet<SeqId>,
}

impl DeviceMeta {
    /// The metric and position tensors of `meta`, `None` each without it (what the write and
    /// move kernels take).
    fn tensors(meta: Option<&DeviceMeta>) -> (Option<&Tensor>, Option<&Tensor>) {
        match meta {
            Some(m) => (Some(&m.metric), Some(&m.position)),
            None => (None, None),
        }
    }
}

/// One sequence of [`PagedCache::evict_on_device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEvict {
    pub seq: SeqId,
    /// Blocks to evict over its heads.
    pub n_evict: usize,
    /// Slots with `position >= first_protected` are never evicted.
    pub first_protected: u32,
    /// KVCrush's block form after the selection (`kernels/evict.cu: kvc_crush_pick`).
    pub crush: Option<crate::cuda::select::BlockPicks>,
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
            pool,
            k,
            v,
            pos: BTreeMap::new(),
            next_id: 0,
            deferred: None,
            meta: None,
            device_compression: spec.device.is_cuda(),
            flash_prefill: true,
            step: None,
            changed: Default::default(),
            shrunk: Default::default(),
            chunk_positions: None,
            spec,
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
            meta: match &self.meta {
                Some(m) => Some(DeviceMeta {
                    metric: m.metric.copy()?,
                    position: m.position.copy()?,
                    seqs: m.seqs.clone(),
                }),
                None => None,
            },
            device_compression: self.device_compression,
            flash_prefill: self.flash_prefill,
            step: None,
            changed: Default::default(),
            shrunk: Default::default(),
            chunk_positions: None,
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
        if let Err(e) = self.copy_blocks(&copies) {
            self.pos.remove(&id);
            let _ = self.pool.remove_seq(id);
            return Err(e);
        }
        if let Some(m) = &mut self.meta {
            if m.seqs.contains(&src) {
                m.seqs.insert(id);
            }
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

    /// Whether sequences may keep their metric on the device
    /// ([`PagedCache::keep_metric_on_device`]); on by default on a CUDA device.
    pub fn device_compression(&self) -> bool {
        self.device_compression
    }

    /// Use the flash prefill kernel where it applies (on by default; off: the unfused
    /// matmul + softmax kernel + matmul path, the A/B reference).
    pub fn set_flash_prefill(&mut self, on: bool) {
        self.flash_prefill = on;
    }

    /// Allow or forbid [`PagedCache::keep_metric_on_device`] (`--compress-on host` turns it off
    /// to compare; `--compress-on device` turns it on for the CPU, where the kernels'
    /// plain-Rust twins run).
    pub fn set_device_compression(&mut self, on: bool) {
        self.device_compression = on;
    }

    /// The K and V storage `[num_blocks * block_size, head_dim]` (slot `s` is row `s`).
    pub fn storage(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    /// K rows `[kv_len, head_dim]` of (layer, seq, kv_head) in logical order.
    pub fn head_k(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<Tensor> {
        Ok(self.gather(layer, seq, kv_head)?.0)
    }

    /// V rows `[kv_len, head_dim]` of (layer, seq, kv_head) in logical order.
    pub fn head_v(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<Tensor> {
        Ok(self.gather(layer, seq, kv_head)?.1)
    }

    /// K and V rows of (layer, seq, kv_head) in logical order.
    fn gather(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<(Tensor, Tensor)> {
        self.check_no_pending()?;
        let slots: Vec<u32> = self
            .pool
            .slots(layer, seq, kv_head)
            .map_err(be)?
            .into_iter()
            .map(|s| s as u32)
            .collect();
        let (n, top) = (slots.len(), slots.iter().copied().max());
        let idx = Tensor::from_vec(slots, n, &self.spec.device)?;
        kv_cache::gather_kv(&self.k, &self.v, &idx, top)
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

    /// Copy whole blocks of the storage (K, V and the device metric/position): a fork. On CUDA
    /// one launch over block ids; elsewhere the blocks' slots through [`Self::copy_rows`].
    fn copy_blocks(&self, copies: &[BlockCopy]) -> Result<()> {
        let bs = self.spec.block_size;
        if self.on_cuda() {
            let from: Vec<u32> = copies.iter().map(|c| c.from as u32).collect();
            let to: Vec<u32> = copies.iter().map(|c| c.to as u32).collect();
            let (m, p) = self.meta_tensors();
            return kv_cache::copy_blocks(&self.k, &self.v, m, p, &from, &to, bs);
        }
        let from: Vec<u32> = copies
            .iter()
            .flat_map(|c| (c.from * bs..(c.from + 1) * bs).map(|s| s as u32))
            .collect();
        let to: Vec<usize> = copies
            .iter()
            .flat_map(|c| c.to * bs..(c.to + 1) * bs)
            .collect();
        self.copy_rows(from, &to)
    }

    /// Copy the K and V rows of slots `from[i]` to slots `to[i]` (the storage half of a
    /// compaction or a fork; destinations are distinct and never sources).
    fn copy_rows(&self, from: Vec<u32>, to: &[usize]) -> Result<()> {
        if from.is_empty() {
            return Ok(());
        }
        if self.on_cuda() {
            let to: Vec<u32> = to.iter().map(|&x| x as u32).collect();
            let (m, p) = self.meta_tensors();
            return kv_cache::move_slots(&self.k, &self.v, m, p, &from, &to);
        }
        let n = from.len();
        let from = Tensor::from_vec(from, n, &self.spec.device)?;
        // index_select copies, so sources never alias destinations.
        let k_rows = self.k.index_select(&from, 0)?;
        let v_rows = self.v.index_select(&from, 0)?;
        self.scatter(&self.k, to, &k_rows)?;
        self.scatter(&self.v, to, &v_rows)?;
        if let Some(m) = &self.meta {
            let to = self.slot_index(to)?;
            m.metric
                .scatter_set(&to, &m.metric.index_select(&from, 0)?, 0)?;
            m.position
                .scatter_set(&to, &m.position.index_select(&from, 0)?, 0)?;
        }
        Ok(())
    }

    /// The device metric and position, once any sequence keeps its metric there.
    fn meta_tensors(&self) -> (Option<&Tensor>, Option<&Tensor>) {
        DeviceMeta::tensors(self.meta.as_ref())
    }

    /// `slots` as a u32 index tensor on the cache's device.
    fn slot_index(&self, slots: &[usize]) -> Result<Tensor> {
        let idx: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
        Tensor::from_vec(idx, slots.len(), &self.spec.device)
    }

    /// Set the device metric to 0 and the position to `positions[i]` at `slots[i]` (a write
    /// off the CUDA kernels: the CUDA path's `write_kv` does this itself).
    fn init_meta(&self, slots: &[usize], positions: &[u32]) -> Result<()> {
        let Some(m) = &self.meta else { return Ok(()) };
        if slots.is_empty() {
            return Ok(());
        }
        let idx = self.slot_index(slots)?;
        let dev = &self.spec.device;
        m.metric
            .scatter_set(&idx, &Tensor::zeros(slots.len(), DType::F32, dev)?, 0)?;
        m.position
            .scatter_set(&idx, &Tensor::from_slice(positions, slots.len(), dev)?, 0)
    }

    /// Whether K/V live on a CUDA device (kvc's kernels run the storage ops).
    fn on_cuda(&self) -> bool {
        self.spec.device.is_cuda()
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
        if let Some(m) = &mut self.meta {
            m.seqs.remove(&seq);
        }
        self.pool.remove_seq(seq).map_err(be)
    }

    fn attend(&mut self, call: AttnCall<'_>) -> Result<AttnOut> {
        self.run_pending()?;
        let (_, nh, t, d) = call.q.dims4()?;
        let nkv = self.spec.kv_heads;
        if self.on_cuda()
            && t == 1
            && nh % nkv == 0
            && paged_attention::decode_supported(self.spec.dtype, d, nh / nkv)
            && call.q.dtype() == self.spec.dtype
        {
            return self.attend_decode_cuda(&call);
        }
        let mut outs = Vec::with_capacity(call.seqs.len());
        let mut probs = Vec::new();
        for (b, &sid) in call.seqs.iter().enumerate() {
            let on_device = self.metric_on_device(sid);
            if on_device && t != 1 {
                candle_core::bail!(
                    "sequence {sid} keeps its metric on the device and can only decode \
                     (a call of {t} tokens)"
                );
            }
            let (out, p) = self.attend_one(
                call.layer,
                sid,
                &call.q.narrow(0, b, 1)?,
                &call.k.narrow(0, b, 1)?,
                &call.v.narrow(0, b, 1)?,
                call.scale,
                if on_device { Probe::All } else { call.probe },
            )?;
            if on_device {
                let p = p.as_ref().expect("probed above");
                self.add_decode_metric(call.layer, sid, p)?;
            }
            if call.layer + 1 == self.spec.layers {
                *self.pos.get_mut(&sid).expect("checked in attend_one") += t;
            }
            outs.push(out);
            if let Some(p) = p.filter(|_| call.probe != Probe::None) {
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
        self.positions(layer, seq, kv_head).unwrap_or_default()
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

    fn evict_on_device(&mut self, reqs: &[DeviceEvict]) -> Result<Vec<EvictStats>> {
        PagedCache::evict_on_device(self, reqs)
    }

    fn defer_moves(&mut self) {
        PagedCache::defer_moves(self)
    }

    fn flush_moves(&mut self) -> Result<()> {
        PagedCache::flush_moves(self)
    }
}

#[cfg(test)]
pub(crate) mod tests;
