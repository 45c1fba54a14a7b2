//! conv2d as im2col + GEMM, one sample at a time.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn as nn;
use rayon::prelude::*;

use super::{contiguous_f32, f32_cpu, fast, per_sample, with_scratch, with_slice, BAND, COLS};
use candle_core::TensorId;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

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
        let _t = crate::timing::Kernel::Conv.timer();
        let c = &self.0;
        let w = c.weight();
        let cfg = c.config();
        let mut ws = vec![w];
        ws.extend(c.bias());
        if !fast(&ws) || !f32_cpu(x) || cfg.groups != 1 || x.rank() != 4 {
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
        let op = ConvOp {
            g: Geom {
                b,
                ci,
                h,
                w: wd,
                co,
                kh,
                kw,
                ho,
                wo,
                p,
                s,
                d,
            },
            weight: w.clone(),
            bias: match c.bias() {
                Some(bt) => Some(bt.to_vec1::<f32>()?),
                None => None,
            },
        };
        if !x.track_op() {
            let out = with_slice(w, |wv| {
                with_slice(x, |xv| Ok(op.g.forward(xv, wv, op.bias.as_deref())))
            })?;
            return Tensor::from_vec(out, (b, co, ho, wo), &Device::Cpu);
        }
        x.contiguous()?.apply_op1(op)
    }
}

/// The shapes of one conv2d call (groups 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub b: usize,
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
    pub p: usize,
    pub s: usize,
    pub d: usize,
}

/// Column-buffer elements above which a conv runs in bands of output rows (64 MiB; tiny
/// under test, so the unit tests run every conv in bands).
#[cfg(not(test))]
const BAND_FLOATS: usize = 1 << 24;
#[cfg(test)]
const BAND_FLOATS: usize = 1 << 8;

/// Narrowest input plane [`Geom::forward_taps`] takes: below it the two pad columns per
/// row waste more than the column copy costs (tiny under test, so the unit tests run it).
#[cfg(not(test))]
const TAPS_MIN_W: usize = 24;
#[cfg(test)]
const TAPS_MIN_W: usize = 4;

/// Floats of output per band of [`Geom::forward_taps`] (1 MiB: the block stays in L2
/// across the nine GEMMs; tiny under test, so the unit tests run several bands).
#[cfg(not(test))]
const TAPS_BAND: usize = 1 << 18;
#[cfg(test)]
const TAPS_BAND: usize = 100;

impl Geom {
    /// Output rows per band: all of them unless the columns exceed [`BAND_FLOATS`].
    fn band_rows(&self, kk: usize) -> usize {
        let per_row = (kk * self.wo).max(1);
        (BAND_FLOATS / per_row).clamp(1, self.ho.max(1))
    }

    /// A 1x1, stride 1, unpadded conv: the GEMM reads the input itself.
    fn direct(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }

    /// A 3x3, stride 1, padding 1 conv on a plane wide enough that computing over the
    /// padded width wastes little: [`Geom::forward_taps`] runs it.
    fn taps(&self) -> bool {
        (self.kh, self.kw, self.s, self.d, self.p) == (3, 3, 1, 1, 1) && self.w >= TAPS_MIN_W
    }

    /// y[b, co, ho, wo] from x [b, ci, h, w] and W [co, ci, kh, kw].
    pub fn forward(&self, xv: &[f32], wv: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        if self.taps() {
            return self.forward_taps(xv, wv, bias);
        }
        let Geom {
            b,
            ci,
            h,
            w: wd,
            co,
            kh,
            kw,
            ho,
            wo,
            p,
            s,
            d,
        } = *self;
        let (np, kk) = (ho * wo, ci * kh * kw);
        let direct = self.direct();
        // written once: the bias rows, or zeros the GEMM overwrites
        let mut out = match bias {
            Some(bv) => {
                let mut v = Vec::with_capacity(b * co * np);
                for _ in 0..b {
                    bv.iter()
                        .for_each(|&bb| v.extend(std::iter::repeat_n(bb, np)));
                }
                v
            }
            None => super::zeros(b * co * np),
        };
        let rows = self.band_rows(kk);
        let one = |n: usize, o: &mut [f32]| {
            let xs = &xv[n * ci * h * wd..(n + 1) * ci * h * wd];
            if direct {
                // out[co, np] (+)= W[co, ci] · x[ci, np]
                ftk::linalg::matmul(o, wv, xs, co, np, kk, bias.is_some());
                return;
            }
            if rows >= ho {
                with_scratch(&COLS, kk * np, |col| {
                    im2col(xs, col, (ci, h, wd), (kh, kw), (0..ho, wo), (p, s, d));
                    // out[co, np] (+)= W[co, kk] · col[kk, np]
                    ftk::linalg::matmul(o, wv, col, co, np, kk, bias.is_some());
                });
                return;
            }
            // large planes: a band of output rows at a time, so the columns stay small
            let nmax = rows * wo;
            with_scratch(&COLS, kk * nmax, |col| {
                with_scratch(&BAND, co * nmax, |band| {
                    for oy0 in (0..ho).step_by(rows) {
                        let oys = oy0..(oy0 + rows).min(ho);
                        let nb = oys.len() * wo;
                        let (col, band) = (&mut col[..kk * nb], &mut band[..co * nb]);
                        im2col(xs, col, (ci, h, wd), (kh, kw), (oys, wo), (p, s, d));
                        ftk::linalg::matmul(band, wv, col, co, nb, kk, false);
                        for (orow, brow) in o.chunks_mut(np).zip(band.chunks(nb)) {
                            let dst = &mut orow[oy0 * wo..oy0 * wo + nb];
                            if bias.is_some() {
                                dst.iter_mut().zip(brow).for_each(|(y, &v)| *y += v);
                            } else {
                                dst.copy_from_slice(brow);
                            }
                        }
                    }
                })
            });
        };
        per_sample(&mut out, co * np, one);
        out
    }

    /// The 3x3 conv as nine accumulated GEMMs, one per tap (ky, kx), K = ci each, over
    /// a zero-padded copy of the input read in place: with rows of `w + 2`, tap (ky, kx)
    /// of output position q (on the padded width) reads x_pad[c, q + ky (w + 2) + kx], so
    /// each tap's right-hand matrix is x_pad shifted by one offset (no 9x column copy).
    /// The two pad columns of each output row come out as garbage and are dropped when a
    /// band of rows is copied out. Bands of rows run in parallel, each keeping its
    /// output block in cache across the nine GEMMs; the weights go tap-major first
    /// ([9][co][ci]) so each tap's matrix is contiguous for the GEMM's packing.
    fn forward_taps(&self, xv: &[f32], wv: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let Geom {
            b, ci, h, w, co, ..
        } = *self;
        let (wp, plane) = (w + 2, (h + 2) * (w + 2));
        // rows per band: its [co, rows * wp] output block in about 1 MiB of L2
        let rows = (TAPS_BAND / (co * wp)).clamp(1, h);
        let bands = h.div_ceil(rows);
        let mut wt = vec![0f32; 9 * co * ci];
        wt.par_chunks_mut(co * ci)
            .enumerate()
            .for_each(|(t, wtap)| {
                for (dst, k) in wtap.iter_mut().zip(wv.chunks(9)) {
                    *dst = k[t];
                }
            });
        // zero-padded input of every sample, with slack for the last tap's overrun
        let mut xp: Vec<f32> = Vec::with_capacity(b * ci * plane + 2 * wp);
        let spare = &mut xp.spare_capacity_mut()[..b * ci * plane + 2 * wp];
        let zero = std::mem::MaybeUninit::new(0f32);
        let (planes, slack) = spare.split_at_mut(b * ci * plane);
        slack.fill(zero);
        planes
            .par_chunks_mut(plane)
            .zip(xv.par_chunks(h * w))
            .for_each(|(pp, xs)| {
                pp[..wp].fill(zero);
                pp[(h + 1) * wp..].fill(zero);
                for (prow, row) in pp[wp..(h + 1) * wp].chunks_mut(wp).zip(xs.chunks(w)) {
                    prow[0] = zero;
                    prow[w + 1] = zero;
                    for (d, &v) in prow[1..=w].iter_mut().zip(row) {
                        *d = std::mem::MaybeUninit::new(v);
                    }
                }
            });
        // SAFETY: every element up to this length was written just above.
        unsafe { xp.set_len(b * ci * plane + 2 * wp) };
        let mut out: Vec<f32> = Vec::with_capacity(b * co * h * w);
        let optr = out.spare_capacity_mut().as_mut_ptr() as usize;
        (0..b * bands).into_par_iter().for_each(|task| {
            let (n, band) = (task / bands, task % bands);
            let y0 = band * rows;
            let nr = rows.min(h - y0);
            let nq = nr * wp;
            with_scratch(&BAND, co * nq, |cb| {
                if let Some(bv) = bias {
                    for (row, &bb) in cb.chunks_mut(nq).zip(bv) {
                        row.fill(bb);
                    }
                }
                let x0 = &xp[n * ci * plane + y0 * wp..];
                for t in 0..9 {
                    let off = (t / 3) * wp + t % 3;
                    // the farthest input element this tap reads
                    assert!(off + (ci - 1) * plane + nq <= x0.len());
                    // SAFETY: tap t's weights are wt[t co ci..(t + 1) co ci]; the input
                    // window's farthest element is checked above; `cb` is this task's own
                    // scratch. (The hand-written kernel: 2-13% faster than the `gemm`
                    // crate on these shapes, see `sgemm`.)
                    unsafe {
                        super::sgemm::gemm_s(
                            (co, nq, ci),
                            cb.as_mut_ptr(),
                            (1, nq),
                            bias.is_some() || t > 0,
                            wt.as_ptr().add(t * co * ci),
                            (1, ci),
                            x0.as_ptr().add(off),
                            (1, plane),
                            1.0,
                        );
                    }
                }
                for (c, crow) in cb.chunks(nq).enumerate() {
                    for (r, src) in crow.chunks(wp).enumerate() {
                        let at = ((n * co + c) * h + y0 + r) * w;
                        // SAFETY: rows (n, c, y0 + r) are this task's alone, inside `out`'s
                        // capacity; `out` outlives the parallel loop.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src.as_ptr(),
                                (optr as *mut f32).add(at),
                                w,
                            );
                        }
                    }
                }
            });
        });
        // SAFETY: the bands cover every (n, c, y) row of `out`, each written in full.
        unsafe { out.set_len(b * co * h * w) };
        out
    }

    /// For a stride-1, undilated conv padded by at most k - 1: the conv whose forward is
    /// this one's input gradient, dx = conv(dy, W') with W'[ci, co, ky, kx] =
    /// W[co, ci, kh-1-ky, kw-1-kx] and padding k-1-p. Its GEMM sums over co·kh·kw (the
    /// forward's shape) where [`Geom::input_grad`]'s sums over co alone and then
    /// scatters kh·kw times as many columns back (col2im).
    pub fn transposed(&self) -> Option<Geom> {
        let ok = self.s == 1
            && self.d == 1
            && self.p < self.kh
            && self.p < self.kw
            && self.kh == self.kw
            && !self.direct();
        ok.then(|| Geom {
            b: self.b,
            ci: self.co,
            h: self.ho,
            w: self.wo,
            co: self.ci,
            kh: self.kh,
            kw: self.kw,
            ho: self.h,
            wo: self.w,
            p: self.kh - 1 - self.p,
            s: 1,
            d: 1,
        })
    }

    /// dx [b, ci, h, w] from dy [b, co, ho, wo]: per sample Wᵀ · dy, then col2im.
    pub fn input_grad(&self, dy: &[f32], wv: &[f32]) -> Vec<f32> {
        let Geom {
            b,
            ci,
            h,
            w: wd,
            co,
            kh,
            kw,
            ho,
            wo,
            p,
            s,
            d,
        } = *self;
        let (np, kk) = (ho * wo, ci * kh * kw);
        let direct = self.direct();
        let mut dx = vec![0f32; b * ci * h * wd];
        let one = |n: usize, o: &mut [f32]| {
            let g = &dy[n * co * np..(n + 1) * co * np];
            if direct {
                // dx[ci, np] = W[co, ci]ᵀ · dy[co, np]
                ftk::linalg::matmul_at(o, wv, g, ci, np, co, false);
                return;
            }
            // `dx` starts zeroed: col2im accumulates into it
            let rows = self.band_rows(kk);
            let nmax = rows * wo;
            with_scratch(&COLS, kk * nmax, |col| {
                with_scratch(&BAND, if nmax < np { co * nmax } else { 0 }, |band| {
                    for oy0 in (0..ho).step_by(rows) {
                        let oys = oy0..(oy0 + rows).min(ho);
                        let nb = oys.len() * wo;
                        let col = &mut col[..kk * nb];
                        if nb == np {
                            ftk::linalg::matmul_at(col, wv, g, kk, np, co, false);
                        } else {
                            // dy's columns of this band, contiguous
                            let band = &mut band[..co * nb];
                            for (brow, grow_row) in band.chunks_mut(nb).zip(g.chunks(np)) {
                                brow.copy_from_slice(&grow_row[oy0 * wo..oy0 * wo + nb]);
                            }
                            ftk::linalg::matmul_at(col, wv, band, kk, nb, co, false);
                        }
                        col2im(col, o, (ci, h, wd), (kh, kw), (oys, wo), (p, s, d));
                    }
                })
            });
        };
        per_sample(&mut dx, ci * h * wd, one);
        dx
    }
}

/// conv2d of a tracked input with constant weights: the fast forward, and a backward
/// that gives only the input's gradient.
struct ConvOp {
    g: Geom,
    weight: Tensor,
    bias: Option<Vec<f32>>,
}

impl CustomOp1 for ConvOp {
    fn name(&self) -> &'static str {
        "ftk-conv2d"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xv = contiguous_f32(st, l)?;
        let out = with_slice(&self.weight, |wv| {
            Ok(self.g.forward(xv, wv, self.bias.as_deref()))
        })?;
        let g = self.g;
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.co, g.ho, g.wo))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = self.g;
        let dx = with_slice(&self.weight, |wv| {
            with_slice(grad, |gv| {
                Ok(match g.transposed() {
                    Some(t) => t.forward(gv, &flipped(&self.weight, wv, &g), None),
                    None => g.input_grad(gv, wv),
                })
            })
        })?;
        Tensor::from_vec(dx, (g.b, g.ci, g.h, g.w), &Device::Cpu).map(Some)
    }
}

/// Flipped kernels kept between backward passes (a guided run differentiates through the
/// same weights every step), by weight tensor, up to [`FLIP_CACHE_FLOATS`] in all.
#[allow(clippy::type_complexity)]
static FLIPPED: std::sync::Mutex<Option<(usize, HashMap<TensorId, Arc<Vec<f32>>>)>> =
    std::sync::Mutex::new(None);

/// 64 Mi floats (256 MiB): every 3x3 kernel of a mid-size UNet, a part of SD-1.5's.
#[cfg(not(test))]
const FLIP_CACHE_FLOATS: usize = 1 << 26;
#[cfg(test)]
const FLIP_CACHE_FLOATS: usize = 1 << 10;

/// [`flip_kernel`] of `weight` (values `w`), from the cache when it is there.
fn flipped(weight: &Tensor, w: &[f32], g: &Geom) -> Arc<Vec<f32>> {
    let lock = || FLIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, m)) = &*lock() {
        if let Some(f) = m.get(&weight.id()) {
            return f.clone();
        }
    }
    let f = Arc::new(flip_kernel(w, g));
    let mut c = lock();
    let (used, m) = c.get_or_insert_with(|| (0, HashMap::new()));
    if *used + f.len() <= FLIP_CACHE_FLOATS {
        *used += f.len();
        m.insert(weight.id(), f.clone());
    }
    f
}

/// W'[ci, co, ky, kx] = W[co, ci, kh-1-ky, kw-1-kx]: the kernel of [`Geom::transposed`].
fn flip_kernel(w: &[f32], g: &Geom) -> Vec<f32> {
    let (ci, co, kk) = (g.ci, g.co, g.kh * g.kw);
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(co * kk).enumerate().for_each(|(i, o)| {
        for (c, oc) in o.chunks_mut(kk).enumerate() {
            let src = &w[(c * ci + i) * kk..(c * ci + i + 1) * kk];
            oc.iter_mut()
                .zip(src.iter().rev())
                .for_each(|(d, &v)| *d = v);
        }
    });
    out
}

/// dx[c, oy*s + ky*d - p, ox*s + kx*d - p] += col[(c, ky, kx), (oy, ox)] for the output
/// rows `oys`: the adjoint of [`im2col`], one channel plane per task.
fn col2im(
    col: &[f32],
    x: &mut [f32],
    (ci, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (oys, wo): (Range<usize>, usize),
    (p, s, d): (usize, usize, usize),
) {
    let np = oys.len() * wo;
    x.par_chunks_mut(h * w)
        .zip(col.par_chunks(kh * kw * np))
        .take(ci)
        .for_each(|(plane, rows)| {
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &rows[(ky * kw + kx) * np..(ky * kw + kx + 1) * np];
                    for (r, oy) in oys.clone().enumerate() {
                        let iy = (oy * s + ky * d) as isize - p as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let src = &row[r * wo..(r + 1) * wo];
                        let dst = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                        let off = (kx * d) as isize - p as isize;
                        if s == 1 {
                            let lo = (-off).clamp(0, wo as isize) as usize;
                            let hi = (w as isize - off).clamp(0, wo as isize) as usize;
                            if hi > lo {
                                let a = (lo as isize + off) as usize;
                                dst[a..a + hi - lo]
                                    .iter_mut()
                                    .zip(&src[lo..hi])
                                    .for_each(|(y, &v)| *y += v);
                            }
                        } else {
                            for (ox, &v) in src.iter().enumerate() {
                                let ix = (ox * s) as isize + off;
                                if ix >= 0 && ix < w as isize {
                                    dst[ix as usize] += v;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// col[(c, ky, kx), (oy, ox)] = x[c, oy*s + ky*d - p, ox*s + kx*d - p] (0 outside).
pub(crate) fn im2col(
    x: &[f32],
    col: &mut [f32],
    (ci, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (oys, wo): (Range<usize>, usize),
    (p, s, d): (usize, usize, usize),
) {
    let np = oys.len() * wo;
    col.par_chunks_mut(kh * kw * np)
        .enumerate()
        .take(ci)
        .for_each(|(c, rows)| {
            let plane = &x[c * h * w..(c + 1) * h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &mut rows[(ky * kw + kx) * np..(ky * kw + kx + 1) * np];
                    for (r, oy) in oys.clone().enumerate() {
                        let dst = &mut row[r * wo..(r + 1) * wo];
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
