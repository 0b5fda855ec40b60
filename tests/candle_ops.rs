//! The path other devices (CUDA) take, checked on the CPU: the models built on
//! Candle's own ops must train like the models built on mnist-lab's kernels.
//! One test in its own binary, because the switch is process-wide.

use candle_core::{Device, Tensor};
use mnist_lab::config::Config;
use mnist_lab::kernels;
use mnist_lab::model::ModelKind;
use mnist_lab::train::{self, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Losses of four SGD steps on fixed random batches, then the evaluation loss.
fn losses(config: &Config, images: &Tensor, labels: &Tensor) -> Vec<f64> {
    let mut trainer = Trainer::new(&config.train_setup(), 32, &Device::Cpu).unwrap();
    let mut out = Vec::new();
    for _ in 0..4 {
        let (loss, _) = trainer.train_step(images, labels, 0.05).unwrap();
        out.push(loss.to_scalar::<f32>().unwrap() as f64);
    }
    let set = mnist_lab::data::Tensors::from_inputs(images.clone(), labels.clone());
    out.push(
        train::evaluate(trainer.model.as_ref(), &set, 16)
            .unwrap()
            .loss,
    );
    out
}

#[test]
fn candle_ops_train_like_the_cpu_kernels() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let pixels: Vec<f32> = (0..32 * 32 * 32)
        .map(|_| rng.random_range(-1.0..2.0))
        .collect();
    let images = Tensor::from_vec(pixels, (32, 1, 32, 32), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec((0..32u32).map(|i| i % 10).collect(), 32, &Device::Cpu).unwrap();
    for (kind, batch_norm) in [
        (ModelKind::Lenet5, false),
        (ModelKind::Lenet5, true),
        (ModelKind::CustomMlp, true),
    ] {
        let mut config = Config::default();
        config.model.kind = kind;
        config.model.batch_norm = batch_norm;
        config.optimizer.weight_decay = 5e-4;
        kernels::use_candle_ops(false);
        let ours = losses(&config, &images, &labels);
        kernels::use_candle_ops(true);
        let candle = losses(&config, &images, &labels);
        for (step, (a, b)) in ours.iter().zip(&candle).enumerate() {
            assert!(
                (a - b).abs() < 1e-3 * a.abs().max(1.0),
                "{kind} batch_norm={batch_norm} step {step}: kernels {a}, Candle {b}\n{ours:?}\n{candle:?}"
            );
        }
    }
}
