//! Group norm (+ SiLU) and layer norm.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor, D};
use candle_nn as nn;
use rayon::prelude::*;

use super::{contiguous_f32, f32_cpu, fast, with_slice};

use super::math::{exp, sum_lanes};

/// candle_nn's GroupNorm with a one-pass forward (and an optional fused SiLU).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub(crate) inner: nn::GroupNorm,
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
}

pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: nn::VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    let inner = nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        weight,
        bias,
        groups,
        eps,
    })
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

impl GroupNorm {
    /// silu(group_norm(x)) when `silu`.
    pub fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let _t = crate::timing::Kernel::Norm.timer();
        if !fast(&[&self.weight, &self.bias]) || !f32_cpu(x) || x.rank() < 3 {
            let y = self.inner.forward(x)?;
            return if silu { nn::ops::silu(&y) } else { Ok(y) };
        }
        let dims = x.dims().to_vec();
        let c = dims[1];
        if c != self.weight.dim(0)? || !c.is_multiple_of(self.groups) {
            return self.inner.forward(x);
        }
        let op = GnOp {
            dims,
            groups: self.groups,
            eps: self.eps,
            gamma: self.weight.to_vec1::<f32>()?,
            beta: self.bias.to_vec1::<f32>()?,
            silu,
        };
        if x.track_op() {
            return x.contiguous()?.apply_op1(op);
        }
        let out = with_slice(x, |xv| Ok(op.forward(xv)))?;
        Tensor::from_vec(out, op.dims, &Device::Cpu)
    }
}

/// One group-norm call (+ SiLU): the forward kernel and its input gradient.
struct GnOp {
    dims: Vec<usize>,
    groups: usize,
    eps: f64,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    silu: bool,
}

impl GnOp {
    /// (elements per group, channels per group, spatial size)
    fn sizes(&self) -> (usize, usize, usize) {
        let sp: usize = self.dims[2..].iter().product();
        let cg = self.dims[1] / self.groups;
        (cg * sp, cg, sp)
    }

    fn forward(&self, xv: &[f32]) -> Vec<f32> {
        let (n, cg, sp) = self.sizes();
        let mut out = super::zeros(xv.len());
        out.par_chunks_mut(n)
            .zip(xv.par_chunks(n))
            .enumerate()
            .for_each(|(bg, (o, xs))| {
                let g = bg % self.groups;
                let (mean, var) = gn_stats(xs);
                let inv = 1.0 / (var + self.eps).sqrt();
                for j in 0..cg {
                    let ch = g * cg + j;
                    let a = (inv * self.gamma[ch] as f64) as f32;
                    let bb = (self.beta[ch] as f64 - mean * inv * self.gamma[ch] as f64) as f32;
                    let (os, is) = (&mut o[j * sp..(j + 1) * sp], &xs[j * sp..(j + 1) * sp]);
                    gn_apply(os, is, a, bb, self.silu);
                }
            });
        out
    }

    /// dx per group: with x̂ = (x - mean) inv and g = dL/dx̂ (through the SiLU and γ),
    /// dx = inv (g - mean(g) - x̂ mean(g x̂)).
    fn input_grad(&self, xv: &[f32], dy: &[f32]) -> Vec<f32> {
        let (n, cg, sp) = self.sizes();
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(n)
            .zip(xv.par_chunks(n).zip(dy.par_chunks(n)))
            .enumerate()
            .for_each(|(bg, (d, (xs, gs)))| {
                let g = bg % self.groups;
                let (mean, var) = gn_stats(xs);
                let inv = 1.0 / (var + self.eps).sqrt();
                let (mut sg, mut sgx) = (0f64, 0f64);
                for j in 0..cg {
                    let ch = g * cg + j;
                    let r = j * sp..(j + 1) * sp;
                    let (a, b) = gn_grad_chan(
                        &mut d[r.clone()],
                        &xs[r.clone()],
                        &gs[r],
                        [self.gamma[ch], self.beta[ch], mean as f32, inv as f32],
                        self.silu,
                    );
                    sg += a;
                    sgx += b;
                }
                let (mg, mgx) = ((sg / n as f64) as f32, (sgx / n as f64) as f32);
                gn_grad_finish(d, xs, mean as f32, inv as f32, mg, mgx);
            });
        dx
    }
}

impl CustomOp1 for GnOp {
    fn name(&self) -> &'static str {
        "ftk-group-norm"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.forward(contiguous_f32(st, l)?);
        Ok((CpuStorage::F32(out), Shape::from(self.dims.clone())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_slice(arg, |xv| with_slice(grad, |gv| Ok(self.input_grad(xv, gv))))?;
        Tensor::from_vec(dx, self.dims.clone(), &Device::Cpu).map(Some)
    }
}

multiversion! {
    /// One channel of the group-norm backward: d <- dL/dx̂ = γ · dL/dy0 (through the SiLU
    /// when `silu`, y0 = γ x̂ + β); returns (Σ d, Σ d x̂) in f64.
    /// `p` = [γ, β, mean, inv].
    fn gn_grad_chan(d: &mut [f32], x: &[f32], dy: &[f32], p: [f32; 4], silu: bool) -> (f64, f64) {
        let [gamma, beta, mean, inv] = p;
        if silu {
            for ((o, &v), &g) in d.iter_mut().zip(x).zip(dy) {
                let y0 = gamma * ((v - mean) * inv) + beta;
                let s = 1.0 / (1.0 + exp(-y0));
                *o = gamma * g * (s + y0 * s * (1.0 - s));
            }
        } else {
            for (o, &g) in d.iter_mut().zip(dy) {
                *o = gamma * g;
            }
        }
        let mut sgx = [0f32; 16];
        let mut sg = [0f32; 16];
        let mut it = d.chunks_exact(16).zip(x.chunks_exact(16));
        for (dc, xc) in &mut it {
            for i in 0..16 {
                sg[i] += dc[i];
                sgx[i] += dc[i] * ((xc[i] - mean) * inv);
            }
        }
        let k = d.len() / 16 * 16;
        let (mut a, mut b) = (sg.iter().map(|&v| v as f64).sum::<f64>(), sgx.iter().map(|&v| v as f64).sum::<f64>());
        for (dv, xv) in d[k..].iter().zip(&x[k..]) {
            a += *dv as f64;
            b += (*dv * ((xv - mean) * inv)) as f64;
        }
        (a, b)
    }
}

multiversion! {
    /// d <- inv (d - mg - x̂ mgx).
    fn gn_grad_finish(d: &mut [f32], x: &[f32], mean: f32, inv: f32, mg: f32, mgx: f32) {
        for (o, &v) in d.iter_mut().zip(x) {
            *o = inv * (*o - mg - (v - mean) * inv * mgx);
        }
    }
}

multiversion! {
    /// Mean and biased variance (two passes; lanes in f32, blocks summed in f64).
    fn gn_stats(xs: &[f32]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.chunks(4096).map(|c| sum_lanes(c) as f64).sum::<f64>() / n;
        let m = mean as f32;
        let mut var = 0f64;
        let mut sq = [0f32; 4096];
        for c in xs.chunks(4096) {
            for (d, &v) in sq.iter_mut().zip(c) {
                let t = v - m;
                *d = t * t;
            }
            var += sum_lanes(&sq[..c.len()]) as f64;
        }
        // sum (x-m)^2 = sum (x-mean)^2 + n (mean-m)^2 for the f32-rounded mean m
        let dm = mean - m as f64;
        (mean, (var / n - dm * dm).max(0.0))
    }
}

multiversion! {
    /// o = x * a + b, then SiLU when asked.
    fn gn_apply(o: &mut [f32], x: &[f32], a: f32, b: f32, silu: bool) {
        if silu {
            for (y, &v) in o.iter_mut().zip(x) {
                let t = v * a + b;
                *y = t / (1.0 + exp(-t));
            }
        } else {
            for (y, &v) in o.iter_mut().zip(x) {
                *y = v * a + b;
            }
        }
    }
}

// ---------------------------------------------------------------- layer norm, softmax, geglu

/// Layer norm over the last dim: candle's fused kernel when nothing is tracked; with a
/// tracked input (constant γ, β) a custom op with an input-gradient backward; else
/// `layer_norm_slow` (candle ops).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    let _t = crate::timing::Kernel::Norm.timer();
    if fast(&[x, w, b]) {
        return nn::ops::layer_norm(&x.contiguous()?, w, b, eps);
    }
    if fast(&[w, b]) && f32_cpu(x) && w.rank() == 1 && x.dim(D::Minus1)? == w.dim(0)? {
        let op = LnOp {
            gamma: w.to_vec1::<f32>()?,
            beta: b.to_vec1::<f32>()?,
            eps,
        };
        return x.contiguous()?.apply_op1(op);
    }
    nn::ops::layer_norm_slow(x, w, b, eps)
}

/// Layer norm of a tracked input with constant γ, β.
struct LnOp {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl LnOp {
    /// Mean and 1/sqrt(var + eps) of one row (f64 sums, as `gn_stats`).
    fn stats(&self, r: &[f32]) -> (f32, f32) {
        let (mean, var) = gn_stats(r);
        (mean as f32, (1.0 / (var + self.eps as f64).sqrt()) as f32)
    }
}

impl CustomOp1 for LnOp {
    fn name(&self) -> &'static str {
        "ftk-layer-norm"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xv = contiguous_f32(st, l)?;
        let n = self.gamma.len();
        let mut out = vec![0f32; xv.len()];
        out.par_chunks_mut(n)
            .zip(xv.par_chunks(n))
            .for_each(|(o, r)| {
                let (m, inv) = self.stats(r);
                for (((y, &v), &g), &b) in o.iter_mut().zip(r).zip(&self.gamma).zip(&self.beta) {
                    *y = (v - m) * inv * g + b;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = self.gamma.len();
        let dx = with_slice(arg, |xv| {
            with_slice(grad, |gv| {
                let mut dx = vec![0f32; xv.len()];
                dx.par_chunks_mut(n)
                    .zip(xv.par_chunks(n).zip(gv.par_chunks(n)))
                    .for_each(|(d, (r, g))| {
                        let (m, inv) = self.stats(r);
                        let (mut sg, mut sgx) = (0f64, 0f64);
                        for ((o, &dy), (&v, &ga)) in
                            d.iter_mut().zip(g).zip(r.iter().zip(&self.gamma))
                        {
                            *o = dy * ga;
                            sg += *o as f64;
                            sgx += (*o * (v - m) * inv) as f64;
                        }
                        let (mg, mgx) = ((sg / n as f64) as f32, (sgx / n as f64) as f32);
                        gn_grad_finish(d, r, m, inv, mg, mgx);
                    });
                Ok(dx)
            })
        })?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}
