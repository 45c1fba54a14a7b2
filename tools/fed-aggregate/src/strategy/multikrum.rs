//! MultiKrum: Krum's scores, then the num_examples-weighted mean of the K
//! best clients.

use super::{Flag, Kind, Spec, StrategyFlags};
use ftk::{bail, Result};

pub const SPEC: Spec = Spec {
    name: "multikrum",
    about: "weighted mean of the K best Krum scores",
    doc: concat!(
        "--num-malicious F --to-keep K: the num_examples-weighted mean of the K best\n",
        "Krum scores",
    ),
    flags: &[Flag::NumMalicious, Flag::ToKeep],
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    let to_keep = f.to_keep.unwrap_or(0);
    if to_keep == 0 {
        bail!("multikrum needs --to-keep K >= 1 (the number of clients averaged)");
    }
    Ok(Kind::Krum {
        f: f.num_malicious.unwrap_or(0),
        to_keep,
    })
}
