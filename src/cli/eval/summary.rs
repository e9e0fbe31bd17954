//! The end of `kvc eval`: score the runs it made or resumed, draw the figures, print the
//! summary (a one-screen table, or JSON with `--json`).
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::progress::Progress;
use super::EvalArgs;
use crate::cli::score::emit_stdout;
use crate::eval::metrics::MetricOptions;
use crate::eval::run::{ratio_from_rate, Observer, RunOutcome, RunPlan};
use crate::eval::scoring::OnError;
use crate::report::plot::{draw_figure, quality_figures};
use crate::report::tables::{self, TreeScores};
use crate::util::Status;

/// Score this command's runs (other directories under `--out` are not this job's), write
/// scores.csv and summary.csv, draw the model's figures, print the summary.
pub fn report(
    args: &EvalArgs,
    lm: &crate::model::LoadedModel,
    device: &Device,
    plans: &[RunPlan],
    outcomes: &[RunOutcome],
    progress: &mut Progress,
    data_warnings: &[String],
) -> anyhow::Result<Status> {
    let mut clock = crate::profile::start(device);
    let out_dir = &args.output.out;
    let run_dirs: Vec<PathBuf> = outcomes.iter().map(|o| o.dir.clone()).collect();
    let t = tables::score_runs(
        out_dir,
        &run_dirs,
        false,
        OnError::Stop,
        &MetricOptions::default(),
    );
    for (dir, why) in &t.unscored {
        progress.warn(&format!("not scored: {}: {why}", dir.display()));
    }
    let scores_path = out_dir.join("scores.csv");
    let summary_path = out_dir.join("summary.csv");
    tables::write_csv(&scores_path, &t.rows)?;
    tables::write_csv(&summary_path, &t.summary)?;
    let plot_dir = out_dir.join("plots");
    let plots = draw_plots(out_dir, &plot_dir, &scores_path, &t, &lm.name)?;
    let n_failed: usize = outcomes.iter().map(|o| o.n_failed).sum();
    let summary: Vec<_> = t
        .summary
        .iter()
        .filter(|s| {
            s.model == lm.name
                && plans
                    .iter()
                    .any(|p| p.method.name == s.method && p.budget.label() == s.budget)
        })
        .cloned()
        .collect();
    let mut out = String::new();
    if args.output.json {
        let v = serde_json::json!({
            "model": lm.name,
            "out": out_dir,
            "runs": outcomes,
            "summary": summary,
            "scores_csv": scores_path,
            "summary_csv": summary_path,
            "plots": plots,
            "n_failed": n_failed,
            "warnings": data_warnings.iter().chain(&progress.warnings).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        write_table(&mut out, &lm.name, outcomes, &summary, plans);
        writeln!(
            out,
            "\nwrote {}, {}{}",
            scores_path.display(),
            summary_path.display(),
            if plots.is_empty() {
                String::new()
            } else {
                format!(", {} plots in {}", plots.len(), plot_dir.display())
            }
        )?;
        if n_failed > 0 {
            writeln!(
                out,
                "{n_failed} samples failed (rows with `error`; scored as written)"
            )?;
        }
    }
    emit_stdout(&out)?;
    crate::profile::mark(device, &mut clock, "eval.score+plots");
    if crate::profile::enabled() {
        eprint!("{}", crate::profile::report());
    }
    Ok(if n_failed > 0 {
        Status::Failed
    } else {
        Status::Ok
    })
}

/// A shard's end: its runs on stdout and what to run once every shard is done (no scores: a
/// shard holds part of each subset).
pub fn shard_done(
    shard: crate::eval::shard::Shard,
    tree: &Path,
    outcomes: &[RunOutcome],
) -> Status {
    let mut out = String::new();
    for o in outcomes {
        let _ = writeln!(
            out,
            "run {}: {} new, {} resumed, {} failed",
            o.run, o.n_new, o.n_resumed, o.n_failed
        );
    }
    let root = tree.parent().and_then(Path::parent).unwrap_or(tree);
    let _ = writeln!(
        out,
        "shard {}/{} done in {}; once all {} shards are: kvc merge {}",
        shard.index,
        shard.count,
        tree.display(),
        shard.count,
        root.display()
    );
    let _ = emit_stdout(&out);
    if outcomes.iter().any(|o| o.n_failed > 0 || o.interrupted) {
        Status::Failed
    } else {
        Status::Ok
    }
}

/// The model's quality figures (when a compressed run exists), RULER depth heat-maps and
/// allocation plots; a figure that cannot be drawn is a warning. Returns the files written.
pub(crate) fn draw_plots(
    out_dir: &Path,
    plot_dir: &Path,
    scores_path: &Path,
    t: &TreeScores,
    model: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut plots = Vec::new();
    let model_rows: Vec<_> = t
        .rows
        .iter()
        .filter(|r| r.model == model)
        .cloned()
        .collect();
    if model_rows.iter().any(|r| r.method != "full") {
        match quality_figures(&model_rows, &t.summary, &scores_path.display().to_string()) {
            Ok(figs) => {
                for (stem, fig) in figs {
                    match draw_figure(&fig, &plot_dir.join(stem)) {
                        Ok(ps) => plots.extend(ps),
                        Err(e) => eprintln!("warning: plot: {e}"),
                    }
                }
            }
            Err(e) => eprintln!("warning: no plots: {e}"),
        }
    }
    let depth_rows: Vec<_> = crate::report::heatmap::write_depth_csv(out_dir, t)?
        .into_iter()
        .filter(|r| r.model == model)
        .collect();
    if !depth_rows.is_empty() {
        match crate::report::heatmap::draw_all(&depth_rows, plot_dir) {
            Ok(ps) => plots.extend(ps),
            Err(e) => eprintln!("warning: RULER depth plot: {e}"),
        }
    }
    crate::report::paper_table::write_paper_fixed_budget(
        out_dir,
        &t.rows,
        crate::kvcache::paged::DEFAULT_BLOCK_SIZE,
    )?;
    let alloc_rows: Vec<_> = crate::report::allocation::write_alloc_csv(out_dir, t)?
        .into_iter()
        .filter(|r| r.model == model)
        .collect();
    if !alloc_rows.is_empty() {
        match crate::report::allocation::draw_all(&alloc_rows, plot_dir) {
            Ok(ps) => plots.extend(ps),
            Err(e) => eprintln!("warning: allocation plot: {e}"),
        }
    }
    Ok(plots)
}

/// A compression ratio with at most 4 decimals, trailing zeros dropped (0.875, 0.5, 0).
pub(crate) fn fmt_ratio(x: f64) -> String {
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A percent-of-full interval as `[lo, hi]` with one decimal.
pub(crate) fn fmt_interval(lo: f64, hi: f64) -> String {
    format!("[{lo:.1}, {hi:.1}]")
}

/// One screen: a row per run; the full-cache run shows LongBench scores, the others percent of
/// the full-cache score (per category and `all`: mean score over the full cache's mean score). LongBench-E subsets are
/// scored per length bucket and left out of this table (see summary.csv).
fn write_table(
    out: &mut String,
    model: &str,
    outcomes: &[RunOutcome],
    summary: &[tables::SummaryRow],
    plans: &[RunPlan],
) {
    let mut cats: Vec<String> = Vec::new();
    for s in summary.iter().filter(|s| s.category != "all") {
        if !cats.contains(&s.category) {
            cats.push(s.category.clone());
        }
    }
    let short = |c: &str| -> String {
        match c {
            "Single-Doc QA" => "SDocQA".into(),
            "Multi-Doc QA" => "MDocQA".into(),
            "Summarization" => "Summ".into(),
            "Few-shot Learning" => "FewShot".into(),
            "Synthetic" => "Synth".into(),
            other => other.chars().take(7).collect(),
        }
    };
    let _ = writeln!(
        out,
        "{model}: full/rate1 in LongBench points, other runs in % of full cache (all: with its 95% paired-bootstrap interval); ratio = kvpress's compression_ratio, 1 - 1/rate"
    );
    // The run column fits the longest label (`snapkv+kvcrush@context-only/tokens1024`).
    let w = plans
        .iter()
        .map(|p| p.label().len())
        .max()
        .unwrap_or(0)
        .max(22);
    let _ = write!(
        out,
        "{:<w$} {:>6} {:>5} {:>6} {:>8} {:>7} {:>14}",
        "run", "ratio", "n", "failed", "achieved", "all", "all 95% CI"
    );
    for c in &cats {
        let _ = write!(out, " {:>7}", short(c));
    }
    let _ = writeln!(out);
    for (p, o) in plans.iter().zip(outcomes) {
        let label = p.budget.label();
        let find = |cat: &str| {
            summary.iter().find(|s| {
                s.method == p.method.name
                    && s.budget == label
                    && s.category == cat
                    && s.bucket.is_empty()
            })
        };
        let cell = |s: Option<&tables::SummaryRow>| match s {
            Some(s) if p.is_full() => format!("{:.2}", s.score),
            Some(s) => s
                .percent_of_full
                .map_or("-".into(), |pc| format!("{pc:.1}%")),
            None => "-".into(),
        };
        let all = find("all");
        let achieved = all
            .and_then(|s| s.achieved_rate)
            .map_or("-".into(), |a| format!("{a:.1}x"));
        let ratio = match p.budget {
            crate::kvcache::budget::Budget::Rate(r) => fmt_ratio(ratio_from_rate(r)),
            crate::kvcache::budget::Budget::Tokens(_) => "-".into(),
        };
        let ci = all
            .filter(|_| !p.is_full())
            .and_then(|s| {
                Some(fmt_interval(
                    s.percent_of_full_ci_low?,
                    s.percent_of_full_ci_high?,
                ))
            })
            .unwrap_or_else(|| "-".into());
        let _ = write!(
            out,
            "{:<w$} {:>6} {:>5} {:>6} {:>8} {:>7} {:>14}",
            p.label(),
            ratio,
            o.n_selected,
            o.n_failed,
            achieved,
            cell(all),
            ci
        );
        for c in &cats {
            let _ = write!(out, " {:>7}", cell(find(c)));
        }
        let _ = writeln!(out);
    }
}
