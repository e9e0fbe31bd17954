//! The KV-Compress paper's quality figures from `scores.csv`, drawn with plotters to PNG and SVG:
//! - `<model>__categories_by_rate`: percent of full cache vs compression rate (log-2 axis,
//!   1x..64x), one panel per category plus `all`, one line per method (methods at equal rate);
//!   lines start at the full-cache point (1x, 100 %);
//! - `<model>__<method>__subtasks_by_rate`: one panel per category, one line per subset;
//! - `<model>__categories_by_cache`: percent of full cache vs KV cache size in tokens (log-2
//!   axis), one line per method (methods at equal cache size). x is a run's token budget, or for a
//!   rate run its mean kept tokens (`cache_tokens` of the records) when recorded.
//!
//! A category's percentage is its mean score over the full cache's mean score (as summary.csv).
//! The figures by rate draw summary.csv's (categories) and scores.csv's (subsets) 95 %
//! paired-bootstrap intervals as error bars, and name the samples per run (`n=`) in the panel
//! titles or the legend; the figure by cache size draws none (a rate run's points there sit at
//! its per-subset kept tokens, so one x can mix runs).
//!
//! Every figure is a [`Figure`] (panels of named series) drawn by [`draw_figure`]; the throughput
//! and max-batch figures of `kvc bench` are built the same way in [`throughput_figures`].
//!
//! Files: this one holds the figure model and the drawing; [`quality`] the LongBench figures
//! from score rows; [`throughput`] the figures of `kvc bench`. Text uses DejaVu Sans (assets/fonts, Bitstream Vera licence), embedded
//! so plots render the same on any machine.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

mod quality;
mod throughput;

pub use quality::quality_figures;
pub use throughput::throughput_figures;

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

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
    /// Error bars (x, low, high) in data units, drawn in the series' colour (95 % intervals).
    pub bars: Vec<(f64, f64, f64)>,
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
            .flat_map(|p| {
                p.series.iter().flat_map(|s| {
                    s.points
                        .iter()
                        .map(|pt| pt.1)
                        .chain(s.bars.iter().map(|b| b.2))
                })
            })
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
        // Bars of different series at one x are dodged apart by a few pixels' worth of x.
        let dodge = (i as f64 - (panel.series.len() as f64 - 1.0) / 2.0) * 0.04;
        draw_bars(chart, &s.bars, dodge, color)?;
    }
    Ok(())
}

/// Vertical error bars with short caps (x in data units, taken to log 2 and moved by `dodge`;
/// bars with x <= 0 or a non-finite end are skipped).
fn draw_bars<DB: DrawingBackend>(
    chart: &mut PanelChart<'_, DB>,
    bars: &[(f64, f64, f64)],
    dodge: f64,
    color: RGBColor,
) -> Result<(), String> {
    const CAP: f64 = 0.07; // half-width of a cap, in log-2 units of x
    let style = color.mix(0.8).stroke_width(1);
    let mut lines = Vec::new();
    for &(x, lo, hi) in bars {
        if x <= 0.0 || !lo.is_finite() || !hi.is_finite() {
            continue;
        }
        let x = x.log2() + dodge;
        lines.push(vec![(x, lo), (x, hi)]);
        lines.push(vec![(x - CAP, lo), (x + CAP, lo)]);
        lines.push(vec![(x - CAP, hi), (x + CAP, hi)]);
    }
    chart
        .draw_series(lines.into_iter().map(|l| PathElement::new(l, style)))
        .map_err(draw_err)?;
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
