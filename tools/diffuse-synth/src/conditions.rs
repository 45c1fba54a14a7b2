//! The conditions a sample is denoised under: prompt embeddings from files or from
//! --prompt through the text encoder, the unconditional embedding for guidance, and the
//! per-sample context rows [negative; condition 1; ...] the UNet attends to.

use crate::cli::Args;
use crate::model::ce;
use crate::plan::{Models, Plan};
use crate::text;
use candle_core::{Device, Tensor};
use ftk::tensors::TensorFile;
use ftk::{bail, Result};
use std::path::Path;

/// One dense f32 tensor read from a safetensors file.
pub struct Dense {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub(crate) fn read_tensor(path: &Path, name: &str, rank: usize, what: &str) -> Result<Dense> {
    let f = TensorFile::open(path)?;
    let t = f.require(name)?;
    t.expect_rank(rank, what)?;
    let data = t.to_f32_vec()?;
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        ftk::bail!(
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

pub(crate) fn read_optional(
    path: &Path,
    name: &str,
    rank: usize,
    what: &str,
) -> Result<Option<Dense>> {
    let f = TensorFile::open(path)?;
    if f.get(name).is_none() {
        return Ok(None);
    }
    read_tensor(path, name, rank, what).map(Some)
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

/// The context rows of every condition for this shard: [negative; cond_1; ...], each
/// [rows, L, D] (the unconditional one only when guided).
pub fn context_parts(a: &Args, plan: &Plan, models: &Models) -> Result<Vec<Tensor>> {
    let (total, start, end) = (plan.total, plan.start, plan.end);
    let unet = &models.unet;
    let mut ctx_parts = vec![];
    let text_parts = match plan.n_text {
        0 => None,
        _ => Some(text::prompt_rows(
            &plan.model_dir,
            &a.prompt,
            &a.negative_prompt,
            a.clip_skip,
            plan.guided,
            (total, start, end),
            unet.cross_attention_dim,
            plan.conds.first().map(|d| d.shape[1]),
            &unet.place.device,
        )?),
    };
    if let Some((cond, neg)) = text_parts {
        ctx_parts.extend(neg);
        ctx_parts.push(cond);
    }
    if let Some(n) = &plan.neg {
        ctx_parts.push(embed_rows(
            n,
            total,
            start,
            end,
            &a.prompt_embeds[0],
            "negative_prompt_embeds",
        )?);
    }
    for (d, p) in plan.conds.iter().zip(&a.prompt_embeds) {
        ctx_parts.push(embed_rows(d, total, start, end, p, "prompt_embeds")?);
    }
    if models.unclip.as_ref().is_some_and(|u| u.conditions() == 2) {
        // FedDISC's global branch has the same text as the image branch
        ctx_parts.push(ctx_parts[ctx_parts.len() - 1].clone());
    }
    Ok(ctx_parts)
}
