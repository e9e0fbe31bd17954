//! Tokenizer, chat template and stop-token set, from `tokenizer.json` + `tokenizer_config.json`
//! or from GGUF metadata.
//!
//! GGUF tokenizers are rebuilt as `tokenizers::Tokenizer`s:
//! - `gpt2` (byte-level BPE with merges): the pre-tokenizer follows `tokenizer.ggml.pre`
//!   (`llama-bpe`/`llama3`, `qwen2`, `smollm` = single digits + GPT-2 split, else GPT-2), never
//!   adding a prefix space — candle's `TokenizerFromGguf` adds one for unknown `pre` values, which
//!   changes the ids of every prompt, so kvc builds its own (checked against transformers' ids
//!   in `tests/conformance_smollm2.rs`). Bytes the vocabulary lacks map to the declared
//!   `unknown_token_id` (transformers does the same; LongBench's passage_retrieval_zh contains
//!   0x06, which SmolLM2's vocabulary lacks).
//! - `llama` (sentencepiece): a byte-fallback BPE whose merges are derived from the piece scores
//!   the way Hugging Face's `SentencePieceExtractor` derives them, with the `▁` normalizer and
//!   decoder of Llama-2's `tokenizer.json`.
//!
//! Stop rule (documented in the README): generation stops on any id in
//! `config eos ∪ generation_config eos ∪ tokenizer_config eos_token ∪ end-of-turn markers that
//! the chat template writes` (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>`, `</s>`,
//! when present in the vocabulary). This gives Llama-3.1 {128001, 128008, 128009} and SmolLM2
//! {2 = `<|im_end|>`}, whatever the GGUF's `eos_token_id` says.
use candle_core::quantized::gguf_file::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::model::ModelError;

/// End-of-turn markers that chat templates write after an assistant message.
const TURN_END_MARKERS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// A tokenizer with what generation needs beside it.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// The jinja chat template, when the model has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether encoding raw text adds a BOS (sentencepiece llama models do).
    pub adds_bos: bool,
}

impl Tokenizer {
    /// Encode `text`; `add_special_tokens` adds the model's BOS where its tokenizer does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("encode failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode `ids`, like transformers' `decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("decode failed: {e}")))
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    /// The stop set: `config_eos` plus the tokenizer's eos and the chat template's turn ends.
    pub fn stop_ids(&self, config_eos: &BTreeSet<u32>) -> BTreeSet<u32> {
        let mut s = config_eos.clone();
        if let Some(id) = self.eos_token.as_deref().and_then(|t| self.token_to_id(t)) {
            s.insert(id);
        }
        if let Some(tpl) = &self.chat_template {
            for m in TURN_END_MARKERS {
                if tpl.contains(m) {
                    if let Some(id) = self.token_to_id(m) {
                        s.insert(id);
                    }
                }
            }
        }
        s
    }

    /// The tokenizer file of a checkpoint directory: `tokenizer.json`, else Meta's tiktoken
    /// `tokenizer.model` (Llama-3; also under `original/`, where Meta's downloads put it).
    /// The tiktoken file's BOS comes with it (`<|begin_of_text|>`, used when no
    /// tokenizer_config.json names one).
    fn inner_from_dir(dir: &Path) -> Result<(tokenizers::Tokenizer, Option<String>), ModelError> {
        let path = dir.join("tokenizer.json");
        if path.exists() {
            return tokenizers::Tokenizer::from_file(&path)
                .map(|t| (t, None))
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())));
        }
        for tt in [
            dir.join("tokenizer.model"),
            dir.join("original/tokenizer.model"),
        ] {
            if super::tiktoken::is_tiktoken(&tt) {
                let bos = super::tiktoken::llama31_special_tokens().swap_remove(0);
                return Ok((super::tiktoken::llama3_from_tiktoken(&tt)?, Some(bos)));
            }
        }
        Err(ModelError::MissingFile {
            path,
            hint: "kvc needs the fast tokenizer file tokenizer.json (or Llama-3's tiktoken tokenizer.model) beside config.json: download it with the checkpoint".into(),
        })
    }

    /// Load the tokenizer and `tokenizer_config.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let (inner, file_bos) = Self::inner_from_dir(dir)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let t = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&t)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", cfg_path.display())))?
        } else {
            serde_json::Value::Null
        };
        let tok_str = |k: &str| -> Option<String> {
            match cfg.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|e| e.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        // Newer checkpoints ship the template as a separate file.
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
        }
        let bos_token = tok_str("bos_token").or(file_bos);
        let adds_bos = match cfg.get("add_bos_token") {
            Some(serde_json::Value::Bool(b)) => *b,
            _ => {
                // Ask the tokenizer itself: does encoding "" with specials produce a BOS?
                let bos = bos_token.as_deref().and_then(|b| inner.token_to_id(b));
                let e = inner
                    .encode("a", true)
                    .map(|e| e.get_ids().to_vec())
                    .unwrap_or_default();
                bos.is_some() && e.first().copied() == bos
            }
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token: tok_str("eos_token"),
            adds_bos,
        })
    }

    /// Build the tokenizer from GGUF metadata (`tokenizer.ggml.*`): the model named by
    /// `tokenizer.ggml.model` ([`GgufVocab::gpt2`] or [`GgufVocab::llama`]), its control and
    /// user-defined tokens, and a BOS post-processor when the GGUF asks for one (default: the
    /// sentencepiece `llama` model adds BOS). Errors name `path`.
    pub fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Tokenizer(format!("{}: {msg}", path.display()));
        let kind = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| {
                err("GGUF has no tokenizer.ggml.model: kvc cannot build its tokenizer".into())
            })?;
        let v = GgufVocab::read(md).map_err(&err)?;
        let mut inner = match kind.as_str() {
            "gpt2" => v.gpt2().map_err(&err)?,
            "llama" => v.llama().map_err(&err)?,
            other => {
                return Err(err(format!(
                    "tokenizer model {other:?} is not supported (supported: gpt2, llama)"
                )))
            }
        };
        v.add_tokens(&mut inner).map_err(&err)?;
        let bos_token = v.tok_at("tokenizer.ggml.bos_token_id");
        let adds_bos = v
            .flag("tokenizer.ggml.add_bos_token")
            .unwrap_or(kind == "llama");
        if adds_bos {
            if let Some(b) = &bos_token {
                let id = inner
                    .token_to_id(b)
                    .ok_or_else(|| err("bos token not in vocabulary".into()))?;
                inner.with_post_processor(Some(bos_processor(b, id).map_err(err)?));
            }
        }
        let chat_template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token,
            eos_token: v.tok_at("tokenizer.ggml.eos_token_id"),
            adds_bos,
        })
    }
}

/// A GGUF's vocabulary (`tokenizer.ggml.tokens` and `token_type`) with the metadata it was
/// read from; errors are messages without the file's name.
struct GgufVocab<'a> {
    md: &'a HashMap<String, Value>,
    tokens: Vec<String>,
    /// Token types per token (1 = normal when the GGUF has none; 3 = control, 4 = user-defined).
    types: Vec<u32>,
}

impl<'a> GgufVocab<'a> {
    /// The tokens of `md` (an error when missing) and their types (all normal when missing).
    fn read(md: &'a HashMap<String, Value>) -> Result<Self, String> {
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let types: Vec<u32> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| crate::model::config::gguf_to_u64(v).unwrap_or(1) as u32)
                .collect(),
            _ => vec![1; tokens.len()],
        };
        Ok(GgufVocab { md, tokens, types })
    }

    /// The token whose id the metadata key `k` holds.
    fn tok_at(&self, k: &str) -> Option<String> {
        self.md
            .get(k)
            .and_then(crate::model::config::gguf_to_u64)
            .map(|x| x as usize)
            .and_then(|i| self.tokens.get(i).cloned())
    }

    /// The boolean metadata key `k`.
    fn flag(&self, k: &str) -> Option<bool> {
        self.md.get(k).and_then(|v| v.to_bool().ok())
    }

    /// `gpt2`: byte-level BPE over the GGUF's merges; a byte missing from the vocabulary is the
    /// declared unknown token; the pre-tokenizer follows `tokenizer.ggml.pre`
    /// ([`gpt2_pre_tokenizer`]), no prefix space.
    fn gpt2(&self) -> Result<tokenizers::Tokenizer, String> {
        let merges = string_array(self.md, "tokenizer.ggml.merges")?;
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect::<Option<_>>()
            .ok_or_else(|| "malformed tokenizer.ggml.merges entry".to_string())?;
        let vocab: tokenizers::models::bpe::Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        // A byte missing from the vocabulary (SmolLM2 lacks `Ć` = 0x06) becomes the
        // GGUF's declared unknown token, as transformers does, rather than vanishing.
        let mut bpe = BPE::builder().vocab_and_merges(vocab, merges);
        if let Some(unk) = self.tok_at("tokenizer.ggml.unknown_token_id") {
            bpe = bpe.unk_token(unk);
        }
        let bpe = bpe.build().map_err(|e| format!("BPE: {e}"))?;
        let mut t = tokenizers::Tokenizer::new(bpe);
        let pre = self
            .md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        t.with_pre_tokenizer(Some(gpt2_pre_tokenizer(&pre)?));
        t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::new(
            false, true, true,
        ))));
        Ok(t)
    }

    /// `llama` (sentencepiece): byte-fallback BPE from the piece scores ([`spm_bpe`]), the `▁`
    /// normalizer (with a prepended `▁` unless `add_space_prefix` is false) and the matching
    /// decoder of Llama-2's `tokenizer.json`.
    fn llama(&self) -> Result<tokenizers::Tokenizer, String> {
        let scores: Vec<f32> = match self.md.get("tokenizer.ggml.scores") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::F32(x) => *x,
                    _ => 0.0,
                })
                .collect(),
            _ => return Err("sentencepiece GGUF without tokenizer.ggml.scores".into()),
        };
        let unk = self
            .tok_at("tokenizer.ggml.unknown_token_id")
            .unwrap_or_else(|| "<unk>".into());
        let bpe = spm_bpe(&self.tokens, &scores, &self.types, &unk)?;
        let mut t = tokenizers::Tokenizer::new(bpe);
        let add_space = self.flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let mut norms: Vec<NormalizerWrapper> = Vec::new();
        if add_space {
            norms.push(Prepend::new("▁".into()).into());
        }
        norms.push(Replace::new(" ", "▁").map_err(|e| e.to_string())?.into());
        t.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)))
            .map_err(|e| e.to_string())?;
        let mut decs: Vec<DecoderWrapper> = vec![
            Replace::new("▁", " ").map_err(|e| e.to_string())?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space {
            decs.push(Strip::new(' ', 1, 0).into());
        }
        t.with_decoder(Some(DecoderSequence::new(decs)));
        Ok(t)
    }

    /// Adds the vocabulary's control tokens (type 3) as special tokens and its user-defined
    /// ones (type 4) as plain added tokens.
    fn add_tokens(&self, inner: &mut tokenizers::Tokenizer) -> Result<(), String> {
        let specials: Vec<AddedToken> = self
            .tokens
            .iter()
            .zip(&self.types)
            .filter(|(_, &ty)| ty == 3)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        let user: Vec<AddedToken> = self
            .tokens
            .iter()
            .zip(&self.types)
            .filter(|(_, &ty)| ty == 4)
            .map(|(t, _)| AddedToken::from(t.clone(), false))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| e.to_string())?;
        inner.add_tokens(user).map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn string_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, String> {
    match md.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| format!("{key} holds a non-string"))
            })
            .collect(),
        _ => Err(format!("GGUF metadata lacks {key}")),
    }
}

/// The post-processor that puts `bos` (id `id`) before a text (and before each of a pair).
pub(crate) fn bos_processor(
    bos: &str,
    id: u32,
) -> Result<tokenizers::processors::template::TemplateProcessing, String> {
    tokenizers::processors::template::TemplateProcessing::builder()
        .try_single(format!("{bos} $0"))
        .and_then(|x| x.try_pair(format!("{bos} $A {bos} $B")))
        .map_err(|e| e.to_string())?
        .special_tokens(vec![(bos.to_string(), id)])
        .build()
        .map_err(|e| e.to_string())
}

/// Byte-level pre-tokenizer for a GGUF `tokenizer.ggml.pre` value (no prefix space).
pub(crate) fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, String> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |re: &str| -> Result<PreTokenizerWrapper, String> {
        Ok(Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?
        .into())
    };
    Ok(match pre {
        "llama-bpe" | "llama3" | "smaug-bpe" => PreSequence::new(vec![
            split(LLAMA3)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        "qwen2" => PreSequence::new(vec![
            split(QWEN2)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        "smollm" => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        _ => ByteLevel::new(false, true, true).into(),
    })
}

/// Sentencepiece vocabulary -> byte-fallback BPE. Merges: every split of a piece into two
/// pieces of the vocabulary, ordered by the merged piece's score (highest first), ties by the
/// ids of the parts — Hugging Face's `SentencePieceExtractor` rule.
fn spm_bpe(tokens: &[String], scores: &[f32], types: &[u32], unk: &str) -> Result<BPE, String> {
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types.get(i).copied().unwrap_or(1) != 1 {
            continue; // only normal pieces are merge results
        }
        let score = scores.get(i).copied().unwrap_or(0.0);
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                merges.push((score, a, b, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = merges.into_iter().map(|m| (m.3, m.4)).collect();
    BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .unk_token(unk.to_string())
        .byte_fallback(true)
        .fuse_unk(true)
        .build()
        .map_err(|e| e.to_string())
}
