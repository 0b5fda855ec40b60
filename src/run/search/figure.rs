//! `search.png`: where a search found its good values. One panel per searched
//! key (each trial's metric at the last rung it reached, against the value it
//! drew) and one against the epochs spent (each rung's result as the search
//! trained it, and the best so far), coloured by how far each trial went.

use std::path::Path;

use plotters::style::RGBColor;

use crate::config::search::{Distribution, Metric};
use crate::run::metrics::{EpochMetrics, read_metrics};
use crate::run::rundir;
use crate::run::search::{SearchRecord, TrialEntry, metric_within, value_label};
use crate::util::plots::{PALETTE, PlotError};
use crate::util::scatter::{self, Dot, ScatterChart, XAxis};

pub const FIGURE_FILE: &str = "search.png";

const BEST: RGBColor = PALETTE[3];

/// Writes the figure of `record`, whose trials are in `dir`, to `path`.
pub fn write(record: &SearchRecord, dir: &Path, path: &Path) -> Result<(), PlotError> {
    let curves: Vec<Vec<EpochMetrics>> = (record.trials.iter())
        .map(|t| trial_metrics(t, dir).unwrap_or_default())
        .collect();
    let mut charts: Vec<ScatterChart> = (record.search.space.iter())
        .map(|(key, distribution)| key_chart(record, key, distribution))
        .collect();
    charts.push(spent_chart(record, &curves));
    scatter::write_grid(path, &charts, 3)
}

fn trial_metrics(trial: &TrialEntry, dir: &Path) -> Option<Vec<EpochMetrics>> {
    let run = trial.run_dir_in(dir)?;
    read_metrics(&run.join(rundir::METRICS_FILE)).ok()
}

/// Colour by the last rung reached; the best trial stands out.
fn color(record: &SearchRecord, trial: &TrialEntry) -> RGBColor {
    if record.best == Some(trial.index) {
        return BEST;
    }
    rung_color(trial.rung, record.rungs.len())
}

fn rung_color(rung: usize, rungs: usize) -> RGBColor {
    // The last rung blue, the one before orange, earlier ones grey.
    match rungs - 1 - rung.min(rungs - 1) {
        0 => PALETTE[0],
        1 => PALETTE[1],
        _ => PALETTE[7],
    }
}

fn legend(record: &SearchRecord) -> Vec<(String, RGBColor)> {
    let last = record.rungs.len().saturating_sub(1);
    let mut entries: Vec<(String, RGBColor)> = (record.rungs.iter().enumerate())
        .filter(|&(rung, _)| rung + 2 >= record.rungs.len())
        .map(|(rung, &epochs)| {
            let label = match rung == last {
                true => format!("trained {epochs} epochs"),
                false => format!("stopped at {epochs} epochs"),
            };
            (label, rung_color(rung, record.rungs.len()))
        })
        .collect();
    if record.rungs.len() > 2 {
        entries.insert(0, ("stopped earlier".into(), PALETTE[7]));
    }
    if record.best.is_some() {
        entries.push(("best".into(), BEST));
    }
    entries
}

/// The metric as plotted: accuracy in percent, loss as it is.
fn shown(metric: Metric, value: f64) -> f64 {
    match metric {
        Metric::ValAcc => 100.0 * value,
        Metric::ValLoss => value,
    }
}

fn y_label(metric: Metric) -> String {
    match metric {
        Metric::ValAcc => "validation accuracy (%)".into(),
        Metric::ValLoss => "validation loss".into(),
    }
}

/// Each trial's metric against the value it drew for `key`.
fn key_chart(record: &SearchRecord, key: &str, distribution: &Distribution) -> ScatterChart {
    let choices: Vec<serde_json::Value> = match distribution {
        Distribution::Choice(values) => (values.iter())
            .map(|v| serde_json::to_value(v).unwrap_or_default())
            .collect(),
        _ => Vec::new(),
    };
    // A few whole numbers read best as categories, like a choice.
    let few_integers = match distribution {
        Distribution::Int([low, high]) if high - low <= 10 => Some(*low),
        _ => None,
    };
    let x_axis = match (distribution, few_integers) {
        (Distribution::LogUniform(_), _) => XAxis::Log,
        (Distribution::Choice(_), _) => {
            XAxis::Categories(choices.iter().map(value_label).collect())
        }
        (Distribution::Int([low, high]), Some(_)) => {
            XAxis::Categories((*low..=*high).map(|i| i.to_string()).collect())
        }
        _ => XAxis::Linear,
    };
    let position = |trial: &TrialEntry| {
        let value = trial.values.get(key)?;
        let at = match (distribution, few_integers) {
            (Distribution::Choice(_), _) => choices.iter().position(|c| c == value)? as f64,
            (_, Some(low)) => (value.as_i64()? - low) as f64,
            _ => return value.as_f64(),
        };
        Some(at + jitter(trial.index))
    };
    let mut dots: Vec<Dot> = (record.trials.iter())
        .filter_map(|t| {
            Some(Dot {
                x: position(t)?,
                y: shown(record.search.metric, t.metric?),
                color: color(record, t),
                radius: if record.best == Some(t.index) { 7 } else { 4 },
            })
        })
        .collect();
    // Furthest trials on top.
    dots.sort_by_key(|d| d.radius);
    ScatterChart {
        title: key.to_string(),
        x_label: key.to_string(),
        y_label: y_label(record.search.metric),
        x_axis,
        lines: Vec::new(),
        dots,
        // The colours are told once, in the panel against epochs spent.
        legend: Vec::new(),
    }
}

/// A small sideways offset, fixed per trial, so that the dots of one
/// category do not hide each other.
fn jitter(trial: usize) -> f64 {
    0.3 * (((trial as f64 + 1.0) * 0.618_034).fract() - 0.5)
}

/// Each trial's metric at each rung it reached, placed at the epochs the
/// search had spent when that rung's training ended (the order the search
/// trains in: rung by rung, trials by index), and the best so far.
fn spent_chart(record: &SearchRecord, curves: &[Vec<EpochMetrics>]) -> ScatterChart {
    let metric = record.search.metric;
    let (mut spent, mut dots, mut best_line) = (0usize, Vec::new(), Vec::new());
    let mut best: Option<f64> = None;
    let mut previous = 0;
    for (rung, &epochs) in record.rungs.iter().enumerate() {
        for (trial, rows) in record.trials.iter().zip(curves) {
            if trial.rung < rung || trial.run_dir.is_none() {
                continue;
            }
            spent += epochs.min(trial.epochs).saturating_sub(previous);
            let Some(value) = metric_within(rows, epochs, metric) else {
                continue;
            };
            if metric.score(Some(value)) > metric.score(best) {
                best = Some(value);
            }
            dots.push(Dot {
                x: spent as f64,
                y: shown(metric, value),
                color: rung_color(trial.rung, record.rungs.len()),
                radius: 3,
            });
            best_line.push((spent as f64, shown(metric, best.unwrap_or(value))));
        }
        previous = epochs;
    }
    let mut legend = legend(record);
    legend.retain(|(label, _)| label != "best");
    legend.push(("best so far (line)".into(), BEST));
    ScatterChart {
        title: "against epochs spent".into(),
        x_label: "epochs spent by the search".into(),
        y_label: y_label(metric),
        x_axis: XAxis::Linear,
        lines: vec![(best_line, BEST)],
        dots,
        legend,
    }
}
