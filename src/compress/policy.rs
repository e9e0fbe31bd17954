//! The shape of a compression method and the driver that runs it in the engine.
//!
//! A method ([`Policy`]) is a scorer (per kv-head, per slot importance from probed attention,
//! see [`super::scorer`]) plus a budget allocator and an evictor ([`Policy::plan`]: from a plain
//! snapshot of the sequence's metrics and positions, [`SeqView`], to an [`EvictionPlan`]).
//!
//! One compression step, always in this order ([`CompressHooks`]):
//! 1. collect metrics: probed attention of every layer is scored ([`Policy::score`]) and added to
//!    the per-slot metric of the paged cache;
//! 2. plan evictions: [`Policy::plan`] on a [`SeqView`] snapshot (pure, no tensors);
//! 3. execute moves: [`PagedCache::evict`] compacts each head, copying K, V, metric and position
//!    of tail survivors into the evicted holes;
//! 4. free blocks: the emptied tail blocks go back to the pool.
//!
//! It runs once after prefill and, for continual methods, after every decode step.
use candle_core::{Result, Tensor};

use super::kvcrush::BlockPicks;
use super::query_stats::QueryStats;
use super::ranks::{gather_per_head, plan_on_rank, RankExchange, RankSplit};
use crate::engine::{Hooks, StepPlanner, StepWork};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::paged::{DeviceEvict, EvictStats, PagedCache};
use crate::kvcache::{CacheBackend, Probe, SeqId};
use crate::model::Llama;

/// When a policy is asked to score or plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The prompt has just been cached.
    Prefill,
    /// A decode step's token has just been cached.
    Decode,
}

/// One head's slots, in logical (slot) order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeadView {
    /// Eviction metric of each slot.
    pub metric: Vec<f32>,
    /// Token position of each slot.
    pub position: Vec<u32>,
}

impl HeadView {
    /// Cached tokens.
    pub fn len(&self) -> usize {
        self.metric.len()
    }
    /// Whether the head is empty.
    pub fn is_empty(&self) -> bool {
        self.metric.is_empty()
    }
    /// Whether each slot holds one of the last `window` positions of a sequence of `seq_len`.
    pub fn recent(&self, seq_len: usize, window: usize) -> Vec<bool> {
        let first = seq_len.saturating_sub(window) as u32;
        self.position.iter().map(|&p| p >= first).collect()
    }
}

/// A plain snapshot of one sequence for planning.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeqView {
    /// Tokens the sequence has seen (position of its next token).
    pub seq_len: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// `[layer][kv_head]`.
    pub heads: Vec<Vec<HeadView>>,
}

impl SeqView {
    /// Snapshot `seq` of `cache`.
    pub fn of(cache: &PagedCache, seq: SeqId) -> Result<SeqView> {
        let pool = cache.pool();
        let mut meta = cache.seq_meta(seq)?.into_iter();
        let heads = (0..pool.layers())
            .map(|_| {
                (&mut meta)
                    .take(pool.kv_heads())
                    .map(|(metric, position)| HeadView { metric, position })
                    .collect()
            })
            .collect();
        Ok(SeqView {
            seq_len: cache.seq_len(seq),
            block_size: pool.block_size(),
            heads,
        })
    }

    /// Blocks the sequence holds.
    pub fn blocks(&self) -> usize {
        self.heads
            .iter()
            .flatten()
            .map(|h| h.len().div_ceil(self.block_size.max(1)))
            .sum()
    }
}

/// A compression method: scorer + budget allocator + evictor (see the module docs).
pub trait Policy: Send + Sync {
    /// Queries probed in the last prefill chunk ([`Probe::Queries`]: every chunk's pre-RoPE
    /// queries, summarised per layer for [`Policy::key_scores`]).
    fn prefill_probe(&self) -> Probe;
    /// Queries probed at decode steps (the default `Probe::None`: no decode scoring).
    fn decode_probe(&self) -> Probe {
        Probe::None
    }
    /// Metric increments per kv-head and slot from one layer's probed probabilities
    /// (`positions[g]`: slot positions of kv-head `g`).
    fn score(&self, phase: Phase, probs: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>>;
    /// What to evict so the sequence fits `budget` cache tokens per head.
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan;
    /// How [`Policy::plan`] runs when the kv-heads are split among tensor-parallel ranks
    /// ([`super::ranks`]). The default refuses: a policy is split only once it says how.
    fn rank_split(&self) -> RankSplit {
        RankSplit::Unsupported
    }
    /// [`Policy::plan`] of one rank's heads (`view`), agreed with the other ranks through
    /// `x`, for a policy whose [`Policy::rank_split`] is [`RankSplit::Exchange`].
    fn plan_exchanged(
        &self,
        _view: &SeqView,
        _budget: usize,
        _phase: Phase,
        _x: &RankExchange,
    ) -> Result<EvictionPlan> {
        candle_core::bail!("this method has no tensor-parallel exchange")
    }
    /// Whether [`Policy::score`]'s prefill increments add up over query blocks (a summed
    /// metric without pooling), so a long window may be observed chunk by chunk
    /// ([`crate::engine::Hooks::prefill_probe_splits`]).
    fn score_splits(&self) -> bool {
        false
    }
    /// Whether [`Policy::plan`] runs after every decode step too (default: no, once after
    /// prefill).
    fn continual(&self) -> bool {
        false
    }
    /// The smallest budget that makes sense (the protected window); smaller budgets are
    /// clamped to it.
    fn min_budget(&self) -> usize;
    /// Whether this policy's decode scoring and step eviction are exactly what the device
    /// computes, KV-Compress's decode metric (`sum over the group of p^2`, added by the decode
    /// kernel) and block evictor (`kernels/evict.cu`), and with what limits for `budget`
    /// tokens per head. `None` (the default): scored and planned on the host.
    fn device_step(&self, _budget: usize, _block_size: usize) -> Option<DeviceStepSpec> {
        None
    }
    /// How the compression right after prefill runs on the device at `budget` tokens per head
    /// (asked only when [`Policy::device_step`] is `Some`): by default the same eviction as a
    /// decode step; KVCrush's block form adds its picks. `None`: it is planned on the host
    /// ([`Policy::plan`]), and only the decode steps after it run on the device.
    fn device_prefill(&self, budget: usize, block_size: usize) -> Option<DeviceStepSpec> {
        self.device_step(budget, block_size)
    }
    /// Whether the prompt's keys and values score it ([`Policy::key_scores`]) instead of
    /// attention.
    fn scores_keys(&self) -> bool {
        false
    }
    /// Per-slot scores of every kv-head of one layer from its keys and values (and, for a
    /// policy probing [`Probe::Queries`] in prefill, the layer's query statistics), for a
    /// method that [`Policy::scores_keys`]: added to the metric after prefill, before the
    /// compression. One vector per kv-head, in slot order.
    fn key_scores(&self, _layer: &LayerKeys) -> Result<Vec<Vec<f32>>> {
        candle_core::bail!("this method scores attention, not keys")
    }
    /// For a policy probing [`Probe::Queries`] in prefill: how many first positions its query
    /// statistics leave out (Expected Attention's sinks).
    fn queries_skipped(&self) -> usize {
        0
    }
    /// Whether [`Policy::key_scores`] rescales the scores already in the metric (CriticalKV):
    /// it then sees the metric ([`LayerKeys::metric`]) and the layer's output projection
    /// ([`LayerKeys::out_proj`], which the runner hands the hooks with
    /// [`CompressHooks::with_out_proj`]), and returns the increments that bring the metric to
    /// its rescaled scores.
    fn reweights(&self) -> bool {
        false
    }
    /// Tokens per head a sequence of `prompt_len` prompt tokens holds beyond its prompt while
    /// [`Policy::forward_scores`] runs (the runner sizes its pool for them; default 0).
    fn scratch_tokens(&self, _prompt_len: usize) -> usize {
        0
    }
    /// Scores from more forward passes over the prefilled prompt (KVzip's repeat passes,
    /// [`super::kvzip`]): run them on `seq`, which holds `context` and nothing evicted yet,
    /// `piece` ids per forward, and leave the cache as it was; returns per `[layer][kv_head]`
    /// one score per slot, added to the metric before the compression (they do not depend on
    /// the budget, so a shared prefill runs them once). `None` (the default): no such passes.
    /// The runner calls it right after [`crate::engine::prefill`]
    /// ([`CompressHooks::score_by_forwards`]).
    fn forward_scores(
        &self,
        _model: &mut Llama,
        _cache: &mut PagedCache,
        _seq: SeqId,
        _context: &[u32],
        _piece: usize,
    ) -> Result<Option<Vec<Vec<Vec<f32>>>>> {
        Ok(None)
    }
}

/// One layer of one sequence right after prefill, as [`Policy::key_scores`] sees it.
pub struct LayerKeys<'a> {
    /// Keys and values `[len, d]` of each kv-head in slot order (the cache's dtype and device).
    pub heads: &'a [(Tensor, Tensor)],
    /// Token position of each slot of each kv-head.
    pub positions: &'a [Vec<u32>],
    /// Tokens the sequence has seen (the position of its next token).
    pub seq_len: usize,
    /// The layer's prefill query statistics, for a policy probing [`Probe::Queries`].
    pub queries: Option<&'a QueryStats>,
    /// The layer's index.
    pub layer: usize,
    /// Cache tokens per head the sequence is compressed to next (`None`: no eviction).
    pub budget: Option<usize>,
    /// Each kv-head's metric before these scores, for a policy that [`Policy::reweights`]
    /// (empty otherwise).
    pub metric: &'a [Vec<f32>],
    /// The layer's output projection `[hidden, heads * head_dim]` (the model's dtype and
    /// device), for a policy that [`Policy::reweights`].
    pub out_proj: Option<&'a Tensor>,
}

/// How a policy's continual compression runs on the device ([`Policy::device_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStepSpec {
    /// The last positions never evicted.
    pub protected: usize,
    /// Blocks a sequence may hold; the excess is evicted after a step.
    pub allowed_blocks: usize,
    /// KVCrush's block form on top of the selection (prefill compression only).
    pub crush: Option<BlockPicks>,
}

/// The scores of a method that scores nothing (StreamingLLM, `full`): 0 for every slot of
/// every kv-head (`positions[g]`: kv-head `g`'s slots).
pub fn zero_scores(positions: &[Vec<u32>]) -> Vec<Vec<f32>> {
    positions.iter().map(|p| vec![0.0; p.len()]).collect()
}

/// The plan of a method that compresses once, after prefill, and protects nothing: each
/// head keeps its `budget` highest-metric slots (no eviction at decode steps).
pub fn lowest_after_prefill(view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
    if phase == Phase::Decode {
        return EvictionPlan::default();
    }
    per_head_plan(view, |_, _, h| {
        evict_lowest(&h.metric, &vec![false; h.metric.len()], budget)
    })
}

/// Token-level evictor: keep the `keep` highest-metric slots, always keeping `protected` ones
/// (they count against `keep`); ties evict the lower logical index first. Returns the evicted
/// logical slots in ascending metric order.
pub fn evict_lowest(metric: &[f32], protected: &[bool], keep: usize) -> Vec<usize> {
    let n = metric.len();
    if n <= keep {
        return vec![];
    }
    let mut cand: Vec<usize> = (0..n).filter(|&i| !protected[i]).collect();
    let cheaper = |a: &usize, b: &usize| metric[*a].total_cmp(&metric[*b]).then(a.cmp(b));
    let n_evict = (n - keep).min(cand.len());
    // Continual methods evict a slot or two of hundreds after every decode step: select the
    // cheapest first (linear), then order only those. The order is total (ties by slot), so
    // this is exactly the prefix of the full sort.
    if n_evict < cand.len() {
        cand.select_nth_unstable_by(n_evict, cheaper);
    }
    cand.truncate(n_evict);
    cand.sort_by(cheaper);
    cand
}

/// A plan evicting `evict(layer, kv_head, head)` from every head.
pub fn per_head_plan(
    view: &SeqView,
    mut evict: impl FnMut(usize, usize, &HeadView) -> Vec<usize>,
) -> EvictionPlan {
    let kv_heads = view.heads.first().map_or(0, Vec::len);
    let evicted = view.heads.iter().enumerate().flat_map(|(l, layer)| {
        layer
            .iter()
            .enumerate()
            .map(|(h, head)| evict(l, h, head))
            .collect::<Vec<_>>()
    });
    EvictionPlan::from_heads(evicted, kv_heads)
}

/// What the hooks saw, for [`super::CompressionStats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kept {
    /// Cache tokens per head the method was held to (after clamping); `None` = no eviction.
    pub budget: Option<usize>,
    /// Tokens kept per `[layer][kv_head]` right after the prefill compression.
    pub per_head: Vec<Vec<usize>>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Slots evicted over the whole generation (prefill and decode).
    pub evicted: usize,
}

/// How the per-head budget is found once the prompt length is known.
pub type BudgetFn<'a> = dyn Fn(usize) -> Option<usize> + Sync + 'a;

/// Engine hooks that run a [`Policy`] on a [`PagedCache`] (see the module docs for the order).
pub struct CompressHooks<'a> {
    policy: &'a dyn Policy,
    budget_of: &'a BudgetFn<'a>,
    /// Metric increments observed and not yet written, per layer and kv-head.
    pending: Vec<Option<Vec<Vec<f32>>>>,
    /// Per layer, the statistics of the prefill's queries when the policy probes
    /// [`Probe::Queries`] (emptied once the keys are scored after prefill).
    queries: Vec<QueryStats>,
    /// Per layer, the model's output projection, for a policy that [`Policy::reweights`].
    out_proj: Vec<Tensor>,
    phase: Phase,
    budget: Option<usize>,
    /// Decode-time compression runs only when [`CompressHooks::compress_now`] is called (the
    /// benchmark scheduler's "on memory pressure"); `Some(score)`: whether decode steps still
    /// probe and score attention so those compressions see decode metrics.
    on_demand: Option<bool>,
    /// Decode steps score and evict on the device (set after prefill, see
    /// [`Policy::device_step`] and [`PagedCache::keep_metric_on_device`]).
    device: Option<DeviceStepSpec>,
    /// The tensor-parallel group this rank plans with (`None`: the whole model here).
    ranks: Option<RankExchange>,
    /// What was kept.
    pub kept: Kept,
}

impl<'a> CompressHooks<'a> {
    /// Hooks for `policy`; `budget_of(prompt_len)` gives the per-head token budget.
    pub fn new(policy: &'a dyn Policy, layers: usize, budget_of: &'a BudgetFn<'a>) -> Self {
        CompressHooks {
            policy,
            budget_of,
            pending: vec![None; layers],
            queries: vec![QueryStats::default(); layers],
            out_proj: Vec::new(),
            phase: Phase::Prefill,
            budget: None,
            on_demand: None,
            device: None,
            ranks: None,
            kept: Kept::default(),
        }
    }

    /// Plan as one rank of a tensor-parallel group ([`super::ranks`]): the cache holds this
    /// rank's kv-heads, plans agree with the other ranks' through `ranks`, evictions run on
    /// the host, and [`Kept::per_head`] counts every rank's heads.
    pub fn with_ranks(mut self, ranks: Option<RankExchange>) -> Self {
        self.ranks = ranks;
        self
    }

    /// Compress during decoding only when [`CompressHooks::compress_now`] is called (not after
    /// every step); `score_decode`: keep probing and scoring decode attention meanwhile (the
    /// paper's running metric), else decode KVs keep metric 0.
    pub fn on_demand(mut self, score_decode: bool) -> Self {
        self.on_demand = Some(score_decode);
        self
    }

    /// Hand the policy each layer's output projection `[hidden, heads * head_dim]`
    /// ([`crate::model::Llama::out_proj`]); needed by a policy that [`Policy::reweights`].
    pub fn with_out_proj(mut self, out_proj: Vec<Tensor>) -> Self {
        self.out_proj = out_proj;
        self
    }

    /// These hooks for another budget, taken after a prefill and before its compression: the
    /// prefill's pending metrics are copied, the budget is found anew by `budget_of`.
    pub fn fork<'b>(&self, budget_of: &'b BudgetFn<'b>) -> CompressHooks<'b>
    where
        'a: 'b,
    {
        CompressHooks {
            policy: self.policy,
            budget_of,
            pending: self.pending.clone(),
            queries: self.queries.clone(),
            out_proj: self.out_proj.clone(),
            phase: self.phase,
            budget: None,
            on_demand: self.on_demand,
            device: None,
            ranks: self.ranks.clone(),
            kept: Kept::default(),
        }
    }

    /// Before `seq` (prefilled with these hooks) is forked for several budgets: when its forks
    /// will compress on the device ([`Policy::device_step`]), write its pending metrics and move
    /// its metric to the device once ([`PagedCache::keep_metric_on_device`]), so each fork
    /// copies it there with its blocks instead of uploading its own (one upload per prompt
    /// instead of one per budget). Returns whether it did.
    pub fn share_device_metric(&mut self, cache: &mut PagedCache, seq: SeqId) -> Result<bool> {
        let bs = cache.spec().block_size;
        let device = self.on_demand.is_none()
            && self.ranks.is_none()
            && cache.device_compression()
            && self.policy.device_step(cache.seq_len(seq), bs).is_some();
        if device {
            self.flush(cache, seq)?;
            cache.keep_metric_on_device(seq)?;
        }
        Ok(device)
    }

    /// The per-head token budget fixed after prefill (`None`: no eviction, or not yet known).
    pub fn budget(&self) -> Option<usize> {
        self.budget
    }

    /// Write pending metrics and compress `seq` back to its budget now (a decode-phase
    /// compression step; on the device when its metric lives there); returns the slots
    /// evicted.
    pub fn compress_now(&mut self, cache: &mut PagedCache, seq: SeqId) -> Result<usize> {
        if let Some(r) = self.device_request(cache, seq)? {
            let st = cache.evict_on_device(&[r])?;
            self.device_evicted(st[0]);
            return Ok(st[0].evicted);
        }
        self.flush(cache, seq)?;
        let before = self.kept.evicted;
        self.compress(cache, seq)?;
        Ok(self.kept.evicted - before)
    }

    /// What the device evictor must take from `seq` to bring it back to its budget, when
    /// `seq`'s metric lives on the device (KV-Compress on a GPU after prefill; `None`: plan on
    /// the host with [`Self::compress_now`]). Several sequences' requests go to one
    /// [`PagedCache::evict_on_device`] call; report each result with
    /// [`Hooks::device_evicted`].
    pub fn device_request(&self, cache: &PagedCache, seq: SeqId) -> Result<Option<DeviceEvict>> {
        self.device
            .map(|d| device_request(cache, seq, d))
            .transpose()
    }

    /// Right after `seq` was prefilled with `context` under these hooks: the policy's extra
    /// forward passes ([`Policy::forward_scores`]), their scores kept pending like observed
    /// ones (every budget's fork copies them). Returns their wall time in ms (0 without them).
    pub fn score_by_forwards(
        &mut self,
        model: &mut Llama,
        cache: &mut PagedCache,
        seq: SeqId,
        context: &[u32],
        piece: usize,
    ) -> Result<f64> {
        let t = std::time::Instant::now();
        let Some(scores) = self
            .policy
            .forward_scores(model, cache, seq, context, piece)?
        else {
            return Ok(0.0);
        };
        for (p, d) in self.pending.iter_mut().zip(scores) {
            accumulate(p, d);
        }
        model.device.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// Adds the policy's key (and value) scores of every (layer, kv-head) of `seq` to its
    /// metric; the query statistics are dropped afterwards.
    fn score_keys(&mut self, cache: &mut PagedCache, seq: SeqId) -> Result<()> {
        let probed = self.policy.prefill_probe() == Probe::Queries;
        let queries = std::mem::take(&mut self.queries);
        let reweights = self.policy.reweights();
        if reweights && self.out_proj.len() != cache.spec().layers {
            candle_core::bail!(
                "this method reweights by the output projection, which the runner did not hand the hooks (CompressHooks::with_out_proj)"
            );
        }
        let kv_heads = cache.spec().kv_heads;
        let mut metrics = if reweights {
            cache.seq_meta(seq)?.into_iter().map(|(m, _)| m).collect()
        } else {
            Vec::new()
        }
        .into_iter();
        for l in 0..cache.spec().layers {
            let metric: Vec<Vec<f32>> = (&mut metrics).take(kv_heads).collect();
            let heads = cache.head_kv(l, seq)?;
            let positions: Vec<Vec<u32>> = (0..heads.len())
                .map(|h| cache.slot_positions(l, seq, h))
                .collect();
            let scores = self.policy.key_scores(&LayerKeys {
                heads: &heads,
                positions: &positions,
                seq_len: cache.seq_len(seq),
                queries: queries.get(l).filter(|_| probed),
                layer: l,
                budget: self.budget,
                metric: &metric,
                out_proj: self.out_proj.get(l),
            })?;
            for (h, s) in scores.iter().enumerate() {
                cache.add_metric(l, seq, h, s)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, cache: &mut PagedCache, seq: SeqId) -> Result<()> {
        for (l, p) in self.pending.iter_mut().enumerate() {
            if let Some(heads) = p.take() {
                for (h, d) in heads.iter().enumerate() {
                    cache.add_metric(l, seq, h, d)?;
                }
            }
        }
        Ok(())
    }

    fn compress(&mut self, cache: &mut PagedCache, seq: SeqId) -> Result<()> {
        if let Some(b) = self.budget {
            let plan = plan_of(self.policy, self.ranks.as_ref(), cache, seq, b, self.phase)?;
            self.kept.evicted += cache.evict(seq, &plan)?.evicted;
        }
        Ok(())
    }
}

/// `policy`'s plan for `seq` of `cache` at `budget` tokens per head: alone, or as one rank of
/// `ranks`' group ([`super::ranks::plan_on_rank`]).
fn plan_of(
    policy: &dyn Policy,
    ranks: Option<&RankExchange>,
    cache: &PagedCache,
    seq: SeqId,
    budget: usize,
    phase: Phase,
) -> Result<EvictionPlan> {
    let view = SeqView::of(cache, seq)?;
    match ranks {
        Some(x) => plan_on_rank(policy, &view, budget, phase, x),
        None => Ok(policy.plan(&view, budget, phase)),
    }
}

/// What KV-Compress's device evictor must take from `seq` now: the blocks it holds beyond
/// its allowance, its last `protected` positions kept (what [`Policy::plan`] of KV-Compress
/// evicts on the host).
fn device_request(cache: &PagedCache, seq: SeqId, d: DeviceStepSpec) -> Result<DeviceEvict> {
    let held = cache
        .pool()
        .seq_blocks(seq)
        .map_err(candle_core::Error::wrap)?;
    Ok(DeviceEvict {
        seq,
        n_evict: held.saturating_sub(d.allowed_blocks),
        first_protected: cache.seq_len(seq).saturating_sub(d.protected) as u32,
        crush: d.crush,
    })
}

/// Add one layer's increments `d` (per kv-head, in slot order) to its pending ones. A later
/// prefill chunk's observation covers its new slots too (slots are appended in order during
/// prefill), so a shorter pending vector grows.
fn accumulate(pending: &mut Option<Vec<Vec<f32>>>, d: Vec<Vec<f32>>) {
    match pending {
        Some(acc) => {
            for (a, x) in acc.iter_mut().zip(d) {
                if a.len() < x.len() {
                    a.resize(x.len(), 0.0);
                }
                for (a, x) in a.iter_mut().zip(x) {
                    *a += x;
                }
            }
        }
        slot => *slot = Some(d),
    }
}

fn paged(cache: &mut dyn CacheBackend) -> Result<&mut PagedCache> {
    let name = cache.name();
    cache.as_paged_mut().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "compression needs the paged cache, got the `{name}` backend"
        ))
    })
}

impl Hooks for CompressHooks<'_> {
    fn prefill_probe(&self) -> Probe {
        self.policy.prefill_probe()
    }

    fn prefill_probe_splits(&self) -> bool {
        self.policy.score_splits()
    }

    fn decode_probe(&self) -> Probe {
        let scored = match self.on_demand {
            Some(score) => score,
            None => self.policy.continual(),
        };
        if self.budget.is_some() && scored && self.device.is_none() {
            self.policy.decode_probe()
        } else {
            Probe::None
        }
    }

    fn observe(
        &mut self,
        layer: usize,
        probs: &Tensor,
        cache: &dyn CacheBackend,
        seq: SeqId,
    ) -> Result<()> {
        if self.phase == Phase::Prefill && self.policy.prefill_probe() == Probe::Queries {
            // `probs` holds the layer's pre-RoPE queries of this chunk.
            let skip = self.policy.queries_skipped();
            return self.queries[layer].add(probs, skip);
        }
        let nkv = cache
            .as_paged()
            .map(|c| c.spec().kv_heads)
            .unwrap_or_default();
        let positions: Vec<Vec<u32>> = (0..nkv)
            .map(|h| cache.slot_positions(layer, seq, h))
            .collect();
        let d = self.policy.score(self.phase, probs, &positions)?;
        accumulate(&mut self.pending[layer], d);
        Ok(())
    }

    fn after_prefill(&mut self, cache: &mut dyn CacheBackend, seq: SeqId) -> Result<()> {
        let cache = paged(cache)?;
        self.flush(cache, seq)?;
        let prompt = cache.seq_len(seq);
        self.budget = (self.budget_of)(prompt).map(|b| b.max(self.policy.min_budget()));
        if self.policy.scores_keys() {
            self.score_keys(cache, seq)?;
        }
        // KV-Compress on a GPU evicts on the device from here on, this first compression
        // included (the same selection as its host plan, without snapshotting every head;
        // KVCrush's block form adds its picks to it, `Policy::device_prefill`). On demand
        // (the benchmark) too when decode attention is scored: the decode kernel adds the
        // metric on the device, so no probabilities are copied to the host.
        let bs = cache.spec().block_size;
        let device = match (self.budget, self.on_demand) {
            (Some(b), None | Some(true)) if cache.device_compression() && self.ranks.is_none() => {
                self.policy.device_step(b, bs).map(|d| (b, d))
            }
            _ => None,
        };
        match device {
            Some((b, d)) => {
                match self.policy.device_prefill(b, bs) {
                    Some(p) => {
                        cache.keep_metric_on_device(seq)?;
                        let st = cache.evict_on_device(&[device_request(cache, seq, p)?])?;
                        self.device_evicted(st[0]);
                    }
                    None => {
                        self.compress(cache, seq)?;
                        cache.keep_metric_on_device(seq)?;
                    }
                }
                if self.policy.continual() || self.on_demand.is_some() {
                    self.device = Some(d);
                }
            }
            None => self.compress(cache, seq)?,
        }
        let pool = cache.pool();
        self.kept.prompt_tokens = prompt;
        self.kept.budget = self.budget;
        self.kept.per_head = (0..pool.layers())
            .map(|l| {
                (0..pool.kv_heads())
                    .map(|h| pool.len(l, seq, h).unwrap_or(0))
                    .collect()
            })
            .collect();
        if let Some(x) = &self.ranks {
            self.kept.per_head = gather_per_head(x, &self.kept.per_head)?;
        }
        self.phase = Phase::Decode;
        Ok(())
    }

    fn after_step(&mut self, cache: &mut dyn CacheBackend, seq: SeqId) -> Result<()> {
        // The work borrows `self` until the match ends, so the host plan is made inside it
        // and both kinds of work run after it (Ok: a host plan, Err: a device request).
        let plan = match self.step_plan(cache, seq)? {
            Some(StepWork::Plan(planner) | StepWork::Ordered(planner)) => {
                Ok(planner(paged(cache)?)?)
            }
            Some(StepWork::Device(r)) => Err(r),
            None => return Ok(()),
        };
        match plan {
            Ok(plan) => self.apply_step_plan(cache, seq, plan),
            Err(r) => {
                let st = paged(cache)?.evict_on_device(&[r])?;
                self.device_evicted(st[0]);
                Ok(())
            }
        }
    }

    fn step_plan(
        &mut self,
        cache: &mut dyn CacheBackend,
        seq: SeqId,
    ) -> Result<Option<StepWork<'_>>> {
        let cache = paged(cache)?;
        self.flush(cache, seq)?;
        let (Some(budget), None, true) = (self.budget, self.on_demand, self.policy.continual())
        else {
            return Ok(None);
        };
        if let Some(d) = self.device {
            let r = device_request(cache, seq, d)?;
            return Ok((r.n_evict > 0).then_some(StepWork::Device(r)));
        }
        let (policy, phase, ranks) = (self.policy, self.phase, self.ranks.clone());
        let ordered = ranks.is_some();
        let planner: StepPlanner = Box::new(move |c: &dyn CacheBackend| {
            let c = c.as_paged().ok_or_else(|| {
                candle_core::Error::Msg("step compression needs the paged cache".into())
            })?;
            plan_of(policy, ranks.as_ref(), c, seq, budget, phase)
        });
        // A rank's plan meets the other ranks in collectives: in sequence order, one thread.
        Ok(Some(if ordered {
            StepWork::Ordered(planner)
        } else {
            StepWork::Plan(planner)
        }))
    }

    fn apply_step_plan(
        &mut self,
        cache: &mut dyn CacheBackend,
        seq: SeqId,
        plan: EvictionPlan,
    ) -> Result<()> {
        self.kept.evicted += paged(cache)?.evict(seq, &plan)?.evicted;
        Ok(())
    }

    fn device_evicted(&mut self, stats: EvictStats) {
        self.kept.evicted += stats.evicted;
    }

    /// Decode steps are observed (a scored probe), or compress continually (on the host or
    /// the device), or score on demand (the benchmark's device metric).
    fn steps_question(&self) -> bool {
        let continual = self.budget.is_some() && self.policy.continual();
        self.decode_probe() != Probe::None
            || continual
            || self.device.is_some()
            || self.on_demand.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evict_lowest_is_the_prefix_of_the_full_sort() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for n in [1usize, 2, 7, 40, 300] {
            for _ in 0..20 {
                // Few distinct values, so ties are common.
                let m: Vec<f32> = (0..n).map(|_| rng.random_range(0..5) as f32).collect();
                let prot: Vec<bool> = (0..n).map(|_| rng.random_bool(0.2)).collect();
                let keep = rng.random_range(0..=n);
                let mut want: Vec<usize> = (0..n).filter(|&i| !prot[i]).collect();
                want.sort_by(|&a, &b| m[a].total_cmp(&m[b]).then(a.cmp(&b)));
                want.truncate((n - keep).min(want.len()));
                if n <= keep {
                    want.clear();
                }
                assert_eq!(evict_lowest(&m, &prot, keep), want, "n {n} keep {keep}");
            }
        }
    }

    #[test]
    fn evict_lowest_keeps_protected_and_top() {
        let m = [5.0, 1.0, 3.0, 0.5, 9.0, 2.0];
        let prot = [false, false, false, true, false, false];
        assert_eq!(evict_lowest(&m, &prot, 3), vec![1, 5, 2]);
        // protected slots survive even when they cannot all fit
        assert_eq!(evict_lowest(&m, &[true; 6], 2), Vec::<usize>::new());
        assert_eq!(evict_lowest(&m, &prot, 10), Vec::<usize>::new());
    }
}
