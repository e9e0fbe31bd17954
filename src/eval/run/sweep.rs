//! Running a group of plans over every subset: resume state, the loop over samples, progress
//! events and outcomes.
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{
    drop_failed_rows, load_existing, prepare_run_dir, run_samples, EvalError, PredWriter, RunPlan,
    SampleSettings, SubsetPlan,
};
use crate::compress::ranks::RankExchange;
use crate::compress::{self, MethodOptions};
use crate::data::longbench::{Dataset, Row};
use crate::eval::record::{run_dir, PredRecord, RunMeta};
use crate::model::LoadedModel;

/// What happened in one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub run: String,
    pub dir: PathBuf,
    /// Samples this invocation selected.
    pub n_selected: usize,
    /// Of those, already finished before (resumed).
    pub n_resumed: usize,
    /// Generated now.
    pub n_new: usize,
    /// Rows with `error` among the selected (old and new).
    pub n_failed: usize,
    /// Stopped by Ctrl-C before the end.
    pub interrupted: bool,
}

/// Progress events for the caller's display.
pub trait Observer {
    /// A run (or a group of runs sharing prefills, [`run_group`]) starts: `total` selected
    /// samples, `done` of them finished before.
    fn run_start(&mut self, _label: &str, _total: usize, _done: usize) {}
    /// A sample finished (`tokens` = prompt + generated).
    fn sample(&mut self, _rec: &PredRecord, _tokens: usize) {}
    fn run_end(&mut self, _outcome: &RunOutcome) {}
    fn warn(&mut self, _msg: &str) {}
}

/// Everything a sweep needs besides the model.
pub struct Sweep<'a> {
    pub out: &'a Path,
    pub data: &'a Dataset,
    /// Generated subsets (RULER), by subset name; every other subset streams from `data`.
    pub generated: &'a BTreeMap<String, Vec<crate::data::longbench::Row>>,
    pub subsets: &'a [SubsetPlan],
    pub settings: SampleSettings,
    pub method_options: &'a MethodOptions,
    pub overwrite: bool,
    /// Builds the run.json of a run from its plan (the CLI knows versions, device, ...).
    pub meta: &'a dyn Fn(&RunPlan) -> RunMeta,
    /// Ctrl-C once: finish the sample in flight, then stop.
    pub stop: &'a AtomicBool,
    /// Ctrl-C twice: the process is exiting. Set *before* `exit` is called, so a sample that
    /// fails because exit tore the CUDA context down (CUDA_ERROR_DEINITIALIZED) sees it and is
    /// not written as a failed row (resume would then skip it for good).
    pub abandon: &'a AtomicBool,
    /// Redo samples whose rows carry an `error` (their rows are removed first).
    pub retry_failed: bool,
    /// Samples of a subset generated together (each under every budget it lacks): prefilled
    /// one by one, decoded in one batch. 1 = one sample at a time.
    pub batch_samples: usize,
    /// A tensor-parallel rank's group (`None`: the whole model here). Every rank runs the
    /// same sweep; they agree on stopping, and a failed generation on any rank ends the sweep
    /// with an error instead of a failed row (the ranks would meet in different collectives).
    pub ranks: Option<RankExchange>,
}

/// Whether to stop before the next samples: Ctrl-C, on any rank of a tensor-parallel group.
fn stop_now(sw: &Sweep) -> Result<bool, EvalError> {
    let local = sw.stop.load(Ordering::SeqCst);
    match &sw.ranks {
        Some(x) => x
            .sum(local as usize)
            .map(|n| n > 0)
            .map_err(|e| EvalError::Method(format!("tensor-parallel group: {e}"))),
        None => Ok(local),
    }
}

/// Test hooks (environment): abort the process after N appended rows (a kill without any
/// cleanup), sleep before each sample (so a test can interrupt a run midway), and
/// `KVC_EVAL_TEST_FAIL_RANK=R:N`: tensor-parallel rank R's generations fail once it appended
/// N rows (one rank out of memory).
fn test_hooks() -> (Option<usize>, Option<u64>, Option<(usize, usize)>) {
    let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    let fail_rank = std::env::var("KVC_EVAL_TEST_FAIL_RANK").ok().and_then(|v| {
        let (r, n) = v.split_once(':')?;
        Some((r.parse().ok()?, n.parse().ok()?))
    });
    (
        num("KVC_EVAL_TEST_ABORT_AFTER").map(|n: u64| n as usize),
        num("KVC_EVAL_TEST_SAMPLE_DELAY_MS"),
        fail_rank,
    )
}

/// Label of a group for progress lines: the run's label, or `method ×N budgets`.
fn group_label(plans: &[&RunPlan]) -> String {
    match plans {
        [p] => p.label(),
        _ => format!(
            "{} {}",
            plans[0].method.name,
            plans
                .iter()
                .map(|p| p.budget.label())
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// Run a group of plans of one method (see [`super::group_plans`]) over every subset, resuming each
/// run on its own: a sample is generated once for all runs that still lack it (one prefill),
/// and each run's row is appended to its own file. One outcome per plan, in order.
pub fn run_group(
    lm: &mut LoadedModel,
    plans: &[&RunPlan],
    sw: &Sweep,
    obs: &mut dyn Observer,
    appended: &mut usize,
) -> Result<Vec<RunOutcome>, EvalError> {
    let (abort_after, delay_ms, fail_rank) = test_hooks();
    // The group's method (a `full` member is a keep-all fork of it, see [`super::group_plans`]).
    let lead = plans.iter().find(|p| !p.is_full()).unwrap_or(&plans[0]);
    let mut runner = compress::runner(
        &lead.method,
        lead.compress_budget(),
        lm.config(),
        &lead.options(sw.method_options),
    )
    .map_err(|e| EvalError::Method(format!("{e:#}")))?;
    let mut outs = Vec::with_capacity(plans.len());
    // Per plan, per subset: the selected ids not finished yet.
    let mut todo: Vec<Vec<HashSet<String>>> = Vec::with_capacity(plans.len());
    for plan in plans {
        let (out, rests) = open_run(&lm.name, plan, sw, obs)?;
        todo.push(rests);
        outs.push(out);
    }
    let total: usize = outs.iter().map(|o| o.n_selected).sum();
    let done: usize = outs.iter().map(|o| o.n_resumed).sum();
    obs.run_start(&group_label(plans), total, done);
    let mut interrupted = false;
    'subsets: for (i, sp) in sw.subsets.iter().enumerate() {
        let mut left: usize = todo.iter().map(|t| t[i].len()).sum();
        if left == 0 {
            continue;
        }
        let mut writers = open_writers(&outs, &todo, i, sp);
        let mut rows = subset_rows(sw, sp)?;
        loop {
            // The next samples (up to --batch-samples) and the runs that lack each.
            let chunk = next_chunk(&mut rows, &mut todo, i, sw.batch_samples, &mut left)?;
            if chunk.is_empty() {
                break;
            }
            if stop_now(sw)? {
                interrupted = true;
                break 'subsets;
            }
            if let Some(ms) = delay_ms {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            let (recs, mut failed) =
                run_samples(lm, runner.as_mut(), plans, sp.task, &chunk, &sw.settings);
            if let (Some((r, n)), Some(x)) = (fail_rank, &sw.ranks) {
                if x.shard().rank == r && *appended >= n {
                    failed = Some("out of memory (KVC_EVAL_TEST_FAIL_RANK)".into());
                }
            }
            if let (Some(e), Some(_)) = (failed, &sw.ranks) {
                return Err(EvalError::Method(format!(
                    "{}: {e}: a failed sample stops a tensor-parallel run (its ranks cannot go on \
                     in step); finished samples are saved: rerun to resume (smaller \
                     --batch-samples or more ranks if it ran out of memory)",
                    sp.task.name
                )));
            }
            if sw.abandon.load(Ordering::SeqCst) {
                interrupted = true;
                break 'subsets;
            }
            write_rows(
                &chunk,
                recs,
                &mut writers,
                &mut outs,
                obs,
                appended,
                abort_after,
            )?;
        }
    }
    let stopped = interrupted || sw.stop.load(Ordering::SeqCst);
    for o in &mut outs {
        o.interrupted = stopped && o.n_resumed + o.n_new < o.n_selected;
    }
    for o in &outs {
        obs.run_end(o);
    }
    Ok(outs)
}

/// Make `plan`'s run directory (of model `model`) ready ([`prepare_run_dir`]) and read its
/// resume state of every subset first, so the progress bar knows the total (`--retry-failed`
/// drops failed rows first; a torn last line is reported). Returns its outcome so far and,
/// per subset of the sweep, the selected ids it has not finished.
fn open_run(
    model: &str,
    plan: &RunPlan,
    sw: &Sweep,
    obs: &mut dyn Observer,
) -> Result<(RunOutcome, Vec<HashSet<String>>), EvalError> {
    let dir = run_dir(sw.out, model, &plan.method.name, plan.budget);
    prepare_run_dir(&dir, &(sw.meta)(plan), sw.overwrite)?;
    let mut out = RunOutcome {
        run: plan.label(),
        dir: dir.clone(),
        n_selected: sw.subsets.iter().map(|s| s.ids.len()).sum(),
        n_resumed: 0,
        n_new: 0,
        n_failed: 0,
        interrupted: false,
    };
    let mut rests = Vec::with_capacity(sw.subsets.len());
    for sp in sw.subsets {
        let path = dir.join("preds").join(format!("{}.jsonl", sp.task.name));
        let mut ex = load_existing(&path)?;
        if sw.retry_failed && ex.n_failed > 0 {
            let wanted: HashSet<String> = sp.ids.iter().cloned().collect();
            let n = drop_failed_rows(&path, &wanted)?;
            if n > 0 {
                obs.warn(&format!(
                    "{}: retrying {n} failed sample(s) (--retry-failed)",
                    path.display()
                ));
                ex = load_existing(&path)?;
            }
        }
        if ex.torn_bytes > 0 {
            obs.warn(&format!(
                "{}: dropped a torn last line ({} bytes) left by an interrupted write; that sample is redone",
                path.display(),
                ex.torn_bytes
            ));
        }
        out.n_failed += ex.n_failed;
        let rest: HashSet<String> = sp
            .ids
            .iter()
            .filter(|id| !ex.done.contains(*id))
            .cloned()
            .collect();
        out.n_resumed += sp.ids.len() - rest.len();
        rests.push(rest);
    }
    Ok((out, rests))
}

/// Per run `k` of a group, the writer of subset `sp`'s prediction file (subset `i` of the
/// sweep) when the run has samples of it to do (`todo[k][i]`), `None` otherwise.
fn open_writers(
    outs: &[RunOutcome],
    todo: &[Vec<HashSet<String>>],
    i: usize,
    sp: &SubsetPlan,
) -> Vec<Option<PredWriter>> {
    outs.iter()
        .enumerate()
        .map(|(k, o)| {
            let path = o.dir.join("preds").join(format!("{}.jsonl", sp.task.name));
            (!todo[k][i].is_empty()).then(|| PredWriter::new(&path))
        })
        .collect()
}

/// A subset's rows in file order: its generated rows (RULER), else streamed from the data.
type Rows<'a> = Box<dyn Iterator<Item = Result<Row, EvalError>> + 'a>;

/// The rows of subset `sp` ([`Rows`]).
fn subset_rows<'a>(sw: &'a Sweep, sp: &SubsetPlan) -> Result<Rows<'a>, EvalError> {
    rows_of(sw.data, sw.generated, sp)
}

/// The rows of subset `sp`: `generated`'s (RULER), else streamed from `data`.
pub(super) fn rows_of<'a>(
    data: &'a Dataset,
    generated: &'a BTreeMap<String, Vec<Row>>,
    sp: &SubsetPlan,
) -> Result<Rows<'a>, EvalError> {
    Ok(match generated.get(sp.task.name) {
        Some(rows) => Box::new(rows.iter().cloned().map(Ok)),
        None => Box::new(
            data.rows(sp.task.name)?
                .map(|r| r.map(|(_, row)| row).map_err(EvalError::from)),
        ),
    })
}

/// The next samples of subset `i` (up to `batch`, at least 1) that some run still lacks, each
/// with the runs that lack it (taken out of `todo[k][i]`; `left`, the rows still to make, is
/// counted down). Empty when the rows or the work are done.
fn next_chunk(
    rows: &mut Rows,
    todo: &mut [Vec<HashSet<String>>],
    i: usize,
    batch: usize,
    left: &mut usize,
) -> Result<Vec<(Row, Vec<usize>)>, EvalError> {
    let mut chunk: Vec<(Row, Vec<usize>)> = Vec::new();
    while chunk.len() < batch.max(1) && *left > 0 {
        let Some(r) = rows.next() else { break };
        let row = r?;
        let need: Vec<usize> = (0..todo.len())
            .filter(|&k| todo[k][i].remove(&row.id))
            .collect();
        if need.is_empty() {
            continue;
        }
        *left -= need.len();
        chunk.push((row, need));
    }
    Ok(chunk)
}

/// Append each sample's rows `recs` (one per run in its `need`, in that order) to those runs'
/// files (`writers[k]`), count them in `outs[k]` and `appended`, and report each to `obs` with
/// its tokens (the prompt's counted once per sample: the group processes it once). Aborts the
/// process once `appended` reaches `abort_after` (the test hook).
fn write_rows(
    chunk: &[(Row, Vec<usize>)],
    recs: Vec<Vec<PredRecord>>,
    writers: &mut [Option<PredWriter>],
    outs: &mut [RunOutcome],
    obs: &mut dyn Observer,
    appended: &mut usize,
    abort_after: Option<usize>,
) -> Result<(), EvalError> {
    for ((_, need), recs) in chunk.iter().zip(recs) {
        for (j, (&k, rec)) in need.iter().zip(recs).enumerate() {
            let w = writers[k]
                .as_mut()
                .expect("a writer for every plan with work");
            w.append(&rec)?;
            *appended += 1;
            outs[k].n_new += 1;
            if rec.error.is_some() {
                outs[k].n_failed += 1;
            }
            // The prompt is processed once for the group: count it once.
            let prompt = if j == 0 {
                rec.prompt_tokens.unwrap_or(0)
            } else {
                0
            };
            obs.sample(&rec, prompt + rec.new_tokens.unwrap_or(0));
            if abort_after.is_some_and(|n| *appended >= n) {
                std::process::abort();
            }
        }
    }
    Ok(())
}
