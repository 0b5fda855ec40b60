//! The training loop: one epoch of shuffled mini-batches, and evaluation.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
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

/// Batches from this size on are split in two halves that train side by side
/// (see [`Trainer::forward_backward`]).
const MIN_SPLIT_BATCH: usize = 32;

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

    /// The batch's logits, mean loss and gradients. Where the batch's examples
    /// are independent (no BatchNorm statistics, no dropout draws), on the CPU
    /// its two halves run side by side, each on one thread with no hand-off
    /// between its ops, and their gradients are added: the same gradient of
    /// the batch mean, with sums in another order. With BatchNorm the halves
    /// meet at each BatchNorm to add their sums (`kernels::run_halves`), so
    /// both normalise with the whole batch's statistics and take their share
    /// of its gradient. Two halves whatever the threads, so a run gives the
    /// same numbers on any machine.
    fn forward_backward(
        &self,
        images: &Tensor,
        labels: &Tensor,
    ) -> Result<(Tensor, Tensor, GradStore)> {
        let (n, device) = (images.dim(0)?, images.device());
        if !self.splits_batch(n, device) {
            return kernels::install(device, || self.weighted_pass(images, labels, None));
        }
        self.two_halves(images, labels)
    }

    /// [`Trainer::forward_backward`] of a batch as two halves, their logits,
    /// losses and gradients put together.
    fn two_halves(&self, images: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor, GradStore)> {
        let n = images.dim(0)?;
        let half = n / 2;
        let part = |index: usize| {
            let (start, len) = [(0, half), (half, n - half)][index];
            let share = len as f64 / n as f64;
            self.weighted_pass(
                &images.narrow(0, start, len)?,
                &labels.narrow(0, start, len)?,
                Some(share),
            )
        };
        let (first, second) = kernels::run_halves(part);
        let ((logits, loss, mut grads), (logits_2, loss_2, grads_2)) = (first?, second?);
        for var in self.varmap.all_vars() {
            let var = var.as_tensor();
            match (grads.get(var), grads_2.get(var)) {
                // The first half's gradient is this step's own tensor: add in place.
                (Some(grad), Some(grad_2)) => kernels::add_assign(grad, grad_2)?,
                (None, Some(grad_2)) => {
                    grads.insert(var, grad_2.clone());
                }
                _ => {}
            }
        }
        Ok((
            Tensor::cat(&[&logits, &logits_2], 0)?,
            (loss + loss_2)?,
            grads,
        ))
    }

    /// Whether a batch of `n` examples on `device` trains as two halves (see
    /// [`Trainer::forward_backward`]).
    fn splits_batch(&self, n: usize, device: &Device) -> bool {
        self.setup.model.trains_as_halves() && n >= MIN_SPLIT_BATCH && kernels::enabled(device)
    }

    /// Forward and backward over `images`, the loss scaled by `share` (this
    /// part's share of the batch) when given.
    fn weighted_pass(
        &self,
        images: &Tensor,
        labels: &Tensor,
        share: Option<f64>,
    ) -> Result<(Tensor, Tensor, GradStore)> {
        let logits = self.model.logits(images, true)?;
        let mut loss = smoothed_cross_entropy(&logits, labels, self.setup.train.label_smoothing)?;
        if let Some(share) = share {
            loss = (loss * share)?;
        }
        let grads = loss.backward()?;
        Ok((logits, loss, grads))
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

/// Cross-entropy against labels smoothed by `smoothing` (PyTorch's
/// `label_smoothing`): `(1 - s) * CE(z, y) + s * mean over classes of -log softmax(z)`.
pub fn smoothed_cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let plain = kernels::cross_entropy(logits, labels)?;
    if smoothing == 0.0 {
        return Ok(plain);
    }
    let uniform = candle_nn::ops::log_softmax(logits, 1)?.mean_all()?.neg()?;
    (plain * (1.0 - smoothing))? + (uniform * smoothing)?
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
    use crate::kernels::testing::{max_diff, on_the_kernel_path, random};
    use crate::model::{ModelConfig, ModelKind};

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

    fn trainer(kind: ModelKind, batch_norm: bool) -> Trainer {
        let setup = TrainSetup {
            model: ModelConfig {
                kind,
                batch_norm,
                ..ModelConfig::default()
            },
            optimizer: Default::default(),
            schedule: Default::default(),
            train: crate::train::TrainConfig {
                label_smoothing: 0.1,
                ..Default::default()
            },
            augment: Default::default(),
            seed: 0,
        };
        Trainer::new(&setup, 32, &Device::Cpu).unwrap()
    }

    /// `n` random images and labels.
    fn batch(n: usize) -> (Tensor, Tensor) {
        let images = random(&[n, 1, 32, 32], 1);
        let labels: Vec<u32> = (0..n as u32).map(|i| i * 7 % 10).collect();
        (images, Tensor::from_vec(labels, n, &Device::Cpu).unwrap())
    }

    type Pass = (Tensor, Tensor, GradStore);

    /// The split pass's logits, loss and the gradient of every parameter match
    /// the whole pass's (each from its trainer, of the same initial weights).
    fn assert_same_pass(
        (trainer, split): (&Trainer, &Pass),
        (whole_trainer, whole): (&Trainer, &Pass),
        label: &str,
    ) {
        assert!(max_diff(&split.0, &whole.0) < 1e-5, "{label} logits");
        assert!(max_diff(&split.1, &whole.1) < 1e-5, "{label} loss");
        // Copies: the two trainers may be one.
        let named = |t: &Trainer| t.varmap.data().lock().unwrap().clone();
        let (vars, whole_vars) = (named(trainer), named(whole_trainer));
        let parameters: Vec<&String> = vars
            .keys()
            .filter(|name| !name.contains("running"))
            .collect();
        assert!(parameters.len() >= 10);
        for name in parameters {
            let var = vars[name].as_tensor();
            let whole_var = whole_vars[name].as_tensor();
            let (a, b) = (split.2.get(var).unwrap(), whole.2.get(whole_var).unwrap());
            let scale = max_diff(b, &b.zeros_like().unwrap()).max(1e-3);
            let diff = max_diff(a, b);
            assert!(
                diff / scale < 1e-4,
                "{label} gradient {:?}: {diff}",
                var.shape()
            );
        }
    }

    /// (logits, loss, gradients) of a batch through `forward_backward` and
    /// through one whole pass.
    fn split_and_whole(trainer: &Trainer, n: usize) -> [Pass; 2] {
        let (images, labels) = batch(n);
        [
            trainer.forward_backward(&images, &labels).unwrap(),
            kernels::install(&Device::Cpu, || {
                trainer.weighted_pass(&images, &labels, None).unwrap()
            }),
        ]
    }

    /// A batch trained as two halves side by side gives the whole batch's
    /// loss, logits and gradients (up to the order of the sums).
    #[test]
    fn split_batches_give_the_whole_batch_gradient() {
        on_the_kernel_path();
        for &model in ModelKind::ALL {
            let trainer = trainer(model, false);
            assert!(trainer.splits_batch(37, &Device::Cpu), "{model:?} splits");
            let [split, whole] = split_and_whole(&trainer, 37);
            let pair = |pass| (&trainer, pass);
            assert_same_pass(pair(&split), pair(&whole), &format!("{model:?}"));
        }
    }

    /// With BatchNorm the halves meet at each BatchNorm: the same loss,
    /// logits and gradients as the whole batch, and the running statistics
    /// move once, towards the whole batch's. (CustomMLP's BatchNorm batches
    /// stay whole in training, but its dense layers meet the same way.)
    #[test]
    fn batch_norm_halves_give_the_whole_batch_gradient() {
        on_the_kernel_path();
        for &model in ModelKind::ALL {
            let trainer = trainer(model, true);
            let policy = trainer.setup.model.trains_as_halves();
            assert_eq!(trainer.splits_batch(37, &Device::Cpu), policy, "{model:?}");
        }
        for &model in ModelKind::ALL {
            let [split, whole] = [0, 1].map(|_| trainer(model, true));
            let (images, labels) = batch(37);
            let split_pass = split.two_halves(&images, &labels).unwrap();
            let whole_pass = kernels::install(&Device::Cpu, || {
                whole.weighted_pass(&images, &labels, None).unwrap()
            });
            assert_same_pass(
                (&split, &split_pass),
                (&whole, &whole_pass),
                &format!("{model:?}"),
            );
            let buffers = |t: &Trainer| -> Vec<(String, Tensor)> {
                let data = t.varmap.data().lock().unwrap();
                let mut named: Vec<_> = data
                    .iter()
                    .filter(|(name, _)| name.contains("running"))
                    .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
                    .collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                named
            };
            let (ours, theirs) = (buffers(&split), buffers(&whole));
            assert!(ours.len() >= 4, "{model:?} has running statistics");
            for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
                assert!(
                    max_diff(a, b) < 1e-5,
                    "{model:?} {name}: {}",
                    max_diff(a, b)
                );
            }
        }
    }

    /// With one kernel thread the halves take turns: the same numbers as two.
    #[test]
    fn batch_norm_halves_taking_turns_match_halves_side_by_side() {
        on_the_kernel_path();
        let trainer = trainer(ModelKind::Lenet5, true);
        let (images, labels) = batch(40);
        let part = |index: usize| {
            let (start, len) = [(0, 20), (20, 20)][index];
            let part = |t: &Tensor| t.narrow(0, start, len).unwrap();
            trainer
                .weighted_pass(&part(&images), &part(&labels), Some(0.5))
                .unwrap()
        };
        let side_by_side = kernels::run_halves_with(false, part);
        let in_turns = kernels::run_halves_with(true, part);
        for (a, b) in [
            (&side_by_side.0, &in_turns.0),
            (&side_by_side.1, &in_turns.1),
        ] {
            assert_eq!(max_diff(&a.0, &b.0), 0.0);
            let mut compared = 0;
            for var in trainer.varmap.all_vars() {
                let var = var.as_tensor();
                // Running statistics have no gradient, in either.
                assert_eq!(a.2.get(var).is_some(), b.2.get(var).is_some());
                if let (Some(x), Some(y)) = (a.2.get(var), b.2.get(var)) {
                    assert_eq!(max_diff(x, y), 0.0);
                    compared += 1;
                }
            }
            assert!(compared >= 10, "every parameter's gradient compared");
        }
    }
}
