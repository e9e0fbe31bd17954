//! `kvc bench-model`: prefill and single-sequence decode speed of the model layer with the full
//! cache (`--cache`: on a GPU the paged cache and kernels `kvc eval` runs) — the baseline
//! every compressed run is compared with. Prints a table
//! (and `--json` / `--csv`); never asserts timings.
//!
//! Prompts are deterministic pseudo-random token ids (so no tokenizer or data is needed and the
//! attention pattern is not degenerate); decoding ignores stop tokens and runs exactly
//! `--decode-tokens` steps. Decode tokens/s counts the forward passes after the first token
//! (`(n - 1) / decode time`), prefill tokens/s the prompt length over the prefill time. A
//! warm-up generation runs first on each device (kernel loading, allocator warm-up).
//! `launch ms/token` is the host's time inside a decode step's forward (on a GPU: launching
//! its kernels, which return before they finish): near `ms/token`, the step is bound by the
//! host, not by the device's memory reads.
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

use super::model_args::{CacheArg, ModelArgs};
use crate::engine::{self, FullCache, GenParams, NoHooks};
use crate::model::{Config, LoadedModel};
use crate::util::Status;

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  kvc bench-model                                   # SmolLM2 on the default device\n  kvc bench-model --device cuda:0 --dtype bf16 --prompt-lens 4000 --decode-tokens 256\n\nlaunch ms/tok: the host's time inside a decode step's forward; near ms/token on a GPU, the\nstep waits on launches, not on the device. KVC_PROFILE=1 (phases synchronised) or\nKVC_PROFILE=host (launch time per phase) prints where the time went."
)]
pub struct BenchModelArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths to measure (comma-separated tokens).
    #[arg(long, value_delimiter = ',', default_value = "512,4000")]
    pub prompt_lens: Vec<usize>,
    /// Tokens to decode per measurement (stop tokens ignored).
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Measurements per prompt length; the table reports the median.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Prefill chunk length.
    #[arg(long, default_value_t = 1024)]
    pub prefill_chunk: usize,
    /// KV cache: auto (paged on a GPU, the kernels `kvc eval` runs; contiguous on the CPU),
    /// paged, or contiguous (the reference).
    #[arg(long, value_enum, default_value = "auto")]
    pub cache: CacheArg,
    /// Also write the rows as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Print the rows as JSON lines instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Split the model over N ranks (tensor parallel, as `kvc generate --tensor-parallel`:
    /// threads on the CPU, GPUs cuda:K..K+N-1 over NCCL): the rows time the whole group.
    #[arg(long, visible_alias = "tp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub tensor_parallel: u16,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    model: String,
    device: String,
    dtype: String,
    cache: String,
    tensor_parallel: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    prefill_ms: f64,
    prefill_tokens_per_s: f64,
    decode_ms: f64,
    decode_tokens_per_s: f64,
    ms_per_decode_token: f64,
    /// Host time inside a decode step's forward (launches on a GPU), per token.
    launch_ms_per_token: f64,
}

/// Deterministic pseudo-random ids in `[lo, vocab)` (a 64-bit LCG; no `rand` dependency needed).
fn synthetic_prompt(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let lo = 100.min(vocab.saturating_sub(1));
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (lo + ((x >> 33) as usize) % (vocab - lo)) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run `kvc bench-model`: check the flags and that every prompt length plus the decode tokens
/// fits the model's context, warm up, measure each prompt length ([`measure`]), then print the
/// rows ([`print_rows`]) and write them as CSV with `--csv`.
pub fn run(args: BenchModelArgs) -> anyhow::Result<Status> {
    if args.repeats == 0 || args.decode_tokens < 2 {
        anyhow::bail!("--repeats must be at least 1 and --decode-tokens at least 2");
    }
    let world = args.tensor_parallel as usize;
    let (name, labels, rows) = if world > 1 {
        super::tensor_parallel::on_ranks(&args.model, world, |_, lm| measure_all(&args, lm))?
    } else {
        measure_all(&args, args.model.load()?)?
    };
    let [device, dtype, cache] = &labels;
    print_rows(&args, &name, (device, dtype, cache), &rows)?;
    if crate::profile::enabled() {
        // Every phase of the warm-up and of all measurements, summed (KVC_PROFILE=1).
        eprint!("{}", crate::profile::report());
    }
    if let Some(path) = &args.csv {
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &rows {
            w.serialize(r)?;
        }
        crate::util::write_atomic(path, &w.into_inner()?)?;
    }
    Ok(Status::Ok)
}

/// One rank's (or the whole model's) measurements: the warm-up, then every prompt length.
/// Returns the model's name, the row labels (device, dtype, cache) and the rows.
fn measure_all(
    args: &BenchModelArgs,
    mut lm: LoadedModel,
) -> anyhow::Result<(String, [String; 3], Vec<Row>)> {
    let cfg = lm.config().clone();
    let device = format!("{:?}", lm.model.device);
    let mut dtype = format!("{:?}", lm.model.dtype).to_lowercase();
    if lm.model.fp8 == crate::model::llama::Fp8Weights::Matmul {
        dtype.push_str("+fp8");
    }
    if let Some((free, total)) = crate::cuda::device_memory(&lm.model.device)? {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        eprintln!(
            "{device}: {:.1} GiB of {:.1} in use after loading the model (weights, CUDA context)",
            gib(total - free),
            gib(total)
        );
    }
    for &n in &args.prompt_lens {
        if n == 0 || n + args.decode_tokens > cfg.max_context() {
            anyhow::bail!(
                "prompt length {n} + {} decode tokens does not fit the model's context of {} tokens",
                args.decode_tokens,
                cfg.max_context()
            );
        }
    }
    let kind = args.cache.resolve(&lm.model.device);
    // Warm-up.
    let warm = synthetic_prompt(64, cfg.vocab_size, 7);
    let mut cache = engine::full_cache(&lm.model, kind, 64 + 4)?;
    engine::generate(
        &mut lm.model,
        cache.as_mut(),
        &warm,
        &gen_params(args, &cfg, 4),
        &mut NoHooks,
    )?;
    let mut rows = Vec::new();
    for &n in &args.prompt_lens {
        rows.push(measure(
            args,
            &mut lm,
            n,
            kind,
            (&device, &dtype, cache.name()),
        )?);
    }
    let name = cache.name().to_string();
    Ok((lm.name.clone(), [device, dtype, name], rows))
}

/// Greedy generation of exactly `max_new` tokens (no stop ids) in `--prefill-chunk` chunks.
fn gen_params(args: &BenchModelArgs, cfg: &Config, max_new: usize) -> GenParams {
    GenParams {
        max_new_tokens: max_new,
        stop_ids: Default::default(),
        min_new_tokens: 0,
        prefill_chunk: args.prefill_chunk,
        max_context: cfg.max_context(),
    }
}

/// `--repeats` generations of `--decode-tokens` tokens from fresh `n`-token prompts, each in a
/// new cache of kind `kind`; the row holds the median prefill and decode times and the rates
/// derived from them (see the module docs).
fn measure(
    args: &BenchModelArgs,
    lm: &mut LoadedModel,
    n: usize,
    kind: FullCache,
    (device, dtype, cache_name): (&str, &str, &str),
) -> anyhow::Result<Row> {
    let cfg = lm.config().clone();
    let (mut pre, mut dec, mut launch) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.repeats {
        let prompt = synthetic_prompt(n, cfg.vocab_size, 1000 + rep as u64);
        let mut cache = engine::full_cache(&lm.model, kind, n + args.decode_tokens)?;
        let g = engine::generate(
            &mut lm.model,
            cache.as_mut(),
            &prompt,
            &gen_params(args, &cfg, args.decode_tokens),
            &mut NoHooks,
        )?;
        pre.push(g.prefill_ms);
        dec.push(g.decode_ms);
        launch.push(g.decode_times.forward_ms / g.decode_times.steps.max(1) as f64);
    }
    let (p, d) = (median(pre), median(dec));
    let steps = (args.decode_tokens - 1) as f64;
    Ok(Row {
        model: lm.name.clone(),
        device: device.to_string(),
        dtype: dtype.to_string(),
        cache: cache_name.to_string(),
        tensor_parallel: args.tensor_parallel as usize,
        prompt_tokens: n,
        decode_tokens: args.decode_tokens,
        prefill_ms: p,
        prefill_tokens_per_s: n as f64 / (p / 1e3),
        decode_ms: d,
        decode_tokens_per_s: steps / (d / 1e3),
        ms_per_decode_token: d / steps,
        launch_ms_per_token: median(launch),
    })
}

/// The rows on stdout: JSON lines with `--json`, else a heading naming the model, device,
/// dtype and repeats, and a table.
fn print_rows(
    args: &BenchModelArgs,
    model: &str,
    (device, dtype, cache): (&str, &str, &str),
    rows: &[Row],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if args.json {
        for r in rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    } else {
        let tp = match args.tensor_parallel {
            1 => String::new(),
            n => format!(", tensor parallel over {n} ranks"),
        };
        writeln!(
            out,
            "{model} on {device} ({dtype}, {cache} cache{tp}), median of {} runs",
            args.repeats
        )?;
        writeln!(
            out,
            "{:>8} {:>12} {:>14} {:>12} {:>14} {:>10} {:>12}",
            "prompt",
            "prefill ms",
            "prefill tok/s",
            "decode ms",
            "decode tok/s",
            "ms/token",
            "launch ms/tok"
        )?;
        for r in rows {
            writeln!(
                out,
                "{:>8} {:>12.1} {:>14.1} {:>12.1} {:>14.1} {:>10.2} {:>12.2}",
                r.prompt_tokens,
                r.prefill_ms,
                r.prefill_tokens_per_s,
                r.decode_ms,
                r.decode_tokens_per_s,
                r.ms_per_decode_token,
                r.launch_ms_per_token
            )?;
        }
    }
    Ok(())
}
