//! Sharded sweeps on the CPU with a tiny random model: 3 shards run one after the other and
//! `kvc merge` give the unsharded sweep's files (result.json, scores.csv, summary.csv byte for
//! byte; prediction rows equal but for their timings, in the same order); a missing shard, a
//! doubled sample and a shard of another configuration are named, not merged.
mod common;

use common::subset_rows;
use kvc::model::tiny::{write_hf_dir, TinySpec};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Fixture {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    write_hf_dir(&model, &TinySpec::default(), 1).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hotpotqa.jsonl"), subset_rows("hotpotqa", 7)).unwrap();
    std::fs::write(data.join("samsum.jsonl"), subset_rows("samsum", 5)).unwrap();
    Fixture {
        root: tmp.path().to_path_buf(),
        _tmp: tmp,
        model,
        data,
    }
}

impl Fixture {
    /// `kvc eval` of full + kvcompress at 2x on both subsets into `out`, plus `extra`.
    fn eval(&self, out: &str, extra: &[&str]) -> Output {
        self.eval_cmd(out, extra).output().unwrap()
    }

    /// The command of [`Fixture::eval`], for callers that add environment.
    fn eval_cmd(&self, out: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvc"));
        c.args(["eval", "--model", self.model.to_str().unwrap()])
            .args(["--data-dir", self.data.to_str().unwrap()])
            .args(["--tasks", "hotpotqa,samsum", "--methods", "kvcompress"])
            .args([
                "--rates",
                "1,2",
                "--max-new-tokens",
                "3",
                "--min-cache-tokens",
                "16",
            ])
            .args(["--out", out, "--no-progress"])
            .args(extra)
            .current_dir(&self.root)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("KVC_MODEL")
            .env_remove("KVC_DATA_DIR");
        c
    }

    fn merge(&self, out: &str) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kvc"))
            .args(["merge", out])
            .current_dir(&self.root)
            .output()
            .unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
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

/// A prediction file's rows without the fields that time the run.
fn rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.retain(|k, _| !k.ends_with("_ms") && !k.ends_with("_times"));
            v
        })
        .collect()
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

const RUNS: [&str; 2] = ["tiny/full/rate1", "tiny/kvcompress/rate2"];

#[test]
fn three_shards_merge_into_the_unsharded_sweep() {
    let f = fixture();
    let o = f.eval("one", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for i in 0..3 {
        let o = f.eval("sharded", &["--shard", &format!("{i}/3")]);
        assert_eq!(o.status.code(), Some(0), "shard {i}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("kvc merge"), "{out}");
        // A shard writes its own tree and no scores.
        assert!(f
            .path(&format!("sharded/shards/{i}-of-3/shard.json"))
            .is_file());
        assert!(!f.path("sharded/scores.csv").exists());
    }
    // Every shard got some samples (12 samples over 3 shards).
    for i in 0..3 {
        let n: usize = RUNS[..1]
            .iter()
            .flat_map(|r| {
                ["hotpotqa", "samsum"]
                    .map(|s| format!("sharded/shards/{i}-of-3/{r}/preds/{s}.jsonl"))
            })
            .map(|p| std::fs::read_to_string(f.path(&p)).map_or(0, |t| t.lines().count()))
            .sum();
        assert!(n > 0, "shard {i} ran no sample");
        // The manifest plans exactly the rows the shard wrote (the --devices bar's total).
        let tree = f.path(&format!("sharded/shards/{i}-of-3"));
        let written = walk(&tree)
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
            .sum::<usize>();
        let planned = kvc::eval::shard::Manifest::read(&tree).unwrap().rows;
        assert_eq!(planned, Some(written), "shard {i}");
    }
    let o = f.merge("sharded");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_same_scores(&f, "one", "sharded");
    for run in RUNS {
        let r = |root: &str, rel: &str| f.path(&format!("{root}/{run}/{rel}"));
        for s in ["hotpotqa", "samsum"] {
            let p = format!("preds/{s}.jsonl");
            assert_eq!(
                rows(&r("one", &p)),
                rows(&r("sharded", &p)),
                "{run} {s}: same rows, same order"
            );
        }
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(r("sharded", "run.json")).unwrap())
                .unwrap();
        assert_eq!(meta["merged_from"], 3);
        assert!(meta.get("shard").is_none());
    }
    // The same files at the top (plots and derived CSVs included), the shards aside.
    let names = |root: &str| {
        let mut v: Vec<String> = walk(&f.path(root))
            .into_iter()
            .map(|p| p.strip_prefix(f.path(root)).unwrap().display().to_string())
            .filter(|p| !p.starts_with("shards"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("one"), names("sharded"));
}

#[test]
fn merge_names_a_missing_shard_a_doubled_sample_and_another_configuration() {
    let f = fixture();
    for i in [0, 2] {
        let o = f.eval("s", &["--shard", &format!("{i}/3")]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    let o = f.merge("s");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shard 1/3 is missing"), "{err}");
    assert!(!f.path("s/scores.csv").exists(), "nothing written");

    // Shard 1 with another chat rule: its runs carry another configuration hash.
    let o = f.eval("s", &["--shard", "1/3", "--chat", "always"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = f.merge("s");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && err.contains("different configurations"),
        "{}",
        text(&o)
    );

    // Redo shard 1 as the others, then copy one of shard 0's rows into shard 1's file.
    let o = f.eval("s", &["--shard", "1/3", "--overwrite"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(f.merge("s").status.code(), Some(0));
    let (from, to) = (
        f.path("s/shards/0-of-3/tiny/full/rate1/preds"),
        f.path("s/shards/1-of-3/tiny/full/rate1/preds"),
    );
    let subset = ["hotpotqa", "samsum"]
        .into_iter()
        .find(|s| from.join(format!("{s}.jsonl")).is_file())
        .unwrap();
    let line = std::fs::read_to_string(from.join(format!("{subset}.jsonl"))).unwrap();
    let first = line.lines().next().unwrap();
    let id = serde_json::from_str::<serde_json::Value>(first).unwrap()["_id"]
        .as_str()
        .unwrap()
        .to_string();
    let target = to.join(format!("{subset}.jsonl"));
    let mut text_to = std::fs::read_to_string(&target).unwrap_or_default();
    text_to.push_str(first);
    text_to.push('\n');
    std::fs::write(&target, text_to).unwrap();
    let o = f.merge("s");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && err.contains(&format!("{id} has 2 rows")),
        "{}",
        text(&o)
    );
}

#[test]
fn a_bad_shard_flag_is_one_clear_error() {
    let f = fixture();
    let o = f.eval("x", &["--shard", "3/3"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected I/N"));
}

/// `dir`'s scores.csv, summary.csv and every run's result.json equal `one`'s.
fn assert_same_scores(f: &Fixture, one: &str, dir: &str) {
    for file in ["scores.csv", "summary.csv"] {
        let (a, b) = (
            f.path(&format!("{one}/{file}")),
            f.path(&format!("{dir}/{file}")),
        );
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{dir}/{file}"
        );
    }
    for run in RUNS {
        let r = |root: &str| f.path(&format!("{root}/{run}/result.json"));
        assert_eq!(
            std::fs::read(r(one)).unwrap(),
            std::fs::read(r(dir)).unwrap(),
            "{run}"
        );
    }
}

#[test]
fn devices_run_one_worker_per_device_restart_dead_ones_and_merge() {
    let f = fixture();
    let o = f.eval("one", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = f.eval("two", &["--devices", "cpu,cpu"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(f.path("two/shards/worker-1-of-2.log").is_file());
    assert_same_scores(&f, "one", "two");

    // Workers that abort (no cleanup) after every 3 rows: each attempt makes progress, so each
    // shard is started again until done, and the merge equals the unsharded sweep.
    let o = f
        .eval_cmd("dying", &["--devices", "cpu,cpu"])
        .env("KVC_EVAL_TEST_ABORT_AFTER", "3")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("again from its files"),
        "{}",
        text(&o)
    );
    assert_same_scores(&f, "one", "dying");

    // A worker that fails before writing anything is given up, named with its log.
    let o = f.eval(
        "bad",
        &["--devices", "cpu,cpu", "--methods", "no-such-method"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        err.contains("without writing a row") && err.contains("worker-0-of-2.log"),
        "{err}"
    );
}
