//! The two networks, built from a `VarBuilder` so that tensor names follow
//! PyTorch's `state_dict` (`conv1.weight`, `bn1.running_mean`, `fc7.bias`, ...).

use std::sync::Mutex;

use candle_core::Var;
use candle_core::{D, DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{ModelConfig, ModelKind};
use crate::data::NUM_CLASSES;
use crate::kernels::{self, BatchStats, Norm};

/// A classifier: images `(n, 1, side, side)` in, logits `(n, 10)` out.
pub trait Classifier: Send + Sync {
    /// `train` selects batch statistics in BatchNorm and enables dropout.
    fn logits(&self, images: &Tensor, train: bool) -> Result<Tensor>;
}

/// Builds the configured model; its variables are created in `varmap`.
pub fn build(
    config: &ModelConfig,
    input_side: usize,
    seed: u64,
    varmap: &VarMap,
    device: &Device,
) -> Result<Box<dyn Classifier>> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
    let dropout = Dropout::new(config.dropout, seed);
    let model: Box<dyn Classifier> = match config.kind {
        ModelKind::Lenet5 => Box::new(LeNet5::new(vb, config.batch_norm, dropout)?),
        ModelKind::CustomMlp => Box::new(CustomMlp::new(
            vb,
            input_side * input_side,
            config.batch_norm,
            dropout,
        )?),
    };
    init_like_pytorch(varmap, seed)?;
    Ok(model)
}

/// A layer, then BatchNorm when enabled, then tanh, then 2x2 max-pooling when
/// `pool`: the unit both networks repeat.
struct Block<L> {
    layer: L,
    norm: Option<BatchNorm>,
    pool: bool,
    /// Ones and zeros per channel: the identity affine map of the fused CPU
    /// activation when there is no BatchNorm.
    identity: (Tensor, Tensor),
}

impl<L> Block<L> {
    fn new(
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
        match (&self.norm, train) {
            (Some(norm), true) => {
                let z = x.apply(&self.layer)?;
                let eps = BN_EPS as f32;
                let (y, stats) = kernels::activation(
                    &z,
                    Norm::Batch { eps },
                    &norm.weight,
                    &norm.bias,
                    self.pool,
                )?;
                if let Some(stats) = stats {
                    norm.update_running_stats(stats, z.elem_count() / norm.weight.elem_count())?;
                }
                Ok(y)
            }
            (norm, _) => {
                // A fixed affine map: BatchNorm's running statistics, or none.
                let (scale, shift) = match norm {
                    Some(norm) => norm.eval_affine()?,
                    None => self.identity.clone(),
                };
                if !train
                    && !self.pool
                    && let Some(y) = self.layer.eval_affine_tanh(x, &scale, &shift)
                {
                    return y;
                }
                let z = x.apply(&self.layer)?;
                Ok(kernels::activation(&z, Norm::Affine, &scale, &shift, self.pool)?.0)
            }
        }
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
    fn new(features: usize, vb: VarBuilder) -> Result<BatchNorm> {
        let running_mean = vb.get_with_hints(features, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(features, "running_var", Init::Const(1.0))?;
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

    /// Moves the running statistics towards a batch's (`count` values per channel).
    fn update_running_stats(&self, (means, vars): BatchStats, count: usize) -> Result<()> {
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
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Linear> {
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
trait Layer: Module {
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

impl Layer for Conv {}

/// A 2-D convolution (valid padding, stride 1) with bias, on the fast kernels.
struct Conv {
    weight: Tensor,
    bias: Tensor,
}

impl Conv {
    fn new(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Conv> {
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

/// LeNet-5 on 32x32 inputs: 61,706 parameters (plus 452 with BatchNorm).
pub struct LeNet5 {
    conv1: Block<Conv>,
    conv2: Block<Conv>,
    conv3: Block<Conv>,
    fc1: Block<Linear>,
    fc2: Linear,
    dropout: Dropout,
}

impl LeNet5 {
    pub fn new(vb: VarBuilder, batch_norm: bool, dropout: Dropout) -> Result<Self> {
        let device = vb.device().clone();
        let norm = |name: &str| batch_norm.then(|| vb.pp(name));
        let conv_block = |c_in, c_out, name: &str, bn: &str, pool| {
            let conv = Conv::new(c_in, c_out, 5, vb.pp(name))?;
            Block::new(conv, c_out, norm(bn), pool, &device)
        };
        Ok(LeNet5 {
            conv1: conv_block(1, 6, "conv1", "bn1", true)?,
            conv2: conv_block(6, 16, "conv2", "bn2", true)?,
            conv3: conv_block(16, 120, "conv3", "bn3", false)?,
            fc1: Block::new(
                Linear::new(120, 84, vb.pp("fc1"))?,
                84,
                norm("bn4"),
                false,
                &device,
            )?,
            fc2: Linear::new(84, NUM_CLASSES, vb.pp("fc2"))?,
            dropout,
        })
    }
}

impl Classifier for LeNet5 {
    fn logits(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        images
            .apply_t(&self.conv1, train)?
            .apply_t(&self.conv2, train)?
            .apply_t(&self.conv3, train)?
            .flatten_from(1)?
            .apply_t(&self.dropout, train)?
            .apply_t(&self.fc1, train)?
            .apply_t(&self.dropout, train)?
            .apply(&self.fc2)
    }
}

/// Hidden width of CustomMLP: 48 keeps it at LeNet5's size (61,450 parameters).
pub const MLP_HIDDEN: usize = 48;
/// Hidden layers of CustomMLP (`fc1`..`fc6`); `fc7` is the output layer.
pub const MLP_HIDDEN_LAYERS: usize = 6;

/// Seven fully connected layers, 1024 -> 48 -> ... -> 48 -> 10, tanh between.
pub struct CustomMlp {
    hidden: Vec<Block<Linear>>,
    output: Linear,
    dropout: Dropout,
}

impl CustomMlp {
    pub fn new(vb: VarBuilder, inputs: usize, batch_norm: bool, dropout: Dropout) -> Result<Self> {
        let hidden = (1..=MLP_HIDDEN_LAYERS)
            .map(|i| {
                let fan_in = if i == 1 { inputs } else { MLP_HIDDEN };
                let layer = Linear::new(fan_in, MLP_HIDDEN, vb.pp(format!("fc{i}")))?;
                let norm = batch_norm.then(|| vb.pp(format!("bn{i}")));
                Block::new(layer, MLP_HIDDEN, norm, false, vb.device())
            })
            .collect::<Result<Vec<_>>>()?;
        let output_name = format!("fc{}", MLP_HIDDEN_LAYERS + 1);
        Ok(CustomMlp {
            hidden,
            output: Linear::new(MLP_HIDDEN, NUM_CLASSES, vb.pp(output_name))?,
            dropout,
        })
    }
}

impl Classifier for CustomMlp {
    fn logits(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = images.flatten_from(1)?;
        for block in &self.hidden {
            x = x.apply_t(block, train)?.apply_t(&self.dropout, train)?;
        }
        x.apply(&self.output)
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

/// True for the tensors an optimiser updates (not BatchNorm's running statistics).
pub fn is_trainable(name: &str) -> bool {
    !name.ends_with(".running_mean") && !name.ends_with(".running_var")
}

/// Number of trainable parameters in `varmap`.
pub fn parameter_count(varmap: &VarMap) -> usize {
    let vars = varmap.data().lock().expect("varmap lock");
    vars.iter()
        .filter(|(name, _)| is_trainable(name))
        .map(|(_, var)| var.elem_count())
        .sum()
}

/// PyTorch's default initialisation for `Conv2d` and `Linear`: weights and biases
/// uniform in +-1/sqrt(fan_in), drawn from a seeded generator in name order.
/// BatchNorm keeps weight 1, bias 0, running mean 0 and variance 1.
fn init_like_pytorch(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let Some(layer) = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
        else {
            continue;
        };
        if layer.starts_with("bn") {
            continue;
        }
        let weight = &vars[&format!("{layer}.weight")];
        let fan_in: usize = weight.dims()[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let var = &vars[name];
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// Index of the largest logit per row, as u32.
pub fn predictions(logits: &Tensor) -> Result<Tensor> {
    logits.argmax(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn built(kind: ModelKind, batch_norm: bool) -> (Box<dyn Classifier>, VarMap) {
        let varmap = VarMap::new();
        let config = ModelConfig {
            kind,
            batch_norm,
            dropout: 0.0,
        };
        let model = build(&config, 32, 0, &varmap, &Device::Cpu).unwrap();
        (model, varmap)
    }

    #[test]
    fn parameter_counts_match_the_report() {
        assert_eq!(parameter_count(&built(ModelKind::Lenet5, false).1), 61_706);
        assert_eq!(
            parameter_count(&built(ModelKind::CustomMlp, false).1),
            61_450
        );
        // BatchNorm adds only its own weight and bias per feature.
        assert_eq!(
            parameter_count(&built(ModelKind::Lenet5, true).1),
            61_706 + 2 * (6 + 16 + 120 + 84)
        );
        assert_eq!(
            parameter_count(&built(ModelKind::CustomMlp, true).1),
            61_450 + 2 * 6 * 48
        );
    }

    #[test]
    fn tensor_names_follow_pytorch() {
        let (_, varmap) = built(ModelKind::Lenet5, true);
        let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        for expected in [
            "conv1.weight",
            "conv3.bias",
            "fc2.weight",
            "bn1.running_mean",
            "bn4.running_var",
            "bn3.weight",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        let (_, varmap) = built(ModelKind::CustomMlp, false);
        let vars = varmap.data().lock().unwrap();
        assert_eq!(vars["fc1.weight"].dims(), &[48, 1024]);
        assert_eq!(vars["fc7.weight"].dims(), &[10, 48]);
    }

    #[test]
    fn forward_gives_ten_logits_per_image_in_both_modes() {
        let images = Tensor::randn(0f32, 1.0, (3, 1, 32, 32), &Device::Cpu).unwrap();
        for kind in [ModelKind::Lenet5, ModelKind::CustomMlp] {
            for batch_norm in [false, true] {
                let (model, _) = built(kind, batch_norm);
                for train in [false, true] {
                    assert_eq!(model.logits(&images, train).unwrap().dims(), &[3, 10]);
                }
            }
        }
    }

    #[test]
    fn initialisation_is_seeded_and_bounded() {
        let weights = |seed| {
            let varmap = VarMap::new();
            let config = ModelConfig::default();
            build(&config, 32, seed, &varmap, &Device::Cpu).unwrap();
            let w = varmap.data().lock().unwrap()["conv3.weight"]
                .flatten_all()
                .unwrap();
            w.to_vec1::<f32>().unwrap()
        };
        let (a, b, c) = (weights(7), weights(7), weights(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bound = 1.0 / (16.0f32 * 25.0).sqrt();
        assert!(a.iter().all(|w| w.abs() <= bound));
        assert!(a.iter().any(|w| w.abs() > 0.9 * bound));
    }

    #[test]
    fn dropout_zeroes_and_rescales_in_training_only() {
        let dropout = Dropout::new(0.5, 1);
        let x = Tensor::ones((1000,), DType::F32, &Device::Cpu).unwrap();
        let eval: Vec<f32> = dropout.forward_t(&x, false).unwrap().to_vec1().unwrap();
        assert!(eval.iter().all(|&v| v == 1.0));
        let train: Vec<f32> = dropout.forward_t(&x, true).unwrap().to_vec1().unwrap();
        let zeros = train.iter().filter(|&&v| v == 0.0).count();
        assert!((400..600).contains(&zeros), "{zeros} of 1000 dropped");
        assert!(train.iter().all(|&v| v == 0.0 || v == 2.0));
    }
}
