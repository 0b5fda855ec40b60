//! A layer's product (a convolution or a fully connected layer) and its tail
//! (BatchNorm or a fixed affine map, tanh, 2x2 max-pool) as one op, for
//! training. The product's output is then no node of Candle's graph, so its
//! autograd neither zero-fills a gradient buffer of that size nor adds into
//! it (for LeNet5's first layer that is 4,704 values per image, the largest
//! tensor of a step), and a layer is one op forward and one backward.
//!
//! Inputs: the layer's input, its weight, and its small per-channel parameters
//! packed in one vector `[bias, norm weight, norm bias]` (Candle's custom ops
//! take at most three inputs; the packing is a `cat` whose backward hands each
//! its part of the gradient). The weight stays an input of its own, so a step
//! neither copies it into a packed vector nor its gradient out of one.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};

use super::block::{Activation, ActivationGrad, Saved};
use super::conv::{ConvShape, channel_sum};
use super::halves::Meeting;
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

    /// The input gradient into `grad_x` (when given) and the bias's into
    /// `grad_b`, from the output gradient `grad_z`; returns the weight's.
    fn backward(
        &self,
        (x, x_shape): (&[f32], &Shape),
        grad_z: &[f32],
        w: &[f32],
        grad_x: Option<&mut [f32]>,
        grad_b: &mut [f32],
    ) -> Result<Vec<f32>> {
        Ok(match self {
            Product::Conv(_) => {
                let s = self.conv(x_shape)?;
                if let Some(grad_x) = grad_x {
                    s.input_gradient_into(grad_z, w, grad_x);
                }
                grad_b.copy_from_slice(&channel_sum(grad_z, s.c_out, s.out_h() * s.out_w()));
                s.weight_gradient(x, grad_z)
            }
            Product::Dense(_) => {
                let d = self.dense(x_shape)?;
                if let Some(grad_x) = grad_x {
                    d.input_gradient_into(grad_z, w, grad_x);
                }
                let mut grad_w = output_buffer(w.len());
                d.param_gradients_into(x, grad_z, &mut grad_w, grad_b);
                grad_w
            }
        })
    }
}

/// The product's output (the tail's input), kept for the backward pass.
#[derive(Default)]
struct Kept {
    z: Vec<f32>,
    z_shape: Option<Shape>,
}

/// The gradients of the fused op's inputs: x's (where it needs one), the
/// weight's, and the packed per-channel parameters'.
type Gradients = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

/// The fused op: inputs (x, weight, packed per-channel parameters).
pub(super) struct FusedLayer {
    pub product: Product,
    pub norm: Norm,
    pub pool: bool,
    pub saved: Arc<Mutex<Saved>>,
    /// Where BatchNorm meets the batch's other half, when this is one.
    pub meeting: Option<Meeting>,
    /// Ones and zeros per channel when the tail has no parameters (a layer
    /// without BatchNorm): the packed input is then the bias alone, with no
    /// `cat` to build it and no gradients of constants.
    identity: Option<(Vec<f32>, Vec<f32>)>,
    kept: Arc<Mutex<Kept>>,
}

impl FusedLayer {
    /// `identity`: the tail has no parameters (see [`FusedLayer::identity`]).
    pub fn new(
        product: Product,
        (norm, meeting, identity): (Norm, Option<Meeting>, bool),
        pool: bool,
        saved: Arc<Mutex<Saved>>,
    ) -> FusedLayer {
        let c = product.channels();
        FusedLayer {
            product,
            norm,
            pool,
            saved,
            meeting,
            identity: identity.then(|| (vec![1.0; c], vec![0.0; c])),
            kept: Arc::default(),
        }
    }

    fn tail(&self) -> Activation {
        Activation {
            norm: self.norm,
            pool: self.pool,
            saved: self.saved.clone(),
            meeting: self.meeting.clone(),
        }
    }

    /// The packed per-channel parameters split as `(bias, norm weight, norm bias)`.
    fn unpack<'a>(&'a self, packed: &'a [f32]) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
        let c = self.product.channels();
        let expected = if self.identity.is_some() { c } else { 3 * c };
        if packed.len() != expected {
            candle_core::bail!(
                "fused layer: {} per-channel parameters for {c} channels, expected {expected}",
                packed.len(),
            );
        }
        if let Some((ones, zeros)) = &self.identity {
            return Ok((packed, ones, zeros));
        }
        let (b, rest) = packed.split_at(c);
        let (norm_w, norm_b) = rest.split_at(c);
        Ok((b, norm_w, norm_b))
    }

    /// The gradients of x (when `input_gradient`), of the weight and of the
    /// packed per-channel parameters, from the output and its gradient `g`.
    fn gradients(
        &self,
        (x, x_shape): (&[f32], &Shape),
        (w, packed): (&[f32], &[f32]),
        (out, g): (&[f32], &[f32]),
        input_gradient: bool,
    ) -> Result<Gradients> {
        let (_, norm_w, _) = self.unpack(packed)?;
        let kept = self.kept.lock().expect("fused layer state lock");
        let Some(z_shape) = &kept.z_shape else {
            candle_core::bail!("fused layer: backward before forward");
        };
        let tail = ActivationGrad {
            norm: self.norm,
            pool: self.pool,
            weight: norm_w.to_vec(),
            saved: self.saved.clone(),
            meeting: self.meeting.clone(),
        };
        // [grad_z, grad_norm_w, grad_norm_b]
        let tail_grads = tail.packed_grads(&kept.z, z_shape, out, g)?;
        let (grad_z, grad_norm) = tail_grads.split_at(kept.z.len());
        let mut grad_x = input_gradient.then(|| output_buffer(x.len()));
        // [grad_b, grad_norm_w, grad_norm_b]
        let mut grad_packed = output_buffer(packed.len());
        let (grad_b, grad_tail) = grad_packed.split_at_mut(self.product.channels());
        let grad_w =
            self.product
                .backward((x, x_shape), grad_z, w, grad_x.as_deref_mut(), grad_b)?;
        if self.identity.is_none() {
            grad_tail.copy_from_slice(grad_norm);
        }
        Ok((grad_x, grad_w, grad_packed))
    }
}

impl CustomOp3 for FusedLayer {
    fn name(&self) -> &'static str {
        "mnist-lab-fused-layer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(xs, xl, self.name())?;
        let w = f32_data(ws, wl, self.name())?;
        if w.len() != self.product.weights() {
            candle_core::bail!("fused layer: {} weights for {:?}", w.len(), self.product);
        }
        let (b, norm_w, norm_b) = self.unpack(f32_data(ps, pl, self.name())?)?;
        let (z, z_shape) = self.product.forward(x, xl.shape(), w, b)?;
        let (out, shape) = self.tail().apply(&z, &z_shape, (norm_w, norm_b))?;
        *self.kept.lock().expect("fused layer state lock") = Kept {
            z,
            z_shape: Some(z_shape),
        };
        Ok((CpuStorage::F32(out), shape))
    }

    /// Computed here from the tensors' storage, not as another custom op, so
    /// that no input is copied out first.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_out = grad_out.contiguous()?;
        let (grad_x, grad_w, grad_packed) = {
            let tensors = [x, w, packed, out, &grad_out];
            let guards = tensors.map(|t| t.storage_and_layout());
            let mut data = [&[][..]; 5];
            for (slot, (storage, layout)) in data.iter_mut().zip(&guards) {
                let Storage::Cpu(storage) = &**storage else {
                    candle_core::bail!("the fused layer runs on the CPU only");
                };
                *slot = f32_data(storage, layout, self.name())?;
            }
            let [x_data, w_data, packed_data, out_data, g_data] = data;
            self.gradients(
                (x_data, x.shape()),
                (w_data, packed_data),
                (out_data, g_data),
                x.track_op(),
            )?
        };
        let cpu = &Device::Cpu;
        Ok((
            grad_x
                .map(|g| Tensor::from_vec(g, x.shape(), cpu))
                .transpose()?,
            Some(Tensor::from_vec(grad_w, w.shape(), cpu)?),
            Some(Tensor::from_vec(grad_packed, packed.shape(), cpu)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::testing::{candle_tail, max_diff, on_the_kernel_path, random};
    use crate::kernels::{Norm, fused_layer};
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
        let (ours, stats) =
            fused_layer(&x, (&w, &b), norm, Some((&norm_w, &norm_b)), pool).unwrap();
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

    /// No tail parameters (a layer without BatchNorm) is the affine map of
    /// ones and zeros, bit for bit, forward and backward.
    #[test]
    fn an_identity_tail_equals_ones_and_zeros() {
        on_the_kernel_path();
        for (x_shape, w_shape, pool) in [
            (&[3, 6, 14, 14][..], &[16, 6, 5, 5][..], true),
            (&[5, 120][..], &[84, 120][..], false),
        ] {
            let x = Var::from_tensor(&random(x_shape, 1)).unwrap();
            let w = Var::from_tensor(&random(w_shape, 2)).unwrap();
            let c = w_shape[0];
            let b = Var::from_tensor(&random(&[c], 3)).unwrap();
            let cpu = &candle_core::Device::Cpu;
            let ones = Tensor::ones(c, candle_core::DType::F32, cpu).unwrap();
            let zeros = Tensor::zeros(c, candle_core::DType::F32, cpu).unwrap();
            let run = |tail| {
                let (y, _) = fused_layer(&x, (&w, &b), Norm::Affine, tail, pool).unwrap();
                let grads = (&y * &random(y.dims(), 4))
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grad = |v: &Var| grads.get(v).unwrap().clone();
                (y, [grad(&x), grad(&w), grad(&b)])
            };
            let (identity, explicit) = (run(None), run(Some((&ones, &zeros))));
            assert_eq!(max_diff(&identity.0, &explicit.0), 0.0, "{x_shape:?}");
            for (a, e) in identity.1.iter().zip(&explicit.1) {
                assert_eq!(max_diff(a, e), 0.0, "{x_shape:?}");
            }
        }
    }

    #[test]
    fn the_first_layer_gets_no_input_gradient() {
        let x = random(&[2, 1, 8, 8], 1);
        let w = Var::from_tensor(&random(&[2, 1, 3, 3], 2)).unwrap();
        let b = Var::from_tensor(&random(&[2], 3)).unwrap();
        let (y, _) = fused_layer(&x, (&w, &b), Norm::Affine, None, true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some() && grads.get(&b).is_some());
    }
}
