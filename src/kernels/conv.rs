//! Valid, stride-1 convolution as im2col plus GEMM, threaded over images.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::block::lane_sum;
use super::{f32_data, matmul, output_buffer, task_len, threads};
use super::{narrow_rows, one_channel};

/// Sizes of a valid (unpadded), stride-1 convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvShape {
    pub(super) batch: usize,
    pub(super) c_in: usize,
    pub(super) height: usize,
    pub(super) width: usize,
    pub(super) c_out: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
}

impl ConvShape {
    pub(super) fn new(input: &Shape, kernel: &Shape) -> Result<ConvShape> {
        let (batch, c_in, height, width) = input.dims4()?;
        let (c_out, k_in, kh, kw) = kernel.dims4()?;
        if k_in != c_in || kh > height || kw > width {
            candle_core::bail!("conv2d: input {input:?} does not fit kernel {kernel:?}");
        }
        Ok(ConvShape {
            batch,
            c_in,
            height,
            width,
            c_out,
            kh,
            kw,
        })
    }

    pub(super) fn out_h(&self) -> usize {
        self.height - self.kh + 1
    }

    pub(super) fn out_w(&self) -> usize {
        self.width - self.kw + 1
    }

    /// Output positions per image.
    fn positions(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Kernel taps per output: the GEMM's inner dimension.
    pub(super) fn taps(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    pub(super) fn input_len(&self) -> usize {
        self.c_in * self.height * self.width
    }

    pub(super) fn output_len(&self) -> usize {
        self.c_out * self.positions()
    }

    /// Unfolds one image into `cols` (taps x positions): row (c, ky, kx) holds the
    /// input pixel each output position sees through that tap.
    fn im2col(&self, image: &[f32], cols: &mut [f32]) {
        if narrow_rows::applies(self) {
            return narrow_rows::im2col(self, image, cols);
        }
        self.im2col_rows(image, cols);
    }

    /// [`Self::im2col`] row by row, on any CPU.
    fn im2col_rows(&self, image: &[f32], cols: &mut [f32]) {
        let (oh, ow, p) = (self.out_h(), self.out_w(), self.positions());
        for c in 0..self.c_in {
            let plane = &image[c * self.height * self.width..][..self.height * self.width];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut cols[((c * self.kh + ky) * self.kw + kx) * p..][..p];
                    for oy in 0..oh {
                        let src = &plane[(oy + ky) * self.width + kx..][..ow];
                        copy_row(&mut row[oy * ow..][..ow], src);
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col`]: adds each column entry back onto its pixel.
    fn col2im(&self, cols: &[f32], image: &mut [f32]) {
        if narrow_rows::applies(self) {
            return narrow_rows::col2im(self, cols, image);
        }
        self.col2im_rows(cols, image);
    }

    /// [`Self::col2im`] row by row, on any CPU.
    fn col2im_rows(&self, cols: &[f32], image: &mut [f32]) {
        let (oh, ow, p) = (self.out_h(), self.out_w(), self.positions());
        image.fill(0.0);
        for c in 0..self.c_in {
            let plane = &mut image[c * self.height * self.width..][..self.height * self.width];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &cols[((c * self.kh + ky) * self.kw + kx) * p..][..p];
                    for oy in 0..oh {
                        let dst = &mut plane[(oy + ky) * self.width + kx..][..ow];
                        for (d, s) in dst.iter_mut().zip(&row[oy * ow..][..ow]) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }

    /// A kernel as large as the image leaves one position: the convolution is
    /// then a fully connected layer, best done as one GEMM over the batch.
    fn is_dense(&self) -> bool {
        self.positions() == 1
    }
}

/// The convolutions themselves, on slices whose shapes [`ConvShape`] has checked.
impl ConvShape {
    /// `conv2d(x, w) + b` for the whole batch.
    pub(super) fn forward(&self, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let s = self;
        let mut out = output_buffer(s.batch * s.output_len());
        let (taps, p) = (s.taps(), s.positions());
        if s.is_dense() {
            // out (n x o) = x (n x taps) . w^T (taps x o)
            let dims = (s.batch, s.c_out, taps);
            matmul(
                dims,
                &mut out,
                (s.c_out, 1),
                x,
                (taps, 1),
                w,
                (1, taps),
                false,
                threads(),
            );
        } else if one_channel::applies(s) {
            out.par_chunks_mut(s.output_len())
                .zip(x.par_chunks(s.input_len()))
                .for_each(|(out, image)| one_channel::forward(s, image, w, b, out));
            return out;
        } else {
            out.par_chunks_mut(s.output_len())
                .zip(x.par_chunks(s.input_len()))
                .for_each_init(
                    || output_buffer(taps * p),
                    |cols, (out, image)| {
                        s.im2col(image, cols);
                        // out (o x p) = w (o x taps) . cols (taps x p)
                        let dims = (s.c_out, p, taps);
                        matmul(
                            dims,
                            out,
                            (p, 1),
                            w,
                            (taps, 1),
                            cols,
                            (p, 1),
                            false,
                            Parallelism::None,
                        );
                    },
                );
        }
        out.par_chunks_mut(task_len(s.output_len()))
            .for_each(|images| {
                for (plane, &bias) in images.chunks_mut(p).zip(b.iter().cycle()) {
                    plane.iter_mut().for_each(|v| *v += bias);
                }
            });
        out
    }

    /// The weight gradient, `(o, c, kh, kw)`, from the inputs and the output gradient.
    pub(super) fn weight_gradient(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let s = self;
        let taps = s.taps();
        if s.is_dense() {
            // grad_w (o x taps) = grad_out^T (o x n) . x (n x taps)
            let mut grad_w = output_buffer(s.c_out * taps);
            let dims = (s.c_out, taps, s.batch);
            matmul(
                dims,
                &mut grad_w,
                (taps, 1),
                g,
                (1, s.c_out),
                x,
                (taps, 1),
                false,
                threads(),
            );
            grad_w
        } else {
            // Each half of the images sums its contributions, in parallel; the
            // two partial sums are then added. Always two, whatever the
            // threads, so the result does not depend on them.
            let per_part = s.batch.div_ceil(2).max(1);
            x.par_chunks(s.input_len() * per_part)
                .zip(g.par_chunks(s.output_len() * per_part))
                .map(|(images, grads)| s.partial_weight_gradient(images, grads))
                .reduce_with(|mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                })
                .unwrap_or_else(|| vec![0f32; s.c_out * taps])
        }
    }

    /// The weight gradient's sum over some images (one part's share):
    /// straight from the images for one channel, else im2col and a GEMM each.
    fn partial_weight_gradient(&self, images: &[f32], grads: &[f32]) -> Vec<f32> {
        let s = self;
        let pairs = images
            .chunks(s.input_len())
            .zip(grads.chunks(s.output_len()));
        if one_channel::applies(s) {
            let mut sum = one_channel::WeightGradient::new(s);
            for (image, grad_out) in pairs {
                sum.add(s, image, grad_out);
            }
            return sum.finish();
        }
        let (taps, p) = (s.taps(), s.positions());
        let mut cols = output_buffer(taps * p);
        // The first image's GEMM writes it, the others add to it.
        let mut partial = output_buffer(s.c_out * taps);
        for (k, (image, grad_out)) in pairs.enumerate() {
            s.im2col(image, &mut cols);
            // partial (o x taps) += grad_out (o x p) . cols^T (p x taps)
            let dims = (s.c_out, taps, p);
            matmul(
                dims,
                &mut partial,
                (taps, 1),
                grad_out,
                (p, 1),
                &cols,
                (1, p),
                k > 0,
                Parallelism::None,
            );
        }
        partial
    }

    /// The input gradient, `(n, c, h, w)`, from the output gradient and the kernel.
    pub(super) fn input_gradient(&self, g: &[f32], w: &[f32]) -> Vec<f32> {
        let mut grad_x = output_buffer(self.batch * self.input_len());
        self.input_gradient_into(g, w, &mut grad_x);
        grad_x
    }

    /// [`Self::input_gradient`], written whole into `grad_x`.
    pub(super) fn input_gradient_into(&self, g: &[f32], w: &[f32], grad_x: &mut [f32]) {
        let s = self;
        let (taps, p) = (s.taps(), s.positions());
        if s.is_dense() {
            // grad_x (n x taps) = grad_out (n x o) . w (o x taps)
            let dims = (s.batch, taps, s.c_out);
            matmul(
                dims,
                grad_x,
                (taps, 1),
                g,
                (s.c_out, 1),
                w,
                (taps, 1),
                false,
                threads(),
            );
        } else {
            grad_x
                .par_chunks_mut(s.input_len())
                .zip(g.par_chunks(s.output_len()))
                .for_each_init(
                    || output_buffer(taps * p),
                    |cols, (grad_image, grad_out)| {
                        // cols (taps x p) = w^T (taps x o) . grad_out (o x p)
                        let dims = (taps, p, s.c_out);
                        matmul(
                            dims,
                            cols,
                            (p, 1),
                            w,
                            (1, taps),
                            grad_out,
                            (p, 1),
                            false,
                            Parallelism::None,
                        );
                        s.col2im(cols, grad_image);
                    },
                );
        }
    }
}

/// `conv2d(x, w) + b`, valid padding, stride 1: x `(n, c, h, w)`, w `(o, c, kh, kw)`, b `(o,)`.
pub(super) struct Conv2d;

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "mnist-lab-conv2d"
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
        let s = ConvShape::new(xl.shape(), wl.shape())?;
        let (x, w, b) = (
            f32_data(xs, xl, self.name())?,
            f32_data(ws, wl, self.name())?,
            f32_data(bs, bl, self.name())?,
        );
        if b.len() != s.c_out {
            candle_core::bail!(
                "conv2d: bias has {} entries for {} channels",
                b.len(),
                s.c_out
            );
        }
        let out = s.forward(x, w, b);
        Ok((
            CpuStorage::F32(out),
            Shape::from((s.batch, s.c_out, s.out_h(), s.out_w())),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_out = grad_out.contiguous()?;
        // The first layer's input is the image batch: nothing upstream needs its gradient.
        let grad_x = if x.track_op() {
            Some(grad_out.apply_op2_no_bwd(w, &Conv2dGradInput)?)
        } else {
            None
        };
        let grad_w = x.apply_op2_no_bwd(
            &grad_out,
            &Conv2dGradKernel {
                kernel: w.shape().clone(),
            },
        )?;
        let grad_b = grad_out.apply_op1_no_bwd(&ChannelSum)?;
        Ok((grad_x, Some(grad_w), Some(grad_b)))
    }
}

/// Gradient of [`Conv2d`] with respect to its input, from (grad_out, w).
struct Conv2dGradInput;

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "mnist-lab-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, _, oh, ow) = gl.shape().dims4()?;
        let (_, c_in, kh, kw) = wl.shape().dims4()?;
        let input = Shape::from((batch, c_in, oh + kh - 1, ow + kw - 1));
        let s = ConvShape::new(&input, wl.shape())?;
        let (g, w) = (
            f32_data(gs, gl, self.name())?,
            f32_data(ws, wl, self.name())?,
        );
        let grad_x = s.input_gradient(g, w);
        Ok((CpuStorage::F32(grad_x), input))
    }
}

/// Gradient of [`Conv2d`] with respect to its kernel, from (x, grad_out).
struct Conv2dGradKernel {
    kernel: Shape,
}

impl CustomOp2 for Conv2dGradKernel {
    fn name(&self) -> &'static str {
        "mnist-lab-conv2d-grad-kernel"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = ConvShape::new(xl.shape(), &self.kernel)?;
        let (x, g) = (
            f32_data(xs, xl, self.name())?,
            f32_data(gs, gl, self.name())?,
        );
        let grad_w = s.weight_gradient(x, g);
        Ok((CpuStorage::F32(grad_w), self.kernel.clone()))
    }
}

/// Sum over batch and positions per channel, `(n, c, h, w) -> (c,)`: the bias
/// gradient. (Candle's reduction over non-trailing dimensions is slow on the CPU.)
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "mnist-lab-channel-sum"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = xl.shape().dims4()?;
        let x = f32_data(xs, xl, self.name())?;
        Ok((CpuStorage::F32(channel_sum(x, c, h * w)), Shape::from(c)))
    }
}

/// Per-channel sums of `(n, c, positions)` data. Plane sums in parallel, then
/// added per channel in image order: the same result whatever the thread count.
pub(super) fn channel_sum(x: &[f32], c: usize, positions: usize) -> Vec<f32> {
    let planes: Vec<f32> = x
        .par_chunks(task_len(positions))
        .flat_map_iter(|planes| {
            planes
                .chunks_exact(positions)
                .map(|p| lane_sum(p, p, |v, _| v))
        })
        .collect();
    let mut sums = vec![0f32; c];
    for (i, plane) in planes.iter().enumerate() {
        sums[i % c] += plane;
    }
    sums
}

/// Copies one im2col row. LeNet5's rows are 28 or 10 values: as fixed-size
/// copies they compile to a few vector moves instead of a `memcpy` call per row.
#[inline(always)]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32]) -> bool {
        match (<&mut [f32; N]>::try_from(dst), <&[f32; N]>::try_from(src)) {
            (Ok(d), Ok(s)) => {
                *d = *s;
                true
            }
            _ => false,
        }
    }
    let done = match dst.len() {
        28 => fixed::<28>(dst, src),
        10 => fixed::<10>(dst, src),
        _ => false,
    };
    if !done {
        dst.copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::conv2d;
    use crate::kernels::testing::{max_diff, on_the_kernel_path, random};
    use candle_core::Var;

    /// Forward and all three gradients of our conv against Candle's, through a
    /// weighted sum so every output position gets a different gradient.
    fn check_conv(x_shape: &[usize], w_shape: &[usize]) {
        on_the_kernel_path();
        let x = Var::from_tensor(&random(x_shape, 1)).unwrap();
        let w = Var::from_tensor(&random(w_shape, 2)).unwrap();
        let b = Var::from_tensor(&random(&w_shape[..1], 3)).unwrap();
        let ours = conv2d(&x, &w, &b).unwrap();
        let reference = x
            .conv2d(&w, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        assert!(
            max_diff(&ours, &reference) < 1e-4,
            "forward {x_shape:?} {w_shape:?}"
        );
        let weights = random(ours.dims(), 4);
        let grads_ours = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads_ref = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, r) = (grads_ours.get(var).unwrap(), grads_ref.get(var).unwrap());
            assert!(
                max_diff(a, r) < 1e-3,
                "grad {name} {x_shape:?} {w_shape:?}: {}",
                max_diff(a, r)
            );
        }
    }

    #[test]
    fn conv2d_matches_candle_forward_and_backward() {
        check_conv(&[3, 1, 32, 32], &[6, 1, 5, 5]);
        check_conv(&[2, 6, 14, 14], &[16, 6, 5, 5]);
        check_conv(&[5, 16, 5, 5], &[120, 16, 5, 5]);
        check_conv(&[1, 2, 7, 9], &[3, 2, 3, 4]);
        // Many images per thread: the weight gradient's per-thread partial sums.
        check_conv(&[37, 6, 14, 14], &[16, 6, 5, 5]);
    }

    /// One-channel images take their own kernels where the CPU has AVX-512:
    /// rows of one or two partly filled vectors, channel groups of six and the
    /// rest, kernel rows wider than eight taps.
    #[test]
    fn one_channel_conv2d_matches_candle() {
        check_conv(&[2, 1, 20, 20], &[7, 1, 3, 3]);
        check_conv(&[3, 1, 12, 9], &[2, 1, 3, 3]);
        check_conv(&[2, 1, 16, 34], &[13, 1, 4, 3]);
        check_conv(&[2, 1, 11, 20], &[3, 1, 2, 10]);
        check_conv(&[9, 1, 32, 32], &[6, 1, 5, 5]);
    }

    /// Narrow images take vector im2col and col2im where the CPU has AVX-512:
    /// the same values as the row-by-row loops, bit for bit.
    #[test]
    fn narrow_rows_equal_the_row_by_row_loops() {
        use super::ConvShape;
        use candle_core::Shape;
        for (x, w) in [
            ([1, 6, 14, 14], [16, 6, 5, 5]),
            ([1, 2, 7, 9], [3, 2, 3, 4]),
            ([1, 1, 16, 16], [2, 1, 1, 16]),
        ] {
            let s = ConvShape::new(&Shape::from(&x[..]), &Shape::from(&w[..])).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let image: Vec<f32> = (0..s.input_len())
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let cols_len = s.taps() * s.out_h() * s.out_w();
            let (mut fast, mut rows) = (vec![f32::NAN; cols_len], vec![f32::NAN; cols_len]);
            s.im2col(&image, &mut fast);
            s.im2col_rows(&image, &mut rows);
            assert_eq!(bits(&fast), bits(&rows), "im2col {x:?} {w:?}");
            let cols: Vec<f32> = (0..cols_len).map(|i| (i as f32 * 0.11).cos()).collect();
            let (mut fast, mut rows) =
                (vec![f32::NAN; s.input_len()], vec![f32::NAN; s.input_len()]);
            s.col2im(&cols, &mut fast);
            s.col2im_rows(&cols, &mut rows);
            assert_eq!(bits(&fast), bits(&rows), "col2im {x:?} {w:?}");
        }
    }

    #[test]
    fn conv2d_skips_the_gradient_of_a_plain_input() {
        let x = random(&[2, 1, 8, 8], 1);
        let w = Var::from_tensor(&random(&[2, 1, 3, 3], 2)).unwrap();
        let b = Var::from_tensor(&random(&[2], 3)).unwrap();
        let grads = conv2d(&x, &w, &b)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&w).is_some());
    }
}
