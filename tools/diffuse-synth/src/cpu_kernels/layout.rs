//! NCHW <-> [N, H·W, C] (the spatial transformer's token layout) as one op each way whose
//! backward is the other: on the guided path one node and one pass instead of candle's
//! transpose, transpose, copy and a strided gradient add per direction.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, f32_cpu, with_slice};

/// out[n, j, i] = x[n, i, j] for x [n, r, c] (one sample per task, blocked for the cache).
fn transpose(x: &[f32], n: usize, r: usize, c: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut out = vec![0f32; n * r * c];
    out.par_chunks_mut((r * c).max(1))
        .zip(x.par_chunks((r * c).max(1)))
        .for_each(|(o, xs)| {
            for i0 in (0..r).step_by(B) {
                for j0 in (0..c).step_by(B) {
                    for i in i0..(i0 + B).min(r) {
                        for j in j0..(j0 + B).min(c) {
                            o[j * r + i] = xs[i * c + j];
                        }
                    }
                }
            }
        });
    out
}

/// [n, r, c] -> [n, c, r] with `out_dims` as the result's shape.
struct Transpose {
    n: usize,
    r: usize,
    c: usize,
    out_dims: Vec<usize>,
}

impl CustomOp1 for Transpose {
    fn name(&self) -> &'static str {
        "ftk-layout-transpose"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = transpose(contiguous_f32(st, l)?, self.n, self.r, self.c);
        Ok((CpuStorage::F32(out), Shape::from(self.out_dims.clone())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_slice(grad, |g| Ok(transpose(g, self.n, self.c, self.r)))?;
        Tensor::from_vec(dx, arg.dims(), &Device::Cpu).map(Some)
    }
}

fn run(x: &Tensor, n: usize, r: usize, c: usize, out_dims: Vec<usize>) -> Result<Tensor> {
    let op = Transpose { n, r, c, out_dims };
    if x.track_op() {
        return x.contiguous()?.apply_op1(op);
    }
    let out = with_slice(x, |v| Ok(transpose(v, n, r, c)))?;
    Tensor::from_vec(out, op.out_dims, &Device::Cpu)
}

/// [N, C, H, W] -> [N, H·W, C].
pub fn nchw_to_tokens(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if !f32_cpu(x) {
        return x.transpose(1, 2)?.t()?.reshape((n, h * w, c));
    }
    run(x, n, c, h * w, vec![n, h * w, c])
}

/// [N, H·W, C] -> [N, C, H, W].
pub fn tokens_to_nchw(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, l, c) = x.dims3()?;
    if l != h * w {
        candle_core::bail!("tokens_to_nchw: {l} tokens for {h}x{w}");
    }
    if !f32_cpu(x) {
        return x.reshape((n, h, w, c))?.t()?.transpose(1, 2);
    }
    run(x, n, l, c, vec![n, c, h, w])
}
