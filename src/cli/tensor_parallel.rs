//! `--tensor-parallel N`: the model split over N ranks, one thread of this process per rank
//! (`docs/design.md`, "Tensor parallel"), each loading its part ([`model::load_shard`]) on its
//! device: N threads of the CPU (the collectives meet in host memory, [`ThreadComm`]), or the
//! GPUs cuda:K..K+N-1 for `--device cuda:K` (NCCL, [`NcclComm`]). Every rank runs the same
//! command on its part; rank 0's result is the command's. A rank that fails aborts the group,
//! so the others return instead of waiting in a collective, and the first failure is reported.
use candle_core::Device;
use std::sync::Arc;

use super::model_args::ModelArgs;
use crate::cuda::comm::{Comm, Shard, ThreadComm};
use crate::cuda::nccl::{NcclComm, UniqueId};
use crate::model::{self, LoadedModel};

/// Runs `f(rank, its model)` on every rank of a `world`-rank group; returns rank 0's result,
/// or the first rank's error (not one that only says the group was aborted).
pub fn on_ranks<T: Send>(
    args: &ModelArgs,
    world: usize,
    f: impl Fn(usize, LoadedModel) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<T> {
    let first = args.device()?;
    let dtype = args.dtype(&first)?;
    let resolved = args.resolve()?;
    let plan = RankPlan::new(&first, world)?;
    let results: Vec<anyhow::Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (plan, resolved, f) = (&plan, &resolved, &f);
                s.spawn(move || {
                    let shard = Shard { rank, world };
                    let (dev, comm) = plan.join(shard)?;
                    let run = || -> anyhow::Result<T> {
                        let lm = args.load_resolved(resolved, &dev, dtype, Some(comm.clone()))?;
                        if let Some(note) = lm.weights_note().filter(|_| rank == 0) {
                            eprintln!("{note}");
                        }
                        f(rank, lm)
                    };
                    run().inspect_err(|e| comm.abort(&format!("{e:#}")))
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("tensor-parallel rank {rank} panicked"))
                })
            })
            .collect()
    });
    let mut first_err = None;
    let mut rank0 = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) if rank == 0 => rank0 = Some(v),
            Ok(_) => {}
            Err(e) => {
                let secondary = format!("{e:#}").contains("tensor-parallel group aborted");
                if first_err.as_ref().is_none_or(|(s, _)| *s && !secondary) {
                    first_err =
                        Some((secondary, e.context(format!("tensor-parallel rank {rank}"))));
                }
            }
        }
    }
    match (first_err, rank0) {
        (Some((_, e)), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => anyhow::bail!("tensor-parallel rank 0 returned nothing"),
    }
}

/// How the ranks find their devices and their group.
enum RankPlan {
    /// N threads of the CPU, one in-process group.
    Cpu(Vec<ThreadComm>),
    /// The GPUs `first..first + world` (opened before any rank joins, so a missing one is an
    /// error, not a rank waiting for it), one NCCL group.
    Cuda { devices: Vec<Device>, id: UniqueId },
}

impl RankPlan {
    fn new(first: &Device, world: usize) -> anyhow::Result<RankPlan> {
        match first {
            Device::Cpu => Ok(RankPlan::Cpu(ThreadComm::group(world))),
            Device::Cuda(_) => {
                let ordinal = match first.location() {
                    candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                    _ => 0,
                };
                let devices = (ordinal..ordinal + world)
                    .map(|o| {
                        model::parse_device(&format!("cuda:{o}")).map_err(|e| {
                            anyhow::anyhow!(
                                "--tensor-parallel {world} from cuda:{ordinal} needs GPUs {ordinal}..{}: {e}",
                                ordinal + world - 1
                            )
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let id = UniqueId::new().map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(RankPlan::Cuda { devices, id })
            }
            other => anyhow::bail!("--tensor-parallel runs on the CPU or CUDA GPUs, not {other:?}"),
        }
    }

    /// This rank's device and its place in the group (on a GPU: blocks until all joined).
    fn join(&self, shard: Shard) -> anyhow::Result<(Device, Arc<dyn Comm>)> {
        match self {
            RankPlan::Cpu(comms) => Ok((Device::Cpu, Arc::new(comms[shard.rank].clone()))),
            RankPlan::Cuda { devices, id } => {
                let dev = devices[shard.rank].clone();
                let comm = NcclComm::join(id, shard, &dev)?;
                Ok((dev, Arc::new(comm)))
            }
        }
    }
}
