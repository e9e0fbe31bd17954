//! Frequent-words extraction (RULER `freq_words_extraction.py`): coded 6-letter words drawn
//! with Zipf frequencies (count of rank k = floor(n k^-alpha / zeta(alpha))), the top-ranked
//! word replaced by the noise token `...`; the answer is ranks 2-4.
use super::{Built, SampleCtx};

const TEMPLATE_HEAD: &str = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. ";
const QUESTION: &str = "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?";
const PREFIX: &str =
    " Answer: According to the coded text above, the three most frequently appeared words are:";

/// Riemann zeta by direct summation with an Euler-Maclaurin tail (alpha > 1).
fn zeta(alpha: f64) -> f64 {
    let n = 1000usize;
    let s: f64 = (1..n).map(|k| (k as f64).powf(-alpha)).sum();
    let nf = n as f64;
    s + nf.powf(1.0 - alpha) / (alpha - 1.0) + 0.5 * nf.powf(-alpha)
}

/// Build a frequent-words prompt with `units` as RULER's `num_words`.
pub fn build(alpha: f64, length: usize, units: usize, ctx: &SampleCtx) -> Built {
    let vocab_size = (length / 50).max(8);
    let mut rng = ctx.rng("vocab");
    let mut vocab: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while vocab.len() < vocab_size {
        let w: String = (0..6)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        if seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    vocab[0] = "...".into();
    let z = zeta(alpha);
    let mut words: Vec<&str> = Vec::new();
    for (k, w) in vocab.iter().enumerate() {
        let cnt = (units as f64 * ((k + 1) as f64).powf(-alpha) / z) as usize;
        words.extend(std::iter::repeat_n(w.as_str(), cnt));
    }
    ctx.rng(&format!("order-{units}")).shuffle(&mut words);
    Built {
        body: format!("{TEMPLATE_HEAD}{}{QUESTION}", words.join(" ")),
        prefix: PREFIX.to_string(),
        answers: vocab[1..4].to_vec(),
        depth: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeta_two_and_answer_ranks() {
        assert!((zeta(2.0) - std::f64::consts::PI.powi(2) / 6.0).abs() < 1e-9);
        let ctx = SampleCtx {
            src: crate::data::ruler::Sources::fallback(),
            seed: 3,
            task: "fwe",
            length: 2048,
            index: 0,
            depth: 50.0,
        };
        let b = build(2.0, 2048, 1000, &ctx);
        let count = |w: &str| b.body.split_whitespace().filter(|x| *x == w).count();
        let c: Vec<usize> = b.answers.iter().map(|a| count(a)).collect();
        assert!(c[0] > c[1] && c[1] > c[2] && c[2] > 0, "{c:?}");
    }
}
