//! `kvc plot`: the paper's quality figures from a `scores.csv`.
use std::path::PathBuf;

use std::fmt::Write as _;

use clap::Args;

use crate::report::plot::{draw_figure, quality_figures};
use crate::report::tables::{read_csv, ScoreRow, SummaryRow};
use crate::util::Status;

use super::score::emit_stdout;

#[derive(Args, Debug)]
#[command(
    about = "Plot percent of full-cache score vs compression rate and cache size (PNG + SVG)",
    long_about = "Plot the KV-Compress paper's quality figures from a scores.csv written by `kvc score <results tree>`:

  <model>__categories_by_rate     % of full-cache score vs compression rate (log2, 1x..64x), one
                                  panel per category and `all`, one line per method (equal rate)
  <model>__categories_by_cache    the same vs KV cache tokens (token-budget runs, or rate runs that
                                  record cache_tokens), one line per method (equal cache size)
  <model>__<method>__subtasks_by_rate   one panel per category, one line per subset

  <model>__<method>__<budget>__ruler_depth   RULER NIAH accuracy by needle depth x length
                                  (from ruler_depth.csv beside the scores.csv, when present)
  <model>__<method>__<budget>__allocation    KVs kept per layer x kv-head after prefill, as a
                                  share of the mean head (from allocation.csv, written by
                                  `kvc score` when the rows come from `kvc eval --dump-allocation`)

A category's point is its subsets' mean score over the full cache's mean score (as summary.csv).
The figures by rate draw 95 % paired-bootstrap intervals as error bars (subsets: scores.csv's
percent_of_full_ci_low/high; categories: summary.csv's, read from beside the CSV when present)
and give the samples per run (n=) in panel titles or legends.

Each figure is written as .png and .svg. Every row needs a full-cache baseline (method full,
budget rate1) for its model and subset; the error names the ones missing.

Example:
  kvc score results/ && kvc plot results/scores.csv --out results/plots"
)]
pub struct PlotArgs {
    /// scores.csv written by `kvc score`.
    pub scores: PathBuf,
    /// Output directory (default: a `plots/` directory beside the CSV).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only this model (default: every model in the CSV).
    #[arg(long)]
    pub model: Option<String>,
    /// No list of written files on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Run `kvc plot`.
pub fn run(args: PlotArgs) -> anyhow::Result<Status> {
    let mut out = String::new();
    let mut rows: Vec<ScoreRow> = read_csv(&args.scores)?;
    if let Some(m) = &args.model {
        rows.retain(|r| &r.model == m);
        anyhow::ensure!(
            !rows.is_empty(),
            "no rows for model `{m}` in {}",
            args.scores.display()
        );
    }
    let out_dir = args.out.clone().unwrap_or_else(|| {
        args.scores
            .parent()
            .map(|p| p.join("plots"))
            .unwrap_or_else(|| PathBuf::from("plots"))
    });
    let note = args.scores.display().to_string();
    // The categories' intervals, when `kvc score` wrote summary.csv beside the CSV.
    let summary_csv = args.scores.with_file_name("summary.csv");
    let summary: Vec<SummaryRow> = if summary_csv.is_file() {
        read_csv(&summary_csv)?
    } else {
        Vec::new()
    };
    for (stem, fig) in quality_figures(&rows, &summary, &note)? {
        for p in draw_figure(&fig, &out_dir.join(stem))? {
            if !args.quiet {
                eprintln!("wrote {}", p.display());
            }
            let _ = writeln!(out, "{}", p.display());
        }
    }
    // RULER depth x length heat-maps, when `kvc score` wrote ruler_depth.csv beside the CSV.
    let depth_csv = args.scores.with_file_name("ruler_depth.csv");
    if depth_csv.is_file() {
        let mut rows: Vec<crate::report::heatmap::DepthRow> = read_csv(&depth_csv)?;
        if let Some(m) = &args.model {
            rows.retain(|r| &r.model == m);
        }
        for p in crate::report::heatmap::draw_all(&rows, &out_dir)? {
            if !args.quiet {
                eprintln!("wrote {}", p.display());
            }
            let _ = writeln!(out, "{}", p.display());
        }
    }
    // Per-head allocation heat-maps, when `kvc score` wrote allocation.csv beside the CSV.
    let alloc_csv = args.scores.with_file_name("allocation.csv");
    if alloc_csv.is_file() {
        let mut rows: Vec<crate::report::allocation::AllocRow> = read_csv(&alloc_csv)?;
        if let Some(m) = &args.model {
            rows.retain(|r| &r.model == m);
        }
        for p in crate::report::allocation::draw_all(&rows, &out_dir)? {
            if !args.quiet {
                eprintln!("wrote {}", p.display());
            }
            let _ = writeln!(out, "{}", p.display());
        }
    }
    emit_stdout(&out)?;
    Ok(Status::Ok)
}
