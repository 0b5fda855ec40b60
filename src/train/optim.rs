//! Optimisers with PyTorch's update rules, and the `[optimizer]` config.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use crate::model::is_trainable;
use crate::util::invalid::{InvalidField, in_range, invalid};

/// `[optimizer]`: SGD (with PyTorch's momentum, Nesterov and L2 semantics), Adam or AdamW.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Peak learning rate. Unset: 0.01 for SGD, 0.001 for Adam and AdamW.
    pub lr: Option<f64>,
    /// SGD momentum.
    #[default(0.9)]
    pub momentum: f64,
    /// SGD Nesterov momentum (needs momentum > 0).
    pub nesterov: bool,
    /// SGD and Adam: L2 penalty added to the gradient. AdamW: decoupled decay.
    pub weight_decay: f64,
    /// Adam/AdamW first-moment decay.
    #[default(0.9)]
    pub beta1: f64,
    /// Adam/AdamW second-moment decay.
    #[default(0.999)]
    pub beta2: f64,
    /// Adam/AdamW denominator epsilon.
    #[default(1e-08)]
    pub eps: f64,
}

impl OptimizerConfig {
    /// Range checks of the `[optimizer]` fields.
    pub fn validate(&self) -> std::result::Result<(), InvalidField> {
        if let Some(lr) = self.lr
            && !(lr > 0.0 && lr.is_finite())
        {
            return invalid("optimizer.lr", format!("expected a number > 0, got {lr}"));
        }
        in_range("optimizer.momentum", self.momentum, 0.0, 1.0)?;
        if self.nesterov && self.momentum == 0.0 {
            return invalid(
                "optimizer.nesterov",
                "Nesterov momentum needs optimizer.momentum > 0",
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return invalid(
                "optimizer.weight_decay",
                format!("expected a number >= 0, got {}", self.weight_decay),
            );
        }
        in_range("optimizer.beta1", self.beta1, 0.0, 1.0)?;
        in_range("optimizer.beta2", self.beta2, 0.0, 1.0)?;
        if self.eps.is_nan() || self.eps <= 0.0 {
            return invalid(
                "optimizer.eps",
                format!("expected a number > 0, got {}", self.eps),
            );
        }
        Ok(())
    }

    /// The learning rate, with the kind's default where the config has none:
    /// the one place that default is decided.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(match self.kind {
            OptimizerKind::Sgd => 0.01,
            OptimizerKind::Adam | OptimizerKind::Adamw => 0.001,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    Adam,
    Adamw,
}

impl OptimizerKind {
    /// Whether `weight_decay` shrinks the weights directly (AdamW) rather than
    /// adding an L2 term to the gradient (SGD, Adam).
    pub fn decouples_weight_decay(self) -> bool {
        match self {
            OptimizerKind::Sgd | OptimizerKind::Adam => false,
            OptimizerKind::Adamw => true,
        }
    }
}

/// Per-parameter state: SGD's momentum buffer, or Adam's two moments.
enum State {
    Empty,
    Momentum(Tensor),
    Moments { first: Tensor, second: Tensor },
}

/// SGD, Adam or AdamW over the trainable variables of a `VarMap`.
pub struct Optimizer {
    config: OptimizerConfig,
    /// Each trainable variable by name, with its state.
    params: Vec<(String, Var, State)>,
    steps: u64,
}

/// PyTorch's names for the state tensors of one parameter.
const MOMENTUM: &str = "momentum_buffer";
const FIRST_MOMENT: &str = "exp_avg";
const SECOND_MOMENT: &str = "exp_avg_sq";

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
                .map(|(name, var)| (name.clone(), var.clone(), State::Empty))
                .collect(),
            steps: 0,
        }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let config = self.config.clone();
        for (_, var, state) in &mut self.params {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Candle's gradients of variables keep the graph that computed them
            // (activations included); a momentum buffer built from them would
            // chain every step's graph to the next and hold it all in memory.
            let grad = &grad.detach();
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

/// The state as it stands, for a run's training state: the step count, and
/// tensors named `<parameter>.momentum_buffer` (SGD) or `<parameter>.exp_avg` and
/// `<parameter>.exp_avg_sq` (Adam), as in PyTorch's optimizer `state_dict`.
impl Optimizer {
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, _, state) in &self.params {
            match state {
                State::Empty => {}
                State::Momentum(buffer) => out.push((format!("{name}.{MOMENTUM}"), buffer.clone())),
                State::Moments { first, second } => {
                    out.push((format!("{name}.{FIRST_MOMENT}"), first.clone()));
                    out.push((format!("{name}.{SECOND_MOMENT}"), second.clone()));
                }
            }
        }
        out
    }

    /// Puts back a state saved by [`Optimizer::state_tensors`]; a parameter with
    /// no tensors starts empty, as it would before its first step.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let fetch = |name: &str, var: &Var| -> Result<Option<Tensor>> {
            let Some(tensor) = tensors.get(name) else {
                return Ok(None);
            };
            if tensor.dims() != var.dims() {
                candle_core::bail!(
                    "optimizer state {name} has shape {:?}, expected {:?}",
                    tensor.dims(),
                    var.dims()
                );
            }
            Ok(Some(tensor.to_device(var.device())?))
        };
        for (name, var, state) in &mut self.params {
            let momentum = fetch(&format!("{name}.{MOMENTUM}"), var)?;
            let first = fetch(&format!("{name}.{FIRST_MOMENT}"), var)?;
            let second = fetch(&format!("{name}.{SECOND_MOMENT}"), var)?;
            *state = match (momentum, first, second) {
                (Some(buffer), None, None) => State::Momentum(buffer),
                (None, Some(first), Some(second)) => State::Moments { first, second },
                (None, None, None) => State::Empty,
                _ => candle_core::bail!(
                    "optimizer state of {name} does not fit a {:?} optimizer",
                    self.config.kind
                ),
            };
        }
        self.steps = steps;
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
        if config.kind.decouples_weight_decay() {
            param = (param * (1.0 - lr * config.weight_decay))?;
        } else {
            grad = (grad + (&param * config.weight_decay)?)?;
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

#[cfg(test)]
mod tests {
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
}
