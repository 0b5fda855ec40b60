//! A layer's product (a convolution or a fully connected layer) and its tail
//! (BatchNorm or a fixed affine map, tanh, 2x2 max-pool) as one op, for
//! training. The product's output is then no node of Candle's graph, so its
//! autograd neither zero-fills a gradient buffer of that size nor adds into
//! it (for LeNet5's first layer that is 4,704 values per image, the largest
//! tensor of a step), and a layer is one op forward and one backward.
//!
//! Inputs: the layer's input and every parameter packed in one vector
//! `[weight, bias, norm weight, norm bias]` (Candle's custom ops take at most
//! three inputs; the packing is a `cat` whose backward hands each parameter its
//! part of the gradient).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::block::{Activation, ActivationGrad, Saved};
use super::conv::{ConvShape, channel_sum};
use super::linear::Dense;
use super::{Norm, f32_data, output_buffer};

/// The product a layer applies to its input.
#[derive(Debug, Clone)]
pub(super) enum Product {
    /// A valid, stride-1 convolution with a kernel of this shape, `(o, c, kh, kw)`.
    Conv(Shape),
    /// A fully connected layer with this weight shape, `(outputs, inputs)`.
    Dense(Shape),
}

impl Product {
    /// Output channels (the tail's channels).
    fn channels(&self) -> usize {
        match self {
            Product::Conv(kernel) | Product::Dense(kernel) => kernel.dims()[0],
        }
    }

    fn weights(&self) -> usize {
        match self {
            Product::Conv(kernel) | Product::Dense(kernel) => kernel.elem_count(),
        }
    }

    fn conv(&self, x: &Shape) -> Result<ConvShape> {
        match self {
            Product::Conv(kernel) => ConvShape::new(x, kernel),
            Product::Dense(_) => candle_core::bail!("not a convolution"),
        }
    }

    fn dense(&self, x: &Shape) -> Result<Dense> {
        let (n, inputs) = x.dims2()?;
        let (outputs, w_inputs) = match self {
            Product::Dense(weight) => weight.dims2()?,
            Product::Conv(_) => candle_core::bail!("not a fully connected layer"),
        };
        if w_inputs != inputs {
            candle_core::bail!("linear: input {x:?} does not fit {w_inputs} inputs");
        }
        Ok(Dense { n, inputs, outputs })
    }

    /// The product `x . w + b` and its shape.
    fn forward(
        &self,
        x: &[f32],
        x_shape: &Shape,
        w: &[f32],
        b: &[f32],
    ) -> Result<(Vec<f32>, Shape)> {
        Ok(match self {
            Product::Conv(_) => {
                let s = self.conv(x_shape)?;
                let shape = Shape::from((s.batch, s.c_out, s.out_h(), s.out_w()));
                (s.forward(x, w, b), shape)
            }
            Product::Dense(_) => {
                let d = self.dense(x_shape)?;
                (d.forward(x, w, b), Shape::from((d.n, d.outputs)))
            }
        })
    }

    /// The input gradient into `grad_x` (when given) and `[grad_w, grad_b]`
    /// into `grad_params`, from the output gradient `grad_z`.
    fn backward(
        &self,
        (x, x_shape): (&[f32], &Shape),
        grad_z: &[f32],
        w: &[f32],
        grad_x: Option<&mut [f32]>,
        grad_params: &mut [f32],
    ) -> Result<()> {
        let (grad_w, grad_b) = grad_params.split_at_mut(self.weights());
        match self {
            Product::Conv(_) => {
                let s = self.conv(x_shape)?;
                if let Some(grad_x) = grad_x {
                    s.input_gradient_into(grad_z, w, grad_x);
                }
                grad_w.copy_from_slice(&s.weight_gradient(x, grad_z));
                grad_b.copy_from_slice(&channel_sum(grad_z, s.c_out, s.out_h() * s.out_w()));
            }
            Product::Dense(_) => {
                let d = self.dense(x_shape)?;
                if let Some(grad_x) = grad_x {
                    d.input_gradient_into(grad_z, w, grad_x);
                }
                d.param_gradients_into(x, grad_z, grad_params);
            }
        }
        Ok(())
    }
}

/// The product's output (the tail's input), kept for the backward pass.
#[derive(Default)]
struct Kept {
    z: Vec<f32>,
    z_shape: Option<Shape>,
}

/// The fused op: inputs (x, packed parameters).
pub(super) struct FusedLayer {
    pub product: Product,
    pub norm: Norm,
    pub pool: bool,
    pub saved: Arc<Mutex<Saved>>,
    kept: Arc<Mutex<Kept>>,
}

impl FusedLayer {
    pub fn new(product: Product, norm: Norm, pool: bool, saved: Arc<Mutex<Saved>>) -> FusedLayer {
        FusedLayer {
            product,
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

type Parts<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// The packed parameters split as `(weight, bias, norm weight, norm bias)`.
fn unpack<'a>(params: &'a [f32], product: &Product) -> Result<Parts<'a>> {
    let (c_out, weights) = (product.channels(), product.weights());
    if params.len() != weights + 3 * c_out {
        candle_core::bail!(
            "fused layer: {} packed parameters for {product:?}, expected {}",
            params.len(),
            weights + 3 * c_out
        );
    }
    let (w, rest) = params.split_at(weights);
    let (b, rest) = rest.split_at(c_out);
    let (norm_w, norm_b) = rest.split_at(c_out);
    Ok((w, b, norm_w, norm_b))
}

impl CustomOp2 for FusedLayer {
    fn name(&self) -> &'static str {
        "mnist-lab-fused-layer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(xs, xl, self.name())?;
        let (w, b, norm_w, norm_b) = unpack(f32_data(ps, pl, self.name())?, &self.product)?;
        let (z, z_shape) = self.product.forward(x, xl.shape(), w, b)?;
        let (out, shape) = self.tail().apply(&z, &z_shape, (norm_w, norm_b))?;
        *self.kept.lock().expect("fused layer state lock") = Kept {
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
        let grad = FusedLayerGrad {
            product: self.product.clone(),
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

/// The gradients of [`FusedLayer`], from (x, its output, the output's gradient),
/// packed as `[grad_x (when wanted)..., grad_params...]`.
struct FusedLayerGrad {
    product: Product,
    params: Vec<f32>,
    norm: Norm,
    pool: bool,
    saved: Arc<Mutex<Saved>>,
    kept: Arc<Mutex<Kept>>,
    /// Whether the input needs a gradient (not for the first layer's images).
    input_gradient: bool,
}

impl CustomOp3 for FusedLayerGrad {
    fn name(&self) -> &'static str {
        "mnist-lab-fused-layer-grad"
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
        let x = f32_data(xs, xl, self.name())?;
        let (out, g) = (
            f32_data(os, ol, self.name())?,
            f32_data(gs, gl, self.name())?,
        );
        let (w, _, norm_w, _) = unpack(&self.params, &self.product)?;
        let kept = self.kept.lock().expect("fused layer state lock");
        let Some(z_shape) = &kept.z_shape else {
            candle_core::bail!("fused layer: backward before forward");
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
        let (grad_product, grad_tail) =
            grad_params.split_at_mut(self.params.len() - grad_norm.len());
        let grad_x = self.input_gradient.then_some(grad_x);
        self.product
            .backward((x, xl.shape()), grad_z, w, grad_x, grad_product)?;
        grad_tail.copy_from_slice(grad_norm);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::kernels::testing::{candle_tail, max_diff, on_the_kernel_path, random};
    use crate::model::kernels::{Norm, fused_layer};
    use candle_core::{Tensor, Var};

    /// Forward, batch statistics and the gradients of the input and all four
    /// parameters against Candle's conv2d or matmul, BatchNorm or affine map, tanh and
    /// max-pool, through a weighted sum so every output gets its own gradient.
    fn check(x_shape: &[usize], w_shape: &[usize], norm: Norm, pool: bool) {
        on_the_kernel_path();
        let c = w_shape[0];
        let x = Var::from_tensor(&random(x_shape, 1)).unwrap();
        let w = Var::from_tensor(&(random(w_shape, 2) * 0.5).unwrap()).unwrap();
        let b = Var::from_tensor(&random(&[c], 3)).unwrap();
        let norm_w = Var::from_tensor(&(random(&[c], 4) + 1.5).unwrap()).unwrap();
        let norm_b = Var::from_tensor(&random(&[c], 5)).unwrap();
        let (ours, stats) = fused_layer(&x, (&w, &b), norm, (&norm_w, &norm_b), pool).unwrap();
        let z = if w_shape.len() == 4 {
            x.conv2d(&w, 0, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
                .unwrap()
        } else {
            x.matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
        };
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
    fn fused_layers_match_candle_forward_and_backward() {
        for norm in [Norm::Batch { eps: 1e-5 }, Norm::Affine] {
            check(&[3, 1, 32, 32], &[6, 1, 5, 5], norm, true);
            check(&[2, 6, 14, 14], &[16, 6, 5, 5], norm, true);
            check(&[4, 16, 5, 5], &[120, 16, 5, 5], norm, false);
            check(&[5, 120], &[84, 120], norm, false);
            check(&[64, 1024], &[48, 1024], norm, false);
            check(&[3, 48], &[48, 48], norm, false);
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
        let (y, _) = fused_layer(&x, (&w, &b), Norm::Affine, (&ones, &zeros), true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some() && grads.get(&b).is_some());
    }
}
