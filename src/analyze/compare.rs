//! `mnist-lab compare`: several runs' validation curves in one figure and their
//! figures in one markdown table.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use plotters::prelude::SeriesLabelPosition;

use crate::analyze::Result;
use crate::analyze::inspect::{RUN_COLUMNS, RunInfo};
use crate::analyze::seeds::{self, SeedGroup};
use crate::run::metrics::{EpochMetrics, mean_epoch_secs};
use crate::util::fsio::{FileError, write_atomic};
use crate::util::plots::{self, Chart, PALETTE, Series};
use crate::util::table::{Table, percent};

pub const FIGURE_FILE: &str = "compare.png";
pub const TABLE_FILE: &str = "compare.md";

/// A run with its per-epoch metrics and the label it gets in a figure.
pub struct Curves {
    pub label: String,
    pub run: RunInfo,
    pub metrics: Vec<EpochMetrics>,
}

/// Reads each run's metrics; labels are run names where those are unique among
/// `runs`, else directory names.
pub fn load(runs: Vec<RunInfo>) -> Result<Vec<Curves>> {
    let names: HashSet<&str> = runs.iter().map(|r| r.summary.name.as_str()).collect();
    let unique_names = names.len() == runs.len();
    runs.into_iter()
        .map(|run| {
            let metrics = run.metrics()?;
            let label = if unique_names {
                run.summary.name.clone()
            } else {
                run.id()
            };
            Ok(Curves {
                label,
                run,
                metrics,
            })
        })
        .collect()
}

/// Validation accuracy and validation loss per epoch, one line per run.
pub fn validation_charts(curves: &[Curves]) -> [Chart; 2] {
    // A run trained without a validation split has no line here.
    let series = |value: fn(&EpochMetrics) -> Option<f64>| {
        curves
            .iter()
            .enumerate()
            .map(|(i, c)| Series {
                label: c.label.clone(),
                color: PALETTE[i % PALETTE.len()],
                points: (c.metrics.iter())
                    .filter_map(|m| Some((m.epoch as f64, value(m)?)))
                    .collect(),
                band: Vec::new(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    [
        Chart {
            title: "Validation accuracy".into(),
            y_label: "accuracy (%)".into(),
            series: series(|m| m.val_acc.map(|a| 100.0 * a)),
            legend: SeriesLabelPosition::LowerRight,
            marker: None,
        },
        Chart {
            title: "Validation loss".into(),
            y_label: "cross-entropy loss".into(),
            series: series(|m| m.val_loss),
            legend: SeriesLabelPosition::UpperRight,
            marker: None,
        },
    ]
}

/// One row per run: what it was and how it did, with the last epoch's train and
/// validation accuracy side by side (their gap is the overfitting).
pub fn table(curves: &[Curves]) -> Table {
    let measures = [
        "best epoch",
        "best val",
        "test acc",
        "last train acc",
        "last val acc",
        "s/epoch",
        "wall",
    ];
    let mut table = Table::new(&[&RUN_COLUMNS[..], &measures].concat());
    for c in curves {
        let s = &c.run.summary;
        let last = c.metrics.last();
        let mut cells = c.run.run_cells(c.label.clone());
        cells.extend([
            s.best_epoch.map_or("-".into(), |e| e.to_string()),
            percent(s.best_val_acc),
            percent(s.test_acc),
            percent(last.map(|m| m.train_acc)),
            percent(last.and_then(|m| m.val_acc)),
            mean_epoch_secs(&c.metrics).map_or("-".into(), |t| format!("{t:.2}")),
            format!("{:.0}s", s.wall_secs),
        ]);
        table.push(cells);
    }
    table
}

/// [`write`] for groups of seeds: mean curves in bands, and mean ± std rows.
pub fn write_groups(groups: &[SeedGroup], output_dir: &Path) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(output_dir).map_err(FileError::on("create", output_dir))?;
    let figure = output_dir.join(FIGURE_FILE);
    plots::write_png(&figure, &seeds::group_charts(groups)?)?;
    let table = seeds::groups_table(groups).to_markdown();
    let markdown = format!("![validation curves over seeds]({FIGURE_FILE})\n\n{table}");
    write_atomic(&output_dir.join(TABLE_FILE), markdown.as_bytes())?;
    Ok((figure, table))
}

/// Writes `compare.png` and `compare.md` (`preamble`, then the figure and the
/// table) into `output_dir`; returns the table's markdown.
pub fn write(curves: &[Curves], output_dir: &Path, preamble: &str) -> Result<(PathBuf, String)> {
    std::fs::create_dir_all(output_dir).map_err(FileError::on("create", output_dir))?;
    let figure = output_dir.join(FIGURE_FILE);
    plots::write_png(&figure, &validation_charts(curves))?;
    let markdown = format!(
        "{preamble}![validation curves]({FIGURE_FILE})\n\n{}",
        table(curves).to_markdown()
    );
    write_atomic(&output_dir.join(TABLE_FILE), markdown.as_bytes())?;
    Ok((figure, table(curves).to_markdown()))
}
