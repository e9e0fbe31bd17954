//! `kvc eval`: generate LongBench predictions for a sweep of compression methods and budgets,
//! resumably, then score and plot them (see [`crate::eval::run`] for the pipeline).
//!
//! Phases of [`run`]: select (methods, rates, tasks, data: no model needed) -> load the model
//! and build every run's method -> generate the RULER prompts -> sweep -> score and report
//! ([`summary`]). Every input error surfaces before the model loads or any generation starts.
mod args;
mod progress;
pub(crate) mod summary;
mod tensor_parallel;
mod workers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};

pub use args::{DataArgs, EvalArgs, GenerationArgs, OutputArgs, QuestionInWindow, SweepArgs};
use progress::Progress;

use crate::compress::{self, MethodSpec};
use crate::data::longbench::{Dataset, Row};
use crate::data::ruler::{RulerTask, Sources};
use crate::data::select::select_tasks;
use crate::eval::memory::{self, prefill_activation_bytes, MemoryPlan};
use crate::eval::record::RunMeta;
use crate::eval::run::{
    self, RunConfig, RunOutcome, RunPlan, SampleSettings, SubsetPlan, Sweep, PROMPT_RECIPE,
};
use crate::eval::shard::{Manifest, Shard};
use crate::hub::{self, HubEnv, ModelSource, ResolvedModel};
use crate::kvcache::budget::Budget;
use crate::model::LoadedModel;
use crate::util::Status;

/// What `kvc eval` with no `--tasks`/`--limit` runs on the bundled sample: the shortest row of
/// multi_news and of multifieldqa_zh, so the embedded default finishes in minutes on a CPU
/// (passage_retrieval_zh's rows are 7530 tokens: `--tasks all` runs the whole sample).
const BUNDLED_DEFAULT_TASKS: [&str; 2] = ["multi_news", "multifieldqa_zh"];
const BUNDLED_DEFAULT_LIMIT: usize = 1;

/// Notes on stderr unless `--quiet`.
struct Note(bool);

impl Note {
    fn say(&self, m: &str) {
        if !self.0 {
            eprintln!("{m}");
        }
    }
}

/// What the command runs, decided before the model loads.
struct Selection {
    plans: Vec<RunPlan>,
    data: Dataset,
    /// Whether LongBench rows are read at all (not for a RULER-only run).
    needs_longbench: bool,
    /// No `--data-dir`: the bundled sample and its defaults.
    bundled: bool,
    ruler_tasks: Vec<&'static RulerTask>,
    /// Where the RULER prompts' words and essays come from (`None` without RULER tasks).
    ruler_sources: Option<&'static Sources>,
    subsets: Vec<SubsetPlan>,
    samples: Option<BTreeSet<String>>,
    /// Per-file data checks for run.json, and the warnings they raised.
    files_json: serde_json::Value,
    data_warnings: Vec<String>,
}

/// The loaded model and what it was loaded as.
struct Loaded {
    lm: LoadedModel,
    resolved: ResolvedModel,
    device: Device,
    dtype: DType,
    /// Device memory the load took (`None` on the CPU).
    weight_bytes: Option<u64>,
}

/// Run `kvc eval` (the module docs give the phases).
pub fn run(mut args: EvalArgs) -> anyhow::Result<Status> {
    if let Some(spec) = &args.output.devices {
        let devices = workers::parse_devices(spec)?;
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let o = &args.output;
        return workers::run(&argv, &devices, &o.out, o.quiet, o.no_progress);
    }
    if let Some(p) = args.sweep.preset {
        args.sweep.method_options = p.apply(&args.sweep.method_options);
    }
    let world = args.output.tensor_parallel as usize;
    if world > 1 {
        return tensor_parallel::run(args, world);
    }
    let note = Note(args.output.quiet);
    let sel = select(&args, &note)?;
    let m = load(&args, &sel.plans, &note)?;
    sweep_loaded(args, sel, m, &note, None)
}

/// Everything after the model is loaded: the RULER prompts, the memory plan, the sweep and
/// the report. A tensor-parallel rank (`ranks`) takes rank 0's memory plan, and only rank 0
/// reports (the others write into scratch copies of the results tree).
fn sweep_loaded(
    mut args: EvalArgs,
    mut sel: Selection,
    mut m: Loaded,
    note: &Note,
    ranks: Option<compress::ranks::RankExchange>,
) -> anyhow::Result<Status> {
    if sel.plans.iter().any(|p| p.method.base() == "kvzip") {
        // KVzip's repeat requests and the chat template's parts, in the model's ids.
        let text = compress::kvzip::RepeatTexts::new(&m.lm.tokenizer)?;
        args.sweep.method_options.kvzip_text = Some(text);
    }
    let max_input = max_input_tokens(&args, &m.lm);
    let mut settings = sample_settings(&args, &m, max_input);
    let generated = add_ruler(&args, &m.lm, &settings, &mut sel, note)?;
    run::check_samples_found(sel.samples.as_ref(), &sel.subsets)?;
    if let Some(path) = &args.output.export_prompts {
        let n = run::export_prompts(
            &m.lm,
            (&sel.data, &generated),
            &sel.subsets,
            &settings,
            path,
        )?;
        note.say(&format!("wrote {n} prompts to {}", path.display()));
        return Ok(Status::Ok);
    }
    if let Some(shard) = args.output.shard {
        args.output.out = take_shard(shard, &args.output.out, &mut sel, note)?;
    }
    // On a GPU `full` decodes through the paged cache in batches anyway: it joins the first
    // compressed method's group as a keep-all fork of its prefill (run::group_plans). Not with
    // --kv-memory, which bounds that method's pool and never the full cache.
    let full_joins = m.device.is_cuda() && args.sweep.method_options.kv_memory.is_none();
    let mut planned = memory_plan(&args, &m, &sel, &settings, max_input)?;
    if let (Some(x), Some((plan, _))) = (&ranks, &mut planned) {
        tensor_parallel::agree_on_plan(x, plan)?;
    }
    let batch_samples = match planned {
        Some((plan, pool)) => {
            note.say(&plan.describe());
            if let Some(w) = plan.shortfall() {
                eprintln!("warning: {w}");
            }
            settings.prefill_chunk = plan.chunk;
            settings.cache_room = Some((plan.cache_room(), pool));
            plan.batch
        }
        None => args.sweep.batch_samples.unwrap_or(1),
    };
    let mut meta = MetaBuilder::new(
        &args,
        (&m.resolved, m.dtype, &m.device),
        &sel,
        max_input,
        (full_joins, batch_samples),
    )?;
    // FP8 matmuls change the outputs (their activations are quantized): a run of its own.
    if m.lm.model.fp8 == crate::model::llama::Fp8Weights::Matmul {
        meta.dtype.push_str("+fp8-matmul");
    }
    let meta_fn = |p: &RunPlan| meta.meta(p);
    let rank = ranks.as_ref().map_or(0, |x| x.shard().rank);
    // Under tensor parallelism the first rank here installs the handler; the ranks agree on
    // stopping through the group (`Sweep::ranks`).
    let (stop, abandon) = ctrl_c();
    let sweep = Sweep {
        out: &args.output.out,
        data: &sel.data,
        generated: &generated,
        subsets: &sel.subsets,
        settings,
        method_options: &args.sweep.method_options,
        overwrite: args.output.overwrite,
        meta: &meta_fn,
        stop: &stop,
        abandon: &abandon,
        retry_failed: args.output.retry_failed,
        batch_samples,
        ranks,
    };
    let mut progress = Progress::new(args.output.no_progress, args.output.quiet);
    let outcomes = run_sweep(
        &args,
        &mut m.lm,
        &sel.plans,
        &sweep,
        &mut progress,
        full_joins,
    )?;
    if rank > 0 {
        return Ok(Status::Ok);
    }
    if let Some(shard) = args.output.shard {
        return Ok(summary::shard_done(shard, &args.output.out, &outcomes));
    }
    summary::report(
        &args,
        &m.lm,
        &m.device,
        &sel.plans,
        &outcomes,
        &mut progress,
        &sel.data_warnings,
    )
}

/// Keep only `shard`'s samples in `sel` and write the shard's manifest (every selected sample,
/// for `kvc merge`; the rows the shard will write, for `--devices`' progress bar). Returns the
/// shard's own results tree under `out`.
fn take_shard(
    shard: Shard,
    out: &std::path::Path,
    sel: &mut Selection,
    note: &Note,
) -> anyhow::Result<std::path::PathBuf> {
    let subsets = sel
        .subsets
        .iter()
        .map(|s| (s.task.name.to_string(), s.ids.clone()))
        .collect();
    for s in &mut sel.subsets {
        s.ids.retain(|id| shard.owns(s.task.name, id));
    }
    let owned: usize = sel.subsets.iter().map(|s| s.ids.len()).sum();
    let manifest = Manifest {
        shard,
        subsets,
        // One row per sample and run.
        rows: Some(owned * sel.plans.len()),
    };
    let tree = shard.tree(out);
    manifest.write(&tree).with_context(|| {
        format!(
            "writing {}",
            tree.join(crate::eval::shard::MANIFEST).display()
        )
    })?;
    note.say(&format!(
        "shard {}/{}: {} of {} samples -> {}",
        shard.index,
        shard.count,
        owned,
        manifest.subsets.values().map(Vec::len).sum::<usize>(),
        tree.display()
    ));
    Ok(tree)
}

/// `--methods` under `--question-in-window`: `no` runs each compressed method as its
/// `@context-only` variant, `both` runs both (names given with the suffix stay as given).
fn protocol_methods(methods: Vec<MethodSpec>, q: QuestionInWindow) -> Vec<MethodSpec> {
    let mut out: Vec<MethodSpec> = Vec::new();
    for m in methods {
        let agnostic = (!m.is_full()).then(|| m.context_only_variant());
        let take = match q {
            QuestionInWindow::Yes => vec![Some(m)],
            QuestionInWindow::No if m.is_full() => vec![Some(m)],
            QuestionInWindow::No => vec![agnostic],
            QuestionInWindow::Both => vec![Some(m), agnostic],
        };
        for t in take.into_iter().flatten() {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// Methods, rates, tasks and data, all checked without the model.
fn select(args: &EvalArgs, note: &Note) -> anyhow::Result<Selection> {
    let methods = protocol_methods(
        args.sweep
            .methods
            .iter()
            .map(|m| MethodSpec::parse(m))
            .collect::<anyhow::Result<Vec<_>>>()?,
        args.sweep.question_in_window,
    );
    let bundled = args.data.data_dir.is_none();
    let ratio_rates = match &args.sweep.ratios {
        Some(ratios) => Some(
            ratios
                .iter()
                .map(|&x| run::rate_from_ratio(x))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("--ratios: {e}"))?,
        ),
        None => None,
    };
    let rates = match ratio_rates.as_ref().or(args.sweep.rates.as_ref()) {
        Some(r) => r.clone(),
        None if !args.sweep.cache_tokens.is_empty() => vec![],
        None if bundled => vec![1.0, 2.0, 4.0, 8.0, 64.0],
        None => vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
    };
    let (plans, notes) = run::plan_runs(
        &methods,
        &rates,
        &args.sweep.cache_tokens,
        args.sweep.preset,
    )?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let (ruler_tasks, longbench_spec) = split_tasks(args.data.tasks.as_deref().unwrap_or(""))?;
    // LongBench rows are read only when a LongBench subset is asked for: a RULER-only run
    // needs no data files (the bundled sample stands in, never read).
    let needs_longbench = args.data.tasks.is_none() || !longbench_spec.is_empty();
    let data = match &args.data.data_dir {
        Some(d) if needs_longbench => Dataset::open(d, &HubEnv::from_env())?,
        Some(d) => {
            note.say(&format!(
                "note: --data-dir {d} is not read: only RULER tasks were asked for"
            ));
            Dataset::bundled()
        }
        None => Dataset::bundled(),
    };
    if !ruler_tasks.is_empty() {
        anyhow::ensure!(
            args.data.ruler_samples > 0,
            "--ruler-samples must be at least 1"
        );
        anyhow::ensure!(
            !args.data.lengths.is_empty() && args.data.lengths.iter().all(|l| *l > 0),
            "--lengths: give positive token lengths, e.g. 1024,2048,4096"
        );
    }
    let bundled_subsets =
        |only: &[&str]| -> anyhow::Result<Vec<&'static crate::data::tasks::Task>> {
            let have = data.subsets()?;
            Ok(crate::data::tasks::LONGBENCH
                .iter()
                .filter(|t| only.is_empty() || only.contains(&t.name))
                .filter(|t| have.iter().any(|h| h == t.name))
                .collect())
        };
    let tasks = match &args.data.tasks {
        Some(_) if longbench_spec.is_empty() => Vec::new(),
        // `all` on the bundled sample: every subset it has.
        Some(_) if bundled && longbench_spec == ["all"] => bundled_subsets(&[])?,
        Some(_) => select_tasks(&longbench_spec.join(","))?,
        None if bundled => bundled_subsets(&BUNDLED_DEFAULT_TASKS)?,
        None => select_tasks("en16")?,
    };
    let samples: Option<BTreeSet<String>> =
        (!args.data.samples.is_empty()).then(|| args.data.samples.iter().cloned().collect());
    let limit = match args.data.limit {
        None if bundled && args.data.tasks.is_none() && samples.is_none() => {
            Some(BUNDLED_DEFAULT_LIMIT)
        }
        l => l,
    };
    let subsets = run::inspect_data(&data, &tasks, limit, samples.as_ref(), !bundled)?;
    let (files_json, data_warnings) = run::data_report(&subsets);
    for w in &data_warnings {
        eprintln!("warning: {w}");
    }
    note.say(&format!(
        "data: {} ({} subsets, {} samples); runs: {}",
        if needs_longbench {
            data.description.as_str()
        } else {
            "no LongBench files (RULER only)"
        },
        subsets.len(),
        subsets.iter().map(|s| s.ids.len()).sum::<usize>(),
        plans
            .iter()
            .map(RunPlan::label)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // Read before the model loads, as every input (a missing sources directory is an error).
    let sources = if ruler_tasks.is_empty() {
        None
    } else {
        Some(ruler_sources(args.data.ruler_sources.as_deref(), note)?)
    };
    Ok(Selection {
        plans,
        data,
        needs_longbench,
        bundled,
        ruler_sources: sources,
        ruler_tasks,
        subsets,
        samples,
        files_json,
        data_warnings,
    })
}

/// `--tasks` split into RULER entries (`ruler`, `ruler:<task>`: generated after the model
/// loads, prompts are fitted with its tokenizer) and LongBench subset specs.
fn split_tasks(spec: &str) -> anyhow::Result<(Vec<&'static RulerTask>, Vec<&str>)> {
    let mut ruler_tasks: Vec<&'static RulerTask> = Vec::new();
    let mut longbench = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match crate::data::ruler::select(item) {
            Some(r) => {
                for t in r? {
                    if !ruler_tasks.iter().any(|x| x.name == t.name) {
                        ruler_tasks.push(t);
                    }
                }
            }
            None => longbench.push(item),
        }
    }
    Ok((ruler_tasks, longbench))
}

/// The model, and every run's method built once up front (so an unimplemented method fails
/// now, not after hours of full-cache generation).
fn load(args: &EvalArgs, plans: &[RunPlan], note: &Note) -> anyhow::Result<Loaded> {
    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    let resolved = args.model.resolve()?;
    let t_load = Instant::now();
    let free_before = crate::cuda::device_memory(&device)?.map(|(free, _)| free);
    let lm = args.model.load_resolved(&resolved, &device, dtype, None)?;
    let free_after = crate::cuda::device_memory(&device)?.map(|(free, _)| free);
    let weight_bytes = free_before
        .zip(free_after)
        .map(|(b, a)| b.saturating_sub(a));
    note.say(&format!(
        "model: {} loaded in {:.1}s on {:?} ({:?})",
        lm.name,
        t_load.elapsed().as_secs_f64(),
        device,
        dtype
    ));
    if let Some(n) = lm.weights_note() {
        note.say(&n);
    }
    check_methods(args, &lm, plans)?;
    Ok(Loaded {
        lm,
        resolved,
        device,
        dtype,
        weight_bytes,
    })
}

/// Build every run's method once, so a bad method option fails before any generation.
fn check_methods(args: &EvalArgs, lm: &LoadedModel, plans: &[RunPlan]) -> anyhow::Result<()> {
    for p in plans {
        compress::runner(
            &p.method,
            p.compress_budget(),
            lm.config(),
            &p.options(&args.sweep.method_options),
        )
        .with_context(|| format!("run {}", p.label()))?;
    }
    Ok(())
}

/// `--max-input-tokens`, else the model's LongBench value, else its context - 512 (noted).
fn max_input_tokens(args: &EvalArgs, lm: &LoadedModel) -> usize {
    if let Some(m) = args.generation.max_input_tokens {
        return m;
    }
    hub::default_max_input(&lm.name).unwrap_or_else(|| {
        let m = lm.config().max_context().saturating_sub(512).max(1);
        eprintln!("note: no LongBench max input length is known for {}: truncating prompts to {m} tokens (context - 512); set --max-input-tokens", lm.name);
        m
    })
}

/// How every sample is generated. The default prefill chunk: on a GPU with the flash kernel
/// (memory linear in the chunk, many queries per launch) 8192; the unfused GPU path
/// materialises the scores: 2048; the CPU: 512.
fn sample_settings(args: &EvalArgs, m: &Loaded, max_input: usize) -> SampleSettings {
    let cuda = m.device.is_cuda();
    let flash = cuda
        && !args.sweep.method_options.unfused_prefill
        && crate::cuda::prefill_attention::prefill_attention_supported(
            m.dtype,
            m.lm.model.cfg.head_dim,
        );
    SampleSettings {
        max_input_tokens: max_input,
        max_new_tokens: args.generation.max_new_tokens,
        chat: args.generation.chat,
        prefill_chunk: match args.generation.prefill_chunk {
            Some(c) => c as usize,
            None if flash => 8192,
            None if cuda => 2048,
            None => 512,
        },
        dump_allocation: args.output.dump_allocation,
        cache_room: None,
    }
}

/// RULER's words and essays: `arg` (a directory, or `fallback`), else `ruler-sources/` in the
/// first models directory that has one, else kvc's offline fallback with a warning. Loaded
/// once per process (leaked: the prompts borrow it for the whole run).
fn ruler_sources(arg: Option<&str>, note: &Note) -> anyhow::Result<&'static Sources> {
    let dir = match arg {
        Some("fallback") => return Ok(Sources::fallback()),
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let candidates: Vec<std::path::PathBuf> = hub::embedded_dirs()
                .iter()
                .map(|d| d.join("ruler-sources"))
                .collect();
            let Some(d) = candidates.iter().find(|d| d.is_dir()) else {
                let looked: Vec<String> =
                    candidates.iter().map(|d| d.display().to_string()).collect();
                eprintln!(
                    "warning: RULER's word lists and essays are not installed (looked in {}): generating from kvc's offline fallback (`kvc-fallback`: committed words, multi_news haystack; named in run.json and the sample ids). Run scripts/fetch-ruler-sources.sh for RULER's own, or pass --ruler-sources fallback to silence this.",
                    looked.join(", ")
                );
                return Ok(Sources::fallback());
            };
            d.clone()
        }
    };
    let s = Sources::load(&dir)?;
    note.say(&format!(
        "ruler: sources `{}` from {} (sha256 {}…)",
        s.name,
        dir.display(),
        &s.digest[..12]
    ));
    Ok(Box::leak(Box::new(s)))
}

/// The RULER subsets, generated with the model's tokenizer and added to `sel`; returns their
/// rows by subset name.
fn add_ruler(
    args: &EvalArgs,
    lm: &LoadedModel,
    settings: &SampleSettings,
    sel: &mut Selection,
    note: &Note,
) -> anyhow::Result<BTreeMap<String, Vec<Row>>> {
    if sel.ruler_tasks.is_empty() {
        return Ok(BTreeMap::new());
    }
    let sources = sel
        .ruler_sources
        .expect("select resolves the sources of RULER tasks");
    let t_gen = Instant::now();
    let plan = run::RulerPlan {
        tasks: sel.ruler_tasks.clone(),
        lengths: args.data.lengths.clone(),
        samples: args.data.ruler_samples,
        seed: args.data.seed,
        sources,
    };
    let (mut ruler_subsets, rows) = run::generate_ruler(lm, &plan, settings)?;
    for sp in &mut ruler_subsets {
        if let Some(s) = &sel.samples {
            sp.ids.retain(|id| s.contains(id));
        }
        if let Some(l) = args.data.limit {
            sp.ids.truncate(l);
        }
    }
    note.say(&format!(
        "ruler: {} subsets x {} samples generated in {:.1}s (seed {})",
        ruler_subsets.len(),
        args.data.ruler_samples,
        t_gen.elapsed().as_secs_f64(),
        args.data.seed
    ));
    sel.subsets.extend(ruler_subsets);
    Ok(rows)
}

/// On a GPU, the memory plan (see [`crate::eval::memory`]) for the longest context: the
/// prefill chunk (kept when `--prefill-chunk` is given) and the samples per batch (kept when
/// `--batch-samples` is). `None` on the CPU.
fn memory_plan(
    args: &EvalArgs,
    m: &Loaded,
    sel: &Selection,
    settings: &SampleSettings,
    max_input: usize,
) -> anyhow::Result<Option<(MemoryPlan, run::SamplePool)>> {
    let Some((free, _)) = crate::cuda::device_memory(&m.device)? else {
        return Ok(None);
    };
    let longest = if sel.ruler_tasks.is_empty() {
        max_input
    } else {
        max_input.max(args.data.lengths.iter().copied().max().unwrap_or(0))
    };
    let new = sel
        .subsets
        .iter()
        .map(|s| {
            args.generation
                .max_new_tokens
                .unwrap_or(s.task.max_new_tokens)
        })
        .max()
        .unwrap_or(0);
    let c = m.lm.config();
    let bytes = m.dtype.size_in_bytes();
    let policies = policy_facts(&sel.plans, c, &args.sweep.method_options)?;
    let scratch = scratch_tokens(&sel.plans, c, &args.sweep.method_options, longest)?;
    let pool = sample_pool(args, m, sel, &policies, scratch);
    let per_sample = pool.bytes(longest, new);
    let act = |chunk: usize| {
        let observed = policies
            .iter()
            .map(|&(_, p, splits, _)| {
                let rows = memory::probed_rows(p, splits, chunk, longest);
                memory::probe_bytes(c.num_attention_heads, rows, longest, bytes)
            })
            .max()
            .unwrap_or(0);
        prefill_activation_bytes(c, bytes, chunk) + observed
    };
    let mut plan = MemoryPlan::new(
        free,
        m.weight_bytes.unwrap_or(0),
        (longest + new, per_sample),
        act,
        settings.prefill_chunk,
        args.sweep.batch_samples,
    );
    if args.generation.prefill_chunk.is_some() {
        plan.chunk = settings.prefill_chunk;
        plan.activations = act(plan.chunk);
    }
    Ok(Some((plan, pool)))
}

/// Per compressed run: its label, prefill probe, whether it observes its window in query
/// blocks (the memory plan's observed-attention bytes) and its least budget (its pool).
fn policy_facts(
    plans: &[RunPlan],
    cfg: &crate::model::config::Config,
    base: &compress::MethodOptions,
) -> anyhow::Result<Vec<(String, crate::kvcache::Probe, bool, usize)>> {
    plans
        .iter()
        .filter(|p| !p.is_full())
        .map(|p| {
            let policy = compress::build_policy(&p.method, cfg, &p.options(base))?;
            let facts = (policy.prefill_probe(), policy.score_splits());
            Ok((p.label(), facts.0, facts.1, policy.min_budget()))
        })
        .collect()
}

/// The most tokens per head any compressed run's extra forward passes add to a prompt of
/// `longest` tokens (KVzip's repeat inputs; 0 for the other methods).
fn scratch_tokens(
    plans: &[RunPlan],
    cfg: &crate::model::config::Config,
    base: &compress::MethodOptions,
    longest: usize,
) -> anyhow::Result<usize> {
    let mut most = 0;
    for p in plans.iter().filter(|p| !p.is_full()) {
        let policy = compress::build_policy(&p.method, cfg, &p.options(base))?;
        most = most.max(policy.scratch_tokens(longest));
    }
    Ok(most)
}

/// One sample's paged cache as this sweep's groups fork it (see [`run::SamplePool`]), with
/// `scratch_tokens` per head of room for extra forward passes.
fn sample_pool(
    args: &EvalArgs,
    m: &Loaded,
    sel: &Selection,
    policies: &[(String, crate::kvcache::Probe, bool, usize)],
    scratch_tokens: usize,
) -> run::SamplePool {
    let c = m.lm.config();
    let full_joins = m.device.is_cuda() && args.sweep.method_options.kv_memory.is_none();
    let least = |p: &RunPlan| {
        let label = p.label();
        policies.iter().find(|f| f.0 == label).map_or(0, |f| f.3)
    };
    let groups = run::group_plans(&sel.plans, !args.sweep.no_shared_prefill, full_joins)
        .into_iter()
        .map(|g| {
            let min = g.iter().map(|p| least(p)).max().unwrap_or(0);
            (min, g.iter().map(|p| p.compress_budget()).collect())
        })
        .collect();
    run::SamplePool {
        layout: crate::kvcache::blocks::MemoryLayout {
            block_size: args.sweep.method_options.block_size,
            head_dim: c.head_dim,
            dtype_bytes: m.dtype.size_in_bytes(),
        },
        heads: c.num_hidden_layers * c.num_key_value_heads,
        max_context: c.max_context(),
        min_cache_tokens: args.sweep.method_options.min_cache_tokens,
        groups,
        scratch_tokens,
    }
}

/// Builds each run's `run.json` (its configuration, hashed for resume, and the context of
/// this invocation) from what the command resolved.
struct MetaBuilder<'a> {
    args: &'a EvalArgs,
    resolved: &'a ResolvedModel,
    model_source: String,
    dtype: String,
    device: String,
    max_input: usize,
    data: serde_json::Value,
    warnings: &'a [String],
    tasks: Vec<&'static str>,
    ruler: Option<serde_json::Value>,
    scheduling: serde_json::Value,
    argv: Vec<String>,
}

impl<'a> MetaBuilder<'a> {
    /// `model`: what was loaded, as what, where; `scheduling`: whether `full` joins the
    /// first method's batch, and the samples per batch.
    fn new(
        args: &'a EvalArgs,
        model: (&'a ResolvedModel, DType, &Device),
        sel: &'a Selection,
        max_input: usize,
        scheduling: (bool, usize),
    ) -> anyhow::Result<Self> {
        let (resolved, dtype, device) = model;
        let (full_joins, batch_samples) = scheduling;
        let model_source = match &resolved.source {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => {
                resolved.hub_id.clone().unwrap_or_else(|| {
                    p.canonicalize()
                        .unwrap_or_else(|_| p.clone())
                        .display()
                        .to_string()
                })
            }
        };
        let data = if sel.needs_longbench {
            serde_json::json!({
                "source": sel.data.description,
                "hub_repo": sel.data.hub_repo,
                "revision": sel.data.revision,
                "bundled_sample": sel.bundled,
                "files": sel.files_json,
            })
        } else {
            serde_json::Value::Null
        };
        let ruler = (!sel.ruler_tasks.is_empty()).then(|| {
            serde_json::json!({
                "generator": crate::data::ruler::GENERATOR_VERSION,
                "tasks": sel.ruler_tasks.iter().map(|t| t.name).collect::<Vec<_>>(),
                "lengths": args.data.lengths,
                "samples": args.data.ruler_samples,
                "seed": args.data.seed,
                "sources": sel.ruler_sources.map(|s| serde_json::json!({
                    "name": s.name,
                    "dir": s.dir,
                    "sha256": s.digest,
                })),
            })
        });
        // How samples were scheduled: changes timings, never outputs (not in the hash).
        let shared = !args.sweep.no_shared_prefill;
        let scheduling = serde_json::json!({
            "shared_prefill": shared,
            "full_shares_prefill": shared && full_joins,
            "batch_samples": batch_samples,
        });
        Ok(MetaBuilder {
            args,
            resolved,
            model_source,
            dtype: format!("{dtype:?}").to_lowercase(),
            device: format!("{device:?}"),
            max_input,
            data,
            warnings: &sel.data_warnings,
            tasks: sel.subsets.iter().map(|s| s.task.name).collect(),
            ruler,
            scheduling,
            argv: std::env::args().collect(),
        })
    }

    /// The resolved configuration of a run: what its hash covers.
    fn config(&self, p: &RunPlan) -> RunConfig {
        let (rate, budget_tokens) = match p.budget {
            Budget::Rate(r) => (Some(r), None),
            Budget::Tokens(t) => (None, Some(t)),
        };
        RunConfig {
            model: self.resolved.name.clone(),
            model_source: self.model_source.clone(),
            model_revision: self.resolved.revision.clone(),
            dtype: self.dtype.clone(),
            method: p.method.name.clone(),
            rate,
            budget_tokens,
            method_options: serde_json::to_value(p.options(&self.args.sweep.method_options))
                .unwrap_or_default(),
            max_input_tokens: self.max_input,
            max_new_tokens: self.args.generation.max_new_tokens,
            chat: self.args.generation.chat,
            prompt: PROMPT_RECIPE.into(),
        }
    }

    /// The run.json of a run.
    fn meta(&self, p: &RunPlan) -> RunMeta {
        let cfg = self.config(p);
        let mut m = RunMeta {
            model: Some(cfg.model.clone()),
            method: Some(cfg.method.clone()),
            rate: cfg.rate,
            budget_tokens: cfg.budget_tokens,
            extra: Default::default(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let x = &mut m.extra;
        x.insert("config_hash".into(), cfg.hash().into());
        x.insert(
            "config".into(),
            serde_json::to_value(&cfg).unwrap_or_default(),
        );
        x.insert("kvc_version".into(), env!("CARGO_PKG_VERSION").into());
        x.insert("device".into(), self.device.clone().into());
        x.insert("data".into(), self.data.clone());
        x.insert("warnings".into(), serde_json::json!(self.warnings));
        x.insert("tasks".into(), serde_json::json!(self.tasks));
        if let Some(r) = &self.ruler {
            x.insert("ruler".into(), r.clone());
        }
        x.insert("limit".into(), serde_json::json!(self.args.data.limit));
        x.insert("preset".into(), serde_json::json!(self.args.sweep.preset));
        if let Some(shard) = self.args.output.shard {
            x.insert("shard".into(), serde_json::json!(shard));
        }
        x.insert("scheduling".into(), self.scheduling.clone());
        x.insert("command".into(), serde_json::json!(self.argv));
        x.insert("updated_unix".into(), serde_json::json!(now));
        m
    }
}

/// Ctrl-C: the first press finishes the sample in flight (`stop`), the second abandons it
/// (`abandon` set before the process exits with 2).
fn ctrl_c() -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let abandon = Arc::new(AtomicBool::new(false));
    let (s, a) = (stop.clone(), abandon.clone());
    let _ = ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            a.store(true, Ordering::SeqCst);
            eprintln!(
                "\ninterrupted: abandoning the sample in flight; rerun the same command to resume"
            );
            std::process::exit(2);
        }
        eprintln!("\nstopping after the sample in flight (Ctrl-C again to abandon it)");
    });
    (stop, abandon)
}

/// Every group of runs sharing prefills, in turn, until done or interrupted.
fn run_sweep(
    args: &EvalArgs,
    lm: &mut LoadedModel,
    plans: &[RunPlan],
    sweep: &Sweep,
    progress: &mut Progress,
    full_joins: bool,
) -> anyhow::Result<Vec<RunOutcome>> {
    let mut outcomes = Vec::new();
    let mut appended = 0;
    for group in run::group_plans(plans, !args.sweep.no_shared_prefill, full_joins) {
        let os = run::run_group(lm, &group, sweep, progress, &mut appended)?;
        let stopped = os.iter().any(|o| o.interrupted);
        outcomes.extend(os);
        if stopped {
            anyhow::bail!(
                "interrupted by Ctrl-C after {appended} new samples; every finished sample is saved under {}: rerun the same command to resume",
                args.output.out.display()
            );
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_in_window_names_the_runs() {
        let ms = |names: &[&str]| -> Vec<MethodSpec> {
            names
                .iter()
                .map(|n| MethodSpec::parse(n).unwrap())
                .collect()
        };
        let names = |q| -> Vec<String> {
            protocol_methods(ms(&["full", "snapkv", "kvcompress+kvcrush"]), q)
                .into_iter()
                .map(|m| m.name)
                .collect()
        };
        assert_eq!(
            names(QuestionInWindow::Yes),
            ["full", "snapkv", "kvcompress+kvcrush"]
        );
        assert_eq!(
            names(QuestionInWindow::No),
            [
                "full",
                "snapkv@context-only",
                "kvcompress+kvcrush@context-only"
            ]
        );
        assert_eq!(
            names(QuestionInWindow::Both),
            [
                "full",
                "snapkv",
                "snapkv@context-only",
                "kvcompress+kvcrush",
                "kvcompress+kvcrush@context-only"
            ]
        );
        // A name given with the suffix stays one run.
        let given = protocol_methods(
            ms(&["snapkv@context-only", "snapkv"]),
            QuestionInWindow::Both,
        );
        assert_eq!(given.len(), 2);
    }
}
