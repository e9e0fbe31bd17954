//! The sample loop: prompts built as LongBench's `pred.py` does, generated under every plan
//! that lacks them, each turned into a prediction row.
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

use super::RunPlan;
use crate::compress::{self, Budget, CompressionStats, Prompt, Runner};
use crate::data::prompt;
use crate::data::tasks::Task;
use crate::engine::{FinishReason, GenParams, Generation};
use crate::eval::record::PredRecord;
use crate::model::{candle_msg, LoadedModel};

/// Whether the model's chat template wraps the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ChatMode {
    /// LongBench's rule: every subset but trec, triviaqa, samsum, lsht, lcc, repobench-p (and
    /// never for a model without a chat template).
    Auto,
    /// Every subset.
    Always,
    /// No subset.
    Never,
}

/// Per-sample settings shared by a sweep.
#[derive(Debug, Clone)]
pub struct SampleSettings {
    pub max_input_tokens: usize,
    pub max_new_tokens: Option<usize>,
    pub chat: ChatMode,
    pub prefill_chunk: usize,
    /// Record `kept_per_head` in every compressed row.
    pub dump_allocation: bool,
    /// Device bytes one sample's paged cache may take (the memory plan's room beside the
    /// activations; `None`: unchecked, as on the CPU) and how the sweep's forks size that
    /// cache: a sample whose cache cannot fit fails alone, its rows naming the bytes.
    pub cache_room: Option<(u64, super::SamplePool)>,
}

/// The row every run of `plan` writes for `row` before generating (no prediction yet).
fn base_record(
    lm: &LoadedModel,
    plan: &RunPlan,
    task: &Task,
    row: &crate::data::longbench::Row,
) -> PredRecord {
    PredRecord {
        pred: String::new(),
        answers: row.answers.clone(),
        all_classes: row.all_classes.clone(),
        length: row.length,
        depth: row.depth,
        id: Some(row.id.clone()),
        task: Some(task.name.to_string()),
        model: Some(lm.name.clone()),
        method: Some(plan.method.name.clone()),
        question_in_window: Some(!plan.method.context_only()),
        rate: match plan.budget {
            Budget::Rate(r) => Some(r),
            Budget::Tokens(_) => None,
        },
        budget_tokens: match plan.budget {
            Budget::Tokens(t) => Some(t),
            Budget::Rate(_) => None,
        },
        ..Default::default()
    }
}

/// Generate several samples of one subset, sample `i` under the plans `chunk[i].1` (indices
/// into `plans`, one method): the runner prefills each prompt once and decodes every (sample,
/// plan) in one batch. Per sample, one record per listed plan, in that order; failures become
/// rows with `error` (never an `Err`). Also returns the first failure of a generation (not of
/// building a prompt), which a tensor-parallel rank cannot record and go on from.
pub fn run_samples(
    lm: &mut LoadedModel,
    runner: &mut dyn Runner,
    plans: &[&RunPlan],
    task: &Task,
    chunk: &[(crate::data::longbench::Row, Vec<usize>)],
    s: &SampleSettings,
) -> (Vec<Vec<PredRecord>>, Option<String>) {
    let mut recs: Vec<Vec<PredRecord>> = chunk
        .iter()
        .map(|(row, need)| {
            need.iter()
                .map(|&k| base_record(lm, plans[k], task, row))
                .collect()
        })
        .collect();
    // One method per chunk (`full` never joins a question-agnostic group).
    let split = plans.iter().any(|p| p.method.context_only());
    let ready = prepare_chunk(lm, task, chunk, s, split, &mut recs);
    if ready.is_empty() {
        return (recs, None);
    }
    // One subset: every prompt has the same decoding parameters.
    let params = ready[0].1.params.clone();
    let prompts: Vec<Prompt> = ready
        .iter()
        .map(|(_, p)| Prompt {
            ids: &p.ids,
            question: p.question,
        })
        .collect();
    let budgets: Vec<Vec<Option<Budget>>> = ready
        .iter()
        .map(|(i, _)| {
            chunk[*i]
                .1
                .iter()
                .map(|&k| plans[k].compress_budget())
                .collect()
        })
        .collect();
    match runner.run_prompts(&mut lm.model, &prompts, &params, &budgets) {
        Err(e) => {
            let e = candle_msg(&e);
            for (i, _) in &ready {
                fail(&mut recs[*i], &e);
            }
        }
        Ok(per_prompt) => {
            for ((i, _), res) in ready.iter().zip(per_prompt) {
                match res {
                    Err(e) => fail(&mut recs[*i], &candle_msg(&e)),
                    Ok(results) => fill_rows(lm, plans, &chunk[*i].1, &mut recs[*i], results, s),
                }
            }
        }
    }
    let generation_err = ready
        .iter()
        .flat_map(|(i, _)| &recs[*i])
        .find_map(|r| r.error.clone());
    (recs, generation_err)
}

/// Mark every row of `recs` failed with `e`.
fn fail(recs: &mut [PredRecord], e: &str) {
    for r in recs {
        r.error = Some(e.to_string());
    }
}

/// Build the prompts of `chunk` (split at the question when `split`: the question-agnostic
/// protocol) and record each sample's prompt facts in its rows `recs[i]` (one per plan it
/// lacks); a prompt that cannot be built, or does not fit the model's context, fails its rows.
/// Returns the samples that can run: (index into `chunk`, prepared prompt), in order.
fn prepare_chunk(
    lm: &LoadedModel,
    task: &Task,
    chunk: &[(crate::data::longbench::Row, Vec<usize>)],
    s: &SampleSettings,
    split: bool,
    recs: &mut [Vec<PredRecord>],
) -> Vec<(usize, Prepared)> {
    // Prompts that can run: (sample index, prepared). Built on all cores: tokenizing a
    // LongBench zh context (20-30k tokens before the middle cut) twice takes tens of ms, which
    // one prompt at a time kept a GPU idle (docs/findings/2026-12-03-serial-prompt-building.md).
    let mut clock = crate::profile::start(&lm.model.device);
    let built: Vec<Result<Prepared, String>> = {
        use rayon::prelude::*;
        chunk
            .par_iter()
            .map(|(row, _)| prepare(lm, task, row, s, split))
            .collect()
    };
    crate::profile::mark(&lm.model.device, &mut clock, "eval.prompts");
    let mut ready: Vec<(usize, Prepared)> = Vec::new();
    for (i, ((_, need), prepared)) in chunk.iter().zip(built).enumerate() {
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                fail(&mut recs[i], &e);
                continue;
            }
        };
        for r in &mut recs[i] {
            r.chat_template = Some(prepared.chat);
            r.truncated = Some(prepared.truncated);
            r.prompt_tokens = Some(prepared.ids.len());
            r.question_tokens = split.then_some(prepared.question);
            if need.len() > 1 {
                r.prefill_shared = Some(need.len());
            }
        }
        match prepared
            .too_long
            .clone()
            .or_else(|| cache_shortfall(task, s, prepared.ids.len(), prepared.question))
        {
            Some(e) => fail(&mut recs[i], &e),
            None => ready.push((i, prepared)),
        }
    }
    ready
}

/// Fill one sample's rows `recs` (one per plan `need[j]`, in that order) from the runner's
/// `results` for them: a failed generation, or a fill that fails, is that row's `error`.
fn fill_rows(
    lm: &LoadedModel,
    plans: &[&RunPlan],
    need: &[usize],
    recs: &mut [PredRecord],
    results: Vec<candle_core::Result<(Generation, CompressionStats)>>,
    s: &SampleSettings,
) {
    let (n_layers, kvh) = (
        lm.config().num_hidden_layers,
        lm.config().num_key_value_heads,
    );
    for ((rec, res), &k) in recs.iter_mut().zip(results).zip(need) {
        // A `full` row from a compressed method's keep-all fork records the full run's
        // statistics, as `full`'s own runner does.
        let full = plans[k]
            .is_full()
            .then(|| compress::full_stats(rec.prompt_tokens.unwrap_or(0), n_layers, kvh));
        let filled = res
            .map_err(|e| candle_msg(&e))
            .and_then(|(g, stats)| fill(lm, rec, &g, full.as_ref().unwrap_or(&stats), s));
        if let Err(e) = filled {
            rec.error = Some(e);
        }
    }
}

/// A sample's prompt ids and decoding parameters.
pub(super) struct Prepared {
    pub(super) ids: Vec<u32>,
    /// The last ids read after the compression ([`Prompt::question`]; 0 unless split).
    pub(super) question: usize,
    pub(super) params: GenParams,
    pub(super) chat: bool,
    pub(super) truncated: bool,
    /// The prompt does not fit the model's context (the rows record the prompt, then fail).
    pub(super) too_long: Option<String>,
}

/// Why a prompt of `prompt` tokens cannot run: its paged cache (the sweep's forks at the
/// subset's new tokens, and room for the `question` tokens read after the compression,
/// [`super::SamplePool`]) exceeds the room of `s.cache_room`.
fn cache_shortfall(
    task: &Task,
    s: &SampleSettings,
    prompt: usize,
    question: usize,
) -> Option<String> {
    let (room, pool) = s.cache_room.as_ref()?;
    let new = s.max_new_tokens.unwrap_or(task.max_new_tokens);
    let need = pool.bytes(prompt, new + question);
    (need > *room).then(|| {
        format!(
            "out of device memory: the paged cache of {prompt} prompt tokens and {new} new ones, with this sweep's forks, needs {need} bytes, {room} are free beside the activations: lower --max-input-tokens or --prefill-chunk, or run fewer rates at once"
        )
    })
}

pub(super) fn prepare(
    lm: &LoadedModel,
    task: &Task,
    row: &crate::data::longbench::Row,
    s: &SampleSettings,
    split: bool,
) -> Result<Prepared, String> {
    let (context_part, question_part) = task
        .build_prompt_parts(&row.context, &row.input)
        .map_err(|e| e.to_string())?;
    let filled = context_part + &question_part;
    let has_template = lm.tokenizer.chat_template.is_some();
    let chat = match s.chat {
        ChatMode::Auto => task.chat_template && has_template,
        ChatMode::Always => true,
        ChatMode::Never => false,
    };
    let built = if task.is_ruler() {
        // Generated to fit: no truncation; the answer prefix follows the generation prompt.
        let ids = crate::model::prompt_ids_for(
            &lm.tokenizer,
            &filled,
            chat,
            row.answer_prefix.as_deref().unwrap_or(""),
        )
        .map_err(|e| e.to_string())?;
        prompt::BuiltPrompt {
            orig_tokens: ids.len(),
            ids,
            truncated: false,
            chat,
            text: filled,
        }
    } else {
        prompt::build(lm, &filled, s.max_input_tokens, chat).map_err(|e| e.to_string())?
    };
    let question = if split {
        prompt::question_tokens(&lm.tokenizer, &built.ids, &built.text, &question_part, chat)?
    } else {
        0
    };
    let max_ctx = lm.config().max_context();
    let too_long = (built.ids.len() >= max_ctx).then(|| {
        format!(
            "prompt too long: {} tokens after truncation to {} (+ chat template), the model's context holds {max_ctx}: lower --max-input-tokens",
            built.ids.len(),
            s.max_input_tokens
        )
    });
    let (stop_ids, min_new) = if task.base == "samsum" {
        // pred.py: eos_token_id=[tokenizer.eos_token_id, encode("\n")[-1]], min_length=len+1.
        let mut ids: BTreeSet<u32> = lm
            .tokenizer
            .eos_token
            .as_deref()
            .and_then(|t| lm.tokenizer.token_to_id(t))
            .into_iter()
            .collect();
        if ids.is_empty() {
            ids = lm.stop_ids.clone();
        }
        let nl = lm
            .tokenizer
            .encode("\n", false)
            .map_err(|e| e.to_string())?;
        ids.extend(nl.last());
        (ids, 1)
    } else {
        (lm.stop_ids.clone(), 0)
    };
    let params = GenParams {
        max_new_tokens: s.max_new_tokens.unwrap_or(task.max_new_tokens),
        stop_ids,
        min_new_tokens: min_new,
        prefill_chunk: s.prefill_chunk,
        max_context: max_ctx,
    };
    Ok(Prepared {
        ids: built.ids,
        question,
        params,
        chat,
        truncated: built.truncated,
        too_long,
    })
}

/// Write a generation's prediction, finish reason, kept KVs and timings into `rec`.
fn fill(
    lm: &LoadedModel,
    rec: &mut PredRecord,
    g: &Generation,
    stats: &CompressionStats,
    s: &SampleSettings,
) -> Result<(), String> {
    rec.pred = lm
        .tokenizer
        .decode(&g.output_ids, true)
        .map_err(|e| e.to_string())?;
    rec.new_tokens = Some(g.output_ids.len());
    rec.finish_reason = Some(
        match g.finish_reason {
            FinishReason::Stop => {
                if g.output_ids.last().is_some_and(|t| lm.stop_ids.contains(t)) {
                    "eos"
                } else {
                    "stop"
                }
            }
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
        .to_string(),
    );
    rec.cache_tokens = Some(stats.cache_tokens(lm.config()));
    if s.dump_allocation && !stats.kept_per_head.is_empty() {
        rec.kept_per_head = Some(stats.kept_per_head.clone());
    }
    rec.achieved_rate = Some(stats.achieved_rate());
    rec.prefill_ms = Some(g.prefill_ms);
    rec.prefill_times = Some(g.prefill_times);
    rec.decode_ms = Some(g.decode_ms);
    rec.decode_times = Some(g.decode_times);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_whose_cache_cannot_fit_names_the_bytes() {
        use crate::compress::Budget;
        let task = crate::data::tasks::task("hotpotqa").unwrap();
        let mut s = SampleSettings {
            max_input_tokens: 1000,
            max_new_tokens: Some(10),
            chat: ChatMode::Never,
            prefill_chunk: 64,
            dump_allocation: false,
            cache_room: None,
        };
        assert_eq!(cache_shortfall(task, &s, 500, 0), None, "unchecked");
        let layout = crate::kvcache::blocks::MemoryLayout {
            block_size: 16,
            head_dim: 64,
            dtype_bytes: 4,
        };
        let pool = crate::eval::run::SamplePool {
            layout,
            heads: 6,
            max_context: 4096,
            min_cache_tokens: 128,
            groups: vec![(32, vec![Some(Budget::Rate(2.0)), None])],
            scratch_tokens: 0,
        };
        // Rate 2 keeps 240 of 500 tokens (+ 10 new, 2 partial blocks per head), the full
        // cache continues in the prompt's own (510 tokens), one transient copy (500).
        let blocks = 6 * (15 + 1 + 2) + 6 * (32 + 1) + 6 * (32 + 1);
        let need = pool.bytes(500, 10);
        assert_eq!(need, blocks * layout.bytes_per_block());
        s.cache_room = Some((need, pool.clone()));
        assert_eq!(cache_shortfall(task, &s, 500, 0), None, "fits exactly");
        s.cache_room = Some((need - 1, pool));
        let e = cache_shortfall(task, &s, 500, 0).unwrap();
        assert!(
            e.contains(&need.to_string()) && e.contains("500 prompt tokens"),
            "{e}"
        );
    }
}
