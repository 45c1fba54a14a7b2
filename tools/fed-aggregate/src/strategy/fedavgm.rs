//! FedAvgM (`flwr.server.strategy.FedAvgM`): SGD with momentum on the
//! pseudo-gradient `global - avg`.

use super::{Flag, Kind, ServerOpt, Spec, StrategyFlags};
use ftk::{bail, Result};

pub const SPEC: Spec = Spec {
    name: "fedavgm",
    about: "FedAvg plus server momentum",
    doc: "--server-lr 1 --server-momentum 0; steps from --global when either differs",
    flags: &[Flag::ServerLr, Flag::ServerMomentum],
    layer_alloc: false,
    build,
};

fn build(f: &StrategyFlags) -> Result<Kind> {
    let lr = f.server_lr.unwrap_or(1.0);
    let momentum = f.server_momentum.unwrap_or(0.0);
    if !(lr.is_finite() && momentum.is_finite() && momentum >= 0.0) {
        bail!("--server-lr must be finite and --server-momentum finite and >= 0");
    }
    // Flower only steps when momentum != 0 or lr != 1.
    let opt = if momentum != 0.0 || lr != 1.0 {
        ServerOpt::AvgM { lr, momentum }
    } else {
        ServerOpt::None
    };
    Ok(Kind::Linear {
        opt,
        uniform: false,
    })
}
