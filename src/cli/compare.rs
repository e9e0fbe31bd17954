//! `kvc compare`: the regression gate between two scores.csv files.
use std::path::{Path, PathBuf};

use std::fmt::Write as _;

use clap::Args;

use crate::report::compare::{compare, Pof};
use crate::report::tables::{read_csv, ScoreRow, SummaryRow};
use crate::util::Status;

use super::score::emit_stdout;

#[derive(Args, Debug)]
#[command(
    about = "Compare two scores.csv files; exit 1 when a subset or category drops beyond a tolerance",
    long_about = "Compare two scores.csv files written by `kvc score`, subset by subset and category by category
(keys: model, method, budget, task or category, LongBench-E bucket), and print a table of the
differences in LongBench points.

Each key also says whether the change is beyond the 95% paired-bootstrap interval of percent of
full cache (column `beyond`): yes when either run's percent of full lies outside the other run's
interval (subsets: the scores.csv columns percent_of_full_ci_low/high; categories: the
summary.csv beside each scores.csv, when present). A file written before those columns has no
interval; `-` when neither side has one. This is information, not part of the gate.

Exit codes: 0 when nothing dropped by more than --tolerance points; 1 when some subset or category
did, or a key of the baseline is missing from the current file; 2 on an error (unreadable CSV).

Example (nightly CI, see scripts/nightly.sh):
  kvc compare --baseline docs/results/baselines/nightly.csv --current results/nightly/scores.csv --tolerance 1.0"
)]
pub struct CompareArgs {
    /// The reference scores.csv (e.g. a committed baseline in docs/results/baselines/).
    #[arg(long)]
    pub baseline: PathBuf,
    /// The scores.csv to check.
    #[arg(long)]
    pub current: PathBuf,
    /// Largest allowed drop, in LongBench points (score units, 0..100).
    #[arg(long, default_value_t = 0.0, env = "KVC_COMPARE_TOLERANCE")]
    pub tolerance: f64,
    /// Print the differences as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The summary.csv beside a scores.csv (the categories' intervals), or none.
fn summary_beside(scores: &Path) -> anyhow::Result<Vec<SummaryRow>> {
    let p = scores.with_file_name("summary.csv");
    Ok(if p.is_file() {
        read_csv(&p)?
    } else {
        Vec::new()
    })
}

/// Run `kvc compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<Status> {
    anyhow::ensure!(
        args.tolerance.is_finite() && args.tolerance >= 0.0,
        "--tolerance must be a non-negative number of points"
    );
    let mut out = String::new();
    let base: Vec<ScoreRow> = read_csv(&args.baseline)?;
    let cur: Vec<ScoreRow> = read_csv(&args.current)?;
    let c = compare(
        &base,
        &cur,
        &summary_beside(&args.baseline)?,
        &summary_beside(&args.current)?,
        args.tolerance,
    );
    if args.json {
        let v: Vec<_> = c
            .diffs
            .iter()
            .map(|d| {
                let pof = |p: Option<Pof>| {
                    p.map(|p| {
                        serde_json::json!({"percent_of_full": p.value,
                            "ci_low": p.ci.map(|c| c.0), "ci_high": p.ci.map(|c| c.1)})
                    })
                };
                serde_json::json!({"key": d.key, "kind": d.kind, "baseline": d.baseline,
                    "current": d.current, "status": d.status.label(),
                    "baseline_percent_of_full": pof(d.baseline_pof),
                    "current_percent_of_full": pof(d.current_pof),
                    "beyond_interval": d.beyond_interval})
            })
            .collect();
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"failed": c.failed(), "diffs": v}))?
        );
    } else {
        let _ = write!(out, "{}", c.table());
    }
    emit_stdout(&out)?;
    Ok(if c.failed() {
        Status::Failed
    } else {
        Status::Ok
    })
}
