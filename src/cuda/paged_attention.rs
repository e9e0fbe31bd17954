//! `kernels/paged_attention.cu`: paged decode attention. [`DecodeShape`] is the host-side
//! validation the twin and the wrappers share, so a bad table is refused before any kernel
//! reads out of bounds; [`DeviceTables`] holds tables checked and on the device.
use candle_core::{DType, Device, Result, Tensor};

use super::evict::HeadTables;
use super::{
    available, check_cache, check_len, check_meta, distinct_blocks, KvElem, OpsError, OpsResult,
};

/// Head dims the decode kernel is instantiated for (others use candle ops).
pub const DECODE_HEAD_DIMS: [usize; 2] = [64, 128];

/// Largest GQA group the decode kernel handles in one CUDA block.
pub const DECODE_MAX_GROUP: usize = 16;

/// Whether [`paged_decode`] supports this dtype / head dim / group (and the build has CUDA).
pub fn decode_supported(dtype: DType, head_dim: usize, group: usize) -> bool {
    available()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && DECODE_HEAD_DIMS.contains(&head_dim)
        && (1..=DECODE_MAX_GROUP).contains(&group)
}

/// Shape of a paged decode-attention call (one query token per batch row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    /// Batch rows (sequences).
    pub batch: usize,
    /// Kv-heads per layer.
    pub num_kv_heads: usize,
    /// Query heads per kv-head.
    pub group: usize,
    /// Elements per Q/K/V row.
    pub head_dim: usize,
    /// Row length of the block tables.
    pub max_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Row length of the probability output (at least every context length).
    pub probs_stride: usize,
    /// Slots in the K/V caches.
    pub num_slots: usize,
}

impl DecodeShape {
    /// The shape the eviction step checks its tables against: `heads` rows of `max_blocks`
    /// blocks (one batch row, groups of one, a context of up to `max_blocks` blocks).
    pub fn for_eviction(
        heads: usize,
        head_dim: usize,
        max_blocks: usize,
        block_size: usize,
        num_slots: usize,
    ) -> Self {
        DecodeShape {
            batch: 1,
            num_kv_heads: heads,
            group: 1,
            head_dim,
            max_blocks,
            block_size,
            probs_stride: max_blocks * block_size,
            num_slots,
        }
    }

    /// Query heads per batch row.
    pub fn n_heads(&self) -> usize {
        self.num_kv_heads * self.group
    }

    /// Check the tables against the shape: lengths, context lengths within capacity, block ids
    /// within the cache (what memory safety needs; O(blocks in use)).
    pub fn check(&self, block_tables: &[u32], ctx_lens: &[u32]) -> OpsResult<()> {
        self.used_blocks(block_tables, ctx_lens).map(|_| ())
    }

    /// [`Self::check`], and no block shared by two rows (what the metric update and the
    /// compaction need; [`distinct_blocks`]).
    pub fn check_disjoint(&self, block_tables: &[u32], ctx_lens: &[u32]) -> OpsResult<()> {
        let used = self.used_blocks(block_tables, ctx_lens)?;
        distinct_blocks(
            "block_tables (block id)",
            used,
            self.num_slots / self.block_size,
        )
    }

    /// [`Self::check`] (and, with `disjoint`, [`Self::check_disjoint`]) for tables whose rows'
    /// blocks lie back to back ([`HeadTables`]) instead of in a padded array.
    pub fn check_heads(&self, tables: &HeadTables, disjoint: bool) -> OpsResult<()> {
        self.check_dims()?;
        check_len(
            "head tables",
            tables.heads(),
            self.batch * self.num_kv_heads,
        )?;
        let cap = self.ctx_cap();
        if let Some((row, &len)) = tables
            .lens
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize > cap)
        {
            return Err(OpsError::CtxLen {
                row,
                len: len as usize,
                cap,
            });
        }
        tables.validate(self.block_size, self.num_slots, disjoint)
    }

    /// Longest context a row may have: its blocks and its probabilities row.
    pub fn ctx_cap(&self) -> usize {
        (self.max_blocks * self.block_size).min(self.probs_stride)
    }

    fn check_dims(&self) -> OpsResult<()> {
        if self.block_size == 0 || self.head_dim == 0 || self.group == 0 {
            return Err(OpsError::Shape(format!(
                "paged decode: block_size, head_dim and group must be positive ({self:?})"
            )));
        }
        Ok(())
    }

    fn used_blocks(&self, block_tables: &[u32], ctx_lens: &[u32]) -> OpsResult<Vec<u32>> {
        let rows = self.batch * self.num_kv_heads;
        self.check_dims()?;
        check_len("block_tables", block_tables.len(), rows * self.max_blocks)?;
        check_len("ctx_lens", ctx_lens.len(), rows)?;
        let num_blocks = self.num_slots / self.block_size;
        let cap = self.ctx_cap();
        let mut used = Vec::new();
        for (r, &len) in ctx_lens.iter().enumerate() {
            let len = len as usize;
            if len > cap {
                return Err(OpsError::CtxLen { row: r, len, cap });
            }
            for &b in &block_tables[r * self.max_blocks..][..len.div_ceil(self.block_size)] {
                if b as usize >= num_blocks {
                    return Err(OpsError::Slot {
                        what: "block_tables (block id)",
                        slot: b as usize,
                        num_slots: num_blocks,
                    });
                }
                used.push(b);
            }
        }
        Ok(used)
    }
}

/// What [`paged_decode`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOut {
    /// `[batch, n_heads, head_dim]` f32 (the kernel rounds this to the cache dtype).
    pub out: Vec<f32>,
    /// `[batch, n_heads, probs_stride]` softmax probabilities in logical slot order, zero beyond
    /// each head's context length.
    pub probs: Vec<f32>,
}

/// Paged decode attention (twin of `paged_decode_part_*` + `paged_decode_reduce_*`): for each
/// batch row `b` and query head `h` (kv-head `h / group`), softmax of `(q * scale) . k_i` over
/// the head's `ctx_lens` logical slots, output `sum_i p_i v_i`; a head with no slots outputs
/// zeros. When `metric` is given, adds the KV-Compress decode metric
/// `metric[slot_i] += sum over the group's query heads of p_i^2`.
///
/// `q`: `[batch, n_heads, head_dim]`; `k_cache`, `v_cache`: `[num_slots, head_dim]`;
/// `block_tables`: `[batch, num_kv_heads, max_blocks]`; `ctx_lens`: `[batch, num_kv_heads]`;
/// `metric`: `[num_slots]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_twin<T: KvElem>(
    shape: &DecodeShape,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    block_tables: &[u32],
    ctx_lens: &[u32],
    scale: f32,
    metric: Option<&mut [f32]>,
) -> OpsResult<DecodeOut> {
    let s = shape;
    let (d, nh, nkv, g) = (s.head_dim, s.n_heads(), s.num_kv_heads, s.group);
    check_len("q", q.len(), s.batch * nh * d)?;
    check_len("k_cache", k_cache.len(), s.num_slots * d)?;
    check_len("v_cache", v_cache.len(), s.num_slots * d)?;
    if let Some(m) = &metric {
        check_len("metric", m.len(), s.num_slots)?;
        s.check_disjoint(block_tables, ctx_lens)?;
    } else {
        s.check(block_tables, ctx_lens)?;
    }
    let mut metric = metric;
    let mut out = vec![0f32; s.batch * nh * d];
    let mut probs = vec![0f32; s.batch * nh * s.probs_stride];
    for b in 0..s.batch {
        for kvh in 0..nkv {
            let row = b * nkv + kvh;
            let len = ctx_lens[row] as usize;
            let table = &block_tables[row * s.max_blocks..(row + 1) * s.max_blocks];
            let slots: Vec<usize> = (0..len)
                .map(|i| table[i / s.block_size] as usize * s.block_size + i % s.block_size)
                .collect();
            let mut m2 = vec![0f32; len];
            for h in kvh * g..(kvh + 1) * g {
                let qh: Vec<f32> = q[(b * nh + h) * d..][..d]
                    .iter()
                    .map(|x| x.to_f32() * scale)
                    .collect();
                let sc: Vec<f32> = slots
                    .iter()
                    .map(|&sl| {
                        qh.iter()
                            .zip(&k_cache[sl * d..(sl + 1) * d])
                            .map(|(a, k)| a * k.to_f32())
                            .sum()
                    })
                    .collect();
                let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                let o = &mut out[(b * nh + h) * d..][..d];
                let prow = &mut probs[(b * nh + h) * s.probs_stride..][..s.probs_stride];
                for (i, (&sl, &ei)) in slots.iter().zip(&e).enumerate() {
                    let p = ei / z;
                    prow[i] = p;
                    m2[i] += p * p;
                    for (oc, vc) in o.iter_mut().zip(&v_cache[sl * d..(sl + 1) * d]) {
                        *oc += p * vc.to_f32();
                    }
                }
            }
            if let Some(m) = metric.as_deref_mut() {
                for (&sl, x) in slots.iter().zip(&m2) {
                    m[sl] += x;
                }
            }
        }
    }
    Ok(DecodeOut { out, probs })
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

    /// Tables already on the device whose block ids the caller checked for range and overlap
    /// when it built them (a decode step's tables, kept on the device between steps): checked
    /// here only against `shape`'s rows and context cap. `blocks`: flat u32 ids; `starts`,
    /// `lens`: `[rows]` u32; `max_len`: the longest row in tokens.
    pub fn prechecked(
        shape: DecodeShape,
        blocks: Tensor,
        starts: Tensor,
        lens: Tensor,
        max_len: usize,
    ) -> Result<Self> {
        let rows = shape.batch * shape.num_kv_heads;
        let cap = shape.ctx_cap();
        if starts.dims() != [rows] || lens.dims() != [rows] || max_len > cap {
            return Err(OpsError::Shape(format!(
                "step tables of {:?} rows, longest {max_len} tokens, for a decode call of {rows} rows capped at {cap} ({shape:?})",
                starts.dims(),
            ))
            .into());
        }
        Ok(DeviceTables {
            disjoint: true,
            shape,
            block_tables: blocks,
            ctx_lens: lens,
            table_start: starts,
            max_len,
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
/// it changed when long rows joined a batch, and with it the bf16 outputs of the other rows.
/// 2048 was the best or near-best partition at the shapes measured
/// (docs/findings/2026-12-02-decode-partitions-fixed-for-batch-invariance.md).
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

/// Paged decode attention (twin: [`paged_decode_twin`]): `q` `[batch, n_heads, head_dim]`
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
#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

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
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches through cudarc on candle's stream.
    use super::*;
    use crate::cuda::launch::{cu, device, dtype_name, func, ptr};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

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
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn decode_twin_matches_dense_attention_and_accumulates_metric() {
        // 1 batch row, 1 kv-head, group 2, head_dim 2, block size 2, 3 tokens in blocks [3, 1].
        let shape = DecodeShape {
            batch: 1,
            num_kv_heads: 1,
            group: 2,
            head_dim: 2,
            max_blocks: 3,
            block_size: 2,
            probs_stride: 4,
            num_slots: 8,
        };
        let mut k = vec![0f32; 16];
        let mut v = vec![0f32; 16];
        // logical 0 -> slot 6, 1 -> slot 7, 2 -> slot 2
        for (i, sl) in [6usize, 7, 2].into_iter().enumerate() {
            k[sl * 2] = i as f32;
            k[sl * 2 + 1] = 1.0;
            v[sl * 2] = 10.0 * i as f32;
            v[sl * 2 + 1] = 1.0;
        }
        let q = vec![1f32, 0.0, 0.0, 1.0];
        let mut metric = vec![1f32; 8];
        let r = paged_decode_twin(
            &shape,
            &q,
            &k,
            &v,
            &[3, 1, 99],
            &[3],
            0.5,
            Some(&mut metric),
        )
        .unwrap();
        // head 0: scores 0, 0.5, 1.0
        let e: Vec<f32> = [0f32, 0.5, 1.0].iter().map(|x| x.exp()).collect();
        let z: f32 = e.iter().sum();
        let p0: Vec<f32> = e.iter().map(|x| x / z).collect();
        for i in 0..3 {
            assert!((r.probs[i] - p0[i]).abs() < 1e-6);
            // head 1: equal scores
            assert!((r.probs[4 + i] - 1.0 / 3.0).abs() < 1e-6);
        }
        assert_eq!(r.probs[3], 0.0);
        let want0 = 10.0 * p0[1] + 20.0 * p0[2];
        assert!((r.out[0] - want0).abs() < 1e-5 && (r.out[1] - 1.0).abs() < 1e-6);
        assert!((r.out[2] - 10.0).abs() < 1e-5);
        let m6 = 1.0 + p0[0] * p0[0] + 1.0 / 9.0;
        assert!((metric[6] - m6).abs() < 1e-6);
        assert_eq!(metric[0], 1.0);
        // a table pointing past the cache is refused
        let bad = paged_decode_twin(&shape, &q, &k, &v, &[3, 4, 0], &[3], 0.5, None);
        assert!(matches!(bad, Err(OpsError::Slot { .. })), "{bad:?}");
        let bad = paged_decode_twin(&shape, &q, &k, &v, &[3, 3, 0], &[3], 0.5, Some(&mut metric));
        assert!(matches!(bad, Err(OpsError::Repeated { .. })), "{bad:?}");
    }
}
