//! Command-line interface: one clap `Args` struct per subcommand, each in its own file, and the
//! dispatch that maps results to exit codes (0 ok, 1 finished with failures, 2 error).
use clap::{Parser, Subcommand};

pub mod compare;
pub mod eval;
pub mod merge;
pub mod plot;
pub mod score;
use std::process::ExitCode;

use crate::util::Status;

pub mod bench;
pub mod bench_model;
pub mod conformance;
pub mod generate;
pub mod model_args;
pub mod tensor_parallel;

#[derive(Parser, Debug)]
#[command(name = "kvc", version, about = "Measure what KV-cache compression does to long-context LLM quality and speed", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Greedy continuation of one prompt (full cache).
    Generate(generate::GenerateArgs),
    /// Run LongBench through a sweep of compression methods and rates; score and plot it.
    Eval(Box<eval::EvalArgs>),
    /// Throughput benchmark of the KV-Compress paper: continuous batching over one KV budget,
    /// compression rates 1..64; writes throughput.csv and plots.
    Bench(Box<bench::BenchArgs>),
    /// Prefill and single-sequence decode speed of the model (full cache); prints a table.
    BenchModel(bench_model::BenchModelArgs),
    /// Replay a transformers reference file and report prompt / logit / output agreement.
    Conformance(conformance::ConformanceArgs),
    Score(score::ScoreArgs),
    Merge(merge::MergeArgs),
    Plot(plot::PlotArgs),
    Compare(compare::CompareArgs),
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<Status> = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(*a),
        Command::Bench(a) => bench::run(*a),
        Command::BenchModel(a) => bench_model::run(a),
        Command::Conformance(a) => conformance::run(a),
        Command::Score(a) => score::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Compare(a) => compare::run(a),
    };
    match result {
        Ok(Status::Ok) => ExitCode::SUCCESS,
        Ok(Status::Failed) => ExitCode::from(1),
        Err(e) => {
            // One line: the chain of contexts joined, inner newlines folded.
            let msg = format!("{e:#}")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
