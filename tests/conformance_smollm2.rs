//! Conformance with transformers (the judge): `tests/data/smollm2_greedy.jsonl` (a copy of
//! `../shared/reference/smollm2_greedy.jsonl`, described in `tests/data/smollm2_greedy.README.md`;
//! the LongBench rows it was made from are in `tests/data/conformance_longbench/`, byte for byte) holds
//! transformers' greedy outputs of SmolLM2-135M-Instruct (GGUF dequantized to f32). In f32 on
//! the CPU kvc must build identical prompt ids for every record (chat template and LongBench
//! middle truncation included), match the recorded first-step top-5 logits within 1e-3, and
//! produce identical greedy output ids — a divergence is accepted only at a near-tie (top-2
//! logits of kvc at that step within 1e-3), and is reported. The replay itself is
//! `kvc::eval::conformance` (also behind `kvc conformance`, used for the GPU runs).
//!
//! Finding (`docs/findings/2026-11-22-recorded-reference-outputs-are-not-plain-greedy.md`):
//! the recorded `output_ids` are not what transformers' plain greedy `generate` produces from
//! the recorded `prompt_ids`: re-running exactly that on the H100
//! (`scripts/gpu/reference_check.py`, transformers 5.17, f32, TF32 off) reproduces the recorded
//! first-step top-5 logits bit for bit but the recorded outputs for only 5 of 14 records.
//! Those re-derived outputs are committed in `tests/data/smollm2_transformers_rederived.jsonl`
//! and are the judge for output ids here; agreement with the recorded ids is reported.
//!
//! Needs the embedded model (`scripts/fetch-model.sh`; `scripts/test.sh` fetches it). Without
//! it the test fails under CI and is skipped loudly otherwise. `KVC_CONFORMANCE_ONLY=<text>`
//! restricts the records, `KVC_CONFORMANCE_PROMPTS_ONLY=1` checks prompt building only. Under
//! `CI`, only the first of the three 7500-token records generates (the others check prompts);
//! `KVC_CONFORMANCE_FULL=1` generates for all.
use std::path::PathBuf;

use kvc::eval::conformance::{check, CacheChoice, CheckOptions, OutputAgreement};
use kvc::hub::{resolve_model, HubEnv};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn smollm2_matches_transformers_greedy_f32_cpu() {
    let resolved = match resolve_model("smollm2-135m", &HubEnv::from_env()) {
        Ok(r) => r,
        Err(e) => {
            if std::env::var("CI").is_ok() {
                panic!("embedded model missing in CI: {e}");
            }
            eprintln!("\n!!!!! SKIPPED smollm2 conformance: {e} !!!!!\n");
            return;
        }
    };
    let mut lm = kvc::model::load(
        &resolved,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let opts = CheckOptions {
        reference: root().join("tests/data/smollm2_greedy.jsonl"),
        rederived: root().join("tests/data/smollm2_transformers_rederived.jsonl"),
        longbench: root().join("tests/data/conformance_longbench"),
        only: std::env::var("KVC_CONFORMANCE_ONLY").ok(),
        prompts_only: std::env::var("KVC_CONFORMANCE_PROMPTS_ONLY").is_ok_and(|v| v == "1"),
        tie_margin: 1e-3,
        prefill_chunk: 1024,
        cache: CacheChoice::Contiguous,
        // Under CI (2 cores, a 90-minute budget for everything) one 7500-token record generates
        // and the other two check their prompts only; KVC_CONFORMANCE_FULL=1 (or no CI) runs
        // all 15 (the GPU runs of `kvc conformance` always do).
        max_long_generations: (std::env::var("CI").is_ok()
            && std::env::var("KVC_CONFORMANCE_FULL").is_err())
        .then_some(1),
    };
    let records = check(&mut lm, &opts, |r| eprintln!("{r:?}")).unwrap();
    assert!(!records.is_empty(), "no reference record was checked");
    if opts.only.is_none() {
        assert_eq!(records.len(), 15, "the reference file has 15 records");
        if !opts.prompts_only {
            // 12 short records always generate; of the 3 long ones, the cap.
            let long = opts.max_long_generations.unwrap_or(3).min(3);
            let generated = records.iter().filter(|r| r.output.is_some()).count();
            assert_eq!(generated, 12 + long, "records that generated");
        }
    }
    let failures: Vec<String> = records.iter().flat_map(|r| r.failures(1e-3)).collect();
    assert!(
        failures.is_empty(),
        "conformance failures:\n{}",
        failures.join("\n")
    );
    if !opts.prompts_only {
        let identical = records
            .iter()
            .filter(|r| r.output == Some(OutputAgreement::Identical))
            .count();
        eprintln!(
            "greedy outputs identical to transformers: {identical}/{}",
            records.len()
        );
    }
}

/// The embedded SmolLM2 in f32 on the CPU.
fn smollm2_f32_cpu() -> kvc::model::LoadedModel {
    let resolved = kvc::hub::resolve_model("smollm2-135m", &kvc::hub::HubEnv::from_env())
        .expect("the embedded model: run scripts/fetch-model.sh");
    kvc::model::load(
        &resolved,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap()
}

/// Strict checks that generate the records named `only` through `cache`, judged by `rederived`.
fn generation_options(only: &str, rederived: PathBuf, cache: CacheChoice) -> CheckOptions {
    CheckOptions {
        reference: root().join("tests/data/smollm2_greedy.jsonl"),
        rederived,
        longbench: root().join("tests/data/conformance_longbench"),
        only: Some(only.into()),
        prompts_only: false,
        tie_margin: 1e-3,
        prefill_chunk: 1024,
        cache,
        max_long_generations: None,
    }
}

#[test]
fn smollm2_paged_cache_matches_transformers_chat_f32_cpu() {
    // The chat records through the paged cache at a keep-all KV-Compress budget (the path of
    // `kvc eval`'s compressed runs): the same prompts, top-5 and greedy outputs as transformers.
    let mut lm = smollm2_f32_cpu();
    let opts = generation_options(
        "chat",
        root().join("tests/data/smollm2_transformers_rederived.jsonl"),
        CacheChoice::Paged,
    );
    let records = check(&mut lm, &opts, |r| eprintln!("{r:?}")).unwrap();
    assert_eq!(records.len(), 6, "the reference file has 6 chat records");
    let failures: Vec<String> = records.iter().flat_map(|r| r.failures(1e-3)).collect();
    assert!(
        failures.is_empty(),
        "paged conformance failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_divergence_is_judged_by_the_judges_own_margin_when_recorded() {
    // chat0's judge record rewritten to take transformers' second-best first token: kvc then
    // diverges at step 0. With the judge's margin recorded as a tie the divergence is a
    // near-tie, recorded as clear it fails, and without `top2_margins` kvc's own margin there
    // (~0.43: transformers' top-2 logits 26.74 / 26.31) decides.
    let mut lm = smollm2_f32_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let judge = |margins: Option<f32>| {
        let mut r = serde_json::json!({"name": "chat0", "plain_output_ids": [7026, 2]});
        if let Some(m) = margins {
            r["top2_margins"] = serde_json::json!([m, 1.0]);
        }
        let path = tmp.path().join(format!("judge-{margins:?}.jsonl"));
        std::fs::write(&path, format!("{r}\n")).unwrap();
        path
    };
    let mut outcome = |margins: Option<f32>| {
        let opts = generation_options("chat0", judge(margins), CacheChoice::Contiguous);
        let records = check(&mut lm, &opts, |_| {}).unwrap();
        assert_eq!(records.len(), 1);
        (
            records[0].output.clone().unwrap(),
            records[0].failures(1e-3),
        )
    };
    match outcome(Some(1e-4)) {
        (
            OutputAgreement::NearTie {
                step: 0,
                margin,
                judge_margin: Some(j),
            },
            f,
        ) => {
            assert!(
                margin > 0.3 && (j - 1e-4).abs() < 1e-9 && f.is_empty(),
                "{margin} {j} {f:?}"
            )
        }
        other => panic!("a recorded tie: {other:?}"),
    }
    match outcome(Some(0.43)) {
        (
            OutputAgreement::Diverged {
                step: 0,
                judge_margin: Some(_),
                ..
            },
            f,
        ) => {
            assert!(
                f.len() == 1 && f[0].contains("the judge's 4.30e-1"),
                "{f:?}"
            )
        }
        other => panic!("a recorded clear margin: {other:?}"),
    }
    match outcome(None) {
        (
            OutputAgreement::Diverged {
                step: 0,
                margin,
                judge_margin: None,
            },
            _,
        ) => {
            assert!(margin > 0.3, "{margin}")
        }
        other => panic!("no recorded margins: {other:?}"),
    }
}
