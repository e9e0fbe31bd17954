//! The model layer: configuration, weights, tokenizer, chat template and the llama-family
//! forward pass, loaded from a Hugging Face checkpoint directory or a GGUF file into one
//! [`LoadedModel`].
pub mod chat;
pub mod config;
pub mod llama;
pub mod rope;
pub mod tiktoken;
pub mod tiny;
pub mod tokenizer;
pub mod weights;

use candle_core::{DType, Device};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::hub::{ModelSource, ResolvedModel};
pub use config::Config;
pub use llama::Llama;
pub use tokenizer::Tokenizer;

/// Errors of the model layer; each names the file or the fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: missing; {hint}")]
    MissingFile { path: PathBuf, hint: String },
    #[error("{path}: invalid model configuration: {msg}")]
    BadConfig { path: PathBuf, msg: String },
    #[error("{path}: architecture {arch:?} is not supported (kvc runs LlamaForCausalLM and MistralForCausalLM checkpoints, and GGUF files of architecture \"llama\")")]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("{path}: tensor {name} is missing (is this a complete llama-family checkpoint?)")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {got:?}, the configuration implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("the prompt has {len} tokens but the model's context holds {max} (prompt + up to {new} new tokens must fit): shorten it or lower --max-new-tokens")]
    PromptTooLong { len: usize, max: usize, new: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: path.to_path_buf(),
                hint: "no such file".into(),
            }
        } else {
            ModelError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set
/// (error lines stay one line).
pub fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_msg(inner))
        }
        other => other.to_string(),
    }
}

/// A model ready to generate: weights, tokenizer, stop set.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Ids that end generation (see `tokenizer.rs` for the rule).
    pub stop_ids: BTreeSet<u32>,
    /// Short model name (for result paths).
    pub name: String,
    pub source: ModelSource,
}

impl LoadedModel {
    pub fn config(&self) -> &Config {
        &self.model.cfg
    }

    /// How FP8 weights run, for the user (`None`: the checkpoint has none).
    pub fn weights_note(&self) -> Option<String> {
        match self.model.fp8 {
            llama::Fp8Weights::None => None,
            llama::Fp8Weights::Matmul => Some(
                "FP8 weights: e4m3 tensor-core matmuls with per-token activation scales (--fp8 dequantize for the run dtype's)".into(),
            ),
            llama::Fp8Weights::Dequantized => Some(format!(
                "FP8 weights: dequantized to {:?} at load (--fp8 dequantize, or no FP8 matmuls here: they need bf16 on a GPU of compute capability 8.9+)",
                self.model.dtype
            )),
        }
    }

    /// Build the prompt ids of `text`: through the chat template (a single user turn,
    /// tokenized without adding special tokens, as transformers' `apply_chat_template`) or as
    /// raw text (with the tokenizer's BOS, as LongBench's `tokenizer(prompt)`).
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>, ModelError> {
        prompt_ids_for(&self.tokenizer, text, chat, "")
    }
}

/// [`LoadedModel::prompt_ids`] on a bare tokenizer, with an answer prefix appended after the
/// chat template's generation prompt (RULER puts its answer prefix in the assistant turn; the
/// rendered string and the prefix are tokenized together). LongBench prompts pass "".
pub fn prompt_ids_for(
    tok: &Tokenizer,
    text: &str,
    chat: bool,
    answer_prefix: &str,
) -> Result<Vec<u32>, ModelError> {
    if chat {
        let tpl = tok.chat_template.as_deref().ok_or_else(|| {
            ModelError::ChatTemplate("the model has no chat template: run without --chat".into())
        })?;
        let mut rendered = chat::render(
            tpl,
            &chat::user_turn(text),
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )?;
        rendered.push_str(answer_prefix);
        tok.encode(&rendered, false)
    } else if answer_prefix.is_empty() {
        tok.encode(text, true)
    } else {
        tok.encode(&format!("{text}{answer_prefix}"), true)
    }
}

/// Parse `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ord: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                anyhow::bail!(
                    "this kvc was built without CUDA: rebuild with `cargo build --release --features cuda` (see README, \"GPU\") or use --device cpu"
                );
            }
            crate::cuda::open_device(ord).map_err(|e| anyhow::anyhow!("cannot open {s}: {e}"))
        }
        other => anyhow::bail!("unknown device {other:?}: use cpu, cuda or cuda:N"),
    }
}

/// Parse `f32`, `f16`, `bf16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => anyhow::bail!("unknown dtype {other:?}: use f32, f16 or bf16"),
    }
}

/// How a checkpoint's FP8 (e4m3) weights run (`--fp8`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Fp8Mode {
    /// FP8 matmuls where they run (a bf16 run on a GPU of compute capability 8.9 or later:
    /// Ada, Hopper), else dequantized at load.
    #[default]
    Auto,
    /// FP8 tensor-core matmuls (e4m3 weights and per-token e4m3 activations); an error where
    /// they cannot run.
    Matmul,
    /// Dequantized at load to the run dtype (the reference the FP8 matmuls are checked against).
    Dequantize,
}

impl Fp8Mode {
    /// Whether the FP8 matmuls run for `dtype` on `device`; an error for `Matmul` where they
    /// cannot.
    pub fn matmul(self, dtype: DType, device: &Device) -> Result<bool, ModelError> {
        let dtype_ok = dtype == DType::BF16;
        let device_ok = crate::cuda::fp8_linear::supported(device)?;
        match self {
            Fp8Mode::Dequantize => Ok(false),
            Fp8Mode::Auto => Ok(dtype_ok && device_ok),
            Fp8Mode::Matmul if !device_ok => Err(ModelError::Candle(candle_core::Error::Msg(
                format!("--fp8 matmul needs a GPU of compute capability 8.9 or later (Ada, Hopper) and a CUDA build; {device:?} is not one: use --fp8 dequantize"),
            ))),
            Fp8Mode::Matmul if !dtype_ok => Err(ModelError::Candle(candle_core::Error::Msg(
                format!("--fp8 matmul runs in bf16, not {dtype:?}: use --dtype bf16, or --fp8 dequantize"),
            ))),
            Fp8Mode::Matmul => Ok(true),
        }
    }
}

/// Load a resolved model in `dtype` on `device` (FP8 weights as [`Fp8Mode::Auto`] says).
pub fn load(
    resolved: &ResolvedModel,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel, ModelError> {
    load_shard(resolved, device, dtype, None, Fp8Mode::Auto)
}

/// [`load`] of one tensor-parallel rank's part (`comm`: its group; [`Llama::load_shard`]),
/// FP8 weights run as `fp8` says.
pub fn load_shard(
    resolved: &ResolvedModel,
    device: &Device,
    dtype: DType,
    comm: Option<std::sync::Arc<dyn crate::cuda::comm::Comm>>,
    fp8: Fp8Mode,
) -> Result<LoadedModel, ModelError> {
    let (cfg, tokenizer, mut src) = match &resolved.source {
        ModelSource::HfDir(dir) => {
            let cfg = config::load_hf_config(dir)?;
            let tok = Tokenizer::from_dir(dir)?;
            (cfg, tok, weights::WeightSource::safetensors_dir(dir)?)
        }
        ModelSource::Gguf(path) => {
            let (mut src, md) = weights::WeightSource::gguf(path)?;
            let has_output = src.contains("lm_head.weight");
            let tok = Tokenizer::from_gguf(path, &md)?;
            let vocab_len = tok.inner.get_vocab_size(false);
            let rope_freqs = src.gguf_f32("rope_freqs.weight")?;
            let cfg = config::config_from_gguf(path, &md, has_output, rope_freqs, vocab_len)?;
            (cfg, tok, src)
        }
    };
    let fp8_matmul = src.has_fp8() && fp8.matmul(dtype, device)?;
    let model = Llama::load_shard(&cfg, &mut src, dtype, device, comm, fp8_matmul)?;
    let stop_ids = tokenizer.stop_ids(&cfg.eos_token_ids);
    Ok(LoadedModel {
        model,
        tokenizer,
        stop_ids,
        name: resolved.name.clone(),
        source: resolved.source.clone(),
    })
}
