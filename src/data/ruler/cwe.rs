//! Common-words extraction (RULER `common_words_extraction.py`): a numbered list in which 10
//! words appear `freq_cw` times and the rest `freq_ucw` times (6 and 1 below 4096 tokens); the
//! answer is the 10 common words. One in-context example precedes the task, as RULER.
use super::{Built, SampleCtx};

const TEMPLATE_HEAD: &str = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n";
const QUESTION: &str = "\nQuestion: What are the 10 most common words in the above list?";
const PREFIX: &str = " Answer: The top 10 words that appear most often in the list are:";

fn numbered(words: &[String]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// (context, common words) with `num_words` distinct words drawn by `stream` from the
/// source's real words while they suffice ([`super::sources::Sources::cwe_words`]).
fn example(
    ctx: &SampleCtx,
    stream: &str,
    num_words: usize,
    cw: usize,
    ucw: usize,
    num_cw: usize,
) -> (String, Vec<String>) {
    let mut rng = ctx.rng(stream);
    let p = ctx.src.cwe_words(num_words);
    let picked: Vec<String> = rng
        .sample(p.len(), num_words)
        .into_iter()
        .map(|i| p[i].clone())
        .collect();
    let (common, uncommon) = picked.split_at(num_cw.min(picked.len()));
    let mut list: Vec<String> = Vec::new();
    for _ in 0..cw {
        list.extend(common.iter().cloned());
    }
    for _ in 0..ucw {
        list.extend(uncommon.iter().cloned());
    }
    rng.shuffle(&mut list);
    (numbered(&list), common.to_vec())
}

/// Build a common-words prompt with `units` distinct words.
pub fn build(
    freq_cw: usize,
    freq_ucw: usize,
    num_cw: usize,
    length: usize,
    units: usize,
    ctx: &SampleCtx,
) -> Built {
    let ((ex_n, ex_cw, ex_ucw), (cw, ucw)) = if length < 4096 {
        ((20, 3, 1), (6, 1))
    } else {
        ((40, 10, 3), (freq_cw, freq_ucw))
    };
    let (ex_ctx, ex_ans) = example(ctx, "example", ex_n, ex_cw, ex_ucw, num_cw);
    // Partial Fisher-Yates: the first draws (the common words) do not depend on `units`.
    let (task_ctx, answers) = example(ctx, "content", units, cw, ucw, num_cw);
    let body = format!(
        "{TEMPLATE_HEAD}{ex_ctx}{QUESTION}{PREFIX} {}\n{TEMPLATE_HEAD}{task_ctx}{QUESTION}",
        numbered(&ex_ans)
    );
    Built {
        body,
        prefix: PREFIX.to_string(),
        answers,
        depth: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_words_appear_most_often() {
        let ctx = SampleCtx {
            src: crate::data::ruler::Sources::fallback(),
            seed: 3,
            task: "cwe",
            length: 8192,
            index: 0,
            depth: 50.0,
        };
        let b = build(30, 3, 10, 8192, 100, &ctx);
        assert_eq!(b.answers.len(), 10);
        let task = b.body.rsplit(TEMPLATE_HEAD).next().unwrap();
        for a in &b.answers {
            assert_eq!(
                task.matches(&format!(". {a} ")).count()
                    + task.matches(&format!(". {a}\n")).count(),
                30,
                "{a}"
            );
        }
        assert_eq!(task.matches(". ").count(), 10 * 30 + 90 * 3);
    }
}
