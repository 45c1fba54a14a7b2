//! FedD3A's per-sample teacher weights and the weighted teacher ensemble.
//!
//! No code for FedD3A is public and its method section could not be read,
//! so the mapping from angles to weights is ftk's, chosen to do what the
//! abstract says ("for each sample in the server domain, only the client
//! models of its similar domains will be selected") with one knob:
//!
//!   discrepancy  d_ik = sin²θ_ik = 1 − ‖P_k x_i‖² / ‖x_i‖²   (in [0, 1])
//!   weights      w_ik = softmax_{k ∈ S_i}(−d_ik / τ),  0 outside S_i
//!
//! S_i is the `top_k` clients with the smallest discrepancy (all by default).
//! τ → 0 selects the single most similar domain (ties share equally);
//! τ → ∞ gives the uniform ensemble of plain ensemble distillation (FedDF).
//! sin²θ is the share of the sample's energy outside the client's feature
//! subspace: bounded and scale-free, so one τ serves any feature scale.

use crate::input::Matrix;
use rayon::prelude::*;

/// Weights [N, K] from discrepancies [N, K].
pub fn weights(disc: &Matrix, temperature: f64, top_k: usize) -> Matrix {
    let k = disc.cols;
    let top_k = top_k.clamp(1, k);
    let mut w = Matrix::zeros(disc.rows, k);
    w.data
        .par_chunks_mut(k)
        .zip(disc.data.par_chunks(k))
        .for_each(|(wr, dr)| {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| dr[a].total_cmp(&dr[b]).then(a.cmp(&b)));
            let sel = &order[..top_k];
            let best = f64::from(dr[sel[0]]);
            if temperature == 0.0 {
                // Hard selection: every selected client tied with the best.
                let ties: Vec<usize> = sel
                    .iter()
                    .copied()
                    .filter(|&j| f64::from(dr[j]) == best)
                    .collect();
                let share = 1.0 / ties.len() as f32;
                ties.iter().for_each(|&j| wr[j] = share);
                return;
            }
            let e: Vec<f64> = sel
                .iter()
                .map(|&j| (-(f64::from(dr[j]) - best) / temperature).exp())
                .collect();
            let z: f64 = e.iter().sum();
            for (&j, v) in sel.iter().zip(&e) {
                wr[j] = (v / z) as f32;
            }
        });
    w
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Combine {
    /// Σ_k w_k softmax(z_k / T): weighted mean of teacher probabilities.
    Probs,
    /// softmax(Σ_k w_k z_k / T): weighted mean of logits (as FedDF).
    Logits,
}

fn softmax_into(z: &[f64], t: f64, out: &mut [f64]) {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for (o, &v) in out.iter_mut().zip(z) {
        *o = ((v - m) / t).exp();
        s += *o;
    }
    out.iter_mut().for_each(|o| *o /= s);
}

/// Soft labels [N, C] from K teachers' logits ([N, C] each) and weights [N, K].
pub fn ensemble(logits: &[Matrix], w: &Matrix, t: f64, how: Combine) -> Matrix {
    let (n, c, k) = (logits[0].rows, logits[0].cols, logits.len());
    let mut out = Matrix::zeros(n, c);
    out.data.par_chunks_mut(c).enumerate().for_each(|(i, o)| {
        let wi = w.row(i);
        let mut acc = vec![0f64; c];
        let mut p = vec![0f64; c];
        match how {
            Combine::Probs => {
                for (j, l) in logits.iter().enumerate() {
                    let z: Vec<f64> = l.row(i).iter().map(|&v| f64::from(v)).collect();
                    softmax_into(&z, t, &mut p);
                    let wj = f64::from(wi[j]);
                    acc.iter_mut().zip(&p).for_each(|(a, q)| *a += wj * q);
                }
            }
            Combine::Logits => {
                let mut z = vec![0f64; c];
                for (j, l) in logits.iter().enumerate().take(k) {
                    let wj = f64::from(wi[j]);
                    z.iter_mut()
                        .zip(l.row(i))
                        .for_each(|(a, &v)| *a += wj * f64::from(v));
                }
                softmax_into(&z, t, &mut acc);
            }
        }
        o.iter_mut().zip(&acc).for_each(|(o, a)| *o = *a as f32);
    });
    out
}

/// Per sample x_i and client basis U_k: cos θ_ik = ‖U_kᵀ x_i‖ / ‖x_i‖
/// (`similarity`) and d_ik = sin²θ_ik = 1 − cos² (`discrepancy`), [N, K].
pub fn discrepancies(x: &Matrix, bases: &[Matrix]) -> (Matrix, Matrix) {
    let (n, k) = (x.rows, bases.len());
    let mut sim = Matrix::zeros(n, k);
    let mut disc = Matrix::zeros(n, k);
    for (j, u) in bases.iter().enumerate() {
        let c = crate::subspace::cosines(x, u);
        for (i, &ci) in c.iter().enumerate() {
            sim.data[i * k + j] = ci as f32;
            disc.data[i * k + j] = (1.0 - ci * ci).max(0.0) as f32;
        }
    }
    (sim, disc)
}

/// Each row's largest entry (ties to the lower column): a sample's top
/// teacher, or a test image's top domain.
pub fn argmax_rows(w: &Matrix) -> Vec<usize> {
    (0..w.rows)
        .map(|i| {
            let r = w.row(i);
            (0..w.cols).fold(0, |b, j| if r[j] > r[b] { j } else { b })
        })
        .collect()
}

/// Mean of column `j` over `rows` (0 for no rows).
pub fn mean_col(m: &Matrix, j: usize, rows: &[usize]) -> f64 {
    rows.iter()
        .map(|&i| f64::from(m.data[i * m.cols + j]))
        .sum::<f64>()
        / rows.len().max(1) as f64
}

/// Mean entropy (nats) of the rows of a probability matrix.
pub fn mean_entropy(p: &Matrix) -> f64 {
    p.data
        .chunks(p.cols)
        .map(|r| {
            -r.iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| f64::from(p) * f64::from(p).ln())
                .sum::<f64>()
        })
        .sum::<f64>()
        / p.rows as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_spans_hard_and_uniform() {
        let d = Matrix::new(2, 3, vec![0.1, 0.5, 0.1, 0.9, 0.2, 0.3]);
        let hard = weights(&d, 0.0, 3);
        assert_eq!(hard.data, vec![0.5, 0.0, 0.5, 0.0, 1.0, 0.0]);
        let flat = weights(&d, 1e9, 3);
        assert!(flat.data.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6));
        let top2 = weights(&d, 0.1, 2);
        assert_eq!(top2.data[3], 0.0);
        let e = (-1.0f64).exp();
        assert!((f64::from(top2.data[4]) - 1.0 / (1.0 + e)).abs() < 1e-6);
    }

    #[test]
    fn one_hot_weights_pick_that_teacher() {
        let a = Matrix::new(1, 2, vec![2.0, 0.0]);
        let b = Matrix::new(1, 2, vec![0.0, 2.0]);
        let w = Matrix::new(1, 2, vec![0.0, 1.0]);
        let s = ensemble(&[a.clone(), b.clone()], &w, 1.0, Combine::Probs);
        let want = 1.0 / (1.0 + 2f64.exp());
        assert!((f64::from(s.data[0]) - want).abs() < 1e-6);
        let s = ensemble(&[a, b], &w, 2.0, Combine::Logits);
        assert!((f64::from(s.data[0]) - 1.0 / (1.0 + 1f64.exp())).abs() < 1e-6);
    }
}
