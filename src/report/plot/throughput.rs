//! The figures of `kvc bench`: throughput and max batch by rate and input length.
use std::collections::BTreeSet;

use super::*;
use crate::bench::report::ThroughputRow;

/// The throughput figures of `kvc bench` rows (one model), as `(file stem, figure)`:
/// - `throughput_vs_rate`: total tokens/s vs compression rate, one panel per input length, the
///   full-cache (rate 1) throughput dashed, the best speed-up written in the panel;
/// - `throughput_vs_input_len`: total tokens/s vs input length, one line per rate;
/// - `max_batch_vs_rate`, `max_batch_vs_input_len`: the largest decode batch reached.
pub fn throughput_figures(
    rows: &[ThroughputRow],
    data_note: &str,
) -> Result<Vec<(String, Figure)>, PlotError> {
    if rows.is_empty() {
        return Err(PlotError::Empty("no throughput rows".into()));
    }
    let model = rows[0].model.clone();
    let grid = BenchGrid::new(rows);
    let subtitle = throughput_subtitle(rows, data_note);
    let rate_range = log2_range(&grid.rates);
    let len_f: Vec<f64> = grid.lens.iter().map(|&l| l as f64).collect();
    let len_range = log2_range(&len_f);
    let tps = |r: &ThroughputRow| r.tokens_per_s;
    let batch = |r: &ThroughputRow| r.max_batch as f64;
    let one = |title: &str, series: Vec<Series>| {
        vec![Panel {
            title: title.into(),
            series,
            note: None,
        }]
    };
    Ok(vec![
        (
            format!("{}__throughput_vs_rate", safe(&model)),
            Figure {
                title: "Total throughput (prompt + output tokens/s) vs compression rate".into(),
                subtitle: subtitle.clone(),
                x_label: "compression rate (log2)".into(),
                y_label: "tokens/s".into(),
                x_log2: rate_range,
                x_unit: "x".into(),
                y_ref: None,
                legend: LegendAt::LowerRight,
                panels: grid.throughput_panels(),
            },
        ),
        (
            format!("{}__throughput_vs_input_len", safe(&model)),
            Figure {
                title: "Total throughput vs input length, one line per compression rate".into(),
                subtitle: subtitle.clone(),
                x_label: "input tokens (log2)".into(),
                y_label: "tokens/s".into(),
                x_log2: len_range,
                x_unit: String::new(),
                y_ref: None,
                legend: LegendAt::UpperRight,
                panels: one("all rates", grid.by_len(&tps)),
            },
        ),
        (
            format!("{}__max_batch_vs_rate", safe(&model)),
            Figure {
                title: "Largest concurrent decode batch vs compression rate".into(),
                subtitle: subtitle.clone(),
                x_label: "compression rate (log2)".into(),
                y_label: "max decode batch".into(),
                x_log2: rate_range,
                x_unit: "x".into(),
                y_ref: None,
                legend: LegendAt::UpperLeft,
                panels: one("all input lengths", grid.by_rate(&batch)),
            },
        ),
        (
            format!("{}__max_batch_vs_input_len", safe(&model)),
            Figure {
                title: "Largest concurrent decode batch vs input length".into(),
                subtitle,
                x_label: "input tokens (log2)".into(),
                y_label: "max decode batch".into(),
                x_log2: len_range,
                x_unit: String::new(),
                y_ref: None,
                legend: LegendAt::UpperRight,
                panels: one("all rates", grid.by_len(&batch)),
            },
        ),
    ])
}

/// The subtitle of every throughput figure, from the first row's setup: model, device, dtype,
/// prompts x output tokens, the pool's size, whether any row was memory-bound, `data_note`.
fn throughput_subtitle(rows: &[ThroughputRow], data_note: &str) -> String {
    let r = &rows[0];
    let bound = rows.iter().any(|r| r.memory_bound);
    format!(
        "{} ({}, {})  |  {} prompts x {} output tokens  |  KV pool {}{}  |  {data_note}",
        r.model,
        r.device,
        r.dtype,
        r.num_prompts,
        r.output_len,
        human_bytes(r.kv_memory_bytes),
        if bound {
            ", full cache memory-bound"
        } else {
            ""
        }
    )
}

/// Bench rows as a (rate, input length) grid per method; a value of a row is read by a getter
/// `f`. The vanilla baseline is the `full` row at rate 1; the compressed methods
/// (`kvcompress-paper`, `kvcompress`) each have their own rates.
struct BenchGrid<'a> {
    rows: &'a [ThroughputRow],
    /// Distinct input lengths, ascending.
    lens: BTreeSet<usize>,
    /// Distinct rates, ascending.
    rates: Vec<f64>,
    /// The compressed methods present, the reference's schedule first.
    methods: Vec<&'static str>,
}

/// The compressed methods' names in `throughput.csv`, in plotting order.
const COMPRESSED: [&str; 2] = ["kvcompress-paper", "kvcompress"];

impl<'a> BenchGrid<'a> {
    /// The grid of `rows`: their distinct input lengths, rates and compressed methods.
    fn new(rows: &'a [ThroughputRow]) -> Self {
        let lens: BTreeSet<usize> = rows.iter().map(|r| r.input_len).collect();
        let mut rates: Vec<f64> = rows.iter().map(|r| r.rate).collect();
        rates.sort_by(f64::total_cmp);
        rates.dedup();
        let methods = COMPRESSED
            .into_iter()
            .filter(|m| rows.iter().any(|r| r.method == *m))
            .collect();
        BenchGrid {
            rows,
            lens,
            rates,
            methods,
        }
    }

    /// `f` of the first row of `method` at (`rate`, `len`), if any.
    fn value_of(
        &self,
        method: &str,
        rate: f64,
        len: usize,
        f: &dyn Fn(&ThroughputRow) -> f64,
    ) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.method == method && r.rate == rate && r.input_len == len)
            .map(f)
    }

    /// `f` at (`rate`, `len`) of the first compressed method present (the one the batch
    /// figures show), or of the vanilla baseline at rate 1 when that method has no 1x row.
    fn value(&self, rate: f64, len: usize, f: &dyn Fn(&ThroughputRow) -> f64) -> Option<f64> {
        self.methods
            .first()
            .and_then(|m| self.value_of(m, rate, len, f))
            .or_else(|| {
                (rate <= 1.0)
                    .then(|| self.value_of("full", rate, len, f))
                    .flatten()
            })
    }

    /// Throughput vs rate, one panel per input length: one line per compressed method, and
    /// when the length has a positive vanilla throughput, that baseline dashed across the
    /// rates and the best speed-up over it as the panel's note.
    fn throughput_panels(&self) -> Vec<Panel> {
        let tps = |r: &ThroughputRow| r.tokens_per_s;
        let rates = &self.rates;
        self.lens
            .iter()
            .map(|&len| {
                let mut series = Vec::new();
                let mut best: Option<(f64, f64, &str)> = None;
                for (i, &m) in self.methods.iter().enumerate() {
                    let points: Vec<(f64, f64)> = rates
                        .iter()
                        .filter_map(|&rt| Some((rt, self.value_of(m, rt, len, &tps)?)))
                        .collect();
                    for &(rt, y) in &points {
                        if best.is_none_or(|b| y > b.1) {
                            best = Some((rt, y, m));
                        }
                    }
                    series.push(Series {
                        name: m.into(),
                        color: Some(i),
                        points,
                        dashed: false,
                        bars: Vec::new(),
                    });
                }
                let base = self.value_of("full", 1.0, len, &tps);
                let mut note = None;
                if let Some(b) = base.filter(|b| *b > 0.0) {
                    let (lo, hi) = (rates[0], *rates.last().expect("non-empty"));
                    series.push(Series {
                        name: "full cache (1x)".into(),
                        color: Some(7),
                        points: vec![(lo, b), (hi, b)],
                        dashed: true,
                        bars: Vec::new(),
                    });
                    if let Some((rt, y, m)) = best {
                        note = Some(format!("best: {:.2}x full cache at {rt}x ({m})", y / b));
                    }
                }
                Panel {
                    title: format!("input {len} tokens"),
                    series,
                    note,
                }
            })
            .collect()
    }

    /// `f` vs input length, one line per rate (rate 1 dashed, named the full cache); rates
    /// without any row are left out.
    fn by_len(&self, f: &dyn Fn(&ThroughputRow) -> f64) -> Vec<Series> {
        // The reference's schedule compresses at 1x: its 1x line is not the full cache.
        let compressed_1x = self
            .methods
            .first()
            .is_some_and(|m| self.rows.iter().any(|r| r.method == *m && r.rate <= 1.0));
        self.rates
            .iter()
            .enumerate()
            .map(|(i, &rt)| Series {
                name: if rt <= 1.0 && !compressed_1x {
                    "full cache (1x)".into()
                } else {
                    format!("{rt}x")
                },
                color: Some(i),
                points: self
                    .lens
                    .iter()
                    .filter_map(|&l| Some((l as f64, self.value(rt, l, f)?)))
                    .collect(),
                dashed: rt <= 1.0,
                bars: Vec::new(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    }

    /// `f` vs rate, one line per input length.
    fn by_rate(&self, f: &dyn Fn(&ThroughputRow) -> f64) -> Vec<Series> {
        self.lens
            .iter()
            .enumerate()
            .map(|(i, &l)| Series {
                name: format!("input {l}"),
                color: Some(i),
                points: self
                    .rates
                    .iter()
                    .filter_map(|&rt| Some((rt, self.value(rt, l, f)?)))
                    .collect(),
                dashed: false,
                bars: Vec::new(),
            })
            .collect()
    }
}
