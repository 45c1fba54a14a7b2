//! Inference kernels for the UNet and VAE on the CPU: conv2d as im2col + GEMM written
//! straight into NCHW, one-pass group norm (+ SiLU), layer norm, softmax and GEGLU with a
//! vectorisable exp/erf.
//!
//! Each entry point takes the fast path only when candle tracks no gradient through its
//! inputs (`Tensor::track_op`), the data is f32 on the CPU; otherwise it runs the candle ops
//! it replaces, so FedCADO guidance and FedDEO description learning keep their autograd
//! graphs. Every kernel works one sample at a time with shapes that do not depend on the
//! batch, so a sample's numbers do not depend on which samples share its batch (`--shard`).

use candle_core::{DType, Device, Module, Result, Storage, Tensor, D};
use candle_nn as nn;
use rayon::prelude::*;

/// Whether `xs` can take the fast path.
fn fast(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| !x.track_op() && x.dtype() == DType::F32 && x.device().is_cpu())
}

/// The f32 values of a contiguous CPU tensor, passed to `f`.
fn with_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = x.contiguous()?;
    let (s, l) = x.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => {
            let v = c.as_slice::<f32>()?;
            let o = l.start_offset();
            f(&v[o..o + l.shape().elem_count()])
        }
        _ => candle_core::bail!("fast kernels run on the CPU"),
    }
}

/// Defines `fn $name` that runs its body compiled for AVX-512 or AVX2 (+FMA) when the CPU
/// has them (elementwise loops vectorise 16 or 8 wide), else for the baseline target.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn generic($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    generic($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    generic($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx512` was compiled for.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
}

/// Sum with 16 independent lanes (so the loop vectorises).
#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ch = x.chunks_exact(16);
    let rem = ch.remainder();
    for c in ch {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

/// Max with 16 independent lanes.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let ch = x.chunks_exact(16);
    let rem = ch.remainder();
    for c in ch {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter()
        .chain(rem)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

// ---------------------------------------------------------------- exp, erf

/// e^x for f32, |relative error| < 2e-7 on [-87, 88]; 0 below -87.3. Written so that loops
/// over slices vectorise (no calls, no branches beyond selects).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_g::<false>(x)
}

/// a * b + c, fused when `FMA` (only inside functions compiled with the `fma` feature).
#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`], with fused multiply-adds when `FMA`.
#[inline(always)]
fn exp_g<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    #[allow(clippy::manual_clamp)] // plain max/min: vmaxps/vminps, no NaN branches
    let xc = x.max(-87.3).min(88.7);
    let t = fma::<FMA>(xc, LOG2E, ROUND);
    let n = t - ROUND;
    // the integer n sits in t's low mantissa bits: no float->int conversion (which
    // would not vectorise with Rust's saturating `as`)
    let ni = t.to_bits().wrapping_sub(0x4B40_0000);
    let r = fma::<FMA>(-n, LN2_LO, fma::<FMA>(-n, LN2_HI, xc));
    // exp(r) on |r| <= ln2/2: degree-6 Taylor/minimax coefficients
    let mut p = fma::<FMA>(r, 0.001_388_989_5, 0.008_333_452);
    p = fma::<FMA>(r, p, 0.041_666_668);
    p = fma::<FMA>(r, p, 0.166_666_67);
    p = fma::<FMA>(r, p, 0.5);
    p = fma::<FMA>(r, p, 1.0);
    p = fma::<FMA>(r, p, 1.0);
    let bits = ni.wrapping_add(127) << 23;
    let y = p * f32::from_bits(bits);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// erf(x), |error| < 1e-6 in f32 (Abramowitz & Stegun 7.1.26 with the fast exp).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - t * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))))
            * exp(-a * a);
    y.copysign(x)
}

// ---------------------------------------------------------------- conv2d

/// candle_nn's Conv2d with a fast forward.
#[derive(Debug, Clone)]
pub struct Conv2d(pub nn::Conv2d);

pub fn conv2d(
    c_in: usize,
    c_out: usize,
    k: usize,
    cfg: nn::Conv2dConfig,
    vb: nn::VarBuilder,
) -> Result<Conv2d> {
    nn::conv2d(c_in, c_out, k, cfg, vb).map(Conv2d)
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.0;
        let w = c.weight();
        let cfg = c.config();
        let mut ts = vec![x, w];
        ts.extend(c.bias());
        if !fast(&ts) || cfg.groups != 1 || x.rank() != 4 {
            return c.forward(x);
        }
        let (b, ci, h, wd) = x.dims4()?;
        let (co, wci, kh, kw) = w.dims4()?;
        if wci != ci {
            return c.forward(x); // candle's error message
        }
        let (p, s, d) = (cfg.padding, cfg.stride, cfg.dilation);
        let ho = (h + 2 * p).saturating_sub(d * (kh - 1) + 1) / s + 1;
        let wo = (wd + 2 * p).saturating_sub(d * (kw - 1) + 1) / s + 1;
        let (np, kk) = (ho * wo, ci * kh * kw);
        let bias = match c.bias() {
            Some(bt) => Some(bt.to_vec1::<f32>()?),
            None => None,
        };
        let mut out = vec![0f32; b * co * np];
        with_slice(w, |wv| {
            with_slice(x, |xv| {
                let direct = kh == 1 && kw == 1 && s == 1 && p == 0;
                let one = |n: usize, o: &mut [f32]| {
                    COLS.with_borrow_mut(|col| {
                        if !direct && col.len() < kk * np {
                            col.resize(kk * np, 0.0);
                        }
                        let col = &mut col[..if direct { 0 } else { kk * np }];
                        let xs = &xv[n * ci * h * wd..(n + 1) * ci * h * wd];
                        if !direct {
                            im2col(xs, col, (ci, h, wd), (kh, kw), (ho, wo), (p, s, d));
                        }
                        if let Some(bv) = &bias {
                            for (row, &bb) in o.chunks_mut(np).zip(bv) {
                                row.fill(bb);
                            }
                        }
                        let rhs = if direct { xs } else { &col[..] };
                        // out[co, np] (+)= W[co, kk] · col[kk, np]
                        ftk::linalg::matmul(o, wv, rhs, co, np, kk, bias.is_some());
                    })
                };
                per_sample(&mut out, co * np, one);
                Ok(())
            })
        })?;
        Tensor::from_vec(out, (b, co, ho, wo), &Device::Cpu)
    }
}

/// col[(c, ky, kx), (oy, ox)] = x[c, oy*s + ky*d - p, ox*s + kx*d - p] (0 outside).
fn im2col(
    x: &[f32],
    col: &mut [f32],
    (ci, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (ho, wo): (usize, usize),
    (p, s, d): (usize, usize, usize),
) {
    let np = ho * wo;
    col.par_chunks_mut(kh * kw * np)
        .enumerate()
        .take(ci)
        .for_each(|(c, rows)| {
            let plane = &x[c * h * w..(c + 1) * h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &mut rows[(ky * kw + kx) * np..(ky * kw + kx + 1) * np];
                    for oy in 0..ho {
                        let dst = &mut row[oy * wo..(oy + 1) * wo];
                        let iy = (oy * s + ky * d) as isize - p as isize;
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        let off = (kx * d) as isize - p as isize;
                        if s == 1 {
                            // dst[ox] = src[ox + off] where in range
                            let lo = (-off).clamp(0, wo as isize) as usize;
                            let hi = (w as isize - off).clamp(0, wo as isize) as usize;
                            dst[..lo].fill(0.0);
                            if hi > lo {
                                let a = (lo as isize + off) as usize;
                                dst[lo..hi].copy_from_slice(&src[a..a + hi - lo]);
                            }
                            dst[hi.max(lo)..].fill(0.0);
                        } else {
                            for (ox, v) in dst.iter_mut().enumerate() {
                                let ix = (ox * s) as isize + off;
                                *v = if ix >= 0 && ix < w as isize {
                                    src[ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            }
        });
}

/// Run `f(n, out_n)` for each `chunk`-long output block: several blocks side by
/// side with single-threaded GEMMs (fewer, larger tasks than one multi-threaded
/// GEMM per block), or one block with every thread. A block's result is the
/// same either way: the GEMM splits rows and columns across threads, never the
/// sum.
fn per_sample(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let blocks = out.len() / chunk.max(1);
    if blocks >= 2 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(n, o)| ftk::linalg::serial(|| f(n, o)));
    } else {
        out.chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(n, o)| f(n, o));
    }
}

// ---------------------------------------------------------------- linear

/// candle_nn's Linear whose fast forward runs one GEMM per leading-dim row (M = the
/// tokens of one sample), so a row's result never depends on the batch it is in (candle
/// folds the batch into M, and the GEMM's kernel choice depends on M).
#[derive(Debug, Clone)]
pub struct Linear(pub nn::Linear);

pub fn linear(i: usize, o: usize, vb: nn::VarBuilder) -> Result<Linear> {
    nn::linear(i, o, vb).map(Linear)
}

pub fn linear_no_bias(i: usize, o: usize, vb: nn::VarBuilder) -> Result<Linear> {
    nn::linear_no_bias(i, o, vb).map(Linear)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let l = &self.0;
        let w = l.weight();
        let mut ts = vec![x, w];
        ts.extend(l.bias());
        if !fast(&ts) || x.rank() < 2 || x.rank() > 3 || w.rank() != 2 {
            return l.forward(x);
        }
        let (o, i) = w.dims2()?;
        let dims = x.dims().to_vec();
        if dims[dims.len() - 1] != i {
            return l.forward(x);
        }
        // rows per GEMM: a sample's tokens ([B, L, in]) or one vector ([B, in])
        let m = if dims.len() == 3 { dims[1] } else { 1 };
        let total: usize = dims[..dims.len() - 1].iter().product();
        let bias = match l.bias() {
            Some(b) => Some(b.to_vec1::<f32>()?),
            None => None,
        };
        let mut out = vec![0f32; total * o];
        with_slice(w, |wv| {
            with_slice(x, |xv| {
                per_sample(&mut out, m * o, |n, yo| {
                    let xi = &xv[n * m * i..(n + 1) * m * i];
                    if let Some(bv) = &bias {
                        for row in yo.chunks_mut(o) {
                            row.copy_from_slice(bv);
                        }
                    }
                    ftk::linalg::matmul_bt(yo, xi, wv, m, o, i, bias.is_some());
                });
                Ok(())
            })
        })?;
        let mut od = dims;
        *od.last_mut().unwrap_or(&mut 0) = o;
        Tensor::from_vec(out, od, &Device::Cpu)
    }
}

// ---------------------------------------------------------------- group norm

/// candle_nn's GroupNorm with a one-pass forward (and an optional fused SiLU).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
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
        if !fast(&[x, &self.weight, &self.bias]) || x.rank() < 3 {
            let y = self.inner.forward(x)?;
            return if silu { nn::ops::silu(&y) } else { Ok(y) };
        }
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        if c != self.weight.dim(0)? {
            return self.inner.forward(x);
        }
        let sp: usize = dims[2..].iter().product();
        let cg = c / self.groups;
        let gamma = self.weight.to_vec1::<f32>()?;
        let beta = self.bias.to_vec1::<f32>()?;
        let eps = self.eps;
        let mut out = vec![0f32; b * c * sp];
        with_slice(x, |xv| {
            out.par_chunks_mut(cg * sp)
                .zip(xv.par_chunks(cg * sp))
                .enumerate()
                .for_each(|(bg, (o, xs))| {
                    let g = bg % self.groups;
                    let (mean, var) = gn_stats(xs);
                    let inv = 1.0 / (var + eps).sqrt();
                    for j in 0..cg {
                        let ch = g * cg + j;
                        let a = (inv * gamma[ch] as f64) as f32;
                        let bb = (beta[ch] as f64 - mean * inv * gamma[ch] as f64) as f32;
                        let (os, is) = (&mut o[j * sp..(j + 1) * sp], &xs[j * sp..(j + 1) * sp]);
                        gn_apply(os, is, a, bb, silu);
                    }
                });
            Ok(())
        })?;
        Tensor::from_vec(out, dims, &Device::Cpu)
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

/// Layer norm over the last dim: candle's fused kernel when nothing is tracked, else
/// `layer_norm_slow` (which has a backward).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    if fast(&[x, w, b]) {
        nn::ops::layer_norm(&x.contiguous()?, w, b, eps)
    } else {
        nn::ops::layer_norm_slow(x, w, b, eps)
    }
}

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fast(&[x]) {
        return nn::ops::softmax(x, D::Minus1);
    }
    let dims = x.dims().to_vec();
    let n = *dims.last().unwrap_or(&1);
    let mut out = with_slice(x, |v| Ok(v.to_vec()))?;
    let n = n.max(1);
    out.par_chunks_mut(n * 64)
        .for_each(|rows| softmax_rows(rows, n));
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// Each row of `rows` (rows of `n`) becomes exp(x - max); `inv` gets 1 / its sum.
#[inline(always)]
fn softmax_unnorm_body<const FMA: bool>(rows: &mut [f32], n: usize, inv: &mut [f32]) {
    for (r, iv) in rows.chunks_mut(n).zip(inv.iter_mut()) {
        let m = max_lanes(r);
        let mut acc = [0f32; 16];
        let mut ch = r.chunks_exact_mut(16);
        for c in &mut ch {
            for i in 0..16 {
                let e = exp_g::<FMA>(c[i] - m);
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut sum = acc.iter().sum::<f32>();
        for v in ch.into_remainder() {
            *v = exp_g::<FMA>(*v - m);
            sum += *v;
        }
        *iv = 1.0 / sum;
    }
}

/// [`softmax_unnorm_body`] compiled for AVX-512 or AVX2 with FMA when the CPU has them.
fn softmax_unnorm(rows: &mut [f32], n: usize, inv: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn avx512(rows: &mut [f32], n: usize, inv: &mut [f32]) {
            softmax_unnorm_body::<true>(rows, n, inv)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(rows: &mut [f32], n: usize, inv: &mut [f32]) {
            softmax_unnorm_body::<true>(rows, n, inv)
        }
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("fma") {
            // SAFETY: the CPU has the features `avx512` was compiled for.
            return unsafe { avx512(rows, n, inv) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above, for `avx2`.
            return unsafe { avx2(rows, n, inv) };
        }
    }
    softmax_unnorm_body::<false>(rows, n, inv)
}

/// Softmax of each row of `n`.
fn softmax_rows(rows: &mut [f32], n: usize) {
    let mut inv = vec![0f32; rows.len() / n];
    softmax_unnorm(rows, n, &mut inv);
    for (r, &iv) in rows.chunks_mut(n).zip(&inv) {
        r.iter_mut().for_each(|v| *v *= iv);
    }
}

multiversion! {
    fn geglu_chunk(o: &mut [f32], g: &[f32]) {
        for (y, &x) in o.iter_mut().zip(g) {
            *y *= 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// `a * gelu_erf(g)` (diffusers' GEGLU with the exact GELU).
pub fn geglu(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    if !fast(&[a, g]) || a.dims() != g.dims() {
        return a * g.gelu_erf()?;
    }
    let dims = a.dims().to_vec();
    let gv = with_slice(g, |v| Ok(v.to_vec()))?;
    let mut out = with_slice(a, |v| Ok(v.to_vec()))?;
    out.par_chunks_mut(1 << 14)
        .zip(gv.par_chunks(1 << 14))
        .for_each(|(o, g)| geglu_chunk(o, g));
    Tensor::from_vec(out, dims, &Device::Cpu)
}

// ---------------------------------------------------------------- attention

thread_local! {
    /// Per-thread scratch: attention scores, im2col columns (grown, never shrunk).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Query rows per attention task: their scores [QB, Lk] stay in L2.
const QB: usize = 64;

/// Whether [`attention`] can run on these (untracked f32 CPU) projections.
pub fn attention_ok(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    fast(&[q, k, v])
}

/// softmax(scale · Q Kᵀ) V per head, reading the heads in place from q [B, Lq, H·d],
/// k, v [B, Lk, H·d] and writing [B, Lq, H·d]: one task per (sample, head, 64 query
/// rows), each a pair of single-threaded GEMMs around a softmax on its own rows.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, lq, hd) = q.dims3()?;
    let (_, lk, _) = k.dims3()?;
    if k.dims3()? != (b, lk, hd) || v.dims3()? != (b, lk, hd) || hd % heads != 0 {
        candle_core::bail!(
            "attention: q {:?} k {:?} v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let d = hd / heads;
    let mut out = vec![0f32; b * lq * hd];
    let optr = out.as_mut_ptr() as usize;
    let nqb = lq.div_ceil(QB);
    with_slice(q, |qv| {
        with_slice(k, |kv| {
            with_slice(v, |vv| {
                (0..b * heads * nqb).into_par_iter().for_each(|task| {
                    let (bh, qb) = (task / nqb, task % nqb);
                    let (bi, h) = (bh / heads, bh % heads);
                    let q0 = qb * QB;
                    let m = QB.min(lq - q0);
                    SCORES.with_borrow_mut(|s| {
                        if s.len() < m * lk {
                            s.resize(m * lk, 0.0);
                        }
                        let s = &mut s[..m * lk];
                        let mut inv = [0f32; QB];
                        let qoff = (bi * lq + q0) * hd + h * d;
                        let kvoff = bi * lk * hd + h * d;
                        // SAFETY: every operand range lies inside its slice (offsets and
                        // strides above, m <= lq - q0); tasks write disjoint (row, head)
                        // blocks of `out`, which outlives the parallel loop.
                        unsafe {
                            // s[m, lk] = scale · q[m, d] · k[lk, d]ᵀ
                            gemm::gemm(
                                m,
                                lk,
                                d,
                                s.as_mut_ptr(),
                                1,
                                lk as isize,
                                false,
                                qv[qoff..].as_ptr(),
                                1,
                                hd as isize,
                                kv[kvoff..].as_ptr(),
                                hd as isize,
                                1,
                                0.0,
                                scale as f32,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                            softmax_unnorm(s, lk, &mut inv[..m]);
                            // out[m, d] = s[m, lk] · v[lk, d]
                            let dst = (optr as *mut f32).add(qoff);
                            gemm::gemm(
                                m,
                                d,
                                lk,
                                dst,
                                1,
                                hd as isize,
                                false,
                                s.as_ptr(),
                                1,
                                lk as isize,
                                vv[kvoff..].as_ptr(),
                                1,
                                hd as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                            // the softmax's normalisation, on the [m, d] output
                            for (r, &iv) in inv[..m].iter().enumerate() {
                                let row = std::slice::from_raw_parts_mut(dst.add(r * hd), d);
                                row.iter_mut().for_each(|v| *v *= iv);
                            }
                        }
                    });
                });
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, (b, lq, hd), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let r = (exp(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(r);
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "exp relative error {worst}");
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let r = (exp_g::<true>(x) as f64 - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(r);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "exp (fma) relative error {worst}");
        assert_eq!(exp(-200.0), 0.0);
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            // erf via the complementary series is not in std: compare with a
            // high-precision Taylor/continued-fraction-free check through libm-like f64
            let e = erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - e).abs());
            x += 0.000_91;
        }
        assert!(worst < 1e-6, "erf error {worst}");
    }

    /// erf in f64 by its Maclaurin series (|x| < 3) or 1 - erfc asymptotics.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let mut sum = 0.0;
            let mut term = a;
            let mut n = 0.0;
            loop {
                let t = term / (2.0 * n + 1.0);
                sum += t;
                if t.abs() < 1e-17 {
                    break;
                }
                n += 1.0;
                term *= -a * a / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) ~ exp(-a^2)/(a sqrt(pi)) (1 - 1/(2a^2) + 3/(4a^4)); < 1e-4 here anyway
            let e = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
                * (1.0 - 0.5 / (a * a) + 0.75 / (a * a * a * a));
            1.0 - e
        };
        v.copysign(x)
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= tol, "max abs diff {d}");
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::RngExt;
        let mut r = ftk::rng::stream(seed, 0);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| r.sample::<f32, _>(rand_distr::StandardNormal))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn kernels_match_candle() {
        // conv: 3x3 pad 1, stride 2, 1x1, no bias, dilation 2
        for (k, p, s, d, bias) in [
            (3, 1, 1, 1, true),
            (3, 1, 2, 1, true),
            (1, 0, 1, 1, true),
            (3, 0, 1, 1, false),
            (3, 2, 1, 2, true),
        ] {
            let x = randn(&[2, 5, 9, 7], 1);
            let w = (randn(&[6, 5, k, k], 2) * 0.3).unwrap();
            let bt = bias.then(|| randn(&[6], 3));
            let cfg = nn::Conv2dConfig {
                padding: p,
                stride: s,
                dilation: d,
                ..Default::default()
            };
            let c = nn::Conv2d::new(w, bt, cfg);
            let want = c.forward(&x).unwrap();
            let got = Conv2d(c).forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            close(&got, &want, 1e-5);
        }
        // linear, 3-D and 2-D, with and without bias
        for bias in [true, false] {
            let w = randn(&[7, 5], 12);
            let bt = bias.then(|| randn(&[7], 13));
            let l = nn::Linear::new(w, bt);
            for x in [randn(&[3, 4, 5], 14), randn(&[6, 5], 15)] {
                close(
                    &Linear(l.clone()).forward(&x).unwrap(),
                    &l.forward(&x).unwrap(),
                    1e-5,
                );
            }
        }
        // group norm (+ silu)
        let x = ((randn(&[2, 8, 5, 3], 4) * 3.0).unwrap() + 1.0).unwrap();
        let w = randn(&[8], 5);
        let b = randn(&[8], 6);
        let gn = nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5).unwrap();
        let f = GroupNorm {
            inner: gn.clone(),
            weight: w,
            bias: b,
            groups: 4,
            eps: 1e-5,
        };
        close(&f.forward(&x).unwrap(), &gn.forward(&x).unwrap(), 1e-5);
        close(
            &f.forward_act(&x, true).unwrap(),
            &nn::ops::silu(&gn.forward(&x).unwrap()).unwrap(),
            1e-5,
        );
        // softmax, geglu
        let x = (randn(&[3, 4, 37], 7) * 4.0).unwrap();
        close(
            &softmax_last_dim(&x).unwrap(),
            &nn::ops::softmax(&x, D::Minus1).unwrap(),
            1e-6,
        );
        // attention against the plain tensor-op formula, 2 heads of 3, Lq 70 (two row blocks)
        let (q, k, v) = (
            randn(&[2, 70, 6], 9),
            randn(&[2, 11, 6], 10),
            randn(&[2, 11, 6], 11),
        );
        let heads = |t: &Tensor| {
            let (b, l, _) = t.dims3().unwrap();
            t.reshape((b, l, 2, 3))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let w = (heads(&q).matmul(&heads(&k).t().unwrap()).unwrap() * 0.5).unwrap();
        let want = nn::ops::softmax(&w, D::Minus1)
            .unwrap()
            .matmul(&heads(&v))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((2, 70, 6))
            .unwrap();
        close(&attention(&q, &k, &v, 2, 0.5).unwrap(), &want, 1e-5);
        let g = randn(&[3, 4, 37], 8);
        close(
            &geglu(&x, &g).unwrap(),
            &(&x * g.gelu_erf().unwrap()).unwrap(),
            1e-5,
        );
    }
}
