//! BatchNorm in training mode: batch statistics computed once, in vectorised
//! passes, and reused by the backward pass.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_data;

/// `(n, c, rest...)` as (n, c, positions per channel per image).
fn channel_dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("batch-norm: expected at least 2 dimensions, got {dims:?}");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// Sum of `f(a[i], b[i])` in eight independent lanes, so the compiler vectorises it.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for lane in 0..8 {
            lanes[lane] += f(ca[lane], cb[lane]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Per-channel sums over the batch of `f(plane of a, plane of b, channel)`, each
/// plane's sum in f32 and the running totals in f64; threads take whole images.
fn channel_sums(
    a: &[f32],
    b: &[f32],
    (_, c, s): (usize, usize, usize),
    f: impl Fn(&[f32], &[f32], usize) -> f32 + Sync,
) -> Vec<f64> {
    a.par_chunks(c * s)
        .zip(b.par_chunks(c * s))
        .fold(
            || vec![0f64; c],
            |mut totals, (image_a, image_b)| {
                for (ch, (pa, pb)) in image_a.chunks(s).zip(image_b.chunks(s)).enumerate() {
                    totals[ch] += f(pa, pb, ch) as f64;
                }
                totals
            },
        )
        .reduce(
            || vec![0f64; c],
            |mut x, y| {
                x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
                x
            },
        )
}

/// Per-channel mean and biased variance (two passes, for accuracy).
fn channel_moments(x: &[f32], dims: (usize, usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let count = (dims.0 * dims.2) as f64;
    let means: Vec<f32> = channel_sums(x, x, dims, |p, _, _| lane_sum(p, p, |v, _| v))
        .into_iter()
        .map(|sum| (sum / count) as f32)
        .collect();
    let vars = channel_sums(x, x, dims, |p, _, ch| {
        let mean = means[ch];
        lane_sum(p, p, |v, _| (v - mean) * (v - mean))
    })
    .into_iter()
    .map(|sum| (sum / count) as f32)
    .collect();
    (means, vars)
}

/// BatchNorm in training mode: normalises each channel with the batch's own mean
/// and variance, then applies (weight, bias). Its output packs
/// `[y..., batch means..., batch variances...]` so neither the running statistics
/// nor the backward pass compute the moments again.
struct BatchNormTrain {
    eps: f32,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "mnist-lab-batch-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(xl.shape())?;
        let (_, c, s) = dims;
        let x = f32_data(xs, xl, self.name())?;
        let (w, b) = (
            f32_data(ws, wl, self.name())?,
            f32_data(bs, bl, self.name())?,
        );
        let (means, vars) = channel_moments(x, dims);
        let affine: Vec<(f32, f32)> = (0..c)
            .map(|ch| {
                let scale = w[ch] / (vars[ch] + self.eps).sqrt();
                (scale, b[ch] - means[ch] * scale)
            })
            .collect();
        let mut packed = vec![0f32; x.len() + 2 * c];
        let (y, stats) = packed.split_at_mut(x.len());
        y.par_chunks_mut(c * s)
            .zip(x.par_chunks(c * s))
            .for_each(|(y, x)| {
                for ((y, x), &(scale, shift)) in y.chunks_mut(s).zip(x.chunks(s)).zip(&affine) {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = x * scale + shift;
                    }
                }
            });
        stats[..c].copy_from_slice(&means);
        stats[c..].copy_from_slice(&vars);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        packed: &Tensor,
        grad_packed: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = BatchNormGrad {
            eps: self.eps,
            weight: w.to_vec1::<f32>()?,
        };
        let grads = x.apply_op3_no_bwd(packed, &grad_packed.contiguous()?, &grad)?;
        let (len, c) = (x.elem_count(), w.elem_count());
        let grad_x = grads.narrow(0, 0, len)?.reshape(x.shape())?;
        let grad_w = grads.narrow(0, len, c)?;
        let grad_b = grads.narrow(0, len + c, c)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// Gradients of [`BatchNormTrain`] from (x, its packed output, the packed output's
/// gradient), packed as `[grad_x..., grad_weight..., grad_bias...]`.
struct BatchNormGrad {
    eps: f32,
    weight: Vec<f32>,
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "mnist-lab-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = channel_dims(xl.shape())?;
        let (n, c, s) = dims;
        let x = f32_data(xs, xl, self.name())?;
        let stats = &f32_data(ps, pl, self.name())?[x.len()..];
        // Only the y part of the packed output carries gradient.
        let g = &f32_data(gs, gl, self.name())?[..x.len()];
        let (means, vars) = stats.split_at(c);
        let inv_std: Vec<f32> = vars.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let sum_g = channel_sums(g, g, dims, |p, _, _| lane_sum(p, p, |v, _| v));
        let sum_g_xhat = channel_sums(g, x, dims, |pg, px, ch| {
            let (mean, inv) = (means[ch], inv_std[ch]);
            lane_sum(pg, px, |g, x| g * (x - mean) * inv)
        });
        let count = (n * s) as f32;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (grad_x, grad_affine) = out.split_at_mut(x.len());
        grad_x
            .par_chunks_mut(c * s)
            .zip(x.par_chunks(c * s).zip(g.par_chunks(c * s)))
            .for_each(|(dx, (x, g))| {
                for (ch, (dx, (x, g))) in dx
                    .chunks_mut(s)
                    .zip(x.chunks(s).zip(g.chunks(s)))
                    .enumerate()
                {
                    let (mean, inv) = (means[ch], inv_std[ch]);
                    let (sg, sgx) = (sum_g[ch] as f32, sum_g_xhat[ch] as f32);
                    let k = self.weight[ch] * inv / count;
                    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                        *dx = k * (count * g - sg - (x - mean) * inv * sgx);
                    }
                }
            });
        for ch in 0..c {
            grad_affine[ch] = sum_g_xhat[ch] as f32;
            grad_affine[c + ch] = sum_g[ch] as f32;
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Training-mode batch normalisation of `x` `(n, c, ...)` over all but dimension 1,
/// on the CPU; also returns the batch's per-channel mean and biased variance.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let (len, c) = (x.elem_count(), weight.elem_count());
    let packed = x.apply_op3(weight, bias, BatchNormTrain { eps: eps as f32 })?;
    let y = packed.narrow(0, 0, len)?.reshape(x.shape())?;
    let stats = packed.narrow(0, len, 2 * c)?.detach();
    Ok((y, stats.narrow(0, 0, c)?, stats.narrow(0, c, c)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, random};
    use candle_core::{Device, Var};

    #[test]
    fn batch_norm_matches_candle_forward_and_backward() {
        for shape in [&[8, 6, 7, 7][..], &[16, 84]] {
            let c = shape[1];
            let x = Var::from_tensor(&random(shape, 11).affine(3.0, 0.5).unwrap()).unwrap();
            let w = Var::from_tensor(&(random(&[c], 12) + 1.5).unwrap()).unwrap();
            let b = Var::from_tensor(&random(&[c], 13)).unwrap();
            let (ours, mean, var) = batch_norm_train(&x, &w, &b, 1e-5).unwrap();
            let reference_bn = candle_nn::BatchNorm::new(
                c,
                Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
                Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).unwrap(),
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                1e-5,
            )
            .unwrap();
            let reference = candle_core::ModuleT::forward_t(&reference_bn, &x, true).unwrap();
            assert!(max_diff(&ours, &reference) < 1e-4, "forward {shape:?}");
            // The running mean moved 0.1 of the way to the batch mean.
            assert!(max_diff(&(mean * 0.1).unwrap(), reference_bn.running_mean()) < 1e-5);
            assert_eq!(var.dims(), &[c]);
            let weights = random(ours.dims(), 14);
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
            for (name, var) in [("x", &x), ("w", &w), ("b", &b)] {
                let d = max_diff(a.get(var).unwrap(), r.get(var).unwrap());
                assert!(d < 1e-3, "grad {name} {shape:?}: {d}");
            }
        }
    }
}
