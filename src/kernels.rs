//! Fast CPU kernels for the layers LeNet5 spends its time in, as Candle custom
//! ops with their own backward passes: convolution (im2col into a blocked GEMM
//! from the `gemm` crate, threaded over images), 2x2 max-pooling and tanh.
//!
//! The functions at the bottom ([`conv2d`], [`max_pool2x2`], [`tanh`]) pick these
//! kernels for CPU tensors and Candle's own ops elsewhere (CUDA), so models call
//! them without caring where they run.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// The contiguous f32 data of a CPU tensor argument.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 tensors");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) . rhs (k x n)`, each matrix given by its data
/// and (row stride, column stride), so transposes cost nothing.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (usize, usize),
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    let last = |(rs, cs): (usize, usize), rows: usize, cols: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(
        dst.len() >= last(dst_strides, m, n),
        "matmul: dst too small"
    );
    assert!(
        lhs.len() >= last(lhs_strides, m, k),
        "matmul: lhs too small"
    );
    assert!(
        rhs.len() >= last(rhs_strides, k, n),
        "matmul: rhs too small"
    );
    // SAFETY: the assertions above keep every index the strides reach in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_strides.1 as isize,
            dst_strides.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Sizes of a valid (unpadded), stride-1 convolution.
#[derive(Debug, Clone, Copy)]
struct ConvShape {
    batch: usize,
    c_in: usize,
    height: usize,
    width: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
}

impl ConvShape {
    fn new(input: &Shape, kernel: &Shape) -> Result<ConvShape> {
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

    fn out_h(&self) -> usize {
        self.height - self.kh + 1
    }

    fn out_w(&self) -> usize {
        self.width - self.kw + 1
    }

    /// Output positions per image.
    fn positions(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Kernel taps per output: the GEMM's inner dimension.
    fn taps(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn input_len(&self) -> usize {
        self.c_in * self.height * self.width
    }

    fn output_len(&self) -> usize {
        self.c_out * self.positions()
    }

    /// Unfolds one image into `cols` (taps x positions): row (c, ky, kx) holds the
    /// input pixel each output position sees through that tap.
    fn im2col(&self, image: &[f32], cols: &mut [f32]) {
        let (oh, ow, p) = (self.out_h(), self.out_w(), self.positions());
        for c in 0..self.c_in {
            let plane = &image[c * self.height * self.width..][..self.height * self.width];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut cols[((c * self.kh + ky) * self.kw + kx) * p..][..p];
                    for oy in 0..oh {
                        let src = &plane[(oy + ky) * self.width + kx..][..ow];
                        row[oy * ow..][..ow].copy_from_slice(src);
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col`]: adds each column entry back onto its pixel.
    fn col2im(&self, cols: &[f32], image: &mut [f32]) {
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

/// The thread pool the kernels run on, sized like Candle's (`--threads`).
fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads())
            .thread_name(|i| format!("mnist-lab-{i}"))
            .build()
            .expect("cannot start the kernel thread pool")
    })
}

/// Runs `work` (a training step, an evaluation) on the kernels' thread pool, so
/// the caller is one of its workers: parallel loops inside then need no hand-off
/// to another thread and back.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    pool().install(work)
}

fn threads() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// `conv2d(x, w) + b`, valid padding, stride 1: x `(n, c, h, w)`, w `(o, c, kh, kw)`, b `(o,)`.
struct Conv2d;

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
        let mut out = vec![0f32; s.batch * s.output_len()];
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
        } else {
            out.par_chunks_mut(s.output_len())
                .zip(x.par_chunks(s.input_len()))
                .for_each_init(
                    || vec![0f32; taps * p],
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
        out.par_chunks_mut(s.output_len()).for_each(|image| {
            for (plane, &bias) in image.chunks_mut(p).zip(b) {
                plane.iter_mut().for_each(|v| *v += bias);
            }
        });
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
        let (batch, c_out, oh, ow) = gl.shape().dims4()?;
        let (_, c_in, kh, kw) = wl.shape().dims4()?;
        let input = Shape::from((batch, c_in, oh + kh - 1, ow + kw - 1));
        let s = ConvShape::new(&input, wl.shape())?;
        let (g, w) = (
            f32_data(gs, gl, self.name())?,
            f32_data(ws, wl, self.name())?,
        );
        let (taps, p) = (s.taps(), s.positions());
        let mut grad_x = vec![0f32; batch * s.input_len()];
        if s.is_dense() {
            // grad_x (n x taps) = grad_out (n x o) . w (o x taps)
            let dims = (batch, taps, c_out);
            matmul(
                dims,
                &mut grad_x,
                (taps, 1),
                g,
                (c_out, 1),
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
                    || vec![0f32; taps * p],
                    |cols, (grad_image, grad_out)| {
                        // cols (taps x p) = w^T (taps x o) . grad_out (o x p)
                        let dims = (taps, p, c_out);
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
        let (taps, p) = (s.taps(), s.positions());
        let grad_w = if s.is_dense() {
            // grad_w (o x taps) = grad_out^T (o x n) . x (n x taps)
            let mut grad_w = vec![0f32; s.c_out * taps];
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
            // Each thread sums its images' contributions; the partial sums are then added.
            let per_thread = s.batch.div_ceil(rayon::current_num_threads()).max(1);
            x.par_chunks(s.input_len() * per_thread)
                .zip(g.par_chunks(s.output_len() * per_thread))
                .map(|(images, grads)| {
                    let mut cols = vec![0f32; taps * p];
                    let mut partial = vec![0f32; s.c_out * taps];
                    for (k, (image, grad_out)) in images
                        .chunks(s.input_len())
                        .zip(grads.chunks(s.output_len()))
                        .enumerate()
                    {
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
                })
                .reduce_with(|mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                })
                .unwrap_or_else(|| vec![0f32; s.c_out * taps])
        };
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
        let mut sums = vec![0f32; c];
        for (i, plane) in x.chunks_exact(h * w).enumerate() {
            sums[i % c] += plane.iter().sum::<f32>();
        }
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// 2x2 max-pooling with stride 2 over `(n, c, h, w)`, h and w even.
struct MaxPool2x2;

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
struct Tanh;

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

/// `conv2d(x, w) + b` (valid, stride 1), with the fast kernel on the CPU.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d)
    } else {
        x.conv2d(w, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)
    }
}

/// 2x2 max-pooling, stride 2.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(MaxPool2x2)
    } else {
        // Candle's max_pool2d backward scales gradients by 1/4; max over reshaped
        // windows routes them to the maxima unscaled.
        let (n, c, h, w) = x.dims4()?;
        x.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
    }
}

/// Elementwise tanh.
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1(Tanh)
    } else {
        x.tanh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward and all three gradients of our conv against Candle's, through a
    /// weighted sum so every output position gets a different gradient.
    fn check_conv(x_shape: &[usize], w_shape: &[usize]) {
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
