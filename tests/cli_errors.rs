//! Bad input never panics: each case gives one clear error line naming the file or the fix,
//! and exit code 2.
use kvc::model::tiny::{write_gguf, write_hf_dir, TinySpec};
use std::path::Path;
use std::process::Command;

fn kvc(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvc"));
    c.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("KVC_MODEL");
    for (k, v) in envs {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Exit 2, no panic, a single `error:` line that contains every `needle`.
fn assert_clean_error(args: &[&str], envs: &[(&str, &str)], needles: &[&str]) {
    let (code, _out, err) = kvc(args, envs);
    assert_eq!(code, 2, "args {args:?}: exit {code}, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn generate(model: &Path) -> Vec<String> {
    vec![
        "generate".into(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        "hello".into(),
        "--max-new-tokens".into(),
        "2".into(),
    ]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn missing_gguf_file() {
    assert_clean_error(
        &["generate", "-m", "/nonexistent/x.gguf", "-p", "hi"],
        &[],
        &["/nonexistent/x.gguf"],
    );
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.gguf");
    write_gguf(
        &p,
        &TinySpec::default(),
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    let bytes = std::fs::read(&p).unwrap();
    for cut in [100, bytes.len() / 2, bytes.len() - 10] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_clean_error(&args(&generate(&p)), &[], &["t.gguf"]);
    }
}

#[test]
fn not_a_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("junk.gguf");
    std::fs::write(&p, b"this is not a gguf file at all").unwrap();
    assert_clean_error(&args(&generate(&p)), &[], &["junk.gguf"]);
}

#[test]
fn unknown_quantization_type() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("q.gguf");
    write_gguf(
        &p,
        &TinySpec::default(),
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    // Tensor info: name, n_dims (u32), dims (u64 x n), ggml type (u32), offset (u64).
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let ty = at + 4 + 8 * 2;
    bytes[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    assert_clean_error(&args(&generate(&p)), &[], &["q.gguf"]);
}

#[test]
fn corrupt_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 3]).unwrap();
    assert_clean_error(&args(&generate(tmp.path())), &[], &["model.safetensors"]);
}

#[test]
fn wrong_tensor_shape() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    assert_clean_error(
        &args(&generate(tmp.path())),
        &[],
        &["shape", "mlp.gate_proj"],
    );
}

#[test]
fn unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    assert_clean_error(
        &args(&generate(tmp.path())),
        &[],
        &["GPTNeoXForCausalLM", "config.json"],
    );
}

#[test]
fn missing_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    assert_clean_error(&args(&generate(tmp.path())), &[], &["tokenizer.json"]);
}

#[test]
fn hub_model_missing_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().display().to_string();
    assert_clean_error(
        &[
            "generate",
            "-m",
            "meta-llama/Llama-3.1-8B-Instruct",
            "-p",
            "hi",
        ],
        &[("HF_HUB_CACHE", &cache)],
        &["HF_HUB_OFFLINE=1", "config.json"],
    );
}

#[test]
fn prompt_longer_than_context() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(
        tmp.path(),
        &TinySpec {
            max_pos: 16,
            ..Default::default()
        },
        1,
    )
    .unwrap();
    let long = "word ".repeat(40);
    assert_clean_error(
        &[
            "generate",
            "-m",
            &tmp.path().display().to_string(),
            "-p",
            &long,
        ],
        &[],
        &["prompt has", "context"],
    );
}

#[test]
fn cuda_without_feature_names_the_fix() {
    if cfg!(feature = "cuda") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let mut a = generate(tmp.path());
    a.extend(["--device".into(), "cuda:0".into()]);
    assert_clean_error(&args(&a), &[], &["--features cuda"]);
}

#[test]
fn generate_json_has_the_documented_fields() {
    let tmp = tempfile::tempdir().unwrap();
    write_hf_dir(tmp.path(), &TinySpec::default(), 1).unwrap();
    let mut a = generate(tmp.path());
    a.push("--json".into());
    let (code, out, err) = kvc(&args(&a), &[]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "prompt_ids",
        "output_ids",
        "output_text",
        "prefill_ms",
        "decode_ms",
        "decode_tokens_per_s",
    ] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 2);
}
