//! `kvc eval --tensor-parallel N`: the model split over N ranks (threads, as for `kvc
//! generate`: [`crate::cli::tensor_parallel::on_ranks`]), every rank running the same sweep on
//! its part. Rank 0 writes the results tree and reports; the others write into scratch copies
//! of it, made before any rank starts (so every rank resumes the same samples) and removed at
//! the end. The ranks take rank 0's memory plan and agree on stopping (`Sweep::ranks`).
use std::path::Path;

use super::{check_methods, select, sweep_loaded, EvalArgs, Loaded, Note};
use crate::compress::ranks::{RankExchange, RankSplit};
use crate::compress::{self, MethodOptions, MethodSpec, METHODS};
use crate::eval::memory::MemoryPlan;
use crate::model::LoadedModel;
use crate::util::Status;

pub(super) fn run(args: EvalArgs, world: usize) -> anyhow::Result<Status> {
    let note = Note(args.output.quiet);
    // Selected once before the ranks start, so data that must be downloaded is fetched once
    // (the ranks select again, from the cache).
    drop(select(&args, &note)?);
    let scratch = Scratch(std::env::temp_dir().join(format!("kvc-tp-{}", std::process::id())));
    for rank in 1..world {
        copy_tree(&args.output.out, &scratch.path().join(rank.to_string()))?;
    }
    super::super::tensor_parallel::on_ranks(&args.model, world, |rank, lm| {
        let mut a = args.clone();
        if rank > 0 {
            a.output.out = scratch.path().join(rank.to_string());
            (a.output.quiet, a.output.no_progress, a.output.json) = (true, true, false);
        }
        let note = Note(a.output.quiet);
        note.say(&format!(
            "model: {} split over {world} tensor-parallel ranks ({:?}, {:?} from rank 0)",
            lm.name, lm.model.dtype, lm.model.device
        ));
        let sel = select(&a, &note)?;
        check_methods(&a, &lm, &sel.plans)?;
        check_rank_split(&a, &lm, &sel.plans)?;
        let x = RankExchange::of(&lm.model).ok_or_else(|| {
            anyhow::anyhow!("tensor-parallel rank {rank} loaded without its group")
        })?;
        let m = Loaded {
            resolved: a.model.resolve()?,
            device: lm.model.device.clone(),
            dtype: lm.model.dtype,
            weight_bytes: None,
            lm,
        };
        sweep_loaded(a, sel, m, &note, Some(x))
    })
}

/// Refuse a run whose method plans across kv-heads without a tensor-parallel exchange,
/// naming the methods that have one.
fn check_rank_split(
    args: &EvalArgs,
    lm: &LoadedModel,
    plans: &[super::RunPlan],
) -> anyhow::Result<()> {
    let splits = |m: &MethodSpec, opts: &MethodOptions| -> anyhow::Result<bool> {
        let p = compress::build_policy(m, lm.config(), opts)?;
        Ok(p.rank_split() != RankSplit::Unsupported)
    };
    for p in plans.iter().filter(|p| !p.is_full()) {
        if splits(&p.method, &p.options(&args.sweep.method_options))? {
            continue;
        }
        let opts = &args.sweep.method_options;
        let mut ok = vec!["full".to_string()];
        for m in METHODS.iter().filter(|&&m| m != "full") {
            if splits(&MethodSpec::parse(m)?, opts)? {
                ok.push(m.to_string());
            }
        }
        anyhow::bail!(
            "method `{}` does not run under --tensor-parallel: its plan ranks kv-heads that other \
             ranks hold, with no exchange between them; methods that run: {} (and +criticalkv on them)",
            p.method.name,
            ok.join(", ")
        );
    }
    Ok(())
}

/// Make every rank's memory plan rank 0's (their free memory differs by a little; the ranks
/// must batch and chunk alike to meet in the same collectives).
pub(super) fn agree_on_plan(x: &RankExchange, plan: &mut MemoryPlan) -> anyhow::Result<()> {
    let split = |v: u64| [(v >> 32) as u32, v as u32];
    let join = |w: &[u32]| (u64::from(w[0]) << 32) | u64::from(w[1]);
    let mut mine = vec![plan.batch as u32, plan.chunk as u32];
    mine.extend(split(plan.free));
    mine.extend(split(plan.activations));
    let all = x.gather_u32(mine)?;
    let r0 = &all[0];
    plan.batch = r0[0] as usize;
    plan.chunk = r0[1] as usize;
    plan.free = join(&r0[2..4]);
    plan.activations = join(&r0[4..6]);
    Ok(())
}

/// A copy of the results tree `from` at `to` (an empty directory when `from` does not exist).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    if !from.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dst = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dst)?;
        } else {
            std::fs::copy(entry.path(), &dst)?;
        }
    }
    Ok(())
}

/// The followers' copies of the results tree, removed when the run ends however it ends.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
