//! Softmax, GEGLU and multi-head attention.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor, D,
};
use candle_nn as nn;
use rayon::prelude::*;

use super::{contiguous_f32, f32_cpu, fast, with_scratch, with_slice};

use super::math::{erf, exp, exp_g, max_lanes};
use super::SCORES;

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

multiversion! {
    /// [`softmax_unnorm_body`] compiled for AVX-512 or AVX2 with FMA when the CPU has them.
    fn softmax_unnorm(rows: &mut [f32], n: usize, inv: &mut [f32]) = softmax_unnorm_body::<FMA>
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

multiversion! {
    /// da = dy gelu(g), dg = dy a gelu'(g) with gelu'(x) = Φ(x) + x φ(x); da, dg
    /// arrive holding dy.
    fn geglu_grad_chunk(da: &mut [f32], dg: &mut [f32], a: &[f32], g: &[f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for (((da, dg), &a), &x) in da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            let dy = *da;
            *da = dy * x * cdf;
            *dg = dy * a * (cdf + x * pdf);
        }
    }
}

/// GEGLU of a projection [.., 2d] whose last dim holds a then g (diffusers'
/// `hidden_states, gate = proj(x).chunk(2, -1)`): `a * gelu_erf(g)` [.., d], read in place
/// (no chunk copies). A tracked projection runs as one custom op whose backward writes the
/// projection's gradient [.., 2d] directly (no narrow / pad-and-cat nodes).
pub fn geglu_packed(x: &Tensor) -> Result<Tensor> {
    let two_d = x.dim(D::Minus1)?;
    if !f32_cpu(x) || two_d % 2 != 0 {
        let h = x.chunk(2, D::Minus1)?;
        return geglu(&h[0], &h[1]);
    }
    if x.track_op() {
        return x.contiguous()?.apply_op1(GegluPacked);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap_or(&mut 0) = two_d / 2;
    let out = with_slice(x, |xv| Ok(GegluPacked::forward(xv, two_d / 2)))?;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// Rows per GEGLU task (a few tens of KiB each).
fn geglu_task_rows(d: usize) -> usize {
    ((1 << 13) / d.max(1)).max(1)
}

struct GegluPacked;

impl GegluPacked {
    fn forward(xv: &[f32], d: usize) -> Vec<f32> {
        let rows = xv.len() / (2 * d).max(1);
        let mut out = vec![0f32; rows * d];
        let r = geglu_task_rows(d);
        out.par_chunks_mut(r * d)
            .zip(xv.par_chunks(r * 2 * d))
            .for_each(|(o, x)| {
                for (or, xr) in o.chunks_mut(d).zip(x.chunks(2 * d)) {
                    let (a, g) = xr.split_at(d);
                    or.copy_from_slice(a);
                    geglu_chunk(or, g);
                }
            });
        out
    }
}

impl CustomOp1 for GegluPacked {
    fn name(&self) -> &'static str {
        "ftk-geglu-packed"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xv = contiguous_f32(st, l)?;
        let mut dims = l.dims().to_vec();
        let d = *dims.last().unwrap_or(&0) / 2;
        *dims.last_mut().unwrap_or(&mut 0) = d;
        Ok((CpuStorage::F32(Self::forward(xv, d)), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.dim(D::Minus1)? / 2;
        let dx = with_slice(arg, |xv| {
            with_slice(grad, |gv| {
                let mut dx = vec![0f32; xv.len()];
                let r = geglu_task_rows(d);
                dx.par_chunks_mut(r * 2 * d)
                    .zip(xv.par_chunks(r * 2 * d).zip(gv.par_chunks(r * d)))
                    .for_each(|(dx, (x, g))| {
                        for ((dr, xr), gr) in
                            dx.chunks_mut(2 * d).zip(x.chunks(2 * d)).zip(g.chunks(d))
                        {
                            let (da, dg) = dr.split_at_mut(d);
                            da.copy_from_slice(gr);
                            dg.copy_from_slice(gr);
                            let (a, g) = xr.split_at(d);
                            geglu_grad_chunk(da, dg, a, g);
                        }
                    });
                Ok(dx)
            })
        })?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}

/// `a * gelu_erf(g)` (diffusers' GEGLU with the exact GELU); tracked inputs run as a
/// custom op with its own backward.
pub fn geglu(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    if !f32_cpu(a) || !f32_cpu(g) || a.dims() != g.dims() {
        return a * g.gelu_erf()?;
    }
    if a.track_op() || g.track_op() {
        return a.contiguous()?.apply_op2(&g.contiguous()?, Geglu);
    }
    let dims = a.dims().to_vec();
    let out = with_slice(a, |av| with_slice(g, |gv| Ok(geglu_fwd(av, gv))))?;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// y <- y gelu(g), in place (one row of [`super::Linear::forward_geglu`]).
pub(super) fn geglu_rows(y: &mut [f32], g: &[f32]) {
    geglu_chunk(y, g)
}

fn geglu_fwd(a: &[f32], g: &[f32]) -> Vec<f32> {
    let mut out = a.to_vec();
    out.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14))
        .for_each(|(o, g)| geglu_chunk(o, g));
    out
}

struct Geglu;

impl CustomOp2 for Geglu {
    fn name(&self) -> &'static str {
        "ftk-geglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = geglu_fwd(contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (mut da, mut dg) = with_slice(grad, |d| Ok((d.to_vec(), d.to_vec())))?;
        with_slice(a, |av| {
            with_slice(g, |gv| {
                const C: usize = 1 << 14;
                da.par_chunks_mut(C)
                    .zip(dg.par_chunks_mut(C))
                    .zip(av.par_chunks(C).zip(gv.par_chunks(C)))
                    .for_each(|((da, dg), (a, g))| geglu_grad_chunk(da, dg, a, g));
                Ok(())
            })
        })?;
        let dims = a.dims();
        Ok((
            Some(Tensor::from_vec(da, dims, &Device::Cpu)?),
            Some(Tensor::from_vec(dg, dims, &Device::Cpu)?),
        ))
    }
}

// ---------------------------------------------------------------- attention

/// Query rows per attention task: their scores [QB, Lk] stay in L2.
pub(super) const QB: usize = 64;

/// The forward's query rows per task and keys per block: a [128, 256] score tile
/// (128 KiB) and a [128, d] output block stay in L2 across the key blocks.
const FQB: usize = 128;
const FKB: usize = 256;

/// Whether [`attention`] can run on these f32 CPU projections (tracked or not).
pub fn attention_ok(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v].iter().all(|t| f32_cpu(t))
}

/// softmax(scale · Q Kᵀ) V per head, reading the heads in place from q [B, Lq, H·d],
/// k, v [B, Lk, H·d] and writing [B, Lq, H·d]: one task per (sample, head, 64 query
/// rows), each a pair of single-threaded GEMMs around a softmax on its own rows.
/// With a tracked input it runs as a custom op whose backward is [`Attn::grads`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, lq, hd) = q.dims3()?;
    let (_, lk, _) = k.dims3()?;
    if k.dims3()? != (b, lk, hd) || v.dims3()? != (b, lk, hd) || hd % heads != 0 || lk == 0 {
        candle_core::bail!(
            "attention: q {:?} k {:?} v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let op = Attn {
        b,
        lq,
        lk,
        hd,
        heads,
        scale: scale as f32,
    };
    if q.track_op() || k.track_op() || v.track_op() {
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let out = with_slice(q, |qv| {
        with_slice(k, |kv| with_slice(v, |vv| Ok(op.forward(qv, kv, vv))))
    })?;
    Tensor::from_vec(out, (b, lq, hd), &Device::Cpu)
}

/// c (+)= beta · a · b for strided matrices (strides as (column, row)), single-threaded.
///
/// # Safety
/// Every element the strides reach must lie inside its allocation; `c` must not alias
/// `a` or `b`, and no other thread writes the elements of `c` it reaches.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_s(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    (ccs, crs): (usize, usize),
    acc: bool,
    a: *const f32,
    (acs, ars): (usize, usize),
    b: *const f32,
    (bcs, brs): (usize, usize),
    beta: f32,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            ccs as isize,
            crs as isize,
            acc,
            a,
            acs as isize,
            ars as isize,
            b,
            bcs as isize,
            brs as isize,
            if acc { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Attn {
    b: usize,
    lq: usize,
    lk: usize,
    hd: usize,
    heads: usize,
    scale: f32,
}

/// Head widths below this take the forward's scores column-major and accumulate the
/// backward's dK and dV column-major (transposed into place once per head): the GEMMs
/// then vectorise along the rows or keys, where a row-major [rows, d] output fills only d
/// of the 16 lanes of a register tile. (The backward's dS K stays row-major: dS is made
/// row by row, and a column-major output would make the GEMM pack it, which costs what
/// the wider tile saves.)
const NARROW: usize = 32;

/// dst[r · rs + c] = src[c · m + r] for r < m, c < d: a column-major [m, d] block
/// moved into a row-major one whose rows are `rs` apart.
///
/// # Safety
/// `dst` must reach (m - 1) · rs + d elements that no other thread writes.
#[inline(always)]
unsafe fn untranspose(dst: *mut f32, rs: usize, src: &[f32], m: usize, d: usize) {
    for r in 0..m {
        // SAFETY: forwarded to the caller.
        let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * rs), d) };
        for (c, y) in row.iter_mut().enumerate() {
            *y = src[c * m + r];
        }
    }
}

multiversion! {
    /// dS = P ∘ (dP - rowsum(P ∘ dP)) in place of dP, rows of `n` (16 lanes for the sum).
    fn softmax_grad_rows(p: &[f32], dp: &mut [f32], n: usize) {
        for (pr, dr) in p.chunks(n).zip(dp.chunks_mut(n)) {
            let mut acc = [0f32; 16];
            let (pc, dc) = (pr.chunks_exact(16), dr.chunks_exact(16));
            let (prem, drem) = (pc.remainder(), dc.remainder());
            for (a, b) in pc.zip(dc) {
                for i in 0..16 {
                    acc[i] += a[i] * b[i];
                }
            }
            let dot = acc.iter().sum::<f32>()
                + prem.iter().zip(drem).map(|(a, b)| a * b).sum::<f32>();
            dr.iter_mut()
                .zip(pr)
                .for_each(|(g, &pv)| *g = pv * (*g - dot));
        }
    }
}

/// One key block of the online softmax: the column-major [m, kb] scores `s` become
/// exp(s - max) under each row's running max `mx` (raised to this block's max first);
/// where a max grew, the row's running `sum` and its column-major [m, d] output `acc`
/// so far are scaled by exp(old - new) (`acc` is untouched before the first block, when
/// every max is -inf and the caller's GEMM overwrites it).
#[inline(always)]
fn online_softmax_cols_body<const FMA: bool>(
    s: &mut [f32],
    m: usize,
    mx: &mut [f32],
    sum: &mut [f32],
    acc: &mut [f32],
) {
    let first = mx[0] == f32::NEG_INFINITY;
    let mut alpha = [1f32; FQB];
    let mut grown = false;
    let mut bm = [f32::NEG_INFINITY; FQB];
    for col in s.chunks_exact(m) {
        bm[..m]
            .iter_mut()
            .zip(col)
            .for_each(|(a, &v)| *a = a.max(v));
    }
    for r in 0..m {
        if bm[r] > mx[r] {
            if !first {
                alpha[r] = exp_g::<FMA>(mx[r] - bm[r]);
                grown = true;
            }
            mx[r] = bm[r];
        }
    }
    if grown {
        sum.iter_mut().zip(&alpha[..m]).for_each(|(t, &a)| *t *= a);
        for col in acc.chunks_exact_mut(m) {
            col.iter_mut().zip(&alpha[..m]).for_each(|(y, &a)| *y *= a);
        }
    }
    for col in s.chunks_exact_mut(m) {
        for ((v, &mr), sr) in col.iter_mut().zip(mx.iter()).zip(sum.iter_mut()) {
            *v = exp_g::<FMA>(*v - mr);
            *sr += *v;
        }
    }
}

multiversion! {
    /// [`online_softmax_cols_body`] compiled for AVX-512 or AVX2 with FMA when the CPU has them.
    fn online_softmax_cols(s: &mut [f32], m: usize, mx: &mut [f32], sum: &mut [f32], acc: &mut [f32]) = online_softmax_cols_body::<FMA>
}

impl Attn {
    /// Flash-attention style: one task per (sample, head, [`FQB`] query rows) walks the
    /// keys in blocks of [`FKB`], keeping a running row max and sum and rescaling its
    /// output block when the max grows, so the [FQB, FKB] score tile and the [FQB, d]
    /// output stay in L1/L2 (both GEMMs run about 40% faster on such tiles than on
    /// [64, Lk] scores at 4096 tokens).
    fn forward(&self, qv: &[f32], kv: &[f32], vv: &[f32]) -> Vec<f32> {
        let Attn {
            b,
            lq,
            lk,
            hd,
            heads,
            scale,
        } = *self;
        let d = hd / heads;
        let mut out = super::zeros(b * lq * hd);
        let optr = out.as_mut_ptr() as usize;
        let nqb = lq.div_ceil(FQB);
        (0..b * heads * nqb).into_par_iter().for_each(|task| {
            let (bh, qb) = (task / nqb, task % nqb);
            let (bi, h) = (bh / heads, bh % heads);
            let q0 = qb * FQB;
            let m = FQB.min(lq - q0);
            let kbmax = FKB.min(lk);
            with_scratch(&SCORES, m * kbmax + m * d, |sc| {
                let (s, acc) = sc.split_at_mut(m * kbmax);
                let mut mx = [f32::NEG_INFINITY; FQB];
                let mut sum = [0f32; FQB];
                let qoff = (bi * lq + q0) * hd + h * d;
                let kvoff = bi * lk * hd + h * d;
                for j0 in (0..lk).step_by(FKB) {
                    let kb = FKB.min(lk - j0);
                    let s = &mut s[..m * kb];
                    let (kp, vp) = (
                        kv[kvoff + j0 * hd..].as_ptr(),
                        vv[kvoff + j0 * hd..].as_ptr(),
                    );
                    // SAFETY: the Q rows q0..q0+m, K and V rows j0..j0+kb of head h lie
                    // inside their slices (offsets above); `s` and `acc` are this task's
                    // scratch, column-major [m, kb] and [m, d].
                    unsafe {
                        gemm_s(
                            (m, kb, d),
                            s.as_mut_ptr(),
                            (m, 1),
                            false,
                            qv[qoff..].as_ptr(),
                            (1, hd),
                            kp,
                            (hd, 1),
                            scale,
                        );
                    }
                    online_softmax_cols(s, m, &mut mx[..m], &mut sum[..m], acc);
                    // SAFETY: as above.
                    unsafe {
                        gemm_s(
                            (m, d, kb),
                            acc.as_mut_ptr(),
                            (m, 1),
                            j0 > 0,
                            s.as_ptr(),
                            (m, 1),
                            vp,
                            (1, hd),
                            1.0,
                        );
                    }
                }
                // SAFETY: tasks write disjoint (row, head) blocks of `out`, which
                // outlives the parallel loop.
                unsafe {
                    let dst = (optr as *mut f32).add(qoff);
                    for r in 0..m {
                        let row = std::slice::from_raw_parts_mut(dst.add(r * hd), d);
                        let inv = 1.0 / sum[r];
                        for (c, y) in row.iter_mut().enumerate() {
                            *y = acc[c * m + r] * inv;
                        }
                    }
                }
            });
        });
        out
    }

    /// dQ, dK, dV from dO, recomputing each block's probabilities P
    /// (flash-attention's backward): dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(P ∘ dO Vᵀ)),
    /// dQ = scale dS K, dK = scale dSᵀ Q. One task per (sample, head) owns its dK, dV
    /// columns; narrow heads accumulate them column-major and write them once at the end.
    ///
    /// Long because the strided GEMMs share one unsafe block whose offsets are checked
    /// together.
    #[cfg(test)]
    fn grads(&self, qv: &[f32], kv: &[f32], vv: &[f32], dov: &[f32]) -> [Vec<f32>; 3] {
        self.grads_of(qv, kv, vv, dov, [true; 3])
    }

    /// [`Attn::grads`] computing only the gradients `need` asks for (the others come
    /// back empty): cross-attention's K and V of a constant context need none.
    fn grads_of(
        &self,
        qv: &[f32],
        kv: &[f32],
        vv: &[f32],
        dov: &[f32],
        need: [bool; 3],
    ) -> [Vec<f32>; 3] {
        let Attn {
            b,
            lq,
            lk,
            hd,
            heads,
            scale,
        } = *self;
        let d = hd / heads;
        let narrow = d < NARROW;
        let buf = |n: usize, keep: bool| if keep { vec![0f32; n] } else { Vec::new() };
        let mut dq = buf(b * lq * hd, need[0]);
        let mut dk = buf(b * lk * hd, need[1]);
        let mut dv = buf(b * lk * hd, need[2]);
        let need_ds = need[0] || need[1];
        let ptrs = (
            dq.as_mut_ptr() as usize,
            dk.as_mut_ptr() as usize,
            dv.as_mut_ptr() as usize,
        );
        (0..b * heads).into_par_iter().for_each(|bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let kvoff = bi * lk * hd + h * d;
            let mut p = vec![0f32; QB * lk];
            let mut dp = vec![0f32; QB * lk];
            // narrow heads: dKᵀ, dVᵀ column-major [lk, d]
            let mut acc = if narrow {
                vec![0f32; 2 * lk * d]
            } else {
                Vec::new()
            };
            let (dkt, dvt) = acc.split_at_mut(if narrow { lk * d } else { 0 });
            let mut inv = [0f32; QB];
            let dkp = (ptrs.1 as *mut f32).wrapping_add(kvoff);
            let dvp = (ptrs.2 as *mut f32).wrapping_add(kvoff);
            for q0 in (0..lq).step_by(QB) {
                let m = QB.min(lq - q0);
                let qoff = (bi * lq + q0) * hd + h * d;
                let dp = &mut dp[..m * lk];
                // SAFETY: operand ranges lie inside their slices as in `forward`; this
                // task alone writes head h of sample bi in dq, dk and dv.
                unsafe {
                    let (qp, kp, vp) = (
                        qv[qoff..].as_ptr(),
                        kv[kvoff..].as_ptr(),
                        vv[kvoff..].as_ptr(),
                    );
                    let dop = dov[qoff..].as_ptr();
                    let p = &mut p[..m * lk];
                    gemm_s(
                        (m, lk, d),
                        p.as_mut_ptr(),
                        (1, lk),
                        false,
                        qp,
                        (1, hd),
                        kp,
                        (hd, 1),
                        scale,
                    );
                    softmax_unnorm(p, lk, &mut inv[..m]);
                    for (r, &iv) in p.chunks_mut(lk).zip(&inv[..m]) {
                        r.iter_mut().for_each(|v| *v *= iv);
                    }
                    // dV[lk, d] += P[m, lk]ᵀ · dO[m, d]
                    if need[2] && narrow {
                        gemm_s(
                            (lk, d, m),
                            dvt.as_mut_ptr(),
                            (lk, 1),
                            q0 > 0,
                            p.as_ptr(),
                            (lk, 1),
                            dop,
                            (1, hd),
                            1.0,
                        );
                    } else if need[2] {
                        gemm_s(
                            (lk, d, m),
                            dvp,
                            (1, hd),
                            q0 > 0,
                            p.as_ptr(),
                            (lk, 1),
                            dop,
                            (1, hd),
                            1.0,
                        );
                    }
                    if !need_ds {
                        continue;
                    }
                    // dP[m, lk] = dO[m, d] · V[lk, d]ᵀ, then dS in its place
                    gemm_s(
                        (m, lk, d),
                        dp.as_mut_ptr(),
                        (1, lk),
                        false,
                        dop,
                        (1, hd),
                        vp,
                        (hd, 1),
                        1.0,
                    );
                    softmax_grad_rows(p, dp, lk);
                    // dQ[m, d] = scale dS[m, lk] · K[lk, d]
                    if need[0] {
                        let dqp = (ptrs.0 as *mut f32).add(qoff);
                        gemm_s(
                            (m, d, lk),
                            dqp,
                            (1, hd),
                            false,
                            dp.as_ptr(),
                            (1, lk),
                            kp,
                            (1, hd),
                            scale,
                        );
                    }
                    // dK[lk, d] += scale dS[m, lk]ᵀ · Q[m, d]
                    if need[1] && narrow {
                        gemm_s(
                            (lk, d, m),
                            dkt.as_mut_ptr(),
                            (lk, 1),
                            q0 > 0,
                            dp.as_ptr(),
                            (lk, 1),
                            qp,
                            (1, hd),
                            scale,
                        );
                    } else if need[1] {
                        gemm_s(
                            (lk, d, m),
                            dkp,
                            (1, hd),
                            q0 > 0,
                            dp.as_ptr(),
                            (lk, 1),
                            qp,
                            (1, hd),
                            scale,
                        );
                    }
                }
            }
            if narrow && lq > 0 {
                // SAFETY: this task alone writes head h of sample bi in dk and dv; the
                // rows reach (lk - 1) · hd + d elements past kvoff.
                unsafe {
                    if need[1] {
                        untranspose(dkp, hd, dkt, lk, d);
                    }
                    if need[2] {
                        untranspose(dvp, hd, dvt, lk, d);
                    }
                }
            }
        });
        [dq, dk, dv]
    }
}

impl CustomOp3 for Attn {
    fn name(&self) -> &'static str {
        "ftk-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let out = self.forward(q, k, v);
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.b, self.lq, self.hd)),
        ))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = [q.track_op(), k.track_op(), v.track_op()];
        let [dq, dk, dv] = with_slice(q, |qv| {
            with_slice(k, |kv| {
                with_slice(v, |vv| {
                    with_slice(grad, |gv| Ok(self.grads_of(qv, kv, vv, gv, need)))
                })
            })
        })?;
        let (b, lq, lk, hd) = (self.b, self.lq, self.lk, self.hd);
        let t = |x: Vec<f32>, l: usize, keep: bool| -> Result<Option<Tensor>> {
            match keep {
                true => Tensor::from_vec(x, (b, l, hd), &Device::Cpu).map(Some),
                false => Ok(None),
            }
        };
        Ok((
            t(dq, lq, need[0])?,
            t(dk, lk, need[1])?,
            t(dv, lk, need[2])?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        // a small LCG: the test only needs varied values
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// An attention of these sizes (scale 1/sqrt(d)) and its q, k, v.
    fn case(b: usize, lq: usize, lk: usize, heads: usize, d: usize) -> (Attn, [Vec<f32>; 3]) {
        let hd = heads * d;
        let op = Attn {
            b,
            lq,
            lk,
            hd,
            heads,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let qkv = [
            noise(b * lq * hd, 1),
            noise(b * lk * hd, 2),
            noise(b * lk * hd, 3),
        ];
        (op, qkv)
    }

    /// softmax(scale · q_i · Kᵀ) in f64 for query `i` of head `h`, sample `bi`.
    fn naive_probs(op: &Attn, q: &[f32], k: &[f32], bi: usize, h: usize, i: usize) -> Vec<f64> {
        let d = op.hd / op.heads;
        let at = |x: &[f32], l: usize, r: usize, c: usize| {
            f64::from(x[(bi * l + r) * op.hd + h * d + c])
        };
        let s: Vec<f64> = (0..op.lk)
            .map(|j| {
                f64::from(op.scale)
                    * (0..d)
                        .map(|c| at(q, op.lq, i, c) * at(k, op.lk, j, c))
                        .sum::<f64>()
            })
            .collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    /// dQ, dK, dV by the textbook formulas in f64, one (sample, head) at a time.
    fn naive_grads(op: &Attn, q: &[f32], k: &[f32], v: &[f32], g: &[f32]) -> [Vec<f64>; 3] {
        let (b, lq, lk, hd, heads) = (op.b, op.lq, op.lk, op.hd, op.heads);
        let (d, sc) = (hd / heads, f64::from(op.scale));
        let mut out = [
            vec![0f64; b * lq * hd],
            vec![0f64; b * lk * hd],
            vec![0f64; b * lk * hd],
        ];
        for bi in 0..b {
            for h in 0..heads {
                let at = |x: &[f32], l: usize, r: usize, c: usize| {
                    f64::from(x[(bi * l + r) * hd + h * d + c])
                };
                for i in 0..lq {
                    let p = naive_probs(op, q, k, bi, h, i);
                    let dp: Vec<f64> = (0..lk)
                        .map(|j| {
                            (0..d)
                                .map(|c| at(g, lq, i, c) * at(v, lk, j, c))
                                .sum::<f64>()
                        })
                        .collect();
                    let dot: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for j in 0..lk {
                        let ds = p[j] * (dp[j] - dot);
                        for c in 0..d {
                            out[0][(bi * lq + i) * hd + h * d + c] += sc * ds * at(k, lk, j, c);
                            out[1][(bi * lk + j) * hd + h * d + c] += sc * ds * at(q, lq, i, c);
                            out[2][(bi * lk + j) * hd + h * d + c] += p[j] * at(g, lq, i, c);
                        }
                    }
                }
            }
        }
        out
    }

    /// The input gradients match the textbook formulas, for narrow (column-major dK,
    /// dV) and wide (direct) heads.
    #[test]
    fn attention_gradients_match_the_formulas() {
        for d in [8usize, 16, 32, 40] {
            let (op, [q, k, v]) = case(2, 70, 37, 2, d);
            let g = noise(op.b * op.lq * op.hd, 4);
            let a = op.grads(&q, &k, &v, &g);
            let want = naive_grads(&op, &q, &k, &v, &g);
            for (got, want) in a.iter().zip(&want) {
                let diff = got
                    .iter()
                    .zip(want)
                    .map(|(x, y)| (f64::from(*x) - y).abs())
                    .fold(0f64, f64::max);
                assert!(
                    diff <= 1e-5,
                    "d {d}: max abs diff {diff} from the f64 formula"
                );
            }
        }
    }

    /// softmax(scale · Q Kᵀ) V in f64 for head widths 8 to 160, partial query blocks,
    /// short (cross-attention) and single-key lists, batches of two.
    #[test]
    fn forward_matches_the_formula() {
        for (b, lq, lk, heads, d) in [
            (2, 130, 77, 2, 40),
            (1, 64, 300, 1, 160),
            (2, 5, 9, 4, 8),
            (1, 257, 257, 8, 40),
            (2, 70, 1, 1, 80),
        ] {
            let (op, [q, k, v]) = case(b, lq, lk, heads, d);
            let hd = op.hd;
            let got = op.forward(&q, &k, &v);
            let mut diff = 0f64;
            for bi in 0..b {
                for h in 0..heads {
                    for i in 0..lq {
                        let p = naive_probs(&op, &q, &k, bi, h, i);
                        for c in h * d..(h + 1) * d {
                            let want: f64 = (0..lk)
                                .map(|j| p[j] * f64::from(v[(bi * lk + j) * hd + c]))
                                .sum();
                            let y = f64::from(got[(bi * lq + i) * hd + c]);
                            diff = diff.max((y - want).abs());
                        }
                    }
                }
            }
            assert!(diff < 1e-5, "{b} {lq} {lk} {heads} {d}: {diff}");
        }
    }
}
