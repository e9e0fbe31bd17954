//! Compression methods: the contract between `kvc eval` / `kvc bench` and the methods.
//!
//! A method is chosen by name (`--methods full,kvcompress,snapkv+kvcrush`) and a budget
//! (`--rates` or `--cache-tokens`); [`runner`] builds a [`Runner`] that generates one sample
//! with that method's cache backend and hooks and reports what it kept ([`CompressionStats`]).
//! The eval pipeline only sees this module's types; each method lives in its own file
//! (`compress/<method>.rs`) and plugs into the engine through [`crate::engine::Hooks`] and a
//! [`crate::kvcache::CacheBackend`].
//!
//! Every method but `full` runs on the paged cache ([`crate::kvcache::paged::PagedCache`]) as a
//! [`policy::Policy`] driven by [`policy::CompressHooks`] (that module states the order of a
//! compression step). Method files: [`kvcompress`], [`snapkv`], [`pyramidkv`],
//! [`streamingllm`], [`h2o`], [`ada_snapkv`], and the [`kvcrush`] modifier (`<method>+kvcrush`).
//!
//! Budgets: a rate `r` becomes `M` cache tokens per (layer, kv-head) by KV-Compress's formula
//! with the 128-token floor ([`crate::kvcache::budget::tokens_for_rate`]) for every method, so
//! methods compare at equal memory; `r <= 1` evicts nothing. A token budget is `M` directly.
//! A budget below a method's protected window is clamped to it (with a warning on stderr).
//! [`CompressionStats`] records what was actually kept after the prefill compression.
use candle_core::{Result, Tensor};

use crate::engine::{self, GenParams, Generation, Hooks, NoHooks};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::budget::{tokens_for_rate, MIN_CACHE_TOKENS};
use crate::kvcache::contiguous::ContiguousCache;
use crate::kvcache::paged::{PagedCache, PagedSpec, DEFAULT_BLOCK_SIZE};
use crate::kvcache::{CacheBackend, Probe, SeqId};
use crate::model::{Config, Llama};

pub mod ada_snapkv;
pub mod h2o;
pub mod kvcompress;
pub mod kvcrush;
pub mod policy;
pub mod pyramidkv;
pub mod scorer;
pub mod snapkv;
pub mod streamingllm;

use policy::{BudgetFn, CompressHooks, Kept, Phase, Policy, SeqView};
use scorer::{Agg, PoolKind};

pub use crate::kvcache::budget::Budget;

/// Every method name `--methods` accepts.
pub const METHODS: &[&str] = &[
    "full",
    "kvcompress",
    "snapkv",
    "pyramidkv",
    "streamingllm",
    "h2o",
    "ada-snapkv",
    "kvcompress+kvcrush",
    "snapkv+kvcrush",
    "pyramidkv+kvcrush",
    "h2o+kvcrush",
    "ada-snapkv+kvcrush",
];

/// Importance-based methods KVCrush can modify.
pub const KVCRUSH_BASES: &[&str] = &["kvcompress", "snapkv", "pyramidkv", "h2o", "ada-snapkv"];

/// A parsed `--methods` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSpec {
    /// Canonical name as recorded in prediction rows and result paths (`kvcompress`,
    /// `snapkv+kvcrush`).
    pub name: String,
}

impl MethodSpec {
    /// Parse one method name; unknown names list the known ones.
    pub fn parse(s: &str) -> anyhow::Result<MethodSpec> {
        let s = s.trim();
        if METHODS.contains(&s) {
            return Ok(MethodSpec {
                name: s.to_string(),
            });
        }
        if s == "kvcrush" {
            anyhow::bail!(
                "`kvcrush` is a modifier, not a method: use `<method>+kvcrush` with one of {}",
                KVCRUSH_BASES.join(", ")
            );
        }
        if let Some(base) = s.strip_suffix("+kvcrush") {
            if METHODS.contains(&base) {
                anyhow::bail!(
                    "`{s}`: kvcrush only modifies an importance-based method ({}); `{base}` is not one",
                    KVCRUSH_BASES.join(", ")
                );
            }
        }
        anyhow::bail!(
            "unknown compression method `{s}`; known methods: {}",
            METHODS.join(", ")
        )
    }

    /// Whether the method keeps every KV (the baseline percentages divide by).
    pub fn is_full(&self) -> bool {
        self.name == "full"
    }

    /// The importance method (`snapkv` for `snapkv+kvcrush`).
    pub fn base(&self) -> &str {
        self.name.strip_suffix("+kvcrush").unwrap_or(&self.name)
    }

    /// Whether the KVCrush modifier is on.
    pub fn kvcrush(&self) -> bool {
        self.name.ends_with("+kvcrush")
    }
}

/// What one sample kept, for `achieved_rate` and allocation dumps.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CompressionStats {
    /// Prompt tokens (per head: every (layer, kv-head) saw this many).
    pub prompt_tokens: usize,
    /// KV entries of the prompt kept after compression, summed over layers and kv-heads.
    pub kept_kvs: u64,
    /// KV entries the prompt produced, summed over layers and kv-heads (`prompt_tokens *
    /// layers * kv_heads`).
    pub prompt_kvs: u64,
    /// Prompt KVs kept per `[layer][kv_head]` after compression (`--dump-allocation`); empty
    /// for the full cache.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_per_head: Vec<Vec<usize>>,
    /// Cache tokens per head the method was held to (after the rate formula, its 128-token
    /// floor and clamping to the protected window); `None` when nothing was evicted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<usize>,
}

impl CompressionStats {
    /// Prompt KVs / KVs kept (1.0 for the full cache).
    pub fn achieved_rate(&self) -> f64 {
        if self.kept_kvs == 0 {
            f64::INFINITY
        } else {
            self.prompt_kvs as f64 / self.kept_kvs as f64
        }
    }

    /// Mean kept tokens per (layer, kv-head).
    pub fn cache_tokens(&self, cfg: &Config) -> usize {
        let heads = (cfg.num_hidden_layers * cfg.num_key_value_heads) as u64;
        (self.kept_kvs / heads.max(1)) as usize
    }
}

/// Generates one sample with a method's cache and hooks.
pub trait Runner {
    /// Greedy generation of `prompt` under the method and budget this runner was built with.
    fn run(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
    ) -> Result<(Generation, CompressionStats)>;

    /// Greedy generation of `prompt` under each of `budgets` (the method this runner was built
    /// with; its own budget is ignored). A compressed method prefills once and continues each
    /// budget from a copy of that cache, token for token what [`Runner::run`] gives for each
    /// budget alone (the prompt's KVs and prefill metrics do not depend on the budget). The
    /// outer `Err` is a failed prefill (every budget fails); an inner one, one budget's failure.
    /// Each generation's `prefill_ms` is the shared prefill plus its own compression.
    fn run_budgets(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
        budgets: &[Option<Budget>],
    ) -> Result<Vec<Result<(Generation, CompressionStats)>>>;

    /// [`Runner::run_budgets`] for several prompts with the same decoding parameters (one
    /// subset): prompt `s` under `budgets[s]`. A compressed method (without `--kv-memory`)
    /// prefills each prompt once and decodes every (prompt, budget) in one batch; the others
    /// run the prompts one after another. Per prompt, the outer `Err` is its failed prefill.
    fn run_prompts(
        &mut self,
        model: &mut Llama,
        prompts: &[&[u32]],
        params: &GenParams,
        budgets: &[Vec<Option<Budget>>],
    ) -> Result<Vec<PromptResults>> {
        Ok(prompts_one_by_one(self, model, prompts, params, budgets))
    }
}

/// [`Runner::run_prompts`] one prompt after another (the trait's default).
fn prompts_one_by_one(
    runner: &mut (impl Runner + ?Sized),
    model: &mut Llama,
    prompts: &[&[u32]],
    params: &GenParams,
    budgets: &[Vec<Option<Budget>>],
) -> Vec<PromptResults> {
    prompts
        .iter()
        .zip(budgets)
        .map(|(p, b)| runner.run_budgets(model, p, params, b))
        .collect()
}

/// One prompt's generations under each of its budgets ([`Runner::run_prompts`]).
pub type PromptResults = Result<Vec<Result<(Generation, CompressionStats)>>>;

/// Where KV-Compress's continual compression runs (`--compress-on`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressOn {
    /// The device path on a GPU, the host elsewhere.
    #[default]
    Auto,
    /// Score and plan on the host.
    Host,
    /// The device path (on the CPU: the kernels' twins).
    Device,
}

/// Method parameters shared by `kvc eval` and `kvc bench` (flattened into their clap args):
/// each method's paper defaults, overridable by flags. `Default` equals the flags' defaults.
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct MethodOptions {
    /// Paged cache size (K, V and per-slot metadata), e.g. `2GiB`, `512MiB`, `1000000`.
    /// Default: exactly what the sample needs without eviction (prompt + max new tokens).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub kv_memory: Option<u64>,
    /// Tokens per cache block (one kv-head of one layer per block).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = positive)]
    pub block_size: usize,
    /// Floor of cache tokens per head for rate budgets (KV-Compress: 128).
    #[arg(long, default_value_t = MIN_CACHE_TOKENS)]
    pub min_cache_tokens: usize,
    /// KV-Compress observation window: last prompt queries scored (the paper's rate runs: 8).
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub kvc_window: usize,
    /// KV-Compress metric aggregation over the window.
    #[arg(long, value_enum, default_value_t = Agg::L2Sum)]
    pub kvc_metric: Agg,
    /// KV-Compress max-pool kernel along keys (0 = off).
    #[arg(long, default_value_t = 7)]
    pub max_pool: usize,
    /// KV-Compress: count a (query, key) pair only when key_pos <= query_pos - buffer.
    #[arg(long, default_value_t = 0)]
    pub kvc_buffer: usize,
    /// KV-Compress: last token positions never evicted (the paper's rate runs: 8).
    #[arg(long, default_value_t = 32)]
    pub protected_window: usize,
    /// KV-Compress: compress only once after prefill (default: also during decoding, holding
    /// the cache at its budget).
    #[arg(long)]
    pub compress_once: bool,
    /// Where KV-Compress's continual compression runs. auto: on a GPU, decode attention is
    /// scored in the decode kernel and evictions are chosen and made by `kernels/evict.cu`
    /// (nothing per slot crosses PCIe); on the CPU, on the host. host: probabilities go to
    /// the host every step, which scores and plans (the A/B reference). device: the device
    /// path everywhere (on the CPU the kernels' plain-Rust twins run it: slow, for tests).
    /// Other methods always score and plan on the host. Not part of a run's configuration
    /// (like the device, it picks where the method runs, not what it does).
    #[arg(long, value_enum, default_value_t = CompressOn::Auto)]
    #[serde(skip)]
    pub compress_on: CompressOn,
    /// Prefill attention the unfused way on a GPU (matmul, softmax kernel, matmul: the
    /// scores in memory) instead of the flash kernel (`kernels/prefill_attention.cu`): the A/B
    /// reference. Not part of a run's configuration.
    #[arg(long)]
    #[serde(skip)]
    pub unfused_prefill: bool,
    /// SnapKV / PyramidKV / Ada-SnapKV observation window (always kept).
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub snap_window: usize,
    /// SnapKV / PyramidKV / Ada-SnapKV pooling kernel (0 = off).
    #[arg(long, default_value_t = 5)]
    pub snap_kernel: usize,
    /// SnapKV / PyramidKV / Ada-SnapKV pooling kind.
    #[arg(long, value_enum, default_value_t = PoolKind::Avg)]
    pub snap_pool: PoolKind,
    /// PyramidKV: the last layer keeps (budget - window) / beta tokens besides the window.
    #[arg(long, default_value_t = 20, value_parser = positive)]
    pub pyramid_beta: usize,
    /// Ada-SnapKV: share of each head's budget guaranteed before the layer-wide selection.
    #[arg(long, default_value_t = 0.2)]
    pub ada_floor: f64,
    /// StreamingLLM: attention-sink tokens kept at the start.
    #[arg(long, default_value_t = 4)]
    pub sink_tokens: usize,
    /// H2O: share of the budget given to the most recent tokens (the rest: heavy hitters).
    #[arg(long, default_value_t = 0.5)]
    pub h2o_recent_ratio: f64,
    /// H2O: prompt queries whose attention scores the prompt (0 = all, as the paper; this
    /// prefills the prompt in one chunk).
    #[arg(long, default_value_t = 0)]
    pub h2o_queries: usize,
    /// KVCrush: share of the budget spent on representatives of evicted tokens.
    #[arg(long, default_value_t = 0.0625)]
    pub kvcrush_ratio: f64,
    /// KVCrush anchor signature.
    #[arg(long, value_enum, default_value_t = kvcrush::Anchor::Mean)]
    pub kvcrush_anchor: kvcrush::Anchor,
    /// KVCrush seed of the random anchor.
    #[arg(long, default_value_t = 0)]
    pub kvcrush_seed: u64,
    /// KVCrush form: token (per-token head signatures) or block (block signatures; the
    /// shipped implementation); auto = block for kvcompress, token otherwise.
    #[arg(long, value_enum, default_value_t = kvcrush::Level::Auto)]
    pub kvcrush_level: kvcrush::Level,
}

impl Default for MethodOptions {
    fn default() -> Self {
        MethodOptions {
            kv_memory: None,
            block_size: DEFAULT_BLOCK_SIZE,
            min_cache_tokens: MIN_CACHE_TOKENS,
            kvc_window: 32,
            kvc_metric: Agg::L2Sum,
            max_pool: 7,
            kvc_buffer: 0,
            protected_window: 32,
            compress_once: false,
            compress_on: CompressOn::Auto,
            unfused_prefill: false,
            snap_window: 32,
            snap_kernel: 5,
            snap_pool: PoolKind::Avg,
            pyramid_beta: 20,
            ada_floor: 0.2,
            sink_tokens: 4,
            h2o_recent_ratio: 0.5,
            h2o_queries: 0,
            kvcrush_ratio: 0.0625,
            kvcrush_anchor: kvcrush::Anchor::Mean,
            kvcrush_seed: 0,
            kvcrush_level: kvcrush::Level::Auto,
        }
    }
}

/// Parse a positive integer flag.
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive integer")),
    }
}

/// Parse a byte size: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB; case
/// insensitive).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 2GiB, 512MiB, 1000000)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((x * mul as f64) as u64)
}

/// Build the runner for `spec` at `budget` (`None` = no eviction).
pub fn runner(
    spec: &MethodSpec,
    budget: Option<Budget>,
    cfg: &Config,
    opts: &MethodOptions,
) -> anyhow::Result<Box<dyn Runner>> {
    if spec.is_full() {
        if budget.is_some() {
            anyhow::bail!(FULL_TAKES_NO_BUDGET);
        }
        let mut batched = PagedRunner::new(&spec.name, Box::new(KeepAll), None, cfg, opts);
        // The full cache is never bounded (the contiguous cache ignores --kv-memory too).
        batched.kv_memory = None;
        return Ok(Box::new(FullRunner {
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            batched,
        }));
    }
    let policy = build_policy(spec, cfg, opts)?;
    if let Some(Budget::Tokens(n)) = budget {
        if n < policy.min_budget() {
            eprintln!(
                "warning: {}: budget of {n} tokens is smaller than the protected window ({}); using {}",
                spec.name,
                policy.min_budget(),
                policy.min_budget()
            );
        }
    }
    if let Some(Budget::Rate(r)) = budget {
        if !(r.is_finite() && r > 0.0) {
            anyhow::bail!("compression rate must be a positive number, got {r}");
        }
    }
    Ok(Box::new(PagedRunner::new(
        &spec.name, policy, budget, cfg, opts,
    )))
}

/// The policy of a compressed method (not `full`), for callers that drive
/// [`policy::CompressHooks`] themselves (tests, benchmarks).
pub fn build_policy(
    spec: &MethodSpec,
    cfg: &Config,
    opts: &MethodOptions,
) -> anyhow::Result<Box<dyn Policy>> {
    if opts.block_size == 0 {
        anyhow::bail!("--block-size must be at least 1");
    }
    let (layers, kv_heads) = (cfg.num_hidden_layers, cfg.num_key_value_heads);
    let snap = snapkv::SnapConfig {
        window: opts.snap_window,
        kernel: opts.snap_kernel,
        pool: opts.snap_pool,
    };
    let base: Box<dyn Policy> = match spec.base() {
        "full" => anyhow::bail!("method `full` evicts nothing: it has no compression policy"),
        "kvcompress" => Box::new(kvcompress::KvCompress {
            cfg: kvcompress::KvCompressConfig {
                window: opts.kvc_window,
                agg: opts.kvc_metric,
                max_pool: opts.max_pool,
                buffer: opts.kvc_buffer,
                protected: opts.protected_window,
                continual: !opts.compress_once,
            },
            layers,
            kv_heads,
        }),
        "snapkv" => Box::new(snapkv::SnapKv { cfg: snap }),
        "pyramidkv" => Box::new(pyramidkv::PyramidKv {
            snap,
            beta: opts.pyramid_beta,
            layers,
        }),
        "ada-snapkv" => Box::new(ada_snapkv::AdaSnapKv {
            snap,
            floor: opts.ada_floor,
        }),
        "streamingllm" => Box::new(streamingllm::StreamingLlm {
            sink: opts.sink_tokens,
        }),
        "h2o" => Box::new(h2o::H2o {
            recent_ratio: opts.h2o_recent_ratio,
            queries: opts.h2o_queries,
        }),
        other => anyhow::bail!("method `{other}` is not implemented"),
    };
    if spec.kvcrush() {
        return Ok(kvcrush::wrap(base, spec.base(), opts)?);
    }
    Ok(base)
}

/// Runs a [`Policy`] on a paged cache sized for the sample (or `--kv-memory`).
struct PagedRunner {
    name: String,
    policy: Box<dyn Policy>,
    budget: Option<Budget>,
    kv_memory: Option<u64>,
    block_size: usize,
    min_cache_tokens: usize,
    /// `--compress-on`.
    compress_on: CompressOn,
    unfused_prefill: bool,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    /// A clamp warning was printed already.
    warned: bool,
}

impl PagedRunner {
    fn new(
        name: &str,
        policy: Box<dyn Policy>,
        budget: Option<Budget>,
        cfg: &Config,
        opts: &MethodOptions,
    ) -> Self {
        PagedRunner {
            name: name.to_string(),
            policy,
            budget,
            kv_memory: opts.kv_memory,
            block_size: opts.block_size,
            min_cache_tokens: opts.min_cache_tokens,
            compress_on: opts.compress_on,
            unfused_prefill: opts.unfused_prefill,
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            warned: false,
        }
    }

    /// The cache shape for `model`.
    fn spec(&self, model: &Llama) -> PagedSpec {
        PagedSpec {
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            dtype: model.dtype,
            device: model.device.clone(),
        }
    }

    /// A cache sized for the sample (prompt + new tokens), or for `--kv-memory`.
    fn cache_for(&self, model: &Llama, prompt: &[u32], params: &GenParams) -> Result<PagedCache> {
        let spec = self.spec(model);
        let tokens =
            (prompt.len() + params.max_new_tokens).min(params.max_context.max(prompt.len()));
        let mut cache = match self.kv_memory {
            Some(bytes) => PagedCache::with_memory(spec, bytes),
            None => {
                let n = spec.blocks_for_tokens(tokens) + self.layers * self.kv_heads;
                PagedCache::new(spec, n)
            }
        }?;
        self.set_compression_device(&mut cache);
        Ok(cache)
    }

    /// `--compress-on` host/device overrides the cache's default (device on CUDA);
    /// `--unfused-prefill` turns the flash prefill kernel off.
    fn set_compression_device(&self, cache: &mut PagedCache) {
        match self.compress_on {
            CompressOn::Auto => {}
            CompressOn::Host => cache.set_device_compression(false),
            CompressOn::Device => cache.set_device_compression(true),
        }
        cache.set_flash_prefill(!self.unfused_prefill);
    }

    /// Per-head cache tokens for `budget` on a prompt of `prompt_len` tokens (warns once when
    /// the protected window clamps it).
    fn raw_budget(&mut self, prompt_len: usize, budget: Option<Budget>) -> Option<usize> {
        let (bs, floor) = (self.block_size, self.min_cache_tokens);
        let raw = match budget {
            None => None,
            Some(Budget::Rate(r)) => tokens_for_rate(prompt_len, r, bs, floor),
            Some(Budget::Tokens(n)) => Some(n),
        };
        if let (Some(m), Some(Budget::Rate(_))) = (raw, budget) {
            if m < self.policy.min_budget() && !self.warned {
                self.warned = true;
                eprintln!(
                    "warning: {}: {m} cache tokens is smaller than the protected window ({}); using {}",
                    self.name,
                    self.policy.min_budget(),
                    self.policy.min_budget()
                );
            }
        }
        raw
    }

    fn stats(&self, prompt_len: usize, kept: Kept) -> CompressionStats {
        let kept_kvs: usize = kept.per_head.iter().flatten().sum();
        CompressionStats {
            prompt_tokens: prompt_len,
            kept_kvs: kept_kvs as u64,
            prompt_kvs: (prompt_len * self.layers * self.kv_heads) as u64,
            kept_per_head: kept.per_head,
            budget_tokens: kept.budget,
        }
    }
}

impl Runner for PagedRunner {
    fn run(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
    ) -> Result<(Generation, CompressionStats)> {
        let mut cache = self.cache_for(model, prompt, params)?;
        let raw = self.raw_budget(prompt.len(), self.budget);
        let budget_of = move |_len: usize| raw;
        let mut hooks = CompressHooks::new(self.policy.as_ref(), self.layers, &budget_of);
        let g = engine::generate(model, &mut cache, prompt, params, &mut hooks)?;
        let kept = hooks.kept;
        Ok((g, self.stats(prompt.len(), kept)))
    }

    fn run_budgets(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
        budgets: &[Option<Budget>],
    ) -> Result<Vec<Result<(Generation, CompressionStats)>>> {
        let raws: Vec<Option<usize>> = budgets
            .iter()
            .map(|b| self.raw_budget(prompt.len(), *b))
            .collect();
        if budgets.len() > 1 && self.kv_memory.is_none() {
            self.run_batched(model, &[prompt], params, &[raws])?
                .pop()
                .expect("one result per prompt")
        } else {
            self.run_copies(model, prompt, params, &raws)
        }
    }

    fn run_prompts(
        &mut self,
        model: &mut Llama,
        prompts: &[&[u32]],
        params: &GenParams,
        budgets: &[Vec<Option<Budget>>],
    ) -> Result<Vec<PromptResults>> {
        if self.kv_memory.is_some() {
            return Ok(prompts_one_by_one(self, model, prompts, params, budgets));
        }
        let raws: Vec<Vec<Option<usize>>> = prompts
            .iter()
            .zip(budgets)
            .map(|(p, bs)| bs.iter().map(|b| self.raw_budget(p.len(), *b)).collect())
            .collect();
        self.run_batched(model, prompts, params, &raws)
    }
}

impl PagedRunner {
    /// [`Runner::run_budgets`] with `--kv-memory` (or one budget): each budget decodes alone
    /// in a copy of the prefilled cache (so each has the pool size the user asked for).
    fn run_copies(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
        raws: &[Option<usize>],
    ) -> Result<Vec<Result<(Generation, CompressionStats)>>> {
        let mut cache = self.cache_for(model, prompt, params)?;
        let seq = cache.add_sequence()?;
        let unknown = |_len: usize| None;
        let mut proto = CompressHooks::new(self.policy.as_ref(), self.layers, &unknown);
        let pre = engine::prefill(model, &mut cache, seq, prompt, params, &mut proto)?;
        let mut out = Vec::with_capacity(raws.len());
        for (i, raw) in raws.iter().enumerate() {
            let raw = *raw;
            let budget_of = move |_len: usize| raw;
            let mut hooks = proto.fork(&budget_of);
            // The last budget continues in the prefilled cache itself; the others in copies.
            let r = if i + 1 == raws.len() {
                engine::decode(model, &mut cache, seq, &pre, params, &mut hooks)
            } else {
                cache
                    .deep_copy()
                    .and_then(|mut c| engine::decode(model, &mut c, seq, &pre, params, &mut hooks))
            };
            let kept = hooks.kept;
            out.push(r.map(|g| (g, self.stats(prompt.len(), kept))));
        }
        Ok(out)
    }

    /// [`Runner::run_prompts`] in one pool: each prompt is prefilled once, each of its budgets
    /// gets a forked sequence (copied, then compressed before the next copy, so at most one
    /// uncompressed copy exists besides the original), and every (prompt, budget) decodes in
    /// one batch ([`engine::decode_batch`]): a sweep's rates, and several samples, cost one
    /// decode pass.
    fn run_batched(
        &mut self,
        model: &mut Llama,
        prompts: &[&[u32]],
        params: &GenParams,
        raws: &[Vec<Option<usize>>],
    ) -> Result<Vec<PromptResults>> {
        let spec = self.spec(model);
        // Pool: one original and one transient copy of the longest prompt, plus every fork at
        // its budget with room to decode. A head may keep more than the budget (KV-Compress
        // allocates across heads), but a sequence's total stays within budget x heads, plus
        // one partly filled block per head.
        let heads = self.layers * self.kv_heads;
        let min_budget = self.policy.min_budget();
        let full = |len: usize| {
            let tokens = (len + params.max_new_tokens).min(params.max_context.max(len));
            spec.blocks_for_tokens(tokens) + heads
        };
        let fork_blocks = |len: usize, raw: Option<usize>| match raw {
            None => full(len),
            Some(b) => (spec.blocks_for_tokens(b.max(min_budget).min(len))
                + spec.blocks_for_tokens(params.max_new_tokens)
                + 2 * heads)
                .min(full(len)),
        };
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let n_blocks = 2 * (spec.blocks_for_tokens(longest) + heads)
            + prompts
                .iter()
                .zip(raws)
                .flat_map(|(p, rs)| rs.iter().map(|r| fork_blocks(p.len(), *r)))
                .sum::<usize>();
        let n_forks: usize = raws.iter().map(|r| r.len()).sum();
        let bytes = n_blocks as u64 * spec.layout().bytes_per_block();
        let mut cache = PagedCache::new(spec, n_blocks).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{e}: allocating one pool for {n_forks} sequences ({} prompts x their budgets; \
                 {n_blocks} blocks, {:.1} MiB); --no-shared-prefill runs one budget at a time",
                prompts.len(),
                bytes as f64 / (1 << 20) as f64
            ))
        })?;
        self.set_compression_device(&mut cache);
        let budget_fns: Vec<Vec<Box<BudgetFn>>> = raws
            .iter()
            .map(|rs| {
                rs.iter()
                    .map(|&raw| Box::new(move |_len: usize| raw) as Box<BudgetFn>)
                    .collect()
            })
            .collect();
        let unknown = |_len: usize| None;
        // Per prompt: its prefill's error, or where its forks start.
        let mut prompt_err: Vec<Option<candle_core::Error>> = Vec::with_capacity(prompts.len());
        let mut first_logits: Vec<Vec<f32>> = Vec::with_capacity(prompts.len());
        // Per fork (prompt-major): hooks, sequence or error, prefill time.
        let mut hooks: Vec<CompressHooks> = Vec::with_capacity(n_forks);
        let mut forks: Vec<Fork> = Vec::with_capacity(n_forks);
        for (s, prompt) in prompts.iter().enumerate() {
            let prefilled = cache.add_sequence().and_then(|seq0| {
                let mut proto = CompressHooks::new(self.policy.as_ref(), self.layers, &unknown);
                match engine::prefill(model, &mut cache, seq0, prompt, params, &mut proto)
                    .and_then(|pre| Ok((Llama::argmax(&pre.logits)?, pre)))
                {
                    Ok((first, pre)) => Ok((seq0, proto, pre, first)),
                    Err(e) => {
                        let _ = cache.remove_sequence(seq0);
                        Err(e)
                    }
                }
            });
            let (seq0, mut proto, pre, first) = match prefilled {
                Ok(x) => x,
                Err(e) => {
                    prompt_err.push(Some(e));
                    first_logits.push(Vec::new());
                    continue;
                }
            };
            prompt_err.push(None);
            first_logits.push(pre.logits.to_vec1::<f32>()?);
            let n = budget_fns[s].len();
            // Forks that compress on the device copy the prompt's metric there with their
            // blocks (counted in the first fork's compression time).
            let t = std::time::Instant::now();
            let shared = if n > 1 {
                proto.share_device_metric(&mut cache, seq0)
            } else {
                Ok(false)
            };
            let mut share_ms = t.elapsed().as_secs_f64() * 1e3;
            if let Err(e) = shared {
                let _ = cache.remove_sequence(seq0);
                *prompt_err.last_mut().expect("pushed above") = Some(e);
                continue;
            }
            for (k, f) in budget_fns[s].iter().enumerate() {
                let mut h = proto.fork(f.as_ref());
                // The last budget takes the original sequence.
                let (forked, fork_ms) = if k + 1 == n {
                    (Ok(seq0), 0.0)
                } else {
                    let t = std::time::Instant::now();
                    let r = cache.fork_sequence(seq0);
                    (r, t.elapsed().as_secs_f64() * 1e3)
                };
                let t = std::time::Instant::now();
                let r = forked.and_then(|seq| h.after_prefill(&mut cache, seq).map(|_| seq));
                let compress_ms = t.elapsed().as_secs_f64() * 1e3 + std::mem::take(&mut share_ms);
                let (seq, err) = match r {
                    Ok(seq) => (Some(seq), None),
                    Err(e) => (None, Some(e)),
                };
                forks.push(Fork {
                    prompt: s,
                    seq,
                    err,
                    start: engine::BatchStart {
                        first,
                        prompt_len: prompt.len(),
                    },
                    prefill_times: engine::PrefillTimes {
                        fork_ms,
                        compress_ms,
                        ..pre.times
                    },
                });
                hooks.push(h);
            }
        }
        let live: Vec<usize> = (0..forks.len())
            .filter(|&i| forks[i].seq.is_some())
            .collect();
        let decoded = {
            let seqs: Vec<SeqId> = live.iter().map(|&i| forks[i].seq.expect("live")).collect();
            let starts: Vec<engine::BatchStart> = live.iter().map(|&i| forks[i].start).collect();
            let mut live_hooks: Vec<&mut dyn Hooks> = Vec::with_capacity(live.len());
            for (i, h) in hooks.iter_mut().enumerate() {
                if forks[i].seq.is_some() {
                    live_hooks.push(h);
                }
            }
            if seqs.is_empty() {
                Ok(Vec::new())
            } else {
                engine::decode_batch(model, &mut cache, &seqs, &mut live_hooks, &starts, params)
            }
        };
        let mut outputs: Vec<Option<Result<engine::BatchOutput>>> =
            (0..forks.len()).map(|_| None).collect();
        match decoded {
            Ok(v) => {
                for (&i, o) in live.iter().zip(v) {
                    outputs[i] = Some(Ok(o));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for &i in &live {
                    outputs[i] = Some(Err(candle_core::Error::Msg(msg.clone())));
                }
            }
        }
        let mut out: Vec<PromptResults> = prompt_err
            .into_iter()
            .map(|e| match e {
                Some(e) => Err(e),
                None => Ok(Vec::new()),
            })
            .collect();
        for ((f, h), o) in forks.into_iter().zip(hooks).zip(outputs) {
            let r = match (f.err, o) {
                (Some(e), _) => Err(e),
                (None, Some(Ok(o))) => Ok((
                    Generation {
                        output_ids: o.output_ids,
                        finish_reason: o.finish_reason,
                        first_logits: Some(first_logits[f.prompt].clone()),
                        prefill_ms: f.prefill_times.total(),
                        prefill_times: f.prefill_times,
                        decode_ms: o.decode_ms,
                        decode_times: o.decode_times,
                    },
                    self.stats(f.start.prompt_len, h.kept),
                )),
                (None, Some(Err(e))) => Err(e),
                (None, None) => Err(candle_core::Error::Msg("fork was not decoded".into())),
            };
            if let Ok(v) = &mut out[f.prompt] {
                v.push(r);
            }
        }
        Ok(out)
    }
}

/// One (prompt, budget) of [`PagedRunner::run_batched`].
struct Fork {
    prompt: usize,
    /// Its sequence, or why it has none.
    seq: Option<SeqId>,
    err: Option<candle_core::Error>,
    start: engine::BatchStart,
    /// The prompt's prefill (shared forward and observe) plus this fork's copy and compression.
    prefill_times: engine::PrefillTimes,
}

/// The full cache: the contiguous reference backend, no hooks. On a GPU, several prompts
/// ([`Runner::run_prompts`], `--batch-samples`) decode in one batch through the paged cache
/// with nothing evicted (`batched`), as the compressed runs do: one sample at a time the full
/// run of a LongBench sweep took longer than all its compressed runs together. The paged cache
/// without eviction attends over the same keys (tests: paged rate 1 = contiguous, token for
/// token, on the CPU and the GPU); on the GPU its decode kernel rounds differently from the
/// contiguous cache's candle ops, so bf16 outputs may differ in rare tokens.
struct FullRunner {
    layers: usize,
    kv_heads: usize,
    /// The paged runner that decodes batches of prompts on a GPU.
    batched: PagedRunner,
}

const FULL_TAKES_NO_BUDGET: &str = "method `full` keeps every KV: it takes no rate or token budget";

/// `full` on the paged cache: probes nothing, evicts nothing.
struct KeepAll;

impl Policy for KeepAll {
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    fn decode_probe(&self) -> Probe {
        Probe::None
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(policy::zero_scores(positions))
    }
    fn plan(&self, _: &SeqView, _: usize, _: Phase) -> EvictionPlan {
        EvictionPlan::default()
    }
    fn continual(&self) -> bool {
        false
    }
    fn min_budget(&self) -> usize {
        0
    }
}

impl Runner for FullRunner {
    fn run_budgets(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
        budgets: &[Option<Budget>],
    ) -> Result<Vec<Result<(Generation, CompressionStats)>>> {
        if budgets.iter().any(|b| b.is_some()) {
            candle_core::bail!("{FULL_TAKES_NO_BUDGET}");
        }
        Ok(budgets
            .iter()
            .map(|_| self.run(model, prompt, params))
            .collect())
    }

    fn run(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
    ) -> Result<(Generation, CompressionStats)> {
        let mut cache = ContiguousCache::new(self.layers);
        let g = engine::generate(model, &mut cache, prompt, params, &mut NoHooks)?;
        Ok((g, self.stats(prompt.len())))
    }

    fn run_prompts(
        &mut self,
        model: &mut Llama,
        prompts: &[&[u32]],
        params: &GenParams,
        budgets: &[Vec<Option<Budget>>],
    ) -> Result<Vec<PromptResults>> {
        if !model.device.is_cuda() || prompts.len() < 2 {
            return Ok(prompts_one_by_one(self, model, prompts, params, budgets));
        }
        if budgets.iter().flatten().any(|b| b.is_some()) {
            candle_core::bail!("{FULL_TAKES_NO_BUDGET}");
        }
        let mut out = self.batched.run_prompts(model, prompts, params, budgets)?;
        // The full run's statistics, whichever cache ran it.
        for (p, res) in prompts.iter().zip(&mut out) {
            if let Ok(gens) = res {
                for (_, st) in gens.iter_mut().flatten() {
                    *st = self.stats(p.len());
                }
            }
        }
        Ok(out)
    }
}

impl FullRunner {
    fn stats(&self, prompt_len: usize) -> CompressionStats {
        full_stats(prompt_len, self.layers, self.kv_heads)
    }
}

/// The statistics of a full-cache generation of a `prompt_len`-token prompt, whichever
/// runner made it (`full`'s own, or a compressed method's keep-all fork, `None` budget).
pub fn full_stats(prompt_len: usize, layers: usize, kv_heads: usize) -> CompressionStats {
    let kvs = (prompt_len * layers * kv_heads) as u64;
    CompressionStats {
        prompt_tokens: prompt_len,
        kept_kvs: kvs,
        prompt_kvs: kvs,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: MethodOptions,
    }

    #[test]
    fn default_options_equal_flag_defaults() {
        assert_eq!(Cli::parse_from(["x"]).opts, MethodOptions::default());
        let o = Cli::parse_from(["x", "--kv-memory", "2GiB", "--kvc-window", "8"]).opts;
        assert_eq!(o.kv_memory, Some(2 << 30));
        assert_eq!(o.kvc_window, 8);
    }

    #[test]
    fn parse_names_and_errors() {
        assert_eq!(
            MethodSpec::parse("snapkv+kvcrush").unwrap().base(),
            "snapkv"
        );
        for m in METHODS {
            MethodSpec::parse(m).unwrap();
        }
        let e = MethodSpec::parse("kvcrush").unwrap_err().to_string();
        assert!(e.contains("modifier"), "{e}");
        let e = MethodSpec::parse("full+kvcrush").unwrap_err().to_string();
        assert!(e.contains("not one"), "{e}");
        let e = MethodSpec::parse("streamingllm+kvcrush")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not one"), "{e}");
        let e = MethodSpec::parse("snap").unwrap_err().to_string();
        assert!(e.contains("known methods: full, kvcompress"), "{e}");
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
