//! Linear layers, one GEMM per sample.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn as nn;

use super::{contiguous_f32, f32_cpu, fast, per_sample, with_slice};

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
        let mut out = vec![0f32; self.rows * o];
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
