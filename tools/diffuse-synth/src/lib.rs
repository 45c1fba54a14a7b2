//! diffuse-synth: diffusers-compatible Stable Diffusion sampling for the server
//! side of one-shot federated learning (FedCADO, FedDEO, FedDISC).
//!
//! - [`scheduler`]: DDPM, DDIM, PNDM, Euler, Euler-ancestral and DPM++ 2M as
//!   diffusers 0.42 computes them (pure Rust, checked against diffusers).
//! - [`model`]: a diffusers folder (unet/, vae/, scheduler/) loaded onto candle.
//! - [`png`]: a dependency-free PNG writer for `--png-dir`.
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

pub mod classifier;
pub mod describe;
pub mod fast;
pub mod guidance;
pub mod model;
pub mod png;
pub mod scheduler;
pub mod sd;
pub mod text;
pub mod tvresnet;
pub mod unclip;

use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use ftk::cli::Stdout;
use ftk::tensors::{write_safetensors_on, OutTensor, TensorFile};
use ftk::{bail, Error, Result};
use model::ce;
use rand::RngExt;
use rand_distr::StandardNormal;
use scheduler::{Kind, Scheduler};
use serde_json::json;
use std::path::{Path, PathBuf};

const AFTER_HELP: &str = "\
Reads a diffusers folder: unet/ and vae/ (config.json + diffusion_pytorch_model.safetensors)
and scheduler/scheduler_config.json. SD 1.x/2.x shapes (any sizes the configs describe,
linear projection, v-prediction).

Scheduler: the folder's class unless --scheduler names another; the config is read as
`<Class>.from_pretrained(model, subfolder=\"scheduler\")` (keys the class takes come from the
file, the rest are that class's defaults), the override flags are applied, then what
StableDiffusionPipeline's constructor does (steps_offset=1, clip_sample=false).

Conditioning: --prompt-embeds E.safetensors holds `prompt_embeds` [B or 1, L, D] and, for
guidance, `negative_prompt_embeds` (same shape). One file with --guidance-scale G > 1 is
classifier-free guidance exactly as diffusers: e = e_u + G (e_c - e_u). Several files give
several weighted conditions, e = e_u + sum_i w_i (e_i - e_u), with --guidance-scale w1,w2,...
(the unconditional embedding is the first file's negative_prompt_embeds).
--prompt TEXT (once, or once per sample) needs tokenizer/ and text_encoder/ in the folder and
encodes as diffusers' encode_prompt: transformers' CLIPTokenizer padded/truncated to
model_max_length, CLIPTextModel's last hidden state (--clip-skip k: layer n-k's, through the
final layer norm). It is the first condition (--prompt-embeds files follow) and its
--negative-prompt (default \"\", once or once per --prompt) is the unconditional embedding.

Initial noise: --latents L.safetensors (`latents` [B,4,h,w], scaled by the scheduler's init
sigma as diffusers does) or --seed S --batch B: sample j's seed is derived from (S, j) and
draws its initial latents and every scheduler noise from its own stream, so `--shard i/n`
array jobs produce exactly the rows of one unsharded run.

Output (-o): safetensors with `latents` (final latents, before decoding) and `images`
([B,3,H,W] in [0,1]); --png-dir writes index-numbered PNGs. One JSON line per sample on
stdout: {\"kind\":\"sample\",\"index\",\"seed\",\"class\",\"client\",\"path\"}.

FedCADO (--classifier C.safetensors --classifier-arch resnet18|resnet34|resnet50|json:FILE --class K):
torchvision ResNets are read from their state_dict names (conv1, bn1, layer1.0.conv1, ...,
downsample, fc; a prefix such as module.encoder. and a separate Linear head when fc is absent are
found), widths from the shapes; json:FILE (or a .json path) is a small layer list. At every step but
the last, z <- z - classifier-scale * grad_z [CE(f(x), K) + bn-weight * L_BN], where x is the
predicted x0 decoded by the VAE, clamped to [0,1], resized bicubically to --classifier-size and
CLIP-normalised, and L_BN sums ||running_var - var||_2 + ||running_mean - mean||_2 over the BN
layers' inputs; then the ordinary step at the edited z. --noise-edit-steps N first applies N such
updates with the BN term only at the first timestep (the authors' defaults: scale 1, 0.1, 10).

FedDISC (a Stable-unCLIP folder: UNet class_embed_type \"projection\", image_normalizer/,
image_noising_scheduler/): --image-embeds E.safetensors holds [rows, E] image embeddings or
FedDISC uploads [rows, 2E] (tensor --image-embeds-key, default image_embeds, else centroids, else
features; with --class, rows whose `labels` differ are dropped). Each sample's class label is
the embedding normalised, noised to --noise-level (DDPM add_noise, noise drawn from the sample's
seed or --image-embeds-noise FILE `noise` [samples, E]), unnormalised, then [x, emb(level)] for
a raw embedding (diffusers' StableUnCLIPImg2ImgPipeline) or [x, (emb(level) + old)/2] for an
upload (FedDISC's re-noising); rows are used for samples/rows consecutive samples. Guidance
labels the unconditional branch with zeros; each --global-embeds FILE (a client's uploads, their
mean used as given) adds FedDISC's third branch, sample j using file j mod n:
e = e_u + s (e_img - e_u) + s (e_glo - e_u). Defaults in this mode are FedDISC's: --steps 20,
--guidance-scale 2, --noise-level 200; the folder's scheduler config is used as the unCLIP
pipeline does (without StableDiffusionPipeline's steps_offset/clip_sample rewrite).

FedDEO: `diffuse-synth describe --model DIR --images X.safetensors --init E.safetensors -o D.safetensors`
learns a description [1,L,D] (SGD on the denoising loss, one image per step); pass it as a
second --prompt-embeds to generate with it (u + 3(text - u) + 3(description - u)).

Examples:
  diffuse-synth --model tiny-sd --prompt-embeds emb.safetensors --seed 7 --batch 8 \\
      --steps 20 --guidance-scale 3 -o out.safetensors --png-dir pngs > manifest.jsonl
  diffuse-synth --model sd15 --prompt \"a photo of a dog\" --negative-prompt blurry --seed 1 \\
      --batch 4 --steps 25 --guidance-scale 7.5 -o dogs.safetensors --png-dir dogs
  diffuse-synth --model tiny-sd --scheduler dpmpp-2m --karras --steps 10 \\
      --prompt-embeds emb.safetensors --seed 7 --batch 64 --shard 3/8 -o part3.safetensors
  diffuse-synth --model tiny-sd --prompt-embeds cls.safetensors --prompt-embeds desc.safetensors \\
      --guidance-scale 3,3 --seed 1 --batch 4 -o feddeo.safetensors
  diffuse-synth --model sd-folder --prompt-embeds cls.safetensors --classifier client.safetensors \\
      --classifier-arch resnet18 --class 4 --seed 1 --batch 8 -o fedcado.safetensors
  diffuse-synth --model sd21-unclip --prompt-embeds cls3.safetensors --image-embeds upload0.safetensors \\
      --class 3 --global-embeds upload0.safetensors --global-embeds upload1.safetensors \\
      --seed 1 --batch 50 -o feddisc.safetensors";

/// Stable Diffusion sampling with diffusers' schedulers, from diffusers weights.
#[derive(Parser, Debug)]
#[command(
    name = "diffuse-synth",
    version,
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// diffusers model folder (unet/, vae/, scheduler/)
    #[arg(long, value_name = "DIR", required = true)]
    pub model: Option<PathBuf>,
    /// ddpm | ddim | pndm | euler | euler-ancestral | dpmpp-2m (default: the folder's)
    #[arg(long)]
    pub scheduler: Option<String>,
    /// number of inference steps [default: 50; 20 with --image-embeds (FedDISC)]
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM's eta (0 = deterministic)
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// override: linear | scaled_linear | squaredcos_cap_v2
    #[arg(long)]
    pub beta_schedule: Option<String>,
    /// override: leading | trailing | linspace
    #[arg(long)]
    pub timestep_spacing: Option<String>,
    /// override: epsilon | v_prediction
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Karras sigmas (euler, dpmpp-2m)
    #[arg(long)]
    pub karras: bool,
    /// guidance scale(s), one per condition (one value applies to all)
    /// [default: 7.5; 2 with --image-embeds (FedDISC)]
    #[arg(long, value_delimiter = ',')]
    pub guidance_scale: Option<Vec<f64>>,
    /// safetensors with `prompt_embeds` (and `negative_prompt_embeds`); repeatable
    #[arg(long, value_name = "FILE", required_unless_present = "prompt")]
    pub prompt_embeds: Vec<PathBuf>,
    /// text prompt, encoded by the folder's tokenizer/ + text_encoder/: once for every
    /// sample, or once per sample (the first condition; --prompt-embeds files follow it)
    #[arg(long, value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// negative prompt for guidance (default ""): once, or once per --prompt
    #[arg(long, value_name = "TEXT", requires = "prompt")]
    pub negative_prompt: Vec<String>,
    /// with --prompt: embed with the layer this many before the last (diffusers' clip_skip;
    /// as there, the negative prompt keeps the last layer)
    #[arg(long, default_value_t = 0, requires = "prompt")]
    pub clip_skip: usize,
    /// initial latents (`latents` [B,C,h,w]) instead of --seed/--batch
    #[arg(long, value_name = "FILE", conflicts_with_all = ["seed", "batch"])]
    pub latents: Option<PathBuf>,
    /// seed for the initial noise and scheduler noise
    #[arg(long)]
    pub seed: Option<u64>,
    /// number of samples (with --seed)
    #[arg(long)]
    pub batch: Option<usize>,
    /// image height in pixels (default: the UNet's sample_size x the VAE's factor)
    #[arg(long)]
    pub height: Option<usize>,
    /// image width in pixels
    #[arg(long)]
    pub width: Option<usize>,
    /// this job's slice: i/n (0-based i) of the samples
    #[arg(long, value_name = "i/n")]
    pub shard: Option<String>,
    /// scheduler noise from a file (`noise` [K,B,C,h,w]: the k-th draw uses noise[k]),
    /// to reproduce a run of diffusers' pipeline with the same draws
    #[arg(long, value_name = "FILE")]
    pub step_noise: Option<PathBuf>,
    /// output safetensors (`latents`, `images`)
    #[arg(short = 'o', long, value_name = "FILE", required = true)]
    pub output: Option<PathBuf>,
    /// also write PNGs here (<index>.png)
    #[arg(long, value_name = "DIR")]
    pub png_dir: Option<PathBuf>,
    /// no progress bar on stderr (shown only when stderr is a terminal)
    #[arg(long)]
    pub quiet: bool,
    /// class label recorded in the manifest
    #[arg(long)]
    pub class: Option<i64>,
    /// client id recorded in the manifest
    #[arg(long)]
    pub client: Option<String>,
    /// FedCADO: client classifier weights (safetensors, PyTorch state_dict names)
    #[arg(long, value_name = "FILE", requires_all = ["classifier_arch", "class"])]
    pub classifier: Option<PathBuf>,
    /// FedCADO: classifier architecture: resnet18 | resnet34 | resnet50 (torchvision
    /// state_dict names) | json:FILE (a JSON layer list; a plain .json path works too)
    #[arg(long, value_name = "ARCH", requires = "classifier")]
    pub classifier_arch: Option<String>,
    /// FedCADO: step size of the gradient update on the latents
    #[arg(long, default_value_t = 1.0)]
    pub classifier_scale: f64,
    /// FedCADO: weight of the BN-statistics loss
    #[arg(long, default_value_t = 0.1)]
    pub bn_weight: f64,
    /// FedCADO: noise-editing iterations before sampling
    #[arg(long, default_value_t = 10)]
    pub noise_edit_steps: usize,
    /// What a sample ends as: `sample` runs every timestep (diffusers' pipelines);
    /// `x0` stops before the last timestep and keeps the last step's predicted x0
    /// (FedCADO's and FedDEO's generate_images.py). Default: x0 with --classifier
    /// (FedCADO), else sample.
    #[arg(long = "final", value_name = "WHAT", value_parser = ["sample", "x0"])]
    pub final_mode: Option<String>,
    /// FedCADO: classifier input size in pixels
    #[arg(long, default_value_t = 224)]
    pub classifier_size: usize,
    /// FedDISC / Stable unCLIP: image embeddings [rows, E] or uploads [rows, 2E] (the UNet's
    /// class labels; needs a UNet with class_embed_type "projection")
    #[arg(long, value_name = "FILE")]
    pub image_embeds: Option<PathBuf>,
    /// tensor to read from --image-embeds and --global-embeds
    /// [default: image_embeds, else centroids, else features, else the only tensor]
    #[arg(long, value_name = "NAME", requires = "image_embeds")]
    pub image_embeds_key: Option<String>,
    /// FedDISC: a client's uploads; their mean is a third guidance branch (repeatable:
    /// sample j uses file j mod n)
    #[arg(long, value_name = "FILE", requires = "image_embeds")]
    pub global_embeds: Vec<PathBuf>,
    /// noise level of the image-embedding augmentation (FedDISC: 200; diffusers' default: 0)
    #[arg(long, default_value_t = 200, requires = "image_embeds")]
    pub noise_level: usize,
    /// the augmentation noise from a file (`noise` [samples, E]) instead of the seed
    #[arg(long, value_name = "FILE", requires = "image_embeds")]
    pub image_embeds_noise: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// FedDEO: learn a description embedding on a client's images (denoising loss, SGD)
    Describe(describe::DescribeArgs),
}

/// Samples denoised together in one UNet call (times their condition rows).
const UNET_SAMPLES: usize = 8;

/// One dense f32 tensor read from a safetensors file.
struct Dense {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn read_tensor(path: &Path, name: &str, rank: usize, what: &str) -> Result<Dense> {
    let f = TensorFile::open(path)?;
    let t = f.require(name)?;
    t.expect_rank(rank, what)?;
    let data = t.to_f32_vec()?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: element {i} is {}; every value must be finite",
            t.here(),
            data[i]
        );
    }
    Ok(Dense {
        shape: t.shape.to_vec(),
        data,
    })
}

fn read_optional(path: &Path, name: &str, rank: usize, what: &str) -> Result<Option<Dense>> {
    let f = TensorFile::open(path)?;
    if f.get(name).is_none() {
        return Ok(None);
    }
    read_tensor(path, name, rank, what).map(Some)
}

/// Parse `i/n`.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::input(format!("--shard {s:?}: expected i/n with 0 <= i < n"));
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let i: usize = i.trim().parse().map_err(|_| bad())?;
    let n: usize = n.trim().parse().map_err(|_| bad())?;
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Rows [start, end) of `total` for shard i of n (contiguous, sizes differ by at most 1).
pub fn shard_range(total: usize, i: usize, n: usize) -> (usize, usize) {
    (total * i / n, total * (i + 1) / n)
}

/// The seed of sample `index` under `seed` (53 bits, so JSON readers keep it exact).
pub fn sample_seed(seed: u64, index: usize) -> u64 {
    ftk::rng::stream_id(&[seed, index as u64]) >> 11
}

pub(crate) fn normals(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let mut r = ftk::rng::stream(seed, stream);
    (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect()
}

/// Embeddings for the shard's rows: [rows, L, D] from [1 or B, L, D].
fn embed_rows(
    d: &Dense,
    total: usize,
    start: usize,
    end: usize,
    src: &Path,
    name: &str,
) -> Result<Tensor> {
    let (b, l, dim) = (d.shape[0], d.shape[1], d.shape[2]);
    let per = l * dim;
    let mut v = Vec::with_capacity((end - start) * per);
    for r in start..end {
        let row = if b == 1 {
            0
        } else if b == total {
            r
        } else {
            bail!(
                "{}: `{name}` has batch {b}, expected 1 or the sample count {total}",
                src.display()
            );
        };
        v.extend_from_slice(&d.data[row * per..(row + 1) * per]);
    }
    Tensor::from_vec(v, (end - start, l, dim), &Device::Cpu).map_err(ce(src.display()))
}

pub fn run(a: Args) -> Result<()> {
    if let Some(Command::Describe(d)) = a.command {
        return describe::describe(d);
    }
    let (Some(model_dir), Some(output)) = (a.model.clone(), a.output.clone()) else {
        bail!("--model and -o are required");
    };
    if a.quiet {
        ftk::cli::set_quiet();
    }
    // Every output is checked before the work; -o is committed last, after
    // the PNGs, so a failure leaves no -o behind.
    let out_file = ftk::output::Output::create(&output)?;
    if let Some(dir) = &a.png_dir {
        ftk::output::probe_dir(dir)?;
    }
    // ---- scheduler
    let (file_kind, raw, src) = model::read_scheduler_config(&model_dir)?;
    let kind = match &a.scheduler {
        Some(s) => Kind::parse(s).ok_or_else(|| {
            Error::input(format!(
                "--scheduler {s:?} is not one of ddpm, ddim, pndm, euler, euler-ancestral, dpmpp-2m"
            ))
        })?,
        None => file_kind.ok_or_else(|| {
            Error::input(format!(
                "{src}: `_class_name` is not a scheduler diffuse-synth implements; pass --scheduler"
            ))
        })?,
    };
    let mut cfg = model::scheduler_config(kind, &raw, &src)?;
    let mut over = |key: &str, v: serde_json::Value, flag: &str| -> Result<()> {
        if !kind.accepts(key) {
            bail!("{flag}: {} has no `{key}` in diffusers", kind.name());
        }
        cfg.set(key, &v)
            .map_err(|m| Error::input(format!("{flag}: {m}")))
    };
    if let Some(s) = &a.beta_schedule {
        over("beta_schedule", json!(s), "--beta-schedule")?;
    }
    if let Some(s) = &a.timestep_spacing {
        over("timestep_spacing", json!(s), "--timestep-spacing")?;
    }
    if let Some(s) = &a.prediction_type {
        over("prediction_type", json!(s), "--prediction-type")?;
    }
    if a.karras {
        over("use_karras_sigmas", json!(true), "--karras")?;
    }
    let unclip_mode = a.image_embeds.is_some();
    // StableDiffusionPipeline's constructor rewrites the scheduler config;
    // StableUnCLIPImg2ImgPipeline's (and FedDISC's generator) does not.
    if !unclip_mode {
        cfg.apply_pipeline_fixes();
    }
    let steps = a.steps.unwrap_or(if unclip_mode { 20 } else { 50 });
    if a.eta.is_nan() || a.eta < 0.0 {
        bail!("--eta must be >= 0");
    }
    let sched = Scheduler::new(&cfg, steps, a.eta)?;

    // ---- conditions: the --prompt text (if any), then the --prompt-embeds files;
    // with --image-embeds, one text condition serves the image branch and
    // FedDISC's global branch
    let n_text = usize::from(!a.prompt.is_empty());
    if unclip_mode && n_text + a.prompt_embeds.len() != 1 {
        bail!("--image-embeds takes one text condition (--prompt, or one --prompt-embeds file) for every branch");
    }
    let k = if unclip_mode {
        1 + usize::from(!a.global_embeds.is_empty())
    } else {
        n_text + a.prompt_embeds.len()
    };
    let scales = a
        .guidance_scale
        .clone()
        .unwrap_or_else(|| vec![if unclip_mode { 2.0 } else { 7.5 }]);
    let weights: Vec<f64> = match scales.len() {
        1 => vec![scales[0]; k],
        n if n == k => scales,
        n => {
            bail!("--guidance-scale has {n} values for {k} conditions (--prompt, --prompt-embeds)")
        }
    };
    if weights.iter().any(|w| !w.is_finite()) {
        bail!("--guidance-scale must be finite");
    }
    // diffusers: guidance only when the scale is > 1 (one condition)
    let guided = k > 1 || weights[0] > 1.0;
    let mut conds = Vec::with_capacity(k);
    for p in &a.prompt_embeds {
        conds.push(read_tensor(p, "prompt_embeds", 3, "[batch, tokens, dim]")?);
    }
    let neg = if guided && n_text == 0 {
        let p = &a.prompt_embeds[0];
        Some(
            read_optional(p, "negative_prompt_embeds", 3, "[batch, tokens, dim]")?.ok_or_else(
                || {
                    Error::input(format!(
                        "{}: no `negative_prompt_embeds`: guidance needs the unconditional \
                         embedding (or use --guidance-scale 1)",
                        p.display()
                    ))
                },
            )?,
        )
    } else {
        None
    };

    // ---- samples and shard
    let (total, given) = match (&a.latents, a.seed, a.batch) {
        (Some(p), _, _) => {
            let d = read_tensor(p, "latents", 4, "[batch, channels, height, width]")?;
            (d.shape[0], Some(d))
        }
        (None, Some(_), Some(b)) => (b, None),
        _ => bail!("give --latents FILE, or --seed S with --batch B"),
    };
    if total == 0 {
        bail!("no samples: the batch is empty");
    }
    let (si, sn) = match &a.shard {
        Some(s) => parse_shard(s)?,
        None => (0, 1),
    };
    let (start, end) = shard_range(total, si, sn);

    // ---- models
    let unet = model::load_unet(&model_dir)?;
    let vae = model::load_vae(&model_dir)?;
    let unclip = match (&a.image_embeds, unet.class_dim) {
        (Some(p), Some(cd)) => Some(unclip::Conditioning::new(
            &model_dir,
            cd,
            &unclip::Flags {
                image_embeds: p,
                key: a.image_embeds_key.as_deref(),
                global_embeds: &a.global_embeds,
                noise_level: a.noise_level,
                noise_file: a.image_embeds_noise.as_deref(),
                class: a.class,
            },
            total,
        )?),
        (None, None) => None,
        (Some(_), None) => bail!(
            "--image-embeds: the UNet in {} has no class embedding (class_embed_type \"projection\", \
             as Stable unCLIP)",
            model_dir.display()
        ),
        (None, Some(_)) => bail!(
            "{}: the UNet is a Stable-unCLIP one (class_embed_type \"projection\"): give --image-embeds",
            model_dir.display()
        ),
    };
    let clf = match (&a.classifier, &a.classifier_arch) {
        (Some(wf), Some(arch)) => {
            let c = classifier::Classifier::from_arch(arch, wf)?;
            let k = a.class.unwrap_or(-1);
            if k < 0 || k as usize >= c.num_classes {
                bail!(
                    "--class {k} is not a class of the classifier {} ({} classes)",
                    wf.display(),
                    c.num_classes
                );
            }
            if a.classifier_size == 0 {
                bail!("--classifier-size must be positive");
            }
            Some(c)
        }
        _ => None,
    };
    let (c, h, w) = match &given {
        Some(d) => (d.shape[1], d.shape[2], d.shape[3]),
        None => {
            let f = vae.factor;
            let hh = a.height.unwrap_or(unet.sample_size * f);
            let ww = a.width.unwrap_or(unet.sample_size * f);
            if !hh.is_multiple_of(f) || !ww.is_multiple_of(f) || hh == 0 || ww == 0 {
                bail!("--height/--width must be positive multiples of the VAE factor {f}");
            }
            (unet.in_channels, hh / f, ww / f)
        }
    };
    // Latents, decoded images and the UNet's widest activation (about
    // 320 channels at latent size), f32, for each row of this shard.
    ftk::size::check_memory(
        &format!(
            "{} samples of {h}x{w} latents (--height/--width)",
            end - start
        ),
        ftk::size::product(&[(end - start) as u64, h as u64, w as u64, 4])
            .and_then(|b| b.checked_mul(c as u64 + 3 * (vae.factor * vae.factor) as u64 + 320)),
    )?;
    if c != unet.in_channels {
        bail!(
            "{}: latents have {c} channels but the UNet takes {}",
            a.latents
                .as_deref()
                .unwrap_or(Path::new("latents"))
                .display(),
            unet.in_channels
        );
    }
    for (d, p) in conds.iter().zip(&a.prompt_embeds) {
        if d.shape[2] != unet.cross_attention_dim {
            bail!(
                "{}: `prompt_embeds` dim {} != the UNet's cross_attention_dim {}",
                p.display(),
                d.shape[2],
                unet.cross_attention_dim
            );
        }
        if d.shape[1] != conds[0].shape[1] {
            bail!(
                "{}: token count differs from the first --prompt-embeds",
                p.display()
            );
        }
    }
    if let Some(n) = &neg {
        if n.shape[1..] != conds[0].shape[1..] {
            bail!(
                "{}: `negative_prompt_embeds` shape {:?} != `prompt_embeds` {:?}",
                a.prompt_embeds[0].display(),
                n.shape,
                conds[0].shape
            );
        }
    }
    let rows = end - start;
    let per = c * h * w;
    let dev = Device::Cpu;

    // context: [neg; cond_1; ...; cond_k] each [rows, L, D]
    let mut ctx_parts = vec![];
    let text_parts = match n_text {
        0 => None,
        _ => Some(text::prompt_rows(
            &model_dir,
            &a.prompt,
            &a.negative_prompt,
            a.clip_skip,
            guided,
            (total, start, end),
            unet.cross_attention_dim,
            conds.first().map(|d| d.shape[1]),
        )?),
    };
    if let Some((cond, neg)) = text_parts {
        ctx_parts.extend(neg);
        ctx_parts.push(cond);
    }
    if let Some(n) = &neg {
        ctx_parts.push(embed_rows(
            n,
            total,
            start,
            end,
            &a.prompt_embeds[0],
            "negative_prompt_embeds",
        )?);
    }
    for (d, p) in conds.iter().zip(&a.prompt_embeds) {
        ctx_parts.push(embed_rows(d, total, start, end, p, "prompt_embeds")?);
    }
    if unclip.as_ref().is_some_and(|u| u.conditions() == 2) {
        // FedDISC's global branch has the same text as the image branch
        ctx_parts.push(ctx_parts[ctx_parts.len() - 1].clone());
    }
    let copies = ctx_parts.len();

    // initial latents
    let seeds: Vec<Option<u64>> = (start..end)
        .map(|j| a.seed.map(|s| sample_seed(s, j)))
        .collect();

    // scheduler noise from a file
    let step_noise = match &a.step_noise {
        Some(p) => {
            let d = read_tensor(p, "noise", 5, "[draws, batch, channels, height, width]")?;
            if d.shape[1] != total || d.shape[2..] != [c, h, w] {
                bail!(
                    "{}: `noise` shape {:?} does not match [draws, {total}, {c}, {h}, {w}]",
                    p.display(),
                    d.shape
                );
            }
            Some(d)
        }
        None => None,
    };

    // Up to UNET_SAMPLES samples per UNet call, each sample's unconditional and
    // conditional rows side by side (sample-major), as diffusers batches them. Every kernel
    // computes a row independently of the others in its batch, so `--shard i/n` still
    // reproduces the rows of one run bit for bit (tests/pipeline.rs checks it).
    let final_x0 = match a.final_mode.as_deref() {
        Some(m) => m == "x0",
        None => clf.is_some(),
    };
    let run_steps = sched.timesteps().len() - usize::from(final_x0);
    if run_steps == 0 {
        bail!("--final x0 stops before the last timestep: it needs --steps 2 or more");
    }
    let bar = ftk::cli::progress((rows * run_steps) as u64, "denoising");
    let mut lat_all: Vec<f32> = Vec::with_capacity(rows * per);
    let ts: Vec<f64> = sched.timesteps().to_vec();
    let fedcado = clf.as_ref().map(|cl| guidance::FedCado {
        classifier: cl,
        class: a.class.unwrap_or(0) as usize,
        size: a.classifier_size,
        bn_weight: a.bn_weight,
    });
    let zshape = (1, c, h, w);
    for c0 in (0..rows).step_by(UNET_SAMPLES) {
        let chunk: Vec<usize> = (c0..rows.min(c0 + UNET_SAMPLES)).collect();
        let n = chunk.len();
        // one sample's context rows [copies, L, D], and the chunk's [n * copies, L, D]
        let ctx_of = |r: usize| -> Result<Tensor> {
            let parts: Vec<Tensor> = ctx_parts
                .iter()
                .map(|p| p.narrow(0, r, 1))
                .collect::<candle_core::Result<_>>()
                .map_err(ce("prompt embeddings"))?;
            Tensor::cat(&parts, 0).map_err(ce("prompt embeddings"))
        };
        let ctxs: Vec<Tensor> = chunk.iter().map(|&r| ctx_of(r)).collect::<Result<_>>()?;
        let ctx = Tensor::cat(&ctxs, 0).map_err(ce("prompt embeddings"))?;
        // unCLIP: each sample's noised image embeddings, one row per context row
        let labels: Vec<Option<Tensor>> = chunk
            .iter()
            .map(|&r| {
                let g = start + r;
                unclip
                    .as_ref()
                    .map(|u| u.labels(g, sample_seed(a.seed.unwrap_or(0), g), guided))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let chunk_labels = match unclip {
            Some(_) => {
                let ls: Vec<Tensor> = labels.iter().flatten().cloned().collect();
                Some(Tensor::cat(&ls, 0).map_err(ce("image embeddings"))?)
            }
            None => None,
        };
        // FedCADO differentiates one sample at a time through this denoiser
        let dens: Vec<guidance::Denoiser> = (0..if fedcado.is_some() { n } else { 0 })
            .map(|j| guidance::Denoiser {
                unet: &unet,
                ctx: ctxs[j].clone(),
                class_labels: labels[j].clone(),
                weights: weights.clone(),
                guided,
            })
            .collect();
        let mut scheds = Vec::with_capacity(n);
        let mut lats = Vec::with_capacity(n);
        for (j, &r) in chunk.iter().enumerate() {
            let g = start + r; // global sample index
            let mut sch = Scheduler::new(&cfg, steps, a.eta)?;
            let init: Vec<f32> = match &given {
                Some(d) => d.data[g * per..(g + 1) * per].to_vec(),
                None => normals(seeds[r].unwrap_or(0), 0, per),
            };
            let ins = sch.init_noise_sigma();
            let mut lat: Vec<f32> = init.iter().map(|x| x * ins).collect();
            if let Some(fc) = &fedcado {
                // noise editing: BN term only, at the first timestep
                for _ in 0..a.noise_edit_steps {
                    let (_, gr) = guidance::loss_and_grad(
                        &dens[j], &vae, fc, &mut sch, 0, ts[0], &lat, zshape, false,
                    )?;
                    lat.iter_mut().zip(&gr).for_each(|(z, g)| *z -= g);
                }
            }
            scheds.push(sch);
            lats.push(lat);
        }
        let mut draws = vec![0usize; n];
        let mut x0s: Vec<Vec<f32>> = vec![Vec::new(); n];
        for (i, &t) in ts.iter().enumerate().take(run_steps) {
            if let Some(fc) = &fedcado {
                if i + 1 < ts.len() {
                    for j in 0..n {
                        let (_, gr) = guidance::loss_and_grad(
                            &dens[j],
                            &vae,
                            fc,
                            &mut scheds[j],
                            i,
                            t,
                            &lats[j],
                            zshape,
                            true,
                        )?;
                        let sc = a.classifier_scale as f32;
                        lats[j].iter_mut().zip(&gr).for_each(|(z, g)| *z -= sc * g);
                    }
                }
            }
            let mut x = Vec::with_capacity(n * copies * per);
            for j in 0..n {
                let xj = scheds[j].scale_model_input(i, &lats[j])?;
                for _ in 0..copies {
                    x.extend_from_slice(&xj);
                }
            }
            let inp = Tensor::from_vec(x, (n * copies, c, h, w), &dev).map_err(ce("latents"))?;
            let eps_all = unet
                .model
                .forward_with_class(&inp, t, &ctx, chunk_labels.as_ref())
                .and_then(|e| e.flatten_all())
                .and_then(|e| e.to_vec1::<f32>())
                .map_err(ce(format!("UNet at step {i}")))?;
            for (j, &r) in chunk.iter().enumerate() {
                let g = start + r;
                let rows_j = &eps_all[j * copies * per..(j + 1) * copies * per];
                let eps: Vec<f32> = if guided {
                    // diffusers: e_u + w (e_c - e_u), one term per condition
                    let u = &rows_j[..per];
                    let mut acc = u.to_vec();
                    for (ci, &wgt) in weights.iter().enumerate() {
                        let e = &rows_j[(ci + 1) * per..(ci + 2) * per];
                        let wgt = wgt as f32;
                        acc.iter_mut()
                            .zip(e.iter().zip(u))
                            .for_each(|(a, (&e, &u))| *a += wgt * (e - u));
                    }
                    acc
                } else {
                    rows_j[..per].to_vec()
                };
                let mut draw_err: Option<Error> = None;
                let seed = seeds[r];
                let dj = &mut draws[j];
                let mut noise_fn = || -> Vec<f32> {
                    let k = *dj;
                    *dj += 1;
                    match &step_noise {
                        Some(d) => {
                            if k >= d.shape[0] {
                                draw_err = Some(Error::input(format!(
                                    "--step-noise: the scheduler drew noise {} times but the file has {}",
                                    k + 1,
                                    d.shape[0]
                                )));
                                return vec![0.0; per];
                            }
                            let base = (k * total + g) * per;
                            d.data[base..base + per].to_vec()
                        }
                        None => normals(seed.unwrap_or(0), 1 + k as u64, per),
                    }
                };
                if final_x0 && i + 1 == run_steps {
                    // the scheduler's pred_original_sample at the last step taken
                    let (_, ca, cb) = scheds[j].x0_coeffs(i)?;
                    x0s[j] = lats[j]
                        .iter()
                        .zip(&eps)
                        .map(|(z, e)| ca * z + cb * e)
                        .collect();
                }
                lats[j] = scheds[j].step(i, &eps, &lats[j], &mut noise_fn)?;
                if let Some(e) = draw_err.take() {
                    return Err(e);
                }
                if lats[j].iter().any(|v| !v.is_finite()) {
                    bail!(
                        "latents of sample {g} became non-finite at step {i} (t={t}); \
                         check the model weights and config"
                    );
                }
            }
            bar.inc(n as u64);
        }
        for l in if final_x0 { &x0s } else { &lats } {
            lat_all.extend_from_slice(l);
        }
    }
    bar.finish_and_clear();
    let lat = lat_all;

    // ---- decode and write
    let lt = Tensor::from_vec(lat.clone(), (rows, c, h, w), &dev).map_err(ce("latents"))?;
    let img = model::decode(&vae, &lt)?;
    let ishape = img.dims().to_vec();
    let pixels = img
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce("images"))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("scheduler".to_string(), kind.name().to_string());
    meta.insert("steps".to_string(), steps.to_string());
    meta.insert("shard".to_string(), format!("{si}/{sn}"));
    meta.insert("first_index".to_string(), start.to_string());
    let ready = write_safetensors_on(
        out_file,
        &[
            OutTensor::f32("latents", vec![rows, c, h, w], &lat),
            OutTensor::f32("images", ishape.clone(), &pixels),
        ],
        Some(meta),
    )?;
    let mut paths = vec![output.display().to_string(); rows];
    if let Some(dir) = &a.png_dir {
        let (ch, ih, iw) = (ishape[1], ishape[2], ishape[3]);
        for (r, path) in paths.iter_mut().enumerate() {
            let p = dir.join(format!("{:06}.png", start + r));
            let px = &pixels[r * ch * ih * iw..(r + 1) * ch * ih * iw];
            png::write_png_chw(&p, px, ch, ih, iw)?;
            *path = p.display().to_string();
        }
    }
    ready.commit()?;
    let mut out = Stdout::new();
    for (r, path) in paths.iter().enumerate() {
        let rec = json!({
            "kind": "sample",
            "index": start + r,
            "seed": seeds[r],
            "class": a.class,
            "client": a.client,
            "path": path,
        });
        out.line(&rec.to_string())?;
    }
    out.flush()
}
