//! Reading finished (or running) runs back from disk: `mnist-lab runs` lists them,
//! and `compare`, `eval` and `report` start from what this module finds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::analyze::{AnalyzeError, Result};
use crate::config::Config;
use crate::run::metrics::{self, EpochMetrics};
use crate::run::rundir::{self, Summary};
use crate::util::fsio::FileError;
use crate::util::table::{Table, compact, percent, thousands};

/// A run directory as read back: its summary, and its config where it parses.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub dir: PathBuf,
    pub summary: Summary,
    pub config: Option<Config>,
    /// The hyperparameters the run recorded, over those its saved config gives
    /// (so keys newer than the run read as their defaults).
    pub hparams: BTreeMap<String, serde_json::Value>,
}

impl RunInfo {
    /// Reads `dir`, which must hold a `summary.json`.
    pub fn read(dir: &Path) -> Result<RunInfo> {
        if !dir.is_dir() {
            return Err(AnalyzeError::NoRun(dir.to_path_buf()));
        }
        let summary_path = dir.join(rundir::SUMMARY_FILE);
        if !summary_path.is_file() {
            return Err(AnalyzeError::NotARun(dir.to_path_buf()));
        }
        let mut summary = rundir::read_summary(&summary_path)?;
        // A run whose process is gone is shown as what it is.
        summary.status = summary.effective_status(dir);
        let config = Config::load(&dir.join(rundir::CONFIG_FILE), &[]).ok();
        let mut hparams = config
            .as_ref()
            .map(Config::hyperparameters)
            .unwrap_or_default();
        hparams.extend(summary.hparams.clone());
        Ok(RunInfo {
            dir: dir.to_path_buf(),
            summary,
            config,
            hparams,
        })
    }

    /// The directory's own name, which is unique: `<name>-<time>`.
    pub fn id(&self) -> String {
        self.dir.file_name().map_or_else(
            || self.dir.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    }

    pub fn metrics(&self) -> Result<Vec<EpochMetrics>> {
        Ok(metrics::read_metrics(&self.dir.join(rundir::METRICS_FILE))?)
    }

    /// What fights overfitting in this run, e.g. `BN + L2 5e-4 + shift 2`.
    pub fn regularisation(&self) -> String {
        self.config
            .as_ref()
            .map_or_else(|| "?".into(), regularisation)
    }
}

/// A short description of a config's regularisation; `none` when it has none.
pub fn regularisation(config: &Config) -> String {
    let mut parts = Vec::new();
    if config.model.batch_norm {
        parts.push("BN".to_string());
    }
    let decay = config.optimizer.weight_decay;
    if decay > 0.0 {
        let label = if config.optimizer.kind.decouples_weight_decay() {
            "decay"
        } else {
            "L2"
        };
        parts.push(format!("{label} {decay:e}"));
    }
    if config.model.dropout > 0.0 {
        parts.push(format!("dropout {}", compact(config.model.dropout)));
    }
    if config.data.augment_shift > 0 {
        parts.push(format!("shift {}", config.data.augment_shift));
    }
    if config.data.augment_rotate > 0.0 {
        parts.push(format!("rotate {}", compact(config.data.augment_rotate)));
    }
    if config.data.augment_scale > 0.0 {
        parts.push(format!("scale {}", compact(config.data.augment_scale)));
    }
    if config.train.label_smoothing > 0.0 {
        parts.push(format!(
            "smoothing {}",
            compact(config.train.label_smoothing)
        ));
    }
    if config.train.ema_decay > 0.0 {
        parts.push(format!("EMA {}", compact(config.train.ema_decay)));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" + ")
    }
}

/// Every run directory directly under `runs_dir` (or `runs_dir` itself, if it is
/// one), oldest first, and a warning for each folder that looks like a run but
/// cannot be read.
pub fn scan(runs_dir: &Path) -> Result<(Vec<RunInfo>, Vec<String>)> {
    if is_run(runs_dir) {
        return Ok((vec![RunInfo::read(runs_dir)?], Vec::new()));
    }
    let (mut runs, mut warnings) = (Vec::new(), Vec::new());
    for dir in folders(runs_dir, is_run)? {
        match RunInfo::read(&dir) {
            Ok(run) => runs.push(run),
            Err(error) => warnings.push(format!("skipping {}: {error:#}", dir.display())),
        }
    }
    runs.sort_by(|a, b| a.summary.started_at.cmp(&b.summary.started_at));
    Ok((runs, warnings))
}

/// Whether `dir` is a run directory (it holds a summary).
fn is_run(dir: &Path) -> bool {
    dir.join(rundir::SUMMARY_FILE).is_file()
}

/// The entries of `runs_dir` that `keep`, sorted by path.
fn folders(runs_dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(runs_dir).map_err(FileError::on("read runs directory", runs_dir))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| keep(p))
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// [`scan`] of `runs_dir` and of each folder in it that is not a run itself
/// (`runs/seeds/`, a sweep's `--runs-dir`), skipping what cannot be read.
pub fn scan_nested(runs_dir: &Path) -> Result<Vec<RunInfo>> {
    let (mut runs, _) = scan(runs_dir)?;
    for folder in folders(runs_dir, |p| p.is_dir() && !is_run(p))? {
        if let Ok((nested, _)) = scan(&folder) {
            runs.extend(nested);
        }
    }
    runs.sort_by(|a, b| a.summary.started_at.cmp(&b.summary.started_at));
    Ok(runs)
}

/// What `mnist-lab runs --sort` orders by: a column of the table, or any
/// config key (`optimizer.lr`), numbers by value.
#[derive(Debug, Clone, PartialEq)]
pub enum Sort {
    Column(SortKey),
    Config(String),
}

impl std::str::FromStr for Sort {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        use clap::ValueEnum;
        match SortKey::from_str(text, true) {
            Ok(key) => Ok(Sort::Column(key)),
            Err(_) if text.contains('.') => Ok(Sort::Config(text.to_string())),
            Err(_) => Err(format!(
                "expected one of started, name, model, params, epochs, val, test, wall, \
                 status, or a config key such as optimizer.lr; got {text:?}"
            )),
        }
    }
}

/// Checks a key that `runs --filter/--columns/--sort` reads from each run:
/// `status`, `model`, or a config key (`optimizer.lr`). An unknown one is an
/// error naming the keys its section knows.
pub fn check_run_key(key: &str) -> Result<(), String> {
    if matches!(key, "status" | "model") {
        return Ok(());
    }
    // The config's own parser knows its keys: set this one on a default config.
    let probe = crate::config::Override {
        key: key.to_string(),
        value: toml::Value::Integer(0),
    };
    let origin = Path::new("(default config)");
    match crate::config::Config::from_toml("", origin, Some("probe"), &[probe]) {
        Err(crate::config::ConfigError::Override { message, .. })
            if message.contains("unknown field") =>
        {
            Err(format!(
                "unknown key {key:?}: {message} (besides config keys: status, model)"
            ))
        }
        Err(crate::config::ConfigError::Override { message, .. })
            if message.contains("expected struct") =>
        {
            Err(format!(
                "{key:?} is a section of the config: name one of its keys ({key}.<key>)"
            ))
        }
        _ => Ok(()),
    }
}

/// `--filter KEY=VALUE`: keeps the runs whose config has that value (`status`
/// and `model` may be filtered too).
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub key: String,
    pub value: serde_json::Value,
}

impl std::str::FromStr for Filter {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE (e.g. model.kind=lenet5), got {text:?}"))?;
        let value = serde_json::to_value(crate::config::parse_value(value))
            .map_err(|e| format!("{text}: {e}"))?;
        Ok(Filter {
            key: key.trim().to_string(),
            value,
        })
    }
}

impl RunInfo {
    /// The value of a config key in this run (`status` and `model` too).
    pub fn value_of(&self, key: &str) -> Option<serde_json::Value> {
        match key {
            "status" => Some(self.summary.status.to_string().into()),
            "model" => Some(self.summary.model.clone().into()),
            _ => self.hparams.get(key).cloned(),
        }
    }
}

/// Keeps the runs that match every filter; numbers compare by value (`0.01` = `1e-2`).
pub fn filter(runs: &mut Vec<RunInfo>, filters: &[Filter]) {
    let same = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    };
    runs.retain(|run| {
        filters
            .iter()
            .all(|f| run.value_of(&f.key).is_some_and(|v| same(&v, &f.value)))
    });
}

/// The columns `mnist-lab runs --sort` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Start time (the default).
    Started,
    Name,
    Model,
    Params,
    Epochs,
    /// Best validation accuracy, best first.
    Val,
    /// Test accuracy, best first.
    Test,
    Wall,
    Status,
}

/// Sorts in place; accuracies go best first, everything else ascending; runs
/// without the config key go last.
pub fn sort(runs: &mut [RunInfo], sort: &Sort) {
    let key = match sort {
        Sort::Column(key) => *key,
        Sort::Config(key) => {
            let order = |v: &Option<serde_json::Value>| match v {
                Some(serde_json::Value::Number(n)) => (0, n.as_f64().unwrap_or(0.0), String::new()),
                Some(other) => (1, 0.0, other.to_string()),
                None => (2, 0.0, String::new()),
            };
            runs.sort_by(|a, b| {
                let (a, b) = (order(&a.value_of(key)), order(&b.value_of(key)));
                (a.0, a.2.clone())
                    .cmp(&(b.0, b.2.clone()))
                    .then(a.1.total_cmp(&b.1))
            });
            return;
        }
    };
    let accuracy = |v: Option<f64>| std::cmp::Reverse(v.map(|a| (a * 1e9) as i64));
    match key {
        SortKey::Started => runs.sort_by(|a, b| a.summary.started_at.cmp(&b.summary.started_at)),
        SortKey::Name => runs.sort_by_key(|r| r.id()),
        SortKey::Model => runs.sort_by_key(|r| r.summary.model.clone()),
        SortKey::Params => runs.sort_by_key(|r| r.summary.params),
        SortKey::Epochs => runs.sort_by_key(|r| r.summary.epochs_completed),
        SortKey::Val => runs.sort_by_key(|r| accuracy(r.summary.best_val_acc)),
        SortKey::Test => runs.sort_by_key(|r| accuracy(r.summary.test_acc)),
        SortKey::Wall => runs.sort_by(|a, b| a.summary.wall_secs.total_cmp(&b.summary.wall_secs)),
        SortKey::Status => runs.sort_by_key(|r| r.summary.status.to_string()),
    }
}

/// The columns that say which run a row is, first in every table of runs.
pub const RUN_COLUMNS: [&str; 5] = ["run", "model", "regularisation", "params", "epochs"];

impl RunInfo {
    /// The [`RUN_COLUMNS`] cells of this run, labelled `label`.
    pub fn run_cells(&self, label: String) -> Vec<String> {
        let s = &self.summary;
        vec![
            label,
            s.model.clone(),
            self.regularisation(),
            thousands(s.params),
            format!("{}/{}", s.epochs_completed, s.epochs),
        ]
    }
}

/// The listing's table: one row per run, with a column for each of `extra`
/// (config keys) before the figures.
pub fn runs_table(runs: &[RunInfo], extra: &[String]) -> Table {
    let extra_headers: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut table = Table::new(
        &[
            &RUN_COLUMNS[..],
            &extra_headers,
            &["best val", "test acc", "wall", "status"],
        ]
        .concat(),
    );
    for run in runs {
        let s = &run.summary;
        let mut cells = run.run_cells(run.id());
        cells.extend(extra.iter().map(|key| match run.value_of(key) {
            Some(serde_json::Value::String(text)) => text,
            Some(value) => value.to_string(),
            None => "-".into(),
        }));
        cells.extend([
            percent(s.best_val_acc),
            percent(s.test_acc),
            format!("{:.0}s", s.wall_secs),
            s.status.to_string(),
        ]);
        table.push(cells);
    }
    table
}

/// One run in `mnist-lab runs --json`.
#[derive(Debug, Serialize)]
pub struct RunRow<'a> {
    pub dir: &'a Path,
    pub regularisation: String,
    #[serde(flatten)]
    pub summary: &'a Summary,
}

pub fn runs_json(runs: &[RunInfo]) -> String {
    let rows: Vec<RunRow> = runs
        .iter()
        .map(|r| RunRow {
            dir: &r.dir,
            regularisation: r.regularisation(),
            summary: &r.summary,
        })
        .collect();
    serde_json::to_string_pretty(&rows).expect("run rows serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Override;

    fn config(overrides: &[&str]) -> Config {
        let overrides: Vec<Override> = overrides.iter().map(|o| o.parse().unwrap()).collect();
        Config::from_toml("", Path::new("t.toml"), Some("t"), &overrides).unwrap()
    }

    #[test]
    fn describes_regularisation() {
        assert_eq!(regularisation(&config(&[])), "none");
        assert_eq!(
            regularisation(&config(&[
                "model.batch_norm=true",
                "optimizer.weight_decay=5e-4",
                "data.augment_shift=2"
            ])),
            "BN + L2 5e-4 + shift 2"
        );
        assert_eq!(
            regularisation(&config(&[
                "optimizer.kind=adamw",
                "optimizer.weight_decay=0.01",
                "model.dropout=0.1"
            ])),
            "decay 1e-2 + dropout 0.1"
        );
    }

    #[test]
    fn reading_a_folder_that_is_not_a_run_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunInfo::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a run directory"), "{err}");
        let err = RunInfo::read(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such run directory"), "{err}");
        let (runs, warnings) = scan(dir.path()).unwrap();
        assert!(runs.is_empty() && warnings.is_empty());
    }
}
