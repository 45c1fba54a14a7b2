//! FedDISC's upload noise, optionally as a Gaussian mechanism.
//!
//! The authors add `beta * randn` to every uploaded vector (beta = 0 by
//! default). With `--clip C`, each row is first scaled down to L2 norm at
//! most C; a row is then a vector in the C-ball, so replacing the one
//! sample behind it moves it by at most Δ = 2C, and adding N(0, σ² I) is a
//! Gaussian mechanism with noise multiplier z = σ / Δ per released row. The
//! (ε, δ) reported is the analytic Gaussian mechanism's for one row (Balle
//! & Wang 2018, `ftk::dp`). It covers raw feature rows
//! exactly; for k-means centroids it holds for fixed memberships (a
//! centroid of n members moves by at most 2C/n, so it is conservative) and
//! does not cover the data-dependence of the clustering itself.

use crate::input::Matrix;
use rand_distr::{Distribution, Normal};

/// What clipping and noise did to the rows.
pub struct Noised {
    pub clipped_rows: usize,
    /// Largest row norm before clipping.
    pub max_norm: f64,
    /// Mean row norm of the input.
    pub mean_norm_before: f64,
    /// Mean row norm after clipping: the signal that is uploaded.
    pub mean_norm_clipped: f64,
    /// Mean row norm of the output (signal plus noise).
    pub mean_norm_after: f64,
    /// Mean L2 norm of the noise added to a row (about sigma·sqrt(D)).
    pub noise_norm: f64,
}

fn norm(r: &[f32]) -> f64 {
    r.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Clip rows to `clip` (if any), then add N(0, sigma²) to every element.
pub fn apply(x: &mut Matrix, sigma: f64, clip: Option<f64>, seed: u64) -> Noised {
    let mut clipped = 0;
    let (mut max_norm, mut before, mut kept) = (0f64, 0f64, 0f64);
    let d = x.cols;
    for r in x.data.chunks_mut(d) {
        let n = norm(r);
        max_norm = max_norm.max(n);
        before += n;
        if let Some(c) = clip {
            if n > c {
                let s = (c / n) as f32;
                r.iter_mut().for_each(|v| *v *= s);
                clipped += 1;
            }
        }
        kept += norm(r);
    }
    let mut noise = 0f64;
    if sigma > 0.0 {
        // One stream over the elements in row order.
        let mut rng = ftk::rng::stream(seed, 0);
        let g = Normal::new(0.0f64, sigma).expect("sigma checked finite and positive");
        for r in x.data.chunks_mut(d) {
            let mut sq = 0f64;
            for v in r.iter_mut() {
                let e = g.sample(&mut rng);
                sq += e * e;
                *v = (f64::from(*v) + e) as f32;
            }
            noise += sq.sqrt();
        }
    }
    let rows = x.rows.max(1) as f64;
    let after = x.data.chunks(d).map(norm).sum::<f64>();
    Noised {
        clipped_rows: clipped,
        max_norm,
        mean_norm_before: before / rows,
        mean_norm_clipped: kept / rows,
        mean_norm_after: after / rows,
        noise_norm: noise / rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_then_adds_noise_of_the_right_scale() {
        let mut x = Matrix::new(2, 2, vec![3.0, 4.0, 0.3, 0.4]);
        let r = apply(&mut x, 0.0, Some(1.0), 0);
        assert_eq!(r.clipped_rows, 1);
        assert!((r.max_norm - 5.0).abs() < 1e-9);
        assert!((x.data[0] - 0.6).abs() < 1e-6 && x.data[2] == 0.3);
        assert!((r.mean_norm_before - 2.75).abs() < 1e-6);
        assert!((r.mean_norm_clipped - 0.75).abs() < 1e-6);
        assert_eq!(
            (r.noise_norm, r.mean_norm_after),
            (0.0, r.mean_norm_clipped)
        );
        let mut y = Matrix::zeros(200, 100);
        let r = apply(&mut y, 2.0, None, 1);
        let var = y.data.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 20000.0;
        assert!((var - 4.0).abs() < 0.2, "{var}");
        // Zero signal: the output is the noise; its norm is about sigma·sqrt(D) = 20.
        assert!(
            (r.noise_norm - r.mean_norm_after).abs() < 1e-3,
            "{}",
            r.noise_norm
        );
        assert!((r.noise_norm - 20.0).abs() < 0.5, "{}", r.noise_norm);
    }
}
