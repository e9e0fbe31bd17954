//! Reports from scored predictions: the tidy CSVs and tree scoring ([`scores`]), the paper's
//! figures ([`plot`]), RULER depth and per-head allocation heat-maps ([`heatmap`],
//! [`allocation`]) and the nightly regression gate ([`compare`]).
pub mod allocation;
pub mod compare;
pub mod heatmap;
pub mod plot;
pub mod tables;
