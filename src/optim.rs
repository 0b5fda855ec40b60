//! Optimisers with PyTorch's update rules, and learning-rate schedules.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

use crate::config::{OptimizerConfig, OptimizerKind, ScheduleConfig, ScheduleKind};
use crate::models::is_trainable;

/// Per-parameter state: SGD's momentum buffer, or Adam's two moments.
enum State {
    Empty,
    Momentum(Tensor),
    Moments { first: Tensor, second: Tensor },
}

/// SGD, Adam or AdamW over the trainable variables of a `VarMap`.
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<(Var, State)>,
    steps: u64,
}

impl Optimizer {
    pub fn new(config: &OptimizerConfig, varmap: &VarMap) -> Self {
        let vars = varmap.data().lock().expect("varmap lock");
        let mut named: Vec<(&String, &Var)> =
            vars.iter().filter(|(name, _)| is_trainable(name)).collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        Optimizer {
            config: config.clone(),
            params: named
                .into_iter()
                .map(|(_, var)| (var.clone(), State::Empty))
                .collect(),
            steps: 0,
        }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let config = self.config.clone();
        for (var, state) in &mut self.params {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let param = var.as_detached_tensor();
            let updated = match config.kind {
                OptimizerKind::Sgd => sgd(&config, &param, grad, state, lr)?,
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    adam(&config, &param, grad, state, lr, self.steps)?
                }
            };
            var.set(&updated)?;
        }
        Ok(())
    }
}

/// `torch.optim.SGD`: L2 added to the gradient, then (Nesterov) momentum.
fn sgd(
    config: &OptimizerConfig,
    param: &Tensor,
    grad: &Tensor,
    state: &mut State,
    lr: f64,
) -> Result<Tensor> {
    let mut grad = grad.clone();
    if config.weight_decay > 0.0 {
        grad = (grad + (param * config.weight_decay)?)?;
    }
    if config.momentum > 0.0 {
        let buffer = match state {
            State::Momentum(previous) => ((&*previous * config.momentum)? + &grad)?,
            _ => grad.clone(),
        };
        grad = if config.nesterov {
            (grad + (&buffer * config.momentum)?)?
        } else {
            buffer.clone()
        };
        *state = State::Momentum(buffer);
    }
    param - (grad * lr)?
}

/// `torch.optim.Adam` (L2 in the gradient) and `AdamW` (decoupled decay).
fn adam(
    config: &OptimizerConfig,
    param: &Tensor,
    grad: &Tensor,
    state: &mut State,
    lr: f64,
    step: u64,
) -> Result<Tensor> {
    let (beta1, beta2) = (config.beta1, config.beta2);
    let mut grad = grad.clone();
    let mut param = param.clone();
    if config.weight_decay > 0.0 {
        match config.kind {
            OptimizerKind::Adamw => param = (param * (1.0 - lr * config.weight_decay))?,
            _ => grad = (grad + (&param * config.weight_decay)?)?,
        }
    }
    let (first, second) = match state {
        State::Moments { first, second } => (
            ((&*first * beta1)? + (&grad * (1.0 - beta1))?)?,
            ((&*second * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?,
        ),
        _ => ((&grad * (1.0 - beta1))?, (grad.sqr()? * (1.0 - beta2))?),
    };
    let correction1 = 1.0 - beta1.powi(step as i32);
    let correction2 = 1.0 - beta2.powi(step as i32);
    let denominator = ((&second / correction2)?.sqrt()? + config.eps)?;
    let update = ((&first / correction1)? / denominator)?;
    *state = State::Moments { first, second };
    param - (update * lr)?
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
    use candle_core::{DType, Device};

    /// Minimises 0.5 * w^2 (gradient w) from w = 1 with the given optimiser.
    fn run(config: OptimizerConfig, steps: usize, lr: f64) -> Vec<f32> {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints(1, "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let mut optimizer = Optimizer::new(&config, &varmap);
        let mut trace = Vec::new();
        for _ in 0..steps {
            let loss = (w.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            optimizer.step(&loss.backward().unwrap(), lr).unwrap();
            trace.push(w.to_vec1::<f32>().unwrap()[0]);
        }
        trace
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
