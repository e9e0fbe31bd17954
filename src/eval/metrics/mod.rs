//! LongBench v1's metric functions (`metrics.py`), reproduced exactly, one file per family, plus
//! [`metric_score`], the dispatch by [`Metric`]. Per-file headers say where the port follows the
//! Python reference and where Rust crates differed and were corrected.
pub mod classification;
pub mod code_sim;
pub mod jieba;
pub mod normalize;
pub mod qa_f1;
pub mod retrieval;
pub mod rouge;
pub mod ruler;

pub use code_sim::FuzzBackend;
pub use rouge::RecursionLimit;

use crate::data::tasks::Metric;

/// Choices where "the official scorer" depends on the Python environment it ran in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricOptions {
    /// fuzzywuzzy's matcher for code similarity (difflib unless python-Levenshtein is installed).
    pub fuzz: FuzzBackend,
    /// Which CPython's recursion cut-off the `rouge` 1.0.1 LCS walk hits.
    pub rouge_recursion: RecursionLimit,
}

/// Inputs on which the official scorer crashes (eval.py aborts); kvc reports them instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    #[error("ground truth {gt:?} has no paragraph id (`{pattern}`); LongBench's retrieval score raises IndexError here")]
    NoParagraphId { gt: String, pattern: &'static str },
    #[error("classification needs `all_classes`, but the last line of the file has none (eval.py uses the last line's all_classes for every sample)")]
    NoClasses,
}

/// One metric on one (prediction, ground truth) pair (RULER's metrics are over the whole
/// reference list: see [`crate::eval::scoring::sample_score`]), as `dataset2metric[dataset](pred, gt,
/// all_classes=all_classes)` in eval.py.
pub fn metric_score(
    metric: Metric,
    pred: &str,
    gt: &str,
    all_classes: Option<&[String]>,
    opts: &MetricOptions,
) -> Result<f64, MetricError> {
    Ok(match metric {
        Metric::QaF1 => qa_f1::qa_f1_score(pred, gt),
        Metric::QaF1Zh => qa_f1::qa_f1_zh_score(pred, gt),
        Metric::RougeL => rouge::rouge_score(pred, gt, opts.rouge_recursion),
        Metric::RougeLZh => rouge::rouge_zh_score(pred, gt, opts.rouge_recursion),
        Metric::Classification => classification::classification_score(
            pred,
            gt,
            all_classes.ok_or(MetricError::NoClasses)?,
        ),
        Metric::Retrieval => {
            retrieval::retrieval_score(pred, gt).ok_or_else(|| MetricError::NoParagraphId {
                gt: gt.to_string(),
                pattern: r"Paragraph (\d+)",
            })?
        }
        Metric::RetrievalZh => {
            retrieval::retrieval_zh_score(pred, gt).ok_or_else(|| MetricError::NoParagraphId {
                gt: gt.to_string(),
                pattern: r"段落(\d+)",
            })?
        }
        Metric::Count => retrieval::count_score(pred, gt),
        Metric::CodeSim => code_sim::code_sim_score(pred, gt, opts.fuzz),
        Metric::StringMatchAll | Metric::StringMatchPart => {
            ruler::string_match_part(pred, std::slice::from_ref(&gt.to_string()))
        }
    })
}
