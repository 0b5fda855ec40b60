//! Optimisers with PyTorch's update rules, and the `[optimizer]` config.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use crate::kernels;
use crate::model::is_trainable;
use crate::util::invalid::{InvalidField, in_range, invalid};

mod in_place;
use in_place::sgd_in_place;

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
    /// Whether `weight_decay` applies to biases and BatchNorm's weight and
    /// bias (the 1-D parameters) too, as in PyTorch by default; `false`
    /// decays only the layers' weights.
    #[default(true)]
    pub decay_bias_and_norm: bool,
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
        let no_decay = OptimizerConfig {
            weight_decay: 0.0,
            ..self.config.clone()
        };
        for (_, var, state) in &mut self.params {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let config = if self.config.decay_bias_and_norm || var.rank() > 1 {
                &self.config
            } else {
                &no_decay
            };
            let own_kernels = kernels::enabled(var.device()) || kernels::gpu_enabled(var.device());
            if config.kind == OptimizerKind::Sgd && own_kernels {
                // Reads the gradient in place: no tensor is built from it.
                sgd_in_place(config, var.as_tensor(), grad, state, lr)?;
                continue;
            }
            // Candle's gradients of variables keep the graph that computed them
            // (activations included); a momentum buffer built from them would
            // chain every step's graph to the next and hold it all in memory.
            let grad = &grad.detach();
            let param = var.as_detached_tensor();
            let updated = match config.kind {
                OptimizerKind::Sgd => sgd(config, &param, grad, state, lr)?,
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    adam(config, &param, grad, state, lr, self.steps)?
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
mod tests;
