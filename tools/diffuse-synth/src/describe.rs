//! `diffuse-synth describe`: FedDEO's client-side description learning
//! (MingzhaoYang/FedDEO `generate_images.py`): a description embedding [1,L,D],
//! the only trainable tensor, fitted to a client's images with the denoising loss
//! MSE(UNet(z_t, t, desc), eps) and plain SGD, one image per step.
//!
//! Per step: x = CLIP-normalised image (the authors' quirk: SD's VAE expects
//! [-1,1]), z0 = VAE.encode(x).sample() * scaling_factor, t ~ U{0..T-1},
//! eps ~ N(0,I), z_t = DDPM add_noise(z0, eps, t); v-prediction models regress
//! the velocity instead of eps. RandomResizedCrop is not applied: give images at
//! the model's resolution.

use crate::classifier::clip_normalize;
use crate::model::{self, ce};
use crate::scheduler::{Config, Kind, Prediction};
use candle_core::{Tensor, Var};
use clap::Args;
use ftk::cli::Stdout;
use ftk::records::{DiffuseSynthDescription, Tag};
use ftk::tensors::{write_safetensors, OutTensor, TensorFile};
use ftk::{bail, Error, Result};
use rand::RngExt;
use rand_distr::StandardNormal;
use std::path::{Path, PathBuf};

/// Learn a FedDEO description embedding on a client's images.
#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// diffusers model folder (unet/, vae/, scheduler/)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// client images: a directory of PNGs (sorted by name, one size), or
    /// safetensors with `images` [N,3,H,W] in [0,1]
    #[arg(long, value_name = "DIR|FILE")]
    pub images: PathBuf,
    /// initial description: safetensors with `prompt_embeds` [1,L,D]
    #[arg(long, value_name = "FILE")]
    pub init: PathBuf,
    /// SGD steps, one image each in order (default: one epoch = N)
    #[arg(long)]
    pub steps: Option<usize>,
    /// SGD learning rate (the authors': 10)
    #[arg(long, default_value_t = 10.0)]
    pub lr: f64,
    /// seed for timesteps and noise
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// fixed draws instead of --seed: `timesteps` [S] (integers), `latent_noise` and
    /// `noise` [S,C,h,w] (to reproduce a PyTorch run)
    #[arg(long, value_name = "FILE")]
    pub train_noise: Option<PathBuf>,
    /// output safetensors (`prompt_embeds` [1,L,D]); stdout gets one JSON line:
    /// {"kind":"description","images","loss_first","loss_last","path","steps"}
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Where the UNet and VAE run: auto (CUDA when a GPU is present and this build has
    /// CUDA support), cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    pub device: ftk::device::DeviceArg,
    /// UNet and VAE weights and activations on CUDA: f32, bf16 or f16 (f32 accumulation;
    /// latents, schedulers and gradients stay f32); the CPU path is f32
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
}

fn f32s(p: &Path, name: &str, rank: usize, what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let f = TensorFile::open(p)?;
    let t = f.require(name)?;
    t.expect_rank(rank, what)?;
    Ok((t.shape.to_vec(), t.to_f32_vec()?))
}

fn normals(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let mut r = ftk::rng::stream(seed, stream);
    (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect()
}

/// `--train-noise`: timesteps [steps] and the two noises [steps, C, h, w], checked.
#[allow(clippy::type_complexity)]
fn fixed_draws(
    p: &Path,
    steps: usize,
    (lc, lh, lw): (usize, usize, usize),
    train_steps: usize,
) -> Result<(Vec<i64>, Vec<f32>, Vec<f32>)> {
    let f = TensorFile::open(p)?;
    let ts = f.require("timesteps")?;
    ts.expect_rank(1, "[steps]")?;
    let ts = ts.to_i64_vec()?;
    let (ls, ln) = f32s(p, "latent_noise", 4, "[steps, C, h, w]")?;
    let (ns, nz) = f32s(p, "noise", 4, "[steps, C, h, w]")?;
    if ts.len() < steps
        || ls[0] < steps
        || ns[0] < steps
        || ls[1..] != [lc, lh, lw]
        || ns[1..] != [lc, lh, lw]
    {
        bail!(
            "{}: needs `timesteps` [{steps}] and `latent_noise`/`noise` [{steps}, {lc}, {lh}, {lw}]",
            p.display()
        );
    }
    if let Some(t) = ts.iter().find(|&&t| t < 0 || t as usize >= train_steps) {
        bail!("{}: timestep {t} is outside 0..{train_steps}", p.display());
    }
    Ok((ts, ln, nz))
}

/// The models one SGD step runs through.
struct Models<'a> {
    unet: &'a model::Unet,
    vae: &'a model::Vae,
    prediction: Prediction,
}

/// One step's random draws: the timestep and the two noises [C, h, w].
struct Draw {
    t: usize,
    alpha_cumprod: f32,
    latent_noise: Vec<f32>,
    noise: Vec<f32>,
}

impl Models<'_> {
    /// The denoising loss of image `img` [3, h, w] under description `desc` [L, D] and its
    /// gradient w.r.t. the description.
    fn loss_and_grad(
        &self,
        img: &[f32],
        (ih, iw): (usize, usize),
        d: &Draw,
        desc: &[f32],
        (l, dim): (usize, usize),
    ) -> candle_core::Result<(f32, Vec<f32>)> {
        let dev = self.unet.place.device.clone();
        let (lc, lh, lw) = (
            self.unet.in_channels,
            ih / self.vae.factor,
            iw / self.vae.factor,
        );
        let x = Tensor::from_vec(img.to_vec(), (1, 3, ih, iw), &dev)?;
        let x = clip_normalize(&x)?;
        let ln = Tensor::from_vec(d.latent_noise.clone(), (1, lc, lh, lw), &dev)?;
        let vp = &self.vae.place;
        let ph = crate::timing::phase(|| "describe vae encode".into());
        let z0 = self.vae.model.encode(&vp.input(&x)?)?;
        ph.done();
        let z0 = (z0
            .sample_with(&vp.input(&ln)?)?
            .to_dtype(candle_core::DType::F32)?
            * self.vae.scaling_factor)?;
        let e = Tensor::from_vec(d.noise.clone(), (1, lc, lh, lw), &dev)?;
        let (sa, sb) = (d.alpha_cumprod.sqrt(), (1.0 - d.alpha_cumprod).sqrt());
        let zt = ((&z0 * f64::from(sa))? + (&e * f64::from(sb))?)?;
        let target = match self.prediction {
            Prediction::Epsilon => e,
            Prediction::VPrediction => ((&e * f64::from(sa))? - (&z0 * f64::from(sb))?)?,
        };
        let dv = Var::from_vec(desc.to_vec(), (1, l, dim), &dev)?;
        let ph = crate::timing::phase(|| "describe unet forward".into());
        let pred = self.unet.eps(&zt, d.t as f64, dv.as_tensor(), None)?;
        let loss = (pred - target)?.sqr()?.mean_all()?;
        ph.done();
        let ph = crate::timing::phase(|| "describe backward".into());
        let grads = loss.backward()?;
        ph.done();
        let g = grads
            .get(dv.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the description".into()))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((loss.to_scalar::<f32>()?, g))
    }
}

/// `diffuse-synth describe`: checks, the SGD loop, the output file and its record line.
///
/// Long because the input checks name each file and field where it is read.
pub fn describe(a: DescribeArgs) -> Result<()> {
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr must be a positive number");
    }
    let place = crate::place::Placement::select(a.device, &a.dtype)?;
    let (ishape, images) = if a.images.is_dir() {
        crate::png::read_dir_rgb(&a.images)?
    } else {
        f32s(&a.images, "images", 4, "[N, 3, H, W]")?
    };
    let (n, ch, ih, iw) = (ishape[0], ishape[1], ishape[2], ishape[3]);
    if n == 0 || ch != 3 {
        bail!(
            "{}: `images` must be [N>0, 3, H, W], got {ishape:?}",
            a.images.display()
        );
    }
    if images.iter().any(|v| !v.is_finite()) {
        bail!("{}: `images` has non-finite values", a.images.display());
    }
    let (eshape, init) = f32s(&a.init, "prompt_embeds", 3, "[1, tokens, dim]")?;
    if eshape[0] != 1 {
        bail!(
            "{}: `prompt_embeds` must have batch 1, got {eshape:?}",
            a.init.display()
        );
    }
    let unet = model::load_unet_on(&a.model, &place)?;
    let vae = model::load_vae_on(&a.model, &place)?;
    if eshape[2] != unet.cross_attention_dim {
        bail!(
            "{}: `prompt_embeds` dim {} != the UNet's cross_attention_dim {}",
            a.init.display(),
            eshape[2],
            unet.cross_attention_dim
        );
    }
    if ih % vae.factor != 0 || iw % vae.factor != 0 {
        bail!(
            "{}: image size {ih}x{iw} is not a multiple of the VAE factor {}",
            a.images.display(),
            vae.factor
        );
    }
    let (_, raw, src) = model::read_scheduler_config(&a.model)?;
    // FedDEO trains with DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    let cfg = Config::from_json(Kind::Ddpm, &raw, &src)?;
    let sched = crate::scheduler::Scheduler::new(&cfg, 1, 0.0)?;
    let acp = sched.alphas_cumprod().to_vec();
    let steps = a.steps.unwrap_or(n);
    let (lc, lh, lw) = (unet.in_channels, ih / vae.factor, iw / vae.factor);
    let per = lc * lh * lw;
    let fixed = match &a.train_noise {
        Some(p) => Some(fixed_draws(p, steps, (lc, lh, lw), acp.len())?),
        None => None,
    };
    let mut desc = init;
    let mut losses = Vec::with_capacity(steps);
    let bar = ftk::cli::progress(steps as u64, "describing");
    for k in 0..steps {
        let idx = k % n;
        let img = &images[idx * 3 * ih * iw..(idx + 1) * 3 * ih * iw];
        let (t, lnoise, eps) = match &fixed {
            Some((ts, ln, nz)) => (
                ts[k] as usize,
                ln[k * per..(k + 1) * per].to_vec(),
                nz[k * per..(k + 1) * per].to_vec(),
            ),
            None => {
                let mut r = ftk::rng::stream(a.seed, 3 * k as u64);
                let t = r.random_range(0..acp.len());
                (
                    t,
                    normals(a.seed, 3 * k as u64 + 1, per),
                    normals(a.seed, 3 * k as u64 + 2, per),
                )
            }
        };
        let what = format!("describe step {k}");
        let model = Models {
            unet: &unet,
            vae: &vae,
            prediction: cfg.prediction_type,
        };
        let draw = Draw {
            t,
            alpha_cumprod: acp[t],
            latent_noise: lnoise,
            noise: eps,
        };
        let (loss, g) = model
            .loss_and_grad(img, (ih, iw), &draw, &desc, (eshape[1], eshape[2]))
            .map_err(ce(what.clone()))?;
        if !loss.is_finite() || g.iter().any(|v| !v.is_finite()) {
            return Err(Error::input(format!(
                "{what}: loss or gradient is not finite (lower --lr?)"
            )));
        }
        let lr = a.lr as f32;
        desc.iter_mut().zip(&g).for_each(|(d, g)| *d -= lr * g);
        losses.push(loss);
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_safetensors(
        &a.output,
        &[OutTensor::f32("prompt_embeds", eshape.clone(), &desc)],
        None,
    )?;
    let mut out = Stdout::new();
    ftk::jsonl::write_record(
        &mut out,
        &DiffuseSynthDescription {
            images: n as u64,
            kind: Tag::default(),
            loss_first: losses.first().copied(),
            loss_last: losses.last().copied(),
            path: a.output.display().to_string(),
            steps: steps as u64,
        },
    )?;
    out.flush()
}
