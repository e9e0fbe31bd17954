//! The LongBench quality figures from score rows (see the parent module's list).
use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::data::tasks::Category;
use crate::report::tables::ScoreRow;

fn category_panels() -> Vec<String> {
    Category::ALL
        .iter()
        .map(|c| c.name().to_string())
        .chain(["all".to_string()])
        .collect()
}

/// Start a percent-of-full vs rate line at (1x, 100 %) when it has no rate-1 point.
fn anchor_at_full(points: &mut Vec<(f64, f64)>) {
    if !points.iter().any(|p| p.0 == 1.0) {
        points.insert(0, (1.0, 100.0));
    }
}

/// The paper's quality figures for every model of `rows` (LongBench subsets only; LongBench-E
/// bucket rows are left out, and so are subsets whose full-cache score is 0: no percentage of
/// it exists — the figure's subtitle counts them). `data_note` names the data on the figure
/// (e.g. the CSV path).
pub fn quality_figures(
    rows: &[ScoreRow],
    data_note: &str,
) -> Result<Vec<(String, Figure)>, PlotError> {
    let zero_full: BTreeSet<(&str, &str)> = rows
        .iter()
        .filter(|r| r.full_score == Some(0.0))
        .map(|r| (r.model.as_str(), r.task.as_str()))
        .collect();
    let rows: Vec<&ScoreRow> = rows
        .iter()
        .filter(|r| r.bucket.is_empty())
        .filter(|r| !zero_full.contains(&(r.model.as_str(), r.task.as_str())))
        .collect();
    let missing: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.percent_of_full.is_none())
        .map(|r| format!("{}/{}", r.model, r.task))
        .collect();
    if !missing.is_empty() {
        return Err(PlotError::Empty(format!(
            "percent of full cache is missing for {} (score a tree that has a `full/rate1` run for each model)",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let models: BTreeSet<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    let mut figs = Vec::new();
    for model in models {
        let n_zero = zero_full.iter().filter(|(m, _)| *m == model).count();
        let mr = ModelRows::new(model, &rows, n_zero, data_note);
        figs.extend(mr.by_rate_figure());
        figs.extend(mr.by_cache_figure());
        for method in mr.methods.iter().filter(|m| **m != "full") {
            figs.extend(mr.subtasks_figure(method));
        }
    }
    if figs.is_empty() {
        return Err(PlotError::Empty(
            "no rows with a rate or a cache size".into(),
        ));
    }
    Ok(figs)
}

/// One model's plotted rows and what its quality figures share.
struct ModelRows<'a> {
    model: &'a str,
    rows: Vec<&'a ScoreRow>,
    /// The model's methods, by name; a method's colour is its position here.
    methods: BTreeSet<&'a str>,
    /// "LongBench score", or "score" when every subset is a RULER one.
    bench: &'static str,
    /// Model, data (subsets counted, `n_zero` left out) and the data note.
    subtitle: String,
}

impl<'a> ModelRows<'a> {
    /// `model`'s rows of `rows`; `n_zero` of its subsets were left out for a full-cache score
    /// of 0.
    fn new(model: &'a str, rows: &[&'a ScoreRow], n_zero: usize, data_note: &str) -> Self {
        let mrows: Vec<&ScoreRow> = rows.iter().copied().filter(|r| r.model == model).collect();
        let n_tasks = mrows
            .iter()
            .map(|r| r.task.as_str())
            .collect::<BTreeSet<_>>()
            .len();
        let n_ruler = mrows
            .iter()
            .map(|r| r.task.as_str())
            .filter(|t| t.starts_with("ruler_"))
            .collect::<BTreeSet<_>>()
            .len();
        let data = match (n_tasks - n_ruler, n_ruler) {
            (_, 0) => format!("LongBench v1, {n_tasks} subsets"),
            (0, n) => format!("RULER-style synthetic suite, {n} task x length subsets"),
            (lb, n) => format!("LongBench v1, {lb} subsets + RULER-style, {n} subsets"),
        };
        let bench = if n_ruler == n_tasks {
            "score"
        } else {
            "LongBench score"
        };
        let zero_note = if n_zero > 0 {
            format!(" (+{n_zero} left out: full-cache score 0)")
        } else {
            String::new()
        };
        let subtitle =
            format!("model: {model}  |  data: {data}{zero_note}  |  source: {data_note}");
        let methods: BTreeSet<&str> = mrows.iter().map(|r| r.method.as_str()).collect();
        ModelRows {
            model,
            rows: mrows,
            methods,
            bench,
            subtitle,
        }
    }

    /// One panel per category (and `all`) with a line per method: the mean percentage of its
    /// subsets at each x that `xof` gives (rows without an x are skipped), sorted by x.
    /// Methods and panels without points are left out.
    fn category_series(&self, xof: &dyn Fn(&ScoreRow) -> Option<f64>) -> Vec<Panel> {
        category_panels()
            .into_iter()
            .map(|cat| {
                let series = self
                    .methods
                    .iter()
                    .filter_map(|m| {
                        let mut by_x: BTreeMap<u64, (f64, Vec<f64>)> = BTreeMap::new();
                        for r in self
                            .rows
                            .iter()
                            .filter(|r| r.method == *m && (cat == "all" || r.category == cat))
                        {
                            if let (Some(x), Some(p)) = (xof(r), r.percent_of_full) {
                                by_x.entry(x.to_bits()).or_insert((x, Vec::new())).1.push(p);
                            }
                        }
                        let mut points: Vec<(f64, f64)> =
                            by_x.into_values().map(|(x, ps)| (x, mean(&ps))).collect();
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let color = self.methods.iter().position(|x| x == m);
                        (!points.is_empty()).then(|| Series {
                            name: m.to_string(),
                            color,
                            points,
                            dashed: false,
                        })
                    })
                    .collect();
                Panel {
                    title: cat.clone(),
                    series,
                    note: None,
                }
            })
            .filter(|p: &Panel| !p.series.is_empty())
            .collect()
    }

    /// `categories_by_rate`, methods at equal rate: every method starts at the full-cache
    /// point (1x, 100 %), which is what rate 1 means (kvc's invariant: rate 1 ==
    /// uncompressed); `full` itself is that point and is not drawn as a separate line. `None`
    /// when no method has a rate.
    fn by_rate_figure(&self) -> Option<(String, Figure)> {
        let by_rate: Vec<Panel> = self
            .category_series(&|r: &ScoreRow| r.rate)
            .into_iter()
            .map(|mut p| {
                p.series.retain(|s| s.name != "full");
                for s in &mut p.series {
                    anchor_at_full(&mut s.points);
                }
                p
            })
            .filter(|p| !p.series.is_empty())
            .collect();
        if by_rate.is_empty() {
            return None;
        }
        Some((
            format!("{}__categories_by_rate", safe(self.model)),
            Figure {
                title: format!(
                    "Percent of full-cache {} vs compression rate (methods at equal rate)",
                    self.bench
                ),
                subtitle: self.subtitle.clone(),
                x_label: "compression rate (log2)".into(),
                y_label: "% of full-cache score".into(),
                x_log2: (0, 6),
                x_unit: "x".into(),
                y_ref: Some(100.0),
                // Curves start at 100 % at 1x and fall with the rate (sometimes to 0 at
                // high rates): the lower left is the corner they leave empty.
                legend: LegendAt::LowerLeft,
                panels: by_rate,
            },
        ))
    }

    /// `categories_by_cache`, methods at equal cache size: x is a run's token budget, else its
    /// mean kept tokens; the axis spans every such x. `None` when no row has one.
    fn by_cache_figure(&self) -> Option<(String, Figure)> {
        let cache_x = |r: &ScoreRow| {
            r.budget_tokens
                .map(|t| t as f64)
                .or(r.cache_tokens)
                .filter(|x| *x > 0.0)
        };
        let by_cache = self.category_series(&cache_x);
        if by_cache.is_empty() {
            return None;
        }
        let xs: Vec<f64> = self.rows.iter().filter_map(|r| cache_x(r)).collect();
        Some((
            format!("{}__categories_by_cache", safe(self.model)),
            Figure {
                title: format!(
                    "Percent of full-cache {} vs KV cache size (methods at equal cache size)",
                    self.bench
                ),
                subtitle: self.subtitle.clone(),
                x_label: "KV cache tokens per sequence (log2)".into(),
                y_label: "% of full-cache score".into(),
                x_log2: log2_range(&xs),
                x_unit: String::new(),
                y_ref: Some(100.0),
                // LongBench curves rarely fall below half of full at any cache size.
                legend: LegendAt::LowerLeft,
                panels: by_cache,
            },
        ))
    }

    /// `<method>__subtasks_by_rate`: one panel per category, one line per subset that has a
    /// rate run of `method` (task table order, then any others by name), each anchored at
    /// (1x, 100 %). `None` when `method` has no rate run.
    fn subtasks_figure(&self, method: &str) -> Option<(String, Figure)> {
        let panels: Vec<Panel> = Category::ALL
            .iter()
            .map(|c| {
                let present: BTreeSet<&str> = self
                    .rows
                    .iter()
                    .filter(|r| r.category == c.name() && r.method == method && r.rate.is_some())
                    .map(|r| r.task.as_str())
                    .collect();
                // Task table order (as LongBench lists them), then any others by name.
                let mut tasks: Vec<&str> = crate::data::tasks::all_tasks()
                    .map(|t| t.name)
                    .filter(|t| present.contains(t))
                    .collect();
                let known: BTreeSet<&str> = tasks.iter().copied().collect();
                tasks.extend(present.iter().copied().filter(|t| !known.contains(t)));
                let series = tasks
                    .into_iter()
                    .map(|t| {
                        let mut points: Vec<(f64, f64)> = self
                            .rows
                            .iter()
                            .filter(|r| r.method == method && r.task == t)
                            .filter_map(|r| Some((r.rate?, r.percent_of_full?)))
                            .collect();
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        anchor_at_full(&mut points);
                        Series {
                            name: t.to_string(),
                            color: None,
                            points,
                            dashed: false,
                        }
                    })
                    .collect();
                Panel {
                    title: c.name().to_string(),
                    series,
                    note: None,
                }
            })
            .filter(|p: &Panel| !p.series.is_empty())
            .collect();
        if panels.is_empty() {
            return None;
        }
        Some((
            format!("{}__{}__subtasks_by_rate", safe(self.model), safe(method)),
            Figure {
                title: format!(
                    "{method}: percent of full-cache score per subset vs compression rate"
                ),
                subtitle: self.subtitle.clone(),
                x_label: "compression rate (log2)".into(),
                y_label: "% of full-cache score".into(),
                x_log2: (0, 6),
                x_unit: "x".into(),
                y_ref: Some(100.0),
                legend: LegendAt::LowerLeft,
                panels,
            },
        ))
    }
}
