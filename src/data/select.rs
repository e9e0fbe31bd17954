//! `--tasks`: subset names, category names and the named sets, comma-separated, in any mix.
//!
//! Sets: `en16` (the 16 English subsets KV-cache papers report; the default), `all` (the 21
//! subsets), `e` / `longbench-e` (the 13 LongBench-E subsets). Categories: `single-doc-qa`,
//! `multi-doc-qa`, `summarization`, `few-shot`, `synthetic`, `code` (any spelling
//! [`Category::parse`] takes). The result keeps first-mention order without duplicates.
use crate::data::tasks::{self, Category, Task};

/// Unknown entry in `--tasks`.
#[derive(Debug, thiserror::Error)]
#[error("unknown task `{name}` in --tasks; valid: the sets en16, all, e; the categories {categories}; the subsets {subsets}")]
pub struct UnknownTask {
    pub name: String,
    pub categories: String,
    pub subsets: String,
}

/// Resolve a `--tasks` value.
pub fn select_tasks(spec: &str) -> Result<Vec<&'static Task>, UnknownTask> {
    let mut out: Vec<&'static Task> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let found: Vec<&'static Task> = match item {
            "all" => tasks::LONGBENCH.iter().collect(),
            "en16" => tasks::en16().collect(),
            "e" | "longbench-e" | "longbench_e" => tasks::longbench_e().iter().collect(),
            _ => {
                if let Ok(t) = tasks::task(item) {
                    vec![t]
                } else if let Ok(c) = Category::parse(item) {
                    tasks::tasks_in_category(c).collect()
                } else {
                    return Err(unknown(item));
                }
            }
        };
        for t in found {
            if !out.iter().any(|o| o.name == t.name) {
                out.push(t);
            }
        }
    }
    if out.is_empty() {
        return Err(unknown(spec));
    }
    Ok(out)
}

fn unknown(name: &str) -> UnknownTask {
    UnknownTask {
        name: name.into(),
        categories: Category::ALL
            .iter()
            .map(|c| c.name().to_lowercase().replace([' ', '-'], "-"))
            .collect::<Vec<_>>()
            .join(", "),
        subsets: tasks::all_tasks()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_categories_names_mix_without_duplicates() {
        assert_eq!(select_tasks("en16").unwrap().len(), 16);
        assert_eq!(select_tasks("all").unwrap().len(), 21);
        assert_eq!(select_tasks("e").unwrap().len(), 13);
        let v = select_tasks("code, lcc, trec_e,few-shot").unwrap();
        let names: Vec<_> = v.iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "lcc",
                "repobench-p",
                "trec_e",
                "trec",
                "triviaqa",
                "samsum",
                "lsht"
            ]
        );
        let e = select_tasks("hotpotqa,nope").unwrap_err().to_string();
        assert!(
            e.contains("`nope`") && e.contains("en16") && e.contains("repobench-p_e"),
            "{e}"
        );
        assert!(select_tasks(" , ").is_err());
    }
}
