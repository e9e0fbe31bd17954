//! Flags shared by every command that loads a model.
use candle_core::{DType, Device};
use clap::Args;

use crate::hub::{HubEnv, ResolvedModel};
use crate::model::{self, LoadedModel};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a checkpoint directory (config.json + *.safetensors + tokenizer.json), a .gguf
    /// file, a hub id `org/name[@revision]`, or an alias: llama-3.1-8b, llama-3.1-70b,
    /// mistral-7b, smollm2-135m (the embedded default; `scripts/fetch-model.sh` installs it).
    #[arg(long, short = 'm', default_value = "smollm2-135m", env = "KVC_MODEL")]
    pub model: String,
    /// Device: cpu, cuda or cuda:N. Default: cuda:0 when kvc was built with CUDA and a GPU is
    /// present, else cpu.
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype: f32, f16 or bf16. Default: f32 on the CPU, bf16 on CUDA. Quantized GGUF
    /// weights are dequantized to it at load.
    #[arg(long)]
    pub dtype: Option<String>,
    /// On a GPU, run each layer's residual add + RMSNorm, SiLU * up and RoPE as candle op
    /// chains instead of kvc's fused kernels (`kernels/layer_ops.cu`): the A/B reference for
    /// benchmarks. Same results up to rounding.
    #[arg(long)]
    pub unfused_layers: bool,
    /// FP8 (e4m3) checkpoints (fbgemm_fp8, compressed-tensors): `auto` runs FP8 tensor-core
    /// matmuls on a GPU of compute capability 8.9+ in bf16 (half the weight memory) and
    /// dequantizes at load elsewhere; `matmul` insists; `dequantize` keeps the run dtype's
    /// matmuls (the reference). No effect on other checkpoints.
    #[arg(long, value_enum, default_value_t = model::Fp8Mode::Auto)]
    pub fp8: model::Fp8Mode,
}

impl ModelArgs {
    pub fn device(&self) -> anyhow::Result<Device> {
        match &self.device {
            Some(d) => model::parse_device(d),
            None => Ok(default_device()),
        }
    }

    pub fn dtype(&self, device: &Device) -> anyhow::Result<DType> {
        match &self.dtype {
            Some(d) => model::parse_dtype(d),
            None => Ok(if device.is_cuda() {
                DType::BF16
            } else {
                DType::F32
            }),
        }
    }

    pub fn resolve(&self) -> anyhow::Result<ResolvedModel> {
        Ok(crate::hub::resolve_model(&self.model, &HubEnv::from_env())?)
    }

    /// Resolve, then load on the chosen device and dtype.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = self.device()?;
        let dtype = self.dtype(&device)?;
        let resolved = self.resolve()?;
        let lm = self.load_resolved(&resolved, &device, dtype, None)?;
        if let Some(note) = lm.weights_note() {
            eprintln!("{note}");
        }
        Ok(lm)
    }

    /// Load `resolved` (one tensor-parallel rank's part with `comm`) in `dtype` on `device`
    /// as these flags say (`--fp8`, `--unfused-layers`).
    pub fn load_resolved(
        &self,
        resolved: &ResolvedModel,
        device: &Device,
        dtype: DType,
        comm: Option<std::sync::Arc<dyn crate::cuda::comm::Comm>>,
    ) -> anyhow::Result<LoadedModel> {
        let mut lm = model::load_shard(resolved, device, dtype, comm, self.fp8)?;
        lm.model.fused = !self.unfused_layers;
        Ok(lm)
    }
}

/// cuda:0 when built with CUDA and a device opens, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = crate::cuda::open_device(0) {
        return d;
    }
    Device::Cpu
}

/// `--cache` of `kvc generate` and `kvc bench-model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheArg {
    /// Paged on a GPU (the kernels `kvc eval` and `kvc bench` run), contiguous on the CPU.
    Auto,
    /// The paged cache with nothing evicted (allocated for the prompt + new tokens up front).
    Paged,
    /// The contiguous reference cache (one growing tensor per layer; candle ops for decode).
    Contiguous,
}

impl CacheArg {
    /// The cache this choice means on `device`.
    pub fn resolve(self, device: &Device) -> crate::engine::FullCache {
        use crate::engine::FullCache;
        match self {
            CacheArg::Auto if device.is_cuda() => FullCache::Paged,
            CacheArg::Auto | CacheArg::Contiguous => FullCache::Contiguous,
            CacheArg::Paged => FullCache::Paged,
        }
    }
}
