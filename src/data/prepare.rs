//! Turning raw images into model inputs: padding, scaling and standardising,
//! done once per split so batches are plain index gathers. Training, evaluation
//! and prediction all prepare their images here.

use candle_core::{Device, Tensor};

use crate::data::idx::Split;
use crate::data::{DataConfig, MNIST_MEAN, MNIST_SIDE, MNIST_STD};

/// A split ready for the model: images `(n, 1, side, side)` f32, labels `(n,)` u32.
#[derive(Debug, Clone)]
pub struct Tensors {
    pub images: Tensor,
    pub labels: Tensor,
}

impl Tensors {
    pub fn len(&self) -> usize {
        self.labels.dims1().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `indices` (a u32 tensor), gathered on the tensors' device.
    pub fn gather(&self, indices: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.images.index_select(indices, 0)?,
            self.labels.index_select(indices, 0)?,
        ))
    }

    /// Examples `start..start + len` as views, without copying.
    pub fn slice(&self, start: usize, len: usize) -> candle_core::Result<Tensors> {
        Ok(Tensors {
            images: self.images.narrow(0, start, len)?,
            labels: self.labels.narrow(0, start, len)?,
        })
    }
}

/// The examples of `split` at `indices` as model inputs, prepared as `config`
/// says: each 28x28 image padded to [`DataConfig::input_side`] (centred, zero
/// pixels), scaled to [0, 1] and, with `normalize`, standardised.
pub fn tensors(
    split: &Split,
    indices: &[usize],
    config: &DataConfig,
    device: &Device,
) -> candle_core::Result<Tensors> {
    let n = indices.len();
    let side = config.input_side();
    let pad = (side - MNIST_SIDE) / 2;
    let (mean, std) = if config.normalize {
        (MNIST_MEAN, MNIST_STD)
    } else {
        (0.0, 1.0)
    };
    let background = (0.0 - mean) / std;
    let image_len = MNIST_SIDE * MNIST_SIDE;
    let mut pixels = vec![background; n * side * side];
    for (&index, out) in indices.iter().zip(pixels.chunks_exact_mut(side * side)) {
        let image = &split.images[index * image_len..][..image_len];
        for (row, src) in image.chunks_exact(MNIST_SIDE).enumerate() {
            let dst = &mut out[(row + pad) * side + pad..][..MNIST_SIDE];
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = (s as f32 / 255.0 - mean) / std;
            }
        }
    }
    let images = Tensor::from_vec(pixels, (n, 1, side, side), device)?;
    let labels: Vec<u32> = indices.iter().map(|&i| split.labels[i] as u32).collect();
    let labels = Tensor::from_vec(labels, n, device)?;
    Ok(Tensors { images, labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_normalises() {
        let mut image = vec![0u8; 784];
        image[0] = 255;
        let split = Split {
            images: image,
            labels: vec![3],
        };
        let tensors = super::tensors(&split, &[0], &DataConfig::default(), &Device::Cpu).unwrap();
        assert_eq!(tensors.images.dims(), &[1, 1, 32, 32]);
        let pixels: Vec<f32> = tensors.images.flatten_all().unwrap().to_vec1().unwrap();
        let background = -MNIST_MEAN / MNIST_STD;
        assert!((pixels[0] - background).abs() < 1e-6);
        // The first source pixel lands at row 2, column 2.
        assert!((pixels[2 * 32 + 2] - (1.0 - MNIST_MEAN) / MNIST_STD).abs() < 1e-5);
        assert_eq!(tensors.labels.to_vec1::<u32>().unwrap(), vec![3]);
    }
}
