//! Meta's original Llama-3 tokenizer file (`tokenizer.model` in tiktoken format: one
//! `<base64 token bytes> <rank>` per line, as Meta's downloads and the PyPI package
//! `llama-models` ship it) rebuilt as a `tokenizers::Tokenizer`, the way transformers'
//! `TikTokenConverter` writes `tokenizer.json`:
//! - vocabulary: each token's bytes mapped to GPT-2's byte-level characters, id = rank;
//! - merges: every split of a token into two tokens of the vocabulary, ordered by the merged
//!   token's rank, ties by the ranks of the parts (a byte-pair merge order that reproduces
//!   tiktoken's rank-ordered merging);
//! - pre-tokenizer: Llama-3's split regex, then byte-level without a prefix space;
//! - special tokens: Llama-3.1's 256 at ids `128000..128256` (`<|begin_of_text|>`,
//!   `<|end_of_text|>`, `<|finetune_right_pad_id|>`, `<|start_header_id|>`,
//!   `<|end_header_id|>`, `<|eom_id|>`, `<|eot_id|>`, `<|python_tag|>`, reserved ones), and a
//!   BOS post-processor, as Llama-3.1's `tokenizer.json` has.
//!
//! Written by hand because no crate reads this format into a `tokenizers::Tokenizer`; checked
//! against tiktoken itself (`tests/llama3_tokenizer.rs`).
use base64::Engine;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::AddedToken;

use crate::model::ModelError;

/// Tokens (ranks) of the Llama-3 base vocabulary.
pub const LLAMA3_BASE_VOCAB: usize = 128_000;

/// Llama-3.1's special tokens in id order from [`LLAMA3_BASE_VOCAB`] (transformers'
/// `convert_llama_weights_to_hf.py`, version "3.1").
pub fn llama31_special_tokens() -> Vec<String> {
    let named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ];
    let mut v: Vec<String> = named.iter().map(|s| s.to_string()).collect();
    v.extend((3..256 - 8).map(|i| format!("<|reserved_special_token_{i}|>")));
    v
}

/// Whether `path` looks like a tiktoken file (its first line `<base64> <integer>`), not a
/// sentencepiece protobuf.
pub fn is_tiktoken(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let first = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    std::str::from_utf8(first).is_ok_and(|l| parse_line(l).is_some())
}

fn parse_line(line: &str) -> Option<(Vec<u8>, u32)> {
    let (tok, rank) = line.trim_end().split_once(' ')?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(tok).ok()?;
    Some((bytes, rank.parse().ok()?))
}

/// GPT-2's byte -> character map of byte-level BPE (printable bytes map to themselves, the rest
/// to `U+0100` onwards in byte order).
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let keep = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut next = 256u32;
    for b in 0..256u32 {
        map[b as usize] = if keep(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    map
}

/// Read Meta's Llama-3 `tokenizer.model` (see the module docs).
pub fn llama3_from_tiktoken(path: &Path) -> Result<tokenizers::Tokenizer, ModelError> {
    let err = |m: String| ModelError::Tokenizer(format!("{}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let mut ranks: HashMap<Vec<u8>, u32> = HashMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let (bytes, rank) = parse_line(line)
            .ok_or_else(|| err(format!("line {}: not `<base64> <rank>`", i + 1)))?;
        ranks.insert(bytes, rank);
    }
    if ranks.len() != LLAMA3_BASE_VOCAB {
        return Err(err(format!(
            "{} tokens: kvc reads the Llama-3 tiktoken vocabulary ({LLAMA3_BASE_VOCAB} tokens) only",
            ranks.len()
        )));
    }
    let chars = byte_chars();
    let to_str = |b: &[u8]| -> String { b.iter().map(|&x| chars[x as usize]).collect() };
    let mut merges: Vec<(u32, u32, u32, String, String)> = Vec::new();
    for (tok, &rank) in &ranks {
        for cut in 1..tok.len() {
            let (l, r) = tok.split_at(cut);
            if let (Some(&a), Some(&b)) = (ranks.get(l), ranks.get(r)) {
                merges.push((rank, a, b, to_str(l), to_str(r)));
            }
        }
    }
    merges.sort_unstable_by_key(|m| (m.0, m.1, m.2));
    let vocab: tokenizers::models::bpe::Vocab =
        ranks.iter().map(|(t, &r)| (to_str(t), r)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges.into_iter().map(|m| (m.3, m.4)).collect())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(
        super::tokenizer::gpt2_pre_tokenizer("llama3").map_err(err)?,
    ));
    t.with_decoder(Some(ByteLevelDecoder::new(false, true, false)));
    let specials = llama31_special_tokens();
    t.add_special_tokens(
        specials
            .iter()
            .map(|s| AddedToken::from(s.clone(), true))
            .collect::<Vec<_>>(),
    )
    .map_err(|e| err(e.to_string()))?;
    let bos = &specials[0];
    t.with_post_processor(Some(
        super::tokenizer::bos_processor(bos, LLAMA3_BASE_VOCAB as u32).map_err(err)?,
    ));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_is_gpt2s_map() {
        let m = byte_chars();
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[0], 'Ā');
        let distinct: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn llama31_specials_fill_256_ids() {
        let s = llama31_special_tokens();
        assert_eq!(s.len(), 256);
        assert_eq!(s[9], "<|eot_id|>");
        assert_eq!(s[255], "<|reserved_special_token_247|>");
    }
}
