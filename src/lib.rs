//! kvc: measure what KV-cache compression does to long-context LLM quality and speed.
//!
//! Module map (see `../shared/STYLE.md` for the reasoning):
//! - [`hub`]: resolve a model argument (local dir | `.gguf` | hub id@rev | alias) to files.
//! - [`model`]: config resolution (HF json + GGUF metadata), tokenizer, chat template, the
//!   llama-family forward pass.
//! - [`kvcache`]: the cache backends the attention layers read (contiguous reference, paged).
//! - [`compress`]: compression methods and the runner contract eval/bench use.
//! - [`engine`]: prefill -> compress -> decode loop, stopping rules.
//! - [`data`]: LongBench task table, readers, prompt building and truncation.
//! - [`eval`]: LongBench metrics (exactly as the official scorer) and scoring.
//! - [`report`]: CSV writers, plots, regression comparison.
//! - [`profile`]: the opt-in phase profile of the GPU forward (`KVC_PROFILE=1`).
//! - [`cli`]: clap argument structs and the subcommand runners.

pub mod bench;
pub mod cli;
pub mod compress;
pub mod data;
pub mod engine;
pub mod eval;
pub mod hub;
pub mod kvcache;
pub mod model;
pub mod profile;
pub mod report;
pub mod util;
