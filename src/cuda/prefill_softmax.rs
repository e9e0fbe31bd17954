//! `kernels/prefill_softmax.cu`: prefill attention's scale + causal mask + softmax in one pass,
//! the observation window's f32 probabilities on the side. [`SoftmaxShape`] is shared with the
//! flash kernel ([`super::prefill_attention`]).
use candle_core::{DType, Result, Tensor};

use super::{available, check_len, KvElem, OpsError, OpsResult};

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
    pub fn check(&self, att: usize, key_pos: usize) -> OpsResult<()> {
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
pub fn prefill_softmax_twin<T: KvElem>(
    shape: &SoftmaxShape,
    att: &[T],
    key_pos: &[u32],
    q_start: u32,
    scale: f32,
) -> OpsResult<(Vec<T>, Vec<f32>)> {
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

/// Whether [`prefill_softmax`] supports this dtype (and the build has CUDA).
pub fn prefill_softmax_supported(dtype: DType) -> bool {
    available() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Prefill attention's softmax on the device (`kernels/prefill_softmax.cu`; twin
/// [`prefill_softmax_twin`]): scale, causal mask from `key_pos` `[kv_heads, n]` u32 (u32::MAX:
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
#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

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
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches through cudarc on candle's stream.
    use super::*;
    use crate::cuda::launch::{cu, device, dtype_name, func, ptr};
    use cudarc::driver::{LaunchConfig, PushKernelArg};

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
}
