//! Haystacks: RULER's repeated noise sentence and kvc's real text (LongBench multi_news
//! contexts, embedded), with needle insertion at a depth.
/// RULER's noise haystack unit (`niah.py` `noise`, also the filler of variable tracking).
pub const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// The offline fallback's real-text haystack (see `datasets/ruler/README.md` and
/// [`super::sources`]).
pub const TEXT: &str = include_str!("../../../datasets/ruler/multi_news_haystack.txt");

/// Titles and abbreviations after which a capital does not start a sentence.
const ABBREVIATIONS: &[&str] = &[
    "Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Gov.", "Sen.", "Rep.", "Gen.", "Lt.",
    "Col.", "Sgt.", "Capt.", "Prof.", "Rev.", "Inc.", "Co.", "Corp.", "No.", "U.S.", "U.K.",
    "Jan.", "Feb.", "Aug.", "Sept.", "Oct.", "Nov.", "Dec.", "Mt.", "Ft.", "vs.",
];

/// Split text into sentences: a word ending in `.`, `?` or `!` (optionally followed by closing
/// quotes or brackets) ends a sentence when the next word starts with a capital, a digit or an
/// opening quote. (RULER uses NLTK's punkt; this simple rule is enough to keep needles between
/// sentences.)
pub fn sentences(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        cur.push(w);
        let core = w.trim_end_matches(['"', '\'', ')', ']', '”', '’']);
        let ends = core.ends_with(['.', '?', '!']) && !ABBREVIATIONS.contains(&core);
        let next_starts = words.get(i + 1).is_none_or(|n| {
            n.chars()
                .next()
                .is_some_and(|c| c.is_uppercase() || c.is_ascii_digit() || c == '"' || c == '“')
        });
        if ends && next_starts {
            out.push(cur.join(" "));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(cur.join(" "));
    }
    out
}

/// Insert `needles` (text, depth fraction in [0, 1]) between `units` at the unit boundary
/// nearest to that fraction of the haystack's characters (so depth means the same in a real
/// text with sentences of any length); needles at the same boundary keep their order.
pub fn insert(units: Vec<String>, needles: &[(String, f64)]) -> Vec<String> {
    let n = units.len();
    // cum[i] = characters before unit i (boundary i), i in 0..=n.
    let mut cum = Vec::with_capacity(n + 1);
    cum.push(0usize);
    for u in &units {
        cum.push(cum.last().copied().unwrap_or(0) + u.chars().count() + 1);
    }
    let total = *cum.last().unwrap_or(&0) as f64;
    let boundary = |f: f64| -> usize {
        let target = total * f.clamp(0.0, 1.0);
        let i = cum.partition_point(|&c| (c as f64) < target).min(n);
        if i > 0 && (target - cum[i - 1] as f64) < (cum[i] as f64 - target) {
            i - 1
        } else {
            i
        }
    };
    let mut at: Vec<(usize, usize)> = needles
        .iter()
        .enumerate()
        .map(|(k, (_, f))| (boundary(*f), k))
        .collect();
    at.sort();
    let mut out = Vec::with_capacity(n + needles.len());
    let mut j = 0;
    for (i, u) in units.into_iter().enumerate() {
        while j < at.len() && at[j].0 <= i {
            out.push(needles[at[j].1].0.clone());
            j += 1;
        }
        out.push(u);
    }
    while j < at.len() {
        out.push(needles[at[j].1].0.clone());
        j += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_on_end_marks_before_capitals() {
        let s =
            sentences("Mr. Smith went home. It was 5 p.m. on a Sunday. \"Yes,\" he said. 3 left.");
        assert_eq!(
            s,
            [
                "Mr. Smith went home.",
                "It was 5 p.m. on a Sunday.",
                "\"Yes,\" he said.",
                "3 left."
            ]
        );
        let fallback = super::super::sources::Sources::fallback();
        assert!(fallback.essay_words().len() > 29_000);
        assert_eq!(fallback.essay_prefix(3).split(' ').count(), 3);
        let n = fallback.essay_words().len();
        assert_eq!(
            fallback.essay_prefix(n + 1).split(' ').next_back(),
            Some(fallback.essay_words()[0].as_str())
        );
    }

    #[test]
    fn insert_puts_needles_at_their_fraction() {
        let units: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let out = insert(
            units,
            &[("A".into(), 0.5), ("B".into(), 0.0), ("C".into(), 1.0)],
        );
        assert_eq!(out.join(""), "B01234A56789C");
    }
}
