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
//! [`streamingllm`], [`h2o`], [`ada_snapkv`], [`tova`], [`random`], [`knorm`] (Knorm and
//! KeyDiff), [`lagkv`], [`expected_attention`] (with [`query_stats`]), [`kvzip`] (scored by
//! repeat passes after prefill), and the modifiers [`kvcrush`] (`<method>+kvcrush`),
//! [`chunkkv`] (`<method>+chunkkv`) and [`criticalkv`] (`<method>+criticalkv`).
//!
//! Budgets: a rate `r` becomes `M` cache tokens per (layer, kv-head) by KV-Compress's formula
//! with the 128-token floor ([`crate::kvcache::budget::tokens_for_rate`]) for every method, so
//! methods compare at equal memory; `r <= 1` evicts nothing. A token budget is `M` directly.
//! A budget below a method's protected window is clamped to it (with a warning on stderr).
//! [`CompressionStats`] records what was actually kept after the prefill compression.
//!
//! Files: this one holds the method names, the [`Runner`] contract and the constructors;
//! `options.rs` the method flags ([`MethodOptions`]), `paged_runner.rs` the runner of every
//! compressed method, `full_runner.rs` the full cache's; one file per method besides.
use candle_core::Result;

use crate::engine::{GenParams, Generation};
use crate::model::{Config, Llama};

pub mod ada_snapkv;
pub mod chunkkv;
pub mod criticalkv;
pub mod expected_attention;
pub mod h2o;
pub mod knorm;
pub mod kvcompress;
pub mod kvcrush;
pub mod kvzip;
pub mod lagkv;
pub mod policy;
pub mod pyramidkv;
pub mod query_stats;
pub mod random;
pub mod ranks;
pub mod scorer;
pub mod snapkv;
pub mod streamingllm;
pub mod tova;

mod full_runner;
mod options;
mod paged_runner;

use full_runner::{FullRunner, KeepAll, FULL_TAKES_NO_BUDGET};
use paged_runner::PagedRunner;
use policy::Policy;

pub use crate::kvcache::budget::Budget;
pub use full_runner::full_stats;
pub use options::{parse_bytes, positive, CompressOn, MethodOptions, Preset, WHOLE_PROMPT_WINDOW};

/// Every method name `--methods` accepts.
pub const METHODS: &[&str] = &[
    "full",
    "kvcompress",
    "snapkv",
    "pyramidkv",
    "streamingllm",
    "h2o",
    "ada-snapkv",
    "tova",
    "random",
    "knorm",
    "keydiff",
    "lagkv",
    "expected-attention",
    "kvzip",
    "snapkv+chunkkv",
    "tova+chunkkv",
    "knorm+chunkkv",
    "keydiff+chunkkv",
    "random+chunkkv",
    "expected-attention+chunkkv",
    "snapkv+criticalkv",
    "tova+criticalkv",
    "knorm+criticalkv",
    "keydiff+criticalkv",
    "expected-attention+criticalkv",
    "kvcompress+kvcrush",
    "snapkv+kvcrush",
    "pyramidkv+kvcrush",
    "h2o+kvcrush",
    "ada-snapkv+kvcrush",
];

/// Importance-based methods KVCrush can modify.
pub const KVCRUSH_BASES: &[&str] = &["kvcompress", "snapkv", "pyramidkv", "h2o", "ada-snapkv"];

/// The modifiers (`<method>+<modifier>`): name, the methods each modifies, and what those are.
const MODIFIERS: &[(&str, &[&str], &str)] = &[
    ("kvcrush", KVCRUSH_BASES, "an importance-based method"),
    (
        "chunkkv",
        chunkkv::CHUNKKV_BASES,
        "a method that scores every prompt token once",
    ),
    (
        "criticalkv",
        criticalkv::CRITICALKV_BASES,
        "a method whose scores are in the metric once after prefill",
    ),
];

/// The suffix of a method run under the question-agnostic protocol (`--question-in-window
/// no`): `snapkv@context-only` compresses the context before the question is read.
pub const CONTEXT_ONLY: &str = "@context-only";

/// A parsed `--methods` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSpec {
    /// Canonical name as recorded in prediction rows and result paths (`kvcompress`,
    /// `snapkv+kvcrush`, `snapkv@context-only`).
    pub name: String,
}

impl MethodSpec {
    /// Parse one method name, with [`CONTEXT_ONLY`] for the question-agnostic protocol;
    /// unknown names list the known ones.
    pub fn parse(s: &str) -> anyhow::Result<MethodSpec> {
        let s = s.trim();
        if let Some(m) = s.strip_suffix(CONTEXT_ONLY) {
            let spec = MethodSpec::parse_policy(m)?;
            if spec.is_full() {
                anyhow::bail!(
                    "`{s}`: the full cache compresses nothing, so the question's place does not change it; its one baseline serves both protocols"
                );
            }
            return Ok(spec.context_only_variant());
        }
        MethodSpec::parse_policy(s)
    }

    /// The same method under the question-agnostic protocol.
    pub fn context_only_variant(&self) -> MethodSpec {
        MethodSpec {
            name: format!("{}{CONTEXT_ONLY}", self.policy_name()),
        }
    }

    /// Whether the method compresses the context before the question is read (the
    /// question-agnostic protocol) rather than the whole prompt (LongBench's).
    pub fn context_only(&self) -> bool {
        self.name.ends_with(CONTEXT_ONLY)
    }

    /// The name without the protocol (`snapkv+kvcrush` for `snapkv+kvcrush@context-only`).
    pub fn policy_name(&self) -> &str {
        self.name.strip_suffix(CONTEXT_ONLY).unwrap_or(&self.name)
    }

    /// Parse a name without the protocol suffix.
    fn parse_policy(s: &str) -> anyhow::Result<MethodSpec> {
        if METHODS.contains(&s) {
            return Ok(MethodSpec {
                name: s.to_string(),
            });
        }
        for (modifier, bases, what) in MODIFIERS {
            if s == *modifier {
                anyhow::bail!(
                    "`{s}` is a modifier, not a method: use `<method>+{s}` with one of {}",
                    bases.join(", ")
                );
            }
            if let Some(base) = s.strip_suffix(&format!("+{modifier}")) {
                if METHODS.contains(&base) {
                    anyhow::bail!(
                        "`{s}`: {modifier} only modifies {what} ({}); `{base}` is not one",
                        bases.join(", ")
                    );
                }
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

    /// The importance method (`snapkv` for `snapkv+kvcrush`, `snapkv+chunkkv`, ...).
    pub fn base(&self) -> &str {
        let n = self.policy_name();
        MODIFIERS
            .iter()
            .find_map(|(m, _, _)| n.strip_suffix(m)?.strip_suffix('+'))
            .unwrap_or(n)
    }

    /// Whether the ChunkKV modifier is on.
    pub fn chunkkv(&self) -> bool {
        self.policy_name().ends_with("+chunkkv")
    }

    /// Whether the CriticalKV modifier is on.
    pub fn criticalkv(&self) -> bool {
        self.policy_name().ends_with("+criticalkv")
    }

    /// Whether the KVCrush modifier is on.
    pub fn kvcrush(&self) -> bool {
        self.policy_name().ends_with("+kvcrush")
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

/// One prompt of a run: its ids, and how many of the last ones are the question, read into
/// the cache only after the compression (the question-agnostic protocol, `--question-in-window
/// no`); 0 is LongBench's protocol, the whole prompt prefilled and compressed together.
/// Budgets by rate are taken of the part compressed, the context.
#[derive(Debug, Clone, Copy)]
pub struct Prompt<'a> {
    pub ids: &'a [u32],
    pub question: usize,
}

impl<'a> Prompt<'a> {
    /// The tokens prefilled and compressed.
    pub fn context(&self) -> &'a [u32] {
        &self.ids[..self.ids.len() - self.question]
    }
    /// The tokens read after the compression.
    pub fn question_ids(&self) -> &'a [u32] {
        &self.ids[self.ids.len() - self.question..]
    }
}

impl<'a> From<&'a [u32]> for Prompt<'a> {
    /// The whole prompt prefilled (LongBench's protocol).
    fn from(ids: &'a [u32]) -> Self {
        Prompt { ids, question: 0 }
    }
}

impl<'a> From<&'a Vec<u32>> for Prompt<'a> {
    fn from(ids: &'a Vec<u32>) -> Self {
        Prompt { ids, question: 0 }
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
    /// budget alone (the prompt's KVs and prefill metrics do not depend on the budget); with a
    /// question ([`Prompt::question`]) each copy reads it after its compression. The
    /// outer `Err` is a failed prefill (every budget fails); an inner one, one budget's failure.
    /// Each generation's `prefill_ms` is the shared prefill plus its own compression.
    fn run_budgets(
        &mut self,
        model: &mut Llama,
        prompt: Prompt,
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
        prompts: &[Prompt],
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
    prompts: &[Prompt],
    params: &GenParams,
    budgets: &[Vec<Option<Budget>>],
) -> Vec<PromptResults> {
    prompts
        .iter()
        .zip(budgets)
        .map(|(p, b)| runner.run_budgets(model, *p, params, b))
        .collect()
}

/// One prompt's generations under each of its budgets ([`Runner::run_prompts`]).
pub type PromptResults = Result<Vec<Result<(Generation, CompressionStats)>>>;

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
        "tova" => Box::new(tova::Tova),
        "random" => Box::new(random::RandomEviction),
        "knorm" => Box::new(knorm::KeyScored {
            score: knorm::KeyScore::Knorm,
        }),
        "keydiff" => Box::new(knorm::KeyScored {
            score: knorm::KeyScore::KeyDiff,
        }),
        "lagkv" => Box::new(knorm::KeyScored {
            score: knorm::KeyScore::LagKv(lagkv::LagKv::default()),
        }),
        "expected-attention" => Box::new(expected_attention::ExpectedAttention::new(cfg)),
        "kvzip" => Box::new(kvzip::KvZip::new(
            cfg,
            opts.kvzip_text.clone().unwrap_or_default(),
        )),
        other => anyhow::bail!("method `{other}` is not implemented"),
    };
    if spec.kvcrush() {
        return Ok(kvcrush::wrap(base, spec.base(), opts)?);
    }
    if spec.criticalkv() {
        return Ok(Box::new(criticalkv::CriticalKv::new(base)));
    }
    if spec.chunkkv() {
        return Ok(Box::new(chunkkv::ChunkKv {
            base,
            chunk: chunkkv::CHUNK,
        }));
    }
    Ok(base)
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
        let q = MethodSpec::parse("snapkv+kvcrush@context-only").unwrap();
        assert!(q.context_only() && q.kvcrush() && !q.chunkkv());
        assert_eq!((q.base(), q.policy_name()), ("snapkv", "snapkv+kvcrush"));
        assert!(!MethodSpec::parse("snapkv").unwrap().context_only());
        let e = MethodSpec::parse("full@context-only")
            .unwrap_err()
            .to_string();
        assert!(e.contains("one baseline serves both"), "{e}");
        assert!(MethodSpec::parse("snap@context-only").is_err());
        let e = MethodSpec::parse("snap").unwrap_err().to_string();
        assert!(e.contains("known methods: full, kvcompress"), "{e}");
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
