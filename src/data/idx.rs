//! Reading MNIST's IDX files (gzip or raw) and checking their structure.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::data::download::{MNIST_FILES, sha256_hex};
use crate::data::{DataError, MNIST_SIDE, NUM_CLASSES, Result};
use crate::util::fsio::FileError;

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
    let raw = std::fs::read(path).map_err(FileError::on("read", path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(FileError::on("decompress", path))?;
        Ok(out)
    } else {
        Ok(raw)
    }
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
}
