//! The nightly regression gate: compare two `scores.csv` files subset by subset and category by
//! category, and say whether anything dropped by more than a tolerance (in LongBench points).
//!
//! Keys are (model, method, budget, task, bucket) for subsets and (model, method, budget, bucket,
//! category) for category means (computed from the rows present in each file with
//! [`super::scores::summarize`]). A key of the baseline missing from the current file counts as a
//! failure (a gate must not pass because data vanished); keys only in the current file are listed
//! as new.
use std::collections::BTreeMap;

use super::scores::{summarize, ScoreRow};

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

fn keyed(rows: &[ScoreRow]) -> BTreeMap<String, (&'static str, f64)> {
    let mut m = BTreeMap::new();
    let b = |bucket: &str| {
        if bucket.is_empty() {
            String::new()
        } else {
            format!("[{bucket}]")
        }
    };
    for r in rows {
        m.insert(
            format!(
                "{} {} {} {}{}",
                r.model,
                r.method,
                r.budget,
                r.task,
                b(&r.bucket)
            ),
            ("subset", r.score),
        );
    }
    for s in summarize(rows) {
        m.insert(
            format!(
                "{} {} {} {}{}",
                s.model,
                s.method,
                s.budget,
                s.category,
                b(&s.bucket)
            ),
            ("category", s.score),
        );
    }
    m
}

/// Compare `current` against `baseline`; a drop is `baseline - current > tolerance`.
pub fn compare(baseline: &[ScoreRow], current: &[ScoreRow], tolerance: f64) -> Comparison {
    let b = keyed(baseline);
    let c = keyed(current);
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
