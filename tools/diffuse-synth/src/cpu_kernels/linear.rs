//! Linear layers, one GEMM per sample.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn as nn;

use rayon::prelude::*;

use super::{contiguous_f32, f32_cpu, fast, per_sample, with_scratch, with_slice, COLS};

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
        let _t = crate::timing::Kernel::Linear.timer();
        let l = &self.0;
        let w = l.weight();
        let mut ws = vec![w];
        ws.extend(l.bias());
        if !fast(&ws) || !f32_cpu(x) || x.rank() < 2 || x.rank() > 3 || w.rank() != 2 {
            return l.forward(x);
        }
        let (o, i) = w.dims2()?;
        let dims = x.dims().to_vec();
        if dims[dims.len() - 1] != i {
            return l.forward(x);
        }
        let mut od = dims.clone();
        *od.last_mut().unwrap_or(&mut 0) = o;
        let op = LinearOp {
            // rows per GEMM: a sample's tokens ([B, L, in]) or one vector ([B, in])
            m: if dims.len() == 3 { dims[1] } else { 1 },
            rows: dims[..dims.len() - 1].iter().product(),
            i,
            o,
            in_dims: dims,
            out_dims: od,
            weight: w.clone(),
            bias: match l.bias() {
                Some(b) => Some(b.to_vec1::<f32>()?),
                None => None,
            },
        };
        if x.track_op() {
            return x.contiguous()?.apply_op1(op);
        }
        let out = with_slice(x, |xv| op.forward(xv))?;
        Tensor::from_vec(out, op.out_dims.clone(), &Device::Cpu)
    }
}

/// Rows per block of [`Linear::forward_geglu`]: the block's [rows, 2 d] projection
/// stays in L2 (d = 1280: 1.25 MiB) between the GEMM and the gating.
const GEGLU_ROWS: usize = 64;

/// Fewest rows per sample [`Linear::forward_geglu`] fuses: with fewer (1024 tokens and
/// below at SD-1.5 size) one whole-sample GEMM beats blocks that each repack the weights,
/// and the projection's round trip through memory is small (tiny under test). With the
/// weight packed once for `sgemm` the 1024-token blocks ([64, 640] x [640, 5120]) measured
/// from 10% below to 23% above the crate's whole-sample GEMM (`gemm_bench`), no clear win,
/// so they stay unfused too.
#[cfg(not(test))]
const GEGLU_MIN_ROWS: usize = 2048;
#[cfg(test)]
const GEGLU_MIN_ROWS: usize = 1;

impl Linear {
    /// `geglu_packed(self.forward(x))` (diffusers' GEGLU: value and gate are the two
    /// halves of this projection's output) without the full projection ever reaching
    /// memory: blocks of a sample's rows are projected into a cache-sized scratch and gated
    /// from there. Blocks never straddle samples, so a row's numbers do not depend on the
    /// batch it is in.
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        let l = &self.0;
        let w = l.weight();
        let mut ws = vec![w];
        ws.extend(l.bias());
        let (o, i) = w.dims2()?;
        let dims = x.dims().to_vec();
        if !fast(&ws)
            || !fast(&[x])
            || dims.len() != 3
            || dims[2] != i
            || !o.is_multiple_of(2)
            || dims[1] < GEGLU_MIN_ROWS
        {
            return super::geglu_packed(&self.forward(x)?);
        }
        let _t = crate::timing::Kernel::Linear.timer();
        let (b, m, d) = (dims[0], dims[1], o / 2);
        let bias = match l.bias() {
            Some(bt) => Some(bt.to_vec1::<f32>()?),
            None => None,
        };
        let mut out = super::zeros(b * m * d);
        with_slice(w, |wv| {
            // Wᵀ packed once for every block of the call: each block's GEMM then only reads
            // it (the `gemm` crate repacks it per 64-row block, which costs as much as a third
            // of the block's products: 55% of the FMA peak against 91%, see `sgemm`)
            let packed =
                super::sgemm::available().then(|| super::sgemm::PackedB::new(wv, (i, 1), i, o));
            with_slice(x, |xv| {
                out.par_chunks_mut(m * d).enumerate().for_each(|(n, yo)| {
                    yo.par_chunks_mut(GEGLU_ROWS * d)
                        .enumerate()
                        .for_each(|(blk, yb)| {
                            let r0 = n * m + blk * GEGLU_ROWS;
                            let rows = yb.len() / d;
                            let xb = &xv[r0 * i..(r0 + rows) * i];
                            with_scratch(&COLS, rows * o, |p| {
                                if let Some(bv) = &bias {
                                    p.chunks_mut(o).for_each(|row| row.copy_from_slice(bv));
                                }
                                match &packed {
                                    Some(pb) => super::sgemm::gemm_packed(
                                        p,
                                        rows,
                                        bias.is_some(),
                                        xb,
                                        pb,
                                        1.0,
                                    ),
                                    None => ftk::linalg::serial(|| {
                                        ftk::linalg::matmul_bt(
                                            p,
                                            xb,
                                            wv,
                                            rows,
                                            o,
                                            i,
                                            bias.is_some(),
                                        )
                                    }),
                                }
                                for (yrow, prow) in yb.chunks_mut(d).zip(p.chunks(o)) {
                                    yrow.copy_from_slice(&prow[..d]);
                                    super::attention::geglu_rows(yrow, &prow[d..]);
                                }
                            })
                        });
                });
                Ok(())
            })
        })?;
        let mut od = dims;
        od[2] = d;
        Tensor::from_vec(out, od, &Device::Cpu)
    }
}

/// One linear call: y [rows, o] = x [rows, i] · Wᵀ + b, `m` rows per GEMM.
struct LinearOp {
    m: usize,
    rows: usize,
    i: usize,
    o: usize,
    in_dims: Vec<usize>,
    out_dims: Vec<usize>,
    weight: Tensor,
    bias: Option<Vec<f32>>,
}

impl LinearOp {
    fn forward(&self, xv: &[f32]) -> Result<Vec<f32>> {
        let (m, i, o) = (self.m, self.i, self.o);
        let mut out = super::zeros(self.rows * o);
        with_slice(&self.weight, |wv| {
            per_sample(&mut out, m * o, |n, yo| {
                let xi = &xv[n * m * i..(n + 1) * m * i];
                if let Some(bv) = &self.bias {
                    for row in yo.chunks_mut(o) {
                        row.copy_from_slice(bv);
                    }
                }
                ftk::linalg::matmul_bt(yo, xi, wv, m, o, i, self.bias.is_some());
            });
            Ok(())
        })?;
        Ok(out)
    }
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "ftk-linear"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.forward(contiguous_f32(st, l)?)?;
        Ok((CpuStorage::F32(out), Shape::from(self.out_dims.clone())))
    }

    /// dx [rows, i] = dy [rows, o] · W [o, i] (no weight gradient).
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (m, i, o) = (self.m, self.i, self.o);
        let mut dx = vec![0f32; self.rows * i];
        with_slice(&self.weight, |wv| {
            with_slice(grad, |gv| {
                per_sample(&mut dx, m * i, |n, d| {
                    ftk::linalg::matmul(d, &gv[n * m * o..(n + 1) * m * o], wv, m, i, o, false);
                });
                Ok(())
            })
        })?;
        Tensor::from_vec(dx, self.in_dims.clone(), &Device::Cpu).map(Some)
    }
}
