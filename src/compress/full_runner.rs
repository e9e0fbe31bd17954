//! `full`: the uncompressed baseline's [`Runner`] and its statistics.
use candle_core::{Result, Tensor};

use super::paged_runner::PagedRunner;
use super::policy::{self, Phase, Policy, SeqView};
use super::ranks::RankSplit;
use super::{prompts_one_by_one, Budget, CompressionStats, Prompt, PromptResults, Runner};
use crate::engine::{self, GenParams, Generation, NoHooks};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::contiguous::ContiguousCache;
use crate::kvcache::{CacheBackend, Probe};
use crate::model::Llama;

/// The full cache: the contiguous reference backend, no hooks. On a GPU, several prompts
/// ([`Runner::run_prompts`], `--batch-samples`) decode in one batch through the paged cache
/// with nothing evicted (`batched`), as the compressed runs do: one sample at a time the full
/// run of a LongBench sweep took longer than all its compressed runs together. The paged cache
/// without eviction attends over the same keys (tests: paged rate 1 = contiguous, token for
/// token, on the CPU and the GPU); on the GPU its decode kernel rounds differently from the
/// contiguous cache's candle ops, so bf16 outputs may differ in rare tokens.
pub(super) struct FullRunner {
    pub(super) layers: usize,
    pub(super) kv_heads: usize,
    /// The paged runner that decodes batches of prompts on a GPU.
    pub(super) batched: PagedRunner,
}

pub(super) const FULL_TAKES_NO_BUDGET: &str =
    "method `full` keeps every KV: it takes no rate or token budget";

/// `full` on the paged cache: probes nothing, evicts nothing.
pub(super) struct KeepAll;

impl Policy for KeepAll {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(policy::zero_scores(positions))
    }
    fn plan(&self, _: &SeqView, _: usize, _: Phase) -> EvictionPlan {
        EvictionPlan::default()
    }
    fn min_budget(&self) -> usize {
        0
    }
}

impl Runner for FullRunner {
    fn run_budgets(
        &mut self,
        model: &mut Llama,
        prompt: Prompt,
        params: &GenParams,
        budgets: &[Option<Budget>],
    ) -> Result<Vec<Result<(Generation, CompressionStats)>>> {
        if budgets.iter().any(|b| b.is_some()) {
            candle_core::bail!("{FULL_TAKES_NO_BUDGET}");
        }
        Ok(budgets
            .iter()
            .map(|_| self.run_contiguous(model, prompt, params))
            .collect())
    }

    fn run(
        &mut self,
        model: &mut Llama,
        prompt: &[u32],
        params: &GenParams,
    ) -> Result<(Generation, CompressionStats)> {
        self.run_contiguous(model, prompt.into(), params)
    }

    fn run_prompts(
        &mut self,
        model: &mut Llama,
        prompts: &[Prompt],
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
                    *st = self.stats(p.context().len());
                }
            }
        }
        Ok(out)
    }
}

impl FullRunner {
    /// One generation in the contiguous cache: the context prefilled, then the question read.
    fn run_contiguous(
        &mut self,
        model: &mut Llama,
        prompt: Prompt,
        params: &GenParams,
    ) -> Result<(Generation, CompressionStats)> {
        let mut cache = ContiguousCache::new(self.layers);
        let seq = cache.add_sequence()?;
        let g = engine::prefill(
            model,
            &mut cache,
            seq,
            prompt.context(),
            params,
            &mut NoHooks,
        )
        .and_then(|pre| {
            let q = prompt.question_ids();
            engine::decode(model, &mut cache, seq, &pre, q, params, &mut NoHooks)
        });
        cache.remove_sequence(seq)?;
        Ok((g?, self.stats(prompt.context().len())))
    }

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
