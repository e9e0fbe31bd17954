//! `kvc conformance`: replay a transformers reference file (prompt ids, first-step logits,
//! greedy outputs) on any device and dtype and print the agreement per record and in total.
//! The strict f32 CPU version of this check is `tests/conformance_smollm2.rs`.
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

use super::model_args::ModelArgs;
use crate::eval::conformance::{self, CacheChoice, CheckOptions, OutputAgreement, RecordCheck};
use crate::util::Status;

#[derive(Args, Debug)]
#[command(
    after_help = "Examples (the committed SmolLM2 reference):\n  kvc conformance                                   # f32 on the CPU: must agree exactly\n  kvc conformance --device cuda:0 --dtype bf16      # agreement rate in bf16"
)]
pub struct ConformanceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Reference generations (jsonl: name, kind, prompt_ids, output_ids, first_step_top5_*).
    #[arg(long, default_value = "tests/data/smollm2_greedy.jsonl")]
    pub reference: PathBuf,
    /// Outputs re-derived with transformers' plain greedy generate (the judge for output ids).
    #[arg(
        long,
        default_value = "tests/data/smollm2_transformers_rederived.jsonl"
    )]
    pub rederived: PathBuf,
    /// Directory holding the LongBench `<task>.jsonl` rows the reference prompts come from.
    #[arg(long, default_value = "tests/data/conformance_longbench")]
    pub longbench: PathBuf,
    /// Only records whose name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// Check prompt building only.
    #[arg(long)]
    pub prompts_only: bool,
    /// Largest |logit difference| on the recorded top-5 counted as agreement (exit 1 beyond).
    #[arg(long, default_value_t = 1e-3)]
    pub logit_tol: f32,
    /// Largest top-2 margin at which a divergence is a near-tie rather than a failure: the
    /// judge's own margin at the diverging step when its file records `top2_margins`
    /// (scripts/gpu/llama_reference.py writes them), else kvc's (teacher-forced there).
    #[arg(long, default_value_t = 1e-3)]
    pub tie_margin: f32,
    /// The cache that generates: contiguous (the reference) or paged (KV-Compress at a
    /// keep-all budget: `kvc eval`'s kernels, nothing evicted).
    #[arg(long, value_enum, default_value_t = CacheChoice::Contiguous)]
    pub cache: CacheChoice,
    /// Prefill chunk length in tokens.
    #[arg(long, default_value_t = 1024)]
    pub prefill_chunk: usize,
    /// Print one JSON object per record and a summary object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Run `kvc conformance`: the table's header (unless `--json`), one line or JSON object per
/// record as it is checked ([`print_record`]), then the totals ([`Totals`]) as a sentence and
/// the failures, or as one JSON object. `Status::Failed` when any record fails at
/// `--logit-tol`.
pub fn run(args: ConformanceArgs) -> anyhow::Result<Status> {
    let mut lm = args.model.load()?;
    let opts = CheckOptions {
        reference: args.reference.clone(),
        rederived: args.rederived.clone(),
        longbench: args.longbench.clone(),
        only: args.only.clone(),
        prompts_only: args.prompts_only,
        tie_margin: args.tie_margin,
        prefill_chunk: args.prefill_chunk,
        cache: args.cache,
        max_long_generations: None,
    };
    let json = args.json;
    let mut stdout = std::io::stdout().lock();
    if !json {
        writeln!(
            stdout,
            "{:<62} {:>6} {:>10} {:<28} {:>9}",
            "record", "prompt", "top5 diff", "output vs transformers", "recorded"
        )?;
    }
    let records = conformance::check(&mut lm, &opts, |r| print_record(r, json))?;
    let t = Totals::of(&records, args.logit_tol);
    let summary = serde_json::json!({
        "model": lm.name, "device": format!("{:?}", lm.model.device), "dtype": format!("{:?}", lm.model.dtype),
        "records": t.records, "prompts_identical": t.prompts_ok, "generated": t.generated,
        "top5_within_tol": t.top5_ok, "logit_tol": args.logit_tol,
        "outputs_identical": t.identical, "outputs_near_tie": t.ties, "outputs_match_recorded": t.recorded,
        "failures": t.failures,
    });
    if json {
        writeln!(stdout, "{summary}")?;
    } else {
        let Totals {
            records: n,
            prompts_ok,
            generated,
            identical,
            ties,
            recorded,
            top5_ok,
            ..
        } = t;
        writeln!(
            stdout,
            "\n{} on {} {}: prompts identical {prompts_ok}/{n}; top-5 logits within {:.0e}: {top5_ok}/{}; greedy outputs identical to transformers {identical}/{} (+{ties} near-ties); identical to the recorded ids {recorded}/{}",
            lm.name, summary["device"].as_str().unwrap_or(""), summary["dtype"].as_str().unwrap_or(""),
            args.logit_tol, generated, generated, generated
        )?;
        for f in &t.failures {
            writeln!(stdout, "FAIL {f}")?;
        }
    }
    Ok(if t.failures.is_empty() {
        Status::Ok
    } else {
        Status::Failed
    })
}

/// The top-2 margins at a divergence: the judge's (when recorded) and kvc's.
fn margins(kvc: f32, judge: Option<f32>) -> String {
    match judge {
        Some(j) => format!("hf {j:.1e}, kvc {kvc:.1e}"),
        None => format!("kvc {kvc:.1e}"),
    }
}

/// One checked record on stdout: a JSON object with `json`, else a table line (prompt ok or
/// DIFF, largest top-5 logit difference, output agreement with transformers, agreement with
/// the recorded ids; `-` where not checked). Write errors are ignored.
fn print_record(r: &RecordCheck, json: bool) {
    let mut o = std::io::stdout().lock();
    if json {
        let _ = writeln!(o, "{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let out = match &r.output {
        None => "-".to_string(),
        Some(OutputAgreement::Identical) => "identical".into(),
        Some(OutputAgreement::NearTie {
            step,
            margin,
            judge_margin,
        }) => format!("near-tie @{step} ({})", margins(*margin, *judge_margin)),
        Some(OutputAgreement::Diverged {
            step,
            margin,
            judge_margin,
        }) => format!("DIVERGED @{step} ({})", margins(*margin, *judge_margin)),
    };
    let _ = writeln!(
        o,
        "{:<62} {:>6} {:>10} {:<28} {:>9}",
        r.name,
        if r.prompt_mismatch.is_some() {
            "DIFF"
        } else {
            "ok"
        },
        r.top5_max_diff
            .map(|d| format!("{d:.2e}"))
            .unwrap_or("-".into()),
        out,
        r.matches_recorded
            .map(|m| if m { "same" } else { "differs" })
            .unwrap_or("-"),
    );
}

/// Counts over the checked records; all but `records` and `prompts_ok` count only records
/// that generated.
struct Totals {
    records: usize,
    prompts_ok: usize,
    generated: usize,
    /// Outputs identical to transformers', and near-ties among the rest.
    identical: usize,
    ties: usize,
    /// Outputs identical to the recorded ids.
    recorded: usize,
    /// Top-5 logits within the tolerance.
    top5_ok: usize,
    /// Every record's failures at the tolerance, in record order.
    failures: Vec<String>,
}

impl Totals {
    /// The totals of `records` with `logit_tol` as the top-5 logit tolerance.
    fn of(records: &[RecordCheck], logit_tol: f32) -> Totals {
        let prompts_ok = records
            .iter()
            .filter(|r| r.prompt_mismatch.is_none())
            .count();
        let generated: Vec<_> = records.iter().filter(|r| r.output.is_some()).collect();
        let identical = generated
            .iter()
            .filter(|r| r.output == Some(OutputAgreement::Identical))
            .count();
        let ties = generated
            .iter()
            .filter(|r| matches!(r.output, Some(OutputAgreement::NearTie { .. })))
            .count();
        let recorded = generated
            .iter()
            .filter(|r| r.matches_recorded == Some(true))
            .count();
        let top5_ok = generated
            .iter()
            .filter(|r| r.top5_max_diff.is_some_and(|d| d <= logit_tol))
            .count();
        let failures: Vec<String> = records.iter().flat_map(|r| r.failures(logit_tol)).collect();
        Totals {
            records: records.len(),
            prompts_ok,
            generated: generated.len(),
            identical,
            ties,
            recorded,
            top5_ok,
            failures,
        }
    }
}
