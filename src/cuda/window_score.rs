//! `kernels/window_score.cu`: the compression methods' attention scores of probed queries in
//! one launch: per query head the probed queries' probabilities summed (squared for L2), the
//! slots pooled along the key axis, the group's query heads summed; only `[kv_heads, max_len]`
//! leaves the device. [`window_score_twin`] is the same on host slices.
use candle_core::{DType, Result, Tensor};

use super::OpsError;

/// Pooling along the key axis.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolKind {
    Max,
    Avg,
}

/// 1-d pooling with kernel `k`, padding `k / 2`, stride 1 (output length = input length for
/// odd `k`; even kernels are applied centred with the extra element on the right, keeping the
/// length). Max ignores padding; average counts it (PyTorch's defaults).
pub fn pool1d(x: &[f32], k: usize, kind: PoolKind) -> Vec<f32> {
    if k <= 1 {
        return x.to_vec();
    }
    let pad = k / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(pad);
            let hi = (i + k - pad).min(x.len());
            let w = &x[lo..hi];
            match kind {
                PoolKind::Max => w.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                PoolKind::Avg => w.iter().sum::<f32>() / k as f32,
            }
        })
        .collect()
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
    /// A (query, key) pair counts only when `key_pos + buffer <= query_pos` (0: every pair);
    /// the probed queries are the last `n` positions up to the newest slot position.
    pub buffer: usize,
}

/// The index of the first probed query (of `n`, the last at position `newest`) that may count
/// for a key at `key_pos` under `buffer`: `key_pos + buffer <= query_pos`.
fn first_counting(key_pos: u32, buffer: usize, newest: i64, n: usize) -> usize {
    let first_pos = newest - (n as i64 - 1);
    (key_pos as i64 + buffer as i64 - first_pos).max(0) as usize
}

/// Threads (slots) per block of `window_score` (`WS_TILE` in `kernels/score.cu`).
const WS_TILE: usize = 256;

/// Twin of `kernels/window_score.cu` (and the host path of the summed scorers):
/// `p` `[kv_heads * group, n, max_len]` probabilities, `lens[h]` slots of kv-head `h`; returns
/// `[kv_heads, max_len]` (zero past each head's length). Per query head, the probed queries
/// are summed in ascending order (squared first for L2; with a buffer, only those at least
/// `buffer` positions after the key, the newest probed query at the largest of `positions`),
/// the first `len - pool_skip_last` slots pooled ([`pool1d`]); the group's query heads are
/// summed in ascending order. `positions[h]`: the slot positions of kv-head `h` (read only
/// with a buffer).
pub fn window_score_twin(
    p: &[f32],
    lens: &[usize],
    n: usize,
    max_len: usize,
    a: &WindowScoreArgs,
    positions: &[Vec<u32>],
) -> Vec<f32> {
    let newest = positions.iter().flatten().copied().max().unwrap_or(0) as i64;
    let mut out = vec![0f32; lens.len() * max_len];
    let mut m = vec![0f32; max_len];
    for (h, &len) in lens.iter().enumerate() {
        let acc = &mut out[h * max_len..h * max_len + len];
        for hq in h * a.group..(h + 1) * a.group {
            m[..len].fill(0.0);
            for i in 0..n {
                let row = &p[(hq * n + i) * max_len..][..len];
                for (j, (s, x)) in m.iter_mut().zip(row).enumerate() {
                    if a.buffer > 0 && i < first_counting(positions[h][j], a.buffer, newest, n) {
                        continue;
                    }
                    *s += if a.squared { x * x } else { *x };
                }
            }
            let pooled_len = len.saturating_sub(a.pool_skip_last);
            if a.pool_k > 1 {
                let kind = if a.pool_max {
                    PoolKind::Max
                } else {
                    PoolKind::Avg
                };
                let pooled = pool1d(&m[..pooled_len], a.pool_k, kind);
                m[..pooled_len].copy_from_slice(&pooled);
            }
            for (x, v) in acc.iter_mut().zip(&m) {
                *x += v;
            }
        }
    }
    out
}

/// The window scorer on the device (`kernels/score.cu`; twin:
/// `compress::scorer::window_score_twin`): from `probs` `[kv_heads * group, probed, max_len]`
/// f32 (any leading dims of 1) and each kv-head's slot count `lens` (<= max_len), the scores
/// `[kv_heads, max_len]` f32 (zero past each head's length): summed (or squared and summed)
/// over the probed queries, pooled along the slots, summed over the group.
pub fn window_score(
    probs: &Tensor,
    lens: &[usize],
    a: &WindowScoreArgs,
    positions: &[Vec<u32>],
) -> Result<Tensor> {
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
    let buffered = match a.buffer {
        0 => None,
        _ => Some(positions_on_device(positions, nkv, max_len, dev)?),
    };
    // Safety: the kernel writes every element of out (every column of every kv-head row).
    let out = unsafe { Tensor::empty((nkv, max_len), DType::F32, dev)? };
    let launch = Launch {
        probed,
        max_len,
        shared,
        positions: buffered.as_ref().map(|(t, last)| (t, *last)),
    };
    imp::window_score(&out, &probs, &lens, a, &launch)?;
    Ok(out)
}
/// `positions` (one list per kv-head, at most `max_len` each) padded into `[kv_heads,
/// max_len]` u32 on `dev`, with the newest position (the last probed query's).
fn positions_on_device(
    positions: &[Vec<u32>],
    nkv: usize,
    max_len: usize,
    dev: &candle_core::Device,
) -> Result<(Tensor, i64)> {
    if positions.len() != nkv {
        return Err(OpsError::Shape(format!(
            "window_score: {} position lists for {nkv} kv-heads",
            positions.len()
        ))
        .into());
    }
    let mut flat = vec![0u32; nkv * max_len];
    for (row, p) in flat.chunks_exact_mut(max_len).zip(positions) {
        let n = p.len().min(max_len);
        row[..n].copy_from_slice(&p[..n]);
    }
    let newest = positions.iter().flatten().copied().max().unwrap_or(0) as i64;
    Ok((Tensor::from_vec(flat, (nkv, max_len), dev)?, newest))
}

/// The launch's sizes and, with a buffer, the slot positions and the last query's position.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Launch<'a> {
    probed: usize,
    max_len: usize,
    shared: usize,
    positions: Option<(&'a Tensor, i64)>,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

    pub fn window_score(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &WindowScoreArgs,
        _: &Launch<'_>,
    ) -> Result<()> {
        Err(OpsError::NoCuda.into())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches through cudarc on candle's stream.
    use super::*;
    use crate::cuda::launch::{cu, device, func, ptr};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    pub fn window_score(
        out: &Tensor,
        probs: &Tensor,
        lens: &Tensor,
        a: &WindowScoreArgs,
        l: &Launch<'_>,
    ) -> Result<()> {
        let (probed, max_len, shared) = (l.probed, l.max_len, l.shared);
        let stream = device(probs)?.cuda_stream();
        let f = func(&stream, "window_score", "window_score")?;
        let nkv = lens.dim(0)?;
        let ptrs = [
            ptr(Some(out), &stream)?,
            ptr(Some(probs), &stream)?,
            ptr(Some(lens), &stream)?,
            ptr(l.positions.map(|(t, _)| t), &stream)?,
        ];
        let last_query: i64 = l.positions.map_or(0, |(_, last)| last);
        let buffer = a.buffer.min(i32::MAX as usize) as i32;
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
        b.arg(&last_query);
        b.arg(&buffer);
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
}
