//! `fed-embed keys`: FedAPT frozen random keys, one per domain.

use crate::cli::Out;
use crate::{apt, input, save, shown};
use ftk::records::{FedEmbedKeys, Tag};
use ftk::tensors::OutTensor;
use ftk::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of client domains.
    #[arg(long)]
    pub domains: usize,
    /// Context tokens per prompt (the authors' --gctx, 24).
    #[arg(long, default_value_t = 24)]
    pub ctx: usize,
    /// Token width (CLIP ViT-B/32 text width 512).
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// Seed of the key stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub out: Out,
}

pub fn run(a: &Args) -> Result<FedEmbedKeys> {
    let d = input::positive("--domains", a.domains)?;
    let m = input::positive("--ctx", a.ctx)?;
    let w = input::positive("--dim", a.dim)?;
    // f32 keys, then the same bytes again in the output buffer.
    input::fits_in_memory(
        "the keys [--domains, --ctx, --dim]",
        &[d, m, w],
        2 * std::mem::size_of::<f32>(),
    )?;
    let k = apt::keys(d, m, w, a.seed);
    save(
        &a.out.output,
        "keys",
        &[OutTensor::f32("keys", vec![d, m, w], &k)],
    )?;
    Ok(FedEmbedKeys {
        ctx: m as u64,
        dim: w as u64,
        domains: d as u64,
        kind: Tag::default(),
        output: shown(&a.out.output),
        seed: a.seed,
    })
}
