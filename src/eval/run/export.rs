//! `kvc eval --export-prompts`: every selected sample's prompt as token ids, so that another
//! tool (kvpress on transformers, for one) runs the very prompts kvc runs.
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::samples::prepare;
use super::sweep::rows_of;
use super::{io, EvalError, SampleSettings, SubsetPlan};
use crate::data::longbench::{Dataset, Row};
use crate::model::LoadedModel;

/// One line of the export: the prompt split as the question-agnostic protocol splits it
/// (`ids[..ids.len() - question_tokens]` is the context, the rest the question with the chat
/// template's tail and the answer prefix), greedy decoding's settings, and what scoring needs.
#[derive(Serialize)]
struct Exported<'a> {
    task: &'a str,
    #[serde(rename = "_id")]
    id: &'a str,
    length: Option<u64>,
    depth: Option<f64>,
    answers: &'a [String],
    all_classes: &'a Option<Vec<String>>,
    ids: &'a [u32],
    question_tokens: usize,
    max_new_tokens: usize,
    min_new_tokens: usize,
    stop_ids: &'a BTreeSet<u32>,
    chat_template: bool,
    truncated: bool,
}

/// Write the prompts of every selected sample of `subsets` (rows from `data`, or `generated`
/// for RULER) to `path` as JSON lines, atomically; returns how many. A prompt that cannot be
/// built or does not fit the model is an error naming the sample.
pub fn export_prompts(
    lm: &LoadedModel,
    rows: (&Dataset, &BTreeMap<String, Vec<Row>>),
    subsets: &[SubsetPlan],
    s: &SampleSettings,
    path: &Path,
) -> Result<usize, EvalError> {
    let mut text = String::new();
    let mut n = 0;
    for sp in subsets {
        let wanted: BTreeSet<&str> = sp.ids.iter().map(String::as_str).collect();
        for row in rows_of(rows.0, rows.1, sp)? {
            let row = row?;
            if !wanted.contains(row.id.as_str()) {
                continue;
            }
            let p = prepare(lm, sp.task, &row, s, true)
                .map_err(|e| EvalError::Method(format!("{} {}: {e}", sp.task.name, row.id)))?;
            if let Some(e) = p.too_long {
                return Err(EvalError::Method(format!(
                    "{} {}: {e}",
                    sp.task.name, row.id
                )));
            }
            let line = Exported {
                task: sp.task.name,
                id: &row.id,
                length: row.length,
                depth: row.depth,
                answers: &row.answers,
                all_classes: &row.all_classes,
                ids: &p.ids,
                question_tokens: p.question,
                max_new_tokens: p.params.max_new_tokens,
                min_new_tokens: p.params.min_new_tokens,
                stop_ids: &p.params.stop_ids,
                chat_template: p.chat,
                truncated: p.truncated,
            };
            text += &serde_json::to_string(&line).expect("plain data serializes");
            text.push('\n');
            n += 1;
        }
    }
    crate::util::write_atomic(path, text.as_bytes()).map_err(|e| io(path, e))?;
    Ok(n)
}
