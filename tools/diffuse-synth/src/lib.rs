//! diffuse-synth: diffusers-compatible Stable Diffusion sampling for the server
//! side of one-shot federated learning (FedCADO, FedDEO, FedDISC).
//!
//! - [`scheduler`]: DDPM, DDIM, PNDM, Euler, Euler-ancestral and DPM++ 2M as
//!   diffusers 0.42 computes them (pure Rust, checked against diffusers).
//! - [`model`]: a diffusers folder (unet/, vae/, scheduler/) loaded onto candle; the UNet
//!   and VAE themselves are [`vendored`] candle-transformers code (with its change list).
//! - [`cpu_kernels`]: the CPU kernels every layer runs on (conv, linear, norms, attention,
//!   GEGLU, the classifiers' BN / ReLU / max-pool), with input-only gradients for guidance.
//! - [`png`]: a dependency-free PNG writer for `--png-dir`.
//! - [`place`]: `--device` / `--dtype`: the same modules on candle's CUDA backend (cargo
//!   feature `cuda`), weights in f32, bf16 or f16.
//!
//! - [`classifier`], [`guidance`]: FedCADO classifier + BN-statistics guidance
//!   and noise editing (gradients checked against PyTorch); [`tvresnet`]: torchvision
//!   ResNet-18/34/50 client classifiers (checked against torchvision).
//! - [`describe`]: FedDEO description learning (`diffuse-synth describe`).
//! - [`unclip`]: FedDISC conditioning: Stable-unCLIP image embeddings with noise
//!   augmentation as the UNet's class labels, and FedDISC's three-branch guidance.
//! - [`text`]: `--prompt` through the folder's CLIP tokenizer and text encoder.
//!
//! Not implemented yet: CLIP image encoding (image embeddings come from files,
//! e.g. fed-embed's).
//!
//! A sampling run is [`plan`] (flags -> checked plan, then the models), [`conditions`]
//! (context rows), [`denoise`] (the loop) and [`output`] (decode and write); the flags
//! themselves are in [`cli`].

pub mod classifier;
pub mod cli;
pub mod conditions;
pub mod cpu_kernels;
pub mod denoise;
pub mod describe;
pub mod guidance;
pub mod model;
pub mod output;
pub mod place;
pub mod plan;
pub mod png;
pub mod scheduler;
pub mod text;
pub mod timing;
pub mod tvresnet;
pub mod unclip;
pub mod vendored;
pub mod weights;

pub use cli::{Args, Command};
pub use plan::{parse_shard, shard_range};
pub use vendored::sd;

use ftk::Result;
use rand::RngExt;
use rand_distr::StandardNormal;

/// The seed of sample `index` under `seed` (53 bits, so JSON readers keep it exact).
pub fn sample_seed(seed: u64, index: usize) -> u64 {
    ftk::rng::stream_id(&[seed, index as u64]) >> 11
}

pub(crate) fn normals(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let mut r = ftk::rng::stream(seed, stream);
    (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect()
}

/// `diffuse-synth`: `describe`, or a sampling run: plan, models, conditions, the
/// denoising loop, outputs.
pub fn run(a: Args) -> Result<()> {
    if let Some(Command::Describe(d)) = a.command {
        return describe::describe(d);
    }
    if a.quiet {
        ftk::cli::set_quiet();
    }
    let plan = plan::Plan::new(&a)?;
    let place = place::Placement::select(a.device, &a.dtype)?;
    // Every output is checked before the work; -o is committed last, after
    // the PNGs, so a failure leaves no -o behind.
    let out_file = ftk::output::Output::create(&plan.output)?;
    if let Some(dir) = &a.png_dir {
        ftk::output::probe_dir(dir)?;
    }
    let models = plan::Models::load(&a, &plan, &place)?;
    let (c, h, w) = models.latent;
    // Latents, decoded images and the UNet's widest activation (about 320
    // channels at latent size), f32, for each row of this shard.
    ftk::size::check_memory(
        &format!(
            "{} samples of {h}x{w} latents (--height/--width)",
            plan.rows()
        ),
        ftk::size::product(&[plan.rows() as u64, h as u64, w as u64, 4])
            .and_then(|b| b.checked_mul(c as u64 + 3 * 64 + 320)),
    )?;
    let ctx_parts = conditions::context_parts(&a, &plan, &models)?;
    let lat = denoise::denoise(&a, &plan, &models, ctx_parts)?;
    // the UNet (and classifier) freed before the decode: its peak then stays below the steps'
    let plan::Models {
        vae,
        latent,
        unet,
        unclip,
        classifier,
    } = models;
    drop((unet, unclip, classifier));
    output::write(&a, &plan, &vae, latent, &lat, out_file)
}
