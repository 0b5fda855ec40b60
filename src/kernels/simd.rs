//! What the AVX-512 kernels (`one_channel`, `narrow_rows`, `pool`) share:
//! whether the CPU has AVX-512, lane masks, and a row of up to 32 values held
//! as two 16-lane vectors.

/// Whether this CPU runs the AVX-512 kernels (always false off x86-64).
pub(super) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// f32 lanes of an AVX-512 vector.
pub(super) const LANES: usize = 16;

#[cfg(target_arch = "x86_64")]
pub(super) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// The mask of a vector's first `n` lanes (all 16 from `n = 16` on).
    pub fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(LANES)) - 1) as __mmask16
    }

    /// The masks of a row of `n <= 32` values held as two vectors.
    pub fn row_masks(n: usize) -> (__mmask16, __mmask16) {
        (lanes(n), lanes(n.saturating_sub(LANES)))
    }

    /// A row's values as two vectors, lanes outside `masks` zero and not read.
    ///
    /// Safety: AVX-512 present; the masked lanes from `row` are readable.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn load_row(row: *const f32, (m0, m1): (__mmask16, __mmask16)) -> [__m512; 2] {
        // SAFETY: masked-off lanes are not read; the caller vouches for the rest.
        unsafe {
            [
                _mm512_maskz_loadu_ps(m0, row),
                _mm512_maskz_loadu_ps(m1, row.wrapping_add(LANES)),
            ]
        }
    }

    /// Writes the lanes of `values` inside `masks` to a row.
    ///
    /// Safety: AVX-512 present; the masked lanes of `row` are writable.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store_row(row: *mut f32, (m0, m1): (__mmask16, __mmask16), values: [__m512; 2]) {
        // SAFETY: masked-off lanes are not written; the caller vouches for the rest.
        unsafe {
            _mm512_mask_storeu_ps(row, m0, values[0]);
            _mm512_mask_storeu_ps(row.wrapping_add(LANES), m1, values[1]);
        }
    }
}
