//! FedAdagrad (`flwr.server.strategy.FedAdagrad`; beta1 = beta2 = 0).

use super::{fedopt, Flag, Kind, ServerOpt, Spec, StrategyFlags};
use ftk::Result;

pub const SPEC: Spec = Spec {
    name: "fedadagrad",
    about: "FedOpt: Adagrad on the pseudo-gradient",
    doc: "--eta 0.1 --tau 1e-9",
    flags: &[Flag::Eta, Flag::EtaL, Flag::Tau],
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    let (eta, _, _, tau) = fedopt(f, 0.1, 0.0, 0.0, f.flower_api.fedopt_tau(1e-9))?;
    Ok(Kind::Linear {
        opt: ServerOpt::Adagrad { eta, tau },
        uniform: false,
    })
}
