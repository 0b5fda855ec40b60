//! CustomMLP: seven fully connected layers of LeNet5's size (61,450 parameters).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::data::NUM_CLASSES;
use crate::model::layers::{Block, Dropout, Linear};
use crate::model::{Classifier, Network, NetworkSpec};

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

impl Network for CustomMlp {
    /// Any side: the first layer takes side x side inputs.
    const INPUT_SIDE: Option<usize> = None;
    /// Meetings between its small layers cost more than the halves save
    /// (`custom_mlp_reg` trained at 30-33k images/s as halves, 49k whole).
    const HALVES_WITH_BATCH_NORM: bool = false;

    fn new(vb: VarBuilder, spec: &NetworkSpec) -> Result<Self> {
        let (inputs, batch_norm) = (spec.input_side * spec.input_side, spec.batch_norm);
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
            dropout: spec.dropout(),
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

    fn dropout(&self) -> &Dropout {
        &self.dropout
    }
}
