//! Variable tracking (RULER `variable_tracking.py`): `VAR X = 12345` then `VAR Y = VAR X` hops
//! hidden among noise sentences; the question asks for every variable holding the value. One
//! in-context example (3-letter names, 5 noise sentences) precedes the task, as RULER's default.
use super::haystack::NOISE;
use super::{Built, Rng, SampleCtx};

fn var_names(rng: &mut Rng, n: usize, letters: usize) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    while v.len() < n {
        let s: String = (0..letters)
            .map(|_| (b'A' + rng.below(26) as u8) as char)
            .collect();
        if !v.contains(&s) {
            v.push(s);
        }
    }
    v
}

/// One instance: (body with its answer prefix appended, answers) for the example, or (body,
/// prefix, answers) for the task.
fn instance(
    content: &mut Rng,
    place: &mut Rng,
    chains: usize,
    hops: usize,
    noises: usize,
    letters: usize,
) -> (String, String, Vec<String>) {
    let vars = var_names(content, chains * (hops + 1), letters);
    let mut chain_lines: Vec<Vec<String>> = Vec::new();
    let mut first_value = String::new();
    for c in 0..chains {
        let vs = &vars[c * (hops + 1)..(c + 1) * (hops + 1)];
        let value = content.range(10_000, 99_998);
        if c == 0 {
            first_value = value.to_string();
        }
        let mut lines = vec![format!("VAR {} = {value}", vs[0])];
        for j in 0..hops {
            lines.push(format!("VAR {} = VAR {} ", vs[j + 1], vs[j]));
        }
        chain_lines.push(lines);
    }
    let mut sentences: Vec<String> = vec![format!("{NOISE}\n"); noises];
    for lines in &chain_lines {
        // Sorted random slots, each assignment inserted in chain order (RULER).
        let mut pos = place.sample(sentences.len() + 1, lines.len());
        pos.sort();
        for (j, (p, line)) in pos.iter().zip(lines).enumerate() {
            sentences.insert(p + j, line.clone());
        }
    }
    let context = sentences.join(" ").replace(". \n", ".\n");
    let body = format!(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {first_value} in the text above."
    );
    let prefix = format!(
        " Answer: According to the chain(s) of variable assignment in the text above, {} variables are assigned the value {first_value}, they are: ",
        hops + 1
    );
    let answers = vars[..hops + 1].to_vec();
    (body, prefix, answers)
}

/// Build a variable-tracking prompt with `units` noise sentences.
pub fn build(chains: usize, hops: usize, units: usize, ctx: &SampleCtx) -> Built {
    let (ex_body, ex_prefix, ex_answers) = instance(
        &mut ctx.rng("example"),
        &mut ctx.rng("example-slots"),
        chains,
        hops.min(10),
        5,
        3,
    );
    let (body, prefix, answers) = instance(
        &mut ctx.rng("content"),
        &mut ctx.rng(&format!("slots-{units}")),
        chains,
        hops,
        units,
        5,
    );
    Built {
        body: format!("{ex_body}{ex_prefix}{}\n\n{body}", ex_answers.join(" ")),
        prefix,
        answers,
        depth: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_is_in_order_and_answers_are_its_variables() {
        let ctx = SampleCtx {
            src: crate::data::ruler::Sources::fallback(),
            seed: 1,
            task: "vt",
            length: 1024,
            index: 0,
            depth: 50.0,
        };
        let b = build(1, 4, 30, &ctx);
        assert_eq!(b.answers.len(), 5);
        let task = b.body.split("\n\nMemorize").nth(1).unwrap();
        let mut last = 0;
        for (j, v) in b.answers.iter().enumerate() {
            let pat = if j == 0 {
                format!("VAR {v} = ")
            } else {
                format!("VAR {v} = VAR {} ", b.answers[j - 1])
            };
            let p = task.find(&pat).unwrap_or_else(|| panic!("{pat} missing"));
            assert!(p >= last);
            last = p;
        }
        assert!(b.prefix.contains("5 variables are assigned the value"));
        assert_eq!(b, build(1, 4, 30, &ctx));
    }
}
