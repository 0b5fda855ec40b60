//! Geometric augmentation: each training image translated by a random
//! whole-pixel offset, and optionally rotated and scaled about its centre, as
//! one gather of pixel indices (nearest neighbour).

use candle_core::{DType, Device, Tensor};

use crate::data::prepare::Tensors;

/// The random geometry applied to each training image, drawn anew per epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Augment {
    /// Up to this many pixels along each axis.
    pub shift: usize,
    /// Up to this many degrees either way.
    pub rotate_degrees: f64,
    /// A factor within `1 ± scale`.
    pub scale: f64,
}

impl Augment {
    pub fn is_off(&self) -> bool {
        self.shift == 0 && !self.warps()
    }

    fn warps(&self) -> bool {
        self.rotate_degrees > 0.0 || self.scale > 0.0
    }
}

impl Tensors {
    /// The examples at `indices`, each moved by its own draw of `augment`. Shifts
    /// alone take [`Tensors::gather_shifted`] (the same draws as before rotation
    /// and scaling existed); with those, the indices are built on the host.
    pub fn gather_augmented(
        &self,
        indices: &Tensor,
        host_indices: &[u32],
        augment: Augment,
        rng: &mut impl rand::Rng,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if !augment.warps() {
            return self.gather_shifted(indices, host_indices, augment.shift, rng);
        }
        let max = augment.shift as i64;
        let draws: Vec<Warp> = host_indices
            .iter()
            .map(|_| Warp {
                dy: rng.random_range(-max..=max) as f64,
                dx: rng.random_range(-max..=max) as f64,
                angle: rng.random_range(-1.0..=1.0) * augment.rotate_degrees.to_radians(),
                scale: 1.0 + rng.random_range(-1.0..=1.0) * augment.scale,
            })
            .collect();
        let (_, _, height, width) = self.images.dims4()?;
        let pixels = warped_pixels(host_indices, &draws, height, width, self.images.device())?;
        self.gather_pixels(&pixels, indices, host_indices.len())
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
        self.gather_pixels(&pixels, indices, host_indices.len())
    }
}

impl Tensors {
    /// The `n` images whose flat pixel indices are `pixels`, as model inputs,
    /// with the labels at `indices`.
    fn gather_pixels(
        &self,
        pixels: &Tensor,
        indices: &Tensor,
        n: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (_, _, height, width) = self.images.dims4()?;
        let images = self
            .images
            .flatten_all()?
            .index_select(pixels, 0)?
            .reshape((n, 1, height, width))?;
        Ok((
            self.inputs_of(&images)?,
            self.labels.index_select(indices, 0)?,
        ))
    }
}

/// One image's draw: a shift, then a rotation and a scaling about the centre.
struct Warp {
    dy: f64,
    dx: f64,
    angle: f64,
    scale: f64,
}

/// Flat pixel indices of images `indices`, each output pixel taking the nearest
/// source pixel under the inverse of its image's warp, edges clamped.
fn warped_pixels(
    indices: &[u32],
    warps: &[Warp],
    height: usize,
    width: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let plane = height * width;
    let (cy, cx) = ((height as f64 - 1.0) / 2.0, (width as f64 - 1.0) / 2.0);
    let mut pixels = Vec::with_capacity(indices.len() * plane);
    for (&image, warp) in indices.iter().zip(warps) {
        let base = image as usize * plane;
        let (sin, cos) = warp.angle.sin_cos();
        for y in 0..height {
            for x in 0..width {
                // Undo the shift, then the rotation and the scaling about the centre.
                let (u, v) = (x as f64 - warp.dx - cx, y as f64 - warp.dy - cy);
                let sx = (cos * u + sin * v) / warp.scale + cx;
                let sy = (-sin * u + cos * v) / warp.scale + cy;
                let sx = (sx.round() as i64).clamp(0, width as i64 - 1) as usize;
                let sy = (sy.round() as i64).clamp(0, height as i64 - 1) as usize;
                pixels.push((base + sy * width + sx) as u32);
            }
        }
    }
    Tensor::from_vec(pixels, indices.len() * plane, device)
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
    // A shift is a warp that neither turns nor scales.
    let warps: Vec<Warp> = (shifts.iter())
        .map(|&(dy, dx)| Warp {
            dy: dy as f64,
            dx: dx as f64,
            angle: 0.0,
            scale: 1.0,
        })
        .collect();
    warped_pixels(indices, &warps, height, width, device)
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_quarter_turn_about_the_centre_moves_a_corner_to_the_next() {
        // 90 degrees (beyond the config's limit, but exact): the output's top-right
        // pixel comes from the input's top-left one, the centre stays.
        let warp = Warp {
            dy: 0.0,
            dx: 0.0,
            angle: std::f64::consts::FRAC_PI_2,
            scale: 1.0,
        };
        let map = warped_pixels(&[0], &[warp], 5, 5, &Device::Cpu)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(map[12], 12, "the centre");
        assert_eq!(map[4], 0, "top-right from top-left");
        // Scaling by 2 draws the output's corner from halfway to the centre.
        let zoom = Warp {
            dy: 0.0,
            dx: 0.0,
            angle: 0.0,
            scale: 2.0,
        };
        let map = warped_pixels(&[0], &[zoom], 5, 5, &Device::Cpu)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(map[0], 6, "(0, 0) from (1, 1)");
    }

    #[test]
    fn shifted_gather_translates_with_repeated_edges() {
        // One 4x4 image whose pixel values are their own indices.
        let images = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let labels = Tensor::new(&[7u32], &Device::Cpu).unwrap();
        let set = Tensors::from_inputs(images, labels);
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
}
