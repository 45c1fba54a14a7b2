//! `fed-embed cluster`: FedDISC per-class k-means centroids (raw rows for small classes).

use crate::cli::{Feat, Out};
use crate::input::{self, Matrix};
use crate::{cluster, f4, kmeans, save, shown};
use ftk::records::{FedEmbedCluster, Tag};
use ftk::table::Table;
use ftk::tensors::OutTensor;
use ftk::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub feat: Feat,
    /// Pseudo-labels (tensor `labels`, -1 = skip); default: the features file's `labels`.
    #[arg(long, value_name = "L")]
    pub labels: Option<PathBuf>,
    /// Ignore any `labels` tensor in the features file: one k-means over all rows.
    #[arg(long, conflicts_with = "labels")]
    pub no_labels: bool,
    /// Clusters per class (the authors' K = 5).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Seed for k-means++ (one stream per class).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Lloyd iterations at most (the authors' 100).
    #[arg(long, default_value_t = 100)]
    pub max_iter: usize,
    /// Relative tolerance (times the mean feature variance), as sklearn.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// k-means++ restarts; the lowest inertia wins.
    #[arg(long, default_value_t = 1)]
    pub n_init: usize,
    /// Initial centroids [K, D] (tensor `centroids`) instead of k-means++;
    /// only without labels.
    #[arg(long, value_name = "C")]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub out: Out,
}

/// --init's centroids, [--k, D]; only without labels.
fn load_init(a: &Args, k: usize, dim: usize, labelled: bool) -> Result<Option<Matrix>> {
    let Some(p) = &a.init else {
        return Ok(None);
    };
    if labelled {
        bail!("--init gives one set of centroids, so it works only without labels (pass --no-labels, or drop --init)");
    }
    let f = input::open(p)?;
    let c = input::matrix_in(&f, "centroids", false, "[K, D] (initial centroids)")?;
    if c.rows != k || c.cols != dim {
        bail!(
            "{}: initial centroids are [{}, {}], expected [--k {k}, {dim}]",
            p.display(),
            c.rows,
            c.cols
        );
    }
    Ok(Some(c))
}

pub fn run(a: &Args) -> Result<(FedEmbedCluster, Table)> {
    let k = input::positive("--k", a.k)?;
    input::positive("--max-iter", a.max_iter)?;
    input::positive("--n-init", a.n_init)?;
    if !(a.tol.is_finite() && a.tol >= 0.0) {
        bail!("--tol must be >= 0, got {}", a.tol);
    }
    let (f, x) = a.feat.load()?;
    let labels = if a.no_labels {
        None
    } else {
        input::optional_labels(&f, a.labels.as_deref(), "labels", x.rows, -1)?
    };
    let init = load_init(a, k, x.cols, labels.is_some())?;
    if labels.is_none() && k > x.rows {
        bail!(
            "{}: --k {k} is more than the {} samples; lower --k",
            a.feat.features.display(),
            x.rows
        );
    }
    let opts = kmeans::Opts {
        k,
        max_iter: a.max_iter,
        tol: a.tol,
        n_init: a.n_init,
    };
    let u = cluster::upload(&x, labels.as_deref(), &opts, init.as_ref(), a.seed);
    let (m, d) = (u.sizes.len(), x.cols);
    save(
        &a.out.output,
        "cluster",
        &[
            OutTensor::f32("centroids", vec![m, d], &u.rows),
            OutTensor::i64("sizes", vec![m], &u.sizes),
            OutTensor::i64("labels", vec![m], &u.classes),
            OutTensor::i64("assign", vec![x.rows], &u.assign),
        ],
    )?;
    let mut t = Table::new([
        "class",
        "members",
        "rows_sent",
        "sent_as",
        "inertia",
        "iters",
    ]);
    for g in &u.groups {
        let (sent_as, inertia, iters) = match g.fit {
            Some(fit) => ("centroids", f4(fit.inertia), fit.iters.to_string()),
            None => ("raw", "0".into(), "-".into()),
        };
        t.row(vec![
            g.class.to_string(),
            g.members.to_string(),
            g.rows_sent.to_string(),
            sent_as.into(),
            inertia,
            iters,
        ]);
    }
    let s = FedEmbedCluster {
        centroid_rows: u.centroid_rows as u64,
        classes: u.groups.len() as u64,
        dim: d as u64,
        inertia: u.inertia,
        k: k as u64,
        kind: Tag::default(),
        output: shown(&a.out.output),
        raw_rows: u.raw_rows as u64,
        rows: m as u64,
        samples: x.rows as u64,
        seed: a.seed,
        skipped_unlabelled: u.assign.iter().filter(|&&v| v < 0).count() as u64,
    };
    Ok((s, t))
}
