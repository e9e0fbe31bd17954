//! Loader paths, dtypes and architecture variants on tiny random-weight checkpoints written by
//! the test itself (`kvc::model::tiny`). The judges: a safetensors checkpoint and a GGUF of the
//! same weights must give the same logits (this checks the GGUF name map, the Q/K un-permutation
//! and the metadata -> config path); quantized GGUFs must stay close to F32.
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use kvc::engine::{self, GenParams, NoHooks};
use kvc::hub::{ModelSource, ResolvedModel};
use kvc::kvcache::contiguous::ContiguousCache;
use kvc::model::tiny::{write_gguf, write_hf_dir, TinySpec};
use std::path::Path;

fn resolved(src: ModelSource) -> ResolvedModel {
    ResolvedModel {
        source: src,
        name: "tiny".into(),
        hub_id: None,
        revision: None,
    }
}

/// Greedy output ids and first-step logits for a fixed prompt.
fn run(src: ModelSource, dtype: DType, chat: bool) -> (Vec<u32>, Vec<f32>) {
    let mut lm = kvc::model::load(&resolved(src), &Device::Cpu, dtype).unwrap();
    let ids = lm
        .prompt_ids("the cat sat on the mat and then the rat ate it", chat)
        .unwrap();
    let params = GenParams {
        max_new_tokens: 12,
        stop_ids: Default::default(), // run the full length
        min_new_tokens: 0,
        prefill_chunk: 5, // several chunks: exercises chunked prefill too
        max_context: lm.config().max_position_embeddings,
    };
    let mut cache = ContiguousCache::new(lm.config().num_hidden_layers);
    let g = engine::generate(&mut lm.model, &mut cache, &ids, &params, &mut NoHooks).unwrap();
    (g.output_ids, g.first_logits.unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn hf_and_gguf(spec: &TinySpec, q: GgmlDType, dir: &Path) -> (ModelSource, ModelSource) {
    write_hf_dir(&dir.join("hf"), spec, 1).unwrap();
    write_gguf(&dir.join("m.gguf"), spec, q).unwrap();
    (
        ModelSource::HfDir(dir.join("hf")),
        ModelSource::Gguf(dir.join("m.gguf")),
    )
}

#[test]
fn gguf_f32_equals_safetensors_tied_and_untied() {
    for tie in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = TinySpec {
            tie_embeddings: tie,
            ..Default::default()
        };
        let (hf, gg) = hf_and_gguf(&spec, GgmlDType::F32, tmp.path());
        let (out_hf, l_hf) = run(hf, DType::F32, true);
        let (out_gg, l_gg) = run(gg, DType::F32, true);
        assert!(
            max_abs_diff(&l_hf, &l_gg) < 1e-4,
            "tie={tie}: logits differ by {}",
            max_abs_diff(&l_hf, &l_gg)
        );
        assert_eq!(out_hf, out_gg, "tie={tie}");
    }
}

#[test]
fn chunking_does_not_change_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let mut lm = kvc::model::load(
        &resolved(ModelSource::HfDir(tmp.path().into())),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let ids = lm
        .prompt_ids("a b c d e f g h i j k l m n o p q r s t u v w x y z", false)
        .unwrap();
    let mut outs = vec![];
    for chunk in [1, 3, 1000] {
        let params = GenParams {
            max_new_tokens: 6,
            stop_ids: Default::default(),
            min_new_tokens: 0,
            prefill_chunk: chunk,
            max_context: 2048,
        };
        let mut cache = ContiguousCache::new(2);
        outs.push(
            engine::generate(&mut lm.model, &mut cache, &ids, &params, &mut NoHooks).unwrap(),
        );
    }
    for g in &outs[1..] {
        assert_eq!(g.output_ids, outs[0].output_ids);
        assert!(
            max_abs_diff(
                g.first_logits.as_ref().unwrap(),
                outs[0].first_logits.as_ref().unwrap()
            ) < 1e-4
        );
    }
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    write_hf_dir(&tmp.path().join("one"), &spec, 1).unwrap();
    write_hf_dir(&tmp.path().join("three"), &spec, 3).unwrap();
    assert!(tmp
        .path()
        .join("three/model.safetensors.index.json")
        .exists());
    let a = run(
        ModelSource::HfDir(tmp.path().join("one")),
        DType::F32,
        false,
    );
    let b = run(
        ModelSource::HfDir(tmp.path().join("three")),
        DType::F32,
        false,
    );
    assert_eq!(a, b);
}

#[test]
fn quantized_gguf_types_decode_exactly() {
    // Judge: a safetensors checkpoint whose weights went through candle's quantize ->
    // dequantize for the same type. Quantization blocks run along rows, so llama.cpp's row
    // permutation of Q/K commutes with it and the GGUF must decode to the very same model.
    // K-quants need rows that are multiples of 256.
    let spec = TinySpec {
        hidden: 256,
        intermediate: 512,
        heads: 4,
        kv_heads: 2,
        tie_embeddings: false,
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let (_, plain) = run_hf(&tmp.path().join("plain"), &spec);
    for q in [
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::Q4K,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ] {
        let p = tmp.path().join(format!("{q:?}.gguf"));
        write_gguf(&p, &spec, q).unwrap();
        let (out_g, l_g) = run(ModelSource::Gguf(p), DType::F32, false);
        let (out_h, l_h) = run_hf(
            &tmp.path().join(format!("{q:?}")),
            &TinySpec {
                quant_roundtrip: Some(q),
                ..spec.clone()
            },
        );
        assert!(
            max_abs_diff(&l_g, &l_h) < 1e-4,
            "{q:?}: GGUF logits differ from the dequantized checkpoint by {}",
            max_abs_diff(&l_g, &l_h)
        );
        assert_eq!(out_g, out_h, "{q:?}");
        if q != GgmlDType::F16 {
            assert!(
                max_abs_diff(&l_g, &plain) > 1e-4,
                "{q:?}: no quantization error at all — was it really quantized?"
            );
        }
    }
}

fn run_hf(dir: &Path, spec: &TinySpec) -> (Vec<u32>, Vec<f32>) {
    write_hf_dir(dir, spec, 1).unwrap();
    run(ModelSource::HfDir(dir.into()), DType::F32, false)
}

#[test]
fn half_precision_dtypes_track_f32() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let (_, l32) = run(ModelSource::HfDir(tmp.path().into()), DType::F32, true);
    let scale = l32.iter().map(|x| x.abs()).fold(0.0, f32::max);
    for (dt, tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
        let (out, l) = run(ModelSource::HfDir(tmp.path().into()), dt, true);
        assert_eq!(out.len(), 12);
        let d = max_abs_diff(&l, &l32) / scale;
        assert!(d < tol, "{dt:?}: relative logit error {d}");
    }
}

#[test]
fn architecture_variants_run() {
    // Mistral, Llama-3.1 rope scaling (its rope differs from plain llama beyond the original
    // context: logits must differ from the unscaled model), MHA (kv = heads).
    let tmp = tempfile::tempdir().unwrap();
    let base = TinySpec::default();
    write_hf_dir(&tmp.path().join("llama"), &base, 1).unwrap();
    write_hf_dir(
        &tmp.path().join("l3"),
        &TinySpec {
            llama3_rope: true,
            ..base.clone()
        },
        1,
    )
    .unwrap();
    write_hf_dir(
        &tmp.path().join("mistral"),
        &TinySpec {
            arch: "MistralForCausalLM",
            ..base.clone()
        },
        1,
    )
    .unwrap();
    write_hf_dir(
        &tmp.path().join("mha"),
        &TinySpec {
            kv_heads: 4,
            ..base.clone()
        },
        1,
    )
    .unwrap();
    let (_, a) = run(
        ModelSource::HfDir(tmp.path().join("llama")),
        DType::F32,
        false,
    );
    let (_, b) = run(ModelSource::HfDir(tmp.path().join("l3")), DType::F32, false);
    let (_, c) = run(
        ModelSource::HfDir(tmp.path().join("mistral")),
        DType::F32,
        false,
    );
    let (o, _) = run(
        ModelSource::HfDir(tmp.path().join("mha")),
        DType::F32,
        false,
    );
    assert!(
        max_abs_diff(&a, &b) > 1e-4,
        "llama3 rope scaling had no effect"
    );
    assert!(
        max_abs_diff(&a, &c) < 1e-6,
        "mistral layers equal llama layers for the same weights"
    );
    assert_eq!(o.len(), 12);
}

#[test]
fn stop_set_and_chat_template_from_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let lm = kvc::model::load(
        &resolved(ModelSource::HfDir(tmp.path().into())),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    // generation_config eos [2, 0] ∪ config eos 2 ∪ <|im_end|> (2).
    assert_eq!(lm.stop_ids.iter().copied().collect::<Vec<_>>(), vec![0, 2]);
    let ids = lm.prompt_ids("hi", true).unwrap();
    assert_eq!(ids[0], 1, "chat prompt starts with <|im_start|>");
    let text = lm.tokenizer.decode(&ids, false).unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
}
