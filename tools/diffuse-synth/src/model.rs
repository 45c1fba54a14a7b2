//! Loading a diffusers folder (unet/, vae/, scheduler/) onto candle's
//! stable_diffusion modules. Each config.json is read as diffusers reads it and
//! mapped onto candle's config; anything candle's modules cannot represent is
//! refused with the field named, never silently approximated.

use crate::place::Placement;
use crate::scheduler::{Config as SchedConfig, Kind};
use crate::vendored::sd::{
    unet_2d::{BlockConfig, UNet2DConditionModel, UNet2DConditionModelConfig},
    vae::{AutoEncoderKL, AutoEncoderKLConfig},
};
use candle_core::{DType, Tensor};
use ftk::{bail, Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A candle error on `what`, classed by ftk's shared adapter (input,
/// device or internal).
pub fn ce(what: impl std::fmt::Display) -> impl FnOnce(candle_core::Error) -> Error {
    ftk::error::candle(what)
}

pub(crate) fn read_json(p: &Path) -> Result<Value> {
    let text = ftk::io::read_text(p)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::input(format!("{}: not valid JSON: {e}", p.display())))
}

pub(crate) struct Fields<'a> {
    pub(crate) v: &'a Value,
    pub(crate) src: String,
}

impl<'a> Fields<'a> {
    pub(crate) fn get(&self, k: &str) -> Option<&'a Value> {
        self.v.get(k).filter(|v| !v.is_null())
    }
    pub(crate) fn err(&self, k: &str, m: impl std::fmt::Display) -> Error {
        Error::input(format!("{}: field `{k}`: {m}", self.src))
    }
    pub(crate) fn usize_or(&self, k: &str, d: usize) -> Result<usize> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, got {v}"))),
        }
    }
    pub(crate) fn f64_or(&self, k: &str, d: f64) -> Result<f64> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(k, format!("expected a number, got {v}"))),
        }
    }
    pub(crate) fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(k, format!("expected true or false, got {v}"))),
        }
    }
    pub(crate) fn strs(&self, k: &str) -> Result<Vec<String>> {
        let v = self.get(k).ok_or_else(|| self.err(k, "missing"))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
            .ok_or_else(|| self.err(k, format!("expected a list of strings, got {v}")))
    }
    pub(crate) fn usizes(&self, k: &str) -> Result<Vec<usize>> {
        let v = self.get(k).ok_or_else(|| self.err(k, "missing"))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect())
            .ok_or_else(|| self.err(k, format!("expected a list of integers, got {v}")))
    }
    /// An int or a per-block list (diffusers accepts both).
    pub(crate) fn per_block(
        &self,
        k: &str,
        n: usize,
        d: Option<usize>,
    ) -> Result<Option<Vec<usize>>> {
        match self.get(k) {
            None => Ok(d.map(|d| vec![d; n])),
            Some(v) if v.is_u64() => Ok(Some(vec![v.as_u64().unwrap_or(0) as usize; n])),
            Some(_) => {
                let l = self.usizes(k)?;
                if l.len() != n {
                    return Err(self.err(k, format!("has {} entries for {n} blocks", l.len())));
                }
                Ok(Some(l))
            }
        }
    }
    /// Refuse a key unless it has its default (null/absent or `ok`).
    pub(crate) fn only(&self, k: &str, ok: &[Value]) -> Result<()> {
        match self.get(k) {
            None => Ok(()),
            Some(v) if ok.contains(v) => Ok(()),
            Some(v) => Err(self.err(k, format!("{v} is not supported by diffuse-synth"))),
        }
    }
}

fn weights_file(dir: &Path) -> Result<PathBuf> {
    for n in [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ] {
        let p = dir.join(n);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{}: no diffusion_pytorch_model.safetensors (only safetensors weights are read; \
         convert .bin with diffusers' save_pretrained(safe_serialization=True))",
        dir.display()
    )
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The UNet with what the pipeline needs from its config.
pub struct Unet {
    pub model: UNet2DConditionModel,
    pub in_channels: usize,
    pub cross_attention_dim: usize,
    pub sample_size: usize,
    /// `projection_class_embeddings_input_dim` of a Stable-unCLIP UNet (class labels width).
    pub class_dim: Option<usize>,
    /// Where the weights are (see [`crate::place`]).
    pub place: Placement,
}

/// The UNet folder: config.json read field by field as diffusers reads it, then the weights.
///
/// Long because it is one list: each config field, its default and its refusal sit
/// together in diffusers' order, so checking it against UNet2DConditionModel is one read.
pub fn load_unet(model_dir: &Path) -> Result<Unet> {
    load_unet_on(model_dir, &Placement::cpu())
}

/// [`load_unet`] with the weights on `place`.
pub fn load_unet_on(model_dir: &Path, place: &Placement) -> Result<Unet> {
    let dir = model_dir.join("unet");
    let cfg_path = dir.join("config.json");
    let v = read_json(&cfg_path)?;
    let f = Fields {
        v: &v,
        src: cfg_path.display().to_string(),
    };
    let down = f.strs("down_block_types")?;
    let up = f.strs("up_block_types")?;
    let chans = f.usizes("block_out_channels")?;
    let n = chans.len();
    if down.len() != n || up.len() != n || n == 0 {
        return Err(f.err(
            "down_block_types",
            format!(
                "{} down and {} up block types for {n} block_out_channels",
                down.len(),
                up.len()
            ),
        ));
    }
    for (i, d) in down.iter().enumerate() {
        let want_up = match d.as_str() {
            "CrossAttnDownBlock2D" => "CrossAttnUpBlock2D",
            "DownBlock2D" => "UpBlock2D",
            o => return Err(f.err("down_block_types", format!("{o:?} is not supported"))),
        };
        if up[n - 1 - i] != want_up {
            return Err(f.err(
                "up_block_types",
                format!(
                    "must mirror down_block_types (entry {} is {:?}, expected {want_up:?})",
                    n - 1 - i,
                    up[n - 1 - i]
                ),
            ));
        }
    }
    f.only("mid_block_type", &[Value::from("UNetMidBlock2DCrossAttn")])?;
    f.only("act_fn", &[Value::from("silu")])?;
    f.only("time_embedding_type", &[Value::from("positional")])?;
    f.only("resnet_time_scale_shift", &[Value::from("default")])?;
    f.only("conv_in_kernel", &[Value::from(3)])?;
    f.only("conv_out_kernel", &[Value::from(3)])?;
    f.only("only_cross_attention", &[Value::from(false)])?;
    f.only("dual_cross_attention", &[Value::from(false)])?;
    f.only("attention_type", &[Value::from("default")])?;
    // Stable unCLIP: a projection class embedding of the (noised) image embedding.
    f.only("class_embed_type", &[Value::from("projection")])?;
    f.only("class_embeddings_concat", &[Value::from(false)])?;
    let class_dim = match f.get("class_embed_type") {
        Some(_) => match f.get("projection_class_embeddings_input_dim") {
            Some(v) if v.as_u64().is_some_and(|d| d > 0) => v.as_u64().map(|d| d as usize),
            _ => {
                return Err(f.err(
                    "projection_class_embeddings_input_dim",
                    "class_embed_type \"projection\" needs a positive integer here",
                ))
            }
        },
        None => {
            f.only("projection_class_embeddings_input_dim", &[])?;
            None
        }
    };
    for k in [
        "num_class_embeds",
        "addition_embed_type",
        "time_cond_proj_dim",
        "encoder_hid_dim",
        "time_embedding_dim",
        "timestep_post_act",
        "time_embedding_act_fn",
        "reverse_transformer_layers_per_block",
    ] {
        f.only(k, &[])?;
    }
    let heads = match f.per_block("num_attention_heads", n, None)? {
        Some(h) => h,
        // quirk: diffusers reads attention_head_dim as the number of heads
        None => f
            .per_block("attention_head_dim", n, Some(8))?
            .unwrap_or_else(|| vec![8; n]),
    };
    let tlayers = f
        .per_block("transformer_layers_per_block", n, Some(1))?
        .unwrap_or_else(|| vec![1; n]);
    let cross = match f.get("cross_attention_dim") {
        Some(v) if v.is_u64() => v.as_u64().unwrap_or(0) as usize,
        Some(_) => {
            let l = f.usizes("cross_attention_dim")?;
            if l.windows(2).any(|w| w[0] != w[1]) || l.is_empty() {
                return Err(f.err("cross_attention_dim", "per-block values must be equal"));
            }
            l[0]
        }
        None => 1280,
    };
    let blocks = (0..n)
        .map(|i| BlockConfig {
            out_channels: chans[i],
            use_cross_attn: (down[i] == "CrossAttnDownBlock2D").then_some(tlayers[i]),
            attention_head_dim: heads[i],
        })
        .collect();
    let cfg = UNet2DConditionModelConfig {
        center_input_sample: f.bool_or("center_input_sample", false)?,
        flip_sin_to_cos: f.bool_or("flip_sin_to_cos", true)?,
        freq_shift: f.f64_or("freq_shift", 0.0)?,
        blocks,
        layers_per_block: f.usize_or("layers_per_block", 2)?,
        downsample_padding: f.usize_or("downsample_padding", 1)?,
        mid_block_scale_factor: f.f64_or("mid_block_scale_factor", 1.0)?,
        norm_num_groups: f.usize_or("norm_num_groups", 32)?,
        norm_eps: f.f64_or("norm_eps", 1e-5)?,
        cross_attention_dim: cross,
        // Off the CPU kernels (a GPU, or another dtype) attention is candle's, whose
        // [batch x heads, tokens, tokens] scores take GBs per layer at 512x512: in slices
        // of `g` (a divisor of every block's head count, since candle drops a remainder
        // slice), i.e. one row's heads at a time.
        sliced_attention_size: (!place.device.is_cpu() || place.dtype != DType::F32)
            .then(|| heads.iter().fold(0, |g, &h| gcd(g, h)))
            .filter(|&g| g > 0),
        use_linear_projection: f.bool_or("use_linear_projection", false)?,
        projection_class_embeddings_input_dim: class_dim,
    };
    if let Some(i) = heads.iter().position(|&h| h == 0) {
        return Err(f.err(
            "attention_head_dim",
            format!("block {i} has 0 heads; every block needs at least 1"),
        ));
    }
    for &c in &chans {
        if cfg.norm_num_groups == 0 || c % cfg.norm_num_groups != 0 {
            return Err(f.err(
                "norm_num_groups",
                format!("{} does not divide block channels {c}", cfg.norm_num_groups),
            ));
        }
    }
    let in_channels = f.usize_or("in_channels", 4)?;
    let out_channels = f.usize_or("out_channels", 4)?;
    let sample_size = f.usize_or("sample_size", 64)?;
    let wf = weights_file(&dir)?;
    let vb = crate::place::var_builder(&wf, place)?;
    let model =
        UNet2DConditionModel::new(vb, in_channels, out_channels, false, cfg).map_err(ce(
            format!("{}: does not match {}", wf.display(), cfg_path.display()),
        ))?;
    Ok(Unet {
        model,
        in_channels,
        cross_attention_dim: cross,
        sample_size,
        class_dim,
        place: place.clone(),
    })
}

pub struct Vae {
    pub model: AutoEncoderKL,
    pub scaling_factor: f64,
    /// Image pixels per latent pixel.
    pub factor: usize,
    pub place: Placement,
}

pub fn load_vae(model_dir: &Path) -> Result<Vae> {
    load_vae_on(model_dir, &Placement::cpu())
}

/// [`load_vae`] with the weights on `place`.
pub fn load_vae_on(model_dir: &Path, place: &Placement) -> Result<Vae> {
    let dir = model_dir.join("vae");
    let cfg_path = dir.join("config.json");
    let v = read_json(&cfg_path)?;
    let f = Fields {
        v: &v,
        src: cfg_path.display().to_string(),
    };
    let chans = f.usizes("block_out_channels")?;
    for t in f.strs("down_block_types")? {
        if t != "DownEncoderBlock2D" {
            return Err(f.err("down_block_types", format!("{t:?} is not supported")));
        }
    }
    for t in f.strs("up_block_types")? {
        if t != "UpDecoderBlock2D" {
            return Err(f.err("up_block_types", format!("{t:?} is not supported")));
        }
    }
    f.only("act_fn", &[Value::from("silu")])?;
    f.only("mid_block_add_attention", &[Value::from(true)])?;
    f.only("shift_factor", &[])?;
    f.only("latents_mean", &[])?;
    f.only("latents_std", &[])?;
    let cfg = AutoEncoderKLConfig {
        block_out_channels: chans.clone(),
        layers_per_block: f.usize_or("layers_per_block", 1)?,
        latent_channels: f.usize_or("latent_channels", 4)?,
        norm_num_groups: f.usize_or("norm_num_groups", 32)?,
        use_quant_conv: f.bool_or("use_quant_conv", true)?,
        use_post_quant_conv: f.bool_or("use_post_quant_conv", true)?,
    };
    // candle's GroupNorm reports these as a bug (exit 4); they are the config's.
    if chans.is_empty() || chans.len() > 16 {
        return Err(f.err(
            "block_out_channels",
            format!("{} blocks; a VAE has 1 to 16", chans.len()),
        ));
    }
    for &c in &chans {
        if cfg.norm_num_groups == 0 || c % cfg.norm_num_groups != 0 {
            return Err(f.err(
                "norm_num_groups",
                format!("{} does not divide block channels {c}", cfg.norm_num_groups),
            ));
        }
    }
    let in_c = f.usize_or("in_channels", 3)?;
    let out_c = f.usize_or("out_channels", 3)?;
    let scaling_factor = f.f64_or("scaling_factor", 0.18215)?;
    let wf = weights_file(&dir)?;
    let vb = crate::place::var_builder(&wf, place)?;
    let model = AutoEncoderKL::new(vb, in_c, out_c, cfg).map_err(ce(format!(
        "{}: does not match {}",
        wf.display(),
        cfg_path.display()
    )))?;
    Ok(Vae {
        model,
        scaling_factor,
        factor: 1 << (chans.len().saturating_sub(1)),
        place: place.clone(),
    })
}

/// scheduler/scheduler_config.json: its class (the default scheduler) and the raw object.
pub fn read_scheduler_config(model_dir: &Path) -> Result<(Option<Kind>, Value, String)> {
    let p = model_dir.join("scheduler").join("scheduler_config.json");
    let v = read_json(&p)?;
    let kind = v
        .get("_class_name")
        .and_then(Value::as_str)
        .and_then(Kind::from_class_name);
    Ok((kind, v, p.display().to_string()))
}

/// The scheduler config for `kind` as `Kind.from_pretrained(dir, subfolder="scheduler")`.
pub fn scheduler_config(kind: Kind, raw: &Value, src: &str) -> Result<SchedConfig> {
    SchedConfig::from_json(kind, raw, src)
}

/// Decode latents [B,C,h,w] to images in [0, 1] as StableDiffusionPipeline does.
pub fn decode(vae: &Vae, latents: &Tensor) -> Result<Tensor> {
    let x = (latents / vae.scaling_factor).map_err(ce("vae decode"))?;
    let img = vae.decode_f32(&x).map_err(ce("vae decode"))?;
    ((img / 2.0).and_then(|t| t + 0.5))
        .and_then(|t| t.clamp(0f32, 1f32))
        .map_err(ce("vae decode"))
}
