//! `kvc merge`: the shards of a sweep (`kvc eval --shard I/N`) into the unsharded results tree,
//! then scored and plotted as `kvc eval` would have.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::eval::metrics::MetricOptions;
use crate::eval::scoring::OnError;
use crate::eval::shard;
use crate::report::tables;
use crate::util::Status;

#[derive(Args, Debug)]
#[command(
    about = "Merge the shards of a sweep (kvc eval --shard I/N) and score them",
    long_about = "Merge the shards of a sweep (`kvc eval --shard I/N --out OUT`, in OUT/shards/I-of-N/) into
OUT as one unsharded sweep: checks that all N shards are there and selected the same samples,
that every run has one configuration hash across shards and every sample exactly one row, and
names whatever is missing, doubled or foreign (nothing is written then). Writes each run's
run.json and preds/ (rows in the unsharded order), result.json, OUT/scores.csv, summary.csv and
plots: the same files an unsharded `kvc eval` writes. Rerunning it after a shard finishes is safe.

Exit codes: 0 ok; 1 merged, but some samples carry an `error`; 2 the shards cannot be merged.

Examples:
  kvc merge results                   # after kvc eval ... --shard 0/4 .. 3/4 --out results"
)]
pub struct MergeArgs {
    /// The --out of the sharded sweep (holding shards/).
    pub out: PathBuf,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MergeArgs) -> anyhow::Result<Status> {
    let merged = shard::merge(&a.out)?;
    let t = tables::score_runs(
        &a.out,
        &merged.runs,
        false,
        OnError::Stop,
        &MetricOptions::default(),
    );
    if let Some((dir, why)) = t.unscored.first() {
        anyhow::bail!("merged, but {} cannot be scored: {why}", dir.display());
    }
    let scores = a.out.join("scores.csv");
    tables::write_csv(&scores, &t.rows)?;
    tables::write_csv(&a.out.join("summary.csv"), &t.summary)?;
    let models: BTreeSet<String> = t.rows.iter().map(|r| r.model.clone()).collect();
    let mut plots = Vec::new();
    for model in &models {
        plots.extend(super::eval::summary::draw_plots(
            &a.out,
            &a.out.join("plots"),
            &scores,
            &t,
            model,
        )?);
    }
    let mut out = String::new();
    if a.json {
        let v = serde_json::json!({
            "shards": merged.shards, "runs": merged.runs, "rows": merged.rows,
            "n_failed": t.n_failed, "scores_csv": scores, "plots": plots,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "merged {} shards: {} runs, {} rows; wrote {}, summary.csv, {} plots",
            merged.shards,
            merged.runs.len(),
            merged.rows,
            scores.display(),
            plots.len()
        )?;
    }
    super::score::emit_stdout(&out)?;
    Ok(if t.n_failed > 0 {
        Status::Failed
    } else {
        Status::Ok
    })
}
