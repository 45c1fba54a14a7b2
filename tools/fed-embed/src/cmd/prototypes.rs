//! `fed-embed prototypes`: FedDISC per-class mean features.

use crate::cli::{Feat, Out};
use crate::{f4, input, proto, save, shown};
use ftk::records::{FedEmbedPrototypes, Tag};
use ftk::table::Table;
use ftk::tensors::OutTensor;
use ftk::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub feat: Feat,
    /// Labels file (tensor `labels`); default: the features file's `labels`.
    #[arg(long, value_name = "L")]
    pub labels: Option<PathBuf>,
    /// Number of classes (default: largest label + 1).
    #[arg(long)]
    pub classes: Option<usize>,
    #[command(flatten)]
    pub out: Out,
}

pub fn run(a: &Args) -> Result<(FedEmbedPrototypes, Table)> {
    let (f, x) = a.feat.load()?;
    let Some(labels) = input::optional_labels(&f, a.labels.as_deref(), "labels", x.rows, 0)? else {
        bail!(
            "{}: no tensor named 'labels' (prototypes need labelled server features); add one or pass --labels FILE",
            a.feat.features.display()
        );
    };
    let max = labels.iter().copied().max().unwrap_or(0) as u64;
    let classes = match a.classes {
        Some(c) => input::positive("--classes", c)? as u64,
        None => max + 1,
    };
    if max >= classes {
        bail!("label {max} is out of range for --classes {classes}");
    }
    // Every class needs a sample to have a prototype, so more classes than
    // samples cannot work: refuse before allocating [classes, D].
    if classes > x.rows as u64 {
        bail!(
            "{}: {classes} classes (labels 0..={}) but only {} samples; every class needs at least one sample, so check the labels{}",
            a.feat.features.display(),
            classes - 1,
            x.rows,
            if a.classes.is_some() { " and --classes" } else { "" }
        );
    }
    let classes = classes as usize;
    let (p, counts) = proto::prototypes(&x, &labels, classes)?;
    save(
        &a.out.output,
        "prototypes",
        &[
            p.out("prototypes"),
            OutTensor::i64("counts", vec![classes], &counts),
        ],
    )?;
    let mut t = Table::new(["class", "samples", "norm"]);
    for (c, count) in counts.iter().enumerate() {
        let norm = p
            .row(c)
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        t.row(vec![c.to_string(), count.to_string(), f4(norm)]);
    }
    let s = FedEmbedPrototypes {
        classes: classes as u64,
        dim: x.cols as u64,
        kind: Tag::default(),
        max_count: counts.iter().copied().max().unwrap_or(0),
        min_count: counts.iter().copied().min().unwrap_or(0),
        output: shown(&a.out.output),
        samples: x.rows as u64,
    };
    Ok((s, t))
}
