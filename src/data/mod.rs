//! MNIST on disk and in memory: [`download`] finds or fetches the IDX files,
//! [`idx`] reads and checks them, [`prepare`] turns them into tensors once,
//! [`augment`] shifts training images per batch. This file holds the `[data]`
//! config and the seeded train / validation / test split.

use std::path::PathBuf;

use candle_core::Device;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use crate::util::fsio::FileError;
use crate::util::invalid::{InvalidField, invalid};

pub mod augment;
pub mod download;
pub mod idx;
pub mod prepare;

pub use download::{DownloadError, MNIST_FILES, locate_or_download};
pub use idx::{Mnist, Split};
pub use prepare::Tensors;

/// Image side of the MNIST files.
pub const MNIST_SIDE: usize = 28;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Pixel mean and standard deviation of the MNIST training set (after scaling to [0, 1]).
pub const MNIST_MEAN: f32 = 0.1307;
pub const MNIST_STD: f32 = 0.3081;

/// `[data]`: where MNIST is and how it is split and prepared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory with the four IDX files (`.gz` or raw). Unset: `$MNIST_DIR`, then `data/mnist`.
    pub dir: Option<PathBuf>,
    /// Images held out of the 60,000 training images for validation (seeded
    /// split). 0 trains on all 60,000: no validation, the last epoch is the model.
    #[default(5000)]
    pub validation_size: usize,
    /// Train on only this many of the remaining training images (unset: all).
    pub train_size: Option<usize>,
    /// Evaluate on only the first this many test images (unset: all 10,000).
    pub test_size: Option<usize>,
    /// Zero-pad 28x28 images to 32x32, as in the LeNet-5 paper (LeNet5 needs it).
    #[default(true)]
    pub pad_to_32: bool,
    /// Standardise pixels with MNIST's mean 0.1307 and std 0.3081 (else scale to [0, 1]).
    #[default(true)]
    pub normalize: bool,
    /// Augmentation: shift each training image by a random 0..=N pixels along
    /// each axis, every epoch anew (0 = off).
    pub augment_shift: usize,
    /// Augmentation: rotate each training image by a random angle of up to this
    /// many degrees either way about its centre, every epoch anew (0 = off).
    pub augment_rotate: f64,
    /// Augmentation: scale each training image by a random factor within
    /// `1 ± augment_scale` about its centre (0 = off).
    pub augment_scale: f64,
}

/// The largest `augment_shift`: beyond it digits leave MNIST's 4-pixel border.
pub const MAX_SHIFT: usize = 4;

impl DataConfig {
    /// Range checks of the `[data]` fields.
    pub fn validate(&self) -> std::result::Result<(), InvalidField> {
        if self.validation_size >= 60_000 {
            return invalid(
                "data.validation_size",
                format!(
                    "expected fewer than the 60000 training images, got {}",
                    self.validation_size
                ),
            );
        }
        if self.augment_shift > MAX_SHIFT {
            return invalid(
                "data.augment_shift",
                format!(
                    "expected 0 to {MAX_SHIFT} pixels, got {}",
                    self.augment_shift
                ),
            );
        }
        if !(0.0..=30.0).contains(&self.augment_rotate) {
            return invalid(
                "data.augment_rotate",
                format!("expected 0 to 30 degrees, got {}", self.augment_rotate),
            );
        }
        if !(0.0..=0.3).contains(&self.augment_scale) {
            return invalid(
                "data.augment_scale",
                format!("expected 0 to 0.3, got {}", self.augment_scale),
            );
        }
        if self.train_size == Some(0) {
            return invalid("data.train_size", "expected at least 1 image");
        }
        if self.test_size == Some(0) {
            return invalid("data.test_size", "expected at least 1 image");
        }
        Ok(())
    }

    /// The test images evaluated: the first `test_size` of the `available` (all when unset).
    pub fn test_indices(&self, available: usize) -> Vec<usize> {
        (0..self.test_size.map_or(available, |s| s.min(available))).collect()
    }

    /// The side of the model's input images: 32 when padded, else 28.
    pub fn input_side(&self) -> usize {
        if self.pad_to_32 { 32 } else { MNIST_SIDE }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path} is not a valid IDX file: {reason}")]
    BadIdx { path: PathBuf, reason: String },
    #[error("{images} and {labels} do not match: {reason}")]
    Mismatch {
        images: PathBuf,
        labels: PathBuf,
        reason: String,
    },
    #[error(
        "MNIST not found in {searched} and the download failed: {reason}\n\
         Put the four IDX files (.gz or raw) in {searched}, or set data.dir or MNIST_DIR."
    )]
    Download {
        searched: String,
        reason: DownloadError,
    },
    #[error(
        "data.validation_size = {validation_size} leaves no training images out of {available}"
    )]
    NoTrainingImages {
        validation_size: usize,
        available: usize,
    },
    #[error("cannot prepare the images as tensors: {0}")]
    Tensors(candle_core::Error),
}

type Result<T> = std::result::Result<T, DataError>;

/// Train, validation and test tensors, prepared once.
#[derive(Debug, Clone)]
pub struct Datasets {
    pub train: Tensors,
    /// `None` with `data.validation_size = 0`.
    pub validation: Option<Tensors>,
    pub test: Tensors,
    /// Input side (32 when padded, else 28).
    pub side: usize,
    /// Where the files were read from.
    pub dir: PathBuf,
    /// The files' contents, hashed (empty for data not read from files).
    pub sha256: idx::FileHashes,
}

impl Datasets {
    /// Finds (or downloads) MNIST, splits off the seeded validation set and prepares
    /// every split as tensors on `device`.
    pub fn load(config: &DataConfig, seed: u64, device: &Device) -> Result<Datasets> {
        let dir = locate_or_download(config.dir.as_deref(), &download::all_files())?;
        let mnist = Mnist::read(&dir)?;
        Datasets::prepare(&mnist, config, seed, device, dir)
    }

    pub fn prepare(
        mnist: &Mnist,
        config: &DataConfig,
        seed: u64,
        device: &Device,
        dir: PathBuf,
    ) -> Result<Datasets> {
        let n = mnist.train.len();
        if config.validation_size >= n {
            return Err(DataError::NoTrainingImages {
                validation_size: config.validation_size,
                available: n,
            });
        }
        let mut order: Vec<usize> = (0..n).collect();
        // The split has its own stream so it does not move when other seeded parts change.
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_5A17));
        let (validation_idx, train_idx) = order.split_at(config.validation_size);
        let train_len = config
            .train_size
            .map_or(train_idx.len(), |s| s.min(train_idx.len()));
        if config.train_size.is_some_and(|asked| asked > train_len) {
            tracing::warn!(
                train_size = config.train_size,
                available = train_len,
                "data.train_size is more than the training images left after validation; using all of them"
            );
        }
        let test_idx = config.test_indices(mnist.test.len());
        // Each split is made on a pool thread. On CUDA each thread queues its
        // uploads on its own stream: wait for them there, before the caller's
        // stream uses the tensors.
        // The training split stays bytes (decoded per batch); the evaluation
        // splits are decoded once, since every evaluation reads all of them
        // (a fifth of the bytes' saving, and evaluation at full speed).
        let to_tensors = |split: &Split, indices: &[usize], decoded: bool| {
            let mut tensors =
                prepare::tensors(split, indices, config, device).map_err(DataError::Tensors)?;
            if decoded {
                tensors = tensors.decoded().map_err(DataError::Tensors)?;
            }
            device.synchronize().map_err(DataError::Tensors)?;
            Ok::<_, DataError>(tensors)
        };
        let (train, (validation, test)) = rayon::join(
            || to_tensors(&mnist.train, &train_idx[..train_len], false),
            || {
                rayon::join(
                    || {
                        (!validation_idx.is_empty())
                            .then(|| to_tensors(&mnist.train, validation_idx, true))
                            .transpose()
                    },
                    || to_tensors(&mnist.test, &test_idx, true),
                )
            },
        );
        Ok(Datasets {
            train: train?,
            validation: validation?,
            test: test?,
            side: config.input_side(),
            dir,
            sha256: mnist.sha256.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// `n` images in each split, image `i` filled with the byte `i`.
    fn numbered_mnist(n: usize) -> Mnist {
        let images: Vec<u8> = (0..n * 784).map(|i| (i / 784) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        Mnist {
            train: Split {
                images: images.clone(),
                labels: labels.clone(),
            },
            test: Split { images, labels },
            sha256: Default::default(),
        }
    }

    #[test]
    fn validation_size_zero_trains_on_every_image() {
        let config = DataConfig {
            validation_size: 0,
            ..DataConfig::default()
        };
        config.validate().unwrap();
        let data = Datasets::prepare(
            &numbered_mnist(50),
            &config,
            1,
            &Device::Cpu,
            PathBuf::new(),
        )
        .unwrap();
        assert!(data.validation.is_none());
        assert_eq!(data.train.len(), 50);
    }

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let n = 50;
        let mnist = numbered_mnist(n);
        let config = DataConfig {
            validation_size: 10,
            ..DataConfig::default()
        };
        let first_pixel = |t: &Tensors| -> Vec<f32> {
            t.inputs()
                .unwrap()
                .narrow(3, 2, 1)
                .unwrap()
                .narrow(2, 2, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let a = Datasets::prepare(&mnist, &config, 1, &Device::Cpu, PathBuf::new()).unwrap();
        let b = Datasets::prepare(&mnist, &config, 1, &Device::Cpu, PathBuf::new()).unwrap();
        let c = Datasets::prepare(&mnist, &config, 2, &Device::Cpu, PathBuf::new()).unwrap();
        let (a_val, b_val, c_val) = (
            a.validation.as_ref().unwrap(),
            b.validation.as_ref().unwrap(),
            c.validation.as_ref().unwrap(),
        );
        assert_eq!(a_val.len(), 10);
        assert_eq!(a.train.len(), 40);
        assert_eq!(first_pixel(a_val), first_pixel(b_val));
        assert_ne!(first_pixel(a_val), first_pixel(c_val));
        let mut all: Vec<i64> = first_pixel(&a.train)
            .into_iter()
            .chain(first_pixel(a_val))
            .map(|p| ((p * MNIST_STD + MNIST_MEAN) * 255.0).round() as i64)
            .collect();
        all.sort();
        assert_eq!(
            all,
            (0..n as i64).collect::<Vec<_>>(),
            "train and validation partition the set"
        );
    }
}
