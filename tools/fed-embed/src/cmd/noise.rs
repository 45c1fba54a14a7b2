//! `fed-embed noise`: FedDISC upload noise, with DP accounting under --clip.

use crate::cli::Out;
use crate::{input, noise, save, shown};
use ftk::records::{FedEmbedNoise, Tag};
use ftk::tensors::OutTensor;
use ftk::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// File with the vectors to share (other tensors are copied unchanged).
    #[arg(long, value_name = "F")]
    pub features: PathBuf,
    /// Tensor to noise (default: `centroids` if present, else `features`).
    #[arg(long, value_name = "NAME")]
    pub tensor: Option<String>,
    /// Noise standard deviation (the authors' beta; 0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub sigma: f64,
    /// Clip each row to this L2 norm first, and report (epsilon, delta).
    #[arg(long, value_name = "C")]
    pub clip: Option<f64>,
    /// delta for the reported epsilon.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Seed of the noise stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub out: Out,
}

fn check(a: &Args) -> Result<()> {
    if !(a.sigma.is_finite() && a.sigma >= 0.0) {
        bail!("--sigma must be >= 0, got {}", a.sigma);
    }
    if let Some(c) = a.clip {
        if !(c.is_finite() && c > 0.0) {
            bail!("--clip must be > 0, got {c}");
        }
    }
    input::in_range("--delta", a.delta, 0.0, 1.0, true)?;
    Ok(())
}

pub fn run(a: &Args) -> Result<FedEmbedNoise> {
    check(a)?;
    let f = input::open(&a.features)?;
    let name = match &a.tensor {
        Some(t) => input::pick(&f, t, true)?,
        None if f.get("centroids").is_some() => "centroids".to_string(),
        None => input::pick(&f, "features", false)?,
    };
    let mut x = input::matrix(&f.require(&name)?, "[N, D] (vectors to share)")?;
    let r = noise::apply(&mut x, a.sigma, a.clip, a.seed);
    // The noised tensor, then every other tensor of the file unchanged.
    let mut out: Vec<OutTensor> = vec![x.out(&name)];
    let names = f.names();
    for n in &names {
        if *n != name {
            let t = f.require(n)?;
            out.push(OutTensor {
                name: n.clone(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                data: t.data.into(),
            });
        }
    }
    save(&a.out.output, "noise", &out)?;
    // The DP fields exist only with --clip: without a bound there is no sensitivity.
    let sens = a.clip.map(|c| 2.0 * c);
    Ok(FedEmbedNoise {
        clip: a.clip,
        clipped_fraction: a.clip.map(|_| r.clipped_rows as f64 / x.rows.max(1) as f64),
        clipped_rows: a.clip.map(|_| r.clipped_rows as u64),
        delta: a.clip.map(|_| a.delta),
        dim: x.cols as u64,
        epsilon: sens.map(|s| ftk::dp::epsilon(a.sigma / s, a.delta)),
        kind: Tag::default(),
        max_row_norm: r.max_norm,
        mean_norm_after: r.mean_norm_after,
        mean_norm_before: r.mean_norm_before,
        mean_norm_clipped: r.mean_norm_clipped,
        noise_multiplier: sens.map(|s| a.sigma / s),
        noise_norm: r.noise_norm,
        output: shown(&a.out.output),
        rows: x.rows as u64,
        seed: a.seed,
        sensitivity: sens,
        sigma: a.sigma,
        tensor: name,
    })
}
