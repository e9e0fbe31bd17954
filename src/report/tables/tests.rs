//! Tests of tree scoring, the summary (category percentages, n, intervals) and the CSVs.
use super::{Budget, ScoreRow};

/// A LongBench-shaped score row of `method` at `rate` (n = 10, no percentages yet): the
/// fixture of these tests and of `report::compare`'s.
pub(crate) fn row(method: &str, rate: f64, task: &str, category: &str, score: f64) -> ScoreRow {
    ScoreRow {
        model: "m".into(),
        method: method.into(),
        budget: Budget::Rate(rate).label(),
        rate: Some(rate),
        budget_tokens: None,
        task: task.into(),
        category: category.into(),
        language: "en".into(),
        metric: "F1".into(),
        bucket: String::new(),
        n: 10,
        n_failed: 0,
        score,
        full_score: None,
        percent_of_full: None,
        cache_tokens: None,
        achieved_rate: None,
        prompt_tokens: None,
        fuzz_backend: "difflib".into(),
        compression_ratio: None,
        percent_of_full_ci_low: None,
        percent_of_full_ci_high: None,
    }
}

mod general {
    use super::super::*;

    #[test]
    fn score_runs_lists_runs_in_table_order_whatever_order_it_is_given() {
        // kvc eval on a GPU finishes `full` last (it joins the first method's group).
        let tmp = tempfile::tempdir().unwrap();
        let row = r#"{"pred":"a b","answers":["a b c"],"all_classes":null,"length":10,"_id":"x"}"#;
        let dirs: Vec<PathBuf> = ["m/kvcompress/rate8", "m/full/rate1", "m/kvcompress/rate2"]
            .iter()
            .map(|r| {
                let d = tmp.path().join(r);
                std::fs::create_dir_all(d.join("preds")).unwrap();
                std::fs::write(d.join("preds/multi_news.jsonl"), format!("{row}\n")).unwrap();
                d
            })
            .collect();
        let t = score_runs(
            tmp.path(),
            &dirs,
            false,
            OnError::Stop,
            &MetricOptions::default(),
        );
        let order: Vec<(String, String)> = t
            .rows
            .iter()
            .map(|r| (r.method.clone(), r.budget.clone()))
            .collect();
        assert_eq!(
            order,
            [
                ("full", "rate1"),
                ("kvcompress", "rate2"),
                ("kvcompress", "rate8")
            ]
            .map(|(m, b)| (m.to_string(), b.to_string()))
        );
    }

    #[test]
    fn budget_dirs() {
        assert_eq!(Budget::parse_dir("rate8"), Some(Budget::Rate(8.0)));
        assert_eq!(Budget::parse_dir("tokens512"), Some(Budget::Tokens(512)));
        assert_eq!(Budget::parse_dir("rate0.5"), None);
        assert_eq!(Budget::parse_dir("r8"), None);
        assert_eq!(Budget::Rate(8.0).label(), "rate8");
        assert_eq!(Budget::Rate(1.5).label(), "rate1.5");
    }
}

mod summary {
    use super::super::*;
    use super::row;

    #[test]
    fn percent_of_full_and_category_means() {
        let mut rows = vec![
            row("full", 1.0, "hotpotqa", "Multi-Doc QA", 40.0),
            row("full", 1.0, "musique", "Multi-Doc QA", 20.0),
            row("full", 1.0, "trec", "Few-shot Learning", 0.0),
            row("kv", 8.0, "hotpotqa", "Multi-Doc QA", 30.0),
            row("kv", 8.0, "musique", "Multi-Doc QA", 20.0),
            row("kv", 8.0, "trec", "Few-shot Learning", 5.0),
            row("kv", 8.0, "lcc", "Code", 5.0),
        ];
        let missing = fill_percent_of_full(&mut rows);
        assert_eq!(missing, ["m/lcc"]);
        assert_eq!(rows[3].percent_of_full, Some(75.0));
        assert_eq!(rows[4].percent_of_full, Some(100.0));
        // A zero full-cache score gives no percentage (division by zero), not inf.
        assert_eq!(rows[5].percent_of_full, None);
        let s = summarize(&rows);
        let get = |m: &str, c: &str| {
            s.iter()
                .find(|r| r.method == m && r.category == c)
                .unwrap()
                .clone()
        };
        // Mean of the scores over mean of the full cache's: (30 + 20) / (40 + 20), not the
        // mean of 75 % and 100 %.
        assert_eq!(
            get("kv", "Multi-Doc QA").percent_of_full,
            Some(50.0 / 60.0 * 100.0)
        );
        assert_eq!(get("kv", "Multi-Doc QA").score, 25.0);
        assert_eq!(get("kv", "Multi-Doc QA").n_tasks, 2);
        assert_eq!(get("kv", "Multi-Doc QA").n, 20);
        assert_eq!(get("kv", "Multi-Doc QA").compression_ratio, None); // rows built by hand
                                                                       // `all` has a subset without a baseline: left empty rather than averaged over fewer.
        assert_eq!(get("kv", "all").percent_of_full, None);
        assert_eq!(get("kv", "all").n_tasks, 4);
        // trec's full-cache score is 0: its own percentage is undefined, the category's is not.
        assert_eq!(get("full", "all").percent_of_full, Some(100.0));
        assert_eq!(get("kv", "Few-shot Learning").percent_of_full, None); // full mean 0
    }

    #[test]
    fn a_category_is_not_blank_because_one_subset_scored_0_with_the_full_cache() {
        // RULER: niah 100 -> 0, vt 0 -> 0. Mean of percentages is undefined (vt 0 / 0); the
        // ratio of the category means is 0 %.
        let cat = "Synthetic-RULER";
        let mut rows = vec![
            row("full", 1.0, "ruler_niah_single_1_1024", cat, 100.0),
            row("full", 1.0, "ruler_vt_1024", cat, 0.0),
            row("kv", 8.0, "ruler_niah_single_1_1024", cat, 0.0),
            row("kv", 8.0, "ruler_vt_1024", cat, 0.0),
        ];
        assert!(fill_percent_of_full(&mut rows).is_empty());
        assert_eq!(rows[3].percent_of_full, None);
        let s = summarize(&rows);
        let get = |m: &str| {
            s.iter()
                .find(|r| r.method == m && r.category == cat)
                .unwrap()
                .percent_of_full
        };
        assert_eq!(get("kv"), Some(0.0));
        assert_eq!(get("full"), Some(100.0));
        // Blank only when the full cache's category mean is 0.
        let mut rows = vec![
            row("full", 1.0, "ruler_vt_1024", cat, 0.0),
            row("kv", 8.0, "ruler_vt_1024", cat, 10.0),
        ];
        fill_percent_of_full(&mut rows);
        assert!(summarize(&rows).iter().all(|r| r.percent_of_full.is_none()));
    }

    #[test]
    fn summary_carries_n_ratio_and_a_paired_interval_by_sample_id() {
        // hotpotqa (QA F1, 0 or 1 per row): the same outputs in the full cache and kvcompress,
        // kvcompress's written in the reverse order. Paired by _id the interval is [100, 100];
        // paired by position it would not be (right rows would meet wrong ones).
        let tmp = tempfile::tempdir().unwrap();
        let line = |id: &str, pred: &str| {
            format!(r#"{{"pred":"{pred}","answers":["Paris"],"all_classes":null,"_id":"{id}"}}"#)
        };
        let write = |run: &str, lines: Vec<String>| {
            let d = tmp.path().join(run);
            std::fs::create_dir_all(d.join("preds")).unwrap();
            std::fs::write(d.join("preds/hotpotqa.jsonl"), lines.join("\n") + "\n").unwrap();
            d
        };
        let rows = [
            ("a", "Paris"),
            ("b", "Lyon"),
            ("c", "Paris"),
            ("d", "Paris"),
            ("e", "Lyon"),
            ("f", "Paris"),
            ("g", "Lyon"),
            ("h", "Paris"),
        ];
        let full = write(
            "m/full/rate1",
            rows.iter().map(|(i, p)| line(i, p)).collect(),
        );
        let kv = write(
            "m/kvcompress/rate8",
            rows.iter().rev().map(|(i, p)| line(i, p)).collect(),
        );
        let t = score_runs(
            tmp.path(),
            &[full, kv],
            false,
            OnError::Stop,
            &MetricOptions::default(),
        );
        let r = t.rows.iter().find(|r| r.method == "kvcompress").unwrap();
        assert_eq!(r.compression_ratio, Some(0.875));
        assert_eq!(r.percent_of_full, Some(100.0));
        assert_eq!(
            (r.percent_of_full_ci_low, r.percent_of_full_ci_high),
            (Some(100.0), Some(100.0))
        );
        for cat in ["Multi-Doc QA", "all"] {
            let s = t
                .summary
                .iter()
                .find(|s| s.method == "kvcompress" && s.category == cat)
                .unwrap();
            assert_eq!((s.n, s.compression_ratio), (8, Some(0.875)), "{cat}");
            assert_eq!(
                (s.percent_of_full_ci_low, s.percent_of_full_ci_high),
                (Some(100.0), Some(100.0)),
                "{cat}"
            );
        }
        let f = t.summary.iter().find(|s| s.method == "full").unwrap();
        assert_eq!(f.compression_ratio, Some(0.0));
        assert_eq!(
            (f.percent_of_full_ci_low, f.percent_of_full_ci_high),
            (Some(100.0), Some(100.0))
        );
        // The CSV: old columns first in their old order, the new ones last.
        let text = to_csv(&t.summary).unwrap();
        assert!(
            text.starts_with("model,method,budget,rate,budget_tokens,bucket,category,n_tasks,score,percent_of_full,cache_tokens,achieved_rate,compression_ratio,n,percent_of_full_ci_low,percent_of_full_ci_high\n"),
            "{text}"
        );
        let text = to_csv(&t.rows).unwrap();
        assert!(
            text.starts_with("model,method,budget,rate,budget_tokens,task,category,language,metric,bucket,n,n_failed,score,full_score,percent_of_full,cache_tokens,achieved_rate,prompt_tokens,fuzz_backend,compression_ratio,percent_of_full_ci_low,percent_of_full_ci_high\n"),
            "{text}"
        );
    }

    #[test]
    fn csvs_without_the_new_columns_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("scores.csv");
        std::fs::write(
            &p,
            std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("docs/results/baselines/nightly.csv"),
            )
            .unwrap(),
        )
        .unwrap();
        let rows: Vec<ScoreRow> = read_csv(&p).unwrap();
        assert!(rows.iter().all(|r| r.compression_ratio.is_none()));
        assert!(rows.iter().all(|r| r.percent_of_full_ci_low.is_none()));
    }
}
