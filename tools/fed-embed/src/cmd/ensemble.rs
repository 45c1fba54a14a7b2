//! `fed-embed ensemble`: weighted teacher soft labels for distillation.

use crate::cli::Out;
use crate::d3a;
use crate::input::{self, Matrix};
use crate::{save, shown};
use ftk::records::{FedEmbedEnsemble, Tag};
use ftk::{bail, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Teacher weights [N, K] (tensor `weights`, from d3a-weights); uniform if absent.
    #[arg(long, value_name = "W")]
    pub weights: Option<PathBuf>,
    /// Teacher logits, one file per client in the weights' client order (tensor `logits` [N, C]).
    #[arg(long, value_name = "L", num_args = 1.., required = true)]
    pub logits: Vec<PathBuf>,
    /// Name of the logits tensor.
    #[arg(long, value_name = "NAME", default_value = "logits")]
    pub logits_tensor: String,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Average probabilities (probs) or logits (logits).
    #[arg(long, value_enum, default_value_t = d3a::Combine::Probs)]
    pub combine: d3a::Combine,
    #[command(flatten)]
    pub out: Out,
}

/// The teachers' logits, every file [N, C] with the same N and C.
fn load_logits(a: &Args) -> Result<Vec<Matrix>> {
    let explicit = a.logits_tensor != "logits";
    let mut logits: Vec<Matrix> = Vec::with_capacity(a.logits.len());
    for p in &a.logits {
        let f = input::open(p)?;
        let m = input::matrix_in(&f, &a.logits_tensor, explicit, "[N, C] (teacher logits)")?;
        if let Some(first) = logits.first() {
            if (m.rows, m.cols) != (first.rows, first.cols) {
                bail!(
                    "{}: logits are [{}, {}] but {} has [{}, {}]; every teacher must score the same samples and classes",
                    p.display(),
                    m.rows,
                    m.cols,
                    a.logits[0].display(),
                    first.rows,
                    first.cols
                );
            }
        }
        logits.push(m);
    }
    Ok(logits)
}

/// Teacher weights [N, K] from `p`, non-negative.
fn load_weights(p: &Path, n: usize, k: usize) -> Result<Matrix> {
    let f = input::open(p)?;
    let w = input::matrix_in(&f, "weights", false, "[N, K] (teacher weights)")?;
    if (w.rows, w.cols) != (n, k) {
        bail!(
            "{}: tensor 'weights' is [{}, {}], but there are {n} samples and {k} teachers (--logits files)",
            p.display(),
            w.rows,
            w.cols
        );
    }
    if let Some(i) = w.data.iter().position(|&v| v < 0.0) {
        bail!(
            "{}: tensor 'weights': negative weight at row {}, teacher {}",
            p.display(),
            i / k,
            i % k
        );
    }
    Ok(w)
}

pub fn run(a: &Args) -> Result<FedEmbedEnsemble> {
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature must be > 0, got {}", a.temperature);
    }
    let logits = load_logits(a)?;
    let (n, c, k) = (logits[0].rows, logits[0].cols, logits.len());
    let w = match &a.weights {
        Some(p) => load_weights(p, n, k)?,
        None => Matrix::new(n, k, vec![1.0 / k as f32; n * k]),
    };
    let soft = d3a::ensemble(&logits, &w, a.temperature, a.combine);
    save(&a.out.output, "ensemble", &[soft.out("soft_labels")])?;
    Ok(FedEmbedEnsemble {
        classes: c as u64,
        combine: format!("{:?}", a.combine).to_lowercase(),
        kind: Tag::default(),
        mean_entropy: d3a::mean_entropy(&soft),
        output: shown(&a.out.output),
        samples: n as u64,
        teachers: k as u64,
        temperature: a.temperature,
    })
}
