//! `classification_score` of LongBench's metrics.py (trec, lsht), quirks included.
//!
//! The reference collects every class name that is a (case-sensitive) substring of the
//! prediction, in `all_classes` order, then iterates that list **while removing from it** the
//! names that are proper substrings of the ground truth. A Python `for` walks a list by index, so
//! the element after each removal is skipped, and `list.remove` deletes the first equal element.
//! This port replays exactly that (`idx` loop + remove-first), e.g. classes [A, AB, ABC, ABCD]
//! with ground truth ABCD score 0.5, not 1.0.

/// `classification_score(prediction, ground_truth, all_classes=...)`.
pub fn classification_score(pred: &str, gt: &str, all_classes: &[String]) -> f64 {
    let mut matched: Vec<&str> = all_classes
        .iter()
        .map(String::as_str)
        .filter(|c| pred.contains(c))
        .collect();
    let mut idx = 0;
    while idx < matched.len() {
        let t = matched[idx];
        idx += 1;
        if gt.contains(t) && t != gt {
            if let Some(first) = matched.iter().position(|m| *m == t) {
                matched.remove(first);
            }
        }
    }
    if matched.contains(&gt) {
        1.0 / matched.len() as f64
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mutation_while_iterating_quirk() {
        assert_eq!(
            classification_score("A AB ABC ABCD", "ABCD", &v(&["A", "AB", "ABC", "ABCD"])),
            0.5
        );
        assert_eq!(classification_score("XY", "XY", &v(&["X", "X", "XY"])), 0.5);
        assert_eq!(
            classification_score("Location", "Location", &v(&["Loc", "Location"])),
            1.0
        );
        assert_eq!(
            classification_score("loc", "Location", &v(&["Location"])),
            0.0
        );
    }
}
