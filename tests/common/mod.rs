//! Helpers shared by the integration tests: fixture LongBench rows, a hand-written zip writer,
//! a hub-cache layout, the conformance venv.
#![allow(dead_code)]
use std::io::Write;
use std::path::Path;

/// A LongBench-shaped row (official field order).
pub fn row(id: &str, context: &str, input: &str, answers: &[&str], dataset: &str) -> String {
    serde_json::json!({
        "input": input,
        "context": context,
        "answers": answers,
        "length": context.split_whitespace().count(),
        "dataset": dataset,
        "language": "en",
        "all_classes": null,
        "_id": id,
    })
    .to_string()
}

/// `n` rows of `subset`, ids `<subset>-<i>`, CRLF-terminated like the official files.
pub fn subset_rows(subset: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            let ctx = format!(
                "Passage {i}: the cat sat on the mat and then the rat ate the hat number {i}. {}",
                "there is a tale here. ".repeat(i % 3 + 1)
            );
            row(
                &format!("{subset}-{i}"),
                &ctx,
                &format!("what did the rat eat in passage {i}?"),
                &["the hat"],
                subset,
            ) + "\r\n"
        })
        .collect()
}

/// Write a zip with the given members (deflated when `deflate`), as `zip -r` does.
pub fn write_zip(path: &Path, members: &[(&str, &[u8])], deflate: bool) {
    let mut out: Vec<u8> = Vec::new();
    let mut central: Vec<u8> = Vec::new();
    let u16le = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let u32le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for (name, data) in members {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let body = if deflate {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        } else {
            data.to_vec()
        };
        let method = if deflate { 8 } else { 0 };
        let offset = out.len() as u32;
        u32le(&mut out, 0x0403_4b50);
        u16le(&mut out, 20);
        u16le(&mut out, 0);
        u16le(&mut out, method);
        u16le(&mut out, 0);
        u16le(&mut out, 0x21);
        u32le(&mut out, crc.sum());
        u32le(&mut out, body.len() as u32);
        u32le(&mut out, data.len() as u32);
        u16le(&mut out, name.len() as u16);
        u16le(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&body);
        u32le(&mut central, 0x0201_4b50);
        u16le(&mut central, 20);
        u16le(&mut central, 20);
        u16le(&mut central, 0);
        u16le(&mut central, method);
        u16le(&mut central, 0);
        u16le(&mut central, 0x21);
        u32le(&mut central, crc.sum());
        u32le(&mut central, body.len() as u32);
        u32le(&mut central, data.len() as u32);
        u16le(&mut central, name.len() as u16);
        u16le(&mut central, 0);
        u16le(&mut central, 0);
        u16le(&mut central, 0);
        u16le(&mut central, 0);
        u32le(&mut central, 0);
        u32le(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    u32le(&mut out, 0x0605_4b50);
    u16le(&mut out, 0);
    u16le(&mut out, 0);
    u16le(&mut out, members.len() as u16);
    u16le(&mut out, members.len() as u16);
    u32le(&mut out, central.len() as u32);
    u32le(&mut out, cd_offset);
    u16le(&mut out, 0);
    std::fs::write(path, out).unwrap();
}

/// A hub cache holding `datasets--<repo>/snapshots/<commit>/<file>` with `refs/main`.
pub fn hub_cache_with(root: &Path, repo: &str, commit: &str, file: &str, bytes: &[u8]) {
    let dir = root.join(format!("datasets--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), commit).unwrap();
    let snap = dir.join("snapshots").join(commit);
    let path = snap.join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// The conformance venv's python (`scripts/conformance-venv.sh`), or None when python3 is absent (the only allowed skip).
pub fn venv_python(what: &str) -> Option<std::path::PathBuf> {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("\n!!!!! SKIPPING {what}: python3 not found on PATH !!!!!\n");
        return None;
    }
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/conformance-venv.sh"));
    if let Ok(v) = std::env::var("KVC_CONFORMANCE_VENV") {
        cmd.arg(v);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run conformance-venv.sh");
    assert!(
        out.status.success(),
        "scripts/conformance-venv.sh failed (needs pip access to PyPI)"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(std::path::PathBuf::from(
        text.lines().last().expect("venv python path").trim(),
    ))
}

/// `kvc bench`'s arguments for the tiny test models on the CPU (small blocks, windows and
/// chunks, no progress bar), before each test's rates, lengths and pool.
pub fn bench_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "bench",
        "--model",
        model,
        "--device",
        "cpu",
        "--out",
        out,
        "--block-size",
        "4",
        "--min-cache-tokens",
        "8",
        "--protected-window",
        "4",
        "--kvc-window",
        "4",
        "--prefill-chunk",
        "16",
        "--no-progress",
    ]
}

/// Rewrites the safetensors file `st` with every projection weight (`*_proj.weight`) as FP8
/// e4m3 plus its `<name>_scale` (one per row when `per_row`, else one number), as fbgemm_fp8 /
/// compressed-tensors checkpoints hold them. Returns every tensor of the file with the
/// projections dequantized (the judge's weights: write them as an f32 checkpoint).
pub fn fp8_quantize(
    st: &Path,
    per_row: bool,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    use candle_core::{DType, Device};
    let weights = candle_core::safetensors::load(st, &Device::Cpu).unwrap();
    let (mut q, mut p) = (
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    );
    for (k, w) in weights {
        if !k.contains("_proj.weight") {
            q.insert(k.clone(), w.clone());
            p.insert(k, w);
            continue;
        }
        let amax = w.abs().unwrap();
        let amax = if per_row {
            amax.max_keepdim(1).unwrap()
        } else {
            amax.max_all().unwrap().reshape(1).unwrap()
        };
        let scale = (amax / 448.0).unwrap();
        let by = if per_row {
            vec![w.dim(0).unwrap(), 1]
        } else {
            vec![1, 1]
        };
        let w8 = w
            .broadcast_div(&scale.reshape(by).unwrap())
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let deq = kvc::model::weights::dequantize_fp8(&w8, &scale).unwrap();
        let moved = (&deq - &w).unwrap().abs().unwrap().max_all().unwrap();
        assert!(moved.to_scalar::<f32>().unwrap() > 0.0, "FP8 must round");
        q.insert(format!("{k}_scale"), scale);
        q.insert(k.clone(), w8);
        p.insert(k, deq);
    }
    candle_core::safetensors::save(&q, st).unwrap();
    p
}
