//! Config fidelity: every `config.json` key that changes the math is applied or refused, never
//! defaulted in silence. Each key family gets a tiny checkpoint whose outputs change when the
//! key is ignored (so a loader that drops it fails here), or an error that names the key.
mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use kvc::engine::{self, GenParams, NoHooks};
use kvc::hub::{ModelSource, ResolvedModel};
use kvc::kvcache::contiguous::ContiguousCache;
use kvc::model::tiny::{write_gguf, write_hf_dir, TinySpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn resolved(src: ModelSource) -> ResolvedModel {
    ResolvedModel {
        source: src,
        name: "tiny".into(),
        hub_id: None,
        revision: None,
    }
}

/// A tiny checkpoint under `root/name` whose config.json is edited by `edit`.
fn checkpoint(root: &Path, name: &str, spec: &TinySpec, edit: impl Fn(&mut Value)) -> PathBuf {
    let dir = root.join(name);
    write_hf_dir(&dir, spec, 1).unwrap();
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dir
}

fn load(dir: &Path) -> Result<kvc::model::LoadedModel, kvc::model::ModelError> {
    kvc::model::load(
        &resolved(ModelSource::HfDir(dir.into())),
        &Device::Cpu,
        DType::F32,
    )
}

/// First-step logits of a prompt long enough (~150 tokens) that positions past the tiny
/// llama3 spec's original context (64) are rotated.
fn logits(dir: &Path) -> Vec<f32> {
    let mut lm = load(dir).unwrap();
    first_logits(&mut lm.model, &lm.tokenizer)
}

/// [`logits`] of `model` with its checkpoint's tokenizer.
fn first_logits(
    model: &mut kvc::model::llama::Llama,
    tok: &kvc::model::tokenizer::Tokenizer,
) -> Vec<f32> {
    let text = "the cat sat on the mat and then the rat ate it ".repeat(5);
    let ids = kvc::model::prompt_ids_for(tok, &text, false, "").unwrap();
    assert!(ids.len() > 100, "{}", ids.len());
    let params = GenParams {
        max_new_tokens: 1,
        stop_ids: Default::default(),
        min_new_tokens: 0,
        prefill_chunk: 64,
        max_context: model.cfg.max_context(),
    };
    let mut cache = ContiguousCache::new(model.cfg.num_hidden_layers);
    let g = engine::generate(model, &mut cache, &ids, &params, &mut NoHooks).unwrap();
    g.first_logits.unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Remove the top-level RoPE keys (the transformers >= 5 form has none).
fn strip_legacy_rope(c: &mut Value) {
    let o = c.as_object_mut().unwrap();
    o.remove("rope_theta");
    o.remove("rope_scaling");
}

#[test]
fn rope_parameters_apply_exactly_as_the_legacy_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let base = logits(&checkpoint(tmp.path(), "base", &spec, |_| {}));
    let llama3 = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_type": "llama3"});
    // Legacy form: rope_theta + rope_scaling at the top level.
    let legacy = logits(&checkpoint(tmp.path(), "legacy", &spec, |c| {
        c["rope_theta"] = json!(500.0);
        c["rope_scaling"] = llama3.clone();
    }));
    // transformers >= 5: rope_parameters only.
    let params = logits(&checkpoint(tmp.path(), "params", &spec, |c| {
        strip_legacy_rope(c);
        let mut p = llama3.clone();
        p["rope_theta"] = json!(500.0);
        c["rope_parameters"] = p;
    }));
    assert_eq!(
        legacy, params,
        "the two spellings must give identical logits"
    );
    // Ignoring rope_parameters (base 10000, no scaling) would give the base model's logits.
    assert!(
        max_abs_diff(&params, &base) > 1e-3,
        "rope_parameters had no effect"
    );
    // Each part matters on its own: the base alone, and the scaling alone.
    let theta_only = logits(&checkpoint(tmp.path(), "theta", &spec, |c| {
        strip_legacy_rope(c);
        c["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500.0});
    }));
    assert!(max_abs_diff(&theta_only, &base) > 1e-3);
    assert!(max_abs_diff(&theta_only, &params) > 1e-3);
    // Linear scaling (position interpolation) changes the rotation too.
    let linear = logits(&checkpoint(tmp.path(), "linear", &spec, |c| {
        c["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
    }));
    assert!(max_abs_diff(&linear, &base) > 1e-3);
}

#[test]
fn unsupported_math_keys_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "yarn",
            Box::new(|c| {
                c["rope_parameters"] =
                    json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
            }),
            "yarn",
        ),
        (
            "dynamic",
            Box::new(|c| c["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0})),
            "dynamic",
        ),
        (
            "conflict",
            Box::new(|c| {
                c["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0})
            }),
            "disagree",
        ),
        (
            "attn_bias",
            Box::new(|c| c["attention_bias"] = json!(true)),
            "attention_bias",
        ),
        (
            "mlp_bias",
            Box::new(|c| c["mlp_bias"] = json!(true)),
            "mlp_bias",
        ),
        (
            "quant",
            Box::new(|c| c["quantization_config"] = json!({"quant_method": "fp8"})),
            "quantization_config",
        ),
        (
            "layer_types",
            Box::new(|c| c["layer_types"] = json!(["sliding_attention", "full_attention"])),
            "layer_types",
        ),
        (
            "act",
            Box::new(|c| c["hidden_act"] = json!("gelu")),
            "hidden_act",
        ),
    ];
    for (name, edit, needle) in cases {
        let dir = checkpoint(tmp.path(), name, &spec, edit);
        let e = load(&dir).err().unwrap_or_else(|| panic!("{name}: loaded"));
        assert!(e.to_string().contains(needle), "{name}: {e}");
    }
    // Explicitly false biases and full-attention layer types are what kvc runs: accepted.
    let dir = checkpoint(tmp.path(), "ok", &spec, |c| {
        c["attention_bias"] = json!(false);
        c["mlp_bias"] = json!(false);
        c["layer_types"] = json!(["full_attention", "full_attention"]);
    });
    assert_eq!(
        logits(&dir),
        logits(&checkpoint(tmp.path(), "plain", &spec, |_| {}))
    );
}

#[test]
fn head_dim_and_tied_embeddings_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    // head_dim 32 with hidden 64 and 4 heads: projections are 128 wide, not 64. Ignoring the
    // key would fail the weight shapes.
    let spec = TinySpec {
        head_dim: Some(32),
        ..TinySpec::default()
    };
    let dir = checkpoint(tmp.path(), "hd32", &spec, |_| {});
    let lm = load(&dir).unwrap();
    assert_eq!(lm.config().head_dim, 32);
    assert_eq!(logits(&dir).len(), lm.config().vocab_size);
    // Untied with its own lm_head: the head is that tensor. Marking the same file tied makes
    // the embedding the head (as transformers ties), so the logits change.
    let untied = TinySpec {
        tie_embeddings: false,
        ..TinySpec::default()
    };
    let own = logits(&checkpoint(tmp.path(), "untied", &untied, |_| {}));
    let tied = logits(&checkpoint(tmp.path(), "tied", &untied, |c| {
        c["tie_word_embeddings"] = json!(true)
    }));
    assert!(max_abs_diff(&own, &tied) > 1e-3);
    // Untied without an lm_head tensor is an error, not a silent tie.
    let dir = checkpoint(tmp.path(), "no_head", &TinySpec::default(), |c| {
        c["tie_word_embeddings"] = json!(false)
    });
    let e = load(&dir).err().expect("loaded without lm_head");
    assert!(e.to_string().contains("lm_head.weight"), "{e}");
}

#[test]
fn sliding_window_caps_the_context_and_mistral_defaults_follow_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let mistral = TinySpec {
        arch: "MistralForCausalLM",
        max_pos: 100_000,
        ..TinySpec::default()
    };
    let ctx = |edit: &dyn Fn(&mut Value)| {
        let dir = checkpoint(tmp.path(), "m", &mistral, edit);
        let c = load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        c.config().max_context()
    };
    assert_eq!(ctx(&|c| c["sliding_window"] = json!(null)), 100_000);
    assert_eq!(ctx(&|c| c["sliding_window"] = json!(48)), 48);
    // Absent: MistralConfig's default window (4096).
    assert_eq!(
        ctx(&|c| {
            c.as_object_mut().unwrap().remove("sliding_window");
        }),
        4096
    );
    // A prompt longer than the window is refused with the number, not attended in full.
    let dir = checkpoint(tmp.path(), "w48", &mistral, |c| {
        c["sliding_window"] = json!(48)
    });
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kvc"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompt"])
        .arg("the cat sat on the mat and then the rat ate it ".repeat(5))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("48"), "{err}");
    // Llama's absent context is transformers' LlamaConfig default.
    let dir = checkpoint(tmp.path(), "llama", &TinySpec::default(), |c| {
        c.as_object_mut().unwrap().remove("max_position_embeddings");
    });
    assert_eq!(load(&dir).unwrap().config().max_context(), 2048);
}

#[test]
fn gguf_rope_scaling_is_applied_or_refused() {
    use candle_core::quantized::gguf_file;
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let plain = tmp.path().join("plain.gguf");
    write_gguf(&plain, &spec, GgmlDType::F32).unwrap();
    // Rewrite the file with extra metadata / tensors.
    let rewrite =
        |name: &str, extra_md: Vec<(&str, gguf_file::Value)>, rope_freqs: Option<Vec<f32>>| {
            let mut f = std::fs::File::open(&plain).unwrap();
            let content = gguf_file::Content::read(&mut f).unwrap();
            let mut md: Vec<(String, gguf_file::Value)> = content
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            md.extend(extra_md.into_iter().map(|(k, v)| (k.to_string(), v)));
            let mut tensors = Vec::new();
            for n in content.tensor_infos.keys() {
                tensors.push((n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()));
            }
            if let Some(f) = rope_freqs {
                let t = candle_core::Tensor::new(f, &Device::Cpu).unwrap();
                tensors.push((
                    "rope_freqs.weight".into(),
                    candle_core::quantized::QTensor::quantize(&t, GgmlDType::F32).unwrap(),
                ));
            }
            let path = tmp.path().join(name);
            let md_refs: Vec<(&str, &gguf_file::Value)> =
                md.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
                tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
            gguf_file::write(
                &mut std::fs::File::create(&path).unwrap(),
                &md_refs,
                &t_refs,
            )
            .unwrap();
            path
        };
    let load_gguf = |p: &Path| {
        kvc::model::load(
            &resolved(ModelSource::Gguf(p.into())),
            &Device::Cpu,
            DType::F32,
        )
    };
    let linear_md = || {
        vec![
            (
                "llama.rope.scaling.type",
                gguf_file::Value::String("linear".into()),
            ),
            ("llama.rope.scaling.factor", gguf_file::Value::F32(4.0)),
        ]
    };
    let linear = rewrite("linear.gguf", linear_md(), None);
    let lm = load_gguf(&linear).unwrap();
    assert_eq!(
        lm.config().rope.scaling,
        Some(kvc::model::rope::RopeScaling::Linear { factor: 4.0 })
    );
    let yarn = rewrite(
        "yarn.gguf",
        vec![(
            "llama.rope.scaling.type",
            gguf_file::Value::String("yarn".into()),
        )],
        None,
    );
    let e = load_gguf(&yarn).err().expect("yarn loaded");
    assert!(e.to_string().contains("yarn"), "{e}");
    // rope_freqs.weight (Llama-3.1's scaling in a GGUF): one factor per frequency, and not
    // beside rope.scaling.type.
    let short = rewrite("short.gguf", vec![], Some(vec![2.0; 3]));
    let e = load_gguf(&short).err().expect("3 rope_freqs loaded");
    assert!(e.to_string().contains("rope_freqs"), "{e}");
    let both = rewrite(
        "both.gguf",
        linear_md(),
        Some(vec![2.0; spec.head_dim() / 2]),
    );
    let e = load_gguf(&both).err().expect("two scalings loaded");
    assert!(e.to_string().contains("rope_freqs"), "{e}");
}

/// A Llama-3.1 GGUF carries the llama3 scaling as llama.cpp's per-frequency factors
/// (`rope_freqs.weight`, written by llama.cpp's formula): it must give the logits of the
/// safetensors checkpoint whose config.json names the scaling, and differ from plain RoPE.
#[test]
fn gguf_rope_freqs_give_the_llama3_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let llama3 = TinySpec {
        llama3_rope: true,
        ..Default::default()
    };
    let gguf_logits = |name: &str, spec: &TinySpec| {
        let p = tmp.path().join(name);
        write_gguf(&p, spec, GgmlDType::F32).unwrap();
        let mut lm =
            kvc::model::load(&resolved(ModelSource::Gguf(p)), &Device::Cpu, DType::F32).unwrap();
        first_logits(&mut lm.model, &lm.tokenizer)
    };
    let hf = logits(&checkpoint(tmp.path(), "hf", &llama3, |_| {}));
    let scaled = gguf_logits("llama3.gguf", &llama3);
    let plain = gguf_logits("plain.gguf", &TinySpec::default());
    let d = max_abs_diff(&scaled, &hf);
    assert!(d < 1e-4, "GGUF rope_freqs vs config llama3: {d}");
    assert!(
        max_abs_diff(&plain, &hf) > 1e-3,
        "the scaling made no difference: the test cannot tell"
    );
}

/// Rewrites `dir`'s checkpoint with every 2-D projection weight (q/k/v/o, gate/up/down) as FP8
/// e4m3 plus its `_scale` (per-row when `per_row`, else one number), and returns the same
/// checkpoint in f32 holding exactly the dequantized weights (the judge).
fn fp8_pair(root: &Path, name: &str, spec: &TinySpec, per_row: bool) -> (PathBuf, PathBuf) {
    let quant = checkpoint(root, &format!("{name}-fp8"), spec, |c| {
        c["quantization_config"] = if per_row {
            json!({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0})
        } else {
            json!({"quant_method": "compressed-tensors", "format": "float-quantized",
                   "config_groups": {"group_0": {"targets": ["Linear"],
                   "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}})
        };
    });
    let plain = checkpoint(root, &format!("{name}-f32"), spec, |_| {});
    let p = common::fp8_quantize(&quant.join("model.safetensors"), per_row);
    candle_core::safetensors::save(&p, plain.join("model.safetensors")).unwrap();
    (quant, plain)
}

/// FP8 checkpoints (fbgemm_fp8 with per-row scales; compressed-tensors with one scale per
/// tensor) load dequantized: the same logits, bit for bit, as an f32 checkpoint of the
/// dequantized weights, and not those of the unquantized weights. A weight without its scale
/// and block-wise scales are refused with the tensor's name.
#[test]
fn fp8_weights_load_dequantized() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        scale: 0.4,
        ..Default::default()
    };
    let original = logits(&checkpoint(tmp.path(), "orig", &spec, |_| {}));
    for per_row in [true, false] {
        let (quant, plain) = fp8_pair(tmp.path(), &format!("r{per_row}"), &spec, per_row);
        let got = logits(&quant);
        assert_eq!(got, logits(&plain), "per_row {per_row}");
        assert!(
            max_abs_diff(&got, &original) > 0.0,
            "the FP8 rounding changes the logits"
        );
    }
    // The scale of one weight missing: named.
    let (quant, _) = fp8_pair(tmp.path(), "missing", &spec, true);
    let st = quant.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    w.remove("model.layers.0.mlp.down_proj.weight_scale");
    candle_core::safetensors::save(&w, &st).unwrap();
    let e = load(&quant).err().expect("no scale").to_string();
    assert!(
        e.contains("model.layers.0.mlp.down_proj.weight_scale"),
        "{e}"
    );
    // Block-wise scales `[rows / 2, cols / 2]`: refused, naming the shape.
    let key = "model.layers.0.mlp.down_proj.weight_scale";
    w.insert(
        key.into(),
        candle_core::Tensor::ones((32, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, &st).unwrap();
    let e = load(&quant).err().expect("block-wise").to_string();
    assert!(e.contains("block-wise") && e.contains("down_proj"), "{e}");
}

/// First-step logits of [`logits`]'s prompt with `dir`'s FP8 projections kept in e4m3
/// (`fp8_matmul`; on the CPU they run the FP8 linear twin, the GPU kernels' oracle).
fn fp8_logits(dir: &Path, fp8_matmul: bool) -> (Vec<f32>, kvc::model::llama::Fp8Weights) {
    let cfg = kvc::model::config::load_hf_config(dir).unwrap();
    let mut src = kvc::model::weights::WeightSource::safetensors_dir(dir).unwrap();
    let mut model = kvc::model::llama::Llama::load_shard(
        &cfg,
        &mut src,
        DType::F32,
        &Device::Cpu,
        None,
        fp8_matmul,
    )
    .unwrap();
    let tok = kvc::model::tokenizer::Tokenizer::from_dir(dir).unwrap();
    (first_logits(&mut model, &tok), model.fp8)
}

/// FP8 matmuls (weights kept in e4m3, q/k/v and gate/up merged with their own scales, the
/// activations quantized per token): logits close to the dequantized checkpoint's, not equal
/// to them; `--fp8 matmul` where it cannot run names the fix.
#[test]
fn fp8_matmuls_track_the_dequantized_weights() {
    use kvc::model::llama::Fp8Weights;
    use kvc::model::Fp8Mode;
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        scale: 0.4,
        ..Default::default()
    };
    for per_row in [true, false] {
        let (quant, _) = fp8_pair(tmp.path(), &format!("m{per_row}"), &spec, per_row);
        let (deq, how) = fp8_logits(&quant, false);
        assert_eq!(how, Fp8Weights::Dequantized);
        let (got, how) = fp8_logits(&quant, true);
        assert_eq!(how, Fp8Weights::Matmul);
        assert!(
            max_abs_diff(&got, &deq) > 0.0,
            "per_row {per_row}: the activations are quantized"
        );
        // The tiny random model amplifies e4m3's rounding of its activations (cosine ~0.98
        // here; 1 - 1e-6 with the activations left unquantized, which checks the merges and
        // scales); a scale on the wrong rows lands far lower.
        let dot: f32 = got.iter().zip(&deq).map(|(a, b)| a * b).sum();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let cos = dot / norm(&got) / norm(&deq);
        assert!(cos > 0.95, "per_row {per_row}: cosine {cos}");
    }
    let e = Fp8Mode::Matmul
        .matmul(DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--fp8 dequantize"), "{e}");
    assert!(!Fp8Mode::Auto.matmul(DType::BF16, &Device::Cpu).unwrap());
}
