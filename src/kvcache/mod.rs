//! KV-cache backends: what the attention layers read and write.
//!
//! The model computes Q, K, V (RoPE applied) and hands them to a [`CacheBackend`], chosen at load
//! time, that appends K/V for the sequence, attends, and — when asked through [`Probe`] —
//! returns the softmax probabilities of chosen queries so compression methods can score keys.
//!
//! The trait is shaped for the paged, per-(layer, kv-head) cache of KV-Compress:
//! - sequences are named by [`SeqId`] and several share one backend (batching);
//! - every (layer, sequence, kv-head) may hold a different number of cached tokens
//!   ([`CacheBackend::kv_len`]), so probabilities come back padded to the longest head with
//!   zeros beyond each head's length, in the backend's slot order, with the token position of
//!   each slot available from [`CacheBackend::slot_positions`];
//! - attention is computed by the backend (a paged backend uses its own kernels).
//!
//! Backends: [`contiguous::ContiguousCache`] is the reference (one growing tensor per layer,
//! the correctness oracle for every compressed backend); [`paged::PagedCache`] is the paged,
//! per-(layer, kv-head) cache compression methods evict from ([`blocks`] holds its bookkeeping,
//! [`budget`] the rate -> tokens -> blocks arithmetic). On a CUDA device the paged cache runs
//! its appends, decode attention and compaction moves with kvc's kernels ([`cuda`], whose
//! plain-Rust twins are in [`ops`]).
use candle_core::{DType, Result, Tensor};

pub mod blocks;
pub mod budget;
pub mod contiguous;
pub mod paged;
pub use paged::{DeviceEvict, EvictStats};
pub mod step_tables;
#[cfg(test)]
mod twin_checks;

/// A sequence in a cache backend.
pub type SeqId = usize;

/// Which queries' attention probabilities the backend must return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Probe {
    /// None (plain generation).
    #[default]
    None,
    /// The last `n` queries of this call (the observation window of SnapKV / KV-Compress).
    LastQueries(usize),
    /// Every query of this call (decode steps, H2O).
    All,
    /// No probabilities: the model hands the layer's pre-RoPE queries `[batch, n_heads, t,
    /// head_dim]` to its observer instead (Expected Attention's query statistics). A backend
    /// treats it as [`Probe::None`].
    Queries,
}

impl Probe {
    /// What the attention backend is asked for: this probe, with [`Probe::Queries`] (answered
    /// by the model, not the backend) as [`Probe::None`].
    pub fn of_attention(self) -> Probe {
        match self {
            Probe::Queries => Probe::None,
            p => p,
        }
    }
}

/// One attention call for one layer over a batch of sequences.
pub struct AttnCall<'a> {
    pub layer: usize,
    /// Sequence of each batch entry.
    pub seqs: &'a [SeqId],
    /// `[batch, n_heads, t, head_dim]`, RoPE applied.
    pub q: &'a Tensor,
    /// `[batch, n_kv_heads, t, head_dim]`, RoPE applied (cached as is: no re-rotation later).
    pub k: &'a Tensor,
    /// `[batch, n_kv_heads, t, head_dim]`.
    pub v: &'a Tensor,
    /// Softmax scale (1/sqrt(head_dim)).
    pub scale: f64,
    pub probe: Probe,
}

/// What an attention call returns.
pub struct AttnOut {
    /// `[batch, n_heads, t, head_dim]`.
    pub out: Tensor,
    /// When probed: `[batch, n_heads, n_probed, max_kv_len]` f32 softmax probabilities of the
    /// probed queries over the cached slots of the query head's kv-head (slot order of
    /// [`CacheBackend::slot_positions`]); zero beyond that head's `kv_len` and for keys the
    /// query may not see (causal mask).
    pub probs: Option<Tensor>,
}

/// A KV-cache backend (see the module docs). `Sync`: the sequences of a decode batch are
/// scored and planned on several threads against one shared cache.
pub trait CacheBackend: Send + Sync {
    /// Register a new, empty sequence.
    fn add_sequence(&mut self) -> Result<SeqId>;
    /// Drop a sequence and release its memory.
    fn remove_sequence(&mut self, seq: SeqId) -> Result<()>;
    /// Append `call.k`/`call.v` at the next positions of each sequence and attend causally.
    /// The layer's call must come before the next layer's for the same tokens; the sequence's
    /// position advances when the last layer has been called.
    fn attend(&mut self, call: AttnCall<'_>) -> Result<AttnOut>;
    /// Tokens the sequence has seen (= position of its next token).
    fn seq_len(&self, seq: SeqId) -> usize;
    /// Tokens cached for (layer, seq, kv_head) (smaller than `seq_len` after eviction).
    fn kv_len(&self, layer: usize, seq: SeqId, kv_head: usize) -> usize;
    /// Token position of every cached slot of (layer, seq, kv_head), in slot order.
    fn slot_positions(&self, layer: usize, seq: SeqId, kv_head: usize) -> Vec<u32>;
    /// Backend name for logs and run records.
    fn name(&self) -> &'static str;
    /// The paged cache behind this backend, if it is one (compression methods evict through
    /// it).
    fn as_paged(&self) -> Option<&paged::PagedCache> {
        None
    }
    /// Mutable access to the paged cache behind this backend, if it is one.
    fn as_paged_mut(&mut self) -> Option<&mut paged::PagedCache> {
        None
    }
    /// Device-side KV-Compress eviction of several sequences at once (one request each);
    /// only a cache that keeps metrics on the device can.
    fn evict_on_device(&mut self, _reqs: &[DeviceEvict]) -> Result<Vec<EvictStats>> {
        candle_core::bail!("the {} cache has no device eviction", self.name())
    }
    /// Collect the K/V moves of the evictions that follow into one copy, until
    /// [`CacheBackend::flush_moves`] (a cache without moves ignores it).
    fn defer_moves(&mut self) {}
    /// Run the moves collected since [`CacheBackend::defer_moves`] and stop collecting.
    fn flush_moves(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Additive causal mask `[h, t, n]` built on the mask's device: 0 where a key's position is at
/// most the query's (queries at positions `q_start..q_start + t`), -inf elsewhere.
/// `key_pos` `[h, n]` u32 holds each head's slot positions, padded with `u32::MAX` (never
/// visible). Built on the device from positions (a few KB uploaded) rather than as a host
/// `Vec<f32>` of `h * t * n` values, which was the bulk of GPU prefill time
/// (docs/findings/2026-11-23-eval-prefill-masks-and-host-selection.md).
pub fn causal_mask(key_pos: &Tensor, q_start: usize, t: usize) -> Result<Tensor> {
    let (h, n) = key_pos.dims2()?;
    let dev = key_pos.device();
    let q = Tensor::arange(q_start as u32, (q_start + t) as u32, dev)?.reshape((1, t, 1))?;
    let visible = key_pos.reshape((h, 1, n))?.broadcast_le(&q)?;
    let zeros = Tensor::zeros((h, t, n), DType::F32, dev)?;
    let hidden = Tensor::full(f32::NEG_INFINITY, (h, t, n), dev)?;
    visible.where_cond(&zeros, &hidden)
}

/// A decode batch's probed probabilities `[batch, nh, 1, kv]` on the host, where the
/// per-sequence hooks score them row by row. Narrowing a GPU tensor row by row and copying
/// each row costs one synchronising device-to-host copy (and its launches) per sequence and
/// layer, 1440 per step for 48 sequences of SmolLM2's 30 layers; this is one copy per layer of
/// the same bytes. Scoring a host row gives the same numbers (the decode scorers square and
/// sum over a single query, exact in f32 on either device).
pub fn decode_probs_on_host(probs: &Tensor) -> Result<Tensor> {
    probs.to_device(&candle_core::Device::Cpu)
}

/// The probed rows of one sequence's probabilities `p` `[1, nh, t, kv]` (shared by backends).
pub fn probed_rows(p: Tensor, probe: Probe, t: usize) -> Result<Option<Tensor>> {
    Ok(match probe {
        Probe::None | Probe::Queries => None,
        Probe::All => Some(p),
        Probe::LastQueries(n) => {
            let n = n.min(t);
            Some(p.narrow(2, t - n, n)?)
        }
    })
}

/// Stack per-sequence probabilities into `[batch, nh, n_probed, max_kv_len]`, zero-padding each
/// to the longest kv length (see [`AttnOut::probs`]).
pub fn stack_probs(probs: Vec<Tensor>) -> Result<Option<Tensor>> {
    if probs.is_empty() {
        return Ok(None);
    }
    let max = probs
        .iter()
        .map(|p| p.dim(candle_core::D::Minus1).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let padded: Vec<Tensor> = probs
        .into_iter()
        .map(|p| {
            let len = p.dim(candle_core::D::Minus1)?;
            if len == max {
                Ok(p)
            } else {
                p.pad_with_zeros(candle_core::D::Minus1, 0, max - len)
            }
        })
        .collect::<Result<_>>()?;
    Ok(Some(Tensor::cat(&padded, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn causal_mask_matches_positions_and_hides_padding() {
        // Head 0: positions after an eviction (gaps), head 1: shorter, padded.
        let pos = [[0u32, 3, 4, 9, 10], [2, 7, 8, u32::MAX, u32::MAX]];
        let flat: Vec<u32> = pos.iter().flatten().copied().collect();
        let key_pos = Tensor::from_vec(flat, (2, 5), &Device::Cpu).unwrap();
        let (q_start, t) = (8, 3);
        let m = causal_mask(&key_pos, q_start, t)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (h, row) in pos.iter().enumerate() {
            for (i, mi) in m[h].iter().enumerate() {
                for (j, &p) in row.iter().enumerate() {
                    let want = if p as usize <= q_start + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    };
                    assert_eq!(mi[j], want, "head {h} query {i} key {j}");
                }
            }
        }
    }
}
