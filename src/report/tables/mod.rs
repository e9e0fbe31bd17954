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
//! category, and `all`, is the mean of its subsets' scores over the mean of their full-cache
//! scores × 100 ([`category_percent`]), so a subset that scores 0 with the full cache counts
//! instead of leaving the category undefined (departs from the per-subset mean of percentages
//! kvc used before issue 28). `score` is the plain mean of the subsets' scores, in LongBench
//! points (LongBench's README "Avg" averages the six category scores instead — compute that from
//! the category rows if wanted). Every row also carries `n`, both rate notations and a 95 %
//! paired-bootstrap interval of its percentage ([`super::bootstrap`]).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::tasks::Category;
use crate::eval::metrics::MetricOptions;
use crate::eval::record::RunMeta;
use crate::eval::run::ratio_from_rate;
use crate::eval::scoring::{
    self, BadLine, OnError, ScoreError, SubsetResult, SubsetScore, E_BUCKETS,
};
pub use crate::kvcache::budget::Budget;
use crate::report::bootstrap::{pair_samples, percent_of_full_interval, Pairs, RESAMPLES, SEED};
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
    /// `rate` in kvpress's notation, `compression_ratio` = 1 - 1/rate (the fraction of KVs
    /// removed; 0 = full cache); empty for token-budget runs. Columns added after the first
    /// release go last, so readers by position keep working.
    #[serde(default)]
    pub compression_ratio: Option<f64>,
    /// 95 % paired-bootstrap interval of `percent_of_full` against the full cache on the same
    /// samples ([`super::bootstrap`]); empty without a baseline or when it is undefined.
    #[serde(default)]
    pub percent_of_full_ci_low: Option<f64>,
    #[serde(default)]
    pub percent_of_full_ci_high: Option<f64>,
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
    /// Percent of full cache of the category: mean of the subsets' scores / mean of the same
    /// subsets' full-cache scores × 100 (empty when a subset lacks a baseline or the full
    /// cache's mean is 0).
    pub percent_of_full: Option<f64>,
    pub cache_tokens: Option<f64>,
    pub achieved_rate: Option<f64>,
    /// See [`ScoreRow::compression_ratio`].
    #[serde(default)]
    pub compression_ratio: Option<f64>,
    /// Samples scored, summed over the subsets (in this bucket).
    #[serde(default)]
    pub n: usize,
    /// 95 % paired-bootstrap interval of `percent_of_full` (every subset resampled on its own,
    /// paired with the full cache by sample id: [`super::bootstrap`]).
    #[serde(default)]
    pub percent_of_full_ci_low: Option<f64>,
    #[serde(default)]
    pub percent_of_full_ci_high: Option<f64>,
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
            compression_ratio: match run.budget {
                Budget::Rate(r) => Some(ratio_from_rate(r)),
                Budget::Tokens(_) => None,
            },
            percent_of_full_ci_low: None,
            percent_of_full_ci_high: None,
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

/// Percent of full cache of a group of subsets (a category or `all`): the mean of their scores
/// over the mean of their full-cache scores, × 100. `None` when a subset has no baseline, a
/// score is not finite (an empty LongBench-E bucket) or the full cache's mean is 0; a subset
/// whose own full-cache score is 0 still counts (its percentage alone would be undefined).
pub fn category_percent(rows: &[&ScoreRow]) -> Option<f64> {
    let mut m = 0.0;
    let mut f = 0.0;
    for r in rows {
        let full = r.full_score?;
        if !(full.is_finite() && r.score.is_finite()) {
            return None;
        }
        m += r.score;
        f += full;
    }
    (!rows.is_empty() && f != 0.0).then(|| m / f * 100.0)
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
                percent_of_full: category_percent(&rs),
                cache_tokens: opt_mean(|r| r.cache_tokens),
                achieved_rate: opt_mean(|r| r.achieved_rate),
                compression_ratio: first.compression_ratio,
                n: rs.iter().map(|r| r.n).sum(),
                percent_of_full_ci_low: None,
                percent_of_full_ci_high: None,
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
    /// Percent of full cache, the summary and their intervals, once every run is in.
    fn finish(&mut self) {
        self.missing_full = fill_percent_of_full(&mut self.rows);
        self.summary = summarize(&self.rows);
        self.fill_intervals();
    }

    /// The paired-bootstrap interval of every score row (its subset against the model's full
    /// cache on the same samples) and every summary row (its subsets as strata).
    fn fill_intervals(&mut self) {
        use rayon::prelude::*;
        let mut results: BTreeMap<(&str, &str, String, &str), &SubsetResult> = BTreeMap::new();
        for (run, subsets) in &self.runs {
            for s in subsets {
                results.insert(
                    (&run.model, &run.method, run.budget.label(), s.task.name),
                    s,
                );
            }
        }
        let pairs: Vec<Option<Pairs>> = self
            .rows
            .iter()
            .map(|r| {
                let m = *results.get(&(
                    r.model.as_str(),
                    r.method.as_str(),
                    r.budget.clone(),
                    r.task.as_str(),
                ))?;
                let f = *results.get(&(
                    r.model.as_str(),
                    "full",
                    Budget::Rate(1.0).label(),
                    r.task.as_str(),
                ))?;
                let p = pair_samples(&bucket_samples(m, &r.bucket), &bucket_samples(f, &r.bucket));
                (!p.is_empty()).then_some(p)
            })
            .collect();
        let row_strata: Vec<Option<Vec<Pairs>>> =
            pairs.iter().map(|p| p.clone().map(|p| vec![p])).collect();
        let summary_strata: Vec<Option<Vec<Pairs>>> = self
            .summary
            .iter()
            .map(|s| {
                self.rows
                    .iter()
                    .zip(&pairs)
                    .filter(|(r, _)| {
                        r.model == s.model
                            && r.method == s.method
                            && r.budget == s.budget
                            && r.bucket == s.bucket
                            && (s.category == "all" || r.category == s.category)
                    })
                    .map(|(_, p)| p.clone())
                    .collect()
            })
            .collect();
        let interval = |strata: &Option<Vec<Pairs>>| {
            strata
                .as_ref()
                .and_then(|st| percent_of_full_interval(st, RESAMPLES, SEED))
        };
        let row_ci: Vec<_> = row_strata.par_iter().map(interval).collect();
        let summary_ci: Vec<_> = summary_strata.par_iter().map(interval).collect();
        for (r, ci) in self.rows.iter_mut().zip(row_ci) {
            r.percent_of_full_ci_low = ci.map(|c| c.0);
            r.percent_of_full_ci_high = ci.map(|c| c.1);
        }
        for (r, ci) in self.summary.iter_mut().zip(summary_ci) {
            r.percent_of_full_ci_low = ci.map(|c| c.0);
            r.percent_of_full_ci_high = ci.map(|c| c.1);
        }
    }
}

/// The (id, score) of a subset's samples in one LongBench-E bucket (`""`: a plain subset).
fn bucket_samples<'a>(s: &'a SubsetResult, bucket: &str) -> Vec<(Option<&'a str>, f64)> {
    let want = E_BUCKETS.iter().position(|b| *b == bucket);
    s.per_sample
        .iter()
        .enumerate()
        .filter(|(i, _)| s.sample_buckets.get(*i).copied().flatten() == want)
        .map(|(i, x)| (s.ids.get(i).and_then(|id| id.as_deref()), *x))
        .collect()
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
pub(crate) mod tests;
