//! The prediction row: one JSON line per sample in `<subset>.jsonl`, defined once here.
//!
//! A superset of LongBench's `pred.py` output (`{"pred", "answers", "all_classes", "length"}`),
//! so LongBench's own pred files parse unchanged; kvc's generation run adds the sample id, the
//! task and what the run measured. Every kvc-added field is optional and left out when absent.
//! Unknown fields are ignored (forward compatible). See README-scoring.md for the table.
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

use crate::kvcache::budget::Budget;

/// One prediction line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PredRecord {
    /// The model's decoded output (`tokenizer.decode(new_ids, skip_special_tokens=True)`).
    pub pred: String,
    /// Reference answers; the sample score is the max over them. Numbers are accepted and read
    /// as Python's `str()` of them (count_score compares `str(ground_truth)`).
    #[serde(deserialize_with = "de_answers")]
    pub answers: Vec<String>,
    /// Class names (trec, lsht); `null` elsewhere. eval.py uses the LAST line's value for the
    /// whole file. Always written (as `null` when absent), as pred.py does.
    #[serde(default)]
    pub all_classes: Option<Vec<String>>,
    /// The dataset's `length` (words for en/code, characters for zh); LongBench-E buckets on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// The dataset row's `_id`.
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Subset name (`hotpotqa`, `hotpotqa_e`); the file name decides when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Model id the run used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Compression method (`full`, `kvcompress`, `snapkv`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Target compression rate (prompt KV / kept KV), e.g. 8.0; absent for a token budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// KV entries (tokens) kept in the cache after compression for this sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_tokens: Option<usize>,
    /// Target cache budget in tokens, when the run used a fixed token budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<usize>,
    /// Prompt length in tokens after truncation and chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<usize>,
    /// Compression actually achieved (prompt_tokens / cache_tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub achieved_rate: Option<f64>,
    /// Whether the model's chat template was applied to the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<bool>,
    /// Whether the question was in the prompt when the cache was compressed: true for
    /// LongBench's protocol, false for the question-agnostic one (`<method>@context-only`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_in_window: Option<bool>,
    /// Question-agnostic rows: prompt tokens read after the compression (the question, the chat
    /// template's closing and any answer prefix); `prompt_tokens` minus this was compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_tokens: Option<usize>,
    /// Whether LongBench's middle truncation cut the prompt (it exceeded the max input length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
    /// Why generation stopped: `eos`, `stop` (e.g. samsum's newline), `length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Set when the sample failed; `pred` is then what was produced (usually empty). Scored as
    /// written, counted in `n_failed`, and makes `kvc score` exit 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Prefill wall time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_ms: Option<f64>,
    /// Where `prefill_ms` went: forward passes, scoring the probed queries, copying the
    /// prefilled sequence for this run, compressing it (milliseconds, host view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_times: Option<crate::engine::PrefillTimes>,
    /// Decode wall time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_ms: Option<f64>,
    /// Where `decode_ms` went: steps, forward launches, attention scoring (incl. the wait for
    /// the GPU), continual compression, sampling (milliseconds, host view; a batched decode's
    /// totals for the whole batch up to this row's last token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_times: Option<crate::engine::DecodeTimes>,
    /// Runs that shared this sample's prefill (`kvc eval` prefills once per sample for all
    /// budgets of a method; absent when the prefill was this run's own). `prefill_ms` is then
    /// the shared prefill plus this run's compression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_shared: Option<usize>,
    /// Number of generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_tokens: Option<usize>,
    /// Prompt KVs kept per `[layer][kv_head]` after the prefill compression (`kvc eval
    /// --dump-allocation`, compressed runs only): the variable per-head, per-layer rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_per_head: Option<Vec<Vec<usize>>>,
    /// RULER NIAH rows: depth of the queried needle in percent of the context (0 = start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<f64>,
}

/// `run.json`, written beside a run's `preds/` directory (`<root>/<model>/<method>/<budget>/`).
/// `kvc score` reads `model`, `method`, `rate` / `budget_tokens` from it (they override the path);
/// everything else the run wants to record (settings, versions, hardware) goes in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Target compression rate (a `rate<r>` run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Target cache budget in tokens (a `tokens<n>` run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_tokens: Option<usize>,
    /// Any other fields, kept as written.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn de_answers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let values: Vec<serde_json::Value> = Vec::deserialize(d)?;
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Number(n) => Ok(n.to_string()),
            other => Err(serde::de::Error::custom(format!(
                "answers must be strings (or numbers), found {other}"
            ))),
        })
        .collect()
}

impl PredRecord {
    /// Parse one JSON line.
    pub fn from_json_line(line: &str) -> Result<PredRecord, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// One JSON line (no trailing newline), non-ASCII written raw like `ensure_ascii=False`.
    pub fn to_json_line(&self) -> String {
        // Serialising this struct cannot fail: all keys are strings, no maps with non-string keys.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The run directory kvc's layout gives a model × method × budget: `<root>/<model>/<method>/<budget>`
/// (pred files go in its `preds/`, `run.json` beside).
pub fn run_dir(root: &Path, model: &str, method: &str, budget: Budget) -> PathBuf {
    root.join(model).join(method).join(budget.label())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longbench_pred_line_parses_and_round_trips() {
        let line =
            r#"{"pred": "Paris", "answers": ["Paris", 5], "all_classes": null, "length": 1234}"#;
        let r = PredRecord::from_json_line(line).unwrap();
        assert_eq!(r.answers, ["Paris", "5"]);
        assert_eq!(r.length, Some(1234));
        let out = r.to_json_line();
        assert_eq!(
            out,
            r#"{"pred":"Paris","answers":["Paris","5"],"all_classes":null,"length":1234}"#
        );
        assert!(PredRecord::from_json_line(r#"{"answers": []}"#).is_err());
    }
}
