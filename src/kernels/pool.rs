//! 2x2 max-pooling, stride 2, with a backward pass that routes each window's
//! gradient to its maximum (as PyTorch does).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_data;

/// 2x2 max-pooling with stride 2 over `(n, c, h, w)`, h and w even.
pub(super) struct MaxPool2x2;

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "mnist-lab-max-pool-2x2"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("max_pool2x2: height and width must be even, got {h}x{w}");
        }
        let x = f32_data(xs, xl, self.name())?;
        let (oh, ow) = (h / 2, w / 2);
        let mut out = vec![0f32; n * c * oh * ow];
        // Threads take whole images: per-plane tasks would be too small to pay off.
        out.par_chunks_mut(c * oh * ow)
            .zip(x.par_chunks(c * h * w))
            .for_each(|(out, image)| {
                for (out, plane) in out.chunks_mut(oh * ow).zip(image.chunks(h * w)) {
                    for oy in 0..oh {
                        let (top, bottom) =
                            (&plane[2 * oy * w..][..w], &plane[(2 * oy + 1) * w..][..w]);
                        for ox in 0..ow {
                            let a = top[2 * ox].max(top[2 * ox + 1]);
                            let b = bottom[2 * ox].max(bottom[2 * ox + 1]);
                            out[oy * ow + ox] = a.max(b);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let grad_out = grad_out.contiguous()?;
        Ok(Some(x.apply_op3_no_bwd(out, &grad_out, &MaxPool2x2Grad)?))
    }
}

/// Routes each window's gradient to the first position holding its maximum.
struct MaxPool2x2Grad;

impl CustomOp3 for MaxPool2x2Grad {
    fn name(&self) -> &'static str {
        "mnist-lab-max-pool-2x2-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        os: &CpuStorage,
        ol: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = xl.shape().dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        let x = f32_data(xs, xl, self.name())?;
        let out = f32_data(os, ol, self.name())?;
        let g = f32_data(gs, gl, self.name())?;
        let mut grad_x = vec![0f32; x.len()];
        let planes = grad_x
            .par_chunks_mut(c * h * w)
            .zip(x.par_chunks(c * h * w))
            .zip(out.par_chunks(c * oh * ow).zip(g.par_chunks(c * oh * ow)))
            .flat_map_iter(|((grad_image, image), (out, g))| {
                grad_image
                    .chunks_mut(h * w)
                    .zip(image.chunks(h * w))
                    .zip(out.chunks(oh * ow).zip(g.chunks(oh * ow)))
            });
        planes.for_each(|((grad_plane, plane), (out, g))| {
            for oy in 0..oh {
                for ox in 0..ow {
                    let max = out[oy * ow + ox];
                    let window = [
                        (2 * oy) * w + 2 * ox,
                        (2 * oy) * w + 2 * ox + 1,
                        (2 * oy + 1) * w + 2 * ox,
                        (2 * oy + 1) * w + 2 * ox + 1,
                    ];
                    let arg = window
                        .into_iter()
                        .find(|&i| plane[i] == max)
                        .unwrap_or(window[0]);
                    grad_plane[arg] = g[oy * ow + ox];
                }
            }
        });
        Ok((CpuStorage::F32(grad_x), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::max_pool2x2;
    use crate::kernels::testing::{max_diff, random};
    use candle_core::{Device, Var};

    #[test]
    fn max_pool_matches_candle_forward_and_routes_gradients_to_the_maxima() {
        let (n, c, h, w) = (3, 4, 10, 10);
        let x = Var::from_tensor(&random(&[n, c, h, w], 5)).unwrap();
        let ours = max_pool2x2(&x).unwrap();
        assert_eq!(max_diff(&ours, &x.max_pool2d(2).unwrap()), 0.0);
        // Candle's own max-pool backward scales by 1/4 (it averages the mask over the
        // window), so the expected gradient is built here: each output's weight lands
        // on its window's maximum, as in PyTorch.
        let weights = random(ours.dims(), 6);
        let grads = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ws: Vec<f32> = weights.flatten_all().unwrap().to_vec1().unwrap();
        let mut expected = vec![0f32; xs.len()];
        for plane in 0..n * c {
            for oy in 0..h / 2 {
                for ox in 0..w / 2 {
                    let window = [(0, 0), (0, 1), (1, 0), (1, 1)]
                        .map(|(dy, dx)| plane * h * w + (2 * oy + dy) * w + 2 * ox + dx);
                    let arg = window
                        .into_iter()
                        .max_by(|&a, &b| xs[a].total_cmp(&xs[b]))
                        .unwrap();
                    expected[arg] = ws[plane * (h / 2) * (w / 2) + oy * (w / 2) + ox];
                }
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn max_pool_fallback_matches_the_kernel() {
        // The path other devices take, run on the CPU by calling it directly.
        let x = Var::from_tensor(&random(&[2, 3, 6, 8], 9)).unwrap();
        let (n, c, h, w) = x.dims4().unwrap();
        let fallback = x
            .reshape((n, c, h / 2, 2, w / 2, 2))
            .unwrap()
            .max(5)
            .unwrap()
            .max(3)
            .unwrap();
        let ours = max_pool2x2(&x).unwrap();
        assert_eq!(max_diff(&ours, &fallback), 0.0);
        let weights = random(ours.dims(), 10);
        let a = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let b = (&fallback * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(max_diff(a.get(&x).unwrap(), b.get(&x).unwrap()), 0.0);
    }

    #[test]
    fn max_pool_sends_a_tied_window_gradient_once() {
        let x = Var::from_tensor(
            &Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let grads = max_pool2x2(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![1.0, 0.0, 0.0, 0.0]);
    }
}
