//! Python string semantics the LongBench metrics rely on, and the two answer normalisers of
//! `metrics.py`: `normalize_answer` (en) and `normalize_zh_answer` (zh).
//!
//! Departures of Rust's std/regex from CPython 3.11 that matter here, handled by hand:
//! - `str.split()` splits on `str.isspace()`, which includes U+001C..U+001F; Rust
//!   `split_whitespace` does not ([`py_split`]).
//! - `re`'s `\b` uses Python `\w` = `str.isalnum()` or `_`: letters (L*) and numerics (Nd, Nl, No),
//!   not combining marks; Rust `regex`'s `\w` differs ([`py_is_word`]), so the article regex
//!   `\b(a|an|the)\b` is a hand-written scanner.
//! - `str.lower()` equals Rust `to_lowercase` (checked in the spec), `string.punctuation` equals
//!   `char::is_ascii_punctuation`.
use regex::Regex;
use std::sync::OnceLock;

/// Python `str.isspace()` (CPython 3.11): Unicode White_Space plus U+001C..U+001F.
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python `s.split()` with no argument.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_is_space).filter(|t| !t.is_empty())
}

/// Python `\w` in a `str` pattern: `str.isalnum()` or `_`. isalnum = isalpha (categories Lu, Ll,
/// Lt, Lm, Lo) or isnumeric (Nd, Nl, No and the few Lo with a numeric value, already alpha).
pub fn py_is_word(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    static W: OnceLock<Regex> = OnceLock::new();
    let re = W.get_or_init(|| Regex::new(r"^[\p{L}\p{N}]$").expect("static regex"));
    let mut buf = [0u8; 4];
    re.is_match(c.encode_utf8(&mut buf))
}

/// `re.sub(r"\b(a|an|the)\b", " ", s)` with Python's `\b`.
pub fn remove_articles(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let word = |i: usize| i < chars.len() && py_is_word(chars[i]);
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        // \b before: the previous char is not a word char (the article's first char is one).
        let boundary_before = i == 0 || !word(i - 1);
        let mut matched = 0;
        if boundary_before {
            // Alternatives in regex order: a, an, the; each needs \b after.
            for alt in ["a", "an", "the"] {
                let n = alt.chars().count();
                if i + n <= chars.len()
                    && chars[i..i + n].iter().copied().eq(alt.chars())
                    && !word(i + n)
                {
                    matched = n;
                    break;
                }
            }
        }
        if matched > 0 {
            out.push(' ');
            i += matched;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// `normalize_answer` (en): lower → drop ASCII punctuation → articles → whitespace collapse.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let no_art = remove_articles(&no_punc);
    py_split(&no_art).collect::<Vec<_>>().join(" ")
}

/// The CJK punctuation `normalize_zh_answer` drops in addition to `string.punctuation`
/// (exactly metrics.py's `cn_punctuation`; note `》` is in it and `《` is not).
pub const CN_PUNCTUATION: &str = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.";

/// `normalize_zh_answer`: lower → drop ASCII + CJK punctuation → delete all whitespace.
pub fn normalize_zh_answer(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation() && !CN_PUNCTUATION.contains(*c) && !py_is_space(*c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_split_includes_file_separators() {
        assert_eq!(
            py_split("a\u{1c}b \u{3000}c\u{200b}d").collect::<Vec<_>>(),
            ["a", "b", "c\u{200b}d"]
        );
    }

    #[test]
    fn articles_use_python_word_boundaries() {
        assert_eq!(
            normalize_answer("The cat, an apple and a  dog."),
            "cat apple and dog"
        );
        assert_eq!(normalize_answer("the-ater"), "theater");
        // ① is \w in Python (No), so "the" after it is not a word on its own.
        assert_eq!(normalize_answer("①the"), "①the");
        // A combining mark is not \w in Python: "the" before it stands alone.
        assert_eq!(normalize_answer("the\u{301}"), "\u{301}");
        assert_eq!(normalize_answer("«the» cat"), "« » cat");
        assert_eq!(normalize_answer("an an a"), "");
    }

    #[test]
    fn zh_normaliser_keeps_left_guillemet() {
        assert_eq!(normalize_zh_answer("《书》，Ａ b。"), "《书ａb");
    }
}
