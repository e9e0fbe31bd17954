//! Reports from scored predictions: the tidy CSVs and tree scoring ([`scores`]), the paper's
//! figures ([`plot`]) and the nightly regression gate ([`compare`]).
pub mod compare;
pub mod heatmap;
pub mod plot;
pub mod scores;
