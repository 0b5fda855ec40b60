//! Training curves as PNG files a report can use: titles, axis labels, legends.
//! Rendered in memory with an embedded font (no system fonts needed), then
//! written atomically.

use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::util::fsio::{FileError, write_atomic};

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw {}: {reason}", path.display())]
    Draw {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(transparent)]
    File(#[from] FileError),
}

pub(crate) const FONT: &str = "sans-serif";
const WIDTH: u32 = 900;
const HEIGHT: u32 = 600;

/// Colours for up to eight series; more cycle.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One labelled line: `(epoch, value)` points, with an optional shaded band
/// `(epoch, low, high)` around it (the spread over seeds).
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
}

/// One chart: a title, the quantity on the y axis, and its lines.
pub struct Chart {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Where the legend goes: the corner the curves leave empty.
    pub legend: SeriesLabelPosition,
    /// An epoch to mark with a dashed vertical line (the best one), and its label.
    pub marker: Option<(f64, String)>,
}

fn register_font() {
    static FONT_ONCE: Once = Once::new();
    FONT_ONCE.call_once(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans font is valid"));
        plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans font is valid"));
    });
}

/// The x and y ranges that hold every finite point of `chart`, with some room
/// above and below; quantities that cannot be negative keep the axis at 0 or above.
fn axis_ranges(chart: &Chart) -> (Range<f64>, Range<f64>) {
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points.filter(|(_, y)| y.is_finite()) {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.08).max(1e-3);
    let y_low = if y_min >= 0.0 {
        (y_min - pad).max(0.0)
    } else {
        y_min - pad
    };
    let x_range = if x_max <= 1.0 { 0.5..1.5 } else { 1.0..x_max };
    (x_range, y_low..y_max + pad)
}

/// Draws `chart` into `area`: axes, one line with dots per series, the marker
/// and the legend.
fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let (x_range, y_range) = axis_ranges(chart);
    let epochs = x_range.end as usize;
    let mut builder = ChartBuilder::on(area)
        .caption(&chart.title, (FONT, 26).into_font().style(FontStyle::Bold))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .build_cartesian_2d(x_range, y_range.clone())
        .map_err(|e| e.to_string())?;
    builder
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(&chart.y_label)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .x_labels(epochs.clamp(2, 11))
        // Epochs are whole numbers: label only those ticks.
        .x_label_formatter(&|x| {
            if x.fract().abs() < 1e-6 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| e.to_string())?;
    if let Some((x, label)) = &chart.marker {
        let dashes = DashedLineSeries::new(
            [(*x, y_range.start), (*x, y_range.end)],
            6,
            4,
            BLACK.mix(0.5).stroke_width(2),
        );
        builder
            .draw_series(dashes)
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK.mix(0.5)));
    }
    for series in &chart.series {
        draw_series(&mut builder, series)?;
    }
    builder
        .configure_series_labels()
        .position(chart.legend.clone())
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| e.to_string())
}

type Cartesian<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// One series as a line with a dot on each point, entered in the legend.
fn draw_series<DB: DrawingBackend>(
    builder: &mut Cartesian<DB>,
    series: &Series,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let color = series.color;
    if !series.band.is_empty() {
        // The band's outline: along the highs, back along the lows.
        let outline: Vec<(f64, f64)> = (series.band.iter().map(|&(x, _, high)| (x, high)))
            .chain(series.band.iter().rev().map(|&(x, low, _)| (x, low)))
            .collect();
        builder
            .draw_series(std::iter::once(Polygon::new(
                outline,
                color.mix(0.2).filled(),
            )))
            .map_err(|e| e.to_string())?;
    }
    builder
        .draw_series(LineSeries::new(
            series.points.clone(),
            color.stroke_width(3),
        ))
        .map_err(|e| e.to_string())?
        .label(&series.label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    let dots = series
        .points
        .iter()
        .map(|&p| Circle::new(p, 4, color.filled()));
    builder.draw_series(dots).map_err(|e| e.to_string())?;
    Ok(())
}

/// Renders charts side by side into one PNG and writes it atomically.
pub fn write_png(path: &Path, charts: &[Chart]) -> Result<(), PlotError> {
    let width = WIDTH * charts.len().max(1) as u32;
    render_png(path, (width, HEIGHT), |root| {
        let areas = root.split_evenly((1, charts.len().max(1)));
        for (area, chart) in areas.iter().zip(charts) {
            draw(area, chart)?;
        }
        Ok(())
    })
}

/// A drawing area on an in-memory bitmap.
pub type Canvas<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws on a white `(width, height)` canvas, then writes it as a PNG atomically.
pub fn render_png(
    path: &Path,
    (width, height): (u32, u32),
    paint: impl FnOnce(&Canvas) -> Result<(), String>,
) -> Result<(), PlotError> {
    register_font();
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    let drawn = (|| {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        paint(&root)?;
        root.present().map_err(|e| e.to_string())
    })();
    let draw_error = |reason: String| PlotError::Draw {
        path: path.to_path_buf(),
        reason,
    };
    drawn.map_err(draw_error)?;
    let image = image::RgbImage::from_raw(width, height, pixels)
        .ok_or_else(|| draw_error("pixel buffer size".into()))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| draw_error(e.to_string()))?;
    Ok(write_atomic(path, png.get_ref())?)
}

const CELL: i32 = 56;
const MATRIX_LEFT: i32 = 110;
const MATRIX_TOP: i32 = 110;

/// A confusion matrix as a heat map: rows are true classes, columns predictions,
/// each cell labelled with its count. Correct predictions are blue, shaded by the
/// share of the row; mistakes are red, shaded against the most frequent mistake,
/// so that a handful of confusions stands out beside thousands of hits.
pub fn write_confusion(
    path: &Path,
    title: &str,
    counts: &[[usize; 10]; 10],
) -> Result<(), PlotError> {
    let side = (MATRIX_LEFT + 10 * CELL + 40) as u32;
    let worst_mistake = (0..10)
        .flat_map(|t| (0..10).filter(move |&p| p != t).map(move |p| counts[t][p]))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    render_png(path, (side, side + 10), |root| {
        draw_confusion_axes(root, title)?;
        for (row, cells) in counts.iter().enumerate() {
            let total = cells.iter().sum::<usize>().max(1) as f64;
            for (col, &count) in cells.iter().enumerate() {
                let (fill, dark) = if row == col {
                    shade([8, 48, 107], (count as f64 / total).sqrt())
                } else if count == 0 {
                    (WHITE, false)
                } else {
                    // Even a single mistake gets a visible tint.
                    shade([165, 15, 21], 0.2 + 0.8 * count as f64 / worst_mistake)
                };
                draw_cell(root, (row, col), count, fill, dark)?;
            }
        }
        Ok(())
    })
}

/// White blended towards `dark` by `t` in 0..=1, and whether text on it must be white.
fn shade(dark: [u8; 3], t: f64) -> (RGBColor, bool) {
    let mix = |channel: u8| (255.0 + (channel as f64 - 255.0) * t) as u8;
    (RGBColor(mix(dark[0]), mix(dark[1]), mix(dark[2])), t > 0.5)
}

/// The title, the axis names and the class numbers along both axes.
fn draw_confusion_axes(root: &Canvas, title: &str) -> Result<(), String> {
    let text = |size: u32| (FONT, size).into_font().color(&BLACK);
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let bold = (FONT, 22).into_font().style(FontStyle::Bold).color(&BLACK);
    root.draw(&Text::new(title.to_string(), (20, 20), bold))
        .map_err(err)?;
    let predicted_at = (MATRIX_LEFT + 5 * CELL - 40, MATRIX_TOP - 55);
    root.draw(&Text::new("predicted", predicted_at, text(18)))
        .map_err(err)?;
    root.draw(&Text::new(
        "true",
        (30, MATRIX_TOP + 5 * CELL - 10),
        text(18),
    ))
    .map_err(err)?;
    for class in 0..10 {
        let offset = class * CELL + CELL / 2 - 5;
        let label = class.to_string();
        root.draw(&Text::new(
            label.clone(),
            (MATRIX_LEFT + offset, MATRIX_TOP - 28),
            text(18),
        ))
        .map_err(err)?;
        root.draw(&Text::new(
            label,
            (MATRIX_LEFT - 28, MATRIX_TOP + offset - 4),
            text(18),
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// One cell of the matrix: its fill, a thin grid line and its count.
fn draw_cell(
    root: &Canvas,
    (row, col): (usize, usize),
    count: usize,
    fill: RGBColor,
    dark: bool,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let (x, y) = (
        MATRIX_LEFT + col as i32 * CELL,
        MATRIX_TOP + row as i32 * CELL,
    );
    let corners = [(x, y), (x + CELL, y + CELL)];
    root.draw(&Rectangle::new(corners, fill.filled()))
        .map_err(err)?;
    root.draw(&Rectangle::new(
        corners,
        RGBColor(220, 220, 220).stroke_width(1),
    ))
    .map_err(err)?;
    let label = count.to_string();
    let color = if dark { WHITE } else { BLACK };
    let dx = CELL / 2 - 5 * label.len() as i32;
    root.draw(&Text::new(
        label,
        (x + dx, y + CELL / 2 - 8),
        (FONT, 15).into_font().color(&color),
    ))
    .map_err(err)?;
    Ok(())
}

/// One tile of [`write_image_grid`]: a 28x28 MNIST image (white ink on black)
/// and the caption under it.
pub struct Tile<'a> {
    pub pixels: &'a [u8],
    pub caption: String,
}

/// Images in a grid, drawn dark on light and enlarged 4x, each with its caption.
pub fn write_image_grid(
    path: &Path,
    title: &str,
    tiles: &[Tile],
    columns: usize,
) -> Result<(), PlotError> {
    const SCALE: i32 = 4;
    const SIDE: i32 = 28 * SCALE;
    const CELL_W: i32 = SIDE + 60;
    const CELL_H: i32 = SIDE + 40;
    const TOP: i32 = 60;
    let columns = columns.max(1);
    let rows = tiles.len().div_ceil(columns).max(1);
    let size = (
        (columns as i32 * CELL_W + 20) as u32,
        (TOP + rows as i32 * CELL_H + 10) as u32,
    );
    render_png(path, size, |root| {
        let err = |e: DrawingAreaErrorKind<_>| e.to_string();
        let title_style = (FONT, 22).into_font().style(FontStyle::Bold).color(&BLACK);
        root.draw(&Text::new(title.to_string(), (20, 18), title_style))
            .map_err(err)?;
        for (i, tile) in tiles.iter().enumerate() {
            let x0 = 20 + (i % columns) as i32 * CELL_W + 20;
            let y0 = TOP + (i / columns) as i32 * CELL_H;
            for (p, &ink) in tile.pixels.iter().enumerate().take(28 * 28) {
                let level = 255 - ink;
                let (x, y) = (x0 + (p % 28) as i32 * SCALE, y0 + (p / 28) as i32 * SCALE);
                root.draw(&Rectangle::new(
                    [(x, y), (x + SCALE, y + SCALE)],
                    RGBColor(level, level, level).filled(),
                ))
                .map_err(err)?;
            }
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + SIDE, y0 + SIDE)],
                RGBColor(180, 180, 180).stroke_width(1),
            ))
            .map_err(err)?;
            root.draw(&Text::new(
                tile.caption.clone(),
                (x0 - 15, y0 + SIDE + 8),
                (FONT, 15).into_font().color(&BLACK),
            ))
            .map_err(err)?;
        }
        Ok(())
    })
}
