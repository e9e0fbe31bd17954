//! `code_sim_score` of LongBench's metrics.py (lcc, repobench-p): the first prediction line that
//! contains none of "`", "#", "//" (after stripping leading `\n`; `""` if none), then
//! `fuzz.ratio(line, gt) / 100` of fuzzywuzzy 0.18.0.
//!
//! fuzzywuzzy's `ratio`: equal strings → 100 (so `("", "")` gives 1.0), an empty side → 0, else
//! `int(round(100 * SequenceMatcher(None, s1, s2).ratio()))` with Python's half-to-even `round`.
//! Which `SequenceMatcher` depends on what is installed ([`FuzzBackend`]):
//! - [`FuzzBackend::Difflib`] (default, what LongBench's requirements.txt gives): a hand port of
//!   CPython 3.11 `difflib.SequenceMatcher` (Ratcliff/Obershelp with the autojunk heuristic for
//!   `len(b) >= 200`) over code points. Hand-written because the `difflib` crate returns f32 and
//!   inverts autojunk, and `similar` is a different algorithm (docs/longbench-spec.md §10).
//! - [`FuzzBackend::Levenshtein`]: python-Levenshtein ≥ 0.20's `ratio` = InDel normalised
//!   similarity, via the `rapidfuzz` crate (bit-identical per the spec), over code points.
use std::collections::HashMap;

/// Which matcher fuzzywuzzy uses for `fuzz.ratio`; record it with the scores it produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FuzzBackend {
    /// `difflib.SequenceMatcher` (python-Levenshtein not installed; LongBench's official setup).
    #[default]
    Difflib,
    /// `Levenshtein.ratio` (python-Levenshtein ≥ 0.20 installed).
    Levenshtein,
}

impl FuzzBackend {
    pub fn name(self) -> &'static str {
        match self {
            FuzzBackend::Difflib => "difflib",
            FuzzBackend::Levenshtein => "levenshtein",
        }
    }
}

/// `difflib.SequenceMatcher(None, a, b).ratio()` (CPython 3.11).
pub fn difflib_ratio(a: &[char], b: &[char]) -> f64 {
    let len = a.len() + b.len();
    if len == 0 {
        return 1.0;
    }
    let matches = difflib_matches(a, b);
    2.0 * matches as f64 / len as f64
}

/// Total size of `get_matching_blocks()`.
fn difflib_matches(a: &[char], b: &[char]) -> usize {
    // __chain_b: indices of each element of b, ascending; then autojunk removes popular ones.
    let mut b2j: HashMap<char, Vec<usize>> = HashMap::new();
    for (j, &c) in b.iter().enumerate() {
        b2j.entry(c).or_default().push(j);
    }
    if b.len() >= 200 {
        let ntest = b.len() / 100 + 1;
        b2j.retain(|_, idxs| idxs.len() <= ntest);
    }
    let mut total = 0;
    let mut queue = vec![(0usize, a.len(), 0usize, b.len())];
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let (i, j, k) = find_longest_match(a, b, &b2j, alo, ahi, blo, bhi);
        if k > 0 {
            total += k;
            if alo < i && blo < j {
                queue.push((alo, i, blo, j));
            }
            if i + k < ahi && j + k < bhi {
                queue.push((i + k, ahi, j + k, bhi));
            }
        }
    }
    total
}

#[allow(clippy::too_many_arguments)]
fn find_longest_match(
    a: &[char],
    b: &[char],
    b2j: &HashMap<char, Vec<usize>>,
    alo: usize,
    ahi: usize,
    blo: usize,
    bhi: usize,
) -> (usize, usize, usize) {
    let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
    let mut j2len: HashMap<usize, usize> = HashMap::new();
    let mut newj2len: HashMap<usize, usize> = HashMap::new();
    for (i, ai) in a.iter().enumerate().take(ahi).skip(alo) {
        newj2len.clear();
        if let Some(js) = b2j.get(ai) {
            for &j in js {
                if j < blo {
                    continue;
                }
                if j >= bhi {
                    break;
                }
                let prev = if j == 0 {
                    0
                } else {
                    j2len.get(&(j - 1)).copied().unwrap_or(0)
                };
                let k = prev + 1;
                newj2len.insert(j, k);
                if k > bestsize {
                    besti = i + 1 - k;
                    bestj = j + 1 - k;
                    bestsize = k;
                }
            }
        }
        std::mem::swap(&mut j2len, &mut newj2len);
    }
    // No junk function, so bjunk is empty: extend by equal elements on both ends (this can pick
    // up "popular" elements that autojunk removed from b2j).
    while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
        besti -= 1;
        bestj -= 1;
        bestsize += 1;
    }
    while besti + bestsize < ahi
        && bestj + bestsize < bhi
        && a[besti + bestsize] == b[bestj + bestsize]
    {
        bestsize += 1;
    }
    (besti, bestj, bestsize)
}

/// python-Levenshtein ≥ 0.20 `Levenshtein.ratio` (InDel normalised similarity).
pub fn levenshtein_ratio(a: &str, b: &str) -> f64 {
    rapidfuzz::distance::indel::normalized_similarity(a.chars(), b.chars())
}

/// fuzzywuzzy 0.18.0 `fuzz.ratio(s1, s2)`: an integer percentage.
pub fn fuzz_ratio(s1: &str, s2: &str, backend: FuzzBackend) -> u32 {
    if s1 == s2 {
        return 100;
    }
    if s1.is_empty() || s2.is_empty() {
        return 0;
    }
    let r = match backend {
        FuzzBackend::Difflib => {
            let a: Vec<char> = s1.chars().collect();
            let b: Vec<char> = s2.chars().collect();
            difflib_ratio(&a, &b)
        }
        FuzzBackend::Levenshtein => levenshtein_ratio(s1, s2),
    };
    // utils.intr: int(round(x)); Python's round on a float is half-to-even on the exact value.
    (100.0 * r).round_ties_even() as u32
}

/// The line `code_sim_score` compares: first line without "`", "#" or "//".
pub fn first_code_line(pred: &str) -> &str {
    pred.trim_start_matches('\n')
        .split('\n')
        .find(|l| !l.contains('`') && !l.contains('#') && !l.contains("//"))
        .unwrap_or("")
}

/// `code_sim_score(prediction, ground_truth)`.
pub fn code_sim_score(pred: &str, gt: &str, backend: FuzzBackend) -> f64 {
    fuzz_ratio(first_code_line(pred), gt, backend) as f64 / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        assert_eq!(code_sim_score("", "", FuzzBackend::Difflib), 1.0);
        assert_eq!(fuzz_ratio("bcbcb", "abacbbc", FuzzBackend::Difflib), 33);
        assert_eq!(fuzz_ratio("bcbcb", "abacbbc", FuzzBackend::Levenshtein), 67);
        let a = format!("q{}", "ab".repeat(60));
        let b = "ab".repeat(120);
        assert_eq!(fuzz_ratio(&a, &b, FuzzBackend::Difflib), 0);
        assert_eq!(fuzz_ratio(&a, &b, FuzzBackend::Levenshtein), 66);
    }

    #[test]
    fn line_filter_is_contains() {
        assert_eq!(first_code_line("\n\n# c\nprint('#')\nx = 1\n"), "x = 1");
        assert_eq!(first_code_line("```python\n"), "");
        assert_eq!(first_code_line("a\r\nb"), "a\r");
    }
}
