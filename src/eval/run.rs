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
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::compress::{self, Budget, CompressionStats, MethodOptions, MethodSpec, Runner};
use crate::data::longbench::{hex, DataError, Dataset, Verdict};
use crate::data::prompt;
use crate::data::tasks::Task;
use crate::engine::{FinishReason, GenParams, Generation};
use crate::eval::record::run_dir;
use crate::eval::record::{PredRecord, RunMeta};
use crate::model::{candle_msg, LoadedModel};
use crate::util::write_atomic;

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

/// One run of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    pub method: MethodSpec,
    /// The directory budget (`rate1` for the full cache).
    pub budget: Budget,
}

impl RunPlan {
    pub fn is_full(&self) -> bool {
        self.method.is_full()
    }
    /// The budget handed to [`compress::runner`] (`None` for the full cache).
    pub fn compress_budget(&self) -> Option<Budget> {
        (!self.is_full()).then_some(self.budget)
    }
    /// `full/rate1`, `kvcompress/rate8`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.method.name, self.budget.label())
    }
}

/// The runs of a sweep, full cache first, and notes to show (rounded budgets).
pub fn plan_runs(
    methods: &[MethodSpec],
    rates: &[f64],
    cache_tokens: &[usize],
) -> Result<(Vec<RunPlan>, Vec<String>), EvalError> {
    let mut notes = Vec::new();
    for &r in rates {
        if !(r.is_finite() && r >= 1.0) {
            return Err(EvalError::Budget(format!(
                "rate {r}: a compression rate is prompt KVs / kept KVs, so it must be >= 1 (1 = full cache)"
            )));
        }
    }
    let mut tokens = Vec::new();
    for &t in cache_tokens {
        if t == 0 {
            return Err(EvalError::Budget(
                "--cache-tokens 0: a cache budget must be at least one block (16 tokens)".into(),
            ));
        }
        let r = t.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        if r != t {
            notes.push(format!(
                "cache budget {t} is not a multiple of the block size {BLOCK_SIZE}: using {r}"
            ));
        }
        if !tokens.contains(&r) {
            tokens.push(r);
        }
    }
    let full = MethodSpec {
        name: "full".into(),
    };
    let mut runs = vec![RunPlan {
        method: full,
        budget: Budget::Rate(1.0),
    }];
    for m in methods.iter().filter(|m| !m.is_full()) {
        let budgets = rates
            .iter()
            .filter(|r| **r > 1.0)
            .map(|r| Budget::Rate(*r))
            .chain(tokens.iter().map(|t| Budget::Tokens(*t)));
        for b in budgets {
            let p = RunPlan {
                method: m.clone(),
                budget: b,
            };
            if !runs.contains(&p) {
                runs.push(p);
            }
        }
    }
    Ok((runs, notes))
}

/// Whether the model's chat template wraps the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ChatMode {
    /// LongBench's rule: every subset but trec, triviaqa, samsum, lsht, lcc, repobench-p (and
    /// never for a model without a chat template).
    Auto,
    /// Every subset.
    Always,
    /// No subset.
    Never,
}

/// The settings that decide a run's predictions; hashed into run.json. Two invocations with
/// equal configurations may share (resume) a run directory; the task selection, `--limit` and
/// the device are not part of it (they choose which samples, not how each is made).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: String,
    /// The checkpoint path or hub id.
    pub model_source: String,
    pub model_revision: Option<String>,
    pub dtype: String,
    pub method: String,
    pub rate: Option<f64>,
    pub budget_tokens: Option<usize>,
    pub method_options: serde_json::Value,
    /// Middle-truncation length in tokens (LongBench's per-model max input length).
    pub max_input_tokens: usize,
    /// `--max-new-tokens` (None = each subset's own).
    pub max_new_tokens: Option<usize>,
    pub chat: ChatMode,
    /// The prompt recipe (bumped if kvc's prompt building ever changes).
    pub prompt: String,
}

/// The prompt recipe recorded in [`RunConfig::prompt`].
pub const PROMPT_RECIPE: &str = "longbench-v1-pred.py";

impl RunConfig {
    /// sha256 of the JSON form, first 16 hex digits.
    pub fn hash(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        hex(&Sha256::digest(json.as_bytes()))[..16].to_string()
    }
}

/// Field-by-field differences between two JSON objects (`field: old -> new`).
fn json_diffs(old: &serde_json::Value, new: &serde_json::Value) -> String {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return "unreadable old configuration".into();
    };
    let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    let d: Vec<String> = keys
        .into_iter()
        .filter(|k| o.get(*k) != n.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".into(), |v| v.to_string());
            format!("{k}: {} -> {}", show(o.get(k)), show(n.get(k)))
        })
        .collect();
    if d.is_empty() {
        "same settings, different hash".into()
    } else {
        d.join(", ")
    }
}

/// Make `dir` ready for a run with `meta` (whose `extra.config` / `extra.config_hash` are
/// set): resume when the existing run.json has the same hash, start over when `overwrite`,
/// refuse otherwise. Writes run.json.
pub fn prepare_run_dir(dir: &Path, meta: &RunMeta, overwrite: bool) -> Result<(), EvalError> {
    let run_json = dir.join("run.json");
    let preds = dir.join("preds");
    let has_preds = std::fs::read_dir(&preds).is_ok_and(|mut rd| rd.next().is_some());
    let new_hash = meta.extra.get("config_hash");
    let mut discard = overwrite;
    if !overwrite {
        if run_json.is_file() {
            let text = std::fs::read_to_string(&run_json).map_err(|e| io(&run_json, e))?;
            let old: RunMeta = serde_json::from_str(&text).map_err(|e| EvalError::BadPredLine {
                path: run_json.clone(),
                line: e.line(),
                msg: e.to_string(),
            })?;
            if old.extra.get("config_hash") != new_hash {
                if has_preds {
                    return Err(EvalError::ConfigMismatch {
                        path: dir.to_path_buf(),
                        diffs: json_diffs(
                            old.extra.get("config").unwrap_or(&serde_json::Value::Null),
                            meta.extra.get("config").unwrap_or(&serde_json::Value::Null),
                        ),
                    });
                }
                discard = true;
            }
        } else if has_preds {
            return Err(EvalError::Foreign {
                path: dir.to_path_buf(),
            });
        }
    }
    if discard {
        if preds.exists() {
            std::fs::remove_dir_all(&preds).map_err(|e| io(&preds, e))?;
        }
        let _ = std::fs::remove_file(dir.join("result.json"));
    }
    std::fs::create_dir_all(&preds).map_err(|e| io(&preds, e))?;
    let json = serde_json::to_string_pretty(meta).unwrap_or_default();
    write_atomic(&run_json, json.as_bytes()).map_err(|e| io(&run_json, e))
}

/// What an existing prediction file holds.
#[derive(Debug, Default)]
pub struct Existing {
    /// `_id`s with a row (failed ones included).
    pub done: HashSet<String>,
    /// Rows with `error`.
    pub n_failed: usize,
    /// Bytes of a torn (unterminated) last line that were cut off.
    pub torn_bytes: usize,
}

/// Read a prediction file for resuming: collect the finished ids; cut off an unterminated last
/// line (a write interrupted by a kill); any other bad line is an error naming it.
pub fn load_existing(path: &Path) -> Result<Existing, EvalError> {
    let mut ex = Existing::default();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ex),
        Err(e) => return Err(io(path, e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    if complete < bytes.len() {
        ex.torn_bytes = bytes.len() - complete;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        f.set_len(complete as u64).map_err(|e| io(path, e))?;
        f.sync_all().map_err(|e| io(path, e))?;
    }
    let body = &bytes[..complete];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if complete == 0 {
            break;
        }
        let bad = |msg: String| EvalError::BadPredLine {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let text = std::str::from_utf8(line).map_err(|_| bad("not valid UTF-8".into()))?;
        let rec = PredRecord::from_json_line(text).map_err(|e| bad(e.to_string()))?;
        let id = rec.id.ok_or_else(|| bad("no `_id`".into()))?;
        if rec.error.is_some() {
            ex.n_failed += 1;
        }
        ex.done.insert(id);
    }
    Ok(ex)
}

/// Remove the rows with `error` whose `_id` is in `ids` from a prediction file (for
/// `--retry-failed`): the kept lines, byte for byte, go to a temporary file that replaces the
/// original once synced, so an interruption leaves either file whole. Returns the rows removed.
pub fn drop_failed_rows(path: &Path, ids: &HashSet<String>) -> Result<usize, EvalError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut removed = 0;
    for line in text.split_inclusive('\n') {
        let failed = PredRecord::from_json_line(line.trim_end())
            .ok()
            .filter(|r| r.error.is_some())
            .and_then(|r| r.id)
            .is_some_and(|id| ids.contains(&id));
        if failed {
            removed += 1;
        } else {
            kept.push_str(line);
        }
    }
    if removed > 0 {
        let tmp = path.with_extension("jsonl.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(kept.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| io(path, e))?;
    }
    Ok(removed)
}

/// The samples of one subset this invocation asks for, and its file's checksum verdict.
#[derive(Debug, Clone)]
pub struct SubsetPlan {
    pub task: &'static Task,
    /// Selected `_id`s in file order.
    pub ids: Vec<String>,
    /// Rows in the file.
    pub n_rows: usize,
    pub verdict: Option<Verdict>,
}

/// Validate every selected subset (all rows parse, LongBench-E rows have `length`), pick the
/// samples (`samples` filter, then `limit` in file order) and, when `check_sums`, compare each
/// file with the official sha256. Streams one subset at a time. Ids of `samples` found in no
/// subset are reported by [`check_samples_found`] once RULER subsets are added too.
pub fn inspect_data(
    ds: &Dataset,
    tasks: &[&'static Task],
    limit: Option<usize>,
    samples: Option<&BTreeSet<String>>,
    check_sums: bool,
) -> Result<Vec<SubsetPlan>, EvalError> {
    for t in tasks {
        ds.require(t.name)?;
    }
    let mut out = Vec::new();
    for &task in tasks {
        let mut ids = Vec::new();
        let mut seen = HashSet::new();
        let mut n_rows = 0;
        for r in ds.rows(task.name)? {
            let (line, row) = r?;
            n_rows += 1;
            if task.longbench_e && row.length.is_none() {
                return Err(DataError::BadRow {
                    path: ds.label(task.name),
                    line,
                    msg: "missing field `length` (LongBench-E buckets on it)".into(),
                }
                .into());
            }
            if samples.is_some_and(|s| !s.contains(&row.id)) {
                continue;
            }
            if limit.is_some_and(|l| ids.len() >= l) || !seen.insert(row.id.clone()) {
                continue;
            }
            ids.push(row.id);
        }
        let verdict = if check_sums {
            Some(ds.verdict(task.name)?)
        } else {
            None
        };
        out.push(SubsetPlan {
            task,
            ids,
            n_rows,
            verdict,
        });
    }
    Ok(out)
}

/// `--samples`: every requested id must be among the selected subsets' samples (LongBench rows
/// and generated RULER rows alike); call once all subsets are planned.
pub fn check_samples_found(
    samples: Option<&BTreeSet<String>>,
    subsets: &[SubsetPlan],
) -> Result<(), EvalError> {
    let Some(s) = samples else { return Ok(()) };
    let found: HashSet<&str> = subsets
        .iter()
        .flat_map(|p| p.ids.iter().map(String::as_str))
        .collect();
    let missing: Vec<&str> = s
        .iter()
        .map(String::as_str)
        .filter(|id| !found.contains(id))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(EvalError::SamplesNotFound {
        missing: missing.join(", "),
        tasks: subsets
            .iter()
            .map(|p| p.task.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The RULER part of a sweep: which tasks, lengths, samples, seed.
#[derive(Debug, Clone)]
pub struct RulerPlan {
    pub tasks: Vec<&'static crate::data::ruler::RulerTask>,
    pub lengths: Vec<usize>,
    pub samples: usize,
    pub seed: u64,
}

/// Generated rows by subset name (RULER), streamed like a data file's.
pub type GeneratedRows = BTreeMap<String, Vec<crate::data::longbench::Row>>;

/// Generate the RULER subsets with the model's tokenizer (prompts measured exactly as
/// [`run_samples`] builds them): one [`SubsetPlan`] per task × length and the rows by subset.
pub fn generate_ruler(
    lm: &LoadedModel,
    plan: &RulerPlan,
    s: &SampleSettings,
) -> Result<(Vec<SubsetPlan>, GeneratedRows), crate::data::ruler::RulerError> {
    use crate::data::ruler::{self, Measure, RulerError};
    let context = lm.config().max_context();
    for &length in &plan.lengths {
        if length > context {
            return Err(RulerError::BeyondContext { length, context });
        }
    }
    let mut subsets = Vec::new();
    let mut rows = BTreeMap::new();
    for rt in &plan.tasks {
        for &length in &plan.lengths {
            let name = ruler::subset_name(rt, length);
            let task =
                crate::data::tasks::ruler_task(&name).ok_or_else(|| RulerError::UnknownTask {
                    name: name.clone(),
                    valid: String::new(),
                })?;
            let chat = match s.chat {
                ChatMode::Auto => task.chat_template && lm.tokenizer.chat_template.is_some(),
                ChatMode::Always => true,
                ChatMode::Never => false,
            };
            let m = Measure {
                tokenizer: &lm.tokenizer,
                chat,
            };
            let max_new = s.max_new_tokens.unwrap_or(rt.max_new_tokens);
            let samples = ruler::generate(rt, length, plan.samples, plan.seed, max_new, &m)?;
            let r: Vec<crate::data::longbench::Row> = samples.iter().map(|x| x.row()).collect();
            subsets.push(SubsetPlan {
                task,
                ids: r.iter().map(|x| x.id.clone()).collect(),
                n_rows: r.len(),
                verdict: None,
            });
            rows.insert(name, r);
        }
    }
    Ok((subsets, rows))
}

/// Per-sample settings shared by a sweep.
#[derive(Debug, Clone)]
pub struct SampleSettings {
    pub max_input_tokens: usize,
    pub max_new_tokens: Option<usize>,
    pub chat: ChatMode,
    pub prefill_chunk: usize,
    /// Record `kept_per_head` in every compressed row.
    pub dump_allocation: bool,
}

/// The row every run of `plan` writes for `row` before generating (no prediction yet).
fn base_record(
    lm: &LoadedModel,
    plan: &RunPlan,
    task: &Task,
    row: &crate::data::longbench::Row,
) -> PredRecord {
    PredRecord {
        pred: String::new(),
        answers: row.answers.clone(),
        all_classes: row.all_classes.clone(),
        length: row.length,
        depth: row.depth,
        id: Some(row.id.clone()),
        task: Some(task.name.to_string()),
        model: Some(lm.name.clone()),
        method: Some(plan.method.name.clone()),
        rate: match plan.budget {
            Budget::Rate(r) => Some(r),
            Budget::Tokens(_) => None,
        },
        budget_tokens: match plan.budget {
            Budget::Tokens(t) => Some(t),
            Budget::Rate(_) => None,
        },
        ..Default::default()
    }
}

/// Generate several samples of one subset, sample `i` under the plans `chunk[i].1` (indices
/// into `plans`, one method): the runner prefills each prompt once and decodes every (sample,
/// plan) in one batch. Per sample, one record per listed plan, in that order; failures become
/// rows with `error` (never an `Err`).
pub fn run_samples(
    lm: &mut LoadedModel,
    runner: &mut dyn Runner,
    plans: &[&RunPlan],
    task: &Task,
    chunk: &[(crate::data::longbench::Row, Vec<usize>)],
    s: &SampleSettings,
) -> Vec<Vec<PredRecord>> {
    let mut recs: Vec<Vec<PredRecord>> = chunk
        .iter()
        .map(|(row, need)| {
            need.iter()
                .map(|&k| base_record(lm, plans[k], task, row))
                .collect()
        })
        .collect();
    let fail = |recs: &mut Vec<PredRecord>, e: &str| {
        for r in recs {
            r.error = Some(e.to_string());
        }
    };
    // Prompts that can run: (sample index, prepared). Built on all cores: tokenizing a
    // LongBench zh context (20-30k tokens before the middle cut) twice takes tens of ms, and
    // one at a time the sweep's 600 prompts were ~8 s of a ~110 s GPU sweep with the GPU idle.
    let mut clock = crate::profile::start(&lm.model.device);
    let built: Vec<Result<Prepared, String>> = {
        use rayon::prelude::*;
        let lm: &LoadedModel = lm;
        chunk
            .par_iter()
            .map(|(row, _)| prepare(lm, task, row, s))
            .collect()
    };
    crate::profile::mark(&lm.model.device, &mut clock, "eval.prompts");
    let mut ready: Vec<(usize, Prepared)> = Vec::new();
    for (i, ((_, need), prepared)) in chunk.iter().zip(built).enumerate() {
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                fail(&mut recs[i], &e);
                continue;
            }
        };
        for r in &mut recs[i] {
            r.chat_template = Some(prepared.chat);
            r.truncated = Some(prepared.truncated);
            r.prompt_tokens = Some(prepared.ids.len());
            if need.len() > 1 {
                r.prefill_shared = Some(need.len());
            }
        }
        match &prepared.too_long {
            Some(e) => fail(&mut recs[i], e),
            None => ready.push((i, prepared)),
        }
    }
    if ready.is_empty() {
        return recs;
    }
    // One subset: every prompt has the same decoding parameters.
    let params = ready[0].1.params.clone();
    let prompts: Vec<&[u32]> = ready.iter().map(|(_, p)| p.ids.as_slice()).collect();
    let budgets: Vec<Vec<Option<Budget>>> = ready
        .iter()
        .map(|(i, _)| {
            chunk[*i]
                .1
                .iter()
                .map(|&k| plans[k].compress_budget())
                .collect()
        })
        .collect();
    match runner.run_prompts(&mut lm.model, &prompts, &params, &budgets) {
        Err(e) => {
            let e = candle_msg(&e);
            for (i, _) in &ready {
                fail(&mut recs[*i], &e);
            }
        }
        Ok(per_prompt) => {
            for ((i, _), res) in ready.iter().zip(per_prompt) {
                match res {
                    Err(e) => fail(&mut recs[*i], &candle_msg(&e)),
                    Ok(results) => {
                        let (n_layers, kvh) = (
                            lm.config().num_hidden_layers,
                            lm.config().num_key_value_heads,
                        );
                        for ((rec, res), &k) in recs[*i].iter_mut().zip(results).zip(&chunk[*i].1) {
                            // A `full` row from a compressed method's keep-all fork records
                            // the full run's statistics, as `full`'s own runner does.
                            let full = plans[k].is_full().then(|| {
                                compress::full_stats(rec.prompt_tokens.unwrap_or(0), n_layers, kvh)
                            });
                            let filled = res.map_err(|e| candle_msg(&e)).and_then(|(g, stats)| {
                                fill(lm, rec, &g, full.as_ref().unwrap_or(&stats), s)
                            });
                            if let Err(e) = filled {
                                rec.error = Some(e);
                            }
                        }
                    }
                }
            }
        }
    }
    recs
}

/// A sample's prompt ids and decoding parameters.
struct Prepared {
    ids: Vec<u32>,
    params: GenParams,
    chat: bool,
    truncated: bool,
    /// The prompt does not fit the model's context (the rows record the prompt, then fail).
    too_long: Option<String>,
}

fn prepare(
    lm: &LoadedModel,
    task: &Task,
    row: &crate::data::longbench::Row,
    s: &SampleSettings,
) -> Result<Prepared, String> {
    let filled = task
        .build_prompt(&row.context, &row.input)
        .map_err(|e| e.to_string())?;
    let has_template = lm.tokenizer.chat_template.is_some();
    let chat = match s.chat {
        ChatMode::Auto => task.chat_template && has_template,
        ChatMode::Always => true,
        ChatMode::Never => false,
    };
    let built = if task.is_ruler() {
        // Generated to fit: no truncation; the answer prefix follows the generation prompt.
        let ids = crate::model::prompt_ids_for(
            &lm.tokenizer,
            &filled,
            chat,
            row.answer_prefix.as_deref().unwrap_or(""),
        )
        .map_err(|e| e.to_string())?;
        prompt::BuiltPrompt {
            orig_tokens: ids.len(),
            ids,
            truncated: false,
            chat,
        }
    } else {
        prompt::build(lm, &filled, s.max_input_tokens, chat).map_err(|e| e.to_string())?
    };
    let max_ctx = lm.config().max_context();
    let too_long = (built.ids.len() >= max_ctx).then(|| {
        format!(
            "prompt too long: {} tokens after truncation to {} (+ chat template), the model's context holds {max_ctx}: lower --max-input-tokens",
            built.ids.len(),
            s.max_input_tokens
        )
    });
    let (stop_ids, min_new) = if task.base == "samsum" {
        // pred.py: eos_token_id=[tokenizer.eos_token_id, encode("\n")[-1]], min_length=len+1.
        let mut ids: BTreeSet<u32> = lm
            .tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| lm.tokenizer.token_to_id(t))
            .into_iter()
            .collect();
        if ids.is_empty() {
            ids = lm.stop_ids.clone();
        }
        let nl = lm
            .tokenizer
            .encode("\n", false)
            .map_err(|e| e.to_string())?;
        ids.extend(nl.last());
        (ids, 1)
    } else {
        (lm.stop_ids.clone(), 0)
    };
    let params = GenParams {
        max_new_tokens: s.max_new_tokens.unwrap_or(task.max_new_tokens),
        stop_ids,
        min_new_tokens: min_new,
        prefill_chunk: s.prefill_chunk,
        max_context: max_ctx,
    };
    Ok(Prepared {
        ids: built.ids,
        params,
        chat,
        truncated: built.truncated,
        too_long,
    })
}

/// Write a generation's prediction, finish reason, kept KVs and timings into `rec`.
fn fill(
    lm: &LoadedModel,
    rec: &mut PredRecord,
    g: &Generation,
    stats: &CompressionStats,
    s: &SampleSettings,
) -> Result<(), String> {
    rec.pred = lm
        .tokenizer
        .decode(&g.output_ids, true)
        .map_err(|e| e.to_string())?;
    rec.new_tokens = Some(g.output_ids.len());
    rec.finish_reason = Some(
        match g.finish_reason {
            FinishReason::Stop => {
                if g.output_ids.last().is_some_and(|t| lm.stop_ids.contains(t)) {
                    "eos"
                } else {
                    "stop"
                }
            }
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
        .to_string(),
    );
    rec.cache_tokens = Some(stats.cache_tokens(lm.config()));
    if s.dump_allocation && !stats.kept_per_head.is_empty() {
        rec.kept_per_head = Some(stats.kept_per_head.clone());
    }
    rec.achieved_rate = Some(stats.achieved_rate());
    rec.prefill_ms = Some(g.prefill_ms);
    rec.prefill_times = Some(g.prefill_times);
    rec.decode_ms = Some(g.decode_ms);
    rec.decode_times = Some(g.decode_times);
    Ok(())
}

/// Appends rows to a prediction file, each synced before returning.
pub struct PredWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl PredWriter {
    pub fn open(path: &Path) -> Result<PredWriter, EvalError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        Ok(PredWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// One line, written with a single `write_all` and synced.
    pub fn append(&mut self, rec: &PredRecord) -> Result<(), EvalError> {
        let mut line = rec.to_json_line();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io(&self.path, e))
    }
}

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

/// Most samples `kvc eval` batches by default on a GPU (the SmolLM2 sweep was measured with 32).
pub const AUTO_BATCH_MAX: usize = 32;

/// Bytes the paged cache of one sample may take at `tokens` tokens of context: every head of
/// every layer full (K, V, metric, position and table entries, [`MemoryLayout`]), twice (the
/// prompt's cache and its forks at their budgets, which together never exceed one more full
/// copy, as `PagedRunner::run_batched` sizes its pool).
///
/// [`MemoryLayout`]: crate::kvcache::blocks::MemoryLayout
pub fn sample_kv_bytes(
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype_bytes: usize,
    block_size: usize,
    tokens: usize,
) -> u64 {
    let bs = block_size.max(1);
    let layout = crate::kvcache::blocks::MemoryLayout {
        block_size: bs,
        head_dim,
        dtype_bytes,
    };
    let blocks_per_head = tokens.div_ceil(bs) as u64 + 1;
    2 * (layers * kv_heads) as u64 * blocks_per_head * layout.bytes_per_block()
}

/// `--batch-samples` when not given: the samples whose caches ([`sample_kv_bytes`]) fit in
/// three quarters of the device's free memory (the rest is for prefill activations and
/// attention scores), less one sample's worth for the transient copy a fork makes; at least 1,
/// at most [`AUTO_BATCH_MAX`]. `free`: `None` on the CPU (1).
pub fn auto_batch_samples(free: Option<u64>, per_sample: u64) -> usize {
    let Some(free) = free else { return 1 };
    let per = per_sample.max(1);
    let usable = (free / 4 * 3).saturating_sub(per);
    ((usable / per) as usize).clamp(1, AUTO_BATCH_MAX)
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
}

/// Test hooks (environment): abort the process after N appended rows (a kill without any
/// cleanup), and sleep before each sample (so a test can interrupt a run midway).
fn test_hooks() -> (Option<usize>, Option<u64>) {
    let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    (
        num("KVC_EVAL_TEST_ABORT_AFTER").map(|n: u64| n as usize),
        num("KVC_EVAL_TEST_SAMPLE_DELAY_MS"),
    )
}

/// The plans of a sweep in groups that share each sample's prefill: every budget of one
/// compressed method is one group (its prompt KVs and prefill metrics do not depend on the
/// budget); with `share` off, every plan is a group of its own. `full` is a group of its own
/// too, unless `full_joins`: then it is the last member of the first compressed method's group
/// (a keep-all fork of that method's prefill, taking the prompt's own cache: no prefill and no
/// copy of its own; kvc does this on a GPU, where `full`'s batches decode through the paged
/// cache either way). Plan order is kept otherwise (groups by first member).
pub fn group_plans(plans: &[RunPlan], share: bool, full_joins: bool) -> Vec<Vec<&RunPlan>> {
    let mut groups: Vec<Vec<&RunPlan>> = Vec::new();
    let mut full = Vec::new();
    for p in plans {
        if p.is_full() && share && full_joins {
            full.push(p);
            continue;
        }
        let joins = share && !p.is_full();
        match groups
            .iter_mut()
            .find(|g| joins && g[0].method == p.method && !g[0].is_full())
        {
            Some(g) => g.push(p),
            None => groups.push(vec![p]),
        }
    }
    // `full` was held back only when joining: every group here is a compressed method's.
    match groups.first_mut() {
        Some(g) => g.extend(full),
        None => groups.extend(full.into_iter().map(|p| vec![p])),
    }
    groups
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

/// Run a group of plans of one method (see [`group_plans`]) over every subset, resuming each
/// run on its own: a sample is generated once for all runs that still lack it (one prefill),
/// and each run's row is appended to its own file. One outcome per plan, in order.
pub fn run_group(
    lm: &mut LoadedModel,
    plans: &[&RunPlan],
    sw: &Sweep,
    obs: &mut dyn Observer,
    appended: &mut usize,
) -> Result<Vec<RunOutcome>, EvalError> {
    let (abort_after, delay_ms) = test_hooks();
    // The group's method (a `full` member is a keep-all fork of it, see [`group_plans`]).
    let lead = plans.iter().find(|p| !p.is_full()).unwrap_or(&plans[0]);
    let mut runner = compress::runner(
        &lead.method,
        lead.compress_budget(),
        lm.config(),
        sw.method_options,
    )
    .map_err(|e| EvalError::Method(format!("{e:#}")))?;
    let mut outs = Vec::with_capacity(plans.len());
    // Per plan, per subset: the selected ids not finished yet.
    let mut todo: Vec<Vec<HashSet<String>>> = Vec::with_capacity(plans.len());
    for plan in plans {
        let dir = run_dir(sw.out, &lm.name, &plan.method.name, plan.budget);
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
        // Resume state of every subset first, so the progress bar knows the total.
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
        let mut writers: Vec<Option<PredWriter>> = Vec::with_capacity(plans.len());
        for (k, o) in outs.iter().enumerate() {
            writers.push(if todo[k][i].is_empty() {
                None
            } else {
                let path = o.dir.join("preds").join(format!("{}.jsonl", sp.task.name));
                Some(PredWriter::open(&path)?)
            });
        }
        let rows: Box<dyn Iterator<Item = Result<crate::data::longbench::Row, EvalError>>> =
            match sw.generated.get(sp.task.name) {
                Some(rows) => Box::new(rows.iter().cloned().map(Ok)),
                None => Box::new(
                    sw.data
                        .rows(sp.task.name)?
                        .map(|r| r.map(|(_, row)| row).map_err(EvalError::from)),
                ),
            };
        let mut rows = rows;
        loop {
            // The next samples (up to --batch-samples) and the runs that lack each.
            let mut chunk: Vec<(crate::data::longbench::Row, Vec<usize>)> = Vec::new();
            while chunk.len() < sw.batch_samples.max(1) && left > 0 {
                let Some(r) = rows.next() else { break };
                let row = r?;
                let need: Vec<usize> = (0..plans.len())
                    .filter(|&k| todo[k][i].remove(&row.id))
                    .collect();
                if need.is_empty() {
                    continue;
                }
                left -= need.len();
                chunk.push((row, need));
            }
            if chunk.is_empty() {
                break;
            }
            if sw.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break 'subsets;
            }
            if let Some(ms) = delay_ms {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            let recs = run_samples(lm, runner.as_mut(), plans, sp.task, &chunk, &sw.settings);
            if sw.abandon.load(Ordering::SeqCst) {
                interrupted = true;
                break 'subsets;
            }
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

/// Checksum verdicts as a JSON map for run.json, and the warnings for differing files.
pub fn data_report(subsets: &[SubsetPlan]) -> (serde_json::Value, Vec<String>) {
    let mut files = BTreeMap::new();
    let mut warnings = Vec::new();
    for s in subsets {
        if let Some(v) = &s.verdict {
            match v {
                Verdict::Differs { sha256, official } => warnings.push(format!(
                    "{}: the data file differs from the official LongBench file (sha256 {sha256}, official {official}); scores may not compare with published numbers",
                    s.task.name
                )),
                Verdict::Mirror { .. } => warnings.push(format!(
                    "{}: read from parquet, not the official JSONL file: its rows cannot be checked against the official sha256",
                    s.task.name
                )),
                _ => {}
            }
            files.insert(
                s.task.name.to_string(),
                serde_json::to_value(v).unwrap_or_default(),
            );
        }
    }
    (serde_json::to_value(files).unwrap_or_default(), warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_batch_fits_free_memory() {
        // SmolLM2-135M in bf16 at 7500 + 512 tokens: ~364 MiB per sample.
        let smol = sample_kv_bytes(30, 3, 64, 2, 16, 8012);
        assert!((350 << 20..380 << 20).contains(&smol), "{smol}");
        // Llama-3.1-8B in bf16 at 127500 + 512 tokens: ~32 GiB per sample.
        let llama = sample_kv_bytes(32, 8, 128, 2, 16, 128_012);
        assert!((31 << 30..33 << 30).contains(&llama), "{llama}");
        assert_eq!(auto_batch_samples(None, smol), 1, "the CPU");
        assert_eq!(auto_batch_samples(Some(139 << 30), smol), AUTO_BATCH_MAX);
        // An 80 GB H100 with the 8B model's 16 GB of weights loaded.
        assert_eq!(auto_batch_samples(Some(63 << 30), llama), 1);
        // 3/4 of 8 GiB = 6 GiB, less one sample of 1 GiB: 5.
        assert_eq!(auto_batch_samples(Some(8 << 30), 1 << 30), 5);
        assert_eq!(auto_batch_samples(Some(1 << 20), 1 << 30), 1);
    }

    fn m(n: &str) -> MethodSpec {
        MethodSpec { name: n.into() }
    }

    #[test]
    fn plan_puts_full_first_once_and_rounds_token_budgets() {
        let (runs, notes) =
            plan_runs(&[m("full"), m("kvcompress")], &[1.0, 2.0, 8.0], &[100, 128]).unwrap();
        let labels: Vec<_> = runs.iter().map(RunPlan::label).collect();
        assert_eq!(
            labels,
            [
                "full/rate1",
                "kvcompress/rate2",
                "kvcompress/rate8",
                "kvcompress/tokens112",
                "kvcompress/tokens128"
            ]
        );
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("100") && notes[0].contains("112"));
        assert!(runs[0].compress_budget().is_none());
        assert_eq!(runs[1].compress_budget(), Some(Budget::Rate(2.0)));
        let e = plan_runs(&[m("kvcompress")], &[0.5], &[]).unwrap_err();
        assert!(e.to_string().contains(">= 1"), "{e}");
        assert!(plan_runs(&[], &[f64::NAN], &[]).is_err());
        assert!(plan_runs(&[], &[], &[0]).is_err());
    }

    #[test]
    fn full_joins_the_first_method_group_last_only_when_asked() {
        let (runs, _) = plan_runs(
            &[m("full"), m("kvcompress"), m("snapkv")],
            &[1.0, 2.0, 8.0],
            &[],
        )
        .unwrap();
        let labels = |share, joins| -> Vec<Vec<String>> {
            group_plans(&runs, share, joins)
                .iter()
                .map(|g| g.iter().map(|p| p.label()).collect())
                .collect()
        };
        let (f, k2, k8) = ("full/rate1", "kvcompress/rate2", "kvcompress/rate8");
        let (s2, s8) = ("snapkv/rate2", "snapkv/rate8");
        assert_eq!(
            labels(true, false),
            vec![vec![f], vec![k2, k8], vec![s2, s8]]
        );
        // `full` last: its fork takes the prompt's own cache.
        assert_eq!(labels(true, true), vec![vec![k2, k8, f], vec![s2, s8]]);
        assert_eq!(
            labels(false, true),
            vec![vec![f], vec![k2], vec![k8], vec![s2], vec![s8]]
        );
        let (only_full, _) = plan_runs(&[m("full")], &[1.0], &[]).unwrap();
        let g = group_plans(&only_full, true, true);
        assert_eq!((g.len(), g[0][0].label()), (1, f.to_string()));
    }

    #[test]
    fn torn_last_line_is_cut_and_bad_middle_line_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.jsonl");
        let good = r#"{"pred":"a","answers":["a"],"all_classes":null,"_id":"1"}"#;
        let failed = r#"{"pred":"","answers":["a"],"all_classes":null,"_id":"2","error":"oom"}"#;
        std::fs::write(&p, format!("{good}\n{failed}\n{{\"pred\":\"b\",\"ans")).unwrap();
        let ex = load_existing(&p).unwrap();
        assert_eq!(ex.done.len(), 2);
        assert_eq!(ex.n_failed, 1);
        assert!(ex.torn_bytes > 0);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{good}\n{failed}\n")
        );
        std::fs::write(&p, format!("{good}\nnot json\n{good}\n")).unwrap();
        let e = load_existing(&p).unwrap_err().to_string();
        assert!(e.contains("x.jsonl:2"), "{e}");
        assert!(load_existing(&tmp.path().join("absent.jsonl"))
            .unwrap()
            .done
            .is_empty());
    }

    #[test]
    fn config_mismatch_is_refused_unless_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = |max_input| RunConfig {
            model: "m".into(),
            model_source: "/m".into(),
            model_revision: None,
            dtype: "f32".into(),
            method: "full".into(),
            rate: Some(1.0),
            budget_tokens: None,
            method_options: serde_json::json!({}),
            max_input_tokens: max_input,
            max_new_tokens: None,
            chat: ChatMode::Auto,
            prompt: PROMPT_RECIPE.into(),
        };
        let meta = |c: RunConfig| {
            let mut m = RunMeta::default();
            m.extra.insert("config_hash".into(), c.hash().into());
            m.extra
                .insert("config".into(), serde_json::to_value(&c).unwrap());
            m
        };
        let dir = tmp.path().join("run");
        prepare_run_dir(&dir, &meta(cfg(100)), false).unwrap();
        std::fs::write(dir.join("preds/trec.jsonl"), "{}\n").unwrap();
        // Same configuration: resumes (keeps the file).
        prepare_run_dir(&dir, &meta(cfg(100)), false).unwrap();
        assert!(dir.join("preds/trec.jsonl").exists());
        let e = prepare_run_dir(&dir, &meta(cfg(200)), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_input_tokens: 100 -> 200") && e.contains("--overwrite"),
            "{e}"
        );
        prepare_run_dir(&dir, &meta(cfg(200)), true).unwrap();
        assert!(!dir.join("preds/trec.jsonl").exists());
    }
}
