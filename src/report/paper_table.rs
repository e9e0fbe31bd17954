//! The KV-Compress paper's fixed-budget table (`paper_fixed_budget.csv`): for a cache budget M
//! and the run at M - block size beside it, each subset's score at both and their mean, and
//! per (model, method, M) the mean over the subsets of each column (row `task` = `all`), as the
//! reference implementation's `experiments/generate_table_data.py` prints its "max-cache",
//! "min-cache" and "average" rows. Scores are LongBench points; LongBench-E buckets are left
//! out. `kvc eval --preset paper-llama-8b --cache-tokens 128,256,512,1024` runs both budgets.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::tables::{write_csv, ReportError, ScoreRow};

/// One row of `paper_fixed_budget.csv`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PaperBudgetRow {
    pub model: String,
    pub method: String,
    /// The budget M in tokens.
    pub budget_tokens: usize,
    /// A subset, or `all` (the mean over the subsets present at both budgets).
    pub task: String,
    /// Score at M (`max-cache`).
    pub score_max: f64,
    /// Score at M - block size (`min-cache`).
    pub score_min: f64,
    /// Their mean (`average`).
    pub score_avg: f64,
}

/// The table from score rows: every (model, method, M) whose runs at M and M - `block_size`
/// both scored a subset.
pub fn paper_fixed_budget(rows: &[ScoreRow], block_size: usize) -> Vec<PaperBudgetRow> {
    let mut at: BTreeMap<(&str, &str, usize, &str), f64> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.bucket.is_empty()) {
        if let Some(t) = r.budget_tokens {
            at.insert((&r.model, &r.method, t, &r.task), r.score);
        }
    }
    let mut out = Vec::new();
    let mut groups: BTreeMap<(&str, &str, usize), Vec<PaperBudgetRow>> = BTreeMap::new();
    for (&(model, method, m, task), &max) in &at {
        let Some(&min) = m
            .checked_sub(block_size)
            .and_then(|lo| at.get(&(model, method, lo, task)))
        else {
            continue;
        };
        groups
            .entry((model, method, m))
            .or_default()
            .push(PaperBudgetRow {
                model: model.into(),
                method: method.into(),
                budget_tokens: m,
                task: task.into(),
                score_max: max,
                score_min: min,
                score_avg: (max + min) / 2.0,
            });
    }
    for ((model, method, m), subsets) in groups {
        let n = subsets.len() as f64;
        let mean = |f: fn(&PaperBudgetRow) -> f64| subsets.iter().map(f).sum::<f64>() / n;
        let all = PaperBudgetRow {
            model: model.into(),
            method: method.into(),
            budget_tokens: m,
            task: "all".into(),
            score_max: mean(|r| r.score_max),
            score_min: mean(|r| r.score_min),
            score_avg: mean(|r| r.score_avg),
        };
        out.extend(subsets);
        out.push(all);
    }
    out
}

/// Write `<dir>/paper_fixed_budget.csv` when the rows hold a budget pair; returns the rows.
pub fn write_paper_fixed_budget(
    dir: &Path,
    rows: &[ScoreRow],
    block_size: usize,
) -> Result<Vec<PaperBudgetRow>, ReportError> {
    let table = paper_fixed_budget(rows, block_size);
    if !table.is_empty() {
        write_csv(&dir.join("paper_fixed_budget.csv"), &table)?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of a token budget (the score table's test row, re-budgeted).
    fn row(method: &str, tokens: usize, task: &str, score: f64) -> ScoreRow {
        ScoreRow {
            budget: format!("tokens{tokens}"),
            rate: None,
            budget_tokens: Some(tokens),
            n: 1,
            ..crate::report::tables::tests::row(method, 1.0, task, "", score)
        }
    }

    #[test]
    fn pairs_m_with_m_minus_a_block_and_averages_like_the_reference() {
        let rows = vec![
            row("kvcompress", 128, "qasper", 30.0),
            row("kvcompress", 112, "qasper", 20.0),
            row("kvcompress", 128, "hotpotqa", 50.0),
            row("kvcompress", 112, "hotpotqa", 40.0),
            // No 240 run: 256 is left out.
            row("kvcompress", 256, "qasper", 33.0),
        ];
        let t = paper_fixed_budget(&rows, 16);
        assert_eq!(t.len(), 3, "{t:?}");
        let q = t.iter().find(|r| r.task == "qasper").unwrap();
        assert_eq!((q.score_max, q.score_min, q.score_avg), (30.0, 20.0, 25.0));
        let all = t.iter().find(|r| r.task == "all").unwrap();
        assert_eq!(all.budget_tokens, 128);
        assert_eq!(
            (all.score_max, all.score_min, all.score_avg),
            (40.0, 30.0, 35.0)
        );
    }
}
