//! `fed-embed adapt-weights`: FedAPT test-time domain weights and personalised prompts.

use crate::cli::{Feat, Out};
use crate::input::{self, Matrix};
use crate::{apt, d3a, save, shown};
use ftk::records::{FedEmbedAdaptWeights, Tag};
use ftk::tensors::OutTensor;
use ftk::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keys [domains, M, dim] (tensor `keys`).
    #[arg(long, value_name = "K")]
    pub keys: PathBuf,
    /// Global prompt context [M, dim] or [C, M, dim] (tensor `ctx`).
    #[arg(long, value_name = "P")]
    pub prompt: PathBuf,
    /// Adapter weight [domains, D] (tensor `weight`, nn.Linear layout).
    #[arg(long, value_name = "A")]
    pub adapter: PathBuf,
    #[command(flatten)]
    pub feat: Feat,
    /// Softmax temperature on the standardised scores (authors: 0.01). A sample
    /// whose domain scores are all equal gets uniform weights (the authors'
    /// code divides 0 by 0 there and returns NaN).
    #[arg(long, default_value_t = 0.01)]
    pub temperature: f64,
    /// Write only `weights` and `scores`, not the [N, ...] prompts.
    #[arg(long)]
    pub weights_only: bool,
    #[command(flatten)]
    pub out: Out,
}

/// The keys' shape [domains, M, dim] and values.
fn load_keys(a: &Args) -> Result<(Vec<usize>, Vec<f32>)> {
    let kf = input::open(&a.keys)?;
    let (kshape, keys) = input::floats_in(&kf, "keys", false, "[domains, M, dim] (keys)")?;
    if kshape.len() != 3 {
        bail!(
            "{}: tensor 'keys' must be [domains, M, dim], got {kshape:?}",
            a.keys.display()
        );
    }
    Ok((kshape, keys))
}

/// The adapter [domains, D], checked against the keys and the features.
fn load_adapter(a: &Args, domains: usize, dim: usize) -> Result<Matrix> {
    let af = input::open(&a.adapter)?;
    let w = input::matrix_in(
        &af,
        "weight",
        false,
        "[domains, D] (adapter weight, nn.Linear layout)",
    )?;
    if w.rows != domains {
        bail!(
            "{}: adapter has {} outputs but {} holds {domains} keys; there must be one score per domain",
            a.adapter.display(),
            w.rows,
            a.keys.display()
        );
    }
    if domains < 2 {
        bail!(
            "{}: {domains} domain: standardising scores needs at least 2 domains",
            a.keys.display()
        );
    }
    if w.cols != dim {
        bail!(
            "{}: adapter takes {} inputs but the features have {}",
            a.adapter.display(),
            w.cols,
            dim
        );
    }
    Ok(w)
}

/// Prompts [N, (C,) M, dim] for the weights `wt`, and their shape.
fn prompts(
    a: &Args,
    kshape: &[usize],
    keys: &[f32],
    wt: &Matrix,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let pf = input::open(&a.prompt)?;
    let (cshape, ctx) = input::floats_in(
        &pf,
        "ctx",
        false,
        "[M, dim] or [C, M, dim] (prompt context)",
    )?;
    let tail_ok = cshape.len() >= 2 && cshape[cshape.len() - 2..] == kshape[1..];
    if !tail_ok || cshape.len() > 3 {
        bail!(
            "{}: prompt context {cshape:?} does not match the keys' [M, dim] = {:?}; expected [M, dim] or [C, M, dim]",
            a.prompt.display(),
            &kshape[1..]
        );
    }
    let shape = std::iter::once(wt.rows)
        .chain(cshape.iter().copied())
        .collect();
    Ok((shape, apt::prompts(&ctx, keys, wt)))
}

pub fn run(a: &Args) -> Result<FedEmbedAdaptWeights> {
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature must be > 0, got {}", a.temperature);
    }
    let (kshape, keys) = load_keys(a)?;
    let domains = kshape[0];
    let (_f, x) = a.feat.load()?;
    let w = load_adapter(a, domains, x.cols)?;
    let (z, wt) = apt::weights(&x, &w, a.temperature);
    let p;
    let mut out = vec![wt.out("weights"), z.out("scores")];
    let mut pshape = vec![];
    if !a.weights_only {
        (pshape, p) = prompts(a, &kshape, &keys, &wt)?;
        out.push(OutTensor::f32("prompts", pshape.clone(), &p));
    }
    save(&a.out.output, "adapt-weights", &out)?;
    let mut hist = vec![0u64; domains];
    d3a::argmax_rows(&wt).iter().for_each(|&b| hist[b] += 1);
    Ok(FedEmbedAdaptWeights {
        domains: domains as u64,
        kind: Tag::default(),
        output: shown(&a.out.output),
        prompts_shape: pshape.iter().map(|&v| v as u64).collect(),
        samples: x.rows as u64,
        temperature: a.temperature,
        top_domain_counts: hist,
    })
}
