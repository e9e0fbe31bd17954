//! Compression methods: the contract between `kvc eval` / `kvc bench` and the methods.
//!
//! A method is chosen by name (`--methods full,kvcompress,snapkv+kvcrush`) and a budget
//! (`--rates` or `--cache-tokens`); [`runner`] builds a [`Runner`] that generates one sample
//! with that method's cache backend and hooks and reports what it kept ([`CompressionStats`]).
//! The eval pipeline only sees this module's types; each method lives in its own file
//! (`compress/<method>.rs`) and plugs into the engine through [`crate::engine::Hooks`] and a
//! [`crate::kvcache::CacheBackend`].
use candle_core::Result;

use crate::engine::{self, GenParams, Generation, NoHooks};
use crate::kvcache::contiguous::ContiguousCache;
use crate::model::{Config, Llama};

pub use crate::report::scores::Budget;

/// Every method name `--methods` accepts (a `+kvcrush` suffix is allowed on importance methods
/// once KVCrush lands).
pub const METHODS: &[&str] = &["full"];

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
        anyhow::bail!(
            "unknown compression method `{s}`; known methods: {}",
            METHODS.join(", ")
        )
    }

    /// Whether the method keeps every KV (the baseline percentages divide by).
    pub fn is_full(&self) -> bool {
        self.name == "full"
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
}

/// Method parameters shared by `kvc eval` and `kvc bench` (flattened into their clap args):
/// each method's paper defaults, overridable by flags.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MethodOptions {}

/// Build the runner for `spec` at `budget` (`None` = no eviction).
pub fn runner(
    spec: &MethodSpec,
    budget: Option<Budget>,
    cfg: &Config,
    _opts: &MethodOptions,
) -> anyhow::Result<Box<dyn Runner>> {
    match spec.name.as_str() {
        "full" => {
            if budget.is_some() {
                anyhow::bail!("method `full` keeps every KV: it takes no rate or token budget");
            }
            Ok(Box::new(FullRunner {
                layers: cfg.num_hidden_layers,
                kv_heads: cfg.num_key_value_heads,
            }))
        }
        other => anyhow::bail!("method `{other}` is not implemented"),
    }
}

/// The full cache: the contiguous reference backend, no hooks.
struct FullRunner {
    layers: usize,
    kv_heads: usize,
}

impl Runner for FullRunner {
    fn run(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
    ) -> Result<(Generation, CompressionStats)> {
        let mut cache = ContiguousCache::new(self.layers);
        let g = engine::generate(model, &mut cache, prompt, params, &mut NoHooks)?;
        let kvs = (prompt.len() * self.layers * self.kv_heads) as u64;
        Ok((
            g,
            CompressionStats {
                prompt_tokens: prompt.len(),
                kept_kvs: kvs,
                prompt_kvs: kvs,
            },
        ))
    }
}
