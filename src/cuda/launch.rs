//! Kernel loading and launch helpers (CUDA builds only): the embedded fatbins, loaded once per
//! context, and the pointer / grid helpers every wrapper's launches use.
use super::OpsError;
use candle_core::{CudaDevice, DType, Device, Result, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaStream, DevicePtr, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub fn device_memory(device: &Device) -> Result<Option<(u64, u64)>> {
    match device {
        Device::Cuda(d) => {
            let (free, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| candle_core::Error::Msg(format!("cuMemGetInfo: {e}")))?;
            Ok(Some((free as u64, total as u64)))
        }
        _ => Ok(None),
    }
}

pub fn open_device(ordinal: usize) -> Result<Device> {
    use cudarc::driver::{result, sys};
    let device = Device::new_cuda(ordinal)?;
    let Device::Cuda(d) = &device else {
        unreachable!("new_cuda returns a CUDA device")
    };
    // Safety: kvc launches everything on candle's one stream, so no allocation needs the
    // events that order a buffer's use across streams.
    unsafe { d.disable_event_tracking() };
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(cu)?;
    // Safety: the device handle comes from the live context; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device())
            .map_err(|e| cu(format!("cuda:{ordinal}: memory pool: {e}")))?;
        let mut keep = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut std::ffi::c_void,
        )
        .map_err(|e| {
            cu(format!(
                "cuda:{ordinal}: memory pool release threshold: {e}"
            ))
        })?;
    }
    Ok(device)
}

static PAGED_ATTENTION: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/paged_attention.fatbin"));

static KV_CACHE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv_cache.fatbin"));

static EVICT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/evict.fatbin"));

static PREFILL_SOFTMAX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/prefill_softmax.fatbin"));

static PREFILL_ATTENTION: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/prefill_attention.fatbin"));

static WINDOW_SCORE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/window_score.fatbin"));

static LAYER_OPS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/layer_ops.fatbin"));

static FP8_LINEAR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8_linear.fatbin"));

type FuncCache = HashMap<(usize, String), CudaFunction>;

type ModCache = HashMap<(usize, &'static str), Arc<cudarc::driver::CudaModule>>;

static FUNCS: OnceLock<Mutex<(ModCache, FuncCache)>> = OnceLock::new();

pub(crate) fn cu(e: impl std::fmt::Display) -> candle_core::Error {
    OpsError::Cuda(e.to_string()).into()
}

/// `name` from module `module` ("paged_attention" | "kv_cache" | "evict" |
/// "prefill_softmax" | "prefill_attention" | "window_score" | "layer_ops" | "fp8_linear"), loaded once per
/// context.
pub(crate) fn func(
    stream: &Arc<CudaStream>,
    module: &'static str,
    name: &str,
) -> Result<CudaFunction> {
    let ctx = stream.context();
    let key = Arc::as_ptr(ctx) as usize;
    let mut g = FUNCS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| cu("kernel cache poisoned"))?;
    if let Some(f) = g.1.get(&(key, name.to_string())) {
        return Ok(f.clone());
    }
    let m = match g.0.get(&(key, module)) {
        Some(m) => m.clone(),
        None => {
            let bin = match module {
                "paged_attention" => PAGED_ATTENTION,
                "evict" => EVICT,
                "prefill_softmax" => PREFILL_SOFTMAX,
                "prefill_attention" => PREFILL_ATTENTION,
                "window_score" => WINDOW_SCORE,
                "layer_ops" => LAYER_OPS,
                "fp8_linear" => FP8_LINEAR,
                "kv_cache" => KV_CACHE,
                other => return Err(cu(format!("no kernel module kernels/{other}.cu"))),
            };
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec()))
                .map_err(|e| cu(format!("loading kernels/{module}.cu: {e}")))?;
            g.0.insert((key, module), m.clone());
            m
        }
    };
    let f = m
        .load_function(name)
        .map_err(|e| cu(format!("kernel {name} in kernels/{module}.cu: {e}")))?;
    g.1.insert((key, name.to_string()), f.clone());
    Ok(f)
}

pub(crate) fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => Err(OpsError::Shape(format!("expected a CUDA tensor, got one on {d:?}")).into()),
    }
}

/// Device address of a contiguous CUDA tensor's first element (0 for `None`). The caller
/// keeps the tensor alive until the launch is queued; candle frees stream-ordered.
pub(crate) fn ptr(t: Option<&Tensor>, stream: &CudaStream) -> Result<u64> {
    let Some(t) = t else { return Ok(0) };
    if !t.layout().is_contiguous() {
        return Err(OpsError::Shape(format!("tensor {:?} is not contiguous", t.dims())).into());
    }
    base_ptr(t, stream)
}

/// Device address of a CUDA tensor's first element whatever its strides: for a kernel told
/// the layout by other arguments (the caller checked it).
pub(crate) fn base_ptr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        return Err(OpsError::Shape("expected a CUDA tensor".into()).into());
    };
    let base = match t.dtype() {
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(stream).0,
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(stream).0,
        DType::U8 => cs.as_cuda_slice::<u8>()?.device_ptr(stream).0,
        DType::I64 => cs.as_cuda_slice::<i64>()?.device_ptr(stream).0,
        dt => return Err(OpsError::Shape(format!("unsupported dtype {dt:?}")).into()),
    };
    Ok(base + (l.start_offset() * t.dtype().size_in_bytes()) as u64)
}

pub(crate) fn dtype_name(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dt => {
            return Err(OpsError::Shape(format!("K/V dtype {dt:?} (f32, bf16, f16 only)")).into())
        }
    })
}

pub(crate) fn grid_1d(n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(256);
    if blocks > u32::MAX as usize {
        return Err(OpsError::Shape(format!("{n} elements is too many")).into());
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}
