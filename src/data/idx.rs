//! Reading MNIST's IDX files (gzip or raw) and checking their structure.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::data::download::{MNIST_FILES, hex};
use crate::data::{DataError, MNIST_SIDE, NUM_CLASSES, Result};
use crate::util::fsio::FileError;

/// An IDX array of unsigned bytes: its dimensions and its data, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// The most data an IDX file may declare: MNIST's largest holds 47 MB, and a
/// header that claims gigabytes must fail before anything that size is allocated.
pub const MAX_IDX_BYTES: usize = 256 << 20;

/// Parses IDX bytes (already decompressed). `path` only names the file in errors;
/// `expected_rank` (3 for images, 1 for labels), when given, is part of the magic
/// number the file must start with.
pub fn parse_idx(bytes: &[u8], path: &Path, expected_rank: Option<u8>) -> Result<IdxArray> {
    read_idx(bytes, path, expected_rank).map(|(array, _)| array)
}

/// Reads an IDX array from `reader` (the file's bytes, decompressed): the header
/// first, then exactly as many data bytes as it declares, once that size is
/// known to be sane. Returns the array and the SHA-256 of all the bytes read.
pub fn read_idx(
    mut reader: impl Read,
    path: &Path,
    expected_rank: Option<u8>,
) -> Result<(IdxArray, String)> {
    let bad = |reason: String| DataError::BadIdx {
        path: path.to_path_buf(),
        reason,
    };
    let io_error = |e: std::io::Error| DataError::File(FileError::new("read", path, e));
    let mut hasher = Sha256::new();
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut reader, &mut magic).map_err(io_error)?;
    if got < 4 {
        return Err(bad(format!("{got} bytes is too short for a header")));
    }
    hasher.update(magic);
    let rank = check_magic(magic, expected_rank).map_err(bad)?;
    let mut dims_bytes = vec![0u8; 4 * rank];
    let got = read_up_to(&mut reader, &mut dims_bytes).map_err(io_error)?;
    if got < dims_bytes.len() {
        return Err(bad(format!(
            "{} bytes is too short for a rank-{rank} header",
            4 + got
        )));
    }
    hasher.update(&dims_bytes);
    let dims: Vec<usize> = dims_bytes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            bad(format!(
                "dimensions {dims:?} declare more than {} MiB of data",
                MAX_IDX_BYTES >> 20
            ))
        })?;
    // One byte more than declared tells a file that is too long.
    let mut data = Vec::with_capacity(expected + 1);
    (&mut reader)
        .take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(io_error)?;
    if data.len() != expected {
        // A corrupt gzip body can decompress to the wrong length: reading on to
        // the end lets the decoder check its CRC, the truer account of the fault.
        let mut rest = (&mut reader).take(MAX_IDX_BYTES as u64);
        std::io::copy(&mut rest, &mut std::io::sink()).map_err(io_error)?;
        let actual = if data.len() > expected {
            "more than that".to_string()
        } else {
            data.len().to_string()
        };
        return Err(bad(format!(
            "dimensions {dims:?} need {expected} data bytes, the file has {actual}"
        )));
    }
    hasher.update(&data);
    let sha = hex(&hasher.finalize());
    Ok((IdxArray { dims, data }, sha))
}

/// Checks the magic number (two zero bytes, element type 0x08 for unsigned
/// bytes, the rank) and returns the rank.
fn check_magic(magic: [u8; 4], expected_rank: Option<u8>) -> std::result::Result<usize, String> {
    let expected = match expected_rank {
        Some(rank) => format!("0x000008{rank:02x}"),
        None => "0x000008NN".into(),
    };
    let found = u32::from_be_bytes(magic);
    let wrong = |what: &str| format!("magic number 0x{found:08x}, expected {expected} ({what})");
    if magic[0] != 0 || magic[1] != 0 {
        return Err(wrong("an IDX file starts with two zero bytes"));
    }
    if magic[2] != 0x08 {
        return Err(wrong("element type 0x08, unsigned bytes"));
    }
    let rank = magic[3];
    if rank == 0 || expected_rank.is_some_and(|r| r != rank) {
        return Err(wrong(match expected_rank {
            Some(3) => "rank 3: n images of 28x28",
            Some(1) => "rank 1: n labels",
            _ => "rank at least 1",
        }));
    }
    Ok(rank as usize)
}

/// Fills as much of `buf` as the reader has; returns how much.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Opens a file for reading, through a gzip decoder when it starts with the
/// gzip magic bytes.
pub fn open_maybe_gzip(path: &Path) -> Result<Box<dyn Read>> {
    let open_error = |e| DataError::File(FileError::new("read", path, e));
    let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(open_error)?);
    let gzip = file
        .fill_buf()
        .map_err(open_error)?
        .starts_with(&[0x1f, 0x8b]);
    Ok(if gzip {
        Box::new(flate2::bufread::GzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// Reads a whole file, decompressed, up to [`MAX_IDX_BYTES`] plus a header.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_maybe_gzip(path)?
        .take(MAX_IDX_BYTES as u64 + 64)
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::File(FileError::new("decompress", path, e)))?;
    Ok(bytes)
}

/// The path of `stem` in `dir`: `stem.gz` or plain `stem`, whichever exists.
pub(crate) fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.gz"), stem.to_string()]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
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
    read_split_hashed(dir, images_stem, labels_stem).map(|(split, _)| split)
}

/// SHA-256 of each file's decompressed bytes, by stem (`train-images-idx3-ubyte`).
pub type FileHashes = BTreeMap<String, String>;

/// [`read_split`], with the SHA-256 of the two files' contents.
fn read_split_hashed(
    dir: &Path,
    images_stem: &str,
    labels_stem: &str,
) -> Result<(Split, FileHashes)> {
    let missing = |stem: &str| {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (.gz or raw)");
        DataError::File(FileError::new("read", &dir.join(stem), cause))
    };
    let images_path = find_file(dir, images_stem).ok_or_else(|| missing(images_stem))?;
    let labels_path = find_file(dir, labels_stem).ok_or_else(|| missing(labels_stem))?;
    let (images, labels) = rayon::join(
        || read_checked(&images_path, images_stem),
        || read_checked(&labels_path, labels_stem),
    );
    let ((images, images_sha), (labels, labels_sha)) = (images?, labels?);
    let hashes = FileHashes::from([
        (images_stem.to_string(), images_sha),
        (labels_stem.to_string(), labels_sha),
    ]);
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
    let split = Split {
        images: images.data,
        labels: labels.data,
    };
    Ok((split, hashes))
}

/// Reads and parses one IDX file; a hash other than MNIST's is a warning, not an
/// error, so users' own 28x28 ten-class files train too.
fn read_checked(path: &Path, stem: &str) -> Result<(IdxArray, String)> {
    let rank = if stem.contains("images") { 3 } else { 1 };
    let (array, sha) = read_idx(open_maybe_gzip(path)?, path, Some(rank))?;
    let expected = MNIST_FILES
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, sha)| *sha);
    if expected.is_some_and(|expected| sha != expected) {
        tracing::warn!(file = %path.display(), "SHA-256 differs from the published MNIST file; using it anyway");
    }
    Ok((array, sha))
}

/// The raw MNIST training and test sets.
#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
    /// The four files' contents, hashed: a run records them, and a resumed run
    /// warns when it reads other files.
    pub sha256: FileHashes,
}

/// The test set's files, read alone where nothing else is needed (`eval`).
pub fn read_test(dir: &Path) -> Result<Split> {
    read_split(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
}

impl Mnist {
    pub fn read(dir: &Path) -> Result<Mnist> {
        // Decompressing and hashing dominate start-up: read both splits at once.
        let (train, test) = rayon::join(
            || read_split_hashed(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            || read_split_hashed(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        );
        let ((train, mut sha256), (test, test_sha256)) = (train?, test?);
        sha256.extend(test_sha256);
        Ok(Mnist {
            train,
            test,
            sha256,
        })
    }
}

#[cfg(test)]
mod tests;
