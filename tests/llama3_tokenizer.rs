//! kvc's reading of Meta's Llama-3 `tokenizer.model` (tiktoken format, `kvc::model::tiktoken`)
//! against tiktoken itself (`scripts/llama3_tiktoken_ids.py` in the conformance venv): the same
//! ids for English, Chinese, code, numbers, whitespace runs, emoji and text holding
//! special-token strings, a BOS when special tokens are added, and decode(encode(x)) == x.
//! The file comes from the PyPI package llama-models (`scripts/fetch-llama3-tokenizer.sh`, run
//! by `scripts/test.sh`); a checkpoint directory with only `tokenizer.model` loads through it.
mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn tokenizer_model() -> PathBuf {
    let p = std::env::var("KVC_LLAMA3_TOKENIZER").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/llama3/tokenizer.model"),
        PathBuf::from,
    );
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-llama3-tokenizer.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

fn texts() -> Vec<String> {
    let sample = |name: &str| -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("datasets/longbench/sample/{name}.jsonl"));
        let line = std::fs::read_to_string(path).unwrap();
        let row: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        row["context"]
            .as_str()
            .unwrap()
            .chars()
            .take(6000)
            .collect()
    };
    vec![
        "The quick brown fox jumps over the lazy dog. It's 12:45 and we've 1234567 apples!".into(),
        "KV-cache compression evicts contiguous blocks per attention head.\n\nWhat's left?".into(),
        "小明说：“今天的天气很好，我们去公园散步吧。”他们走了3.5公里。".into(),
        "fn main() {\n\tlet x: Vec<u32> = (0..10).map(|i| i * i).collect();\r\n    println!(\"{x:?}\");\n}\n".into(),
        "def f(a, b=2):\n    return {'k': [a, b]}  # comment\n\n\n\n        \n".into(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|reserved_special_token_17|>".into(),
        "Emoji 🤖🚀 and accents: naïve café, Ελληνικά, русский, العربية, 日本語のテキスト。".into(),
        "   leading spaces, trailing spaces   \n\t\ttabs\n\n\n".into(),
        "0123456789 3.14159265358979 1e-10 0x1F 1,000,000".into(),
        sample("multi_news"),
        sample("multifieldqa_zh"),
        sample("passage_retrieval_zh"),
    ]
}

/// tiktoken's ids for `texts`.
fn tiktoken_ids(py: &std::path::Path, model: &std::path::Path, texts: &[String]) -> Vec<Vec<u32>> {
    let mut child = Command::new(py)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/llama3_tiktoken_ids.py"))
        .arg(model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python");
    let input = serde_json::to_vec(texts).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "llama3_tiktoken_ids.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn llama3_tiktoken_file_encodes_like_tiktoken() {
    let model = tokenizer_model();
    let Some(py) = common::venv_python("the Llama-3 tokenizer check") else {
        return;
    };
    let tok = kvc::model::tiktoken::llama3_from_tiktoken(&model).unwrap();
    let texts = texts();
    let want = tiktoken_ids(&py, &model, &texts);
    for (text, want) in texts.iter().zip(&want) {
        let got = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(
            &got,
            want,
            "ids differ for {:?}",
            &text[..text.len().min(80)]
        );
        let with_bos = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        assert_eq!(with_bos[0], 128000);
        assert_eq!(&with_bos[1..], &want[..]);
        assert_eq!(&tok.decode(&got, false).unwrap(), text);
    }
    eprintln!(
        "{} texts, {} tokens: identical to tiktoken",
        texts.len(),
        want.iter().map(Vec::len).sum::<usize>()
    );
}

#[test]
fn checkpoint_dir_with_only_tokenizer_model_loads() {
    let model = tokenizer_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&model, dir.path().join("tokenizer.model")).unwrap();
    let t = kvc::model::tokenizer::Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.bos_token.as_deref(), Some("<|begin_of_text|>"));
    assert!(t.adds_bos);
    assert_eq!(t.token_to_id("<|eot_id|>"), Some(128009));
    assert_eq!(t.inner.get_vocab_size(true), 128256);
    // A tokenizer.json wins when both exist; neither is an error naming both.
    let empty = tempfile::tempdir().unwrap();
    let e = kvc::model::tokenizer::Tokenizer::from_dir(empty.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("tokenizer.model"),
        "{e}"
    );
}
