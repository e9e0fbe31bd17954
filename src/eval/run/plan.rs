//! Planning a sweep: the runs (method x budget), their groups that share a prefill, the
//! samples of each subset and the data checks, and how many samples to batch.
use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::{EvalError, BLOCK_SIZE};
use crate::compress::{Budget, MethodOptions, MethodSpec, Preset};
use crate::data::longbench::{DataError, Dataset, Verdict};
use crate::data::tasks::Task;
use crate::kvcache::budget::{shared_pool_blocks, tokens_for_rate, PoolShape};

/// One run of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    pub method: MethodSpec,
    /// The directory budget (`rate1` for the full cache).
    pub budget: Budget,
    /// Compress once after prefill whatever `--compress-once` says (a preset's fixed budgets).
    pub compress_once: bool,
}

impl RunPlan {
    pub fn is_full(&self) -> bool {
        self.method.is_full()
    }
    /// The budget handed to [`crate::compress::runner`] (`None` for the full cache).
    pub fn compress_budget(&self) -> Option<Budget> {
        (!self.is_full()).then_some(self.budget)
    }
    /// The method options of this run: `base` with its own overrides.
    pub fn options(&self, base: &MethodOptions) -> MethodOptions {
        MethodOptions {
            compress_once: base.compress_once || self.compress_once,
            ..base.clone()
        }
    }
    /// `full/rate1`, `kvcompress/rate8`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.method.name, self.budget.label())
    }
}

/// kvpress's `compression_ratio` (the fraction of KVs removed, in [0, 1); 0 = full cache) as
/// kvc's compression rate (prompt KVs / kept KVs): `1 / (1 - ratio)`, rounded to 9 decimals so
/// 0.9 gives rate 10, not 10.000000000000002 (the rate names the run directory).
pub fn rate_from_ratio(ratio: f64) -> Result<f64, EvalError> {
    if !(ratio.is_finite() && (0.0..1.0).contains(&ratio)) {
        return Err(EvalError::Budget(format!(
            "compression ratio {ratio}: a compression_ratio is the fraction of KVs removed, so it must be in [0, 1) (0 = full cache, 0.875 = rate 8); for a compression rate (prompt KVs / kept KVs, >= 1) use --rates"
        )));
    }
    Ok(((1.0 / (1.0 - ratio)) * 1e9).round() / 1e9)
}

/// A compression rate as kvpress's `compression_ratio`: `1 - 1 / rate` (rate 8 -> 0.875).
pub fn ratio_from_rate(rate: f64) -> f64 {
    1.0 - 1.0 / rate
}

/// The runs of a sweep, full cache first, and notes to show (rounded budgets). With a
/// `preset`, fixed budgets compress once and, where the preset pairs them, each budget M also
/// runs at M - [`BLOCK_SIZE`].
pub fn plan_runs(
    methods: &[MethodSpec],
    rates: &[f64],
    cache_tokens: &[usize],
    preset: Option<Preset>,
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
        let paired = preset.is_some_and(|p| p.fixed_budgets_paired()) && r > BLOCK_SIZE;
        for t in std::iter::once(r).chain(paired.then(|| r - BLOCK_SIZE)) {
            if !tokens.contains(&t) {
                tokens.push(t);
            }
        }
    }
    let once = preset.is_some_and(|p| p.fixed_budgets_compress_once());
    let full = MethodSpec {
        name: "full".into(),
    };
    let mut runs = vec![RunPlan {
        method: full,
        budget: Budget::Rate(1.0),
        compress_once: false,
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
                compress_once: once && matches!(b, Budget::Tokens(_)),
            };
            if !runs.contains(&p) {
                runs.push(p);
            }
        }
    }
    Ok((runs, notes))
}

/// The plans of a sweep in groups that share each sample's prefill: every budget of one
/// compressed method is one group (its prompt KVs and prefill metrics do not depend on the
/// budget); with `share` off, every plan is a group of its own. `full` is a group of its own
/// too, unless `full_joins`: then it is the last member of the first compressed method's group
/// that prefills the whole prompt (a keep-all fork of that method's prefill, taking the
/// prompt's own cache: no prefill and no copy of its own; kvc does this on a GPU, where
/// `full`'s batches decode through the paged cache either way; a question-agnostic group
/// prefills the context alone, so `full` never joins one). Plan order is kept otherwise
/// (groups by first member).
pub fn group_plans(plans: &[RunPlan], share: bool, full_joins: bool) -> Vec<Vec<&RunPlan>> {
    let mut groups: Vec<Vec<&RunPlan>> = Vec::new();
    let mut full = Vec::new();
    for p in plans {
        if p.is_full() && share && full_joins {
            full.push(p);
            continue;
        }
        let joins = share && !p.is_full();
        match groups.iter_mut().find(|g| {
            joins
                && g[0].method == p.method
                && g[0].compress_once == p.compress_once
                && !g[0].is_full()
        }) {
            Some(g) => g.push(p),
            None => groups.push(vec![p]),
        }
    }
    // `full` was held back only when joining: every group here is a compressed method's.
    match groups.iter_mut().find(|g| !g[0].method.context_only()) {
        Some(g) => g.extend(full),
        None => groups.extend(full.into_iter().map(|p| vec![p])),
    }
    groups
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

/// Most samples `kvc eval` batches by default on a GPU (larger batches do not pay:
/// docs/findings/2026-12-03-bigger-batches-do-not-pay.md).
pub const AUTO_BATCH_MAX: usize = 32;

/// One sample's paged cache as the sweep forks it: per group of runs sharing a prefill, its
/// budgets in order (`None`: the full cache) and its policy's least budget, sized as
/// `PagedRunner` sizes its pool ([`shared_pool_blocks`]) in bytes of [`MemoryLayout`] blocks.
/// The memory plan and the per-sample check both ask it.
///
/// [`MemoryLayout`]: crate::kvcache::blocks::MemoryLayout
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePool {
    pub layout: crate::kvcache::blocks::MemoryLayout,
    /// Layers x kv-heads.
    pub heads: usize,
    pub max_context: usize,
    pub min_cache_tokens: usize,
    /// Per group: its policy's least budget (0 for `full`) and its budgets in order.
    pub groups: Vec<(usize, Vec<Option<Budget>>)>,
    /// Tokens per head one prompt holds beyond itself while its policy's extra forward passes
    /// run (KVzip's repeat inputs, `Policy::scratch_tokens` at the longest prompt; 0 for the
    /// other methods): the runner adds them to its pool once.
    pub scratch_tokens: usize,
}

impl SamplePool {
    /// Bytes of the largest group's pool for a prompt of `prompt` tokens and `max_new` more.
    pub fn bytes(&self, prompt: usize, max_new: usize) -> u64 {
        let bs = self.layout.block_size;
        let blocks = self
            .groups
            .iter()
            .map(|(min_budget, budgets)| {
                let raws: Vec<Option<usize>> = budgets
                    .iter()
                    .map(|b| match b {
                        None => None,
                        Some(Budget::Rate(r)) => {
                            tokens_for_rate(prompt, *r, bs, self.min_cache_tokens)
                        }
                        Some(Budget::Tokens(n)) => Some(*n),
                    })
                    .collect();
                let shape = PoolShape {
                    block_size: bs,
                    heads: self.heads,
                    max_new_tokens: max_new,
                    max_context: self.max_context,
                    min_budget: *min_budget,
                };
                shared_pool_blocks(&shape, &[(prompt, &raws)])
            })
            .max()
            .unwrap_or(0)
            + self.heads * self.scratch_tokens.div_ceil(bs.max(1));
        blocks as u64 * self.layout.bytes_per_block()
    }
}
