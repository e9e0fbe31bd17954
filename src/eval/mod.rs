//! LongBench evaluation: the official metrics ([`metrics`]), the prediction-row schema
//! ([`record`]) and per-sample / per-subset scoring exactly as LongBench's `eval.py` ([`score`]).
pub mod conformance;
pub mod memory;
pub mod metrics;
pub mod record;
pub mod run;
pub mod scoring;
pub mod shard;
