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

use super::OpsError;

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
        // caller grows the tables to cover them (`Rope::ensure`), as for the twin.
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
    // Rows' positions pos0[b] + ti, built where pos0 lives: reading pos0 back would wait for
    // the device once per layer. The caller grows the tables to cover them (candle's CPU
    // index_select refuses a row past them).
    let offsets = Tensor::arange(0u32, t as u32, qkv.device())?;
    let idx = pos0
        .reshape((b, 1))?
        .broadcast_add(&offsets.reshape((1, t))?)?
        .flatten_all()?;
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

/// The greedy pick over `logits` `[rows, vocab]` f32: per row the first index of its
/// maximum, as [`argmax_twin`] scans it (a NaN never becomes the maximum; a row
/// starting with NaN gives 0). On the kernels (`argmax_rows_f32`) one launch and `rows` ids
/// downloaded; `fused = false` or elsewhere the twin: the rows downloaded and scanned.
pub fn argmax_rows(logits: &Tensor, fused: bool) -> Result<Vec<u32>> {
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || vocab == 0 || vocab > i32::MAX as usize {
        return Err(shape_err(format!(
            "argmax_rows: logits [rows, vocab] f32 with a vocabulary, got {:?} {:?}",
            logits.dims(),
            logits.dtype()
        )));
    }
    if fused && on_kernels(logits) && rows > 0 {
        return imp::argmax_rows(&logits.contiguous()?);
    }
    Ok(logits
        .to_vec2::<f32>()?
        .iter()
        .map(|row| argmax_twin(row))
        .collect())
}

/// Argmax of one row of logits on the host, the first index on ties (a NaN never becomes the
/// maximum; a row starting with NaN gives 0): the twin of `argmax_rows_f32`.
pub fn argmax_twin(row: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, x) in row.iter().enumerate() {
        if *x > row[best] {
            best = i;
        }
    }
    best as u32
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

    pub fn argmax_rows(_: &Tensor) -> Result<Vec<u32>> {
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
    use crate::cuda::launch::{cu, device, dtype_name, func, grid_1d, ptr};
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

    pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
        let (rows, vocab) = logits.dims2()?;
        // Safety: the kernel writes every element (one block per row).
        let out = unsafe { Tensor::empty(rows, DType::U32, logits.device())? };
        let stream = device(logits)?.cuda_stream();
        let f = func(&stream, "layer_ops", "argmax_rows_f32")?;
        let ptrs = [ptr(Some(&out), &stream)?, ptr(Some(logits), &stream)?];
        let vocab_i = vocab as i32;
        let mut b = stream.launch_builder(&f);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&vocab_i);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1), // ARGMAX_THREADS
            shared_mem_bytes: 0,
        };
        // Safety: arguments match argmax_rows_f32; logits contiguous [rows, vocab] f32 (checked
        // by the caller), out [rows] u32.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        out.to_vec1::<u32>()
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The twins against the formulas written out: RoPE at each row's own positions, the
    /// split of the merged projection, SiLU * up, add + RMSNorm.
    #[test]
    fn twins_follow_the_formulas() {
        let dev = Device::Cpu;
        let heads = QkvHeads {
            q: 2,
            kv: 1,
            dim: 4,
        };
        let (b, t, half, width) = (2, 3, 2, 16);
        let qkv: Vec<f32> = (0..b * t * width)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let max_pos = 10;
        let ang = |p: usize, i: usize| p as f32 * (0.3 + i as f32);
        let cos: Vec<f32> = (0..max_pos * half)
            .map(|j| ang(j / half, j % half).cos())
            .collect();
        let sin: Vec<f32> = (0..max_pos * half)
            .map(|j| ang(j / half, j % half).sin())
            .collect();
        let t_qkv = Tensor::from_vec(qkv.clone(), (b, t, width), &dev).unwrap();
        let t_cos = Tensor::from_vec(cos, (max_pos, half), &dev).unwrap();
        let t_sin = Tensor::from_vec(sin, (max_pos, half), &dev).unwrap();
        let pos0 = [4u32, 1];
        let p0 = Tensor::new(&pos0, &dev).unwrap();
        let (q, k, v) = rope_split_qkv(&t_qkv, &p0, &t_cos, &t_sin, heads, true).unwrap();
        assert_eq!(q.dims(), [b, 2, t, 4]);
        assert_eq!(k.dims(), [b, 1, t, 4]);
        let (q, k, v) = (
            q.reshape((b * 2, t, 4)).unwrap().to_vec3::<f32>().unwrap(),
            k.reshape((b, t, 4)).unwrap().to_vec3::<f32>().unwrap(),
            v.reshape((b, t, 4)).unwrap().to_vec3::<f32>().unwrap(),
        );
        for bi in 0..b {
            for ti in 0..t {
                let p = pos0[bi] as usize + ti;
                let row = &qkv[(bi * t + ti) * width..][..width];
                for h in 0..4 {
                    let x = &row[h * 4..][..4];
                    let want: Vec<f32> = if h == 3 {
                        x.to_vec()
                    } else {
                        let r = |i: usize| {
                            let (c, s) = (ang(p, i).cos(), ang(p, i).sin());
                            (x[i] * c - x[i + 2] * s, x[i] * s + x[i + 2] * c)
                        };
                        let (a0, b0) = r(0);
                        let (a1, b1) = r(1);
                        vec![a0, a1, b0, b1]
                    };
                    let got = match h {
                        0 | 1 => q[bi * 2 + h][ti].clone(),
                        2 => k[bi][ti].clone(),
                        _ => v[bi][ti].clone(),
                    };
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < 1e-5,
                            "b {bi} t {ti} head {h}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
        // Positions past the tables are refused on the CPU.
        let far = Tensor::new(&[8u32, 0], &dev).unwrap();
        assert!(rope_split_qkv(&t_qkv, &far, &t_cos, &t_sin, heads, true).is_err());

        let gu = Tensor::new(&[[-1.0f32, 0.5, 2.0, 3.0]], &dev).unwrap();
        let got = silu_mul(&gu, true).unwrap().to_vec2::<f32>().unwrap();
        let silu = |x: f32| x / (1.0 + (-x).exp());
        assert!((got[0][0] - silu(-1.0) * 2.0).abs() < 1e-6);
        assert!((got[0][1] - silu(0.5) * 3.0).abs() < 1e-6);

        let x = Tensor::new(&[[1.0f32, -2.0, 3.0]], &dev).unwrap();
        let r = Tensor::new(&[[0.5f32, 0.5, -1.0]], &dev).unwrap();
        let w = Tensor::new(&[1.0f32, 2.0, 0.5], &dev).unwrap();
        let (s, n) = add_rms_norm(&x, &r, &w, 1e-6, true).unwrap();
        assert_eq!(s.to_vec2::<f32>().unwrap(), [[1.5, -1.5, 2.0]]);
        let rms = ((1.5f32 * 1.5 + 1.5 * 1.5 + 4.0) / 3.0 + 1e-6).sqrt();
        let n = n.to_vec2::<f32>().unwrap();
        for (j, want) in [1.5 / rms, -3.0 / rms, 1.0 / rms].iter().enumerate() {
            assert!((n[0][j] - want).abs() < 1e-5);
        }
        assert!(add_rms_norm(&x, &r, &w.narrow(0, 0, 2).unwrap(), 1e-6, true).is_err());
        assert!(silu_mul(&Tensor::new(&[[1.0f32, 2.0, 3.0]], &dev).unwrap(), true).is_err());
    }
}
