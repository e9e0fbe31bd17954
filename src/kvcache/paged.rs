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
use candle_core::{DType, Device, Result, Tensor};
use std::collections::BTreeMap;

use super::blocks::{BlockCopy, BlockError, BlockPool, EvictionPlan, MemoryLayout, MemoryReport};
use super::step_tables::StepTables;
use super::{AttnCall, AttnOut, CacheBackend, Probe, SeqId};
use crate::cuda::paged_attention::{DecodeShape, DeviceTables};
use crate::cuda::prefill_softmax::SoftmaxShape;
use crate::cuda::{evict, kv_cache, paged_attention, prefill_attention, prefill_softmax};

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

    /// Add `delta[i]` to the metric of logical slot `i` of (layer, seq, kv_head).
    pub fn add_metric(
        &mut self,
        layer: usize,
        seq: SeqId,
        kv_head: usize,
        delta: &[f32],
    ) -> Result<()> {
        if self.metric_on_device(seq) {
            let mut slots = self.pool.slots(layer, seq, kv_head).map_err(be)?;
            if delta.len() > slots.len() {
                return Err(be(BlockError::BadLength {
                    what: "metric update",
                    got: delta.len(),
                    len: slots.len(),
                }));
            }
            slots.truncate(delta.len());
            let add = Tensor::from_slice(delta, delta.len(), &self.spec.device)?;
            return self.add_device_metric(&slots, &add);
        }
        self.pool.add_metric(layer, seq, kv_head, delta).map_err(be)
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

    /// From now on keep `seq`'s per-slot metric and position in tensors on the cache's device:
    /// decode steps add KV-Compress's decode metric (`sum over the group of p^2`) there (the
    /// decode kernel does it as it attends; nothing goes to the host), and
    /// [`PagedCache::evict_on_device`] evicts from them. The host pool's metric/position of
    /// `seq` are stale from here on; [`PagedCache::seq_meta`] and `slot_positions` read the
    /// device's. The first call mirrors the pool's metadata of every slot to the device;
    /// later calls upload `seq`'s.
    pub fn keep_metric_on_device(&mut self, seq: SeqId) -> Result<()> {
        if !self.device_compression {
            candle_core::bail!("device compression is off for this cache");
        }
        self.run_pending()?;
        if !self.pos.contains_key(&seq) {
            return Err(be(BlockError::UnknownSeq(seq)));
        }
        let dev = self.spec.device.clone();
        if self.meta.is_none() {
            // Only the slots of sequences listed in `seqs` are ever read here (every later
            // write and move keeps them), so the tensors start as zeros, not as an upload of
            // the pool's arrays (360 MB for a 32-sample SmolLM2 batch).
            let n = self.pool.slot_meta().0.len();
            self.meta = Some(DeviceMeta {
                metric: Tensor::zeros(n, DType::F32, &dev)?,
                position: Tensor::zeros(n, DType::U32, &dev)?,
                seqs: Default::default(),
            });
        }
        let m = self.meta.as_mut().expect("created above");
        if !m.seqs.contains(&seq) {
            let (mut slots, mut metric, mut position) = (Vec::new(), Vec::new(), Vec::new());
            for l in 0..self.spec.layers {
                for h in 0..self.spec.kv_heads {
                    slots.extend(self.pool.slots(l, seq, h).map_err(be)?);
                    metric.extend(self.pool.metrics(l, seq, h).map_err(be)?);
                    position.extend(self.pool.positions(l, seq, h).map_err(be)?);
                }
            }
            let slots: Vec<u32> = slots.into_iter().map(|s| s as u32).collect();
            if dev.is_cuda() {
                kv_cache::set_meta(&m.metric, &m.position, &slots, &metric, &position)?;
            } else {
                let n = slots.len();
                let idx = Tensor::from_vec(slots, n, &dev)?;
                m.metric
                    .scatter_set(&idx, &Tensor::from_vec(metric, n, &dev)?, 0)?;
                m.position
                    .scatter_set(&idx, &Tensor::from_vec(position, n, &dev)?, 0)?;
            }
            m.seqs.insert(seq);
        }
        Ok(())
    }

    /// Whether `seq` keeps its metric on the device.
    pub fn metric_on_device(&self, seq: SeqId) -> bool {
        self.meta.as_ref().is_some_and(|m| m.seqs.contains(&seq))
    }

    /// Token positions of (layer, seq, kv_head) in logical order, from wherever they live.
    pub fn positions(&self, layer: usize, seq: SeqId, kv_head: usize) -> Result<Vec<u32>> {
        if self.metric_on_device(seq) {
            let mut one = self.device_meta(seq, &[(layer, kv_head)])?;
            return Ok(one.pop().expect("one head").1);
        }
        self.pool.positions(layer, seq, kv_head).map_err(be)
    }

    /// Metrics and positions of every head of `seq`, in (layer, kv-head) order, from wherever
    /// they live (one download for a sequence whose metric is on the device).
    pub fn seq_meta(&self, seq: SeqId) -> Result<Vec<(Vec<f32>, Vec<u32>)>> {
        let heads: Vec<(usize, usize)> = (0..self.spec.layers)
            .flat_map(|l| (0..self.spec.kv_heads).map(move |h| (l, h)))
            .collect();
        if self.metric_on_device(seq) {
            return self.device_meta(seq, &heads);
        }
        heads
            .into_iter()
            .map(|(l, h)| {
                Ok((
                    self.pool.metrics(l, seq, h).map_err(be)?,
                    self.pool.positions(l, seq, h).map_err(be)?,
                ))
            })
            .collect()
    }

    /// The metric and position of `heads` (layer, kv-head) of `seq` from the device tensors:
    /// one gather and one download of each for all of them.
    fn device_meta(
        &self,
        seq: SeqId,
        heads: &[(usize, usize)],
    ) -> Result<Vec<(Vec<f32>, Vec<u32>)>> {
        self.check_no_pending()?;
        let m = self.meta.as_ref().expect("sequence on the device");
        let mut slots = Vec::new();
        let mut lens = Vec::with_capacity(heads.len());
        for &(l, h) in heads {
            let s = self.pool.slots(l, seq, h).map_err(be)?;
            lens.push(s.len());
            slots.extend(s);
        }
        let idx = self.slot_index(&slots)?;
        let metric = m.metric.index_select(&idx, 0)?.to_vec1::<f32>()?;
        let position = m.position.index_select(&idx, 0)?.to_vec1::<u32>()?;
        let mut at = 0;
        Ok(lens
            .into_iter()
            .map(|n| {
                let r = at..at + n;
                at += n;
                (metric[r.clone()].to_vec(), position[r].to_vec())
            })
            .collect())
    }

    /// Add KV-Compress's decode metric of one decode step of `seq` in `layer` to the device
    /// metric off the CUDA decode kernel (which adds it itself): `p` `[1, nh, 1, max_len]`
    /// probabilities, zero past each head's length; slot `i` of kv-head `h` gains
    /// `sum over h's query group of p^2`.
    fn add_decode_metric(&mut self, layer: usize, seq: SeqId, p: &Tensor) -> Result<()> {
        let nkv = self.spec.kv_heads;
        let (_, nh, _, max) = p.dims4()?;
        // Summed over the group in head order, as the host scorer does.
        let m2 = p
            .reshape((nkv, nh / nkv, max))?
            .sqr()?
            .sum(1)?
            .to_dtype(DType::F32)?;
        let (mut slots, mut rows) = (Vec::new(), Vec::new());
        for h in 0..nkv {
            let s = self.pool.slots(layer, seq, h).map_err(be)?;
            rows.push(m2.get(h)?.narrow(0, 0, s.len())?);
            slots.extend(s);
        }
        self.add_device_metric(&slots, &Tensor::cat(&rows, 0)?)
    }

    /// `metric[slots[i]] += add[i]` in the device metric.
    fn add_device_metric(&mut self, slots: &[usize], add: &Tensor) -> Result<()> {
        let idx = self.slot_index(slots)?;
        let m = self.meta.as_mut().expect("sequence on the device");
        m.metric = m.metric.index_add(&idx, add, 0)?;
        Ok(())
    }

    /// KV-Compress's eviction step for several sequences whose metric is on the device
    /// ([`PagedCache::keep_metric_on_device`]): each evicts `n_evict` blocks chosen over its
    /// heads from the device metric (protected positions kept), and is compacted, by
    /// `kernels/evict.cu` in one batch on CUDA (three launches; the block tables go up, the new
    /// lengths come back) or by its twin ([`evict::kvcompress_evict_batch_twin`]) elsewhere. The pool
    /// then shortens each head and frees its emptied blocks. Heads longer than the device sort
    /// holds ([`evict::EVICT_MAX_LEN`]) are planned on the host from their downloaded metrics
    /// with the same selection.
    pub fn evict_on_device(&mut self, reqs: &[DeviceEvict]) -> Result<Vec<EvictStats>> {
        let dev = self.spec.device.clone();
        let mut clock = crate::profile::start(&dev);
        self.run_pending()?;
        let (layers, nkv, bs) = (self.spec.layers, self.spec.kv_heads, self.spec.block_size);
        let mut stats = vec![EvictStats::default(); reqs.len()];
        let mut batch = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if !self.metric_on_device(r.seq) {
                candle_core::bail!("sequence {} keeps its metric on the host", r.seq);
            }
            if r.n_evict == 0 {
                continue;
            }
            let t = self.pool.table(r.seq).map_err(be)?;
            let longest = t.len.iter().flatten().copied().max().unwrap_or(0);
            if self.on_cuda() && longest > evict::EVICT_MAX_LEN {
                // The host plan: the twin's selection on the downloaded metrics.
                let plan = EvictionPlan::from_meta(
                    &self.seq_meta(r.seq)?,
                    nkv,
                    bs,
                    r.first_protected,
                    r.n_evict,
                    r.crush.as_ref(),
                );
                stats[i] = self.evict(r.seq, &plan)?;
            } else {
                batch.push(i);
            }
        }
        if batch.is_empty() {
            return Ok(stats);
        }
        let ids: Vec<SeqId> = batch.iter().map(|&i| reqs[i].seq).collect();
        let seqs: Vec<evict::EvictSeq> = batch
            .iter()
            .map(|&i| evict::EvictSeq {
                heads: layers * nkv,
                kv_heads: nkv,
                first_protected: reqs[i].first_protected,
                n_evict: reqs[i].n_evict,
                crush: reqs[i].crush,
            })
            .collect();
        // The decode batch's device tables when they hold every one of these sequences as the
        // pool does (none changed since the step); else the pool's, gathered and uploaded.
        crate::profile::mark(&dev, &mut clock, "compress/evict.prepare");
        let on_step = match &self.step {
            Some(st)
                if self.on_cuda()
                    && ids
                        .iter()
                        .all(|s| !self.changed.contains(s) && !self.shrunk.contains(s)) =>
            {
                st.tables.heads_of(&ids)
            }
            _ => None,
        };
        let steps = match on_step {
            Some((tab, lens)) => {
                let m = self.meta.as_ref().expect("checked above");
                let st = self.step.as_ref().expect("matched above");
                evict::kvcompress_evict_on_tables(
                    &self.k,
                    &self.v,
                    &m.metric,
                    &m.position,
                    st.tables.blocks(),
                    &tab,
                    &lens,
                    &seqs,
                    bs,
                )?
            }
            None => {
                let tables = self.pool.head_tables(&ids).map_err(be)?;
                if self.on_cuda() {
                    let m = self.meta.as_ref().expect("checked above");
                    evict::kvcompress_evict_batch(
                        &self.k,
                        &self.v,
                        &m.metric,
                        &m.position,
                        &tables,
                        &seqs,
                        bs,
                    )?
                } else {
                    self.evict_batch_twin(&tables, &seqs)?
                }
            }
        };
        crate::profile::mark(&dev, &mut clock, "compress/evict.kernels+counts");
        for (&i, step) in batch.iter().zip(steps) {
            let seq = reqs[i].seq;
            let (evicted, freed) = self.pool.truncate_heads(seq, &step.new_lens).map_err(be)?;
            if evicted > 0 {
                self.shrunk.insert(seq);
            }
            stats[i].evicted += evicted;
            stats[i].freed_blocks += freed;
        }
        crate::profile::mark(&dev, &mut clock, "compress/evict.pool_update");
        Ok(stats)
    }

    /// [`evict::kvcompress_evict_batch_twin`] on host copies of the storage, written back (the CPU
    /// side of [`PagedCache::evict_on_device`]: slow, for tests and CPU runs that ask for it).
    fn evict_batch_twin(
        &mut self,
        tables: &evict::HeadTables,
        seqs: &[evict::EvictSeq],
    ) -> Result<Vec<evict::EvictStep>> {
        fn run<T: candle_core::WithDType>(
            c: &mut PagedCache,
            tables: &evict::HeadTables,
            seqs: &[evict::EvictSeq],
        ) -> Result<Vec<evict::EvictStep>> {
            let (rows, d) = c.k.dims2()?;
            let dev = c.spec.device.clone();
            let mut k = c.k.flatten_all()?.to_vec1::<T>()?;
            let mut v = c.v.flatten_all()?.to_vec1::<T>()?;
            let m = c.meta.as_mut().expect("checked by the caller");
            let mut metric = m.metric.to_vec1::<f32>()?;
            let mut position = m.position.to_vec1::<u32>()?;
            let steps = evict::kvcompress_evict_batch_twin(
                &mut k,
                &mut v,
                &mut metric,
                &mut position,
                tables,
                seqs,
                c.spec.block_size,
                d,
            )
            .map_err(candle_core::Error::wrap)?;
            m.metric = Tensor::from_vec(metric, rows, &dev)?;
            m.position = Tensor::from_vec(position, rows, &dev)?;
            c.k = Tensor::from_vec(k, (rows, d), &dev)?;
            c.v = Tensor::from_vec(v, (rows, d), &dev)?;
            Ok(steps)
        }
        match self.spec.dtype {
            DType::F32 => run::<f32>(self, tables, seqs),
            DType::BF16 => run::<half::bf16>(self, tables, seqs),
            DType::F16 => run::<half::f16>(self, tables, seqs),
            dt => candle_core::bail!("paged cache dtype {dt:?}"),
        }
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
        if !compactions.is_empty() {
            self.changed.insert(seq);
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

    /// Decode step of every sequence of `call` (one token each) with the CUDA paged-attention
    /// kernels. The layer-0 call appends the step's token to every head of every layer and
    /// brings the batch's device block tables up to date ([`Self::begin_decode_step`]); every
    /// layer then writes its K/V and attends through views of them: one write launch and one
    /// launch pair per layer, no upload.
    fn attend_decode_cuda(&mut self, call: &AttnCall<'_>) -> Result<AttnOut> {
        let (b, nh, _, d) = call.q.dims4()?;
        let nkv = self.spec.kv_heads;
        let (kb, kh, kt, kd) = call.k.dims4()?;
        if (kb, kh, kt, kd) != (b, nkv, 1, d)
            || d != self.spec.head_dim
            || call.v.dims() != call.k.dims()
        {
            candle_core::bail!(
                "decode call expects k, v [{b}, {nkv}, 1, {}], got {:?} / {:?}",
                self.spec.head_dim,
                call.k.dims(),
                call.v.dims()
            );
        }
        if call.layer == 0 {
            let mut clock = crate::profile::start(&self.spec.device);
            self.begin_decode_step(call.seqs)?;
            crate::profile::mark(&self.spec.device, &mut clock, "decode.attend/step_tables");
        }
        let step = match &mut self.step {
            Some(s) if s.next_layer == call.layer && s.tables.matches(call.seqs) => s,
            _ => candle_core::bail!(
                "decode call for layer {} of a batch whose step did not start at layer 0 \
                 (calls must run layer 0, 1, ... with the same sequences)",
                call.layer
            ),
        };
        step.next_layer += 1;
        let views = step.tables.layer(call.layer)?;
        let rows = |x: &Tensor| x.contiguous()?.reshape((b * nkv, d));
        let (m, p) = DeviceMeta::tensors(self.meta.as_ref());
        kv_cache::write_kv_at(
            &self.k,
            &self.v,
            m,
            p,
            &rows(call.k)?,
            &rows(call.v)?,
            &views.slots,
            &views.positions,
        )?;
        let want = call.probe != Probe::None;
        // Probabilities asked for come back as wide as the layer's longest head; otherwise
        // one stride for every layer of the step, rounded up so that the scratch serves the
        // steps until the longest head grows past it (a new one each step re-filled
        // `batch * heads * stride` f32 and four tensors per step).
        let stride = if want {
            views.max_len
        } else {
            step.tables.max_len().next_multiple_of(SCRATCH_STRIDE_STEP)
        }
        .max(1);
        let shape = DecodeShape {
            batch: b,
            num_kv_heads: nkv,
            group: nh / nkv,
            head_dim: d,
            max_blocks: views.max_blocks,
            block_size: self.spec.block_size,
            probs_stride: stride,
            num_slots: self.pool.num_blocks() * self.spec.block_size,
        };
        // The decode metric goes straight into the device metric when a sequence of the call
        // keeps its metric there (it adds to the others' slots too, whose device metric is
        // unused: theirs is on the host).
        let metric = self
            .meta
            .as_ref()
            .filter(|m| call.seqs.iter().any(|s| m.seqs.contains(s)))
            .map(|m| &m.metric);
        let tables =
            DeviceTables::prechecked(shape, views.blocks, views.starts, views.lens, views.max_len)?;
        let mut q = call.q.reshape((b, nh, d))?.contiguous()?;
        if q.layout().start_offset() != 0 {
            q = q.copy()?;
        }
        let dev = &self.spec.device;
        let out = Tensor::zeros((b, nh, d), q.dtype(), dev)?;
        let ws = if want {
            paged_attention::DecodeWorkspace::new(&shape, stride, None, dev)?
        } else {
            match step.ws.take() {
                Some(ws) if ws.fits(&shape, stride) => ws,
                _ => paged_attention::DecodeWorkspace::new(&shape, stride, None, dev)?,
            }
        };
        paged_attention::paged_decode_into(
            &q,
            &self.k,
            &self.v,
            &tables,
            &ws,
            &out,
            call.scale as f32,
            metric,
            want,
        )?;
        let probs = if want {
            Some(ws.probs.reshape((b, nh, 1, stride))?)
        } else {
            step.ws = Some(ws);
            None
        };
        if call.layer + 1 == self.spec.layers {
            for &sid in call.seqs {
                *self.pos.get_mut(&sid).expect("appended at layer 0") += 1;
            }
        }
        Ok(AttnOut {
            out: out.reshape((b, nh, 1, d))?,
            probs,
        })
    }

    /// The layer-0 work of a CUDA decode step: append one token to every head of every layer
    /// of every sequence ([`BlockPool::append_step`], all or nothing) and bring the batch's
    /// device tables up to date: follow the appends and the rows of sequences changed since
    /// the last step when the batch is the same, rebuild them otherwise.
    fn begin_decode_step(&mut self, seqs: &[SeqId]) -> Result<()> {
        let positions = seqs
            .iter()
            .map(|s| {
                self.pos
                    .get(s)
                    .map(|&p| p as u32)
                    .ok_or_else(|| be(BlockError::UnknownSeq(*s)))
            })
            .collect::<Result<Vec<u32>>>()?;
        let with_pos: Vec<(SeqId, u32)> = seqs
            .iter()
            .copied()
            .zip(positions.iter().copied())
            .collect();
        // Sequences whose metric lives on the device keep their positions there too.
        let meta = self.meta.as_ref().map(|m| &m.seqs);
        let app = self
            .pool
            .append_step(&with_pos, |s| !meta.is_some_and(|m| m.contains(&s)))
            .map_err(be)?;
        let mut step = self.step.take();
        let followed = match &mut step {
            Some(s) if s.tables.matches(seqs) => {
                let changed: Vec<usize> = (0..seqs.len())
                    .filter(|&i| self.changed.contains(&seqs[i]))
                    .collect();
                let shrunk: Vec<usize> = (0..seqs.len())
                    .filter(|&i| self.shrunk.contains(&seqs[i]) && !self.changed.contains(&seqs[i]))
                    .collect();
                s.tables
                    .follow(&self.pool, &app, &positions, &changed, &shrunk)?
            }
            _ => false,
        };
        self.changed.clear();
        self.shrunk.clear();
        let step = if followed {
            step.expect("followed")
        } else {
            let mut tables = StepTables::build(&self.pool, seqs, &self.spec.device)?;
            tables.start_step(&app, &positions)?;
            DecodeStep {
                tables,
                next_layer: 0,
                ws: step.and_then(|s| s.ws),
            }
        };
        self.step = Some(DecodeStep {
            next_layer: 0,
            ..step
        });
        Ok(())
    }

    /// Every kv-head of (layer, seq) gathered and padded to the longest head: K and V
    /// `[1, kv_heads, max, d]`, key positions `[kv_heads, max]` u32 (padding points at slot 0
    /// and carries position u32::MAX, which no query sees), and `max`.
    fn gather_heads(&self, layer: usize, seq: SeqId) -> Result<(Tensor, Tensor, Tensor, usize)> {
        let (nkv, d) = (self.spec.kv_heads, self.spec.head_dim);
        let dev = &self.spec.device;
        let slots: Vec<Vec<usize>> = (0..nkv)
            .map(|h| self.pool.slots(layer, seq, h).map_err(be))
            .collect::<Result<_>>()?;
        let max = slots.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut idx = Vec::with_capacity(nkv * max);
        let mut key_pos = Vec::with_capacity(nkv * max);
        for (h, s) in slots.iter().enumerate() {
            idx.extend(s.iter().map(|&x| x as u32));
            idx.extend(std::iter::repeat_n(0u32, max - s.len()));
            key_pos.extend(self.positions(layer, seq, h)?);
            key_pos.extend(std::iter::repeat_n(u32::MAX, max - s.len()));
        }
        let top = idx.iter().copied().max();
        let idx = Tensor::from_vec(idx, nkv * max, dev)?;
        let (kk, vv) = kv_cache::gather_kv(&self.k, &self.v, &idx, top)?;
        let (kk, vv) = (kk.reshape((1, nkv, max, d))?, vv.reshape((1, nkv, max, d))?);
        let key_pos = Tensor::from_vec(key_pos, (nkv, max), dev)?;
        Ok((kk, vv, key_pos, max))
    }

    /// Key positions `[kv_heads, t]` u32, `0..t` in every row (a fresh sequence's first
    /// chunk), made once per chunk length and reused by every layer.
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
            self.gather_heads(layer, seq)?
        };
        crate::profile::mark(&dev, &mut clock, "prefill.attend/gather");
        let q2 = q.reshape((1, nkv, g * t, d))?;
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
        // Flash attention unless every query is probed (H2O's prefill scores: the scores are
        // the output then); the probed window is a few rows scored the unfused way.
        if self.flash_prefill
            && self.on_cuda()
            && prefill_attention::prefill_attention_supported(q.dtype(), d)
            && probed < t
        {
            let flash = SoftmaxShape { probed: 0, ..shape };
            let out = prefill_attention::prefill_attention(
                &q2,
                &kk,
                &vv,
                &key_pos,
                &flash,
                start as u32,
                scale as f32,
            )?
            .reshape((1, nh, t, d))?;
            crate::profile::mark(&dev, &mut clock, "prefill.attend/flash");
            if probed == 0 {
                return Ok((out, None));
            }
            let qw =
                q.narrow(2, t - probed, probed)?
                    .contiguous()?
                    .reshape((1, nkv, g * probed, d))?;
            let window = SoftmaxShape { t: probed, ..shape };
            let att = qw.matmul(&kk.t()?)?;
            let first = (start + t - probed) as u32;
            let (_, probs) =
                prefill_softmax::prefill_softmax(&att, &key_pos, &window, first, scale as f32)?;
            let probs = probs.map(|p| p.reshape((1, nh, probed, max))).transpose()?;
            crate::profile::mark(&dev, &mut clock, "prefill.attend/window");
            return Ok((out, probs));
        }
        if self.on_cuda() && prefill_softmax::prefill_softmax_supported(q.dtype()) {
            let att = q2.matmul(&kk.t()?)?;
            let (p, probs) = prefill_softmax::prefill_softmax(
                &att,
                &key_pos,
                &shape,
                start as u32,
                scale as f32,
            )?;
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

    /// The device-metric path of several sequences (one batched eviction, here through the
    /// kernels' twin) leaves every head as the host path leaves it: a KV-Compress plan made
    /// from the same metrics on the host and run through `evict`. Metrics are quantised so
    /// ties are common; sequences have different lengths (ragged heads after a first round).
    #[test]
    fn device_eviction_equals_host_plan() {
        use crate::cuda::select::{Anchor, BlockPicks};
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let (layers, nkv, d, bs) = (2, 3, 4, 4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut host = PagedCache::new(spec(layers, nkv, d, bs), 400).unwrap();
        let lens = [37usize, 20, 51];
        let mut seqs = Vec::new();
        for (i, &t) in lens.iter().enumerate() {
            let s = host.add_sequence().unwrap();
            for l in 0..layers {
                let k = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
                let q = Tensor::randn(0f32, 1.0, (1, nkv, t, d), &dev).unwrap();
                let one = [s];
                let mut c = call(&one, &q, &k, &v, Probe::None);
                c.layer = l;
                host.attend(c).unwrap();
                for h in 0..nkv {
                    let m: Vec<f32> = (0..t)
                        .map(|_| rng.random_range(0..6) as f32 + i as f32)
                        .collect();
                    host.add_metric(l, s, h, &m).unwrap();
                }
            }
            seqs.push(s);
        }
        let mut device = host.deep_copy().unwrap();
        device.set_device_compression(true);
        for &s in &seqs {
            device.keep_metric_on_device(s).unwrap();
        }
        for (round, n_evict) in [(0, [5usize, 7, 9]), (1, [3, 0, 4])] {
            let reqs: Vec<DeviceEvict> = seqs
                .iter()
                .zip(n_evict)
                .map(|(&seq, n)| DeviceEvict {
                    seq,
                    n_evict: n,
                    first_protected: (host.seq_len(seq) - 3 - round) as u32,
                    // KVCrush's block form on the second sequence (its twin's picks).
                    crush: (seq == seqs[1]).then_some(BlockPicks {
                        groups_per_head: 1,
                        anchor: Anchor::Mean,
                        seed: 0,
                    }),
                })
                .collect();
            let got = device.evict_on_device(&reqs).unwrap();
            for (r, st) in reqs.iter().zip(got) {
                let meta = host.seq_meta(r.seq).unwrap();
                let plan = EvictionPlan::from_meta(
                    &meta,
                    nkv,
                    bs,
                    r.first_protected,
                    r.n_evict,
                    r.crush.as_ref(),
                );
                if r.crush.is_some() && r.n_evict > 0 {
                    let plain =
                        EvictionPlan::from_meta(&meta, nkv, bs, r.first_protected, r.n_evict, None);
                    assert!(
                        plan.evicted() < plain.evicted(),
                        "KVCrush keeps groups back"
                    );
                }
                let want = host.evict(r.seq, &plan).unwrap();
                assert_eq!(
                    (st.evicted, st.freed_blocks),
                    (want.evicted, want.freed_blocks)
                );
            }
            assert_eq!(device.pool().free_blocks(), host.pool().free_blocks());
            device.pool().check().unwrap();
            for &s in &seqs {
                assert_eq!(
                    device.seq_meta(s).unwrap(),
                    host.seq_meta(s).unwrap(),
                    "round {round}"
                );
                for l in 0..layers {
                    for h in 0..nkv {
                        for (x, y) in [
                            (
                                device.head_k(l, s, h).unwrap(),
                                host.head_k(l, s, h).unwrap(),
                            ),
                            (
                                device.head_v(l, s, h).unwrap(),
                                host.head_v(l, s, h).unwrap(),
                            ),
                        ] {
                            assert_eq!(max_diff(&x, &y), 0.0, "seq {s} layer {l} head {h}");
                        }
                    }
                }
            }
        }
        // A sequence whose metric is on the host is refused, not evicted from stale data.
        let e = host.evict_on_device(&[DeviceEvict {
            seq: seqs[0],
            n_evict: 1,
            first_protected: 0,
            crush: None,
        }]);
        assert!(e.is_err());
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
