//! Seeds as an axis: runs that differ only by their seed are one experiment
//! measured several times, shown as mean, spread and n.

use std::collections::BTreeMap;

use plotters::prelude::{RGBColor, SeriesLabelPosition};

use crate::analyze::Result;
use crate::analyze::inspect::RunInfo;
use crate::run::metrics::EpochMetrics;
use crate::run::rundir::{Status, Summary};
use crate::util::plots::{Chart, PALETTE, Series};
use crate::util::table::Table;

/// A run's hyperparameters as dotted keys to values.
pub type Hparams = BTreeMap<String, serde_json::Value>;

/// Runs that differ only by their seed: one experiment, measured several times.
pub struct SeedGroup<'a> {
    /// The runs' name without its `seed_N` part.
    pub label: String,
    /// What this experiment changes against the first group of the same label
    /// (`key = value`; empty for that first group): what tells apart the rows
    /// of a sweep whose names do not say it.
    pub changes: Vec<String>,
    pub runs: Vec<&'a RunInfo>,
}

impl SeedGroup<'_> {
    /// The label, followed by the changes if any: `custom_mlp_best (optimizer.nesterov = true)`.
    pub fn title(&self) -> String {
        if self.changes.is_empty() {
            self.label.clone()
        } else {
            format!("{} ({})", self.label, self.changes.join(", "))
        }
    }
}

/// What makes a run's experiment: its hyperparameters but the seed and the
/// evaluation batch (which changes no result).
pub fn experiment(run: &RunInfo) -> Hparams {
    let mut hparams = run.hparams.clone();
    hparams.remove("seed");
    hparams.remove("train.eval_batch_size");
    hparams
}

/// `key = value` for each key whose value in `variant` differs from `base`'s.
pub fn changes(base: &Hparams, variant: &Hparams) -> Vec<String> {
    let mut keys: Vec<&String> = base.keys().chain(variant.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| base.get(*k) != variant.get(*k))
        .map(|key| {
            let value = variant
                .get(key)
                .map_or("unset".to_string(), |v| v.to_string());
            format!("{key} = {}", value.trim_matches('"'))
        })
        .collect()
}

/// Groups completed runs whose experiment (see [`experiment`]) is equal, in
/// order of first appearance.
pub fn seed_groups(runs: &[RunInfo]) -> Vec<SeedGroup<'_>> {
    let mut groups: Vec<(Hparams, SeedGroup)> = Vec::new();
    for run in runs
        .iter()
        .filter(|r| r.summary.status == Status::Completed)
    {
        let key = experiment(run);
        if let Some((_, group)) = groups.iter_mut().find(|(k, _)| *k == key) {
            group.runs.push(run);
            continue;
        }
        let label = without_seed(&run.summary.name);
        let changes = groups
            .iter()
            .find(|(_, g)| g.label == label)
            .map(|(first, _)| changes(first, &key))
            .unwrap_or_default();
        groups.push((
            key,
            SeedGroup {
                label,
                changes,
                runs: vec![run],
            },
        ));
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// `lenet5_best-seed_2` -> `lenet5_best`: the sweep's name part for a seed dropped.
fn without_seed(name: &str) -> String {
    let parts: Vec<&str> = name
        .split('-')
        .filter(|p| !p.starts_with("seed_"))
        .collect();
    parts.join("-")
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, variance.sqrt())
}

/// `99.12% ± 0.05`: a mean accuracy and its spread in percentage points.
pub fn percent_spread(values: &[f64]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let (mean, std) = mean_std(values);
    format!("{:.2}% ± {:.2}", 100.0 * mean, 100.0 * std)
}

/// Validation accuracy and loss per epoch, one line per group: the mean over its
/// seeds, in a band of one standard deviation either side.
pub fn group_charts(groups: &[SeedGroup]) -> Result<[Chart; 2]> {
    let mut histories = Vec::new();
    for group in groups {
        let runs: Vec<Vec<EpochMetrics>> = group
            .runs
            .iter()
            .map(|r| r.metrics())
            .collect::<Result<_>>()?;
        histories.push(runs);
    }
    // A group trained without a validation split has no curve here.
    let series = |value: fn(&EpochMetrics) -> Option<f64>| -> Vec<Series> {
        (groups.iter().zip(&histories).enumerate())
            .map(|(i, (group, runs))| spread_series(group, runs, PALETTE[i % PALETTE.len()], value))
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    Ok([
        Chart {
            title: "Validation accuracy over seeds".into(),
            y_label: "accuracy (%)".into(),
            series: series(|m| m.val_acc.map(|a| 100.0 * a)),
            legend: SeriesLabelPosition::LowerRight,
            marker: None,
        },
        Chart {
            title: "Validation loss over seeds".into(),
            y_label: "cross-entropy loss".into(),
            series: series(|m| m.val_loss),
            legend: SeriesLabelPosition::UpperRight,
            marker: None,
        },
    ])
}

/// One group's mean curve and its band, over the epochs every run completed.
fn spread_series(
    group: &SeedGroup,
    runs: &[Vec<EpochMetrics>],
    color: RGBColor,
    value: fn(&EpochMetrics) -> Option<f64>,
) -> Series {
    let epochs = runs.iter().map(Vec::len).min().unwrap_or(0);
    let (mut points, mut band) = (Vec::new(), Vec::new());
    for e in 0..epochs {
        let values: Option<Vec<f64>> = runs.iter().map(|run| value(&run[e])).collect();
        let Some(values) = values else { continue };
        let (mean, std) = mean_std(&values);
        let x = runs[0][e].epoch as f64;
        points.push((x, mean));
        band.push((x, mean - std, mean + std));
    }
    Series {
        label: format!("{} (n={})", group.title(), runs.len()),
        color,
        points,
        band,
    }
}

/// `mnist-lab runs --group`: one row per group of runs that differ only by seed.
pub fn groups_table(groups: &[SeedGroup]) -> Table {
    let mut table = Table::new(&[
        "experiment",
        "model",
        "regularisation",
        "n",
        "seeds",
        "best val",
        "test acc",
        "wall",
    ]);
    for group in groups {
        let first = group.runs[0];
        let collect = |f: fn(&Summary) -> Option<f64>| -> Vec<f64> {
            group.runs.iter().filter_map(|r| f(&r.summary)).collect()
        };
        let seeds: Vec<String> = group
            .runs
            .iter()
            .map(|r| r.summary.seed.to_string())
            .collect();
        let walls: Vec<f64> = group.runs.iter().map(|r| r.summary.wall_secs).collect();
        table.push(vec![
            group.title(),
            first.summary.model.clone(),
            first.regularisation(),
            group.runs.len().to_string(),
            seeds.join(","),
            percent_spread(&collect(|s| s.best_val_acc)),
            percent_spread(&collect(|s| s.test_acc)),
            format!("{:.0}s", mean_std(&walls).0),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_the_sample_standard_deviation() {
        let (mean, std) = mean_std(&[0.99, 0.992, 0.994]);
        assert!((mean - 0.992).abs() < 1e-12 && (std - 0.002).abs() < 1e-12);
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
        assert_eq!(percent_spread(&[0.99, 0.992, 0.994]), "99.20% ± 0.20");
        assert_eq!(without_seed("lenet5_best-seed_2"), "lenet5_best");
        assert_eq!(without_seed("g-lr_0.1-seed_0"), "g-lr_0.1");
    }

    #[test]
    fn changes_name_each_key_that_differs() {
        use serde_json::json;
        let base: Hparams = [("a".to_string(), json!(1)), ("b".to_string(), json!("x"))]
            .into_iter()
            .collect();
        let mut one = base.clone();
        one.insert("b".into(), json!("y"));
        assert_eq!(changes(&base, &one), ["b = y"]);
        let mut two = one.clone();
        two.insert("a".into(), json!(2));
        two.insert("c".into(), json!(true));
        assert_eq!(changes(&base, &two), ["a = 2", "b = y", "c = true"]);
        assert_eq!(changes(&two, &base), ["a = 1", "b = x", "c = unset"]);
        assert!(changes(&base, &base).is_empty());
    }
}
