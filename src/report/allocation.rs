//! KV-Compress's variable per-head allocation, from the `kept_per_head` that `kvc eval
//! --dump-allocation` records in every compressed prediction row: `allocation.csv` (mean KVs
//! kept and mean share of the budget per run × subset × layer × kv-head) and a layer × kv-head
//! heat-map per model × method × budget (the paper's picture of which heads keep more).
//!
//! Share = KVs a head kept / the mean over all heads of the same sample, so 1.0 is a uniform
//! split (what SnapKV gives every head) and the shares of one sample average to 1.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::heatmap::{draw_heatmap, HeatCells, HeatFigure};
use super::plot::PlotError;
use super::tables::{Budget, ReportError, TreeScores};

/// One row of `allocation.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocRow {
    pub model: String,
    pub method: String,
    pub budget: String,
    pub rate: Option<f64>,
    pub task: String,
    pub layer: usize,
    pub kv_head: usize,
    /// Samples with an allocation.
    pub n: usize,
    /// Mean KVs kept by this head after prefill compression.
    pub kept: f64,
    /// Mean share of the sample's mean head (1 = uniform).
    pub share: f64,
}

/// Per-head shares of one sample's allocation (`kept[layer][kv_head]`); `None` when it keeps
/// nothing at all or its rows are ragged.
pub fn shares(kept: &[Vec<usize>]) -> Option<Vec<Vec<f64>>> {
    let heads = kept.first()?.len();
    if heads == 0 || kept.iter().any(|l| l.len() != heads) {
        return None;
    }
    let total: usize = kept.iter().flatten().sum();
    if total == 0 {
        return None;
    }
    let mean = total as f64 / (kept.len() * heads) as f64;
    Some(
        kept.iter()
            .map(|l| l.iter().map(|&k| k as f64 / mean).collect())
            .collect(),
    )
}

/// Rows of every subset whose prediction rows record an allocation.
pub fn alloc_rows(t: &TreeScores) -> Vec<AllocRow> {
    let mut out = Vec::new();
    for (run, subsets) in &t.runs {
        for s in subsets {
            // (layer, head) -> (sum kept, sum share, n)
            let mut acc: BTreeMap<(usize, usize), (f64, f64, usize)> = BTreeMap::new();
            for kept in s.allocations.iter().flatten() {
                let Some(sh) = shares(kept) else { continue };
                for (l, (kl, sl)) in kept.iter().zip(&sh).enumerate() {
                    for (h, (&k, &x)) in kl.iter().zip(sl).enumerate() {
                        let e = acc.entry((l, h)).or_insert((0.0, 0.0, 0));
                        e.0 += k as f64;
                        e.1 += x;
                        e.2 += 1;
                    }
                }
            }
            for ((layer, kv_head), (k, x, n)) in acc {
                out.push(AllocRow {
                    model: run.model.clone(),
                    method: run.method.clone(),
                    budget: run.budget.label(),
                    rate: match run.budget {
                        Budget::Rate(r) => Some(r),
                        Budget::Tokens(_) => None,
                    },
                    task: s.task.name.to_string(),
                    layer,
                    kv_head,
                    n,
                    kept: k / n as f64,
                    share: x / n as f64,
                });
            }
        }
    }
    out
}

/// One figure per model × method × budget: `<model>__<method>__<budget>__allocation`, a panel
/// per subset and (with several) `all` (sample-weighted mean share).
pub fn alloc_figures(rows: &[AllocRow]) -> Vec<(String, HeatFigure)> {
    let mut runs: Vec<(String, String, String)> = Vec::new();
    for r in rows {
        let k = (r.model.clone(), r.method.clone(), r.budget.clone());
        if !runs.contains(&k) {
            runs.push(k);
        }
    }
    let mut out = Vec::new();
    for (model, method, budget) in runs {
        let mine: Vec<&AllocRow> = rows
            .iter()
            .filter(|r| r.model == model && r.method == method && r.budget == budget)
            .collect();
        let mut tasks: Vec<&str> = Vec::new();
        for r in &mine {
            if !tasks.contains(&r.task.as_str()) {
                tasks.push(&r.task);
            }
        }
        let mut panels = Vec::new();
        let mut all: BTreeMap<(usize, i64), (f64, usize)> = BTreeMap::new();
        for t in &tasks {
            let mut cells = HeatCells::new();
            for r in mine.iter().filter(|r| r.task == *t) {
                let k = (r.kv_head, r.layer as i64);
                cells.insert(k, r.share);
                let e = all.entry(k).or_insert((0.0, 0));
                e.0 += r.share * r.n as f64;
                e.1 += r.n;
            }
            panels.push((t.to_string(), cells));
        }
        if tasks.len() > 1 {
            let cells = all
                .into_iter()
                .map(|(k, (s, n))| (k, s / n as f64))
                .collect();
            panels.push(("all".to_string(), cells));
        }
        let hi = panels
            .iter()
            .flat_map(|(_, c)| c.values().copied())
            .fold(2.0f64, f64::max);
        out.push((
            format!("{}__{method}__{budget}__allocation", model.replace('/', "_")),
            HeatFigure {
                title: format!(
                    "{model} {method} {budget}: KVs kept per head after prefill / mean head (1 = uniform; red 0, green {hi:.1})"
                ),
                panels,
                x_desc: "kv-head".into(),
                y_desc: "layer".into(),
                x_label: |h| h.to_string(),
                y_label: |l| l.to_string(),
                scale: (0.0, hi),
                decimals: 1,
            },
        ));
    }
    out
}

/// Write `allocation.csv` into `dir` when the tree records allocations; returns the rows
/// (empty: nothing written).
pub fn write_alloc_csv(dir: &Path, t: &TreeScores) -> Result<Vec<AllocRow>, ReportError> {
    let rows = alloc_rows(t);
    if !rows.is_empty() {
        super::tables::write_csv(&dir.join("allocation.csv"), &rows)?;
    }
    Ok(rows)
}

/// Draw every allocation heat-map of `rows` into `out_dir`; returns the files written.
pub fn draw_all(rows: &[AllocRow], out_dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut files = Vec::new();
    for (stem, fig) in alloc_figures(rows) {
        files.extend(draw_heatmap(&fig, &out_dir.join(stem))?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_average_to_one_and_reject_ragged_or_empty() {
        let s = shares(&[vec![10, 30], vec![0, 40]]).unwrap();
        assert_eq!(s, vec![vec![0.5, 1.5], vec![0.0, 2.0]]);
        let mean: f64 = s.iter().flatten().sum::<f64>() / 4.0;
        assert!((mean - 1.0).abs() < 1e-12);
        assert_eq!(shares(&[vec![1, 2], vec![3]]), None);
        assert_eq!(shares(&[vec![0, 0]]), None);
        assert_eq!(shares(&[]), None);
    }

    fn row(task: &str, layer: usize, head: usize, n: usize, share: f64) -> AllocRow {
        AllocRow {
            model: "m".into(),
            method: "kvcompress".into(),
            budget: "rate8".into(),
            rate: Some(8.0),
            task: task.into(),
            layer,
            kv_head: head,
            n,
            kept: share * 10.0,
            share,
        }
    }

    #[test]
    fn figures_weight_all_by_samples_and_draw() {
        let rows = vec![
            row("a", 0, 0, 1, 2.0),
            row("a", 0, 1, 1, 0.0),
            row("b", 0, 0, 3, 1.0),
            row("b", 0, 1, 3, 1.0),
        ];
        let figs = alloc_figures(&rows);
        assert_eq!(figs.len(), 1);
        assert_eq!(figs[0].0, "m__kvcompress__rate8__allocation");
        let panels = &figs[0].1.panels;
        assert_eq!(panels.len(), 3);
        assert_eq!(panels[2].0, "all");
        assert_eq!(panels[2].1[&(0, 0)], (2.0 + 3.0) / 4.0);
        assert_eq!(panels[2].1[&(1, 0)], 3.0 / 4.0);
        let tmp = tempfile::tempdir().unwrap();
        let files = draw_all(&rows, tmp.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files
            .iter()
            .all(|f| std::fs::metadata(f).unwrap().len() > 1000));
    }
}
