//! FedAPT (leondada/FedAPT, `clip_queryv2.py`): the server's frozen keys and
//! the test-time adaptive prompt.
//!
//! Keys: `torch.rand([domains, ctx, dim])`, iid U[0, 1), one per client
//! domain. At test time the adapter (`cquery`, a bias-free Linear from the
//! image feature to one score per domain) gives z = W f; the scores are
//! standardised with the unbiased variance over the domains, weighted by
//! w = softmax(z̃ / t) (t = 0.01 in the authors' code), and the prompt is
//! ctx ⊙ (1 + Σ_d w_d key_d), broadcast over classes for class-specific ctx.

use crate::input::Matrix;
use rand::RngExt;
use rayon::prelude::*;

/// Keys [domains, ctx, dim], U[0, 1) from ftk's seeded stream.
pub fn keys(domains: usize, ctx: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ftk::rng::stream(seed, 0);
    (0..domains * ctx * dim)
        .map(|_| rng.random::<f32>())
        .collect()
}

/// Scores z = F Wᵀ [N, domains] and weights [N, domains]. A sample whose
/// scores are all equal (variance 0, where PyTorch divides 0 by 0 and gets
/// NaN) gets uniform weights.
pub fn weights(f: &Matrix, w: &Matrix, t: f64) -> (Matrix, Matrix) {
    let (n, d, k) = (f.rows, f.cols, w.rows);
    let mut z = Matrix::zeros(n, k);
    ftk::linalg::matmul_bt(&mut z.data, &f.data, &w.data, n, k, d, false);
    let mut out = Matrix::zeros(n, k);
    out.data
        .par_chunks_mut(k)
        .zip(z.data.par_chunks(k))
        .for_each(|(o, zr)| {
            let zr: Vec<f64> = zr.iter().map(|&v| f64::from(v)).collect();
            let mean = zr.iter().sum::<f64>() / k as f64;
            let var = zr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (k - 1) as f64;
            if var <= 0.0 {
                o.iter_mut().for_each(|v| *v = 1.0 / k as f32);
                return;
            }
            let sd = var.sqrt();
            let s: Vec<f64> = zr.iter().map(|v| (v - mean) / sd / t).collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            o.iter_mut()
                .zip(&e)
                .for_each(|(o, v)| *o = (v / sum) as f32);
        });
    (z, out)
}

/// Personalised prompts: for each sample i, ctx ⊙ (1 + Σ_d w_id key_d).
/// `ctx` is [classes * m * dim] (classes = 1 for a generic context),
/// `keys` [domains * m * dim]; output [N, classes * m * dim].
pub fn prompts(ctx: &[f32], keys: &[f32], w: &Matrix) -> Vec<f32> {
    let md = keys.len() / w.cols;
    let per = ctx.len();
    let mut out = vec![0f32; w.rows * per];
    out.par_chunks_mut(per).enumerate().for_each(|(i, o)| {
        let mut mult = vec![1f64; md];
        for (d, &wd) in w.row(i).iter().enumerate() {
            let kd = &keys[d * md..(d + 1) * md];
            mult.iter_mut()
                .zip(kd)
                .for_each(|(m, &k)| *m += f64::from(wd) * f64::from(k));
        }
        for (oc, cc) in o.chunks_mut(md).zip(ctx.chunks(md)) {
            for ((o, &c), m) in oc.iter_mut().zip(cc).zip(&mult) {
                *o = (f64::from(c) * m) as f32;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardised_softmax_and_prompt() {
        // Two domains: z = (1, 3) -> z̃ = (-1/√2, 1/√2) (unbiased sd √2).
        let f = Matrix::new(1, 2, vec![1.0, 3.0]);
        let w = Matrix::new(2, 2, vec![1.0, 0.0, 0.0, 1.0]);
        let (z, wt) = weights(&f, &w, 1.0);
        assert_eq!(z.data, vec![1.0, 3.0]);
        let a = 0.5f64.sqrt().exp();
        let want = a / (a + 1.0 / a);
        assert!((f64::from(wt.data[1]) - want).abs() < 1e-6);
        let keys = vec![0.0, 1.0, 0.5, 0.5]; // 2 domains x (m=1, dim=2)
        let p = prompts(&[2.0, 2.0], &keys, &wt);
        let w1 = f64::from(wt.data[1]);
        let w0 = f64::from(wt.data[0]);
        assert!((f64::from(p[0]) - 2.0 * (1.0 + 0.5 * w1)).abs() < 1e-5);
        assert!((f64::from(p[1]) - 2.0 * (1.0 + w0 + 0.5 * w1)).abs() < 1e-5);
        let flat = weights(&Matrix::new(1, 2, vec![1.0, 1.0]), &w, 0.01).1;
        assert_eq!(flat.data, vec![0.5, 0.5]);
    }

    #[test]
    fn keys_are_uniform_and_seeded() {
        let a = keys(3, 4, 50, 7);
        assert_eq!(a, keys(3, 4, 50, 7));
        assert_ne!(a, keys(3, 4, 50, 8));
        assert!(a.iter().all(|&v| (0.0..1.0).contains(&v)));
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }
}
