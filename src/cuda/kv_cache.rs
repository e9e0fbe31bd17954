//! `kernels/kv_cache.cu`: K/V rows into their slots, compaction moves, whole-block copies, K/V
//! gathers, metric/position writes and a u32 scatter. Each wrapper checks shapes and slot lists
//! on the host, then launches on the tensors' stream in place; each `*_twin` is the same
//! contract on host slices (the tests' oracle).
//!
//! One file, over the usual length, because the layer keeps one wrapper file per kernel file:
//! the seven kernels of `kv_cache.cu` share their slot and shape checks with their twins.
use candle_core::{DType, Result, Tensor};

use super::{check_cache, check_len, check_meta, check_slots, OpsError, OpsResult};

/// Validate [`set_meta`]'s arguments: metric and position of `num_slots` entries, `m` and `p`
/// one per slot, slots distinct and below `num_slots`.
pub fn check_meta_set(
    num_slots: usize,
    positions_len: usize,
    slots: &[u32],
    m: &[f32],
    p: &[u32],
) -> OpsResult<()> {
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
) -> OpsResult<()> {
    let n = slots.len();
    check_len("write_kv positions", positions.len(), n)?;
    check_len("write_kv k_new/v_new", new_elems, n * head_dim)?;
    check_slots("write_kv slots", &[slots], num_slots)
}

/// Validate a move plan: `from`/`to` of equal length, in range, and all `from ∪ to` distinct
/// (compaction moves tail survivors into evicted holes, so the copies commute).
pub fn check_moves(num_slots: usize, from: &[u32], to: &[u32]) -> OpsResult<()> {
    check_len("move_slots to", to.len(), from.len())?;
    check_slots("move_slots from/to", &[from, to], num_slots)
}

/// Validate [`copy_blocks`]'s lists for a pool of `num_slots` slots in blocks of `block_size`.
pub fn check_block_copies(
    num_slots: usize,
    block_size: usize,
    from: &[u32],
    to: &[u32],
) -> OpsResult<()> {
    check_len("copy_blocks to", to.len(), from.len())?;
    if block_size == 0 {
        return Err(OpsError::Shape("copy_blocks: block size 0".into()));
    }
    check_slots("copy_blocks from/to", &[from, to], num_slots / block_size)
}

/// Set `metric[slots[i]] = m[i]` and `position[slots[i]] = p[i]` (twin of `set_meta`); slots
/// distinct and in range.
pub fn set_meta_twin(
    metric: &mut [f32],
    position: &mut [u32],
    slots: &[u32],
    m: &[f32],
    p: &[u32],
) -> OpsResult<()> {
    check_meta_set(metric.len(), position.len(), slots, m, p)?;
    for ((&s, &mv), &pv) in slots.iter().zip(m).zip(p) {
        metric[s as usize] = mv;
        position[s as usize] = pv;
    }
    Ok(())
}

/// Write new K/V rows (RoPE applied) into `slots`, setting their metric to 0 and their position.
/// Twin of `write_kv_<dtype>`. `k_cache`/`v_cache`: `[num_slots, head_dim]`; `metric`,
/// `position`: `[num_slots]` (skipped when `None`); `k_new`/`v_new`: `[n, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn write_kv_twin<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: Option<&mut [f32]>,
    position: Option<&mut [u32]>,
    k_new: &[T],
    v_new: &[T],
    slots: &[u32],
    positions: &[u32],
    head_dim: usize,
) -> OpsResult<()> {
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

/// Execute a compaction move plan: copy K, V, metric and position of slot `from[i]` to slot
/// `to[i]`. Twin of `move_slots_<dtype>`.
pub fn move_slots_twin<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: Option<&mut [f32]>,
    position: Option<&mut [u32]>,
    from: &[u32],
    to: &[u32],
    head_dim: usize,
) -> OpsResult<()> {
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
pub fn copy_blocks_twin<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    metric: Option<&mut [f32]>,
    position: Option<&mut [u32]>,
    from: &[u32],
    to: &[u32],
    block_size: usize,
    head_dim: usize,
) -> OpsResult<()> {
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

/// Write `k_new`/`v_new` `[n, head_dim]` into rows `slots` of `k_cache`/`v_cache`
/// `[num_slots, head_dim]` (in place); when given, set `metric[slot] = 0` and
/// `position[slot] = positions[i]`. Twin: [`write_kv`].
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
/// `from ∪ to` must be distinct. Twin: [`move_slots`].
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

/// Copy whole blocks on the device (twin: [`copy_blocks`]): block `to[i]` gets
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
/// [`set_meta`]): one thread per slot, where candle's `scatter_set` of a 1-D
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
#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

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
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches through cudarc on candle's stream.
    use super::*;
    use crate::cuda::launch::{cu, device, dtype_name, func, grid_1d, ptr};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

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
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn write_then_move_follow_the_plan() {
        let d = 2;
        let mut k = vec![0f32; 8 * d];
        let mut v = vec![0f32; 8 * d];
        let mut m = vec![9f32; 8];
        let mut p = vec![0u32; 8];
        let kn: Vec<f32> = (0..3 * d).map(|x| x as f32).collect();
        let vn: Vec<f32> = kn.iter().map(|x| -x).collect();
        write_kv_twin(
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
        move_slots_twin(
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
        let e = move_slots_twin(&mut k, &mut v, None, None, &[1, 2], &[2, 3], d);
        assert!(matches!(e, Err(OpsError::Repeated { .. })), "{e:?}");
        let e = move_slots_twin(&mut k, &mut v, None, None, &[9], &[0], d);
        assert!(matches!(e, Err(OpsError::Slot { .. })), "{e:?}");
        let e = write_kv_twin(&mut k, &mut v, None, None, &kn, &vn, &[1, 1, 2], &[0; 3], d);
        assert!(matches!(e, Err(OpsError::Repeated { .. })), "{e:?}");
    }

    #[test]
    fn set_meta_sets_listed_slots_and_refuses_repeats() {
        let (mut m, mut p) = (vec![9f32; 6], vec![7u32; 6]);
        set_meta_twin(&mut m, &mut p, &[4, 1], &[0.5, 1.5], &[40, 10]).unwrap();
        assert_eq!(m, vec![9., 1.5, 9., 9., 0.5, 9.]);
        assert_eq!(p, vec![7, 10, 7, 7, 40, 7]);
        let e = set_meta_twin(&mut m, &mut p, &[2, 2], &[0.; 2], &[0; 2]);
        assert!(
            matches!(e, Err(OpsError::Repeated { slot: 2, .. })),
            "{e:?}"
        );
        let e = set_meta_twin(&mut m, &mut p, &[6], &[0.], &[0]);
        assert!(matches!(e, Err(OpsError::Slot { slot: 6, .. })), "{e:?}");
        let e = set_meta_twin(&mut m, &mut p, &[1], &[0.; 2], &[0]);
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
        copy_blocks_twin(
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
        let mut run = |from: &[u32], to: &[u32]| {
            copy_blocks_twin(&mut k, &mut v, None, None, from, to, bs, d)
        };
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
