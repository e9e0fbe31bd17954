//! `rouge_score` / `rouge_zh_score` of LongBench's metrics.py: the ROUGE-L F-measure of the PyPI
//! package `rouge` 1.0.1 (pltrdy), `Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]`,
//! with LongBench's bare `except: return 0.0`.
//!
//! No Rust crate implements pltrdy's variant (a set-of-word-types union LCS), so this is a port
//! of `rouge/rouge_score.py::rouge_l_summary_level` as installed from PyPI:
//! - sentences: `[" ".join(p.split()) for p in text.split(".") if len(p) > 0]` (only ASCII `.`
//!   splits; a whitespace-only piece becomes the sentence `""`); no sentences on either side →
//!   `ValueError` → 0.0 (rouge-1/-2 raise on exactly the same inputs);
//! - words: `sentence.split(" ")` (so `""` is a word); m / n = number of distinct words;
//! - for every (reference sentence, hypothesis sentence) pair one LCS is reconstructed from the
//!   DP table walking back from the corner: equal → diagonal, else up if `T[i-1][j] > T[i][j-1]`,
//!   else left; the collected word types go into one global set whose size is `llcs`;
//! - `f = 2.0 * ((p*r) / (p + r + 1e-8))`, so a perfect match is 0.999999995.
//!
//! The reference walk is a recursive Python function: a path needing more `_recon` calls than the
//! interpreter's recursion limit allows raises `RecursionError`, which LongBench scores as 0.0.
//! kvc walks iteratively and reproduces the cut-off from the call count ([`RecursionLimit`]); the
//! measured limits are in docs/longbench-spec.md §6.5 and depend on the Python version.
use std::collections::HashSet;

use super::jieba;
use super::normalize::py_split;

/// Which Python's recursion cut-off to reproduce in the recursive LCS walk of `rouge` 1.0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecursionLimit {
    /// CPython 3.11 / 3.12 (the conformance venv and kvc's default): en 991, zh 990 calls.
    #[default]
    Py311,
    /// CPython 3.8 / 3.10: en 990, zh 989 calls.
    Py310,
    /// No cut-off (pltrdy master after PR #69, not on PyPI).
    Unlimited,
}

impl RecursionLimit {
    /// Largest number of `_recon` calls that still succeeds for one (ref, hyp) sentence pair.
    /// `zh` is one frame deeper (rouge_zh_score calls rouge_score).
    pub fn max_calls(self, zh: bool) -> usize {
        let base = match self {
            RecursionLimit::Py311 => 991,
            RecursionLimit::Py310 => 990,
            RecursionLimit::Unlimited => return usize::MAX,
        };
        if zh {
            base - 1
        } else {
            base
        }
    }
}

/// Why pltrdy `rouge` would raise (LongBench turns both into a score of 0.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RougeRaise {
    /// `ValueError`: a side has no sentence (empty text or only dots).
    Empty,
    /// `RecursionError` in `_recon`: the LCS walk for some sentence pair is too long.
    Recursion,
}

fn sentences(text: &str) -> Vec<String> {
    text.split('.')
        .filter(|p| !p.is_empty())
        .map(|p| py_split(p).collect::<Vec<_>>().join(" "))
        .collect()
}

/// The ROUGE-L F of `rouge` 1.0.1 for one (hyp, ref) pair, or why the package raises.
pub fn rouge_l_f(hyp: &str, reference: &str, max_calls: usize) -> Result<f64, RougeRaise> {
    let hyp_s = sentences(hyp);
    let ref_s = sentences(reference);
    if hyp_s.is_empty() || ref_s.is_empty() {
        return Err(RougeRaise::Empty);
    }
    let hyp_w: Vec<Vec<&str>> = hyp_s.iter().map(|s| s.split(' ').collect()).collect();
    let ref_w: Vec<Vec<&str>> = ref_s.iter().map(|s| s.split(' ').collect()).collect();
    let m = ref_w.iter().flatten().collect::<HashSet<_>>().len();
    let n = hyp_w.iter().flatten().collect::<HashSet<_>>().len();

    let mut union: HashSet<&str> = HashSet::new();
    for r in &ref_w {
        for h in &hyp_w {
            recon_lcs(r, h, &mut union, max_calls)?;
        }
    }
    let llcs = union.len() as f64;
    let r_lcs = llcs / m as f64;
    let p_lcs = llcs / n as f64;
    Ok(2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8)))
}

/// `_recon_lcs(x, y)` with x = reference words, y = hypothesis words: add the words of the one LCS
/// the reference walk picks to `out`. Errors when the walk needs more than `max_calls` calls.
fn recon_lcs<'a>(
    x: &[&'a str],
    y: &[&'a str],
    out: &mut HashSet<&'a str>,
    max_calls: usize,
) -> Result<(), RougeRaise> {
    let (nx, ny) = (x.len(), y.len());
    // The walk ends when i or j reaches 0, so it takes at least min(nx, ny) steps (+1 terminal
    // call): decide the cut-off before allocating the table (bounds memory on huge inputs).
    if nx.min(ny).saturating_add(1) > max_calls {
        return Err(RougeRaise::Recursion);
    }
    let w = ny + 1;
    let mut table = vec![0u32; (nx + 1) * w];
    for i in 1..=nx {
        for j in 1..=ny {
            table[i * w + j] = if x[i - 1] == y[j - 1] {
                table[(i - 1) * w + j - 1] + 1
            } else {
                table[(i - 1) * w + j].max(table[i * w + j - 1])
            };
        }
    }
    // First pass: the path, counting calls (path steps + the terminal call).
    let (mut i, mut j) = (nx, ny);
    let mut calls = 1usize;
    let mut words = Vec::new();
    while i != 0 && j != 0 {
        if x[i - 1] == y[j - 1] {
            words.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * w + j] > table[i * w + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
        calls += 1;
        if calls > max_calls {
            return Err(RougeRaise::Recursion);
        }
    }
    out.extend(words);
    Ok(())
}

/// `rouge_score(prediction, ground_truth)`: 0.0 whenever the package raises.
pub fn rouge_score(pred: &str, gt: &str, limit: RecursionLimit) -> f64 {
    rouge_l_f(pred, gt, limit.max_calls(false)).unwrap_or(0.0)
}

/// `rouge_zh_score`: jieba tokens of each side joined by single spaces, then ROUGE-L.
pub fn rouge_zh_score(pred: &str, gt: &str, limit: RecursionLimit) -> f64 {
    let p = jieba::cut(pred).join(" ");
    let g = jieba::cut(gt).join(" ");
    rouge_l_f(&p, &g, limit.max_calls(true)).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_quirks() {
        assert_eq!(
            rouge_l_f("a b c", "a b c", usize::MAX),
            Ok(2.0 * (1.0 / (2.0 + 1e-8)))
        );
        assert_eq!(rouge_l_f("", "a", usize::MAX), Err(RougeRaise::Empty));
        assert_eq!(rouge_l_f("...", "a", usize::MAX), Err(RougeRaise::Empty));
        // Tie goes left: hyp "b a" vs ref "a b" collects {b}: p = r = 1/2.
        let v = rouge_l_f("b a", "a b", usize::MAX).unwrap();
        assert_eq!(v, 2.0 * ((0.5 * 0.5) / (0.5 + 0.5 + 1e-8)));
        // A whitespace-only piece is the sentence "" whose word "" counts.
        assert!(
            rouge_l_f("a. ", "a", usize::MAX).unwrap() < rouge_l_f("a", "a", usize::MAX).unwrap()
        );
    }

    #[test]
    fn recursion_cut_off() {
        let long: String = (0..600).map(|i| format!("w{i} ")).collect();
        assert!(rouge_l_f(&long, &long, 601).is_ok());
        assert_eq!(rouge_l_f(&long, &long, 600), Err(RougeRaise::Recursion));
    }
}
