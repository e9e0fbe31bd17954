//! Continuous batching over one paged block pool, with KV-Compress compression after prefill and
//! on memory pressure: the scheduler of `kvc bench` (the paper's throughput benchmark).
//!
//! One loop iteration:
//! 1. **Admit** (unless paused): while the waiting queue's head fits, prefill it together with
//!    the requests behind it that have the same context length and fit too (up to
//!    `prefill_batch`, chunked; [`Llama::forward_prefill_batch`]), compress each to its budget right away (KV-Compress after prefill, through
//!    [`CompressHooks`]), take its first output token from the prefill logits, and add it to the
//!    decode batch. A request fits when the free blocks cover its whole prompt (held until the
//!    compression right after prefill) and, after that compression, still leave one block per
//!    (layer, kv-head) of growth headroom for every running sequence and for it.
//! 2. **Make room** for the next decode step (one new token per (layer, seq, kv-head), a new
//!    block wherever a head's last block is full): while the free blocks do not cover it,
//!    compress every running sequence that has grown past its budget back to it (KV-Compress's
//!    continual compression, on demand), else preempt the newest sequence back to the front of
//!    the queue (vLLM's recompute preemption: its blocks are freed, it keeps its output tokens
//!    and is prefilled again with them). Either pauses admissions for the next iteration.
//! 3. **Decode** every running sequence in one forward pass (batch B, one token each;
//!    [`Llama::forward_decode`]); decode attention is scored into the per-slot metric (the
//!    paper's running sum) unless `score_decode` is off; finished sequences free their blocks.
//!
//! Greedy decoding of exactly `output_len` tokens per request, stop ids ignored (as the paper's
//! benchmark, vLLM `ignore_eos`). At rate 1 (full cache) no hooks run, so the only way out of
//! memory pressure is preemption: that is the baseline's memory bound.
//!
//! [`Schedule::Paper`] is the reference implementation's policy (IsaacRe/vllm-kvcompress:
//! `benchmarks/benchmark_throughput.py`, `vllm/core/scheduler.py`, `vllm/kvcompress/scheduler.py`)
//! where it differs from the above ([`Schedule::Kvc`]):
//! - every rate compresses, 1 included: the budget is `max_cache_tokens` of the reference's
//!   benchmark ([`max_cache_tokens`]; `L - 16` per head at 1x, the paper's 1.38x at 1x);
//! - after an iteration that admitted new sequences, every running sequence over its budget is
//!   compressed (the reference forces a compression round after each prefill), not only the new
//!   ones;
//! - when a decode step does not fit, admissions stop until a sequence finishes or is
//!   preempted (the reference's `lock_prefill`), not for one iteration.
//!
//! Departures from the paper's vLLM scheduler: prefills are batched only across requests of
//! equal context length (vLLM packs any prompts up to a token budget); the admission headroom is one block per
//! (layer, kv-head) and running sequence instead of vLLM's 1 % watermark (KV-Compress blocks are
//! per head, so a step can need up to `layers x kv_heads` new blocks per sequence); compression
//! planning runs on the host ([`crate::kvcache::paged`]). A preempted sequence's budget is
//! computed again from its recomputed context (prompt + output so far).
use candle_core::{Result, Tensor};
use std::collections::VecDeque;
use std::time::Instant;

use crate::compress::policy::{BudgetFn, CompressHooks, Policy};
use crate::compress::ranks::RankExchange;
use crate::engine::{self, prefill_chunks, Hooks};
use crate::kvcache::budget::{allowed_blocks, max_cache_tokens, tokens_for_rate};
use crate::kvcache::paged::{PagedCache, PagedSpec};
use crate::kvcache::{CacheBackend, Probe, SeqId};
use crate::model::Llama;

/// When sequences are compressed and admissions held (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// kvc's: rate 1 is the vanilla cache; new sequences are compressed right after their
    /// prefill, the others on memory pressure; admissions pause for one iteration after it.
    #[default]
    Kvc,
    /// The KV-Compress reference's: compression at every rate (budget `L - 16` at 1x), every
    /// sequence over budget compressed after each admission, admissions held under memory
    /// pressure until a sequence finishes or is preempted.
    Paper,
}

impl Schedule {
    /// Per-head token budget of a `len`-token context at `rate` (`None`: the full cache).
    pub fn budget(self, len: usize, rate: f64, block_size: usize, floor: usize) -> Option<usize> {
        match self {
            Schedule::Kvc => tokens_for_rate(len, rate, block_size, floor),
            Schedule::Paper => Some(max_cache_tokens(len, rate, block_size, floor)),
        }
    }
}

/// Settings of one scheduler run.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Compression rate; `<= 1` is the full cache (no eviction, no hooks) under
    /// [`Schedule::Kvc`], a budget of `L - 16` under [`Schedule::Paper`].
    pub rate: f64,
    /// When to compress and hold admissions.
    pub schedule: Schedule,
    /// Tokens generated per request (stop ids ignored).
    pub output_len: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Floor of cache tokens per head for rate budgets (KV-Compress: 128).
    pub min_cache_tokens: usize,
    /// Prefill chunk length (tokens per sequence per forward pass).
    pub prefill_chunk: usize,
    /// Most waiting requests of one context length prefilled together (1 = one at a time).
    pub prefill_batch: usize,
    /// Most sequences decoded at once (vLLM's `max_num_seqs`, default 256).
    pub max_batch: usize,
    /// Score decode attention into the eviction metric (the paper's running metric).
    pub score_decode: bool,
    /// KV-Compress keeps each sequence's metric on the device after prefill (the decode kernel
    /// adds the decode metric) and evicts with the device evictor, as `kvc eval` does on a GPU
    /// (only with `score_decode`). On by default on CUDA; on the CPU it runs the evictor's twin
    /// (tests). Off: probabilities go to the host every step and compression is planned there.
    pub compress_on_device: bool,
    /// Check the pool's invariants after every step (tests).
    pub check_invariants: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SchedStats {
    /// Wall time from the first admission to the last finished request.
    pub elapsed_s: f64,
    /// Requests finished.
    pub requests: usize,
    /// Prompt tokens of the requests (each counted once, also when recomputed).
    pub prompt_tokens: u64,
    /// Output tokens generated.
    pub output_tokens: u64,
    /// Largest decode batch.
    pub max_batch: usize,
    /// Mean decode batch over decode steps.
    pub mean_batch: f64,
    /// Decode forward passes.
    pub decode_steps: usize,
    /// Most blocks in use at once (sampled after every forward pass, before compression).
    pub peak_blocks: usize,
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Time in compression steps (metric flush, planning, moves), prefill and on demand.
    pub compress_ms: f64,
    /// Time in prefill forward passes.
    pub prefill_ms: f64,
    /// Prefill groups (requests prefilled together count once).
    pub prefill_batches: usize,
    /// Time in decode forward passes (incl. reading back the next tokens).
    pub decode_ms: f64,
    /// On-demand compression rounds (each compresses every sequence over its budget).
    pub compress_rounds: usize,
    /// Sequences compressed on demand, summed over rounds.
    pub compressed_seqs: usize,
    /// KV slots evicted (prefill and on demand).
    pub evicted_slots: u64,
    /// Sequences preempted (freed and queued for recomputation).
    pub preemptions: usize,
    /// Peak used device memory (CUDA: total - free from the driver, sampled after each
    /// decode step); `None` on the CPU.
    pub peak_device_bytes: Option<u64>,
}

/// Result of a run: the statistics and every request's output ids (in request order).
#[derive(Debug, Clone)]
pub struct SchedOutput {
    pub stats: SchedStats,
    pub outputs: Vec<Vec<u32>>,
}

struct Req {
    idx: usize,
    output: Vec<u32>,
}

struct Running<'h> {
    req: Req,
    seq: SeqId,
    hooks: Option<CompressHooks<'h>>,
    /// Last generated token (the next decode input).
    next: u32,
    /// Blocks the sequence may hold after compression (`None`: full cache).
    allowed: Option<usize>,
}

/// Blocks `seq` needs to append one token to every (layer, kv-head).
fn step_need(cache: &PagedCache, seq: SeqId) -> usize {
    let s = cache.spec();
    let mut n = 0;
    for l in 0..s.layers {
        for h in 0..s.kv_heads {
            if cache.kv_len(l, seq, h) % s.block_size == 0 {
                n += 1;
            }
        }
    }
    n
}

/// The smallest pool (in blocks) that can serve one request of `input_len + output_len`
/// tokens at `rate` with `layers x kv_heads` heads (see the module docs): the whole prompt
/// during prefill; at rate 1 the whole final sequence; with compression its budget plus one
/// step of growth; plus one block per head of admission headroom.
pub fn min_blocks(
    spec: &PagedSpec,
    input_len: usize,
    output_len: usize,
    rate: f64,
    min_cache_tokens: usize,
    min_budget: usize,
) -> usize {
    let heads = spec.layers * spec.kv_heads;
    match tokens_for_rate(input_len, rate, spec.block_size, min_cache_tokens) {
        None => spec.blocks_for_tokens(input_len + output_len) + heads,
        Some(m) => {
            let m = m.max(min_budget);
            let steady = allowed_blocks(m, spec.layers, spec.kv_heads, spec.block_size) + heads;
            let grown = spec.blocks_for_tokens(input_len + output_len) + heads;
            (spec.blocks_for_tokens(input_len) + heads).max(steady.min(grown))
        }
    }
}

/// Run every prompt to `cfg.output_len` tokens through one pool (see the module docs).
/// `policy` compresses when `cfg.rate > 1`; `on_finish(done)` is called as requests finish.
/// Each iteration runs the module docs' three phases: [`Sched::admit`], [`Sched::make_room`],
/// [`Sched::decode_step`].
pub fn run(
    model: &mut Llama,
    policy: Option<&dyn Policy>,
    prompts: &[Vec<u32>],
    cfg: &SchedConfig,
    on_finish: &mut dyn FnMut(usize),
) -> Result<SchedOutput> {
    if cfg.output_len == 0 {
        candle_core::bail!("output length must be at least 1");
    }
    if prompts.iter().any(|p| p.is_empty()) {
        candle_core::bail!("empty prompt");
    }
    let (bs, floor, rate, schedule) =
        (cfg.block_size, cfg.min_cache_tokens, cfg.rate, cfg.schedule);
    let budget_of = move |len: usize| schedule.budget(len, rate, bs, floor);
    let mut s = Sched::new(model, policy, prompts, cfg, &budget_of)?;
    let t0 = Instant::now();
    while !s.waiting.is_empty() || !s.running.is_empty() {
        let admitted = s.admit(on_finish)?;
        if schedule == Schedule::Kvc {
            s.paused = false;
        } else if admitted {
            s.compress_over_budget()?;
        }
        if s.running.is_empty() {
            continue;
        }
        s.make_room()?;
        s.decode_step(on_finish)?;
    }
    Ok(s.into_output(t0))
}

/// The state one [`run`] carries between its phases: the pool, the queues and the counters.
struct Sched<'a, 'h> {
    model: &'a mut Llama,
    policy: Option<&'h dyn Policy>,
    prompts: &'a [Vec<u32>],
    cfg: &'a SchedConfig,
    /// Per-head token budget of a context length (`None`: full cache), shared by every hook.
    budget_of: &'h BudgetFn<'h>,
    spec: PagedSpec,
    /// `layers x kv_heads`: blocks of headroom one sequence needs for a decode step.
    heads: usize,
    cache: PagedCache,
    /// `rate > 1` with a policy: requests run with [`CompressHooks`].
    compressing: bool,
    /// The policy's smallest budget (0 without one).
    min_budget: usize,
    st: SchedStats,
    /// Every request's output once it finished, in request order.
    outputs: Vec<Option<Vec<u32>>>,
    waiting: VecDeque<Req>,
    running: Vec<Running<'h>>,
    /// Admissions are held after the pool ran short (set by [`Sched::make_room`]): for one
    /// iteration ([`Schedule::Kvc`]), or until a sequence finishes or is preempted
    /// ([`Schedule::Paper`]).
    paused: bool,
    /// Decode batch sizes summed over decode steps (for the mean).
    batch_sum: usize,
    on_cuda: bool,
    /// A tensor-parallel rank's group (`None`: the whole model here): each rank's pool holds
    /// its kv-heads, and every decision that reads the pool is agreed (docs/design.md,
    /// "Tensor parallel").
    ranks: Option<RankExchange>,
}

/// What a group's prefill left for [`Sched::start_group`]: one entry per request of the group.
struct Prefilled<'h> {
    seqs: Vec<SeqId>,
    hooks: Vec<Option<CompressHooks<'h>>>,
    /// First output token of each request (argmax of its last prefill logits).
    next: Vec<u32>,
}

impl<'a, 'h> Sched<'a, 'h> {
    /// An empty pool of `cfg.num_blocks` blocks shaped for `model`, every prompt waiting in
    /// request order.
    fn new(
        model: &'a mut Llama,
        policy: Option<&'h dyn Policy>,
        prompts: &'a [Vec<u32>],
        cfg: &'a SchedConfig,
        budget_of: &'h BudgetFn<'h>,
    ) -> Result<Self> {
        let spec = engine::paged_spec(model, cfg.block_size);
        let heads = spec.layers * spec.kv_heads;
        let mut cache = PagedCache::new(spec.clone(), cfg.num_blocks)?;
        cache.set_device_compression(cfg.compress_on_device);
        let on_cuda = model.device.is_cuda();
        let ranks = RankExchange::of(model);
        Ok(Sched {
            model,
            policy,
            prompts,
            cfg,
            budget_of,
            spec,
            heads,
            cache,
            compressing: policy.is_some() && (cfg.rate > 1.0 || cfg.schedule == Schedule::Paper),
            min_budget: policy.map_or(0, |p| p.min_budget()),
            st: SchedStats {
                total_blocks: cfg.num_blocks,
                ..Default::default()
            },
            outputs: vec![None; prompts.len()],
            waiting: (0..prompts.len())
                .map(|idx| Req {
                    idx,
                    output: Vec::new(),
                })
                .collect(),
            running: Vec::new(),
            paused: false,
            batch_sum: 0,
            on_cuda,
            ranks,
        })
    }

    /// The smallest of every rank's `n` (`n` alone without tensor parallelism).
    fn agreed_min(&self, n: usize) -> Result<usize> {
        self.ranks.as_ref().map_or(Ok(n), |x| x.min(n))
    }

    /// Whether `ok` holds on every rank.
    fn all_ranks(&self, ok: bool) -> Result<bool> {
        match &self.ranks {
            Some(x) => Ok(x.sum(usize::from(!ok))? == 0),
            None => Ok(ok),
        }
    }

    /// Blocks each running sequence holds over all ranks, and the number of ranks.
    fn held_blocks(&self) -> Result<(Vec<usize>, usize)> {
        let mine: Vec<usize> = self
            .running
            .iter()
            .map(|r| self.cache.pool().seq_blocks(r.seq).unwrap_or(0))
            .collect();
        match &self.ranks {
            Some(x) => Ok((x.sum_each(&mine)?, x.shard().world)),
            None => Ok((mine, 1)),
        }
    }

    /// Tokens of `r`'s context: its prompt plus the output it has so far.
    fn ctx_len(&self, r: &Req) -> usize {
        self.prompts[r.idx].len() + r.output.len()
    }

    /// Blocks a sequence of context `len` may keep after compression (`None`: full cache).
    fn budget_blocks(&self, len: usize) -> Option<usize> {
        let s = &self.spec;
        (self.budget_of)(len)
            .map(|m| allowed_blocks(m.max(self.min_budget), s.layers, s.kv_heads, s.block_size))
    }

    /// The pool's invariants hold (only when `cfg.check_invariants`).
    fn check_pool(&self) -> Result<()> {
        if self.cfg.check_invariants {
            self.cache.pool().check().map_err(candle_core::Error::Msg)?;
        }
        Ok(())
    }

    /// `req` is done: frees `seq`, counts the request and stores its output, then tells
    /// `on_finish` how many requests are done.
    fn finish(&mut self, req: Req, seq: SeqId, on_finish: &mut dyn FnMut(usize)) -> Result<()> {
        self.cache.remove_sequence(seq)?;
        self.st.requests += 1;
        self.st.prompt_tokens += self.prompts[req.idx].len() as u64;
        self.st.output_tokens += req.output.len() as u64;
        self.outputs[req.idx] = Some(req.output);
        on_finish(self.st.requests);
        self.release_hold();
        Ok(())
    }

    /// A sequence finished or was preempted: [`Schedule::Paper`] admits again.
    fn release_hold(&mut self) {
        if self.cfg.schedule == Schedule::Paper {
            self.paused = false;
        }
    }

    /// Phase 1, admissions (skipped while paused): groups of waiting requests with one context
    /// length are prefilled together, compressed, and join the decode batch, until the queue's
    /// head does not fit or the batch is full. Returns whether any request was admitted.
    fn admit(&mut self, on_finish: &mut dyn FnMut(usize)) -> Result<bool> {
        let mut admitted = false;
        while !self.paused && self.running.len() < self.cfg.max_batch.max(1) {
            let Some((k, len)) = self.next_group()? else {
                break;
            };
            let group: Vec<Req> = self.waiting.drain(..k).collect();
            let pre = self.prefill_group(&group, len)?;
            self.start_group(group, pre, on_finish)?;
            self.check_pool()?;
            admitted = true;
        }
        Ok(admitted)
    }

    /// Compresses every running sequence that holds more blocks than its budget allows back to
    /// it (one round: metrics flushed, evictions planned and executed per sequence); returns
    /// whether any was compressed.
    fn compress_over_budget(&mut self) -> Result<bool> {
        // Over budget over all ranks' heads: a rank's allowance is its share of the whole's.
        let (held, world) = self.held_blocks()?;
        let over: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let r = &self.running[i];
                r.hooks.is_some() && r.allowed.is_some_and(|a| held[i] > a * world)
            })
            .collect();
        if over.is_empty() {
            return Ok(false);
        }
        let tc = Instant::now();
        // Sequences whose metric lives on the device (KV-Compress on a GPU) are evicted in one
        // batch on the device; the others are planned on the host one by one.
        let (mut device, mut host) = (Vec::new(), Vec::new());
        for &i in &over {
            let r = &self.running[i];
            let h = r.hooks.as_ref().expect("filtered");
            match h.device_request(&self.cache, r.seq)? {
                Some(req) => device.push((i, req)),
                None => host.push(i),
            }
        }
        if !device.is_empty() {
            let reqs: Vec<_> = device.iter().map(|&(_, r)| r).collect();
            let stats = self.cache.evict_on_device(&reqs)?;
            for ((i, _), st) in device.into_iter().zip(stats) {
                let h = self.running[i].hooks.as_mut().expect("filtered");
                h.device_evicted(st);
                self.st.evicted_slots += st.evicted as u64;
            }
        }
        for i in host {
            let r = &mut self.running[i];
            let h = r.hooks.as_mut().expect("filtered");
            self.st.evicted_slots += h.compress_now(&mut self.cache, r.seq)? as u64;
        }
        self.st.compressed_seqs += over.len();
        self.st.compress_ms += tc.elapsed().as_secs_f64() * 1e3;
        self.st.compress_rounds += 1;
        self.check_pool()?;
        Ok(true)
    }

    /// How many requests at the queue's head to admit now, and their context length: those
    /// with the head's length that fit together (full prompts during prefill, then their
    /// budgets plus headroom for every running sequence), at most `prefill_batch` and the room
    /// left in the batch. `None`: admit nothing this iteration. With nothing running the head
    /// is admitted alone even without headroom; an error if the pool cannot even prefill it.
    fn next_group(&self) -> Result<Option<(usize, usize)>> {
        let Some(head) = self.waiting.front() else {
            return Ok(None);
        };
        let cfg = self.cfg;
        let len = self.ctx_len(head);
        let full = self.spec.blocks_for_tokens(len);
        let after = if self.compressing {
            self.budget_blocks(len).unwrap_or(full).min(full)
        } else {
            full
        };
        let free = self.cache.pool().free_blocks();
        let running = self.running.len();
        // The whole group holds its full prompts until the compression after prefill.
        let fits = |n: usize| free >= n * full && free - n * after >= (running + n) * self.heads;
        let mut k = 0;
        while k < cfg.prefill_batch.max(1)
            && running + k < cfg.max_batch.max(1)
            && k < self.waiting.len()
            && self.ctx_len(&self.waiting[k]) == len
            && fits(k + 1)
        {
            k += 1;
        }
        let mut k = self.agreed_min(k)?;
        if k == 0 {
            if running == 0 && free < full {
                candle_core::bail!(
                    "a {len}-token sequence needs {full} blocks to prefill but the pool has {free} free of {}",
                    cfg.num_blocks
                );
            }
            if running != 0 {
                return Ok(None);
            }
            k = 1; // alone, without headroom: the decode step will compress or fail clearly
        }
        Ok(Some((k, len)))
    }

    /// Prefills `group` (contexts of `len` tokens each) as one batch in chunks, each request
    /// in a new sequence with its own hooks observing the last chunk; counts prefill time and
    /// the pool's peak. Compression is left to [`Sched::start_group`].
    fn prefill_group(&mut self, group: &[Req], len: usize) -> Result<Prefilled<'h>> {
        let k = group.len();
        let ctxs: Vec<Vec<u32>> = group
            .iter()
            .map(|r| {
                self.prompts[r.idx]
                    .iter()
                    .chain(r.output.iter())
                    .copied()
                    .collect()
            })
            .collect();
        let mut seqs = Vec::with_capacity(k);
        let mut hooks = Vec::with_capacity(k);
        for _ in 0..k {
            seqs.push(self.cache.add_sequence()?);
            hooks.push(self.compressing.then(|| {
                CompressHooks::new(
                    self.policy.expect("compressing"),
                    self.spec.layers,
                    self.budget_of,
                )
                .on_demand(self.cfg.score_decode)
                .with_ranks(self.ranks.clone())
            }));
        }
        let probe = hooks[0].as_ref().map_or(Probe::None, |h| h.prefill_probe());
        let min_last = match probe {
            Probe::LastQueries(w) => w,
            _ => 1,
        };
        let tp = Instant::now();
        let mut logits = None;
        let chunks = prefill_chunks(len, self.cfg.prefill_chunk, min_last);
        for (i, r) in chunks.iter().enumerate() {
            let p = engine::chunk_probe(probe, i + 1 == chunks.len());
            let rows: Vec<&[u32]> = ctxs.iter().map(|c| &c[r.clone()]).collect();
            let mut observe = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
                for (row, (h, &seq)) in hooks.iter_mut().zip(&seqs).enumerate() {
                    if let Some(h) = h {
                        h.observe(layer, &probs.narrow(0, row, 1)?, c, seq)?;
                    }
                }
                Ok(())
            };
            logits = Some(self.model.forward_prefill_batch(
                &rows,
                &seqs,
                &mut self.cache,
                p,
                &mut observe,
            )?);
        }
        let next = Llama::argmax_rows(&logits.expect("non-empty prompt"))?;
        self.st.prefill_ms += tp.elapsed().as_secs_f64() * 1e3;
        self.st.prefill_batches += 1;
        self.st.peak_blocks = self.st.peak_blocks.max(self.cache.pool().used_blocks());
        Ok(Prefilled { seqs, hooks, next })
    }

    /// After a group's prefill: compresses each request to its budget (KV-Compress after
    /// prefill), appends its first token, and finishes it if that was its last token or adds
    /// it to the decode batch otherwise.
    fn start_group(
        &mut self,
        group: Vec<Req>,
        pre: Prefilled<'h>,
        on_finish: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let s = &self.spec;
        let (layers, kv_heads, bs) = (s.layers, s.kv_heads, s.block_size);
        for (((mut req, seq), mut hooks), next) in
            group.into_iter().zip(pre.seqs).zip(pre.hooks).zip(pre.next)
        {
            let mut allowed = None;
            if let Some(h) = &mut hooks {
                let tc = Instant::now();
                let before = h.kept.evicted;
                h.after_prefill(&mut self.cache, seq)?;
                self.st.evicted_slots += (h.kept.evicted - before) as u64;
                self.st.compress_ms += tc.elapsed().as_secs_f64() * 1e3;
                allowed = h.budget().map(|m| allowed_blocks(m, layers, kv_heads, bs));
            }
            req.output.push(next);
            if req.output.len() >= self.cfg.output_len {
                self.finish(req, seq, on_finish)?;
            } else {
                self.running.push(Running {
                    req,
                    seq,
                    hooks,
                    next,
                    allowed,
                });
            }
        }
        Ok(())
    }

    /// Phase 2, room for one decode step: while the free blocks do not cover the step, pauses
    /// admissions and compresses every sequence over its budget (at most once per step: a
    /// second round could not free more), else preempts the newest sequence back to the front
    /// of the queue. An error when a lone sequence still does not fit.
    fn make_room(&mut self) -> Result<()> {
        let mut compressed = false;
        loop {
            let need: usize = self
                .running
                .iter()
                .map(|r| step_need(&self.cache, r.seq))
                .sum();
            if self.all_ranks(need <= self.cache.pool().free_blocks())? {
                return Ok(());
            }
            self.paused = true;
            if !compressed {
                compressed = true;
                if self.compress_over_budget()? {
                    continue;
                }
            }
            if self.running.len() > 1 {
                let r = self.running.pop().expect("len > 1");
                self.cache.remove_sequence(r.seq)?;
                self.waiting.push_front(r.req);
                self.st.preemptions += 1;
                self.release_hold();
                continue;
            }
            candle_core::bail!(
                "the KV pool ({} blocks) cannot hold one sequence: a decode step needs {need} blocks, {} are free",
                self.cfg.num_blocks,
                self.cache.pool().free_blocks()
            );
        }
    }

    /// Phase 3, one decode step over the whole batch: one forward pass (decode attention
    /// observed by each sequence's hooks), the step's statistics, then each sequence takes its
    /// token, runs its after-step hook, and finishes when it has `output_len` tokens.
    fn decode_step(&mut self, on_finish: &mut dyn FnMut(usize)) -> Result<()> {
        let next = self.decode_forward()?;
        let mut keep = Vec::with_capacity(self.running.len());
        let running = std::mem::take(&mut self.running);
        for (mut r, tok) in running.into_iter().zip(next) {
            if let Some(h) = &mut r.hooks {
                h.after_step(&mut self.cache, r.seq)?;
            }
            r.req.output.push(tok);
            r.next = tok;
            if r.req.output.len() >= self.cfg.output_len {
                self.finish(r.req, r.seq, on_finish)?;
            } else {
                keep.push(r);
            }
        }
        self.running = keep;
        self.check_pool()
    }

    /// The forward pass of [`Sched::decode_step`]: each running sequence's next token in
    /// batch order; counts decode time, batch size and the pool's (and device's) peak.
    fn decode_forward(&mut self) -> Result<Vec<u32>> {
        let td = Instant::now();
        let tokens: Vec<u32> = self.running.iter().map(|r| r.next).collect();
        let seqs: Vec<SeqId> = self.running.iter().map(|r| r.seq).collect();
        let probe = self
            .running
            .iter()
            .find_map(|r| r.hooks.as_ref().map(|h| h.decode_probe()))
            .unwrap_or(Probe::None);
        let logits = {
            let running = &mut self.running;
            let mut score = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
                let probs = crate::kvcache::decode_probs_on_host(probs)?;
                for (i, r) in running.iter_mut().enumerate() {
                    if let Some(h) = &mut r.hooks {
                        h.observe(layer, &probs.narrow(0, i, 1)?, c, r.seq)?;
                    }
                }
                Ok(())
            };
            let mut times = engine::DecodeTimes::default();
            engine::forward_then_observe(
                self.model,
                &mut self.cache,
                &tokens,
                &seqs,
                probe,
                &mut times,
                &mut score,
            )?
        };
        let next = Llama::argmax_rows(&logits)?;
        let st = &mut self.st;
        st.decode_ms += td.elapsed().as_secs_f64() * 1e3;
        st.decode_steps += 1;
        self.batch_sum += self.running.len();
        st.max_batch = st.max_batch.max(self.running.len());
        st.peak_blocks = st.peak_blocks.max(self.cache.pool().used_blocks());
        if self.on_cuda {
            if let Some((free, total)) = crate::cuda::device_memory(&self.model.device)? {
                let used = total - free;
                st.peak_device_bytes = Some(st.peak_device_bytes.unwrap_or(0).max(used));
            }
        }
        Ok(next)
    }

    /// The run's result: wall time since `t0`, the mean decode batch, outputs in request order.
    fn into_output(mut self, t0: Instant) -> SchedOutput {
        self.st.elapsed_s = t0.elapsed().as_secs_f64();
        self.st.mean_batch = if self.st.decode_steps == 0 {
            0.0
        } else {
            self.batch_sum as f64 / self.st.decode_steps as f64
        };
        SchedOutput {
            stats: self.st,
            outputs: self
                .outputs
                .into_iter()
                .map(|o| o.expect("every request finishes"))
                .collect(),
        }
    }
}
