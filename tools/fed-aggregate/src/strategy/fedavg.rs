//! FedAvg (`flwr.server.strategy.FedAvg`): the num_examples-weighted mean.

use super::{Kind, ServerOpt, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "fedavg",
    about: "weighted mean by num_examples (FedAvg)",
    doc: "weighted mean by num_examples",
    flags: &[],
    layer_alloc: false,
    build,
};

fn build(_: &StrategyFlags) -> Result<Kind> {
    Ok(Kind::Linear {
        opt: ServerOpt::None,
        uniform: false,
    })
}
