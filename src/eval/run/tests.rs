use super::*;
use crate::compress::{Budget, MethodSpec};
use crate::eval::record::RunMeta;

#[test]
fn sample_pool_and_the_memory_plan_at_real_shapes() {
    use crate::eval::memory::MemoryPlan;
    use crate::kvcache::blocks::MemoryLayout;
    let pool = |heads, head_dim, max_context| SamplePool {
        layout: MemoryLayout {
            block_size: 16,
            head_dim,
            dtype_bytes: 2,
        },
        heads,
        max_context,
        min_cache_tokens: 128,
        // kvcompress at rates 2..64 with the full cache last (a GPU sweep's one group).
        groups: vec![(
            32,
            [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
                .iter()
                .map(|&r| Some(Budget::Rate(r)))
                .chain([None])
                .collect(),
        )],
        scratch_tokens: 0,
    };
    // SmolLM2-135M in bf16 at 7500 + 512 tokens: the full cache (181 MiB), a transient copy
    // (170 MiB), the rates (each with room for its 512 new tokens: 240 MiB): 593 MiB.
    let smol = pool(30 * 3, 64, 8192).bytes(7500, 512);
    assert!((580 << 20..600 << 20).contains(&smol), "{smol}");
    // Llama-3.1-8B in bf16 at 127500 + 128 tokens: the full cache (15.6 GiB), the rates
    // (just under one more), one transient copy: ~47 GiB.
    let llama = pool(32 * 8, 128, 131_072).bytes(127_500, 128);
    assert!((45 << 30..48 << 30).contains(&llama), "{llama}");
    let act = |c: usize| (c as u64) << 17; // 128 KiB per prefill token
    let plan = |free: u64, per: u64| MemoryPlan::new(free, 0, (1, per), act, 8192, None);
    assert_eq!(plan(139 << 30, smol).batch, AUTO_BATCH_MAX);
    // An 80 GB card with the 8B model's 16 GB of weights loaded: one 128k sample.
    let p = plan(62 << 30, llama);
    assert_eq!(p.batch, 1);
    assert!(p.one_sample_fits(), "{}", p.describe());
    // 8 GiB less 1 GiB of activations and 1 GiB of headroom: 6 samples of 1 GiB.
    assert_eq!(plan(8 << 30, 1 << 30).batch, 6);
    assert_eq!(plan(1 << 20, 1 << 30).batch, 1);
}

fn m(n: &str) -> MethodSpec {
    MethodSpec { name: n.into() }
}

#[test]
fn plan_puts_full_first_once_and_rounds_token_budgets() {
    let (runs, notes) = plan_runs(
        &[m("full"), m("kvcompress")],
        &[1.0, 2.0, 8.0],
        &[100, 128],
        None,
    )
    .unwrap();
    let labels: Vec<_> = runs.iter().map(RunPlan::label).collect();
    assert_eq!(
        labels,
        [
            "full/rate1",
            "kvcompress/rate2",
            "kvcompress/rate8",
            "kvcompress/tokens112",
            "kvcompress/tokens128"
        ]
    );
    assert_eq!(notes.len(), 1);
    assert!(notes[0].contains("100") && notes[0].contains("112"));
    assert!(runs[0].compress_budget().is_none());
    assert_eq!(runs[1].compress_budget(), Some(Budget::Rate(2.0)));
    let e = plan_runs(&[m("kvcompress")], &[0.5], &[], None).unwrap_err();
    assert!(e.to_string().contains(">= 1"), "{e}");
    assert!(plan_runs(&[], &[f64::NAN], &[], None).is_err());
    assert!(plan_runs(&[], &[], &[0], None).is_err());
}

#[test]
fn paper_preset_pairs_fixed_budgets_and_compresses_them_once() {
    use crate::compress::{MethodOptions, Preset};
    let (runs, _) = plan_runs(
        &[m("kvcompress")],
        &[1.0, 8.0],
        &[128, 1024],
        Some(Preset::PaperLlama8b),
    )
    .unwrap();
    let labels: Vec<String> = runs.iter().map(|p| p.label()).collect();
    assert_eq!(
        labels,
        [
            "full/rate1",
            "kvcompress/rate8",
            "kvcompress/tokens128",
            "kvcompress/tokens112",
            "kvcompress/tokens1024",
            "kvcompress/tokens1008"
        ]
    );
    let base = Preset::PaperLlama8b.apply(&MethodOptions::default());
    assert_eq!((base.kvc_window, base.protected_window), (8, 8));
    for p in &runs[1..] {
        let fixed = matches!(p.budget, Budget::Tokens(_));
        assert_eq!(p.options(&base).compress_once, fixed, "{}", p.label());
    }
    // Continual and compress-once runs of a method do not share a prefill group.
    let groups: Vec<usize> = group_plans(&runs, true, false)
        .iter()
        .map(Vec::len)
        .collect();
    assert_eq!(groups, [1, 1, 4]);
    // KVC-full observes the whole prompt and compresses every run once.
    let full = Preset::PaperKvcFull.apply(&MethodOptions::default());
    assert_eq!(
        (
            full.kvc_window,
            full.kvc_buffer,
            full.max_pool,
            full.compress_once
        ),
        (crate::compress::WHOLE_PROMPT_WINDOW, 10, 0, true)
    );
    // The 70B preset keeps fixed budgets unpaired.
    let (r70, _) = plan_runs(&[m("kvcompress")], &[], &[256], Some(Preset::PaperLlama70b)).unwrap();
    assert_eq!(r70.len(), 2);
}

#[test]
fn full_joins_the_first_method_group_last_only_when_asked() {
    let (runs, _) = plan_runs(
        &[m("full"), m("kvcompress"), m("snapkv")],
        &[1.0, 2.0, 8.0],
        &[],
        None,
    )
    .unwrap();
    let labels = |share, joins| -> Vec<Vec<String>> {
        group_plans(&runs, share, joins)
            .iter()
            .map(|g| g.iter().map(|p| p.label()).collect())
            .collect()
    };
    let (f, k2, k8) = ("full/rate1", "kvcompress/rate2", "kvcompress/rate8");
    let (s2, s8) = ("snapkv/rate2", "snapkv/rate8");
    assert_eq!(
        labels(true, false),
        vec![vec![f], vec![k2, k8], vec![s2, s8]]
    );
    // `full` last: its fork takes the prompt's own cache.
    assert_eq!(labels(true, true), vec![vec![k2, k8, f], vec![s2, s8]]);
    assert_eq!(
        labels(false, true),
        vec![vec![f], vec![k2], vec![k8], vec![s2], vec![s8]]
    );
    let (only_full, _) = plan_runs(&[m("full")], &[1.0], &[], None).unwrap();
    let g = group_plans(&only_full, true, true);
    assert_eq!((g.len(), g[0][0].label()), (1, f.to_string()));
    // A question-agnostic group prefills the context alone: `full` joins the next one, or
    // none.
    let q = m("kvcompress@context-only");
    let (runs, _) = plan_runs(&[q.clone(), m("snapkv")], &[2.0], &[], None).unwrap();
    let g: Vec<Vec<String>> = group_plans(&runs, true, true)
        .iter()
        .map(|g| g.iter().map(|p| p.label()).collect())
        .collect();
    assert_eq!(g, vec![vec!["kvcompress@context-only/rate2"], vec![s2, f]]);
    let (runs, _) = plan_runs(&[q], &[2.0], &[], None).unwrap();
    assert_eq!(group_plans(&runs, true, true).len(), 2);
}

#[test]
fn torn_last_line_is_cut_and_bad_middle_line_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.jsonl");
    let good = r#"{"pred":"a","answers":["a"],"all_classes":null,"_id":"1"}"#;
    let failed = r#"{"pred":"","answers":["a"],"all_classes":null,"_id":"2","error":"oom"}"#;
    std::fs::write(&p, format!("{good}\n{failed}\n{{\"pred\":\"b\",\"ans")).unwrap();
    let ex = load_existing(&p).unwrap();
    assert_eq!(ex.done.len(), 2);
    assert_eq!(ex.n_failed, 1);
    assert!(ex.torn_bytes > 0);
    assert_eq!(
        std::fs::read_to_string(&p).unwrap(),
        format!("{good}\n{failed}\n")
    );
    std::fs::write(&p, format!("{good}\nnot json\n{good}\n")).unwrap();
    let e = load_existing(&p).unwrap_err().to_string();
    assert!(e.contains("x.jsonl:2"), "{e}");
    assert!(load_existing(&tmp.path().join("absent.jsonl"))
        .unwrap()
        .done
        .is_empty());
}

#[test]
fn config_mismatch_is_refused_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |max_input| RunConfig {
        model: "m".into(),
        model_source: "/m".into(),
        model_revision: None,
        dtype: "f32".into(),
        method: "full".into(),
        rate: Some(1.0),
        budget_tokens: None,
        method_options: serde_json::json!({}),
        max_input_tokens: max_input,
        max_new_tokens: None,
        chat: ChatMode::Auto,
        prompt: PROMPT_RECIPE.into(),
    };
    let meta = |c: RunConfig| {
        let mut m = RunMeta::default();
        m.extra.insert("config_hash".into(), c.hash().into());
        m.extra
            .insert("config".into(), serde_json::to_value(&c).unwrap());
        m
    };
    let dir = tmp.path().join("run");
    prepare_run_dir(&dir, &meta(cfg(100)), false).unwrap();
    std::fs::write(dir.join("preds/trec.jsonl"), "{}\n").unwrap();
    // Same configuration: resumes (keeps the file).
    prepare_run_dir(&dir, &meta(cfg(100)), false).unwrap();
    assert!(dir.join("preds/trec.jsonl").exists());
    let e = prepare_run_dir(&dir, &meta(cfg(200)), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("max_input_tokens: 100 -> 200") && e.contains("--overwrite"),
        "{e}"
    );
    prepare_run_dir(&dir, &meta(cfg(200)), true).unwrap();
    assert!(!dir.join("preds/trec.jsonl").exists());
}

#[test]
fn kvpress_compression_ratios_map_to_rates_and_back() {
    use super::{rate_from_ratio, ratio_from_rate};
    for (ratio, rate) in [
        (0.0, 1.0),
        (0.5, 2.0),
        (0.75, 4.0),
        (0.875, 8.0),
        (0.9, 10.0),
    ] {
        assert_eq!(rate_from_ratio(ratio).unwrap(), rate, "{ratio}");
        assert!((ratio_from_rate(rate) - ratio).abs() < 1e-15, "{rate}");
    }
    assert_eq!(rate_from_ratio(0.6).unwrap(), 2.5);
    assert_eq!(ratio_from_rate(64.0), 0.984375);
    for bad in [1.0, -0.1, 8.0, f64::NAN] {
        let e = rate_from_ratio(bad).unwrap_err().to_string();
        assert!(e.contains("[0, 1)") && e.contains("--rates"), "{e}");
    }
}
