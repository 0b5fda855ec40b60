//! The layers both networks are made of: [`Block`] (a layer, BatchNorm, tanh,
//! max-pool), [`Linear`], [`Conv`], [`BatchNorm`] and [`Dropout`], each on the
//! fast CPU kernels where they run and on Candle's ops elsewhere.

use std::sync::Mutex;

use candle_core::Var;
use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernels::{self, BatchStats, Norm};

/// A layer, then BatchNorm when enabled, then tanh, then 2x2 max-pooling when
/// `pool`: the unit both networks repeat.
pub struct Block<L> {
    layer: L,
    norm: Option<BatchNorm>,
    pool: bool,
    /// Ones and zeros per channel: the identity affine map of the fused CPU
    /// activation when there is no BatchNorm.
    identity: (Tensor, Tensor),
}

impl<L> Block<L> {
    pub fn new(
        layer: L,
        channels: usize,
        norm: Option<VarBuilder>,
        pool: bool,
        device: &Device,
    ) -> Result<Self> {
        Ok(Block {
            layer,
            norm: norm.map(|vb| BatchNorm::new(channels, vb)).transpose()?,
            pool,
            identity: (
                Tensor::ones(channels, DType::F32, device)?,
                Tensor::zeros(channels, DType::F32, device)?,
            ),
        })
    }
}

impl<L: Layer> ModuleT for Block<L> {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !kernels::enabled(x.device()) {
            return self.forward_with_candle_ops(x, train);
        }
        // The tail's per-channel map: BatchNorm on the batch's statistics in
        // training, else a fixed affine map (its running statistics, or none).
        let (norm, (weight, bias)) = match (&self.norm, train) {
            (Some(norm), true) => (
                Norm::Batch { eps: BN_EPS as f32 },
                (norm.weight.clone(), norm.bias.clone()),
            ),
            (Some(norm), false) => (Norm::Affine, norm.eval_affine()?),
            (None, _) => (Norm::Affine, self.identity.clone()),
        };
        if !train
            && !self.pool
            && let Some(y) = self.layer.eval_affine_tanh(x, &weight, &bias)
        {
            return y;
        }
        // In training the layer and its tail are one op (no graph node for the
        // layer's output); in evaluation there is no graph to spare.
        let (y, stats) = if train {
            // Without BatchNorm the tail has no parameters: none to pass.
            let tail = self.norm.as_ref().map(|_| (&weight, &bias));
            kernels::fused_layer(x, self.layer.params(), norm, tail, self.pool)?
        } else {
            kernels::activation(&x.apply(&self.layer)?, norm, &weight, &bias, self.pool)?
        };
        if let (Some(batch_norm), Some(stats)) = (&self.norm, stats) {
            batch_norm.update_running_stats(stats)?;
        }
        Ok(y)
    }
}

impl<L: Layer> Block<L> {
    /// Candle's ops, for devices without the fused kernels.
    fn forward_with_candle_ops(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let z = x.apply(&self.layer)?;
        let z = match &self.norm {
            Some(norm) => norm.fallback.forward_t(&z, train)?,
            None => z,
        };
        let y = z.tanh()?;
        if self.pool {
            kernels::max_pool2x2(&y)
        } else {
            Ok(y)
        }
    }
}

/// BatchNorm over dimension 1 with PyTorch's defaults: eps 1e-5, running
/// statistics updated with momentum 0.1 (the variance unbiased). On the CPU it
/// runs inside the fused activation of its [`Block`].
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    /// Candle's implementation over the same tensors, for devices without our kernels.
    fallback: candle_nn::BatchNorm,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm {
    /// The tensors this layer keeps as buffers: statistics the forward pass
    /// updates, which the optimiser must leave alone.
    pub const BUFFERS: [&str; 2] = ["running_mean", "running_var"];
    /// The buffer beside which PyTorch keeps its `num_batches_tracked` counter.
    pub const COUNTED_BUFFER: &str = "running_mean";

    fn new(features: usize, vb: VarBuilder) -> Result<BatchNorm> {
        let [mean_name, var_name] = Self::BUFFERS;
        let running_mean = vb.get_with_hints(features, mean_name, Init::Const(0.0))?;
        let running_var = vb.get_with_hints(features, var_name, Init::Const(1.0))?;
        let weight = vb.get_with_hints(features, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(features, "bias", Init::Const(0.0))?;
        let fallback = candle_nn::BatchNorm::new(
            features,
            running_mean.clone(),
            running_var.clone(),
            weight.clone(),
            bias.clone(),
            BN_EPS,
        )?;
        Ok(BatchNorm {
            weight,
            bias,
            // Variables share storage with the VarMap, so checkpoints see the updates.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            fallback,
        })
    }

    /// Moves the running statistics towards a batch's.
    fn update_running_stats(&self, stats: BatchStats) -> Result<()> {
        let BatchStats { means, vars, count } = stats;
        let unbiased = count as f32 / (count.max(2) - 1) as f32;
        let blend = |running: &Var, batch: Vec<f32>| -> Result<()> {
            let batch = Tensor::from_vec(batch, running.shape(), running.device())?;
            running.set(
                &((running.as_detached_tensor() * (1.0 - BN_MOMENTUM))? + (batch * BN_MOMENTUM)?)?,
            )
        };
        blend(&self.running_mean, means)?;
        blend(
            &self.running_var,
            vars.into_iter().map(|v| v * unbiased).collect(),
        )
    }

    /// Evaluation-mode BatchNorm as `z * scale + shift` per channel.
    fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let inv_std = (self.running_var.as_detached_tensor() + BN_EPS)?
            .sqrt()?
            .recip()?;
        let scale = (&self.weight * inv_std)?;
        let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
        Ok((scale, shift))
    }
}

/// A fully connected layer with bias, on the fast kernels.
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Linear> {
        // Placeholder initial values: `init_like_pytorch` draws the real ones.
        let init = Init::Const(0.0);
        Ok(Linear {
            weight: vb.get_with_hints((outputs, inputs), "weight", init)?,
            bias: vb.get_with_hints(outputs, "bias", init)?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::linear(x, &self.weight, &self.bias)
    }
}

/// A block's layer. Layers with a fused evaluation kernel for "layer, affine map,
/// tanh" say so by returning it.
pub trait Layer: Module {
    /// The weight and bias, which the block's fused training op takes.
    fn params(&self) -> (&Tensor, &Tensor);

    fn eval_affine_tanh(
        &self,
        _x: &Tensor,
        _scale: &Tensor,
        _shift: &Tensor,
    ) -> Option<Result<Tensor>> {
        None
    }
}

impl Layer for Linear {
    fn params(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    fn eval_affine_tanh(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
    ) -> Option<Result<Tensor>> {
        Some(kernels::linear_affine_tanh(
            x,
            &self.weight,
            &self.bias,
            scale,
            shift,
        ))
    }
}

impl Layer for Conv {
    fn params(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }
}

/// A 2-D convolution (valid padding, stride 1) with bias, on the fast kernels.
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    pub fn new(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Conv> {
        // Placeholder initial values: `init_like_pytorch` draws the real ones.
        let init = Init::Const(0.0);
        Ok(Conv {
            weight: vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", init)?,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::conv2d(x, &self.weight, &self.bias)
    }
}

/// Inverted dropout with its own seeded generator, so runs repeat exactly
/// (Candle's CPU random generator cannot be seeded).
pub struct Dropout {
    probability: f32,
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    pub fn new(probability: f64, seed: u64) -> Self {
        Dropout {
            probability: probability as f32,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0xD80_0D7)),
        }
    }
}

impl Dropout {
    /// The generator as it stands, to save with a run's training state.
    pub fn rng(&self) -> ChaCha8Rng {
        self.rng.lock().expect("dropout rng lock").clone()
    }

    /// Puts back a generator saved by [`Dropout::rng`] (resuming a run).
    pub fn set_rng(&self, rng: ChaCha8Rng) {
        *self.rng.lock().expect("dropout rng lock") = rng;
    }
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.probability == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.probability;
        let scale = 1.0 / keep;
        let mut rng = self.rng.lock().expect("dropout rng lock");
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f32>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }
}
