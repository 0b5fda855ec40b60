//! The figures of each epoch: one row of `metrics.csv`, one `epoch` event, the
//! TensorBoard scalars and the console line.
//!
//! A new column is one line in the `epoch_metrics!` list below, plus the place
//! that measures it ([`crate::run::experiment`]); the CSV header, the event's
//! fields, the TensorBoard tag, the console line and the reading of older files
//! (which lack it) follow from the list.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::util::telemetry::{CONSOLE_TARGET, RECORD_TARGET};

use crate::run::rundir::RunFileError;
use crate::util::fsio::FileError;

/// Declares [`EpochMetrics`], its event, its TensorBoard scalars and its console
/// line from one list of `field: type, decimals in the event (None: as is),
/// TensorBoard tag (None: not a curve), how the console shows it (None: not)`.
macro_rules! epoch_metrics {
    ($($(#[$doc:meta])* $field:ident: $ty:ty, $decimals:expr, $tag:expr, $console:expr;)*) => {
        /// One row of `metrics.csv`: the figures of one epoch.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        // A column added later reads as 0 from files written before it.
        #[serde(default)]
        pub struct EpochMetrics {
            $($(#[$doc])* pub $field: $ty,)*
        }

        impl EpochMetrics {
            /// The per-epoch `info` event with every column (rounded for
            /// reading) for `events.jsonl`, and one compact line on the console.
            pub fn log(&self, epochs: usize) {
                tracing::info!(
                    target: RECORD_TARGET,
                    $($field = Column::for_log(self.$field, $decimals),)* "epoch"
                );
                tracing::info!(target: CONSOLE_TARGET, "{}", self.console_line(epochs));
            }

            /// Each column that is a TensorBoard curve, as `(tag, value)`;
            /// columns without a value this epoch are left out.
            pub fn board_scalars(&self) -> Vec<(&'static str, f64)> {
                let mut scalars = Vec::new();
                $(
                    let tag: Option<&'static str> = $tag;
                    if let (Some(tag), Some(value)) = (tag, Column::value(self.$field)) {
                        scalars.push((tag, value));
                    }
                )*
                scalars
            }

            /// Each column the console shows, with its value, in list order.
            fn console_columns(&self) -> Vec<(Console, f64)> {
                let mut shown = Vec::new();
                $(
                    let console: Option<Console> = $console;
                    if let (Some(console), Some(value)) = (console, Column::value(self.$field)) {
                        shown.push((console, value));
                    }
                )*
                shown
            }
        }
    };
}

epoch_metrics! {
    /// Counts from 1.
    epoch: usize, None, None, Some(Console::before("epoch", Shown::OfEpochs));
    /// Mean loss over the epoch's training batches (dropout and augmentation on).
    train_loss: f64, Some(5), Some("loss/train"), Some(Console::before("loss", Shown::Fixed(4)));
    train_acc: f64, Some(5), Some("accuracy/train"), Some(Console::before("acc", Shown::Percent));
    /// `None` (an empty cell) when no images are held out (`data.validation_size = 0`).
    val_loss: Option<f64>, Some(5), Some("loss/validation"), Some(Console::before("loss", Shown::Fixed(4)));
    val_acc: Option<f64>, Some(5), Some("accuracy/validation"), Some(Console::before("acc", Shown::Percent));
    /// The learning rate at the start of the epoch.
    lr: f64, None, Some("learning_rate"), Some(Console::before("lr", Shown::Fixed(4)));
    /// Training and validation.
    epoch_secs: f64, Some(3), Some("epoch_secs"), Some(Console::after("s", Shown::Fixed(1)));
    /// Training images per second.
    images_per_sec: f64, Some(0), Some("images_per_sec"), Some(Console::after("img/s", Shown::Count));
}

/// How the console line shows a column: a label before its value or a unit
/// after it. Columns with the same label share it, at the first one's place,
/// their values joined by `/` (`loss 0.0410/0.0380`: training, then validation).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Console {
    label: &'static str,
    unit: &'static str,
    shown: Shown,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shown {
    /// `3/20`, right-aligned to the width of the epoch count.
    OfEpochs,
    Fixed(usize),
    /// A fraction as a percentage with two decimals.
    Percent,
    /// [`short_count`].
    Count,
}

impl Console {
    const fn before(label: &'static str, shown: Shown) -> Console {
        Console {
            label,
            unit: "",
            shown,
        }
    }

    const fn after(unit: &'static str, shown: Shown) -> Console {
        Console {
            label: "",
            unit,
            shown,
        }
    }

    fn value(&self, value: f64, epochs: usize) -> String {
        match self.shown {
            Shown::OfEpochs => {
                let width = epochs.to_string().len();
                format!("{:>width$}/{epochs}", value as usize)
            }
            Shown::Fixed(decimals) => format!("{value:.decimals$}"),
            Shown::Percent => format!("{:.2}%", 100.0 * value),
            Shown::Count => short_count(value),
        }
    }
}

impl EpochMetrics {
    /// `epoch  3/20  loss 0.0410/0.0380  acc 98.71%/98.90%  lr 0.0100  4.1 s  13.4k img/s`:
    /// train/validation pairs, in percents where the rest of the tool shows percents
    /// (the training figure alone when no images are held out).
    pub fn console_line(&self, epochs: usize) -> String {
        let mut parts: Vec<(&str, String)> = Vec::new();
        for (console, value) in self.console_columns() {
            let text = console.value(value, epochs);
            let labelled = !console.label.is_empty();
            match parts
                .iter_mut()
                .find(|(label, _)| labelled && *label == console.label)
            {
                Some((_, shared)) => *shared += &format!("/{text}"),
                None if labelled => {
                    parts.push((console.label, format!("{} {text}", console.label)))
                }
                None => parts.push(("", format!("{text} {}", console.unit))),
            }
        }
        let parts: Vec<String> = parts.into_iter().map(|(_, part)| part).collect();
        parts.join("  ")
    }
}

/// `13.4k`, `950`, `1.2M`: a rate in three significant figures.
pub fn short_count(value: f64) -> String {
    match value {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// A column's value: as the event shows it (floats rounded to some
/// decimals), and as a number for curves and the console.
trait Column: Copy {
    fn for_log(self, decimals: Option<i32>) -> Self;
    fn value(self) -> Option<f64>;
}

impl Column for usize {
    fn for_log(self, _decimals: Option<i32>) -> usize {
        self
    }

    fn value(self) -> Option<f64> {
        Some(self as f64)
    }
}

impl Column for f64 {
    fn for_log(self, decimals: Option<i32>) -> f64 {
        decimals.map_or(self, |d| round(self, d))
    }

    fn value(self) -> Option<f64> {
        Some(self)
    }
}

impl Column for Option<f64> {
    fn for_log(self, decimals: Option<i32>) -> Option<f64> {
        self.map(|v| v.for_log(decimals))
    }

    fn value(self) -> Option<f64> {
        self
    }
}

/// `value` rounded to `decimals` places.
pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// `metrics.csv` content: the header (the field names) and one row per epoch.
pub fn metrics_csv(rows: &[EpochMetrics]) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let header_only = [EpochMetrics::default()];
    let serialized = if rows.is_empty() { &header_only } else { rows };
    for row in serialized {
        writer
            .serialize(row)
            .expect("a metrics row serializes to CSV");
    }
    let mut bytes = writer.into_inner().expect("writing to memory cannot fail");
    if rows.is_empty() {
        let header_end = bytes.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(header_end);
    }
    bytes
}

/// Reads a run's `metrics.csv`.
pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>, RunFileError> {
    let malformed = |reason: String| RunFileError::Malformed {
        path: path.to_path_buf(),
        what: "metrics.csv",
        reason,
    };
    let text = std::fs::read(path).map_err(FileError::on("read", path))?;
    csv::Reader::from_reader(text.as_slice())
        .deserialize()
        .collect::<Result<Vec<EpochMetrics>, _>>()
        .map_err(|e| malformed(e.to_string()))
}

/// Mean seconds per epoch (training and validation); `None` before the first epoch.
pub fn mean_epoch_secs(metrics: &[EpochMetrics]) -> Option<f64> {
    if metrics.is_empty() {
        return None;
    }
    Some(metrics.iter().map(|m| m.epoch_secs).sum::<f64>() / metrics.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_secs,images_per_sec";

    #[test]
    fn metrics_round_trip_with_the_documented_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        std::fs::write(&path, metrics_csv(&[])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{HEADER}\n")
        );
        assert_eq!(read_metrics(&path).unwrap(), vec![]);
        let row = EpochMetrics {
            epoch: 1,
            train_loss: 0.5,
            train_acc: 0.8,
            val_loss: Some(0.4),
            val_acc: Some(0.85),
            lr: 0.01,
            epoch_secs: 2.0,
            images_per_sec: 1000.0,
        };
        std::fs::write(&path, metrics_csv(std::slice::from_ref(&row))).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&format!("{HEADER}\n")), "{text}");
        assert_eq!(read_metrics(&path).unwrap(), vec![row.clone()]);
        // Without a validation split the validation cells are empty.
        let unvalidated = EpochMetrics {
            val_loss: None,
            val_acc: None,
            ..row
        };
        std::fs::write(&path, metrics_csv(std::slice::from_ref(&unvalidated))).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("\n1,0.5,0.8,,,0.01,2.0,1000.0\n"), "{text}");
        assert_eq!(read_metrics(&path).unwrap(), vec![unvalidated.clone()]);
        assert!(
            unvalidated
                .console_line(20)
                .contains("loss 0.5000  acc 80.00%  lr"),
            "{}",
            unvalidated.console_line(20)
        );
    }

    /// Every column reaches the console line, and every curve TensorBoard,
    /// from the one list.
    #[test]
    fn the_console_line_and_the_curves_come_from_the_list() {
        let row = EpochMetrics {
            epoch: 3,
            train_loss: 0.041,
            train_acc: 0.9871,
            val_loss: Some(0.038),
            val_acc: Some(0.989),
            lr: 0.01,
            epoch_secs: 4.08,
            images_per_sec: 13_412.0,
        };
        assert_eq!(
            row.console_line(20),
            "epoch  3/20  loss 0.0410/0.0380  acc 98.71%/98.90%  lr 0.0100  4.1 s  13.4k img/s"
        );
        let tags: Vec<&str> = row.board_scalars().iter().map(|(tag, _)| *tag).collect();
        assert_eq!(
            tags,
            [
                "loss/train",
                "accuracy/train",
                "loss/validation",
                "accuracy/validation",
                "learning_rate",
                "epoch_secs",
                "images_per_sec"
            ]
        );
        let unvalidated = EpochMetrics {
            val_loss: None,
            ..row
        };
        assert_eq!(unvalidated.board_scalars().len(), 6);
    }

    #[test]
    fn files_without_a_later_column_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        std::fs::write(&path, "epoch,train_loss,val_acc\n3,0.25,0.5\n").unwrap();
        let rows = read_metrics(&path).unwrap();
        assert_eq!(
            (rows[0].epoch, rows[0].train_loss, rows[0].val_acc),
            (3, 0.25, Some(0.5))
        );
        assert_eq!(rows[0].images_per_sec, 0.0);
        std::fs::write(&path, "epoch,val_acc\nthree,0.5\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.csv"), "{err}");
    }
}
