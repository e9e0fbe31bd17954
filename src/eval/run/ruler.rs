//! RULER subsets generated with the model's tokenizer, planned like data files' subsets.
use std::collections::BTreeMap;

use super::{ChatMode, SampleSettings, SubsetPlan};
use crate::model::LoadedModel;

/// The RULER part of a sweep: which tasks, lengths, samples, seed.
#[derive(Debug, Clone)]
pub struct RulerPlan {
    pub tasks: Vec<&'static crate::data::ruler::RulerTask>,
    pub lengths: Vec<usize>,
    pub samples: usize,
    pub seed: u64,
    /// The words and essay text ([`crate::data::ruler::Sources`]).
    pub sources: &'static crate::data::ruler::Sources,
}

/// Generated rows by subset name (RULER), streamed like a data file's.
pub type GeneratedRows = BTreeMap<String, Vec<crate::data::longbench::Row>>;

/// Generate the RULER subsets with the model's tokenizer (prompts measured exactly as
/// [`super::run_samples`] builds them): one [`SubsetPlan`] per task × length and the rows by subset.
pub fn generate_ruler(
    lm: &LoadedModel,
    plan: &RulerPlan,
    s: &SampleSettings,
) -> Result<(Vec<SubsetPlan>, GeneratedRows), crate::data::ruler::RulerError> {
    use crate::data::ruler::{self, Measure, RulerError};
    let context = lm.config().max_context();
    for &length in &plan.lengths {
        if length > context {
            return Err(RulerError::BeyondContext { length, context });
        }
    }
    let mut subsets = Vec::new();
    let mut rows = BTreeMap::new();
    for rt in &plan.tasks {
        for &length in &plan.lengths {
            let name = ruler::subset_name(rt, length);
            let task =
                crate::data::tasks::ruler_task(&name).ok_or_else(|| RulerError::UnknownTask {
                    name: name.clone(),
                    valid: String::new(),
                })?;
            let chat = match s.chat {
                ChatMode::Auto => task.chat_template && lm.tokenizer.chat_template.is_some(),
                ChatMode::Always => true,
                ChatMode::Never => false,
            };
            let m = Measure {
                tokenizer: &lm.tokenizer,
                chat,
            };
            let max_new = s.max_new_tokens.unwrap_or(rt.max_new_tokens);
            let samples = ruler::generate(
                rt,
                (length, plan.samples, plan.seed),
                max_new,
                &m,
                plan.sources,
            )?;
            let r: Vec<crate::data::longbench::Row> = samples.iter().map(|x| x.row()).collect();
            subsets.push(SubsetPlan {
                task,
                ids: r.iter().map(|x| x.id.clone()).collect(),
                n_rows: r.len(),
                verdict: None,
            });
            rows.insert(name, r);
        }
    }
    Ok((subsets, rows))
}
