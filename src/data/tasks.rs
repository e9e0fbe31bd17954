//! The LongBench v1 task table: the 21 subsets and the 13 LongBench-E (`_e`) subsets, each with
//! its category, language, official metric, generation length, prompt template and whether the
//! model's chat template applies.
//!
//! Follows THUDM/LongBench `pred.py` / `eval.py` / `config/*.json` (commit 2e00731, identical to
//! the v1 files at 4c4b985). The two config files are shipped unchanged under
//! `datasets/longbench/config/` and embedded with `include_str!`: prompt templates come from
//! `dataset2prompt.json` (data, copied exactly) and a unit test checks that the max-new-token
//! column of the static table equals `dataset2maxlen.json`. An `_e` subset uses its base
//! subset's prompt, length and metric (that is what `pred.py --e` does).
//!
//! Categories follow the LongBench README/task.md (eval.py itself computes no category average).
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

const DATASET2PROMPT_JSON: &str =
    include_str!("../../datasets/longbench/config/dataset2prompt.json");
const DATASET2MAXLEN_JSON: &str =
    include_str!("../../datasets/longbench/config/dataset2maxlen.json");

/// LongBench task category (README / task.md grouping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    SingleDocQa,
    MultiDocQa,
    Summarization,
    FewShot,
    Synthetic,
    Code,
    /// kvc's generated RULER suite (`src/data/ruler/`), not a LongBench category.
    SyntheticRuler,
}

impl Category {
    /// The six LongBench categories in the paper's / README's order, then kvc's RULER suite.
    pub const ALL: [Category; 7] = [
        Category::SingleDocQa,
        Category::MultiDocQa,
        Category::Summarization,
        Category::FewShot,
        Category::Synthetic,
        Category::Code,
        Category::SyntheticRuler,
    ];

    /// The display name used in LongBench's README and in kvc's CSVs ("Single-Doc QA", ...).
    pub fn name(self) -> &'static str {
        match self {
            Category::SingleDocQa => "Single-Doc QA",
            Category::MultiDocQa => "Multi-Doc QA",
            Category::Summarization => "Summarization",
            Category::FewShot => "Few-shot Learning",
            Category::Synthetic => "Synthetic",
            Category::Code => "Code",
            Category::SyntheticRuler => "Synthetic-RULER",
        }
    }

    /// Parse a category name: the display name or a slug, case-insensitive, ignoring spaces,
    /// `-` and `_` (`"single-doc-qa"`, `"fewshot"`, `"Few-shot Learning"`, `"few-shot"`).
    pub fn parse(s: &str) -> Result<Category, TaskError> {
        let key: String = s
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '_'))
            .flat_map(char::to_lowercase)
            .collect();
        let found = match key.as_str() {
            "singledocqa" => Some(Category::SingleDocQa),
            "multidocqa" => Some(Category::MultiDocQa),
            "summarization" => Some(Category::Summarization),
            "fewshotlearning" | "fewshot" => Some(Category::FewShot),
            "synthetic" | "synthetictasks" => Some(Category::Synthetic),
            "code" | "codecompletion" => Some(Category::Code),
            "syntheticruler" => Some(Category::SyntheticRuler),
            _ => None,
        };
        found.ok_or_else(|| TaskError::UnknownCategory {
            name: s.to_string(),
            valid: Category::ALL
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Language of a subset (`language` field of the LongBench rows; code subsets say "code").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    En,
    Zh,
    Code,
}

impl Language {
    pub fn name(self) -> &'static str {
        match self {
            Language::En => "en",
            Language::Zh => "zh",
            Language::Code => "code",
        }
    }
}

/// The official metric function of a subset (`dataset2metric` in eval.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// `qa_f1_score`
    QaF1,
    /// `qa_f1_zh_score`
    QaF1Zh,
    /// `rouge_score` (ROUGE-L F of pltrdy `rouge` 1.0.1)
    RougeL,
    /// `rouge_zh_score`
    RougeLZh,
    /// `classification_score`
    Classification,
    /// `retrieval_score`
    Retrieval,
    /// `retrieval_zh_score`
    RetrievalZh,
    /// `count_score`
    Count,
    /// `code_sim_score`
    CodeSim,
    /// RULER's `string_match_all`: the fraction of the references found in the prediction.
    StringMatchAll,
    /// RULER's `string_match_part`: 1 if any reference is found in the prediction.
    StringMatchPart,
}

impl Metric {
    /// The function name in LongBench's metrics.py.
    pub fn python_name(self) -> &'static str {
        match self {
            Metric::QaF1 => "qa_f1_score",
            Metric::QaF1Zh => "qa_f1_zh_score",
            Metric::RougeL => "rouge_score",
            Metric::RougeLZh => "rouge_zh_score",
            Metric::Classification => "classification_score",
            Metric::Retrieval => "retrieval_score",
            Metric::RetrievalZh => "retrieval_zh_score",
            Metric::Count => "count_score",
            Metric::CodeSim => "code_sim_score",
            Metric::StringMatchAll => "string_match_all",
            Metric::StringMatchPart => "string_match_part",
        }
    }

    /// The metric's name in LongBench's task.md (F1, Rouge-L, Accuracy, Edit Sim).
    pub fn display_name(self) -> &'static str {
        match self {
            Metric::QaF1 | Metric::QaF1Zh => "F1",
            Metric::RougeL | Metric::RougeLZh => "Rouge-L",
            Metric::Classification | Metric::Retrieval | Metric::RetrievalZh | Metric::Count => {
                "Accuracy"
            }
            Metric::CodeSim => "Edit Sim",
            Metric::StringMatchAll => "Match All",
            Metric::StringMatchPart => "Match Any",
        }
    }
}

/// One LongBench subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    /// Subset name as in the data files and eval.py (`"hotpotqa"`, `"hotpotqa_e"`).
    pub name: &'static str,
    /// The base subset (equal to `name` unless this is an `_e` subset).
    pub base: &'static str,
    pub category: Category,
    pub language: Language,
    pub metric: Metric,
    /// `dataset2maxlen.json`: max new tokens to generate.
    pub max_new_tokens: usize,
    /// Whether pred.py applies the model's chat template (not for trec, triviaqa, samsum, lsht,
    /// lcc, repobench-p).
    pub chat_template: bool,
    /// Whether eval.py scores only the first line of the prediction (trec, triviaqa, samsum,
    /// lsht): `pred.lstrip('\n').split('\n')[0]`.
    pub first_line_only: bool,
    /// True for the LongBench-E variants (`*_e`), scored per length bucket.
    pub longbench_e: bool,
}

impl Task {
    /// The prompt template (`dataset2prompt.json`, exact), with `{context}` and `{input}`.
    pub fn prompt_template(&self) -> &'static str {
        if self.is_ruler() {
            // RULER rows carry their prompt in `context` and its question, the last line, in
            // `input` (see `data::ruler`).
            return "{context}{input}";
        }
        prompts().get(self.base).map(String::as_str).unwrap_or("")
    }

    /// A generated RULER subset (`ruler_<task>_<length>`).
    pub fn is_ruler(&self) -> bool {
        self.category == Category::SyntheticRuler
    }

    /// Fill the prompt template as Python's `template.format(**row)` does for these templates:
    /// `{context}` and `{input}` are replaced, `{{`/`}}` unescape, braces inside the values are
    /// not interpreted.
    pub fn build_prompt(&self, context: &str, input: &str) -> Result<String, TaskError> {
        format_template(
            self.prompt_template(),
            &[("context", context), ("input", input)],
        )
        .map_err(|field| TaskError::TemplateField {
            task: self.name.to_string(),
            field,
        })
    }

    /// The filled template as (context part, question part), whose concatenation is
    /// [`Task::build_prompt`]'s prompt: the question-agnostic protocol compresses the first and
    /// reads the second afterwards. The question part starts at the line holding `{input}`
    /// (never inside the context); a template without `{input}` (summaries, counting, code)
    /// splits after the newlines that follow the context, so its closing instruction is the
    /// question part. Both as kvpress's LongBench split (`context` / `question` +
    /// `answer_prefix`).
    pub fn build_prompt_parts(
        &self,
        context: &str,
        input: &str,
    ) -> Result<(String, String), TaskError> {
        let template = self.prompt_template();
        let at = question_start(template);
        let fill = |part: &str| {
            format_template(part, &[("context", context), ("input", input)]).map_err(|field| {
                TaskError::TemplateField {
                    task: self.name.to_string(),
                    field,
                }
            })
        };
        Ok((fill(&template[..at])?, fill(&template[at..])?))
    }

    /// Whether the subset is English (part of the `en16` set).
    pub fn is_english(&self) -> bool {
        self.language != Language::Zh
    }
}

/// Errors from task lookups and prompt building.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("unknown LongBench task `{name}`; valid names: {valid}")]
    UnknownTask { name: String, valid: String },
    #[error("unknown task category `{name}`; valid categories: {valid}")]
    UnknownCategory { name: String, valid: String },
    #[error("unknown task set `{name}`; valid sets: all (21 subsets), en16, e (13 LongBench-E subsets), a category name, or a comma-separated list of task names")]
    UnknownSet { name: String },
    #[error("prompt template of `{task}` uses field `{{{field}}}`, which kvc does not fill (only context and input)")]
    TemplateField { task: String, field: String },
}

macro_rules! t {
    ($name:literal, $cat:ident, $lang:ident, $metric:ident, $max:literal, chat=$chat:literal, first=$first:literal) => {
        Task {
            name: $name,
            base: $name,
            category: Category::$cat,
            language: Language::$lang,
            metric: Metric::$metric,
            max_new_tokens: $max,
            chat_template: $chat,
            first_line_only: $first,
            longbench_e: false,
        }
    };
}

/// The 21 LongBench subsets in pred.py / README order.
pub const LONGBENCH: [Task; 21] = [
    t!(
        "narrativeqa",
        SingleDocQa,
        En,
        QaF1,
        128,
        chat = true,
        first = false
    ),
    t!(
        "qasper",
        SingleDocQa,
        En,
        QaF1,
        128,
        chat = true,
        first = false
    ),
    t!(
        "multifieldqa_en",
        SingleDocQa,
        En,
        QaF1,
        64,
        chat = true,
        first = false
    ),
    t!(
        "multifieldqa_zh",
        SingleDocQa,
        Zh,
        QaF1Zh,
        64,
        chat = true,
        first = false
    ),
    t!(
        "hotpotqa",
        MultiDocQa,
        En,
        QaF1,
        32,
        chat = true,
        first = false
    ),
    t!(
        "2wikimqa",
        MultiDocQa,
        En,
        QaF1,
        32,
        chat = true,
        first = false
    ),
    t!(
        "musique",
        MultiDocQa,
        En,
        QaF1,
        32,
        chat = true,
        first = false
    ),
    t!(
        "dureader",
        MultiDocQa,
        Zh,
        RougeLZh,
        128,
        chat = true,
        first = false
    ),
    t!(
        "gov_report",
        Summarization,
        En,
        RougeL,
        512,
        chat = true,
        first = false
    ),
    t!(
        "qmsum",
        Summarization,
        En,
        RougeL,
        512,
        chat = true,
        first = false
    ),
    t!(
        "multi_news",
        Summarization,
        En,
        RougeL,
        512,
        chat = true,
        first = false
    ),
    t!(
        "vcsum",
        Summarization,
        Zh,
        RougeLZh,
        512,
        chat = true,
        first = false
    ),
    t!(
        "trec",
        FewShot,
        En,
        Classification,
        64,
        chat = false,
        first = true
    ),
    t!(
        "triviaqa",
        FewShot,
        En,
        QaF1,
        32,
        chat = false,
        first = true
    ),
    t!(
        "samsum",
        FewShot,
        En,
        RougeL,
        128,
        chat = false,
        first = true
    ),
    t!(
        "lsht",
        FewShot,
        Zh,
        Classification,
        64,
        chat = false,
        first = true
    ),
    t!(
        "passage_count",
        Synthetic,
        En,
        Count,
        32,
        chat = true,
        first = false
    ),
    t!(
        "passage_retrieval_en",
        Synthetic,
        En,
        Retrieval,
        32,
        chat = true,
        first = false
    ),
    t!(
        "passage_retrieval_zh",
        Synthetic,
        Zh,
        RetrievalZh,
        32,
        chat = true,
        first = false
    ),
    t!("lcc", Code, Code, CodeSim, 64, chat = false, first = false),
    t!(
        "repobench-p",
        Code,
        Code,
        CodeSim,
        64,
        chat = false,
        first = false
    ),
];

/// The 13 base subsets that have a LongBench-E variant, in LongBench-E order.
pub const LONGBENCH_E_BASES: [&str; 13] = [
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
];

const E_NAMES: [&str; 13] = [
    "qasper_e",
    "multifieldqa_en_e",
    "hotpotqa_e",
    "2wikimqa_e",
    "gov_report_e",
    "multi_news_e",
    "trec_e",
    "triviaqa_e",
    "samsum_e",
    "passage_count_e",
    "passage_retrieval_en_e",
    "lcc_e",
    "repobench-p_e",
];

/// The 13 LongBench-E subsets (`<base>_e`), in LongBench-E order.
pub fn longbench_e() -> &'static [Task] {
    static E: OnceLock<Vec<Task>> = OnceLock::new();
    E.get_or_init(|| {
        LONGBENCH_E_BASES
            .iter()
            .zip(E_NAMES)
            .filter_map(|(base, name)| {
                LONGBENCH.iter().find(|t| t.name == *base).map(|t| Task {
                    name,
                    longbench_e: true,
                    ..*t
                })
            })
            .collect()
    })
}

/// All 34 tasks: the 21 subsets, then the 13 `_e` subsets.
pub fn all_tasks() -> impl Iterator<Item = &'static Task> {
    LONGBENCH.iter().chain(longbench_e().iter())
}

/// The 16 English subsets (the 21 minus the 5 Chinese ones): the set most KV-cache papers report.
pub fn en16() -> impl Iterator<Item = &'static Task> {
    LONGBENCH.iter().filter(|t| t.is_english())
}

/// Look a task up by name (`"hotpotqa"`, `"hotpotqa_e"`, or a RULER subset
/// `"ruler_niah_single_1_4096"`). The error lists every valid name.
pub fn task(name: &str) -> Result<&'static Task, TaskError> {
    if let Some(t) = ruler_task(name) {
        return Ok(t);
    }
    all_tasks()
        .find(|t| t.name == name)
        .ok_or_else(|| TaskError::UnknownTask {
            name: name.to_string(),
            valid: all_tasks().map(|t| t.name).collect::<Vec<_>>().join(", "),
        })
}

/// The task of a RULER subset (`ruler_<task>_<length>`): made on first use and kept for the
/// process (one small leaked struct per subset name), so RULER subsets flow through the same
/// `&'static Task` code paths as LongBench's.
pub fn ruler_task(name: &str) -> Option<&'static Task> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static MADE: OnceLock<Mutex<HashMap<String, &'static Task>>> = OnceLock::new();
    let (rt, _length) = crate::data::ruler::parse_subset(name)?;
    let mut made = MADE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = made.get(name) {
        return Some(t);
    }
    let t: &'static Task = Box::leak(Box::new(Task {
        name: Box::leak(name.to_string().into_boxed_str()),
        base: rt.base,
        category: Category::SyntheticRuler,
        language: Language::En,
        metric: rt.metric,
        max_new_tokens: rt.max_new_tokens,
        chat_template: true,
        first_line_only: false,
        longbench_e: false,
    }));
    made.insert(name.to_string(), t);
    Some(t)
}

/// The 21-subset tasks of one category (Chinese subsets included), in table order.
pub fn tasks_in_category(category: Category) -> impl Iterator<Item = &'static Task> {
    LONGBENCH.iter().filter(move |t| t.category == category)
}

/// Resolve a task-set spec: `all` (21), `en16`, `e` / `longbench-e` (13 `_e`), a category name,
/// or a comma-separated list of task names (each checked).
pub fn task_set(spec: &str) -> Result<Vec<&'static Task>, TaskError> {
    match spec.trim() {
        "all" => return Ok(LONGBENCH.iter().collect()),
        "en16" => return Ok(en16().collect()),
        "e" | "longbench-e" | "longbench_e" => return Ok(longbench_e().iter().collect()),
        _ => {}
    }
    if let Ok(cat) = Category::parse(spec) {
        return Ok(tasks_in_category(cat).collect());
    }
    if spec.trim().is_empty() {
        return Err(TaskError::UnknownSet {
            name: spec.to_string(),
        });
    }
    spec.split(',').map(|n| task(n.trim())).collect()
}

fn prompts() -> &'static BTreeMap<String, String> {
    static P: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    // The embedded file is fixed at compile time and unit-tested to parse, so an empty map here
    // could only come from a corrupted build; prompt_template then returns "".
    P.get_or_init(|| serde_json::from_str(DATASET2PROMPT_JSON).unwrap_or_default())
}

/// `dataset2maxlen.json` as shipped (for checks and for callers that want the raw config).
pub fn dataset2maxlen() -> BTreeMap<String, usize> {
    serde_json::from_str(DATASET2MAXLEN_JSON).unwrap_or_default()
}

/// Python `str.format(**fields)` for templates that use only named fields: `{name}` is replaced,
/// `{{` and `}}` become single braces. Returns the name of an unknown field as the error.
/// Where a template's question part starts ([`Task::build_prompt_parts`]): after `{context}`
/// and the newlines that follow it, or at the start of the line holding the `{input}` after
/// the context, whichever is later.
fn question_start(template: &str) -> usize {
    let ctx_end = template
        .find("{context}")
        .map_or(0, |i| i + "{context}".len());
    let after = &template[ctx_end..];
    let start = ctx_end + (after.len() - after.trim_start_matches('\n').len());
    match after.find("{input}") {
        Some(j) => {
            let line = template[..ctx_end + j].rfind('\n').map_or(0, |k| k + 1);
            line.max(start)
        }
        None => start,
    }
}

fn format_template(template: &str, fields: &[(&str, &str)]) -> Result<String, String> {
    let mut out =
        String::with_capacity(template.len() + fields.iter().map(|f| f.1.len()).sum::<usize>());
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if let Some(stripped) = tail.strip_prefix('{') {
            let end = stripped.find('}').ok_or_else(|| stripped.to_string())?;
            let name = &stripped[..end];
            let value = fields
                .iter()
                .find(|(k, _)| *k == name)
                .ok_or_else(|| name.to_string())?;
            out.push_str(value.1);
            rest = &stripped[end + 1..];
        } else {
            return Err("}".to_string());
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_maxlen_json_and_has_every_prompt() {
        let maxlen = dataset2maxlen();
        assert_eq!(maxlen.len(), 21);
        for t in all_tasks() {
            assert_eq!(maxlen.get(t.base), Some(&t.max_new_tokens), "{}", t.name);
            assert!(!t.prompt_template().is_empty(), "{}", t.name);
        }
        assert_eq!(prompts().len(), 21);
        assert_eq!(all_tasks().count(), 34);
        assert_eq!(en16().count(), 16);
        assert_eq!(longbench_e().len(), 13);
    }

    #[test]
    fn chat_template_exclusions_are_the_six() {
        let no_chat: Vec<_> = LONGBENCH
            .iter()
            .filter(|t| !t.chat_template)
            .map(|t| t.name)
            .collect();
        assert_eq!(
            no_chat,
            ["trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"]
        );
    }

    #[test]
    fn prompt_fill_is_python_format() {
        let t = task("repobench-p").unwrap();
        let p = t.build_prompt("CTX{x}", "IN").unwrap();
        assert_eq!(
            p,
            "Please complete the code given below. \nCTX{x}INNext line of code:\n"
        );
        let t = task("passage_count_e").unwrap();
        assert!(t
            .build_prompt("c", "i")
            .unwrap()
            .ends_with("The final answer is: "));
        assert_eq!(
            format_template("a{{b}}{c}", &[("c", "C")]).unwrap(),
            "a{b}C"
        );
        assert_eq!(format_template("{nope}", &[]).unwrap_err(), "nope");
    }

    /// The question part of every subset is kvpress's `question_template` + `answer_prefix`
    /// (its LongBench dataset script), the context part never holds the question, and the two
    /// parts are the whole prompt.
    #[test]
    fn prompt_parts_split_at_the_question_as_kvpress() {
        let q = "QQ";
        let expect = [
            ("narrativeqa", "Question: QQ\n\nAnswer:"),
            ("qasper", "Question: QQ\n\nAnswer:"),
            ("multifieldqa_en", "Question: QQ\nAnswer:"),
            ("multifieldqa_zh", "问题：QQ\n回答："),
            ("hotpotqa", "Question: QQ\nAnswer:"),
            ("dureader", "问题：QQ\n回答："),
            ("gov_report", "Now, write a one-page summary of the report.\n\nSummary:"),
            ("qmsum", "Query: QQ\nAnswer:"),
            ("multi_news", "Now, write a one-page summary of all the news.\n\nSummary:"),
            ("vcsum", "会议总结："),
            ("trec", "QQ"),
            ("triviaqa", "QQ"),
            ("samsum", "QQ"),
            ("lsht", "QQ"),
            ("passage_count", "Please enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "),
            ("passage_retrieval_en", "QQ\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: "),
            ("lcc", "Next line of code:\n"),
            ("repobench-p", "QQNext line of code:\n"),
        ];
        for (name, question) in expect {
            let (c, qp) = task(name).unwrap().build_prompt_parts("CTX", q).unwrap();
            assert_eq!(qp, question, "{name}");
            assert!(c.contains("CTX") && !c.contains(q), "{name}: {c}");
        }
        for t in all_tasks() {
            let (c, qp) = t.build_prompt_parts("CTX\n", q).unwrap();
            assert_eq!(c + &qp, t.build_prompt("CTX\n", q).unwrap(), "{}", t.name);
        }
    }

    #[test]
    fn lookups_fail_with_the_valid_names() {
        let e = task("hotpot").unwrap_err().to_string();
        assert!(e.contains("hotpotqa") && e.contains("repobench-p_e"), "{e}");
        assert_eq!(Category::parse("few-shot").unwrap(), Category::FewShot);
        assert_eq!(
            Category::parse("Single-Doc QA").unwrap(),
            Category::SingleDocQa
        );
        assert!(Category::parse("nope").is_err());
        assert_eq!(task_set("Code").unwrap().len(), 2);
        assert_eq!(task_set("hotpotqa, trec_e").unwrap().len(), 2);
        assert!(task_set("hotpotqa,bogus").is_err());
        assert_eq!(tasks_in_category(Category::MultiDocQa).count(), 4);
    }
}
