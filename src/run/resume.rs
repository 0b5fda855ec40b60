//! A run's training state, saved after every epoch so that a run stopped for any
//! reason (a signal, a kill, a full disk, a lost node) continues exactly where
//! its last completed epoch left it.
//!
//! `training_state.safetensors` holds the tensors: `model.<variable>` (weights and
//! BatchNorm statistics) and `optimizer.<parameter>.<buffer>` (PyTorch's names:
//! `momentum_buffer`, `exp_avg`, `exp_avg_sq`). Its JSON header's metadata holds the
//! rest under the key `mnist_lab`: the epoch, the step count, every random stream,
//! the best epoch so far and the metrics of every epoch. One file, written
//! atomically, so the tensors and the figures can never be from different epochs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::run::metrics::EpochMetrics;
use crate::run::rundir::{RunDir, Summary};
use crate::train::{Trainer, TrainerState};
use crate::util::fsio::{FileError, is_atomic_temporary, write_atomic};

pub const STATE_FILE: &str = "training_state.safetensors";
const METADATA_KEY: &str = "mnist_lab";
/// Raised when the file's layout changes, so an old file is refused, not misread.
const FORMAT: u32 = 1;

/// The training state's figures (its tensors travel beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub format: u32,
    /// Epochs completed.
    pub epoch: usize,
    pub trainer: TrainerState,
    pub best_epoch: Option<usize>,
    pub best_val_acc: Option<f64>,
    /// Every completed epoch's metrics, so `metrics.csv` is rebuilt to match.
    pub history: Vec<EpochMetrics>,
    /// Which run wrote it (absent in states from before it was recorded).
    #[serde(flatten)]
    pub belonging: Option<Belonging>,
}

/// What ties a training state to its run: the config it trained with and the
/// run's start. A state copied from another run, or a config.toml edited since,
/// does not match and is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Belonging {
    /// The resolved config, as the run saved it in config.toml.
    pub config: String,
    /// The run's `started_at`.
    pub run_started_at: String,
    /// The run's `run_id` (two runs may start in the same second).
    #[serde(default)]
    pub run_id: Option<String>,
}

/// A training state that cannot be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{} is not a training state this version can read: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("cannot take the training state: {0}")]
    Snapshot(#[from] candle_core::Error),
    #[error(
        "{} belongs to another run ({state_run}); this is {this_run}: \
         a run resumes only from its own state",
        path.display()
    )]
    ForeignState {
        path: PathBuf,
        state_run: String,
        this_run: String,
    },
    #[error(
        "{} does not match the config {} was trained with: {changes}; a resumed run \
         keeps its settings (restore config.toml, or start a new run)",
        config_path.display(), state_path.display()
    )]
    ConfigChanged {
        config_path: PathBuf,
        state_path: PathBuf,
        changes: String,
    },
}

/// Writes the state after an epoch: `history` ends with that epoch.
pub fn save(
    run: &RunDir,
    trainer: &Trainer,
    history: &[EpochMetrics],
    best: (Option<usize>, Option<f64>),
    belonging: Belonging,
) -> Result<(), StateError> {
    let (trainer_state, tensors) = trainer.snapshot()?;
    let state = SavedState {
        format: FORMAT,
        epoch: history.last().map_or(0, |m| m.epoch),
        trainer: trainer_state,
        best_epoch: best.0,
        best_val_acc: best.1,
        history: history.to_vec(),
        belonging: Some(belonging),
    };
    let metadata = HashMap::from([(
        METADATA_KEY.to_string(),
        serde_json::to_string(&state).expect("a training state serialises"),
    )]);
    let views: Vec<(&String, &Tensor)> = tensors.iter().map(|(n, t)| (n, t)).collect();
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| candle_core::Error::Msg(format!("safetensors: {e}")))?;
    Ok(write_atomic(&run.file(STATE_FILE), &bytes)?)
}

/// Reads a run's training state: its figures and its tensors (on the CPU).
pub fn load(run_dir: &Path) -> Result<(SavedState, HashMap<String, Tensor>), StateError> {
    let path = run_dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(FileError::on("read", &path))?;
    let unreadable = |reason: String| StateError::Unreadable {
        path: path.clone(),
        reason,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| unreadable(format!("not a safetensors file ({e})")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| unreadable(format!("no {METADATA_KEY:?} metadata")))?;
    let state: SavedState = serde_json::from_str(json).map_err(|e| unreadable(e.to_string()))?;
    if state.format != FORMAT {
        return Err(unreadable(format!(
            "format {}, expected {FORMAT}",
            state.format
        )));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| unreadable(e.to_string()))?;
    Ok((state, tensors))
}

/// Keys a resumed run may change with `--set`: none of them changes what an
/// epoch learns. `train.epochs` extends a run (see [`schedule_note`] for the
/// schedules that span the run), `train.early_stopping` lets a stopped run go on.
pub fn resumable(key: &str) -> bool {
    matches!(
        key,
        "train.epochs" | "train.eval_batch_size" | "train.early_stopping" | "data.dir"
    ) || key.starts_with("device.")
}

/// Refuses a state that another run wrote, or one whose config differs from
/// the run's config.toml (`config`, loaded with the resume's overrides) in a
/// key a resume may not change. States from before the check pass unchecked.
pub fn check_belongs(
    state: &SavedState,
    run_dir: &Path,
    run: &Summary,
    config: &Config,
) -> Result<(), StateError> {
    let Some(belonging) = &state.belonging else {
        return Ok(());
    };
    let state_path = run_dir.join(STATE_FILE);
    let (state_run, this_run) = match (&belonging.run_id, &run.run_id) {
        (Some(state_id), Some(run_id)) => (
            format!("run {state_id}, started {}", belonging.run_started_at),
            format!("run {run_id}, started {}", run.started_at),
        ),
        _ => (
            format!("started {}", belonging.run_started_at),
            format!("started {}", run.started_at),
        ),
    };
    if state_run != this_run {
        return Err(StateError::ForeignState {
            path: state_path,
            state_run,
            this_run,
        });
    }
    let trained = Config::from_toml(&belonging.config, &state_path, None, &[]).map_err(|e| {
        StateError::Unreadable {
            path: state_path.clone(),
            reason: format!("its config: {e}"),
        }
    })?;
    let changes = config_changes(&trained, config);
    if changes.is_empty() {
        return Ok(());
    }
    let changes: Vec<String> = (changes.into_iter())
        .map(|(key, then, now)| format!("{key} = {now} in config.toml, {then} when trained"))
        .collect();
    Err(StateError::ConfigChanged {
        config_path: run_dir.join(crate::run::rundir::CONFIG_FILE),
        state_path,
        changes: changes.join(", "),
    })
}

/// The keys a resume may not change whose values differ between two configs:
/// `(key, value in expected, value in found)`, values as JSON (`unset` where absent).
pub fn config_changes(expected: &Config, found: &Config) -> Vec<(String, String, String)> {
    let (expected, found) = (expected.flattened(), found.flattened());
    let keys: std::collections::BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
    let shown = |v: Option<&serde_json::Value>| v.map_or("unset".into(), |v| v.to_string());
    keys.into_iter()
        .filter(|key| !resumable(key) && expected.get(*key) != found.get(*key))
        .map(|key| (key.clone(), shown(expected.get(key)), shown(found.get(key))))
        .collect()
}

/// What extending a run does to a schedule that spans `train.epochs` (cosine,
/// one-cycle): it is stretched over the new length, so the rate jumps back up.
/// `None` where the run keeps its length or its schedule does not depend on it.
pub fn schedule_note(config: &Config, epochs_before: usize, epochs_done: usize) -> Option<String> {
    use crate::train::schedule::{ScheduleKind, learning_rate};
    let schedule = &config.schedule;
    let spans_run = matches!(schedule.kind, ScheduleKind::Cosine | ScheduleKind::OneCycle);
    if !spans_run || config.train.epochs == epochs_before {
        return None;
    }
    let lr = config.optimizer.lr();
    let at = |total| learning_rate(schedule, lr, epochs_done as f64, total);
    let ended = learning_rate(schedule, lr, epochs_done as f64 - 1e-9, epochs_before);
    let kind = serde_json::to_value(schedule.kind).map_or(String::new(), |v| v.to_string());
    Some(format!(
        "schedule.kind = {kind} spans train.epochs: going from {epochs_before} to {} epochs \
         stretches it over the new length, so epoch {} trains from lr {:.3e} (the {epochs_before}-epoch \
         schedule stood at {ended:.3e}); the epochs already trained keep their rates",
        config.train.epochs,
        epochs_done + 1,
        at(config.train.epochs),
    ))
}

/// Removes the temporary files of writes that a kill interrupted
/// (`.<file>.<pid>-<n>.tmp`, see [`write_atomic`]) from the run directory and
/// its plots folder. Called by the run's owner only.
pub fn remove_stray_temporaries(run_dir: &Path) -> usize {
    let mut removed = 0;
    for dir in [
        run_dir.to_path_buf(),
        run_dir.join(crate::run::rundir::PLOTS_DIR),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let stray = is_atomic_temporary(&entry.file_name().to_string_lossy());
            if stray && entry.path().is_file() && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}
