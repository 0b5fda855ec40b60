//! Mean cross-entropy of logits against integer labels, as one op: a stable
//! log-sum-exp per row forward, `(softmax - one_hot) / n` backward.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{f32_data, output_buffer};

/// The labels of a CPU tensor argument, as `usize`.
fn labels(storage: &CpuStorage, layout: &Layout, classes: usize) -> Result<Vec<usize>> {
    let CpuStorage::U32(data) = storage else {
        candle_core::bail!("cross-entropy: labels must be u32");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: labels must be contiguous");
    };
    data[start..end]
        .iter()
        .map(|&label| match label as usize {
            l if l < classes => Ok(l),
            l => candle_core::bail!("cross-entropy: label {l} out of range for {classes} classes"),
        })
        .collect()
}

/// `mean_i (logsumexp(z_i) - z_i[y_i])` over logits `(n, classes)` and labels `(n,)`.
pub(super) struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "mnist-lab-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, classes) = zl.shape().dims2()?;
        let z = f32_data(zs, zl, self.name())?;
        let labels = labels(ys, yl, classes)?;
        let total: f64 = z
            .chunks_exact(classes)
            .zip(&labels)
            .map(|(row, &label)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
                (max + sum.ln() - row[label]) as f64
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::gpu::ops::cross_entropy_loss(zs, zl, ys, yl)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The incoming gradient stays a tensor: on a GPU, reading it here
        // would wait for the device at every step.
        let grad = logits.apply_op3_no_bwd(labels, &grad_loss.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(grad), None))
    }
}

/// `scale * (softmax(z) - one_hot(y))` from (logits, labels, the loss's
/// gradient g), with `scale = g / rows`.
struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "mnist-lab-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, classes) = zl.shape().dims2()?;
        let z = f32_data(zs, zl, self.name())?;
        let labels = labels(ys, yl, classes)?;
        let scale = f32_data(gs, gl, self.name())?[0] / rows as f32;
        let mut grad = output_buffer(z.len());
        for ((out, row), &label) in grad
            .chunks_exact_mut(classes)
            .zip(z.chunks_exact(classes))
            .zip(&labels)
        {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum += *o;
            }
            for o in out.iter_mut() {
                *o *= scale / sum;
            }
            out[label] -= scale;
        }
        Ok((CpuStorage::F32(grad), zl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::gpu::ops::cross_entropy_grad((zs, zl), (ys, yl), (gs, gl))
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::cross_entropy;
    use crate::kernels::testing::{max_diff, on_the_kernel_path, random};
    use candle_core::{Device, Tensor, Var};

    /// Loss and gradient against candle-nn's, for `n` rows of logits scaled by `scale`.
    fn check(n: usize, scale: f64) {
        on_the_kernel_path();
        let logits = Var::from_tensor(&(random(&[n, 10], 1) * scale).unwrap()).unwrap();
        let labels: Vec<u32> = (0..n).map(|i| (i * 7 % 10) as u32).collect();
        let labels = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();
        let ours = cross_entropy(&logits, &labels).unwrap();
        let reference = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let loss: f32 = ours.to_scalar().unwrap();
        assert!(loss.is_finite(), "{n} rows x{scale}: loss {loss}");
        let tolerance = 1e-5 * (1.0 + loss.abs());
        assert!(max_diff(&ours, &reference) < tolerance, "{n} rows x{scale}");
        // Scaled, so the incoming gradient is not 1.
        let a = (&ours * 3.0).unwrap().backward().unwrap();
        let r = (&reference * 3.0).unwrap().backward().unwrap();
        let d = max_diff(a.get(&logits).unwrap(), r.get(&logits).unwrap());
        assert!(d < 1e-6, "{n} rows x{scale}: gradient differs by {d}");
    }

    #[test]
    fn cross_entropy_matches_candle_forward_and_backward() {
        check(32, 5.0);
    }

    #[test]
    fn cross_entropy_holds_at_batch_one_and_with_huge_logits() {
        check(1, 5.0);
        // Logits in +-1000: a softmax without the max subtracted overflows.
        check(16, 1000.0);
    }

    #[test]
    fn out_of_range_labels_are_an_error() {
        let logits = random(&[2, 10], 1);
        let labels = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
        let err = cross_entropy(&logits, &labels).unwrap_err().to_string();
        assert!(err.contains("label 10"), "{err}");
    }
}
