//! Running statistics of one layer's prompt queries, per query head: the mean and the biased
//! covariance of the pre-RoPE queries ([`crate::kvcache::Probe::Queries`]) of the positions
//! from `skip` on, what Expected Attention models future queries with
//! ([`super::expected_attention`]).
//!
//! Prefill comes in chunks, so the statistics are merged chunk by chunk: each chunk is centred
//! on its own mean and merged with Chan, Golub and LeVeque's pairwise update
//! (`M2 = M2_a + M2_b + delta delta^T n_a n_b / n`). A chunked prefill gives the one-shot
//! statistics up to rounding, and, unlike running sums of `q` and `q q^T`, without the
//! cancellation of `E[q q^T] - mu mu^T` in f32 when a channel's mean dwarfs its spread. The
//! tensors stay on the queries' device, in f32.
use candle_core::{DType, Result, Tensor};

/// One layer's query statistics (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct QueryStats {
    /// Query rows observed so far, skipped ones included (the position of the next row).
    pub seen: usize,
    /// Rows counted (positions at or after the `skip` they were added with).
    pub count: usize,
    /// `[heads, d]` f32 mean of the counted rows; `None` before the first.
    mean: Option<Tensor>,
    /// `[heads, d, d]` f32 sum of the outer products of the counted rows minus `mean`.
    m2: Option<Tensor>,
}

impl QueryStats {
    /// Add the next `t` positions' queries `q` `[1, heads, t, d]` (any float dtype); rows at
    /// positions below `skip` are left out.
    pub fn add(&mut self, q: &Tensor, skip: usize) -> Result<()> {
        let (b, _, t, _) = q.dims4()?;
        if b != 1 {
            candle_core::bail!("query statistics take one sequence's queries, got a batch of {b}");
        }
        let first = skip.saturating_sub(self.seen).min(t);
        self.seen += t;
        let nb = t - first;
        if nb == 0 {
            return Ok(());
        }
        let x = q
            .squeeze(0)?
            .narrow(1, first, nb)?
            .to_dtype(DType::F32)?
            .contiguous()?; // [h, nb, d]
        let mean_b = x.mean(1)?; // [h, d]
        let c = x.broadcast_sub(&mean_b.unsqueeze(1)?)?.contiguous()?;
        let m2_b = c.transpose(1, 2)?.contiguous()?.matmul(&c)?; // [h, d, d]
        let (mean, m2) = match (self.mean.take(), self.m2.take()) {
            (Some(ma), Some(m2a)) => {
                let (na, nbf) = (self.count as f64, nb as f64);
                let n = na + nbf;
                let delta = (&mean_b - &ma)?; // [h, d]
                let mean = (&ma + (&delta * (nbf / n))?)?;
                let outer = delta.unsqueeze(2)?.broadcast_mul(&delta.unsqueeze(1)?)?;
                let m2 = ((m2a + m2_b)? + (outer * (na * nbf / n))?)?;
                (mean, m2)
            }
            _ => (mean_b, m2_b),
        };
        (self.mean, self.m2) = (Some(mean), Some(m2));
        self.count += nb;
        Ok(())
    }

    /// `[heads, d]` mean of the counted rows (`None`: none counted).
    pub fn mean(&self) -> Option<&Tensor> {
        self.mean.as_ref()
    }

    /// `[heads, d, d]` covariance of the counted rows, divided by their count (biased, as
    /// kvpress's `einsum(...) / n`); `None`: none counted.
    pub fn cov(&self) -> Result<Option<Tensor>> {
        self.m2
            .as_ref()
            .map(|m2| m2 / self.count as f64)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::paged::tests::max_diff;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// `[1, h, t, d]` queries with a large per-channel offset (the case raw sums lose).
    fn queries(h: usize, t: usize, d: usize, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..h * t * d)
            .map(|i| 40.0 * ((i % d) as f32 - 1.5) + rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, (1, h, t, d), &Device::Cpu).unwrap()
    }

    /// Plain f64 loops: mean and biased covariance of rows `skip..t` of each head.
    fn twin(q: &Tensor, skip: usize) -> (Vec<f64>, Vec<f64>) {
        let (_, h, t, d) = q.dims4().unwrap();
        let v: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
        let at = |hh: usize, i: usize, j: usize| v[(hh * t + i) * d + j] as f64;
        let n = (t - skip) as f64;
        let (mut mean, mut cov) = (vec![0.0; h * d], vec![0.0; h * d * d]);
        for hh in 0..h {
            for j in 0..d {
                mean[hh * d + j] = (skip..t).map(|i| at(hh, i, j)).sum::<f64>() / n;
            }
            for a in 0..d {
                for b in 0..d {
                    let (ma, mb) = (mean[hh * d + a], mean[hh * d + b]);
                    cov[(hh * d + a) * d + b] = (skip..t)
                        .map(|i| (at(hh, i, a) - ma) * (at(hh, i, b) - mb))
                        .sum::<f64>()
                        / n;
                }
            }
        }
        (mean, cov)
    }

    /// Chunks of every size (the sinks split across chunks, a chunk of sinks only, one chunk)
    /// give the one-shot statistics, which equal the f64 loops'.
    #[test]
    fn chunked_statistics_equal_one_shot_and_the_loops() {
        let (h, t, d, skip) = (3, 37, 4, 4);
        let q = queries(h, t, d, 5);
        let mut whole = QueryStats::default();
        whole.add(&q, skip).unwrap();
        let (mean, cov) = twin(&q, skip);
        let got_m: Vec<f32> = whole
            .mean()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got_c: Vec<f32> = whole
            .cov()
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got_m.iter().zip(&mean) {
            assert!((*g as f64 - w).abs() < 1e-4, "mean {g} vs {w}");
        }
        for (g, w) in got_c.iter().zip(&cov) {
            assert!((*g as f64 - w).abs() < 1e-4, "cov {g} vs {w}");
        }
        assert_eq!((whole.seen, whole.count), (t, t - skip));
        for chunk in [1, 2, 3, 5, 16, 36] {
            let mut s = QueryStats::default();
            let mut start = 0;
            while start < t {
                let n = chunk.min(t - start);
                s.add(&q.narrow(2, start, n).unwrap(), skip).unwrap();
                start += n;
            }
            assert_eq!((s.seen, s.count), (t, t - skip));
            let dm = max_diff(s.mean().unwrap(), whole.mean().unwrap());
            let dc = max_diff(&s.cov().unwrap().unwrap(), &whole.cov().unwrap().unwrap());
            assert!(dm < 1e-4 && dc < 1e-4, "chunk {chunk}: mean {dm}, cov {dc}");
        }
    }

    #[test]
    fn nothing_counted_before_skip() {
        let q = queries(2, 3, 2, 1);
        let mut s = QueryStats::default();
        s.add(&q, 4).unwrap();
        assert!(s.mean().is_none() && s.cov().unwrap().is_none());
        assert_eq!((s.seen, s.count), (3, 0));
        s.add(&q, 4).unwrap();
        assert_eq!((s.seen, s.count), (6, 2));
    }
}
