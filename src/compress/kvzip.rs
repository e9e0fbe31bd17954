//! KVzip (Kim et al., 2025), as kvpress's `KVzipPress` (0.5.5) runs it: query-agnostic scores
//! from asking the model to repeat its context, then one ranking over every layer and kv-head.
//!
//! How it runs in kvc:
//! - **Who builds the repeat ids.** The tokenizer and chat template live in the model layer, the
//!   runner sees only ids, so the CLI tokenizes KVzip's texts once per run
//!   ([`RepeatTexts::new`], carried in [`super::MethodOptions::kvzip_text`]): for the chat
//!   template, the ids of its text before the user's content (`prefix`) and between the content
//!   and the answer (`suffix`), derived as kvpress does from a dummy message; without it,
//!   `prefix` is what the tokenizer adds to raw text (its BOS) and `suffix` is `"\n"`. A prompt
//!   is treated as chat when its ids start with the template's prefix (LongBench leaves some
//!   subsets out of the template, so the run's chat mode alone does not say). Library callers
//!   that give no texts get empty ones: the repeat input is then the chunk alone.
//! - **The repeat passes** ([`Policy::forward_scores`], run by the runner between
//!   [`crate::engine::prefill`] and the compression; the scores do not depend on the budget, so
//!   a shared prefill runs them once for every rate). The context after `prefix` is cut in
//!   chunks of 2048 ids; chunk `i`'s repeat input is `q + suffix + chunk`, `q` the ids of
//!   "\n\nRepeat the previous context exactly." for the first chunk, else of "\n\nRepeat the
//!   part of the previous context exactly, starting with" and the previous chunk's last 8 ids.
//!   It runs through [`Llama::forward`] on top of the cached context (positions continue after
//!   it), in pieces of the prefill chunk, with [`Probe::Queries`]: each layer hands its pre-RoPE
//!   queries to the scorer while the cache holds the context and the repeat keys so far.
//! - **Scores** ([`span_scores`]): the queries are rotated at their positions (f32, the model's
//!   RoPE frequencies) and attend, in f32 candle ops on the cache's device, to a subsampled key
//!   set: the first `min(4, start)` keys (sinks), the keys of the chunk's span `[start, end)`,
//!   and the repeat keys (causal among themselves); softmax over that set, scaled by
//!   `1/sqrt(d)`; a span key's score is its maximum over the repeat queries and over the query
//!   heads of its kv-head's group. Pieces of one repeat input take the maximum of their rows.
//!   As in kvpress, the scores start at 0 with the first 4 positions at 1.0, and each chunk's
//!   span overwrites its own; positions in `[4, prefix)` keep 0.
//! - **Removing the repeat KVs**: [`PagedCache::truncate_seq`] rolls every head back to the
//!   context's length after each repeat input (also when a pass fails), so the next repeat
//!   input, and decoding, start at the context's end again.
//! - **Eviction** ([`global_plan`], kvpress's default `layerwise=False`): one ranking of every
//!   (layer, kv-head, slot) of the sequence; the lowest go until `budget x layers x kv_heads`
//!   remain (kvc's equal-memory rule; kvpress prunes `numel x compression_ratio`), so heads
//!   and layers keep different counts, and a head may keep nothing. Compresses once.
//!
//! Departures: scores in f32 (kvpress scores in the model's dtype); ties in the ranking evict the
//! lower (layer, kv-head, slot) first (torch's `topk` leaves them unspecified); kvpress masks
//! evicted keys in attention, kvc removes them; `kvzip_plus_normalization` is not implemented
//! (off by default in kvpress); under LongBench's protocol the "context" repeated is the whole
//! prompt, question and answer header included (kvpress always compresses the context alone);
//! a raw (template-less) prompt starts with the tokenizer's BOS, which kvc counts as the prefix
//! (kvpress tokenizes its context without special tokens, so its raw prefix is empty).
use candle_core::{DType, Device, Result, Tensor, D};

use super::policy::{zero_scores, HeadView, Phase, Policy, SeqView};
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::paged::PagedCache;
use crate::kvcache::{CacheBackend, Probe, SeqId};
use crate::model::{chat, Config, Llama, ModelError, Tokenizer};

/// Context ids per repeat input.
pub const CHUNK: usize = 2048;
/// Leading positions scored 1.0 and kept as attention sinks in the subsampled keys.
pub const SINKS: usize = 4;
/// Ids of the previous chunk's end quoted in a later chunk's request.
pub const QUOTED: usize = 8;
const FIRST: &str = "\n\nRepeat the previous context exactly.";
const LATER: &str = "\n\nRepeat the part of the previous context exactly, starting with";

/// The tokenized texts of one prompt format (chat template or raw text).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RepeatText {
    /// The format's ids before the user's content (not scored by the repeat passes).
    pub prefix: Vec<u32>,
    /// The first chunk's request.
    pub first: Vec<u32>,
    /// A later chunk's request (the previous chunk's last ids follow it).
    pub later: Vec<u32>,
    /// The format's ids between the user's content and the answer.
    pub suffix: Vec<u32>,
}

/// KVzip's texts for both prompt formats of a model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RepeatTexts {
    /// Through the chat template (`None`: the model has none).
    pub chat: Option<RepeatText>,
    /// Raw text.
    pub plain: RepeatText,
}

impl RepeatTexts {
    /// The texts of `tok` (and its chat template), tokenized as kvpress does (no special
    /// tokens added, except the raw format's prefix, which is what kvc's raw prompts start with).
    pub fn new(tok: &Tokenizer) -> std::result::Result<Self, ModelError> {
        let first = tok.encode(FIRST, false)?;
        let later = tok.encode(LATER, false)?;
        let plain = RepeatText {
            prefix: tok.encode("", true)?,
            first: first.clone(),
            later: later.clone(),
            suffix: tok.encode("\n", false)?,
        };
        let chat = match tok.chat_template.as_deref() {
            None => None,
            Some(tpl) => {
                let (prefix, suffix) = template_parts(tok, tpl)?;
                Some(RepeatText {
                    prefix: tok.encode(&prefix, false)?,
                    first,
                    later,
                    suffix: tok.encode(&suffix, false)?,
                })
            }
        };
        Ok(RepeatTexts { chat, plain })
    }

    /// The format of a prompt whose context is `context`: chat when it starts with the
    /// template's prefix.
    pub fn of(&self, context: &[u32]) -> &RepeatText {
        match &self.chat {
            Some(c) if !c.prefix.is_empty() && context.starts_with(&c.prefix) => c,
            _ => &self.plain,
        }
    }
}

/// The chat template's text before and after a user turn's content (kvpress: a dummy content
/// followed by a separator, the rendering split at both).
fn template_parts(tok: &Tokenizer, tpl: &str) -> std::result::Result<(String, String), ModelError> {
    let dummy = "dummy context";
    let sep = format!("\n{}", "#".repeat(dummy.len()));
    let rendered = chat::render(
        tpl,
        &chat::user_turn(&format!("{dummy}{sep}")),
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )?;
    let (head, suffix) = rendered
        .split_once(&sep)
        .ok_or_else(|| ModelError::ChatTemplate("KVzip: the template drops the content".into()))?;
    let prefix = head.split(dummy).next().unwrap_or_default();
    Ok((prefix.to_string(), suffix.to_string()))
}

/// One repeat input: the span `[start, end)` of context positions it scores and its ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Repeat {
    pub start: usize,
    pub end: usize,
    pub ids: Vec<u32>,
}

/// The policy (see the module docs).
pub struct KvZip {
    pub text: RepeatTexts,
    /// The model's RoPE frequencies (`[head_dim / 2]`).
    pub inv_freq: Vec<f32>,
    /// Query heads per kv-head.
    pub group: usize,
}

impl KvZip {
    /// KVzip for a model of `cfg` with its texts (`text`; default: empty).
    pub fn new(cfg: &Config, text: RepeatTexts) -> Self {
        KvZip {
            text,
            inv_freq: cfg.rope.inv_freq(cfg.head_dim),
            group: cfg.num_attention_heads / cfg.num_key_value_heads.max(1),
        }
    }

    /// The repeat inputs of `context` (kvpress's `prepare`).
    pub fn repeats(&self, context: &[u32]) -> Vec<Repeat> {
        let text = self.text.of(context);
        let p = text.prefix.len().min(context.len());
        let chunks: Vec<&[u32]> = context[p..].chunks(CHUNK).collect();
        let mut out = Vec::with_capacity(chunks.len());
        let mut start = p;
        for (i, c) in chunks.iter().enumerate() {
            let mut ids = if i == 0 {
                text.first.clone()
            } else {
                let prev = chunks[i - 1];
                let mut q = text.later.clone();
                q.extend_from_slice(&prev[prev.len().saturating_sub(QUOTED)..]);
                q
            };
            ids.extend_from_slice(&text.suffix);
            ids.extend_from_slice(c);
            out.push(Repeat {
                start,
                end: start + c.len(),
                ids,
            });
            start += c.len();
        }
        out
    }

    /// Scores of `rep`'s span per `[layer][kv_head]`: its ids run on top of `seq` (holding the
    /// context, `ctx_len` tokens, nothing evicted) in pieces of `piece` ids; the cache is rolled
    /// back to the context afterwards, also on failure.
    fn repeat_pass(
        &self,
        model: &mut Llama,
        cache: &mut PagedCache,
        seq: SeqId,
        rep: &Repeat,
        piece: usize,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let ctx_len = cache.seq_len(seq);
        let (layers, nkv) = (cache.spec().layers, cache.spec().kv_heads);
        let span = rep.end - rep.start;
        let mut best = vec![vec![vec![0f32; span]; nkv]; layers];
        let mut done = 0;
        let mut run = || -> Result<()> {
            for ids in rep.ids.chunks(piece.max(1)) {
                let tables =
                    PieceTables::new(&self.inv_freq, rep, ctx_len, done, ids.len(), &model.device)?;
                let mut observe = |l: usize, q: &Tensor, c: &dyn CacheBackend| {
                    let c = c.as_paged().ok_or_else(|| {
                        candle_core::Error::Msg("KVzip needs the paged cache".into())
                    })?;
                    let s = self.layer_scores(q, c, seq, l, rep, ctx_len, done, &tables)?;
                    for (b, s) in best[l].iter_mut().zip(s) {
                        for (b, s) in b.iter_mut().zip(s) {
                            *b = b.max(s);
                        }
                    }
                    Ok(())
                };
                model.forward(ids, seq, cache, Probe::Queries, &mut observe)?;
                done += ids.len();
            }
            Ok(())
        };
        let r = run();
        cache.truncate_seq(seq, ctx_len)?;
        r.map(|_| best)
    }

    /// One layer's scores of `rep`'s span per kv-head, from its pre-RoPE queries `q`
    /// `[1, heads, t, d]` of the repeat ids `done..done + t` (the cache holds the context and
    /// the repeat keys up to them); `tables` are the piece's ([`PieceTables`]).
    #[allow(clippy::too_many_arguments)]
    fn layer_scores(
        &self,
        q: &Tensor,
        cache: &PagedCache,
        seq: SeqId,
        layer: usize,
        rep: &Repeat,
        ctx_len: usize,
        done: usize,
        tables: &PieceTables,
    ) -> Result<Vec<Vec<f32>>> {
        let t = q.dim(2)?;
        let q = q.to_dtype(DType::F32)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, &tables.cos, &tables.sin)?.squeeze(0)?;
        let sink = SINKS.min(rep.start);
        let span = rep.end - rep.start;
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let heads = cache.head_kv(layer, seq)?;
        heads
            .iter()
            .enumerate()
            .map(|(g, (k, _))| {
                if k.dim(0)? != ctx_len + done + t {
                    candle_core::bail!("KVzip: layer {layer} kv-head {g} lost keys before scoring");
                }
                let k = k.to_dtype(DType::F32)?;
                let keys = Tensor::cat(
                    &[
                        k.narrow(0, 0, sink)?,
                        k.narrow(0, rep.start, span)?,
                        k.narrow(0, ctx_len, done + t)?,
                    ],
                    0,
                )?;
                let qg = q.narrow(0, g * self.group, self.group)?;
                span_scores_masked(&qg, &keys, &tables.mask, sink, span, scale)?.to_vec1::<f32>()
            })
            .collect()
    }
}

/// What every layer and kv-head of one repeat piece share, made once per piece: the RoPE
/// tables of its queries and the causal mask of its subsampled keys.
struct PieceTables {
    /// cos and sin `[t, d/2]` f32 of the positions `ctx_len + done ..` (the angles computed as
    /// the model's tables are, in f32), for a half rotation.
    cos: Tensor,
    sin: Tensor,
    /// [`causal_tail_mask`] of the piece's queries over the sinks, the span and the repeat keys.
    mask: Tensor,
}

impl PieceTables {
    /// The tables of the `t` repeat ids `done..done + t` of `rep`, on top of a context of
    /// `ctx_len` tokens.
    fn new(
        inv_freq: &[f32],
        rep: &Repeat,
        ctx_len: usize,
        done: usize,
        t: usize,
        dev: &Device,
    ) -> Result<Self> {
        let pos0 = ctx_len + done;
        let angles: Vec<f32> = (pos0..pos0 + t)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let a = Tensor::from_vec(angles, (t, inv_freq.len()), dev)?;
        let fixed = SINKS.min(rep.start) + rep.end - rep.start;
        Ok(PieceTables {
            cos: a.cos()?,
            sin: a.sin()?,
            mask: causal_tail_mask(t, fixed + done + t, fixed, done, dev)?,
        })
    }
}

/// KVzip's score of each span key for one kv-head: `q` `[group, t, d]` f32 rotated queries of
/// repeat ids `done..done + t`; `keys` `[sink + span + done + t, d]` f32 the subsampled keys
/// (sinks, the span, the repeat keys `0..done + t`). Softmax of `q k^T * scale` over the keys,
/// repeat key `j` visible to query `i` iff `j <= done + i`; returns `[span]`: each span column's
/// maximum over queries and heads.
pub fn span_scores(
    q: &Tensor,
    keys: &Tensor,
    sink: usize,
    span: usize,
    done: usize,
    scale: f64,
) -> Result<Tensor> {
    let (_, t, _) = q.dims3()?;
    let mask = causal_tail_mask(t, keys.dim(0)?, sink + span, done, q.device())?;
    let (q, keys) = (q.to_dtype(DType::F32)?, keys.to_dtype(DType::F32)?);
    span_scores_masked(&q, &keys, &mask, sink, span, scale)
}

/// [`span_scores`] with its mask given (`[t, keys]`, [`causal_tail_mask`]).
fn span_scores_masked(
    q: &Tensor,
    keys: &Tensor,
    mask: &Tensor,
    sink: usize,
    span: usize,
    scale: f64,
) -> Result<Tensor> {
    let logits = (q.broadcast_matmul(&keys.t()?)? * scale)?;
    let p = candle_nn::ops::softmax_last_dim(&logits.broadcast_add(mask)?)?;
    p.narrow(2, sink, span)?.max(1)?.max(0)
}

/// Additive mask `[t, n]`: 0 for the first `fixed` columns; column `fixed + j` is 0 for row
/// `i` iff `j <= done + i`, else -inf.
fn causal_tail_mask(t: usize, n: usize, fixed: usize, done: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..n).map(move |c| {
                if c < fixed || c - fixed <= done + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(m, (t, n), dev)
}

/// KVzip's eviction (see the module docs): the sequence keeps its `budget x heads` highest
/// metrics over every (layer, kv-head); ties evict the lower (layer, kv-head, slot) first.
/// Each head's evicted slots come in ascending metric order.
pub fn global_plan(view: &SeqView, budget: usize) -> EvictionPlan {
    let heads: Vec<&HeadView> = view.heads.iter().flatten().collect();
    let total: usize = heads.iter().map(|h| h.len()).sum();
    let keep = budget.saturating_mul(heads.len());
    if total <= keep {
        return EvictionPlan::default();
    }
    let mut all: Vec<(f32, usize, usize)> = heads
        .iter()
        .enumerate()
        .flat_map(|(k, h)| h.metric.iter().enumerate().map(move |(i, &m)| (m, k, i)))
        .collect();
    let n = total - keep;
    let cheaper = |a: &(f32, usize, usize), b: &(f32, usize, usize)| {
        a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
    };
    if n < all.len() {
        all.select_nth_unstable_by(n, cheaper);
    }
    all.truncate(n);
    all.sort_by(cheaper);
    let mut evicted = vec![Vec::new(); heads.len()];
    for (_, k, i) in all {
        evicted[k].push(i);
    }
    EvictionPlan::from_heads(evicted, view.heads.first().map_or(0, Vec::len))
}

impl Policy for KvZip {
    fn prefill_probe(&self) -> Probe {
        Probe::None
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(zero_scores(positions))
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        if phase == Phase::Decode {
            return EvictionPlan::default();
        }
        global_plan(view, budget)
    }
    fn min_budget(&self) -> usize {
        1
    }
    fn scratch_tokens(&self, prompt_len: usize) -> usize {
        let texts = self.text.chat.iter().chain([&self.text.plain]);
        let request = texts
            .map(|t| t.first.len().max(t.later.len() + QUOTED) + t.suffix.len())
            .max()
            .unwrap_or(0);
        prompt_len.min(CHUNK) + request
    }
    fn forward_scores(
        &self,
        model: &mut Llama,
        cache: &mut PagedCache,
        seq: SeqId,
        context: &[u32],
        piece: usize,
    ) -> Result<Option<Vec<Vec<Vec<f32>>>>> {
        let (layers, nkv) = (cache.spec().layers, cache.spec().kv_heads);
        let len = context.len();
        let whole = (0..layers).all(|l| (0..nkv).all(|h| cache.kv_len(l, seq, h) == len));
        if cache.seq_len(seq) != len || !whole {
            candle_core::bail!("KVzip scores a freshly prefilled context of {len} tokens");
        }
        let init: Vec<f32> = (0..len)
            .map(|p| if p < SINKS { 1.0 } else { 0.0 })
            .collect();
        let mut scores = vec![vec![init; nkv]; layers];
        for rep in self.repeats(context) {
            let best = self.repeat_pass(model, cache, seq, &rep, piece)?;
            for (sl, bl) in scores.iter_mut().zip(best) {
                for (s, b) in sl.iter_mut().zip(bl) {
                    s[rep.start..rep.end].copy_from_slice(&b);
                }
            }
        }
        Ok(Some(scores))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// Keys (d = 2, scale 1): sink (0,0); span k1 = (1,0), k2 = (0,1); repeat r0 = (0,0),
    /// r1 = (1,1). Group of two heads, two repeat queries (done = 0: row i sees r0..=ri).
    /// Head 0: q0 = (0, ln 4) sees [sink, k1, k2, r0]: exp logits [1, 1, 4, 1], sum 7, span
    /// (1/7, 4/7); q1 = (0, 0) sees all five equally: (1/5, 1/5).
    /// Head 1: q0 = (ln 6, 0): [1, 6, 1, 1], sum 9: (2/3, 1/9) (were r1 visible, its 6 would
    /// make it 6/15); q1 = (ln 2, ln 2): [1, 2, 2, 1, 4], sum 10: (1/5, 1/5).
    /// Max over queries and heads: k1 = 2/3 (head 1, q0), k2 = 4/7 (head 0, q0).
    #[test]
    fn span_scores_take_the_max_of_the_subsampled_softmax() {
        let (l2, l4, l6) = (2f32.ln(), 4f32.ln(), 6f32.ln());
        let keys = t2(&[[0., 0.], [1., 0.], [0., 1.], [0., 0.], [1., 1.]]);
        let q = Tensor::cat(
            &[
                t2(&[[0., l4], [0., 0.]]).unsqueeze(0).unwrap(),
                t2(&[[l6, 0.], [l2, l2]]).unsqueeze(0).unwrap(),
            ],
            0,
        )
        .unwrap();
        let s = span_scores(&q, &keys, 1, 2, 0, 1.0).unwrap();
        close(&s.to_vec1::<f32>().unwrap(), &[2. / 3., 4. / 7.]);
        // A later piece (done = 1): its one query sees r0 and r1. q = (0, ln 4): exp logits
        // [1, 1, 4, 1, 4], sum 11.
        let q = t2(&[[0., l4]]).unsqueeze(0).unwrap();
        let s = span_scores(&q, &keys, 1, 2, 1, 1.0).unwrap();
        close(&s.to_vec1::<f32>().unwrap(), &[1. / 11., 4. / 11.]);
        // The scale multiplies the logits: q = (0, ln 2) at scale 2 is q = (0, ln 4).
        let q = t2(&[[0., l2]]).unsqueeze(0).unwrap();
        let s = span_scores(&q, &keys, 1, 2, 1, 2.0).unwrap();
        close(&s.to_vec1::<f32>().unwrap(), &[1. / 11., 4. / 11.]);
    }

    fn view(heads: Vec<Vec<Vec<f32>>>) -> SeqView {
        SeqView {
            seq_len: 4,
            block_size: 2,
            heads: heads
                .into_iter()
                .map(|l| {
                    l.into_iter()
                        .map(|metric| HeadView {
                            position: (0..metric.len() as u32).collect(),
                            metric,
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// 10 slots over 2 layers x 2 kv-heads at budget 1 keep 4 in all: 0.9, 0.8, 0.7, 0.6.
    /// The six lowest go, wherever they are: layer 1 kv-head 1 loses its only slot, layer 1
    /// kv-head 0 keeps two. The 0.5 tie evicts the lower (layer, kv-head) first.
    #[test]
    fn global_plan_ranks_every_head_of_every_layer_together() {
        let v = view(vec![
            vec![vec![0.9, 0.1, 0.5], vec![0.2, 0.8]],
            vec![vec![0.3, 0.05, 0.7, 0.6], vec![0.4]],
        ]);
        let p = global_plan(&v, 1);
        let got: Vec<(usize, usize, Vec<usize>)> = p
            .heads
            .iter()
            .map(|h| (h.layer, h.kv_head, h.evict.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0, vec![1, 2]),
                (0, 1, vec![0]),
                (1, 0, vec![1, 0]),
                (1, 1, vec![0]),
            ]
        );
        assert_eq!(global_plan(&v, 3), EvictionPlan::default());
        // Keep 2 of 4: 0.1 goes, then one of the two 0.5s, layer 0's.
        let tie = view(vec![vec![vec![0.5, 2.0]], vec![vec![0.5, 0.1]]]);
        let p = global_plan(&tie, 1);
        let got: Vec<(usize, Vec<usize>)> =
            p.heads.iter().map(|h| (h.layer, h.evict.clone())).collect();
        assert_eq!(got, vec![(0, vec![0]), (1, vec![1])]);
    }

    fn kvzip(text: RepeatTexts) -> KvZip {
        KvZip {
            text,
            inv_freq: vec![1.0],
            group: 1,
        }
    }

    #[test]
    fn repeat_inputs_follow_kvpress_prepare() {
        let chat = RepeatText {
            prefix: vec![100, 101],
            first: vec![1, 2],
            later: vec![3],
            suffix: vec![9],
        };
        let plain = RepeatText {
            prefix: vec![],
            first: vec![4],
            later: vec![5],
            suffix: vec![8],
        };
        let z = kvzip(RepeatTexts {
            chat: Some(chat),
            plain,
        });
        let body: Vec<u32> = (1000..1000 + CHUNK as u32 + 2).collect();
        let ctx: Vec<u32> = [vec![100, 101], body.clone()].concat();
        let r = z.repeats(&ctx);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].start, r[0].end), (2, 2 + CHUNK));
        assert_eq!(r[0].ids[..3], [1, 2, 9]);
        assert_eq!(r[0].ids[3..], body[..CHUNK]);
        assert_eq!((r[1].start, r[1].end), (2 + CHUNK, 4 + CHUNK));
        let quoted = &body[CHUNK - QUOTED..CHUNK];
        let want: Vec<u32> = [&[3][..], quoted, &[9], &body[CHUNK..]].concat();
        assert_eq!(r[1].ids, want);
        // Not starting with the template's prefix: the raw format, scored from position 0.
        let r = z.repeats(&[7, 7, 7]);
        assert_eq!(
            r,
            vec![Repeat {
                start: 0,
                end: 3,
                ids: vec![4, 8, 7, 7, 7]
            }]
        );
        assert!(z.repeats(&[100, 101]).is_empty());
    }

    /// With the span covering the whole context from position 0 (no sinks), the subsampled key
    /// set is every key, so the scores must be what the model's own attention gives: the
    /// maximum over the repeat queries and the group of its probabilities (Probe::All), which
    /// checks the queries' rotation, the key slices and the pieces. The cache is the context
    /// again afterwards.
    #[test]
    fn whole_context_span_scores_equal_the_models_attention() {
        use crate::hub::{ModelSource, ResolvedModel};
        use crate::kvcache::paged::PagedSpec;
        use crate::model::tiny::{write_hf_dir, TinySpec};
        let tmp = tempfile::tempdir().unwrap();
        let ts = TinySpec {
            heads: 6,
            kv_heads: 2,
            layers: 2,
            ..Default::default()
        };
        write_hf_dir(tmp.path(), &ts, 1).unwrap();
        let resolved = ResolvedModel {
            source: ModelSource::HfDir(tmp.path().into()),
            name: "tiny".into(),
            hub_id: None,
            revision: None,
        };
        let mut lm = crate::model::load(&resolved, &Device::Cpu, DType::F32).unwrap();
        let cfg = lm.config().clone();
        let text = RepeatTexts::new(&lm.tokenizer).unwrap();
        assert!(text.chat.is_some());
        let z = KvZip::new(&cfg, text);
        let ctx = lm
            .prompt_ids("the quick brown fox jumps over the lazy dog", true)
            .unwrap();
        let spec = PagedSpec {
            layers: cfg.num_hidden_layers,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size: 4,
            dtype: DType::F32,
            device: Device::Cpu,
        };
        let mut cache = PagedCache::new(spec, 400).unwrap();
        let seq = cache.add_sequence().unwrap();
        let mut none = |_: usize, _: &Tensor, _: &dyn CacheBackend| Ok(());
        lm.model
            .forward(&ctx, seq, &mut cache, Probe::None, &mut none)
            .unwrap();
        let before: Vec<Vec<u32>> = (0..2).map(|h| cache.slot_positions(1, seq, h)).collect();
        let rep = Repeat {
            start: 0,
            end: ctx.len(),
            ids: z.repeats(&ctx)[0].ids.clone(),
        };
        let got = z
            .repeat_pass(&mut lm.model, &mut cache, seq, &rep, 3)
            .unwrap();
        assert_eq!(cache.seq_len(seq), ctx.len());
        let after: Vec<Vec<u32>> = (0..2).map(|h| cache.slot_positions(1, seq, h)).collect();
        assert_eq!(before, after);
        let mut want = vec![Vec::new(); cfg.num_hidden_layers];
        let mut probs = |l: usize, p: &Tensor, _: &dyn CacheBackend| {
            // [1, heads, t, kv]: the context's columns, max over queries, then per group.
            let p = p.squeeze(0)?.narrow(2, 0, ctx.len())?.max(1)?;
            want[l] = (0..2)
                .map(|g| p.narrow(0, g * 3, 3)?.max(0)?.to_vec1::<f32>())
                .collect::<Result<Vec<_>>>()?;
            Ok(())
        };
        lm.model
            .forward(&rep.ids, seq, &mut cache, Probe::All, &mut probs)
            .unwrap();
        for (l, (g, w)) in got.iter().zip(&want).enumerate() {
            for (h, (g, w)) in g.iter().zip(w).enumerate() {
                for (i, (a, b)) in g.iter().zip(w).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "layer {l} head {h} slot {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
