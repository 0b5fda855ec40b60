//! Turning raw images into model inputs. A split is prepared as bytes, each
//! 28x28 image padded to the input side (55,000 training images at 32x32: 56 MB,
//! not the 225 MB of f32 inputs); a batch is an index gather of those bytes,
//! decoded to inputs (scaled to [0, 1] and, with `normalize`, standardised) in
//! one pass on the CPU or a gather through a 256-entry table on other devices.
//! Splits read whole again and again (validation, test) are decoded once
//! ([`Tensors::decoded`]). Training, evaluation and prediction all prepare their
//! images here.

use candle_core::{DType, Device, Tensor};

use crate::data::idx::Split;
use crate::data::{DataConfig, MNIST_MEAN, MNIST_SIDE, MNIST_STD};

/// A split ready for the model: images `(n, 1, side, side)`, labels `(n,)` u32.
#[derive(Debug, Clone)]
pub struct Tensors {
    /// Pixel bytes (u8) decoded per batch through `decode`, or model inputs (f32)
    /// used as they are.
    pub images: Tensor,
    pub labels: Tensor,
    /// How byte images become model inputs; `None` for f32 images.
    decode: Option<Decode>,
}

/// `(byte / 255 - mean) / std` per pixel, in f32.
#[derive(Debug, Clone)]
struct Decode {
    mean: f32,
    std: f32,
    /// The same for each byte value (256 f32) on the images' device, for a
    /// gather there.
    table: Tensor,
}

impl Decode {
    fn new(config: &DataConfig, device: &Device) -> candle_core::Result<Decode> {
        let (mean, std) = if config.normalize {
            (MNIST_MEAN, MNIST_STD)
        } else {
            (0.0, 1.0)
        };
        let table: Vec<f32> = (0..=255u8).map(|byte| decode(byte, mean, std)).collect();
        Ok(Decode {
            mean,
            std,
            table: Tensor::from_vec(table, 256, device)?,
        })
    }

    /// On the CPU, one pass over the bytes (the compiler vectorises it), a
    /// fraction of the two gathers the table takes: evaluation decodes every
    /// image of a split per pass. `None` elsewhere.
    fn on_host(&self, images: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !images.device().is_cpu() {
            return Ok(None);
        }
        let images = images.contiguous()?;
        let (storage, layout) = images.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::U8(bytes)) = &*storage else {
            candle_core::bail!("byte images expected, got {:?}", images.dtype());
        };
        let bytes = &bytes[layout.start_offset()..][..images.elem_count()];
        let (mean, std) = (self.mean, self.std);
        let inputs: Vec<f32> = bytes.iter().map(|&b| decode(b, mean, std)).collect();
        Tensor::from_vec(inputs, images.shape(), &candle_core::Device::Cpu).map(Some)
    }
}

/// One pixel's model input.
fn decode(byte: u8, mean: f32, std: f32) -> f32 {
    (byte as f32 / 255.0 - mean) / std
}

impl Tensors {
    /// A set of ready model inputs (f32 images), used as given.
    pub fn from_inputs(images: Tensor, labels: Tensor) -> Tensors {
        Tensors {
            images,
            labels,
            decode: None,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.dims1().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Model inputs (f32) of `images`, a selection of this set's images.
    pub fn inputs_of(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let Some(decode) = &self.decode else {
            return Ok(images.clone());
        };
        if let Some(inputs) = decode.on_host(images)? {
            return Ok(inputs);
        }
        // u32 indices: Candle reads an index of the type's maximum (255 for u8)
        // as "none" and gives zero.
        decode
            .table
            .index_select(&images.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .reshape(images.shape())
    }

    /// Model inputs of the whole set.
    pub fn inputs(&self) -> candle_core::Result<Tensor> {
        self.inputs_of(&self.images)
    }

    /// The same set with its images decoded once into model inputs (four times
    /// the memory), for sets read whole again and again.
    pub fn decoded(self) -> candle_core::Result<Tensors> {
        Ok(Tensors::from_inputs(self.inputs()?, self.labels))
    }

    /// The examples at `indices` (a u32 tensor), gathered on the tensors' device:
    /// model inputs and labels.
    pub fn gather(&self, indices: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.inputs_of(&self.images.index_select(indices, 0)?)?,
            self.labels.index_select(indices, 0)?,
        ))
    }

    /// Examples `start..start + len` as views, without copying.
    pub fn slice(&self, start: usize, len: usize) -> candle_core::Result<Tensors> {
        Ok(Tensors {
            images: self.images.narrow(0, start, len)?,
            labels: self.labels.narrow(0, start, len)?,
            decode: self.decode.clone(),
        })
    }
}

/// The examples of `split` at `indices`, prepared as `config` says: each 28x28
/// image padded to [`DataConfig::input_side`] (centred, zero bytes), to be
/// scaled to [0, 1] and, with `normalize`, standardised per batch.
pub fn tensors(
    split: &Split,
    indices: &[usize],
    config: &DataConfig,
    device: &Device,
) -> candle_core::Result<Tensors> {
    let n = indices.len();
    let side = config.input_side();
    let pad = (side - MNIST_SIDE) / 2;
    let image_len = MNIST_SIDE * MNIST_SIDE;
    let mut pixels = vec![0u8; n * side * side];
    for (&index, out) in indices.iter().zip(pixels.chunks_exact_mut(side * side)) {
        let image = &split.images[index * image_len..][..image_len];
        for (row, src) in image.chunks_exact(MNIST_SIDE).enumerate() {
            out[(row + pad) * side + pad..][..MNIST_SIDE].copy_from_slice(src);
        }
    }
    let images = Tensor::from_vec(pixels, (n, 1, side, side), device)?;
    let labels: Vec<u32> = indices.iter().map(|&i| split.labels[i] as u32).collect();
    let labels = Tensor::from_vec(labels, n, device)?;
    Ok(Tensors {
        images,
        labels,
        decode: Some(Decode::new(config, device)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_and_normalises() {
        let mut image = vec![0u8; 784];
        image[0] = 255;
        image[1] = 254;
        let split = Split {
            images: image,
            labels: vec![3],
        };
        let tensors = super::tensors(&split, &[0], &DataConfig::default(), &Device::Cpu).unwrap();
        assert_eq!(tensors.images.dims(), &[1, 1, 32, 32]);
        let inputs = tensors.inputs().unwrap();
        assert_eq!(inputs.dims(), &[1, 1, 32, 32]);
        let pixels: Vec<f32> = inputs.flatten_all().unwrap().to_vec1().unwrap();
        let background = -MNIST_MEAN / MNIST_STD;
        assert!((pixels[0] - background).abs() < 1e-6);
        // The first source pixel lands at row 2, column 2.
        assert!((pixels[2 * 32 + 2] - (1.0 - MNIST_MEAN) / MNIST_STD).abs() < 1e-5);
        assert!((pixels[2 * 32 + 3] - (254.0 / 255.0 - MNIST_MEAN) / MNIST_STD).abs() < 1e-5);
        assert_eq!(tensors.labels.to_vec1::<u32>().unwrap(), vec![3]);
    }
}
