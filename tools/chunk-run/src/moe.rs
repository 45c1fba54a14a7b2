//! A Mixtral-style sparse MoE block with a residual connection, forward and
//! backward, as Hugging Face transformers computes `MixtralSparseMoeBlock`:
//! logits = x Wgᵀ, softmax in f32, top-k, optional renormalisation of the k
//! weights, experts w2(silu(w1 x) · w3 x), weighted sum.
//!
//! Tokens are permuted into one expert-grouped buffer (as Megatron's grouped
//! GEMM does), so the expert activations a rank holds are exactly MemFine's
//! s'(2h + 2g_e) term; chunking (FCDA) runs that buffer C token chunks at a
//! time. Buffers are dropped the moment they are dead so that the measured
//! peak follows mem-plan's itemised `block_*` terms.

use crate::linalg::{matmul, matmul_at, matmul_bt};
use rayon::prelude::*;

/// Sizes of one block.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub tokens: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub experts: usize,
    pub topk: usize,
    pub norm_topk_prob: bool,
}

/// One expert's weights, row-major as PyTorch stores nn.Linear weights:
/// w1 [f,h], w2 [h,f], w3 [f,h]. Gradients use the same type.
#[derive(Clone, Debug)]
pub struct ExpertW {
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
    pub w3: Vec<f32>,
}

/// One block's weights: router gate [E,h] and the experts.
#[derive(Clone, Debug)]
pub struct LayerW {
    pub gate: Vec<f32>,
    pub experts: Vec<ExpertW>,
}

impl LayerW {
    pub fn zeros(sh: &Shape) -> LayerW {
        let (h, f) = (sh.hidden, sh.ffn);
        LayerW {
            gate: vec![0.0; sh.experts * h],
            experts: (0..sh.experts)
                .map(|_| ExpertW {
                    w1: vec![0.0; f * h],
                    w2: vec![0.0; h * f],
                    w3: vec![0.0; f * h],
                })
                .collect(),
        }
    }

    pub fn fill_zero(&mut self) {
        self.gate.fill(0.0);
        for e in &mut self.experts {
            e.w1.fill(0.0);
            e.w2.fill(0.0);
            e.w3.fill(0.0);
        }
    }
}

/// Each expert's w1, w3 as [h,f] and w2 as [f,h]: the forward GEMMs then
/// read the weights in place, where the [out,in] layout makes the kernel
/// repack the whole weight on every call — 42 vs 221 GFLOP/s at 64 rows,
/// 194 vs 240 at 1024 (examples/gemm_layout.rs), which is what made small
/// per-chunk GEMMs slow. Built once per run; static memory, not activations.
pub struct LayerT {
    pub w1t: Vec<Vec<f32>>,
    pub w3t: Vec<Vec<f32>>,
    pub w2t: Vec<Vec<f32>>,
}

/// Transpose in 32×32 tiles so both sides stay in cache.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut t = vec![0f32; rows * cols];
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    t[c * rows + r] = w[r * cols + c];
                }
            }
        }
    }
    t
}

impl LayerT {
    pub fn new(sh: &Shape, lw: &LayerW) -> LayerT {
        let (h, f) = (sh.hidden, sh.ffn);
        LayerT {
            w1t: lw.experts.iter().map(|e| transpose(&e.w1, f, h)).collect(),
            w3t: lw.experts.iter().map(|e| transpose(&e.w3, f, h)).collect(),
            w2t: lw.experts.iter().map(|e| transpose(&e.w2, h, f)).collect(),
        }
    }
}

/// Router output for all tokens: probabilities [T,E], chosen experts and
/// their combine weights [T,k].
pub struct Routing {
    pub probs: Vec<f32>,
    pub idx: Vec<u32>,
    pub w: Vec<f32>,
}

/// Route every token. `forced` ([T,k] expert ids) overrides the top-k
/// choice; the weights are still the router's probabilities of those experts.
/// `Err(token)`: the first token (in some order) whose router logits hold a
/// NaN, which leaves no top-k to choose.
pub fn route(
    sh: &Shape,
    x: &[f32],
    lw: &LayerW,
    forced: Option<&[u32]>,
) -> std::result::Result<Routing, usize> {
    let (t, e, k) = (sh.tokens, sh.experts, sh.topk);
    let mut probs = vec![0f32; t * e];
    matmul_bt(&mut probs, x, &lw.gate, t, e, sh.hidden, false);
    let mut idx = vec![0u32; t * k];
    let mut w = vec![0f32; t * k];
    probs
        .par_chunks_mut(e)
        .zip(idx.par_chunks_mut(k))
        .zip(w.par_chunks_mut(k))
        .enumerate()
        .try_for_each_init(
            || Vec::with_capacity(k + 1),
            |top, (tok, ((p, id), wt))| {
                let max = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in p.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                p.iter_mut().for_each(|v| *v /= sum);
                match forced {
                    Some(fx) => id.copy_from_slice(&fx[tok * k..(tok + 1) * k]),
                    None => {
                        // A NaN logit makes every prob of the token NaN.
                        ftk::routing::topk_row(p, k, top).map_err(|_| tok)?;
                        for (j, &(_, ex)) in top.iter().enumerate() {
                            id[j] = ex as u32;
                        }
                    }
                }
                let mut s = 0.0;
                for j in 0..k {
                    wt[j] = p[id[j] as usize];
                    s += wt[j];
                }
                if sh.norm_topk_prob {
                    wt.iter_mut().for_each(|v| *v /= s);
                }
                Ok::<(), usize>(())
            },
        )?;
    Ok(Routing { probs, idx, w })
}

/// Token copies of tokens [t0, t1) grouped by expert: row i holds token
/// `rows[i]` for routing slot `slot[i]` (= token·k + j); `inv` maps
/// ((token − t0)·k + j) back to the row; expert e owns rows offsets[e]..offsets[e+1].
pub struct Dispatch {
    pub rows: Vec<u32>,
    pub slot: Vec<u32>,
    pub inv: Vec<u32>,
    pub offsets: Vec<usize>,
    pub t0: usize,
}

impl Dispatch {
    pub fn copies(&self) -> usize {
        self.rows.len()
    }

    pub fn group(&self, e: usize) -> (usize, usize) {
        (self.offsets[e], self.offsets[e + 1])
    }
}

/// Counting sort of the token copies of [t0, t1) by expert (stable in token order).
pub fn dispatch(sh: &Shape, idx: &[u32], t0: usize, t1: usize) -> Dispatch {
    let (e, k) = (sh.experts, sh.topk);
    let mut offsets = vec![0usize; e + 1];
    for &x in &idx[t0 * k..t1 * k] {
        offsets[x as usize + 1] += 1;
    }
    for i in 0..e {
        offsets[i + 1] += offsets[i];
    }
    let n = (t1 - t0) * k;
    let mut next = offsets.clone();
    let mut rows = vec![0u32; n];
    let mut slot = vec![0u32; n];
    let mut inv = vec![0u32; n];
    for s in t0 * k..t1 * k {
        let ex = idx[s] as usize;
        let row = next[ex];
        next[ex] += 1;
        rows[row] = (s / k) as u32;
        slot[row] = s as u32;
        inv[s - t0 * k] = row as u32;
    }
    Dispatch {
        rows,
        slot,
        inv,
        offsets,
        t0,
    }
}

/// Split a row-major buffer into each expert's rows.
fn split_groups<'a>(buf: &'a mut [f32], offsets: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    let mut rest = buf;
    for w in offsets.windows(2) {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - w[0]) * width);
        out.push(head);
        rest = tail;
    }
    out
}

/// Run `f(e, part)` for every expert. An expert holding more than 1/threads
/// of the rows runs alone with every thread inside its GEMMs; the rest run
/// side by side with single-threaded GEMMs, which keeps small per-expert
/// GEMMs (chunks, cold experts) efficient: no synchronisation inside a GEMM
/// (~25% more GFLOP/s at 64-1024 rows, examples/gemm_probe.rs).
fn each_expert<T: Send>(parts: Vec<T>, d: &Dispatch, f: impl Fn(usize, T) + Sync + Send) {
    let total = d.copies();
    let threads = rayon::current_num_threads().max(1);
    let (big, small): (Vec<_>, Vec<_>) = parts
        .into_iter()
        .enumerate()
        .partition(|&(e, _)| threads > 1 && (d.offsets[e + 1] - d.offsets[e]) * threads > total);
    for (e, p) in big {
        f(e, p);
    }
    small
        .into_par_iter()
        .for_each(|(e, p)| crate::linalg::serial(|| f(e, p)));
}

/// Expert activations kept for backward (MemFine Table 2 rows 11-13).
pub struct Acts {
    pub x: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub o: Vec<f32>,
}

#[inline]
fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

fn swiglu(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut hbuf = vec![0f32; a.len()];
    hbuf.par_chunks_mut(4096)
        .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
        .for_each(|(hh, (aa, bb))| {
            for ((h, &a), &b) in hh.iter_mut().zip(aa).zip(bb) {
                *h = a * sigmoid(a) * b;
            }
        });
    hbuf
}

/// Gather the dispatched token copies and run the experts: X, A = X w1ᵀ,
/// B = X w3ᵀ, H = silu(A)·B (dropped), O = H w2ᵀ.
pub fn experts_forward(sh: &Shape, lt: &LayerT, x_in: &[f32], d: &Dispatch) -> Acts {
    let (h, f) = (sh.hidden, sh.ffn);
    let s = d.copies();
    let mut x = vec![0f32; s * h];
    x.par_chunks_mut(h)
        .zip(d.rows.par_iter())
        .for_each(|(dst, &t)| {
            dst.copy_from_slice(&x_in[t as usize * h..(t as usize + 1) * h]);
        });
    let mut a = vec![0f32; s * f];
    let mut b = vec![0f32; s * f];
    let parts: Vec<_> = split_groups(&mut a, &d.offsets, f)
        .into_iter()
        .zip(split_groups(&mut b, &d.offsets, f))
        .collect();
    each_expert(parts, d, |e, (ae, be)| {
        let (r0, r1) = d.group(e);
        matmul(ae, &x[r0 * h..r1 * h], &lt.w1t[e], r1 - r0, f, h, false);
        matmul(be, &x[r0 * h..r1 * h], &lt.w3t[e], r1 - r0, f, h, false);
    });
    let hid = swiglu(&a, &b);
    let mut o = vec![0f32; s * h];
    each_expert(split_groups(&mut o, &d.offsets, h), d, |e, oe| {
        let (r0, r1) = d.group(e);
        matmul(oe, &hid[r0 * f..r1 * f], &lt.w2t[e], r1 - r0, h, f, false);
    });
    drop(hid);
    Acts { x, a, b, o }
}

/// y[t] += Σ_j w[t,j] · O[row(t,j)] for the dispatched tokens.
pub fn combine(sh: &Shape, y: &mut [f32], o: &[f32], d: &Dispatch, r: &Routing) {
    let (h, k) = (sh.hidden, sh.topk);
    let n_tok = d.copies() / k.max(1);
    y[d.t0 * h..(d.t0 + n_tok) * h]
        .par_chunks_mut(h)
        .enumerate()
        .for_each(|(i, yt)| {
            let tok = d.t0 + i;
            for j in 0..k {
                let row = d.inv[i * k + j] as usize;
                let w = r.w[tok * k + j];
                for (yv, ov) in yt.iter_mut().zip(&o[row * h..(row + 1) * h]) {
                    *yv += w * ov;
                }
            }
        });
}

/// Backward through the experts of the dispatched tokens, given the block's
/// output gradient `g` [T,h]: accumulates expert weight gradients into `gw`,
/// the input gradient into `dx` and the combine-weight gradients into `dw`
/// [T·k]. Consumes the activations, freeing each as soon as it is dead.
/// One function on purpose (over 100 lines): its buffers are allocated and
/// freed in the order `predict.rs` itemises (the working-set phases of
/// `block_working_per_copy`), and split helpers would hide that order.
#[allow(clippy::too_many_arguments)]
pub fn experts_backward(
    sh: &Shape,
    lw: &LayerW,
    gw: &mut LayerW,
    g: &[f32],
    acts: Acts,
    d: &Dispatch,
    r: &Routing,
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let (h, f, k) = (sh.hidden, sh.ffn, sh.topk);
    let s = d.copies();
    let Acts { x, a, b, o } = acts;
    // dL/dw for each copy: <g[token], O[row]>
    let dots: Vec<f32> = (0..s)
        .into_par_iter()
        .map(|i| {
            let t = d.rows[i] as usize;
            g[t * h..(t + 1) * h]
                .iter()
                .zip(&o[i * h..(i + 1) * h])
                .map(|(p, q)| p * q)
                .sum()
        })
        .collect();
    for (i, v) in dots.into_iter().enumerate() {
        dw[d.slot[i] as usize] = v;
    }
    drop(o);
    // G = w · g for every copy
    let mut gp = vec![0f32; s * h];
    gp.par_chunks_mut(h).enumerate().for_each(|(i, dst)| {
        let t = d.rows[i] as usize;
        let w = r.w[d.slot[i] as usize];
        for (o, &v) in dst.iter_mut().zip(&g[t * h..(t + 1) * h]) {
            *o = w * v;
        }
    });
    let hid = swiglu(&a, &b);
    each_expert(gw.experts.iter_mut().collect(), d, |e, gwe| {
        let (r0, r1) = d.group(e);
        matmul_at(
            &mut gwe.w2,
            &gp[r0 * h..r1 * h],
            &hid[r0 * f..r1 * f],
            h,
            f,
            r1 - r0,
            true,
        );
    });
    drop(hid);
    let mut da = vec![0f32; s * f];
    each_expert(split_groups(&mut da, &d.offsets, f), d, |e, dae| {
        let (r0, r1) = d.group(e);
        matmul(
            dae,
            &gp[r0 * h..r1 * h],
            &lw.experts[e].w2,
            r1 - r0,
            f,
            h,
            false,
        );
    });
    drop(gp);
    // da holds dH; turn it into dA in place, and dB = dH · silu(A)
    let mut db = vec![0f32; s * f];
    da.par_chunks_mut(4096)
        .zip(db.par_chunks_mut(4096))
        .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
        .for_each(|((dac, dbc), (ac, bc))| {
            for i in 0..dac.len() {
                let (av, bv, dh) = (ac[i], bc[i], dac[i]);
                let sg = sigmoid(av);
                dbc[i] = dh * av * sg;
                dac[i] = dh * bv * sg * (1.0 + av * (1.0 - sg));
            }
        });
    drop(a);
    drop(b);
    each_expert(gw.experts.iter_mut().collect(), d, |e, gwe| {
        let (r0, r1) = d.group(e);
        let n = r1 - r0;
        matmul_at(
            &mut gwe.w1,
            &da[r0 * f..r1 * f],
            &x[r0 * h..r1 * h],
            f,
            h,
            n,
            true,
        );
        matmul_at(
            &mut gwe.w3,
            &db[r0 * f..r1 * f],
            &x[r0 * h..r1 * h],
            f,
            h,
            n,
            true,
        );
    });
    let mut dxp = vec![0f32; s * h];
    each_expert(split_groups(&mut dxp, &d.offsets, h), d, |e, dxe| {
        let (r0, r1) = d.group(e);
        let (n, w) = (r1 - r0, &lw.experts[e]);
        matmul(dxe, &da[r0 * f..r1 * f], &w.w1, n, h, f, false);
        matmul(dxe, &db[r0 * f..r1 * f], &w.w3, n, h, f, true);
    });
    drop(da);
    drop(db);
    drop(x);
    let n_tok = s / k.max(1);
    dx[d.t0 * h..(d.t0 + n_tok) * h]
        .par_chunks_mut(h)
        .enumerate()
        .for_each(|(i, dxt)| {
            for j in 0..k {
                let row = d.inv[i * k + j] as usize;
                for (o, v) in dxt.iter_mut().zip(&dxp[row * h..(row + 1) * h]) {
                    *o += v;
                }
            }
        });
}

/// Backward through top-k renormalisation, softmax and the gate:
/// w = p_K / Σ p_K ⇒ ∂p_m = (∂w_m − Σ_j ∂w_j w_j)/Σ p_K on the chosen experts;
/// softmax ⇒ ∂l = p ⊙ (∂p − ⟨p, ∂p⟩); l = x Wgᵀ ⇒ ∂Wg += ∂lᵀ x, ∂x += ∂l Wg.
pub fn router_backward(
    sh: &Shape,
    lw: &LayerW,
    gw: &mut LayerW,
    x_in: &[f32],
    r: &Routing,
    dw: &[f32],
    dx: &mut [f32],
) {
    let (t, e, k, h) = (sh.tokens, sh.experts, sh.topk, sh.hidden);
    let mut dl = vec![0f32; t * e];
    dl.par_chunks_mut(e).enumerate().for_each(|(tok, dlt)| {
        let p = &r.probs[tok * e..(tok + 1) * e];
        let ids = &r.idx[tok * k..(tok + 1) * k];
        let ws = &r.w[tok * k..(tok + 1) * k];
        let dws = &dw[tok * k..(tok + 1) * k];
        let sum_p: f32 = ids.iter().map(|&i| p[i as usize]).sum();
        let dot_ww: f32 = dws.iter().zip(ws).map(|(a, b)| a * b).sum();
        // ∂p on the chosen experts (zero elsewhere)
        let mut inner = 0.0f32;
        for j in 0..k {
            let dp = if sh.norm_topk_prob {
                (dws[j] - dot_ww) / sum_p
            } else {
                dws[j]
            };
            dlt[ids[j] as usize] += dp;
        }
        for &i in ids {
            inner += p[i as usize] * dlt[i as usize];
        }
        for (v, &pv) in dlt.iter_mut().zip(p) {
            *v = pv * (*v - inner);
        }
    });
    matmul_at(&mut gw.gate, &dl, x_in, e, h, t, true);
    matmul(dx, &dl, &lw.gate, t, h, e, true);
}
