//! The nightly regression gate: compare two `scores.csv` files subset by subset and category by
//! category, and say whether anything dropped by more than a tolerance (in LongBench points).
//!
//! Keys are (model, method, budget, task, bucket) for subsets and (model, method, budget, bucket,
//! category) for category means (computed with [`super::tables::summarize`] over the subsets
//! present in both files, so adding or dropping a subset does not move a category mean). A key of the baseline missing from the current file counts as a
//! failure (a gate must not pass because data vanished); keys only in the current file are listed
//! as new.
//!
//! Beside the gate (which stays in LongBench points), each key says whether the change is beyond
//! the 95 % paired-bootstrap interval of percent of full cache: either run's percent of full lies
//! outside the other run's interval (scores.csv's columns for subsets, summary.csv's beside the
//! CSV for categories). A file written before those columns has no interval; the other side's is
//! then used alone.
use std::collections::{BTreeMap, BTreeSet};

use super::tables::{summarize, ScoreRow, SummaryRow};

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
    /// Percent of full cache with its 95 % paired-bootstrap interval, on each side.
    pub baseline_pof: Option<Pof>,
    pub current_pof: Option<Pof>,
    /// Whether the change is beyond the interval: either side's percent of full lies outside
    /// the other side's interval. `None` when neither side has an interval (e.g. a baseline
    /// written before the interval columns, compared with a summary-less category).
    pub beyond_interval: Option<bool>,
}

/// Percent of full cache and its 95 % interval (low, high) where known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pof {
    pub value: f64,
    pub ci: Option<(f64, f64)>,
}

impl Pof {
    fn of(value: Option<f64>, lo: Option<f64>, hi: Option<f64>) -> Option<Pof> {
        Some(Pof {
            value: value?,
            ci: lo.zip(hi),
        })
    }
}

/// Either side's percent of full outside the other's interval; `None` without an interval.
fn beyond(b: Option<Pof>, c: Option<Pof>) -> Option<bool> {
    let (b, c) = (b?, c?);
    let outside = |p: f64, ci: Option<(f64, f64)>| ci.map(|(lo, hi)| p < lo || p > hi);
    match (outside(c.value, b.ci), outside(b.value, c.ci)) {
        (None, None) => None,
        (x, y) => Some(x.unwrap_or(false) || y.unwrap_or(false)),
    }
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
        let pof = |p: Option<Pof>| match p {
            Some(Pof {
                value,
                ci: Some((lo, hi)),
            }) => format!("{value:.1} [{lo:.1}, {hi:.1}]"),
            Some(Pof { value, ci: None }) => format!("{value:.1}"),
            None => "-".to_string(),
        };
        let mut s = format!(
            "{:<w$}  {:<8}  {:>9}  {:>9}  {:>8}  {:>20}  {:>20}  {:>6}  status\n",
            "key",
            "kind",
            "baseline",
            "current",
            "delta",
            "base %full [95% CI]",
            "cur %full [95% CI]",
            "beyond"
        );
        for d in &self.diffs {
            let delta = match (d.baseline, d.current) {
                (Some(b), Some(c)) if b.is_finite() && c.is_finite() => format!("{:+.2}", c - b),
                _ => "-".to_string(),
            };
            s += &format!(
                "{:<w$}  {:<8}  {:>9}  {:>9}  {:>8}  {:>20}  {:>20}  {:>6}  {}\n",
                d.key,
                d.kind,
                f(d.baseline),
                f(d.current),
                delta,
                pof(d.baseline_pof),
                pof(d.current_pof),
                match d.beyond_interval {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                },
                d.status.label()
            );
        }
        let count = |st: DiffStatus| self.diffs.iter().filter(|d| d.status == st).count();
        let beyond = self
            .diffs
            .iter()
            .filter(|d| d.beyond_interval == Some(true))
            .count();
        let judged = self
            .diffs
            .iter()
            .filter(|d| d.beyond_interval.is_some())
            .count();
        s += &format!(
            "{} compared, {} dropped by more than {} points, {} missing; {} of {} with an interval changed beyond it (percent of full outside the other run's 95% paired-bootstrap interval; not part of the gate)\n",
            self.diffs.len(),
            count(DiffStatus::Drop),
            self.tolerance,
            count(DiffStatus::Missing),
            beyond,
            judged
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

/// One side of a key: kind, score, percent of full with its interval.
type Entry = (&'static str, f64, Option<Pof>);

/// Subset keys of all rows; category keys from the rows whose subset is in `common` only, so a
/// subset added or removed on one side does not move the category means. A category's interval
/// comes from `summary` (that file's summary.csv) when its row covers the same subsets and
/// samples.
fn keyed(
    rows: &[ScoreRow],
    summary: &[SummaryRow],
    common: &BTreeSet<String>,
) -> BTreeMap<String, Entry> {
    let mut m = BTreeMap::new();
    for r in rows {
        m.insert(
            subset_key(r),
            (
                "subset",
                r.score,
                Pof::of(
                    r.percent_of_full,
                    r.percent_of_full_ci_low,
                    r.percent_of_full_ci_high,
                ),
            ),
        );
    }
    let shared: Vec<ScoreRow> = rows
        .iter()
        .filter(|r| common.contains(&subset_key(r)))
        .cloned()
        .collect();
    for s in summarize(&shared) {
        let ci = summary
            .iter()
            .find(|x| {
                x.model == s.model
                    && x.method == s.method
                    && x.budget == s.budget
                    && x.bucket == s.bucket
                    && x.category == s.category
                    && x.n_tasks == s.n_tasks
                    && x.n == s.n
            })
            .and_then(|x| x.percent_of_full_ci_low.zip(x.percent_of_full_ci_high));
        m.insert(
            format!(
                "{} {} {} {}{}",
                s.model,
                s.method,
                s.budget,
                s.category,
                bucket_suffix(&s.bucket)
            ),
            (
                "category",
                s.score,
                s.percent_of_full.map(|value| Pof { value, ci }),
            ),
        );
    }
    m
}

/// Compare `current` against `baseline`; a drop is `baseline - current > tolerance`. The
/// summaries (each file's summary.csv; may be empty) give the categories' intervals.
pub fn compare(
    baseline: &[ScoreRow],
    current: &[ScoreRow],
    baseline_summary: &[SummaryRow],
    current_summary: &[SummaryRow],
    tolerance: f64,
) -> Comparison {
    let in_base: BTreeSet<String> = baseline.iter().map(subset_key).collect();
    let common: BTreeSet<String> = current
        .iter()
        .map(subset_key)
        .filter(|k| in_base.contains(k))
        .collect();
    let b = keyed(baseline, baseline_summary, &common);
    let c = keyed(current, current_summary, &common);
    let mut diffs = Vec::new();
    for (key, (kind, bv, bp)) in &b {
        let d = match c.get(key) {
            None => Diff {
                key: key.clone(),
                kind,
                baseline: Some(*bv),
                current: None,
                status: DiffStatus::Missing,
                baseline_pof: *bp,
                current_pof: None,
                beyond_interval: None,
            },
            Some((_, cv, cp)) => {
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
                    baseline_pof: *bp,
                    current_pof: *cp,
                    beyond_interval: beyond(*bp, *cp),
                }
            }
        };
        diffs.push(d);
    }
    for (key, (kind, cv, cp)) in &c {
        if !b.contains_key(key) {
            diffs.push(Diff {
                key: key.clone(),
                kind,
                baseline: None,
                current: Some(*cv),
                status: DiffStatus::New,
                baseline_pof: None,
                current_pof: *cp,
                beyond_interval: None,
            });
        }
    }
    Comparison { tolerance, diffs }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables' fixture row at rate 8.
    fn row(method: &str, task: &str, category: &str, score: f64) -> ScoreRow {
        crate::report::tables::tests::row(method, 8.0, task, category, score)
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
        let c = compare(&base, &cur, &[], &[], 1.0);
        assert!(c.failed());
        let drops: Vec<&str> = c
            .diffs
            .iter()
            .filter(|d| d.status == DiffStatus::Drop)
            .map(|d| d.key.as_str())
            .collect();
        assert_eq!(drops, ["m kv rate8 hotpotqa"]);
        assert!(!compare(&base, &cur, &[], &[], 1.5).failed());
        // Improvements never fail.
        assert!(!compare(&cur, &base, &[], &[], 0.0).failed());
    }

    #[test]
    fn missing_keys_fail_new_keys_do_not() {
        let base = vec![row("kv", "hotpotqa", "Multi-Doc QA", 40.0)];
        let cur = vec![
            row("kv", "hotpotqa", "Multi-Doc QA", 40.0),
            row("kv", "trec", "Few-shot Learning", 10.0),
        ];
        let c = compare(&base, &cur, &[], &[], 0.0);
        assert!(!c.failed());
        assert!(c
            .diffs
            .iter()
            .any(|d| d.status == DiffStatus::New && d.key.ends_with("trec")));
        let c = compare(&cur, &base, &[], &[], 0.0);
        assert!(c.failed());
        assert!(c
            .diffs
            .iter()
            .any(|d| d.status == DiffStatus::Missing && d.key.ends_with("trec")));
    }

    #[test]
    fn says_whether_a_change_is_beyond_the_interval() {
        let with = |score: f64, pof: f64, ci: Option<(f64, f64)>| {
            let mut r = row("kv", "hotpotqa", "Multi-Doc QA", score);
            r.percent_of_full = Some(pof);
            r.full_score = Some(40.0);
            r.percent_of_full_ci_low = ci.map(|c| c.0);
            r.percent_of_full_ci_high = ci.map(|c| c.1);
            r
        };
        let subset = |c: &Comparison| {
            c.diffs
                .iter()
                .find(|d| d.kind == "subset")
                .unwrap()
                .beyond_interval
        };
        let base = [with(30.0, 75.0, Some((60.0, 90.0)))];
        // 75 % -> 70 %: inside [60, 90] and 75 inside the current [55, 85].
        let c = compare(
            &base,
            &[with(28.0, 70.0, Some((55.0, 85.0)))],
            &[],
            &[],
            10.0,
        );
        assert_eq!(subset(&c), Some(false));
        assert!(
            c.table().contains("0 of 1 with an interval"),
            "{}",
            c.table()
        );
        // 75 % -> 50 %: outside the baseline's interval (the gate at 10 points passes anyway).
        let c = compare(
            &base,
            &[with(20.0, 50.0, Some((35.0, 65.0)))],
            &[],
            &[],
            10.0,
        );
        assert_eq!(subset(&c), Some(true));
        assert!(!c.failed());
        // A baseline without the columns: the current interval alone decides.
        let old = [with(30.0, 75.0, None)];
        let c = compare(
            &old,
            &[with(20.0, 50.0, Some((35.0, 65.0)))],
            &[],
            &[],
            10.0,
        );
        assert_eq!(subset(&c), Some(true));
        let c = compare(&old, &[with(20.0, 50.0, None)], &[], &[], 10.0);
        assert_eq!(subset(&c), None);
        // Categories take summary.csv's interval when it covers the same subsets and samples.
        let cur = [with(20.0, 50.0, None)];
        let mut summary = crate::report::tables::summarize(&cur);
        for s in &mut summary {
            s.percent_of_full_ci_low = Some(35.0);
            s.percent_of_full_ci_high = Some(65.0);
        }
        let c = compare(&old, &cur, &[], &summary, 10.0);
        let cat = c
            .diffs
            .iter()
            .find(|d| d.key.ends_with("Multi-Doc QA"))
            .unwrap();
        assert_eq!(cat.current_pof.unwrap().ci, Some((35.0, 65.0)));
        assert_eq!(cat.beyond_interval, Some(true));
        for s in &mut summary {
            s.n += 1; // another set of samples: not this category's interval
        }
        let c = compare(&old, &cur, &[], &summary, 10.0);
        assert!(c
            .diffs
            .iter()
            .all(|d| d.kind == "subset" || d.beyond_interval.is_none()));
    }

    #[test]
    fn nan_buckets_compare_equal() {
        let mut a = row("kv", "hotpotqa_e", "Multi-Doc QA", f64::NAN);
        a.bucket = "8k+".into();
        assert!(!compare(&[a.clone()], &[a.clone()], &[], &[], 0.0).failed());
        let mut b = a.clone();
        b.score = 10.0;
        // A bucket that had a score and now has none fails.
        assert!(compare(&[b], &[a], &[], &[], 0.0).failed());
    }
}
