//! FedDISC conditioning: Stable-unCLIP image embeddings as the UNet's class labels.
//!
//! A Stable-unCLIP UNet (`class_embed_type: "projection"`) takes class labels of width P =
//! 2E: an image embedding (E) and the sinusoidal embedding of its noise level (E).
//! diffusers' `StableUnCLIPImg2ImgPipeline.noise_image_embeddings` makes them from a raw
//! image embedding e [E]:
//!
//! ```text
//! x = (e - mean) / std                      image_normalizer (the folder's image_normalizer/)
//! x = sqrt(acp[l]) x + sqrt(1 - acp[l]) n   image_noising_scheduler.add_noise, n ~ N(0, I)
//! x = x std + mean
//! label = [x, emb(l)]                       emb: flip_sin_to_cos=True, shift 0
//! ```
//!
//! FedDISC (MingzhaoYang/FedDISC `sdmodel.py ImageGenerator`) starts from an uploaded
//! [2E] feature (already [image, emb(500)]) instead: the image half is re-noised the same
//! way at level l (200 there) and the time half becomes (emb(l) + old) / 2.
//!
//! Guidance: the unconditional branch's label is zeros (diffusers' pipeline and FedDISC);
//! FedDISC adds a third branch whose label is the mean of a client's uploads for the class,
//! used as given: e = e_u + s (e_img - e_u) + s (e_glo - e_u).

use crate::model::ce;
use crate::scheduler::{Config, Kind, Scheduler};
use candle_core::{Device, Tensor};
use ftk::tensors::TensorFile;
use ftk::{bail, Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Tensor names tried, in order, when `--image-embeds-key` is not given: diffusers'
/// argument name, then fed-embed's upload (`cluster`/`noise`) and feature names.
pub const DEFAULT_KEYS: [&str; 3] = ["image_embeds", "centroids", "features"];

/// The per-sample stream of the noise-augmentation draw (initial latents use stream 0,
/// scheduler draws 1, 2, ...).
pub const NOISE_STREAM: u64 = u64::MAX;

/// The image-embedding noiser of a Stable-unCLIP folder.
pub struct Noiser {
    mean: Vec<f32>,
    std: Vec<f32>,
    acp: Vec<f32>,
    /// E: the image embedding width.
    pub dim: usize,
}

fn read_json(p: &Path) -> Result<Value> {
    let text = ftk::io::read_text(p)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::input(format!("{}: not valid JSON: {e}", p.display())))
}

impl Noiser {
    /// Reads `image_normalizer/` and `image_noising_scheduler/` of `model_dir`, for a UNet
    /// whose class labels are `class_dim` wide.
    pub fn load(model_dir: &Path, class_dim: usize) -> Result<Noiser> {
        let nd = model_dir.join("image_normalizer");
        let wf = ["diffusion_pytorch_model.safetensors", "model.safetensors"]
            .iter()
            .map(|n| nd.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::input(format!(
                    "{}: no diffusion_pytorch_model.safetensors: a UNet with class_embed_type \
                 \"projection\" needs the Stable-unCLIP image_normalizer (mean/std)",
                    nd.display()
                ))
            })?;
        let f = TensorFile::open(&wf)?;
        let vec1 = |name: &str| -> Result<Vec<f32>> {
            let t = f.require(name)?;
            if t.shape.len() != 2 || t.shape[0] != 1 {
                bail!(
                    "{}: `{name}` has shape {:?}, expected [1, embedding_dim]",
                    wf.display(),
                    t.shape
                );
            }
            t.to_f32_vec()
        };
        let mean = vec1("mean")?;
        let std = vec1("std")?;
        let dim = mean.len();
        if std.len() != dim {
            bail!("{}: `mean` and `std` differ in width", wf.display());
        }
        if std.iter().chain(&mean).any(|v| !v.is_finite()) || std.contains(&0.0) {
            bail!(
                "{}: `mean`/`std` must be finite and `std` non-zero",
                wf.display()
            );
        }
        if 2 * dim != class_dim {
            bail!(
                "{}: embedding width {dim} x 2 != the UNet's projection_class_embeddings_input_dim {class_dim}",
                wf.display()
            );
        }
        let sp = model_dir
            .join("image_noising_scheduler")
            .join("scheduler_config.json");
        let raw = read_json(&sp)?;
        let src = sp.display().to_string();
        // add_noise is the same in DDPM, DDIM and PNDM: sqrt(acp) x + sqrt(1 - acp) n.
        match raw.get("_class_name").and_then(Value::as_str) {
            Some("DDPMScheduler" | "DDIMScheduler" | "PNDMScheduler") => {}
            other => bail!(
                "{src}: `_class_name` {other:?}: the image noising scheduler must be \
                 DDPMScheduler (or DDIM/PNDM, whose add_noise is the same)"
            ),
        }
        let cfg = Config::from_json(Kind::Ddpm, &raw, &src)?;
        let acp = Scheduler::new(&cfg, 1, 0.0)?.alphas_cumprod().to_vec();
        Ok(Noiser {
            mean,
            std,
            acp,
            dim,
        })
    }

    /// The noising scheduler's num_train_timesteps (noise levels are 0..this).
    pub fn levels(&self) -> usize {
        self.acp.len()
    }

    /// The class label [2E] for one row: a raw image embedding [E] (diffusers'
    /// noise_image_embeddings) or an uploaded FedDISC feature [2E] (re-noised image half,
    /// averaged time half). `noise` is [E].
    pub fn label(&self, row: &[f32], level: usize, noise: &[f32]) -> Vec<f32> {
        let e = self.dim;
        debug_assert!(row.len() == e || row.len() == 2 * e);
        debug_assert_eq!(noise.len(), e);
        let a = self.acp[level];
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let temb = timestep_embedding(level as f32, e);
        let mut out = Vec::with_capacity(2 * e);
        for k in 0..e {
            let x = (row[k] - self.mean[k]) * 1.0 / self.std[k];
            let x = sa * x + sb * noise[k];
            out.push(x * self.std[k] + self.mean[k]);
        }
        if row.len() == 2 * e {
            out.extend(temb.iter().zip(&row[e..]).map(|(t, o)| (t + o) / 2.0));
        } else {
            out.extend_from_slice(&temb);
        }
        out
    }
}

/// diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
/// in float32 as torch computes it: [cos(t w_i), sin(t w_i)], w_i = exp(-ln(1e4) i / half).
pub fn timestep_embedding(t: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let c = -(10000f64.ln()) as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| t * ((c * i as f32) / half as f32).exp())
        .collect();
    let mut v: Vec<f32> = args.iter().map(|a| a.cos()).collect();
    v.extend(args.iter().map(|a| a.sin()));
    if dim % 2 == 1 {
        v.push(0.0);
    }
    v
}

/// Rows of a float matrix [M, W] read from a safetensors file.
pub struct Rows {
    pub data: Vec<f32>,
    pub rows: usize,
    pub width: usize,
    /// The tensor that was read (for messages).
    pub what: String,
}

impl Rows {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.width..(i + 1) * self.width]
    }
}

/// Reads tensor `key` (or the first of [`DEFAULT_KEYS`] present, or the file's only
/// tensor) as [M, W]; with `class`, keeps the rows whose `labels` entry is that class when
/// the file has an integer `labels` [M] (fed-embed's upload layout).
pub fn read_rows(path: &Path, key: Option<&str>, class: Option<i64>) -> Result<Rows> {
    let f = TensorFile::open(path)?;
    let name = match key {
        Some(k) => k.to_string(),
        None => match DEFAULT_KEYS.iter().find(|k| f.get(k).is_some()) {
            Some(k) => k.to_string(),
            None => {
                let names = f.names();
                if names.len() == 1 {
                    names[0].clone()
                } else {
                    bail!(
                        "{}: no tensor named image_embeds, centroids or features (it has: {}); \
                         name it with --image-embeds-key",
                        path.display(),
                        names.join(", ")
                    );
                }
            }
        },
    };
    let t = f.require(&name)?;
    t.expect_rank(2, "[rows, embedding width]")?;
    let (m, w) = (t.shape[0], t.shape[1]);
    let data = t.to_f32_vec()?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: `{name}` has a non-finite value in row {}",
            path.display(),
            i / w.max(1)
        );
    }
    let what = format!("{}: `{name}`", path.display());
    let keep: Vec<usize> = match (class, f.get("labels")) {
        (Some(c), Some(l)) if ftk::tensors::is_int(l.dtype) => {
            if l.shape.to_vec() != [m] {
                bail!(
                    "{}: `labels` has shape {:?}, expected [{m}] (one per row of `{name}`)",
                    path.display(),
                    l.shape
                );
            }
            let labels = l.to_i64_vec()?;
            let keep: Vec<usize> = (0..m).filter(|&i| labels[i] == c).collect();
            if keep.is_empty() {
                bail!(
                    "{}: no row of `{name}` has label {c} (--class) in `labels`",
                    path.display()
                );
            }
            keep
        }
        _ => (0..m).collect(),
    };
    if keep.is_empty() {
        bail!("{}: `{name}` has no rows", path.display());
    }
    let mut out = Vec::with_capacity(keep.len() * w);
    for &i in &keep {
        out.extend_from_slice(&data[i * w..(i + 1) * w]);
    }
    Ok(Rows {
        data: out,
        rows: keep.len(),
        width: w,
        what,
    })
}

/// What `--image-embeds` and friends ask for, resolved against the model.
pub struct Conditioning {
    pub noiser: Noiser,
    pub level: usize,
    pub images: Rows,
    /// One mean upload per `--global-embeds` file (width 2E), cycled over the samples.
    pub globals: Vec<Vec<f32>>,
    /// `noise` [samples, E] from --image-embeds-noise.
    pub noise: Option<Vec<f32>>,
    pub total: usize,
}

/// The flags of the unCLIP mode.
pub struct Flags<'a> {
    pub image_embeds: &'a Path,
    pub key: Option<&'a str>,
    pub global_embeds: &'a [PathBuf],
    pub noise_level: usize,
    pub noise_file: Option<&'a Path>,
    pub class: Option<i64>,
}

impl Conditioning {
    pub fn new(model_dir: &Path, class_dim: usize, a: &Flags, total: usize) -> Result<Self> {
        let noiser = Noiser::load(model_dir, class_dim)?;
        let e = noiser.dim;
        if a.noise_level >= noiser.levels() {
            bail!(
                "--noise-level {} is outside 0..{} (the image noising scheduler's num_train_timesteps)",
                a.noise_level,
                noiser.levels()
            );
        }
        let images = read_rows(a.image_embeds, a.key, a.class)?;
        if images.width != e && images.width != 2 * e {
            bail!(
                "{}: rows are {} wide; expected {e} (image embeddings) or {} (FedDISC uploads: \
                 image embedding + noise-level embedding), from the model's image_normalizer",
                images.what,
                images.width,
                2 * e
            );
        }
        if !total.is_multiple_of(images.rows) {
            bail!(
                "{}: {} rows{}; the sample count {total} must be a multiple (each row is used \
                 for total/rows consecutive samples)",
                images.what,
                images.rows,
                if a.class.is_some() {
                    " of this --class"
                } else {
                    ""
                }
            );
        }
        let mut globals = vec![];
        for p in a.global_embeds {
            let g = read_rows(p, a.key, a.class)?;
            if g.width != 2 * e {
                bail!(
                    "{}: rows are {} wide; global (domain) embeddings are FedDISC uploads of \
                     width {} (the UNet's class-label width)",
                    g.what,
                    g.width,
                    2 * e
                );
            }
            let mut mean = vec![0f32; g.width];
            for r in 0..g.rows {
                mean.iter_mut().zip(g.row(r)).for_each(|(m, v)| *m += v);
            }
            // torch.mean: the sum divided by the count
            mean.iter_mut().for_each(|m| *m /= g.rows as f32);
            globals.push(mean);
        }
        let noise = match a.noise_file {
            Some(p) => {
                let f = TensorFile::open(p)?;
                let t = f.require("noise")?;
                if t.shape.to_vec() != [total, e] {
                    bail!(
                        "{}: `noise` has shape {:?}, expected [{total}, {e}] (samples, image embedding width)",
                        p.display(),
                        t.shape
                    );
                }
                Some(t.to_f32_vec()?)
            }
            None => None,
        };
        Ok(Conditioning {
            noiser,
            level: a.noise_level,
            images,
            globals,
            noise,
            total,
        })
    }

    /// Conditions (guided branches besides the unconditional one): 1, or 2 with globals.
    pub fn conditions(&self) -> usize {
        1 + usize::from(!self.globals.is_empty())
    }

    /// The class labels of sample `g` for one UNet call: [zeros; image; (global)] when
    /// guided, [image] otherwise. `seed` is the sample's noise seed.
    pub fn labels(&self, g: usize, seed: u64, guided: bool) -> Result<Tensor> {
        let e = self.noiser.dim;
        let row = self.images.row(g / (self.total / self.images.rows));
        let noise = match &self.noise {
            Some(n) => n[g * e..(g + 1) * e].to_vec(),
            None => crate::normals(seed, NOISE_STREAM, e),
        };
        let img = self.noiser.label(row, self.level, &noise);
        let mut v = vec![];
        if guided {
            v.extend(std::iter::repeat_n(0f32, 2 * e));
        }
        v.extend_from_slice(&img);
        if !self.globals.is_empty() {
            v.extend_from_slice(&self.globals[g % self.globals.len()]);
        }
        let n = v.len() / (2 * e);
        Tensor::from_vec(v, (n, 2 * e), &Device::Cpu).map_err(ce("class labels"))
    }
}
