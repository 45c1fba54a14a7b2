//! `fed-embed pseudo-label`: FedDISC nearest-prototype pseudo-labels.

use crate::cli::{Feat, Out};
use crate::{f4, input, proto, save, shown};
use ftk::records::{FedEmbedPseudoLabel, Tag};
use ftk::table::Table;
use ftk::tensors::OutTensor;
use ftk::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Prototypes [C, D] (tensor `prototypes`).
    #[arg(long, value_name = "P")]
    pub prototypes: PathBuf,
    #[command(flatten)]
    pub feat: Feat,
    /// Class score: euclidean (-|f-p|^2, the authors') or cosine.
    #[arg(long, value_enum, default_value_t = proto::Metric::Euclidean)]
    pub metric: proto::Metric,
    /// Temperature of the confidence softmax over class scores.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Label samples below this confidence -1 (skipped by `cluster`).
    #[arg(long, value_name = "P")]
    pub min_confidence: Option<f64>,
    #[command(flatten)]
    pub out: Out,
}

pub fn run(a: &Args) -> Result<(FedEmbedPseudoLabel, Table)> {
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature must be > 0, got {}", a.temperature);
    }
    if let Some(m) = a.min_confidence {
        input::in_range("--min-confidence", m, 0.0, 1.0, false)?;
    }
    let pf = input::open(&a.prototypes)?;
    let p = input::matrix_in(&pf, "prototypes", false, "[C, D] (class prototypes)")?;
    let (f, x) = a.feat.load()?;
    if p.cols != x.cols {
        bail!(
            "{}: prototypes have dimension {} but the features have {}; both must come from the same feature extractor",
            a.prototypes.display(),
            p.cols,
            x.cols
        );
    }
    let truth = match f.get("labels") {
        Some(t) => Some(input::labels(&t, x.rows, 0)?),
        None => None,
    };
    let mut l = proto::pseudo_label(&x, &p, a.metric, a.temperature);
    let rejected = a.min_confidence.map_or(0, |m| l.reject_below(m));
    let n = x.rows;
    save(
        &a.out.output,
        "pseudo-label",
        &[
            OutTensor::i64("labels", vec![n], &l.labels),
            OutTensor::f32("confidence", vec![n], &l.confidence),
        ],
    )?;
    let classes = p.rows;
    let mut t = Table::new(["class", "assigned", "mean_conf", "correct"]);
    let mut correct_total = 0usize;
    for c in 0..classes {
        let idx: Vec<usize> = (0..n).filter(|&i| l.labels[i] == c as i64).collect();
        let conf =
            idx.iter().map(|&i| f64::from(l.confidence[i])).sum::<f64>() / idx.len().max(1) as f64;
        let correct = truth
            .as_ref()
            .map(|tr| idx.iter().filter(|&&i| tr[i] == c as i64).count());
        correct_total += correct.unwrap_or(0);
        t.row(vec![
            c.to_string(),
            idx.len().to_string(),
            f4(conf),
            correct.map_or("-".into(), |v| v.to_string()),
        ]);
    }
    let s = FedEmbedPseudoLabel {
        accuracy: truth.is_some().then(|| correct_total as f64 / n as f64),
        classes: classes as u64,
        kind: Tag::default(),
        mean_confidence: l.confidence.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64,
        metric: format!("{:?}", a.metric).to_lowercase(),
        output: shown(&a.out.output),
        rejected,
        samples: n as u64,
    };
    Ok((s, t))
}
