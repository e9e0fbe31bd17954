//! Scorers: per-(kv-head, slot) importance from the attention probabilities of probed queries.
//!
//! One function serves every attention-based method ([`window_scores`]): for each query head,
//! aggregate the probed queries' probabilities per key (L1 or L2, sum or average over the
//! queries that saw the key), optionally pool along the key axis (max or average, kernel k,
//! padding k/2, stride 1, as PyTorch's `max_pool1d` / `avg_pool1d` with `count_include_pad`),
//! then sum over the query heads that share the kv-head (query-group aggregation: only one KV
//! per (token, kv-head) is stored or scored).
//!
//! KV-Compress: L2-sum over the last w prompt queries, max-pool 7, group sum; decode steps add
//! `sum over the group of p^2` (L2) or `p` (L1) with no pooling. SnapKV / PyramidKV / Ada-SnapKV:
//! L1-sum over the window, average-pool 5, group sum (the originals repeat KV heads instead;
//! sum keeps the ranking of the group mean). H2O: L1-sum over every probed query.
use candle_core::{Result, Tensor};

use crate::cuda::window_score::{self, WindowScoreArgs};
pub use crate::cuda::window_score::{pool1d, window_score_twin, PoolKind};

/// How probabilities are aggregated over the probed queries.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Agg {
    /// Sum of p.
    L1Sum,
    /// Sum of p^2 (KV-Compress's default).
    L2Sum,
    /// Mean of p over the queries that saw the key.
    L1Avg,
    /// Mean of p^2 over the queries that saw the key.
    L2Avg,
}

impl Agg {
    fn squared(self) -> bool {
        matches!(self, Agg::L2Sum | Agg::L2Avg)
    }
    fn averaged(self) -> bool {
        matches!(self, Agg::L1Avg | Agg::L2Avg)
    }
    /// The running-sum form used at decode (same power, no average).
    pub fn decode_form(self) -> Agg {
        if self.squared() {
            Agg::L2Sum
        } else {
            Agg::L1Sum
        }
    }
}

/// A scorer's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreSpec {
    /// Aggregation over probed queries.
    pub agg: Agg,
    /// `(kernel, kind)`; `None` or kernel <= 1 = no pooling.
    pub pool: Option<(usize, PoolKind)>,
    /// Count a (query, key) pair only when `key_pos + buffer <= query_pos`.
    pub buffer: usize,
    /// Pool only the slots before the last `pool_skip_last` ones (SnapKV pools the prefix,
    /// not the observation window, whose keys are kept anyway).
    pub pool_skip_last: usize,
}

/// Per-kv-head scores of the slots of one layer.
///
/// `probs`: `[1, n_heads, n, max_len]` probabilities of the last `n` queries of the sequence
/// (positions `newest - n + 1 ..= newest`, `newest` = the largest slot position); `positions[g]`:
/// token position of each slot of kv-head `g` (its length is the head's kv_len). Returns one
/// vector per kv-head, aligned with its slots.
pub fn window_scores(
    probs: &Tensor,
    positions: &[Vec<u32>],
    spec: &ScoreSpec,
) -> Result<Vec<Vec<f32>>> {
    if !spec.agg.averaged() {
        window_scores_summed(probs, positions, spec)
    } else {
        window_scores_general(probs, positions, spec)
    }
}

/// [`window_scores`] when the probed queries' probabilities are summed (no average; a buffer
/// drops the pairs too close together).
/// On a GPU, `kernels/window_score.cu` sums over the probed queries, pools and sums over the group
/// in one launch, and only `[kv_heads, max_len]` comes to the host (`group x n` times less
/// than the probabilities); elsewhere its twin, [`window_score_twin`], runs on the host.
fn window_scores_summed(
    probs: &Tensor,
    positions: &[Vec<u32>],
    spec: &ScoreSpec,
) -> Result<Vec<Vec<f32>>> {
    let (_, nh, n, max_len) = probs.dims4()?;
    let nkv = positions.len();
    if nkv == 0 || nh % nkv != 0 {
        candle_core::bail!("{nh} query heads do not split over {nkv} kv-heads");
    }
    let args = kernel_args(spec, nh / nkv);
    let lens: Vec<usize> = positions.iter().map(|p| p.len().min(max_len)).collect();
    let flat = if probs.device().is_cuda() {
        let p = probs.to_dtype(candle_core::DType::F32)?;
        window_score::window_score(&p, &lens, &args, positions)?
            .flatten_all()?
            .to_vec1::<f32>()?
    } else {
        let p = probs.flatten_all()?.to_vec1::<f32>()?;
        window_score_twin(&p, &lens, n, max_len, &args, positions)
    };
    Ok(lens
        .iter()
        .enumerate()
        .map(|(h, &l)| flat[h * max_len..h * max_len + l].to_vec())
        .collect())
}

/// A summed spec in the kernel's terms.
fn kernel_args(spec: &ScoreSpec, group: usize) -> WindowScoreArgs {
    let (pool_k, pool_max) = match spec.pool {
        Some((k, kind)) => (k, kind == PoolKind::Max),
        None => (0, true),
    };
    WindowScoreArgs {
        group,
        squared: spec.agg.squared(),
        pool_k,
        pool_max,
        pool_skip_last: spec.pool_skip_last,
        buffer: spec.buffer,
    }
}

/// [`window_scores`] for every spec, on the host (the reference of the summed path).
pub fn window_scores_general(
    probs: &Tensor,
    positions: &[Vec<u32>],
    spec: &ScoreSpec,
) -> Result<Vec<Vec<f32>>> {
    let (_, nh, n, max_len) = probs.dims4()?;
    let nkv = positions.len();
    if nkv == 0 || nh % nkv != 0 {
        candle_core::bail!("{nh} query heads do not split over {nkv} kv-heads");
    }
    let g = nh / nkv;
    let p = probs.flatten_all()?.to_vec1::<f32>()?;
    let newest = positions
        .iter()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(0) as i64;
    let qpos: Vec<i64> = (0..n).map(|i| newest - (n - 1 - i) as i64).collect();
    let mut out = Vec::with_capacity(nkv);
    for (kv, pos) in positions.iter().enumerate() {
        let len = pos.len().min(max_len);
        let mut acc = vec![0f32; len];
        for hq in kv * g..(kv + 1) * g {
            let mut m = vec![0f32; len];
            for (i, &qp) in qpos.iter().enumerate() {
                let row = &p[(hq * n + i) * max_len..(hq * n + i) * max_len + len];
                for (j, x) in row.iter().enumerate() {
                    if spec.buffer > 0 && pos[j] as i64 + spec.buffer as i64 > qp {
                        continue;
                    }
                    m[j] += if spec.agg.squared() { x * x } else { *x };
                }
            }
            if spec.agg.averaged() {
                for (j, v) in m.iter_mut().enumerate() {
                    let seen = qpos
                        .iter()
                        .filter(|&&qp| pos[j] as i64 + spec.buffer as i64 <= qp)
                        .count();
                    *v = if seen == 0 { 0.0 } else { *v / seen as f32 };
                }
            }
            if let Some((k, kind)) = spec.pool {
                let n = m.len().saturating_sub(spec.pool_skip_last);
                let pooled = pool1d(&m[..n], k, kind);
                m[..n].copy_from_slice(&pooled);
            }
            for (a, v) in acc.iter_mut().zip(&m) {
                *a += v;
            }
        }
        out.push(acc);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn summed_path_equals_the_general_one() {
        // Random probabilities, ragged heads (padding beyond a head's length is ignored),
        // every sum aggregation with and without pooling.
        let mut state = 7u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        // n = 1 is a decode step (the host-squared path).
        for (nh, nkv, n, len) in [(9, 3, 32, 200), (4, 2, 5, 17), (2, 1, 1, 3), (9, 3, 1, 300)] {
            let p: Vec<f32> = (0..nh * n * len).map(|_| rnd()).collect();
            let probs = Tensor::from_vec(p, (1, nh, n, len), &Device::Cpu).unwrap();
            let positions: Vec<Vec<u32>> = (0..nkv)
                .map(|h| (0..(len - h * (len / 4)) as u32).collect())
                .collect();
            for agg in [Agg::L1Sum, Agg::L2Sum] {
                for pool in [None, Some((7, PoolKind::Max)), Some((5, PoolKind::Avg))] {
                    for (pool_skip_last, buffer) in [(0, 0), (2, 0), (0, 3), (2, 40)] {
                        let spec = ScoreSpec {
                            agg,
                            pool,
                            buffer,
                            pool_skip_last,
                        };
                        let fast = window_scores(&probs, &positions, &spec).unwrap();
                        let slow = window_scores_general(&probs, &positions, &spec).unwrap();
                        assert_eq!(fast.len(), slow.len());
                        for (a, b) in fast.iter().zip(&slow) {
                            assert_eq!(a.len(), b.len());
                            for (x, y) in a.iter().zip(b) {
                                assert!(
                                    (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                                    "{spec:?}: {x} vs {y}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn device_scorer_refuses_bad_shapes_before_launching() {
        // Checked before any launch, so on the CPU too (where a valid call has no kernel).
        let probs = Tensor::zeros((1, 6, 2, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = WindowScoreArgs {
            group: 3,
            squared: true,
            pool_k: 7,
            pool_max: true,
            pool_skip_last: 0,
            buffer: 0,
        };
        let err = |lens: &[usize], a: &WindowScoreArgs| {
            window_score::window_score(&probs, lens, a, &[])
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[10, 11], &a).contains("11 slots"));
        assert!(err(&[10, 10, 10], &a).contains("kv-heads of group 3"));
        let wide = WindowScoreArgs { pool_k: 5000, ..a };
        assert!(err(&[10, 10], &wide).contains("shared memory"));
        let bf16 = probs.to_dtype(candle_core::DType::BF16).unwrap();
        assert!(crate::cuda::window_score::window_score(&bf16, &[10, 10], &a, &[]).is_err());
        let buffered = WindowScoreArgs { buffer: 4, ..a };
        assert!(err(&[10, 10], &buffered).contains("position lists"));
    }

    #[test]
    fn pooling_matches_pytorch_semantics() {
        let x = [1.0, 5.0, 2.0, 0.0, 0.0, 3.0];
        assert_eq!(
            pool1d(&x, 3, PoolKind::Max),
            vec![5.0, 5.0, 5.0, 2.0, 3.0, 3.0]
        );
        // avg_pool1d(k=3, padding=1): edges divide by 3 with zero padding
        assert_eq!(
            pool1d(&x, 3, PoolKind::Avg),
            vec![2.0, 8.0 / 3.0, 7.0 / 3.0, 2.0 / 3.0, 1.0, 1.0]
        );
        assert_eq!(pool1d(&x, 1, PoolKind::Max), x.to_vec());
    }

    #[test]
    fn l2_sum_avg_and_group_sum() {
        // 2 query heads, 1 kv-head, 2 probed queries (positions 2, 3), 4 keys.
        let p: Vec<f32> = vec![
            // head 0
            0.5, 0.25, 0.25, 0.0, //
            0.1, 0.2, 0.3, 0.4, //
            // head 1
            1.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 1.0,
        ];
        let probs = Tensor::from_vec(p, (1, 2, 2, 4), &Device::Cpu).unwrap();
        let pos = vec![vec![0u32, 1, 2, 3]];
        let s = |agg, buffer| {
            window_scores(
                &probs,
                &pos,
                &ScoreSpec {
                    agg,
                    pool: None,
                    buffer,
                    pool_skip_last: 0,
                },
            )
            .unwrap()
            .remove(0)
        };
        let l2 = s(Agg::L2Sum, 0);
        let want = [0.25 + 0.01 + 1.0, 0.0625 + 0.04, 0.0625 + 0.09, 0.16 + 1.0];
        for (a, b) in l2.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{l2:?}");
        }
        let l1 = s(Agg::L1Sum, 0);
        assert!((l1[0] - 1.6).abs() < 1e-6);
        // key 3 was seen by one query only (position 3): avg = sum / 1
        let avg = s(Agg::L1Avg, 0);
        assert!((avg[0] - 0.8).abs() < 1e-6 && (avg[3] - 1.4).abs() < 1e-6);
        // buffer 1: query at 3 counts keys <= 2, query at 2 keys <= 1
        let b = s(Agg::L1Sum, 1);
        assert!((b[0] - 1.6).abs() < 1e-6 && (b[2] - 0.3).abs() < 1e-6 && b[3] == 0.0);
    }
}
