//! [`PagedRunner`]: a compressed method's [`Runner`] on the paged cache: one sample alone,
//! one prefill continued under several budgets, or several prompts decoded in one batch.
use candle_core::Result;

use super::policy::{BudgetFn, CompressHooks, Kept, Policy};
use super::ranks::RankExchange;
use super::{
    prompts_one_by_one, Budget, CompressOn, CompressionStats, MethodOptions, Prompt, PromptResults,
    Runner,
};
use crate::engine::{self, GenParams, Generation, Hooks};
use crate::kvcache::budget::{shared_pool_blocks, tokens_for_rate, PoolShape};
use crate::kvcache::paged::{PagedCache, PagedSpec};
use crate::kvcache::{CacheBackend, SeqId};
use crate::model::{Config, Llama};

/// Runs a [`Policy`] on a paged cache sized for the sample (or `--kv-memory`).
pub(super) struct PagedRunner {
    name: String,
    policy: Box<dyn Policy>,
    budget: Option<Budget>,
    /// `--kv-memory` (`None`: sized for the sample).
    pub(super) kv_memory: Option<u64>,
    block_size: usize,
    min_cache_tokens: usize,
    /// `--compress-on`.
    compress_on: CompressOn,
    unfused_prefill: bool,
    layers: usize,
    /// The whole model's kv-heads (a tensor-parallel rank's cache holds its part).
    kv_heads: usize,
    /// A clamp warning was printed already.
    warned: bool,
}

impl PagedRunner {
    pub(super) fn new(
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
            warned: false,
        }
    }

    /// Hooks of this runner's policy; a policy that reweights by the output projection
    /// ([`super::policy::Policy::reweights`]) gets `model`'s.
    fn hooks<'h>(
        &'h self,
        model: &Llama,
        budget_of: &'h BudgetFn<'h>,
    ) -> Result<CompressHooks<'h>> {
        let hooks = CompressHooks::new(self.policy.as_ref(), self.layers, budget_of)
            .with_ranks(RankExchange::of(model));
        if self.policy.reweights() {
            return Ok(hooks.with_out_proj(model.out_proj()?));
        }
        Ok(hooks)
    }

    /// The cache shape for `model` (a tensor-parallel rank's: its kv-heads).
    fn spec(&self, model: &Llama) -> PagedSpec {
        engine::paged_spec(model, self.block_size)
    }

    /// A cache sized for the sample (prompt + new tokens), or for `--kv-memory`.
    fn cache_for(&self, model: &Llama, prompt: &[u32], params: &GenParams) -> Result<PagedCache> {
        let spec = self.spec(model);
        let tokens =
            (prompt.len() + params.max_new_tokens).min(params.max_context.max(prompt.len()));
        let mut cache = match self.kv_memory {
            Some(bytes) => PagedCache::with_memory(spec, bytes),
            None => {
                // Room for the policy's extra passes too (KVzip's repeat inputs).
                let scratch = spec.blocks_for_tokens(self.policy.scratch_tokens(prompt.len()));
                let n = spec.blocks_for_tokens(tokens) + spec.layers * spec.kv_heads + scratch;
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
        let mut hooks = self.hooks(model, &budget_of)?;
        let seq = cache.add_sequence()?;
        let g = prefill_scored(model, &mut cache, seq, prompt, params, &mut hooks)
            .and_then(|pre| engine::decode(model, &mut cache, seq, &pre, &[], params, &mut hooks));
        cache.remove_sequence(seq)?;
        let g = g?;
        let kept = hooks.kept;
        Ok((g, self.stats(prompt.len(), kept)))
    }

    fn run_budgets(
        &mut self,
        model: &mut Llama,
        prompt: Prompt,
        params: &GenParams,
        budgets: &[Option<Budget>],
    ) -> Result<Vec<Result<(Generation, CompressionStats)>>> {
        let raws: Vec<Option<usize>> = budgets
            .iter()
            .map(|b| self.raw_budget(prompt.context().len(), *b))
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
        prompts: &[Prompt],
        params: &GenParams,
        budgets: &[Vec<Option<Budget>>],
    ) -> Result<Vec<PromptResults>> {
        if self.kv_memory.is_some() {
            return Ok(prompts_one_by_one(self, model, prompts, params, budgets));
        }
        let raws: Vec<Vec<Option<usize>>> = prompts
            .iter()
            .zip(budgets)
            .map(|(p, bs)| {
                bs.iter()
                    .map(|b| self.raw_budget(p.context().len(), *b))
                    .collect()
            })
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
        prompt: Prompt,
        params: &GenParams,
        raws: &[Option<usize>],
    ) -> Result<Vec<Result<(Generation, CompressionStats)>>> {
        let mut cache = self.cache_for(model, prompt.ids, params)?;
        let seq = cache.add_sequence()?;
        let unknown = |_len: usize| None;
        let mut proto = self.hooks(model, &unknown)?;
        let pre = prefill_scored(model, &mut cache, seq, prompt.context(), params, &mut proto)?;
        let question = prompt.question_ids();
        let mut out = Vec::with_capacity(raws.len());
        for (i, raw) in raws.iter().enumerate() {
            let raw = *raw;
            let budget_of = move |_len: usize| raw;
            let mut hooks = proto.fork(&budget_of);
            // The last budget continues in the prefilled cache itself; the others in copies.
            let mut decode = |c: &mut PagedCache| {
                engine::decode(model, c, seq, &pre, question, params, &mut hooks)
            };
            let r = if i + 1 == raws.len() {
                decode(&mut cache)
            } else {
                cache.deep_copy().and_then(|mut c| decode(&mut c))
            };
            let kept = hooks.kept;
            out.push(r.map(|g| (g, self.stats(pre.prompt_len, kept))));
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
        prompts: &[Prompt],
        params: &GenParams,
        raws: &[Vec<Option<usize>>],
    ) -> Result<Vec<PromptResults>> {
        let mut cache = self.batch_pool(model, prompts, params, raws)?;
        let n_forks: usize = raws.iter().map(|r| r.len()).sum();
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
            let (seq0, mut proto, pre, first) =
                match self.prefill_one(model, &mut cache, prompt.context(), params, &unknown) {
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
                let (r, fork_ms, compress_ms) =
                    fork_and_compress(&mut cache, &mut h, seq0, k + 1 == n);
                let compress_ms = compress_ms + std::mem::take(&mut share_ms);
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
                        prompt_len: pre.prompt_len,
                        question: prompt.question_ids(),
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
        let outputs = decode_forks(model, &mut cache, &forks, &mut hooks, params);
        Ok(self.fork_results(prompt_err, &first_logits, forks, hooks, outputs))
    }

    /// The pool of [`PagedRunner::run_batched`] ([`shared_pool_blocks`]: every fork at its
    /// budget with room to decode, each prompt's last fork in its own cache, one transient
    /// copy). A pool that cannot be allocated is an error naming its size and
    /// `--no-shared-prefill`.
    fn batch_pool(
        &self,
        model: &Llama,
        prompts: &[Prompt],
        params: &GenParams,
        raws: &[Vec<Option<usize>>],
    ) -> Result<PagedCache> {
        let spec = self.spec(model);
        // A question read after the compression needs room beside the new tokens.
        let question = prompts.iter().map(|p| p.question).max().unwrap_or(0);
        let shape = PoolShape {
            block_size: spec.block_size,
            heads: spec.layers * spec.kv_heads,
            max_new_tokens: params.max_new_tokens + question,
            max_context: params.max_context,
            min_budget: self.policy.min_budget(),
        };
        let lens: Vec<(usize, &[Option<usize>])> = prompts
            .iter()
            .zip(raws)
            .map(|(p, r)| (p.context().len(), r.as_slice()))
            .collect();
        // The policy's extra passes (KVzip's repeat inputs) run on one prompt at a time, before
        // its forks exist.
        let scratch = lens
            .iter()
            .map(|&(len, _)| self.policy.scratch_tokens(len))
            .max()
            .unwrap_or(0);
        let n_blocks = shared_pool_blocks(&shape, &lens) + spec.blocks_for_tokens(scratch);
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
        Ok(cache)
    }

    /// Prefill `prompt` in a new sequence of `cache` under hooks of this runner's policy whose
    /// budget is not known yet (`unknown`: the prototype its forks copy). Returns the sequence,
    /// the hooks, the prefill and its greedy first token; on failure the sequence is removed.
    fn prefill_one<'h>(
        &'h self,
        model: &mut Llama,
        cache: &mut PagedCache,
        prompt: &[u32],
        params: &GenParams,
        unknown: &'h BudgetFn<'h>,
    ) -> Result<(SeqId, CompressHooks<'h>, engine::Prefilled, u32)> {
        cache.add_sequence().and_then(|seq0| {
            let mut proto = self.hooks(model, unknown)?;
            match prefill_scored(model, cache, seq0, prompt, params, &mut proto)
                .and_then(|pre| Ok((Llama::argmax(&pre.logits)?, pre)))
            {
                Ok((first, pre)) => Ok((seq0, proto, pre, first)),
                Err(e) => {
                    let _ = cache.remove_sequence(seq0);
                    Err(e)
                }
            }
        })
    }

    /// Each prompt's [`PromptResults`]: its prefill's error (`prompt_err`), or one result per
    /// fork in budget order: the fork's own error, else its decode output (`outputs[i]`, fork
    /// `i`'s) as a [`Generation`] with its first-step logits and times, and the statistics of
    /// what its hooks kept.
    fn fork_results(
        &self,
        prompt_err: Vec<Option<candle_core::Error>>,
        first_logits: &[Vec<f32>],
        forks: Vec<Fork>,
        hooks: Vec<CompressHooks>,
        outputs: Vec<Option<Result<engine::BatchOutput>>>,
    ) -> Vec<PromptResults> {
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
                (None, Some(Ok(o))) => {
                    let prefill_times = engine::PrefillTimes {
                        question_ms: o.question_ms,
                        ..f.prefill_times
                    };
                    let first = o
                        .first_logits
                        .unwrap_or_else(|| first_logits[f.prompt].clone());
                    Ok((
                        Generation {
                            output_ids: o.output_ids,
                            finish_reason: o.finish_reason,
                            first_logits: Some(first),
                            prefill_ms: prefill_times.total(),
                            prefill_times,
                            decode_ms: o.decode_ms,
                            decode_times: o.decode_times,
                        },
                        self.stats(f.start.prompt_len, h.kept),
                    ))
                }
                (None, Some(Err(e))) => Err(e),
                (None, None) => Err(candle_core::Error::Msg("fork was not decoded".into())),
            };
            if let Ok(v) = &mut out[f.prompt] {
                v.push(r);
            }
        }
        out
    }
}

/// [`engine::prefill`] of `prompt` into `seq`, then the policy's extra forward passes over it
/// ([`CompressHooks::score_by_forwards`], KVzip's repeat passes), whose time counts as the
/// prefill's scoring (`observe_ms`).
fn prefill_scored(
    model: &mut Llama,
    cache: &mut PagedCache,
    seq: SeqId,
    prompt: &[u32],
    params: &GenParams,
    hooks: &mut CompressHooks,
) -> Result<engine::Prefilled> {
    let mut pre = engine::prefill(model, cache, seq, prompt, params, hooks)?;
    pre.times.observe_ms +=
        hooks.score_by_forwards(model, cache, seq, prompt, params.prefill_chunk)?;
    Ok(pre)
}

/// One fork of a prefilled sequence `seq0`: a copy of it, or `seq0` itself when `last`,
/// compressed by `h.after_prefill`. Returns the fork's sequence (or the error of the copy or
/// the compression) and the wall times (ms) of the copy and of the compression.
fn fork_and_compress(
    cache: &mut PagedCache,
    h: &mut CompressHooks,
    seq0: SeqId,
    last: bool,
) -> (Result<SeqId>, f64, f64) {
    let (forked, fork_ms) = if last {
        (Ok(seq0), 0.0)
    } else {
        let t = std::time::Instant::now();
        let r = cache.fork_sequence(seq0);
        (r, t.elapsed().as_secs_f64() * 1e3)
    };
    let t = std::time::Instant::now();
    let r = forked.and_then(|seq| h.after_prefill(cache, seq).map(|_| seq));
    (r, fork_ms, t.elapsed().as_secs_f64() * 1e3)
}

/// Decode every fork that has a sequence in one batch ([`engine::decode_batch`]), fork `i`
/// with `hooks[i]`. Per fork: its output, `None` for a fork without a sequence; a failed batch
/// is every decoded fork's error.
fn decode_forks(
    model: &mut Llama,
    cache: &mut PagedCache,
    forks: &[Fork],
    hooks: &mut [CompressHooks],
    params: &GenParams,
) -> Vec<Option<Result<engine::BatchOutput>>> {
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
            engine::decode_batch(model, cache, &seqs, &mut live_hooks, &starts, params)
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
    outputs
}

/// One (prompt, budget) of [`PagedRunner::run_batched`].
struct Fork<'a> {
    prompt: usize,
    /// Its sequence, or why it has none.
    seq: Option<SeqId>,
    err: Option<candle_core::Error>,
    start: engine::BatchStart<'a>,
    /// The prompt's prefill (shared forward and observe) plus this fork's copy and compression.
    prefill_times: engine::PrefillTimes,
}
