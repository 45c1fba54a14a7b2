//! FedYogi (`flwr.server.strategy.FedYogi`; no bias correction).

use super::{FEDOPT_FLAGS, fedopt, Kind, ServerOpt, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "fedyogi",
    about: "FedOpt: Yogi on the pseudo-gradient",
    doc: "--eta 0.01 --beta1 0.9 --beta2 0.99 --tau 1e-3 (no bias correction)",
    flags: FEDOPT_FLAGS,
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    let (eta, beta1, beta2, tau) = fedopt(f, 1e-2, 0.9, 0.99, f.flower_api.fedopt_tau(1e-3))?;
    Ok(Kind::Linear {
        opt: ServerOpt::Yogi {
            eta,
            beta1,
            beta2,
            tau,
        },
        uniform: false,
    })
}
