//! Tiny random-weight checkpoints for tests: a Hugging Face directory (config.json,
//! model.safetensors or sharded, tokenizer.json, tokenizer_config.json with a chat template,
//! generation_config.json) and a GGUF file holding the same weights (any ggml type), written
//! the way their real producers write them (llama.cpp's Q/K row permutation included).
//!
//! Lives in the library (not `tests/`) so unit tests, integration tests and benchmarks share it.
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::model::weights::permute_qk;

/// The chat template of SmolLM2 (ChatML with a default system turn).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Shape and flavour of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: &'static str, // "LlamaForCausalLM" | "MistralForCausalLM"
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Head dimension when it is not `hidden / heads` (written as config.json's `head_dim`).
    pub head_dim: Option<usize>,
    pub tie_embeddings: bool,
    /// Llama-3.1 rope scaling.
    pub llama3_rope: bool,
    pub max_pos: usize,
    pub seed: u64,
    /// Scale of the random weights (larger -> peakier, less tie-prone logits).
    pub scale: f32,
    /// Pass every 2-D weight through quantize -> dequantize with this ggml type, so a
    /// safetensors checkpoint holds exactly what a GGUF of that type decodes to.
    pub quant_roundtrip: Option<GgmlDType>,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            arch: "LlamaForCausalLM",
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            tie_embeddings: true,
            llama3_rope: false,
            max_pos: 2048,
            seed: 7,
            scale: 0.15,
            quant_roundtrip: None,
        }
    }
}

impl TinySpec {
    /// The head dimension: `head_dim`, else `hidden / heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }
}

/// Special tokens at ids 0, 1, 2 (as SmolLM2).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Vocabulary: 3 specials, the 256 byte-level characters, and merges for common English pairs.
pub fn tiny_vocab() -> (Vec<String>, Vec<(String, String)>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    let pairs = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("e", "r"),
        ("o", "n"),
        ("Ġ", "s"),
        ("r", "e"),
        ("a", "t"),
    ];
    let mut merges = Vec::new();
    for (a, b) in pairs {
        merges.push((a.to_string(), b.to_string()));
        tokens.push(format!("{a}{b}"));
    }
    (tokens, merges)
}

fn tokenizer(
    tokens: &[String],
    merges: &[(String, String)],
) -> anyhow::Result<tokenizers::Tokenizer> {
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges.to_vec(),
        )
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::new(
        false, true, true,
    )));
    t.add_special_tokens(
        SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(t)
}

/// Random weights under Hugging Face names.
pub fn tiny_weights(spec: &TinySpec, vocab: usize) -> anyhow::Result<Vec<(String, Tensor)>> {
    let dev = Device::Cpu;
    let hd = spec.head_dim();
    let mut rng_seed = spec.seed;
    let mut randn = |shape: &[usize], scale: f32| -> anyhow::Result<Tensor> {
        // A small deterministic generator (xorshift + Box-Muller) so fixtures are identical on
        // every machine and candle version.
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        let mut next = || {
            rng_seed ^= rng_seed << 13;
            rng_seed ^= rng_seed >> 7;
            rng_seed ^= rng_seed << 17;
            ((rng_seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        while v.len() < n {
            let (u1, u2) = (next(), next());
            let r = (-2.0 * u1.ln()).sqrt();
            v.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * scale);
        }
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &dev);
    let (h, i) = (spec.hidden, spec.intermediate);
    let mut w = vec![(
        "model.embed_tokens.weight".to_string(),
        randn(&[vocab, h], 1.0)?,
    )];
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        w.push((
            format!("{p}.input_layernorm.weight"),
            (ones(h)? + randn(&[h], 0.1)?)?,
        ));
        w.push((
            format!("{p}.self_attn.q_proj.weight"),
            randn(&[spec.heads * hd, h], spec.scale)?,
        ));
        w.push((
            format!("{p}.self_attn.k_proj.weight"),
            randn(&[spec.kv_heads * hd, h], spec.scale)?,
        ));
        w.push((
            format!("{p}.self_attn.v_proj.weight"),
            randn(&[spec.kv_heads * hd, h], spec.scale)?,
        ));
        w.push((
            format!("{p}.self_attn.o_proj.weight"),
            randn(&[h, spec.heads * hd], spec.scale)?,
        ));
        w.push((
            format!("{p}.post_attention_layernorm.weight"),
            (ones(h)? + randn(&[h], 0.1)?)?,
        ));
        w.push((
            format!("{p}.mlp.gate_proj.weight"),
            randn(&[i, h], spec.scale)?,
        ));
        w.push((
            format!("{p}.mlp.up_proj.weight"),
            randn(&[i, h], spec.scale)?,
        ));
        w.push((
            format!("{p}.mlp.down_proj.weight"),
            randn(&[h, i], spec.scale)?,
        ));
    }
    w.push(("model.norm.weight".to_string(), ones(h)?));
    if !spec.tie_embeddings {
        w.push(("lm_head.weight".to_string(), randn(&[vocab, h], 1.0)?));
    }
    if let Some(q) = spec.quant_roundtrip {
        for (_, t) in w.iter_mut().filter(|(_, t)| t.rank() == 2) {
            *t = QTensor::quantize(t, q)?.dequantize(&dev)?;
        }
    }
    Ok(w)
}

/// Write a Hugging Face checkpoint directory; `shards` > 1 writes an index and that many files.
pub fn write_hf_dir(dir: &Path, spec: &TinySpec, shards: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (tokens, merges) = tiny_vocab();
    let vocab = tokens.len();
    let hd = spec.head_dim();
    let mut cfg = serde_json::json!({
        "architectures": [spec.arch],
        "model_type": if spec.arch.starts_with("Mistral") { "mistral" } else { "llama" },
        "vocab_size": vocab, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": hd, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": spec.max_pos,
        "tie_word_embeddings": spec.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "torch_dtype": "float32"
    });
    if spec.llama3_rope {
        let (factor, low, high, original) = TINY_LLAMA3;
        cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor,
            "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original as usize});
    }
    if spec.arch.starts_with("Mistral") {
        cfg["sliding_window"] = serde_json::Value::Null;
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#,
    )?;
    let tc = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE, "add_bos_token": false});
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?,
    )?;
    tokenizer(&tokens, &merges)?
        .save(dir.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    let weights = tiny_weights(spec, vocab)?;
    if shards <= 1 {
        let map: HashMap<String, Tensor> = weights.into_iter().collect();
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    } else {
        let per = weights.len().div_ceil(shards);
        let mut index = serde_json::Map::new();
        for (s, chunk) in weights.chunks(per).enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
            for (k, _) in chunk {
                index.insert(k.clone(), serde_json::Value::String(name.clone()));
            }
            let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
            candle_core::safetensors::save(&map, dir.join(&name))?;
        }
        let idx = serde_json::json!({"metadata": {}, "weight_map": index});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&idx)?,
        )?;
    }
    Ok(())
}

/// A `llama3_rope` spec's scaling (factor, low_freq_factor, high_freq_factor,
/// original_max_position_embeddings): a short original context, so a ~150-token prompt is
/// rotated past it.
const TINY_LLAMA3: (f64, f64, f64, f64) = (8.0, 1.0, 4.0, 64.0);

/// Per-frequency RoPE factors of Llama-3.1's scaling as llama.cpp's `convert_hf_to_gguf.py`
/// writes them to `rope_freqs.weight` (its formula, written independently of
/// [`crate::model::rope`]): 1 for short wavelengths, `factor` for long ones, a blend between.
pub fn llama_cpp_rope_factors(
    base: f64,
    dim: usize,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    old_context_len: f64,
) -> Vec<f32> {
    let low_freq_wavelen = old_context_len / low_freq_factor;
    let high_freq_wavelen = old_context_len / high_freq_factor;
    (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / (base as f32).powf(i as f32 / dim as f32) as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                factor
            } else {
                let smooth = (old_context_len / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// Write a GGUF file with the same weights as [`write_hf_dir`] (same spec), every 2-D weight
/// stored as `qtype` (norms stay F32), Q/K permuted as llama.cpp's converter does, and the
/// llama3 RoPE scaling (`llama3_rope`) as its `rope_freqs.weight`.
pub fn write_gguf(path: &Path, spec: &TinySpec, qtype: GgmlDType) -> anyhow::Result<()> {
    use gguf_file::Value;
    let (tokens, merges) = tiny_vocab();
    let vocab = tokens.len();
    let hd = spec.head_dim();
    let weights = tiny_weights(spec, vocab)?;
    let mut qt: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &weights {
        let gname = crate::model::weights::gguf_name(name)
            .ok_or_else(|| anyhow::anyhow!("no gguf name for {name}"))?;
        let t = if name.ends_with("q_proj.weight") {
            permute_qk(t, spec.heads)?
        } else if name.ends_with("k_proj.weight") {
            permute_qk(t, spec.kv_heads)?
        } else {
            t.clone()
        };
        let ty = if t.rank() == 1 { GgmlDType::F32 } else { qtype };
        qt.push((gname, QTensor::quantize(&t, ty)?));
    }
    if spec.llama3_rope {
        // write_hf_dir's llama3 scaling, as llama.cpp's converter stores it.
        let (factor, low, high, original) = TINY_LLAMA3;
        let f = llama_cpp_rope_factors(10000.0, hd, factor, low, high, original);
        let t = Tensor::from_vec(f, hd / 2, &candle_core::Device::Cpu)?;
        qt.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let types: Vec<Value> = (0..vocab)
        .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("tiny")),
        ("llama.block_count", u(spec.layers)),
        ("llama.context_length", u(spec.max_pos)),
        ("llama.embedding_length", u(spec.hidden)),
        ("llama.feed_forward_length", u(spec.intermediate)),
        ("llama.attention.head_count", u(spec.heads)),
        ("llama.attention.head_count_kv", u(spec.kv_heads)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.rope.dimension_count", u(hd)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", u(vocab)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s(CHATML_TEMPLATE)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}
