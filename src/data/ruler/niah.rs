//! Needle in a haystack (RULER `niah.py`): needles "One of the special magic {kind} for {key}
//! is: {value}." in a noise, real-text or distractor-needle haystack; the question asks for the
//! values of one or more keys.
use super::haystack::{insert, sentences, NOISE};
use super::sources::Sources;
use super::{Built, Hay, Kind, NiahSpec, Rng, SampleCtx};

/// RULER's plural type names (`numbers`, `words`, `uuids`).
pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Numbers => "numbers",
        Kind::Words => "words",
        Kind::Uuids => "uuids",
    }
}

/// One random key or value: a 7-digit number, an adjective-noun word of `src`, or a version-4
/// UUID (as Python's `uuid.UUID(int=getrandbits(128), version=4)`).
pub fn random_value(kind: Kind, src: &Sources, rng: &mut Rng) -> String {
    match kind {
        Kind::Numbers => rng.range(1_000_000, 9_999_999).to_string(),
        Kind::Words => src.key(rng.below(src.n_keys())),
        Kind::Uuids => {
            let mut x = ((rng.next_u64() as u128) << 64) | rng.next_u64() as u128;
            x &= !(0xc000u128 << 48);
            x |= 0x8000u128 << 48;
            x &= !(0xf000u128 << 64);
            x |= 4u128 << 76;
            let h = format!("{x:032x}");
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
    }
}

/// The needle sentence.
pub fn needle(kind: Kind, key: &str, value: &str) -> String {
    format!(
        "One of the special magic {} for {key} is: {value}.",
        kind_name(kind)
    )
}

/// Build a NIAH prompt with `units` haystack units (noise sentences, real-text words or
/// distractor needles).
pub fn build(spec: &NiahSpec, units: usize, ctx: &SampleCtx) -> Built {
    let mut rng = ctx.rng("content");
    let mut keys: Vec<String> = Vec::new();
    while keys.len() < spec.num_k {
        let k = random_value(spec.key, ctx.src, &mut rng);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let values: Vec<Vec<String>> = keys
        .iter()
        .map(|_| {
            (0..spec.num_v)
                .map(|_| random_value(spec.value, ctx.src, &mut rng))
                .collect()
        })
        .collect();
    let queries = rng.sample(spec.num_k, spec.num_q);
    // The first value of the first queried key sits at the sweep depth; every other needle at
    // a random depth.
    let mut needles: Vec<(String, f64)> = Vec::new();
    for (ki, key) in keys.iter().enumerate() {
        for (vi, v) in values[ki].iter().enumerate() {
            let r = rng.unit();
            let f = if ki == queries[0] && vi == 0 {
                ctx.depth / 100.0
            } else {
                r
            };
            needles.push((needle(spec.value, key, v), f));
        }
    }
    let context = match spec.hay {
        Hay::Noise => insert(vec![NOISE.to_string(); units], &needles).join("\n"),
        Hay::Text => insert(sentences(&ctx.src.essay_prefix(units)), &needles).join(" "),
        Hay::Needles => {
            let mut drng = ctx.rng("distractors");
            let mut hay = Vec::with_capacity(units);
            while hay.len() < units {
                let k = random_value(spec.key, ctx.src, &mut drng);
                let v = random_value(spec.value, ctx.src, &mut drng);
                if !keys.contains(&k) {
                    hay.push(needle(spec.value, &k, &v));
                }
            }
            insert(hay, &needles).join("\n")
        }
    };
    let asked: Vec<&String> = queries.iter().map(|&q| &keys[q]).collect();
    let query = match asked.as_slice() {
        [one] => one.to_string(),
        [init @ .., last] => format!(
            "{}, and {last}",
            init.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        [] => String::new(),
    };
    let answers: Vec<String> = queries.iter().flat_map(|&q| values[q].clone()).collect();
    // RULER's template; with one expected value it is made singular ("A special magic number
    // is hidden ...", `type_needle_v[:-1]`).
    let single = spec.num_q * spec.num_v == 1;
    let plural = kind_name(spec.value);
    let tv = if single {
        &plural[..plural.len() - 1]
    } else {
        plural
    };
    let (some, are, are_all) = if single {
        ("A", "is", "is")
    } else {
        ("Some", "are", "are all")
    };
    let body = format!(
        "{some} special magic {tv} {are} hidden within the following text. Make sure to memorize it. I will quiz you about the {tv} afterwards.\n{context}\nWhat {are_all} the special magic {tv} for {query} mentioned in the provided text?"
    );
    let prefix =
        format!(" The special magic {tv} for {query} mentioned in the provided text {are}");
    Built {
        body,
        prefix,
        answers,
        depth: Some(ctx.depth),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ruler::TASKS;

    fn ctx(depth: f64) -> SampleCtx<'static> {
        SampleCtx {
            src: crate::data::ruler::Sources::fallback(),
            seed: 42,
            task: "t",
            length: 1024,
            index: 0,
            depth,
        }
    }

    #[test]
    fn uuid_and_number_shapes() {
        let mut r = Rng::new(&["u"]);
        let u = random_value(Kind::Uuids, Sources::fallback(), &mut r);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        let n = random_value(Kind::Numbers, Sources::fallback(), &mut r);
        assert_eq!(n.len(), 7);
        assert!(random_value(Kind::Words, Sources::fallback(), &mut r).contains('-'));
    }

    #[test]
    fn single_template_is_singular_and_multi_lists_queries() {
        let Family(spec) = family(0);
        let b = build(&spec, 10, &ctx(50.0));
        assert!(
            b.body.starts_with("A special magic number is hidden"),
            "{}",
            b.body
        );
        assert!(b.body.contains("What is the special magic number for "));
        assert!(b.prefix.ends_with("mentioned in the provided text is"));
        assert_eq!(b.answers.len(), 1);
        assert!(b.body.contains(&format!("is: {}.", b.answers[0])));
        let Family(mq) = family(7);
        let b = build(&mq, 50, &ctx(50.0));
        assert!(b.body.starts_with("Some special magic numbers are hidden"));
        assert_eq!(b.answers.len(), 4);
        assert_eq!(b.prefix.matches(", ").count(), 3, "{}", b.prefix);
        assert!(b.prefix.contains(", and "));
        let Family(mv) = family(6);
        assert_eq!(build(&mv, 50, &ctx(50.0)).answers.len(), 4);
    }

    struct Family(NiahSpec);
    fn family(i: usize) -> Family {
        match TASKS[i].family {
            crate::data::ruler::Family::Niah(s) => Family(s),
            _ => unreachable!(),
        }
    }

    #[test]
    fn needle_sits_at_the_depth_in_every_haystack() {
        for i in [0, 1, 4] {
            let Family(spec) = family(i);
            for depth in [0.0, 25.0, 50.0, 90.0] {
                // Real text: depth moves in whole sentences, so use a realistic haystack size.
                let units = if spec.hay == Hay::Text { 3000 } else { 400 };
                let b = build(&spec, units, &ctx(depth));
                let target = format!("is: {}.", b.answers[0]);
                let pos = b.body.find(&target).unwrap() as f64;
                let start = b.body.find('\n').unwrap() as f64;
                let end = b.body.rfind('\n').unwrap() as f64;
                let frac = (pos - start) / (end - start) * 100.0;
                assert!(
                    (frac - depth).abs() < 3.0,
                    "task {i} depth {depth}: at {frac:.1}"
                );
            }
        }
    }
}
