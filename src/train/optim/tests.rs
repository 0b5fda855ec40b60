//! The optimisers against PyTorch's update rules, step by step.

use super::*;
use candle_core::{DType, Device};

/// Minimises 0.5 * w^2 (gradient w) from w = 1 with the given optimiser.
fn run(config: OptimizerConfig, steps: usize, lr: f64) -> Vec<f32> {
    run_towards(config, steps, lr, 0.0)
}

/// Minimises 0.5 * (w - target)^2 (gradient w - target) from w = 1.
fn run_towards(config: OptimizerConfig, steps: usize, lr: f64, target: f64) -> Vec<f32> {
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let w = vb
        .get_with_hints(1, "w", candle_nn::Init::Const(1.0))
        .unwrap();
    let mut optimizer = Optimizer::new(&config, &varmap);
    let mut trace = Vec::new();
    for _ in 0..steps {
        let loss = ((&w - target).unwrap().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        optimizer.step(&loss.backward().unwrap(), lr).unwrap();
        trace.push(w.to_vec1::<f32>().unwrap()[0]);
    }
    trace
}

/// Without decay on biases and norms, a 1-D parameter with no gradient
/// stays put while a weight matrix shrinks, for every optimiser kind.
#[test]
fn bias_and_norm_can_be_spared_weight_decay() {
    for kind in [
        OptimizerKind::Sgd,
        OptimizerKind::Adam,
        OptimizerKind::Adamw,
    ] {
        for decay_bias_and_norm in [true, false] {
            let varmap = VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let init = candle_nn::Init::Const(1.0);
            let weight = vb.get_with_hints((2, 2), "weight", init).unwrap();
            let bias = vb.get_with_hints(2, "bias", init).unwrap();
            let config = OptimizerConfig {
                kind,
                weight_decay: 0.1,
                decay_bias_and_norm,
                ..OptimizerConfig::default()
            };
            let mut optimizer = Optimizer::new(&config, &varmap);
            // A gradient of exactly zero for both (2p - 2p): only decay moves them.
            let square = |p: &Tensor| p.sqr().unwrap().sum_all().unwrap();
            let total = (square(&weight) + square(&bias)).unwrap();
            let loss = (&total - &total).unwrap();
            optimizer.step(&loss.backward().unwrap(), 0.1).unwrap();
            let first = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let label = format!("{kind:?} decay_bias_and_norm={decay_bias_and_norm}");
            assert!(first(&weight) < 1.0, "{label}: the weight decays");
            assert_eq!(first(&bias) < 1.0, decay_bias_and_norm, "{label}: the bias");
        }
    }
}

/// A gradient that Candle computed from tracked tensors carries their graph;
/// state kept across steps must not, or each step's graph stays alive.
#[test]
fn optimizer_state_holds_no_graph() {
    for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints(3, "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let config = OptimizerConfig {
            kind,
            ..OptimizerConfig::default()
        };
        let mut optimizer = Optimizer::new(&config, &varmap);
        for _ in 0..2 {
            let loss = ((&w * &w).unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            assert!(
                grads.get(&w).unwrap().track_op(),
                "the premise: a tracked gradient"
            );
            optimizer.step(&grads, 0.1).unwrap();
        }
        for (name, tensor) in optimizer.state_tensors() {
            assert!(!tensor.track_op(), "{kind:?}: {name} keeps a graph");
        }
    }
}

fn close(a: &[f32], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-5)
}

#[test]
fn sgd_momentum_matches_pytorch() {
    // torch.optim.SGD([w], lr=0.1, momentum=0.9), grad = w:
    // buf1 = 1 -> w = 0.9; buf2 = 0.9*1 + 0.9 = 1.8 -> w = 0.72.
    let config = OptimizerConfig {
        momentum: 0.9,
        ..Default::default()
    };
    assert!(close(&run(config, 2, 0.1), &[0.9, 0.72]));
}

#[test]
fn sgd_nesterov_and_weight_decay_match_pytorch() {
    // g = w + 0.1 w = 1.1; buf = 1.1; nesterov g = 1.1 + 0.9*1.1 = 2.09 -> w = 1 - 0.209.
    let config = OptimizerConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.1,
        ..Default::default()
    };
    assert!(close(&run(config, 1, 0.1), &[0.791]));
}

#[test]
fn adam_first_step_moves_by_lr() {
    // Bias correction makes Adam's first step exactly lr * sign(grad).
    let config = OptimizerConfig {
        kind: OptimizerKind::Adam,
        ..Default::default()
    };
    assert!(close(&run(config, 1, 0.01), &[0.99]));
}

#[test]
fn adam_adds_weight_decay_to_the_gradient_and_adamw_does_not() {
    // Towards w = 3 from 1, lr 0.1, decay 1: torch.optim.Adam and AdamW give
    // these three steps (checked with torch 2.x in float64).
    let with = |kind| OptimizerConfig {
        kind,
        weight_decay: 1.0,
        ..Default::default()
    };
    let adam = run_towards(with(OptimizerKind::Adam), 3, 0.1, 3.0);
    assert!(
        close(&adam, &[1.1, 1.198_812_578, 1.295_128_747]),
        "{adam:?}"
    );
    let plain = OptimizerConfig {
        kind: OptimizerKind::Adam,
        ..Default::default()
    };
    let no_decay = run_towards(plain, 3, 0.1, 3.0);
    assert!(
        close(&no_decay, &[1.1, 1.199_833_513, 1.299_376_607]),
        "{no_decay:?}"
    );
    let adamw = run_towards(with(OptimizerKind::Adamw), 3, 0.1, 3.0);
    assert!(close(&adamw, &[1.0, 1.0, 1.0]), "{adamw:?}");
}

#[test]
fn adamw_decouples_weight_decay() {
    // w = 1 * (1 - 0.01 * 0.5) = 0.995, then the Adam step of 0.01.
    let config = OptimizerConfig {
        kind: OptimizerKind::Adamw,
        weight_decay: 0.5,
        ..Default::default()
    };
    assert!(close(&run(config, 1, 0.01), &[0.985]));
    // Adam with the same decay adds it to the gradient instead: the first step is still lr.
    let config = OptimizerConfig {
        kind: OptimizerKind::Adam,
        weight_decay: 0.5,
        ..Default::default()
    };
    assert!(close(&run(config, 1, 0.01), &[0.99]));
}

/// The GPU's `adam_step`, as its factors and order of rounding give it
/// (`kernels::gpu::launch::AdamFactors`), makes the CPU's update to the bit,
/// moments included, for Adam and AdamW, with and without decay, over steps.
#[test]
fn the_gpu_adam_kernels_arithmetic_is_the_cpus() {
    use crate::kernels::gpu::launch::{AdamFactors, AdamSettings};
    use crate::kernels::testing::random;
    for (kind, weight_decay) in [
        (OptimizerKind::Adam, 0.0),
        (OptimizerKind::Adam, 5e-4),
        (OptimizerKind::Adamw, 0.05),
    ] {
        let config = OptimizerConfig {
            kind,
            weight_decay,
            ..Default::default()
        };
        let (mut param, mut state) = (random(&[257], 1), State::Empty);
        let mut gpu_param = param.to_vec1::<f32>().unwrap();
        let mut gpu_moments: Option<Vec<(f32, f32)>> = None;
        for step in 1..=4u64 {
            let grad = random(&[257], 10 + step);
            let lr = 0.003 * step as f64;
            param = adam(&config, &param, &grad, &mut state, lr, step).unwrap();
            let factors = AdamFactors::new(&AdamSettings {
                lr,
                beta1: config.beta1,
                beta2: config.beta2,
                eps: config.eps,
                weight_decay,
                decoupled: kind.decouples_weight_decay(),
                step,
            });
            let grads = grad.to_vec1::<f32>().unwrap();
            let mut moments = Vec::new();
            for (i, p) in gpu_param.iter_mut().enumerate() {
                let before = gpu_moments.as_ref().map(|m| m[i]);
                let (updated, m, v) = factors.apply(*p, grads[i], before);
                *p = updated;
                moments.push((m, v));
            }
            gpu_moments = Some(moments);
            let cpu = param.to_vec1::<f32>().unwrap();
            let same = cpu
                .iter()
                .zip(&gpu_param)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{kind:?} decay {weight_decay} step {step}");
        }
        let State::Moments { first, second } = &state else {
            panic!("Adam keeps moments");
        };
        let (first, second) = (
            first.to_vec1::<f32>().unwrap(),
            second.to_vec1::<f32>().unwrap(),
        );
        for (i, (m, v)) in gpu_moments.unwrap().into_iter().enumerate() {
            assert_eq!(
                (m.to_bits(), v.to_bits()),
                (first[i].to_bits(), second[i].to_bits())
            );
        }
    }
}
