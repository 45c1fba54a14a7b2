//! FedProx (`flwr.server.strategy.FedProx`): its proximal term is the
//! clients' business; the server side is FedAvg's weighted mean.

use super::Spec;

pub const SPEC: Spec = Spec {
    name: "fedprox",
    about: "FedAvg on the server (the proximal term is client-side)",
    doc: "the same as fedavg (FedProx's server side is FedAvg)",
    flags: &[],
    layer_alloc: false,
    build: super::fedavg::SPEC.build,
};
