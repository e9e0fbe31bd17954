//! `kvc score`: score saved predictions exactly as LongBench's eval.py, without a model.
use std::path::{Path, PathBuf};

use anyhow::Context;
use std::fmt::Write as _;

use clap::{Args, ValueEnum};

use crate::eval::metrics::{FuzzBackend, MetricOptions, RecursionLimit};
use crate::eval::scoring::{self, BadLine, OnError, SubsetScore};
use crate::report::tables::{self, SummaryRow};
use crate::util::{write_atomic, Status};

#[derive(Args, Debug)]
#[command(
    about = "Score LongBench predictions exactly as the official eval.py",
    long_about = "Score LongBench predictions exactly as the official eval.py (same metrics, first-line rule, max over answers, rounding, LongBench-E buckets).

DIR is either
  * a directory of <subset>.jsonl prediction files (LongBench's own pred/<model>/ works as is):
    writes DIR/result.json, {subset: score} or for LongBench-E {subset: {\"0-4k\", \"4-8k\", \"8k+\"}};
  * a results tree results/<model>/<method>/<budget>/preds/<subset>.jsonl with an optional
    run.json beside preds/ (model, method, rate or budget_tokens; otherwise taken from the path;
    <budget> is rate<r> like rate8 or tokens<n> like tokens512): writes result.json per run, and
    DIR/scores.csv (one row per run and subset, with percent of the full-cache score) and
    DIR/summary.csv (per run and category, and `all`; a category's percent of full is its mean
    score over the full cache's mean score). The full-cache baseline is method `full`, budget
    rate1. Both CSVs give the rate in both notations (rate = prompt KVs / kept KVs;
    compression_ratio = 1 - 1/rate, kvpress's fraction of KVs removed), n, and a 95% paired
    bootstrap interval of percent of full (percent_of_full_ci_low/high: samples paired with the
    full cache by _id, each subset resampled on its own, 10,000 resamples, fixed seed).

Exit codes: 0 ok; 1 finished, but some samples carry an `error` or malformed lines were skipped;
2 error (unreadable file, malformed line with --on-error stop, unknown subset, empty file).

Examples:
  kvc score pred/llama3.1-8b/                 # LongBench pred dir -> result.json
  kvc score --e pred_e/llama3.1-8b/           # LongBench-E files named by base subset
  kvc score results/                          # a sweep -> scores.csv, summary.csv
  kvc score results/ --on-error skip --json   # machine-readable rows on stdout"
)]
pub struct ScoreArgs {
    /// A directory of <subset>.jsonl pred files, or a results tree.
    pub dir: PathBuf,
    /// Score every file as LongBench-E (eval.py --e), where files carry the base subset name.
    /// Files named <subset>_e.jsonl are LongBench-E without this flag.
    #[arg(long)]
    pub e: bool,
    /// What to do with a line that is not a valid prediction record: stop (exit 2, naming file
    /// and line) or skip it (reported on stderr, exit 1).
    #[arg(long, value_enum, default_value_t = OnErrorArg::Stop)]
    pub on_error: OnErrorArg,
    /// fuzzywuzzy matcher for code similarity (lcc, repobench-p): difflib is what LongBench's
    /// requirements install; levenshtein is what you get with python-Levenshtein installed.
    #[arg(long, value_enum, default_value_t = FuzzArg::Difflib, env = "KVC_FUZZ_BACKEND")]
    pub fuzz_backend: FuzzArg,
    /// Reproduce the ROUGE recursion cut-off of this Python (pltrdy rouge 1.0.1 scores 0 when its
    /// recursive LCS walk overflows the stack, ~990 words in one sentence pair).
    #[arg(long, value_enum, default_value_t = RecursionArg::Py311, env = "KVC_ROUGE_RECURSION")]
    pub rouge_recursion: RecursionArg,
    /// Fail (exit 2) when a model has no full-cache run (method full, budget rate1) for a subset.
    #[arg(long)]
    pub require_full: bool,
    /// Print machine-readable JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress or warnings on stderr (errors still print).
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnErrorArg {
    Stop,
    Skip,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FuzzArg {
    Difflib,
    Levenshtein,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RecursionArg {
    /// CPython 3.11/3.12
    Py311,
    /// CPython 3.8-3.10
    Py310,
    /// No cut-off (pltrdy rouge master, not on PyPI)
    None,
}

impl ScoreArgs {
    fn options(&self) -> (MetricOptions, OnError) {
        let opts = MetricOptions {
            fuzz: match self.fuzz_backend {
                FuzzArg::Difflib => FuzzBackend::Difflib,
                FuzzArg::Levenshtein => FuzzBackend::Levenshtein,
            },
            rouge_recursion: match self.rouge_recursion {
                RecursionArg::Py311 => RecursionLimit::Py311,
                RecursionArg::Py310 => RecursionLimit::Py310,
                RecursionArg::None => RecursionLimit::Unlimited,
            },
        };
        let on_error = match self.on_error {
            OnErrorArg::Stop => OnError::Stop,
            OnErrorArg::Skip => OnError::Skip,
        };
        (opts, on_error)
    }
}

fn has_pred_files(dir: &Path) -> bool {
    scoring::pred_files(dir).is_ok_and(|f| !f.is_empty())
}

fn fmt_score(s: &SubsetScore) -> String {
    match s {
        SubsetScore::Plain(x) => format!("{x:.2}"),
        SubsetScore::Buckets(b) => format!("0-4k {:.2}  4-8k {:.2}  8k+ {:.2}", b[0], b[1], b[2]),
    }
}

/// Run `kvc score`: a directory of pred files is scored as LongBench's eval.py
/// ([`score_pred_dir`]), anything else as a results tree ([`score_tree`]); the result goes to
/// stdout. `Status::Failed` when samples carry an error or lines were skipped.
pub fn run(args: ScoreArgs) -> anyhow::Result<Status> {
    let mut out = String::new();
    let (opts, on_error) = args.options();
    anyhow::ensure!(
        args.dir.is_dir(),
        "{} is not a directory",
        args.dir.display()
    );
    let failed = if has_pred_files(&args.dir) {
        score_pred_dir(&args, &opts, on_error, &mut out)?
    } else {
        score_tree(&args, &opts, on_error, &mut out)?
    };
    emit_stdout(&out)?;
    Ok(if failed { Status::Failed } else { Status::Ok })
}

/// A warning on stderr for each skipped line (file, line, why).
fn warn_skipped(skipped: &[BadLine]) {
    for b in skipped {
        eprintln!(
            "warning: skipped {}:{}: {}",
            b.path.display(),
            b.line,
            b.message
        );
    }
}

/// A directory of pred files: writes `DIR/result.json`, appends the JSON or a per-subset table
/// to `out`; returns whether samples carry an error or lines were skipped.
fn score_pred_dir(
    args: &ScoreArgs,
    opts: &MetricOptions,
    on_error: OnError,
    out: &mut String,
) -> anyhow::Result<bool> {
    let d = scoring::score_pred_dir(&args.dir, args.e, on_error, opts)?;
    let path = args.dir.join("result.json");
    write_atomic(&path, scoring::result_json(&d.subsets).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    warn_skipped(&d.skipped);
    if args.json {
        let _ = writeln!(out, "{}", scoring::result_json(&d.subsets));
    } else {
        let _ = writeln!(out, "{:<24} {:>5} {:>6}  score", "subset", "n", "failed");
        for s in &d.subsets {
            let _ = writeln!(
                out,
                "{:<24} {:>5} {:>6}  {}",
                s.task.name,
                s.n,
                s.n_failed,
                fmt_score(&s.score)
            );
        }
    }
    if !args.quiet {
        eprintln!("wrote {}", path.display());
    }
    let n_failed: usize = d.subsets.iter().map(|s| s.n_failed).sum();
    if n_failed > 0 {
        eprintln!("{n_failed} samples carry an `error` (scored as written)");
    }
    Ok(d.has_failures())
}

/// A results tree: writes scores.csv, summary.csv (and the RULER depth and allocation CSVs
/// when the tree has such rows), appends the JSON or the summary table to `out`; a missing
/// full-cache baseline is a warning, or an error with `--require-full`. Returns whether samples
/// carry an error or lines were skipped.
fn score_tree(
    args: &ScoreArgs,
    opts: &MetricOptions,
    on_error: OnError,
    out: &mut String,
) -> anyhow::Result<bool> {
    let t = tables::score_tree(&args.dir, args.e, on_error, opts)?;
    warn_skipped(&t.skipped);
    if !t.missing_full.is_empty() {
        let msg = format!(
            "no full-cache baseline (method `full`, budget `rate1`) for {}; percent_of_full is left empty there",
            t.missing_full.join(", ")
        );
        if args.require_full {
            anyhow::bail!(msg);
        } else if !args.quiet {
            eprintln!("warning: {msg}");
        }
    }
    let scores_path = args.dir.join("scores.csv");
    let summary_path = args.dir.join("summary.csv");
    tables::write_csv(&scores_path, &t.rows)?;
    tables::write_csv(&summary_path, &t.summary)?;
    crate::report::heatmap::write_depth_csv(&args.dir, &t)?;
    crate::report::allocation::write_alloc_csv(&args.dir, &t)?;
    crate::report::paper_table::write_paper_fixed_budget(
        &args.dir,
        &t.rows,
        crate::kvcache::paged::DEFAULT_BLOCK_SIZE,
    )?;
    if args.json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"scores": t.rows, "summary": t.summary})
            )?
        );
    } else {
        summary_table(&t.summary, out);
    }
    if !args.quiet {
        eprintln!(
            "scored {} runs; wrote {}, {} and result.json per run",
            t.runs.len(),
            scores_path.display(),
            summary_path.display()
        );
    }
    if t.n_failed > 0 {
        eprintln!(
            "{} samples carry an `error` (scored as written)",
            t.n_failed
        );
    }
    Ok(t.n_failed > 0 || !t.skipped.is_empty())
}

/// The summary rows as a fixed-width table (run, both rate notations, bucket, category, samples,
/// score, percent of full and its 95 % paired-bootstrap interval).
fn summary_table(summary: &[SummaryRow], out: &mut String) {
    use super::eval::summary::{fmt_interval, fmt_ratio};
    let _ = writeln!(
        out,
        "{:<28} {:<12} {:<11} {:>6} {:<6} {:<18} {:>5} {:>7} {:>8} {:>14}",
        "model", "method", "budget", "ratio", "bucket", "category", "n", "score", "%full", "95% CI"
    );
    for s in summary {
        let _ = writeln!(
            out,
            "{:<28} {:<12} {:<11} {:>6} {:<6} {:<18} {:>5} {:>7.2} {:>8} {:>14}",
            s.model,
            s.method,
            s.budget,
            s.compression_ratio.map_or("-".to_string(), fmt_ratio),
            s.bucket,
            s.category,
            s.n,
            s.score,
            s.percent_of_full
                .map_or("-".to_string(), |p| format!("{p:.1}")),
            match (s.percent_of_full_ci_low, s.percent_of_full_ci_high) {
                (Some(lo), Some(hi)) => fmt_interval(lo, hi),
                _ => "-".to_string(),
            }
        );
    }
}

/// Write command output to stdout; a closed pipe (`kvc score ... | head`) is not an error.
pub(crate) fn emit_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}
