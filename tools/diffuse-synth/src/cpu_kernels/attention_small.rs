//! Attention for narrow heads (8 or 16 channels, as the first levels of small SD-1.x
//! UNets have), one query row at a time, with K and V held transposed [d, Lk].
//!
//! With so few channels a score costs d multiply-adds, and the GEMMs of the general
//! path spend most of their time packing and storing rather than multiplying (in a
//! FedCADO step they and the softmax were a quarter of the time). Here a row's scores
//! stay in L1 between the three passes (scores, softmax, weighted sum of V), and the
//! d-long dot products run with the head's channels in registers.

use rayon::prelude::*;

use super::attention::softmax_unnorm;

/// Head widths this module handles.
pub(crate) fn handles(d: usize) -> bool {
    d == 8 || d == 16
}

/// s[j] = Σ_t a[t] · xt[t·lk + j] for one row `a` of D channels.
#[inline(always)]
fn row_dot<const D: usize>(a: &[f32; D], xt: &[f32], lk: usize, s: &mut [f32]) {
    let mut j = 0;
    while j + 16 <= lk {
        let mut acc = [0f32; 16];
        for (t, &at) in a.iter().enumerate() {
            let x = &xt[t * lk + j..t * lk + j + 16];
            for l in 0..16 {
                acc[l] += at * x[l];
            }
        }
        s[j..j + 16].copy_from_slice(&acc);
        j += 16;
    }
    for (jj, sj) in s.iter_mut().enumerate().take(lk).skip(j) {
        let mut acc = 0f32;
        for (t, &at) in a.iter().enumerate() {
            acc += at * xt[t * lk + jj];
        }
        *sj = acc;
    }
}

/// out[t] = Σ_j p[j] · xt[t·lk + j].
#[inline(always)]
fn row_wsum<const D: usize>(p: &[f32], xt: &[f32], lk: usize) -> [f32; D] {
    let mut acc = [[0f32; 16]; D];
    let mut j = 0;
    while j + 16 <= lk {
        let pj = &p[j..j + 16];
        for (t, at) in acc.iter_mut().enumerate() {
            let x = &xt[t * lk + j..t * lk + j + 16];
            for l in 0..16 {
                at[l] += pj[l] * x[l];
            }
        }
        j += 16;
    }
    let mut out = [0f32; D];
    for (t, o) in out.iter_mut().enumerate() {
        let mut sum = acc[t].iter().sum::<f32>();
        for jj in j..lk {
            sum += p[jj] * xt[t * lk + jj];
        }
        *o = sum;
    }
    out
}

/// xt[t·lk + j] += a[t] · p[j] (a rank-one update of a transposed [D, lk] block).
#[inline(always)]
fn row_outer<const D: usize>(a: &[f32; D], p: &[f32], xt: &mut [f32], lk: usize) {
    for (t, &at) in a.iter().enumerate() {
        xt[t * lk..(t + 1) * lk]
            .iter_mut()
            .zip(&p[..lk])
            .for_each(|(x, &pj)| *x += at * pj);
    }
}

multiversion! {
    fn dot8(a: &[f32; 8], xt: &[f32], lk: usize, s: &mut [f32]) { row_dot::<8>(a, xt, lk, s) }
}
multiversion! {
    fn dot16(a: &[f32; 16], xt: &[f32], lk: usize, s: &mut [f32]) { row_dot::<16>(a, xt, lk, s) }
}
multiversion! {
    fn wsum8(p: &[f32], xt: &[f32], lk: usize) -> [f32; 8] { row_wsum::<8>(p, xt, lk) }
}
multiversion! {
    fn wsum16(p: &[f32], xt: &[f32], lk: usize) -> [f32; 16] { row_wsum::<16>(p, xt, lk) }
}
multiversion! {
    fn outer8(a: &[f32; 8], p: &[f32], xt: &mut [f32], lk: usize) { row_outer::<8>(a, p, xt, lk) }
}
multiversion! {
    fn outer16(a: &[f32; 16], p: &[f32], xt: &mut [f32], lk: usize) { row_outer::<16>(a, p, xt, lk) }
}

/// The three row kernels for one head width.
trait Width<const D: usize> {
    fn dot(a: &[f32; D], xt: &[f32], lk: usize, s: &mut [f32]);
    fn wsum(p: &[f32], xt: &[f32], lk: usize) -> [f32; D];
    fn outer(a: &[f32; D], p: &[f32], xt: &mut [f32], lk: usize);
}

struct W;

impl Width<8> for W {
    fn dot(a: &[f32; 8], xt: &[f32], lk: usize, s: &mut [f32]) {
        dot8(a, xt, lk, s)
    }
    fn wsum(p: &[f32], xt: &[f32], lk: usize) -> [f32; 8] {
        wsum8(p, xt, lk)
    }
    fn outer(a: &[f32; 8], p: &[f32], xt: &mut [f32], lk: usize) {
        outer8(a, p, xt, lk)
    }
}

impl Width<16> for W {
    fn dot(a: &[f32; 16], xt: &[f32], lk: usize, s: &mut [f32]) {
        dot16(a, xt, lk, s)
    }
    fn wsum(p: &[f32], xt: &[f32], lk: usize) -> [f32; 16] {
        wsum16(p, xt, lk)
    }
    fn outer(a: &[f32; 16], p: &[f32], xt: &mut [f32], lk: usize) {
        outer16(a, p, xt, lk)
    }
}

/// The shapes of one call: batch, query and key lengths, heads × width, softmax scale.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub b: usize,
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    pub d: usize,
    pub scale: f32,
}

impl Shape {
    fn hd(&self) -> usize {
        self.heads * self.d
    }

    /// Head h of sample bi of x [B, L, H·d], transposed to [d, L].
    fn transposed(&self, x: &[f32], l: usize, bi: usize, h: usize) -> Vec<f32> {
        let (hd, d) = (self.hd(), self.d);
        let mut t = vec![0f32; d * l];
        for j in 0..l {
            let row = &x[(bi * l + j) * hd + h * d..][..d];
            for (c, &v) in row.iter().enumerate() {
                t[c * l + j] = v;
            }
        }
        t
    }

    /// Row i's channels of head h, sample bi, of x [B, L, H·d].
    fn row<const D: usize>(&self, x: &[f32], l: usize, bi: usize, h: usize, i: usize) -> [f32; D] {
        let mut r = [0f32; D];
        r.copy_from_slice(&x[(bi * l + i) * self.hd() + h * D..][..D]);
        r
    }
}

/// softmax(scale · Q Kᵀ) V for q [B, Lq, H·d], k, v [B, Lk, H·d], d = 8 or 16.
pub(crate) fn forward(g: Shape, qv: &[f32], kv: &[f32], vv: &[f32]) -> Vec<f32> {
    match g.d {
        8 => forward_d::<8>(g, qv, kv, vv),
        _ => forward_d::<16>(g, qv, kv, vv),
    }
}

/// One task per (sample, head, block of query rows): its output rows are its own.
fn forward_d<const D: usize>(g: Shape, qv: &[f32], kv: &[f32], vv: &[f32]) -> Vec<f32>
where
    W: Width<D>,
{
    let (lq, lk, hd) = (g.lq, g.lk, g.hd());
    let mut out = vec![0f32; g.b * lq * hd];
    let optr = out.as_mut_ptr() as usize;
    const ROWS: usize = 256;
    let nqb = lq.div_ceil(ROWS);
    (0..g.b * g.heads * nqb).into_par_iter().for_each(|task| {
        let (bh, qb) = (task / nqb, task % nqb);
        let (bi, h) = (bh / g.heads, bh % g.heads);
        let (kt, vt) = (g.transposed(kv, lk, bi, h), g.transposed(vv, lk, bi, h));
        let mut s = vec![0f32; lk];
        let mut inv = [0f32; 1];
        for i in qb * ROWS..((qb + 1) * ROWS).min(lq) {
            let mut q = g.row::<D>(qv, lq, bi, h, i);
            q.iter_mut().for_each(|x| *x *= g.scale);
            <W as Width<D>>::dot(&q, &kt, lk, &mut s);
            softmax_unnorm(&mut s, lk, &mut inv);
            let o = <W as Width<D>>::wsum(&s, &vt, lk);
            // SAFETY: row i of head h of sample bi lies inside `out` (which outlives the
            // loop), and only this task writes it.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((optr as *mut f32).add((bi * lq + i) * hd + h * D), D)
            };
            dst.iter_mut().zip(o).for_each(|(y, v)| *y = v * inv[0]);
        }
    });
    out
}

/// dQ, dK, dV from dO, the probabilities recomputed row by row: dV += p dOᵢ,
/// dS = p ∘ (dO Vᵀ - p·dO Vᵀ), dQᵢ = scale dS K, dK += scale dS qᵢ.
pub(crate) fn grads(g: Shape, qv: &[f32], kv: &[f32], vv: &[f32], dov: &[f32]) -> [Vec<f32>; 3] {
    match g.d {
        8 => grads_d::<8>(g, qv, kv, vv, dov),
        _ => grads_d::<16>(g, qv, kv, vv, dov),
    }
}

/// One task per (sample, head): it owns that head's columns of dQ, dK and dV.
fn grads_d<const D: usize>(
    g: Shape,
    qv: &[f32],
    kv: &[f32],
    vv: &[f32],
    dov: &[f32],
) -> [Vec<f32>; 3]
where
    W: Width<D>,
{
    let (lq, lk, hd) = (g.lq, g.lk, g.hd());
    let mut dq = vec![0f32; g.b * lq * hd];
    let mut dk = vec![0f32; g.b * lk * hd];
    let mut dv = vec![0f32; g.b * lk * hd];
    let ptrs = (
        dq.as_mut_ptr() as usize,
        dk.as_mut_ptr() as usize,
        dv.as_mut_ptr() as usize,
    );
    (0..g.b * g.heads).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / g.heads, bh % g.heads);
        let (kt, vt) = (g.transposed(kv, lk, bi, h), g.transposed(vv, lk, bi, h));
        let (mut dkt, mut dvt) = (vec![0f32; D * lk], vec![0f32; D * lk]);
        let (mut p, mut dp) = (vec![0f32; lk], vec![0f32; lk]);
        let mut inv = [0f32; 1];
        for i in 0..lq {
            let mut q = g.row::<D>(qv, lq, bi, h, i);
            q.iter_mut().for_each(|x| *x *= g.scale);
            let d_o = g.row::<D>(dov, lq, bi, h, i);
            <W as Width<D>>::dot(&q, &kt, lk, &mut p);
            softmax_unnorm(&mut p, lk, &mut inv);
            p.iter_mut().for_each(|x| *x *= inv[0]);
            <W as Width<D>>::outer(&d_o, &p, &mut dvt, lk);
            <W as Width<D>>::dot(&d_o, &vt, lk, &mut dp);
            let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
            dp.iter_mut()
                .zip(&p)
                .for_each(|(x, &pj)| *x = pj * (*x - dot));
            let gq = <W as Width<D>>::wsum(&dp, &kt, lk);
            <W as Width<D>>::outer(&q, &dp, &mut dkt, lk);
            // SAFETY: row i of head h of sample bi lies inside `dq` (which outlives the
            // loop); only this task writes head h of sample bi.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    (ptrs.0 as *mut f32).add((bi * lq + i) * hd + h * D),
                    D,
                )
            };
            dst.iter_mut().zip(gq).for_each(|(y, v)| *y = v * g.scale);
        }
        for j in 0..lk {
            let off = (bi * lk + j) * hd + h * D;
            // SAFETY: as above, for row j of dK and dV.
            let (kd, vd) = unsafe {
                (
                    std::slice::from_raw_parts_mut((ptrs.1 as *mut f32).add(off), D),
                    std::slice::from_raw_parts_mut((ptrs.2 as *mut f32).add(off), D),
                )
            };
            for c in 0..D {
                kd[c] = dkt[c * lk + j];
                vd[c] = dvt[c * lk + j];
            }
        }
    });
    [dq, dk, dv]
}
