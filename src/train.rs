//! The training loop: one epoch of shuffled mini-batches, and evaluation.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::config::Config;
use crate::data::Tensors;
use crate::kernels;
use crate::models::{self, Classifier};
use crate::optim::{self, Optimizer};

/// Set (by the Ctrl-C handler) to stop training after the current batch.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks running training loops to stop after their current batch; returns whether
/// a stop had already been requested.
pub fn request_stop() -> bool {
    STOP_REQUESTED.swap(true, Ordering::SeqCst)
}

/// Whether a stop was requested: a run that then errs was interrupted.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Mean loss and accuracy over a set of images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub loss: f64,
    pub accuracy: f64,
}

/// A model, its variables and its optimiser, with the state of the run.
pub struct Trainer {
    pub model: Box<dyn Classifier>,
    pub varmap: VarMap,
    optimizer: Optimizer,
    config: Config,
    shuffle_rng: ChaCha8Rng,
    augment_rng: ChaCha8Rng,
    /// Optimiser steps taken so far (PyTorch's BatchNorm `num_batches_tracked`).
    pub steps: u64,
}

impl Trainer {
    pub fn new(config: &Config, input_side: usize, device: &Device) -> Result<Trainer> {
        let varmap = VarMap::new();
        let model = models::build(&config.model, input_side, config.seed, &varmap, device)?;
        let optimizer = Optimizer::new(&config.optimizer, &varmap);
        Ok(Trainer {
            model,
            varmap,
            optimizer,
            config: config.clone(),
            shuffle_rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x5_4FF1E),
            augment_rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0xA_0637),
            steps: 0,
        })
    }

    pub fn parameter_count(&self) -> usize {
        models::parameter_count(&self.varmap)
    }

    /// The learning rate `epochs_done` (fractional) epochs into the run.
    pub fn learning_rate(&self, epochs_done: f64) -> f64 {
        optim::learning_rate(
            &self.config.schedule,
            self.config.optimizer.lr(),
            epochs_done,
            self.config.train.epochs,
        )
    }

    /// Trains one epoch (`epoch` counts from 0) over `train` in a fresh seeded order;
    /// `on_batch` hears the number of images of each batch done.
    pub fn train_epoch(
        &mut self,
        train: &Tensors,
        epoch: usize,
        mut on_batch: impl FnMut(usize),
    ) -> Result<Score> {
        let mut order: Vec<u32> = (0..train.len() as u32).collect();
        order.shuffle(&mut self.shuffle_rng);
        let batch_size = self.config.train.batch_size;
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
            if STOP_REQUESTED.load(Ordering::Relaxed) {
                return Err(candle_core::Error::Msg("interrupted".into()));
            }
            // A batch of one has no batch variance for BatchNorm: skip that remainder.
            if chunk.len() < 2 && self.config.model.batch_norm {
                continue;
            }
            let lr = self.learning_rate(epoch as f64 + index as f64 / batches as f64);
            let (images, labels) = match self.config.data.augment_shift {
                0 => train.gather(&batch)?,
                shift => train.gather_shifted(&batch, chunk, shift, &mut self.augment_rng)?,
            };
            let (loss, logits) = self.train_step(&images, &labels, lr)?;
            loss_sum = (loss_sum + (loss * chunk.len() as f64)?)?;
            correct = (correct + count_correct(&logits, &labels)?)?;
            seen += chunk.len();
            on_batch(chunk.len());
        }
        Ok(Score {
            loss: loss_sum.to_scalar::<f32>()? as f64 / seen as f64,
            accuracy: correct.to_scalar::<f32>()? as f64 / seen as f64,
        })
    }

    /// One optimiser step on a batch; returns the (detached) mean loss and logits.
    pub fn train_step(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        lr: f64,
    ) -> Result<(Tensor, Tensor)> {
        let model = self.model.as_ref();
        let (logits, loss, grads) = kernels::install(|| -> Result<_> {
            let logits = model.logits(images, true)?;
            let loss = kernels::cross_entropy(&logits, labels)?;
            let grads = loss.backward()?;
            Ok((logits, loss, grads))
        })?;
        self.optimizer.step(&grads, lr)?;
        self.steps += 1;
        Ok((loss.detach(), logits.detach()))
    }

    /// Loss and accuracy on `set` in evaluation mode (running BatchNorm statistics,
    /// no dropout).
    pub fn evaluate(&self, set: &Tensors) -> Result<Score> {
        evaluate(self.model.as_ref(), set, self.config.train.eval_batch_size)
    }
}

/// Loss and accuracy of `model` on `set`, in batches of `batch_size`.
pub fn evaluate(model: &dyn Classifier, set: &Tensors, batch_size: usize) -> Result<Score> {
    let device = set.images.device();
    let mut loss_sum = Tensor::zeros((), DType::F32, device)?;
    let mut correct = Tensor::zeros((), DType::F32, device)?;
    let n = set.len();
    for start in (0..n).step_by(batch_size) {
        let len = batch_size.min(n - start);
        let batch = set.slice(start, len)?;
        let logits = kernels::install(|| model.logits(&batch.images, false))?.detach();
        let loss = kernels::cross_entropy(&logits, &batch.labels)?;
        loss_sum = (loss_sum + (loss * len as f64)?)?;
        correct = (correct + count_correct(&logits, &batch.labels)?)?;
    }
    Ok(Score {
        loss: loss_sum.to_scalar::<f32>()? as f64 / n as f64,
        accuracy: correct.to_scalar::<f32>()? as f64 / n as f64,
    })
}

/// Number of rows whose largest logit is the label, as an f32 scalar tensor.
fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    models::predictions(logits)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()
}
