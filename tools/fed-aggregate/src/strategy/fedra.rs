//! FedRA (arXiv 2311.11227; github leondada/FedRA): clients hold random
//! subsets of the layers (`crate::fedra`); each layer is the unweighted
//! mean over its holders.

use super::{Kind, ServerOpt, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "fedra",
    about: "FedRA: per-layer mean over the clients that held the layer",
    doc: concat!(
        "FedRA (leondada/FedRA): --alloc from `fed-aggregate fedra-alloc`; each\n",
        "layer (--layer-pattern) is the unweighted mean over the clients that held\n",
        "it, a layer nobody held keeps its --global value; client files may number\n",
        "their layers locally (0..L_i) or globally. Other tensors: mean over holders.",
    ),
    flags: &[],
    layer_alloc: true,
    build,
};

fn build(_: &StrategyFlags) -> Result<Kind> {
    Ok(Kind::Linear {
        opt: ServerOpt::None,
        uniform: true,
    })
}
