//! The tail every hidden layer shares, as one op: a per-channel normalisation
//! (BatchNorm with batch statistics, or a fixed affine map), tanh, and optionally
//! 2x2 max-pooling. One pass forward (pooling picks each window's largest
//! normalised value, then takes one tanh); one backward op that reuses the
//! output and what the forward kept (which input won each pooling window, the
//! batch statistics) instead of a chain of Candle ops each with its own gradient
//! buffers.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::activation::fast_tanh;
use super::halves::Meeting;
use super::pool;
use super::{f32_data, output_buffer, task_len};

/// How `z` is normalised per channel before tanh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// BatchNorm in training mode: the batch's own mean and variance, then the
    /// (weight, bias) inputs; gradients for all three inputs.
    Batch { eps: f32 },
    /// `z * scale + shift` with the (scale, shift) inputs held fixed: BatchNorm in
    /// evaluation mode, or the identity (ones, zeros) without BatchNorm.
    Affine,
}

/// What the forward pass keeps for the backward pass and the running statistics.
#[derive(Debug, Default)]
pub struct Saved {
    /// For each pooled output, which of its window's four inputs was largest.
    winners: Vec<u8>,
    /// Per-channel batch mean and biased variance (BatchNorm only).
    pub means: Vec<f32>,
    pub vars: Vec<f32>,
    /// Values per channel they were taken over: the whole batch's, when this
    /// pass is one half of it.
    pub count: usize,
}

/// `(n, c, positions)` of a `(n, c, ...)` shape.
pub(super) fn channel_dims(shape: &Shape) -> Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("activation: expected at least 2 dimensions, got {dims:?}");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// Sum of `f(a[i], b[i])` in eight independent lanes, so the compiler vectorises it.
#[inline(always)]
pub(super) fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
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

/// Per-channel constants handed to the elementwise functions below.
type Params = [f32; 4];

/// Per-channel sums over batch and positions of `f(a[i], b[i], channel)`. Planes
/// (or, with one position per channel, rows) are summed in f32 lanes and the
/// totals in f64; threads take whole images.
fn channel_sums(
    a: &[f32],
    b: &[f32],
    (_, c, s): (usize, usize, usize),
    params: &[Params],
    f: impl Fn(f32, f32, Params) -> f32 + Sync,
) -> Vec<f64> {
    let task = task_len(c * s);
    a.par_chunks(task)
        .zip(b.par_chunks(task))
        .fold(
            || vec![0f64; c],
            |mut totals, (images_a, images_b)| {
                if s == 1 {
                    // (n, c): sum rows into per-channel f32 lanes.
                    let mut row_sums = vec![0f32; c];
                    for (ra, rb) in images_a.chunks_exact(c).zip(images_b.chunks_exact(c)) {
                        for (ch, sum) in row_sums.iter_mut().enumerate() {
                            *sum += f(ra[ch], rb[ch], params[ch]);
                        }
                    }
                    totals
                        .iter_mut()
                        .zip(row_sums)
                        .for_each(|(t, r)| *t += r as f64);
                } else {
                    for (i, (pa, pb)) in images_a.chunks(s).zip(images_b.chunks(s)).enumerate() {
                        let (ch, p) = (i % c, params[i % c]);
                        totals[ch] += lane_sum(pa, pb, |x, y| f(x, y, p)) as f64;
                    }
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

/// `out[i] = f(a[i], b[i], channel of i)` over `(n, c, s)` data, threaded over
/// images and vectorisable along planes, or along rows when `s == 1`.
// Inlined into each caller so that the closure is too, and the loops vectorise.
#[inline(always)]
fn channel_map(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    (_, c, s): (usize, usize, usize),
    params: &[Params],
    f: impl Fn(f32, f32, Params) -> f32 + Sync,
) {
    let task = task_len(c * s);
    out.par_chunks_mut(task)
        .zip(a.par_chunks(task).zip(b.par_chunks(task)))
        .for_each(|(out, (a, b))| {
            let chunk = ChannelChunk {
                out,
                a,
                b,
                channels: c,
                plane: s,
                params,
                f: &f,
            };
            pulp::Arch::new().dispatch(chunk);
        });
}

/// One task of [`channel_map`]. As a [`pulp::WithSimd`] its loops are compiled
/// once per vector unit (AVX-512, AVX2, ...) and the widest present runs.
struct ChannelChunk<'a, F> {
    out: &'a mut [f32],
    a: &'a [f32],
    b: &'a [f32],
    channels: usize,
    plane: usize,
    params: &'a [Params],
    f: &'a F,
}

impl<F: Fn(f32, f32, Params) -> f32> pulp::WithSimd for ChannelChunk<'_, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let ChannelChunk {
            out,
            a,
            b,
            channels: c,
            plane: s,
            params,
            f,
        } = self;
        if s == 1 {
            // (n, c): along a row the channel is the position. The constants are
            // split into one array per field so that each loads as a vector.
            let field = |k: usize| -> Vec<f32> { params.iter().map(|p| p[k]).collect() };
            let (p0, p1, p2, p3) = (field(0), field(1), field(2), field(3));
            for (out, (a, b)) in out.chunks_mut(c).zip(a.chunks(c).zip(b.chunks(c))) {
                let (a, b) = (&a[..out.len()], &b[..out.len()]);
                let (p0, p1, p2, p3) = (
                    &p0[..out.len()],
                    &p1[..out.len()],
                    &p2[..out.len()],
                    &p3[..out.len()],
                );
                for ch in 0..out.len() {
                    out[ch] = f(a[ch], b[ch], [p0[ch], p1[ch], p2[ch], p3[ch]]);
                }
            }
        } else {
            let planes = out.chunks_mut(s).zip(a.chunks(s).zip(b.chunks(s)));
            for (i, (out, (a, b))) in planes.enumerate() {
                // One channel's constants, read once per plane.
                let p = params[i % c];
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    *o = f(x, y, p);
                }
            }
        }
    }
}

/// `sums`, with the other half's added when this pass is half a batch.
fn whole_batch(sums: Vec<f64>, meeting: Option<&Meeting>) -> Result<Vec<f64>> {
    match meeting {
        Some(meeting) => meeting.add(sums),
        None => Ok(sums),
    }
}

/// Per-channel mean and biased variance (two passes, for accuracy) over the
/// whole batch, and the values per channel they were taken over.
fn channel_moments(
    x: &[f32],
    dims: (usize, usize, usize),
    meeting: Option<&Meeting>,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    let none = vec![[0f32; 4]; dims.1];
    // The count travels with the sums: the halves may differ by one image.
    let mut sums = channel_sums(x, x, dims, &none, |v, _, _| v);
    sums.push((dims.0 * dims.2) as f64);
    let mut sums = whole_batch(sums, meeting)?;
    let count = sums.pop().unwrap_or(0.0);
    let means: Vec<f32> = sums.iter().map(|sum| (sum / count) as f32).collect();
    let centres: Vec<Params> = means.iter().map(|&m| [m, 0.0, 0.0, 0.0]).collect();
    let squares = channel_sums(x, x, dims, &centres, |v, _, [m, ..]| (v - m) * (v - m));
    let vars = whole_batch(squares, meeting)?
        .into_iter()
        .map(|sum| (sum / count) as f32)
        .collect();
    Ok((means, vars, count as usize))
}

/// Normalise, tanh and (optionally) pool: inputs (z, weight or scale, bias or shift).
pub(super) struct Activation {
    pub norm: Norm,
    pub pool: bool,
    pub saved: Arc<Mutex<Saved>>,
    /// Where BatchNorm meets the batch's other half, when this is one.
    pub meeting: Option<Meeting>,
}

impl Activation {
    /// Each channel's `(scale, shift)` before tanh: from the batch's moments
    /// (kept in `saved` for the backward pass) or the fixed affine map.
    fn channel_affine(
        &self,
        z: &[f32],
        dims: (usize, usize, usize),
        (w, b): (&[f32], &[f32]),
        saved: &mut Saved,
    ) -> Result<Vec<Params>> {
        let c = dims.1;
        let affine: Vec<(f32, f32)> = match self.norm {
            Norm::Batch { eps } => {
                (saved.means, saved.vars, saved.count) =
                    channel_moments(z, dims, self.meeting.as_ref())?;
                (0..c)
                    .map(|ch| {
                        let scale = w[ch] / (saved.vars[ch] + eps).sqrt();
                        (scale, b[ch] - saved.means[ch] * scale)
                    })
                    .collect()
            }
            Norm::Affine => w.iter().copied().zip(b.iter().copied()).collect(),
        };
        Ok(affine
            .into_iter()
            .map(|(scale, shift)| [scale, shift, 0.0, 0.0])
            .collect())
    }
}

impl Activation {
    /// The forward pass over `z` of `shape` with per-channel `(w, b)` (BatchNorm's
    /// weight and bias, or a fixed scale and shift); keeps in `self.saved` what
    /// the backward pass needs.
    pub(super) fn apply(
        &self,
        z: &[f32],
        shape: &Shape,
        (w, b): (&[f32], &[f32]),
    ) -> Result<(Vec<f32>, Shape)> {
        let dims = channel_dims(shape)?;
        let (n, c, _) = dims;
        if w.len() != c || b.len() != c {
            candle_core::bail!(
                "activation: {c} channels but {} and {} parameters",
                w.len(),
                b.len()
            );
        }
        let mut saved = Saved::default();
        let affine = self.channel_affine(z, dims, (w, b), &mut saved)?;
        let (out, shape) = if self.pool {
            let (h, w) = pool_input(shape)?;
            let (out, winners) = affine_tanh_pool(z, (n, c, h, w), &affine);
            saved.winners = winners;
            (out, Shape::from((n, c, h / 2, w / 2)))
        } else {
            let mut activated = output_buffer(z.len());
            channel_map(
                &mut activated,
                z,
                z,
                dims,
                &affine,
                |z, _, [scale, shift, ..]| fast_tanh(z * scale + shift),
            );
            (activated, shape.clone())
        };
        *self.saved.lock().expect("activation state lock") = saved;
        Ok((out, shape))
    }
}

impl CustomOp3 for Activation {
    fn name(&self) -> &'static str {
        "mnist-lab-activation"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let z = f32_data(zs, zl, self.name())?;
        let (w, b) = (
            f32_data(ws, wl, self.name())?,
            f32_data(bs, bl, self.name())?,
        );
        let (out, shape) = self.apply(z, zl.shape(), (w, b))?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        z: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = ActivationGrad {
            norm: self.norm,
            pool: self.pool,
            weight: w.to_vec1::<f32>()?,
            saved: self.saved.clone(),
            meeting: self.meeting.clone(),
        };
        let packed = z.apply_op3_no_bwd(out, &grad_out.contiguous()?, &grad)?;
        let (len, c) = (z.elem_count(), w.elem_count());
        let grad_z = packed.narrow(0, 0, len)?.reshape(z.shape())?;
        match self.norm {
            Norm::Batch { .. } => Ok((
                Some(grad_z),
                Some(packed.narrow(0, len, c)?),
                Some(packed.narrow(0, len + c, c)?),
            )),
            // The affine map's parameters are constants here.
            Norm::Affine => Ok((Some(grad_z), None, None)),
        }
    }
}

/// The (height, width) of a pooling input, which must be even.
fn pool_input(shape: &Shape) -> Result<(usize, usize)> {
    let (_, _, h, w) = shape.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("max-pool 2x2: height and width must be even, got {h}x{w}");
    }
    Ok((h, w))
}

/// 2x2 max-pooling of `tanh(z * scale + shift)` over `(n, c, h, w)` data, with
/// each channel's `[scale, shift, ..]`; also returns, per output, which window
/// position (0..4, row-major) held the maximum (the first, on ties). tanh is
/// increasing, so a window's maximum is the tanh of its largest affine value:
/// one tanh per output instead of four, and no full-size buffer in between.
fn affine_tanh_pool(
    z: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    affine: &[Params],
) -> (Vec<f32>, Vec<u8>) {
    let (oh, ow) = (h / 2, w / 2);
    let planes = n * c;
    let mut out = output_buffer(planes * oh * ow);
    let mut winners = vec![0u8; planes * oh * ow];
    let per_task = (planes / rayon::current_num_threads().max(1)).max(1);
    out.par_chunks_mut(oh * ow * per_task)
        .zip(winners.par_chunks_mut(oh * ow * per_task))
        .zip(z.par_chunks(h * w * per_task))
        .enumerate()
        .for_each(|(task, ((out, winners), z))| {
            let planes = out
                .chunks_mut(oh * ow)
                .zip(winners.chunks_mut(oh * ow))
                .zip(z.chunks(h * w));
            for (i, ((out, winners), plane)) in planes.enumerate() {
                let [scale, shift, ..] = affine[(task * per_task + i) % c];
                let rows = out.chunks_exact_mut(ow).zip(winners.chunks_exact_mut(ow));
                for (oy, (out, winners)) in rows.enumerate() {
                    let (top, bottom) =
                        (&plane[2 * oy * w..][..w], &plane[(2 * oy + 1) * w..][..w]);
                    pool::pool_row_pair((top, bottom), (scale, shift), out, winners);
                }
                // tanh over the whole plane at once: a loop the compiler vectorises.
                out.iter_mut().for_each(|v| *v = fast_tanh(*v));
            }
        });
    (out, winners)
}

/// Gradients of [`Activation`] from (z, its output, the output's gradient),
/// packed as `[grad_z..., grad_weight..., grad_bias...]`.
pub(super) struct ActivationGrad {
    pub norm: Norm,
    pub pool: bool,
    /// BatchNorm's weight, or the fixed scale.
    pub weight: Vec<f32>,
    pub saved: Arc<Mutex<Saved>>,
    /// As in [`Activation`]: the backward sums are the whole batch's too.
    pub meeting: Option<Meeting>,
}

impl ActivationGrad {
    /// Gradient with respect to the tanh input: `grad_out * (1 - a^2)`, routed
    /// through the pooling windows' winners when pooling.
    fn pre_tanh_grad(
        &self,
        saved: &Saved,
        out: &[f32],
        g: &[f32],
        z_shape: &Shape,
    ) -> Result<Vec<f32>> {
        if !self.pool {
            return Ok(out
                .iter()
                .zip(g)
                .map(|(&a, &g)| g * (1.0 - a * a))
                .collect());
        }
        let (h, w) = pool_input(z_shape)?;
        let (oh, ow) = (h / 2, w / 2);
        // Only each window's winner gets a gradient, and its tanh value is the
        // pooled output.
        let mut grad = output_buffer(z_shape.elem_count());
        grad.par_chunks_mut(h * w)
            .zip(out.par_chunks(oh * ow))
            .zip(saved.winners.par_chunks(oh * ow).zip(g.par_chunks(oh * ow)))
            .with_min_len(task_len(h * w) / (h * w))
            .for_each(|((grad, a), (winners, g))| {
                for (oy, rows) in grad.chunks_exact_mut(2 * w).enumerate() {
                    let (top, bottom) = rows.split_at_mut(w);
                    let window_row = oy * ow..(oy + 1) * ow;
                    let row = (
                        &g[window_row.clone()],
                        &a[window_row.clone()],
                        &winners[window_row],
                    );
                    pool::unpool_row_pair(row, top, bottom);
                }
            });
        Ok(grad)
    }
}

impl ActivationGrad {
    /// BatchNorm's backward through the batch statistics: the gradient of the
    /// pre-normalisation values into `grad_z`, and of the scale and shift into
    /// `grad_params` (`c` each). For half a batch, `grad_z` takes the whole
    /// batch's sums, and the scale and shift get this half's share.
    fn batch_norm_grad(
        &self,
        saved: &Saved,
        (z, dt): (&[f32], &[f32]),
        dims: (usize, usize, usize),
        eps: f32,
        (grad_z, grad_params): (&mut [f32], &mut [f32]),
    ) -> Result<()> {
        let c = dims.1;
        let (means, vars) = (&saved.means, &saved.vars);
        let inv_std: Vec<f32> = vars.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let centred: Vec<Params> = means
            .iter()
            .zip(&inv_std)
            .map(|(&m, &inv)| [m, inv, 0.0, 0.0])
            .collect();
        let sum_dt = channel_sums(dt, dt, dims, &centred, |d, _, _| d);
        let sum_dt_xhat = channel_sums(dt, z, dims, &centred, |d, z, [m, inv, ..]| {
            d * (z - m) * inv
        });
        let to_f32 = |sums: &[f64]| -> Vec<f32> { sums.iter().map(|&v| v as f32).collect() };
        // This pass's own sums (its share of the scale's and shift's
        // gradients) and, for half a batch, the whole batch's.
        let own = [to_f32(&sum_dt_xhat), to_f32(&sum_dt)];
        let whole = match &self.meeting {
            Some(meeting) => {
                let total = meeting.add([sum_dt_xhat, sum_dt].concat())?;
                Some([to_f32(&total[..c]), to_f32(&total[c..])])
            }
            None => None,
        };
        let [sum_dt_xhat, sum_dt] = whole.as_ref().unwrap_or(&own);
        let count = saved.count as f32;
        let params: Vec<Params> = (0..c)
            .map(|ch| {
                let inv = inv_std[ch];
                let k = self.weight[ch] * inv / count;
                // dz = k * (count * dt - sum_dt - x_hat * sum_dt_xhat)
                [means[ch], inv * sum_dt_xhat[ch], k, k * sum_dt[ch]]
            })
            .collect();
        channel_map(
            grad_z,
            z,
            dt,
            dims,
            &params,
            |z, dt, [m, inv_sdx, k, k_sd]| k * count * dt - k_sd - k * (z - m) * inv_sdx,
        );
        let [own_dt_xhat, own_dt] = own;
        grad_params[..c].copy_from_slice(&own_dt_xhat);
        grad_params[c..].copy_from_slice(&own_dt);
        Ok(())
    }
}

impl CustomOp3 for ActivationGrad {
    fn name(&self) -> &'static str {
        "mnist-lab-activation-grad"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        os: &CpuStorage,
        ol: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let z = f32_data(zs, zl, self.name())?;
        let out = f32_data(os, ol, self.name())?;
        let g = f32_data(gs, gl, self.name())?;
        let packed = self.packed_grads(z, zl.shape(), out, g)?;
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

impl ActivationGrad {
    /// `[grad_z..., grad_weight..., grad_bias...]` from `z` of `z_shape`, the
    /// forward's output and its gradient. The parameters' part is zero for a
    /// fixed affine map, which has no gradient.
    pub(super) fn packed_grads(
        &self,
        z: &[f32],
        z_shape: &Shape,
        out: &[f32],
        g: &[f32],
    ) -> Result<Vec<f32>> {
        let dims = channel_dims(z_shape)?;
        let c = dims.1;
        let saved = self.saved.lock().expect("activation state lock");
        let dt = self.pre_tanh_grad(&saved, out, g, z_shape)?;
        let mut packed = output_buffer(z.len() + 2 * c);
        let (grad_z, grad_params) = packed.split_at_mut(z.len());
        match self.norm {
            Norm::Affine => {
                let scales: Vec<Params> = self.weight.iter().map(|&w| [w, 0.0, 0.0, 0.0]).collect();
                channel_map(grad_z, &dt, &dt, dims, &scales, |dt, _, [scale, ..]| {
                    dt * scale
                });
                grad_params.fill(0.0);
            }
            Norm::Batch { eps } => {
                self.batch_norm_grad(&saved, (z, &dt), dims, eps, (grad_z, grad_params))?
            }
        }
        Ok(packed)
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::testing::{candle_tail as reference, max_diff, on_the_kernel_path, random};
    use crate::kernels::{BatchStats, Norm, activation};
    use candle_core::{DType, Device, Tensor, Var};

    fn check(shape: &[usize], norm: Norm, pool: bool) {
        on_the_kernel_path();
        let c = shape[1];
        let z = Var::from_tensor(&(random(shape, 1) * 2.0).unwrap()).unwrap();
        let w = Var::from_tensor(&(random(&[c], 2) + 1.5).unwrap()).unwrap();
        let b = Var::from_tensor(&random(&[c], 3)).unwrap();
        let (ours, stats) = activation(&z, norm, &w, &b, pool).unwrap();
        let theirs = reference(&z, &w, &b, norm, pool);
        let label = format!("{shape:?} {norm:?} pool={pool}");
        assert!(max_diff(&ours, &theirs) < 1e-5, "forward {label}");
        assert_eq!(
            stats.is_some(),
            matches!(norm, Norm::Batch { .. }),
            "{label}"
        );
        if let Some(BatchStats { means, vars, count }) = stats {
            assert_eq!(count, z.elem_count() / c, "values per channel {label}");
            // Per channel, over the batch and positions: the mean and the biased
            // variance (the running statistics make it unbiased later).
            let per_channel = z
                .as_tensor()
                .transpose(0, 1)
                .unwrap()
                .flatten_from(1)
                .unwrap();
            let mean = per_channel.mean(1).unwrap();
            let variance = per_channel
                .broadcast_sub(&mean.unsqueeze(1).unwrap())
                .unwrap()
                .sqr()
                .unwrap()
                .mean(1)
                .unwrap();
            let as_tensor = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
            assert!(max_diff(&as_tensor(&means), &mean) < 1e-5, "mean {label}");
            assert!(
                max_diff(&as_tensor(&vars), &variance) < 1e-4,
                "variance {label}"
            );
        }
        let weights = random(ours.dims(), 4);
        let a = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let r = (&theirs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_diff(a.get(&z).unwrap(), r.get(&z).unwrap());
        assert!(d < 1e-4, "grad z {label}: {d}");
        if matches!(norm, Norm::Batch { .. }) {
            for (name, var) in [("weight", &w), ("bias", &b)] {
                let d = max_diff(a.get(var).unwrap(), r.get(var).unwrap());
                assert!(d < 1e-3, "grad {name} {label}: {d}");
            }
        } else {
            assert!(a.get(&w).is_none() && a.get(&b).is_none(), "{label}");
        }
    }

    #[test]
    fn matches_candle_with_batch_norm_and_pooling() {
        check(&[8, 6, 8, 8], Norm::Batch { eps: 1e-5 }, true);
        check(&[4, 16, 10, 10], Norm::Batch { eps: 1e-5 }, true);
        // A training batch of the first layer: large enough to split across threads.
        check(&[64, 6, 28, 28], Norm::Batch { eps: 1e-5 }, true);
    }

    #[test]
    fn matches_candle_with_batch_norm_on_features() {
        check(&[16, 84], Norm::Batch { eps: 1e-5 }, false);
        check(&[5, 120, 1, 1], Norm::Batch { eps: 1e-5 }, false);
    }

    #[test]
    fn matches_candle_with_a_fixed_affine_map() {
        check(&[3, 6, 28, 28], Norm::Affine, true);
        check(&[7, 48], Norm::Affine, false);
    }

    #[test]
    fn a_tied_window_sends_its_gradient_once() {
        let z = Var::from_tensor(&Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let (ones, zeros) = (
            Tensor::ones(1, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let (y, _) = activation(&z, Norm::Affine, &ones, &zeros, true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = grads
            .get(&z)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let slope = 1.0 - 1f32.tanh().powi(2);
        assert!(
            (g[0] - slope).abs() < 1e-6 && g[1..] == [0.0, 0.0, 0.0],
            "{g:?}"
        );
    }

    /// MNIST's flat background makes ties in most windows of the first layer.
    /// Our rule, as PyTorch's: the gradient of a window goes to one winner, the
    /// first of its largest values in the order top-left, top-right,
    /// bottom-left, bottom-right. Candle's max-pool sends it to every tied value.
    #[test]
    fn on_real_digits_ties_send_the_gradient_to_the_first_winner_only() {
        on_the_kernel_path();
        let subset = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/mnist-subset");
        let test = crate::data::idx::read_test(std::path::Path::new(subset)).unwrap();
        let pixels: Vec<f32> = test.images[..8 * 784]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        let z = Var::from_tensor(&Tensor::from_vec(pixels, (8, 1, 28, 28), &Device::Cpu).unwrap())
            .unwrap();
        let (ones, zeros) = (
            Tensor::ones(1, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        let gradient_cells = |y: Tensor| -> Vec<f32> {
            let grads = y.sum_all().unwrap().backward().unwrap();
            grads
                .get(&z)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (y, _) = activation(&z, Norm::Affine, &ones, &zeros, true).unwrap();
        let ours = gradient_cells(y);
        let theirs = gradient_cells(reference(&z, &ones, &zeros, Norm::Affine, true));
        let inputs: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
        let (mut tied_windows, mut candle_extra) = (0, 0);
        for window in 0..8 * 14 * 14 {
            let (image, oy, ox) = (window / 196, window / 14 % 14, window % 14);
            let at = |dy: usize, dx: usize| image * 784 + (2 * oy + dy) * 28 + 2 * ox + dx;
            let cells = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
            let values = cells.map(|i| inputs[i]);
            let max = values.iter().cloned().fold(f32::MIN, f32::max);
            let first = values.iter().position(|&v| v == max).unwrap();
            let receiving: Vec<usize> = (0..4).filter(|&k| ours[cells[k]] != 0.0).collect();
            assert_eq!(receiving, vec![first], "window {window}: {values:?}");
            let candle_receiving = (0..4).filter(|&k| theirs[cells[k]] != 0.0).count();
            if values.iter().filter(|&&v| v == max).count() > 1 {
                tied_windows += 1;
                candle_extra += candle_receiving - 1;
            }
        }
        assert!(
            tied_windows > 8 * 100,
            "most windows of a digit are background: {tied_windows}"
        );
        assert!(
            candle_extra > 0,
            "Candle's path sends a tied window's gradient to every tie"
        );
    }
}
