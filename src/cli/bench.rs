//! `kvc bench`: the KV-Compress paper's throughput benchmark (see [`crate::bench`]).
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;

use super::model_args::ModelArgs;
use crate::bench::report::{self, RowMeta, ThroughputRow};
use crate::bench::{self, synthetic, KvMemory, Schedule, SweepConfig};
use crate::compress::policy::Policy;
use crate::compress::ranks::RankExchange;
use crate::compress::{self, MethodOptions, MethodSpec};
use crate::kvcache::paged::PagedSpec;
use crate::model::{Config, LoadedModel};
use crate::util::{write_atomic, Status};

#[derive(Args, Debug, Clone)]
#[command(
    long_about = "The KV-Compress paper's throughput benchmark: synthetic prompts of each input \
length, greedy decoding of exactly --output-len tokens (stop tokens ignored), continuous batching \
of --num-prompts requests over ONE block pool of --kv-memory bytes; the memory compression frees \
lets more sequences decode at once. The full-cache baseline (same scheduler, no eviction, \
preemption when out of blocks, like vanilla vLLM; method `full`) always runs. Two schedules \
(--schedule): `paper`, the KV-Compress reference's (IsaacRe/vllm-kvcompress): every rate \
compresses, 1x included (a budget of L - 16 per head), every sequence over its budget is \
compressed after each new prefill, and new prefills wait under memory pressure until a sequence \
finishes (method `kvcompress-paper`); `kvc`, kvc's own: rate 1 is the vanilla cache, a new \
sequence is compressed right after its prefill and all are compressed again when the next \
decode step does not fit, new prefills pausing for one step (method `kvcompress`).\n\n\
Writes <out>/bench/<model>/throughput.csv (one row per rate and input length; columns in the \
README), run.json (the configuration) and plots/ (throughput and max batch vs rate and vs input \
length). The CSV is rewritten after every configuration, so an interrupted sweep keeps what \
finished.",
    after_help = "Examples:\n  \
kvc bench --model llama-3.1-8b --device cuda:0 --kv-memory 6GiB          # the paper's sweep\n  \
kvc bench --kv-memory 6GiB --input-lens 6000 --schedule both                 # both schedules\n  \
kvc bench --kv-memory 0.5 --rates 1,8,64 --input-lens 2000 --output-len 500\n  \
kvc bench --device cpu --kv-memory 64MiB --rates 1,4,16,64 --input-lens 256,512 \\\n      \
--output-len 32 --num-prompts 16                                      # a CPU smoke run"
)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Compression rates (comma-separated, each >= 1). The vanilla full cache always runs as
    /// the baseline; under `--schedule paper` rate 1 is also a compressed run (budget L - 16).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub rates: Vec<f64>,
    /// The rates in NVIDIA kvpress's notation, `compression_ratio` (the fraction of KVs
    /// removed, in [0, 1)): 0, 0.5, 0.875 are rates 1, 2, 8. Instead of --rates.
    #[arg(long, value_delimiter = ',', conflicts_with = "rates")]
    pub ratios: Option<Vec<f64>>,
    /// When sequences are compressed and admissions held: paper (the KV-Compress reference's),
    /// kvc (kvc's own), or both (every rate under each; one baseline).
    #[arg(long, value_enum, default_value = "paper")]
    pub schedule: ScheduleArg,
    /// Prompt lengths in tokens (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,4000,6000")]
    pub input_lens: Vec<usize>,
    /// Tokens generated per request (exactly; stop tokens are ignored).
    #[arg(long, default_value_t = 500)]
    pub output_len: usize,
    /// Requests per (rate, input length), all queued at once.
    #[arg(long, default_value_t = 256)]
    pub num_prompts: usize,
    /// KV pool size: bytes with a unit (`2GiB`, `512MiB`, `1000000`) or a fraction of the
    /// device's free memory (`0.5`; CPU: of MemAvailable). Choose it small enough that the full
    /// cache cannot hold every request at once (the output says whether it is memory-bound).
    #[arg(long, value_name = "BYTES|FRACTION", value_parser = bench::parse_kv_memory,
          required_unless_present = "plot_only")]
    pub kv_memory: Option<KvMemory>,
    /// Tokens per cache block (one kv-head of one layer per block).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Floor of cache tokens per head for rate budgets (KV-Compress: 128).
    #[arg(long, default_value_t = 128)]
    pub min_cache_tokens: usize,
    /// Last token positions never evicted (the paper's throughput runs: 32).
    #[arg(long, default_value_t = 32)]
    pub protected_window: usize,
    /// Observation window: last prompt queries scored after prefill.
    #[arg(long, default_value_t = 32)]
    pub kvc_window: usize,
    /// Do not score decode attention into the eviction metric (saves reading probabilities
    /// back every step; decode-time KVs then keep metric 0 and go first once out of the
    /// protected window). Default: scored, as the paper.
    #[arg(long)]
    pub no_decode_metric: bool,
    /// Most sequences decoded at once (vLLM's max_num_seqs).
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
    /// Prefill chunk length in tokens.
    #[arg(long, default_value_t = 1024)]
    pub prefill_chunk: usize,
    /// Most waiting requests of one prompt length prefilled together in one forward pass per
    /// chunk (1 = one at a time). Batching amortises the per-launch cost of prefill, which
    /// otherwise dominates a small model's benchmark once compression makes decode cheap.
    #[arg(long, default_value_t = 8)]
    pub prefill_batch: usize,
    /// Seed of the synthetic prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Results tree root.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Keep the rows of an earlier run in the same directory (same model, output length,
    /// prompts, pool and device) and measure only the missing (rate, input length) pairs; for
    /// sweeps split over several time-limited calls.
    #[arg(long)]
    pub resume: bool,
    /// Only redraw the plots of `<out>/bench/<model>/throughput.csv` (nothing is measured).
    #[arg(long)]
    pub plot_only: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Print the rows as a JSON array on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Split the model over N ranks (tensor parallel; see `kvc eval --help`): each rank's
    /// pool of --kv-memory holds its kv-heads, and the ranks agree on every admission,
    /// compression and preemption, so they run one schedule. Rank 0 writes the rows.
    #[arg(long, visible_alias = "tp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub tensor_parallel: u16,
}

/// `--schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleArg {
    Paper,
    Kvc,
    Both,
}

impl ScheduleArg {
    fn schedules(self) -> Vec<Schedule> {
        match self {
            ScheduleArg::Paper => vec![Schedule::Paper],
            ScheduleArg::Kvc => vec![Schedule::Kvc],
            ScheduleArg::Both => vec![Schedule::Paper, Schedule::Kvc],
        }
    }
}

/// The (rate, schedule) points of a sweep, in the order they run: the vanilla baseline (rate 1
/// under [`Schedule::Kvc`]) first, then each schedule's rates ascending (rate 1 only under
/// [`Schedule::Paper`], where it compresses).
fn points(sw: &SweepConfig, schedules: &[Schedule]) -> Vec<(f64, Schedule)> {
    let mut out = vec![(1.0, Schedule::Kvc)];
    for &s in schedules {
        for r in sw.rates_with_baseline() {
            if r > 1.0 || s == Schedule::Paper {
                out.push((r, s));
            }
        }
    }
    out
}

/// Run `kvc bench`: check the flags; with `--plot-only` only redraw the plots. Otherwise load
/// the model and size the pool ([`setup`]), announce it and write run.json ([`announce`]), warm
/// up, keep what `--resume` may keep, measure every missing (rate, input length) pair
/// ([`measure`]), then draw the plots and print the rows.
pub fn run(args: BenchArgs) -> anyhow::Result<Status> {
    check_flags(&args)?;
    if args.plot_only {
        return plot_only(&args);
    }
    let world = args.tensor_parallel as usize;
    if world > 1 {
        return super::tensor_parallel::on_ranks(&args.model, world, |rank, lm| {
            let x = RankExchange::of(&lm.model).ok_or_else(|| {
                anyhow::anyhow!("tensor-parallel rank {rank} loaded without its group")
            })?;
            if rank == 0 {
                return bench_on(&args, lm, Some(&x));
            }
            let quiet = BenchArgs {
                no_progress: true,
                json: false,
                ..args.clone()
            };
            follow(&quiet, lm, &x)
        });
    }
    bench_on(&args, args.model.load()?, None)
}

/// A tensor-parallel rank other than 0: the same measurements, nothing written or printed.
fn follow(args: &BenchArgs, mut lm: LoadedModel, x: &RankExchange) -> anyhow::Result<Status> {
    let b = setup(args, &lm)?;
    warm_up(&mut lm, &b)?;
    let points = points(&b.sw, &args.schedule.schedules());
    measure(args, &mut lm, &b, &points, None, &mut Vec::new(), Some(x))?;
    Ok(Status::Ok)
}

/// The benchmark on one model (or on rank 0 of a tensor-parallel group, `ranks`).
fn bench_on(
    args: &BenchArgs,
    mut lm: LoadedModel,
    ranks: Option<&RankExchange>,
) -> anyhow::Result<Status> {
    let b = setup(args, &lm)?;
    announce(args, &lm.name, &b)?;
    warm_up(&mut lm, &b)?;
    let points = points(&b.sw, &args.schedule.schedules());
    let total = (points.len() * b.sw.input_lens.len() * b.sw.num_prompts) as u64;
    let bar = progress_bar(args, total);
    let mut rows = resumed_rows(args, &lm.name, &b)?;
    measure(args, &mut lm, &b, &points, bar.as_ref(), &mut rows, ranks)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let n = draw_plots(&rows, &b.dir, &b.csv_path)?;
    eprintln!(
        "wrote {} and {n} plots in {}",
        b.csv_path.display(),
        b.dir.join("plots").display()
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", report::table(&rows));
    }
    Ok(Status::Ok)
}

/// Every size flag is at least 1 and every rate a finite number >= 1.
fn check_flags(args: &BenchArgs) -> anyhow::Result<()> {
    if args.block_size == 0
        || args.max_batch == 0
        || args.prefill_chunk == 0
        || args.prefill_batch == 0
    {
        anyhow::bail!(
            "--block-size, --max-batch, --prefill-chunk and --prefill-batch must be at least 1"
        );
    }
    if let Some(r) = args.rates.iter().find(|r| !(r.is_finite() && **r >= 1.0)) {
        anyhow::bail!("--rates: compression rates must be at least 1 (1 = full cache), got {r}");
    }
    rates(args).map(|_| ())
}

/// `--rates`, or `--ratios` as rates (`1 / (1 - ratio)`).
fn rates(args: &BenchArgs) -> anyhow::Result<Vec<f64>> {
    match &args.ratios {
        None => Ok(args.rates.clone()),
        Some(ratios) => ratios
            .iter()
            .map(|&x| crate::eval::run::rate_from_ratio(x))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--ratios: {e}")),
    }
}

/// `--plot-only`: redraws the plots of the model's existing throughput.csv, loading no weights.
fn plot_only(args: &BenchArgs) -> anyhow::Result<Status> {
    let name = args.model.resolve()?.name;
    let dir = args.out.join("bench").join(&name);
    let csv_path = dir.join("throughput.csv");
    let rows = report::read_csv(&csv_path)?;
    let n = draw_plots(&rows, &dir, &csv_path)?;
    eprintln!("wrote {n} plots in {}", dir.join("plots").display());
    Ok(Status::Ok)
}

/// What every phase after loading the model shares: the sweep, the method and the pool.
struct Bench {
    cfg: Config,
    sw: SweepConfig,
    /// KV-Compress with the flags' options (the baseline rate 1 runs it without hooks).
    policy: Box<dyn Policy>,
    spec: PagedSpec,
    /// Blocks in the pool and bytes per block.
    blocks: usize,
    per_block: u64,
    kv_bytes: u64,
    /// `<out>/bench/<model>` (created) and its throughput.csv.
    dir: PathBuf,
    csv_path: PathBuf,
    /// The device and dtype as the rows and run.json name them.
    device_s: String,
    dtype_s: String,
}

/// Sizes the pool from `--kv-memory` on the model's device, builds KV-Compress, checks that
/// the sweep can run in that pool ([`bench::validate`]) and creates the output directory.
fn setup(args: &BenchArgs, lm: &LoadedModel) -> anyhow::Result<Bench> {
    let cfg = lm.config().clone();
    let device = lm.model.device.clone();
    let dtype = lm.model.dtype;
    let kv_memory = args.kv_memory.ok_or_else(|| {
        anyhow::anyhow!("--kv-memory is required (bytes such as 2GiB, or a fraction such as 0.5)")
    })?;
    let kv_bytes = bench::kv_bytes(kv_memory, &device)?;
    let sw = SweepConfig {
        rates: rates(args)?,
        input_lens: args.input_lens.clone(),
        output_len: args.output_len,
        num_prompts: args.num_prompts,
        kv_bytes,
        block_size: args.block_size,
        min_cache_tokens: args.min_cache_tokens,
        protected_window: args.protected_window,
        prefill_chunk: args.prefill_chunk,
        prefill_batch: args.prefill_batch,
        max_batch: args.max_batch,
        score_decode: !args.no_decode_metric,
        seed: args.seed,
    };
    let opts = MethodOptions {
        block_size: args.block_size,
        min_cache_tokens: args.min_cache_tokens,
        protected_window: args.protected_window,
        kvc_window: args.kvc_window,
        ..Default::default()
    };
    let policy = compress::build_policy(&MethodSpec::parse("kvcompress")?, &cfg, &opts)?;
    let spec = crate::engine::paged_spec(&lm.model, args.block_size);
    let blocks = bench::validate(&sw, &cfg, &spec, policy.min_budget())?;
    let per_block = spec.layout().bytes_per_block();
    let dir = args.out.join("bench").join(&lm.name);
    std::fs::create_dir_all(&dir)?;
    Ok(Bench {
        cfg,
        sw,
        policy,
        spec,
        blocks,
        per_block,
        kv_bytes,
        csv_path: dir.join("throughput.csv"),
        dir,
        device_s: format!("{device:?}"),
        dtype_s: format!("{dtype:?}").to_lowercase(),
    })
}

/// Tells on stderr what the pool holds and whether each input length is memory-bound at the
/// full cache, and writes `<dir>/run.json` (the command and the configuration).
fn announce(args: &BenchArgs, model: &str, b: &Bench) -> anyhow::Result<()> {
    let sw = &b.sw;
    eprintln!(
        "kvc bench: {} on {} ({}); KV pool {} bytes = {} blocks of {} bytes ({} tokens of one kv-head each)",
        model, b.device_s, b.dtype_s, b.kv_bytes, b.blocks, b.per_block, args.block_size
    );
    for &l in &sw.input_lens {
        let fits = bench::full_cache_fits(&b.spec, b.blocks, l, sw.output_len);
        eprintln!(
            "  input {l} + output {}: the full cache holds {fits} of {} sequences at once: {}",
            sw.output_len,
            sw.num_prompts,
            if fits < sw.num_prompts {
                "memory-bound"
            } else {
                "NOT memory-bound (compression cannot raise the batch; use a smaller --kv-memory)"
            }
        );
    }
    let run_json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "model": model,
        "device": b.device_s,
        "dtype": b.dtype_s,
        "kv_memory_bytes": b.kv_bytes,
        "total_blocks": b.blocks,
        "bytes_per_block": b.per_block,
        "sweep": sw,
        "schedules": args.schedule.schedules(),
        "kvc_window": args.kvc_window,
        "tensor_parallel": args.tensor_parallel,
        "kvc_version": env!("CARGO_PKG_VERSION"),
    });
    write_atomic(
        &b.dir.join("run.json"),
        serde_json::to_string_pretty(&run_json)?.as_bytes(),
    )?;
    Ok(())
}

/// Warm-up (kernel loading, allocator) on a small pool, not measured: two short prompts, four
/// output tokens, full cache.
fn warm_up(lm: &mut LoadedModel, b: &Bench) -> anyhow::Result<()> {
    let warm = synthetic::prompts(
        2,
        64.min(b.sw.input_lens[0]),
        b.cfg.vocab_size,
        &bench::excluded_ids(lm),
        99,
    );
    let warm_sw = SweepConfig {
        output_len: 4,
        ..b.sw.clone()
    };
    let need = b.spec.blocks_for_tokens(64 + 4) * 2 + 4 * b.spec.layers * b.spec.kv_heads;
    bench::run_one(
        &mut lm.model,
        b.policy.as_ref(),
        &warm,
        &warm_sw,
        need,
        (1.0, Schedule::Kvc),
        &mut |_| {},
    )?;
    Ok(())
}

/// A bar over `total` requests on stderr, unless `--no-progress` or stderr is not a terminal.
fn progress_bar(args: &BenchArgs, total: u64) -> Option<ProgressBar> {
    (!args.no_progress && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} requests, eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    })
}

/// With `--resume` and an existing throughput.csv: its rows measured with this configuration
/// (model, device, dtype, output length, prompts, pool), said on stderr; otherwise none.
fn resumed_rows(args: &BenchArgs, model: &str, b: &Bench) -> anyhow::Result<Vec<ThroughputRow>> {
    if !(args.resume && b.csv_path.exists()) {
        return Ok(Vec::new());
    }
    let same = |r: &ThroughputRow| {
        r.model == model
            && r.device == b.device_s
            && r.dtype == b.dtype_s
            && r.output_len == b.sw.output_len
            && r.num_prompts == b.sw.num_prompts
            && r.total_blocks == b.blocks
            && r.bytes_per_block == b.per_block
    };
    let old = report::read_csv(&b.csv_path)?;
    let n = old.len();
    let rows: Vec<ThroughputRow> = old.into_iter().filter(same).collect();
    eprintln!(
        "  --resume: keeping {} of {n} rows of {} (the others were measured with another configuration)",
        rows.len(),
        b.csv_path.display()
    );
    Ok(rows)
}

/// Measures every (input length, rate, schedule) not yet in `rows`, input lengths outermost;
/// after each one the rows are sorted (input length, method, rate), their speedups filled and
/// the CSV rewritten, so an interrupted sweep keeps what finished. Under tensor parallelism
/// (`ranks`) rank 0's rows decide what is measured and only rank 0 writes.
fn measure(
    args: &BenchArgs,
    lm: &mut LoadedModel,
    b: &Bench,
    points: &[(f64, Schedule)],
    bar: Option<&ProgressBar>,
    rows: &mut Vec<ThroughputRow>,
    ranks: Option<&RankExchange>,
) -> anyhow::Result<()> {
    let sw = &b.sw;
    let lead = ranks.is_none_or(|x| x.shard().rank == 0);
    let excluded = bench::excluded_ids(lm);
    for &l in &sw.input_lens {
        let prompts = synthetic::prompts(
            sw.num_prompts,
            l,
            b.cfg.vocab_size,
            &excluded,
            sw.seed ^ l as u64,
        );
        for &(rate, schedule) in points {
            let method = bench::method_name(rate, schedule);
            let done = rows
                .iter()
                .any(|r| r.rate == rate && r.input_len == l && r.method == method);
            let done = match ranks {
                Some(x) => x.gather_u32(vec![u32::from(done)])?[0][0] == 1,
                None => done,
            };
            if done {
                if let Some(bar) = bar {
                    bar.inc(sw.num_prompts as u64);
                }
                continue;
            }
            let row = measure_one(args, lm, b, &prompts, l, (rate, schedule), bar)?;
            rows.push(row);
            rows.sort_by(|x, y| {
                x.input_len
                    .cmp(&y.input_len)
                    .then(x.method.cmp(&y.method))
                    .then(x.rate.total_cmp(&y.rate))
            });
            report::fill_speedups(rows);
            if lead {
                write_atomic(&b.csv_path, &report::to_csv(rows)?)?;
            }
        }
    }
    Ok(())
}

/// One scheduler run of `prompts` (each `l` tokens) at `at` = (rate, schedule) over the whole
/// pool, as a row; moves the bar as requests finish, or (no bar, progress not off) prints the
/// row's summary.
fn measure_one(
    args: &BenchArgs,
    lm: &mut LoadedModel,
    b: &Bench,
    prompts: &[Vec<u32>],
    l: usize,
    at: (f64, Schedule),
    bar: Option<&ProgressBar>,
) -> anyhow::Result<ThroughputRow> {
    let sw = &b.sw;
    let (rate, method) = (at.0, bench::method_name(at.0, at.1));
    if let Some(bar) = bar {
        bar.set_prefix(format!("{method} {rate}x, {l} tok"));
    }
    let base = bar.map_or(0, |bar| bar.position());
    let out = bench::run_one(
        &mut lm.model,
        b.policy.as_ref(),
        prompts,
        sw,
        b.blocks,
        at,
        &mut |done| {
            if let Some(bar) = bar {
                bar.set_position(base + done as u64);
            }
        },
    )?;
    let meta = RowMeta {
        model: &lm.name,
        device: &b.device_s,
        dtype: &b.dtype_s,
        method,
        rate,
        input_len: l,
        output_len: sw.output_len,
        num_prompts: sw.num_prompts,
        bytes_per_block: b.per_block,
        budget_tokens: bench::budget_tokens(sw, l, at, b.policy.min_budget()),
        full_cache_fits: bench::full_cache_fits(&b.spec, b.blocks, l, sw.output_len),
    };
    let row = ThroughputRow::new(&meta, &out.stats);
    if bar.is_none() && !args.no_progress {
        eprintln!(
            "  {method} {rate}x, input {l}: {:.1} tokens/s, max batch {}, {:.1} s",
            row.tokens_per_s, row.max_batch, row.elapsed_time
        );
    }
    Ok(row)
}

/// Draw the throughput figures of `rows` into `<dir>/plots`; returns the files written.
fn draw_plots(
    rows: &[ThroughputRow],
    dir: &std::path::Path,
    csv: &std::path::Path,
) -> anyhow::Result<usize> {
    let note = csv
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut drawn = 0;
    for (stem, fig) in crate::report::plot::throughput_figures(rows, &note)? {
        drawn += crate::report::plot::draw_figure(&fig, &dir.join("plots").join(stem))?.len();
    }
    Ok(drawn)
}
