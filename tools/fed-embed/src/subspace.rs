//! FedD3A's client subspace and server-side angles.
//!
//! Subspace: the top-r right singular vectors of the client's feature
//! matrix X [N, D] (uncentred: the projection P = U Uᵀ is about the span of
//! the features through the origin, which is what the angle between a
//! sample and the subspace measures). They are computed as the top
//! eigenvectors of the Gram matrix G = Xᵀ X (eigenvalues = σ²):
//! G is accumulated over blocks of rows with f64 GEMMs (so memory stays at
//! one block and the small singular values keep f64 accuracy), and the
//! D x D symmetric eigendecomposition is faer's (a maintained, pure-Rust
//! LAPACK-class library; divide-and-conquer tridiagonal EVD). For N >> D
//! this is far cheaper than a thin SVD of X and gives the same subspace.
//! Signs are fixed so each column's largest-magnitude entry is positive.

use crate::input::Matrix;
use ftk::{bail, Result};
use rayon::prelude::*;

/// Rows per Gram block.
const BLOCK: usize = 2048;

/// Which rank to keep.
#[derive(Clone, Copy, Debug)]
pub enum Rank {
    Fixed(usize),
    /// Smallest r whose σ² share reaches this fraction.
    Energy(f64),
}

pub struct Subspace {
    /// Orthonormal basis, [D, r] row-major.
    pub basis: Matrix,
    /// All singular values, descending (length min(N, D) is not enforced:
    /// D values, the trailing ones zero when N < D).
    pub singular: Vec<f64>,
    pub rank: usize,
    /// Share of Σσ² captured by the kept r.
    pub energy: f64,
    /// Singular values above the numerical-zero threshold.
    pub numerical_rank: usize,
}

/// G = Xᵀ X in f64, [D, D] row-major.
pub fn gram(x: &Matrix) -> Vec<f64> {
    let d = x.cols;
    let mut g = vec![0f64; d * d];
    let mut buf = vec![0f64; BLOCK * d];
    for (b, chunk) in x.data.chunks(BLOCK * d).enumerate() {
        let rows = chunk.len() / d;
        let blk = &mut buf[..rows * d];
        blk.par_iter_mut()
            .zip(chunk.par_iter())
            .for_each(|(o, &v)| *o = f64::from(v));
        let blk: &[f64] = blk;
        ftk::linalg::matmul_at(&mut g, blk, blk, d, d, rows, b > 0);
    }
    // Exactly symmetric for the eigensolver (it reads one triangle anyway).
    for i in 0..d {
        for j in 0..i {
            let m = 0.5 * (g[i * d + j] + g[j * d + i]);
            g[i * d + j] = m;
            g[j * d + i] = m;
        }
    }
    g
}

/// The subspace of `x` at `rank`.
pub fn fit(x: &Matrix, rank: Rank, what: &str) -> Result<Subspace> {
    let d = x.cols;
    let g = gram(x);
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| g[i * d + j]);
    let evd = match m.self_adjoint_eigen(faer::Side::Lower) {
        Ok(e) => e,
        Err(e) => bail!("{what}: eigendecomposition did not converge ({e:?})"),
    };
    let (u, s) = (evd.U(), evd.S().column_vector());
    // faer returns ascending eigenvalues; we want descending σ.
    let order: Vec<usize> = (0..d).rev().collect();
    let lam: Vec<f64> = order.iter().map(|&i| s[i].max(0.0)).collect();
    let singular: Vec<f64> = lam.iter().map(|l| l.sqrt()).collect();
    let total: f64 = lam.iter().sum();
    if total <= 0.0 {
        bail!("{what}: every feature is zero; there is no subspace to describe");
    }
    // Relative threshold for "zero": eigenvalues of an f64 Gram matrix are
    // accurate to about d * eps * λ_max.
    let zero = lam[0] * (d as f64) * 1e-13;
    let numerical_rank = lam.iter().filter(|&&l| l > zero).count();
    let r = match rank {
        Rank::Fixed(r) => {
            if r > d.min(x.rows) {
                bail!(
                    "{what}: --rank {r} exceeds min(samples, dim) = min({}, {d})",
                    x.rows
                );
            }
            if r > numerical_rank {
                bail!(
                    "{what}: --rank {r} exceeds the numerical rank {numerical_rank} of the features (the extra directions would be arbitrary); use --rank {numerical_rank} or less, or --energy"
                );
            }
            r
        }
        Rank::Energy(e) => {
            let mut acc = 0.0;
            let mut r = 0;
            while r < d {
                acc += lam[r];
                r += 1;
                // Tiny slack so e = 1.0 does not chase rounding.
                if acc >= e * total * (1.0 - 1e-12) {
                    break;
                }
            }
            r.min(numerical_rank).max(1)
        }
    };
    let mut basis = Matrix::zeros(d, r);
    for (c, &src) in order.iter().take(r).enumerate() {
        let col: Vec<f64> = (0..d).map(|i| u[(i, src)]).collect();
        let (mut big, mut sign) = (0.0f64, 1.0f64);
        for &v in &col {
            if v.abs() > big {
                big = v.abs();
                sign = v.signum();
            }
        }
        for (i, v) in col.iter().enumerate() {
            basis.data[i * r + c] = (v * sign) as f32;
        }
    }
    let energy = lam[..r].iter().sum::<f64>() / total;
    Ok(Subspace {
        basis,
        singular,
        rank: r,
        energy,
        numerical_rank,
    })
}

/// Largest |UᵀU − I| entry of a [D, r] basis.
pub fn orthonormality_error(u: &Matrix) -> f64 {
    let (d, r) = (u.rows, u.cols);
    let mut worst = 0f64;
    for a in 0..r {
        for b in a..r {
            let dot: f64 = (0..d)
                .map(|i| f64::from(u.data[i * r + a]) * f64::from(u.data[i * r + b]))
                .sum();
            let want = if a == b { 1.0 } else { 0.0 };
            worst = worst.max((dot - want).abs());
        }
    }
    worst
}

/// cos θ between each row of `x` and span(U): ‖Uᵀx‖ / ‖x‖ in [0, 1]
/// (0 for an all-zero row, whose angle is undefined).
pub fn cosines(x: &Matrix, u: &Matrix) -> Vec<f64> {
    let (n, d, r) = (x.rows, x.cols, u.cols);
    let mut p = vec![0f32; n * r];
    ftk::linalg::matmul(&mut p, &x.data, &u.data, n, r, d, false);
    x.data
        .par_chunks(d)
        .zip(p.par_chunks(r))
        .map(|(row, pr)| {
            let xx: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let pp: f64 = pr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            if xx > 0.0 {
                (pp / xx).sqrt().min(1.0)
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_planted_plane_and_angles() {
        // Samples in span(e0, e1) of R^3 plus one sample along e2.
        let mut v = vec![];
        for i in 0..20 {
            let t = i as f32 * 0.3;
            v.extend_from_slice(&[t.cos() * 3.0, t.sin(), 0.0]);
        }
        let x = Matrix::new(20, 3, v);
        let s = fit(&x, Rank::Energy(0.999), "t").unwrap();
        assert_eq!(s.rank, 2);
        assert_eq!(s.numerical_rank, 2);
        assert!(orthonormality_error(&s.basis) < 1e-6);
        let probe = Matrix::new(3, 3, vec![1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 1.0, 0.0, 1.0]);
        let c = cosines(&probe, &s.basis);
        assert!((c[0] - 1.0).abs() < 1e-6, "{c:?}");
        assert!(c[1].abs() < 1e-6, "{c:?}");
        assert!((c[2] - 0.5f64.sqrt()).abs() < 1e-6, "{c:?}");
        assert!(fit(&x, Rank::Fixed(3), "t").is_err());
    }
}
