//! The GPU layer: kvc's CUDA kernels (`kernels/*.cu`, compiled by `build.rs` into fatbins
//! embedded in the binary), one wrapper file per kernel file, each with the plain-Rust twins of
//! its kernels beside the wrappers (same contracts, same f32 arithmetic, on host slices or
//! candle ops: the CPU path where one exists and the oracle of `tests/cuda_kernels.rs`).
//!
//! This layer depends on candle (and cudarc) only; the paged cache (`crate::kvcache`), the
//! model and the methods call into it. Without the `cuda` feature every wrapper exists and
//! returns [`OpsError::NoCuda`] (feature flags stub, never fork call sites).
//!
//! - [`kv_cache`] (`kv_cache.cu`): K/V rows into slots, compaction moves, block copies,
//!   gathers, metric/position writes, a u32 scatter;
//! - [`paged_attention`] (`paged_attention.cu`): paged decode attention over per-(row, kv-head)
//!   block tables, GQA groups in one CUDA block, split-K when the workspace says so, softmax
//!   probabilities per slot and the KV-Compress decode metric on the side;
//! - [`prefill_attention`] (`prefill_attention.cu`): flash-style prefill attention (tensor
//!   cores, online softmax; scores never reach memory);
//! - [`prefill_softmax`] (`prefill_softmax.cu`): prefill's scale + causal mask + softmax in one
//!   pass (the unfused path, and the probed queries of the flash one);
//! - [`window_score`] (`window_score.cu`): the methods' attention scores of probed queries,
//!   summed, pooled and group-summed in one launch;
//! - [`evict`] (`evict.cu`): KV-Compress's whole eviction step for a batch of sequences
//!   (per-head sort, candidate scoring, selection, KVCrush's block picks, compaction), with
//!   [`select`], the pure selection its twin and the host planners share;
//! - [`layer_ops`] (`layer_ops.cu`): fused decoder-layer ops (add + RMSNorm, SiLU x up,
//!   RoPE + q/k/v split, greedy argmax);
//! - [`fp8_linear`] (`fp8_linear.cu` + cuBLASLt): FP8 weights' linear layers (per-token e4m3
//!   activations, Hopper's FP8 tensor-core GEMM, the scales after it);
//! - [`comm`]: tensor parallelism's shards and collectives, with the in-process twin of
//!   [`nccl`]'s communicator (NCCL loaded at run time).
//!
//! Slot layout (KV-Compress): slot `s` is row `s` of K and V `[num_slots, head_dim]` and entry
//! `s` of the per-slot metric (f32) and position (u32) arrays. Logical slot `i` of row `r` (one
//! (sequence, kv-head) of one layer) is physical slot
//! `block_tables[r][i / block_size] * block_size + i % block_size`, for `i < ctx_lens[r]`.
//! Shapes and tables are checked on the host before any kernel reads them.
use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};

pub mod comm;
pub mod evict;
pub mod fp8_linear;
pub mod kv_cache;
pub mod layer_ops;
pub mod nccl;
pub mod paged_attention;
pub mod prefill_attention;
pub mod prefill_softmax;
pub mod select;
pub mod window_score;

#[cfg(feature = "cuda")]
pub(crate) mod launch;

/// Bad arguments to a paged-cache op; each names the argument and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpsError {
    #[error("{what}: expected {expected} elements, got {got}")]
    Len {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: slot {slot} is out of range (the cache has {num_slots} slots)")]
    Slot {
        what: &'static str,
        slot: usize,
        num_slots: usize,
    },
    #[error("{what}: slot {slot} appears twice (or is both a source and a destination)")]
    Repeated { what: &'static str, slot: usize },
    #[error("row {row}: context length {len} exceeds its capacity {cap} (max_blocks * block_size, probs stride)")]
    CtxLen { row: usize, len: usize, cap: usize },
    #[error("{0}")]
    Shape(String),
    #[error("this kvc was built without CUDA: rebuild with `cargo build --release --features cuda` (see README, \"GPU\")")]
    NoCuda,
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// A twin's or a check's result.
pub type OpsResult<T> = std::result::Result<T, OpsError>;

impl From<OpsError> for candle_core::Error {
    fn from(e: OpsError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// An element type of the K/V cache (converted to f32 for arithmetic, as the kernels do).
pub trait KvElem: Copy + Send + Sync + 'static {
    /// To f32.
    fn to_f32(self) -> f32;
    /// From f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl KvElem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl KvElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Whether this build has the CUDA kernels.
pub fn available() -> bool {
    cfg!(feature = "cuda")
}

/// Free and total bytes of `device`'s memory (CUDA: the driver's `cuMemGetInfo`, which sees
/// every allocation on the GPU, candle's included); `None` on the CPU or without the `cuda`
/// feature.
pub fn device_memory(device: &Device) -> Result<Option<(u64, u64)>> {
    #[cfg(feature = "cuda")]
    return launch::device_memory(device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        Ok(None)
    }
}

/// CUDA devices visible to this process (0 without the `cuda` feature or a driver).
pub fn device_count() -> usize {
    #[cfg(feature = "cuda")]
    return cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize);
    #[cfg(not(feature = "cuda"))]
    0
}

/// Open CUDA device `ordinal` for kvc: candle's device, with
/// - the device's stream-ordered memory pool told to keep freed memory
///   (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` = max). candle allocates every op's output with
///   `cuMemAllocAsync` and frees it with `cuMemFreeAsync`; with the default threshold of 0 the
///   pool hands all free memory back to the OS at every synchronisation (a decode step has
///   several), so the next step's allocations map fresh pages again, a host cost that grows
///   with the batch's activations and scratch;
/// - cudarc's per-allocation event tracking off (two CUDA events created and destroyed per
///   tensor): kvc runs all work on candle's one stream, where the events are never used.
///
/// Errors name the device. Without the `cuda` feature: [`OpsError::NoCuda`].
pub fn open_device(ordinal: usize) -> Result<Device> {
    #[cfg(feature = "cuda")]
    return launch::open_device(ordinal);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(OpsError::NoCuda.into())
    }
}

pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> OpsResult<()> {
    if got != expected {
        return Err(OpsError::Len {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

/// Check that every slot of `lists` is below `num_slots` and that no slot appears twice over
/// all lists: for short lists (a decode step's writes, a prompt chunk's), the runs of
/// consecutive slots are sorted as intervals and checked for overlap, nothing proportional to
/// the cache (the pool hands out whole blocks, so runs are few where slots are many); one pass
/// with a bitmap of the cache's slots for long lists (a fork copies every slot of a sequence).
pub(crate) fn check_slots(what: &'static str, lists: &[&[u32]], num_slots: usize) -> OpsResult<()> {
    let n: usize = lists.iter().map(|l| l.len()).sum();
    if let Some(&s) = lists
        .iter()
        .flat_map(|l| l.iter())
        .find(|&&s| s as usize >= num_slots)
    {
        return Err(OpsError::Slot {
            what,
            slot: s as usize,
            num_slots,
        });
    }
    if n >= num_slots / 256 {
        // The bitmap costs num_slots / 8 bytes: worth it once the list is that long.
        return distinct_blocks(
            what,
            lists.iter().flat_map(|l| l.iter().copied()),
            num_slots,
        );
    }
    // Intervals [start, end) of consecutive slots; the slots are distinct iff no two overlap.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in lists.iter().flat_map(|l| l.iter()) {
        let s = s as u64;
        match runs.last_mut() {
            Some((_, end)) if *end == s => *end += 1,
            _ => runs.push((s, s + 1)),
        }
    }
    runs.sort_unstable();
    if let Some(w) = runs.windows(2).find(|w| w[1].0 < w[0].1) {
        // The later run starts inside the earlier one: its first slot is listed twice.
        return Err(OpsError::Repeated {
            what,
            slot: w[1].0 as usize,
        });
    }
    Ok(())
}

/// No id of `blocks` (block or slot ids, each below `num_blocks`) appears twice: one pass with
/// a bitmap (a decode step that adds the metric checks every layer's tables, ~50k blocks each
/// at batch 96, where sorting them cost milliseconds per step).
pub(crate) fn distinct_blocks(
    what: &'static str,
    blocks: impl IntoIterator<Item = u32>,
    num_blocks: usize,
) -> OpsResult<()> {
    let mut seen = vec![0u64; num_blocks.div_ceil(64)];
    for b in blocks {
        let (w, bit) = (b as usize / 64, 1u64 << (b % 64));
        if seen[w] & bit != 0 {
            return Err(OpsError::Repeated {
                what,
                slot: b as usize,
            });
        }
        seen[w] |= bit;
    }
    Ok(())
}

pub(crate) fn check_cache(k_cache: &Tensor, v_cache: &Tensor, head_dim: usize) -> Result<usize> {
    let (n, d) = k_cache.dims2()?;
    if d != head_dim || v_cache.dims() != k_cache.dims() || v_cache.dtype() != k_cache.dtype() {
        return Err(OpsError::Shape(format!(
            "K/V caches must both be [num_slots, {head_dim}] of one dtype, got K {:?} {:?} / V {:?} {:?}",
            k_cache.dims(),
            k_cache.dtype(),
            v_cache.dims(),
            v_cache.dtype()
        ))
        .into());
    }
    Ok(n)
}

pub(crate) fn check_meta(
    metric: Option<&Tensor>,
    position: Option<&Tensor>,
    num_slots: usize,
) -> Result<()> {
    for (t, dt, what) in [
        (metric, DType::F32, "metric"),
        (position, DType::U32, "position"),
    ] {
        if let Some(t) = t {
            if t.dims() != [num_slots] || t.dtype() != dt {
                return Err(OpsError::Shape(format!(
                    "{what} must be [{num_slots}] {dt:?}, got {:?} {:?}",
                    t.dims(),
                    t.dtype()
                ))
                .into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::kv_cache::check_moves;
    use super::*;

    #[test]
    fn long_slot_lists_are_checked_like_short_ones() {
        // Both branches of check_slots (runs below num_slots / 256 slots, bitmap above) give
        // the same verdicts.
        let num_slots = 4096;
        for n in [3usize, 2000] {
            let from: Vec<u32> = (0..n as u32).collect();
            let to: Vec<u32> = (0..n as u32).map(|x| x + n as u32).collect();
            assert_eq!(check_moves(num_slots, &from, &to), Ok(()), "n {n}");
            let mut rep = to.clone();
            rep[n - 1] = from[0];
            let e = check_moves(num_slots, &from, &rep);
            assert!(
                matches!(e, Err(OpsError::Repeated { slot: 0, .. })),
                "n {n}: {e:?}"
            );
            let mut out = to.clone();
            out[0] = num_slots as u32;
            let e = check_moves(num_slots, &from, &out);
            assert!(
                matches!(e, Err(OpsError::Slot { slot: 4096, .. })),
                "n {n}: {e:?}"
            );
        }
    }

    /// The runs-as-intervals check against counting every slot: random lists made of runs
    /// (as the pool hands slots out), some with a slot listed twice across or within lists.
    #[test]
    fn slot_runs_check_agrees_with_counting() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let num_slots = 1 << 16; // lists stay below num_slots / 256: the runs branch
        for case in 0..400 {
            let mut lists: Vec<Vec<u32>> = vec![Vec::new(); rng.random_range(1..=3)];
            for _ in 0..rng.random_range(1..12) {
                let l = rng.random_range(0..lists.len());
                let start = rng.random_range(0..2000u32);
                let len = rng.random_range(1..16u32);
                lists[l].extend(start..start + len);
            }
            let refs: Vec<&[u32]> = lists.iter().map(|l| &l[..]).collect();
            let mut count = std::collections::HashMap::new();
            for &x in refs.iter().flat_map(|l| l.iter()) {
                *count.entry(x).or_insert(0) += 1;
            }
            match check_slots("t", &refs, num_slots) {
                Ok(()) => assert!(count.values().all(|&c| c == 1), "case {case}: {lists:?}"),
                Err(OpsError::Repeated { slot, .. }) => {
                    assert!(
                        count[&(slot as u32)] > 1,
                        "case {case}: slot {slot} of {lists:?}"
                    )
                }
                Err(e) => panic!("case {case}: {e:?}"),
            }
        }
    }
}
