//! A convolution and the tail of its layer (BatchNorm or a fixed affine map,
//! tanh, 2x2 max-pool) as one op, for training. The convolution's output is
//! then no node of Candle's graph, so its autograd neither zero-fills a
//! gradient buffer of that size nor adds into it: for LeNet5's first layer
//! that is 4,704 values per image, the largest tensor of a step.
//!
//! Inputs: the images and every parameter packed in one vector
//! `[conv weight, conv bias, norm weight, norm bias]` (Candle's custom ops take
//! at most three inputs; the packing is a `cat` whose backward hands each
//! parameter its part of the gradient).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::block::{Activation, ActivationGrad, Saved};
use super::conv::{ConvShape, channel_sum};
use super::{Norm, f32_data, output_buffer};

/// What the forward pass keeps for the backward pass beside the tail's [`Saved`].
#[derive(Default)]
struct Kept {
    /// The convolution's output (the tail's input).
    z: Vec<f32>,
    z_shape: Option<Shape>,
}

/// The fused op: inputs (x, packed parameters).
pub(super) struct ConvBlock {
    /// The convolution kernel's shape, `(o, c, kh, kw)`.
    pub kernel: Shape,
    pub norm: Norm,
    pub pool: bool,
    pub saved: Arc<Mutex<Saved>>,
    kept: Arc<Mutex<Kept>>,
}

impl ConvBlock {
    pub fn new(kernel: Shape, norm: Norm, pool: bool, saved: Arc<Mutex<Saved>>) -> ConvBlock {
        ConvBlock {
            kernel,
            norm,
            pool,
            saved,
            kept: Arc::default(),
        }
    }

    fn tail(&self) -> Activation {
        Activation {
            norm: self.norm,
            pool: self.pool,
            saved: self.saved.clone(),
        }
    }
}

/// The packed parameters split as `(conv weight, conv bias, norm weight, norm bias)`.
type Parts<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32]);

fn unpack<'a>(params: &'a [f32], kernel: &Shape) -> Result<Parts<'a>> {
    let (c_out, weights) = (kernel.dims()[0], kernel.elem_count());
    if params.len() != weights + 3 * c_out {
        candle_core::bail!(
            "conv block: {} packed parameters for kernel {kernel:?}, expected {}",
            params.len(),
            weights + 3 * c_out
        );
    }
    let (w, rest) = params.split_at(weights);
    let (b, rest) = rest.split_at(c_out);
    let (norm_w, norm_b) = rest.split_at(c_out);
    Ok((w, b, norm_w, norm_b))
}

impl CustomOp2 for ConvBlock {
    fn name(&self) -> &'static str {
        "mnist-lab-conv-block"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = ConvShape::new(xl.shape(), &self.kernel)?;
        let x = f32_data(xs, xl, self.name())?;
        let (w, b, norm_w, norm_b) = unpack(f32_data(ps, pl, self.name())?, &self.kernel)?;
        let z = s.forward(x, w, b);
        let z_shape = Shape::from((s.batch, s.c_out, s.out_h(), s.out_w()));
        let (out, shape) = self.tail().apply(&z, &z_shape, (norm_w, norm_b))?;
        *self.kept.lock().expect("conv block state lock") = Kept {
            z,
            z_shape: Some(z_shape),
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = ConvBlockGrad {
            kernel: self.kernel.clone(),
            params: params.to_vec1()?,
            norm: self.norm,
            pool: self.pool,
            saved: self.saved.clone(),
            kept: self.kept.clone(),
            input_gradient: x.track_op(),
        };
        let packed = x.apply_op3_no_bwd(out, &grad_out.contiguous()?, &grad)?;
        let grad_x = if grad.input_gradient {
            let len = x.elem_count();
            Some(packed.narrow(0, 0, len)?.reshape(x.shape())?)
        } else {
            None
        };
        let skip = if grad.input_gradient {
            x.elem_count()
        } else {
            0
        };
        let grad_params = packed.narrow(0, skip, params.elem_count())?;
        Ok((grad_x, Some(grad_params)))
    }
}

/// The gradients of [`ConvBlock`], from (x, its output, the output's gradient),
/// packed as `[grad_x (when wanted)..., grad_params...]`.
struct ConvBlockGrad {
    kernel: Shape,
    params: Vec<f32>,
    norm: Norm,
    pool: bool,
    saved: Arc<Mutex<Saved>>,
    kept: Arc<Mutex<Kept>>,
    /// Whether the input needs a gradient (not for the first layer's images).
    input_gradient: bool,
}

impl CustomOp3 for ConvBlockGrad {
    fn name(&self) -> &'static str {
        "mnist-lab-conv-block-grad"
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
        let s = ConvShape::new(xl.shape(), &self.kernel)?;
        let x = f32_data(xs, xl, self.name())?;
        let (out, g) = (
            f32_data(os, ol, self.name())?,
            f32_data(gs, gl, self.name())?,
        );
        let (w, _, norm_w, _) = unpack(&self.params, &self.kernel)?;
        let kept = self.kept.lock().expect("conv block state lock");
        let Some(z_shape) = &kept.z_shape else {
            candle_core::bail!("conv block: backward before forward");
        };
        let tail = ActivationGrad {
            norm: self.norm,
            pool: self.pool,
            weight: norm_w.to_vec(),
            saved: self.saved.clone(),
        };
        // [grad_z, grad_norm_w, grad_norm_b]
        let tail_grads = tail.packed_grads(&kept.z, z_shape, out, g)?;
        let (grad_z, grad_norm) = tail_grads.split_at(kept.z.len());
        // [grad_x (when wanted), grad_w, grad_b, grad_norm_w, grad_norm_b]
        let x_len = if self.input_gradient { x.len() } else { 0 };
        let mut packed = output_buffer(x_len + self.params.len());
        let (grad_x, grad_params) = packed.split_at_mut(x_len);
        if self.input_gradient {
            s.input_gradient_into(grad_z, w, grad_x);
        }
        let grad_w = s.weight_gradient(x, grad_z);
        let grad_b = channel_sum(grad_z, s.c_out, s.out_h() * s.out_w());
        let mut at = 0;
        for part in [&grad_w[..], &grad_b, grad_norm] {
            grad_params[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::kernels::testing::{candle_tail, max_diff, on_the_kernel_path, random};
    use crate::model::kernels::{Norm, conv_block};
    use candle_core::{Tensor, Var};

    /// Forward, batch statistics and the gradients of the input and all four
    /// parameters against Candle's conv2d, BatchNorm or affine map, tanh and
    /// max-pool, through a weighted sum so every output gets its own gradient.
    fn check(x_shape: &[usize], w_shape: &[usize], norm: Norm, pool: bool) {
        on_the_kernel_path();
        let c = w_shape[0];
        let x = Var::from_tensor(&random(x_shape, 1)).unwrap();
        let w = Var::from_tensor(&(random(w_shape, 2) * 0.5).unwrap()).unwrap();
        let b = Var::from_tensor(&random(&[c], 3)).unwrap();
        let norm_w = Var::from_tensor(&(random(&[c], 4) + 1.5).unwrap()).unwrap();
        let norm_b = Var::from_tensor(&random(&[c], 5)).unwrap();
        let (ours, stats) = conv_block(&x, (&w, &b), norm, (&norm_w, &norm_b), pool).unwrap();
        let z = x
            .conv2d(&w, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        let theirs = candle_tail(&z, &norm_w, &norm_b, norm, pool);
        let label = format!("{x_shape:?} {w_shape:?} {norm:?} pool={pool}");
        assert!(max_diff(&ours, &theirs) < 1e-4, "forward {label}");
        assert_eq!(
            stats.is_some(),
            matches!(norm, Norm::Batch { .. }),
            "{label}"
        );
        let weights = random(ours.dims(), 6);
        let grads = |y: &Tensor| {
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (ours_g, theirs_g) = (grads(&ours), grads(&theirs));
        let mut checked = vec![("x", &x), ("w", &w), ("b", &b)];
        if matches!(norm, Norm::Batch { .. }) {
            checked.extend([("norm_w", &norm_w), ("norm_b", &norm_b)]);
        }
        for (name, var) in checked {
            let (a, r) = (ours_g.get(var).unwrap(), theirs_g.get(var).unwrap());
            let scale = r
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1.0);
            assert!(
                max_diff(a, r) < 1e-3 * scale,
                "grad {name} {label}: {} (scale {scale})",
                max_diff(a, r)
            );
        }
    }

    #[test]
    fn conv_block_matches_candle_forward_and_backward() {
        for norm in [Norm::Batch { eps: 1e-5 }, Norm::Affine] {
            check(&[3, 1, 32, 32], &[6, 1, 5, 5], norm, true);
            check(&[2, 6, 14, 14], &[16, 6, 5, 5], norm, true);
            check(&[4, 16, 5, 5], &[120, 16, 5, 5], norm, false);
        }
    }

    #[test]
    fn the_first_layer_gets_no_input_gradient() {
        let x = random(&[2, 1, 8, 8], 1);
        let w = Var::from_tensor(&random(&[2, 1, 3, 3], 2)).unwrap();
        let b = Var::from_tensor(&random(&[2], 3)).unwrap();
        let (ones, zeros) = (
            Tensor::ones(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
        let (y, _) = conv_block(&x, (&w, &b), Norm::Affine, (&ones, &zeros), true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some() && grads.get(&b).is_some());
    }
}
