//! Krum (`flwr.server.strategy.Krum`): the client closest to its
//! neighbours; with --to-keep K > 0, MultiKrum, as Flower's
//! `num_clients_to_keep` does.

use super::{Flag, Kind, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "krum",
    about: "the client with the best Krum score",
    doc: concat!(
        "--num-malicious F --to-keep K: score = sum of the max(1,n-F-2) smallest\n",
        "squared distances; krum returns the best client (MultiKrum with --to-keep K)",
    ),
    flags: &[Flag::NumMalicious, Flag::ToKeep],
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    Ok(Kind::Krum {
        f: f.num_malicious.unwrap_or(0),
        to_keep: f.to_keep.unwrap_or(0),
    })
}
