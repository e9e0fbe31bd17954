//! `kernels/prefill_attention.cu`: flash-style prefill attention (tensor cores, online softmax;
//! the scores never reach memory).
use candle_core::{DType, Result, Tensor};

use super::prefill_softmax::SoftmaxShape;
use super::{available, check_len, KvElem, OpsError, OpsResult};

/// Flash-style prefill attention (twin of `kernels/prefill_attention.cu`): for every row of
/// `q` `[kv_heads, group * t, head_dim]` (kv-head `r / (group * t)`, query `i = r % t` at
/// position `q_start + i`), softmax over the keys of its kv-head with `key_pos <= q_start + i`
/// of `(q . k) * scale`, times `v`; `k`, `v` `[kv_heads, n, head_dim]`, `key_pos`
/// `[kv_heads, n]` (u32::MAX: padding). Everything in f32 here; the kernel rounds the
/// probabilities to `T` for its tensor-core product, so the two agree to `T`'s precision, not
/// bit for bit. A row without a visible key is zeros. `shape.probed` is ignored (the kernel
/// writes no probabilities).
pub fn prefill_attention_twin<T: KvElem>(
    shape: &SoftmaxShape,
    head_dim: usize,
    qkv: (&[T], &[T], &[T]),
    key_pos: &[u32],
    q_start: u32,
    scale: f32,
) -> OpsResult<Vec<T>> {
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
/// [`prefill_attention_twin`]): `q` `[.., kv_heads, group * t, head_dim]` (query heads of
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
#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

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
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches through cudarc on candle's stream.
    use super::*;
    use crate::cuda::launch::{cu, device, dtype_name, func, ptr};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

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
}
