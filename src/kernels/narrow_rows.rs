//! im2col and its adjoint for images at most 16 pixels wide (LeNet5's second
//! layer: 14x14 inputs, 10x10 outputs), with AVX-512. The plain loops copy
//! 10-value rows one by one, and their index arithmetic costs more than the
//! copying; here an input row is one vector, loaded once, and each tap's row is
//! a permute of it written with a mask. Same values, same order of additions.

use super::conv::ConvShape;
use super::simd::has_avx512;

/// Widest input row: one 16-lane vector.
const MAX_WIDTH: usize = 16;

/// Whether these kernels take convolutions of this shape on this CPU.
pub(super) fn applies(s: &ConvShape) -> bool {
    s.width <= MAX_WIDTH && has_avx512()
}

/// [`ConvShape::im2col`] for one image.
pub(super) fn im2col(s: &ConvShape, image: &[f32], cols: &mut [f32]) {
    assert!(applies(s) && image.len() >= s.input_len());
    assert!(cols.len() >= s.taps() * s.out_h() * s.out_w());
    // SAFETY: `applies` checked the CPU and the width; the lengths above.
    unsafe { avx512::im2col(s, image, cols) }
}

/// [`ConvShape::col2im`] for one image: `image` is written whole.
pub(super) fn col2im(s: &ConvShape, cols: &[f32], image: &mut [f32]) {
    assert!(applies(s) && image.len() >= s.input_len());
    assert!(cols.len() >= s.taps() * s.out_h() * s.out_w());
    // SAFETY: as in `im2col`.
    unsafe { avx512::col2im(s, cols, image) }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::conv::ConvShape;
    use super::super::simd::lanes;

    /// Permute indices: lane j takes lane `j + shift` (`shift` < 0: `j - |shift|`).
    /// A permute reads only an index's low 4 bits, so lanes whose source falls
    /// outside the vector read some other lane; callers mask those off.
    #[target_feature(enable = "avx512f")]
    fn shifted_indices(shift: i32) -> __m512i {
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        _mm512_add_epi32(lane, _mm512_set1_epi32(shift))
    }

    /// Safety: AVX-512 present; slices as [`super::im2col`] checks.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn im2col(s: &ConvShape, image: &[f32], cols: &mut [f32]) {
        let (out_h, out_w) = (s.out_h(), s.out_w());
        let positions = out_h * out_w;
        let (row_mask, out_mask) = (lanes(s.width), lanes(out_w));
        for c in 0..s.c_in {
            for ky in 0..s.kh {
                for y in 0..out_h {
                    let at = (c * s.height + y + ky) * s.width;
                    // SAFETY: the mask reads the row's `width` values.
                    let row =
                        unsafe { _mm512_maskz_loadu_ps(row_mask, image[at..][..s.width].as_ptr()) };
                    for kx in 0..s.kw {
                        let tap = (c * s.kh + ky) * s.kw + kx;
                        let shifted = _mm512_permutexvar_ps(shifted_indices(kx as i32), row);
                        let dst = cols[tap * positions + y * out_w..][..out_w].as_mut_ptr();
                        // SAFETY: the mask writes the row's `out_w` values.
                        unsafe { _mm512_mask_storeu_ps(dst, out_mask, shifted) };
                    }
                }
            }
        }
    }

    /// Safety: AVX-512 present; slices as [`super::col2im`] checks.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn col2im(s: &ConvShape, cols: &[f32], image: &mut [f32]) {
        let (out_h, out_w) = (s.out_h(), s.out_w());
        let positions = out_h * out_w;
        let (row_mask, out_mask) = (lanes(s.width), lanes(out_w));
        for c in 0..s.c_in {
            for y_in in 0..s.height {
                // Each input row gathers all its taps' values in a register and
                // is written once, whole: no zero-fill, no row read back. Taps
                // in the order the plain loop adds them: ky, then kx.
                let mut row = _mm512_setzero_ps();
                for ky in y_in.saturating_sub(out_h - 1)..=y_in.min(s.kh - 1) {
                    let y = y_in - ky;
                    for kx in 0..s.kw {
                        let tap = (c * s.kh + ky) * s.kw + kx;
                        let src = cols[tap * positions + y * out_w..][..out_w].as_ptr();
                        // SAFETY: the mask reads the row's `out_w` values.
                        let values = unsafe { _mm512_maskz_loadu_ps(out_mask, src) };
                        let shifted = _mm512_permutexvar_ps(shifted_indices(-(kx as i32)), values);
                        // Only the pixels this tap reaches: kx..kx + out_w.
                        row = _mm512_mask_add_ps(row, out_mask << kx, row, shifted);
                    }
                }
                let at = (c * s.height + y_in) * s.width;
                // SAFETY: the mask writes the row's `width` values.
                unsafe {
                    _mm512_mask_storeu_ps(image[at..][..s.width].as_mut_ptr(), row_mask, row)
                };
            }
        }
    }
}

/// Elsewhere these kernels never apply ([`applies`] is false).
#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    use super::super::conv::ConvShape;

    pub unsafe fn im2col(_: &ConvShape, _: &[f32], _: &mut [f32]) {
        unreachable!("narrow-row kernels are x86-64 only")
    }

    pub unsafe fn col2im(_: &ConvShape, _: &[f32], _: &mut [f32]) {
        unreachable!("narrow-row kernels are x86-64 only")
    }
}
