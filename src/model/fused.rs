//! Fused ops of the llama decoder layer (`kernels/layer_ops.cu`) and their twins.
//!
//! On a GPU a small model's forward is bound by launches: every candle op is one, and a decode
//! step of SmolLM2 (30 layers) ran ~20 per layer. With the q/k/v and gate/up projections merged
//! at load ([`super::llama`]), these three kernels replace the rest of the chain between the
//! matmuls:
//! - [`add_rms_norm`]: residual add + the next RMSNorm (was an add and an rms_norm);
//! - [`silu_mul`]: SiLU(gate) * up over the merged projection's output (was silu, mul and the
//!   two narrow copies);
//! - [`rope_split_qkv`]: the merged q/k/v output split into per-head q, k, v with RoPE on q and
//!   k at each row's own position (was two rope launches, their contiguous copies, v's copy
//!   and the decode step's two cos/sin gathers).
//!
//! Each op has a `*_twin`: the candle op chain it replaces, with the same contract. The twin is
//! the CPU path and the GPU tests' oracle (`tests/cuda_kernels.rs`); the kernels follow
//! candle's arithmetic, so the two agree to the last bit except where the compiler contracts
//! RoPE's multiply and subtract.
use candle_core::{DType, Result, Tensor, D};

use crate::kvcache::ops::OpsError;

/// Whether `t` goes to the fused kernels: a CUDA build, a CUDA tensor, f32/bf16/f16.
pub fn on_kernels(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

fn shape_err(msg: String) -> candle_core::Error {
    OpsError::Shape(msg).into()
}

/// `(x + r, rms_norm(x + r) * w)` over the last dim. `x`, `r`: `[.., cols]` of one shape and
/// dtype; `w`: `[cols]`. `fused = false` runs the twin on any device.
pub fn add_rms_norm(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f32,
    fused: bool,
) -> Result<(Tensor, Tensor)> {
    let cols = x.dim(D::Minus1)?;
    if x.dims() != r.dims()
        || w.dims() != [cols]
        || x.dtype() != r.dtype()
        || x.dtype() != w.dtype()
    {
        return Err(shape_err(format!(
            "add_rms_norm: x {:?} {:?}, r {:?} {:?}, w {:?} {:?} (x and r of one shape, w [{cols}], one dtype)",
            x.dims(),
            x.dtype(),
            r.dims(),
            r.dtype(),
            w.dims(),
            w.dtype()
        )));
    }
    if fused && on_kernels(x) {
        return imp::add_rms_norm(&x.contiguous()?, &r.contiguous()?, &w.contiguous()?, eps);
    }
    add_rms_norm_twin(x, r, w, eps)
}

/// Twin of [`add_rms_norm`]: candle's add, then candle's `rms_norm`.
pub fn add_rms_norm_twin(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let s = (x + r)?;
    let n = candle_nn::ops::rms_norm(&s, w, eps)?;
    Ok((s, n))
}

/// `silu(gu[.., :i]) * gu[.., i:]` for `gu` `[.., 2 * i]` (the merged gate/up projection's
/// output: gate first): `[.., i]`.
pub fn silu_mul(gu: &Tensor, fused: bool) -> Result<Tensor> {
    let two_i = gu.dim(D::Minus1)?;
    if two_i % 2 != 0 {
        return Err(shape_err(format!(
            "silu_mul: last dim {two_i} of {:?} is not gate + up of one size",
            gu.dims()
        )));
    }
    if fused && on_kernels(gu) {
        return imp::silu_mul(&gu.contiguous()?);
    }
    silu_mul_twin(gu)
}

/// Twin of [`silu_mul`]: narrow, candle's `silu`, mul.
pub fn silu_mul_twin(gu: &Tensor) -> Result<Tensor> {
    let i = gu.dim(D::Minus1)? / 2;
    let gate = gu.narrow(D::Minus1, 0, i)?;
    let up = gu.narrow(D::Minus1, i, i)?;
    candle_nn::ops::silu(&gate)? * up
}

/// Heads of the merged q/k/v projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvHeads {
    /// Query heads.
    pub q: usize,
    /// Key (and value) heads.
    pub kv: usize,
    /// Elements per head (even).
    pub dim: usize,
}

/// Split `qkv` `[b, t, (q + 2 kv) * dim]` (per token: the q heads, then k, then v) into
/// `q` `[b, q, t, dim]`, `k` and `v` `[b, kv, t, dim]` (contiguous), with the half-rotation
/// RoPE on q and k: token `ti` of row `bi` sits at position `pos0[bi] + ti` (`pos0`: `[b]`
/// u32 on `qkv`'s device) and reads row `pos` of `cos`/`sin` `[max_pos, dim / 2]`.
pub fn rope_split_qkv(
    qkv: &Tensor,
    pos0: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: QkvHeads,
    fused: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, _, width) = qkv.dims3()?;
    let QkvHeads { q, kv, dim } = heads;
    let half = dim / 2;
    let ok = dim % 2 == 0
        && width == (q + 2 * kv) * dim
        && pos0.dims() == [b]
        && pos0.dtype() == DType::U32
        && cos.dims().len() == 2
        && cos.dim(1)? == half
        && cos.dims() == sin.dims()
        && cos.dtype() == qkv.dtype()
        && sin.dtype() == qkv.dtype();
    if !ok {
        return Err(shape_err(format!(
            "rope_split_qkv: qkv {:?} {:?}, pos0 {:?} {:?}, cos {:?} {:?}, sin {:?} for {heads:?} \
             (qkv [b, t, (q + 2 kv) * dim], pos0 [b] u32, cos/sin [max_pos, dim / 2] of qkv's dtype)",
            qkv.dims(),
            qkv.dtype(),
            pos0.dims(),
            pos0.dtype(),
            cos.dims(),
            cos.dtype(),
            sin.dims()
        )));
    }
    if fused && on_kernels(qkv) {
        // The positions are not read back here (that would wait for the device); the
        // caller grows the tables to cover them (`Rope::ensure`), as for the twin, which checks.
        return imp::rope_split_qkv(
            &qkv.contiguous()?,
            &pos0.contiguous()?,
            &cos.contiguous()?,
            &sin.contiguous()?,
            heads,
        );
    }
    rope_split_qkv_twin(qkv, pos0, cos, sin, heads)
}

/// Twin of [`rope_split_qkv`]: narrow + reshape + transpose per part, the rows' cos/sin
/// gathered, candle's `rope` on q and k.
pub fn rope_split_qkv_twin(
    qkv: &Tensor,
    pos0: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: QkvHeads,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, _) = qkv.dims3()?;
    let QkvHeads { q, kv, dim } = heads;
    let max_pos = cos.dim(0)?;
    let mut idx = Vec::with_capacity(b * t);
    for p in pos0.to_vec1::<u32>()? {
        if p as usize + t > max_pos {
            return Err(shape_err(format!(
                "rope_split_qkv: positions {p}..{} past the rotary tables' {max_pos} rows",
                p as usize + t
            )));
        }
        idx.extend(p..p + t as u32);
    }
    let idx = Tensor::new(idx.as_slice(), qkv.device())?;
    let cos = cos.index_select(&idx, 0)?.reshape((b, t, dim / 2))?;
    let sin = sin.index_select(&idx, 0)?.reshape((b, t, dim / 2))?;
    let part = |from: usize, n: usize| -> Result<Tensor> {
        qkv.narrow(2, from * dim, n * dim)?
            .reshape((b, t, n, dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let qr = candle_nn::rotary_emb::rope(&part(0, q)?, &cos, &sin)?;
    let kr = candle_nn::rotary_emb::rope(&part(q, kv)?, &cos, &sin)?;
    Ok((qr, kr, part(q + kv, kv)?))
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA ([`super::on_kernels`] is false there).
    use super::*;

    pub fn add_rms_norm(_: &Tensor, _: &Tensor, _: &Tensor, _: f32) -> Result<(Tensor, Tensor)> {
        Err(OpsError::NoCuda.into())
    }

    pub fn silu_mul(_: &Tensor) -> Result<Tensor> {
        Err(OpsError::NoCuda.into())
    }

    pub fn rope_split_qkv(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: QkvHeads,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        Err(OpsError::NoCuda.into())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches on candle's stream (`kernels/layer_ops.cu`).
    use super::*;
    use crate::kvcache::cuda::launch::{cu, device, dtype_name, func, grid_1d, ptr};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    pub fn add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let cols = x.dim(D::Minus1)?;
        let rows = x.elem_count() / cols.max(1);
        // Safety (both): the kernel writes every element (one block per row, all columns).
        let sum = unsafe { Tensor::empty(x.shape(), x.dtype(), x.device())? };
        let normed = unsafe { Tensor::empty(x.shape(), x.dtype(), x.device())? };
        if rows == 0 || cols == 0 {
            return Ok((sum, normed));
        }
        let stream = device(x)?.cuda_stream();
        let f = func(
            &stream,
            "layer_ops",
            &format!("add_rms_norm_{}", dtype_name(x.dtype())?),
        )?;
        let ptrs = [
            ptr(Some(&sum), &stream)?,
            ptr(Some(&normed), &stream)?,
            ptr(Some(x), &stream)?,
            ptr(Some(r), &stream)?,
            ptr(Some(w), &stream)?,
        ];
        let cols_i = cols as i32;
        let mut b = stream.launch_builder(&f);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&cols_i).arg(&eps);
        // candle's rmsnorm block: one warp below 1024 columns, else 1024 threads.
        let threads = if cols < 1024 { 32 } else { 1024 };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: arguments match add_rms_norm_<dtype>; all tensors contiguous, `rows * cols`
        // elements (checked by the caller), w `[cols]`.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok((sum, normed))
    }

    pub fn silu_mul(gu: &Tensor) -> Result<Tensor> {
        let two_i = gu.dim(D::Minus1)?;
        let inter = two_i / 2;
        let rows = gu.elem_count() / two_i.max(1);
        let mut dims = gu.dims().to_vec();
        *dims.last_mut().expect("checked by dim") = inter;
        // Safety: the kernel writes every element (one thread each).
        let out = unsafe { Tensor::empty(dims, gu.dtype(), gu.device())? };
        if rows * inter == 0 {
            return Ok(out);
        }
        let stream = device(gu)?.cuda_stream();
        let f = func(
            &stream,
            "layer_ops",
            &format!("silu_mul_{}", dtype_name(gu.dtype())?),
        )?;
        let ptrs = [ptr(Some(&out), &stream)?, ptr(Some(gu), &stream)?];
        let (rows_i, inter_i) = (rows as i32, inter as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&ptrs[0]).arg(&ptrs[1]).arg(&rows_i).arg(&inter_i);
        // Safety: arguments match silu_mul_<dtype>; out `[rows, inter]`, gu `[rows, 2 inter]`.
        unsafe { b.launch(grid_1d(rows * inter)?) }.map_err(cu)?;
        Ok(out)
    }

    pub fn rope_split_qkv(
        qkv: &Tensor,
        pos0: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: QkvHeads,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = qkv.dims3()?;
        let QkvHeads { q, kv, dim } = heads;
        let (dt, dev) = (qkv.dtype(), qkv.device());
        // Safety (all three): the kernel writes every element (a thread per row, head and
        // pair writes both halves of its head's row).
        let qo = unsafe { Tensor::empty((b, q, t, dim), dt, dev)? };
        let ko = unsafe { Tensor::empty((b, kv, t, dim), dt, dev)? };
        let vo = unsafe { Tensor::empty((b, kv, t, dim), dt, dev)? };
        let n = b * t * (q + 2 * kv) * (dim / 2);
        if n == 0 {
            return Ok((qo, ko, vo));
        }
        let stream = device(qkv)?.cuda_stream();
        let f = func(
            &stream,
            "layer_ops",
            &format!("rope_split_qkv_{}", dtype_name(dt)?),
        )?;
        let ptrs = [
            ptr(Some(&qo), &stream)?,
            ptr(Some(&ko), &stream)?,
            ptr(Some(&vo), &stream)?,
            ptr(Some(qkv), &stream)?,
            ptr(Some(cos), &stream)?,
            ptr(Some(sin), &stream)?,
            ptr(Some(pos0), &stream)?,
        ];
        let ints = [b, t, q, kv, dim].map(|x| x as i32);
        let mut lb = stream.launch_builder(&f);
        for p in &ptrs {
            lb.arg(p);
        }
        for i in &ints {
            lb.arg(i);
        }
        // Safety: arguments match rope_split_qkv_<dtype>; shapes checked by the caller; the
        // positions index the tables, which the caller grew to cover them.
        unsafe { lb.launch(grid_1d(n)?) }.map_err(cu)?;
        Ok((qo, ko, vo))
    }
}
