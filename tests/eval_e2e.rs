//! `kvc eval` end to end on the CPU with a tiny random model and fixture subsets: a run killed
//! midway (abort hook and a real Ctrl-C) resumes, and every sample ends up exactly once with a
//! score; a changed configuration is refused unless --overwrite; bad input exits 2 with one
//! clear line.
mod common;

use common::{hub_cache_with, row, subset_rows, write_zip};
use kvc::model::tiny::{write_hf_dir, TinySpec};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
    root: PathBuf,
}

/// A tiny model (directory name `tiny`), hotpotqa (5 rows, chat template) and samsum (3 rows,
/// no chat template, newline stop).
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_hf_dir(&model, &TinySpec::default(), 1).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hotpotqa.jsonl"), subset_rows("hotpotqa", 5)).unwrap();
    std::fs::write(data.join("samsum.jsonl"), subset_rows("samsum", 3)).unwrap();
    Fixture {
        out: tmp.path().join("results"),
        root: tmp.path().to_path_buf(),
        _tmp: tmp,
        model,
        data,
    }
}

impl Fixture {
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let data = self.data.to_str().unwrap().to_string();
        self.args_with_data(&data, extra)
    }

    fn args_with_data(&self, data: &str, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "eval",
            "--model",
            self.model.to_str().unwrap(),
            "--data-dir",
            data,
            "--tasks",
            "hotpotqa,samsum",
            "--methods",
            "full",
            "--max-new-tokens",
            "3",
            "--out",
            self.out.to_str().unwrap(),
            "--no-progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(i) = extra.iter().position(|a| *a == "--tasks") {
            // The caller's --tasks replaces the default one.
            let j = v.iter().position(|a| a == "--tasks").unwrap();
            v[j + 1] = extra[i + 1].to_string();
            v.extend(
                extra
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| *k != i && *k != i + 1)
                    .map(|(_, s)| s.to_string()),
            );
            return v;
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn cmd(&self, extra: &[&str], envs: &[(&str, &str)]) -> Command {
        self.cmd_with(self.args(extra), envs)
    }

    fn cmd_with(&self, args: Vec<String>, envs: &[(&str, &str)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvc"));
        c.args(args)
            .current_dir(&self.root)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("KVC_MODEL")
            .env_remove("KVC_DATA_DIR")
            .env_remove("KVC_EVAL_TEST_ABORT_AFTER")
            .env_remove("KVC_EVAL_TEST_SAMPLE_DELAY_MS");
        for (k, v) in envs {
            c.env(k, v);
        }
        c
    }

    fn run(&self, extra: &[&str], envs: &[(&str, &str)]) -> Output {
        self.cmd(extra, envs).output().unwrap()
    }

    fn run_dir(&self) -> PathBuf {
        self.out.join("tiny/full/rate1")
    }

    fn pred_lines(&self, subset: &str) -> Vec<serde_json::Value> {
        let p = self.run_dir().join(format!("preds/{subset}.jsonl"));
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every selected sample exactly once, and each scored in scores.csv with n equal to the rows.
fn assert_complete(f: &Fixture) {
    for (subset, n) in [("hotpotqa", 5), ("samsum", 3)] {
        let rows = f.pred_lines(subset);
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for r in &rows {
            *count
                .entry(r["_id"].as_str().unwrap().to_string())
                .or_default() += 1;
            assert_eq!(r["method"], "full");
            assert_eq!(r["rate"], 1.0);
            assert_eq!(r["achieved_rate"], 1.0);
            assert!(r["cache_tokens"].as_u64().unwrap() > 0);
            assert!(r.get("error").is_none(), "{r}");
        }
        assert_eq!(count.len(), n, "{subset}: {count:?}");
        assert!(count.values().all(|c| *c == 1), "{subset}: {count:?}");
        // The chat decision follows LongBench (samsum is a continuation task).
        assert!(rows
            .iter()
            .all(|r| r["chat_template"] == (subset == "hotpotqa")));
    }
    let csv = std::fs::read_to_string(f.out.join("scores.csv")).unwrap();
    let mut seen = 0;
    for line in csv.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        if cells[1] == "full" && (cells[5] == "hotpotqa" || cells[5] == "samsum") {
            let n: usize = cells[10].parse().unwrap();
            assert_eq!(n, if cells[5] == "hotpotqa" { 5 } else { 3 }, "{line}");
            seen += 1;
        }
    }
    assert_eq!(seen, 2, "{csv}");
    assert!(f.run_dir().join("result.json").is_file());
    assert!(f.out.join("summary.csv").is_file());
}

#[test]
fn killed_run_resumes_and_every_sample_appears_once() {
    let f = fixture();
    // A kill after 3 rows (abort: no cleanup at all).
    let o = f.run(&[], &[("KVC_EVAL_TEST_ABORT_AFTER", "3")]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(f.pred_lines("hotpotqa").len(), 3, "{}", text(&o));
    // A torn last line, as a kill in the middle of a write leaves.
    let p = f.run_dir().join("preds/hotpotqa.jsonl");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.extend_from_slice(br#"{"pred":"half a li"#);
    std::fs::write(&p, bytes).unwrap();
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.run_dir().join("run.json")).unwrap())
            .unwrap();
    assert_eq!(run_json["method"], "full");
    assert_eq!(run_json["config"]["max_new_tokens"], 3);
    assert!(run_json["config_hash"].as_str().unwrap().len() == 16);

    let o = f.run(&[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("torn last line"), "{err}");
    assert!(err.contains("3 resumed"), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("full/rate1") && out.contains("scores.csv"),
        "{out}"
    );
    assert_complete(&f);

    // A third run has nothing to do and changes nothing.
    let before = std::fs::read(&p).unwrap();
    let o = f.run(&["--json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["runs"][0]["n_new"], 0);
    assert_eq!(v["runs"][0]["n_resumed"], 8);
    assert_eq!(v["model"], "tiny");
    assert!(v["summary"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["category"] == "all"));
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn ctrl_c_finishes_the_sample_in_flight_then_resume_completes() {
    let f = fixture();
    let child = f
        .cmd(&[], &[("KVC_EVAL_TEST_SAMPLE_DELAY_MS", "400")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let preds = f.run_dir().join("preds/hotpotqa.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&preds).map_or(0, |s| s.lines().count()) < 1 {
        assert!(t0.elapsed().as_secs() < 120, "no row after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("interrupted") && err.contains("resume"),
        "{err}"
    );
    let n = f.pred_lines("hotpotqa").len() + f.pred_lines("samsum").len();
    assert!((1..8).contains(&n), "{n} rows");
    let o = f.run(&[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_complete(&f);
}

#[test]
fn changed_configuration_is_refused_unless_overwrite() {
    let f = fixture();
    let o = f.run(&["--limit", "1"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // --limit and --tasks are not part of the configuration: this extends the same run.
    let o = f.run(&["--limit", "2"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(f.pred_lines("hotpotqa").len(), 2);
    let untruncated = f.pred_lines("hotpotqa")[0]["prompt_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(f.pred_lines("hotpotqa")[0]["truncated"], false);
    let o = f.run(&["--limit", "2", "--max-input-tokens", "64"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("max_input_tokens") && err.contains("--overwrite") && !err.contains("panick"),
        "{err}"
    );
    let o = f.run(
        &["--limit", "1", "--max-input-tokens", "64", "--overwrite"],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows = f.pred_lines("hotpotqa");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["truncated"], true);
    // 64 template tokens + the chat template's own (the tiny vocabulary is byte-level).
    let truncated = rows[0]["prompt_tokens"].as_u64().unwrap();
    assert!(truncated < untruncated, "{truncated} vs {untruncated}");
}

#[test]
fn failed_samples_are_rows_with_error_and_exit_1() {
    let f = fixture();
    // A prompt longer than the tiny model's context (2048): recorded, not fatal.
    let long = "word ".repeat(3000);
    let mut body = subset_rows("hotpotqa", 2);
    body.push_str(&(row("hotpotqa-long", &long, "q?", &["a"], "hotpotqa") + "\r\n"));
    std::fs::write(f.data.join("hotpotqa.jsonl"), body).unwrap();
    let o = f.run(
        &["--tasks", "hotpotqa", "--max-input-tokens", "100000"],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let rows = f.pred_lines("hotpotqa");
    assert_eq!(rows.len(), 3);
    let bad: Vec<_> = rows.iter().filter(|r| r.get("error").is_some()).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["_id"], "hotpotqa-long");
    assert!(bad[0]["error"]
        .as_str()
        .unwrap()
        .contains("prompt too long"));
    // The failed row is scored as written (n includes it).
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 samples failed"));
}

/// Exit 2 and one `error:` line containing every needle.
fn assert_error(o: &Output, needles: &[&str]) {
    assert_eq!(o.status.code(), Some(2), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "lacks {n:?}: {err}");
    }
}

#[test]
fn bad_input_is_one_clear_error() {
    let f = fixture();
    assert_error(
        &f.run(&["--tasks", "hotpotqa,bogus"], &[]),
        &["`bogus`", "en16", "repobench-p"],
    );
    assert_error(
        &f.run(&["--tasks", "lcc"], &[]),
        &["`lcc`", "found: hotpotqa, samsum"],
    );
    assert_error(&f.run(&["--rates", "1,0.5"], &[]), &["0.5", ">= 1"]);
    // kvpress's notation: a ratio is a fraction removed, in [0, 1); not beside --rates.
    assert_error(
        &f.run(&["--ratios", "0.5,1"], &[]),
        &["--ratios", "compression ratio 1", "[0, 1)", "--rates"],
    );
    assert_error(
        &f.run(&["--ratios", "0.5", "--rates", "2"], &[]),
        &["--ratios", "--rates", "cannot be used with"],
    );
    assert_error(&f.run(&["--methods", "nope"], &[]), &["nope", "full"]);
    assert_error(
        &f.run(&["--samples", "hotpotqa-1,zzz"], &[]),
        &["zzz", "--samples"],
    );
    // A row without `context`: file and line.
    let mut body = subset_rows("samsum", 1);
    body.push_str("{\"input\": \"q\", \"answers\": [\"a\"], \"length\": 1, \"_id\": \"s9\"}\r\n");
    std::fs::write(f.data.join("samsum.jsonl"), body).unwrap();
    assert_error(&f.run(&[], &[]), &["samsum.jsonl:2", "context"]);
    assert!(
        !f.out.join("tiny").exists(),
        "nothing is written before validation"
    );
}

#[test]
fn reads_data_zip_and_the_hub_cache_offline() {
    let f = fixture();
    let zip = f.root.join("data.zip");
    write_zip(
        &zip,
        &[
            ("data/hotpotqa.jsonl", subset_rows("hotpotqa", 5).as_bytes()),
            ("data/samsum.jsonl", subset_rows("samsum", 3).as_bytes()),
        ],
        true,
    );
    let cache = f.root.join("hub");
    let commit = "fedcba9876543210fedcba9876543210fedcba98";
    hub_cache_with(
        &cache,
        "THUDM/LongBench",
        commit,
        "data.zip",
        &std::fs::read(&zip).unwrap(),
    );
    let cache_s = cache.to_str().unwrap();
    let o = f
        .cmd_with(
            f.args_with_data("hub", &["--samples", "hotpotqa-2,samsum-0"]),
            &[("HF_HUB_CACHE", cache_s)],
        )
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.run_dir().join("run.json")).unwrap())
            .unwrap();
    assert_eq!(run_json["data"]["revision"], commit);
    assert_eq!(run_json["data"]["hub_repo"], "THUDM/LongBench");
    // Not the official files: recorded as a warning per subset.
    assert_eq!(run_json["data"]["files"]["hotpotqa"]["status"], "differs");
    assert!(run_json["warnings"][0]
        .as_str()
        .unwrap()
        .contains("differs from the official"));
    assert_eq!(f.pred_lines("hotpotqa").len(), 1);
    assert_eq!(f.pred_lines("samsum")[0]["_id"], "samsum-0");
    // The same data from the zip file directly resumes the same run (the data path is not part
    // of the configuration).
    let o = f
        .cmd_with(
            f.args_with_data(zip.to_str().unwrap(), &["--limit", "2"]),
            &[],
        )
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        f.pred_lines("hotpotqa").len(),
        3,
        "hotpotqa-0, -1 added to -2"
    );
}

#[test]
fn embedded_default_runs_the_shortest_rows_of_two_bundled_subsets() {
    // No --data-dir, --tasks or --limit: the bundled sample's default selection (a few minutes
    // with SmolLM2 on a CPU): one row of multi_news and of multifieldqa_zh, nothing else.
    let f = fixture();
    let args: Vec<String> = [
        "eval",
        "--model",
        f.model.to_str().unwrap(),
        "--methods",
        "full",
        "--max-new-tokens",
        "2",
        "--out",
        f.out.to_str().unwrap(),
        "--no-progress",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = f.cmd_with(args, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("2 subsets, 2 samples"), "{}", text(&o));
    assert_eq!(f.pred_lines("multi_news").len(), 1);
    assert_eq!(f.pred_lines("multifieldqa_zh").len(), 1);
    assert!(!f
        .run_dir()
        .join("preds/passage_retrieval_zh.jsonl")
        .exists());
}

#[test]
fn retry_failed_redoes_failed_samples_only_when_asked() {
    let f = fixture();
    // The long row fails (prompt longer than the tiny model's context).
    let long = "word ".repeat(3000);
    let write = |ctx: &str| {
        let mut body = subset_rows("hotpotqa", 2);
        body.push_str(&(row("hotpotqa-long", ctx, "q?", &["a"], "hotpotqa") + "\r\n"));
        std::fs::write(f.data.join("hotpotqa.jsonl"), body).unwrap();
    };
    write(&long);
    let args = ["--tasks", "hotpotqa", "--max-input-tokens", "100000"];
    assert_eq!(f.run(&args, &[]).status.code(), Some(1));
    // The cause goes away (the row shortened, same _id); a plain rerun keeps the failed row.
    write("short context");
    let o = f.run(&args, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let errors = |f: &Fixture| {
        f.pred_lines("hotpotqa")
            .iter()
            .filter(|r| r.get("error").is_some())
            .count()
    };
    assert_eq!(f.pred_lines("hotpotqa").len(), 3);
    assert_eq!(errors(&f), 1);
    // --retry-failed removes the failed row and redoes that sample only.
    let mut retry = args.to_vec();
    retry.push("--retry-failed");
    let o = f.run(&retry, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("retrying 1 failed sample"),
        "{}",
        text(&o)
    );
    let rows = f.pred_lines("hotpotqa");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(errors(&f), 0);
    let ids: std::collections::BTreeSet<_> = rows
        .iter()
        .map(|r| r["_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains("hotpotqa-long"));
}

#[test]
fn dump_allocation_records_kept_kvs_per_layer_and_head() {
    let f = fixture();
    let spec = TinySpec::default();
    let o = f.run(
        &[
            "--tasks",
            "hotpotqa",
            "--limit",
            "2",
            "--methods",
            "kvcompress",
            "--rates",
            "4",
            "--min-cache-tokens",
            "16",
            "--protected-window",
            "8",
            "--dump-allocation",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let p = f.out.join("tiny/kvcompress/rate4/preds/hotpotqa.jsonl");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let kept: Vec<Vec<u64>> = serde_json::from_value(r["kept_per_head"].clone())
            .unwrap_or_else(|e| panic!("kept_per_head: {e}: {r}"));
        assert_eq!(kept.len(), spec.layers);
        assert!(kept.iter().all(|l| l.len() == spec.kv_heads));
        let prompt = r["prompt_tokens"].as_u64().unwrap();
        assert!(kept.iter().flatten().all(|&k| k <= prompt), "{kept:?}");
        // achieved_rate is prompt KVs / kept KVs over the same matrix.
        let total: u64 = kept.iter().flatten().sum();
        let heads = (spec.layers * spec.kv_heads) as f64;
        let want = prompt as f64 * heads / total as f64;
        let got = r["achieved_rate"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        assert!(got > 1.5, "rate 4 compressed: achieved {got}");
    }
    // Without the flag, no allocation in the rows (the full-cache run never has it).
    let full = f.pred_lines("hotpotqa");
    assert!(full.iter().all(|r| r.get("kept_per_head").is_none()));
    // The end of the run wrote allocation.csv (one row per layer x kv-head, shares averaging
    // to 1 over the heads) and its heat-map.
    let csv = std::fs::read_to_string(f.out.join("allocation.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("model,method,budget,rate,task,layer,kv_head,n,kept,share"));
    assert_eq!(lines.len(), 1 + spec.layers * spec.kv_heads, "{csv}");
    let share_sum: f64 = lines[1..]
        .iter()
        .map(|l| l.rsplit(',').next().unwrap().parse::<f64>().unwrap())
        .sum();
    let heads = (spec.layers * spec.kv_heads) as f64;
    assert!((share_sum / heads - 1.0).abs() < 1e-9, "{csv}");
    assert!(f
        .out
        .join("plots/tiny__kvcompress__rate4__allocation.png")
        .is_file());
}

/// Rows of `<out>/tiny/<method>/<budget>/preds/hotpotqa.jsonl` by `_id`.
fn rows_by_id(out: &std::path::Path, run: &str) -> BTreeMap<String, serde_json::Value> {
    let p = out.join(format!("tiny/{run}/preds/hotpotqa.jsonl"));
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// The rates of a method share each sample's prefill (the default), and with --batch-samples
/// several samples decode together: a run killed in the middle of a sample's rates resumes
/// each run on its own, and every row equals the row of a sweep that prefilled and decoded
/// every run separately (`--no-shared-prefill`, one sample at a time), timings aside.
#[test]
fn shared_prefill_rows_equal_separate_runs_and_resume_per_run() {
    let args = [
        "--tasks",
        "hotpotqa",
        "--limit",
        "2",
        "--methods",
        "kvcompress,snapkv",
        "--rates",
        "2,4",
        "--min-cache-tokens",
        "16",
        "--protected-window",
        "8",
    ];
    let shared = fixture();
    // Both samples in one batch too (--batch-samples 2). full: 2 rows; kvcompress rate2+rate4
    // on the first sample: rows 3, 4; the second sample's rate-2 row is the 5th: the kill
    // leaves rate4 one row short.
    let mut shared_args = args.to_vec();
    shared_args.extend(["--batch-samples", "2"]);
    let args = shared_args;
    let o = shared.run(&args, &[("KVC_EVAL_TEST_ABORT_AFTER", "5")]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(rows_by_id(&shared.out, "kvcompress/rate2").len(), 2);
    assert_eq!(rows_by_id(&shared.out, "kvcompress/rate4").len(), 1);
    let o = shared.run(&args, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("run kvcompress rate2,rate4"), "{err}");

    let separate = fixture();
    let mut sep_args: Vec<&str> = args[..args.len() - 2].to_vec();
    sep_args.push("--no-shared-prefill");
    let o = separate.run(&sep_args, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let mut compressed = 0;
    for run in [
        "kvcompress/rate2",
        "kvcompress/rate4",
        "snapkv/rate2",
        "snapkv/rate4",
    ] {
        let a = rows_by_id(&shared.out, run);
        let b = rows_by_id(&separate.out, run);
        assert_eq!(a.len(), 2, "{run}: every sample exactly once");
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{run}"
        );
        for (id, ra) in &a {
            let rb = &b[id];
            for k in [
                "pred",
                "prompt_tokens",
                "new_tokens",
                "finish_reason",
                "cache_tokens",
                "achieved_rate",
                "rate",
            ] {
                assert_eq!(ra[k], rb[k], "{run} {id}: {k}");
            }
            assert!(ra.get("error").is_none(), "{ra}");
            assert!(rb.get("prefill_shared").is_none(), "{rb}");
            // The decode breakdown: one forward pass per generated token but the last, in the
            // batch (shared) as alone (separate).
            for r in [ra, rb] {
                let t = &r["decode_times"];
                assert_eq!(
                    t["steps"].as_u64(),
                    r["new_tokens"].as_u64().map(|n| n - 1),
                    "{run} {id}: {r}"
                );
                let parts: f64 = ["forward_ms", "observe_ms", "compress_ms", "sample_ms"]
                    .iter()
                    .map(|k| t[*k].as_f64().unwrap())
                    .sum();
                assert!(parts <= r["decode_ms"].as_f64().unwrap() + 1e-6, "{r}");
                // The prefill breakdown adds up to prefill_ms; only the shared prefill forks.
                let p = &r["prefill_times"];
                let parts: f64 = ["forward_ms", "observe_ms", "fork_ms", "compress_ms"]
                    .iter()
                    .map(|k| p[*k].as_f64().unwrap())
                    .sum();
                let total = r["prefill_ms"].as_f64().unwrap();
                assert!((parts - total).abs() <= 1e-6 * total.max(1.0), "{r}");
                assert!(p["forward_ms"].as_f64().unwrap() > 0.0, "{r}");
                assert!(
                    p["observe_ms"].as_f64().unwrap() > 0.0,
                    "{run}: a probed prefill {r}"
                );
            }
            assert_eq!(rb["prefill_times"]["fork_ms"].as_f64(), Some(0.0), "{rb}");
            if ra["achieved_rate"].as_f64().unwrap() > 1.2 {
                compressed += 1;
            }
        }
    }
    assert!(
        compressed >= 4,
        "the budgets must evict for the comparison to mean anything"
    );
    let run_json = |f: &Fixture| -> serde_json::Value {
        let p = f.out.join("tiny/snapkv/rate2/run.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (a, b) = (run_json(&shared), run_json(&separate));
    assert_eq!(a["scheduling"]["batch_samples"], 2);
    assert_eq!(a["scheduling"]["shared_prefill"], true);
    assert_eq!(b["scheduling"]["shared_prefill"], false);
    // Scheduling changes timings only: it is not part of the configuration (the two fixtures
    // differ only in their model's temporary path).
    let config = |v: &serde_json::Value| {
        let mut c = v["config"].clone();
        c.as_object_mut().unwrap().remove("model_source");
        c
    };
    assert_eq!(config(&a), config(&b));
    // Snapkv's two rates ran in one group from the start: both rows say so.
    let s = rows_by_id(&shared.out, "snapkv/rate4");
    assert!(s.values().all(|r| r["prefill_shared"] == 2), "{s:?}");
}

#[test]
fn eval_scores_only_its_own_runs_and_warns_on_its_unscorable_ones() {
    // Another tree under --out with an empty predictions file (committed evidence once sat in
    // the default output tree): not this command's, so neither scored nor fatal.
    let f = fixture();
    let stray = f.out.join("other-model/h2o/rate2/preds");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("passage_retrieval_zh.jsonl"), "").unwrap();
    let o = f.run(&[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_complete(&f);
    let csv = std::fs::read_to_string(f.out.join("scores.csv")).unwrap();
    assert!(!csv.contains("other-model"), "{csv}");
    assert!(!stray.parent().unwrap().join("result.json").exists());
    // One of its own runs that cannot be scored (its rows torn away by hand) is a warning
    // naming the directory; the command still writes the scores it can.
    let preds = f.run_dir().join("preds");
    for s in ["hotpotqa", "samsum"] {
        std::fs::write(preds.join(format!("{s}.jsonl")), "").unwrap();
    }
    let o = f.run(&["--limit", "0"], &[]);
    let t = text(&o);
    assert!(
        t.contains("warning: not scored:") && t.contains("full/rate1"),
        "{t}"
    );
}

#[test]
fn ruler_only_run_reads_no_longbench_files() {
    // A RULER-only run never opens --data-dir (here a path that does not exist).
    let f = fixture();
    let args: Vec<String> = [
        "eval",
        "--model",
        f.model.to_str().unwrap(),
        "--data-dir",
        "/nonexistent/longbench",
        "--tasks",
        "ruler:niah_single_1",
        "--lengths",
        "1024",
        "--ruler-samples",
        "1",
        "--methods",
        "full",
        "--max-new-tokens",
        "2",
        "--out",
        f.out.to_str().unwrap(),
        "--no-progress",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = f.cmd_with(args, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("RULER only"), "{}", text(&o));
    assert!(f.out.join("scores.csv").is_file());
}

#[test]
fn paper_preset_runs_budget_pairs_and_writes_the_paper_table() {
    let f = fixture();
    let o = f.run(
        &[
            "--methods",
            "kvcompress",
            "--rates",
            "1",
            "--cache-tokens",
            "32",
            "--preset",
            "paper-llama-8b",
            "--tasks",
            "hotpotqa",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for (budget, once) in [("tokens32", true), ("tokens16", true)] {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(f.out.join(format!("tiny/kvcompress/{budget}/run.json")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(meta["preset"], "paper-llama-8b", "{budget}");
        let opts = &meta["config"]["method_options"];
        assert_eq!(opts["compress_once"], once, "{budget}");
        assert_eq!(
            (
                opts["kvc_window"].as_u64(),
                opts["protected_window"].as_u64()
            ),
            (Some(8), Some(8))
        );
    }
    let table = std::fs::read_to_string(f.out.join("paper_fixed_budget.csv")).unwrap();
    assert!(
        table.lines().any(|l| l.contains("kvcompress,32,all")),
        "{table}"
    );
    // The preset sets the KV-Compress flags: giving one beside it is refused.
    let o = f.run(&["--preset", "paper-llama-8b", "--kvc-window", "4"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--kvc-window"), "{}", text(&o));
}

/// `--ratios` (kvpress's compression_ratio) runs the same budgets as `--rates` (0.75 = rate 4)
/// and every table and CSV shows both notations, with n and the paired-bootstrap interval.
#[test]
fn ratios_run_as_rates_and_outputs_show_both_notations() {
    let f = fixture();
    let o = f.run(
        &[
            "--tasks",
            "hotpotqa",
            "--limit",
            "3",
            "--methods",
            "streamingllm",
            "--ratios",
            "0,0.75",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(f
        .out
        .join("tiny/streamingllm/rate4/preds/hotpotqa.jsonl")
        .is_file());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("streamingllm/rate4"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains(" 0.75 "), "{stdout}");
    assert!(stdout.contains("ratio"), "{stdout}");
    let read = |file: &str| {
        let mut rdr = csv::Reader::from_path(f.out.join(file)).unwrap();
        let h = rdr.headers().unwrap().clone();
        let rows: Vec<BTreeMap<String, String>> = rdr
            .records()
            .map(|r| {
                h.iter()
                    .zip(r.unwrap().iter())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect();
        rows
    };
    for file in ["scores.csv", "summary.csv"] {
        let rows = read(file);
        let r = rows
            .iter()
            .find(|r| r["method"] == "streamingllm")
            .unwrap_or_else(|| panic!("{file}: {rows:?}"));
        assert_eq!(
            (r["rate"].as_str(), r["compression_ratio"].as_str()),
            ("4.0", "0.75")
        );
        let full = rows.iter().find(|r| r["method"] == "full").unwrap();
        assert_eq!(full["compression_ratio"], "0.0", "{file}");
        assert!(r.contains_key("percent_of_full_ci_low"), "{file}");
        assert!(r.contains_key("percent_of_full_ci_high"), "{file}");
    }
    let summary = read("summary.csv");
    let all = summary
        .iter()
        .find(|r| r["method"] == "streamingllm" && r["category"] == "all")
        .unwrap();
    assert_eq!(all["n"], "3");
}
