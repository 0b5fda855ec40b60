//! Learning-rate schedules and the `[schedule]` config: constant, step or
//! cosine, after an optional linear warm-up, updated every batch.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use crate::util::invalid::{InvalidField, invalid};

/// `[schedule]`: how the learning rate moves over the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// `step`: multiply the rate by `gamma` every `step_size` epochs.
    #[default(10)]
    pub step_size: usize,
    #[default(0.1)]
    pub gamma: f64,
    /// `cosine`: the rate the cosine decays to at the end of the run.
    pub min_lr: f64,
    /// Linear warm-up from 0 over this many epochs (fractions allowed), any kind.
    pub warmup_epochs: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Step,
    Cosine,
}

impl ScheduleConfig {
    /// Range checks of the `[schedule]` fields, given the peak rate and the
    /// number of epochs they relate to.
    pub fn validate(&self, peak_lr: f64, epochs: usize) -> Result<(), InvalidField> {
        if self.step_size == 0 {
            return invalid("schedule.step_size", "expected at least 1 epoch");
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return invalid(
                "schedule.gamma",
                format!("expected a number in (0, 1], got {}", self.gamma),
            );
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= peak_lr) {
            return invalid(
                "schedule.min_lr",
                format!(
                    "expected a number between 0 and optimizer.lr ({peak_lr}), got {}",
                    self.min_lr
                ),
            );
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs <= epochs as f64) {
            return invalid(
                "schedule.warmup_epochs",
                format!(
                    "expected a number between 0 and train.epochs ({epochs}), got {}",
                    self.warmup_epochs
                ),
            );
        }
        Ok(())
    }
}

/// The learning rate at a point of the run, `epochs_done` being fractional epochs
/// completed (e.g. 2.5 halfway through the third epoch).
pub fn learning_rate(
    schedule: &ScheduleConfig,
    base_lr: f64,
    epochs_done: f64,
    total_epochs: usize,
) -> f64 {
    let warmup = schedule.warmup_epochs;
    if epochs_done < warmup {
        return base_lr * epochs_done / warmup;
    }
    match schedule.kind {
        ScheduleKind::Constant => base_lr,
        ScheduleKind::Step => {
            let decays = (epochs_done.floor() as usize) / schedule.step_size;
            base_lr * schedule.gamma.powi(decays as i32)
        }
        ScheduleKind::Cosine => {
            let span = (total_epochs as f64 - warmup).max(f64::EPSILON);
            let progress = ((epochs_done - warmup) / span).clamp(0.0, 1.0);
            let cosine = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
            schedule.min_lr + (base_lr - schedule.min_lr) * cosine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let step = ScheduleConfig {
            kind: ScheduleKind::Step,
            step_size: 2,
            gamma: 0.5,
            ..Default::default()
        };
        assert_eq!(learning_rate(&step, 0.1, 1.9, 10), 0.1);
        assert_eq!(learning_rate(&step, 0.1, 2.0, 10), 0.05);
        assert_eq!(learning_rate(&step, 0.1, 5.0, 10), 0.025);
        let cosine = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            min_lr: 0.001,
            ..Default::default()
        };
        assert_eq!(learning_rate(&cosine, 0.1, 0.0, 10), 0.1);
        assert!((learning_rate(&cosine, 0.1, 5.0, 10) - 0.0505).abs() < 1e-12);
        assert!((learning_rate(&cosine, 0.1, 10.0, 10) - 0.001).abs() < 1e-12);
        let warm = ScheduleConfig {
            warmup_epochs: 2.0,
            ..Default::default()
        };
        assert_eq!(learning_rate(&warm, 0.1, 1.0, 10), 0.05);
        assert_eq!(learning_rate(&warm, 0.1, 3.0, 10), 0.1);
    }
}
