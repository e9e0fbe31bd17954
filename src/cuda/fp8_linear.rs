//! FP8 linear layers (`kernels/fp8_linear.cu` + cuBLASLt) and their twin.
//!
//! `y = x W^T` for an e4m3 weight `W [out, in]` with one f32 scale per output row (a per-tensor
//! scale is that scale on every row), as FP8 checkpoints on the hub store them (fbgemm_fp8,
//! compressed-tensors). The activations are quantized per token at run time (dynamic scales,
//! as both formats run them): `s_t = max(amax(|x_t|) / 448, 1e-12)`, `q_t = e4m3(x_t / s_t)`.
//! The product `q W^T` runs on Hopper's FP8 tensor cores (cuBLASLt, f32 accumulation, output in
//! bf16, the run dtype) and [`fp8_scale_rows`](self) multiplies each element by `s_t * scale_row`.
//!
//! [`fp8_linear_twin`] is the same arithmetic on the host: the CPU path and the GPU test's
//! oracle. The quantized activations agree bit for bit; the products differ by the GEMM's
//! summation order and its rounding to the run dtype before the scales.
use candle_core::{DType, Device, Result, Tensor, D};

use super::OpsError;

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// An FP8 weight on its device: `w` `[out, in]` U8 (e4m3 bits), `scale` `[out]` f32.
#[derive(Clone, Debug)]
pub struct Fp8Weight {
    pub w: Tensor,
    pub scale: Tensor,
}

impl Fp8Weight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.w.dims2()
    }

    /// The weight in f32 (`w * scale` per row): the dense equivalent.
    pub fn dequantize(&self) -> Result<Tensor> {
        let (out, inp) = self.dims()?;
        let bits = self.w.flatten_all()?.to_vec1::<u8>()?;
        let w: Vec<f32> = bits.iter().map(|&b| e4m3_to_f32(b)).collect();
        Tensor::from_vec(w, (out, inp), &Device::Cpu)?
            .broadcast_mul(&self.scale.to_device(&Device::Cpu)?.reshape((out, 1))?)?
            .to_device(self.w.device())
    }
}

/// The value of e4m3 bits.
pub fn e4m3_to_f32(bits: u8) -> f32 {
    float8::F8E4M3::from_bits(bits).to_f32()
}

/// e4m3 bits of `x`, rounded to nearest even and saturated at ±448 (CUDA's
/// `__nv_fp8_e4m3(float)`).
pub fn f32_to_e4m3(x: f32) -> u8 {
    float8::F8E4M3::from_f32(x.clamp(-E4M3_MAX, E4M3_MAX)).to_bits()
}

/// Whether `device` runs FP8 tensor-core matmuls: a CUDA build and a GPU of compute capability
/// 8.9 (Ada) or later.
pub fn supported(device: &Device) -> Result<bool> {
    imp::supported(device)
}

/// `x W^T` for `x` `[.., in]`: `[.., out]` in x's dtype. A bf16 CUDA tensor runs the kernels
/// (bf16 only: the GEMM's unscaled output, up to 448^2 x `in`, is past f16's range);
/// `fused = false`, a CPU tensor or another dtype runs [`fp8_linear_twin`].
pub fn fp8_linear(x: &Tensor, w: &Fp8Weight, fused: bool) -> Result<Tensor> {
    let (out, inp) = w.dims()?;
    if x.dim(D::Minus1)? != inp || w.scale.dims() != [out] || w.w.dtype() != DType::U8 {
        return Err(OpsError::Shape(format!(
            "fp8_linear: x {:?}, w {:?} {:?}, scale {:?} (x [.., in], w [out, in] u8, scale [out])",
            x.dims(),
            w.w.dims(),
            w.w.dtype(),
            w.scale.dims()
        ))
        .into());
    }
    if fused && cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::BF16 {
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / inp;
        *dims.last_mut().expect("checked by dim") = out;
        return imp::fp8_linear(&x.contiguous()?.reshape((rows, inp))?, w)?.reshape(dims);
    }
    fp8_linear_twin(x, w)
}

/// Per-row e4m3 quantization of `x` `[rows, cols]` (f32 values): the bits and each row's
/// scale (twin of `fp8_quantize_rows`).
pub fn quantize_rows_twin(x: &[f32], cols: usize) -> (Vec<u8>, Vec<f32>) {
    let rows = x.len() / cols.max(1);
    let mut q = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(rows);
    for row in x.chunks(cols.max(1)).take(rows) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = (amax / E4M3_MAX).max(1e-12);
        q.extend(row.iter().map(|v| f32_to_e4m3(v / s)));
        scales.push(s);
    }
    (q, scales)
}

/// Twin of [`fp8_linear`]: quantize each row of `x`, multiply in f32 by the e4m3 weight, round
/// to x's dtype, then `* s_row * scale_col` in f32 and round again (the kernel's order).
pub fn fp8_linear_twin(x: &Tensor, w: &Fp8Weight) -> Result<Tensor> {
    let (out, inp) = w.dims()?;
    let dtype = x.dtype();
    let rows = x.elem_count() / inp.max(1);
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (q, s) = quantize_rows_twin(&xs, inp);
    let q: Vec<f32> = q.iter().map(|&b| e4m3_to_f32(b)).collect();
    let q = Tensor::from_vec(q, (rows, inp), &Device::Cpu)?;
    let bits = w.w.flatten_all()?.to_vec1::<u8>()?;
    let wf: Vec<f32> = bits.iter().map(|&b| e4m3_to_f32(b)).collect();
    let wf = Tensor::from_vec(wf, (out, inp), &Device::Cpu)?;
    let acc = q.matmul(&wf.t()?)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
    let col = w.scale.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let row = Tensor::from_vec(s, (rows, 1), &Device::Cpu)?;
    let y = acc
        .broadcast_mul(&row)?
        .broadcast_mul(&col.reshape((1, out))?)?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dim") = out;
    y.to_dtype(dtype)?.reshape(dims)?.to_device(x.device())
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Stubs of a build without CUDA.
    use super::*;

    pub fn supported(_: &Device) -> Result<bool> {
        Ok(false)
    }

    pub fn fp8_linear(_: &Tensor, _: &Fp8Weight) -> Result<Tensor> {
        Err(OpsError::NoCuda.into())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    //! Launches on candle's stream: `fp8_quantize_rows`, one cuBLASLt GEMM, `fp8_scale_rows`.
    use super::*;
    use crate::cuda::launch::{cu, device, dtype_name, func, grid_1d, ptr};
    use cudarc::cublaslt::{result as lt, sys};
    use cudarc::driver::sys::CUdevice_attribute as Attr;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Mutex, OnceLock};

    pub fn supported(device: &Device) -> Result<bool> {
        let Device::Cuda(d) = device else {
            return Ok(false);
        };
        let ctx = d.cuda_stream().context().clone();
        let major = ctx
            .attribute(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(cu)?;
        let minor = ctx
            .attribute(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(cu)?;
        Ok((major, minor) >= (8, 9))
    }

    /// One GEMM shape's cuBLASLt objects and algorithm, made once and reused (a decode step
    /// runs the same four shapes in every layer). Never destroyed: a handful per process.
    struct Plan {
        desc: sys::cublasLtMatmulDesc_t,
        a: sys::cublasLtMatrixLayout_t,
        b: sys::cublasLtMatrixLayout_t,
        d: sys::cublasLtMatrixLayout_t,
        algo: sys::cublasLtMatmulAlgo_t,
    }

    /// Per CUDA context: the handle, a 32 MiB workspace, the plans by (out, in, rows, dtype).
    struct Lt {
        handle: sys::cublasLtHandle_t,
        workspace: cudarc::driver::CudaSlice<u8>,
        plans: HashMap<(usize, usize, usize, DType), Plan>,
    }

    // Safety: the handles are used under the mutex below, on candle's one stream.
    unsafe impl Send for Lt {}

    static LT: OnceLock<Mutex<HashMap<usize, Lt>>> = OnceLock::new();

    const WORKSPACE: usize = 32 << 20;

    fn lt_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        cu(format!("cuBLASLt FP8 GEMM, {what}: {e:?}"))
    }

    fn plan(
        h: sys::cublasLtHandle_t,
        out: usize,
        inp: usize,
        rows: usize,
        dt: DType,
    ) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let d_type = sys::cudaDataType::CUDA_R_16BF; // fp8_linear runs bf16 only
        let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err("descriptor", e))?;
        // Column-major view: D [out, rows] = W [out, in] x Q^T [in, rows], the "TN" layout
        // FP8 GEMMs require: A is W's row-major [out, in] read as column-major [in, out], T.
        let (t, n) = (1i32, 0i32);
        // Safety: attribute values of the documented types and sizes.
        unsafe {
            let set = |a: A, v: &i32| {
                lt::set_matmul_desc_attribute(desc, a, v as *const i32 as *const c_void, 4)
            };
            set(A::CUBLASLT_MATMUL_DESC_TRANSA, &t).map_err(|e| lt_err("transa", e))?;
            set(A::CUBLASLT_MATMUL_DESC_TRANSB, &n).map_err(|e| lt_err("transb", e))?;
        }
        let (o, i, r) = (out as u64, inp as u64, rows as u64);
        let a = lt::create_matrix_layout(e4m3, i, o, inp as i64).map_err(|e| lt_err("A", e))?;
        let b = lt::create_matrix_layout(e4m3, i, r, inp as i64).map_err(|e| lt_err("B", e))?;
        let d = lt::create_matrix_layout(d_type, o, r, out as i64).map_err(|e| lt_err("D", e))?;
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        // Safety: the objects above are live; the preference is destroyed after use.
        let algo = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &WORKSPACE as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .map_err(|e| lt_err("workspace", e))?;
            let hr = lt::get_matmul_algo_heuristic(h, desc, a, b, d, d, pref);
            let _ = lt::destroy_matmul_pref(pref);
            hr.map_err(|e| {
                lt_err(
                    &format!("no algorithm for [{rows}, {inp}] x [{out}, {inp}]^T ({dt:?})"),
                    e,
                )
            })?
            .algo
        };
        Ok(Plan {
            desc,
            a,
            b,
            d,
            algo,
        })
    }

    pub fn fp8_linear(x: &Tensor, w: &Fp8Weight) -> Result<Tensor> {
        let (rows, inp) = x.dims2()?;
        let (out, _) = w.dims()?;
        let dt = x.dtype();
        // Safety (all three): every element is written (the quantizer's rows, the GEMM's D).
        let q = unsafe { Tensor::empty((rows, inp), DType::U8, x.device())? };
        let s = unsafe { Tensor::empty(rows, DType::F32, x.device())? };
        let y = unsafe { Tensor::empty((rows, out), dt, x.device())? };
        if rows == 0 || out == 0 {
            return Ok(y);
        }
        if inp % 16 != 0 || out % 16 != 0 {
            return Err(OpsError::Shape(format!(
                "fp8_linear: [{out}, {inp}] weight: FP8 GEMMs need both dims multiples of 16"
            ))
            .into());
        }
        let dev = device(x)?;
        let stream = dev.cuda_stream();
        let suf = dtype_name(dt)?;
        let quant = func(&stream, "fp8_linear", &format!("fp8_quantize_rows_{suf}"))?;
        let (pq, ps, px) = (
            ptr(Some(&q), &stream)?,
            ptr(Some(&s), &stream)?,
            ptr(Some(x), &stream)?,
        );
        let cols_i = inp as i32;
        let mut b = stream.launch_builder(&quant);
        b.arg(&pq).arg(&ps).arg(&px).arg(&cols_i);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1), // FP8_THREADS
            shared_mem_bytes: 0,
        };
        // Safety: arguments match fp8_quantize_rows_<dtype>; x contiguous [rows, in], q [rows,
        // in] u8, s [rows] f32.
        unsafe { b.launch(cfg) }.map_err(cu)?;
        gemm(&stream, &w.w, &q, &y, (out, inp, rows, dt))?;
        let scale = func(&stream, "fp8_linear", &format!("fp8_scale_rows_{suf}"))?;
        let (py, pc) = (ptr(Some(&y), &stream)?, ptr(Some(&w.scale), &stream)?);
        let (rows_i, out_i) = (rows as i32, out as i32);
        let mut b = stream.launch_builder(&scale);
        b.arg(&py).arg(&ps).arg(&pc).arg(&rows_i).arg(&out_i);
        // Safety: arguments match fp8_scale_rows_<dtype>; y [rows, out], s [rows], scale [out].
        unsafe { b.launch(grid_1d(rows * out)?) }.map_err(cu)?;
        Ok(y)
    }

    /// `y [rows, out] = q [rows, in] x w [out, in]^T` on candle's stream.
    fn gemm(
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        w: &Tensor,
        q: &Tensor,
        y: &Tensor,
        key: (usize, usize, usize, DType),
    ) -> Result<()> {
        let ctx = stream.context();
        let mut g = LT
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| cu("cuBLASLt state poisoned"))?;
        let slot = std::sync::Arc::as_ptr(ctx) as usize;
        let lt_state = match g.entry(slot) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
                // Safety: scratch for cuBLASLt only.
                let workspace = unsafe { stream.alloc::<u8>(WORKSPACE) }.map_err(cu)?;
                e.insert(Lt {
                    handle,
                    workspace,
                    plans: HashMap::new(),
                })
            }
        };
        if let std::collections::hash_map::Entry::Vacant(e) = lt_state.plans.entry(key) {
            e.insert(plan(lt_state.handle, key.0, key.1, key.2, key.3)?);
        }
        let p = &lt_state.plans[&key];
        let (alpha, beta) = (1f32, 0f32);
        let (pw, pq, py) = (
            ptr(Some(w), stream)?,
            ptr(Some(q), stream)?,
            ptr(Some(y), stream)?,
        );
        let ws = {
            use cudarc::driver::DevicePtr;
            lt_state.workspace.device_ptr(stream).0
        };
        // Safety: the plan's layouts describe w, q and y (shapes checked by the caller); the
        // workspace is WORKSPACE bytes; everything runs on candle's stream.
        unsafe {
            lt::matmul(
                lt_state.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pw as *const c_void,
                p.a,
                pq as *const c_void,
                p.b,
                py as *const c_void,
                p.d,
                py as *mut c_void,
                p.d,
                &p.algo,
                ws as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| lt_err("matmul", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(rows: &[Vec<f32>], scale: &[f32]) -> Fp8Weight {
        let bits: Vec<u8> = rows.iter().flatten().map(|&v| f32_to_e4m3(v)).collect();
        let (out, inp) = (rows.len(), rows[0].len());
        Fp8Weight {
            w: Tensor::from_vec(bits, (out, inp), &Device::Cpu).unwrap(),
            scale: Tensor::from_vec(scale.to_vec(), out, &Device::Cpu).unwrap(),
        }
    }

    /// A case by hand: the row [1, -2, 4] has scale 4/448 and quantizes exactly to
    /// [112, -224, 448]; times the weight rows [1, 0.5, 0.25] (scale 2) and [0, 1, 0] (scale
    /// 0.5) it gives 2 * (1 - 1 + 1) = 2 and 0.5 * -2 = -1.
    #[test]
    fn twin_by_hand() {
        let (q, s) = quantize_rows_twin(&[1.0, -2.0, 4.0], 3);
        assert_eq!(s, vec![4.0 / 448.0]);
        let vals: Vec<f32> = q.iter().map(|&b| e4m3_to_f32(b)).collect();
        assert_eq!(vals, vec![112.0, -224.0, 448.0]);
        let w = weight(&[vec![1.0, 0.5, 0.25], vec![0.0, 1.0, 0.0]], &[2.0, 0.5]);
        let x = Tensor::new(&[[1f32, -2.0, 4.0]], &Device::Cpu).unwrap();
        let y = fp8_linear(&x, &w, true).unwrap().to_vec2::<f32>().unwrap();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
        assert!(close(y[0][0], 2.0) && close(y[0][1], -1.0), "{y:?}");
        // A zero row keeps its floor scale and gives zeros.
        let (q0, s0) = quantize_rows_twin(&[0.0; 4], 4);
        assert_eq!((q0, s0), (vec![0; 4], vec![1e-12]));
    }

    /// On random rows the FP8 product stays within e4m3's rounding (2^-4 relative per factor)
    /// of the dequantized weight's f32 product, and is not that product (the activations are
    /// quantized); a per-row scale applied to the wrong rows fails the bound.
    #[test]
    fn twin_tracks_the_dequantized_product() {
        let (out, inp, rows) = (24, 64, 5);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let w_rows: Vec<Vec<f32>> = (0..out)
            .map(|_| (0..inp).map(|_| rnd() * 400.0).collect())
            .collect();
        let scales: Vec<f32> = (0..out).map(|o| 0.001 * (1 + o) as f32).collect();
        let w = weight(&w_rows, &scales);
        let xs: Vec<f32> = (0..rows * inp).map(|_| rnd() * 3.0).collect();
        let x = Tensor::from_vec(xs, (rows, inp), &Device::Cpu).unwrap();
        let exact = x.matmul(&w.dequantize().unwrap().t().unwrap()).unwrap();
        let err = |w: &Fp8Weight| -> f32 {
            let got = fp8_linear_twin(&x, w).unwrap();
            let d = (got - &exact).unwrap().abs().unwrap();
            let num = d.max_all().unwrap().to_scalar::<f32>().unwrap();
            num / exact
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let e = err(&w);
        assert!(e > 0.0 && e < 1.0 / 16.0, "relative error {e}");
        let mut flipped = scales.clone();
        flipped.reverse();
        let bad = Fp8Weight {
            scale: Tensor::from_vec(flipped, out, &Device::Cpu).unwrap(),
            ..w.clone()
        };
        assert!(err(&bad) > 0.5, "reversed scales must fail the bound");
    }
}
