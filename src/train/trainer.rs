//! The training loop: one epoch of shuffled mini-batches, and evaluation.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::Tensors;
use crate::kernels;
use crate::model::checkpoint;
use crate::model::{self, Classifier};
use crate::train::ema::Ema;
use crate::train::optim::Optimizer;
use crate::train::schedule;
use crate::train::{TrainError, TrainSetup};
use crate::util::interrupt;

mod pass;
pub use pass::smoothed_cross_entropy;

/// Mean loss and accuracy over a set of images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub loss: f64,
    pub accuracy: f64,
}

/// What a trainer needs besides its tensors to continue exactly where it was:
/// the step count and every random stream (shuffle, augmentation, dropout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub steps: u64,
    pub shuffle_rng: ChaCha8Rng,
    pub augment_rng: ChaCha8Rng,
    pub dropout_rng: ChaCha8Rng,
}

/// Prefixes of the tensors of [`Trainer::snapshot`]: the model's variables (with
/// BatchNorm's statistics) and the optimiser's state.
const MODEL_PREFIX: &str = "model.";
const OPTIMIZER_PREFIX: &str = "optimizer.";
const EMA_PREFIX: &str = "ema.";

/// The sums of an epoch in progress, still on the device: reading them
/// ([`RunningScore::score`]) waits for the device, so it is done only when asked.
pub struct RunningScore<'a> {
    loss_sum: &'a Tensor,
    correct: &'a Tensor,
    seen: usize,
}

impl RunningScore<'_> {
    /// Mean loss and accuracy over the images seen so far.
    pub fn score(&self) -> Result<Score> {
        let seen = self.seen.max(1) as f64;
        Ok(Score {
            loss: self.loss_sum.to_scalar::<f32>()? as f64 / seen,
            accuracy: self.correct.to_scalar::<f32>()? as f64 / seen,
        })
    }
}

/// A model, its variables and its optimiser, with the state of the run.
pub struct Trainer {
    pub model: Box<dyn Classifier>,
    pub varmap: VarMap,
    optimizer: Optimizer,
    setup: TrainSetup,
    shuffle_rng: ChaCha8Rng,
    augment_rng: ChaCha8Rng,
    /// Optimiser steps taken so far (PyTorch's BatchNorm `num_batches_tracked`).
    pub steps: u64,
    /// The moving average of the weights, when `train.ema_decay` asks for one.
    ema: Option<Ema>,
}

impl Trainer {
    pub fn new(setup: &TrainSetup, input_side: usize, device: &Device) -> Result<Trainer> {
        let varmap = VarMap::new();
        let model = model::build(&setup.model, input_side, setup.seed, &varmap, device)?;
        let optimizer = Optimizer::new(&setup.optimizer, &varmap);
        let ema = match setup.train.ema_decay {
            0.0 => None,
            decay => Some(Ema::new(&varmap, decay)?),
        };
        Ok(Trainer {
            model,
            varmap,
            optimizer,
            setup: setup.clone(),
            shuffle_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0x5_4FF1E),
            augment_rng: ChaCha8Rng::seed_from_u64(setup.seed ^ 0xA_0637),
            steps: 0,
            ema,
        })
    }

    /// Everything needed to continue this run exactly: the state, and the tensors
    /// named `model.<variable>`, `ema.<variable>` (the moving average, if any) and
    /// `optimizer.<parameter>.<buffer>`, on the CPU.
    pub fn snapshot(&self) -> Result<(TrainerState, Vec<(String, Tensor)>)> {
        let state = TrainerState {
            steps: self.steps,
            shuffle_rng: self.shuffle_rng.clone(),
            augment_rng: self.augment_rng.clone(),
            dropout_rng: self.model.dropout().rng(),
        };
        let mut tensors = Vec::new();
        for (name, var) in self.varmap.data().lock().expect("varmap lock").iter() {
            let value = var.as_detached_tensor().to_device(&Device::Cpu)?;
            tensors.push((format!("{MODEL_PREFIX}{name}"), value));
        }
        for (name, value) in self.ema.iter().flat_map(Ema::tensors) {
            tensors.push((
                format!("{EMA_PREFIX}{name}"),
                value.to_device(&Device::Cpu)?,
            ));
        }
        for (name, value) in self.optimizer.state_tensors() {
            tensors.push((
                format!("{OPTIMIZER_PREFIX}{name}"),
                value.to_device(&Device::Cpu)?,
            ));
        }
        Ok((state, tensors))
    }

    /// Puts back what [`Trainer::snapshot`] saved (`origin` names the file in errors).
    pub fn restore(
        &mut self,
        state: &TrainerState,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
    ) -> std::result::Result<(), TrainError> {
        let with_prefix = |prefix: &str| -> HashMap<String, Tensor> {
            tensors
                .iter()
                .filter_map(|(name, t)| Some((name.strip_prefix(prefix)?.to_string(), t.clone())))
                .collect()
        };
        checkpoint::assign(&self.varmap, &with_prefix(MODEL_PREFIX), origin)?;
        self.optimizer
            .restore(&with_prefix(OPTIMIZER_PREFIX), state.steps)?;
        if let Some(ema) = &mut self.ema {
            ema.restore(&with_prefix(EMA_PREFIX))?;
        }
        self.steps = state.steps;
        self.shuffle_rng = state.shuffle_rng.clone();
        self.augment_rng = state.augment_rng.clone();
        self.model.dropout().set_rng(state.dropout_rng.clone());
        Ok(())
    }

    /// What the trainer was built from.
    pub fn setup(&self) -> &TrainSetup {
        &self.setup
    }

    pub fn parameter_count(&self) -> usize {
        model::parameter_count(&self.varmap)
    }

    /// The learning rate `epochs_done` (fractional) epochs into the run.
    pub fn learning_rate(&self, epochs_done: f64) -> f64 {
        schedule::learning_rate(
            &self.setup.schedule,
            self.setup.optimizer.lr(),
            epochs_done,
            self.setup.train.epochs,
        )
    }

    /// Trains one epoch (`epoch` counts from 0) over `train` in a fresh seeded order;
    /// `on_batch` hears the number of images of each batch done, and the epoch's
    /// figures so far, which it may read. Where its batches train as halves
    /// the loop runs on the training thread (`kernels::on_training_thread`),
    /// where each batch's first half runs.
    pub fn train_epoch(
        &mut self,
        train: &Tensors,
        epoch: usize,
        on_batch: impl FnMut(usize, RunningScore) + Send,
    ) -> std::result::Result<Score, TrainError> {
        let device = train.images.device().clone();
        if self.splits_batch(self.setup.train.batch_size, &device) {
            kernels::on_training_thread(&device, || self.epoch_steps(train, epoch, on_batch))
        } else {
            self.epoch_steps(train, epoch, on_batch)
        }
    }

    /// [`Trainer::train_epoch`], on the thread it runs on.
    fn epoch_steps(
        &mut self,
        train: &Tensors,
        epoch: usize,
        mut on_batch: impl FnMut(usize, RunningScore),
    ) -> std::result::Result<Score, TrainError> {
        let mut order: Vec<u32> = (0..train.len() as u32).collect();
        order.shuffle(&mut self.shuffle_rng);
        let batch_size = self.setup.train.batch_size;
        let batches = order.len().div_ceil(batch_size);
        let device = train.images.device();
        // The epoch's order goes to the device once; batches are views of it.
        let order_on_device = Tensor::from_slice(&order, order.len(), device)?;
        // Sums stay on the device and are read once per epoch: no sync per batch.
        let mut loss_sum = Tensor::zeros((), DType::F32, device)?;
        let mut correct = Tensor::zeros((), DType::F32, device)?;
        let mut seen = 0usize;
        for (index, chunk) in order.chunks(batch_size).enumerate() {
            let batch = order_on_device.narrow(0, index * batch_size, chunk.len())?;
            if let Some(signal) = interrupt::stop_requested() {
                return Err(TrainError::Interrupted(signal));
            }
            // A batch of one has no batch variance for BatchNorm: skip that remainder.
            if chunk.len() < 2 && self.setup.model.batch_norm {
                continue;
            }
            let lr = self.learning_rate(epoch as f64 + index as f64 / batches as f64);
            let augment = self.setup.augment;
            let (images, labels) = if augment.is_off() {
                train.gather(&batch)?
            } else {
                train.gather_augmented(&batch, chunk, augment, &mut self.augment_rng)?
            };
            let (loss, logits) = self.train_step(&images, &labels, lr)?;
            loss_sum = (loss_sum + (loss * chunk.len() as f64)?)?;
            correct = (correct + count_correct(&logits, &labels)?)?;
            seen += chunk.len();
            on_batch(
                chunk.len(),
                RunningScore {
                    loss_sum: &loss_sum,
                    correct: &correct,
                    seen,
                },
            );
        }
        Ok(RunningScore {
            loss_sum: &loss_sum,
            correct: &correct,
            seen,
        }
        .score()?)
    }

    /// One optimiser step on a batch; returns the (detached) mean loss and logits.
    pub fn train_step(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        lr: f64,
    ) -> Result<(Tensor, Tensor)> {
        let (logits, loss, grads) = self.forward_backward(images, labels)?;
        self.optimizer.step(&grads, lr)?;
        if let Some(ema) = &mut self.ema {
            ema.update()?;
        }
        self.steps += 1;
        Ok((loss.detach(), logits.detach()))
    }

    /// Loss and accuracy on `set` in evaluation mode (running BatchNorm statistics,
    /// no dropout), with the weights in the variables.
    pub fn evaluate(&self, set: &Tensors) -> Result<Score> {
        evaluate(self.model.as_ref(), set, self.setup.train.eval_batch_size)
    }

    /// [`Trainer::evaluate`] with the weights a run validates: the moving
    /// average when there is one, else the raw weights.
    pub fn validate(&self, set: &Tensors) -> Result<Score> {
        match &self.ema {
            Some(ema) => ema.with_averaged(|| self.evaluate(set)),
            None => self.evaluate(set),
        }
    }

    /// Runs `work` with the weights a run validates in the variables (see
    /// [`Trainer::validate`]): what the best checkpoint keeps.
    pub fn with_validated_weights<R>(&self, work: impl FnOnce(&VarMap) -> R) -> Result<R> {
        match &self.ema {
            Some(ema) => ema.with_averaged(|| Ok(work(&self.varmap))),
            None => Ok(work(&self.varmap)),
        }
    }
}

/// Loss and accuracy of `model` on `set`, in batches of `batch_size`.
pub fn evaluate(model: &dyn Classifier, set: &Tensors, batch_size: usize) -> Result<Score> {
    let device = set.images.device();
    let n = set.len();
    let starts: Vec<usize> = (0..n).step_by(batch_size.max(1)).collect();
    // A batch's loss times its size and its number of correct answers, as
    // scalars on the device: read once at the end, no sync per batch.
    let score_batch = |&start: &usize| -> Result<(Tensor, Tensor)> {
        let len = batch_size.min(n - start);
        let batch = set.slice(start, len)?;
        let logits = model.logits(&batch.inputs()?, false)?.detach();
        let loss = kernels::cross_entropy(&logits, &batch.labels)?;
        Ok(((loss * len as f64)?, count_correct(&logits, &batch.labels)?))
    };
    // On the CPU whole batches run side by side, one per thread: a small
    // model's layers then need no hand-off between threads (CustomMLP spent a
    // fifth of its evaluation waking and parking them). The sums below add
    // the batches in order, so the result does not depend on the threads.
    let scores = if kernels::enabled(device) {
        kernels::map_on_both_threads(starts.len(), |index| score_batch(&starts[index]))
            .into_iter()
            .collect::<Result<Vec<_>>>()
    } else {
        kernels::install(device, || {
            if device.is_cpu() {
                starts
                    .par_iter()
                    .map(score_batch)
                    .collect::<Result<Vec<_>>>()
            } else {
                starts.iter().map(score_batch).collect()
            }
        })
    }?;
    let mut loss_sum = Tensor::zeros((), DType::F32, device)?;
    let mut correct = Tensor::zeros((), DType::F32, device)?;
    for (loss, count) in scores {
        loss_sum = (loss_sum + loss)?;
        correct = (correct + count)?;
    }
    Ok(Score {
        loss: loss_sum.to_scalar::<f32>()? as f64 / n as f64,
        accuracy: correct.to_scalar::<f32>()? as f64 / n as f64,
    })
}

/// Number of rows whose largest logit is the label, as an f32 scalar tensor.
fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    model::predictions(logits)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_smoothing_matches_pytorch() {
        // z[0] = (0..10) / 7 - 1, z[1] the same reversed; labels 3 and 8.
        // torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1) = 2.706796...
        let row: Vec<f32> = (0..10).map(|i| i as f32 / 7.0 - 1.0).collect();
        let reversed: Vec<f32> = row.iter().rev().copied().collect();
        let logits = Tensor::from_vec([row, reversed].concat(), (2, 10), &Device::Cpu).unwrap();
        let labels = Tensor::new(&[3u32, 8], &Device::Cpu).unwrap();
        let loss = |s| {
            let loss =
                kernels::install(&Device::Cpu, || smoothed_cross_entropy(&logits, &labels, s))
                    .unwrap();
            loss.to_scalar::<f32>().unwrap()
        };
        assert!((loss(0.1) - 2.706_796_5).abs() < 1e-5, "{}", loss(0.1));
        assert!((loss(0.0) - 2.742_510_7).abs() < 1e-5, "{}", loss(0.0));
    }
}
