//! Fully connected layer `y = x . w^T + b` as one op: the bias is added inside the
//! GEMM, and the backward pass computes the weight and bias gradients together.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use gemm::Parallelism;
use rayon::prelude::*;

use super::activation::fast_tanh;
use super::{f32_data, matmul, output_buffer, threads};

/// `y = x . w^T + b`: x `(n, in)`, w `(out, in)`, b `(out,)`; with an epilogue,
/// `tanh(y * scale + shift)` per column, applied to each block of rows while it
/// is still in cache (evaluation only: that form has no backward pass).
pub(super) struct Linear {
    pub epilogue: Option<AffineTanh>,
}

/// Per-column `scale` and `shift` before a tanh.
pub(super) struct AffineTanh {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
}

impl AffineTanh {
    /// `tanh((row + bias) * scale + shift)` for each row of products.
    fn apply(&self, rows: &mut [f32], bias: &[f32]) {
        pulp::Arch::new().dispatch(AffineTanhRows {
            rows,
            bias,
            scale: &self.scale,
            shift: &self.shift,
        });
    }
}

/// [`AffineTanh`] over rows, compiled once per vector unit by `pulp`.
struct AffineTanhRows<'a> {
    rows: &'a mut [f32],
    bias: &'a [f32],
    scale: &'a [f32],
    shift: &'a [f32],
}

impl pulp::WithSimd for AffineTanhRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let width = self.scale.len();
        for row in self.rows.chunks_exact_mut(width) {
            let columns = self.bias.iter().zip(self.scale).zip(self.shift);
            for (v, ((&bias, &a), &b)) in row.iter_mut().zip(columns) {
                *v = fast_tanh((*v + bias) * a + b);
            }
        }
    }
}

/// From this many rows on, the forward product is split by rows over the threads.
const SPLIT_ROWS: usize = 512;

impl Linear {
    /// `y = x (n x inputs) . w^T + b` into `y`, whose values are not read, then
    /// the epilogue if any: without one each row starts from the bias and the
    /// GEMM adds onto it; with one the GEMM writes the bare products and the
    /// epilogue adds the bias as it goes (the same sums, one pass fewer).
    fn product(&self, y: &mut [f32], x: &[f32], w: &[f32], b: &[f32]) {
        let (outputs, inputs) = (b.len(), w.len() / b.len().max(1));
        let n = y.len() / outputs;
        let product = |y: &mut [f32], x: &[f32], parallelism| {
            let rows = y.len() / outputs;
            if self.epilogue.is_none() {
                y.chunks_exact_mut(outputs)
                    .for_each(|row| row.copy_from_slice(b));
            }
            // As y^T (outputs x rows) = w . x^T: the GEMM then reads x where it
            // lies instead of packing a copy of it (x is the large operand,
            // 4 MB for a CustomMLP evaluation batch), with the same sums.
            matmul(
                (outputs, rows, inputs),
                y,
                (1, outputs),
                w,
                (inputs, 1),
                x,
                (1, inputs),
                self.epilogue.is_none(),
                parallelism,
            );
            if let Some(epilogue) = &self.epilogue {
                epilogue.apply(y, b);
            }
        };
        if n >= SPLIT_ROWS {
            // Large batches (evaluation): rows split evenly over the threads, one
            // single-threaded GEMM each, which beats the GEMM's own split of a
            // narrow (48- or 84-column) product by about 5%.
            let rows_per_task = n.div_ceil(rayon::current_num_threads()).max(1);
            y.par_chunks_mut(rows_per_task * outputs)
                .zip(x.par_chunks(rows_per_task * inputs))
                .for_each(|(y, x)| product(y, x, Parallelism::None));
        } else {
            product(y, x, threads());
        }
    }
}

/// Sizes of a fully connected layer over a batch: x `(n, inputs)`, w `(outputs, inputs)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dense {
    pub n: usize,
    pub inputs: usize,
    pub outputs: usize,
}

impl Dense {
    /// `x . w^T + b`: each row starts from the bias and the GEMM adds onto it.
    pub fn forward(&self, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let mut y = output_buffer(self.n * self.outputs);
        Linear { epilogue: None }.product(&mut y, x, w, b);
        y
    }

    /// `grad_x = grad_y . w`, written whole into `grad_x`.
    pub fn input_gradient_into(&self, g: &[f32], w: &[f32], grad_x: &mut [f32]) {
        let Dense { n, inputs, outputs } = *self;
        matmul(
            (n, inputs, outputs),
            grad_x,
            (inputs, 1),
            g,
            (outputs, 1),
            w,
            (inputs, 1),
            false,
            threads(),
        );
    }

    /// `grad_w = grad_y^T . x` and `grad_b` = the column sums of `grad_y`.
    pub fn param_gradients_into(
        &self,
        x: &[f32],
        g: &[f32],
        grad_w: &mut [f32],
        grad_b: &mut [f32],
    ) {
        let Dense { n, inputs, outputs } = *self;
        matmul(
            (outputs, inputs, n),
            grad_w,
            (inputs, 1),
            g,
            (1, outputs),
            x,
            (inputs, 1),
            false,
            threads(),
        );
        grad_b.fill(0.0);
        for row in g.chunks_exact(outputs) {
            grad_b.iter_mut().zip(row).for_each(|(sum, v)| *sum += v);
        }
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "mnist-lab-linear"
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
        let (n, inputs) = xl.shape().dims2()?;
        let (outputs, w_inputs) = wl.shape().dims2()?;
        if w_inputs != inputs || bl.shape().elem_count() != outputs {
            candle_core::bail!(
                "linear: input {:?} does not fit weight {:?} and bias {:?}",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        let (x, w, b) = (
            f32_data(xs, xl, self.name())?,
            f32_data(ws, wl, self.name())?,
            f32_data(bs, bl, self.name())?,
        );
        if let Some(epilogue) = &self.epilogue
            && (epilogue.scale.len() != outputs || epilogue.shift.len() != outputs)
        {
            candle_core::bail!(
                "linear: {outputs} outputs but a {}-column epilogue",
                epilogue.scale.len()
            );
        }
        let mut y = output_buffer(n * outputs);
        self.product(&mut y, x, w, b);
        Ok((CpuStorage::F32(y), Shape::from((n, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.epilogue.is_some() {
            candle_core::bail!("linear with a tanh epilogue is for evaluation: it has no backward");
        }
        let grad_y = grad_y.contiguous()?;
        let grad_x = if x.track_op() {
            Some(grad_y.apply_op2_no_bwd(w, &LinearGradInput)?)
        } else {
            None
        };
        let packed = x.apply_op2_no_bwd(&grad_y, &LinearGradParams)?;
        let (outputs, inputs) = w.dims2()?;
        let grad_w = packed
            .narrow(0, 0, outputs * inputs)?
            .reshape((outputs, inputs))?;
        let grad_b = packed.narrow(0, outputs * inputs, outputs)?;
        Ok((grad_x, Some(grad_w), Some(grad_b)))
    }
}

/// `grad_x = grad_y . w`, from (grad_y, w).
struct LinearGradInput;

impl CustomOp2 for LinearGradInput {
    fn name(&self) -> &'static str {
        "mnist-lab-linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, outputs) = gl.shape().dims2()?;
        let (_, inputs) = wl.shape().dims2()?;
        let (g, w) = (
            f32_data(gs, gl, self.name())?,
            f32_data(ws, wl, self.name())?,
        );
        let mut grad_x = output_buffer(n * inputs);
        Dense { n, inputs, outputs }.input_gradient_into(g, w, &mut grad_x);
        Ok((CpuStorage::F32(grad_x), Shape::from((n, inputs))))
    }
}

/// `[grad_w = grad_y^T . x, grad_b = column sums of grad_y]`, packed, from (x, grad_y).
struct LinearGradParams;

impl CustomOp2 for LinearGradParams {
    fn name(&self) -> &'static str {
        "mnist-lab-linear-grad-params"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, inputs) = xl.shape().dims2()?;
        let (_, outputs) = gl.shape().dims2()?;
        let (x, g) = (
            f32_data(xs, xl, self.name())?,
            f32_data(gs, gl, self.name())?,
        );
        let mut packed = output_buffer(outputs * inputs + outputs);
        let (grad_w, grad_b) = packed.split_at_mut(outputs * inputs);
        Dense { n, inputs, outputs }.param_gradients_into(x, g, grad_w, grad_b);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::testing::{max_diff, on_the_kernel_path, random};
    use crate::kernels::{linear, linear_affine_tanh};
    use candle_core::Var;

    #[test]
    fn linear_matches_candle_forward_and_backward() {
        on_the_kernel_path();
        // 1001 rows: the forward splits large batches by rows, unevenly here.
        for (n, inputs, outputs) in [(5, 7, 3), (64, 1024, 48), (1, 120, 84), (1001, 48, 10)] {
            let x = Var::from_tensor(&random(&[n, inputs], 1)).unwrap();
            let w = Var::from_tensor(&random(&[outputs, inputs], 2)).unwrap();
            let b = Var::from_tensor(&random(&[outputs], 3)).unwrap();
            let ours = linear(&x, &w, &b).unwrap();
            let reference = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            assert!(max_diff(&ours, &reference) < 1e-4);
            let weights = random(ours.dims(), 4);
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
                assert!(d < 1e-3, "grad {name} ({n}, {inputs}, {outputs}): {d}");
            }
        }
    }

    #[test]
    fn fused_affine_tanh_matches_the_separate_ops() {
        on_the_kernel_path();
        for n in [5, 1001] {
            let x = random(&[n, 48], 1);
            let w = random(&[48, 48], 2);
            let b = random(&[48], 3);
            let scale = (random(&[48], 4) + 1.5).unwrap();
            let shift = random(&[48], 5);
            let ours = linear_affine_tanh(&x, &w, &b, &scale, &shift).unwrap();
            let reference = linear(&x, &w, &b)
                .unwrap()
                .broadcast_mul(&scale)
                .unwrap()
                .broadcast_add(&shift)
                .unwrap()
                .tanh()
                .unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "{n} rows");
        }
    }
}
