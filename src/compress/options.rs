//! The method flags `kvc eval` and `kvc bench` share ([`MethodOptions`]) and their parsers.
use super::kvcrush;
use super::scorer::{Agg, PoolKind};
use crate::kvcache::budget::MIN_CACHE_TOKENS;
use crate::kvcache::paged::DEFAULT_BLOCK_SIZE;

/// Where KV-Compress's continual compression runs (`--compress-on`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressOn {
    /// The device path on a GPU, the host elsewhere.
    #[default]
    Auto,
    /// Score and plan on the host.
    Host,
    /// The device path (on the CPU: the kernels' twins).
    Device,
}

/// The KV-Compress paper's settings by name, as its reference implementation's experiment
/// scripts run them (`experiments/scripts/run_llama_8b.sh`, `run_llama_70b.sh`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Llama-3.1-8B's LongBench runs: observation window 8, protected window 8, L2-sum with
    /// max-pool 7; rates compress continually; fixed budgets (`--cache-tokens M`) compress once
    /// and run at M and M-16, whose scores the paper's table averages
    /// (`paper_fixed_budget.csv`).
    #[value(name = "paper-llama-8b")]
    #[serde(rename = "paper-llama-8b")]
    PaperLlama8b,
    /// Llama-3.1-70B's LongBench runs: windows of 32, continual compression.
    #[value(name = "paper-llama-70b")]
    #[serde(rename = "paper-llama-70b")]
    PaperLlama70b,
    /// KVC-full, the paper's ablation that observes every prompt query (`run_llama.sh`'s "full
    /// query range" lines): the whole prompt as observation window (scored chunk by chunk,
    /// so the prefill chunk is the query block), metric buffer 10, no max-pool, L2-sum,
    /// protected window 32, compress once after prefill.
    #[value(name = "paper-kvc-full")]
    #[serde(rename = "paper-kvc-full")]
    PaperKvcFull,
}

/// An observation window longer than any prompt: the whole prompt is observed.
pub const WHOLE_PROMPT_WINDOW: usize = u32::MAX as usize;

impl Preset {
    /// The method options of the preset on top of `base` (the flags it sets must not be given:
    /// clap refuses them beside `--preset`).
    pub fn apply(self, base: &MethodOptions) -> MethodOptions {
        let paper = MethodOptions {
            kvc_metric: super::scorer::Agg::L2Sum,
            max_pool: 7,
            kvc_buffer: 0,
            compress_once: false,
            ..base.clone()
        };
        match self {
            Preset::PaperLlama8b => MethodOptions {
                kvc_window: 8,
                protected_window: 8,
                ..paper
            },
            Preset::PaperLlama70b => MethodOptions {
                kvc_window: 32,
                protected_window: 32,
                ..paper
            },
            Preset::PaperKvcFull => MethodOptions {
                kvc_window: WHOLE_PROMPT_WINDOW,
                protected_window: 32,
                kvc_buffer: 10,
                max_pool: 0,
                compress_once: true,
                ..paper
            },
        }
    }

    /// Whether fixed budgets compress once after prefill (rates always compress continually).
    pub fn fixed_budgets_compress_once(self) -> bool {
        true
    }

    /// Whether each fixed budget M also runs at M - block size (the paper's table averages
    /// the two).
    pub fn fixed_budgets_paired(self) -> bool {
        matches!(self, Preset::PaperLlama8b)
    }
}

/// Method parameters shared by `kvc eval` and `kvc bench` (flattened into their clap args):
/// each method's paper defaults, overridable by flags. `Default` equals the flags' defaults.
#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct MethodOptions {
    /// Paged cache size (K, V and per-slot metadata), e.g. `2GiB`, `512MiB`, `1000000`.
    /// Default: exactly what the sample needs without eviction (prompt + max new tokens).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub kv_memory: Option<u64>,
    /// Tokens per cache block (one kv-head of one layer per block).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = positive)]
    pub block_size: usize,
    /// Floor of cache tokens per head for rate budgets (KV-Compress: 128).
    #[arg(long, default_value_t = MIN_CACHE_TOKENS)]
    pub min_cache_tokens: usize,
    /// KV-Compress observation window: last prompt queries scored (the paper's rate runs: 8).
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub kvc_window: usize,
    /// KV-Compress metric aggregation over the window.
    #[arg(long, value_enum, default_value_t = Agg::L2Sum)]
    pub kvc_metric: Agg,
    /// KV-Compress max-pool kernel along keys (0 = off).
    #[arg(long, default_value_t = 7)]
    pub max_pool: usize,
    /// KV-Compress: count a (query, key) pair only when key_pos <= query_pos - buffer.
    #[arg(long, default_value_t = 0)]
    pub kvc_buffer: usize,
    /// KV-Compress: last token positions never evicted (the paper's rate runs: 8).
    #[arg(long, default_value_t = 32)]
    pub protected_window: usize,
    /// KV-Compress: compress only once after prefill (default: also during decoding, holding
    /// the cache at its budget).
    #[arg(long)]
    pub compress_once: bool,
    /// Where KV-Compress's continual compression runs. auto: on a GPU, decode attention is
    /// scored in the decode kernel and evictions are chosen and made by `kernels/evict.cu`
    /// (nothing per slot crosses PCIe); on the CPU, on the host. host: probabilities go to
    /// the host every step, which scores and plans (the A/B reference). device: the device
    /// path everywhere (on the CPU the kernels' plain-Rust twins run it: slow, for tests).
    /// Other methods always score and plan on the host. Not part of a run's configuration
    /// (like the device, it picks where the method runs, not what it does).
    #[arg(long, value_enum, default_value_t = CompressOn::Auto)]
    #[serde(skip)]
    pub compress_on: CompressOn,
    /// Prefill attention the unfused way on a GPU (matmul, softmax kernel, matmul: the
    /// scores in memory) instead of the flash kernel (`kernels/prefill_attention.cu`): the A/B
    /// reference. Not part of a run's configuration.
    #[arg(long)]
    #[serde(skip)]
    pub unfused_prefill: bool,
    /// SnapKV / PyramidKV / Ada-SnapKV observation window (always kept).
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub snap_window: usize,
    /// SnapKV / PyramidKV / Ada-SnapKV pooling kernel (0 = off).
    #[arg(long, default_value_t = 5)]
    pub snap_kernel: usize,
    /// SnapKV / PyramidKV / Ada-SnapKV pooling kind.
    #[arg(long, value_enum, default_value_t = PoolKind::Avg)]
    pub snap_pool: PoolKind,
    /// PyramidKV: the last layer keeps (budget - window) / beta tokens besides the window.
    #[arg(long, default_value_t = 20, value_parser = positive)]
    pub pyramid_beta: usize,
    /// Ada-SnapKV: share of each head's budget guaranteed before the layer-wide selection.
    #[arg(long, default_value_t = 0.2)]
    pub ada_floor: f64,
    /// StreamingLLM: attention-sink tokens kept at the start.
    #[arg(long, default_value_t = 4)]
    pub sink_tokens: usize,
    /// H2O: share of the budget given to the most recent tokens (the rest: heavy hitters).
    #[arg(long, default_value_t = 0.5)]
    pub h2o_recent_ratio: f64,
    /// H2O: prompt queries whose attention scores the prompt (0 = all, as the paper; this
    /// prefills the prompt in one chunk).
    #[arg(long, default_value_t = 0)]
    pub h2o_queries: usize,
    /// KVCrush: share of the budget spent on representatives of evicted tokens.
    #[arg(long, default_value_t = 0.0625)]
    pub kvcrush_ratio: f64,
    /// KVCrush anchor signature.
    #[arg(long, value_enum, default_value_t = kvcrush::Anchor::Mean)]
    pub kvcrush_anchor: kvcrush::Anchor,
    /// KVCrush seed of the random anchor.
    #[arg(long, default_value_t = 0)]
    pub kvcrush_seed: u64,
    /// KVCrush form: token (per-token head signatures) or block (block signatures; the
    /// shipped implementation); auto = block for kvcompress, token otherwise.
    #[arg(long, value_enum, default_value_t = kvcrush::Level::Auto)]
    pub kvcrush_level: kvcrush::Level,
    /// KVzip's repeat texts, tokenized by the model's tokenizer (set by the CLI once the model
    /// is loaded; `None`: empty texts). Not a flag, and not part of a run's configuration: it
    /// follows from the model and the prompt format, which are.
    #[arg(skip)]
    #[serde(skip)]
    pub kvzip_text: Option<super::kvzip::RepeatTexts>,
}

impl Default for MethodOptions {
    fn default() -> Self {
        MethodOptions {
            kv_memory: None,
            block_size: DEFAULT_BLOCK_SIZE,
            min_cache_tokens: MIN_CACHE_TOKENS,
            kvc_window: 32,
            kvc_metric: Agg::L2Sum,
            max_pool: 7,
            kvc_buffer: 0,
            protected_window: 32,
            compress_once: false,
            compress_on: CompressOn::Auto,
            unfused_prefill: false,
            snap_window: 32,
            snap_kernel: 5,
            snap_pool: PoolKind::Avg,
            pyramid_beta: 20,
            ada_floor: 0.2,
            sink_tokens: 4,
            h2o_recent_ratio: 0.5,
            h2o_queries: 0,
            kvcrush_ratio: 0.0625,
            kvcrush_anchor: kvcrush::Anchor::Mean,
            kvcrush_seed: 0,
            kvcrush_level: kvcrush::Level::Auto,
            kvzip_text: None,
        }
    }
}

/// Parse a positive integer flag.
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive integer")),
    }
}

/// Parse a byte size: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB; case
/// insensitive).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 2GiB, 512MiB, 1000000)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((x * mul as f64) as u64)
}
