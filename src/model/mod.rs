//! The networks, built from a `VarBuilder` so that tensor names follow PyTorch's
//! `state_dict` (`conv1.weight`, `bn1.running_mean`, `fc7.bias`, ...): the
//! `[model]` config, the list of model kinds, and what every network shares.
//! [`layers`] holds the building blocks (over [`crate::kernels`]),
//! [`checkpoint`] reads and writes the weights.

pub mod checkpoint;
pub mod layers;
mod lenet5;
mod mlp;

use candle_core::{D, DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::util::invalid::{InvalidField, invalid};
use layers::{BatchNorm, Dropout};

pub use lenet5::LeNet5;
pub use mlp::{CustomMlp, MLP_HIDDEN, MLP_HIDDEN_LAYERS};

/// `[model]`: which network and which regularising layers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// BatchNorm before every hidden activation.
    pub batch_norm: bool,
    /// Dropout probability on the hidden fully connected activations (0 = off).
    pub dropout: f64,
}

impl ModelConfig {
    /// Whether a training batch of this model may run as two halves side by
    /// side, one per thread, their gradients added (the trainer's CPU path).
    /// Not with dropout, whose draws come from one stream in the whole batch's
    /// order; with BatchNorm only where the network says the halves' meetings
    /// at each BatchNorm pay ([`Network::HALVES_WITH_BATCH_NORM`]).
    pub fn trains_as_halves(&self) -> bool {
        self.dropout == 0.0 && (!self.batch_norm || self.kind.halves_with_batch_norm())
    }

    /// Range checks of the `[model]` fields.
    pub fn validate(&self) -> std::result::Result<(), InvalidField> {
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid(
                "model.dropout",
                format!("expected a probability in [0, 1), got {}", self.dropout),
            );
        }
        Ok(())
    }
}

/// Declares [`ModelKind`] (its config names, `Display`, the list of kinds) and
/// [`build`]'s dispatch from one list of `Variant = "name" => Network,`.
macro_rules! model_kinds {
    ($($(#[$doc:meta])* $variant:ident = $name:literal => $network:ty,)+) => {
        /// Which network a config builds (`model.kind`); the first is the default.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum ModelKind {
            $($(#[$doc])* #[serde(rename = $name)] $variant,)+
        }

        impl ModelKind {
            /// Every kind, in the order listed.
            pub const ALL: &[ModelKind] = &[$(ModelKind::$variant),+];

            /// The name configs use.
            pub fn name(self) -> &'static str {
                match self {
                    $(ModelKind::$variant => $name,)+
                }
            }

            fn build(self, vb: VarBuilder, spec: &NetworkSpec) -> Result<Box<dyn Classifier>> {
                Ok(match self {
                    $(ModelKind::$variant => Box::new(<$network>::new(vb, spec)?),)+
                })
            }

            /// [`Network::INPUT_SIDE`] of this kind's network.
            pub fn input_side(self) -> Option<usize> {
                match self {
                    $(ModelKind::$variant => <$network as Network>::INPUT_SIDE,)+
                }
            }

            /// [`Network::HALVES_WITH_BATCH_NORM`] of this kind's network.
            fn halves_with_batch_norm(self) -> bool {
                match self {
                    $(ModelKind::$variant => <$network as Network>::HALVES_WITH_BATCH_NORM,)+
                }
            }
        }
    };
}

// A new model kind: a file with a `Network` type, and one line here.
model_kinds! {
    /// LeNet-5: three convolutions, two fully connected layers.
    Lenet5 = "lenet5" => lenet5::LeNet5,
    /// Seven fully connected layers of width 48.
    CustomMlp = "custom_mlp" => mlp::CustomMlp,
}

impl Default for ModelKind {
    fn default() -> Self {
        ModelKind::ALL[0]
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a network is built from, beside its variables.
pub struct NetworkSpec {
    /// Side of the square input images.
    pub input_side: usize,
    pub batch_norm: bool,
    /// Dropout probability on hidden fully connected activations.
    pub dropout: f64,
    pub seed: u64,
}

impl NetworkSpec {
    /// The network's dropout, seeded from the run's seed.
    pub fn dropout(&self) -> Dropout {
        Dropout::new(self.dropout, self.seed)
    }
}

/// A network type a [`ModelKind`] builds.
pub trait Network: Classifier + Sized + 'static {
    /// The input side the network needs, if it takes only one (`data.pad_to_32`
    /// must give it).
    const INPUT_SIDE: Option<usize>;
    /// Whether its BatchNorm batches train as two halves that meet at each
    /// BatchNorm to add their sums: worth it where the layers between the
    /// meetings are large (convolutions), not where they are small.
    const HALVES_WITH_BATCH_NORM: bool;

    /// Creates the network's variables under `vb`, named as PyTorch's `state_dict`.
    fn new(vb: VarBuilder, spec: &NetworkSpec) -> Result<Self>;
}

/// A classifier: images `(n, 1, side, side)` in, logits `(n, 10)` out.
pub trait Classifier: Send + Sync {
    /// `train` selects batch statistics in BatchNorm and enables dropout.
    fn logits(&self, images: &Tensor, train: bool) -> Result<Tensor>;

    /// The network's dropout, whose generator is part of a run's training state.
    fn dropout(&self) -> &Dropout;
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
    let spec = NetworkSpec {
        input_side,
        batch_norm: config.batch_norm,
        dropout: config.dropout,
        seed,
    };
    let model = config.kind.build(vb, &spec)?;
    init_like_pytorch(varmap, seed)?;
    Ok(model)
}

/// True for the tensors an optimiser updates: every tensor but the buffers a
/// layer declares (BatchNorm's running statistics).
pub fn is_trainable(name: &str) -> bool {
    let leaf = name.rsplit_once('.').map_or(name, |(_, leaf)| leaf);
    !BatchNorm::BUFFERS.contains(&leaf)
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
/// A layer has a fan-in when its weight has rank 2 or more (convolutions and
/// linear layers); the others (BatchNorm) keep the values they were created with.
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
        let Some(weight) = vars.get(&format!("{layer}.weight")) else {
            continue;
        };
        if weight.rank() < 2 {
            continue;
        }
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
    use candle_core::ModuleT;

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

    /// Each kind's trainable parameters, without and with BatchNorm (which
    /// adds only its weight and bias per feature). A new kind adds its row.
    const PARAMETERS: &[(ModelKind, usize, usize)] = &[
        (ModelKind::Lenet5, 61_706, 61_706 + 2 * (6 + 16 + 120 + 84)),
        (ModelKind::CustomMlp, 61_450, 61_450 + 2 * 6 * 48),
    ];

    #[test]
    fn parameter_counts_match_the_report() {
        for &kind in ModelKind::ALL {
            let &(_, plain, with_bn) = (PARAMETERS.iter())
                .find(|(k, _, _)| *k == kind)
                .unwrap_or_else(|| panic!("{kind}: no row in PARAMETERS"));
            assert_eq!(parameter_count(&built(kind, false).1), plain, "{kind}");
            assert_eq!(parameter_count(&built(kind, true).1), with_bn, "{kind}");
        }
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
        for &kind in ModelKind::ALL {
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
