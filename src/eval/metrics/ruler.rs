//! RULER's metrics (`scripts/eval/synthetic/constants.py`): on the prediction after
//! `postprocess_pred` (control characters to newlines, stripped), `string_match_all` is the
//! fraction of the references that occur in it, `string_match_part` is 1 if any does; both
//! compare lower-cased strings by substring. RULER reports the mean over samples × 100, rounded
//! to 2 decimals, which is what kvc's subset score computes.
use crate::data::ruler::postprocess_pred;

fn found(pred: &str, r: &str) -> bool {
    pred.contains(&r.to_lowercase())
}

/// Mean over `refs` of 1 if the reference is in the prediction (0 with no references).
pub fn string_match_all(pred: &str, refs: &[String]) -> f64 {
    if refs.is_empty() {
        return 0.0;
    }
    let p = postprocess_pred(pred).to_lowercase();
    refs.iter().filter(|r| found(&p, r)).count() as f64 / refs.len() as f64
}

/// 1 if any reference is in the prediction.
pub fn string_match_part(pred: &str, refs: &[String]) -> f64 {
    let p = postprocess_pred(pred).to_lowercase();
    if refs.iter().any(|r| found(&p, r)) {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[&str]) -> Vec<String> {
        x.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn all_is_the_fraction_found_case_insensitively() {
        let r = v(&["1234567", "Apple-Pie", "x"]);
        assert_eq!(
            string_match_all("The values: 1234567 and apple-pie", &r),
            2.0 / 3.0
        );
        assert_eq!(string_match_all("", &r), 0.0);
        assert_eq!(string_match_all("anything", &[]), 0.0);
        assert_eq!(string_match_all("APPLE-PIE 1234567 X", &r), 1.0);
        // Substring, as RULER: a longer number containing the reference counts.
        assert_eq!(string_match_all("91234567", &v(&["1234567"])), 1.0);
    }

    #[test]
    fn part_is_any_of() {
        let r = v(&["alpha", "beta"]);
        assert_eq!(string_match_part("BETA!", &r), 1.0);
        assert_eq!(string_match_part("", &r), 0.0);
        assert_eq!(string_match_part("gamma", &r), 0.0);
        assert_eq!(string_match_part("x", &[]), 0.0);
        // Control characters split words apart only where they were.
        assert_eq!(string_match_part("al\u{7}pha", &r), 0.0);
    }
}
