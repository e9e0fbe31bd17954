//! `kvc eval`: generate LongBench predictions for a sweep of compression methods and budgets,
//! resumably, then score and plot them (see [`crate::eval::run`] for the pipeline).
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::model_args::ModelArgs;
use super::score::emit_stdout;
use crate::compress::{self, MethodOptions, MethodSpec};
use crate::data::longbench::Dataset;
use crate::data::select::select_tasks;
use crate::eval::metrics::MetricOptions;
use crate::eval::record::{PredRecord, RunMeta};
use crate::eval::run::{
    self, ChatMode, Observer, RunConfig, RunOutcome, RunPlan, SampleSettings, Sweep, PROMPT_RECIPE,
};
use crate::eval::score::OnError;
use crate::hub::{self, HubEnv, ModelSource};
use crate::report::plot::{draw_figure, quality_figures};
use crate::report::scores::{self, Budget};
use crate::util::Status;

/// What `kvc eval` with no `--tasks`/`--limit` runs on the bundled sample: the shortest row of
/// multi_news and of multifieldqa_zh, so the embedded default finishes in minutes on a CPU
/// (passage_retrieval_zh's rows are 7530 tokens: `--tasks all` runs the whole sample).
const BUNDLED_DEFAULT_TASKS: [&str; 2] = ["multi_news", "multifieldqa_zh"];
const BUNDLED_DEFAULT_LIMIT: usize = 1;

#[derive(Args, Debug)]
#[command(
    about = "Run LongBench through a sweep of KV-cache compression methods and rates, then score and plot",
    long_about = "Run LongBench through a sweep of KV-cache compression methods and budgets, then score
and plot it.

The sweep is the full-cache run (method full, rate 1: the baseline every percentage divides by,
computed once) plus every --methods entry at every --rates value above 1 and every
--cache-tokens budget. Each run writes

  <out>/<model>/<method>/<budget>/run.json              resolved configuration + its hash,
                                                         versions, model/data revisions, device
  <out>/<model>/<method>/<budget>/preds/<subset>.jsonl  one row per sample, appended as made

then kvc scores the runs of this command exactly as LongBench's eval.py (<out>/scores.csv,
summary.csv, result.json per run; see `kvc score --help`), draws <out>/plots/ and prints a
summary. Other directories under <out> are not read (a run that cannot be scored is a warning);
`kvc score <out>` scores the whole tree.

Prompts are LongBench's pred.py: the subset's template, middle truncation to the model's max
input length (Llama-3.1 127500, Mistral-7B-v0.2 31500, SmolLM2 7500 tokens), the chat template
except for trec, triviaqa, samsum, lsht, lcc, repobench-p, greedy decoding with the subset's max
new tokens, samsum stopping at a newline.

Resume: rerun the same command. Finished samples (by _id) are skipped, a torn last line left by a
kill is dropped, and a run directory made with a different configuration is refused unless
--overwrite. Failed samples count as done; --retry-failed redoes them. Ctrl-C finishes the
sample in flight and stops (twice: abandon it at once).

Exit codes: 0 ok; 1 finished, but some samples failed (recorded as rows with `error`, e.g. a
prompt too long or out of memory); 2 error (bad input, interrupted)."
)]
#[command(after_help = "Examples:
  kvc eval                                        # SmolLM2 on the bundled sample, rates 1,2,4,8,64
  kvc eval -m llama-3.1-8b --data-dir hub --rates 1,2,4,8,64 --device cuda:0
  kvc eval -m mistral-7b --data-dir ~/LongBench/data.zip --tasks code,few-shot --limit 50
  kvc eval --data-dir ./data --tasks hotpotqa --methods snapkv,kvcompress --cache-tokens 128,512
  kvc eval --data-dir ./data --tasks e --methods full --json > summary.json

Data (--data-dir): a directory of <subset>.jsonl (the official files), the official data.zip,
parquet files (<subset>.parquet, <subset>/*.parquet or data/<subset>/*.parquet, e.g. the mirror
Xnhyacinth/LongBench), or `hub` (THUDM/LongBench data.zip in the Hugging Face cache, falling
back to the parquet mirror; HF_HUB_OFFLINE=1 reads the cache only). Task sets: en16 (default), all, e (LongBench-E), a category (single-doc-qa, multi-doc-qa,
summarization, few-shot, synthetic, code) or subset names, comma-separated.

Profile: KVC_PROFILE=1 synchronises the device after each phase of the forward, the decode
step and the compression, and prints where the time went (stderr) at the end; it slows the run.")]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[command(flatten)]
    pub generation: GenerationArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Which rows.
#[derive(Args, Debug)]
#[command(next_help_heading = "Data")]
pub struct DataArgs {
    /// LongBench data: a directory of <subset>.jsonl, the official data.zip, parquet files (a
    /// file, or a directory of <subset>.parquet / <subset>/*.parquet), `hub` or
    /// `hub:org/name[@revision]`. Default: the small sample bundled in datasets/longbench/sample
    /// (3 subsets, 2 rows each; without --tasks/--limit only the shortest row of multi_news and
    /// of multifieldqa_zh, a few minutes on a CPU; `--tasks all` for the whole sample).
    #[arg(long, env = "KVC_DATA_DIR")]
    pub data_dir: Option<String>,
    /// Subsets: en16 (default; with the bundled sample: multi_news,multifieldqa_zh), all, e,
    /// category names, subset names, `ruler` (the generated RULER suite) or `ruler:<task>`
    /// (niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe);
    /// comma-separated.
    #[arg(long)]
    pub tasks: Option<String>,
    /// At most N samples per subset (the first N in file order).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only these sample ids (`_id`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub samples: Vec<String>,
    /// RULER: sequence lengths in tokens (prompt with chat template and answer prefix, plus the
    /// task's tokens to generate), measured with the model's tokenizer; each task × length is
    /// one subset (`ruler_<task>_<length>`).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    pub lengths: Vec<usize>,
    /// RULER: samples per task and length (needle depths sweep 0-100 % evenly across them).
    #[arg(long, default_value_t = 10)]
    pub ruler_samples: usize,
    /// RULER: generator seed; the same seed, model tokenizer and settings give byte-identical
    /// prompts on any machine.
    #[arg(long, default_value_t = crate::data::ruler::DEFAULT_SEED)]
    pub seed: u64,
}

/// Which runs.
#[derive(Args, Debug)]
#[command(next_help_heading = "Sweep")]
pub struct SweepArgs {
    /// Compression methods, comma-separated (the full-cache baseline is always run).
    #[arg(long, value_delimiter = ',', default_value = "kvcompress")]
    pub methods: Vec<String>,
    /// Compression rates (prompt KVs / kept KVs, >= 1; 1 = the full cache). Default:
    /// 1,2,4,8,16,32,64 (1,2,4,8,64 on the bundled sample; none when --cache-tokens is given).
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<f64>>,
    /// Fixed cache budgets in tokens per kv-head (rounded up to the block size, 16), e.g.
    /// 128,256,512,1024.
    #[arg(long, value_delimiter = ',')]
    pub cache_tokens: Vec<usize>,
    /// Prefill every run on its own. By default each sample is prefilled once per method and
    /// every rate continues from a copy of that cache, all rates decoding in one batch (the
    /// output is token for token the same; a 7-rate sweep does 1 prefill instead of 7; on a
    /// GPU `full` is a keep-all member of the first method's batch). Use this when
    /// `prefill_ms` and `decode_ms` must time each run alone.
    #[arg(long)]
    pub no_shared_prefill: bool,
    /// Samples of a subset generated together: each prompt is prefilled on its own, then all
    /// of them (every rate of each) decode in one batch (measured: 1.5x with 2 samples on a
    /// 2-core CPU; on an H200 the SmolLM2 sweep takes 171 s with 32); 1 = one sample at a
    /// time. Default: 1 on the CPU; on a GPU as many as its free memory holds at the longest
    /// prompt, at most 32 (printed at the start; 1 for an 8B model at 128k on 80 GB). The
    /// output does not depend on it (on an H200, 32 and 4 gave 256 of 256 predictions
    /// identical); but on a GPU `full` decodes through the paged cache where the CPU uses the
    /// contiguous one (other kernels: bf16 outputs may differ in rare tokens). Ctrl-C
    /// finishes the samples in flight.
    #[arg(long, value_parser = crate::compress::positive)]
    pub batch_samples: Option<usize>,
    #[command(flatten)]
    pub method_options: MethodOptions,
}

/// How each sample is generated.
#[derive(Args, Debug)]
#[command(next_help_heading = "Generation")]
pub struct GenerationArgs {
    /// Max new tokens for every subset (default: each subset's LongBench value, 32-512).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Middle-truncate prompts to this many tokens (default: the model's LongBench value, else
    /// its context minus 512).
    #[arg(long)]
    pub max_input_tokens: Option<usize>,
    /// Chat template: auto (LongBench's rule), always, never. Recorded per sample.
    #[arg(long, value_enum, default_value_t = ChatMode::Auto)]
    pub chat: ChatMode,
    /// Prefill chunk length in tokens (memory vs speed; default 512 on the CPU; on a GPU 8192
    /// with the flash prefill kernel (bf16/f16, head dim 64/128: its memory grows linearly
    /// with the chunk), else 2048). Results do not depend on it beyond rounding.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill_chunk: Option<u64>,
}

/// Where results go and how progress shows.
#[derive(Args, Debug)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Results tree root.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Discard the existing predictions of every run this command touches and start over.
    #[arg(long)]
    pub overwrite: bool,
    /// On resume, redo the samples recorded as failed (rows with `error`, e.g. out of memory):
    /// their rows are removed and the samples generated again. Without it they count as done.
    #[arg(long)]
    pub retry_failed: bool,
    /// Record in every compressed row the prompt KVs kept per (layer, kv-head) after the
    /// prefill compression (`kept_per_head`, layers x kv-heads): KV-Compress's variable
    /// per-head and per-layer rates, for plots.
    #[arg(long)]
    pub dump_allocation: bool,
    /// No progress bars (they are also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Only errors and warnings on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Progress display: one bar per run on a terminal, else a line per run.
struct Progress {
    show_bars: bool,
    quiet: bool,
    bar: Option<ProgressBar>,
    t0: Instant,
    tokens: usize,
    warnings: Vec<String>,
}

impl Observer for Progress {
    fn run_start(&mut self, label: &str, total: usize, done: usize) {
        self.t0 = Instant::now();
        self.tokens = 0;
        if self.show_bars {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(done as u64);
            bar.reset_eta();
            self.bar = Some(bar);
        } else if !self.quiet {
            eprintln!("run {label}: {total} samples ({done} already done)");
        }
    }

    fn sample(&mut self, rec: &PredRecord, tokens: usize) {
        self.tokens += tokens;
        if let Some(b) = &self.bar {
            let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
            b.set_message(format!("{:.0} tok/s", self.tokens as f64 / secs));
            b.inc(1);
            if let Some(e) = &rec.error {
                b.println(format!(
                    "warning: {} {}: {e}",
                    rec.task.as_deref().unwrap_or(""),
                    rec.id.as_deref().unwrap_or("")
                ));
            }
        } else if let Some(e) = &rec.error {
            eprintln!(
                "warning: {} {} failed: {e}",
                rec.task.as_deref().unwrap_or(""),
                rec.id.as_deref().unwrap_or("")
            );
        }
    }

    fn run_end(&mut self, o: &RunOutcome) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if !self.quiet {
            eprintln!(
                "run {}: {} new, {} resumed, {} failed{} -> {}",
                o.run,
                o.n_new,
                o.n_resumed,
                o.n_failed,
                if o.interrupted { ", interrupted" } else { "" },
                o.dir.display()
            );
        }
    }

    fn warn(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(format!("warning: {msg}")),
            None => eprintln!("warning: {msg}"),
        }
        self.warnings.push(msg.to_string());
    }
}

/// Run `kvc eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<Status> {
    let quiet = args.output.quiet;
    let note = |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };

    // 1. Everything that can be checked without the model.
    let methods = args
        .sweep
        .methods
        .iter()
        .map(|m| MethodSpec::parse(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bundled = args.data.data_dir.is_none();
    let rates = match &args.sweep.rates {
        Some(r) => r.clone(),
        None if !args.sweep.cache_tokens.is_empty() => vec![],
        None if bundled => vec![1.0, 2.0, 4.0, 8.0, 64.0],
        None => vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
    };
    let (plans, notes) = run::plan_runs(&methods, &rates, &args.sweep.cache_tokens)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    // RULER entries (`ruler`, `ruler:<task>`) are generated after the model loads (prompts
    // are fitted with its tokenizer); the rest are LongBench subsets.
    let mut ruler_tasks: Vec<&'static crate::data::ruler::RulerTask> = Vec::new();
    let mut longbench_spec: Vec<&str> = Vec::new();
    for item in args
        .data
        .tasks
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match crate::data::ruler::select(item) {
            Some(r) => {
                for t in r? {
                    if !ruler_tasks.iter().any(|x| x.name == t.name) {
                        ruler_tasks.push(t);
                    }
                }
            }
            None => longbench_spec.push(item),
        }
    }
    // LongBench rows are read only when a LongBench subset is asked for: a RULER-only run
    // needs no data files (the bundled sample stands in, never read).
    let needs_longbench = args.data.tasks.is_none() || !longbench_spec.is_empty();
    let env = HubEnv::from_env();
    let data = match &args.data.data_dir {
        Some(d) if needs_longbench => Dataset::open(d, &env)?,
        Some(d) => {
            note(&format!(
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
    let tasks = match &args.data.tasks {
        Some(_) if longbench_spec.is_empty() => Vec::new(),
        Some(_) => select_tasks(&longbench_spec.join(","))?,
        None if bundled => {
            let have = data.subsets()?;
            crate::data::tasks::LONGBENCH
                .iter()
                .filter(|t| BUNDLED_DEFAULT_TASKS.contains(&t.name))
                .filter(|t| have.iter().any(|h| h == t.name))
                .collect()
        }
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
    let mut subsets = run::inspect_data(&data, &tasks, limit, samples.as_ref(), !bundled)?;
    let (files_json, data_warnings) = run::data_report(&subsets);
    for w in &data_warnings {
        eprintln!("warning: {w}");
    }
    note(&format!(
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

    // 2. The model, and every run's method built once up front (so an unimplemented method
    //    fails now, not after hours of full-cache generation).
    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    let resolved = args.model.resolve()?;
    let t_load = Instant::now();
    let mut lm = crate::model::load(&resolved, &device, dtype)?;
    lm.model.fused = !args.model.unfused_layers;
    note(&format!(
        "model: {} loaded in {:.1}s on {:?} ({:?})",
        lm.name,
        t_load.elapsed().as_secs_f64(),
        device,
        dtype
    ));
    for p in &plans {
        compress::runner(
            &p.method,
            p.compress_budget(),
            lm.config(),
            &args.sweep.method_options,
        )
        .with_context(|| format!("run {}", p.label()))?;
    }
    let max_input = match args.generation.max_input_tokens {
        Some(m) => m,
        None => match hub::default_max_input(&lm.name) {
            Some(m) => m,
            None => {
                let m = lm.config().max_context().saturating_sub(512).max(1);
                eprintln!("note: no LongBench max input length is known for {}: truncating prompts to {m} tokens (context - 512); set --max-input-tokens", lm.name);
                m
            }
        },
    };
    let settings = SampleSettings {
        max_input_tokens: max_input,
        max_new_tokens: args.generation.max_new_tokens,
        chat: args.generation.chat,
        prefill_chunk: match args.generation.prefill_chunk {
            Some(c) => c as usize,
            // The flash kernel keeps a chunk's memory linear in its length and wants many
            // queries per launch: the whole prompt (SmolLM2's sweep on the H200: 109-111 s
            // against 123 s at 2048). The unfused path materialises the scores: 2048.
            None if device.is_cuda()
                && !args.sweep.method_options.unfused_prefill
                && crate::kvcache::cuda::prefill_attention_supported(
                    dtype,
                    lm.model.cfg.head_dim,
                ) =>
            {
                8192
            }
            None if device.is_cuda() => 2048,
            None => 512,
        },
        dump_allocation: args.output.dump_allocation,
    };
    let mut generated = std::collections::BTreeMap::new();
    if !ruler_tasks.is_empty() {
        let t_gen = Instant::now();
        let plan = run::RulerPlan {
            tasks: ruler_tasks.clone(),
            lengths: args.data.lengths.clone(),
            samples: args.data.ruler_samples,
            seed: args.data.seed,
        };
        let (mut ruler_subsets, rows) = run::generate_ruler(&lm, &plan, &settings)?;
        if let Some(s) = &samples {
            for sp in &mut ruler_subsets {
                sp.ids.retain(|id| s.contains(id));
            }
        }
        if let Some(l) = args.data.limit {
            for sp in &mut ruler_subsets {
                sp.ids.truncate(l);
            }
        }
        note(&format!(
            "ruler: {} subsets x {} samples generated in {:.1}s (seed {})",
            ruler_subsets.len(),
            args.data.ruler_samples,
            t_gen.elapsed().as_secs_f64(),
            args.data.seed
        ));
        subsets.extend(ruler_subsets);
        generated = rows;
    }
    run::check_samples_found(samples.as_ref(), &subsets)?;
    // On a GPU `full` decodes through the paged cache in batches anyway: it joins the first
    // compressed method's group as a keep-all fork of its prefill (run::group_plans). Not with
    // --kv-memory, which bounds that method's pool and never the full cache.
    let full_joins = device.is_cuda() && args.sweep.method_options.kv_memory.is_none();
    let batch_samples = match args.sweep.batch_samples {
        Some(b) => b,
        None if device.is_cuda() => {
            let longest = if ruler_tasks.is_empty() {
                max_input
            } else {
                max_input.max(args.data.lengths.iter().copied().max().unwrap_or(0))
            };
            let new = subsets
                .iter()
                .map(|s| {
                    args.generation
                        .max_new_tokens
                        .unwrap_or(s.task.max_new_tokens)
                })
                .max()
                .unwrap_or(0);
            let c = lm.config();
            let per_sample = run::sample_kv_bytes(
                c.num_hidden_layers,
                c.num_key_value_heads,
                c.head_dim,
                dtype.size_in_bytes(),
                args.sweep.method_options.block_size,
                longest + new,
            );
            let free = crate::kvcache::cuda::device_memory(&device)?.map(|(free, _)| free);
            let b = run::auto_batch_samples(free, per_sample);
            note(&format!(
                "batch: {b} samples at a time ({:.1} GiB free, {:.0} MiB per sample at {} tokens; --batch-samples sets it)",
                free.unwrap_or(0) as f64 / (1u64 << 30) as f64,
                per_sample as f64 / (1u64 << 20) as f64,
                longest + new
            ));
            b
        }
        None => 1,
    };
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
    let dtype_name = format!("{dtype:?}").to_lowercase();
    let device_name = format!("{device:?}");
    let method_options_json = serde_json::to_value(&args.sweep.method_options)?;
    let task_names: Vec<&str> = subsets.iter().map(|s| s.task.name).collect();
    let ruler_json = (!ruler_tasks.is_empty()).then(|| {
        serde_json::json!({
            "generator": crate::data::ruler::GENERATOR_VERSION,
            "tasks": ruler_tasks.iter().map(|t| t.name).collect::<Vec<_>>(),
            "lengths": args.data.lengths,
            "samples": args.data.ruler_samples,
            "seed": args.data.seed,
        })
    });
    let argv: Vec<String> = std::env::args().collect();
    let meta = |p: &RunPlan| -> RunMeta {
        let cfg = RunConfig {
            model: resolved.name.clone(),
            model_source: model_source.clone(),
            model_revision: resolved.revision.clone(),
            dtype: dtype_name.clone(),
            method: p.method.name.clone(),
            rate: match p.budget {
                Budget::Rate(r) => Some(r),
                Budget::Tokens(_) => None,
            },
            budget_tokens: match p.budget {
                Budget::Tokens(t) => Some(t),
                Budget::Rate(_) => None,
            },
            method_options: method_options_json.clone(),
            max_input_tokens: max_input,
            max_new_tokens: args.generation.max_new_tokens,
            chat: args.generation.chat,
            prompt: PROMPT_RECIPE.into(),
        };
        let mut m = RunMeta {
            model: Some(cfg.model.clone()),
            method: Some(cfg.method.clone()),
            rate: cfg.rate,
            budget_tokens: cfg.budget_tokens,
            extra: Default::default(),
        };
        let x = &mut m.extra;
        x.insert("config_hash".into(), cfg.hash().into());
        x.insert(
            "config".into(),
            serde_json::to_value(&cfg).unwrap_or_default(),
        );
        x.insert("kvc_version".into(), env!("CARGO_PKG_VERSION").into());
        x.insert("device".into(), device_name.clone().into());
        x.insert(
            "data".into(),
            if needs_longbench {
                serde_json::json!({
                    "source": data.description,
                    "hub_repo": data.hub_repo,
                    "revision": data.revision,
                    "bundled_sample": bundled,
                    "files": files_json,
                })
            } else {
                serde_json::Value::Null
            },
        );
        x.insert("warnings".into(), serde_json::json!(data_warnings));
        x.insert("tasks".into(), serde_json::json!(task_names));
        if let Some(r) = &ruler_json {
            x.insert("ruler".into(), r.clone());
        }
        x.insert("limit".into(), serde_json::json!(args.data.limit));
        // How samples were scheduled: changes timings, never outputs (not in the hash).
        x.insert(
            "scheduling".into(),
            serde_json::json!({
                "shared_prefill": !args.sweep.no_shared_prefill,
                "full_shares_prefill": !args.sweep.no_shared_prefill && full_joins,
                "batch_samples": batch_samples,
            }),
        );
        x.insert("command".into(), serde_json::json!(argv));
        x.insert(
            "updated_unix".into(),
            serde_json::json!(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)),
        );
        m
    };

    // 3. Ctrl-C: first press finishes the sample in flight, second abandons it.
    let stop = Arc::new(AtomicBool::new(false));
    let abandon = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let abandon = abandon.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                abandon.store(true, Ordering::SeqCst);
                eprintln!("\ninterrupted: abandoning the sample in flight; rerun the same command to resume");
                std::process::exit(2);
            }
            eprintln!("\nstopping after the sample in flight (Ctrl-C again to abandon it)");
        });
    }

    // 4. The sweep.
    let sweep = Sweep {
        out: &args.output.out,
        data: &data,
        generated: &generated,
        subsets: &subsets,
        settings,
        method_options: &args.sweep.method_options,
        overwrite: args.output.overwrite,
        meta: &meta,
        stop: &stop,
        abandon: &abandon,
        retry_failed: args.output.retry_failed,
        batch_samples,
    };
    let mut progress = Progress {
        show_bars: !args.output.no_progress && !quiet && std::io::stderr().is_terminal(),
        quiet,
        bar: None,
        t0: Instant::now(),
        tokens: 0,
        warnings: Vec::new(),
    };
    let mut outcomes = Vec::new();
    let mut appended = 0;
    for group in run::group_plans(&plans, !args.sweep.no_shared_prefill, full_joins) {
        let os = run::run_group(&mut lm, &group, &sweep, &mut progress, &mut appended)?;
        let stopped = os.iter().any(|o| o.interrupted);
        outcomes.extend(os);
        if stopped {
            break;
        }
    }
    if outcomes.iter().any(|o| o.interrupted) {
        anyhow::bail!(
            "interrupted by Ctrl-C after {appended} new samples; every finished sample is saved under {}: rerun the same command to resume",
            args.output.out.display()
        );
    }

    // 5. Score the tree, plot, summarize.
    let mut clock = crate::profile::start(&device);
    // Only this command's runs: other directories under --out are not this job's to score.
    let run_dirs: Vec<PathBuf> = outcomes.iter().map(|o| o.dir.clone()).collect();
    let t = scores::score_runs(
        &args.output.out,
        &run_dirs,
        false,
        OnError::Stop,
        &MetricOptions::default(),
    );
    for (dir, why) in &t.unscored {
        progress.warn(&format!("not scored: {}: {why}", dir.display()));
    }
    let scores_path = args.output.out.join("scores.csv");
    let summary_path = args.output.out.join("summary.csv");
    scores::write_csv(&scores_path, &t.rows)?;
    scores::write_csv(&summary_path, &t.summary)?;
    let model_rows: Vec<_> = t
        .rows
        .iter()
        .filter(|r| r.model == lm.name)
        .cloned()
        .collect();
    let mut plots = Vec::new();
    let plot_dir = args.output.out.join("plots");
    let has_compressed = model_rows.iter().any(|r| r.method != "full");
    if has_compressed {
        match quality_figures(&model_rows, &scores_path.display().to_string()) {
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
    let depth_rows = crate::report::heatmap::write_depth_csv(&args.output.out, &t)?;
    let depth_rows: Vec<_> = depth_rows
        .into_iter()
        .filter(|r| r.model == lm.name)
        .collect();
    if !depth_rows.is_empty() {
        match crate::report::heatmap::draw_all(&depth_rows, &plot_dir) {
            Ok(ps) => plots.extend(ps),
            Err(e) => eprintln!("warning: RULER depth plot: {e}"),
        }
    }
    let alloc_rows: Vec<_> = crate::report::allocation::write_alloc_csv(&args.output.out, &t)?
        .into_iter()
        .filter(|r| r.model == lm.name)
        .collect();
    if !alloc_rows.is_empty() {
        match crate::report::allocation::draw_all(&alloc_rows, &plot_dir) {
            Ok(ps) => plots.extend(ps),
            Err(e) => eprintln!("warning: allocation plot: {e}"),
        }
    }
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
            "out": args.output.out,
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
        write_table(&mut out, &lm.name, &outcomes, &summary, &plans);
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
    crate::profile::mark(&device, &mut clock, "eval.score+plots");
    if crate::profile::enabled() {
        eprint!("{}", crate::profile::report());
    }
    Ok(if n_failed > 0 {
        Status::Failed
    } else {
        Status::Ok
    })
}

/// One screen: a row per run; the full-cache run shows LongBench scores, the others percent of
/// the full-cache score (per category and `all`, the per-subset mean). LongBench-E subsets are
/// scored per length bucket and left out of this table (see summary.csv).
fn write_table(
    out: &mut String,
    model: &str,
    outcomes: &[RunOutcome],
    summary: &[scores::SummaryRow],
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
        "{model}: full/rate1 in LongBench points, other runs in % of full cache"
    );
    let _ = write!(
        out,
        "{:<22} {:>5} {:>6} {:>8} {:>7}",
        "run", "n", "failed", "achieved", "all"
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
        let cell = |s: Option<&scores::SummaryRow>| match s {
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
        let _ = write!(
            out,
            "{:<22} {:>5} {:>6} {:>8} {:>7}",
            p.label(),
            o.n_selected,
            o.n_failed,
            achieved,
            cell(all)
        );
        for c in &cats {
            let _ = write!(out, " {:>7}", cell(find(c)));
        }
        let _ = writeln!(out);
    }
}
