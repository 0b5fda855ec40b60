//! Training: the `[train]` config, the loop over mini-batches ([`Trainer`]),
//! optimisers ([`optim`]) and learning-rate schedules ([`schedule`]).

pub mod ema;
pub mod optim;
pub mod schedule;
mod trainer;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use crate::model::ModelConfig;
use crate::util::interrupt::Signal;
use crate::util::invalid::{InvalidField, invalid};
use optim::OptimizerConfig;
use schedule::ScheduleConfig;

pub use trainer::*;

/// Why training stopped before its last epoch.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::checkpoint::CheckpointError),
    #[error("interrupted by {0}")]
    Interrupted(Signal),
    #[error(
        "{what} loss is {loss} at epoch {epoch}: training diverged; lower optimizer.lr \
         (now {lr}) and run again"
    )]
    Diverged {
        epoch: usize,
        /// `training` or `validation`.
        what: &'static str,
        loss: f64,
        /// The configured (peak) learning rate.
        lr: f64,
    },
    #[error(
        "training accuracy at most {:.1}% over the first {epochs} epochs, chance level for ten \
         classes: the model is not learning; lower optimizer.lr (now {lr}) and run again",
        100.0 * accuracy
    )]
    NotLearning {
        epochs: usize,
        /// The best training accuracy of those epochs.
        accuracy: f64,
        lr: f64,
    },
}

/// `[train]`: the loop itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    #[default(20)]
    pub epochs: usize,
    #[default(64)]
    pub batch_size: usize,
    /// Batch size for validation and test evaluation (no gradients, so larger;
    /// 250 is as fast as 1000 on the CPU, with a quarter of the activations).
    #[default(250)]
    pub eval_batch_size: usize,
    /// Label smoothing: the training target puts this much probability evenly on
    /// all ten classes (0 = off). Validation and test losses stay plain.
    pub label_smoothing: f64,
    /// Exponential moving average of the weights with this decay per step (0 =
    /// off, 0.999 typical): the average is validated, kept as the best checkpoint
    /// and tested; `last.safetensors` keeps the raw weights.
    pub ema_decay: f64,
    /// Early stopping: end the run after this many epochs without a better
    /// validation accuracy (0 = off); the best epoch's checkpoint is tested.
    pub early_stopping: usize,
}

/// The largest batch, for training or evaluation. A batch's activations grow
/// with it: a typo of a few zeros must be refused, not take the machine's memory
/// (on a shared machine the kernel's OOM killer may pick someone else's work).
pub const MAX_BATCH_SIZE: usize = 8192;

impl TrainConfig {
    /// Range checks of the `[train]` fields.
    pub fn validate(&self) -> Result<(), InvalidField> {
        for (key, value) in [
            ("train.epochs", self.epochs),
            ("train.batch_size", self.batch_size),
            ("train.eval_batch_size", self.eval_batch_size),
        ] {
            if value == 0 {
                return invalid(key, "expected at least 1");
            }
            if key != "train.epochs" && value > MAX_BATCH_SIZE {
                return invalid(
                    key,
                    format!("expected at most {MAX_BATCH_SIZE} images, got {value}"),
                );
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return invalid(
                "train.ema_decay",
                format!("expected a number in [0, 1), got {}", self.ema_decay),
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return invalid(
                "train.label_smoothing",
                format!("expected a number in [0, 1), got {}", self.label_smoothing),
            );
        }
        Ok(())
    }
}

/// What a [`Trainer`] is built from: the config's sections it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSetup {
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    /// `data.augment_shift`, `data.augment_rotate`, `data.augment_scale`.
    pub augment: crate::data::augment::Augment,
    /// Seeds initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
}
