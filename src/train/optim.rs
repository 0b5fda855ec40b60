//! Optimisers with PyTorch's update rules, and the `[optimizer]` config.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor, Var};
use candle_nn::VarMap;

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use crate::kernels::{self, f32_data, f32_data_mut};
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
            if config.kind == OptimizerKind::Sgd && kernels::enabled(var.device()) {
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

/// [`sgd`] on the CPU, in place: one pass over the momentum buffer, one over
/// the parameter, no tensor allocated, where Candle's ops take up to six passes
/// and six new tensors per parameter (a fifth of a small model's step). The
/// arithmetic is [`sgd`]'s, in its order and in f32 as Candle does it, so the
/// two give the same bits.
fn sgd_in_place(
    config: &OptimizerConfig,
    param: &Tensor,
    grad: &Tensor,
    state: &mut State,
    lr: f64,
) -> Result<()> {
    let update = SgdUpdate {
        lr: lr as f32,
        momentum: config.momentum as f32,
        weight_decay: (config.weight_decay > 0.0).then_some(config.weight_decay as f32),
        nesterov: config.nesterov,
    };
    if config.momentum == 0.0 {
        // No buffer: the gradient stands in for it, unread.
        return param.inplace_op3(grad, grad, &update);
    }
    let first = !matches!(state, State::Momentum(_));
    if first {
        *state = State::Momentum(param.zeros_like()?);
    }
    let State::Momentum(buffer) = state else {
        unreachable!("set just above");
    };
    buffer.inplace_op3(grad, param, &MomentumUpdate { update, first })?;
    param.inplace_op3(grad, buffer, &update)
}

/// SGD's constants, and its update of a parameter in place from (gradient,
/// momentum buffer).
#[derive(Clone, Copy)]
struct SgdUpdate {
    lr: f32,
    momentum: f32,
    /// The L2 factor, where there is one.
    weight_decay: Option<f32>,
    nesterov: bool,
}

impl SgdUpdate {
    /// The gradient with L2 added.
    #[inline(always)]
    fn decayed(&self, grad: f32, param: f32) -> f32 {
        match self.weight_decay {
            Some(decay) => grad + (param * decay + 0.0),
            None => grad,
        }
    }
}

impl InplaceOp3 for SgdUpdate {
    fn name(&self) -> &'static str {
        "mnist-lab-sgd-update"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let (grad, buffer) = (
            f32_data(gs, gl, self.name())?,
            f32_data(bs, bl, self.name())?,
        );
        let param = f32_data_mut(ps, pl, self.name())?;
        let momentum = self.momentum > 0.0;
        for ((p, &g), &b) in param.iter_mut().zip(grad).zip(buffer) {
            let g = self.decayed(g, *p);
            let step = match (momentum, self.nesterov) {
                (false, _) => g,
                (true, false) => b,
                (true, true) => g + (b * self.momentum + 0.0),
            };
            *p -= step * self.lr + 0.0;
        }
        Ok(())
    }
}

/// The momentum buffer's update in place from (gradient, parameter):
/// `buffer * momentum + decayed gradient`, or the decayed gradient at the first step.
struct MomentumUpdate {
    update: SgdUpdate,
    first: bool,
}

impl InplaceOp3 for MomentumUpdate {
    fn name(&self) -> &'static str {
        "mnist-lab-momentum-update"
    }

    fn cpu_fwd(
        &self,
        bs: &mut CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<()> {
        let (grad, param) = (
            f32_data(gs, gl, self.name())?,
            f32_data(ps, pl, self.name())?,
        );
        for ((b, &g), &p) in f32_data_mut(bs, bl, self.name())?
            .iter_mut()
            .zip(grad)
            .zip(param)
        {
            let g = self.update.decayed(g, p);
            *b = if self.first {
                g
            } else {
                (*b * self.update.momentum + 0.0) + g
            };
        }
        Ok(())
    }
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

    /// The in-place CPU update gives the bits of the same update in Candle's
    /// ops, momentum buffer included, with and without each of its options.
    #[test]
    fn sgd_in_place_equals_sgd_on_candle_ops() {
        use crate::kernels::testing::random;
        for (momentum, nesterov, weight_decay) in [
            (0.0, false, 0.0),
            (0.0, false, 5e-4),
            (0.9, false, 0.0),
            (0.9, false, 5e-4),
            (0.9, true, 5e-4),
        ] {
            let config = OptimizerConfig {
                momentum,
                nesterov,
                weight_decay,
                ..Default::default()
            };
            let start = random(&[7, 13], 1);
            let candle_param = start.copy().unwrap();
            let in_place_param = start.copy().unwrap();
            let (mut candle_state, mut in_place_state) = (State::Empty, State::Empty);
            let mut candle_param = candle_param;
            for step in 0..4 {
                let grad = random(&[7, 13], 10 + step);
                let lr = 0.05 / (step + 1) as f64;
                candle_param = sgd(&config, &candle_param, &grad, &mut candle_state, lr).unwrap();
                sgd_in_place(&config, &in_place_param, &grad, &mut in_place_state, lr).unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    t.flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                let label = format!(
                    "momentum {momentum} nesterov {nesterov} decay {weight_decay} step {step}"
                );
                assert_eq!(
                    bits(&candle_param),
                    bits(&in_place_param),
                    "parameter, {label}"
                );
                if let (State::Momentum(a), State::Momentum(b)) = (&candle_state, &in_place_state) {
                    assert_eq!(bits(a), bits(b), "buffer, {label}");
                }
            }
        }
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
