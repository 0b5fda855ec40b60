//! Property tests over what users hand us: IDX files (raw and gzip), config
//! text, `--set` assignments and image files. Nothing may panic or hang, and a
//! header that claims more data than a file could hold fails before anything
//! that size is allocated. `PROPTEST_CASES` sets the cases per property (256 by
//! default; `just fuzz` runs many more).

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;

use mnist_lab::analyze::predict::load_as_mnist;
use mnist_lab::config::{Config, Override};
use mnist_lab::data::idx::{MAX_IDX_BYTES, open_maybe_gzip, parse_idx, read_idx};
use mnist_lab::run::sweep::SweepSet;

fn idx_header(dims: &[u32]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn rank() -> impl Strategy<Value = Option<u8>> {
    prop_oneof![Just(None), Just(Some(1u8)), Just(Some(3u8))]
}

proptest! {
    #[test]
    fn idx_reader_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600), rank in rank()) {
        let _ = parse_idx(&bytes, Path::new("fuzz.idx"), rank);
    }

    #[test]
    fn idx_headers_are_believed_only_up_to_the_data(
        dims in prop::collection::vec(any::<u32>(), 1..5),
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = idx_header(&dims);
        bytes.extend_from_slice(&data);
        let declared = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d as usize));
        let result = parse_idx(&bytes, Path::new("fuzz.idx"), None);
        prop_assert_eq!(result.is_ok(), declared == Some(data.len()));
    }

    #[test]
    fn gzip_files_of_any_content_read_or_fail_cleanly(
        payload in prop::collection::vec(any::<u8>(), 0..600),
        cut in any::<prop::sample::Index>(),
        rank in rank(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut compressed = gzip(&payload);
        // Whole, or cut short anywhere after the gzip magic.
        let keep = 2 + cut.index(compressed.len() - 1);
        compressed.truncate(keep);
        let path = dir.path().join("f.gz");
        std::fs::write(&path, &compressed).unwrap();
        if let Ok(reader) = open_maybe_gzip(&path) {
            let _ = read_idx(reader, &path, rank);
        }
    }

    #[test]
    fn config_text_of_any_shape_loads_or_fails_cleanly(text in "\\PC{0,300}") {
        let _ = Config::from_toml(&text, Path::new("fuzz.toml"), Some("fuzz"), &[]);
    }

    #[test]
    fn config_fields_with_any_value_load_or_fail_cleanly(
        section in prop::sample::select(vec!["data", "model", "optimizer", "schedule", "train", "device", "sweep"]),
        key in prop::sample::select(vec![
            "dir", "validation_size", "train_size", "test_size", "augment_shift", "kind",
            "batch_norm", "dropout", "lr", "momentum", "weight_decay", "beta1", "eps",
            "step_size", "gamma", "min_lr", "warmup_epochs", "epochs", "batch_size",
            "eval_batch_size", "threads", "\"optimizer.lr\"", "nope",
        ]),
        value in prop::sample::select(vec![
            "0", "-1", "1", "1e300", "-1e-300", "nan", "inf", "-inf", "0.5", "18446744073709551615",
            "9223372036854775807", "true", "\"\"", "\"cuda:99\"", "\"lenet5\"", "[]", "[1, 2]",
            "[[]]", "{}", "\"../../x\"", "1979-05-27",
        ]),
    ) {
        let text = format!("[{section}]\n{key} = {value}\n");
        let _ = Config::from_toml(&text, Path::new("fuzz.toml"), Some("fuzz"), &[]);
    }

    #[test]
    fn set_assignments_of_any_text_parse_or_fail_cleanly(text in "\\PC{0,80}") {
        let _ = text.parse::<SweepSet>();
        if let Ok(assignment) = text.parse::<Override>() {
            let _ = Config::from_toml("", Path::new("fuzz.toml"), Some("fuzz"), &[assignment]);
        }
    }

    #[test]
    fn image_files_of_any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..1500)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digit.png");
        std::fs::write(&path, &bytes).unwrap();
        let _ = load_as_mnist(&path);
    }

    #[test]
    fn any_real_image_becomes_an_mnist_frame_or_is_blank(
        (width, height, pixels) in (1u32..80, 1u32..80).prop_flat_map(|(w, h)| {
            (Just(w), Just(h), prop::collection::vec(any::<u8>(), (w * h * 4) as usize))
        }),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digit.png");
        image::RgbaImage::from_raw(width, height, pixels).unwrap().save(&path).unwrap();
        match load_as_mnist(&path) {
            Ok(frame) => prop_assert_eq!(frame.len(), 28 * 28),
            Err(error) => prop_assert!(error.to_string().contains("no digit found"), "{}", error),
        }
    }
}

#[test]
fn a_header_claiming_billions_of_images_fails_before_allocating() {
    let bytes = idx_header(&[4_000_000_000, 28, 28]);
    let error = parse_idx(&bytes, Path::new("huge.idx"), Some(3))
        .unwrap_err()
        .to_string();
    assert!(error.contains("declare more than"), "{error}");
    const { assert!(MAX_IDX_BYTES < 4_000_000_000 * 784) };
}

#[test]
fn a_gzip_bomb_stops_at_the_declared_size() {
    // A valid header declaring 10 bytes, then 300 MB of zeros: a 300 KB file.
    let mut bytes = idx_header(&[10]);
    bytes.resize(300 << 20, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.gz");
    std::fs::write(&path, gzip(&bytes)).unwrap();
    let error = read_idx(open_maybe_gzip(&path).unwrap(), &path, Some(1)).unwrap_err();
    assert!(error.to_string().contains("the file has more"), "{error}");
}
