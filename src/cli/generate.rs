//! `kvc generate`: greedy continuation of one prompt with the full cache (`--cache`).
use clap::Args;
use std::io::Write;

use super::model_args::{CacheArg, ModelArgs};
use crate::engine::{self, GenParams, Generation, NoHooks};
use crate::model::{LoadedModel, ModelError};
use crate::util::Status;

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  kvc generate --prompt 'What is the capital of France?' --chat\n  kvc generate -m ./Llama-3.1-8B-Instruct --prompt 'Once upon a time' --max-new-tokens 64 --json"
)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a single user turn.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prefill chunk length (memory vs speed; results do not depend on it beyond float noise).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// KV cache: auto (paged on a GPU, the kernels `kvc eval` runs; contiguous on the CPU),
    /// paged, or contiguous (the reference).
    #[arg(long, value_enum, default_value = "auto")]
    pub cache: CacheArg,
    /// Print one JSON object (prompt_ids, output_ids, output_text, timings) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Split the model over N ranks (tensor parallel: each rank holds 1/N of the heads, MLP
    /// rows and vocabulary, and the cache of its kv-heads): N threads on the CPU, or the GPUs
    /// cuda:K..K+N-1 for `--device cuda:K` over NCCL (set KVC_NCCL_LIB to libnccl.so.2 if the
    /// loader does not find it). N must divide the kv-heads.
    #[arg(long, visible_alias = "tp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub tensor_parallel: u16,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<Status> {
    let t_load = std::time::Instant::now();
    let world = args.tensor_parallel as usize;
    let (lm, prompt_ids, g, cache_name) = if world > 1 {
        super::tensor_parallel::on_ranks(&args.model, world, |_, lm| generate(&args, lm))?
    } else {
        generate(&args, args.model.load()?)?
    };
    // Load and generation together under tensor parallelism (the ranks load concurrently).
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3 - g.prefill_ms - g.decode_ms;
    let text = lm.tokenizer.decode(&g.output_ids, true)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let n_new = g.output_ids.len();
        let v = serde_json::json!({
            "model": lm.name,
            "prompt_ids": prompt_ids,
            "output_ids": g.output_ids,
            "output_text": text,
            "finish_reason": g.finish_reason,
            "n_prompt": prompt_ids.len(),
            "n_new": n_new,
            "load_ms": load_ms,
            "prefill_ms": g.prefill_ms,
            "decode_ms": g.decode_ms,
            "prefill_tokens_per_s": prompt_ids.len() as f64 / (g.prefill_ms / 1e3),
            "decode_tokens_per_s": if g.decode_ms > 0.0 { (n_new.saturating_sub(1)) as f64 / (g.decode_ms / 1e3) } else { 0.0 },
            "device": format!("{:?}", lm.model.device),
            "dtype": format!("{:?}", lm.model.dtype),
            "cache": cache_name,
            "tensor_parallel": world,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{text}")?;
    }
    Ok(Status::Ok)
}

/// One rank's (or the whole model's) generation: the model, the prompt's ids, the generation
/// and the cache's name.
fn generate(
    args: &GenerateArgs,
    mut lm: LoadedModel,
) -> anyhow::Result<(LoadedModel, Vec<u32>, Generation, &'static str)> {
    let prompt_ids = lm.prompt_ids(&args.prompt, args.chat)?;
    let max_ctx = lm.config().max_context();
    if prompt_ids.len() >= max_ctx {
        return Err(ModelError::PromptTooLong {
            len: prompt_ids.len(),
            max: max_ctx,
            new: args.max_new_tokens,
        }
        .into());
    }
    let params = GenParams {
        max_new_tokens: args.max_new_tokens,
        stop_ids: lm.stop_ids.clone(),
        min_new_tokens: 0,
        prefill_chunk: args.prefill_chunk,
        max_context: max_ctx,
    };
    let kind = args.cache.resolve(&lm.model.device);
    let tokens = (prompt_ids.len() + args.max_new_tokens).min(max_ctx);
    let mut cache = engine::full_cache(&lm.model, kind, tokens)?;
    let g = engine::generate(
        &mut lm.model,
        cache.as_mut(),
        &prompt_ids,
        &params,
        &mut NoHooks,
    )?;
    let name = cache.name();
    Ok((lm, prompt_ids, g, name))
}
