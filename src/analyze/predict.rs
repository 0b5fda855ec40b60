//! `mnist-lab predict`: classify image files with a trained run.
//!
//! Any size, greyscale or colour, with or without alpha (transparent pixels count
//! as white paper). Each image is brought into MNIST's own format first:
//! 1. luminance, with the polarity detected from the border: a light border means
//!    dark ink on paper, which is inverted to MNIST's light ink on black;
//! 2. a 28x28 image is taken as already in MNIST format; any other size is
//!    cropped to the ink, scaled so its longer side is 20 pixels, and placed in a
//!    28x28 frame with its centre of mass at the centre, as MNIST's digits were.

use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, imageops};
use serde::Serialize;

use crate::analyze::evaluate::TrainedModel;
use crate::analyze::{AnalyzeError, Result};
use crate::data::{MNIST_SIDE, Split};

/// MNIST fits each digit's longer side to this many pixels.
const DIGIT_BOX: u32 = 20;

/// A class and the probability the model gives it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ClassProbability {
    pub class: u8,
    pub probability: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub image: PathBuf,
    /// The three most probable classes, most probable first.
    pub top: Vec<ClassProbability>,
}

/// Classifies each image: a prediction, or the error that names why not (an
/// unreadable or blank image), for every file, in order.
pub fn predict(model: &TrainedModel, images: &[PathBuf]) -> Result<Vec<Result<Prediction>>> {
    let loaded: Vec<Result<Vec<u8>>> = images.iter().map(|path| load_as_mnist(path)).collect();
    let readable: Vec<&Vec<u8>> = loaded.iter().filter_map(|l| l.as_ref().ok()).collect();
    let split = Split {
        images: readable
            .iter()
            .flat_map(|pixels| pixels.iter().copied())
            .collect(),
        labels: vec![0; readable.len()],
    };
    let mut log_probs = if split.is_empty() {
        Vec::new()
    } else {
        model.log_probabilities(&split)?
    }
    .into_iter();
    Ok(images
        .iter()
        .zip(loaded)
        .map(|(image, pixels)| {
            pixels.map(|_| Prediction {
                image: image.clone(),
                top: top_classes(&log_probs.next().expect("one row per readable image"), 3),
            })
        })
        .collect())
}

/// The `k` most probable classes from log-probabilities.
pub fn top_classes(log_probs: &[f32], k: usize) -> Vec<ClassProbability> {
    let mut classes: Vec<ClassProbability> = log_probs
        .iter()
        .enumerate()
        .map(|(class, &lp)| ClassProbability {
            class: class as u8,
            probability: (lp as f64).exp(),
        })
        .collect();
    classes.sort_by(|a, b| b.probability.total_cmp(&a.probability));
    classes.truncate(k);
    classes
}

/// The widest and tallest image `predict` decodes: a digit needs far fewer
/// pixels, and 4096 x 4096 already takes 64 MiB as RGBA (a 22000-pixel-square
/// PNG would take gigabytes).
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// Reads an image file and returns 28x28 MNIST-style pixels (ink bright on 0).
pub fn load_as_mnist(path: &Path) -> Result<Vec<u8>> {
    let decoded = decode_bounded(path)?;
    let ink = ink_of(&decoded.to_rgba8());
    let blank = || AnalyzeError::BlankImage(path.to_path_buf());
    if !has_ink(&ink) {
        return Err(blank());
    }
    let side = MNIST_SIDE as u32;
    if ink.dimensions() == (side, side) {
        return Ok(ink.into_raw());
    }
    to_mnist_frame(&ink).ok_or_else(blank)
}

/// Decodes `path` once its header has shown it is at most [`MAX_IMAGE_SIDE`]
/// pixels each way.
fn decode_bounded(path: &Path) -> Result<image::DynamicImage> {
    let unreadable = |reason: String| AnalyzeError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let reader = || {
        image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| unreadable(e.to_string()))
    };
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|e| unreadable(e.to_string()))?;
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(unreadable(format!(
            "it is {width} x {height} pixels; predict reads images up to \
             {MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE} (scale it down first)"
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    let mut reader = reader()?;
    reader.limits(limits);
    reader.decode().map_err(|e| unreadable(e.to_string()))
}

/// Ink intensity per pixel (0 = paper), alpha composited over white and the
/// polarity taken from the border.
fn ink_of(rgba: &image::RgbaImage) -> GrayImage {
    let luminance = GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let lum = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
        let alpha = a as f32 / 255.0;
        Luma([(alpha * lum + (1.0 - alpha) * 255.0).round() as u8])
    });
    let (w, h) = luminance.dimensions();
    let border: Vec<u8> = luminance
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x == w - 1 || *y == h - 1)
        .map(|(_, _, p)| p.0[0])
        .collect();
    let border_mean = border.iter().map(|&v| v as f64).sum::<f64>() / border.len().max(1) as f64;
    if border_mean > 127.0 {
        let mut inverted = luminance;
        imageops::invert(&mut inverted);
        inverted
    } else {
        luminance
    }
}

/// Whether an image holds a stroke, at any size: pixels at least an eighth as
/// bright as full ink (32 of 255) over at least 0.2% of the image, and at
/// least 3. Paper texture and scanner noise stay below.
fn has_ink(ink: &GrayImage) -> bool {
    let strong = ink.pixels().filter(|p| p.0[0] >= 32).count();
    let area = (ink.width() as usize * ink.height() as usize).max(1);
    strong >= 3.max(area / 500)
}

/// Crops to the ink, fits it into a 20x20 box and centres its mass in 28x28;
/// `None` when there is no ink.
fn to_mnist_frame(ink: &GrayImage) -> Option<Vec<u8>> {
    let max = ink.pixels().map(|p| p.0[0]).max()?;
    // Faint noise and paper texture are not ink: count pixels above a quarter of the darkest.
    let threshold = (max / 4).max(1);
    if max < 32 {
        return None;
    }
    let inked = ink
        .enumerate_pixels()
        .filter(|(_, _, p)| p.0[0] >= threshold);
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, _) in inked {
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
    let crop = imageops::crop_imm(ink, x0, y0, w, h).to_image();
    let scale = DIGIT_BOX as f64 / w.max(h) as f64;
    let (sw, sh) = (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    );
    let digit = imageops::resize(&crop, sw, sh, imageops::FilterType::Triangle);
    let (cx, cy) = centre_of_mass(&digit);
    let side = MNIST_SIDE as i64;
    let offset = |centre: f64, extent: u32| {
        let wanted = (side as f64 / 2.0 - centre).round() as i64;
        wanted.clamp(0, side - extent as i64)
    };
    let (ox, oy) = (offset(cx, sw), offset(cy, sh));
    let mut frame = vec![0u8; MNIST_SIDE * MNIST_SIDE];
    for (x, y, p) in digit.enumerate_pixels() {
        let (fx, fy) = (ox + x as i64, oy + y as i64);
        frame[(fy * side + fx) as usize] = p.0[0];
    }
    Some(frame)
}

fn centre_of_mass(image: &GrayImage) -> (f64, f64) {
    let (mut total, mut sx, mut sy) = (0.0, 0.0, 0.0);
    for (x, y, p) in image.enumerate_pixels() {
        let v = p.0[0] as f64;
        total += v;
        sx += v * (x as f64 + 0.5);
        sy += v * (y as f64 + 0.5);
    }
    if total == 0.0 {
        (image.width() as f64 / 2.0, image.height() as f64 / 2.0)
    } else {
        (sx / total, sy / total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bar of ink: white on black, 28x28, as MNIST stores digits.
    fn bar() -> GrayImage {
        GrayImage::from_fn(28, 28, |x, y| {
            Luma([if (12..16).contains(&x) && (4..24).contains(&y) {
                255
            } else {
                0
            }])
        })
    }

    fn save(image: &image::DynamicImage, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        image.save(&path).unwrap();
        path
    }

    #[test]
    fn mnist_sized_images_pass_through_and_dark_on_light_is_inverted() {
        let dir = tempfile::tempdir().unwrap();
        let original = bar();
        let path = save(&original.clone().into(), dir.path(), "a.png");
        assert_eq!(load_as_mnist(&path).unwrap(), original.clone().into_raw());
        let mut paper = original.clone();
        imageops::invert(&mut paper);
        let rgb = image::DynamicImage::ImageLuma8(paper).to_rgb8();
        let path = save(&rgb.into(), dir.path(), "b.png");
        assert_eq!(load_as_mnist(&path).unwrap(), original.into_raw());
    }

    #[test]
    fn large_images_are_fitted_and_centred() {
        let dir = tempfile::tempdir().unwrap();
        // A dark bar drawn off-centre on a large white page.
        let page = GrayImage::from_fn(300, 200, |x, y| {
            Luma([if (30..50).contains(&x) && (20..120).contains(&y) {
                0
            } else {
                255
            }])
        });
        let path = save(&page.into(), dir.path(), "page.png");
        let frame = load_as_mnist(&path).unwrap();
        let frame = GrayImage::from_raw(28, 28, frame).unwrap();
        let rows: Vec<u32> = frame
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] > 128)
            .map(|(_, y, _)| y)
            .collect();
        let height = rows.iter().max().unwrap() - rows.iter().min().unwrap() + 1;
        assert!((19..=21).contains(&height), "digit height {height}");
        let (cx, cy) = centre_of_mass(&frame);
        assert!(
            (cx - 14.0).abs() < 1.0 && (cy - 14.0).abs() < 1.0,
            "{cx} {cy}"
        );
    }

    #[test]
    fn blank_and_unreadable_images_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blank = save(
            &GrayImage::from_pixel(40, 40, Luma([255])).into(),
            dir.path(),
            "blank.png",
        );
        let err = load_as_mnist(&blank).unwrap_err().to_string();
        assert!(err.contains("blank.png") && err.contains("blank"), "{err}");
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"not a png").unwrap();
        let err = load_as_mnist(&junk).unwrap_err().to_string();
        assert!(err.contains("junk.png"), "{err}");
    }

    #[test]
    fn top_classes_are_sorted_probabilities() {
        let mut row = [f32::ln(0.01); 10];
        row[7] = f32::ln(0.7);
        row[1] = f32::ln(0.2);
        let top = top_classes(&row, 3);
        assert_eq!(
            top.iter().map(|c| c.class).collect::<Vec<_>>(),
            vec![7, 1, 0]
        );
        assert!((top[0].probability - 0.7).abs() < 1e-6);
    }
}
