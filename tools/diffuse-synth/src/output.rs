//! A run's outputs: the latents decoded by the VAE, one safetensors file (`latents`,
//! `images`) written atomically, optional PNGs, and one manifest line per sample.

use crate::cli::Args;
use crate::model::{self, ce, Vae};
use crate::plan::Plan;
use crate::{png, sample_seed};
use candle_core::{Device, Tensor};
use ftk::cli::Stdout;
use ftk::records::{DiffuseSynthSample, Tag};
use ftk::tensors::{write_safetensors_on, OutTensor};
use ftk::Result;

/// Decode `lat` ([rows, C, h, w] flattened) with `vae` and write every output of the run.
/// It takes the VAE alone so that the caller can drop the UNet first (3.4 GB at SD-1.5
/// size, no longer needed: the decode's activations then reuse its memory).
pub fn write(
    a: &Args,
    plan: &Plan,
    vae: &Vae,
    latent: (usize, usize, usize),
    lat: &[f32],
    out_file: ftk::output::Output,
) -> Result<()> {
    let (c, h, w) = latent;
    let (rows, start, output) = (plan.rows(), plan.start, &plan.output);
    let (si, sn) = plan.shard;
    let seeds: Vec<Option<u64>> = (plan.start..plan.end)
        .map(|j| a.seed.map(|s| sample_seed(s, j)))
        .collect();
    let dev = Device::Cpu;
    let lt = Tensor::from_vec(lat.to_vec(), (rows, c, h, w), &dev).map_err(ce("latents"))?;
    let ph = crate::timing::phase(|| format!("vae decode (batch {rows})"));
    let img = model::decode(vae, &lt)?;
    ph.done();
    let ph = crate::timing::phase(|| "write".into());
    let ishape = img.dims().to_vec();
    let pixels = img
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ce("images"))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("scheduler".to_string(), plan.kind.name().to_string());
    meta.insert("steps".to_string(), plan.steps.to_string());
    meta.insert("shard".to_string(), format!("{si}/{sn}"));
    meta.insert("first_index".to_string(), start.to_string());
    let ready = write_safetensors_on(
        out_file,
        &[
            OutTensor::f32("latents", vec![rows, c, h, w], lat),
            OutTensor::f32("images", ishape.clone(), &pixels),
        ],
        Some(meta),
    )?;
    let mut paths = vec![output.display().to_string(); rows];
    // Every PNG is written and synced before any is put in place, then -o
    // last: a failure (a full disk) leaves none of this run's files.
    let mut pngs = Vec::new();
    if let Some(dir) = &a.png_dir {
        let (ch, ih, iw) = (ishape[1], ishape[2], ishape[3]);
        ftk::output::reserve_fds(rows);
        for (r, path) in paths.iter_mut().enumerate() {
            let p = dir.join(format!("{:06}.png", start + r));
            let px = &pixels[r * ch * ih * iw..(r + 1) * ch * ih * iw];
            pngs.push(png::stage_png_chw(&p, px, ch, ih, iw)?);
            *path = p.display().to_string();
        }
    }
    ftk::output::commit_all(pngs)?;
    ready.commit()?;
    ph.done();
    let mut out = Stdout::new();
    for (r, path) in paths.iter().enumerate() {
        ftk::jsonl::write_record(
            &mut out,
            &DiffuseSynthSample {
                class: a.class,
                client: a.client.clone(),
                index: (start + r) as u64,
                kind: Tag::default(),
                path: path.clone(),
                seed: seeds[r],
            },
        )?;
    }
    out.flush()
}
