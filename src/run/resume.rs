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

use crate::run::metrics::EpochMetrics;
use crate::run::rundir::RunDir;
use crate::train::{Trainer, TrainerState};
use crate::util::fsio::{FileError, write_atomic};

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
}

/// Writes the state after an epoch: `history` ends with that epoch.
pub fn save(
    run: &RunDir,
    trainer: &Trainer,
    history: &[EpochMetrics],
    best: (Option<usize>, Option<f64>),
) -> Result<(), StateError> {
    let (trainer_state, tensors) = trainer.snapshot()?;
    let state = SavedState {
        format: FORMAT,
        epoch: history.last().map_or(0, |m| m.epoch),
        trainer: trainer_state,
        best_epoch: best.0,
        best_val_acc: best.1,
        history: history.to_vec(),
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
