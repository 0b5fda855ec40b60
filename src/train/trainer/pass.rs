//! One training batch's forward and backward pass: the whole batch at once, or
//! on the CPU two halves side by side on two threads, their gradients added.
//! Which networks train as halves is the model's call
//! ([`crate::model::ModelConfig::trains_as_halves`]).

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor};

use crate::kernels;
use crate::train::trainer::Trainer;

/// Batches from this size on are split in two halves that train side by side
/// (see [`Trainer::forward_backward`]).
const MIN_SPLIT_BATCH: usize = 32;

impl Trainer {
    /// The batch's logits, mean loss and gradients. Where the batch's examples
    /// are independent (no BatchNorm statistics, no dropout draws), on the CPU
    /// its two halves run side by side, each on one thread with no hand-off
    /// between its ops, and their gradients are added: the same gradient of
    /// the batch mean, with sums in another order. With BatchNorm the halves
    /// meet at each BatchNorm to add their sums (`kernels::run_halves`), so
    /// both normalise with the whole batch's statistics and take their share
    /// of its gradient. Two halves whatever the threads, so a run gives the
    /// same numbers on any machine.
    pub(super) fn forward_backward(
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
    pub(super) fn splits_batch(&self, n: usize, device: &Device) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, on_the_kernel_path, random};
    use crate::model::{ModelConfig, ModelKind};
    use crate::train::TrainSetup;

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
        assert!(!parameters.is_empty(), "{label}: no parameters compared");
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
