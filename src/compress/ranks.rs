//! Compression under tensor parallelism (docs/design.md, "Tensor parallel"): each rank holds
//! the paged cache of its kv-heads and plans their evictions. A method whose plan reads one
//! head at a time plans alone ([`RankSplit::PerHead`]); KV-Compress, which ranks the blocks of
//! every head of a sequence together, agrees with the other ranks on the one-GPU selection
//! through a [`RankExchange`] ([`RankSplit::Exchange`]); the others are refused by name.
//!
//! Every rank calls the exchange's collectives in the same order: plans are made sequence by
//! sequence on one thread (the engine's [`crate::engine::StepWork::Ordered`]), and whether a
//! rank exchanges depends only on values every rank shares (the budget, the summed blocks).
use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

use super::policy::{Phase, Policy, SeqView};
use crate::cuda::comm::{Comm, Shard};
use crate::cuda::select::Candidate;
use crate::kvcache::blocks::EvictionPlan;
use crate::model::Llama;

/// How a policy's plan runs when the kv-heads are split among ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankSplit {
    /// Each head's evictions depend on that head's slots alone: every rank plans its heads.
    PerHead,
    /// The plan ranks several heads together and exchanges candidates
    /// ([`Policy::plan_exchanged`]).
    Exchange,
    /// The plan spans heads and has no exchange (yet): refused under tensor parallelism.
    Unsupported,
}

/// One rank's side of the exchange: the group and the device its collectives run on.
#[derive(Clone)]
pub struct RankExchange {
    comm: Arc<dyn Comm>,
    device: Device,
}

impl RankExchange {
    pub fn new(comm: Arc<dyn Comm>, device: Device) -> Self {
        RankExchange { comm, device }
    }

    /// The exchange of `model`'s tensor-parallel group on its device (`None`: the whole model
    /// is here).
    pub fn of(model: &Llama) -> Option<Self> {
        model
            .comm()
            .map(|c| RankExchange::new(c.clone(), model.device.clone()))
    }

    /// Where this rank sits.
    pub fn shard(&self) -> Shard {
        self.comm.shard()
    }

    /// The sum over ranks of `n` (each rank's count of something its heads hold).
    pub fn sum(&self, n: usize) -> Result<usize> {
        Ok(self.sum_each(&[n])?[0])
    }

    /// The elementwise sum over ranks of `v` (the same length on every rank).
    pub fn sum_each(&self, v: &[usize]) -> Result<Vec<usize>> {
        if v.is_empty() {
            return Ok(Vec::new());
        }
        let w = v
            .iter()
            .map(|&n| u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{n} > u32"))))
            .collect::<Result<Vec<u32>>>()?;
        let t = Tensor::from_vec(w, v.len(), &self.device)?;
        let s = self.comm.all_reduce_sum(&t)?.to_vec1::<u32>()?;
        Ok(s.into_iter().map(|n| n as usize).collect())
    }

    /// The smallest `n` over ranks.
    pub fn min(&self, n: usize) -> Result<usize> {
        let all = self.gather_u32(vec![n as u32])?;
        Ok(all.iter().map(|r| r[0] as usize).min().unwrap_or(n))
    }

    /// Every rank's `u32` values in rank order (each rank gives `n` of them).
    pub fn gather_u32(&self, mine: Vec<u32>) -> Result<Vec<Vec<u32>>> {
        let n = mine.len();
        if n == 0 {
            return Ok(vec![Vec::new(); self.shard().world]);
        }
        let t = Tensor::from_vec(mine, n, &self.device)?;
        let all = self.comm.all_gather_last(&t)?.to_vec1::<u32>()?;
        Ok(all.chunks(n).map(<[u32]>::to_vec).collect())
    }

    /// Every rank's candidates in rank order, each rank giving at most `k` (the same `k` on
    /// every rank). A candidate travels as three u32: its score's bits, head and index.
    pub fn gather(&self, mine: &[Candidate], k: usize) -> Result<Vec<Vec<Candidate>>> {
        const PAD: u32 = u32::MAX;
        let mut flat = Vec::with_capacity(3 * k);
        for i in 0..k {
            match mine.get(i) {
                Some(&(s, h, j)) => flat.extend([s.to_bits(), h as u32, j as u32]),
                None => flat.extend([PAD; 3]),
            }
        }
        Ok(self
            .gather_u32(flat)?
            .into_iter()
            .map(|r| {
                r.chunks(3)
                    .filter(|c| c[1] != PAD)
                    .map(|c| (f32::from_bits(c[0]), c[1] as usize, c[2] as usize))
                    .collect()
            })
            .collect())
    }
}

/// The plan of `policy` for this rank's heads (`view`), as [`Policy::rank_split`] says.
pub fn plan_on_rank(
    policy: &dyn Policy,
    view: &SeqView,
    budget: usize,
    phase: Phase,
    x: &RankExchange,
) -> Result<EvictionPlan> {
    match policy.rank_split() {
        RankSplit::PerHead => Ok(policy.plan(view, budget, phase)),
        RankSplit::Exchange => policy.plan_exchanged(view, budget, phase, x),
        RankSplit::Unsupported => {
            candle_core::bail!("this method's plan spans kv-heads of several tensor-parallel ranks")
        }
    }
}

/// Kept tokens per `[layer][kv-head]` of the whole model from each rank's `[layer][its
/// kv-heads]` (the heads of rank `r` are the `r`-th part of each layer's).
pub fn gather_per_head(x: &RankExchange, mine: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
    let flat: Vec<u32> = mine.iter().flatten().map(|&n| n as u32).collect();
    let all = x.gather_u32(flat)?;
    let local = mine.first().map_or(0, Vec::len);
    Ok((0..mine.len())
        .map(|l| {
            all.iter()
                .flat_map(|r| r[l * local..(l + 1) * local].iter().map(|&n| n as usize))
                .collect()
        })
        .collect())
}

/// The global index, in one GPU's `(layer, kv-head)` order, of this rank's head `i` (its
/// heads in `(layer, local head)` order, `local` per layer).
pub fn global_head(i: usize, local: usize, shard: Shard) -> usize {
    let (layer, h) = (i / local.max(1), i % local.max(1));
    layer * local * shard.world + shard.rank * local + h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::comm::on_ranks;

    #[test]
    fn candidates_and_counts_travel_whole() {
        let out = on_ranks(3, |c| {
            let x = RankExchange::new(Arc::new(c), Device::Cpu);
            let r = x.shard().rank;
            let mine: Vec<Candidate> = (0..r).map(|j| (-(j as f32) - 0.5, r * 10, j)).collect();
            let per_head = vec![vec![r, r + 1], vec![r + 2, r + 3]];
            assert_eq!(x.sum_each(&[r, 2 * r, 7]).unwrap(), vec![3, 6, 21]);
            assert_eq!(x.min(5 - r).unwrap(), 3);
            (
                x.sum(r + 1).unwrap(),
                x.gather(&mine, 2).unwrap(),
                gather_per_head(&x, &per_head).unwrap(),
            )
        });
        for (sum, cands, per_head) in out {
            assert_eq!(sum, 6);
            assert_eq!(
                cands,
                vec![
                    vec![],
                    vec![(-0.5, 10, 0)],
                    vec![(-0.5, 20, 0), (-1.5, 20, 1)]
                ]
            );
            assert_eq!(
                per_head,
                vec![vec![0, 1, 1, 2, 2, 3], vec![2, 3, 3, 4, 4, 5]]
            );
        }
        let s = Shard { rank: 1, world: 2 };
        assert_eq!(
            (0..6).map(|i| global_head(i, 3, s)).collect::<Vec<_>>(),
            [3, 4, 5, 9, 10, 11]
        );
    }
}
