//! kvc's own RULER suite (Hsieh et al. 2024, NVIDIA/RULER): synthetic retrieval, tracing and
//! aggregation tasks generated on the spot, deterministic, from RULER's own word lists and
//! essays ([`sources`]: fetched once from PyPI, or kvc's named offline fallback).
//!
//! Tasks follow RULER's `synthetic.yaml` and its generators (`niah.py`, `variable_tracking.py`,
//! `common_words_extraction.py`, `freq_words_extraction.py`, templates and answer prefixes of
//! `constants.py`); the two QA tasks (SQuAD, HotpotQA) need a download and are left out:
//!
//! | task              | haystack            | keys     | values   | needles k/v/q |
//! |-------------------|---------------------|----------|----------|---------------|
//! | niah_single_1     | repeated sentences  | words    | numbers  | 1/1/1 |
//! | niah_single_2     | real text           | words    | numbers  | 1/1/1 |
//! | niah_single_3     | real text           | words    | uuids    | 1/1/1 |
//! | niah_multikey_1   | real text           | words    | numbers  | 4/1/1 (3 distractor needles) |
//! | niah_multikey_2   | distractor needles  | words    | numbers  | 1/1/1 |
//! | niah_multikey_3   | distractor needles  | uuids    | uuids    | 1/1/1 |
//! | niah_multivalue   | real text           | words    | numbers  | 1/4/1 |
//! | niah_multiquery   | real text           | words    | numbers  | 4/1/4 |
//! | vt                | repeated sentences, 1 chain of 4 hops, one in-context example |
//! | cwe               | numbered word list, 10 common words (30x, or 6x below 4096 tokens) |
//! | fwe               | coded words, Zipf alpha 2, top 3 |
//!
//! Read against NVIDIA/RULER c3f5e3b; variable tracking is `variable_tracking.py` as last
//! changed in 9f1c84d (2025-06-25), the noise-haystack layout.
//!
//! Departures from the reference, all deliberate:
//! - **Length** is measured with the model's own tokenizer on the prompt exactly as `kvc eval`
//!   builds it (chat template and answer prefix included); as RULER, the sequence length counts
//!   the tokens to generate: prompt tokens + max new tokens ≤ L. The haystack size is found per
//!   sample by a search on its unit count ([`fit`]), so every prompt is within one haystack unit
//!   of the budget.
//! - **Depth** of the (first) queried needle is swept evenly: sample i of n at (i + 0.5) / n × 100
//!   % (RULER draws depths at random); other needles go to random depths. Recorded per row.
//! - **Sources** ([`sources`]): RULER's wonderwords lists and the 49 Paul Graham essays that are
//!   on PyPI (RULER adds 168 more from paulgraham.com, so its haystack repeats later); past the
//!   ~8.7k real words, common-words extraction adds synthetic words (RULER: its
//!   `english_words.json`). Without the files, kvc's named fallback: committed word lists
//!   ([`words`]) and 20 LongBench multi_news contexts
//!   (`datasets/ruler/multi_news_haystack.txt`, embedded).
//! - **Randomness**: ChaCha8 seeded from sha256(version, seed, task, length, index), so a sample
//!   does not depend on which other samples or lengths were asked for.
//! - Sentence splitting of the real text is a simple rule (end mark followed by a capital), not
//!   NLTK's punkt.
pub mod cwe;
pub mod fwe;
pub mod haystack;
pub mod niah;
pub mod sources;
pub mod vt;
pub mod words;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

pub use sources::{Sources, SourcesError};

use crate::data::longbench::Row;
use crate::data::tasks::Metric;
use crate::model::{prompt_ids_for, ModelError, Tokenizer};

/// Bumped whenever generated text changes for the same (seed, task, length, index); part of
/// every sample `_id`, so old prediction rows never pass for new ones.
pub const GENERATOR_VERSION: &str = "kvc-ruler-v2";

/// The default `--seed` (RULER's `random_seed`).
pub const DEFAULT_SEED: u64 = 42;

/// Errors of the RULER suite; each names the fix.
#[derive(Debug, thiserror::Error)]
pub enum RulerError {
    #[error("unknown RULER task `{name}`; valid: ruler (all), or ruler:<task> with <task> one of {valid}")]
    UnknownTask { name: String, valid: String },
    #[error("RULER length {length} for {task}: even the smallest prompt needs {needed} tokens (prompt {prompt} + {max_new} to generate); use a larger --lengths value")]
    TooShort {
        task: String,
        length: usize,
        needed: usize,
        prompt: usize,
        max_new: usize,
    },
    #[error("RULER length {length} exceeds the model's context ({context} tokens); use --lengths values up to {context}")]
    BeyondContext { length: usize, context: usize },
    #[error("RULER prompt: {0}")]
    Model(#[from] ModelError),
}

/// Kinds of needle keys and values (RULER's `type_needle_k` / `type_needle_v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Numbers,
    Words,
    Uuids,
}

/// Haystack of a NIAH task (RULER's `type_haystack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hay {
    /// The repeated noise sentence (`noise` / `repeat`).
    Noise,
    /// Real text (`essay`): kvc's multi_news text.
    Text,
    /// Distractor needles with other keys (`needle`).
    Needles,
}

/// One NIAH configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NiahSpec {
    pub hay: Hay,
    pub key: Kind,
    pub value: Kind,
    pub num_k: usize,
    pub num_v: usize,
    pub num_q: usize,
}

/// What a task generates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    Niah(NiahSpec),
    /// Variable tracking: chains of `VAR X = VAR Y` assignments.
    Vt {
        chains: usize,
        hops: usize,
    },
    /// Common-words extraction.
    Cwe {
        freq_cw: usize,
        freq_ucw: usize,
        num_cw: usize,
    },
    /// Frequent-words extraction over a Zipf-distributed coded vocabulary.
    Fwe {
        alpha: f64,
    },
}

/// One RULER task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RulerTask {
    /// `niah_single_1` (what `ruler:<name>` selects).
    pub name: &'static str,
    /// `ruler_niah_single_1`: the task base of every `<base>_<length>` subset.
    pub base: &'static str,
    pub family: Family,
    /// RULER's `tokens_to_generate`.
    pub max_new_tokens: usize,
    /// `string_match_all` for every RULER task; kvc scores single-value NIAH with
    /// `string_match_part` (any of), identical with one reference.
    pub metric: Metric,
}

const fn niah(
    name: &'static str,
    base: &'static str,
    hay: Hay,
    key: Kind,
    value: Kind,
    kvq: (usize, usize, usize),
) -> RulerTask {
    let single = kvq.1 * kvq.2 == 1;
    RulerTask {
        name,
        base,
        family: Family::Niah(NiahSpec {
            hay,
            key,
            value,
            num_k: kvq.0,
            num_v: kvq.1,
            num_q: kvq.2,
        }),
        max_new_tokens: 128,
        metric: if single {
            Metric::StringMatchPart
        } else {
            Metric::StringMatchAll
        },
    }
}

/// The suite, in RULER's order.
pub const TASKS: [RulerTask; 11] = [
    niah(
        "niah_single_1",
        "ruler_niah_single_1",
        Hay::Noise,
        Kind::Words,
        Kind::Numbers,
        (1, 1, 1),
    ),
    niah(
        "niah_single_2",
        "ruler_niah_single_2",
        Hay::Text,
        Kind::Words,
        Kind::Numbers,
        (1, 1, 1),
    ),
    niah(
        "niah_single_3",
        "ruler_niah_single_3",
        Hay::Text,
        Kind::Words,
        Kind::Uuids,
        (1, 1, 1),
    ),
    niah(
        "niah_multikey_1",
        "ruler_niah_multikey_1",
        Hay::Text,
        Kind::Words,
        Kind::Numbers,
        (4, 1, 1),
    ),
    niah(
        "niah_multikey_2",
        "ruler_niah_multikey_2",
        Hay::Needles,
        Kind::Words,
        Kind::Numbers,
        (1, 1, 1),
    ),
    niah(
        "niah_multikey_3",
        "ruler_niah_multikey_3",
        Hay::Needles,
        Kind::Uuids,
        Kind::Uuids,
        (1, 1, 1),
    ),
    niah(
        "niah_multivalue",
        "ruler_niah_multivalue",
        Hay::Text,
        Kind::Words,
        Kind::Numbers,
        (1, 4, 1),
    ),
    niah(
        "niah_multiquery",
        "ruler_niah_multiquery",
        Hay::Text,
        Kind::Words,
        Kind::Numbers,
        (4, 1, 4),
    ),
    RulerTask {
        name: "vt",
        base: "ruler_vt",
        family: Family::Vt { chains: 1, hops: 4 },
        max_new_tokens: 30,
        metric: Metric::StringMatchAll,
    },
    RulerTask {
        name: "cwe",
        base: "ruler_cwe",
        family: Family::Cwe {
            freq_cw: 30,
            freq_ucw: 3,
            num_cw: 10,
        },
        max_new_tokens: 120,
        metric: Metric::StringMatchAll,
    },
    RulerTask {
        name: "fwe",
        base: "ruler_fwe",
        family: Family::Fwe { alpha: 2.0 },
        max_new_tokens: 50,
        metric: Metric::StringMatchAll,
    },
];

fn valid_names() -> String {
    TASKS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

/// Resolve one `--tasks` entry that starts with `ruler`: `ruler` (all) or `ruler:<task>`.
/// `None` when the entry is not a RULER entry at all.
pub fn select(entry: &str) -> Option<Result<Vec<&'static RulerTask>, RulerError>> {
    if entry == "ruler" {
        return Some(Ok(TASKS.iter().collect()));
    }
    let name = entry.strip_prefix("ruler:")?;
    Some(
        TASKS
            .iter()
            .find(|t| t.name == name)
            .map(|t| vec![t])
            .ok_or_else(|| RulerError::UnknownTask {
                name: entry.to_string(),
                valid: valid_names(),
            }),
    )
}

/// The subset (prediction file, scores row) of a task at a length: `ruler_niah_single_1_4096`.
pub fn subset_name(task: &RulerTask, length: usize) -> String {
    format!("{}_{length}", task.base)
}

/// Parse a subset name back: `ruler_vt_2048` -> (vt, 2048).
pub fn parse_subset(name: &str) -> Option<(&'static RulerTask, usize)> {
    let (base, len) = name.rsplit_once('_')?;
    let length: usize = len.parse().ok()?;
    let t = TASKS.iter().find(|t| t.base == base)?;
    Some((t, length))
}

/// The sample `_id`: sha256 of (generator version, seed, task, length, index, the sources'
/// name), 24 hex digits.
pub fn sample_id(task: &RulerTask, length: usize, index: usize, seed: u64, src: &str) -> String {
    let h = Sha256::digest(
        format!(
            "{GENERATOR_VERSION}|{seed}|{}|{length}|{index}|{src}",
            task.name
        )
        .as_bytes(),
    );
    h.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// The PRNG of one sample (or of one named stream of it): ChaCha8 seeded with sha256 of the
/// parts. Own helpers for ranges and shuffles so the streams depend on ChaCha8 only (its output
/// is fixed by rand_chacha's value-stability promise), not on `rand`'s sampling algorithms.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(parts: &[&str]) -> Rng {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p.as_bytes());
            h.update([0x1f]);
        }
        Rng(ChaCha8Rng::from_seed(h.finalize().into()))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `0..n` (rejection sampling; `n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        let n = n.max(1) as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below((hi - lo + 1) as usize) as u64
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
    /// `k` distinct indices of `0..n` in random order (partial Fisher-Yates).
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }
}

/// A generated prompt before fitting: the user text, the answer prefix (put after the chat
/// template's assistant start, as RULER), the references and the queried needle's depth.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub body: String,
    pub prefix: String,
    pub answers: Vec<String>,
    pub depth: Option<f64>,
}

/// One generated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    pub subset: String,
    pub index: usize,
    pub length: usize,
    pub built: Built,
    /// Prompt tokens as `kvc eval` will build it.
    pub prompt_tokens: usize,
    /// The haystack size chosen (units of the task's haystack).
    pub units: usize,
}

impl Sample {
    /// The row `kvc eval` runs: the body as `context` and `input` (its last line, the
    /// question: every task's template ends with it), the answer prefix, depth and the target
    /// length (in `length`).
    pub fn row(&self) -> Row {
        let body = &self.built.body;
        let q = body.rfind('\n').map_or(0, |i| i + 1);
        Row {
            input: body[q..].to_string(),
            context: body[..q].to_string(),
            answers: self.built.answers.clone(),
            length: Some(self.length as u64),
            dataset: Some(self.subset.clone()),
            language: Some("en".into()),
            all_classes: None,
            id: self.id.clone(),
            answer_prefix: Some(self.built.prefix.clone()),
            depth: self.built.depth,
        }
    }
}

/// How prompts are measured: the model's tokenizer and whether the chat template applies.
pub struct Measure<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat: bool,
}

impl Measure<'_> {
    pub fn tokens(&self, b: &Built) -> Result<usize, ModelError> {
        Ok(prompt_ids_for(self.tokenizer, &b.body, self.chat, &b.prefix)?.len())
    }
}

/// Depth of sample `index` of `n`: the centres of n equal bins, in percent.
pub fn sweep_depth(index: usize, n: usize) -> f64 {
    (index as f64 + 0.5) / n.max(1) as f64 * 100.0
}

/// Build a task's prompt with `units` haystack units (deterministic in all arguments).
pub fn build(task: &RulerTask, length: usize, units: usize, ctx: &SampleCtx) -> Built {
    match task.family {
        Family::Niah(spec) => niah::build(&spec, units, ctx),
        Family::Vt { chains, hops } => vt::build(chains, hops, units, ctx),
        Family::Cwe {
            freq_cw,
            freq_ucw,
            num_cw,
        } => cwe::build(freq_cw, freq_ucw, num_cw, length, units, ctx),
        Family::Fwe { alpha } => fwe::build(alpha, length, units, ctx),
    }
}

/// What identifies one sample's randomness, and the words and text it draws from.
pub struct SampleCtx<'a> {
    pub src: &'a Sources,
    pub seed: u64,
    pub task: &'static str,
    pub length: usize,
    pub index: usize,
    /// The sweep depth of the queried needle, percent.
    pub depth: f64,
}

impl SampleCtx<'_> {
    /// A named random stream of this sample (the same for every haystack size).
    pub fn rng(&self, stream: &str) -> Rng {
        Rng::new(&[
            GENERATOR_VERSION,
            &self.seed.to_string(),
            self.task,
            &self.length.to_string(),
            &self.index.to_string(),
            stream,
        ])
    }
}

/// Minimum and maximum haystack units of a task.
fn unit_bounds(task: &RulerTask, src: &Sources) -> (usize, usize) {
    match task.family {
        Family::Niah(s) => match s.hay {
            Hay::Text => (8, 1 << 22),
            _ => (1, 1 << 20),
        },
        Family::Vt { .. } => (1, 1 << 20),
        Family::Cwe { num_cw, .. } => (num_cw + 1, src.max_cwe_words()),
        Family::Fwe { .. } => (16, 1 << 22),
    }
}

/// The largest `n` in `[min, max]` with `ok(n)`, assuming `ok` is (nearly) monotone and
/// `ok(min)` holds, starting the search at `hint`. Returns `n` and its value.
pub fn fit<T, E>(
    min: usize,
    max: usize,
    hint: usize,
    mut ok: impl FnMut(usize) -> Result<Option<T>, E>,
) -> Result<Option<(usize, T)>, E> {
    let Some(at_min) = ok(min)? else {
        return Ok(None);
    };
    let mut best = (min, at_min);
    let start = hint.clamp(min, max);
    // Gallop from the hint to a bracket [lo fits, hi does not], then bisect.
    let (mut lo, mut hi);
    if start == min {
        lo = min;
        hi = None;
    } else if let Some(v) = ok(start)? {
        best = (start, v);
        lo = start;
        hi = None;
    } else {
        lo = min;
        hi = Some(start);
        let mut step = (start / 64).max(1);
        let mut h = start;
        while h > min {
            let probe = h.saturating_sub(step).max(min);
            if probe == min {
                break;
            }
            if let Some(v) = ok(probe)? {
                best = (probe, v);
                lo = probe;
                break;
            }
            hi = Some(probe);
            h = probe;
            step *= 2;
        }
    }
    if hi.is_none() {
        let mut step = (lo / 64).max(1);
        loop {
            if lo >= max {
                return Ok(Some(best));
            }
            let probe = (lo + step).min(max);
            if let Some(v) = ok(probe)? {
                best = (probe, v);
                lo = probe;
                step *= 2;
            } else {
                hi = Some(probe);
                break;
            }
        }
    }
    let mut hi = hi.unwrap_or(max + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if let Some(v) = ok(mid)? {
            best = (mid, v);
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(best))
}

/// Generate the samples of one task at one length from `src`: `n` samples, each fitted so
/// prompt tokens + `max_new` ≤ `length`.
pub fn generate(
    task: &'static RulerTask,
    (length, n, seed): (usize, usize, u64),
    max_new: usize,
    m: &Measure,
    src: &Sources,
) -> Result<Vec<Sample>, RulerError> {
    let budget = length.saturating_sub(max_new);
    let (min, max) = unit_bounds(task, src);
    let mut hint = 0usize;
    let mut out = Vec::with_capacity(n);
    for index in 0..n {
        let ctx = SampleCtx {
            src,
            seed,
            task: task.name,
            length,
            index,
            depth: sweep_depth(index, n),
        };
        if hint == 0 {
            // First sample: estimate units per token from two probes.
            let t_min = m.tokens(&build(task, length, min, &ctx))?;
            let probe = (min * 4).max(min + 16).min(max);
            let t_probe = m.tokens(&build(task, length, probe, &ctx))?;
            let per_unit = (t_probe.saturating_sub(t_min)) as f64 / (probe - min) as f64;
            hint = if per_unit > 0.0 && budget > t_min {
                min + ((budget - t_min) as f64 / per_unit) as usize
            } else {
                min
            };
        }
        let found = fit(
            min,
            max,
            hint,
            |u| -> Result<Option<(Built, usize)>, RulerError> {
                let b = build(task, length, u, &ctx);
                let t = m.tokens(&b)?;
                Ok((t <= budget).then_some((b, t)))
            },
        )?;
        let Some((units, (built, prompt_tokens))) = found else {
            let prompt = m.tokens(&build(task, length, min, &ctx))?;
            return Err(RulerError::TooShort {
                task: task.name.into(),
                length,
                needed: prompt + max_new,
                prompt,
                max_new,
            });
        };
        hint = units;
        out.push(Sample {
            id: sample_id(task, length, index, seed, src.name),
            subset: subset_name(task, length),
            index,
            length,
            built,
            prompt_tokens,
            units,
        });
    }
    Ok(out)
}

/// RULER's `postprocess_pred`: control characters become newlines, then strip.
pub fn postprocess_pred(pred: &str) -> String {
    pred.chars()
        .map(|c| if (c as u32) < 0x20 { '\n' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_ids_are_stable() {
        let t = &TASKS[0];
        assert_eq!(subset_name(t, 4096), "ruler_niah_single_1_4096");
        assert_eq!(parse_subset("ruler_niah_single_1_4096"), Some((t, 4096)));
        assert_eq!(parse_subset("ruler_vt_128").unwrap().0.name, "vt");
        assert!(parse_subset("ruler_nope_128").is_none());
        assert!(parse_subset("hotpotqa").is_none());
        assert_eq!(select("ruler").unwrap().unwrap().len(), 11);
        assert_eq!(select("ruler:cwe").unwrap().unwrap()[0].name, "cwe");
        let e = select("ruler:xyz").unwrap().unwrap_err().to_string();
        assert!(
            e.contains("ruler:xyz") && e.contains("niah_multiquery"),
            "{e}"
        );
        assert!(select("hotpotqa").is_none());
        let a = sample_id(t, 1024, 0, 42, "ruler");
        assert_eq!(a, sample_id(t, 1024, 0, 42, "ruler"));
        assert_ne!(a, sample_id(t, 1024, 1, 42, "ruler"));
        assert_ne!(a, sample_id(t, 1024, 0, 43, "ruler"));
        assert_ne!(a, sample_id(t, 2048, 0, 42, "ruler"));
        assert_ne!(a, sample_id(t, 1024, 0, 42, "kvc-fallback"));
        assert_eq!(a.len(), 24);
    }

    #[test]
    fn rng_helpers_are_uniform_enough_and_deterministic() {
        let mut r = Rng::new(&["x"]);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[r.below(4)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        let s1 = Rng::new(&["a", "b"]).sample(100, 5);
        assert_eq!(s1, Rng::new(&["a", "b"]).sample(100, 5));
        assert_ne!(s1, Rng::new(&["ab", ""]).sample(100, 5));
        let mut v: Vec<usize> = (0..10).collect();
        Rng::new(&["s"]).shuffle(&mut v);
        let mut w = v.clone();
        w.sort();
        assert_eq!(w, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn fit_finds_the_largest_fitting_size_from_any_hint() {
        for hint in [0, 1, 5, 37, 38, 39, 500, 10_000] {
            let mut calls = 0;
            let r = fit(1, 1000, hint, |n| -> Result<Option<usize>, ()> {
                calls += 1;
                Ok((n * 3 + 10 <= 124).then_some(n))
            })
            .unwrap();
            assert_eq!(r, Some((38, 38)), "hint {hint}");
            assert!(calls < 30, "hint {hint}: {calls} calls");
        }
        let none = fit(5, 10, 7, |_| -> Result<Option<()>, ()> { Ok(None) }).unwrap();
        assert!(none.is_none());
        let all = fit(5, 10, 7, |n| -> Result<Option<usize>, ()> { Ok(Some(n)) }).unwrap();
        assert_eq!(all, Some((10, 10)));
    }

    /// Every task's row puts its question (the body's last line, RULER's query) in `input`
    /// and the rest in `context`: what the question-agnostic protocol compresses.
    #[test]
    fn rows_split_the_question_from_the_context() {
        for task in TASKS.iter() {
            let ctx = SampleCtx {
                src: crate::data::ruler::Sources::fallback(),
                seed: 42,
                task: task.name,
                length: 4096,
                index: 0,
                depth: 50.0,
            };
            let built = build(
                task,
                4096,
                unit_bounds(task, Sources::fallback()).0 + 20,
                &ctx,
            );
            let sample = Sample {
                id: "x".into(),
                subset: subset_name(task, 4096),
                index: 0,
                length: 4096,
                built: built.clone(),
                prompt_tokens: 0,
                units: 0,
            };
            let row = sample.row();
            assert_eq!(
                row.context.clone() + &row.input,
                built.body,
                "{}",
                task.name
            );
            let q = &row.input;
            assert!(
                (q.starts_with("What") || q.starts_with("Question:"))
                    && (q.ends_with('?') || q.ends_with("text above.")),
                "{}: {q}",
                task.name
            );
            assert!(
                row.context.ends_with('\n') && row.context.len() > q.len(),
                "{}",
                task.name
            );
        }
    }

    #[test]
    fn depths_sweep_bin_centres() {
        assert_eq!(sweep_depth(0, 1), 50.0);
        assert_eq!(sweep_depth(0, 4), 12.5);
        assert_eq!(sweep_depth(3, 4), 87.5);
    }

    #[test]
    fn postprocess_turns_control_chars_into_newlines_and_strips() {
        assert_eq!(postprocess_pred("\t a\u{1}b \n"), "a\nb");
    }
}
