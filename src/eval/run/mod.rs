//! The `kvc eval` pipeline: a sweep of runs (method × budget) over LongBench subsets, with
//! per-sample prediction rows appended and flushed as they are made, and resumable runs.
//!
//! Order of one invocation:
//! 1. [`plan_runs`]: the full-cache run (`full/rate1`, computed once and shared by every method's
//!    percentages) first, then each method × rate > 1 and × token budget. A rate of 1 *is* the
//!    full cache (KV-Compress at rate 1 must equal the uncompressed output token for token), so
//!    it is not run again per method.
//! 2. [`inspect_data`]: one streaming pass per subset that validates every row, picks the
//!    samples (`--samples`, then `--limit` in file order) and checks the file against the
//!    official sha256 table.
//! 3. Per run: [`prepare_run_dir`] (run.json with the resolved configuration and its hash;
//!    refuses a directory made with another configuration unless `overwrite`), then per subset
//!    [`load_existing`] (finished `_id`s; a torn last line is cut off) and the remaining
//!    samples, each appended to `preds/<subset>.jsonl` and synced before the next one starts.
//!    A failing sample (prompt too long, out of memory, ...) is written as a row with `error`.
//! 4. Scoring and plots are the caller's (the CLI runs `report::tables::score_tree`).
//!
//! Prompts follow LongBench's `pred.py` (see [`crate::data::prompt`]); generation is greedy with
//! the subset's max new tokens; samsum stops at a newline as pred.py does (its stop ids are the
//! tokenizer's eos and the newline id, at least one new token).
//!
//! Files: `plan.rs` (runs, groups, subsets, batch size), `dirs.rs` (run.json, resume, the
//! prediction writer), `samples.rs` (the sample loop), `ruler.rs` (RULER generation),
//! `sweep.rs` (a group of runs over every subset), `export.rs` (the prompts for another tool); items are re-exported here.
use std::path::{Path, PathBuf};

use crate::data::longbench::DataError;

mod dirs;
mod export;
mod plan;
mod ruler;
mod samples;
mod sweep;

pub use dirs::{
    drop_failed_rows, load_existing, prepare_run_dir, Existing, PredWriter, RunConfig,
    PROMPT_RECIPE,
};
pub use export::export_prompts;
pub use plan::{
    check_samples_found, data_report, group_plans, inspect_data, plan_runs, rate_from_ratio,
    ratio_from_rate, RunPlan, SamplePool, SubsetPlan, AUTO_BATCH_MAX,
};
pub use ruler::{generate_ruler, GeneratedRows, RulerPlan};
pub use samples::{run_samples, ChatMode, SampleSettings};
pub use sweep::{run_group, Observer, RunOutcome, Sweep};

/// Block size of the paged cache: token budgets are rounded up to a multiple of it.
pub const BLOCK_SIZE: usize = 16;

/// Errors of the pipeline; each names the file or the fix.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} was made with a different configuration ({diffs}): rerun with the same settings to resume it, pass --overwrite to discard its predictions and start over, or choose another --out")]
    ConfigMismatch { path: PathBuf, diffs: String },
    #[error("{path} holds predictions but no run.json (not made by `kvc eval`): pass --overwrite to discard them, or choose another --out")]
    Foreign { path: PathBuf },
    #[error("{path}:{line}: not a prediction row ({msg}); only a torn last line is repaired: remove the line, or pass --overwrite to start the run over")]
    BadPredLine {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("invalid budget: {0}")]
    Budget(String),
    #[error("--samples: no row with _id {missing} in the selected subsets ({tasks})")]
    SamplesNotFound { missing: String, tasks: String },
    #[error("{0}")]
    Method(String),
}

fn io(path: &Path, source: std::io::Error) -> EvalError {
    EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;
