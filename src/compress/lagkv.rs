//! LagKV (Liang et al., 2025; kvpress's `LagKVPress`): attention-free scores from keys and
//! values alone. The prompt after `N_SINK` sink tokens is cut into partitions of `LAG` tokens;
//! each partition is judged against the next one (its "lag" reference): per channel, the
//! reference's min and max scale the partition's keys (and values), a token's score is the
//! softmax over its partition of the standard deviation of its scaled channels (keys and values
//! averaged), and the kept score is the token's rank within its partition / `LAG`, so every
//! partition keeps about the same share. The sinks and the last partition with the remainder
//! (which has no reference) score 1: kept first. A prompt shorter than `N_SINK + 2 LAG` scores
//! by position (sinks, then the most recent), as kvpress does. Compress once, after prefill;
//! needs no probed queries, so it never sees the question's attention.
//!
//! The scores are candle ops on the cache's device (the same ops on the CPU are their twin).
//! Departure: a channel whose reference range is 0 divides by zero in kvpress (NaN scores);
//! here the range is clamped at 1e-12.
use candle_core::{DType, Result, Tensor, D};

/// Sink tokens always kept (kvpress's `n_sink`).
pub const N_SINK: usize = 4;
/// Partition length (kvpress's `lag_size`).
pub const LAG: usize = 128;

/// The scorer (see the module docs); it runs as [`super::knorm::KeyScored`] with
/// [`super::knorm::KeyScore::LagKv`], the policy of every key and value scorer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagKv {
    pub n_sink: usize,
    pub lag: usize,
}

impl Default for LagKv {
    fn default() -> Self {
        LagKv {
            n_sink: N_SINK,
            lag: LAG,
        }
    }
}

impl LagKv {
    /// Scores of one kv-head's keys and values `[len, d]`, in f32 (`[len]`).
    pub fn scores(&self, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let (len, _) = keys.dims2()?;
        let dev = keys.device();
        if len < self.n_sink + 2 * self.lag {
            let s: Vec<f32> = (0..len)
                .map(|j| match j.checked_sub(self.n_sink) {
                    None => 1.0,
                    Some(i) => i as f32 / (len - self.n_sink) as f32,
                })
                .collect();
            return Tensor::from_vec(s, len, dev);
        }
        let parts = (len - self.n_sink) / self.lag;
        let soft = ((self.lag_softmax(keys, parts)? + self.lag_softmax(values, parts)?)? / 2.0)?;
        // Rank within the partition (0 = lowest) by a double argsort, over LAG.
        let rank = soft.arg_sort_last_dim(true)?.arg_sort_last_dim(true)?;
        let rank = (rank.to_dtype(DType::F32)? / self.lag as f64)?.flatten_all()?;
        let ones = |n: usize| Tensor::ones(n, DType::F32, dev);
        let tail = len - self.n_sink - (parts - 1) * self.lag;
        Tensor::cat(&[ones(self.n_sink)?, rank, ones(tail)?], 0)
    }

    /// Per partition `p < parts - 1` of `x` `[len, d]` (after the sinks): the softmax over its
    /// tokens of the standard deviation (unbiased, over channels) of its tokens scaled by
    /// partition `p + 1`'s per-channel min and max. `[parts - 1, lag]`.
    fn lag_softmax(&self, x: &Tensor, parts: usize) -> Result<Tensor> {
        let d = x.dim(1)?;
        let body = x
            .to_dtype(DType::F32)?
            .narrow(0, self.n_sink, parts * self.lag)?
            .reshape((parts, self.lag, d))?;
        let (mn, mx) = (body.min_keepdim(1)?, body.max_keepdim(1)?);
        let n = parts - 1;
        let (mn, mx) = (mn.narrow(0, 1, n)?, mx.narrow(0, 1, n)?);
        let range = (mx - &mn)?.clamp(1e-12f32, f32::MAX)?;
        let scaled = body
            .narrow(0, 0, n)?
            .broadcast_sub(&mn)?
            .broadcast_div(&range)?;
        let centred = scaled.broadcast_sub(&scaled.mean_keepdim(D::Minus1)?)?;
        let std = (centred.sqr()?.sum(D::Minus1)? / (d - 1) as f64)?.sqrt()?;
        candle_nn::ops::softmax_last_dim(&std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// kvpress's steps one scalar at a time: the twin of the tensor ops.
    fn reference(lag: &LagKv, k: &[Vec<f32>], v: &[Vec<f32>]) -> Vec<f32> {
        let (len, d) = (k.len(), k[0].len());
        let parts = (len - lag.n_sink) / lag.lag;
        let mut out = vec![1.0f32; len];
        let soft = |x: &[Vec<f32>], p: usize| -> Vec<f32> {
            let at = |i: usize| lag.n_sink + p * lag.lag + i;
            let r = |i: usize| &x[at(lag.lag + i)];
            let std: Vec<f32> = (0..lag.lag)
                .map(|i| {
                    let z: Vec<f32> = (0..d)
                        .map(|c| {
                            let mn = (0..lag.lag).map(|t| r(t)[c]).fold(f32::MAX, f32::min);
                            let mx = (0..lag.lag).map(|t| r(t)[c]).fold(f32::MIN, f32::max);
                            (x[at(i)][c] - mn) / (mx - mn).max(1e-12)
                        })
                        .collect();
                    let mean = z.iter().sum::<f32>() / d as f32;
                    (z.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / (d - 1) as f32).sqrt()
                })
                .collect();
            let m = std.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = std.iter().map(|s| (s - m).exp()).collect();
            let z: f32 = e.iter().sum();
            e.iter().map(|a| a / z).collect()
        };
        for p in 0..parts - 1 {
            let (sk, sv) = (soft(k, p), soft(v, p));
            let s: Vec<f32> = sk.iter().zip(&sv).map(|(a, b)| (a + b) / 2.0).collect();
            for i in 0..lag.lag {
                let rank = s.iter().filter(|&&o| o < s[i]).count();
                out[lag.n_sink + p * lag.lag + i] = rank as f32 / lag.lag as f32;
            }
        }
        out
    }

    fn tensor(x: &[Vec<f32>]) -> Tensor {
        let d = x[0].len();
        Tensor::from_vec(x.concat(), (x.len(), d), &Device::Cpu).unwrap()
    }

    /// Random keys and values: the tensor form equals the scalar reference, sinks and the
    /// last partition with the remainder score 1.
    #[test]
    fn scores_equal_the_scalar_reference() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let lag = LagKv { n_sink: 2, lag: 8 };
        let len = 2 + 4 * 8 + 5; // four partitions and a remainder of 5
        let mut rnd = || -> Vec<Vec<f32>> {
            (0..len)
                .map(|_| (0..6).map(|_| rng.random_range(-2.0..2.0)).collect())
                .collect()
        };
        let (k, v) = (rnd(), rnd());
        let got: Vec<f32> = lag
            .scores(&tensor(&k), &tensor(&v))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, reference(&lag, &k, &v));
        assert!(got[..2].iter().chain(&got[2 + 3 * 8..]).all(|&s| s == 1.0));
        // Ranks: each judged partition holds 0, 1/8, ..., 7/8 once.
        for p in 0..3 {
            let mut r: Vec<f32> = got[2 + p * 8..2 + (p + 1) * 8].to_vec();
            r.sort_by(f32::total_cmp);
            assert_eq!(r, (0..8).map(|i| i as f32 / 8.0).collect::<Vec<_>>());
        }
    }

    /// By hand: lag 2, one sink. Partition [1, 3) is judged by [3, 5), whose channels span 0..1,
    /// so it is unscaled: token 1 (all channels equal) has deviation 0, token 2 does not, so
    /// token 2 ranks 1/2 and token 1 ranks 0. A prompt under `n_sink + 2 lag` scores by
    /// position.
    #[test]
    fn a_hand_computed_case() {
        let lag = LagKv { n_sink: 1, lag: 2 };
        let k = vec![
            vec![9.0, 9.0, 9.0],
            vec![0.5, 0.5, 0.5],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 0.0],
            vec![1.0, 1.0, 1.0],
            vec![3.0, 1.0, 2.0],
        ];
        let got: Vec<f32> = lag
            .scores(&tensor(&k), &tensor(&k))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, vec![1.0, 0.0, 0.5, 1.0, 1.0, 1.0]);
        let short: Vec<f32> = lag
            .scores(&tensor(&k[..4]), &tensor(&k[..4]))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(short, vec![1.0, 0.0, 1.0 / 3.0, 2.0 / 3.0]);
    }
}
