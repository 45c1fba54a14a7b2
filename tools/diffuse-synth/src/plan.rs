//! A sampling run's plan: the scheduler with its overrides, the guidance weights, the
//! conditions read from files, the samples of this shard; then the models it loads and
//! the latent shape they imply. Everything the flags can get wrong is refused here, before
//! any denoising.

use crate::cli::Args;
use crate::conditions::{read_optional, read_tensor, Dense};
use crate::model::{self, Unet, Vae};
use crate::place::Placement;
use crate::scheduler::{Config, Kind, Scheduler};
use crate::{classifier, unclip};
use ftk::{bail, Error, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// What one run will do, checked against the flags and the files they name.
pub struct Plan {
    pub model_dir: PathBuf,
    pub output: PathBuf,
    pub kind: Kind,
    pub cfg: Config,
    pub steps: usize,
    /// A scheduler as every sample starts it (for its timesteps).
    pub sched: Scheduler,
    /// 1 when --prompt is given (the first condition).
    pub n_text: usize,
    /// One guidance weight per condition.
    pub weights: Vec<f64>,
    /// Whether the unconditional branch runs (diffusers: scale > 1 or several conditions).
    pub guided: bool,
    /// `prompt_embeds` of each --prompt-embeds file.
    pub conds: Vec<Dense>,
    /// The first file's `negative_prompt_embeds` when guided without --prompt.
    pub neg: Option<Dense>,
    /// Samples in the whole run; --latents when given.
    pub total: usize,
    pub given: Option<Dense>,
    /// This shard (i of n) and its rows [start, end).
    pub shard: (usize, usize),
    pub start: usize,
    pub end: usize,
}

impl Plan {
    pub fn new(a: &Args) -> Result<Plan> {
        let (Some(model_dir), Some(output)) = (a.model.clone(), a.output.clone()) else {
            bail!("--model and -o are required");
        };
        let (kind, cfg, steps) = scheduler(a, &model_dir)?;
        if a.eta.is_nan() || a.eta < 0.0 {
            bail!("--eta must be >= 0");
        }
        let sched = Scheduler::new(&cfg, steps, a.eta)?;
        let (n_text, weights, guided) = guidance_weights(a)?;
        let (conds, neg) = read_conditions(a, guided, n_text)?;
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
        Ok(Plan {
            model_dir,
            output,
            kind,
            cfg,
            steps,
            sched,
            n_text,
            weights,
            guided,
            conds,
            neg,
            total,
            given,
            shard: (si, sn),
            start,
            end,
        })
    }

    /// Rows of this shard.
    pub fn rows(&self) -> usize {
        self.end - self.start
    }
}

/// The scheduler: the folder's class or --scheduler, its config with the override flags,
/// StableDiffusionPipeline's rewrite (not in unCLIP mode), and the step count.
fn scheduler(a: &Args, model_dir: &Path) -> Result<(Kind, Config, usize)> {
    let (file_kind, raw, src) = model::read_scheduler_config(model_dir)?;
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
    Ok((kind, cfg, steps))
}

/// (text conditions, one weight per condition, guided) from --prompt, --prompt-embeds,
/// --global-embeds and --guidance-scale.
fn guidance_weights(a: &Args) -> Result<(usize, Vec<f64>, bool)> {
    let unclip_mode = a.image_embeds.is_some();
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
    Ok((n_text, weights, guided))
}

/// Each --prompt-embeds file's `prompt_embeds`, and the unconditional embedding when
/// guidance needs it and --prompt does not give it.
fn read_conditions(a: &Args, guided: bool, n_text: usize) -> Result<(Vec<Dense>, Option<Dense>)> {
    let mut conds = Vec::with_capacity(a.prompt_embeds.len());
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

    Ok((conds, neg))
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

/// The models a plan needs, and what the flags ask of them checked against them.
pub struct Models {
    pub unet: Unet,
    pub vae: Vae,
    pub unclip: Option<unclip::Conditioning>,
    pub classifier: Option<classifier::Classifier>,
    /// The latents' [channels, height, width].
    pub latent: (usize, usize, usize),
}

impl Models {
    /// Long because every check of a flag against the loaded models (channels, sizes,
    /// embedding widths, unCLIP and classifier flags) is here, in the order users meet them.
    pub fn load(a: &Args, plan: &Plan, place: &Placement) -> Result<Models> {
        let model_dir = &plan.model_dir;
        let total = plan.total;
        let ph = crate::timing::phase(|| "load unet".into());
        let unet = model::load_unet_on(model_dir, place)?;
        ph.done();
        let ph = crate::timing::phase(|| "load vae".into());
        let vae = model::load_vae_on(model_dir, place)?;
        ph.done();
        let unclip = match (&a.image_embeds, unet.class_dim) {
            (Some(p), Some(cd)) => Some(unclip::Conditioning::new(
                model_dir,
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
                let c = classifier::Classifier::from_arch_on(arch, wf, &place.device)?;
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
        let (c, h, w) = match &plan.given {
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
        for (d, p) in plan.conds.iter().zip(&a.prompt_embeds) {
            if d.shape[2] != unet.cross_attention_dim {
                bail!(
                    "{}: `prompt_embeds` dim {} != the UNet's cross_attention_dim {}",
                    p.display(),
                    d.shape[2],
                    unet.cross_attention_dim
                );
            }
            if d.shape[1] != plan.conds[0].shape[1] {
                bail!(
                    "{}: token count differs from the first --prompt-embeds",
                    p.display()
                );
            }
        }
        if let Some(n) = &plan.neg {
            if n.shape[1..] != plan.conds[0].shape[1..] {
                bail!(
                    "{}: `negative_prompt_embeds` shape {:?} != `prompt_embeds` {:?}",
                    a.prompt_embeds[0].display(),
                    n.shape,
                    plan.conds[0].shape
                );
            }
        }
        Ok(Models {
            unet,
            vae,
            unclip,
            classifier: clf,
            latent: (c, h, w),
        })
    }
}
