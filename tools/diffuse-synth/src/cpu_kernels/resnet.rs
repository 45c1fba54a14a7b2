//! The classifier-side kernels of FedCADO guidance, each with its input gradient:
//! eval-mode batch norm as a per-channel affine map, the per-channel batch statistics
//! that feed the BN-statistics loss, ReLU, and torch's 3x3 / stride 2 / pad 1 max-pool.
//! Inputs are [N, C, H, W] f32 on the CPU; one channel plane per task.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, f32_cpu, with_slice};

/// (N, C, H·W) of a contiguous [N, C, H, W] layout.
fn nchw(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        [n, c, h, w] => Ok((*n, *c, h * w)),
        d => candle_core::bail!("expected [N, C, H, W], got {d:?}"),
    }
}

/// A new buffer the size of `x`, filled plane by plane (one task per H·W plane):
/// `f(plane index, output plane, input plane)`; the channel is `plane % C`.
fn map_planes(x: &[f32], sp: usize, f: impl Fn(usize, &mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(sp)
        .zip(x.par_chunks(sp))
        .enumerate()
        .for_each(|(i, (o, xs))| f(i, o, xs));
    y
}

/// y = x · scale[c] + shift[c] (eval-mode batch norm).
struct ChannelAffine {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "ftk-channel-affine"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l)?;
        let (_, c, sp) = nchw(l)?;
        let y = map_planes(x, sp, |i, o, xs| {
            let (a, b) = (self.scale[i % c], self.shift[i % c]);
            o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v * a + b);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, c, h, w) = arg.dims4()?;
        let sp = h * w;
        let dx = with_slice(grad, |g| {
            Ok(map_planes(g, sp, |i, o, gs| {
                let a = self.scale[i % c];
                o.iter_mut().zip(gs).for_each(|(o, &v)| *o = v * a);
            }))
        })?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}

/// The per-channel ops take f32 [N, C, H, W] on the CPU with one scale per channel.
fn check_nchw(op: &str, x: &Tensor, c: usize) -> Result<()> {
    if !f32_cpu(x) || x.rank() != 4 || x.dim(1)? != c {
        candle_core::bail!("{op}: expected f32 [N, {c}, H, W], got {:?}", x.dims());
    }
    Ok(())
}

/// x · scale[c] + shift[c] for [N, C, H, W] x; constant scale and shift.
pub fn channel_affine(x: &Tensor, scale: &[f32], shift: &[f32]) -> Result<Tensor> {
    check_nchw("channel_affine", x, scale.len())?;
    let op = ChannelAffine {
        scale: scale.to_vec(),
        shift: shift.to_vec(),
    };
    x.contiguous()?.apply_op1(op)
}

/// relu(x · scale[c] + shift[c] (+ r)): eval-mode BN, the residual add of a block's
/// last BN and the ReLU after it, one pass and one node (with `r`: two inputs).
struct ChannelAffineRelu {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl ChannelAffineRelu {
    fn forward(&self, x: &[f32], r: Option<&[f32]>, c: usize, sp: usize) -> Vec<f32> {
        map_planes(x, sp, |i, o, xs| {
            let (a, b) = (self.scale[i % c], self.shift[i % c]);
            match r {
                // the same roundings as BN, then `+ identity`, then ReLU
                Some(r) => o
                    .iter_mut()
                    .zip(xs.iter().zip(&r[i * sp..(i + 1) * sp]))
                    .for_each(|(o, (&v, &rv))| *o = (v * a + b + rv).max(0.0)),
                None => o
                    .iter_mut()
                    .zip(xs)
                    .for_each(|(o, &v)| *o = (v * a + b).max(0.0)),
            }
        })
    }

    /// (dx, dr): the output gradient where the output is positive (torch's ReLU), times
    /// scale[c] for x.
    fn grads(
        &self,
        y: &[f32],
        g: &[f32],
        c: usize,
        sp: usize,
        with_r: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut dx = vec![0f32; g.len()];
        let planes = y.par_chunks(sp).zip(g.par_chunks(sp));
        if with_r {
            let mut dr = vec![0f32; g.len()];
            dx.par_chunks_mut(sp)
                .zip(dr.par_chunks_mut(sp))
                .zip(planes)
                .enumerate()
                .for_each(|(i, ((d, dr), (ys, gs)))| {
                    let a = self.scale[i % c];
                    for (((d, dr), &yv), &gv) in d.iter_mut().zip(dr.iter_mut()).zip(ys).zip(gs) {
                        let m = if yv > 0.0 { gv } else { 0.0 };
                        *dr = m;
                        *d = m * a;
                    }
                });
            return (dx, dr);
        }
        dx.par_chunks_mut(sp)
            .zip(planes)
            .enumerate()
            .for_each(|(i, (d, (ys, gs)))| {
                let a = self.scale[i % c];
                for ((d, &yv), &gv) in d.iter_mut().zip(ys).zip(gs) {
                    *d = if yv > 0.0 { gv * a } else { 0.0 };
                }
            });
        (dx, Vec::new())
    }
}

impl CustomOp1 for ChannelAffineRelu {
    fn name(&self) -> &'static str {
        "ftk-channel-affine-relu"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, sp) = nchw(l)?;
        let y = self.forward(contiguous_f32(st, l)?, None, c, sp);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, c, h, w) = arg.dims4()?;
        let (dx, _) = with_slice(res, |y| {
            with_slice(grad, |g| Ok(self.grads(y, g, c, h * w, false)))
        })?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}

impl candle_core::CustomOp2 for ChannelAffineRelu {
    fn name(&self) -> &'static str {
        "ftk-channel-affine-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, sp) = nchw(l1)?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "channel_affine_relu: residual {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let y = self.forward(
            contiguous_f32(s1, l1)?,
            Some(contiguous_f32(s2, l2)?),
            c,
            sp,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, c, h, w) = x.dims4()?;
        let (dx, dr) = with_slice(res, |y| {
            with_slice(grad, |g| Ok(self.grads(y, g, c, h * w, true)))
        })?;
        let dx = Tensor::from_vec(dx, x.dims(), &Device::Cpu)?;
        let dr = match r.track_op() {
            true => Some(Tensor::from_vec(dr, r.dims(), &Device::Cpu)?),
            false => None,
        };
        Ok((Some(dx), dr))
    }
}

/// relu(x · scale[c] + shift[c] + r) for [N, C, H, W] x (r the same shape, or none):
/// eval-mode BN, a ResNet block's residual add and its ReLU as one op.
pub fn channel_affine_relu(
    x: &Tensor,
    scale: &[f32],
    shift: &[f32],
    r: Option<&Tensor>,
) -> Result<Tensor> {
    check_nchw("channel_affine_relu", x, scale.len())?;
    let op = ChannelAffineRelu {
        scale: scale.to_vec(),
        shift: shift.to_vec(),
    };
    match r {
        Some(r) if f32_cpu(r) => x.contiguous()?.apply_op2(&r.contiguous()?, op),
        Some(r) => candle_core::bail!(
            "channel_affine_relu: residual {:?} is not f32 on the CPU",
            r.dims()
        ),
        None => x.contiguous()?.apply_op1(op),
    }
}

/// Per-channel batch mean and biased variance over N, H, W: [2, C] (means, variances).
struct ChannelStats;

impl ChannelStats {
    /// (Σ x, Σ x²)-free two-pass mean and variance of channel `ch` (f64 sums).
    fn of(x: &[f32], n: usize, c: usize, sp: usize, ch: usize) -> (f64, f64) {
        let cnt = (n * sp) as f64;
        let mut s = 0f64;
        for b in 0..n {
            s += x[(b * c + ch) * sp..(b * c + ch + 1) * sp]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
        }
        let mean = s / cnt;
        let mut v = 0f64;
        for b in 0..n {
            v += x[(b * c + ch) * sp..(b * c + ch + 1) * sp]
                .iter()
                .map(|&t| (t as f64 - mean) * (t as f64 - mean))
                .sum::<f64>();
        }
        (mean, v / cnt)
    }
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "ftk-channel-stats"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l)?;
        let (n, c, sp) = nchw(l)?;
        let mv: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| Self::of(x, n, c, sp, ch))
            .collect();
        let mut out: Vec<f32> = mv.iter().map(|m| m.0 as f32).collect();
        out.extend(mv.iter().map(|m| m.1 as f32));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }

    /// dx = dmean[c] / M + dvar[c] · 2 (x - mean[c]) / M, M = N·H·W.
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let sp = h * w;
        let m = (n * sp) as f32;
        let stats = res.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let dx = with_slice(arg, |x| {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(sp)
                .zip(x.par_chunks(sp))
                .enumerate()
                .for_each(|(i, (o, xs))| {
                    let ch = i % c;
                    let (mean, dm, dv) = (stats[ch], g[ch] / m, 2.0 * g[c + ch] / m);
                    o.iter_mut()
                        .zip(xs)
                        .for_each(|(o, &v)| *o = dm + dv * (v - mean));
                });
            Ok(dx)
        })?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}

/// Per-channel batch mean and biased variance of [N, C, H, W] x, as a [2, C] tensor.
pub fn channel_stats(x: &Tensor) -> Result<Tensor> {
    if !f32_cpu(x) || x.rank() != 4 {
        candle_core::bail!(
            "channel_stats: expected f32 [N, C, H, W], got {:?}",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1(ChannelStats)
}

/// max(x, 0); the gradient passes where the output is positive (torch: where x > 0).
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "ftk-relu"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(1 << 15)
            .zip(x.par_chunks(1 << 15))
            .for_each(|(o, xs)| o.iter_mut().zip(xs).for_each(|(o, &v)| *o = v.max(0.0)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_slice(res, |y| {
            with_slice(grad, |g| {
                let mut dx = vec![0f32; g.len()];
                dx.par_chunks_mut(1 << 15)
                    .zip(y.par_chunks(1 << 15).zip(g.par_chunks(1 << 15)))
                    .for_each(|(o, (ys, gs))| {
                        for ((o, &y), &g) in o.iter_mut().zip(ys).zip(gs) {
                            *o = if y > 0.0 { g } else { 0.0 };
                        }
                    });
                Ok(dx)
            })
        })?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}

/// ReLU with a single-pass backward (f32 CPU; candle's otherwise).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !f32_cpu(x) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

/// torch's MaxPool2d(kernel 3, stride 2, padding 1): padding never wins; the gradient goes
/// to the first maximum of each window in (row, column) order, as torch's CPU kernel.
/// The forward keeps each window's argmax for the backward.
#[derive(Default)]
struct MaxPool3s2 {
    argmax: std::sync::Mutex<Vec<u32>>,
}

impl MaxPool3s2 {
    /// The output size and, per output, the flat in-plane index of its maximum.
    fn argmax(x: &[f32], h: usize, w: usize) -> (usize, usize, Vec<u32>) {
        let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let mut idx = vec![0u32; ho * wo];
        for oy in 0..ho {
            for ox in 0..wo {
                let (mut best, mut bi) = (f32::NEG_INFINITY, usize::MAX);
                for ky in 0..3 {
                    let iy = (2 * oy + ky) as isize - 1;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..3 {
                        let ix = (2 * ox + kx) as isize - 1;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        let j = iy as usize * w + ix as usize;
                        if x[j] > best || bi == usize::MAX || x[j].is_nan() {
                            best = x[j];
                            bi = j;
                        }
                    }
                }
                idx[oy * wo + ox] = bi as u32;
            }
        }
        (ho, wo, idx)
    }
}

impl CustomOp1 for MaxPool3s2 {
    fn name(&self) -> &'static str {
        "ftk-max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(st, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let mut y = vec![0f32; n * c * ho * wo];
        let mut keep = vec![0u32; n * c * ho * wo];
        y.par_chunks_mut(ho * wo)
            .zip(keep.par_chunks_mut(ho * wo))
            .zip(x.par_chunks(h * w))
            .for_each(|((o, k), plane)| {
                let (_, _, idx) = Self::argmax(plane, h, w);
                o.iter_mut()
                    .zip(&idx)
                    .for_each(|(o, &j)| *o = plane[j as usize]);
                k.copy_from_slice(&idx);
            });
        *self.argmax.lock().unwrap_or_else(|e| e.into_inner()) = keep;
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let dx = with_slice(arg, |x| {
            with_slice(grad, |g| {
                let kept = self.argmax.lock().unwrap_or_else(|e| e.into_inner());
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(h * w)
                    .zip(x.par_chunks(h * w).zip(g.par_chunks(ho * wo)))
                    .enumerate()
                    .for_each(|(p, (d, (plane, gs)))| {
                        let fresh;
                        let idx = match kept.get(p * ho * wo..(p + 1) * ho * wo) {
                            Some(k) => k,
                            None => {
                                fresh = Self::argmax(plane, h, w).2;
                                &fresh
                            }
                        };
                        for (&j, &gv) in idx.iter().zip(gs) {
                            d[j as usize] += gv;
                        }
                    });
                Ok(dx)
            })
        })?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}

/// torch's MaxPool2d(3, stride 2, padding 1) on [N, C, H, W] f32.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    if !f32_cpu(x) || x.rank() != 4 {
        candle_core::bail!(
            "max_pool_3x3_s2: expected f32 [N, C, H, W], got {:?}",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1(MaxPool3s2::default())
}
