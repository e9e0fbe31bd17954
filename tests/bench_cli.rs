//! `kvc bench` end to end on the CPU with a tiny random model: the CSV (vLLM-compatible column
//! names), run.json, the four plots and `--json`, both schedules (the reference's compresses at
//! 1x); `--resume` skips measured pairs; bad input
//! (rates below 1, a budget below one sequence, lengths beyond the context) exits 2 with one
//! line naming the fix.
mod common;

use kvc::model::tiny::{write_hf_dir, TinySpec};
use std::path::Path;
use std::process::{Command, Output};

fn kvc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvc"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn one_error_line(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

#[test]
fn bench_writes_csv_plots_json_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_hf_dir(&model, &TinySpec::default(), 1).unwrap();
    let out = tmp.path().join("results");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    // 548-byte blocks (4 tokens x 16 dims x f32, K and V, + metadata); 60000 bytes = 109
    // blocks; a full 48+6-token sequence needs 56: the full cache holds 1 of 4.
    let mut args = common::bench_args(m, o);
    args.extend([
        "--rates",
        "4",
        "--input-lens",
        "32,48",
        "--output-len",
        "6",
        "--num-prompts",
        "4",
        "--kv-memory",
        "60000",
        "--schedule",
        "both",
        "--json",
    ]);
    let r = kvc(&args);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("memory-bound"), "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&r.stdout).unwrap();
    // Per input length: the vanilla baseline, the reference's schedule at 1x and 4x, kvc's at 4x.
    assert_eq!(rows.len(), 8, "rate 1 is added as the baseline");
    let mut methods: Vec<(String, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["rate"].as_f64().unwrap(),
            )
        })
        .collect();
    methods.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    methods.dedup();
    let want = [
        ("full", 1.0),
        ("kvcompress", 4.0),
        ("kvcompress-paper", 1.0),
        ("kvcompress-paper", 4.0),
    ];
    assert_eq!(
        methods,
        want.map(|(m, r)| (m.to_string(), r)).to_vec(),
        "{rows:?}"
    );
    let dir = out.join("bench").join("tiny");
    let csv = std::fs::read_to_string(dir.join("throughput.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    for col in [
        "requests_per_s",
        "tokens_per_s",
        "output_tokens_per_s",
        "elapsed_time",
        "num_requests",
        "total_num_tokens",
        "max_batch",
        "peak_blocks",
        "compress_ms",
        "peak_memory_bytes",
        "memory_source",
        "speedup_vs_full",
    ] {
        assert!(
            header.split(',').any(|c| c == col),
            "{col} missing in {header}"
        );
    }
    assert_eq!(csv.lines().count(), 9);
    for row in &rows {
        assert_eq!(row["num_requests"], 4);
        assert_eq!(row["total_num_tokens"].as_u64().unwrap() % 4, 0);
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["peak_blocks"].as_u64() <= row["total_blocks"].as_u64());
        assert_eq!(row["memory_source"], "kv_pool_peak");
        let sp = row["speedup_vs_full"].as_f64().unwrap();
        if row["method"] == "full" {
            assert_eq!(sp, 1.0);
            assert_eq!(row["rate"], 1.0);
            assert_eq!(row["memory_bound"], true);
            assert!(row["budget_tokens"].is_null());
        } else {
            // Compressed rows evict, 1x under the reference's schedule included (L - 4 here,
            // blocks of 4 tokens).
            assert!(row["evicted_slots"].as_u64().unwrap() > 0, "{row}");
        }
        if row["method"] == "kvcompress-paper" && row["rate"] == 1.0 {
            let l = row["input_len"].as_u64().unwrap();
            assert_eq!(row["budget_tokens"].as_u64(), Some(l - 4), "{row}");
        }
    }
    assert!(dir.join("run.json").is_file());
    for stem in [
        "throughput_vs_rate",
        "throughput_vs_input_len",
        "max_batch_vs_rate",
        "max_batch_vs_input_len",
    ] {
        for ext in ["png", "svg"] {
            let p = dir.join("plots").join(format!("tiny__{stem}.{ext}"));
            assert!(p.is_file(), "{}", p.display());
        }
    }
    // Resume: the eight rows exist; only rate 2 of each schedule is new.
    let mut args = common::bench_args(m, o);
    args.extend([
        "--rates",
        "2,4",
        "--input-lens",
        "32,48",
        "--output-len",
        "6",
        "--num-prompts",
        "4",
        "--kv-memory",
        "60000",
        "--schedule",
        "both",
        "--resume",
    ]);
    let r = kvc(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let csv = std::fs::read_to_string(dir.join("throughput.csv")).unwrap();
    assert_eq!(csv.lines().count(), 13, "{csv}");
    assert!(Path::new(&dir.join("plots")).is_dir());
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_hf_dir(&model, &TinySpec::default(), 1).unwrap();
    let out = tmp.path().join("results");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let run = |extra: &[&str]| {
        let mut a = common::bench_args(m, o);
        a.extend(extra);
        one_error_line(&kvc(&a))
    };
    let e = run(&[
        "--rates",
        "0.5,2",
        "--input-lens",
        "32",
        "--output-len",
        "4",
        "--kv-memory",
        "1MiB",
    ]);
    assert!(e.contains("at least 1"), "{e}");
    let e = run(&[
        "--input-lens",
        "48",
        "--output-len",
        "6",
        "--kv-memory",
        "2000",
    ]);
    assert!(e.contains("too small") && e.contains("minimum is"), "{e}");
    // The minimum it names is enough.
    let min: String = e
        .split("minimum is ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let mut a = common::bench_args(m, o);
    a.extend([
        "--ratios", // kvpress's notation for rates 1 and 8
        "0,0.875",
        "--input-lens",
        "48",
        "--output-len",
        "6",
        "--num-prompts",
        "3",
    ]);
    a.extend(["--kv-memory", &min]);
    let r = kvc(&a);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let e = run(&[
        "--input-lens",
        "2000",
        "--output-len",
        "100",
        "--kv-memory",
        "1GiB",
    ]);
    assert!(e.contains("exceeds the model's context of 2048"), "{e}");
    let e = run(&["--input-lens", "32", "--kv-memory", "1.5"]);
    assert!(e.contains("fraction"), "{e}");
    let e = run(&[
        "--ratios",
        "0.5,1",
        "--input-lens",
        "32",
        "--kv-memory",
        "1MiB",
    ]);
    assert!(e.contains("--ratios") && e.contains("[0, 1)"), "{e}");
}
