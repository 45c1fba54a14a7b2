//! `fed-embed subspace`: FedD3A client basis of the feature subspace.

use crate::cli::{Feat, Out};
use crate::{input, save, shown, subspace};
use ftk::records::{FedEmbedSubspace, Tag};
use ftk::tensors::OutTensor;
use ftk::{bail, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub feat: Feat,
    /// Keep exactly r directions.
    #[arg(long, conflicts_with = "energy", required_unless_present = "energy")]
    pub rank: Option<usize>,
    /// Keep the fewest directions whose share of sum(sigma^2) reaches this (0, 1].
    #[arg(long)]
    pub energy: Option<f64>,
    #[command(flatten)]
    pub out: Out,
}

pub fn run(a: &Args) -> Result<FedEmbedSubspace> {
    let rank = match (a.rank, a.energy) {
        (Some(r), _) => subspace::Rank::Fixed(input::positive("--rank", r)?),
        (None, Some(e)) => subspace::Rank::Energy(input::in_range("--energy", e, 0.0, 1.0, true)?),
        (None, None) => bail!("give --rank r or --energy e"),
    };
    let (_f, x) = a.feat.load()?;
    let what = format!("{}: tensor '{}'", a.feat.features.display(), a.feat.tensor);
    let s = subspace::fit(&x, rank, &what)?;
    let sv: Vec<f32> = s.singular[..s.rank].iter().map(|&v| v as f32).collect();
    save(
        &a.out.output,
        "subspace",
        &[
            s.basis.out("basis"),
            OutTensor::f32("singular_values", vec![s.rank], &sv),
        ],
    )?;
    Ok(FedEmbedSubspace {
        dim: x.cols as u64,
        energy: s.energy,
        kind: Tag::default(),
        numerical_rank: s.numerical_rank as u64,
        output: shown(&a.out.output),
        rank: s.rank as u64,
        samples: x.rows as u64,
        sigma_max: s.singular[0],
        sigma_r: s.singular[s.rank - 1],
    })
}
