//! The LongBench quality figures from score rows (see the parent module's list).
use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::compress::CONTEXT_ONLY;
use crate::data::tasks::Category;
use crate::report::tables::{ScoreRow, SummaryRow};

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
/// bucket rows are left out). A category's point is its mean score over the full cache's mean
/// score; a subset whose full-cache score is 0 counts there but has no line of its own in the
/// per-subset figure (the subtitle counts them). `summary` (summary.csv's rows; may be empty)
/// gives the categories' intervals. `data_note` names the data on the figure (e.g. the CSV
/// path).
pub fn quality_figures(
    rows: &[ScoreRow],
    summary: &[SummaryRow],
    data_note: &str,
) -> Result<Vec<(String, Figure)>, PlotError> {
    let rows: Vec<&ScoreRow> = rows.iter().filter(|r| r.bucket.is_empty()).collect();
    let missing: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.full_score.is_none())
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
        let mr = ModelRows::new(model, &rows, summary, data_note);
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

/// 100 × Σ score / Σ full-cache score of `rows` (the summary's category percentage); `None`
/// when the full cache's sum is 0 or a value is missing.
fn ratio_of_means(rows: &[&ScoreRow]) -> Option<f64> {
    let (mut m, mut f) = (0.0, 0.0);
    for r in rows {
        m += r.score;
        f += r.full_score?;
    }
    (f != 0.0 && f.is_finite() && m.is_finite()).then(|| 100.0 * (m / f))
}

/// One model's plotted rows and what its quality figures share.
struct ModelRows<'a> {
    model: &'a str,
    rows: Vec<&'a ScoreRow>,
    /// The model's summary rows (for the categories' intervals).
    summary: Vec<&'a SummaryRow>,
    /// The model's methods, by name; a method's colour is its position here.
    methods: BTreeSet<&'a str>,
    /// "LongBench score", or "score" when every subset is a RULER one.
    bench: &'static str,
    /// Model, data (subsets counted, those with a full-cache score of 0 named) and the data
    /// note.
    subtitle: String,
}

/// Which protocols the figure's methods ran under (`<method>@context-only`: the question read
/// after the compression; the others: the question in the compressed prompt).
fn protocol_note(methods: &BTreeSet<&str>) -> &'static str {
    let compressed = methods.iter().filter(|m| **m != "full");
    let agnostic = compressed
        .clone()
        .filter(|m| m.ends_with(CONTEXT_ONLY))
        .count();
    match (agnostic, compressed.count() - agnostic) {
        (0, _) => "question in the prompt (LongBench)",
        (_, 0) => "question after compression (question-agnostic)",
        _ => "question in the prompt; @context-only: after compression",
    }
}

impl<'a> ModelRows<'a> {
    /// `model`'s rows of `rows` and of `summary`.
    fn new(
        model: &'a str,
        rows: &[&'a ScoreRow],
        summary: &'a [SummaryRow],
        data_note: &str,
    ) -> Self {
        let mrows: Vec<&ScoreRow> = rows.iter().copied().filter(|r| r.model == model).collect();
        let n_zero = mrows
            .iter()
            .filter(|r| r.full_score == Some(0.0))
            .map(|r| r.task.as_str())
            .collect::<BTreeSet<_>>()
            .len();
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
            format!(" ({n_zero} with full-cache score 0: in category means only)")
        } else {
            String::new()
        };
        let methods: BTreeSet<&str> = mrows.iter().map(|r| r.method.as_str()).collect();
        let subtitle = format!(
            "model: {model}  |  data: {data}{zero_note}  |  {}  |  bars: 95% paired bootstrap  |  source: {data_note}",
            protocol_note(&methods)
        );
        ModelRows {
            model,
            rows: mrows,
            summary: summary
                .iter()
                .filter(|s| s.model == model && s.bucket.is_empty())
                .collect(),
            methods,
            bench,
            subtitle,
        }
    }

    /// Samples per run in a category (`all`: every subset): the full cache's count, else the
    /// largest run's.
    fn n_of(&self, cat: &str) -> usize {
        let mut per_run: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for r in self
            .rows
            .iter()
            .filter(|r| cat == "all" || r.category == cat)
        {
            *per_run
                .entry((r.method.as_str(), r.budget.as_str()))
                .or_default() += r.n;
        }
        per_run
            .get(&("full", "rate1"))
            .copied()
            .unwrap_or_else(|| per_run.values().copied().max().unwrap_or(0))
    }

    /// summary.csv's interval of (method, budget, category), as an error bar at `x`.
    fn summary_bar(
        &self,
        method: &str,
        budget: &str,
        cat: &str,
        x: f64,
    ) -> Option<(f64, f64, f64)> {
        let s = self
            .summary
            .iter()
            .find(|s| s.method == method && s.budget == budget && s.category == cat)?;
        Some((x, s.percent_of_full_ci_low?, s.percent_of_full_ci_high?))
    }

    /// One panel per category (and `all`, titled with its samples per run) with a line per
    /// method: its subsets' mean score over the full cache's at each x that `xof` gives (rows
    /// without an x are skipped), sorted by x; with `bars`, summary.csv's interval where the
    /// point is one run. Methods and panels without points are left out.
    fn category_series(&self, xof: &dyn Fn(&ScoreRow) -> Option<f64>, bars: bool) -> Vec<Panel> {
        category_panels()
            .into_iter()
            .map(|cat| {
                let series = self
                    .methods
                    .iter()
                    .filter_map(|m| {
                        let mut by_x: BTreeMap<u64, (f64, Vec<&ScoreRow>)> = BTreeMap::new();
                        for r in self
                            .rows
                            .iter()
                            .filter(|r| r.method == *m && (cat == "all" || r.category == cat))
                        {
                            if let Some(x) = xof(r) {
                                by_x.entry(x.to_bits()).or_insert((x, Vec::new())).1.push(r);
                            }
                        }
                        let mut points = Vec::new();
                        let mut bar = Vec::new();
                        for (x, rs) in by_x.into_values() {
                            let Some(y) = ratio_of_means(&rs) else {
                                continue;
                            };
                            points.push((x, y));
                            let budgets: BTreeSet<&str> =
                                rs.iter().map(|r| r.budget.as_str()).collect();
                            if let (true, [b]) =
                                (bars, budgets.into_iter().collect::<Vec<_>>().as_slice())
                            {
                                bar.extend(self.summary_bar(m, b, &cat, x));
                            }
                        }
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let color = self.methods.iter().position(|x| x == m);
                        (!points.is_empty()).then(|| Series {
                            name: m.to_string(),
                            color,
                            points,
                            dashed: false,
                            bars: bar,
                        })
                    })
                    .collect();
                Panel {
                    title: format!("{cat} (n={})", self.n_of(&cat)),
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
            .category_series(&|r: &ScoreRow| r.rate, true)
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
                x_label: "compression rate (log2); kvpress compression_ratio = 1 - 1/rate".into(),
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
        let by_cache = self.category_series(&cache_x, false);
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
                    .filter_map(|t| {
                        let of_task: Vec<&ScoreRow> = self
                            .rows
                            .iter()
                            .copied()
                            .filter(|r| r.method == method && r.task == t)
                            .collect();
                        let mut points: Vec<(f64, f64)> = of_task
                            .iter()
                            .filter_map(|r| Some((r.rate?, r.percent_of_full?)))
                            .collect();
                        // A full-cache score of 0: no percentage, no line (the subtitle says).
                        if points.is_empty() {
                            return None;
                        }
                        let bars = of_task
                            .iter()
                            .filter_map(|r| {
                                Some((
                                    r.rate?,
                                    r.percent_of_full_ci_low?,
                                    r.percent_of_full_ci_high?,
                                ))
                            })
                            .collect();
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        anchor_at_full(&mut points);
                        let n = of_task.iter().map(|r| r.n).max().unwrap_or(0);
                        Some(Series {
                            name: format!("{t} (n={n})"),
                            color: None,
                            points,
                            dashed: false,
                            bars,
                        })
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
                x_label: "compression rate (log2); kvpress compression_ratio = 1 - 1/rate".into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, rate: f64, task: &str, score: f64, full: f64) -> ScoreRow {
        ScoreRow {
            model: "m".into(),
            method: method.into(),
            budget: format!("rate{rate}"),
            rate: Some(rate),
            budget_tokens: None,
            task: task.into(),
            category: "Synthetic-RULER".into(),
            language: "en".into(),
            metric: "Match All".into(),
            bucket: String::new(),
            n: 10,
            n_failed: 0,
            score,
            full_score: Some(full),
            percent_of_full: (full != 0.0).then(|| score / full * 100.0),
            cache_tokens: None,
            achieved_rate: None,
            prompt_tokens: None,
            fuzz_backend: "difflib".into(),
            compression_ratio: Some(1.0 - 1.0 / rate),
            percent_of_full_ci_low: (full != 0.0).then_some(10.0),
            percent_of_full_ci_high: (full != 0.0).then_some(70.0),
        }
    }

    #[test]
    fn categories_are_ratios_of_means_with_bars_and_n() {
        // niah 100 -> 50 at 8x, vt 0 -> 20 at 8x: the category is (50 + 20) / (100 + 0) = 70 %,
        // vt has no line of its own.
        let rows = vec![
            row("full", 1.0, "ruler_niah_single_1_1024", 100.0, 100.0),
            row("full", 1.0, "ruler_vt_1024", 0.0, 0.0),
            row("kv", 8.0, "ruler_niah_single_1_1024", 50.0, 100.0),
            row("kv", 8.0, "ruler_vt_1024", 20.0, 0.0),
        ];
        let summary = vec![SummaryRow {
            model: "m".into(),
            method: "kv".into(),
            budget: "rate8".into(),
            rate: Some(8.0),
            budget_tokens: None,
            bucket: String::new(),
            category: "Synthetic-RULER".into(),
            n_tasks: 2,
            score: 35.0,
            percent_of_full: Some(70.0),
            cache_tokens: None,
            achieved_rate: None,
            compression_ratio: Some(0.875),
            n: 20,
            percent_of_full_ci_low: Some(40.0),
            percent_of_full_ci_high: Some(90.0),
        }];
        let figs = quality_figures(&rows, &summary, "test").unwrap();
        let (_, by_rate) = figs
            .iter()
            .find(|(n, _)| n.ends_with("categories_by_rate"))
            .unwrap();
        let panel = &by_rate.panels[0];
        assert_eq!(panel.title, "Synthetic-RULER (n=20)");
        let kv = panel.series.iter().find(|s| s.name == "kv").unwrap();
        assert_eq!(kv.points, [(1.0, 100.0), (8.0, 70.0)]);
        assert_eq!(kv.bars, [(8.0, 40.0, 90.0)]);
        assert!(by_rate.subtitle.contains("1 with full-cache score 0"));
        assert!(by_rate
            .subtitle
            .contains("question in the prompt (LongBench)"));
        let set = |m: &[&'static str]| m.iter().copied().collect::<BTreeSet<&str>>();
        assert_eq!(
            protocol_note(&set(&["full", "snapkv@context-only"])),
            "question after compression (question-agnostic)"
        );
        assert!(protocol_note(&set(&["snapkv", "snapkv@context-only"]))
            .contains("; @context-only: after"));
        let (_, sub) = figs
            .iter()
            .find(|(n, _)| n.ends_with("kv__subtasks_by_rate"))
            .unwrap();
        let names: Vec<&str> = sub.panels[0]
            .series
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["ruler_niah_single_1_1024 (n=10)"]);
        assert_eq!(sub.panels[0].series[0].bars, [(8.0, 10.0, 70.0)]);
        // Without summary.csv the categories have no bars, and the figures are still drawn.
        let figs = quality_figures(&rows, &[], "test").unwrap();
        assert!(figs[0].1.panels[0].series.iter().all(|s| s.bars.is_empty()));
    }
}
