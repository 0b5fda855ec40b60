//! Scatter charts: one dot per item over a linear, logarithmic or categorical
//! x axis, with optional thin lines under the dots and a legend of colours.
//! Where a line per run would say little (a search's hundred trials), a dot
//! per trial shows where the good values lie.

use std::ops::Range;
use std::path::Path;

use plotters::prelude::*;

use crate::util::plots::{Canvas, FONT, PlotError, render_png};

const PANEL_WIDTH: u32 = 640;
const PANEL_HEIGHT: u32 = 440;

/// How x values are laid out.
#[derive(Debug, Clone, PartialEq)]
pub enum XAxis {
    Linear,
    /// x values are positive and spread over decades (learning rates).
    Log,
    /// x values are positions 0, 1, ... of these labels.
    Categories(Vec<String>),
}

/// One dot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dot {
    pub x: f64,
    pub y: f64,
    pub color: RGBColor,
    pub radius: u32,
}

/// One scatter chart.
pub struct ScatterChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_axis: XAxis,
    /// Polylines drawn under the dots, thin.
    pub lines: Vec<(Vec<(f64, f64)>, RGBColor)>,
    pub dots: Vec<Dot>,
    /// What each colour means, in the lower-right corner.
    pub legend: Vec<(String, RGBColor)>,
}

/// Renders `charts` in rows of `columns` panels into one PNG, atomically.
pub fn write_grid(path: &Path, charts: &[ScatterChart], columns: usize) -> Result<(), PlotError> {
    let columns = columns.clamp(1, charts.len().max(1));
    let rows = charts.len().div_ceil(columns).max(1);
    let size = (PANEL_WIDTH * columns as u32, PANEL_HEIGHT * rows as u32);
    render_png(path, size, |root: &Canvas| {
        let areas = root.split_evenly((rows, columns));
        for (area, chart) in areas.iter().zip(charts) {
            draw(area, chart)?;
        }
        Ok(())
    })
}

/// The x position a value is plotted at: its logarithm on a log axis.
fn place(axis: &XAxis, x: f64) -> f64 {
    match axis {
        XAxis::Log => x.log10(),
        _ => x,
    }
}

/// The range of placed x values and of y values, with room around the dots.
fn ranges(chart: &ScatterChart) -> (Range<f64>, Range<f64>) {
    let xs = (chart.dots.iter().map(|d| d.x))
        .chain(chart.lines.iter().flat_map(|(l, _)| l.iter().map(|p| p.0)))
        .map(|x| place(&chart.x_axis, x));
    let ys = (chart.dots.iter().map(|d| d.y))
        .chain(chart.lines.iter().flat_map(|(l, _)| l.iter().map(|p| p.1)));
    let span = |values: &mut dyn Iterator<Item = f64>| {
        let (low, high) = values
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
                (l.min(v), h.max(v))
            });
        if low.is_finite() {
            (low, high)
        } else {
            (0.0, 1.0)
        }
    };
    let padded = |(low, high): (f64, f64)| {
        let pad = ((high - low) * 0.06).max(1e-3);
        low - pad..high + pad
    };
    let x_range = match &chart.x_axis {
        XAxis::Categories(labels) => -0.5..labels.len() as f64 - 0.5,
        _ => padded(span(&mut xs.into_iter())),
    };
    (x_range, padded(span(&mut ys.into_iter())))
}

/// A tick label: the value itself, its power of ten undone, or its category.
fn tick_label(axis: &XAxis, x: f64) -> String {
    match axis {
        XAxis::Linear => format!("{}", (x * 1e4).round() / 1e4),
        XAxis::Log => format!("{:.1e}", 10f64.powf(x)),
        XAxis::Categories(labels) => {
            let nearest = x.round();
            match (x - nearest).abs() < 1e-6 && nearest >= 0.0 {
                true => labels.get(nearest as usize).cloned().unwrap_or_default(),
                false => String::new(),
            }
        }
    }
}

fn draw(area: &Canvas, chart: &ScatterChart) -> Result<(), String> {
    let (x_range, y_range) = ranges(chart);
    let mut builder = ChartBuilder::on(area)
        .caption(&chart.title, (FONT, 20).into_font().style(FontStyle::Bold))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| e.to_string())?;
    let x_labels = match &chart.x_axis {
        XAxis::Categories(labels) => labels.len() * 2 + 1,
        _ => 6,
    };
    builder
        .configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .x_labels(x_labels)
        .x_label_formatter(&|x| tick_label(&chart.x_axis, *x))
        .draw()
        .map_err(|e| e.to_string())?;
    for (line, color) in &chart.lines {
        let placed = line.iter().map(|&(x, y)| (place(&chart.x_axis, x), y));
        (builder.draw_series(LineSeries::new(placed, color.stroke_width(2))))
            .map_err(|e| e.to_string())?;
    }
    let dots = (chart.dots.iter())
        .map(|d| Circle::new((place(&chart.x_axis, d.x), d.y), d.radius, d.color.filled()));
    builder.draw_series(dots).map_err(|e| e.to_string())?;
    for (label, color) in &chart.legend {
        let color = *color;
        (builder.draw_series(std::iter::empty::<Circle<(f64, f64), u32>>()))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
    }
    if chart.legend.is_empty() {
        return Ok(());
    }
    builder
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(x_axis: XAxis, xs: &[f64]) -> ScatterChart {
        ScatterChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_axis,
            lines: Vec::new(),
            dots: (xs.iter().enumerate())
                .map(|(i, &x)| Dot {
                    x,
                    y: i as f64,
                    color: BLACK,
                    radius: 3,
                })
                .collect(),
            legend: vec![("dots".into(), BLACK)],
        }
    }

    #[test]
    fn a_log_axis_spans_the_decades_of_its_values() {
        let (x, _) = ranges(&chart(XAxis::Log, &[1e-3, 1e-1]));
        assert!(x.start < -3.0 && x.start > -3.2, "{x:?}");
        assert!(x.end > -1.0 && x.end < -0.8, "{x:?}");
        assert_eq!(tick_label(&XAxis::Log, -2.0), "1.0e-2");
    }

    #[test]
    fn categories_are_labelled_at_their_positions_only() {
        let axis = XAxis::Categories(vec!["false".into(), "true".into()]);
        let (x, _) = ranges(&chart(axis.clone(), &[0.0, 1.0]));
        assert_eq!(x, -0.5..1.5);
        assert_eq!(tick_label(&axis, 1.0), "true");
        assert_eq!(tick_label(&axis, 0.5), "");
        assert_eq!(tick_label(&axis, 2.0), "");
    }

    #[test]
    fn a_grid_of_charts_is_written_as_one_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let charts = [
            chart(XAxis::Linear, &[0.0, 0.5, 1.0]),
            chart(XAxis::Log, &[1e-4, 1e-2]),
            chart(XAxis::Linear, &[]),
        ];
        write_grid(&path, &charts, 2).unwrap();
        let image = image::open(&path).unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (2 * PANEL_WIDTH, 2 * PANEL_HEIGHT)
        );
    }
}
