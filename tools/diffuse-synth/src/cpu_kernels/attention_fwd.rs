//! Inference attention (no gradient) with each block's scores stored key-major.
//!
//! [`super::attention`] keeps a block's scores query-major, which the `gemm` crate
//! (whose kernels want column-major destinations) computes transposed, packing the
//! head's K, and then V, again for every block of query rows: at SD-1.5's 4096 tokens
//! and 40-wide heads that repacking costs about as much as the products. Here the
//! scores of QB query rows are stored [keys, QB] (column-major for the GEMM): Q·Kᵀ reads
//! K in place, the softmax runs down the key axis 16 queries per vector, and P·V reads
//! P and V in place, so only the small Q block is ever packed.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::attention::{softmax_cols, QB};
use super::{with_scratch, with_slice, SCORES};

/// softmax(scale · Q Kᵀ) V per head for untracked f32 CPU q [B, Lq, H·d], k, v [B, Lk, H·d],
/// as [`super::attention`] computes it (same shapes, same result up to rounding).
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
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
    let g = Geom {
        b,
        lq,
        lk,
        hd,
        heads,
        scale: scale as f32,
    };
    let out = with_slice(q, |qv| {
        with_slice(k, |kv| with_slice(v, |vv| Ok(g.forward(qv, kv, vv))))
    })?;
    Tensor::from_vec(out, (b, lq, hd), &Device::Cpu)
}

#[derive(Clone, Copy)]
struct Geom {
    b: usize,
    lq: usize,
    lk: usize,
    hd: usize,
    heads: usize,
    scale: f32,
}

impl Geom {
    fn forward(&self, qv: &[f32], kv: &[f32], vv: &[f32]) -> Vec<f32> {
        let Geom {
            b,
            lq,
            lk,
            hd,
            heads,
            scale,
        } = *self;
        let d = hd / heads;
        let mut out = vec![0f32; b * lq * hd];
        let optr = out.as_mut_ptr() as usize;
        let nqb = lq.div_ceil(QB);
        // consecutive tasks share a head, so its K and V stay in cache between blocks
        (0..b * heads * nqb).into_par_iter().for_each(|task| {
            let (bh, qb) = (task / nqb, task % nqb);
            let (bi, h) = (bh / heads, bh % heads);
            let q0 = qb * QB;
            let m = QB.min(lq - q0);
            let qoff = (bi * lq + q0) * hd + h * d;
            let kvoff = bi * lk * hd + h * d;
            with_scratch(&SCORES, m * lk + m * d, |buf| {
                let (s, o) = buf.split_at_mut(m * lk);
                let mut inv = [0f32; QB];
                // SAFETY: q rows q0..q0+m, k and v rows 0..lk of head h lie inside their
                // slices (offsets above, strides hd); s and o are this task's scratch.
                unsafe {
                    // s[j, i] = scale · q[i, :] · k[j, :]   (s column-major [m, lk])
                    gemm::gemm(
                        m,
                        lk,
                        d,
                        s.as_mut_ptr(),
                        m as isize,
                        1,
                        false,
                        qv[qoff..].as_ptr(),
                        1,
                        hd as isize,
                        kv[kvoff..].as_ptr(),
                        hd as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                softmax_cols(s, m, &mut inv[..m]);
                // SAFETY: as above; o holds m * d.
                unsafe {
                    // o[c, i] = Σ_j p[j, i] · v[j, c]   (o column-major [m, d])
                    gemm::gemm(
                        m,
                        d,
                        lk,
                        o.as_mut_ptr(),
                        m as isize,
                        1,
                        false,
                        s.as_ptr(),
                        m as isize,
                        1,
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
                }
                // normalised rows into out[bi, q0 + i, h·d ..]
                for (i, &iv) in inv[..m].iter().enumerate() {
                    // SAFETY: row q0 + i, head h of sample bi: this task's alone; `out`
                    // outlives the parallel loop.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut((optr as *mut f32).add(qoff + i * hd), d)
                    };
                    for (c, y) in row.iter_mut().enumerate() {
                        *y = o[c * m + i] * iv;
                    }
                }
            });
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: usize, shape: (usize, usize, usize), seed: usize) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 2003.0 - 0.5) * 3.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Same values as the query-major kernel (itself checked against candle's ops) for
    /// head widths 8 to 160, partial query blocks, short (cross-attention) key lists,
    /// batches of two.
    #[test]
    fn matches_attention_kernel() {
        for (b, lq, lk, heads, d) in [
            (2, 130, 77, 2, 40),
            (1, 64, 300, 1, 160),
            (2, 5, 9, 4, 8),
            (1, 257, 257, 8, 40),
            (2, 70, 1, 1, 80),
        ] {
            let hd = heads * d;
            let q = t(b * lq * hd, (b, lq, hd), 1);
            let k = t(b * lk * hd, (b, lk, hd), 2);
            let v = t(b * lk * hd, (b, lk, hd), 3);
            let scale = 1.0 / (d as f64).sqrt();
            let want = crate::cpu_kernels::attention(&q, &k, &v, heads, scale)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = attention_forward(&q, &k, &v, heads, scale)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{b} {lq} {lk} {heads} {d}: {err}");
        }
    }
}
