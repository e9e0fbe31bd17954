//! Scoring a results tree and the tidy CSVs: `scores.csv` (one row per run × subset [× LongBench-E
//! bucket]) and `summary.csv` (per run × category, and `all`).
//!
//! Layout read: `<root>/<model>/<method>/<budget>/preds/<subset>.jsonl`, with an optional
//! `run.json` beside `preds/` whose `model`, `method`, `rate`, `budget_tokens` override the path
//! (a model id with a `/` is then simply nested one level deeper). Budget directories are
//! `rate<r>` (`rate8`, `rate1`) or `tokens<n>` (`tokens512`). The full-cache baseline of a model
//! is method `full` at rate 1.
//!
//! Percent of full cache (KV-Compress paper): per subset `score / full-cache score × 100`; a
//! category averages its subsets' percentages; `all` averages every subset's percentage (the
//! per-subset mean, as KV-cache papers report it; LongBench's README instead averages the six
//! category scores — compute that from the category rows if wanted). Scores averaged the same way
//! are given beside, in LongBench points.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::tasks::Category;
use crate::eval::metrics::MetricOptions;
use crate::eval::record::RunMeta;
use crate::eval::scoring::{
    self, BadLine, OnError, ScoreError, SubsetResult, SubsetScore, E_BUCKETS,
};
pub use crate::kvcache::budget::Budget;
use crate::util::write_atomic;

/// Errors of tree scoring and CSV I/O.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error("{path}: {message}")]
    Layout { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: CSV: {source}")]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error("{path}: no rows")]
    NoRows { path: PathBuf },
    #[error("no full-cache baseline (method `full`, budget `rate1`) for: {missing}; percent of full cache needs one per model and subset")]
    MissingFull { missing: String },
}

/// One run of the tree: a model × method × budget with its `preds/` directory.
#[derive(Debug, Clone)]
pub struct RunId {
    pub model: String,
    pub method: String,
    pub budget: Budget,
    /// The run directory (holding `preds/` and optionally `run.json`).
    pub dir: PathBuf,
}

impl RunId {
    /// The full-cache baseline run: method `full` at rate 1.
    pub fn is_full(&self) -> bool {
        self.method == "full" && self.budget == Budget::Rate(1.0)
    }
}

/// One row of `scores.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub model: String,
    pub method: String,
    /// `rate8` / `tokens512`.
    pub budget: String,
    /// Compression rate, empty for token-budget runs.
    pub rate: Option<f64>,
    /// Token budget, empty for rate runs.
    pub budget_tokens: Option<usize>,
    pub task: String,
    pub category: String,
    pub language: String,
    pub metric: String,
    /// LongBench-E length bucket (`0-4k`, `4-8k`, `8k+`); empty for LongBench subsets.
    pub bucket: String,
    /// Samples scored (in this bucket).
    pub n: usize,
    /// Samples whose record carries an `error` (scored as written).
    pub n_failed: usize,
    /// The official score (0..100, two decimals as eval.py); NaN for an empty -E bucket.
    pub score: f64,
    /// The same subset's score of the model's full-cache run.
    pub full_score: Option<f64>,
    /// score / full_score × 100.
    pub percent_of_full: Option<f64>,
    /// Mean KV tokens kept per sample (from the records' `cache_tokens`).
    pub cache_tokens: Option<f64>,
    /// Mean achieved compression (from the records' `achieved_rate`).
    pub achieved_rate: Option<f64>,
    /// Mean prompt tokens.
    pub prompt_tokens: Option<f64>,
    /// fuzzywuzzy backend used for code similarity (`difflib` / `levenshtein`).
    pub fuzz_backend: String,
}

/// One row of `summary.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    pub model: String,
    pub method: String,
    pub budget: String,
    pub rate: Option<f64>,
    pub budget_tokens: Option<usize>,
    pub bucket: String,
    /// A category name, or `all`.
    pub category: String,
    /// Subsets averaged.
    pub n_tasks: usize,
    /// Mean of the subsets' scores.
    pub score: f64,
    /// Mean of the subsets' percent of full cache (empty when any subset lacks a baseline).
    pub percent_of_full: Option<f64>,
    pub cache_tokens: Option<f64>,
    pub achieved_rate: Option<f64>,
}

/// Scored runs of a tree.
#[derive(Debug, Clone, Default)]
pub struct TreeScores {
    pub rows: Vec<ScoreRow>,
    pub summary: Vec<SummaryRow>,
    pub skipped: Vec<BadLine>,
    /// (model, task, bucket) without a full-cache baseline.
    pub missing_full: Vec<String>,
    /// Failed samples across all runs.
    pub n_failed: usize,
    /// The runs found, with their per-subset results.
    pub runs: Vec<(RunId, Vec<SubsetResult>)>,
    /// Run directories left out by [`score_runs`], with the reason.
    pub unscored: Vec<(PathBuf, String)>,
}

/// Find every `preds/` directory under `root` and identify its run.
pub fn discover_runs(root: &Path) -> Result<Vec<RunId>, ReportError> {
    let mut dirs = Vec::new();
    walk(root, 0, &mut dirs)?;
    let mut runs = dirs
        .into_iter()
        .map(|d| identify_run(root, &d))
        .collect::<Result<Vec<_>, _>>()?;
    runs.sort_by(run_order);
    Ok(runs)
}

/// The order of runs in every table: model, then `full` first, then method name; rate runs by
/// rate, then token runs by size (the same for `kvc score`, `kvc eval` and `kvc merge`).
fn run_order(a: &RunId, b: &RunId) -> std::cmp::Ordering {
    let k = |r: &RunId| {
        let (kind, x) = match r.budget {
            Budget::Rate(x) => (0, x),
            Budget::Tokens(t) => (1, t as f64),
        };
        (
            r.model.clone(),
            r.method != "full",
            r.method.clone(),
            kind,
            x,
        )
    };
    let (ka, kb) = (k(a), k(b));
    (&ka.0, ka.1, &ka.2, ka.3)
        .cmp(&(&kb.0, kb.1, &kb.2, kb.3))
        .then(ka.4.total_cmp(&kb.4))
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), ReportError> {
    if depth > 8 {
        return Ok(());
    }
    let rd = std::fs::read_dir(dir).map_err(|source| {
        ReportError::Score(ScoreError::Io {
            path: dir.to_path_buf(),
            source,
        })
    })?;
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "preds") {
                out.push(dir.to_path_buf());
            } else {
                walk(&p, depth + 1, out)?;
            }
        }
    }
    Ok(())
}

fn identify_run(root: &Path, dir: &Path) -> Result<RunId, ReportError> {
    let rel: Vec<String> = dir
        .strip_prefix(root)
        .unwrap_or(dir)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let meta: RunMeta = match std::fs::read_to_string(dir.join("run.json")) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| ReportError::Layout {
            path: dir.join("run.json"),
            message: format!("not a valid run.json: {e}"),
        })?,
        Err(_) => RunMeta::default(),
    };
    let layout_err = |message: String| ReportError::Layout {
        path: dir.to_path_buf(),
        message,
    };
    let n = rel.len();
    let model = meta
        .model
        .clone()
        .or_else(|| (n >= 3).then(|| rel[..n - 2].join("/")))
        .ok_or_else(|| {
            layout_err(
                "expected <model>/<method>/<budget>/preds (or model/method/rate in run.json)"
                    .into(),
            )
        })?;
    let method = meta
        .method
        .clone()
        .or_else(|| (n >= 2).then(|| rel[n - 2].clone()))
        .ok_or_else(|| {
            layout_err(
                "cannot tell the method: no run.json `method` and no <method> directory".into(),
            )
        })?;
    let budget = if let Some(r) = meta.rate {
        Budget::Rate(r)
    } else if let Some(t) = meta.budget_tokens {
        Budget::Tokens(t)
    } else {
        let name = rel.last().cloned().unwrap_or_default();
        Budget::parse_dir(&name).ok_or_else(|| {
            layout_err(format!(
                "budget directory `{name}` is neither rate<r> (rate8) nor tokens<n> (tokens512), and run.json gives no rate or budget_tokens"
            ))
        })?
    };
    Ok(RunId {
        model,
        method,
        budget,
        dir: dir.to_path_buf(),
    })
}

fn mean(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        None
    } else {
        Some(xs.iter().sum::<f64>() / xs.len() as f64)
    }
}

fn rows_of(run: &RunId, subsets: &[SubsetResult], opts: &MetricOptions) -> Vec<ScoreRow> {
    let mut rows = Vec::new();
    for s in subsets {
        let base = ScoreRow {
            model: run.model.clone(),
            method: run.method.clone(),
            budget: run.budget.label(),
            rate: match run.budget {
                Budget::Rate(r) => Some(r),
                Budget::Tokens(_) => None,
            },
            budget_tokens: match run.budget {
                Budget::Tokens(t) => Some(t),
                Budget::Rate(_) => None,
            },
            task: s.task.name.to_string(),
            category: s.task.category.name().to_string(),
            language: s.task.language.name().to_string(),
            metric: s.task.metric.display_name().to_string(),
            bucket: String::new(),
            n: s.n,
            n_failed: s.n_failed,
            score: f64::NAN,
            full_score: None,
            percent_of_full: None,
            cache_tokens: s.mean_cache_tokens,
            achieved_rate: s.mean_achieved_rate,
            prompt_tokens: s.mean_prompt_tokens,
            fuzz_backend: opts.fuzz.name().to_string(),
        };
        match s.score {
            SubsetScore::Plain(x) => rows.push(ScoreRow { score: x, ..base }),
            SubsetScore::Buckets(b) => {
                for (i, name) in E_BUCKETS.iter().enumerate() {
                    rows.push(ScoreRow {
                        score: b[i],
                        bucket: name.to_string(),
                        n: s.bucket_n[i],
                        ..base.clone()
                    });
                }
            }
        }
    }
    rows
}

/// Fill `full_score` / `percent_of_full` from each model's `full` / `rate1` rows. Returns the
/// (model, task, bucket) keys that have no baseline.
pub fn fill_percent_of_full(rows: &mut [ScoreRow]) -> Vec<String> {
    let mut full: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for r in rows.iter() {
        if r.method == "full" && r.rate == Some(1.0) {
            full.insert((r.model.clone(), r.task.clone(), r.bucket.clone()), r.score);
        }
    }
    let mut missing = Vec::new();
    for r in rows.iter_mut() {
        let key = (r.model.clone(), r.task.clone(), r.bucket.clone());
        match full.get(&key) {
            Some(&f) => {
                r.full_score = Some(f);
                r.percent_of_full =
                    (f != 0.0 && f.is_finite() && r.score.is_finite()).then(|| r.score / f * 100.0);
            }
            None => {
                let k = if r.bucket.is_empty() {
                    format!("{}/{}", r.model, r.task)
                } else {
                    format!("{}/{}[{}]", r.model, r.task, r.bucket)
                };
                if !missing.contains(&k) {
                    missing.push(k);
                }
            }
        }
    }
    missing
}

/// Per run × bucket: one row per category present, then `all`.
pub fn summarize(rows: &[ScoreRow]) -> Vec<SummaryRow> {
    type Key = (String, String, String, String);
    let mut groups: Vec<(Key, Vec<&ScoreRow>)> = Vec::new();
    for r in rows {
        let k = (
            r.model.clone(),
            r.method.clone(),
            r.budget.clone(),
            r.bucket.clone(),
        );
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, v)) => v.push(r),
            None => groups.push((k, vec![r])),
        }
    }
    let mut out = Vec::new();
    for (_, members) in groups {
        let first = members[0];
        let mut cats: Vec<(String, Vec<&ScoreRow>)> = Category::ALL
            .iter()
            .map(|c| {
                (
                    c.name().to_string(),
                    members
                        .iter()
                        .copied()
                        .filter(|r| r.category == c.name())
                        .collect(),
                )
            })
            .collect();
        cats.push(("all".to_string(), members.clone()));
        for (cat, rs) in cats {
            if rs.is_empty() {
                continue;
            }
            let pct: Vec<f64> = rs.iter().filter_map(|r| r.percent_of_full).collect();
            let opt_mean = |f: fn(&ScoreRow) -> Option<f64>| {
                let v: Vec<f64> = rs.iter().filter_map(|r| f(r)).collect();
                mean(&v)
            };
            out.push(SummaryRow {
                model: first.model.clone(),
                method: first.method.clone(),
                budget: first.budget.clone(),
                rate: first.rate,
                budget_tokens: first.budget_tokens,
                bucket: first.bucket.clone(),
                category: cat,
                n_tasks: rs.len(),
                score: mean(&rs.iter().map(|r| r.score).collect::<Vec<_>>()).unwrap_or(f64::NAN),
                percent_of_full: if pct.len() == rs.len() {
                    mean(&pct)
                } else {
                    None
                },
                cache_tokens: opt_mean(|r| r.cache_tokens),
                achieved_rate: opt_mean(|r| r.achieved_rate),
            });
        }
    }
    out
}

/// Score every run under `root`, write `<run>/result.json` for each, and return the rows. Any
/// run that cannot be scored stops it (`kvc score DIR`: the whole tree is the request).
pub fn score_tree(
    root: &Path,
    force_e: bool,
    on_error: OnError,
    opts: &MetricOptions,
) -> Result<TreeScores, ReportError> {
    let runs = discover_runs(root)?;
    if runs.is_empty() {
        return Err(ReportError::Layout {
            path: root.to_path_buf(),
            message: "no `<model>/<method>/<budget>/preds/` directories and no `<subset>.jsonl` files here".into(),
        });
    }
    let mut out = TreeScores::default();
    for run in runs {
        score_one(&mut out, run, force_e, on_error, opts)?;
    }
    out.finish();
    Ok(out)
}

/// Score the given run directories (`kvc eval`: the runs it made or resumed, nothing else under
/// its output root), in the tables' run order. A directory that cannot be identified or scored
/// is left out and named in [`TreeScores::unscored`] with the reason, so one bad run never ends
/// the others' scoring.
pub fn score_runs(
    root: &Path,
    dirs: &[PathBuf],
    force_e: bool,
    on_error: OnError,
    opts: &MetricOptions,
) -> TreeScores {
    let mut out = TreeScores::default();
    let mut runs = Vec::new();
    for dir in dirs {
        match identify_run(root, dir) {
            Ok(run) => runs.push(run),
            Err(e) => out.unscored.push((dir.clone(), e.to_string())),
        }
    }
    runs.sort_by(run_order);
    for run in runs {
        let dir = run.dir.clone();
        if let Err(e) = score_one(&mut out, run, force_e, on_error, opts) {
            out.unscored.push((dir, e.to_string()));
        }
    }
    out.finish();
    out
}

/// Score one run into `out` (its `result.json` written first); `out` is unchanged on error.
fn score_one(
    out: &mut TreeScores,
    run: RunId,
    force_e: bool,
    on_error: OnError,
    opts: &MetricOptions,
) -> Result<(), ReportError> {
    let d = scoring::score_pred_dir(&run.dir.join("preds"), force_e, on_error, opts)?;
    let path = run.dir.join("result.json");
    write_atomic(&path, scoring::result_json(&d.subsets).as_bytes())
        .map_err(|source| ReportError::Write { path, source })?;
    out.rows.extend(rows_of(&run, &d.subsets, opts));
    out.skipped.extend(d.skipped);
    out.n_failed += d.subsets.iter().map(|s| s.n_failed).sum::<usize>();
    out.runs.push((run, d.subsets));
    Ok(())
}

impl TreeScores {
    /// Percent of full cache and the summary, once every run is in.
    fn finish(&mut self) {
        self.missing_full = fill_percent_of_full(&mut self.rows);
        self.summary = summarize(&self.rows);
    }
}

/// Serialise rows to CSV text (header + rows; `None` → empty cell, NaN → `NaN`).
pub fn to_csv<T: Serialize>(rows: &[T]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Write rows to `path` atomically (temp file + rename: never a half-written CSV).
pub fn write_csv<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), ReportError> {
    let text = to_csv(rows).map_err(|source| ReportError::Csv {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, text.as_bytes()).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Read a CSV written by [`write_csv`].
pub fn read_csv<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, ReportError> {
    let mut r = csv::Reader::from_path(path).map_err(|source| ReportError::Csv {
        path: path.to_path_buf(),
        source,
    })?;
    let rows = r
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|source| ReportError::Csv {
            path: path.to_path_buf(),
            source,
        })?;
    if rows.is_empty() {
        return Err(ReportError::NoRows {
            path: path.to_path_buf(),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_runs_lists_runs_in_table_order_whatever_order_it_is_given() {
        // kvc eval on a GPU finishes `full` last (it joins the first method's group).
        let tmp = tempfile::tempdir().unwrap();
        let row = r#"{"pred":"a b","answers":["a b c"],"all_classes":null,"length":10,"_id":"x"}"#;
        let dirs: Vec<PathBuf> = ["m/kvcompress/rate8", "m/full/rate1", "m/kvcompress/rate2"]
            .iter()
            .map(|r| {
                let d = tmp.path().join(r);
                std::fs::create_dir_all(d.join("preds")).unwrap();
                std::fs::write(d.join("preds/multi_news.jsonl"), format!("{row}\n")).unwrap();
                d
            })
            .collect();
        let t = score_runs(
            tmp.path(),
            &dirs,
            false,
            OnError::Stop,
            &MetricOptions::default(),
        );
        let order: Vec<(String, String)> = t
            .rows
            .iter()
            .map(|r| (r.method.clone(), r.budget.clone()))
            .collect();
        assert_eq!(
            order,
            [
                ("full", "rate1"),
                ("kvcompress", "rate2"),
                ("kvcompress", "rate8")
            ]
            .map(|(m, b)| (m.to_string(), b.to_string()))
        );
    }

    #[test]
    fn budget_dirs() {
        assert_eq!(Budget::parse_dir("rate8"), Some(Budget::Rate(8.0)));
        assert_eq!(Budget::parse_dir("tokens512"), Some(Budget::Tokens(512)));
        assert_eq!(Budget::parse_dir("rate0.5"), None);
        assert_eq!(Budget::parse_dir("r8"), None);
        assert_eq!(Budget::Rate(8.0).label(), "rate8");
        assert_eq!(Budget::Rate(1.5).label(), "rate1.5");
    }
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    fn row(method: &str, rate: f64, task: &str, category: &str, score: f64) -> ScoreRow {
        ScoreRow {
            model: "m".into(),
            method: method.into(),
            budget: Budget::Rate(rate).label(),
            rate: Some(rate),
            budget_tokens: None,
            task: task.into(),
            category: category.into(),
            language: "en".into(),
            metric: "F1".into(),
            bucket: String::new(),
            n: 10,
            n_failed: 0,
            score,
            full_score: None,
            percent_of_full: None,
            cache_tokens: None,
            achieved_rate: None,
            prompt_tokens: None,
            fuzz_backend: "difflib".into(),
        }
    }

    #[test]
    fn percent_of_full_and_category_means() {
        let mut rows = vec![
            row("full", 1.0, "hotpotqa", "Multi-Doc QA", 40.0),
            row("full", 1.0, "musique", "Multi-Doc QA", 20.0),
            row("full", 1.0, "trec", "Few-shot Learning", 0.0),
            row("kv", 8.0, "hotpotqa", "Multi-Doc QA", 30.0),
            row("kv", 8.0, "musique", "Multi-Doc QA", 20.0),
            row("kv", 8.0, "trec", "Few-shot Learning", 5.0),
            row("kv", 8.0, "lcc", "Code", 5.0),
        ];
        let missing = fill_percent_of_full(&mut rows);
        assert_eq!(missing, ["m/lcc"]);
        assert_eq!(rows[3].percent_of_full, Some(75.0));
        assert_eq!(rows[4].percent_of_full, Some(100.0));
        // A zero full-cache score gives no percentage (division by zero), not inf.
        assert_eq!(rows[5].percent_of_full, None);
        let s = summarize(&rows);
        let get = |m: &str, c: &str| {
            s.iter()
                .find(|r| r.method == m && r.category == c)
                .unwrap()
                .clone()
        };
        assert_eq!(get("kv", "Multi-Doc QA").percent_of_full, Some(87.5));
        assert_eq!(get("kv", "Multi-Doc QA").score, 25.0);
        assert_eq!(get("kv", "Multi-Doc QA").n_tasks, 2);
        // `all` has subsets without a percentage: left empty rather than averaged over fewer.
        assert_eq!(get("kv", "all").percent_of_full, None);
        assert_eq!(get("kv", "all").n_tasks, 4);
        assert_eq!(get("full", "all").percent_of_full, None); // trec full = 0
    }
}
