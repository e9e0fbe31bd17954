//! The nightly regression gate: compare two `scores.csv` files subset by subset and category by
//! category, and say whether anything dropped by more than a tolerance (in LongBench points).
//!
//! Keys are (model, method, budget, task, bucket) for subsets and (model, method, budget, bucket,
//! category) for category means (computed with [`super::tables::summarize`] over the subsets
//! present in both files, so adding or dropping a subset does not move a category mean). A key of the baseline missing from the current file counts as a
//! failure (a gate must not pass because data vanished); keys only in the current file are listed
//! as new.
use std::collections::{BTreeMap, BTreeSet};

use super::tables::{summarize, ScoreRow};

/// One compared key.
#[derive(Debug, Clone, PartialEq)]
pub struct Diff {
    /// `model method budget task[bucket]` or `model method budget category[bucket]`.
    pub key: String,
    /// `subset` or `category`.
    pub kind: &'static str,
    pub baseline: Option<f64>,
    pub current: Option<f64>,
    pub status: DiffStatus,
}

/// Outcome for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffStatus {
    Ok,
    /// Dropped by more than the tolerance.
    Drop,
    /// In the baseline, not in the current file.
    Missing,
    /// Only in the current file.
    New,
}

impl DiffStatus {
    pub fn label(self) -> &'static str {
        match self {
            DiffStatus::Ok => "ok",
            DiffStatus::Drop => "DROP",
            DiffStatus::Missing => "MISSING",
            DiffStatus::New => "new",
        }
    }
}

/// The comparison of two scores files.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub tolerance: f64,
    pub diffs: Vec<Diff>,
}

impl Comparison {
    /// True when some subset or category dropped beyond the tolerance or went missing.
    pub fn failed(&self) -> bool {
        self.diffs
            .iter()
            .any(|d| matches!(d.status, DiffStatus::Drop | DiffStatus::Missing))
    }

    /// A fixed-width text table, widest key first column.
    pub fn table(&self) -> String {
        let w = self
            .diffs
            .iter()
            .map(|d| d.key.len())
            .max()
            .unwrap_or(3)
            .max(3);
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        let mut s = format!(
            "{:<w$}  {:<8}  {:>9}  {:>9}  {:>8}  status\n",
            "key", "kind", "baseline", "current", "delta"
        );
        for d in &self.diffs {
            let delta = match (d.baseline, d.current) {
                (Some(b), Some(c)) if b.is_finite() && c.is_finite() => format!("{:+.2}", c - b),
                _ => "-".to_string(),
            };
            s += &format!(
                "{:<w$}  {:<8}  {:>9}  {:>9}  {:>8}  {}\n",
                d.key,
                d.kind,
                f(d.baseline),
                f(d.current),
                delta,
                d.status.label()
            );
        }
        let drops = self
            .diffs
            .iter()
            .filter(|d| d.status == DiffStatus::Drop)
            .count();
        let missing = self
            .diffs
            .iter()
            .filter(|d| d.status == DiffStatus::Missing)
            .count();
        s += &format!(
            "{} compared, {} dropped by more than {} points, {} missing\n",
            self.diffs.len(),
            drops,
            self.tolerance,
            missing
        );
        s
    }
}

fn bucket_suffix(bucket: &str) -> String {
    if bucket.is_empty() {
        String::new()
    } else {
        format!("[{bucket}]")
    }
}

fn subset_key(r: &ScoreRow) -> String {
    format!(
        "{} {} {} {}{}",
        r.model,
        r.method,
        r.budget,
        r.task,
        bucket_suffix(&r.bucket)
    )
}

/// Subset keys of all rows; category keys from the rows whose subset is in `common` only, so a
/// subset added or removed on one side does not move the category means.
fn keyed(rows: &[ScoreRow], common: &BTreeSet<String>) -> BTreeMap<String, (&'static str, f64)> {
    let mut m = BTreeMap::new();
    for r in rows {
        m.insert(subset_key(r), ("subset", r.score));
    }
    let shared: Vec<ScoreRow> = rows
        .iter()
        .filter(|r| common.contains(&subset_key(r)))
        .cloned()
        .collect();
    for s in summarize(&shared) {
        m.insert(
            format!(
                "{} {} {} {}{}",
                s.model,
                s.method,
                s.budget,
                s.category,
                bucket_suffix(&s.bucket)
            ),
            ("category", s.score),
        );
    }
    m
}

/// Compare `current` against `baseline`; a drop is `baseline - current > tolerance`.
pub fn compare(baseline: &[ScoreRow], current: &[ScoreRow], tolerance: f64) -> Comparison {
    let in_base: BTreeSet<String> = baseline.iter().map(subset_key).collect();
    let common: BTreeSet<String> = current
        .iter()
        .map(subset_key)
        .filter(|k| in_base.contains(k))
        .collect();
    let b = keyed(baseline, &common);
    let c = keyed(current, &common);
    let mut diffs = Vec::new();
    for (key, (kind, bv)) in &b {
        let d = match c.get(key) {
            None => Diff {
                key: key.clone(),
                kind,
                baseline: Some(*bv),
                current: None,
                status: DiffStatus::Missing,
            },
            Some((_, cv)) => {
                // NaN (an empty LongBench-E bucket) on both sides is equal; NaN on one side only
                // means samples vanished or appeared in that bucket: a baseline score now NaN fails.
                let status = if bv.is_nan() && cv.is_nan() {
                    DiffStatus::Ok
                } else if cv.is_nan() {
                    DiffStatus::Missing
                } else if bv.is_finite() && bv - cv > tolerance {
                    DiffStatus::Drop
                } else {
                    DiffStatus::Ok
                };
                Diff {
                    key: key.clone(),
                    kind,
                    baseline: Some(*bv),
                    current: Some(*cv),
                    status,
                }
            }
        };
        diffs.push(d);
    }
    for (key, (kind, cv)) in &c {
        if !b.contains_key(key) {
            diffs.push(Diff {
                key: key.clone(),
                kind,
                baseline: None,
                current: Some(*cv),
                status: DiffStatus::New,
            });
        }
    }
    Comparison { tolerance, diffs }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, task: &str, category: &str, score: f64) -> ScoreRow {
        ScoreRow {
            model: "m".into(),
            method: method.into(),
            budget: "rate8".into(),
            rate: Some(8.0),
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
            compression_ratio: None,
            percent_of_full_ci_low: None,
            percent_of_full_ci_high: None,
        }
    }

    #[test]
    fn drop_beyond_tolerance_fails_and_within_passes() {
        let base = vec![
            row("kv", "hotpotqa", "Multi-Doc QA", 40.0),
            row("kv", "musique", "Multi-Doc QA", 20.0),
        ];
        let cur = vec![
            row("kv", "hotpotqa", "Multi-Doc QA", 38.5),
            row("kv", "musique", "Multi-Doc QA", 20.0),
        ];
        // hotpotqa -1.5, category mean -0.75.
        let c = compare(&base, &cur, 1.0);
        assert!(c.failed());
        let drops: Vec<&str> = c
            .diffs
            .iter()
            .filter(|d| d.status == DiffStatus::Drop)
            .map(|d| d.key.as_str())
            .collect();
        assert_eq!(drops, ["m kv rate8 hotpotqa"]);
        assert!(!compare(&base, &cur, 1.5).failed());
        // Improvements never fail.
        assert!(!compare(&cur, &base, 0.0).failed());
    }

    #[test]
    fn missing_keys_fail_new_keys_do_not() {
        let base = vec![row("kv", "hotpotqa", "Multi-Doc QA", 40.0)];
        let cur = vec![
            row("kv", "hotpotqa", "Multi-Doc QA", 40.0),
            row("kv", "trec", "Few-shot Learning", 10.0),
        ];
        let c = compare(&base, &cur, 0.0);
        assert!(!c.failed());
        assert!(c
            .diffs
            .iter()
            .any(|d| d.status == DiffStatus::New && d.key.ends_with("trec")));
        let c = compare(&cur, &base, 0.0);
        assert!(c.failed());
        assert!(c
            .diffs
            .iter()
            .any(|d| d.status == DiffStatus::Missing && d.key.ends_with("trec")));
    }

    #[test]
    fn nan_buckets_compare_equal() {
        let mut a = row("kv", "hotpotqa_e", "Multi-Doc QA", f64::NAN);
        a.bucket = "8k+".into();
        assert!(!compare(&[a.clone()], &[a.clone()], 0.0).failed());
        let mut b = a.clone();
        b.score = 10.0;
        // A bucket that had a score and now has none fails.
        assert!(compare(&[b], &[a], 0.0).failed());
    }
}
