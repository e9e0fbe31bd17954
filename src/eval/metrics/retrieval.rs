//! `retrieval_score`, `retrieval_zh_score` and `count_score` of LongBench's metrics.py.
//!
//! The ground truth id is the first match of `Paragraph (\d+)` (zh: `段落(\d+)`); the score is the
//! share of the prediction's `\d+` matches that equal it **as strings** ("012" != "12", "１２" !=
//! "12"), 0 when the prediction has no number. `\d` is Unicode Nd in both Python `re` and the Rust
//! `regex` crate. Where the reference raises (`IndexError`: no paragraph id in the ground truth),
//! kvc returns an error instead of crashing.
use regex::Regex;
use std::sync::OnceLock;

fn re(cell: &'static OnceLock<Regex>, pat: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pat).expect("static regex"))
}

fn fraction_equal(pred: &str, target: &str) -> f64 {
    static NUM: OnceLock<Regex> = OnceLock::new();
    let mut total = 0usize;
    let mut right = 0usize;
    for m in re(&NUM, r"\d+").find_iter(pred) {
        total += 1;
        if m.as_str() == target {
            right += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        right as f64 / total as f64
    }
}

/// `retrieval_score` (en). `None` where the reference raises IndexError (no `Paragraph N` in gt).
pub fn retrieval_score(pred: &str, gt: &str) -> Option<f64> {
    static GT: OnceLock<Regex> = OnceLock::new();
    let id = re(&GT, r"Paragraph (\d+)").captures(gt)?.get(1)?.as_str();
    Some(fraction_equal(pred, id))
}

/// `retrieval_zh_score`. `None` where the reference raises IndexError (no `段落N` in gt).
pub fn retrieval_zh_score(pred: &str, gt: &str) -> Option<f64> {
    static GT: OnceLock<Regex> = OnceLock::new();
    let id = re(&GT, r"段落(\d+)").captures(gt)?.get(1)?.as_str();
    Some(fraction_equal(pred, id))
}

/// `count_score`: the ground truth itself (`str(ground_truth)`) is the number.
pub fn count_score(pred: &str, gt: &str) -> f64 {
    fraction_equal(pred, gt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_equality_of_numbers() {
        assert_eq!(
            retrieval_score("Paragraph 12, not 012", "Paragraph 12"),
            Some(0.5)
        );
        assert_eq!(retrieval_score("none", "Paragraph 3"), Some(0.0));
        assert_eq!(retrieval_score("3", "no id"), None);
        assert_eq!(retrieval_zh_score("段落５", "段落5"), Some(0.0));
        assert_eq!(count_score("There are 7 unique, 7.", "7"), 1.0);
    }
}
