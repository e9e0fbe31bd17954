//! Tensor parallelism's collectives (issue 29): which slice of the model a rank holds
//! ([`Shard`]) and the two collectives the forward needs ([`Comm`]: a sum over ranks after the
//! row-parallel projections, a gather of the vocabulary-parallel logits).
//!
//! [`ThreadComm`] is the in-process twin: the ranks are threads of one process whose tensors
//! meet in host memory. It is the CPU path of `--tensor-parallel` and the oracle the NCCL
//! communicator is checked against. Its reduction adds the ranks' tensors in rank order on
//! every rank, so all ranks hold the same bits afterwards (what a greedy decode needs: every
//! rank must pick the same token).
use candle_core::{Device, Result, Tensor, D};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

/// One rank's place in a tensor-parallel group of `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole model on one rank.
    pub const ONE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's contiguous part of `n` items (heads, rows, vocabulary entries); `n` must be
    /// a multiple of `world` (`what` names the items in the error).
    pub fn part(&self, n: usize, what: &str) -> std::result::Result<Range<usize>, String> {
        if self.world == 0 || self.rank >= self.world {
            return Err(format!("rank {} of a group of {}", self.rank, self.world));
        }
        if n % self.world != 0 {
            return Err(format!(
                "{what} ({n}) do not divide among {} tensor-parallel ranks: use a degree that divides {n}",
                self.world
            ));
        }
        let each = n / self.world;
        Ok(self.rank * each..(self.rank + 1) * each)
    }
}

impl Shard {
    /// This rank's part of `n` items cut in `world` parts of `n.div_ceil(world)` each (the
    /// last part shorter, or empty): its range and the part size every rank pads to (a
    /// vocabulary that does not divide; the padding is cut again after the gather).
    pub fn padded_part(&self, n: usize) -> (Range<usize>, usize) {
        let each = n.div_ceil(self.world.max(1));
        let start = (self.rank * each).min(n);
        (start..(start + each).min(n), each)
    }
}

/// The collectives of one rank (every rank of a group calls each one in the same order).
pub trait Comm: Send + Sync {
    /// Where this rank sits.
    fn shard(&self) -> Shard;
    /// The elementwise sum of every rank's `x` (same shape and dtype on every rank), the same
    /// bits on every rank, on this rank's device.
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Every rank's `x` concatenated along the last dimension in rank order (the other
    /// dimensions equal on every rank), on this rank's device.
    fn all_gather_last(&self, x: &Tensor) -> Result<Tensor>;
    /// Break the group after this rank failed (`why`): every rank waiting in or later
    /// entering a collective gets an error instead of waiting forever.
    fn abort(&self, why: &str);
}

/// The tensors the ranks put down for one collective, and the barrier they meet at (one
/// that a failing rank can break: [`Comm::abort`]).
struct Meeting {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    slots: Vec<Option<Tensor>>,
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

/// One rank of a group of threads in one process (see the module docs).
#[derive(Clone)]
pub struct ThreadComm {
    shard: Shard,
    meeting: Arc<Meeting>,
}

impl ThreadComm {
    /// The `world` ranks of one group; hand each to its own thread.
    pub fn group(world: usize) -> Vec<ThreadComm> {
        let meeting = Arc::new(Meeting {
            world,
            state: Mutex::new(State {
                slots: vec![None; world],
                arrived: 0,
                generation: 0,
                aborted: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadComm {
                shard: Shard { rank, world },
                meeting: meeting.clone(),
            })
            .collect()
    }

    /// Every rank's `x` on the host, in rank order. Two barriers: all have put theirs down
    /// before any reads; all have read before any puts down the next collective's.
    fn exchange(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let host = x.to_device(&Device::Cpu)?;
        self.lock()?.slots[self.shard.rank] = Some(host);
        self.wait()?;
        let all: Vec<Option<Tensor>> = self.lock()?.slots.clone();
        self.wait()?;
        all.into_iter()
            .enumerate()
            .map(|(r, t)| {
                t.ok_or_else(|| candle_core::Error::Msg(format!("rank {r} put nothing down")))
            })
            .collect()
    }

    /// The state, or the error of an aborted group.
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        // A rank that panicked while holding the lock leaves whole slots (each write is one
        // assignment); its thread's failure aborts the group.
        let st = self
            .meeting
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &st.aborted {
            Some(why) => Err(aborted(why)),
            None => Ok(st),
        }
    }

    /// A barrier of the group's ranks; an error once the group was aborted.
    fn wait(&self) -> Result<()> {
        let mut st = self.lock()?;
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.meeting.world {
            st.arrived = 0;
            st.generation += 1;
            self.meeting.cv.notify_all();
            return Ok(());
        }
        while st.generation == generation {
            st = self
                .meeting
                .cv
                .wait(st)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(why) = &st.aborted {
                return Err(aborted(why));
            }
        }
        Ok(())
    }
}

fn aborted(why: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("tensor-parallel group aborted: {why}"))
}

impl Comm for ThreadComm {
    fn shard(&self) -> Shard {
        self.shard
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange(x)?;
        let mut sum = all[0].clone();
        for t in &all[1..] {
            sum = (sum + t)?;
        }
        sum.to_device(x.device())
    }

    fn all_gather_last(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange(x)?;
        Tensor::cat(&all, D::Minus1)?.to_device(x.device())
    }

    fn abort(&self, why: &str) {
        let mut st = self
            .meeting
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        st.aborted
            .get_or_insert_with(|| format!("rank {}: {why}", self.shard.rank));
        self.meeting.cv.notify_all();
    }
}

/// Runs `f(rank's comm)` on one thread per rank of a `world`-rank [`ThreadComm`] group;
/// returns the results in rank order (for unit tests of code that meets in collectives).
#[cfg(test)]
pub(crate) fn on_ranks<T: Send>(world: usize, f: impl Fn(ThreadComm) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(world)
            .into_iter()
            .map(|c| s.spawn(|| f(c)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_items_in_rank_order_or_name_the_misfit() {
        let parts: Vec<_> = (0..4)
            .map(|rank| Shard { rank, world: 4 }.part(32, "heads").unwrap())
            .collect();
        assert_eq!(parts, vec![0..8, 8..16, 16..24, 24..32]);
        assert_eq!(Shard::ONE.part(7, "heads").unwrap(), 0..7);
        let e = Shard { rank: 0, world: 3 }.part(8, "kv-heads").unwrap_err();
        assert!(
            e.contains("kv-heads (8)") && e.contains("3 tensor-parallel"),
            "{e}"
        );
        assert!(Shard { rank: 2, world: 2 }.part(8, "x").is_err());
        let padded: Vec<_> = (0..4)
            .map(|rank| Shard { rank, world: 4 }.padded_part(10))
            .collect();
        assert_eq!(padded, vec![(0..3, 3), (3..6, 3), (6..9, 3), (9..10, 3)]);
        assert_eq!(Shard { rank: 3, world: 4 }.padded_part(6), (6..6, 2));
    }

    /// Sums and gathers equal the plain ones, three collectives in a row (the barriers keep
    /// one collective's slots from the next's), identical on every rank.
    #[test]
    fn collectives_equal_the_plain_sum_and_concatenation() {
        let world = 3;
        let input = |r: usize, k: usize| {
            let v: Vec<f32> = (0..6)
                .map(|i| (r * 10 + i + k * 100) as f32 * 0.37)
                .collect();
            Tensor::from_vec(v, (2, 3), &Device::Cpu).unwrap()
        };
        let out = on_ranks(world, |c| {
            let r = c.shard().rank;
            let s1 = c.all_reduce_sum(&input(r, 0)).unwrap();
            let g = c.all_gather_last(&input(r, 1)).unwrap();
            let s2 = c.all_reduce_sum(&input(r, 2)).unwrap();
            (
                s1.to_vec2::<f32>().unwrap(),
                g.to_vec2::<f32>().unwrap(),
                s2.to_vec2::<f32>().unwrap(),
            )
        });
        for k in [0, 2] {
            let mut want = input(0, k);
            for r in 1..world {
                want = (want + input(r, k)).unwrap();
            }
            let want = want.to_vec2::<f32>().unwrap();
            for o in &out {
                assert_eq!(if k == 0 { &o.0 } else { &o.2 }, &want);
            }
        }
        let parts: Vec<Tensor> = (0..world).map(|r| input(r, 1)).collect();
        let want = Tensor::cat(&parts, 1).unwrap().to_vec2::<f32>().unwrap();
        assert!(out.iter().all(|o| o.1 == want));
        assert_eq!(out[0].1[0].len(), 9);
    }

    /// A rank that fails aborts the group: the ranks waiting in a collective get the error
    /// (naming the rank and why) instead of waiting forever, and so does every later call.
    #[test]
    fn an_aborted_group_releases_the_waiting_ranks() {
        let x = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let out = on_ranks(3, |c| {
            if c.shard().rank == 1 {
                c.abort("out of memory");
                return vec![];
            }
            let first = c.all_reduce_sum(&x).map(|_| ()).map_err(|e| e.to_string());
            let later = c.all_gather_last(&x).map(|_| ()).map_err(|e| e.to_string());
            vec![first, later]
        });
        for r in [0, 2] {
            for res in &out[r] {
                let e = res.clone().unwrap_err();
                assert!(e.contains("aborted: rank 1: out of memory"), "{e}");
            }
        }
    }
}
