//! Conformance with transformers: replay a reference file of greedy generations (the format of
//! `../shared/reference/smollm2_greedy.jsonl`, see its README) and say, per record, whether kvc
//! builds the same prompt ids, how far its first-step logits are from the recorded top-5, and
//! whether its greedy output ids agree — a divergence is classified by the judge's own top-2
//! margin at the diverging step when the judge file records it (`top2_margins`), else by kvc's
//! (a near-tie is float noise, anything else is a bug).
//!
//! Used by `tests/conformance_smollm2.rs` (f32 CPU, strict) and by `kvc conformance` (any
//! device and dtype: the GPU agreement rates of
//! `docs/findings/2026-11-23-kvc-vs-transformers-h100-f32-and-bf16.md` come from it).
//!
//! The judge for output ids is a file of outputs re-derived with transformers' plain greedy
//! `generate` (`tests/data/smollm2_transformers_rederived.jsonl`, field `plain_output_ids`);
//! the originally recorded `output_ids` are compared and reported too (why they are not the
//! judge: `docs/findings/2026-11-22-recorded-reference-outputs-are-not-plain-greedy.md`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::data::tasks;
use crate::engine::{self, GenParams, NoHooks};
use crate::kvcache::contiguous::ContiguousCache;
use crate::model::LoadedModel;

/// How kvc's greedy output compares with the judge's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputAgreement {
    Identical,
    /// Diverged at `step` where the deciding top-2 margin (the judge's when recorded, else
    /// kvc's) was within the tolerance. `margin`: kvc's top-2 margin there (teacher-forced);
    /// `judge_margin`: the judge's, when its file records `top2_margins`.
    NearTie {
        step: usize,
        margin: f32,
        judge_margin: Option<f32>,
    },
    /// Diverged at `step` with a clear top-2 margin: a bug (or dtype noise beyond f32).
    Diverged {
        step: usize,
        margin: f32,
        judge_margin: Option<f32>,
    },
}

/// One record's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordCheck {
    pub name: String,
    pub prompt_tokens: usize,
    /// `None` when the prompt ids agree; otherwise what differs.
    pub prompt_mismatch: Option<String>,
    /// Largest |kvc logit − recorded logit| over the recorded top-5 ids.
    pub top5_max_diff: Option<f32>,
    pub output: Option<OutputAgreement>,
    /// Whether kvc's output equals the originally recorded `output_ids`.
    pub matches_recorded: Option<bool>,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

impl RecordCheck {
    /// Failures under the strict rules (prompt identical, top-5 within `tol`, no divergence
    /// outside a near-tie).
    pub fn failures(&self, tol: f32) -> Vec<String> {
        let mut f = Vec::new();
        if let Some(m) = &self.prompt_mismatch {
            f.push(format!("{}: {m}", self.name));
        }
        if let Some(d) = self.top5_max_diff.filter(|d| *d > tol) {
            f.push(format!(
                "{}: first-step top-5 logits differ by {d:.2e} (> {tol:.0e})",
                self.name
            ));
        }
        if let Some(OutputAgreement::Diverged {
            step,
            margin,
            judge_margin,
        }) = &self.output
        {
            let judge = judge_margin.map_or(String::new(), |m| format!(", the judge's {m:.2e}"));
            f.push(format!(
                "{}: greedy output differs at step {step} with kvc's top-2 margin {margin:.2e}{judge} (not a near-tie)",
                self.name
            ));
        }
        f
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The reference generations (jsonl).
    pub reference: PathBuf,
    /// The re-derived plain-greedy outputs (jsonl with `name`, `plain_output_ids`).
    pub rederived: PathBuf,
    /// Directory with the LongBench `<task>.jsonl` files the reference rows come from.
    pub longbench: PathBuf,
    /// Only records whose name contains this.
    pub only: Option<String>,
    /// Check prompt building only (seconds instead of minutes).
    pub prompts_only: bool,
    /// Top-2 margin below which a divergence counts as a near-tie.
    pub tie_margin: f32,
    pub prefill_chunk: usize,
    /// Which cache generates: the contiguous reference or the paged cache `kvc eval` uses.
    pub cache: CacheChoice,
    /// Generate for at most this many records with prompts over [`LONG_PROMPT`] tokens; the
    /// others get the prompt check only (CI on 2 cores: each 7500-token f32 CPU prefill costs
    /// minutes). `None`: generate for every record.
    pub max_long_generations: Option<usize>,
}

/// The cache conformance generates through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CacheChoice {
    /// The contiguous reference cache (`kvc generate`'s path).
    #[default]
    Contiguous,
    /// The paged cache with KV-Compress at a keep-all budget (the kernels and bookkeeping of
    /// `kvc eval`'s compressed runs, the decode metric included; nothing is evicted).
    Paged,
}

/// Greedy generation of `prompt` through `cache`.
fn generate(
    lm: &mut LoadedModel,
    prompt: &[u32],
    params: &GenParams,
    cache: CacheChoice,
) -> anyhow::Result<crate::engine::Generation> {
    match cache {
        CacheChoice::Contiguous => {
            let layers = lm.config().num_hidden_layers;
            let mut c = ContiguousCache::new(layers);
            Ok(engine::generate(
                &mut lm.model,
                &mut c,
                prompt,
                params,
                &mut NoHooks,
            )?)
        }
        CacheChoice::Paged => {
            let spec = crate::compress::MethodSpec::parse("kvcompress")?;
            let keep_all = (prompt.len() + params.max_new_tokens).next_multiple_of(16);
            let mut runner = crate::compress::runner(
                &spec,
                Some(crate::kvcache::budget::Budget::Tokens(keep_all)),
                lm.config(),
                &crate::compress::MethodOptions::default(),
            )?;
            Ok(runner.run(&mut lm.model, prompt, params)?.0)
        }
    }
}

/// Prompt length above which [`CheckOptions::max_long_generations`] applies.
pub const LONG_PROMPT: usize = 4096;

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))
        })
        .collect()
}

fn ids(v: &serde_json::Value, key: &str, name: &str) -> anyhow::Result<Vec<u32>> {
    serde_json::from_value(v[key].clone())
        .with_context(|| format!("record {name}: field `{key}` is not a list of ids"))
}

/// Replays every record; `on_record` sees each outcome as soon as it is known (progress).
pub fn check(
    lm: &mut LoadedModel,
    opts: &CheckOptions,
    mut on_record: impl FnMut(&RecordCheck),
) -> anyhow::Result<Vec<RecordCheck>> {
    let refs = read_jsonl(&opts.reference)?;
    let rederived: HashMap<String, serde_json::Value> = read_jsonl(&opts.rederived)?
        .into_iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_string(), v)))
        .collect();
    let mut rows_cache: HashMap<String, Vec<String>> = HashMap::new();
    let mut out = Vec::new();
    let mut long_generated = 0;
    for r in refs {
        let name = r["name"]
            .as_str()
            .context("reference record without `name`")?
            .to_string();
        if opts.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let want_ids = ids(&r, "prompt_ids", &name)?;
        let mut rec = RecordCheck {
            name: name.clone(),
            prompt_tokens: want_ids.len(),
            prompt_mismatch: None,
            top5_max_diff: None,
            output: None,
            matches_recorded: None,
            prefill_ms: 0.0,
            decode_ms: 0.0,
        };
        let built = if r["kind"] == "chat" {
            lm.prompt_ids(
                r["user"].as_str().context("chat record without `user`")?,
                true,
            )?
        } else {
            let (built, mismatch) = longbench_prompt(lm, opts, &r, &name, &mut rows_cache)?;
            rec.prompt_mismatch = mismatch;
            built
        };
        if rec.prompt_mismatch.is_none() && built != want_ids {
            rec.prompt_mismatch = Some(ids_mismatch(&built, &want_ids));
        }
        let long = want_ids.len() > LONG_PROMPT;
        let over_long_cap = long
            && opts
                .max_long_generations
                .is_some_and(|n| long_generated >= n);
        if opts.prompts_only || rec.prompt_mismatch.is_some() || over_long_cap {
            on_record(&rec);
            out.push(rec);
            continue;
        }
        long_generated += usize::from(long);
        judge_generation(lm, opts, &r, &rederived, &want_ids, &mut rec)?;
        on_record(&rec);
        out.push(rec);
    }
    Ok(out)
}

/// The prompt ids kvc builds for LongBench record `r` (named `name`) from its row in
/// `opts.longbench` (files read once into `rows_cache`), and the mismatch when kvc's token
/// count before truncation or its truncation differs from the record's.
fn longbench_prompt(
    lm: &LoadedModel,
    opts: &CheckOptions,
    r: &serde_json::Value,
    name: &str,
    rows_cache: &mut HashMap<String, Vec<String>>,
) -> anyhow::Result<(Vec<u32>, Option<String>)> {
    let task_name = r["task"]
        .as_str()
        .context("longbench record without `task`")?;
    let idx = r["row_index"]
        .as_u64()
        .context("longbench record without `row_index`")? as usize;
    if !rows_cache.contains_key(task_name) {
        let p = opts.longbench.join(format!("{task_name}.jsonl"));
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        rows_cache.insert(
            task_name.to_string(),
            text.lines().map(str::to_string).collect(),
        );
    }
    // The row is found by the `_id` in the record's name (`task:_id`), so a file holding
    // only the needed rows works; `row_index` is the fallback.
    let want_id = name.split_once(':').map(|(_, id)| id);
    let rows = &rows_cache[task_name];
    let by_id = want_id.and_then(|id| {
        rows.iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["_id"].as_str() == Some(id)).then_some(v)
        })
    });
    let row: serde_json::Value = match by_id {
        Some(v) => v,
        None => {
            let line = rows
                .get(idx)
                .with_context(|| format!("{task_name}.jsonl has no row {idx}"))?;
            serde_json::from_str(line)?
        }
    };
    let task = tasks::task(task_name)?;
    let filled = task.build_prompt(
        row["context"].as_str().unwrap_or_default(),
        row["input"].as_str().unwrap_or_default(),
    )?;
    let max_len = r["max_length"]
        .as_u64()
        .context("record without `max_length`")? as usize;
    let b = crate::data::prompt::build(lm, &filled, max_len, true)?;
    let (want_orig, want_trunc) = (r["orig_tokens"].as_u64(), r["truncated"].as_bool());
    let mismatch = (Some(b.orig_tokens as u64) != want_orig || Some(b.truncated) != want_trunc)
        .then(|| {
            format!(
                "kvc counts {} tokens before truncation (truncated: {}), reference {:?} ({:?})",
                b.orig_tokens, b.truncated, want_orig, want_trunc
            )
        });
    Ok((b.ids, mismatch))
}

/// Where kvc's prompt ids `built` first differ from the reference's `want`, with five ids of
/// each from there.
fn ids_mismatch(built: &[u32], want: &[u32]) -> String {
    let first = built
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(built.len().min(want.len()));
    format!(
        "prompt ids differ at {first} (kvc {} ids, reference {}): kvc {:?} vs {:?}",
        built.len(),
        want.len(),
        &built[first..(first + 5).min(built.len())],
        &want[first..(first + 5).min(want.len())]
    )
}

/// Generate record `r` from the reference's own prompt ids `want_ids` and judge it into
/// `rec`: times, the first-step logits' largest distance from the recorded top-5, agreement
/// with the recorded output, and the output agreement with the judge (`rederived`), a
/// divergence classified by the judge's top-2 margin at the diverging step (its
/// `top2_margins`), or kvc's where the judge has none.
fn judge_generation(
    lm: &mut LoadedModel,
    opts: &CheckOptions,
    r: &serde_json::Value,
    rederived: &HashMap<String, serde_json::Value>,
    want_ids: &[u32],
    rec: &mut RecordCheck,
) -> anyhow::Result<()> {
    let name = rec.name.clone();
    let params = GenParams {
        max_new_tokens: r["max_new_tokens"]
            .as_u64()
            .context("record without `max_new_tokens`")? as usize,
        stop_ids: lm.stop_ids.clone(),
        min_new_tokens: 0,
        prefill_chunk: opts.prefill_chunk,
        max_context: lm.config().max_context(),
    };
    let g = generate(lm, want_ids, &params, opts.cache)?;
    rec.prefill_ms = g.prefill_ms;
    rec.decode_ms = g.decode_ms;
    let logits = g.first_logits.clone().context("no first-step logits")?;
    let top5_ids = ids(r, "first_step_top5_ids", &name)?;
    let top5: Vec<f32> = serde_json::from_value(r["first_step_top5_logits"].clone())?;
    rec.top5_max_diff = Some(
        top5_ids
            .iter()
            .zip(&top5)
            .map(|(id, want)| (logits[*id as usize] - want).abs())
            .fold(0f32, f32::max),
    );
    rec.matches_recorded = Some(g.output_ids == ids(r, "output_ids", &name)?);
    let judge = rederived
        .get(&name)
        .with_context(|| format!("{name} missing from {}", opts.rederived.display()))?;
    let want_out = ids(judge, "plain_output_ids", &name)?;
    rec.output = Some(if g.output_ids == want_out {
        OutputAgreement::Identical
    } else {
        let step = g
            .output_ids
            .iter()
            .zip(&want_out)
            .position(|(a, b)| a != b)
            .unwrap_or(g.output_ids.len().min(want_out.len()));
        // Teacher-force the judge's tokens up to the divergence and read kvc's margin there.
        let mut forced = want_ids.to_vec();
        forced.extend_from_slice(&want_out[..step]);
        let p1 = GenParams {
            max_new_tokens: 1,
            ..params.clone()
        };
        let g1 = generate(lm, &forced, &p1, opts.cache)?;
        let mut l = g1.first_logits.context("no logits")?;
        l.sort_by(|a, b| b.total_cmp(a));
        let margin = l[0] - l[1];
        let judge_margin = judge["top2_margins"]
            .get(step)
            .and_then(|m| m.as_f64())
            .map(|m| m as f32);
        if judge_margin.unwrap_or(margin) <= opts.tie_margin {
            OutputAgreement::NearTie {
                step,
                margin,
                judge_margin,
            }
        } else {
            OutputAgreement::Diverged {
                step,
                margin,
                judge_margin,
            }
        }
    });
    Ok(())
}
