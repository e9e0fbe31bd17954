//! `throughput.csv` rows of `kvc bench` (one per (rate, input length)), the table printed at the
//! end, and reading the CSV back for plots.
//!
//! Column names follow vLLM's `benchmark_throughput.py`, which the KV-Compress benchmark
//! scripts drive (`Throughput: X requests/s, Y tokens/s`; its `--output-json` keys
//! `elapsed_time`, `num_requests`, `total_num_tokens`, `requests_per_second`,
//! `tokens_per_second`): `requests_per_s`, `tokens_per_s` (prompt + output tokens / elapsed, as
//! vLLM counts them), `output_tokens_per_s`, plus `elapsed_time`, `num_requests`,
//! `total_num_tokens`. The remaining columns are kvc's (README, "kvc bench").
use std::path::Path;

use super::scheduler::SchedStats;

/// One measured (method, rate, input length).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ThroughputRow {
    pub model: String,
    pub device: String,
    pub dtype: String,
    /// `full` (the vanilla cache, rate 1), `kvcompress` (kvc's schedule) or
    /// `kvcompress-paper` (the reference's schedule, which compresses at 1x too).
    pub method: String,
    pub rate: f64,
    pub input_len: usize,
    pub output_len: usize,
    pub num_prompts: usize,
    /// KV pool size in bytes (K, V and per-slot metadata).
    pub kv_memory_bytes: u64,
    pub total_blocks: usize,
    pub bytes_per_block: u64,
    /// Per-head token budget after compression (`None`: full cache).
    pub budget_tokens: Option<usize>,
    /// Seconds from the first admission to the last finished request.
    pub elapsed_time: f64,
    pub num_requests: usize,
    /// Prompt + output tokens of all requests.
    pub total_num_tokens: u64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Largest decode batch reached.
    pub max_batch: usize,
    pub mean_batch: f64,
    pub decode_steps: usize,
    /// Most blocks in use at once.
    pub peak_blocks: usize,
    /// `peak_blocks / total_blocks * 100`.
    pub peak_blocks_pct: f64,
    /// Time in compression (after prefill and on demand).
    pub compress_ms: f64,
    /// `compress_ms` as a percentage of the wall time.
    pub compress_pct: f64,
    pub compress_rounds: usize,
    pub evicted_slots: u64,
    pub preemptions: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Peak memory: CUDA device memory in use (driver, whole GPU) or, on the CPU, the peak
    /// bytes of the KV pool in use (`memory_source` says which).
    pub peak_memory_bytes: u64,
    /// `cuda_mem_get_info` or `kv_pool_peak`.
    pub memory_source: String,
    /// Full-cache sequences of `input_len + output_len` tokens the pool holds at once.
    pub full_cache_fits: usize,
    /// Whether the full cache cannot hold all `num_prompts` sequences at once.
    pub memory_bound: bool,
    /// `tokens_per_s / tokens_per_s of rate 1` at the same input length.
    pub speedup_vs_full: Option<f64>,
}

/// Fields of a row that come from the configuration, not the measurement.
pub struct RowMeta<'a> {
    pub model: &'a str,
    pub device: &'a str,
    pub dtype: &'a str,
    /// The `method` column ([`super::method_name`]).
    pub method: &'a str,
    pub rate: f64,
    pub input_len: usize,
    pub output_len: usize,
    pub num_prompts: usize,
    pub bytes_per_block: u64,
    pub budget_tokens: Option<usize>,
    pub full_cache_fits: usize,
}

impl ThroughputRow {
    /// A row from a run's statistics.
    pub fn new(m: &RowMeta<'_>, st: &SchedStats) -> ThroughputRow {
        let el = st.elapsed_s.max(1e-9);
        let total = st.prompt_tokens + st.output_tokens;
        let (peak_memory_bytes, memory_source) = match st.peak_device_bytes {
            Some(b) => (b, "cuda_mem_get_info"),
            None => (st.peak_blocks as u64 * m.bytes_per_block, "kv_pool_peak"),
        };
        ThroughputRow {
            model: m.model.to_string(),
            device: m.device.to_string(),
            dtype: m.dtype.to_string(),
            method: m.method.to_string(),
            rate: m.rate,
            input_len: m.input_len,
            output_len: m.output_len,
            num_prompts: m.num_prompts,
            kv_memory_bytes: st.total_blocks as u64 * m.bytes_per_block,
            total_blocks: st.total_blocks,
            bytes_per_block: m.bytes_per_block,
            budget_tokens: m.budget_tokens,
            elapsed_time: st.elapsed_s,
            num_requests: st.requests,
            total_num_tokens: total,
            requests_per_s: st.requests as f64 / el,
            tokens_per_s: total as f64 / el,
            output_tokens_per_s: st.output_tokens as f64 / el,
            max_batch: st.max_batch,
            mean_batch: st.mean_batch,
            decode_steps: st.decode_steps,
            peak_blocks: st.peak_blocks,
            peak_blocks_pct: 100.0 * st.peak_blocks as f64 / st.total_blocks.max(1) as f64,
            compress_ms: st.compress_ms,
            compress_pct: st.compress_ms / 10.0 / el,
            compress_rounds: st.compress_rounds,
            evicted_slots: st.evicted_slots,
            preemptions: st.preemptions,
            prefill_ms: st.prefill_ms,
            decode_ms: st.decode_ms,
            peak_memory_bytes,
            memory_source: memory_source.to_string(),
            full_cache_fits: m.full_cache_fits,
            memory_bound: m.full_cache_fits < m.num_prompts,
            speedup_vs_full: None,
        }
    }
}

/// Fill `speedup_vs_full` from the vanilla row (`full`, rate 1) of the same model and input
/// length.
pub fn fill_speedups(rows: &mut [ThroughputRow]) {
    let base: Vec<(String, usize, f64)> = rows
        .iter()
        .filter(|r| r.rate <= 1.0 && r.method == "full")
        .map(|r| (r.model.clone(), r.input_len, r.tokens_per_s))
        .collect();
    for r in rows.iter_mut() {
        r.speedup_vs_full = base
            .iter()
            .find(|(m, l, _)| *m == r.model && *l == r.input_len)
            .filter(|(_, _, t)| *t > 0.0)
            .map(|(_, _, t)| r.tokens_per_s / t);
    }
}

/// The rows as CSV (header first).
pub fn to_csv(rows: &[ThroughputRow]) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    Ok(w.into_inner()?)
}

/// Read a `throughput.csv`.
pub fn read_csv(path: &Path) -> anyhow::Result<Vec<ThroughputRow>> {
    let mut r = csv::Reader::from_path(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for row in r.deserialize() {
        rows.push(row.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
    }
    Ok(rows)
}

/// A human-readable table of the rows.
pub fn table(rows: &[ThroughputRow]) -> String {
    let mut s = format!(
        "{:<17} {:>6} {:>7} {:>10} {:>10} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8}\n",
        "method",
        "rate",
        "input",
        "tok/s",
        "out tok/s",
        "req/s",
        "speedup",
        "maxB",
        "meanB",
        "peak%",
        "comp %",
        "preempt"
    );
    for r in rows {
        s += &format!(
            "{:<17} {:>5}x {:>7} {:>10.1} {:>10.1} {:>8.3} {:>8} {:>7} {:>7.1} {:>6.0}% {:>7.1}% {:>8}\n",
            r.method,
            r.rate,
            r.input_len,
            r.tokens_per_s,
            r.output_tokens_per_s,
            r.requests_per_s,
            r.speedup_vs_full
                .map_or("-".to_string(), |x| format!("{x:.2}x")),
            r.max_batch,
            r.mean_batch,
            r.peak_blocks_pct,
            r.compress_pct,
            r.preemptions
        );
    }
    s
}
