//! k-means (Lloyd) with greedy k-means++ seeding, following scikit-learn's
//! `KMeans(algorithm="lloyd")` step for step so that, given the same initial
//! centroids, the iterations, labels and centroids are the same:
//!
//! * tolerance = `tol` × mean per-feature variance of the data;
//! * each iteration assigns every sample to its nearest centroid (ties to
//!   the lower index), recomputes centroids as member means, relocates empty
//!   clusters to the samples farthest from their old centroid, and stops on
//!   unchanged labels ("strict convergence") or when the summed squared
//!   centroid shift is <= tolerance;
//! * without strict convergence, a last assignment makes labels match the
//!   returned centroids; inertia is the exact sum of squared distances.
//!
//! k-means++ is sklearn's greedy variant (2 + ln k candidates per centroid,
//! sampled proportionally to D², the one that lowers the potential most
//! wins), drawn from ftk's seeded ChaCha stream, so it is reproducible
//! within ftk but not identical to sklearn's numpy draws.
//!
//! Hot loop: samples go in fixed blocks of [`OUTER`] rows to rayon tasks;
//! within a task, distances come from one single-threaded GEMM per
//! [`INNER`] rows (`‖c‖² − 2 x·c`, as sklearn does) and member sums are
//! accumulated in f64. Blocks are reduced in index order, so results do not
//! depend on the thread count.

use crate::input::Matrix;
use ftk::linalg;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Rows per rayon task (fixed, so the reduction order is fixed).
const OUTER: usize = 4096;
/// Rows per GEMM inside a task (keeps the [rows, k] block in L2).
const INNER: usize = 256;

#[derive(Clone, Debug)]
pub struct Opts {
    pub k: usize,
    pub max_iter: usize,
    pub tol: f64,
    pub n_init: usize,
}

#[derive(Clone, Debug)]
pub struct Fit {
    pub centers: Matrix,
    pub labels: Vec<u32>,
    pub inertia: f64,
    pub iters: usize,
    pub converged: bool,
}

/// Squared row norms of `x`.
pub fn row_norms(x: &Matrix) -> Vec<f32> {
    x.data
        .par_chunks(x.cols)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

struct Pass {
    labels: Vec<u32>,
    /// Squared distance of each sample to its centroid (from the expansion).
    dist: Vec<f32>,
    sums: Vec<f64>,
    counts: Vec<u64>,
}

/// One block's labels, distances, member sums and counts.
type Block = (Vec<u32>, Vec<f32>, Vec<f64>, Vec<u64>);

/// One assignment pass over `x` with `centers`; member sums when `sums`.
fn assign(x: &Matrix, xn: &[f32], centers: &Matrix, sums: bool) -> Pass {
    let (d, k) = (x.cols, centers.rows);
    let cn = row_norms(centers);
    let blocks: Vec<Block> = x
        .data
        .par_chunks(OUTER * d)
        .enumerate()
        .map(|(b, chunk)| {
            let rows = chunk.len() / d;
            let base = b * OUTER;
            let mut labels = vec![0u32; rows];
            let mut dist = vec![0f32; rows];
            let mut s = if sums { vec![0f64; k * d] } else { vec![] };
            let mut cnt = vec![0u64; if sums { k } else { 0 }];
            let mut dot = vec![0f32; INNER * k];
            for i0 in (0..rows).step_by(INNER) {
                let m = INNER.min(rows - i0);
                let a = &chunk[i0 * d..(i0 + m) * d];
                linalg::serial(|| {
                    linalg::matmul_bt(&mut dot[..m * k], a, &centers.data, m, k, d, false)
                });
                for r in 0..m {
                    let row = &dot[r * k..(r + 1) * k];
                    let (mut best, mut bj) = (f32::INFINITY, 0usize);
                    for (j, (&c, &p)) in cn.iter().zip(row).enumerate() {
                        let v = c - 2.0 * p;
                        if v < best {
                            best = v;
                            bj = j;
                        }
                    }
                    let i = i0 + r;
                    labels[i] = bj as u32;
                    dist[i] = (xn[base + i] + best).max(0.0);
                    if sums {
                        cnt[bj] += 1;
                        let dst = &mut s[bj * d..(bj + 1) * d];
                        for (o, &v) in dst.iter_mut().zip(&a[r * d..(r + 1) * d]) {
                            *o += f64::from(v);
                        }
                    }
                }
            }
            (labels, dist, s, cnt)
        })
        .collect();
    let mut out = Pass {
        labels: Vec::with_capacity(x.rows),
        dist: Vec::with_capacity(x.rows),
        sums: vec![0f64; if sums { k * d } else { 0 }],
        counts: vec![0u64; if sums { k } else { 0 }],
    };
    for (l, di, s, c) in blocks {
        out.labels.extend(l);
        out.dist.extend(di);
        out.sums.iter_mut().zip(&s).for_each(|(o, v)| *o += v);
        out.counts.iter_mut().zip(&c).for_each(|(o, v)| *o += v);
    }
    out
}

/// scikit-learn's `_tolerance`: `tol` times the mean per-feature variance.
pub fn tolerance(x: &Matrix, tol: f64) -> f64 {
    if tol == 0.0 {
        return 0.0;
    }
    let (n, d) = (x.rows as f64, x.cols);
    let mut mean = vec![0f64; d];
    let mut sq = vec![0f64; d];
    for r in x.data.chunks(d) {
        for j in 0..d {
            let v = f64::from(r[j]);
            mean[j] += v;
            sq[j] += v * v;
        }
    }
    let var: f64 = (0..d)
        .map(|j| {
            let m = mean[j] / n;
            (sq[j] / n - m * m).max(0.0)
        })
        .sum::<f64>()
        / d as f64;
    var * tol
}

/// Exact inertia: Σ ‖x_i − c_{label_i}‖² in f64.
pub fn inertia(x: &Matrix, centers: &Matrix, labels: &[u32]) -> f64 {
    x.data
        .par_chunks(x.cols)
        .zip(labels.par_iter())
        .map(|(r, &l)| {
            r.iter()
                .zip(centers.row(l as usize))
                .map(|(a, b)| {
                    let t = f64::from(*a) - f64::from(*b);
                    t * t
                })
                .sum::<f64>()
        })
        .sum()
}

/// Lloyd iterations from `init` (sklearn `_kmeans_single_lloyd`).
pub fn lloyd(x: &Matrix, xn: &[f32], init: &Matrix, max_iter: usize, tol: f64) -> Fit {
    let (k, d) = (init.rows, x.cols);
    let mut centers = init.clone();
    let mut old_labels: Option<Vec<u32>> = None;
    let mut strict = false;
    let mut iters = 0;
    let mut last: Option<Vec<u32>> = None;
    for it in 0..max_iter {
        iters = it + 1;
        let mut p = assign(x, xn, &centers, true);
        relocate_empty(x, &centers, &mut p);
        let mut new = Matrix::zeros(k, d);
        let mut shift = 0f64;
        for j in 0..k {
            let c = p.counts[j];
            if c == 0 {
                // No sample left to relocate (k > n): keep the centroid.
                new.row_mut(j).copy_from_slice(centers.row(j));
                continue;
            }
            let inv = 1.0 / c as f64;
            for (t, o) in new.row_mut(j).iter_mut().enumerate() {
                *o = (p.sums[j * d + t] * inv) as f32;
            }
            shift += centers
                .row(j)
                .iter()
                .zip(new.row(j))
                .map(|(a, b)| {
                    let t = f64::from(*a) - f64::from(*b);
                    t * t
                })
                .sum::<f64>();
        }
        centers = new;
        if old_labels.as_deref() == Some(&p.labels[..]) {
            strict = true;
            last = Some(p.labels);
            break;
        }
        let done = shift <= tol;
        old_labels = Some(p.labels);
        if done {
            break;
        }
    }
    let labels = match (strict, last) {
        (true, Some(l)) => l,
        _ => assign(x, xn, &centers, false).labels,
    };
    let inertia = inertia(x, &centers, &labels);
    Fit {
        centers,
        labels,
        inertia,
        iters,
        converged: strict || iters < max_iter,
    }
}

/// sklearn `_relocate_empty_clusters_dense`: each empty cluster takes the
/// sample farthest from its current centroid (farthest first), moving that
/// sample's contribution out of its old cluster's sums.
fn relocate_empty(x: &Matrix, _centers: &Matrix, p: &mut Pass) {
    let d = x.cols;
    let empty: Vec<usize> = (0..p.counts.len()).filter(|&j| p.counts[j] == 0).collect();
    if empty.is_empty() {
        return;
    }
    let mut order: Vec<usize> = (0..x.rows).collect();
    order.sort_by(|&a, &b| p.dist[b].total_cmp(&p.dist[a]).then(a.cmp(&b)));
    for (&j, &far) in empty.iter().zip(&order) {
        let old = p.labels[far] as usize;
        if p.counts[old] <= 1 {
            continue;
        }
        let row = x.row(far);
        for (t, &v) in row.iter().enumerate() {
            let v = f64::from(v);
            p.sums[old * d + t] -= v;
            p.sums[j * d + t] = v;
        }
        p.counts[old] -= 1;
        p.counts[j] = 1;
        // Like sklearn, `labels` keep the old assignment: the next pass
        // reassigns everything, and the convergence test compares labels.
    }
}

/// Squared distances from each of `pts` ([t, D]) to every sample: [t][N].
fn dists_to(x: &Matrix, xn: &[f32], pts: &Matrix) -> Vec<Vec<f32>> {
    let (d, t) = (x.cols, pts.rows);
    let pn = row_norms(pts);
    let cols: Vec<Vec<f32>> = x
        .data
        .par_chunks(OUTER * d)
        .enumerate()
        .map(|(b, chunk)| {
            let rows = chunk.len() / d;
            let mut dot = vec![0f32; rows * t];
            linalg::serial(|| linalg::matmul_bt(&mut dot, chunk, &pts.data, rows, t, d, false));
            let mut out = vec![0f32; rows * t];
            for i in 0..rows {
                let n = xn[b * OUTER + i];
                for c in 0..t {
                    // Stored candidate-major within the block.
                    out[c * rows + i] = (n + pn[c] - 2.0 * dot[i * t + c]).max(0.0);
                }
            }
            out
        })
        .collect();
    let mut res = vec![Vec::with_capacity(x.rows); t];
    for blk in cols {
        let rows = blk.len() / t.max(1);
        for (c, r) in res.iter_mut().enumerate() {
            r.extend_from_slice(&blk[c * rows..(c + 1) * rows]);
        }
    }
    res
}

/// Greedy k-means++ (sklearn `_kmeans_plusplus`), uniform sample weights.
pub fn plusplus(x: &Matrix, xn: &[f32], k: usize, rng: &mut ChaCha8Rng) -> Matrix {
    let (n, d) = (x.rows, x.cols);
    let trials = 2 + (k as f64).ln() as usize;
    let mut centers = Matrix::zeros(k, d);
    let first = rng.random_range(0..n);
    centers.row_mut(0).copy_from_slice(x.row(first));
    let one = Matrix::new(1, d, x.row(first).to_vec());
    let mut closest = dists_to(x, xn, &one).remove(0);
    let mut pot: f64 = closest.iter().map(|&v| f64::from(v)).sum();
    for c in 1..k {
        // Cumulative D² in f64 (sklearn's stable_cumsum), searched on the left.
        let mut cum = Vec::with_capacity(n);
        let mut acc = 0f64;
        for &v in &closest {
            acc += f64::from(v);
            cum.push(acc);
        }
        let ids: Vec<usize> = (0..trials)
            .map(|_| {
                let r = rng.random::<f64>() * pot;
                cum.partition_point(|&v| v < r).min(n - 1)
            })
            .collect();
        let mut cand = Matrix::zeros(trials, d);
        for (t, &i) in ids.iter().enumerate() {
            cand.row_mut(t).copy_from_slice(x.row(i));
        }
        let dists = dists_to(x, xn, &cand);
        let mut best: Option<(f64, usize, Vec<f32>)> = None;
        for (t, mut dt) in dists.into_iter().enumerate() {
            dt.iter_mut()
                .zip(&closest)
                .for_each(|(a, &b)| *a = a.min(b));
            let p: f64 = dt.iter().map(|&v| f64::from(v)).sum();
            if best.as_ref().is_none_or(|(bp, _, _)| p < *bp) {
                best = Some((p, t, dt));
            }
        }
        let (p, t, dt) = best.expect("at least two candidates");
        pot = p;
        closest = dt;
        centers.row_mut(c).copy_from_slice(cand.row(t));
    }
    centers
}

/// `n_init` runs of k-means++ then Lloyd; the lowest inertia wins (the
/// first on ties, as sklearn).
pub fn fit(x: &Matrix, opts: &Opts, init: Option<&Matrix>, rng: &mut ChaCha8Rng) -> Fit {
    let xn = row_norms(x);
    let tol = tolerance(x, opts.tol);
    if let Some(c) = init {
        return lloyd(x, &xn, c, opts.max_iter, tol);
    }
    let mut best: Option<Fit> = None;
    for _ in 0..opts.n_init.max(1) {
        let c = plusplus(x, &xn, opts.k, rng);
        let f = lloyd(x, &xn, &c, opts.max_iter, tol);
        if best.as_ref().is_none_or(|b| f.inertia < b.inertia) {
            best = Some(f);
        }
    }
    best.expect("n_init >= 1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> Matrix {
        // Three tight 2-D blobs of 5 points each around (0,0), (10,0), (0,10).
        let mut v = vec![];
        for (cx, cy) in [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)] {
            for i in 0..5 {
                let e = i as f32 * 0.1;
                v.extend_from_slice(&[cx + e, cy - e]);
            }
        }
        Matrix::new(15, 2, v)
    }

    #[test]
    fn finds_the_blobs_and_its_inertia_is_exact() {
        let x = blobs();
        let mut rng = ftk::rng::stream(1, 0);
        let opts = Opts {
            k: 3,
            max_iter: 100,
            tol: 1e-4,
            n_init: 3,
        };
        let f = fit(&x, &opts, None, &mut rng);
        // Each blob is one cluster: same label within a blob.
        for b in 0..3 {
            let l = &f.labels[b * 5..b * 5 + 5];
            assert!(l.iter().all(|&v| v == l[0]), "{:?}", f.labels);
        }
        // Per blob: offsets 0..0.4 in x and y, variance 0.02 each -> 5*0.04.
        assert!((f.inertia - 3.0 * 5.0 * 0.04).abs() < 1e-5, "{}", f.inertia);
    }

    #[test]
    fn empty_cluster_takes_the_farthest_sample() {
        let x = blobs();
        let xn = row_norms(&x);
        // Two centroids on blob 0 (one will be empty), one far away.
        let init = Matrix::new(3, 2, vec![0.2, -0.2, 0.2, -0.2, 100.0, 100.0]);
        let f = lloyd(&x, &xn, &init, 1, 0.0);
        // Iteration 1: all samples go to centroid 0 (ties to lower index),
        // so 1 and 2 are empty and take the two farthest samples.
        let mut sizes = [0; 3];
        f.labels.iter().for_each(|&l| sizes[l as usize] += 1);
        assert!(sizes.iter().all(|&s| s > 0), "{sizes:?}");
    }

    #[test]
    fn plusplus_seeds_the_far_outlier() {
        // 200 points near the origin and one at distance 1000: uniform
        // seeding would pick the outlier for one of 2 centroids ~1% of the
        // time, D² seeding essentially always.
        let mut v: Vec<f32> = (0..200)
            .flat_map(|i| [(i % 7) as f32 * 0.01, (i % 5) as f32 * 0.01])
            .collect();
        v.extend_from_slice(&[1000.0, 0.0]);
        let x = Matrix::new(201, 2, v);
        let xn = row_norms(&x);
        let hits = (0..20)
            .filter(|&s| {
                let c = plusplus(&x, &xn, 2, &mut ftk::rng::stream(s, 0));
                (0..2).any(|j| c.row(j)[0] == 1000.0)
            })
            .count();
        assert_eq!(hits, 20);
    }
}
