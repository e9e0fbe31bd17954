//! RULER needle-depth results: `ruler_depth.csv` (accuracy per run × NIAH task × length × depth,
//! from the prediction rows' `depth`) and the familiar depth × length heat-map per model ×
//! method × budget (PNG + SVG, written atomically like [`super::plot`]'s figures), one panel per
//! NIAH task plus `all NIAH` (the mean over tasks per cell).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use super::plot::{draw_err, PlotError};
use super::tables::TreeScores;
use crate::data::ruler::parse_subset;

/// One row of `ruler_depth.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthRow {
    pub model: String,
    pub method: String,
    pub budget: String,
    pub rate: Option<f64>,
    /// RULER task (`niah_single_1`).
    pub task: String,
    /// Sequence length in tokens.
    pub length: usize,
    /// Needle depth, percent of the context.
    pub depth: f64,
    pub n: usize,
    /// Mean sample score × 100.
    pub score: f64,
}

/// Depth rows of every RULER subset whose rows record a depth.
pub fn depth_rows(t: &TreeScores) -> Vec<DepthRow> {
    let mut out = Vec::new();
    for (run, subsets) in &t.runs {
        for s in subsets {
            let Some((rt, length)) = parse_subset(s.task.name) else {
                continue;
            };
            // depth (as integer hundredths, for grouping) -> scores
            let mut by: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
            for (sc, d) in s.per_sample.iter().zip(&s.depths) {
                if let Some(d) = d {
                    by.entry((d * 100.0).round() as i64).or_default().push(*sc);
                }
            }
            for (d, v) in by {
                out.push(DepthRow {
                    model: run.model.clone(),
                    method: run.method.clone(),
                    budget: run.budget.label(),
                    rate: match run.budget {
                        super::tables::Budget::Rate(r) => Some(r),
                        super::tables::Budget::Tokens(_) => None,
                    },
                    task: rt.name.to_string(),
                    length,
                    depth: d as f64 / 100.0,
                    n: v.len(),
                    score: v.iter().sum::<f64>() / v.len() as f64 * 100.0,
                });
            }
        }
    }
    out
}

/// Cells of one heat-map panel: (length, depth) -> score.
pub type HeatCells = BTreeMap<(usize, i64), f64>;

/// One heat-map figure: panels of (title, cells (x, y) -> value). The RULER figures put
/// (length, depth in hundredths of a percent) -> score; the allocation figures of
/// [`super::allocation`] (kv-head, layer) -> share of the budget.
#[derive(Debug, Clone)]
pub struct HeatFigure {
    pub title: String,
    pub panels: Vec<(String, HeatCells)>,
    pub x_desc: String,
    pub y_desc: String,
    /// Tick labels of the x and y keys.
    pub x_label: fn(usize) -> String,
    pub y_label: fn(i64) -> String,
    /// Values mapped to the colour scale's ends (red .. green).
    pub scale: (f64, f64),
    /// Decimals printed in each cell.
    pub decimals: usize,
}

fn length_label(l: usize) -> String {
    l.to_string()
}

fn depth_label(d: i64) -> String {
    format!("{:.0}%", d as f64 / 100.0)
}

/// One figure per model × method × budget: `<model>__<method>__<budget>__ruler_depth`.
pub fn heat_figures(rows: &[DepthRow]) -> Vec<(String, HeatFigure)> {
    let mut runs: Vec<(String, String, String)> = Vec::new();
    for r in rows {
        let k = (r.model.clone(), r.method.clone(), r.budget.clone());
        if !runs.contains(&k) {
            runs.push(k);
        }
    }
    let mut out = Vec::new();
    for (model, method, budget) in runs {
        let mine: Vec<&DepthRow> = rows
            .iter()
            .filter(|r| r.model == model && r.method == method && r.budget == budget)
            .collect();
        let mut tasks: Vec<String> = Vec::new();
        for r in &mine {
            if !tasks.contains(&r.task) {
                tasks.push(r.task.clone());
            }
        }
        let mut panels = Vec::new();
        let mut all: BTreeMap<(usize, i64), Vec<f64>> = BTreeMap::new();
        for t in &tasks {
            let mut cells = BTreeMap::new();
            for r in mine.iter().filter(|r| &r.task == t) {
                let k = (r.length, (r.depth * 100.0).round() as i64);
                cells.insert(k, r.score);
                all.entry(k).or_default().push(r.score);
            }
            panels.push((t.clone(), cells));
        }
        if tasks.len() > 1 {
            let cells = all
                .into_iter()
                .map(|(k, v)| (k, v.iter().sum::<f64>() / v.len() as f64))
                .collect();
            panels.push(("all NIAH".to_string(), cells));
        }
        let stem = format!(
            "{}__{method}__{budget}__ruler_depth",
            model.replace('/', "_")
        );
        out.push((
            stem,
            HeatFigure {
                title: format!("{model} {method} {budget}: RULER NIAH accuracy by depth x length"),
                panels,
                x_desc: "length (tokens)".into(),
                y_desc: "needle depth".into(),
                x_label: length_label,
                y_label: depth_label,
                scale: (0.0, 100.0),
                decimals: 0,
            },
        ));
    }
    out
}

/// Red (`lo`) -> dark green (`hi`).
fn shade(v: f64, (lo, hi): (f64, f64)) -> RGBColor {
    let t = if hi > lo {
        ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(214.0, 26.0), lerp(69.0, 150.0), lerp(65.0, 65.0))
}

/// The chart of one heat-map panel: cell (i, j) spans [i, i+1) x [j, j+1).
type HeatChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws `fig` on `root`: the title in a 60 px header, then the panels, at most 3 a row
/// ([`draw_panel`]). Errors are the drawing backend's messages.
fn draw_on<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    fig: &HeatFigure,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(draw_err)?;
    let (header, body) = root.split_vertically(60);
    header
        .draw(&Text::new(
            fig.title.clone(),
            (20, 16),
            ("sans-serif", 22).into_font(),
        ))
        .map_err(draw_err)?;
    let n = fig.panels.len().max(1);
    let cols = n.min(3);
    let areas = body.split_evenly((n.div_ceil(cols), cols));
    for (area, (title, cells)) in areas.iter().zip(&fig.panels) {
        draw_panel(&root, area, fig, title, cells)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// The distinct x keys (lengths) and y keys (depths) of a panel's cells, ascending: the i-th
/// length and the j-th depth name cell (i, j).
struct HeatAxes {
    lengths: Vec<usize>,
    depths: Vec<i64>,
}

/// One panel on `area`: the caption, axis descriptions, tick labels at cell centres
/// ([`draw_ticks`], written on `root`) and the cells ([`draw_cells`]).
fn draw_panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    fig: &HeatFigure,
    title: &str,
    cells: &HeatCells,
) -> Result<(), String> {
    let axes = HeatAxes {
        lengths: cells
            .keys()
            .map(|k| k.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        depths: cells
            .keys()
            .map(|k| k.1)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let (nx, ny) = (axes.lengths.len().max(1), axes.depths.len().max(1));
    // Cell (i, j) spans [i, i+1) x [j, j+1). Plotters puts its own tick labels at "nice"
    // values, i.e. on cell edges, so the mesh draws none and each label is written at its
    // cell's centre, converted to pixels (`backend_coord`) and drawn on the root area.
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..nx as f64, 0f64..ny as f64)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc(fig.x_desc.as_str())
        .y_desc(fig.y_desc.as_str())
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    let tick = ("sans-serif", 13).into_font();
    draw_ticks(root, &chart, fig, &tick, &axes)?;
    draw_cells(root, &mut chart, fig, &tick, cells, &axes)
}

/// Tick labels in `tick`'s font on `root`, centred on their cells: every length below the x
/// axis; along y at most ~16 depths, evenly spaced, left of the axis.
fn draw_ticks<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &HeatChart<'_, DB>,
    fig: &HeatFigure,
    tick: &FontDesc<'_>,
    axes: &HeatAxes,
) -> Result<(), String> {
    let ny = axes.depths.len().max(1);
    // Every label along x; along y at most ~16, evenly spaced.
    let y_step = ny.div_ceil(16).max(1);
    for (i, l) in axes.lengths.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        let style = tick
            .clone()
            .into_text_style(root)
            .pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new((fig.x_label)(*l), (px, py + 4), style))
            .map_err(draw_err)?;
    }
    for (j, d) in axes.depths.iter().enumerate().step_by(y_step) {
        let (px, py) = chart.backend_coord(&(0.0, j as f64 + 0.5));
        let style = tick
            .clone()
            .into_text_style(root)
            .pos(Pos::new(HPos::Right, VPos::Center));
        root.draw(&Text::new((fig.y_label)(*d), (px - 4, py), style))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Each present cell filled with its value's shade on `fig.scale`; with at most 12 depths (cells
/// tall enough) its value is written in the middle with `fig.decimals` decimals.
fn draw_cells<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &mut HeatChart<'_, DB>,
    fig: &HeatFigure,
    tick: &FontDesc<'_>,
    cells: &HeatCells,
    axes: &HeatAxes,
) -> Result<(), String> {
    let ny = axes.depths.len().max(1);
    for (i, l) in axes.lengths.iter().enumerate() {
        for (j, d) in axes.depths.iter().enumerate() {
            let Some(s) = cells.get(&(*l, *d)) else {
                continue;
            };
            let (x, y) = (i as f64, j as f64);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x, y), (x + 1.0, y + 1.0)],
                    shade(*s, fig.scale).filled(),
                )))
                .map_err(draw_err)?;
            // Values only where a cell is tall enough to hold them.
            if ny > 12 {
                continue;
            }
            let style = tick
                .clone()
                .into_text_style(root)
                .pos(Pos::new(HPos::Center, VPos::Center));
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{s:.*}", fig.decimals),
                    (x + 0.5, y + 0.5),
                    style,
                )))
                .map_err(draw_err)?;
        }
    }
    Ok(())
}

/// Draw `fig` to `<stem>.png` and `<stem>.svg` (temp names, then renamed).
pub fn draw_heatmap(fig: &HeatFigure, stem: &Path) -> Result<Vec<PathBuf>, PlotError> {
    super::plot::ensure_font()?;
    let n = fig.panels.len().max(1);
    let cols = n.min(3) as u32;
    let rows = n.div_ceil(3) as u32;
    let size = (cols * 420, 60 + rows * 360);
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).map_err(|err| PlotError::Draw {
            path: dir.to_path_buf(),
            message: err.to_string(),
        })?;
    }
    let with = |s: &str| PathBuf::from(format!("{}{s}", stem.display()));
    let (png, svg, tpng, tsvg) = (
        with(".png"),
        with(".svg"),
        with(".tmp.png"),
        with(".tmp.svg"),
    );
    let err = |p: &Path| {
        let path = p.to_path_buf();
        move |message: String| PlotError::Draw { path, message }
    };
    draw_on(BitMapBackend::new(&tpng, size).into_drawing_area(), fig).map_err(err(&png))?;
    draw_on(SVGBackend::new(&tsvg, size).into_drawing_area(), fig).map_err(err(&svg))?;
    for (t, p) in [(&tpng, &png), (&tsvg, &svg)] {
        std::fs::rename(t, p).map_err(|e| PlotError::Draw {
            path: p.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(vec![png, svg])
}

/// Write `ruler_depth.csv` beside `scores.csv` when the tree has RULER depth rows; returns the
/// rows (empty: nothing written).
pub fn write_depth_csv(
    dir: &Path,
    t: &TreeScores,
) -> Result<Vec<DepthRow>, super::tables::ReportError> {
    let rows = depth_rows(t);
    if !rows.is_empty() {
        super::tables::write_csv(&dir.join("ruler_depth.csv"), &rows)?;
    }
    Ok(rows)
}

/// Draw every heat-map of `rows` into `out_dir`; returns the files written.
pub fn draw_all(rows: &[DepthRow], out_dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut files = Vec::new();
    for (stem, fig) in heat_figures(rows) {
        files.extend(draw_heatmap(&fig, &out_dir.join(stem))?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(task: &str, length: usize, depth: f64, score: f64) -> DepthRow {
        DepthRow {
            model: "m".into(),
            method: "full".into(),
            budget: "rate1".into(),
            rate: Some(1.0),
            task: task.into(),
            length,
            depth,
            n: 1,
            score,
        }
    }

    #[test]
    fn figures_group_cells_and_average_all() {
        let rows = vec![
            row("niah_single_1", 1024, 12.5, 100.0),
            row("niah_single_1", 2048, 12.5, 0.0),
            row("niah_single_2", 1024, 12.5, 50.0),
        ];
        let figs = heat_figures(&rows);
        assert_eq!(figs.len(), 1);
        assert_eq!(figs[0].0, "m__full__rate1__ruler_depth");
        let panels = &figs[0].1.panels;
        assert_eq!(panels.len(), 3);
        assert_eq!(panels[2].1[&(1024, 1250)], 75.0);
        let tmp = tempfile::tempdir().unwrap();
        let files = draw_all(&rows, tmp.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files
            .iter()
            .all(|f| f.exists() && std::fs::metadata(f).unwrap().len() > 1000));
    }
}
