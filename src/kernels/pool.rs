//! One row of 2x2 max-pooling windows over normalised values: the largest of
//! each window's four `v * scale + shift` and which of the four it was (0..4,
//! row-major; the first, on ties, as a scan with `>` finds it). The windows'
//! values sit at alternate positions of two rows, which keeps the compiler from
//! vectorising the plain loop; with AVX-512, rows up to 32 values wide are
//! split into even and odd positions by two permutes and a whole row of
//! windows is decided at once, with the same arithmetic and the same answers.
//! The backward goes the other way: each window's gradient is placed at its
//! winner and both rows are written whole, so they need no zero-fill first.

/// Pools the row pair (`top`, `bottom`, each `2 * out.len()` values) into
/// `out` and `winners`.
pub(super) fn pool_row_pair(
    (top, bottom): (&[f32], &[f32]),
    (scale, shift): (f32, f32),
    out: &mut [f32],
    winners: &mut [u8],
) {
    let ow = out.len();
    assert!(top.len() == 2 * ow && bottom.len() == 2 * ow && winners.len() == ow);
    #[cfg(target_arch = "x86_64")]
    if 2 * ow <= avx512::MAX_WIDTH && super::simd::has_avx512() {
        // SAFETY: AVX-512 is present and the lengths were checked above.
        unsafe { avx512::pool_row_pair((top, bottom), (scale, shift), out, winners) };
        return;
    }
    scalar((top, bottom), (scale, shift), out, winners);
}

/// The backward of [`pool_row_pair`] through tanh: each window's winner gets
/// `g * (1 - a^2)` (`a` the pooled output, its tanh), the other three zero;
/// `top` and `bottom` (`2 * g.len()` values each) are written whole.
pub(super) fn unpool_row_pair(
    (g, a, winners): (&[f32], &[f32], &[u8]),
    top: &mut [f32],
    bottom: &mut [f32],
) {
    let ow = g.len();
    assert!(a.len() == ow && winners.len() == ow);
    assert!(top.len() == 2 * ow && bottom.len() == 2 * ow);
    #[cfg(target_arch = "x86_64")]
    if 2 * ow <= avx512::MAX_WIDTH && super::simd::has_avx512() {
        // SAFETY: AVX-512 is present and the lengths were checked above.
        unsafe { avx512::unpool_row_pair((g, a, winners), top, bottom) };
        return;
    }
    top.fill(0.0);
    bottom.fill(0.0);
    for (ox, ((&g, &a), &k)) in g.iter().zip(a).zip(winners).enumerate() {
        let row = if k < 2 { &mut *top } else { &mut *bottom };
        row[2 * ox + usize::from(k % 2)] = g * (1.0 - a * a);
    }
}

fn scalar(
    (top, bottom): (&[f32], &[f32]),
    (scale, shift): (f32, f32),
    out: &mut [f32],
    winners: &mut [u8],
) {
    let y = |v: f32| v * scale + shift;
    for (ox, (out, winner)) in out.iter_mut().zip(winners.iter_mut()).enumerate() {
        let (t0, t1) = (y(top[2 * ox]), y(top[2 * ox + 1]));
        let (b0, b1) = (y(bottom[2 * ox]), y(bottom[2 * ox + 1]));
        // Selects rather than branches, which random data mispredicts.
        let (upper, k_upper) = if t1 > t0 { (t1, 1) } else { (t0, 0) };
        let (lower, k_lower) = if b1 > b0 { (b1, 3) } else { (b0, 2) };
        (*out, *winner) = if lower > upper {
            (lower, k_lower)
        } else {
            (upper, k_upper)
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::simd::{lanes, load_row, row_masks, store_row};

    /// Widest input row: two 16-lane vectors.
    pub const MAX_WIDTH: usize = 32;

    /// The row's values at even and at odd positions, normalised, as vectors
    /// of `out.len()` lanes.
    #[target_feature(enable = "avx512f")]
    unsafe fn even_and_odd(row: &[f32], scale: __m512, shift: __m512) -> (__m512, __m512) {
        // SAFETY: the masks read only row[..row.len()].
        let [lo, hi] = unsafe { load_row(row.as_ptr(), row_masks(row.len())) };
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // Multiply, then add, as the scalar path rounds.
        let normalise = |v| _mm512_add_ps(_mm512_mul_ps(v, scale), shift);
        (
            normalise(_mm512_permutex2var_ps(lo, even, hi)),
            normalise(_mm512_permutex2var_ps(lo, odd, hi)),
        )
    }

    /// Safety: AVX-512 present; `top` and `bottom` hold `2 * out.len() <=
    /// MAX_WIDTH` values and `winners` `out.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pool_row_pair(
        (top, bottom): (&[f32], &[f32]),
        (scale, shift): (f32, f32),
        out: &mut [f32],
        winners: &mut [u8],
    ) {
        let (scale, shift) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        // SAFETY: the caller's lengths.
        let ((t0, t1), (b0, b1)) = unsafe {
            (
                even_and_odd(top, scale, shift),
                even_and_odd(bottom, scale, shift),
            )
        };
        let k = |i: i32| _mm512_set1_epi32(i);
        let upper_odd = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t1, t0);
        let (upper, k_upper) = (
            _mm512_mask_blend_ps(upper_odd, t0, t1),
            _mm512_mask_blend_epi32(upper_odd, k(0), k(1)),
        );
        let lower_odd = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b1, b0);
        let (lower, k_lower) = (
            _mm512_mask_blend_ps(lower_odd, b0, b1),
            _mm512_mask_blend_epi32(lower_odd, k(2), k(3)),
        );
        let lower_wins = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(lower, upper);
        let best = _mm512_mask_blend_ps(lower_wins, upper, lower);
        let winner = _mm512_mask_blend_epi32(lower_wins, k_upper, k_lower);
        let outputs = lanes(out.len());
        // SAFETY: the mask writes exactly out.len() values to each.
        unsafe {
            _mm512_mask_storeu_ps(out.as_mut_ptr(), outputs, best);
            _mm512_mask_cvtepi32_storeu_epi8(winners.as_mut_ptr().cast(), outputs, winner);
        }
    }

    /// Safety: AVX-512 present; `g`, `a`, `winners` hold `ow` values and
    /// `top`, `bottom` `2 * ow <= MAX_WIDTH`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn unpool_row_pair(
        (g, a, winners): (&[f32], &[f32], &[u8]),
        top: &mut [f32],
        bottom: &mut [f32],
    ) {
        let ow = g.len();
        let outputs = lanes(ow);
        let mut bytes = [0u8; 16];
        bytes[..ow].copy_from_slice(winners);
        // SAFETY: the masks read exactly ow values of each; `bytes` holds 16.
        let (g, a, k) = unsafe {
            (
                _mm512_maskz_loadu_ps(outputs, g.as_ptr()),
                _mm512_maskz_loadu_ps(outputs, a.as_ptr()),
                _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr().cast())),
            )
        };
        // Multiply, subtract, multiply, as the scalar path rounds.
        let d = _mm512_mul_ps(g, _mm512_sub_ps(_mm512_set1_ps(1.0), _mm512_mul_ps(a, a)));
        let at = |position: i32| {
            _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(position)), d)
        };
        // Even and odd positions interleaved back into the row's two vectors.
        let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let masks = row_masks(2 * ow);
        for (row, (even, odd)) in [(top, (at(0), at(1))), (bottom, (at(2), at(3)))] {
            let values = [
                _mm512_permutex2var_ps(even, low, odd),
                _mm512_permutex2var_ps(even, high, odd),
            ];
            // SAFETY: the masks write exactly the row's 2 * ow values.
            unsafe { store_row(row.as_mut_ptr(), masks, values) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised rows give exactly what the scalar loop gives, ties and
    /// NaN included, at every width up to the widest.
    #[test]
    fn vector_rows_equal_the_scalar_loop() {
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            // Few distinct values, so ties are common.
            match state >> 28 {
                0 => f32::NAN,
                v => (v % 5) as f32 - 2.0,
            }
        };
        for ow in 1..=16 {
            for _ in 0..50 {
                let top: Vec<f32> = (0..2 * ow).map(|_| next()).collect();
                let bottom: Vec<f32> = (0..2 * ow).map(|_| next()).collect();
                let (mut out, mut winners) = (vec![0.0; ow], vec![9u8; ow]);
                pool_row_pair((&top, &bottom), (0.5, 0.25), &mut out, &mut winners);
                let (mut expected, mut expected_winners) = (vec![0.0; ow], vec![9u8; ow]);
                scalar(
                    (&top, &bottom),
                    (0.5, 0.25),
                    &mut expected,
                    &mut expected_winners,
                );
                assert_eq!(winners, expected_winners, "width {}", 2 * ow);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&expected), "width {}", 2 * ow);
            }
        }
    }

    /// The backward writes each window's gradient at its winner and zero
    /// elsewhere, vectorised or not, with the same bits.
    #[test]
    fn unpooling_puts_the_gradient_at_the_winner() {
        for ow in 1..=16 {
            let g: Vec<f32> = (0..ow).map(|i| i as f32 * 0.37 - 1.0).collect();
            let a: Vec<f32> = (0..ow).map(|i| (i as f32 * 0.21).sin()).collect();
            let winners: Vec<u8> = (0..ow).map(|i| (i * 7 % 4) as u8).collect();
            let (mut top, mut bottom) = (vec![f32::NAN; 2 * ow], vec![f32::NAN; 2 * ow]);
            unpool_row_pair((&g, &a, &winners), &mut top, &mut bottom);
            for ox in 0..ow {
                let window = [
                    top[2 * ox],
                    top[2 * ox + 1],
                    bottom[2 * ox],
                    bottom[2 * ox + 1],
                ];
                for (k, v) in window.into_iter().enumerate() {
                    let expected = if k == winners[ox] as usize {
                        g[ox] * (1.0 - a[ox] * a[ox])
                    } else {
                        0.0
                    };
                    assert_eq!(
                        v.to_bits(),
                        expected.to_bits(),
                        "width {} window {ox} position {k}",
                        2 * ow
                    );
                }
            }
        }
    }
}
