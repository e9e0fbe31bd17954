//! Generation loop for one sequence: chunked prefill -> (hook: compress) -> greedy decode with
//! a stop set, a minimum length and a context limit. [`prefill`] and [`decode`] are the two
//! halves, so one prefill can be continued under several budgets (see `compress::Runner`).
//!
//! Hooks ([`Hooks`]) are where compression plugs in without touching this loop: they choose
//! which queries to probe, receive the attention probabilities of those queries per layer, and
//! run after prefill and after each decode step with the cache in hand.
use candle_core::{Result, Tensor};
use std::collections::BTreeSet;
use std::time::Instant;

use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::paged::PagedSpec;
use crate::kvcache::{CacheBackend, DeviceEvict, EvictStats, Probe, SeqId};
use crate::model::Llama;

/// The read-only half of a decode step's compression (snapshot the sequence, plan its
/// evictions), handed out by [`Hooks::step_plan`] so a batch can plan on several threads.
pub type StepPlanner<'a> = Box<dyn FnOnce(&dyn CacheBackend) -> Result<EvictionPlan> + Send + 'a>;

/// The cache a full-cache generation (`kvc generate`, `kvc bench-model`) runs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullCache {
    /// [`crate::kvcache::contiguous::ContiguousCache`]: the oracle, one growing tensor per
    /// layer (flash prefill on a GPU; decode with candle ops).
    Contiguous,
    /// [`crate::kvcache::paged::PagedCache`] with nothing evicted: the prefill and decode
    /// kernels `kvc eval` and `kvc bench` run.
    Paged,
}

/// The paged cache shape of `model` (its layers, kv-heads, head dim, dtype and device) with
/// `block_size` tokens per block; a tensor-parallel rank's: its own kv-heads.
pub fn paged_spec(model: &Llama, block_size: usize) -> PagedSpec {
    let cfg = &model.rank_config();
    PagedSpec {
        layers: cfg.num_hidden_layers,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        block_size,
        dtype: model.dtype,
        device: model.device.clone(),
    }
}

/// An empty cache of kind `kind` for `model`, holding at least `tokens` tokens of one sequence
/// (a paged cache is allocated whole up front; a contiguous one grows).
pub fn full_cache(model: &Llama, kind: FullCache, tokens: usize) -> Result<Box<dyn CacheBackend>> {
    use crate::kvcache::{contiguous::ContiguousCache, paged};
    Ok(match kind {
        FullCache::Contiguous => Box::new(ContiguousCache::new(model.cfg.num_hidden_layers)),
        FullCache::Paged => {
            let spec = paged_spec(model, paged::DEFAULT_BLOCK_SIZE);
            let blocks = spec.blocks_for_tokens(tokens);
            Box::new(paged::PagedCache::new(spec, blocks)?)
        }
    })
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop id was generated (it is the last output id).
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The model's context is full.
    Context,
}

/// Decoding parameters (greedy).
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// Ids that end generation.
    pub stop_ids: BTreeSet<u32>,
    /// Stop ids are ignored until this many tokens were generated (LongBench samsum: 1).
    pub min_new_tokens: usize,
    /// Prefill chunk length (bounds attention memory: chunk x context scores per head).
    pub prefill_chunk: usize,
    /// Longest context of the model (prompt + output).
    pub max_context: usize,
}

impl GenParams {
    /// Whether generation ends after token `tok`, the `generated`-th, with the context now
    /// holding `pos` tokens (stop ids count only from `min_new_tokens` on).
    pub fn finish(&self, tok: u32, generated: usize, pos: usize) -> Option<FinishReason> {
        if self.stop_ids.contains(&tok) && generated >= self.min_new_tokens.max(1) {
            Some(FinishReason::Stop)
        } else if generated >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else if pos >= self.max_context {
            Some(FinishReason::Context)
        } else {
            None
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub output_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Logits after the prompt `[vocab]` (first decoding step).
    #[serde(skip)]
    pub first_logits: Option<Vec<f32>>,
    pub prefill_ms: f64,
    /// Where `prefill_ms` went (host view).
    pub prefill_times: PrefillTimes,
    pub decode_ms: f64,
    /// Where `decode_ms` went (host view).
    pub decode_times: DecodeTimes,
}

/// Where a prefill's wall time went (milliseconds, host view). Runs sharing one prefill
/// (`kvc eval`'s rates of a method) each report the shared `forward_ms` and `observe_ms` and
/// their own `fork_ms` and `compress_ms`, so a sample's wall time is the shared part once plus
/// every run's own part.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefillTimes {
    /// The chunks' forward passes without the observe callbacks, up to the device finishing
    /// them.
    pub forward_ms: f64,
    /// Scoring the probed queries of the last chunk: their probabilities to the host (which
    /// waits for the layer's queued kernels) and the hooks' scoring.
    pub observe_ms: f64,
    /// Copying the prefilled sequence for this run (0 for the run that keeps the original).
    pub fork_ms: f64,
    /// The compression after prefill ([`Hooks::after_prefill`]).
    pub compress_ms: f64,
    /// Reading the question into the compressed cache (the question-agnostic protocol: a
    /// prefill of it, or one decode-path step per token for hooks that work at decode steps,
    /// their continual compression included; 0 when the question was prefilled with the
    /// context).
    #[serde(default)]
    pub question_ms: f64,
}

impl PrefillTimes {
    /// The whole prefill wall time (what rows report as `prefill_ms`).
    pub fn total(&self) -> f64 {
        self.forward_ms + self.observe_ms + self.fork_ms + self.compress_ms + self.question_ms
    }
}

/// Where a decode's wall time went, seen from the host, summed over its steps (a batch's
/// totals up to the sequence's last token for [`decode_batch`]). On the GPU [`decode_batch`]
/// waits for the forward's kernels before scoring and compressing (`sync_ms`), so the other
/// parts are the host's own work plus their own device work; single-sequence [`decode`] does
/// not wait (`sync_ms` 0), its device time lands where results are read back.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecodeTimes {
    /// Decode steps (forward passes).
    pub steps: usize,
    /// The forward pass without the observe callbacks: kernel launches (CPU: the compute).
    pub forward_ms: f64,
    /// Waiting for the device to finish the forward's kernels (GPU only; 0 on the CPU): with
    /// `forward_ms`, says whether a step is bound by launching or by the device.
    #[serde(default)]
    pub sync_ms: f64,
    /// Scoring the probed attention: probabilities to the host, then every sequence's hook.
    pub observe_ms: f64,
    /// Continual compression after each step: plans, evictions, K/V moves.
    pub compress_ms: f64,
    /// Logits to the host and the argmax.
    pub sample_ms: f64,
}

impl std::ops::Sub for DecodeTimes {
    type Output = DecodeTimes;
    /// The steps and times between two snapshots of one running total.
    fn sub(self, o: DecodeTimes) -> DecodeTimes {
        DecodeTimes {
            steps: self.steps - o.steps,
            forward_ms: self.forward_ms - o.forward_ms,
            sync_ms: self.sync_ms - o.sync_ms,
            observe_ms: self.observe_ms - o.observe_ms,
            compress_ms: self.compress_ms - o.compress_ms,
            sample_ms: self.sample_ms - o.sample_ms,
        }
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Extension points for compression methods (`Send`: a decode batch scores and plans its
/// sequences on several threads).
pub trait Hooks: Send {
    /// Queries to probe during prefill (e.g. the observation window).
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    /// Queries to probe during decode steps.
    fn decode_probe(&self) -> Probe {
        Probe::None
    }
    /// Whether [`Hooks::observe`]'s prefill observations add up over query blocks (a summed
    /// metric without pooling): then a probed window longer than a prefill chunk is observed
    /// chunk by chunk, each chunk's rows of the window with the keys they see, instead of
    /// enlarging the last chunk to the whole window (whose probabilities would be
    /// `heads x window x keys`).
    fn prefill_probe_splits(&self) -> bool {
        false
    }
    /// Attention probabilities of probed queries, per layer (`[1, n_heads, n_probed, kv_len]`
    /// f32); with [`Probe::Queries`], the layer's pre-RoPE queries of the chunk instead
    /// (`[1, n_heads, t, head_dim]`, every prefill chunk in order from position 0).
    fn observe(
        &mut self,
        _layer: usize,
        _probs: &Tensor,
        _cache: &dyn CacheBackend,
        _seq: SeqId,
    ) -> Result<()> {
        Ok(())
    }
    /// After the whole prompt is cached.
    fn after_prefill(&mut self, _cache: &mut dyn CacheBackend, _seq: SeqId) -> Result<()> {
        Ok(())
    }
    /// After each decode step's token is cached.
    fn after_step(&mut self, _cache: &mut dyn CacheBackend, _seq: SeqId) -> Result<()> {
        Ok(())
    }
    /// [`Hooks::after_step`] in halves, for [`decode_batch`]: write what the step observed
    /// into the cache and return the planning work, which only reads the cache (`None`:
    /// nothing to plan), so the plans of all sequences of a batch can run on several threads;
    /// [`Hooks::apply_step_plan`] then executes each. The default runs `after_step` whole.
    fn step_plan(
        &mut self,
        cache: &mut dyn CacheBackend,
        seq: SeqId,
    ) -> Result<Option<StepWork<'_>>> {
        self.after_step(cache, seq)?;
        Ok(None)
    }
    /// Execute a plan made by the planner of [`Hooks::step_plan`].
    fn apply_step_plan(
        &mut self,
        _cache: &mut dyn CacheBackend,
        _seq: SeqId,
        _plan: EvictionPlan,
    ) -> Result<()> {
        Ok(())
    }
    /// What the device eviction asked for by [`StepWork::Device`] did.
    fn device_evicted(&mut self, _stats: EvictStats) {}
    /// Whether a question read after the compression (the question-agnostic protocol) must
    /// enter the cache one decode step per token, because these hooks observe or compress at
    /// decode steps; otherwise it is prefilled in chunks ([`read_question`]), which caches the
    /// same keys and values in one forward per chunk.
    fn steps_question(&self) -> bool {
        false
    }
}

/// The compression work of one sequence after a decode step ([`Hooks::step_plan`]).
pub enum StepWork<'a> {
    /// A plan to make on the host (it only reads the cache, so the plans of a batch run on
    /// several threads), then executed by [`Hooks::apply_step_plan`].
    Plan(StepPlanner<'a>),
    /// A plan made on the calling thread in the batch's sequence order (a tensor-parallel
    /// rank's plan meets the other ranks in collectives), then executed like [`StepWork::Plan`].
    Ordered(StepPlanner<'a>),
    /// KV-Compress's eviction from the device metric: the requests of a batch run together in
    /// one [`CacheBackend::evict_on_device`], then [`Hooks::device_evicted`].
    Device(DeviceEvict),
}

/// No compression.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Split `n` prompt tokens into chunks of at most `chunk`, the last one holding at least
/// `min_last` tokens (so an observation window lies in one chunk).
pub fn prefill_chunks(n: usize, chunk: usize, min_last: usize) -> Vec<std::ops::Range<usize>> {
    let chunk = chunk.max(1);
    if n == 0 {
        return vec![];
    }
    let mut last = (n - 1) % chunk + 1;
    if last < min_last {
        last = min_last.min(n);
    }
    let mut out = Vec::new();
    let mut s = 0;
    while s < n - last {
        let e = (s + chunk).min(n - last);
        out.push(s..e);
        s = e;
    }
    out.push(n - last..n);
    out
}

/// The probe of one prefill chunk (`last`: the prompt's last one) for a hook probing `probe`
/// whole: [`Probe::Queries`] on every chunk (statistics over every prompt query), any other
/// probe on the last chunk only (its window lies there, [`prefill_chunks`]).
pub fn chunk_probe(probe: Probe, last: bool) -> Probe {
    match probe {
        Probe::Queries => probe,
        _ if last => probe,
        _ => Probe::None,
    }
}

/// Greedy generation of one sequence.
pub fn generate(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    prompt: &[u32],
    params: &GenParams,
    hooks: &mut dyn Hooks,
) -> Result<Generation> {
    let seq = cache.add_sequence()?;
    let result = generate_seq(model, cache, seq, prompt, params, hooks);
    cache.remove_sequence(seq)?;
    result
}

fn generate_seq(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seq: SeqId,
    prompt: &[u32],
    params: &GenParams,
    hooks: &mut dyn Hooks,
) -> Result<Generation> {
    let pre = prefill(model, cache, seq, prompt, params, hooks)?;
    decode(model, cache, seq, &pre, &[], params, hooks)
}

/// A prompt in the cache, before [`Hooks::after_prefill`] ran: what [`decode`] continues from.
/// One prefill can be continued several times from copies of the cache (a sweep over budgets
/// of one method shares it: the prompt's KVs and the prefill metrics do not depend on the
/// budget, only the compression after prefill does).
#[derive(Debug, Clone)]
pub struct Prefilled {
    /// Logits after the last prompt token `[vocab]`.
    pub logits: Tensor,
    pub prompt_len: usize,
    /// Wall time of the prefill forward passes: its forward and observe parts (`fork_ms`,
    /// `compress_ms` 0).
    pub times: PrefillTimes,
}

/// Prefill `prompt` into `cache` in chunks, probing the last chunk as `hooks` ask; does not
/// call [`Hooks::after_prefill`] (that is [`decode`]'s first step).
pub fn prefill(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seq: SeqId,
    prompt: &[u32],
    params: &GenParams,
    hooks: &mut dyn Hooks,
) -> Result<Prefilled> {
    if prompt.is_empty() {
        candle_core::bail!("empty prompt");
    }
    let t0 = Instant::now();
    let probe = hooks.prefill_probe();
    // Only a window longer than a chunk is split: one that fits is observed whole, as always.
    let splits = hooks.prefill_probe_splits()
        && matches!(probe, Probe::LastQueries(w) if w > params.prefill_chunk);
    let min_last = match probe {
        Probe::LastQueries(w) if !splits => w,
        _ => 1,
    };
    let chunks = prefill_chunks(prompt.len(), params.prefill_chunk, min_last);
    let mut logits = None;
    let mut observe_ms = 0.0;
    for (i, r) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let p = match probe {
            // The window's rows in this chunk: always a suffix of it (the window is a suffix
            // of the prompt).
            Probe::LastQueries(w) if splits => {
                let first = prompt.len().saturating_sub(w).max(r.start);
                match r.end.saturating_sub(first) {
                    0 => Probe::None,
                    n => Probe::LastQueries(n),
                }
            }
            _ => chunk_probe(probe, last),
        };
        let mut observe = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
            let t = Instant::now();
            let r = hooks.observe(layer, probs, c, seq);
            observe_ms += ms_since(t);
            r
        };
        let l = model.forward(&prompt[r.clone()], seq, cache, p, &mut observe);
        logits = Some(l?);
    }
    // The forward's time includes the device's (launches return before the kernels finish).
    model.device.synchronize()?;
    let ms = ms_since(t0);
    Ok(Prefilled {
        logits: logits.expect("non-empty prompt"),
        prompt_len: prompt.len(),
        times: PrefillTimes {
            forward_ms: ms - observe_ms,
            observe_ms,
            ..Default::default()
        },
    })
}

/// Continue from a prefill: [`Hooks::after_prefill`] (compression; its time counts as
/// prefill time, `compress_ms` of the generation's `prefill_times`), then the `question`
/// (the question-agnostic protocol: it enters the compressed cache, prefilled by
/// [`read_question`] or one decode step per token as [`Hooks::steps_question`] says;
/// `question_ms`, also prefill time; empty for LongBench's protocol), then greedy decoding. Positions continue from the prefill's `prompt_len`.
pub fn decode(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seq: SeqId,
    pre: &Prefilled,
    question: &[u32],
    params: &GenParams,
    hooks: &mut dyn Hooks,
) -> Result<Generation> {
    let t0 = Instant::now();
    hooks.after_prefill(cache, seq)?;
    let mut prefill_times = PrefillTimes {
        compress_ms: ms_since(t0),
        ..pre.times
    };
    let mut logits = pre.logits.clone();
    let mut pos = pre.prompt_len + question.len();
    let t = Instant::now();
    if hooks.steps_question() {
        for &tok in question {
            logits = decode_step(model, cache, seq, tok, hooks, &mut DecodeTimes::default())?;
        }
    } else if !question.is_empty() {
        logits = read_question(model, cache, seq, question, params)?;
    }
    prefill_times.question_ms = if question.is_empty() {
        0.0
    } else {
        ms_since(t)
    };
    let t1 = Instant::now();
    let first_logits = Some(logits.to_vec1::<f32>()?);
    let mut out = Vec::new();
    let mut times = DecodeTimes::default();
    let finish = loop {
        let t = Instant::now();
        let next = Llama::argmax(&logits)?;
        times.sample_ms += ms_since(t);
        out.push(next);
        pos += 1;
        if let Some(f) = params.finish(next, out.len(), pos) {
            break f;
        }
        logits = decode_step(model, cache, seq, next, hooks, &mut times)?;
    };
    Ok(Generation {
        output_ids: out,
        finish_reason: finish,
        first_logits,
        prefill_ms: prefill_times.total(),
        prefill_times,
        decode_ms: ms_since(t1),
        decode_times: times,
    })
}

/// Prefill `question` into `seq`'s cache after its compression, in chunks of
/// `params.prefill_chunk`, probing nothing; returns the logits after its last token. The
/// question-agnostic protocol's read for hooks that do no work at decode steps
/// ([`Hooks::steps_question`]): its keys and values are those of one decode step per token.
pub fn read_question(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seq: SeqId,
    question: &[u32],
    params: &GenParams,
) -> Result<Tensor> {
    let mut logits = None;
    let mut none = |_: usize, _: &Tensor, _: &dyn CacheBackend| Ok(());
    for r in prefill_chunks(question.len(), params.prefill_chunk, 1) {
        logits = Some(model.forward(&question[r], seq, cache, Probe::None, &mut none)?);
    }
    logits.ok_or_else(|| candle_core::Error::Msg("empty question".into()))
}

/// One decode step of one sequence: `tok` forward with the hooks' probe and scoring, then
/// their continual compression ([`Hooks::after_step`]); adds its times to `times` and
/// returns the logits after `tok`.
fn decode_step(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seq: SeqId,
    tok: u32,
    hooks: &mut dyn Hooks,
    times: &mut DecodeTimes,
) -> Result<Tensor> {
    let probe = hooks.decode_probe();
    let mut observe_ms = 0.0;
    let mut observe = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
        let t = Instant::now();
        let r = hooks.observe(layer, probs, c, seq);
        observe_ms += ms_since(t);
        r
    };
    let t = Instant::now();
    let logits = model.forward(&[tok], seq, cache, probe, &mut observe)?;
    times.forward_ms += ms_since(t) - observe_ms;
    times.observe_ms += observe_ms;
    times.steps += 1;
    let t = Instant::now();
    hooks.after_step(cache, seq)?;
    times.compress_ms += ms_since(t);
    Ok(logits)
}

/// Probabilities a decode step may hold on the device before scoring them (see
/// [`decode_batch`]): a small model's whole step fits; a large model's long batch is scored in
/// several rounds.
pub const OBSERVE_HOLD_BYTES: usize = 512 << 20;

/// Score a decode step's probabilities `[live, nh, 1, kv]` of `layer` for every live sequence
/// that probes (`probes[row]` for `live[row]`): one copy to the host, then each sequence's
/// [`Hooks::observe`] on all cores (each writes only its own pending metrics, so the result is
/// the same as one after another; `kvc-step-bench` times it).
pub fn observe_batch(
    layer: usize,
    probs: &Tensor,
    cache: &dyn CacheBackend,
    seqs: &[SeqId],
    hooks: &mut [&mut dyn Hooks],
    live: &[usize],
    probes: &[Probe],
) -> Result<()> {
    use rayon::prelude::*;
    let probs = crate::kvcache::decode_probs_on_host(probs)?;
    let mut row_of = vec![None; hooks.len()];
    for (row, &i) in live.iter().enumerate() {
        if !matches!(probes[row], Probe::None) {
            row_of[i] = Some(row);
        }
    }
    hooks
        .par_iter_mut()
        .enumerate()
        .try_for_each(|(i, h)| match row_of[i] {
            Some(row) => h.observe(layer, &probs.narrow(0, row, 1)?, cache, seqs[i]),
            None => Ok(()),
        })
}

/// The continual compression of every live sequence of a decode batch after a step: metrics
/// written one sequence after another, the plans (snapshot + selection, pure host work that
/// grows with the batch; `kvc-step-bench` times it) on all cores, then the evictions one after another with their K/V moves collected into one
/// copy ([`CacheBackend::defer_moves`]). Sequences own disjoint blocks, so the result is the same
/// as [`Hooks::after_step`] sequence by sequence.
pub fn step_compression(
    cache: &mut dyn CacheBackend,
    seqs: &[SeqId],
    hooks: &mut [&mut dyn Hooks],
    live: &[usize],
) -> Result<()> {
    use rayon::prelude::*;
    let mut is_live = vec![false; hooks.len()];
    for &i in live {
        is_live[i] = true;
    }
    let mut planners = Vec::with_capacity(live.len());
    let mut ordered = Vec::new();
    let mut on_device = Vec::new();
    for (i, h) in hooks.iter_mut().enumerate() {
        if is_live[i] {
            match h.step_plan(cache, seqs[i])? {
                Some(StepWork::Plan(p)) => planners.push((i, p)),
                Some(StepWork::Ordered(p)) => ordered.push((i, p)),
                Some(StepWork::Device(r)) => on_device.push((i, r)),
                None => {}
            }
        }
    }
    if planners.is_empty() && ordered.is_empty() && on_device.is_empty() {
        return Ok(());
    }
    let mut plans: Vec<(usize, Result<EvictionPlan>)> = {
        let view: &dyn CacheBackend = &*cache;
        planners
            .into_par_iter()
            .map(|(i, p)| (i, p(view)))
            .collect()
    };
    let view: &dyn CacheBackend = &*cache;
    plans.extend(ordered.into_iter().map(|(i, p)| (i, p(view))));
    if !on_device.is_empty() {
        let reqs: Vec<DeviceEvict> = on_device.iter().map(|(_, r)| *r).collect();
        let stats = cache.evict_on_device(&reqs)?;
        for ((i, _), st) in on_device.iter().zip(stats) {
            hooks[*i].device_evicted(st);
        }
    }
    if plans.is_empty() {
        return Ok(());
    }
    cache.defer_moves();
    let applied = plans
        .into_iter()
        .try_for_each(|(i, plan)| hooks[i].apply_step_plan(&mut *cache, seqs[i], plan?));
    let flushed = cache.flush_moves();
    applied.and(flushed)
}

/// One decode forward of a batch, its probed probabilities scored by `score(layer, probs,
/// cache)` after the forward (or once the held ones pass [`OBSERVE_HOLD_BYTES`]), not as each
/// layer returns them: scoring a layer needs its probabilities on the host, and copying them
/// there waits for the device, so scoring layer by layer stalled the device 30 times per
/// SmolLM2 step while the host scored. The result is the same: a layer's scores depend on its
/// probabilities and its own slots' positions, which later layers of the step do not change.
/// Adds the forward's launch, device wait and scoring times to `times`; returns the logits.
/// Used by [`decode_batch`] and the benchmark scheduler.
pub fn forward_then_observe(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    tokens: &[u32],
    batch: &[SeqId],
    probe: Probe,
    times: &mut DecodeTimes,
    score: &mut dyn FnMut(usize, &Tensor, &dyn CacheBackend) -> Result<()>,
) -> Result<Tensor> {
    let t = Instant::now();
    let mut observe_ms = 0.0;
    let mut held: Vec<(usize, Tensor)> = Vec::new();
    let logits = {
        let (held, observe_ms) = (&mut held, &mut observe_ms);
        let score = &mut *score;
        let mut observe = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
            held.push((layer, probs.clone()));
            let bytes: usize = held.iter().map(|(_, p)| p.elem_count() * 4).sum();
            if bytes <= OBSERVE_HOLD_BYTES {
                return Ok(());
            }
            let t = Instant::now();
            let r = held.drain(..).try_for_each(|(l, p)| score(l, &p, c));
            *observe_ms += ms_since(t);
            r
        };
        model.forward_decode(tokens, batch, cache, probe, &mut observe)?
    };
    times.forward_ms += ms_since(t) - observe_ms;
    let t = Instant::now();
    logits.device().synchronize()?;
    times.sync_ms += ms_since(t);
    let t = Instant::now();
    for (l, p) in held.drain(..) {
        score(l, &p, &*cache)?;
    }
    times.observe_ms += observe_ms + ms_since(t);
    Ok(logits)
}

/// How one sequence of [`decode_batch`] ended.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub output_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// From the end of the sequence's question (the batch's start without one) to its last
    /// token.
    pub decode_ms: f64,
    /// The batch's step times over the same span.
    pub decode_times: DecodeTimes,
    /// From the batch's start to the end of the sequence's question (0 without one).
    pub question_ms: f64,
    /// The logits after the question's last token (`None` without a question: they are the
    /// prefill's).
    pub first_logits: Option<Vec<f32>>,
}

/// Where a sequence of [`decode_batch`] starts.
#[derive(Debug, Clone, Copy)]
pub struct BatchStart<'a> {
    /// The first generated token: the argmax of the prefill logits (unused with a question).
    pub first: u32,
    /// Tokens the prefill put in the cache (positions continue from here).
    pub prompt_len: usize,
    /// Tokens read before generating (the question-agnostic protocol's question, after the
    /// compression; prefilled or stepped, [`Hooks::steps_question`]); empty for LongBench's
    /// protocol.
    pub question: &'a [u32],
}

/// Per-sequence state of [`decode_batch`].
struct BatchSeq {
    next: u32,
    pos: usize,
    /// Question tokens fed so far.
    fed: usize,
    out: Vec<u32>,
    /// When the question ended: ms since the batch's start, the batch's times then, the logits.
    question_end: Option<(f64, DecodeTimes, Vec<f32>)>,
}

/// Greedy decoding of several prefilled sequences in one batch (forks of one prompt under
/// several budgets, and forks of several prompts): `seqs[i]`, already through its
/// `hooks[i].after_prefill`, continues from `starts[i]` (reading its question first, if any:
/// prefilled before the first step, or stepped, as [`Hooks::steps_question`] says);
/// one [`Llama::forward_decode`] per step over the sequences still running, each with its own
/// hooks (scoring, continual compression) and stop. Per sequence, the tokens single-sequence
/// [`decode`] gives (same stop rules; argmax on the host, first maximum, as
/// [`Llama::argmax`]).
pub fn decode_batch(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seqs: &[SeqId],
    hooks: &mut [&mut dyn Hooks],
    starts: &[BatchStart],
    params: &GenParams,
) -> Result<Vec<BatchOutput>> {
    let n = seqs.len();
    if hooks.len() != n || starts.len() != n {
        candle_core::bail!(
            "{} hooks and {} starts for {n} sequences",
            hooks.len(),
            starts.len()
        );
    }
    let t0 = Instant::now();
    let mut st: Vec<BatchSeq> = starts
        .iter()
        .map(|s| BatchSeq {
            next: s.first,
            pos: s.prompt_len,
            fed: 0,
            out: Vec::new(),
            question_end: None,
        })
        .collect();
    prefill_questions(model, cache, seqs, hooks, starts, params, &mut st, t0)?;
    let mut done: Vec<Option<BatchOutput>> = vec![None; n];
    let mut live: Vec<usize> = (0..n).collect();
    let mut times = DecodeTimes::default();
    loop {
        let mut still = Vec::with_capacity(live.len());
        for &i in &live {
            match take_token(&mut st[i], starts[i].question, params) {
                None => still.push(i),
                Some(f) => done[i] = Some(batch_output(&mut st[i], f, ms_since(t0), times)),
            }
        }
        live = still;
        if live.is_empty() {
            break;
        }
        // Which sequences score this step's attention; one probe for the batch (every fork
        // runs the same policy).
        let probes: Vec<Probe> = live.iter().map(|&i| hooks[i].decode_probe()).collect();
        let probe = probes
            .iter()
            .copied()
            .find(|p| !matches!(p, Probe::None))
            .unwrap_or(Probe::None);
        let tokens: Vec<u32> = live.iter().map(|&i| st[i].next).collect();
        let batch: Vec<SeqId> = live.iter().map(|&i| seqs[i]).collect();
        let logits = {
            let (live, hooks, probes) = (&live, &mut *hooks, &probes);
            let mut score = |l: usize, p: &Tensor, c: &dyn CacheBackend| {
                observe_batch(l, p, c, seqs, hooks, live, probes)
            };
            forward_then_observe(model, cache, &tokens, &batch, probe, &mut times, &mut score)?
        };
        times.steps += 1;
        let mut clock = crate::profile::start(&model.device);
        let t = Instant::now();
        step_compression(cache, seqs, hooks, &live)?;
        times.compress_ms += ms_since(t);
        crate::profile::mark(&model.device, &mut clock, "decode.compress");
        let t = Instant::now();
        for (row, (tok, &i)) in Llama::argmax_rows(&logits)?
            .into_iter()
            .zip(&live)
            .enumerate()
        {
            let s = &mut st[i];
            s.next = tok;
            let q = starts[i].question.len();
            if q > 0 && s.fed == q && s.question_end.is_none() {
                let l = logits
                    .get(row)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
                s.question_end = Some((ms_since(t0), times, l));
            }
        }
        times.sample_ms += ms_since(t);
        crate::profile::mark(&model.device, &mut clock, "decode.sample");
    }
    Ok(done
        .into_iter()
        .map(|d| d.expect("every sequence finishes"))
        .collect())
}

/// [`read_question`] for each sequence of [`decode_batch`] with a question and hooks that do not
/// step it ([`Hooks::steps_question`]), before the batch's first step: its state continues
/// after the question (`fed`, `pos`, `next` from the question's logits), and its question
/// ends when all of them are read (`question_end`, ms since the batch's start `t0`).
#[allow(clippy::too_many_arguments)]
fn prefill_questions(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seqs: &[SeqId],
    hooks: &[&mut dyn Hooks],
    starts: &[BatchStart],
    params: &GenParams,
    st: &mut [BatchSeq],
    t0: Instant,
) -> Result<()> {
    let mut read = Vec::new();
    for (i, s) in st.iter_mut().enumerate() {
        let q = starts[i].question;
        if q.is_empty() || hooks[i].steps_question() {
            continue;
        }
        let logits: Vec<f32> = read_question(model, cache, seqs[i], q, params)?.to_vec1()?;
        s.next = crate::cuda::layer_ops::argmax_twin(&logits);
        s.fed = q.len();
        s.pos += q.len();
        read.push((i, logits));
    }
    let end = ms_since(t0);
    for (i, l) in read {
        st[i].question_end = Some((end, DecodeTimes::default(), l));
    }
    Ok(())
}

/// The token a sequence of [`decode_batch`] feeds next, in `s.next`: its question's next
/// token while any is left, else its greedy choice, recorded as output. Returns how the
/// sequence finishes when that output token ends it.
fn take_token(s: &mut BatchSeq, question: &[u32], params: &GenParams) -> Option<FinishReason> {
    s.pos += 1;
    if let Some(&tok) = question.get(s.fed) {
        s.next = tok;
        s.fed += 1;
        return None;
    }
    s.out.push(s.next);
    params.finish(s.next, s.out.len(), s.pos)
}

/// The output of a finished sequence of [`decode_batch`] at `ms` and `times` since the batch's
/// start: its decode span starts where its question ended.
fn batch_output(s: &mut BatchSeq, f: FinishReason, ms: f64, times: DecodeTimes) -> BatchOutput {
    let (question_ms, before, first_logits) = match s.question_end.take() {
        Some((q_ms, q_times, l)) => (q_ms, q_times, Some(l)),
        None => (0.0, DecodeTimes::default(), None),
    };
    BatchOutput {
        output_ids: std::mem::take(&mut s.out),
        finish_reason: f,
        decode_ms: ms - question_ms,
        decode_times: times - before,
        question_ms,
        first_logits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_prompt_and_keep_window_whole() {
        for n in 1..60 {
            for chunk in [1, 4, 7, 16] {
                for w in [1, 3, 8] {
                    let c = prefill_chunks(n, chunk, w);
                    assert_eq!(c.first().unwrap().start, 0);
                    assert_eq!(c.last().unwrap().end, n);
                    for pair in c.windows(2) {
                        assert_eq!(pair[0].end, pair[1].start);
                    }
                    assert!(c.last().unwrap().len() >= w.min(n));
                    assert!(c.iter().all(|r| !r.is_empty()));
                    assert!(c[..c.len() - 1].iter().all(|r| r.len() <= chunk));
                }
            }
        }
    }

    /// Queries are observed on every chunk; a probability window only on the last.
    #[test]
    fn chunk_probe_sends_queries_on_every_chunk() {
        for last in [false, true] {
            assert_eq!(chunk_probe(Probe::Queries, last), Probe::Queries);
            let window = chunk_probe(Probe::LastQueries(8), last);
            assert_eq!(
                window,
                if last {
                    Probe::LastQueries(8)
                } else {
                    Probe::None
                }
            );
            assert_eq!(chunk_probe(Probe::All, last) == Probe::All, last);
        }
    }
}
