//! The run directory: `runs/<name>-<UTC yyyymmdd-hhmmss>/` and the files in it.
//! Every file is written under a temporary name and renamed into place, so a run
//! killed at any moment leaves each file either old or new, never half-written.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.csv";
pub const EVENTS_FILE: &str = "events.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const BEST_CHECKPOINT: &str = "model.safetensors";
pub const LAST_CHECKPOINT: &str = "last.safetensors";
pub const PLOTS_DIR: &str = "plots";

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
}

/// One row of `metrics.csv`: the figures of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    pub lr: f64,
    pub epoch_secs: f64,
    pub images_per_sec: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Completed,
    Failed,
    /// Stopped by Ctrl-C; the checkpoints and metrics of finished epochs remain.
    Interrupted,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        })
    }
}

/// `summary.json`: written when the run starts and again when it ends.
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
    pub best_val_acc: Option<f64>,
    /// Test-set figures of `model.safetensors` (the best validation epoch).
    pub test_loss: Option<f64>,
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
    pub status: Status,
    pub error: Option<String>,
}

/// Creates `<parent>/<name>-<UTC yyyymmdd-hhmmss>`; a suffix `-2`, `-3`, ... keeps
/// two started in the same second apart. Creation is atomic, so concurrent runs
/// never share a directory.
pub fn create_unique_dir(parent: &Path, name: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(parent).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot create {}: {e}", parent.display()))
    })?;
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
    for attempt in 1.. {
        let suffix = if attempt == 1 {
            String::new()
        } else {
            format!("-{attempt}")
        };
        let path = parent.join(format!("{name}-{stamp}{suffix}"));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot create {}: {e}", path.display()),
                ));
            }
        }
    }
    unreachable!("the attempt counter is unbounded")
}

/// A created run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `<runs_dir>/<name>-<UTC time>` with its `plots/` folder.
    pub fn create(runs_dir: &Path, name: &str) -> std::io::Result<RunDir> {
        let path = create_unique_dir(runs_dir, name)?;
        std::fs::create_dir(path.join(PLOTS_DIR))?;
        Ok(RunDir { path })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn plot(&self, name: &str) -> PathBuf {
        self.path.join(PLOTS_DIR).join(name)
    }

    pub fn write_config(&self, toml_text: &str) -> std::io::Result<()> {
        write_atomic(&self.file(CONFIG_FILE), toml_text.as_bytes())
    }

    pub fn write_summary(&self, summary: &Summary) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(summary).map_err(std::io::Error::other)?;
        write_atomic(&self.file(SUMMARY_FILE), &json)
    }

    pub fn write_metrics(&self, rows: &[EpochMetrics]) -> std::io::Result<()> {
        write_atomic(&self.file(METRICS_FILE), &metrics_csv(rows)?)
    }

    pub fn write_events(&self, jsonl: &[u8]) -> std::io::Result<()> {
        write_atomic(&self.file(EVENTS_FILE), jsonl)
    }
}

/// Mean seconds per epoch (training and validation); `None` before the first epoch.
pub fn mean_epoch_secs(metrics: &[EpochMetrics]) -> Option<f64> {
    if metrics.is_empty() {
        return None;
    }
    Some(metrics.iter().map(|m| m.epoch_secs).sum::<f64>() / metrics.len() as f64)
}

/// `metrics.csv` content: a header and one row per epoch.
pub fn metrics_csv(rows: &[EpochMetrics]) -> std::io::Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    if rows.is_empty() {
        writer.write_record([
            "epoch",
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "lr",
            "epoch_secs",
            "images_per_sec",
        ])?;
    }
    for row in rows {
        writer.serialize(row)?;
    }
    writer
        .into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Reads a run's `metrics.csv`.
pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>, String> {
    let mut reader =
        csv::Reader::from_path(path).map_err(|e| format!("{}: {e}", path.display()))?;
    reader
        .deserialize()
        .collect::<Result<Vec<EpochMetrics>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Peak resident set size of this process in MiB, from `/proc/self/status`
/// (`None` where that file does not exist).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

/// Restarts the peak that [`peak_rss_mb`] reports, so each run of a sweep reports
/// its own (Linux: writing 5 to `/proc/self/clear_refs`; elsewhere nothing).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// `<CPU model>, <n> cores` from `/proc/cpuinfo` (`None` where it does not exist).
pub fn host_description() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.split_whitespace().collect::<Vec<_>>().join(" "))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(format!("{model}, {cores} cores"))
}

/// Reads a run's `summary.json`.
pub fn read_summary(path: &Path) -> Result<Summary, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
    }

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

    #[test]
    fn metrics_round_trip_with_the_documented_header() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path(), "m").unwrap();
        run.write_metrics(&[]).unwrap();
        let text = std::fs::read_to_string(run.file(METRICS_FILE)).unwrap();
        assert_eq!(
            text.trim(),
            "epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_secs,images_per_sec"
        );
        let row = EpochMetrics {
            epoch: 1,
            train_loss: 0.5,
            train_acc: 0.8,
            val_loss: 0.4,
            val_acc: 0.85,
            lr: 0.01,
            epoch_secs: 2.0,
            images_per_sec: 1000.0,
        };
        run.write_metrics(std::slice::from_ref(&row)).unwrap();
        let text = std::fs::read_to_string(run.file(METRICS_FILE)).unwrap();
        assert!(text.starts_with(
            "epoch,train_loss,train_acc,val_loss,val_acc,lr,epoch_secs,images_per_sec\n"
        ));
        assert_eq!(read_metrics(&run.file(METRICS_FILE)).unwrap(), vec![row]);
    }
}
