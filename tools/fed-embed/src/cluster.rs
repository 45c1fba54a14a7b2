//! FedDISC's client upload (`Client.get_cluster` in the authors' code):
//! per pseudo-class c with n_c members, n_c > K: K k-means centroids;
//! 0 < n_c <= K: the raw feature rows; label -1 (rejected) samples are left
//! out. Without labels: one k-means over all rows.

use crate::input::Matrix;
use crate::kmeans::{self, Opts};
use std::collections::BTreeMap;

/// How one class was sent.
#[derive(Clone, Debug)]
pub struct Group {
    /// The class (-1 without labels).
    pub class: i64,
    pub members: usize,
    /// Rows uploaded for it.
    pub rows_sent: usize,
    /// `Some` when it went through k-means (else raw rows).
    pub fit: Option<GroupFit>,
}

#[derive(Clone, Copy, Debug)]
pub struct GroupFit {
    pub inertia: f64,
    pub iters: usize,
}

/// The rows to upload and where each sample went.
#[derive(Clone, Debug, Default)]
pub struct Upload {
    /// [M, D] centroids and raw rows, class by class.
    pub rows: Vec<f32>,
    /// Members behind each uploaded row.
    pub sizes: Vec<i64>,
    /// Class of each uploaded row.
    pub classes: Vec<i64>,
    /// Uploaded row of each sample (-1: skipped).
    pub assign: Vec<i64>,
    pub groups: Vec<Group>,
    pub raw_rows: usize,
    pub centroid_rows: usize,
    pub inertia: f64,
}

/// Member rows per class, classes ascending; label -1 is skipped. Only the
/// labels present are visited, so a huge label value costs nothing.
pub fn classes_of(labels: &[i64]) -> Vec<(i64, Vec<usize>)> {
    let mut by: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        if l >= 0 {
            by.entry(l).or_default().push(i);
        }
    }
    by.into_iter().collect()
}

/// The upload for `x`: per class of `labels`, or one k-means over all rows
/// (optionally from `init`) when there are none. `seed` drives k-means++,
/// one stream per class. Shows a progress bar on a terminal.
pub fn upload(
    x: &Matrix,
    labels: Option<&[i64]>,
    opts: &Opts,
    init: Option<&Matrix>,
    seed: u64,
) -> Upload {
    let k = opts.k;
    let groups = match labels {
        None => vec![(-1, (0..x.rows).collect())],
        Some(l) => classes_of(l),
    };
    let bar = ftk::cli::progress(groups.len() as u64, "k-means");
    let mut u = Upload {
        assign: vec![-1i64; x.rows],
        ..Upload::default()
    };
    for (c, rows) in &groups {
        let base = u.sizes.len() as i64;
        if labels.is_some() && rows.len() <= k {
            // The authors upload small classes' raw features.
            for (j, &i) in rows.iter().enumerate() {
                u.rows.extend_from_slice(x.row(i));
                u.sizes.push(1);
                u.classes.push(*c);
                u.assign[i] = base + j as i64;
            }
            u.raw_rows += rows.len();
            u.groups.push(Group {
                class: *c,
                members: rows.len(),
                rows_sent: rows.len(),
                fit: None,
            });
        } else {
            let sub = if rows.len() == x.rows {
                x.clone()
            } else {
                let mut m = Matrix::zeros(rows.len(), x.cols);
                for (j, &i) in rows.iter().enumerate() {
                    m.row_mut(j).copy_from_slice(x.row(i));
                }
                m
            };
            let mut rng = ftk::rng::stream(seed, (*c + 1) as u64);
            let fit = kmeans::fit(&sub, opts, init, &mut rng);
            let mut sz = vec![0i64; k];
            for (j, &l) in fit.labels.iter().enumerate() {
                sz[l as usize] += 1;
                u.assign[rows[j]] = base + i64::from(l);
            }
            u.rows.extend_from_slice(&fit.centers.data);
            u.sizes.extend_from_slice(&sz);
            u.classes.extend(std::iter::repeat_n(*c, k));
            u.centroid_rows += k;
            u.inertia += fit.inertia;
            u.groups.push(Group {
                class: *c,
                members: rows.len(),
                rows_sent: k,
                fit: Some(GroupFit {
                    inertia: fit.inertia,
                    iters: fit.iters,
                }),
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    u
}
