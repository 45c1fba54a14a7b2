//! FedAdam (`flwr.server.strategy.FedAdam`), with Flower's bias-corrected
//! step size.

use super::{FEDOPT_FLAGS, fedopt, Kind, ServerOpt, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "fedadam",
    about: "FedOpt: Adam on the pseudo-gradient",
    doc: concat!(
        "--eta 0.1 --beta1 0.9 --beta2 0.99 --tau 1e-9, Flower's bias-corrected\n",
        "eta*sqrt(1-b2^(t+1))/(1-b1^(t+1)) with t the round (1 = first)",
    ),
    flags: FEDOPT_FLAGS,
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    let (eta, beta1, beta2, tau) = fedopt(f, 0.1, 0.9, 0.99, f.flower_api.fedopt_tau(1e-9))?;
    Ok(Kind::Linear {
        opt: ServerOpt::Adam {
            eta,
            beta1,
            beta2,
            tau,
        },
        uniform: false,
    })
}
