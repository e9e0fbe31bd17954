//! Prompt building exactly as LongBench's `pred.py`: fill the subset's template, cut the
//! tokenized prompt in the middle when it exceeds the model's max input length (decode the
//! first `max/2` and the last `max/2` ids, skipping special tokens, and join the strings), then
//! wrap in the chat template (unless the subset is a continuation task) and tokenize again.
use crate::model::{prompt_ids_for, LoadedModel, ModelError, Tokenizer};

/// A built prompt and how it was made (recorded per sample).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuiltPrompt {
    /// Final input ids.
    pub ids: Vec<u32>,
    /// Tokens of the filled template before truncation.
    pub orig_tokens: usize,
    /// Whether the middle was cut.
    pub truncated: bool,
    /// Whether the chat template was applied.
    pub chat: bool,
    /// The user text the ids were built from (after the middle cut).
    #[serde(skip)]
    pub text: String,
}

/// LongBench's middle truncation on token ids (`pred.py`): returns the text to use.
pub fn truncate_middle(
    lm: &LoadedModel,
    text: &str,
    max_len: usize,
) -> Result<(String, usize, bool), ModelError> {
    let ids = lm.tokenizer.encode(text, true)?;
    let n = ids.len();
    if n <= max_len {
        return Ok((text.to_string(), n, false));
    }
    let half = max_len / 2;
    let head = lm.tokenizer.decode(&ids[..half], true)?;
    let tail = lm.tokenizer.decode(&ids[n - half..], true)?;
    Ok((head + &tail, n, true))
}

/// Truncate `filled` (the template filled with a row) to `max_len` tokens and build the ids.
pub fn build(
    lm: &LoadedModel,
    filled: &str,
    max_len: usize,
    chat: bool,
) -> Result<BuiltPrompt, ModelError> {
    let (text, orig_tokens, truncated) = truncate_middle(lm, filled, max_len)?;
    let ids = lm.prompt_ids(&text, chat)?;
    Ok(BuiltPrompt {
        ids,
        orig_tokens,
        truncated,
        chat,
        text,
    })
}

/// The question-agnostic protocol's split of a built prompt: how many of its last `ids` are
/// the question. `text` is the user text the ids were built from (`prompt_ids_for(tok, text,
/// chat, answer_prefix)`) and ends with `question`, the template's question part; the context
/// is the ids the prompt shares with the one built from the text before the question (a token
/// merged across the boundary, and the chat template's closing tokens and answer prefix, go
/// to the question). An error when the middle cut reached into the question.
pub fn question_tokens(
    tok: &Tokenizer,
    ids: &[u32],
    text: &str,
    question: &str,
    chat: bool,
) -> Result<usize, String> {
    let Some(context) = text.strip_suffix(question) else {
        return Err(format!(
            "the question-agnostic protocol cannot split this prompt: after the middle cut it no longer ends with its question ({} bytes); raise --max-input-tokens or run it with --question-in-window yes",
            question.len()
        ));
    };
    let ctx_ids = prompt_ids_for(tok, context, chat, "").map_err(|e| e.to_string())?;
    let shared = ids.iter().zip(&ctx_ids).take_while(|(a, b)| a == b).count();
    Ok(ids.len() - shared)
}
