//! Bulyan (`flwr.server.strategy.Bulyan`): Krum selection, then a trimmed
//! mean around the median per coordinate. The selection differs between
//! Flower's two strategy families (`crate::flower_api`).

use super::{Flag, Kind, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "bulyan",
    about: "Krum selection, then a trimmed mean around the median",
    doc: concat!(
        "--num-malicious F (n >= 4F+3): n-2F rounds of Krum, then per coordinate\n",
        "the mean of the n-4F selected values closest to their median",
    ),
    flags: &[Flag::NumMalicious],
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    Ok(Kind::Bulyan {
        f: f.num_malicious.unwrap_or(0),
    })
}
