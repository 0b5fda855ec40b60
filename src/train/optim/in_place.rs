//! SGD's update on the CPU in place: one pass over each parameter, its
//! gradient and its momentum buffer, as a Candle in-place op.

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};

use crate::kernels::{f32_data, f32_data_mut};
use crate::train::optim::{OptimizerConfig, State};

/// [`sgd`] on the CPU, in place: one pass over the momentum buffer, one over
/// the parameter, no tensor allocated, where Candle's ops take up to six passes
/// and six new tensors per parameter (a fifth of a small model's step). The
/// arithmetic is [`sgd`]'s, in its order and in f32 as Candle does it, so the
/// two give the same bits.
pub(super) fn sgd_in_place(
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
    /// The factors the GPU kernels take: the same f32 values.
    #[cfg(feature = "cuda")]
    fn gpu_factors(&self) -> crate::kernels::gpu::launch::SgdFactors {
        crate::kernels::gpu::launch::SgdFactors {
            lr: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay.unwrap_or(0.0),
        }
    }

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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &mut candle_core::CudaStorage,
        pl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        let factors = self.gpu_factors();
        crate::kernels::gpu::ops::sgd_step(factors, self.nesterov, (ps, pl), (gs, gl), (bs, bl))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        bs: &mut candle_core::CudaStorage,
        bl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<()> {
        let factors = self.update.gpu_factors();
        crate::kernels::gpu::ops::sgd_momentum(factors, self.first, (bs, bl), (gs, gl), (ps, pl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::sgd;

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
}
