//! MNIST on disk and in memory: finding or downloading the IDX files, reading and
//! checking them, and preparing the train / validation / test tensors once.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::config::DataConfig;

/// Image side of the MNIST files.
pub const MNIST_SIDE: usize = 28;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Pixel mean and standard deviation of the MNIST training set (after scaling to [0, 1]).
pub const MNIST_MEAN: f32 = 0.1307;
pub const MNIST_STD: f32 = 0.3081;

/// The four files and the SHA-256 of their decompressed bytes as published.
pub const MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

/// Public mirrors of the gzip files, tried in order. `MNIST_MIRRORS` (comma-separated
/// base URLs) replaces them.
pub const DEFAULT_MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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
         Put the four IDX files (.gz or raw) in one of those directories, or set MNIST_DIR."
    )]
    Download { searched: String, reason: String },
    #[error("data: {0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, DataError>;

/// An IDX array of unsigned bytes: its dimensions and its data, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses IDX bytes (already decompressed). `path` only names the file in errors.
pub fn parse_idx(mut bytes: Vec<u8>, path: &Path) -> Result<IdxArray> {
    let bad = |reason: String| DataError::BadIdx {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes is too short for a header",
            bytes.len()
        )));
    }
    // Magic: two zero bytes, the element type (0x08 = unsigned byte), the rank.
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(format!(
            "magic number starts {:02x} {:02x}, expected 00 00",
            bytes[0], bytes[1]
        )));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "element type 0x{:02x}, expected 0x08 (unsigned byte)",
            bytes[2]
        )));
    }
    let rank = bytes[3] as usize;
    if rank == 0 {
        return Err(bad("rank 0, expected at least 1 dimension".into()));
    }
    let header_len = 4 + 4 * rank;
    if bytes.len() < header_len {
        return Err(bad(format!(
            "{} bytes is too short for a rank-{rank} header",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let actual = bytes.len() - header_len;
    if actual != expected {
        return Err(bad(format!(
            "dimensions {dims:?} need {expected} data bytes, the file has {actual}"
        )));
    }
    // Drop the header in place: the data is most of a 47 MB file, not worth a copy.
    bytes.drain(..header_len);
    Ok(IdxArray { dims, data: bytes })
}

/// Reads a file, decompressing it when it starts with the gzip magic bytes.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The path of `stem` in `dir`: `stem.gz` or plain `stem`, whichever exists.
fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.gz"), stem.to_string()]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
}

fn holds_mnist(dir: &Path) -> bool {
    MNIST_FILES
        .iter()
        .all(|(stem, _)| find_file(dir, stem).is_some())
}

/// The directories searched, in order: the config's, `$MNIST_DIR`, `data/mnist`.
pub fn candidate_dirs(configured: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = configured.map(Path::to_path_buf).into_iter().collect();
    if let Some(env) = std::env::var_os("MNIST_DIR").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(env));
    }
    dirs.push(PathBuf::from("data/mnist"));
    dirs.dedup();
    dirs
}

/// The first candidate that holds all four files; else downloads into the first.
pub fn locate_or_download(configured: Option<&Path>) -> Result<PathBuf> {
    let dirs = candidate_dirs(configured);
    if let Some(dir) = dirs.iter().find(|dir| holds_mnist(dir)) {
        return Ok(dir.clone());
    }
    let target = &dirs[0];
    tracing::warn!(dir = %target.display(), "MNIST not found locally; downloading");
    download_mnist(target, &mirrors()).map_err(|reason| DataError::Download {
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        reason,
    })?;
    Ok(target.clone())
}

fn mirrors() -> Vec<String> {
    match std::env::var("MNIST_MIRRORS") {
        Ok(list) if !list.trim().is_empty() => {
            list.split(',').map(|m| m.trim().to_string()).collect()
        }
        _ => DEFAULT_MIRRORS.iter().map(|m| m.to_string()).collect(),
    }
}

/// Downloads the missing files into `dir`, verifying each by the SHA-256 of its
/// decompressed bytes before it is renamed into place.
pub fn download_mnist(dir: &Path, mirrors: &[String]) -> std::result::Result<(), String> {
    // Fetch everything first: a failed download leaves no directory or file behind.
    let mut fetched = Vec::new();
    for (stem, sha) in MNIST_FILES {
        if find_file(dir, stem).is_some() {
            continue;
        }
        let mut errors = Vec::new();
        let bytes = mirrors.iter().find_map(|mirror| {
            let url = format!("{}/{stem}.gz", mirror.trim_end_matches('/'));
            fetch_verified(&url, sha)
                .inspect_err(|e| errors.push(format!("{url}: {e}")))
                .ok()
        });
        fetched.push((stem, bytes.ok_or_else(|| errors.join("; "))?));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (stem, bytes) in fetched {
        crate::rundir::write_atomic(&dir.join(format!("{stem}.gz")), &bytes)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Fetches one gzip file and checks its decompressed SHA-256.
fn fetch_verified(url: &str, expected_sha: &str) -> std::result::Result<Vec<u8>, String> {
    let mut response = ureq::get(url).call().map_err(|e| e.to_string())?;
    let length = response.body().content_length();
    let bar = crate::progress::download_bar(length, url);
    let mut bytes = Vec::new();
    bar.wrap_read(response.body_mut().as_reader())
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut raw)
        .map_err(|e| format!("not a gzip file: {e}"))?;
    let actual = sha256_hex(&raw);
    if actual != expected_sha {
        return Err(format!("SHA-256 {actual}, expected {expected_sha}"));
    }
    Ok(bytes)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Raw images (`n x 28 x 28` bytes) and labels of one split.
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images and labels at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Split {
        let pixels = MNIST_SIDE * MNIST_SIDE;
        let mut images = Vec::with_capacity(indices.len() * pixels);
        for &i in indices {
            images.extend_from_slice(&self.images[i * pixels..(i + 1) * pixels]);
        }
        Split {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// Reads one images/labels pair and checks they agree.
pub fn read_split(dir: &Path, images_stem: &str, labels_stem: &str) -> Result<Split> {
    let missing = |stem: &str| DataError::Io {
        path: dir.join(stem),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (.gz or raw)"),
    };
    let images_path = find_file(dir, images_stem).ok_or_else(|| missing(images_stem))?;
    let labels_path = find_file(dir, labels_stem).ok_or_else(|| missing(labels_stem))?;
    let (images, labels) = rayon::join(
        || read_checked(&images_path, images_stem),
        || read_checked(&labels_path, labels_stem),
    );
    let (images, labels) = (images?, labels?);
    let mismatch = |reason: String| DataError::Mismatch {
        images: images_path.clone(),
        labels: labels_path.clone(),
        reason,
    };
    if images.dims.len() != 3 || images.dims[1..] != [MNIST_SIDE, MNIST_SIDE] {
        return Err(DataError::BadIdx {
            path: images_path.clone(),
            reason: format!("dimensions {:?}, expected [n, 28, 28]", images.dims),
        });
    }
    if labels.dims.len() != 1 {
        return Err(DataError::BadIdx {
            path: labels_path.clone(),
            reason: format!("dimensions {:?}, expected [n]", labels.dims),
        });
    }
    if images.dims[0] != labels.dims[0] {
        return Err(mismatch(format!(
            "{} images but {} labels",
            images.dims[0], labels.dims[0]
        )));
    }
    if let Some(pos) = labels.data.iter().position(|&l| l as usize >= NUM_CLASSES) {
        return Err(DataError::BadIdx {
            path: labels_path.clone(),
            reason: format!("label {} at index {pos}, expected 0..=9", labels.data[pos]),
        });
    }
    Ok(Split {
        images: images.data,
        labels: labels.data,
    })
}

/// Reads and parses one IDX file; a hash other than MNIST's is a warning, not an
/// error, so users' own 28x28 ten-class files train too.
fn read_checked(path: &Path, stem: &str) -> Result<IdxArray> {
    let bytes = read_maybe_gzip(path)?;
    let expected = MNIST_FILES
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, sha)| *sha);
    if expected.is_some_and(|sha| sha256_hex(&bytes) != sha) {
        tracing::warn!(file = %path.display(), "SHA-256 differs from the published MNIST file; using it anyway");
    }
    parse_idx(bytes, path)
}

/// The raw MNIST training and test sets.
#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
}

impl Mnist {
    pub fn read(dir: &Path) -> Result<Mnist> {
        // Decompressing and hashing dominate start-up: read both splits at once.
        let (train, test) = rayon::join(
            || read_split(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            || read_split(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        );
        Ok(Mnist {
            train: train?,
            test: test?,
        })
    }
}

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

    /// The examples at `indices` (a u32 tensor on the tensors' device; `host_indices`
    /// holds the same values), each translated by a random whole-pixel offset of up
    /// to `max_shift` along each axis, edge pixels repeated into the gap (MNIST's
    /// borders are background). One gather of pixel indices: no image is copied on
    /// the host, and off the CPU the indices are computed on the device.
    pub fn gather_shifted(
        &self,
        indices: &Tensor,
        host_indices: &[u32],
        max_shift: usize,
        rng: &mut impl rand::Rng,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let max = max_shift as i64;
        let shifts: Vec<(i64, i64)> = host_indices
            .iter()
            .map(|_| (rng.random_range(-max..=max), rng.random_range(-max..=max)))
            .collect();
        let (_, _, height, width) = self.images.dims4()?;
        let pixels = if self.images.device().is_cpu() {
            shifted_pixels_on_host(host_indices, &shifts, height, width, self.images.device())?
        } else {
            shifted_pixels_on_device(indices, &shifts, height, width)?
        };
        let images = self
            .images
            .flatten_all()?
            .index_select(&pixels, 0)?
            .reshape((host_indices.len(), 1, height, width))?;
        Ok((images, self.labels.index_select(indices, 0)?))
    }

    /// Examples `start..start + len` as views, without copying.
    pub fn slice(&self, start: usize, len: usize) -> candle_core::Result<Tensors> {
        Ok(Tensors {
            images: self.images.narrow(0, start, len)?,
            labels: self.labels.narrow(0, start, len)?,
        })
    }
}

/// Flat pixel indices of images `indices`, each shifted by `(dy, dx)` with edges
/// clamped, built on the host.
fn shifted_pixels_on_host(
    indices: &[u32],
    shifts: &[(i64, i64)],
    height: usize,
    width: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let plane = height * width;
    let mut pixels = Vec::with_capacity(indices.len() * plane);
    for (&image, &(dy, dx)) in indices.iter().zip(shifts) {
        let base = image as usize * plane;
        for y in 0..height as i64 {
            let sy = (y - dy).clamp(0, height as i64 - 1) as usize;
            for x in 0..width as i64 {
                let sx = (x - dx).clamp(0, width as i64 - 1) as usize;
                pixels.push((base + sy * width + sx) as u32);
            }
        }
    }
    Tensor::from_vec(pixels, indices.len() * plane, device)
}

/// The same indices as [`shifted_pixels_on_host`], computed with tensor ops on the
/// device of `indices`: only the shifts (two numbers per image) are uploaded.
fn shifted_pixels_on_device(
    indices: &Tensor,
    shifts: &[(i64, i64)],
    height: usize,
    width: usize,
) -> candle_core::Result<Tensor> {
    let device = indices.device();
    let n = shifts.len();
    let (h, w) = (height as i64, width as i64);
    let dy = Tensor::from_vec(shifts.iter().map(|s| s.0).collect(), (n, 1), device)?;
    let dx = Tensor::from_vec(shifts.iter().map(|s| s.1).collect(), (n, 1), device)?;
    let rows = Tensor::arange(0i64, h, device)?.unsqueeze(0)?;
    let cols = Tensor::arange(0i64, w, device)?.unsqueeze(0)?;
    let source_rows = rows.broadcast_sub(&dy)?.clamp(0i64, h - 1)?;
    let source_cols = cols.broadcast_sub(&dx)?.clamp(0i64, w - 1)?;
    let scalar = |v: i64| Tensor::new(v, device);
    let base = indices
        .to_dtype(DType::I64)?
        .broadcast_mul(&scalar(h * w)?)?
        .reshape((n, 1, 1))?;
    base.broadcast_add(
        &source_rows
            .broadcast_mul(&scalar(w)?)?
            .reshape((n, height, 1))?,
    )?
    .broadcast_add(&source_cols.reshape((n, 1, width))?)?
    .flatten_all()
}

/// Train, validation and test tensors, prepared once.
#[derive(Debug, Clone)]
pub struct Datasets {
    pub train: Tensors,
    pub validation: Tensors,
    pub test: Tensors,
    /// Input side (32 when padded, else 28).
    pub side: usize,
    /// Where the files were read from.
    pub dir: PathBuf,
}

impl Datasets {
    /// Finds (or downloads) MNIST, splits off the seeded validation set and prepares
    /// every split as tensors on `device`.
    pub fn load(config: &DataConfig, seed: u64, device: &Device) -> Result<Datasets> {
        let dir = locate_or_download(config.dir.as_deref())?;
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
            return Err(DataError::Config(format!(
                "data.validation_size = {} leaves no training images out of {n}",
                config.validation_size
            )));
        }
        let mut order: Vec<usize> = (0..n).collect();
        // The split has its own stream so it does not move when other seeded parts change.
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_5A17));
        let (validation_idx, train_idx) = order.split_at(config.validation_size);
        let train_len = config
            .train_size
            .map_or(train_idx.len(), |s| s.min(train_idx.len()));
        let test_len = config
            .test_size
            .map_or(mnist.test.len(), |s| s.min(mnist.test.len()));
        let test_idx: Vec<usize> = (0..test_len).collect();
        let side = if config.pad_to_32 { 32 } else { MNIST_SIDE };
        let to_tensors = |split: &Split, indices: &[usize]| {
            tensors_of(split, indices, side, config.normalize, device)
                .map_err(|e| DataError::Config(format!("cannot build tensors on {device:?}: {e}")))
        };
        let (train, (validation, test)) = rayon::join(
            || to_tensors(&mnist.train, &train_idx[..train_len]),
            || {
                rayon::join(
                    || to_tensors(&mnist.train, validation_idx),
                    || to_tensors(&mnist.test, &test_idx),
                )
            },
        );
        Ok(Datasets {
            train: train?,
            validation: validation?,
            test: test?,
            side,
            dir,
        })
    }
}

/// Pads each 28x28 image to `side` (centred, zero pixels), scales to [0, 1] and
/// optionally standardises: done once, so batches are plain index gathers.
pub fn to_tensors(
    split: &Split,
    side: usize,
    normalize: bool,
    device: &Device,
) -> candle_core::Result<Tensors> {
    let all: Vec<usize> = (0..split.len()).collect();
    tensors_of(split, &all, side, normalize, device)
}

/// [`to_tensors`] of the examples at `indices`, read straight from `split`
/// (no intermediate copy of the selected images).
pub fn tensors_of(
    split: &Split,
    indices: &[usize],
    side: usize,
    normalize: bool,
    device: &Device,
) -> candle_core::Result<Tensors> {
    let n = indices.len();
    let pad = (side - MNIST_SIDE) / 2;
    let (mean, std) = if normalize {
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

    pub fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_a_valid_idx_file() {
        let bytes = idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let array = parse_idx(bytes, Path::new("x")).unwrap();
        assert_eq!(array.dims, vec![2, 3]);
        assert_eq!(array.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_bad_magic_type_and_size() {
        let path = Path::new("bad.idx");
        let mut wrong_magic = idx_bytes(&[2], &[1, 2]);
        wrong_magic[0] = 7;
        let mut wrong_type = idx_bytes(&[2], &[1, 2]);
        wrong_type[2] = 0x0D;
        let cases = [
            (vec![0, 0], "too short"),
            (wrong_magic, "magic"),
            (wrong_type, "element type"),
            (idx_bytes(&[2, 2], &[1, 2, 3]), "need 4 data bytes"),
            (idx_bytes(&[2], &[1, 2, 3]), "the file has 3"),
            (vec![0, 0, 8, 2, 0, 0], "rank-2 header"),
        ];
        for (bytes, expected) in cases {
            let err = parse_idx(bytes.clone(), path).unwrap_err().to_string();
            assert!(err.contains("bad.idx") && err.contains(expected), "{err}");
        }
    }

    fn write_split(
        dir: &Path,
        prefix: &str,
        images: &[u8],
        n_images: u32,
        labels: &[u8],
        gzip: bool,
    ) {
        let files = [
            (
                format!("{prefix}-images-idx3-ubyte"),
                idx_bytes(&[n_images, 28, 28], images),
            ),
            (
                format!("{prefix}-labels-idx1-ubyte"),
                idx_bytes(&[labels.len() as u32], labels),
            ),
        ];
        for (stem, bytes) in files {
            if gzip {
                use std::io::Write;
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&bytes).unwrap();
                std::fs::write(dir.join(format!("{stem}.gz")), enc.finish().unwrap()).unwrap();
            } else {
                std::fs::write(dir.join(stem), bytes).unwrap();
            }
        }
    }

    #[test]
    fn reads_gzip_and_raw_splits_and_checks_labels() {
        let dir = tempfile::tempdir().unwrap();
        let images: Vec<u8> = (0..3 * 784).map(|i| (i % 256) as u8).collect();
        write_split(dir.path(), "train", &images, 3, &[0, 9, 4], true);
        write_split(dir.path(), "t10k", &images[..784], 1, &[7], false);
        let split = read_split(
            dir.path(),
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
        )
        .unwrap();
        assert_eq!(split.labels, vec![0, 9, 4]);
        assert_eq!(split.images, images);
        let test = read_split(
            dir.path(),
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
        .unwrap();
        assert_eq!(test.labels, vec![7]);

        write_split(dir.path(), "t10k", &images[..784], 1, &[12], false);
        let err = read_split(
            dir.path(),
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("label 12"), "{err}");

        write_split(dir.path(), "t10k", &images[..784], 1, &[1, 2], false);
        let err = read_split(
            dir.path(),
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("1 images but 2 labels"), "{err}");
    }

    #[test]
    fn pads_and_normalises() {
        let mut image = vec![0u8; 784];
        image[0] = 255;
        let split = Split {
            images: image,
            labels: vec![3],
        };
        let tensors = to_tensors(&split, 32, true, &Device::Cpu).unwrap();
        assert_eq!(tensors.images.dims(), &[1, 1, 32, 32]);
        let pixels: Vec<f32> = tensors.images.flatten_all().unwrap().to_vec1().unwrap();
        let background = -MNIST_MEAN / MNIST_STD;
        assert!((pixels[0] - background).abs() < 1e-6);
        // The first source pixel lands at row 2, column 2.
        assert!((pixels[2 * 32 + 2] - (1.0 - MNIST_MEAN) / MNIST_STD).abs() < 1e-5);
        assert_eq!(tensors.labels.to_vec1::<u32>().unwrap(), vec![3]);
    }

    #[test]
    fn shifted_gather_translates_with_repeated_edges() {
        // One 4x4 image whose pixel values are their own indices.
        let images = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let labels = Tensor::new(&[7u32], &Device::Cpu).unwrap();
        let set = Tensors { images, labels };
        let first = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let (batch, labels) = set.gather_shifted(&first, &[0], 1, &mut rng).unwrap();
            assert_eq!(labels.to_vec1::<u32>().unwrap(), vec![7]);
            let v: Vec<f32> = batch.flatten_all().unwrap().to_vec1().unwrap();
            // Rows and columns stay in order: a shift keeps every row a run of
            // neighbouring columns (or a repeated edge).
            for row in v.chunks(4) {
                assert!(
                    row.windows(2)
                        .all(|w| w[1] - w[0] == 0.0 || w[1] - w[0] == 1.0),
                    "{v:?}"
                );
            }
            seen.insert(v.iter().map(|&x| x as i32).collect::<Vec<_>>());
        }
        assert!(seen.len() > 3, "random offsets give different images");
        let (unshifted, _) = set.gather_shifted(&first, &[0], 0, &mut rng).unwrap();
        assert_eq!(
            unshifted.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..16).map(|i| i as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn device_and_host_shift_indices_agree() {
        let indices = [3u32, 0, 7, 7];
        let shifts = [(2, -1), (0, 0), (-2, 2), (1, 1)];
        let host = shifted_pixels_on_host(&indices, &shifts, 5, 6, &Device::Cpu).unwrap();
        let on_tensors = Tensor::new(&indices, &Device::Cpu).unwrap();
        let device = shifted_pixels_on_device(&on_tensors, &shifts, 5, 6).unwrap();
        let device: Vec<u32> = device.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        assert_eq!(host.to_vec1::<u32>().unwrap(), device);
    }

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let n = 50;
        let images: Vec<u8> = (0..n * 784).map(|i| (i / 784) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let mnist = Mnist {
            train: Split {
                images: images.clone(),
                labels: labels.clone(),
            },
            test: Split { images, labels },
        };
        let config = DataConfig {
            validation_size: 10,
            ..DataConfig::default()
        };
        let first_pixel = |t: &Tensors| -> Vec<f32> {
            t.images
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
        assert_eq!(a.validation.len(), 10);
        assert_eq!(a.train.len(), 40);
        assert_eq!(first_pixel(&a.validation), first_pixel(&b.validation));
        assert_ne!(first_pixel(&a.validation), first_pixel(&c.validation));
        let mut all: Vec<i64> = first_pixel(&a.train)
            .into_iter()
            .chain(first_pixel(&a.validation))
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
