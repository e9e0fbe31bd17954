//! Reports from scored predictions: the tidy CSVs and tree scoring ([`tables`]), the paper's
//! figures ([`plot`]) and fixed-budget table ([`paper_table`]), RULER depth and per-head
//! allocation heat-maps ([`heatmap`], [`allocation`]), the nightly regression gate
//! ([`compare`]) and paired-bootstrap intervals of percent of full cache ([`bootstrap`]).
pub mod allocation;
pub mod bootstrap;
pub mod compare;
pub mod heatmap;
pub mod paper_table;
pub mod plot;
pub mod tables;
