//! The run directory: `runs/<name>-<UTC yyyymmdd-hhmmss>/` and the files in it.
//! Every file is written under a temporary name and renamed into place, so a run
//! killed at any moment leaves each file either old or new, never half-written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::run::metrics::{EpochMetrics, metrics_csv, round};
use crate::run::owner::{self, Probe};
use crate::util::fsio::{FileError, create_unique_dir, read_text, write_atomic};
use crate::util::system;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.csv";
pub const EVENTS_FILE: &str = "events.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const BEST_CHECKPOINT: &str = "model.safetensors";
pub const LAST_CHECKPOINT: &str = "last.safetensors";
pub const PLOTS_DIR: &str = "plots";

/// A run's file that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{} is not a valid {what}: {reason}", path.display())]
    Malformed {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A sweep's run that has not started.
    Pending,
    Running,
    Completed,
    Failed,
    /// Stopped by SIGINT or SIGTERM; the checkpoints and metrics of finished epochs remain.
    Interrupted,
    /// Stopped because its loss blew up; `last.safetensors` holds the last good epoch.
    Diverged,
    /// Never written: what readers call a `running` run whose process is gone
    /// (killed, or its machine went down). `mnist-lab resume` continues it.
    Stale,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
            Status::Diverged => "diverged",
            Status::Stale => "stale",
        })
    }
}

/// `summary.json`: written when the run starts, after every epoch and at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub model: String,
    pub batch_norm: bool,
    pub params: usize,
    pub device: String,
    pub seed: u64,
    /// Epochs configured.
    pub epochs: usize,
    pub epochs_completed: usize,
    pub best_epoch: Option<usize>,
    #[serde(serialize_with = "six_decimals")]
    pub best_val_acc: Option<f64>,
    /// Test-set figures of `model.safetensors` (the best validation epoch, or
    /// the last without a validation split).
    #[serde(serialize_with = "six_decimals")]
    pub test_loss: Option<f64>,
    #[serde(serialize_with = "six_decimals")]
    pub test_acc: Option<f64>,
    pub wall_secs: f64,
    /// Peak resident memory of the process so far (Linux only).
    pub peak_rss_mb: Option<f64>,
    /// CPU threads the run used.
    #[serde(default)]
    pub threads: Option<usize>,
    /// The machine's CPU model and core count (Linux), to read the timings by.
    #[serde(default)]
    pub host: Option<String>,
    pub started_at: String,
    /// Random, drawn when the run starts: what ties its training state to it.
    #[serde(default)]
    pub run_id: Option<String>,
    pub status: Status,
    pub error: Option<String>,
    /// The machine and process that run the run, and when the process last wrote
    /// this file: how readers tell a live run from a stale one.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub updated_at: Option<String>,
    /// The MNIST folder the run read; `eval` and `predict` look there first.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// SHA-256 of the four MNIST files' contents as the run read them.
    #[serde(default)]
    pub data_sha256: BTreeMap<String, String>,
    /// When the run was resumed, once per resume.
    #[serde(default)]
    pub resumed_at: Vec<String>,
    /// The config's hyperparameters, flattened to dotted keys (`optimizer.lr`).
    #[serde(default)]
    pub hparams: BTreeMap<String, serde_json::Value>,
}

/// Figures written for people: 0.9933, not 0.9933000000000001 (the run itself
/// keeps the exact values).
fn six_decimals<S: serde::Serializer>(
    value: &Option<f64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    value.map(|v| round(v, 6)).serialize(serializer)
}

impl Summary {
    /// The status as it stands, for the run in `dir`: `stale` for a `running`
    /// run whose lock no process holds, whatever host wrote it. A run from
    /// before locks is judged by its process on this host, and elsewhere by
    /// `updated_at` older than [`owner::STALE_AFTER`].
    pub fn effective_status(&self, dir: &Path) -> Status {
        if self.status != Status::Running {
            return self.status;
        }
        let gone = match owner::probe(dir) {
            Probe::Held => false,
            Probe::Free => true,
            Probe::Unknown => self.writer_gone(),
        };
        if gone { Status::Stale } else { Status::Running }
    }

    /// Whether the process that last wrote the summary is gone, judged without a lock.
    fn writer_gone(&self) -> bool {
        let (Some(host), Some(pid)) = (&self.hostname, self.pid) else {
            return true;
        };
        let silent = (self.updated_at.as_deref())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .and_then(|t| (chrono::Utc::now() - t.to_utc()).to_std().ok());
        let writer = owner::Owner {
            host: host.clone(),
            pid,
            since: String::new(),
        };
        owner::owner_gone(&writer, silent)
    }

    /// Marks the summary as written now by this process.
    pub fn touch(&mut self) {
        self.hostname = Some(system::hostname());
        self.pid = Some(std::process::id());
        self.updated_at = Some(system::now_rfc3339());
    }
}

/// A created run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `<runs_dir>/<name>-<UTC time>` with its `plots/` folder.
    pub fn create(runs_dir: &Path, name: &str) -> Result<RunDir, FileError> {
        let path = create_unique_dir(runs_dir, name)?;
        let plots = path.join(PLOTS_DIR);
        std::fs::create_dir(&plots).map_err(FileError::on("create", &plots))?;
        Ok(RunDir { path })
    }

    /// An existing run directory (to resume).
    pub fn open(path: &Path) -> RunDir {
        RunDir {
            path: path.to_path_buf(),
        }
    }

    /// Deletes the directory of a run that has nothing worth keeping (it
    /// completed no epoch); a directory that will not go is left as it is.
    pub fn remove(&self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), %error, "cannot remove the run directory");
        }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn plot(&self, name: &str) -> PathBuf {
        self.path.join(PLOTS_DIR).join(name)
    }

    pub fn write_config(&self, toml_text: &str) -> Result<(), FileError> {
        write_atomic(&self.file(CONFIG_FILE), toml_text.as_bytes())
    }

    pub fn write_summary(&self, summary: &Summary) -> Result<(), FileError> {
        let json = serde_json::to_vec_pretty(summary).expect("a summary serializes to JSON");
        write_atomic(&self.file(SUMMARY_FILE), &json)
    }

    pub fn write_metrics(&self, rows: &[EpochMetrics]) -> Result<(), FileError> {
        write_atomic(&self.file(METRICS_FILE), &metrics_csv(rows))
    }

    pub fn write_events(&self, jsonl: &[u8]) -> Result<(), FileError> {
        write_atomic(&self.file(EVENTS_FILE), jsonl)
    }
}

/// Reads a run's `summary.json`.
pub fn read_summary(path: &Path) -> Result<Summary, RunFileError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| RunFileError::Malformed {
        path: path.to_path_buf(),
        what: "summary.json",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_never_shared() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunDir::create(dir.path(), "x").unwrap();
        let b = RunDir::create(dir.path(), "x").unwrap();
        assert_ne!(a.path, b.path);
        assert!(a.path.join(PLOTS_DIR).is_dir() && b.path.join(PLOTS_DIR).is_dir());
        let name = a.path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("x-") && name.len() == "x-yyyymmdd-hhmmss".len(),
            "{name}"
        );
    }
}
