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

/// Keys per tile of the kernel (`FA_BK` in `kernels/prefill_attention.cu`).
const FLASH_KEY_TILE: usize = 64;

/// Query rows per warp of [`prefill_attention`]'s kernel, in 16-row MMA tiles (`MT`): 2 holds
/// 32 rows per warp, so each K/V fragment read from shared memory feeds twice the products.
pub const FLASH_M_TILES: usize = 2;

/// Dynamic shared memory of `prefill_flash_*_d<d>_m<m_tiles>` (`FaSmem::bytes` in the
/// kernel): the Q tile and two stages of K, V and key positions, rows `d + 8` elements apart.
fn flash_smem_bytes(head_dim: usize, m_tiles: usize, elem: usize) -> usize {
    let row = head_dim + 8;
    let q = 4 * 16 * m_tiles * row;
    let kv = FLASH_KEY_TILE * row;
    (q + 4 * kv) * elem + 2 * FLASH_KEY_TILE * 4
}

/// Whether [`prefill_attention`] supports this dtype and head dim (and the build has CUDA):
/// bf16 and f16 (tensor cores), head dims 64 and 128. Others take the unfused path (candle
/// matmuls around [`prefill_softmax`]).
pub fn prefill_attention_supported(dtype: DType, head_dim: usize) -> bool {
    available()
        && matches!(dtype, DType::BF16 | DType::F16)
        && PREFILL_FLASH_HEAD_DIMS.contains(&head_dim)
}

/// Rows between consecutive kv-heads of `x` `[1, kv_heads, n, d]` when its rows are `d`
/// contiguous elements and its heads lie `rows >= n` rows apart (a contiguous tensor, or the
/// first `n` rows of each head of a `[1, kv_heads, capacity, d]` cache): the kernel reads such
/// a view without a copy. `None` for any other layout.
fn head_stride_rows(x: &Tensor, n: usize, d: usize) -> Option<usize> {
    let (dims, strides) = (x.dims(), x.layout().stride());
    let r = dims.len();
    if r < 3 || dims[r - 1] != d || dims[r - 2] != n || dims[..r - 3].iter().any(|&e| e != 1) {
        return None;
    }
    let head = strides[r - 3];
    let ok = strides[r - 1] == 1
        && (n <= 1 || strides[r - 2] == d)
        && (dims[r - 3] <= 1 || (head % d == 0 && head / d >= n));
    ok.then(|| if dims[r - 3] <= 1 { n } else { head / d })
}

/// Flash-style prefill attention on the device (`kernels/prefill_attention.cu`; twin
/// [`prefill_attention_twin`]): `q` `[.., kv_heads, group * t, head_dim]` (query heads of
/// a kv-head adjacent, i.e. `[1, heads, t, head_dim]`), `k`, `v` `[.., kv_heads, n, head_dim]`
/// (contiguous, or each head's first `n` rows of a cache with spare capacity: read in place),
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
    prefill_attention_tiled(q, k, v, key_pos, shape, q_start, scale, FLASH_M_TILES)
}

/// [`prefill_attention`] with `m_tiles` (1 or 2) 16-row query tiles per warp (the kernel
/// benchmark compares them).
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_pos: &Tensor,
    shape: &SoftmaxShape,
    q_start: u32,
    scale: f32,
    m_tiles: usize,
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
    if !matches!(m_tiles, 1 | 2) {
        return bad(format!("{m_tiles} query tiles per warp (1 or 2)"));
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
    if q.elem_count() != s.rows() * d
        || k.elem_count() != s.kv_heads * s.n * d
        || v.elem_count() != s.kv_heads * s.n * d
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
    let stride = |x: &Tensor| -> Result<(Tensor, usize)> {
        Ok(match head_stride_rows(x, s.n, d) {
            Some(rows) => (x.clone(), rows),
            None => (x.contiguous()?, s.n),
        })
    };
    let ((k, ks), (v, vs)) = (stride(k)?, stride(v)?);
    let (k, v, kv_stride) = if ks == vs {
        (k, v, ks)
    } else {
        (k.contiguous()?, v.contiguous()?, s.n)
    };
    if s.rows() > i32::MAX as usize
        || s.kv_heads * kv_stride > i32::MAX as usize
        || s.kv_heads * s.group > 65535
        || s.kv_heads > 65535
    {
        return bad(format!("{s:?} is too large"));
    }
    let (q, key_pos) = (q.contiguous()?, key_pos.contiguous()?);
    // Safety: the kernel writes every row of the output (row i of every query head).
    let out = unsafe { Tensor::empty(q.shape(), q.dtype(), q.device())? };
    if s.rows() > 0 {
        let smem = flash_smem_bytes(d, m_tiles, q.dtype().size_in_bytes());
        let ops = Flash {
            out: &out,
            q: &q,
            k: &k,
            v: &v,
            key_pos: &key_pos,
        };
        imp::prefill_attention(&ops, s, kv_stride, q_start, scale, m_tiles, smem)?;
    }
    Ok(out)
}
/// The tensors of one launch: `k`, `v` may be head-strided views (checked by the caller).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Flash<'a> {
    out: &'a Tensor,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    key_pos: &'a Tensor,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

    pub fn prefill_attention(
        _: &Flash,
        _: &SoftmaxShape,
        _: usize,
        _: u32,
        _: f32,
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
    use crate::cuda::launch::{base_ptr, cu, device, dtype_name, func, ptr};
    use cudarc::driver::sys::CUfunction_attribute as Attr;
    use cudarc::driver::{LaunchConfig, PushKernelArg};

    /// `prefill_key_tiles`, then `prefill_flash_<dtype>_d<D>_m<m_tiles>` with `smem` bytes of
    /// dynamic shared memory.
    pub fn prefill_attention(
        a: &Flash,
        s: &SoftmaxShape,
        kv_stride: usize,
        q_start: u32,
        scale: f32,
        m_tiles: usize,
        smem: usize,
    ) -> Result<()> {
        let stream = device(a.q)?.cuda_stream();
        let d = *a.q.dims().last().unwrap_or(&0);
        let tiles = s.n.div_ceil(FLASH_KEY_TILE).max(1);
        // Safety: prefill_key_tiles writes every (head, tile) pair.
        let range = unsafe { Tensor::empty(s.kv_heads * tiles * 2, DType::U32, a.q.device())? };
        let kp = ptr(Some(a.key_pos), &stream)?;
        let range_p = ptr(Some(&range), &stream)?;
        let n = s.n as i32;
        let f = func(&stream, "prefill_attention", "prefill_key_tiles")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&range_p).arg(&kp).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, s.kv_heads as u32, 1),
            block_dim: (FLASH_KEY_TILE as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: `range` holds kv_heads x tiles pairs, key_pos kv_heads x n u32.
        unsafe { b.launch(cfg) }.map_err(cu)?;

        let name = format!("prefill_flash_{}_d{d}_m{m_tiles}", dtype_name(a.q.dtype())?);
        let f = func(&stream, "prefill_attention", &name)?;
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| cu(format!("{smem} B of shared memory for {name}: {e}")))?;
        let ptrs = [
            ptr(Some(a.out), &stream)?,
            ptr(Some(a.q), &stream)?,
            base_ptr(a.k, &stream)?,
            base_ptr(a.v, &stream)?,
        ];
        // The kernel reads Q/K/V rows as 16-byte vectors.
        for (p, what) in ptrs[1..].iter().zip(["q", "k", "v"]) {
            if p % 16 != 0 {
                return Err(OpsError::Shape(format!("{what} is not 16-byte aligned")).into());
            }
        }
        let (ks, t, g) = (kv_stride as i32, s.t as i32, s.group as i32);
        let mut b = stream.launch_builder(&f);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&kp).arg(&range_p);
        b.arg(&n).arg(&ks).arg(&t).arg(&g).arg(&q_start).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (
                s.t.div_ceil(64 * m_tiles) as u32,
                (s.kv_heads * s.group) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // Safety: arguments match prefill_flash_<dtype>_d<D>_m<MT>; element counts were checked
        // against the shape, K/V heads lie kv_stride >= n rows apart in their storage, pointers
        // are aligned, the grid covers every query row.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        Ok(())
    }
}
