//! The KV-Compress paper's quality figures from `scores.csv`, drawn with plotters to PNG and SVG:
//! - `<model>__categories_by_rate`: percent of full cache vs compression rate (log-2 axis,
//!   1x..64x), one panel per category plus `all`, one line per method (methods at equal rate);
//!   lines start at the full-cache point (1x, 100 %);
//! - `<model>__<method>__subtasks_by_rate`: one panel per category, one line per subset;
//! - `<model>__categories_by_cache`: percent of full cache vs KV cache size in tokens (log-2
//!   axis), one line per method (methods at equal cache size). x is a run's token budget, or for a
//!   rate run its mean kept tokens (`cache_tokens` of the records) when recorded.
//!
//! Every figure is a [`Figure`] (panels of named series) drawn by [`draw_figure`]; the throughput
//! and max-batch figures of `kvc bench` are built the same way in [`throughput_figures`]. Text uses DejaVu Sans (assets/fonts, Bitstream Vera licence), embedded
//! so plots render the same on any machine.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::tables::ScoreRow;
use crate::bench::report::ThroughputRow;
use crate::data::tasks::Category;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
// Registered under the generic family name, so the SVGs ask the viewer for its own sans-serif.
const FONT_NAME: &str = "sans-serif";

/// Errors while plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("nothing to plot: {0}")]
    Empty(String),
    #[error("the embedded font could not be loaded")]
    Font,
}

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// Palette index, so one method keeps its colour across figures; `None`: position in panel.
    pub color: Option<usize>,
    /// (x, y) in data units; x > 0 (plotted on a log-2 axis).
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed without markers (a baseline).
    pub dashed: bool,
}

/// One panel of a grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    /// A line of text in the panel's upper left corner (e.g. the best speed-up).
    pub note: Option<String>,
}

/// A grid of panels sharing axes' meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub title: String,
    /// A second line naming the model and the data.
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    /// x-axis range as powers of two, e.g. (0, 6) for 1x..64x.
    pub x_log2: (i32, i32),
    /// Suffix printed after x tick values ("x" for rates, "" for tokens).
    pub x_unit: String,
    /// Draw a dashed reference line at this y (100 % of full cache).
    pub y_ref: Option<f64>,
    /// Panel corner for the legend, chosen where the lines usually are not.
    pub legend: LegendAt,
    pub panels: Vec<Panel>,
}

/// Where a panel's legend sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegendAt {
    UpperLeft,
    UpperRight,
    LowerLeft,
    LowerRight,
}

pub(crate) fn ensure_font() -> Result<(), PlotError> {
    static OK: OnceLock<bool> = OnceLock::new();
    if *OK
        .get_or_init(|| plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT).is_ok())
    {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The chart of one panel: log-2 x in data units, linear y.
type PanelChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A drawing error as the message [`draw_figure`] reports.
pub(super) fn draw_err<E: std::error::Error + Send + Sync>(x: DrawingAreaErrorKind<E>) -> String {
    x.to_string()
}

/// Rows and columns of the panel grid for `n` panels: one row up to 3, then 2, 3 or 4 columns.
fn grid_shape(n: usize) -> (usize, usize) {
    let n = n.max(1);
    let cols = if n <= 3 {
        n
    } else if n <= 4 {
        2
    } else if n <= 6 {
        3
    } else {
        4
    };
    (n.div_ceil(cols), cols)
}

/// The axes every panel of a figure shares: x from `x0` to `x1` (log 2, a 0.2 margin around
/// `Figure::x_log2`), y from 0 to `y_top`.
struct Frame {
    x0: f64,
    x1: f64,
    y_top: f64,
}

impl Frame {
    /// The x range of `fig`; y up to 8 % above the largest finite value (or the reference
    /// line), rounded up to a multiple of 10, and at least 30 above the reference line (room for
    /// the legend above the 100 % line).
    fn of(fig: &Figure) -> Frame {
        let y_max = fig
            .panels
            .iter()
            .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|pt| pt.1)))
            .filter(|y| y.is_finite())
            .fold(fig.y_ref.unwrap_or(0.0), f64::max);
        let y_top =
            (((y_max * 1.08) / 10.0).ceil() * 10.0).max(fig.y_ref.map_or(0.0, |r| r + 30.0));
        Frame {
            x0: fig.x_log2.0 as f64 - 0.2,
            x1: fig.x_log2.1 as f64 + 0.2,
            y_top,
        }
    }
}

/// Draws `fig` on `root`: the title and subtitle in a 90 px header, then the panels in a grid
/// ([`grid_shape`]) on shared axes ([`Frame`]). Errors are the drawing backend's messages.
fn draw_on<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, fig: &Figure) -> Result<(), String> {
    root.fill(&WHITE).map_err(draw_err)?;
    let (header, body) = root.split_vertically(90);
    draw_header(&header, fig)?;
    let (rows, cols) = grid_shape(fig.panels.len());
    let areas = body.split_evenly((rows, cols));
    let frame = Frame::of(fig);
    for (area, panel) in areas.iter().zip(&fig.panels) {
        draw_panel(area, fig, panel, &frame)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// The figure's title and subtitle on `header`, their fonts shrunk so long titles fit narrow
/// (one- or two-panel) figures.
fn draw_header<DB: DrawingBackend>(
    header: &DrawingArea<DB, Shift>,
    fig: &Figure,
) -> Result<(), String> {
    // DejaVu Sans averages about 0.55 em per character.
    let width = header.dim_in_pixel().0 as f64;
    let title_px =
        ((width - 40.0) / (0.56 * fig.title.chars().count().max(1) as f64)).clamp(14.0, 30.0);
    let sub_px =
        ((width - 40.0) / (0.56 * fig.subtitle.chars().count().max(1) as f64)).clamp(10.0, 20.0);
    header
        .draw(&Text::new(
            fig.title.clone(),
            (20, 12),
            (FONT_NAME, title_px).into_font(),
        ))
        .map_err(draw_err)?;
    header
        .draw(&Text::new(
            fig.subtitle.clone(),
            (20, 54),
            (FONT_NAME, sub_px).into_font().color(&RGBColor(80, 80, 80)),
        ))
        .map_err(draw_err)?;
    Ok(())
}

/// One panel on `area`: caption, mesh with the figure's axis labels, the dashed reference line,
/// the panel's series ([`draw_series`]), its note in the upper left, and the legend in the
/// figure's corner (when the panel has series).
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    panel: &Panel,
    frame: &Frame,
) -> Result<(), String> {
    let Frame { x0, x1, y_top } = *frame;
    let unit = fig.x_unit.clone();
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT_NAME, 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(62)
        .build_cartesian_2d(x0..x1, 0f64..y_top.max(10.0))
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_labels((fig.x_log2.1 - fig.x_log2.0 + 1) as usize)
        .x_label_formatter(&|v| format!("{}{}", 2f64.powf(v.round()), unit))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc(fig.x_label.as_str())
        .y_desc(fig.y_label.as_str())
        .label_style((FONT_NAME, 15))
        .axis_desc_style((FONT_NAME, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    if let Some(yr) = fig.y_ref {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, yr), (x1, yr)],
                6,
                4,
                RGBColor(120, 120, 120).stroke_width(1),
            ))
            .map_err(draw_err)?;
    }
    draw_series(&mut chart, panel)?;
    if let Some(note) = &panel.note {
        let top = y_top.max(10.0);
        chart
            .draw_series(std::iter::once(Text::new(
                note.clone(),
                (x0 + 0.08 * (x1 - x0), top * 0.96),
                (FONT_NAME, 16).into_font(),
            )))
            .map_err(draw_err)?;
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .position(match fig.legend {
                LegendAt::UpperLeft => SeriesLabelPosition::UpperLeft,
                LegendAt::UpperRight => SeriesLabelPosition::UpperRight,
                LegendAt::LowerLeft => SeriesLabelPosition::LowerLeft,
                LegendAt::LowerRight => SeriesLabelPosition::LowerRight,
            })
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font((FONT_NAME, 14))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Each series of `panel` with its legend entry, x taken to log 2 (points with x <= 0 or a
/// non-finite y are skipped): dashed without markers when `dashed`, else a line with circles.
/// Colours come from the series' palette index, else its position in the panel.
fn draw_series<DB: DrawingBackend>(
    chart: &mut PanelChart<'_, DB>,
    panel: &Panel,
) -> Result<(), String> {
    for (i, s) in panel.series.iter().enumerate() {
        let color = COLORS[s.color.unwrap_or(i) % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| *x > 0.0 && y.is_finite())
            .map(|(x, y)| (x.log2(), *y))
            .collect();
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, 8, 5, color.stroke_width(2)))
                .map_err(draw_err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(2))
                });
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Draw `fig` to `<stem>.png` and `<stem>.svg`; returns the two paths.
pub fn draw_figure(fig: &Figure, stem: &Path) -> Result<Vec<PathBuf>, PlotError> {
    ensure_font()?;
    if fig.panels.iter().all(|p| p.series.is_empty()) {
        return Err(PlotError::Empty(fig.title.clone()));
    }
    let (rows, cols) = grid_shape(fig.panels.len());
    // At least 760 px wide, so one-panel figures keep a readable title and subtitle.
    let size = (((cols as u32) * 480).max(760), 90 + (rows as u32) * 400);
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).map_err(|err| PlotError::Draw {
            path: dir.to_path_buf(),
            message: err.to_string(),
        })?;
    }
    let png = with_suffix(stem, ".png");
    let svg = with_suffix(stem, ".svg");
    // Draw to temp names and rename, so a reader never sees a half-written image.
    let tmp_png = with_suffix(stem, ".tmp.png");
    let tmp_svg = with_suffix(stem, ".tmp.svg");
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |message: String| PlotError::Draw { path, message }
    };
    draw_on(BitMapBackend::new(&tmp_png, size).into_drawing_area(), fig).map_err(err(&png))?;
    draw_on(SVGBackend::new(&tmp_svg, size).into_drawing_area(), fig).map_err(err(&svg))?;
    for (t, p) in [(&tmp_png, &png), (&tmp_svg, &svg)] {
        std::fs::rename(t, p).map_err(|e| PlotError::Draw {
            path: p.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(vec![png, svg])
}

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

/// The powers of two around positive `xs`: floor of the smallest's log 2, ceil of the
/// largest's, at least one apart.
fn log2_range(xs: &[f64]) -> (i32, i32) {
    let lo = xs
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log2()
        .floor() as i32;
    let hi = xs.iter().copied().fold(0.0, f64::max).log2().ceil() as i32;
    (lo, hi.max(lo + 1))
}

/// Bench rows as a (rate, input length) grid; a value of a row is read by a getter `f`.
struct BenchGrid<'a> {
    rows: &'a [ThroughputRow],
    /// Distinct input lengths, ascending.
    lens: BTreeSet<usize>,
    /// Distinct rates, ascending.
    rates: Vec<f64>,
}

impl<'a> BenchGrid<'a> {
    /// The grid of `rows`: their distinct input lengths and rates.
    fn new(rows: &'a [ThroughputRow]) -> Self {
        let lens: BTreeSet<usize> = rows.iter().map(|r| r.input_len).collect();
        let mut rates: Vec<f64> = rows.iter().map(|r| r.rate).collect();
        rates.sort_by(f64::total_cmp);
        rates.dedup();
        BenchGrid { rows, lens, rates }
    }

    /// `f` of the first row at (`rate`, `len`), if any.
    fn value(&self, rate: f64, len: usize, f: &dyn Fn(&ThroughputRow) -> f64) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.rate == rate && r.input_len == len)
            .map(f)
    }

    /// Throughput vs rate, one panel per input length: the kvcompress line, and when the
    /// length has a positive rate-1 throughput, that baseline dashed across the rates and the
    /// best speed-up over it as the panel's note.
    fn throughput_panels(&self) -> Vec<Panel> {
        let tps = |r: &ThroughputRow| r.tokens_per_s;
        let rates = &self.rates;
        self.lens
            .iter()
            .map(|&len| {
                let points: Vec<(f64, f64)> = rates
                    .iter()
                    .filter_map(|&rt| Some((rt, self.value(rt, len, &tps)?)))
                    .collect();
                let base = self.value(1.0, len, &tps);
                let mut series = vec![Series {
                    name: "kvcompress".into(),
                    color: Some(0),
                    points: points.clone(),
                    dashed: false,
                }];
                let mut note = None;
                if let Some(b) = base.filter(|b| *b > 0.0) {
                    let (lo, hi) = (rates[0], *rates.last().expect("non-empty"));
                    series.push(Series {
                        name: "full cache (1x)".into(),
                        color: Some(7),
                        points: vec![(lo, b), (hi, b)],
                        dashed: true,
                    });
                    if let Some((rt, y)) = points.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))
                    {
                        note = Some(format!("best: {:.2}x full cache at {rt}x", y / b));
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
        self.rates
            .iter()
            .enumerate()
            .map(|(i, &rt)| Series {
                name: if rt <= 1.0 {
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
            })
            .collect()
    }
}

/// `1.50 GiB`, `53.4 MiB`.
fn human_bytes(b: u64) -> String {
    let gib = b as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// `stem` + `suffix` as a path. Not `Path::with_extension`: stems carry model names with dots
/// (`SmolLM2-135M-Instruct.Q4_1__categories_by_rate`), whose "extension" it would replace.
fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut name = stem.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn category_panels() -> Vec<String> {
    Category::ALL
        .iter()
        .map(|c| c.name().to_string())
        .chain(["all".to_string()])
        .collect()
}

/// Start a percent-of-full vs rate line at (1x, 100 %) when it has no rate-1 point.
fn anchor_at_full(points: &mut Vec<(f64, f64)>) {
    if !points.iter().any(|p| p.0 == 1.0) {
        points.insert(0, (1.0, 100.0));
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The paper's quality figures for every model of `rows` (LongBench subsets only; LongBench-E
/// bucket rows are left out, and so are subsets whose full-cache score is 0: no percentage of
/// it exists — the figure's subtitle counts them). `data_note` names the data on the figure
/// (e.g. the CSV path).
pub fn quality_figures(
    rows: &[ScoreRow],
    data_note: &str,
) -> Result<Vec<(String, Figure)>, PlotError> {
    let zero_full: BTreeSet<(&str, &str)> = rows
        .iter()
        .filter(|r| r.full_score == Some(0.0))
        .map(|r| (r.model.as_str(), r.task.as_str()))
        .collect();
    let rows: Vec<&ScoreRow> = rows
        .iter()
        .filter(|r| r.bucket.is_empty())
        .filter(|r| !zero_full.contains(&(r.model.as_str(), r.task.as_str())))
        .collect();
    let missing: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.percent_of_full.is_none())
        .map(|r| format!("{}/{}", r.model, r.task))
        .collect();
    if !missing.is_empty() {
        return Err(PlotError::Empty(format!(
            "percent of full cache is missing for {} (score a tree that has a `full/rate1` run for each model)",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let models: BTreeSet<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    let mut figs = Vec::new();
    for model in models {
        let n_zero = zero_full.iter().filter(|(m, _)| *m == model).count();
        let mr = ModelRows::new(model, &rows, n_zero, data_note);
        figs.extend(mr.by_rate_figure());
        figs.extend(mr.by_cache_figure());
        for method in mr.methods.iter().filter(|m| **m != "full") {
            figs.extend(mr.subtasks_figure(method));
        }
    }
    if figs.is_empty() {
        return Err(PlotError::Empty(
            "no rows with a rate or a cache size".into(),
        ));
    }
    Ok(figs)
}

/// One model's plotted rows and what its quality figures share.
struct ModelRows<'a> {
    model: &'a str,
    rows: Vec<&'a ScoreRow>,
    /// The model's methods, by name; a method's colour is its position here.
    methods: BTreeSet<&'a str>,
    /// "LongBench score", or "score" when every subset is a RULER one.
    bench: &'static str,
    /// Model, data (subsets counted, `n_zero` left out) and the data note.
    subtitle: String,
}

impl<'a> ModelRows<'a> {
    /// `model`'s rows of `rows`; `n_zero` of its subsets were left out for a full-cache score
    /// of 0.
    fn new(model: &'a str, rows: &[&'a ScoreRow], n_zero: usize, data_note: &str) -> Self {
        let mrows: Vec<&ScoreRow> = rows.iter().copied().filter(|r| r.model == model).collect();
        let n_tasks = mrows
            .iter()
            .map(|r| r.task.as_str())
            .collect::<BTreeSet<_>>()
            .len();
        let n_ruler = mrows
            .iter()
            .map(|r| r.task.as_str())
            .filter(|t| t.starts_with("ruler_"))
            .collect::<BTreeSet<_>>()
            .len();
        let data = match (n_tasks - n_ruler, n_ruler) {
            (_, 0) => format!("LongBench v1, {n_tasks} subsets"),
            (0, n) => format!("RULER-style synthetic suite, {n} task x length subsets"),
            (lb, n) => format!("LongBench v1, {lb} subsets + RULER-style, {n} subsets"),
        };
        let bench = if n_ruler == n_tasks {
            "score"
        } else {
            "LongBench score"
        };
        let zero_note = if n_zero > 0 {
            format!(" (+{n_zero} left out: full-cache score 0)")
        } else {
            String::new()
        };
        let subtitle =
            format!("model: {model}  |  data: {data}{zero_note}  |  source: {data_note}");
        let methods: BTreeSet<&str> = mrows.iter().map(|r| r.method.as_str()).collect();
        ModelRows {
            model,
            rows: mrows,
            methods,
            bench,
            subtitle,
        }
    }

    /// One panel per category (and `all`) with a line per method: the mean percentage of its
    /// subsets at each x that `xof` gives (rows without an x are skipped), sorted by x.
    /// Methods and panels without points are left out.
    fn category_series(&self, xof: &dyn Fn(&ScoreRow) -> Option<f64>) -> Vec<Panel> {
        category_panels()
            .into_iter()
            .map(|cat| {
                let series = self
                    .methods
                    .iter()
                    .filter_map(|m| {
                        let mut by_x: BTreeMap<u64, (f64, Vec<f64>)> = BTreeMap::new();
                        for r in self
                            .rows
                            .iter()
                            .filter(|r| r.method == *m && (cat == "all" || r.category == cat))
                        {
                            if let (Some(x), Some(p)) = (xof(r), r.percent_of_full) {
                                by_x.entry(x.to_bits()).or_insert((x, Vec::new())).1.push(p);
                            }
                        }
                        let mut points: Vec<(f64, f64)> =
                            by_x.into_values().map(|(x, ps)| (x, mean(&ps))).collect();
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let color = self.methods.iter().position(|x| x == m);
                        (!points.is_empty()).then(|| Series {
                            name: m.to_string(),
                            color,
                            points,
                            dashed: false,
                        })
                    })
                    .collect();
                Panel {
                    title: cat.clone(),
                    series,
                    note: None,
                }
            })
            .filter(|p: &Panel| !p.series.is_empty())
            .collect()
    }

    /// `categories_by_rate`, methods at equal rate: every method starts at the full-cache
    /// point (1x, 100 %), which is what rate 1 means (kvc's invariant: rate 1 ==
    /// uncompressed); `full` itself is that point and is not drawn as a separate line. `None`
    /// when no method has a rate.
    fn by_rate_figure(&self) -> Option<(String, Figure)> {
        let by_rate: Vec<Panel> = self
            .category_series(&|r: &ScoreRow| r.rate)
            .into_iter()
            .map(|mut p| {
                p.series.retain(|s| s.name != "full");
                for s in &mut p.series {
                    anchor_at_full(&mut s.points);
                }
                p
            })
            .filter(|p| !p.series.is_empty())
            .collect();
        if by_rate.is_empty() {
            return None;
        }
        Some((
            format!("{}__categories_by_rate", safe(self.model)),
            Figure {
                title: format!(
                    "Percent of full-cache {} vs compression rate (methods at equal rate)",
                    self.bench
                ),
                subtitle: self.subtitle.clone(),
                x_label: "compression rate (log2)".into(),
                y_label: "% of full-cache score".into(),
                x_log2: (0, 6),
                x_unit: "x".into(),
                y_ref: Some(100.0),
                // Curves start at 100 % at 1x and fall with the rate (sometimes to 0 at
                // high rates): the lower left is the corner they leave empty.
                legend: LegendAt::LowerLeft,
                panels: by_rate,
            },
        ))
    }

    /// `categories_by_cache`, methods at equal cache size: x is a run's token budget, else its
    /// mean kept tokens; the axis spans every such x. `None` when no row has one.
    fn by_cache_figure(&self) -> Option<(String, Figure)> {
        let cache_x = |r: &ScoreRow| {
            r.budget_tokens
                .map(|t| t as f64)
                .or(r.cache_tokens)
                .filter(|x| *x > 0.0)
        };
        let by_cache = self.category_series(&cache_x);
        if by_cache.is_empty() {
            return None;
        }
        let xs: Vec<f64> = self.rows.iter().filter_map(|r| cache_x(r)).collect();
        Some((
            format!("{}__categories_by_cache", safe(self.model)),
            Figure {
                title: format!(
                    "Percent of full-cache {} vs KV cache size (methods at equal cache size)",
                    self.bench
                ),
                subtitle: self.subtitle.clone(),
                x_label: "KV cache tokens per sequence (log2)".into(),
                y_label: "% of full-cache score".into(),
                x_log2: log2_range(&xs),
                x_unit: String::new(),
                y_ref: Some(100.0),
                // LongBench curves rarely fall below half of full at any cache size.
                legend: LegendAt::LowerLeft,
                panels: by_cache,
            },
        ))
    }

    /// `<method>__subtasks_by_rate`: one panel per category, one line per subset that has a
    /// rate run of `method` (task table order, then any others by name), each anchored at
    /// (1x, 100 %). `None` when `method` has no rate run.
    fn subtasks_figure(&self, method: &str) -> Option<(String, Figure)> {
        let panels: Vec<Panel> = Category::ALL
            .iter()
            .map(|c| {
                let present: BTreeSet<&str> = self
                    .rows
                    .iter()
                    .filter(|r| r.category == c.name() && r.method == method && r.rate.is_some())
                    .map(|r| r.task.as_str())
                    .collect();
                // Task table order (as LongBench lists them), then any others by name.
                let mut tasks: Vec<&str> = crate::data::tasks::all_tasks()
                    .map(|t| t.name)
                    .filter(|t| present.contains(t))
                    .collect();
                let known: BTreeSet<&str> = tasks.iter().copied().collect();
                tasks.extend(present.iter().copied().filter(|t| !known.contains(t)));
                let series = tasks
                    .into_iter()
                    .map(|t| {
                        let mut points: Vec<(f64, f64)> = self
                            .rows
                            .iter()
                            .filter(|r| r.method == method && r.task == t)
                            .filter_map(|r| Some((r.rate?, r.percent_of_full?)))
                            .collect();
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        anchor_at_full(&mut points);
                        Series {
                            name: t.to_string(),
                            color: None,
                            points,
                            dashed: false,
                        }
                    })
                    .collect();
                Panel {
                    title: c.name().to_string(),
                    series,
                    note: None,
                }
            })
            .filter(|p: &Panel| !p.series.is_empty())
            .collect();
        if panels.is_empty() {
            return None;
        }
        Some((
            format!("{}__{}__subtasks_by_rate", safe(self.model), safe(method)),
            Figure {
                title: format!(
                    "{method}: percent of full-cache score per subset vs compression rate"
                ),
                subtitle: self.subtitle.clone(),
                x_label: "compression rate (log2)".into(),
                y_label: "% of full-cache score".into(),
                x_log2: (0, 6),
                x_unit: "x".into(),
                y_ref: Some(100.0),
                legend: LegendAt::LowerLeft,
                panels,
            },
        ))
    }
}
