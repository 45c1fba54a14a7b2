//! `fed-embed prompt-sample`: pFedBayesPT instance-wise prompt samples.

use crate::bayes::{self, Generator, Noise};
use crate::cli::{Feat, Out};
use crate::{input, save, shown};
use ftk::records::{FedEmbedPromptSample, Tag};
use ftk::tensors::OutTensor;
use ftk::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Generator weights (safetensors).
    #[arg(long, value_name = "G")]
    pub generator: PathBuf,
    /// Architecture JSON: {"noise_dim": n, "prompt_shape": [L, P], "output": "mean" |
    /// "mean_logvar", "layers": [{"weight": NAME, "bias": NAME, "activation":
    /// "relu"|"tanh"|"sigmoid"|"silu"|"gelu_tanh"|"identity"}, ...]}.
    #[arg(long, value_name = "JSON")]
    pub arch: PathBuf,
    #[command(flatten)]
    pub feat: Feat,
    /// Monte-Carlo samples per instance.
    #[arg(long, default_value_t = 16)]
    pub samples: usize,
    /// Seed of the noise streams (one per sample and instance).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Explicit noise instead of --seed: tensors `eps` [M, N, noise_dim] and,
    /// for mean_logvar, `eta` [M, N, width] (for checking against PyTorch).
    #[arg(long, value_name = "E")]
    pub noise: Option<PathBuf>,
    /// Also write every sample (`samples` [M, N, ...]).
    #[arg(long)]
    pub write_samples: bool,
    #[command(flatten)]
    pub out: Out,
}

/// The generator: --arch's layers with their tensors from --generator.
fn load_generator(a: &Args) -> Result<Generator> {
    let text = ftk::io::read_text(&a.arch)?;
    let arch: bayes::Arch = serde_json::from_str(&text).map_err(|e| {
        ftk::Error::input(format!("{}: bad architecture JSON: {e}", a.arch.display()))
    })?;
    if arch.layers.is_empty() || arch.prompt_shape.is_empty() || arch.prompt_shape.contains(&0) {
        bail!(
            "{}: need at least one layer and a non-empty prompt_shape without zeros",
            a.arch.display()
        );
    }
    let gf = input::open(&a.generator)?;
    let mut layers = vec![];
    for l in &arch.layers {
        let w = input::matrix_in(&gf, &l.weight, true, "[out, in] (nn.Linear weight)")?;
        let b = match &l.bias {
            Some(bn) => {
                let n = input::pick(&gf, bn, true)?;
                Some(input::floats(&gf.require(&n)?, "[out] (bias)")?)
            }
            None => None,
        };
        layers.push(bayes::Layer {
            w,
            b,
            act: l.activation,
        });
    }
    let width: usize = arch.prompt_shape.iter().product();
    Ok(Generator {
        arch,
        layers,
        width,
    })
}

/// --noise's explicit draws for `m` samples of `n` instances, or the seed.
fn noise(a: &Args, g: &Generator, m: usize, n: usize) -> Result<Noise> {
    let Some(p) = &a.noise else {
        return Ok(Noise::Seeded(a.seed));
    };
    let (nd, width) = (g.arch.noise_dim, g.width);
    let f = input::open(p)?;
    let (es, eps) = input::floats_in(&f, "eps", true, "[M, N, noise_dim]")?;
    if es != [m, n, nd] {
        bail!(
            "{}: tensor 'eps' is {es:?}, expected [--samples {m}, {n}, {nd}]",
            p.display()
        );
    }
    let eta = if g.arch.output == bayes::Output::MeanLogvar {
        let (hs, h) = input::floats_in(&f, "eta", true, "[M, N, width]")?;
        if hs != [m, n, width] {
            bail!(
                "{}: tensor 'eta' is {hs:?}, expected [{m}, {n}, {width}]",
                p.display()
            );
        }
        h
    } else {
        vec![]
    };
    Ok(Noise::Explicit { eps, eta })
}

pub fn run(a: &Args) -> Result<FedEmbedPromptSample> {
    let m = input::positive("--samples", a.samples)?;
    let g = load_generator(a)?;
    let what = format!("{} + {}", a.arch.display(), a.generator.display());
    let (_f, x) = a.feat.load()?;
    g.check(x.cols, &what)?;
    let n = x.rows;
    let noise = noise(a, &g, m, n)?;
    let r = g.sample_moments(&x, m, &noise, a.write_samples);
    let shape: Vec<usize> = std::iter::once(n)
        .chain(g.arch.prompt_shape.iter().copied())
        .collect();
    let mut out = vec![
        OutTensor::f32("mean", shape.clone(), &r.mean),
        OutTensor::f32("var", shape.clone(), &r.var),
    ];
    if a.write_samples {
        let s: Vec<usize> = std::iter::once(m).chain(shape.iter().copied()).collect();
        out.push(OutTensor::f32("samples", s, &r.all));
    }
    save(&a.out.output, "prompt-sample", &out)?;
    let logvar = g.arch.output == bayes::Output::MeanLogvar;
    Ok(FedEmbedPromptSample {
        kind: Tag::default(),
        mc_samples: m as u64,
        mean_var: r.var.iter().map(|&v| f64::from(v)).sum::<f64>() / r.var.len() as f64,
        output: shown(&a.out.output),
        output_kind: if logvar { "mean_logvar" } else { "mean" }.into(),
        prompt_shape: g.arch.prompt_shape.iter().map(|&v| v as u64).collect(),
        samples: n as u64,
        seed: a.seed,
    })
}
