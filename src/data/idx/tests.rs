//! Reading IDX files: valid ones, and every way one can be wrong.

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
    let array = parse_idx(&bytes, Path::new("x"), None).unwrap();
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
        (idx_bytes(&[2], &[1, 2, 3]), "the file has more"),
        (vec![0, 0, 8, 2, 0, 0], "rank-2 header"),
    ];
    for (bytes, expected) in cases {
        let err = parse_idx(&bytes, path, None).unwrap_err().to_string();
        assert!(err.contains("bad.idx") && err.contains(expected), "{err}");
    }
}

#[test]
fn a_labels_file_with_an_images_magic_number_says_so() {
    let images = idx_bytes(&[1, 28, 28], &[0; 784]);
    let err = parse_idx(&images, Path::new("labels"), Some(1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("magic number 0x00000803, expected 0x00000801 (rank 1: n labels)"),
        "{err}"
    );
    let text = b"not an IDX file at all".to_vec();
    let err = parse_idx(&text, Path::new("t"), Some(3))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("magic number 0x6e6f7420, expected 0x00000803"),
        "{err}"
    );
}

fn write_split(dir: &Path, prefix: &str, images: &[u8], n_images: u32, labels: &[u8], gzip: bool) {
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
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            std::fs::write(dir.join(format!("{stem}.gz")), enc.finish().unwrap()).unwrap();
        } else {
            std::fs::write(dir.join(stem), bytes).unwrap();
        }
    }
}

#[test]
fn a_corrupt_gzip_body_is_a_checksum_error_not_a_size_error() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // One data byte more than declared: a size error when the gzip is sound.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&idx_bytes(&[2], &[1, 2, 3])).unwrap();
    let sound = enc.finish().unwrap();
    let path = dir.path().join("labels.gz");
    std::fs::write(&path, &sound).unwrap();
    let err = read_idx(open_maybe_gzip(&path).unwrap(), &path, Some(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("need 2 data bytes"), "{err}");
    // The same body with its CRC-32 trailer damaged: the checksum is the fault.
    let mut corrupt = sound.clone();
    let crc = corrupt.len() - 8;
    corrupt[crc] ^= 0xff;
    std::fs::write(&path, &corrupt).unwrap();
    let err = read_idx(open_maybe_gzip(&path).unwrap(), &path, Some(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum"), "{err}");
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
