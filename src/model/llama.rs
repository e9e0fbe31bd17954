//! The llama-family forward pass (Llama 2/3/3.1, Mistral, SmolLM2): RMSNorm, grouped-query
//! attention with half-rotation RoPE (optionally Llama-3.1 "llama3" frequency scaling), SiLU
//! MLP, tied or separate LM head. Weight names equal the Hugging Face checkpoint's.
//!
//! Attention itself goes through the [`CacheBackend`] given to [`Llama::forward`]; the model
//! owns no cache, so the same weights serve the contiguous oracle and the paged cache.
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Linear;
use std::ops::Range;
use std::sync::Arc;

use crate::cuda::comm::{Comm, Shard};
use crate::cuda::fp8_linear::{self, Fp8Weight};

use crate::cuda::layer_ops::{self, QkvHeads};
use crate::kvcache::{AttnCall, CacheBackend, Probe, SeqId};
use crate::model::config::Config;
use crate::model::weights::WeightSource;
use crate::model::ModelError;
use crate::profile;

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// A decoder layer's projection: a weight in the run dtype, or an FP8 one run by FP8 matmuls
/// ([`crate::cuda::fp8_linear`]).
enum Proj {
    Dense(Linear),
    Fp8(Fp8Weight),
}

impl Proj {
    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(x),
            Proj::Fp8(w) => fp8_linear::fp8_linear(x, w, fused),
        }
    }

    /// `(out, in)`.
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Proj::Dense(l) => l.weight().dims2(),
            Proj::Fp8(w) => w.dims(),
        }
    }

    /// The weight `[out, in]` in `dtype` (an FP8 one dequantized: a copy).
    fn weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => Ok(l.weight().clone()),
            Proj::Fp8(w) => w.dequantize()?.to_dtype(dtype),
        }
    }
}

/// How a checkpoint's FP8 weights are run (see [`Llama::fp8`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Weights {
    /// The checkpoint has none.
    None,
    /// Dequantized at load to the run dtype.
    Dequantized,
    /// Kept in e4m3: the projections run FP8 tensor-core matmuls.
    Matmul,
}

/// One decoder layer. The q/k/v projections are merged at load into one `[q + 2 kv heads *
/// head_dim, hidden]` weight (rows: q_proj's, k_proj's, v_proj's), and gate/up into one
/// `[2 * intermediate, hidden]` (gate_proj's rows first): one matmul each instead of three and
/// two (see [`crate::cuda::layer_ops`]).
struct Layer {
    input_norm: RmsNorm,
    qkv: Proj,
    o: Proj,
    post_norm: RmsNorm,
    gate_up: Proj,
    down: Proj,
}

/// Rotary tables `[max_pos, head_dim/2]` in the run dtype, grown on demand.
struct Rope {
    inv_freq: Vec<f32>,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
}

impl Rope {
    fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let inv_freq = cfg.rope.inv_freq(d);
        let mut r = Rope {
            inv_freq,
            cos: Tensor::zeros((0, d / 2), dtype, device)?,
            sin: Tensor::zeros((0, d / 2), dtype, device)?,
            dtype,
        };
        r.ensure(4096.min(cfg.max_position_embeddings), device)?;
        Ok(r)
    }

    fn ensure(&mut self, n: usize, device: &Device) -> Result<()> {
        if self.cos.dim(0)? >= n {
            return Ok(());
        }
        let n = n.next_power_of_two();
        let half = self.inv_freq.len();
        let mut freqs = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &self.inv_freq {
                freqs.push(p as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (n, half), device)?;
        self.cos = freqs.cos()?.to_dtype(self.dtype)?;
        self.sin = freqs.sin()?.to_dtype(self.dtype)?;
        Ok(())
    }
}

/// A loaded llama-family model.
pub struct Llama {
    pub cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    pub dtype: DType,
    pub device: Device,
    /// Run the layers' fused kernels on a GPU ([`crate::cuda::layer_ops`]); `false` runs their twins,
    /// candle's op chains (`kvc eval --unfused-layers`, for A/B measurements).
    pub fused: bool,
    /// This rank's attention heads (all of them without tensor parallelism).
    heads: QkvHeads,
    /// The tensor-parallel group (`None`: the whole model here).
    comm: Option<Arc<dyn Comm>>,
    /// How the checkpoint's FP8 weights run, if it has any.
    pub fp8: Fp8Weights,
    /// [`Llama::out_proj`], made on first use.
    out_proj: std::sync::OnceLock<Vec<Tensor>>,
}

/// Which rows of each weight one rank loads (see [`Llama::load_shard`]).
struct Parts {
    shard: Shard,
    heads: QkvHeads,
    mlp: Range<usize>,
    /// This rank's vocabulary rows, padded with zero rows to `vocab_rows` on every rank.
    vocab: Range<usize>,
    vocab_rows: usize,
}

impl Parts {
    fn new(cfg: &Config, shard: Shard) -> std::result::Result<Parts, ModelError> {
        let bad = |msg: String| ModelError::Candle(candle_core::Error::Msg(msg));
        let q = shard
            .part(cfg.num_attention_heads, "attention heads")
            .map_err(bad)?;
        let kv = shard
            .part(cfg.num_key_value_heads, "key-value heads")
            .map_err(bad)?;
        let (vocab, vocab_rows) = shard.padded_part(cfg.vocab_size);
        Ok(Parts {
            shard,
            heads: QkvHeads {
                q: q.len(),
                kv: kv.len(),
                dim: cfg.head_dim,
            },
            mlp: shard.part(cfg.intermediate_size, "MLP rows").map_err(bad)?,
            vocab,
            vocab_rows,
        })
    }

    /// `None` (the whole tensor) for one rank, else `Some((0, rows))`.
    fn rows(&self, r: Range<usize>) -> Option<(usize, Range<usize>)> {
        (self.shard.world > 1).then_some((0, r))
    }
    /// The rows of this rank's `heads` heads (each `dim` rows) of a q, k or v projection.
    fn head_rows(&self, heads: usize) -> Option<(usize, Range<usize>)> {
        let n = heads * self.heads.dim;
        self.rows(self.shard.rank * n..(self.shard.rank + 1) * n)
    }
    fn mlp_rows(&self) -> Option<(usize, Range<usize>)> {
        self.rows(self.mlp.clone())
    }
    fn vocab(&self) -> Option<(usize, Range<usize>)> {
        self.rows(self.vocab.clone())
    }
    /// `w`'s vocabulary rows padded with zeros to the part size every rank holds.
    fn pad_vocab(&self, w: Tensor) -> std::result::Result<Tensor, ModelError> {
        let missing = self.vocab_rows - self.vocab.len();
        if self.shard.world == 1 || missing == 0 {
            return Ok(w);
        }
        let zeros = Tensor::zeros((missing, w.dim(1)?), w.dtype(), w.device())?;
        Ok(Tensor::cat(&[&w, &zeros], 0)?)
    }
}

/// The same range along dimension 1 (a row-parallel weight's input columns).
fn cols(part: Option<(usize, Range<usize>)>) -> Option<(usize, Range<usize>)> {
    part.map(|(_, r)| (1, r))
}

/// One weight's name, whole shape and this rank's part.
type PartSpec = (String, [usize; 2], Option<(usize, Range<usize>)>);

/// Loads weights in the run dtype, and projections either so or in e4m3 (`fp8`).
struct ProjLoader<'a> {
    src: &'a mut WeightSource,
    dtype: DType,
    device: &'a Device,
    fp8: bool,
}

impl ProjLoader<'_> {
    fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        part: Option<(usize, Range<usize>)>,
    ) -> std::result::Result<Tensor, ModelError> {
        self.src
            .get_part(name, shape, part, self.dtype, self.device)
    }

    /// The weights of `specs` merged by rows into one projection: FP8 when every one of them
    /// is FP8 and FP8 matmuls are on, else dequantized to the run dtype.
    fn proj(&mut self, specs: &[PartSpec]) -> std::result::Result<Proj, ModelError> {
        if self.fp8 {
            let mut fp8 = Vec::with_capacity(specs.len());
            for (name, shape, part) in specs {
                match self.src.get_fp8_part(name, shape, part.clone())? {
                    Some(w) => fp8.push(w),
                    None => break,
                }
            }
            if fp8.len() == specs.len() {
                let (w, s): (Vec<Tensor>, Vec<Tensor>) = fp8.into_iter().unzip();
                let w = Tensor::cat(&w, 0)?;
                let (out, inp) = w.dims2()?;
                // The GEMM's constraint (the CPU twin has none).
                if self.device.is_cuda() && (out % 16 != 0 || inp % 16 != 0) {
                    return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                        "{}: this rank's FP8 weight [{out}, {inp}] is not a multiple of 16 in both dims, as FP8 GEMMs need: use --fp8 dequantize (or another --tensor-parallel degree)",
                        specs[0].0
                    ))));
                }
                let on = |t: Tensor| t.to_device(self.device);
                return Ok(Proj::Fp8(Fp8Weight {
                    w: on(w)?,
                    scale: on(Tensor::cat(&s, 0)?)?,
                }));
            }
        }
        let mut dense = Vec::with_capacity(specs.len());
        for (name, shape, part) in specs {
            dense.push(self.get(name, shape, part.clone())?);
        }
        Ok(Proj::Dense(Linear::new(Tensor::cat(&dense, 0)?, None)))
    }
}

impl Llama {
    /// Load every weight from `src` (Hugging Face names) in `dtype` on `device`.
    pub fn load(
        cfg: &Config,
        src: &mut WeightSource,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        Self::load_shard(cfg, src, dtype, device, None, false)
    }

    /// Load one tensor-parallel rank's part of the weights (`comm`'s [`Shard`]; `None`: the
    /// whole model). Megatron's split: q/k/v and gate/up by output rows (the rank's heads and
    /// intermediate rows), o and down by input columns (their partial sums meet in
    /// [`Comm::all_reduce_sum`]), the embedding and the LM head by vocabulary rows.
    /// `fp8_matmul`: keep FP8 projections in e4m3 for FP8 matmuls (else they are dequantized).
    pub fn load_shard(
        cfg: &Config,
        src: &mut WeightSource,
        dtype: DType,
        device: &Device,
        comm: Option<Arc<dyn Comm>>,
        fp8_matmul: bool,
    ) -> std::result::Result<Self, ModelError> {
        src.set_heads(cfg.num_attention_heads, cfg.num_key_value_heads);
        let parts = Parts::new(cfg, comm.as_ref().map_or(Shard::ONE, |c| c.shard()))?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let qd = cfg.num_attention_heads * cfg.head_dim;
        let kvd = cfg.num_key_value_heads * cfg.head_dim;
        let fp8 = match (src.has_fp8(), fp8_matmul) {
            (false, _) => Fp8Weights::None,
            (true, false) => Fp8Weights::Dequantized,
            (true, true) => Fp8Weights::Matmul,
        };
        let mut loader = ProjLoader {
            src,
            dtype,
            device,
            fp8: fp8 == Fp8Weights::Matmul,
        };
        let embed = parts.pad_vocab(loader.get(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            parts.vocab(),
        )?)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let eps = cfg.rms_norm_eps as f32;
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let (q, kv) = (
                parts.head_rows(parts.heads.q),
                parts.head_rows(parts.heads.kv),
            );
            let mlp = parts.mlp_rows();
            let mut norm = |name: &str| -> std::result::Result<RmsNorm, ModelError> {
                Ok(RmsNorm {
                    weight: loader.get(&format!("{p}.{name}.weight"), &[h], None)?,
                    eps,
                })
            };
            let (input_norm, post_norm) =
                (norm("input_layernorm")?, norm("post_attention_layernorm")?);
            let attn = |n: &str| format!("{p}.self_attn.{n}_proj.weight");
            let ffn = |n: &str| format!("{p}.mlp.{n}_proj.weight");
            layers.push(Layer {
                input_norm,
                qkv: loader.proj(&[
                    (attn("q"), [qd, h], q.clone()),
                    (attn("k"), [kvd, h], kv.clone()),
                    (attn("v"), [kvd, h], kv),
                ])?,
                o: loader.proj(&[(attn("o"), [h, qd], cols(q))])?,
                post_norm,
                gate_up: loader.proj(&[
                    (ffn("gate"), [i, h], mlp.clone()),
                    (ffn("up"), [i, h], mlp.clone()),
                ])?,
                down: loader.proj(&[(ffn("down"), [h, i], cols(mlp))])?,
            });
        }
        let norm = RmsNorm {
            weight: loader.get("model.norm.weight", &[h], None)?,
            eps,
        };
        // Tied: the embedding is the head, even where the file also holds an lm_head (as
        // transformers ties). Untied: lm_head.weight must exist (a GGUF's tie flag is the
        // absence of its output tensor).
        let head_w = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            parts.pad_vocab(loader.get("lm_head.weight", &[cfg.vocab_size, h], parts.vocab())?)?
        };
        let rope = Rope::new(cfg, dtype, device).map_err(ModelError::Candle)?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head: Linear::new(head_w, None),
            rope,
            dtype,
            device: device.clone(),
            fused: true,
            heads: parts.heads,
            comm,
            fp8,
            out_proj: Default::default(),
        })
    }

    /// Run `tokens` (`[t]` ids of one sequence, at its next positions) through the model,
    /// attending through `cache`. Returns the logits of the last token `[vocab]` in f32.
    /// `probe` selects queries whose attention probabilities go to `observe(layer, probs, cache)`
    /// (`probs`: `[1, n_heads, n_probed, kv_len]` f32, see [`crate::kvcache::AttnOut`]); with
    /// [`Probe::Queries`], every layer's pre-RoPE queries `[1, n_heads, t, head_dim]` in the run
    /// dtype instead (the same in the batched forwards, `[B, ...]`).
    pub fn forward(
        &mut self,
        tokens: &[u32],
        seq: SeqId,
        cache: &mut dyn CacheBackend,
        probe: Probe,
        observe: &mut dyn FnMut(usize, &Tensor, &dyn CacheBackend) -> Result<()>,
    ) -> Result<Tensor> {
        let t = tokens.len();
        let start = cache.seq_len(seq);
        self.rope.ensure(start + t, &self.device)?;
        let x = self.embed_rows(tokens)?.unsqueeze(0)?; // [1, t, hidden]
        let pos0 = Tensor::new(&[start as u32], &self.device)?;
        let x = self.layers_forward(x, &[seq], &pos0, cache, probe, observe)?;
        let last = x.narrow(1, t - 1, 1)?;
        let logits = self.head(&last)?;
        logits.squeeze(0)?.squeeze(0)?.to_dtype(DType::F32)
    }

    /// A prefill chunk of several sequences at once: `tokens[i]` (all of the same length `t`)
    /// continues `seqs[i]`, and every sequence must be at the same position (the benchmark's
    /// synthetic prompts are). Projections and MLPs run once over `[B, t, hidden]`, which is
    /// what amortises the per-launch cost of a small model on a GPU; attention is per sequence
    /// in the backend. Returns the last token's logits `[B, vocab]` in f32; `observe` gets
    /// `[B, n_heads, n_probed, kv_len]` probabilities.
    pub fn forward_prefill_batch(
        &mut self,
        tokens: &[&[u32]],
        seqs: &[SeqId],
        cache: &mut dyn CacheBackend,
        probe: Probe,
        observe: &mut dyn FnMut(usize, &Tensor, &dyn CacheBackend) -> Result<()>,
    ) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 || b != seqs.len() {
            candle_core::bail!("prefill batch of {b} rows for {} sequences", seqs.len());
        }
        let t = tokens[0].len();
        if t == 0 || tokens.iter().any(|r| r.len() != t) {
            candle_core::bail!("a batched prefill needs non-empty rows of one length");
        }
        let start = cache.seq_len(seqs[0]);
        if seqs.iter().any(|&s| cache.seq_len(s) != start) {
            candle_core::bail!("a batched prefill needs every sequence at the same position");
        }
        self.rope.ensure(start + t, &self.device)?;
        let flat: Vec<u32> = tokens.iter().flat_map(|r| r.iter().copied()).collect();
        let x = self.embed_rows(&flat)?.reshape((b, t, ()))?; // [B, t, hidden]
        let pos0 = Tensor::new(vec![start as u32; b], &self.device)?;
        let x = self.layers_forward(x, seqs, &pos0, cache, probe, observe)?;
        let last = x.narrow(1, t - 1, 1)?.contiguous()?; // strided when B > 1
        let logits = self.head(&last)?; // [B, 1, vocab]
        logits
            .reshape((b, self.cfg.vocab_size))?
            .to_dtype(DType::F32)
    }

    /// One decode step of a batch: `tokens[i]` is the next token of `seqs[i]` (each at its own
    /// next position). Every projection and MLP runs once over the batch `[B, 1, hidden]`;
    /// attention goes to the backend in one call per layer with all sequences (the paged CUDA
    /// path attends them in one kernel launch, the CPU path loops over them). Returns the
    /// logits `[B, vocab]` in f32. `observe` gets `[B, n_heads, 1, max_kv_len]` probabilities.
    pub fn forward_decode(
        &mut self,
        tokens: &[u32],
        seqs: &[SeqId],
        cache: &mut dyn CacheBackend,
        probe: Probe,
        observe: &mut dyn FnMut(usize, &Tensor, &dyn CacheBackend) -> Result<()>,
    ) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 || b != seqs.len() {
            candle_core::bail!("decode batch of {b} tokens for {} sequences", seqs.len());
        }
        let pos: Vec<u32> = seqs.iter().map(|&s| cache.seq_len(s) as u32).collect();
        let max = pos.iter().copied().max().unwrap_or(0) as usize;
        self.rope.ensure(max + 1, &self.device)?;
        let x = self.embed_rows(tokens)?.unsqueeze(1)?; // [B, 1, hidden]
        let pos0 = Tensor::new(pos.as_slice(), &self.device)?;
        let x = self.layers_forward(x, seqs, &pos0, cache, probe, observe)?;
        let mut clock = profile::start(&self.device);
        let logits = self.head(&x)?; // [B, 1, vocab]
        let logits = logits
            .reshape((b, self.cfg.vocab_size))?
            .to_dtype(DType::F32);
        profile::mark(&self.device, &mut clock, "decode.lm_head");
        logits
    }

    /// The decoder layers over `x` `[b, t, hidden]` (row `i` belongs to `seqs[i]`, its first
    /// token at position `pos0[i]`, `[b]` u32). Returns the last layer's residual stream
    /// through the model's final norm (what the LM head takes).
    ///
    /// Per layer: merged q/k/v matmul, RoPE + split, attention (the backend), o matmul, residual
    /// add + post-attention norm, merged gate/up matmul, SiLU * up, down matmul, and the
    /// residual add fused with the next layer's input norm, or after the last layer with the
    /// final norm ([`crate::cuda::layer_ops`]; no candle binary op is left in the GPU forward).
    fn layers_forward(
        &self,
        x: Tensor,
        seqs: &[SeqId],
        pos0: &Tensor,
        cache: &mut dyn CacheBackend,
        probe: Probe,
        observe: &mut dyn FnMut(usize, &Tensor, &dyn CacheBackend) -> Result<()>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = self.heads;
        let fused = self.fused;
        let scale = 1.0 / (heads.dim as f64).sqrt();
        let Some(first) = self.layers.first() else {
            return self.norm.forward(&x);
        };
        // Phase names of the opt-in profile (`crate::profile`), decode or prefill.
        let ph = if t == 1 {
            [
                "decode.qkv+rope",
                "decode.attend",
                "decode.observe",
                "decode.o+norm",
                "decode.mlp",
            ]
        } else {
            [
                "prefill.qkv+rope",
                "prefill.attend",
                "prefill.observe",
                "prefill.o+norm",
                "prefill.mlp",
            ]
        };
        let dev = &self.device;
        let mut clock = profile::start(dev);
        let mut hs = first.input_norm.forward(&x)?;
        let mut x = x;
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = layer.qkv.forward(&hs, fused)?;
            let (q, k, v) = layer_ops::rope_split_qkv(
                &qkv,
                pos0,
                &self.rope.cos,
                &self.rope.sin,
                heads,
                fused,
            )?;
            profile::mark(dev, &mut clock, ph[0]);
            let out = cache.attend(AttnCall {
                layer: l,
                seqs,
                q: &q,
                k: &k,
                v: &v,
                scale,
                probe: probe.of_attention(),
            })?;
            profile::mark(dev, &mut clock, ph[1]);
            if probe == Probe::Queries {
                observe(l, &pre_rope_queries(&qkv, heads)?, &*cache)?;
                profile::mark(dev, &mut clock, ph[2]);
            } else if let Some(p) = &out.probs {
                observe(l, p, &*cache)?;
                profile::mark(dev, &mut clock, ph[2]);
            }
            let attn = out
                .out
                .transpose(1, 2)?
                .reshape((b, t, heads.q * heads.dim))?;
            let post = &layer.post_norm;
            let (x1, h1) = layer_ops::add_rms_norm(
                &x,
                &self.reduce(layer.o.forward(&attn, fused)?)?,
                &post.weight,
                post.eps,
                fused,
            )?;
            profile::mark(dev, &mut clock, ph[3]);
            let gu = layer.gate_up.forward(&h1, fused)?;
            let mlp = layer
                .down
                .forward(&layer_ops::silu_mul(&gu, fused)?, fused)?;
            let mlp = self.reduce(mlp)?;
            // The next layer's input norm, or after the last layer the model's final norm.
            let n = match self.layers.get(l + 1) {
                Some(next) => &next.input_norm,
                None => &self.norm,
            };
            (x, hs) = layer_ops::add_rms_norm(&x1, &mlp, &n.weight, n.eps, fused)?;
            profile::mark(dev, &mut clock, ph[4]);
        }
        Ok(hs)
    }

    /// The embedding rows of `ids` `[n, hidden]`. A tensor-parallel rank holds a slice of the
    /// vocabulary (padded to one size on every rank): it looks up the ids in its slice, zeroes
    /// the others' rows, and the sum over ranks is every row exactly (one rank's row plus
    /// zeros).
    fn embed_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let Some(comm) = &self.comm else {
            return self.embed.index_select(&Tensor::new(ids, &self.device)?, 0);
        };
        let rows = self.embed.dim(0)? as u32;
        let start = comm.shard().rank as u32 * rows;
        let mine = |id: u32| id >= start && id - start < rows;
        let local: Vec<u32> = ids
            .iter()
            .map(|&id| if mine(id) { id - start } else { 0 })
            .collect();
        let keep: Vec<f32> = ids
            .iter()
            .map(|&id| if mine(id) { 1.0 } else { 0.0 })
            .collect();
        let keep = Tensor::from_vec(keep, (ids.len(), 1), &self.device)?.to_dtype(self.dtype)?;
        let x = self
            .embed
            .index_select(&Tensor::new(local.as_slice(), &self.device)?, 0)?
            .broadcast_mul(&keep)?;
        comm.all_reduce_sum(&x)
    }

    /// The LM head over `x` `[.., hidden]`: `[.., vocab]`, gathered from the ranks' vocabulary
    /// slices under tensor parallelism.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(x)?;
        match &self.comm {
            Some(comm) => comm.all_gather_last(&logits)?.narrow(
                candle_core::D::Minus1,
                0,
                self.cfg.vocab_size,
            ),
            None => Ok(logits),
        }
    }

    /// The sum over ranks of a row-parallel projection's partial output (itself on one rank).
    fn reduce(&self, x: Tensor) -> Result<Tensor> {
        match &self.comm {
            Some(comm) => comm.all_reduce_sum(&x),
            None => Ok(x),
        }
    }

    /// The tensor-parallel group this model is a rank of (`None`: the whole model here).
    pub fn comm(&self) -> Option<&Arc<dyn Comm>> {
        self.comm.as_ref()
    }

    /// This rank's part of the model's configuration: its attention heads, key-value heads and
    /// MLP rows (the whole configuration without tensor parallelism). Caches and methods of a
    /// rank are built from it.
    pub fn rank_config(&self) -> Config {
        let mut cfg = self.cfg.clone();
        cfg.num_attention_heads = self.heads.q;
        cfg.num_key_value_heads = self.heads.kv;
        cfg.intermediate_size = self.layers.first().map_or(cfg.intermediate_size, |l| {
            l.down.dims().map_or(cfg.intermediate_size, |(_, i)| i)
        });
        cfg
    }

    /// Each layer's attention output projection `[hidden, heads * head_dim]` in the run dtype
    /// (dense ones share the model's storage; FP8 ones are dequantized once, on first use).
    pub fn out_proj(&self) -> Result<Vec<Tensor>> {
        if let Some(w) = self.out_proj.get() {
            return Ok(w.clone());
        }
        let w = self
            .layers
            .iter()
            .map(|l| l.o.weight(self.dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.out_proj.get_or_init(|| w).clone())
    }

    /// Vocabulary size of the LM head.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Argmax of `logits` `[vocab]` (first index on ties, like torch.argmax).
    pub fn argmax(logits: &Tensor) -> Result<u32> {
        Ok(layer_ops::argmax_twin(&logits.to_vec1::<f32>()?))
    }

    /// Greedy next token of every row of `logits` `[batch, vocab]` f32, the first index on
    /// ties as [`layer_ops::argmax_twin`] scans a row. On a GPU it runs there
    /// ([`crate::cuda::layer_ops::argmax_rows`]) and only `batch` ids come back, not the
    /// batch's logits.
    pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
        crate::cuda::layer_ops::argmax_rows(logits, true)
    }
}

/// The queries of a merged projection `qkv` `[b, t, (q + 2 kv heads) * dim]` before RoPE,
/// `[b, q heads, t, dim]` (what transformers' `q_proj` gives, as kvpress's
/// `get_prerope_query_states` recomputes them).
fn pre_rope_queries(qkv: &Tensor, heads: QkvHeads) -> Result<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    qkv.narrow(2, 0, heads.q * heads.dim)?
        .reshape((b, t, heads.q, heads.dim))?
        .transpose(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first maximum, as a scan from index 0 finds it: ties at the front, the back and
    /// across the row, a -inf row, NaNs (never a maximum; a row starting with NaN gives 0).
    #[test]
    fn argmax_takes_the_first_maximum() {
        let nan = f32::NAN;
        let rows: Vec<Vec<f32>> = vec![
            vec![1.0, 3.0, 3.0, -2.0, 3.0],
            vec![5.0, 5.0, 0.0, 1.0, 5.0],
            vec![0.0, 0.0, 0.0, 0.0, 0.5],
            vec![-1.0, -1.0, -1.0, -1.0, -1.0],
            vec![f32::NEG_INFINITY, -3.0, -3.0, f32::NEG_INFINITY, -4.0],
            vec![1.0, nan, 2.0, nan, 2.0],
            vec![nan, 1.0, 9.0, 0.0, 2.0],
            vec![f32::NEG_INFINITY, nan, nan, nan, nan],
        ];
        let want = vec![1, 0, 4, 0, 1, 2, 0, 0];
        let got: Vec<u32> = rows.iter().map(|r| layer_ops::argmax_twin(r)).collect();
        assert_eq!(got, want);
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (rows.len(), 5), &Device::Cpu).unwrap();
        assert_eq!(Llama::argmax_rows(&t).unwrap(), want);
    }
}
