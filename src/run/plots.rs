//! A run's own plots: its loss and accuracy curves, train against validation.

use plotters::prelude::SeriesLabelPosition;

use crate::run::metrics::EpochMetrics;
use crate::run::rundir::RunDir;
use crate::util::plots::{Chart, PALETTE, PlotError, Series, write_png};

/// The loss and accuracy charts of one run: train against validation per epoch,
/// with the best validation epoch (the one `model.safetensors` holds) marked;
/// the training curves alone when no images were held out.
pub fn run_charts(name: &str, metrics: &[EpochMetrics]) -> (Chart, Chart) {
    let best = metrics
        .iter()
        .filter(|m| m.val_acc.is_some())
        .fold(None::<&EpochMetrics>, |best, m| match best {
            Some(b) if b.val_acc >= m.val_acc => Some(b),
            _ => Some(m),
        })
        .map(|m| (m.epoch as f64, format!("best: epoch {}", m.epoch)));
    let line = |label: &str, color, value: fn(&EpochMetrics) -> Option<f64>| Series {
        label: label.to_string(),
        color,
        points: (metrics.iter())
            .filter_map(|m| Some((m.epoch as f64, value(m)?)))
            .collect(),
        band: Vec::new(),
    };
    let measured = |series: Vec<Series>| series.into_iter().filter(|s| !s.points.is_empty());
    let loss = Chart {
        title: format!("{name}: loss"),
        y_label: "cross-entropy loss".into(),
        series: measured(vec![
            line("train", PALETTE[0], |m| Some(m.train_loss)),
            line("validation", PALETTE[1], |m| m.val_loss),
        ])
        .collect(),
        legend: SeriesLabelPosition::UpperRight,
        marker: best.clone(),
    };
    let accuracy = Chart {
        title: format!("{name}: accuracy"),
        y_label: "accuracy (%)".into(),
        series: measured(vec![
            line("train", PALETTE[0], |m| Some(100.0 * m.train_acc)),
            line("validation", PALETTE[1], |m| m.val_acc.map(|a| 100.0 * a)),
        ])
        .collect(),
        legend: SeriesLabelPosition::LowerRight,
        marker: best,
    };
    (loss, accuracy)
}

/// Writes `plots/loss.png`, `plots/accuracy.png` and `plots/curves.png` (both).
pub fn write_run_plots(
    run: &RunDir,
    name: &str,
    metrics: &[EpochMetrics],
) -> Result<(), PlotError> {
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
                val_loss: Some(1.2 / epoch as f64),
                val_acc: Some(0.88 + 0.01 * epoch as f64),
                lr: 0.01,
                ..Default::default()
            })
            .collect();
        write_run_plots(&run, "p", &metrics).unwrap();
        let loss = image::open(run.plot("loss.png")).unwrap();
        assert_eq!((loss.width(), loss.height()), (900, 600));
        let curves = image::open(run.plot("curves.png")).unwrap();
        assert_eq!(curves.width(), 2 * 900);
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

    #[test]
    fn without_validation_only_training_curves_and_no_best_mark() {
        let metrics = vec![EpochMetrics {
            epoch: 1,
            train_loss: 0.5,
            train_acc: 0.9,
            ..EpochMetrics::default()
        }];
        let (loss, accuracy) = run_charts("p", &metrics);
        for chart in [&loss, &accuracy] {
            let labels: Vec<&str> = chart.series.iter().map(|s| s.label.as_str()).collect();
            assert_eq!(labels, ["train"]);
            assert!(chart.marker.is_none());
        }
    }
}
