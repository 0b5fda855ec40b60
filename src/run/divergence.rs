//! When a run stops as `diverged`: a loss that blew up, or an accuracy that
//! never left chance level.

use crate::run::metrics::EpochMetrics;
use crate::train::TrainError;

/// Mean cross-entropy above ten times chance level's (ln 10 = 2.30): no
/// classifier that still learns gets there.
const DIVERGED_LOSS: f64 = 10.0 * std::f64::consts::LN_10;

/// Why an epoch's figures say training diverged, if they do: a loss that is not
/// finite, above [`DIVERGED_LOSS`], or ten times the first epoch's.
pub fn divergence(
    metrics: &EpochMetrics,
    first: Option<&EpochMetrics>,
    peak_lr: f64,
) -> Option<TrainError> {
    let losses = [
        (
            "training",
            Some(metrics.train_loss),
            first.map(|f| f.train_loss),
        ),
        (
            "validation",
            metrics.val_loss,
            first.and_then(|f| f.val_loss),
        ),
    ];
    // Without a validation split only the training loss is measured.
    let mut measured = losses
        .into_iter()
        .filter_map(|(what, loss, first)| Some((what, loss?, first)));
    measured.find_map(|(what, loss, first)| {
        let exploded = first.is_some_and(|first| loss > 10.0 * first);
        (!loss.is_finite() || loss > DIVERGED_LOSS || exploded).then_some(TrainError::Diverged {
            epoch: metrics.epoch,
            what,
            loss,
            lr: peak_lr,
        })
    })
}

/// Epochs after which a run still at chance accuracy is stopped, and the
/// optimiser steps it must have taken by then (so that tiny test runs of a few
/// batches are not judged).
const CHANCE_EPOCHS: usize = 3;
const CHANCE_STEPS: u64 = 500;
/// Training accuracy below this is chance level for ten classes (10%), give or take.
const CHANCE_ACCURACY: f64 = 0.2;

/// Why a run that has learned nothing is stopped: training accuracy at chance
/// level for each of its first [`CHANCE_EPOCHS`] epochs (a learning rate so high
/// the weights saturate keeps the loss finite and near ln 10, so the loss rules
/// of [`divergence`] never fire).
pub fn not_learning(
    earlier: &[EpochMetrics],
    metrics: &EpochMetrics,
    steps: u64,
    peak_lr: f64,
) -> Option<TrainError> {
    if metrics.epoch != CHANCE_EPOCHS || steps < CHANCE_STEPS {
        return None;
    }
    let best = (earlier.iter().chain([metrics]))
        .map(|m| m.train_acc)
        .fold(0.0, f64::max);
    (best < CHANCE_ACCURACY).then_some(TrainError::NotLearning {
        epochs: metrics.epoch,
        accuracy: best,
        lr: peak_lr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, train_loss: f64, val_loss: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_loss,
            val_loss: Some(val_loss),
            lr: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn divergence_is_a_loss_not_finite_too_high_or_ten_times_the_first() {
        let first = epoch(1, 0.5, 0.4);
        assert!(divergence(&first, None, 0.5).is_none());
        assert!(divergence(&epoch(2, 0.3, 0.2), Some(&first), 0.5).is_none());
        assert!(divergence(&epoch(2, f64::NAN, 0.2), Some(&first), 0.5).is_some());
        assert!(
            divergence(&epoch(1, 30.0, 0.2), None, 0.5).is_some(),
            "above 10 ln 10"
        );
        let Some(TrainError::Diverged { what, lr, .. }) =
            divergence(&epoch(3, 0.3, 4.5), Some(&first), 0.5)
        else {
            panic!("ten times the first validation loss is divergence");
        };
        assert_eq!((what, lr), ("validation", 0.5));
    }
}
