//! kvc: measure what KV-cache compression does to long-context LLM quality and speed.
//!
//! Layers, lowest first; each module imports only the ones above it in this list (checked by
//! `tests/layers.rs`, which holds the order as code; `docs/design.md` says why):
//! - [`util`], [`profile`], [`hub`]: leaves (helpers, the opt-in phase profile of the GPU
//!   forward, model and data resolution: local dir | `.gguf` | hub id@rev | alias);
//! - [`cuda`]: kvc's CUDA kernels, one wrapper file per kernel file with its plain-Rust twins,
//!   and the pure eviction selection the twins and planners share (candle only);
//! - [`kvcache`]: block pool and tables, paged and contiguous storage, budgets;
//! - [`model`]: config, weights, tokenizer, chat template, the llama-family forward pass;
//! - [`data`]: LongBench / RULER readers, prompt building and truncation;
//! - [`engine`]: prefill -> hooks -> decode, stopping rules (hooks see `CacheBackend`);
//! - [`compress`]: the methods (scorers, allocators, evictors) and their runner;
//! - [`eval`], [`bench`]: LongBench runs and scoring, conformance; the throughput bench;
//! - [`report`]: score tables, CSVs, figures, regression comparison;
//! - [`cli`]: argument groups and the phases of each command.

pub mod bench;
pub mod cli;
pub mod compress;
pub mod cuda;
pub mod data;
pub mod engine;
pub mod eval;
pub mod hub;
pub mod kvcache;
pub mod model;
pub mod profile;
pub mod report;
pub mod util;
