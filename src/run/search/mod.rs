//! Search: trials sampled from a config's `[search]` space, each a normal run
//! directory in the search's folder, scheduled at random (every trial to the
//! full epochs) or by successive halving (ASHA's rungs, decided rung by rung):
//! every trial trains to the first rung, the best 1 in `reduction` are
//! extended to the next with `resume --set train.epochs=...`, the others are
//! recorded as `pruned`, and so on up to `train.epochs`.
//!
//! Decisions are made from the trials' `metrics.csv` on disk, so a search
//! stopped at any point and continued (`search --resume DIR`) trains no
//! completed rung again and decides as it would have. With `--shard I/N` each
//! shard runs the trials whose index is I modulo N, as a bracket of its own:
//! shards never wait on each other.

use std::path::{Path, PathBuf};

use crate::config::search::{Metric, SearchConfig};
use crate::config::{Config, ConfigError, Override};
use crate::run::RunError;
use crate::run::experiment::{self, ResumeOptions};
use crate::run::metrics::{EpochMetrics, read_metrics};
use crate::run::rundir::{self, Status};
use crate::run::sweep::Shard;
use crate::util::fsio::FileError;
use crate::util::interrupt;

pub mod figure;
mod record;

/// The trials' table, beside the record.
pub const TABLE_FILE: &str = "search.md";

pub use record::{RECORD_FILE, SearchRecord, TrialEntry, TrialStatus, find_records, value_label};

/// One trial: its values and the config it trains with (at `train.epochs`).
#[derive(Debug, Clone)]
pub struct Trial {
    pub index: usize,
    pub values: Vec<(String, toml::Value)>,
    pub config: Config,
}

/// A search expanded: its settings, rungs and trials.
#[derive(Debug, Clone)]
pub struct SearchPlan {
    pub name: String,
    pub search: SearchConfig,
    /// Epochs of each rung, the last `train.epochs`.
    pub rungs: Vec<usize>,
    pub trials: Vec<Trial>,
}

/// Expands `config` (with a `[search]` table; `text` is its source, `origin`
/// names it in errors) into its trials, each validated with its values.
pub fn plan(config: &Config, text: &str, origin: &Path) -> Result<SearchPlan, ConfigError> {
    let search = config.search.clone().ok_or_else(|| ConfigError::Invalid {
        path: origin.to_path_buf(),
        message: "no [search] table: give one in the config or with --space FILE".into(),
    })?;
    let mut trials = Vec::new();
    for (index, values) in search.sample_trials().into_iter().enumerate() {
        let overrides: Vec<Override> = (values.iter())
            .map(|(key, value)| Override {
                key: key.clone(),
                value: value.clone(),
            })
            .collect();
        let mut trial = Config::from_toml(text, origin, Some(&config.name), &overrides)
            .map_err(|e| blame_space(e, origin, index))?;
        trial.search = None;
        trial.name = format!("{}-t{index:03}", config.name);
        trials.push(Trial {
            index,
            values,
            config: trial,
        });
    }
    Ok(SearchPlan {
        name: config.name.clone(),
        rungs: search.rungs(config.train.epochs),
        search,
        trials,
    })
}

/// A sampled value the config refuses names the trial and the space.
fn blame_space(error: ConfigError, origin: &Path, index: usize) -> ConfigError {
    match error {
        ConfigError::Override {
            assignment,
            message,
        } => ConfigError::Invalid {
            path: origin.to_path_buf(),
            message: format!("[search.space] trial {index} draws {assignment}: {message}"),
        },
        other => other,
    }
}

/// What became of a search's trials this time.
#[derive(Debug, Default)]
pub struct SearchTally {
    /// Trials that failed or diverged.
    pub failed: usize,
}

/// Runs the trials of `record` (this shard's) rung by rung in `dir`, keeping
/// `record` current at `dir/search.json`. The caller holds `dir`'s lock.
pub fn execute(
    plan: &SearchPlan,
    record: &mut SearchRecord,
    dir: &Path,
) -> Result<SearchTally, RunError> {
    let path = dir.join(RECORD_FILE);
    // Every status is decided anew from the trials' files.
    for entry in &mut record.trials {
        entry.status = TrialStatus::Pending;
    }
    record.write(&path)?;
    let mut alive: Vec<usize> = (0..record.trials.len()).collect();
    for (rung, &epochs) in plan.rungs.iter().enumerate() {
        for &position in &alive {
            if interrupt::stop_requested().is_some() {
                return Ok(tally(record));
            }
            let trial = &plan.trials[record.trials[position].index];
            train_to(trial, &mut record.trials[position], epochs, dir)?;
            let entry = &mut record.trials[position];
            entry.rung = rung;
            entry.metric = match entry.run_dir.as_deref() {
                Some(run) if entry.status != TrialStatus::Failed => {
                    metric_at(run, epochs, plan.search.metric)
                }
                _ => None,
            };
            record.write(&path)?;
        }
        // A rung is decided only once every trial of it has trained.
        if interrupt::stop_requested().is_some() {
            return Ok(tally(record));
        }
        alive.retain(|&p| record.trials[p].metric.is_some());
        if rung + 1 == plan.rungs.len() {
            for &p in &alive {
                record.trials[p].status = TrialStatus::Completed;
            }
            break;
        }
        let promoted = promote(
            &record.trials,
            &alive,
            plan.search.reduction,
            plan.search.metric,
        );
        for &p in &alive {
            if !promoted.contains(&p) {
                record.trials[p].status = TrialStatus::Pruned;
            }
        }
        record.note_rung(rung, epochs, &alive, &promoted);
        record.write(&path)?;
        alive = promoted;
    }
    record.finish();
    record.write(&path)?;
    Ok(tally(record))
}

fn tally(record: &SearchRecord) -> SearchTally {
    SearchTally {
        failed: (record.trials.iter())
            .filter(|t| t.status == TrialStatus::Failed)
            .count(),
    }
}

/// The best `1 / reduction` of the trials at `alive` (at least one), best
/// first; ties go to the lower index, so the same metrics give the same choice.
fn promote(trials: &[TrialEntry], alive: &[usize], reduction: usize, metric: Metric) -> Vec<usize> {
    let mut ranked = alive.to_vec();
    let score = |p: &usize| metric.score(trials[*p].metric);
    ranked.sort_by(|a, b| {
        score(b)
            .total_cmp(&score(a))
            .then(trials[*a].index.cmp(&trials[*b].index))
    });
    ranked.truncate((alive.len() / reduction).max(1));
    ranked
}

/// The metric of a run over its first `epochs` epochs: the best validation
/// accuracy, or the lowest validation loss.
pub fn metric_at(run: &Path, epochs: usize, metric: Metric) -> Option<f64> {
    let rows = read_metrics(&run.join(rundir::METRICS_FILE)).ok()?;
    metric_within(&rows, epochs, metric)
}

/// The metric over the first `epochs` of a run's metrics rows.
pub fn metric_within(rows: &[EpochMetrics], epochs: usize, metric: Metric) -> Option<f64> {
    let within = rows.iter().filter(|m| m.epoch <= epochs);
    match metric {
        Metric::ValAcc => within.filter_map(|m| m.val_acc).reduce(f64::max),
        Metric::ValLoss => within.filter_map(|m| m.val_loss).reduce(f64::min),
    }
}

/// Brings `entry`'s trial to `epochs` epochs: nothing where its run already
/// has them, `resume --set train.epochs=...` where it has fewer (or stopped),
/// a new run where it has none. A failed trial is recorded and left.
fn train_to(
    trial: &Trial,
    entry: &mut TrialEntry,
    epochs: usize,
    dir: &Path,
) -> Result<(), RunError> {
    if entry.run_dir.as_deref().is_none_or(|d| !d.is_dir()) {
        entry.run_dir = find_trial_dir(dir, &trial.config.name);
    }
    let outcome = match entry.run_dir.clone() {
        Some(run) => {
            let summary = rundir::read_summary(&run.join(rundir::SUMMARY_FILE))?;
            let done = summary.epochs_completed >= epochs && summary.status == Status::Completed;
            if done || summary.status == Status::Diverged {
                entry.note(&summary);
                return Ok(());
            }
            entry.status = TrialStatus::Running;
            let options = ResumeOptions {
                overrides: vec![Override {
                    key: "train.epochs".into(),
                    value: toml::Value::Integer(epochs as i64),
                }],
                force: false,
            };
            experiment::resume(&run, &options)
        }
        None => {
            let mut config = trial.config.clone();
            config.train.epochs = epochs;
            entry.status = TrialStatus::Running;
            experiment::run(&config, dir)
        }
    };
    match outcome {
        Ok(outcome) => {
            entry.run_dir = Some(outcome.dir);
            entry.note(&outcome.summary);
        }
        Err(error) if error.interruption().is_some() => entry.status = TrialStatus::Interrupted,
        Err(error) => {
            entry.status = TrialStatus::Failed;
            entry.error = Some(error.to_string());
            tracing::error!(trial = %trial.config.name, %error, "trial failed; going on with the next");
        }
    }
    Ok(())
}

/// The latest run directory in `dir` of the trial named `name` (a search
/// killed before it recorded the directory finds it this way).
fn find_trial_dir(dir: &Path, name: &str) -> Option<PathBuf> {
    let prefix = format!("{name}-");
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(&prefix))
        })
        .filter_map(|p| {
            let summary = rundir::read_summary(&p.join(rundir::SUMMARY_FILE)).ok()?;
            (summary.name == name).then_some((summary.started_at, p))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// The readable files beside a search's record: `search.md` (its overview,
/// figure and every trial's row) and `search.png` (see [`figure`]).
pub fn write_readable(record: &SearchRecord, dir: &Path) -> Result<(), RunError> {
    figure::write(record, dir, &dir.join(figure::FIGURE_FILE))?;
    let markdown = format!(
        "{}\n![{} search]({})\n\n{}",
        record.overview_markdown(),
        record.name,
        figure::FIGURE_FILE,
        record.table().to_markdown()
    );
    crate::util::fsio::write_atomic(&dir.join(TABLE_FILE), markdown.as_bytes())?;
    Ok(())
}

/// The record for `plan`'s trials that `shard` runs (all without one).
pub fn new_record(plan: &SearchPlan, config_text: &str, shard: Option<Shard>) -> SearchRecord {
    let trials = (plan.trials.iter())
        .filter(|t| shard.is_none_or(|s| s.owns(t.index)))
        .map(TrialEntry::pending)
        .collect();
    SearchRecord::new(plan, config_text, shard, trials)
}

/// Creates `<runs_dir>/search-<name>[-shardIofN]-<time>/`.
pub fn create_dir(runs_dir: &Path, name: &str, shard: Option<Shard>) -> Result<PathBuf, FileError> {
    crate::run::sweep::create_folder(runs_dir, "search", name, shard)
}
