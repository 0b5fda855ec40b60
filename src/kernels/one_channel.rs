//! Convolution of one-channel images (LeNet5's first layer) straight from the
//! image, without im2col. There im2col copies each pixel once per tap (25
//! times) for a GEMM whose inner dimension is only 25, and the copying and the
//! GEMM's packing cost more than the multiply-adds. Here each output row is
//! held in vector registers while every tap adds its shifted input row, and the
//! weight gradient sums products of output-gradient rows and shifted input
//! rows, also in registers. AVX-512 only; [`ConvShape`] takes im2col elsewhere.

use super::conv::ConvShape;
use super::simd::{LANES, has_avx512};

/// Output rows up to this wide fit two 16-lane vectors.
const MAX_OUT_W: usize = 32;

/// Whether these kernels take convolutions of this shape on this CPU.
pub(super) fn applies(s: &ConvShape) -> bool {
    s.c_in == 1 && s.out_w() <= MAX_OUT_W && has_avx512()
}

/// `conv2d(image, w) + b` for one image into `out` (c_out planes), written whole.
pub(super) fn forward(s: &ConvShape, image: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(applies(s) && image.len() >= s.input_len() && out.len() >= s.output_len());
    assert!(w.len() >= s.c_out * s.taps() && b.len() >= s.c_out);
    // SAFETY: `applies` checked the CPU has AVX-512 and the shape's bounds; the
    // assertions above check every slice holds what the shape says.
    unsafe { avx512::forward(s, image, w, b, out) }
}

/// Per-lane partial sums of a weight gradient, `(c_out, taps, 16)`, to which
/// each image adds; [`WeightGradient::finish`] sums the lanes.
pub(super) struct WeightGradient {
    lanes: Vec<f32>,
}

impl WeightGradient {
    pub fn new(s: &ConvShape) -> WeightGradient {
        WeightGradient {
            lanes: vec![0.0; s.c_out * s.taps() * LANES],
        }
    }

    /// Adds one image's contribution, from the image and its output gradient.
    pub fn add(&mut self, s: &ConvShape, image: &[f32], grad_out: &[f32]) {
        assert!(applies(s) && image.len() >= s.input_len() && grad_out.len() >= s.output_len());
        assert!(self.lanes.len() == s.c_out * s.taps() * LANES);
        // SAFETY: as in `forward`.
        unsafe { avx512::add_weight_gradient(s, image, grad_out, &mut self.lanes) }
    }

    /// The gradient, `(c_out, taps)`.
    pub fn finish(self) -> Vec<f32> {
        self.lanes
            .chunks_exact(LANES)
            .map(|lanes| lanes.iter().sum())
            .collect()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::conv::ConvShape;
    use super::super::simd::{load_row, row_masks, store_row};
    use super::LANES;

    /// Safety: AVX-512 present; slices as [`super::forward`] checks.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward(s: &ConvShape, image: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
        // Six channels' rows (12 vectors) and two input vectors stay in registers.
        const GROUP: usize = 6;
        let mut first = 0;
        while first < s.c_out {
            let group = (s.c_out - first).min(GROUP);
            // SAFETY: passed on from the caller.
            unsafe {
                match group {
                    6 => forward_group::<6>(s, first, image, w, b, out),
                    5 => forward_group::<5>(s, first, image, w, b, out),
                    4 => forward_group::<4>(s, first, image, w, b, out),
                    3 => forward_group::<3>(s, first, image, w, b, out),
                    2 => forward_group::<2>(s, first, image, w, b, out),
                    _ => forward_group::<1>(s, first, image, w, b, out),
                }
            }
            first += group;
        }
    }

    /// Output channels `first..first + G`.
    #[target_feature(enable = "avx512f")]
    unsafe fn forward_group<const G: usize>(
        s: &ConvShape,
        first: usize,
        image: &[f32],
        w: &[f32],
        b: &[f32],
        out: &mut [f32],
    ) {
        let (out_h, out_w, taps) = (s.out_h(), s.out_w(), s.taps());
        let plane = out_h * out_w;
        let masks = row_masks(out_w);
        for y in 0..out_h {
            let mut acc = [[_mm512_setzero_ps(); 2]; G];
            for (g, acc) in acc.iter_mut().enumerate() {
                *acc = [_mm512_set1_ps(b[first + g]); 2];
            }
            for ky in 0..s.kh {
                for kx in 0..s.kw {
                    // SAFETY: row y + ky < height and kx + out_w <= width.
                    let v = unsafe { load_row(image.as_ptr().add((y + ky) * s.width + kx), masks) };
                    for (g, acc) in acc.iter_mut().enumerate() {
                        let weight = _mm512_set1_ps(w[(first + g) * taps + ky * s.kw + kx]);
                        acc[0] = _mm512_fmadd_ps(weight, v[0], acc[0]);
                        acc[1] = _mm512_fmadd_ps(weight, v[1], acc[1]);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                let row = out[(first + g) * plane + y * out_w..][..out_w].as_mut_ptr();
                // SAFETY: the masks write exactly the row's out_w values.
                unsafe { store_row(row, masks, *acc) };
            }
        }
    }

    /// Adds `grad_w[o, ky, kx] += sum over (y, x) of grad_out[o, y, x] *
    /// image[y + ky, x + kx]`, per lane of x, into `lanes` `(c_out, taps, 16)`.
    /// Safety: AVX-512 present; slices as [`super::WeightGradient::add`] checks.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn add_weight_gradient(
        s: &ConvShape,
        image: &[f32],
        grad_out: &[f32],
        lanes: &mut [f32],
    ) {
        // Two output channels at a time share each shifted input row they
        // read; per kernel row up to five taps, each with an accumulator per
        // half row (independent chains keep the FMA units busy): 20
        // accumulators, 4 gradient and 2 input vectors in registers.
        let mut first = 0;
        while first < s.c_out {
            let group = (s.c_out - first).min(2);
            for ky in 0..s.kh {
                for kx0 in (0..s.kw).step_by(TAPS_AT_ONCE) {
                    let rows = (first, ky, kx0);
                    // SAFETY: passed on from the caller.
                    unsafe {
                        match group {
                            2 => add_rows::<2>(s, rows, image, grad_out, lanes),
                            _ => add_rows::<1>(s, rows, image, grad_out, lanes),
                        }
                    }
                }
            }
            first += group;
        }
    }

    /// Taps of one kernel row handled together by [`add_rows`].
    const TAPS_AT_ONCE: usize = 5;

    /// Output channels `first..first + G`, kernel row `ky`, taps `kx0..` (at
    /// most [`TAPS_AT_ONCE`]) of [`add_weight_gradient`].
    #[target_feature(enable = "avx512f")]
    unsafe fn add_rows<const G: usize>(
        s: &ConvShape,
        (first, ky, kx0): (usize, usize, usize),
        image: &[f32],
        grad_out: &[f32],
        lanes: &mut [f32],
    ) {
        let (out_h, out_w, taps) = (s.out_h(), s.out_w(), s.taps());
        let plane = out_h * out_w;
        let masks = row_masks(out_w);
        let kxs = (s.kw - kx0).min(TAPS_AT_ONCE);
        let mut acc = [[[_mm512_setzero_ps(); 2]; G]; TAPS_AT_ONCE];
        for y in 0..out_h {
            let mut g = [[_mm512_setzero_ps(); 2]; G];
            for (i, g) in g.iter_mut().enumerate() {
                let at = (first + i) * plane + y * out_w;
                // SAFETY: row y of the channel's plane holds out_w values.
                *g = unsafe { load_row(grad_out[at..][..out_w].as_ptr(), masks) };
            }
            let row = image[(y + ky) * s.width + kx0..].as_ptr();
            for (kx, acc) in acc.iter_mut().enumerate().take(kxs) {
                // SAFETY: kx0 + kx + out_w <= width within row y + ky.
                let v = unsafe { load_row(row.add(kx), masks) };
                for (acc, g) in acc.iter_mut().zip(&g) {
                    acc[0] = _mm512_fmadd_ps(g[0], v[0], acc[0]);
                    acc[1] = _mm512_fmadd_ps(g[1], v[1], acc[1]);
                }
            }
        }
        for (kx, acc) in acc.iter().enumerate().take(kxs) {
            for (i, acc) in acc.iter().enumerate() {
                let at = ((first + i) * taps + ky * s.kw + kx0 + kx) * LANES;
                let sum = lanes[at..][..LANES].as_mut_ptr();
                // SAFETY: `lanes` holds (c_out, taps, 16) values.
                unsafe {
                    let both = _mm512_add_ps(acc[0], acc[1]);
                    _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), both));
                }
            }
        }
    }
}

/// Elsewhere these kernels never apply ([`applies`] is false).
#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    use super::super::conv::ConvShape;

    pub unsafe fn forward(_: &ConvShape, _: &[f32], _: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("one-channel kernels are x86-64 only")
    }

    pub unsafe fn add_weight_gradient(_: &ConvShape, _: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("one-channel kernels are x86-64 only")
    }
}
