//! `sweep.json`, the record of a sweep, and running a sweep's runs in turn.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::run::rundir::{self, Status, Summary};
use crate::run::sweep::{PlannedRun, Shard, SweepError};
use crate::run::{RunError, experiment};
use crate::run::{owner, resume};
use crate::util::fsio::{FileError, create_unique_dir, read_text, write_atomic};
use crate::util::interrupt::{self, AbortHook};
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
    /// Where the runs' directories go, kept so a continued sweep puts the rest there too.
    #[serde(default)]
    pub runs_dir: Option<PathBuf>,
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
            started_at: crate::util::system::now_rfc3339(),
            shard: shard.map(|s| s.to_string()),
            total_runs,
            runs_dir: None,
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

    /// Checks, before a record is continued, that each entry's run directory
    /// holds that entry's run: its config (keys a resume may change aside), and
    /// no other entry's directory. A record edited by hand, or merged from
    /// another, would otherwise mark the wrong run completed.
    pub fn check_run_dirs(&self, path: &Path) -> Result<(), SweepError> {
        let mut seen: Vec<(&Path, &str)> = Vec::new();
        for entry in &self.runs {
            let Some(dir) = entry.run_dir.as_deref() else {
                continue;
            };
            let wrong = |reason: String| SweepError::WrongRunDir {
                record: path.to_path_buf(),
                entry: format!("{} ({})", entry.index, entry.name),
                dir: dir.to_path_buf(),
                reason,
            };
            if let Some((_, other)) = seen.iter().find(|(d, _)| *d == dir) {
                return Err(wrong(format!("entry {other} records the same directory")));
            }
            seen.push((dir, &entry.name));
            let config_path = dir.join(rundir::CONFIG_FILE);
            if !config_path.is_file() {
                continue; // gone, or never written: the run starts afresh
            }
            let expected = Config::from_toml(&entry.config, path, None, &[])?;
            let held = Config::load(&config_path, &[]).map_err(|e| wrong(e.to_string()))?;
            let changes: Vec<String> = (resume::config_changes(&expected, &held).into_iter())
                .map(|(key, recorded, held)| {
                    format!("{key} = {held} there, {recorded} in the record")
                })
                .collect();
            if !changes.is_empty() {
                return Err(wrong(format!(
                    "it holds another run's config ({})",
                    changes.join(", ")
                )));
            }
        }
        Ok(())
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

/// What a sweep does with one of its runs, from what its record says.
enum Step {
    /// Trained by another process right now (resumed by hand, say).
    Elsewhere(String),
    /// Completed or diverged: an outcome, not an accident.
    Skip,
    /// Pending, or stopped before its run directory held a training state.
    Start,
    /// Stopped (interrupted, failed, stale) after at least one epoch.
    Resume(PathBuf),
}

/// Decides a run's step, taking the run directory's own summary over the
/// record's where they differ (a sweep killed between the two writes).
fn next_step(entry: &mut SweepEntry) -> Step {
    match entry.status {
        Status::Pending => return Step::Start,
        Status::Completed | Status::Diverged => return Step::Skip,
        _ => {}
    }
    let Some(dir) = entry.run_dir.clone() else {
        return Step::Start;
    };
    let Ok(summary) = rundir::read_summary(&dir.join(rundir::SUMMARY_FILE)) else {
        return Step::Start;
    };
    match summary.effective_status(&dir) {
        Status::Completed | Status::Diverged => {
            entry.settle(summary);
            Step::Skip
        }
        Status::Running => {
            let owner = owner::read_owner(&dir).map_or("another process".into(), |o| o.to_string());
            tracing::warn!(run = %entry.name, dir = %dir.display(), %owner, "run is live in another process; leaving it");
            Step::Elsewhere(format!("{} ({owner})", entry.name))
        }
        _ if dir.join(resume::STATE_FILE).is_file() => Step::Resume(dir),
        _ => Step::Start,
    }
}

impl SweepEntry {
    /// Copies a finished run's figures into the entry.
    fn settle(&mut self, summary: Summary) {
        self.best_val_acc = summary.best_val_acc;
        self.test_acc = summary.test_acc;
        self.wall_secs = Some(summary.wall_secs);
        self.error = summary.error;
        self.status = summary.status;
    }
}

/// `sweep.json` on disk, and the record as last written, from which a second
/// signal marks the run in progress `interrupted` before the process exits.
struct RecordFile<'a> {
    path: &'a Path,
    written: Arc<Mutex<SweepRecord>>,
    _abort: AbortHook,
}

impl<'a> RecordFile<'a> {
    fn new(path: &'a Path, record: &SweepRecord) -> RecordFile<'a> {
        let written = Arc::new(Mutex::new(record.clone()));
        let shared = Arc::clone(&written);
        let owned_path = path.to_path_buf();
        let abort = interrupt::on_abort(move |_| {
            let mut record = interrupt::hold_until_exit(&shared);
            for entry in &mut record.runs {
                if entry.status == Status::Running {
                    entry.status = Status::Interrupted;
                }
            }
            let _ = record.write(&owned_path);
        });
        RecordFile {
            path,
            written,
            _abort: abort,
        }
    }

    fn write(&self, record: &SweepRecord) -> Result<(), FileError> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        record.write(self.path)?;
        *written = record.clone();
        Ok(())
    }
}

/// What became of a sweep's runs this time.
#[derive(Debug, Default)]
pub struct SweepTally {
    /// Runs that failed or diverged.
    pub failed: usize,
    /// Runs left alone because another process trains them, with their owners.
    pub elsewhere: Vec<String>,
}

/// Runs `runs` in turn under `runs_dir`, keeping `record` (at `record_path`)
/// current: completed runs are skipped, stopped ones resumed, the others
/// started, so running a record again continues it. A failing run is recorded
/// and the next one starts; Ctrl-C stops the sweep after the current run's files
/// are written. The caller holds the record folder's lock ([`owner::claim`]).
pub fn execute(
    runs: &[PlannedRun],
    record: &mut SweepRecord,
    record_path: &Path,
    runs_dir: &Path,
) -> Result<SweepTally, FileError> {
    record.runs_dir = Some(runs_dir.to_path_buf());
    let file = RecordFile::new(record_path, record);
    file.write(record)?;
    let mut tally = SweepTally::default();
    for (position, run) in runs.iter().enumerate() {
        if interrupt::stop_requested().is_some() {
            break;
        }
        let step = next_step(&mut record.runs[position]);
        match step {
            Step::Skip => continue,
            Step::Elsewhere(run) => {
                tally.elsewhere.push(run);
                continue;
            }
            _ => {}
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
        file.write(record)?;
        let result = run_step(step, run, runs_dir, |dir| {
            record.runs[position].run_dir = Some(dir.to_path_buf());
            let _ = file.write(record);
        });
        let entry = &mut record.runs[position];
        match result {
            Ok(outcome) => {
                entry.run_dir = Some(outcome.dir);
                entry.settle(outcome.summary);
            }
            Err(error) => {
                // The run left no directory (it completed no epoch).
                entry.run_dir = None;
                entry.error = Some(format!("{error:#}"));
                entry.status = match error.interruption() {
                    Some(_) => Status::Interrupted,
                    None => Status::Failed,
                };
            }
        }
        if matches!(entry.status, Status::Failed | Status::Diverged) {
            tally.failed += 1;
            tracing::error!(
                run = %entry.name,
                error = entry.error.as_deref().unwrap_or(""),
                "sweep run failed; going on with the next"
            );
        }
        file.write(record)?;
    }
    Ok(tally)
}

/// Starts or resumes one run; a panic in it is that run's failure, not the sweep's.
fn run_step(
    step: Step,
    run: &PlannedRun,
    runs_dir: &Path,
    created: impl FnOnce(&Path),
) -> Result<experiment::RunOutcome, RunError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match step {
        Step::Resume(dir) => experiment::resume(&dir, &Default::default()),
        _ => experiment::run_telling(&run.config, runs_dir, created),
    }))
    .unwrap_or_else(|panic| Err(RunError::Panicked(panic_message(&panic))))
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
    create_folder(runs_dir, "sweep", name, shard)
}

/// Creates `<runs_dir>/<kind>-<name>[-shardIofN]-<time>/`: the folder of a
/// sweep's or a search's record.
pub fn create_folder(
    runs_dir: &Path,
    kind: &str,
    name: &str,
    shard: Option<Shard>,
) -> Result<PathBuf, FileError> {
    let label = match shard {
        Some(s) => format!("{kind}-{name}-shard{}of{}", s.index, s.count),
        None => format!("{kind}-{name}"),
    };
    create_unique_dir(runs_dir, &label)
}
