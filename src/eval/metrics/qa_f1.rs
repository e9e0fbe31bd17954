//! `qa_f1_score` and `qa_f1_zh_score` of LongBench's metrics.py: token-multiset F1.
//!
//! Follows the reference exactly: `Counter(pred) & Counter(gt)` overlap, 0 when the overlap is
//! empty (so empty vs empty is 0, not 1), and `(2*p*r)/(p+r)` evaluated left to right in f64.
//! The zh variant segments the raw text with jieba (`cut(cut_all=False)`, HMM on; see
//! [`super::jieba`]), normalises each token with `normalize_zh_answer` and drops empty tokens.
use std::collections::HashMap;

use super::jieba;
use super::normalize::{normalize_answer, normalize_zh_answer, py_split};

/// `f1_score(prediction_tokens, ground_truth_tokens)`.
pub fn f1_score<S: AsRef<str>>(pred: &[S], gt: &[S]) -> f64 {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in gt {
        *counts.entry(t.as_ref()).or_default() += 1;
    }
    let mut num_same = 0usize;
    for t in pred {
        if let Some(c) = counts.get_mut(t.as_ref()) {
            if *c > 0 {
                *c -= 1;
                num_same += 1;
            }
        }
    }
    if num_same == 0 {
        return 0.0;
    }
    let precision = 1.0 * num_same as f64 / pred.len() as f64;
    let recall = 1.0 * num_same as f64 / gt.len() as f64;
    (2.0 * precision * recall) / (precision + recall)
}

/// `qa_f1_score(prediction, ground_truth)` (English).
pub fn qa_f1_score(pred: &str, gt: &str) -> f64 {
    let p = normalize_answer(pred);
    let g = normalize_answer(gt);
    let pt: Vec<&str> = py_split(&p).collect();
    let gtk: Vec<&str> = py_split(&g).collect();
    f1_score(&pt, &gtk)
}

fn zh_tokens(s: &str) -> Vec<String> {
    jieba::cut(s)
        .into_iter()
        .map(|t| normalize_zh_answer(&t))
        .filter(|t| !t.is_empty())
        .collect()
}

/// `qa_f1_zh_score(prediction, ground_truth)` (Chinese, jieba tokens).
pub fn qa_f1_zh_score(pred: &str, gt: &str) -> f64 {
    f1_score(&zh_tokens(pred), &zh_tokens(gt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f1_basics() {
        assert_eq!(qa_f1_score("", ""), 0.0);
        assert_eq!(qa_f1_score("The Eiffel Tower!", "eiffel tower"), 1.0);
        // 1 of 2 pred tokens, 1 of 3 gt tokens: p=0.5, r=1/3 -> 0.4
        let v = qa_f1_score("paris city", "paris in france");
        assert!((v - 0.4).abs() < 1e-12, "{v}");
        assert_eq!(qa_f1_zh_score("，。", "北京"), 0.0);
    }
}
