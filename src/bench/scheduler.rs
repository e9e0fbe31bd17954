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
//! Departures from the paper's vLLM scheduler: prefills are batched only across requests of
//! equal context length (vLLM packs any prompts up to a token budget); the admission headroom is one block per
//! (layer, kv-head) and running sequence instead of vLLM's 1 % watermark (KV-Compress blocks are
//! per head, so a step can need up to `layers x kv_heads` new blocks per sequence); compression
//! planning runs on the host ([`crate::kvcache::paged`]). A preempted sequence's budget is
//! computed again from its recomputed context (prompt + output so far).
use candle_core::{Result, Tensor};
use std::collections::VecDeque;
use std::time::Instant;

use crate::compress::policy::{CompressHooks, Policy};
use crate::engine::{self, prefill_chunks, Hooks};
use crate::kvcache::budget::{allowed_blocks, tokens_for_rate};
use crate::kvcache::paged::{PagedCache, PagedSpec};
use crate::kvcache::{CacheBackend, Probe, SeqId};
use crate::model::Llama;

/// Settings of one scheduler run.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Compression rate; `<= 1` is the full cache (no eviction, no hooks).
    pub rate: f64,
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
    let mc = model.cfg.clone();
    let spec = PagedSpec {
        layers: mc.num_hidden_layers,
        kv_heads: mc.num_key_value_heads,
        head_dim: mc.head_dim,
        block_size: cfg.block_size,
        dtype: model.dtype,
        device: model.device.clone(),
    };
    let heads = spec.layers * spec.kv_heads;
    let mut cache = PagedCache::new(spec.clone(), cfg.num_blocks)?;
    let compressing = cfg.rate > 1.0 && policy.is_some();
    let (bs, floor, rate) = (cfg.block_size, cfg.min_cache_tokens, cfg.rate);
    let budget_of = move |len: usize| tokens_for_rate(len, rate, bs, floor);
    let min_budget = policy.map_or(0, |p| p.min_budget());
    let budget_blocks = |len: usize| {
        budget_of(len).map(|m| allowed_blocks(m.max(min_budget), spec.layers, spec.kv_heads, bs))
    };

    let mut st = SchedStats {
        total_blocks: cfg.num_blocks,
        ..Default::default()
    };
    let mut outputs: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    let mut waiting: VecDeque<Req> = (0..prompts.len())
        .map(|idx| Req {
            idx,
            output: Vec::new(),
        })
        .collect();
    let mut running: Vec<Running<'_>> = Vec::new();
    let mut paused = false;
    let mut batch_sum = 0usize;
    let on_cuda = model.device.is_cuda();
    let t0 = Instant::now();

    let finish = |req: Req, outputs: &mut Vec<Option<Vec<u32>>>, st: &mut SchedStats| {
        st.requests += 1;
        st.prompt_tokens += prompts[req.idx].len() as u64;
        st.output_tokens += req.output.len() as u64;
        outputs[req.idx] = Some(req.output);
    };

    while !waiting.is_empty() || !running.is_empty() {
        // 1. Admissions: a group of waiting requests with one context length, prefilled
        // together.
        while !paused && running.len() < cfg.max_batch.max(1) {
            let Some(head) = waiting.front() else { break };
            let ctx_len = |r: &Req| prompts[r.idx].len() + r.output.len();
            let len = ctx_len(head);
            let full = spec.blocks_for_tokens(len);
            let after = if compressing {
                budget_blocks(len).unwrap_or(full).min(full)
            } else {
                full
            };
            let free = cache.pool().free_blocks();
            // The whole group holds its full prompts until the compression after prefill.
            let fits =
                |n: usize| free >= n * full && free - n * after >= (running.len() + n) * heads;
            let mut k = 0;
            while k < cfg.prefill_batch.max(1)
                && running.len() + k < cfg.max_batch.max(1)
                && k < waiting.len()
                && ctx_len(&waiting[k]) == len
                && fits(k + 1)
            {
                k += 1;
            }
            if k == 0 {
                if running.is_empty() && free < full {
                    candle_core::bail!(
                        "a {len}-token sequence needs {full} blocks to prefill but the pool has {free} free of {}",
                        cfg.num_blocks
                    );
                }
                if !running.is_empty() {
                    break;
                }
                k = 1; // alone, without headroom: the decode step will compress or fail clearly
            }
            let group: Vec<Req> = waiting.drain(..k).collect();
            let ctxs: Vec<Vec<u32>> = group
                .iter()
                .map(|r| {
                    prompts[r.idx]
                        .iter()
                        .chain(r.output.iter())
                        .copied()
                        .collect()
                })
                .collect();
            let mut seqs = Vec::with_capacity(k);
            let mut hooks = Vec::with_capacity(k);
            for _ in 0..k {
                seqs.push(cache.add_sequence()?);
                hooks.push(compressing.then(|| {
                    CompressHooks::new(policy.expect("compressing"), spec.layers, &budget_of)
                        .on_demand(cfg.score_decode)
                }));
            }
            let probe = hooks[0].as_ref().map_or(Probe::None, |h| h.prefill_probe());
            let min_last = match probe {
                Probe::LastQueries(w) => w,
                _ => 1,
            };
            let tp = Instant::now();
            let mut logits = None;
            let chunks = prefill_chunks(len, cfg.prefill_chunk, min_last);
            for (i, r) in chunks.iter().enumerate() {
                let p = if i + 1 == chunks.len() {
                    probe
                } else {
                    Probe::None
                };
                let rows: Vec<&[u32]> = ctxs.iter().map(|c| &c[r.clone()]).collect();
                let mut observe = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
                    for (row, (h, &seq)) in hooks.iter_mut().zip(&seqs).enumerate() {
                        if let Some(h) = h {
                            h.observe(layer, &probs.narrow(0, row, 1)?, c, seq)?;
                        }
                    }
                    Ok(())
                };
                logits =
                    Some(model.forward_prefill_batch(&rows, &seqs, &mut cache, p, &mut observe)?);
            }
            let next = Llama::argmax_rows(&logits.expect("non-empty prompt"))?;
            st.prefill_ms += tp.elapsed().as_secs_f64() * 1e3;
            st.prefill_batches += 1;
            st.peak_blocks = st.peak_blocks.max(cache.pool().used_blocks());
            for (((mut req, seq), mut hooks), next) in
                group.into_iter().zip(seqs).zip(hooks).zip(next)
            {
                let mut allowed = None;
                if let Some(h) = &mut hooks {
                    let tc = Instant::now();
                    let before = h.kept.evicted;
                    h.after_prefill(&mut cache, seq)?;
                    st.evicted_slots += (h.kept.evicted - before) as u64;
                    st.compress_ms += tc.elapsed().as_secs_f64() * 1e3;
                    allowed = h
                        .budget()
                        .map(|m| allowed_blocks(m, spec.layers, spec.kv_heads, bs));
                }
                req.output.push(next);
                if req.output.len() >= cfg.output_len {
                    cache.remove_sequence(seq)?;
                    finish(req, &mut outputs, &mut st);
                    on_finish(st.requests);
                } else {
                    running.push(Running {
                        req,
                        seq,
                        hooks,
                        next,
                        allowed,
                    });
                }
            }
            if cfg.check_invariants {
                cache.pool().check().map_err(candle_core::Error::Msg)?;
            }
        }
        paused = false;
        if running.is_empty() {
            continue;
        }

        // 2. Room for one decode step (compress at most once per step: a second round could
        // not free more).
        let mut compressed = false;
        loop {
            let need: usize = running.iter().map(|r| step_need(&cache, r.seq)).sum();
            if need <= cache.pool().free_blocks() {
                break;
            }
            paused = true;
            let over: Vec<usize> = (0..running.len())
                .filter(|_| !compressed)
                .filter(|&i| {
                    let r = &running[i];
                    r.hooks.is_some()
                        && r.allowed
                            .is_some_and(|a| cache.pool().seq_blocks(r.seq).unwrap_or(0) > a)
                })
                .collect();
            if !over.is_empty() {
                let tc = Instant::now();
                for i in over {
                    let r = &mut running[i];
                    let h = r.hooks.as_mut().expect("filtered");
                    st.evicted_slots += h.compress_now(&mut cache, r.seq)? as u64;
                    st.compressed_seqs += 1;
                }
                st.compress_ms += tc.elapsed().as_secs_f64() * 1e3;
                st.compress_rounds += 1;
                compressed = true;
                continue;
            }
            if running.len() > 1 {
                let r = running.pop().expect("len > 1");
                cache.remove_sequence(r.seq)?;
                waiting.push_front(r.req);
                st.preemptions += 1;
                continue;
            }
            candle_core::bail!(
                "the KV pool ({} blocks) cannot hold one sequence: a decode step needs {need} blocks, {} are free",
                cfg.num_blocks,
                cache.pool().free_blocks()
            );
        }

        // 3. One decode step over the whole batch.
        let td = Instant::now();
        let tokens: Vec<u32> = running.iter().map(|r| r.next).collect();
        let seqs: Vec<SeqId> = running.iter().map(|r| r.seq).collect();
        let probe = running
            .iter()
            .find_map(|r| r.hooks.as_ref().map(|h| h.decode_probe()))
            .unwrap_or(Probe::None);
        let logits = {
            let running = &mut running;
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
                model, &mut cache, &tokens, &seqs, probe, &mut times, &mut score,
            )?
        };
        let next = Llama::argmax_rows(&logits)?;
        st.decode_ms += td.elapsed().as_secs_f64() * 1e3;
        st.decode_steps += 1;
        batch_sum += running.len();
        st.max_batch = st.max_batch.max(running.len());
        st.peak_blocks = st.peak_blocks.max(cache.pool().used_blocks());
        if on_cuda {
            if let Some((free, total)) = crate::cuda::device_memory(&model.device)? {
                let used = total - free;
                st.peak_device_bytes = Some(st.peak_device_bytes.unwrap_or(0).max(used));
            }
        }
        let mut keep = Vec::with_capacity(running.len());
        for (mut r, tok) in running.drain(..).zip(next) {
            if let Some(h) = &mut r.hooks {
                h.after_step(&mut cache, r.seq)?;
            }
            r.req.output.push(tok);
            r.next = tok;
            if r.req.output.len() >= cfg.output_len {
                cache.remove_sequence(r.seq)?;
                finish(r.req, &mut outputs, &mut st);
                on_finish(st.requests);
            } else {
                keep.push(r);
            }
        }
        running = keep;
        if cfg.check_invariants {
            cache.pool().check().map_err(candle_core::Error::Msg)?;
        }
    }
    st.elapsed_s = t0.elapsed().as_secs_f64();
    st.mean_batch = if st.decode_steps == 0 {
        0.0
    } else {
        batch_sum as f64 / st.decode_steps as f64
    };
    Ok(SchedOutput {
        stats: st,
        outputs: outputs
            .into_iter()
            .map(|o| o.expect("every request finishes"))
            .collect(),
    })
}
