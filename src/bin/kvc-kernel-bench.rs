//! `kvc-kernel-bench` (feature `cuda`): times kvc's paged-cache kernels on the GPU and prints a
//! table (stdout; `--csv FILE` writes it too).
//!
//! - paged decode attention on the memory-bound shape of issue 6 (default: batch 64, 4096
//!   tokens per head, head dim 128, bf16, 8 kv-heads / 32 query heads, block size 16, blocks in
//!   random pool order), for several partition sizes, with and without the probability +
//!   KV-Compress metric outputs. GB/s counts the bytes the kernel must move: K and V of every
//!   cached slot once, q, out, and (when written) the probabilities and the metric read+write;
//!   compared with the device-to-device copy rate measured first (the "measured device-memory
//!   bandwidth" the roofline is taken against; the rates are in docs/findings/).
//! - one KV-Compress compression step of an 8B-shaped model (32 layers x 8 kv-heads, 8192 tokens
//!   per head, half of the blocks evicted) entirely on the device, and the compaction move
//!   executor alone on a plan of the same size.
//! - prefill attention of one chunk: the flash kernel (`prefill_attention`) against the unfused
//!   path it replaces (matmul, `prefill_softmax`, matmul) at SmolLM2's and an 8B model's
//!   shapes; TFLOP/s over the causal work, and the last column is the speed-up over unfused.
//!
//! Method: random normal inputs (never all zeros), `--warmup` untimed launches, then `--iters`
//! launches each bracketed by CUDA events on candle's stream; medians reported.
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use cudarc::driver::sys::CUevent_flags;
use kvc::cuda::paged_attention::DecodeShape;
use kvc::cuda::paged_attention::{DecodePipeline, DecodeWorkspace, DeviceTables};
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Parser, Debug)]
#[command(about = "Time kvc's CUDA paged-cache kernels (decode attention, compaction moves)")]
struct Args {
    /// Sequences per decode step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Cached tokens per (sequence, kv-head).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Head dim (64 or 128).
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Kv-heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// K/V dtype: bf16, f16, f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Partition sizes to time (0 = one partition per head; `auto` = kvc's default choice).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,auto,2048,1024,512,256"
    )]
    parts: Vec<String>,
    /// Timed launches per row.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Untimed launches first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Device-memory bandwidth to compare with (GB/s). Default: measured here, as the median
    /// device-to-device copy rate of a 1 GiB buffer (bytes read + bytes written per second).
    #[arg(long)]
    peak_gbs: Option<f64>,
    /// Also write the table as CSV here.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Run only these sections (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
}

/// The benchmark's sections, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// Paged decode attention.
    Decode,
    /// Compaction, eviction and batched eviction.
    Eviction,
    /// Prefill attention of one chunk (bf16/f16 only).
    Prefill,
    /// KV-Compress's device step on 128k-token heads (past the shared-memory sort; ~18 GB).
    LongEviction,
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

/// Median milliseconds of `f` over `iters` event-bracketed runs after `warmup` runs.
fn time(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let a = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let b = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        ms.push(a.elapsed_ms(&b)?);
    }
    Ok(median(ms))
}

/// Dense bf16 tensor-core peak of the H100 / H200 SXM (NVIDIA's data sheets, without
/// sparsity): what the prefill rows' TFLOP/s are compared with.
const DENSE_BF16_TFLOPS: f64 = 989.0;

/// A table row: kernel, partitions, outputs, MB moved, median ms, GB/s, of peak.
type Row = [String; 7];

/// The device, the settings and the measured copy ceiling every section uses, and the rows
/// they add, in order.
struct Bench {
    a: Args,
    dev: Device,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    dtype: DType,
    esz: usize,
    copy_gbs: f64,
    peak_gbs: f64,
    rows: Vec<Row>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let only = args.only.clone();
    let runs = |s: Section| only.is_empty() || only.contains(&s);
    let mut bench = Bench::new(args)?;
    if runs(Section::Decode) {
        bench.decode()?;
    }
    if runs(Section::Eviction) {
        bench.compaction_and_eviction()?;
        bench.batched_eviction()?;
    }
    if runs(Section::Prefill) && bench.dtype != DType::F32 {
        bench.prefill()?;
    }
    // Only when asked: its cache takes ~18 GB.
    if only.contains(&Section::LongEviction) {
        bench.long_eviction()?;
    }
    bench.print()
}

/// The 8B-shaped eviction step's inputs: `layers x heads` heads of `toks` tokens in shuffled
/// blocks of `bs`, random metrics, positions 0.. per head.
struct EvictInputs {
    kk: Tensor,
    vv: Tensor,
    met: Tensor,
    pos: Tensor,
    blk: Vec<u32>,
    lens: Vec<u32>,
    n_evict: usize,
    layers: usize,
    heads: usize,
    toks: usize,
    bs: usize,
}

impl EvictInputs {
    /// `layers x heads` heads of `toks` tokens of the caches `kk`, `vv` (`[layers * heads *
    /// toks, d]`) in shuffled blocks of 16, random metrics, positions 0.. per head.
    fn new(
        kk: Tensor,
        vv: Tensor,
        (layers, heads, toks): (usize, usize, usize),
        n_evict: usize,
    ) -> anyhow::Result<Self> {
        let (bs, dev) = (16usize, kk.device().clone());
        let n_slots = layers * heads * toks;
        let mut blk: Vec<u32> = (0..(n_slots / bs) as u32).collect();
        blk.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
        let pos_host: Vec<u32> = (0..n_slots as u32).map(|s| s % toks as u32).collect();
        Ok(Self {
            met: Tensor::rand(0f32, 1.0, n_slots, &dev)?,
            pos: Tensor::from_slice(&pos_host, n_slots, &dev)?,
            kk,
            vv,
            blk,
            lens: vec![toks as u32; layers * heads],
            n_evict,
            layers,
            heads,
            toks,
            bs,
        })
    }
}

/// The paged decode's inputs on the configured shape.
struct DecodeInputs {
    k: Tensor,
    v: Tensor,
    q: Tensor,
    metric: Tensor,
    shape: DecodeShape,
    tables: DeviceTables,
    out: Tensor,
    scale: f32,
}

impl Bench {
    /// Open the device, check the flags, measure the copy ceiling.
    fn new(a: Args) -> anyhow::Result<Self> {
        let dev = kvc::cuda::open_device(0)?;
        let Device::Cuda(cd) = &dev else {
            anyhow::bail!("not a CUDA device")
        };
        let stream = cd.cuda_stream();
        let dtype = match a.dtype.as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "f32" => DType::F32,
            o => anyhow::bail!("unknown dtype {o}: bf16, f16 or f32"),
        };
        if a.q_heads % a.kv_heads != 0 {
            anyhow::bail!("--q-heads must be a multiple of --kv-heads");
        }
        // The ceiling: a plain device-to-device copy (what a perfectly streaming kernel could do).
        let copy_gbs = {
            let n = 1usize << 30;
            let src = stream.alloc_zeros::<u8>(n)?;
            let mut dst = stream.alloc_zeros::<u8>(n)?;
            let ms = time(&stream, 3, a.iters.min(20), || {
                stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            })?;
            (2 * n) as f64 / (ms * 1e-3) / 1e9
        };
        let peak_gbs = a.peak_gbs.unwrap_or(copy_gbs);
        eprintln!("device-to-device copy of 1 GiB: {copy_gbs:.0} GB/s (read + write)");
        Ok(Bench {
            esz: dtype.size_in_bytes(),
            a,
            dev,
            stream,
            dtype,
            copy_gbs,
            peak_gbs,
            rows: Vec::new(),
        })
    }

    /// The decode's K/V cache filled with random normals, blocks in random pool order.
    fn decode_inputs(&self) -> anyhow::Result<DecodeInputs> {
        let (a, dev, dtype) = (&self.a, &self.dev, self.dtype);
        let (b, nkv, d, bs) = (a.batch, a.kv_heads, a.head_dim, a.block_size);
        let g = a.q_heads / nkv;
        let blocks_per_head = a.ctx.div_ceil(bs);
        let num_blocks = b * nkv * blocks_per_head;
        let num_slots = num_blocks * bs;
        let esz = dtype.size_in_bytes();
        eprintln!(
            "K/V cache: {num_slots} slots x {d} x 2 ({:.2} GB), filling with random normals...",
            (2 * num_slots * d * esz) as f64 / 1e9
        );
        let rn = |n: usize| -> candle_core::Result<Tensor> {
            Tensor::randn(0f32, 1.0, (n, d), dev)?.to_dtype(dtype)
        };
        let k = rn(num_slots)?;
        let v = rn(num_slots)?;
        let q = Tensor::randn(0f32, 1.0, (b, a.q_heads, d), dev)?.to_dtype(dtype)?;
        let metric = Tensor::zeros(num_slots, DType::F32, dev)?;
        // Blocks in random pool order (as after many allocations and compactions).
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
        let shape = DecodeShape {
            batch: b,
            num_kv_heads: nkv,
            group: g,
            head_dim: d,
            max_blocks: blocks_per_head,
            block_size: bs,
            probs_stride: a.ctx,
            num_slots,
        };
        let lens = vec![a.ctx as u32; b * nkv];
        let tables = DeviceTables::upload_disjoint(shape, &ids, &lens, dev)?;
        let out = Tensor::zeros((b, a.q_heads, d), dtype, dev)?;
        let scale = 1.0 / (d as f32).sqrt();
        Ok(DecodeInputs {
            k,
            v,
            q,
            metric,
            shape,
            tables,
            out,
            scale,
        })
    }

    /// Paged decode attention at every partition size and pipeline, with and without the
    /// probabilities and the metric.
    fn decode(&mut self) -> anyhow::Result<()> {
        let DecodeInputs {
            k,
            v,
            q,
            metric,
            shape,
            tables,
            out,
            scale,
        } = self.decode_inputs()?;
        let (a, dev, stream, esz) = (&self.a, &self.dev, &self.stream, self.esz);
        let (b, nkv, d) = (a.batch, a.kv_heads, a.head_dim);
        let peak_gbs = self.peak_gbs;
        let kv_bytes = (2 * b * nkv * a.ctx * d * esz) as f64;
        let qo_bytes = (2 * b * a.q_heads * d * esz) as f64;
        let probs_bytes = (b * a.q_heads * a.ctx * 4) as f64;
        let metric_bytes = (2 * b * nkv * a.ctx * 4) as f64;
        let mut rows: Vec<[String; 7]> = Vec::new();
        for p in &a.parts {
            let part_slots = match p.as_str() {
                "auto" => None,
                "0" => Some(a.ctx),
                x => Some(x.parse::<usize>()?),
            };
            for pipeline in [DecodePipeline::Async, DecodePipeline::Registers] {
                let mut ws = DecodeWorkspace::new(&shape, a.ctx, part_slots, dev)?;
                ws.pipeline = pipeline;
                for with_probs in [false, true] {
                    let m = with_probs.then_some(&metric);
                    let ms = time(stream, a.warmup, a.iters, || {
                        kvc::cuda::paged_attention::paged_decode_into(
                            &q, &k, &v, &tables, &ws, &out, scale, m, with_probs,
                        )
                    })?;
                    let bytes = kv_bytes
                        + qo_bytes
                        + if with_probs {
                            probs_bytes + metric_bytes
                        } else {
                            0.0
                        };
                    let gbs = bytes / (ms * 1e-3) / 1e9;
                    rows.push([
                        "paged_decode".into(),
                        format!(
                            "{}{}{}",
                            match pipeline {
                                DecodePipeline::Async => "async ",
                                DecodePipeline::Registers => "regs ",
                            },
                            if p == "auto" { "auto:" } else { "" },
                            if ws.num_parts == 1 {
                                "1 part".to_string()
                            } else {
                                format!("{}x{}", ws.num_parts, ws.part_slots)
                            }
                        ),
                        if with_probs {
                            "probs+metric"
                        } else {
                            "out only"
                        }
                        .into(),
                        format!("{:.1}", bytes / 1e6),
                        format!("{:.4}", ms),
                        format!("{:.0}", gbs),
                        format!("{:.1}%", 100.0 * gbs / peak_gbs),
                    ]);
                }
            }
        }
        self.rows.extend(rows);
        Ok(())
    }

    /// Compaction moves, the whole KV-Compress step and its KVCrush form on an 8B-shaped step.
    fn compaction_and_eviction(&mut self) -> anyhow::Result<()> {
        let (a, dev, stream, dtype, esz) = (&self.a, &self.dev, &self.stream, self.dtype, self.esz);
        let mut rows: Vec<[String; 7]> = Vec::new();
        let peak_gbs = self.peak_gbs;
        // Compaction moves of one compression step: 32 layers x 8 kv-heads x 8192 tokens, d = 128,
        // half the slots of every head moved (a 2x eviction), one launch.
        {
            let (layers, heads, toks, dm) = (32usize, 8usize, 8192usize, 128usize);
            let n_slots = layers * heads * toks;
            let kk = Tensor::randn(0f32, 1.0, (n_slots, dm), dev)?.to_dtype(dtype)?;
            let vv = Tensor::randn(0f32, 1.0, (n_slots, dm), dev)?.to_dtype(dtype)?;
            let met = Tensor::zeros(n_slots, DType::F32, dev)?;
            let pos = Tensor::zeros(n_slots, DType::U32, dev)?;
            let mut from = Vec::new();
            let mut to = Vec::new();
            for h in 0..layers * heads {
                let base = (h * toks) as u32;
                let half = (toks / 2) as u32;
                for i in 0..half / 2 {
                    // holes at even slots of the first half, survivors from the tail
                    to.push(base + 2 * i);
                    from.push(base + toks as u32 - 1 - i);
                }
            }
            let n = from.len();
            let ms = time(stream, a.warmup, a.iters, || {
                kvc::cuda::kv_cache::move_slots(&kk, &vv, Some(&met), Some(&pos), &from, &to)
            })?;
            let bytes = (n * (2 * 2 * dm * esz + 2 * 4 + 2 * 4 + 2 * 4)) as f64;
            let gbs = bytes / (ms * 1e-3) / 1e9;
            // The whole KV-Compress step on the device (sort + candidates + selection +
            // compaction) on the same shape: every head 8192 tokens in shuffled blocks, random
            // metrics, last 8 positions protected, half of the blocks evicted. Includes the upload
            // of the block tables and the download of per-head counts and lengths.
            let half = layers * heads * (toks / 16) / 2;
            let inputs = EvictInputs::new(kk, vv, (layers, heads, toks), half)?;
            rows.push(self.evict_row(&inputs, "sort+select+compact", (3, 20))?);
            rows.push(self.kvcrush_row(&inputs)?);
            rows.push([
                "move_slots".into(),
                format!("{n} moves"),
                "8B-shaped step (host plan upload included)".into(),
                format!("{:.1}", bytes / 1e6),
                format!("{:.4}", ms),
                format!("{:.0}", gbs),
                format!("{:.1}%", 100.0 * gbs / peak_gbs),
            ]);
        }
        self.rows.extend(rows);
        Ok(())
    }

    /// The whole KV-Compress step on the device (sort + candidates + selection + compaction)
    /// on `e`: last 8 positions protected, `e.n_evict` blocks evicted; (warm-up, timed) runs.
    /// Includes the upload of the block tables and the download of per-head counts and lengths.
    fn evict_row(&self, e: &EvictInputs, what: &str, runs: (usize, usize)) -> anyhow::Result<Row> {
        let (a, stream, esz) = (&self.a, &self.stream, self.esz);
        let (n_slots, dm) = (e.layers * e.heads * e.toks, e.kk.dim(1)?);
        let mut taken = 0u32;
        let ms = time(stream, a.warmup.min(runs.0), a.iters.min(runs.1), || {
            let st = kvc::cuda::evict::kvcompress_evict(
                &e.kk,
                &e.vv,
                &e.met,
                &e.pos,
                &e.blk,
                &e.lens,
                e.bs,
                e.toks as u32 - 8,
                e.n_evict,
            )?;
            taken = st.counts.iter().sum();
            Ok(())
        })?;
        let moved = taken as usize * e.bs * 2 * dm * esz;
        Ok([
            "kvcompress_evict".into(),
            format!("{} heads x {}", e.layers * e.heads, e.toks),
            format!("{what}, {taken} blocks freed"),
            format!("{:.1}", (n_slots * (4 + 4) + moved) as f64 / 1e6),
            format!("{:.4}", ms),
            "-".into(),
            format!("{:.0}% of 5 ms", 100.0 * ms / 5.0),
        ])
    }

    /// KV-Compress's device step on heads past the shared-memory sort: Llama-3.1-8B's 32 x 8
    /// kv-heads of 131072 tokens (d 128): the prefill's compression to 8x and 64x (the
    /// global-memory sort) and a continual decode step of 2 blocks (the prefix sort), all with
    /// the compaction's device scratch. Such heads used to be planned on the host.
    fn long_eviction(&mut self) -> anyhow::Result<()> {
        let (layers, heads, toks, dm) = (32usize, 8usize, 131072usize, 128usize);
        let (n, dev, dtype) = (layers * heads * toks, &self.dev, self.dtype);
        // Zeros: the step's selection reads only metrics and positions, and the compaction
        // moves rows whatever they hold (candle's randn of these 2^32 elements is refused).
        let kk = Tensor::zeros((n, dm), dtype, dev)?;
        let vv = Tensor::zeros((n, dm), dtype, dev)?;
        let blocks = n / 16;
        for (what, n_evict) in [
            ("to 8x (global sort)", blocks - blocks / 8),
            ("to 64x (global sort)", blocks - blocks / 64),
            ("continual step, 2 blocks (prefix sort)", 2),
        ] {
            let e = EvictInputs::new(kk.clone(), vv.clone(), (layers, heads, toks), n_evict)?;
            let row = self.evict_row(&e, what, (1, 5))?;
            self.rows.push(row);
        }
        Ok(())
    }

    /// The same step as the prefill compression of `kvcompress+kvcrush` runs it (ratio 0.1 of a 4096-token budget: the base takes 26 more blocks per head, then `kvc_crush_pick` keeps 26 x kv-heads groups per layer back by their signatures).
    fn kvcrush_row(&self, e: &EvictInputs) -> anyhow::Result<Row> {
        let (a, stream) = (&self.a, &self.stream);
        let EvictInputs {
            kk,
            vv,
            met,
            pos,
            blk,
            lens,
            n_evict,
            layers,
            heads,
            toks,
            bs: bs16,
        } = e;
        use kvc::compress::kvcrush::{Anchor, BlockPicks};
        use kvc::cuda::evict::{EvictSeq, HeadTables};
        let (n_evict, layers, heads, toks, bs16) = (*n_evict, *layers, *heads, *toks, *bs16);
        let per_head = toks / bs16;
        let groups = (0.1f64 * (toks / 2) as f64 / bs16 as f64).round() as usize;
        let seq = EvictSeq {
            heads: layers * heads,
            kv_heads: heads,
            first_protected: toks as u32 - 8,
            n_evict: n_evict + groups * layers * heads,
            crush: Some(BlockPicks {
                groups_per_head: groups,
                anchor: Anchor::Mean,
                seed: 0,
            }),
        };
        let tables = HeadTables::from_padded(blk, lens, per_head, bs16);
        let mut kept = 0u64;
        let ms_c = time(stream, a.warmup.min(3), a.iters.min(20), || {
            let st =
                kvc::cuda::evict::kvcompress_evict_batch(kk, vv, met, pos, &tables, &[seq], bs16)?;
            kept = st[0].new_lens.iter().map(|&l| l as u64).sum();
            Ok(())
        })?;
        Ok([
            "kvcompress_evict+kvcrush".into(),
            format!("{} heads x {toks}", layers * heads),
            format!("sort+select+pick+compact, {groups} groups/head kept back, {kept} slots left"),
            "-".into(),
            format!("{:.4}", ms_c),
            "-".into(),
            format!("{:.0}% of 5 ms", 100.0 * ms_c / 5.0),
        ])
    }

    /// One batched continual-compression step of a SmolLM2 sweep's decode batch.
    fn batched_eviction(&mut self) -> anyhow::Result<()> {
        let (a, dev, stream, dtype, esz) = (&self.a, &self.dev, &self.stream, self.dtype, self.esz);
        let mut rows: Vec<[String; 7]> = Vec::new();
        let _ = esz;
        // One continual-compression step of the SmolLM2 sweep (`kvc eval --batch-samples 32`, 6
        // rates): 192 sequences x 90 heads (30 layers x 3 kv-heads, d 64) of ragged lengths (prompts
        // of 2000-7500 tokens compressed to 1/2 ... 1/64, heads spread 4x either side of the budget),
        // 2 blocks evicted per sequence, in ONE batched call. Includes the host's table building and
        // checks (also timed alone), the upload and the download.
        {
            use kvc::cuda::evict::{EvictSeq, HeadTables};
            use rand::Rng;
            let (seqs_n, heads_per, dm, bs16) = (192usize, 90usize, 64usize, 16usize);
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut lens = Vec::with_capacity(seqs_n * heads_per);
            for s in 0..seqs_n {
                let prompt: f64 = rng.random_range(2000.0..7500.0);
                let budget = prompt / [2.0, 4.0, 8.0, 16.0, 32.0, 64.0][s % 6];
                for _ in 0..heads_per {
                    let f = 2f64.powf(rng.random_range(-2.0..2.0));
                    lens.push((budget * f).clamp(1.0, prompt.min(16384.0)) as usize);
                }
            }
            let total_blocks: usize = lens.iter().map(|l| l.div_ceil(bs16)).sum();
            let mut ids: Vec<u32> = (0..total_blocks as u32).collect();
            ids.shuffle(&mut rng);
            let mut heads: Vec<Vec<u32>> = Vec::with_capacity(lens.len());
            let mut next = 0;
            for l in &lens {
                let n = l.div_ceil(bs16);
                heads.push(ids[next..next + n].to_vec());
                next += n;
            }
            let n_slots = total_blocks * bs16;
            let kk = Tensor::randn(0f32, 1.0, (n_slots, dm), dev)?.to_dtype(dtype)?;
            let vv = Tensor::randn(0f32, 1.0, (n_slots, dm), dev)?.to_dtype(dtype)?;
            let met = Tensor::rand(0f32, 1.0, n_slots, dev)?;
            let mut pos_host = vec![0u32; n_slots];
            for (h, l) in heads.iter().zip(&lens) {
                for i in 0..*l {
                    pos_host[h[i / bs16] as usize * bs16 + i % bs16] = i as u32;
                }
            }
            let pos = Tensor::from_slice(&pos_host, n_slots, dev)?;
            let seqs: Vec<EvictSeq> = (0..seqs_n)
                .map(|s| EvictSeq {
                    heads: heads_per,
                    kv_heads: 3,
                    crush: None,
                    first_protected: lens[s * heads_per..][..heads_per]
                        .iter()
                        .max()
                        .map_or(0, |&m| m as u32)
                        .saturating_sub(8),
                    n_evict: 2,
                })
                .collect();
            let build = || {
                let t = HeadTables::from_heads(heads.iter().zip(&lens).map(|(b, &l)| (&b[..], l)));
                t.check_disjoint(bs16, n_slots).map(|_| t)
            };
            let mut host_ms = Vec::new();
            for _ in 0..20 {
                let t0 = std::time::Instant::now();
                std::hint::black_box(build()?);
                host_ms.push(t0.elapsed().as_secs_f32() * 1e3);
            }
            let host_ms = median(host_ms);
            let tables = build()?;
            let mut taken = 0u32;
            let ms_b = time(stream, 3, a.iters.min(20), || {
                let st = kvc::cuda::evict::kvcompress_evict_batch(
                    &kk, &vv, &met, &pos, &tables, &seqs, bs16,
                )?;
                taken = st.iter().flat_map(|s| &s.counts).sum();
                Ok(())
            })?;
            rows.push([
                "kvcompress_evict_batch".into(),
                format!(
                    "{seqs_n} seqs x {heads_per} heads, {total_blocks} blocks, longest {}",
                    lens.iter().max().unwrap_or(&0)
                ),
                format!("{taken} blocks freed; host tables+checks {host_ms:.2} ms"),
                format!("{:.1}", (total_blocks * 4 + n_slots * 8) as f64 / 1e6),
                format!("{:.4}", ms_b),
                "-".into(),
                "-".into(),
            ]);
        }
        self.rows.extend(rows);
        Ok(())
    }

    /// Prefill attention of one chunk, flash against unfused.
    fn prefill(&mut self) -> anyhow::Result<()> {
        let (a, dev, stream, dtype, esz) = (&self.a, &self.dev, &self.stream, self.dtype, self.esz);
        let mut rows: Vec<[String; 7]> = Vec::new();
        let _ = esz;
        // Prefill attention of one chunk: the flash kernel (16 and 32 query rows per warp)
        // against the unfused path it replaces (candle matmul, prefill_softmax, matmul; only
        // where its scores fit in 2^30 elements), at SmolLM2's shape (9 / 3 heads, d 64; the
        // last 2048-token chunk of an 8192-token prompt, and the whole prompt as one chunk) and
        // an 8B shape (32 / 8, d 128; also the last 8192-token chunk of a 32k prompt). TFLOP/s
        // counts the causal work only: 4 * d per visible pair.
        for (nh, nkv_p, dp, t, n) in [
            (9usize, 3usize, 64usize, 2048usize, 8192usize),
            (9, 3, 64, 8192, 8192),
            (32, 8, 128, 2048, 8192),
            (32, 8, 128, 8192, 8192),
            (32, 8, 128, 8192, 32768),
        ] {
            let gp = nh / nkv_p;
            let q_start = n - t;
            let rn = |shape: (usize, usize, usize, usize)| -> candle_core::Result<Tensor> {
                Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)
            };
            let qp = rn((1, nkv_p, gp * t, dp))?;
            let kp = rn((1, nkv_p, n, dp))?;
            let vp = rn((1, nkv_p, n, dp))?;
            let pos: Vec<u32> = (0..nkv_p).flat_map(|_| 0..n as u32).collect();
            let pos = Tensor::from_vec(pos, (nkv_p, n), dev)?;
            let shape = kvc::cuda::prefill_softmax::SoftmaxShape {
                kv_heads: nkv_p,
                group: gp,
                t,
                n,
                probed: 0,
            };
            let scale = 1.0 / (dp as f32).sqrt();
            let pairs = (t * q_start + t * (t + 1) / 2) as f64 * nh as f64;
            let tflop = pairs * 4.0 * dp as f64 / 1e12;
            let what = format!("{nh}/{nkv_p} heads d{dp}, {t} queries at {q_start} over {n} keys");
            let iters = a.iters.min(20);
            let ms_u = if nh * t * n <= 1 << 30 {
                Some(time(stream, 2, iters, || {
                    let att = qp.matmul(&kp.t()?)?;
                    let (p, _) = kvc::cuda::prefill_softmax::prefill_softmax(
                        &att,
                        &pos,
                        &shape,
                        q_start as u32,
                        scale,
                    )?;
                    p.matmul(&vp).map(|_| ())
                })?)
            } else {
                None
            };
            let mut timed = vec![("prefill unfused", ms_u)];
            for (name, m_tiles) in [("prefill_flash m1", 1), ("prefill_flash m2", 2)] {
                let ms = time(stream, 2, iters, || {
                    kvc::cuda::prefill_attention::prefill_attention_tiled(
                        &qp,
                        &kp,
                        &vp,
                        &pos,
                        &shape,
                        q_start as u32,
                        scale,
                        m_tiles,
                    )
                    .map(|_| ())
                })?;
                timed.push((name, Some(ms)));
            }
            for (name, ms) in timed {
                let Some(ms) = ms else { continue };
                rows.push([
                    name.into(),
                    what.clone(),
                    format!("{:.0} TFLOP/s causal", tflop / (ms / 1e3)),
                    "-".into(),
                    format!("{ms:.4}"),
                    "-".into(),
                    format!(
                        "{:.0}% of {DENSE_BF16_TFLOPS:.0} TFLOP/s{}",
                        100.0 * tflop / (ms / 1e3) / DENSE_BF16_TFLOPS,
                        ms_u.map_or(String::new(), |u| format!("; {:.1}x unfused", u / ms))
                    ),
                ]);
            }
        }
        self.rows.extend(rows);
        Ok(())
    }

    /// The table on stdout (and `--csv`).
    fn print(&self) -> anyhow::Result<()> {
        let (a, dtype, rows) = (&self.a, self.dtype, &self.rows);
        let (b, nkv, d, bs) = (a.batch, a.kv_heads, a.head_dim, a.block_size);
        let (copy_gbs, peak_gbs) = (self.copy_gbs, self.peak_gbs);
        let head = [
            "kernel",
            "partitions",
            "outputs",
            "MB moved",
            "median ms",
            "GB/s",
            "of peak",
        ];
        println!(
            "# kvc-kernel-bench: batch {b}, ctx {}, head dim {d}, {} q-heads / {nkv} kv-heads, block {bs}, {:?}; {} iters after {} warm-up, CUDA events, medians; peak {:.0} GB/s ({}; device-to-device copy measured {copy_gbs:.0} GB/s)",
            a.ctx, a.q_heads, dtype, a.iters, a.warmup, peak_gbs,
            if a.peak_gbs.is_some() { "--peak-gbs" } else { "the measured copy" }
        );
        let w: Vec<usize> = (0..7)
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([head[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |r: &[String]| {
            r.iter()
                .zip(&w)
                .map(|(s, w)| format!("{s:<w$}"))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        println!(
            "{}",
            line(&head.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        );
        for r in rows {
            println!("{}", line(r));
        }
        if let Some(p) = &a.csv {
            let mut wtr = csv::Writer::from_path(p)?;
            wtr.write_record(head)?;
            for r in rows {
                wtr.write_record(r)?;
            }
            wtr.flush()?;
        }
        Ok(())
    }
}
