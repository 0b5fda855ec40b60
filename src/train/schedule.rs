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
    /// Linear warm-up from 0 over this many epochs (fractions allowed), any kind;
    /// for `one_cycle`, the rise (unset: 30% of the run).
    pub warmup_epochs: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Step,
    Cosine,
    /// PyTorch's `OneCycleLR`: a cosine rise from `lr / 25` to `lr` over
    /// `warmup_epochs` (or 30% of the run), then a cosine fall to `lr / 25 / 1e4`.
    OneCycle,
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
    // One-cycle rises in its own way; the others share the linear warm-up.
    if schedule.kind != ScheduleKind::OneCycle && epochs_done < warmup {
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
        ScheduleKind::OneCycle => one_cycle(base_lr, epochs_done, warmup, total_epochs),
    }
}

/// The one-cycle rate: `warmup` epochs of rise (0: 30% of the run), the rest fall.
fn one_cycle(peak: f64, epochs_done: f64, warmup: f64, total_epochs: usize) -> f64 {
    let total = total_epochs as f64;
    let rise = if warmup > 0.0 { warmup } else { 0.3 * total };
    let (start, end) = (peak / 25.0, peak / 25.0 / 1e4);
    // Cosine from `from` to `to` as `t` goes 0 to 1.
    let anneal = |from: f64, to: f64, t: f64| {
        to + (from - to) * (1.0 + (std::f64::consts::PI * t.clamp(0.0, 1.0)).cos()) / 2.0
    };
    if epochs_done < rise {
        anneal(start, peak, epochs_done / rise)
    } else {
        anneal(
            peak,
            end,
            (epochs_done - rise) / (total - rise).max(f64::EPSILON),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_rises_from_a_25th_to_the_peak_then_falls_far_below() {
        let schedule = ScheduleConfig {
            kind: ScheduleKind::OneCycle,
            ..Default::default()
        };
        let lr = |epochs_done| learning_rate(&schedule, 0.1, epochs_done, 20);
        assert!((lr(0.0) - 0.004).abs() < 1e-12);
        assert!(
            (lr(6.0) - 0.1).abs() < 1e-12,
            "the peak at 30% of 20 epochs"
        );
        assert!(lr(3.0) > 0.004 && lr(3.0) < 0.1 && lr(13.0) < 0.1);
        assert!((lr(20.0) - 0.1 / 25.0 / 1e4).abs() < 1e-12);
    }

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
