//! The CUDA path against the CPU: the same seeded model, batches and optimiser
//! steps must give the same losses, weights and evaluation on a GPU as on the
//! CPU (within float noise: the GPU sums in another order).
//!
//! Built only with `--features cuda`. Without a GPU each test says so and passes,
//! unless `MNIST_LAB_REQUIRE_CUDA=1` (scripts/gpu-check.sh sets it), where no GPU
//! is a failure.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor};
use mnist_lab::config::Config;
use mnist_lab::kernels;
use mnist_lab::model::ModelKind;
use mnist_lab::train::optim::OptimizerKind;
use mnist_lab::train::{self, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The first GPU, or `None` (with a message) where there is none and none is required.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(err) if std::env::var("MNIST_LAB_REQUIRE_CUDA").is_ok_and(|v| v == "1") => {
            panic!("MNIST_LAB_REQUIRE_CUDA=1 but no GPU could be opened: {err}")
        }
        Err(err) => {
            eprintln!("skipped: no GPU could be opened ({err})");
            None
        }
    }
}

/// Fixed random images (32 of them, 32x32) and labels, on `device`.
fn batch(device: &Device) -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let pixels: Vec<f32> = (0..32 * 32 * 32)
        .map(|_| rng.random_range(-1.0..2.0))
        .collect();
    let images = Tensor::from_vec(pixels, (32, 1, 32, 32), device).unwrap();
    let labels = Tensor::from_vec((0..32u32).map(|i| i % 10).collect(), 32, device).unwrap();
    (images, labels)
}

/// Losses of four optimiser steps on a fixed batch, the evaluation loss and
/// accuracy after them, and the trained weights (on the host, by name).
struct Trace {
    losses: Vec<f64>,
    accuracy: f64,
    weights: Vec<(String, Vec<f32>)>,
}

fn trace(config: &Config, device: &Device) -> Trace {
    let (images, labels) = batch(device);
    let mut trainer = Trainer::new(&config.train_setup(), 32, device).unwrap();
    let lr = config.optimizer.lr();
    let mut losses = Vec::new();
    for _ in 0..4 {
        let (loss, _) = trainer.train_step(&images, &labels, lr).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap() as f64);
    }
    let set = mnist_lab::data::Tensors::from_inputs(images, labels);
    let score = train::evaluate(trainer.model.as_ref(), &set, 16).unwrap();
    losses.push(score.loss);
    let mut weights: Vec<(String, Vec<f32>)> = trainer
        .varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), on_host(var.as_tensor())))
        .collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Trace {
        losses,
        accuracy: score.accuracy,
        weights,
    }
}

fn assert_close(what: &str, cpu: f64, gpu: f64, tolerance: f64) {
    assert!(
        (cpu - gpu).abs() <= tolerance * cpu.abs().max(1.0),
        "{what}: CPU {cpu}, CUDA {gpu}"
    );
}

/// Every model variant and optimiser the configs use, trained a few steps on
/// both devices.
#[test]
fn cuda_trains_like_the_cpu() {
    let Some(gpu) = gpu() else { return };
    // Adam only without BatchNorm: a bias just before BatchNorm has a gradient
    // of float noise (the normalisation removes it), which Adam scales up to a
    // full step, different on each device.
    let variants = [
        (ModelKind::Lenet5, false, OptimizerKind::Sgd),
        (ModelKind::Lenet5, true, OptimizerKind::Sgd),
        (ModelKind::CustomMlp, false, OptimizerKind::Adam),
        (ModelKind::CustomMlp, true, OptimizerKind::Sgd),
    ];
    for (kind, batch_norm, optimizer) in variants {
        let mut config = Config::default();
        config.model.kind = kind;
        config.model.batch_norm = batch_norm;
        config.optimizer.kind = optimizer;
        config.optimizer.weight_decay = 5e-4;
        config.optimizer.lr = Some(match optimizer {
            OptimizerKind::Sgd => 0.05,
            _ => 0.003,
        });
        let label = format!("{kind} batch_norm={batch_norm} {optimizer:?}");
        let cpu = trace(&config, &Device::Cpu);
        let cuda = trace(&config, &gpu);
        for (step, (a, b)) in cpu.losses.iter().zip(&cuda.losses).enumerate() {
            assert_close(&format!("{label}: loss at step {step}"), *a, *b, 1e-3);
        }
        assert_close(
            &format!("{label}: evaluation accuracy"),
            cpu.accuracy,
            cuda.accuracy,
            0.04,
        );
        for ((name, a), (_, b)) in cpu.weights.iter().zip(&cuda.weights) {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-3, "{label}: {name} differs by {worst}");
        }
    }
}

/// A tensor made on the GPU and a checkpoint's tensors come back to the host
/// intact (the run directory saves from whichever device trained).
#[test]
fn weights_round_trip_through_a_checkpoint_from_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let config = Config::default();
    let trainer = Trainer::new(&config.train_setup(), 32, &gpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    trainer.varmap.save(&path).unwrap();
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for (name, var) in trainer.varmap.data().lock().unwrap().iter() {
        assert_eq!(on_host(var.as_tensor()), on_host(&loaded[name]), "{name}");
    }
}

/// Random values in [-1, 2) of `shape`, the same on every device.
fn random(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..2.0)).collect();
    Tensor::from_vec(values, shape, device).unwrap()
}

/// Compares one op's outputs, notes the difference in `report`; true if close.
fn check(report: &mut Vec<String>, what: String, cpu: Tensor, cuda: Tensor) -> bool {
    let diff = max_difference(&cpu, &cuda);
    report.push(format!("{what}: max difference {diff:e}"));
    diff < 1e-3
}

/// A tensor's values, flattened, on the host.
fn on_host(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (on_host(a), on_host(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Each op of the networks' forward pass at the batch sizes runs use (training
/// 64 and 256, evaluation 1000, the latter also as a view into a larger set as
/// evaluation slices it), and a whole evaluation, against the CPU.
#[test]
fn cuda_ops_match_the_cpu_at_the_batch_sizes_runs_use() {
    let Some(gpu) = gpu() else { return };
    let mut report = Vec::new();
    let mut ok = true;
    for batch in [64, 256, 1000] {
        for (c_in, side, c_out) in [(1, 32, 6), (6, 14, 16), (16, 5, 120)] {
            let x = |d: &Device| random(&[batch, c_in, side, side], 1, d);
            let w = |d: &Device| random(&[c_out, c_in, 5, 5], 2, d);
            let b = |d: &Device| random(&[c_out], 3, d);
            let cpu =
                kernels::conv2d(&x(&Device::Cpu), &w(&Device::Cpu), &b(&Device::Cpu)).unwrap();
            let cuda = kernels::conv2d(&x(&gpu), &w(&gpu), &b(&gpu)).unwrap();
            ok &= check(
                &mut report,
                format!("conv {c_in}->{c_out} on {side}x{side}, batch {batch}"),
                cpu,
                cuda,
            );
        }
        for (c, side) in [(6, 28), (16, 10)] {
            let x = |d: &Device| random(&[batch, c, side, side], 4, d);
            let cpu = kernels::max_pool2x2(&x(&Device::Cpu)).unwrap();
            let cuda = kernels::max_pool2x2(&x(&gpu)).unwrap();
            ok &= check(
                &mut report,
                format!("max-pool {c}x{side}x{side}, batch {batch}"),
                cpu,
                cuda,
            );
            let cpu = x(&Device::Cpu).tanh().unwrap();
            let cuda = x(&gpu).tanh().unwrap();
            ok &= check(
                &mut report,
                format!("tanh {c}x{side}x{side}, batch {batch}"),
                cpu,
                cuda,
            );
        }
        let x = |d: &Device| random(&[batch, 120], 5, d);
        let w = |d: &Device| random(&[84, 120], 6, d);
        let b = |d: &Device| random(&[84], 7, d);
        let cpu = kernels::linear(&x(&Device::Cpu), &w(&Device::Cpu), &b(&Device::Cpu)).unwrap();
        let cuda = kernels::linear(&x(&gpu), &w(&gpu), &b(&gpu)).unwrap();
        ok &= check(
            &mut report,
            format!("linear 120->84, batch {batch}"),
            cpu,
            cuda,
        );
    }
    // Whole networks in evaluation mode over 3,000 images in batches of 1,000:
    // logits of a view at an offset, then loss and accuracy as runs compute them.
    for (kind, batch_norm) in [
        (ModelKind::Lenet5, false),
        (ModelKind::Lenet5, true),
        (ModelKind::CustomMlp, false),
    ] {
        let mut config = Config::default();
        config.model.kind = kind;
        config.model.batch_norm = batch_norm;
        let scores: Vec<(f64, f64, Tensor)> = [Device::Cpu, gpu.clone()]
            .iter()
            .map(|device| {
                let trainer = Trainer::new(&config.train_setup(), 32, device).unwrap();
                let images = random(&[3000, 1, 32, 32], 8, device);
                let labels =
                    Tensor::from_vec((0..3000u32).map(|i| i % 10).collect(), 3000, device).unwrap();
                let view = images.narrow(0, 1000, 1000).unwrap();
                let logits = trainer.model.logits(&view, false).unwrap();
                let set = mnist_lab::data::Tensors::from_inputs(images, labels);
                let score = train::evaluate(trainer.model.as_ref(), &set, 1000).unwrap();
                (score.loss, score.accuracy, logits)
            })
            .collect();
        let [
            (cpu_loss, cpu_acc, cpu_logits),
            (gpu_loss, gpu_acc, gpu_logits),
        ] = &scores[..]
        else {
            unreachable!()
        };
        let label = format!("{kind} batch_norm={batch_norm}");
        ok &= check(
            &mut report,
            format!("{label}: logits of images 1000..2000"),
            cpu_logits.clone(),
            gpu_logits.clone(),
        );
        report.push(format!("{label}: evaluation loss CPU {cpu_loss} CUDA {gpu_loss}, accuracy CPU {cpu_acc} CUDA {gpu_acc}"));
        ok &= (cpu_loss - gpu_loss).abs() < 1e-3 && (cpu_acc - gpu_acc).abs() < 0.01;
    }
    let report = report.join("\n");
    eprintln!("{report}");
    assert!(ok, "CUDA differs from the CPU:\n{report}");
}

/// Byte images decode to the same inputs on the GPU (a gather through a table
/// there) as on the CPU, plain and with shift augmentation.
#[test]
fn byte_images_decode_alike_on_both_devices() {
    let Some(gpu) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let split = mnist_lab::data::Split {
        images: (0..20 * 784).map(|_| rng.random_range(0..=255u8)).collect(),
        labels: (0..20u8).map(|i| i % 10).collect(),
    };
    let config = mnist_lab::data::DataConfig::default();
    let indices: Vec<usize> = (0..20).collect();
    let picks = [3u32, 0, 19, 7, 255 % 20];
    let decoded: Vec<(Vec<f32>, Vec<f32>)> = [Device::Cpu, gpu]
        .iter()
        .map(|device| {
            let set = mnist_lab::data::prepare::tensors(&split, &indices, &config, device).unwrap();
            let ids = Tensor::new(&picks, device).unwrap();
            let (plain, _) = set.gather(&ids).unwrap();
            let mut shift_rng = ChaCha8Rng::seed_from_u64(1);
            let (shifted, _) = set.gather_shifted(&ids, &picks, 2, &mut shift_rng).unwrap();
            (on_host(&plain), on_host(&shifted))
        })
        .collect();
    assert_eq!(decoded[0].0, decoded[1].0, "plain gather");
    assert_eq!(decoded[0].1, decoded[1].1, "shifted gather");
}

/// Our CUDA kernels are in use on the GPU (a build that fell back to Candle's
/// ops fails here), and the cross-entropy kernel gives the CPU kernel's loss
/// and gradient; the CPU's exp and log are not CUDA's, so within an ulp or so.
#[test]
fn our_cross_entropy_kernel_runs_on_the_gpu_like_the_cpus() {
    let Some(gpu) = gpu() else { return };
    assert!(
        kernels::gpu_enabled(&gpu),
        "the cuda build does not run its own kernels on {gpu:?}"
    );
    for rows in [1, 64, 1000] {
        let logits = (random(&[rows, 10], rows as u64, &Device::Cpu) * 7.0).unwrap();
        let labels: Vec<u32> = (0..rows as u32).map(|i| i * 3 % 10).collect();
        let labels = Tensor::from_vec(labels, rows, &Device::Cpu).unwrap();
        let grads = |device: &Device| {
            let logits = candle_core::Var::from_tensor(&logits.to_device(device).unwrap()).unwrap();
            let labels = labels.to_device(device).unwrap();
            let loss = kernels::cross_entropy(&logits, &labels).unwrap();
            let grad = (&loss * 2.0).unwrap().backward().unwrap();
            let grad = grad.get(&logits).unwrap().to_device(&Device::Cpu).unwrap();
            (loss.to_device(&Device::Cpu).unwrap(), grad)
        };
        let (cpu_loss, cpu_grad) = grads(&Device::Cpu);
        let (gpu_loss, gpu_grad) = grads(&gpu);
        let (a, b) = (
            cpu_loss.to_scalar::<f32>().unwrap(),
            gpu_loss.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
            "{rows} rows: loss {a} on the CPU, {b} on the GPU"
        );
        let d = max_difference(&cpu_grad, &gpu_grad);
        assert!(d < 1e-7, "{rows} rows: gradients differ by {d}");
    }
}

/// SGD's update on the GPU (momentum buffer and step, Nesterov and L2) gives
/// the CPU's weights to the bit: same gradients, same rounding.
#[test]
fn our_sgd_kernels_give_the_cpus_bits() {
    let Some(gpu) = gpu() else { return };
    let config = mnist_lab::train::optim::OptimizerConfig {
        nesterov: true,
        weight_decay: 5e-4,
        ..Default::default()
    };
    let target = random(&[3001], 5, &Device::Cpu);
    let weights = |device: &Device| {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device);
        let w = vb
            .get_with_hints(3001, "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let target = target.to_device(device).unwrap();
        let mut optimizer = mnist_lab::train::optim::Optimizer::new(&config, &varmap);
        for step in 0..3 {
            let loss = ((&w - &target).unwrap().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            optimizer
                .step(&loss.backward().unwrap(), 0.05 / (1 + step) as f64)
                .unwrap();
        }
        on_host(&w)
    };
    let (cpu, cuda) = (weights(&Device::Cpu), weights(&gpu));
    let differing = cpu
        .iter()
        .zip(&cuda)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "{differing} of {} weights differ", cpu.len());
}
