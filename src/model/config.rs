//! Model configuration: one resolved [`Config`] built either from a Hugging Face `config.json`
//! (+ `generation_config.json`) or from GGUF metadata (STYLE.md habit 1).
//!
//! The serde mirror [`HfConfig`] accepts fields the way they appear in the wild (an
//! `eos_token_id` that is a number or a list, `rope_scaling` absent or null, `head_dim` absent,
//! RoPE as `rope_parameters` or as `rope_theta` + `rope_scaling`).
//!
//! Contract: every key that changes the math is applied or refused with an error naming it,
//! never defaulted in silence. Applied: RoPE (see [`crate::model::rope`]), `head_dim`,
//! `num_key_value_heads`, `rms_norm_eps`, `tie_word_embeddings`, Mistral's `sliding_window` (as
//! a context cap: within the window full attention equals windowed attention), defaults as
//! transformers' config classes set them (Mistral's window 4096 and context 131072 when absent,
//! Llama's context 2048), an FP8 `quantization_config` (weights dequantized at load:
//! [`crate::model::weights::dequantize_fp8`]). Refused: `attention_bias` / `mlp_bias` true,
//! any other `quantization_config`, `layer_types` other than full attention, `hidden_act` other than silu, unknown RoPE types.
//! Not read: keys without effect on a llama-family forward (dtype, initializer range, ...), and
//! `sliding_window` of a `LlamaForCausalLM`, which transformers' Llama ignores too.
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

use crate::model::rope::{Rope, RopeScaling, DEFAULT_THETA};
use crate::model::ModelError;

/// Architecture families that share kvc's llama-family forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3/3.1, SmolLM2 (`LlamaForCausalLM`, GGUF `llama`).
    Llama,
    /// Mistral 7B (`MistralForCausalLM`): llama layers, optional sliding window.
    Mistral,
}

/// The resolved configuration every loader produces and the forward pass reads.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    /// Longest context the model was trained for (prompt + generated tokens).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Mistral's sliding attention window, when the checkpoint sets one. kvc attends over the
    /// whole cache, which equals the window's attention while the context fits in it: the
    /// window caps [`Config::max_context`].
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// Config-level end-of-sequence ids (the tokenizer adds chat-template stop tokens; see
    /// `model::tokenizer::stop_ids`).
    pub eos_token_ids: BTreeSet<u32>,
}

impl Config {
    /// Longest context kvc runs exactly: the trained context, capped by a sliding window.
    /// Prompts at or past it are refused, generation stops there.
    pub fn max_context(&self) -> usize {
        self.sliding_window
            .map_or(self.max_position_embeddings, |w| {
                w.min(self.max_position_embeddings)
            })
    }

    /// Number of query heads sharing one kv-head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Structural sanity checks shared by every loader; errors name the offending field.
    pub fn validate(&self, source: &Path) -> Result<(), ModelError> {
        let bad = |msg: String| ModelError::BadConfig {
            path: source.to_path_buf(),
            msg,
        };
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err(bad(
                "num_attention_heads and num_key_value_heads must be > 0".into(),
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {} must be even and > 0",
                self.head_dim
            )));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} must be > 0")));
            }
        }
        Ok(())
    }
}

/// `eos_token_id` appears as a number, a list, or null.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Mirror of a Hugging Face `config.json` for the llama family (fields as found in the wild).
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5: `{rope_type, rope_theta, factor, ...}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Absent (`None`) differs from `null` (`Some(None)`): Mistral's config class defaults an
    /// absent window to 4096.
    #[serde(default, deserialize_with = "present")]
    pub sliding_window: Option<Option<usize>>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}

/// A key that is present (even as `null`) deserializes to `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// The part of `generation_config.json` kvc reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
}

impl HfConfig {
    /// Resolve into [`Config`]; `path` names the file in errors.
    pub fn resolve(
        &self,
        path: &Path,
        gen: Option<&GenerationConfig>,
    ) -> Result<Config, ModelError> {
        let bad = |msg: String| ModelError::BadConfig {
            path: path.to_path_buf(),
            msg,
        };
        let arch_name = self
            .architectures
            .first()
            .cloned()
            .or_else(|| self.model_type.clone())
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            other => {
                return Err(ModelError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act {act:?} is not supported (only \"silu\")"
                )));
            }
        }
        self.refuse_unsupported().map_err(bad)?;
        let rope = Rope::from_hf(
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.rope_parameters.as_ref(),
        )
        .map_err(bad)?;
        // Defaults of transformers' config classes for absent keys.
        let (sliding_window, max_pos) = match arch {
            Arch::Mistral => (self.sliding_window.unwrap_or(Some(4096)), 4096 * 32),
            Arch::Llama => (None, 2048),
        };
        let num_kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0 {
            return Err(bad("num_attention_heads must be > 0".into()));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        let mut eos: BTreeSet<u32> = BTreeSet::new();
        if let Some(e) = &self.eos_token_id {
            eos.extend(e.to_vec());
        }
        if let Some(e) = gen.and_then(|g| g.eos_token_id.as_ref()) {
            eos.extend(e.to_vec());
        }
        let cfg = Config {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: num_kv,
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(max_pos),
            tie_word_embeddings: self.tie_word_embeddings,
            sliding_window,
            bos_token_id: self.bos_token_id.or(gen.and_then(|g| g.bos_token_id)),
            eos_token_ids: eos,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Keys that would change the math in a way kvc does not implement.
    fn refuse_unsupported(&self) -> Result<(), String> {
        for (key, on) in [
            ("attention_bias", self.attention_bias),
            ("mlp_bias", self.mlp_bias),
        ] {
            if on == Some(true) {
                return Err(format!(
                    "{key}: true (biases on the projections) is not supported: kvc's llama-family forward has none"
                ));
            }
        }
        if let Some(q) = self.quantization_config.as_ref().filter(|q| !q.is_null()) {
            if !fp8_weights(q) {
                let method = q
                    .get("quant_method")
                    .and_then(|m| m.as_str())
                    .unwrap_or("?");
                return Err(format!(
                    "quantization_config (quant_method {method:?}) is not supported: kvc loads bf16/f16/f32 safetensors, FP8 ones (fbgemm_fp8, or compressed-tensors with 8-bit float weights, per-tensor or per-channel scales) or a GGUF file"
                ));
            }
        }
        if let Some(t) = self
            .layer_types
            .iter()
            .flatten()
            .find(|t| t.as_str() != "full_attention")
        {
            return Err(format!(
                "layer_types contains {t:?}: kvc runs every layer with full attention"
            ));
        }
        Ok(())
    }
}

/// Read `config.json` (and `generation_config.json` beside it when present).
pub fn load_hf_config(dir: &Path) -> Result<Config, ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::BadConfig {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let gen_path = dir.join("generation_config.json");
    let gen = if gen_path.exists() {
        let t = std::fs::read_to_string(&gen_path).map_err(|e| ModelError::io(&gen_path, e))?;
        Some(
            serde_json::from_str::<GenerationConfig>(&t).map_err(|e| ModelError::BadConfig {
                path: gen_path.clone(),
                msg: e.to_string(),
            })?,
        )
    } else {
        None
    };
    hf.resolve(&path, gen.as_ref())
}

/// Build the [`Config`] from GGUF metadata (`general.architecture` = `llama`); `rope_freqs`:
/// the file's `rope_freqs.weight` (Llama-3.1's RoPE scaling as per-frequency factors).
pub fn config_from_gguf(
    path: &Path,
    md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    has_output_tensor: bool,
    rope_freqs: Option<Vec<f32>>,
    vocab_len: usize,
) -> Result<Config, ModelError> {
    let bad = |msg: String| ModelError::BadConfig {
        path: path.to_path_buf(),
        msg,
    };
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad("GGUF metadata lacks general.architecture".into()))?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        other => {
            return Err(ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
            })
        }
    };
    let g = GgufArch {
        path,
        md,
        arch: &arch_name,
    };
    let hidden = g.int("embedding_length")?;
    let heads = g.int("attention.head_count")?;
    let kv_heads = g.int("attention.head_count_kv").unwrap_or(heads);
    let head_dim = g
        .int("attention.key_length")
        .or_else(|_| g.int("rope.dimension_count"))
        .unwrap_or(hidden / heads.max(1));
    let vocab = g.int("vocab_size").unwrap_or(vocab_len);
    let tok_id = |k: &str| md.get(k).and_then(gguf_to_u64).map(|x| x as u32);
    let mut eos = BTreeSet::new();
    if let Some(e) = tok_id("tokenizer.ggml.eos_token_id") {
        eos.insert(e);
    }
    let scaling = match (g.rope_scaling()?, rope_freqs) {
        (s, None) => s,
        (None, Some(factors)) if factors.len() == head_dim / 2 => {
            Some(RopeScaling::Factors { factors })
        }
        (None, Some(factors)) => {
            return Err(bad(format!(
                "rope_freqs.weight holds {} factors where head_dim {head_dim} needs {}: the file is not a llama GGUF kvc can run",
                factors.len(),
                head_dim / 2
            )))
        }
        (Some(s), Some(_)) => {
            return Err(bad(format!(
                "GGUF has both rope.scaling.type ({s:?}) and rope_freqs.weight: kvc applies one RoPE scaling, not both"
            )))
        }
    };
    let cfg = Config {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: g.int("feed_forward_length")?,
        num_hidden_layers: g.int("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: g.float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope: Rope {
            theta: g.float("rope.freq_base").unwrap_or(DEFAULT_THETA),
            scaling,
        },
        max_position_embeddings: g.int("context_length").unwrap_or(4096),
        tie_word_embeddings: !has_output_tensor,
        sliding_window: None,
        bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: eos,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// The `<arch>.*` keys of a GGUF's metadata; errors name the file.
struct GgufArch<'a> {
    path: &'a Path,
    md: &'a std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    /// `general.architecture`, the keys' prefix.
    arch: &'a str,
}

impl GgufArch<'_> {
    /// `msg` as an invalid-configuration error naming the file.
    fn bad(&self, msg: String) -> ModelError {
        ModelError::BadConfig {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    /// `<arch>.<k>` as an integer; an error when it is missing or not an integer.
    fn int(&self, k: &str) -> Result<usize, ModelError> {
        let key = format!("{}.{k}", self.arch);
        let v = self
            .md
            .get(&key)
            .ok_or_else(|| self.bad(format!("GGUF metadata lacks {key}")))?;
        gguf_to_u64(v)
            .map(|x| x as usize)
            .ok_or_else(|| self.bad(format!("{key} is not an integer")))
    }

    /// `<arch>.<k>` as a float (stored as f32 or f64), if present.
    fn float(&self, k: &str) -> Option<f64> {
        use candle_core::quantized::gguf_file::Value;
        self.md
            .get(&format!("{}.{k}", self.arch))
            .and_then(|v| match v {
                Value::F32(x) => Some(*x as f64),
                Value::F64(x) => Some(*x),
                _ => None,
            })
    }

    /// RoPE scaling from `<arch>.rope.scaling.type`: none (absent or `none`), or `linear` with
    /// its `rope.scaling.factor`; any other type is refused.
    fn rope_scaling(&self) -> Result<Option<RopeScaling>, ModelError> {
        let kind = self
            .md
            .get(&format!("{}.rope.scaling.type", self.arch))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        match kind {
            None | Some("none") => Ok(None),
            Some("linear") => Ok(Some(RopeScaling::Linear {
                factor: self.float("rope.scaling.factor").ok_or_else(|| {
                    self.bad("rope.scaling.type linear without rope.scaling.factor".into())
                })?,
            })),
            Some(other) => Err(self.bad(format!(
                "GGUF rope.scaling.type {other:?} is not supported (supported: none, linear)"
            ))),
        }
    }
}

pub(crate) fn gguf_to_u64(v: &candle_core::quantized::gguf_file::Value) -> Option<u64> {
    use candle_core::quantized::gguf_file::Value::*;
    match v {
        U8(x) => Some(*x as u64),
        I8(x) if *x >= 0 => Some(*x as u64),
        U16(x) => Some(*x as u64),
        I16(x) if *x >= 0 => Some(*x as u64),
        U32(x) => Some(*x as u64),
        I32(x) if *x >= 0 => Some(*x as u64),
        U64(x) => Some(*x),
        I64(x) if *x >= 0 => Some(*x as u64),
        _ => None,
    }
}

/// Whether `quantization_config` describes FP8 (e4m3) weights with per-tensor or per-channel
/// scales, which kvc dequantizes at load: fbgemm_fp8 (Meta's), or compressed-tensors whose
/// every config group quantizes weights to 8-bit floats by tensor or by channel (static or
/// dynamic activation scales are not applied: activations stay in the run dtype).
fn fp8_weights(q: &serde_json::Value) -> bool {
    match q.get("quant_method").and_then(|m| m.as_str()) {
        Some("fbgemm_fp8") => true,
        Some("compressed-tensors") => q
            .get("config_groups")
            .and_then(|g| g.as_object())
            .is_some_and(|groups| {
                !groups.is_empty()
                    && groups.values().all(|g| {
                        let w = &g["weights"];
                        w["num_bits"] == 8
                            && w["type"] == "float"
                            && matches!(w["strategy"].as_str(), Some("tensor" | "channel"))
                    })
            }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, ModelError> {
        let hf: HfConfig = serde_json::from_str(json).unwrap();
        hf.resolve(Path::new("config.json"), None)
    }

    #[test]
    fn llama31_config_resolves_rope_and_eos_list() {
        let c = parse(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":4096,
            "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
            "num_key_value_heads":8,"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "max_position_embeddings":131072,"eos_token_id":[128001,128008,128009],
            "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.gqa_group(), 4);
        assert_eq!(
            c.eos_token_ids.iter().copied().collect::<Vec<_>>(),
            vec![128001, 128008, 128009]
        );
        assert!(matches!(
            c.rope.scaling,
            Some(RopeScaling::Llama3 {
                original_max_position_embeddings: 8192,
                ..
            })
        ));
    }

    #[test]
    fn unknown_architecture_and_rope_type_are_errors() {
        let e = parse(r#"{"architectures":["GPTNeoXForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#)
            .unwrap_err();
        assert!(e.to_string().contains("GPTNeoXForCausalLM"), "{e}");
        let e = parse(r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"type":"yarn","factor":2.0}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }

    #[test]
    fn heads_must_divide() {
        let e = parse(r#"{"architectures":["MistralForCausalLM"],"vocab_size":8,"hidden_size":12,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#)
            .unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
    }
}
