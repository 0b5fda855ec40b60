//! Training curves as PNG files a report can use: titles, axis labels, legends.
//! Rendered in memory with an embedded font (no system fonts needed), then
//! written atomically.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::rundir::{EpochMetrics, RunDir, write_atomic};

const FONT: &str = "sans-serif";
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

/// One labelled line: `(epoch, value)` points.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, the quantity on the y axis, and its lines.
pub struct Chart {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Where the legend goes: the corner the curves leave empty.
    pub legend: SeriesLabelPosition,
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

/// Draws `chart` into `area`.
fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
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
    let x_range = if x_max <= 1.0 { 0.5..1.5 } else { 1.0..x_max };
    let mut builder = ChartBuilder::on(area)
        .caption(&chart.title, (FONT, 26).into_font().style(FontStyle::Bold))
        .margin(18)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .build_cartesian_2d(x_range, (y_min - pad)..(y_max + pad))
        .map_err(|e| e.to_string())?;
    builder
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(&chart.y_label)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .x_labels((x_max as usize).clamp(2, 11))
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
    for series in &chart.series {
        let color = series.color;
        builder
            .draw_series(LineSeries::new(
                series.points.clone(),
                color.stroke_width(3),
            ))
            .map_err(|e| e.to_string())?
            .label(&series.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        builder
            .draw_series(
                series
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, 4, color.filled())),
            )
            .map_err(|e| e.to_string())?;
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

/// Renders charts side by side into one PNG and writes it atomically.
pub fn write_png(path: &Path, charts: &[Chart]) -> Result<(), String> {
    register_font();
    let width = WIDTH * charts.len().max(1) as u32;
    let mut pixels = vec![255u8; (width * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let areas = root.split_evenly((1, charts.len().max(1)));
        for (area, chart) in areas.iter().zip(charts) {
            draw(area, chart)?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    let image = image::RgbImage::from_raw(width, HEIGHT, pixels).ok_or("pixel buffer size")?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    write_atomic(path, png.get_ref()).map_err(|e| e.to_string())
}

/// The loss and accuracy charts of one run: train against validation per epoch.
pub fn run_charts(name: &str, metrics: &[EpochMetrics]) -> (Chart, Chart) {
    let line = |label: &str, color, value: fn(&EpochMetrics) -> f64| Series {
        label: label.to_string(),
        color,
        points: metrics.iter().map(|m| (m.epoch as f64, value(m))).collect(),
    };
    let loss = Chart {
        title: format!("{name}: loss"),
        y_label: "cross-entropy loss".into(),
        series: vec![
            line("train", PALETTE[0], |m| m.train_loss),
            line("validation", PALETTE[1], |m| m.val_loss),
        ],
        legend: SeriesLabelPosition::UpperRight,
    };
    let accuracy = Chart {
        title: format!("{name}: accuracy"),
        y_label: "accuracy (%)".into(),
        series: vec![
            line("train", PALETTE[0], |m| 100.0 * m.train_acc),
            line("validation", PALETTE[1], |m| 100.0 * m.val_acc),
        ],
        legend: SeriesLabelPosition::LowerRight,
    };
    (loss, accuracy)
}

/// Writes `plots/loss.png`, `plots/accuracy.png` and `plots/curves.png` (both).
pub fn write_run_plots(run: &RunDir, name: &str, metrics: &[EpochMetrics]) -> Result<(), String> {
    let (loss, accuracy) = run_charts(name, metrics);
    write_png(&run.plot("loss.png"), std::slice::from_ref(&loss))?;
    write_png(&run.plot("accuracy.png"), std::slice::from_ref(&accuracy))?;
    write_png(&run.plot("curves.png"), &[loss, accuracy])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_decodable_pngs_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path(), "p").unwrap();
        let metrics: Vec<EpochMetrics> = (1..=3)
            .map(|epoch| EpochMetrics {
                epoch,
                train_loss: 1.0 / epoch as f64,
                train_acc: 0.9 + 0.01 * epoch as f64,
                val_loss: 1.2 / epoch as f64,
                val_acc: 0.88 + 0.01 * epoch as f64,
                lr: 0.01,
                epoch_secs: 1.0,
                images_per_sec: 100.0,
            })
            .collect();
        write_run_plots(&run, "p", &metrics).unwrap();
        let loss = image::open(run.plot("loss.png")).unwrap();
        assert_eq!((loss.width(), loss.height()), (WIDTH, HEIGHT));
        let curves = image::open(run.plot("curves.png")).unwrap();
        assert_eq!(curves.width(), 2 * WIDTH);
        // Something besides the white background was drawn.
        assert!(
            curves
                .to_rgb8()
                .pixels()
                .filter(|p| p.0 != [255, 255, 255])
                .count()
                > 10_000
        );
        // A single epoch still plots.
        write_run_plots(&run, "p", &metrics[..1]).unwrap();
    }
}
