//! Plain-Rust twins of the paged-cache CUDA kernels (`kernels/kv_cache.cu`,
//! `kernels/paged_attention.cu`): same contracts, same f32 arithmetic, on host slices. They are
//! the oracle of the kernel tests (`tests/cuda_kernels.rs`) and the reference for anyone
//! porting the kernels; the CPU [`super::paged::PagedCache`] keeps its candle-op path (bitwise
//! equal to the contiguous oracle), which follows the same contracts.
//!
//! Layout (KV-Compress): slot `s` is row `s` of K and V `[num_slots, head_dim]` and entry `s` of
//! the per-slot metric (f32) and position (u32) arrays. Logical slot `i` of row `r` (one
//! (sequence, kv-head) of one layer) is physical slot
//! `block_tables[r][i / block_size] * block_size + i % block_size`, for `i < ctx_lens[r]`.
//! The twins take padded `[rows, max_blocks]` tables; the paged cache hands the kernels only
//! the blocks in use, rows back to back ([`HeadTables`]).
//!
//! Also home of [`DecodeShape`], the host-side validation shared by the twin and the CUDA
//! wrappers, so a bad table is refused before any kernel reads out of bounds.
use half::{bf16, f16};

/// Bad arguments to a paged-cache op; each names the argument and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpsError {
    #[error("{what}: expected {expected} elements, got {got}")]
    Len {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: slot {slot} is out of range (the cache has {num_slots} slots)")]
    Slot {
        what: &'static str,
        slot: usize,
        num_slots: usize,
    },
    #[error("{what}: slot {slot} appears twice (or is both a source and a destination)")]
    Repeated { what: &'static str, slot: usize },
    #[error("row {row}: context length {len} exceeds its capacity {cap} (max_blocks * block_size, probs stride)")]
    CtxLen { row: usize, len: usize, cap: usize },
    #[error("{0}")]
    Shape(String),
    #[error("this kvc was built without CUDA: rebuild with `cargo build --release --features cuda` (see README, \"GPU\")")]
    NoCuda,
    #[error("CUDA: {0}")]
    Cuda(String),
}

impl From<OpsError> for candle_core::Error {
    fn from(e: OpsError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// An element type of the K/V cache (converted to f32 for arithmetic, as the kernels do).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// To f32.
    fn to_f32(self) -> f32;
    /// From f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl KvElem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl KvElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), OpsError> {
    if got != expected {
        return Err(OpsError::Len {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

/// Check that every slot of `lists` is below `num_slots` and that no slot appears twice over
/// all lists: for short lists (a decode step's writes, a prompt chunk's), the runs of
/// consecutive slots are sorted as intervals and checked for overlap, nothing proportional to
/// the cache (the pool hands out whole blocks, so a 7.5k-token prompt's 22.5k slots of one
/// SmolLM2 layer are ~1.4k runs: sorting every slot was most of a prefill layer's host time on
/// the H200's host); one pass with a bitmap of the cache's slots for long lists (a fork copies
/// every slot of a sequence: sorting its 1.35M sources and destinations took ~20 ms).
fn check_slots(what: &'static str, lists: &[&[u32]], num_slots: usize) -> Result<(), OpsError> {
    let n: usize = lists.iter().map(|l| l.len()).sum();
    if let Some(&s) = lists
        .iter()
        .flat_map(|l| l.iter())
        .find(|&&s| s as usize >= num_slots)
    {
        return Err(OpsError::Slot {
            what,
            slot: s as usize,
            num_slots,
        });
    }
    if n >= num_slots / 256 {
        // The bitmap costs num_slots / 8 bytes: worth it once the list is that long.
        return distinct_blocks(
            what,
            lists.iter().flat_map(|l| l.iter().copied()),
            num_slots,
        );
    }
    // Intervals [start, end) of consecutive slots; the slots are distinct iff no two overlap.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in lists.iter().flat_map(|l| l.iter()) {
        let s = s as u64;
        match runs.last_mut() {
            Some((_, end)) if *end == s => *end += 1,
            _ => runs.push((s, s + 1)),
        }
    }
    runs.sort_unstable();
    if let Some(w) = runs.windows(2).find(|w| w[1].0 < w[0].1) {
        // The later run starts inside the earlier one: its first slot is listed twice.
        return Err(OpsError::Repeated {
            what,
            slot: w[1].0 as usize,
        });
    }
    Ok(())
}

/// Set `metric[slots[i]] = m[i]` and `position[slots[i]] = p[i]` (twin of `set_meta`); slots
/// distinct and in range.
pub fn set_meta(
    metric: &mut [f32],
    position: &mut [u32],
    slots: &[u32],
    m: &[f32],
    p: &[u32],
) -> Result<(), OpsError> {
    check_meta_set(metric.len(), position.len(), slots, m, p)?;
    for ((&s, &mv), &pv) in slots.iter().zip(m).zip(p) {
        metric[s as usize] = mv;
        position[s as usize] = pv;
    }
    Ok(())
}

/// Validate [`set_meta`]'s arguments: metric and position of `num_slots` entries, `m` and `p`
/// one per slot, slots distinct and below `num_slots`.
pub fn check_meta_set(
    num_slots: usize,
    positions_len: usize,
    slots: &[u32],
    m: &[f32],
    p: &[u32],
) -> Result<(), OpsError> {
    check_len("set_meta position", positions_len, num_slots)?;
    check_len("set_meta values", m.len(), slots.len())?;
    check_len("set_meta positions", p.len(), slots.len())?;
    check_slots("set_meta slots", &[slots], num_slots)
}

/// Validate a write: `k_new`/`v_new` `[n, head_dim]`, `slots`/`positions` `[n]`, slots distinct
/// and below `num_slots`.
pub fn check_write(
    num_slots: usize,
    head_dim: usize,
    new_elems: usize,
    slots: &[u32],
    positions: &[u32],
) -> Result<(), OpsError> {
    let n = slots.len();
    check_len("write_kv positions", positions.len(), n)?;
    check_len("write_kv k_new/v_new", new_elems, n * head_dim)?;
    check_slots("write_kv slots", &[slots], num_slots)
}

/// Write new K/V rows (RoPE applied) into `slots`, setting their metric to 0 and their position.
/// Twin of `write_kv_<dtype>`. `k_cache`/`v_cache`: `[num_slots, head_dim]`; `metric`,
/// `position`: `[num_slots]` (skipped when `None`); `k_new`/`v_new`: `[n, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn write_kv<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: Option<&mut [f32]>,
    position: Option<&mut [u32]>,
    k_new: &[T],
    v_new: &[T],
    slots: &[u32],
    positions: &[u32],
    head_dim: usize,
) -> Result<(), OpsError> {
    let num_slots = k_cache.len() / head_dim.max(1);
    check_len("write_kv v_cache", v_cache.len(), k_cache.len())?;
    check_len("write_kv v_new", v_new.len(), k_new.len())?;
    check_write(num_slots, head_dim, k_new.len(), slots, positions)?;
    let mut metric = metric;
    let mut position = position;
    for (r, (&s, &p)) in slots.iter().zip(positions).enumerate() {
        let (s, src) = (s as usize, r * head_dim);
        k_cache[s * head_dim..(s + 1) * head_dim].copy_from_slice(&k_new[src..src + head_dim]);
        v_cache[s * head_dim..(s + 1) * head_dim].copy_from_slice(&v_new[src..src + head_dim]);
        if let Some(m) = metric.as_deref_mut() {
            m[s] = 0.0;
        }
        if let Some(pos) = position.as_deref_mut() {
            pos[s] = p;
        }
    }
    Ok(())
}

/// Validate a move plan: `from`/`to` of equal length, in range, and all `from ∪ to` distinct
/// (compaction moves tail survivors into evicted holes, so the copies commute).
pub fn check_moves(num_slots: usize, from: &[u32], to: &[u32]) -> Result<(), OpsError> {
    check_len("move_slots to", to.len(), from.len())?;
    check_slots("move_slots from/to", &[from, to], num_slots)
}

/// Execute a compaction move plan: copy K, V, metric and position of slot `from[i]` to slot
/// `to[i]`. Twin of `move_slots_<dtype>`.
pub fn move_slots<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: Option<&mut [f32]>,
    position: Option<&mut [u32]>,
    from: &[u32],
    to: &[u32],
    head_dim: usize,
) -> Result<(), OpsError> {
    let num_slots = k_cache.len() / head_dim.max(1);
    check_len("move_slots v_cache", v_cache.len(), k_cache.len())?;
    check_moves(num_slots, from, to)?;
    let mut metric = metric;
    let mut position = position;
    for (&f, &t) in from.iter().zip(to) {
        let (f, t) = (f as usize, t as usize);
        k_cache.copy_within(f * head_dim..(f + 1) * head_dim, t * head_dim);
        v_cache.copy_within(f * head_dim..(f + 1) * head_dim, t * head_dim);
        if let Some(m) = metric.as_deref_mut() {
            m[t] = m[f];
        }
        if let Some(p) = position.as_deref_mut() {
            p[t] = p[f];
        }
    }
    Ok(())
}

/// Copy whole blocks: block `to[i]` gets the `block_size` K and V rows, metrics and positions
/// of block `from[i]` (twin of `copy_blocks`; a fork into newly allocated blocks). Blocks are
/// below `num_slots / block_size`, and no block id appears twice over both lists.
#[allow(clippy::too_many_arguments)]
pub fn copy_blocks<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: Option<&mut [f32]>,
    position: Option<&mut [u32]>,
    from: &[u32],
    to: &[u32],
    block_size: usize,
    head_dim: usize,
) -> Result<(), OpsError> {
    let num_slots = k_cache.len() / head_dim.max(1);
    check_len("copy_blocks v_cache", v_cache.len(), k_cache.len())?;
    check_block_copies(num_slots, block_size, from, to)?;
    let (mut metric, mut position) = (metric, position);
    let rows = block_size * head_dim;
    for (&f, &t) in from.iter().zip(to) {
        let (f, t) = (f as usize, t as usize);
        k_cache.copy_within(f * rows..(f + 1) * rows, t * rows);
        v_cache.copy_within(f * rows..(f + 1) * rows, t * rows);
        let (fs, ts) = (f * block_size, t * block_size);
        if let Some(m) = metric.as_deref_mut() {
            m.copy_within(fs..fs + block_size, ts);
        }
        if let Some(p) = position.as_deref_mut() {
            p.copy_within(fs..fs + block_size, ts);
        }
    }
    Ok(())
}

/// Validate [`copy_blocks`]'s lists for a pool of `num_slots` slots in blocks of `block_size`.
pub fn check_block_copies(
    num_slots: usize,
    block_size: usize,
    from: &[u32],
    to: &[u32],
) -> Result<(), OpsError> {
    check_len("copy_blocks to", to.len(), from.len())?;
    if block_size == 0 {
        return Err(OpsError::Shape("copy_blocks: block size 0".into()));
    }
    check_slots("copy_blocks from/to", &[from, to], num_slots / block_size)
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
    pub fn check(&self, block_tables: &[u32], ctx_lens: &[u32]) -> Result<(), OpsError> {
        self.used_blocks(block_tables, ctx_lens).map(|_| ())
    }

    /// [`Self::check`], and no block shared by two rows (what the metric update and the
    /// compaction need; [`distinct_blocks`]).
    pub fn check_disjoint(&self, block_tables: &[u32], ctx_lens: &[u32]) -> Result<(), OpsError> {
        let used = self.used_blocks(block_tables, ctx_lens)?;
        distinct_blocks(
            "block_tables (block id)",
            used,
            self.num_slots / self.block_size,
        )
    }

    /// [`Self::check`] (and, with `disjoint`, [`Self::check_disjoint`]) for tables whose rows'
    /// blocks lie back to back ([`HeadTables`]) instead of in a padded array.
    pub fn check_heads(&self, tables: &HeadTables, disjoint: bool) -> Result<(), OpsError> {
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

    fn check_dims(&self) -> Result<(), OpsError> {
        if self.block_size == 0 || self.head_dim == 0 || self.group == 0 {
            return Err(OpsError::Shape(format!(
                "paged decode: block_size, head_dim and group must be positive ({self:?})"
            )));
        }
        Ok(())
    }

    fn used_blocks(&self, block_tables: &[u32], ctx_lens: &[u32]) -> Result<Vec<u32>, OpsError> {
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

/// Shape of a prefill softmax ([`prefill_softmax`]): `kv_heads * group * t` rows (kv-head,
/// query head of its group, query) of `n` keys each, and the number of last queries whose f32
/// probabilities are wanted (the probe: 0, the observation window, or `t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftmaxShape {
    pub kv_heads: usize,
    pub group: usize,
    pub t: usize,
    pub n: usize,
    pub probed: usize,
}

impl SoftmaxShape {
    /// Rows of scores.
    pub fn rows(&self) -> usize {
        self.kv_heads * self.group * self.t
    }

    /// Checks the slice lengths against the shape.
    pub fn check(&self, att: usize, key_pos: usize) -> Result<(), OpsError> {
        if self.probed > self.t {
            return Err(OpsError::Shape(format!(
                "probed queries {} exceed the {} queries",
                self.probed, self.t
            )));
        }
        check_len("att", att, self.rows() * self.n)?;
        check_len("key_pos", key_pos, self.kv_heads * self.n)
    }
}

/// Prefill attention's softmax (twin of `kernels/prefill_softmax.cu`): per row (kv-head `r /
/// (group * t)`, query `q = r % t` at position `q_start + q`), the scaled scores rounded to `T`
/// as candle's affine in `T` does (`T(att * T(scale))`), keys with `key_pos > q_start + q`
/// hidden, softmax `exp(x - max) * (1 / sum)` in f32. Returns the probabilities in `T`
/// `[rows, n]` and the f32 probabilities of the last `probed` queries of every query head
/// `[kv_heads * group, probed, n]`. A row without a visible key is all zeros.
pub fn prefill_softmax<T: KvElem>(
    shape: &SoftmaxShape,
    att: &[T],
    key_pos: &[u32],
    q_start: u32,
    scale: f32,
) -> Result<(Vec<T>, Vec<f32>), OpsError> {
    let s = shape;
    s.check(att.len(), key_pos.len())?;
    let n = s.n;
    let scale_t = T::from_f32(scale).to_f32();
    let mut p_out = Vec::with_capacity(att.len());
    let mut probs = vec![0f32; s.kv_heads * s.group * s.probed * n];
    let mut x = vec![0f32; n];
    for r in 0..s.rows() {
        let (kvh, j, q) = (r / (s.group * s.t), (r / s.t) % s.group, r % s.t);
        let qpos = q_start + q as u32;
        let kpos = &key_pos[kvh * n..][..n];
        let row = &att[r * n..][..n];
        let mut m = f32::NEG_INFINITY;
        for ((xi, a), &kp) in x.iter_mut().zip(row).zip(kpos) {
            *xi = if kp > qpos {
                f32::NEG_INFINITY
            } else {
                T::from_f32(a.to_f32() * scale_t).to_f32()
            };
            m = m.max(*xi);
        }
        let sum: f32 = x
            .iter()
            .filter(|v| **v != f32::NEG_INFINITY)
            .map(|v| (v - m).exp())
            .sum();
        let inv = 1.0 / sum;
        let first = s.t - s.probed;
        let base = ((kvh * s.group + j) * s.probed + q.saturating_sub(first)) * n;
        for (col, &v) in x.iter().enumerate() {
            let p = if v == f32::NEG_INFINITY || m == f32::NEG_INFINITY {
                0.0
            } else {
                (v - m).exp() * inv
            };
            p_out.push(T::from_f32(p));
            if q >= first {
                probs[base + col] = p;
            }
        }
    }
    Ok((p_out, probs))
}

/// Flash-style prefill attention (twin of `kernels/prefill_attention.cu`): for every row of
/// `q` `[kv_heads, group * t, head_dim]` (kv-head `r / (group * t)`, query `i = r % t` at
/// position `q_start + i`), softmax over the keys of its kv-head with `key_pos <= q_start + i`
/// of `(q . k) * scale`, times `v`; `k`, `v` `[kv_heads, n, head_dim]`, `key_pos`
/// `[kv_heads, n]` (u32::MAX: padding). Everything in f32 here; the kernel rounds the
/// probabilities to `T` for its tensor-core product, so the two agree to `T`'s precision, not
/// bit for bit. A row without a visible key is zeros. `shape.probed` is ignored (the kernel
/// writes no probabilities).
pub fn prefill_attention<T: KvElem>(
    shape: &SoftmaxShape,
    head_dim: usize,
    qkv: (&[T], &[T], &[T]),
    key_pos: &[u32],
    q_start: u32,
    scale: f32,
) -> Result<Vec<T>, OpsError> {
    let (s, d, (q, k, v)) = (shape, head_dim, qkv);
    check_len("q", q.len(), s.rows() * d)?;
    check_len("k", k.len(), s.kv_heads * s.n * d)?;
    check_len("v", v.len(), s.kv_heads * s.n * d)?;
    check_len("key_pos", key_pos.len(), s.kv_heads * s.n)?;
    let n = s.n;
    let mut out = Vec::with_capacity(q.len());
    let mut x = vec![0f32; n];
    let mut acc = vec![0f32; d];
    for r in 0..s.rows() {
        let kvh = r / (s.group * s.t);
        let qpos = q_start + (r % s.t) as u32;
        let qr: Vec<f32> = q[r * d..][..d].iter().map(|e| e.to_f32()).collect();
        let mut m = f32::NEG_INFINITY;
        for (j, xj) in x.iter_mut().enumerate() {
            *xj = if key_pos[kvh * n + j] > qpos {
                f32::NEG_INFINITY
            } else {
                let kr = &k[(kvh * n + j) * d..][..d];
                qr.iter().zip(kr).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale
            };
            m = m.max(*xj);
        }
        acc.fill(0.0);
        let mut sum = 0f32;
        if m != f32::NEG_INFINITY {
            for (j, &xj) in x.iter().enumerate() {
                if xj == f32::NEG_INFINITY {
                    continue;
                }
                let p = (xj - m).exp();
                sum += p;
                for (a, b) in acc.iter_mut().zip(&v[(kvh * n + j) * d..][..d]) {
                    *a += p * b.to_f32();
                }
            }
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        out.extend(acc.iter().map(|a| T::from_f32(a * inv)));
    }
    Ok(out)
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
pub fn paged_decode<T: KvElem>(
    shape: &DecodeShape,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    block_tables: &[u32],
    ctx_lens: &[u32],
    scale: f32,
    metric: Option<&mut [f32]>,
) -> Result<DecodeOut, OpsError> {
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

/// What one device-side KV-Compress eviction step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictStep {
    /// Candidates (blocks) taken per head.
    pub counts: Vec<u32>,
    /// Context length of each head after compaction.
    pub new_lens: Vec<u32>,
}

/// KV-Compress's eviction step for ONE sequence on slices (twin of `kernels/evict.cu`):
/// protected slots (`position >= seq.first_protected`) count as +inf, each head's slots are
/// sorted ascending (ties by logical index), candidates scored, the `seq.n_evict` lowest finite
/// candidates over all heads taken ([`crate::compress::kvcompress::select_blocks`]), each head
/// evicts the prefix [`crate::compress::kvcompress::head_evictions`] gives; with `seq.crush`,
/// KVCrush's block form takes its representatives back out of those prefixes
/// ([`crate::compress::kvcrush::block_picks`], layers of `seq.kv_heads` heads). Then each head
/// is compacted (tail survivors, tail-most first, into the lowest holes, as
/// [`super::blocks::BlockPool::plan_compaction`]) moving K, V, metric and position.
///
/// `block_tables`: `[heads, max_blocks]` (`heads` = `ctx_lens.len()`, `seq.heads` is not
/// read); `ctx_lens`: `[heads]` (updated); unprotected metrics must be finite.
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: &mut [f32],
    position: &mut [u32],
    block_tables: &[u32],
    ctx_lens: &mut [u32],
    max_blocks: usize,
    block_size: usize,
    head_dim: usize,
    seq: &EvictSeq,
) -> Result<EvictStep, OpsError> {
    use crate::compress::kvcompress::{head_evictions_of, select_blocks};
    let heads = ctx_lens.len();
    let num_slots = metric.len();
    check_len("position", position.len(), num_slots)?;
    check_len("k_cache", k_cache.len(), num_slots * head_dim)?;
    let shape = DecodeShape::for_eviction(heads, head_dim, max_blocks, block_size, num_slots);
    shape.check_disjoint(block_tables, ctx_lens)?;
    let slots: Vec<Vec<usize>> = (0..heads)
        .map(|h| {
            let t = &block_tables[h * max_blocks..];
            (0..ctx_lens[h] as usize)
                .map(|i| t[i / block_size] as usize * block_size + i % block_size)
                .collect()
        })
        .collect();
    let masked: Vec<Vec<f32>> = slots
        .iter()
        .map(|s| {
            s.iter()
                .map(|&x| {
                    if position[x] >= seq.first_protected {
                        f32::INFINITY
                    } else {
                        metric[x]
                    }
                })
                .collect()
        })
        .collect();
    let counts = select_blocks(&masked, block_size, seq.n_evict);
    let mut evicted = head_evictions_of(&masked, block_size, &counts);
    if let Some(picks) = &seq.crush {
        if seq.kv_heads == 0 || heads % seq.kv_heads != 0 {
            return Err(OpsError::Shape(format!(
                "KVCrush's picks group {heads} heads into layers of {} kv-heads",
                seq.kv_heads
            )));
        }
        let meta: Vec<(Vec<f32>, Vec<u32>)> = slots
            .iter()
            .map(|s| {
                (
                    s.iter().map(|&x| metric[x]).collect(),
                    s.iter().map(|&x| position[x]).collect(),
                )
            })
            .collect();
        let views: Vec<(&[f32], &[u32])> = meta.iter().map(|(m, p)| (&m[..], &p[..])).collect();
        crate::compress::kvcrush::block_picks(
            &views,
            &mut evicted,
            seq.kv_heads,
            seq.first_protected,
            block_size,
            picks,
        );
    }
    for (h, evict) in evicted.iter().enumerate() {
        if evict.is_empty() {
            continue;
        }
        let len = slots[h].len();
        let mut gone = vec![false; len];
        for &e in evict {
            gone[e] = true;
        }
        let new_len = len - evict.len();
        let holes = (0..new_len).filter(|&i| gone[i]);
        let tail = (new_len..len).rev().filter(|&i| !gone[i]);
        let (from, to): (Vec<u32>, Vec<u32>) = holes
            .zip(tail)
            .map(|(hole, t)| (slots[h][t] as u32, slots[h][hole] as u32))
            .unzip();
        move_slots(
            k_cache,
            v_cache,
            Some(metric),
            Some(position),
            &from,
            &to,
            head_dim,
        )?;
        ctx_lens[h] = new_len as u32;
    }
    Ok(EvictStep {
        counts: counts.into_iter().map(|c| c as u32).collect(),
        new_lens: ctx_lens.to_vec(),
    })
}

/// One sequence of a batched eviction step ([`kvcompress_evict_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictSeq {
    /// Its heads (layers x kv-heads): the next `heads` rows of the batch's tables.
    pub heads: usize,
    /// kv-heads per layer (how KVCrush's picks group the heads; read only with `crush`).
    pub kv_heads: usize,
    /// Its slots with `position >= first_protected` are never evicted.
    pub first_protected: u32,
    /// Blocks to evict over its heads.
    pub n_evict: usize,
    /// KVCrush's block form after the selection.
    pub crush: Option<crate::compress::kvcrush::BlockPicks>,
}

/// The block tables of many heads back to back, as the batched eviction takes them: head `h`
/// owns `blocks[start[h]..start[h + 1]]`, exactly `ceil(lens[h] / block_size)` blocks. Unlike a
/// `[heads, max_blocks]` array padded to the longest head, its size is the blocks in use: at 192
/// SmolLM2 sequences (17k heads) a padded table was ~35 MB built and uploaded per decode step
/// for ~2 MB of blocks, because one long head set the width of all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadTables {
    /// Physical block ids, head after head.
    pub blocks: Vec<u32>,
    /// `[heads + 1]`: where each head's blocks start in `blocks` (the last is `blocks.len()`).
    pub start: Vec<u32>,
    /// `[heads]`: tokens cached per head.
    pub lens: Vec<u32>,
}

impl HeadTables {
    /// Tables of `heads`, each its blocks and length.
    pub fn from_heads<'a>(heads: impl IntoIterator<Item = (&'a [u32], usize)>) -> Self {
        let mut t = HeadTables {
            start: vec![0],
            ..Default::default()
        };
        for (b, len) in heads {
            t.blocks.extend_from_slice(b);
            t.start.push(t.blocks.len() as u32);
            t.lens.push(len as u32);
        }
        t
    }

    /// Tables of every head of `seqs` in `pool`, (sequence, layer, kv-head) order: what a
    /// batched device eviction takes.
    pub fn of_seqs(
        pool: &super::blocks::BlockPool,
        seqs: &[super::SeqId],
    ) -> Result<Self, super::blocks::BlockError> {
        let tables = seqs
            .iter()
            .map(|&s| pool.table(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_heads(tables.into_iter().flat_map(|t| {
            t.blocks
                .iter()
                .flatten()
                .zip(t.len.iter().flatten())
                .map(|(b, &l)| (&b[..], l))
        })))
    }

    /// Tables of a padded `[heads, max_blocks]` array (each row's first `ceil(len /
    /// block_size)` blocks).
    pub fn from_padded(tables: &[u32], lens: &[u32], max_blocks: usize, block_size: usize) -> Self {
        Self::from_heads(lens.iter().enumerate().map(|(h, &l)| {
            let n = (l as usize).div_ceil(block_size.max(1)).min(max_blocks);
            (&tables[h * max_blocks..][..n], l as usize)
        }))
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.lens.len()
    }

    /// Blocks of the longest head's table (at least 1, as a padded table's width).
    pub fn max_blocks(&self) -> usize {
        self.start
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// `blocks` as a device upload takes it: never empty (an empty tensor cannot be launched
    /// on), one unread block 0 when no head holds any.
    pub fn upload_blocks(&self) -> &[u32] {
        if self.blocks.is_empty() {
            &[0]
        } else {
            &self.blocks
        }
    }

    /// Blocks of head `h`.
    pub fn head(&self, h: usize) -> &[u32] {
        &self.blocks[self.start[h] as usize..self.start[h + 1] as usize]
    }

    /// What the kernels need for memory safety: `start` partitions `blocks`, every head holds
    /// exactly `ceil(len / block_size)` blocks, and every block id is below `num_slots /
    /// block_size`.
    pub fn check(&self, block_size: usize, num_slots: usize) -> Result<(), OpsError> {
        self.validate(block_size, num_slots, false)
    }

    /// [`Self::check`], and no block belongs to two heads (one pass with a bitmap of the
    /// pool's blocks): what the eviction kernels and a decode call that adds the metric need.
    pub fn check_disjoint(&self, block_size: usize, num_slots: usize) -> Result<(), OpsError> {
        self.validate(block_size, num_slots, true)
    }

    pub(crate) fn validate(
        &self,
        block_size: usize,
        num_slots: usize,
        disjoint: bool,
    ) -> Result<(), OpsError> {
        let heads = self.heads();
        check_len("head table starts", self.start.len(), heads + 1)?;
        if block_size == 0 || self.start[0] != 0 || self.start[heads] as usize != self.blocks.len()
        {
            return Err(OpsError::Shape(format!(
                "head tables: starts must run from 0 to the {} blocks (got {:?}..{:?}), block size {block_size}",
                self.blocks.len(),
                self.start.first(),
                self.start.last()
            )));
        }
        for h in 0..heads {
            let (a, b) = (self.start[h], self.start[h + 1]);
            let want = (self.lens[h] as usize).div_ceil(block_size);
            if b < a || (b - a) as usize != want {
                return Err(OpsError::Shape(format!(
                    "head {h}: {} tokens need {want} blocks, its table has {}",
                    self.lens[h],
                    b as i64 - a as i64
                )));
            }
        }
        let num_blocks = num_slots / block_size;
        if let Some(&b) = self.blocks.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(OpsError::Slot {
                what: "head tables (block id)",
                slot: b as usize,
                num_slots: num_blocks,
            });
        }
        if !disjoint {
            return Ok(());
        }
        distinct_blocks(
            "head tables (block id)",
            self.blocks.iter().copied(),
            num_blocks,
        )
    }
}

/// No id of `blocks` (block or slot ids, each below `num_blocks`) appears twice: one pass with
/// a bitmap (a decode step that adds the metric checks every layer's tables, ~50k blocks each
/// at batch 96, where sorting them cost milliseconds per step).
fn distinct_blocks(
    what: &'static str,
    blocks: impl IntoIterator<Item = u32>,
    num_blocks: usize,
) -> Result<(), OpsError> {
    let mut seen = vec![0u64; num_blocks.div_ceil(64)];
    for b in blocks {
        let (w, bit) = (b as usize / 64, 1u64 << (b % 64));
        if seen[w] & bit != 0 {
            return Err(OpsError::Repeated {
                what,
                slot: b as usize,
            });
        }
        seen[w] |= bit;
    }
    Ok(())
}

/// [`kvcompress_evict`] for several sequences at once (twin of the batched launches of
/// `kernels/evict.cu`): sequence `i` owns the next `seqs[i].heads` heads of `tables` and is
/// evicted on its own. Tables must be disjoint (sequences own their blocks); `tables` is not
/// changed (the new lengths are in the returned steps).
#[allow(clippy::too_many_arguments)]
pub fn kvcompress_evict_batch<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: &mut [f32],
    position: &mut [u32],
    tables: &HeadTables,
    seqs: &[EvictSeq],
    block_size: usize,
    head_dim: usize,
) -> Result<Vec<EvictStep>, OpsError> {
    let heads: usize = seqs.iter().map(|s| s.heads).sum();
    check_len("head tables", tables.heads(), heads)?;
    tables.check_disjoint(block_size, metric.len())?;
    let mut first = 0;
    let mut steps = Vec::with_capacity(seqs.len());
    for s in seqs {
        let rows = first..first + s.heads;
        first = rows.end;
        // This sequence's heads as the one-sequence twin takes them (padded to its longest).
        let max_blocks = rows
            .clone()
            .map(|h| tables.head(h).len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut padded = vec![0u32; s.heads * max_blocks];
        for (row, h) in padded.chunks_exact_mut(max_blocks).zip(rows.clone()) {
            row[..tables.head(h).len()].copy_from_slice(tables.head(h));
        }
        let mut lens = tables.lens[rows].to_vec();
        steps.push(kvcompress_evict(
            k_cache, v_cache, metric, position, &padded, &mut lens, max_blocks, block_size,
            head_dim, s,
        )?);
    }
    Ok(steps)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn write_then_move_follow_the_plan() {
        let d = 2;
        let mut k = vec![0f32; 8 * d];
        let mut v = vec![0f32; 8 * d];
        let mut m = vec![9f32; 8];
        let mut p = vec![0u32; 8];
        let kn: Vec<f32> = (0..3 * d).map(|x| x as f32).collect();
        let vn: Vec<f32> = kn.iter().map(|x| -x).collect();
        write_kv(
            &mut k,
            &mut v,
            Some(&mut m),
            Some(&mut p),
            &kn,
            &vn,
            &[5, 1, 7],
            &[10, 11, 12],
            d,
        )
        .unwrap();
        assert_eq!(&k[10..12], &[0., 1.]);
        assert_eq!(&v[2..4], &[-2., -3.]);
        assert_eq!((m[5], m[0], p[7]), (0., 9., 12));
        move_slots(
            &mut k,
            &mut v,
            Some(&mut m),
            Some(&mut p),
            &[7, 1],
            &[0, 3],
            d,
        )
        .unwrap();
        assert_eq!(&k[0..2], &[4., 5.]);
        assert_eq!((p[0], p[3]), (12, 11));
        // repeated / overlapping / out-of-range plans are refused
        let e = move_slots(&mut k, &mut v, None, None, &[1, 2], &[2, 3], d);
        assert!(matches!(e, Err(OpsError::Repeated { .. })), "{e:?}");
        let e = move_slots(&mut k, &mut v, None, None, &[9], &[0], d);
        assert!(matches!(e, Err(OpsError::Slot { .. })), "{e:?}");
        let e = write_kv(&mut k, &mut v, None, None, &kn, &vn, &[1, 1, 2], &[0; 3], d);
        assert!(matches!(e, Err(OpsError::Repeated { .. })), "{e:?}");
    }

    #[test]
    fn long_slot_lists_are_checked_like_short_ones() {
        // Both branches of check_slots (runs below num_slots / 256 slots, bitmap above) give
        // the same verdicts.
        let num_slots = 4096;
        for n in [3usize, 2000] {
            let from: Vec<u32> = (0..n as u32).collect();
            let to: Vec<u32> = (0..n as u32).map(|x| x + n as u32).collect();
            assert_eq!(check_moves(num_slots, &from, &to), Ok(()), "n {n}");
            let mut rep = to.clone();
            rep[n - 1] = from[0];
            let e = check_moves(num_slots, &from, &rep);
            assert!(
                matches!(e, Err(OpsError::Repeated { slot: 0, .. })),
                "n {n}: {e:?}"
            );
            let mut out = to.clone();
            out[0] = num_slots as u32;
            let e = check_moves(num_slots, &from, &out);
            assert!(
                matches!(e, Err(OpsError::Slot { slot: 4096, .. })),
                "n {n}: {e:?}"
            );
        }
    }

    /// The runs-as-intervals check against counting every slot: random lists made of runs
    /// (as the pool hands slots out), some with a slot listed twice across or within lists.
    #[test]
    fn slot_runs_check_agrees_with_counting() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let num_slots = 1 << 16; // lists stay below num_slots / 256: the runs branch
        for case in 0..400 {
            let mut lists: Vec<Vec<u32>> = vec![Vec::new(); rng.random_range(1..=3)];
            for _ in 0..rng.random_range(1..12) {
                let l = rng.random_range(0..lists.len());
                let start = rng.random_range(0..2000u32);
                let len = rng.random_range(1..16u32);
                lists[l].extend(start..start + len);
            }
            let refs: Vec<&[u32]> = lists.iter().map(|l| &l[..]).collect();
            let mut count = std::collections::HashMap::new();
            for &x in refs.iter().flat_map(|l| l.iter()) {
                *count.entry(x).or_insert(0) += 1;
            }
            match check_slots("t", &refs, num_slots) {
                Ok(()) => assert!(count.values().all(|&c| c == 1), "case {case}: {lists:?}"),
                Err(OpsError::Repeated { slot, .. }) => {
                    assert!(
                        count[&(slot as u32)] > 1,
                        "case {case}: slot {slot} of {lists:?}"
                    )
                }
                Err(e) => panic!("case {case}: {e:?}"),
            }
        }
    }

    #[test]
    fn set_meta_sets_listed_slots_and_refuses_repeats() {
        let (mut m, mut p) = (vec![9f32; 6], vec![7u32; 6]);
        set_meta(&mut m, &mut p, &[4, 1], &[0.5, 1.5], &[40, 10]).unwrap();
        assert_eq!(m, vec![9., 1.5, 9., 9., 0.5, 9.]);
        assert_eq!(p, vec![7, 10, 7, 7, 40, 7]);
        let e = set_meta(&mut m, &mut p, &[2, 2], &[0.; 2], &[0; 2]);
        assert!(
            matches!(e, Err(OpsError::Repeated { slot: 2, .. })),
            "{e:?}"
        );
        let e = set_meta(&mut m, &mut p, &[6], &[0.], &[0]);
        assert!(matches!(e, Err(OpsError::Slot { slot: 6, .. })), "{e:?}");
        let e = set_meta(&mut m, &mut p, &[1], &[0.; 2], &[0]);
        assert!(matches!(e, Err(OpsError::Len { .. })), "{e:?}");
    }

    #[test]
    fn copy_blocks_copies_whole_blocks_and_refuses_overlaps() {
        // 4 blocks of 2 slots, head dim 3: copy block 0 -> 3 and block 2 -> 1.
        let (bs, d) = (2, 3);
        let mut k: Vec<f32> = (0..8 * d).map(|x| x as f32).collect();
        let mut v: Vec<f32> = k.iter().map(|x| -x).collect();
        let mut m: Vec<f32> = (0..8).map(|x| x as f32 / 10.0).collect();
        let mut p: Vec<u32> = (100..108).collect();
        let (k0, v0, m0, p0) = (k.clone(), v.clone(), m.clone(), p.clone());
        copy_blocks(
            &mut k,
            &mut v,
            Some(&mut m),
            Some(&mut p),
            &[0, 2],
            &[3, 1],
            bs,
            d,
        )
        .unwrap();
        for (from, to) in [(0usize, 3usize), (2, 1)] {
            let (f, t) = (from * bs, to * bs);
            assert_eq!(k[t * d..(t + bs) * d], k0[f * d..(f + bs) * d]);
            assert_eq!(v[t * d..(t + bs) * d], v0[f * d..(f + bs) * d]);
            assert_eq!(m[t..t + bs], m0[f..f + bs]);
            assert_eq!(p[t..t + bs], p0[f..f + bs]);
        }
        // Sources unchanged.
        assert_eq!(
            (k[..2 * d].to_vec(), p[4..6].to_vec()),
            (k0[..2 * d].to_vec(), p0[4..6].to_vec())
        );
        let mut run =
            |from: &[u32], to: &[u32]| copy_blocks(&mut k, &mut v, None, None, from, to, bs, d);
        // A destination that is also a source, a block past the pool, unequal lists.
        assert!(matches!(
            run(&[0, 1], &[1, 3]),
            Err(OpsError::Repeated { slot: 1, .. })
        ));
        assert!(matches!(
            run(&[0], &[4]),
            Err(OpsError::Slot { slot: 4, .. })
        ));
        assert!(matches!(run(&[0, 1], &[3]), Err(OpsError::Len { .. })));
    }

    #[test]
    fn head_tables_hold_the_blocks_in_use_and_refuse_bad_ones() {
        // bs 4: head 0 has 5 tokens (2 blocks), head 1 none, head 2 4 tokens (1 block).
        let padded = [7, 2, 9, 9, 9, 9, 3, 9, 9];
        let t = HeadTables::from_padded(&padded, &[5, 0, 4], 3, 4);
        assert_eq!(t.blocks, vec![7, 2, 3]);
        assert_eq!(t.start, vec![0, 2, 2, 3]);
        assert_eq!(
            (t.head(0), t.head(1), t.head(2)),
            (&[7, 2][..], &[][..], &[3][..])
        );
        assert_eq!(t.check_disjoint(4, 8 * 4), Ok(()));
        assert_eq!((t.max_blocks(), t.upload_blocks()), (2, &[7, 2, 3][..]));
        let none = HeadTables::from_padded(&[5, 5], &[0, 0], 1, 4);
        assert_eq!((none.max_blocks(), none.upload_blocks()), (1, &[0][..]));
        // a block id past the pool, a block twice, a head with a block too few or too many
        let e = t.check_disjoint(4, 7 * 4);
        assert!(matches!(e, Err(OpsError::Slot { slot: 7, .. })), "{e:?}");
        let mut dup = t.clone();
        dup.blocks[2] = 7;
        let e = dup.check_disjoint(4, 8 * 4);
        assert!(
            matches!(e, Err(OpsError::Repeated { slot: 7, .. })),
            "{e:?}"
        );
        let mut short = t.clone();
        short.lens[2] = 5;
        assert!(matches!(
            short.check_disjoint(4, 32),
            Err(OpsError::Shape(_))
        ));
        let mut cut = t.clone();
        cut.start[3] = 2;
        assert!(matches!(cut.check_disjoint(4, 32), Err(OpsError::Shape(_))));
    }

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
        let r = paged_decode(
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
        let bad = paged_decode(&shape, &q, &k, &v, &[3, 4, 0], &[3], 0.5, None);
        assert!(matches!(bad, Err(OpsError::Slot { .. })), "{bad:?}");
        let bad = paged_decode(&shape, &q, &k, &v, &[3, 3, 0], &[3], 0.5, Some(&mut metric));
        assert!(matches!(bad, Err(OpsError::Repeated { .. })), "{bad:?}");
    }

    #[test]
    fn evict_twin_compacts_like_the_pool() {
        use crate::kvcache::blocks::BlockPool;
        // 2 heads, block size 2; head 0: 5 tokens, head 1: 3 tokens.
        let mut pool = BlockPool::new(1, 2, 2, 8).unwrap();
        pool.add_seq(0).unwrap();
        pool.append(0, 0, 0, &[0, 1, 2, 3, 4]).unwrap();
        pool.append(0, 0, 1, &[0, 1, 2]).unwrap();
        let mut metric = vec![0f32; 16];
        let mut position = vec![0u32; 16];
        let ms = [[5.0, 0.1, 0.2, 9.0, 1.0], [0.05, 7.0, 1.0, 0.0, 0.0]];
        for h in 0..2 {
            for (i, s) in pool.slots(0, 0, h).unwrap().into_iter().enumerate() {
                metric[s] = ms[h][i];
                position[s] = i as u32;
            }
        }
        let t = pool.table(0).unwrap();
        let mut tables = vec![0u32; 2 * 3];
        for h in 0..2 {
            tables[h * 3..][..t.blocks[0][h].len()].copy_from_slice(&t.blocks[0][h]);
        }
        let mut lens = vec![5u32, 3];
        let d = 1;
        let mut k: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let mut v = k.clone();
        // protect position 4 (head 0's last token); evict 2 blocks.
        let st = kvcompress_evict(
            &mut k,
            &mut v,
            &mut metric,
            &mut position,
            &tables,
            &mut lens,
            3,
            2,
            d,
            &EvictSeq {
                heads: 2,
                kv_heads: 2,
                first_protected: 4,
                n_evict: 2,
                crush: None,
            },
        )
        .unwrap();
        // head 0 (h = 1): masked sorted [0.1, 0.2, 5, 9, inf] -> candidates (sorted index
        // 0, 2, 4) [0.1, 5, inf]; head 1 (h = 1): sorted [0.05, 1, 7] -> [0.05, 7].
        // Lowest two: 0.05 (head 1), 0.1 (head 0); each head evicts its lowest slot.
        assert_eq!(st.counts, vec![1, 1]);
        assert_eq!(st.new_lens, vec![4, 2]);
        let mut sorted0: Vec<u32> = (0..4)
            .map(|i| position[tables[i / 2] as usize * 2 + i % 2])
            .collect();
        sorted0.sort();
        assert_eq!(sorted0, vec![0, 2, 3, 4]);
    }

    /// The twins agree with the CPU paged cache (the oracle path): after random appends and a
    /// compaction, `paged_decode` over the pool's tables equals `PagedCache::attend` for a
    /// decode step (outputs and probabilities), and `kvcompress_evict` equals the host plan
    /// (`select_blocks` + `head_evictions` + `BlockPool::plan_compaction`).
    /// Key positions of `nkv` heads of `n` keys, unsorted (as after evictions), some after the
    /// first queries of the prefill tests, the last key of head 1 padding.
    fn unsorted_positions(nkv: usize, n: usize) -> Vec<u32> {
        (0..nkv * n)
            .map(|i| {
                let (h, j) = (i / n, i % n);
                if h == 1 && j == n - 1 {
                    u32::MAX
                } else {
                    ((j * 7 + h * 3) % 15) as u32
                }
            })
            .collect()
    }

    /// The candle chain's additive causal mask `[1, kv_heads, g * t, n]` from positions `kp`
    /// `[kv_heads, n]`, every query head of a group masked alike.
    fn group_mask(
        kp: &candle_core::Tensor,
        q_start: u32,
        g: usize,
        t: usize,
    ) -> candle_core::Tensor {
        let (nkv, n) = kp.dims2().unwrap();
        crate::kvcache::causal_mask(kp, q_start as usize, t)
            .unwrap()
            .reshape((nkv, 1, t, n))
            .unwrap()
            .broadcast_as((nkv, g, t, n))
            .unwrap()
            .reshape((1, nkv, g * t, n))
            .unwrap()
    }

    /// The prefill softmax twin (the oracle of `kernels/prefill_softmax.cu`) computes what the
    /// candle chain of the CPU paged cache computes: scale in T, f32, causal mask from
    /// unsorted key positions with padding, softmax; probed rows are the last queries.
    #[test]
    fn prefill_softmax_twin_matches_the_candle_chain() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let (nkv, g, t, n, q_start, probed) = (2usize, 3usize, 5usize, 13usize, 9u32, 2usize);
        let scale = 0.37f32;
        // Unsorted positions (as after evictions), some after the first queries, one padding.
        let key_pos = unsorted_positions(nkv, n);
        let shape = SoftmaxShape {
            kv_heads: nkv,
            group: g,
            t,
            n,
            probed,
        };
        for dtype in [DType::F32, DType::BF16] {
            let att = Tensor::randn(0f32, 3.0, (1, nkv, g * t, n), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let kp = Tensor::from_vec(key_pos.clone(), (nkv, n), &dev).unwrap();
            let mask = group_mask(&kp, q_start, g, t);
            let scaled = (att.clone() * scale as f64)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let want =
                candle_nn::ops::softmax_last_dim(&scaled.broadcast_add(&mask).unwrap()).unwrap();
            let want_f: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let want_t: Vec<f32> = want
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (got_t, got_p): (Vec<f32>, Vec<f32>) = match dtype {
                DType::F32 => {
                    let a: Vec<f32> = att.flatten_all().unwrap().to_vec1().unwrap();
                    prefill_softmax(&shape, &a, &key_pos, q_start, scale).unwrap()
                }
                _ => {
                    let a: Vec<bf16> = att.flatten_all().unwrap().to_vec1().unwrap();
                    let (p, probs) = prefill_softmax(&shape, &a, &key_pos, q_start, scale).unwrap();
                    (p.iter().map(|x| x.to_f32()).collect(), probs)
                }
            };
            let ulp_t = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
            for (i, (a, b)) in got_t.iter().zip(&want_t).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-7 + ulp_t * b.abs(),
                    "{dtype:?} p[{i}]: {a} vs {b}"
                );
            }
            let mut hidden = 0;
            for h in 0..nkv * g {
                for qq in 0..probed {
                    let q = t - probed + qq;
                    for j in 0..n {
                        let a = got_p[(h * probed + qq) * n + j];
                        let b = want_f[(h * t + q) * n + j];
                        assert!(
                            (a - b).abs() <= 1e-6,
                            "{dtype:?} probs h{h} q{q} k{j}: {a} vs {b}"
                        );
                        hidden += usize::from(b == 0.0);
                    }
                }
            }
            assert!(
                hidden > 0,
                "the mask must hide some keys of the probed queries"
            );
        }
        // Bad shapes are refused.
        let bad = SoftmaxShape {
            probed: t + 1,
            ..shape
        };
        assert!(prefill_softmax(&bad, &vec![0f32; shape.rows() * n], &key_pos, 0, 1.0).is_err());
        assert!(prefill_softmax(&shape, &[0f32; 3], &key_pos, 0, 1.0).is_err());
    }

    /// The flash prefill twin (the oracle of `kernels/prefill_attention.cu`) computes the CPU
    /// paged cache's candle chain in f32 (scores, scale, causal mask from unsorted positions,
    /// softmax, p @ v), and never reads a padding key's K/V (NaN there changes nothing).
    #[test]
    fn prefill_attention_twin_matches_the_candle_chain() {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        let (nkv, g, t, n, d, q_start) = (2usize, 3usize, 5usize, 13usize, 8usize, 9u32);
        let scale = 0.37f32;
        let key_pos = unsorted_positions(nkv, n);
        let shape = SoftmaxShape {
            kv_heads: nkv,
            group: g,
            t,
            n,
            probed: 0,
        };
        let q = Tensor::randn(0f32, 1.0, (1, nkv, g * t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, n, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, n, d), &dev).unwrap();
        let kp = Tensor::from_vec(key_pos.clone(), (nkv, n), &dev).unwrap();
        let mask = group_mask(&kp, q_start, g, t);
        let att = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&att.broadcast_add(&mask).unwrap()).unwrap();
        let want: Vec<f32> = p
            .matmul(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat = |x: &Tensor| -> Vec<f32> { x.flatten_all().unwrap().to_vec1().unwrap() };
        let (qf, mut kf, mut vf) = (flat(&q), flat(&k), flat(&v));
        // The padding key's rows: NaN.
        for x in kf[(2 * n - 1) * d..][..d]
            .iter_mut()
            .chain(&mut vf[(2 * n - 1) * d..][..d])
        {
            *x = f32::NAN;
        }
        let got = prefill_attention(&shape, d, (&qf, &kf, &vf), &key_pos, q_start, scale).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5, "out[{i}]: {a} vs {b}");
        }
        // A query that sees no key (every position later than it) gives zeros.
        let late: Vec<u32> = key_pos.iter().map(|p| p.saturating_add(100)).collect();
        let zeros = prefill_attention(&shape, d, (&qf, &kf, &vf), &late, 0, scale).unwrap();
        assert!(zeros.iter().all(|x| *x == 0.0));
        assert!(prefill_attention(&shape, d, (&qf[1..], &kf, &vf), &key_pos, 0, 1.0).is_err());
    }

    #[test]
    fn twins_agree_with_the_cpu_paged_cache() {
        use crate::compress::kvcompress::{head_evictions, select_blocks};
        use crate::kvcache::blocks::{EvictionPlan, HeadEviction};
        use crate::kvcache::paged::{PagedCache, PagedSpec};
        use crate::kvcache::{AttnCall, CacheBackend, Probe};
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let (nkv, g, d, bs, t) = (2usize, 3usize, 8usize, 4usize, 23usize);
        let nh = nkv * g;
        let spec = PagedSpec {
            layers: 1,
            kv_heads: nkv,
            head_dim: d,
            block_size: bs,
            dtype: DType::F32,
            device: dev.clone(),
        };
        let mut cache = PagedCache::new(spec, 40).unwrap();
        let s = cache.add_sequence().unwrap();
        let q = Tensor::randn(0f32, 1.0, (1, nh, t + 1, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, nkv, t + 1, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, nkv, t + 1, d), &dev).unwrap();
        let nar = |x: &Tensor, a: usize, n: usize| x.narrow(2, a, n).unwrap().contiguous().unwrap();
        cache
            .attend(AttnCall {
                layer: 0,
                seqs: &[s],
                q: &nar(&q, 0, t),
                k: &nar(&k, 0, t),
                v: &nar(&v, 0, t),
                scale: 0.35,
                probe: Probe::None,
            })
            .unwrap();
        // Evict a few slots of head 1 so the tables are not in position order.
        cache
            .evict(
                s,
                &EvictionPlan {
                    heads: vec![HeadEviction {
                        layer: 0,
                        kv_head: 1,
                        evict: vec![0, 3, 7, 8, 9],
                    }],
                },
            )
            .unwrap();
        // Decode step on the CPU path, then the twin over the same (post-append) state.
        let out = cache
            .attend(AttnCall {
                layer: 0,
                seqs: &[s],
                q: &nar(&q, t, 1),
                k: &nar(&k, t, 1),
                v: &nar(&v, t, 1),
                scale: 0.35,
                probe: Probe::All,
            })
            .unwrap();
        let pool = cache.pool();
        let lens: Vec<u32> = (0..nkv)
            .map(|h| pool.len(0, s, h).unwrap() as u32)
            .collect();
        let max_len = *lens.iter().max().unwrap() as usize;
        let mb = max_len.div_ceil(bs);
        let mut tables = vec![0u32; nkv * mb];
        for h in 0..nkv {
            let bl = &pool.table(s).unwrap().blocks[0][h];
            tables[h * mb..][..bl.len()].copy_from_slice(bl);
        }
        // Whole K/V storage as slices (gathering every slot in physical order).
        let num_slots = pool.num_blocks() * bs;
        let all: Vec<u32> = (0..num_slots as u32).collect();
        let idx = Tensor::new(all.as_slice(), &dev).unwrap();
        let shape = DecodeShape {
            batch: 1,
            num_kv_heads: nkv,
            group: g,
            head_dim: d,
            max_blocks: mb,
            block_size: bs,
            probs_stride: max_len,
            num_slots,
        };
        let phys = |x: &Tensor| -> Vec<f32> {
            x.index_select(&idx, 0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (kv_k, kv_v) = cache.storage();
        let qv: Vec<f32> = nar(&q, t, 1).flatten_all().unwrap().to_vec1().unwrap();
        let r = paged_decode(
            &shape,
            &qv,
            &phys(kv_k),
            &phys(kv_v),
            &tables,
            &lens,
            0.35,
            None,
        )
        .unwrap();
        let want_out: Vec<f32> = out.out.flatten_all().unwrap().to_vec1().unwrap();
        let want_p: Vec<f32> = out.probs.unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in r.out.iter().zip(&want_out) {
            assert!((a - b).abs() < 1e-5, "out {a} vs {b}");
        }
        for (a, b) in r.probs.iter().zip(&want_p) {
            assert!((a - b).abs() < 1e-6, "probs {a} vs {b}");
        }

        // Eviction twin vs the host plan on the pool's own metrics (with ties).
        let metrics: Vec<Vec<f32>> = (0..nkv)
            .map(|h| {
                (0..lens[h] as usize)
                    .map(|i| ((i * 7 + h) % 5) as f32)
                    .collect()
            })
            .collect();
        for (h, m) in metrics.iter().enumerate() {
            cache.add_metric(0, s, h, m).unwrap();
        }
        let first_protected = (t + 1 - 3) as u32;
        let pool = cache.pool();
        let mut metric = vec![0f32; num_slots];
        let mut position = vec![0u32; num_slots];
        let mut masked = Vec::new();
        for h in 0..nkv {
            let sl = pool.slots(0, s, h).unwrap();
            let mm = pool.metrics(0, s, h).unwrap();
            let pp = pool.positions(0, s, h).unwrap();
            for i in 0..sl.len() {
                metric[sl[i]] = mm[i];
                position[sl[i]] = pp[i];
            }
            masked.push(
                mm.iter()
                    .zip(&pp)
                    .map(|(&m, &p)| {
                        if p >= first_protected {
                            f32::INFINITY
                        } else {
                            m
                        }
                    })
                    .collect::<Vec<f32>>(),
            );
        }
        let counts = select_blocks(&masked, bs, 3);
        let mut plan = EvictionPlan::default();
        for (h, &c) in counts.iter().enumerate() {
            plan.heads.push(HeadEviction {
                layer: 0,
                kv_head: h,
                evict: head_evictions(&masked[h], bs, c),
            });
        }
        let mut kf = phys(cache.storage().0);
        let mut vf = phys(cache.storage().1);
        let mut lens2 = lens.clone();
        let st = kvcompress_evict(
            &mut kf,
            &mut vf,
            &mut metric,
            &mut position,
            &tables,
            &mut lens2,
            mb,
            bs,
            d,
            &EvictSeq {
                heads: lens.len(),
                kv_heads: lens.len(),
                first_protected,
                n_evict: 3,
                crush: None,
            },
        )
        .unwrap();
        assert_eq!(
            st.counts,
            counts.iter().map(|&c| c as u32).collect::<Vec<_>>()
        );
        cache.evict(s, &plan).unwrap();
        let pool = cache.pool();
        for h in 0..nkv {
            assert_eq!(pool.len(0, s, h).unwrap() as u32, lens2[h]);
            let sl = pool.slots(0, s, h).unwrap();
            let got_pos: Vec<u32> = sl.iter().map(|&x| position[x]).collect();
            assert_eq!(got_pos, pool.positions(0, s, h).unwrap(), "head {h}");
            let got_m: Vec<f32> = sl.iter().map(|&x| metric[x]).collect();
            assert_eq!(got_m, pool.metrics(0, s, h).unwrap(), "head {h}");
        }
        assert_eq!(phys(cache.storage().0), kf);
    }
}
