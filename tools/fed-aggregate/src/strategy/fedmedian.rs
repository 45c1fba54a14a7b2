//! FedMedian (`flwr.server.strategy.FedMedian`).

use super::{Kind, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "fedmedian",
    about: "coordinate-wise median",
    doc: "coordinate-wise median (unweighted)",
    flags: &[],
    layer_alloc: false,
    build,
};

fn build(_: &StrategyFlags) -> Result<Kind> {
    Ok(Kind::Median)
}
