//! `sweep.json`, the record of a sweep, and running a sweep's runs in turn.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::run::rundir::Status;
use crate::run::sweep::{PlannedRun, Shard, SweepError};
use crate::run::{RunError, experiment};
use crate::util::fsio::{FileError, create_unique_dir, read_text, write_atomic};
use crate::util::interrupt;
use crate::util::table::{Table, percent};

pub const RECORD_FILE: &str = "sweep.json";

/// `sweep.json`: the expanded runs and what became of each, rewritten after every
/// run so it can be read while the sweep goes on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    pub name: String,
    pub started_at: String,
    /// `I/N` where this record holds one shard of the sweep.
    pub shard: Option<String>,
    /// Runs in the whole expanded sweep, all shards together.
    pub total_runs: usize,
    pub runs: Vec<SweepEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepEntry {
    pub index: usize,
    pub name: String,
    pub source: PathBuf,
    pub varied: serde_json::Map<String, serde_json::Value>,
    /// `pending`, then the run's own status.
    pub status: Status,
    pub run_dir: Option<PathBuf>,
    pub best_val_acc: Option<f64>,
    pub test_acc: Option<f64>,
    pub wall_secs: Option<f64>,
    pub error: Option<String>,
    /// The resolved config the run trains with: `mnist-lab sweep <this file>` reruns it.
    pub config: String,
}

impl SweepRecord {
    pub fn new(name: &str, shard: Option<Shard>, total_runs: usize, runs: &[PlannedRun]) -> Self {
        SweepRecord {
            name: name.to_string(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            shard: shard.map(|s| s.to_string()),
            total_runs,
            runs: runs.iter().map(SweepEntry::pending).collect(),
        }
    }

    pub fn read(path: &Path) -> Result<SweepRecord, SweepError> {
        let text = read_text(path)?;
        serde_json::from_str(&text).map_err(|e| SweepError::NotARecord {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        let json = serde_json::to_vec_pretty(self).expect("a sweep record serializes to JSON");
        write_atomic(path, &json)
    }

    /// The end-of-sweep table.
    pub fn table(&self) -> Table {
        let mut table = Table::new(&[
            "#", "run", "status", "best val", "test acc", "wall", "run dir",
        ]);
        for entry in &self.runs {
            table.push(vec![
                entry.index.to_string(),
                entry.name.clone(),
                entry.status.to_string(),
                percent(entry.best_val_acc),
                percent(entry.test_acc),
                entry.wall_secs.map_or("-".into(), |s| format!("{s:.0}s")),
                entry
                    .run_dir
                    .as_ref()
                    .map_or("-".into(), |d| d.display().to_string()),
            ]);
        }
        table
    }
}

impl SweepEntry {
    pub(super) fn pending(run: &PlannedRun) -> SweepEntry {
        SweepEntry {
            index: run.index,
            name: run.config.name.clone(),
            source: run.source.clone(),
            varied: run
                .varied
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
                .collect(),
            status: Status::Pending,
            run_dir: None,
            best_val_acc: None,
            test_acc: None,
            wall_secs: None,
            error: None,
            config: run.config.to_toml(),
        }
    }
}

/// Runs `runs` in turn under `runs_dir`, keeping `record` (at `record_path`)
/// current. A failing run is recorded and the next one starts; Ctrl-C stops the
/// sweep after the current run's files are written. Returns how many failed.
pub fn execute(
    runs: &[PlannedRun],
    record: &mut SweepRecord,
    record_path: &Path,
    runs_dir: &Path,
) -> Result<usize, FileError> {
    record.write(record_path)?;
    let mut failed = 0;
    for (position, run) in runs.iter().enumerate() {
        if interrupt::stop_requested().is_some() {
            break;
        }
        tracing::info!(
            run = %run.config.name,
            index = run.index,
            of = runs.len(),
            "sweep run {} of {}",
            position + 1,
            runs.len()
        );
        record.runs[position].status = Status::Running;
        record.write(record_path)?;
        // A panic in one run is that run's failure, not the sweep's.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            experiment::run(&run.config, runs_dir)
        }))
        .unwrap_or_else(|panic| Err(RunError::Panicked(panic_message(&panic))));
        let entry = &mut record.runs[position];
        let status = match result {
            Ok(outcome) => {
                let summary = outcome.summary;
                entry.run_dir = Some(outcome.dir);
                entry.best_val_acc = summary.best_val_acc;
                entry.test_acc = summary.test_acc;
                entry.wall_secs = Some(summary.wall_secs);
                entry.error = summary.error;
                summary.status
            }
            Err(error) => {
                entry.error = Some(format!("{error:#}"));
                Status::Failed
            }
        };
        entry.status = status;
        if matches!(status, Status::Failed | Status::Diverged) {
            failed += 1;
            tracing::error!(
                run = %entry.name,
                error = entry.error.as_deref().unwrap_or(""),
                "sweep run failed; going on with the next"
            );
        }
        record.write(record_path)?;
    }
    Ok(failed)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Creates `<runs_dir>/sweep-<name>[-shardIofN]-<time>/` for the record.
pub fn create_record_dir(
    runs_dir: &Path,
    name: &str,
    shard: Option<Shard>,
) -> Result<PathBuf, FileError> {
    let label = match shard {
        Some(s) => format!("sweep-{name}-shard{}of{}", s.index, s.count),
        None => format!("sweep-{name}"),
    };
    create_unique_dir(runs_dir, &label)
}
