//! LeNet-5 on 32x32 inputs: 61,706 parameters (plus 452 with BatchNorm).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::data::NUM_CLASSES;
use crate::model::layers::{Block, Conv, Dropout, Linear};
use crate::model::{Classifier, Network, NetworkSpec};

/// LeNet-5 on 32x32 inputs: 61,706 parameters (plus 452 with BatchNorm).
pub struct LeNet5 {
    conv1: Block<Conv>,
    conv2: Block<Conv>,
    conv3: Block<Conv>,
    fc1: Block<Linear>,
    fc2: Linear,
    dropout: Dropout,
}

impl Network for LeNet5 {
    /// Its third convolution (k5) turns 5x5 into 1x1: 32x32 inputs only.
    const INPUT_SIDE: Option<usize> = Some(32);
    /// The halves meet between convolutions that take most of the step.
    const HALVES_WITH_BATCH_NORM: bool = true;

    fn new(vb: VarBuilder, spec: &NetworkSpec) -> Result<Self> {
        let batch_norm = spec.batch_norm;
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
            dropout: spec.dropout(),
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

    fn dropout(&self) -> &Dropout {
        &self.dropout
    }
}
