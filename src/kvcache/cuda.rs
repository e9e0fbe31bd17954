//! Host side of kvc's CUDA kernels (`kernels/*.cu`, compiled by `build.rs` into fatbins embedded
//! here): validation on the host, then launches on the candle device's stream, reading and
//! writing candle CUDA tensors in place.
//!
//! Each entry point has a plain-Rust twin in [`super::ops`] with the same contract (the tests'
//! oracle). Without the `cuda` feature every entry point exists and returns
//! [`OpsError::NoCuda`] (feature flags stub, never fork call sites).
//!
//! Entry points:
//! - [`write_kv`]: new K/V rows into their slots (+ metric 0 and position when given);
//! - [`paged_decode`]: paged decode attention over per-(row, kv-head) block tables, GQA groups in
//!   one CUDA block, partitioned (split-K) when [`DecodeWorkspace`] says so, writing the softmax
//!   probabilities per slot and adding the KV-Compress decode metric when given;
//! - [`prefill_attention`]: flash-style prefill attention (tensor cores, online softmax; the
//!   scores never reach memory);
//! - [`prefill_softmax`]: prefill attention's scale + causal mask + softmax in one pass (the
//!   observation window's f32 probabilities on the side; the unfused path, and the probed
//!   queries of the flash one);
//! - [`move_slots`]: a compaction move plan (K, V, metric, position);
//! - [`kvcompress_evict_batch`]: KV-Compress's whole eviction step for a batch of sequences on
//!   the device (per-head sort, candidate scoring, selection per sequence, KVCrush's block-form
//!   picks where asked, compaction); only block tables and lengths go up and per-head counts
//!   and lengths come back ([`super::paged::PagedCache::evict_on_device`]).
//!
//! Departure from the paper's implementation: block tables are built on the host by
//! [`super::blocks::BlockPool`] and uploaded (the blocks in use, a few KB per sequence).
use super::step_tables::LayerViews;
use candle_core::{DType, Device, Result, Tensor};

use super::ops::{
    check_block_copies, check_meta_set, check_moves, check_write, DecodeShape, EvictSeq, EvictStep,
    HeadTables, OpsError, SoftmaxShape,
};

/// Head dims the decode kernel is instantiated for (others use candle ops).
pub const DECODE_HEAD_DIMS: [usize; 2] = [64, 128];
/// Largest GQA group the decode kernel handles in one CUDA block.
pub const DECODE_MAX_GROUP: usize = 16;

/// Whether this build has the CUDA kernels.
pub fn available() -> bool {
    cfg!(feature = "cuda")
}

/// Free and total bytes of `device`'s memory (CUDA: the driver's `cuMemGetInfo`, which sees
/// every allocation on the GPU, candle's included); `None` on the CPU or without the `cuda`
/// feature.
pub fn device_memory(device: &Device) -> Result<Option<(u64, u64)>> {
    imp::device_memory(device)
}

/// Open CUDA device `ordinal` for kvc: candle's device, with
/// - the device's stream-ordered memory pool told to keep freed memory
///   (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` = max). candle allocates every op's output with
///   `cuMemAllocAsync` and frees it with `cuMemFreeAsync`; with the default threshold of 0 the
///   pool hands all free memory back to the OS at every synchronisation (a decode step has
///   several), so the next step's allocations map fresh pages again, a host cost that grows
///   with the batch's activations and scratch;
/// - cudarc's per-allocation event tracking off (two CUDA events created and destroyed per
///   tensor): kvc runs all work on candle's one stream, where the events are never used.
///
/// Errors name the device. Without the `cuda` feature: [`OpsError::NoCuda`].
pub fn open_device(ordinal: usize) -> Result<Device> {
    imp::open_device(ordinal)
}

/// Whether [`paged_decode`] supports this dtype / head dim / group (and the build has CUDA).
pub fn decode_supported(dtype: DType, head_dim: usize, group: usize) -> bool {
    available()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && DECODE_HEAD_DIMS.contains(&head_dim)
        && (1..=DECODE_MAX_GROUP).contains(&group)
}

/// Block tables and context lengths of a decode call, validated and on the device.
pub struct DeviceTables {
    /// The shape they were checked against.
    pub shape: DecodeShape,
    /// u32 block ids: row `r`'s blocks start at `table_start[r]`.
    pub block_tables: Tensor,
    /// `[batch, num_kv_heads]` u32.
    pub ctx_lens: Tensor,
    /// `[batch * num_kv_heads]` u32: where each row's blocks start in `block_tables`
    /// (`r * max_blocks` for a padded table, back to back for [`Self::upload_heads`]).
    pub table_start: Tensor,
    /// Longest context length.
    pub max_len: usize,
    /// Whether no block is shared by two rows was checked.
    disjoint: bool,
}

impl DeviceTables {
    /// Check a padded `block_tables` `[batch, num_kv_heads, max_blocks]` and `ctx_lens`
    /// against `shape` (see [`DecodeShape::check`]) and upload. Use [`Self::upload_disjoint`]
    /// when the call adds the metric.
    pub fn upload(
        shape: DecodeShape,
        block_tables: &[u32],
        ctx_lens: &[u32],
        device: &Device,
    ) -> Result<Self> {
        shape.check(block_tables, ctx_lens)?;
        Self::upload_padded(shape, block_tables, ctx_lens, device, false)
    }

    /// As [`Self::upload`], also checking that no block is shared by two rows
    /// ([`DecodeShape::check_disjoint`]): required for a decode call that adds the metric.
    pub fn upload_disjoint(
        shape: DecodeShape,
        block_tables: &[u32],
        ctx_lens: &[u32],
        device: &Device,
    ) -> Result<Self> {
        shape.check_disjoint(block_tables, ctx_lens)?;
        Self::upload_padded(shape, block_tables, ctx_lens, device, true)
    }

    /// The rows' blocks back to back (only the blocks in use go up: a padded table of a batch
    /// with one long head is mostly padding), checked against `shape`
    /// ([`DecodeShape::check_heads`]; `disjoint`: also that no block is shared, required for a
    /// call that adds the metric).
    pub fn upload_heads(
        shape: DecodeShape,
        tables: &HeadTables,
        device: &Device,
        disjoint: bool,
    ) -> Result<Self> {
        shape.check_heads(tables, disjoint)?;
        let blocks = tables.upload_blocks();
        let rows = tables.heads();
        Ok(DeviceTables {
            disjoint,
            shape,
            block_tables: Tensor::from_slice(blocks, blocks.len(), device)?,
            ctx_lens: Tensor::from_slice(&tables.lens, rows, device)?,
            table_start: Tensor::from_slice(&tables.start[..rows], rows, device)?,
            max_len: tables.lens.iter().copied().max().unwrap_or(0) as usize,
        })
    }

    /// The views of one layer of a decode step's device tables ([`StepTables`], built from
    /// the pool and checked for range and overlap when they were built), checked against
    /// `shape`'s rows and context cap.
    ///
    /// [`StepTables`]: super::step_tables::StepTables
    pub fn from_step(shape: DecodeShape, views: LayerViews) -> Result<Self> {
        let rows = shape.batch * shape.num_kv_heads;
        let cap = shape.ctx_cap();
        if views.starts.dims() != [rows] || views.lens.dims() != [rows] || views.max_len > cap {
            return Err(OpsError::Shape(format!(
                "step tables of {:?} rows, longest {} tokens, for a decode call of {rows} rows capped at {cap} ({shape:?})",
                views.starts.dims(),
                views.max_len
            ))
            .into());
        }
        Ok(DeviceTables {
            disjoint: true,
            shape,
            block_tables: views.blocks,
            ctx_lens: views.lens,
            table_start: views.starts,
            max_len: views.max_len,
        })
    }

    fn upload_padded(
        shape: DecodeShape,
        block_tables: &[u32],
        ctx_lens: &[u32],
        device: &Device,
        disjoint: bool,
    ) -> Result<Self> {
        let rows = shape.batch * shape.num_kv_heads;
        let start: Vec<u32> = (0..rows).map(|r| (r * shape.max_blocks) as u32).collect();
        Ok(DeviceTables {
            disjoint,
            shape,
            block_tables: Tensor::from_slice(block_tables, block_tables.len(), device)?,
            ctx_lens: Tensor::from_slice(ctx_lens, rows, device)?,
            table_start: Tensor::from_slice(&start, rows, device)?,
            max_len: ctx_lens.iter().copied().max().unwrap_or(0) as usize,
        })
    }
}

/// How the decode kernel keeps K/V loads in flight (`kernels/paged_attention.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodePipeline {
    /// Each lane loads several keys into registers, then consumes them.
    Registers,
    /// Each warp streams keys through shared-memory stages with `cp.async` (sm_80+), several
    /// stages in flight while one is consumed. The default.
    Async,
}

/// Dynamic shared memory of the async decode kernel: 4 warps x 4 stages x (K + V) x 4 keys per
/// lane x 32 lanes x 8 elements (`ASYNC_STAGES`, `ASYNC_U` in the kernel).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn async_stage_bytes(head_dim: usize, dtype: DType) -> usize {
    let keys_per_stage = (32 / (head_dim / 8)) * 4;
    4 * 4 * 2 * keys_per_stage * head_dim * dtype.size_in_bytes()
}

/// Scratch of a decode call: scores/probabilities and the partitions' softmax states.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct DecodeWorkspace {
    /// `[batch, n_heads, probs_stride]` f32: scores, then probabilities.
    pub probs: Tensor,
    /// `[batch, n_heads, num_parts]` f32.
    part_max: Tensor,
    /// `[batch, n_heads, num_parts]` f32.
    part_sum: Tensor,
    /// `[batch, n_heads, num_parts, head_dim]` f32.
    part_out: Tensor,
    /// Slots per partition.
    pub part_slots: usize,
    /// Partitions per head.
    pub num_parts: usize,
    /// Load pipeline of the decode kernel ([`DecodePipeline::Async`] unless set).
    pub pipeline: DecodePipeline,
}

/// Slots per partition of the split-K decode kernel unless a caller sets it.
pub const PART_SLOTS: usize = 2048;

/// Default partition size for the async decode kernel: [`PART_SLOTS`] (a single partition for
/// contexts up to it). Fixed, so that a row's attention (which slots each partial softmax
/// sums, then the merge) does not depend on the other rows of its batch: sized from the batch
/// (about 1024 CUDA blocks in all), it doubled to 4096 slots when `full`'s 8k-token rows joined
/// a sweep's batch, and the bf16 outputs of the other rows' long contexts changed (30 % of
/// rate-2 predictions on the H200, 2026-12-02). Partitions shorter than 2048 slots lost 5–15 %
/// at batch 64 x 4096 and batch 2 x 32768 (`docs/results/sweep-speed-vs-transformers/decode-kernel-fused-prefill-softmax/`); at
/// both shapes 2048 was the measured best or near-best row.
pub fn default_part_slots(_shape: &DecodeShape, max_len: usize) -> usize {
    PART_SLOTS.min(max_len).max(1)
}

impl DecodeWorkspace {
    /// Whether this scratch serves a call of `shape` with contexts up to `max_len` (with the
    /// default partitions).
    pub fn fits(&self, shape: &DecodeShape, max_len: usize) -> bool {
        self.probs.dims() == [shape.batch, shape.n_heads(), shape.probs_stride]
            && self.part_slots == default_part_slots(shape, max_len).max(1)
            && self.num_parts == max_len.div_ceil(self.part_slots).max(1)
            && self.part_out.dim(3).ok() == Some(shape.head_dim)
    }

    /// Scratch for `shape` with contexts up to `max_len`, partitions of `part_slots` slots
    /// (`None`: [`default_part_slots`]).
    pub fn new(
        shape: &DecodeShape,
        max_len: usize,
        part_slots: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        Self::filled(shape, max_len, part_slots, device, 0.0)
    }

    /// As [`Self::new`] with every scratch element set to `value` (tests poison it with NaN:
    /// the kernels must write everything they read).
    pub fn filled(
        shape: &DecodeShape,
        max_len: usize,
        part_slots: Option<usize>,
        device: &Device,
        value: f32,
    ) -> Result<Self> {
        let part_slots = part_slots
            .unwrap_or_else(|| default_part_slots(shape, max_len))
            .max(1);
        let num_parts = max_len.div_ceil(part_slots).max(1);
        let (b, nh, d) = (shape.batch, shape.n_heads(), shape.head_dim);
        let z = |s: &[usize]| Tensor::full(value, s, device);
        Ok(DecodeWorkspace {
            probs: z(&[b, nh, shape.probs_stride])?,
            part_max: z(&[b, nh, num_parts])?,
            part_sum: z(&[b, nh, num_parts])?,
            part_out: z(&[b, nh, num_parts, d])?,
            part_slots,
            num_parts,
            pipeline: DecodePipeline::Async,
        })
    }
}

fn check_cache(k_cache: &Tensor, v_cache: &Tensor, head_dim: usize) -> Result<usize> {
    let (n, d) = k_cache.dims2()?;
    if d != head_dim || v_cache.dims() != k_cache.dims() || v_cache.dtype() != k_cache.dtype() {
        return Err(OpsError::Shape(format!(
            "K/V caches must both be [num_slots, {head_dim}] of one dtype, got K {:?} {:?} / V {:?} {:?}",
            k_cache.dims(),
            k_cache.dtype(),
            v_cache.dims(),
            v_cache.dtype()
        ))
        .into());
    }
    Ok(n)
}

fn check_meta(metric: Option<&Tensor>, position: Option<&Tensor>, num_slots: usize) -> Result<()> {
    for (t, dt, what) in [
        (metric, DType::F32, "metric"),
        (position, DType::U32, "position"),
    ] {
        if let Some(t) = t {
            if t.dims() != [num_slots] || t.dtype() != dt {
                return Err(OpsError::Shape(format!(
                    "{what} must be [{num_slots}] {dt:?}, got {:?} {:?}",
                    t.dims(),
                    t.dtype()
                ))
                .into());
            }
        }
    }
    Ok(())
}

/// Write `k_new`/`v_new` `[n, head_dim]` into rows `slots` of `k_cache`/`v_cache`
/// `[num_slots, head_dim]` (in place); when given, set `metric[slot] = 0` and
/// `position[slot] = positions[i]`. Twin: [`super::ops::write_kv`].
#[allow(clippy::too_many_arguments)]
pub fn write_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: Option<&Tensor>,
    position: Option<&Tensor>,
    k_new: &Tensor,
    v_new: &Tensor,
    slots: &[u32],
    positions: &[u32],
) -> Result<()> {
    let num_slots = check_new_rows(k_cache, v_cache, metric, position, k_new, v_new)?;
    check_write(
        num_slots,
        k_new.dim(1)?,
        k_new.elem_count(),
        slots,
        positions,
    )?;
    if slots.is_empty() {
        return Ok(());
    }
    let dev = k_cache.device();
    let s = Tensor::from_slice(slots, slots.len(), dev)?;
    let p = Tensor::from_slice(positions, positions.len(), dev)?;
    imp::write_kv(
        k_cache,
        v_cache,
        metric,
        position,
        &k_new.contiguous()?,
        &v_new.contiguous()?,
        &s,
        &p,
    )
}

/// The caches, metadata and new rows of a K/V write agree (shapes, dtypes); returns the
/// cache's slots.
fn check_new_rows(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: Option<&Tensor>,
    position: Option<&Tensor>,
    k_new: &Tensor,
    v_new: &Tensor,
) -> Result<usize> {
    let d = k_new.dim(1)?;
    let num_slots = check_cache(k_cache, v_cache, d)?;
    check_meta(metric, position, num_slots)?;
    if k_new.dims() != v_new.dims() || k_new.dtype() != k_cache.dtype() {
        return Err(OpsError::Shape(format!(
            "k_new/v_new must be [n, {d}] {:?}, got {:?} / {:?}",
            k_cache.dtype(),
            k_new.dims(),
            v_new.dims()
        ))
        .into());
    }
    Ok(num_slots)
}

/// [`write_kv`] with the slots and positions already on the device (`[n]` u32 each, from a
/// decode step's upload: the pool handed the slots out, so they are in range and distinct).
#[allow(clippy::too_many_arguments)]
pub fn write_kv_at(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: Option<&Tensor>,
    position: Option<&Tensor>,
    k_new: &Tensor,
    v_new: &Tensor,
    slots: &Tensor,
    positions: &Tensor,
) -> Result<()> {
    check_new_rows(k_cache, v_cache, metric, position, k_new, v_new)?;
    let (n, _) = k_new.dims2()?;
    for (t, what) in [(slots, "slots"), (positions, "positions")] {
        if t.dims() != [n] || t.dtype() != DType::U32 {
            return Err(OpsError::Shape(format!(
                "{what} must be [{n}] u32 (one per new row), got {:?} {:?}",
                t.dims(),
                t.dtype()
            ))
            .into());
        }
    }
    if n == 0 {
        return Ok(());
    }
    imp::write_kv(
        k_cache,
        v_cache,
        metric,
        position,
        &k_new.contiguous()?,
        &v_new.contiguous()?,
        slots,
        positions,
    )
}

/// Copy K, V (and metric, position when given) of slot `from[i]` to slot `to[i]`, in place;
/// `from ∪ to` must be distinct. Twin: [`super::ops::move_slots`].
pub fn move_slots(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: Option<&Tensor>,
    position: Option<&Tensor>,
    from: &[u32],
    to: &[u32],
) -> Result<()> {
    let num_slots = check_cache(k_cache, v_cache, k_cache.dim(1)?)?;
    check_meta(metric, position, num_slots)?;
    check_moves(num_slots, from, to)?;
    if from.is_empty() {
        return Ok(());
    }
    let dev = k_cache.device();
    let f = Tensor::from_slice(from, from.len(), dev)?;
    let t = Tensor::from_slice(to, to.len(), dev)?;
    imp::move_slots(k_cache, v_cache, metric, position, &f, &t)
}

/// Copy whole blocks on the device (twin: [`super::ops::copy_blocks`]): block `to[i]` gets
/// block `from[i]`'s K and V rows and, when given, its metrics and positions. What a fork into
/// new blocks needs: one id per block instead of one per slot.
pub fn copy_blocks(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: Option<&Tensor>,
    position: Option<&Tensor>,
    from: &[u32],
    to: &[u32],
    block_size: usize,
) -> Result<()> {
    let num_slots = check_cache(k_cache, v_cache, k_cache.dim(1)?)?;
    check_meta(metric, position, num_slots)?;
    check_block_copies(num_slots, block_size, from, to)?;
    if from.is_empty() {
        return Ok(());
    }
    let row_words = row_words(k_cache, "copy_blocks")?;
    let dev = k_cache.device();
    let f = Tensor::from_slice(from, from.len(), dev)?;
    let t = Tensor::from_slice(to, to.len(), dev)?;
    imp::copy_blocks(
        k_cache, v_cache, metric, position, &f, &t, block_size, row_words,
    )
}

/// 4-byte words per K/V row of `cache` (the block copy and gather kernels move words).
fn row_words(cache: &Tensor, what: &str) -> Result<usize> {
    let row_bytes = cache.dim(1)? * cache.dtype().size_in_bytes();
    if row_bytes % 4 != 0 {
        return Err(OpsError::Shape(format!(
            "{what}: K/V rows of {row_bytes} B (need a multiple of 4)"
        ))
        .into());
    }
    Ok(row_bytes / 4)
}

/// Rows `idx` (`[n]` u32, each below `num_slots`, on the cache's device) of the K and V caches
/// `[num_slots, head_dim]`: `[n, head_dim]` each. On CUDA a kernel with 64-bit offsets (candle's
/// `index_select` wraps its offsets at 2^32 elements, which a large pool passes); elsewhere
/// `index_select`, the twin. `max_slot`: the largest id of `idx`, checked against the cache.
pub fn gather_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    idx: &Tensor,
    max_slot: Option<u32>,
) -> Result<(Tensor, Tensor)> {
    let (num_slots, d) = k_cache.dims2()?;
    check_cache(k_cache, v_cache, d)?;
    let n = idx.dims1()?;
    if idx.dtype() != DType::U32 || max_slot.is_some_and(|m| m as usize >= num_slots) {
        return Err(OpsError::Shape(format!(
            "gather_kv: [n] u32 ids below {num_slots}, got {:?} {:?} (max {max_slot:?})",
            idx.dims(),
            idx.dtype()
        ))
        .into());
    }
    if !k_cache.device().is_cuda() || n == 0 {
        return Ok((k_cache.index_select(idx, 0)?, v_cache.index_select(idx, 0)?));
    }
    let words = row_words(k_cache, "gather_kv")?;
    let k = Tensor::zeros((n, d), k_cache.dtype(), k_cache.device())?;
    let v = Tensor::zeros((n, d), k_cache.dtype(), k_cache.device())?;
    imp::gather_kv(&k, &v, k_cache, v_cache, idx, words)?;
    Ok((k, v))
}

/// Set `metric[slots[i]] = m[i]` and `position[slots[i]] = p[i]` on the device (twin:
/// [`super::ops::set_meta`]): one thread per slot, where candle's `scatter_set` of a 1-D
/// tensor runs its index list in a single thread.
pub fn set_meta(
    metric: &Tensor,
    position: &Tensor,
    slots: &[u32],
    m: &[f32],
    p: &[u32],
) -> Result<()> {
    let num_slots = metric.dim(0)?;
    check_meta(Some(metric), Some(position), num_slots)?;
    check_meta_set(num_slots, position.dim(0)?, slots, m, p)?;
    if slots.is_empty() {
        return Ok(());
    }
    let dev = metric.device();
    let n = slots.len();
    imp::set_meta(
        metric,
        position,
        &Tensor::from_slice(slots, n, dev)?,
        &Tensor::from_slice(m, n, dev)?,
        &Tensor::from_slice(p, n, dev)?,
    )
}

/// `dst[idx[i]] = val[i]` for a 1-D u32 `dst` (idx distinct, below `dst.len()`): one thread
/// per element on CUDA, where candle's `scatter_set` of a 1-D tensor runs the whole list in one
/// thread; candle's `scatter_set` elsewhere (the twin).
pub fn scatter_u32(dst: &Tensor, idx: &Tensor, val: &Tensor) -> Result<()> {
    let n = idx.dims1()?;
    let dst_len = dst.dims1()?;
    for (t, what) in [(dst, "dst"), (idx, "idx"), (val, "val")] {
        if t.dtype() != DType::U32 {
            return Err(OpsError::Shape(format!("scatter_u32: {what} must be u32")).into());
        }
    }
    if val.dims1()? != n || dst_len > u32::MAX as usize {
        return Err(OpsError::Shape(format!(
            "scatter_u32: {n} indices, {} values, {dst_len} destinations",
            val.dims1()?
        ))
        .into());
    }
    if n == 0 {
        return Ok(());
    }
    if !dst.device().is_cuda() {
        return dst.scatter_set(idx, val, 0);
    }
    imp::scatter_u32(dst, &idx.contiguous()?, &val.contiguous()?, dst_len as u32)
}

/// The settings of [`window_score`] (the method's `ScoreSpec`, in the kernel's terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowScoreArgs {
    /// Query heads per kv-head.
    pub group: usize,
    /// Sum `p^2` (L2) instead of `p` (L1) over the probed queries.
    pub squared: bool,
    /// Pooling kernel along the slot axis (<= 1: none).
    pub pool_k: usize,
    /// Max pooling (else average, counting the padding).
    pub pool_max: bool,
    /// Slots at the end of each head left unpooled.
    pub pool_skip_last: usize,
}

/// Threads (slots) per block of `window_score` (`WS_TILE` in `kernels/score.cu`).
const WS_TILE: usize = 256;

/// The window scorer on the device (`kernels/score.cu`; twin:
/// `compress::score::window_score_twin`): from `probs` `[kv_heads * group, probed, max_len]`
/// f32 (any leading dims of 1) and each kv-head's slot count `lens` (<= max_len), the scores
/// `[kv_heads, max_len]` f32 (zero past each head's length): summed (or squared and summed)
/// over the probed queries, pooled along the slots, summed over the group.
pub fn window_score(probs: &Tensor, lens: &[usize], a: &WindowScoreArgs) -> Result<Tensor> {
    let dims = probs.dims();
    let (nh, probed, max_len) = match dims.len() {
        3 => (dims[0], dims[1], dims[2]),
        4 if dims[0] == 1 => (dims[1], dims[2], dims[3]),
        _ => {
            return Err(OpsError::Shape(format!(
                "window_score: probs must be [heads, probed, max_len], got {dims:?}"
            ))
            .into())
        }
    };
    let nkv = lens.len();
    if a.group == 0 || nh != nkv * a.group || probs.dtype() != DType::F32 {
        return Err(OpsError::Shape(format!(
            "window_score: {nh} f32 query heads for {nkv} kv-heads of group {}, got {:?}",
            a.group,
            probs.dtype()
        ))
        .into());
    }
    if let Some(l) = lens.iter().find(|&&l| l > max_len) {
        return Err(OpsError::Shape(format!(
            "window_score: a head of {l} slots in probabilities of {max_len}"
        ))
        .into());
    }
    if max_len > i32::MAX as usize || probed > i32::MAX as usize {
        return Err(OpsError::Shape(format!(
            "window_score: {probed} probed queries x {max_len} slots is too many"
        ))
        .into());
    }
    let span = WS_TILE + if a.pool_k > 1 { a.pool_k } else { 0 };
    let shared = span * a.group * 4;
    if shared > 48 * 1024 {
        return Err(OpsError::Shape(format!(
            "window_score: pooling kernel {} over groups of {} needs {shared} B of shared memory (48 KiB at most)",
            a.pool_k, a.group
        ))
        .into());
    }
    let dev = probs.device();
    if nkv == 0 || max_len == 0 || probed == 0 {
        return Tensor::zeros((nkv, max_len), DType::F32, dev);
    }
    let probs = probs.contiguous()?;
    let lens: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
    let lens = Tensor::from_vec(lens, nkv, dev)?;
    // Safety: the kernel writes every element of out (every column of every kv-head row).
    let out = unsafe { Tensor::empty((nkv, max_len), DType::F32, dev)? };
    imp::window_score(&out, &probs, &lens, a, probed, max_len, shared)?;
    Ok(out)
}

/// Paged decode attention (twin: [`super::ops::paged_decode`]): `q` `[batch, n_heads, head_dim]`
/// over `k_cache`/`v_cache` `[num_slots, head_dim]` through `tables`; writes `out`
/// `[batch, n_heads, head_dim]` (q's dtype) and, with `write_probs`, the probabilities into
/// `ws.probs` `[batch, n_heads, probs_stride]` (zero beyond each head's length); with `metric`
/// `[num_slots]` f32, adds `sum over the group of p^2` per slot. Nothing is allocated: this is
/// what the benchmark times.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_into(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tables: &DeviceTables,
    ws: &DecodeWorkspace,
    out: &Tensor,
    scale: f32,
    metric: Option<&Tensor>,
    write_probs: bool,
) -> Result<()> {
    let s = &tables.shape;
    let num_slots = check_cache(k_cache, v_cache, s.head_dim)?;
    check_meta(metric, None, num_slots)?;
    if metric.is_some() && !tables.disjoint {
        return Err(OpsError::Shape(
            "a decode call adding the metric needs tables checked disjoint (DeviceTables::upload_disjoint, or upload_heads with disjoint)"
                .into(),
        )
        .into());
    }
    let want = [s.batch, s.n_heads(), s.head_dim];
    if q.dims() != want || out.dims() != want || q.dtype() != k_cache.dtype() {
        return Err(OpsError::Shape(format!(
            "q and out must be {want:?} {:?}, got q {:?} {:?}, out {:?}",
            k_cache.dtype(),
            q.dims(),
            q.dtype(),
            out.dims()
        ))
        .into());
    }
    if num_slots != s.num_slots
        || ws.probs.dims() != [s.batch, s.n_heads(), s.probs_stride]
        || ws.num_parts * ws.part_slots < tables.max_len
    {
        return Err(OpsError::Shape(format!(
            "decode workspace / tables do not match the call ({s:?}, {num_slots} slots, {} parts of {})",
            ws.num_parts, ws.part_slots
        ))
        .into());
    }
    if !decode_supported(q.dtype(), s.head_dim, s.group) {
        return Err(if available() {
            OpsError::Shape(format!(
                "paged decode kernel: dtype {:?}, head dim {} (supported {DECODE_HEAD_DIMS:?}), group {} (max {DECODE_MAX_GROUP}) not supported",
                q.dtype(),
                s.head_dim,
                s.group
            ))
        } else {
            OpsError::NoCuda
        }
        .into());
    }
    imp::paged_decode(
        q,
        k_cache,
        v_cache,
        tables,
        ws,
        out,
        scale,
        metric,
        write_probs,
    )
}

/// [`paged_decode_into`] allocating its output and scratch: returns the output
/// `[batch, n_heads, head_dim]` and, with `want_probs`, the probabilities
/// `[batch, n_heads, probs_stride]` f32.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tables: &DeviceTables,
    scale: f32,
    metric: Option<&Tensor>,
    want_probs: bool,
    part_slots: Option<usize>,
) -> Result<(Tensor, Option<Tensor>)> {
    let ws = DecodeWorkspace::new(&tables.shape, tables.max_len, part_slots, q.device())?;
    let out = Tensor::zeros(q.dims(), q.dtype(), q.device())?;
    paged_decode_into(
        q, k_cache, v_cache, tables, &ws, &out, scale, metric, want_probs,
    )?;
    Ok((out, want_probs.then_some(ws.probs)))
}

/// Whether [`prefill_softmax`] supports this dtype (and the build has CUDA).
pub fn prefill_softmax_supported(dtype: DType) -> bool {
    available() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Prefill attention's softmax on the device (`kernels/prefill_softmax.cu`; twin
/// [`super::ops::prefill_softmax`]): scale, causal mask from `key_pos` `[kv_heads, n]` u32 (u32::MAX:
/// padding), softmax in f32, in one pass. `att` holds `shape.rows()` rows of `shape.n` raw
/// scores `q . k` in the compute dtype (contiguous, e.g. `[1, kv_heads, group * t, n]`). Returns
/// the probabilities in `att`'s dtype and shape, and the f32 probabilities of the last
/// `shape.probed` queries of every query head `[kv_heads * group, probed, n]` (`None` when
/// `probed` is 0).
pub fn prefill_softmax(
    att: &Tensor,
    key_pos: &Tensor,
    shape: &SoftmaxShape,
    q_start: u32,
    scale: f32,
) -> Result<(Tensor, Option<Tensor>)> {
    shape.check(att.elem_count(), key_pos.elem_count())?;
    if key_pos.dtype() != DType::U32 {
        return Err(
            OpsError::Shape(format!("key_pos must be u32, got {:?}", key_pos.dtype())).into(),
        );
    }
    if shape.rows() > i32::MAX as usize || shape.n > i32::MAX as usize {
        return Err(OpsError::Shape(format!(
            "{} rows of {} keys is too many",
            shape.rows(),
            shape.n
        ))
        .into());
    }
    let att = att.contiguous()?;
    let key_pos = key_pos.contiguous()?;
    let dev = att.device();
    // Safety: the kernel writes every element of both outputs (every row's n columns; every
    // probed row is the last `probed` queries of one query head).
    let p = unsafe { Tensor::empty(att.shape(), att.dtype(), dev)? };
    let probs = if shape.probed > 0 {
        let sh = (shape.kv_heads * shape.group, shape.probed, shape.n);
        Some(unsafe { Tensor::empty(sh, DType::F32, dev)? })
    } else {
        None
    };
    if shape.rows() > 0 && shape.n > 0 {
        imp::prefill_softmax(&p, probs.as_ref(), &att, &key_pos, shape, q_start, scale)?;
    }
    Ok((p, probs))
}

/// Head dims [`prefill_attention`] is instantiated for.
pub const PREFILL_FLASH_HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether [`prefill_attention`] supports this dtype and head dim (and the build has CUDA):
/// bf16 and f16 (tensor cores), head dims 64 and 128. Others take the unfused path (candle
/// matmuls around [`prefill_softmax`]).
pub fn prefill_attention_supported(dtype: DType, head_dim: usize) -> bool {
    available()
        && matches!(dtype, DType::BF16 | DType::F16)
        && PREFILL_FLASH_HEAD_DIMS.contains(&head_dim)
}

/// Flash-style prefill attention on the device (`kernels/prefill_attention.cu`; twin
/// [`super::ops::prefill_attention`]): `q` `[.., kv_heads, group * t, head_dim]` (query heads of
/// a kv-head adjacent, i.e. `[1, heads, t, head_dim]`), `k`, `v` `[.., kv_heads, n, head_dim]`,
/// `key_pos` `[kv_heads, n]` u32 (u32::MAX: padding, its K/V never read), query `i` at position
/// `q_start + i`. Returns the attention output in `q`'s shape and dtype; the scores never exist
/// in memory, so no probabilities come back (`shape.probed` must be 0: the caller scores the
/// probed queries with [`prefill_softmax`]).
pub fn prefill_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_pos: &Tensor,
    shape: &SoftmaxShape,
    q_start: u32,
    scale: f32,
) -> Result<Tensor> {
    let d = *q.dims().last().unwrap_or(&0);
    let bad = |m: String| -> Result<Tensor> {
        Err(OpsError::Shape(format!("prefill_attention: {m}")).into())
    };
    if !prefill_attention_supported(q.dtype(), d) {
        return bad(format!(
            "{:?} head dim {d} (bf16/f16, head dim 64/128 only)",
            q.dtype()
        ));
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() || key_pos.dtype() != DType::U32 {
        return bad(format!(
            "dtypes q {:?} k {:?} v {:?} key_pos {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype(),
            key_pos.dtype()
        ));
    }
    if shape.probed != 0 {
        return bad("no probabilities here: probe with prefill_softmax".into());
    }
    let s = shape;
    let kv = s.kv_heads * s.n * d;
    if q.elem_count() != s.rows() * d
        || k.elem_count() != kv
        || v.elem_count() != kv
        || key_pos.elem_count() != s.kv_heads * s.n
    {
        return bad(format!(
            "shape {s:?} x {d} against q {:?} k {:?} v {:?} key_pos {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            key_pos.dims()
        ));
    }
    if s.rows() > i32::MAX as usize || s.n > i32::MAX as usize || s.kv_heads * s.group > 65535 {
        return bad(format!("{s:?} is too large"));
    }
    let (q, k, v, key_pos) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        key_pos.contiguous()?,
    );
    // Safety: the kernel writes every row of the output (row i of every query head).
    let out = unsafe { Tensor::empty(q.shape(), q.dtype(), q.device())? };
    if s.rows() > 0 {
        imp::prefill_attention(&out, &q, &k, &v, &key_pos, s, q_start, scale)?;
    }
    Ok(out)
}

/// Longest head [`kvcompress_evict`] sorts in shared memory (128 KiB of keys on an H100).
pub const EVICT_MAX_LEN: usize = 16384;
/// Longest sorted prefix `kvc_sort_prefix` selects (`PREFIX_MAX` in kernels/evict.cu).
const EVICT_PREFIX_MAX: usize = 512;

/// KV-Compress's eviction step for one sequence on the device: [`kvcompress_evict_batch`]
/// with one sequence owning every row of `block_tables` `[heads, max_blocks]` and `ctx_lens`
/// `[heads]` (all layers x kv-heads).
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    block_tables: &[u32],
    ctx_lens: &[u32],
    block_size: usize,
    first_protected: u32,
    n_evict: usize,
) -> Result<EvictStep> {
    let seq = EvictSeq {
        heads: ctx_lens.len(),
        kv_heads: ctx_lens.len(),
        first_protected,
        n_evict,
        crush: None,
    };
    let max_blocks = block_tables.len() / ctx_lens.len().max(1);
    let tables = HeadTables::from_padded(block_tables, ctx_lens, max_blocks, block_size);
    let mut steps = kvcompress_evict_batch(
        k_cache,
        v_cache,
        metric,
        position,
        &tables,
        &[seq],
        block_size,
    )?;
    Ok(steps.pop().expect("one sequence"))
}

/// KV-Compress's eviction step for several sequences on the device (twin:
/// [`super::ops::kvcompress_evict_batch`]): sequence `i` owns the next `seqs[i].heads` heads of
/// `tables`; its slots with `position >= first_protected` are never evicted and `n_evict`
/// blocks are taken over its heads; with `crush`, KVCrush's block form keeps its groups out of
/// the evictions (`kvc_crush_pick`: block size <= [`CRUSH_MAX_BLOCK`], layers of at most
/// [`CRUSH_MAX_KV_HEADS`] kv-heads, the same `kv_heads` for every sequence). Moves K, V,
/// `metric` `[num_slots]` f32 and `position` `[num_slots]` u32 in place; returns each sequence's per-head counts and new lengths (the
/// only data coming back). Three launches whatever the number of sequences; what goes up is
/// the blocks in use (not a table padded to the longest head) and a few numbers per head.
pub fn kvcompress_evict_batch(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    tables: &HeadTables,
    seqs: &[EvictSeq],
    block_size: usize,
) -> Result<Vec<EvictStep>> {
    let heads = tables.heads();
    tables.check_disjoint(block_size, k_cache.dim(0)?)?;
    let blocks = tables.upload_blocks();
    let blocks = Tensor::from_slice(blocks, blocks.len(), k_cache.device())?;
    let heads_at = HeadsAt {
        blocks: &blocks,
        tab: &tables.start[..heads],
        start: &tables.start,
        lens: &tables.lens,
    };
    evict_heads(
        k_cache, v_cache, metric, position, &heads_at, seqs, block_size,
    )
}

/// [`kvcompress_evict_batch`] on block tables already on the device: head `h`'s table is
/// `blocks[tab[h]..]`, `lens[h]` tokens (a decode batch's
/// [`super::step_tables::StepTables`], which checked its ids for range and overlap when it
/// built them and takes later ids from the pool). Only `tab`, the lengths and a few numbers
/// per sequence go up: no table is gathered, checked or uploaded per step. Checked here: every
/// head's table lies inside `blocks`.
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict_on_tables(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    blocks: &Tensor,
    tab: &[u32],
    lens: &[u32],
    seqs: &[EvictSeq],
    block_size: usize,
) -> Result<Vec<EvictStep>> {
    let heads = tab.len();
    let table_len = blocks.dims1()?;
    if lens.len() != heads || blocks.dtype() != DType::U32 || block_size == 0 {
        return Err(OpsError::Shape(format!(
            "{heads} table offsets, {} lengths, {:?} blocks, block size {block_size}",
            lens.len(),
            blocks.dtype()
        ))
        .into());
    }
    let mut start = Vec::with_capacity(heads + 1);
    start.push(0u32);
    for (h, (&t, &l)) in tab.iter().zip(lens).enumerate() {
        let n = (l as usize).div_ceil(block_size);
        if t as usize + n > table_len {
            return Err(OpsError::Shape(format!(
                "head {h}: {n} blocks at {t} pass the {table_len} of the device table"
            ))
            .into());
        }
        start.push(start[h] + n as u32);
    }
    let heads_at = HeadsAt {
        blocks,
        tab,
        start: &start,
        lens,
    };
    evict_heads(
        k_cache, v_cache, metric, position, &heads_at, seqs, block_size,
    )
}

/// Where a batched eviction finds its heads: head `h`'s table at `blocks[tab[h]..]`, its
/// outputs at `start[h]..start[h + 1]` (`ceil(lens[h] / block_size)` blocks).
struct HeadsAt<'a> {
    blocks: &'a Tensor,
    tab: &'a [u32],
    start: &'a [u32],
    lens: &'a [u32],
}

/// The launches of [`kvcompress_evict_batch`] once the tables are on the device (the checks
/// both front doors share first).
fn evict_heads(
    k_cache: &Tensor,
    v_cache: &Tensor,
    metric: &Tensor,
    position: &Tensor,
    at: &HeadsAt<'_>,
    seqs: &[EvictSeq],
    block_size: usize,
) -> Result<Vec<EvictStep>> {
    let num_slots = check_cache(k_cache, v_cache, k_cache.dim(1)?)?;
    check_meta(Some(metric), Some(position), num_slots)?;
    let heads = at.lens.len();
    let seq_heads: usize = seqs.iter().map(|s| s.heads).sum();
    if seq_heads != heads {
        return Err(OpsError::Shape(format!(
            "{heads} heads in the tables, {seq_heads} in the sequences"
        ))
        .into());
    }
    let max_len = at.lens.iter().copied().max().unwrap_or(0) as usize;
    if heads == 0 || max_len == 0 || seqs.iter().all(|s| s.n_evict == 0) {
        return Ok(split_steps(seqs, &vec![0; heads], at.lens));
    }
    if max_len > EVICT_MAX_LEN {
        return Err(OpsError::Shape(format!(
            "device eviction sorts heads of at most {EVICT_MAX_LEN} tokens, got {max_len}"
        ))
        .into());
    }
    let dev = k_cache.device();
    let crush = crush_args(seqs, block_size, dev)?;
    // Per head: protected position; per sequence: first head row and blocks to take.
    let mut protect = Vec::with_capacity(heads);
    let mut head_start = Vec::with_capacity(seqs.len() + 1);
    head_start.push(0u32);
    for s in seqs {
        protect.extend(std::iter::repeat_n(s.first_protected, s.heads));
        head_start.push(head_start.last().copied().unwrap_or(0) + s.heads as u32);
    }
    // i64 on the device (candle has no u64), read as unsigned long long by the kernel.
    let n_evict: Vec<i64> = seqs.iter().map(|s| s.n_evict as i64).collect();
    // Sorted slots each head's step needs: n_evict blocks' worth (a head gives at most
    // n_evict blocks), all of them with KVCrush (its median reads the whole order).
    let mut want = Vec::with_capacity(heads);
    for s in seqs {
        let w = match s.crush {
            Some(_) => u32::MAX,
            None => u32::try_from(s.n_evict.saturating_mul(block_size)).unwrap_or(u32::MAX),
        };
        want.extend(std::iter::repeat_n(w, s.heads));
    }
    // Launch each sort only when some head needs it (the kernels' own split, `takes_prefix`
    // in kernels/evict.cu): a decode step's ~17k heads all take the prefix sort, and 17k
    // 1024-thread blocks that return at once still cost their scheduling.
    let prefix = |h: usize| want[h] < at.lens[h] && want[h] as usize <= EVICT_PREFIX_MAX;
    let sort_prefix = (0..heads).any(prefix);
    let sort_full = (0..heads).any(|h| at.lens[h] > 0 && !prefix(h));
    let lens = Tensor::from_slice(at.lens, heads, dev)?;
    let counts = imp::kvcompress_evict(
        k_cache,
        v_cache,
        metric,
        position,
        &EvictArgs {
            blocks: at.blocks,
            tab: &Tensor::from_slice(at.tab, heads, dev)?,
            start: &Tensor::from_slice(at.start, heads + 1, dev)?,
            out_blocks: at.start[heads] as usize,
            lens: &lens,
            protect: &Tensor::from_slice(&protect, heads, dev)?,
            head_start: &Tensor::from_slice(&head_start, seqs.len() + 1, dev)?,
            n_evict: &Tensor::from_slice(&n_evict, seqs.len(), dev)?,
            want: &Tensor::from_slice(&want, heads, dev)?,
            sort_full,
            sort_prefix,
            crush,
        },
        block_size,
        max_len,
    )?;
    Ok(split_steps(
        seqs,
        &counts.to_vec1::<u32>()?,
        &lens.to_vec1::<u32>()?,
    ))
}

/// Longest block KVCrush's device picks take (a group's signature is one u64).
pub const CRUSH_MAX_BLOCK: usize = crate::compress::kvcrush::DEVICE_MAX_BLOCK;
/// Most kv-heads per layer KVCrush's device picks take (`kernels/evict.cu: CRUSH_MAX_HEADS`).
pub const CRUSH_MAX_KV_HEADS: usize = 64;

/// What `kvc_crush_pick` needs, checked and uploaded (`None`: no sequence asks for KVCrush).
fn crush_args(seqs: &[EvictSeq], block_size: usize, dev: &Device) -> Result<Option<CrushArgs>> {
    use crate::compress::kvcrush::anchor_mask;
    let Some(first) = seqs.iter().find(|s| s.crush.is_some()) else {
        return Ok(None);
    };
    let kv_heads = first.kv_heads;
    if block_size > CRUSH_MAX_BLOCK || kv_heads == 0 || kv_heads > CRUSH_MAX_KV_HEADS {
        return Err(OpsError::Shape(format!(
            "KVCrush's device picks take blocks of at most {CRUSH_MAX_BLOCK} tokens and 1..={CRUSH_MAX_KV_HEADS} kv-heads per layer, got {block_size} and {kv_heads}"
        ))
        .into());
    }
    let (mut groups, mut anchor, mut mean) = (vec![], vec![], vec![]);
    let mut layers = 0;
    for s in seqs {
        if s.kv_heads != kv_heads || s.heads % kv_heads != 0 {
            return Err(OpsError::Shape(format!(
                "KVCrush's device picks need every sequence in layers of {kv_heads} kv-heads, got {} heads in layers of {}",
                s.heads, s.kv_heads
            ))
            .into());
        }
        layers = layers.max(s.heads / kv_heads);
        let (g, bits) = match &s.crush {
            Some(p) => (
                p.groups_per_head * kv_heads,
                anchor_mask(p.anchor, block_size, p.seed),
            ),
            None => (0, Some(0)),
        };
        groups.push(
            u32::try_from(g)
                .map_err(|_| OpsError::Shape(format!("KVCrush: {g} groups per layer")))?,
        );
        mean.push(bits.is_none() as u32);
        // i64 on the device (candle has no u64), read as unsigned long long by the kernel.
        anchor.push(bits.unwrap_or(0) as i64);
    }
    let n = seqs.len();
    Ok(Some(CrushArgs {
        groups: Tensor::from_vec(groups, n, dev)?,
        anchor: Tensor::from_vec(anchor, n, dev)?,
        mean: Tensor::from_vec(mean, n, dev)?,
        kv_heads,
        layers,
    }))
}

/// Per-head `counts` and `new_lens` of a batched eviction cut into each sequence's rows.
fn split_steps(seqs: &[EvictSeq], counts: &[u32], new_lens: &[u32]) -> Vec<EvictStep> {
    let mut first = 0;
    seqs.iter()
        .map(|s| {
            let rows = first..first + s.heads;
            first = rows.end;
            EvictStep {
                counts: counts[rows.clone()].to_vec(),
                new_lens: new_lens[rows].to_vec(),
            }
        })
        .collect()
}

/// The device inputs of a batched eviction (see [`kvcompress_evict_batch`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct EvictArgs<'a> {
    /// Block ids: head `h`'s table at `blocks[tab[h]..]`.
    blocks: &'a Tensor,
    /// `[heads]` u32: where each head's table starts in `blocks`.
    tab: &'a Tensor,
    /// `[heads + 1]` u32: where each head's per-block outputs start.
    start: &'a Tensor,
    /// Per-block outputs in all (the last of `start`).
    out_blocks: usize,
    /// `[heads]` u32 (updated in place).
    lens: &'a Tensor,
    /// `[heads]` u32: first protected position.
    protect: &'a Tensor,
    /// `[sequences + 1]` u32: first head row of each sequence.
    head_start: &'a Tensor,
    /// `[sequences]` i64: blocks to take.
    n_evict: &'a Tensor,
    /// `[heads]` u32: sorted slots each head's step needs (`kvc_sort_prefix` takes the heads
    /// that need fewer than they hold).
    want: &'a Tensor,
    /// Whether some head needs `kvc_sort_candidates` / `kvc_sort_prefix`.
    sort_full: bool,
    sort_prefix: bool,
    /// KVCrush's picks (`kvc_crush_pick` runs between the selection and the compaction).
    crush: Option<CrushArgs>,
}

/// The device inputs of KVCrush's picks ([`crush_args`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CrushArgs {
    /// `[sequences]` u32: groups kept per layer (0: no KVCrush).
    groups: Tensor,
    /// `[sequences]` i64: anchor bits (read as u64).
    anchor: Tensor,
    /// `[sequences]` u32: 1 = the anchor is the per-bit majority.
    mean: Tensor,
    /// kv-heads per layer (the same for every sequence).
    kv_heads: usize,
    /// Most layers of a sequence (the launch's grid).
    layers: usize,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

    pub fn device_memory(_: &Device) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }

    pub fn open_device(_: usize) -> Result<Device> {
        Err(OpsError::NoCuda.into())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn write_kv(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    pub fn move_slots(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    pub fn set_meta(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    pub fn scatter_u32(_: &Tensor, _: &Tensor, _: &Tensor, _: u32) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    pub fn gather_kv(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_blocks(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    pub fn window_score(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &WindowScoreArgs,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    pub fn prefill_softmax(
        _: &Tensor,
        _: Option<&Tensor>,
        _: &Tensor,
        _: &Tensor,
        _: &SoftmaxShape,
        _: u32,
        _: f32,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &SoftmaxShape,
        _: u32,
        _: f32,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &DeviceTables,
        _: &DecodeWorkspace,
        _: &Tensor,
        _: f32,
        _: Option<&Tensor>,
        _: bool,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }

    pub fn kvcompress_evict(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &EvictArgs<'_>,
        _: usize,
        _: usize,
    ) -> Result<Tensor> {
        Err(OpsError::NoCuda.into())
    }
}

/// Kernel loading and launch helpers for the other kernel families' wrappers
/// ([`crate::model::fused`]).
#[cfg(feature = "cuda")]
pub(crate) mod launch {
    pub(crate) use super::imp::{cu, device, dtype_name, func, grid_1d, ptr};
}

#[cfg(feature = "cuda")]
mod imp {
    //! Module loading and launches through cudarc on candle's stream.
    use super::*;
    use candle_core::{CudaDevice, Storage};
    use cudarc::driver::{CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    pub fn device_memory(device: &Device) -> Result<Option<(u64, u64)>> {
        match device {
            Device::Cuda(d) => {
                let (free, total) = d
                    .cuda_stream()
                    .context()
                    .mem_get_info()
                    .map_err(|e| candle_core::Error::Msg(format!("cuMemGetInfo: {e}")))?;
                Ok(Some((free as u64, total as u64)))
            }
            _ => Ok(None),
        }
    }

    pub fn open_device(ordinal: usize) -> Result<Device> {
        use cudarc::driver::{result, sys};
        let device = Device::new_cuda(ordinal)?;
        let Device::Cuda(d) = &device else {
            unreachable!("new_cuda returns a CUDA device")
        };
        // Safety: kvc launches everything on candle's one stream, so no allocation needs the
        // events that order a buffer's use across streams.
        unsafe { d.disable_event_tracking() };
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(cu)?;
        // Safety: the device handle comes from the live context; the attribute takes a u64.
        unsafe {
            let pool = result::device::get_mem_pool(ctx.cu_device())
                .map_err(|e| cu(format!("cuda:{ordinal}: memory pool: {e}")))?;
            let mut keep = u64::MAX;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            )
            .map_err(|e| {
                cu(format!(
                    "cuda:{ordinal}: memory pool release threshold: {e}"
                ))
            })?;
        }
        Ok(device)
    }

    static PAGED_ATTENTION: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/paged_attention.fatbin"));
    static KV_CACHE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv_cache.fatbin"));
    static EVICT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/evict.fatbin"));
    static PREFILL_SOFTMAX: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/prefill_softmax.fatbin"));
    static PREFILL_ATTENTION: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/prefill_attention.fatbin"));
    static SCORE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/score.fatbin"));
    static LAYER_OPS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/layer_ops.fatbin"));

    type FuncCache = HashMap<(usize, String), CudaFunction>;
    type ModCache = HashMap<(usize, &'static str), Arc<cudarc::driver::CudaModule>>;
    static FUNCS: OnceLock<Mutex<(ModCache, FuncCache)>> = OnceLock::new();

    pub(crate) fn cu(e: impl std::fmt::Display) -> candle_core::Error {
        OpsError::Cuda(e.to_string()).into()
    }

    /// `name` from module `module` ("paged_attention" | "kv_cache" | "evict" |
    /// "prefill_softmax" | "prefill_attention" | "score" | "layer_ops"), loaded once per
    /// context.
    pub(crate) fn func(
        stream: &Arc<CudaStream>,
        module: &'static str,
        name: &str,
    ) -> Result<CudaFunction> {
        let ctx = stream.context();
        let key = Arc::as_ptr(ctx) as usize;
        let mut g = FUNCS
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| cu("kernel cache poisoned"))?;
        if let Some(f) = g.1.get(&(key, name.to_string())) {
            return Ok(f.clone());
        }
        let m = match g.0.get(&(key, module)) {
            Some(m) => m.clone(),
            None => {
                let bin = match module {
                    "paged_attention" => PAGED_ATTENTION,
                    "evict" => EVICT,
                    "prefill_softmax" => PREFILL_SOFTMAX,
                    "prefill_attention" => PREFILL_ATTENTION,
                    "score" => SCORE,
                    "layer_ops" => LAYER_OPS,
                    _ => KV_CACHE,
                };
                let m = ctx
                    .load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec()))
                    .map_err(|e| cu(format!("loading kernels/{module}.cu: {e}")))?;
                g.0.insert((key, module), m.clone());
                m
            }
        };
        let f = m
            .load_function(name)
            .map_err(|e| cu(format!("kernel {name} in kernels/{module}.cu: {e}")))?;
        g.1.insert((key, name.to_string()), f.clone());
        Ok(f)
    }

    pub(crate) fn device(t: &Tensor) -> Result<CudaDevice> {
        match t.device() {
            Device::Cuda(d) => Ok(d.clone()),
            d => Err(OpsError::Shape(format!("expected a CUDA tensor, got one on {d:?}")).into()),
        }
    }

    /// Device address of a contiguous CUDA tensor's first element (0 for `None`). The caller
    /// keeps the tensor alive until the launch is queued; candle frees stream-ordered.
    pub(crate) fn ptr(t: Option<&Tensor>, stream: &CudaStream) -> Result<u64> {
        let Some(t) = t else { return Ok(0) };
        let (st, l) = t.storage_and_layout();
        if !l.is_contiguous() {
            return Err(OpsError::Shape(format!("tensor {:?} is not contiguous", t.dims())).into());
        }
        let Storage::Cuda(cs) = &*st else {
            return Err(OpsError::Shape("expected a CUDA tensor".into()).into());
        };
        let base = match t.dtype() {
            DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
            DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
            DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
            DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(stream).0,
            DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(stream).0,
            DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(stream).0,
            dt => return Err(OpsError::Shape(format!("unsupported dtype {dt:?}")).into()),
        };
        Ok(base + (l.start_offset() * t.dtype().size_in_bytes()) as u64)
    }

    pub(crate) fn dtype_name(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            dt => {
                return Err(
                    OpsError::Shape(format!("K/V dtype {dt:?} (f32, bf16, f16 only)")).into(),
                )
            }
        })
    }

    pub(crate) fn grid_1d(n: usize) -> Result<LaunchConfig> {
        let blocks = n.div_ceil(256);
        if blocks > u32::MAX as usize {
            return Err(OpsError::Shape(format!("{n} elements is too many")).into());
        }
        Ok(LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn write_kv(
        k_cache: &Tensor,
        v_cache: &Tensor,
        metric: Option<&Tensor>,
        position: Option<&Tensor>,
        k_new: &Tensor,
        v_new: &Tensor,
        slots: &Tensor,
        positions: &Tensor,
    ) -> Result<()> {
        let stream = device(k_cache)?.cuda_stream();
        let name = format!("write_kv_{}", dtype_name(k_cache.dtype())?);
        let f = func(&stream, "kv_cache", &name)?;
        let (n, d) = k_new.dims2()?;
        let ptrs = [
            ptr(Some(k_cache), &stream)?,
            ptr(Some(v_cache), &stream)?,
            ptr(metric, &stream)?,
            ptr(position, &stream)?,
            ptr(Some(k_new), &stream)?,
            ptr(Some(v_new), &stream)?,
            ptr(Some(slots), &stream)?,
            ptr(Some(positions), &stream)?,
        ];
        let (n_i, d_i) = (n as i32, d as i32);
        let mut b = stream.launch_builder(&f);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&n_i).arg(&d_i);
        // Safety: arguments match write_kv_<dtype>'s signature; every slot was checked in range.
        unsafe { b.launch(grid_1d(n * d)?) }.map_err(cu)?;
        Ok(())
    }

    pub fn prefill_softmax(
        p_out: &Tensor,
        probs: Option<&Tensor>,
        att: &Tensor,
        key_pos: &Tensor,
        shape: &SoftmaxShape,
        q_start: u32,
        scale: f32,
    ) -> Result<()> {
        let stream = device(att)?.cuda_stream();
        let name = format!("prefill_softmax_{}", dtype_name(att.dtype())?);
        let f = func(&stream, "prefill_softmax", &name)?;
        let ptrs = [
            ptr(Some(p_out), &stream)?,
            ptr(probs, &stream)?,
            ptr(Some(att), &stream)?,
            ptr(Some(key_pos), &stream)?,
        ];
        let (n, t, g, probed) = (
            shape.n as i32,
            shape.t as i32,
            shape.group as i32,
            if probs.is_some() {
                shape.probed as i32
            } else {
                0
            },
        );
        let mut b = stream.launch_builder(&f);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&n)
            .arg(&t)
            .arg(&g)
            .arg(&probed)
            .arg(&q_start)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (shape.rows() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: arguments match prefill_softmax_<dtype>; lengths were checked against shape.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        out: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_pos: &Tensor,
        s: &SoftmaxShape,
        q_start: u32,
        scale: f32,
    ) -> Result<()> {
        let stream = device(q)?.cuda_stream();
        let d = *q.dims().last().unwrap_or(&0);
        let name = format!("prefill_flash_{}_d{d}", dtype_name(q.dtype())?);
        let f = func(&stream, "prefill_attention", &name)?;
        let ptrs = [
            ptr(Some(out), &stream)?,
            ptr(Some(q), &stream)?,
            ptr(Some(k), &stream)?,
            ptr(Some(v), &stream)?,
            ptr(Some(key_pos), &stream)?,
        ];
        // The kernel reads K/V rows as 16-byte vectors and Q/out as 4-byte pairs.
        for (p, what) in ptrs[1..4].iter().zip(["q", "k", "v"]) {
            if p % 16 != 0 {
                return Err(OpsError::Shape(format!("{what} is not 16-byte aligned")).into());
            }
        }
        let (n, t, g) = (s.n as i32, s.t as i32, s.group as i32);
        let mut b = stream.launch_builder(&f);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&n).arg(&t).arg(&g).arg(&q_start).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (s.t.div_ceil(64) as u32, (s.kv_heads * s.group) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: arguments match prefill_flash_<dtype>_d<D>; element counts were checked
        // against the shape, pointers are aligned, the grid covers every query row.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok(())
    }

    pub fn move_slots(
        k_cache: &Tensor,
        v_cache: &Tensor,
        metric: Option<&Tensor>,
        position: Option<&Tensor>,
        from: &Tensor,
        to: &Tensor,
    ) -> Result<()> {
        let stream = device(k_cache)?.cuda_stream();
        let name = format!("move_slots_{}", dtype_name(k_cache.dtype())?);
        let f = func(&stream, "kv_cache", &name)?;
        let d = k_cache.dim(1)?;
        let n = from.dim(0)?;
        let ptrs = [
            ptr(Some(k_cache), &stream)?,
            ptr(Some(v_cache), &stream)?,
            ptr(metric, &stream)?,
            ptr(position, &stream)?,
            ptr(Some(from), &stream)?,
            ptr(Some(to), &stream)?,
        ];
        let (n_i, d_i) = (n as i32, d as i32);
        let mut b = stream.launch_builder(&f);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&n_i).arg(&d_i);
        // Safety: arguments match move_slots_<dtype>; the plan was checked in range and disjoint.
        unsafe { b.launch(grid_1d(n * d)?) }.map_err(cu)?;
        Ok(())
    }

    pub fn set_meta(
        metric: &Tensor,
        position: &Tensor,
        slots: &Tensor,
        m: &Tensor,
        p: &Tensor,
    ) -> Result<()> {
        let stream = device(metric)?.cuda_stream();
        let f = func(&stream, "kv_cache", "set_meta")?;
        let n = slots.dim(0)?;
        let ptrs = [
            ptr(Some(metric), &stream)?,
            ptr(Some(position), &stream)?,
            ptr(Some(slots), &stream)?,
            ptr(Some(m), &stream)?,
            ptr(Some(p), &stream)?,
        ];
        let n_i = n as i32;
        let mut b = stream.launch_builder(&f);
        for x in &ptrs {
            b.arg(x);
        }
        b.arg(&n_i);
        // Safety: arguments match set_meta; slots were checked distinct and in range.
        unsafe { b.launch(grid_1d(n)?) }.map_err(cu)?;
        Ok(())
    }

    pub fn scatter_u32(dst: &Tensor, idx: &Tensor, val: &Tensor, dst_len: u32) -> Result<()> {
        let stream = device(dst)?.cuda_stream();
        let f = func(&stream, "kv_cache", "scatter_u32")?;
        let n = idx.dim(0)?;
        let ptrs = [
            ptr(Some(dst), &stream)?,
            ptr(Some(idx), &stream)?,
            ptr(Some(val), &stream)?,
        ];
        let n_i = n as i32;
        let mut b = stream.launch_builder(&f);
        for x in &ptrs {
            b.arg(x);
        }
        b.arg(&n_i).arg(&dst_len);
        // Safety: arguments match scatter_u32 (idx and val hold n u32, dst dst_len u32); the
        // kernel skips an index past dst_len.
        unsafe { b.launch(grid_1d(n)?) }.map_err(cu)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_blocks(
        k_cache: &Tensor,
        v_cache: &Tensor,
        metric: Option<&Tensor>,
        position: Option<&Tensor>,
        from: &Tensor,
        to: &Tensor,
        block_size: usize,
        row_words: usize,
    ) -> Result<()> {
        let stream = device(k_cache)?.cuda_stream();
        let f = func(&stream, "kv_cache", "copy_blocks")?;
        let n = from.dim(0)?;
        let ptrs = [
            ptr(Some(k_cache), &stream)?,
            ptr(Some(v_cache), &stream)?,
            ptr(metric, &stream)?,
            ptr(position, &stream)?,
            ptr(Some(from), &stream)?,
            ptr(Some(to), &stream)?,
        ];
        let (n_i, bs, rw) = (n as i32, block_size as i32, row_words as i32);
        let mut b = stream.launch_builder(&f);
        for x in &ptrs {
            b.arg(x);
        }
        b.arg(&n_i).arg(&bs).arg(&rw);
        let cfg = LaunchConfig {
            grid_dim: (n.min(65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: arguments match copy_blocks; block ids were checked in range and distinct
        // over both lists (no copy reads a block another writes), rows are whole 4-byte words.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok(())
    }

    pub fn gather_kv(
        k_out: &Tensor,
        v_out: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        idx: &Tensor,
        row_words: usize,
    ) -> Result<()> {
        let stream = device(k_cache)?.cuda_stream();
        let f = func(&stream, "kv_cache", "gather_kv")?;
        let n = idx.dim(0)?;
        let ptrs = [
            ptr(Some(k_out), &stream)?,
            ptr(Some(v_out), &stream)?,
            ptr(Some(k_cache), &stream)?,
            ptr(Some(v_cache), &stream)?,
            ptr(Some(idx), &stream)?,
        ];
        let (n_i, rw) = (n as i32, row_words as i32);
        let mut b = stream.launch_builder(&f);
        for x in &ptrs {
            b.arg(x);
        }
        b.arg(&n_i).arg(&rw);
        let cfg = LaunchConfig {
            grid_dim: ((n * row_words).div_ceil(256).clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: arguments match gather_kv; the outputs are [n, row_words] words and the ids
        // were checked below the cache's rows by the caller.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok(())
    }

    pub fn window_score(
        out: &Tensor,
        probs: &Tensor,
        lens: &Tensor,
        a: &WindowScoreArgs,
        probed: usize,
        max_len: usize,
        shared: usize,
    ) -> Result<()> {
        let stream = device(probs)?.cuda_stream();
        let f = func(&stream, "score", "window_score")?;
        let nkv = lens.dim(0)?;
        let ptrs = [
            ptr(Some(out), &stream)?,
            ptr(Some(probs), &stream)?,
            ptr(Some(lens), &stream)?,
        ];
        let ints = [
            a.group as i32,
            probed as i32,
            max_len as i32,
            a.squared as i32,
            a.pool_k as i32,
            a.pool_max as i32,
            a.pool_skip_last.min(i32::MAX as usize) as i32,
        ];
        let mut b = stream.launch_builder(&f);
        for x in &ptrs {
            b.arg(x);
        }
        for x in &ints {
            b.arg(x);
        }
        let cfg = LaunchConfig {
            grid_dim: (max_len.div_ceil(WS_TILE) as u32, nkv as u32, 1),
            block_dim: (WS_TILE as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // Safety: arguments match window_score; shapes and lens were checked by the caller.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode(
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        tables: &DeviceTables,
        ws: &DecodeWorkspace,
        out: &Tensor,
        scale: f32,
        metric: Option<&Tensor>,
        write_probs: bool,
    ) -> Result<()> {
        let s = &tables.shape;
        let stream = device(q)?.cuda_stream();
        let tn = dtype_name(q.dtype())?;
        let gmax = [1usize, 2, 4, 8, 16]
            .into_iter()
            .find(|&g| g >= s.group)
            .unwrap_or(16);
        let (kind, smem) = match ws.pipeline {
            DecodePipeline::Registers => ("part", 0),
            DecodePipeline::Async => ("async", async_stage_bytes(s.head_dim, q.dtype())),
        };
        let part = func(
            &stream,
            "paged_attention",
            &format!("paged_decode_{kind}_{tn}_d{}_g{gmax}", s.head_dim),
        )?;
        if smem > 0 {
            use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
            part.set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| cu(format!("{smem} B of shared memory for decode stages: {e}")))?;
        }
        let reduce = func(
            &stream,
            "paged_attention",
            &format!("paged_decode_reduce_{tn}"),
        )?;
        for (v, what) in [
            (ptr(Some(q), &stream)?, "q"),
            (ptr(Some(k_cache), &stream)?, "k_cache"),
            (ptr(Some(v_cache), &stream)?, "v_cache"),
        ] {
            if v % 16 != 0 {
                return Err(OpsError::Shape(format!("{what} is not 16-byte aligned")).into());
            }
        }
        let i = |x: usize| -> Result<i32> {
            i32::try_from(x).map_err(|_| OpsError::Shape(format!("{x} does not fit i32")).into())
        };
        let (nkv, group, bs, stride) = (
            i(s.num_kv_heads)?,
            i(s.group)?,
            i(s.block_size)?,
            i(s.probs_stride)?,
        );
        let (ps, np, hd) = (i(ws.part_slots)?, i(ws.num_parts)?, i(s.head_dim)?);
        let wp: i32 = write_probs.into();
        // The scores are scratch for the probabilities and the metric only.
        let store_scores: i32 = (write_probs || metric.is_some()).into();
        let p = [
            ptr(Some(&ws.probs), &stream)?,
            ptr(Some(&ws.part_max), &stream)?,
            ptr(Some(&ws.part_sum), &stream)?,
            ptr(Some(&ws.part_out), &stream)?,
            ptr(Some(q), &stream)?,
            ptr(Some(k_cache), &stream)?,
            ptr(Some(v_cache), &stream)?,
            ptr(Some(&tables.block_tables), &stream)?,
            ptr(Some(&tables.ctx_lens), &stream)?,
            ptr(Some(&tables.table_start), &stream)?,
        ];
        let grid_y = s.num_kv_heads as u32;
        let grid_z = s.batch as u32;
        if s.batch > 65535 || s.batch == 0 || s.num_kv_heads == 0 {
            return Err(OpsError::Shape(format!("batch {} out of range", s.batch)).into());
        }
        let mut b = stream.launch_builder(&part);
        for x in &p {
            b.arg(x);
        }
        b.arg(&nkv)
            .arg(&group)
            .arg(&bs)
            .arg(&stride)
            .arg(&ps)
            .arg(&np)
            .arg(&scale)
            .arg(&store_scores);
        let cfg = LaunchConfig {
            grid_dim: (ws.num_parts as u32, grid_y, grid_z),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // Safety: arguments match paged_decode_part_*; tables were checked against the cache.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        let r = [
            ptr(Some(out), &stream)?,
            p[0],
            ptr(metric, &stream)?,
            p[1],
            p[2],
            p[3],
            p[7],
            p[8],
            p[9],
        ];
        let mut b = stream.launch_builder(&reduce);
        for x in &r {
            b.arg(x);
        }
        b.arg(&nkv)
            .arg(&group)
            .arg(&hd)
            .arg(&bs)
            .arg(&stride)
            .arg(&np)
            .arg(&wp);
        // The probability / metric pass is spread over chunks of 1024 slots (REDUCE_CHUNK in
        // kernels/paged_attention.cu); without it one block per head does the output only.
        let chunks = if write_probs || metric.is_some() {
            s.probs_stride.div_ceil(1024).max(1)
        } else {
            1
        };
        if chunks > 65535 {
            return Err(
                OpsError::Shape(format!("probs_stride {} too long", s.probs_stride)).into(),
            );
        }
        let cfg = LaunchConfig {
            grid_dim: (grid_y, grid_z, chunks as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: arguments match paged_decode_reduce_*.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok(())
    }

    pub fn kvcompress_evict(
        k_cache: &Tensor,
        v_cache: &Tensor,
        metric: &Tensor,
        position: &Tensor,
        a: &EvictArgs<'_>,
        block_size: usize,
        max_len: usize,
    ) -> Result<Tensor> {
        use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        let dev = k_cache.device();
        let stream = device(k_cache)?.cuda_stream();
        let heads = a.lens.dim(0)?;
        let total_blocks = a.out_blocks.max(1);
        let n_seqs = a.n_evict.dim(0)?;
        let sort_smem = max_len.next_power_of_two() * 8;
        // Holes and survivors as u16, evicted flags as u8 (see kvc_compact_heads).
        let compact_smem = (5 * max_len).next_multiple_of(4);
        let sort = func(&stream, "evict", "kvc_sort_candidates")?;
        let select = func(&stream, "evict", "kvc_select_blocks")?;
        let compact = func(&stream, "evict", "kvc_compact_heads")?;
        for (f, bytes, what) in [
            (&sort, sort_smem, "sort"),
            (&compact, compact_smem, "compaction"),
        ] {
            f.set_attribute(
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| cu(format!("{bytes} B of shared memory for the {what}: {e}")))?;
        }
        // Safety (all three): every element is written by the kernels before it is read — the
        // sort writes each head's order and candidates, the selection every head's counts and
        // `lt` of its sequence (head_start partitions the heads).
        let order = unsafe { Tensor::empty(total_blocks * block_size, DType::U32, dev)? };
        let cand = unsafe { Tensor::empty(total_blocks, DType::F32, dev)? };
        let counts = unsafe { Tensor::empty(heads, DType::U32, dev)? };
        let lt = unsafe { Tensor::empty(heads, DType::U32, dev)? };
        let bs = block_size as i32;
        let (order_p, cand_p, metric_p, position_p) = (
            ptr(Some(&order), &stream)?,
            ptr(Some(&cand), &stream)?,
            ptr(Some(metric), &stream)?,
            ptr(Some(position), &stream)?,
        );
        let (blocks_p, tab_p, start_p, lens_p) = (
            ptr(Some(a.blocks), &stream)?,
            ptr(Some(a.tab), &stream)?,
            ptr(Some(a.start), &stream)?,
            ptr(Some(a.lens), &stream)?,
        );
        let cfg = |grid: usize, smem: usize| LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // The two sorts' shared leading arguments (kvc_sort_candidates, kvc_sort_prefix).
        let sort_args = [
            order_p, cand_p, metric_p, position_p, blocks_p, tab_p, start_p, lens_p,
        ];
        let protect = ptr(Some(a.protect), &stream)?;
        let want_p = ptr(Some(a.want), &stream)?;
        if a.sort_full {
            let mut b = stream.launch_builder(&sort);
            for x in &sort_args {
                b.arg(x);
            }
            b.arg(&bs).arg(&protect).arg(&want_p);
            // Safety: arguments match kvc_sort_candidates; the tables were checked on the host.
            unsafe { b.launch(cfg(heads, sort_smem)) }.map_err(cu)?;
        }
        if a.sort_prefix {
            let prefix = func(&stream, "evict", "kvc_sort_prefix")?;
            let mut b = stream.launch_builder(&prefix);
            for x in &sort_args {
                b.arg(x);
            }
            let heads_i = heads as i32;
            b.arg(&bs).arg(&protect).arg(&want_p).arg(&heads_i);
            let warps = LaunchConfig {
                grid_dim: (heads.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // Safety: arguments match kvc_sort_prefix; it writes order and candidates of
            // exactly the heads kvc_sort_candidates skipped (the same takes_prefix test).
            unsafe { b.launch(warps) }.map_err(cu)?;
        }
        let (counts_p, lt_p) = (ptr(Some(&counts), &stream)?, ptr(Some(&lt), &stream)?);
        let head_start = ptr(Some(a.head_start), &stream)?;
        let n_evict = ptr(Some(a.n_evict), &stream)?;
        let mut b = stream.launch_builder(&select);
        for x in [&counts_p, &lt_p, &cand_p, &start_p, &head_start, &n_evict] {
            b.arg(x);
        }
        // Safety: arguments match kvc_select_blocks; head_start partitions the heads.
        unsafe { b.launch(cfg(n_seqs, 0)) }.map_err(cu)?;
        // KVCrush: the kept groups and each head's evicted count, for the compaction.
        let crushed = match &a.crush {
            Some(c) => {
                let pick = func(&stream, "evict", "kvc_crush_pick")?;
                // Safety: kvc_crush_pick writes every head's evict_n and every group's picked
                // flag that the compaction reads (groups of the base's prefix), and its
                // scratch before reading it.
                let evict_n = unsafe { Tensor::empty(heads, DType::U32, dev)? };
                let picked = unsafe { Tensor::empty(total_blocks, DType::U8, dev)? };
                let sig = unsafe { Tensor::empty(total_blocks, DType::I64, dev)? };
                let rank = unsafe { Tensor::empty(total_blocks, DType::U32, dev)? };
                let ps = [
                    ptr(Some(&evict_n), &stream)?,
                    ptr(Some(&picked), &stream)?,
                    ptr(Some(&sig), &stream)?,
                    ptr(Some(&rank), &stream)?,
                    metric_p,
                    position_p,
                    order_p,
                    counts_p,
                    blocks_p,
                    tab_p,
                    start_p,
                    lens_p,
                    protect,
                    head_start,
                    ptr(Some(&c.groups), &stream)?,
                    ptr(Some(&c.anchor), &stream)?,
                    ptr(Some(&c.mean), &stream)?,
                ];
                let mut b = stream.launch_builder(&pick);
                for x in &ps {
                    b.arg(x);
                }
                let kvh = c.kv_heads as i32;
                b.arg(&bs).arg(&kvh);
                let grid = LaunchConfig {
                    grid_dim: (c.layers as u32, n_seqs as u32, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                };
                // Safety: arguments match kvc_crush_pick; kv_heads and block_size were checked
                // against its limits, every sequence's heads are whole layers.
                unsafe { b.launch(grid) }.map_err(cu)?;
                Some((evict_n, picked))
            }
            None => None,
        };
        let (evict_n_p, picked_p) = match &crushed {
            Some((e, p)) => (ptr(Some(e), &stream)?, ptr(Some(p), &stream)?),
            None => (0, 0),
        };
        let row_bytes = k_cache.dim(1)? * k_cache.dtype().size_in_bytes();
        if row_bytes % 4 != 0 {
            return Err(OpsError::Shape(format!(
                "K/V rows of {row_bytes} B (need a multiple of 4)"
            ))
            .into());
        }
        let (row_words, max_len) = ((row_bytes / 4) as i32, max_len as i32);
        let (k_p, v_p) = (ptr(Some(k_cache), &stream)?, ptr(Some(v_cache), &stream)?);
        let mut b = stream.launch_builder(&compact);
        for x in [
            &k_p,
            &v_p,
            &metric_p,
            &position_p,
            &lens_p,
            &order_p,
            &counts_p,
            &blocks_p,
            &tab_p,
            &start_p,
            &evict_n_p,
            &picked_p,
        ] {
            b.arg(x);
        }
        b.arg(&bs).arg(&max_len).arg(&row_words);
        // Safety: arguments match kvc_compact_heads; its lists fit `compact_smem`.
        unsafe { b.launch(cfg(heads, compact_smem)) }.map_err(cu)?;
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU `gather_kv` is `index_select` of both caches; ids past the cache, or not u32,
    /// are refused before any read.
    #[test]
    fn gather_kv_checks_then_gathers() {
        let dev = Device::Cpu;
        let k = Tensor::arange(0f32, 40.0, &dev)
            .unwrap()
            .reshape((10, 4))
            .unwrap();
        let v = (&k * -1.0).unwrap();
        let idx = Tensor::new(&[9u32, 0, 9, 3], &dev).unwrap();
        let (gk, gv) = gather_kv(&k, &v, &idx, Some(9)).unwrap();
        assert_eq!(
            gk.to_vec2::<f32>().unwrap()[0],
            vec![36.0, 37.0, 38.0, 39.0]
        );
        assert_eq!(
            gk.to_vec2::<f32>().unwrap()[3],
            vec![12.0, 13.0, 14.0, 15.0]
        );
        assert_eq!(gv.to_vec2::<f32>().unwrap()[1], vec![0.0, -1.0, -2.0, -3.0]);
        assert!(gather_kv(&k, &v, &idx, Some(10)).is_err());
        let wide = Tensor::new(&[1i64, 2], &dev).unwrap();
        assert!(gather_kv(&k, &v, &wide, Some(2)).is_err());
    }
}
