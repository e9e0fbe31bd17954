//! `kvc-step-bench`: times the host work of continual compression in a decode batch — what
//! `engine::decode_batch` does per step besides the forward pass — and prints a table.
//!
//! A paged cache of SmolLM2-135M's shape (30 layers x 3 kv-heads, head dim 64, block 16, f32 on
//! the CPU) holds `--batch` forks of one random `--ctx`-token prompt, each compressed to
//! `--rate` by the method's real hooks. Each decode step appends one random token per sequence
//! and layer (untimed: on a GPU that is the attention kernel), then times, per step:
//! - `observe`: scoring every layer's decode probabilities for every sequence (the metric; on
//!   all cores, `engine::observe_batch`);
//! - `after_step`: writing the metrics, planning (on all cores) and executing the evictions of
//!   every sequence (`engine::step_compression`, as `decode_batch` runs it).
//!
//! On a GPU machine these run on the host between two forward passes, so when they exceed
//! the forward's step time they set the decode speed
//! (docs/findings/2026-12-02-continual-decode-step-breakdown.md).
use candle_core::{DType, Device, Result, Tensor};
use clap::Parser;
use kvc::compress::policy::{CompressHooks, Phase, SeqView};
use kvc::compress::{build_policy, MethodOptions, MethodSpec};
use kvc::cuda::evict::HeadTables;
use kvc::cuda::paged_attention::DecodeShape;
use kvc::engine::{observe_batch, step_compression, Hooks};
use kvc::kvcache::blocks::BlockPool;
use kvc::kvcache::paged::{PagedCache, PagedSpec};
use kvc::kvcache::step_tables::StepTables;
use kvc::kvcache::{AttnCall, CacheBackend, Probe, SeqId};
use kvc::model::config::{Arch, Config};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Time the host work of continual compression per decode step; prints a table")]
struct Args {
    /// Sequences decoding together.
    #[arg(long, default_value_t = 48)]
    batch: usize,
    /// Prompt tokens per sequence, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,4000")]
    ctx: Vec<usize>,
    /// Methods, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kvcompress,h2o,streamingllm"
    )]
    methods: Vec<String>,
    /// Compression rate after prefill.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Timed decode steps (median reported).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Split `after_step` into its parts (snapshot, plan, evict) by running them one by one
    /// instead of through the hooks (decode metrics are then not written to the cache).
    #[arg(long)]
    breakdown: bool,
    /// Threads for the parallel parts, comma-separated (one table row each; default: all
    /// cores). 1 is the sequential baseline.
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Instead: time the host side of a CUDA decode step's block tables (append one token to
    /// every head, tables for every layer, checks, uploads; no device), built per layer against
    /// `StepTables` kept between steps. `--ctx` is then the tokens per head.
    #[arg(long)]
    decode_tables: bool,
}

const LAYERS: usize = 30;
const KV: usize = 3;
const GROUP: usize = 3;
const D: usize = 64;
const BS: usize = 16;

fn smollm2_config() -> Config {
    Config {
        arch: Arch::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: LAYERS,
        num_attention_heads: KV * GROUP,
        num_key_value_heads: KV,
        head_dim: D,
        rms_norm_eps: 1e-5,
        rope: kvc::model::rope::Rope::plain(100000.0),
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: Default::default(),
    }
}

fn attend(
    cache: &mut PagedCache,
    layer: usize,
    seqs: &[SeqId],
    t: usize,
    nh: usize,
    probe: Probe,
) -> Result<Option<Tensor>> {
    let dev = Device::Cpu;
    let b = seqs.len();
    let q = Tensor::randn(0f32, 1.0, (b, nh, t, D), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, KV, t, D), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, KV, t, D), &dev)?;
    let out = cache.attend(AttnCall {
        layer,
        seqs,
        q: &q,
        k: &k,
        v: &v,
        scale: 0.125,
        probe,
    })?;
    Ok(out.probs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ms per step of: observe, after_step, and (with --breakdown) snapshot, plan, evict.
fn run(a: &Args, method: &str, ctx: usize) -> anyhow::Result<Vec<f64>> {
    let cfg = smollm2_config();
    let policy = build_policy(
        &MethodSpec {
            name: method.into(),
        },
        &cfg,
        &MethodOptions::default(),
    )?;
    let heads = LAYERS * KV;
    let budget = ((ctx as f64 / a.rate).ceil() as usize).max(128);
    // Source prompt, then forks: room for every fork at the full prompt (compressed after).
    let blocks = (a.batch + 2) * heads * ((ctx + a.steps + 4).div_ceil(BS) + 1);
    let spec = PagedSpec {
        layers: LAYERS,
        kv_heads: KV,
        head_dim: D,
        block_size: BS,
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let mut cache = PagedCache::new(spec, blocks)?;
    let src = cache.add_sequence()?;
    // Fill in chunks with one query head per kv-head (only the cache's contents matter).
    for layer in 0..LAYERS {
        let mut done = 0;
        while done < ctx {
            let t = 512.min(ctx - done);
            attend(&mut cache, layer, &[src], t, KV, Probe::None)?;
            done += t;
        }
    }
    for l in 0..LAYERS {
        for h in 0..KV {
            let m: Vec<f32> = Tensor::rand(0f32, 1.0, ctx, &Device::Cpu)?.to_vec1()?;
            cache.add_metric(l, src, h, &m)?;
        }
    }
    let budget_of = move |_len: usize| Some(budget);
    let mut seqs = vec![src];
    for _ in 1..a.batch {
        seqs.push(cache.fork_sequence(src)?);
    }
    let mut hooks: Vec<CompressHooks> = seqs
        .iter()
        .map(|_| CompressHooks::new(policy.as_ref(), LAYERS, &budget_of))
        .collect();
    for (h, &s) in hooks.iter_mut().zip(&seqs) {
        h.after_prefill(&mut cache, s)?;
    }
    let probe = hooks[0].decode_probe();
    let live: Vec<usize> = (0..seqs.len()).collect();
    let (mut t_obs, mut t_step, mut t_parts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.steps {
        let mut obs = 0.0;
        for layer in 0..LAYERS {
            let probs = attend(&mut cache, layer, &seqs, 1, KV * GROUP, probe)?;
            if let Some(p) = probs {
                let t = Instant::now();
                let mut hs: Vec<&mut dyn Hooks> =
                    hooks.iter_mut().map(|h| h as &mut dyn Hooks).collect();
                let probes = vec![probe; seqs.len()];
                observe_batch(layer, &p, &cache, &seqs, &mut hs, &live, &probes)?;
                obs += t.elapsed().as_secs_f64() * 1e3;
            }
        }
        let t = Instant::now();
        cache.defer_moves();
        if a.breakdown {
            let mut parts = [0.0; 3];
            for &s in &seqs {
                let t0 = Instant::now();
                let view = SeqView::of(&cache, s)?;
                let t1 = Instant::now();
                let plan = policy.plan(&view, budget, Phase::Decode);
                let t2 = Instant::now();
                cache.evict(s, &plan)?;
                parts[0] += (t1 - t0).as_secs_f64() * 1e3;
                parts[1] += (t2 - t1).as_secs_f64() * 1e3;
                parts[2] += t2.elapsed().as_secs_f64() * 1e3;
            }
            t_parts.push(parts);
        } else {
            // What `engine::decode_batch` runs after each step.
            let mut hs: Vec<&mut dyn Hooks> =
                hooks.iter_mut().map(|h| h as &mut dyn Hooks).collect();
            step_compression(&mut cache, &seqs, &mut hs, &live)?;
        }
        cache.flush_moves()?;
        t_step.push(t.elapsed().as_secs_f64() * 1e3);
        t_obs.push(obs);
    }
    let mut out = vec![median(t_obs), median(t_step)];
    if a.breakdown {
        out.extend((0..3).map(|i| median(t_parts.iter().map(|p| p[i]).collect())));
    }
    Ok(out)
}

/// Median ms per step of a CUDA decode step's table work for `a.batch` sequences of `ctx`
/// tokens per head ([`TableBench`]): tables per layer (the older path); `StepTables` kept
/// between steps; the device eviction's tables built, then built, checked and uploaded; that
/// eviction on the step tables instead; and with every sequence evicting each step, the pool
/// update and the next step's tables, per head with a block diff and per sequence followed by
/// lengths.
fn decode_tables(a: &Args, ctx: usize) -> anyhow::Result<DecodeTables> {
    let mut b = TableBench::new(a, ctx)?;
    let per_layer = b.per_layer()?;
    let (step_tables, tables) = b.step_tables()?;
    let (evict_build, evict_total) = b.evict_tables()?;
    let evict_on_tables = b.evict_on_step_tables(&tables)?;
    let (update_per_head, follow_diff) = b.evicting(false)?;
    let (update_per_seq, follow_lengths) = b.evicting(true)?;
    Ok(DecodeTables {
        per_layer,
        step_tables,
        evict_build,
        evict_total,
        evict_on_tables,
        update_per_head,
        follow_diff,
        update_per_seq,
        follow_lengths,
    })
}

/// The batch the phases of [`decode_tables`] time, `a.steps` steps each.
struct TableBench<'a> {
    a: &'a Args,
    /// Tokens per head at the start (heads differ by less than a block).
    ctx: usize,
    seqs: Vec<SeqId>,
    /// The batch's pool; [`TableBench::step_tables`] appends its steps to it, later phases
    /// start from that state.
    pool: BlockPool,
    num_slots: usize,
    dev: Device,
}

impl<'a> TableBench<'a> {
    /// A pool with room for twice the batch, holding `a.batch` sequences whose heads have
    /// slightly different lengths just under `ctx`, as compressed heads do.
    fn new(a: &'a Args, ctx: usize) -> anyhow::Result<Self> {
        let heads = LAYERS * KV;
        let blocks = 2 * a.batch * heads * ((ctx + a.steps + 4).div_ceil(BS) + 1);
        let mut pool = BlockPool::new(LAYERS, KV, BS, blocks)?;
        let seqs: Vec<SeqId> = (0..a.batch).collect();
        for &s in &seqs {
            pool.add_seq(s)?;
            // Heads of slightly different lengths, as compressed heads are.
            for l in 0..LAYERS {
                for h in 0..KV {
                    let n = ctx - (s + l + h) % BS.min(ctx);
                    let pos: Vec<u32> = (0..n as u32).collect();
                    pool.append(l, s, h, &pos)?;
                }
            }
        }
        Ok(TableBench {
            a,
            ctx,
            seqs,
            pool,
            num_slots: blocks * BS,
            dev: Device::Cpu,
        })
    }

    /// `v` as a u32 tensor on the host device (the upload's stand-in).
    fn up(&self, v: &[u32]) -> Result<Tensor> {
        Tensor::from_slice(v, v.len(), &self.dev)
    }

    /// The older path on a copy of the pool: per step and layer, append one token to every
    /// head, gather that layer's tables, check them and upload slots, positions and tables.
    fn per_layer(&self) -> anyhow::Result<f64> {
        let (a, ctx, seqs) = (self.a, self.ctx, &self.seqs);
        let mut old_pool = self.pool.clone();
        let mut before = Vec::new();
        for step in 0..a.steps {
            let t = Instant::now();
            for l in 0..LAYERS {
                let (mut slots, mut positions) = (Vec::new(), Vec::new());
                for &s in seqs {
                    for h in 0..KV {
                        let x = old_pool.append(l, s, h, &[(ctx + step) as u32])?;
                        slots.push(x[0] as u32);
                        positions.push((ctx + step) as u32);
                    }
                }
                let mut hs = Vec::with_capacity(seqs.len() * KV);
                for &s in seqs {
                    let t = old_pool.table(s)?;
                    hs.extend(t.blocks[l].iter().zip(&t.len[l]).map(|(b, &n)| (&b[..], n)));
                }
                let tables = HeadTables::from_heads(hs);
                let shape = DecodeShape {
                    batch: seqs.len(),
                    num_kv_heads: KV,
                    group: GROUP,
                    head_dim: D,
                    max_blocks: tables.max_blocks(),
                    block_size: BS,
                    probs_stride: ctx + a.steps + 1,
                    num_slots: self.num_slots,
                };
                shape.check_heads(&tables, true)?;
                std::hint::black_box((
                    self.up(&slots)?,
                    self.up(&positions)?,
                    self.up(tables.upload_blocks())?,
                    self.up(&tables.lens)?,
                    self.up(&tables.start)?,
                ));
            }
            before.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(before))
    }

    /// `StepTables` kept between steps: per step, append one token to every sequence of the
    /// pool itself, follow the tables (rebuilt when they cannot follow) and take every layer's.
    /// Returns the median and the tables after the last step.
    fn step_tables(&mut self) -> anyhow::Result<(f64, StepTables)> {
        let (a, ctx) = (self.a, self.ctx);
        let (pool, seqs, dev) = (&mut self.pool, &self.seqs, &self.dev);
        let mut tables = StepTables::build(pool, seqs, dev)?;
        let mut after = Vec::new();
        for step in 0..a.steps {
            let t = Instant::now();
            let with_pos: Vec<(SeqId, u32)> =
                seqs.iter().map(|&s| (s, (ctx + step) as u32)).collect();
            let positions: Vec<u32> = with_pos.iter().map(|p| p.1).collect();
            // As `PagedCache` on a GPU: compressed sequences keep metric and position on the device.
            let app = pool.append_step(&with_pos, |_| false)?;
            if !tables.follow(pool, &app, &positions, &[], &[])? {
                tables = StepTables::build(pool, seqs, dev)?;
                tables.start_step(&app, &positions)?;
            }
            for l in 0..LAYERS {
                std::hint::black_box(tables.layer(l)?);
            }
            after.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((median(after), tables))
    }

    /// The host side of a decode step's device eviction (`PagedCache::evict_on_device`) for
    /// the same batch: every head's tables, sequence-major (the first median), and with their
    /// checks and uploads (the second).
    fn evict_tables(&self) -> anyhow::Result<(f64, f64)> {
        let mut evict = Vec::new();
        for _ in 0..self.a.steps {
            let t = Instant::now();
            let tables = self.pool.head_tables(&self.seqs)?;
            let built = t.elapsed().as_secs_f64() * 1e3;
            tables.check_disjoint(BS, self.num_slots)?;
            std::hint::black_box((
                self.up(tables.upload_blocks())?,
                self.up(&tables.lens)?,
                self.up(&tables.start)?,
            ));
            evict.push((built, t.elapsed().as_secs_f64() * 1e3));
        }
        let build = median(evict.iter().map(|e| e.0).collect());
        let total = median(evict.iter().map(|e| e.1).collect());
        Ok((build, total))
    }

    /// The same eviction on the step tables (`kvc::cuda::evict::kvcompress_evict_on_tables`):
    /// the rows' offsets and lengths, the output offsets, their uploads; no table gathered or
    /// checked.
    fn evict_on_step_tables(&self, tables: &StepTables) -> anyhow::Result<f64> {
        let mut on_tables = Vec::new();
        for _ in 0..self.a.steps {
            let t = Instant::now();
            let (tab, lens) = tables
                .heads_of(&self.seqs)
                .ok_or_else(|| anyhow::anyhow!("the batch's tables lack a sequence"))?;
            let mut start = Vec::with_capacity(tab.len() + 1);
            start.push(0u32);
            for &l in &lens {
                start.push(start[start.len() - 1] + (l as usize).div_ceil(BS) as u32);
            }
            std::hint::black_box((self.up(&tab)?, self.up(&lens)?, self.up(&start)?));
            on_tables.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(on_tables))
    }

    /// Every sequence evicts each step (continual compression), on a copy of the pool: six
    /// heads per sequence lose a block (the device's compaction truncates them). Medians of
    /// the pool update (`by_lengths`: one `truncate_heads` per sequence, else a `truncate` per
    /// head) and of the next step's tables (followed by lengths, else the evicted rows diffed
    /// block by block).
    fn evicting(&self, by_lengths: bool) -> anyhow::Result<(f64, f64)> {
        let (ctx, seqs, dev) = (self.ctx, &self.seqs, &self.dev);
        let mut pool = self.pool.clone();
        let mut tables = StepTables::build(&pool, seqs, dev)?;
        let (mut update, mut follow) = (Vec::new(), Vec::new());
        for step in 0..self.a.steps {
            let t = Instant::now();
            for &s in seqs {
                let lens = &pool.table(s)?.len;
                let new: Vec<u32> = (0..LAYERS * KV)
                    .map(|j| {
                        let n = lens[j / KV][j % KV];
                        // Six heads per sequence, a different six each step.
                        let hit = (j + s + step) % (LAYERS * KV / 6) == 0;
                        (if hit { n.saturating_sub(BS) } else { n }) as u32
                    })
                    .collect();
                if by_lengths {
                    pool.truncate_heads(s, &new)?;
                } else {
                    for (j, &n) in new.iter().enumerate() {
                        if (n as usize) < lens_of(&pool, s, j)? {
                            pool.truncate(j / KV, s, j % KV, n as usize)?;
                        }
                    }
                }
            }
            update.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let with_pos: Vec<(SeqId, u32)> =
                seqs.iter().map(|&s| (s, (ctx + step) as u32)).collect();
            let positions: Vec<u32> = with_pos.iter().map(|p| p.1).collect();
            let app = pool.append_step(&with_pos, |_| false)?;
            let all: Vec<usize> = (0..seqs.len()).collect();
            let (changed, shrunk) = if by_lengths {
                (&[][..], &all[..])
            } else {
                (&all[..], &[][..])
            };
            if !tables.follow(&pool, &app, &positions, changed, shrunk)? {
                tables = StepTables::build(&pool, seqs, dev)?;
                tables.start_step(&app, &positions)?;
            }
            follow.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((median(update), median(follow)))
    }
}

fn lens_of(pool: &BlockPool, s: SeqId, j: usize) -> anyhow::Result<usize> {
    Ok(pool.len(j / KV, s, j % KV)?)
}

/// [`decode_tables`]' medians, ms per step.
struct DecodeTables {
    per_layer: f64,
    step_tables: f64,
    evict_build: f64,
    evict_total: f64,
    evict_on_tables: f64,
    update_per_head: f64,
    follow_diff: f64,
    update_per_seq: f64,
    follow_lengths: f64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.decode_tables {
        println!(
            "# kvc-step-bench --decode-tables: SmolLM2-135M shape (30 x 3 kv-heads, block 16), batch {}, host only; median of {} steps",
            a.batch, a.steps
        );
        println!(
            "{:>6} {:>14} {:>14} {:>7} {:>15} {:>15} {:>15} | {:>22} {:>22}",
            "ctx",
            "per layer ms",
            "step tables",
            "ratio",
            "evict tables",
            "+ checks, up",
            "evict on step",
            "evicting: update+diff",
            "update+lengths (now)"
        );
        for &ctx in &a.ctx {
            let r = decode_tables(&a, ctx)?;
            println!(
                "{ctx:>6} {:>14.2} {:>14.2} {:>6.1}x {:>15.2} {:>15.2} {:>15.2} | {:>10.2} + {:>9.2} {:>10.2} + {:>9.2}",
                r.per_layer,
                r.step_tables,
                r.per_layer / r.step_tables,
                r.evict_build,
                r.evict_total,
                r.evict_on_tables,
                r.update_per_head,
                r.follow_diff,
                r.update_per_seq,
                r.follow_lengths
            );
        }
        return Ok(());
    }
    println!(
        "# kvc-step-bench: SmolLM2-135M shape (30 x 3 kv-heads, d 64, block 16), f32 CPU cache, batch {}, rate {}; median of {} steps; {} cores",
        a.batch,
        a.rate,
        a.steps,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<14} {:>6} {:>7} {:>11} {:>14} {:>10} {:>11}{}",
        "method",
        "ctx",
        "threads",
        "observe ms",
        "after_step ms",
        "total ms",
        "per seq ms",
        if a.breakdown {
            "  snapshot ms    plan ms   evict ms"
        } else {
            ""
        }
    );
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if a.threads.is_empty() {
        vec![all]
    } else {
        a.threads.clone()
    };
    for m in &a.methods {
        for &ctx in &a.ctx {
            for &nt in &threads {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(nt).build()?;
                let r = pool.install(|| run(&a, m, ctx))?;
                let parts: String = r[2..].iter().map(|x| format!(" {x:>12.2}")).collect();
                println!(
                    "{:<14} {:>6} {:>7} {:>11.2} {:>14.2} {:>10.2} {:>11.3}{parts}",
                    m,
                    ctx,
                    nt,
                    r[0],
                    r[1],
                    r[0] + r[1],
                    (r[0] + r[1]) / a.batch as f64
                );
            }
        }
    }
    Ok(())
}
