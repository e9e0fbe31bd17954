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

use crate::kvcache::{CacheBackend, Probe, SeqId};
use crate::model::Llama;

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

/// The result of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub output_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Logits after the prompt `[vocab]` (first decoding step).
    #[serde(skip)]
    pub first_logits: Option<Vec<f32>>,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Extension points for compression methods.
pub trait Hooks {
    /// Queries to probe during prefill (e.g. the observation window).
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    /// Queries to probe during decode steps.
    fn decode_probe(&self) -> Probe {
        Probe::None
    }
    /// Attention probabilities of probed queries, per layer.
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

/// Greedy generation of one sequence.
pub fn generate(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    prompt: &[u32],
    params: &GenParams,
    hooks: &mut dyn Hooks,
) -> Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!("empty prompt");
    }
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
    decode(model, cache, seq, &pre, params, hooks)
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
    /// Wall time of the prefill forward passes.
    pub ms: f64,
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
    let min_last = match probe {
        Probe::LastQueries(w) => w,
        _ => 1,
    };
    let chunks = prefill_chunks(prompt.len(), params.prefill_chunk, min_last);
    let mut logits = None;
    for (i, r) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let p = if last { probe } else { Probe::None };
        let mut observe = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
            hooks.observe(layer, probs, c, seq)
        };
        let l = model.forward(&prompt[r.clone()], seq, cache, p, &mut observe);
        logits = Some(l?);
    }
    Ok(Prefilled {
        logits: logits.expect("non-empty prompt"),
        prompt_len: prompt.len(),
        ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// Continue from a prefill: [`Hooks::after_prefill`] (compression; its time counts as
/// prefill time, added to `pre.ms`), then greedy decoding.
pub fn decode(
    model: &mut Llama,
    cache: &mut dyn CacheBackend,
    seq: SeqId,
    pre: &Prefilled,
    params: &GenParams,
    hooks: &mut dyn Hooks,
) -> Result<Generation> {
    let t0 = Instant::now();
    hooks.after_prefill(cache, seq)?;
    let prefill_ms = pre.ms + t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mut logits = pre.logits.clone();
    let first_logits = Some(logits.to_vec1::<f32>()?);
    let mut out = Vec::new();
    let mut pos = pre.prompt_len;
    let finish = loop {
        let next = Llama::argmax(&logits)?;
        out.push(next);
        pos += 1;
        if params.stop_ids.contains(&next) && out.len() >= params.min_new_tokens.max(1) {
            break FinishReason::Stop;
        }
        if out.len() >= params.max_new_tokens {
            break FinishReason::Length;
        }
        if pos >= params.max_context {
            break FinishReason::Context;
        }
        let probe = hooks.decode_probe();
        let mut observe = |layer: usize, probs: &Tensor, c: &dyn CacheBackend| {
            hooks.observe(layer, probs, c, seq)
        };
        logits = model.forward(&[next], seq, cache, probe, &mut observe)?;
        hooks.after_step(cache, seq)?;
    };
    Ok(Generation {
        output_ids: out,
        finish_reason: finish,
        first_logits,
        prefill_ms,
        decode_ms: t1.elapsed().as_secs_f64() * 1e3,
    })
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
}
