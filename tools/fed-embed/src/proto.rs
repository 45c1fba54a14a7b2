//! FedDISC prototypes (server) and nearest-prototype pseudo-labels (client),
//! as `Server.get_class_proto` and `Client.post_precess` in the authors' code.

use crate::input::Matrix;
use ftk::{bail, Result};
use rayon::prelude::*;

/// Per-class mean features: [C, D] and the member count of each class.
pub fn prototypes(x: &Matrix, labels: &[i64], classes: usize) -> Result<(Matrix, Vec<i64>)> {
    let d = x.cols;
    let mut sums = vec![0f64; classes * d];
    let mut counts = vec![0i64; classes];
    for (row, &l) in x.data.chunks(d).zip(labels) {
        let c = l as usize;
        if c >= classes {
            bail!("label {l} is out of range for --classes {classes}");
        }
        counts[c] += 1;
        for (o, &v) in sums[c * d..(c + 1) * d].iter_mut().zip(row) {
            *o += f64::from(v);
        }
    }
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        bail!(
            "class {c} has no labelled sample, so it has no prototype; give every class 0..{} at least one sample (or lower --classes)",
            classes - 1
        );
    }
    let mut p = Matrix::zeros(classes, d);
    for c in 0..classes {
        let inv = 1.0 / counts[c] as f64;
        for (o, s) in p.row_mut(c).iter_mut().zip(&sums[c * d..(c + 1) * d]) {
            *o = (s * inv) as f32;
        }
    }
    Ok((p, counts))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// Smallest squared Euclidean distance (the authors' code).
    Euclidean,
    /// Largest cosine similarity.
    Cosine,
}

pub struct Labelled {
    pub labels: Vec<i64>,
    pub confidence: Vec<f32>,
    /// Score of the winning class: squared distance (euclidean) or cosine.
    pub score: Vec<f32>,
}

impl Labelled {
    /// Label -1 (skipped by `cluster`) every sample whose confidence is below
    /// `min`; returns how many.
    pub fn reject_below(&mut self, min: f64) -> u64 {
        let mut rejected = 0;
        for (lab, &c) in self.labels.iter_mut().zip(&self.confidence) {
            if f64::from(c) < min {
                *lab = -1;
                rejected += 1;
            }
        }
        rejected
    }
}

/// Nearest prototype per row. Scores s_c are −‖f − p_c‖² (euclidean) or
/// cos(f, p_c) (cosine); the label is argmax s_c (ties to the lower class)
/// and the confidence is softmax(s / temperature) at the label.
pub fn pseudo_label(x: &Matrix, protos: &Matrix, metric: Metric, temperature: f64) -> Labelled {
    let (n, d, c) = (x.rows, x.cols, protos.rows);
    let pn: Vec<f64> = protos
        .data
        .chunks(d)
        .map(|r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
        .collect();
    let mut dot = vec![0f32; n * c];
    ftk::linalg::matmul_bt(&mut dot, &x.data, &protos.data, n, c, d, false);
    let rows: Vec<(i64, f32, f32)> = x
        .data
        .par_chunks(d)
        .zip(dot.par_chunks(c))
        .map(|(f, dr)| {
            let fnorm: f64 = f.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let scores: Vec<f64> = (0..c)
                .map(|j| {
                    let fp = f64::from(dr[j]);
                    match metric {
                        Metric::Euclidean => -(fnorm + pn[j] - 2.0 * fp).max(0.0),
                        Metric::Cosine => {
                            let den = (fnorm * pn[j]).sqrt();
                            if den > 0.0 {
                                fp / den
                            } else {
                                0.0
                            }
                        }
                    }
                })
                .collect();
            let mut best = 0;
            for j in 1..c {
                if scores[j] > scores[best] {
                    best = j;
                }
            }
            let top = scores[best];
            let z: f64 = scores.iter().map(|s| ((s - top) / temperature).exp()).sum();
            let score = match metric {
                Metric::Euclidean => -top,
                Metric::Cosine => top,
            };
            (best as i64, (1.0 / z) as f32, score as f32)
        })
        .collect();
    Labelled {
        labels: rows.iter().map(|r| r.0).collect(),
        confidence: rows.iter().map(|r| r.1).collect(),
        score: rows.iter().map(|r| r.2).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_and_nearest() {
        let x = Matrix::new(4, 2, vec![0.0, 0.0, 2.0, 0.0, 10.0, 10.0, 12.0, 10.0]);
        let (p, n) = prototypes(&x, &[0, 0, 1, 1], 2).unwrap();
        assert_eq!(p.data, vec![1.0, 0.0, 11.0, 10.0]);
        assert_eq!(n, vec![2, 2]);
        assert!(prototypes(&x, &[0, 0, 0, 0], 2).is_err());
        let q = Matrix::new(2, 2, vec![1.0, 1.0, 9.0, 9.0]);
        let l = pseudo_label(&q, &p, Metric::Euclidean, 1.0);
        assert_eq!(l.labels, vec![0, 1]);
        assert_eq!(l.score, vec![1.0, 5.0]);
        // softmax over (-1, -221): essentially 1.
        assert!((l.confidence[0] - 1.0).abs() < 1e-6);
        // Cosine: (1,1) is closer in angle to (11,10) than to (1,0).
        let l = pseudo_label(&q, &p, Metric::Cosine, 1.0);
        assert_eq!(l.labels, vec![1, 1]);
    }
}
