//! `kvc score`, `kvc plot`, `kvc compare` end to end on small hand-made prediction files whose
//! scores are obvious by hand (exact answers score 100, a wrong one 0, ...).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn kvc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvc"))
        .args(args)
        .output()
        .expect("run kvc")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// hotpotqa: 2 samples, one exact (1.0), one wrong (0.0) -> 50.0.
const HOTPOT: &str = r#"{"pred": "Paris", "answers": ["Paris"], "all_classes": null, "length": 100}
{"pred": "Berlin", "answers": ["Rome"], "all_classes": null, "length": 100}
"#;
/// trec: first line "Location" right; 2nd sample wrong -> 50.0. Last line's classes are used.
const TREC: &str = r#"{"pred": "\nLocation\nDate", "answers": ["Location"], "all_classes": ["Location", "Date"], "length": 10}
{"pred": "Date", "answers": ["Location"], "all_classes": ["Location", "Date"], "length": 10}
"#;

#[test]
fn scores_a_longbench_pred_dir() {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("hotpotqa.jsonl"), HOTPOT);
    write(&d.path().join("trec.jsonl"), TREC);
    write(&d.path().join("notes.txt"), "ignored");
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("result.json")).unwrap())
            .unwrap();
    assert_eq!(r["hotpotqa"], 50.0);
    assert_eq!(r["trec"], 50.0);
    assert_eq!(r.as_object().unwrap().len(), 2);
}

#[test]
fn longbench_e_buckets_and_nan() {
    let d = tempfile::tempdir().unwrap();
    // Base name + --e, as pred.py --e writes. 0-4k: 1 right of 1; 4-8k: 0 of 1; 8k+: empty -> NaN.
    write(
        &d.path().join("hotpotqa.jsonl"),
        "{\"pred\": \"a b\", \"answers\": [\"a b\"], \"all_classes\": null, \"length\": 3999}\n\
         {\"pred\": \"x\", \"answers\": [\"y\"], \"all_classes\": null, \"length\": 4000}\n",
    );
    let o = kvc(&["score", "--e", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = std::fs::read_to_string(d.path().join("result.json")).unwrap();
    assert!(text.contains("\"hotpotqa_e\": {"), "{text}");
    assert!(text.contains("\"0-4k\": 100.0"), "{text}");
    assert!(text.contains("\"4-8k\": 0.0"), "{text}");
    assert!(text.contains("\"8k+\": NaN"), "{text}");
}

#[test]
fn malformed_lines_stop_or_skip_never_silent() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("hotpotqa.jsonl");
    write(&f, &format!("{HOTPOT}{{\"pred\": \"x\"\n"));
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("hotpotqa.jsonl:3"), "{}", stderr(&o));
    assert!(!d.path().join("result.json").exists());

    let o = kvc(&["score", "--on-error", "skip", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("hotpotqa.jsonl:3"), "{}", stderr(&o));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("result.json")).unwrap())
            .unwrap();
    assert_eq!(r["hotpotqa"], 50.0);
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("hotpot.jsonl"), HOTPOT);
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("hotpotqa") && stderr(&o).contains("valid names"),
        "{}",
        stderr(&o)
    );

    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("qasper.jsonl"), "");
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("no prediction records"),
        "{}",
        stderr(&o)
    );

    let o = kvc(&["score", "/nonexistent/dir"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn failed_samples_exit_1() {
    let d = tempfile::tempdir().unwrap();
    write(
        &d.path().join("hotpotqa.jsonl"),
        "{\"pred\": \"\", \"answers\": [\"a\"], \"all_classes\": null, \"length\": 5, \"error\": \"out of memory\"}\n",
    );
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
}

fn make_tree(root: &Path, with_full: bool) {
    let run = |method: &str, budget: &str, hotpot: &str, trec: &str, meta: Option<&str>| {
        let dir = root.join("tiny-llama.Q4_1").join(method).join(budget);
        write(&dir.join("preds/hotpotqa.jsonl"), hotpot);
        write(&dir.join("preds/trec.jsonl"), trec);
        if let Some(m) = meta {
            write(&dir.join("run.json"), m);
        }
    };
    // full: hotpotqa 100, trec 50.
    let all_right = "{\"pred\": \"Paris\", \"answers\": [\"Paris\"], \"all_classes\": null, \"length\": 100, \"cache_tokens\": 900}\n\
                     {\"pred\": \"Rome\", \"answers\": [\"Rome\"], \"all_classes\": null, \"length\": 100, \"cache_tokens\": 1100}\n";
    if with_full {
        run("full", "rate1", all_right, TREC, None);
    }
    // kvcompress rate8: hotpotqa 50 (50 % of full), trec 50 (100 % of full).
    let hot8 = HOTPOT.replace(
        "\"length\": 100}",
        "\"length\": 100, \"cache_tokens\": 128}",
    );
    run(
        "kvcompress",
        "rate8",
        &hot8,
        TREC,
        Some(r#"{"model": "tiny-llama.Q4_1", "method": "kvcompress", "rate": 8}"#),
    );
    run("snapkv", "tokens128", &hot8, TREC, None);
}

#[test]
fn scores_a_results_tree_with_percent_of_full() {
    let d = tempfile::tempdir().unwrap();
    make_tree(d.path(), true);
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    for run in ["full/rate1", "kvcompress/rate8", "snapkv/tokens128"] {
        assert!(
            d.path()
                .join("tiny-llama.Q4_1")
                .join(run)
                .join("result.json")
                .exists(),
            "{run}"
        );
    }
    let mut rdr = csv::Reader::from_path(d.path().join("scores.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    let h = rdr.headers().unwrap().clone();
    let col = |r: &csv::StringRecord, name: &str| {
        r[h.iter().position(|x| x == name).unwrap()].to_string()
    };
    assert_eq!(rows.len(), 6);
    let find = |method: &str, task: &str| {
        rows.iter()
            .find(|r| col(r, "method") == method && col(r, "task") == task)
            .unwrap()
            .clone()
    };
    let r = find("kvcompress", "hotpotqa");
    assert_eq!(col(&r, "score"), "50.0");
    assert_eq!(col(&r, "full_score"), "100.0");
    assert_eq!(col(&r, "percent_of_full"), "50.0");
    assert_eq!(col(&r, "rate"), "8.0");
    assert_eq!(col(&r, "compression_ratio"), "0.875");
    assert_eq!(col(&r, "category"), "Multi-Doc QA");
    assert_eq!(col(&r, "cache_tokens"), "128.0");
    let r = find("snapkv", "trec");
    assert_eq!(col(&r, "budget"), "tokens128");
    assert_eq!(col(&r, "budget_tokens"), "128");
    assert_eq!(col(&r, "rate"), "");
    assert_eq!(col(&r, "percent_of_full"), "100.0");

    let mut rdr = csv::Reader::from_path(d.path().join("summary.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    let col = |r: &csv::StringRecord, name: &str| {
        r[h.iter().position(|x| x == name).unwrap()].to_string()
    };
    let all = rows
        .iter()
        .find(|r| col(r, "method") == "kvcompress" && col(r, "category") == "all")
        .unwrap();
    // Mean score over the full cache's mean score: (50 + 50) / (100 + 50), not the mean of
    // 50 % and 100 %.
    let pct: f64 = col(all, "percent_of_full").parse().unwrap();
    assert!((pct - 100.0 * 100.0 / 150.0).abs() < 1e-9, "{pct}");
    assert_eq!(col(all, "n_tasks"), "2");
    // Both rate notations, the samples and the paired-bootstrap interval around the estimate.
    assert_eq!(col(all, "rate"), "8.0");
    assert_eq!(col(all, "compression_ratio"), "0.875");
    assert_eq!(col(all, "n"), "4");
    let lo: f64 = col(all, "percent_of_full_ci_low").parse().unwrap();
    let hi: f64 = col(all, "percent_of_full_ci_high").parse().unwrap();
    assert!(lo <= pct && pct <= hi && lo < hi, "{lo} {pct} {hi}");
    let few = rows
        .iter()
        .find(|r| col(r, "method") == "kvcompress" && col(r, "category") == "Few-shot Learning")
        .unwrap();
    assert_eq!(col(few, "percent_of_full"), "100.0");
}

#[test]
fn missing_full_cache_is_named() {
    let d = tempfile::tempdir().unwrap();
    make_tree(d.path(), false);
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("tiny-llama.Q4_1/hotpotqa"),
        "{}",
        stderr(&o)
    );
    let o = kvc(&["score", "--require-full", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("tiny-llama.Q4_1/trec"),
        "{}",
        stderr(&o)
    );
    // plot needs percent of full: a clear error.
    let o = kvc(&["plot", d.path().join("scores.csv").to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("percent of full cache is missing"),
        "{}",
        stderr(&o)
    );
}

fn png_size(p: &Path) -> (u32, u32) {
    let b = std::fs::read(p).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
    (
        u32::from_be_bytes(b[16..20].try_into().unwrap()),
        u32::from_be_bytes(b[20..24].try_into().unwrap()),
    )
}

#[test]
fn plots_png_and_svg() {
    let d = tempfile::tempdir().unwrap();
    make_tree(d.path(), true);
    assert_eq!(code(&kvc(&["score", "-q", d.path().to_str().unwrap()])), 0);
    let out = d.path().join("plots");
    let o = kvc(&[
        "plot",
        d.path().join("scores.csv").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let files: Vec<PathBuf> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    for stem in [
        "tiny-llama.Q4_1__categories_by_rate",
        "tiny-llama.Q4_1__categories_by_cache",
        "tiny-llama.Q4_1__kvcompress__subtasks_by_rate",
    ] {
        let png = out.join(format!("{stem}.png"));
        let svg = out.join(format!("{stem}.svg"));
        assert!(
            files.contains(&png) && files.contains(&svg),
            "{stem}: {files:?}"
        );
        let (w, h) = png_size(&png);
        assert!(w >= 800 && h >= 400, "{w}x{h}");
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(
            s.contains("tiny-llama.Q4_1") && s.contains("% of full-cache score"),
            "svg text"
        );
        // Samples per run in the panel titles or the legend.
        assert!(s.contains("(n=2)"), "{stem}: no n");
    }
}

#[test]
fn a_subset_with_full_cache_score_0_counts_in_category_means_only() {
    let d = tempfile::tempdir().unwrap();
    make_tree(d.path(), true);
    // The full cache gets every hotpotqa answer wrong: its own percentages do not exist.
    let wrong =
        "{\"pred\": \"Lyon\", \"answers\": [\"Paris\"], \"all_classes\": null, \"length\": 100}\n";
    write(
        &d.path()
            .join("tiny-llama.Q4_1/full/rate1/preds/hotpotqa.jsonl"),
        wrong,
    );
    assert_eq!(code(&kvc(&["score", "-q", d.path().to_str().unwrap()])), 0);
    // summary.csv: `all` is (50 + 50) / (0 + 50) of the full cache; Multi-Doc QA (full mean 0)
    // has none.
    let summary = std::fs::read_to_string(d.path().join("summary.csv")).unwrap();
    let cell = |cat: &str| {
        let mut rdr = csv::Reader::from_reader(summary.as_bytes());
        let h = rdr.headers().unwrap().clone();
        let i = h.iter().position(|x| x == "percent_of_full").unwrap();
        let c = h.iter().position(|x| x == "category").unwrap();
        let m = h.iter().position(|x| x == "method").unwrap();
        rdr.records()
            .map(|r| r.unwrap())
            .find(|r| &r[m] == "kvcompress" && &r[c] == cat)
            .map(|r| r[i].to_string())
            .unwrap()
    };
    assert_eq!(cell("all"), "200.0");
    assert_eq!(cell("Multi-Doc QA"), "");
    let out = d.path().join("plots");
    let o = kvc(&[
        "plot",
        d.path().join("scores.csv").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let svg = std::fs::read_to_string(out.join("tiny-llama.Q4_1__categories_by_rate.svg")).unwrap();
    assert!(svg.contains("2 subsets"), "both subsets count");
    assert!(
        svg.contains("1 with full-cache score 0: in category means only"),
        "the subset without a percentage is named"
    );
    let svg =
        std::fs::read_to_string(out.join("tiny-llama.Q4_1__kvcompress__subtasks_by_rate.svg"))
            .unwrap();
    assert!(
        svg.contains("trec (n=2)") && !svg.contains("hotpotqa"),
        "no line without a percentage"
    );
}

#[test]
fn compare_gates_on_drops() {
    let d = tempfile::tempdir().unwrap();
    make_tree(d.path(), true);
    assert_eq!(code(&kvc(&["score", "-q", d.path().to_str().unwrap()])), 0);
    let base = d.path().join("base.csv");
    std::fs::copy(d.path().join("scores.csv"), &base).unwrap();
    // Same file: ok.
    let o = kvc(&[
        "compare",
        "--baseline",
        base.to_str().unwrap(),
        "--current",
        base.to_str().unwrap(),
        "--tolerance",
        "0",
    ]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    // Make kvcompress/rate8 hotpotqa drop from 50 to 0: both preds wrong.
    let hot = d
        .path()
        .join("tiny-llama.Q4_1/kvcompress/rate8/preds/hotpotqa.jsonl");
    std::fs::write(
        &hot,
        HOTPOT.replace("\"pred\": \"Paris\"", "\"pred\": \"Lyon\""),
    )
    .unwrap();
    assert_eq!(code(&kvc(&["score", "-q", d.path().to_str().unwrap()])), 0);
    let cur = d.path().join("scores.csv");
    let o = kvc(&[
        "compare",
        "--baseline",
        base.to_str().unwrap(),
        "--current",
        cur.to_str().unwrap(),
        "--tolerance",
        "1",
    ]);
    assert_eq!(code(&o), 1);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.contains("kvcompress rate8 hotpotqa")
            && table.contains("DROP")
            && table.contains("-50.00"),
        "{table}"
    );
    // The category mean (Multi-Doc QA) dropped too.
    assert!(
        table
            .lines()
            .any(|l| l.contains("Multi-Doc QA") && l.contains("DROP")),
        "{table}"
    );
    let o = kvc(&[
        "compare",
        "--baseline",
        base.to_str().unwrap(),
        "--current",
        cur.to_str().unwrap(),
        "--tolerance",
        "60",
    ]);
    assert_eq!(code(&o), 0);
    let o = kvc(&[
        "compare",
        "--baseline",
        "/nonexistent.csv",
        "--current",
        cur.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2);
}

#[test]
fn longbench_e_tree_rows_per_bucket() {
    let d = tempfile::tempdir().unwrap();
    // Full: 0-4k has 2 samples (both right), 4-8k 1 (wrong), 8k+ none.
    // (Not "a"/"b": qa F1 drops the article "a", so it would score 0.)
    let full = "{\"pred\": \"cat\", \"answers\": [\"cat\"], \"length\": 10}\n\
                {\"pred\": \"dog\", \"answers\": [\"dog\"], \"length\": 3999}\n\
                {\"pred\": \"x\", \"answers\": [\"y\"], \"length\": 4000}\n";
    // rate4: one of the two 0-4k samples right -> 50 % of full in 0-4k.
    let half = full.replacen("\"pred\": \"cat\"", "\"pred\": \"cow\"", 1);
    write(&d.path().join("m/full/rate1/preds/hotpotqa_e.jsonl"), full);
    write(&d.path().join("m/kv/rate4/preds/hotpotqa_e.jsonl"), &half);
    let o = kvc(&["score", d.path().to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut rdr = csv::Reader::from_path(d.path().join("scores.csv")).unwrap();
    let h = rdr.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    let col = |r: &csv::StringRecord, name: &str| {
        r[h.iter().position(|x| x == name).unwrap()].to_string()
    };
    assert_eq!(rows.len(), 6);
    let kv: Vec<_> = rows.iter().filter(|r| col(r, "method") == "kv").collect();
    let b: Vec<(String, String, String, String)> = kv
        .iter()
        .map(|r| {
            (
                col(r, "bucket"),
                col(r, "n"),
                col(r, "score"),
                col(r, "percent_of_full"),
            )
        })
        .collect();
    assert_eq!(
        b[0],
        ("0-4k".into(), "2".into(), "50.0".into(), "50.0".into())
    );
    assert_eq!(b[1], ("4-8k".into(), "1".into(), "0.0".into(), "".into())); // full is 0: no percentage
    assert_eq!(
        (b[2].0.as_str(), b[2].1.as_str(), b[2].2.as_str()),
        ("8k+", "0", "NaN")
    );
}
