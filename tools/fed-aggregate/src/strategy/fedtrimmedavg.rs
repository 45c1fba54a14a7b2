//! FedTrimmedAvg (`flwr.server.strategy.FedTrimmedAvg`).

use super::{Flag, Kind, Spec, StrategyFlags};
use ftk::{bail, Result};

pub const SPEC: Spec = Spec {
    name: "fedtrimmedavg",
    about: "coordinate-wise trimmed mean",
    doc: "--trim-beta 0.2: drop int(beta*n) values at each end, mean of the rest",
    flags: &[Flag::TrimBeta],
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    let beta = f.trim_beta.unwrap_or(0.2);
    if !(0.0..0.5).contains(&beta) {
        bail!("--trim-beta {beta} is outside [0, 0.5) (Flower's proportiontocut range)");
    }
    Ok(Kind::TrimmedMean { beta })
}
