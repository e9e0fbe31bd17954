//! The memory plan of a GPU `kvc eval`: what the weights hold, what one sample's paged cache
//! needs at the longest prompt, what a prefill chunk's activations need, and from that the
//! prefill chunk and the samples per batch. Printed at the start of a GPU run; a sample whose
//! cache cannot fit then fails on its own (a recorded failure naming the bytes), never the run.
use crate::kvcache::Probe;
use crate::model::config::Config;

/// Bytes kept free beside the plan (CUDA context, cuBLAS workspaces, allocator slack).
pub const HEADROOM: u64 = 1 << 30;

/// The smallest prefill chunk the plan shrinks to.
pub const MIN_CHUNK: usize = 512;

/// What fits in the device's free memory.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    /// Free device memory with the model loaded.
    pub free: u64,
    /// The model's weights (already resident, so not part of `free`).
    pub weights: u64,
    /// The longest context planned for (prompt + new tokens).
    pub tokens: usize,
    /// One sample's paged cache at `tokens` (see `eval::run::sample_kv_bytes`).
    pub kv_per_sample: u64,
    /// The prefill chunk and its activations.
    pub chunk: usize,
    pub activations: u64,
    /// Samples decoded together.
    pub batch: usize,
}

/// Activation bytes of a prefill chunk of `chunk` tokens: the residual stream and its norms,
/// the merged q/k/v projection, the merged gate/up projection and its product, in the run
/// dtype, twice over for the buffers candle keeps alive between ops (an upper estimate; the
/// flash prefill kernel keeps attention scores out of memory).
pub fn prefill_activation_bytes(cfg: &Config, dtype_bytes: usize, chunk: usize) -> u64 {
    let qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim;
    let per_token = 4 * cfg.hidden_size + qkv + 3 * cfg.intermediate_size;
    2 * (chunk * per_token * dtype_bytes) as u64
}

/// Query rows of one prefill chunk whose attention a policy observes: none, every row (H2O's
/// one-chunk prefill: the whole prompt), or its window of last queries, cut to the chunk when
/// the policy scores the window in query blocks (`splits`, [`crate::engine::Hooks::prefill_probe_splits`];
/// KVC-full's whole-prompt window), else whole (the last chunk grows to hold it).
pub fn probed_rows(probe: Probe, splits: bool, chunk: usize, prompt: usize) -> usize {
    match probe {
        Probe::None | Probe::Queries => 0,
        Probe::All => prompt,
        Probe::LastQueries(w) if splits && w > chunk => chunk,
        Probe::LastQueries(w) => w.min(prompt),
    }
}

/// Bytes of the observed attention of `rows` probed queries of `heads` query heads over `keys`
/// keys: the f32 probabilities handed to the policy plus the scores and their softmax in the
/// run dtype (the unfused window path of [`crate::kvcache::paged`]).
pub fn probe_bytes(heads: usize, rows: usize, keys: usize, dtype_bytes: usize) -> u64 {
    (rows * heads) as u64 * keys as u64 * (4 + 2 * dtype_bytes) as u64
}

impl MemoryPlan {
    /// The plan for `free` bytes: the chunk halves from `chunk` (down to [`MIN_CHUNK`]) while
    /// its activations take more than an eighth of `free`; the batch is `batch` when given,
    /// else as many samples as fit in what the activations and [`HEADROOM`] leave (each
    /// sample's bytes count its forks and a transient copy, `eval::run::SamplePool`, so this
    /// errs low), at least 1, at most
    /// [`crate::eval::run::AUTO_BATCH_MAX`]. `need`: (tokens, one sample's cache bytes).
    pub fn new(
        free: u64,
        weights: u64,
        need: (usize, u64),
        act: impl Fn(usize) -> u64,
        chunk: usize,
        batch: Option<usize>,
    ) -> MemoryPlan {
        let (tokens, kv_per_sample) = need;
        let mut chunk = chunk.max(1);
        while chunk > MIN_CHUNK && act(chunk) > free / 8 {
            chunk /= 2;
        }
        let activations = act(chunk);
        let usable = free.saturating_sub(activations + HEADROOM);
        let per = kv_per_sample.max(1);
        let fits = (usable / per) as usize;
        MemoryPlan {
            free,
            weights,
            tokens,
            kv_per_sample,
            chunk,
            activations,
            batch: batch.unwrap_or(fits.clamp(1, crate::eval::run::AUTO_BATCH_MAX)),
        }
    }

    /// Bytes free for samples' caches beside the activations and [`HEADROOM`].
    pub fn cache_room(&self) -> u64 {
        self.free.saturating_sub(self.activations + HEADROOM)
    }

    /// Whether one sample at the longest context fits beside the activations.
    pub fn one_sample_fits(&self) -> bool {
        self.kv_per_sample <= self.cache_room()
    }

    /// One line for stderr.
    pub fn describe(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        format!(
            "memory plan: weights {:.1} GiB; free {:.1} GiB = activations {:.1} GiB (prefill chunk {}, observed attention included) + paged cache {:.2} GiB per sample at {} tokens (its rates' forks and a transient copy) x {} samples + headroom; --prefill-chunk and --batch-samples set them",
            gib(self.weights),
            gib(self.free),
            gib(self.activations),
            self.chunk,
            gib(self.kv_per_sample),
            self.tokens,
            self.batch
        )
    }

    /// The warning when even one sample at the longest context does not fit.
    pub fn shortfall(&self) -> Option<String> {
        (!self.one_sample_fits()).then(|| {
            format!(
                "the longest context ({} tokens) needs {} bytes of paged cache, {} are free beside the activations: samples that long will fail (recorded per sample); lower --max-input-tokens or --prefill-chunk",
                self.tokens,
                self.kv_per_sample,
                self.cache_room()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn chunk_halves_until_activations_fit_and_batch_fills_the_rest() {
        // Activations of 1 MiB per token: 8192 tokens take 8 GiB > 40/8 GiB, 4096 fit.
        let act = |c: usize| (c as u64) << 20;
        let p = MemoryPlan::new(40 * GIB, 16 * GIB, (1000, 2 * GIB), act, 8192, None);
        assert_eq!(p.chunk, 4096);
        assert_eq!(p.activations, 4 * GIB);
        // (40 - 4 - 1) / 2 = 17 samples.
        assert_eq!(p.batch, 17);
        assert!(p.one_sample_fits() && p.shortfall().is_none());
        let p = MemoryPlan::new(40 * GIB, 0, (1000, 2 * GIB), act, 8192, Some(3));
        assert_eq!(p.batch, 3);
    }

    #[test]
    fn a_whole_prompt_window_is_planned_in_chunk_rows() {
        // KVC-full at 128k on Llama-3.1-8B (32 query heads, bf16): a window longer than the
        // chunk is observed chunk by chunk, so its rows follow the chunk...
        let rows = |chunk| probed_rows(Probe::LastQueries(usize::MAX), true, chunk, 127_500);
        assert_eq!(rows(1024), 1024);
        let act = |c: usize| probe_bytes(32, rows(c), 127_500, 2);
        // ...and the plan halves the chunk to the floor for it: 512 rows x 32 heads x 127,500
        // keys x 8 bytes = 15.6 GiB.
        let p = MemoryPlan::new(60 * GIB, 16 * GIB, (127_500, 16 * GIB), act, 8192, None);
        assert_eq!(p.chunk, MIN_CHUNK);
        assert_eq!(p.activations, 512 * 32 * 127_500 * 8);
        // A window the policy scores whole (max-pool needs the whole window) stays whole.
        assert_eq!(
            probed_rows(Probe::LastQueries(5000), false, 1024, 127_500),
            5000
        );
        assert_eq!(probed_rows(Probe::LastQueries(32), true, 1024, 127_500), 32);
        assert_eq!(probed_rows(Probe::All, false, 1024, 9000), 9000);
        assert_eq!(probed_rows(Probe::None, false, 1024, 9000), 0);
    }

    #[test]
    fn a_context_that_cannot_fit_is_named() {
        let p = MemoryPlan::new(10 * GIB, 0, (127_500, 34 * GIB), |_| GIB, 8192, None);
        assert_eq!(p.batch, 1);
        let w = p.shortfall().unwrap();
        assert!(
            w.contains("127500 tokens") && w.contains(&(34 * GIB).to_string()),
            "{w}"
        );
    }
}
