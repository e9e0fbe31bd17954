//! Per-sample and per-subset scoring exactly as LongBench's `eval.py`, and reading a directory of
//! `<subset>.jsonl` prediction files into LongBench's `result.json`.
//!
//! Follows eval.py: for trec, triviaqa, samsum, lsht the prediction is first cut to
//! `pred.lstrip('\n').split('\n')[0]`; the sample score is the max of the metric over the
//! answers, starting from 0; the subset score is `round(100 * total / n, 2)` with a sequential
//! f64 sum in file order and Python's `round`; all samples of a file use the LAST line's
//! `all_classes` (eval.py overwrites it on every line). LongBench-E buckets by the dataset's
//! `length` (`< 4000`, `< 8000`, else `8k+`) and rounds `100 * np.mean(bucket)` with numpy's
//! pairwise sum and numpy's round; an empty bucket is NaN (written as the bare `NaN` eval.py's
//! `json.dump` writes).
//!
//! Departures, all where eval.py crashes or is silent: an empty file, a row without `length` in an
//! `_e` subset (eval.py's `zip` silently drops samples) and an unknown subset name are errors
//! naming the file and line; malformed JSON lines are reported by file and line and either stop
//! the run or are skipped and counted ([`OnError`]). Result keys follow the task table order
//! instead of `os.listdir` order.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::metrics::{metric_score, MetricError, MetricOptions};
use super::record::PredRecord;
use crate::data::tasks::{self, Task, TaskError};

/// What to do with a line that is not a valid prediction record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Stop with an error naming the file and line (default).
    #[default]
    Stop,
    /// Skip the line, report it on stderr, count it, and finish with exit code 1.
    Skip,
}

/// Errors while scoring prediction files. Each names the file (and line) to fix.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}:{line}: not a prediction record: {source} (use --on-error skip to skip such lines)"
    )]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: the file name does not name a LongBench subset: {source}")]
    UnknownTask {
        path: PathBuf,
        #[source]
        source: TaskError,
    },
    #[error("{path}: no prediction records (eval.py would divide by zero); an interrupted run can leave one: resume the run or delete the file")]
    Empty { path: PathBuf },
    #[error("{path}:{line}: {source}")]
    Metric {
        path: PathBuf,
        line: usize,
        #[source]
        source: MetricError,
    },
    #[error(
        "{path}:{line}: LongBench-E subset row has no `length`, which the length buckets need"
    )]
    MissingLength { path: PathBuf, line: usize },
    #[error("{dir}: no `<subset>.jsonl` prediction files found")]
    NoPredFiles { dir: PathBuf },
}

/// A line skipped under [`OnError::Skip`].
#[derive(Debug, Clone)]
pub struct BadLine {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

/// The records of one pred file with their 1-based line numbers, and the lines skipped.
#[derive(Debug, Clone, Default)]
pub struct PredFile {
    pub records: Vec<(usize, PredRecord)>,
    pub skipped: Vec<BadLine>,
}

/// Read a `<subset>.jsonl` file. A blank line is malformed (as in eval.py's `json.loads`).
pub fn read_pred_file(path: &Path, on_error: OnError) -> Result<PredFile, ScoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = PredFile::default();
    for (i, line) in text.lines().enumerate() {
        match PredRecord::from_json_line(line) {
            Ok(r) => out.records.push((i + 1, r)),
            Err(source) => match on_error {
                OnError::Stop => {
                    return Err(ScoreError::Json {
                        path: path.to_path_buf(),
                        line: i + 1,
                        source,
                    })
                }
                OnError::Skip => out.skipped.push(BadLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: source.to_string(),
                }),
            },
        }
    }
    Ok(out)
}

/// The text eval.py scores for `task`: the first line for trec, triviaqa, samsum, lsht.
pub fn scored_prediction<'a>(task: &Task, pred: &'a str) -> &'a str {
    if task.first_line_only {
        pred.trim_start_matches('\n')
            .split('\n')
            .next()
            .unwrap_or("")
    } else {
        pred
    }
}

/// One sample's score: max over `answers` of the task's metric (0 with no answers); for RULER's
/// `string_match_all` / `string_match_part`, the metric over the whole list.
pub fn sample_score(
    task: &Task,
    pred: &str,
    answers: &[String],
    all_classes: Option<&[String]>,
    opts: &MetricOptions,
) -> Result<f64, MetricError> {
    let p = scored_prediction(task, pred);
    match task.metric {
        // RULER scores the reference list as a whole, not max over references.
        tasks::Metric::StringMatchAll => {
            return Ok(super::metrics::ruler::string_match_all(p, answers))
        }
        tasks::Metric::StringMatchPart => {
            return Ok(super::metrics::ruler::string_match_part(p, answers))
        }
        _ => {}
    }
    let mut score = 0.0f64;
    for gt in answers {
        let s = metric_score(task.metric, p, gt, all_classes, opts)?;
        if s > score {
            score = s;
        }
    }
    Ok(score)
}

/// Python's `round(x, 2)` on a float: correctly rounded, half-to-even only on exact ties.
pub fn python_round2(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    // Rust's fixed-precision formatting rounds the exact binary value correctly (ties to even),
    // which is what CPython's round() does via its own dtoa; `(x*100).round()/100` would not.
    format!("{x:.2}").parse().unwrap_or(x)
}

/// numpy's `np.round(x, 2)` for float64: `rint(x * 100) / 100`.
pub fn numpy_round2(x: f64) -> f64 {
    (x * 100.0).round_ties_even() / 100.0
}

/// numpy's pairwise summation (`np.add.reduce` on a contiguous float64 array).
pub fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut r = 0.0;
        for &x in a {
            r += x;
        }
        r
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

/// `np.mean` of float64 values (NaN when empty, as numpy).
pub fn numpy_mean(a: &[f64]) -> f64 {
    numpy_sum(a) / a.len() as f64
}

/// LongBench-E length buckets, in result.json order.
pub const E_BUCKETS: [&str; 3] = ["0-4k", "4-8k", "8k+"];

/// The bucket index of a dataset `length`.
pub fn e_bucket(length: u64) -> usize {
    if length < 4000 {
        0
    } else if length < 8000 {
        1
    } else {
        2
    }
}

/// A subset's official score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SubsetScore {
    /// `round(100 * total / n, 2)`.
    Plain(f64),
    /// LongBench-E: per bucket `round(100 * np.mean, 2)` (numpy round), NaN for an empty bucket.
    Buckets([f64; 3]),
}

/// Everything scoring one pred file yields.
#[derive(Debug, Clone)]
pub struct SubsetResult {
    pub task: &'static Task,
    /// Scored samples.
    pub n: usize,
    /// Samples whose record has `error` set (scored as written).
    pub n_failed: usize,
    /// Samples per LongBench-E bucket (all in bucket 0 for a plain subset: unused).
    pub bucket_n: [usize; 3],
    pub score: SubsetScore,
    /// Per-sample scores in file order (0..1).
    pub per_sample: Vec<f64>,
    /// Per-sample `_id` (`None` where the row has none, e.g. LongBench's own pred files),
    /// aligned with `per_sample`: what paired comparisons match on.
    pub ids: Vec<Option<String>>,
    /// Per-sample LongBench-E bucket index into [`E_BUCKETS`] (`None` for a plain subset),
    /// aligned with `per_sample`.
    pub sample_buckets: Vec<Option<usize>>,
    /// Per-sample needle depth (RULER NIAH rows; `None` elsewhere), aligned with `per_sample`.
    pub depths: Vec<Option<f64>>,
    /// Per-sample KVs kept per (layer, kv-head) after prefill compression (`--dump-allocation`
    /// rows; `None` elsewhere), aligned with `per_sample`.
    pub allocations: Vec<Option<Vec<Vec<usize>>>>,
    /// Means of the run fields over the records that have them.
    pub mean_cache_tokens: Option<f64>,
    pub mean_achieved_rate: Option<f64>,
    pub mean_prompt_tokens: Option<f64>,
}

fn mean_of(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = xs.flatten().collect();
    if v.is_empty() {
        None
    } else {
        Some(v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// Score the records of one subset file. `longbench_e` selects bucketed scoring (eval.py
/// `--e`); records carry their 1-based line numbers for error messages.
pub fn score_records(
    task: &'static Task,
    records: &[(usize, PredRecord)],
    longbench_e: bool,
    path: &Path,
    opts: &MetricOptions,
) -> Result<SubsetResult, ScoreError> {
    if records.is_empty() {
        return Err(ScoreError::Empty {
            path: path.to_path_buf(),
        });
    }
    // eval.py: `all_classes = data["all_classes"]` on every line -> the last line's wins.
    let all_classes = records.last().and_then(|(_, r)| r.all_classes.as_deref());
    let mut per_sample = Vec::with_capacity(records.len());
    let mut buckets: [Vec<f64>; 3] = Default::default();
    let mut sample_buckets = Vec::with_capacity(records.len());
    let mut total = 0.0f64;
    for (line, r) in records {
        let s = sample_score(task, &r.pred, &r.answers, all_classes, opts).map_err(|source| {
            ScoreError::Metric {
                path: path.to_path_buf(),
                line: *line,
                source,
            }
        })?;
        if longbench_e {
            let len = r.length.ok_or_else(|| ScoreError::MissingLength {
                path: path.to_path_buf(),
                line: *line,
            })?;
            buckets[e_bucket(len)].push(s);
            sample_buckets.push(Some(e_bucket(len)));
        } else {
            sample_buckets.push(None);
        }
        total += s;
        per_sample.push(s);
    }
    let n = records.len();
    let score = if longbench_e {
        SubsetScore::Buckets([0, 1, 2].map(|b| numpy_round2(100.0 * numpy_mean(&buckets[b]))))
    } else {
        SubsetScore::Plain(python_round2(100.0 * total / n as f64))
    };
    Ok(SubsetResult {
        task,
        n,
        n_failed: records.iter().filter(|(_, r)| r.error.is_some()).count(),
        bucket_n: [buckets[0].len(), buckets[1].len(), buckets[2].len()],
        score,
        per_sample,
        ids: records.iter().map(|(_, r)| r.id.clone()).collect(),
        sample_buckets,
        depths: records.iter().map(|(_, r)| r.depth).collect(),
        allocations: records
            .iter()
            .map(|(_, r)| r.kept_per_head.clone())
            .collect(),
        mean_cache_tokens: mean_of(
            records
                .iter()
                .map(|(_, r)| r.cache_tokens.map(|x| x as f64)),
        ),
        mean_achieved_rate: mean_of(records.iter().map(|(_, r)| r.achieved_rate)),
        mean_prompt_tokens: mean_of(
            records
                .iter()
                .map(|(_, r)| r.prompt_tokens.map(|x| x as f64)),
        ),
    })
}

/// Scores of one directory of pred files.
#[derive(Debug, Clone, Default)]
pub struct DirScores {
    pub subsets: Vec<SubsetResult>,
    pub skipped: Vec<BadLine>,
}

impl DirScores {
    /// Samples that failed or lines that were skipped: `kvc score` then exits 1.
    pub fn has_failures(&self) -> bool {
        !self.skipped.is_empty() || self.subsets.iter().any(|s| s.n_failed > 0)
    }
}

/// The subset a pred file holds: eval.py's `filename.split('.')[0]`; with `force_e` (eval.py
/// `--e`, where LongBench-E files carry the base name) the `_e` task of that name.
pub fn task_for_file(path: &Path, force_e: bool) -> Result<(&'static Task, bool), ScoreError> {
    let fname = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = fname.split('.').next().unwrap_or("");
    let lookup = |name: &str| {
        tasks::task(name).map_err(|source| ScoreError::UnknownTask {
            path: path.to_path_buf(),
            source,
        })
    };
    if force_e && !stem.ends_with("_e") {
        let t = lookup(&format!("{stem}_e"))?;
        return Ok((t, true));
    }
    let t = lookup(stem)?;
    Ok((t, t.longbench_e))
}

/// The `*.jsonl` files of a directory (eval.py: names ending in "jsonl"), sorted by task table
/// order then name.
pub fn pred_files(dir: &Path) -> Result<Vec<PathBuf>, ScoreError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ScoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for e in rd {
        let e = e.map_err(|source| ScoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = e.path();
        if p.is_file()
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("jsonl"))
        {
            files.push(p);
        }
    }
    let order = |p: &PathBuf| {
        let f = p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = f.split('.').next().unwrap_or("").to_string();
        (
            tasks::all_tasks()
                .position(|t| t.name == stem)
                .unwrap_or(usize::MAX),
            f,
        )
    };
    files.sort_by_key(order);
    Ok(files)
}

/// Score every `<subset>.jsonl` in `dir` (eval.py on `pred/<model>/`).
pub fn score_pred_dir(
    dir: &Path,
    force_e: bool,
    on_error: OnError,
    opts: &MetricOptions,
) -> Result<DirScores, ScoreError> {
    let files = pred_files(dir)?;
    if files.is_empty() {
        return Err(ScoreError::NoPredFiles {
            dir: dir.to_path_buf(),
        });
    }
    let mut out = DirScores::default();
    for f in files {
        let (task, e) = task_for_file(&f, force_e)?;
        let pf = read_pred_file(&f, on_error)?;
        out.skipped.extend(pf.skipped);
        out.subsets
            .push(score_records(task, &pf.records, e, &f, opts)?);
    }
    Ok(out)
}

/// A float as Python's `json.dump` writes it (`repr`): `NaN`, `100.0`, `23.45`.
pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else if x == x.trunc() && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// LongBench's `result.json` text (`json.dump(scores, f, ensure_ascii=False, indent=4)`).
pub fn result_json(subsets: &[SubsetResult]) -> String {
    let mut map: BTreeMap<usize, String> = BTreeMap::new();
    for (i, s) in subsets.iter().enumerate() {
        let key = serde_json::to_string(s.task.name).unwrap_or_default();
        let val = match s.score {
            SubsetScore::Plain(x) => py_float(x),
            SubsetScore::Buckets(b) => format!(
                "{{\n        \"0-4k\": {},\n        \"4-8k\": {},\n        \"8k+\": {}\n    }}",
                py_float(b[0]),
                py_float(b[1]),
                py_float(b[2])
            ),
        };
        map.insert(i, format!("    {key}: {val}"));
    }
    if map.is_empty() {
        return "{}".to_string();
    }
    format!(
        "{{\n{}\n}}",
        map.into_values().collect::<Vec<_>>().join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_and_numpy_rounding_differ_from_rust_round() {
        assert_eq!(python_round2(3.125), 3.12);
        assert_eq!(python_round2(2.675), 2.67); // the double is below 2.675
        assert_eq!(numpy_round2(73.745), 73.74);
        assert_eq!(python_round2(73.745), 73.75);
    }

    #[test]
    fn numpy_sum_is_pairwise() {
        let a: Vec<f64> = (0..300)
            .map(|i| (i as f64 * 0.1).sin().abs() / 3.0)
            .collect();
        let seq: f64 = a.iter().sum();
        // Same value to 1e-12 but computed in a different order.
        assert!((numpy_sum(&a) - seq).abs() < 1e-9);
        assert!(numpy_mean(&[]).is_nan());
    }

    #[test]
    fn first_line_rule() {
        let t = tasks::task("samsum").unwrap();
        assert_eq!(scored_prediction(t, "\n\n a\r\nb"), " a\r");
        let t = tasks::task("qmsum").unwrap();
        assert_eq!(scored_prediction(t, "\na\nb"), "\na\nb");
    }

    #[test]
    fn result_json_shape() {
        assert_eq!(py_float(f64::NAN), "NaN");
        assert_eq!(py_float(100.0), "100.0");
        assert_eq!(py_float(23.45), "23.45");
    }
}
