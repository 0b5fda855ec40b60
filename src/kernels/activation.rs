//! tanh with a vectorisable rational approximation, and its gradient from the output.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_data;

/// Elementwise work below this many values stays on one thread.
const PARALLEL_MIN: usize = 1 << 15;

/// Applies `f` to pairs of `a` and `b` into a new vector, threaded when large.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let chunk = PARALLEL_MIN.max(a.len().div_ceil(rayon::current_num_threads()));
    out.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
        .for_each(|(out, (a, b))| {
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = f(x, y);
            }
        });
    out
}

/// tanh as a rational function (Eigen's coefficients), accurate to a few ulp in
/// f32 and, unlike libm's `tanhf`, vectorised by the compiler.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    // Plain multiply-adds: `mul_add` would call libm's fmaf on CPUs built without FMA.
    let p = x2 * -2.760_768_5e-16 + 2.000_188e-13;
    let p = p * x2 - 8.604_672e-11;
    let p = p * x2 + 5.122_297e-8;
    let p = p * x2 + 1.485_722_4e-5;
    let p = p * x2 + 6.372_619_3e-4;
    let p = p * x2 + 4.893_524_6e-3;
    let q = x2 * 1.198_258_4e-6 + 1.185_347_1e-4;
    let q = q * x2 + 2.268_434_6e-3;
    let q = q * x2 + 4.893_525e-3;
    x * p / q
}

/// Elementwise tanh whose backward pass reuses the output: `(1 - y^2) * grad`.
pub(super) struct Tanh;

impl CustomOp1 for Tanh {
    fn name(&self) -> &'static str {
        "mnist-lab-tanh"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(xs, xl, self.name())?;
        Ok((
            CpuStorage::F32(zip_map(x, x, |v, _| fast_tanh(v))),
            xl.shape().clone(),
        ))
    }

    fn bwd(&self, _x: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let grad_out = grad_out.contiguous()?;
        Ok(Some(out.apply_op2_no_bwd(&grad_out, &TanhGrad)?))
    }
}

struct TanhGrad;

impl CustomOp2 for TanhGrad {
    fn name(&self) -> &'static str {
        "mnist-lab-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_data(ys, yl, self.name())?;
        let g = f32_data(gs, gl, self.name())?;
        Ok((
            CpuStorage::F32(zip_map(y, g, |y, g| (1.0 - y * y) * g)),
            yl.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tanh;
    use crate::kernels::testing::{max_diff, random};
    use candle_core::Var;

    #[test]
    fn fast_tanh_is_accurate() {
        let worst = (-200_000..=200_000)
            .map(|i| i as f32 * 1e-4)
            .chain([-100.0, 100.0, f32::MAX, f32::MIN])
            .map(|x| (fast_tanh(x) - x.tanh()).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "max error {worst}");
    }

    #[test]
    fn tanh_matches_candle_forward_and_backward() {
        let x = Var::from_tensor(&(random(&[4, 50_000], 7) * 4.0).unwrap()).unwrap();
        let ours = tanh(&x).unwrap();
        let reference = x.tanh().unwrap();
        assert!(max_diff(&ours, &reference) < 1e-6);
        let weights = random(ours.dims(), 8);
        let a = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let r = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(a.get(&x).unwrap(), r.get(&x).unwrap()) < 1e-5);
    }
}
