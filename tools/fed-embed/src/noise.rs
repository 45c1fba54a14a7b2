//! FedDISC's upload noise, optionally as a Gaussian mechanism.
//!
//! The authors add `beta * randn` to every uploaded vector (beta = 0 by
//! default). With `--clip C`, each row is first scaled down to L2 norm at
//! most C; a row is then a vector in the C-ball, so replacing the one
//! sample behind it moves it by at most Δ = 2C, and adding N(0, σ² I) is a
//! Gaussian mechanism with noise multiplier z = σ / Δ per released row. The
//! (ε, δ) reported is the analytic Gaussian mechanism's for one row (Balle
//! & Wang 2018, via fed-aggregate's accountant). It covers raw feature rows
//! exactly; for k-means centroids it holds for fixed memberships (a
//! centroid of n members moves by at most 2C/n, so it is conservative) and
//! does not cover the data-dependence of the clustering itself.

use crate::input::Matrix;
use rand_distr::{Distribution, Normal};

pub struct Noised {
    pub clipped_rows: usize,
    /// Largest row norm before clipping.
    pub max_norm: f64,
}

/// Clip rows to `clip` (if any), then add N(0, sigma²) to every element.
pub fn apply(x: &mut Matrix, sigma: f64, clip: Option<f64>, seed: u64) -> Noised {
    let mut clipped = 0;
    let mut max_norm = 0f64;
    let d = x.cols;
    for r in x.data.chunks_mut(d) {
        let n = r
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        max_norm = max_norm.max(n);
        if let Some(c) = clip {
            if n > c {
                let s = (c / n) as f32;
                r.iter_mut().for_each(|v| *v *= s);
                clipped += 1;
            }
        }
    }
    if sigma > 0.0 {
        let mut rng = ftk::rng::stream(seed, 0);
        let g = Normal::new(0.0f64, sigma).expect("sigma checked finite and positive");
        for v in x.data.iter_mut() {
            *v = (f64::from(*v) + g.sample(&mut rng)) as f32;
        }
    }
    Noised {
        clipped_rows: clipped,
        max_norm,
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
        let mut y = Matrix::zeros(200, 100);
        apply(&mut y, 2.0, None, 1);
        let var = y.data.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 20000.0;
        assert!((var - 4.0).abs() < 0.2, "{var}");
    }
}
