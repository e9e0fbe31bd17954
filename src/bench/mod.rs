//! `kvc bench`: the KV-Compress paper's throughput benchmark. Synthetic prompts of each input
//! length ([`synthetic`]), greedy decoding of exactly `output_len` tokens, continuous batching
//! over one block pool sized by the KV memory budget ([`scheduler`]), compression after prefill
//! and on memory pressure; one [`report::ThroughputRow`] per (rate, input length).
//!
//! Rate 1 is the full-cache baseline (the same scheduler and pool, no eviction, preemption as
//! its only answer to memory pressure, like vanilla vLLM); it always runs, so every row has a
//! speed-up. The paper's setting: 256 prompts, 500 output tokens, protected window 32,
//! input lengths 500–16000, rates 1–64.
pub mod report;
pub mod scheduler;
pub mod synthetic;

pub use scheduler::Schedule;

use candle_core::Device;
use std::collections::BTreeSet;

use crate::compress::policy::Policy;
use crate::kvcache::blocks::MemoryLayout;
use crate::kvcache::paged::PagedSpec;
use crate::model::Config;

/// `--kv-memory`: bytes, or a fraction of the device's free memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvMemory {
    Bytes(u64),
    /// In (0, 1].
    Fraction(f64),
}

/// Parse `2GiB`, `1000000`, or a fraction `0.5` (a number with a decimal point, at most 1).
pub fn parse_kv_memory(s: &str) -> Result<KvMemory, String> {
    let t = s.trim();
    if t.contains('.') && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        let f: f64 = t
            .parse()
            .map_err(|_| format!("`{s}` is neither a size (2GiB) nor a fraction (0.5)"))?;
        if !(f > 0.0 && f <= 1.0) {
            return Err(format!(
                "`{s}`: a fraction of free memory must be in (0, 1]; sizes take a unit (e.g. 2GiB)"
            ));
        }
        return Ok(KvMemory::Fraction(f));
    }
    crate::compress::parse_bytes(t).map(KvMemory::Bytes)
}

/// Free bytes of `device` (CUDA: the driver; CPU: `MemAvailable` of /proc/meminfo).
pub fn free_memory(device: &Device) -> anyhow::Result<u64> {
    if let Some((free, _)) = crate::cuda::device_memory(device)? {
        return Ok(free);
    }
    let info = std::fs::read_to_string("/proc/meminfo").map_err(|e| {
        anyhow::anyhow!(
            "cannot read /proc/meminfo for a fractional --kv-memory: {e}; give bytes (e.g. 2GiB)"
        )
    })?;
    info.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("MemAvailable:")?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
        .ok_or_else(|| {
            anyhow::anyhow!("no MemAvailable in /proc/meminfo: give --kv-memory in bytes")
        })
}

/// Resolve `--kv-memory` to bytes on `device`.
pub fn kv_bytes(m: KvMemory, device: &Device) -> anyhow::Result<u64> {
    Ok(match m {
        KvMemory::Bytes(b) => b,
        KvMemory::Fraction(f) => (free_memory(device)? as f64 * f) as u64,
    })
}

/// What a sweep runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepConfig {
    /// Compression rates (1 = full cache; always run first as the baseline).
    pub rates: Vec<f64>,
    pub input_lens: Vec<usize>,
    pub output_len: usize,
    pub num_prompts: usize,
    /// KV pool bytes.
    pub kv_bytes: u64,
    pub block_size: usize,
    pub min_cache_tokens: usize,
    pub protected_window: usize,
    pub prefill_chunk: usize,
    /// Requests of one prompt length prefilled together.
    pub prefill_batch: usize,
    pub max_batch: usize,
    pub score_decode: bool,
    pub seed: u64,
}

impl SweepConfig {
    /// The rates to run: 1 first (the baseline), then the others ascending, deduplicated.
    pub fn rates_with_baseline(&self) -> Vec<f64> {
        let mut r: Vec<f64> = self.rates.iter().copied().filter(|x| *x > 1.0).collect();
        r.sort_by(f64::total_cmp);
        r.dedup();
        r.insert(0, 1.0);
        r
    }
}

/// Check the sweep against the model and the budget: rates >= 1, lengths within the context,
/// a pool that holds at least one sequence of every configuration. Returns the pool's blocks.
pub fn validate(
    sw: &SweepConfig,
    cfg: &Config,
    spec: &PagedSpec,
    min_budget: usize,
) -> anyhow::Result<usize> {
    if let Some(r) = sw.rates.iter().find(|r| !(r.is_finite() && **r >= 1.0)) {
        anyhow::bail!("--rates: compression rates must be at least 1 (1 = full cache), got {r}");
    }
    if sw.input_lens.is_empty() || sw.input_lens.contains(&0) {
        anyhow::bail!("--input-lens: give positive prompt lengths, e.g. 500,1000,2000");
    }
    if sw.output_len == 0 {
        anyhow::bail!("--output-len must be at least 1");
    }
    if sw.num_prompts == 0 {
        anyhow::bail!("--num-prompts must be at least 1");
    }
    let ctx = cfg.max_context();
    if let Some(&l) = sw.input_lens.iter().find(|&&l| l + sw.output_len > ctx) {
        anyhow::bail!(
            "input length {l} + output length {} = {} tokens exceeds the model's context of {ctx} tokens: use shorter --input-lens or --output-len",
            sw.output_len,
            l + sw.output_len
        );
    }
    let layout: MemoryLayout = spec.layout();
    let per_block = layout.bytes_per_block();
    let blocks = (sw.kv_bytes / per_block) as usize;
    let mut need = (0usize, 0usize, 0f64);
    for &l in &sw.input_lens {
        for r in sw.rates_with_baseline() {
            let n =
                scheduler::min_blocks(spec, l, sw.output_len, r, sw.min_cache_tokens, min_budget);
            if n > need.0 {
                need = (n, l, r);
            }
        }
    }
    if blocks < need.0 {
        let min_bytes = need.0 as u64 * per_block;
        anyhow::bail!(
            "--kv-memory of {} bytes ({blocks} blocks of {per_block} bytes) is too small: one {}+{}-token sequence at {}x needs {} blocks; the minimum is {min_bytes} bytes ({:.1} MiB), use --kv-memory {min_bytes} or more",
            sw.kv_bytes,
            need.1,
            sw.output_len,
            need.2,
            need.0,
            min_bytes as f64 / (1u64 << 20) as f64
        );
    }
    Ok(blocks)
}

/// Full-cache sequences of `input_len + output_len` tokens a pool of `blocks` holds at once.
pub fn full_cache_fits(
    spec: &PagedSpec,
    blocks: usize,
    input_len: usize,
    output_len: usize,
) -> usize {
    blocks / spec.blocks_for_tokens(input_len + output_len).max(1)
}

/// Per-head token budget at `rate` for `input_len` under `schedule` (clamped to the protected
/// window); `None`: the full cache.
pub fn budget_tokens(
    sw: &SweepConfig,
    input_len: usize,
    (rate, schedule): (f64, Schedule),
    min_budget: usize,
) -> Option<usize> {
    schedule
        .budget(input_len, rate, sw.block_size, sw.min_cache_tokens)
        .map(|m| m.max(min_budget))
}

/// The `method` column of a row at `rate` under `schedule`: `full` for the vanilla cache (rate
/// 1 under [`Schedule::Kvc`]), `kvcompress` (kvc's schedule) or `kvcompress-paper`.
pub fn method_name(rate: f64, schedule: Schedule) -> &'static str {
    match schedule {
        Schedule::Kvc if rate <= 1.0 => "full",
        Schedule::Kvc => "kvcompress",
        Schedule::Paper => "kvcompress-paper",
    }
}

/// Ids synthetic prompts avoid: stop ids and the tokenizer's added (special) tokens.
pub fn excluded_ids(lm: &crate::model::LoadedModel) -> BTreeSet<u32> {
    let mut ex: BTreeSet<u32> = lm.stop_ids.clone();
    ex.extend(
        lm.tokenizer
            .inner
            .get_added_tokens_decoder()
            .keys()
            .copied(),
    );
    ex
}

/// Run one (rate, schedule, input length) of a sweep.
pub fn run_one(
    model: &mut crate::model::Llama,
    policy: &dyn Policy,
    prompts: &[Vec<u32>],
    sw: &SweepConfig,
    blocks: usize,
    (rate, schedule): (f64, Schedule),
    on_finish: &mut dyn FnMut(usize),
) -> candle_core::Result<scheduler::SchedOutput> {
    let cfg = scheduler::SchedConfig {
        rate,
        schedule,
        output_len: sw.output_len,
        num_blocks: blocks,
        block_size: sw.block_size,
        min_cache_tokens: sw.min_cache_tokens,
        prefill_chunk: sw.prefill_chunk,
        prefill_batch: sw.prefill_batch,
        max_batch: sw.max_batch,
        score_decode: sw.score_decode,
        compress_on_device: model.device.is_cuda(),
        check_invariants: false,
    };
    scheduler::run(model, Some(policy), prompts, &cfg, on_finish)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_memory_is_bytes_or_a_fraction() {
        assert_eq!(parse_kv_memory("2GiB"), Ok(KvMemory::Bytes(2 << 30)));
        assert_eq!(parse_kv_memory("1000000"), Ok(KvMemory::Bytes(1_000_000)));
        assert_eq!(parse_kv_memory("0.5"), Ok(KvMemory::Fraction(0.5)));
        assert_eq!(parse_kv_memory("1.0"), Ok(KvMemory::Fraction(1.0)));
        assert!(parse_kv_memory("1.5").unwrap_err().contains("fraction"));
        assert!(parse_kv_memory("0.0").is_err());
        assert!(parse_kv_memory("lots").is_err());
    }

    #[test]
    fn baseline_rate_runs_first_once() {
        let sw = SweepConfig {
            rates: vec![8.0, 1.0, 2.0, 8.0],
            input_lens: vec![100],
            output_len: 1,
            num_prompts: 1,
            kv_bytes: 0,
            block_size: 16,
            min_cache_tokens: 128,
            protected_window: 32,
            prefill_chunk: 512,
            prefill_batch: 8,
            max_batch: 256,
            score_decode: true,
            seed: 0,
        };
        assert_eq!(sw.rates_with_baseline(), vec![1.0, 2.0, 8.0]);
    }
}
