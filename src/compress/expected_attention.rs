//! Expected Attention (kvpress's `ExpectedAttentionPress`, Devoto et al., 2025): the attention
//! future queries are expected to pay each key, estimated from the prompt's own queries.
//! Compress once, after prefill; the question is not needed.
//!
//! Per layer, from the pre-RoPE queries of every prompt position after the first `n_sink`
//! ([`crate::kvcache::Probe::Queries`], accumulated by [`super::query_stats`]):
//! 1. per query head, the mean `mu` and the biased covariance `Sigma` of those queries;
//! 2. the mean RoPE rotation `R` of the next `n_future_positions` positions `L .. L + 511`
//!    (`R_p x = x cos_p + rotate_half(x) sin_p`, the model's frequencies with their scaling):
//!    `mu' = R mu`, `Sigma' = R Sigma R^T`;
//! 3. per query head and non-sink key `k` (the cached, rotated key):
//!    `z = mu' . k / sqrt(d) + k^T Sigma' k / (2 d)`, softmaxed over the non-sink keys;
//! 4. the mean over the query heads of the kv-head's group, then `(s + epsilon) * ||v||`;
//! 5. the `n_sink` first positions score the layer's maximum + 1 (kept first).
//!
//! The lowest scores of each kv-head are evicted (kvpress's `ScorerPress`). Defaults are
//! kvpress's: `n_future_positions` 512, `n_sink` 4, covariance and value norms on, epsilon 0.
//! Departures: kvpress recomputes the queries from the layer's input with `q_proj`, here the
//! forward hands them over (the same numbers); statistics and scores are computed in f32
//! (kvpress: the model dtype), the mean rotation's cos/sin averaged in f64 over f32 angles
//! (kvpress: averaged in the model dtype).
use candle_core::{DType, Device, Result, Tensor, D};

use super::policy::{lowest_after_prefill, zero_scores, LayerKeys, Phase, Policy, SeqView};
use super::query_stats::QueryStats;
use super::ranks::RankSplit;
use crate::kvcache::blocks::EvictionPlan;
use crate::kvcache::Probe;
use crate::model::Config;

/// The policy (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedAttention {
    /// Future positions the rotation is averaged over.
    pub n_future_positions: usize,
    /// First positions left out of the query statistics and the softmax, and kept.
    pub n_sink: usize,
    /// Add the covariance term `k^T Sigma' k / (2 d)`.
    pub use_covariance: bool,
    /// Multiply by the value norm.
    pub use_vnorm: bool,
    /// Added to the scores before the value norm.
    pub epsilon: f32,
    /// The model's RoPE inverse frequencies `[head_dim / 2]`, its scaling applied (fixed once
    /// a rotation was made: [`ExpectedAttention::rotation`] keeps the last one).
    pub inv_freq: Vec<f32>,
    last_rotation: LastRotation,
}

/// The last rotation made, with its sequence length and future positions: every layer and
/// every budget's fork of a prompt asks for the same one. A clone starts empty; it never
/// takes part in equality.
#[derive(Default)]
struct LastRotation(std::sync::Mutex<Option<(usize, usize, Tensor)>>);

impl Clone for LastRotation {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for LastRotation {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for LastRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastRotation")
    }
}

impl ExpectedAttention {
    /// kvpress's defaults for a model of `cfg`.
    pub fn new(cfg: &Config) -> Self {
        Self::with_inv_freq(cfg.rope.inv_freq(cfg.head_dim))
    }

    /// kvpress's defaults for RoPE inverse frequencies `inv_freq` `[head_dim / 2]`.
    pub fn with_inv_freq(inv_freq: Vec<f32>) -> Self {
        ExpectedAttention {
            n_future_positions: 512,
            n_sink: 4,
            use_covariance: true,
            use_vnorm: true,
            epsilon: 0.0,
            inv_freq,
            last_rotation: LastRotation::default(),
        }
    }

    /// Mean cos and sin, per frequency, of the angles of positions `start .. start +
    /// n_future_positions` (angles `p * f` in f32, as transformers' rotary tables).
    pub fn mean_rotation(&self, start: usize) -> (Vec<f64>, Vec<f64>) {
        let n = self.n_future_positions.max(1);
        self.inv_freq
            .iter()
            .map(|&f| {
                let (mut c, mut s) = (0f64, 0f64);
                for p in start..start + n {
                    let a = (p as f32 * f) as f64;
                    c += a.cos();
                    s += a.sin();
                }
                (c / n as f64, s / n as f64)
            })
            .unzip()
    }

    /// The mean rotation `[d, d]` f32 for a sequence of `seq_len` tokens: `R[i][i] = cos_i`,
    /// `R[i][i + d/2] = -sin_i`, `R[i + d/2][i] = sin_i` (`x -> x cos + rotate_half(x) sin`).
    pub fn rotation(&self, seq_len: usize, dev: &Device) -> Result<Tensor> {
        let mut last = self
            .last_rotation
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((len, n, r)) = last.as_ref() {
            if (*len, *n) == (seq_len, self.n_future_positions) && r.device().same_device(dev) {
                return Ok(r.clone());
            }
        }
        let r = self.make_rotation(seq_len, dev)?;
        *last = Some((seq_len, self.n_future_positions, r.clone()));
        Ok(r)
    }

    /// [`ExpectedAttention::rotation`], computed.
    fn make_rotation(&self, seq_len: usize, dev: &Device) -> Result<Tensor> {
        let (c, s) = self.mean_rotation(seq_len);
        let h = c.len();
        let d = 2 * h;
        let mut r = vec![0f32; d * d];
        for i in 0..h {
            r[i * d + i] = c[i] as f32;
            r[(i + h) * d + i + h] = c[i] as f32;
            r[i * d + i + h] = -s[i] as f32;
            r[(i + h) * d + i] = s[i] as f32;
        }
        Tensor::from_vec(r, (d, d), dev)
    }

    /// Scores `[n]` f32 of one kv-head's non-sink keys and values `[n, d]` from the rotated
    /// statistics of its group's query heads: `mu` `[g, d]`, `cov` `[g, d, d]` (steps 3-4 of
    /// the module docs).
    pub fn head_scores(
        &self,
        mu: &Tensor,
        cov: Option<&Tensor>,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<Tensor> {
        let k = keys.to_dtype(DType::F32)?;
        let (n, d) = k.dims2()?;
        let g = mu.dim(0)?;
        let mut z = (mu.matmul(&k.t()?)? / (d as f64).sqrt())?; // [g, n]
        if let Some(cov) = cov.filter(|_| self.use_covariance) {
            // k Sigma_h for every head h at once: [n, d] x [d, g * d] (rows i, columns (h, j)).
            let m = cov.permute((1, 0, 2))?.reshape((d, g * d))?;
            let ks = k.matmul(&m)?.reshape((n, g, d))?;
            let quad = ks.broadcast_mul(&k.unsqueeze(1)?)?.sum(D::Minus1)?; // [n, g]
            z = (z + (quad.t()? / (2 * d) as f64)?)?;
        }
        let s = candle_nn::ops::softmax_last_dim(&z.contiguous()?)?.mean(0)?; // [n]
        if !self.use_vnorm {
            return Ok(s);
        }
        let vnorm = values.to_dtype(DType::F32)?.sqr()?.sum(D::Minus1)?.sqrt()?;
        (s + self.epsilon as f64)?.mul(&vnorm)
    }

    /// Every kv-head's scores of one layer (see the module docs); slots must be in position
    /// order from 0 (as right after prefill).
    pub fn layer_scores(&self, layer: &LayerKeys) -> Result<Vec<Vec<f32>>> {
        let stats = layer.queries.ok_or_else(|| {
            candle_core::Error::Msg(
                "expected attention needs the prefill's query statistics".into(),
            )
        })?;
        let len = |h: usize| layer.positions.get(h).map_or(0, Vec::len);
        let in_order = layer
            .positions
            .iter()
            .all(|p| p.iter().enumerate().all(|(i, &x)| x as usize == i));
        if !in_order {
            candle_core::bail!(
                "expected attention scores a prefilled sequence's slots in position order"
            );
        }
        let Some((rmu, rcov)) = self.rotated(stats, layer.seq_len)? else {
            // No query past the sinks: nothing to estimate (kvpress asserts L > n_sink).
            return Ok(zero_scores(layer.positions));
        };
        let nkv = layer.heads.len();
        let g = rmu.dim(0)? / nkv.max(1);
        let mut out = Vec::with_capacity(nkv);
        for (h, (k, v)) in layer.heads.iter().enumerate() {
            let n = len(h).saturating_sub(self.n_sink);
            if n == 0 {
                out.push(vec![]);
                continue;
            }
            let cov = rcov.as_ref().map(|c| c.narrow(0, h * g, g)).transpose()?;
            let s = self.head_scores(
                &rmu.narrow(0, h * g, g)?,
                cov.as_ref(),
                &k.narrow(0, self.n_sink, n)?,
                &v.narrow(0, self.n_sink, n)?,
            )?;
            out.push(s.to_vec1::<f32>()?);
        }
        let sink = out.iter().flatten().copied().fold(f32::MIN, f32::max) + 1.0;
        Ok((0..nkv)
            .map(|h| {
                let sinks = len(h).min(self.n_sink);
                let mut s = vec![sink; sinks];
                s.append(&mut out[h]);
                s
            })
            .collect())
    }

    /// `(R mu, R Sigma R^T)` `[heads, d]`, `[heads, d, d]` of `stats` for a sequence of
    /// `seq_len` tokens (step 2; the covariance only when it is used); `None`: no query
    /// counted.
    fn rotated(
        &self,
        stats: &QueryStats,
        seq_len: usize,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let Some(mu) = stats.mean() else {
            return Ok(None);
        };
        let r = self.rotation(seq_len, mu.device())?;
        let rt = r.t()?.contiguous()?;
        let rcov = match stats.cov()?.filter(|_| self.use_covariance) {
            Some(cov) => {
                // One copy of R (and R^T) per head: batched matmuls take no stride-0 batch.
                let per_head = |m: &Tensor| m.unsqueeze(0)?.broadcast_as(cov.shape())?.contiguous();
                Some(per_head(&r)?.matmul(&cov)?.matmul(&per_head(&rt)?)?)
            }
            None => None,
        };
        Ok(Some((mu.matmul(&rt)?, rcov)))
    }
}

impl Policy for ExpectedAttention {
    fn rank_split(&self) -> RankSplit {
        RankSplit::PerHead
    }
    fn prefill_probe(&self) -> Probe {
        Probe::Queries
    }
    fn score(&self, _: Phase, _: &Tensor, positions: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(zero_scores(positions))
    }
    fn scores_keys(&self) -> bool {
        true
    }
    fn key_scores(&self, layer: &LayerKeys) -> Result<Vec<Vec<f32>>> {
        self.layer_scores(layer)
    }
    fn queries_skipped(&self) -> usize {
        self.n_sink
    }
    fn plan(&self, view: &SeqView, budget: usize, phase: Phase) -> EvictionPlan {
        lowest_after_prefill(view, budget, phase)
    }
    fn min_budget(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::Rope;
    use rand::{Rng, SeedableRng};

    type Rows = Vec<Vec<f64>>;

    /// Plain loops over explicit queries `q[head][position]` (pre-RoPE, every prompt position),
    /// keys and values `[kv_head][position]`: Expected Attention's scores of every slot as
    /// kvpress computes them, with `R` built column by column from its definition
    /// `x -> x cos_p + rotate_half(x) sin_p`. Indexed loops, as the formulas read.
    #[allow(clippy::needless_range_loop)]
    fn twin(ea: &ExpectedAttention, q: &[Rows], k: &[Rows], v: &[Rows]) -> Vec<Vec<f64>> {
        let (nh, nkv, len, d) = (q.len(), k.len(), k[0].len(), k[0][0].len());
        let half = d / 2;
        let mut r = vec![vec![0f64; d]; d];
        for p in len..len + ea.n_future_positions {
            for j in 0..d {
                let x: Vec<f64> = (0..d).map(|i| (i == j) as u8 as f64).collect();
                let rot: Vec<f64> = (0..d)
                    .map(|i| if i < half { -x[i + half] } else { x[i - half] })
                    .collect();
                for i in 0..d {
                    let a = (p as f32 * ea.inv_freq[i % half]) as f64;
                    r[i][j] += (x[i] * a.cos() + rot[i] * a.sin()) / ea.n_future_positions as f64;
                }
            }
        }
        let rows = ea.n_sink..q[0].len();
        let n = rows.len() as f64;
        let mut z = vec![vec![0f64; len - ea.n_sink]; nh];
        for h in 0..nh {
            let mu: Vec<f64> = (0..d)
                .map(|a| rows.clone().map(|t| q[h][t][a]).sum::<f64>() / n)
                .collect();
            let cov: Rows = (0..d)
                .map(|a| {
                    (0..d)
                        .map(|b| {
                            let c = |t: usize| (q[h][t][a] - mu[a]) * (q[h][t][b] - mu[b]);
                            rows.clone().map(c).sum::<f64>() / n
                        })
                        .collect()
                })
                .collect();
            let rmu: Vec<f64> = (0..d)
                .map(|i| (0..d).map(|j| r[i][j] * mu[j]).sum())
                .collect();
            // R Sigma R^T
            let rc = |i: usize, j: usize| -> f64 {
                let mut s = 0.0;
                for a in 0..d {
                    for b in 0..d {
                        s += r[i][a] * cov[a][b] * r[j][b];
                    }
                }
                s
            };
            let rcov: Rows = (0..d).map(|i| (0..d).map(|j| rc(i, j)).collect()).collect();
            let kv = h / (nh / nkv);
            for (j, zj) in z[h].iter_mut().enumerate() {
                let key = &k[kv][ea.n_sink + j];
                let dot: f64 = (0..d).map(|i| rmu[i] * key[i]).sum();
                *zj = dot / (d as f64).sqrt();
                if ea.use_covariance {
                    let mut quad = 0.0;
                    for a in 0..d {
                        for b in 0..d {
                            quad += key[a] * rcov[a][b] * key[b];
                        }
                    }
                    *zj += quad / d as f64 / 2.0;
                }
            }
            let m = z[h].iter().copied().fold(f64::MIN, f64::max);
            let sum: f64 = z[h].iter().map(|x| (x - m).exp()).sum();
            z[h].iter_mut().for_each(|x| *x = (*x - m).exp() / sum);
        }
        let g = nh / nkv;
        let mut out: Vec<Vec<f64>> = (0..nkv)
            .map(|kv| {
                (0..len - ea.n_sink)
                    .map(|j| {
                        let s = (kv * g..(kv + 1) * g).map(|h| z[h][j]).sum::<f64>() / g as f64;
                        let vn = v[kv][ea.n_sink + j]
                            .iter()
                            .map(|x| x * x)
                            .sum::<f64>()
                            .sqrt();
                        if ea.use_vnorm {
                            (s + ea.epsilon as f64) * vn
                        } else {
                            s
                        }
                    })
                    .collect()
            })
            .collect();
        let max = out.iter().flatten().copied().fold(f64::MIN, f64::max);
        for o in out.iter_mut() {
            let mut s = vec![max + 1.0; ea.n_sink];
            s.append(o);
            *o = s;
        }
        out
    }

    fn random_rows(
        rng: &mut impl Rng,
        heads: usize,
        len: usize,
        d: usize,
        scale: f64,
    ) -> Vec<Rows> {
        (0..heads)
            .map(|_| {
                (0..len)
                    .map(|_| (0..d).map(|_| rng.random_range(-scale..scale)).collect())
                    .collect()
            })
            .collect()
    }

    fn tensor(rows: &[Rows]) -> Tensor {
        let (h, t, d) = (rows.len(), rows[0].len(), rows[0][0].len());
        let v: Vec<f32> = rows.iter().flatten().flatten().map(|&x| x as f32).collect();
        Tensor::from_vec(v, (h, t, d), &Device::Cpu).unwrap()
    }

    /// kvc's scores: the statistics accumulated in prefill chunks of `chunk` positions.
    fn kvc_scores(
        ea: &ExpectedAttention,
        q: &[Rows],
        k: &[Rows],
        v: &[Rows],
        chunk: usize,
    ) -> Vec<Vec<f32>> {
        let qt = tensor(q).unsqueeze(0).unwrap();
        let len = q[0].len();
        let mut stats = QueryStats::default();
        for start in (0..len).step_by(chunk) {
            let n = chunk.min(len - start);
            stats
                .add(&qt.narrow(2, start, n).unwrap(), ea.n_sink)
                .unwrap();
        }
        let (kt, vt) = (tensor(k), tensor(v));
        let heads: Vec<(Tensor, Tensor)> = (0..k.len())
            .map(|h| (kt.get(h).unwrap(), vt.get(h).unwrap()))
            .collect();
        let positions = vec![(0..len as u32).collect::<Vec<u32>>(); k.len()];
        ea.layer_scores(&LayerKeys {
            heads: &heads,
            positions: &positions,
            seq_len: len,
            queries: Some(&stats),
            layer: 0,
            budget: None,
            metric: &[],
            out_proj: None,
        })
        .unwrap()
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f64>], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.len(), w.len(), "{what}");
            for (x, y) in g.iter().zip(w) {
                assert!(
                    (*x as f64 - y).abs() <= 1e-4 * y.abs().max(1e-3),
                    "{what}: {x} vs {y}\n{got:?}\n{want:?}"
                );
            }
        }
    }

    /// The candle path (chunked statistics, rotated moments, batched quadratic forms) equals
    /// the loops on random queries, keys and values, GQA groups of 3, for every switch.
    #[test]
    fn scores_equal_the_scalar_twin() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let (nh, nkv, len, d) = (6, 2, 40, 8);
        let q = random_rows(&mut rng, nh, len, d, 1.5);
        let k = random_rows(&mut rng, nkv, len, d, 1.0);
        let v = random_rows(&mut rng, nkv, len, d, 1.0);
        let base = ExpectedAttention::with_inv_freq(Rope::plain(10_000.0).inv_freq(d));
        for ea in [
            base.clone(),
            ExpectedAttention {
                use_covariance: false,
                ..base.clone()
            },
            ExpectedAttention {
                use_vnorm: false,
                ..base.clone()
            },
            ExpectedAttention {
                epsilon: 0.01,
                n_sink: 1,
                n_future_positions: 7,
                ..base.clone()
            },
        ] {
            let want = twin(&ea, &q, &k, &v);
            for chunk in [len, 16, 3] {
                let got = kvc_scores(&ea, &q, &k, &v, chunk);
                assert_close(&got, &want, &format!("{ea:?}, chunk {chunk}"));
            }
        }
    }

    /// d = 2 (one frequency, pi/2 per position), one head, n_sink 1, 2 future positions, a
    /// prompt of 5 tokens. Queries after the sink: (3,1), (1,1), (2,2), (2,0): mean (2,1),
    /// centred rows (+-1,0), (0,+-1), covariance I/2 (the sink's query (100,-50) left out).
    /// Future positions 5 and 6: angles 5pi/2 and 3pi, mean cos (0 - 1)/2 = -1/2, mean sin
    /// (1 + 0)/2 = 1/2, so R = [[-1/2, -1/2], [1/2, -1/2]], R mu = (-3/2, 1/2),
    /// R (I/2) R^T = (c^2 + s^2) I/2 = I/4.
    /// z = (R mu . k)/sqrt(2) + (k^T I/4 k)/(2*2) = (R mu . k)/sqrt(2) + |k|^2/16 for the
    /// keys (0,0), (-r,0), (0,r), (r,r) with r = sqrt(2):
    /// z = 0, 3/2 + 1/8, 1/2 + 1/8, -1 + 1/4 = [0, 1.625, 0.625, -0.75];
    /// without the covariance z = [0, 1.5, 0.5, -1]. Scores: softmax(z) times the value norms
    /// 1, 2, 1, 3; the sink scores their maximum + 1.
    #[test]
    fn hand_computed_scores() {
        let r = 2f64.sqrt();
        let q: Vec<Rows> = vec![vec![
            vec![100.0, -50.0],
            vec![3.0, 1.0],
            vec![1.0, 1.0],
            vec![2.0, 2.0],
            vec![2.0, 0.0],
        ]];
        let k: Vec<Rows> = vec![vec![
            vec![9.0, 9.0],
            vec![0.0, 0.0],
            vec![-r, 0.0],
            vec![0.0, r],
            vec![r, r],
        ]];
        let v: Vec<Rows> = vec![vec![
            vec![5.0, 5.0],
            vec![1.0, 0.0],
            vec![0.0, 2.0],
            vec![0.0, -1.0],
            vec![3.0, 0.0],
        ]];
        let ea = ExpectedAttention {
            n_future_positions: 2,
            n_sink: 1,
            use_covariance: true,
            use_vnorm: true,
            epsilon: 0.0,
            ..ExpectedAttention::with_inv_freq(vec![std::f32::consts::FRAC_PI_2])
        };
        let expected = |z: [f64; 4], eps: f64| -> Vec<Vec<f64>> {
            let e: Vec<f64> = z.iter().map(|x| x.exp()).collect();
            let sum: f64 = e.iter().sum();
            let s: Vec<f64> = e
                .iter()
                .zip([1.0, 2.0, 1.0, 3.0])
                .map(|(x, n)| (x / sum + eps) * n)
                .collect();
            let max = s.iter().copied().fold(f64::MIN, f64::max);
            vec![[vec![max + 1.0], s].concat()]
        };
        let got = kvc_scores(&ea, &q, &k, &v, 5);
        assert_close(
            &got,
            &expected([0.0, 1.625, 0.625, -0.75], 0.0),
            "covariance",
        );
        // The loops agree on the hand case too.
        assert_close(&got, &twin(&ea, &q, &k, &v), "twin");
        let no_cov = ExpectedAttention {
            use_covariance: false,
            epsilon: 0.5,
            ..ea
        };
        let got = kvc_scores(&no_cov, &q, &k, &v, 2);
        assert_close(&got, &expected([0.0, 1.5, 0.5, -1.0], 0.5), "mean only");
    }

    #[test]
    fn rotation_is_the_mean_of_rope() {
        let ea = ExpectedAttention {
            n_future_positions: 2,
            ..ExpectedAttention::with_inv_freq(vec![std::f32::consts::FRAC_PI_2])
        };
        let r: Vec<Vec<f32>> = ea.rotation(5, &Device::Cpu).unwrap().to_vec2().unwrap();
        let want = [[-0.5, -0.5], [0.5, -0.5]];
        for (a, b) in r.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-6, "{r:?}");
        }
        // Kept for the next layer, made anew for another length.
        let again: Vec<Vec<f32>> = ea.rotation(5, &Device::Cpu).unwrap().to_vec2().unwrap();
        assert_eq!(again, r);
        let other: Vec<Vec<f32>> = ea.rotation(4, &Device::Cpu).unwrap().to_vec2().unwrap();
        let want4 = ea
            .make_rotation(4, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(other, want4);
        assert_ne!(other, r);
    }

    #[test]
    fn plan_evicts_the_lowest_and_keeps_the_sinks() {
        use crate::compress::policy::HeadView;
        let ea = ExpectedAttention::with_inv_freq(vec![1.0]);
        let view = SeqView {
            seq_len: 6,
            block_size: 16,
            heads: vec![vec![HeadView {
                metric: vec![9.0, 9.0, 0.5, 0.1, 0.3, 0.2],
                position: vec![0, 1, 2, 3, 4, 5],
            }]],
        };
        let p = ea.plan(&view, 3, Phase::Prefill);
        assert_eq!(p, EvictionPlan::from_heads(vec![vec![3, 5, 4]], 1));
    }
}
